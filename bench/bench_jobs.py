"""Issue 7 benchmarks: totals reconciliation (对总账) over a journal of settlements: the scan
(ledger/_totals.pyx) + DuckDB over its groups, against the flatten-to-Arrow + DuckDB SQL path and
a naive Python loop over the same records in the same run."""
import hashlib
import time

import numpy as np

from bench.conftest import size
from yikatong.engine.cardkeys import CardKeys, DEMO_DATA_KEY
from yikatong.engine.demo import demo_engine
from yikatong.engine.workload import generated_pan_hashes, medical_settlements
from yikatong.ledger import jobs
from yikatong.ledger.records import records_from_batch

BD = 20261124


def journal(count: int) -> tuple[np.ndarray, object]:
    """`count` journal records: the demo genesis, then settlements applied by the engine."""
    cards = 100_000
    engine, keys = demo_engine(cards, business_date=BD)
    pans = generated_pan_hashes(keys, cards)
    parts, seq = [], 1
    # genesis records (cards dimension) come from ISSUE rows
    from yikatong.engine.demo import genesis_batches
    from yikatong.engine import Engine
    fresh = Engine(engine.config, card_capacity=engine.card_capacity)
    for batch in genesis_batches(keys, cards):
        res = fresh.apply_batch(batch, business_date=BD)
        parts.append(records_from_batch(batch, res, seq, BD))
        seq += batch.shape[0]
    chunk = 1_000_000
    left = count
    while left > 0:
        n = min(chunk, left)
        q = medical_settlements(fresh, pans, n, seed=seq)
        res = fresh.apply_batch(q, business_date=BD)
        parts.append(records_from_batch(q, res, seq, BD))
        seq += n
        left -= n
    return np.concatenate(parts), engine.config


def naive_totals(records: np.ndarray, region_of_slot: dict, inst_region: list) -> dict:
    out = {}
    for rec in records:
        r = rec["result"]
        if rec["record_kind"] != 1 or r["cmd"] != 5 or not (r["outcome_flags"] & 1):
            continue
        region = region_of_slot.get(int(r["card_slot"]))
        key = (310, "local" if region == inst_region[rec["request"]["institution_index"]] else "cross-region", region)
        t = out.setdefault(key, [0, 0, 0, 0, 0])
        t[0] += int(r["amount_fen"]); t[1] += int(r["fund_fen"]); t[2] += int(r["ins_leg_fen"] + r["aid_leg_fen"])
        t[3] += int(r["fin_leg_fen"]); t[4] += 1
    return out


def test_totals_reconciliation(benchmark):
    count = size(200_000, 10_000_000)
    records, config = journal(count)
    timings = []

    def run():
        t = time.perf_counter()
        result = jobs.totals_of(records, config, BD, BD)
        timings.append(time.perf_counter() - t)
        return result

    result = benchmark.pedantic(run, rounds=3, iterations=1)
    rate = records.shape[0] / min(timings)
    # the SQL path over the same records, by stage (what the scan replaces)
    t0 = time.perf_counter()
    table = jobs.flatten(records)
    t1 = time.perf_counter()
    con = jobs.connect(table, jobs.dimensions(config, records))
    sql_result = jobs.totals(con, BD, BD)
    t2 = time.perf_counter()
    assert sql_result.equals(result) and sql_result.schema == result.schema
    sql_rate = records.shape[0] / (t2 - t0)
    del table, con
    subset = records[-size(20_000, 200_000):]         # settlements, not the genesis
    slots, region, _ = jobs.cards_from_journal(records)
    region_of_slot = dict(zip(slots.tolist(), region.tolist()))
    inst_region = [x.region for x in config.institutions]
    t = time.perf_counter()
    naive_totals(subset, region_of_slot, inst_region)
    base_rate = subset.shape[0] / (time.perf_counter() - t)
    checksum = hashlib.blake2b(repr(result.to_pylist()).encode(), digest_size=8).hexdigest()
    benchmark.extra_info.update({"records": int(records.shape[0]), "records_per_s": round(rate),
                                 "sql_path_records_per_s": round(sql_rate), "sql_path_flatten_s": round(t1 - t0, 3),
                                 "sql_path_duckdb_s": round(t2 - t1, 3), "ratio_vs_sql_path": round(rate / sql_rate, 1),
                                 "naive_records_per_s": round(base_rate), "ratio": round(rate / base_rate, 1),
                                 "checksum": checksum})
    print(f"\ntotals (对总账) over {records.shape[0]:,} records: {rate / 1e6:.2f} M records/s (scan + DuckDB, best of "
          f"{len(timings)}: {', '.join(f'{x:.3f}' for x in timings)} s); SQL path {sql_rate / 1e6:.2f} M records/s "
          f"(flatten {t1 - t0:.2f} s, DuckDB {t2 - t1:.2f} s), ratio {rate / sql_rate:.1f}×; naive loop "
          f"{base_rate:,.0f}/s, ratio {rate / base_rate:,.0f}×; checksum {checksum}")


