"""Recovery's replay path: the engine's in-place replay of journal rows equals apply_batch and names
the first row that answers differently; the chain check on several threads names the first broken
batch in journal order; batches of one record (2-byte-aligned LMDB values) replay exactly."""
import hashlib
import json
import os
import shutil
import threading
import zipfile

import numpy as np
import pytest

from tests.ledger_faults import flip_byte_in_file
from yikatong.engine import Cmd
from yikatong.engine.cardkeys import CardKeys, DEMO_DATA_KEY
from yikatong.engine.demo import demo_engine
from yikatong.engine.state import saved_arrays
from yikatong.engine.workload import generated_pan_hashes, medical_settlements
from yikatong.ledger.journal import CorruptLedgerError, Journal
from yikatong.ledger import node as node_module
from yikatong.ledger.node import ChainCheck, Node, load_npz
from yikatong.ledger.records import RECORD_DTYPE, records_from_batch
from yikatong.nodes import init_demo_node

BD = 20261124
KEYS = CardKeys(DEMO_DATA_KEY)
REQUEST_OFFSET, RESULT_OFFSET = RECORD_DTYPE.fields["request"][1], RECORD_DTYPE.fields["result"][1]


def journal_rows(count: int):
    """(engine before, engine after, records) for `count` settlements applied live."""
    live, _ = demo_engine(generated_cards=200, business_date=BD, txn_retention_count=1 << 10)
    before = {k: v.copy() for k, v in live.arrays.items()}
    q = medical_settlements(live, generated_pan_hashes(KEYS, 200), count, seed=11)
    records = records_from_batch(q, live.apply_batch(q, business_date=BD), 1, BD)
    return before, live, records


def fresh_engine(live, arrays):
    from yikatong.engine import Engine
    return Engine(live.config, arrays={k: v.copy() for k, v in arrays.items()})


def test_replay_rows_rebuilds_the_live_state_byte_for_byte():
    before, live, records = journal_rows(3000)          # > the 1,024-entry ring: evictions replay too
    engine = fresh_engine(live, before)
    assert engine.replay_rows(records.view(np.uint8), RECORD_DTYPE.itemsize, REQUEST_OFFSET, RESULT_OFFSET,
                              business_date=BD) == -1
    for name, array in live.arrays.items():
        assert engine.arrays[name].tobytes() == array.tobytes(), name


@pytest.mark.parametrize("row, byte", [(0, 0), (1234, 127), (2999, 64)])
def test_replay_rows_names_the_first_row_that_differs(row, byte):
    before, live, records = journal_rows(3000)
    altered = records.copy()
    raw = altered.view(np.uint8).reshape(-1, RECORD_DTYPE.itemsize)
    raw[row, RESULT_OFFSET + byte] ^= 0x01                # one bit of one recorded result
    engine = fresh_engine(live, before)
    assert engine.replay_rows(altered.view(np.uint8), RECORD_DTYPE.itemsize, REQUEST_OFFSET, RESULT_OFFSET,
                              business_date=BD) == row


def test_replay_rows_refuses_rows_that_are_not_whole():
    before, live, records = journal_rows(10)
    engine = fresh_engine(live, before)
    with pytest.raises(AssertionError):
        engine.replay_rows(records.view(np.uint8)[:-8], RECORD_DTYPE.itemsize, REQUEST_OFFSET, RESULT_OFFSET,
                           business_date=BD)


@pytest.fixture
def small_batches_dir(tmp_path):
    """A node journaled in batches of 1..7 records (small LMDB values sit 2-byte aligned in leaf
    pages), checkpointed half way."""
    path = str(tmp_path / "node")
    node = init_demo_node(path, 100, checkpoint_every_records=1 << 40, business_date=BD, txn_retention_count=1 << 10)
    q = medical_settlements(node.engine, generated_pan_hashes(KEYS, 100), 900, seed=3)
    i = k = 0
    while i < 900:
        n = 1 + k % 7
        node.apply_and_append(q[i:i + n], BD)
        i, k = i + n, k + 1
        if k == 120:
            node.checkpoint()
    live = {name: a.tobytes() for name, a in node.engine.arrays.items()}
    node.close()
    return path, live


