"""Ledger benchmarks (issue 3): durable append through the writer process vs raw py-lmdb
putmulti of the same record bytes (sync on) in the same run, batch sizes 1, 256, 4096; bulk read
into numpy vs a per-record loop; replay rate vs the engine's own apply rate.

    YIKATONG_BENCH_SIZE=full .venv/bin/python -m pytest -q bench/bench_ledger.py --benchmark-only \\
        -p no:cacheprovider --benchmark-columns=min,median,mean,ops
Figures: bench/README-ledger.md.
"""
import hashlib
import time

import lmdb
import numpy as np
import pytest

from bench.conftest import size
from yikatong.engine.cardkeys import CardKeys, DEMO_DATA_KEY
from yikatong.engine.workload import generated_pan_hashes, medical_settlements
from yikatong.ledger.journal import Journal
from yikatong.ledger.records import RECORD_DTYPE, records_from_batch

BD = 20261124
CARDS = 1000


@pytest.fixture(scope="module")
def template_records():
    """4096 records of real settlements (fixed seed)."""
    from yikatong.engine.demo import demo_engine
    engine, _ = demo_engine(generated_cards=CARDS, business_date=BD, txn_retention_count=1 << 16)
    q = medical_settlements(engine, generated_pan_hashes(CardKeys(DEMO_DATA_KEY), CARDS), 4096, seed=7)
    return records_from_batch(q, engine.apply_batch(q, business_date=BD), 1, BD)


def timed(fn, times: list):
    """fn, timing each call into `times`: the figures exist also under --benchmark-disable
    (make test runs each bench once), where pytest-benchmark keeps no stats."""
    def run():
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        return out
    return run


def _rounds(batch_size: int) -> int:
    return {1: size(200, 2000), 256: size(50, 400), 4096: size(10, 100)}[batch_size]


def writer_journal(path) -> Journal:
    journal = Journal(str(path), create=True, map_size_bytes=16 << 30)
    journal.start_writer()
    return journal


@pytest.mark.parametrize("batch_size", [1, 256, 4096])
def test_durable_append(benchmark, tmp_path, template_records, batch_size):
    """One batch per round through the writer process: records + header in one txn, fsync'd."""
    journal = writer_journal(tmp_path / "n")
    batch = template_records[:batch_size].copy()

    def append():
        batch["seq"] = np.arange(journal.last_seq + 1, journal.last_seq + 1 + batch_size, dtype=np.uint64)
        journal.wait_durable(journal.submit(batch, BD))

    times: list = []
    benchmark.pedantic(timed(append, times), rounds=_rounds(batch_size), iterations=1, warmup_rounds=2)
    journal.close()
    raw_s = raw_putmulti_seconds(tmp_path / "raw", template_records[:batch_size], _rounds(batch_size))
    ours_s = float(np.mean(times[-_rounds(batch_size):]))
    benchmark.extra_info.update({
        "batch_size": batch_size, "records_per_s": batch_size / ours_s,
        "raw_putmulti_records_per_s": batch_size / raw_s, "ratio_vs_raw": raw_s / ours_s,
        "checksum": hashlib.blake2b(batch.tobytes(), digest_size=8).hexdigest(),
    })


def raw_putmulti_seconds(path, records: np.ndarray, rounds: int) -> float:
    """Baseline: py-lmdb in this process, sync on, one txn per batch, putmulti(append=True) of
    one key per record (the same 304-byte values). Mean seconds per batch."""
    env = lmdb.open(str(path), map_size=16 << 30, max_dbs=2, sync=True, metasync=True,
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


def test_bulk_read(benchmark, tmp_path, template_records):
    journal = writer_journal(tmp_path / "n")
    batch = template_records.copy()
    for _ in range(size(200_000, 2_000_000) // 4096):
        batch["seq"] = np.arange(journal.last_seq + 1, journal.last_seq + 4097, dtype=np.uint64)
        journal.submit(batch, BD)
    journal.wait_durable(journal.last_batch_no)
    n = journal.last_seq
    times: list = []
    records = benchmark.pedantic(timed(lambda: journal.read(1, n), times), rounds=size(3, 5), iterations=1,
                                 warmup_rounds=1)
    out = np.empty(n, dtype=RECORD_DTYPE)
    t0 = time.perf_counter()          # baseline: a per-record Python loop over the same values
    count = 0
    with journal.env.begin(buffers=True) as txn:
        for _, value in txn.cursor(db=journal.journal_db):
            for k in range(0, len(value), RECORD_DTYPE.itemsize):
                out[count] = np.frombuffer(value, RECORD_DTYPE, 1, k)[0]
                count += 1
    loop_s = time.perf_counter() - t0
    journal.close()
    assert out.tobytes() == records.tobytes()
    benchmark.extra_info.update({
        "records": n, "records_per_s": n / float(np.mean(times)),
        "per_record_loop_records_per_s": n / loop_s,
        "checksum": hashlib.blake2b(records["seq"].tobytes(), digest_size=8).hexdigest(),
    })
