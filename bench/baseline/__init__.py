"""The independent client and the naive baseline server, written from PROTOCOL.md alone.

Nothing here imports ``yikatong``: ``iso_spec`` (pyiso8583 spec of §2), ``crypto`` (MACs, PIN
block, working keys with `cryptography`), ``client`` (framing, request builders, reply parsing,
a synchronous ``Terminal``), ``server`` (the naive asyncio + sqlite3 baseline server) and
``loadgen`` (a closed-loop load driver). Interop tests compare the project's codec with these
byte for byte; benchmarks compare the project's server with ``server``.
"""
