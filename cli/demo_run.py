"""`yikatong demo`: build the demo node (DEMO.md), replay DOMAIN.md cases A–D as readable tables,
then apply generated medical settlements (就医结算) and print the throughput."""
import time

import numpy as np

from yikatong.engine import RESULT_DTYPE, codes_of, rc_str
from yikatong.engine.builders import medical
from yikatong.engine.demo import demo_engine, today
from yikatong.engine.workload import generated_pan_hashes, medical_settlements

from .progress import Progress

CLAIM = (5000000, 300000, 50000, 100000, 4550000)    # total, FO, OL, PS, IS in fen
CASES = (
    ("A", "6214830000000017", "T0000001", False, "Beijing employee in service, tertiary hospital"),
    ("B", "6214830000000025", "T0000003", False, "Shanghai employee in service"),
    ("C", "6214830000000033", "T0000003", False, "Shanghai employee retired"),
    ("D", "6214830000000017", "T0000001", False, "case A's card again: second admission (PA=0)"),
    ("D'", "6214830000000017", "T0000001", True, "the same with partial approval (PA=1)"),
)


def yuan(fen: int) -> str:
    sign = "-" if fen < 0 else ""
    fen = abs(int(fen))
    return f"{sign}{fen // 100:,}.{fen % 100:02d}"


def print_cases(engine, keys, business_date: int):
    print("Medical settlement 就医结算 — DOMAIN.md worked examples (claim: total 50,000.00; "
          "FO 3,000.00; OL 500.00; PS 1,000.00; IS 45,500.00)\n")
    header = ("case", "fund 统筹", "deductible 起付", "insurance 个账", "financial 金融", "cash 现金",
              "ins. after", "fin. after", "code")
    rows = []
    for name, pan, terminal, pa, what in CASES:
        q = medical(engine, keys, pan, terminal, *CLAIM, pa=pa)
        r = engine.apply_batch(q, business_date=business_date)[0]
        code = rc_str(r["code"])
        if code in ("00", "10"):
            rows.append((name, yuan(r["fund_fen"]), yuan(r["deductible_fen"]), yuan(r["ins_leg_fen"]),
                         yuan(r["fin_leg_fen"]), yuan(r["cash_fen"]), yuan(r["ins_balance_fen"]),
                         yuan(r["fin_balance_fen"]), code))
        else:
            rows.append((name, "—", "—", "—", "—", "—", yuan(r["ins_balance_fen"]),
                         yuan(r["fin_balance_fen"]), f"{code} declined"))
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))
    print()
    for name, _pan, _t, _pa, what in CASES:
        print(f"  {name:>2}: {what}")
    print()


def run_load(engine, keys, count: int, cards: int, business_date: int, batch_size: int = 65536):
    pan_hashes = generated_pan_hashes(keys, cards)
    requests = medical_settlements(engine, pan_hashes, count, seed=20261124)
    results = np.ones(count, dtype=RESULT_DTYPE)
    progress = Progress(count, "settling", "settlements")
    busy_s = 0.0
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        t0 = time.perf_counter()
        engine.apply_batch(requests[start:stop], results[start:stop], business_date=business_date)
        busy_s += time.perf_counter() - t0
        progress.update(stop - start)
    progress.close()
    codes, counts = np.unique(codes_of(results), return_counts=True)
    mix = ", ".join(f"{c.decode()}: {n:,}" for c, n in zip(codes, counts))
    approved = results["code"] != 0
    print(f"\nApplied {count:,} generated settlements over {cards:,} cards in {busy_s:.2f} s of "
          f"apply_batch: {count / busy_s / 1e6:.2f} M settlements/s on one core (in memory, no journal).")
    print(f"Response codes: {mix}")
    print(f"Fund paid {yuan(results['fund_fen'].sum())} yuan; insurance accounts {yuan(results['ins_leg_fen'].sum())}; "
          f"financial accounts {yuan(results['fin_leg_fen'].sum())}; cash {yuan(results['cash_fen'].sum())}.")


def run_demo(args):
    business_date = today()
    t0 = time.perf_counter()
    engine, keys = demo_engine(generated_cards=args.cards, business_date=business_date)
    print(f"Demo node (DEMO.md): {engine.card_count:,} cards, {len(engine.config.terminals)} terminals, "
          f"business date {business_date}, built in {time.perf_counter() - t0:.2f} s "
          f"({engine.bytes_per_card():.0f} bytes/card).\n")
    print_cases(engine, keys, business_date)
    run_load(engine, keys, args.settlements, args.cards, business_date)
    return 0
