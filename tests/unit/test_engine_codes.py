"""Result codes in their documented precedence (docs/result-codes.md), bad input, duplicates,
reversals, voids, refunds, cancels — each rejection leaves the card state untouched."""
import logging

import numpy as np
import pytest

from yikatong.engine import (BatchShapeError, Cmd, REQUEST_DTYPE, RESULT_DTYPE, ResFlag, new_requests,
                             rc, rc_str)
from yikatong.engine.builders import medical, request

BD = 20261124
CLAIM = (5000000, 300000, 50000, 100000, 4550000)
PAN = "6214830000000017"


def apply(engine, q, bd=BD):
    return engine.apply_batch(q, business_date=bd)[0]


def code(engine, q, bd=BD):
    return rc_str(apply(engine, q, bd)["code"])


def card_state(engine):
    return {k: v.copy() for k, v in engine.arrays.items() if k not in ("txns", "idem_index", "rev_index", "meta")}


def assert_untouched(engine, before):
    for name, column in before.items():
        assert (engine.arrays[name] == column).all(), name


# ---- bad arrays ---------------------------------------------------------------------------------

def test_wrong_dtype_names_array_and_expected_dtype(demo):
    engine, _ = demo
    with pytest.raises(BatchShapeError) as e:
        engine.apply_batch(np.zeros(3, dtype=np.int64), business_date=BD)
    assert str(e.value) == "requests: expecting dtype REQUEST_DTYPE (160 bytes), found int64 (8 bytes)"
    with pytest.raises(BatchShapeError) as e:
        engine.apply_batch(new_requests(2), np.zeros(2, dtype=REQUEST_DTYPE), business_date=BD)
    assert str(e.value) == "results: expecting dtype RESULT_DTYPE (128 bytes), found " \
        f"{REQUEST_DTYPE} (160 bytes)"
    with pytest.raises(BatchShapeError, match=r"requests: expecting a 1-dimensional C-contiguous array, found shape \(2, 2\)"):
        engine.apply_batch(np.zeros((2, 2), dtype=REQUEST_DTYPE), business_date=BD)
    with pytest.raises(BatchShapeError, match="requests: expecting a numpy array of dtype REQUEST_DTYPE, found list"):
        engine.apply_batch([1, 2], business_date=BD)
    with pytest.raises(BatchShapeError, match="results: 1 rows for 2 requests"):
        engine.apply_batch(new_requests(2), np.zeros(1, dtype=RESULT_DTYPE), business_date=BD)
    with pytest.raises(BatchShapeError, match="business_date: 261124, expecting YYYYMMDD"):
        engine.apply_batch(new_requests(1), business_date=261124)


# ---- amounts --------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("amount_fen", -1), ("amount_fen", 10 ** 12), ("is_fen", -5),
                                         ("fp_fen", 2 ** 62), ("fo_fen", 2 ** 63 - 1)])
def test_negative_or_overflowing_amounts_are_13_before_arithmetic(demo, field, value):
    engine, keys = demo
    before = card_state(engine)
    q = medical(engine, keys, PAN, "T0000001", *CLAIM)
    q[field] = value
    assert code(engine, q) == "13"
    assert_untouched(engine, before)


def test_purchase_amount_over_limit_is_61(demo):
    from yikatong.engine import Engine
    from yikatong.engine.demo import demo_config, genesis_batches
    config = demo_config()
    config.limits.purchase_fen_max = 100000
    _, keys = demo
    engine = Engine(config, card_capacity=20)
    for batch in genesis_batches(keys, 0):
        engine.apply_batch(batch, business_date=BD)
    assert code(engine, request(engine, keys, Cmd.PURCHASE, pan=PAN, terminal="T0000006", amount_fen=100001, pin="888888")) == "61"
    assert code(engine, request(engine, keys, Cmd.PURCHASE, pan=PAN, terminal="T0000006", amount_fen=100000, pin="888888")) == "00"


# ---- precedence -------------------------------------------------------------------------------

