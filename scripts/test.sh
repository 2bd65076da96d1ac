#!/usr/bin/env bash
# The README's test command: installs the real servers the tests talk to (Debian packages), then
# runs every test of the workspace and prints one total.
set -euo pipefail
cd "$(dirname "$0")/.."

# prometheus brings the Prometheus server and promtool. A missing tool fails the tests that
# need it (they never skip), so install it here.
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update
    $sudo apt-get install -y --no-install-recommends prometheus
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
totals=$(awk '/^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
              END { printf "%d passed, %d failed", p, f }' "$log")
echo "tests: $totals"
exit "$status"