def assert_recovers_from_checkpoint(path: str, live: dict) -> None:
    """Node.open recovers from a checkpoint to exactly the arrays the live engine had."""
    node = Node.open(path)
    try:
        assert node.checkpoint_seq > 0
        assert {name: a.tobytes() for name, a in node.engine.arrays.items()} == live
    finally:
        node.close()


def test_small_batches_recover_exactly_from_checkpoint_and_genesis(small_batches_dir, tmp_path):
    path, live = small_batches_dir
    assert_recovers_from_checkpoint(path, live)
    shutil.rmtree(os.path.join(path, "checkpoints"))
    node = Node.open(path)
    try:
        assert {name: a.tobytes() for name, a in node.engine.arrays.items()} == live
    finally:
        node.close()


def flip_value_byte(path: str, first_seq: int, offset: int):
    """Flip one byte of the journal value keyed `first_seq` in data.mdb."""
    j = Journal(path, readonly=True)
    with j.env.begin() as txn:
        value = txn.get(first_seq.to_bytes(8, "big"), db=j.journal_db)
    j.close()
    flip_byte_in_file(os.path.join(path, "journal.lmdb", "data.mdb"), value, offset)


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_chain_check_names_the_first_broken_batch_on_any_number_of_threads(small_batches_dir, threads):
    path, _ = small_batches_dir
    j = Journal(path, readonly=True)
    headers = j.headers()
    j.close()
    late, early = headers[-3], headers[40]
    flip_value_byte(path, int(late["first_seq"]), 20)
    flip_value_byte(path, int(early["first_seq"]), 20)
    j = Journal(path, readonly=True)
    try:
        chain = ChainCheck(j, headers, threads=threads)
        chain.start()
        found = sorted(chain.join(), key=lambda e: e[0])
    finally:
        j.close()
    assert found[0][0] == int(early["batch_no"])
    assert f"batch {int(early['batch_no'])} (sequence {int(early['first_seq'])}…" in str(found[0][2])
    assert "records altered" in str(found[0][2])
    # Node.open checks the tail after the checkpoint before it returns: it names the late
    # break; the early one, before the checkpoint, is the background check's
    # (test_ledger_journal.py::test_flipped_record_byte_before_the_checkpoint_stops_the_node)
    checkpoint_batch_no = json.load(open(Node._checkpoints(path)[-1]))["batch_no"]
    assert int(early["batch_no"]) <= checkpoint_batch_no < int(late["batch_no"])
    with pytest.raises(CorruptLedgerError, match=rf"batch {int(late['batch_no'])} \(sequence"):
        Node.open(path)


