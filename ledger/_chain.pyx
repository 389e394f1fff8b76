# cython: language_level=3
"""The journal's chain hash in C (ledger/_blake2b_tree4.h): BLAKE2b's tree mode with four
leaves, compressed side by side in SIMD lanes, with the GIL released. docs/ledger.md defines
it; tests/unit/test_ledger_chain.py checks it against Python's hashlib."""
from libc.stdint cimport uint8_t, uint64_t


cdef extern from "_blake2b_tree4.h" nogil:
    void yk_b2_tree4(const uint8_t* prev, const uint8_t* rec, uint64_t rec_bytes, uint8_t* out)


def tree4(const unsigned char[::1] prev not None, const unsigned char[::1] records not None) -> bytes:
    """The 32-byte chain hash of a batch: `prev` the previous header's 32-byte hash, `records`
    the batch's record bytes (at least one byte)."""
    cdef unsigned char out[32]
    if prev.shape[0] != 32:
        raise ValueError(f"tree4: the previous hash is 32 bytes, got {prev.shape[0]}")
    if records.shape[0] == 0:
        raise ValueError("tree4: a batch has at least one record")
    with nogil:
        yk_b2_tree4(&prev[0], &records[0], <uint64_t>records.shape[0], out)
    return out[:32]
