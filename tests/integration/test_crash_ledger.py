"""SIGKILL crash tests: a child process applies and appends batches and reports each durable
one; the parent kills it at seeded random moments and checks, after every restart, that every
acknowledged batch is there whole, verify passes and the recovered state equals a replay."""
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from yikatong.ledger.demo_node import init_demo
from yikatong.ledger.node import LedgerConfig, Node, new_engine, read_headers, replay_batch, batch_records
from yikatong.ledger.verify import verify

sys.path.insert(0, os.path.dirname(__file__))
from crash_child import BD, CARDS, batch_requests, batch_size  # noqa: E402

GENESIS_BATCHES = 3


def run_child_and_kill(data_dir: str, rng: random.Random) -> tuple[int, list[int]]:
    """Start the child, kill it after a random delay; return (batch_seq it opened at, acked)."""
    child = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "crash_child.py"),
                              data_dir], stdout=subprocess.PIPE, text=True)
    opened_line = child.stdout.readline()
    assert opened_line.startswith("OPEN "), opened_line
    acked: list[int] = []

    def read_acks():
        for line in child.stdout:
            acked.append(int(line.split()[1]))

    reader = threading.Thread(target=read_acks)
    reader.start()
    time.sleep(rng.uniform(0.0, 0.25))
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    reader.join()
    return int(opened_line.split()[1]), acked


def replayed_arrays(node: Node) -> dict:
    engine = new_engine(node.meta)
    headers = read_headers(node.env, node.dbs)
    with node.env.begin(buffers=True) as txn:
        for h in headers:
            replay_batch(engine, batch_records(txn, node.dbs, h), int(h["business_date"]))
    return engine.arrays


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_loses_no_acknowledged_batch(tmp_path, seed):
    rng = random.Random(seed)
    data_dir = str(tmp_path / "node")
    init_demo(data_dir, CARDS, BD, txn_retention_count=1 << 12,
              ledger_config=LedgerConfig(map_size_bytes=1 << 30, checkpoint_every_records=3000)).close()
    kills, max_acked = 0, 0
    for _ in range(26):
        opened_at, acked = run_child_and_kill(data_dir, rng)
        kills += 1
        assert opened_at >= max_acked                         # nothing acknowledged went missing
        max_acked = max([max_acked] + acked)
        node = Node.open(data_dir, lock_wait=True)            # waits for the killed writer to go
        try:
            assert node.batch_seq >= max_acked, (node.batch_seq, max_acked)
            headers = read_headers(node.env, node.dbs)
            for h in headers[GENESIS_BATCHES:]:               # every batch whole, as sent
                bseq = int(h["batch_seq"])
                assert int(h["last_seq"] - h["first_seq"]) + 1 == batch_size(bseq)
            for bseq in acked[-3:]:                           # and with the child's content
                h = headers[bseq - 1]
                records = node.read(int(h["first_seq"]), int(h["last_seq"]))
                assert np.array_equal(records["request"]["idem_key"],
                                      batch_requests(node.engine, bseq)["idem_key"])
            replayed = replayed_arrays(node)
            for name, array in node.engine.arrays.items():
                assert array.tobytes() == replayed[name].tobytes(), name
        finally:
            node.close()
        report = verify(data_dir)
        assert report.batches == node.batch_seq
    assert kills == 26 and max_acked > GENESIS_BATCHES + 10
