"""ISO 8583 codec (PROTOCOL.md §2–3, protocols/_codec.pyx): every message kind to its route, every
decoded request field, the duplicate key and content hash, the replies of DOMAIN.md's worked
cases A–D field by field, and every decode error with its exact field, byte offset and code —
and never with card data in it."""
import re

import numpy as np
import pytest

from yikatong.engine import Cmd, ReqFlag, new_requests, new_results, rc, REQUEST_DTYPE
from yikatong.protocols import _codec as c
from yikatong.protocols._codec import (Codec, DecodeError, decode_fields, describe_error,
                                       encode_fields)

BD = 20261124

# the codec's C enums (protocols/_codec.pxd), mirrored
WK_INVALID, WK_ENGINE, WK_SIGNON, WK_SIGNOFF, WK_ECHO, WK_SETTLE, WK_UPLOAD = range(7)
WF_MAC_REPLY, WF_RESIGN, WF_NO_REPLY, WF_PIN = 1, 2, 4, 8
(ERR_NONE, ERR_SHORT, ERR_TPDU, ERR_HEADER, ERR_BCD, ERR_PAD, ERR_LENGTH, ERR_SECONDARY,
 ERR_UNKNOWN_FIELD, ERR_TRAILING, ERR_CHARSET, ERR_MISSING, ERR_VALUE, ERR_TLV, ERR_TLV_TAG,
 ERR_ROUTE, ERR_TRACK2) = range(17)
RC30, RC12 = rc("30"), rc("12")

# Card data with distinctive digits: no 6-digit run of them occurs in any other part of a frame,
# in an offset, a length or a code, so finding one in an error means the error leaked it.
PAN = "6293817465092837"
PAN2 = "6257483920175364"                      # the transfer's receiving card (field 48)
TRACK2 = PAN + "D" + "30121015729384"          # 31 digits: odd, so a pad nibble follows
PIN_BLOCK = bytes.fromhex("8A3F5C7E19B2D460")
TPDU = bytes.fromhex("6012345678")
HEADER = bytes.fromhex("603100000000")


def tlv(*pairs) -> bytes:
    return b"".join(tag.encode() + b"%03d" % len(value) + value.encode() for tag, value in pairs)


# DOMAIN.md §2 common claim: total 50,000.00 = FO 3,000.00 + OL 500.00 + PS 1,000.00 + IS 45,500.00
CLAIM = (("MT", "21"), ("FO", "300000"), ("OL", "50000"), ("PS", "100000"), ("IS", "4550000"))
CLAIM_TOTAL = "000005000000"
PIN_FIELDS = {"52": PIN_BLOCK, "53": "2600000000000000"}
ORIGINAL = {"37": "000000000042", "61": "000001" + "000077" + "1123"}   # batch 1, STAN 77, 11-23

# name: (MTI, field 3, 60.1, extra fields, engine command)
CARD_MESSAGES = {
    "balance": ("0200", "310000", "01", PIN_FIELDS, Cmd.BALANCE),
    "purchase": ("0200", "000000", "22", {"4": "000000800000", **PIN_FIELDS}, Cmd.PURCHASE),
    "void": ("0200", "200000", "23", {"4": "000000800000", **ORIGINAL}, Cmd.VOID),
    "refund": ("0220", "200000", "25", {"4": "000000300000", **ORIGINAL}, Cmd.REFUND),
    "med": ("0200", "000000", "81", {"4": CLAIM_TOTAL, "62": tlv(*CLAIM)}, Cmd.MED_SETTLE),
    "cancel": ("0200", "200000", "82", {"4": CLAIM_TOTAL, **ORIGINAL}, Cmd.MED_CANCEL),
    "presettle": ("0200", "300000", "83", {"4": CLAIM_TOTAL, "62": tlv(*CLAIM)}, Cmd.MED_PRESETTLE),
    "deposit": ("0200", "210000", "91", {"4": "000000100000"}, Cmd.DEPOSIT),
    "withdraw": ("0200", "010000", "92", {"4": "000000100000", **PIN_FIELDS}, Cmd.WITHDRAW),
    "transfer": ("0200", "400000", "93", {"4": "000000100000", "48": PAN2, **PIN_FIELDS}, Cmd.TRANSFER),
}
REVERSIBLE = ["purchase", "void", "med", "cancel", "deposit", "withdraw", "transfer"]
NOT_REVERSIBLE = ["balance", "refund", "presettle"]


def message(name, **over) -> dict:
    """A valid request of CARD_MESSAGES[name] at T0000001, batch 1, STAN 123; `over` replaces
    fields by number ("_4" for field 4), None removes one."""
    mti, proc, f60_1, extra, _ = CARD_MESSAGES[name]
    fields = {"tpdu": TPDU, "header": HEADER, "t": mti, "2": PAN, "3": proc, "11": "000123",
              "12": "101010", "13": "1124", "22": "021", "25": "00", "41": "T0000001",
              "42": "H11000000000001", "49": "156", "60": f60_1 + "000001" + "000", **extra}
    return apply_over(fields, over)


def reversal(name, **over) -> dict:
    """0400 of CARD_MESSAGES[name]: the original's 2, 3, 4, 11, 60 plus 39, 41, 42 (PROTOCOL.md §3.2)."""
    original = message(name)
    fields = {k: original[k] for k in ("tpdu", "header", "2", "3", "11", "41", "42", "60")}
    fields.update({"t": "0400", "4": original.get("4", "000000000000"), "39": "98"})
    return apply_over(fields, over)


def management(mti, f60_3, **over) -> dict:
    fields = {"tpdu": TPDU, "header": HEADER, "t": mti, "11": "000123", "41": "T0000001",
              "42": "H11000000000001", "60": "00" + "000001" + f60_3}
    return apply_over(fields, over)


SETTLE_48 = ("000000800000" "001" "000000000000" "000" "0") + "0" * 31   # two groups (PROTOCOL.md §3.4)


def apply_over(fields, over):
    for key, value in over.items():
        key = key.lstrip("_")
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value
    return fields


def row(array) -> dict:
    return {name: int(array[0][name]) for name in REQUEST_DTYPE.names}


@pytest.fixture
def node(demo):
    engine, keys = demo
    codec = Codec([t.terminal_id for t in engine.config.terminals],
                  [i.code for i in engine.config.institutions], keys.pan_key, engine.config.institution_id)
    return engine, keys, codec


def decode_one(codec, fields_or_frame):
    """decode_batch of one frame: (request row array, wire row array, rejected count)."""
    frame = fields_or_frame if isinstance(fields_or_frame, bytes) else encode_fields(fields_or_frame)
    q = new_requests(1)
    w = np.zeros(1, c.WIRE_DTYPE)
    rejected = codec.decode_batch([frame], q, w)
    return q, w, rejected


# ---------------------------------------------------------------------------------------------
# routing (PROTOCOL.md §3)
# ---------------------------------------------------------------------------------------------
ROUTES = [(name, message(name), WK_ENGINE, spec[4]) for name, spec in CARD_MESSAGES.items()] + [
    ("balance-10", message("balance", _3="311000"), WK_ENGINE, Cmd.BALANCE),
    ("balance-91", message("balance", _3="319100"), WK_ENGINE, Cmd.BALANCE),
    ("sign-on", management("0800", "003"), WK_SIGNON, 0),
    ("sign-off", management("0820", "002"), WK_SIGNOFF, 0),
    ("echo", management("0820", "301"), WK_ECHO, 0),
    ("settle", management("0500", "201", _48=SETTLE_48), WK_SETTLE, 0),
    ("upload-201", management("0320", "201"), WK_UPLOAD, 0),
    ("upload-202", management("0320", "202"), WK_UPLOAD, 0),
    ("upload-207", management("0320", "207"), WK_UPLOAD, 0),
] + [(f"reversal-{name}", reversal(name), WK_ENGINE, Cmd.REVERSAL) for name in REVERSIBLE]


