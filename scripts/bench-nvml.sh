#!/usr/bin/env bash
# NVML collection cost against the simulator at 1, 8 and 64 GPUs, with and without per-process
# metrics. Prints criterion's lines.
#   cargo build --release -p nvml-sim && bash scripts/bench-nvml.sh
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for gpus in 1 8 64; do
    sed "s/^count = 8$/count = $gpus/" tests/nvml-sim/scenarios/h100-sxm-8.toml > "$work/s$gpus.toml"
    for processes in 1 0; do
        NVML_SIM_SCENARIO="$work/s$gpus.toml" NVML_BENCH_PROCESSES=$processes \
            cargo bench -q -p metricsd-collector-nvml --bench collect 2>/dev/null | grep -E "^nvml_collect|time:"
    done
done
