"""Codec benchmark (the codec issue, item 7): decode of a medical-settlement request + encode of
its reply, without and with the X9.19 MACs (request verified, reply generated), against
pyiso8583 + `cryptography` doing the same work message by message, in the same run.

    make bench                                                          # CI size
    YIKATONG_BENCH_SIZE=full .venv/bin/python -m pytest -q bench/bench_codec.py -p no:cacheprovider -s

Ours runs per batch (Codec.decode_batch → Codec.encode_replies; _security.check_requests /
sign_replies for the MACs, bitsliced across the batch). The engine's results are computed once
beforehand: the codec's cost is what is measured. Goals: the pair ≤ 2 µs without MACs, the
MACs ≤ 1.5 µs, the whole ≥ 25× the baseline. Figures are reported, not asserted.
"""
import hashlib
import time

import numpy as np

from bench.baseline import crypto as base_crypto
from bench.baseline import iso_spec
from bench.conftest import size
from yikatong.engine import new_requests
from yikatong.engine.demo import demo_engine
from yikatong.engine.demo import generated_pans
from yikatong.protocols import _client, _codec, _security

SEED = 20261124
BUSINESS_DATE = 20261130


def setup(n: int):
    engine, keys = demo_engine(10_000, business_date=BUSINESS_DATE)
    cfg = engine.config
    codec = _codec.Codec([t.terminal_id for t in cfg.terminals], [i.code for i in cfg.institutions],
                         keys.pan_key, cfg.institution_id)
    t = [x.terminal_id for x in cfg.terminals].index("T1000000")
    rng = np.random.default_rng(SEED)
    mac_key = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
    pin_key = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
    factory = _client.RequestFactory("T1000000", "H11000000000001", 1, generated_pans(0, 10_000), mac_key,
                                     pin_key, 0)
    out = bytearray(n * factory.frame_bytes_max())
    used = factory.build(np.zeros(n, np.uint8), np.arange(1, n + 1, dtype=np.uint32),
                         rng.integers(0, 10_000, n, dtype=np.int64), rng.integers(100, 20000, n, dtype=np.int64), out)
    frames, pos = [], 0
    while pos < used:
        length = int.from_bytes(out[pos:pos + 2], "big")
        frames.append(bytes(out[pos + 2:pos + 2 + length]))
        pos += 2 + length
    terminal_keys = _security.TerminalKeys(np.zeros(len(cfg.terminals), np.uint8))
    terminal_keys.sign_on(t, pin_key, mac_key)
    requests = new_requests(n)
    wires = np.zeros(n, _codec.WIRE_DTYPE)
    codec.decode_batch(frames, requests, wires)
    results = engine.apply_batch(requests, business_date=BUSINESS_DATE)
    return codec, frames, results, terminal_keys, keys, mac_key


def ours(codec, frames, results, terminal_keys, card_keys, with_mac: bool):
    n = len(frames)
    requests = new_requests(n)
    wires = np.zeros(n, _codec.WIRE_DTYPE)
    reply_buffer = bytearray(n * _codec.REPLY_BYTES_MAX)
    start = time.perf_counter()
    codec.decode_batch(frames, requests, wires)
    if with_mac:
        _security.check_requests(frames, wires, requests, n, terminal_keys, card_keys.pvv_key)
    used = codec.encode_replies(wires, requests, results, n, reply_buffer, BUSINESS_DATE, 120000, 1130)
    if with_mac:
        _security.sign_replies(reply_buffer, wires, n, terminal_keys)
    elapsed = time.perf_counter() - start
    return elapsed, requests, bytes(reply_buffer[:used]), wires


