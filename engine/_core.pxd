# cython: language_level=3
"""The engine's C contract: request, result and transaction layouts, and the state the apply
loop reads. Other extensions (codec, ledger) `cimport` these; Python mirrors each struct with a
numpy dtype in yikatong.engine.layouts, whose size and offsets are asserted at import.

Conventions:
  * money is int64 fen; a *leg* is what an account paid: positive = debited from the account,
    negative = credited back to it (a refund, a cancel, a reversal);
  * response codes are two ASCII characters packed little-endian in a uint16 ("51" = '5'|'1'<<8),
    so a numpy view as 'S2' prints them;
  * dates are YYYYMMDD (business date) or MMDD (wire fields 13, 15, 61.3).
"""
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

# ---- command kinds (Request.cmd) -------------------------------------------------------------
# 1..31 financial and medical (PROTOCOL.md §3); 32..63 card lifecycle and money-in (issue 6).
cdef enum:
    CMD_BALANCE = 1          # 0200 31xx00 60.1=01
    CMD_PURCHASE = 2         # 0200 000000 60.1=22   (reversible)
    CMD_VOID = 3             # 0200 200000 60.1=23   (reversible)
    CMD_REFUND = 4           # 0220 200000 60.1=25
    CMD_MED_SETTLE = 5       # 0200 000000 60.1=81   (reversible)
    CMD_MED_CANCEL = 6       # 0200 200000 60.1=82   (reversible)
    CMD_MED_PRESETTLE = 7    # 0200 300000 60.1=83   (computes, posts nothing)
    CMD_DEPOSIT = 8          # 0200 210000 60.1=91   (reversible)
    CMD_WITHDRAW = 9         # 0200 010000 60.1=92   (reversible)
    CMD_TRANSFER = 10        # 0200 400000 60.1=93   (reversible)
    CMD_REVERSAL = 11        # 0400, any reversible command
    CMD_ISSUE = 32           # issuance (制卡): creates the card
    CMD_ACTIVATE_SOCIAL = 33 # activate the social function (ISSUED → ACTIVE)
    CMD_ACTIVATE_FIN = 34    # activate the financial function (bank side)
    CMD_TEMP_LOSS = 35       # 临时挂失: lapses after the region's number of days
    CMD_FORMAL_LOSS = 36     # 正式挂失 (med_type = 1: reported stolen); cannot be undone
    CMD_UNLOSS = 37          # 解挂 of a temporary loss
    CMD_REPLACE = 38         # 补换卡: pan2 = the new card; balances and accumulators carry over
    CMD_CANCEL_CARD = 39     # 注销: refused while a balance remains unless pan2 receives it
    CMD_FAMILY_BIND = 40     # 家庭共济: pan2 (payer) pays for pan (beneficiary)
    CMD_FAMILY_UNBIND = 41
    CMD_PIN_CHANGE = 42      # acct_type 0 social / 1 bank: old PIN verified, pin_pvv_new set
    CMD_PIN_RESET = 43       # operator reset (identity checked at the counter): pin_pvv_new, tries 0
    CMD_PIN_UNLOCK = 44      # operator unlock: tries 0
    CMD_CREDIT_FIN = 45      # 代发: credit the financial account (pan, or person_hash → live card)
    CMD_CREDIT_INS = 46      # 个人账户划入: credit the insurance account
    CMD_MAX = 63


# ---- response codes (PROTOCOL.md §4), two ASCII chars little-endian -------------------------
cdef enum:
    RC_00 = 0x3030
    RC_03 = 0x3330
    RC_05 = 0x3530
    RC_10 = 0x3031
    RC_12 = 0x3231
    RC_13 = 0x3331
    RC_14 = 0x3431
    RC_25 = 0x3532
    RC_30 = 0x3033
    RC_41 = 0x3134
    RC_43 = 0x3334
    RC_51 = 0x3135
    RC_54 = 0x3435
    RC_55 = 0x3535
    RC_57 = 0x3735
    RC_58 = 0x3835
    RC_61 = 0x3136
    RC_62 = 0x3236
    RC_64 = 0x3436
    RC_65 = 0x3536           # a count limit reached (家庭共济: beneficiaries per payer)
    RC_75 = 0x3537
    RC_77 = 0x3737
    RC_94 = 0x3439
    RC_96 = 0x3639
    RC_97 = 0x3739
    RC_99 = 0x3939
    RC_A0 = 0x3041

