"""Generated request batches for the demo, benchmarks and tests (fixed seeds, vectorised)."""
import numpy as np

from . import Engine, new_requests, Cmd, ReqFlag
from .cardkeys import CardKeys
from .demo import generated_pans, NAMED_CARDS


def generated_pan_hashes(keys: CardKeys, card_count: int) -> np.ndarray:
    return keys.pan_hash_rows(generated_pans(0, card_count))


def medical_settlements(engine: Engine, pan_hashes: np.ndarray, count: int, seed: int = 1,
                        first_stan: int = 1) -> np.ndarray:
    """`count` medical settlements (就医结算) by random generated cards at the 256 load terminals
    (T1000000…, tertiary hospital H11000000000001): inpatient or outpatient, totals 10–5,000 yuan,
    a random catalogue split. Keys are unique, so every row is a new transaction."""
    rng = np.random.default_rng(seed)
    q = new_requests(count)
    q["cmd"] = Cmd.MED_SETTLE
    q["flags"] = ReqFlag.AU | np.where(rng.random(count) < 0.5, ReqFlag.PA, 0).astype(np.uint8)
    q["med_type"] = np.where(rng.random(count) < 0.3, 21, 11)
    cards = rng.integers(0, pan_hashes.shape[0], count)
    q["pan_hash"] = pan_hashes[cards]
    total = rng.integers(1000, 500000, count)
    fo = total * rng.integers(0, 10, count) // 100
    ol = total * rng.integers(0, 3, count) // 100
    ps = total * rng.integers(0, 5, count) // 100
    q["amount_fen"] = total
    q["fo_fen"] = fo
    q["ol_fen"] = ol
    q["ps_fen"] = ps
    q["is_fen"] = total - fo - ol - ps
    first_terminal = engine.terminal_index["T1000000"]
    seq = np.arange(first_stan, first_stan + count, dtype=np.int64)
    q["terminal_index"] = first_terminal + seq % 256
    q["institution_index"] = engine.institution_index["H11000000000001"]
    q["stan"] = (seq // 256) % 999999 + 1
    q["batch_no"] = (seq // 256) // 999999 + 1
    q["local_date"] = 1124
    q["local_time"] = 120000
    q["idem_key"] = rng.integers(1, 2 ** 63, count, dtype=np.int64).astype(np.uint64) | np.uint64(1)
    q["content_hash"] = q["idem_key"] ^ np.uint64(0x5DEECE66D)
    return q
