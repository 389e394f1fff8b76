"""The transaction indexes rebuilt from the ring (rebuild_txn_indexes; a checkpoint does not
hold them) map every key to the entry the live indexes map it to, after any traffic, and an
engine loaded from arrays without them answers every later message as the live engine does.

The traffic wraps small rings several times and includes what makes the indexes' history
matter: duplicates (answered from the entry, never indexed twice), reversals of earlier
messages and of voids and cancels, reversals that arrive first (tombstones, which take a
reversal key over), and a (terminal, batch, STAN) used again on another day (a new idempotency
key, the same reversal key: the newer message takes the key over), whose first carrier the
ring then evicts while the newer one still owns the key.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from yikatong.engine import Cmd, ConfigError, Engine
from yikatong.engine import _core
from yikatong.engine.builders import request
from yikatong.engine.demo import demo_config
from yikatong.engine.state import DERIVED_ARRAYS, index_content, saved_arrays

from test_engine_model import KEYS, PANS, DATES, batches, op                 # same folder
from test_engine_ring_snapshot import engine_with_genesis, targeted, TARGETED


def index_pairs(engine, name):
    """The (key, ring position) pairs an index holds, whatever its layout."""
    used = index_content(engine.arrays[name])
    return list(zip(used["key"].tolist(), used["pos"].tolist()))


def loaded_from(engine):
    """An engine made as a checkpoint load makes it: the arrays without the derived ones."""
    return Engine(demo_config(), arrays={name: a.copy() for name, a in saved_arrays(engine.arrays).items()})


def assert_same_indexes(live, loaded):
    for name in DERIVED_ARRAYS:
        assert index_pairs(loaded, name) == index_pairs(live, name), name
    same = all(loaded.arrays[n].tobytes() == live.arrays[n].tobytes() for n in DERIVED_ARRAYS)
    event(f"rebuilt layout byte-identical: {same}")


REUSE = st.tuples(st.sampled_from(["again_other_day", "again_other_day", "orphan_reversal", "late_original"]),
                  st.integers(0, 2), st.integers(1, 40_000), st.integers(0, 1000))


def reuse(engine, kind, card, amount, pick, done, stan, day):
    """A purchase under an earlier message's (terminal, batch, STAN) on another day (a new
    idempotency key, its reversal key taken over), a reversal of a purchase never sent (a
    tombstone), or that purchase arriving after it (declined 25)."""
    if kind == "again_other_day" and done:
        q0, _ = done[pick % len(done)]
        return request(engine, KEYS, Cmd.PURCHASE, pan=PANS[card], terminal="T0000006", amount_fen=amount,
                       stan=int(q0["stan"][0]), batch_no=int(q0["batch_no"][0]), local_date=1124 + day,
                       pin="888888")
    orphan = 500_000 + pick
    q = request(engine, KEYS, Cmd.PURCHASE, pan=PANS[card], terminal="T0000006", amount_fen=amount,
                stan=orphan, pin=None if kind == "orphan_reversal" else "888888")
    if kind == "orphan_reversal":
        q["cmd"] = Cmd.REVERSAL
        q["idem_key"] ^= np.uint64(0x4000)
    return q


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.one_of(TARGETED, REUSE), min_size=20, max_size=200),
       cuts=st.lists(st.integers(1, 12), min_size=2, max_size=16),
       load_at=st.integers(0, 6), retention=st.sampled_from([16, 32]))
def test_indexes_rebuilt_from_the_ring_answer_as_the_live_ones(ops, cuts, load_at, retention):
    live = engine_with_genesis(retention)
    loaded = None
    done, stan, position, b, day = [], 100_000, 0, 0, 0
    for cut in cuts + [len(ops)]:
        chunk = ops[position:position + cut]
        position += cut
        if not chunk:
            break
        if b == load_at:
            loaded = loaded_from(live)               # a checkpoint here, loaded
        rows = []
        for kind, card, amount, pick in chunk:
            stan += 1
            if kind in ("again_other_day", "orphan_reversal", "late_original"):
                day += 1
                rows.append(reuse(live, kind, card, amount, pick, done, stan, day))
            else:
                rows.append(targeted(live, kind, card, amount, pick, done, stan))
        requests = np.concatenate(rows)
        a = live.apply_batch(requests, business_date=20261124)
        if loaded is not None:
            assert loaded.apply_batch(requests, business_date=20261124).tobytes() == a.tobytes(), \
                f"batch {b}: the engine with rebuilt indexes answered differently"
        assert_same_indexes(live, loaded_from(live))
        done.extend((requests[i:i + 1].copy(), a[i:i + 1].copy()) for i in range(len(requests))
                    if a[i]["code"] == 0x3030 and requests[i]["cmd"] != Cmd.REVERSAL)
        b += 1
    if loaded is not None:
        for name in saved_arrays(live.arrays):
            assert loaded.arrays[name].tobytes() == live.arrays[name].tobytes(), name


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=5, max_size=150), cuts=st.lists(st.integers(1, 30), min_size=1, max_size=8),
       date_picks=st.lists(st.integers(0, len(DATES) - 1), min_size=8, max_size=8),
       retention=st.sampled_from([16, 64]))
def test_indexes_rebuilt_after_every_kind_of_message(ops, cuts, date_picks, retention):
    """The model test's whole command mix (money in, card lifecycle, PINs, policies) on a ring
    that wraps: after each batch the rebuilt indexes hold the live ones' pairs."""
    live = engine_with_genesis(retention)
    pans, history, stan_counter = list(PANS), [], [0]
    for b, requests, bd in batches(live, ops, cuts, date_picks, history, stan_counter, pans):
        live.apply_batch(requests, business_date=bd)
        assert_same_indexes(live, loaded_from(live))
        history.extend(requests[i:i + 1].copy() for i in range(len(requests)) if requests[i]["cmd"] != Cmd.REVERSAL)


