"""CPU time of the engine's apply loop, for comparing builds on a shared machine.

    .venv/bin/python tools/apply_cpu.py --rounds 15                 # min-of-15 CPU time, 100 k cards
    .venv/bin/python tools/apply_cpu.py --steady --rounds 9         # the table full (2^18 entries)
    .venv/bin/python tools/apply_cpu.py --count 200000 --rounds 1   # one run, e.g. under callgrind:
    valgrind --tool=callgrind --toggle-collect='*apply_rows*' .venv/bin/python tools/apply_cpu.py --count 200000 --rounds 1

The workload is bench/bench_engine.py's (same seeds, so the same checksum for the same count);
each round applies the batch to a fresh copy of the state (the copy is not timed). CPU time of
the applying thread (`time.thread_time`) is what the neighbours' load disturbs least; its
minimum over the rounds is the figure, the wall time is printed beside it.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.bench_engine import build_engine, checksum, KEYS, BD, SEED          # noqa: E402
from yikatong.engine import Engine, RESULT_DTYPE, _core                       # noqa: E402
from yikatong.engine.workload import generated_pan_hashes, medical_settlements  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cards", type=int, default=100_000)
    ap.add_argument("--count", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steady", action="store_true", help="fill a 2^18-entry table first")
    ap.add_argument("--retention", type=int, default=0, help="transaction table size (default 2^20, 2^18 with --steady)")
    args = ap.parse_args()
    retention = args.retention or (1 << 18 if args.steady else 1 << 20)
    template = build_engine(args.cards, retention=retention)
    pan_hashes = generated_pan_hashes(KEYS, args.cards)
    if args.steady:
        template.apply_batch(medical_settlements(template, pan_hashes, retention, seed=SEED + 2,
                                                 first_stan=args.count + 1), business_date=BD)
    requests = medical_settlements(template, pan_hashes, args.count, seed=SEED)
    results = np.ones(args.count, dtype=RESULT_DTYPE)
    cpu, wall = [], []
    for _ in range(args.rounds):
        engine = Engine(template.config, arrays={name: a.copy() for name, a in template.arrays.items()})
        w0, c0 = time.perf_counter(), time.thread_time()
        engine.apply_batch(requests, results, business_date=BD)
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    print(f"{args.cards} cards, {args.count} settlements{' (table full)' if args.steady else ''}: "
          f"min CPU {min(cpu) * 1e3:.1f} ms = {args.count / min(cpu) / 1e6:.2f} M/s; "
          f"median CPU {sorted(cpu)[len(cpu) // 2] * 1e3:.1f} ms; min wall {min(wall) * 1e3:.1f} ms = "
          f"{args.count / min(wall) / 1e6:.2f} M/s; checksum {checksum(results)}; "
          f"load {os.getloadavg()[0]:.2f}; {os.path.dirname(_core.__file__)}")


if __name__ == "__main__":
    main()
