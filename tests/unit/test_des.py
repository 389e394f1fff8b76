"""protocols/_des: published vectors, differential tests against `cryptography` on every kernel
path (one-block, 64/128/256/512-lane bitsliced), both MACs, PIN blocks and their error paths."""
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from yikatong.protocols import _des as des
from yikatong.protocols._des import PinBlockError

from cryptography.hazmat.primitives.ciphers import Cipher, modes
try:                                       # cryptography >= 43 keeps 3DES in "decrepit"
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
except ImportError:                        # pragma: no cover
    from cryptography.hazmat.primitives.ciphers.algorithms import TripleDES

warnings.filterwarnings("ignore", message=".*TripleDES.*")
warnings.filterwarnings("ignore", message=".*Two-key TripleDES.*")

PATHS = des.kernel_paths()                 # scalar, w64, w128 and what the CPU adds
KEY = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")


@pytest.fixture(params=PATHS)
def path(request):
    des.set_kernel_path(request.param)
    yield request.param
    des.set_kernel_path("auto")


# ---- reference implementations: cryptography for the block cipher, plain Python around it ----

def ref_tdes(key16: bytes, data: bytes, decrypt=False) -> bytes:
    # a 24-byte K1 K2 K1 key is the double-length key without the deprecation path
    c = Cipher(TripleDES(key16 + key16[:8]), modes.ECB())
    x = c.decryptor() if decrypt else c.encryptor()
    return x.update(data) + x.finalize()


def ref_des(key8: bytes, data: bytes, decrypt=False) -> bytes:
    return ref_tdes(key8 * 2, data, decrypt)          # K1 = K2 = K3: single DES


def ref_x919(key16: bytes, mab: bytes) -> bytes:
    """ISO 9797-1 alg. 3, padding 1: CBC under KL (cryptography's CBC), then D_KR, E_KL."""
    padded = mab + bytes(-len(mab) % 8) if mab else bytes(8)
    enc = Cipher(TripleDES(key16[:8] * 3), modes.CBC(bytes(8))).encryptor()
    last = (enc.update(padded) + enc.finalize())[-8:]
    return ref_des(key16[:8], ref_des(key16[8:], last, decrypt=True))


def ref_cups(key16: bytes, mab: bytes) -> bytes:
    """PROTOCOL.md §3.3 CUPS-ECB, step by step."""
    padded = mab + bytes(-len(mab) % 8)
    r = bytes(8)
    for i in range(0, len(padded), 8):
        r = bytes(a ^ b for a, b in zip(r, padded[i:i + 8]))
    h = r.hex().upper().encode("ascii")
    e1 = ref_tdes(key16, h[:8])
    e2 = ref_tdes(key16, bytes(a ^ b for a, b in zip(e1, h[8:])))
    return e2.hex().upper()[:8].encode("ascii")


def ref_pin_block(pin: str, pan: str) -> bytes:
    pin_field = bytes.fromhex(("0" + format(len(pin), "X") + pin).ljust(16, "F"))
    pan_field = bytes.fromhex("0000" + pan[:-1][-12:].rjust(12, "0"))
    return bytes(a ^ b for a, b in zip(pin_field, pan_field))


# ---- published vectors ----

# FIPS 81 (DES modes of operation), appendix B, ECB: key 0123456789ABCDEF, "Now is the time for all "
FIPS81_ECB = ("0123456789ABCDEF", b"Now is the time for all ",
              "3FA40E8A984D48156A271787AB8883F9893D51EC4B563B53")
# Classic single-DES vectors (NBS / Stinson's textbook example)
DES_VECTORS = [
    ("133457799BBCDFF1", "0123456789ABCDEF", "85E813540F0AB405"),
    ("0E329232EA6D0D73", "8787878787878787", "0000000000000000"),
]
# 3DES double-length: the widely used test key 0123456789ABCDEF FEDCBA9876543210
TDES_VECTORS = [("0123456789ABCDEFFEDCBA9876543210", "0123456789ABCDE7", "7F1D0A77826B8AFF")]
# ISO 9797-1:2011 annex B.4, MAC algorithm 3, padding method 1 (first 4 bytes published)
X919_VECTORS = [(b"Now is the time for all ", "A1C72E74"), (b"Now is the time for it", "2E2B1428")]


