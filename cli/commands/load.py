"""`yikatong load`: drive a running server with MACed, pipelined terminal traffic."""


def register(sub):
    p = sub.add_parser("load", help="load generator: signs on, pipelines MACed requests, reports throughput and latency")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8583)
    p.add_argument("--terminals", type=int, default=64, help="load terminals T1000000 … (at most 256)")
    p.add_argument("--connections", type=int, default=64, help="connections (round-robin over the terminals)")
    p.add_argument("--pipeline", type=int, default=64, help="requests in flight per connection (K)")
    p.add_argument("--count", type=int, default=0, help="stop after this many replies (0: use --duration)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds, when --count is 0")
    p.add_argument("--rate", type=float, default=0, help="open loop at this offered rate, msg/s (0: closed loop)")
    p.add_argument("--mix", default="med=80,pre=10,bal=10", help="message mix: med (81), pre (83), bal (balance + PIN)")
    p.add_argument("--cards", type=int, default=100_000, help="generated cards the server holds (DEMO.md)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--data", default=None, help="the server's data directory: check every approval is in its journal")
    p.add_argument("--reply-timeout", type=float, default=10.0, help="give up after this long without a reply, s")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--mac", choices=("x9.19", "cups-ecb"), default="x9.19",
                   help="x9.19: load terminals T1000000 …; cups-ecb: DEMO.md's T0000007 on every connection")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args):
    import asyncio
    import json

    from ..loadgen import format_report, run_load

    if not 1 <= args.terminals <= 256:
        raise SystemExit("--terminals: expecting 1..256 (DEMO.md's load terminals)")
    if args.loop == "uvloop":
        import uvloop
        report = uvloop.run(run_load(args))
    else:
        report = asyncio.run(run_load(args))
    print(json.dumps(report, default=float) if args.json else format_report(report))
    ok = report["mac_failures"] == 0 and report["undecodable"] == 0 and report.get("ledger", {}).get("ok", True)
    return 0 if ok else 1
