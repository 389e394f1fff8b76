# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The 对总账 scan: one pass over the journal's fixed records (nogil) that sums the medical
settlements of a date range into a few dozen groups (card's insurance type × card's insured
region × local / cross-region), for ledger/jobs.py to hand to DuckDB.

Why not SQL over the whole journal: flattening 304-byte records into Arrow columns and joining
them costs ≈ 0.7 µs a record; this loop reads each record once where it lies (≈ 30 ns, bound by
memory bandwidth). The relational work on the result (ordering, casts, the join with the
counterpart's file) stays SQL.

Exactness. The scan gives byte-for-byte the answer of `sql/settlements.sql` + `sql/totals.sql`
over `jobs.flatten`, on every journal the engine writes. It resolves the card's insured region and
insurance type as it goes (the ISSUE / REPLACE record precedes every use of its slot) and the
original of a reversal by RRN (RRNs increase through the journal, the original precedes its
posted reversal). Where a journal breaks one of those orders (a slot used before it was issued,
issued twice, an RRN out of order, a reversal ahead of its original, more than GROUPS_MAX
groups) the SQL answer could differ, so the scan stops and says why (`fallback_reason`), and the
caller runs the SQL path instead: never a wrong total, at worst a slow one.
"""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memset

import numpy as np
cimport numpy as cnp

from yikatong.engine._core cimport Request, Result

cnp.import_array()

from yikatong.ledger.records import RECORD_DTYPE

# The journal record (ledger/records.py RECORD_DTYPE), asserted against the dtype at import.
ctypedef struct JournalRecord:
    uint64_t seq
    uint16_t layout_version
    uint16_t record_kind
    uint32_t business_date
    Request request
    Result result

cdef extern from *:
    """
    #define YK_PREFETCH(address) __builtin_prefetch((const void*)(address), 0, 3)
    """
    void YK_PREFETCH(const void* address) nogil

cdef enum:
    KIND_COMMAND = 1
    CMD_MED_SETTLE = 5
    CMD_MED_CANCEL = 6
    CMD_REVERSAL = 11
    CMD_ISSUE = 32
    CMD_REPLACE = 38
    RES_POSTED = 1
    RES_DUPLICATE = 2
    CODE_APPROVED = 0x3030          # "00" as the two ASCII bytes, read little-endian
    GROUPS_MAX = 4096               # (insured region, insurance type) pairs; × 2 clearing types
    GROUP_HASH_SIZE = 8192          # open addressing, load ≤ 1/2
    SUMS = 5                        # medical total, fund, insurance accounts, financial, count

PREFETCH_BYTES_DEFAULT = 8192

# fallback reasons (0 = the scan's answer is exact)
FALLBACK_REASONS = {
    1: "a card slot out of range",
    2: "a card slot issued twice or replaced onto an existing slot",
    3: "a settlement on a slot not yet issued (or a replacement from one)",
    4: "RRNs not increasing through the journal",
    5: "a posted reversal ahead of its original",
    6: "more than 4096 (insured region, insurance type) groups",
    7: "a card slot re-issued after it was used",
    8: "RRNs spread wider than the journal's record count",
}

cdef struct Scan:
    int32_t* slot_group        # per card slot: 0 unissued, g + 1 issued, −(g + 1) issued and used
    int64_t slot_count         # capacity of slot_group
    uint16_t* cmd_by_rrn       # per RRN − rrn_first: 0x100 | cmd of the record that has it, 0 none
    int64_t rrn_capacity
    uint64_t rrn_first         # 0 until the first RRN
    uint64_t rrn_last
    const int64_t* inst_region # treatment region per institution index
    int32_t inst_count
    int64_t* group_region      # per group g: insured region, insurance type
    int64_t* group_ins_type
    int32_t* group_hash        # g + 1 per hash bucket, 0 empty
    int32_t group_count
    int64_t* sums              # [(g * 2 + local) * SUMS + i]
    uint8_t* present           # [g * 2 + local]: a row landed in the group
    uint32_t date_from
    uint32_t date_to
    int fallback               # reason, 0 = exact so far
    int64_t prefetch_bytes     # how far ahead records are prefetched (0: not at all)


cdef inline int32_t group_of(Scan* s, int64_t region, int64_t ins_type) noexcept nogil:
    """Index of the (region, insurance type) group, new if unseen; −1 when full."""
    cdef uint64_t h = (<uint64_t>region * 0x9E3779B97F4A7C15ULL) ^ (<uint64_t>ins_type * 0xC2B2AE3D27D4EB4FULL)
    cdef uint32_t b = <uint32_t>(h >> 51) & (GROUP_HASH_SIZE - 1)
    cdef int32_t g
    while True:
        g = s.group_hash[b]
        if g == 0:
            break
        if s.group_region[g - 1] == region and s.group_ins_type[g - 1] == ins_type:
            return g - 1
        b = (b + 1) & (GROUP_HASH_SIZE - 1)
    if s.group_count == GROUPS_MAX:
        return -1
    g = s.group_count
    s.group_count += 1
    s.group_region[g] = region
    s.group_ins_type[g] = ins_type
    s.group_hash[b] = g + 1
    return g


cdef inline bint slot_ok(Scan* s, int64_t slot) noexcept nogil:
    if slot < 0 or slot >= s.slot_count:
        s.fallback = 1
        return False
    return True


cdef void scan_records(Scan* s, const JournalRecord* records, int64_t count) noexcept nogil:
    """Every record in order: the card dimension (as jobs.cards_from_journal), the RRN index of
    the originals (as settlements.sql `originals`), then the settlement sums (as totals.sql)."""
    cdef int64_t i, slot, new_slot, k, direction, legs, idx
    cdef int32_t g, inst
    cdef uint16_t orig
    cdef uint8_t flags, cmd
    cdef const JournalRecord* rec
    cdef const char* ahead
    cdef const Result* r
    cdef int64_t* acc
    for i in range(count):
        if s.fallback:
            return
        rec = &records[i]
        # past the end it is harmless: a prefetch never faults
        if s.prefetch_bytes:
            # the whole record (304 bytes: five 64-byte lines) that far ahead; measured at 3 M
            # records from LMDB, best of 6: none 26.0, its first line only 29.4, all five 34.5
            # M records/s
            ahead = <const char*>rec + s.prefetch_bytes
            YK_PREFETCH(ahead)
            YK_PREFETCH(ahead + 64)
            YK_PREFETCH(ahead + 128)
            YK_PREFETCH(ahead + 192)
            YK_PREFETCH(ahead + 256)
        r = &rec.result
        flags = r.outcome_flags
        cmd = r.cmd
        # cards: ISSUE creates a slot, REPLACE gives the new slot its old card's region and type
        # (every record kind, as cards_from_journal)
        if r.code == CODE_APPROVED and not (flags & RES_DUPLICATE):
            if cmd == CMD_ISSUE:
                slot = r.card_slot
                if not slot_ok(s, slot):
                    return
                if s.slot_group[slot] != 0:
                    s.fallback = 2 if s.slot_group[slot] > 0 else 7
                    return
                g = group_of(s, rec.request.region_code, rec.request.ins_type)
                if g < 0:
                    s.fallback = 6
                    return
                s.slot_group[slot] = g + 1
            elif cmd == CMD_REPLACE:
                slot = r.card_slot
                new_slot = r.other_slot
                if not slot_ok(s, slot) or not slot_ok(s, new_slot):
                    return
                if s.slot_group[slot] == 0:
                    s.fallback = 3
                    return
                if s.slot_group[new_slot] != 0:
                    s.fallback = 2 if s.slot_group[new_slot] > 0 else 7
                    return
                g = s.slot_group[slot]
                if g > 0:
                    s.slot_group[slot] = -g            # read: re-issuing it later changes history
                else:
                    g = -g
                s.slot_group[new_slot] = g
        if rec.record_kind != KIND_COMMAND or (flags & RES_DUPLICATE):
            continue
        # the originals of reversals, by RRN
        if r.rrn != 0:
            if s.rrn_first == 0:
                s.rrn_first = r.rrn
            elif r.rrn <= s.rrn_last:
                s.fallback = 4
                return
            idx = <int64_t>(r.rrn - s.rrn_first)
            if idx >= s.rrn_capacity:
                s.fallback = 8
                return
            s.cmd_by_rrn[idx] = 0x100 | cmd
            s.rrn_last = r.rrn
        # the settlements: posted, not a duplicate, in the date range
        if not (flags & RES_POSTED) or rec.business_date < s.date_from or rec.business_date > s.date_to:
            continue
        if cmd == CMD_MED_SETTLE:
            direction = 1
        elif cmd == CMD_MED_CANCEL:
            direction = -1
        elif cmd == CMD_REVERSAL:
            # counts when its original was a settlement or a cancel
            if r.orig_rrn == 0 or s.rrn_first == 0 or r.orig_rrn < s.rrn_first:
                continue
            if r.orig_rrn > s.rrn_last:
                s.fallback = 5
                return
            orig = s.cmd_by_rrn[<int64_t>(r.orig_rrn - s.rrn_first)]
            if orig != (0x100 | CMD_MED_SETTLE) and orig != (0x100 | CMD_MED_CANCEL):
                continue
            legs = r.fund_fen + r.ins_leg_fen + r.aid_leg_fen + r.fin_leg_fen + r.cash_fen
            direction = (legs > 0) - (legs < 0)
        else:
            continue
        inst = rec.request.institution_index
        if inst < 0 or inst >= s.inst_count:
            continue                                   # the SQL's inner join drops it
        slot = r.card_slot
        if not slot_ok(s, slot):
            return
        g = s.slot_group[slot]
        if g == 0:
            s.fallback = 3
            return
        if g > 0:
            s.slot_group[slot] = -g
        else:
            g = -g
        g -= 1
        k = g * 2 + (s.group_region[g] == s.inst_region[inst])
        acc = &s.sums[k * SUMS]
        acc[0] += r.amount_fen * direction
        acc[1] += r.fund_fen
        acc[2] += r.ins_leg_fen + r.aid_leg_fen
        acc[3] += r.fin_leg_fen
        acc[4] += direction
        s.present[k] = 1


cdef class TotalsScan:
    """One 对总账 over journal records fed in order (the whole array, or batch by batch straight
    from the journal's memory).

    >>> scan = TotalsScan(record_count, inst_region, 20261124, 20261124)
    >>> scan.feed(records); groups = scan.groups()     # None when scan.fallback_reason
    """
    cdef Scan s
    cdef cnp.ndarray slot_group, cmd_by_rrn, inst_region, group_region, group_ins_type, group_hash
    cdef cnp.ndarray sums, present

    def __init__(self, int64_t record_count, inst_region, uint32_t date_from, uint32_t date_to,
                 int64_t prefetch_bytes=PREFETCH_BYTES_DEFAULT):
        """`prefetch_bytes`: how far ahead of the record being summed its bytes are prefetched
        (0: not at all). Read from the LMDB map (4 KiB file pages, no transparent huge pages for
        the page cache), each page begins with a TLB walk and a demand miss: the hardware
        prefetcher stops at every 4 KiB boundary. Prefetching each record two pages ahead
        starts both early (bench/README.md, issue 7)."""
        # A journal of N records has fewer than N card slots and N RRNs (ISSUE / REPLACE and the
        # engine's RRN counter each advance at most once a record). Zeroed pages cost nothing
        # until touched.
        capacity = max(record_count, 1)
        self.slot_group = np.zeros(capacity, dtype=np.int32)
        self.cmd_by_rrn = np.zeros(capacity, dtype=np.uint16)
        self.inst_region = np.ascontiguousarray(inst_region, dtype=np.int64)
        self.group_region = np.zeros(GROUPS_MAX, dtype=np.int64)
        self.group_ins_type = np.zeros(GROUPS_MAX, dtype=np.int64)
        self.group_hash = np.zeros(GROUP_HASH_SIZE, dtype=np.int32)
        self.sums = np.zeros((GROUPS_MAX * 2, SUMS), dtype=np.int64)
        self.present = np.zeros(GROUPS_MAX * 2, dtype=np.uint8)
        memset(&self.s, 0, sizeof(Scan))
        self.s.slot_group = <int32_t*>cnp.PyArray_DATA(self.slot_group)
        self.s.slot_count = capacity
        self.s.cmd_by_rrn = <uint16_t*>cnp.PyArray_DATA(self.cmd_by_rrn)
        self.s.rrn_capacity = capacity
        self.s.inst_region = <const int64_t*>cnp.PyArray_DATA(self.inst_region)
        self.s.inst_count = <int32_t>self.inst_region.shape[0]
        self.s.group_region = <int64_t*>cnp.PyArray_DATA(self.group_region)
        self.s.group_ins_type = <int64_t*>cnp.PyArray_DATA(self.group_ins_type)
        self.s.group_hash = <int32_t*>cnp.PyArray_DATA(self.group_hash)
        self.s.sums = <int64_t*>cnp.PyArray_DATA(self.sums)
        self.s.present = <uint8_t*>cnp.PyArray_DATA(self.present)
        self.s.date_from = date_from
        self.s.date_to = date_to
        self.s.prefetch_bytes = prefetch_bytes

    def feed(self, const uint8_t[::1] record_bytes):
        """The next records, as raw bytes (a numpy RECORD_DTYPE array viewed as uint8, or a
        journal value straight from LMDB). The GIL is released for the whole call."""
        cdef Py_ssize_t size = record_bytes.shape[0]
        if size % sizeof(JournalRecord):
            raise ValueError(f"records: {size} bytes, not a multiple of the {sizeof(JournalRecord)}-byte record")
        if size == 0:
            return
        with nogil:
            scan_records(&self.s, <const JournalRecord*>&record_bytes[0], size // sizeof(JournalRecord))

    @property
    def fallback_reason(self):
        """Why the scan's answer could differ from the SQL's (None: it cannot)."""
        return FALLBACK_REASONS[self.s.fallback] if self.s.fallback else None

    def groups(self):
        """(ins_type, insured_region, local, sums[5]) arrays of the groups that got a row, or
        None after a fallback. sums: medical total, fund, insurance accounts, financial, count."""
        if self.s.fallback:
            return None
        keys = np.flatnonzero(self.present)
        g = keys // 2
        return (self.group_ins_type[g], self.group_region[g], (keys % 2).astype(bool), self.sums[keys])


cdef JournalRecord _probe
assert sizeof(JournalRecord) == RECORD_DTYPE.itemsize, (sizeof(JournalRecord), RECORD_DTYPE.itemsize)
for _name, _offset in (("record_kind", <char*>&_probe.record_kind - <char*>&_probe),
                       ("business_date", <char*>&_probe.business_date - <char*>&_probe),
                       ("request", <char*>&_probe.request - <char*>&_probe),
                       ("result", <char*>&_probe.result - <char*>&_probe)):
    assert RECORD_DTYPE.fields[_name][1] == _offset, (_name, RECORD_DTYPE.fields[_name][1], _offset)
