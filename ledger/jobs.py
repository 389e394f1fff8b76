"""Settlement operators' read-side jobs over the journal: totals reconciliation (对总账),
institution settlement, cross-region clearing (异地清算), Parquet export. The journal is read in
bulk (one numpy array), flattened into an Arrow table, and every job is SQL run by DuckDB over it,
so the same queries run on Spark SQL over exported Parquet at national scale (docs/operations.md).

对总账 has a fast path (`totals_of`, `totals_of_journal`): one nogil pass over the fixed records
(ledger/_totals.pyx) sums them into a few dozen groups, and DuckDB orders the groups and joins
them with the counterpart's file. Same answer as `totals` over `flatten`, ≈ 20× sooner; it
falls back to the SQL path on a journal whose order it cannot trust (see _totals.pyx).

Signs: a leg is what an account paid (negative: credited back). A settlement's medical total
counts +1, its cancel or reversal −1, so every job nets cancels and reversals out.
"""
import os

import numpy as np
import pyarrow as pa

from yikatong.engine import Cmd, ResFlag


SQL_DIR = os.path.join(os.path.dirname(__file__), "sql")


def flatten(records: np.ndarray) -> pa.Table:
    """The journal's records as flat columns (no card data: the card is its keyed hash + last 4)."""
    q, r = records["request"], records["result"]
    legs = r["fund_fen"] + r["ins_leg_fen"] + r["aid_leg_fen"] + r["fin_leg_fen"] + r["cash_fen"]
    # +1 a settlement, −1 its cancel or a reversal that took one back, +1 a reversal of a cancel
    direction = np.where(r["cmd"] == Cmd.MED_CANCEL, -1, np.where(r["cmd"] == Cmd.REVERSAL, np.sign(legs), 1))
    return pa.table({
        "seq": records["seq"], "business_date": records["business_date"], "record_kind": records["record_kind"],
        "cmd": r["cmd"], "code": r["code"].view("S2").astype(str), "posted": (r["outcome_flags"] & ResFlag.POSTED) != 0,
        "duplicate": (r["outcome_flags"] & ResFlag.DUPLICATE) != 0, "terminal_index": q["terminal_index"],
        "institution_index": q["institution_index"], "card_slot": r["card_slot"], "pan_hash": q["pan_hash"],
        "pan_last4": q["pan_last4"], "rrn": r["rrn"], "orig_rrn": r["orig_rrn"], "stan": q["stan"],
        "batch_no": q["batch_no"], "local_time": q["local_time"], "med_type": q["med_type"],
        "amount_fen": r["amount_fen"], "signed_total_fen": r["amount_fen"] * direction,
        "fund_fen": r["fund_fen"], "deductible_fen": r["deductible_fen"], "ins_leg_fen": r["ins_leg_fen"],
        "aid_leg_fen": r["aid_leg_fen"], "fin_leg_fen": r["fin_leg_fen"], "cash_fen": r["cash_fen"],
        "direction": direction,
    })


