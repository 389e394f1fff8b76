"""records_from_batch (the C pass, ledger/_records.pyx) against the numpy reference
(records_from_batch_numpy): byte for byte, on random requests and results that exercise every
sanitising rule (PIN given or not, each PIN outcome, PVVs on ISSUE / REPLACE and on others)."""
import numpy as np
import pytest

from yikatong.engine import REQUEST_DTYPE, RESULT_DTYPE, Cmd, ReqFlag
from yikatong.ledger.records import (KIND_COMMAND, RECORD_DTYPE, RECORD_LAYOUT_VERSION, records_from_batch,
                                     records_from_batch_numpy)


def random_batch(n: int, seed: int):
    rng = np.random.default_rng(seed)
    q = np.frombuffer(rng.integers(0, 256, n * REQUEST_DTYPE.itemsize, dtype=np.uint8).tobytes(), REQUEST_DTYPE).copy()
    r = np.frombuffer(rng.integers(0, 256, n * RESULT_DTYPE.itemsize, dtype=np.uint8).tobytes(), RESULT_DTYPE).copy()
    q["cmd"] = rng.choice([Cmd.ISSUE, Cmd.REPLACE, 1, 2, 40, 255], n)
    q["pin_pvv"] = np.where(rng.random(n) < 0.3, 0, q["pin_pvv"])
    r["pin_outcome"] = rng.integers(0, 4, n)
    return q, r


@pytest.mark.parametrize("n, seed", [(0, 1), (1, 2), (7, 3), (20_000, 4)])
def test_c_pass_equals_numpy_reference(n, seed):
    q, r = random_batch(n, seed)
    assert ((q["flags"] & ReqFlag.PIN) != 0).any() or n < 7          # the PIN rules are exercised
    expected = records_from_batch_numpy(q, r, 1_000_000_007, 20261124)
    found = records_from_batch(q, r, 1_000_000_007, 20261124)
    assert found.tobytes() == expected.tobytes()
    assert found["seq"].tolist() == list(range(1_000_000_007, 1_000_000_007 + n))


def test_exact_sanitising_and_head():
    q, r = np.zeros(4, REQUEST_DTYPE), np.zeros(4, RESULT_DTYPE)
    q["cmd"] = [1, 1, Cmd.ISSUE, 1]
    q["flags"] = [ReqFlag.PIN | 1, ReqFlag.PIN, 0, 0]
    q["pin_pvv"] = [1234, 1234, 5678, 91]
    r["pin_outcome"] = [1, 0, 0, 0]
    buffer = np.zeros(6, RECORD_DTYPE)
    records = records_from_batch(q, r, 5, 20261125, out=buffer)
    assert records.base is buffer or records.base is buffer.base
    assert records["request"]["flags"].tolist() == [ReqFlag.PIN_REPLAY_OK | 1, ReqFlag.PIN_REPLAY_BAD, 0, 0]
    assert records["request"]["pin_pvv"].tolist() == [0, 0, 5678, 0]
    assert records["layout_version"].tolist() == [RECORD_LAYOUT_VERSION] * 4
    assert records["record_kind"].tolist() == [KIND_COMMAND] * 4
    assert records["business_date"].tolist() == [20261125] * 4
    assert records["seq"].tolist() == [5, 6, 7, 8]
    assert buffer["seq"].tolist() == [5, 6, 7, 8, 0, 0]
    assert q["pin_pvv"].tolist() == [1234, 1234, 5678, 91]             # the caller's requests untouched
