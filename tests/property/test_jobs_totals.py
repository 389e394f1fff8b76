"""Jobs over the journal: over random workloads the totals equal the sums of the engine's own
results; cross-region clearing nets to zero; the Parquet export round-trips."""
import numpy as np
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings, strategies as st

from yikatong.engine import Cmd, ResFlag
from yikatong.engine.builders import medical, request
from yikatong.engine.cardkeys import CardKeys, DEMO_DATA_KEY
from yikatong.ledger import jobs
from yikatong.ledger.node import Node
from yikatong.nodes import init_demo_node

KEYS = CardKeys(DEMO_DATA_KEY)
PANS = ["6214830000000017", "6214830000000025", "6214830000000033", "6214830000000082"]
TERMINALS = ["T0000001", "T0000002", "T0000003"]

op = st.tuples(st.sampled_from(["settle", "settle", "cancel", "reverse"]), st.integers(0, 3), st.integers(0, 2),
               st.integers(100, 3_000_000), st.integers(0, 50))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, min_size=5, max_size=60))
def test_totals_equal_the_engines_results(tmp_path_factory, ops):
    path = str(tmp_path_factory.mktemp("jobs") / "node")
    node = init_demo_node(path, 10, business_date=20261124, txn_retention_count=1 << 12)
    try:
        settled = []
        for i, (kind, card, term, amount, ref) in enumerate(ops):
            if kind == "settle" or not settled:
                q = medical(node.engine, KEYS, PANS[card], TERMINALS[term], amount, 0, 0, 0, amount,
                            med_type=21 if card % 2 else 11, pa=True, stan=1000 + i)
                r = node.apply_and_append(q)[0]
                if r["code"] in (0x3030, 0x3031):
                    settled.append((q, r))
            elif kind == "cancel":
                q0, r0 = settled[ref % len(settled)]
                node.apply_and_append(_cancel(node, q0, r0, 1000 + i))
            else:
                q0, _ = settled[ref % len(settled)]
                node.apply_and_append(_reversal(q0))
        records = node.journal.read()
        con = jobs.connect(jobs.flatten(records), jobs.dimensions(node.engine.config, records))
        t = jobs.totals(con, 20261124, 20261124)
        # the engine's own results, summed in numpy
        res = records["result"]
        effective = ((res["outcome_flags"] & ResFlag.POSTED) != 0) & ((res["outcome_flags"] & ResFlag.DUPLICATE) == 0)
        medical_rows = effective & np.isin(res["cmd"], [Cmd.MED_SETTLE, Cmd.MED_CANCEL, Cmd.REVERSAL]) & \
            (res["fund_fen"] + res["ins_leg_fen"] + res["aid_leg_fen"] + res["fin_leg_fen"] + res["cash_fen"] != 0)
        assert sum(t.column("fund_fen").to_pylist()) == int(res["fund_fen"][medical_rows].sum())
        assert sum(t.column("insurance_account_fen").to_pylist()) == \
            int((res["ins_leg_fen"] + res["aid_leg_fen"])[medical_rows].sum())
        assert sum(t.column("financial_account_fen").to_pylist()) == int(res["fin_leg_fen"][medical_rows].sum())
        _, positions = jobs.clearing(con, 202611)              # raises unless the positions net to zero
        assert sum(positions.column("net_position_fen").to_pylist()) == 0
    finally:
        node.close()


def _cancel(node, q0, r0, stan):
    q = request(node.engine, KEYS, Cmd.MED_CANCEL, terminal=TERMINALS[0], amount_fen=int(r0["amount_fen"]),
                orig_rrn=int(r0["rrn"]), stan=stan)
    q["pan_hash"] = q0["pan_hash"]
    q["terminal_index"] = q0["terminal_index"]
    q["institution_index"] = q0["institution_index"]
    return q


def _reversal(q0):
    """冲正 of settlement request q0: the same message as a reversal, under its own duplicate key."""
    rev = q0.copy()
    rev["cmd"] = Cmd.REVERSAL
    rev["idem_key"] ^= np.uint64(0x4000)
    return rev