# ---- limits_fen slots: per command (its max amount); slot 0 (no command 0) is the family-aid cap
cdef enum:
    LIMIT_FAMILY_AID = 0     # 家庭共济: what the payer's insurance account pays per settlement at most

# ---- Request.flags --------------------------------------------------------------------------
cdef enum:
    REQ_AU = 1               # 62.AU: the insurance account may pay (default on)
    REQ_PA = 2               # 62.PA: partial approval allowed
    REQ_FP = 4               # 62.FP present: fund amount computed by the platform
    REQ_PIN = 8              # field 52 present: pin_pvv holds its verification value
    REQ_PIN_REPLAY_OK = 16   # journal replay: the PIN was checked live and was right
    REQ_PIN_REPLAY_BAD = 32  # journal replay: the PIN was checked live and was wrong

# ---- Result.outcome_flags -------------------------------------------------------------------
cdef enum:
    RES_POSTED = 1           # balances or accumulators changed
    RES_DUPLICATE = 2        # repeat of a processed key: the stored answer, no effect
    RES_ADMISSION = 4        # counted one admission (per-admission deductible)
    RES_CUMULATIVE = 8       # deductible_fen was added to the yearly cumulative deductible
    RES_TOMBSTONE = 16       # reversal of an unknown original: key tombstoned
    RES_NO_POLICY = 32       # no policy for the card's (region, type, person, visit, level)

# ---- card status and flags ------------------------------------------------------------------
cdef enum:
    CARD_EMPTY = 0
    CARD_ISSUED = 1          # issued, social function not activated yet
    CARD_ACTIVE = 2
    CARD_TEMP_LOST = 3       # 临时挂失: lapses after the region's number of days
    CARD_LOST = 4            # 正式挂失
    CARD_REPLACED = 5        # 补换卡: the old card of a replacement
    CARD_CANCELLED = 6       # 注销

cdef enum:
    CF_FIN_ACTIVE = 1        # financial function activated
    CF_SOCIAL_PIN = 2        # social PIN enabled (changed from the initial value)
    CF_STOLEN = 4            # reported stolen (answers 43)

# ---- institution kinds ----------------------------------------------------------------------
cdef enum:
    INST_HOSPITAL = 1
    INST_PHARMACY = 2
    INST_BANK = 3            # bank counter: deposit, withdrawal, transfer
    INST_MERCHANT = 4        # ordinary merchant: purchase only

# ---- transaction states (Txn.state) ---------------------------------------------------------
cdef enum:
    TXN_OPEN = 0
    TXN_UNDONE = 1           # voided (purchase) or cancelled (medical settlement)
    TXN_REVERSED = 2
    TXN_TOMBSTONE = 3        # a reversal arrived before (or without) its original

# Visit kinds index the dense policy table: 0 = outpatient 11, 1 = chronic 14, 2 = inpatient 21,
# 3 = pharmacy 41.
cdef enum:
    VISIT_KINDS = 4
    LEVELS = 4               # hospital level 0 (none) .. 3
    BANDS_MAX = 4

