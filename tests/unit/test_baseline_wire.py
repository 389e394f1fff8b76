"""The independent baseline client (bench/baseline) against PROTOCOL.md, with exact values.

Byte vectors are worked out by hand from PROTOCOL.md §2; MAC and PIN vectors are published ones
(ANSI X9.19 / ISO 9797-1 alg 3, ISO 9564 format 0) or computed step by step here.
"""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.baseline import client as cl
from bench.baseline import crypto as cr
from bench.baseline.iso_spec import SPEC, WireFormatError, decode_body, encode_body

KEY = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")


def body(mti: str, bitmap_fields, data_hex: str) -> bytes:
    """MTI + bitmap for ``bitmap_fields`` + the given field bytes."""
    bitmap = 0
    for f in bitmap_fields:
        bitmap |= 1 << (64 - f)
    return bytes.fromhex(mti) + bitmap.to_bytes(8, "big") + bytes.fromhex(data_hex)


# --- hand-computed byte vectors ---------------------------------------------------------------

VECTORS = [
    # (field, value, field bytes on the wire)
    ("22", "021", "0210"),                       # n3 left-aligned in 2 bytes
    ("22", "051", "0510"),
    ("3", "310000", "310000"),
    ("4", "000000012345", "000000012345"),
    ("11", "000042", "000042"),
    ("53", "2600000000000000", "2600000000000000"),
    ("2", "6214830000000017", "16" "6214830000000017"),           # LL BCD, even
    ("2", "621483000000001", "15" "6214830000000010"),            # odd: trailing 0 nibble
    ("2", "6214830000000000017", "19" "62148300000000000170"),    # n19
    ("32", "48020000", "08" "48020000"),
    ("32", "480200001", "09" "4802000010"),
    ("32", "12345678901", "11" "123456789010"),                   # n..11 max, odd
    ("35", "6214830000000017D3012", "21" "6214830000000017D30120"),  # separator nibble D
    ("48", "6214830000000025", "0016" "6214830000000025"),       # LLL = 2 bytes BCD
    ("48", "123", "0003" "1230"),
    ("60", "81000001000", "0011" "810000010000"),                 # 11 digits: pad nibble
    ("60", "22000001", "0008" "22000001"),
    ("61", "0000010000421124", "0016" "0000010000421124"),
    ("54", "1002156C000005000000", "0020" + b"1002156C000005000000".hex()),
    ("62", b"MT00211", "0007" + b"MT00211".hex()),               # b.. LLL counts bytes
    ("63", "001", "0003" + b"001".hex()),
    ("37", "000000000001", b"000000000001".hex()),
    ("39", "A0", b"A0".hex()),
    ("41", "T0000001", b"T0000001".hex()),
    ("42", "H11000000000001", b"H11000000000001".hex()),
    ("49", "156", b"156".hex()),
    ("52", bytes.fromhex("0412AC89ABCDEF67"), "0412AC89ABCDEF67"),
    ("64", bytes(range(8)), "0001020304050607"),
]


@pytest.mark.parametrize("field, value, wire", VECTORS, ids=[f"{v[0]}-{i}" for i, v in enumerate(VECTORS)])
def test_field_vectors(field, value, wire):
    expected = body("0200", [int(field)], wire)
    assert encode_body({"t": "0200", field: value}) == expected
    assert decode_body(expected) == {"t": "0200", field: value}


def test_mti_and_bitmap_bytes():
    assert encode_body({"t": "0800", "11": "000001", "41": "T0000001"}).hex().upper() == (
        "0800" "0020000000800000" "000001" + b"T0000001".hex().upper())


def test_track2_equals_sign_maps_to_D():
    assert encode_body({"t": "0200", "35": "6214830000000017=3012"}) == \
        body("0200", [35], "21" "6214830000000017D30120")


def test_fixed_numeric_right_aligned_with_leading_zeros():
    assert encode_body({"t": "0200", "4": 12345, "11": "42"}) == \
        body("0200", [4, 11], "000000012345" "000042")


def test_fields_in_ascending_order_whatever_the_dict_order():
    a = encode_body({"t": "0200", "41": "T0000001", "3": "000000", "11": "000001"})
    b = encode_body({"t": "0200", "11": "000001", "3": "000000", "41": "T0000001"})
    assert a == b == body("0200", [3, 11, 41], "000000" "000001" + b"T0000001".hex())


