"""`yikatong verify --data DIR`: check the journal, hash chain, money and checkpoints (对账 of the
ledger with itself). Prints OK with counts, or the first broken point, and exits non-zero."""
import sys


def register(sub):
    p = sub.add_parser("verify", help="verify a node's ledger: sequence, hash chain, money, checkpoints = replay")
    p.add_argument("--data", required=True, help="the node's data directory")
    p.set_defaults(func=run)


def run(args):
    from ..ledger.store import LedgerCorrupt, LedgerError
    from ..ledger.verify import verify
    try:
        report = verify(args.data)
    except LedgerCorrupt as e:
        print(f"BROKEN: {e.what} at sequence {e.seq}: expected {e.expected}, found {e.found}", file=sys.stderr)
        return 1
    except LedgerError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    print(report.line())
    return 0
