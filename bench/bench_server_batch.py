"""The server's batch path alone (issue 5): CPU per message of `Server._process` + `_deliver`
— decode, security (MACs, PIN blocks), engine, records to the writer's ring, 0500 totals and
metrics, encode, reply MACs, the per-connection reply slices — at fixed batch sizes, in process.

Why: open-loop traffic at 150,000/s comes in batches of a few hundred messages, closed loop in
thousands; what the server pays per batch on top of per message decides its CPU per message at
open-loop rates. This measures that curve without sockets or the event loop (their cost is in
bench_server.py's end-to-end figure): the frames are real (64 load terminals signed on, X9.19
MACs, 80 % medical settlements, 10 % pre-settlements, 10 % PIN-verified balance inquiries),
the node is the 100,000-card demo node with its writer process, and each batch is waited for
(its commit) outside the timed part. Thread CPU time (time.thread_time), not wall time: the
machine is shared.

    YIKATONG_BENCH_SIZE=full .venv/bin/python -m pytest -q bench/bench_server_batch.py -p no:cacheprovider -s

The ratio is each size's CPU per message over the 4,096-message batch's, from the same run.
"""
import time

import numpy as np

from bench.conftest import size
from yikatong.engine.demo import GENERATED_TERMINALS, generated_pans
from yikatong.nodes import init_demo_node, node_keys
from yikatong.protocols import _client
from yikatong.protocols._framing import Framer
from yikatong.protocols.limits import load_config
from yikatong.protocols.server import Server

CARDS = 100_000
TERMINALS = 64
CHUNK = 64                      # frames per connection read, as the open-loop load generator sends
SIZES = (64, 256, 1024, 4096)


class SinkTransport:
    """Where the replies go: the socket's cost is not part of this figure."""
    def write(self, data):
        pass


class Peer:
    """What _deliver needs of a connection."""
    closed = False

    def __init__(self):
        self.transport = SinkTransport()

    def replied(self, count):
        pass


def test_server_batch_path(tmp_path, benchmark):
    messages = size(20_000, 400_000)
    node = init_demo_node(str(tmp_path / "node"), generated_cards=CARDS)
    server = Server(node, node_keys(), load_config(None))
    rng = np.random.default_rng(7)
    pans = generated_pans(0, CARDS)
    factories, peers, stans = [], [], [0] * TERMINALS
    for k, tid in enumerate(GENERATED_TERMINALS[:TERMINALS]):
        t = server.codec.terminal_of(tid)
        mac_key, pin_key = bytes([k + 1]) * 16, bytes([k + 101]) * 16      # fixed: the run is repeatable
        server.terminals.keys.sign_on(t, pin_key, mac_key)
        factories.append(_client.RequestFactory(tid, "H11000000000001", int(server.terminals.batch_no[t]), pans,
                                                mac_key, pin_key, 0))
        peers.append(Peer())

    def batch(n: int):
        frames, runs, k = [], [], 0
        while len(frames) < n:
            c, m = k % TERMINALS, min(CHUNK, n - len(frames))
            k += 1
            kinds = np.minimum(np.searchsorted([0.8, 0.9], rng.random(m), side="right"), 2).astype(np.uint8)
            stan = ((stans[c] + np.arange(m)) % 999999 + 1).astype(np.uint32)
            stans[c] += m
            out = bytearray(m * factories[c].frame_bytes_max())
            used = factories[c].build(kinds, stan, rng.integers(0, CARDS, m), rng.integers(100, 20000, m), out)
            got = Framer(4096).feed(bytes(out[:used]))
            frames += got
            runs.append((peers[c], len(got)))
        return frames, runs

    def run():
        per_message_us = {}
        for n in SIZES:
            batches = [batch(n) for _ in range(max(2, messages // n))]
            cpu_s, count = 0.0, 0
            for k, (frames, runs) in enumerate(batches):
                # one batch in flight, as under load: batch k is processed before batch k - 1's
                # replies are delivered (its commit waited for outside the timed part)
                t0 = time.thread_time()
                server._process(frames, runs)
                if k:
                    server._deliver(server.inflight.popleft())
                cpu_s += time.thread_time() - t0
                node.journal.wait_durable(server.inflight[0].ticket)
                count += len(frames)
            t0 = time.thread_time()
            server._deliver(server.inflight.popleft())
            cpu_s += time.thread_time() - t0
            per_message_us[n] = cpu_s / count * 1e6
        return per_message_us

    try:
        per_message_us = benchmark.pedantic(run, rounds=1, iterations=1)
        checksum = int(server.terminals.debit_fen.sum())          # approved settlements, fen
    finally:
        node.close()
    largest = per_message_us[SIZES[-1]]
    benchmark.extra_info.update({
        "cpu_us_per_msg": {n: round(v, 2) for n, v in per_message_us.items()},
        "ratio_vs_4096": {n: round(v / largest, 2) for n, v in per_message_us.items()},
        "checksum_approved_fen": checksum})
    print("\nserver batch path, thread CPU per message: " + ", ".join(
        f"batch {n}: {v:.2f} µs ({v / largest:.2f}×)" for n, v in per_message_us.items())
        + f"; approved {checksum:,} fen")