@pytest.mark.parametrize("pace", [False, True])
def test_checkpoint_file_round_trips_every_array_kind(tmp_path, pace):
    """save_npz (no tobytes copies) writes what np.load reads back: structured, 2-D, empty,
    larger than one 8 MiB piece; and the same bytes np.savez writes."""
    from yikatong.engine.layouts import CARD_HOT_DTYPE, TXN_DTYPE
    from yikatong.ledger.node import load_npz, save_npz
    rng = np.random.default_rng(1)
    arrays = {
        "cards": rng.integers(0, 256, 7 * CARD_HOT_DTYPE.itemsize, dtype=np.uint8).view(CARD_HOT_DTYPE),
        "txns": rng.integers(0, 256, 70_001 * TXN_DTYPE.itemsize, dtype=np.uint8).view(TXN_DTYPE),
        "grid": np.arange(12, dtype="<u8").reshape(3, 4), "empty": np.zeros(0, "<i4"),
    }
    ours, theirs = str(tmp_path / "ours.npz"), str(tmp_path / "theirs.npz")
    with open(ours, "wb") as f:
        save_npz(f, arrays, pace=pace)
    np.savez(theirs, **arrays)
    assert open(ours, "rb").read() == open(theirs, "rb").read()
    with np.load(ours) as loaded:
        assert sorted(loaded.files) == sorted(arrays)
        for name, array in arrays.items():
            back = loaded[name]
            assert (back.dtype, back.shape, back.tobytes()) == (array.dtype, array.shape, array.tobytes()), name
            assert back.flags.writeable
    for path in (ours, theirs):                      # recovery's reader: the same arrays
        loaded = load_npz(path)
        assert sorted(loaded) == sorted(arrays)
        for name, array in arrays.items():
            back = loaded[name]
            assert (back.dtype, back.shape, back.tobytes()) == (array.dtype, array.shape, array.tobytes()), name
            assert back.flags.writeable and back.flags.c_contiguous


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("piece_bytes", [4096, 1 << 20])
def test_checkpoint_file_writes_save_npz_bytes_and_their_digest(tmp_path, direct, piece_bytes):
    """CheckpointFile (O_DIRECT from an aligned buffer, or through the cache) holds the arrays
    save_npz writes, whatever the piece size against the members' and the file's odd lengths (a
    stream to zipfile: its members carry data descriptors, which np.load and load_npz read), and
    close() returns the file's SHA-256 without reading it back."""
    from yikatong.engine.layouts import TXN_DTYPE
    from yikatong.ledger.node import CheckpointFile, file_digest, load_npz, save_npz
    rng = np.random.default_rng(2)
    arrays = {"txns": rng.integers(0, 256, 9_001 * TXN_DTYPE.itemsize, dtype=np.uint8).view(TXN_DTYPE),
              "odd": rng.integers(0, 256, 12_345, dtype=np.uint8), "empty": np.zeros(0, "<i4")}
    ours = str(tmp_path / "ours.npz")
    f = CheckpointFile(ours, piece_bytes=piece_bytes, direct=direct)
    try:
        save_npz(f, arrays)
        digest = f.close()
    finally:
        f.abandon()
    assert f.direct == (direct and direct_io_works(str(tmp_path)))
    data = open(ours, "rb").read()
    assert len(data) % 4096 != 0                        # the padded last block was cut off
    assert digest == file_digest(ours, "sha256") == hashlib.sha256(data).hexdigest()
    loaded = load_npz(ours)
    for name, array in arrays.items():
        assert (loaded[name].dtype, loaded[name].tobytes()) == (array.dtype, array.tobytes()), name
    with np.load(ours) as back:                          # zipfile's reader too (data descriptors)
        assert back["odd"].tobytes() == arrays["odd"].tobytes()


