#!/usr/bin/env bash
# Before/after comparison of two metricsd builds on the same machine: both run side by side
# with the system collector and SERIES synthetic series, idle CPU is read over IDLE_SECONDS,
# then each is scraped with `wrk -c1` for WRK_SECONDS, alternating, ROUNDS times (a noisy VM
# shifts both alike). Prints one line per round and build.
#
#   bash scripts/ab-scrape.sh /path/to/old/target/release target/release
#   SERIES=10000 ROUNDS=5 WRK_SECONDS=10 IDLE_SECONDS=60 by default
set -euo pipefail
cd "$(dirname "$0")/.."
SERIES=${SERIES:-10000}
ROUNDS=${ROUNDS:-5}
WRK_SECONDS=${WRK_SECONDS:-10}
IDLE_SECONDS=${IDLE_SECONDS:-60}
[ $# -eq 2 ] || { echo "usage: $0 BUILD_A BUILD_B (directories with metricsd and the plugins)" >&2; exit 1; }
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
source scripts/scrape-bench-lib.sh

start() { # label build port
    mkdir -p "$work/$1/plugins"
    cp "$2/metricsd" "$work/$1/"
    cp "$2"/libmetricsd_{system,prometheus,testkit}.so "$work/$1/plugins/"
    chmod -R go-w "$work"
    metricsd_toml "$work/$1/plugins" "$3" "$SERIES" > "$work/$1/metricsd.toml"
    "$work/$1/metricsd" -c "$work/$1/metricsd.toml" run > "$work/$1.log" 2>&1 &
    pids+=("$!")
    wait_series "$3" "$SERIES" && return 0
    echo "$1 did not come up" >&2; cat "$work/$1.log" >&2; exit 1
}
start a "$1" 19400; a_pid=${pids[-1]}
start b "$2" 19410; b_pid=${pids[-1]}
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
a0=$(ticks "$a_pid"); b0=$(ticks "$b_pid")
sleep "$IDLE_SECONDS"
for pair in "a:$a_pid:$a0" "b:$b_pid:$b0"; do
    IFS=: read -r label pid t0 <<< "$pair"
    awk -v l="$label" -v t="$(( $(ticks "$pid") - t0 ))" -v hz="$hz" -v s="$IDLE_SECONDS" \
        -v rss="$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")" \
        'BEGIN { printf "%s idle: %.2f ms CPU per 1 s cycle, RSS %.1f MiB\n", l, t / hz / s * 1000, rss / 1024 }'
done
for round in $(seq "$ROUNDS"); do
    for pair in a:19400 b:19410; do
        read -r p50 p99 rps <<< "$(wrk_stats 1 "http://127.0.0.1:${pair#*:}/metrics")"
        echo "round $round ${pair%%:*}: p50 $p50 p99 $p99 req/s $rps"
    done
done
