"""The demo node of ../shared/DEMO.md: configuration, named cards, generated cards.

A contract: independent clients and tests rely on every value here. Change them only together
with DEMO.md. Amounts are fen.
"""
import datetime

import numpy as np

from . import Engine, new_requests, Cmd, CardStatus, CardFlag
from .cardkeys import CardKeys, DEMO_DATA_KEY
from .config import (Band, InstitutionSpec, InsTypeSpec, Limits, NodeConfig, PolicySpec,
                     RegionSpec, TerminalSpec)

ENGINE_INSTITUTION_ID = "48020000"
DEMO_TMK_HEX = "0123456789ABCDEFFEDCBA9876543210"
BANK_PIN = "888888"
INITIAL_SOCIAL_PIN = "123456"        # the initial social PIN: counts as "not enabled"
EXPIRY_YYMM = 3012
EMPLOYEE = 310                       # 职工 insurance type


def demo_config() -> NodeConfig:
    bj, sh = 110000, 310000
    # Specific policies first: the first matching policy wins for each cell.
    policies = [
        PolicySpec("BJ-E-IN", bj, EMPLOYEE, "in_service", [21], [3], 130000, 65000, True,
                   [Band(8500, 3000000), Band(9000, 4000000), Band(9500)], 50000000),
        PolicySpec("BJ-E-IN-2", bj, EMPLOYEE, "in_service", [21], [1, 2], 130000, 65000, True,
                   [Band(9000, 3000000), Band(9500, 4000000), Band(9700)], 50000000),
        PolicySpec("BJ-E-RT", bj, EMPLOYEE, "retired", [21], [], 130000, 65000, True,
                   [Band(9100, 3000000), Band(9400, 4000000), Band(9700)], 50000000),
        PolicySpec("BJ-E-OUT", bj, EMPLOYEE, "any", [11, 14], [], 180000, 0, False,
                   [Band(7000)], 2000000),
        PolicySpec("SH-E-IN", sh, EMPLOYEE, "in_service", [21], [], 150000, 150000, True,
                   [Band(8500)], 63000000),
        PolicySpec("SH-E-RT", sh, EMPLOYEE, "retired", [21], [], 150000, 150000, True,
                   [Band(9200)], 63000000),
        PolicySpec("SH-E-OUT", sh, EMPLOYEE, "any", [11, 14], [], 150000, 0, False,
                   [Band(6500)], 2000000),
        PolicySpec("pharmacy", None, None, "any", [41], [], fund_pays=False),
    ]
    institutions = [
        InstitutionSpec("H11000000000001", "hospital", bj, 3),
        InstitutionSpec("H11000000000002", "hospital", bj, 2),
        InstitutionSpec("H31000000000001", "hospital", sh, 3),
        InstitutionSpec("P11000000000001", "pharmacy", bj),
        InstitutionSpec("B11000000000001", "bank", bj),
        InstitutionSpec("M11000000000001", "merchant", bj),
    ]
    terminals = [TerminalSpec(f"T000000{i}", inst) for i, inst in enumerate(
        ["H11000000000001", "H11000000000002", "H31000000000001", "P11000000000001",
         "B11000000000001", "M11000000000001"], start=1)]
    terminals.append(TerminalSpec("T0000007", "H11000000000001", "cups-ecb"))
    terminals += [TerminalSpec(f"T1{k:06d}", "H11000000000001") for k in range(256)]
    return NodeConfig(
        institution_id=ENGINE_INSTITUTION_ID,
        regions=[RegionSpec(bj, "Beijing 北京", 7), RegionSpec(sh, "Shanghai 上海", 7)],
        ins_types=[InsTypeSpec(EMPLOYEE, "employee 职工")],
        policies=policies, institutions=institutions, terminals=terminals, limits=Limits(),
    )


