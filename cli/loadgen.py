"""`yikatong load`: a load generator on the Cython codec (protocols/_client.pyx).

Signs on every terminal it uses (T1000000 … of DEMO.md), then drives C connections, each
pipelining up to K requests of one terminal: a mix of medical settlements (81),
pre-settlements (83) and PIN-verified balance inquiries on the generated cards. Every request
is MACed and every reply's MAC checked (batched: Python runs per chunk, not per message).

Closed loop (default): a reply frees a slot for the next request. Open loop (`--rate R`):
requests are scheduled at R per second whatever the replies do, and a request's latency runs
from when it was *scheduled*, so queueing in the client (a full window) is counted, not hidden.

At the end: offered and accepted throughput, latency p50/p99/p999/max, counts by response
code, MAC failures, and the ledger check — each terminal settles its batch (0500) with the
totals it was told (result digit 1 = the server's totals agree), and with `--data` every
approval received is looked up in the journal by RRN and amount.
"""
import asyncio
import collections
import socket
import time

import numpy as np

from yikatong.engine.demo import DEMO_TMK_HEX, GENERATED_TERMINALS, generated_pans
from yikatong.protocols import _client, _codec, security
from yikatong.protocols._framing import Framer

from .progress import Progress

RING = 1 << 16                      # per-connection STAN ring for send times (≥ the window)
LOAD_INSTITUTION = "H11000000000001"
MAC_ALGORITHMS = {"x9.19": 0, "cups-ecb": 1}


def _frame(fields: dict) -> bytes:
    body = _codec.encode_fields(fields)
    return len(body).to_bytes(2, "big") + body


async def _request(reader, writer, frame: bytes) -> dict:
    writer.write(frame)
    head = await reader.readexactly(2)
    body = await reader.readexactly(int.from_bytes(head, "big"))
    return _codec.decode_fields(body)


class TerminalSession:
    def __init__(self, tid, mac_alg, index=0):
        self.tid, self.mac_alg = tid, mac_alg
        self.index = index                 # row of LoadRun.debit_fen / debit_count
        self.pin_key = self.mac_key = None
        self.batch_no = 1
        self.stan = 0
        self.debit_fen = 0
        self.debit_count = 0


async def sign_on(host, port, session: TerminalSession, tmk: bytes):
    reader, writer = await asyncio.open_connection(host, port)
    try:
        reply = await _request(reader, writer, _frame({
            "t": "0800", "11": "%06d" % 999999, "41": session.tid, "42": LOAD_INSTITUTION,
            "60": "00000001003"}))
        if reply.get("39") != "00":
            raise RuntimeError(f"sign-on of {session.tid}: response {reply.get('39')}")
        try:
            session.pin_key, session.mac_key = security.open_working_keys(tmk, reply["62"])
        except ValueError:
            raise RuntimeError(f"sign-on of {session.tid}: key check values do not match") from None
        session.batch_no = int(reply["60"][2:8])
    finally:
        writer.close()


