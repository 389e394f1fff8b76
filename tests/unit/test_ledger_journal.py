"""The journal on real LMDB in temp dirs: append/read, recovery, checkpoints, verify, and every
operational error with its remedy; corruption of records, headers and checkpoints is detected."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.ledger_faults import flip_byte_in_file
from yikatong.engine import Cmd, rc_str
from yikatong.engine.builders import medical, request
from yikatong.engine.cardkeys import CardKeys, DEMO_DATA_KEY
from yikatong.engine.workload import generated_pan_hashes, medical_settlements
from yikatong.ledger.journal import CorruptLedgerError, Journal, LedgerError
from yikatong.ledger.node import Node
from yikatong.ledger.records import RECORD_DTYPE
from yikatong.ledger.verify import VerifyError, verify
from yikatong.nodes import init_demo_node

BD = 20261124
KEYS = CardKeys(DEMO_DATA_KEY)


@pytest.fixture
def node_dir(tmp_path):
    """A demo node with 300 generated cards and 12 batches of settlements, checkpoint every 2,000."""
    path = str(tmp_path / "node")
    node = init_demo_node(path, 300, checkpoint_every_records=2000, business_date=BD, txn_retention_count=1 << 14)
    requests = medical_settlements(node.engine, generated_pan_hashes(KEYS, 300), 6000, seed=5)
    for i in range(0, 6000, 500):
        node.apply_and_append(requests[i:i + 500], BD if i < 3000 else BD + 1)
    node.close()
    return path


def test_read_returns_exact_ranges(node_dir):
    j = Journal(node_dir)
    try:
        everything = j.read()
        assert everything.dtype == RECORD_DTYPE
        assert (everything["seq"] == np.arange(1, j.last_seq + 1)).all()
        part = j.read(400, 1234)
        assert (part["seq"] == np.arange(400, 1235)).all()
        assert j.read(j.last_seq + 1).shape == (0,)
        headers = j.headers()
        assert headers.shape[0] == 2 + 1 + 12               # named, family, generated, 12 batches
        assert (headers["batch_no"] == np.arange(1, 16)).all()
        assert j.headers(4, 9).tobytes() == headers[3:9].tobytes()      # a range: batches 4..9
        assert j.headers(13).tobytes() == headers[12:].tobytes()
        assert j.headers(last_batch_no=2).tobytes() == headers[:2].tobytes()
        assert j.headers(16).shape == (0,) and j.headers(9, 8).shape == (0,)
    finally:
        j.close()


def test_recovery_equals_the_live_engine_and_replay_from_genesis(node_dir, tmp_path):
    live = Node.open(node_dir)
    arrays = {k: v.copy() for k, v in live.engine.arrays.items()}
    assert live.checkpoint_seq > 0                         # recovered from a checkpoint + tail
    live.close()
    genesis = str(tmp_path / "copy")
    shutil.copytree(node_dir, genesis)
    shutil.rmtree(os.path.join(genesis, "checkpoints"))   # no checkpoint: replay from genesis
    os.remove(os.path.join(genesis, "node.lock"))
    replayed = Node.open(genesis)
    try:
        for name, array in arrays.items():
            assert replayed.engine.arrays[name].tobytes() == array.tobytes(), name
    finally:
        replayed.close()


def test_idempotency_survives_restart(node_dir):
    node = Node.open(node_dir)
    q = medical(node.engine, KEYS, "6214830000000017", "T0000001", 5000000, 300000, 50000, 100000, 4550000, stan=99)
    first = node.apply_and_append(q, BD + 1)[0]
    rev = request(node.engine, KEYS, Cmd.REVERSAL, pan="6214830000000025", terminal="T0000003", stan=321)
    assert rc_str(node.apply_and_append(rev, BD + 1)[0]["code"]) == "00"      # tombstone
    node.close()
    node = Node.open(node_dir)
    try:
        again = node.apply_and_append(q, BD + 1)[0]
        assert (rc_str(again["code"]), again["rrn"], again["fin_leg_fen"]) == ("00", first["rrn"], 938000)
        other = q.copy()
        other["content_hash"] ^= 1
        assert rc_str(node.apply_and_append(other, BD + 1)[0]["code"]) == "94"
        late = medical(node.engine, KEYS, "6214830000000025", "T0000003", 5000000, 300000, 50000, 100000, 4550000, stan=321)
        assert rc_str(node.apply_and_append(late, BD + 1)[0]["code"]) == "25"
        assert node.engine.balances(node.engine.slot_of(KEYS.pan_hash("6214830000000017"))) == (0, 1062000)
    finally:
        node.close()
    assert verify(node_dir)["records"] > 6000


def test_verify_ok_counts(node_dir):
    report = verify(node_dir)
    assert report == {"batches": 15, "records": 6000 + 100309 - 100000, "checkpoints": 3,
                      "business_dates": 2, "last_seq": 6309, "cutovers": 0, "capacity_changes": 0}


def corrupt_copy(node_dir, tmp_path, name="flip") -> str:
    copy = str(tmp_path / name)
    shutil.copytree(node_dir, copy)
    os.remove(os.path.join(copy, "node.lock"))
    return copy


def with_tail(node_dir) -> str:
    """node_dir plus two batches of 500 after its newest checkpoint (batches 16 and 17, sequences
    6310…7309): a tail that recovery replays."""
    node = Node.open(node_dir)
    q = medical_settlements(node.engine, generated_pan_hashes(KEYS, 300), 1000, seed=6)
    node.apply_and_append(q[:500], BD + 1)
    node.apply_and_append(q[500:], BD + 1)
    assert (node.checkpoint_seq, node.journal.last_seq) == (6309, 7309)
    node.close()
    return node_dir


def run_verify(data_dir: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "yikatong.main", "verify", "--data", data_dir],
                          capture_output=True, text=True)


def test_flipped_record_byte_in_the_tail_is_detected_at_open(node_dir, tmp_path):
    copy = corrupt_copy(with_tail(node_dir), tmp_path)
    j = Journal(copy)
    victim = j.read(6400, 6400).tobytes()
    j.close()
    flip_byte_in_file(os.path.join(copy, "journal.lmdb", "data.mdb"), victim, 200)
    with pytest.raises(VerifyError, match="records altered"):
        verify(copy)
    with pytest.raises(CorruptLedgerError, match=r"batch 16 \(sequence 6310…6809\): records hash"):
        Node.open(copy)


def test_flipped_record_byte_before_the_checkpoint_stops_the_node(node_dir, tmp_path):
    """Before the newest checkpoint the chain is checked in the background once the node is
    serving: the break stops the node (nothing more accepted or acknowledged, no checkpoint),
    it is written down so that the node does not start again, and `yikatong verify` names it."""
    copy = corrupt_copy(node_dir, tmp_path)
    j = Journal(copy)
    victim = j.read(100, 100).tobytes()
    j.close()
    flip_byte_in_file(os.path.join(copy, "journal.lmdb", "data.mdb"), victim, 200)
    node = Node.open(copy)                     # the checkpoint (batch 15) and its empty tail are intact
    try:
        assert node.checkpoint_seq == 6309
        error = node.wait_chain_check()
        assert isinstance(error, CorruptLedgerError)
        assert str(error).startswith("batch 3 (sequence 10…309): records hash")
        q = medical_settlements(node.engine, generated_pan_hashes(KEYS, 300), 10, seed=8)
        with pytest.raises(LedgerError, match=r"hash chain is broken before the checkpoint \(batch 3 \(sequence"):
            node.apply_and_append(q, BD + 1)
        with pytest.raises(LedgerError, match="hash chain is broken before the checkpoint"):
            node.submit_cutover()
        with pytest.raises(LedgerError, match="hash chain is broken before the checkpoint .*no checkpoint is taken"):
            node.checkpoint()
    finally:
        node.close()
    j = Journal(copy, readonly=True)
    assert j.last_seq == 6309                  # nothing was appended after the break was found
    j.close()
    assert len(Node._checkpoints(copy)) == 3
    with pytest.raises(CorruptLedgerError, match=r"hash chain broken; the node stopped and will not start .*"
                                                 r"batch 3 \(sequence 10…309\).* Remedy: run `yikatong verify"):
        Node.open(copy)
    out = run_verify(copy)
    assert out.returncode == 1 and "BROKEN" in out.stdout and "records altered" in out.stdout, out.stdout + out.stderr


def test_a_break_found_after_a_commit_leaves_that_batch_unacknowledged(node_dir):
    """The fail-stop of a background break: a batch the writer committed is still never
    acknowledged once the journal is stopped (its reply must not leave)."""
    node = Node.open(node_dir)
    try:
        q = medical_settlements(node.engine, generated_pan_hashes(KEYS, 300), 10, seed=8)
        assert node.wait_chain_check() is None
        ticket, _ = node.submit(q, BD + 1)
        node._stop_on_chain_break(CorruptLedgerError("batch 3: (test)"))
        with pytest.raises(LedgerError, match=r"the journal stopped \(the journal's hash chain is broken before the "
                                              r"checkpoint \(batch 3: \(test\)\)\); nothing more is acknowledged"):
            node.wait_durable(ticket)
    finally:
        node.close()
    assert os.path.exists(os.path.join(node_dir, "chain-broken.txt"))


def test_flipped_header_byte_is_detected(node_dir, tmp_path):
    with_tail(node_dir)
    j = Journal(node_dir)
    headers = j.headers()
    j.close()
    tail = corrupt_copy(node_dir, tmp_path, "tail")
    flip_byte_in_file(os.path.join(tail, "journal.lmdb", "data.mdb"), headers[16].tobytes(), 60)   # batch 17's prev_hash
    with pytest.raises(VerifyError, match="hash chain broken"):
        verify(tail)
    with pytest.raises(CorruptLedgerError, match="batch 17: previous hash"):
        Node.open(tail)
    prefix = corrupt_copy(node_dir, tmp_path, "prefix")
    flip_byte_in_file(os.path.join(prefix, "journal.lmdb", "data.mdb"), headers[5].tobytes(), 60)   # batch 6's
    with pytest.raises(VerifyError, match="hash chain broken"):
        verify(prefix)
    node = Node.open(prefix)                   # before the checkpoint: found by the background check
    try:
        assert str(node.wait_chain_check()).startswith("batch 6: previous hash")
        assert node.failed.startswith("the journal's hash chain is broken before the checkpoint (batch 6: previous")
    finally:
        node.close()


def test_checkpoints_hashed_with_blake2b_before_sha256_still_recover(node_dir, tmp_path):
    """A checkpoint's .json written before the switch names file_blake2b: it is checked with it."""
    from yikatong.ledger.node import file_blake2b
    live = Node.open(node_dir)
    arrays = {k: v.tobytes() for k, v in live.engine.arrays.items()}
    live.close()
    meta_path = Node._checkpoints(node_dir)[-1]
    meta = json.load(open(meta_path))
    assert sorted(meta) == ["batch_no", "chain_hash", "file", "file_sha256", "seq"]
    npz = os.path.join(os.path.dirname(meta_path), meta["file"])
    del meta["file_sha256"]
    meta["file_blake2b"] = file_blake2b(npz)
    open(meta_path, "w").write(json.dumps(meta))
    node = Node.open(node_dir)
    try:
        assert node.checkpoint_seq == 6309
        assert {k: v.tobytes() for k, v in node.engine.arrays.items()} == arrays
    finally:
        node.close()
    meta["file_blake2b"] = "00" * 32
    open(meta_path, "w").write(json.dumps(meta))
    with pytest.raises(CorruptLedgerError, match=r"content hash [0-9a-f]{16}…, expected 0000000000000000… "
                                                 r"\(torn or altered\)"):
        Node.open(node_dir)
    with pytest.raises(VerifyError, match="a torn or altered file"):
        verify(node_dir)


