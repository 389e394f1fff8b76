"""Batch files from outside: issuance (制卡数据), disbursement (代发) with its result file (回盘), and
the monthly insurance-account allocation (个人账户划入). Each line becomes one engine command
journaled through the node; each bad line gets its own clear error and nothing else is affected.

Error and result files never carry card data: a line is named by its number and, where useful,
the last four digits of its card.
"""
import csv
import hashlib
import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from yikatong import _cardfiles
from yikatong.engine import (REQUEST_DTYPE, RESULT_DTYPE, Cmd, CardFlag, CardStatus, ResFlag, new_requests,
                             rc, rc_str)
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
           "65": "payer covers the maximum number of beneficiaries (家庭共济)",
           "94": "already present", "12": "invalid", "96": "card table full"}
FILE_KEY = b"yikatong-filekey"        # SipHash key of the 代发 duplicate keys (not a secret)


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
    result_csv: bytes = b""                           # 代发: the 回盘 as written (CSV, \r\n)

    def count(self, what: str, n: int = 1):
        self.counts[what] = self.counts.get(what, 0) + n

    @property
    def rows(self) -> list[tuple]:
        """The 回盘 rows (batch_no, line, amount_fen, result, reason) read back from the file
        text (Python per row: for tests and small files; the file itself is built in bulk)."""
        if not self.result_csv:
            return []
        return [tuple(row) for row in csv.reader(io.StringIO(self.result_csv.decode("utf-8")))][1:]


# Journal batches of a file job: each is applied, then handed to the writer process while the
# next one is applied (Node.submit / wait_durable pipelining); at most JOURNAL_BATCHES_IN_FLIGHT
# are unacknowledged, so the writer's queue (and its memory) stays bounded.
JOURNAL_BATCH_ROWS = 1 << 17                  # 40 MiB of 304-byte records
JOURNAL_BATCHES_IN_FLIGHT = 5             # six batches in flight fit the writer's 256 MiB ring

# Line status from yikatong._cardfiles (the first rule a line breaks, checked in this order).
ST_FIELDS = 1
ISSUE_REASONS = {
    2: None,                                  # 社会保障号码 length: the text names the length found
    3: "社会保障号码 check character is wrong (GB 11643)",
    4: "PAN must be 16–19 digits",
    5: None,                                  # Luhn: the text names the PAN's last four digits
    6: "region is not configured on this node",
    7: "insurance type is not configured on this node",
    8: "person_type must be in_service or retired",
    9: "expiry must be YYMM",
    10: "ins_opening_fen must be a non-negative whole number of fen",
    11: "fin_opening_fen must be a non-negative whole number of fen",
}
DISBURSE_REASONS = {
    20: "batch_no must be given (at most 32 characters) and line must be a number (at most 9 digits)",
    21: f"purpose must be one of {', '.join(PURPOSES)}",
    22: "amount_fen must be a non-negative whole number of fen",
    23: "社会保障号码 must be 17 digits and a check character",
    24: "社会保障号码 check character is wrong (GB 11643)",
    25: "id must be a 社会保障号码 or a PAN with a valid Luhn digit",
}
NAME_MISMATCH = "name mismatch (户名不符)"
WHITE = " \t\n\r\x0b\x0c"


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


