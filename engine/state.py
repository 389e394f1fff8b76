"""The engine's state as a dict of numpy arrays: card columns, indexes, policy tables,
institutions, terminals, the transaction ring. One place creates them, so checkpoints (which
save and load exactly this dict) and the Core agree on names, dtypes and shapes.

Memory per card: 96 bytes of columns + 2 indexes × 2–4 buckets × 4 bytes = 112–128 bytes
(DESIGN.md §3 allows 128; an index has a power of two ≥ 2 × capacity buckets).
bench/bench_engine.py measures it with 10 million cards.
"""
import numpy as np

from .config import NodeConfig
from . import _core
from .layouts import InstKind, POLICY_DTYPE, TXN_DTYPE, BANDS_MAX, Cmd, CARD_HOT_DTYPE, CARD_SIDE_DTYPE

VISIT_TYPES = (11, 14, 21, 41)       # index = visit kind in the dense policy table
LEVELS = 4                           # hospital level 0..3
PERSON_TYPES = {"in_service": (0,), "retired": (1,), "any": (0, 1)}
KINDS = {"hospital": InstKind.HOSPITAL, "pharmacy": InstKind.PHARMACY, "bank": InstKind.BANK,
         "merchant": InstKind.MERCHANT}
META_TXN_COUNT, META_WARNINGS, META_CARD_COUNT, META_TRIES_SOCIAL, META_TRIES_BANK, META_AID_BENEFICIARIES = range(6)
META_SIZE = 16

# (name, dtype) of every per-card column. What a settlement touches is in two of them: `cards`,
# one 64-byte cache line per card (engine/_core.pxd: CardHot), and `side`, 16 bytes (CardSide:
# year counters, expiry, family-aid payer, social PVV) — two lines per card instead of the four
# separate columns these were until 2026-11-30.
CARD_COLUMNS = (
    ("cards", CARD_HOT_DTYPE), ("side", CARD_SIDE_DTYPE), ("person_hash", np.uint64),
    ("pvv_bank", np.uint32), ("temp_loss_until", np.uint32),
)



class ConfigError(ValueError):
    """The node configuration is inconsistent; the message names the entry and the remedy."""


def _pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p <<= 1
    return p


def card_arrays(capacity: int) -> dict:
    """Empty card columns and indexes for `capacity` cards (indexes at load ≤ 0.5)."""
    arrays = {}
    for name, dtype in CARD_COLUMNS:
        arrays[name] = np.zeros(capacity, dtype=dtype)
    arrays["cards"] = _core.aligned_copy(arrays["cards"])
    arrays["side"] = _core.aligned_copy(arrays["side"])
    arrays["side"]["payer_slot"] = -1
    buckets = _pow2_at_least(max(2 * capacity, 16))
    arrays["pan_index"] = np.full(buckets, -1, dtype=np.int32)
    arrays["person_index"] = np.full(buckets, -1, dtype=np.int32)
    return arrays


# The ring entry of builds before 2026-11-30 (168 bytes), read by upgrade_arrays.
_TXN_DTYPE_168 = np.dtype([
    ("idem_key", "<u8"), ("content_hash", "<u8"), ("rev_key", "<u8"), ("rrn", "<u8"),
    ("orig_rrn", "<u8"), ("amount_fen", "<i8"), ("fund_fen", "<i8"), ("deductible_fen", "<i8"),
    ("ins_leg_fen", "<i8"), ("aid_leg_fen", "<i8"), ("fin_leg_fen", "<i8"), ("cash_fen", "<i8"),
    ("refunded_fen", "<i8"), ("ins_balance_fen", "<i8"), ("fin_balance_fen", "<i8"),
    ("other_balance_fen", "<i8"), ("card_slot", "<i4"), ("other_slot", "<i4"),
    ("business_date", "<u4"), ("stan", "<u4"), ("batch_no", "<u4"), ("terminal_index", "<i4"),
    ("auth_code", "<u4"), ("code", "<u2"), ("cmd", "u1"), ("state", "u1"),
    ("outcome_flags", "u1"), ("acc_group", "u1"), ("reserved0", "u1", (6,)),
])


# Arrays a checkpoint does not hold: derived from the others and rebuilt when the arrays are
# loaded (upgrade_arrays). The two transaction indexes are 64 bytes per ring entry (67 MB of
# the demo node's 247 MB) written at random, so a checkpoint's copy could not be spread over
# the batches as the ring's is; rebuilt from the ring they cost the loop nothing
# (docs/engine.md, "The transaction indexes, derived").
DERIVED_ARRAYS = ("idem_index", "rev_index")