@pytest.mark.parametrize("name,fields,kind,cmd", ROUTES, ids=[r[0] for r in ROUTES])
def test_route(node, name, fields, kind, cmd):
    _, _, codec = node
    q, w, rejected = decode_one(codec, fields)
    assert rejected == 0
    assert (int(w[0]["kind"]), int(q[0]["cmd"]), int(q[0]["pre_code"]), int(w[0]["err_what"])) == (kind, cmd, 0, 0)
    assert int(w[0]["mti"]) == int(fields["t"])
    assert (int(w[0]["f60_1"]), int(w[0]["f60_3"])) == (int(fields["60"][:2]), int(fields["60"][8:]))
    if kind == WK_ENGINE:
        assert int(w[0]["proc_code"]) == int(fields["3"])


UNKNOWN_ROUTES = [
    ("0200-3-000000-60.1-99", message("purchase", _60="99000001000"), 200),
    ("0200-purchase-code-with-void-60.1", message("purchase", _60="23000001000"), 200),
    ("0200-balance-3-310001", message("balance", _3="310001"), 200),
    ("0200-3-500000-60.1-22", message("purchase", _3="500000"), 200),
    ("0220-3-000000-60.1-25", message("refund", _3="000000"), 220),
    ("0220-purchase", message("purchase", _t="0220"), 220),
    ("0100", message("purchase", _t="0100"), 100),
    ("0800-60.3-001", management("0800", "001"), 800),
    ("0820-60.3-003", management("0820", "003"), 820),
    ("0500-60.3-202", management("0500", "202", _48=SETTLE_48), 500),
    ("0320-60.3-203", management("0320", "203"), 320),
] + [(f"0400-of-{name}", reversal(name), 400) for name in NOT_REVERSIBLE]


@pytest.mark.parametrize("name,fields,mti", UNKNOWN_ROUTES, ids=[r[0] for r in UNKNOWN_ROUTES])
def test_unknown_route_is_answered_12(node, name, fields, mti):
    _, _, codec = node
    q, w, rejected = decode_one(codec, fields)
    assert rejected == 1
    assert (int(w[0]["kind"]), int(q[0]["cmd"]), int(q[0]["pre_code"])) == (WK_INVALID, 0, RC12)
    assert (int(w[0]["err_field"]), int(w[0]["err_offset"]), int(w[0]["err_what"]), int(w[0]["err_found"])) == \
        (0, 11, ERR_ROUTE, mti)
    assert int(w[0]["flags"]) & WF_NO_REPLY == 0           # 11 and 41 were read: it is answered
    with pytest.raises(DecodeError) as e:
        codec.decode(encode_fields(fields))
    assert str(e.value) == (f"frame header at byte 11: found {mti}, expecting a message of "
                            "PROTOCOL.md §3 (MTI + 3 + 60.1 + 60.3)")


def test_reversal_carries_only_what_protocol_lists(node):
    """PROTOCOL.md §3.2: a reversal carries the original's 3, 4, 11, 60 and 2 (+ 39, 41, 42): a
    reversal of a void or cancel needs no 37 / 61, a reversal of a transfer no 48."""
    _, keys, codec = node
    for name in REVERSIBLE:
        fields = reversal(name)
        assert not {"37", "48", "61", "62", "12", "13", "22", "25", "49"} & set(fields)
        q, w, rejected = decode_one(codec, fields)
        assert rejected == 0, (name, describe_error(w[0]))
        assert row(q) | {"idem_key": 0, "content_hash": 0} == row(new_requests(1)) | {
            "idem_key": 0, "content_hash": 0, "cmd": Cmd.REVERSAL, "pan_hash": keys.pan_hash(PAN),
            "pan_last4": 2837, "amount_fen": int(fields["4"]), "stan": 123, "batch_no": 1,
            "terminal_index": 0, "institution_index": 0}
        assert w[0]["f39"] == b"98"


# ---------------------------------------------------------------------------------------------
# decoded request fields
# ---------------------------------------------------------------------------------------------
def expected_row(keys, **fields):
    base = row(new_requests(1))
    base.update(pan_hash=keys.pan_hash(PAN), pan_last4=2837, terminal_index=0, institution_index=0,
                stan=123, batch_no=1, local_time=101010, local_date=1124)
    base.update(fields)
    return base


def decoded(codec, fields):
    q, w, rejected = decode_one(codec, fields)
    assert rejected == 0, describe_error(w[0])
    got = row(q)
    assert got["idem_key"] & 1 and got["idem_key"] >> 63 == 0 and got["content_hash"] != 0
    return got | {"idem_key": 0, "content_hash": 0}, w[0]


def test_purchase_row_and_wire(node):
    engine, keys, codec = node
    fields = message("purchase", _41="T0000005", _42="B11000000000001", _11="654321", _12="235959",
                     _13="0229", _60="22" + "000042" + "000", _64=bytes(range(1, 9)))
    got, w = decoded(codec, fields)
    assert got == expected_row(keys, cmd=Cmd.PURCHASE, amount_fen=800000, stan=654321, batch_no=42,
                               local_time=235959, local_date=229, flags=ReqFlag.PIN,
                               terminal_index=engine.terminal_index["T0000005"],
                               institution_index=engine.institution_index["B11000000000001"])
    frame = encode_fields(fields)
    assert (int(w["kind"]), int(w["mti"]), int(w["proc_code"]), int(w["stan"]), int(w["local_time"]),
            int(w["local_date"]), int(w["batch_no"]), int(w["f60_1"]), int(w["f60_3"]), int(w["f60_len"]),
            int(w["amount_fen"]), int(w["terminal_index"]), int(w["flags"])) == \
        (WK_ENGINE, 200, 0, 654321, 235959, 229, 42, 22, 0, 11, 800000, 4, WF_PIN)
    assert (w["tid"], w["mid"], bytes(w["tpdu"]), bytes(w["header"])) == (b"T0000005", b"B11000000000001", TPDU, HEADER)
    assert bytes(w["f60"]) == bytes.fromhex("2200004200000000") + b"\0"
    assert bytes(w["pin_block"]) == PIN_BLOCK
    assert (int(w["pan_len"]), bytes(w["pan"])) == (16, PAN.encode() + bytes(3))
    # the MAB: MTI up to the end of field 63 (here 60); field 64's 8 bytes are the frame's last
    assert (int(w["mac_offset"]), int(w["mab_len"])) == (len(frame) - 8, len(frame) - 8 - 11)
    assert bytes(w["mac"]) == bytes(range(1, 9))
    assert int(w["present"]) == sum(1 << (f - 1) for f in (2, 3, 4, 11, 12, 13, 22, 25, 41, 42, 49, 52, 53, 60, 64))


def test_without_mac_the_mab_runs_to_the_end(node):
    _, _, codec = node
    frame = encode_fields(message("deposit"))
    _, w, _ = decode_one(codec, frame)
    assert (int(w[0]["mac_offset"]), int(w[0]["mab_len"]), int(w[0]["flags"])) == (0, len(frame) - 11, 0)
    assert bytes(w[0]["pin_block"]) == bytes(8)


