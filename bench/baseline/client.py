"""An independent terminal client for the PROTOCOL.md wire contract: framing, request builders,
reply parsing, MAC and keys, and a small synchronous socket `Terminal`.

Written from PROTOCOL.md alone with pyiso8583 + cryptography; it imports nothing from
``yikatong``. Requests are plain dicts of field values (see ``iso_spec``); builders return such a
dict without field 64, and ``seal`` adds the MAC.

    >>> t = Terminal("127.0.0.1", 8583, "T0000001", "H11000000000001")   # doctest: +SKIP
    >>> t.sign_on().code                                                # doctest: +SKIP
    '00'
    >>> t.medical("62148301000000" + "05", 50000, fo=0, ol=0, ps=0, is_=50000).code  # doctest: +SKIP
"""
from __future__ import annotations

import datetime as _dt
import socket
import struct
from dataclasses import dataclass, field

from .crypto import (
    SECURITY_CONTROL,
    decrypt_working_keys,
    mac,
    pin_block,
)
from .iso_spec import WireFormatError, decode_body, encode_body

__all__ = [
    "FRAME_BYTES_MAX", "DEFAULT_TPDU", "DEFAULT_HEADER", "DEMO_TMK", "DEMO_INSTITUTION_ID",
    "FrameError", "frame", "unframe", "read_frame", "recv_frame",
    "encode_tlv", "decode_tlv", "encode_balances", "decode_balances",
    "seal", "verify", "mac_block",
    "Reply", "parse_reply", "match_key",
    "sign_on_request", "sign_off_request", "echo_request", "card_request",
    "balance_inquiry_request", "purchase_request", "void_request", "refund_request",
    "medical_tlv", "medical_request", "medical_cancel_request", "medical_presettlement_request",
    "deposit_request", "withdrawal_request", "transfer_request", "reversal_request",
    "batch_settlement_request", "batch_upload_request", "settlement_totals",
    "luhn_digit", "generated_pan",
    "Terminal",
]

# --- PROTOCOL.md §1 framing -----------------------------------------------------------------

#: Maximum frame after the 2-byte length prefix (PROTOCOL.md §1 default).
FRAME_BYTES_MAX = 2048
_TPDU_BYTES = 5
_HEADER_BYTES = 6
_MTI_AND_BITMAP_BYTES = 10
#: TPDU: 0x60, destination (2), source (2). PROTOCOL.md fixes no addresses; CUPS terminals
#: commonly use destination 0x0003 (the acquirer's NII) and source 0x0000.
DEFAULT_TPDU = bytes.fromhex("6000030000")
#: Header: application type "60", software version "31" (CUPS 3.1), status 0 + processing
#: requirement 0, 3 reserved bytes (zeros).
DEFAULT_HEADER = bytes.fromhex("603100000000")

# --- DEMO.md constants (written here, not imported, so that the client stays independent) ----
DEMO_TMK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
DEMO_INSTITUTION_ID = "48020000"
DEMO_BANK_PIN = "888888"


class FrameError(ValueError):
    """A frame that breaks PROTOCOL.md §1 (length, TPDU, header)."""


def frame(body: bytes, tpdu: bytes = DEFAULT_TPDU, header: bytes = DEFAULT_HEADER) -> bytes:
    """Length prefix + TPDU + header + body, ready for the socket.

    >>> frame(bytes.fromhex("08000020000000000000000001")).hex()
    '0018600003000060310000000008000020000000000000000001'
    """
    assert len(tpdu) == _TPDU_BYTES and tpdu[0] == 0x60, tpdu.hex()
    assert len(header) == _HEADER_BYTES, header.hex()
    size = _TPDU_BYTES + _HEADER_BYTES + len(body)
    if size > FRAME_BYTES_MAX:
        raise FrameError(f"frame of {size} bytes, larger than the maximum {FRAME_BYTES_MAX}")
    return struct.pack(">H", size) + tpdu + header + body


