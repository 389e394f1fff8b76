"""A checkpoint's copy of the transaction ring spread over batches (Core.ring_snapshot_*) equals
the ring at the snapshot's point, byte for byte, whatever ran meanwhile.

The snapshot is begun between batches; then the property test's random commands (settlements,
voids, refunds, cancels, reversals of earlier messages — the commands that change older ring
entries in place — and everything else) run in random batches on a small ring that wraps
several times, interleaved with random-sized copy steps, as the server's checkpoint thread
would; then the snapshot is ended. The copy must equal a plain copy of the ring taken at the
point, and the engine's own state must be the one a twin engine without a snapshot reaches.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from yikatong.engine import Cmd, Engine, ReqFlag
from yikatong.engine.builders import request
from yikatong.engine.demo import demo_config, genesis_batches, NAMED_CARDS

from test_engine_model import GENERATED, KEYS, PANS, SPARE_SLOTS, DATES, batches, op   # same folder


def engine_with_genesis(retention):
    engine = Engine(demo_config(), card_capacity=len(NAMED_CARDS) + GENERATED + SPARE_SLOTS,
                    txn_retention_count=retention)
    for batch in genesis_batches(KEYS, GENERATED):
        engine.apply_batch(batch, business_date=20261124)
    return engine


def snapshot_buffers(engine, log_entries):
    ring = engine.arrays["txns"]
    # the copy starts as a pattern no ring entry has, so an entry left uncopied shows
    copy = np.full(ring.nbytes, 0xA5, dtype=np.uint8).view(ring.dtype)
    return copy, np.zeros(log_entries, dtype=ring.dtype), np.zeros(log_entries, dtype=np.int32)


def bank(engine, cmd, stan, amount_fen, **fields):
    """A purchase (with the demo's bank PIN) or a refund of one, by the first named card at the
    demo's purchase terminal."""
    pin = "888888" if cmd == Cmd.PURCHASE else None
    return request(engine, KEYS, cmd, pan=PANS[0], terminal="T0000006", stan=stan, amount_fen=amount_fen,
                   pin=pin, **fields)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=st.lists(op, min_size=5, max_size=80), after=st.lists(op, min_size=5, max_size=120),
       cuts=st.lists(st.integers(1, 30), min_size=1, max_size=8),
       steps=st.lists(st.sampled_from([0, 0, 1, 2, 3, 5, 8, 13]), min_size=8, max_size=8),
       date_picks=st.lists(st.integers(0, len(DATES) - 1), min_size=8, max_size=8),
       retention=st.sampled_from([16, 64]))
def test_ring_copy_over_batches_equals_the_ring_at_its_point(before, after, cuts, steps, date_picks, retention):
    live, twin = engine_with_genesis(retention), engine_with_genesis(retention)
    pans, history, stan_counter = list(PANS), [], [0]
    ops = before + after
    plan = list(batches(live, ops, [len(before)] + cuts, date_picks, history, stan_counter, pans))
    copy = log = positions = expected = None
    for b, requests, bd in plan:
        if b == 1:
            # the snapshot's point: between the first batch and the rest
            expected = live.arrays["txns"].copy()
            copy, log, positions = snapshot_buffers(live, 4096)
            live.core.ring_snapshot_begin(copy, log, positions)
        if b >= 1 and steps[b % len(steps)]:
            # the checkpoint thread's share, a few entries at a time: most of the ring is still
            # to copy when the void, refund, cancel and reversal commands reach older entries
            live.core.ring_snapshot_copy(steps[b % len(steps)])
        a = live.apply_batch(requests, business_date=bd)
        t = twin.apply_batch(requests, business_date=bd)
        assert a.tobytes() == t.tobytes(), f"batch {b}: a snapshot changed an answer"
        history.extend(requests[i:i + 1].copy() for i in range(len(requests)) if requests[i]["cmd"] != Cmd.REVERSAL)
    if expected is None:
        return                                     # everything went into the first batch
    assert live.core.ring_snapshot_active
    count, exact = live.core.ring_snapshot_end()
    event(f"entries logged: {min(count, 3)}{'+' if count > 3 else ''}")
    assert exact and not live.core.ring_snapshot_active
    assert copy.tobytes() == expected.tobytes()
    for name in live.arrays:
        assert live.arrays[name].tobytes() == twin.arrays[name].tobytes(), f"{name}: the snapshot changed the state"


