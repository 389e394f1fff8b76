"""Random command sequences through the Cython engine and the pure-Python reference model:
every result row and every card's state must agree, and DESIGN.md §6 invariants 1–5 must hold
after every batch."""
import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from yikatong.engine import Cmd, Engine, ReqFlag, ResFlag, rc, RESULT_DTYPE
from yikatong.engine.builders import request
from yikatong.engine.cardkeys import CardKeys, DEMO_DATA_KEY
from yikatong.engine.demo import demo_config, genesis_batches, generated_pans, NAMED_CARDS
from yikatong.engine.reference import Reference

KEYS = CardKeys(DEMO_DATA_KEY)
GENERATED = 6
PANS = [c[0] for c in NAMED_CARDS] + [p.decode() for p in generated_pans(0, GENERATED).view("S16").ravel()] \
    + ["6214830000009999"]                       # unknown card
MED_TERMINALS = ["T0000001", "T0000002", "T0000003", "T0000007"]
KINDS = ["med", "med", "med", "presettle", "cancel", "purchase", "purchase", "void", "refund",
         "deposit", "withdraw", "transfer", "reversal", "reversal", "balance", "repeat", "repeat_other",
         "bind", "unbind", "pharmacy"]
LIFECYCLE = {"activate_social": Cmd.ACTIVATE_SOCIAL, "activate_fin": Cmd.ACTIVATE_FIN,
             "temp_loss": Cmd.TEMP_LOSS, "formal_loss": Cmd.FORMAL_LOSS, "unloss": Cmd.UNLOSS,
             "replace": Cmd.REPLACE, "cancel_card": Cmd.CANCEL_CARD, "pin_change": Cmd.PIN_CHANGE,
             "pin_reset": Cmd.PIN_RESET, "pin_unlock": Cmd.PIN_UNLOCK, "credit_fin": Cmd.CREDIT_FIN,
             "credit_ins": Cmd.CREDIT_INS}
KINDS += list(LIFECYCLE)
SPARE_SLOTS = 64
DATES = [20261124, 20261124, 20261125, 20261231, 20270101]

op = st.tuples(
    st.sampled_from(KINDS),
    st.integers(0, len(PANS) - 1),                                 # card
    st.one_of(st.integers(0, 300_000), st.integers(0, 30_000_000)),  # amount
    st.integers(0, 255),                                           # random bits: flags, PIN, splits
    st.integers(0, 10_000),                                        # reference to an earlier message
)


