"""A tiny closed-loop load driver: C connections, K medical settlements in flight on each, MACed.

Each connection is one DEMO.md load terminal (``T1000000`` + i by default), signs on, then keeps
K medical settlements (60.1 = 81, outpatient, small amounts on random generated cards) in flight:
every reply (matched by field 11 on its connection, which is the terminal's own) sends the next
request, until the duration is over. Reports messages/s and the p50/p99 latency from send to
reply, the response codes seen, and the replies whose MAC did not verify.

It speaks only PROTOCOL.md, so it can hit the baseline server or the project's:

    python -m bench.baseline.loadgen --port 8583 --connections 8 --pipeline 4 --duration-s 10

The driver is Python too (pyiso8583 + cryptography per message, both directions), so on a
small machine it shares the CPU with the server it measures: read its figures as a floor.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import random
import time

from .client import (
    DEMO_TMK,
    frame,
    generated_pan,
    medical_request,
    medical_tlv,
    parse_reply,
    read_frame,
    seal,
    sign_on_request,
)
from .crypto import decrypt_working_keys

CONNECTIONS_MAX = 256       # DEMO.md has 256 load terminals
PIPELINE_MAX = 64


class Stats:
    def __init__(self):
        self.latencies_s: list[float] = []
        self.codes: collections.Counter = collections.Counter()
        self.bad_macs = 0
        self.errors: collections.Counter = collections.Counter()


async def drive_connection(args, index: int, start: asyncio.Event, stop_at: list, stats: Stats,
                           ready: list) -> None:
    tid = f"{args.terminal_prefix}{index + args.terminal_first:0{8 - len(args.terminal_prefix)}d}"
    rng = random.Random(args.seed * 1000003 + index)
    reader, writer = await asyncio.open_connection(args.host, args.port)
    try:
        stan = rng.randrange(1, 900000)
        writer.write(frame(seal(sign_on_request(stan=stan, tid=tid, mid=args.mid), None, None)))
        await writer.drain()
        reply = parse_reply(await read_frame(reader))
        if reply.code != "00":
            stats.errors[f"sign-on {reply.code}"] += 1
            return
        _pin_key, mac_key = decrypt_working_keys(args.tmk, reply.fields["62"])
        batch = reply.fields["60"][2:8]
        ready.append(index)
        await start.wait()

        sent_at: dict[str, float] = {}

        def send_one() -> None:
            nonlocal stan
            stan = stan % 999999 + 1
            amount_fen = rng.randrange(100, 5000)
            fields = medical_request(
                amount_fen=amount_fen, tlv=medical_tlv(med_type="11", fo=0, ol=0, ps=0,
                                                       is_=amount_fen),
                stan=stan, tid=tid, mid=args.mid, batch=batch,
                pan=generated_pan(rng.randrange(args.cards)))
            writer.write(frame(seal(fields, args.mac_alg, mac_key)))
            sent_at[fields["11"]] = time.perf_counter()

        for _ in range(args.pipeline):
            send_one()
        await writer.drain()
        while sent_at:
            reply = parse_reply(await read_frame(reader), args.mac_alg, mac_key)
            now = time.perf_counter()
            stats.latencies_s.append(now - sent_at.pop(reply.fields["11"]))
            stats.codes[reply.code] += 1
            if reply.mac_ok is not True:
                stats.bad_macs += 1
            if now < stop_at[0]:
                send_one()
                await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError) as exc:
        stats.errors[type(exc).__name__] += 1
    finally:
        writer.close()


async def run(args) -> dict:
    stats = Stats()
    start = asyncio.Event()
    stop_at = [float("inf")]
    ready: list = []
    tasks = [asyncio.create_task(drive_connection(args, i, start, stop_at, stats, ready))
             for i in range(args.connections)]
    while len(ready) + sum(stats.errors.values()) < args.connections:
        await asyncio.sleep(0.01)
    began = time.perf_counter()
    stop_at[0] = began + args.duration_s
    start.set()
    await asyncio.gather(*tasks)
    elapsed_s = time.perf_counter() - began
    lat = sorted(stats.latencies_s)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3 if lat else float("nan")

    return {
        "messages": len(lat), "elapsed_s": elapsed_s,
        "messages_per_s": len(lat) / elapsed_s if elapsed_s else 0.0,
        "latency_p50_ms": pct(0.50), "latency_p99_ms": pct(0.99),
        "codes": dict(stats.codes), "bad_macs": stats.bad_macs, "errors": dict(stats.errors),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline.loadgen",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8583)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--pipeline", type=int, default=4, help="requests in flight per connection")
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--cards", type=int, default=100000, help="generated cards to pick from")
    parser.add_argument("--terminal-prefix", default="T1")
    parser.add_argument("--terminal-first", type=int, default=0)
    parser.add_argument("--mid", default="H11000000000001")
    parser.add_argument("--mac-alg", default="x9.19", choices=("x9.19", "cups-ecb"))
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args(argv)
    args.tmk = DEMO_TMK
    assert 1 <= args.connections <= CONNECTIONS_MAX, args.connections
    assert 1 <= args.pipeline <= PIPELINE_MAX, args.pipeline
    result = asyncio.run(run(args))
    print(f"{result['messages']} messages in {result['elapsed_s']:.2f} s: "
          f"{result['messages_per_s']:.0f} messages/s, p50 {result['latency_p50_ms']:.2f} ms, "
          f"p99 {result['latency_p99_ms']:.2f} ms; codes {result['codes']}; "
          f"bad MACs {result['bad_macs']}; errors {result['errors']}")
    return result


if __name__ == "__main__":
    main()
