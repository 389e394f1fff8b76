"""Ledger benchmarks (issue 3 item 8). Every figure is a ratio against a baseline measured in the
same run on the same bytes:

- durable append through the writer process (Journal.submit + wait_durable, one batch at a time
  and pipelined) vs raw py-lmdb putmulti(append=True) of the same records (sync and metasync
  on), rounds interleaved so that both see the same noise; batch sizes 1, 256, 4096;
- bulk read (Journal.read) into a fresh array and into a reused one (its copy on READ_THREADS
  threads, and on one) vs a numpy memcpy of the same bytes into a fresh array, and vs a
  per-record Python loop;
- recovery (Node.open: newest checkpoint + replay of the tail, the tail's hash chain checked;
  the chain before the checkpoint is checked in the background after open, timed too) on a journal of 10 M records (full size) whose checkpoint is 1 M records back, and replay
  from genesis, with the engine's own apply of the same requests and one core's BLAKE2b of the
  same bytes as the breakdown;
- per-batch commit latency (max, p99.9, p99, median) while appending 4,096-settlement batches
  to that aged journal, checkpoints happening.

    YIKATONG_BENCH_SIZE=full .venv/bin/python -m pytest -q bench/bench_ledger.py --benchmark-only \\
        -p no:cacheprovider --benchmark-columns=min,median,mean,ops --benchmark-json=/tmp/bl.json
Figures: bench/README-ledger.md (each benchmark's extra_info holds them).
"""
import hashlib
import os
import resource
import shutil
import time

import lmdb
import numpy as np
import pytest

from bench.conftest import size
from yikatong.engine import Engine
from yikatong.engine.cardkeys import CardKeys, DEMO_DATA_KEY
from yikatong.engine.workload import generated_pan_hashes, medical_settlements
from yikatong.ledger import journal as journal_module
from yikatong.ledger.journal import Journal, batch_hash
from yikatong.ledger.node import Node
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
    return {1: size(100, 1000), 256: size(30, 300), 4096: size(10, 100)}[batch_size]


def writer_journal(path) -> Journal:
    journal = Journal(str(path), create=True, map_size_bytes=16 << 30)
    journal.start_writer()
    return journal


class RawPutmulti:
    """Baseline: py-lmdb in this process, sync and metasync on (the journal's flags), one txn per
    batch, putmulti(append=True) of one key per record (the same 304-byte values)."""

    def __init__(self, path, records: np.ndarray):
        self.env = lmdb.open(str(path), map_size=16 << 30, max_dbs=2, sync=True, metasync=True,
                             writemap=False, map_async=False)
        self.db = self.env.open_db(b"journal")
        self.values = [records[i].tobytes() for i in range(records.shape[0])]
        self.seq = 0

    def batch(self):
        items = [((self.seq + i + 1).to_bytes(8, "big"), v) for i, v in enumerate(self.values)]
        self.seq += len(items)
        with self.env.begin(write=True) as txn:
            consumed, added = txn.cursor(self.db).putmulti(items, append=True)
            assert added == len(items)