TARGETED = st.tuples(st.sampled_from(["purchase", "med", "refund", "void", "cancel", "reversal", "reversal",
                                       "reverse_undo"]),
                     st.integers(0, 2), st.integers(1, 40_000), st.integers(0, 1000))


def targeted(engine, kind, card, amount, pick, done, stan):
    """One request: a purchase or settlement by a named card, or a command aimed at an earlier
    approved message (by its actual RRN): the commands that change older ring entries."""
    pan = PANS[card]
    def earlier(cmd):
        matches = [(q, r) for q, r in done if int(q["cmd"][0]) == cmd]
        return matches[pick % len(matches)] if matches else None
    if kind == "purchase" or (kind in ("refund", "void") and earlier(Cmd.PURCHASE) is None):
        return request(engine, KEYS, Cmd.PURCHASE, pan=pan, terminal="T0000006", stan=stan,
                       amount_fen=amount, pin="888888")
    if kind == "med" or (kind == "cancel" and earlier(Cmd.MED_SETTLE) is None):
        return request(engine, KEYS, Cmd.MED_SETTLE, pan=pan, terminal="T0000001", stan=stan,
                       amount_fen=amount, is_fen=amount, med_type=11, flags=ReqFlag.AU)
    if kind in ("refund", "void", "cancel"):
        q0, r0 = earlier(Cmd.MED_SETTLE if kind == "cancel" else Cmd.PURCHASE)
        cmd = {"refund": Cmd.REFUND, "void": Cmd.VOID, "cancel": Cmd.MED_CANCEL}[kind]
        q = request(engine, KEYS, cmd, terminal="T0000001" if kind == "cancel" else "T0000006",
                    stan=stan, orig_rrn=int(r0["rrn"][0]),
                    amount_fen=amount % 3000 + 1 if kind == "refund" else int(q0["amount_fen"][0]))
        q["pan_hash"] = q0["pan_hash"]
        return q
    undo = [(q, r) for q, r in done if int(q["cmd"][0]) in (Cmd.VOID, Cmd.MED_CANCEL)]
    pool = undo if kind == "reverse_undo" and undo else done
    if not pool:
        return request(engine, KEYS, Cmd.BALANCE, pan=pan, terminal="T0000003", stan=stan, pin="888888")
    q0, _ = pool[pick % len(pool)]
    q = q0.copy()
    q["cmd"] = Cmd.REVERSAL
    q["flags"] &= np.uint8(~ReqFlag.PIN & 0xFF)
    q["idem_key"] ^= np.uint64(0x4000)            # MTI class 04 in the key
    return q


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(TARGETED, min_size=20, max_size=160), cuts=st.lists(st.integers(1, 12), min_size=2, max_size=14),
       snap_at=st.integers(1, 4), steps=st.lists(st.sampled_from([0, 0, 1, 2, 3, 5]), min_size=8, max_size=8),
       retention=st.sampled_from([16, 32]))