def _file_lines(data: bytes, encoding: str, columns: tuple) -> tuple[bytes, np.ndarray]:
    """Check the encoding and the header; return the file as UTF-8 bytes and the start offsets
    of the lines after the header (`_cardfiles.line_starts`: file line number = index + 2).
    UTF-8 is checked without decoding; GBK is re-encoded to UTF-8 (names only are not ASCII)."""
    if encoding == "utf-8":
        text = data
    else:
        try:
            text = data.decode(encoding).encode("utf-8")
        except UnicodeDecodeError as e:
            raise FileFormatError(f"the file is not valid {encoding} (byte {e.start}): give --encoding "
                                  f"utf-8 if that is what it is") from None
    begin = 0
    while text.startswith(b"\xef\xbb\xbf", begin):             # byte order marks
        begin += 3
    end = text.find(b"\n", begin)
    end = len(text) if end < 0 else end
    header = text[begin:end].decode("utf-8", errors="replace")     # checked below with the rest
    first = min(end + 1, len(text))
    # Two halves split after a '\n' (never inside a UTF-8 sequence of a valid file), each checked
    # and split into lines on its own thread (the Cython passes release the GIL): ≈ 0.07 s per
    # million lines on one core, before anything else of the import can start.
    mid = text.find(b"\n", max(first, len(text) // 2)) + 1 if len(text) - first >= FILE_SPLIT_MIN_BYTES else 0
    view = memoryview(text)
    halves = [(0, mid), (mid, len(text))] if 0 < mid < len(text) else [(0, len(text))]
    check = encoding == "utf-8"

    def scan(lo: int, hi: int):
        bad = _cardfiles.utf8_error_offset(view[lo:hi]) if check else -1
        return (lo + bad if bad >= 0 else -1), _cardfiles.line_starts(view[lo:hi], max(first - lo, 0)) + lo
    scanned = _in_threads([lambda lo=lo, hi=hi: scan(lo, hi) for lo, hi in halves])
    bad = next((b for b, _ in scanned if b >= 0), -1)                # the first half's error first
    if bad >= 0:
        raise FileFormatError(f"the file is not valid utf-8 (byte {bad}): give --encoding gbk "
                              f"if that is what it is")
    if not header.strip():
        raise FileFormatError("the file is empty: expecting a header line")
    if tuple(h.strip() for h in header.split(",")) != columns:
        raise FileFormatError(f"header: expecting {','.join(columns)}")
    if len(scanned) == 1:
        return text, scanned[0][1]
    return text, np.concatenate([scanned[0][1][:-1], scanned[1][1]])


def _line_fields(text: bytes, starts: np.ndarray, index: int) -> list[str]:
    """The fields of one line as the Cython pass sees them (bad lines only: their error text)."""
    line = text[starts[index]:starts[index + 1] - 1].decode("utf-8")
    fields = [f.strip(WHITE) for f in line.split(",")]
    return [f[1:-1] if len(f) >= 2 and f[0] == f[-1] == '"' else f for f in fields]


def _first_duplicates(keys: np.ndarray) -> dict[int, int]:
    """{row: first row with the same key} for every row whose key an earlier row has. One sort
    decides that there are none (the usual case); the rows of duplicated keys are then few."""
    if keys.size < 2:
        return {}
    ordered = np.sort(keys)
    same = ordered[1:] == ordered[:-1]
    if not same.any():
        return {}
    repeated = np.unique(ordered[1:][same])
    first, out = {}, {}
    for row in np.flatnonzero(np.isin(keys, repeated)).tolist():
        key = int(keys[row])
        if key in first:
            out[row] = first[key]
        else:
            first[key] = row
    return out


# The file pass runs on PARSE_THREADS threads over equal shares of the lines (the Cython pass
# releases the GIL): it runs before the first batch reaches the writer process, so the second
# core is otherwise idle then. Files below PARSE_LINES_MIN lines per thread are one share.
PARSE_THREADS = 2
FILE_SPLIT_MIN_BYTES = 1 << 20          # smaller files: one thread checks and splits them
PARSE_LINES_MIN = 65_536


def _in_threads(calls: list) -> list:
    """Run the calls (callables without arguments) at once, the first on this thread; their
    results in order. An exception in any is raised here once all have finished."""
    results, errors = [None] * len(calls), []

    def run(k):
        try:
            results[k] = calls[k]()
        except BaseException as e:  # noqa: BLE001 — re-raised below, on the caller's thread
            errors.append(e)
    threads = [threading.Thread(target=run, args=(k,), name="cardfiles-pass") for k in range(1, len(calls))]
    for t in threads:
        t.start()
    run(0)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _parse_in_shares(parse, starts: np.ndarray, status: np.ndarray, row_line: np.ndarray, rows: list) -> int:
    """`parse(starts, status, row_line, *rows)` over shares of the lines at once; the good rows
    of every share compacted in file order into the head of `row_line` and of each array in
    `rows` (per-row outputs; an empty one stays empty). Returns the number of good rows.
    The usual file has no bad line: then the shares are already in place and nothing moves."""
    lines = starts.shape[0] - 1
    shares = max(1, min(PARSE_THREADS, lines // PARSE_LINES_MIN))
    bounds = [lines * k // shares for k in range(shares + 1)]
    part = lambda a, lo, hi: a[lo:hi] if a.shape[0] else a
    goods = _in_threads([
        (lambda lo=lo, hi=hi: parse(starts[lo:hi + 1], status[lo:hi], row_line[lo:hi],
                                    *[part(a, lo, hi) for a in rows]))
        for lo, hi in zip(bounds, bounds[1:])])
    good = goods[0]
    for lo, found in zip(bounds[1:], goods[1:]):
        row_line[lo:lo + found] += lo                    # line indexes within the share → in the file
        if good != lo:                                   # an earlier share had bad lines
            for a in [row_line] + [a for a in rows if a.shape[0]]:
                a[good:good + found] = a[lo:lo + found]  # (numpy copies overlapping ranges safely)
        good += found
    return good


def _apply_journaled(node, requests: np.ndarray, business_date: int, wait: bool = True, prepare=None,
                     tickets: list | None = None):
    """Apply and journal the requests in JOURNAL_BATCH_ROWS batches, pipelined with the writer
    process; return (code, outcome_flags, card_slot) per request once every batch is durable.
    `wait=False`: return (those, ticket) as soon as the last batch is applied; the caller may
    prepare its answer while the last batches commit, and must `node.wait_durable(ticket)`
    before anything of it leaves (ticket None: nothing was journaled). `prepare(batch)`, when
    given, completes each batch's rows in place just before it is applied: work done there
    overlaps the writer's commits of the batches before it instead of preceding them all.
    `tickets`: the caller's list of unacknowledged batches, carried across calls (a file applied
    in chunks keeps one window of JOURNAL_BATCHES_IN_FLIGHT over all of them)."""
    out = np.empty(requests.shape[0], dtype=[("code", "<u2"), ("outcome_flags", "u1"), ("card_slot", "<i4")])
    tickets = [] if tickets is None else tickets
    last = None
    # one results buffer for every batch: its answers are copied into `out` before the next
    # batch (a fresh 16 MiB array per batch was 1.3 GB of page faults per 10 M cards)
    answers = np.empty(min(requests.shape[0], JOURNAL_BATCH_ROWS), dtype=RESULT_DTYPE)
    for first in range(0, requests.shape[0], JOURNAL_BATCH_ROWS):
        batch = requests[first:first + JOURNAL_BATCH_ROWS]
        if prepare is not None:
            prepare(batch)
        ticket, results = node.submit(batch, business_date, results=answers)
        part = out[first:first + results.shape[0]]
        part["code"] = results["code"]
        part["outcome_flags"] = results["outcome_flags"]
        part["card_slot"] = results["card_slot"]
        tickets.append(ticket)
        last = ticket
        if len(tickets) > JOURNAL_BATCHES_IN_FLIGHT:
            node.wait_durable(tickets[-1 - JOURNAL_BATCHES_IN_FLIGHT])
            del tickets[:-JOURNAL_BATCHES_IN_FLIGHT]
    if not wait:
        return out, last
    if last is not None:
        node.wait_durable(last)
    return out


def _issuance_rows(config, keys: CardKeys, text: bytes, starts: np.ndarray, name_key: bytes | None = None):
    """(status per line, ISSUE requests of the good lines, their line indexes, their name hashes)."""
    n = starts.shape[0] - 1
    status = np.empty(n, dtype=np.uint8)
    requests = np.empty(n, dtype=REQUEST_DTYPE)
    row_line = np.empty(n, dtype=np.int64)
    names = np.empty(n if name_key else 0, dtype=np.uint64)
    regions = np.array([r.code for r in config.regions], dtype=np.int64)
    ins_types = np.array([t.code for t in config.ins_types], dtype=np.int64)
    good = _parse_in_shares(
        lambda starts_, status_, row_line_, requests_, names_: _cardfiles.parse_issuance(
            text, starts_, regions, ins_types, keys.pan_key, keys.person_key, name_key, CardStatus.ACTIVE,
            CardFlag.FIN_ACTIVE, status_, requests_, row_line_, names_),
        starts, status, row_line, [requests, names])
    return status, requests[:good], row_line[:good], names[:good] if name_key else names


# An issuance file is parsed in chunks of lines, each while the chunk before it is applied and
# journaled: the file pass (≈ 0.3 µs per line on two threads) then overlaps the writer's commits
# instead of preceding the first one. The first chunk is small so the writer starts early; later
# ones grow (fewer merges of the duplicate keys, below).
ISSUE_CHUNK_LINES_FIRST = 1 << 18
ISSUE_CHUNK_LINES_MAX = 1 << 22


def _line_chunks(lines: int) -> list[tuple[int, int]]:
    bounds, lo, size = [], 0, ISSUE_CHUNK_LINES_FIRST
    while lo < lines:
        bounds.append((lo, min(lines, lo + size)))
        lo, size = lo + size, min(size * 2, ISSUE_CHUNK_LINES_MAX)
    return bounds


class _DuplicateLines:
    """The duplicate rule over a file taken chunk by chunk, in file order: a good line whose PAN
    an earlier good line has is refused ("duplicated line … already on line N"), the first one
    kept — the same answer as one pass over the whole file, since the first occurrence of a key is
    always in an earlier or the same chunk. The keys seen so far are one sorted array (a sorted
    chunk is checked against it with one searchsorted and merged into it: two sorted runs, which
    numpy's stable sort merges in linear time)."""

    def __init__(self):
        self.seen = np.empty(0, dtype=np.uint64)
        self.chunks: list[tuple[np.ndarray, np.ndarray]] = []     # (keys, file line index) kept

    def take(self, keys: np.ndarray, row_line: np.ndarray) -> dict[int, int]:
        """{row: file line index of the key's first good line} for the chunk's duplicated rows;
        records the chunk's other rows as seen."""
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        out = {row: int(row_line[first]) for row, first in _first_duplicates(keys).items()}
        chunk_sorted = np.sort(keys)
        if self.seen.size and keys.size:
            at = np.minimum(np.searchsorted(self.seen, chunk_sorted), self.seen.size - 1)
            hits = chunk_sorted[self.seen[at] == chunk_sorted]
            if hits.size:                                        # rare: find the earlier lines
                first_line = {}
                for chunk_keys, chunk_lines in self.chunks:
                    for row in np.flatnonzero(np.isin(chunk_keys, hits)).tolist():
                        first_line.setdefault(int(chunk_keys[row]), int(chunk_lines[row]))
                for row in np.flatnonzero(np.isin(keys, hits)).tolist():
                    out[row] = first_line[int(keys[row])]
        if out:
            keep = np.ones(keys.shape[0], dtype=bool)
            keep[list(out)] = False
            self.chunks.append((keys[keep], row_line[keep]))
            chunk_sorted = np.sort(keys[keep])
        else:
            self.chunks.append((keys, row_line))
        self.seen = np.sort(np.concatenate([self.seen, chunk_sorted]), kind="stable")
        return out


def import_issuance(node, keys: CardKeys, data: bytes, encoding: str, business_date: int,
                    initial_social_pin: str = "123456", initial_bank_pin: str = "888888") -> FileReport:
    """制卡数据 → ISSUE commands: one Cython pass checks every line and builds the requests, the
    engine applies them in large journaled batches. Idempotent: a second import of the same file
    finds every card present (already present) and changes nothing; a person with a live card is
    refused (一人一卡). Each bad line gets the first rule it breaks. The file's encoding and
    header are checked whole before anything is applied (a wrong --encoding changes nothing);
    the lines are then parsed a chunk ahead of the chunk being applied and journaled."""
    report = FileReport()
    text, starts = _file_lines(data, encoding, ISSUE_COLUMNS)
    config = node.engine.config
    duplicates = _DuplicateLines()

    def parse(lo: int, hi: int):
        # on the parse thread, chunk after chunk in file order (the duplicate rule needs that)
        status, q, row_line, _ = _issuance_rows(config, keys, text, starts[lo:hi + 1])
        row_line += lo
        dup_rows = duplicates.take(q["pan_hash"], row_line)
        bad = [(i + lo, int(status[i])) for i in np.flatnonzero(status).tolist()]
        dup_errors = [LineError(int(row_line[row]) + 2, f"duplicated line: PAN …{int(q['pan_last4'][row]):04d} "
                                                        f"already on line {first + 2}")
                      for row, first in dup_rows.items()]
        if dup_rows:
            keep = np.ones(q.shape[0], dtype=bool)
            keep[list(dup_rows)] = False
            q, row_line = q[keep], row_line[keep]
        return bad, dup_errors, q, row_line

    def initial_pins(batch):
        # the initial PINs' verification values, a batch at a time while the writer commits
        # the batches before (≈ 0.7 s per 10 M cards when they were computed up front)
        pan_hashes = np.ascontiguousarray(batch["pan_hash"])
        batch["pin_pvv"], batch["pin_pvv_new"] = _in_threads([
            lambda: keys.pvv_many(pan_hashes, initial_bank_pin),
            lambda: keys.pvv_many(pan_hashes, initial_social_pin)])

    chunks = _line_chunks(starts.shape[0] - 1)
    # room for every line's card at once (a reserve copies the card columns and rebuilds the
    # indexes: once, not per chunk)
    node.reserve_cards(node.engine.card_count + starts.shape[0] - 1)
    bad_lines, codes_parts, lines_parts, tickets, last_ticket = [], [], [], [], None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="issuance-parse") as parser:
        ahead = parser.submit(parse, *chunks[0]) if chunks else None
        for k in range(len(chunks)):
            bad, dup_errors, q, row_line = ahead.result()
            if k + 1 < len(chunks):
                ahead = parser.submit(parse, *chunks[k + 1])
            bad_lines += bad
            report.errors += dup_errors
            if q.shape[0]:
                results, ticket = _apply_journaled(node, q, business_date, wait=False, prepare=initial_pins,
                                                   tickets=tickets)
                last_ticket = ticket if ticket is not None else last_ticket
                codes_parts.append(results["code"])
                lines_parts.append(row_line)
    for i, code in bad_lines:                                 # bad lines only
        if code == ST_FIELDS:
            reason = f"{_cardfiles.field_count(text, starts, i)} fields, expecting {len(ISSUE_COLUMNS)}"
        elif code == 2:
            reason = (f"社会保障号码 must be 17 digits and a check character, "
                      f"found {len(_line_fields(text, starts, i)[0])} characters")
        elif code == 5:
            reason = f"PAN …{_line_fields(text, starts, i)[5][-4:]}: Luhn check digit is wrong"
        else:
            reason = ISSUE_REASONS[code]
        report.errors.append(LineError(i + 2, reason))
    report.errors.sort(key=lambda e: e.line)
    report.count("refused: bad line", len(report.errors))
    if codes_parts:
        codes, row_line = np.concatenate(codes_parts), np.concatenate(lines_parts)
        report.count("imported", int((codes == rc("00")).sum()))
        report.count("already present", int((codes == rc("94")).sum()))
        refused = []
        for i in np.flatnonzero((codes != rc("00")) & (codes != rc("94"))).tolist():
            text_code = rc_str(int(codes[i]))
            line = int(row_line[i]) + 2
            if text_code == "57":
                report.count("refused: the person has a live card (一人一卡)")
                refused.append(LineError(line, "the person already has a live card (一人一卡)"))
            else:
                report.count(f"refused: {REASONS.get(text_code, text_code)}")
                refused.append(LineError(line, f"refused by the engine: {text_code} {REASONS.get(text_code, '')}".strip()))
        if refused:
            report.errors = sorted(report.errors + refused, key=lambda e: e.line)
    if last_ticket is not None:
        node.wait_durable(last_ticket)                        # the report leaves once all is durable
    for key in [k for k, v in report.counts.items() if v == 0 and k != "imported"]:
        del report.counts[key]
    return report


class HolderNames:
    """The card holders' names from issuance data (制卡数据), as keyed hashes only, for the 代发
    name check (户名不符): by PAN and by 社会保障号码. The key is drawn per instance, so the
    hashes mean nothing outside this run and nothing is stored.

        holders = HolderNames.from_files(node.engine.config, keys, [(data, "utf-8")])
    """

    def __init__(self, pan_hashes, person_hashes, name_hashes, name_key: bytes):
        self.name_key = name_key
        self._tables = []
        for keys_ in (pan_hashes, person_hashes):
            order = np.argsort(keys_, kind="stable")
            self._tables.append((keys_[order], name_hashes[order]))

    @classmethod
    def from_files(cls, config, keys: CardKeys, files: list[tuple[bytes, str]]) -> "HolderNames":
        """Every good line of the files (a line a FileFormatError would refuse raises it)."""
        name_key = os.urandom(16)
        pans, persons, names = [], [], []
        for data, encoding in files:
            text, starts = _file_lines(data, encoding, ISSUE_COLUMNS)
            _, q, _, name_hashes = _issuance_rows(config, keys, text, starts, name_key)
            pans.append(q["pan_hash"].copy())
            persons.append(q["person_hash"].copy())
            names.append(name_hashes)
        empty = np.zeros(0, dtype=np.uint64)
        cat = lambda parts: np.concatenate(parts) if parts else empty
        return cls(cat(pans), cat(persons), cat(names), name_key)

    def mismatched(self, pan_hashes: np.ndarray, person_hashes: np.ndarray, by_person: np.ndarray,
                   name_hashes: np.ndarray) -> np.ndarray:
        """True where the card (PAN) or person is in the issuance data under another name; a
        card or person not in it is not checked."""
        out = np.zeros(by_person.shape[0], dtype=bool)
        (pan_keys, pan_names), (person_keys, person_names) = self._tables
        for table_keys, table_names, rows, wanted in ((pan_keys, pan_names, ~by_person, pan_hashes),
                                                      (person_keys, person_names, by_person, person_hashes)):
            if not table_keys.size or not rows.any():
                continue
            at = np.minimum(np.searchsorted(table_keys, wanted), table_keys.size - 1)
            known = rows & (table_keys[at] == wanted)
            out |= known & (table_names[at] != name_hashes)
        return out


def disburse(node, keys: CardKeys, data: bytes, encoding: str, business_date: int,
             holders: HolderNames | None = None) -> FileReport:
    """代发: credit financial accounts line by line; the 回盘 (report.result_csv) says success or
    the reason per line. Idempotent per (batch, line): the same file again credits nothing and
    yields the same 回盘. With `holders` (the issuance data), a line whose name is not the card
    holder's is refused: name mismatch (户名不符), nothing credited.

    One Cython pass checks the lines and builds the requests; the engine applies them in large
    journaled batches; the 回盘 rows of those lines are written in bulk. The 回盘 lists the
    malformed lines first (by line number), then every well-formed line in file order."""
    report = FileReport()
    text, starts = _file_lines(data, encoding, DISBURSE_COLUMNS)
    n = starts.shape[0] - 1
    status = np.empty(n, dtype=np.uint8)
    q = np.empty(n, dtype=REQUEST_DTYPE)
    row_line = np.empty(n, dtype=np.int64)
    by_person = np.empty(n, dtype=np.uint8)
    names = np.empty(n if holders else 0, dtype=np.uint64)
    name_key = holders.name_key if holders else None
    good = _parse_in_shares(
        lambda starts_, status_, row_line_, q_, by_person_, names_: _cardfiles.parse_disbursement(
            text, starts_, keys.pan_key, keys.person_key, FILE_KEY, name_key, status_, q_, row_line_,
            by_person_, names_),
        starts, status, row_line, [q, by_person, names])
    q, row_line, by_person = q[:good], row_line[:good], by_person[:good].view(bool)
    bad = []                                                   # (line number, batch, line, reason)
    for i in np.flatnonzero(status).tolist():
        code = int(status[i])
        if code == ST_FIELDS:
            bad.append((i + 2, "", "", f"{_cardfiles.field_count(text, starts, i)} fields, "
                                       f"expecting {len(DISBURSE_COLUMNS)}"))
        else:
            fields = _line_fields(text, starts, i)
            bad.append((i + 2, fields[0], fields[1], DISBURSE_REASONS[code]))
    duplicates = _first_duplicates(q["idem_key"])
    for row, first in duplicates.items():
        fields = _line_fields(text, starts, int(row_line[row]))
        bad.append((int(row_line[row]) + 2, fields[0], fields[1],
                    f"duplicated line: batch {fields[0]} line {fields[1]} already on file line {int(row_line[first]) + 2}"))
    if duplicates:
        keep = np.ones(q.shape[0], dtype=bool)
        keep[list(duplicates)] = False
        q, row_line, by_person = q[keep], row_line[keep], by_person[keep]
        if holders:
            names = names[keep]
    bad.sort()
    report.errors = [LineError(line, reason) for line, _, _, reason in bad]
    report.count("failed: bad line", len(bad))
    # reason texts of the well-formed lines: 0 success, 1 name mismatch, then per engine code
    reasons = ["success,", "failed," + _csv_field(NAME_MISMATCH)]
    reason_index = np.zeros(q.shape[0], dtype=np.uint8)
    name_bad = (holders.mismatched(q["pan_hash"], q["person_hash"], by_person, names)
                if holders is not None and q.shape[0] else np.zeros(q.shape[0], dtype=bool))
    reason_index[name_bad] = 1
    report.count(f"failed: {NAME_MISMATCH}", int(name_bad.sum()))
    amounts = np.ascontiguousarray(q["amount_fen"])
    to_engine = np.flatnonzero(~name_bad)
    ticket = None
    if to_engine.size:
        # the 回盘 is built while the last batches commit; it is returned once they are durable
        results, ticket = _apply_journaled(node, q[to_engine] if name_bad.any() else q, business_date, wait=False)
        codes = results["code"]
        duplicate = (results["outcome_flags"] & ResFlag.DUPLICATE) != 0
        ok = codes == rc("00")
        report.count("credited", int((ok & ~duplicate).sum()))
        report.count("credited_fen", int(amounts[to_engine][ok & ~duplicate].sum()))
        report.count("already credited (same batch and line)", int((ok & duplicate).sum()))
        for code in np.unique(codes).tolist():
            if code == rc("00"):
                continue
            text_code = rc_str(code)
            why = REASONS.get(text_code, text_code) if text_code != "94" else "same (batch, line) with other content"
            hit = codes == code
            report.count(f"failed: {why}", int(hit.sum()))
            reasons.append("failed," + _csv_field(why))
            reason_index[to_engine[hit]] = len(reasons) - 1
    for key in [k for k, v in report.counts.items() if v == 0]:
        del report.counts[key]
    head = io.StringIO()
    w = csv.writer(head)
    w.writerow(("batch_no", "line", "amount_fen", "result", "reason"))
    w.writerows((batch, line, "", "failed", reason) for _, batch, line, reason in bad)
    report.result_csv = head.getvalue().encode("utf-8") + _cardfiles.result_lines(
        text, starts, row_line, amounts, reason_index, [r.encode("utf-8") for r in reasons])
    if ticket is not None:
        node.wait_durable(ticket)                 # nothing of the answer leaves before this
    return report


def _csv_field(text: str) -> str:
    """One field as Python's csv module writes it (quoted when it holds a comma or a quote)."""
    out = io.StringIO()
    csv.writer(out).writerow((text,))
    return out.getvalue()[:-2]


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


def write_result_file(path: str, report: FileReport):
    """回盘: batch_no, line, amount_fen, result, reason (CSV, UTF-8, \r\n), written in one go."""
    with open(path, "wb") as f:
        f.write(report.result_csv)
