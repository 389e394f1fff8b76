"""A reply never leaves before its batch is durable (DESIGN.md §5, issue: terminal server item 3).

The writer process is slowed on purpose (YIKATONG_FAULT_COMMIT_DELAY_MS: each commit is held
inside its write transaction). A terminal sends a medical settlement; while the commit is held
the journal (read beside the server, LMDB MVCC) has no record of it and no reply has arrived; the
reply comes only after the delay, and at that moment the journal holds the approval with the
RRN and amount the reply carries."""
import os
import select
import subprocess
import sys
import time
import urllib.request

import pytest

from yikatong.engine.demo import DEMO_TMK_HEX
from yikatong.ledger.journal import Journal
from yikatong.protocols.terminal import Terminal

DELAY_MS = 600


def journal_rrns(data_dir: str) -> dict:
    journal = Journal(data_dir, readonly=True)
    try:
        if not journal.last_seq:
            return {}
        records = journal.read(1, journal.last_seq)
    finally:
        journal.close()
    return {int(r): int(a) for r, a in zip(records["result"]["rrn"], records["result"]["amount_fen"]) if r}


@pytest.fixture
def slow_server(tmp_path):
    data = str(tmp_path / "node")
    env = dict(os.environ, YIKATONG_FAULT_COMMIT_DELAY_MS=str(DELAY_MS))
    proc = subprocess.Popen([sys.executable, "-m", "yikatong.main", "serve", "--data", data, "--demo", "--cards", "100",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    port = None
    for line in proc.stdout:
        if line.startswith("listening on"):
            port = int(line.rsplit(":", 1)[1])
            break
    assert port, "the server did not start"
    yield data, port
    proc.terminate()
    assert proc.wait(timeout=60) == 0


def test_no_reply_before_the_commit(slow_server):
    data, port = slow_server
    t = Terminal("127.0.0.1", port, "T0000001", "H11000000000001", bytes.fromhex(DEMO_TMK_HEX))
    assert t.sign_on().code == "00"                      # no journal write: answered at once
    before = journal_rrns(data)
    # send by hand so the test can watch the socket and the journal while the commit is held
    from yikatong.protocols import _codec, _des
    from yikatong.protocols.terminal import HEADER, TPDU, medical_tlv
    fields = {"tpdu": TPDU, "header": HEADER, "t": "0200", "2": "6214830000000017", "3": "000000",
              "4": "%012d" % 123456, "11": "000777", "12": "101010", "13": "1130", "22": "022", "25": "00",
              "41": "T0000001", "42": "H11000000000001", "49": "156", "60": "81%06d000" % t.batch_no,
              "62": medical_tlv("11", 0, 0, 0, 123456), "64": bytes(8)}
    body = _codec.encode_fields(fields)
    body = body[:-8] + _des.mac_x919(t.mac_key, body[11:-8])
    sent_at = time.monotonic()
    t.sock.sendall(len(body).to_bytes(2, "big") + body)
    # while the commit is held: no reply on the socket, nothing new in the journal
    readable, _, _ = select.select([t.sock], [], [], DELAY_MS / 1000 / 3)
    assert readable == []
    assert journal_rrns(data) == before
    head = t._recv(2)
    reply_at = time.monotonic()
    reply = _codec.decode_fields(t._recv(int.from_bytes(head, "big")))
    assert reply["39"] == "00"
    assert reply_at - sent_at >= DELAY_MS / 1000 * 0.95
    # the moment the reply is here, the approval it reports is committed
    after = journal_rrns(data)
    rrn = int(reply["37"])
    assert rrn not in before and after[rrn] == 123456
    t.close()


@pytest.mark.parametrize("checkpoint_by", ["copy", "replay"])
def test_checkpoints_happen_under_continuous_load(tmp_path, checkpoint_by):
    """A node under pipelined load still checkpoints, at least checkpoint_every_records apart (the
    batcher makes a quiet point when one is due: new batches wait until the in-flight ones are
    acked; one still being written defers the next instead of blocking the loop), and the
    checkpoints taken mid-load equal the replay (verify)."""
    from yikatong.nodes import init_demo_node
    data = str(tmp_path / "node")
    # a small transaction table keeps each checkpoint file small, so writing one takes less time
    # than the next 20,000 records (a checkpoint falls due only once the previous one is written)
    init_demo_node(data, generated_cards=1000, checkpoint_every_records=20_000, txn_retention_count=1 << 14,
                   checkpoint_by=checkpoint_by).close()
    proc = subprocess.Popen([sys.executable, "-m", "yikatong.main", "serve", "--data", data, "--port", "0",
                             "--metrics-port", "-1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    port = metrics_port = None
    for line in proc.stdout:
        if line.startswith("metrics on"):
            metrics_port = int(line.rsplit(":", 1)[1])
        if line.startswith("listening on"):
            port = int(line.rsplit(":", 1)[1])
            break
    assert port and metrics_port
    try:
        load = subprocess.run([sys.executable, "-m", "yikatong.main", "load", "--port", str(port), "--count", "150000",
                               "--cards", "1000", "--connections", "32", "--pipeline", "128", "--json"],
                              capture_output=True, text=True, timeout=300)
        assert load.returncode == 0, load.stderr[-2000:]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            metrics = dict(line.rsplit(" ", 1) for line in r.read().decode().splitlines() if not line.startswith("#"))
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
    checkpoints = sorted(f for f in os.listdir(os.path.join(data, "checkpoints")) if f.endswith(".json"))
    seqs = [int(f[5:25]) for f in checkpoints]
    # every one made the node's way (none the other way, none failed); the last may have been
    # written after the scrape, before the drain's close joined it
    other = "copy" if checkpoint_by == "replay" else "replay"
    made = int(metrics[f'yikatong_checkpoints_total{{how="{checkpoint_by}"}}'])
    assert len(seqs) - 1 <= made <= len(seqs), (made, seqs)
    assert (metrics[f'yikatong_checkpoints_total{{how="{other}"}}'], metrics['yikatong_checkpoints_total{how="failed"}'],
            metrics["yikatong_checkpoint_failing"]) == ("0", "0", "0")
    replayed = int(metrics["yikatong_checkpoint_replayed_records_total"])
    if checkpoint_by == "replay":                      # the replica replayed up to its last checkpoint
        assert replayed >= (seqs[made - 1] if made else 0)
    else:
        assert replayed == 0
    # genesis (1,009 records) + 150,000 requests + the 0500s: 7 due at most, at least 20,000 apart.
    # How many are taken depends on how fast the checkpoint thread (SCHED_IDLE) writes while the
    # load runs: on a machine shared with other work one took 0.35–0.38 s, during which the
    # faster server of the server-lean branch answered some 40,000 messages; with 90,000 the
    # load sometimes ended before the second (seen: [20593]), so the load is longer now. Two
    # mid-load checkpoints is what is required — the second proves checkpointing goes on.
    assert len(seqs) >= 2 and all(b - a >= 20_000 for a, b in zip(seqs, seqs[1:])), seqs
    verify = subprocess.run([sys.executable, "-m", "yikatong.main", "verify", "--data", data],
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
