"""The terminal server (protocols/server.py) end to end: `yikatong serve` as a real subprocess on
port 0, a real LMDB data directory in a tmp dir, both event loops, driven by the independent
client bench/baseline/client.py (written from PROTOCOL.md alone). Expected figures are exact:
DOMAIN.md §2 worked cases and DEMO.md's card data.

Generated demo card k (DEMO.md): region 110000 when k is even, else 310000; retired when
k % 3 == 0; insurance balance 100000 + (k % 1000) * 100; financial 5000000; bank PIN 888888.
Each test uses its own cards and terminals (one server per module per loop is shared).
"""
import itertools
import os
import random
import signal
import socket
import struct
import threading
import time

import numpy as np
import pytest

from bench.baseline import client as cl
from bench.baseline.crypto import check_value, mac as mac_of
from server_fixture import ServerProcess, raise_fd_limit, run_yikatong

LOOPS = ["asyncio", "uvloop"]
HOSPITAL, HOSPITAL2, HOSPITAL_SH = "H11000000000001", "H11000000000002", "H31000000000001"
PHARMACY, BANK, MERCHANT = "P11000000000001", "B11000000000001", "M11000000000001"
CARD_A, CARD_B, CARD_C = "6214830000000017", "6214830000000025", "6214830000000033"
CARD_PIN, CARD_LOST, CARD_CANCELLED = "6214830000000041", "6214830000000058", "6214830000000066"
INPATIENT_CLAIM = dict(fo=300000, ol=50000, ps=100000, is_=4550000, med_type="21")   # DOMAIN.md §2
FIN0 = 5000000


def ins0(k: int) -> int:
    return 100000 + (k % 1000) * 100


def pan(k: int) -> str:
    return cl.generated_pan(k)


@pytest.fixture(scope="module", params=LOOPS)
def srv(request, tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp(f"node-{request.param}") / "node", loop=request.param,
                       cards=1000, metrics=True) as server:
        yield server
        assert server.alive(), server.log()[-3000:]
        assert server.terminate() == 0, server.log()[-3000:]


_load_terminals = itertools.count(0)


def load_terminal(srv, **kw) -> cl.Terminal:
    """A fresh load terminal T1000000…T1000199 (tertiary hospital H11000000000001), signed on."""
    n = next(_load_terminals) % 200
    t = srv.terminal(f"T{1000000 + n}", HOSPITAL, **kw)
    assert t.sign_on().code == "00"
    return t


def signed_on(srv, tid, mid, mac_alg="x9.19") -> cl.Terminal:
    t = srv.terminal(tid, mid, mac_alg)
    reply = t.sign_on()
    assert reply.code == "00", reply.fields
    return t


def med(t, card, amount, *, fo=0, ol=0, ps=0, is_=None, med_type="11", pin=None, pa=None, au=None,
        fp=None, presettle=False):
    """(request dict, reply) of a medical settlement (81) or pre-settlement (83)."""
    if is_ is None:
        is_ = amount - fo - ol - ps
    tlv = cl.medical_tlv(med_type=med_type, fo=fo, ol=ol, ps=ps, is_=is_, au=au, pa=pa, fp=fp)
    build = cl.medical_presettlement_request if presettle else cl.medical_request
    request = build(amount_fen=amount, tlv=tlv, pan=card, pin_block_bytes=t._pin(pin, card), **t.common())
    return request, t.send(request)


def tlv(reply, *tags):
    return {k: int(reply.tlv[k]) for k in tags}


def balances(t, card):
    r = t.balance_inquiry(card, "00")
    assert (r.code, r.mac_ok) == ("00", True), r.fields
    return r.balance("91"), r.balance("10")


def original_of(request, reply):
    return dict(orig_rrn=reply.fields["37"], orig_stan=request["11"], orig_date=request["13"])


# ---- 1. every message kind of PROTOCOL.md §3 --------------------------------------------------

def test_sign_on_keys_echo_sign_off(srv):
    t = srv.terminal("T0000002", HOSPITAL2)
    reply = t.sign_on()
    assert (reply.mti, reply.code, reply.fields["32"], reply.fields["41"]) == ("0810", "00", "48020000", "T0000002")
    assert "64" not in reply.fields and reply.mac_ok is None                    # 0810 carries no MAC
    assert reply.fields["60"] == "00000001003"                                  # batch 000001
    f62 = reply.fields["62"]
    assert len(f62) == 40
    # keys decrypt under the TMK and their check values match
    assert f62[16:20] == check_value(t.pin_key)[:4] and f62[36:40] == check_value(t.mac_key)[:4]
    assert t.pin_key != t.mac_key
    assert reply.tpdu == bytes.fromhex("6000000003")                            # TPDU swapped
    echo = t.echo()
    assert (echo.mti, echo.code, echo.mac_ok, echo.fields["41"]) == ("0830", "00", True, "T0000002")
    off = t.sign_off()
    assert (off.mti, off.code, off.mac_ok) == ("0830", "00", True)
    # signed off: echo and card messages get 77 with the header asking for a sign-on, no MAC
    for reply in (t.echo(), t.balance_inquiry(pan(1))):
        assert (reply.code, reply.sign_on_requested) == ("77", True)
        assert "64" not in reply.fields
    assert t.sign_on().code == "00" and t.echo().code == "00"


