"""`yikatong cutover --data DIR [--date YYYYMMDD]`: 日切 of a stopped node."""


def register(sub):
    p = sub.add_parser("cutover", help="日切: close the business date; later transactions land on the next")
    p.add_argument("--data", required=True)
    p.add_argument("--date", type=int, help="the new business date (default: the next day)")
    p.set_defaults(func=run)


def run(args):
    from yikatong.ledger.journal import LedgerError
    from yikatong.ledger.node import Node
    try:
        node = Node.open(args.data)
    except LedgerError as e:
        print(f"error: {e}")
        return 1
    try:
        old = node.business_date
        new = node.cutover(args.date)
    except LedgerError as e:
        print(f"error: {e}")
        return 1
    finally:
        node.close()
    print(f"cutover (日切): business date {old} → {new}")
    return 0
