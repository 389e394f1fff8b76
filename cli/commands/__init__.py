"""Sub-commands of `yikatong`, one module each (discovered by yikatong.main)."""