def unframe(payload: bytes) -> tuple[bytes, bytes, bytes]:
    """(TPDU, header, body) of a frame given without its length prefix."""
    if len(payload) < _TPDU_BYTES + _HEADER_BYTES + _MTI_AND_BITMAP_BYTES:
        raise FrameError(f"frame of {len(payload)} bytes, expecting at least "
                         f"{_TPDU_BYTES + _HEADER_BYTES + _MTI_AND_BITMAP_BYTES}")
    if payload[0] != 0x60:
        raise FrameError(f"TPDU id 0x{payload[0]:02X}, expecting 0x60")
    return (bytes(payload[:_TPDU_BYTES]), bytes(payload[_TPDU_BYTES:_TPDU_BYTES + _HEADER_BYTES]),
            bytes(payload[_TPDU_BYTES + _HEADER_BYTES:]))


def check_length(prefix: bytes, frame_bytes_max: int = FRAME_BYTES_MAX) -> int:
    """The declared size of a frame, rejected before any of the body is read when too big."""
    (size,) = struct.unpack(">H", prefix)
    if size > frame_bytes_max:
        raise FrameError(f"declared frame of {size} bytes, larger than the maximum {frame_bytes_max}")
    return size


def recv_frame(sock: socket.socket, frame_bytes_max: int = FRAME_BYTES_MAX) -> bytes:
    """One frame (without its length prefix) from a blocking socket."""
    size = check_length(_recv_exact(sock, 2), frame_bytes_max)
    return _recv_exact(sock, size)


async def read_frame(reader, frame_bytes_max: int = FRAME_BYTES_MAX) -> bytes:
    """One frame (without its length prefix) from an asyncio StreamReader."""
    size = check_length(await reader.readexactly(2), frame_bytes_max)
    return await reader.readexactly(size)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(chunks)} of {size} bytes")
        chunks += chunk
    return bytes(chunks)


# --- field 62 TLV (PROTOCOL.md §3.1) and field 54 balances (§2) -------------------------------

def encode_tlv(items) -> bytes:
    """ASCII TLV: tag (2 letters) + length (3 digits) + value, in the given order.

    >>> encode_tlv([("MT", "11"), ("FO", 0)])
    b'MT00211FO0010'
    """
    if isinstance(items, dict):
        items = items.items()
    out = []
    for tag, value in items:
        text = str(value)
        assert len(tag) == 2 and tag.isalpha() and tag.isupper(), tag
        assert len(text) <= 999, len(text)
        out.append(f"{tag}{len(text):03d}{text}")
    return "".join(out).encode("ascii")


def decode_tlv(data: bytes) -> dict:
    """Field 62 TLV → {tag: value (str)}; raises WireFormatError on a malformed list or a
    repeated tag."""
    out: dict = {}
    pos = 0
    while pos < len(data):
        if pos + 5 > len(data):
            raise WireFormatError("62", f"TLV header cut short: {len(data) - pos} bytes left", pos)
        tag = data[pos:pos + 2].decode("ascii", "replace")
        length_text = data[pos + 2:pos + 5]
        if not (tag.isalpha() and tag.isupper() and length_text.isdigit()):
            raise WireFormatError("62", "TLV tag must be 2 capital letters and length 3 digits", pos)
        length = int(length_text)
        value = data[pos + 5:pos + 5 + length]
        if len(value) != length:
            raise WireFormatError("62", f"TLV {tag}: {len(value)} bytes, expecting {length}", pos)
        if tag in out:
            raise WireFormatError("62", f"TLV {tag} repeated", pos)
        out[tag] = value.decode("ascii")
        pos += 5 + length
    return out


@dataclass(frozen=True)
class Balance:
    """One 20-character entry of field 54."""
    account_type: str   # "10" financial, "91" insurance
    amount_type: str    # "02" available balance
    currency: str       # "156"
    amount_fen: int     # signed: sign C is +, D is -


def encode_balances(entries) -> str:
    """Field 54 from (account_type, amount_fen) pairs (amount type 02, currency 156).

    >>> encode_balances([("91", 150000)])
    '9102156C000000150000'
    """
    out = []
    for account_type, amount_fen in entries:
        sign = "C" if amount_fen >= 0 else "D"
        out.append(f"{account_type}02156{sign}{abs(amount_fen):012d}")
    return "".join(out)