# ---- the layouts ----------------------------------------------------------------------------
# One incoming message, decoded. 160 bytes. Fields a command does not use are zero.
ctypedef struct Request:
    uint64_t pan_hash          # keyed hash of the card's PAN (field 2 / 35); never the PAN
    uint64_t pan2_hash         # transfer: receiving card's PAN hash (field 48)
    uint64_t idem_key          # hash of MTI class + 32 + 41 + 42 + 11 + 60.2 + 13 (§3.2)
    uint64_t content_hash      # hash of the rest of the content: same key, other content → 94
    uint64_t person_hash       # lifecycle: keyed hash of the 社会保障号码
    uint64_t orig_rrn          # void / cancel / refund: field 37 of the original
    int64_t amount_fen         # field 4 (medical: the total bill 医疗费总额); ISSUE: insurance opening
    int64_t fo_fen             # 62.FO fully self-paid (全自费)
    int64_t ol_fen             # 62.OL over price limit (超限价)
    int64_t ps_fen             # 62.PS first self-paid class B part (先行自付)
    int64_t is_fen             # 62.IS in scope (符合范围)
    int64_t fp_fen             # 62.FP fund amount given by the platform (with REQ_FP)
    int64_t amount2_fen        # ISSUE: financial opening balance
    uint32_t pin_pvv           # verification value of the PIN in field 52 (with REQ_PIN); ISSUE: bank PVV
    uint32_t pin_pvv_new       # ISSUE: social PVV; PIN change: the new PIN's PVV
    int32_t terminal_index     # terminal registry slot (field 41), -1 unknown
    int32_t institution_index  # institution registry slot (field 42), -1 unknown
    uint32_t stan              # field 11
    uint32_t batch_no          # 60.2
    uint32_t orig_stan         # 61: original STAN
    uint32_t orig_batch        # 61: original batch
    uint32_t local_time        # field 12 hhmmss
    uint32_t region_code       # ISSUE: 6-digit region (参保地)
    uint16_t local_date        # field 13 MMDD
    uint16_t orig_date         # 61: original date MMDD
    uint16_t pan_last4         # last four digits of the PAN, as a number
    uint16_t pre_code          # response decided before the engine (30, A0, 97, 77, 99), 0 = none
    uint16_t ins_type          # ISSUE: insurance type code (险种, e.g. 310)
    uint16_t expiry_yymm       # ISSUE: card expiry
    uint8_t cmd                # CMD_*
    uint8_t flags              # REQ_*
    uint8_t med_type           # 62.MT: 11, 14, 21, 41; ISSUE: initial status CARD_*
    uint8_t acct_type          # balance inquiry: 10, 91, 0 = both; ISSUE: person type (0 in service, 1 retired) | card flags << 4

# What the engine answers for one request. 128 bytes.
ctypedef struct Result:
    uint64_t rrn               # retrieval reference number (field 37), assigned by the engine
    uint64_t orig_rrn          # the original's RRN (void, cancel, refund, reversal, duplicate)
    int64_t amount_fen         # the command's amount as posted (field 4)
    int64_t fund_fen           # pooled fund (统筹基金) pays
    int64_t deductible_fen     # deductible (起付线) applied
    int64_t ins_leg_fen        # the card's insurance personal account paid
    int64_t aid_leg_fen        # the family-aid payer's insurance account paid (家庭共济)
    int64_t fin_leg_fen        # the financial account paid (negative: credited)
    int64_t cash_fen           # cash still to collect (partial approval)
    int64_t ins_balance_fen    # insurance balance after
    int64_t fin_balance_fen    # financial balance after
    int64_t other_balance_fen  # aid payer's insurance balance, or transfer receiver's financial balance, after
    int32_t card_slot          # -1 when no card was read
    int32_t other_slot         # aid payer or transfer receiver, -1 none
    uint32_t business_date     # YYYYMMDD the engine applied it under
    uint32_t auth_code         # field 38 (6 digits) on approvals, 0 otherwise
    uint16_t code              # response code (two ASCII chars)
    uint8_t cmd                # echo of Request.cmd
    uint8_t pin_outcome        # 0 no PIN checked, 1 right, 2 wrong
    uint8_t outcome_flags      # RES_*
    uint8_t acc_group          # accumulator group used (0 outpatient, 1 inpatient)
    uint16_t reserved0
    int64_t reserved1

