# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The engine core: card state, the batch apply loop, medical settlement arithmetic.

Owns the deterministic state machine. No I/O, no clocks: the business date is an argument, so
replaying the journal through `apply_batch` rebuilds byte-identical arrays (DESIGN.md §6.8).

Per batch, Python checks the arrays once and releases the GIL; per message, `apply_rows` runs
in C (`noexcept nogil`, no Python objects). Result codes are checked in the precedence order
written in docs/result-codes.md and in `apply_one` below.
"""
cimport cython
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, INT64_MAX
from libc.string cimport memcmp, memset, memcpy

import threading

import numpy as np
cimport numpy as cnp

cnp.import_array()

# The largest amount field 4 (n12) can carry; every money input is checked against it before any
# arithmetic, so that sums of a few of them and products with a ratio in basis points stay far
# inside int64 (10^12 · 10^4 = 10^16 < 9.2 · 10^18).
cdef extern from *:
    """
    #define AMOUNT_FEN_MAX 999999999999LL
    #define AMOUNT_FAST_BOUND (1ULL << 39)
    """
    const int64_t AMOUNT_FEN_MAX
    const uint64_t AMOUNT_FAST_BOUND   # a power of two below AMOUNT_FEN_MAX


# ---------------------------------------------------------------------------------------------
# Hashing: SipHash-2-4 (keyed; PAN and person hashes) and a 64-bit mixer (index positions)
# ---------------------------------------------------------------------------------------------

cdef inline uint64_t rotl(uint64_t x, int b) noexcept nogil:
    return (x << b) | (x >> (64 - b))


cdef uint64_t siphash24(uint64_t k0, uint64_t k1, const unsigned char* data, size_t length) noexcept nogil:
    """SipHash-2-4 (Aumasson & Bernstein), the reference algorithm with a 128-bit key."""
    cdef uint64_t v0 = k0 ^ 0x736f6d6570736575ULL
    cdef uint64_t v1 = k1 ^ 0x646f72616e646f6dULL
    cdef uint64_t v2 = k0 ^ 0x6c7967656e657261ULL
    cdef uint64_t v3 = k1 ^ 0x7465646279746573ULL
    cdef uint64_t m, b = (<uint64_t>length) << 56
    cdef size_t i, end = length - (length % 8)
    cdef int r, j
    for i in range(0, end, 8):
        m = 0
        for j in range(8):
            m |= (<uint64_t>data[i + j]) << (8 * j)
        v3 ^= m
        for r in range(2):
            v0 += v1; v1 = rotl(v1, 13); v1 ^= v0; v0 = rotl(v0, 32)
            v2 += v3; v3 = rotl(v3, 16); v3 ^= v2
            v0 += v3; v3 = rotl(v3, 21); v3 ^= v0
            v2 += v1; v1 = rotl(v1, 17); v1 ^= v2; v2 = rotl(v2, 32)
        v0 ^= m
    for j in range(<int>(length % 8)):
        b |= (<uint64_t>data[end + j]) << (8 * j)
    v3 ^= b
    for r in range(2):
        v0 += v1; v1 = rotl(v1, 13); v1 ^= v0; v0 = rotl(v0, 32)
        v2 += v3; v3 = rotl(v3, 16); v3 ^= v2
        v0 += v3; v3 = rotl(v3, 21); v3 ^= v0
        v2 += v1; v1 = rotl(v1, 17); v1 ^= v2; v2 = rotl(v2, 32)
    v0 ^= b
    v2 ^= 0xff
    for r in range(4):
        v0 += v1; v1 = rotl(v1, 13); v1 ^= v0; v0 = rotl(v0, 32)
        v2 += v3; v3 = rotl(v3, 16); v3 ^= v2
        v0 += v3; v3 = rotl(v3, 21); v3 ^= v0
        v2 += v1; v1 = rotl(v1, 17); v1 ^= v2; v2 = rotl(v2, 32)
    return v0 ^ v1 ^ v2 ^ v3




def siphash(bytes key16 not None, bytes data not None):
    """SipHash-2-4 of `data` under a 16-byte key, as an int.

    >>> hex(siphash(bytes(range(16)), b""))   # reference vector 0
    '0x726fdb47dd0e0e31'
    """
    if len(key16) != 16:
        raise ValueError(f"siphash key: {len(key16)} bytes, expecting 16")
    cdef uint64_t k0 = int.from_bytes(key16[:8], "little")
    cdef uint64_t k1 = int.from_bytes(key16[8:], "little")
    return siphash24(k0, k1, <const unsigned char*>(<char*>data), len(data))


# ---------------------------------------------------------------------------------------------
# Open-addressing indexes of int32 slots; the keys live in the columns they point at
# ---------------------------------------------------------------------------------------------

cdef inline int32_t card_index_find(const int32_t* table, uint64_t mask, const uint64_t* keys,
                                    size_t stride, uint64_t key) noexcept nogil:
    cdef uint64_t i = key & mask
    cdef int32_t slot
    while True:
        slot = table[i]
        if slot < 0:
            return -1
        if keys[slot * stride] == key:
            return slot
        i = (i + 1) & mask


cdef inline void card_index_set(int32_t* table, uint64_t mask, const uint64_t* keys,
                                size_t stride, uint64_t key, int32_t value) noexcept nogil:
    """Point `key` at `value`, replacing the slot it points at now if any."""
    cdef uint64_t i = key & mask
    cdef int32_t slot
    while True:
        slot = table[i]
        if slot < 0 or keys[slot * stride] == key:
            table[i] = value
            return
        i = (i + 1) & mask


cdef inline void card_index_delete(int32_t* table, uint64_t mask, const uint64_t* keys,
                                   size_t stride, uint64_t key) noexcept nogil:
    """Remove `key` by backward-shift deletion (no tombstones, so probes stay short)."""
    cdef uint64_t i = key & mask, j, home
    cdef int32_t slot
    while True:
        slot = table[i]
        if slot < 0:
            return
        if keys[slot * stride] == key:
            break
        i = (i + 1) & mask
    j = i
    while True:
        j = (j + 1) & mask
        slot = table[j]
        if slot < 0:
            break
        home = keys[slot * stride] & mask
        # the entry at j may move to the hole at i unless its home lies cyclically in (i, j]
        if ((j > i and (home <= i or home > j)) or (j < i and (home <= i and home > j))):
            table[i] = slot
            i = j
    table[i] = -1


cdef inline uint64_t bucket_of(const State* s, const Bucket* table, uint64_t key) noexcept nogil:
    """The bucket holding `key`, or the empty bucket where it would go (linear probing)."""
    cdef uint64_t i = key & s.txn_index_mask
    while table[i].pos >= 0 and table[i].key != key:
        i = (i + 1) & s.txn_index_mask
    return i


cdef inline int32_t txn_index_find(const State* s, int which, uint64_t key) noexcept nogil:
    cdef const Bucket* table = s.idem_index if which == 0 else s.rev_index
    return table[bucket_of(s, table, key)].pos


cdef inline void txn_index_set(State* s, int which, uint64_t key, int32_t value) noexcept nogil:
    cdef Bucket* table = s.idem_index if which == 0 else s.rev_index
    cdef uint64_t i = bucket_of(s, table, key)
    table[i].key = key
    table[i].pos = value


cdef inline void txn_index_delete(State* s, int which, uint64_t key, int32_t value) noexcept nogil:
    """Remove `key` if it points at ring position `value` (a newer entry may own the key now),
    by backward-shift deletion: no tombstones, so probe chains stay short."""
    cdef Bucket* table = s.idem_index if which == 0 else s.rev_index
    cdef uint64_t mask = s.txn_index_mask
    cdef uint64_t i = bucket_of(s, table, key), j, home
    if table[i].pos != value:
        return
    j = i
    while True:
        j = (j + 1) & mask
        if table[j].pos < 0:
            break
        home = table[j].key & mask
        # the entry at j may move to the hole at i unless its home lies cyclically in (i, j]
        if ((j > i and (home <= i or home > j)) or (j < i and (home <= i and home > j))):
            table[i] = table[j]
            i = j
    table[i].pos = -1
    table[i].key = 0


cdef inline uint64_t make_rev_key(int32_t terminal_index, uint32_t batch_no, uint32_t stan) noexcept nogil:
    # 41 + 42 + 11 + 60.2 (PROTOCOL.md §3.2); 42 is implied by the terminal (checked: 03).
    # The packing is exact (24 + 20 + 20 bits) and mix64 is a bijection, so distinct keys stay
    # distinct. Never 0: 0 means "no reversal key".
    cdef uint64_t k = mix64(((<uint64_t>(terminal_index + 1)) << 40)
                            | ((<uint64_t>(batch_no & 0xFFFFF)) << 20) | (stan & 0xFFFFF))
    return k if k != 0 else 1


# ---------------------------------------------------------------------------------------------
# Medical settlement arithmetic (DOMAIN.md §2)
# ---------------------------------------------------------------------------------------------

cdef inline int64_t imin(int64_t a, int64_t b) noexcept nogil:
    return a if a < b else b


cdef inline int64_t imax(int64_t a, int64_t b) noexcept nogil:
    return a if a > b else b


cdef inline int64_t band_fund_fen(const Policy* p, int64_t ded_fen, int64_t in_scope_fen,
                                  bint bands_sorted) noexcept nogil:
    """fund = Σ_k ratio_k × |[lower_k, upper_k] ∩ [ded, IS]|, each band's part rounded half-up.
    `bands_sorted` (State.bands_sorted: upper ends never decrease): the bands above the claim add
    nothing, so the loop stops at the first that reaches in_scope_fen (the settlement fast path)."""
    cdef int64_t fund_fen = 0, lower_fen = 0, upper_fen, lo, hi
    cdef int k
    for k in range(p.band_count):
        upper_fen = p.band_upper_fen[k]
        lo = imax(lower_fen, ded_fen)
        hi = imin(upper_fen, in_scope_fen)
        if hi > lo:
            fund_fen += ((hi - lo) * <int64_t>p.band_ratio_bp[k] + 5000) // 10000
        if bands_sorted and upper_fen >= in_scope_fen:
            break
        lower_fen = upper_fen
    return fund_fen


cdef inline int visit_kind(uint8_t med_type) noexcept nogil:
    if med_type == 11:
        return 0
    if med_type == 14:
        return 1
    if med_type == 21:
        return 2
    if med_type == 41:
        return 3
    return -1


cdef inline bint accumulators_current(const State* s, int32_t slot) noexcept nogil:
    return s.side[slot].acc_year == s.batch_year


# ---------------------------------------------------------------------------------------------
# Gates: institution, card, PIN
# ---------------------------------------------------------------------------------------------

cdef inline bint permitted_at(uint8_t cmd, uint8_t kind) noexcept nogil:
    """Which institution kinds may send which commands (58 otherwise)."""
    if cmd == CMD_BALANCE:
        return True
    if cmd == CMD_PURCHASE or cmd == CMD_VOID or cmd == CMD_REFUND:
        return kind == INST_MERCHANT or kind == INST_PHARMACY or kind == INST_HOSPITAL
    if cmd == CMD_MED_SETTLE or cmd == CMD_MED_CANCEL or cmd == CMD_MED_PRESETTLE:
        return kind == INST_HOSPITAL or kind == INST_PHARMACY
    if cmd == CMD_DEPOSIT or cmd == CMD_WITHDRAW or cmd == CMD_TRANSFER:
        return kind == INST_BANK
    return True


cdef inline uint16_t card_gate(const State* s, int32_t slot, bint need_fin, uint32_t business_date) noexcept nogil:
    """Stolen 43, lost or replaced 41, cancelled or not activated 62, expired 54 — in that order."""
    cdef uint8_t st = s.cards[slot].status
    if s.cards[slot].card_flags & CF_STOLEN:
        return RC_43
    if st == CARD_LOST or st == CARD_REPLACED:
        return RC_41
    if st == CARD_TEMP_LOST and business_date <= s.temp_loss_until[slot]:
        return RC_41
    if st == CARD_CANCELLED or st == CARD_ISSUED or st == CARD_EMPTY:
        return RC_62
    if need_fin and not (s.cards[slot].card_flags & CF_FIN_ACTIVE):
        return RC_62
    if s.side[slot].expiry_yymm != 0 and s.side[slot].expiry_yymm < s.batch_yymm:
        return RC_54
    return 0


cdef inline bint card_usable(const State* s, int32_t slot, uint32_t business_date) noexcept nogil:
    return slot >= 0 and card_gate(s, slot, False, business_date) == 0


cdef inline int32_t live_slot(const State* s, int32_t slot) noexcept nogil:
    """Follow replacements: the old card of a 补换卡 points at its successor through payer_slot."""
    cdef int hops = 0
    while slot >= 0 and s.cards[slot].status == CARD_REPLACED and hops < 64:
        slot = s.side[slot].payer_slot
        hops += 1
    return slot


cdef inline uint16_t pin_gate(State* s, int32_t slot, const Request* q, Result* r,
                              bint social, bint required) noexcept nogil:
    """Verify the PIN of field 52 against the card's verification data.

    The one rejection that changes state: a wrong PIN counts toward the lock (ISO 9564 practice);
    a right one resets the count. Replay uses the outcome recorded live (REQ_PIN_REPLAY_*).
    """
    cdef uint8_t* tries = &s.cards[slot].tries_social if social else &s.cards[slot].tries_bank
    cdef uint8_t tries_max = s.pin_tries_social_max if social else s.pin_tries_bank_max
    cdef uint32_t pvv = s.side[slot].pvv_social if social else s.pvv_bank[slot]
    cdef bint given = (q.flags & (REQ_PIN | REQ_PIN_REPLAY_OK | REQ_PIN_REPLAY_BAD)) != 0
    cdef bint right
    if not given:
        if not required:
            return 0
        return RC_75 if tries[0] >= tries_max else RC_55
    if tries[0] >= tries_max:
        return RC_75
    if q.flags & REQ_PIN_REPLAY_OK:
        right = True
    elif q.flags & REQ_PIN_REPLAY_BAD:
        right = False
    else:
        right = q.pin_pvv == pvv
    if right:
        r.pin_outcome = 1
        tries[0] = 0
        return 0
    r.pin_outcome = 2
    tries[0] += 1
    return RC_75 if tries[0] >= tries_max else RC_55


# ---------------------------------------------------------------------------------------------
# The transaction ring
# ---------------------------------------------------------------------------------------------

cdef enum:
    NO_BUCKET = -1


cdef inline void txn_make_room(State* s) noexcept nogil:
    """Bounded retention: free the ring entry the next transaction will take, forgetting the
    oldest. Done before a message's lookups, so the buckets they find stay valid for its insert."""
    cdef int32_t pos = <int32_t>((s.counters[0] + 1) & s.txn_mask)
    cdef Txn* t = &s.txns[pos]
    if t.rrn == 0:
        return
    if t.idem_key != 0:
        txn_index_delete(s, 0, t.idem_key, pos)
    if t.rev_key != 0:
        txn_index_delete(s, 1, t.rev_key, pos)
    t.rrn = 0


