#!/bin/sh
# The figures of bench/README-baseline.md: a fresh database per run, one server, one load run.
# usage: bench/baseline/figures.sh DIR MODE CONNECTIONS PIPELINE [DURATION_S]
#   DIR: where the sqlite file goes (its file system decides the fsync cost); MODE: delete | wal
set -eu
dir=$1; mode=$2; connections=$3; pipeline=$4; duration_s=${5:-10}
py=${PYTHON:-.venv/bin/python}
db="$dir/baseline-$mode.db"; out="$dir/baseline-$mode.out"
rm -f "$db" "$db-wal" "$db-shm" "$db-journal"
flag=""; [ "$mode" = wal ] && flag="--wal"
$py -m bench.baseline.server --port 0 --db "$db" $flag --cards 100000 >"$out" 2>&1 &
server_pid=$!
trap 'kill $server_pid 2>/dev/null; rm -f "$db" "$db-wal" "$db-shm" "$db-journal" "$out"' EXIT
until grep -qs listening "$out"; do sleep 0.2; done
port=$(sed -n 's/.*:\([0-9]*\)$/\1/p' "$out")
echo "== $mode, db in $dir, $connections connections x $pipeline in flight"
$py -m bench.baseline.loadgen --port "$port" --connections "$connections" \
    --pipeline "$pipeline" --duration-s "$duration_s" --seed 1
