"""`yikatong report --data DIR --date D -o report.html` and `yikatong batches --data DIR --date D`."""


def register(sub):
    p = sub.add_parser("report", help="the day's report as one self-contained HTML page")
    p.add_argument("--data", required=True)
    p.add_argument("--date", type=int, required=True)
    p.add_argument("-o", "--out", default="report.html")
    p.set_defaults(func=run)
    b = sub.add_parser("batches", help="terminal batch totals for a date (what an 0500 compares)")
    b.add_argument("--data", required=True)
    b.add_argument("--date", type=int, required=True)
    b.set_defaults(func=run_batches)


def run(args):
    from yikatong.ledger.report import render
    from .jobs import _con
    _, con, _, _ = _con(args)
    page = render(con, args.date)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(page)
    print(f"report for {args.date} written to {args.out} ({len(page):,} bytes)")
    return 0


def run_batches(args):
    from .jobs import _con, _print
    jobs, con, _, _ = _con(args)
    _print(jobs.terminal_batches(con, args.date))
    return 0
