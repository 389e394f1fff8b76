"""DOMAIN.md §2 worked examples (cases A–D, Chongqing identities) and DEMO.md figures, in exact fen."""
import pytest

from yikatong.engine import Cmd, ResFlag, rc, rc_str
from yikatong.engine.builders import medical, request
from yikatong.engine.demo import NAMED_CARDS, issue_requests_generated

BD = 20261124
CLAIM = (5000000, 300000, 50000, 100000, 4550000)      # total, FO, OL, PS, IS (50,000.00 yuan)


def apply(engine, q, bd=BD):
    return engine.apply_batch(q, business_date=bd)[0]


def legs(r):
    return (rc_str(r["code"]), int(r["fund_fen"]), int(r["ins_leg_fen"]), int(r["fin_leg_fen"]),
            int(r["cash_fen"]))


# case, card, terminal, expected (code, fund, insurance leg, financial leg, cash), deductible
CASES = [
    ("A", "6214830000000017", "T0000001", ("00", 3862000, 200000, 938000, 0), 130000),
    ("B", "6214830000000025", "T0000003", ("00", 3740000, 200000, 1060000, 0), 150000),
    ("C", "6214830000000033", "T0000003", ("00", 4048000, 200000, 752000, 0), 150000),
]


@pytest.mark.parametrize("name,pan,terminal,expected,ded", CASES)
def test_cases_a_b_c(demo, name, pan, terminal, expected, ded):
    engine, keys = demo
    r = apply(engine, medical(engine, keys, pan, terminal, *CLAIM))
    assert legs(r) == expected
    assert r["deductible_fen"] == ded
    # patient share = total − fund; the insurance account first, the rest from the bank
    assert r["ins_leg_fen"] + r["fin_leg_fen"] == CLAIM[0] - r["fund_fen"]
    assert (r["ins_balance_fen"], r["fin_balance_fen"]) == (0, 2000000 - expected[3])


def test_case_b_cross_region_same_figures(demo):
    """异地就医: card …0025 (Shanghai) at a Beijing hospital gets the insured place's policy."""
    engine, keys = demo
    r = apply(engine, medical(engine, keys, "6214830000000025", "T0000001", *CLAIM))
    assert legs(r) == ("00", 3740000, 200000, 1060000, 0)


def test_case_d_declined_then_partial(demo):
    engine, keys = demo
    a = apply(engine, medical(engine, keys, "6214830000000017", "T0000001", *CLAIM))
    assert legs(a) == ("00", 3862000, 200000, 938000, 0)
    before = {k: v.copy() for k, v in engine.arrays.items() if k not in ("txns", "idem_index", "rev_index", "meta")}
    d = apply(engine, medical(engine, keys, "6214830000000017", "T0000001", *CLAIM))
    assert rc_str(d["code"]) == "51"
    assert (d["ins_balance_fen"], d["fin_balance_fen"]) == (0, 1062000)
    for name, column in before.items():        # a rejection leaves the card state untouched
        assert (engine.arrays[name] == column).all(), name
    d = apply(engine, medical(engine, keys, "6214830000000017", "T0000001", *CLAIM, pa=True))
    assert legs(d) == ("10", 3917250, 0, 1062000, 20750)
    assert d["deductible_fen"] == 65000           # later admission of the year
    assert d["fund_fen"] + d["ins_leg_fen"] + d["fin_leg_fen"] + d["cash_fen"] == CLAIM[0]
    assert (d["ins_balance_fen"], d["fin_balance_fen"]) == (0, 0)


def test_chongqing_identities(demo):
    """Real record (Chongqing retiree, inpatient), with the fund given by the platform (FP).

    The wire has no field for the hospital's share (医院负担, 505.01): the engine settles
    total = fund + insurance leg + financial leg + cash, so the hospital share stays inside the
    amount left to collect at the counter; docs/engine.md says why.
    """
    engine, keys = demo
    fo, ol, ps, is_ = 253397, 139689, 70344, 1880816
    total = 2344246
    assert fo + ol + ps + is_ == total                          # I1
    fund, hospital_share, patient_share = 1878539, 50501, 415206
    assert fund + hospital_share + patient_share == total       # I2
    # a card with 170.04 in its insurance account and nothing in the bank: the rest is cash
    q = issue_requests_generated(keys, 5000, 1)
    assert rc_str(apply(engine, q)["code"]) == "96"              # the card table is full: refused
    engine.reserve(engine.card_count + 1)
    q["amount_fen"] = 17004
    q["amount2_fen"] = 0
    assert rc_str(apply(engine, q)["code"]) == "00"
    from yikatong.engine.demo import generated_pans
    pan = generated_pans(5000, 1).tobytes().decode()
    r = apply(engine, medical(engine, keys, pan, "T0000001", total, fo, ol, ps, is_, fp_fen=fund, pa=True))
    assert legs(r) == ("10", 1878539, 17004, 0, 398202 + hospital_share)
    assert r["ins_leg_fen"] + r["cash_fen"] - hospital_share == patient_share    # I3
    assert r["fund_fen"] + r["ins_leg_fen"] + r["cash_fen"] == total
    assert r["deductible_fen"] == 0                              # FP skips the local policy