def direct_io_works(folder: str) -> bool:
    """This file system takes O_DIRECT (ext4 does; tmpfs may refuse it)."""
    try:
        fd = os.open(os.path.join(folder, "probe"), os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    return True


def test_load_npz_reads_what_np_load_reads_and_refuses_a_torn_file(tmp_path):
    arrays = {"a": np.arange(100_000, dtype="<i8"), "f": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
              "s": np.zeros(3, dtype=[("x", "<u2"), ("y", "V5")])}
    plain, packed = str(tmp_path / "plain.npz"), str(tmp_path / "packed.npz")
    np.savez(plain, **arrays)
    np.savez_compressed(packed, **arrays)            # compressed members: left to np.load
    for path in (plain, packed):
        loaded = load_npz(path)
        for name, array in arrays.items():
            assert loaded[name].dtype == array.dtype and (loaded[name] == array).all(), (path, name)
    torn = str(tmp_path / "torn.npz")
    open(torn, "wb").write(open(plain, "rb").read()[:400_000])    # cut inside member a's data
    with pytest.raises(zipfile.BadZipFile):
        load_npz(torn)



def reversals_of(originals: np.ndarray) -> np.ndarray:
    """冲正 rows for `originals` (same terminal, batch and STAN; a duplicate key of their own)."""
    reversals = originals.copy()
    reversals["cmd"] = Cmd.REVERSAL
    reversals["idem_key"] ^= np.uint64(0x4000)            # MTI class 04 in the key
    reversals["content_hash"] = reversals["idem_key"]
    return reversals


@pytest.mark.parametrize("checkpoint_by", ["copy", "replay"])
def test_background_checkpoint_is_the_state_at_its_sequence(tmp_path, checkpoint_by, monkeypatch):
    """A background checkpoint holds the arrays as they were when `checkpoint(background=True)`
    returned (copied before it returns — the ring over the next batches —, or replayed into the
    node's replica by its thread): the node overwrites every byte of its arrays right after
    (the ring excepted in copy mode: its copy follows the engine's own writes), then serves
    settlements that wrap the ring and reversals that change entries from before the
    checkpoint, and the file still holds the state at the checkpoint's sequence; recovery from
    it then equals the live node."""
    path = str(tmp_path / "node")
    node = init_demo_node(path, 100, checkpoint_every_records=1 << 40, business_date=BD, txn_retention_count=1 << 9,
                          checkpoint_by=checkpoint_by)
    q = medical_settlements(node.engine, generated_pan_hashes(KEYS, 100), 900, seed=5)
    node.apply_and_append(q[:300], BD)
    at_checkpoint = {name: a.tobytes() for name, a in node.engine.arrays.items()}
    # the checkpoint thread waits until the traffic below is served (on an idle second core it
    # would otherwise finish first): the ring's copy is then made by that traffic's batches and
    # the reversals change entries the copy has not reached
    gate = threading.Event()
    monkeypatch.setattr(node_module, "_run_when_idle", gate.wait)
    npz = node.checkpoint(background=True)
    saved = {name: a.copy() for name, a in node.engine.arrays.items()}
    for name, a in node.engine.arrays.items():     # every page now differs from the copy's
        if not (checkpoint_by == "copy" and name == "txns"):
            a.reshape(-1).view(np.uint8)[:] = 0xA5
    for name, a in saved.items():
        node.engine.arrays[name][...] = a
    answered = node.apply_and_append(reversals_of(q[250:300]), BD)   # of settlements from before the checkpoint
    assert (answered["code"] == 0x3030).all() and (answered["orig_rrn"] != 0).all()   # each changed its original
    node.apply_and_append(q[300:], BD)
    live = {name: a.tobytes() for name, a in node.engine.arrays.items()}
    gate.set()
    node._checkpoint_thread.join()
    assert not node.checkpoint_in_progress()
    assert_file_holds(npz, at_checkpoint)
    assert json.load(open(npz[:-4] + ".json"))["seq"] == node.checkpoint_seq
    assert node.checkpoint_stats["by_" + checkpoint_by] == 1 and node.checkpoint_stats["failed"] == 0
    node.close()
    assert_recovers_from_checkpoint(path, live)


def test_a_ring_copy_whose_log_overflows_fails_that_checkpoint_only(tmp_path, monkeypatch, caplog):
    """More in-place changes to older ring entries than the log holds, before the checkpoint
    thread copies the ring: that checkpoint is not written (failed, with its reason), the node
    goes on, and the next checkpoint is taken and recovers exactly."""
    monkeypatch.setattr(node_module, "RING_SNAPSHOT_LOG_ENTRIES", 4)
    path = str(tmp_path / "node")
    node = init_demo_node(path, 100, checkpoint_every_records=1 << 40, business_date=BD, txn_retention_count=1 << 9)
    q = medical_settlements(node.engine, generated_pan_hashes(KEYS, 100), 400, seed=7)
    node.apply_and_append(q[:300], BD)
    gate = threading.Event()
    monkeypatch.setattr(node_module, "_run_when_idle", gate.wait)
    npz = node.checkpoint(background=True)
    assert (node.apply_and_append(reversals_of(q[200:210]), BD)["code"] == 0x3030).all()   # ten originals from before
    gate.set()
    node._checkpoint_thread.join()
    assert node.checkpoint_stats["failed"] == 1 and node.checkpoint_stats["by_copy"] == 0
    assert "more than 4 older transaction entries changed in place" in node.checkpoint_error
    assert not os.path.exists(npz) and not os.path.exists(npz[:-4] + ".json")
    assert not node.engine.core.ring_snapshot_active
    node.apply_and_append(q[300:], BD)
    npz = node.checkpoint(background=True)         # the thread is not held: nothing to log
    node._checkpoint_thread.join()
    assert os.path.exists(npz[:-4] + ".json") and node.checkpoint_error is None
    assert node.checkpoint_stats["by_copy"] == 1
    live = arrays_bytes(node.engine.arrays)
    node.close()
    assert_recovers_from_checkpoint(path, live)


def arrays_bytes(arrays: dict) -> dict:
    return {name: a.tobytes() for name, a in arrays.items()}


def assert_file_holds(npz: str, at: dict) -> None:
    """The checkpoint file holds the arrays `at` byte for byte, but for the derived ones, which
    it leaves out (loading rebuilds them: assert_recovers_from_checkpoint compares those)."""
    assert arrays_bytes(load_npz(npz)) == saved_arrays(at)


def background_checkpoint(node) -> tuple[str, dict]:
    """(npz path, the live arrays at its sequence) of a background checkpoint, once written."""
    at = arrays_bytes(node.engine.arrays)
    npz = node.checkpoint(background=True)
    return npz, at


def test_background_checkpoints_replay_the_journal_into_a_replica_and_never_copy(tmp_path):
    """Three background checkpoints with batches committed while each is written: every file is
    the live state at its sequence byte for byte, made by replaying exactly the records since
    the one before (genesis first) into the replica, with no copy of the live arrays."""
    path = str(tmp_path / "node")
    node = init_demo_node(path, 100, checkpoint_every_records=1 << 40, business_date=BD, txn_retention_count=1 << 10,
                          checkpoint_by="replay")
    genesis_records = node.journal.last_seq
    q = medical_settlements(node.engine, generated_pan_hashes(KEYS, 100), 3000, seed=7)
    expected = []
    for k in range(3):
        node.apply_and_append(q[k * 1000:k * 1000 + 600], BD)
        expected.append(background_checkpoint(node))
        node.apply_and_append(q[k * 1000 + 600:k * 1000 + 1000], BD)     # while it is written
    node._checkpoint_thread.join()
    assert node.checkpoint_stats == {"by_replay": 3, "by_copy": 0, "failed": 0,
                                     "replayed_records": genesis_records + 600 + 1000 + 1000}
    assert node.checkpoint_error is None
    for npz, at in expected:
        assert_file_holds(npz, at)
    live = arrays_bytes(node.engine.arrays)
    node.close()
    assert_recovers_from_checkpoint(path, live)


def test_replica_of_a_reopened_node_starts_from_its_newest_checkpoint(tmp_path):
    """After a restart the replica is seeded from the checkpoint recovery used and replays only
    the records after it."""
    path = str(tmp_path / "node")
    node = init_demo_node(path, 100, checkpoint_every_records=1 << 40, business_date=BD, txn_retention_count=1 << 10,
                          checkpoint_by="replay")
    q = medical_settlements(node.engine, generated_pan_hashes(KEYS, 100), 900, seed=9)
    node.apply_and_append(q[:300], BD)
    node.checkpoint()                                   # foreground: the live arrays written
    node.apply_and_append(q[300:500], BD)
    node.close()
    node = Node.open(path)
    node.apply_and_append(q[500:900], BD)
    npz, at = background_checkpoint(node)
    node._checkpoint_thread.join()
    assert node.checkpoint_stats == {"by_replay": 1, "by_copy": 0, "failed": 0, "replayed_records": 600}
    assert_file_holds(npz, at)
    node.close()


def test_arrays_grown_outside_the_journal_reseed_the_replica_by_a_copy(tmp_path):
    """Engine.reserve called directly (not Node.reserve_cards, which journals the growth)
    changes the arrays without a record: the next background checkpoint copies the live state
    into a new replica; the one after replays again."""
    path = str(tmp_path / "node")
    node = init_demo_node(path, 100, checkpoint_every_records=1 << 40, business_date=BD, txn_retention_count=1 << 10,
                          checkpoint_by="replay")
    q = medical_settlements(node.engine, generated_pan_hashes(KEYS, 100), 900, seed=13)
    node.apply_and_append(q[:300], BD)
    node.engine.reserve(node.engine.card_capacity + 1)
    first = background_checkpoint(node)
    node.apply_and_append(q[300:600], BD)
    second = background_checkpoint(node)
    node.apply_and_append(q[600:], BD)
    node._checkpoint_thread.join()
    assert node.checkpoint_stats == {"by_replay": 1, "by_copy": 1, "failed": 0, "replayed_records": 300}
    for npz, at in (first, second):
        assert_file_holds(npz, at)
    live = arrays_bytes(node.engine.arrays)
    node.close()
    assert_recovers_from_checkpoint(path, live)


def test_replica_that_answers_differently_writes_no_checkpoint(tmp_path, caplog):
    """A replica whose replay diverges from the journal (here: a card balance altered behind its
    back) writes no file; the error is logged and kept; the node goes on, and the next
    checkpoint starts a replica from a copy of the live state and is right again."""
    path = str(tmp_path / "node")
    node = init_demo_node(path, 100, checkpoint_every_records=1 << 40, business_date=BD, txn_retention_count=1 << 10,
                          checkpoint_by="replay")
    genesis_records = node.journal.last_seq
    q = medical_settlements(node.engine, generated_pan_hashes(KEYS, 100), 900, seed=17)
    node.apply_and_append(q[:300], BD)
    background_checkpoint(node)
    node._checkpoint_thread.join()
    node._replica.arrays["cards"]["ins_balance_fen"][:] += 1
    node.apply_and_append(q[300:600], BD)
    bad_seq = node.journal.last_seq
    npz, _ = background_checkpoint(node)
    node._checkpoint_thread.join()
    assert not os.path.exists(npz) and not os.path.exists(npz[:-4] + ".json")
    assert node.checkpoint_error.startswith(f"checkpoint at sequence {bad_seq} not written: replay diverged at sequence ")
    assert any(r.levelname == "ERROR" and "not written" in r.getMessage() for r in caplog.records)
    node.apply_and_append(q[600:], BD)
    good = background_checkpoint(node)
    node._checkpoint_thread.join()
    assert node.checkpoint_stats == {"by_replay": 1, "by_copy": 1, "failed": 1,
                                     "replayed_records": genesis_records + 300}
    assert node.checkpoint_error is None
    assert_file_holds(good[0], good[1])
    node.close()


def test_a_starved_checkpoint_thread_is_let_run_at_nice_10():
    """_run_niced moves a SCHED_IDLE thread (as the checkpoint thread makes itself) back to the
    normal policy at nice +10: what Node.nudge_checkpoint does to a checkpoint that waited too
    long for idle time on a saturated core."""
    import threading
    from yikatong.ledger.node import _run_niced, _run_when_idle
    ready, release, seen = threading.Event(), threading.Event(), {}

    def idle_thread():
        _run_when_idle()
        ready.set()
        release.wait(10)

    t = threading.Thread(target=idle_thread)
    t.start()
    try:
        assert ready.wait(10)
        seen["before"] = os.sched_getscheduler(t.native_id)
        assert _run_niced(t.native_id)
        seen["after"] = (os.sched_getscheduler(t.native_id), os.getpriority(os.PRIO_PROCESS, t.native_id))
    finally:
        release.set()
        t.join()
    assert seen == {"before": os.SCHED_IDLE, "after": (os.SCHED_OTHER, 10)}


def test_nudge_escalates_only_a_checkpoint_that_waited_too_long(tmp_path, monkeypatch):
    """nudge_checkpoint does nothing without a checkpoint running or before the wait is over;
    past it, it lets the running checkpoint go on at nice +10, once, and the file is right."""
    import time
    from yikatong.ledger import node as node_module
    path = str(tmp_path / "node")
    node = init_demo_node(path, 100, checkpoint_every_records=1 << 40, business_date=BD)   # 2^20 ring: ~250 MB
    try:
        node.apply_and_append(medical_settlements(node.engine, generated_pan_hashes(KEYS, 100), 300, seed=21), BD)
        assert node.nudge_checkpoint() is False                      # no checkpoint running
        at = arrays_bytes(node.engine.arrays)
        npz = node.checkpoint(background=True)
        assert node.nudge_checkpoint() is False                      # running, but not waited 10 s
        monkeypatch.setattr(node_module, "CHECKPOINT_IDLE_WAIT_S", 0.0)
        tid = node._checkpoint_thread.native_id
        deadline = time.monotonic() + 10                             # the thread made itself SCHED_IDLE
        while node.checkpoint_in_progress() and os.sched_getscheduler(tid) != os.SCHED_IDLE:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert node.checkpoint_in_progress()                         # 250 MB are not written that fast
        assert node.nudge_checkpoint() is True
        assert node.nudge_checkpoint() is False                      # once per checkpoint
        node._checkpoint_thread.join()
        assert node.checkpoint_stats["by_copy"] == 1 and node.checkpoint_error is None
        assert_file_holds(npz, at)
    finally:
        node.close()
