#!/usr/bin/env bash
# metricsd (NVML collector with its default config, Prometheus sink) and a seed-style Python
# agent (scripts/python-gpu-agent.py: nvidia-ml-py + prometheus_client) side by side in one
# run, on the same 8 simulated GPUs (tests/nvml-sim/scenarios/h100-sxm-8.toml), each
# collecting every INTERVAL (default 5s) and scraped once per INTERVAL. Reports each one's CPU
# per collection (every thread's run time from /proc/PID/task/*/schedstat over WINDOW seconds,
# divided by the collections), per GPU, its series and RSS. CALL_COSTS=h200-busy gives both the
# H200's measured NVML call costs (the simulator's `call_costs`). Prints Markdown.
#
#   cargo build --release -p metricsd -p metricsd-collector-nvml -p metricsd-sink-prometheus -p nvml-sim
#   python3 -m pip install nvidia-ml-py==13.615.71 prometheus_client==0.21.1
#   bash scripts/nvml-side-by-side.sh [BUILD_DIR]   # default target/release; WINDOW=60 INTERVAL=5s
set -euo pipefail
cd "$(dirname "$0")/.."

build=${1:-target/release}
WINDOW=${WINDOW:-60}
INTERVAL=${INTERVAL:-5s}
CALL_COSTS=${CALL_COSTS:-}
for f in metricsd libmetricsd_nvml.so libmetricsd_prometheus.so libnvml_sim.so; do
    [ -f "$build/$f" ] || { echo "$build/$f missing (see the header of this script)" >&2; exit 1; }
done
python3 -c 'import pynvml, prometheus_client' || {
    echo "python3 needs nvidia-ml-py and prometheus_client (see the header of this script)" >&2
    exit 1
}
seconds=$(awk -v i="$INTERVAL" 'BEGIN { n = i + 0; if (i ~ /ms$/) n /= 1000; print n }')

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work/plugins" "$work/lib"
cp "$build"/libmetricsd_{nvml,prometheus}.so "$build/libnvml_sim.so" "$work/plugins/"
ln -s "$work/plugins/libnvml_sim.so" "$work/lib/libnvidia-ml.so.1"
chmod 755 "$work" "$work/plugins"
cat > "$work/agent.toml" <<TOML
[agent]
interval = "$INTERVAL"
plugin_path = ["$work/plugins"]
[http]
metrics_listen = "127.0.0.1:19690"
health_listen = "127.0.0.1:19691"
[[collectors]]
name = "gpu"
plugin = "nvml"
[collectors.config]
library_path = "$work/plugins/libnvml_sim.so"
[[sinks]]
name = "prometheus"
plugin = "prometheus"
TOML
scenario="$PWD/tests/nvml-sim/scenarios/h100-sxm-8.toml"
if [ -n "$CALL_COSTS" ]; then
    { echo "call_costs = \"$CALL_COSTS\""; cat "$scenario"; } > "$work/scenario.toml"
    scenario="$work/scenario.toml"
fi
export NVML_SIM_SCENARIO="$scenario"
"$build/metricsd" -c "$work/agent.toml" run > "$work/metricsd.log" 2>&1 &
pids+=($!)
LD_LIBRARY_PATH="$work/lib" python3 scripts/python-gpu-agent.py 19692 "$seconds" > "$work/python.log" 2>&1 &
pids+=($!)
for url in http://127.0.0.1:19690/metrics http://127.0.0.1:19692/metrics; do
    for _ in $(seq 100); do curl -sf -o /dev/null "$url" && break; sleep 0.1; done
done
# The first collections; WARMUP=60 at 5 s waits until the scenario's process that ends at 3 s
# has left every GPU's processes reading (see scripts/nvml-wakeups.sh).
sleep "${WARMUP:-$((${seconds%.*} + 2))}"

cpu_ns() { cat /proc/"$1"/task/*/schedstat | awk '{n += $1} END {print n}'; }
c0=(); for p in "${pids[@]}"; do c0+=("$(cpu_ns "$p")"); done
scrapes=$(awk -v w="$WINDOW" -v s="$seconds" 'BEGIN {print int(w / s)}')
for _ in $(seq "$scrapes"); do
    curl -sf -o "$work/metricsd.prom" http://127.0.0.1:19690/metrics
    curl -sf -o "$work/python.prom" http://127.0.0.1:19692/metrics
    sleep "$seconds"
done
c1=(); for p in "${pids[@]}"; do c1+=("$(cpu_ns "$p")"); done
collections=$scrapes

echo "8 simulated GPUs, every $INTERVAL for ${WINDOW} s${CALL_COSTS:+, call costs $CALL_COSTS}"
echo
echo "| agent | series | CPU per collection | per GPU | RSS |"
echo "|---|---|---|---|---|"
names=("metricsd (nvml default config + prometheus)" "Python (nvidia-ml-py + prometheus_client)")
files=(metricsd python)
for i in 0 1; do
    series=$(grep -cv '^#' "$work/${files[$i]}.prom")
    rss=$(awk '/VmRSS/ {printf "%.1f MiB", $2 / 1024}' /proc/"${pids[$i]}"/status)
    awk -v a="${c0[$i]}" -v b="${c1[$i]}" -v n="$collections" -v name="${names[$i]}" -v s="$series" -v r="$rss" \
        'BEGIN {c = (b - a) / n / 1e6; printf "| %s | %d | %.2f ms | %.2f ms | %s |\n", name, s, c, c / 8, r}'
done