# One processed message in the bounded transaction table: idempotency, reversal matching,
# originals of void / cancel / refund. 160 bytes. Its first TXN_RESULT_BYTES are laid out as a
# Result's (asserted in engine/layouts.py): the answer is stored with one copy, and a duplicate
# is answered with one copy back; Result's reserved0 is the entry's state here.
ctypedef struct Txn:
    uint64_t rrn
    uint64_t orig_rrn
    int64_t amount_fen
    int64_t fund_fen
    int64_t deductible_fen
    int64_t ins_leg_fen
    int64_t aid_leg_fen
    int64_t fin_leg_fen
    int64_t cash_fen
    int64_t ins_balance_fen
    int64_t fin_balance_fen
    int64_t other_balance_fen
    int32_t card_slot
    int32_t other_slot
    uint32_t business_date
    uint32_t auth_code
    uint16_t code
    uint8_t cmd
    uint8_t pin_outcome
    uint8_t outcome_flags
    uint8_t acc_group
    uint8_t state                  # TXN_* (where a Result has reserved0)
    uint8_t reserved0
    # the ring's own fields, from TXN_RESULT_BYTES on
    int64_t refunded_fen
    uint64_t idem_key              # 0: not in the idempotency index
    uint64_t content_hash
    uint64_t rev_key               # (terminal, batch, stan) of a reversible command, or a tombstone
    uint32_t stan
    uint32_t batch_no

cdef enum:
    TXN_RESULT_BYTES = 120         # offsetof(Txn, refunded_fen): the Result-shaped prefix

# A bucket of the transaction indexes: the key is kept beside the ring position, so probing never
# touches the ring (one cache line per probe instead of two). 16 bytes.
ctypedef struct Bucket:
    uint64_t key
    int32_t pos                    # ring position, -1 = empty
    uint32_t reserved0

# A medical policy (参保地政策) row.
ctypedef struct Policy:
    int64_t deductible_first_fen   # per admission: first admission; per year: the yearly amount
    int64_t deductible_later_fen   # per admission: later admissions of the year
    int64_t cap_fen                # annual cap (封顶线) on the fund
    int64_t band_upper_fen[BANDS_MAX]  # band k covers [upper[k-1], upper[k]] on the in-scope axis
    uint32_t band_ratio_bp[BANDS_MAX]  # ratio in basis points (8500 = 85%)
    uint8_t band_count
    uint8_t per_admission          # 1: deductible per admission; 0: cumulative per year
    uint8_t acc_group              # 0 outpatient group, 1 inpatient group
    uint8_t fund_pays              # 0: the fund pays nothing (pharmacy)
    uint8_t reserved0[4]

# The fields of a card that a settlement reads and writes, in one 64-byte cache line (one
# memory access per card instead of one per column). Column `cards` of the engine's arrays.
ctypedef struct CardHot:
    uint64_t pan_hash
    int64_t ins_balance_fen
    int64_t fin_balance_fen
    int64_t ded_used_fen[2]        # per accumulator group: deductible used this year
    int64_t fund_paid_fen[2]       # per accumulator group: fund paid this year
    uint8_t status
    uint8_t card_flags
    uint8_t region_index
    uint8_t ins_type_index
    uint8_t person_type
    uint8_t tries_social
    uint8_t tries_bank
    uint8_t aid_beneficiaries      # 家庭共济: cards bound to this one as their payer (kept on the live card)

# The rest of what a settlement reads of a card, 16 bytes (four per cache line, so one line per
# card beside its CardHot line). Column `side`. Kept out of CardHot, whose 64 bytes are full.
ctypedef struct CardSide:
    uint16_t admissions[2]         # per accumulator group, this year
    uint16_t acc_year              # the year the accumulators belong to
    uint16_t expiry_yymm
    int32_t payer_slot             # 家庭共济 payer, -1 none; on a REPLACED card: its successor
    uint32_t pvv_social            # social PIN verification value

cdef enum:
    PAN_STRIDE = 8                 # uint64 words from one card's pan_hash to the next

# A checkpoint copying the ring over several batches (Core.ring_snapshot_*): the ring as it was
# just before base_rrn is copied in the order the ring overwrites it, offsets (from base_rrn's
# position) below `copied` done. An older entry changed in place before the copy reaches it
# logs its bytes first (ring_preimage); the first log of a position wins.
ctypedef struct RingSnapshot:
    uint8_t active
    uint8_t overflow               # the log was full: this snapshot is not exact (the caller fails it)
    uint64_t base_rrn              # the first RRN given after the snapshot's point
    uint64_t copied                # ring entries copied, in overwrite order
    Txn* dst                       # the copy, indexed as the ring
    Txn* log                       # prior bytes of entries changed in place before being copied
    int32_t* log_pos               # their ring positions
    int64_t log_count
    int64_t log_capacity

