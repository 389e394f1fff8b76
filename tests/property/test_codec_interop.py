"""Interop: the Cython codec against an independent pyiso8583 spec written from PROTOCOL.md alone
(bench/baseline/iso_spec.py). Random valid messages encoded by pyiso8583 decode with ours to the
same fields, and ours encode to bytes pyiso8583 decodes to the same fields — byte for byte."""
import string

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bench.baseline import client as base_client
from bench.baseline import crypto as base_crypto
from bench.baseline import iso_spec
from yikatong.engine.demo import demo_engine
from yikatong.engine.layouts import Cmd, ReqFlag
from yikatong.protocols import _codec

TPDU = b"\x60\x00\x03\x00\x00"
HEADER = b"\x60\x31\x00\x00\x00\x00"
AN = string.ascii_letters + string.digits + " "
ANS = "".join(chr(c) for c in range(0x20, 0x7F))


def field_value(number: int):
    fmt, prefix, units = _codec.FIELD_SPEC[number]
    if fmt in ("n", "n-left"):
        low = units if prefix == 0 else 1
        return st.text("0123456789", min_size=low, max_size=units)
    if fmt == "z":
        return st.tuples(st.text("0123456789", min_size=13, max_size=19),
                         st.text("0123456789", min_size=0, max_size=17)).map(lambda t: t[0] + "D" + t[1])
    if fmt == "an":
        return st.text(AN, min_size=units if prefix == 0 else 0, max_size=units)
    if fmt == "ans":
        return st.text(ANS, min_size=units if prefix == 0 else 0, max_size=units)
    return st.binary(min_size=units if prefix == 0 else 0, max_size=units)


@st.composite
def messages(draw):
    fields = {"t": draw(st.sampled_from(["0200", "0210", "0220", "0400", "0500", "0800", "0820", "0320"]))}
    for number in sorted(_codec.FIELD_SPEC):
        if draw(st.booleans()):
            fields[str(number)] = draw(field_value(number))
    return fields


def ours_decoded(body_after_header: bytes) -> dict:
    fields = _codec.decode_fields(TPDU + HEADER + body_after_header)
    del fields["tpdu"], fields["header"]
    return fields


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_pyiso8583_encoded_decodes_with_ours(fields):
    body = iso_spec.encode_body(fields)
    assert ours_decoded(body) == fields


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_ours_encoded_decodes_with_pyiso8583(fields):
    frame = _codec.encode_fields(dict(fields, tpdu=TPDU, header=HEADER))
    assert frame[:11] == TPDU + HEADER
    assert iso_spec.decode_body(frame[11:]) == fields
    assert frame[11:] == iso_spec.encode_body(fields)           # byte for byte


# ---- semantic interop: the independent client's requests, our engine rows and replies --------
ENGINE, KEYS = demo_engine(100, business_date=20261130)
CONFIG = ENGINE.config
CODEC = _codec.Codec([t.terminal_id for t in CONFIG.terminals], [i.code for i in CONFIG.institutions],
                     KEYS.pan_key, CONFIG.institution_id)


@settings(max_examples=200, deadline=None)
@given(total=st.integers(0, 10**8), fo=st.integers(0, 10**6), ol=st.integers(0, 10**6), ps=st.integers(0, 10**6),
       med_type=st.sampled_from(["11", "14", "21", "41"]), pa=st.sampled_from([None, "0", "1"]),
       au=st.sampled_from([None, "0", "1"]), fp=st.one_of(st.none(), st.integers(0, 10**6)),
       stan=st.integers(1, 999999), card=st.integers(0, 99), presettle=st.booleans())
def test_independent_client_medical_request_decodes_to_the_row(total, fo, ol, ps, med_type, pa, au, fp, stan,
                                                                card, presettle):
    pan = base_client.generated_pan(card)
    is_ = max(0, total - fo - ol - ps)
    tlv = base_client.medical_tlv(med_type=med_type, fo=fo, ol=ol, ps=ps, is_=is_, au=au, pa=pa, fp=fp)
    build = base_client.medical_presettlement_request if presettle else base_client.medical_request
    fields = build(amount_fen=total, tlv=tlv, pan=pan, stan=stan, tid="T0000001", mid="H11000000000001",
                   batch="000007")
    body = iso_spec.encode_body(fields)
    requests, wires = CODEC.decode(TPDU + HEADER + body)
    q = requests[0]
    assert q["cmd"] == (Cmd.MED_PRESETTLE if presettle else Cmd.MED_SETTLE)
    assert q["pan_hash"] == KEYS.pan_hash(pan) and q["pan_last4"] == int(pan[-4:])
    assert (q["amount_fen"], q["fo_fen"], q["ol_fen"], q["ps_fen"], q["is_fen"]) == (total, fo, ol, ps, is_)
    assert q["fp_fen"] == (fp or 0) and q["med_type"] == int(med_type)
    assert bool(q["flags"] & ReqFlag.FP) == (fp is not None)
    assert bool(q["flags"] & ReqFlag.PA) == (pa == "1")
    assert bool(q["flags"] & ReqFlag.AU) == (au != "0")
    assert (q["stan"], q["batch_no"], q["terminal_index"]) == (stan, 7, 0)
    assert wires[0]["kind"] == 1 and q["pre_code"] == 0