def decode_balances(text: str) -> list[Balance]:
    if len(text) % 20:
        raise WireFormatError("54", f"{len(text)} characters, expecting a multiple of 20")
    out = []
    for pos in range(0, len(text), 20):
        entry = text[pos:pos + 20]
        sign, digits = entry[7], entry[8:20]
        if sign not in "CD" or not digits.isdigit():
            raise WireFormatError("54", "entry sign must be C or D and amount 12 digits", pos)
        amount = int(digits)
        out.append(Balance(entry[0:2], entry[2:4], entry[4:7], amount if sign == "C" else -amount))
    return out


# --- MAC over the body (PROTOCOL.md §3.3) -----------------------------------------------------

def mac_block(body: bytes) -> bytes:
    """The MAB of an encoded body that carries field 64: everything but the last 8 bytes."""
    return body[:-8]


def seal(fields: dict, mac_alg: str | None, mac_key: bytes | None) -> bytes:
    """Encode ``fields`` into a body; with a MAC key, add field 64 over the MAB."""
    fields = {k: v for k, v in fields.items() if k != "64"}
    if mac_key is None:
        return encode_body(fields)
    fields["64"] = bytes(8)  # placeholder: sets bit 64 so the bitmap in the MAB is the final one
    body = encode_body(fields)
    return body[:-8] + mac(mac_alg, mac_key, body[:-8])


def verify(body: bytes, mac_alg: str, mac_key: bytes) -> bool:
    """True when the body's last 8 bytes are the MAC of the rest (the caller knows 64 is set)."""
    return mac(mac_alg, mac_key, body[:-8]) == body[-8:]


# --- replies ----------------------------------------------------------------------------------

@dataclass
class Reply:
    tpdu: bytes
    header: bytes
    body: bytes
    fields: dict
    tlv: dict = field(default_factory=dict)
    balances: list = field(default_factory=list)
    mac_ok: bool | None = None   # None: the reply carries no field 64

    @property
    def mti(self) -> str:
        return self.fields["t"]

    @property
    def code(self) -> str | None:
        return self.fields.get("39")

    @property
    def sign_on_requested(self) -> bool:
        """The header's processing-requirement nibble is 3 (PROTOCOL.md §1)."""
        return (self.header[2] & 0x0F) == 3

    def balance(self, account_type: str) -> int | None:
        for entry in self.balances:
            if entry.account_type == account_type:
                return entry.amount_fen
        return None


def parse_reply(payload: bytes, mac_alg: str | None = None, mac_key: bytes | None = None) -> Reply:
    """A frame (without its length prefix) → Reply; field 62 is decoded as TLV for 02xx replies,
    field 54 into Balance entries, and the MAC checked when a key is given."""
    tpdu, header, body = unframe(payload)
    fields = decode_body(body)
    reply = Reply(tpdu, header, body, fields)
    if "62" in fields and fields["t"][:2] == "02":
        reply.tlv = decode_tlv(fields["62"])
    if "54" in fields:
        reply.balances = decode_balances(fields["54"])
    if "64" in fields and mac_key is not None:
        reply.mac_ok = verify(body, mac_alg, mac_key)
    return reply


def match_key(fields: dict) -> tuple[str, str, str]:
    """MTI class + field 41 + field 11: how pipelined replies are matched to requests (§1).
    The class is the MTI without its last two digits' direction (0200 and 0210 → '02')."""
    return (fields["t"][:2], fields.get("41", ""), fields.get("11", ""))


# --- request builders (PROTOCOL.md §3) --------------------------------------------------------

def _now(when: _dt.datetime | None) -> tuple[str, str]:
    when = when or _dt.datetime.now()
    return when.strftime("%H%M%S"), when.strftime("%m%d")


def _f60(code_60_1: str, batch: str, code_60_3: str = "000") -> str:
    # §3.5: requests always carry 60.1 + 60.2 + 60.3 (11 digits).
    assert len(code_60_1) == 2 and len(batch) == 6 and len(code_60_3) == 3
    return code_60_1 + batch + code_60_3


def _stan(stan) -> str:
    return f"{int(stan):06d}"


def sign_on_request(*, stan, tid: str, mid: str, batch: str = "000001",
                    operator: str | None = "001") -> dict:
    """0800, 60.3 = 003 (double-length keys)."""
    fields = {"t": "0800", "11": _stan(stan), "41": tid, "42": mid, "60": _f60("00", batch, "003")}
    if operator is not None:
        fields["63"] = operator
    return fields


