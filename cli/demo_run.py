"""`yikatong demo`: build the demo node (DEMO.md), start `yikatong serve` on it, drive DOMAIN.md
cases A–D through the wire with the terminal client, run a short load with `yikatong load`'s
generator, stop the server with SIGTERM (drain), then restart and verify the node."""
import os
import signal
import time

from yikatong.engine.demo import DEMO_TMK_HEX, today

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


def print_cases(port: int, tmk: bytes):
    """Cases A–D through the wire: a terminal signs on, MACs its requests, checks the replies."""
    from yikatong.protocols.terminal import Terminal
    print("Medical settlement 就医结算 over ISO 8583 — DOMAIN.md worked examples (claim: total 50,000.00; "
          "FO 3,000.00; OL 500.00; PS 1,000.00; IS 45,500.00)\n")
    header = ("case", "terminal", "fund 统筹", "deductible 起付", "insurance 个账", "financial 金融", "cash 现金",
              "ins. after", "fin. after", "code", "MAC")
    rows = []
    terminals = {}
    total, fo, ol, ps, _ = CLAIM
    for name, pan, tid, pa, what in CASES:
        if tid not in terminals:
            mid = "H11000000000001" if tid == "T0000001" else "H31000000000001"
            terminals[tid] = Terminal("127.0.0.1", port, tid, mid, tmk)
            assert terminals[tid].sign_on().code == "00", f"sign-on of {tid} refused"
        reply = terminals[tid].medical(pan, total, fo=fo, ol=ol, ps=ps, med_type="21", pa=pa)
        t = reply.tlv
        mac = "ok" if reply.mac_ok else "BAD"
        if reply.code in ("00", "10"):
            rows.append((name, tid, yuan(int(t["FP"])), yuan(int(t["DE"])), yuan(int(t["AP"])), yuan(int(t["BP"])),
                         yuan(int(t.get("CP", 0))), yuan(int(t["IB"])), yuan(int(t["BB"])), reply.code, mac))
        else:
            rows.append((name, tid, "—", "—", "—", "—", "—", yuan(reply.balance("91") or 0),
                         yuan(reply.balance("10") or 0), f"{reply.code} declined", mac))
    for t in terminals.values():
        t.close()
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))
    print()
    for name, _pan, _t, _pa, what in CASES:
        print(f"  {name:>2}: {what}")
    print()


def start_server(data_dir: str):
    """`yikatong serve` on the demo node in a child process; returns (process, port)."""
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "yikatong.main", "serve", "--data", data_dir, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=open(os.path.join(data_dir, "server.log"), "ab"), text=True)
    for line in proc.stdout:
        if line.startswith("listening on"):
            return proc, int(line.rsplit(":", 1)[1])
    raise RuntimeError(f"the server exited (code {proc.wait()}) before listening; see {data_dir}/server.log")


def wire_load(port: int, count: int, cards: int, data_dir: str) -> dict:
    import argparse
    import uvloop
    from .loadgen import format_report, run_load
    args = argparse.Namespace(host="127.0.0.1", port=port, terminals=64, connections=64, pipeline=128,
                              count=count, duration=0, rate=0, mix="med=80,pre=10,bal=10", cards=cards, seed=1,
                              data=data_dir, reply_timeout=30.0)
    report = uvloop.run(run_load(args))
    print(format_report(report))
    return report


def run_demo(args):
    import os
    import shutil
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
    engine = node.engine
    print(f"Demo node (DEMO.md) in {data_dir}: {engine.card_count:,} cards, {len(engine.config.terminals)} terminals, "
          f"business date {business_date}, genesis journaled in {time.perf_counter() - t0:.2f} s "
          f"({engine.bytes_per_card():.0f} bytes/card).\n")
    node.close()
    server, port = start_server(data_dir)
    try:
        print(f"Server: yikatong serve on 127.0.0.1:{port} (uvloop; replies leave once their batch is durable).\n")
        print_cases(port, bytes.fromhex(DEMO_TMK_HEX))
        print(f"Load: {args.settlements:,} MACed requests (80% 就医结算 81, 10% 预结算 83, 10% balance inquiries "
              f"with PIN) from 64 terminals, 64 connections × 128 in flight:")
        report = wire_load(port, args.settlements, args.cards, data_dir)
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    print(f"\nServer drained and stopped on SIGTERM (exit code {code}).")
    node = Node.open(data_dir)
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
    vreport = verify(data_dir)
    print(f"Verify (核对): OK — {vreport['records']:,} records, hash chain unbroken, money conserved on "
          f"{vreport['business_dates']} business date(s), replay equals the journal, {vreport['checkpoints']} "
          f"checkpoint(s) equal the replay ({time.perf_counter() - t0:.2f} s).")
    ok = report["mac_failures"] == 0 and report.get("ledger", {}).get("ok", False) and code == 0
    return 0 if same and ok and last_seq == vreport["last_seq"] else 1
