"""Batch files from outside: issuance (制卡数据), disbursement (代发) with its result file (回盘), and
the monthly insurance-account allocation (个人账户划入). Each line becomes one engine command
journaled through the node; each bad line gets its own clear error and nothing else is affected.

Error and result files never carry card data: a line is named by its number and, where useful,
the last four digits of its card.
"""
import csv
import hashlib
import io
from dataclasses import dataclass, field

import numpy as np

from yikatong.engine import Cmd, CardFlag, CardStatus, new_requests, rc, rc_str
from yikatong.engine.cardkeys import CardKeys
from yikatong.engine.demo import citizen_check_char, luhn_ok

ISSUE_COLUMNS = ("citizen_id", "name", "region", "ins_type", "person_type", "pan", "expiry_yymm",
                 "ins_opening_fen", "fin_opening_fen")
DISBURSE_COLUMNS = ("batch_no", "line", "id", "name", "amount_fen", "purpose")
PURPOSES = {"pension": "养老金", "unemployment": "失业金", "maternity": "生育津贴", "subsidy": "补贴"}
ALLOCATION_COLUMNS = ("citizen_id", "period", "source", "person_type", "contribution_base_fen",
                      "employee_contribution_fen")
REASONS = {"14": "unknown person or card (查无此人)", "41": "card lost (挂失)", "43": "card reported stolen",
           "62": "card cancelled or not activated (注销/未激活)", "57": "not permitted to this card",
           "94": "already present", "12": "invalid", "96": "card table full"}


class FileFormatError(ValueError):
    """The file as a whole cannot be read (encoding, header); the message says how to fix it."""


@dataclass
class LineError:
    line: int            # 1-based line number in the file, header included
    reason: str


@dataclass
class FileReport:
    counts: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    rows: list = field(default_factory=list)          # per-line outcome (回盘 rows)

    def count(self, what: str, n: int = 1):
        self.counts[what] = self.counts.get(what, 0) + n


def valid_citizen_id(text: str) -> str | None:
    """None when valid; else why (GB 11643: 17 digits + check character)."""
    if len(text) != 18 or not text[:17].isdigit():
        return f"社会保障号码 must be 17 digits and a check character, found {len(text)} characters"
    if citizen_check_char(text[:17]) != text[17].upper():
        return "社会保障号码 check character is wrong (GB 11643)"
    return None


def read_rows(data: bytes, encoding: str, columns: tuple) -> list[tuple[int, list[str]]]:
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise FileFormatError(f"the file is not valid {encoding} (byte {e.start}): give --encoding "
                              f"{'gbk' if encoding == 'utf-8' else 'utf-8'} if that is what it is") from None
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    try:
        header = next(reader)
    except StopIteration:
        raise FileFormatError("the file is empty: expecting a header line") from None
    if tuple(h.strip() for h in header) != columns:
        raise FileFormatError(f"header: expecting {','.join(columns)}")
    return [(number, row) for number, row in enumerate(reader, start=2)]


def _digits(text: str, what: str) -> tuple[int | None, str | None]:
    text = text.strip()
    if not text.isdigit():
        return None, f"{what} must be a non-negative whole number of fen"
    value = int(text)
    if value > 999_999_999_999:
        return None, f"{what} above 999,999,999,999 fen"
    return value, None


