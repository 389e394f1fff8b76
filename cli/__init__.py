"""yikatong — engine for the social security card 一卡通.

Parts: yikatong.engine (domain core) ← yikatong.ledger (LMDB journal, jobs) ←
yikatong.protocols (ISO 8583 codec, server) ← yikatong.main (the command line).
"""
__version__ = "0.1.0"