def test_cups_ecb_terminal(srv):
    t = signed_on(srv, "T0000007", HOSPITAL, "cups-ecb")
    _, reply = med(t, pan(3), 2000)
    assert (reply.code, reply.mac_ok) == ("00", True)
    assert all(c in b"0123456789ABCDEF" for c in reply.fields["64"])


def test_balance_inquiry_account_types(srv):
    t = signed_on(srv, "T0000004", PHARMACY)                                    # accepted at every kind
    k = 4
    fin = t.balance_inquiry(pan(k), "10")
    assert (fin.mti, fin.code, fin.mac_ok) == ("0210", "00", True)
    assert fin.fields["54"] == f"1002156C{FIN0:012d}" and fin.balance("91") is None
    ins = t.balance_inquiry(pan(k), "91")
    assert ins.code == "00" and ins.fields["54"] == f"9102156C{ins0(k):012d}"
    both = t.balance_inquiry(pan(k), "00")
    assert both.code == "00" and (both.balance("91"), both.balance("10")) == (ins0(k), FIN0)
    assert len(both.fields["54"]) == 40


def test_purchase_void_refund_at_the_merchant(srv):
    t = signed_on(srv, "T0000006", MERCHANT)
    k, card = 6, pan(6)
    p = cl.purchase_request(amount_fen=12345, pan=card, pin_block_bytes=t._pin("888888", card), **t.common())
    pr = t.send(p)
    assert (pr.code, pr.mac_ok, pr.balance("10")) == ("00", True, FIN0 - 12345)
    assert pr.fields["38"] and pr.fields["4"] == "000000012345"
    v = t.void(card, 12345, **original_of(p, pr))
    assert (v.code, v.mac_ok, v.balance("10")) == ("00", True, FIN0)
    assert t.void(card, 12345, **original_of(p, pr)).code == "12"               # void twice
    # refund: partial, then more than what remains → 64, then exactly the rest
    p2 = cl.purchase_request(amount_fen=20000, pan=card, pin_block_bytes=t._pin("888888", card), **t.common())
    pr2 = t.send(p2)
    assert (pr2.code, pr2.balance("10")) == ("00", FIN0 - 20000)
    r1 = t.refund(card, 5000, **original_of(p2, pr2))
    assert (r1.mti, r1.code, r1.mac_ok, r1.balance("10")) == ("0230", "00", True, FIN0 - 15000)
    assert t.refund(card, 15001, **original_of(p2, pr2)).code == "64"
    assert balances(t, card) == (ins0(k), FIN0 - 15000)                         # 64: no effect
    r2 = t.refund(card, 15000, **original_of(p2, pr2))
    assert (r2.code, r2.balance("10")) == ("00", FIN0)
    assert t.refund(card, 1, **original_of(p2, pr2)).code == "64"
    # wrong bank PIN: 55, no effect
    bad = t.purchase(pan(22), 100, pin="123456")
    assert (bad.code, bad.mac_ok) == ("55", True)
    assert balances(t, pan(22)) == (ins0(22), FIN0)


def test_medical_cases_a_and_d(srv):
    """DOMAIN.md §2 case A then case D (51, then partial approval 10 with CP) on card …0017 at
    T0000001; then cancels restore balances and accumulators exactly; cancel twice → 12."""
    t = signed_on(srv, "T0000001", HOSPITAL)
    a_req, a = med(t, CARD_A, 5000000, **INPATIENT_CLAIM)
    assert (a.code, a.mac_ok) == ("00", True)
    assert tlv(a, "FP", "DE", "AP", "BP", "IB", "BB") == {
        "FP": 3862000, "DE": 130000, "AP": 200000, "BP": 938000, "IB": 0, "BB": 1062000}
    assert a.tlv["FP"] and "CP" not in a.tlv and a.tlv["SI"]
    assert int(a.tlv["FP"]) + int(a.tlv["AP"]) + int(a.tlv["BP"]) == int(a.fields["4"]) == 5000000
    assert (a.balance("91"), a.balance("10")) == (0, 1062000)
    assert set(a.fields) >= {"11", "12", "13", "15", "32", "37", "38", "39", "41", "42", "54", "60", "62", "64"}

    _, d = med(t, CARD_A, 5000000, **INPATIENT_CLAIM)
    assert (d.code, d.mac_ok) == ("51", True)
    assert "38" not in d.fields and "62" not in d.fields
    assert (d.balance("91"), d.balance("10")) == (0, 1062000)                   # no effect

    dp_req, dp = med(t, CARD_A, 5000000, pa="1", **INPATIENT_CLAIM)
    assert (dp.code, dp.mac_ok) == ("10", True)
    assert tlv(dp, "FP", "DE", "AP", "BP", "CP", "IB", "BB") == {
        "FP": 3917250, "DE": 65000, "AP": 0, "BP": 1062000, "CP": 20750, "IB": 0, "BB": 0}
    assert sum(tlv(dp, "FP", "AP", "BP", "CP").values()) == 5000000

    # cancel the partial approval, then case A: balances back, twice → 12
    c1 = t.medical_cancel(CARD_A, 5000000, **original_of(dp_req, dp))
    assert (c1.code, c1.mac_ok, c1.balance("91"), c1.balance("10")) == ("00", True, 0, 1062000)
    c2 = t.medical_cancel(CARD_A, 5000000, **original_of(a_req, a))
    assert (c2.code, c2.balance("91"), c2.balance("10")) == ("00", 200000, 2000000)
    assert t.medical_cancel(CARD_A, 5000000, **original_of(a_req, a)).code == "12"
    assert balances(t, CARD_A) == (200000, 2000000)
    # accumulators restored: the claim is a first admission again, same figures as case A
    _, again = med(t, CARD_A, 5000000, **INPATIENT_CLAIM)
    assert again.code == "00"
    assert tlv(again, "FP", "DE", "AP", "BP", "IB", "BB") == tlv(a, "FP", "DE", "AP", "BP", "IB", "BB")


