"""yikatong.ledger — storage: the LMDB journal, checkpoints, recovery, verification, and the
read-side jobs (reconciliation, settlement, clearing, reports). May import yikatong.engine."""
