"""Keyed hashes that stand in for card data: PAN → pan_hash, 社会保障号码 → person_hash,
(card, PIN) → PIN verification value. The engine, the journal and the checkpoints only ever
see these; the node's data key never leaves memory (rule 6: no card data at rest).

One 32-byte node data key derives the three SipHash keys (BLAKE2b, personalised), so that a
hash of one kind can never be confused with another.
"""
import hashlib

import numpy as np

from . import _core

# The demo node's data key. A demo only: a real node reads its key from the environment or a
# key file outside the data directory (see docs/keys.md).
DEMO_DATA_KEY = hashlib.blake2b(b"yikatong demo node data key", digest_size=32).digest()


class CardKeys:
    """The node's keyed hashes. `CardKeys(DEMO_DATA_KEY).pan_hash("6214830000000017")`."""

    def __init__(self, data_key: bytes):
        if len(data_key) != 32:
            raise ValueError(f"node data key: {len(data_key)} bytes, expecting 32")
        derive = lambda label: hashlib.blake2b(data_key, digest_size=16, person=label).digest()
        self.pan_key = derive(b"yikatong-pan")
        self.person_key = derive(b"yikatong-person")
        self.pvv_key = derive(b"yikatong-pvv")

    def pan_hash(self, pan: str) -> int:
        return _core.siphash(self.pan_key, pan.encode("ascii"))

    def person_hash(self, citizen_id: str) -> int:
        return _core.siphash(self.person_key, citizen_id.upper().encode("ascii"))

    def pvv(self, pan_hash: int, pin: str) -> int:
        return int(_core.pvv_array(np.array([pan_hash], dtype=np.uint64), pin.encode("ascii"),
                                   self.pvv_key)[0])

    def pvv_many(self, pan_hashes: np.ndarray, pin: str) -> np.ndarray:
        return _core.pvv_array(np.ascontiguousarray(pan_hashes, dtype=np.uint64),
                               pin.encode("ascii"), self.pvv_key)

    def pan_hash_rows(self, rows: np.ndarray) -> np.ndarray:
        return _core.hash_rows(rows, self.pan_key)

    def person_hash_rows(self, rows: np.ndarray) -> np.ndarray:
        return _core.hash_rows(rows, self.person_key)