@pytest.mark.parametrize("mode", ["serial", "pipelined"])
@pytest.mark.parametrize("batch_size", [1, 256, 4096])
def test_durable_append(benchmark, tmp_path, template_records, batch_size, mode):
    """One batch per round through the writer process: records + header in one txn, fsync'd.
    serial: submit, then wait until it is durable (Journal.append). pipelined: up to 4 batches
    in flight (how the node runs: it applies batch N+1 while N commits), each round waiting for
    the batch submitted 3 rounds earlier. Each round of ours is followed by one raw round."""
    journal = writer_journal(tmp_path / "n")
    raw = RawPutmulti(tmp_path / "raw", template_records[:batch_size])
    batch = template_records[:batch_size].copy()
    in_flight: list = []
    raw_times: list = []
    depth = 1 if mode == "serial" else 4

    def append():
        batch["seq"] = np.arange(journal.last_seq + 1, journal.last_seq + 1 + batch_size, dtype=np.uint64)
        in_flight.append(journal.submit(batch, BD))
        if len(in_flight) >= depth:
            journal.wait_durable(in_flight.pop(0))

    def raw_round():                  # pytest-benchmark's untimed setup: interleaves the baseline
        t0 = time.perf_counter()
        raw.batch()
        raw_times.append(time.perf_counter() - t0)

    times: list = []
    rounds = _rounds(batch_size)
    benchmark.pedantic(timed(append, times), setup=raw_round, rounds=rounds, iterations=1, warmup_rounds=2)
    times, raw_times = times[-rounds:], raw_times[-rounds:]
    t0 = time.perf_counter()
    journal.wait_durable(journal.last_batch_no)        # the in-flight tail counts too
    times[-1] += time.perf_counter() - t0
    journal.close()
    raw.env.close()
    ours_s, raw_s = float(np.mean(times)), float(np.mean(raw_times))
    benchmark.extra_info.update({
        "batch_size": batch_size, "mode": mode, "rounds": rounds,
        "records_per_s": batch_size / ours_s, "raw_putmulti_records_per_s": batch_size / raw_s,
        "ratio_vs_raw": raw_s / ours_s, "ratio_vs_raw_median": float(np.median(raw_times) / np.median(times)),
        "checksum": hashlib.blake2b(batch.tobytes(), digest_size=8).hexdigest(),
    })


def test_bulk_read(benchmark, tmp_path, template_records):
    journal = writer_journal(tmp_path / "n")
    batch = template_records.copy()
    for _ in range(size(200_000, 2_000_000) // 4096):
        batch["seq"] = np.arange(journal.last_seq + 1, journal.last_seq + 4097, dtype=np.uint64)
        journal.submit(batch, BD)
    journal.wait_durable(journal.last_batch_no)
    n = journal.last_seq
    rounds = size(3, 7)
    times: list = []
    records = benchmark.pedantic(timed(lambda: journal.read(1, n), times), rounds=rounds, iterations=1,
                                 warmup_rounds=1)
    reuse = np.empty(n, dtype=RECORD_DTYPE)
    reuse_times, memcpy_times, one_thread_times = [], [], []
    src = records.view(np.uint8)
    threads = journal_module.READ_THREADS
    try:
        for _ in range(rounds):
            timed(lambda: journal.read(1, n, out=reuse), reuse_times)()
            timed(lambda: np.copyto(np.empty_like(src), src), memcpy_times)()   # baseline: one memcpy, fresh pages
            journal_module.READ_THREADS = 1            # the same read with its copy on one thread
            timed(lambda: journal.read(1, n, out=reuse), one_thread_times)()
            journal_module.READ_THREADS = threads
    finally:
        journal_module.READ_THREADS = threads
    assert reuse.tobytes() == records.tobytes()
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
        "records": n,
        "records_per_s_min": n / min(times), "records_per_s_median": n / float(np.median(times)),
        "reused_out_records_per_s_min": n / min(reuse_times),
        "reused_out_records_per_s_median": n / float(np.median(reuse_times)),
        "read_threads": threads,
        "reused_out_one_thread_records_per_s_min": n / min(one_thread_times),
        "reused_out_one_thread_records_per_s_median": n / float(np.median(one_thread_times)),
        "memcpy_fresh_records_per_s_min": n / min(memcpy_times),
        "memcpy_fresh_records_per_s_median": n / float(np.median(memcpy_times)),
        "ratio_vs_memcpy_median": float(np.median(memcpy_times) / np.median(times)),
        "per_record_loop_records_per_s": n / loop_s,
        "checksum": hashlib.blake2b(records["seq"].tobytes(), digest_size=8).hexdigest(),
    })


# ---- recovery and an aged ledger ---------------------------------------------------------------
AGED_CARDS = 100_000
AGED_BATCH = 4096


