"""The PROTOCOL.md §2 message body (MTI, bitmap, fields) as a pyiso8583 spec, with the small
pre/post steps pyiso8583 cannot express.

Written from PROTOCOL.md alone (it imports nothing from ``yikatong``), so interop tests can
compare it byte for byte with the project's Cython codec.

What this module covers is the *body*: MTI (2 bytes BCD) + primary bitmap (8 bytes binary) +
fields in ascending order. Framing (length prefix, TPDU, 6-byte header) lives in
``bench.baseline.client``.

Decoded values (``encode_body`` takes, ``decode_body`` returns) are plain Python values:

* ``"t"``: the MTI as 4 digits, e.g. ``"0200"``;
* numeric fields (n, z): ``str`` of digits. On encoding an ``int`` is accepted too, and a fixed
  numeric shorter than its width is right-aligned with leading zeros (``11=42`` → ``"000042"``);
  field 22 is the exception (n3 *left*-aligned in 2 bytes, so it must be given as 3 digits);
* field 35 (track 2): digits and the separator ``"D"``, exactly the nibbles on the wire. An
  ``"="`` given on encoding is mapped to ``"D"``; decoding always gives ``"D"`` (we keep the
  nibble as it is rather than guess which spelling a caller wants);
* an/ans fields: ``str`` (ASCII; field 63 is decoded as GBK, a superset of ASCII, because CUPS
  responses may carry Chinese free text there);
* binary fields (52, 62, 64): ``bytes``.

How pyiso8583 is configured (its spec is plain data, see ``SPEC``):

* packed BCD numerics are ``data_enc="b"`` (BCD is a subset of hex) with ``len_count="nibbles"``
  so lengths count digits; odd variable numerics get ``right_pad="0"`` (left-aligned, trailing
  0 nibble); field 22 (fixed n3) gets ``right_pad="0"`` too, which gives ``"021"`` → ``02 10``;
* LL = ``len_type=1``, LLL = ``len_type=2``, both ``len_enc="bcd"``;
* an/ans/b variable fields count bytes (``len_count="bytes"``).

What needs a pre/post step (done in ``encode_body``/``decode_body``):

* pyiso8583 decodes BCD as hex, so ``A``–``F`` nibbles would pass silently: numeric fields are
  checked to hold digits only (field 35: digits and one ``D``), in both directions;
* binary fields are hex strings in pyiso8583: converted from/to ``bytes``;
* a set bit 1 (secondary bitmap) is rejected before pyiso8583 sees the message, and so is any
  bit for a field this dialect does not define (pyiso8583 would raise ``KeyError``);
* pyiso8583's exceptions carry the whole decoded document (PAN included): they are replaced by
  ``WireFormatError``, which names the field and the position but never holds field values.
"""
from __future__ import annotations

import binascii

import iso8583

__all__ = [
    "SPEC",
    "FIELDS",
    "NUMERIC_FIELDS",
    "BINARY_FIELDS",
    "WireFormatError",
    "encode_body",
    "decode_body",
]


class WireFormatError(ValueError):
    """A message body that does not follow PROTOCOL.md §2.

    ``field`` is the field number as a string (``"t"`` for the MTI, ``"p"`` for the bitmap);
    ``pos`` is the byte offset inside the body when known (decoding), else -1. The message says
    what was found and what was expected; it never contains a field's value (no card data).
    """

    def __init__(self, field: str, reason: str, pos: int = -1):
        where = f" at byte {pos}" if pos >= 0 else ""
        super().__init__(f"field {field}: {reason}{where}")
        self.field = field
        self.reason = reason
        self.pos = pos


def _n_fixed(length: int, desc: str, right_pad: str = "") -> dict:
    spec = {"data_enc": "b", "len_enc": "b", "len_type": 0, "max_len": length,
            "len_count": "nibbles", "desc": desc}
    if right_pad:
        spec["right_pad"] = right_pad
    return spec


def _n_var(len_type: int, max_len: int, desc: str) -> dict:
    # Variable numerics: left-aligned, trailing 0 nibble when odd; the length counts digits.
    return {"data_enc": "b", "len_enc": "bcd", "len_type": len_type, "max_len": max_len,
            "len_count": "nibbles", "right_pad": "0", "desc": desc}


