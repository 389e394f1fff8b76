# cython: language_level=3
"""The hot core of yikatong.cardfiles: check every field of every line of a batch file and build
the engine's request rows, in one `nogil` pass per file (no Python per line).

A file is bytes (UTF-8 once decoded; GBK files are re-encoded first) and an int64 array of line
start offsets (`line_starts`). Each pass writes one status byte per line (0 = good, else the
first rule the line breaks, in the documented order; the Python side turns a status into the
error text, so the messages live in one place) and one Request row per good line, compacted,
with the line's index beside it.

Fields: split on ',', ASCII white space trimmed, one pair of surrounding double quotes removed.
There is no quoted comma in these files (a line with one has a field too many and is refused).
"""
cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memset, memchr, memcpy
cimport numpy as cnp
import numpy as np

from yikatong.engine._core cimport Request, siphash24, CMD_ISSUE, CMD_CREDIT_FIN

cnp.import_array()

# ---- status per line (mirrored in cardfiles.py; the order is the order of the checks) -------
cdef enum:
    ST_OK = 0
    ST_FIELDS = 1            # wrong number of fields
    # issuance (制卡数据)
    ST_CID_FORM = 2          # 社会保障号码 not 17 digits + a character
    ST_CID_CHECK = 3         # GB 11643 check character wrong
    ST_PAN_DIGITS = 4        # PAN not 16–19 digits
    ST_PAN_LUHN = 5          # Luhn check digit wrong
    ST_REGION = 6            # region not 6 digits or not configured
    ST_INS_TYPE = 7          # insurance type not 1–5 digits or not configured
    ST_PERSON_TYPE = 8       # neither in_service nor retired
    ST_EXPIRY = 9            # not YYMM with a month 01–12
    ST_INS_OPENING = 10      # ins_opening_fen not 1–12 digits
    ST_FIN_OPENING = 11      # fin_opening_fen not 1–12 digits
    # 代发
    ST_BATCH_LINE = 20       # batch_no empty or line not 1–9 digits
    ST_PURPOSE = 21          # purpose not one of the four
    ST_AMOUNT = 22           # amount_fen not 1–12 digits
    ST_ID_CID_FORM = 23      # 18 characters but not 17 digits + a character
    ST_ID_CID_CHECK = 24     # GB 11643 check character wrong
    ST_ID_PAN = 25           # not a PAN of 16–19 digits with a valid Luhn digit

cdef enum:
    FIELDS_MAX = 16          # more fields than any layout has: the count is still reported
    LINE_FIELD_MAX = 9       # 代发 `line`: up to 9 digits
    AMOUNT_DIGITS_MAX = 12   # n12 fen

# GB 11643 weights and the check character by S mod 11
cdef int CID_WEIGHTS[17]
CID_WEIGHTS[:] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
cdef const char* CID_CHECK = b"10X98765432"


cdef inline uint64_t key_of(bytes key16) except? 0:
    return int.from_bytes(key16[:8], "little")


cdef inline uint64_t key63(uint64_t h) noexcept nogil:
    """A duplicate key (idem_key, content_hash): 63 bits, never 0 (0 means none to the engine)."""
    return (h & 0x7FFFFFFFFFFFFFFFULL) | 1


ctypedef struct Field:
    const unsigned char* p
    Py_ssize_t n


cdef inline bint is_space(unsigned char c) noexcept nogil:
    return c == 32 or (9 <= c <= 13)


cdef inline int split_fields(const unsigned char* p, Py_ssize_t n, Field* out) noexcept nogil:
    """Fields of one line (trimmed, one pair of quotes removed); returns how many there are."""
    cdef int count = 0
    cdef Py_ssize_t start = 0, i, a, b
    for i in range(n + 1):
        if i == n or p[i] == 44:             # ','
            if count < FIELDS_MAX:
                a, b = start, i
                while a < b and is_space(p[a]):
                    a += 1
                while b > a and is_space(p[b - 1]):
                    b -= 1
                if b - a >= 2 and p[a] == 34 and p[b - 1] == 34:
                    a += 1
                    b -= 1
                out[count].p = p + a
                out[count].n = b - a
            count += 1
            start = i + 1
    return count


