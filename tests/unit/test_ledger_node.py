"""The ledger with real LMDB in temp dirs and its real writer process: append/read, replay from
genesis is byte-identical, idempotency survives restarts, corruption is detected, bad operations
get clear errors with a remedy."""
import os
import shutil

import msgspec
import numpy as np
import pytest

from yikatong.engine import Cmd, ResFlag, rc_str
from yikatong.engine.builders import medical, request
from yikatong.engine.cardkeys import CardKeys, DEMO_DATA_KEY
from yikatong.engine.workload import generated_pan_hashes, medical_settlements
from yikatong.ledger.demo_node import init_demo
from yikatong.ledger.node import LedgerConfig, Node
from yikatong.ledger.records import RECORD_DTYPE
from yikatong.ledger.store import DB_META, LedgerCorrupt, LedgerError, LedgerStopped, open_dbs, open_env
from yikatong.ledger.verify import verify

BD = 20261124
PAN = "6214830000000017"
CLAIM = (5000000, 300000, 50000, 100000, 4550000)
CARDS = 200
KEYS = CardKeys(DEMO_DATA_KEY)


def small_config(**kw):
    return LedgerConfig(map_size_bytes=kw.pop("map_size_bytes", 1 << 28), **kw)


def make_node(path, **kw):
    return init_demo(str(path), CARDS, BD, txn_retention_count=1 << 12, ledger_config=small_config(**kw))


def snapshot(engine):
    return {k: v.tobytes() for k, v in engine.arrays.items()}


def settle(node, count, seed, batch=500, bd=BD):
    q = medical_settlements(node.engine, generated_pan_hashes(KEYS, CARDS), count, seed=seed,
                            first_stan=seed * 100000)
    for i in range(0, count, batch):
        node.apply_and_append(q[i:i + batch], bd)


def test_append_read_and_recovery_are_byte_identical(tmp_path):
    node = make_node(tmp_path / "n", checkpoint_every_records=1500)
    settle(node, 4000, seed=1)
    assert node.last_seq == 8 + 1 + CARDS + 4000
    records = node.read(1, node.last_seq)
    assert records.dtype == RECORD_DTYPE
    assert np.array_equal(records["seq"], np.arange(1, node.last_seq + 1, dtype=np.uint64))
    middle = node.read(300, 1300)
    assert middle["seq"][0] == 300 and middle["seq"][-1] == 1300 and middle.tobytes() == records[299:1300].tobytes()
    live = snapshot(node.engine)
    node.close()
    assert len(os.listdir(tmp_path / "n" / "checkpoints")) == 2          # checkpoints_kept
    node = Node.open(str(tmp_path / "n"))
    assert node.recovered_from_seq > 0
    assert snapshot(node.engine) == live                                 # checkpoint + tail
    node.close()
    shutil.move(tmp_path / "n" / "checkpoints", tmp_path / "aside")
    node = Node.open(str(tmp_path / "n"))
    assert node.recovered_from_seq == 0                                  # genesis replay
    assert snapshot(node.engine) == live
    node.close()
    shutil.move(tmp_path / "aside", tmp_path / "n" / "checkpoints")
    report = verify(str(tmp_path / "n"))
    assert (report.records, report.checkpoints_equal, report.business_dates, report.dates_conserved) == \
        (8 + 1 + CARDS + 4000, 2, 1, 1)
    assert report.settlements_checked == int((((records["result"]["outcome_flags"] & ResFlag.POSTED) != 0)
                                              & (records["request"]["cmd"] == Cmd.MED_SETTLE)).sum())


def test_records_hold_no_pin_data(tmp_path):
    node = make_node(tmp_path / "n")
    records = node.read(1, node.last_seq)
    node.close()
    issue = records["request"]["cmd"] == Cmd.ISSUE
    assert (records["request"]["pin_pvv"][~issue] == 0).all()
    assert (records["request"]["flags"] & 8 == 0).all()                  # ReqFlag.PIN never stored


def test_pipelined_submit_then_wait(tmp_path):
    node = make_node(tmp_path / "n")
    q = medical_settlements(node.engine, generated_pan_hashes(KEYS, CARDS), 300, seed=5)
    t1, _ = node.submit(q[:100], BD)
    t2, _ = node.submit(q[100:200], BD)       # applied while batch t1 may still be fsyncing
    node.wait_durable(t2)
    assert node.acked_batch_seq == t2 == t1 + 1
    node.close()
    assert verify(str(tmp_path / "n")).records == 8 + 1 + CARDS + 200