cdef Txn* txn_new(State* s, const Request* q, Result* r, int64_t idem_bucket, uint64_t rev_key,
                  int64_t rev_bucket) noexcept nogil:
    """Record a processed message in the ring (assigns its RRN) and in the indexes, at the
    buckets the lookups found (NO_BUCKET: not indexed).

    The entry is not cleared: txn_store_result writes its Result-shaped prefix whole at the end
    of the message, and the fields below are the rest. Until then the prefix holds the evicted
    entry's bytes; what could read it meanwhile — txn_by_rrn of this very RRN from the message
    itself — sees `cmd` (set here), never an original's command, and answers 25."""
    cdef uint64_t rrn = s.counters[0] + 1
    cdef int32_t pos = <int32_t>(rrn & s.txn_mask)
    cdef Txn* t = &s.txns[pos]
    s.counters[0] = rrn
    t.rrn = rrn
    t.cmd = q.cmd
    t.state = TXN_OPEN
    t.refunded_fen = 0
    t.idem_key = q.idem_key if idem_bucket != NO_BUCKET else 0
    t.content_hash = q.content_hash
    t.rev_key = 0
    t.stan = q.stan
    t.batch_no = q.batch_no
    if idem_bucket != NO_BUCKET:
        s.idem_index[idem_bucket].key = q.idem_key
        s.idem_index[idem_bucket].pos = pos
    if rev_bucket != NO_BUCKET:
        t.rev_key = rev_key
        s.rev_index[rev_bucket].key = rev_key
        s.rev_index[rev_bucket].pos = pos
    r.rrn = rrn
    return t


cdef inline void txn_store_result(Txn* t, const Result* r) noexcept nogil:
    """The answer, into the entry's Result-shaped prefix; `state` becomes TXN_OPEN (a Result's
    reserved0 is always 0)."""
    memcpy(t, r, TXN_RESULT_BYTES)


cdef inline void answer_from_txn(const Txn* t, Result* r, uint32_t bd, uint8_t cmd) noexcept nogil:
    """A repeat of a processed key gets the stored answer (PROTOCOL.md §3.2), no new effect:
    the stored Result, but under today's date and the repeat's command, no PIN checked, and
    the original's RRN as orig_rrn."""
    memcpy(r, t, TXN_RESULT_BYTES)
    r.orig_rrn = t.rrn
    r.business_date = bd
    r.cmd = cmd
    r.pin_outcome = 0
    r.reserved0 = 0
    r.outcome_flags = RES_DUPLICATE


cdef inline Txn* txn_by_rrn(State* s, uint64_t rrn) noexcept nogil:
    cdef Txn* t
    if rrn == 0 or rrn > s.counters[0]:
        return NULL
    t = &s.txns[rrn & s.txn_mask]
    return t if t.rrn == rrn else NULL


cdef void ring_preimage(State* s, const Txn* t) noexcept nogil:
    """Called before an entry already in the ring is changed in place (void, refund, cancel,
    reversal: never on the settlement fast path). While a checkpoint copies the ring and has not
    reached this entry yet, its current bytes go to the snapshot's log, to be put back into the
    copy (Core.ring_snapshot_end). Entries written since the snapshot's point were copied before
    they were overwritten (Core.ring_snapshot_ahead), so they need nothing."""
    cdef uint64_t pos
    if not s.snap.active:
        return
    pos = <uint64_t>(t - s.txns)
    if ((pos - s.snap.base_rrn) & s.txn_mask) < s.snap.copied:
        return
    if s.snap.log_count >= s.snap.log_capacity:
        s.snap.overflow = 1
        return
    memcpy(&s.snap.log[s.snap.log_count], t, sizeof(Txn))
    s.snap.log_pos[s.snap.log_count] = <int32_t>pos
    s.snap.log_count += 1


cdef void ring_copy_to(State* s, uint64_t upto) noexcept nogil:
    """Copy the snapshot's ring entries up to offset `upto` (capped at the ring's size)."""
    cdef uint64_t size = s.txn_mask + 1
    cdef uint64_t pos, run
    if upto > size:
        upto = size
    while s.snap.copied < upto:
        pos = (s.snap.base_rrn + s.snap.copied) & s.txn_mask
        run = upto - s.snap.copied
        if run > size - pos:
            run = size - pos                 # up to the ring's end, then from its start
        memcpy(&s.snap.dst[pos], &s.txns[pos], run * sizeof(Txn))
        s.snap.copied += run


cdef inline void ring_snapshot_ahead(State* s, uint64_t rows) noexcept nogil:
    """Before `rows` messages are applied during a snapshot: every ring entry they may
    overwrite (or free: txn_make_room) copied first — at most one new RRN per message."""
    if s.snap.active:
        ring_copy_to(s, s.counters[0] + 1 - s.snap.base_rrn + rows)


cdef inline bint approved(uint16_t code) noexcept nogil:
    return code == RC_00 or code == RC_10


# ---------------------------------------------------------------------------------------------
# Posting and un-posting the legs of a medical settlement
# ---------------------------------------------------------------------------------------------

cdef inline bint settle_legs_fit(const State* s, int32_t slot, int32_t payer, const Txn* t) noexcept nogil:
    if s.cards[slot].ins_balance_fen < t.ins_leg_fen or s.cards[slot].fin_balance_fen < t.fin_leg_fen:
        return False
    if t.aid_leg_fen > 0 and (payer < 0 or s.cards[payer].ins_balance_fen < t.aid_leg_fen):
        return False
    return True


cdef void settle_post(State* s, int32_t slot, int32_t payer, const Txn* t, int sign) noexcept nogil:
    """sign = +1 posts the settlement `t` again (reversal of its cancel); -1 restores it exactly."""
    cdef int g = t.acc_group
    s.cards[slot].ins_balance_fen -= sign * t.ins_leg_fen
    s.cards[slot].fin_balance_fen -= sign * t.fin_leg_fen
    if t.aid_leg_fen != 0 and payer >= 0:
        s.cards[payer].ins_balance_fen -= sign * t.aid_leg_fen
    # Accumulators of another year were reset at New Year: nothing of this one is left to move.
    if s.side[slot].acc_year == t.business_date // 10000:
        s.cards[slot].fund_paid_fen[g] += sign * t.fund_fen
        if t.outcome_flags & RES_CUMULATIVE:
            s.cards[slot].ded_used_fen[g] += sign * t.deductible_fen
        if t.outcome_flags & RES_ADMISSION:
            s.side[slot].admissions[g] += sign


cdef inline void report_balances(const State* s, int32_t slot, Result* r) noexcept nogil:
    r.ins_balance_fen = s.cards[slot].ins_balance_fen
    r.fin_balance_fen = s.cards[slot].fin_balance_fen


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

cdef uint16_t cmd_medical(State* s, const Request* q, Result* r, int32_t slot, uint32_t bd,
                          bint post) noexcept nogil:
    cdef int vk = visit_kind(q.med_type)
    cdef int g = 1 if vk == 2 else 0
    cdef int16_t pid
    cdef const Policy* p
    cdef int64_t ded_fen = 0, fund_fen = 0, share_fen, ins_fen = 0, aid_fen = 0, fin_fen, cash_fen = 0
    cdef int64_t rest_fen, fin_avail_fen, ded_total_fen
    cdef int64_t ded_used = 0, fund_paid = 0
    cdef uint16_t admissions = 0
    cdef int32_t payer = -1
    cdef uint16_t code = RC_00
    cdef bint current = accumulators_current(s, slot)
    if current:
        ded_used = s.cards[slot].ded_used_fen[g]
        fund_paid = s.cards[slot].fund_paid_fen[g]
        admissions = s.side[slot].admissions[g]
    r.acc_group = g
    if q.flags & REQ_FP:
        # The platform computed the fund (FP): the local policy is skipped (PROTOCOL.md §3.1).
        fund_fen = q.fp_fen
    else:
        pid = s.policy_of[(((<int>s.cards[slot].region_index * s.ins_type_count + s.cards[slot].ins_type_index) * 2
                            + s.cards[slot].person_type) * VISIT_KINDS + vk) * LEVELS
                          + s.inst_level[q.institution_index]]
        if pid < 0:
            r.outcome_flags |= RES_NO_POLICY
            s.counters[1] += 1
            return RC_12
        p = &s.policies[pid]
        if p.per_admission:
            ded_total_fen = p.deductible_first_fen if admissions == 0 else p.deductible_later_fen
            ded_fen = imin(q.is_fen, ded_total_fen)
        else:
            ded_fen = imin(q.is_fen, imax(0, p.deductible_first_fen - ded_used))
        if p.fund_pays:
            fund_fen = band_fund_fen(p, ded_fen, q.is_fen, False)
            fund_fen = imin(fund_fen, imax(0, p.cap_fen - fund_paid))
        if p.per_admission:
            r.outcome_flags |= RES_ADMISSION
        elif ded_fen > 0:
            r.outcome_flags |= RES_CUMULATIVE
    # Patient share: the insurance account first, the family-aid payer next, then the bank.
    share_fen = q.amount_fen - fund_fen
    if q.flags & REQ_AU:
        ins_fen = imin(share_fen, s.cards[slot].ins_balance_fen)
        payer = live_slot(s, s.side[slot].payer_slot)
        if payer >= 0 and card_usable(s, payer, bd):
            aid_fen = imin(share_fen - ins_fen, s.cards[payer].ins_balance_fen)
            if s.limits_fen[LIMIT_FAMILY_AID] > 0:
                aid_fen = imin(aid_fen, s.limits_fen[LIMIT_FAMILY_AID])
        else:
            payer = -1
    rest_fen = share_fen - ins_fen - aid_fen
    fin_avail_fen = s.cards[slot].fin_balance_fen if (s.cards[slot].card_flags & CF_FIN_ACTIVE) else 0
    if rest_fen <= fin_avail_fen:
        fin_fen = rest_fen
    elif q.flags & REQ_PA:
        fin_fen = fin_avail_fen
        cash_fen = rest_fen - fin_fen
        code = RC_10
    else:
        r.outcome_flags &= ~(RES_ADMISSION | RES_CUMULATIVE)
        report_balances(s, slot, r)
        return RC_51
    r.amount_fen = q.amount_fen
    r.fund_fen = fund_fen
    r.deductible_fen = ded_fen
    r.ins_leg_fen = ins_fen
    r.aid_leg_fen = aid_fen
    r.fin_leg_fen = fin_fen
    r.cash_fen = cash_fen
    r.other_slot = payer if aid_fen > 0 else -1
    if not post:
        # Pre-settlement (83): the balances as they would be had it posted; nothing moves.
        r.outcome_flags &= ~(RES_ADMISSION | RES_CUMULATIVE)
        r.ins_balance_fen = s.cards[slot].ins_balance_fen - ins_fen
        r.fin_balance_fen = s.cards[slot].fin_balance_fen - fin_fen
        if aid_fen > 0:
            r.other_balance_fen = s.cards[payer].ins_balance_fen - aid_fen
        return code
    if not current:
        # New year: this card's accumulators start again from zero.
        s.cards[slot].ded_used_fen[0] = 0
        s.cards[slot].ded_used_fen[1] = 0
        s.cards[slot].fund_paid_fen[0] = 0
        s.cards[slot].fund_paid_fen[1] = 0
        s.side[slot].admissions[0] = 0
        s.side[slot].admissions[1] = 0
        s.side[slot].acc_year = s.batch_year
    s.cards[slot].ins_balance_fen -= ins_fen
    s.cards[slot].fin_balance_fen -= fin_fen
    if aid_fen > 0:
        s.cards[payer].ins_balance_fen -= aid_fen
        r.other_balance_fen = s.cards[payer].ins_balance_fen
    s.cards[slot].fund_paid_fen[g] += fund_fen
    if r.outcome_flags & RES_CUMULATIVE:
        s.cards[slot].ded_used_fen[g] += ded_fen
    if r.outcome_flags & RES_ADMISSION:
        s.side[slot].admissions[g] += 1
    r.outcome_flags |= RES_POSTED
    report_balances(s, slot, r)
    return code