def test_medical_cases_b_and_c(srv):
    t = signed_on(srv, "T0000003", HOSPITAL_SH)
    _, b = med(t, CARD_B, 5000000, **INPATIENT_CLAIM)
    assert (b.code, b.mac_ok) == ("00", True)
    assert tlv(b, "FP", "DE", "AP", "BP", "IB", "BB") == {
        "FP": 3740000, "DE": 150000, "AP": 200000, "BP": 1060000, "IB": 0, "BB": 940000}
    _, c = med(t, CARD_C, 5000000, **INPATIENT_CLAIM)
    assert (c.code, c.mac_ok) == ("00", True)
    assert tlv(c, "FP", "DE", "AP", "BP", "IB", "BB") == {
        "FP": 4048000, "DE": 150000, "AP": 200000, "BP": 752000, "IB": 0, "BB": 1248000}
    for r in (b, c):
        assert sum(tlv(r, "FP", "AP", "BP").values()) == 5000000


def test_pre_settlement_has_no_effect_then_settle_and_cancel(srv):
    """Card k=2 (Beijing, in service, outpatient BJ-E-OUT: deductible 180000 a year, 70%)."""
    t = load_terminal(srv)
    k, card = 2, pan(2)
    expected = {"FP": 70000, "DE": 180000, "AP": ins0(k), "BP": 210000 - ins0(k), "IB": 0,
                "BB": FIN0 - (210000 - ins0(k))}
    _, pre = med(t, card, 280000, presettle=True)
    assert (pre.code, pre.mac_ok) == ("00", True)
    assert tlv(pre, *expected) == expected
    assert (pre.balance("91"), pre.balance("10")) == (ins0(k), FIN0)           # current balances
    assert "38" not in pre.fields or pre.fields["38"]
    assert balances(t, card) == (ins0(k), FIN0)
    _, pre2 = med(t, card, 280000, presettle=True)                             # accumulators untouched
    assert tlv(pre2, *expected) == expected
    s_req, s = med(t, card, 280000)
    assert s.code == "00" and tlv(s, *expected) == expected
    assert (s.balance("91"), s.balance("10")) == (0, expected["BB"])
    c = t.medical_cancel(card, 280000, **original_of(s_req, s))
    assert (c.code, c.mac_ok) == ("00", True)
    assert balances(t, card) == (ins0(k), FIN0)
    assert t.medical_cancel(card, 280000, **original_of(s_req, s)).code == "12"
    _, s2 = med(t, card, 280000)                                               # deductible restored
    assert s2.code == "00" and tlv(s2, *expected) == expected


def test_bank_counter_deposit_withdrawal_transfer(srv):
    t = signed_on(srv, "T0000005", BANK)
    k, card, other = 10, pan(10), pan(12)
    d = t.deposit(card, 100000)
    assert (d.code, d.mac_ok, d.balance("10")) == ("00", True, FIN0 + 100000)
    w = t.withdrawal(card, 30000)
    assert (w.code, w.mac_ok, w.balance("10")) == ("00", True, FIN0 + 70000)
    x = t.transfer(card, other, 70000)
    assert (x.code, x.mac_ok, x.balance("10")) == ("00", True, FIN0)
    assert balances(t, other) == (ins0(12), FIN0 + 70000)
    assert balances(t, card) == (ins0(k), FIN0)
    assert t.withdrawal(card, FIN0 + 1).code == "51"
    assert t.transfer(card, other, FIN0 + 1).code == "51"
    assert balances(t, card) == (ins0(k), FIN0)
    assert balances(t, other) == (ins0(12), FIN0 + 70000)


def test_pin_55_then_75_on_card_0041(srv):
    t = signed_on(srv, "T0000002", HOSPITAL2)
    _, ok = med(t, CARD_PIN, 1000, pin="147258")
    assert (ok.code, ok.balance("91")) == ("00", 49000)
    codes = [med(t, CARD_PIN, 1000, pin="000000")[1].code for _ in range(6)]
    assert codes == ["55"] * 5 + ["75"], codes                                 # the 6th wrong try locks
    _, locked = med(t, CARD_PIN, 1000, pin="147258")                           # right PIN, locked now
    assert (locked.code, locked.mac_ok) == ("75", True)
    _, no_pin = med(t, CARD_PIN, 1000)
    assert no_pin.code != "00"
    assert balances(t, CARD_PIN)[0] == 49000


