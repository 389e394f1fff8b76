"""The settlement fast path (engine/_core.pyx: settle_row) against the generic path.

Two engines from the same configuration and the same genesis get the same batches; one runs
medical settlements through settle_row (the default), the other through the generic path only
(`Core.fast_settle = False`). Every result row and every state array must be identical, byte for
byte, after every batch: mixed batches of settlements and every other command (the property
test's random commands), and a bench-like batch with duplicates, reversals before and after
their originals, PINs, platform-computed funds, New Year and expired cards spliced in.
`Core.fast_rows` shows that the fast path did answer rows itself (and did not hand them all on).
"""
import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from yikatong.engine import Cmd, Engine, ReqFlag
from yikatong.engine.demo import demo_config, genesis_batches, NAMED_CARDS
from yikatong.engine.workload import generated_pan_hashes, medical_settlements

from test_engine_model import GENERATED, KEYS, PANS, SPARE_SLOTS, DATES, batches, op   # same folder


def twin_engines(config, capacity, retention, generated):
    fast = Engine(config, card_capacity=capacity, txn_retention_count=retention)
    slow = Engine(config, card_capacity=capacity, txn_retention_count=retention)
    slow.core.fast_settle = False
    assert fast.core.fast_settle and not slow.core.fast_settle
    for batch in genesis_batches(KEYS, generated):
        fast.apply_batch(batch, business_date=20261124)
        slow.apply_batch(batch, business_date=20261124)
    return fast, slow


def assert_same(fast, slow, requests, bd, where=""):
    a = fast.apply_batch(requests, business_date=bd)
    b = slow.apply_batch(requests, business_date=bd)
    if a.tobytes() != b.tobytes():
        diff = [i for i in range(len(a)) if a[i].tobytes() != b[i].tobytes()]
        raise AssertionError(f"{where}: result rows differ at {diff[:5]} (cmd "
                             f"{[int(requests[i]['cmd']) for i in diff[:5]]}): fast {a[diff[0]]} generic {b[diff[0]]}")
    assert fast.arrays.keys() == slow.arrays.keys()
    for name in fast.arrays:
        assert fast.arrays[name].tobytes() == slow.arrays[name].tobytes(), f"{where}: state array {name} differs"
    return a


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=10, max_size=150), cuts=st.lists(st.integers(1, 40), min_size=1, max_size=8),
       date_picks=st.lists(st.integers(0, len(DATES) - 1), min_size=8, max_size=8),
       aid_cap_fen=st.sampled_from([0, 2500]), retention=st.sampled_from([16, 4096]))
def test_fast_path_matches_generic_on_mixed_batches(ops, cuts, date_picks, aid_cap_fen, retention):
    import msgspec
    config = demo_config()
    config = msgspec.structs.replace(config, limits=msgspec.structs.replace(
        config.limits, family_aid_per_settlement_fen_max=aid_cap_fen))
    fast, slow = twin_engines(config, len(NAMED_CARDS) + GENERATED + SPARE_SLOTS, retention, GENERATED)
    pans, history, stan_counter = list(PANS), [], [0]
    for b, requests, bd in batches(fast, ops, cuts, date_picks, history, stan_counter, pans):
        assert_same(fast, slow, requests, bd, f"batch {b}")
        history.extend(requests[i:i + 1].copy() for i in range(len(requests)) if requests[i]["cmd"] != Cmd.REVERSAL)
    assert slow.core.fast_rows == 0