def saved_arrays(arrays: dict) -> dict:
    """The arrays a checkpoint holds: all but DERIVED_ARRAYS."""
    return {name: array for name, array in arrays.items() if name not in DERIVED_ARRAYS}


def index_content(table: np.ndarray) -> np.ndarray:
    """A transaction index's used buckets sorted by key: what it answers, whatever its layout
    (each key is in an index once; two layouts of the same buckets answer alike)."""
    used = table[table["pos"] >= 0]
    return used[np.argsort(used["key"], kind="stable")]


def upgrade_arrays(arrays: dict) -> dict:
    """Arrays saved by an older build or a checkpoint in today's layout, in place: the separate
    `years`, `payer_slot` and `pvv_social` columns folded into `side`, a 168-byte transaction
    ring rewritten field by field as today's 160-byte entries, and the transaction indexes
    (DERIVED_ARRAYS) rebuilt from the ring when absent. Others unchanged."""
    if "side" not in arrays and "years" in arrays:
        side = np.zeros(arrays["years"].shape[0], dtype=CARD_SIDE_DTYPE)
        for name in ("admissions", "acc_year", "expiry_yymm"):
            side[name] = arrays["years"][name]
        side["payer_slot"] = arrays.pop("payer_slot")
        side["pvv_social"] = arrays.pop("pvv_social")
        del arrays["years"]
        arrays["side"] = _core.aligned_copy(side)
    if "txns" in arrays and arrays["txns"].dtype == _TXN_DTYPE_168:
        old = arrays["txns"]
        txns = np.zeros(old.shape[0], dtype=TXN_DTYPE)
        for name in TXN_DTYPE.names:
            if name in old.dtype.names and name != "reserved0":   # new: pin_outcome (0 = not kept)
                txns[name] = old[name]
        arrays["txns"] = txns
    if "txns" in arrays and not all(name in arrays for name in DERIVED_ARRAYS):
        # uninitialised: rebuild_txn_indexes clears them before it fills them
        arrays.update({name: np.empty(2 * arrays["txns"].shape[0], dtype=BUCKET_DTYPE) for name in DERIVED_ARRAYS})
        twice = _core.rebuild_txn_indexes(arrays)
        if twice:
            raise ConfigError(f"the transaction ring holds {twice} idempotency key(s) on two live entries: "
                              "these arrays were not written by this engine. Remedy: move that checkpoint "
                              "(and its .json) out of checkpoints/; the node then recovers from an older one")
    return arrays


def policy_arrays(config: NodeConfig) -> dict:
    """Dense policy table [region][ins type][person type][visit kind][level] → policy row."""
    regions = {r.code: i for i, r in enumerate(config.regions)}
    ins_types = {t.code: i for i, t in enumerate(config.ins_types)}
    if len(regions) > 255 or len(ins_types) > 255:
        raise ConfigError("at most 255 regions and 255 insurance types per node: split the node")
    policy_of = np.full((len(regions), len(ins_types), 2, len(VISIT_TYPES), LEVELS), -1, dtype=np.int16)
    policies = np.zeros(len(config.policies), dtype=POLICY_DTYPE)
    for pid, p in enumerate(config.policies):
        where = f"policies[{pid}] ({p.name})"
        if len(p.bands) > BANDS_MAX:
            raise ConfigError(f"{where}: {len(p.bands)} bands, at most {BANDS_MAX}")
        row = policies[pid]
        row["deductible_first_fen"] = p.deductible_first_fen
        row["deductible_later_fen"] = p.deductible_later_fen if p.per_admission else p.deductible_first_fen
        row["cap_fen"] = p.cap_fen
        row["band_count"] = len(p.bands)
        for k, band in enumerate(p.bands):
            row["band_upper_fen"][k] = band.upper_fen if band.upper_fen is not None else np.iinfo(np.int64).max
            row["band_ratio_bp"][k] = band.ratio_bp
            if not 0 <= band.ratio_bp <= 10000:
                raise ConfigError(f"{where}: band {k} ratio_bp {band.ratio_bp}, expecting 0..10000")
        row["per_admission"] = p.per_admission
        row["acc_group"] = 1 if 21 in p.visit_types else 0
        row["fund_pays"] = p.fund_pays
        r_idx = list(regions.values()) if p.region is None else [regions.get(p.region, -1)]
        t_idx = list(ins_types.values()) if p.ins_type is None else [ins_types.get(p.ins_type, -1)]
        if -1 in r_idx or -1 in t_idx:
            raise ConfigError(f"{where}: region {p.region} or insurance type {p.ins_type} is not configured")
        levels = p.levels or list(range(LEVELS))
        for v in p.visit_types:
            if v not in VISIT_TYPES:
                raise ConfigError(f"{where}: visit type {v}, expecting one of {VISIT_TYPES}")
            for r in r_idx:
                for t in t_idx:
                    for person in PERSON_TYPES[p.person_type]:
                        for level in levels:
                            # the first matching policy in the file wins: specific ones go first
                            cell = policy_of[r, t, person, VISIT_TYPES.index(v), level]
                            if cell < 0:
                                policy_of[r, t, person, VISIT_TYPES.index(v), level] = pid
    return {
        "policy_of": policy_of.reshape(-1),
        "policies": policies,
        "region_codes": np.array([r.code for r in config.regions], dtype=np.uint32),
        "region_temp_loss_days": np.array([r.temp_loss_days for r in config.regions], dtype=np.uint8),
        "ins_type_codes": np.array([t.code for t in config.ins_types], dtype=np.uint16),
    }