def test_totals_reconciliation_from_journal(benchmark, tmp_path):
    """The same 对总账 from an LMDB journal (batches of 4,096 records, as a busy server writes
    them): the scan over each batch where LMDB keeps it, against Journal.read (one copy) + scan."""
    from yikatong.ledger.journal import Journal
    count = size(200_000, 10_000_000)
    records, config = journal(count)
    n = records.shape[0]
    j = Journal(str(tmp_path / "j"), create=True, map_size_bytes=n * 400 + (1 << 30))
    batch = 4096
    for first in range(0, n, batch):
        j.append(records[first:first + batch], BD)
    expected = jobs.totals_of(records, config, BD, BD)
    del records
    timings = []

    def run():
        t = time.perf_counter()
        scan = jobs.totals_scan(j.last_seq, config, BD, BD)
        j.feed(scan.feed)
        result = jobs.totals_from_scan(scan)
        timings.append(time.perf_counter() - t)
        return result

    result = benchmark.pedantic(run, rounds=3, iterations=1)
    assert result.equals(expected)
    plain = []                        # baseline, same run: the same scan without its prefetch
    for _ in range(3):
        t = time.perf_counter()
        scan = jobs.totals_scan(j.last_seq, config, BD, BD, prefetch_bytes=0)
        j.feed(scan.feed)
        assert jobs.totals_from_scan(scan).equals(expected)
        plain.append(time.perf_counter() - t)
    t = time.perf_counter()
    copied = j.read()
    read_s = time.perf_counter() - t
    assert jobs.totals_of(copied, config, BD, BD).equals(expected)
    j.close()
    rate = n / min(timings)
    checksum = hashlib.blake2b(repr(result.to_pylist()).encode(), digest_size=8).hexdigest()
    benchmark.extra_info.update({"records": n, "records_per_s": round(rate),
                                 "records_per_s_median": round(n / float(np.median(timings))),
                                 "no_prefetch_records_per_s": round(n / min(plain)),
                                 "no_prefetch_records_per_s_median": round(n / float(np.median(plain))),
                                 "journal_read_s": round(read_s, 3),
                                 "journal_read_records_per_s": round(n / read_s), "checksum": checksum})
    print(f"\ntotals (对总账) from an LMDB journal of {n:,} records: {rate / 1e6:.2f} M records/s (best of "
          f"{', '.join(f'{x:.3f}' for x in timings)} s); without the scan's prefetch {n / min(plain) / 1e6:.2f} M "
          f"records/s ({', '.join(f'{x:.3f}' for x in plain)} s); Journal.read alone {n / read_s / 1e6:.2f} M records/s; "
          f"checksum {checksum}")


