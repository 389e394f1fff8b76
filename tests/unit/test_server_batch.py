"""The server's per-batch bookkeeping in C (protocols/_batch.pyx) against the numpy reference it
replaced on the live path (`Terminals.count_batch` + `reversed_commands`, `Metrics.count`): worked
cases with exact totals, then random batches where both must agree to the fen."""
import collections

import numpy as np
import pytest

from yikatong.engine import Cmd, new_requests, new_results, rc
from yikatong.protocols import _batch, _codec
from yikatong.protocols.server import (CREDIT_SIGN, DEBIT_SIGN, REVERSED_BY_60_1_TABLE, Metrics,
                                       Terminals)

WK_INVALID, WK_ENGINE, WK_SIGNON, WK_SETTLE = 0, 1, 2, 5
WF_NO_REPLY = 4
RES_DUPLICATE, RES_TOMBSTONE = 2, 16


def terminals(count: int, batch_no) -> Terminals:
    """The totals side of Terminals only (no node, no keys)."""
    t = Terminals.__new__(Terminals)
    t.batch_no = np.asarray(batch_no, np.int64).copy()
    for name in ("debit_fen", "debit_count", "credit_fen", "credit_count"):
        setattr(t, name, np.zeros(count, np.int64))
    return t


def counters(t: Terminals, metrics: Metrics) -> _batch.BatchCounters:
    return _batch.BatchCounters(DEBIT_SIGN, CREDIT_SIGN, REVERSED_BY_60_1_TABLE, t.batch_no, t.debit_fen,
                                t.debit_count, t.credit_fen, t.credit_count, metrics.message_counts.reshape(-1))


def rows(spec):
    """spec: (kind, cmd, terminal, batch_no, amount_fen, code, outcome_flags, f60_1) per row."""
    n = len(spec)
    q, r, w = new_requests(n), new_results(n), np.zeros(n, _codec.WIRE_DTYPE)
    for i, (kind, cmd, term, batch, amount, code, flags, f60_1) in enumerate(spec):
        w[i]["kind"], w[i]["f60_1"] = kind, f60_1
        q[i]["cmd"], q[i]["terminal_index"], q[i]["batch_no"], q[i]["amount_fen"] = cmd, term, batch, amount
        r[i]["code"], r[i]["outcome_flags"] = rc(code) if code else 0, flags
    return q, r, w


def test_worked_batch_totals_and_counts():
    t, m = terminals(2, [1, 7]), Metrics()
    q, r, w = rows([
        (WK_ENGINE, Cmd.MED_SETTLE, 0, 1, 12_345, "00", 0, 81),              # debit 123.45
        (WK_ENGINE, Cmd.MED_SETTLE, 0, 1, 500, "10", 0, 81),                 # partial approval counts
        (WK_ENGINE, Cmd.MED_SETTLE, 0, 1, 9_999, "00", RES_DUPLICATE, 81),   # a repeat: no effect
        (WK_ENGINE, Cmd.MED_SETTLE, 0, 1, 7_000, "51", 0, 81),               # declined
        (WK_ENGINE, Cmd.MED_SETTLE, 0, 2, 8_000, "00", 0, 81),               # another batch number
        (WK_ENGINE, Cmd.REVERSAL, 0, 1, 500, "00", 0, 81),                   # takes the 500 out
        (WK_ENGINE, Cmd.REVERSAL, 0, 1, 4_000, "00", RES_TOMBSTONE, 81),     # unknown original
        (WK_ENGINE, Cmd.REFUND, 1, 7, 2_500, "00", 0, 25),                   # credit on terminal 1
        (WK_ENGINE, Cmd.MED_PRESETTLE, 1, 7, 3_000, "00", 0, 83),            # posts nothing
        (WK_SIGNON, 0, 0, 1, 0, "", 0, 0),                                   # not an engine row
        (WK_ENGINE, Cmd.MED_SETTLE, -1, 1, 100, "97", 0, 81),                # unregistered terminal
    ])
    assert counters(t, m).count(q, r, w, len(q)) == 0
    assert t.debit_fen.tolist() == [12_345, 0] and t.debit_count.tolist() == [1, 0]
    assert t.credit_fen.tolist() == [0, 2_500] and t.credit_count.tolist() == [0, 1]
    assert dict(m.all_messages()) == {("med_settle", "00"): 3, ("med_settle", "10"): 1, ("med_settle", "51"): 1,
                                      ("med_settle", "97"): 1, ("reversal", "00"): 2, ("refund", "00"): 1,
                                      ("med_presettle", "00"): 1}