def test_idempotency_survives_restart(tmp_path):
    node = make_node(tmp_path / "n")
    engine = node.engine
    q = medical(engine, KEYS, PAN, "T0000001", *CLAIM, stan=777)
    first = node.apply_and_append(q, BD)[0].copy()
    assert rc_str(first["code"]) == "00"
    rev = request(engine, KEYS, Cmd.REVERSAL, pan=PAN, terminal="T0000001", stan=4242)
    r = node.apply_and_append(rev, BD)[0]
    assert rc_str(r["code"]) == "00" and r["outcome_flags"] & ResFlag.TOMBSTONE
    node.checkpoint()                                        # the ring travels in the checkpoint …
    node.close()
    for drop_checkpoints in (False, True):                   # … and is rebuilt by replay
        if drop_checkpoints:
            shutil.rmtree(tmp_path / "n" / "checkpoints")
        node = Node.open(str(tmp_path / "n"))
        slot = int(first["card_slot"])
        balances = node.engine.balances(slot)
        again = node.apply_and_append(q, BD)[0]
        assert again["outcome_flags"] & ResFlag.DUPLICATE
        assert (rc_str(again["code"]), int(again["rrn"]), int(again["fund_fen"])) == ("00", int(first["rrn"]), 3862000)
        assert node.engine.balances(slot) == balances
        other = q.copy()
        other["content_hash"] ^= 1
        assert rc_str(node.apply_and_append(other, BD)[0]["code"]) == "94"
        late = medical(node.engine, KEYS, PAN, "T0000001", *CLAIM, stan=4242)
        assert rc_str(node.apply_and_append(late, BD)[0]["code"]) == "25"
        assert node.engine.balances(slot) == balances
        node.close()


def _flip(path, needle: bytes, offset=0):
    """Flip a bit in every copy of `needle` in the file: LMDB keeps stale copies of pages it
    copied on write, and only the live one matters."""
    data = bytearray(open(path, "rb").read())
    at = data.find(needle)
    assert at >= 0
    while at >= 0:
        data[at + offset] ^= 0x01
        at = data.find(needle, at + 1)
    open(path, "wb").write(data)


@pytest.mark.parametrize("target", ["record", "header", "checkpoint"])
def test_flipped_bytes_are_detected_by_verify_and_startup(tmp_path, target):
    node = make_node(tmp_path / "n")
    node.checkpoint()               # start-up checks what it replays: the damage is in the tail
    q = medical(node.engine, KEYS, PAN, "T0000001", *CLAIM, stan=9)
    q["idem_key"] = 0x1122334455667788
    node.apply_and_append(q, BD)
    settle(node, 300, seed=2)
    header = node._headers_tail()
    node.close()
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "n", copy)
    if target == "record":
        _flip(copy / "data.mdb", (0x1122334455667788).to_bytes(8, "little"))
        expected = "batch digest"
    elif target == "header":
        _flip(copy / "data.mdb", header["digest"].tobytes(), 5)
        expected = "batch digest" 
    else:
        (ck,) = os.listdir(copy / "checkpoints")
        data = bytearray(open(copy / "checkpoints" / ck, "rb").read())
        data[len(data) // 2] ^= 0x40
        open(copy / "checkpoints" / ck, "wb").write(data)
        expected = "checksum (BLAKE2b)"
    with pytest.raises(LedgerCorrupt, match=expected.replace("(", r"\(").replace(")", r"\)")):
        verify(str(copy))
    with pytest.raises(LedgerCorrupt, match=expected.replace("(", r"\(").replace(")", r"\)")):
        Node.open(str(copy))
    assert verify(str(tmp_path / "n")).records > 0                       # the original is fine


def test_dir_in_use_is_refused(tmp_path):
    node = make_node(tmp_path / "n")
    with pytest.raises(LedgerError, match=rf"is in use by another running node \(pid {os.getpid()}\)"):
        Node.open(str(tmp_path / "n"))
    node.close()
    Node.open(str(tmp_path / "n")).close()


def test_missing_or_empty_dir_never_gets_a_new_ledger(tmp_path):
    with pytest.raises(LedgerError, match="does not exist or is not a directory. Remedy"):
        Node.open(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LedgerError, match=r"holds no ledger \(data.mdb missing\); refusing"):
        Node.open(str(tmp_path / "empty"))
    assert os.listdir(tmp_path / "empty") == []
    (tmp_path / "locked").mkdir()
    os.chmod(tmp_path / "locked", 0)
    if os.geteuid() != 0:                                               # root reads anything
        with pytest.raises(LedgerError, match="not readable and writable"):
            Node.open(str(tmp_path / "locked"))


def test_newer_layout_is_refused(tmp_path):
    make_node(tmp_path / "n").close()
    env = open_env(str(tmp_path / "n"), 1 << 28, 8)
    dbs = open_dbs(env, create=False)
    with env.begin(write=True) as txn:
        meta = msgspec.json.decode(txn.get(b"node", db=dbs[DB_META]))
        meta["data_layout_version"] = 2
        txn.put(b"node", msgspec.json.encode(meta), db=dbs[DB_META])
    env.close()
    with pytest.raises(LedgerError, match="written with data layout version 2; this yikatong reads up to version 1"):
        Node.open(str(tmp_path / "n"))


def test_map_full_stops_cleanly_and_loses_nothing(tmp_path):
    node = make_node(tmp_path / "n", map_size_bytes=2 << 20)
    acked = node.last_seq
    with pytest.raises(LedgerStopped, match="map_size_bytes=2097152.*Remedy: raise map_size_bytes"):
        for seed in range(1, 100):
            settle(node, 500, seed=seed)
            acked = node.last_seq
    with pytest.raises(LedgerStopped):
        node.apply_and_append(medical(node.engine, KEYS, PAN, "T0000001", *CLAIM), BD)
    node.close()
    node = Node.open(str(tmp_path / "n"), map_size_bytes=64 << 20)     # the remedy
    assert node.last_seq == acked
    settle(node, 500, seed=200)
    node.close()
    assert verify(str(tmp_path / "n")).records == acked + 500