# Raw pointers into the engine's numpy arrays, refreshed before each batch.
ctypedef struct State:
    # cards: one slot each
    int64_t card_count
    int64_t card_capacity
    CardHot* cards
    CardSide* side
    uint64_t* person_hash
    uint32_t* pvv_bank
    uint32_t* temp_loss_until      # YYYYMMDD after which a temporary loss lapses
    # indexes: open addressing, linear probing, int32 slots (-1 empty), keys compared in columns
    int32_t* pan_index
    uint64_t pan_index_mask
    int32_t* person_index
    uint64_t person_index_mask
    # policies
    int16_t* policy_of             # dense [region][ins type][person type][visit kind][level]
    Policy* policies
    int32_t region_count
    int32_t ins_type_count
    uint32_t* region_codes         # [region_count]
    uint16_t* ins_type_codes       # [ins_type_count]
    uint8_t* region_temp_loss_days
    # institutions and terminals
    uint8_t* inst_kind
    uint8_t* inst_region
    uint8_t* inst_level
    int32_t inst_count
    int32_t* term_inst
    int32_t term_count
    # transactions: a ring of Txn and two indexes over it
    Txn* txns
    uint64_t txn_mask              # ring capacity - 1 (power of two)
    Bucket* idem_index
    Bucket* rev_index
    uint64_t txn_index_mask
    uint64_t* counters             # [0] transactions so far (next RRN - 1), [1] configuration warnings
    # the batch's business date, split once per batch (a division per message otherwise): set by
    # set_batch_date before apply_one runs
    uint32_t batch_year            # YYYY
    uint32_t batch_yymm            # YYMM, compared with a card's expiry
    # parameters
    int64_t* limits_fen            # per command: max amount (0 = no limit)
    uint8_t pin_tries_social_max
    uint8_t pin_tries_bank_max
    uint8_t aid_beneficiaries_max  # 家庭共济: beneficiaries one payer may cover (0 = no limit)
    # the settlement fast path (apply_row → settle_row): on unless a test compares it with the
    # generic path; bands_sorted: every policy's band upper ends are non-decreasing (set by
    # Core.bind), so a band loop may stop at the first band that reaches the claim
    uint8_t fast_settle
    uint8_t bands_sorted
    uint64_t fast_rows             # settlements settle_row answered itself since the last bind (tests)
    # a checkpoint's copy of the ring over several batches (Core.ring_snapshot_*)
    RingSnapshot snap

cdef inline uint64_t mix64(uint64_t x) noexcept nogil:
    # splitmix64 finaliser. Index keys are keyed hashes already (SipHash of the PAN, of the
    # person, the codec's duplicate-key hash), so the indexes use their low bits directly; only
    # structured keys (the reversal key terminal | batch | stan, the codec's terminal ids) go
    # through here.
    x ^= x >> 30
    x *= 0xbf58476d1ce4e5b9ULL
    x ^= x >> 27
    x *= 0x94d049bb133111ebULL
    x ^= x >> 31
    return x

cdef inline bint reversible(uint8_t cmd) noexcept nogil:
    # commands a reversal (冲正) may undo (PROTOCOL.md §3: the "reversible" column)
    return (cmd == CMD_PURCHASE or cmd == CMD_VOID or cmd == CMD_MED_SETTLE or cmd == CMD_MED_CANCEL
            or cmd == CMD_DEPOSIT or cmd == CMD_WITHDRAW or cmd == CMD_TRANSFER)

cdef uint64_t siphash24(uint64_t k0, uint64_t k1, const unsigned char* data, size_t length) noexcept nogil
cdef int apply_rows(State* s, const Request* requests, Result* results, Py_ssize_t count,
                    uint32_t business_date) noexcept nogil