@pytest.mark.parametrize("proc,acct", [("310000", 0), ("311000", 10), ("319100", 91)])
def test_balance_inquiry_account_type(node, proc, acct):
    _, keys, codec = node
    got, _ = decoded(codec, message("balance", _3=proc, _4="000000000777"))
    # field 4 on a balance inquiry is not an amount: the row keeps 0
    assert got == expected_row(keys, cmd=Cmd.BALANCE, acct_type=acct, flags=ReqFlag.PIN)


@pytest.mark.parametrize("name", ["void", "refund", "cancel"])
def test_original_fields(node, name):
    _, keys, codec = node
    got, _ = decoded(codec, message(name))
    amount = int(CARD_MESSAGES[name][3]["4"])
    assert got == expected_row(keys, cmd=CARD_MESSAGES[name][4], amount_fen=amount, orig_rrn=42,
                               orig_batch=1, orig_stan=77, orig_date=1123)


def test_original_fields_longer_61_reads_the_first_16_digits(node):
    _, keys, codec = node
    got, _ = decoded(codec, message("void", _37="987654321098", _61="000009" "999999" "1231" "0123456789012"))
    assert (got["orig_rrn"], got["orig_batch"], got["orig_stan"], got["orig_date"]) == (987654321098, 9, 999999, 1231)


def test_transfer_pan2_hash(node):
    _, keys, codec = node
    got, _ = decoded(codec, message("transfer"))
    assert got == expected_row(keys, cmd=Cmd.TRANSFER, amount_fen=100000, pan2_hash=keys.pan_hash(PAN2),
                               flags=ReqFlag.PIN)
    got, _ = decoded(codec, message("transfer", _48="6214830000000025"))
    assert got["pan2_hash"] == keys.pan_hash("6214830000000025")


MED_FLAGS = [
    ((), ReqFlag.AU, 0),
    ((("AU", "1"),), ReqFlag.AU, 0),
    ((("AU", "0"),), 0, 0),
    ((("PA", "1"),), ReqFlag.AU | ReqFlag.PA, 0),
    ((("PA", "0"),), ReqFlag.AU, 0),
    ((("FP", "3000000"),), ReqFlag.AU | ReqFlag.FP, 3000000),
    ((("FP", "0"),), ReqFlag.AU | ReqFlag.FP, 0),
    ((("MD", "ZY-2026/11-24 #0001"), ("PA", "1"), ("AU", "0"), ("FP", "12")), ReqFlag.PA | ReqFlag.FP, 12),
]


@pytest.mark.parametrize("extra,flags,fp", MED_FLAGS)
@pytest.mark.parametrize("name", ["med", "presettle"])
def test_medical_tlv(node, name, extra, flags, fp):
    _, keys, codec = node
    # tags in any order: the optional ones first, the required ones reversed
    got, _ = decoded(codec, message(name, _62=tlv(*extra, *reversed(CLAIM))))
    assert got == expected_row(keys, cmd=CARD_MESSAGES[name][4], amount_fen=5000000, fo_fen=300000,
                               ol_fen=50000, ps_fen=100000, is_fen=4550000, med_type=21, flags=flags, fp_fen=fp)


@pytest.mark.parametrize("mt", ["11", "14", "21", "41"])
def test_medical_visit_types(node, mt):
    _, _, codec = node
    got, _ = decoded(codec, message("med", _62=tlv(("MT", mt), *CLAIM[1:])))
    assert got["med_type"] == int(mt)


def test_track2_pan_when_field_2_is_absent(node):
    _, keys, codec = node
    got, w = decoded(codec, message("purchase", _2=None, _35=TRACK2))
    assert got == expected_row(keys, cmd=Cmd.PURCHASE, amount_fen=800000, flags=ReqFlag.PIN)
    assert (int(w["pan_len"]), bytes(w["pan"][:16])) == (16, PAN.encode())
    # field 2 wins when both are present
    got, _ = decoded(codec, message("purchase", _35="6214830000000017D3012101"))
    assert got["pan_hash"] == keys.pan_hash(PAN)


@pytest.mark.parametrize("pan", ["6214830000017", "621483000000000001", "6214830000000000019"])
def test_pan_lengths(node, pan):
    _, keys, codec = node
    for fields in (message("deposit", _2=pan), message("deposit", _2=None, _35=pan + "D3012")):
        got, _ = decoded(codec, fields)
        assert (got["pan_hash"], got["pan_last4"]) == (keys.pan_hash(pan), int(pan[-4:]))


def test_unregistered_terminal_and_institution_decode_with_index_minus_1(node):
    """97 and 03 are the engine's answers (a decodable frame is not a format error)."""
    _, _, codec = node
    got, w = decoded(codec, message("deposit", _41="T9999999", _42="X00000000000000"))
    assert (got["terminal_index"], got["institution_index"], int(w["terminal_index"])) == (-1, -1, -1)
    assert codec.terminal_of("T9999999") == -1 and codec.terminal_of("T0000007") == 6


# ---------------------------------------------------------------------------------------------
# duplicate key (MTI class + 32 + 41 + 42 + 11 + 60.2 + 13) and content hash (PROTOCOL.md §3.2)
# ---------------------------------------------------------------------------------------------
def key_and_content(codec, fields):
    q, w, rejected = decode_one(codec, fields)
    assert rejected == 0, describe_error(w[0])
    return int(q[0]["idem_key"]), int(q[0]["content_hash"])


KEY_CHANGES = {
    "MTI class (0400)": dict(_t="0400", _39="98"),
    "32 added": dict(_32="48020000"),
    "41": dict(_41="T0000007"),                        # same institution, another terminal
    "42": dict(_42="H11000000000002"),
    "11": dict(_11="000124"),
    "60.2": dict(_60="22" "000002" "000"),
    "13": dict(_13="1125"),
}
SAME_KEY = {
    "amount": dict(_4="000000800001"),
    "12": dict(_12="101011"),
    "22": dict(_22="051"),
    "card": dict(_2="6214830000000017"),
    "0220 is class 2 like 0200": dict(_t="0220", _3="200000", _60="25" "000001" "000", **ORIGINAL),
    "60.3 is not part of the key": dict(_60="22" "000001" "001"),
}


def test_duplicate_key(node):
    _, _, codec = node
    base = message("purchase", _32="48020000")
    key, content = key_and_content(codec, base)
    assert key_and_content(codec, message("purchase", _32="48020000")) == (key, content)   # byte-identical repeat
    for name, over in KEY_CHANGES.items():
        fields = apply_over(dict(base), over)
        if name == "32 added":
            fields = apply_over(dict(base), {"_32": "48020001"})
        k, ct = key_and_content(codec, fields)
        assert k != key, name
    for name, over in SAME_KEY.items():
        k, ct = key_and_content(codec, apply_over(dict(base), over))
        assert k == key, name
        # content: the decoded row; 22 and 60.3 are not in it
        assert (ct != content) == (name not in ("22", "60.3 is not part of the key")), name


def test_duplicate_key_field_32(node):
    """Field 32 counts digits: 9 digits and 10 digits pack into the same 5 bytes (the 9-digit
    one padded with a trailing 0) and must still be different keys."""
    _, _, codec = node
    keys = {key_and_content(codec, message("purchase", _32=v))[0]
            for v in (None, "", "123456789", "1234567890", "12345678", "123456780", "48020000")}
    assert len(keys) == 7


