"""A blocking terminal client on the project's own codec and DES (for the demo, tools and tests;
the load generator uses the batched _client instead). It does what a POS terminal does: sign on
(working keys decrypted under the TMK, check values verified), MAC every request after that,
verify every reply's MAC, PIN blocks under the PIN key.

    t = Terminal("127.0.0.1", 8583, "T0000001", "H11000000000001", tmk)
    t.sign_on()
    reply = t.medical("6214830000000017", 5000000, fo=300000, ol=50000, ps=100000, med_type="21")
    reply.code, reply.tlv["FP"]
"""
import datetime
import socket

from . import _codec, _des, security

TPDU = b"\x60\x00\x01\x00\x00"
HEADER = b"\x60\x31\x00\x00\x00\x00"


class Reply:
    def __init__(self, fields: dict, mac_ok: bool | None):
        self.fields = fields
        self.mac_ok = mac_ok
        self.code = fields.get("39")
        self.tlv = parse_tlv(fields.get("62", b"")) if fields.get("t") in ("0210", "0230") else {}

    @property
    def sign_on_requested(self) -> bool:
        return (self.fields["header"][2] & 0x0F) == 3

    def balance(self, account_type: str) -> int | None:
        text = self.fields.get("54", "")
        for i in range(0, len(text), 20):
            entry = text[i:i + 20]
            if entry[:2] == account_type:
                return int(entry[8:]) * (1 if entry[7] == "C" else -1)
        return None


def parse_tlv(data: bytes) -> dict:
    out, pos = {}, 0
    while pos + 5 <= len(data):
        tag, n = data[pos:pos + 2].decode(), int(data[pos + 2:pos + 5])
        out[tag] = data[pos + 5:pos + 5 + n].decode()
        pos += 5 + n
    return out


def medical_tlv(med_type: str, fo: int, ol: int, ps: int, is_: int, pa: bool = False) -> bytes:
    items = [("MT", med_type), ("FO", str(fo)), ("OL", str(ol)), ("PS", str(ps)), ("IS", str(is_))]
    if pa:
        items.append(("PA", "1"))
    return b"".join(t.encode() + b"%03d" % len(v) + v.encode() for t, v in items)


class Terminal:
    def __init__(self, host: str, port: int, tid: str, mid: str, tmk: bytes, mac_algorithm: str = "x9.19",
                 timeout_s: float = 10.0):
        self.addr = (host, port)
        self.tid, self.mid, self.tmk, self.mac_algorithm = tid, mid, tmk, mac_algorithm
        self.timeout_s = timeout_s
        self.sock = None
        self.stan = 0
        self.batch_no = 1
        self.pin_key = self.mac_key = None

    def send(self, fields: dict) -> Reply:
        if self.sock is None:
            self.sock = socket.create_connection(self.addr, timeout=self.timeout_s)
        fields = dict(fields, tpdu=TPDU, header=HEADER)
        if self.mac_key is not None:
            body = security.sealed_body(fields, self.mac_algorithm, self.mac_key)
        else:
            body = _codec.encode_fields(fields)
        self.sock.sendall(len(body).to_bytes(2, "big") + body)
        head = self._recv(2)
        reply_body = self._recv(int.from_bytes(head, "big"))
        reply = _codec.decode_fields(reply_body)
        mac_ok = None
        if "64" in reply and self.mac_key is not None:
            mac_ok = security.mac_of(self.mac_algorithm, self.mac_key, reply_body[11:-8]) == reply["64"]
        return Reply(reply, mac_ok)

    def _recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the server closed the connection")
            data += chunk
        return data

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _common(self, f60_1: str, f60_3: str = "000") -> dict:
        self.stan = self.stan % 999999 + 1
        return {"11": "%06d" % self.stan, "41": self.tid, "42": self.mid,
                "60": f"{f60_1}{self.batch_no:06d}{f60_3}"}

    def sign_on(self) -> Reply:
        self.pin_key = self.mac_key = None
        reply = self.send(dict(self._common("00", "003"), t="0800"))
        if reply.code == "00":
            self.pin_key, self.mac_key = security.open_working_keys(self.tmk, reply.fields["62"])
            self.batch_no = int(reply.fields["60"][2:8])
        return reply

    def card(self, mti: str, proc: str, f60_1: str, pan: str, amount_fen: int | None, pin: str | None = None,
             **extra) -> Reply:
        now = datetime.datetime.now()
        fields = dict(self._common(f60_1), t=mti, **{"2": pan, "3": proc, "12": now.strftime("%H%M%S"),
                                                     "13": now.strftime("%m%d"), "22": "021" if pin else "022",
                                                     "25": "00", "49": "156"})
        if amount_fen is not None:
            fields["4"] = "%012d" % amount_fen
        if pin is not None:
            fields["52"] = _des.tdes_ecb(self.pin_key, _des.pin_block(pin, pan))
            fields["53"] = "2600000000000000"
        fields.update(extra)
        return self.send(fields)

    def medical(self, pan: str, total_fen: int, *, fo: int = 0, ol: int = 0, ps: int = 0, med_type: str = "11",
                pa: bool = False, pin: str | None = None, presettle: bool = False) -> Reply:
        tlv = medical_tlv(med_type, fo, ol, ps, total_fen - fo - ol - ps, pa)
        return self.card("0200", "300000" if presettle else "000000", "83" if presettle else "81", pan,
                         total_fen, pin, **{"62": tlv})

    def balance_inquiry(self, pan: str, pin: str, account_type: str = "00") -> Reply:
        return self.card("0200", f"31{account_type}00", "01", pan, None, pin)
