#!/usr/bin/env bash
# Resident memory of `isolation = "process"`: the agent with the NVML collector (simulator,
# 8 GPUs of h100-sxm-8.toml) and the Prometheus sink, once in-process and once with the
# collector in a child process; RSS and PSS (shared pages counted once per sharer) of the agent
# and of its child after 60 s at a 1 s interval.
#
#   cargo build --release -p metricsd -p metricsd-collector-nvml -p metricsd-sink-prometheus -p nvml-sim
#   bash scripts/isolation-rss.sh
set -euo pipefail
cd "$(dirname "$0")/.."
release=${RELEASE_DIR:-target/release}
work=$(mktemp -d)
trap 'rm -rf "$work"; kill $(jobs -p) 2>/dev/null || true' EXIT
kib() { awk -v k="$2" '$1 == k":" {print $2}' "$1"; }
for mode in in-process process; do
    port=$((20000 + RANDOM % 10000))
    cat > "$work/$mode.toml" <<TOML
[agent]
interval = "1s"
[http]
metrics_listen = "127.0.0.1:$port"
health_listen = ""
[[collectors]]
name = "gpu"
plugin = "nvml"
isolation = "$mode"
[collectors.config]
library_path = "$PWD/$release/libnvml_sim.so"
[[sinks]]
name = "prometheus"
plugin = "prometheus"
TOML
    NVML_SIM_SCENARIO=tests/nvml-sim/scenarios/h100-sxm-8.toml \
        "$release/metricsd" -c "$work/$mode.toml" run 2> "$work/$mode.log" &
    pid=$!
    sleep "${SECONDS_RUN:-60}"
    curl -sf "http://127.0.0.1:$port/metrics" | grep -c '^gpu_up{' > "$work/gpus" || true
    child=$(cat /proc/$pid/task/*/children | tr ' ' '\n' | grep -m1 . || true)
    line="$mode: agent RSS $(kib /proc/$pid/status VmRSS) KiB, PSS $(kib /proc/$pid/smaps_rollup Pss) KiB"
    if [ -n "$child" ]; then
        line="$line; child RSS $(kib /proc/$child/status VmRSS) KiB, PSS $(kib /proc/$child/smaps_rollup Pss) KiB"
    fi
    echo "$line; GPUs served: $(cat "$work/gpus")"
    kill "$pid"; wait "$pid" || true
done