def test_summarize_counts_kinds():
    q, r, w = rows([(WK_ENGINE, 5, 0, 1, 0, "", 0, 0)] * 3 + [(WK_SETTLE, 0, 0, 1, 0, "", 0, 0),
                                                             (WK_INVALID, 0, 0, 1, 0, "", 0, 0)] + [
        (WK_INVALID, 0, 0, 1, 0, "", 0, 0)])
    w[5]["flags"] = WF_NO_REPLY
    assert _batch.summarize(w, 6) == (3, 1, 2, 1)
    assert _batch.summarize(w, 3) == (3, 0, 0, 0)


def test_reply_runs_slice_the_packed_replies():
    w = np.zeros(6, _codec.WIRE_DTYPE)
    w["reply_len"] = [100, 0, 120, 90, 90, 30]
    a, b, c = object(), object(), object()
    assert _batch.reply_runs(w, [(a, 2), (b, 3), (c, 1)]) == [(a, 0, 100, 2), (b, 100, 400, 3), (c, 400, 430, 1)]


def test_code_outside_the_alphabet_is_left_to_the_caller():
    t, m = terminals(1, [1]), Metrics()
    q, r, w = rows([(WK_ENGINE, Cmd.MED_SETTLE, 0, 1, 100, "00", 0, 81), (WK_ENGINE, Cmd.MED_SETTLE, 0, 1, 100, "", 0, 81)])
    r[1]["code"] = 0x2A2A                                        # "**"
    assert counters(t, m).count(q, r, w, 2) == 1
    m.count_unusual(q["cmd"], r["code"])
    assert dict(m.all_messages()) == {("med_settle", "00"): 1, ("med_settle", "**"): 1}


@pytest.mark.parametrize("seed", range(8))
def test_random_batches_agree_with_the_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    count, n = 5, 3000
    batch_no = rng.integers(1, 3, count)
    ours, theirs = terminals(count, batch_no), terminals(count, batch_no)
    m_ours, m_theirs = Metrics(), Metrics()
    kinds = rng.choice([WK_ENGINE] * 8 + [WK_INVALID, WK_SIGNON], n)
    cmds = rng.choice([Cmd.PURCHASE, Cmd.VOID, Cmd.REFUND, Cmd.MED_SETTLE, Cmd.MED_CANCEL, Cmd.MED_PRESETTLE,
                       Cmd.DEPOSIT, Cmd.WITHDRAW, Cmd.TRANSFER, Cmd.REVERSAL, Cmd.BALANCE], n)
    codes = rng.choice(["00", "10", "51", "A0", "12", "94"], n)
    spec = [(int(kinds[i]), int(cmds[i]), int(rng.integers(-1, count)), int(rng.integers(1, 3)),
             int(rng.integers(1, 10**7)), str(codes[i]), int(rng.choice([0, 0, 0, RES_DUPLICATE, RES_TOMBSTONE])),
             int(rng.choice([22, 23, 25, 81, 82, 83, 91, 92, 93, 1]))) for i in range(n)]
    q, r, w = rows(spec)
    assert counters(ours, m_ours).count(q, r, w, n) == 0
    engine = np.flatnonzero(w["kind"] == WK_ENGINE)
    theirs.count_batch(q[engine], r[engine], Terminals.reversed_commands(q[engine], w[engine]))
    m_theirs.count(q["cmd"][engine], r["code"][engine])
    for name in ("debit_fen", "debit_count", "credit_fen", "credit_count"):
        assert getattr(ours, name).tolist() == getattr(theirs, name).tolist(), name
    assert m_ours.all_messages() == collections.Counter(m_theirs.messages)
    assert m_ours.render() == m_theirs.render()


def test_counters_refuse_wrong_arrays():
    t, m = terminals(2, [1, 1]), Metrics()
    with pytest.raises(TypeError, match="debit_fen: expecting a writeable C-contiguous int64 array of 2 values"):
        _batch.BatchCounters(DEBIT_SIGN, CREDIT_SIGN, REVERSED_BY_60_1_TABLE, t.batch_no, t.debit_fen[:1],
                             t.debit_count, t.credit_fen, t.credit_count, m.message_counts.reshape(-1))
    q, r, w = rows([(WK_ENGINE, Cmd.MED_SETTLE, 0, 1, 100, "00", 0, 81)])
    with pytest.raises(TypeError, match=r"requests: expecting a C-contiguous row array of 160-byte rows, at least 2 rows; "
                                          r"found 160-byte rows, shape \(1,\)"):
        counters(t, m).count(q, r, w, 2)
