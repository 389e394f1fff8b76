# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""ISO 8583 codec for the CUPS POS dialect of PROTOCOL.md §2–3, in C.

Two layers:

* `parse_fields` — table-driven: the field spec (FIELD_SPEC below, one table, data) locates
  every field of a frame body and validates it strictly (BCD nibbles, pad nibbles, declared
  lengths, character sets, nothing after the last field). Strict, so that anything it accepts
  re-encodes to the same bytes (the fuzz tests hold it to that).
* `fill_request` / `encode_reply` — the semantic layer: a frame straight into one row of the
  engine's request array plus its `Wire` row, and a result row straight into a reply frame in a
  reused output buffer. The batch forms run the whole batch in one `nogil` loop.

Errors are data, not exceptions, in the batch path: a bad frame gets its `Wire` row's err_*
fields and pre_code 30 (or 12 for an unknown message), and the batch goes on. The one-frame
Python API raises `DecodeError` from the same fields. Neither ever carries card data: for the
PAN, track 2, PIN block and the transfer PAN the found value is withheld.
"""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset, memcmp
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_Check
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
cimport numpy as cnp
import numpy as np

from yikatong.engine._core cimport (
    Request, Result, siphash24, mix64, reversible,
    CMD_BALANCE, CMD_PURCHASE, CMD_VOID, CMD_REFUND, CMD_MED_SETTLE, CMD_MED_CANCEL,
    CMD_MED_PRESETTLE, CMD_DEPOSIT, CMD_WITHDRAW, CMD_TRANSFER, CMD_REVERSAL,
    RC_00, RC_10, RC_12, RC_30, REQ_AU, REQ_PA, REQ_FP, REQ_PIN)

cnp.import_array()

# ---------------------------------------------------------------------------------------------
# The field spec: PROTOCOL.md §2 as data. (format, length prefix digits (0 fixed, 2 LL, 3 LLL),
# length: fixed length or maximum, in digits for n/z and bytes otherwise)
# ---------------------------------------------------------------------------------------------
FIELD_SPEC = {
    2: ("n", 2, 19), 3: ("n", 0, 6), 4: ("n", 0, 12), 11: ("n", 0, 6), 12: ("n", 0, 6),
    13: ("n", 0, 4), 14: ("n", 0, 4), 15: ("n", 0, 4), 22: ("n-left", 0, 3), 25: ("n", 0, 2),
    32: ("n", 2, 11), 35: ("z", 2, 37), 37: ("an", 0, 12), 38: ("an", 0, 6), 39: ("an", 0, 2),
    41: ("ans", 0, 8), 42: ("ans", 0, 15), 48: ("n", 3, 322), 49: ("an", 0, 3), 52: ("b", 0, 8),
    53: ("n", 0, 16), 54: ("an", 3, 120), 60: ("n", 3, 17), 61: ("n", 3, 29), 62: ("b", 3, 512),
    63: ("ans", 3, 163), 64: ("b", 0, 8),
}
# Fields whose content is card data: an error never shows what was found in them.
CARD_DATA_FIELDS = frozenset((2, 35, 48, 52))
REPLY_BYTES_MAX = 512             # the longest reply this encoder writes, length prefix included
cdef enum:
    FRAME_BODY_MIN = 21           # TPDU + header + MTI + bitmap

cdef enum:
    FK_NONE = 0
    FK_N = 1          # numeric, fixed length, right-aligned (leading pad nibble when odd)
    FK_NLEFT = 2      # numeric, fixed length, left-aligned (trailing pad nibble): field 22
    FK_NVAR = 3       # numeric, LL/LLL digits, left-aligned (trailing pad nibble when odd)
    FK_Z = 4          # track 2: digits and separator D, LL digits, left-aligned
    FK_AN = 5         # alphanumeric (and space)
    FK_ANS = 6        # printable ASCII
    FK_B = 7          # binary

ctypedef struct FieldSpec:
    uint8_t kind
    uint8_t prefix_bytes      # 0 fixed, 1 LL, 2 LLL
    uint16_t units            # fixed length or maximum (digits for n/z, bytes otherwise)

cdef FieldSpec SPEC[65]
cdef int COMMON_FIELDS[4]
COMMON_FIELDS[:] = [11, 41, 42, 60]            # every message (PROTOCOL.md §3)
cdef int CARD_FIELDS[5]
CARD_FIELDS[:] = [12, 13, 22, 25, 49]          # every card transaction but a reversal
cdef int REQUIRED_TAGS[5]
REQUIRED_TAGS[:] = [0x4D54, 0x464F, 0x4F4C, 0x5053, 0x4953]   # MT FO OL PS IS
cdef bint CARD_DATA[65]


cdef void _load_spec():
    memset(SPEC, 0, sizeof(SPEC))
    memset(CARD_DATA, 0, sizeof(CARD_DATA))
    kinds = {"n": FK_N, "n-left": FK_NLEFT, "z": FK_Z, "an": FK_AN, "ans": FK_ANS, "b": FK_B}
    for number, (fmt, prefix, units) in FIELD_SPEC.items():
        kind = kinds[fmt]
        if kind == FK_N and prefix:
            kind = FK_NVAR
        SPEC[number].kind = kind
        SPEC[number].prefix_bytes = {0: 0, 2: 1, 3: 2}[prefix]
        SPEC[number].units = units
    for number in CARD_DATA_FIELDS:
        CARD_DATA[number] = True


_load_spec()

ERR_TEXT = {
    ERR_SHORT: "the frame ends inside the field",
    ERR_TPDU: "TPDU id 0x60",
    ERR_HEADER: "header application type 60",
    ERR_BCD: "a BCD digit 0-9",
    ERR_PAD: "pad nibble 0",
    ERR_LENGTH: "a length within the field's maximum",
    ERR_SECONDARY: "no secondary bitmap (bit 1 clear)",
    ERR_UNKNOWN_FIELD: "only fields of PROTOCOL.md §2",
    ERR_TRAILING: "nothing after the last field",
    ERR_CHARSET: "a character of the field's set",
    ERR_MISSING: "the field, required for this message",
    ERR_VALUE: "a value the field allows",
    ERR_TLV: "tag (2 letters), length (3 digits), value within field 62",
    ERR_TLV_TAG: "a known field 62 tag, once",
    ERR_ROUTE: "a message of PROTOCOL.md §3 (MTI + 3 + 60.1 + 60.3)",
    ERR_TRACK2: "track 2: PAN of 13-19 digits, then separator D",
}


class DecodeError(ValueError):
    """A frame that does not decode: where (field, byte offset in the frame body), what was found
    and what was expected. Never holds card data: for the PAN, track 2, PIN block and field 48,
    `found` is None."""

    def __init__(self, field: int, offset: int, what: int, found):
        self.field, self.offset, self.what, self.found = field, offset, what, found
        self.expected = ERR_TEXT.get(what, "?")
        where = f"field {field}" if field else "frame header"
        shown = "withheld (card data)" if found is None else str(found)
        super().__init__(f"{where} at byte {offset}: found {shown}, expecting {self.expected}")

    def __reduce__(self):
        # rebuild from the constructor's arguments, not from args (the message): without this,
        # pickle.loads and copy.copy of a DecodeError raised TypeError (fix)
        return (type(self), (self.field, self.offset, self.what, self.found))


cdef inline int nib(const uint8_t* b, Py_ssize_t i) noexcept nogil:
    """Nibble i of a byte string (0 = high nibble of b[0])."""
    return (b[i >> 1] >> 4) if (i & 1) == 0 else (b[i >> 1] & 0x0F)


cdef inline void set_err(Wire* w, int field, Py_ssize_t offset, int what, int32_t found) noexcept nogil:
    if w.err_what == ERR_NONE:
        w.err_field = <uint16_t>field
        w.err_offset = <uint32_t>offset
        w.err_what = <uint16_t>what
        w.err_found = -1 if CARD_DATA[field] and field != 0 else found


cdef inline bint is_an(uint8_t c) noexcept nogil:
    return (48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122) or c == 32


cdef int parse_fields(const uint8_t* b, Py_ssize_t n, Loc* loc, Wire* w) noexcept nogil:
    """Locate and validate every field of a frame body (TPDU onward). 0, or -1 with w.err_*."""
    cdef Py_ssize_t pos, end, i, units, nbytes, nib_end
    cdef int f, k, d, first
    cdef uint64_t bitmap
    cdef FieldSpec* sp
    if n < FRAME_BODY_MIN:
        set_err(w, 0, n, ERR_SHORT, <int32_t>n)
        return -1
    if b[0] != 0x60:
        set_err(w, 0, 0, ERR_TPDU, b[0])
        return -1
    if b[5] != 0x60:
        set_err(w, 0, 5, ERR_HEADER, b[5])
        return -1
    for i in range(4):
        d = nib(b + 11, i)
        if d > 9:
            set_err(w, 0, 11 + i // 2, ERR_BCD, d)
            return -1
    bitmap = 0
    for i in range(8):
        bitmap = (bitmap << 8) | b[13 + i]
    if bitmap >> 63:
        set_err(w, 0, 13, ERR_SECONDARY, 1)
        return -1
    pos = 21
    w.present = 0
    for f in range(2, 65):
        if not (bitmap >> (64 - f)) & 1:
            continue
        sp = &SPEC[f]
        if sp.kind == FK_NONE:
            set_err(w, f, 13 + (f - 1) // 8, ERR_UNKNOWN_FIELD, f)
            return -1
        if sp.prefix_bytes:
            if pos + sp.prefix_bytes > n:
                set_err(w, f, pos, ERR_SHORT, <int32_t>(n - pos))
                return -1
            units = 0
            for i in range(sp.prefix_bytes * 2):
                d = nib(b + pos, i)
                if d > 9:
                    set_err(w, f, pos + i // 2, ERR_BCD, d)
                    return -1
                units = units * 10 + d
            if units > sp.units:
                w.err_found = 0
                set_err(w, f, pos, ERR_LENGTH, <int32_t>units)
                w.err_found = <int32_t>units        # a length is never card data
                return -1
            pos += sp.prefix_bytes
        else:
            units = sp.units
        if sp.kind <= FK_Z:
            nbytes = (units + 1) >> 1
        else:
            nbytes = units
        if pos + nbytes > n:
            set_err(w, f, pos, ERR_SHORT, <int32_t>(n - pos))
            return -1
        loc[f].off = <uint16_t>pos
        loc[f].nbytes = <uint16_t>nbytes
        loc[f].units = <uint16_t>units
        loc[f].nib0 = 0
        if sp.kind <= FK_Z:
            first = 0
            nib_end = nbytes * 2
            if units & 1:
                if sp.kind == FK_N:          # right-aligned: the pad is the first nibble
                    if nib(b + pos, 0) != 0:
                        set_err(w, f, pos, ERR_PAD, nib(b + pos, 0))
                        return -1
                    first = 1
                    loc[f].nib0 = 1
                else:                        # left-aligned: the pad is the last nibble
                    if nib(b + pos, nib_end - 1) != 0:
                        set_err(w, f, pos + nbytes - 1, ERR_PAD, nib(b + pos, nib_end - 1))
                        return -1
                    nib_end -= 1
            # A byte at a time (the pads, already checked, are 0 and pass); only a frame with a
            # bad digit walks the nibbles, to name the first one exactly.
            if not bcd_bytes_ok(b + pos, nbytes, sp.kind == FK_Z):
                for i in range(first, nib_end):
                    d = nib(b + pos, i)
                    if d > 9 and not (sp.kind == FK_Z and d == 0xD):
                        set_err(w, f, pos + i // 2, ERR_BCD, d)
                        return -1
        elif sp.kind == FK_AN:
            for i in range(nbytes):
                if not is_an(b[pos + i]):
                    set_err(w, f, pos + i, ERR_CHARSET, b[pos + i])
                    return -1
        elif sp.kind == FK_ANS:
            for i in range(nbytes):
                if b[pos + i] < 0x20 or b[pos + i] > 0x7E:
                    set_err(w, f, pos + i, ERR_CHARSET, b[pos + i])
                    return -1
        w.present |= (<uint64_t>1) << (f - 1)
        pos += nbytes
    if pos != n:
        set_err(w, 0, pos, ERR_TRAILING, <int32_t>(n - pos))
        return -1
    return 0


cdef inline bint has(const Wire* w, int f) noexcept nogil:
    return (w.present >> (f - 1)) & 1


cdef inline bint bcd_bytes_ok(const uint8_t* b, Py_ssize_t nbytes, bint z) noexcept nogil:
    cdef const uint8_t* table = BCDZ_OK if z else BCD_OK
    cdef Py_ssize_t i
    cdef uint8_t ok = 1
    for i in range(nbytes):
        ok &= table[b[i]]                 # no branch per byte
    return ok


cdef inline uint64_t digits_value(const uint8_t* b, const Loc* l, int first, int count) noexcept nogil:
    """The number written by digits [first, first + count) of a numeric field (validated by
    parse_fields): two digits per byte when they start on a byte boundary."""
    cdef uint64_t v = 0
    cdef int i, start = l.nib0 + first
    if (start & 1) == 0:
        for i in range(count >> 1):
            v = v * 100 + BCD2BIN[b[l.off + (start >> 1) + i]]
        if count & 1:
            v = v * 10 + <uint64_t>nib(b + l.off, start + count - 1)
        return v
    for i in range(first, first + count):
        v = v * 10 + <uint64_t>nib(b + l.off, l.nib0 + i)
    return v


cdef inline uint64_t ascii_value(const uint8_t* p, int count, bint* ok) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(count):
        if p[i] < 48 or p[i] > 57:
            ok[0] = False
            return 0
        v = v * 10 + (p[i] - 48)
    return v


# ---------------------------------------------------------------------------------------------
# Registries: terminal id (8 bytes) and institution code (15 bytes) → index, open addressing
# ---------------------------------------------------------------------------------------------
cdef inline uint64_t load8(const uint8_t* p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return v


# Keys of the duplicate key and the content hash. Not secret: they only have to stay the same across restarts,
# because the idempotency index is rebuilt from the journal by replay.
cdef uint64_t IDEM_K0 = 0x79696b61746f6e67ULL   # "yikatong"
cdef uint64_t IDEM_K1 = 0x6964656d2d6b6579ULL   # "idem-key"
cdef uint64_t CONTENT_K0 = 0x79696b61746f6e67ULL
cdef uint64_t CONTENT_K1 = 0x636f6e74656e7431ULL   # "content1"

cdef extern from *:
    """
    /* 64x64 -> 128-bit multiply, folded: the mixing step of wyhash-style hashes */
    static inline uint64_t yk_mum(uint64_t a, uint64_t b) {
        unsigned __int128 r = (unsigned __int128)a * b;
        return (uint64_t)r ^ (uint64_t)(r >> 64);
    }
    /* A fast 64-bit hash of `nwords` 8-byte words (the decoded Request row): one 128-bit multiply
       per 16 bytes, chained. Not cryptographic, and need not be: it only tells a repeat from a
       different message under the same duplicate key (94), and a collision found on purpose
       would only turn a 94 into the stored answer of the first message (no money moves). */
    static inline uint64_t yk_content_hash(const uint8_t* p, size_t nwords, uint64_t k0, uint64_t k1) {
        uint64_t h = k0 ^ ((uint64_t)nwords * 0x9E3779B97F4A7C15ULL), a, b;
        size_t i = 0;
        for (; i + 1 < nwords; i += 2) {
            memcpy(&a, p + 8 * i, 8);
            memcpy(&b, p + 8 * i + 8, 8);
            h = yk_mum(a ^ h ^ 0xa0761d6478bd642fULL, b ^ k1 ^ 0xe7037ed1a0b428dbULL);
        }
        if (i < nwords) {
            memcpy(&a, p + 8 * i, 8);
            h = yk_mum(a ^ h ^ 0xa0761d6478bd642fULL, k1 ^ 0x8ebc6af09c88c6e3ULL);
        }
        return yk_mum(h ^ 0x589965cc75374cc3ULL, h ^ k0 ^ 0x1d8e4e27c47d124fULL);
    }
    """
    uint64_t content_hash64 "yk_content_hash" (const uint8_t* p, size_t nwords, uint64_t k0, uint64_t k1) noexcept nogil


cdef class Codec:
    """One node's codec: its registries (terminals, institutions), its PAN hashing key and the
    engine's institution id for field 32.

    `decode_batch(frames, requests, wires)` and `encode_replies(...)` are the per-batch entry
    points; `decode(frame)` is the one-frame form for tests and tools."""
    cdef uint64_t* term_keys
    cdef int32_t* term_vals
    cdef uint64_t term_mask
    cdef uint64_t* inst_keys
    cdef int32_t* inst_vals
    cdef uint64_t inst_mask
    cdef object _arrays                   # owns the registry memory
    cdef uint8_t* inst_codes
    cdef uint64_t pan_k0, pan_k1
    cdef uint8_t inst_id[11]
    cdef int inst_id_len
    cdef readonly int terminal_count, institution_count

    def __init__(self, terminal_ids, institution_codes, bytes pan_key not None, str engine_institution_id not None):
        if len(pan_key) != 16:
            raise ValueError(f"pan_key: {len(pan_key)} bytes, expecting 16")
        if not (1 <= len(engine_institution_id) <= 11 and engine_institution_id.isdigit()):
            raise ValueError("engine institution id: 1..11 digits (field 32)")
        self.pan_k0 = int.from_bytes(pan_key[:8], "little")
        self.pan_k1 = int.from_bytes(pan_key[8:], "little")
        self.inst_id_len = len(engine_institution_id)
        for i, c in enumerate(engine_institution_id.encode("ascii")):
            self.inst_id[i] = c
        self.terminal_count = len(terminal_ids)
        self.institution_count = len(institution_codes)
        tsize = 16
        while tsize < 2 * self.terminal_count:
            tsize *= 2
        isize = 16
        while isize < 2 * self.institution_count:
            isize *= 2
        tk = np.zeros(tsize, np.uint64)
        tv = np.full(tsize, -1, np.int32)
        ik = np.zeros(isize, np.uint64)
        iv = np.full(isize, -1, np.int32)
        codes = np.zeros((max(1, self.institution_count), 15), np.uint8)
        self._arrays = (tk, tv, ik, iv, codes)
        self.term_keys = <uint64_t*>cnp.PyArray_DATA(tk)
        self.term_vals = <int32_t*>cnp.PyArray_DATA(tv)
        self.term_mask = tsize - 1
        self.inst_keys = <uint64_t*>cnp.PyArray_DATA(ik)
        self.inst_vals = <int32_t*>cnp.PyArray_DATA(iv)
        self.inst_mask = isize - 1
        self.inst_codes = <uint8_t*>cnp.PyArray_DATA(codes)
        cdef bytes raw
        cdef uint64_t key, h
        for index, tid in enumerate(terminal_ids):
            raw = tid.encode("ascii")
            if len(raw) != 8:
                raise ValueError(f"terminal id #{index}: {len(raw)} characters, expecting 8")
            key = load8(<const uint8_t*>PyBytes_AS_STRING(raw))
            if self._term_find(key) >= 0:
                raise ValueError(f"terminal id #{index} registered twice")
            h = mix64(key) & self.term_mask
            while self.term_vals[h] >= 0:
                h = (h + 1) & self.term_mask
            self.term_keys[h] = key
            self.term_vals[h] = index
        for index, code in enumerate(institution_codes):
            raw = code.encode("ascii")
            if len(raw) != 15:
                raise ValueError(f"institution code #{index}: {len(raw)} characters, expecting 15")
            codes[index] = np.frombuffer(raw, np.uint8)
            if self._inst_find(<const uint8_t*>PyBytes_AS_STRING(raw)) >= 0:
                raise ValueError(f"institution code #{index} registered twice")
            key = siphash24(IDEM_K0, IDEM_K1, <const uint8_t*>PyBytes_AS_STRING(raw), 15)
            h = key & self.inst_mask
            while self.inst_vals[h] >= 0:
                h = (h + 1) & self.inst_mask
            self.inst_keys[h] = key
            self.inst_vals[h] = index

    cdef inline int32_t _term_find(self, uint64_t key) noexcept nogil:
        cdef uint64_t h = mix64(key) & self.term_mask
        while self.term_vals[h] >= 0:
            if self.term_keys[h] == key:
                return self.term_vals[h]
            h = (h + 1) & self.term_mask
        return -1

    cdef inline int32_t _inst_find(self, const uint8_t* code15) noexcept nogil:
        cdef uint64_t key = siphash24(IDEM_K0, IDEM_K1, code15, 15)
        cdef uint64_t h = key & self.inst_mask
        cdef int32_t v
        while self.inst_vals[h] >= 0:
            v = self.inst_vals[h]
            if self.inst_keys[h] == key and memcmp(self.inst_codes + 15 * v, code15, 15) == 0:
                return v
            h = (h + 1) & self.inst_mask
        return -1

    def terminal_of(self, str tid) -> int:
        raw = tid.encode("ascii")
        if len(raw) != 8:
            return -1
        return self._term_find(load8(<const uint8_t*>PyBytes_AS_STRING(raw)))

    # -----------------------------------------------------------------------------------------
    # decode
    # -----------------------------------------------------------------------------------------
    cdef int fill_request(self, const uint8_t* b, Py_ssize_t n, Request* q, Wire* w) noexcept nogil:
        """One frame body → q and w. 0 when the engine (or the server, for management messages)
        takes it; -1 when the codec answers it (q.pre_code set, w.err_* say why)."""
        cdef Loc loc[65]
        cdef int i, mti_class, sep
        cdef Loc* l
        cdef uint32_t proc
        cdef uint8_t f60_1, cmd, sub
        cdef uint16_t f60_3
        cdef bint ok
        cdef uint8_t keybuf[64]
        cdef int kp
        memset(q, 0, sizeof(Request))
        memset(w, 0, sizeof(Wire))
        q.terminal_index = -1
        q.institution_index = -1
        w.terminal_index = -1
        if n >= 11:
            memcpy(w.tpdu, b, 5)
            memcpy(w.header, b + 5, 6)
        if parse_fields(b, n, loc, w) < 0:
            # salvage what the reply needs from the fields validated before the error
            if w.err_field != 0 or w.err_what == ERR_SECONDARY or w.err_what == ERR_TRAILING:
                w.mti = <uint16_t>(nib(b + 11, 0) * 1000 + nib(b + 11, 1) * 100 + nib(b + 11, 2) * 10 + nib(b + 11, 3))
            self._read_common(b, loc, q, w)
            return self._reject(q, w, RC_30)
        w.mti = <uint16_t>(nib(b + 11, 0) * 1000 + nib(b + 11, 1) * 100 + nib(b + 11, 2) * 10 + nib(b + 11, 3))
        w.mab_len = <uint16_t>(n - 11)
        if has(w, 64):
            w.mac_offset = loc[64].off
            w.mab_len = <uint16_t>(loc[64].off - 11)
            memcpy(w.mac, b + loc[64].off, 8)
        self._read_common(b, loc, q, w)
        for i in range(4):
            if self._need(q, w, COMMON_FIELDS[i]) < 0:
                return -1
        l = &loc[60]
        if l.units < 8 or l.units == 9 or l.units == 10:
            set_err(w, 60, l.off, ERR_VALUE, l.units)
            return self._reject(q, w, RC_30)
        f60_1 = <uint8_t>digits_value(b, l, 0, 2)
        w.f60_1 = f60_1
        w.batch_no = <uint32_t>digits_value(b, l, 2, 6)
        q.batch_no = w.batch_no
        f60_3 = <uint16_t>digits_value(b, l, 8, 3) if l.units >= 11 else 0
        w.f60_3 = f60_3
        proc = w.proc_code

        # ---- route: MTI + 3 + 60.1 (+ 60.3) --------------------------------------------------
        cmd = 0
        if w.mti == 800 and f60_3 == 3:
            w.kind = WK_SIGNON
            return 0
        if w.mti == 820 and f60_3 == 2:
            w.kind = WK_SIGNOFF
            return 0
        if w.mti == 820 and f60_3 == 301:
            w.kind = WK_ECHO
            return 0
        if w.mti == 500 and f60_3 == 201:
            w.kind = WK_SETTLE
            return self._need(q, w, 48)
        if w.mti == 320 and (f60_3 == 201 or f60_3 == 202 or f60_3 == 207):
            w.kind = WK_UPLOAD
            return 0
        if not has(w, 3):
            if w.mti == 200 or w.mti == 220 or w.mti == 400:
                set_err(w, 3, 13, ERR_MISSING, -1)
                return self._reject(q, w, RC_30)
            set_err(w, 0, 11, ERR_ROUTE, w.mti)
            return self._reject(q, w, RC_12)
        cmd = route(200 if w.mti == 400 else w.mti, proc, f60_1)
        if cmd == 0 or (w.mti == 400 and not reversible(cmd)):
            set_err(w, 0, 11, ERR_ROUTE, w.mti)
            return self._reject(q, w, RC_12)
        w.kind = WK_ENGINE
        if cmd == CMD_BALANCE:
            sub = <uint8_t>((proc // 100) % 100)
            if sub != 10 and sub != 91 and sub != 0:
                set_err(w, 3, loc[3].off, ERR_VALUE, <int32_t>proc)
                return self._reject(q, w, RC_30)
            q.acct_type = sub
        q.cmd = CMD_REVERSAL if w.mti == 400 else cmd

        # ---- the card: field 2, else the PAN of field 35 -------------------------------------
        if has(w, 2):
            l = &loc[2]
            if l.units < 13:
                set_err(w, 2, l.off, ERR_VALUE, -1)
                return self._reject(q, w, RC_30)
            for i in range(l.units):
                w.pan[i] = <uint8_t>(48 + nib(b + l.off, i))
            w.pan_len = <uint8_t>l.units
        elif has(w, 35):
            l = &loc[35]
            sep = -1
            for i in range(l.units):
                if nib(b + l.off, i) == 0xD:
                    sep = i
                    break
            if sep < 13 or sep > 19:
                set_err(w, 35, l.off, ERR_TRACK2, -1)
                return self._reject(q, w, RC_30)
            for i in range(sep):
                w.pan[i] = <uint8_t>(48 + nib(b + l.off, i))
            w.pan_len = <uint8_t>sep
        else:
            set_err(w, 2, 13, ERR_MISSING, -1)
            return self._reject(q, w, RC_30)
        q.pan_hash = siphash24(self.pan_k0, self.pan_k1, w.pan, w.pan_len)
        q.pan_last4 = <uint16_t>((w.pan[w.pan_len - 4] - 48) * 1000 + (w.pan[w.pan_len - 3] - 48) * 100
                                 + (w.pan[w.pan_len - 2] - 48) * 10 + (w.pan[w.pan_len - 1] - 48))

        # ---- fields every card transaction carries --------------------------------------------
        if cmd != CMD_BALANCE:
            if self._need(q, w, 4) < 0:
                return -1
            q.amount_fen = w.amount_fen
        if w.mti == 400:
            if self._need(q, w, 39) < 0:
                return -1
            memcpy(w.f39, b + loc[39].off, 2)
        else:
            for i in range(5):
                if self._need(q, w, CARD_FIELDS[i]) < 0:
                    return -1
            if memcmp(b + loc[49].off, b"156", 3) != 0:
                set_err(w, 49, loc[49].off, ERR_VALUE, -1)
                return self._reject(q, w, RC_30)
        if has(w, 52):
            if self._need(q, w, 53) < 0:
                return -1
            memcpy(w.pin_block, b + loc[52].off, 8)
            w.flags |= WF_PIN
            q.flags |= REQ_PIN
        # void, cancel, refund: field 37 and 61 of the original. Not on their reversal: a 0400
        # carries the original's 2, 3, 4, 11, 60 (+ 39, 41, 42) only, PROTOCOL.md §3.2, and the
        # engine matches it by 41 + 11 + 60.2 (fix: 0400 of a void / cancel was refused with 30)
        if (cmd == CMD_VOID or cmd == CMD_MED_CANCEL or cmd == CMD_REFUND) and w.mti != 400:
            if self._need(q, w, 37) < 0 or self._need(q, w, 61) < 0:
                return -1
            ok = True
            q.orig_rrn = ascii_value(b + loc[37].off, 12, &ok)
            if not ok:
                set_err(w, 37, loc[37].off, ERR_VALUE, -1)
                return self._reject(q, w, RC_30)
            l = &loc[61]
            if l.units < 16:
                set_err(w, 61, l.off, ERR_VALUE, l.units)
                return self._reject(q, w, RC_30)
            q.orig_batch = <uint32_t>digits_value(b, l, 0, 6)
            q.orig_stan = <uint32_t>digits_value(b, l, 6, 6)
            q.orig_date = <uint16_t>digits_value(b, l, 12, 4)
        if cmd == CMD_TRANSFER and w.mti != 400:       # not on its reversal either (§3.2)
            if self._need(q, w, 48) < 0:
                return -1
            l = &loc[48]
            if l.units < 13 or l.units > 19:
                set_err(w, 48, l.off, ERR_VALUE, -1)
                return self._reject(q, w, RC_30)
            for i in range(l.units):
                keybuf[i] = <uint8_t>(48 + nib(b + l.off, i))
            q.pan2_hash = siphash24(self.pan_k0, self.pan_k1, keybuf, l.units)
        if cmd == CMD_MED_SETTLE or cmd == CMD_MED_PRESETTLE:
            if w.mti != 400:
                if self._need(q, w, 62) < 0:
                    return -1
                if self._medical_tlv(b, &loc[62], q, w) < 0:
                    return self._reject(q, w, RC_30)
        # ---- the duplicate key (PROTOCOL.md §3.2): MTI class + 32 + 41 + 42 + 11 + 60.2 + 13 ---
        mti_class = 4 if w.mti == 400 else 2
        kp = 0
        keybuf[kp] = <uint8_t>mti_class
        kp += 1
        if has(w, 32):
            # the digit count, not the byte count: 9 and 10 digits pack into the same 5 bytes
            # ("123456789" + pad 0 = "1234567890"), so nbytes here merged two keys (fix)
            keybuf[kp] = <uint8_t>loc[32].units
            kp += 1
            memcpy(keybuf + kp, b + loc[32].off, loc[32].nbytes)
            kp += loc[32].nbytes
        else:
            keybuf[kp] = 0xFF
            kp += 1
        memcpy(keybuf + kp, w.tid, 8)
        kp += 8
        memcpy(keybuf + kp, w.mid, 15)
        kp += 15
        memcpy(keybuf + kp, &w.stan, 4)
        kp += 4
        memcpy(keybuf + kp, &w.batch_no, 4)
        kp += 4
        memcpy(keybuf + kp, &w.local_date, 2)
        kp += 2
        # the content: the decoded row itself, before the key is set (and while the PIN's
        # verification value is still zero: a repeat is the same message whatever its PIN block)
        # (SipHash here cost as much as the rest of the decode: 20 blocks of two rounds each)
        q.content_hash = content_hash64(<const uint8_t*>q, sizeof(Request) // 8, CONTENT_K0, CONTENT_K1)
        q.idem_key = (siphash24(IDEM_K0, IDEM_K1, keybuf, kp) & 0x7FFFFFFFFFFFFFFFULL) | 1
        return 0

    cdef void _read_common(self, const uint8_t* b, Loc* loc, Request* q, Wire* w) noexcept nogil:
        """Fields the reply echoes, from whatever was validated (also after a decode error)."""
        if has(w, 3):
            w.proc_code = <uint32_t>digits_value(b, &loc[3], 0, 6)
        if has(w, 4):
            w.amount_fen = <int64_t>digits_value(b, &loc[4], 0, 12)
        if has(w, 11):
            w.stan = <uint32_t>digits_value(b, &loc[11], 0, 6)
            q.stan = w.stan
        if has(w, 12):
            w.local_time = <uint32_t>digits_value(b, &loc[12], 0, 6)
            q.local_time = w.local_time
        if has(w, 13):
            w.local_date = <uint16_t>digits_value(b, &loc[13], 0, 4)
            q.local_date = w.local_date
        if has(w, 41):
            memcpy(w.tid, b + loc[41].off, 8)
            w.terminal_index = self._term_find(load8(b + loc[41].off))
            q.terminal_index = w.terminal_index
        if has(w, 42):
            memcpy(w.mid, b + loc[42].off, 15)
            q.institution_index = self._inst_find(b + loc[42].off)
        if has(w, 60):
            w.f60_len = loc[60].units
            memcpy(w.f60, b + loc[60].off, loc[60].nbytes)

    cdef int _need(self, Request* q, Wire* w, int f) noexcept nogil:
        if has(w, f):
            return 0
        set_err(w, f, 13 + (f - 1) // 8, ERR_MISSING, -1)
        return self._reject(q, w, RC_30)

    cdef int _reject(self, Request* q, Wire* w, uint16_t code) noexcept nogil:
        """The codec answers: keep what the reply needs (MTI, 11, 41, 42, 60), drop the rest."""
        cdef uint32_t stan = q.stan, batch = q.batch_no, t = q.local_time
        cdef int32_t term = q.terminal_index, inst = q.institution_index
        cdef uint16_t date = q.local_date
        memset(q, 0, sizeof(Request))
        q.terminal_index = term
        q.institution_index = inst
        q.stan = stan
        q.batch_no = batch
        q.local_time = t
        q.local_date = date
        q.pre_code = code
        memset(w.pan, 0, sizeof(w.pan))
        memset(w.pin_block, 0, sizeof(w.pin_block))
        w.pan_len = 0
        w.flags &= ~WF_PIN
        w.kind = WK_INVALID
        # a reply is possible only when its MTI and the matching key (41 + 11) were read
        if not (has(w, 11) and has(w, 41)) or w.mti == 0 or (w.mti // 10) % 2 != 0:
            w.flags |= WF_NO_REPLY
        return -1

    cdef int _medical_tlv(self, const uint8_t* b, const Loc* l, Request* q, Wire* w) noexcept nogil:
        """Field 62 of 81/83: ASCII TLV, tag (2 letters) + length (3 digits) + value."""
        cdef Py_ssize_t pos = l.off, end = <Py_ssize_t>l.off + l.nbytes, vlen
        cdef uint32_t seen = 0, bit
        cdef uint16_t tag
        cdef bint ok
        cdef uint64_t v
        cdef int i
        q.flags |= REQ_AU
        while pos < end:
            if end - pos < 5:
                set_err(w, 62, pos, ERR_TLV, <int32_t>(end - pos))
                return -1
            tag = (<uint16_t>b[pos] << 8) | b[pos + 1]
            ok = True
            vlen = <Py_ssize_t>ascii_value(b + pos + 2, 3, &ok)
            if not ok or pos + 5 + vlen > end or vlen == 0:
                set_err(w, 62, pos + 2, ERR_TLV, <int32_t>vlen if ok else -1)
                return -1
            bit = tlv_bit(tag)
            if bit == 0 or (seen & bit):
                set_err(w, 62, pos, ERR_TLV_TAG, tag)
                return -1
            seen |= bit
            pos += 5
            if tag == 0x4D44:      # MD visit id, an..30: kept by the terminal, not by the engine
                if vlen > 30:
                    set_err(w, 62, pos, ERR_TLV, <int32_t>vlen)
                    return -1
                for i in range(vlen):
                    if b[pos + i] < 0x20 or b[pos + i] > 0x7E:
                        set_err(w, 62, pos + i, ERR_CHARSET, b[pos + i])
                        return -1
                pos += vlen
                continue
            if vlen > 12:
                set_err(w, 62, pos - 3, ERR_TLV, <int32_t>vlen)
                return -1
            ok = True
            v = ascii_value(b + pos, <int>vlen, &ok)
            if not ok:
                set_err(w, 62, pos, ERR_VALUE, -1)
                return -1
            if tag == 0x4D54:          # MT
                if v != 11 and v != 14 and v != 21 and v != 41:
                    set_err(w, 62, pos, ERR_VALUE, <int32_t>v)
                    return -1
                q.med_type = <uint8_t>v
            elif tag == 0x464F:        # FO
                q.fo_fen = <int64_t>v
            elif tag == 0x4F4C:        # OL
                q.ol_fen = <int64_t>v
            elif tag == 0x5053:        # PS
                q.ps_fen = <int64_t>v
            elif tag == 0x4953:        # IS
                q.is_fen = <int64_t>v
            elif tag == 0x4650:        # FP
                q.fp_fen = <int64_t>v
                q.flags |= REQ_FP
            elif tag == 0x4155 or tag == 0x5041:    # AU, PA: one digit 0 / 1
                if vlen != 1 or v > 1:
                    set_err(w, 62, pos, ERR_VALUE, <int32_t>v)
                    return -1
                if tag == 0x4155 and v == 0:
                    q.flags &= ~REQ_AU
                if tag == 0x5041 and v == 1:
                    q.flags |= REQ_PA
            pos += vlen
        for i in range(5):
            if not (seen & (1 << i)):          # MT FO OL PS IS are bits 0..4 of tlv_bit
                set_err(w, 62, l.off, ERR_MISSING, REQUIRED_TAGS[i])
                return -1
        return 0

    def decode_batch(self, list frames not None, cnp.ndarray requests not None, cnp.ndarray wires not None,
                     Py_ssize_t first=0) -> int:
        """Decode `frames` (bodies, length prefix removed) into rows first.. of `requests` and
        `wires`. Returns how many the codec rejected (pre_code set)."""
        cdef Py_ssize_t i, count = PyList_GET_SIZE(frames), rejected = 0
        if first < 0:       # fix: a negative first wrote before the arrays' start
            raise ValueError(f"decode_batch: first = {first}, expecting >= 0")
        _check_rows(requests, wires, first + count)
        cdef Request* q = <Request*>cnp.PyArray_DATA(requests) + first
        cdef Wire* w = <Wire*>cnp.PyArray_DATA(wires) + first
        cdef object frame
        for i in range(count):
            frame = <object>PyList_GET_ITEM(frames, i)
            if not PyBytes_Check(frame):
                raise TypeError("decode_batch: frames must be bytes")
            if self.fill_request(<const uint8_t*>PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame),
                                 q + i, w + i) < 0:
                rejected += 1
        return rejected

    def decode(self, bytes frame not None):
        """One frame body → (request row, wire row) as 1-element arrays; DecodeError when the
        codec must answer it itself."""
        from yikatong.engine import new_requests
        requests = new_requests(1)
        wires = np.zeros(1, WIRE_DTYPE)
        cdef Request* q = <Request*>cnp.PyArray_DATA(requests)
        cdef Wire* w = <Wire*>cnp.PyArray_DATA(wires)
        if self.fill_request(<const uint8_t*>PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame), q, w) < 0:
            raise DecodeError(w.err_field, w.err_offset, w.err_what, None if w.err_found == -1 else w.err_found)
        return requests, wires

    # -----------------------------------------------------------------------------------------
    # encode
    # -----------------------------------------------------------------------------------------
    def encode_replies(self, cnp.ndarray wires not None, cnp.ndarray requests not None,
                       cnp.ndarray results not None, Py_ssize_t count, bytearray out not None,
                       uint32_t business_date, uint32_t now_hhmmss, uint32_t now_mmdd) -> int:
        """Replies of rows 0..count-1 into `out` (length prefix included), each at its row's
        reply_start; rows with WF_NO_REPLY or kind other than engine / invalid are skipped
        (reply_len 0). Field 64 is left zero at reply_mac for the MAC stage. Returns bytes used."""
        _check_rows(requests, wires, count)
        if results.dtype.itemsize != sizeof(Result) or results.shape[0] < count or not results.flags.c_contiguous:
            raise TypeError("encode_replies: results must be the engine's result array, count rows")
        if len(out) < count * REPLY_BYTES_MAX:
            raise ValueError(f"encode_replies: out holds {len(out)} bytes, expecting {count * REPLY_BYTES_MAX}")
        cdef Wire* w = <Wire*>cnp.PyArray_DATA(wires)
        cdef const Request* q = <const Request*>cnp.PyArray_DATA(requests)
        cdef const Result* r = <const Result*>cnp.PyArray_DATA(results)
        cdef uint8_t* o = <uint8_t*>(<char*>out)
        cdef Py_ssize_t i, pos = 0, used
        with nogil:
            for i in range(count):
                if (w[i].flags & WF_NO_REPLY) or (w[i].kind != WK_ENGINE and w[i].kind != WK_INVALID):
                    w[i].reply_len = 0
                    continue
                used = self.encode_reply(o + pos, &w[i], &q[i], &r[i], business_date, now_hhmmss, now_mmdd)
                w[i].reply_start = <uint32_t>pos
                w[i].reply_mab += <uint32_t>pos
                if w[i].reply_mac:
                    w[i].reply_mac += <uint32_t>pos
                w[i].reply_len = <uint16_t>used
                pos += used
        return pos

    cdef Py_ssize_t encode_reply(self, uint8_t* o, Wire* w, const Request* q, const Result* r,
                                 uint32_t business_date, uint32_t now_hhmmss, uint32_t now_mmdd) noexcept nogil:
        cdef Py_ssize_t p = 2, bm, l62, start
        cdef uint64_t bitmap = 0
        cdef uint16_t code = r.code if w.kind == WK_ENGINE else q.pre_code
        cdef uint32_t bd = r.business_date if r.business_date else business_date
        cdef bint approved = code == RC_00 or code == RC_10
        cdef bint card_read = w.kind == WK_ENGINE and r.card_slot >= 0 and (q.pre_code == 0)
        cdef int i, which
        cdef int64_t fin_now, ins_now
        if code == 0:
            code = RC_30
        # TPDU: destination and source swapped; header echoed, nibble 3 asks for a sign-on
        o[p] = w.tpdu[0]
        o[p + 1] = w.tpdu[3]
        o[p + 2] = w.tpdu[4]
        o[p + 3] = w.tpdu[1]
        o[p + 4] = w.tpdu[2]
        memcpy(o + p + 5, w.header, 6)
        if w.flags & WF_RESIGN:
            o[p + 7] = (o[p + 7] & 0xF0) | 0x03
        p += 11
        w.reply_mab = <uint32_t>p
        put_bcd(o + p, w.mti + 10, 4)
        p += 2
        bm = p
        p += 8
        if has(w, 3):                     # 3 echoed
            put_bcd(o + p, w.proc_code, 6)
            p += 3
            bitmap |= bit_of(3)
        if has(w, 4):                     # 4 echoed
            put_bcd(o + p, <uint64_t>w.amount_fen, 12)
            p += 6
            bitmap |= bit_of(4)
        put_bcd(o + p, w.stan, 6)                    # 11
        p += 3
        bitmap |= bit_of(11)
        put_bcd(o + p, w.local_time if (has(w, 12)) else now_hhmmss, 6)   # 12
        p += 3
        put_bcd(o + p, w.local_date if (has(w, 13)) else now_mmdd, 4)     # 13
        p += 2
        put_bcd(o + p, bd % 10000, 4)                # 15: the engine's business date
        p += 2
        bitmap |= bit_of(12) | bit_of(13) | bit_of(15)
        o[p] = <uint8_t>(((self.inst_id_len // 10) << 4) | (self.inst_id_len % 10))   # 32
        p += 1
        p += put_digits(o + p, self.inst_id, self.inst_id_len)
        bitmap |= bit_of(32)
        if r.rrn and w.kind == WK_ENGINE:
            put_ascii_digits(o + p, r.rrn, 12)       # 37
            p += 12
            bitmap |= bit_of(37)
        if approved and r.auth_code and w.kind == WK_ENGINE:
            put_ascii_digits(o + p, r.auth_code, 6)  # 38
            p += 6
            bitmap |= bit_of(38)
        o[p] = <uint8_t>(code & 0xFF)                # 39
        o[p + 1] = <uint8_t>(code >> 8)
        p += 2
        bitmap |= bit_of(39)
        memcpy(o + p, w.tid, 8)                      # 41
        p += 8
        bitmap |= bit_of(41)
        if has(w, 42):                    # 42
            memcpy(o + p, w.mid, 15)
            p += 15
            bitmap |= bit_of(42)
        if card_read:                                # 54: balances (financial 10, insurance 91)
            which = 3
            if q.cmd == CMD_BALANCE and q.acct_type == 10:
                which = 1
            elif q.cmd == CMD_BALANCE and q.acct_type == 91:
                which = 2
            start = p
            p += 2
            # FIX (tests/integration/test_server.py pre-settlement): an approved pre-settlement's
            # result holds the balances as they would be had it posted (they go to IB / BB in
            # field 62); PROTOCOL.md §3.5 wants the *current* balances in field 54, i.e. before
            # this card's own legs (the aid leg is the payer's account, not this card's).
            fin_now = r.fin_balance_fen
            ins_now = r.ins_balance_fen
            if approved and q.cmd == CMD_MED_PRESETTLE:
                fin_now = r.fin_balance_fen + r.fin_leg_fen
                ins_now = r.ins_balance_fen + r.ins_leg_fen
            if which & 1:
                p += put_balance(o + p, b"10", fin_now)
            if which & 2:
                p += put_balance(o + p, b"91", ins_now)
            put_bcd(o + start, <uint64_t>(p - start - 2), 4)
            bitmap |= bit_of(54)
        if w.f60_len:                                # 60 echoed
            put_bcd(o + p, w.f60_len, 4)
            p += 2
            memcpy(o + p, w.f60, (w.f60_len + 1) // 2)
            p += (w.f60_len + 1) // 2
            bitmap |= bit_of(60)
        if w.kind == WK_ENGINE and approved and (q.cmd == CMD_MED_SETTLE or q.cmd == CMD_MED_PRESETTLE):
            start = p
            p += 2
            p += put_tlv_num(o + p, b"SI", <int64_t>r.rrn)
            p += put_tlv_num(o + p, b"FP", r.fund_fen)
            p += put_tlv_num(o + p, b"DE", r.deductible_fen)
            p += put_tlv_num(o + p, b"AP", r.ins_leg_fen + r.aid_leg_fen)
            p += put_tlv_num(o + p, b"BP", r.fin_leg_fen)
            if code == RC_10:
                p += put_tlv_num(o + p, b"CP", r.cash_fen)
            p += put_tlv_num(o + p, b"IB", r.ins_balance_fen)
            p += put_tlv_num(o + p, b"BB", r.fin_balance_fen)
            put_bcd(o + start, <uint64_t>(p - start - 2), 4)
            bitmap |= bit_of(62)
        if w.flags & WF_MAC_REPLY:
            memset(o + p, 0, 8)
            w.reply_mac = <uint32_t>p
            bitmap |= bit_of(64)
            w.reply_mab_len = <uint16_t>(p - w.reply_mab)
            p += 8
        else:
            w.reply_mac = 0
            w.reply_mab_len = <uint16_t>(p - w.reply_mab)
        for i in range(8):
            o[bm + i] = <uint8_t>(bitmap >> (56 - 8 * i))
        o[0] = <uint8_t>((p - 2) >> 8)
        o[1] = <uint8_t>((p - 2) & 0xFF)
        return p


cdef inline uint64_t bit_of(int f) noexcept nogil:
    return (<uint64_t>1) << (64 - f)


cdef inline Py_ssize_t put_digits(uint8_t* o, const uint8_t* ascii, int count) noexcept nogil:
    """ASCII digits as left-aligned packed BCD (trailing 0 nibble when odd). Returns bytes."""
    cdef int i
    cdef Py_ssize_t nbytes = (count + 1) // 2
    memset(o, 0, nbytes)
    for i in range(count):
        if i & 1:
            o[i >> 1] |= (ascii[i] - 48)
        else:
            o[i >> 1] = <uint8_t>((ascii[i] - 48) << 4)
    return nbytes


cdef inline Py_ssize_t put_balance(uint8_t* o, const char* acct, int64_t fen) noexcept nogil:
    """One field 54 entry: account type, 02 available, 156, sign, 12 digits."""
    o[0] = acct[0]
    o[1] = acct[1]
    memcpy(o + 2, b"02156", 5)
    o[7] = 67 if fen >= 0 else 68         # C / D
    put_ascii_digits(o + 8, <uint64_t>(fen if fen >= 0 else -fen), 12)
    return 20


cdef inline Py_ssize_t put_tlv_num(uint8_t* o, const char* tag, int64_t v) noexcept nogil:
    """Tag + 3-digit length + the amount in decimal digits (no leading zeros; "0" for zero).
    The digits are counted first and written two at a time (put_ascii_digits): a medical reply
    carries up to eight of these, and one division per digit was the encoder's largest cost."""
    cdef uint64_t u = <uint64_t>v if v >= 0 else 0
    cdef uint64_t limit = 10
    cdef int n = 1
    while n < 19 and u >= limit:                 # an int64 has at most 19 digits; 10**19 fits
        n += 1
        limit *= 10
    o[0] = tag[0]
    o[1] = tag[1]
    o[2] = 48
    o[3] = <uint8_t>(48 + n // 10)
    o[4] = <uint8_t>(48 + n % 10)
    put_ascii_digits(o + 5, u, n)
    return 5 + n


cdef inline uint32_t tlv_bit(uint16_t tag) noexcept nogil:
    if tag == 0x4D54: return 1          # MT
    if tag == 0x464F: return 2          # FO
    if tag == 0x4F4C: return 4          # OL
    if tag == 0x5053: return 8          # PS
    if tag == 0x4953: return 16         # IS
    if tag == 0x4155: return 32         # AU
    if tag == 0x5041: return 64         # PA
    if tag == 0x4650: return 128        # FP
    if tag == 0x4D44: return 256        # MD
    return 0


cdef inline uint8_t route(uint16_t mti, uint32_t proc, uint8_t f60_1) noexcept nogil:
    """PROTOCOL.md §3's table: MTI + field 3 + 60.1 → command (0: none)."""
    if mti == 200:
        if f60_1 == 1 and proc // 10000 == 31 and proc % 100 == 0:
            return CMD_BALANCE
        if proc == 0 and f60_1 == 22:
            return CMD_PURCHASE
        if proc == 200000 and f60_1 == 23:
            return CMD_VOID
        if proc == 0 and f60_1 == 81:
            return CMD_MED_SETTLE
        if proc == 200000 and f60_1 == 82:
            return CMD_MED_CANCEL
        if proc == 300000 and f60_1 == 83:
            return CMD_MED_PRESETTLE
        if proc == 210000 and f60_1 == 91:
            return CMD_DEPOSIT
        if proc == 10000 and f60_1 == 92:
            return CMD_WITHDRAW
        if proc == 400000 and f60_1 == 93:
            return CMD_TRANSFER
    elif mti == 220:
        if proc == 200000 and f60_1 == 25:
            return CMD_REFUND
    return 0


def _check_rows(cnp.ndarray requests, cnp.ndarray wires, Py_ssize_t rows):
    if requests.dtype.itemsize != sizeof(Request) or not requests.flags.c_contiguous or not requests.flags.writeable:
        raise TypeError("requests: expecting the engine's request array (C-contiguous, writeable)")
    if wires.dtype.itemsize != sizeof(Wire) or not wires.flags.c_contiguous or not wires.flags.writeable:
        raise TypeError("wires: expecting a WIRE_DTYPE array (C-contiguous, writeable)")
    if requests.shape[0] < rows or wires.shape[0] < rows:
        raise ValueError(f"requests / wires: {requests.shape[0]} / {wires.shape[0]} rows, expecting at least {rows}")


# ---------------------------------------------------------------------------------------------
# Generic field dictionaries: tests, tools, management messages (not the per-message path)
# ---------------------------------------------------------------------------------------------
def decode_fields(bytes frame not None) -> dict:
    """A frame body → {"tpdu": bytes, "header": bytes, "t": "0200", "2": "6214...", ...}: n and
    z fields as digit strings (z keeps its separator as "D"), an/ans as str, b as bytes. Raises
    DecodeError; anything it returns re-encodes with encode_fields to the same bytes."""
    cdef Loc loc[65]
    cdef Wire w
    cdef const uint8_t* b = <const uint8_t*>PyBytes_AS_STRING(frame)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(frame)
    cdef int f, i, d
    memset(&w, 0, sizeof(Wire))
    if parse_fields(b, n, loc, &w) < 0:
        raise DecodeError(w.err_field, w.err_offset, w.err_what, None if w.err_found == -1 else w.err_found)
    out = {"tpdu": frame[:5], "header": frame[5:11], "t": "%d%d%d%d" % (nib(b + 11, 0), nib(b + 11, 1), nib(b + 11, 2), nib(b + 11, 3))}
    for f in range(2, 65):
        if not has(&w, f):
            continue
        kind = SPEC[f].kind
        data = frame[loc[f].off:loc[f].off + loc[f].nbytes]
        if kind <= FK_Z:
            chars = []
            for i in range(loc[f].units):
                d = nib(b + loc[f].off, loc[f].nib0 + i)
                chars.append("D" if d == 0xD else chr(48 + d))
            out[str(f)] = "".join(chars)
        elif kind == FK_B:
            out[str(f)] = data
        else:
            out[str(f)] = data.decode("ascii")
    return out


def encode_fields(dict fields not None) -> bytes:
    """The inverse of decode_fields: a frame body (no length prefix). Raises ValueError naming
    the field (never its value) when a value does not fit the field spec."""
    tpdu = fields.get("tpdu", b"\x60\x00\x00\x00\x00")
    header = fields.get("header", b"\x60\x31\x00\x00\x00\x00")
    mti = fields["t"]
    if len(tpdu) != 5 or len(header) != 6 or len(mti) != 4 or not mti.isdigit():
        raise ValueError("tpdu (5 bytes), header (6 bytes) and t (4 digits) are required")
    body = bytearray(tpdu) + bytearray(header) + bytes.fromhex(mti)
    bitmap = 0
    parts = []
    for f in range(2, 65):
        key = str(f)
        if key not in fields:
            continue
        if f not in FIELD_SPEC:
            raise ValueError(f"field {f}: not in this dialect")
        fmt, prefix, units = FIELD_SPEC[f]
        value = fields[key]
        bitmap |= 1 << (64 - f)
        if fmt in ("n", "n-left", "z"):
            digits = value
            allowed = "0123456789D" if fmt == "z" else "0123456789"
            if not isinstance(digits, str) or any(c not in allowed for c in digits):
                raise ValueError(f"field {f}: expecting digits")
            count = len(digits)
            if (prefix == 0 and count != units) or count > units:
                raise ValueError(f"field {f}: {count} digits, expecting {'exactly' if prefix == 0 else 'at most'} {units}")
            nibbles = digits.replace("D", "d")
            if count % 2:
                nibbles = "0" + nibbles if (fmt == "n" and prefix == 0) else nibbles + "0"
            data = bytes.fromhex(nibbles)
        else:
            data = value if fmt == "b" else value.encode("ascii")
            count = len(data)
            if (prefix == 0 and count != units) or count > units:
                raise ValueError(f"field {f}: {count} bytes, expecting {'exactly' if prefix == 0 else 'at most'} {units}")
        if prefix == 2:
            parts.append(bytes.fromhex("%02d" % count))
        elif prefix == 3:
            parts.append(bytes.fromhex("%04d" % count))
        parts.append(data)
    body += bitmap.to_bytes(8, "big")
    for part in parts:
        body += part
    return bytes(body)


def field_offsets(bytes frame not None) -> dict:
    """{field: (offset of its data in the body, bytes)} of a valid frame body (templates)."""
    cdef Loc loc[65]
    cdef Wire w
    memset(&w, 0, sizeof(Wire))
    if parse_fields(<const uint8_t*>PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame), loc, &w) < 0:
        raise DecodeError(w.err_field, w.err_offset, w.err_what, None if w.err_found == -1 else w.err_found)
    return {f: (loc[f].off, loc[f].nbytes) for f in range(2, 65) if has(&w, f)}


