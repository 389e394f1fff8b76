"""MAC benchmarks: X9.19 and CUPS-ECB MACs of request/reply pairs through `mac_batch` (bitsliced
DES across the batch) against `cryptography` one message at a time, in the same run; and raw
bitsliced 3DES blocks/s.

    make bench                                                        # CI size
    YIKATONG_BENCH_SIZE=full .venv/bin/python -m pytest -q bench/bench_mac.py -p no:cacheprovider -s

Budget (docs/crypto.md): both MACs of a request (136-byte MAB) + reply (240-byte MAB) pair in
≤ 1.5 µs on one core. The figures are reported, not asserted.
"""
import hashlib
import time
import warnings

import numpy as np

from bench.conftest import size
from yikatong.protocols import _des as des

from cryptography.hazmat.primitives.ciphers import Cipher, modes
try:
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
except ImportError:                                        # pragma: no cover
    from cryptography.hazmat.primitives.ciphers.algorithms import TripleDES

warnings.filterwarnings("ignore", message=".*TripleDES.*")

SEED = 20261124
REQUEST_BYTES, REPLY_BYTES = 136, 240        # MABs of a typical 0200 request and its 0210 reply
TERMINALS = 1000                             # distinct MAC keys across the batch


def workload(pairs: int, seed: int = SEED):
    """2 * pairs messages (request i at 2i, its reply at 2i+1), each pair under its terminal's key."""
    rng = np.random.default_rng(seed)
    terminal_keys = rng.integers(0, 256, (TERMINALS, 16), dtype=np.uint8)
    terminal = rng.integers(0, TERMINALS, pairs)
    keys = np.repeat(terminal_keys[terminal], 2, axis=0)
    messages = []
    for _ in range(pairs):
        messages.append(rng.bytes(REQUEST_BYTES))
        messages.append(rng.bytes(REPLY_BYTES))
    return keys, messages


def checksum(macs) -> str:
    h = hashlib.blake2b(digest_size=8)
    for mac in macs:
        h.update(bytes(mac))
    return h.hexdigest()


def timed(fn, durations):
    """Wrap `fn` to record its wall time: the figures must exist with --benchmark-disable too."""
    def run(*args):
        start = time.perf_counter()
        result = fn(*args)
        durations.append(time.perf_counter() - start)
        return result
    return run


def baseline_x919(keys: np.ndarray, messages: list) -> list:
    """cryptography, per message: one CBC encryptor under KL over the zero-padded MAB, then the
    two single-block ECB steps (D under KR, E under KL)."""
    macs = []
    for key, mab in zip(keys, messages):
        k = key.tobytes()
        kl, kr = k[:8] * 3, k[8:] * 3                      # K1=K2=K3: single DES through 3DES
        padded = mab + bytes(-len(mab) % 8) if mab else bytes(8)
        enc = Cipher(TripleDES(kl), modes.CBC(bytes(8))).encryptor()
        last = enc.update(padded)[-8:]
        last = Cipher(TripleDES(kr), modes.ECB()).decryptor().update(last)
        macs.append(Cipher(TripleDES(kl), modes.ECB()).encryptor().update(last))
    return macs


def baseline_cups(keys: np.ndarray, messages: list) -> list:
    """cryptography, per message: XOR fold in Python (int arithmetic), two 3DES-ECB blocks."""
    macs = []
    for key, mab in zip(keys, messages):
        k = key.tobytes()
        padded = mab + bytes(-len(mab) % 8)
        r = 0
        for i in range(0, len(padded), 8):
            r ^= int.from_bytes(padded[i:i + 8], "big")
        h = format(r, "016X").encode()
        enc = Cipher(TripleDES(k + k[:8]), modes.ECB()).encryptor()
        e1 = enc.update(h[:8])
        e2 = enc.update(bytes(a ^ b for a, b in zip(e1, h[8:])))
        macs.append(e2.hex().upper()[:8].encode())
    return macs


