"""Issue 6 benchmarks: issuance import (制卡数据) and a 代发 file with its 回盘, each against a naive
baseline in the same run (one journaled command per line instead of one batch per file)."""
import hashlib
import time

import numpy as np

from bench.conftest import size
from yikatong.cardfiles import disburse, import_issuance
from yikatong.engine.cardkeys import CardKeys, DEMO_DATA_KEY
from yikatong.engine.demo import generated_citizen_ids, generated_pans
from yikatong.nodes import init_demo_node

BD = 20261124
KEYS = CardKeys(DEMO_DATA_KEY)
HEADER = "citizen_id,name,region,ins_type,person_type,pan,expiry_yymm,ins_opening_fen,fin_opening_fen\n"


def issuance_file(first_k: int, count: int) -> bytes:
    pans = generated_pans(first_k, count).view(f"S16").ravel()
    ids = generated_citizen_ids(first_k, count).view("S18").ravel()
    lines = [f"{c.decode()},持卡人,{110000 if (first_k + i) % 2 == 0 else 310000},310,in_service,{p.decode()},3012,10000,20000\n"
             for i, (c, p) in enumerate(zip(ids, pans))]
    return (HEADER + "".join(lines)).encode()


def disbursement_file(count: int, cards: int) -> bytes:
    pans = generated_pans(0, cards).view("S16").ravel()
    rng = np.random.default_rng(7)
    picks = rng.integers(0, cards, count)
    lines = [f"PB1,{i + 1},{pans[k].decode()},持卡人,{1000 + i % 5000},pension\n" for i, k in enumerate(picks)]
    return ("batch_no,line,id,name,amount_fen,purpose\n" + "".join(lines)).encode()


def test_issuance_import(benchmark, tmp_path):
    count = size(5_000, 200_000)
    node = init_demo_node(str(tmp_path / "node"), 0, business_date=BD, spare_cards=count + 1000,
                          checkpoint_every_records=10 ** 9, txn_retention_count=1 << 12)
    data = issuance_file(0, count)
    timings = []

    def run():
        t = time.perf_counter()
        report = import_issuance(node, KEYS, data, "utf-8", BD)
        timings.append(time.perf_counter() - t)
        return report

    report = benchmark.pedantic(run, rounds=1, iterations=1)
    assert report.counts["imported"] == count
    rate = count / timings[0]
    # baseline: the same lines, one journaled command (one fsync) per line
    base_n = size(200, 2_000)
    baseline_data = issuance_file(count, base_n)
    lines = baseline_data.split(b"\n")
    t = time.perf_counter()
    for line in lines[1:-1]:
        import_issuance(node, KEYS, lines[0] + b"\n" + line + b"\n", "utf-8", BD)
    base_rate = base_n / (time.perf_counter() - t)
    checksum = hashlib.blake2b(node.engine.arrays["cards"][:node.engine.card_count].tobytes(), digest_size=8).hexdigest()
    benchmark.extra_info.update({"cards": count, "cards_per_s": round(rate), "baseline_cards_per_s": round(base_rate),
                                 "ratio": round(rate / base_rate, 1), "checksum": checksum})
    print(f"\nissuance import: {rate:,.0f} cards/s; per-line baseline {base_rate:,.0f}/s; "
          f"ratio {rate / base_rate:.1f}×; checksum {checksum}")
    node.close()


def test_disbursement_with_result_file(benchmark, tmp_path):
    cards = 10_000
    count = size(10_000, 1_000_000)
    node = init_demo_node(str(tmp_path / "node"), cards, business_date=BD, checkpoint_every_records=10 ** 9,
                          txn_retention_count=1 << 21)
    data = disbursement_file(count, cards)
    timings = []

    def run():
        t = time.perf_counter()
        report = disburse(node, KEYS, data, "utf-8", BD)
        timings.append(time.perf_counter() - t)
        return report

    report = benchmark.pedantic(run, rounds=1, iterations=1)
    assert report.counts["credited"] == count
    rate = count / timings[0]
    base_n = size(200, 2_000)
    head, *body = data.split(b"\n")[:base_n + 1]
    t = time.perf_counter()
    for i, line in enumerate(body):
        disburse(node, KEYS, head + b"\n" + line.replace(b"PB1,", b"PB2,") + b"\n", "utf-8", BD)
    base_rate = base_n / (time.perf_counter() - t)
    checksum = hashlib.blake2b(repr(report.rows[-100:]).encode(), digest_size=8).hexdigest()
    benchmark.extra_info.update({"lines": count, "lines_per_s": round(rate), "baseline_lines_per_s": round(base_rate),
                                 "ratio": round(rate / base_rate, 1), "checksum": checksum})
    print(f"\n代发 with 回盘: {rate:,.0f} lines/s; per-line baseline {base_rate:,.0f}/s; ratio {rate / base_rate:.1f}×")
    node.close()
