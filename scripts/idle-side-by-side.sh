#!/usr/bin/env bash
# The standing cost of metricsd next to node_exporter and collectd, side by side in one run on
# one machine: resident memory and CPU, every agent collecting at 1 s and scraped every 15 s
# (as Prometheus would). Prints a Markdown table for docs/BENCHMARKS.md.
#
#   apt-get install prometheus-node-exporter collectd-core libmicrohttpd12 libprotobuf-c1 curl
#   cargo build --workspace --release
#   bash scripts/idle-side-by-side.sh [BUILD_DIR]     # default target/release; WINDOW=300 s
#
# metricsd runs twice: system + nvml (the NVML simulator with the 8 GPUs of h100-sxm-8.toml) +
# prometheus, and system + prometheus alone. node_exporter (Debian's, 1.5) runs its default
# collectors and collects when scraped; collectd runs the plugins that match the system
# collector's set with write_prometheus (scrape-bench-lib.sh's collectd_conf). RSS is VmRSS at
# the end of the window, after the last scrape; CPU is user + system time over the window.
set -euo pipefail
cd "$(dirname "$0")/.."

build=${1:-target/release}
WINDOW=${WINDOW:-300}
SCRAPE_EVERY=15
for tool in prometheus-node-exporter collectd curl; do
    command -v "$tool" >/dev/null || { echo "missing $tool (see the header of this script)" >&2; exit 1; }
done
for f in metricsd libmetricsd_system.so libmetricsd_nvml.so libmetricsd_prometheus.so libnvml_sim.so; do
    [ -f "$build/$f" ] || { echo "$build/$f missing: cargo build --workspace --release" >&2; exit 1; }
done
source scripts/scrape-bench-lib.sh

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

# Installed as an operator would: the binary, and only the plugins the configs use.
mkdir -p "$work/bin" "$work/plugins"
cp "$build/metricsd" "$work/bin/"
cp "$build"/libmetricsd_{system,nvml,prometheus}.so "$build/libnvml_sim.so" "$work/plugins/"
chmod 755 "$work" "$work/bin" "$work/plugins"

metricsd_toml "$work/plugins" 19480 0 > "$work/lean.toml"
metricsd_toml "$work/plugins" 19580 0 > "$work/gpu.toml"
printf '[[collectors]]\nname = "gpu"\nplugin = "nvml"\n[collectors.config]\nlibrary_path = "%s"\n' \
    "$work/plugins/libnvml_sim.so" >> "$work/gpu.toml"
collectd_conf 19603 > "$work/collectd.conf"

declare -A pid_of port_of
start() { # name port command...
    local name=$1 port=$2
    shift 2
    "$@" > "$work/$name.log" 2>&1 &
    pids+=($!)
    pid_of[$name]=$!
    port_of[$name]=$port
}
start "metricsd: system + 8 GPUs + prometheus" 19580 \
    env NVML_SIM_SCENARIO="$PWD/tests/nvml-sim/scenarios/h100-sxm-8.toml" "$work/bin/metricsd" -c "$work/gpu.toml" run
start "metricsd: system + prometheus" 19480 "$work/bin/metricsd" -c "$work/lean.toml" run
start "node_exporter $(prometheus-node-exporter --version 2>&1 | awk 'NR == 1 {print $3}')" 19100 \
    prometheus-node-exporter --web.listen-address=127.0.0.1:19100
start "collectd $(collectd -h 2>&1 | awk '/^collectd [0-9]/ {print $2}' | tr -d ,)" 19603 collectd -f -C "$work/collectd.conf"
names=("metricsd: system + 8 GPUs + prometheus" "metricsd: system + prometheus")
for name in "${!pid_of[@]}"; do
    case "$name" in metricsd*) ;; *) names+=("$name") ;; esac
done

scrape_all() {
    for name in "${names[@]}"; do
        curl -sf -o "$work/last-${port_of[$name]}.txt" "http://127.0.0.1:${port_of[$name]}/metrics" || true
    done
}
for _ in $(seq 100); do
    ok=1
    for name in "${names[@]}"; do
        curl -sf -o /dev/null "http://127.0.0.1:${port_of[$name]}/metrics" || ok=""
    done
    [ -n "$ok" ] && break
    sleep 0.1
done
[ -n "$ok" ] || { echo "an agent did not answer" >&2; tail -n 5 "$work"/*.log >&2; exit 1; }
sleep 5

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
declare -A ticks0
for name in "${names[@]}"; do ticks0[$name]=$(cpu_ticks "${pid_of[$name]}"); done
elapsed=0
while [ "$elapsed" -lt "$WINDOW" ]; do
    scrape_all
    sleep "$SCRAPE_EVERY"
    elapsed=$((elapsed + SCRAPE_EVERY))
done
scrape_all
hz=$(getconf CLK_TCK)

echo "| agent | series | RSS | CPU per second (1 s collection, 15 s scrapes) | CPU per hour |"
echo "|---|---|---|---|---|"
for name in "${names[@]}"; do
    pid=${pid_of[$name]}
    kill -0 "$pid" 2>/dev/null || { echo "$name exited" >&2; tail -n 20 "$work/$name.log" >&2; exit 1; }
    ticks=$(( $(cpu_ticks "$pid") - ${ticks0[$name]} ))
    series=$(grep -vc '^#' "$work/last-${port_of[$name]}.txt")
    rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")
    awk -v n="$name" -v s="$series" -v t="$ticks" -v hz="$hz" -v secs="$elapsed" -v rss="$rss" 'BEGIN {
        cpu = t / hz;
        printf "| %s | %d | %.1f MiB | %.2f ms | %.1f s |\n", n, s, rss / 1024, cpu / secs * 1000, cpu / secs * 3600 }'
done
echo
echo "window ${elapsed} s, $(nproc) cores, $(uname -r), $(date -u +%F)"