def test_checkpoint_whose_ring_holds_a_key_twice_is_refused(node_dir, tmp_path):
    """The transaction indexes are rebuilt from a checkpoint's ring; a ring holding one
    idempotency key on two live entries (a file altered and its .json hash forged to match) is
    not one this engine wrote: Node.open refuses it with the remedy, verify names it."""
    from yikatong.ledger.node import file_digest, load_npz, save_npz
    copy = corrupt_copy(node_dir, tmp_path)
    meta_path = Node._checkpoints(copy)[-1]
    meta = json.load(open(meta_path))
    npz = os.path.join(os.path.dirname(meta_path), meta["file"])
    arrays = load_npz(npz)
    assert "idem_index" not in arrays and "rev_index" not in arrays      # derived: not in the file
    ring, last = arrays["txns"], int(arrays["meta"][0])
    mask = ring.shape[0] - 1
    assert ring[last & mask]["idem_key"] != 0 and ring[(last - 1) & mask]["idem_key"] != 0
    ring[last & mask]["idem_key"] = ring[(last - 1) & mask]["idem_key"]
    with open(npz, "wb") as f:
        save_npz(f, arrays)
    meta["file_sha256"] = file_digest(npz, "sha256")
    open(meta_path, "w").write(json.dumps(meta))
    with pytest.raises(CorruptLedgerError, match=r"ckpt-0+6309\.npz: the transaction ring holds 1 idempotency key\(s\) "
                                                 r"on two live entries.*Remedy: move that checkpoint"):
        Node.open(copy)
    with pytest.raises(VerifyError, match=r"broken at sequence 6309: checkpoint's ring: expected a ring this engine wrote"):
        verify(copy)