def build(engine, op_tuple, history, stan_counter, pans):
    kind, card, amount, bits, ref = op_tuple
    pan = pans[card % len(pans)]
    pin = [None, "888888", "000000", "147258"][bits & 3]
    stan_counter[0] += 1
    stan = stan_counter[0]
    if kind in ("med", "presettle", "pharmacy"):
        fo = amount * ((bits >> 2) & 3) // 20
        ol = amount * ((bits >> 4) & 1) // 50
        ps = amount * ((bits >> 5) & 1) // 30
        in_scope = amount - fo - ol - ps + (1 if bits & 0x80 and bits & 0x40 else 0)   # sometimes broken (13)
        flags = (ReqFlag.AU if bits & 0x40 or not bits & 0x80 else 0) | (ReqFlag.PA if bits & 0x10 else 0)
        fp = {}
        if bits & 0x20 and bits & 0x08:
            flags |= ReqFlag.FP
            fp = {"fp_fen": in_scope * ((bits >> 1) & 7) // 6}           # > IS sometimes (13)
        med_type = 41 if kind == "pharmacy" else [21, 11, 14, 21][(bits >> 6) & 3]
        terminal = "T0000004" if kind == "pharmacy" else MED_TERMINALS[ref % 4]
        return request(engine, KEYS, Cmd.MED_PRESETTLE if kind == "presettle" else Cmd.MED_SETTLE,
                       pan=pan, terminal=terminal, amount_fen=amount, stan=stan, fo_fen=fo, ol_fen=ol,
                       ps_fen=ps, is_fen=in_scope, med_type=med_type, flags=flags, pin=pin if bits & 0x80 else None, **fp)
    if kind in ("cancel", "void", "refund"):
        cmd = {"cancel": Cmd.MED_CANCEL, "void": Cmd.VOID, "refund": Cmd.REFUND}[kind]
        terminal = "T0000001" if kind == "cancel" else "T0000006"
        if history:
            orig = history[ref % len(history)][0]
            pan_used = pan if bits & 0x80 else None
            q = request(engine, KEYS, cmd, terminal=terminal, stan=stan,
                        amount_fen=int(orig["amount_fen"]) if kind != "refund" else amount % 200000,
                        orig_rrn=ref % 40 + 1)
            q["pan_hash"] = orig["pan_hash"] if pan_used is None else KEYS.pan_hash(pan_used)
            return q
        return request(engine, KEYS, cmd, pan=pan, terminal=terminal, stan=stan, amount_fen=amount, orig_rrn=ref % 40 + 1)
    if kind in ("purchase", "deposit", "withdraw", "transfer", "balance"):
        cmd = {"purchase": Cmd.PURCHASE, "deposit": Cmd.DEPOSIT, "withdraw": Cmd.WITHDRAW,
               "transfer": Cmd.TRANSFER, "balance": Cmd.BALANCE}[kind]
        terminal = {"purchase": "T0000006", "balance": "T0000003"}.get(kind, "T0000005")
        extra = {"pan2": PANS[ref % len(PANS)]} if kind == "transfer" else {}
        return request(engine, KEYS, cmd, pan=pan, terminal=terminal, stan=stan,
                       amount_fen=amount // 10 if kind != "balance" else 0, pin=pin, **extra)
    if kind == "reversal":
        if history and bits & 1:
            q = history[ref % len(history)].copy()
            q["cmd"] = Cmd.REVERSAL
            q["flags"] &= np.uint8(~ReqFlag.PIN & 0xFF)
            q["idem_key"] ^= np.uint64(0x4000)        # MTI class 04 in the key        # MTI class 04 in the key
            return q
        # a reversal of something not (yet) seen: tombstones (terminal, batch, stan + 1)
        return request(engine, KEYS, Cmd.REVERSAL, pan=pan, terminal="T0000006", stan=stan + 1)
    if kind in ("repeat", "repeat_other"):
        if not history:
            return request(engine, KEYS, Cmd.BALANCE, pan=pan, terminal="T0000003", stan=stan, pin=pin)
        q = history[ref % len(history)].copy()
        if kind == "repeat_other":
            q["content_hash"] ^= np.uint64(1)
        return q
    if kind in LIFECYCLE:
        cmd = LIFECYCLE[kind]
        extra = {}
        if kind == "replace":
            new_pan = f"6214839{stan_counter[0]:09d}"
            pans.append(new_pan)
            extra = {"pan2": new_pan, "pin_pvv": KEYS.pvv(KEYS.pan_hash(new_pan), "888888"),
                     "pin_pvv_new": KEYS.pvv(KEYS.pan_hash(new_pan), "123456")}
        elif kind == "cancel_card" and bits & 1:
            extra = {"pan2": pans[ref % len(pans)]}
        elif kind in ("pin_change", "pin_reset"):
            extra = {"pin_pvv_new": KEYS.pvv(KEYS.pan_hash(pan), "654321")}
        q = request(engine, KEYS, cmd, pan=pan, stan=stan, amount_fen=amount // 10,
                    acct_type=(bits >> 2) & 1, med_type=(bits >> 3) & 1,
                    pin=pin if kind == "pin_change" else None, **extra)
        if kind in ("credit_fin", "credit_ins") and bits & 0x40:
            q["person_hash"] = KEYS.person_hash(NAMED_CARDS[card % len(NAMED_CARDS)][1])
            q["pan_hash"] = 0
        if not bits & 0x80:
            q["idem_key"] = 0              # admin commands may come without a duplicate key
        return q
    if kind in ("bind", "unbind"):
        q = request(engine, KEYS, Cmd.FAMILY_BIND if kind == "bind" else Cmd.FAMILY_UNBIND,
                    pan=pan, pan2=PANS[ref % len(PANS)], stan=stan)
        q["idem_key"] = 0
        return q
    raise AssertionError(kind)


def batches(engine, ops, cuts, date_picks, history, stan_counter, pans):
    """(batch number, request rows, business date) for `ops` cut at `cuts` (the rest last), the
    dates from `date_picks`, never decreasing. Each batch is built when the caller asks for it,
    after it has added the previous batch to `history`."""
    dates = sorted(DATES[i] for i in date_picks)
    position = 0
    for b, cut in enumerate(cuts + [len(ops)]):
        chunk = ops[position:position + cut]
        position += cut
        if not chunk:
            return
        requests = np.concatenate([build(engine, o, history, stan_counter, pans) for o in chunk])
        yield b, requests, (dates[b % len(dates)] if b < len(dates) else dates[-1])


def card_state_engine(engine, slot):
    c, y = engine.arrays["cards"][slot], engine.arrays["side"][slot]
    return (int(c["ins_balance_fen"]), int(c["fin_balance_fen"]), [int(x) for x in c["ded_used_fen"]],
            [int(x) for x in c["fund_paid_fen"]], [int(x) for x in y["admissions"]], int(y["acc_year"]),
            int(c["tries_social"]), int(c["tries_bank"]), int(y["payer_slot"]),
            int(c["status"]), int(c["aid_beneficiaries"]))


def card_state_reference(ref, slot):
    c = ref.cards[slot]
    return (c.ins, c.fin, c.ded_used, c.fund_paid, c.admissions, c.acc_year, c.tries_social,
            c.tries_bank, c.payer, c.status, c.aid_beneficiaries)


def check_invariants(engine, requests, results, before_total_fen):
    """DESIGN.md §6 invariants 1–5 on one applied batch."""
    ins, fin = engine.column("ins_balance_fen"), engine.column("fin_balance_fen")
    assert (ins >= 0).all() and (fin >= 0).all()                                  # 1
    effective = ((results["outcome_flags"] & ResFlag.POSTED) != 0) & \
                ((results["outcome_flags"] & ResFlag.DUPLICATE) == 0) & (results["cmd"] != Cmd.ISSUE)
    med = effective & (results["cmd"] == Cmd.MED_SETTLE)
    for r, q in zip(results[med], requests[med]):
        assert r["amount_fen"] == r["fund_fen"] + r["ins_leg_fen"] + r["aid_leg_fen"] + r["fin_leg_fen"] + r["cash_fen"]  # 3
        assert q["fo_fen"] + q["ol_fen"] + q["ps_fen"] + q["is_fen"] == q["amount_fen"]               # 3 (I1)
        share = r["amount_fen"] - r["fund_fen"]
        if q["flags"] & ReqFlag.AU:                                                                   # 2
            assert r["ins_leg_fen"] == min(share, r["ins_balance_fen"] + r["ins_leg_fen"])
        else:
            assert r["ins_leg_fen"] == 0 and r["aid_leg_fen"] == 0
        assert r["cash_fen"] == 0 or q["flags"] & ReqFlag.PA
    # 4: money is conserved: the balances moved by exactly the legs (a transfer moves it between cards)
    legs = results["ins_leg_fen"] + results["aid_leg_fen"] + results["fin_leg_fen"]
    transfer_like = effective & (results["other_slot"] >= 0) & \
        ((results["cmd"] == Cmd.TRANSFER) | (results["cmd"] == Cmd.REVERSAL))
    moved_on_cancel = effective & (results["cmd"] == Cmd.CANCEL_CARD) & (results["other_slot"] >= 0)
    expected = (before_total_fen - int(legs[effective].sum()) + int(results["fin_leg_fen"][transfer_like].sum())
                + int(results["ins_leg_fen"][moved_on_cancel].sum()) + int(results["fin_leg_fen"][moved_on_cancel].sum()))
    assert int(ins.sum()) + int(fin.sum()) == expected
    # 5: a duplicate answers what the first answer said and moves nothing (checked through 4 too)
    dup = (results["outcome_flags"] & ResFlag.DUPLICATE) != 0
    assert (results["rrn"][dup] == results["orig_rrn"][dup]).all()


def total_fen(engine):
    n = engine.card_count
    return int(engine.column("ins_balance_fen").sum()) + int(engine.column("fin_balance_fen").sum())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=10, max_size=150), cuts=st.lists(st.integers(1, 40), min_size=1, max_size=8),
       date_picks=st.lists(st.integers(0, len(DATES) - 1), min_size=8, max_size=8),
       aid_cap_fen=st.sampled_from([0, 0, 1, 2500, 10**6]), beneficiaries_max=st.sampled_from([0, 1, 2]))