def test_fips81_ecb(path):
    key, plain, cipher = FIPS81_ECB
    assert des.des_ecb(bytes.fromhex(key), plain).hex().upper() == cipher
    assert des.des_ecb(bytes.fromhex(key), bytes.fromhex(cipher), decrypt=True) == plain
    assert des.des_ecb(bytes.fromhex(key), b"Now is t").hex().upper() == "3FA40E8A984D4815"


@pytest.mark.parametrize("key, plain, cipher", DES_VECTORS)
def test_des_vectors(key, plain, cipher):
    assert des.des_ecb(bytes.fromhex(key), bytes.fromhex(plain)).hex().upper() == cipher


@pytest.mark.parametrize("key, plain, cipher", TDES_VECTORS)
def test_tdes_vectors(path, key, plain, cipher):
    assert des.tdes_ecb(bytes.fromhex(key), bytes.fromhex(plain)).hex().upper() == cipher
    assert des.tdes_ecb(bytes.fromhex(key), bytes.fromhex(cipher), decrypt=True).hex().upper() == plain
    # the same block in every lane of a full batch
    n = 300
    out = des.tdes_ecb_batch(np.frombuffer(bytes.fromhex(key) * n, np.uint8).reshape(n, 16),
                             np.frombuffer(bytes.fromhex(plain) * n, np.uint8).reshape(n, 8))
    assert {row.tobytes().hex().upper() for row in out} == {cipher}


@pytest.mark.parametrize("mab, mac4", X919_VECTORS)
def test_x919_iso9797_vectors(path, mab, mac4):
    assert des.mac_x919(KEY, mab)[:4].hex().upper() == mac4
    assert des.mac_x919(KEY, mab) == ref_x919(KEY, mab)


def test_check_value():
    # a key check value is the first 4 bytes of 3DES(key, 0^8) (PROTOCOL.md §3.3)
    assert des.check_value(KEY).hex().upper() == "08D7B4FB"
    assert des.check_value(bytes(16)).hex().upper() == "8CA64DE9"       # DES(0, 0) = 8CA64DE9C1B123A7


def test_x919_padding_rules():
    # padding method 1: zeros to a multiple of 8, none when already a multiple, empty → one zero block
    assert des.mac_x919(KEY, b"") == des.mac_x919(KEY, bytes(8)) == ref_x919(KEY, b"")
    assert des.mac_x919(KEY, b"abc") == des.mac_x919(KEY, b"abc" + bytes(5))
    assert des.mac_x919(KEY, b"abcdefgh") != des.mac_x919(KEY, b"abcdefgh" + bytes(8))


def test_cups_is_ascii_hex_and_fold_collision():
    mac = des.mac_cups_ecb(KEY, b"0200" + bytes(30))
    assert len(mac) == 8 and all(c in b"0123456789ABCDEF" for c in mac)
    # documented weakness (PROTOCOL.md §3.3): aligned blocks swap without changing the MAC
    a, b = b"AAAAAAAA", b"BBBBBBBB"
    assert des.mac_cups_ecb(KEY, a + b) == des.mac_cups_ecb(KEY, b + a)
    assert des.mac_x919(KEY, a + b) != des.mac_x919(KEY, b + a)


# ---- differential against cryptography ----

def test_des_ecb_random():
    rng = np.random.default_rng(81)
    for _ in range(500):
        key, data = rng.bytes(8), rng.bytes(8 * int(rng.integers(1, 5)))
        assert des.des_ecb(key, data) == ref_des(key, data)
        assert des.des_ecb(key, data, decrypt=True) == ref_des(key, data, decrypt=True)


@pytest.mark.parametrize("n", [1, 7, 63, 64, 65, 128, 200, 257, 513, 4096])
@pytest.mark.parametrize("decrypt", [False, True])
def test_tdes_batch_mixed_keys(path, n, decrypt):
    rng = np.random.default_rng(n * 2 + decrypt)
    keys = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    blocks = rng.integers(0, 256, (n, 8), dtype=np.uint8)
    out = des.tdes_ecb_batch(keys, blocks, decrypt=decrypt)
    assert out.shape == (n, 8) and out.dtype == np.uint8
    step = max(1, n // 300)               # the reference is slow: check a spread of lanes
    for i in list(range(0, n, step)) + [n - 1]:
        assert out[i].tobytes() == ref_tdes(keys[i].tobytes(), blocks[i].tobytes(), decrypt), i
    # and the round trip over every lane
    assert np.array_equal(des.tdes_ecb_batch(keys, out, decrypt=not decrypt), blocks)


def test_tdes_ecb_one_key_many_blocks(path):
    rng = np.random.default_rng(3)
    key, data = rng.bytes(16), rng.bytes(8 * 300)
    assert des.tdes_ecb(key, data) == ref_tdes(key, data)
    assert des.tdes_ecb(key, data, decrypt=True) == ref_tdes(key, data, decrypt=True)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=16, max_size=16), st.binary(max_size=200))