def test_card_state_codes_and_institution_codes(srv):
    t = signed_on(srv, "T0000001", HOSPITAL)
    assert med(t, "6214839999999996", 1000)[1].code == "14"                   # unknown card
    assert med(t, pan(5000), 1000)[1].code == "14"                             # Luhn-valid, not issued
    assert med(t, CARD_LOST, 1000)[1].code == "41"
    assert med(t, CARD_CANCELLED, 1000)[1].code == "62"
    # 58: a purchase or a deposit at a hospital, a medical settlement at a merchant
    # (a purchase at a hospital is permitted: engine/_core.pyx permitted_at, merchant/pharmacy/hospital)
    assert t.deposit(pan(32), 1000).code == "58"
    assert t.withdrawal(pan(32), 1000).code == "58"
    assert med(t, pan(32), 1000, med_type="41")[1].code == "58"                 # pharmacy visit at a hospital
    m = signed_on(srv, "T0000006", MERCHANT)
    assert med(m, pan(32), 1000)[1].code == "58"
    assert m.deposit(pan(32), 1000).code == "58"
    b = signed_on(srv, "T0000005", BANK)
    assert b.purchase(pan(32), 1000).code == "58"
    assert balances(t, pan(32)) == (ins0(32), FIN0)
    # 03: field 42 is not the terminal's institution
    t.mid = HOSPITAL2
    r = med(t, pan(34), 1000)[1]
    assert (r.code, r.mac_ok) == ("03", True)
    t.mid = HOSPITAL
    assert balances(t, pan(34)) == (ins0(34), FIN0)
    # 13: FO + OL + PS + IS ≠ field 4, and FP > IS
    assert med(t, pan(34), 1500, fo=1, is_=1500)[1].code == "13"
    assert med(t, pan(34), 1500, is_=1500, fp=1501)[1].code == "13"


def test_unregistered_97_and_not_signed_on_77(srv):
    u = srv.terminal("T9999999", HOSPITAL)
    r = u.sign_on()
    assert (r.mti, r.code) == ("0810", "97") and "64" not in r.fields
    r = u.send(cl.medical_request(amount_fen=1000, tlv=cl.medical_tlv(med_type="11", fo=0, ol=0, ps=0, is_=1000),
                                  pan=pan(36), **u.common()))
    assert (r.mti, r.code) == ("0210", "97") and "64" not in r.fields
    n = srv.terminal("T1000254", HOSPITAL)                                     # never signed on here
    _, r = med(n, pan(36), 1000)
    assert (r.mti, r.code, r.sign_on_requested) == ("0210", "77", True)
    assert "64" not in r.fields
    assert r.tpdu == bytes.fromhex("6000000003") and r.header[:2] == cl.DEFAULT_HEADER[:2]


def test_bad_mac_a0_three_then_77(srv):
    t = load_terminal(srv)
    good = t.mac_key
    for i in range(3):
        t.mac_key = bytes(16)
        _, r = med(t, pan(40), 1000)
        t.mac_key = good
        assert r.code == "A0" and "64" in r.fields
        assert cl.verify(r.body, "x9.19", good)                                 # still MACed, right key
        assert r.sign_on_requested == (i == 2)
    _, r = med(t, pan(40), 1000)
    assert (r.code, r.sign_on_requested) == ("77", True)
    assert balances_after_sign_on(t, pan(40)) == (ins0(40), FIN0)               # no effect
    # a missing MAC is A0 as well
    r = t.send(cl.echo_request(**t.common()), with_mac=False)
    assert r.code == "A0" and cl.verify(r.body, "x9.19", t.mac_key)


def balances_after_sign_on(t, card):
    assert t.sign_on().code == "00"
    return balances(t, card)


def test_malformed_body_is_30_and_unknown_route_is_12(srv):
    t = load_terminal(srv)
    request = cl.medical_request(amount_fen=12345, tlv=cl.medical_tlv(med_type="11", fo=0, ol=0, ps=0, is_=12345),
                                 pan=pan(30), **t.common())
    body = cl.seal(request, t.mac_alg, t.mac_key)
    assert body.count(b"156") == 1
    bad = body.replace(b"156", b"1$6")                                         # 49 an3: '$' is not an
    bad = bad[:-8] + mac_of(t.mac_alg, t.mac_key, bad[:-8])
    r = t.send_raw(cl.frame(bad))
    assert (r.mti, r.code, r.fields["11"], r.fields["41"]) == ("0210", "30", request["11"], t.tid)
    assert "64" in r.fields and cl.verify(r.body, t.mac_alg, t.mac_key)       # 30 replies are MACed
    # a field before 11 and 41 broken (4 not BCD): no reply is possible → the connection closes
    amount = bytes.fromhex("000000012345")
    assert body.count(amount) == 1
    bad = body.replace(amount, bytes.fromhex("00000001234A"))
    with srv.connect() as sock:
        sock.sendall(cl.frame(bad))
        assert sock.recv(100) == b""
    # unknown field 62 tag → 30
    odd = dict(request, **{"11": t.next_stan(), "62": cl.medical_tlv(med_type="11", fo=0, ol=0, ps=0, is_=12345) + b"ZZ0011"})
    assert t.send(odd).code == "30"
    # unknown route: 0200, 000000, 60.1 = 99
    r = t.send(cl.card_request("0200", "000000", "99", pan=pan(30), amount_fen=100, **t.common()))
    assert (r.code, r.mac_ok) == ("12", True)
    assert balances(t, pan(30)) == (ins0(30), FIN0)
    assert t.echo().code == "00"                                               # the connection still works


