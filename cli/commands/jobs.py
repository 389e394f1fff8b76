"""Settlement operators' jobs: `yikatong totals` (对总账), `clearing` (异地清算), `institutions`
(institution settlement), `export` (Parquet for Spark SQL). Read-only: they may run beside a node."""
import csv
import sys


def register(sub):
    t = sub.add_parser("totals", help="对总账 totals by insurance type, clearing type and agency")
    t.add_argument("--data", required=True)
    t.add_argument("--from", dest="date_from", type=int, required=True)
    t.add_argument("--to", dest="date_to", type=int, required=True)
    t.add_argument("--against", help="the counterpart's totals CSV: print the differing groups; exit 1 if any")
    t.set_defaults(func=run_totals)
    d = sub.add_parser("details", help="对明细账 against a counterpart detail file for one business date")
    d.add_argument("file")
    d.add_argument("--data", required=True)
    d.add_argument("--date", type=int, required=True)
    d.add_argument("-o", "--out", help="differences CSV (default FILE.differences.csv)")
    d.set_defaults(func=run_details)
    c = sub.add_parser("clearing", help="异地清算 matrix and net positions for a month")
    c.add_argument("--data", required=True)
    c.add_argument("--month", type=int, required=True, help="YYYYMM")
    c.set_defaults(func=run_clearing)
    i = sub.add_parser("institutions", help="what each hospital / pharmacy is owed, by source")
    i.add_argument("--data", required=True)
    i.add_argument("--from", dest="date_from", type=int, required=True)
    i.add_argument("--to", dest="date_to", type=int, required=True)
    i.set_defaults(func=run_institutions)
    e = sub.add_parser("export", help="the journal (a date range) as Parquet, for Spark SQL")
    e.add_argument("--data", required=True)
    e.add_argument("--from", dest="date_from", type=int, required=True)
    e.add_argument("--to", dest="date_to", type=int, required=True)
    e.add_argument("-o", "--out", required=True, help="output directory")
    e.set_defaults(func=run_export)


def _con(args):
    from yikatong.ledger import jobs
    records, config = jobs.open_journal(args.data)
    table, dims = jobs.flatten(records), jobs.dimensions(config, records)
    return jobs, jobs.connect(table, dims), table, dims


def _print(table):
    w = csv.writer(sys.stdout)
    w.writerow(table.column_names)
    for row in table.to_pylist():
        w.writerow(row.values())


def run_totals(args):
    import duckdb
    from yikatong.ledger import jobs
    # the scan over the journal where LMDB keeps it (jobs.totals_of_journal), not the flattened journal
    ours = jobs.totals_of_journal(args.data, args.date_from, args.date_to)
    if not args.against:
        _print(ours)
        return 0
    differing = jobs.compare_totals(duckdb.connect(), ours, args.against)
    if differing.num_rows == 0:
        print(f"balanced (对账平): {ours.num_rows} group(s) agree")
        return 0
    print(f"NOT balanced (对账不平): {differing.num_rows} group(s) differ")
    _print(differing)
    return 1


def run_clearing(args):
    jobs, con, _, _ = _con(args)
    matrix, positions = jobs.clearing(con, args.month)
    print("# clearing matrix (insured region owes treatment region)")
    _print(matrix)
    print("# net positions (sum = 0)")
    _print(positions)
    return 0


def run_institutions(args):
    jobs, con, _, _ = _con(args)
    _print(jobs.institution_settlement(con, args.date_from, args.date_to))
    return 0


def run_export(args):
    jobs, _, table, dims = _con(args)
    for path in jobs.export_parquet(table, dims, args.out, args.date_from, args.date_to):
        print(path)
    return 0


def run_details(args):
    jobs, con, _, _ = _con(args)
    differences = jobs.compare_details(con, args.date, args.file)
    out = args.out or args.file + ".differences.csv"
    import pyarrow.csv as pacsv
    pacsv.write_csv(differences, out)
    kinds = {}
    for kind in differences.column("difference").to_pylist():
        kinds[kind] = kinds.get(kind, 0) + 1
    if not kinds:
        print(f"balanced (对账平) on {args.date}")
        return 0
    print(f"NOT balanced (对账不平) on {args.date}: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
          + f"; details in {out}")
    return 1