def baseline(frames, results, mac_key: bytes, with_mac: bool):
    """pyiso8583 + cryptography, one message at a time: decode (and verify the MAC), build the
    reply's fields from the result row, encode (and MAC) it."""
    start = time.perf_counter()
    amounts = 0
    replies = []
    for frame, r in zip(frames, results):
        fields = iso_spec.decode_body(frame[11:])
        if with_mac:
            assert base_crypto.mac_x919(mac_key, frame[11:-8]) == fields["64"]
        amounts += int(fields["4"])
        reply = {"t": "0210", "3": fields["3"], "4": fields["4"], "11": fields["11"], "12": fields["12"],
                 "13": fields["13"], "15": "1130", "32": "48020000", "37": "%012d" % r["rrn"],
                 "38": "%06d" % r["auth_code"], "39": "00", "41": fields["41"], "42": fields["42"],
                 "54": "1002156C%012d9102156C%012d" % (r["fin_balance_fen"], r["ins_balance_fen"]),
                 "60": fields["60"],
                 "62": b"".join(t + b"%03d" % len(v) + v for t, v in (
                     (b"SI", b"%d" % r["rrn"]), (b"FP", b"%d" % r["fund_fen"]), (b"DE", b"%d" % r["deductible_fen"]),
                     (b"AP", b"%d" % (r["ins_leg_fen"] + r["aid_leg_fen"])), (b"BP", b"%d" % r["fin_leg_fen"]),
                     (b"IB", b"%d" % r["ins_balance_fen"]), (b"BB", b"%d" % r["fin_balance_fen"])))}
        if with_mac:
            reply["64"] = bytes(8)
        body = iso_spec.encode_body(reply)
        if with_mac:
            body = body[:-8] + base_crypto.mac_x919(mac_key, body[:-8])
        replies.append(body)
    return time.perf_counter() - start, amounts, replies


def test_codec_pair(benchmark):
    n = size(512, 4096)
    codec, frames, results, terminal_keys, card_keys, mac_key = setup(n)
    figures = {}
    for with_mac in (False, True):
        durations = []

        def run():
            elapsed, requests, replies, wires = ours(codec, frames, results, terminal_keys, card_keys, with_mac)
            durations.append(elapsed)
            return requests, replies, wires
        requests, replies, wires = (benchmark.pedantic(run, rounds=size(5, 20), iterations=1, warmup_rounds=1)
                                    if with_mac else [run() for _ in range(size(5, 20))][-1])
        assert (requests["pre_code"] == 0).all()
        subset = size(128, 1024)
        runs = [baseline(frames[:subset], results[:subset], mac_key, with_mac) for _ in range(3)]
        base_s = min(r[0] for r in runs)                    # best of 3, like ours (min of rounds)
        _, base_amounts, base_replies = runs[-1]
        # the same work: same amounts decoded; our replies decode with pyiso8583 to the fields it built
        assert int(requests["amount_fen"][:subset].sum()) == base_amounts
        first = replies[2:2 + int(wires["reply_len"][0]) - 2]
        ours_fields = iso_spec.decode_body(first[11:])
        base_fields = iso_spec.decode_body(base_replies[0])
        for f in ("3", "4", "11", "32", "37", "38", "39", "41", "42", "54", "60", "62"):
            assert ours_fields[f] == base_fields[f], f
        if with_mac:
            assert ours_fields["64"] == base_fields["64"]     # the same MAC, computed two ways
        ours_ns = min(durations) / n * 1e9
        base_ns = base_s / subset * 1e9
        figures["mac" if with_mac else "codec"] = (ours_ns, base_ns)
    codec_ns, codec_base_ns = figures["codec"]
    whole_ns, whole_base_ns = figures["mac"]
    checksum = hashlib.blake2b(replies, digest_size=8).hexdigest()
    benchmark.extra_info.update({
        "pairs": n, "codec_ns_per_pair": round(codec_ns), "mac_ns_per_pair": round(whole_ns - codec_ns),
        "whole_ns_per_pair": round(whole_ns), "baseline_whole_ns_per_pair": round(whole_base_ns),
        "ratio_whole": round(whole_base_ns / whole_ns, 1), "ratio_codec": round(codec_base_ns / codec_ns, 1),
        "checksum": checksum})
    print(f"\ncodec pair (decode 0200/81 + encode 0210), {n} per batch: {codec_ns:,.0f} ns/pair "
          f"(pyiso8583 {codec_base_ns:,.0f} ns, {codec_base_ns / codec_ns:.0f}×); with X9.19 MACs verified and "
          f"generated: {whole_ns:,.0f} ns/pair, MACs {whole_ns - codec_ns:,.0f} ns "
          f"(pyiso8583 + cryptography {whole_base_ns:,.0f} ns, {whole_base_ns / whole_ns:.0f}×); checksum {checksum}")