def sign_off_request(*, stan, tid: str, mid: str, batch: str) -> dict:
    return {"t": "0820", "11": _stan(stan), "41": tid, "42": mid, "60": _f60("00", batch, "002")}


def echo_request(*, stan, tid: str, mid: str, batch: str) -> dict:
    return {"t": "0820", "11": _stan(stan), "41": tid, "42": mid, "60": _f60("00", batch, "301")}


def card_request(mti: str, processing_code: str, code_60_1: str, *, stan, tid: str, mid: str,
                 batch: str, pan: str | None = None, track2: str | None = None,
                 amount_fen: int | None = None, pin_block_bytes: bytes | None = None,
                 expiry: str | None = None, when: _dt.datetime | None = None,
                 extra: dict | None = None) -> dict:
    """The fields every card transaction carries (§3): 2 (or 35), 3, 4, 11, 12, 13, 22, 25, 41,
    42, 49, 60, and 52 + 53 with a PIN. Field 22 is "021" with a PIN (3rd digit 1), else "022";
    field 25 is "00" (normal presentment)."""
    hhmmss, mmdd = _now(when)
    fields = {"t": mti, "3": processing_code, "11": _stan(stan), "12": hhmmss, "13": mmdd,
              "22": "021" if pin_block_bytes is not None else "022", "25": "00",
              "41": tid, "42": mid, "49": "156", "60": _f60(code_60_1, batch)}
    if pan is not None:
        fields["2"] = pan
    if track2 is not None:
        fields["35"] = track2
    if pan is None and track2 is None:
        raise ValueError("a card transaction needs field 2 or field 35")
    if amount_fen is not None:
        fields["4"] = f"{int(amount_fen):012d}"
    if expiry is not None:
        fields["14"] = expiry
    if pin_block_bytes is not None:
        fields["52"] = pin_block_bytes
        fields["53"] = SECURITY_CONTROL
    if extra:
        fields.update(extra)
    return fields


def _original(orig_rrn: str, orig_batch: str, orig_stan, orig_date: str) -> dict:
    # Field 61: original batch n6 + original STAN n6 + original date MMDD n4 (§2).
    return {"37": orig_rrn, "61": f"{orig_batch}{_stan(orig_stan)}{orig_date}"}


def balance_inquiry_request(*, account_type: str = "00", **kw) -> dict:
    """0200, 31xx00 (xx: 10 financial, 91 insurance, 00 both), 60.1 = 01; no field 4."""
    return card_request("0200", f"31{account_type}00", "01", amount_fen=None, **kw)


def purchase_request(*, amount_fen: int, **kw) -> dict:
    return card_request("0200", "000000", "22", amount_fen=amount_fen, **kw)


def void_request(*, amount_fen: int, orig_rrn: str, orig_batch: str, orig_stan, orig_date: str,
                 **kw) -> dict:
    extra = {**kw.pop("extra", {}), **_original(orig_rrn, orig_batch, orig_stan, orig_date)}
    return card_request("0200", "200000", "23", amount_fen=amount_fen, extra=extra, **kw)


def refund_request(*, amount_fen: int, orig_rrn: str, orig_batch: str, orig_stan, orig_date: str,
                   **kw) -> dict:
    extra = {**kw.pop("extra", {}), **_original(orig_rrn, orig_batch, orig_stan, orig_date)}
    return card_request("0220", "200000", "25", amount_fen=amount_fen, extra=extra, **kw)


def medical_tlv(*, med_type: str, fo: int, ol: int, ps: int, is_: int, au: str | None = None,
                pa: str | None = None, fp: int | None = None, md: str | None = None) -> bytes:
    """Field 62 of a medical (pre-)settlement request (§3.1), tags in the table's order."""
    items = [("MT", med_type), ("FO", fo), ("OL", ol), ("PS", ps), ("IS", is_)]
    for tag, value in (("AU", au), ("PA", pa), ("FP", fp), ("MD", md)):
        if value is not None:
            items.append((tag, value))
    return encode_tlv(items)


def medical_request(*, amount_fen: int, tlv: bytes, **kw) -> dict:
    """0200, 000000, 60.1 = 81: medical settlement; field 4 is the total bill."""
    extra = {**kw.pop("extra", {}), "62": tlv}
    return card_request("0200", "000000", "81", amount_fen=amount_fen, extra=extra, **kw)