# (PAN, 社会保障号码, region, retired, insurance fen, financial fen, status, flags, social PIN)
_A = CardStatus.ACTIVE
_FIN = CardFlag.FIN_ACTIVE
NAMED_CARDS = (
    ("6214830000000017", "110105196503120013", 110000, 0, 200000, 2000000, _A, _FIN, None),
    ("6214830000000025", "310104195807150023", 310000, 0, 200000, 2000000, _A, _FIN, None),
    ("6214830000000033", "310104195201010034", 310000, 1, 200000, 2000000, _A, _FIN, None),
    ("6214830000000041", "11010819800101004X", 110000, 0, 50000, 100000, _A, _FIN | CardFlag.SOCIAL_PIN, "147258"),
    ("6214830000000058", "110108198505050053", 110000, 0, 50000, 100000, CardStatus.LOST, _FIN, None),
    ("6214830000000066", "110108199009090069", 110000, 0, 50000, 100000, CardStatus.CANCELLED, _FIN, None),
    ("6214830000000074", "110105197007070074", 110000, 1, 0, 0, CardStatus.ISSUED, 0, None),
    ("6214830000000082", "110105197208080084", 110000, 0, 10000, 500000, _A, _FIN, None),
)
FAMILY_AID = (("6214830000000041", "6214830000000082"),)   # (beneficiary, payer)

GENERATED_TERMINALS = tuple(f"T1{k:06d}" for k in range(256))


def luhn_check_digit(digits: np.ndarray) -> np.ndarray:
    """Luhn check digit for each row of an (n, w) array of digit values."""
    w = digits.shape[1]
    d = digits[:, ::-1].astype(np.int64)            # rightmost payload digit is doubled
    doubled = d[:, 0::2] * 2
    doubled = np.where(doubled > 9, doubled - 9, doubled)
    total = doubled.sum(axis=1) + d[:, 1::2].sum(axis=1)
    return (10 - total % 10) % 10


def luhn_ok(pan: str) -> bool:
    digits = np.array([[int(c) for c in pan[:-1]]])
    return pan.isdigit() and int(luhn_check_digit(digits)[0]) == int(pan[-1])


def citizen_check_char(first17: str) -> str:
    """GB 11643 check character (DOMAIN.md §1)."""
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    return "10X98765432"[sum(int(c) * w for c, w in zip(first17, weights)) % 11]


