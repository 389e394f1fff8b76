"""The server's own histograms over one phase of a run: `save PORT FILE` scrapes the metrics
endpoint (`yikatong serve --metrics-port PORT`) before the phase, `diff PORT FILE` after it and
prints each histogram's count, mean and bucket bounds of p50 / p90 / p99 for the phase alone.
Used by aged_openloop.sh (bench/README.md, the aged-ledger tables)."""
import json
import re
import sys
import urllib.request

LINE = re.compile(r'(yikatong_(?:commit_latency_ms|reply_latency_ms|batch_size))_(bucket|sum|count)(\{[^}]*\})? ([0-9.e+]+)')


def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    histograms = {}
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            histograms.setdefault(m.group(1), {})[f"{m.group(2)}|{m.group(3) or ''}"] = float(m.group(4))
    return histograms


def bound(buckets, count, fraction):
    for le, seen in buckets:
        if seen >= fraction * count:
            return le
    return float("inf")


def main(argv):
    command, port, path = argv[1], int(argv[2]), argv[3]
    if command == "save":
        json.dump(scrape(port), open(path, "w"))
        return
    before, after = json.load(open(path)), scrape(port)
    for name, values in after.items():
        d = {k: v - before.get(name, {}).get(k, 0.0) for k, v in values.items()}
        count, total = d.get("count|", 0.0), d.get("sum|", 0.0)
        buckets = sorted((float(re.search(r'le="([^"]+)"', k).group(1).replace("+Inf", "inf")), v)
                         for k, v in d.items() if k.startswith("bucket"))
        print(f"  {name}: n={count:.0f} mean={total / max(count, 1):.3f} p50<={bound(buckets, count, .5)} "
              f"p90<={bound(buckets, count, .9)} p99<={bound(buckets, count, .99)}")


if __name__ == "__main__":
    main(sys.argv)