def test_ring_copy_with_in_place_changes_to_older_entries(ops, cuts, snap_at, steps, retention):
    """Aimed traffic: refunds, voids, cancels and reversals of earlier approved messages (and
    reversals of voids and cancels, which reopen their originals), on a ring that wraps."""
    live, twin = engine_with_genesis(retention), engine_with_genesis(retention)
    done, stan, position, b = [], 100_000, 0, 0
    copy = log = positions = expected = None
    for cut in cuts + [len(ops)]:
        chunk = ops[position:position + cut]
        position += cut
        if not chunk:
            break
        if b == snap_at:
            expected = live.arrays["txns"].copy()
            copy, log, positions = snapshot_buffers(live, 4096)
            live.core.ring_snapshot_begin(copy, log, positions)
        if expected is not None and steps[b % len(steps)]:
            live.core.ring_snapshot_copy(steps[b % len(steps)])
        rows = []
        for kind, card, amount, pick in chunk:
            stan += 1
            rows.append(targeted(live, kind, card, amount, pick, done, stan))
        requests = np.concatenate(rows)
        a = live.apply_batch(requests, business_date=20261124)
        t = twin.apply_batch(requests, business_date=20261124)
        assert a.tobytes() == t.tobytes(), f"batch {b}: a snapshot changed an answer"
        done.extend((requests[i:i + 1].copy(), a[i:i + 1].copy()) for i in range(len(requests))
                    if a[i]["code"] == 0x3030 and requests[i]["cmd"] != Cmd.REVERSAL)
        b += 1
    if expected is None:
        return
    count, exact = live.core.ring_snapshot_end()
    event(f"entries logged: {min(count, 3)}{'+' if count > 3 else ''}")
    assert exact
    assert copy.tobytes() == expected.tobytes()
    for name in live.arrays:
        assert live.arrays[name].tobytes() == twin.arrays[name].tobytes(), f"{name}: the snapshot changed the state"


def test_in_place_changes_before_the_copy_are_logged_and_patched():
    """A purchase, then (during the snapshot, before any copy step) its refund and its void's
    reversal path: the entries changed in place are logged once each, and the copy has them as
    they were."""
    engine = engine_with_genesis(1 << 10)
    purchase = bank(engine, Cmd.PURCHASE, 900001, 5000)
    first = engine.apply_batch(purchase, business_date=20261124)
    assert first["code"][0] == 0x3030
    rrn = int(first["rrn"][0])
    expected = engine.arrays["txns"].copy()
    copy, log, positions = snapshot_buffers(engine, 8)
    engine.core.ring_snapshot_begin(copy, log, positions)
    refund = bank(engine, Cmd.REFUND, 900002, 1200, orig_rrn=rrn)
    assert engine.apply_batch(refund, business_date=20261124)["code"][0] == 0x3030
    refund2 = bank(engine, Cmd.REFUND, 900003, 800, orig_rrn=rrn)
    assert engine.apply_batch(refund2, business_date=20261124)["code"][0] == 0x3030
    # the original's entry now says 2,000 fen refunded; the snapshot's point said 0
    mask = engine.arrays["txns"].shape[0] - 1
    assert int(engine.arrays["txns"][rrn & mask]["refunded_fen"]) == 2000
    count, exact = engine.core.ring_snapshot_end()
    assert (count, exact) == (2, True)             # logged before each change; the first one wins
    assert int(positions[0]) == int(positions[1]) == rrn & mask
    assert int(copy[rrn & mask]["refunded_fen"]) == 0
    assert copy.tobytes() == expected.tobytes()


def test_a_full_log_marks_the_snapshot_inexact():
    engine = engine_with_genesis(1 << 10)
    rrns = []
    for k in range(3):
        r = engine.apply_batch(bank(engine, Cmd.PURCHASE, 910001 + k, 100), business_date=20261124)
        assert r["code"][0] == 0x3030
        rrns.append(int(r["rrn"][0]))
    copy, log, positions = snapshot_buffers(engine, 2)
    engine.core.ring_snapshot_begin(copy, log, positions)
    for k, rrn in enumerate(rrns):
        q = bank(engine, Cmd.REFUND, 920001 + k, 10, orig_rrn=rrn)
        assert engine.apply_batch(q, business_date=20261124)["code"][0] == 0x3030
    assert engine.core.ring_snapshot_end() == (2, False)


def test_card_growth_during_a_snapshot_finishes_its_copy_first():
    engine = engine_with_genesis(64)
    expected = engine.arrays["txns"].copy()
    copy, log, positions = snapshot_buffers(engine, 16)
    engine.core.ring_snapshot_begin(copy, log, positions)
    engine.reserve(engine.card_capacity * 2)        # rebinds the core: the copy is completed now
    assert engine.core.ring_snapshot_active
    assert copy.tobytes() == expected.tobytes()
    assert engine.core.ring_snapshot_end() == (0, True)
    with pytest.raises(AssertionError):
        engine.core.ring_snapshot_end()             # none in progress