def test_batch_settlement_balanced_then_unbalanced_upload(srv):
    t = srv.terminal("T1000250", HOSPITAL)
    on = t.sign_on()
    assert on.code == "00" and on.fields["60"] == "00000001003"
    med(t, pan(24), 3000, presettle=True)                                      # counts in neither
    s1 = med(t, pan(24), 1000)[1]
    s2 = med(t, pan(26), 2000)[1]
    s3_req, s3 = med(t, pan(28), 3000)
    assert [r.code for r in (s1, s2, s3)] == ["00"] * 3
    assert t.medical_cancel(pan(28), 3000, **original_of(s3_req, s3)).code == "00"
    assert med(t, CARD_LOST, 700)[1].code == "41"                              # declined: counts in neither
    r = t.batch_settlement(3000, 2)
    assert (r.mti, r.code, r.mac_ok) == ("0510", "00", True)
    assert r.fields["48"][:30] == f"{3000:012d}{2:03d}{0:012d}{0:03d}" and r.fields["48"][30] == "1"
    assert r.fields["60"][2:8] == "000002"                                     # a new batch
    t.batch = "000002"
    u_req, u = med(t, pan(26), 500)
    assert u.code == "00"
    r = t.batch_settlement(999, 1)
    assert (r.code, r.fields["48"][30]) == ("00", "2")
    assert r.fields["48"][:30] == f"{500:012d}{1:03d}{0:012d}{0:03d}"
    assert r.fields["60"][2:8] == "000003"
    up = t.batch_upload([(int(u_req["11"]), pan(26), 500)], "201")
    assert (up.mti, up.code, up.mac_ok) == ("0330", "00", True)
    end = t.batch_upload((), "202")
    assert (end.code, end.mac_ok) == ("00", True)
    assert t.sign_on().fields["60"] == "00000003003"                           # the batch number holds


def test_reversal_restores_exactly_and_repeats(srv):
    bank = signed_on(srv, "T0000005", BANK)
    k, card = 16, pan(16)
    w_req = cl.withdrawal_request(amount_fen=50000, pan=card, pin_block_bytes=bank._pin("888888", card),
                                  **bank.common())
    w = bank.send(w_req)
    assert (w.code, w.balance("10")) == ("00", FIN0 - 50000)
    rev = bank.reversal(w_req, "98")
    assert (rev.mti, rev.code, rev.mac_ok) == ("0410", "00", True)
    assert balances(bank, card) == (ins0(k), FIN0)
    rev2 = bank.reversal(w_req, "A0")                                          # other reason: same answer
    assert (rev2.code, rev2.fields.get("37"), rev2.fields.get("54")) == (rev.code, rev.fields.get("37"), rev.fields.get("54"))
    assert balances(bank, card) == (ins0(k), FIN0)
    assert bank.send(w_req).code == "00" and balances(bank, card) == (ins0(k), FIN0)   # repeat: no new effect

    # a medical settlement reversal restores the deductible accumulator too
    t = load_terminal(srv)
    k, card = 18, pan(18)                                                      # Beijing, in service
    m_req, m = med(t, card, 100000)
    assert tlv(m, "FP", "DE", "AP", "IB") == {"FP": 0, "DE": 100000, "AP": 100000, "IB": ins0(k) - 100000}
    assert t.reversal(m_req).code == "00"
    assert balances(t, card) == (ins0(k), FIN0)
    assert t.medical_cancel(card, 100000, **original_of(m_req, m)).code == "12"   # reversed: 12
    _, m2 = med(t, card, 100000)
    assert tlv(m2, "FP", "DE", "AP") == {"FP": 0, "DE": 100000, "AP": 100000}

    # reversal of an unknown original → 00, then the late original → 25, no effect
    k, card = 20, pan(20)
    late = cl.medical_request(amount_fen=5000, tlv=cl.medical_tlv(med_type="11", fo=0, ol=0, ps=0, is_=5000),
                              pan=card, **t.common())
    assert t.reversal(late).code == "00"
    r = t.send(late)
    assert (r.code, r.mac_ok) == ("25", True)
    assert balances(t, card) == (ins0(k), FIN0)


def test_repeat_same_answer_and_duplicate_94(srv):
    t = load_terminal(srv)
    k, card = 14, pan(14)
    request = cl.medical_request(amount_fen=1500, tlv=cl.medical_tlv(med_type="11", fo=0, ol=0, ps=0, is_=1500),
                                 pan=card, **t.common())
    first = t.send(request)
    again = t.send(request)
    assert first.code == again.code == "00" and again.mac_ok
    for f in ("37", "38", "54", "62", "4"):
        assert again.fields[f] == first.fields[f], f
    assert balances(t, card) == (ins0(k) - 1500, FIN0)
    changed = dict(request, **{"4": "000000001600",
                               "62": cl.medical_tlv(med_type="11", fo=0, ol=0, ps=0, is_=1600)})
    dup = t.send(changed)
    assert (dup.code, dup.mac_ok) == ("94", True)
    assert balances(t, card) == (ins0(k) - 1500, FIN0)