def test_checkpoint_that_disagrees_with_the_chain_is_refused(node_dir, tmp_path):
    copy = corrupt_copy(node_dir, tmp_path)
    meta_path = Node._checkpoints(copy)[-1]
    meta = json.load(open(meta_path))
    meta["chain_hash"] = bytes(32).hex()
    open(meta_path, "w").write(json.dumps(meta))
    with pytest.raises(CorruptLedgerError, match=r"checkpoint ckpt-0+6309.npz is at batch 15 whose journal hash "
                                                 r"does not match: it does not belong to this journal"):
        Node.open(copy)


def test_torn_checkpoint_is_detected_never_used(node_dir, tmp_path):
    copy = str(tmp_path / "torn")
    shutil.copytree(node_dir, copy)
    os.remove(os.path.join(copy, "node.lock"))
    newest = sorted(f for f in os.listdir(os.path.join(copy, "checkpoints")) if f.endswith(".npz"))[-1]
    path = os.path.join(copy, "checkpoints", newest)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CorruptLedgerError, match=r"torn or altered\)\. Remedy: move it"):
        Node.open(copy)
    with pytest.raises(VerifyError, match="checkpoint"):
        verify(copy)


def test_operational_errors_say_what_to_do(node_dir, tmp_path):
    with pytest.raises(LedgerError, match="does not exist: give the node's data directory"):
        Node.open(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LedgerError, match="holds no node .* refusing to start an empty node"):
        Node.open(str(empty))
    assert os.listdir(empty) == []                      # nothing created in the wrong place
    node = Node.open(node_dir)
    try:
        with pytest.raises(LedgerError, match="in use by another running node"):
            Node.open(node_dir)
    finally:
        node.close()
    # a newer layout version refuses to start
    j = Journal(node_dir)
    with j.env.begin(write=True) as txn:
        txn.put(b"layout_version", (99).to_bytes(4, "little"), db=j.meta_db)
    j.close()
    with pytest.raises(LedgerError, match="record layout version 99; this build reads up to version 1: upgrade"):
        Node.open(node_dir)


