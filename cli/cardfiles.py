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


def _split_lines(data: bytes, encoding: str, columns: tuple) -> tuple[list[bytes], np.ndarray, list]:
    """Decode, check the header, and split into lines with the right number of fields.
    Returns (good lines as UTF-8 bytes, their 1-based file line numbers, errors for the others)."""
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise FileFormatError(f"the file is not valid {encoding} (byte {e.start}): give --encoding "
                              f"{'gbk' if encoding == 'utf-8' else 'utf-8'} if that is what it is") from None
    raw = text.lstrip("\ufeff").encode("utf-8").replace(b"\r\n", b"\n").split(b"\n")
    if not raw or not raw[0].strip():
        raise FileFormatError("the file is empty: expecting a header line")
    if tuple(h.strip() for h in raw[0].decode().split(",")) != columns:
        raise FileFormatError(f"header: expecting {','.join(columns)}")
    if raw[-1] == b"":
        raw.pop()
    commas = len(columns) - 1
    counts = np.fromiter((line.count(b",") for line in raw[1:]), dtype=np.int32, count=len(raw) - 1)
    numbers = np.arange(2, len(raw) + 1)
    ok = counts == commas
    errors = [LineError(int(n), f"{int(c) + 1} fields, expecting {len(columns)}")
              for n, c in zip(numbers[~ok], counts[~ok])]
    good = [line for line, keep in zip(raw[1:], ok) if keep]
    return good, numbers[ok], errors


def _columns(lines: list[bytes], names: tuple) -> dict:
    """The fields of well-formed lines as numpy byte-string columns (pyarrow's CSV reader)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    if not lines:
        return {name: np.zeros(0, dtype="S1") for name in names}
    table = pacsv.read_csv(io.BytesIO(b"\n".join(lines) + b"\n"),
                           read_options=pacsv.ReadOptions(column_names=list(names)),
                           convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                                strings_can_be_null=False))
    # names (姓名) are not used by the engine and are not ASCII: left out
    import pyarrow.compute as pcompute
    out = {}
    for name in names:
        if name == "name":
            continue
        column = pcompute.utf8_trim_whitespace(table.column(name))
        # a non-ASCII character in a code field becomes '?' and fails that field's check, per line
        column = pcompute.replace_substring_regex(column, r"[^\x00-\x7f]", "?").cast(pa.binary())
        out[name] = np.asarray(column.to_numpy(zero_copy_only=False), dtype="S")
    return out


def _digit_matrix(column: np.ndarray, width: int) -> np.ndarray:
    """Right-aligned (n, width) digit values, leading '0's; -1 where a byte is not a digit."""
    padded = np.char.rjust(column, width, b"0").astype(f"S{width}")
    codes = np.frombuffer(padded.tobytes(), dtype=np.uint8).reshape(-1, width).astype(np.int16) - 48
    return np.where((codes >= 0) & (codes <= 9), codes, -1)


def _citizen_ok(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(well formed, check character right) for 社会保障号码 column (GB 11643)."""
    lengths = np.char.str_len(ids)
    m = np.frombuffer(np.char.ljust(ids, 18, b" ").astype("S18").tobytes(), dtype=np.uint8).reshape(-1, 18)
    digits = (m[:, :17] >= 48) & (m[:, :17] <= 57)
    formed = (lengths == 18) & digits.all(axis=1)
    weights = np.array((7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2))
    expect = np.frombuffer(b"10X98765432", dtype=np.uint8)[((m[:, :17].astype(np.int64) - 48) * weights).sum(axis=1) % 11]
    last = np.where(m[:, 17] == ord("x"), ord("X"), m[:, 17])
    return formed, formed & (last == expect)


def _luhn_ok(pans: np.ndarray) -> np.ndarray:
    d = _digit_matrix(pans, 19)[:, ::-1].astype(np.int64)        # rightmost first; leading zeros add 0
    doubled = d[:, 1::2] * 2
    doubled = np.where(doubled > 9, doubled - 9, doubled)
    return (d[:, 0::2].sum(axis=1) + doubled.sum(axis=1)) % 10 == 0


