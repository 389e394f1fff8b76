"""Card lifecycle (DOMAIN.md §1): every state × command → result, and what each command moves."""
import pytest

from yikatong.engine import CardStatus, CardFlag, Cmd, rc_str
from yikatong.engine.builders import medical, request
from yikatong.engine.demo import generated_pans, issue_requests_generated

BD = 20261124
LATER = 20261203          # 9 days later: a 7-day temporary loss has lapsed

COMMANDS = ["activate_social", "activate_fin", "temp_loss", "formal_loss", "unloss", "replace",
            "cancel_card", "pin_change", "pin_reset", "pin_unlock", "credit_fin", "credit_ins",
            "medical", "purchase"]
# state → expected code per command, in the order of COMMANDS
TABLE = {
    "issued":          "00 00 00 00 12 00 12 00 00 00 62 00 62 62",
    "active":          "12 12 00 00 12 00 12 00 00 00 00 00 00 00",
    "temp_lost":       "12 41 00 00 00 00 12 00 00 00 41 00 41 41",
    "temp_lost_lapsed": "12 12 00 00 00 00 12 00 00 00 00 00 00 00",
    "lost":            "41 41 12 00 12 00 12 00 00 00 41 00 41 41",
    "replaced":        "41 41 41 41 41 41 41 41 41 41 41 41 41 41",
    "cancelled":       "62 62 62 62 62 62 62 62 62 62 62 62 62 62",
}


def pan_of(k: int) -> str:
    return generated_pans(k, 1).tobytes().decode()


def make_card(engine, keys, k: int, state: str) -> tuple[str, int]:
    """Issue generated card k and drive it into `state`; returns (PAN, business date to use)."""
    engine.reserve(engine.card_count + 4)
    q = issue_requests_generated(keys, k, 1)
    if state == "issued":
        q["med_type"] = CardStatus.ISSUED
        q["acct_type"] = q["acct_type"] & 0x0F            # financial function not activated
    assert rc_str(engine.apply_batch(q, business_date=BD)[0]["code"]) == "00"
    pan = pan_of(k)
    steps = {"temp_lost": [Cmd.TEMP_LOSS], "temp_lost_lapsed": [Cmd.TEMP_LOSS], "lost": [Cmd.FORMAL_LOSS],
             "replaced": [Cmd.REPLACE], "cancelled": [Cmd.CANCEL_CARD]}.get(state, [])
    for cmd in steps:
        extra = {"pan2": pan_of(k + 500_000)} if cmd == Cmd.REPLACE else {}
        if cmd == Cmd.CANCEL_CARD:
            extra = {"pan2": "6214830000000017"}          # the balance goes to another card
        r = engine.apply_batch(request(engine, keys, cmd, pan=pan, **extra), business_date=BD)[0]
        assert rc_str(r["code"]) == "00", (state, cmd)
    return pan, LATER if state == "temp_lost_lapsed" else BD


def command(engine, keys, name: str, pan: str, k: int):
    if name == "medical":
        return medical(engine, keys, pan, "T0000001", 10000, 0, 0, 0, 10000, med_type=11)
    if name == "purchase":
        return request(engine, keys, Cmd.PURCHASE, pan=pan, terminal="T0000006", amount_fen=100, pin="888888")
    cmd = getattr(Cmd, name.upper())
    extra = {}
    if name == "replace":
        extra = {"pan2": pan_of(k + 700_000)}
    if name in ("pin_change", "pin_reset", "pin_unlock"):
        extra = {"acct_type": 1, "pin_pvv_new": keys.pvv(keys.pan_hash(pan), "135790")}
    if name in ("credit_fin", "credit_ins"):
        extra = {"amount_fen": 12345}
    return request(engine, keys, cmd, pan=pan, pin="888888" if name == "pin_change" else None, **extra)