def test_precedence_order(demo):
    """Each row breaks one more rule than the next: the earliest rule answers."""
    engine, keys = demo
    base = lambda **kw: medical(engine, keys, "6214830000000058", "T0000001", *CLAIM, **kw)  # a lost card
    q = base()
    q["pre_code"] = rc("A0")
    q["terminal_index"] = 9999
    assert code(engine, q) == "A0"                          # 1. decided before the engine
    q = base()
    q["cmd"] = 30
    q["terminal_index"] = 9999
    assert code(engine, q) == "12"                          # 2. unknown command
    q = base()
    q["terminal_index"] = 9999
    q["amount_fen"] = -1
    assert code(engine, q) == "97"                          # 3. unregistered terminal
    q = base()
    q["institution_index"] = engine.institution_index["H31000000000001"]
    q["amount_fen"] = -1
    assert code(engine, q) == "03"                          # 4. institution not the terminal's
    q = medical(engine, keys, "6214830000000058", "T0000005", *CLAIM)
    q["amount_fen"] = -1
    assert code(engine, q) == "13"                          # 5. amounts before permission
    q = medical(engine, keys, "6214830000000058", "T0000005", *CLAIM)
    assert code(engine, q) == "58"                          # 6. not at a bank counter
    q = base()
    assert code(engine, q) == "41"                          # 9. lost card
    q = medical(engine, keys, "6214830000000090", "T0000001", *CLAIM)
    assert code(engine, q) == "14"                          # 9. unknown card before anything about it


def test_unknown_card_before_lost_before_funds(demo):
    engine, keys = demo
    assert code(engine, request(engine, keys, Cmd.WITHDRAW, pan="6214830000000090", terminal="T0000005", amount_fen=10 ** 9, pin="888888")) == "14"
    assert code(engine, request(engine, keys, Cmd.WITHDRAW, pan="6214830000000058", terminal="T0000005", amount_fen=10 ** 9, pin="888888")) == "41"
    assert code(engine, request(engine, keys, Cmd.WITHDRAW, pan=PAN, terminal="T0000005", amount_fen=10 ** 9, pin="000000")) == "55"
    assert code(engine, request(engine, keys, Cmd.WITHDRAW, pan=PAN, terminal="T0000005", amount_fen=10 ** 9, pin="888888")) == "51"


def test_no_policy_is_12_with_a_configuration_warning(demo, caplog):
    """A card whose (region, type, …) has no policy: 12 and a logged warning, never a crash."""
    from yikatong.engine import Engine
    from yikatong.engine.demo import demo_config, genesis_batches
    config = demo_config()
    config.policies = [p for p in config.policies if p.name != "BJ-E-IN"]
    _, keys = demo
    engine = Engine(config, card_capacity=20)
    for batch in genesis_batches(keys, 0):
        engine.apply_batch(batch, business_date=BD)
    before = card_state(engine)
    with caplog.at_level(logging.WARNING, logger="yikatong.engine"):
        r = apply(engine, medical(engine, keys, PAN, "T0000001", *CLAIM))
    assert rc_str(r["code"]) == "12"
    assert r["outcome_flags"] & ResFlag.NO_POLICY
    assert "1 settlement(s) found no policy" in caplog.text and "Remedy: add the policy" in caplog.text
    assert_untouched(engine, before)


def test_bank_counter_and_merchant_permissions(demo):
    engine, keys = demo
    assert code(engine, request(engine, keys, Cmd.DEPOSIT, pan=PAN, terminal="T0000006", amount_fen=100)) == "58"
    assert code(engine, request(engine, keys, Cmd.PURCHASE, pan=PAN, terminal="T0000005", amount_fen=100, pin="888888")) == "58"
    assert code(engine, request(engine, keys, Cmd.BALANCE, pan=PAN, terminal="T0000005", pin="888888")) == "00"
    assert code(engine, request(engine, keys, Cmd.BALANCE, pan=PAN, terminal="T0000005")) == "55"


