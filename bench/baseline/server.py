"""The naive baseline server: asyncio + pyiso8583 + `cryptography` + sqlite3, one commit per message.

It is the yardstick the project's server is measured against: simple and honest, not optimised.
Every frame is decoded by pyiso8583, its MAC checked with `cryptography`, the terminal and card
read from sqlite3, the settlement computed in Python, the result written and committed (one
transaction, one fsync, per message), and the reply encoded and MACed the same way.

Serves what a load run needs, on DEMO.md's data:

* sign-on 0800 (60.3 = 003): fresh random PIN and MAC keys under the terminal's TMK (field 62,
  40 bytes with check values), batch number in 60.2;
* medical settlement 0200 / 000000 / 60.1 = 81 with the §3.1 field 62 TLV: the DEMO.md sample
  policies (deductible, ratio bands, annual cap: DOMAIN.md §2 steps 1-7), the insurance
  account then the financial account, 00 / 51 / 10 (partial approval), response TLV and field 54;
* the checks around them: 97 unregistered terminal, 77 not signed on (header asks for sign-on),
  A0 bad or missing MAC (3 in a row → sign on again), 30 format errors, 94/repeat on duplicate
  keys, 13 amount identity, 14 unknown card, 41/62 card state, 55 wrong social PIN, 12 anything
  else it does not serve.

Not served (the project's engine does them): every other business of §3, reversals, family
mutual aid, annual rollover of the accumulators, PIN tries counting.

    python -m bench.baseline.server --port 0 --db /tmp/base.db [--wal] [--cards 100000]

prints ``listening on HOST:PORT`` once it accepts connections.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import hashlib
import json
import logging
import os
import sqlite3
import sys

from .client import (
    DEMO_INSTITUTION_ID,
    DEMO_TMK,
    FRAME_BYTES_MAX,
    FrameError,
    check_length,
    decode_tlv,
    encode_balances,
    encode_tlv,
    generated_pan,
    unframe,
)
from .crypto import encrypt_working_keys, mac, pin_block_clear, tdes_decrypt
from .iso_spec import WireFormatError, decode_body, encode_body

log = logging.getLogger("bench.baseline.server")

BAD_MAC_COUNT_MAX = 3          # PROTOCOL.md §3.3: after 3 consecutive bad MACs, sign on again
CONNECTIONS_MAX = 1024
IN_FLIGHT_PER_CONNECTION_MAX = 64   # frames read ahead of their replies, per connection

# --- DEMO.md data -----------------------------------------------------------------------------

INSTITUTIONS = {
    # code: (kind, region, level)
    "H11000000000001": ("hospital", "110000", 3),
    "H11000000000002": ("hospital", "110000", 2),
    "H31000000000001": ("hospital", "310000", 3),
    "P11000000000001": ("pharmacy", "110000", 0),
    "B11000000000001": ("bank", "110000", 0),
    "M11000000000001": ("merchant", "110000", 0),
}
TERMINALS = {
    "T0000001": ("H11000000000001", "x9.19"),
    "T0000002": ("H11000000000002", "x9.19"),
    "T0000003": ("H31000000000001", "x9.19"),
    "T0000004": ("P11000000000001", "x9.19"),
    "T0000005": ("B11000000000001", "x9.19"),
    "T0000006": ("M11000000000001", "x9.19"),
    "T0000007": ("H11000000000001", "cups-ecb"),
    **{f"T1{i:06d}": ("H11000000000001", "x9.19") for i in range(256)},
}
# PAN: (region, retired, insurance_fen, financial_fen, state, social PIN or None)
NAMED_CARDS = {
    "6214830000000017": ("110000", 0, 200000, 2000000, "active", None),
    "6214830000000025": ("310000", 0, 200000, 2000000, "active", None),
    "6214830000000033": ("310000", 1, 200000, 2000000, "active", None),
    "6214830000000041": ("110000", 0, 50000, 100000, "active", "147258"),
    "6214830000000058": ("110000", 0, 50000, 100000, "lost", None),
    "6214830000000066": ("110000", 0, 50000, 100000, "cancelled", None),
    "6214830000000074": ("110000", 1, 0, 0, "not_activated", None),
    "6214830000000082": ("110000", 0, 10000, 500000, "active", None),
}
_CARD_STATE_CODES = {"lost": "41", "cancelled": "62"}

_INF = 1 << 62


def policy_for(region: str, retired: int, med_type: str, level: int):
    """DEMO.md's sample policy: (per_admission, deductible_first, deductible_later, bands, cap)
    with bands as (upper bound on the in-scope axis, ratio in percent); None for pharmacy."""
    if med_type == "41":
        return None
    inpatient = med_type == "21"
    if region == "110000":
        if not inpatient:
            return (False, 180000, 180000, [(_INF, 70)], 2000000)
        if retired:
            bands = [(3000000, 91), (4000000, 94), (_INF, 97)]
        elif level == 3:
            bands = [(3000000, 85), (4000000, 90), (_INF, 95)]
        else:
            bands = [(3000000, 90), (4000000, 95), (_INF, 97)]
        return (True, 130000, 65000, bands, 50000000)
    if not inpatient:
        return (False, 150000, 150000, [(_INF, 65)], 2000000)
    return (True, 150000, 150000, [(_INF, 92 if retired else 85)], 63000000)


def fund_share(policy, in_scope_fen: int, deductible_used_fen: int, admissions: int,
               fund_paid_fen: int) -> tuple[int, int]:
    """(fund, deductible applied) by DOMAIN.md §2 steps 1-3: bands over [ded, IS], each band's
    part rounded half-up to the fen, then the annual cap."""
    per_admission, first, later, bands, cap = policy
    if per_admission:
        deductible = first if admissions == 0 else later
    else:
        deductible = max(0, first - deductible_used_fen)
    ded = min(in_scope_fen, deductible)
    fund = 0
    lower = 0
    for upper, ratio in bands:
        part = max(0, min(upper, in_scope_fen) - max(lower, ded))
        fund += (part * ratio + 50) // 100
        lower = upper
    fund = min(fund, max(0, cap - fund_paid_fen))
    return fund, ded


# --- storage ----------------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS terminals (
    tid TEXT PRIMARY KEY, mid TEXT NOT NULL, mac_alg TEXT NOT NULL, tmk BLOB NOT NULL,
    pin_key BLOB, mac_key BLOB, batch TEXT NOT NULL, signed_on INTEGER NOT NULL,
    bad_mac_count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS cards (
    pan TEXT PRIMARY KEY, region TEXT NOT NULL, retired INTEGER NOT NULL,
    insurance_fen INTEGER NOT NULL, financial_fen INTEGER NOT NULL, state TEXT NOT NULL,
    social_pin TEXT, deductible_used_fen INTEGER NOT NULL, admissions INTEGER NOT NULL,
    fund_paid_in_fen INTEGER NOT NULL, fund_paid_out_fen INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS journal (
    key TEXT PRIMARY KEY, digest TEXT NOT NULL, rrn TEXT NOT NULL, pan TEXT NOT NULL,
    amount_fen INTEGER NOT NULL, response TEXT NOT NULL, reply TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def open_db(path: str, wal: bool, card_count: int) -> sqlite3.Connection:
    """Open (and on first use fill) the database. synchronous=FULL in both modes: every commit
    is durable; --wal trades the rollback journal's two fsyncs per commit for one WAL append."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(f"PRAGMA journal_mode={'WAL' if wal else 'DELETE'}")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(SCHEMA)
    if db.execute("SELECT COUNT(*) FROM terminals").fetchone()[0] == 0:
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO terminals VALUES (?, ?, ?, ?, NULL, NULL, '000001', 0, 0)",
            [(tid, mid, alg, DEMO_TMK) for tid, (mid, alg) in TERMINALS.items()])
        rows = [(pan, *card, 0, 0, 0, 0) for pan, card in NAMED_CARDS.items()]
        rows += [(generated_pan(k), "110000" if k % 2 == 0 else "310000", int(k % 3 == 0),
                  100000 + (k % 1000) * 100, 5000000, "active", None, 0, 0, 0, 0)
                 for k in range(card_count)]
        db.executemany("INSERT INTO cards VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        db.execute("INSERT INTO counters VALUES ('rrn', 0)")
        db.execute("COMMIT")
    return db


# --- message handling -------------------------------------------------------------------------

class Baseline:
    """Turns one request frame into one reply frame, with one sqlite transaction."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self.messages = 0

    def handle(self, payload: bytes) -> bytes | None:
        """Reply frame (with length prefix) for one request frame, or None to close."""
        self.messages += 1
        try:
            tpdu, header, body = unframe(payload)
        except FrameError:
            return None
        reply_tpdu = tpdu[:1] + tpdu[3:5] + tpdu[1:3]  # §1: swap destination and source
        try:
            request = decode_body(body)
        except WireFormatError as exc:
            log.info("format error: %s", exc.reason)  # no field values in the message
            mti = body[:2].hex()
            if len(mti) == 4 and mti.isdigit() and mti[2] in "02":  # a request: answer 30
                reply = {"t": f"{int(mti) + 10:04d}", "39": "30"}
                return self._frame(reply_tpdu, header, encode_body(reply))
            return None
        self.db.execute("BEGIN IMMEDIATE")
        try:
            reply_fields, sign_on_again, mac_key_alg = self._dispatch(request, body)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        if sign_on_again:
            header = header[:2] + bytes([(header[2] & 0xF0) | 0x03]) + header[3:]
        if mac_key_alg is not None:
            mac_alg, mac_key = mac_key_alg
            reply_fields["64"] = bytes(8)
            reply_body = encode_body(reply_fields)
            reply_body = reply_body[:-8] + mac(mac_alg, mac_key, reply_body[:-8])
        else:
            reply_body = encode_body(reply_fields)
        return self._frame(reply_tpdu, header, reply_body)

    @staticmethod
    def _frame(tpdu: bytes, header: bytes, body: bytes) -> bytes:
        size = len(tpdu) + len(header) + len(body)
        return size.to_bytes(2, "big") + tpdu + header + body

    def _dispatch(self, req: dict, body: bytes):
        """(reply fields, ask for sign-on, (mac_alg, mac_key) or None)."""
        mti = req["t"]
        reply = {"t": f"{int(mti) + 10:04d}"}
        for key in ("11", "41", "42", "60"):
            if key in req:
                reply[key] = req[key]
        now = _dt.datetime.now()
        reply["12"], reply["13"] = now.strftime("%H%M%S"), now.strftime("%m%d")
        reply["15"] = now.strftime("%m%d")
        reply["32"] = DEMO_INSTITUTION_ID
        if mti[2] not in "02" or "41" not in req or "11" not in req or "60" not in req:
            reply["39"] = "30"
            return reply, False, None
        row = self.db.execute(
            "SELECT mid, mac_alg, tmk, pin_key, mac_key, batch, signed_on, bad_mac_count "
            "FROM terminals WHERE tid = ?", (req["41"],)).fetchone()
        if row is None:
            reply["39"] = "97"
            return reply, False, None
        mid, mac_alg, tmk, pin_key, mac_key, batch, signed_on, bad_macs = row
        if mti == "0800" and req["60"][8:11] == "003":
            return self._sign_on(req, reply, tmk, mid), False, None
        if not signed_on:
            reply["39"] = "77"
            return reply, True, None
        keyed = (mac_alg, mac_key)
        if "64" not in req or mac(mac_alg, mac_key, body[:-8]) != req["64"]:
            bad_macs += 1
            self.db.execute("UPDATE terminals SET bad_mac_count = ?, signed_on = ? WHERE tid = ?",
                            (bad_macs, int(bad_macs < BAD_MAC_COUNT_MAX), req["41"]))
            reply["39"] = "A0"
            return reply, bad_macs >= BAD_MAC_COUNT_MAX, keyed
        if bad_macs:
            self.db.execute("UPDATE terminals SET bad_mac_count = 0 WHERE tid = ?", (req["41"],))
        if req.get("42") != mid:
            reply["39"] = "03"
            return reply, False, keyed
        if mti == "0200" and req.get("3") == "000000" and req["60"][:2] == "81":
            return self._medical(req, reply, pin_key), False, keyed
        if mti == "0820" and req["60"][8:11] == "301":
            reply["39"] = "00"
            return reply, False, keyed
        reply["39"] = "12"   # not served by the baseline
        return reply, False, keyed

    def _sign_on(self, req: dict, reply: dict, tmk: bytes, mid: str) -> dict:
        if req.get("42") != mid:
            reply["39"] = "03"
            return reply
        pin_key, mac_key = os.urandom(16), os.urandom(16)
        row = self.db.execute("SELECT batch FROM terminals WHERE tid = ?", (req["41"],)).fetchone()
        self.db.execute("UPDATE terminals SET pin_key = ?, mac_key = ?, signed_on = 1, "
                        "bad_mac_count = 0 WHERE tid = ?", (pin_key, mac_key, req["41"]))
        reply["39"] = "00"
        reply["60"] = req["60"][:2] + row[0] + req["60"][8:]
        reply["62"] = encrypt_working_keys(tmk, pin_key, mac_key)
        return reply

    def _medical(self, req: dict, reply: dict, pin_key: bytes) -> dict:
        for key in ("2", "4", "13", "62"):
            if key not in req:
                reply["39"] = "30"
                return reply
        pan, total = req["2"], int(req["4"])
        # Duplicate key (§3.2): MTI class + 32 + 41 + 42 + 11 + 60.2 + 13.
        key = "|".join(("02", req.get("32", ""), req["41"], req["42"], req["11"], req["60"][2:8],
                        req["13"]))
        content = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in req.items() if k != "64"}
        digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
        seen = self.db.execute("SELECT digest, reply FROM journal WHERE key = ?", (key,)).fetchone()
        if seen is not None:
            if seen[0] != digest:
                reply["39"] = "94"
                return reply
            old = json.loads(seen[1])
            if "62" in old:
                old["62"] = bytes.fromhex(old["62"])
            return old
        try:
            tlv = decode_tlv(req["62"])
        except (WireFormatError, UnicodeDecodeError):
            return self._final(reply, "30", key, digest, pan, total)
        allowed = {"MT", "FO", "OL", "PS", "IS", "AU", "PA", "FP", "MD"}
        amounts = ("FO", "OL", "PS", "IS")
        if (set(tlv) - allowed or not all(t in tlv and tlv[t].isdigit() for t in amounts + ("MT",))
                or ("FP" in tlv and not tlv["FP"].isdigit())):
            return self._final(reply, "30", key, digest, pan, total)
        fo, ol, ps, in_scope = (int(tlv[t]) for t in amounts)
        if fo + ol + ps + in_scope != total or ("FP" in tlv and int(tlv["FP"]) > in_scope):
            return self._final(reply, "13", key, digest, pan, total)
        kind, _region, level = INSTITUTIONS[req["42"]]
        if kind not in ("hospital", "pharmacy") or (kind == "pharmacy") != (tlv["MT"] == "41"):
            return self._final(reply, "58", key, digest, pan, total)
        card = self.db.execute(
            "SELECT region, retired, insurance_fen, financial_fen, state, social_pin, "
            "deductible_used_fen, admissions, fund_paid_in_fen, fund_paid_out_fen "
            "FROM cards WHERE pan = ?", (pan,)).fetchone()
        if card is None:
            return self._final(reply, "14", key, digest, pan, total)
        (region, retired, insurance, financial, state, social_pin, ded_used, admissions,
         paid_in, paid_out) = card
        if state in _CARD_STATE_CODES:
            return self._final(reply, _CARD_STATE_CODES[state], key, digest, pan, total)
        if social_pin is not None or "52" in req:
            expected = social_pin
            if "52" not in req or expected is None or \
                    tdes_decrypt(pin_key, req["52"]) != pin_block_clear(expected, pan):
                return self._final(reply, "55", key, digest, pan, total)
        inpatient = tlv["MT"] == "21"
        policy = policy_for(region, retired, tlv["MT"], level)
        if "FP" in tlv:
            fund, ded = int(tlv["FP"]), 0
        elif policy is None:
            fund, ded = 0, 0
        else:
            fund, ded = fund_share(policy, in_scope, ded_used, admissions,
                                   paid_in if inpatient else paid_out)
        share = total - fund
        ins_leg = min(share, insurance) if tlv.get("AU", "1") != "0" else 0
        fin_leg = share - ins_leg
        cash = 0
        code = "00"
        if fin_leg > financial:
            if tlv.get("PA") != "1":
                reply["54"] = encode_balances([("10", financial), ("91", insurance)])
                return self._final(reply, "51", key, digest, pan, total)
            cash, fin_leg, code = fin_leg - financial, financial, "10"
        if fin_leg and state == "not_activated":
            return self._final(reply, "62", key, digest, pan, total)
        insurance -= ins_leg
        financial -= fin_leg
        self.db.execute(
            "UPDATE cards SET insurance_fen = ?, financial_fen = ?, deductible_used_fen = ?, "
            "admissions = ?, fund_paid_in_fen = ?, fund_paid_out_fen = ? WHERE pan = ?",
            (insurance, financial, ded_used + (0 if inpatient else ded),
             admissions + int(inpatient), paid_in + (fund if inpatient else 0),
             paid_out + (0 if inpatient else fund), pan))
        rrn = self._next_rrn()
        response = [("SI", "S" + rrn), ("FP", fund), ("DE", ded), ("AP", ins_leg), ("BP", fin_leg)]
        if cash:
            response.append(("CP", cash))
        response += [("IB", insurance), ("BB", financial)]
        assert fund + ins_leg + fin_leg + cash == total  # §3.1: FP + AP + BP + CP = field 4
        reply["37"], reply["38"] = rrn, rrn[-6:]
        reply["54"] = encode_balances([("10", financial), ("91", insurance)])
        reply["62"] = encode_tlv(response)
        return self._final(reply, code, key, digest, pan, total, rrn)

    def _next_rrn(self) -> str:
        value = self.db.execute(
            "UPDATE counters SET value = value + 1 WHERE name = 'rrn' RETURNING value").fetchone()[0]
        return f"{value:012d}"

    def _final(self, reply: dict, code: str, key: str, digest: str, pan: str, total: int,
               rrn: str = "") -> dict:
        reply["39"] = code
        stored = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in reply.items()}
        self.db.execute("INSERT INTO journal VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (key, digest, rrn, pan, total, code, json.dumps(stored)))
        return reply


# --- asyncio transport ------------------------------------------------------------------------

async def serve_connection(baseline: Baseline, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter, frame_bytes_max: int) -> None:
    try:
        while True:
            try:
                prefix = await reader.readexactly(2)
            except asyncio.IncompleteReadError:
                return
            try:
                size = check_length(prefix, frame_bytes_max)
            except FrameError:
                log.info("frame too large; closing the connection")
                return
            payload = await reader.readexactly(size)
            reply = baseline.handle(payload)
            if reply is None:
                return
            writer.write(reply)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        return
    finally:
        writer.close()


async def main_async(args) -> None:
    db = open_db(args.db, args.wal, args.cards)
    baseline = Baseline(db)
    limit = asyncio.Semaphore(CONNECTIONS_MAX)

    async def on_connect(reader, writer):
        if limit.locked():
            writer.close()
            return
        async with limit:
            await serve_connection(baseline, reader, writer, args.frame_bytes_max)

    server = await asyncio.start_server(on_connect, args.host, args.port)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening on {host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline.server",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8583)
    parser.add_argument("--db", required=True, help="sqlite3 file (created and filled if new)")
    parser.add_argument("--wal", action="store_true", help="journal_mode=WAL (default DELETE)")
    parser.add_argument("--cards", type=int, default=100000, help="generated cards (DEMO.md)")
    parser.add_argument("--frame-bytes-max", type=int, default=FRAME_BYTES_MAX)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        asyncio.run(main_async(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