@pytest.mark.parametrize("state", list(TABLE))
def test_state_by_command(demo, state):
    engine, keys = demo
    expected = TABLE[state].split()
    got = []
    for i, name in enumerate(COMMANDS):
        k = 1000 + list(TABLE).index(state) * 100 + i         # a fresh card for every cell
        pan, bd = make_card(engine, keys, k, state)
        engine.reserve(engine.card_count + 2)
        got.append(rc_str(engine.apply_batch(command(engine, keys, name, pan, k), business_date=bd)[0]["code"]))
    assert dict(zip(COMMANDS, got)) == dict(zip(COMMANDS, expected))


def test_replacement_carries_balances_and_accumulators(demo):
    engine, keys = demo
    old = "6214830000000017"
    a = engine.apply_batch(medical(engine, keys, old, "T0000001", 5000000, 300000, 50000, 100000, 4550000),
                           business_date=BD)[0]
    old_slot = int(a["card_slot"])
    engine.reserve(engine.card_count + 1)
    new = pan_of(900_001)
    r = engine.apply_batch(request(engine, keys, Cmd.REPLACE, pan=old, pan2=new,
                                   pin_pvv=keys.pvv(keys.pan_hash(new), "888888")), business_date=BD)[0]
    assert rc_str(r["code"]) == "00"
    new_slot = int(r["other_slot"])
    assert engine.balances(new_slot) == (0, 1062000) and engine.balances(old_slot) == (0, 0)
    # the old card answers 41; the new one is a second admission (deductible 650), not a first
    d = engine.apply_batch(medical(engine, keys, old, "T0000001", 5000000, 300000, 50000, 100000, 4550000), business_date=BD)[0]
    assert rc_str(d["code"]) == "41"
    d = engine.apply_batch(medical(engine, keys, new, "T0000001", 5000000, 300000, 50000, 100000, 4550000, pa=True),
                           business_date=BD)[0]
    assert (rc_str(d["code"]), d["deductible_fen"], d["fin_leg_fen"], d["cash_fen"]) == ("10", 65000, 1062000, 20750)
    # a cancel of the old card's settlement credits the replacement
    c = engine.apply_batch(request(engine, keys, Cmd.MED_CANCEL, pan=old, terminal="T0000001", amount_fen=5000000,
                                   orig_rrn=int(a["rrn"])), business_date=BD)[0]
    assert rc_str(c["code"]) == "00" and c["card_slot"] == new_slot
    assert engine.balances(new_slot) == (200000, 938000)


def test_one_person_one_card(demo):
    """一人一卡: a second live card for the same person is refused (57); after 注销 it is allowed."""
    engine, keys = demo
    engine.reserve(engine.card_count + 2)
    q = issue_requests_generated(keys, 0, 1)                 # generated card 0 exists already
    q["pan_hash"] = keys.pan_hash(pan_of(800_000))
    assert rc_str(engine.apply_batch(q, business_date=BD)[0]["code"]) == "57"
    pan0 = pan_of(0)
    assert rc_str(engine.apply_batch(request(engine, keys, Cmd.CANCEL_CARD, pan=pan0), business_date=BD)[0]["code"]) == "12"
    assert rc_str(engine.apply_batch(request(engine, keys, Cmd.CANCEL_CARD, pan=pan0, pan2="6214830000000017"),
                                     business_date=BD)[0]["code"]) == "00"
    assert rc_str(engine.apply_batch(q, business_date=BD)[0]["code"]) == "00"


def test_pin_change_enables_the_social_pin(demo):
    engine, keys = demo
    pan = "6214830000000017"
    new = keys.pvv(keys.pan_hash(pan), "246810")
    r = engine.apply_batch(request(engine, keys, Cmd.PIN_CHANGE, pan=pan, pin="123456", acct_type=0, pin_pvv_new=new),
                           business_date=BD)[0]
    assert rc_str(r["code"]) == "00"
    slot = int(r["card_slot"])
    assert engine.column("card_flags")[slot] & CardFlag.SOCIAL_PIN
    q = medical(engine, keys, pan, "T0000001", 10000, 0, 0, 0, 10000, med_type=11)
    assert rc_str(engine.apply_batch(q, business_date=BD)[0]["code"]) == "55"
    q = medical(engine, keys, pan, "T0000001", 10000, 0, 0, 0, 10000, med_type=11, pin="246810")
    assert rc_str(engine.apply_batch(q, business_date=BD)[0]["code"]) == "00"


