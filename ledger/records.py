"""The journal record: one fixed-size, versioned row per applied command, read in bulk as a
numpy structured array (no per-record Python).

A record is the request as the engine saw it, made safe for storage, plus the engine's result:
enough to replay it through the same apply (DESIGN.md §6.8) and to reconcile it. It never holds
a PIN block, track data or a full PAN: the card is its keyed hash (`request.pan_hash`) and its
last four digits (`request.pan_last4`); the PIN's verification value is dropped and only the
live outcome of the PIN check is kept (REQ_PIN_REPLAY_OK / _BAD), so replay needs no PIN.
"""
import numpy as np

from yikatong.engine import REQUEST_DTYPE, RESULT_DTYPE, ReqFlag

from . import _records

RECORD_LAYOUT_VERSION = 1

# record_kind: what produced the row
KIND_COMMAND = 1        # a request applied by the engine (terminal, admin, file)
KIND_CUTOVER = 2        # 日切: the business date changes after this record (issue 7)
KIND_CAPACITY = 3       # the card columns grew to request.amount_fen cards (Node.reserve_cards); replay grows them there

RECORD_DTYPE = np.dtype([
    ("seq", "<u8"),                  # journal sequence, contiguous from 1
    ("layout_version", "<u2"),       # RECORD_LAYOUT_VERSION
    ("record_kind", "<u2"),          # KIND_*
    ("business_date", "<u4"),        # YYYYMMDD, assigned at commit
    ("request", REQUEST_DTYPE),
    ("result", RESULT_DTYPE),
])
assert RECORD_DTYPE.itemsize == 304 == _records.record_size_bytes(), RECORD_DTYPE.itemsize


# The same 304 bytes seen as three opaque parts: copying a request or a result into a record is
# then one fixed-size memcpy per row, not a field-by-field structured copy (≈ 8× faster).
_RECORD_PARTS = np.dtype({"names": ["head", "request", "result"],
                          "formats": ["V16", f"V{REQUEST_DTYPE.itemsize}", f"V{RESULT_DTYPE.itemsize}"],
                          "offsets": [0, RECORD_DTYPE.fields["request"][1], RECORD_DTYPE.fields["result"][1]],
                          "itemsize": RECORD_DTYPE.itemsize})
_RECORD_HEAD = np.dtype([(name, RECORD_DTYPE.fields[name][0]) for name in RECORD_DTYPE.names[:4]])
assert _RECORD_HEAD.itemsize == 16 and RECORD_DTYPE.fields["request"][1] == 16 and RECORD_DTYPE.fields["result"][1] == 16 + REQUEST_DTYPE.itemsize


def records_from_batch(requests: np.ndarray, results: np.ndarray, first_seq: int,
                       business_date: int, out: np.ndarray | None = None) -> np.ndarray:
    """Journal records for one applied batch, in one `nogil` pass (ledger/_records.pyx): head,
    request and result copied in, the request sanitised as `sanitize_requests` does. The caller
    owns `out` if given (at least as many rows; it may be the writer's shared ring)."""
    n = requests.shape[0]
    records = out[:n] if out is not None else np.empty(n, dtype=RECORD_DTYPE)
    assert records.dtype == RECORD_DTYPE and results.shape[0] >= n
    _records.build_records(np.ascontiguousarray(requests), np.ascontiguousarray(results[:n]), first_seq,
                           business_date, RECORD_LAYOUT_VERSION, KIND_COMMAND, records)
    return records


def records_from_batch_numpy(requests: np.ndarray, results: np.ndarray, first_seq: int,
                             business_date: int) -> np.ndarray:
    """The same records with numpy only: the reference the C pass is tested against
    (tests/unit/test_ledger_records.py). One fixed-size copy per part, then the sanitising."""
    n = requests.shape[0]
    records = np.empty(n, dtype=RECORD_DTYPE)
    head = np.empty(n, dtype=_RECORD_HEAD)           # built contiguous, then copied in one go
    head["seq"] = np.arange(first_seq, first_seq + n, dtype=np.uint64)
    head["layout_version"] = RECORD_LAYOUT_VERSION
    head["record_kind"] = KIND_COMMAND
    head["business_date"] = business_date
    parts = records.view(_RECORD_PARTS)
    parts["head"] = head.view("V16")
    parts["request"] = np.ascontiguousarray(requests).view(f"V{REQUEST_DTYPE.itemsize}")
    parts["result"] = np.ascontiguousarray(results[:n]).view(f"V{RESULT_DTYPE.itemsize}")
    sanitize_requests(records["request"], records["result"])
    return records


def sanitize_requests(requests: np.ndarray, results: np.ndarray) -> None:
    """In place: drop the PIN verification value, keep the PIN check's outcome for replay."""
    given = (requests["flags"] & ReqFlag.PIN) != 0
    if given.any():                                   # (file jobs and lifecycle commands: never)
        outcome = results["pin_outcome"]
        flags = requests["flags"] & np.uint8(~ReqFlag.PIN & 0xFF)
        flags = np.where(given & (outcome == 1), flags | ReqFlag.PIN_REPLAY_OK, flags)
        # Given but not found right: wrong (2), or not compared (0) because the message stopped
        # before the PIN step or the PIN was locked. Replay reaches the PIN step in exactly the
        # same cases, and there a locked PIN answers 75 without counting, so "wrong" replays exactly.
        flags = np.where(given & (outcome != 1), flags | ReqFlag.PIN_REPLAY_BAD, flags)
        requests["flags"] = flags
    # ISSUE (32) and REPLACE (38) carry the new card's bank PVV: that is state, not a PIN attempt
    cmd = requests["cmd"]
    drop = (requests["pin_pvv"] != 0) & (cmd != 32) & (cmd != 38)
    if drop.any():
        requests["pin_pvv"] = np.where(drop, 0, requests["pin_pvv"])


def marker_record(seq: int, kind: int, business_date: int, capacity: int = 0) -> np.ndarray:
    """A journal record that is not a command: a cutover (KIND_CUTOVER, at the new business date)
    or a capacity change (KIND_CAPACITY, the new capacity in request.amount_fen)."""
    record = np.zeros(1, dtype=RECORD_DTYPE)
    record["seq"] = seq
    record["layout_version"] = RECORD_LAYOUT_VERSION
    record["record_kind"] = kind
    record["business_date"] = business_date
    record["request"]["amount_fen"] = capacity
    return record


def journaled_capacity(records: np.ndarray) -> int:
    """The capacity a KIND_CAPACITY batch grew the card columns to."""
    return int(records["request"]["amount_fen"].max())