def test_detail_reconciliation(benchmark, tmp_path):
    """对明细账 against a counterpart file with one line per settlement of the day (the file is
    written from the ledger's own view, then every 1,000th line altered). Full size: a journal of
    17.5 M records, so that the day's posted settlements — the file's lines — pass 10 M (issue 7:
    against a 10 M-line file)."""
    count = size(200_000, 17_500_000)
    records, config = journal(count)
    con = jobs.connect(jobs.flatten(records), jobs.dimensions(config, records))
    path = tmp_path / "details.csv"
    con.sql(f"""COPY (SELECT rrn AS setl_id, 'V' || rrn AS visit_id, 'p' || pan_last4 AS person, amount_fen AS total_fen,
                        CASE WHEN rrn % 1000 = 0 THEN fund_fen + 1 ELSE fund_fen END AS fund_fen,
                        ins_leg_fen + aid_leg_fen AS insurance_account_fen, false AS refund_flag
                 FROM settlements WHERE business_date = {BD}) TO '{path}' (HEADER)""")
    timings = []

    def run():
        t = time.perf_counter()
        differences = jobs.compare_details(con, BD, str(path))
        timings.append(time.perf_counter() - t)
        return differences

    differences = benchmark.pedantic(run, rounds=1, iterations=1)
    res = records["result"]
    posted = (res["cmd"] == 5) & ((res["outcome_flags"] & 1) != 0)
    expected = int((res["rrn"][posted] % 1000 == 0).sum())
    assert differences.num_rows == expected
    assert set(differences.column("difference").to_pylist()) == {"mismatch_fund_fen"}
    lines = int(posted.sum())
    assert lines >= size(100_000, 10_000_000), lines
    # naive baseline, same run: the ledger's settlements into a dict by a Python loop over the
    # records, the file read with the csv module, compared line by line (first `subset` lines)
    # (its own file: the first `subset` settlements in journal order, written untimed)
    subset = size(20_000, 200_000)
    small = tmp_path / "details_head.csv"
    first = res[posted][:subset]
    with open(small, "w") as f:
        f.write("setl_id,visit_id,person,total_fen,fund_fen,insurance_account_fen,refund_flag\n")
        for r in first:
            fund = int(r["fund_fen"]) + (1 if int(r["rrn"]) % 1000 == 0 else 0)
            f.write(f"{int(r['rrn'])},V{int(r['rrn'])},p,{int(r['amount_fen'])},{fund},"
                    f"{int(r['ins_leg_fen']) + int(r['aid_leg_fen'])},false\n")
    t = time.perf_counter()
    naive = naive_details(records, str(small), subset)
    naive_rate = subset / (time.perf_counter() - t)
    assert naive == int((first["rrn"] % 1000 == 0).sum())               # the same differences
    rate = lines / timings[0]
    benchmark.extra_info.update({"lines": lines, "seconds": round(timings[0], 2), "differences": expected,
                                 "lines_per_s": round(rate), "naive_lines_per_s": round(naive_rate),
                                 "ratio_vs_naive": round(rate / naive_rate, 1)})
    print(f"\n对明细账 against {lines:,} lines: {timings[0]:.2f} s ({rate:,.0f} lines/s), {expected:,} differences "
          f"found; naive Python {naive_rate:,.0f} lines/s, ratio {rate / naive_rate:,.0f}×")


def naive_details(records: np.ndarray, path: str, subset: int) -> int:
    """The differences (fund, total or insurance account) in the first `subset` lines of the
    detail file, found the way a script would: a dict of the ledger's posted settlements, the
    csv module for the file. Returns how many lines differ."""
    import csv
    ledger = {}
    for rec in records:                                  # one Python step per journal record
        r = rec["result"]
        if r["cmd"] == 5 and r["outcome_flags"] & 1:
            ledger[int(r["rrn"])] = (int(r["amount_fen"]), int(r["fund_fen"]),
                                     int(r["ins_leg_fen"]) + int(r["aid_leg_fen"]))
            if len(ledger) >= subset:
                break
    differing = 0
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader)
        for i, row in enumerate(reader):
            if i >= subset:
                break
            ours = ledger.get(int(row[0]))
            if ours is None or ours != (int(row[3]), int(row[4]), int(row[5])):
                differing += 1
    return differing
