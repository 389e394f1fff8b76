"""`yikatong load` against a real `yikatong serve` (port 0, real LMDB): open loop at an offered
rate and closed loop, under asyncio and uvloop. The report's counts are checked against the
journal and against each other: every request answered, every reply's MAC verified, every
approval the generator was told is in the ledger with its amount, the 0500 totals agree."""
import json

import pytest

from yikatong.ledger.journal import Journal

from server_fixture import ServerProcess, run_yikatong

CARDS = 1000


def load(srv, *args) -> dict:
    done = run_yikatong("load", "--port", str(srv.port), "--cards", str(CARDS), "--data", srv.data_dir,
                        "--json", *args)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_consistent(report: dict, count: int, journal_records_before: int, data_dir: str):
    assert report["sent"] == report["received"] == count
    assert report["mac_failures"] == 0 and report["undecodable"] == 0 and report["connections_lost"] == 0
    assert sum(report["codes"].values()) == count
    assert report["ledger"]["ok"] is True
    assert report["ledger"]["approvals_checked"] == report["approved_settlements"] > 0
    assert report["ledger"]["missing"] == 0
    # every terminal's 0500 totals agree with the server's ledger (result digit 1)
    assert set(report["batch_settlement"]) == {"1"}
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["p999"] <= lat["max"]
    # a journal record per request at least (the terminals' sign-ons and 0500s may add their own)
    journal = Journal(data_dir, readonly=True)
    try:
        assert journal.last_seq - journal_records_before >= count
    finally:
        journal.close()


def last_seq(data_dir) -> int:
    journal = Journal(data_dir, readonly=True)
    try:
        return journal.last_seq
    finally:
        journal.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_open_loop_at_an_offered_rate(tmp_path, loop):
    count, rate = 6000, 4000
    with ServerProcess(tmp_path / "node", loop=loop, cards=CARDS) as srv:
        before = last_seq(srv.data_dir)
        report = load(srv, "--count", str(count), "--rate", str(rate), "--connections", "8", "--pipeline", "64",
                      "--loop", loop)
        check_consistent(report, count, before, srv.data_dir)
        assert report["offered_per_s"] == rate
        # the schedule itself takes count/rate seconds: the run cannot end before it
        assert report["elapsed_s"] >= (count - 1) / rate
        lag = report["send_lag_ms"]                   # the client's own lateness, reported apart
        assert 0 <= lag["p50"] <= lag["p99"] <= lag["max"]


def test_closed_loop_with_many_connections(tmp_path):
    count = 20000
    with ServerProcess(tmp_path / "node", loop="uvloop", cards=CARDS) as srv:
        before = last_seq(srv.data_dir)
        report = load(srv, "--count", str(count), "--connections", "32", "--pipeline", "128")
        check_consistent(report, count, before, srv.data_dir)
        assert "send_lag_ms" not in report          # closed loop: sent when a slot frees, no schedule


def test_a_run_longer_than_the_reply_timeout_is_not_cut_short(tmp_path):
    """--reply-timeout is the longest wait for *a* reply, not for the whole run: a 3 s open-loop
    run with a 1 s reply timeout runs to the end (it used to stop after 1 s, every window full
    or not, as if the server had gone quiet)."""
    count, rate = 6000, 2000
    with ServerProcess(tmp_path / "node", loop="uvloop", cards=CARDS) as srv:
        before = last_seq(srv.data_dir)
        report = load(srv, "--count", str(count), "--rate", str(rate), "--connections", "4", "--pipeline", "64",
                      "--reply-timeout", "1")
        check_consistent(report, count, before, srv.data_dir)
        assert report["elapsed_s"] >= (count - 1) / rate