def _amounts(column: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(valid, value): whole non-negative fen up to n12."""
    lengths = np.char.str_len(column)
    d = _digit_matrix(column, 12)
    valid = (lengths >= 1) & (lengths <= 12) & (d >= 0).all(axis=1)
    values = (np.where(d < 0, 0, d) * (10 ** np.arange(11, -1, -1, dtype=np.int64))).sum(axis=1)
    return valid, values


def _pan_hashes(keys: CardKeys, pans: np.ndarray) -> np.ndarray:
    """Keyed hashes of PANs of 16–19 digits (grouped by length: the hash is over the exact digits)."""
    out = np.zeros(pans.shape[0], dtype=np.uint64)
    lengths = np.char.str_len(pans)
    for length in np.unique(lengths):
        rows = np.flatnonzero(lengths == length)
        text = np.frombuffer(pans[rows].astype(f"S{length}").tobytes(), dtype=np.uint8).reshape(-1, int(length))
        out[rows] = keys.pan_hash_rows(np.ascontiguousarray(text))
    return out


def import_issuance(node, keys: CardKeys, data: bytes, encoding: str, business_date: int,
                    initial_social_pin: str = "123456", initial_bank_pin: str = "888888") -> FileReport:
    """制卡数据 → ISSUE commands, vectorised (no Python per valid line). Idempotent: a second
    import of the same file finds every card present (already present) and changes nothing; a
    person with a live card is refused (一人一卡). Each bad line gets the first rule it breaks."""
    report = FileReport()
    config = node.engine.config
    lines, numbers, errors = _split_lines(data, encoding, ISSUE_COLUMNS)
    report.errors.extend(errors)
    c = _columns(lines, ISSUE_COLUMNS)
    n = len(lines)
    reason = np.full(n, "", dtype=object)

    def fail(mask, text):
        hit = mask & (reason == "")
        reason[hit] = text if isinstance(text, str) else text[hit]

    formed, check_ok = _citizen_ok(c["citizen_id"])
    pan_len = np.char.str_len(c["pan"])
    pan_digits = (_digit_matrix(c["pan"], 19) >= 0).all(axis=1) & (pan_len >= 16) & (pan_len <= 19)
    regions = np.array([r.code for r in config.regions])
    types = np.array([t.code for t in config.ins_types])
    region_ok = (_digit_matrix(c["region"], 6) >= 0).all(axis=1) & (np.char.str_len(c["region"]) == 6)
    region_val = np.where(region_ok, np.char.ljust(c["region"], 1, b"0").astype("S6"), b"0").astype(np.int64)
    type_ok = (_digit_matrix(c["ins_type"], 5) >= 0).all(axis=1) & (np.char.str_len(c["ins_type"]) >= 1)
    type_val = np.where(type_ok, c["ins_type"], b"0").astype(np.int64)
    expiry = _digit_matrix(c["expiry_yymm"], 4)
    expiry_ok = (np.char.str_len(c["expiry_yymm"]) == 4) & (expiry >= 0).all(axis=1)
    month = expiry[:, 2] * 10 + expiry[:, 3]
    ins_ok, ins_val = _amounts(c["ins_opening_fen"])
    fin_ok, fin_val = _amounts(c["fin_opening_fen"])
    fail(~formed, np.array([f"社会保障号码 must be 17 digits and a check character, found {len(x)} characters"
                            for x in c["citizen_id"]], dtype=object) if (~formed).any() else "")
    fail(formed & ~check_ok, "社会保障号码 check character is wrong (GB 11643)")
    fail(~pan_digits, "PAN must be 16–19 digits")
    luhn = _luhn_ok(c["pan"])
    if (~luhn & pan_digits).any():
        last4 = np.array([x[-4:].decode() for x in c["pan"]], dtype=object)
        fail(pan_digits & ~luhn, "PAN …" + last4 + ": Luhn check digit is wrong")
    fail(~(region_ok & np.isin(region_val, regions)), "region is not configured on this node")
    fail(~(type_ok & np.isin(type_val, types)), "insurance type is not configured on this node")
    fail(~np.isin(c["person_type"], [b"in_service", b"retired"]), "person_type must be in_service or retired")
    fail(~(expiry_ok & (month >= 1) & (month <= 12)), "expiry must be YYMM")
    fail(~ins_ok, "ins_opening_fen must be a non-negative whole number of fen")
    fail(~fin_ok, "fin_opening_fen must be a non-negative whole number of fen")
    valid = reason == ""
    pan_hashes = np.zeros(n, dtype=np.uint64)
    pan_hashes[valid] = _pan_hashes(keys, c["pan"][valid])
    # duplicated lines: the second and later occurrence of a PAN in this file
    order = np.flatnonzero(valid)
    _, first_index, inverse = np.unique(pan_hashes[order], return_index=True, return_inverse=True)
    first_row = order[first_index][inverse]
    dup = np.zeros(n, dtype=bool)
    dup[order] = first_row != order
    if dup.any():
        for i in np.flatnonzero(dup):
            reason[i] = f"duplicated line: PAN …{c['pan'][i][-4:].decode()} already on line {int(numbers[first_row[np.searchsorted(order, i)]])}"
    valid &= ~dup
    for i in np.flatnonzero(~valid):
        report.errors.append(LineError(int(numbers[i]), reason[i]))
    report.errors.sort(key=lambda e: e.line)
    report.count("refused: bad line", len(report.errors))
    rows = np.flatnonzero(valid)
    if rows.size:
        ids18 = np.frombuffer(np.char.upper(c["citizen_id"][rows]).astype("S18").tobytes(), dtype=np.uint8).reshape(-1, 18)
        q = new_requests(rows.size)
        q["cmd"] = Cmd.ISSUE
        q["pan_hash"] = pan_hashes[rows]
        q["pan_last4"] = np.char.ljust(np.array([x[-4:] for x in c["pan"][rows]], dtype="S4"), 4).astype(np.int64)
        q["person_hash"] = keys.person_hash_rows(np.ascontiguousarray(ids18))
        q["region_code"] = region_val[rows]
        q["ins_type"] = type_val[rows]
        q["acct_type"] = (c["person_type"][rows] == b"retired").astype(np.uint8) | np.uint8(CardFlag.FIN_ACTIVE << 4)
        q["med_type"] = CardStatus.ACTIVE
        q["expiry_yymm"] = (expiry[rows] * np.array([1000, 100, 10, 1])).sum(axis=1)
        q["amount_fen"] = ins_val[rows]
        q["amount2_fen"] = fin_val[rows]
        q["pin_pvv"] = keys.pvv_many(q["pan_hash"], initial_bank_pin)
        q["pin_pvv_new"] = keys.pvv_many(q["pan_hash"], initial_social_pin)
        node.engine.reserve(node.engine.card_count + rows.size)
        results = node.apply_and_append(q, business_date)
        codes = results["code"]
        report.count("imported", int((codes == rc("00")).sum()))
        report.count("already present", int((codes == rc("94")).sum()))
        for i in np.flatnonzero((codes != rc("00")) & (codes != rc("94"))):
            text = rc_str(int(codes[i]))
            line = int(numbers[rows[i]])
            if text == "57":
                report.count("refused: the person has a live card (一人一卡)")
                report.errors.append(LineError(line, "the person already has a live card (一人一卡)"))
            else:
                report.count(f"refused: {REASONS.get(text, text)}")
                report.errors.append(LineError(line, f"refused by the engine: {text} {REASONS.get(text, '')}".strip()))
        report.errors.sort(key=lambda e: e.line)
    for key in [k for k, v in report.counts.items() if v == 0 and k != "imported"]:
        del report.counts[key]
    return report


def _row_hashes(*columns: np.ndarray) -> np.ndarray:
    """A 63-bit key per row from byte-string columns (joined with 0x1f), vectorised (SipHash)."""
    from yikatong.engine import _core
    joined = columns[0]
    for column in columns[1:]:
        joined = np.char.add(np.char.add(joined, b"\x1f"), column)
    width = max(int(np.char.str_len(joined).max()) if joined.size else 1, 1)
    rows = np.frombuffer(joined.astype(f"S{width}").tobytes(), dtype=np.uint8).reshape(-1, width)
    hashes = _core.hash_rows(np.ascontiguousarray(rows), b"yikatong-filekey")
    return (hashes & np.uint64(0x7FFFFFFFFFFFFFFF)) | np.uint64(1)


def disburse(node, keys: CardKeys, data: bytes, encoding: str, business_date: int) -> FileReport:
    """代发: credit financial accounts line by line; the 回盘 says success or the reason per line.
    Idempotent per (batch, line): the same file again credits nothing and yields the same 回盘.
    Vectorised: no Python per valid line until the 回盘 rows are written."""
    report = FileReport()
    lines, numbers, errors = _split_lines(data, encoding, DISBURSE_COLUMNS)
    c = _columns(lines, DISBURSE_COLUMNS)
    n = len(lines)
    reason = np.full(n, "", dtype=object)

    def fail(mask, text):
        hit = mask & (reason == "")
        reason[hit] = text

    line_ok = (np.char.str_len(c["line"]) >= 1) & (_digit_matrix(c["line"], 9) >= 0).all(axis=1)
    fail((np.char.str_len(c["batch_no"]) == 0) | ~line_ok, "batch_no must be given and line must be a number")
    fail(~np.isin(c["purpose"], [p.encode() for p in PURPOSES]), f"purpose must be one of {', '.join(PURPOSES)}")
    amount_ok, amounts = _amounts(c["amount_fen"])
    fail(~amount_ok, "amount_fen must be a non-negative whole number of fen")
    ident_len = np.char.str_len(c["id"])
    by_person = ident_len == 18
    formed, check_ok = _citizen_ok(c["id"])
    fail(by_person & ~formed, "社会保障号码 must be 17 digits and a check character")
    fail(by_person & formed & ~check_ok, "社会保障号码 check character is wrong (GB 11643)")
    pan_ok = ~by_person & (ident_len >= 16) & (ident_len <= 19) & (_digit_matrix(c["id"], 19) >= 0).all(axis=1)
    fail(~by_person & ~(pan_ok & _luhn_ok(c["id"])), "id must be a 社会保障号码 or a PAN with a valid Luhn digit")
    keys_per_line = _row_hashes(np.char.add(b"daifa\x1f", c["batch_no"]), c["line"])
    valid = reason == ""
    order = np.flatnonzero(valid)
    _, first_index, inverse = np.unique(keys_per_line[order], return_index=True, return_inverse=True)
    first_row = order[first_index][inverse]
    for position, i in enumerate(order):
        if first_row[position] != i:
            reason[i] = (f"duplicated line: batch {c['batch_no'][i].decode()} line {c['line'][i].decode()} "
                         f"already on file line {int(numbers[first_row[position]])}")
    valid = reason == ""
    rows_out = [(b"", b"", "", "failed", e.reason, e.line) for e in errors]
    for i in np.flatnonzero(~valid):
        report.errors.append(LineError(int(numbers[i]), reason[i]))
        rows_out.append((c["batch_no"][i], c["line"][i], "", "failed", reason[i], int(numbers[i])))
    report.errors.extend(errors)
    report.errors.sort(key=lambda e: e.line)
    report.count("failed: bad line", len(report.errors))
    rows = np.flatnonzero(valid)
    done = []
    if rows.size:
        q = new_requests(rows.size)
        q["cmd"] = Cmd.CREDIT_FIN
        person_rows = by_person[rows]
        if person_rows.any():
            ids = np.char.upper(c["id"][rows][person_rows]).astype("S18")
            q["person_hash"][person_rows] = keys.person_hash_rows(
                np.ascontiguousarray(np.frombuffer(ids.tobytes(), dtype=np.uint8).reshape(-1, 18)))
        if (~person_rows).any():
            q["pan_hash"][~person_rows] = _pan_hashes(keys, c["id"][rows][~person_rows])
        q["amount_fen"] = amounts[rows]
        q["idem_key"] = keys_per_line[rows]
        q["content_hash"] = _row_hashes(c["id"][rows], c["amount_fen"][rows], c["purpose"][rows])
        results = node.apply_and_append(q, business_date)
        codes = results["code"]
        duplicate = (results["outcome_flags"] & 2) != 0
        ok = codes == rc("00")
        report.count("credited", int((ok & ~duplicate).sum()))
        report.count("credited_fen", int(amounts[rows][ok & ~duplicate].sum()))
        report.count("already credited (same batch and line)", int((ok & duplicate).sum()))
        texts = {code: rc_str(int(code)) for code in np.unique(codes)}
        for j, i in enumerate(rows):
            text = texts[codes[j]]
            if text == "00":
                done.append((c["batch_no"][i], c["line"][i], str(int(amounts[i])), "success", "", int(numbers[i])))
            else:
                why = REASONS.get(text, text) if text != "94" else "same (batch, line) with other content"
                report.count(f"failed: {why}")
                done.append((c["batch_no"][i], c["line"][i], str(int(amounts[i])), "failed", why, int(numbers[i])))
    for key in [k for k, v in report.counts.items() if v == 0]:
        del report.counts[key]
    report.rows = [(b.decode() if isinstance(b, bytes) else b, l.decode() if isinstance(l, bytes) else l, a, res, why)
                   for b, l, a, res, why, _ in sorted(rows_out, key=lambda r: r[5]) + done]
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