def _an_fixed(length: int, desc: str) -> dict:
    return {"data_enc": "ascii", "len_enc": "b", "len_type": 0, "max_len": length, "desc": desc}


def _an_var(len_type: int, max_len: int, desc: str, enc: str = "ascii") -> dict:
    return {"data_enc": enc, "len_enc": "bcd", "len_type": len_type, "max_len": max_len,
            "desc": desc}


def _b_fixed(length: int, desc: str) -> dict:
    return {"data_enc": "b", "len_enc": "b", "len_type": 0, "max_len": length, "desc": desc}


def _b_var(len_type: int, max_len: int, desc: str) -> dict:
    return {"data_enc": "b", "len_enc": "bcd", "len_type": len_type, "max_len": max_len,
            "desc": desc}


_LL, _LLL = 1, 2  # BCD length prefix widths in bytes

#: The pyiso8583 spec: PROTOCOL.md §2's table, line by line.
SPEC: dict = {
    "h": {"data_enc": "b", "len_enc": "b", "len_type": 0, "max_len": 0, "desc": "no header (framing does it)"},
    "t": {"data_enc": "b", "len_enc": "b", "len_type": 0, "max_len": 2, "desc": "MTI, 2 bytes BCD"},
    "p": {"data_enc": "b", "len_enc": "b", "len_type": 0, "max_len": 8, "desc": "primary bitmap"},
    "1": {"data_enc": "b", "len_enc": "b", "len_type": 0, "max_len": 8, "desc": "secondary bitmap (rejected)"},
    "2": _n_var(_LL, 19, "PAN n..19 LLVAR"),
    "3": _n_fixed(6, "processing code n6"),
    "4": _n_fixed(12, "amount n12"),
    "11": _n_fixed(6, "STAN n6"),
    "12": _n_fixed(6, "local time n6"),
    "13": _n_fixed(4, "local date n4"),
    "14": _n_fixed(4, "expiry n4"),
    "15": _n_fixed(4, "settlement date n4"),
    "22": _n_fixed(3, "POS entry mode n3 left-aligned", right_pad="0"),
    "25": _n_fixed(2, "POS condition code n2"),
    "32": _n_var(_LL, 11, "acquiring institution n..11 LLVAR"),
    # z..37: track 2 as BCD nibbles with separator D; the length counts characters (nibbles),
    # like the numerics, as CUPS terminals do.
    "35": _n_var(_LL, 37, "track 2 z..37 LLVAR"),
    "37": _an_fixed(12, "RRN an12"),
    "38": _an_fixed(6, "auth id an6"),
    "39": _an_fixed(2, "response code an2"),
    "41": _an_fixed(8, "terminal id ans8"),
    "42": _an_fixed(15, "card acceptor id ans15"),
    "48": _n_var(_LLL, 322, "settlement totals / upload n..322 LLLVAR"),
    "49": _an_fixed(3, "currency an3"),
    "52": _b_fixed(8, "PIN block b8"),
    "53": _n_fixed(16, "security control n16"),
    "54": _an_var(_LLL, 120, "balances an..120 LLLVAR"),
    "60": _n_var(_LLL, 17, "60.1 n2 + 60.2 n6 + 60.3 n3, n..17 LLLVAR"),
    "61": _n_var(_LLL, 29, "original batch+STAN+date n..29 LLLVAR"),
    "62": _b_var(_LLL, 512, "private data b..512 LLLVAR"),
    "63": _an_var(_LLL, 163, "ans..163 LLLVAR", enc="gbk"),
    "64": _b_fixed(8, "MAC b8"),
}

#: The fields this dialect defines (bit numbers).
FIELDS: frozenset[int] = frozenset(int(k) for k in SPEC if k.isdigit() and k != "1")
NUMERIC_FIELDS: frozenset[int] = frozenset({2, 3, 4, 11, 12, 13, 14, 15, 22, 25, 32, 48, 53, 60, 61})
TRACK_FIELDS: frozenset[int] = frozenset({35})
BINARY_FIELDS: frozenset[int] = frozenset({52, 62, 64})
_FIXED_NUMERIC_WIDTH = {int(k): v["max_len"] for k, v in SPEC.items()
                        if k.isdigit() and int(k) in NUMERIC_FIELDS and v["len_type"] == 0}

_DIGITS = frozenset("0123456789")
_TRACK_CHARS = frozenset("0123456789D")