def test_map_full_is_clear_and_loses_nothing(tmp_path):
    path = str(tmp_path / "small")
    from yikatong.ledger.node import NodeSettings
    from yikatong.engine.demo import demo_config, genesis_batches
    settings = NodeSettings(config=demo_config(), card_capacity=400, map_size_bytes=1 << 20, txn_retention_count=1 << 12)
    node = Node.init(path, settings, genesis_batches(KEYS, 300), BD)
    requests = medical_settlements(node.engine, generated_pan_hashes(KEYS, 300), 20000, seed=9)
    acked = node.journal.last_seq
    with pytest.raises(LedgerError, match="map_size is 1048576 bytes. .* Restart the node with a larger map_size"):
        for i in range(0, 20000, 500):
            node.apply_and_append(requests[i:i + 500], BD)
            acked = node.journal.last_seq
    with pytest.raises(LedgerError, match="stopped after a failed commit"):
        node.apply_and_append(requests[:1], BD)          # fail-stop
    node.close()
    assert verify(path)["last_seq"] == acked            # everything acknowledged is there


def test_read_into_a_reused_buffer(node_dir):
    j = Journal(node_dir, readonly=True)
    try:
        everything = j.read()
        buffer = np.zeros(2000, dtype=RECORD_DTYPE)
        for first in (1, 9, 310, 4999):                   # batch starts, inside batches, across them
            chunk = j.read(first, first + 1499, out=buffer)
            assert chunk.base is buffer or chunk.base is buffer.base
            assert chunk.tobytes() == everything[first - 1:first + 1499].tobytes()
        assert j.read(j.last_seq - 5, out=buffer).tobytes() == everything[-6:].tobytes()
        with pytest.raises(ValueError, match="expecting a contiguous RECORD_DTYPE array of at least 2001 rows"):
            j.read(1, 2001, out=buffer)
        with pytest.raises(ValueError, match="out is uint8"):
            j.read(1, 10, out=np.zeros(4000, np.uint8))
    finally:
        j.close()


def test_verify_names_the_first_record_replay_answers_differently(node_dir, tmp_path):
    """An intact journal replayed under another configuration (here: one policy's deductible
    changed in node.json) diverges; verify names the first settlement that answers differently."""
    import json
    copy = str(tmp_path / "reconfigured")
    shutil.copytree(node_dir, copy)
    os.remove(os.path.join(copy, "node.lock"))
    path = os.path.join(copy, "node.json")
    settings = json.load(open(path))
    j = Journal(copy, readonly=True)
    records = j.read()
    j.close()
    med = records[(records["result"]["cmd"] == Cmd.MED_SETTLE) & (records["result"]["deductible_fen"] > 0)]
    assert len(med)
    for policy in settings["config"]["policies"]:
        policy["deductible_first_fen"] += 1
        policy["deductible_later_fen"] += 1
    open(path, "w").write(json.dumps(settings))
    first_changed = int(med["seq"][0])
    with pytest.raises(VerifyError) as e:
        verify(copy)
    assert (e.value.what, e.value.seq) == ("replay", first_changed)
