#!/usr/bin/env bash
# The agent running the NVML collector on 8 simulated GPUs (tests/nvml-sim/scenarios/
# h100-sxm-8.toml) and the Prometheus sink, at INTERVAL (default 5s): per thread, its wake-ups
# per minute and its CPU per collection, from /proc/PID/task/TID/schedstat (run count, time on
# CPU) over WINDOW seconds, summed by thread name; then the whole agent's CPU per collection and
# per GPU. CALL_COSTS=h200-busy makes each simulated NVML call burn the CPU the H200's driver
# took (the simulator's `call_costs`); NVML_CONFIG adds lines to the collector's config (for
# example 'read_every = { energy = 1, processes = 1, errors = 1, state = 1 }'). Prints Markdown.
#
#   cargo build --release -p metricsd -p metricsd-collector-nvml -p metricsd-sink-prometheus -p nvml-sim
#   bash scripts/nvml-wakeups.sh [BUILD_DIR]    # default target/release; WINDOW=60 INTERVAL=5s
#
# WARMUP (seconds, default 6) is waited before the window: the scenario's second process ends at
# 3 s, and with the processes group read every 10 collections its series end at a later
# collection per GPU, each with a staleness-marker batch; WARMUP=60 at 5 s measures after that.
set -euo pipefail
cd "$(dirname "$0")/.."

build=${1:-target/release}
WINDOW=${WINDOW:-60}
INTERVAL=${INTERVAL:-5s}
CALL_COSTS=${CALL_COSTS:-}
NVML_CONFIG=${NVML_CONFIG:-}
for f in metricsd libmetricsd_nvml.so libmetricsd_prometheus.so libnvml_sim.so; do
    [ -f "$build/$f" ] || { echo "$build/$f missing (see the header of this script)" >&2; exit 1; }
done

work=$(mktemp -d)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work/plugins"
cp "$build"/libmetricsd_{nvml,prometheus}.so "$build/libnvml_sim.so" "$work/plugins/"
chmod 755 "$work" "$work/plugins"
cat > "$work/agent.toml" <<TOML
[agent]
interval = "$INTERVAL"
plugin_path = ["$work/plugins"]
[http]
metrics_listen = "127.0.0.1:19680"
health_listen = "127.0.0.1:19681"
[[collectors]]
name = "gpu"
plugin = "nvml"
[collectors.config]
library_path = "$work/plugins/libnvml_sim.so"
$NVML_CONFIG
[[sinks]]
name = "prometheus"
plugin = "prometheus"
TOML

scenario="$PWD/tests/nvml-sim/scenarios/h100-sxm-8.toml"
if [ -n "$CALL_COSTS" ]; then
    { echo "call_costs = \"$CALL_COSTS\""; cat "$scenario"; } > "$work/scenario.toml"
    scenario="$work/scenario.toml"
fi
NVML_SIM_SCENARIO="$scenario" "$build/metricsd" -c "$work/agent.toml" run > "$work/agent.log" 2>&1 &
pid=$!
for _ in $(seq 100); do
    curl -sf -o /dev/null http://127.0.0.1:19680/metrics && break
    sleep 0.1
done
sleep "${WARMUP:-6}" # the first collection and the threads it starts

# name → run count and ns on CPU, summed over the threads of that name.
runs() {
    for task in /proc/"$pid"/task/*; do
        printf '%s\t%s\n' "$(cat "$task/comm")" "$(awk '{print $3 "\t" $1}' "$task/schedstat")"
    done | awk -F'\t' '{n[$1] += $2; c[$1] += $3} END {for (k in n) print k "\t" n[k] "\t" c[k]}' | sort
}
collections() {
    curl -sf http://127.0.0.1:19681/metrics/stats |
        awk '/^metricsd_collector_collections_total\{collector="gpu"\}/ {print $2}'
}
runs > "$work/before"
c0=$(collections)
sleep "$WINDOW"
runs > "$work/after"
c1=$(collections)
n=$(awk -v a="$c0" -v b="$c1" 'BEGIN {print b - a}')

echo "$n collections in ${WINDOW} s at $INTERVAL${CALL_COSTS:+, call costs $CALL_COSTS}${NVML_CONFIG:+, $NVML_CONFIG}"
echo
echo "| thread | wake-ups per minute | CPU per collection |"
echo "|---|---|---|"
join -t $'\t' "$work/before" "$work/after" |
    awk -F'\t' -v w="$WINDOW" -v n="$n" \
        '{printf "| %s | %.0f | %.2f ms |\n", $1, ($4 - $2) * 60 / w, ($5 - $3) / n / 1e6; t += $5 - $3}
         END {printf "| whole agent | | %.2f ms (%.2f ms per GPU) |\n", t / n / 1e6, t / n / 8e6}'
