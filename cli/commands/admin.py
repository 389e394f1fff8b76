"""`yikatong admin serve` (the operators' HTTP API) and `yikatong card ACTION` (the same actions
from the command line, through the same function)."""
import os
import signal
import sys
import threading


def register(sub):
    p = sub.add_parser("admin", help="serve the operators' admin HTTP API (localhost, token-authenticated)")
    p.add_argument("--data", required=True, help="the node's data directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8600)
    p.add_argument("--token-file", required=True, help="file holding the bearer token (≥ 16 characters)")
    p.set_defaults(func=run_serve)
    from yikatong.admin_api import ACTIONS
    c = sub.add_parser("card", help="a card lifecycle action (挂失, 解挂, 补换卡, 注销, PIN reset …)")
    c.add_argument("action", choices=sorted(ACTIONS))
    c.add_argument("--data", required=True)
    c.add_argument("--pan", required=True)
    c.add_argument("--operator", type=int, required=True, help="operator number (journaled)")
    c.add_argument("--new-pan")
    c.add_argument("--pin-kind", choices=("social", "bank"), default="social")
    c.add_argument("--new-pin")
    c.add_argument("--stolen", action="store_true")
    c.set_defaults(func=run_card)


def _today(node):
    from yikatong.engine.demo import today
    return max(node.journal.last_business_date, today())


def run_serve(args):
    from yikatong.admin_api import AdminServer
    from yikatong.ledger.node import Node
    from ..nodes import node_keys
    token = open(args.token_file).read().strip()
    node = Node.open(args.data)
    server = AdminServer(node, node_keys(), token, lambda: _today(node))
    host, port = server.start(args.host, args.port)
    print(f"admin API listening on {host}:{port} (OpenAPI at /openapi.json)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop()
    node.close()
    return 0


def run_card(args):
    from yikatong.admin_api import CardAction, perform
    from yikatong.ledger.node import Node
    from ..nodes import node_keys
    node = Node.open(args.data)
    try:
        result = perform(node, node_keys(), args.action,
                         CardAction(args.operator, args.pan, args.new_pan, args.pin_kind, args.new_pin, args.stolen),
                         _today(node))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        node.close()
    print(f"{args.action} card …{result.pan_last4}: {result.code} "
          f"({'done' if result.approved else 'refused'}); balances insurance {result.insurance_balance_fen} fen, "
          f"financial {result.financial_balance_fen} fen")
    return 0 if result.approved else 1