def test_clearing_example_and_export(tmp_path):
    """Card …0025 (Shanghai) treated in Beijing: Shanghai owes Beijing the fund; positions ±."""
    path = str(tmp_path / "node")
    node = init_demo_node(path, 10, business_date=20261124, txn_retention_count=1 << 12)
    try:
        r = node.apply_and_append(medical(node.engine, KEYS, "6214830000000025", "T0000001",
                                          5000000, 300000, 50000, 100000, 4550000))[0]
        assert r["fund_fen"] == 3740000
        node.apply_and_append(medical(node.engine, KEYS, "6214830000000017", "T0000003",
                                      200000, 0, 0, 0, 200000, med_type=11))           # Beijing card in Shanghai: (2,000 − 1,800) × 70%
        records = node.journal.read()
        table, dims = jobs.flatten(records), jobs.dimensions(node.engine.config, records)
        con = jobs.connect(table, dims)
        matrix, positions = jobs.clearing(con, 202611)
        assert matrix.to_pylist() == [
            {"insured_region": 110000, "treatment_region": 310000, "owed_fen": 14000, "settlement_count": 1},
            {"insured_region": 310000, "treatment_region": 110000, "owed_fen": 3740000, "settlement_count": 1}]
        assert positions.to_pylist() == [{"region": 110000, "net_position_fen": 3726000},
                                         {"region": 310000, "net_position_fen": -3726000}]
        owed = {row["institution_code"]: row["owed_fen"] for row in jobs.institution_settlement(con, 20261124, 20261124).to_pylist()}
        assert owed == {"H11000000000001": 5000000, "H31000000000001": 200000}
        paths = jobs.export_parquet(table, dims, str(tmp_path / "export"), 20261124, 20261124)
        back = pq.read_table(paths[0])
        assert back.num_rows == table.num_rows and back.column("rrn").to_pylist() == table.column("rrn").to_pylist()
        assert "pan" not in back.column_names                    # keyed hash + last 4 only
    finally:
        node.close()


def test_totals_against_counterpart_file_cli(tmp_path):
    import subprocess
    import sys
    path = str(tmp_path / "node")
    node = init_demo_node(path, 10, business_date=20261124, txn_retention_count=1 << 12)
    node.apply_and_append(medical(node.engine, KEYS, "6214830000000025", "T0000001", 5000000, 300000, 50000, 100000, 4550000))
    node.apply_and_append(medical(node.engine, KEYS, "6214830000000017", "T0000001", 5000000, 300000, 50000, 100000, 4550000))
    node.close()
    header = "ins_type,clearing_type,clearing_agency,medical_total_fen,fund_fen,insurance_account_fen,financial_account_fen,settlement_count\n"
    good = header + "310,cross-region,310000,5000000,3740000,200000,1060000,1\n310,local,110000,5000000,3862000,200000,938000,1\n"
    (tmp_path / "good.csv").write_text(good)
    (tmp_path / "bad.csv").write_text(good.replace("3862000", "3862001"))
    run = lambda f: subprocess.run([sys.executable, "-m", "yikatong.main", "totals", "--data", path, "--from",
                                    "20261124", "--to", "20261124", "--against", str(tmp_path / f)],
                                   capture_output=True, text=True)
    ok = run("good.csv")
    assert ok.returncode == 0 and ok.stdout.startswith("balanced (对账平): 2 group(s) agree"), ok.stdout + ok.stderr
    bad = run("bad.csv")
    assert bad.returncode == 1 and "NOT balanced (对账不平): 1 group(s) differ" in bad.stdout
    assert "310,local,110000,5000000,5000000,3862000,3862001" in bad.stdout


def test_detail_reconciliation_classifies_every_difference(tmp_path):
    path = str(tmp_path / "node")
    node = init_demo_node(path, 10, business_date=20261124, txn_retention_count=1 << 12)
    try:
        rows = []
        for pan, stan in (("6214830000000017", 1), ("6214830000000025", 2), ("6214830000000033", 3), ("6214830000000082", 4)):
            r = node.apply_and_append(medical(node.engine, KEYS, pan, "T0000003", 300000, 0, 0, 0, 300000,
                                              med_type=11, stan=stan))[0]
            rows.append((int(r["rrn"]), int(r["amount_fen"]), int(r["fund_fen"]), int(r["ins_leg_fen"] + r["aid_leg_fen"])))
        records = node.journal.read()
        con = jobs.connect(jobs.flatten(records), jobs.dimensions(node.engine.config, records))
    finally:
        node.close()
    header = "setl_id,visit_id,person,total_fen,fund_fen,insurance_account_fen,refund_flag\n"
    lines = [f"{rrn},V{rrn},p,{total},{fund},{ins},false\n" for rrn, total, fund, ins in rows]
    balanced = tmp_path / "balanced.csv"
    balanced.write_text(header + "".join(lines))
    assert jobs.compare_details(con, 20261124, str(balanced)).num_rows == 0
    rrn0, rrn1, rrn2, rrn3 = (r[0] for r in rows)
    injected = (header
                + lines[0].replace(f",{rows[0][2]},", f",{rows[0][2] + 1},")       # fund mismatch
                + lines[1].replace(",false", ",true")                              # refund flag mismatch
                # lines[2] missing: only in the ledger
                + lines[3].replace(f"{rrn3},V{rrn3},p,{rows[3][1]}", f"{rrn3},V{rrn3},p,{rows[3][1] - 5}")  # total
                + "999999,V9,p,100,0,100,false\n")                                # only in the file
    path_bad = tmp_path / "injected.csv"
    path_bad.write_text(injected)
    got = [(r["setl_id"], r["difference"]) for r in jobs.compare_details(con, 20261124, str(path_bad)).to_pylist()]
    assert got == [(rrn0, "mismatch_fund_fen"), (rrn1, "mismatch_refund_flag"), (rrn2, "only_in_ledger"),
                   (rrn3, "mismatch_total_fen"), (999999, "only_in_file")]