@pytest.fixture(scope="module")
def aged_node(tmp_path_factory):
    """A demo node (100,000 cards) whose journal holds size(200 k, 10 M) records of settlements
    in batches of 4,096 (applied by the engine, fixed seeds), one checkpoint size(50 k, 1 M)
    records before the end. Returns (data_dir, records, checkpoint_seq, build_s)."""
    from yikatong.nodes import init_demo_node
    path = str(tmp_path_factory.mktemp("aged") / "node")
    total, tail = size(200_000, 10_000_000), size(50_000, 1_000_000)
    t0 = time.perf_counter()
    node = init_demo_node(path, AGED_CARDS, checkpoint_every_records=1 << 60, business_date=BD)
    pan_hashes = generated_pan_hashes(CardKeys(DEMO_DATA_KEY), AGED_CARDS)
    chunk, previous = 1 << 18, None
    while node.journal.last_seq < total:
        seq = node.journal.last_seq
        q = medical_settlements(node.engine, pan_hashes, chunk, seed=seq, first_stan=seq)
        for i in range(0, chunk, AGED_BATCH):
            if node.checkpoint_seq == 0 and node.journal.last_seq >= total - tail:
                node.checkpoint()
            ticket, _ = node.submit(q[i:i + AGED_BATCH])
            if previous is not None:
                node.wait_durable(previous)        # one batch in flight: apply N+1 while N commits
            previous = ticket
            if node.journal.last_seq >= total:
                break
    node.wait_durable(previous)
    checkpoint_seq, records = node.checkpoint_seq, node.journal.last_seq
    node.close()
    return path, records, checkpoint_seq, time.perf_counter() - t0


def state_checksum(engine: Engine) -> str:
    h = hashlib.blake2b(digest_size=8)
    for name in ("cards", "meta", "idem_index"):
        h.update(engine.arrays[name].tobytes())
    return h.hexdigest()


def breakdown(path: str, first: int) -> dict:
    """The parts of a recovery measured alone, on this run: one core's chain hash (the ledger's
    own function, journal.chain: BLAKE2b tree mode) of every journal byte, and the engine's apply_batch of the requests from `first` on (from the checkpoint's
    state, or a fresh engine at genesis)."""
    journal = Journal(path, readonly=True)
    try:
        t0 = time.perf_counter()
        with journal.env.begin(buffers=True) as txn:
            for _, value in txn.cursor(db=journal.journal_db):
                batch_hash(bytes(32), value, journal.chain)
        hash_s = time.perf_counter() - t0
        headers = journal.headers()
        import msgspec
        from yikatong.ledger.node import NodeSettings
        settings = msgspec.json.decode(open(os.path.join(path, "node.json"), "rb").read(), type=NodeSettings)
        if first > 1:
            engine, _, batch_no, _ = Node._load_checkpoint(path, settings, journal, headers)
        else:
            engine, batch_no = Engine(settings.config, card_capacity=settings.card_capacity,
                                      txn_retention_count=settings.txn_retention_count), 0
        records = journal.read(first)
        apply_s, at = 0.0, 0
        for header in headers[batch_no:]:
            n = int(header["record_count"])
            requests = np.ascontiguousarray(records["request"][at:at + n])
            t0 = time.perf_counter()
            engine.apply_batch(requests, business_date=int(header["business_date"]))
            apply_s += time.perf_counter() - t0
            at += n
        return {"blake2b_one_core_records_per_s": journal.last_seq / hash_s,
                "engine_apply_records_per_s": at / apply_s, "engine_apply_s": apply_s,
                "blake2b_one_core_s": hash_s}
    finally:
        journal.close()