# ---- duplicates, reversals, originals ----------------------------------------------------------

def test_duplicate_same_content_answers_again_without_effect(demo):
    engine, keys = demo
    q = medical(engine, keys, PAN, "T0000001", *CLAIM)
    first = apply(engine, q)
    balances = engine.balances(first["card_slot"])
    again = apply(engine, q)
    assert again["outcome_flags"] & ResFlag.DUPLICATE
    assert (rc_str(again["code"]), again["rrn"], again["fund_fen"], again["fin_leg_fen"]) == \
        ("00", first["rrn"], 3862000, 938000)
    assert engine.balances(first["card_slot"]) == balances
    other = q.copy()
    other["content_hash"] ^= 1
    assert code(engine, other) == "94"
    assert engine.balances(first["card_slot"]) == balances


def test_reversal_restores_every_leg_and_accumulator(demo):
    engine, keys = demo
    slot = engine.slot_of(keys.pan_hash(PAN))
    before = card_state(engine)
    q = medical(engine, keys, PAN, "T0000001", *CLAIM, stan=777)
    assert code(engine, q) == "00"
    rev = request(engine, keys, Cmd.REVERSAL, pan=PAN, terminal="T0000001", stan=777, amount_fen=CLAIM[0])
    r = apply(engine, rev)
    assert rc_str(r["code"]) == "00"
    assert (r["fund_fen"], r["ins_leg_fen"], r["fin_leg_fen"]) == (-3862000, -200000, -938000)
    after = card_state(engine)
    after["side"]["acc_year"] = before["side"]["acc_year"]   # the year the accumulators belong to was set
    for name, column in before.items():
        assert (after[name] == column).all(), name
    assert apply(engine, rev)["outcome_flags"] & ResFlag.DUPLICATE   # a second reversal: first answer
    r2 = rev.copy()
    r2["content_hash"] ^= 1                           # field 39 differs: still the same key
    r2["idem_key"] ^= 2
    assert code(engine, r2) == "00"
    assert engine.balances(slot) == (200000, 2000000)
    # and the next admission is a first admission again
    assert apply(engine, medical(engine, keys, PAN, "T0000001", *CLAIM))["deductible_fen"] == 130000


def test_reversal_of_unknown_tombstones_then_original_is_25(demo):
    engine, keys = demo
    rev = request(engine, keys, Cmd.REVERSAL, pan=PAN, terminal="T0000001", stan=4242)
    r = apply(engine, rev)
    assert rc_str(r["code"]) == "00" and r["outcome_flags"] & ResFlag.TOMBSTONE
    late = medical(engine, keys, PAN, "T0000001", *CLAIM, stan=4242)
    assert code(engine, late) == "25"
    assert engine.balances(engine.slot_of(keys.pan_hash(PAN))) == (200000, 2000000)
    assert code(engine, late) == "25"                # and again, as a duplicate


def test_void_refund_and_their_limits(demo):
    engine, keys = demo
    p = apply(engine, request(engine, keys, Cmd.PURCHASE, pan=PAN, terminal="T0000006", amount_fen=50000, pin="888888"))
    slot = int(p["card_slot"])
    assert engine.balances(slot) == (200000, 1950000)
    refund = lambda amount: request(engine, keys, Cmd.REFUND, pan=PAN, terminal="T0000006", amount_fen=amount,
                                    orig_rrn=int(p["rrn"]))
    assert code(engine, refund(30000)) == "00"
    assert code(engine, refund(20001)) == "64"       # cumulative refunds up to the original
    assert code(engine, refund(20000)) == "00"
    assert engine.balances(slot) == (200000, 2000000)
    void = request(engine, keys, Cmd.VOID, pan=PAN, terminal="T0000006", amount_fen=50000, orig_rrn=int(p["rrn"]))
    assert code(engine, void) == "12"                # refunded: no longer voidable
    p2 = apply(engine, request(engine, keys, Cmd.PURCHASE, pan=PAN, terminal="T0000006", amount_fen=7000, pin="888888"))
    assert code(engine, request(engine, keys, Cmd.VOID, pan=PAN, terminal="T0000006", amount_fen=6999, orig_rrn=int(p2["rrn"]))) == "64"
    assert code(engine, request(engine, keys, Cmd.VOID, pan=PAN, terminal="T0000006", amount_fen=7000, orig_rrn=int(p2["rrn"])), bd=20261125) == "12"
    assert code(engine, request(engine, keys, Cmd.VOID, pan=PAN, terminal="T0000006", amount_fen=7000, orig_rrn=int(p2["rrn"]))) == "00"
    assert code(engine, request(engine, keys, Cmd.VOID, pan=PAN, terminal="T0000006", amount_fen=7000, orig_rrn=int(p2["rrn"]))) == "12"
    assert code(engine, request(engine, keys, Cmd.VOID, pan=PAN, terminal="T0000006", amount_fen=7000, orig_rrn=999999)) == "25"
    assert engine.balances(slot) == (200000, 2000000)