cdef uint16_t cmd_undo(State* s, const Request* q, Result* r, int32_t slot, uint32_t bd) noexcept nogil:
    """Void (23) of a purchase, cancel (82) of a medical settlement, refund (25) of a purchase."""
    cdef Txn* o = txn_by_rrn(s, q.orig_rrn)
    cdef uint8_t want = CMD_MED_SETTLE if q.cmd == CMD_MED_CANCEL else CMD_PURCHASE
    cdef int32_t oslot, payer
    r.orig_rrn = q.orig_rrn
    if o == NULL or o.cmd != want or o.state == TXN_TOMBSTONE:
        return RC_25
    if (q.orig_stan != 0 and o.stan != q.orig_stan) or (q.orig_batch != 0 and o.batch_no != q.orig_batch):
        return RC_25
    oslot = live_slot(s, o.card_slot)
    if oslot != live_slot(s, slot):
        return RC_25
    if not approved(o.code) or o.state != TXN_OPEN:
        return RC_12
    ring_preimage(s, o)
    if q.cmd == CMD_REFUND:
        if q.amount_fen > o.amount_fen - o.refunded_fen:
            return RC_64
        o.refunded_fen += q.amount_fen
        s.cards[oslot].fin_balance_fen += q.amount_fen
        r.amount_fen = q.amount_fen
        r.fin_leg_fen = -q.amount_fen
    else:
        if q.amount_fen != o.amount_fen:
            return RC_64
        if q.cmd == CMD_VOID:
            if o.business_date != bd or o.refunded_fen != 0:
                return RC_12             # a void is same-day and whole (消费撤销)
            s.cards[oslot].fin_balance_fen += o.fin_leg_fen
            r.fin_leg_fen = -o.fin_leg_fen
        else:
            payer = live_slot(s, o.other_slot)
            settle_post(s, oslot, payer, o, -1)
            r.fund_fen = -o.fund_fen
            r.deductible_fen = -o.deductible_fen
            r.ins_leg_fen = -o.ins_leg_fen
            r.aid_leg_fen = -o.aid_leg_fen
            r.fin_leg_fen = -o.fin_leg_fen
            r.cash_fen = -o.cash_fen
            r.acc_group = o.acc_group
            r.other_slot = payer if o.aid_leg_fen != 0 else -1
            if r.other_slot >= 0:
                r.other_balance_fen = s.cards[payer].ins_balance_fen
        o.state = TXN_UNDONE
        r.amount_fen = o.amount_fen
    r.card_slot = oslot
    r.outcome_flags |= RES_POSTED
    report_balances(s, oslot, r)
    return RC_00


cdef uint16_t cmd_reversal(State* s, const Request* q, Result* r, uint32_t bd) noexcept nogil:
    """冲正: restore every leg and accumulator of the original exactly (PROTOCOL.md §3.2)."""
    cdef uint64_t rk = make_rev_key(q.terminal_index, q.batch_no, q.stan)
    cdef int32_t pos = txn_index_find(s, 1, rk)
    cdef Txn* o
    cdef Txn* inner
    cdef int32_t slot, other, payer
    cdef int64_t amount
    if pos < 0:
        r.outcome_flags |= RES_TOMBSTONE    # the original, if it ever comes, gets 25
        return RC_00
    o = &s.txns[pos]
    r.orig_rrn = o.rrn
    if o.state == TXN_TOMBSTONE or o.state == TXN_REVERSED:
        return RC_00
    if q.pan_hash != 0 and o.card_slot >= 0 and s.cards[o.card_slot].pan_hash != q.pan_hash:
        return RC_25
    ring_preimage(s, o)
    r.cmd = CMD_REVERSAL
    r.acc_group = o.acc_group
    if not approved(o.code):
        o.state = TXN_REVERSED              # a declined original moved nothing
        return RC_00
    slot = live_slot(s, o.card_slot)
    other = live_slot(s, o.other_slot)
    if o.cmd == CMD_PURCHASE or o.cmd == CMD_WITHDRAW:
        if o.state == TXN_OPEN:             # a voided purchase has no money left to return
            s.cards[slot].fin_balance_fen += o.fin_leg_fen - o.refunded_fen
            r.fin_leg_fen = -(o.fin_leg_fen - o.refunded_fen)
    elif o.cmd == CMD_DEPOSIT:
        if s.cards[slot].fin_balance_fen < -o.fin_leg_fen:
            report_balances(s, slot, r)
            return RC_51                    # the deposit was spent already: an operator's case
        s.cards[slot].fin_balance_fen += o.fin_leg_fen
        r.fin_leg_fen = -o.fin_leg_fen
    elif o.cmd == CMD_TRANSFER:
        if s.cards[other].fin_balance_fen < o.fin_leg_fen:
            report_balances(s, slot, r)
            return RC_51
        s.cards[other].fin_balance_fen -= o.fin_leg_fen
        s.cards[slot].fin_balance_fen += o.fin_leg_fen
        r.fin_leg_fen = -o.fin_leg_fen
        r.other_slot = other
        r.other_balance_fen = s.cards[other].fin_balance_fen
    elif o.cmd == CMD_MED_SETTLE:
        if o.state == TXN_OPEN:
            payer = live_slot(s, o.other_slot)
            settle_post(s, slot, payer, o, -1)
            r.fund_fen = -o.fund_fen
            r.deductible_fen = -o.deductible_fen
            r.ins_leg_fen = -o.ins_leg_fen
            r.aid_leg_fen = -o.aid_leg_fen
            r.fin_leg_fen = -o.fin_leg_fen
            r.cash_fen = -o.cash_fen
    elif o.cmd == CMD_VOID or o.cmd == CMD_MED_CANCEL:
        # Reversing an undo posts the original again, exactly, if it is still undone.
        inner = txn_by_rrn(s, o.orig_rrn)
        if inner != NULL and inner.state == TXN_UNDONE:
            if o.cmd == CMD_VOID:
                if s.cards[slot].fin_balance_fen < inner.fin_leg_fen:
                    report_balances(s, slot, r)
                    return RC_51
                s.cards[slot].fin_balance_fen -= inner.fin_leg_fen
                r.fin_leg_fen = inner.fin_leg_fen
            else:
                payer = live_slot(s, inner.other_slot)
                if not settle_legs_fit(s, slot, payer, inner):
                    report_balances(s, slot, r)
                    return RC_51
                settle_post(s, slot, payer, inner, 1)
                r.fund_fen = inner.fund_fen
                r.deductible_fen = inner.deductible_fen
                r.ins_leg_fen = inner.ins_leg_fen
                r.aid_leg_fen = inner.aid_leg_fen
                r.fin_leg_fen = inner.fin_leg_fen
                r.cash_fen = inner.cash_fen
            ring_preimage(s, inner)
            inner.state = TXN_OPEN
    o.state = TXN_REVERSED
    r.amount_fen = o.amount_fen
    r.card_slot = slot
    r.outcome_flags |= RES_POSTED
    report_balances(s, slot, r)
    return RC_00


cdef int16_t region_lookup(const State* s, uint32_t code) noexcept nogil:
    cdef int i
    for i in range(s.region_count):
        if s.region_codes[i] == code:
            return i
    return -1


cdef int16_t ins_type_lookup(const State* s, uint16_t code) noexcept nogil:
    cdef int i
    for i in range(s.ins_type_count):
        if s.ins_type_codes[i] == code:
            return i
    return -1


cdef uint16_t cmd_issue(State* s, const Request* q, Result* r) noexcept nogil:
    """制卡: a new card slot. 一人一卡: a person with a live card gets 57."""
    cdef int16_t region = region_lookup(s, q.region_code)
    cdef int16_t itype = ins_type_lookup(s, q.ins_type)
    cdef int32_t slot, live
    if q.pan_hash == 0 or q.person_hash == 0 or region < 0 or itype < 0 or (q.acct_type & 0x0F) > 1:
        return RC_12
    if q.med_type < CARD_ISSUED or q.med_type > CARD_CANCELLED or q.amount_fen < 0 or q.amount2_fen < 0:
        return RC_12
    if card_index_find(s.pan_index, s.pan_index_mask, &s.cards[0].pan_hash, PAN_STRIDE, q.pan_hash) >= 0:
        return RC_94
    live = card_index_find(s.person_index, s.person_index_mask, s.person_hash, 1, q.person_hash)
    if live >= 0 and s.cards[live].status != CARD_CANCELLED and s.cards[live].status != CARD_REPLACED:
        return RC_57
    if s.card_count >= s.card_capacity:
        return RC_96
    slot = <int32_t>s.card_count
    s.card_count += 1
    s.cards[slot].pan_hash = q.pan_hash
    s.person_hash[slot] = q.person_hash
    s.cards[slot].ins_balance_fen = q.amount_fen
    s.cards[slot].fin_balance_fen = q.amount2_fen
    s.cards[slot].region_index = <uint8_t>region
    s.cards[slot].ins_type_index = <uint8_t>itype
    s.cards[slot].person_type = q.acct_type & 0x0F
    s.cards[slot].card_flags = q.acct_type >> 4
    s.cards[slot].status = q.med_type
    s.pvv_bank[slot] = q.pin_pvv
    s.side[slot].pvv_social = q.pin_pvv_new
    s.side[slot].expiry_yymm = q.expiry_yymm
    s.side[slot].payer_slot = -1
    card_index_set(s.pan_index, s.pan_index_mask, &s.cards[0].pan_hash, PAN_STRIDE, q.pan_hash, slot)
    card_index_set(s.person_index, s.person_index_mask, s.person_hash, 1, q.person_hash, slot)
    r.card_slot = slot
    r.outcome_flags |= RES_POSTED
    report_balances(s, slot, r)
    return RC_00


cdef inline void family_unbind(State* s, int32_t slot) noexcept nogil:
    """The card pays no longer through its payer: one beneficiary fewer on the payer's live card
    (the count moves with the payer's card on a replacement, move_card)."""
    cdef int32_t bound = live_slot(s, s.side[slot].payer_slot)
    if bound >= 0 and s.cards[bound].aid_beneficiaries > 0:
        s.cards[bound].aid_beneficiaries -= 1
    s.side[slot].payer_slot = -1


cdef uint16_t cmd_family(State* s, const Request* q, Result* r, int32_t slot, uint32_t bd) noexcept nogil:
    """家庭共济: bind (or unbind) the payer whose insurance account pays after the card's own."""
    cdef int32_t payer
    cdef int32_t bound = live_slot(s, s.side[slot].payer_slot)     # the payer now, -1 none
    if q.cmd == CMD_FAMILY_UNBIND:
        family_unbind(s, slot)
        r.outcome_flags |= RES_POSTED
        return RC_00
    payer = card_index_find(s.pan_index, s.pan_index_mask, &s.cards[0].pan_hash, PAN_STRIDE, q.pan2_hash)
    if payer < 0:
        return RC_14
    if payer == slot or s.cards[payer].region_index != s.cards[slot].region_index:
        return RC_12                     # same region only; never oneself
    if not card_usable(s, payer, bd):
        return RC_57
    if payer != bound:
        if s.aid_beneficiaries_max > 0 and s.cards[payer].aid_beneficiaries >= s.aid_beneficiaries_max:
            return RC_65                 # this payer covers as many beneficiaries as allowed
        family_unbind(s, slot)
        s.cards[payer].aid_beneficiaries += 1
    s.side[slot].payer_slot = payer
    r.other_slot = payer
    r.outcome_flags |= RES_POSTED
    return RC_00


cdef inline int64_t days_from_civil(int64_t y, int64_t m, int64_t d) noexcept nogil:
    # Howard Hinnant's algorithm: days since 1970-01-01 of a proleptic Gregorian date
    cdef int64_t era, yoe, doy, doe
    y -= m <= 2
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


