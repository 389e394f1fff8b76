"""`yikatong init --demo DIR`: create a node's data directory holding the demo node (DEMO.md);
its genesis ISSUE commands are journaled, so a replay from empty rebuilds it."""
import sys


def register(sub):
    p = sub.add_parser("init", help="create a node data directory (--demo: the demo node of DEMO.md)")
    p.add_argument("data", metavar="DIR", help="the data directory to create")
    p.add_argument("--demo", action="store_true", required=True, help="the demo node (the only kind for now)")
    p.add_argument("--cards", type=int, default=100_000, help="generated cards (DEMO.md)")
    p.add_argument("--business-date", type=int, default=None, help="YYYYMMDD (default: today)")
    p.set_defaults(func=run)


def run(args):
    from ..ledger.demo_node import init_demo
    from ..ledger.store import LedgerError
    try:
        node = init_demo(args.data, args.cards, args.business_date)
    except LedgerError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    print(f"demo node created in {args.data}: {node.last_seq} genesis records, "
          f"{node.engine.card_count} cards")
    node.close()
    return 0
