"""A journal altered before the newest checkpoint: `yikatong serve` starts (only the tail is
checked before serving), its background chain check finds the break, and the server stops with
status 2 (fail-stop); the node then refuses to start again and `yikatong verify` names the break."""
import os
import subprocess
import sys

from tests.ledger_faults import flip_byte_in_file
from yikatong.engine.cardkeys import CardKeys, DEMO_DATA_KEY
from yikatong.engine.workload import generated_pan_hashes, medical_settlements
from yikatong.ledger.journal import Journal
from yikatong.nodes import init_demo_node

BD = 20261124
YIKATONG = [sys.executable, "-m", "yikatong.main"]


def test_background_chain_break_stops_the_server(tmp_path):
    data = str(tmp_path / "node")
    node = init_demo_node(data, 300, checkpoint_every_records=1 << 40, business_date=BD, txn_retention_count=1 << 12)
    q = medical_settlements(node.engine, generated_pan_hashes(CardKeys(DEMO_DATA_KEY), 300), 2000, seed=4)
    for i in range(0, 2000, 500):
        node.apply_and_append(q[i:i + 500], BD)
    node.checkpoint()
    node.close()
    j = Journal(data, readonly=True)
    victim = j.read(700, 700).tobytes()                 # a settlement in batch 4 (310…809), before the checkpoint
    last_seq = j.last_seq
    j.close()
    flip_byte_in_file(os.path.join(data, "journal.lmdb", "data.mdb"), victim, 250)

    proc = subprocess.Popen(YIKATONG + ["serve", "--data", data, "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("listening on ")   # serving: the tail was intact
        code = proc.wait(timeout=120)
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 2, stderr[-2000:]
    assert '"event": "fail_stop"' in stderr and "hash chain is broken before the checkpoint (batch 4 (sequence 310…809)" in stderr
    assert "chain-broken.txt" in os.listdir(data)

    again = subprocess.run(YIKATONG + ["serve", "--data", data, "--port", "0"], capture_output=True, text=True,
                           timeout=120)
    assert again.returncode != 0 and "listening on" not in again.stdout
    assert "will not start on this journal" in again.stderr and "Remedy: run `yikatong verify" in again.stderr
    verify = subprocess.run(YIKATONG + ["verify", "--data", data], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 1 and "BROKEN" in verify.stdout and "records altered" in verify.stdout
    j = Journal(data, readonly=True)
    assert j.last_seq == last_seq                        # nothing was appended
    j.close()