def cards_from_journal(records: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slot, insured region, insurance type) of every card, from the journal alone: ISSUE
    records create slots, REPLACE records give the new slot its old card's region and type.
    A job therefore needs no engine and no node lock (it can run beside the running node)."""
    q, r = records["request"], records["result"]
    ok = (r["code"] == 0x3030) & ((r["outcome_flags"] & ResFlag.DUPLICATE) == 0)
    issue = ok & (r["cmd"] == Cmd.ISSUE)
    slots = r["card_slot"][issue]
    size = int(max(slots.max() if slots.size else -1, r["other_slot"].max() if r.size else -1)) + 1
    region = np.zeros(size, dtype=np.int64)
    ins_type = np.zeros(size, dtype=np.int64)
    region[slots] = q["region_code"][issue]
    ins_type[slots] = q["ins_type"][issue]
    for old, new in zip(r["card_slot"][ok & (r["cmd"] == Cmd.REPLACE)], r["other_slot"][ok & (r["cmd"] == Cmd.REPLACE)]):
        region[new], ins_type[new] = region[old], ins_type[old]      # one row per replacement: rare
    return np.arange(size, dtype=np.int32), region, ins_type


def dimensions(config, records: np.ndarray) -> dict:
    """Small dimension tables: institutions and terminals from the configuration, cards from the journal."""
    slots, region, ins_type = cards_from_journal(records)
    return {
        "institutions": pa.table({
            "institution_index": np.arange(len(config.institutions), dtype=np.int32),
            "institution_code": [x.code for x in config.institutions],
            "institution_kind": [x.kind for x in config.institutions],
            "treatment_region": np.array([x.region for x in config.institutions], dtype=np.int64)}),
        "terminals": pa.table({
            "terminal_index": np.arange(len(config.terminals), dtype=np.int32),
            "terminal_id": [t.terminal_id for t in config.terminals]}),
        "cards": pa.table({"card_slot": slots, "insured_region": region, "ins_type": ins_type}),
    }


def open_journal(data_dir: str):
    """(records, config) of a node's journal, read-only (beside a running node or a stopped one)."""
    import msgspec
    from .journal import Journal
    from .node import NodeSettings
    settings = msgspec.json.decode(open(os.path.join(data_dir, "node.json"), "rb").read(), type=NodeSettings)
    journal = Journal(data_dir, map_size_bytes=settings.map_size_bytes, readonly=True)
    try:
        return journal.read(), settings.config
    finally:
        journal.close()


def compare_totals(con, ours: pa.Table, counterpart_csv: str) -> pa.Table:
    """对总账 against a counterpart's totals CSV (same columns): the groups that differ, with both sides."""
    con.register("ours", ours)
    return con.sql(open(os.path.join(SQL_DIR, "totals_compare.sql")).read()
                   .replace("${file}", counterpart_csv.replace("'", "''"))).to_arrow_table()


def connect(journal_table: pa.Table, dims: dict):
    import duckdb
    con = duckdb.connect()
    con.register("journal", journal_table)
    for name, table in dims.items():
        con.register(name, table)
    con.execute(open(os.path.join(SQL_DIR, "settlements.sql")).read())
    return con


def run_sql(con, name: str, **params):
    text = open(os.path.join(SQL_DIR, name + ".sql")).read()
    for key, value in params.items():
        text = text.replace("${" + key + "}", str(int(value)))
    return con.sql(text).to_arrow_table()


def totals(con, date_from: int, date_to: int) -> pa.Table:
    """对总账: per insurance type, clearing type, clearing agency (SQL over the flattened journal)."""
    return run_sql(con, "totals", date_from=date_from, date_to=date_to)


def totals_scan(record_count: int, config, date_from: int, date_to: int, **tuning):
    """A fresh 对总账 scan (ledger/_totals.pyx) for `record_count` records: feed it, then
    `totals_from_scan`. `tuning`: TotalsScan's keyword arguments (prefetch_bytes)."""
    from ._totals import TotalsScan
    inst_region = np.array([x.region for x in config.institutions], dtype=np.int64)
    return TotalsScan(record_count, inst_region, date_from, date_to, **tuning)


def totals_from_scan(scan, con=None) -> pa.Table | None:
    """The scan's groups, ordered and typed by sql/totals_groups.sql: exactly `totals`' table.
    None when the scan could not vouch for its answer (`scan.fallback_reason`)."""
    groups = scan.groups()
    if groups is None:
        return None
    ins_type, region, local, sums = groups
    table = pa.table({
        "ins_type": pa.array(ins_type, pa.int64()),
        "clearing_type": pa.array(np.where(local, "local", "cross-region").tolist(), pa.string()),
        "clearing_agency": pa.array(region, pa.int64()),
        **{name: pa.array(np.ascontiguousarray(sums[:, i]), pa.int64()) for i, name in enumerate(
            ("medical_total_fen", "fund_fen", "insurance_account_fen", "financial_account_fen", "settlement_count"))}})
    if con is None:
        import duckdb
        con = duckdb.connect()
    con.register("totals_groups", table)
    return con.sql(open(os.path.join(SQL_DIR, "totals_groups.sql")).read()).to_arrow_table()