def generated_pans(start: int, count: int) -> np.ndarray:
    """PAN text of generated cards k = start … start+count−1 as an (n, 16) uint8 ASCII array:
    62148301 + k as 7 digits + Luhn check digit (DEMO.md)."""
    k = np.arange(start, start + count, dtype=np.int64)
    digits = np.empty((count, 16), dtype=np.uint8)
    digits[:, :8] = np.frombuffer(b"62148301", dtype=np.uint8) - 48
    for pos in range(7):
        digits[:, 8 + pos] = (k // 10 ** (6 - pos)) % 10
    digits[:, 15] = luhn_check_digit(digits[:, :15])
    return digits + 48


def generated_citizen_ids(start: int, count: int) -> np.ndarray:
    """社会保障号码 of generated cards as (n, 18) ASCII: region 110101 (even k) or 310101 (odd),
    birth date 1950-01-01 + (k // 2) // 1000 days, sequence (k // 2) % 1000, GB 11643 check."""
    k = np.arange(start, start + count, dtype=np.int64)
    j = k // 2
    births = np.datetime64("1950-01-01") + (j // 1000).astype("timedelta64[D]")
    years = births.astype("datetime64[Y]").astype(np.int64) + 1970
    months = (births.astype("datetime64[M]").astype(np.int64) % 12) + 1
    days = (births - births.astype("datetime64[M]")).astype(np.int64) + 1
    out = np.empty((count, 18), dtype=np.int64)
    region = np.where(k % 2 == 0, 110101, 310101)
    for pos, (value, width) in enumerate(((region, 6), (years, 4), (months, 2), (days, 2), (j % 1000, 3))):
        base = sum(w for _, w in ((region, 6), (years, 4), (months, 2), (days, 2), (j % 1000, 3))[:pos])
        for d in range(width):
            out[:, base + d] = (value // 10 ** (width - 1 - d)) % 10
    weights = np.array((7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2))
    check = np.frombuffer(b"10X98765432", dtype=np.uint8)[(out[:, :17] * weights).sum(axis=1) % 11]
    text = (out + 48).astype(np.uint8)
    text[:, 17] = check
    return np.ascontiguousarray(text)


def issue_requests_named(keys: CardKeys) -> np.ndarray:
    q = new_requests(len(NAMED_CARDS))
    for i, (pan, cid, region, retired, ins, fin, status, flags, social_pin) in enumerate(NAMED_CARDS):
        h = keys.pan_hash(pan)
        q[i]["cmd"] = Cmd.ISSUE
        q[i]["pan_hash"] = h
        q[i]["pan_last4"] = int(pan[-4:])
        q[i]["person_hash"] = keys.person_hash(cid)
        q[i]["region_code"] = region
        q[i]["ins_type"] = EMPLOYEE
        q[i]["acct_type"] = retired | (flags << 4)
        q[i]["med_type"] = status
        q[i]["amount_fen"] = ins
        q[i]["amount2_fen"] = fin
        q[i]["pin_pvv"] = keys.pvv(h, BANK_PIN)
        q[i]["pin_pvv_new"] = keys.pvv(h, social_pin or INITIAL_SOCIAL_PIN)
        q[i]["expiry_yymm"] = EXPIRY_YYMM
    return q


def issue_requests_generated(keys: CardKeys, start: int, count: int) -> np.ndarray:
    """ISSUE rows for generated cards k = start … start+count−1 (vectorised: 10 M in seconds)."""
    k = np.arange(start, start + count, dtype=np.int64)
    pans = generated_pans(start, count)
    q = new_requests(count)
    q["cmd"] = Cmd.ISSUE
    q["pan_hash"] = keys.pan_hash_rows(pans)
    q["pan_last4"] = ((pans[:, 12:16].astype(np.int64) - 48) * np.array([1000, 100, 10, 1])).sum(axis=1)
    q["person_hash"] = keys.person_hash_rows(generated_citizen_ids(start, count))
    q["region_code"] = np.where(k % 2 == 0, 110000, 310000)
    q["ins_type"] = EMPLOYEE
    q["acct_type"] = (k % 3 == 0).astype(np.uint8) | (CardFlag.FIN_ACTIVE << 4)
    q["med_type"] = CardStatus.ACTIVE
    q["amount_fen"] = 100000 + (k % 1000) * 100
    q["amount2_fen"] = 5000000
    q["pin_pvv"] = keys.pvv_many(q["pan_hash"], BANK_PIN)
    q["pin_pvv_new"] = keys.pvv_many(q["pan_hash"], INITIAL_SOCIAL_PIN)
    q["expiry_yymm"] = EXPIRY_YYMM
    return q


def family_requests(engine: Engine, keys: CardKeys) -> np.ndarray:
    q = new_requests(len(FAMILY_AID))
    for i, (beneficiary, payer) in enumerate(FAMILY_AID):
        q[i]["cmd"] = Cmd.FAMILY_BIND
        q[i]["pan_hash"] = keys.pan_hash(beneficiary)
        q[i]["pan2_hash"] = keys.pan_hash(payer)
    return q


def today() -> int:
    d = datetime.date.today()
    return d.year * 10000 + d.month * 100 + d.day


def genesis_batches(keys: CardKeys, generated_cards: int, chunk: int = 1_000_000):
    """The commands that build the demo node, in order: named cards, family aid, generated cards."""
    yield issue_requests_named(keys)
    yield family_requests(None, keys)
    for start in range(0, generated_cards, chunk):
        yield issue_requests_generated(keys, start, min(chunk, generated_cards - start))


def demo_engine(generated_cards: int = 100_000, business_date: int | None = None,
                txn_retention_count: int = 1 << 20, data_key: bytes = DEMO_DATA_KEY, config: NodeConfig | None = None):
    """An Engine holding exactly the demo node (without a journal). Returns (engine, keys)."""
    keys = CardKeys(data_key)
    engine = Engine(config or demo_config(), card_capacity=len(NAMED_CARDS) + generated_cards,
                    txn_retention_count=txn_retention_count)
    bd = business_date or today()
    for batch in genesis_batches(keys, generated_cards):
        results = engine.apply_batch(batch, business_date=bd)
        bad = results["code"] != 0x3030
        if bad.any():
            raise RuntimeError(f"demo genesis: {int(bad.sum())} command(s) refused, first code "
                               f"{results['code'][bad][0]:#x}")
    return engine, keys
