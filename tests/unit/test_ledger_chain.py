"""The journal's hash chain function (ledger/journal.py batch_hash, ledger/_blake2b_tree4.h):
BLAKE2b's tree mode with four leaves for new ledgers, the sequential BLAKE2b-256 for ledgers
written before, and the meta key that says which a ledger uses."""
import hashlib
import os
import random

import lmdb
import numpy as np
import pytest

from yikatong.ledger import _chain
from yikatong.ledger.journal import CHAIN_BLAKE2B, CHAIN_BLAKE2B_TREE4, Journal, LedgerError, batch_hash
from yikatong.ledger.records import RECORD_DTYPE

SIZE = RECORD_DTYPE.itemsize
BD = 20261130


def tree4_by_hand(prev: bytes, records: bytes) -> bytes:
    """The BLAKE2 paper's tree mode written out from its parameters with Python's hashlib, on the
    whole message: fanout 4, depth 2, inner length 32, leaf length = a quarter of the message
    rounded up to a 128-byte block; leaf i = the message's i-th leaf-length slice."""
    message = prev + records
    leaf = ((len(message) + 3) // 4 + 127) // 128 * 128
    common = dict(digest_size=32, fanout=4, depth=2, leaf_size=leaf, inner_size=32)
    leaves = [hashlib.blake2b(message[i * leaf:(i + 1) * leaf], node_offset=i, node_depth=0, last_node=i == 3,
                              **common).digest() for i in range(4)]
    return hashlib.blake2b(b"".join(leaves), node_offset=0, node_depth=1, last_node=True, **common).digest()


# record counts, then raw lengths: one block, leaves of unequal block counts, an empty last leaf,
# the first block straddling the previous hash and the records, large batches
COUNTS = [1, 2, 3, 5, 421, 422, 423, 4096, 13_107]
LENGTHS = [1, 95, 96, 97, 224, 352, 353, 479, 480, 481, 1000, 4096 * 304 + 1]


@pytest.mark.parametrize("n_bytes", [c * SIZE for c in COUNTS] + LENGTHS)
def test_tree4_is_blake2b_tree_mode_with_four_leaves(n_bytes):
    rng = random.Random(n_bytes)
    prev, records = rng.randbytes(32), rng.randbytes(n_bytes)
    expected = tree4_by_hand(prev, records)
    assert _chain.tree4(prev, records) == expected
    assert batch_hash(prev, np.frombuffer(records, np.uint8), CHAIN_BLAKE2B_TREE4) == expected
    # and not the sequential hash, which older ledgers keep
    sequential = hashlib.blake2b(prev + records, digest_size=32).digest()
    assert batch_hash(prev, records, CHAIN_BLAKE2B) == sequential != expected


def test_tree4_every_byte_counts():
    """A flipped bit anywhere (the previous hash, each leaf, the last byte) changes the hash."""
    rng = random.Random(5)
    prev, records = rng.randbytes(32), bytearray(rng.randbytes(1000 * SIZE))
    base = _chain.tree4(prev, bytes(records))
    assert _chain.tree4(bytes([prev[0] ^ 1]) + prev[1:], bytes(records)) != base
    for at in (0, 95, 96, len(records) // 4, len(records) // 2, 3 * len(records) // 4, len(records) - 1):
        records[at] ^= 0x80
        assert _chain.tree4(prev, bytes(records)) != base
        records[at] ^= 0x80
    assert _chain.tree4(prev, bytes(records)) == base


def test_empty_batch_and_unknown_chain_are_refused():
    with pytest.raises(ValueError, match="at least one record"):
        batch_hash(bytes(32), b"", CHAIN_BLAKE2B_TREE4)
    with pytest.raises(ValueError, match="unknown chain hash"):
        batch_hash(bytes(32), b"x" * SIZE, b"sha1")
    with pytest.raises(ValueError, match="previous hash is 32 bytes"):
        _chain.tree4(bytes(31), b"x" * SIZE)


def records_from(first_seq: int, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    records = np.frombuffer(rng.integers(0, 256, count * SIZE, dtype=np.uint8).tobytes(), RECORD_DTYPE).copy()
    records["seq"] = np.arange(first_seq, first_seq + count, dtype=np.uint64)
    records["business_date"] = BD
    return records


def append_and_reopen(journal: Journal, counts: list, chain: bytes) -> Journal:
    """Appends a batch of each count — the first in this process, the rest through the writer
    process — closes, and returns the ledger reopened read-only, its chain checked."""
    sent = [records_from(1, counts[0], counts[0])]
    journal.append(sent[0], BD)
    journal.start_writer()
    for count in counts[1:]:
        sent.append(records_from(journal.last_seq + 1, count, count))
        journal.append(sent[-1], BD)
    journal.close()
    reader = Journal(journal.data_dir, readonly=True)
    assert reader.chain == chain
    prev = bytes(32)
    headers = reader.headers()
    assert headers.shape[0] == len(sent)
    for header, records in zip(headers, sent):
        assert bytes(header["prev_hash"]) == prev
        prev = batch_hash(prev, records.tobytes(), chain)
        assert bytes(header["hash"]) == prev
    return reader


def test_a_new_ledger_records_tree4_and_the_writer_uses_it(tmp_path):
    journal = Journal(str(tmp_path), create=True)
    assert journal.chain == CHAIN_BLAKE2B_TREE4
    reader = append_and_reopen(journal, [5, 1000, 1, 3000], CHAIN_BLAKE2B_TREE4)
    with reader.env.begin() as txn:
        assert txn.get(b"chain_hash", db=reader.meta_db) == CHAIN_BLAKE2B_TREE4
    reader.close()


def test_a_ledger_from_before_the_key_keeps_the_sequential_chain(tmp_path):
    journal = Journal(str(tmp_path), create=True)
    with journal.env.begin(write=True) as txn:               # as written before the key existed
        assert txn.delete(b"chain_hash", db=journal.meta_db)
    journal.close()
    journal = Journal(str(tmp_path))
    assert journal.chain == CHAIN_BLAKE2B
    reader = append_and_reopen(journal, [7, 2000, 2], CHAIN_BLAKE2B)
    with reader.env.begin() as txn:
        assert txn.get(b"chain_hash", db=reader.meta_db) is None     # nothing rewritten
    reader.close()


def test_an_unknown_chain_hash_refuses_to_open(tmp_path):
    Journal(str(tmp_path), create=True).close()
    env = lmdb.open(os.path.join(str(tmp_path), "journal.lmdb"), max_dbs=4)
    with env.begin(write=True) as txn:
        txn.put(b"chain_hash", b"blake3-tree9", db=env.open_db(b"meta", txn=txn))
    env.close()
    with pytest.raises(LedgerError, match=r"'blake3-tree9'.*upgrade yikatong"):
        Journal(str(tmp_path))


@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3", "x86-64-v4"])
def test_every_compiled_version_of_tree4(tmp_path, march):
    """The extension picks one of three versions of the lanes' loop at load time (target_clones:
    AVX-512, AVX2, baseline): this machine runs one of them, so each is built here on its own
    (YK_B2_NO_CLONES, gcc -march=…) and checked against hashlib."""
    import ctypes
    import pathlib
    import shutil
    import subprocess
    flags = {"x86-64-v3": "avx2", "x86-64-v4": "avx512vl"}
    if flags.get(march) and flags[march] not in pathlib.Path("/proc/cpuinfo").read_text():
        pytest.skip(f"this CPU cannot run {march} code")
    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    header = pathlib.Path(_chain.__file__).parent / "_blake2b_tree4.h"     # shipped beside the module
    source = tmp_path / "t.c"
    source.write_text(f'#define YK_B2_NO_CLONES\n#include "{header}"\n'
                      "void tree4(const uint8_t *p, const uint8_t *r, uint64_t n, uint8_t *o) "
                      "{ yk_b2_tree4(p, r, n, o); }\n")
    lib = tmp_path / f"t-{march}.so"
    subprocess.run(["gcc", "-O3", f"-march={march}", "-shared", "-fPIC", "-o", str(lib), str(source)], check=True)
    tree4 = ctypes.CDLL(str(lib)).tree4
    rng = random.Random(march)
    for n_bytes in [c * SIZE for c in COUNTS] + LENGTHS:
        prev, records = rng.randbytes(32), rng.randbytes(n_bytes)
        out = ctypes.create_string_buffer(32)
        tree4(prev, records, ctypes.c_uint64(n_bytes), out)
        assert out.raw == tree4_by_hand(prev, records), n_bytes
