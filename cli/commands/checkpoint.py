"""`yikatong checkpoint --data DIR`: write a checkpoint of a (stopped) node now."""


def register(sub):
    p = sub.add_parser("checkpoint", help="write a checkpoint of the engine's state at the journal's end")
    p.add_argument("--data", required=True, help="the node's data directory")
    p.set_defaults(func=run)


def run(args):
    from yikatong.ledger.journal import LedgerError
    from yikatong.ledger.node import Node
    try:
        node = Node.open(args.data)
    except LedgerError as e:
        print(f"error: {e}")
        return 1
    path = node.checkpoint()
    print(f"checkpoint at sequence {node.journal.last_seq:,}: {path}")
    node.close()
    return 0
