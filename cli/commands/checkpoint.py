"""`yikatong checkpoint --data DIR`: open a stopped node (recovering it), write a checkpoint of the
engine at the journal's end, close. A running node takes its own every N records."""
import sys


def register(sub):
    p = sub.add_parser("checkpoint", help="write a checkpoint of a stopped node's engine state")
    p.add_argument("--data", required=True, help="the node's data directory")
    p.add_argument("--map-size-bytes", type=int, default=None, help="raise the LMDB map size (kept)")
    p.set_defaults(func=run)


def run(args):
    from ..ledger.node import Node
    from ..ledger.store import LedgerError
    try:
        with Node.open(args.data, map_size_bytes=args.map_size_bytes) as node:
            seq = node.checkpoint(wait=True)
    except LedgerError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    print(f"checkpoint at sequence {seq} written in {args.data}/checkpoints")
    return 0
