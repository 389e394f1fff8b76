"""`yikatong init --data DIR --demo`: create a node's data directory (the demo node of DEMO.md)."""


def register(sub):
    p = sub.add_parser("init", help="create a node's data directory")
    p.add_argument("--data", required=True, help="data directory (must be empty or missing)")
    p.add_argument("--demo", action="store_true", help="the demo node of DEMO.md")
    p.add_argument("--cards", type=int, default=100_000, help="generated demo cards")
    p.set_defaults(func=run)


def run(args):
    from ..nodes import init_demo_node
    if not args.demo:
        print("only --demo nodes can be created from the command line for now; see docs/ledger.md")
        return 2
    node = init_demo_node(args.data, args.cards)
    print(f"created demo node in {args.data}: {node.engine.card_count:,} cards, journal at sequence "
          f"{node.journal.last_seq:,}")
    node.close()
    return 0