def test_fp_above_in_scope_is_13(demo):
    engine, keys = demo
    r = apply(engine, medical(engine, keys, "6214830000000017", "T0000001", *CLAIM, fp_fen=4550001))
    assert rc_str(r["code"]) == "13"


def test_claim_identity_broken_is_13(demo):
    engine, keys = demo
    r = apply(engine, medical(engine, keys, "6214830000000017", "T0000001", 5000000, 300000, 50000, 100000, 4549999))
    assert rc_str(r["code"]) == "13"
    assert engine.balances(r["card_slot"] if r["card_slot"] >= 0 else 0) == (200000, 2000000)


def test_beijing_secondary_hospital_bands(demo):
    """BJ-E-IN-2 at H11000000000002 (level 2): 90% to 30,000, 95% to 40,000, 97% above."""
    engine, keys = demo
    r = apply(engine, medical(engine, keys, "6214830000000017", "T0000002", *CLAIM))
    fund = (3000000 - 130000) * 9000 // 10000 + 1000000 * 95 // 100 + 550000 * 97 // 100
    assert legs(r) == ("00", fund, 200000, CLAIM[0] - fund - 200000, 0)


def test_outpatient_deductible_is_cumulative_per_year(demo):
    """BJ-E-OUT: 1,800 yuan per year, 70%, cap 20,000 yuan: the deductible is used up across visits."""
    engine, keys = demo
    pan = "6214830000000017"
    first = apply(engine, medical(engine, keys, pan, "T0000001", 100000, 0, 0, 0, 100000, med_type=11))
    assert (first["fund_fen"], first["deductible_fen"]) == (0, 100000)
    assert first["outcome_flags"] & ResFlag.CUMULATIVE
    second = apply(engine, medical(engine, keys, pan, "T0000001", 200000, 0, 0, 0, 200000, med_type=11))
    assert (second["deductible_fen"], second["fund_fen"]) == (80000, 84000)   # 1,200 × 70%
    third = apply(engine, medical(engine, keys, pan, "T0000001", 10000, 0, 0, 0, 10000, med_type=14))
    assert (third["deductible_fen"], third["fund_fen"]) == (0, 7000)          # chronic shares it
    # New Year: the accumulators start again
    fourth = apply(engine, medical(engine, keys, pan, "T0000001", 10000, 0, 0, 0, 10000, med_type=11), bd=20270102)
    assert (fourth["deductible_fen"], fourth["fund_fen"]) == (10000, 0)


def test_outpatient_annual_cap(demo):
    engine, keys = demo
    pan = "62148301" + "0000000" + "8"   # generated card k = 0 (Beijing, retired)
    big = 5000000
    r = apply(engine, medical(engine, keys, pan, "T0000001", big, 0, 0, 0, big, med_type=11))
    assert r["fund_fen"] == 2000000                           # (50,000 − 1,800) × 70% capped at 20,000
    r = apply(engine, medical(engine, keys, pan, "T0000001", 100000, 0, 0, 0, 100000, med_type=11))
    assert r["fund_fen"] == 0                                 # cap reached for the year


def test_pharmacy_fund_pays_nothing(demo):
    engine, keys = demo
    r = apply(engine, medical(engine, keys, "6214830000000017", "T0000004", 30000, 0, 0, 0, 30000, med_type=41))
    assert legs(r) == ("00", 0, 30000, 0, 0)
    r = apply(engine, medical(engine, keys, "6214830000000017", "T0000004", 30000, 0, 0, 0, 30000, med_type=21))
    assert rc_str(r["code"]) == "58"                          # a pharmacy settles visit type 41 only


def test_au_zero_skips_the_insurance_account(demo):
    engine, keys = demo
    r = apply(engine, medical(engine, keys, "6214830000000017", "T0000001", *CLAIM, au=False))
    assert legs(r) == ("00", 3862000, 0, 1138000, 0)