def totals_of(records: np.ndarray, config, date_from: int, date_to: int, con=None) -> pa.Table:
    """对总账 of records in memory: the fast scan, or the SQL path if the scan falls back.

    >>> totals_of(journal.read(), config, 20261124, 20261124).to_pylist()   # doctest: +SKIP
    [{'ins_type': 310, 'clearing_type': 'local', 'clearing_agency': 110000, ...}]
    """
    scan = totals_scan(records.shape[0], config, date_from, date_to)
    scan.feed(records.view(np.uint8))
    table = totals_from_scan(scan, con)
    if table is None:
        table = totals(connect(flatten(records), dimensions(config, records)), date_from, date_to)
    return table


def totals_of_journal(data_dir: str, date_from: int, date_to: int) -> pa.Table:
    """对总账 straight from a node's journal (read-only, beside a running node or a stopped one):
    the scan reads each batch where LMDB keeps it, with no copy of the journal."""
    import msgspec
    from .journal import Journal
    from .node import NodeSettings
    settings = msgspec.json.decode(open(os.path.join(data_dir, "node.json"), "rb").read(), type=NodeSettings)
    journal = Journal(data_dir, map_size_bytes=settings.map_size_bytes, readonly=True)
    try:
        last = journal.last_seq                      # the tail at open; a running node may append more
        scan = totals_scan(last, settings.config, date_from, date_to)
        journal.feed(scan.feed, 1, last)
        table = totals_from_scan(scan)
        if table is None:
            records = journal.read(1, last)
            table = totals(connect(flatten(records), dimensions(settings.config, records)), date_from, date_to)
        return table
    finally:
        journal.close()


def clearing(con, month: int) -> tuple[pa.Table, pa.Table]:
    """异地清算 for a month (YYYYMM): the matrix and each region's net position (sums to zero)."""
    matrix = run_sql(con, "clearing_matrix", month=month)
    positions = run_sql(con, "clearing_positions", month=month)
    total = sum(positions.column("net_position_fen").to_pylist())
    if total != 0:
        raise AssertionError(f"clearing positions sum to {total} fen, not 0")
    return matrix, positions


def institution_settlement(con, date_from: int, date_to: int) -> pa.Table:
    return run_sql(con, "institution_settlement", date_from=date_from, date_to=date_to)


def export_parquet(journal_table: pa.Table, dims: dict, out_dir: str, date_from: int, date_to: int) -> list[str]:
    """The journal (a date range) and the dimension tables as Parquet, for Spark SQL."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    os.makedirs(out_dir, exist_ok=True)
    dates = journal_table.column("business_date")
    rows = journal_table.filter(pc.and_(pc.greater_equal(dates, date_from), pc.less_equal(dates, date_to)))
    paths = [os.path.join(out_dir, "journal.parquet")]
    pq.write_table(rows, paths[0])
    for name, table in dims.items():
        paths.append(os.path.join(out_dir, f"{name}.parquet"))
        pq.write_table(table, paths[-1])
    return paths


def compare_details(con, business_date: int, counterpart_csv: str) -> pa.Table:
    """对明细账 of one business date against a counterpart detail file; empty = balanced."""
    return con.sql(open(os.path.join(SQL_DIR, "details_compare.sql")).read()
                   .replace("${date}", str(int(business_date)))
                   .replace("${file}", counterpart_csv.replace("'", "''"))).to_arrow_table()


def terminal_batches(con, business_date: int) -> pa.Table:
    return run_sql(con, "terminal_batches", date=business_date)