def _offsets_wire():
    cdef Wire w
    base = <size_t>&w
    return sizeof(Wire), {
        "present": <size_t>&w.present - base, "amount_fen": <size_t>&w.amount_fen - base,
        "proc_code": <size_t>&w.proc_code - base, "terminal_index": <size_t>&w.terminal_index - base,
        "reply_start": <size_t>&w.reply_start - base, "reply_len": <size_t>&w.reply_len - base,
        "mti": <size_t>&w.mti - base, "err_what": <size_t>&w.err_what - base,
        "kind": <size_t>&w.kind - base, "tpdu": <size_t>&w.tpdu - base, "tid": <size_t>&w.tid - base,
        "mid": <size_t>&w.mid - base, "mac": <size_t>&w.mac - base, "pin_block": <size_t>&w.pin_block - base,
        "pan": <size_t>&w.pan - base, "reserved0": <size_t>&w.reserved0 - base,
    }


WIRE_DTYPE = np.dtype([
    ("present", "<u8"), ("amount_fen", "<i8"), ("proc_code", "<u4"), ("stan", "<u4"),
    ("local_time", "<u4"), ("batch_no", "<u4"), ("err_offset", "<u4"), ("err_found", "<i4"),
    ("terminal_index", "<i4"), ("reply_start", "<u4"), ("reply_mab", "<u4"), ("reply_mac", "<u4"),
    ("reply_len", "<u2"), ("reply_mab_len", "<u2"), ("mti", "<u2"), ("local_date", "<u2"),
    ("f60_3", "<u2"), ("err_field", "<u2"), ("err_what", "<u2"), ("mab_len", "<u2"),
    ("mac_offset", "<u2"), ("f60_len", "<u2"), ("kind", "u1"), ("flags", "u1"), ("f60_1", "u1"),
    ("pan_len", "u1"), ("tpdu", "u1", (5,)), ("header", "u1", (6,)), ("tid", "S8"), ("mid", "S15"),
    ("f39", "S2"), ("f60", "u1", (9,)), ("mac", "u1", (8,)), ("pin_block", "u1", (8,)),
    ("pan", "u1", (19,)), ("reserved0", "u1", (8,)),
])


