"""The server's own histograms over one phase of a run: `save PORT FILE` scrapes the metrics
endpoint (`yikatong serve --metrics-port PORT`) before the phase, `diff PORT FILE` after it and
prints each histogram's count, mean and bucket bounds of p50 / p90 / p99 for the phase alone.
Used by aged_openloop.sh (bench/README.md, the aged-ledger tables); `histograms` and `at_most`
also by bench_server.py."""
import json
import re
import sys
import urllib.request

LINE = re.compile(r'(yikatong_\w+)_(bucket|sum|count)(?:\{le="([^"]+)"\})? ([0-9.e+]+)$')


def histograms(port: int) -> dict:
    """{name: {"buckets": {upper bound ms: cumulative count}, "sum": …, "count": …}} of every
    yikatong histogram the server exports."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    found = {}
    for line in text.splitlines():
        m = LINE.match(line)
        if m is None:
            continue
        h = found.setdefault(m.group(1), {"buckets": {}, "sum": 0.0, "count": 0.0})
        if m.group(2) == "bucket" and m.group(3) is not None:
            h["buckets"][float("inf") if m.group(3) == "+Inf" else float(m.group(3))] = float(m.group(4))
        elif m.group(2) != "bucket":
            h[m.group(2)] = float(m.group(4))
    return {name: h for name, h in found.items() if h["buckets"]}


def at_most(buckets: dict, count: float, fraction: float) -> float:
    """The smallest bucket bound holding `fraction` of `count` (cumulative buckets)."""
    return next((le for le in sorted(buckets) if buckets[le] >= fraction * count), float("inf"))


def main(argv):
    command, port, path = argv[1], int(argv[2]), argv[3]
    if command == "save":
        json.dump({name: {**h, "buckets": {str(le): n for le, n in h["buckets"].items()}}
                   for name, h in histograms(port).items()}, open(path, "w"))
        return
    before = json.load(open(path))
    for name, h in histograms(port).items():
        b = before.get(name, {"buckets": {}, "sum": 0.0, "count": 0.0})
        buckets = {le: n - b["buckets"].get(str(le), 0.0) for le, n in h["buckets"].items()}
        count, total = h["count"] - b["count"], h["sum"] - b["sum"]
        print(f"  {name}: n={count:.0f} mean={total / max(count, 1):.3f} p50<={at_most(buckets, count, .5)} "
              f"p90<={at_most(buckets, count, .9)} p99<={at_most(buckets, count, .99)}")


if __name__ == "__main__":
    main(sys.argv)