cdef inline bint all_digits(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if p[i] < 48 or p[i] > 57:
            return False
    return True


cdef inline int64_t digits_value(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    cdef int64_t v = 0
    cdef Py_ssize_t i
    for i in range(n):
        v = v * 10 + (p[i] - 48)
    return v


cdef inline bint amount_ok(Field f) noexcept nogil:
    """Whole non-negative fen, at most 12 digits (n12)."""
    return 1 <= f.n <= AMOUNT_DIGITS_MAX and all_digits(f.p, f.n)


cdef inline int cid_status(Field f, unsigned char* upper18) noexcept nogil:
    """0 when the 社会保障号码 is right (GB 11643), 1 not formed, 2 wrong check character.
    `upper18` receives the number with its check character upper-cased (what is hashed)."""
    cdef int s = 0, i
    cdef unsigned char last
    if f.n != 18 or not all_digits(f.p, 17):
        return 1
    for i in range(17):
        s += (f.p[i] - 48) * CID_WEIGHTS[i]
    last = f.p[17]
    if last == 120:                          # 'x' → 'X'
        last = 88
    if <unsigned char>CID_CHECK[s % 11] != last:
        return 2
    memcpy(upper18, f.p, 17)
    upper18[17] = last
    return 0


cdef inline bint luhn_ok(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    cdef int total = 0, d
    cdef Py_ssize_t i
    for i in range(n):
        d = p[n - 1 - i] - 48
        if i & 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


cdef inline bint pan_digits_ok(Field f) noexcept nogil:
    return 16 <= f.n <= 19 and all_digits(f.p, f.n)


cdef inline bint same(Field f, const char* text, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    if f.n != n:
        return False
    for i in range(n):
        if f.p[i] != <unsigned char>text[i]:
            return False
    return True


cdef inline void request_init(Request* q, uint8_t cmd) noexcept nogil:
    """What yikatong.engine.new_requests gives: zeros, no terminal, no institution."""
    memset(q, 0, sizeof(Request))
    q.cmd = cmd
    q.terminal_index = -1
    q.institution_index = -1


# ---------------------------------------------------------------------------------------------
# The file as lines
# ---------------------------------------------------------------------------------------------

cdef Py_ssize_t utf8_check(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i = 0, need, k
    cdef unsigned char c, lo, hi
    while i < n:
        # eight ASCII bytes at a time (the code fields are ASCII)
        while i + 8 <= n and ((<const uint64_t*>(p + i))[0] & 0x8080808080808080ULL) == 0:
            i += 8
        if i >= n:
            break
        c = p[i]
        if c < 0x80:
            i += 1
            continue
        lo, hi = 0x80, 0xBF
        if 0xC2 <= c <= 0xDF:
            need = 1
        elif c == 0xE0:
            need, lo = 2, 0xA0
        elif 0xE1 <= c <= 0xEC or c == 0xEE or c == 0xEF:
            need = 2
        elif c == 0xED:
            need, hi = 2, 0x9F
        elif c == 0xF0:
            need, lo = 3, 0x90
        elif 0xF1 <= c <= 0xF3:
            need = 3
        elif c == 0xF4:
            need, hi = 3, 0x8F
        else:
            return i
        if i + 1 >= n or p[i + 1] < lo or p[i + 1] > hi:
            return i
        for k in range(2, need + 1):
            if i + k >= n or p[i + k] < 0x80 or p[i + k] > 0xBF:
                return i
        i += need + 1
    return -1


def utf8_error_offset(const unsigned char[::1] data not None) -> int:
    """Offset of the first byte that does not start a valid UTF-8 sequence (what Python's decoder
    reports as `start`), or -1 when all of `data` is valid UTF-8. No decoding: a check only."""
    cdef Py_ssize_t n = data.shape[0], found
    if n == 0:
        return -1
    with nogil:
        found = utf8_check(&data[0], n)
    return found


def line_starts(const unsigned char[::1] data not None, Py_ssize_t offset):
    """Start offsets of the lines from `offset` on, plus one past the end: line i is
    data[starts[i]:starts[i + 1] - 1] (its '\\n' dropped; a last line without one gets a virtual
    one). A '\\r' before the '\\n' is white space to the fields."""
    cdef Py_ssize_t n = data.shape[0], i, count = 0
    cdef const unsigned char* p = &data[0] if n else NULL
    cdef const unsigned char* hit
    cdef cnp.ndarray[cnp.int64_t, ndim=1] out
    cdef int64_t* o
    with nogil:
        i = offset
        while i < n:
            hit = <const unsigned char*>memchr(p + i, 10, n - i)
            count += 1
            if hit == NULL:
                break
            i = hit - p + 1
    out = np.empty(count + 1, dtype=np.int64)
    o = <int64_t*>cnp.PyArray_DATA(out)
    with nogil:
        i = offset
        count = 0
        while i < n:
            o[count] = i
            count += 1
            hit = <const unsigned char*>memchr(p + i, 10, n - i)
            if hit == NULL:
                i = n + 1
                break
            i = hit - p + 1
        o[count] = i if i > offset else offset
    return out


def field_count(const unsigned char[::1] data not None, const int64_t[::1] starts not None,
                Py_ssize_t line_index) -> int:
    """How many fields one line has (for its error text)."""
    cdef Field f[FIELDS_MAX]
    cdef int64_t a = starts[line_index], b = starts[line_index + 1] - 1
    return split_fields(&data[0] + a, b - a, f)


# ---------------------------------------------------------------------------------------------
# 制卡数据: citizen_id,name,region,ins_type,person_type,pan,expiry_yymm,ins_opening_fen,fin_opening_fen
# ---------------------------------------------------------------------------------------------

def parse_issuance(const unsigned char[::1] data not None, const int64_t[::1] starts not None,
                   const int64_t[::1] region_codes not None, const int64_t[::1] ins_type_codes not None,
                   bytes pan_key not None, bytes person_key not None, bytes name_key,
                   uint8_t initial_status, uint8_t card_flags,
                   uint8_t[::1] status not None, cnp.ndarray requests not None,
                   int64_t[::1] row_line not None, uint64_t[::1] name_hash not None) -> int:
    """Check every line; write an ISSUE request for each good one (pan_hash, pan_last4,
    person_hash, region_code, ins_type, acct_type = person type | card_flags << 4, med_type =
    initial_status, expiry, opening balances; the PVVs are left to the caller). With `name_key`,
    name_hash[k] is the keyed hash of good row k's holder name. Returns the number of good rows."""
    cdef Py_ssize_t lines = starts.shape[0] - 1, i, k = 0, j
    assert status.shape[0] >= lines and requests.shape[0] >= lines and row_line.shape[0] >= lines
    assert requests.dtype.itemsize == sizeof(Request) and requests.flags.c_contiguous
    assert name_key is None or name_hash.shape[0] >= lines
    cdef uint64_t pk0 = key_of(pan_key), pk1 = int.from_bytes(pan_key[8:], "little")
    cdef uint64_t qk0 = key_of(person_key), qk1 = int.from_bytes(person_key[8:], "little")
    cdef bint names = name_key is not None
    cdef uint64_t nk0 = key_of(name_key) if names else 0
    cdef uint64_t nk1 = int.from_bytes(name_key[8:], "little") if names else 0
    cdef const unsigned char* base = &data[0] if data.shape[0] else NULL
    cdef Request* out = <Request*>cnp.PyArray_DATA(requests)
    cdef Py_ssize_t nregions = region_codes.shape[0], ntypes = ins_type_codes.shape[0]
    cdef Field f[FIELDS_MAX]
    cdef unsigned char cid[18]
    cdef int64_t a, region, itype, month, ins_fen, fin_fen
    cdef int nf, st
    cdef bint retired, found
    cdef Request* q
    with nogil:
        for i in range(lines):
            a = starts[i]
            nf = split_fields(base + a, starts[i + 1] - 1 - a, f)
            st = ST_OK
            if nf != 9:
                status[i] = ST_FIELDS
                continue
            # the rules in order; the first broken one answers
            st = cid_status(f[0], cid)
            if st:
                status[i] = ST_CID_FORM if st == 1 else ST_CID_CHECK
                continue
            if not pan_digits_ok(f[5]):
                status[i] = ST_PAN_DIGITS
                continue
            if not luhn_ok(f[5].p, f[5].n):
                status[i] = ST_PAN_LUHN
                continue
            found = False
            if f[2].n == 6 and all_digits(f[2].p, 6):
                region = digits_value(f[2].p, 6)
                for j in range(nregions):
                    if region_codes[j] == region:
                        found = True
            if not found:
                status[i] = ST_REGION
                continue
            found = False
            if 1 <= f[3].n <= 5 and all_digits(f[3].p, f[3].n):
                itype = digits_value(f[3].p, f[3].n)
                for j in range(ntypes):
                    if ins_type_codes[j] == itype:
                        found = True
            if not found:
                status[i] = ST_INS_TYPE
                continue
            retired = same(f[4], b"retired", 7)
            if not retired and not same(f[4], b"in_service", 10):
                status[i] = ST_PERSON_TYPE
                continue
            month = digits_value(f[6].p + 2, 2) if f[6].n == 4 else 0
            if f[6].n != 4 or not all_digits(f[6].p, 4) or month < 1 or month > 12:
                status[i] = ST_EXPIRY
                continue
            if not amount_ok(f[7]):
                status[i] = ST_INS_OPENING
                continue
            if not amount_ok(f[8]):
                status[i] = ST_FIN_OPENING
                continue
            status[i] = ST_OK
            q = &out[k]
            request_init(q, CMD_ISSUE)
            q.pan_hash = siphash24(pk0, pk1, f[5].p, f[5].n)
            q.pan_last4 = <uint16_t>digits_value(f[5].p + f[5].n - 4, 4)
            q.person_hash = siphash24(qk0, qk1, cid, 18)
            q.region_code = <uint32_t>region
            q.ins_type = <uint16_t>itype
            q.acct_type = (1 if retired else 0) | (card_flags << 4)
            q.med_type = initial_status
            q.expiry_yymm = <uint16_t>digits_value(f[6].p, 4)
            q.amount_fen = digits_value(f[7].p, f[7].n)
            q.amount2_fen = digits_value(f[8].p, f[8].n)
            if names:
                name_hash[k] = siphash24(nk0, nk1, f[1].p, f[1].n)
            row_line[k] = i
            k += 1
    return k


# ---------------------------------------------------------------------------------------------
# 代发: batch_no,line,id,name,amount_fen,purpose
# ---------------------------------------------------------------------------------------------

def parse_disbursement(const unsigned char[::1] data not None, const int64_t[::1] starts not None,
                       bytes pan_key not None, bytes person_key not None, bytes file_key not None,
                       bytes name_key, uint8_t[::1] status not None, cnp.ndarray requests not None,
                       int64_t[::1] row_line not None, uint8_t[::1] by_person not None,
                       uint64_t[::1] name_hash not None) -> int:
    """Check every line; write a CREDIT_FIN request for each good one: pan_hash (a PAN) or
    person_hash (a 社会保障号码), amount_fen, idem_key = key of (batch_no, line), content_hash =
    key of (id, amount_fen, purpose) — both SipHash(file_key) of the fields' exact bytes joined
    by 0x1f, 63 bits. by_person[k] says which id row k has; with `name_key`, name_hash[k] is the
    keyed hash of its name. Returns the number of good rows."""
    cdef Py_ssize_t lines = starts.shape[0] - 1, i, k = 0
    assert status.shape[0] >= lines and requests.shape[0] >= lines and row_line.shape[0] >= lines
    assert by_person.shape[0] >= lines
    assert requests.dtype.itemsize == sizeof(Request) and requests.flags.c_contiguous
    assert name_key is None or name_hash.shape[0] >= lines
    cdef uint64_t pk0 = key_of(pan_key), pk1 = int.from_bytes(pan_key[8:], "little")
    cdef uint64_t qk0 = key_of(person_key), qk1 = int.from_bytes(person_key[8:], "little")
    cdef uint64_t fk0 = key_of(file_key), fk1 = int.from_bytes(file_key[8:], "little")
    cdef bint names = name_key is not None
    cdef uint64_t nk0 = key_of(name_key) if names else 0
    cdef uint64_t nk1 = int.from_bytes(name_key[8:], "little") if names else 0
    cdef const unsigned char* base = &data[0] if data.shape[0] else NULL
    cdef Request* out = <Request*>cnp.PyArray_DATA(requests)
    cdef Field f[FIELDS_MAX]
    cdef unsigned char cid[18]
    cdef unsigned char buf[96]               # the joined key text (fields bounded below)
    cdef Py_ssize_t m
    cdef int64_t a
    cdef int nf, st
    cdef Request* q
    with nogil:
        for i in range(lines):
            a = starts[i]
            nf = split_fields(base + a, starts[i + 1] - 1 - a, f)
            if nf != 6:
                status[i] = ST_FIELDS
                continue
            if f[0].n == 0 or f[0].n > 32 or f[1].n < 1 or f[1].n > LINE_FIELD_MAX or not all_digits(f[1].p, f[1].n):
                status[i] = ST_BATCH_LINE
                continue
            if not (same(f[5], b"pension", 7) or same(f[5], b"unemployment", 12)
                    or same(f[5], b"maternity", 9) or same(f[5], b"subsidy", 7)):
                status[i] = ST_PURPOSE
                continue
            if not amount_ok(f[4]):
                status[i] = ST_AMOUNT
                continue
            if f[2].n == 18:
                st = cid_status(f[2], cid)
                if st:
                    status[i] = ST_ID_CID_FORM if st == 1 else ST_ID_CID_CHECK
                    continue
            elif not (pan_digits_ok(f[2]) and luhn_ok(f[2].p, f[2].n)):
                status[i] = ST_ID_PAN
                continue
            status[i] = ST_OK
            q = &out[k]
            request_init(q, CMD_CREDIT_FIN)
            if f[2].n == 18:
                q.person_hash = siphash24(qk0, qk1, cid, 18)
                by_person[k] = 1
            else:
                q.pan_hash = siphash24(pk0, pk1, f[2].p, f[2].n)
                by_person[k] = 0
            q.amount_fen = digits_value(f[4].p, f[4].n)
            # idem_key: "daifa" 0x1f batch_no 0x1f line (≤ 5 + 1 + 32 + 1 + 9 bytes)
            memcpy(buf, b"daifa\x1f", 6)
            memcpy(buf + 6, f[0].p, f[0].n)
            m = 6 + f[0].n
            buf[m] = 0x1f
            memcpy(buf + m + 1, f[1].p, f[1].n)
            m += 1 + f[1].n
            q.idem_key = key63(siphash24(fk0, fk1, buf, m))
            # content_hash: id 0x1f amount_fen 0x1f purpose (≤ 19 + 1 + 12 + 1 + 12 bytes)
            memcpy(buf, f[2].p, f[2].n)
            m = f[2].n
            buf[m] = 0x1f
            memcpy(buf + m + 1, f[4].p, f[4].n)
            m += 1 + f[4].n
            buf[m] = 0x1f
            memcpy(buf + m + 1, f[5].p, f[5].n)
            m += 1 + f[5].n
            q.content_hash = key63(siphash24(fk0, fk1, buf, m))
            if names:
                name_hash[k] = siphash24(nk0, nk1, f[3].p, f[3].n)
            row_line[k] = i
            k += 1
    return k


def result_lines(const unsigned char[::1] data not None, const int64_t[::1] starts not None,
                 const int64_t[::1] line_index not None, const int64_t[::1] amounts not None,
                 const uint8_t[::1] reason_index not None, list reasons not None) -> bytes:
    """回盘 rows of lines that reached the engine, as CSV (\\r\\n, like Python's csv module):
    batch_no, line (from the file), amount_fen, then reasons[reason_index[k]] — the ready
    "result,reason" text (index 0 is b"success,"). batch_no and line are quoted when they hold
    a double quote (they hold no comma: the line had the right number of fields)."""
    cdef Py_ssize_t n = line_index.shape[0], i, j, w = 0, longest = 0, cap = 0
    cdef list texts = [bytes(r) for r in reasons]
    cdef Py_ssize_t ntexts = len(texts)
    assert 0 < ntexts <= 256 and amounts.shape[0] >= n and reason_index.shape[0] >= n
    cdef const unsigned char* tp[256]
    cdef Py_ssize_t tn[256]
    for j in range(ntexts):
        tp[j] = <const unsigned char*><char*>texts[j]
        tn[j] = len(texts[j])
        longest = max(longest, tn[j])
    cdef const unsigned char* base = &data[0] if data.shape[0] else NULL
    for i in range(n):
        assert reason_index[i] < ntexts
    with nogil:
        for i in range(n):
            cap += 2 * (starts[line_index[i] + 1] - starts[line_index[i]]) + 30 + longest
    cdef bytearray out = bytearray(cap)
    cdef unsigned char* o = <unsigned char*>(<char*>out)
    cdef Field f[FIELDS_MAX]
    cdef int64_t a, v
    cdef unsigned char digits[24]
    cdef int d, t
    with nogil:
        for i in range(n):
            a = starts[line_index[i]]
            split_fields(base + a, starts[line_index[i] + 1] - 1 - a, f)
            for t in range(2):
                if memchr(f[t].p, 34, f[t].n) == NULL:
                    memcpy(o + w, f[t].p, f[t].n)
                    w += f[t].n
                else:
                    o[w] = 34
                    w += 1
                    for j in range(f[t].n):
                        o[w] = f[t].p[j]
                        w += 1
                        if f[t].p[j] == 34:
                            o[w] = 34
                            w += 1
                    o[w] = 34
                    w += 1
                o[w] = 44
                w += 1
            v = amounts[i]
            d = 0
            while True:
                digits[d] = 48 + <unsigned char>(v % 10)
                d += 1
                v //= 10
                if v == 0:
                    break
            while d:
                d -= 1
                o[w] = digits[d]
                w += 1
            o[w] = 44
            w += 1
            memcpy(o + w, tp[reason_index[i]], tn[reason_index[i]])
            w += tn[reason_index[i]]
            o[w] = 13
            o[w + 1] = 10
            w += 2
    del out[w:]
    return bytes(out)
