"""`yikatong cutover --data DIR [--date YYYYMMDD]`: 日切 of a stopped node (a running server:
SIGUSR1 or server.cutover_time, protocols/server.py)."""


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
        if "node.lock is held" in str(e):
            print("a running server cuts over itself: send it SIGUSR1 (kill -USR1 PID) for the next business "
                  "date now, or set server.cutover_time (docs/operations.md)")
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