def test_credits_by_person(demo):
    """代发 and 划入 may name the person (社会保障号码) instead of the card."""
    engine, keys = demo
    q = request(engine, keys, Cmd.CREDIT_INS, amount_fen=5000)
    q["person_hash"] = keys.person_hash("110105196503120013")
    r = engine.apply_batch(q, business_date=BD)[0]
    assert rc_str(r["code"]) == "00" and (r["ins_balance_fen"], r["ins_leg_fen"]) == (205000, -5000)
    q = request(engine, keys, Cmd.CREDIT_FIN, amount_fen=7000)
    q["person_hash"] = keys.person_hash("110108198505050053")          # formally lost card
    assert rc_str(engine.apply_batch(q, business_date=BD)[0]["code"]) == "41"


def test_family_aid_beneficiaries_per_payer_limit():
    """家庭共济: limits.family_aid_beneficiaries_per_payer_max caps how many cards one payer covers
    (65 above it). The count follows bind, re-bind to another payer, unbind, 注销 of a beneficiary
    and 补换卡 of the payer (the replacement card keeps its beneficiaries and their count)."""
    import msgspec
    from yikatong.engine.demo import demo_config, demo_engine
    config = demo_config()
    config = msgspec.structs.replace(config, limits=msgspec.structs.replace(
        config.limits, family_aid_beneficiaries_per_payer_max=2))
    engine, keys = demo_engine(generated_cards=20, business_date=BD, config=config)
    payer, other_payer = pan_of(0), pan_of(2)                  # generated cards, even k: same region
    b1, b2, b3 = pan_of(4), pan_of(6), pan_of(8)

    def bind(pan, to):
        return rc_str(engine.apply_batch(request(engine, keys, Cmd.FAMILY_BIND, pan=pan, pan2=to),
                                         business_date=BD)[0]["code"])

    def unbind(pan):
        return rc_str(engine.apply_batch(request(engine, keys, Cmd.FAMILY_UNBIND, pan=pan),
                                         business_date=BD)[0]["code"])

    def count(pan):
        return int(engine.column("aid_beneficiaries")[engine.slot_of(keys.pan_hash(pan))])

    assert (bind(b1, payer), bind(b2, payer), bind(b3, payer)) == ("00", "00", "65")
    assert count(payer) == 2
    assert bind(b1, payer) == "00" and count(payer) == 2          # the same binding again: not counted twice
    assert bind(b1, other_payer) == "00" and (count(payer), count(other_payer)) == (1, 1)
    assert bind(b3, payer) == "00" and count(payer) == 2
    assert unbind(b2) == "00" and count(payer) == 1
    assert bind(b2, payer) == "00" and count(payer) == 2
    # 注销 of a beneficiary frees its place (its balance goes to another card)
    assert rc_str(engine.apply_batch(request(engine, keys, Cmd.CANCEL_CARD, pan=b2, pan2="6214830000000017"),
                                     business_date=BD)[0]["code"]) == "00"
    assert count(payer) == 1
    # 补换卡 of the payer: the new card keeps the count; the old one has none
    engine.reserve(engine.card_count + 1)
    new = pan_of(900_002)
    r = engine.apply_batch(request(engine, keys, Cmd.REPLACE, pan=payer, pan2=new,
                                   pin_pvv=keys.pvv(keys.pan_hash(new), "888888")), business_date=BD)[0]
    assert rc_str(r["code"]) == "00"
    assert (count(payer), count(new)) == (0, 1)
    assert bind(b1, new) == "00" and count(new) == 2
    assert bind(pan_of(10), new) == "65"
    assert unbind(b3) == "00" and count(new) == 1                 # b3 was bound to the old card: counted on the new
