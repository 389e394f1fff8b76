"""A cutover (日切) during load puts each transaction on exactly one side (issue 7 item 9).

A real `yikatong serve` on port 0 over a node whose business date is in the past; `yikatong load`
drives it, and terminals of the independent client (bench/baseline/client.py) in threads send
medical settlements and keep every reply. Mid-load the server is told to cut over (SIGUSR1, and in
the second test the configured `server.cutover_time`). Then, from the journal alone: exactly one
cutover record; every record before it has the old business date and every one after it the new
(dates never decrease); every approval a client received carries in field 15 the MMDD of the
business date its record has in the journal; `yikatong verify` passes; 对总账 of each date equals
the sums of the records on its side."""
import datetime
import json
import signal
import subprocess
import threading
import time

import numpy as np

from bench.baseline import client as cl
from yikatong.engine import Cmd, ResFlag
from yikatong.ledger import jobs
from yikatong.ledger.journal import Journal
from yikatong.ledger.records import KIND_COMMAND, KIND_CUTOVER
from yikatong.nodes import init_demo_node

from server_fixture import REPO, ServerProcess, run_yikatong, yikatong_cmd

CARDS = 1000
OLD_DATE = 20260301
CLIENT_TERMINALS = ["T1000200", "T1000201", "T1000202"]      # not among `yikatong load --terminals 8`
APPROVED = ("00", "10")                                     # 10: partial approval (cash to collect)


class ClientLoad:
    """Terminals in threads, each sending pipelined medical settlements until stopped; every
    reply kept as (terminal, code, field 37, field 15)."""

    def __init__(self, srv):
        self.srv, self.stop = srv, threading.Event()
        self.replies, self.errors, self.lock = [], [], threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(tid, k), daemon=True)
                        for k, tid in enumerate(CLIENT_TERMINALS)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def _run(self, tid, k):
        try:
            with self.srv.terminal(tid, "H11000000000001") as term:
                assert term.sign_on().code == "00"
                i = 0
                while not self.stop.is_set():
                    requests = []
                    for _ in range(8):
                        pan = cl.generated_pan((k * 997 + i * 13) % CARDS)
                        tlv = cl.medical_tlv(med_type="11", fo=0, ol=0, ps=0, is_=1000 + i % 5000)
                        requests.append(cl.medical_request(amount_fen=1000 + i % 5000, tlv=tlv, pan=pan,
                                                           pin_block_bytes=None, **term.common()))
                        i += 1
                    got = [(tid, r.code, r.fields.get("37"), r.fields.get("15")) for r in term.send_pipelined(requests)]
                    with self.lock:
                        self.replies += got
        except Exception as e:                          # reported by the test, not lost in a thread
            self.errors.append(f"{tid}: {type(e).__name__}: {e}")

    def approvals(self, mmdd=None):
        with self.lock:
            return [r for r in self.replies if r[1] in APPROVED and (mmdd is None or r[3] == mmdd)]