# ---- 2. pipelining ---------------------------------------------------------------------------

def test_pipelined_200_on_one_connection(srv):
    t = load_terminal(srv)
    cards = range(100, 300)
    requests = [cl.medical_request(amount_fen=500 + k, tlv=cl.medical_tlv(med_type="11", fo=0, ol=0, ps=0, is_=500 + k),
                                   pan=pan(k), **t.common()) for k in cards]
    replies = t.send_pipelined(requests)                                       # one sendall, matched by 02 + 41 + 11
    assert len(replies) == 200
    for k, req, r in zip(cards, requests, replies):
        assert (r.code, r.mac_ok, r.fields["11"], r.fields["41"]) == ("00", True, req["11"], t.tid)
        assert (r.balance("91"), r.balance("10")) == (ins0(k) - 500 - k, FIN0)
        assert tlv(r, "AP", "IB") == {"AP": 500 + k, "IB": ins0(k) - 500 - k}
    assert len({r.fields["37"] for r in replies}) == 200
    assert balances(t, pan(150)) == (ins0(150) - 650, FIN0)


# ---- 7. metrics --------------------------------------------------------------------------------

def test_metrics_count_what_was_sent(srv):
    ok_name = 'yikatong_messages_total{kind="med_settle",code="00"}'
    nsf_name = 'yikatong_messages_total{kind="med_settle",code="51"}'
    text = srv.metrics()
    assert "# TYPE yikatong_messages_total counter" in text
    before_ok, before_nsf = srv.metric(ok_name), srv.metric(nsf_name)
    t = load_terminal(srv)
    replies_before = srv.metric("yikatong_reply_latency_ms_count")
    reply_ms_before = srv.metric("yikatong_reply_latency_ms_sum")
    for k in range(300, 310):
        assert med(t, pan(k), 100)[1].code == "00"
    big = FIN0 + ins0(310) + 1
    assert med(t, pan(310), big, fo=big)[1].code == "51"                       # all self-paid
    assert srv.metric(ok_name) - before_ok == 10
    assert srv.metric(nsf_name) - before_nsf == 1
    # the server's share of each reply's wait: one observation per message answered
    assert srv.metric("yikatong_reply_latency_ms_count") - replies_before == 11
    assert srv.metric("yikatong_reply_latency_ms_sum") > reply_ms_before       # each waited at least its commit
    assert (srv.metric('yikatong_reply_latency_ms_bucket{le="+Inf"}')
            == srv.metric("yikatong_reply_latency_ms_count"))
    # no checkpoint falls due on this node (1,000,000 records apart): none made, none failing
    assert [srv.metric(f'yikatong_checkpoints_total{{how="{how}"}}') for how in ("replay", "copy", "failed")] == [0, 0, 0]
    assert srv.metric("yikatong_checkpoint_failing") == 0


# ---- 3. garbage --------------------------------------------------------------------------------

def read_reply_or_close(sock):
    """A reply frame (bytes) or None when the server closed the connection."""
    try:
        head = b""
        while len(head) < 2:
            chunk = sock.recv(2 - len(head))
            if not chunk:
                return None
            head += chunk
        return cl._recv_exact(sock, struct.unpack(">H", head)[0])
    except ConnectionResetError:
        return None


def test_garbage_30_or_close_and_others_keep_working(srv):
    t = load_terminal(srv)                     # a connection opened before the garbage
    rng = random.Random(8583)
    for i in range(40):
        size = rng.randint(21, 400)
        payload = bytes(rng.getrandbits(8) for _ in range(size))
        if i % 2:                              # half keep a valid TPDU + header, random after it
            payload = cl.DEFAULT_TPDU + cl.DEFAULT_HEADER + payload[11:]
        with srv.connect() as sock:
            sock.sendall(struct.pack(">H", size) + payload)
            reply = read_reply_or_close(sock)
            if reply is not None:
                assert cl.parse_reply(reply).code == "30", reply.hex()
    # below the minimum frame, and above the maximum: that connection only closes
    for prefix in (b"\x00\x05" + bytes(5), b"\x08\x01", b"\xff\xff"):
        with srv.connect() as sock:
            sock.sendall(prefix)
            assert read_reply_or_close(sock) is None
    assert t.echo().code == "00"
    assert med(t, pan(42), 1000)[1].code == "00"
    assert load_terminal(srv).echo().code == "00"                               # new connections too


@pytest.fixture(scope="module", params=LOOPS)
def limits_srv(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"limits-{request.param}")
    config = base / "server.toml"
    config.write_text("[limits]\npartial_frame_timeout_ms = 500\nidle_timeout_ms = 3000\n")
    with ServerProcess(base / "node", loop=request.param, cards=100, config=str(config)) as server:
        yield server
        assert server.terminate() == 0, server.log()[-3000:]


def time_to_close(sock, limit_s=10.0) -> float:
    start = time.monotonic()
    sock.settimeout(limit_s)
    assert read_reply_or_close(sock) is None
    return time.monotonic() - start