def test_content_hash(node):
    _, _, codec = node
    key, content = key_and_content(codec, message("med"))
    assert key_and_content(codec, message("med")) == (key, content)
    assert key_and_content(codec, message("med", _4="000005000001")) == (key, key_and_content(codec, message("med", _4="000005000001"))[1])
    assert key_and_content(codec, message("med", _4="000005000001"))[1] != content
    claim = tlv(("MT", "21"), ("FO", "300000"), ("OL", "50000"), ("PS", "100001"), ("IS", "4550000"))
    assert key_and_content(codec, message("med", _62=claim))[1] != content
    # the PIN block is not content: a repeat is the same message whatever its PIN block
    a = key_and_content(codec, message("purchase"))
    assert key_and_content(codec, message("purchase", _52=bytes(8))) == a
    # a reversal's reason (39) is not content either (PROTOCOL.md §3.5)
    assert key_and_content(codec, reversal("purchase")) == key_and_content(codec, reversal("purchase", _39="06"))


# ---------------------------------------------------------------------------------------------
# replies (DOMAIN.md §2 worked cases A–D, through the demo engine)
# ---------------------------------------------------------------------------------------------
def claim_at(pan, terminal, institution, stan, *extra):
    return message("med", _2=pan, _41=terminal, _42=institution, _11="%06d" % stan,
                   _62=tlv(*CLAIM, *extra))


def round_trip(engine, codec, frames, flags=0, prepare=None, now=(120000, 1124)):
    count = len(frames)
    q = new_requests(count)
    w = np.zeros(count, c.WIRE_DTYPE)
    codec.decode_batch(frames, q, w)
    if prepare:
        prepare(q, w)
    w["flags"] |= flags
    results = engine.apply_batch(q, business_date=BD)
    out = bytearray(count * c.REPLY_BYTES_MAX)
    used = codec.encode_replies(w, q, results, count, out, BD, *now)
    replies = []
    for i in range(count):
        start, length = int(w[i]["reply_start"]), int(w[i]["reply_len"])
        if length == 0:
            replies.append(b"")
            continue
        assert int.from_bytes(out[start:start + 2], "big") == length - 2
        replies.append(bytes(out[start + 2:start + length]))
    assert used == sum(int(x) for x in w["reply_len"])
    return replies, results, w


def reply_fields(request, **fields):
    """The reply to `request`: TPDU swapped, header echoed, MTI + 10, 11 12 13 41 42 60 echoed,
    15 the business date, 32 the engine's institution id."""
    out = {"tpdu": bytes.fromhex("6056781234"), "header": HEADER, "t": "%04d" % (int(request["t"]) + 10),
           "11": request["11"], "12": request.get("12", "120000"), "13": request.get("13", "1124"),
           "15": "1124", "32": "48020000", "41": request["41"], "42": request["42"], "60": request["60"]}
    for f in ("3", "4"):
        if f in request:
            out[f] = request[f]
    return apply_over(out, fields)


def balances(fin, ins):
    return "1002156C%012d" % fin + "9102156C%012d" % ins


def tlv_reply(si, fp, de, ap, bp, ib, bb, cp=None):
    pairs = [("SI", si), ("FP", fp), ("DE", de), ("AP", ap), ("BP", bp)] + ([("CP", cp)] if cp is not None else []) \
        + [("IB", ib), ("BB", bb)]
    return tlv(*((t, str(v)) for t, v in pairs))


def check_62_sums_to_4(reply):
    values = {}
    data = reply["62"]
    while data:
        values[data[:2].decode()] = int(data[5:5 + int(data[2:5])])
        data = data[5 + int(data[2:5]):]
    assert values["FP"] + values["AP"] + values["BP"] + values.get("CP", 0) == int(reply["4"])


def test_replies_cases_a_b_c(node):
    engine, _, codec = node
    requests = [claim_at("6214830000000017", "T0000001", "H11000000000001", 1),
                claim_at("6214830000000025", "T0000003", "H31000000000001", 2),
                claim_at("6214830000000033", "T0000003", "H31000000000001", 3)]
    replies, _, _ = round_trip(engine, codec, [encode_fields(r) for r in requests])
    got = [decode_fields(r) for r in replies]
    assert got[0] == reply_fields(requests[0], _37="000000000001", _38="000001", _39="00", _54=balances(1062000, 0),
                                  _62=tlv_reply(1, 3862000, 130000, 200000, 938000, 0, 1062000))
    assert got[1] == reply_fields(requests[1], _37="000000000002", _38="000002", _39="00", _54=balances(940000, 0),
                                  _62=tlv_reply(2, 3740000, 150000, 200000, 1060000, 0, 940000))
    assert got[2] == reply_fields(requests[2], _37="000000000003", _38="000003", _39="00", _54=balances(1248000, 0),
                                  _62=tlv_reply(3, 4048000, 150000, 200000, 752000, 0, 1248000))
    for g in got:
        check_62_sums_to_4(g)


def test_replies_case_d(node):
    """Case D: case A again: declined 51 (no 38, no 62), then with PA=1 approved 10 with CP."""
    engine, _, codec = node
    requests = [claim_at("6214830000000017", "T0000001", "H11000000000001", 1),
                claim_at("6214830000000017", "T0000001", "H11000000000001", 2),
                claim_at("6214830000000017", "T0000001", "H11000000000001", 3, ("PA", "1"))]
    replies, _, _ = round_trip(engine, codec, [encode_fields(r) for r in requests])
    got = [decode_fields(r) for r in replies]
    assert got[1] == reply_fields(requests[1], _37="000000000002", _39="51", _54=balances(1062000, 0))
    assert got[2] == reply_fields(requests[2], _37="000000000003", _38="000003", _39="10", _54=balances(0, 0),
                                  _62=tlv_reply(3, 3917250, 65000, 0, 1062000, 0, 0, cp=20750))
    check_62_sums_to_4(got[2])


def test_reply_mac_slot_and_sign_on_request(node):
    """With WF_MAC_REPLY the reply ends with 8 zero bytes of field 64 for the MAC stage; with
    WF_RESIGN the header's processing-requirement nibble is 3."""
    engine, _, codec = node
    request = claim_at("6214830000000017", "T0000001", "H11000000000001", 1)
    replies, _, w = round_trip(engine, codec, [encode_fields(request)], flags=WF_MAC_REPLY | WF_RESIGN)
    got = decode_fields(replies[0])
    assert got == reply_fields(request, header=bytes.fromhex("603103000000"), _37="000000000001", _38="000001",
                               _39="00", _54=balances(1062000, 0),
                               _62=tlv_reply(1, 3862000, 130000, 200000, 938000, 0, 1062000), _64=bytes(8))
    reply_len = len(replies[0]) + 2
    assert (int(w[0]["reply_start"]), int(w[0]["reply_len"]), int(w[0]["reply_mab"]), int(w[0]["reply_mac"]),
            int(w[0]["reply_mab_len"])) == (0, reply_len, 13, reply_len - 8, reply_len - 8 - 13)


@pytest.mark.parametrize("proc,f54", [("310000", balances(2000000, 200000)), ("311000", "1002156C000002000000"),
                                      ("319100", "9102156C000000200000")])
