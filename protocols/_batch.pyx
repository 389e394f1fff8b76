# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The server's per-batch bookkeeping, one pass over the rows each (protocols/server.py
`Server._process`): what a decoded batch holds (engine rows, management messages, invalid and
unanswerable frames), the open terminal batches' totals for 0500, and the metrics' message
counts by (command, response code).

Why C: in Python this was some 25 numpy calls per batch (field views of structured arrays,
masks, np.add.at, np.unique), ≈ 0.5 µs per message at the few-hundred-message batches of
open-loop traffic (measured with a thread-CPU timer around each stage, batches of 256:
totals 0.39, metrics 0.09 µs per message) — paid on the serving core for every batch. The
vectorised numpy version stays the reference and the recovery path
(`Terminals.count_batch`); tests/unit/test_server_batch.py checks that both agree.
"""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t
cimport numpy as cnp
import numpy as np

from yikatong.engine._core cimport Request, Result, RC_00, RC_10, RES_DUPLICATE, RES_TOMBSTONE, CMD_REVERSAL
from yikatong.protocols._codec cimport Wire, WK_ENGINE, WK_INVALID, WK_SIGNON, WF_NO_REPLY

cnp.import_array()

# Response codes are two characters of 0-9 / A-Z (docs/result-codes.md): 36 × 36 slots per
# command. A code outside that alphabet is not counted here (count_batch returns how many) and
# the caller counts those rows its slow way.
cdef enum:
    CODE_SLOTS_C = 36 * 36
    COMMAND_SLOTS_C = 64     # Request.cmd is below 64 (layouts.Cmd, CMD_MAX = 63)
CODE_SLOTS = CODE_SLOTS_C
COMMAND_SLOTS = COMMAND_SLOTS_C


cdef inline int code_char(uint16_t c) noexcept nogil:
    if 48 <= c <= 57:
        return c - 48
    if 65 <= c <= 90:
        return c - 55
    return -1


cdef inline int code_slot(uint16_t code) noexcept nogil:
    """'00' → 0 … 'ZZ' → 1295; -1 for anything else (0, no code, included)."""
    cdef int a = code_char(code & 0xFF), b = code_char(code >> 8)
    if a < 0 or b < 0:
        return -1
    return a * 36 + b


def code_of_slot(int slot) -> str:
    """The two characters of a message-count slot (the inverse of code_slot)."""
    chars = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return chars[slot // 36] + chars[slot % 36]


cdef inline void _check(cnp.ndarray a, str name, Py_ssize_t itemsize, Py_ssize_t rows) except *:
    if a.ndim != 1 or not a.flags.c_contiguous or a.dtype.itemsize != itemsize or a.shape[0] < rows:
        raise TypeError(f"{name}: expecting a C-contiguous row array of {itemsize}-byte rows, at least "
                        f"{rows} rows; found {a.dtype.itemsize}-byte rows, shape {(<object>a).shape}")


cdef inline int64_t* _int64s(cnp.ndarray a, str name, Py_ssize_t count) except NULL:
    if a.dtype != np.int64 or not a.flags.c_contiguous or not a.flags.writeable or a.size != count:
        raise TypeError(f"{name}: expecting a writeable C-contiguous int64 array of {count} values, "
                        f"found {a.dtype} {(<object>a).shape}")
    return <int64_t*>cnp.PyArray_DATA(a)


def summarize(cnp.ndarray wires not None, Py_ssize_t count):
    """(engine rows, management rows, invalid rows, unanswerable rows) of rows 0..count-1 of a
    decoded batch: what `_process` needs to know before it looks at any row in Python."""
    _check(wires, "wires", sizeof(Wire), count)
    cdef const Wire* w = <const Wire*>cnp.PyArray_DATA(wires)
    cdef Py_ssize_t i, engine = 0, managed = 0, invalid = 0, unanswerable = 0
    with nogil:
        for i in range(count):
            if w[i].kind == WK_ENGINE:
                engine += 1
            elif w[i].kind >= WK_SIGNON:
                managed += 1
            elif w[i].kind == WK_INVALID:
                invalid += 1
                if w[i].flags & WF_NO_REPLY:
                    unanswerable += 1
    return engine, managed, invalid, unanswerable


cdef class BatchCounters:
    """The totals and counts one batch adds, written straight into the server's arrays:

    * the open terminal batches' totals for 0500 (`Terminals`: debit/credit amount and count per
      terminal, for rows of the terminal's current batch number), approved (00 or 10) first-time
      effects only; a reversal takes out what its original (by its 60.1) put in, unless it
      reversed an unknown original (tombstone);
    * `message_counts[cmd, slot]`: messages answered by command and response code.

    The sign tables come from the caller (server.py's DEBIT_SIGN / CREDIT_SIGN and
    REVERSED_BY_60_1) so that the rules live in one place."""
    cdef object _keep                     # the arrays below stay alive while this object does
    cdef int64_t* debit_sign
    cdef int64_t* credit_sign
    cdef int64_t* reversed_by_60_1
    cdef int64_t* batch_no
    cdef int64_t* debit_fen
    cdef int64_t* debit_count
    cdef int64_t* credit_fen
    cdef int64_t* credit_count
    cdef int64_t* message_counts
    cdef readonly Py_ssize_t terminal_count

    def __init__(self, debit_sign, credit_sign, reversed_by_60_1, batch_no, debit_fen, debit_count,
                 credit_fen, credit_count, message_counts):
        self._keep = (debit_sign, credit_sign, reversed_by_60_1, batch_no, debit_fen, debit_count,
                      credit_fen, credit_count, message_counts)
        self.terminal_count = len(batch_no)
        self.debit_sign = _int64s(debit_sign, "debit_sign", COMMAND_SLOTS)
        self.credit_sign = _int64s(credit_sign, "credit_sign", COMMAND_SLOTS)
        self.reversed_by_60_1 = _int64s(reversed_by_60_1, "reversed_by_60_1", 256)
        for name, a in (("batch_no", batch_no), ("debit_fen", debit_fen), ("debit_count", debit_count),
                        ("credit_fen", credit_fen), ("credit_count", credit_count)):
            _int64s(a, name, self.terminal_count)
        self.batch_no = <int64_t*>cnp.PyArray_DATA(batch_no)
        self.debit_fen = <int64_t*>cnp.PyArray_DATA(debit_fen)
        self.debit_count = <int64_t*>cnp.PyArray_DATA(debit_count)
        self.credit_fen = <int64_t*>cnp.PyArray_DATA(credit_fen)
        self.credit_count = <int64_t*>cnp.PyArray_DATA(credit_count)
        self.message_counts = _int64s(message_counts, "message_counts", COMMAND_SLOTS * CODE_SLOTS)
        cdef Py_ssize_t c
        for c in range(256):
            if not 0 <= self.reversed_by_60_1[c] < COMMAND_SLOTS:
                raise ValueError(f"reversed_by_60_1[{c}] = {self.reversed_by_60_1[c]}, expecting a command")

    def count(self, cnp.ndarray requests not None, cnp.ndarray results not None, cnp.ndarray wires not None,
              Py_ssize_t count):
        """Add the engine rows (kind WK_ENGINE) of rows 0..count-1; `results` row i answers
        `requests` row i. Returns how many rows had a response code outside 0-9 / A-Z (not in
        message_counts: the caller counts them)."""
        _check(requests, "requests", sizeof(Request), count)
        _check(results, "results", sizeof(Result), count)
        _check(wires, "wires", sizeof(Wire), count)
        cdef const Request* q = <const Request*>cnp.PyArray_DATA(requests)
        cdef const Result* r = <const Result*>cnp.PyArray_DATA(results)
        cdef const Wire* w = <const Wire*>cnp.PyArray_DATA(wires)
        cdef Py_ssize_t i, uncounted = 0
        cdef int32_t t
        cdef int64_t sign, d, c
        cdef int slot
        cdef uint8_t cmd
        with nogil:
            for i in range(count):
                if w[i].kind != WK_ENGINE:
                    continue
                cmd = q[i].cmd
                slot = code_slot(r[i].code)
                if slot < 0 or cmd >= COMMAND_SLOTS_C:
                    uncounted += 1
                else:
                    self.message_counts[<Py_ssize_t>cmd * CODE_SLOTS_C + slot] += 1
                # the open batch's totals: approved, first-time, this terminal's current batch
                if r[i].code != RC_00 and r[i].code != RC_10:
                    continue
                if r[i].outcome_flags & RES_DUPLICATE:
                    continue
                t = q[i].terminal_index
                if t < 0 or t >= self.terminal_count or q[i].batch_no != self.batch_no[t]:
                    continue
                sign = 1
                if cmd == CMD_REVERSAL:
                    if r[i].outcome_flags & RES_TOMBSTONE:
                        continue               # an unknown original: nothing was in the totals
                    cmd = <uint8_t>self.reversed_by_60_1[w[i].f60_1]
                    sign = -1
                if cmd >= COMMAND_SLOTS_C:
                    continue
                d = self.debit_sign[cmd] * sign
                c = self.credit_sign[cmd] * sign
                if d:
                    self.debit_fen[t] += d * q[i].amount_fen
                    self.debit_count[t] += d
                if c:
                    self.credit_fen[t] += c * q[i].amount_fen
                    self.credit_count[t] += c
        return uncounted


def reply_runs(cnp.ndarray wires not None, list runs not None) -> list:
    """[(connection, first byte, end byte, frames)] per (connection, frames) run of the batch:
    the encoder packs the replies in row order (`reply_len` bytes each, 0 for none), so a run's
    replies are one slice of the output buffer, written with one write()."""
    cdef Py_ssize_t rows = 0, k
    for run in runs:
        rows += <Py_ssize_t>run[1]
    _check(wires, "wires", sizeof(Wire), rows)
    cdef const Wire* w = <const Wire*>cnp.PyArray_DATA(wires)
    cdef Py_ssize_t row = 0, start, at = 0, end
    out = []
    for conn, frames in runs:
        k = frames
        start = at
        end = row + k
        while row < end:
            at += w[row].reply_len
            row += 1
        out.append((conn, start, at, k))
    return out
