"""Engine benchmarks: apply_batch over medical settlements against the pure-Python reference
model in the same run, and memory per card with millions of cards.

    make bench                                   # CI size
    YIKATONG_BENCH_SIZE=full make bench-full     # the figures in bench/README.md
"""
import hashlib
import os
import resource
import time

import numpy as np

from bench.conftest import size
from yikatong.engine import Engine, RESULT_DTYPE, codes_of
from yikatong.engine.cardkeys import CardKeys, DEMO_DATA_KEY
from yikatong.engine.demo import demo_config, genesis_batches, NAMED_CARDS
from yikatong.engine.reference import Reference
from yikatong.engine.workload import generated_pan_hashes, medical_settlements

BD = 20261124
SEED = 20261124
KEYS = CardKeys(DEMO_DATA_KEY)


def build_engine(cards: int, retention: int) -> Engine:
    engine = Engine(demo_config(), card_capacity=len(NAMED_CARDS) + cards, txn_retention_count=retention)
    for batch in genesis_batches(KEYS, cards):
        engine.apply_batch(batch, business_date=BD)
    return engine


def checksum(results: np.ndarray) -> str:
    """What the batch computed, in 16 hex digits: codes, every leg and balance."""
    h = hashlib.blake2b(digest_size=8)
    for name in ("code", "fund_fen", "deductible_fen", "ins_leg_fen", "aid_leg_fen", "fin_leg_fen",
                 "cash_fen", "ins_balance_fen", "fin_balance_fen", "rrn"):
        h.update(np.ascontiguousarray(results[name]).tobytes())
    return h.hexdigest()


def timed(fn, durations):
    """Wrap `fn` to record its wall time: the figures must exist with --benchmark-disable too."""
    def run(*args):
        start = time.perf_counter()
        fn(*args)
        durations.append(time.perf_counter() - start)
    return run


def best_apply_seconds(benchmark, template: Engine, requests: np.ndarray, results: np.ndarray) -> float:
    """The fastest of a few rounds of apply_batch(requests), each on a fresh copy of `template`'s
    state (the copy is untimed setup)."""
    def fresh_engine():
        arrays = {name: a.copy() for name, a in template.arrays.items()}
        return (Engine(template.config, arrays=arrays),), {}

    durations = []
    benchmark.pedantic(timed(lambda engine: engine.apply_batch(requests, results, business_date=BD), durations),
                       setup=fresh_engine, rounds=size(3, 5), iterations=1)
    return min(durations)


def reference_rate(cards: int, requests: np.ndarray) -> tuple[float, list]:
    """Settlements per second of the reference model over `requests` (same cards, same order)."""
    ref = Reference(demo_config())
    for batch in genesis_batches(KEYS, cards):
        for q in batch:
            ref.apply(q, BD)
    start = time.perf_counter()
    answers = [ref.apply(q, BD) for q in requests]
    return len(requests) / (time.perf_counter() - start), answers


def test_apply_medical_settlements(benchmark):
    cards = size(10_000, 100_000)
    count = size(100_000, 1_000_000)
    template = build_engine(cards, retention=1 << 20)
    pan_hashes = generated_pan_hashes(KEYS, cards)
    requests = medical_settlements(template, pan_hashes, count, seed=SEED)
    results = np.ones(count, dtype=RESULT_DTYPE)            # touched once, reused every round
    engine_rate = count / best_apply_seconds(benchmark, template, requests, results)
    subset = size(2_000, 20_000)
    ref_rate, answers = reference_rate(cards, requests[:subset])
    # the baseline computed the same answers
    assert [a["code"] for a in answers] == [int(c) for c in results["code"][:subset]]
    assert [a["fin_leg_fen"] for a in answers] == [int(c) for c in results["fin_leg_fen"][:subset]]
    codes, counts = np.unique(codes_of(results), return_counts=True)
    benchmark.extra_info.update({
        "cards": cards, "settlements": count, "checksum": checksum(results),
        "codes": {c.decode(): int(n) for c, n in zip(codes, counts)},
        "engine_settlements_per_s": round(engine_rate), "reference_settlements_per_s": round(ref_rate),
        "ratio_vs_reference": round(engine_rate / ref_rate, 1),
    })
    print(f"\napply_batch: {engine_rate / 1e6:.2f} M settlements/s with {cards} cards; "
          f"reference {ref_rate:,.0f}/s; ratio {engine_rate / ref_rate:,.0f}×; checksum {checksum(results)}")


def test_apply_steady_state(benchmark):
    """The same settlements once the transaction table is full: every message also evicts the
    oldest entry (its two index keys deleted), as on a node that has run for a while. The table
    is filled first by settlements of other keys (untimed; first_stan past the timed ones)."""
    cards = size(10_000, 100_000)
    count = size(100_000, 1_000_000)
    retention = size(1 << 14, 1 << 18)
    template = build_engine(cards, retention=retention)
    pan_hashes = generated_pan_hashes(KEYS, cards)
    template.apply_batch(medical_settlements(template, pan_hashes, retention, seed=SEED + 2,
                                             first_stan=count + 1), business_date=BD)
    requests = medical_settlements(template, pan_hashes, count, seed=SEED)
    results = np.ones(count, dtype=RESULT_DTYPE)
    rate = count / best_apply_seconds(benchmark, template, requests, results)
    benchmark.extra_info.update({"cards": cards, "settlements": count, "txn_retention": retention,
                                 "settlements_per_s": round(rate), "checksum": checksum(results)})
    print(f"\nsteady state (table of {retention} full, each message evicts one): {rate / 1e6:.2f} M "
          f"settlements/s with {cards} cards; checksum {checksum(results)}")


def test_memory_per_card_and_apply_at_scale(benchmark):
    """Bytes per card of all card columns and indexes, with millions of generated cards, and the
    settlement rate at that size (cards no longer fit in cache)."""
    cards = size(200_000, 10_000_000)
    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    engine = build_engine(cards, retention=1 << 20)
    bytes_per_card = engine.bytes_per_card()
    assert bytes_per_card <= 128, bytes_per_card
    pan_hashes = generated_pan_hashes(KEYS, cards)
    count = size(100_000, 1_000_000)
    requests = medical_settlements(engine, pan_hashes, count, seed=SEED + 1)
    results = np.ones(count, dtype=RESULT_DTYPE)
    durations = []
    benchmark.pedantic(timed(lambda: engine.apply_batch(requests, results, business_date=BD), durations),
                       rounds=1, iterations=1)
    rate = count / min(durations)
    rss_after_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    benchmark.extra_info.update({
        "cards": cards, "bytes_per_card": round(bytes_per_card, 1),
        "settlements_per_s": round(rate), "checksum": checksum(results),
        "max_rss_growth_mib": round((rss_after_kib - rss_before_kib) / 1024),
    })
    print(f"\n{cards} cards: {bytes_per_card:.1f} bytes/card (columns + indexes); "
          f"{rate / 1e6:.2f} M settlements/s; checksum {checksum(results)}")