def test_engine_matches_reference(ops, cuts, date_picks, aid_cap_fen, beneficiaries_max):
    import msgspec
    config = demo_config()
    config = msgspec.structs.replace(config, limits=msgspec.structs.replace(
        config.limits, family_aid_per_settlement_fen_max=aid_cap_fen,
        family_aid_beneficiaries_per_payer_max=beneficiaries_max))
    engine = Engine(config, card_capacity=len(NAMED_CARDS) + GENERATED + SPARE_SLOTS, txn_retention_count=4096)
    ref = Reference(config, capacity=len(NAMED_CARDS) + GENERATED + SPARE_SLOTS)
    pans = list(PANS)
    for batch in genesis_batches(KEYS, GENERATED):
        engine.apply_batch(batch, business_date=20261124)
        for q in batch:
            ref.apply(q, 20261124)
    history, stan_counter = [], [0]
    for b, requests, bd in batches(engine, ops, cuts, date_picks, history, stan_counter, pans):
        before = total_fen(engine)
        results = engine.apply_batch(requests, business_date=bd)
        for i, q in enumerate(requests):
            expected = ref.apply(q, bd)
            got = {name: int(results[i][name]) for name in expected}
            assert got == expected, (i, int(q["cmd"]), {k: (got[k], v) for k, v in expected.items() if got[k] != v})
        check_invariants(engine, requests, results, before)
        _count_codes(results)
        assert engine.card_count == len(ref.cards)
        for slot in range(engine.card_count):
            assert card_state_engine(engine, slot) == card_state_reference(ref, slot), slot
        history.extend(requests[i:i + 1].copy() for i in range(len(requests)) if requests[i]["cmd"] != Cmd.REVERSAL)