def test_reply_balance_inquiry(node, proc, f54):
    engine, keys, codec = node
    request = message("balance", _2="6214830000000017", _3=proc)

    def pin_stage(q, w):                       # what the security stage does with field 52
        q["pin_pvv"] = keys.pvv(int(q[0]["pan_hash"]), "888888")
    replies, results, _ = round_trip(engine, codec, [encode_fields(request)], prepare=pin_stage)
    assert decode_fields(replies[0]) == reply_fields(request, _37="000000000001", _38="000001", _39="00", _54=f54)


def test_reply_reversal(node):
    """0410: 12 and 13 are the server's clock (a reversal carries neither), 39 is the engine's."""
    engine, _, codec = node
    bank = dict(_2="6214830000000017", _41="T0000005", _42="B11000000000001")
    purchase = message("deposit", **bank)
    rev = reversal("deposit", **bank)
    replies, results, w = round_trip(engine, codec, [encode_fields(purchase), encode_fields(rev)], now=(235501, 1125))
    assert list(w["kind"]) == [WK_ENGINE, WK_ENGINE]
    assert decode_fields(replies[0]) == reply_fields(purchase, _37="000000000001", _38="000001", _39="00",
                                                     _54=balances(2100000, 200000))
    assert decode_fields(replies[1]) == reply_fields(rev, _12="235501", _13="1125", _37="000000000002",
                                                     _38="000002", _39="00", _54=balances(2000000, 200000))


def test_leak_check_can_fail():
    for text in (f"found {PAN[3:9]}", PIN_BLOCK[2:5].hex().upper(), repr(PIN_BLOCK), "x" + TRACK2[16:22]):
        with pytest.raises(AssertionError):
            assert_no_card_data(text)


def test_reply_to_rejected_frames(node):
    """30 and 12 answered by the codec: what was read is echoed, no 37, 38, 54 or 62."""
    engine, _, codec = node
    bad_currency = message("purchase", _49="840")
    unknown = message("purchase", _60="99000001000")
    missing_4 = message("purchase", _4=None, _41="T0000002")
    replies, _, w = round_trip(engine, codec, [encode_fields(f) for f in (bad_currency, unknown, missing_4)])
    assert list(w["kind"]) == [WK_INVALID] * 3
    assert decode_fields(replies[0]) == reply_fields(bad_currency, _39="30")
    assert decode_fields(replies[1]) == reply_fields(unknown, _39="12")
    assert decode_fields(replies[2]) == reply_fields(missing_4, _39="30")


def test_no_reply_without_11_or_41(node):
    engine, _, codec = node
    frames = [encode_fields(message("purchase", _11=None)), encode_fields(message("purchase", _41=None)),
              b"\x60" + bytes(10), encode_fields(message("purchase", _t="0210")), encode_fields(management("0800", "003"))]
    replies, _, w = round_trip(engine, codec, frames)
    assert [int(x) & WF_NO_REPLY for x in w["flags"]] == [WF_NO_REPLY] * 4 + [0]
    assert replies == [b""] * 5 and list(w["reply_len"]) == [0] * 5      # sign-on: the server answers it


