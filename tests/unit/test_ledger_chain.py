"""The journal's hash chain function (ledger/journal.py batch_hash, ChainHasher): BLAKE2b's tree
mode with two leaves for new ledgers, the sequential BLAKE2b-256 for ledgers written before, and
the meta key that says which a ledger uses."""
import hashlib
import os
import random
from concurrent.futures import ThreadPoolExecutor

import lmdb
import numpy as np
import pytest

from yikatong.ledger.journal import (CHAIN_BLAKE2B, CHAIN_BLAKE2B_TREE2, CHAIN_PARALLEL_MIN_BYTES, ChainHasher,
                                     Journal, LedgerError, batch_hash)
from yikatong.ledger.records import RECORD_DTYPE

SIZE = RECORD_DTYPE.itemsize
BD = 20261130


def tree2_by_hand(prev: bytes, records: bytes) -> bytes:
    """The BLAKE2 paper's tree mode written out from its parameters, on the whole message: fanout
    2, depth 2, inner length 32, leaf length = half the message rounded up to a 128-byte block."""
    message = prev + records
    leaf = ((len(message) + 1) // 2 + 127) // 128 * 128
    common = dict(digest_size=32, fanout=2, depth=2, leaf_size=leaf, inner_size=32)
    d0 = hashlib.blake2b(message[:leaf], node_offset=0, node_depth=0, last_node=False, **common).digest()
    d1 = hashlib.blake2b(message[leaf:], node_offset=1, node_depth=0, last_node=True, **common).digest()
    return hashlib.blake2b(d0 + d1, node_offset=0, node_depth=1, last_node=True, **common).digest()


COUNTS = [1, 2, 3, 421, 422, 423, 4096, CHAIN_PARALLEL_MIN_BYTES // SIZE + 1]


@pytest.mark.parametrize("count", COUNTS)
def test_tree2_is_blake2b_tree_mode_with_two_leaves(count):
    rng = random.Random(count)
    prev, records = rng.randbytes(32), rng.randbytes(count * SIZE)
    expected = tree2_by_hand(prev, records)
    assert batch_hash(prev, records, CHAIN_BLAKE2B_TREE2) == expected
    with ThreadPoolExecutor(1) as executor:
        assert batch_hash(prev, memoryview(records), CHAIN_BLAKE2B_TREE2, executor) == expected
    # and not the sequential hash, which older ledgers keep
    sequential = hashlib.blake2b(prev + records, digest_size=32).digest()
    assert batch_hash(prev, records, CHAIN_BLAKE2B) == sequential != expected


@pytest.mark.parametrize("chain", [CHAIN_BLAKE2B, CHAIN_BLAKE2B_TREE2])
@pytest.mark.parametrize("count", COUNTS)
def test_chain_hasher_in_pieces_equals_the_one_shot_hash(chain, count):
    rng = random.Random(count * 7)
    prev, records = rng.randbytes(32), rng.randbytes(count * SIZE)
    for _ in range(5):                     # random piece boundaries, including empty pieces
        h = ChainHasher(prev, len(records), chain)
        at = 0
        while at < len(records):
            step = rng.choice([0, 1, 127, 128, 4096, 65536, len(records)])
            h.update(records[at:at + step])
            at += step
        assert h.digest() == batch_hash(prev, records, chain)


def test_empty_batch_and_unknown_chain_are_refused():
    with pytest.raises(ValueError, match="at least one record"):
        batch_hash(bytes(32), b"", CHAIN_BLAKE2B_TREE2)
    with pytest.raises(ValueError, match="unknown chain hash"):
        batch_hash(bytes(32), b"x" * SIZE, b"sha1")


def records_from(first_seq: int, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    records = np.frombuffer(rng.integers(0, 256, count * SIZE, dtype=np.uint8).tobytes(), RECORD_DTYPE).copy()
    records["seq"] = np.arange(first_seq, first_seq + count, dtype=np.uint64)
    records["business_date"] = BD
    return records


def chain_of(journal: Journal, sent: list, chain: bytes) -> None:
    prev = bytes(32)
    headers = journal.headers()
    assert headers.shape[0] == len(sent)
    for header, records in zip(headers, sent):
        assert bytes(header["prev_hash"]) == prev
        prev = batch_hash(prev, records.tobytes(), chain)
        assert bytes(header["hash"]) == prev


def test_a_new_ledger_records_tree2_and_the_writer_uses_it(tmp_path):
    journal = Journal(str(tmp_path), create=True)
    assert journal.chain == CHAIN_BLAKE2B_TREE2
    sent = [records_from(1, 5, 1)]
    journal.append(sent[0], BD)                              # in this process
    journal.start_writer()
    for count in (1000, 1, 3000):                            # through the writer (≥ 256 KiB: two threads)
        sent.append(records_from(journal.last_seq + 1, count, count))
        journal.append(sent[-1], BD)
    journal.close()
    reader = Journal(str(tmp_path), readonly=True)
    assert reader.chain == CHAIN_BLAKE2B_TREE2
    with reader.env.begin() as txn:
        assert txn.get(b"chain_hash", db=reader.meta_db) == CHAIN_BLAKE2B_TREE2
    chain_of(reader, sent, CHAIN_BLAKE2B_TREE2)
    reader.close()


def test_a_ledger_from_before_the_key_keeps_the_sequential_chain(tmp_path):
    journal = Journal(str(tmp_path), create=True)
    with journal.env.begin(write=True) as txn:               # as written before the key existed
        assert txn.delete(b"chain_hash", db=journal.meta_db)
    journal.close()
    journal = Journal(str(tmp_path))
    assert journal.chain == CHAIN_BLAKE2B
    sent = [records_from(1, 7, 3)]
    journal.append(sent[0], BD)
    journal.start_writer()
    for count in (2000, 2):
        sent.append(records_from(journal.last_seq + 1, count, count))
        journal.append(sent[-1], BD)
    journal.close()
    reader = Journal(str(tmp_path), readonly=True)
    assert reader.chain == CHAIN_BLAKE2B
    with reader.env.begin() as txn:
        assert txn.get(b"chain_hash", db=reader.meta_db) is None     # nothing rewritten
    chain_of(reader, sent, CHAIN_BLAKE2B)
    reader.close()


def test_an_unknown_chain_hash_refuses_to_open(tmp_path):
    Journal(str(tmp_path), create=True).close()
    env = lmdb.open(os.path.join(str(tmp_path), "journal.lmdb"), max_dbs=4)
    with env.begin(write=True) as txn:
        txn.put(b"chain_hash", b"blake3-tree9", db=env.open_db(b"meta", txn=txn))
    env.close()
    with pytest.raises(LedgerError, match=r"'blake3-tree9'.*upgrade yikatong"):
        Journal(str(tmp_path))
