#!/usr/bin/env bash
# Builds what scripts/gpu-compare.py runs on a GPU machine: metricsd and the nvml and
# prometheus plugins, release, stripped (a few MiB to copy), in gpu-kit/ (git ignores it).
#
#   bash scripts/gpu-kit.sh && python3 scripts/gpu-compare.py --bin gpu-kit
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p metricsd -p metricsd-collector-nvml -p metricsd-sink-prometheus
rm -rf gpu-kit
mkdir gpu-kit
for f in metricsd libmetricsd_nvml.so libmetricsd_prometheus.so; do
    strip -o "gpu-kit/$f" "target/release/$f"
done
ls -la gpu-kit