def wait_for(condition, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def settlements_in_journal(data):
    journal = Journal(data, readonly=True)
    try:
        res = journal.read()["result"]
    finally:
        journal.close()
    return int(((res["cmd"] == Cmd.MED_SETTLE) & ((res["outcome_flags"] & ResFlag.POSTED) != 0)).sum())


def start_load(srv, data, duration_s):
    return subprocess.Popen(yikatong_cmd() + ["load", "--port", str(srv.port), "--terminals", "8", "--connections", "8",
                                              "--pipeline", "16", "--duration", str(duration_s), "--cards", str(CARDS),
                                              "--data", data, "--json"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check_journal(data, old_date, new_date, client, both_sides=True):
    """The journal's view of the run; returns the records."""
    journal = Journal(data, readonly=True)
    try:
        records = journal.read()
    finally:
        journal.close()
    kinds, dates = records["record_kind"], records["business_date"].astype(np.int64)
    cut = np.flatnonzero(kinds == KIND_CUTOVER)
    assert cut.size == 1, f"{cut.size} cutover records"
    cut = int(cut[0])
    assert np.all(np.diff(dates) >= 0)                                  # business dates never decrease
    assert np.all(dates[:cut] == old_date) and np.all(dates[cut:] == new_date)
    assert set(kinds[cut + 1:].tolist()) <= {KIND_COMMAND}
    # the load happened on both sides of the cutover
    res = records["result"]
    posted = (kinds == KIND_COMMAND) & ((res["outcome_flags"] & ResFlag.POSTED) != 0) & (res["cmd"] == Cmd.MED_SETTLE)
    if both_sides:
        assert posted[:cut].sum() >= 1000 and posted[cut:].sum() > 100, (posted[:cut].sum(), posted[cut:].sum())
    else:
        assert posted[cut:].sum() > 100
    # every approval a client received: field 15 is the MMDD of its record's business date
    original = (kinds == KIND_COMMAND) & ((res["outcome_flags"] & ResFlag.DUPLICATE) == 0) & (res["rrn"] != 0)
    date_of_rrn = dict(zip(res["rrn"][original].tolist(), dates[original].tolist()))
    approvals = client.approvals()
    assert approvals
    for tid, code, rrn, mmdd in approvals:
        assert f"{date_of_rrn[int(rrn)] % 10000:04d}" == mmdd, (tid, code, rrn, mmdd)
    seen = {a[3] for a in approvals}
    both = {f"{old_date % 10000:04d}", f"{new_date % 10000:04d}"}
    assert (seen == both) if both_sides else (f"{new_date % 10000:04d}" in seen and seen <= both), seen
    return records, cut


def check_totals(data, records, cut, old_date, new_date):
    """对总账 of each business date = the sums of the settlements on its side of the cutover."""
    res, kinds = records["result"], records["record_kind"]
    effective = (kinds == KIND_COMMAND) & ((res["outcome_flags"] & ResFlag.POSTED) != 0) & \
        ((res["outcome_flags"] & ResFlag.DUPLICATE) == 0) & (res["cmd"] == Cmd.MED_SETTLE)
    assert not np.isin(res["cmd"][(kinds == KIND_COMMAND) & ((res["outcome_flags"] & ResFlag.POSTED) != 0)],
                       [Cmd.MED_CANCEL, Cmd.REVERSAL]).any()            # no cancels: plain sums are the truth
    for date, side in ((old_date, slice(0, cut)), (new_date, slice(cut, None))):
        rows = res[side][effective[side]]
        table = jobs.totals_of_journal(data, date, date).to_pylist()
        assert sum(t["settlement_count"] for t in table) == rows.shape[0]
        assert sum(t["medical_total_fen"] for t in table) == int(rows["amount_fen"].sum())
        assert sum(t["fund_fen"] for t in table) == int(rows["fund_fen"].sum())
        assert sum(t["insurance_account_fen"] for t in table) == int((rows["ins_leg_fen"] + rows["aid_leg_fen"]).sum())
        assert sum(t["financial_account_fen"] for t in table) == int(rows["fin_leg_fen"].sum())


def run_cutover_under_load(tmp_path, old_date, new_date, config=None, trigger=None):
    data = str(tmp_path / "node")
    init_demo_node(data, CARDS, business_date=old_date).close()
    with ServerProcess(data, demo=False, config=config) as srv:
        load = start_load(srv, data, duration_s=8)
        try:
            with ClientLoad(srv) as client:
                old_mmdd, new_mmdd = f"{old_date % 10000:04d}", f"{new_date % 10000:04d}"
                if trigger:
                    wait_for(lambda: len(client.approvals(old_mmdd)) >= 48 or client.errors, 60, "approvals before")
                    # and `yikatong load` is going (it signs on its terminals first)
                    wait_for(lambda: settlements_in_journal(data) >= 1000, 60, "the load generator's settlements")
                    trigger(srv)
                wait_for(lambda: len(client.approvals(new_mmdd)) >= 48 or client.errors, 60, "approvals after")
                assert load.poll() is None, "the cutover should happen while `yikatong load` runs"
            assert not client.errors, client.errors
            out, err = load.communicate(timeout=120)
        finally:
            if load.poll() is None:
                load.kill()
                load.wait()
        assert load.returncode == 0, err[-3000:]
        report = json.loads(out)
        assert srv.terminate() == 0, srv.log()[-3000:]
    assert report["ledger"]["ok"] and report["ledger"]["approvals_checked"] > 0, report["ledger"]
    assert report["mac_failures"] == 0 and report["connections_lost"] == 0
    records, cut = check_journal(data, old_date, new_date, client, both_sides=trigger is not None)
    verify = run_yikatong("verify", "--data", data)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    check_totals(data, records, cut, old_date, new_date)


def test_sigusr1_cutover_under_load(tmp_path):
    run_cutover_under_load(tmp_path, OLD_DATE, OLD_DATE + 1, trigger=lambda srv: srv.proc.send_signal(signal.SIGUSR1))


def test_configured_cutover_time_under_load(tmp_path):
    """server.cutover_time = "00:00" on a node whose date is yesterday: the server cuts over to
    today on its own (the once-a-second sweep, with load arriving), and everything after it is on
    today. (Its first sweep comes within a second of start, so the old side holds only the
    genesis and whatever arrived first: the both-sides check is the SIGUSR1 test's.)"""
    today = datetime.date.today()
    yesterday = today - datetime.timedelta(days=1)
    config = tmp_path / "server.toml"
    config.write_text('[server]\ncutover_time = "00:00"\n')
    run_cutover_under_load(tmp_path, yesterday.year * 10000 + yesterday.month * 100 + yesterday.day,
                           today.year * 10000 + today.month * 100 + today.day, config=str(config),
                           trigger=None)