def test_family_aid_pays_after_own_account(demo):
    """家庭共济: …0041 (50,000 fen own) with payer …0082 (10,000 fen); its social PIN is enabled."""
    engine, keys = demo
    r = apply(engine, medical(engine, keys, "6214830000000041", "T0000004", 70000, 0, 0, 0, 70000,
                              med_type=41, pin="147258"))
    assert legs(r) == ("00", 0, 50000, 10000, 0)
    assert r["aid_leg_fen"] == 10000
    payer_slot = engine.slot_of(keys.pan_hash("6214830000000082"))
    assert r["other_slot"] == payer_slot and r["other_balance_fen"] == 0
    assert engine.balances(payer_slot) == (0, 500000)
    # cancel restores both insurance accounts exactly
    c = apply(engine, request(engine, keys, Cmd.MED_CANCEL, pan="6214830000000041", terminal="T0000004",
                              amount_fen=70000, orig_rrn=int(r["rrn"]), orig_stan=int(r["rrn"] and 0)))
    assert rc_str(c["code"]) == "00"
    assert (c["ins_leg_fen"], c["aid_leg_fen"], c["fin_leg_fen"]) == (-50000, -10000, -10000)
    assert engine.balances(payer_slot) == (10000, 500000)
    assert engine.balances(r["card_slot"]) == (50000, 100000)


def test_social_pin_enabled_needs_pin(demo):
    engine, keys = demo
    q = medical(engine, keys, "6214830000000041", "T0000004", 1000, 0, 0, 0, 1000, med_type=41)
    assert rc_str(apply(engine, q)["code"]) == "55"
    codes = []
    for _ in range(6):
        q = medical(engine, keys, "6214830000000041", "T0000004", 1000, 0, 0, 0, 1000, med_type=41, pin="000000")
        codes.append(rc_str(apply(engine, q)["code"]))
    assert codes == ["55"] * 5 + ["75"]
    q = medical(engine, keys, "6214830000000041", "T0000004", 1000, 0, 0, 0, 1000, med_type=41, pin="147258")
    assert rc_str(apply(engine, q)["code"]) == "75"          # locked even with the right PIN


@pytest.mark.parametrize("pan,code", [
    ("6214830000000058", "41"),    # formally lost
    ("6214830000000066", "62"),    # cancelled
    ("6214830000000074", "62"),    # issued, not activated
    ("6214830000000090", "14"),    # unknown
])
def test_card_states(demo, pan, code):
    engine, keys = demo
    assert rc_str(apply(engine, medical(engine, keys, pan, "T0000001", *CLAIM))["code"]) == code
    assert rc_str(apply(engine, request(engine, keys, Cmd.PURCHASE, pan=pan, terminal="T0000006",
                                        amount_fen=100, pin="888888"))["code"]) == code


def test_named_card_balances(demo):
    engine, keys = demo
    for pan, _cid, _region, _retired, ins, fin, *_ in NAMED_CARDS:
        assert engine.balances(engine.slot_of(keys.pan_hash(pan))) == (ins, fin), pan


def test_generated_card_figures(demo):
    engine, keys = demo
    from yikatong.engine.demo import generated_pans
    pans = generated_pans(0, 100).view("S16").ravel()
    assert pans[0] == b"6214830100000008" and pans[1] == b"6214830100000016"
    for k in (0, 1, 2, 3, 99):
        slot = engine.slot_of(keys.pan_hash(pans[k].decode()))
        assert engine.balances(slot) == (100000 + (k % 1000) * 100, 5000000)
        assert engine.column("region_index")[slot] == (0 if k % 2 == 0 else 1)
        assert engine.column("person_type")[slot] == (1 if k % 3 == 0 else 0)


def test_family_aid_cap_per_settlement():
    """家庭共济 limits are configuration: with limits.family_aid_per_settlement_fen_max = 4,000 the
    payer …0082 pays at most 4,000 fen of …0041's share; the bank account pays the rest."""
    import msgspec
    from yikatong.engine.demo import demo_config, demo_engine
    config = demo_config()
    config = msgspec.structs.replace(config, limits=msgspec.structs.replace(
        config.limits, family_aid_per_settlement_fen_max=4000))
    engine, keys = demo_engine(0, business_date=BD, config=config)
    r = apply(engine, medical(engine, keys, "6214830000000041", "T0000004", 70000, 0, 0, 0, 70000,
                              med_type=41, pin="147258"))
    assert legs(r) == ("00", 0, 50000, 16000, 0) and r["aid_leg_fen"] == 4000
    payer_slot = engine.slot_of(keys.pan_hash("6214830000000082"))
    assert engine.balances(payer_slot) == (6000, 500000)
    assert engine.balances(r["card_slot"]) == (0, 84000)