cdef inline uint32_t add_days(uint32_t yyyymmdd, int64_t days) noexcept nogil:
    cdef int64_t z = days_from_civil(yyyymmdd // 10000, (yyyymmdd // 100) % 100, yyyymmdd % 100) + days
    cdef int64_t era, doe, yoe, y, doy, mp, d, m
    z += 719468
    era = (z if z >= 0 else z - 146096) // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + (3 if mp < 10 else -9)
    y += m <= 2
    return <uint32_t>(y * 10000 + m * 100 + d)


cdef void move_card(State* s, int32_t old, int32_t new) noexcept nogil:
    """补换卡: everything the person owns moves to the new slot; the old one keeps a pointer."""
    s.cards[new].ins_balance_fen = s.cards[old].ins_balance_fen
    s.cards[new].fin_balance_fen = s.cards[old].fin_balance_fen
    s.cards[old].ins_balance_fen = 0
    s.cards[old].fin_balance_fen = 0
    memcpy(s.cards[new].ded_used_fen, s.cards[old].ded_used_fen, 2 * sizeof(int64_t))
    memcpy(s.cards[new].fund_paid_fen, s.cards[old].fund_paid_fen, 2 * sizeof(int64_t))
    memcpy(s.side[new].admissions, s.side[old].admissions, 2 * sizeof(uint16_t))
    s.side[new].acc_year = s.side[old].acc_year
    s.person_hash[new] = s.person_hash[old]
    s.cards[new].region_index = s.cards[old].region_index
    s.cards[new].ins_type_index = s.cards[old].ins_type_index
    s.cards[new].person_type = s.cards[old].person_type
    s.cards[new].card_flags = s.cards[old].card_flags & ~(CF_STOLEN | CF_SOCIAL_PIN)
    s.cards[new].aid_beneficiaries = s.cards[old].aid_beneficiaries   # its beneficiaries follow live_slot
    s.cards[old].aid_beneficiaries = 0
    s.side[new].expiry_yymm = s.side[old].expiry_yymm
    s.side[new].payer_slot = s.side[old].payer_slot
    s.cards[new].status = CARD_ACTIVE
    s.cards[old].status = CARD_REPLACED
    s.side[old].payer_slot = new               # the forward pointer live_slot follows
    card_index_set(s.person_index, s.person_index_mask, s.person_hash, 1, s.person_hash[new], new)


cdef uint16_t cmd_lifecycle(State* s, const Request* q, Result* r, int32_t slot, uint32_t bd) noexcept nogil:
    """Card lifecycle and money in (DOMAIN.md §1, §3). Each command checks the states it may
    leave from; the table test walks every state × command."""
    cdef uint8_t cmd = q.cmd
    cdef uint8_t st = s.cards[slot].status
    cdef int32_t other
    cdef uint16_t code
    cdef bint social = (q.acct_type & 1) == 0
    if st == CARD_CANCELLED:
        return RC_62
    if st == CARD_REPLACED:
        return RC_41
    if cmd == CMD_ACTIVATE_SOCIAL:
        if st != CARD_ISSUED:
            return RC_41 if st == CARD_LOST else RC_12
        s.cards[slot].status = CARD_ACTIVE
    elif cmd == CMD_ACTIVATE_FIN:
        if st == CARD_LOST or (st == CARD_TEMP_LOST and bd <= s.temp_loss_until[slot]):
            return RC_41
        if s.cards[slot].card_flags & CF_FIN_ACTIVE:
            return RC_12
        s.cards[slot].card_flags |= CF_FIN_ACTIVE
    elif cmd == CMD_TEMP_LOSS:
        if st == CARD_LOST:
            return RC_12
        s.cards[slot].status = CARD_TEMP_LOST
        s.temp_loss_until[slot] = add_days(bd, s.region_temp_loss_days[s.cards[slot].region_index])
    elif cmd == CMD_FORMAL_LOSS:
        s.cards[slot].status = CARD_LOST
        if q.med_type == 1:
            s.cards[slot].card_flags |= CF_STOLEN
    elif cmd == CMD_UNLOSS:
        if st != CARD_TEMP_LOST:
            return RC_12
        s.cards[slot].status = CARD_ACTIVE
    elif cmd == CMD_REPLACE:
        if q.pan2_hash == 0:
            return RC_12
        if card_index_find(s.pan_index, s.pan_index_mask, &s.cards[0].pan_hash, PAN_STRIDE, q.pan2_hash) >= 0:
            return RC_94
        if s.card_count >= s.card_capacity:
            return RC_96
        other = <int32_t>s.card_count
        s.card_count += 1
        s.cards[other].pan_hash = q.pan2_hash
        card_index_set(s.pan_index, s.pan_index_mask, &s.cards[0].pan_hash, PAN_STRIDE, q.pan2_hash, other)
        move_card(s, slot, other)
        s.pvv_bank[other] = q.pin_pvv
        s.side[other].pvv_social = q.pin_pvv_new
        r.other_slot = other
        r.other_balance_fen = s.cards[other].fin_balance_fen
    elif cmd == CMD_CANCEL_CARD:
        if s.cards[slot].ins_balance_fen != 0 or s.cards[slot].fin_balance_fen != 0:
            if q.pan2_hash == 0:
                return RC_12                 # a balance remains and nobody receives it
            other = live_slot(s, card_index_find(s.pan_index, s.pan_index_mask, &s.cards[0].pan_hash, PAN_STRIDE, q.pan2_hash))
            if other < 0:
                return RC_14
            if other == slot or card_gate(s, other, True, bd) != 0:
                return RC_57
            r.ins_leg_fen = s.cards[slot].ins_balance_fen
            r.fin_leg_fen = s.cards[slot].fin_balance_fen
            s.cards[other].ins_balance_fen += s.cards[slot].ins_balance_fen
            s.cards[other].fin_balance_fen += s.cards[slot].fin_balance_fen
            s.cards[slot].ins_balance_fen = 0
            s.cards[slot].fin_balance_fen = 0
            r.other_slot = other
            r.other_balance_fen = s.cards[other].fin_balance_fen
        family_unbind(s, slot)               # a cancelled card is nobody's beneficiary any more
        s.cards[slot].status = CARD_CANCELLED
        s.cards[slot].card_flags &= ~CF_FIN_ACTIVE
        card_index_delete(s.person_index, s.person_index_mask, s.person_hash, 1, s.person_hash[slot])
    elif cmd == CMD_PIN_CHANGE:
        code = pin_gate(s, slot, q, r, social, True)
        if code != 0:
            return code
        if social:
            s.side[slot].pvv_social = q.pin_pvv_new
            s.cards[slot].card_flags |= CF_SOCIAL_PIN     # changed from the initial value: enabled
        else:
            s.pvv_bank[slot] = q.pin_pvv_new
    elif cmd == CMD_PIN_RESET:
        if social:
            s.side[slot].pvv_social = q.pin_pvv_new
            s.cards[slot].tries_social = 0
            s.cards[slot].card_flags &= ~CF_SOCIAL_PIN    # back to an initial PIN: not enabled
        else:
            s.pvv_bank[slot] = q.pin_pvv_new
            s.cards[slot].tries_bank = 0
    elif cmd == CMD_PIN_UNLOCK:
        if social:
            s.cards[slot].tries_social = 0
        else:
            s.cards[slot].tries_bank = 0
    elif cmd == CMD_CREDIT_FIN:
        code = card_gate(s, slot, True, bd)
        if code != 0 and code != RC_54:             # an expired card still receives money
            return code
        s.cards[slot].fin_balance_fen += q.amount_fen
        r.amount_fen = q.amount_fen
        r.fin_leg_fen = -q.amount_fen
    elif cmd == CMD_CREDIT_INS:
        s.cards[slot].ins_balance_fen += q.amount_fen     # the account exists whatever the card's state
        r.amount_fen = q.amount_fen
        r.ins_leg_fen = -q.amount_fen
    else:
        return RC_12
    r.outcome_flags |= RES_POSTED
    report_balances(s, slot, r)
    return RC_00


cdef uint16_t apply_one(State* s, const Request* q, Result* r, uint32_t bd, uint64_t rev_key_hint) noexcept nogil:
    """One message. The checks run in this order (docs/result-codes.md); the first that fails
    answers, and only the PIN counters move before the last check passes."""
    cdef uint8_t cmd = q.cmd
    cdef int32_t slot = -1, pos, other
    cdef int32_t inst = q.institution_index
    cdef uint16_t code
    cdef Txn* t
    cdef uint64_t rev_key = 0
    cdef int64_t idem_bucket, rev_bucket
    cdef bint lifecycle = cmd >= CMD_ISSUE
    cdef bint social, need_fin, credit_back

    # 1. decided before the engine (format 30, MAC A0, not signed on 77, unregistered 97, PIN format 99)
    if q.pre_code != 0:
        return q.pre_code
    # 2. unknown command
    if cmd == 0 or cmd > CMD_CREDIT_INS or (cmd > CMD_REVERSAL and cmd < CMD_ISSUE):
        return RC_12
    if not lifecycle:
        # 3. terminal registered (97), 4. institution is the terminal's (03)
        if q.terminal_index < 0 or q.terminal_index >= s.term_count:
            return RC_97
        if inst < 0 or inst >= s.inst_count or s.term_inst[q.terminal_index] != inst:
            return RC_03
    # 5. amounts in range (13) before any arithmetic; the claim identity I1 and FP ≤ IS (13)
    # One test for the usual case: if the OR of all seven is below 2^39 (< AMOUNT_FEN_MAX) none
    # is negative or too large; otherwise the exact comparisons below decide.
    if (<uint64_t>(q.amount_fen | q.fo_fen | q.ol_fen | q.ps_fen | q.is_fen | q.fp_fen | q.amount2_fen)
            >= AMOUNT_FAST_BOUND) and (q.amount_fen < 0 or q.amount_fen > AMOUNT_FEN_MAX or q.fo_fen < 0 or q.fo_fen > AMOUNT_FEN_MAX
            or q.ol_fen < 0 or q.ol_fen > AMOUNT_FEN_MAX or q.ps_fen < 0 or q.ps_fen > AMOUNT_FEN_MAX
            or q.is_fen < 0 or q.is_fen > AMOUNT_FEN_MAX or q.fp_fen < 0 or q.fp_fen > AMOUNT_FEN_MAX
            or q.amount2_fen < 0 or q.amount2_fen > AMOUNT_FEN_MAX):
        return RC_13
    if cmd == CMD_MED_SETTLE or cmd == CMD_MED_PRESETTLE:
        if q.fo_fen + q.ol_fen + q.ps_fen + q.is_fen != q.amount_fen:
            return RC_13
        if (q.flags & REQ_FP) and q.fp_fen > q.is_fen:
            return RC_13
        if visit_kind(q.med_type) < 0:
            return RC_12
    # 6. permitted at this kind of institution (58); pharmacies settle visit type 41 only
    if not lifecycle:
        if not permitted_at(cmd, s.inst_kind[inst]):
            return RC_58
        if (cmd == CMD_MED_SETTLE or cmd == CMD_MED_PRESETTLE) and (
                (q.med_type == 41) != (s.inst_kind[inst] == INST_PHARMACY)):
            return RC_58
    # 7. idempotency: the same key answers what it answered (same content) or 94 (other content)
    idem_bucket = NO_BUCKET
    if q.idem_key != 0:
        idem_bucket = <int64_t>bucket_of(s, s.idem_index, q.idem_key)
        pos = s.idem_index[idem_bucket].pos
        if pos >= 0:
            t = &s.txns[pos]
            if t.content_hash != q.content_hash:
                return RC_94
            answer_from_txn(t, r, bd, q.cmd)
            return r.code
    if lifecycle and q.idem_key == 0:
        t = NULL
    else:
        # 8. a reversal came first for this key: the original is declined (25), no effect
        rev_bucket = NO_BUCKET
        if reversible(cmd):
            # the prefetch pass computed it rows ago (0: it did not)
            rev_key = rev_key_hint if rev_key_hint != 0 else make_rev_key(q.terminal_index, q.batch_no, q.stan)
            rev_bucket = <int64_t>bucket_of(s, s.rev_index, rev_key)
            pos = s.rev_index[rev_bucket].pos
            if pos >= 0 and s.txns[pos].state == TXN_TOMBSTONE:
                t = txn_new(s, q, r, idem_bucket, 0, NO_BUCKET)
                r.code = RC_25
                txn_store_result(t, r)
                return RC_25
        t = txn_new(s, q, r, idem_bucket, rev_key, rev_bucket)
    code = apply_checked(s, q, r, bd)
    r.code = code
    if t != NULL:
        if approved(code):
            r.auth_code = <uint32_t>(t.rrn % 1000000)
            if r.auth_code == 0:
                r.auth_code = 1
        txn_store_result(t, r)
        if cmd == CMD_REVERSAL and (r.outcome_flags & RES_TOMBSTONE):
            # after the store, which sets the state byte
            t.rev_key = make_rev_key(q.terminal_index, q.batch_no, q.stan)
            t.state = TXN_TOMBSTONE
            txn_index_set(s, 1, t.rev_key, <int32_t>(t.rrn & s.txn_mask))   # rare: probe again
    return code


cdef inline uint16_t settle_checked(State* s, const Request* q, Result* r, uint32_t bd) noexcept nogil:
    """apply_checked's steps for a medical settlement (81), the bulk of the traffic, without
    the tests for other commands: the same checks in the same order."""
    cdef int32_t slot = card_index_find(s.pan_index, s.pan_index_mask, &s.cards[0].pan_hash, PAN_STRIDE, q.pan_hash)
    cdef uint16_t code
    if slot < 0:
        return RC_14
    r.card_slot = slot
    report_balances(s, slot, r)
    code = card_gate(s, slot, False, bd)
    if code != 0:
        return code
    code = pin_gate(s, slot, q, r, True, (s.cards[slot].card_flags & CF_SOCIAL_PIN) != 0)
    if code != 0:
        return code
    if q.amount_fen > 0 and s.limits_fen[CMD_MED_SETTLE] > 0 and q.amount_fen > s.limits_fen[CMD_MED_SETTLE]:
        return RC_61
    return cmd_medical(s, q, r, slot, bd, True)


cdef uint16_t apply_checked(State* s, const Request* q, Result* r, uint32_t bd) noexcept nogil:
    """Steps 9 onward: card, PIN, original, policy, limits, funds."""
    cdef uint8_t cmd = q.cmd
    cdef int32_t slot, other
    cdef uint16_t code
    cdef bint social, credit_back
    if cmd == CMD_MED_SETTLE:
        return settle_checked(s, q, r, bd)
    if cmd == CMD_ISSUE:
        return cmd_issue(s, q, r)
    if cmd == CMD_REVERSAL:
        return cmd_reversal(s, q, r, bd)
    # 9. the card: unknown 14, then card_gate's order (43, 41, 62, 54)
    if q.pan_hash == 0 and q.person_hash != 0 and (cmd == CMD_CREDIT_FIN or cmd == CMD_CREDIT_INS):
        slot = card_index_find(s.person_index, s.person_index_mask, s.person_hash, 1, q.person_hash)
    else:
        slot = card_index_find(s.pan_index, s.pan_index_mask, &s.cards[0].pan_hash, PAN_STRIDE, q.pan_hash)
    if slot < 0:
        return RC_14
    r.card_slot = slot
    report_balances(s, slot, r)
    if cmd > CMD_ISSUE and cmd != CMD_FAMILY_BIND and cmd != CMD_FAMILY_UNBIND:
        return cmd_lifecycle(s, q, r, slot, bd)
    credit_back = cmd == CMD_VOID or cmd == CMD_REFUND or cmd == CMD_MED_CANCEL
    if credit_back:
        # Money goes back to where it came from even after a loss or a replacement.
        if s.cards[live_slot(s, slot)].status == CARD_CANCELLED:
            return RC_62
    else:
        code = card_gate(s, slot, not (cmd == CMD_MED_SETTLE or cmd == CMD_MED_PRESETTLE
                                       or cmd == CMD_FAMILY_BIND or cmd == CMD_FAMILY_UNBIND
                                       or cmd == CMD_BALANCE), bd)
        if code != 0:
            return code
    if cmd == CMD_FAMILY_BIND or cmd == CMD_FAMILY_UNBIND:
        return cmd_family(s, q, r, slot, bd)
    # 10. PIN: social PIN for medical commands when enabled, bank PIN where §3.5 requires it
    social = cmd == CMD_MED_SETTLE or cmd == CMD_MED_PRESETTLE or cmd == CMD_MED_CANCEL
    code = pin_gate(s, slot, q, r, social,
                    (s.cards[slot].card_flags & CF_SOCIAL_PIN) != 0 if social and cmd != CMD_MED_CANCEL
                    else (cmd == CMD_BALANCE or cmd == CMD_PURCHASE or cmd == CMD_WITHDRAW
                          or cmd == CMD_TRANSFER))
    if code != 0:
        return code
    # 11.–15. per command: the original (25, 12, 64), policy (12), limits (61), funds (51)
    if q.amount_fen > 0 and s.limits_fen[cmd] > 0 and q.amount_fen > s.limits_fen[cmd]:
        return RC_61
    if cmd == CMD_MED_SETTLE:
        return cmd_medical(s, q, r, slot, bd, True)
    if cmd == CMD_MED_PRESETTLE:
        return cmd_medical(s, q, r, slot, bd, False)
    if credit_back:
        return cmd_undo(s, q, r, slot, bd)
    if cmd == CMD_BALANCE:
        return RC_00
    if cmd == CMD_DEPOSIT:
        s.cards[slot].fin_balance_fen += q.amount_fen
        r.amount_fen = q.amount_fen
        r.fin_leg_fen = -q.amount_fen
    elif cmd == CMD_PURCHASE or cmd == CMD_WITHDRAW:
        if s.cards[slot].fin_balance_fen < q.amount_fen:
            return RC_51
        s.cards[slot].fin_balance_fen -= q.amount_fen
        r.amount_fen = q.amount_fen
        r.fin_leg_fen = q.amount_fen
    elif cmd == CMD_TRANSFER:
        other = card_index_find(s.pan_index, s.pan_index_mask, &s.cards[0].pan_hash, PAN_STRIDE, q.pan2_hash)
        if other < 0:
            return RC_14
        if other == slot:
            return RC_12
        if card_gate(s, other, True, bd) != 0:
            return RC_57
        if s.cards[slot].fin_balance_fen < q.amount_fen:
            return RC_51
        s.cards[slot].fin_balance_fen -= q.amount_fen
        s.cards[other].fin_balance_fen += q.amount_fen
        r.amount_fen = q.amount_fen
        r.fin_leg_fen = q.amount_fen
        r.other_slot = other
        r.other_balance_fen = s.cards[other].fin_balance_fen
    r.outcome_flags |= RES_POSTED
    report_balances(s, slot, r)
    return RC_00


cdef extern from *:
    # Not __builtin_prefetch: gcc's IPA pass finds the helpers below free of side effects (it
    # models prefetches as none) and deletes their calls before inlining them, so the binary had
    # no prefetch at all (objdump showed it; tests/unit/test_engine_annotation.py checks). A volatile asm
    # is a side effect the optimiser keeps.
    """
    static inline void yk_prefetch(const void* p) {
        __asm__ __volatile__("prefetcht0 %0" : : "m"(*(const char*)p));
    }
    /* for a line about to be written: fetched exclusive, so the store does not wait for
       ownership (a NOP on x86 cores without PREFETCHW) */
    static inline void yk_prefetch_write(const void* p) {
        __asm__ __volatile__("prefetchw %0" : : "m"(*(const char*)p));
    }
    """
    void prefetch "yk_prefetch" (const void* address) noexcept nogil
    void prefetch_write "yk_prefetch_write" (const void* address) noexcept nogil


cdef extern from *:
    # A Result cleared with eight 16-byte stores: gcc's memset of 128 bytes (vector_loop
    # strategy, setup.py) is a loop of ~27 instructions.
    """
    #include <emmintrin.h>
    static inline void yk_zero_result(void* p) {
        __m128i z = _mm_setzero_si128();
        __m128i* d = (__m128i*)p;
        _mm_storeu_si128(d + 0, z); _mm_storeu_si128(d + 1, z);
        _mm_storeu_si128(d + 2, z); _mm_storeu_si128(d + 3, z);
        _mm_storeu_si128(d + 4, z); _mm_storeu_si128(d + 5, z);
        _mm_storeu_si128(d + 6, z); _mm_storeu_si128(d + 7, z);
    }
    """
    void zero_result "yk_zero_result" (Result* r) noexcept nogil

# How far ahead the loop prefetches: index buckets PREFETCH_AHEAD rows ahead, the card's columns
# CARD_AHEAD rows ahead (by then its index bucket is in cache, so the slot can be read cheaply),
# the request rows twice PREFETCH_AHEAD ahead. Tuned with 100,000 cards (bench/README.md).
cdef enum:
    PREFETCH_AHEAD = 64
    CARD_AHEAD = 48
    CARD_PROBE_AHEAD = 24


cdef extern from *:
    # stream prefetch distances in rows (0: none), overridable with -D for experiments
    """
    #ifndef YK_REQ_AHEAD
    #define YK_REQ_AHEAD 128
    #endif
    #ifndef YK_RING_AHEAD
    #define YK_RING_AHEAD 128
    #endif
    #ifndef YK_RES_AHEAD
    #define YK_RES_AHEAD 64
    #endif
    #ifndef YK_CARD_PROBE
    #define YK_CARD_PROBE 1
    #endif
    _Static_assert(YK_REQ_AHEAD <= 128 && YK_RING_AHEAD <= 128 && YK_RES_AHEAD <= 128,
                   "prefetch distances beyond LOOKAHEAD_MAX (apply_rows' main loop)");
    """
    const Py_ssize_t REQ_AHEAD "YK_REQ_AHEAD"
    const uint64_t RING_AHEAD "YK_RING_AHEAD"
    const Py_ssize_t RES_AHEAD "YK_RES_AHEAD"
    const bint CARD_PROBE "YK_CARD_PROBE"


cdef enum:
    LOOKAHEAD_MAX = 128            # the farthest any prefetch looks (rows): ≥ REQ_AHEAD, 2·PREFETCH_AHEAD, RES_AHEAD

cdef enum:
    REV_KEYS = 128                 # ring of reversal keys computed by the prefetch pass (> PREFETCH_AHEAD)


cdef inline void prefetch_indexes(const State* s, const Request* q, uint64_t rev_key) noexcept nogil:
    prefetch(&s.idem_index[q.idem_key & s.txn_index_mask])
    prefetch(&s.rev_index[rev_key & s.txn_index_mask])
    prefetch(&s.pan_index[q.pan_hash & s.pan_index_mask])


cdef inline void prefetch_card(const State* s, const Request* q) noexcept nogil:
    cdef int32_t slot = s.pan_index[q.pan_hash & s.pan_index_mask]
    if slot >= 0:
        prefetch(&s.cards[slot])
        prefetch(&s.side[slot])         # year counters, expiry, payer, social PVV: one line


cdef inline void prefetch_card_probe(const State* s, const Request* q) noexcept nogil:
    """The card lines of the PAN index's second probe when the home slot holds another card
    (~19% of lookups at the index's load of 0.38): by CARD_PROBE_AHEAD rows ahead the home
    card's line, fetched by prefetch_card, is in cache, so its pan_hash can be compared."""
    cdef uint64_t i = q.pan_hash & s.pan_index_mask
    cdef int32_t slot = s.pan_index[i]
    if slot < 0 or s.cards[slot].pan_hash == q.pan_hash:
        return
    slot = s.pan_index[(i + 1) & s.pan_index_mask]
    if slot >= 0:
        prefetch(&s.cards[slot])
        prefetch(&s.side[slot])


cdef inline void prefetch_eviction(const State* s, uint64_t rrn) noexcept nogil:
    # the ring entry that txn number `rrn` will overwrite (all its lines: it is rewritten whole),
    # and the buckets of its keys
    cdef const Txn* t = &s.txns[rrn & s.txn_mask]
    # (its lines were fetched PREFETCH_AHEAD rows earlier by prefetch_ring: this read hits)
    if t.rrn != 0:
        prefetch(&s.idem_index[t.idem_key & s.txn_index_mask])
        if t.rev_key != 0:
            prefetch(&s.rev_index[t.rev_key & s.txn_index_mask])


cdef inline void prefetch_ring(const State* s, uint64_t rrn) noexcept nogil:
    # the lines of the ring entry that txn number `rrn` will rewrite whole, fetched for writing;
    # prefetch_eviction reads its keys PREFETCH_AHEAD rows later
    cdef const char* t = <const char*>&s.txns[rrn & s.txn_mask]
    prefetch_write(t)
    prefetch_write(t + 64)
    prefetch_write(t + 128)             # every line of the entry, whatever its alignment
    prefetch_write(t + sizeof(Txn) - 1)


cdef inline const Request* request_at(const char* rows, Py_ssize_t stride, Py_ssize_t i) noexcept nogil:
    return <const Request*>(rows + i * stride)


cdef inline void prefetch_start(State* s, const char* rows, Py_ssize_t stride, Py_ssize_t count,
                                uint64_t* rev_keys) noexcept nogil:
    """Before the first row: the first PREFETCH_AHEAD rows' buckets (the loop prefetches the rest)."""
    cdef Py_ssize_t j
    cdef const Request* q
    for j in range(min(<Py_ssize_t>PREFETCH_AHEAD, count)):
        q = request_at(rows, stride, j)
        rev_keys[j] = make_rev_key(q.terminal_index, q.batch_no, q.stan)
        prefetch_indexes(s, q, rev_keys[j])


cdef inline void prefetch_step(State* s, const char* rows, Py_ssize_t stride, Py_ssize_t i,
                               Py_ssize_t count, uint64_t* rev_keys, bint tail) noexcept nogil:
    """Row i+PREFETCH_AHEAD's index buckets (its reversal key computed here, once, and kept for
    apply_one) and the ring entry it will evict; row i+CARD_AHEAD's card lines; the request rows
    and the ring entry 2·PREFETCH_AHEAD ahead. tail = False (a constant where it is inlined):
    the caller knows i + LOOKAHEAD_MAX < count, so the bounds tests go."""
    cdef const Request* q
    cdef Py_ssize_t j = i + PREFETCH_AHEAD
    cdef const char* ahead
    if REQ_AHEAD > 0 and (not tail or i + REQ_AHEAD < count):
        # the request rows this step will read PREFETCH_AHEAD rows from now: a batch that is not
        # in cache (a replay, a bulk load) streams in ahead of the loop instead of stalling it
        ahead = rows + (i + REQ_AHEAD) * stride
        prefetch(ahead)
        prefetch(ahead + 64)
        prefetch(ahead + 128)           # a 160-byte row spans four lines when it starts at 48 mod 64
        prefetch(ahead + sizeof(Request) - 1)
    if RING_AHEAD > 0 and (not tail or j + PREFETCH_AHEAD < count):
        prefetch_ring(s, s.counters[0] + 1 + RING_AHEAD)
    if not tail or j < count:
        q = request_at(rows, stride, j)
        rev_keys[j & (REV_KEYS - 1)] = make_rev_key(q.terminal_index, q.batch_no, q.stan)
        prefetch_indexes(s, q, rev_keys[j & (REV_KEYS - 1)])
        prefetch_eviction(s, s.counters[0] + 1 + PREFETCH_AHEAD)
    if not tail or i + CARD_AHEAD < count:
        q = request_at(rows, stride, i + CARD_AHEAD)
        prefetch_card(s, q)
    if CARD_PROBE and (not tail or i + CARD_PROBE_AHEAD < count):
        prefetch_card_probe(s, request_at(rows, stride, i + CARD_PROBE_AHEAD))


cdef inline void set_batch_date(State* s, uint32_t business_date) noexcept nogil:
    s.batch_year = business_date // 10000
    s.batch_yymm = (business_date // 100) % 10000


cdef inline uint16_t apply_row_generic(State* s, const Request* q, Result* r, uint32_t business_date,
                                       uint64_t rev_key) noexcept nogil:
    """One row through the generic path: free the ring entry, a zeroed Result, apply_one."""
    txn_make_room(s)
    zero_result(r)
    r.card_slot = -1
    r.other_slot = -1
    r.cmd = q.cmd
    r.business_date = business_date
    r.code = apply_one(s, q, r, business_date, rev_key)
    return r.code


# ---------------------------------------------------------------------------------------------
# The settlement fast path
# ---------------------------------------------------------------------------------------------
#
# A medical settlement (81) is nearly all of the traffic, and nearly every one takes the same
# path through apply_one → settle_checked → cmd_medical: every check passes, no duplicate, no
# tombstone, an active card without a social PIN, a policy, no family-aid payer, and it posts
# (00, 10) or is declined for funds (51). settle_row runs that path alone, with no dispatch on
# the command and no zeroed Result rewritten field by field and copied into the ring: it checks
# everything first without changing anything, and when a row leaves the usual path (any other
# answer, a PIN, a payer, a duplicate...) it hands the row to the generic path, which then does
# all of it from the start — so the answers and the state are the generic path's, byte for byte
# (tests/property/test_engine_fast_path.py runs batches both ways and compares results and
# arrays). put_answer / put_entry write adjacent small fields with one 8-byte store (put8):
# they follow the field order of _core.pxd, which that test would catch if it changed.

cdef extern from *:
    # One 8-byte store for adjacent small fields (little-endian, as the SSE code above assumes);
    # gcc keeps the separate field stores otherwise.
    """
    static inline void yk_put8(void* p, uint64_t v) { memcpy(p, &v, 8); }
    """
    void put8 "yk_put8" (void* p, uint64_t v) noexcept nogil


cdef inline uint64_t tail_word(uint16_t code, uint8_t flags, uint8_t acc_group) noexcept nogil:
    """Bytes 112..119 of a settlement's Result (and ring entry): code, cmd, pin_outcome 0,
    outcome_flags, acc_group, then reserved0 (a ring entry's state TXN_OPEN and reserved0): 0."""
    return (<uint64_t>code | (<uint64_t>CMD_MED_SETTLE << 16) | (<uint64_t>flags << 32)
            | (<uint64_t>acc_group << 40))


cdef inline void put_prefix(Result* r, uint64_t rrn, int64_t amount_fen, int64_t fund_fen,
                            int64_t ded_fen, int64_t ins_fen, int64_t fin_fen, int64_t cash_fen,
                            int64_t ins_balance_fen, int64_t fin_balance_fen, int32_t slot,
                            uint32_t bd, uint32_t auth_code, uint16_t code, uint8_t flags,
                            uint8_t acc_group) noexcept nogil:
    """The first TXN_RESULT_BYTES of a settlement's Result, every field: a Result row's, or a
    ring entry's Result-shaped prefix (the same layout, layouts._check asserts it)."""
    r.rrn = rrn
    r.orig_rrn = 0
    r.amount_fen = amount_fen
    r.fund_fen = fund_fen
    r.deductible_fen = ded_fen
    r.ins_leg_fen = ins_fen
    r.aid_leg_fen = 0
    r.fin_leg_fen = fin_fen
    r.cash_fen = cash_fen
    r.ins_balance_fen = ins_balance_fen
    r.fin_balance_fen = fin_balance_fen
    r.other_balance_fen = 0
    put8(&r.card_slot, <uint32_t>slot | (<uint64_t>0xFFFFFFFFU << 32))        # other_slot -1
    put8(&r.business_date, bd | (<uint64_t>auth_code << 32))
    # code, outcome flags, acc_group, reserved0 (a ring entry's state: TXN_OPEN, 0)
    put8(&r.code, tail_word(code, flags, acc_group))


cdef inline void put_answer(Result* r, uint64_t rrn, int64_t amount_fen, int64_t fund_fen,
                            int64_t ded_fen, int64_t ins_fen, int64_t fin_fen, int64_t cash_fen,
                            int64_t ins_balance_fen, int64_t fin_balance_fen, int32_t slot,
                            uint32_t bd, uint32_t auth_code, uint16_t code, uint8_t flags,
                            uint8_t acc_group) noexcept nogil:
    """Every field of a settlement's Result (what apply_one leaves in a zeroed one)."""
    put_prefix(r, rrn, amount_fen, fund_fen, ded_fen, ins_fen, fin_fen, cash_fen, ins_balance_fen,
               fin_balance_fen, slot, bd, auth_code, code, flags, acc_group)
    r.reserved1 = 0


cdef inline void put_entry(Txn* t, const Request* q, uint64_t rrn, int64_t amount_fen,
                           int64_t fund_fen, int64_t ded_fen, int64_t ins_fen, int64_t fin_fen,
                           int64_t cash_fen, int64_t ins_balance_fen, int64_t fin_balance_fen,
                           int32_t slot, uint32_t bd, uint32_t auth_code, uint16_t code,
                           uint8_t flags, uint8_t acc_group, uint64_t rev_key) noexcept nogil:
    """The ring entry txn_new + txn_store_result leave for the same settlement, every field."""
    put_prefix(<Result*>t, rrn, amount_fen, fund_fen, ded_fen, ins_fen, fin_fen, cash_fen,
               ins_balance_fen, fin_balance_fen, slot, bd, auth_code, code, flags, acc_group)
    t.refunded_fen = 0
    t.idem_key = q.idem_key
    t.content_hash = q.content_hash
    t.rev_key = rev_key
    put8(&t.stan, q.stan | (<uint64_t>q.batch_no << 32))


cdef inline uint16_t settle_row(State* s, const Request* q, Result* r, uint32_t bd,
                                uint64_t rev_key_hint) noexcept nogil:
    """apply_row for a medical settlement (q.cmd == CMD_MED_SETTLE) on its usual path; any other
    case goes to apply_row_generic before anything but the eviction (which it repeats as a
    no-op) has changed."""
    cdef int32_t term = q.terminal_index, inst = q.institution_index, slot, pos
    cdef uint8_t kind, mt = q.med_type, qflags = q.flags
    cdef int vk, g
    cdef uint64_t idem_bucket = 0, rev_bucket, rev_key, rrn, mask
    cdef int16_t pid
    cdef const Policy* p
    cdef CardHot* c
    cdef CardSide* sd
    cdef Txn* t
    cdef bint current
    cdef int64_t ded_used = 0, fund_paid = 0, ded_fen = 0, fund_fen, share_fen, ins_fen = 0
    cdef int64_t rest_fen, fin_avail_fen, fin_fen = 0, cash_fen = 0, ins_bal, fin_bal
    cdef uint16_t admissions = 0, code = RC_00
    cdef uint8_t oflags = 0
    cdef uint32_t auth_code
    txn_make_room(s)
    # steps 1–6 of apply_one (pre-decided, terminal, institution, amounts, claim identity,
    # visit type, institution kind): all pass, or the generic path answers
    if q.pre_code != 0 or term < 0 or term >= s.term_count or inst < 0 or inst >= s.inst_count \
            or s.term_inst[term] != inst:
        return apply_row_generic(s, q, r, bd, rev_key_hint)
    if (<uint64_t>(q.amount_fen | q.fo_fen | q.ol_fen | q.ps_fen | q.is_fen | q.fp_fen | q.amount2_fen)
            >= AMOUNT_FAST_BOUND) or q.fo_fen + q.ol_fen + q.ps_fen + q.is_fen != q.amount_fen:
        return apply_row_generic(s, q, r, bd, rev_key_hint)
    if mt == 11:
        vk = 0
    elif mt == 21:
        vk = 2
    elif mt == 14:
        vk = 1
    elif mt == 41:
        vk = 3
    else:
        return apply_row_generic(s, q, r, bd, rev_key_hint)
    kind = s.inst_kind[inst]
    if (kind != INST_HOSPITAL and kind != INST_PHARMACY) or (mt == 41) != (kind == INST_PHARMACY):
        return apply_row_generic(s, q, r, bd, rev_key_hint)
    if (qflags & REQ_FP) and q.fp_fen > q.is_fen:
        return apply_row_generic(s, q, r, bd, rev_key_hint)
    # step 7 (no duplicate) and 8 (no reversal key of this (terminal, batch, stan) yet)
    mask = s.txn_index_mask
    if q.idem_key != 0:
        idem_bucket = q.idem_key & mask
        while s.idem_index[idem_bucket].pos >= 0:
            if s.idem_index[idem_bucket].key == q.idem_key:
                return apply_row_generic(s, q, r, bd, rev_key_hint)
            idem_bucket = (idem_bucket + 1) & mask
    rev_key = rev_key_hint if rev_key_hint != 0 else make_rev_key(term, q.batch_no, q.stan)
    rev_bucket = rev_key & mask
    while s.rev_index[rev_bucket].pos >= 0:
        if s.rev_index[rev_bucket].key == rev_key:
            return apply_row_generic(s, q, r, bd, rev_key_hint)
        rev_bucket = (rev_bucket + 1) & mask
    # settle_checked: a known card, card_gate passes for an active card, no PIN given or
    # required, within the limit
    slot = card_index_find(s.pan_index, s.pan_index_mask, &s.cards[0].pan_hash, PAN_STRIDE, q.pan_hash)
    if slot < 0:
        return apply_row_generic(s, q, r, bd, rev_key_hint)
    c = &s.cards[slot]
    sd = &s.side[slot]
    if c.status != CARD_ACTIVE or (c.card_flags & (CF_STOLEN | CF_SOCIAL_PIN)) \
            or (sd.expiry_yymm != 0 and sd.expiry_yymm < s.batch_yymm) \
            or (qflags & (REQ_PIN | REQ_PIN_REPLAY_OK | REQ_PIN_REPLAY_BAD)):
        return apply_row_generic(s, q, r, bd, rev_key_hint)
    if q.amount_fen > 0 and s.limits_fen[CMD_MED_SETTLE] > 0 and q.amount_fen > s.limits_fen[CMD_MED_SETTLE]:
        return apply_row_generic(s, q, r, bd, rev_key_hint)
    if (qflags & REQ_AU) and sd.payer_slot >= 0:
        return apply_row_generic(s, q, r, bd, rev_key_hint)
    # cmd_medical
    g = 1 if vk == 2 else 0
    current = sd.acc_year == s.batch_year
    if current:
        ded_used = c.ded_used_fen[g]
        fund_paid = c.fund_paid_fen[g]
        admissions = sd.admissions[g]
    if qflags & REQ_FP:
        fund_fen = q.fp_fen
    else:
        pid = s.policy_of[(((<int>c.region_index * s.ins_type_count + c.ins_type_index) * 2
                            + c.person_type) * VISIT_KINDS + vk) * LEVELS + s.inst_level[inst]]
        if pid < 0:
            return apply_row_generic(s, q, r, bd, rev_key_hint)
        p = &s.policies[pid]
        if p.per_admission:
            ded_fen = imin(q.is_fen, p.deductible_first_fen if admissions == 0 else p.deductible_later_fen)
            oflags = RES_ADMISSION
        else:
            ded_fen = imin(q.is_fen, imax(0, p.deductible_first_fen - ded_used))
            if ded_fen > 0:
                oflags = RES_CUMULATIVE
        fund_fen = 0
        if p.fund_pays:
            fund_fen = band_fund_fen(p, ded_fen, q.is_fen, s.bands_sorted)
            fund_fen = imin(fund_fen, imax(0, p.cap_fen - fund_paid))
    share_fen = q.amount_fen - fund_fen
    ins_bal = c.ins_balance_fen
    fin_bal = c.fin_balance_fen
    if qflags & REQ_AU:
        ins_fen = imin(share_fen, ins_bal)
    rest_fen = share_fen - ins_fen
    fin_avail_fen = fin_bal if (c.card_flags & CF_FIN_ACTIVE) else 0
    if rest_fen <= fin_avail_fen:
        fin_fen = rest_fen
    elif qflags & REQ_PA:
        fin_fen = fin_avail_fen
        cash_fen = rest_fen - fin_fen
        code = RC_10
    else:
        code = RC_51
    # commit: the ring entry and its index keys (txn_new), then the card, then the answer
    rrn = s.counters[0] + 1
    pos = <int32_t>(rrn & s.txn_mask)
    s.counters[0] = rrn
    s.fast_rows += 1
    if q.idem_key != 0:
        s.idem_index[idem_bucket].key = q.idem_key
        s.idem_index[idem_bucket].pos = pos
    s.rev_index[rev_bucket].key = rev_key
    s.rev_index[rev_bucket].pos = pos
    t = &s.txns[pos]
    if code == RC_51:
        put_answer(r, rrn, 0, 0, 0, 0, 0, 0, ins_bal, fin_bal, slot, bd, 0, RC_51, 0, <uint8_t>g)
        put_entry(t, q, rrn, 0, 0, 0, 0, 0, 0, ins_bal, fin_bal, slot, bd, 0, RC_51, 0, <uint8_t>g, rev_key)
        return RC_51
    if not current:
        # New year: this card's accumulators start again from zero.
        c.ded_used_fen[0] = 0
        c.ded_used_fen[1] = 0
        c.fund_paid_fen[0] = 0
        c.fund_paid_fen[1] = 0
        sd.admissions[0] = 0
        sd.admissions[1] = 0
        sd.acc_year = s.batch_year
    ins_bal -= ins_fen
    fin_bal -= fin_fen
    c.ins_balance_fen = ins_bal
    c.fin_balance_fen = fin_bal
    c.fund_paid_fen[g] += fund_fen
    if oflags & RES_CUMULATIVE:
        c.ded_used_fen[g] += ded_fen
    if oflags & RES_ADMISSION:
        sd.admissions[g] += 1
    oflags |= RES_POSTED
    auth_code = <uint32_t>(rrn % 1000000)
    if auth_code == 0:
        auth_code = 1
    put_answer(r, rrn, q.amount_fen, fund_fen, ded_fen, ins_fen, fin_fen, cash_fen, ins_bal, fin_bal,
               slot, bd, auth_code, code, oflags, <uint8_t>g)
    put_entry(t, q, rrn, q.amount_fen, fund_fen, ded_fen, ins_fen, fin_fen, cash_fen, ins_bal, fin_bal,
              slot, bd, auth_code, code, oflags, <uint8_t>g, rev_key)
    return code


cdef inline uint16_t apply_row(State* s, const Request* q, Result* r, uint32_t business_date,
                               uint64_t rev_key) noexcept nogil:
    """One row of a batch, as apply_rows and replay_rows both run it (so that a replay rebuilds
    byte-identical state): a settlement through settle_row, anything else (or a settlement
    when s.fast_settle is off: a test switch) through apply_row_generic."""
    if q.cmd == CMD_MED_SETTLE and s.fast_settle:
        return settle_row(s, q, r, business_date, rev_key)
    return apply_row_generic(s, q, r, business_date, rev_key)


cdef inline uint16_t apply_step(State* s, const Request* requests, Result* results, Py_ssize_t i,
                                Py_ssize_t count, uint32_t business_date, uint64_t* rev_keys,
                                bint tail) noexcept nogil:
    """Row i of apply_rows: the prefetches ahead of it, then the row. `tail` (a constant at each
    call, so inlined away): the last rows, whose look-ahead may run past the batch's end."""
    prefetch_step(s, <const char*>requests, sizeof(Request), i, count, rev_keys, tail)
    if RES_AHEAD > 0 and (not tail or i + RES_AHEAD < count):
        # the result row written RES_AHEAD rows from now: 128 bytes, two lines when the array
        # starts on a line, three when it does not (numpy's large arrays start at 16 mod 64)
        prefetch_write(&results[i + RES_AHEAD])
        prefetch_write(<const char*>&results[i + RES_AHEAD] + 64)
        prefetch_write(<const char*>&results[i + RES_AHEAD] + sizeof(Result) - 1)
    return apply_row(s, &requests[i], &results[i], business_date, rev_keys[i & (REV_KEYS - 1)])


cdef int apply_rows(State* s, const Request* requests, Result* results, Py_ssize_t count,
                    uint32_t business_date) noexcept nogil:
    """The hot loop: one row at a time, in order, no Python. Returns the number approved.

    The work per message is a handful of random memory reads (index buckets, card columns, the
    ring entry it evicts); prefetching them rows ahead lets the memory system fetch them in
    parallel instead of one miss at a time.
    """
    cdef Py_ssize_t i
    cdef int approved_count = 0
    cdef uint16_t code
    cdef uint64_t rev_keys[REV_KEYS]
    cdef const char* rows = <const char*>requests
    # rows before main_end look at most LOOKAHEAD_MAX rows ahead, all inside the batch: that
    # loop runs without the bounds tests; the last rows run with them
    cdef Py_ssize_t main_end = count - LOOKAHEAD_MAX if count > LOOKAHEAD_MAX else 0
    set_batch_date(s, business_date)
    prefetch_start(s, rows, sizeof(Request), count, rev_keys)
    for i in range(main_end):
        code = apply_step(s, requests, results, i, count, business_date, rev_keys, False)
        if code == RC_00 or code == RC_10:
            approved_count += 1
    for i in range(main_end, count):
        code = apply_step(s, requests, results, i, count, business_date, rev_keys, True)
        if code == RC_00 or code == RC_10:
            approved_count += 1
    return approved_count


# ---------------------------------------------------------------------------------------------
# Python face: the Engine owns the numpy arrays and checks each batch once
# ---------------------------------------------------------------------------------------------

def _offsets_request():
    cdef Request x
    cdef char* b = <char*>&x
    return sizeof(Request), {
        "pan_hash": <char*>&x.pan_hash - b, "idem_key": <char*>&x.idem_key - b,
        "amount_fen": <char*>&x.amount_fen - b, "fp_fen": <char*>&x.fp_fen - b,
        "pin_pvv": <char*>&x.pin_pvv - b, "terminal_index": <char*>&x.terminal_index - b,
        "region_code": <char*>&x.region_code - b, "local_date": <char*>&x.local_date - b,
        "pre_code": <char*>&x.pre_code - b, "expiry_yymm": <char*>&x.expiry_yymm - b,
        "cmd": <char*>&x.cmd - b, "acct_type": <char*>&x.acct_type - b,
    }


def _offsets_result():
    cdef Result x
    cdef char* b = <char*>&x
    return sizeof(Result), {
        "rrn": <char*>&x.rrn - b, "amount_fen": <char*>&x.amount_fen - b,
        "other_balance_fen": <char*>&x.other_balance_fen - b, "card_slot": <char*>&x.card_slot - b,
        "business_date": <char*>&x.business_date - b, "code": <char*>&x.code - b,
        "acc_group": <char*>&x.acc_group - b, "reserved1": <char*>&x.reserved1 - b,
    }


def _offsets_txn():
    cdef Txn x
    cdef char* b = <char*>&x
    return sizeof(Txn), {
        "rrn": <char*>&x.rrn - b, "other_balance_fen": <char*>&x.other_balance_fen - b,
        "card_slot": <char*>&x.card_slot - b, "auth_code": <char*>&x.auth_code - b,
        "code": <char*>&x.code - b, "acc_group": <char*>&x.acc_group - b, "state": <char*>&x.state - b,
        "refunded_fen": <char*>&x.refunded_fen - b, "rev_key": <char*>&x.rev_key - b,
        "batch_no": <char*>&x.batch_no - b,
    }, TXN_RESULT_BYTES


def _offsets_policy():
    cdef Policy x
    cdef char* b = <char*>&x
    return sizeof(Policy), {
        "band_upper_fen": <char*>&x.band_upper_fen - b, "band_ratio_bp": <char*>&x.band_ratio_bp - b,
        "band_count": <char*>&x.band_count - b, "fund_pays": <char*>&x.fund_pays - b,
    }


def _offsets_card_hot():
    cdef CardHot x
    cdef char* b = <char*>&x
    return sizeof(CardHot), {
        "ins_balance_fen": <char*>&x.ins_balance_fen - b, "ded_used_fen": <char*>&x.ded_used_fen - b,
        "fund_paid_fen": <char*>&x.fund_paid_fen - b, "status": <char*>&x.status - b,
        "tries_bank": <char*>&x.tries_bank - b,
    }


def _offsets_card_side():
    cdef CardSide x
    cdef char* b = <char*>&x
    return sizeof(CardSide), {"acc_year": <char*>&x.acc_year - b, "expiry_yymm": <char*>&x.expiry_yymm - b,
                              "payer_slot": <char*>&x.payer_slot - b, "pvv_social": <char*>&x.pvv_social - b}


cdef inline void* _ptr(cnp.ndarray a):
    return cnp.PyArray_DATA(a)


def aligned_copy(array):
    """A copy of `array` whose data starts on a 64-byte boundary (a cache line)."""
    raw = np.zeros(array.nbytes + 64, dtype=np.uint8)
    offset = (-raw.ctypes.data) % 64
    out = raw[offset:offset + array.nbytes].view(array.dtype)
    out[...] = array
    return out


cdef Py_ssize_t replay_rows(State* s, const char* rows, Py_ssize_t row_size_bytes,
                            Py_ssize_t request_offset, Py_ssize_t result_offset, Py_ssize_t count,
                            uint32_t business_date) noexcept nogil:
    """Recovery's hot loop (DESIGN.md §6.8): `apply_rows` over journal records where they lie
    (each row holds a Request at `request_offset` and the Result recorded live at
    `result_offset`), comparing each fresh result with the recorded one byte for byte. Returns
    the index of the first row that answers differently, or -1. No request or result column is
    copied out of the records and no results array is written: one Result on the stack.

    The per-row steps are apply_rows' exactly (same prefetching, same result initialisation), so
    a replay rebuilds byte-identical state; keep the two loops in step.
    """
    cdef Py_ssize_t i
    cdef Result r
    cdef uint64_t rev_keys[REV_KEYS]
    cdef const char* requests = rows + request_offset
    set_batch_date(s, business_date)
    prefetch_start(s, requests, row_size_bytes, count, rev_keys)
    for i in range(count):
        prefetch_step(s, requests, row_size_bytes, i, count, rev_keys, True)
        apply_row(s, request_at(requests, row_size_bytes, i), &r, business_date, rev_keys[i & (REV_KEYS - 1)])
        if memcmp(&r, rows + i * row_size_bytes + result_offset, sizeof(Result)) != 0:
            return i
    return -1


cdef class Core:
    """Binds the engine's arrays (a dict of numpy arrays, see yikatong.engine.state) to the C
    State and applies batches. Rebind after any array is replaced (growth, checkpoint load)."""
    cdef State s
    cdef readonly dict arrays
    cdef object _keepalive
    cdef bint _fast_settle
    cdef object _snap_keep          # the snapshot's numpy arrays (copy, log, positions)
    cdef readonly object snapshot_lock   # serialises batches and a checkpoint thread's ring copy

    def __init__(self, dict arrays):
        self._fast_settle = True
        self.snapshot_lock = threading.Lock()
        self.bind(arrays)

    def bind(self, dict arrays):
        a = arrays
        cdef RingSnapshot snap = self.s.snap
        if snap.active:
            # a ring snapshot outlives a rebind (card growth replaces the card columns, not the
            # ring): its copy is finished now, against the ring it started on
            with self.snapshot_lock:
                ring_copy_to(&self.s, self.s.txn_mask + 1)
                snap = self.s.snap
            if a["txns"] is not self.arrays["txns"]:
                snap.overflow = 1                # another ring: that snapshot cannot be exact
        self.arrays = a
        cdef cnp.ndarray meta = a["meta"]
        memset(&self.s, 0, sizeof(State))
        self.s.snap = snap
        self.s.card_count = a["meta"][2]
        self.s.card_capacity = a["cards"].shape[0]
        if cnp.PyArray_DATA(a["cards"]) == NULL or (<size_t>cnp.PyArray_DATA(a["cards"])) % 64 != 0:
            a["cards"] = aligned_copy(a["cards"])      # one card, one cache line
        self.s.cards = <CardHot*>_ptr(a["cards"])
        if cnp.PyArray_DATA(a["side"]) == NULL or (<size_t>cnp.PyArray_DATA(a["side"])) % 16 != 0:
            a["side"] = aligned_copy(a["side"])        # a record never straddles two lines
        self.s.side = <CardSide*>_ptr(a["side"])
        self.s.person_hash = <uint64_t*>_ptr(a["person_hash"])
        self.s.pvv_bank = <uint32_t*>_ptr(a["pvv_bank"])
        self.s.temp_loss_until = <uint32_t*>_ptr(a["temp_loss_until"])
        self.s.pan_index = <int32_t*>_ptr(a["pan_index"])
        self.s.pan_index_mask = a["pan_index"].shape[0] - 1
        self.s.person_index = <int32_t*>_ptr(a["person_index"])
        self.s.person_index_mask = a["person_index"].shape[0] - 1
        self.s.policy_of = <int16_t*>_ptr(a["policy_of"])
        self.s.policies = <Policy*>_ptr(a["policies"])
        self.s.region_count = a["region_codes"].shape[0]
        self.s.ins_type_count = a["ins_type_codes"].shape[0]
        self.s.region_codes = <uint32_t*>_ptr(a["region_codes"])
        self.s.ins_type_codes = <uint16_t*>_ptr(a["ins_type_codes"])
        self.s.region_temp_loss_days = <uint8_t*>_ptr(a["region_temp_loss_days"])
        self.s.inst_kind = <uint8_t*>_ptr(a["inst_kind"])
        self.s.inst_region = <uint8_t*>_ptr(a["inst_region"])
        self.s.inst_level = <uint8_t*>_ptr(a["inst_level"])
        self.s.inst_count = a["inst_kind"].shape[0]
        self.s.term_inst = <int32_t*>_ptr(a["term_inst"])
        self.s.term_count = a["term_inst"].shape[0]
        self.s.txns = <Txn*>_ptr(a["txns"])
        self.s.txn_mask = a["txns"].shape[0] - 1
        self.s.idem_index = <Bucket*>_ptr(a["idem_index"])
        self.s.rev_index = <Bucket*>_ptr(a["rev_index"])
        self.s.txn_index_mask = a["idem_index"].shape[0] - 1
        self.s.counters = <uint64_t*>_ptr(meta)
        self.s.limits_fen = <int64_t*>_ptr(a["limits_fen"])
        self.s.pin_tries_social_max = <uint8_t>a["meta"][3]
        self.s.pin_tries_bank_max = <uint8_t>a["meta"][4]
        self.s.aid_beneficiaries_max = <uint8_t>a["meta"][5]
        self.s.fast_settle = self._fast_settle
        uppers = a["policies"]["band_upper_fen"]
        counts = a["policies"]["band_count"]
        self.s.bands_sorted = all(
            all(uppers[i, k] <= uppers[i, k + 1] for k in range(int(counts[i]) - 1))
            for i in range(uppers.shape[0]))

    @property
    def fast_rows(self):
        """Settlements answered by settle_row itself (not handed to the generic path) since the
        last bind: tests check that the fast path is taken."""
        return self.s.fast_rows

    @property
    def fast_settle(self):
        """Medical settlements through settle_row (True, the default) or the generic path only
        (False): the two must agree byte for byte; tests switch it to compare them."""
        return bool(self._fast_settle)

    @fast_settle.setter
    def fast_settle(self, bint on):
        self._fast_settle = on
        self.s.fast_settle = on

    def apply(self, cnp.ndarray requests, cnp.ndarray results, uint32_t business_date):
        """Apply `requests` in order, writing `results`; returns the number approved.
        Shapes and dtypes are checked by the caller (yikatong.engine.Engine.apply_batch)."""
        cdef Py_ssize_t n = requests.shape[0]
        cdef const Request* q = <const Request*>cnp.PyArray_DATA(requests)
        cdef Result* r = <Result*>cnp.PyArray_DATA(results)
        cdef int approved_count
        with self.snapshot_lock:                   # free unless a checkpoint thread copies the ring
            with nogil:
                ring_snapshot_ahead(&self.s, <uint64_t>n)
                approved_count = apply_rows(&self.s, q, r, n, business_date)
        self.arrays["meta"][2] = self.s.card_count
        return approved_count

    def replay(self, const unsigned char[::1] rows not None, Py_ssize_t row_size_bytes,
               Py_ssize_t request_offset, Py_ssize_t result_offset, uint32_t business_date):
        """Replay journal rows in place (`replay_rows`); returns the index of the first row whose
        result differs from the recorded one, or -1. `rows` may be a read-only buffer (an LMDB
        value); the caller hands 8-byte-aligned rows (asserted: the structs hold u64 fields)."""
        cdef Py_ssize_t n = rows.shape[0] // row_size_bytes if row_size_bytes > 0 else 0
        assert row_size_bytes > 0 and rows.shape[0] == n * row_size_bytes, (rows.shape[0], row_size_bytes)
        assert 0 <= request_offset and request_offset + <Py_ssize_t>sizeof(Request) <= row_size_bytes
        assert 0 <= result_offset and result_offset + <Py_ssize_t>sizeof(Result) <= row_size_bytes
        if n == 0:
            return -1
        cdef const char* base = <const char*>&rows[0]
        assert (<size_t>base + <size_t>request_offset) % 8 == 0 and row_size_bytes % 8 == 0, "unaligned rows"
        cdef Py_ssize_t bad
        with self.snapshot_lock:
            with nogil:
                ring_snapshot_ahead(&self.s, <uint64_t>n)
                bad = replay_rows(&self.s, base, row_size_bytes, request_offset, result_offset, n, business_date)
        self.arrays["meta"][2] = self.s.card_count
        return bad

    # ---- a checkpoint's copy of the ring, spread over batches ------------------------------
    def ring_snapshot_begin(self, cnp.ndarray copy not None, cnp.ndarray log not None,
                            cnp.ndarray log_positions not None):
        """Start copying the ring as it is now into `copy` (an array like arrays["txns"]),
        without copying it now: each batch copies the entries it may overwrite first, and
        `ring_snapshot_copy` (a checkpoint thread) the rest. Entries changed in place before the
        copy reaches them log their bytes into `log` / `log_positions` (as many as they hold;
        more: the snapshot is marked inexact). Call between batches."""
        ring = self.arrays["txns"]
        assert not self.s.snap.active, "a ring snapshot is in progress"
        assert copy.dtype == ring.dtype and copy.shape[0] == ring.shape[0] and copy.flags.c_contiguous
        assert log.dtype == ring.dtype and log.ndim == 1 and log.flags.c_contiguous
        assert log_positions.dtype == np.int32 and log_positions.shape[0] == log.shape[0] \
            and log_positions.flags.c_contiguous
        self._snap_keep = (copy, log, log_positions)
        with self.snapshot_lock:
            self.s.snap.dst = <Txn*>cnp.PyArray_DATA(copy)
            self.s.snap.log = <Txn*>cnp.PyArray_DATA(log)
            self.s.snap.log_pos = <int32_t*>cnp.PyArray_DATA(log_positions)
            self.s.snap.log_capacity = log.shape[0]
            self.s.snap.log_count = 0
            self.s.snap.overflow = 0
            self.s.snap.base_rrn = self.s.counters[0] + 1
            self.s.snap.copied = 0
            self.s.snap.active = 1

    def ring_snapshot_copy(self, Py_ssize_t entries):
        """Copy up to `entries` more of the snapshot's ring (the GIL released, batches held off
        meanwhile); True once the whole ring is copied."""
        cdef uint64_t upto
        assert self.s.snap.active and entries > 0
        with self.snapshot_lock:
            upto = self.s.snap.copied + <uint64_t>entries
            with nogil:
                ring_copy_to(&self.s, upto)
            return self.s.snap.copied == self.s.txn_mask + 1

    def ring_snapshot_end(self):
        """Finish (the rest copied) and stop the snapshot; returns (the number of logged
        entries, exact) with the copy patched: each logged position gets its first logged bytes."""
        assert self.s.snap.active
        with self.snapshot_lock:
            with nogil:
                ring_copy_to(&self.s, self.s.txn_mask + 1)
            count, exact = self.s.snap.log_count, not self.s.snap.overflow
            memset(&self.s.snap, 0, sizeof(RingSnapshot))
        copy, log, positions = self._snap_keep
        self._snap_keep = None
        if count:
            # the first logged bytes of a position are the ones it had at the snapshot's point
            first = np.unique(positions[:count], return_index=True)
            width = copy.dtype.itemsize
            copy.view(np.uint8).reshape(-1, width)[first[0]] = log.view(np.uint8).reshape(-1, width)[first[1]]
        return count, exact

    @property
    def ring_snapshot_active(self):
        return bool(self.s.snap.active)

    @property
    def card_count(self):
        return self.s.card_count


# ---------------------------------------------------------------------------------------------
# Bulk helpers for keyed hashes (issuance files, generated cards, PIN verification values)
# ---------------------------------------------------------------------------------------------

def hash_digit_numbers(cnp.ndarray[cnp.uint64_t, ndim=1] numbers not None, int width,
                       bytes key16 not None):
    """SipHash-2-4 of each number written as `width` ASCII digits (zero-filled): the same bytes
    the codec hashes for a PAN of that length. Returns uint64 hashes."""
    if len(key16) != 16 or width < 1 or width > 19:
        raise ValueError("hash_digit_numbers: key must be 16 bytes and width 1..19")
    cdef uint64_t k0 = int.from_bytes(key16[:8], "little")
    cdef uint64_t k1 = int.from_bytes(key16[8:], "little")
    cdef Py_ssize_t i, n = numbers.shape[0]
    cdef cnp.ndarray[cnp.uint64_t, ndim=1] out = np.empty(n, dtype=np.uint64)
    cdef unsigned char buf[20]
    cdef uint64_t v
    cdef int j
    with nogil:
        for i in range(n):
            v = numbers[i]
            for j in range(width - 1, -1, -1):
                buf[j] = 48 + <unsigned char>(v % 10)
                v //= 10
            out[i] = siphash24(k0, k1, buf, width)
    return out


def pvv_array(cnp.ndarray[cnp.uint64_t, ndim=1] pan_hashes not None, bytes pin not None,
              bytes key16 not None):
    """PIN verification values of one PIN for many cards: low 32 bits of
    SipHash(key, pan_hash as 8 little-endian bytes + PIN digits). Never stores the PIN."""
    if len(key16) != 16 or not (4 <= len(pin) <= 12):
        raise ValueError("pvv_array: key must be 16 bytes and the PIN 4..12 digits")
    cdef uint64_t k0 = int.from_bytes(key16[:8], "little")
    cdef uint64_t k1 = int.from_bytes(key16[8:], "little")
    cdef Py_ssize_t i, n = pan_hashes.shape[0]
    cdef cnp.ndarray[cnp.uint32_t, ndim=1] out = np.empty(n, dtype=np.uint32)
    cdef unsigned char buf[20]
    cdef int j, plen = len(pin)
    cdef const unsigned char* p = <const unsigned char*>(<char*>pin)
    cdef uint64_t h
    for j in range(plen):
        buf[8 + j] = p[j]
    with nogil:
        for i in range(n):
            h = pan_hashes[i]
            for j in range(8):
                buf[j] = <unsigned char>((h >> (8 * j)) & 0xFF)
            out[i] = <uint32_t>siphash24(k0, k1, buf, 8 + plen)
    return out


def rebuild_card_indexes(dict arrays):
    """Rebuild the PAN and person indexes from the columns (after growth or a checkpoint load)."""
    cdef cnp.ndarray pan_index = arrays["pan_index"], person_index = arrays["person_index"]
    cdef int32_t* pt = <int32_t*>_ptr(pan_index)
    cdef int32_t* qt = <int32_t*>_ptr(person_index)
    cdef uint64_t pmask = pan_index.shape[0] - 1, qmask = person_index.shape[0] - 1
    cdef CardHot* cards = <CardHot*>_ptr(arrays["cards"])
    cdef uint64_t* pan = &cards[0].pan_hash
    cdef uint64_t* person = <uint64_t*>_ptr(arrays["person_hash"])
    cdef int64_t i, n = arrays["meta"][2]
    pan_index.fill(-1)
    person_index.fill(-1)
    with nogil:
        for i in range(n):
            card_index_set(pt, pmask, pan, PAN_STRIDE, pan[i * PAN_STRIDE], <int32_t>i)
        for i in range(n):
            if cards[i].status != CARD_REPLACED and cards[i].status != CARD_CANCELLED:
                card_index_set(qt, qmask, person, 1, person[i], <int32_t>i)


def rebuild_txn_indexes(dict arrays):
    """Rebuild the idempotency and reversal indexes from the transaction ring (a checkpoint
    holds the ring, not the indexes: docs/engine.md, "The transaction indexes, derived").

    The ring's live entries are put back oldest first, as they were first indexed. An entry's
    `idem_key` / `rev_key` is non-zero only if it was indexed under that key (txn_new,
    settle_row, the tombstone's set), and entries leave the indexes only when the ring evicts
    them, oldest first; so each key's owner is the newest live entry carrying it:
    - idempotency keys are never indexed twice (a key found answers from its entry), so each is
      carried by one live entry;
    - a reversal key may be carried by several (a reversible message re-points the key to
      itself: txn_new over a found bucket; a tombstone: txn_index_set), and the newest owns it.
      Inserting in RRN order with txn_index_set (overwrite) gives the newest.
    Backward-shift deletion leaves a linear-probing table as if the deleted keys had never been
    inserted, so the rebuilt table is in general the live one byte for byte; it differs only in
    the order within a probe cluster of a reversal key whose first carrier was evicted after a
    newer one took it over — a layout with the same answers (tests compare the key → position
    pairs). Returns the number of idempotency keys found on two live entries (0 unless the
    ring is not one this engine wrote)."""
    cdef cnp.ndarray idem = arrays["idem_index"], rev = arrays["rev_index"]
    cdef cnp.ndarray ring = arrays["txns"]
    cdef State s
    cdef Txn* txns = <Txn*>_ptr(ring)
    cdef uint64_t mask = ring.shape[0] - 1
    cdef uint64_t last = arrays["meta"][0], rrn, first
    cdef int64_t twice = 0
    cdef int32_t pos
    if idem.shape[0] != rev.shape[0] or idem.shape[0] < 2 * ring.shape[0]:
        raise ValueError(f"rebuild_txn_indexes: indexes of {idem.shape[0]} / {rev.shape[0]} buckets "
                         f"for a ring of {ring.shape[0]} entries; expecting twice as many")
    memset(&s, 0, sizeof(State))
    s.idem_index = <Bucket*>_ptr(idem)
    s.rev_index = <Bucket*>_ptr(rev)
    s.txn_index_mask = idem.shape[0] - 1
    idem.view(np.uint8).fill(0)
    rev.view(np.uint8).fill(0)
    idem["pos"] = -1
    rev["pos"] = -1
    first = last - mask if last > mask else 1
    with nogil:
        for rrn in range(first, last + 1):
            pos = <int32_t>(rrn & mask)
            if txns[pos].rrn != rrn:
                continue                  # freed ahead of the next message (txn_make_room)
            if txns[pos].idem_key != 0:
                if txn_index_find(&s, 0, txns[pos].idem_key) >= 0:
                    twice += 1
                txn_index_set(&s, 0, txns[pos].idem_key, pos)
            if txns[pos].rev_key != 0:
                txn_index_set(&s, 1, txns[pos].rev_key, pos)
    return twice


def hash_rows(cnp.ndarray[cnp.uint8_t, ndim=2] rows not None, bytes key16 not None):
    """SipHash-2-4 of each row of a C-contiguous (n, width) uint8 array (ASCII text of fixed
    width: 社会保障号码, PANs). Returns uint64 hashes."""
    if len(key16) != 16:
        raise ValueError("hash_rows: key must be 16 bytes")
    if not rows.flags.c_contiguous:
        raise ValueError("hash_rows: rows must be C-contiguous")
    cdef uint64_t k0 = int.from_bytes(key16[:8], "little")
    cdef uint64_t k1 = int.from_bytes(key16[8:], "little")
    cdef Py_ssize_t i, n = rows.shape[0], w = rows.shape[1]
    cdef cnp.ndarray[cnp.uint64_t, ndim=1] out = np.empty(n, dtype=np.uint64)
    cdef const unsigned char* base = <const unsigned char*>cnp.PyArray_DATA(rows)
    with nogil:
        for i in range(n):
            out[i] = siphash24(k0, k1, base + i * w, w)
    return out