def _check_wire_dtype():
    size, offsets = _offsets_wire()
    assert WIRE_DTYPE.itemsize == size, f"Wire: numpy itemsize {WIRE_DTYPE.itemsize}, C sizeof {size}"
    for name, offset in offsets.items():
        assert WIRE_DTYPE.fields[name][1] == offset, f"Wire.{name}: numpy offset {WIRE_DTYPE.fields[name][1]}, C {offset}"


_check_wire_dtype()


def describe_error(wire_row) -> str:
    """One log line's worth for a rejected frame: field, offset, found, expected; no card data."""
    what = int(wire_row["err_what"])
    found = int(wire_row["err_found"])
    field = int(wire_row["err_field"])
    shown = "withheld" if found == -1 else str(found)
    return (f"field {field} at byte {int(wire_row['err_offset'])}: found {shown}, "
            f"expecting {ERR_TEXT.get(what, '?')}")


def content_hash(const uint8_t[::1] row not None) -> int:
    """The content hash of a decoded Request row's bytes (what decode puts in content_hash,
    computed while the row's idem_key and content_hash are still 0). For tests and tools."""
    if row.shape[0] % 8:
        raise ValueError(f"content_hash: {row.shape[0]} bytes, expecting a multiple of 8")
    return content_hash64(&row[0], row.shape[0] // 8, CONTENT_K0, CONTENT_K1)