# ---------------------------------------------------------------------------------------------
# decode errors: exact field, offset, code; never card data
# ---------------------------------------------------------------------------------------------
def locate(frame):
    """Pure-Python field locator (the reference for offsets): {field: (prefix offset, data offset, bytes)}."""
    bitmap = int.from_bytes(frame[13:21], "big")
    pos, out = 21, {}
    for f in range(2, 65):
        if bitmap >> (64 - f) & 1:
            fmt, prefix, units = c.FIELD_SPEC[f]
            start = pos
            if prefix:
                units = int(frame[pos:pos + (prefix + 1) // 2].hex())
                pos += (prefix + 1) // 2
            nbytes = (units + 1) // 2 if fmt in ("n", "n-left", "z") else units
            out[f] = (start, pos, nbytes)
            pos += nbytes
    return out


def patched(fields, field, index, data, prefix=False):
    """The frame of `fields` with `data` written at byte `index` of `field`'s data (or prefix)."""
    frame = bytearray(encode_fields(fields))
    start, off, _ = locate(bytes(frame))[field]
    at = (start if prefix else off) + index
    frame[at:at + len(data)] = data
    return bytes(frame)


def with_bit(fields, field, data_after=None, before=None):
    """Set bitmap bit `field` and insert its raw bytes `data_after` at the right place."""
    frame = bytearray(encode_fields(fields))
    bitmap = int.from_bytes(frame[13:21], "big") | 1 << (64 - field)
    frame[13:21] = bitmap.to_bytes(8, "big")
    if data_after is not None:
        later = [f for f in locate(encode_fields(fields)) if f > field]
        at = locate(encode_fields(fields))[later[0]][0] if later else len(frame)
        frame[at:at] = data_after
    return bytes(frame)


# The purchase frame's layout (checked by test_purchase_layout): 2 @21 (LL) data 22..29, 3 @30,
# 4 @33, 11 @39, 12 @42, 13 @45, 22 @47, 25 @49, 41 @50, 42 @58, 49 @73, 52 @76, 53 @84,
# 60 @92 (LLL) data 94..99: 100 bytes.
PURCHASE = message("purchase")


def test_purchase_layout():
    assert {f: v[:2] for f, v in locate(encode_fields(PURCHASE)).items()} == {
        2: (21, 22), 3: (30, 30), 4: (33, 33), 11: (39, 39), 12: (42, 42), 13: (45, 45), 22: (47, 47),
        25: (49, 49), 41: (50, 50), 42: (58, 58), 49: (73, 73), 52: (76, 76), 53: (84, 84), 60: (92, 94)}
    assert len(encode_fields(PURCHASE)) == 100


def frame_of(fields):
    return encode_fields(fields)


def bytes_replaced(frame, at, data):
    frame = bytearray(frame)
    frame[at:at + len(data)] = data
    return bytes(frame)


P = encode_fields(PURCHASE)
MED = message("med")
TRANSFER = message("transfer")
TRACK = message("purchase", _2=None, _35=TRACK2)
VOID = message("void")


def med62(value: bytes) -> bytes:
    return encode_fields(message("med", _62=value))


def med62_offset():
    return locate(encode_fields(MED))[62][1]


# (id, frame, (field, offset, ERR_*, found or None), pre_code)
ERRORS = [
    ("empty", b"", (0, 0, ERR_SHORT, 0), RC30),
    ("1 byte", b"\x60", (0, 1, ERR_SHORT, 1), RC30),
    ("20 bytes", P[:20], (0, 20, ERR_SHORT, 20), RC30),
    ("short in field 2", P[:25], (2, 22, ERR_SHORT, None), RC30),
    ("short in field 2 prefix", P[:21], (2, 21, ERR_SHORT, None), RC30),
    ("short in field 60 prefix", P[:93], (60, 92, ERR_SHORT, 1), RC30),
    ("short in field 60", P[:99], (60, 94, ERR_SHORT, 5), RC30),
    ("short in field 52", P[:80], (52, 76, ERR_SHORT, None), RC30),
    ("short in field 35", encode_fields(TRACK)[:45], (35, 42, ERR_SHORT, None), RC30),
    ("bad TPDU", bytes_replaced(P, 0, b"\x61"), (0, 0, ERR_TPDU, 0x61), RC30),
    ("bad header", bytes_replaced(P, 5, b"\x06"), (0, 5, ERR_HEADER, 6), RC30),
    ("MTI nibble", bytes_replaced(P, 12, b"\x0A"), (0, 12, ERR_BCD, 10), RC30),
    ("MTI high nibble", bytes_replaced(P, 11, b"\xF2"), (0, 11, ERR_BCD, 15), RC30),
    ("BCD in field 4", bytes_replaced(P, 36, b"\x8B"), (4, 36, ERR_BCD, 11), RC30),
    ("BCD in field 11", bytes_replaced(P, 41, b"\xC3"), (11, 41, ERR_BCD, 12), RC30),
    ("BCD in field 2", bytes_replaced(P, 27, b"\x0E"), (2, 27, ERR_BCD, None), RC30),
    ("BCD in field 2 prefix", bytes_replaced(P, 21, b"\x1F"), (2, 21, ERR_BCD, None), RC30),
    ("BCD in field 60 prefix", bytes_replaced(P, 93, b"\xA1"), (60, 93, ERR_BCD, 10), RC30),
    ("BCD in field 35", patched(TRACK, 35, 3, b"\xE8"), (35, 45, ERR_BCD, None), RC30),
    ("BCD in field 48", patched(TRANSFER, 48, 2, b"\xA4"), (48, locate(encode_fields(TRANSFER))[48][1] + 2, ERR_BCD, None), RC30),
    ("pad of field 22 (fixed odd, left-aligned)", bytes_replaced(P, 48, b"\x17"), (22, 48, ERR_PAD, 7), RC30),
    ("pad of field 32 (variable odd)", patched(message("purchase", _32="480200001"), 32, 4, b"\x13"),
     (32, 55, ERR_PAD, 3), RC30),
    ("pad of field 2 (variable odd)", patched(message("purchase", _2=PAN + "123"), 2, 9, b"\x39"),
     (2, 31, ERR_PAD, None), RC30),
    ("pad of field 35 (odd)", patched(TRACK, 35, 15, b"\x49"), (35, 57, ERR_PAD, None), RC30),
    ("pad of field 60 (variable odd)", bytes_replaced(P, 99, b"\x01"), (60, 99, ERR_PAD, 1), RC30),
    ("LL of field 2 over 19", patched(PURCHASE, 2, 0, b"\x20", prefix=True), (2, 21, ERR_LENGTH, 20), RC30),
    ("LL of field 32 over 11", patched(message("purchase", _32="48020000"), 32, 0, b"\x12", prefix=True),
     (32, 50, ERR_LENGTH, 12), RC30),
    ("LL of field 35 over 37", patched(TRACK, 35, 0, b"\x38", prefix=True), (35, 41, ERR_LENGTH, 38), RC30),
    ("LLL of field 60 over 17", bytes_replaced(P, 92, b"\x00\x18"), (60, 92, ERR_LENGTH, 18), RC30),
    ("LLL of field 62 over 512", patched(MED, 62, 0, b"\x05\x13", prefix=True),
     (62, locate(encode_fields(MED))[62][0], ERR_LENGTH, 513), RC30),
    ("LLL of field 48 over 322", patched(TRANSFER, 48, 0, b"\x03\x23", prefix=True),
     (48, locate(encode_fields(TRANSFER))[48][0], ERR_LENGTH, 323), RC30),
    ("secondary bitmap", bytes_replaced(P, 13, bytes([P[13] | 0x80])), (0, 13, ERR_SECONDARY, 1), RC30),
    ("unknown field 5", with_bit(PURCHASE, 5, b"\x00" * 6), (5, 13, ERR_UNKNOWN_FIELD, 5), RC30),
    ("unknown field 33", with_bit(PURCHASE, 33, b"\x00"), (33, 17, ERR_UNKNOWN_FIELD, 33), RC30),
    ("unknown field 57", with_bit(PURCHASE, 57, b"\x00"), (57, 20, ERR_UNKNOWN_FIELD, 57), RC30),
    ("trailing bytes", P + b"\x00\x00\x00", (0, 100, ERR_TRAILING, 3), RC30),
    ("trailing PAN digits", P + bytes.fromhex(PAN), (0, 100, ERR_TRAILING, 8), RC30),
    ("charset of 41", bytes_replaced(P, 53, b"\x01"), (41, 53, ERR_CHARSET, 1), RC30),
    ("charset of 42", bytes_replaced(P, 72, b"\x7F"), (42, 72, ERR_CHARSET, 0x7F), RC30),
    ("charset of 49 (an)", bytes_replaced(P, 74, b"-"), (49, 74, ERR_CHARSET, 45), RC30),
    ("charset of 37 (an)", patched(VOID, 37, 11, b"."), (37, locate(encode_fields(VOID))[37][1] + 11, ERR_CHARSET, 46), RC30),
    ("charset of 63 (ans)", patched(message("purchase", _63="001"), 63, 1, b"\xff"),
     (63, 103, ERR_CHARSET, 0xFF), RC30),
] + [
    (f"missing {f}", encode_fields(message("purchase", **{f"_{f}": None})), (f, 13 + (f - 1) // 8, ERR_MISSING, None), RC30)
    for f in (11, 41, 42, 60, 3, 4, 12, 13, 22, 25, 49, 53)
] + [
    ("missing 2 and 35", encode_fields(message("purchase", _2=None)), (2, 13, ERR_MISSING, None), RC30),
    ("missing 4 (med)", encode_fields(message("med", _4=None)), (4, 13, ERR_MISSING, None), RC30),
    ("missing 37 (void)", encode_fields(message("void", _37=None)), (37, 17, ERR_MISSING, None), RC30),
    ("missing 61 (refund)", encode_fields(message("refund", _61=None)), (61, 20, ERR_MISSING, None), RC30),
    ("missing 61 (cancel)", encode_fields(message("cancel", _61=None)), (61, 20, ERR_MISSING, None), RC30),
    ("missing 48 (transfer)", encode_fields(message("transfer", _48=None)), (48, 18, ERR_MISSING, None), RC30),
    ("missing 48 (settle)", encode_fields(management("0500", "201")), (48, 18, ERR_MISSING, None), RC30),
    ("missing 62 (med)", encode_fields(message("med", _62=None)), (62, 20, ERR_MISSING, None), RC30),
    ("missing 62 (presettle)", encode_fields(message("presettle", _62=None)), (62, 20, ERR_MISSING, None), RC30),
    ("missing 39 (reversal)", encode_fields(reversal("purchase", _39=None)), (39, 17, ERR_MISSING, None), RC30),
    ("missing 4 (reversal)", encode_fields(reversal("purchase", _4=None)), (4, 13, ERR_MISSING, None), RC30),
    ("missing 3 (reversal)", encode_fields(reversal("purchase", _3=None)), (3, 13, ERR_MISSING, None), RC30),
    ("missing 3 (0220)", encode_fields(message("refund", _3=None)), (3, 13, ERR_MISSING, None), RC30),
    ("field 49 is 840", encode_fields(message("purchase", _49="840")), (49, 73, ERR_VALUE, None), RC30),
    ("field 60 of 9 digits", encode_fields(message("purchase", _60="220000010")), (60, 94, ERR_VALUE, 9), RC30),
    ("field 60 of 7 digits", encode_fields(message("purchase", _60="2200000")), (60, 94, ERR_VALUE, 7), RC30),
    ("field 2 of 12 digits", encode_fields(message("purchase", _2=PAN[:12])), (2, 22, ERR_VALUE, None), RC30),
    ("track 2 without separator", encode_fields(message("purchase", _2=None, _35=PAN + "3012")),
     (35, 42, ERR_TRACK2, None), RC30),
    ("track 2 with a 12-digit PAN", encode_fields(message("purchase", _2=None, _35=PAN[:12] + "D3012")),
     (35, 42, ERR_TRACK2, None), RC30),
    ("track 2 with a 20-digit PAN", encode_fields(message("purchase", _2=None, _35=PAN + "1234D3012")),
     (35, 42, ERR_TRACK2, None), RC30),
    ("balance account type 20", encode_fields(message("balance", _3="312000")), (3, 30, ERR_VALUE, 312000), RC30),
    ("37 not digits (void)", encode_fields(message("void", _37="00000000004A")),
     (37, locate(encode_fields(VOID))[37][1], ERR_VALUE, None), RC30),
    ("61 of 15 digits", encode_fields(message("refund", _61="000001000077112")),
     (61, locate(encode_fields(message("refund")))[61][1], ERR_VALUE, 15), RC30),
    ("48 of 12 digits (transfer)", encode_fields(message("transfer", _48=PAN2[:12])),
     (48, locate(encode_fields(TRANSFER))[48][1], ERR_VALUE, None), RC30),
    ("48 of 20 digits (transfer)", encode_fields(message("transfer", _48=PAN2 + "1234")),
     (48, locate(encode_fields(TRANSFER))[48][1], ERR_VALUE, None), RC30),
] + [
    # field 62 TLV: offsets relative to its data (added below); the common claim is 51 bytes
    ("TLV shorter than a header", med62(tlv(*CLAIM) + b"MT02"), (62, 51, ERR_TLV, 4), RC30),
    ("TLV length not digits", med62(b"MT0x221" + tlv(*CLAIM[1:])), (62, 2, ERR_TLV, None), RC30),
    ("TLV length 0", med62(b"MD000" + tlv(*CLAIM)), (62, 2, ERR_TLV, 0), RC30),
    ("TLV length past the end", med62(tlv(*CLAIM) + b"AU0091"), (62, 53, ERR_TLV, 9), RC30),
    ("TLV amount of 13 digits", med62(tlv(("FO", "0000000300000"), *CLAIM[2:], CLAIM[0])), (62, 2, ERR_TLV, 13), RC30),
    ("TLV MD of 31 characters", med62(tlv(("MD", "V" * 31), *CLAIM)), (62, 5, ERR_TLV, 31), RC30),
    ("TLV MD charset", med62(tlv(*CLAIM) + b"MD003A\x01B"), (62, 57, ERR_CHARSET, 1), RC30),
    ("TLV unknown tag", med62(tlv(*CLAIM, ("ZZ", "1"))), (62, 51, ERR_TLV_TAG, 0x5A5A), RC30),
    ("TLV lower-case tag", med62(tlv(("mt", "21"), *CLAIM)), (62, 0, ERR_TLV_TAG, 0x6D74), RC30),
    ("TLV repeated tag", med62(tlv(*CLAIM, ("OL", "50000"))), (62, 51, ERR_TLV_TAG, 0x4F4C), RC30),
    ("TLV repeated optional tag", med62(tlv(*CLAIM, ("PA", "1"), ("PA", "1"))), (62, 57, ERR_TLV_TAG, 0x5041), RC30),
    ("TLV missing MT", med62(tlv(*CLAIM[1:])), (62, 0, ERR_MISSING, 0x4D54), RC30),
    ("TLV missing FO", med62(tlv(CLAIM[0], *CLAIM[2:])), (62, 0, ERR_MISSING, 0x464F), RC30),
    ("TLV missing OL", med62(tlv(*CLAIM[:2], *CLAIM[3:])), (62, 0, ERR_MISSING, 0x4F4C), RC30),
    ("TLV missing PS", med62(tlv(*CLAIM[:3], CLAIM[4])), (62, 0, ERR_MISSING, 0x5053), RC30),
    ("TLV missing IS", med62(tlv(*CLAIM[:4])), (62, 0, ERR_MISSING, 0x4953), RC30),
    ("TLV empty", med62(b""), (62, 0, ERR_MISSING, 0x4D54), RC30),
    ("TLV MT 12", med62(tlv(("MT", "12"), *CLAIM[1:])), (62, 5, ERR_VALUE, 12), RC30),
    ("TLV MT 2", med62(tlv(("MT", "2"), *CLAIM[1:])), (62, 5, ERR_VALUE, 2), RC30),
    ("TLV amount not digits", med62(tlv(CLAIM[0], ("FO", "3000.0"), *CLAIM[2:])), (62, 12, ERR_VALUE, None), RC30),
    ("TLV AU 2", med62(tlv(*CLAIM, ("AU", "2"))), (62, 56, ERR_VALUE, 2), RC30),
    ("TLV PA 01", med62(tlv(*CLAIM, ("PA", "01"))), (62, 56, ERR_VALUE, 1), RC30),
    ("unknown route", encode_fields(message("purchase", _60="99000001000")), (0, 11, ERR_ROUTE, 200), RC12),
    ("0400 of a refund", encode_fields(reversal("refund")), (0, 11, ERR_ROUTE, 400), RC12),
    ("0200 without 3 and an unknown MTI", encode_fields(message("purchase", _t="0300", _3=None)), (0, 11, ERR_ROUTE, 300), RC12),
]
TLV_ERRORS = {e[0] for e in ERRORS if e[0].startswith("TLV")}


def expected_error(name, expected):
    field, offset, what, found = expected
    if name in TLV_ERRORS:                    # TLV offsets above are relative to field 62's data
        offset += med62_offset()
    return field, offset, what, found


CARD_DIGIT_RUNS = {s[i:i + 6] for s in (PAN, PAN2, TRACK2.replace("D", ""), TRACK2[17:]) for i in range(len(s) - 5)}


def assert_no_card_data(text: str):
    for run in CARD_DIGIT_RUNS:
        assert run not in text, f"{run!r} of the card data in {text!r}"
    for k in range(len(PIN_BLOCK) - 2):       # 3+ bytes of the PIN block, as hex or as raw bytes
        piece = PIN_BLOCK[k:k + 3]
        assert piece.hex() not in text.lower(), text
        assert repr(piece)[2:-1] not in text, text
        assert piece.decode("latin-1") not in text, text
    assert "D3012" not in text and "d3012" not in text


@pytest.mark.parametrize("name,frame,expected,pre_code", ERRORS, ids=[e[0] for e in ERRORS])
def test_decode_error(node, name, frame, expected, pre_code):
    _, _, codec = node
    field, offset, what, found = expected_error(name, expected)
    # the batch path: error data in the wire row, pre_code in the request row
    q, w, rejected = decode_one(codec, frame)
    wr = w[0]
    assert rejected == 1
    assert (int(wr["err_field"]), int(wr["err_offset"]), int(wr["err_what"]), int(wr["err_found"])) == \
        (field, offset, what, -1 if found is None else found)
    assert (int(q[0]["pre_code"]), int(wr["kind"]), int(q[0]["cmd"])) == (pre_code, WK_INVALID, 0)
    # nothing of the card stays behind in the rows once the codec has answered
    assert bytes(wr["pan"]) == bytes(19) and bytes(wr["pin_block"]) == bytes(8) and int(wr["pan_len"]) == 0
    assert int(wr["flags"]) & WF_PIN == 0
    assert (int(q[0]["pan_hash"]), int(q[0]["pan2_hash"]), int(q[0]["flags"]), int(q[0]["amount_fen"])) == (0, 0, 0, 0)
    line = describe_error(wr)
    shown = "withheld" if found is None else str(found)
    assert line == f"field {field} at byte {offset}: found {shown}, expecting {c.ERR_TEXT[what]}"
    # the one-frame path raises the same error
    with pytest.raises(DecodeError) as e:
        codec.decode(frame)
    err = e.value
    assert (err.field, err.offset, err.what, err.found) == (field, offset, what, found)
    where = f"field {field}" if field else "frame header"
    assert str(err) == f"{where} at byte {offset}: found {'withheld (card data)' if found is None else found}, " \
                       f"expecting {c.ERR_TEXT[what]}"
    for text in (str(err), repr(err), line, str(err.args), str(err.found), str(int(wr["err_found"])),
                 repr(err.__dict__)):
        assert_no_card_data(text)
    # decode_fields raises the same error when the fault is in the field layer
    if what in (ERR_SHORT, ERR_TPDU, ERR_HEADER, ERR_BCD, ERR_PAD, ERR_LENGTH, ERR_SECONDARY,
                ERR_UNKNOWN_FIELD, ERR_TRAILING, ERR_CHARSET) and name not in TLV_ERRORS:
        with pytest.raises(DecodeError) as e2:
            decode_fields(frame)
        assert (e2.value.field, e2.value.offset, e2.value.what, e2.value.found) == (field, offset, what, found)
        assert_no_card_data(str(e2.value))
    else:
        decode_fields(frame)                 # the semantic layer's errors: the fields themselves decode


def test_card_data_fields_withhold_what_was_found(node):
    """Faults inside 2, 35, 48, 52 never show the nibble or byte found (it is card data)."""
    names = [e for e in ERRORS if e[2][0] in (2, 35, 48, 52) and e[2][2] != ERR_LENGTH and e[2][2] != ERR_MISSING]
    assert len(names) >= 12
    assert all(e[2][3] is None for e in names)


def test_decode_error_message_examples():
    e = DecodeError(41, 53, ERR_CHARSET, 1)
    assert str(e) == "field 41 at byte 53: found 1, expecting a character of the field's set"
    e = DecodeError(2, 27, ERR_BCD, None)
    assert str(e) == "field 2 at byte 27: found withheld (card data), expecting a BCD digit 0-9"
    assert isinstance(e, ValueError) and e.expected == "a BCD digit 0-9"


def test_decode_error_pickles_and_copies():
    """Errors cross process and task boundaries (logging queues, executors) intact."""
    import copy
    import pickle
    for e in (DecodeError(2, 27, ERR_BCD, None), DecodeError(0, 11, ERR_ROUTE, 200)):
        for twin in (pickle.loads(pickle.dumps(e)), copy.copy(e), copy.deepcopy(e)):
            assert type(twin) is DecodeError and str(twin) == str(e)
            assert (twin.field, twin.offset, twin.what, twin.found, twin.expected) == (e.field, e.offset, e.what, e.found, e.expected)


def test_errors_in_a_batch_do_not_stop_it(node):
    _, keys, codec = node
    frames = [frame for _, frame, _, _ in ERRORS] + [encode_fields(message("deposit"))]
    q = new_requests(len(frames) + 3)
    w = np.zeros(len(frames) + 3, c.WIRE_DTYPE)
    assert codec.decode_batch(frames, q, w, first=2) == len(ERRORS)
    assert int(q[len(frames) + 1]["cmd"]) == Cmd.DEPOSIT and int(q[len(frames) + 1]["pan_hash"]) == keys.pan_hash(PAN)
    assert (int(q[0]["pre_code"]), int(w[0]["err_what"]), int(q[len(frames) + 2]["pre_code"])) == (0, 0, 0)


def test_decode_batch_rejects_bad_arguments(node):
    _, _, codec = node
    q, w = new_requests(2), np.zeros(2, c.WIRE_DTYPE)
    with pytest.raises(ValueError):
        codec.decode_batch([b""] * 3, q, w)
    with pytest.raises(ValueError):
        codec.decode_batch([b""], q, w, first=2)
    with pytest.raises(ValueError):
        codec.decode_batch([b""], q, w, first=-1)
    with pytest.raises(TypeError):
        codec.decode_batch([b""], np.zeros(2, np.int64), w)
    with pytest.raises(TypeError):
        codec.decode_batch([b""], q, np.zeros(2, np.int64))
    with pytest.raises(TypeError):
        codec.decode_batch(["x"], q, w)


def test_encode_fields_refuses_without_echoing_the_value():
    with pytest.raises(ValueError) as e:
        encode_fields({"t": "0200", "2": PAN + "6293817465"})
    assert str(e.value) == "field 2: 26 digits, expecting at most 19"
    with pytest.raises(ValueError) as e:
        encode_fields({"t": "0200", "2": PAN[:10] + "x" + PAN[11:]})
    assert str(e.value) == "field 2: expecting digits"
    with pytest.raises(ValueError) as e:
        encode_fields({"t": "0200", "52": PIN_BLOCK + b"\0"})
    assert str(e.value) == "field 52: 9 bytes, expecting exactly 8"
    with pytest.raises(ValueError) as e:
        encode_fields({"t": "0200", "5": "000000000001"})
    assert str(e.value) == "field 5: not in this dialect"


def test_content_hash_tells_every_byte(node):
    """The content hash (a 128-bit-multiply hash, not SipHash: see _codec.pyx) of a decoded row is
    what decode stores, and changing any one byte of the row to any other value changes it; no
    two of 100,000 random rows collide."""
    _, _, codec = node
    q, w, rejected = decode_one(codec, message("med"))
    row = q[0].copy()
    stored = int(row["content_hash"])
    row["idem_key"] = 0
    row["content_hash"] = 0
    raw = bytearray(row.tobytes())
    assert c.content_hash(bytes(raw)) == stored
    seen = {stored}
    for i in range(len(raw)):
        for delta in (1, 0x80, 0xFF):
            flipped = bytearray(raw)
            flipped[i] ^= delta
            seen.add(c.content_hash(bytes(flipped)))
    assert len(seen) == 1 + 3 * len(raw)
    rows = np.random.default_rng(7).integers(0, 256, (100_000, len(raw)), dtype=np.uint8)
    assert len({c.content_hash(r.tobytes()) for r in rows}) == 100_000


def test_reply_62_amounts_at_the_digit_count_edges(node):
    """62's amounts are written without leading zeros, however many digits: 0 → "0", 9, 10, 99,
    10**18 and the largest int64 (19 digits); a negative amount is written "0"."""
    _, _, codec = node
    frame = encode_fields(claim_at("6214830000000017", "T0000001", "H11000000000001", 1))
    q, w = new_requests(1), np.zeros(1, c.WIRE_DTYPE)
    codec.decode_batch([frame], q, w)
    r = new_results(1)
    r["code"], r["cmd"], r["rrn"] = rc("00"), Cmd.MED_SETTLE, 10
    r["fund_fen"], r["deductible_fen"], r["ins_leg_fen"], r["aid_leg_fen"] = 0, 9, 90, 9
    r["fin_leg_fen"], r["ins_balance_fen"], r["fin_balance_fen"] = 10**18, 2**63 - 1, -5
    out = bytearray(c.REPLY_BYTES_MAX)
    used = codec.encode_replies(w, q, r, 1, out, BD, 120000, 1124)
    reply = decode_fields(bytes(out[2:used]))
    assert reply["62"] == tlv(("SI", "10"), ("FP", "0"), ("DE", "9"), ("AP", "99"), ("BP", "1" + "0" * 18),
                              ("IB", "9223372036854775807"), ("BB", "0"))