def registry_arrays(config: NodeConfig) -> dict:
    regions = {r.code: i for i, r in enumerate(config.regions)}
    inst_index = {}
    kind = np.zeros(len(config.institutions), dtype=np.uint8)
    region = np.zeros(len(config.institutions), dtype=np.uint8)
    level = np.zeros(len(config.institutions), dtype=np.uint8)
    for i, inst in enumerate(config.institutions):
        if inst.code in inst_index:
            raise ConfigError(f"institutions[{i}]: code appears twice")
        if inst.region not in regions:
            raise ConfigError(f"institutions[{i}] ({inst.code}): region {inst.region} is not configured")
        inst_index[inst.code] = i
        kind[i] = KINDS[inst.kind]
        region[i] = regions[inst.region]
        level[i] = inst.level
    term_inst = np.zeros(len(config.terminals), dtype=np.int32)
    for i, term in enumerate(config.terminals):
        if term.institution not in inst_index:
            raise ConfigError(f"terminals[{i}] ({term.terminal_id}): institution {term.institution} is not configured")
        term_inst[i] = inst_index[term.institution]
    return {"inst_kind": kind, "inst_region": region, "inst_level": level, "term_inst": term_inst}


BUCKET_DTYPE = np.dtype([("key", "<u8"), ("pos", "<i4"), ("reserved0", "<u4")])


def _empty_buckets(n: int) -> np.ndarray:
    buckets = np.zeros(n, dtype=BUCKET_DTYPE)
    buckets["pos"] = -1
    return buckets


def txn_arrays(retention_count: int) -> dict:
    """The transaction ring (idempotency, reversals, originals), `retention_count` entries."""
    n = _pow2_at_least(max(retention_count, 16))
    # Touch every page now (np.zeros maps lazily): first-touch page faults would otherwise land
    # on the hot path and cost more than the apply itself (measured: half the time of 1 M applies).
    txns = np.empty(n, dtype=TXN_DTYPE)
    txns.view(np.uint8).fill(0)
    return {
        "txns": txns,
        "idem_index": _empty_buckets(2 * n),
        "rev_index": _empty_buckets(2 * n),
    }


def limits_array(config: NodeConfig) -> np.ndarray:
    limits = np.zeros(64, dtype=np.int64)
    limits[Cmd.PURCHASE] = config.limits.purchase_fen_max
    limits[Cmd.WITHDRAW] = config.limits.withdrawal_fen_max
    limits[Cmd.TRANSFER] = config.limits.transfer_fen_max
    limits[Cmd.DEPOSIT] = config.limits.deposit_fen_max
    limits[0] = config.limits.family_aid_per_settlement_fen_max    # LIMIT_FAMILY_AID (_core.pxd)
    return limits


def new_state(config: NodeConfig, card_capacity: int, txn_retention_count: int) -> dict:
    arrays = {}
    arrays.update(card_arrays(card_capacity))
    arrays.update(policy_arrays(config))
    arrays.update(registry_arrays(config))
    arrays.update(txn_arrays(txn_retention_count))
    arrays["limits_fen"] = limits_array(config)
    meta = np.zeros(META_SIZE, dtype=np.uint64)
    meta[META_TRIES_SOCIAL] = config.limits.pin_tries_social_max
    meta[META_TRIES_BANK] = config.limits.pin_tries_bank_max
    meta[META_AID_BENEFICIARIES] = config.limits.family_aid_beneficiaries_per_payer_max
    arrays["meta"] = meta
    return arrays


def card_bytes(arrays: dict) -> int:
    """Bytes held per card slot by card columns and card indexes."""
    names = [c[0] for c in CARD_COLUMNS] + ["pan_index", "person_index"]
    return sum(arrays[n].nbytes for n in names)
