"""Arrays saved by a build before 2026-11-30 — separate `years`, `payer_slot` and `pvv_social` card
columns, 168-byte transaction ring entries — are brought to today's layout when an Engine binds
them (state.upgrade_arrays), and the engine then answers exactly as the one they were saved from."""
import numpy as np

from yikatong.engine import Cmd, Engine, rc_str
from yikatong.engine.builders import medical, request
from yikatong.engine.state import _TXN_DTYPE_168

BD = 20261124
CLAIM = (5000000, 300000, 50000, 100000, 4550000)
YEARS_DTYPE = np.dtype([("admissions", "<u2", (2,)), ("acc_year", "<u2"), ("expiry_yymm", "<u2")])


def old_layout(arrays: dict) -> dict:
    """The arrays as the older build held them (what its checkpoint file contains)."""
    old = {name: a.copy() for name, a in arrays.items() if name not in ("side", "txns")}
    side = arrays["side"]
    old["years"] = np.zeros(side.shape[0], dtype=YEARS_DTYPE)
    for name in YEARS_DTYPE.names:
        old["years"][name] = side[name]
    old["payer_slot"] = side["payer_slot"].copy()
    old["pvv_social"] = side["pvv_social"].copy()
    old["txns"] = np.zeros(arrays["txns"].shape[0], dtype=_TXN_DTYPE_168)
    for name in _TXN_DTYPE_168.names:
        if name in arrays["txns"].dtype.names and name != "reserved0":
            old["txns"][name] = arrays["txns"][name]
    return old


def test_old_checkpoint_arrays_answer_the_same(demo):
    engine, keys = demo
    settled = [engine.apply_batch(q, business_date=BD)[0].copy() for q in (
        medical(engine, keys, "6214830000000017", "T0000001", *CLAIM, stan=501),
        # 家庭共济: …0041 pays through its payer …0082 (payer_slot), social PIN enabled (pvv_social)
        medical(engine, keys, "6214830000000041", "T0000004", 70000, 0, 0, 0, 70000, med_type=41,
                pin="147258", stan=502),
    )]
    assert [rc_str(r["code"]) for r in settled] == ["00", "00"]
    restored = Engine(engine.config, arrays=old_layout(engine.arrays))
    assert "years" not in restored.arrays and "payer_slot" not in restored.arrays
    assert restored.arrays["side"].tobytes() == engine.arrays["side"].tobytes()
    for name in engine.arrays["txns"].dtype.names:
        if name not in ("pin_outcome", "reserved0"):      # the old entry had no pin_outcome
            assert (restored.arrays["txns"][name] == engine.arrays["txns"][name]).all(), name

    # the same messages to both: a repeat (stored answer), a cancel of the family-aid
    # settlement, a reversal of the first, a new settlement
    later = [
        medical(engine, keys, "6214830000000017", "T0000001", *CLAIM, stan=501),
        request(engine, keys, Cmd.MED_CANCEL, pan="6214830000000041", terminal="T0000004",
                amount_fen=70000, orig_rrn=int(settled[1]["rrn"]), stan=503),
        request(engine, keys, Cmd.REVERSAL, pan="6214830000000017", terminal="T0000001", stan=501,
                amount_fen=CLAIM[0]),
        medical(engine, keys, "6214830000000033", "T0000003", *CLAIM, stan=504),
    ]
    codes = []
    for q in later:
        a = engine.apply_batch(q, business_date=BD)
        b = restored.apply_batch(q, business_date=BD)
        assert a.tobytes() == b.tobytes(), rc_str(a[0]["code"])
        codes.append((rc_str(a[0]["code"]), int(a[0]["outcome_flags"])))
    # 2: duplicate; 1: posted; 5: posted and one admission counted (per-admission inpatient policy)
    assert codes == [("00", 2), ("00", 1), ("00", 1), ("00", 5)]
    for name in ("cards", "side", "meta", "idem_index", "rev_index"):
        assert restored.arrays[name].tobytes() == engine.arrays[name].tobytes(), name