def _pre_encode(fields: dict) -> dict:
    """Caller's values → pyiso8583's strings, checking what pyiso8583 does not."""
    doc: dict = {}
    for key, value in fields.items():
        if key == "t":
            mti = str(value)
            if len(mti) != 4 or not set(mti) <= _DIGITS:
                raise WireFormatError("t", f"MTI must be 4 digits, got {len(mti)} characters")
            doc["t"] = mti
            continue
        if key in ("h", "p", "1"):
            raise WireFormatError(str(key), "computed by the codec, not given")
        try:
            number = int(key)
        except (TypeError, ValueError):
            raise WireFormatError(str(key), "not a field number") from None
        if number not in FIELDS:
            raise WireFormatError(str(number), "not a field of this dialect")
        if number in BINARY_FIELDS:
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise WireFormatError(str(number), f"binary field needs bytes, got {type(value).__name__}")
            doc[str(number)] = bytes(value).hex().upper()
        elif number in NUMERIC_FIELDS:
            text = str(value) if isinstance(value, int) else value
            if not isinstance(text, str) or not set(text) <= _DIGITS:
                raise WireFormatError(str(number), "numeric field holds a non-digit")
            width = _FIXED_NUMERIC_WIDTH.get(number)
            if width is not None and number != 22 and len(text) < width:
                text = text.rjust(width, "0")  # fixed numerics: right-aligned, leading zeros
            doc[str(number)] = text
        elif number in TRACK_FIELDS:
            text = value.replace("=", "D") if isinstance(value, str) else value
            if not isinstance(text, str) or not set(text) <= _TRACK_CHARS:
                raise WireFormatError(str(number), "track 2 holds a character other than 0-9, D, =")
            doc[str(number)] = text
        else:
            if not isinstance(value, str):
                raise WireFormatError(str(number), f"text field needs str, got {type(value).__name__}")
            doc[str(number)] = value
    if "t" not in doc:
        raise WireFormatError("t", "MTI missing")
    return doc


def encode_body(fields: dict) -> bytes:
    """Encode MTI + bitmap + fields (PROTOCOL.md §2).

    >>> encode_body({"t": "0800", "11": "000001"}).hex()
    '08000020000000000000000001'
    """
    doc = _pre_encode(fields)
    try:
        raw, _ = iso8583.encode(doc, SPEC)
    except iso8583.EncodeError as exc:
        raise WireFormatError(exc.field, exc.msg) from None
    return bytes(raw)


def decode_body(body: bytes) -> dict:
    """Decode MTI + bitmap + fields into the values ``encode_body`` takes (binary fields as bytes).

    >>> decode_body(bytes.fromhex('08000020000000000000000001'))
    {'t': '0800', '11': '000001'}
    """
    body = bytes(body)
    if len(body) < 10:
        raise WireFormatError("p", f"{len(body)} bytes, expecting at least 10 (MTI + bitmap)", 0)
    bitmap = int.from_bytes(body[2:10], "big")
    if bitmap >> 63:
        raise WireFormatError("1", "secondary bitmap present, not used by this dialect", 2)
    for bit in range(2, 65):
        if bitmap >> (64 - bit) & 1 and bit not in FIELDS:
            raise WireFormatError(str(bit), "not a field of this dialect", 2)
    try:
        doc, _ = iso8583.decode(body, SPEC)
    except iso8583.DecodeError as exc:
        raise WireFormatError(exc.field, exc.msg, exc.pos) from None
    out: dict = {}
    for key, text in doc.items():
        if key == "p":
            continue
        if key == "t":
            if not set(text) <= _DIGITS:
                raise WireFormatError("t", "MTI holds a non-decimal nibble", 0)
            out["t"] = text
            continue
        number = int(key)
        if number in BINARY_FIELDS:
            out[key] = binascii.a2b_hex(text)
        elif number in NUMERIC_FIELDS:
            if not set(text) <= _DIGITS:
                raise WireFormatError(key, "numeric field holds a non-decimal nibble")
            out[key] = text
        elif number in TRACK_FIELDS:
            if not set(text) <= _TRACK_CHARS:
                raise WireFormatError(key, "track 2 holds a nibble other than 0-9 and D")
            out[key] = text
        else:
            out[key] = text
    return out
