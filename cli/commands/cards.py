"""`yikatong cards import FILE`, `yikatong disburse FILE`, `yikatong allocate FILE`: batch files in."""
import sys


def register(sub):
    p = sub.add_parser("cards", help="card files: `cards import FILE` (制卡数据)")
    cs = p.add_subparsers(dest="cards_command", metavar="ACTION")
    imp = cs.add_parser("import", help="import an issuance file (CSV, header: "
                        "citizen_id,name,region,ins_type,person_type,pan,expiry_yymm,ins_opening_fen,fin_opening_fen)")
    _common(imp)
    imp.add_argument("--errors", help="per-line error file (CSV), default FILE.errors.csv")
    imp.set_defaults(func=run_import)
    d = sub.add_parser("disburse", help="代发: credit financial accounts from a payer's batch file; writes the 回盘")
    _common(d)
    d.add_argument("-o", "--result", help="回盘 file (CSV), default FILE.result.csv")
    d.add_argument("--holders", action="append", default=[], metavar="CARDS_FILE",
                   help="issuance data (制卡数据, same format and --encoding; repeatable): a line whose name "
                        "is not the holder's is refused, name mismatch (户名不符); without it names are not checked")
    d.set_defaults(func=run_disburse)
    a = sub.add_parser("allocate", help="个人账户划入: monthly insurance-account allocation from a contribution file")
    _common(a)
    a.add_argument("--retired-fen", action="append", default=[], metavar="REGION=FEN",
                   help="fixed monthly amount for retirees of a region (repeatable), e.g. 110000=12000")
    a.set_defaults(func=run_allocate)


def _common(p):
    p.add_argument("file")
    p.add_argument("--data", required=True, help="the node's data directory")
    p.add_argument("--encoding", choices=("utf-8", "gbk"), default="utf-8", help="the file's encoding")
    p.add_argument("--date", type=int, help="business date YYYYMMDD (default: the journal's last, else today)")


def _open(args):
    from yikatong.engine.demo import today
    from yikatong.ledger.node import Node
    from ..nodes import node_keys
    node = Node.open(args.data)
    date = args.date or max(node.journal.last_business_date, today())
    return node, node_keys(), date


def _print(report, what):
    for name, n in sorted(report.counts.items()):
        print(f"  {name}: {n:,}")
    if report.errors:
        print(f"  {len(report.errors)} line(s) with errors written to {what}")


def _run_file(args, title: str, process, output: str, write):
    """Open the node, run one file job, close the node, write its output file, print counts."""
    from ..cardfiles import FileFormatError
    node, keys, date = _open(args)
    try:
        report = process(node, keys, open(args.file, "rb").read(), args.encoding, date)
    except FileFormatError as e:
        print(f"error: {args.file}: {e}", file=sys.stderr)
        return None
    finally:
        node.close()
    write(output, report)
    print(f"{title} of {args.file}:")
    _print(report, output)
    return report


def run_import(args):
    from ..cardfiles import import_issuance, write_errors
    report = _run_file(args, "issuance import (制卡数据导入)", import_issuance,
                       args.errors or args.file + ".errors.csv", lambda path, r: write_errors(path, r.errors))
    return 2 if report is None else (1 if report.errors else 0)


def run_disburse(args):
    from ..cardfiles import HolderNames, disburse, write_result_file

    def process(node, keys, data, encoding, date):
        holders = None
        if args.holders:
            holders = HolderNames.from_files(node.engine.config, keys,
                                             [(open(path, "rb").read(), encoding) for path in args.holders])
        return disburse(node, keys, data, encoding, date, holders=holders)
    report = _run_file(args, "disbursement (代发) with its result file (回盘)", process,
                       args.result or args.file + ".result.csv", write_result_file)
    return 2 if report is None else 0


def run_allocate(args):
    from ..cardfiles import allocate, write_errors
    amounts = {}
    for item in args.retired_fen:
        region, _, fen = item.partition("=")
        amounts[int(region)] = int(fen)
    process = lambda node, keys, data, encoding, date: allocate(node, keys, data, encoding, date, amounts)
    report = _run_file(args, "allocation (个人账户划入)", process, args.file + ".errors.csv",
                       lambda path, r: write_errors(path, r.errors))
    return 2 if report is None else (1 if report.errors else 0)