def cpu_seconds() -> float:
    """This process's CPU time, every thread: beside the wall time it shows how much of the two
    shared cores a run really had (the chain check and the replay run on both)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed_opens(benchmark, path: str, rounds: int, expect: tuple | None = None) -> tuple[list, list, list]:
    """`rounds` timed Node.open + close of the node at `path`: (wall s, CPU s, state checksum) per
    round. `expect` = (checkpoint_seq, last_seq) the opened node must report."""
    times: list = []
    cpu: list = []
    checksums: list = []

    def recover():
        c0 = cpu_seconds()
        node = Node.open(path)
        cpu.append(cpu_seconds() - c0)
        checksums.append(state_checksum(node.engine))
        if expect is not None:
            assert (node.checkpoint_seq, node.journal.last_seq) == expect
        node.close()

    benchmark.pedantic(timed(recover, times), rounds=rounds, iterations=1)
    return times, cpu, checksums


def test_recovery_from_checkpoint(benchmark, aged_node):
    """Node.open on the aged journal: checkpoint load + the tail's chain check + replay of the
    tail. Then, once, the time until the background check of the chain before the checkpoint
    has finished too (`Node.wait_chain_check`): the node serves during it."""
    path, records, checkpoint_seq, build_s = aged_node
    times, cpu, checksums = timed_opens(benchmark, path, size(2, 3), expect=(checkpoint_seq, records))
    assert len(set(checksums)) == 1
    t0 = time.perf_counter()
    node = Node.open(path)
    open_s = time.perf_counter() - t0
    assert node.wait_chain_check() is None
    chain_checked_s = time.perf_counter() - t0
    node.close()
    best = min(times)
    benchmark.extra_info.update({
        "records": records, "tail_records": records - checkpoint_seq, "open_s_min": best,
        "open_cpu_s_min": min(cpu),
        "open_s_median": float(np.median(times)), "records_per_s": records / best,
        "tail_records_per_s": (records - checkpoint_seq) / best, "build_s": build_s,
        "open_s_then": open_s, "chain_fully_checked_s": chain_checked_s,
        **breakdown(path, checkpoint_seq + 1), "checksum": checksums[0],
    })


def test_replay_from_genesis(benchmark, aged_node):
    """Node.open with no checkpoint: every record replayed through the engine."""
    path, records, _, _ = aged_node
    folder = os.path.join(path, "checkpoints")
    os.rename(folder, folder + ".off")
    try:
        times, cpu, checksums = timed_opens(benchmark, path, 1)
    finally:
        shutil.rmtree(folder, ignore_errors=True)      # open() writes none, but be sure
        os.rename(folder + ".off", folder)
    benchmark.extra_info.update({
        "records": records, "open_s": times[0], "open_cpu_s": cpu[0], "records_per_s": records / times[0],
        **breakdown(path, 1), "checksum": checksums[0],
    })


def test_commit_latency_aged(benchmark, aged_node):
    """Per-batch latency while appending 4,096-settlement batches to the aged journal, a
    checkpoint every size(50 k, 1 M) records (background thread): commit = submit → durable;
    reply = apply + submit → durable (serial, what one client sees). Runs last: it appends."""
    path, records, _, _ = aged_node
    node = Node.open(path)
    node.settings.checkpoint_every_records = size(50_000, 1_000_000)
    pan_hashes = generated_pan_hashes(CardKeys(DEMO_DATA_KEY), AGED_CARDS)
    batches = size(40, 600)
    q = medical_settlements(node.engine, pan_hashes, batches * AGED_BATCH, seed=records, first_stan=records)
    commit_s, reply_s = [], []
    checkpoints_before = len(Node._checkpoints(path))

    def run():
        for i in range(batches):
            t0 = time.perf_counter()
            ticket, _ = node.submit(q[i * AGED_BATCH:(i + 1) * AGED_BATCH])
            t1 = time.perf_counter()
            node.wait_durable(ticket)
            t2 = time.perf_counter()
            commit_s.append(t2 - t1)
            reply_s.append(t2 - t0)

    benchmark.pedantic(run, rounds=1, iterations=1)
    last_seq = node.journal.last_seq
    node.close()
    checkpoints = len(Node._checkpoints(path)) - checkpoints_before

    def ms(values, p):
        return float(np.percentile(np.asarray(values) * 1e3, p))
    benchmark.extra_info.update({
        "journal_records_at_start": records, "records_appended": last_seq - records,
        "checkpoints_taken": checkpoints,
        "commit_ms_max": max(commit_s) * 1e3, "commit_ms_p99_9": ms(commit_s, 99.9),
        "commit_ms_p99": ms(commit_s, 99), "commit_ms_median": ms(commit_s, 50),
        "reply_ms_max": max(reply_s) * 1e3, "reply_ms_p99_9": ms(reply_s, 99.9),
        "reply_ms_p99": ms(reply_s, 99), "reply_ms_median": ms(reply_s, 50),
        "checksum": hashlib.blake2b(q["idem_key"].tobytes(), digest_size=8).hexdigest(),
    })