# --- rejections ---------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, field, reason", [
    (body("0200", [1], "00" * 8), "1", "secondary bitmap present, not used by this dialect"),
    (body("0200", [5], "000000000001"), "5", "not a field of this dialect"),
    (body("0200", [2], "05" "123455"), "2", "Field data is 6 nibbles, expecting 5"),  # pad nibble not 0
    (body("0200", [3], "31A000"), "3", "numeric field holds a non-decimal nibble"),
    (body("0200", [2], "20" + "00" * 10), "2", "Field data is 20 nibbles, larger than maximum 19"),
    (body("0200", [41], b"T00".hex()), "41", "Field data is 3 bytes, expecting 8"),
    (body("0200", [35], "03" "12E0"), "35", "track 2 holds a nibble other than 0-9 and D"),
    (bytes.fromhex("0A00") + bytes(8), "t", "MTI holds a non-decimal nibble"),
])
def test_decode_rejections(raw, field, reason):
    with pytest.raises(WireFormatError) as info:
        decode_body(raw)
    assert info.value.field == field
    assert info.value.reason == reason


def test_decode_error_carries_no_card_data():
    raw = body("0200", [2, 3], "16" "6214830000000017" "31A000")
    with pytest.raises(WireFormatError) as info:
        decode_body(raw)
    assert "6214830000000017" not in str(info.value)
    assert not any("6214830000000017" in repr(v) for v in vars(info.value).values())


@pytest.mark.parametrize("fields, field, reason", [
    ({"t": "0200", "2": "62148300000000A"}, "2", "numeric field holds a non-digit"),
    ({"t": "0200", "22": "21"}, "22", "Field data is 2 nibbles, expecting 3"),
    ({"t": "0200", "52": "00" * 8}, "52", "binary field needs bytes, got str"),
    ({"t": "0200", "65": "1"}, "65", "not a field of this dialect"),
    ({"t": "200"}, "t", "MTI must be 4 digits, got 3 characters"),
    ({"t": "0200", "41": "T01"}, "41", "Field data is 3 bytes, expecting 8"),
])
def test_encode_rejections(fields, field, reason):
    with pytest.raises(WireFormatError) as info:
        encode_body(fields)
    assert (info.value.field, info.value.reason) == (field, reason)


# --- hypothesis round trips: every field ------------------------------------------------------

def _digits(min_size, max_size):
    return st.text("0123456789", min_size=min_size, max_size=max_size)


def _field_strategy(key: str, spec: dict):
    number = int(key)
    fixed = spec["len_type"] == 0
    size = spec["max_len"]
    if number in (52, 64):
        return st.binary(min_size=8, max_size=8)
    if number == 62:
        return st.binary(min_size=0, max_size=size)
    if number == 35:
        return st.tuples(_digits(1, 19), _digits(0, 17)).map(lambda t: t[0] + "D" + t[1])
    if spec["data_enc"] == "b":   # numeric BCD
        return _digits(size, size) if fixed else _digits(0, size)
    printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
    return st.text(printable, min_size=size if fixed else 0, max_size=size)


_FIELD_KEYS = sorted((k for k in SPEC if k.isdigit() and k != "1"), key=int)
_MESSAGE = st.fixed_dictionaries(
    {"t": st.sampled_from(["0200", "0210", "0400", "0410", "0500", "0800", "0810", "0320"])},
    optional={k: _field_strategy(k, SPEC[k]) for k in _FIELD_KEYS})


@settings(max_examples=400, deadline=None)
@given(_MESSAGE)
def test_round_trip_every_field(message):
    raw = encode_body(message)
    assert decode_body(raw) == message
    assert encode_body(decode_body(raw)) == raw


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=300))
def test_decode_either_rejects_or_round_trips(raw):
    try:
        message = decode_body(raw)
    except WireFormatError:
        return
    assert encode_body(message) == raw


# --- framing ----------------------------------------------------------------------------------

def test_frame_layout_and_unframe():
    inner = encode_body({"t": "0800", "11": "000001"})
    framed = cl.frame(inner)
    assert framed[:2] == (5 + 6 + len(inner)).to_bytes(2, "big")
    assert framed[2:7] == bytes.fromhex("6000030000")
    assert framed[7:13] == bytes.fromhex("603100000000")
    assert cl.unframe(framed[2:]) == (framed[2:7], framed[7:13], inner)


def test_frame_size_limit():
    assert cl.check_length(b"\x08\x00") == 2048
    with pytest.raises(cl.FrameError, match="declared frame of 2049 bytes, larger than the maximum 2048"):
        cl.check_length(b"\x08\x01")
    with pytest.raises(cl.FrameError, match="frame of 2049 bytes"):
        cl.frame(bytes(2049 - 11))


def test_unframe_rejects_bad_tpdu():
    with pytest.raises(cl.FrameError, match="TPDU id 0x61, expecting 0x60"):
        cl.unframe(bytes.fromhex("6100030000" "603100000000") + bytes(10))


# --- TLV, balances, cards --------------------------------------------------------------------