def medical_presettlement_request(*, amount_fen: int, tlv: bytes, **kw) -> dict:
    extra = {**kw.pop("extra", {}), "62": tlv}
    return card_request("0200", "300000", "83", amount_fen=amount_fen, extra=extra, **kw)


def medical_cancel_request(*, amount_fen: int, orig_rrn: str, orig_batch: str, orig_stan,
                           orig_date: str, **kw) -> dict:
    extra = {**kw.pop("extra", {}), **_original(orig_rrn, orig_batch, orig_stan, orig_date)}
    return card_request("0200", "200000", "82", amount_fen=amount_fen, extra=extra, **kw)


def deposit_request(*, amount_fen: int, **kw) -> dict:
    return card_request("0200", "210000", "91", amount_fen=amount_fen, **kw)


def withdrawal_request(*, amount_fen: int, **kw) -> dict:
    return card_request("0200", "010000", "92", amount_fen=amount_fen, **kw)


def transfer_request(*, amount_fen: int, to_pan: str, **kw) -> dict:
    """§3.5: the receiving card's PAN is in field 48 (digits only)."""
    extra = {**kw.pop("extra", {}), "48": to_pan}
    return card_request("0200", "400000", "93", amount_fen=amount_fen, extra=extra, **kw)


#: Fields of the original a reversal does not repeat: the card data beyond the PAN, the PIN,
#: field 62 and the MAC (§3.2 lists what it must carry: 3, 4, 11, 60 and 2).
_NOT_IN_REVERSAL = {"35", "52", "53", "62", "64", "14", "48"}


def reversal_request(original: dict, reason: str = "98") -> dict:
    """0400 from the original request's fields: the original's 2, 3, 4, 11, 12, 13, 22, 25, 41,
    42, 49, 60 (and 37/61 when the original carried them); 39 is the reason (98 timeout, A0 bad
    MAC on the reply, 06 other). Field 22's PIN digit is cleared: no PIN travels with it."""
    assert reason in ("98", "A0", "06"), reason
    fields = {k: v for k, v in original.items() if k not in _NOT_IN_REVERSAL}
    fields["t"] = "0400"
    if "22" in fields:
        fields["22"] = fields["22"][:2] + "2"
    fields["39"] = reason
    return fields


def settlement_totals(debit_fen: int, debit_count: int, credit_fen: int, credit_count: int) -> str:
    """Field 48 of an 0500 (§3.4): group 1 (this engine's cards) and group 2 (zeros), result 0."""
    group1 = f"{debit_fen:012d}{debit_count:03d}{credit_fen:012d}{credit_count:03d}0"
    group2 = f"{0:012d}{0:03d}{0:012d}{0:03d}0"
    return group1 + group2


def batch_settlement_request(*, stan, tid: str, mid: str, batch: str, totals: str,
                             operator: str | None = "001") -> dict:
    fields = {"t": "0500", "11": _stan(stan), "41": tid, "42": mid, "48": totals, "49": "156",
              "60": _f60("00", batch, "201")}
    if operator is not None:
        fields["63"] = operator
    return fields


def batch_upload_request(*, stan, tid: str, mid: str, batch: str, entries=(),
                         code_60_3: str = "201") -> dict:
    """0320 (§3.4, §3.5): field 48 = 2-digit count + up to 8 entries of n2 index + n6 STAN + n20
    card number (right-aligned, zero-filled) + n12 amount; 60.3 = 201 (upload), 202 or 207 (end).
    ``entries``: (stan, pan, amount_fen) tuples."""
    assert len(entries) <= 8, len(entries)
    assert code_60_3 in ("201", "202", "207"), code_60_3
    fields = {"t": "0320", "11": _stan(stan), "41": tid, "42": mid,
              "60": _f60("00", batch, code_60_3)}
    if code_60_3 == "201":
        body = [f"{len(entries):02d}"]
        for index, (entry_stan, pan, amount_fen) in enumerate(entries, start=1):
            body.append(f"{index:02d}{_stan(entry_stan)}{pan:0>20}{amount_fen:012d}")
        fields["48"] = "".join(body)
    return fields


# --- DEMO.md generated cards ------------------------------------------------------------------