def test_cancel_restores_accumulators_and_cannot_repeat(demo):
    engine, keys = demo
    a = apply(engine, medical(engine, keys, PAN, "T0000001", *CLAIM))
    cancel = request(engine, keys, Cmd.MED_CANCEL, pan=PAN, terminal="T0000001", amount_fen=CLAIM[0], orig_rrn=int(a["rrn"]))
    c = apply(engine, cancel)
    assert rc_str(c["code"]) == "00"
    assert (c["fund_fen"], c["deductible_fen"], c["ins_leg_fen"], c["fin_leg_fen"]) == (-3862000, -130000, -200000, -938000)
    assert engine.balances(a["card_slot"]) == (200000, 2000000)
    again = request(engine, keys, Cmd.MED_CANCEL, pan=PAN, terminal="T0000001", amount_fen=CLAIM[0], orig_rrn=int(a["rrn"]))
    assert code(engine, again) == "12"
    # the admission was given back: the next one is a first admission (deductible 1,300)
    assert apply(engine, medical(engine, keys, PAN, "T0000001", *CLAIM))["deductible_fen"] == 130000


def test_presettlement_posts_nothing(demo):
    engine, keys = demo
    before = card_state(engine)
    r = apply(engine, medical(engine, keys, PAN, "T0000001", *CLAIM, post=False))
    assert (rc_str(r["code"]), r["fund_fen"], r["ins_leg_fen"], r["fin_leg_fen"]) == ("00", 3862000, 200000, 938000)
    assert (r["ins_balance_fen"], r["fin_balance_fen"]) == (0, 1062000)     # as if posted
    assert_untouched(engine, before)


def test_deposit_withdraw_transfer(demo):
    engine, keys = demo
    dst = "6214830000000025"
    assert code(engine, request(engine, keys, Cmd.DEPOSIT, pan=PAN, terminal="T0000005", amount_fen=1000)) == "00"
    assert code(engine, request(engine, keys, Cmd.WITHDRAW, pan=PAN, terminal="T0000005", amount_fen=2001000, pin="888888")) == "00"
    assert code(engine, request(engine, keys, Cmd.WITHDRAW, pan=PAN, terminal="T0000005", amount_fen=1, pin="888888")) == "51"
    t = apply(engine, request(engine, keys, Cmd.TRANSFER, pan=dst, terminal="T0000005", amount_fen=5000, pin="888888", pan2=PAN))
    assert rc_str(t["code"]) == "00" and t["other_balance_fen"] == 5000
    assert code(engine, request(engine, keys, Cmd.TRANSFER, pan=dst, terminal="T0000005", amount_fen=1, pin="888888", pan2="6214830000000066")) == "57"
    assert code(engine, request(engine, keys, Cmd.TRANSFER, pan=dst, terminal="T0000005", amount_fen=1, pin="888888", pan2="6214830000000090")) == "14"
    assert engine.balances(engine.slot_of(keys.pan_hash(dst))) == (200000, 1995000)
