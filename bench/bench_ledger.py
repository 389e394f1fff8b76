"""Ledger benchmarks (issue 3): durable append vs raw py-lmdb putmulti (same record bytes, sync
on), bulk read into numpy vs a per-record cursor loop, replay rate, and (full size) recovery of a
10 M-record journal whose last checkpoint is 1 M records back.

    YIKATONG_BENCH_SIZE=full .venv/bin/python -m pytest -q bench/bench_ledger.py --benchmark-only \\
        -p no:cacheprovider --benchmark-columns=min,median,mean,ops
Figures: bench/README-ledger.md.
"""
import hashlib
import time

import lmdb
import numpy as np
import pytest

from bench.conftest import FULL, size
from yikatong.engine.cardkeys import CardKeys, DEMO_DATA_KEY
from yikatong.engine.workload import generated_pan_hashes, medical_settlements
from yikatong.ledger.demo_node import init_demo
from yikatong.ledger.node import LedgerConfig, Node, batch_records, new_engine, read_headers, replay_batch
from yikatong.ledger.records import RECORD_DTYPE, records_from_batch

BD = 20261124
CARDS = 1000


def settlement_records(engine, count: int, first_seq: int, seed: int) -> np.ndarray:
    """Records of `count` settlements applied to a scratch engine (real result rows)."""
    q = medical_settlements(engine, generated_pan_hashes(CardKeys(DEMO_DATA_KEY), CARDS), count, seed=seed)
    results = engine.apply_batch(q, business_date=BD)
    return records_from_batch(q, results, first_seq, BD)


@pytest.fixture(scope="module")
def template_records():
    from yikatong.engine.demo import demo_engine
    engine, _ = demo_engine(generated_cards=CARDS, business_date=BD, txn_retention_count=1 << 16)
    return settlement_records(engine, 4096, 1, seed=7)


def _rounds(batch_size: int) -> int:
    return {1: size(200, 2000), 256: size(50, 400), 4096: size(10, 100)}[batch_size]


@pytest.mark.parametrize("batch_size", [1, 256, 4096])
def test_durable_append(benchmark, tmp_path, template_records, batch_size):
    """One batch per round through the writer process: records + header in one txn, fsync'd."""
    node = init_demo(str(tmp_path / "n"), 0, BD, txn_retention_count=1 << 10,
                     ledger_config=LedgerConfig(map_size_bytes=8 << 30))
    batch = template_records[:batch_size].copy()

    def append():
        batch["seq"] = np.arange(node.last_seq + 1, node.last_seq + 1 + batch_size, dtype=np.uint64)
        node.wait_durable(node._append_records(batch, BD))

    benchmark.pedantic(append, rounds=_rounds(batch_size), iterations=1, warmup_rounds=2)
    node.close()
    raw_s = raw_putmulti_seconds(tmp_path / "raw", template_records[:batch_size], _rounds(batch_size))
    ours_s = benchmark.stats.stats.mean
    benchmark.extra_info.update({
        "batch_size": batch_size,
        "records_per_s": batch_size / ours_s,
        "raw_putmulti_records_per_s": batch_size / raw_s,
        "ratio_vs_raw": raw_s / ours_s,
        "checksum": hashlib.blake2b(batch.tobytes(), digest_size=8).hexdigest(),
    })


def raw_putmulti_seconds(path, records: np.ndarray, rounds: int) -> float:
    """Baseline: py-lmdb, sync on, one txn per batch, putmulti(append=True) of one key per
    record (the same 304-byte values), in this process. Mean seconds per batch."""
    env = lmdb.open(str(path), map_size=8 << 30, max_dbs=2, sync=True, metasync=True,
                    writemap=False, map_async=False)
    db = env.open_db(b"journal")
    values = [records[i].tobytes() for i in range(records.shape[0])]
    seq, times = 0, []
    for r in range(rounds + 2):
        items = [((seq + i + 1).to_bytes(8, "big"), v) for i, v in enumerate(values)]
        t0 = time.perf_counter()
        with env.begin(write=True) as txn:
            consumed, added = txn.cursor(db).putmulti(items, append=True)
            assert added == len(items)
        if r >= 2:
            times.append(time.perf_counter() - t0)
        seq += len(values)
    env.close()
    return float(np.mean(times))