def test_a_reversal_key_taken_over_and_its_first_carrier_evicted():
    """Exact case: a purchase at STAN 7, the same (terminal, batch, STAN) again on the next day
    (its reversal key now the second's), the ring wrapped past the first: the rebuilt index
    maps the key to the second, and a reversal reverses the second on both engines."""
    live = engine_with_genesis(16)
    first = request(live, KEYS, Cmd.PURCHASE, pan=PANS[0], terminal="T0000006", amount_fen=1000, stan=7,
                    pin="888888")
    second = request(live, KEYS, Cmd.PURCHASE, pan=PANS[0], terminal="T0000006", amount_fen=2000, stan=7,
                     local_date=1125, pin="888888")
    def balances(count, stan):
        for k in range(count):
            q = request(live, KEYS, Cmd.BALANCE, pan=PANS[1], terminal="T0000003", stan=stan + k, pin="888888")
            assert live.apply_batch(q, business_date=20261124)["code"][0] == 0x3030
    r1 = live.apply_batch(first, business_date=20261124)                 # RRN 1
    balances(5, 100)                                                        # RRNs 2-6
    r2 = live.apply_batch(second, business_date=20261124)                # RRN 7
    assert (r1["code"][0], r2["code"][0]) == (0x3030, 0x3030)
    rev_key = int(live.arrays["txns"][int(r1["rrn"][0]) & 15]["rev_key"])
    assert rev_key == int(live.arrays["txns"][int(r2["rrn"][0]) & 15]["rev_key"]) != 0
    # both carriers live: the newer owns the key, in the live index and in the rebuilt one
    assert dict(index_pairs(live, "rev_index"))[rev_key] == int(r2["rrn"][0]) & 15
    assert index_pairs(loaded_from(live), "rev_index") == index_pairs(live, "rev_index")
    # RRNs 8-17: the ring (16) evicts the first purchase and keeps the second (and the reversal,
    # RRN 18, evicts a balance inquiry)
    balances(10, 200)
    ring = live.arrays["txns"]
    assert int(r1["rrn"][0]) not in ring["rrn"].tolist() and int(r2["rrn"][0]) in ring["rrn"].tolist()
    loaded = loaded_from(live)
    assert dict(index_pairs(loaded, "rev_index"))[rev_key] == int(r2["rrn"][0]) & 15
    assert index_pairs(loaded, "rev_index") == index_pairs(live, "rev_index")
    reversal = second.copy()
    reversal["cmd"] = Cmd.REVERSAL
    reversal["idem_key"] ^= np.uint64(0x4000)
    a = live.apply_batch(reversal, business_date=20261124)
    assert a["code"][0] == 0x3030 and int(a["orig_rrn"][0]) == int(r2["rrn"][0])
    assert loaded.apply_batch(reversal, business_date=20261124).tobytes() == a.tobytes()


def test_a_ring_holding_one_idempotency_key_twice_is_refused():
    live = engine_with_genesis(16)
    for k in range(2):
        q = request(live, KEYS, Cmd.BALANCE, pan=PANS[1], terminal="T0000003", stan=200 + k, pin="888888")
        assert live.apply_batch(q, business_date=20261124)["code"][0] == 0x3030
    arrays = {name: a.copy() for name, a in saved_arrays(live.arrays).items()}
    last = int(arrays["meta"][0])
    arrays["txns"][last & 15]["idem_key"] = arrays["txns"][(last - 1) & 15]["idem_key"]
    with pytest.raises(ConfigError, match="1 idempotency key"):
        Engine(demo_config(), arrays=arrays)


def test_rebuild_refuses_indexes_of_the_wrong_size():
    live = engine_with_genesis(16)
    arrays = dict(live.arrays)
    arrays["rev_index"] = arrays["rev_index"][:16].copy()
    with pytest.raises(ValueError, match="16 buckets for a ring of 16"):
        _core.rebuild_txn_indexes(arrays)
