"""protocols/_client.scan_replies: the load generator's reply scanner. One call verifies the
replies of many connections (a key and a MAC algorithm per frame), and answers exactly as one
call per connection would."""
import numpy as np
import pytest

from yikatong.protocols import _client, security

KEY_A = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
KEY_B = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
X919, CUPS = 0, 1
ALG_NAMES = {X919: "x9.19", CUPS: "cups-ecb"}


def reply(stan: int, code: str, rrn: int, amount_fen: int, key: bytes, alg: int) -> bytes:
    return security.sealed_body({"t": "0210", "3": "190000", "4": "%012d" % amount_fen, "11": "%06d" % stan,
                                 "37": "%012d" % rrn, "39": code, "41": "T1000000"}, ALG_NAMES[alg], key)


def scan(frames, keys, algs):
    out = np.zeros(len(frames) + 3, _client.REPLY_DTYPE)
    bad = _client.scan_replies(frames, keys, algs, out)
    return bad, out[:len(frames)]


def test_many_connections_in_one_call_answer_as_one_call_each():
    # 150 frames (more than one 64-lane group), three "connections" with their own key/algorithm
    conns = [(KEY_A, X919), (KEY_B, X919), (KEY_B, CUPS)]
    frames, keys, algs, which = [], [], [], []
    for i in range(150):
        key, alg = conns[i % 3]
        frames.append(reply(1000 + i, "00" if i % 7 else "51", 900000 + i, 100 * i, key, alg))
        keys.append(key)
        algs.append(alg)
        which.append(i % 3)
    bad, rows = scan(frames, b"".join(keys), bytes(algs))
    assert bad == 0
    assert rows["mac_ok"].tolist() == [1] * 150
    assert rows["decoded"].tolist() == [1] * 150
    assert rows["stan"].tolist() == list(range(1000, 1150))
    assert rows["mti"].tolist() == [210] * 150
    assert rows["rrn"].tolist() == list(range(900000, 900150))
    assert rows["amount_fen"].tolist() == [100 * i for i in range(150)]
    assert [c.decode() for c in rows["code"]] == ["00" if i % 7 else "51" for i in range(150)]
    # the same rows as one call per connection with its single key and algorithm
    for c, (key, alg) in enumerate(conns):
        mine = [i for i in range(150) if which[i] == c]
        bad_c, rows_c = scan([frames[i] for i in mine], key, alg)
        assert bad_c == 0
        for name in _client.REPLY_DTYPE.names:          # (field by field: padding bytes are not rows' data)
            assert rows_c[name].tolist() == rows[name][mine].tolist(), name


def test_a_wrong_key_fails_that_frame_only():
    frames = [reply(1 + i, "00", 10 + i, 500, KEY_A, X919) for i in range(70)]
    keys = [KEY_A] * 70
    keys[33] = KEY_B                    # frame 33 checked under another terminal's key
    bad, rows = scan(frames, b"".join(keys), bytes([X919] * 70))
    assert bad == 0                     # decoded; the MAC verdict is per row
    assert np.flatnonzero(rows["mac_ok"] == 0).tolist() == [33]
    # and under the wrong algorithm
    algs = [X919] * 70
    algs[5] = CUPS
    bad, rows = scan(frames, KEY_A, bytes(algs))
    assert np.flatnonzero(rows["mac_ok"] == 0).tolist() == [5]


def test_undecodable_frame_counted_not_fatal():
    frames = [reply(7, "00", 1, 100, KEY_A, X919), b"\x60\x00\x00\x00\x00garbage", reply(8, "00", 2, 100, KEY_A, X919)]
    bad, rows = scan(frames, KEY_A * 3, bytes([X919] * 3))
    assert bad == 1
    assert rows["decoded"].tolist() == [1, 0, 1]
    assert rows["mac_ok"].tolist() == [1, 0, 1]


@pytest.mark.parametrize("keys, algs, what", [
    (KEY_A * 2, bytes([X919] * 3), "mac_key"),          # neither one key nor one per frame
    (KEY_A, bytes([X919] * 2), "mac_algorithm"),        # algorithms: not one per frame
    (KEY_A, "x9.19", "mac_algorithm"),                  # not an int nor bytes
])
def test_bad_arguments_are_named(keys, algs, what):
    frames = [reply(i, "00", i, 1, KEY_A, X919) for i in range(3)]
    with pytest.raises(ValueError, match=what):
        _client.scan_replies(frames, keys, algs, np.zeros(3, _client.REPLY_DTYPE))


def test_build_many_is_build_per_terminal_with_verifiable_macs():
    """RequestFactory frames of several terminals built with one MAC pass are byte for byte the
    frames each factory builds alone, and every MAC verifies under its own terminal's key."""
    from yikatong.engine.demo import generated_pans
    from yikatong.protocols import _codec
    pans = generated_pans(0, 50)
    terminals = [("T1000000", KEY_A, X919), ("T1000001", KEY_B, X919), ("T1000002", KEY_B, CUPS)]
    factories = [_client.RequestFactory(tid, "H11000000000001", 3, pans, key, b"P" * 16, alg)
                 for tid, key, alg in terminals]
    rng = np.random.default_rng(7)
    rows = []
    for j in range(3):
        n = [5, 70, 1][j]                                   # below, above and at one MAC group
        rows.append((rng.integers(0, 3, n).astype(np.uint8), np.arange(1, n + 1, dtype=np.uint32) + 100 * j,
                     rng.integers(0, 50, n).astype(np.int64), rng.integers(100, 20000, n).astype(np.int64)))
    outs = [bytearray(len(r[0]) * f.frame_bytes_max()) for r, f in zip(rows, factories)]
    used = _client.build_many(factories, *[[r[i] for r in rows] for i in range(4)], outs)
    for (tid, key, alg), f, r, out, n in zip(terminals, factories, rows, outs, used):
        alone = bytearray(len(r[0]) * f.frame_bytes_max())
        assert f.build(*r, alone) == n
        assert bytes(alone[:n]) == bytes(out[:n])
        pos, count = 0, 0
        while pos < n:
            length = int.from_bytes(out[pos:pos + 2], "big")
            body = bytes(out[pos + 2:pos + 2 + length])
            pos += 2 + length
            fields = _codec.decode_fields(body)
            assert fields["41"] == tid and int(fields["11"]) == int(r[1][count])
            assert fields["64"] == security.mac_of(ALG_NAMES[alg], key, body[11:-8])
            count += 1
        assert count == len(r[0])


def test_build_many_refuses_mismatched_lists():
    from yikatong.engine.demo import generated_pans
    f = _client.RequestFactory("T1000000", "H11000000000001", 1, generated_pans(0, 5), KEY_A, KEY_B, X919)
    one = np.zeros(1, np.uint8), np.ones(1, np.uint32), np.zeros(1, np.int64), np.ones(1, np.int64)
    with pytest.raises(ValueError, match="one kinds, stans, cards, amounts and out per factory"):
        _client.build_many([f, f], [one[0]], [one[1]], [one[2]], [one[3]], [bytearray(400)])
    with pytest.raises(ValueError, match="row 0: kind, card or amount out of range"):
        _client.build_many([f], [one[0]], [one[1]], [np.array([5], np.int64)], [one[3]], [bytearray(400)])