def luhn_digit(digits: str) -> str:
    """The Luhn check digit to append to ``digits``.

    >>> luhn_digit("621483000000001")
    '7'
    """
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 0:  # the digit next to the check digit is doubled
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def generated_pan(card_index: int) -> str:
    """DEMO.md: `62148301` + k as 7 digits + Luhn digit."""
    stem = f"62148301{card_index:07d}"
    return stem + luhn_digit(stem)


# --- a synchronous terminal -------------------------------------------------------------------

class Terminal:
    """One terminal on one blocking TCP connection, for tests.

    Holds the STAN counter, the batch number (from the sign-on reply's 60.2), the working keys
    (from its field 62) and the MAC algorithm. ``send`` seals (MAC once signed on), sends one
    frame, reads one reply and verifies its MAC (``Reply.mac_ok``).
    """

    def __init__(self, host: str, port: int, tid: str, mid: str, tmk: bytes = DEMO_TMK,
                 mac_alg: str = "x9.19", *, timeout_s: float = 10.0, tpdu: bytes = DEFAULT_TPDU,
                 header: bytes = DEFAULT_HEADER, stan_start: int = 1):
        self.host, self.port = host, port
        self.tid, self.mid, self.tmk, self.mac_alg = tid, mid, tmk, mac_alg
        self.tpdu, self.header = tpdu, header
        self.timeout_s = timeout_s
        self.stan = stan_start - 1
        self.batch = "000001"
        self.pin_key: bytes | None = None
        self.mac_key: bytes | None = None
        self.sock: socket.socket | None = None

    # connection
    def connect(self) -> "Terminal":
        if self.sock is None:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> "Terminal":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    # plumbing
    def next_stan(self) -> str:
        self.stan = self.stan % 999999 + 1
        return f"{self.stan:06d}"

    def common(self) -> dict:
        """Keyword arguments every builder takes: a fresh STAN, tid, mid, current batch."""
        return {"stan": self.next_stan(), "tid": self.tid, "mid": self.mid, "batch": self.batch}

    def encode(self, fields: dict, *, with_mac: bool | None = None) -> bytes:
        """The frame for ``fields``, MACed once signed on (``with_mac`` overrides)."""
        if with_mac is None:
            with_mac = self.mac_key is not None
        body = seal(fields, self.mac_alg, self.mac_key if with_mac else None)
        return frame(body, self.tpdu, self.header)

    def send_raw(self, data: bytes) -> Reply:
        self.connect()
        self.sock.sendall(data)
        return parse_reply(recv_frame(self.sock), self.mac_alg, self.mac_key)

    def send(self, fields: dict, *, with_mac: bool | None = None) -> Reply:
        return self.send_raw(self.encode(fields, with_mac=with_mac))

    def send_pipelined(self, requests: list[dict]) -> list[Reply]:
        """Send every request, then read as many replies, and return them in request order
        (matched by MTI class + 41 + 11, §1)."""
        self.connect()
        self.sock.sendall(b"".join(self.encode(f) for f in requests))
        by_key = {}
        for _ in requests:
            reply = parse_reply(recv_frame(self.sock), self.mac_alg, self.mac_key)
            by_key[match_key(reply.fields)] = reply
        return [by_key[match_key(f)] for f in requests]

    # network management
    def sign_on(self) -> Reply:
        """0800 → 0810; on 00, installs the working keys (check values verified) and the batch."""
        self.pin_key = self.mac_key = None
        reply = self.send(sign_on_request(stan=self.next_stan(), tid=self.tid, mid=self.mid,
                                          batch=self.batch))
        if reply.code == "00":
            self.pin_key, self.mac_key = decrypt_working_keys(self.tmk, reply.fields["62"])
            self.batch = reply.fields["60"][2:8]
        return reply

    def echo(self) -> Reply:
        return self.send(echo_request(**self.common()))

    def sign_off(self) -> Reply:
        return self.send(sign_off_request(**self.common()))

    # card transactions
    def _pin(self, pin: str | None, pan: str) -> bytes | None:
        if pin is None:
            return None
        assert self.pin_key is not None, "sign on first"
        return pin_block(self.pin_key, pin, pan)

    def balance_inquiry(self, pan: str, account_type: str = "00", pin: str | None = DEMO_BANK_PIN,
                        **kw) -> Reply:
        return self.send(balance_inquiry_request(account_type=account_type, pan=pan,
                                                 pin_block_bytes=self._pin(pin, pan),
                                                 **self.common(), **kw))

    def purchase(self, pan: str, amount_fen: int, pin: str | None = DEMO_BANK_PIN, **kw) -> Reply:
        return self.send(purchase_request(amount_fen=amount_fen, pan=pan,
                                          pin_block_bytes=self._pin(pin, pan), **self.common(), **kw))

    def medical(self, pan: str, amount_fen: int, *, fo: int = 0, ol: int = 0, ps: int = 0,
                is_: int | None = None, med_type: str = "11", pin: str | None = None,
                au=None, pa=None, fp=None, md=None, presettle: bool = False, **kw) -> Reply:
        """Medical settlement (81) or, with ``presettle``, pre-settlement (83). ``is_`` defaults
        to what makes FO + OL + PS + IS = field 4."""
        if is_ is None:
            is_ = amount_fen - fo - ol - ps
        tlv = medical_tlv(med_type=med_type, fo=fo, ol=ol, ps=ps, is_=is_, au=au, pa=pa, fp=fp,
                          md=md)
        build = medical_presettlement_request if presettle else medical_request
        return self.send(build(amount_fen=amount_fen, tlv=tlv, pan=pan,
                               pin_block_bytes=self._pin(pin, pan), **self.common(), **kw))

    def medical_cancel(self, pan: str, amount_fen: int, *, orig_rrn: str, orig_stan,
                       orig_date: str, orig_batch: str | None = None, **kw) -> Reply:
        return self.send(medical_cancel_request(amount_fen=amount_fen, pan=pan, orig_rrn=orig_rrn,
                                                orig_batch=orig_batch or self.batch,
                                                orig_stan=orig_stan, orig_date=orig_date,
                                                **self.common(), **kw))

    def void(self, pan: str, amount_fen: int, *, orig_rrn: str, orig_stan, orig_date: str,
             orig_batch: str | None = None, **kw) -> Reply:
        return self.send(void_request(amount_fen=amount_fen, pan=pan, orig_rrn=orig_rrn,
                                      orig_batch=orig_batch or self.batch, orig_stan=orig_stan,
                                      orig_date=orig_date, **self.common(), **kw))

    def refund(self, pan: str, amount_fen: int, *, orig_rrn: str, orig_stan, orig_date: str,
               orig_batch: str | None = None, **kw) -> Reply:
        return self.send(refund_request(amount_fen=amount_fen, pan=pan, orig_rrn=orig_rrn,
                                        orig_batch=orig_batch or self.batch, orig_stan=orig_stan,
                                        orig_date=orig_date, **self.common(), **kw))

    def deposit(self, pan: str, amount_fen: int, **kw) -> Reply:
        return self.send(deposit_request(amount_fen=amount_fen, pan=pan, **self.common(), **kw))

    def withdrawal(self, pan: str, amount_fen: int, pin: str | None = DEMO_BANK_PIN, **kw) -> Reply:
        return self.send(withdrawal_request(amount_fen=amount_fen, pan=pan,
                                            pin_block_bytes=self._pin(pin, pan), **self.common(),
                                            **kw))

    def transfer(self, pan: str, to_pan: str, amount_fen: int, pin: str | None = DEMO_BANK_PIN,
                 **kw) -> Reply:
        return self.send(transfer_request(amount_fen=amount_fen, to_pan=to_pan, pan=pan,
                                          pin_block_bytes=self._pin(pin, pan), **self.common(),
                                          **kw))

    def reversal(self, original: dict, reason: str = "98") -> Reply:
        """0400 for an original request dict (as built, before sealing)."""
        return self.send(reversal_request(original, reason))

    def batch_settlement(self, debit_fen: int, debit_count: int, credit_fen: int = 0,
                         credit_count: int = 0) -> Reply:
        return self.send(batch_settlement_request(
            totals=settlement_totals(debit_fen, debit_count, credit_fen, credit_count),
            **self.common()))

    def batch_upload(self, entries=(), code_60_3: str = "201") -> Reply:
        return self.send(batch_upload_request(entries=entries, code_60_3=code_60_3,
                                              **self.common()))