CODE_COUNTS = {}


def _count_codes(results):
    for code in results["code"]:
        CODE_COUNTS[int(code)] = CODE_COUNTS.get(int(code), 0) + 1


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(aid_cap_fen=st.sampled_from([0, 1, 2500, 7000, 10**6]),
       claims=st.lists(st.tuples(st.integers(1, 90_000), st.booleans(), st.booleans()), min_size=1, max_size=12))
def test_family_aid_matches_reference(aid_cap_fen, claims):
    """家庭共济 under a configured cap: pharmacy settlements of …0041 (payer …0082), some with
    partial approval, some cancelled, through the engine and the reference model alike."""
    import msgspec
    from yikatong.engine.builders import medical
    config = demo_config()
    config = msgspec.structs.replace(config, limits=msgspec.structs.replace(
        config.limits, family_aid_per_settlement_fen_max=aid_cap_fen))
    engine = Engine(config, card_capacity=len(NAMED_CARDS) + 8, txn_retention_count=1024)
    ref = Reference(config, capacity=len(NAMED_CARDS) + 8)
    for batch in genesis_batches(KEYS, 0):
        engine.apply_batch(batch, business_date=20261124)
        for q in batch:
            ref.apply(q, 20261124)
    aid_paid = 0
    for stan, (amount, pa, cancel) in enumerate(claims, start=1):
        q = medical(engine, KEYS, "6214830000000041", "T0000004", amount, 0, 0, 0, amount, med_type=41,
                    pa=pa, pin="147258", stan=stan)
        r = engine.apply_batch(q, business_date=20261124)[0]
        expected = ref.apply(q[0], 20261124)
        assert {k: int(r[k]) for k in expected} == expected
        aid_paid += int(r["aid_leg_fen"])
        if aid_cap_fen:
            assert r["aid_leg_fen"] <= aid_cap_fen
        if cancel and r["code"] in (rc("00"), rc("10")):
            c = request(engine, KEYS, Cmd.MED_CANCEL, pan="6214830000000041", terminal="T0000004",
                        amount_fen=amount, orig_rrn=int(r["rrn"]), stan=1000 + stan)
            cr = engine.apply_batch(c, business_date=20261124)[0]
            expected = ref.apply(c[0], 20261124)
            assert {k: int(cr[k]) for k in expected} == expected
    for slot in range(engine.card_count):
        assert card_state_engine(engine, slot) == card_state_reference(ref, slot), slot
