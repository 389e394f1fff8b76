"""Issue 6 benchmarks: issuance import (制卡数据) and a 代发 file with its 回盘, each against a naive
baseline in the same run (one journaled command per line instead of one batch per file).
Full size: 10 M cards imported into an empty node; 1 M 代发 lines over 10,000 cards, with and
without the name check (户名不符) against the issuance data, the 回盘 file written."""
import hashlib
import time

import numpy as np

from bench.conftest import size
from yikatong.cardfiles import HolderNames, disburse, import_issuance, write_result_file
from yikatong.engine.cardkeys import CardKeys, DEMO_DATA_KEY
from yikatong.engine.demo import generated_citizen_ids, generated_pans
from yikatong.nodes import init_demo_node

BD = 20261124
KEYS = CardKeys(DEMO_DATA_KEY)
HEADER = "citizen_id,name,region,ins_type,person_type,pan,expiry_yymm,ins_opening_fen,fin_opening_fen\n"


def issuance_file(first_k: int, count: int) -> bytes:
    """Generated cards k = first_k … as issuance lines, built as one byte matrix (every line has
    the same width): citizen_id,持卡人,region,310,in_service,pan,3012,10000,20000."""
    parts = [b"", ",持卡人,".encode(), b"", b",310,in_service,", b"", b",3012,10000,20000\n"]
    widths = [18, len(parts[1]), 6, len(parts[3]), 16, len(parts[5])]
    rows = np.empty((count, sum(widths)), dtype=np.uint8)
    at = np.cumsum([0] + widths)
    k = np.arange(first_k, first_k + count)
    regions = np.where(k % 2 == 0, np.frombuffer(b"110000", np.uint8)[:, None], np.frombuffer(b"310000", np.uint8)[:, None]).T
    columns = [generated_citizen_ids(first_k, count), None, regions, None, generated_pans(first_k, count), None]
    for i, (part, column) in enumerate(zip(parts, columns)):
        rows[:, at[i]:at[i + 1]] = column if column is not None else np.frombuffer(part, np.uint8)
    return HEADER.encode() + rows.tobytes()


def disbursement_file(count: int, cards: int) -> bytes:
    pans = generated_pans(0, cards).view("S16").ravel()
    rng = np.random.default_rng(7)
    picks = rng.integers(0, cards, count)
    lines = [f"PB1,{i + 1},{pans[k].decode()},持卡人,{1000 + i % 5000},pension\n" for i, k in enumerate(picks)]
    return ("batch_no,line,id,name,amount_fen,purpose\n" + "".join(lines)).encode()


def test_issuance_import(benchmark, tmp_path):
    count = size(5_000, 10_000_000)
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
    result_path = str(tmp_path / "result.csv")
    timings = []

    def run(batch=b"PB1", holders=None):
        t = time.perf_counter()
        report = disburse(node, KEYS, data.replace(b"\nPB1,", b"\n" + batch + b","), "utf-8", BD, holders=holders)
        write_result_file(result_path, report)
        timings.append(time.perf_counter() - t)
        return report

    report = benchmark.pedantic(run, rounds=1, iterations=1)
    assert report.counts["credited"] == count
    rate = count / timings[0]
    # the same file (another batch number) with the name check against the cards' issuance data
    holders = HolderNames.from_files(node.engine.config, KEYS, [(issuance_file(0, cards), "utf-8")])
    checked = run(b"PB3", holders)
    assert checked.counts["credited"] == count
    checked_rate = count / timings[1]
    base_n = size(200, 2_000)
    head, *body = data.split(b"\n")[:base_n + 1]
    t = time.perf_counter()
    for i, line in enumerate(body):
        one = disburse(node, KEYS, head + b"\n" + line.replace(b"PB1,", b"PB2,") + b"\n", "utf-8", BD)
        write_result_file(result_path, one)
    base_rate = base_n / (time.perf_counter() - t)
    checksum = hashlib.blake2b(report.result_csv, digest_size=8).hexdigest()
    benchmark.extra_info.update({"lines": count, "lines_per_s": round(rate), "with_name_check_lines_per_s": round(checked_rate),
                                 "baseline_lines_per_s": round(base_rate), "ratio": round(rate / base_rate, 1),
                                 "checksum": checksum})
    print(f"\n代发 with 回盘: {rate:,.0f} lines/s; with the name check {checked_rate:,.0f} lines/s; per-line baseline "
          f"{base_rate:,.0f}/s; ratio {rate / base_rate:.1f}×; checksum {checksum}")
    node.close()
