#!/usr/bin/env bash
# Wake-ups of each thread of the agent running the NVML collector on 8 simulated GPUs
# (tests/nvml-sim/scenarios/h100-sxm-8.toml) at a 5 s interval, per minute: the run count of
# /proc/PID/task/TID/schedstat (its third field, the times the thread was put on a CPU) over
# WINDOW seconds, summed by thread name. Prints a Markdown table.
#
#   cargo build --release -p metricsd -p metricsd-collector-nvml -p metricsd-sink-prometheus -p nvml-sim
#   bash scripts/nvml-wakeups.sh [BUILD_DIR]    # default target/release; WINDOW=60
set -euo pipefail
cd "$(dirname "$0")/.."

build=${1:-target/release}
WINDOW=${WINDOW:-60}
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
interval = "5s"
plugin_path = ["$work/plugins"]
[http]
metrics_listen = "127.0.0.1:19680"
health_listen = "127.0.0.1:19681"
[[collectors]]
name = "gpu"
plugin = "nvml"
[collectors.config]
library_path = "$work/plugins/libnvml_sim.so"
[[sinks]]
name = "prometheus"
plugin = "prometheus"
TOML

NVML_SIM_SCENARIO="$PWD/tests/nvml-sim/scenarios/h100-sxm-8.toml" \
    "$build/metricsd" -c "$work/agent.toml" run > "$work/agent.log" 2>&1 &
pid=$!
for _ in $(seq 100); do
    curl -sf -o /dev/null http://127.0.0.1:19680/metrics && break
    sleep 0.1
done
sleep 6 # the first collection and the threads it starts

# name → run count, summed over the threads of that name.
runs() {
    for task in /proc/"$pid"/task/*; do
        printf '%s\t%s\n' "$(cat "$task/comm")" "$(awk '{print $3}' "$task/schedstat")"
    done | awk -F'\t' '{n[$1] += $2} END {for (k in n) print k "\t" n[k]}' | sort
}
runs > "$work/before"
sleep "$WINDOW"
runs > "$work/after"

echo "| thread | wake-ups per minute |"
echo "|---|---|"
join -t $'\t' "$work/before" "$work/after" |
    awk -F'\t' -v w="$WINDOW" '{printf "| %s | %.0f |\n", $1, ($3 - $2) * 60 / w}'
