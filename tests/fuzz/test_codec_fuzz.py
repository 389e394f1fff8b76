"""Codec fuzzing (moov-io style): whatever `decode_fields` accepts re-encodes to the same bytes,
`Codec.decode_batch` survives any input and rejects only with 30 or 12 and a reason, whatever it
accepts re-encodes, and every reply it can answer decodes. A fixed-seed mutation loop over valid
frames of every message kind, plus hypothesis on random bytes and on generated field dicts."""
import random
import time

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from yikatong.engine import new_requests, new_results, rc, rc_str
from yikatong.engine.cardkeys import CardKeys, DEMO_DATA_KEY
from yikatong.engine.demo import demo_config
from yikatong.protocols import _codec as c
from yikatong.protocols._codec import Codec, DecodeError, decode_fields, encode_fields

CONFIG = demo_config()
CODEC = Codec([t.terminal_id for t in CONFIG.terminals], [i.code for i in CONFIG.institutions],
              CardKeys(DEMO_DATA_KEY).pan_key, CONFIG.institution_id)
RC30, RC12 = rc("30"), rc("12")
WK_INVALID, WK_ENGINE = 0, 1
WF_NO_REPLY, WF_MAC_REPLY = 4, 1
ERR_ROUTE = 15
# errors of the field layer (parse_fields): decode_fields raises them too
FIELD_LAYER = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
BD = 20261124


def tlv(*pairs) -> bytes:
    return b"".join(t.encode() + b"%03d" % len(v) + v.encode() for t, v in pairs)


def seed_frames():
    """Valid frames of every message kind of PROTOCOL.md §3 (and a few optional fields)."""
    claim = tlv(("MT", "21"), ("FO", "300000"), ("OL", "50000"), ("PS", "100000"), ("IS", "4550000"))
    card = {"2": "6214830000000017", "11": "000123", "12": "101010", "13": "1124", "22": "021",
            "25": "00", "41": "T0000001", "42": "H11000000000001", "49": "156"}
    pin = {"52": bytes.fromhex("8A3F5C7E19B2D460"), "53": "2600000000000000"}
    orig = {"37": "000000000042", "61": "0000010000771123"}
    kinds = [
        ("0200", "310000", "01", pin), ("0200", "000000", "22", {"4": "000000800000", **pin}),
        ("0200", "200000", "23", {"4": "000000800000", **orig}), ("0220", "200000", "25", {"4": "000000000100", **orig}),
        ("0200", "000000", "81", {"4": "000005000000", "62": claim + tlv(("PA", "1"), ("MD", "V-1"))}),
        ("0200", "200000", "82", {"4": "000005000000", **orig}),
        ("0200", "300000", "83", {"4": "000005000000", "62": tlv(("FP", "100"), ("AU", "0")) + claim}),
        ("0200", "210000", "91", {"4": "000000100000", "32": "48020000"}),
        ("0200", "010000", "92", {"4": "000000100000", **pin, "63": "001"}),
        ("0200", "400000", "93", {"4": "000000100000", "48": "6214830000000025", **pin, "64": bytes(8)}),
    ]
    frames = []
    for mti, proc, f60_1, extra in kinds:
        fields = {"t": mti, "3": proc, "60": f60_1 + "000001000", **card, **extra}
        frames.append(encode_fields(fields))
        if f60_1 in ("22", "23", "81", "82", "91", "92", "93"):       # its reversal
            rev = {k: fields[k] for k in ("2", "3", "11", "41", "42", "60") if k in fields}
            frames.append(encode_fields({"t": "0400", "4": fields["4"], "39": "98", **rev}))
    frames.append(encode_fields({"t": "0200", "3": "000000", "4": "000000000001", "60": "22000001000",
                                 **{k: v for k, v in card.items() if k != "2"}, "35": "6214830000000017D30121010000"}))
    for mti, f60_3, extra in (("0800", "003", {}), ("0820", "002", {}), ("0820", "301", {}),
                              ("0500", "201", {"48": "0" * 62}), ("0320", "201", {"48": "01" + "0" * 40}),
                              ("0320", "202", {}), ("0320", "207", {})):
        frames.append(encode_fields({"t": mti, "11": "000123", "41": "T0000001", "42": "H11000000000001",
                                     "60": "00000001" + f60_3, **extra}))
    return frames


SEEDS = seed_frames()


