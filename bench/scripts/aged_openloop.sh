#!/bin/bash
# The aged-ledger open loops of bench/README.md: a fresh 100,000-card demo node, an open loop of
# N messages at 150,000/s, then AGE messages closed loop (the journal grows to ~5 GB), then two
# more open loops; client latency per phase and the server's own histograms over each phase.
# Server and writer on core 0, load on core 1. ~2-3 minutes, ~6 GB of disk (removed at the end).
#   bench/scripts/aged_openloop.sh PORT              checkpoints every CKPT records (default 1,000,000)
#   CKPT=$((1<<40)) bench/scripts/aged_openloop.sh PORT   no checkpoints
# Environment: N (3,000,000), AGE (10,000,000), CKPT, RATE (150000).
set -e
cd "$(dirname "$0")/../.."
PORT=${1:?port}; METRICS=$((PORT + 1000)); N=${N:-3000000}; RATE=${RATE:-150000}
D=$(mktemp -d /tmp/aged-XXXX); rmdir "$D"
LOG=${LOG:-$D.server.log}
.venv/bin/python -c "from yikatong.nodes import init_demo_node; init_demo_node('$D', 100000, checkpoint_every_records=${CKPT:-1000000}).close()" 2>/dev/null
taskset -c 0 .venv/bin/yikatong serve --data "$D" --port "$PORT" --metrics-port "$METRICS" > "$LOG" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; rm -rf "$D"' EXIT
for i in $(seq 1 150); do grep -q "listening on" "$LOG" && break; sleep 0.2; done
phase() {
    .venv/bin/python bench/scripts/metrics_diff.py save "$METRICS" "$D.h.json"
    taskset -c 1 .venv/bin/yikatong load --port "$PORT" --count "$N" --rate "$RATE" --connections 64 --pipeline 256 2>&1 \
        | grep -E "latency" | sed "s/^/$1 client: /"
    .venv/bin/python bench/scripts/metrics_diff.py diff "$METRICS" "$D.h.json"
}
phase fresh
taskset -c 1 .venv/bin/yikatong load --port "$PORT" --count "${AGE:-10000000}" --connections 64 --pipeline 128 2>&1 \
    | grep -E "accepted" | sed 's/^/closed: /'
echo "journal $(du -sh "$D" | cut -f1)"; sleep 3
phase aged1
phase aged2
grep -o "checkpoint at sequence [0-9]*.*written in [0-9.]* s" "$LOG" | sed "s/(batch.*npz//" | tail -12
rm -f "$D.h.json"