def test_macs_hypothesis(key, mab):
    assert des.mac_x919(key, mab) == ref_x919(key, mab)
    assert des.mac_cups_ecb(key, mab) == ref_cups(key, mab)


@pytest.mark.parametrize("n", [1, 63, 64, 65, 200, 4096])
def test_mac_batch_mixed(path, n):
    """Mixed lengths 0..2048 bytes, mixed keys, mixed algorithms: every lane edge."""
    rng = np.random.default_rng(1000 + n)
    keys = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    lengths = rng.integers(0, 2049, n)
    lengths[: min(n, 8)] = [0, 1, 7, 8, 9, 16, 2048, 136][: min(n, 8)]
    messages = [rng.bytes(int(k)) for k in lengths]
    algorithms = rng.integers(0, 2, n, dtype=np.uint8)
    out = des.mac_batch(keys, messages, algorithms)
    assert out.shape == (n, 8)
    step = max(1, n // 400)
    for i in list(range(0, n, step)) + [n - 1]:
        ref = (ref_cups if algorithms[i] else ref_x919)(keys[i].tobytes(), messages[i])
        assert out[i].tobytes() == ref, (i, int(lengths[i]), int(algorithms[i]))


def test_mac_batch_paths_agree():
    """Every kernel path computes the same MACs as the one-block path, over all lanes."""
    rng = np.random.default_rng(7)
    n = 1100
    keys = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    messages = [rng.bytes(int(k)) for k in rng.integers(0, 400, n)]
    algorithms = rng.integers(0, 2, n, dtype=np.uint8)
    results = {}
    try:
        for p in PATHS + ["auto"]:
            des.set_kernel_path(p)
            results[p] = des.mac_batch(keys, messages, algorithms)
    finally:
        des.set_kernel_path("auto")
    for p, r in results.items():
        assert np.array_equal(r, results["scalar"]), p


def test_mac_batch_equal_lengths_one_key():
    """Request/reply shape of the benchmark: same key everywhere, 136- and 240-byte MABs."""
    rng = np.random.default_rng(11)
    n = 512
    key = rng.bytes(16)
    keys = np.frombuffer(key * n, np.uint8).reshape(n, 16)
    messages = [rng.bytes(136 if i % 2 else 240) for i in range(n)]
    out = des.mac_batch(keys, messages, np.zeros(n, np.uint8))
    for i in range(0, n, 17):
        assert out[i].tobytes() == ref_x919(key, messages[i])


def test_input_errors():
    with pytest.raises(ValueError, match="key: 7 bytes, expecting 8"):
        des.des_ecb(bytes(7), bytes(8))
    with pytest.raises(ValueError, match="data: 9 bytes, expecting a multiple of 8"):
        des.tdes_ecb(bytes(16), bytes(9))
    with pytest.raises(ValueError, match=r"keys: shape \(2, 8\), expecting \(n, 16\)"):
        des.tdes_ecb_batch(np.zeros((2, 8), np.uint8), np.zeros((2, 8), np.uint8))
    with pytest.raises(ValueError, match="algorithms: value 2"):
        des.mac_batch(np.zeros((1, 16), np.uint8), [b""], np.array([2], np.uint8))
    with pytest.raises(ValueError, match="kernel path 'w1024'"):
        des.set_kernel_path("w1024")


# ---- PIN blocks ----

PAN = "6222021234567890128"        # a made-up 19-digit PAN


@pytest.mark.parametrize("pin", ["1234", "0000", "987654", "123456789012"])
@pytest.mark.parametrize("pan", [PAN, "4111111111111111", "12345"])
def test_pin_block_round_trip(pin, pan):
    block = des.pin_block(pin, pan)
    assert block == ref_pin_block(pin, pan)
    assert des.pin_of_block(block, pan) == pin
    # through the PIN key, as field 52 travels
    assert des.pin_of_block(des.tdes_ecb(KEY, des.tdes_ecb(KEY, block), decrypt=True), pan) == pin


def test_pin_block_known_value():
    # ISO 9564-1 format 0 worked example: PIN 1234, PAN 4000001234562000 (check digit 0)
    # PIN field 041234FFFFFFFFFF XOR PAN field 0000000123456200 (12 digits before the check digit)
    assert des.pin_block("1234", "4000001234562000").hex().upper() == "041234FEDCBA9DFF"


def _set_nibble(field_hex: str, i: int, nibble: str) -> str:
    return field_hex[:i] + nibble + field_hex[i + 1:]


def _block(field_hex: str, pan: str) -> bytes:
    pan_field = bytes.fromhex("0000" + pan[:-1][-12:].rjust(12, "0"))
    return bytes(a ^ b for a, b in zip(bytes.fromhex(field_hex), pan_field))


@pytest.mark.parametrize("field, reason", [
    ("141234FFFFFFFFFF", "format nibble is not 0"),
    ("031234FFFFFFFFFF", "PIN length nibble outside 4..12"),
    ("0D1234FFFFFFFFFF", "PIN length nibble outside 4..12"),
    ("04123AFFFFFFFFFF", "PIN nibble 5 is not a decimal digit"),
    ("041234FFFFFFFFFE", "filler nibble 15 is not F"),
    ("0412340FFFFFFFFF", "filler nibble 6 is not F"),
])
def test_malformed_pin_blocks(field, reason):
    block = _block(field, PAN)
    with pytest.raises(PinBlockError, match=reason) as caught:
        des.pin_of_block(block, PAN)
    message = str(caught.value)
    # no card data: neither the PIN nor any 4-digit run of the PAN appears in the message
    assert "1234" not in message
    assert not any(message[j:j + 4].isdigit() for j in range(len(message) - 3)), message
    assert isinstance(caught.value, ValueError)


def test_malformed_every_nibble_returns_error_never_digits():
    """Every single-nibble corruption of a valid block either still decodes (a different PIN of
    the same shape) or raises PinBlockError whose message holds no run of 4 digits."""
    good = "061234" + "56" + "FFFFFFFF"
    for i in range(16):
        for nib in "0123456789ABCDEF":
            block = _block(_set_nibble(good, i, nib), PAN)
            try:
                pin = des.pin_of_block(block, PAN)
                assert pin.isdigit() and 4 <= len(pin) <= 12
            except PinBlockError as e:
                text = str(e)
                assert not any(text[j:j + 4].isdigit() for j in range(len(text) - 3)), text


def test_pin_block_input_errors_carry_no_digits():
    for pin, pan, reason in [("123", PAN, "PIN: 3 digits, expecting 4..12"),
                             ("1234567890123", PAN, "PIN: 13 digits, expecting 4..12"),
                             ("12a4", PAN, "PIN: expecting ASCII digits only"),
                             ("1234", "62220x", "PAN: expecting one or more ASCII digits"),
                             ("1234", "", "PAN: expecting one or more ASCII digits")]:
        with pytest.raises(PinBlockError, match=reason):
            des.pin_block(pin, pan)
    with pytest.raises(PinBlockError, match="PAN: expecting"):
        des.pin_of_block(bytes(8), "abc")


# ---- the per-message C API is pure C (cython -a: every line of the nogil functions is white) ----

def test_hot_functions_are_white(tmp_path):
    import pathlib
    import shutil
    import subprocess
    import sys
    from tests.unit.test_engine_annotation import nogil_function_lines
    import html
    import re
    root = pathlib.Path(__file__).resolve().parents[2]
    cython = shutil.which("cython", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("cython")
    assert cython is not None, "cython is a build requirement"
    subprocess.run([cython, "-3", "-a", "-I", str(root / "build" / "cython-include"), "-I",
                    str(root / "protocols"), str(root / "protocols" / "_des.pyx"),
                    "-o", str(tmp_path / "_des.c")], check=True, capture_output=True)
    page = (tmp_path / "_des.html").read_text()
    rows = [(int(score), re.sub(r"<[^>]+>", "", html.unescape(text))) for score, text in
            re.findall(r'<pre class="cython line score-(\d+)"[^>]*>(.*?)</pre>', page, re.S)]
    lines = list(nogil_function_lines(rows))
    functions = {h.split("(")[0] for h, _, _ in lines}
    for name in ("cdef void tdes_ecb_many", "cdef void mac_many", "cdef void cups_many",
                 "cdef int pin_from_block", "cdef inline uint64_t fold_xor"):
        assert name in functions, f"{name} not found among the nogil functions"
    yellow = [(h.split("(")[0], code.strip()) for h, score, code in lines if score > 0]
    assert yellow == [], yellow
