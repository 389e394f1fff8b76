"""`yikatong verify --data DIR`: recheck the whole ledger; exit 1 at the first broken point."""


def register(sub):
    p = sub.add_parser("verify", help="verify the journal, hash chain, money and checkpoints (核对)")
    p.add_argument("--data", required=True, help="the node's data directory")
    p.set_defaults(func=run)


def run(args):
    from yikatong.ledger.journal import LedgerError
    from yikatong.ledger.verify import VerifyError, verify
    try:
        report = verify(args.data)
    except (VerifyError, LedgerError) as e:
        print(f"BROKEN: {e}")
        return 1
    print(f"OK: {report['records']:,} records in {report['batches']:,} batches (sequence 1…{report['last_seq']:,}), "
          f"hash chain unbroken, {report['business_dates']} business date(s) with money conserved, "
          f"replay equals the journal, {report['checkpoints']} checkpoint(s) equal the replay")
    return 0