def _run_pairs(benchmark, algorithm: int, baseline, label: str):
    pairs = size(256, 4096)
    keys, messages = workload(pairs)
    algorithms = np.full(2 * pairs, algorithm, dtype=np.uint8)
    durations = []
    out = benchmark.pedantic(timed(des.mac_batch, durations), args=(keys, messages, algorithms),
                             rounds=size(5, 20), iterations=1, warmup_rounds=1)
    ours_ns = min(durations) / pairs * 1e9
    start = time.perf_counter()
    reference = baseline(keys, messages)
    base_ns = (time.perf_counter() - start) / pairs * 1e9
    assert checksum(out) == checksum(reference)           # the baseline computed the same MACs
    # the same batch on each kernel path this CPU has (min of 3 rounds each)
    per_path = {}
    try:
        for path in des.kernel_paths():
            if path == "scalar" and pairs > 512:
                continue                                   # minutes at full size; see README
            des.set_kernel_path(path)
            best = min(timed_once(des.mac_batch, keys, messages, algorithms) for _ in range(3))
            per_path[path] = round(best / pairs * 1e9)
    finally:
        des.set_kernel_path("auto")
    benchmark.extra_info.update({
        "pairs": pairs, "checksum": checksum(out), "ns_per_pair": round(ours_ns),
        "baseline_ns_per_pair": round(base_ns), "ratio_vs_baseline": round(base_ns / ours_ns, 1),
        "ns_per_pair_by_path": per_path,
    })
    print(f"\n{label}: {pairs} pairs ({REQUEST_BYTES}+{REPLY_BYTES}-byte MABs, mixed keys): "
          f"{ours_ns:,.0f} ns/pair (min of rounds, median {np.median(durations) / pairs * 1e9:,.0f}); "
          f"cryptography per message {base_ns:,.0f} ns/pair; ratio {base_ns / ours_ns:.1f}×; "
          f"by path {per_path}; checksum {checksum(out)}")


def timed_once(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def test_mac_x919_pairs(benchmark):
    _run_pairs(benchmark, des.ALGORITHM_X919, baseline_x919, "x9.19")


def test_mac_cups_ecb_pairs(benchmark):
    _run_pairs(benchmark, des.ALGORITHM_CUPS_ECB, baseline_cups, "cups-ecb")


def test_tdes_blocks(benchmark):
    """Raw bitsliced 3DES: n blocks under n different keys (3 DES passes per block)."""
    n = size(4096, 65536)
    rng = np.random.default_rng(SEED)
    keys = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    blocks = rng.integers(0, 256, (n, 8), dtype=np.uint8)
    durations = []
    out = benchmark.pedantic(timed(des.tdes_ecb_batch, durations), args=(keys, blocks),
                             rounds=size(3, 10), iterations=1)
    rate = n / min(durations)
    subset = size(1024, 8192)
    start = time.perf_counter()
    reference = [Cipher(TripleDES(k.tobytes() + k[:8].tobytes()), modes.ECB()).encryptor().update(b.tobytes())
                 for k, b in zip(keys[:subset], blocks[:subset])]
    base_rate = subset / (time.perf_counter() - start)
    assert checksum(out[:subset]) == checksum(reference)
    benchmark.extra_info.update({
        "blocks": n, "checksum": checksum(out), "tdes_blocks_per_s": round(rate),
        "des_blocks_per_s": round(3 * rate), "baseline_tdes_blocks_per_s": round(base_rate),
        "ratio_vs_baseline": round(rate / base_rate, 1),
    })
    print(f"\n3DES-ECB, {n} blocks, {n} keys: {rate / 1e6:.2f} M 3DES blocks/s = "
          f"{3 * rate / 1e6:.2f} M DES blocks/s ({1e9 / (3 * rate):.1f} ns per DES block); "
          f"cryptography one cipher per block {base_rate / 1e3:,.0f} k/s; ratio {rate / base_rate:.0f}×; "
          f"checksum {checksum(out)}")
