"""`yikatong demo`: what `make demo` runs."""


def register(sub):
    p = sub.add_parser("demo", help="build the demo node, replay DOMAIN.md cases A–D, run a load")
    p.add_argument("--settlements", type=int, default=500_000, help="requests the short load sends over the wire")
    p.add_argument("--cards", type=int, default=100_000, help="generated cards (DEMO.md)")
    p.add_argument("--data", default="demo-data", help="data directory of the demo node (recreated each run)")
    p.set_defaults(func=run)


def run(args):
    from ..demo_run import run_demo
    return run_demo(args)