def test_our_reply_decodes_with_pyiso8583_and_its_mac_verifies():
    """Case A through our codec; the reply read by pyiso8583, its X9.19 MAC checked by cryptography."""
    from yikatong.protocols import _security
    engine, keys = demo_engine(10, business_date=20261130)
    tlv = base_client.medical_tlv(med_type="21", fo=300000, ol=50000, ps=100000, is_=4550000)
    fields = base_client.medical_request(amount_fen=5000000, tlv=tlv, pan="6214830000000017", stan=42,
                                         tid="T0000001", mid="H11000000000001", batch="000001")
    mac_key = bytes(range(16))
    fields["64"] = bytes(8)
    body = iso_spec.encode_body(fields)
    body = body[:-8] + base_crypto.mac_x919(mac_key, body[:-8])
    frame = TPDU + HEADER + body
    requests, wires = CODEC.decode(frame)
    tk = _security.TerminalKeys(np.zeros(len(CONFIG.terminals), np.uint8))
    tk.sign_on(0, bytes(16), mac_key)
    _security.check_requests([frame], wires, requests, 1, tk, keys.pvv_key)
    assert requests["pre_code"][0] == 0                         # the independent MAC verified with ours
    results = engine.apply_batch(requests, business_date=20261130)
    out = bytearray(_codec.REPLY_BYTES_MAX)
    used = CODEC.encode_replies(wires, requests, results, 1, out, 20261130, 120000, 1130)
    _security.sign_replies(out, wires, 1, tk)
    reply = bytes(out[2:used])
    assert reply[:5] == b"\x60\x00\x00\x00\x03" and reply[5:11] == HEADER      # TPDU swapped, header echoed
    got = iso_spec.decode_body(reply[11:])
    assert base_crypto.mac_x919(mac_key, reply[11:-8]) == got["64"]
    assert {k: got[k] for k in ("t", "3", "4", "11", "15", "32", "37", "38", "39", "41", "42", "60")} == {
        "t": "0210", "3": "000000", "4": "000005000000", "11": "000042", "15": "1130", "32": "48020000",
        "37": "%012d" % results["rrn"][0], "38": "%06d" % results["auth_code"][0], "39": "00",
        "41": "T0000001", "42": "H11000000000001", "60": fields["60"]}
    tlv_out = base_client.decode_tlv(got["62"])
    # DOMAIN.md case A
    assert tlv_out["FP"] == "3862000" and tlv_out["DE"] == "130000" and tlv_out["AP"] == "200000"
    assert tlv_out["BP"] == "938000" and tlv_out["IB"] == "0" and tlv_out["BB"] == "1062000"
    assert int(tlv_out["FP"]) + int(tlv_out["AP"]) + int(tlv_out["BP"]) == 5000000
    assert got["54"] == "1002156C0000010620009102156C000000000000"


def test_reply_signed_with_the_next_batch_verifies_independently():
    """The server signs a batch's replies in the next batch's check_requests call (one bitsliced
    MAC call for both): the reply's field 64 is the one sign_replies writes, and cryptography's
    X9.19 verifies it; the next batch's own request MAC is still checked in that call."""
    from yikatong.protocols import _security
    engine, keys = demo_engine(10, business_date=20261130)
    mac_key = bytes(range(16, 32))
    tk = _security.TerminalKeys(np.zeros(len(CONFIG.terminals), np.uint8))
    tk.sign_on(0, bytes(16), mac_key)

    def signed_frame(stan):
        tlv = base_client.medical_tlv(med_type="21", fo=300000, ol=50000, ps=100000, is_=4550000)
        fields = base_client.medical_request(amount_fen=5000000, tlv=tlv, pan="6214830000000017", stan=stan,
                                             tid="T0000001", mid="H11000000000001", batch="000001")
        fields["64"] = bytes(8)
        body = iso_spec.encode_body(fields)
        return TPDU + HEADER + body[:-8] + base_crypto.mac_x919(mac_key, body[:-8])

    first, second = signed_frame(42), signed_frame(43)
    requests, wires = CODEC.decode(first)
    _security.check_requests([first], wires, requests, 1, tk, keys.pvv_key)
    results = engine.apply_batch(requests, business_date=20261130)
    out = bytearray(_codec.REPLY_BYTES_MAX)
    used = CODEC.encode_replies(wires, requests, results, 1, out, 20261130, 120000, 1130)
    alone = bytearray(out)
    _security.sign_replies(alone, wires, 1, tk)
    next_requests, next_wires = CODEC.decode(second)
    _security.check_requests([second], next_wires, next_requests, 1, tk, keys.pvv_key, out, wires, 1)
    assert next_requests["pre_code"][0] == 0                    # the next batch's request MAC verified
    assert out == alone and out[used - 8:used] != bytes(8)
    reply = bytes(out[2:used])
    assert base_crypto.mac_x919(mac_key, reply[11:-8]) == reply[-8:]
    with pytest.raises(ValueError, match="sign_count rows need sign_out"):
        _security.check_requests([second], next_wires, next_requests, 1, tk, keys.pvv_key, None, wires, 1)