@pytest.mark.parametrize("sent", [b"\x00\x40" + bytes.fromhex("6000030000603100"), b"\x00\x40", b"\x00"],
                         ids=["prefix+body", "prefix-only", "half-prefix"])
def test_partial_frame_times_out(limits_srv, sent):
    t = limits_srv.terminal("T0000001", HOSPITAL)
    assert t.sign_on().code == "00"
    with limits_srv.connect() as sock:
        sock.sendall(sent)
        elapsed = time_to_close(sock)
    assert 0.45 <= elapsed < 2.5, elapsed          # 500 ms (the sweep runs every 125 ms), not the 3 s idle
    assert t.echo().code == "00"                   # the other connection is untouched


def test_idle_connection_times_out(limits_srv):
    t = limits_srv.terminal("T0000002", HOSPITAL2)
    assert t.sign_on().code == "00"
    with limits_srv.connect() as sock:
        elapsed = time_to_close(sock)
    assert 2.95 <= elapsed < 6.0, elapsed
    assert t.sock.recv(10) == b""                  # idle since its sign-on as well: closed
    t.close()
    assert t.sign_on().code == "00" and t.echo().code == "00"


# ---- 4. 1000 concurrent connections --------------------------------------------------------------

def test_1000_concurrent_connections(srv):
    assert raise_fd_limit(4096) >= 1100
    terminals = []
    for n in range(200, 250):                      # load terminals T1000200…T1000249, 20 connections each
        t = srv.terminal(f"T{1000000 + n}", HOSPITAL)
        assert t.sign_on().code == "00"
        t.close()
        terminals.append(t)
    socks, expected = [], []
    try:
        for i in range(1000):
            socks.append(srv.connect(timeout_s=30))
        for i, sock in enumerate(socks):
            t = terminals[i % len(terminals)]
            request = cl.echo_request(**t.common())
            expected.append((t, request["11"]))
            sock.sendall(t.encode(request))
        for sock, (t, stan) in zip(socks, expected):
            reply = cl.parse_reply(cl.recv_frame(sock), t.mac_alg, t.mac_key)
            assert (reply.mti, reply.code, reply.mac_ok, reply.fields["11"], reply.fields["41"]) == \
                ("0830", "00", True, stan, t.tid)
        assert srv.metric("yikatong_connections") >= 1000                        # all open at once
    finally:
        for sock in socks:
            sock.close()


# ---- 5. SIGKILL under load, restart, every approval is in the journal --------------------------

def drive_medical(server, tid, cards, stop, approvals, errors, seed):
    """One client thread: medical settlements, one at a time, until the connection breaks."""
    rng = random.Random(seed)
    t = server.terminal(tid, HOSPITAL, timeout_s=10.0)
    try:
        assert t.sign_on().code == "00"
        while not stop.is_set():
            k = rng.randrange(cards)
            amount = rng.randint(100, 2000)
            _, reply = med(t, pan(k), amount)
            if reply.code in ("00", "10"):
                assert reply.mac_ok
                approvals.append((int(reply.fields["37"]), k, amount, reply.code))
            else:
                errors.append(reply.code)
    except (OSError, ConnectionError, cl.FrameError):
        pass
    except Exception as e:                         # pragma: no cover - reported by the test
        errors.append(repr(e))
    finally:
        t.close()