def spliced_workload(engine, pan_hashes, count, seed):
    """Generated settlements with the unusual cases spliced in at random rows."""
    rng = np.random.default_rng(seed)
    q = medical_settlements(engine, pan_hashes, count, seed=seed, first_stan=1 + seed * count)
    n = count
    pick = lambda k: rng.choice(n, k, replace=False)     # noqa: E731
    # duplicates (same content: the stored answer; other content: 94) of earlier rows
    for i in pick(n // 50):
        j = int(rng.integers(0, max(i, 1)))
        q[i] = q[j]
        if rng.random() < 0.3:
            q[i]["content_hash"] ^= np.uint64(1)
    # reversals: of an earlier row (reverses it), of a later one (tombstone, the original gets 25)
    for i in pick(n // 50):
        j = int(rng.integers(0, n))
        q[i] = q[j]
        q[i]["cmd"] = Cmd.REVERSAL
        q[i]["idem_key"] ^= np.uint64(0x4000)
    # a PIN given (right or wrong), a platform fund (sometimes > IS: 13), pharmacy visit at a
    # hospital (58), an unknown card (14), an unknown visit type (12), broken claim identity (13),
    # a pre-decided code, no AU, a medical cancel of an earlier row, a pre-settlement
    for i in pick(n // 100):
        q[i]["flags"] |= ReqFlag.PIN
        q[i]["pin_pvv"] = rng.integers(0, 2 ** 32)
    for i in pick(n // 100):
        q[i]["flags"] |= ReqFlag.FP
        q[i]["fp_fen"] = q[i]["is_fen"] * int(rng.integers(0, 12)) // 10
    q["med_type"][pick(n // 200)] = 41
    q["pan_hash"][pick(n // 200)] = 12345
    q["med_type"][pick(n // 200)] = 99
    q["fo_fen"][pick(n // 200)] += 1
    q["pre_code"][pick(n // 200)] = 0x3739
    q["flags"][pick(n // 20)] &= np.uint8(~ReqFlag.AU & 0xFF)
    q["amount_fen"][pick(n // 500)] = -1
    for i in pick(n // 100):
        q[i]["cmd"] = Cmd.MED_CANCEL
        q[i]["orig_rrn"] = int(rng.integers(1, 2 * n))
    q["cmd"][pick(n // 100)] = Cmd.MED_PRESETTLE
    return q


def test_fast_path_matches_generic_on_a_spliced_bench_batch():
    cards = 300
    config = demo_config()
    fast, slow = twin_engines(config, len(NAMED_CARDS) + cards, 1 << 12, cards)
    pan_hashes = np.concatenate([generated_pan_hashes(KEYS, cards),
                                 np.array([KEYS.pan_hash(p) for p, *_ in NAMED_CARDS], dtype=np.uint64)])
    # some cards expired, temporarily lost (lapsing), stolen, not activated; one with a payer
    for arrays in (fast.arrays, slow.arrays):
        arrays["side"]["expiry_yymm"][[20, 21]] = 2610
        arrays["cards"]["status"][[30, 31]] = [3, 1]
        arrays["temp_loss_until"][30] = 20261125
        arrays["cards"]["card_flags"][32] |= 4
    fast.core.bind(fast.arrays)
    slow.core.bind(slow.arrays)
    slow.core.fast_settle = False
    total = 0
    # the ring (4096) wraps: entries are evicted; the year changes (accumulators start again)
    for b, bd in enumerate((20261124, 20261124, 20261126, 20261231, 20270101, 20270101)):
        q = spliced_workload(fast, pan_hashes, 3000, seed=b)
        r = assert_same(fast, slow, q, bd, f"batch {b} ({bd})")
        total += len(q)
        assert len(np.unique(r["code"])) >= 8
    assert fast.core.fast_rows > total // 2
    assert slow.core.fast_rows == 0


def test_fast_path_with_bands_not_sorted():
    """A policy whose band upper ends decrease (legal, if odd): the early stop of the band loop
    must not be used (Core.bind checks), and the answers stay the generic path's."""
    import msgspec
    from yikatong.engine.config import Band
    config = demo_config()
    policies = list(config.policies)
    policies[0] = msgspec.structs.replace(policies[0], bands=[Band(8500, 3000000), Band(9000, 1000), Band(9500)])
    config = msgspec.structs.replace(config, policies=policies)
    cards = 50
    fast, slow = twin_engines(config, len(NAMED_CARDS) + cards, 1 << 12, cards)
    q = medical_settlements(fast, generated_pan_hashes(KEYS, cards), 2000, seed=7)
    assert_same(fast, slow, q, 20261124)
    assert fast.core.fast_rows > 1000