def key_hash(*parts) -> int:
    """A 63-bit duplicate key from the parts (stable across processes and restarts)."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") & 0x7FFFFFFFFFFFFFFF) | 1


def import_issuance(node, keys: CardKeys, data: bytes, encoding: str, business_date: int,
                    initial_social_pin: str = "123456", initial_bank_pin: str = "888888") -> FileReport:
    """制卡数据 → ISSUE commands. Idempotent: a second import of the same file finds every card
    present (already present) and changes nothing; a person with a live card is refused (一人一卡)."""
    report = FileReport()
    config = node.engine.config
    regions = {r.code for r in config.regions}
    types = {t.code for t in config.ins_types}
    rows = read_rows(data, encoding, ISSUE_COLUMNS)
    seen_pans: dict[str, int] = {}
    good = []
    for number, row in rows:
        if len(row) != len(ISSUE_COLUMNS):
            report.errors.append(LineError(number, f"{len(row)} fields, expecting {len(ISSUE_COLUMNS)}"))
            continue
        cid, _name, region, ins_type, person, pan, expiry, ins_fen, fin_fen = (c.strip() for c in row)
        reason = valid_citizen_id(cid)
        if reason is None and not (pan.isdigit() and 16 <= len(pan) <= 19):
            reason = "PAN must be 16–19 digits"
        if reason is None and not luhn_ok(pan):
            reason = f"PAN …{pan[-4:]}: Luhn check digit is wrong"
        if reason is None and (not region.isdigit() or int(region) not in regions):
            reason = "region is not configured on this node"
        if reason is None and (not ins_type.isdigit() or int(ins_type) not in types):
            reason = "insurance type is not configured on this node"
        if reason is None and person not in ("in_service", "retired"):
            reason = "person_type must be in_service or retired"
        if reason is None and not (len(expiry) == 4 and expiry.isdigit() and 1 <= int(expiry[2:]) <= 12):
            reason = "expiry must be YYMM"
        ins_value = fin_value = None
        if reason is None:
            ins_value, reason = _digits(ins_fen, "ins_opening_fen")
        if reason is None:
            fin_value, reason = _digits(fin_fen, "fin_opening_fen")
        if reason is None and pan in seen_pans:
            reason = f"duplicated line: PAN …{pan[-4:]} already on line {seen_pans[pan]}"
        if reason is not None:
            report.errors.append(LineError(number, reason))
            continue
        seen_pans[pan] = number
        good.append((number, cid, int(region), int(ins_type), person == "retired", pan, int(expiry),
                     ins_value, fin_value))
    report.count("refused: bad line", len(report.errors))
    if good:
        q = new_requests(len(good))
        pan_hashes = np.array([keys.pan_hash(g[5]) for g in good], dtype=np.uint64)
        q["cmd"] = Cmd.ISSUE
        q["pan_hash"] = pan_hashes
        q["pan_last4"] = [int(g[5][-4:]) for g in good]
        q["person_hash"] = [keys.person_hash(g[1]) for g in good]
        q["region_code"] = [g[2] for g in good]
        q["ins_type"] = [g[3] for g in good]
        q["acct_type"] = [int(g[4]) | (CardFlag.FIN_ACTIVE << 4) for g in good]
        q["med_type"] = CardStatus.ACTIVE
        q["expiry_yymm"] = [g[6] for g in good]
        q["amount_fen"] = [g[7] for g in good]
        q["amount2_fen"] = [g[8] for g in good]
        q["pin_pvv"] = keys.pvv_many(pan_hashes, initial_bank_pin)
        q["pin_pvv_new"] = keys.pvv_many(pan_hashes, initial_social_pin)
        node.engine.reserve(node.engine.card_count + len(good))
        results = node.apply_and_append(q, business_date)
        for g, code in zip(good, results["code"]):
            text = rc_str(int(code))
            if text == "00":
                report.count("imported")
            elif text == "94":
                report.count("already present")
            elif text == "57":
                report.count("refused: the person has a live card (一人一卡)")
                report.errors.append(LineError(g[0], "the person already has a live card (一人一卡)"))
            else:
                report.count(f"refused: {REASONS.get(text, text)}")
                report.errors.append(LineError(g[0], f"refused by the engine: {text} {REASONS.get(text, '')}".strip()))
    return report


def disburse(node, keys: CardKeys, data: bytes, encoding: str, business_date: int) -> FileReport:
    """代发: credit financial accounts line by line; the 回盘 says success or the reason per line.
    Idempotent per (batch, line): the same file again credits nothing and yields the same 回盘."""
    report = FileReport()
    rows = read_rows(data, encoding, DISBURSE_COLUMNS)
    good, seen = [], {}
    for number, row in rows:
        if len(row) != len(DISBURSE_COLUMNS):
            report.errors.append(LineError(number, f"{len(row)} fields, expecting {len(DISBURSE_COLUMNS)}"))
            continue
        batch_no, line, ident, _name, amount, purpose = (c.strip() for c in row)
        reason = None
        if not batch_no or not line.isdigit():
            reason = "batch_no must be given and line must be a number"
        if reason is None and purpose not in PURPOSES:
            reason = f"purpose must be one of {', '.join(PURPOSES)}"
        value = None
        if reason is None:
            value, reason = _digits(amount, "amount_fen")
        if reason is None:
            if len(ident) == 18:
                reason = valid_citizen_id(ident)
            elif not (ident.isdigit() and 16 <= len(ident) <= 19 and luhn_ok(ident)):
                reason = "id must be a 社会保障号码 or a PAN with a valid Luhn digit"
        if reason is None and (batch_no, line) in seen:
            reason = f"duplicated line: batch {batch_no} line {line} already on file line {seen[(batch_no, line)]}"
        if reason is not None:
            report.errors.append(LineError(number, reason))
            report.rows.append((batch_no, line, "", "failed", reason))
            continue
        seen[(batch_no, line)] = number
        good.append((number, batch_no, line, ident, value, purpose))
    report.count("failed: bad line", len(report.errors))
    if good:
        q = new_requests(len(good))
        q["cmd"] = Cmd.CREDIT_FIN
        for i, (number, batch_no, line, ident, value, purpose) in enumerate(good):
            if len(ident) == 18:
                q[i]["person_hash"] = keys.person_hash(ident)
            else:
                q[i]["pan_hash"] = keys.pan_hash(ident)
                q[i]["pan_last4"] = int(ident[-4:])
            q[i]["amount_fen"] = value
            q[i]["idem_key"] = key_hash("代发", batch_no, line)
            q[i]["content_hash"] = key_hash(ident, value, purpose)
        results = node.apply_and_append(q, business_date)
        for (number, batch_no, line, ident, value, purpose), r in zip(good, results):
            text = rc_str(int(r["code"]))
            if text == "00":
                if int(r["outcome_flags"]) & 2:                  # RES_DUPLICATE: credited before
                    report.count("already credited (same batch and line)")
                else:
                    report.count("credited")
                    report.count("credited_fen", value)
                report.rows.append((batch_no, line, str(value), "success", ""))
            else:
                reason = REASONS.get(text, text) if text != "94" else "same (batch, line) with other content"
                report.count(f"failed: {reason}")
                report.rows.append((batch_no, line, str(value), "failed", reason))
    return report


def allocate(node, keys: CardKeys, data: bytes, encoding: str, business_date: int,
             retired_fen_by_region: dict[int, int]) -> FileReport:
    """个人账户划入: in service, the employee's own contribution up to 2% of the base; retired, the
    region's fixed monthly amount. Idempotent per (person, period, source)."""
    report = FileReport()
    rows = read_rows(data, encoding, ALLOCATION_COLUMNS)
    good, seen = [], {}
    for number, row in rows:
        if len(row) != len(ALLOCATION_COLUMNS):
            report.errors.append(LineError(number, f"{len(row)} fields, expecting {len(ALLOCATION_COLUMNS)}"))
            continue
        cid, period, source, person, base, contribution = (c.strip() for c in row)
        reason = valid_citizen_id(cid)
        if reason is None and not (len(period) == 6 and period.isdigit() and 1 <= int(period[4:]) <= 12):
            reason = "period must be YYYYMM"
        if reason is None and person not in ("in_service", "retired"):
            reason = "person_type must be in_service or retired"
        base_fen = contribution_fen = None
        if reason is None:
            base_fen, reason = _digits(base, "contribution_base_fen")
        if reason is None:
            contribution_fen, reason = _digits(contribution, "employee_contribution_fen")
        key = (cid, period, source)
        if reason is None and key in seen:
            reason = f"duplicated line: same person, period and source as line {seen[key]}"
        if reason is None and person == "retired":
            region = int(cid[:2]) * 10000
            if region not in retired_fen_by_region:
                reason = f"no retired allocation configured for region {region}"
        if reason is not None:
            report.errors.append(LineError(number, reason))
            continue
        seen[key] = number
        if person == "in_service":
            amount = min(contribution_fen, base_fen * 2 // 100)    # up to 2% of the base
        else:
            amount = retired_fen_by_region[int(cid[:2]) * 10000]
        good.append((number, cid, period, source, amount))
    report.count("failed: bad line", len(report.errors))
    if good:
        q = new_requests(len(good))
        q["cmd"] = Cmd.CREDIT_INS
        for i, (number, cid, period, source, amount) in enumerate(good):
            q[i]["person_hash"] = keys.person_hash(cid)
            q[i]["amount_fen"] = amount
            q[i]["idem_key"] = key_hash("划入", cid, period, source)
            q[i]["content_hash"] = key_hash(amount)
        results = node.apply_and_append(q, business_date)
        for g, r in zip(good, results):
            text = rc_str(int(r["code"]))
            if text == "00" and not (int(r["outcome_flags"]) & 2):
                report.count("allocated")
                report.count("allocated_fen", g[4])
            elif text == "00":
                report.count("already allocated")
            else:
                report.count(f"failed: {REASONS.get(text, text)}")
                report.errors.append(LineError(g[0], REASONS.get(text, text)))
    return report


def write_errors(path: str, errors: list[LineError]):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(("line", "reason"))
        for e in errors:
            w.writerow((e.line, e.reason))


def write_result_file(path: str, rows: list[tuple]):
    """回盘: batch_no, line, amount_fen, result, reason."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(("batch_no", "line", "amount_fen", "result", "reason"))
        w.writerows(rows)
