"""numpy mirrors of the C layouts in engine/_core.pxd, with their sizes and offsets asserted.

Every struct is declared once in the .pxd; the dtypes here name the same fields in the same
order, and `_check()` compares them with what the compiler laid out, at import. A mismatch is a
programmer error, so it is an AssertionError that stops the import.
"""
import numpy as np

from . import _core

REQUEST_DTYPE = np.dtype([
    ("pan_hash", "<u8"), ("pan2_hash", "<u8"), ("idem_key", "<u8"), ("content_hash", "<u8"),
    ("person_hash", "<u8"), ("orig_rrn", "<u8"),
    ("amount_fen", "<i8"), ("fo_fen", "<i8"), ("ol_fen", "<i8"), ("ps_fen", "<i8"),
    ("is_fen", "<i8"), ("fp_fen", "<i8"), ("amount2_fen", "<i8"),
    ("pin_pvv", "<u4"), ("pin_pvv_new", "<u4"), ("terminal_index", "<i4"),
    ("institution_index", "<i4"), ("stan", "<u4"), ("batch_no", "<u4"), ("orig_stan", "<u4"),
    ("orig_batch", "<u4"), ("local_time", "<u4"), ("region_code", "<u4"),
    ("local_date", "<u2"), ("orig_date", "<u2"), ("pan_last4", "<u2"), ("pre_code", "<u2"),
    ("ins_type", "<u2"), ("expiry_yymm", "<u2"),
    ("cmd", "u1"), ("flags", "u1"), ("med_type", "u1"), ("acct_type", "u1"),
])

RESULT_DTYPE = np.dtype([
    ("rrn", "<u8"), ("orig_rrn", "<u8"), ("amount_fen", "<i8"), ("fund_fen", "<i8"),
    ("deductible_fen", "<i8"), ("ins_leg_fen", "<i8"), ("aid_leg_fen", "<i8"),
    ("fin_leg_fen", "<i8"), ("cash_fen", "<i8"), ("ins_balance_fen", "<i8"),
    ("fin_balance_fen", "<i8"), ("other_balance_fen", "<i8"),
    ("card_slot", "<i4"), ("other_slot", "<i4"), ("business_date", "<u4"), ("auth_code", "<u4"),
    ("code", "<u2"), ("cmd", "u1"), ("pin_outcome", "u1"), ("outcome_flags", "u1"),
    ("acc_group", "u1"), ("reserved0", "<u2"), ("reserved1", "<i8"),
])

# The ring entry: its first 120 bytes (TXN_RESULT_BYTES) are laid out as a Result's, with
# `state` where a Result has reserved0 (checked in _check).
TXN_DTYPE = np.dtype(RESULT_DTYPE.descr[:-2] + [
    ("state", "u1"), ("reserved0", "u1"),
    ("refunded_fen", "<i8"), ("idem_key", "<u8"), ("content_hash", "<u8"), ("rev_key", "<u8"),
    ("stan", "<u4"), ("batch_no", "<u4"),
])

BANDS_MAX = 4
POLICY_DTYPE = np.dtype([
    ("deductible_first_fen", "<i8"), ("deductible_later_fen", "<i8"), ("cap_fen", "<i8"),
    ("band_upper_fen", "<i8", (BANDS_MAX,)), ("band_ratio_bp", "<u4", (BANDS_MAX,)),
    ("band_count", "u1"), ("per_admission", "u1"), ("acc_group", "u1"), ("fund_pays", "u1"),
    ("reserved0", "u1", (4,)),
])


CARD_HOT_DTYPE = np.dtype([
    ("pan_hash", "<u8"), ("ins_balance_fen", "<i8"), ("fin_balance_fen", "<i8"),
    ("ded_used_fen", "<i8", (2,)), ("fund_paid_fen", "<i8", (2,)),
    ("status", "u1"), ("card_flags", "u1"), ("region_index", "u1"), ("ins_type_index", "u1"),
    ("person_type", "u1"), ("tries_social", "u1"), ("tries_bank", "u1"), ("aid_beneficiaries", "u1"),
])
CARD_SIDE_DTYPE = np.dtype([("admissions", "<u2", (2,)), ("acc_year", "<u2"), ("expiry_yymm", "<u2"),
                            ("payer_slot", "<i4"), ("pvv_social", "<u4")])