def prefix_offsets(frame):
    """Offsets of the length prefixes in a valid frame (field spec walk)."""
    bitmap = int.from_bytes(frame[13:21], "big")
    pos, out = 21, []
    for f in range(2, 65):
        if bitmap >> (64 - f) & 1:
            fmt, prefix, units = c.FIELD_SPEC[f]
            if prefix:
                out.append((pos, (prefix + 1) // 2))
                units = int(frame[pos:pos + (prefix + 1) // 2].hex())
                pos += (prefix + 1) // 2
            pos += (units + 1) // 2 if fmt in ("n", "n-left", "z") else units
    return out


def mutate(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(8)
        if op == 0 and data:                                   # bit flip
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1 and data:                                 # truncation
            del data[rng.randrange(len(data)):]
        elif op == 2:                                          # byte insertion
            at = rng.randint(0, len(data))
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        elif op == 3 and data:                                 # byte deletion
            at = rng.randrange(len(data))
            del data[at:at + rng.randint(1, 4)]
        elif op == 4:                                          # length prefix changed
            prefixes = prefix_offsets(frame)
            if prefixes:
                at, size = rng.choice(prefixes)
                if at + size <= len(data):
                    value = rng.choice([0, 1, rng.randrange(10 ** (2 * size)), 10 ** (2 * size) - 1])
                    data[at:at + size] = bytes.fromhex("%0*d" % (2 * size, value)) if rng.random() < 0.8 \
                        else bytes(rng.randrange(256) for _ in range(size))
        elif op == 5 and len(data) >= 21:                      # a bitmap bit set or cleared
            i = 13 + rng.randrange(8)
            data[i] ^= 1 << rng.randrange(8)
        elif op == 6 and data:                                 # a byte replaced
            data[rng.randrange(len(data))] = rng.choice([0x00, 0x0D, 0x20, 0x30, 0x39, 0x7F, 0x99, 0xDD, 0xFF])
        elif op == 7 and data:                                 # a tail repeated
            at = rng.randrange(len(data))
            data += data[at:at + rng.randint(1, 12)]
    return bytes(data)


def check_fields_round_trip(frame: bytes):
    """decode_fields raises DecodeError or gives a dict that re-encodes to the same bytes."""
    try:
        fields = decode_fields(frame)
    except DecodeError as e:
        return e
    assert encode_fields(fields) == frame
    return None


def check_batch(frames):
    """decode_batch + encode_replies over any frames: the invariants of the codec's batch path."""
    count = len(frames)
    q = new_requests(count)
    w = np.zeros(count, c.WIRE_DTYPE)
    rejected = CODEC.decode_batch(frames, q, w)
    pre = q["pre_code"]
    assert rejected == int((pre != 0).sum())
    invalid = w["kind"] == WK_INVALID
    assert (invalid == (pre != 0)).all()
    assert np.isin(pre[invalid], [RC30, RC12]).all()
    assert (w["err_what"][invalid] != 0).all() and (w["err_what"][~invalid] == 0).all()
    assert ((pre == RC12) == (w["err_what"] == ERR_ROUTE)).all()
    assert (w["pan"][invalid] == 0).all() and (w["pin_block"][invalid] == 0).all()
    assert (q["pan_hash"][invalid] == 0).all() and (q["cmd"][invalid] == 0).all()
    for i, frame in enumerate(frames):
        error = check_fields_round_trip(frame)
        what = int(w[i]["err_what"])
        field_layer = what in FIELD_LAYER and not (int(w[i]["err_field"]) == 62 and what == 10)
        assert (error is not None) == field_layer, (frame.hex(), what)
        if error is not None:
            found = int(w[i]["err_found"])
            assert (error.field, error.offset, error.what, error.found) == \
                (int(w[i]["err_field"]), int(w[i]["err_offset"]), what, None if found == -1 else found)
    # replies: results that exercise every reply field (approved, balances, medical TLV)
    results = new_results(count)
    results["code"] = np.where(np.arange(count) % 3 == 0, rc("05"), rc("00"))
    results["rrn"] = np.arange(1, count + 1)
    results["auth_code"] = np.arange(1, count + 1) % 1000000
    results["card_slot"] = np.where(np.arange(count) % 2 == 0, 0, -1)
    results["fund_fen"], results["ins_leg_fen"], results["fin_leg_fen"] = 3862000, 200000, 938000
    results["ins_balance_fen"], results["fin_balance_fen"] = 999999999999, -5
    w["flags"] |= np.where(np.arange(count) % 2 == 0, WF_MAC_REPLY, 0).astype(np.uint8)
    out = bytearray(count * c.REPLY_BYTES_MAX)
    used = CODEC.encode_replies(w.copy(), q, results, count, out, BD, 120000, 1124)
    # the server encodes every batch into one buffer it reuses: bytes left there by an earlier
    # batch must not show through anywhere in a reply
    stale = bytearray(b"\xa5" * len(out))
    assert CODEC.encode_replies(w, q, results, count, stale, BD, 120000, 1124) == used
    assert stale[:used] == out[:used]
    assert used <= len(out)
    for i in range(count):
        length = int(w[i]["reply_len"])
        answered = not (int(w[i]["flags"]) & WF_NO_REPLY) and int(w[i]["kind"]) in (WK_INVALID, WK_ENGINE)
        assert (length > 0) == answered
        if not length:
            continue
        assert length <= c.REPLY_BYTES_MAX
        start = int(w[i]["reply_start"])
        body = bytes(out[start + 2:start + length])
        assert int.from_bytes(out[start:start + 2], "big") == len(body)
        reply = decode_fields(body)
        assert encode_fields(reply) == body
        assert int(reply["t"]) == int(w[i]["mti"]) + 10 and reply["11"] == "%06d" % int(w[i]["stan"])
        code = rc_str(int(pre[i])) if invalid[i] else rc_str(int(results[i]["code"]))
        assert reply["39"] == code
        assert ("64" in reply) == bool(int(w[i]["flags"]) & WF_MAC_REPLY)
    return q, w


def test_seeds_are_valid():
    q, w = check_batch(SEEDS)
    assert (q["pre_code"] == 0).all() and (w["err_what"] == 0).all()
    assert sorted(set(int(k) for k in w["kind"])) == [1, 2, 3, 4, 5, 6]


def test_mutation_loop_fixed_seed():
    """~20k mutants of the seeds (bit flips, truncations, insertions, deletions, length prefixes,
    bitmap bits, tails): decode_fields and the batch path hold their invariants."""
    rng = random.Random(8583)
    accepted = rejected = 0
    t0 = time.monotonic()
    for _ in range(40):
        frames = [mutate(rng, rng.choice(SEEDS)) for _ in range(500)]
        q, _ = check_batch(frames)
        rejected += int((q["pre_code"] != 0).sum())
        accepted += int((q["pre_code"] == 0).sum())
    # both sides are exercised: the mutants are neither all garbage nor all harmless
    assert accepted + rejected == 20000 and accepted > 500 and rejected > 15000, (accepted, rejected)
    assert time.monotonic() - t0 < 60


def test_extreme_frames():
    rng = random.Random(2048)
    frames = [b"", b"\x60", bytes(20), bytes(21), b"\x60" * 2048, bytes(rng.randrange(256) for _ in range(2048)),
              SEEDS[0][:21], SEEDS[0] + bytes(2048 - len(SEEDS[0])), bytes(65536), b"\xff" * 4096]
    frames += [bytes(rng.randrange(256) for _ in range(rng.choice([1, 2, 11, 21, 22, 100, 2048]))) for _ in range(200)]
    # a valid header and then random bytes: the field layer is reached
    frames += [SEEDS[rng.randrange(len(SEEDS))][:21] + bytes(rng.randrange(256) for _ in range(rng.randrange(300)))
               for _ in range(500)]
    check_batch(frames)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(min_size=0, max_size=2048), min_size=1, max_size=8))
def test_random_bytes(frames):
    check_batch(frames)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SEEDS), st.binary(min_size=0, max_size=200), st.integers(21, 400))
def test_valid_header_random_fields(seed, tail, cut):
    check_batch([seed[:21] + tail, seed[:cut] + tail, seed[:cut]])


# ---------------------------------------------------------------------------------------------
# round trip: any valid field dict → encode_fields → decode_fields → the same dict
# ---------------------------------------------------------------------------------------------
DIGITS = "0123456789"
AN = DIGITS + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz "
ANS = "".join(chr(i) for i in range(0x20, 0x7F))


def value_strategy(fmt, prefix, units):
    size = dict(min_size=units, max_size=units) if prefix == 0 else dict(min_size=0, max_size=units)
    if fmt in ("n", "n-left"):
        return st.text(DIGITS, **size)
    if fmt == "z":
        return st.text(DIGITS + "D", **size)
    if fmt == "an":
        return st.text(AN, **size)
    if fmt == "ans":
        return st.text(ANS, **size)
    return st.binary(**size)


field_dicts = st.fixed_dictionaries(
    {"tpdu": st.binary(min_size=4, max_size=4).map(lambda b: b"\x60" + b),
     "header": st.binary(min_size=5, max_size=5).map(lambda b: b"\x60" + b),
     "t": st.text(DIGITS, min_size=4, max_size=4)},
    optional={str(f): value_strategy(*spec) for f, spec in c.FIELD_SPEC.items()})


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field_dicts)
def test_fields_round_trip(fields):
    frame = encode_fields(fields)
    assert decode_fields(frame) == fields
    # and the batch path never crashes on it
    check_batch([frame])


def test_every_field_at_its_maximum_round_trips():
    fields = {"tpdu": b"\x60\x01\x02\x03\x04", "header": b"\x60\x31\x00\x00\x00\x00", "t": "0200"}
    for f, (fmt, prefix, units) in c.FIELD_SPEC.items():
        fields[str(f)] = {"n": "9", "n-left": "7", "z": "D", "an": "z", "ans": "~", "b": b"\xff"}[fmt] * units
    frame = encode_fields(fields)
    assert decode_fields(frame) == fields
    check_batch([frame])