def test_tlv_round_trip_and_bytes():
    tlv = cl.medical_tlv(med_type="21", fo=300000, ol=50000, ps=100000, is_=4550000, pa="1")
    assert tlv == b"MT00221FO006300000OL00550000PS006100000IS0074550000PA0011"
    assert cl.decode_tlv(tlv) == {"MT": "21", "FO": "300000", "OL": "50000", "PS": "100000",
                                  "IS": "4550000", "PA": "1"}


@pytest.mark.parametrize("raw, reason", [
    (b"MT0021", "TLV MT: 1 bytes, expecting 2"),
    (b"MT00211F", "TLV header cut short: 1 bytes left"),
    (b"mt00211", "TLV tag must be 2 capital letters and length 3 digits"),
    (b"MT00211MT00211", "TLV MT repeated"),
])
def test_tlv_rejections(raw, reason):
    with pytest.raises(WireFormatError) as info:
        cl.decode_tlv(raw)
    assert info.value.reason == reason


def test_balances():
    text = "1002156C000005000000" "9102156D000000000150"
    assert cl.encode_balances([("10", 5000000), ("91", -150)]) == text
    assert cl.decode_balances(text) == [cl.Balance("10", "02", "156", 5000000),
                                        cl.Balance("91", "02", "156", -150)]


def test_generated_pans_are_luhn_valid():
    assert cl.generated_pan(0) == "6214830100000008"
    assert cl.luhn_digit("621483000000001") == "7"   # DEMO.md card 6214830000000017
    for pan in ["6214830000000017", "6214830000000082"] + [cl.generated_pan(k) for k in range(50)]:
        total = sum(int(d) if i % 2 == 0 else (2 * int(d) - 9 if int(d) > 4 else 2 * int(d))
                    for i, d in enumerate(reversed(pan)))
        assert total % 10 == 0


# --- MACs ---------------------------------------------------------------------------------------

def test_x919_published_vector():
    # ANSI X9.19 / ISO 9797-1 MAC algorithm 3 test vector.
    assert cr.mac_x919(KEY, b"Now is the time for all ").hex().upper() == "A1C72E74EA3FA9B6"


def test_x919_step_by_step_with_padding():
    mab = bytes.fromhex("0200" "3020048020C09811" "000000000001000000")  # 19 bytes → 3 blocks
    padded = mab + bytes(5)
    left, right = KEY[:8], KEY[8:]
    h = bytes(8)
    for i in range(0, 24, 8):
        h = cr.des_encrypt(left, bytes(a ^ b for a, b in zip(h, padded[i:i + 8])))
    expected = cr.des_encrypt(left, cr.des_decrypt(right, h))
    assert cr.mac_x919(KEY, mab) == expected
    assert cr.mac("x9.19", KEY, mab) == expected


def test_cups_ecb_step_by_step():
    mab = bytes(range(1, 20))  # 19 bytes: 3 blocks after zero padding
    blocks = [mab[0:8], mab[8:16], mab[16:19] + bytes(5)]
    r = bytes(a ^ b ^ c for a, b, c in zip(*blocks))
    assert r.hex().upper() == "191A1B0808080818"
    h = b"191A1B0808080818"
    first = cr.tdes_encrypt(KEY, h[:8])
    second = cr.tdes_encrypt(KEY, bytes(a ^ b for a, b in zip(first, h[8:])))
    expected = second.hex().upper().encode()[:8]
    assert cr.mac_cups_ecb(KEY, mab) == expected == cr.mac("cups-ecb", KEY, mab)
    assert all(c in b"0123456789ABCDEF" for c in expected)


def test_cups_ecb_is_blind_to_swapped_aligned_blocks():
    # PROTOCOL.md §3.3: XOR folding lets aligned blocks be swapped without changing the MAC.
    a, b = b"AAAAAAAA", b"BBBBBBBB"
    assert cr.mac_cups_ecb(KEY, a + b) == cr.mac_cups_ecb(KEY, b + a)
    assert cr.mac_x919(KEY, a + b) != cr.mac_x919(KEY, b + a)


def test_zero_pad():
    assert cr.zero_pad(b"") == bytes(8)
    assert cr.zero_pad(b"12345678") == b"12345678"
    assert cr.zero_pad(b"123456789") == b"123456789" + bytes(7)


def test_seal_and_verify():
    fields = {"t": "0200", "3": "000000", "11": "000001", "41": "T0000001"}
    sealed = cl.seal(fields, "x9.19", KEY)
    unsealed = encode_body({**fields, "64": bytes(8)})
    assert sealed[:-8] == unsealed[:-8]                 # the MAB includes bit 64 in the bitmap
    assert sealed[-8:] == cr.mac_x919(KEY, unsealed[:-8])
    assert cl.verify(sealed, "x9.19", KEY)
    tampered = sealed[:-9] + bytes([sealed[-9] ^ 1]) + sealed[-8:]
    assert not cl.verify(tampered, "x9.19", KEY)
    assert cl.seal(fields, None, None) == encode_body(fields)


