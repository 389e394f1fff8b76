"""PROTOCOL.md §3.3 one message at a time, for the rare messages (sign-on, network management,
batch settlement) and for clients; the per-batch path is _security.pyx.

    field62 = working_keys_field(tmk, pin_key, mac_key)        # the 0810's field 62
    pin_key, mac_key = open_working_keys(tmk, field62)         # a terminal's side, check values verified
    body = sealed_body(fields, "x9.19", mac_key)               # field 64 over the MTI … last field before 64
"""
from . import _codec, _des


def mac_of(algorithm: str, key: bytes, mab: bytes) -> bytes:
    """Field 64 of a MAB under a terminal's MAC algorithm (`x9.19` or `cups-ecb`)."""
    return _des.mac_x919(key, mab) if algorithm == "x9.19" else _des.mac_cups_ecb(key, mab)


def sealed_body(fields: dict, algorithm: str, key: bytes) -> bytes:
    """A frame body with field 64 computed over the bytes from the MTI to the end of the last
    field before it (TPDU and header excluded)."""
    body = _codec.encode_fields(dict(fields, **{"64": bytes(8)}))
    return body[:-8] + mac_of(algorithm, key, body[11:-8])


def working_keys_field(tmk: bytes, pin_key: bytes, mac_key: bytes) -> bytes:
    """Field 62 of the 0810: PIN key under the TMK + its check value, MAC key under the TMK + its check value."""
    return (_des.tdes_ecb(tmk, pin_key) + _des.check_value(pin_key)
            + _des.tdes_ecb(tmk, mac_key) + _des.check_value(mac_key))


def open_working_keys(tmk: bytes, field62: bytes) -> tuple[bytes, bytes]:
    """(PIN key, MAC key) from an 0810's field 62; ValueError when a check value does not match."""
    pin_key = _des.tdes_ecb(tmk, field62[0:16], decrypt=True)
    mac_key = _des.tdes_ecb(tmk, field62[20:36], decrypt=True)
    if _des.check_value(pin_key) != field62[16:20] or _des.check_value(mac_key) != field62[36:40]:
        raise ValueError("sign-on: a working key's check value does not match")
    return pin_key, mac_key
