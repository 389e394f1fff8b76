"""MACs, PIN blocks and working-key handling of PROTOCOL.md §3.3, with the `cryptography` library.

Independent of the project's bitsliced DES: every block operation here is `cryptography`'s
TripleDES (a single-DES key K is used as K‖K‖K, which is single DES).

    >>> check_value(bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")).hex().upper()
    '08D7B4FB'
"""
from __future__ import annotations

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

__all__ = [
    "MAC_ALGORITHMS",
    "KeyCheckError",
    "des_encrypt",
    "des_decrypt",
    "tdes_encrypt",
    "tdes_decrypt",
    "zero_pad",
    "mac_x919",
    "mac_cups_ecb",
    "mac",
    "check_value",
    "pin_block_clear",
    "pin_block",
    "encrypt_working_keys",
    "decrypt_working_keys",
    "SECURITY_CONTROL",
]

MAC_ALGORITHMS = ("x9.19", "cups-ecb")
#: Field 53 for a format-0 PIN block under a double-length key (PROTOCOL.md §3.3).
SECURITY_CONTROL = "2600000000000000"
_BLOCK = 8


class KeyCheckError(ValueError):
    """A working key from the sign-on reply whose check value does not match."""


def _single(key8: bytes) -> bytes:
    assert len(key8) == 8, len(key8)
    return key8 * 3  # K‖K‖K: 3DES EDE reduces to single DES


def _double(key16: bytes) -> bytes:
    assert len(key16) == 16, len(key16)
    return key16 + key16[:8]  # K1‖K2‖K1: double-length 3DES


def _ecb(key24: bytes, data: bytes, encrypt: bool) -> bytes:
    assert len(data) % _BLOCK == 0, len(data)
    cipher = Cipher(TripleDES(key24), modes.ECB())
    op = cipher.encryptor() if encrypt else cipher.decryptor()
    return op.update(data) + op.finalize()


def des_encrypt(key8: bytes, data: bytes) -> bytes:
    """Single DES, ECB."""
    return _ecb(_single(key8), data, True)


def des_decrypt(key8: bytes, data: bytes) -> bytes:
    return _ecb(_single(key8), data, False)


def tdes_encrypt(key16: bytes, data: bytes) -> bytes:
    """3DES EDE with a double-length key, ECB."""
    return _ecb(_double(key16), data, True)


def tdes_decrypt(key16: bytes, data: bytes) -> bytes:
    return _ecb(_double(key16), data, False)


def zero_pad(mab: bytes) -> bytes:
    """ISO 9797-1 padding method 1: zeros up to a multiple of 8 (nothing added when aligned;
    an empty input becomes one zero block)."""
    rest = len(mab) % _BLOCK
    if rest or not mab:
        mab = bytes(mab) + bytes(_BLOCK - rest)
    return bytes(mab)


def mac_x919(key16: bytes, mab: bytes) -> bytes:
    """ISO 9797-1 MAC algorithm 3 (ANSI X9.19 retail MAC), padding method 1.

    Single-DES CBC under the left half over every block, then decrypt under the right half and
    encrypt under the left half.
    """
    left, right = key16[:8], key16[8:16]
    data = zero_pad(mab)
    cipher = Cipher(TripleDES(_single(left)), modes.CBC(bytes(_BLOCK))).encryptor()
    chained = cipher.update(data) + cipher.finalize()
    last = chained[-_BLOCK:]
    return des_encrypt(left, des_decrypt(right, last))


def mac_cups_ecb(key16: bytes, mab: bytes) -> bytes:
    """The CUPS POS terminal MAC (PROTOCOL.md §3.3, `cups-ecb`).

    XOR every MAB block into R; H = R as 16 uppercase hex ASCII characters; encrypt H[0:8]
    (3DES, double-length key); XOR with H[8:16]; encrypt again; field 64 = the first 8 uppercase
    hex characters of the result, as ASCII.
    """
    data = zero_pad(mab)
    folded = bytearray(_BLOCK)
    for start in range(0, len(data), _BLOCK):
        for i in range(_BLOCK):
            folded[i] ^= data[start + i]
    hex_ascii = folded.hex().upper().encode("ascii")
    first = tdes_encrypt(key16, hex_ascii[:8])
    second = tdes_encrypt(key16, bytes(a ^ b for a, b in zip(first, hex_ascii[8:16])))
    return second.hex().upper().encode("ascii")[:8]


def mac(algorithm: str, key16: bytes, mab: bytes) -> bytes:
    """The 8 bytes of field 64 for ``mab`` (the bytes from the MTI to the end of the last field
    before 64, unpadded: padding is done here)."""
    if algorithm == "x9.19":
        return mac_x919(key16, mab)
    if algorithm == "cups-ecb":
        return mac_cups_ecb(key16, mab)
    raise ValueError(f"MAC algorithm {algorithm!r}: expecting one of {MAC_ALGORITHMS}")


def check_value(key16: bytes) -> bytes:
    """First 4 bytes of the key encrypting 8 zero bytes."""
    return tdes_encrypt(key16, bytes(_BLOCK))[:4]


def pin_block_clear(pin: str, pan: str) -> bytes:
    """ISO 9564 format 0: (0, PIN length, PIN, F padding) XOR (0000, the 12 rightmost PAN digits
    excluding the check digit)."""
    if not (4 <= len(pin) <= 12 and pin.isdigit()):
        raise ValueError(f"PIN: {len(pin)} characters, expecting 4 to 12 digits")
    if not (pan.isdigit() and len(pan) >= 13):
        raise ValueError(f"PAN: {len(pan)} characters, expecting at least 13 digits")
    pin_field = bytes.fromhex(f"0{len(pin):X}{pin}".ljust(16, "F"))
    pan_field = bytes.fromhex("0000" + pan[-13:-1])
    return bytes(a ^ b for a, b in zip(pin_field, pan_field))


def pin_block(pin_key16: bytes, pin: str, pan: str) -> bytes:
    """Field 52: the format-0 PIN block under the PIN key, 3DES ECB."""
    return tdes_encrypt(pin_key16, pin_block_clear(pin, pan))


def encrypt_working_keys(tmk16: bytes, pin_key16: bytes, mac_key16: bytes) -> bytes:
    """The 40 bytes of field 62 in an 0810: PIK under TMK + its check value + MAK under TMK +
    its check value (the server side of sign-on)."""
    return (tdes_encrypt(tmk16, pin_key16) + check_value(pin_key16)
            + tdes_encrypt(tmk16, mac_key16) + check_value(mac_key16))


def decrypt_working_keys(tmk16: bytes, field62: bytes) -> tuple[bytes, bytes]:
    """(PIN key, MAC key) from an 0810's field 62, both check values verified."""
    if len(field62) != 40:
        raise KeyCheckError(f"field 62: {len(field62)} bytes, expecting 40")
    pin_key = tdes_decrypt(tmk16, field62[0:16])
    mac_key = tdes_decrypt(tmk16, field62[20:36])
    if check_value(pin_key) != field62[16:20]:
        raise KeyCheckError("field 62: PIN key check value does not match")
    if check_value(mac_key) != field62[36:40]:
        raise KeyCheckError("field 62: MAC key check value does not match")
    return pin_key, mac_key