# --- PIN block and keys -----------------------------------------------------------------------

def test_pin_block_format0_published_vector():
    assert cr.pin_block_clear("1234", "43219876543210987").hex().upper() == "0412AC89ABCDEF67"
    # 06888888FFFFFFFF XOR 0000 483000000001 (12 PAN digits before the check digit)
    assert cr.pin_block_clear("888888", "6214830000000017").hex().upper() == "0688C0B8FFFFFFFE"
    assert cr.pin_block(KEY, "1234", "43219876543210987") == \
        cr.tdes_encrypt(KEY, bytes.fromhex("0412AC89ABCDEF67"))


def test_check_value_and_working_keys():
    assert cr.check_value(KEY).hex().upper() == "08D7B4FB"
    pin_key, mac_key = bytes(range(16)), bytes(range(16, 32))
    f62 = cr.encrypt_working_keys(KEY, pin_key, mac_key)
    assert len(f62) == 40
    assert f62[0:16] == cr.tdes_encrypt(KEY, pin_key) and f62[16:20] == cr.check_value(pin_key)
    assert cr.decrypt_working_keys(KEY, f62) == (pin_key, mac_key)
    with pytest.raises(cr.KeyCheckError, match="MAC key check value does not match"):
        cr.decrypt_working_keys(KEY, f62[:36] + bytes(4))
    with pytest.raises(cr.KeyCheckError, match="field 62: 39 bytes, expecting 40"):
        cr.decrypt_working_keys(KEY, f62[:39])


def test_tdes_double_length_is_k1_k2_k1():
    block = b"\x00" * 8
    expected = cr.des_encrypt(KEY[:8], cr.des_decrypt(KEY[8:], cr.des_encrypt(KEY[:8], block)))
    assert cr.tdes_encrypt(KEY, block) == expected


# --- request builders ---------------------------------------------------------------------------

COMMON = {"stan": 7, "tid": "T0000001", "mid": "H11000000000001", "batch": "000001"}


def test_sign_on_request_fields():
    assert cl.sign_on_request(**COMMON) == {
        "t": "0800", "11": "000007", "41": "T0000001", "42": "H11000000000001",
        "60": "00000001003", "63": "001"}


def test_medical_request_fields():
    import datetime
    when = datetime.datetime(2026, 11, 24, 9, 30, 5)
    tlv = cl.medical_tlv(med_type="11", fo=0, ol=0, ps=0, is_=10000)
    fields = cl.medical_request(amount_fen=10000, tlv=tlv, pan="6214830000000017", when=when,
                                **COMMON)
    assert fields == {"t": "0200", "2": "6214830000000017", "3": "000000", "4": "000000010000",
                      "11": "000007", "12": "093005", "13": "1124", "22": "022", "25": "00",
                      "41": "T0000001", "42": "H11000000000001", "49": "156",
                      "60": "81000001000", "62": tlv}
    rev = cl.reversal_request(fields, "A0")
    assert rev["t"] == "0400" and rev["39"] == "A0" and "62" not in rev
    assert {k: rev[k] for k in ("2", "3", "4", "11", "60")} == \
        {k: fields[k] for k in ("2", "3", "4", "11", "60")}


def test_cancel_carries_original_rrn_and_61():
    fields = cl.medical_cancel_request(amount_fen=500, pan="6214830000000017",
                                       orig_rrn="000000000012", orig_batch="000001",
                                       orig_stan=42, orig_date="1124", **COMMON)
    assert (fields["3"], fields["60"][:2], fields["37"], fields["61"]) == \
        ("200000", "82", "000000000012", "0000010000421124")


def test_batch_messages():
    totals = cl.settlement_totals(123456, 7, 500, 1)
    assert totals == "000000123456" "007" "000000000500" "001" "0" + "0" * 31
    assert len(totals) == 62
    upload = cl.batch_upload_request(entries=[(42, "6214830000000017", 10000)], **COMMON)
    assert upload["48"] == "01" "01" "000042" "00006214830000000017" "000000010000"
    assert upload["60"] == "00000001201"
    eight = cl.batch_upload_request(entries=[(i, "6214830000000017", 1) for i in range(8)],
                                    **COMMON)
    assert len(eight["48"]) == 322
    assert decode_body(encode_body(eight))["48"] == eight["48"]


def test_pipelined_match_key():
    assert cl.match_key({"t": "0210", "41": "T0000001", "11": "000007"}) == \
        cl.match_key({"t": "0200", "41": "T0000001", "11": "000007"})
