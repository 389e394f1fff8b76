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


def run_load(node, keys, count: int, cards: int, business_date: int, batch_size: int = 8192):
    engine = node.engine
    pan_hashes = generated_pan_hashes(keys, cards)
    requests = medical_settlements(engine, pan_hashes, count, seed=20261124)
    results = np.ones(count, dtype=RESULT_DTYPE)
    progress = Progress(count, "settling", "settlements")
    apply_s = 0.0
    t_start = time.perf_counter()
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        t0 = time.perf_counter()
        results[start:stop] = node.apply_and_append(requests[start:stop], business_date)
        apply_s += time.perf_counter() - t0
        progress.update(stop - start)
    progress.close()
    total_s = time.perf_counter() - t_start
    codes, counts = np.unique(codes_of(results), return_counts=True)
    mix = ", ".join(f"{c.decode()}: {n:,}" for c, n in zip(codes, counts))
    print(f"\nApplied and journaled {count:,} generated settlements over {cards:,} cards in {total_s:.2f} s: "
          f"{count / total_s:,.0f} durable settlements/s (apply + LMDB append with fsync per {batch_size:,}-message "
          f"batch, one core).")
    print(f"Response codes: {mix}")
    print(f"Fund paid {yuan(results['fund_fen'].sum())} yuan; insurance accounts {yuan(results['ins_leg_fen'].sum())}; "
          f"financial accounts {yuan(results['fin_leg_fen'].sum())}; cash {yuan(results['cash_fen'].sum())}.")


class _Durable:
    """Lets print_cases apply through the node (journaled) with the engine's interface."""
    def __init__(self, node):
        self.node = node

    def __getattr__(self, name):
        return getattr(self.node.engine, name)

    def apply_batch(self, requests, business_date):
        return self.node.apply_and_append(requests, business_date)


def run_demo(args):
    import os
    import shutil
    from yikatong.engine.cardkeys import CardKeys, DEMO_DATA_KEY
    from yikatong.ledger.node import Node
    from yikatong.ledger.verify import verify
    from .nodes import init_demo_node

    business_date = today()
    data_dir = os.path.abspath(args.data)
    if os.path.exists(os.path.join(data_dir, "node.json")) and os.path.exists(os.path.join(data_dir, "demo.marker")):
        shutil.rmtree(data_dir)                      # the previous demo run's node, and only that
    t0 = time.perf_counter()
    node = init_demo_node(data_dir, args.cards, business_date=business_date)
    open(os.path.join(data_dir, "demo.marker"), "w").write("created by `yikatong demo`; removed by the next run\n")
    keys = CardKeys(DEMO_DATA_KEY)
    engine = node.engine
    print(f"Demo node (DEMO.md) in {data_dir}: {engine.card_count:,} cards, {len(engine.config.terminals)} terminals, "
          f"business date {business_date}, genesis journaled in {time.perf_counter() - t0:.2f} s "
          f"({engine.bytes_per_card():.0f} bytes/card).\n")
    print_cases(_Durable(node), keys, business_date)
    run_load(node, keys, args.settlements, args.cards, business_date)
    arrays = {k: v.copy() for k, v in node.engine.arrays.items()}
    last_seq = node.journal.last_seq
    node.close()
    t0 = time.perf_counter()
    node = Node.open(data_dir)
    same = all(node.engine.arrays[k].tobytes() == v.tobytes() for k, v in arrays.items())
    print(f"\nRestart: recovered {node.journal.last_seq:,} journal records (checkpoint at {node.checkpoint_seq:,} + "
          f"replay of the tail) in {time.perf_counter() - t0:.2f} s; state identical to before the restart: {same}.")
    node.close()
    t0 = time.perf_counter()
    report = verify(data_dir)
    print(f"Verify (核对): OK — {report['records']:,} records, hash chain unbroken, money conserved on "
          f"{report['business_dates']} business date(s), replay equals the journal, {report['checkpoints']} "
          f"checkpoint(s) equal the replay ({time.perf_counter() - t0:.2f} s).")
    return 0 if same and last_seq == report["last_seq"] else 1
