#!/usr/bin/env bash
# The README's test command: installs the real servers the tests talk to (Debian packages), then
# runs every test of the workspace and prints one total.
set -euo pipefail
cd "$(dirname "$0")/.."

# The real servers the tests talk to: prometheus (the server and promtool), influxdb (InfluxDB
# 1.x, influxd), victoria-metrics and prometheus-node-exporter. A missing one fails the tests
# that need it (they never skip), so install them here.
missing=()
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v influxd >/dev/null 2>&1 || missing+=(influxdb)
command -v victoria-metrics >/dev/null 2>&1 || missing+=(victoria-metrics)
# node_exporter, which the system collector is compared against.
command -v prometheus-node-exporter >/dev/null 2>&1 || missing+=(prometheus-node-exporter)
# pip, for nvidia-ml-py below.
python3 -c "import pynvml" >/dev/null 2>&1 || python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
if [ "${#missing[@]}" -gt 0 ]; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update
    $sudo apt-get install -y --no-install-recommends "${missing[@]}"
fi

# nvidia-ml-py (PyPI), the NVML client the NVML simulator is checked against as other clients
# would use it (tests/e2e/tests/nvml.rs).
NVIDIA_ML_PY_VERSION=13.615.71
if ! python3 -c "import pynvml" >/dev/null 2>&1; then
    python3 -m pip install --quiet "nvidia-ml-py==$NVIDIA_ML_PY_VERSION" \
        || python3 -m pip install --quiet --break-system-packages "nvidia-ml-py==$NVIDIA_ML_PY_VERSION"
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
totals=$(awk '/^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
              END { printf "%d passed, %d failed", p, f }' "$log")
echo "tests: $totals"
exit "$status"
