"""Crash tests: a real child process journals batches and reports each acknowledged one; the
parent SIGKILLs it at seeded random moments (50 kills). After every restart every acknowledged
batch is there, none is there in part, verify passes and the recovered state equals a replay."""
import os
import random
import select
import signal
import subprocess
import sys
import time

from yikatong.ledger.node import Node
from yikatong.ledger.verify import verify

CHILD = os.path.join(os.path.dirname(__file__), "crash_child.py")
KILLS = 50


def run_until_killed(data_dir: str, rng: random.Random) -> tuple[int, int]:
    """Start the child, let it run a random while after it is ready, SIGKILL it.
    Returns (sequence at start, highest acknowledged sequence)."""
    child = subprocess.Popen([sys.executable, CHILD, data_dir], stdout=subprocess.PIPE, text=True, bufsize=1)
    try:
        ready = child.stdout.readline()
        assert ready.startswith("READY "), ready
        start_seq = acked = int(ready.split()[1])
        deadline = time.monotonic() + rng.uniform(0.0, 0.4)
        while time.monotonic() < deadline:
            readable, _, _ = select.select([child.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if readable:
                line = child.stdout.readline()
                if line.startswith("ACK "):
                    acked = int(line.split()[1])
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        for line in child.stdout:                     # acks printed before the kill still count
            if line.startswith("ACK "):
                acked = int(line.split()[1])
        return start_seq, acked
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()


def test_sigkill_loses_nothing_acknowledged(tmp_path):
    rng = random.Random(20261124)
    data_dir = str(tmp_path / "node")
    highest_acked = 0
    for kill in range(KILLS):
        start_seq, acked = run_until_killed(data_dir, rng)
        assert start_seq >= highest_acked, f"kill {kill}: restarted at {start_seq} < acknowledged {highest_acked}"
        highest_acked = max(highest_acked, acked)
        if kill % 10 == 9 or kill == KILLS - 1:
            report = verify(data_dir)                 # contiguous, chained, replay = journal
            assert report["last_seq"] >= highest_acked
    node = Node.open(data_dir)
    try:
        assert node.journal.last_seq >= highest_acked
        recovered = {k: v.copy() for k, v in node.engine.arrays.items()}
        headers = node.journal.headers()
        records = node.journal.read()
        assert int(headers["record_count"].sum()) == records.shape[0] == node.journal.last_seq
    finally:
        node.close()
    # recovered state (checkpoint + tail) equals a replay from genesis
    os.rename(os.path.join(data_dir, "checkpoints"), os.path.join(data_dir, "checkpoints.off"))
    replayed = Node.open(data_dir)
    try:
        for name, array in recovered.items():
            assert replayed.engine.arrays[name].tobytes() == array.tobytes(), name
    finally:
        replayed.close()
    assert highest_acked > 1000                       # the children really did work
