#!/usr/bin/env bash
# RSS and CPU of metricsd with the NVML simulator over a long run at a 1 s interval.
#   cargo build --workspace --release
#   SECONDS_TOTAL=600 GPUS=8 bash scripts/soak-nvml.sh
# BUILD_DIR (default target/release) runs another build's metricsd and plugins; PORT (default
# 19480, health on PORT + 1) lets two runs go side by side; INTERVAL (default 1s) compresses
# time (100ms: ten cycles a second).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TOTAL=${SECONDS_TOTAL:-600}
GPUS=${GPUS:-8}
build=${BUILD_DIR:-target/release}
port=${PORT:-19480}
work=$(mktemp -d)
pid=""
trap '[ -z "$pid" ] || kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/bin" "$work/plugins"
cp "$build/metricsd" "$work/bin/"
cp "$build"/libmetricsd_{nvml,prometheus}.so "$work/plugins/"
chmod 755 "$work" "$work/bin" "$work/plugins"
sed "s/^count = 8$/count = $GPUS/" tests/nvml-sim/scenarios/h100-sxm-8.toml > "$work/scenario.toml"
cat > "$work/metricsd.toml" <<CONF
[agent]
interval = "${INTERVAL:-1s}"
plugin_path = ["$work/plugins"]
[http]
metrics_listen = "127.0.0.1:$port"
health_listen = "127.0.0.1:$((port + 1))"
[[collectors]]
name = "gpu"
plugin = "nvml"
[collectors.config]
library_path = "$(cd "$build" && pwd)/libnvml_sim.so"
[[sinks]]
name = "prometheus"
plugin = "prometheus"
CONF
NVML_SIM_SCENARIO="$work/scenario.toml" "$work/bin/metricsd" -c "$work/metricsd.toml" run 2> "$work/log" &
pid=$!
sleep 5
hz=$(getconf CLK_TCK)
start_ticks=$(awk '{print $14 + $15}' "/proc/$pid/stat")
# RSS split into anonymous memory (heap, stacks: what a leak grows) and mapped files (code: it
# grows as code paths run for the first time, and stays).
echo "| elapsed | RSS | anonymous | files | threads | CPU so far |"
echo "|---|---|---|---|---|---|"
elapsed=0
while [ "$elapsed" -lt "$SECONDS_TOTAL" ]; do
    step=$(( SECONDS_TOTAL / 10 )); sleep "$step"; elapsed=$((elapsed + step))
    read -r rss anon file threads < <(awk '/^VmRSS/ {r = $2} /^RssAnon/ {a = $2}
        /^RssFile/ {f = $2} /^Threads/ {t = $2} END {print r, a, f, t}' "/proc/$pid/status")
    ticks=$(( $(awk '{print $14 + $15}' "/proc/$pid/stat") - start_ticks ))
    awk -v e="$elapsed" -v r="$rss" -v a="$anon" -v f="$file" -v n="$threads" -v t="$ticks" \
        -v hz="$hz" 'BEGIN { printf "| %d s | %.1f MiB | %.2f MiB | %.2f MiB | %d | %.2f s |\n",
        e, r / 1024, a / 1024, f / 1024, n, t / hz }'
done
cycles=$(curl -s "http://127.0.0.1:$((port + 1))/metrics/stats" | awk '/^metricsd_collector_collections_total\{collector="gpu"\}/ {print $2}')
awk -v t="$ticks" -v hz="$hz" -v c="$cycles" -v g="$GPUS" 'BEGIN { printf "\n%d collections of %d GPUs: %.2f ms of agent CPU per cycle (everything: NVML calls, pipeline, Prometheus sink)\n", c, g, t / hz / c * 1000 }'