def _check():
    txn_size, txn_offsets, txn_result_bytes = _core._offsets_txn()
    assert txn_offsets["refunded_fen"] == txn_result_bytes == RESULT_DTYPE.fields["reserved1"][1]
    for name in RESULT_DTYPE.names[:-2]:     # the Result-shaped prefix of a ring entry
        assert TXN_DTYPE.fields[name][1:] == RESULT_DTYPE.fields[name][1:] and \
            TXN_DTYPE.fields[name][0] == RESULT_DTYPE.fields[name][0], f"Txn.{name} is not where Result has it"
    assert TXN_DTYPE.fields["state"][1] == RESULT_DTYPE.fields["reserved0"][1]
    for dtype, probe in ((REQUEST_DTYPE, _core._offsets_request), (RESULT_DTYPE, _core._offsets_result),
                         (TXN_DTYPE, lambda: (txn_size, txn_offsets)), (POLICY_DTYPE, _core._offsets_policy),
                         (CARD_HOT_DTYPE, _core._offsets_card_hot), (CARD_SIDE_DTYPE, _core._offsets_card_side)):
        size, offsets = probe()
        assert dtype.itemsize == size, f"{dtype}: numpy itemsize {dtype.itemsize}, C sizeof {size}"
        for name, offset in offsets.items():
            assert dtype.fields[name][1] == offset, (
                f"field {name}: numpy offset {dtype.fields[name][1]}, C offset {offset}")


_check()


# ---- constants mirrored from _core.pxd (Python side: building requests, reading results) ----
class Cmd:
    BALANCE = 1
    PURCHASE = 2
    VOID = 3
    REFUND = 4
    MED_SETTLE = 5
    MED_CANCEL = 6
    MED_PRESETTLE = 7
    DEPOSIT = 8
    WITHDRAW = 9
    TRANSFER = 10
    REVERSAL = 11
    ISSUE = 32
    ACTIVATE_SOCIAL = 33
    ACTIVATE_FIN = 34
    TEMP_LOSS = 35
    FORMAL_LOSS = 36
    UNLOSS = 37
    REPLACE = 38
    CANCEL_CARD = 39
    FAMILY_BIND = 40
    FAMILY_UNBIND = 41
    PIN_CHANGE = 42
    PIN_RESET = 43
    PIN_UNLOCK = 44
    CREDIT_FIN = 45
    CREDIT_INS = 46


class ReqFlag:
    AU = 1
    PA = 2
    FP = 4
    PIN = 8
    PIN_REPLAY_OK = 16
    PIN_REPLAY_BAD = 32


class ResFlag:
    POSTED = 1
    DUPLICATE = 2
    ADMISSION = 4
    CUMULATIVE = 8
    TOMBSTONE = 16
    NO_POLICY = 32


class CardStatus:
    EMPTY = 0
    ISSUED = 1
    ACTIVE = 2
    TEMP_LOST = 3
    LOST = 4
    REPLACED = 5
    CANCELLED = 6


class CardFlag:
    FIN_ACTIVE = 1
    SOCIAL_PIN = 2
    STOLEN = 4


class InstKind:
    HOSPITAL = 1
    PHARMACY = 2
    BANK = 3
    MERCHANT = 4


def rc(code: str) -> int:
    """Response code as the engine stores it: 'A0' → 0x3041 (two ASCII chars, little-endian)."""
    assert len(code) == 2, code
    return ord(code[0]) | (ord(code[1]) << 8)


def rc_str(value: int) -> str:
    """Inverse of rc(): 0x3135 → '51'; 0 → '' (no code)."""
    if value == 0:
        return ""
    return chr(value & 0xFF) + chr(value >> 8)


def codes_of(results: np.ndarray) -> np.ndarray:
    """The response codes of a result array as 2-byte strings (a view, no copy)."""
    return results["code"].view("S2")