@pytest.fixture(scope="module")
def journal(tmp_path_factory, template_records):
    """A node with `size(200k, 2M)` settlement records in batches of 4096."""
    path = str(tmp_path_factory.mktemp("journal") / "n")
    node = init_demo(path, 0, BD, txn_retention_count=1 << 10,
                     ledger_config=LedgerConfig(map_size_bytes=32 << 30, checkpoint_every_records=1 << 40))
    batch = template_records.copy()
    for _ in range(size(200_000, 2_000_000) // 4096):
        batch["seq"] = np.arange(node.last_seq + 1, node.last_seq + 4097, dtype=np.uint64)
        node.wait_durable(node._append_records(batch, BD))
    yield node
    node.close()


def test_bulk_read(benchmark, journal):
    n = journal.last_seq
    out = np.empty(n, dtype=RECORD_DTYPE)
    records = benchmark.pedantic(lambda: journal.read(1, n), rounds=size(3, 5), iterations=1, warmup_rounds=1)
    t0 = time.perf_counter()          # baseline: a per-record Python loop over the same values
    with journal.env.begin(buffers=True) as txn:
        count = 0
        for _, value in txn.cursor(journal.dbs[b"journal"]):
            for k in range(0, len(value), RECORD_DTYPE.itemsize):
                out[count] = np.frombuffer(value, RECORD_DTYPE, 1, k)[0]
                count += 1
    loop_s = time.perf_counter() - t0
    assert out.tobytes() == records.tobytes()
    benchmark.extra_info.update({
        "records": n, "records_per_s": n / benchmark.stats.stats.mean,
        "per_record_loop_records_per_s": n / loop_s,
        "checksum": hashlib.blake2b(records["seq"].tobytes(), digest_size=8).hexdigest(),
    })


def test_replay_rate(benchmark, tmp_path):
    """Replay through the same apply: demo genesis + settlements, digests and results checked."""
    path = str(tmp_path / "n")
    node = init_demo(path, size(10_000, 100_000), BD, txn_retention_count=1 << 20,
                     ledger_config=LedgerConfig(map_size_bytes=16 << 30, checkpoint_every_records=1 << 40))
    ph = generated_pan_hashes(CardKeys(DEMO_DATA_KEY), size(10_000, 100_000))
    total = size(200_000, 2_000_000)
    for i in range(0, total, 8192):
        q = medical_settlements(node.engine, ph, min(8192, total - i), seed=1000 + i, first_stan=i + 1)
        node.apply_and_append(q, BD)
    live = {k: v.tobytes() for k, v in node.engine.arrays.items()}
    headers = read_headers(node.env, node.dbs)

    def replay(check_digest, engine=None):
        engine = engine or new_engine(node.meta)
        with node.env.begin(buffers=True) as txn:
            for h in headers:
                replay_batch(engine, batch_records(txn, node.dbs, h, check_digest), int(h["business_date"]))
        return engine

    # the empty engine is built in setup: allocating the 1 M-entry transaction ring is not replay
    engine = benchmark.pedantic(lambda e: replay(False, e), setup=lambda: ((new_engine(node.meta),), {}),
                                rounds=size(1, 3), iterations=1)
    fresh = new_engine(node.meta)
    t0 = time.perf_counter()
    replay(True, fresh)
    checked_s = time.perf_counter() - t0
    assert {k: v.tobytes() for k, v in engine.arrays.items()} == live
    n = node.last_seq
    node.close()
    benchmark.extra_info.update({
        "records": n, "replay_records_per_s": n / benchmark.stats.stats.mean,
        "replay_with_digest_check_records_per_s": n / checked_s,
        "apply_only_records_per_s": apply_rate(node.meta, ph),
        "checksum": hashlib.blake2b(live["cards"], digest_size=8).hexdigest(),
    })


def apply_rate(meta, ph) -> float:
    """The engine's own apply rate on the same kind of batch: replay cannot beat it."""
    from yikatong.engine.demo import demo_engine
    engine, _ = demo_engine(generated_cards=ph.shape[0], business_date=BD, txn_retention_count=1 << 20)
    q = medical_settlements(engine, ph, 8192 * 8, seed=99)
    t0 = time.perf_counter()
    for i in range(0, q.shape[0], 8192):
        engine.apply_batch(q[i:i + 8192], business_date=BD)
    return q.shape[0] / (time.perf_counter() - t0)


@pytest.mark.skipif(not FULL, reason="full size only: a 10 M-record journal")
def test_recovery_10m(benchmark, tmp_path, template_records):
    """Open a node whose journal holds 10 M records, the last checkpoint 1 M records back."""
    path = str(tmp_path / "n")
    node = init_demo(path, 100_000, BD, txn_retention_count=1 << 20,
                     ledger_config=LedgerConfig(map_size_bytes=64 << 30, checkpoint_every_records=1 << 40))
    ph = generated_pan_hashes(CardKeys(DEMO_DATA_KEY), 100_000)
    target = 10_000_000
    i = 0
    while node.last_seq < target:
        if node.last_seq >= target - 1_000_000 and node.recovered_from_seq == 0 and not getattr(node, "_ck", 0):
            node.checkpoint(wait=True)
            node._ck = 1
        q = medical_settlements(node.engine, ph, min(8192, target - node.last_seq), seed=5000 + i, first_stan=i * 8192 + 1)
        node.apply_and_append(q, BD)
        i += 1
    n = node.last_seq
    node.close()

    def recover():
        Node.open(path).close()

    benchmark.pedantic(recover, rounds=1, iterations=1)
    benchmark.extra_info.update({"records": n, "recovery_s": benchmark.stats.stats.mean})