def test_sigkill_under_load_then_restart(tmp_path):
    from yikatong.engine.cardkeys import CardKeys, DEMO_DATA_KEY
    from yikatong.engine.layouts import Cmd, rc
    from yikatong.engine.workload import generated_pan_hashes
    from yikatong.ledger.journal import Journal

    cards = 1000
    data = tmp_path / "node"
    server = ServerProcess(data, loop="uvloop", cards=cards)
    approvals, errors, stop = [], [], threading.Event()
    threads = [threading.Thread(target=drive_medical, args=(server, f"T{1000100 + i}", cards, stop, approvals,
                                                             errors, i)) for i in range(4)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + 20
    while len(approvals) < 300 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.kill() == -signal.SIGKILL                # mid-stream
    stop.set()
    for th in threads:
        th.join(30)
    assert len(approvals) >= 300 and not errors, (len(approvals), errors[:5])

    # restart on the same data directory (no --demo): the ledger is recovered from the journal
    with ServerProcess(data, loop="uvloop", demo=False) as again:
        t = again.terminal("T1000104", HOSPITAL)
        assert t.sign_on().code == "00"
        _, r = med(t, pan(0), 100)
        assert r.code == "00"
        assert int(r.fields["37"]) > max(a[0] for a in approvals)               # RRNs never reused
        t.close()
        assert again.terminate() == 0, again.log()[-3000:]

    journal = Journal(str(data), readonly=True)
    try:
        records = journal.read()
    finally:
        journal.close()
    q, res = records["request"], records["result"]
    hashes = generated_pan_hashes(CardKeys(DEMO_DATA_KEY), cards)
    ok = (q["cmd"] == Cmd.MED_SETTLE) & np.isin(res["code"], [rc("00"), rc("10")])
    journaled = {(int(rrn), int(h), int(a)) for rrn, h, a in zip(res["rrn"][ok], q["pan_hash"][ok], q["amount_fen"][ok])}
    missing = [a for a in approvals if (a[0], int(hashes[a[1]]), a[2]) not in journaled]
    assert not missing, missing[:5]
    result = run_yikatong("verify", "--data", str(data))
    assert result.returncode == 0, result.stdout + result.stderr


# ---- 6. SIGTERM drains ------------------------------------------------------------------------

@pytest.mark.parametrize("loop", LOOPS)
def test_sigterm_drains_in_flight_requests(tmp_path, loop):
    data = tmp_path / "node"
    server = ServerProcess(data, loop=loop, cards=1000)
    killed = threading.Event()
    outcomes = []                                  # (sent before SIGTERM, got a reply)
    lock = threading.Lock()

    def client(i):
        t = server.terminal(f"T{1000150 + i}", HOSPITAL, timeout_s=20.0)
        assert t.sign_on().code == "00"
        rng = random.Random(i)
        try:
            while True:
                k = rng.randrange(1000)
                request = cl.medical_request(amount_fen=100, tlv=cl.medical_tlv(med_type="11", fo=0, ol=0, ps=0,
                                                                                 is_=100), pan=pan(k), **t.common())
                t.sock.sendall(t.encode(request))
                before = not killed.is_set()
                try:
                    reply = cl.parse_reply(cl.recv_frame(t.sock), t.mac_alg, t.mac_key)
                    got = reply.code == "00" and reply.mac_ok and reply.fields["11"] == request["11"]
                except (OSError, ConnectionError):
                    got = False
                with lock:
                    outcomes.append((before, got))
                if not got:
                    return
        except (OSError, ConnectionError):
            return
        finally:
            t.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    burst = server.terminal("T1000160", HOSPITAL, timeout_s=20.0)
    assert burst.sign_on().code == "00"
    requests = [cl.medical_request(amount_fen=100 + i, tlv=cl.medical_tlv(med_type="11", fo=0, ol=0, ps=0, is_=100 + i),
                                   pan=pan(500 + i), **burst.common()) for i in range(200)]
    while len(outcomes) < 100:
        time.sleep(0.005)
    burst.sock.sendall(b"".join(burst.encode(r) for r in requests))
    killed.set()
    server.proc.send_signal(signal.SIGTERM)
    replies = {}
    for _ in requests:                             # every burst request was sent before SIGTERM
        reply = cl.parse_reply(cl.recv_frame(burst.sock), burst.mac_alg, burst.mac_key)
        replies[reply.fields["11"]] = reply
    assert sorted(replies) == sorted(r["11"] for r in requests)
    assert all(r.code == "00" and r.mac_ok for r in replies.values())
    assert burst.sock.recv(10) == b""              # then the connection closes
    burst.close()
    for th in threads:
        th.join(30)
    assert server.wait(30) == 0, server.log()[-3000:]
    lost = [o for o in outcomes if o[0] and not o[1]]
    assert not lost, f"{len(lost)} requests sent before SIGTERM got no reply"
    assert sum(1 for o in outcomes if o[1]) >= 100
    result = run_yikatong("verify", "--data", str(data))
    assert result.returncode == 0, result.stdout + result.stderr


def test_bad_macs_on_management_messages_count_too(srv):
    """§3.3: three consecutive bad MACs — whatever the message — force a new sign-on."""
    t = load_terminal(srv)
    good = t.mac_key
    t.mac_key = bytes(16)
    replies = [t.echo() for _ in range(3)]
    t.mac_key = good
    assert [(r.code, r.sign_on_requested) for r in replies] == [("A0", False), ("A0", False), ("A0", True)]
    assert all(cl.verify(r.body, "x9.19", good) for r in replies)
    r = t.echo()
    assert (r.code, r.sign_on_requested) == ("77", True)
    assert t.sign_on().code == "00"
    # a good MAC in between resets the count: two bad, one good, two bad → still signed on
    good = t.mac_key
    for bad_run in (2, 2):
        t.mac_key = bytes(16)
        assert [t.echo().code for _ in range(bad_run)] == ["A0"] * bad_run
        t.mac_key = good
        assert t.echo().code == "00"


def test_batch_totals_survive_a_restart(tmp_path):
    """The 0500 compares with the ledger even after a restart: the open batch's totals are
    rebuilt from the journal (a reversal takes its original out again; a settled batch's records
    are not counted in the next one)."""
    data = tmp_path / "node"
    with ServerProcess(data, cards=100) as s:
        t = s.terminal("T1000251", HOSPITAL)
        assert t.sign_on().code == "00"
        med(t, pan(30), 1000)
        assert t.batch_settlement(1000, 1).fields["48"][30] == "1"          # batch 1 settled
        t.batch = "000002"
        assert med(t, pan(30), 2000)[1].code == "00"
        assert med(t, pan(32), 4000)[1].code == "00"
        r_req, r = med(t, pan(34), 8000)
        assert r.code == "00" and t.reversal(r_req).code == "00"
        assert s.terminate() == 0
    with ServerProcess(data, demo=False) as s:
        t = s.terminal("T1000251", HOSPITAL)
        assert t.sign_on().fields["60"] == "00000002003"
        r = t.batch_settlement(6000, 2)
        assert (r.code, r.fields["48"][:31]) == ("00", f"{6000:012d}{2:03d}{0:012d}{0:03d}1")