async def settle(host, port, session: TerminalSession) -> str:
    """0500 with the totals this run was told: the reply's result digit says whether the
    server's ledger agrees (1) or not (2); it also opens a new batch for the next run."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        fields = {"t": "0500", "11": "%06d" % 999998, "41": session.tid, "42": LOAD_INSTITUTION,
                  "48": "%012d%03d%012d%03d0" % (session.debit_fen, session.debit_count % 1000, 0, 0) + "0" * 31,
                  "60": "00%06d201" % session.batch_no}
        body = security.sealed_body(fields, session.mac_alg, session.mac_key)
        writer.write(len(body).to_bytes(2, "big") + body)
        head = await reader.readexactly(2)
        reply = _codec.decode_fields(await reader.readexactly(int.from_bytes(head, "big")))
        return reply.get("48", "")[30:31] if reply.get("39") == "00" else "x" + reply.get("39", "?")
    finally:
        writer.close()


class LoadConnection(asyncio.Protocol):
    def __init__(self, run, session: TerminalSession, stan_base: int, stan_step: int):
        self.run = run
        self.session = session
        self.factory = _client.RequestFactory(session.tid, LOAD_INSTITUTION, session.batch_no, run.pans,
                                              session.mac_key, session.pin_key, MAC_ALGORITHMS[session.mac_alg])
        self.framer = Framer(4096)
        self.transport = None
        # this connection's rows of the run's tables (views: a reply pass reads them for every
        # connection at once)
        self.index = len(run.connections)
        self.send_time = run.send_time[self.index]
        self.sent_kind = run.sent_kind[self.index]
        self.stan_next = stan_base
        self.stan_step = stan_step
        self.inflight = 0
        self.backlog_times = collections.deque()     # open loop: scheduled, not yet sent (chunks)
        self.frame_bytes_max = self.factory.frame_bytes_max()
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def plan(self, count: int, scheduled=None):
        """Take `count` requests (fewer if the window or the run's count is short): their kinds,
        cards, amounts and STANs, accounted as sent. Returns (self, kinds, stans, cards,
        amounts) for send_planned, or None."""
        count = min(count, self.run.window - self.inflight, self.run.remaining())
        if count <= 0:
            return None
        kinds, cards, amounts = self.run.draw(count)
        stans = (self.stan_next + self.stan_step * np.arange(count, dtype=np.int64)) % 999999 + 1
        self.stan_next += self.stan_step * count
        if scheduled is None:
            self.send_time[stans & (RING - 1)] = time.perf_counter()
        else:
            self.send_time[stans & (RING - 1)] = scheduled[:count]
        self.sent_kind[stans & (RING - 1)] = kinds
        self.inflight += count
        self.run.sent += count
        return (self, kinds, stans.astype(np.uint32), cards, amounts, None if scheduled is None else scheduled[:count])

    def send(self, count: int, scheduled=None) -> int:
        p = self.plan(count, scheduled)
        if p is None:
            return 0
        send_planned([p], self.run)
        return len(p[1])

    def data_received(self, data):
        frames = self.framer.feed(data)
        if frames:
            # checked later in this loop iteration, together with the other connections' replies
            self.run.arrived(self, frames)

    def plan_backlog(self, plans: list):
        """Open loop: plan what this connection's window lets go of its scheduled backlog."""
        while self.backlog_times and self.inflight < self.run.window:
            times = self.backlog_times[0]
            p = self.plan(len(times), times)
            if p is None:
                break
            plans.append(p)
            if len(p[1]) == len(times):
                self.backlog_times.popleft()
            else:
                self.backlog_times[0] = times[len(p[1]):]

    def connection_lost(self, exc):
        if not self.closed.done():
            self.closed.set_result(exc)
        if not self.run.closing:
            self.run.lost += 1
        self.run.finished.set()


def send_planned(plans: list, run) -> None:
    """Build the planned requests of several connections with one MAC pass (_client.build_many)
    and write each connection's frames."""
    if not plans:
        return
    # a buffer per plan (a connection may have two plans in one pass), written as is: uvloop
    # keeps a reference to what the socket could not take yet, and nothing rewrites it
    outs = [bytearray(len(p[1]) * p[0].frame_bytes_max) for p in plans]
    used = _client.build_many([p[0].factory for p in plans], [p[1] for p in plans], [p[2] for p in plans],
                              [p[3] for p in plans], [p[4] for p in plans], outs)
    now = time.perf_counter()
    for (conn, _, _, _, _, scheduled), out, n in zip(plans, outs, used):
        if scheduled is not None:
            # open loop: how late the client itself sent them (part of the latency, reported apart)
            run.send_lags.append((now - scheduled).astype(np.float32))
        conn.transport.write(memoryview(out)[:n])


class LoadRun:
    def __init__(self, args):
        self.args = args
        self.count = args.count
        self.duration_s = args.duration
        self.window = args.pipeline
        self.open_loop = args.rate > 0
        mix = dict(item.split("=") for item in args.mix.split(","))
        weights = np.array([float(mix.get("med", 0)), float(mix.get("pre", 0)), float(mix.get("bal", 0))])
        self.mix = weights / weights.sum()
        self.rng = np.random.default_rng(args.seed)
        # random draws made once, in bulk (per-send rng calls were a fifth of the generator's CPU):
        # a pool of POOL rows read cyclically; each send takes the next slice
        pool = 1 << 20
        self.pool_kinds = np.searchsorted(np.cumsum(self.mix), self.rng.random(pool), side="right").astype(np.uint8)
        self.pool_kinds = np.minimum(self.pool_kinds, 2)
        self.pool_cards = self.rng.integers(0, args.cards, size=pool, dtype=np.int64)
        self.pool_amounts = self.rng.integers(100, 20000, size=pool, dtype=np.int64)
        self.pool_at = 0
        self.pans = generated_pans(0, args.cards)
        self.sent = 0
        self.received = 0
        self.mac_bad = 0
        self.undecodable = 0
        self.lost = 0
        self.codes = collections.Counter()
        self.code_chunks = []
        self.latencies = []
        self.send_lags = []
        self.approved_rrn = []
        self.approved_amount = []
        self.stopping = False
        self.closing = False
        self.finished = asyncio.Event()
        self.started = None
        self.last_reply_at = time.perf_counter()
        self.progress = None
        # replies that arrived in this loop iteration, per connection: (conn, frames, time)
        self.arrivals = []
        self.scan_scheduled = False
        self.connections = []
        self.send_time = np.zeros((args.connections, RING), np.float64)     # [connection, STAN ring]
        self.sent_kind = np.zeros((args.connections, RING), np.uint8)
        # written now, before the clock starts: np.zeros' pages are mapped lazily, and faulting
        # 36 MB of them in during the first sends made the client itself 20–40 ms late there
        self.send_time.fill(0.0)
        self.sent_kind.fill(0)
        self.debit_fen = None                # [terminal session]: what each was told, for its 0500
        self.debit_count = None
        self.replies = np.zeros(4096, _client.REPLY_DTYPE)
        self.ticker = None                 # open loop: sends what is due (called on every reply pass too)

    def draw(self, count: int):
        """(kinds, cards, amounts) for the next `count` requests, from the pools."""
        n = len(self.pool_kinds)
        at = self.pool_at
        self.pool_at = (at + count) % n
        if at + count <= n:
            return self.pool_kinds[at:at + count], self.pool_cards[at:at + count], self.pool_amounts[at:at + count]
        idx = (at + np.arange(count)) % n
        return self.pool_kinds[idx], self.pool_cards[idx], self.pool_amounts[idx]

    def remaining(self) -> int:
        if self.stopping:
            return 0
        if self.count:
            return self.count - self.sent
        return 1 << 30

    def done(self) -> bool:
        if self.count:
            return self.received >= self.count
        return self.stopping and all(c.inflight == 0 for c in self.connections)

    def arrived(self, conn, frames):
        if not self.arrivals and not self.scan_scheduled:
            self.scan_scheduled = True
            asyncio.get_running_loop().call_soon(self.scan_arrivals)
        self.arrivals.append((conn, frames, time.perf_counter()))

    def scan_arrivals(self):
        """Every reply that arrived in this loop iteration, from every connection: one
        scan_replies call (MACs verified in full bitsliced groups, not a handful per
        connection), then the bookkeeping per connection run."""
        self.scan_scheduled = False
        arrivals, self.arrivals = self.arrivals, []
        if not arrivals:
            return
        self.last_reply_at = arrivals[-1][2]
        frames = []
        keys = []
        algs = []
        for conn, fs, _ in arrivals:
            frames += fs
            keys.append(conn.session.mac_key * len(fs))
            algs.append(bytes((MAC_ALGORITHMS[conn.session.mac_alg],)) * len(fs))
        n = len(frames)
        if n > len(self.replies):
            self.replies = np.zeros(max(n, 2 * len(self.replies)), _client.REPLY_DTYPE)
        undecodable = _client.scan_replies(frames, b"".join(keys), b"".join(algs), self.replies)
        self.undecodable += undecodable
        r = self.replies[:n]
        # per row: its connection, the time its read arrived; then one pass over all rows
        counts = [len(fs) for _, fs, _ in arrivals]
        conn_of = np.repeat(np.array([c.index for c, _, _ in arrivals], np.int64), counts)
        arrived_at = np.repeat(np.array([t for _, _, t in arrivals]), counts)
        slot = r["stan"] & (RING - 1)
        session_of = np.repeat(np.array([c.session.index for c, _, _ in arrivals], np.int64), counts)
        self.record(r, arrived_at - self.send_time[conn_of, slot], self.sent_kind[conn_of, slot], session_of)
        plans = []
        for (conn, _, _), k in zip(arrivals, counts):
            conn.inflight -= k
            if not self.open_loop and not self.stopping:
                p = conn.plan(k)
                if p is not None:
                    plans.append(p)
        if self.open_loop:
            if self.ticker is not None:
                self.ticker(plans=plans)       # what fell due meanwhile, without waiting for the timer
            for conn, _, _ in arrivals:
                if conn.backlog_times:
                    conn.plan_backlog(plans)
        send_planned(plans, self)
        if self.progress:
            self.progress.update(n)
        if self.done():
            self.finished.set()

    def record(self, replies, latency_s, kinds, session_of):
        n = len(replies)
        self.received += n
        ok = replies["decoded"] == 1
        self.mac_bad += int(np.count_nonzero(ok & (replies["mac_ok"] == 0)))
        self.latencies.append(latency_s.astype(np.float32))
        self.code_chunks.append(replies["code"][ok].copy())     # counted once, at the end
        # approvals that moved money: medical settlements (81) answered 00 or 10
        approved = ok & (kinds == _client.KIND_MED) & ((replies["code"] == b"00") | (replies["code"] == b"10"))
        if approved.any():
            amounts = replies["amount_fen"][approved]
            self.approved_rrn.append(replies["rrn"][approved].copy())
            self.approved_amount.append(amounts.copy())
            np.add.at(self.debit_fen, session_of[approved], amounts)          # integer fen, per terminal
            np.add.at(self.debit_count, session_of[approved], 1)


def _percentiles(lat_ms):
    if not len(lat_ms):
        return {}
    q = np.percentile(lat_ms, [50, 99, 99.9])
    return {"p50": q[0], "p99": q[1], "p999": q[2], "max": float(lat_ms.max())}


async def run_load(args, announce=print) -> dict:
    tmk = bytes.fromhex(DEMO_TMK_HEX)
    run = LoadRun(args)
    if getattr(args, "mac", "x9.19") == "cups-ecb":
        terminals = [TerminalSession("T0000007", "cups-ecb")]          # DEMO.md's cups-ecb terminal
    else:
        terminals = [TerminalSession(tid, "x9.19", i) for i, tid in enumerate(GENERATED_TERMINALS[:args.terminals])]
    run.debit_fen = np.zeros(len(terminals), np.int64)
    run.debit_count = np.zeros(len(terminals), np.int64)
    await asyncio.gather(*(sign_on(args.host, args.port, s, tmk) for s in terminals))
    loop = asyncio.get_running_loop()
    per_terminal = collections.Counter()
    plan = []
    for c in range(args.connections):
        s = terminals[c % len(terminals)]
        plan.append((s, per_terminal[s.tid]))
        per_terminal[s.tid] += 1
    for s, j in plan:
        # connections sharing a terminal interleave their STANs: the duplicate key (41 + 11 + 60.2 + 13) stays unique
        _, conn = await loop.create_connection(
            lambda s=s, j=j: LoadConnection(run, s, j, per_terminal[s.tid]), args.host, args.port)
        run.connections.append(conn)
    total = args.count or int(args.duration * (args.rate or 100_000))
    run.progress = Progress(total, "load", unit="msg")
    run.started = run.last_reply_at = time.perf_counter()
    if run.open_loop:
        asyncio.ensure_future(_open_loop_ticker(run))
    else:
        for conn in run.connections:
            conn.send(run.window)
    if not args.count:
        loop.call_later(args.duration, _stop, run)
    # FIX: the wait below used to time out reply_timeout after the start whatever the replies did
    # (`finished` is set only at the end), so a run longer than that — a --duration run, or a
    # slow server — stopped as if no reply had come. The timeout now runs from the last reply.
    while not run.done() and run.lost == 0:
        run.finished.clear()
        left_s = args.reply_timeout - (time.perf_counter() - run.last_reply_at)
        try:
            await asyncio.wait_for(run.finished.wait(), timeout=max(left_s, 0.001))
        except asyncio.TimeoutError:
            if time.perf_counter() - run.last_reply_at < args.reply_timeout:
                continue
            announce(f"no reply for {args.reply_timeout} s: stopping ({run.sent - run.received} unanswered)")
            break
    elapsed = time.perf_counter() - run.started
    run.progress.close()
    run.closing = True
    for conn in run.connections:
        conn.transport.close()
    # what each terminal was told, then 0500: do the server's totals agree? (opens a new batch,
    # so that the next run's STANs do not repeat this one's duplicate keys)
    for session in terminals:
        session.debit_fen = int(run.debit_fen[session.index])
        session.debit_count = int(run.debit_count[session.index])
    settled = await asyncio.gather(*(settle(args.host, args.port, s) for s in terminals))
    if run.code_chunks:
        codes, counts = np.unique(np.concatenate(run.code_chunks), return_counts=True)
        run.codes.update({c.decode("ascii", "replace"): int(k) for c, k in zip(codes.tolist(), counts.tolist())})
    rrn = np.concatenate(run.approved_rrn) if run.approved_rrn else np.zeros(0, np.uint64)
    amount = np.concatenate(run.approved_amount) if run.approved_amount else np.zeros(0, np.int64)
    report = {"sent": run.sent, "received": run.received, "elapsed_s": elapsed,
              "offered_per_s": (args.rate if run.open_loop else run.sent / elapsed),
              "accepted_per_s": run.received / elapsed, "codes": dict(sorted(run.codes.items())),
              "mac_failures": run.mac_bad, "undecodable": run.undecodable,
              "connections_lost": run.lost, "approved_settlements": int(len(rrn)),
              "approved_fen": int(amount.sum()),
              "batch_settlement": dict(collections.Counter(settled))}
    lat = np.concatenate(run.latencies) * 1000 if run.latencies else np.zeros(0)
    report["latency_ms"] = _percentiles(lat)
    if run.send_lags:
        report["send_lag_ms"] = _percentiles(np.concatenate(run.send_lags) * 1000)
    if args.data:
        report["ledger"] = ledger_check(args.data, rrn, amount)
    return report


def _stop(run):
    run.stopping = True
    run.finished.set()


async def _open_loop_ticker(run):
    """Schedule requests at the offered rate, spread over the connections; a full window leaves
    them queued in the client with their scheduled time (latency counts the wait). What is due
    is sent every millisecond and, between, whenever replies are processed (the timer alone
    would add up to a tick to every request)."""
    rate = run.args.rate
    start = time.perf_counter()
    state = {"scheduled": 0, "k": 0}
    conns = run.connections

    def send_due(min_due=64, plans=None):
        scheduled = state["scheduled"]
        now = time.perf_counter()
        due = int((now - start) * rate) - scheduled
        if run.count:
            due = min(due, run.count - scheduled)
        # between ticks only chunks of ≥ 64 (Python per chunk, MACs batched 64 lanes wide);
        # the tick sends whatever is due
        if due <= 0 or due < min_due:
            return
        times = start + (scheduled + np.arange(due)) / rate
        state["scheduled"] = scheduled + due
        per = max(64, due // len(conns))
        mine = plans is None
        plans = [] if mine else plans
        for i in range(0, due, per):
            conn = conns[state["k"] % len(conns)]
            state["k"] += 1
            conn.backlog_times.append(times[i:i + per])
            conn.plan_backlog(plans)
        if mine:
            send_planned(plans, run)

    run.ticker = send_due
    while not run.stopping and (not run.count or state["scheduled"] < run.count):
        await asyncio.sleep(0.001)
        send_due(1)
    run.ticker = None


def ledger_check(data_dir: str, rrn: np.ndarray, amount: np.ndarray) -> dict:
    """Every approval the generator received is in the journal, with the same amount."""
    from yikatong.ledger.journal import Journal
    journal = Journal(data_dir, readonly=True)
    try:
        records = journal.read(1, journal.last_seq) if journal.last_seq else None
    finally:
        journal.close()
    if records is None or not len(rrn):
        return {"approvals_checked": 0, "missing": int(len(rrn)), "ok": not len(rrn)}
    jr = records["result"]["rrn"]
    ja = records["result"]["amount_fen"]
    order = np.argsort(jr)
    pos = np.searchsorted(jr[order], rrn)
    pos = np.minimum(pos, len(jr) - 1)
    found = jr[order][pos] == rrn
    same = found & (ja[order][pos] == amount)
    return {"approvals_checked": int(len(rrn)), "missing": int((~found).sum()),
            "amount_mismatch": int((found & ~same).sum()), "ok": bool(same.all())}


def format_report(r: dict) -> str:
    lat = r.get("latency_ms", {})
    lines = [
        f"load: {r['sent']:,} sent, {r['received']:,} answered in {r['elapsed_s']:.2f} s",
        f"  offered   {r['offered_per_s']:,.0f} msg/s",
        f"  accepted  {r['accepted_per_s']:,.0f} msg/s (durable replies)",
    ]
    if lat:
        lines.append(f"  latency   p50 {lat['p50']:.2f} ms  p99 {lat['p99']:.2f} ms  p999 {lat['p999']:.2f} ms  max {lat['max']:.2f} ms")
    lag = r.get("send_lag_ms")
    if lag:
        lines.append(f"  of which  client send lag (scheduled → written) p50 {lag['p50']:.2f} ms  p99 {lag['p99']:.2f} ms  max {lag['max']:.2f} ms")
    lines.append("  codes     " + "  ".join(f"{c}: {n:,}" for c, n in r["codes"].items()))
    lines.append(f"  MAC failures {r['mac_failures']}, undecodable {r['undecodable']}, connections lost {r['connections_lost']}")
    lines.append(f"  approved settlements {r['approved_settlements']:,} totalling {r['approved_fen']:,} fen")
    bs = r.get("batch_settlement", {})
    lines.append(f"  batch settlement (批结算, 0500): {bs.get('1', 0)} terminals balanced, "
                 f"{sum(v for k, v in bs.items() if k != '1')} not")
    if "ledger" in r:
        g = r["ledger"]
        lines.append(f"  ledger check (对账): {g['approvals_checked']:,} approvals looked up, {g['missing']} missing, "
                     f"{g.get('amount_mismatch', 0)} amount mismatches → {'OK' if g['ok'] else 'FAILED'}")
    return "\n".join(lines)
