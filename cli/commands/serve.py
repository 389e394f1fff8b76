"""`yikatong serve`: the terminal server on a node's data directory."""


def register(sub):
    p = sub.add_parser("serve", help="serve terminals over ISO 8583 (PROTOCOL.md) on a node's data directory")
    p.add_argument("--data", required=True, help="the node's data directory")
    p.add_argument("--demo", action="store_true", help="create the DEMO.md node in --data if it is empty")
    p.add_argument("--cards", type=int, default=100_000, help="with --demo: generated cards (DEMO.md)")
    p.add_argument("--host", default=None, help="listen address (default 127.0.0.1, or the config's)")
    p.add_argument("--port", type=int, default=None, help="listen port; 0 = any free port (printed)")
    p.add_argument("--config", default=None, help="TOML file with the server's tunables (docs/server.md)")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default=None, help="event loop (default uvloop)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus endpoint port; -1 = any free port")
    p.set_defaults(func=run)


def run(args):
    import logging
    import os
    import sys

    from yikatong.ledger.node import Node
    from yikatong.protocols.limits import load_config
    from yikatong.protocols.server import JsonFormatter, serve

    from ..nodes import init_demo_node, node_keys

    config = load_config(args.config)
    for name, value in (("host", args.host), ("port", args.port), ("loop", args.loop),
                        ("metrics_port", args.metrics_port)):
        if value is not None:
            setattr(config.server, name, value)
    handler = logging.StreamHandler(sys.stderr)
    if config.server.log_json:
        handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    if args.demo and (not os.path.isdir(args.data) or not os.listdir(args.data)):
        node = init_demo_node(args.data, generated_cards=args.cards)
    else:
        node = Node.open(args.data)
    try:
        code = serve(node, node_keys(), config, announce=lambda line: print(line, flush=True))
    finally:
        node.close()
    return code
