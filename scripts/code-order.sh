#!/usr/bin/env bash
# Rewrites build-support/code-order.txt, the functions the agent runs, for lld to lay them out
# side by side (see build-support/src/lib.rs). Run it after a toolchain or dependency update:
# the file names functions by mangled symbols, whose hashes change with both.
#
#   bash scripts/code-order.sh        # needs valgrind; about 5 minutes on 2 cores
#
# It builds the workspace in release (the README's build command), runs the agent under
# callgrind for SECONDS_RUN (default 40) with the system collector, the NVML collector on the
# simulator (2 GPUs) and the Prometheus sink at a 1 s interval, scraped each second (text,
# OpenMetrics with gzip, the health and stats pages), stops it with SIGTERM, writes the file,
# relinks, and prints how many of the file's functions each object has.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_RUN=${SECONDS_RUN:-40}
port=${PORT:-19380}
command -v valgrind >/dev/null || { echo "valgrind is needed: apt-get install valgrind" >&2; exit 1; }
# The README's build: symbol hashes depend on the features cargo unifies over the packages it
# builds, so a build of fewer packages would name some functions differently.
cargo build --workspace --release

work=$(mktemp -d)
pid=""
trap '[ -z "$pid" ] || kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
sed "s/^count = 8$/count = 2/" tests/nvml-sim/scenarios/h100-sxm-8.toml > "$work/scenario.toml"
cat > "$work/metricsd.toml" <<CONF
[agent]
interval = "1s"
plugin_path = ["$PWD/target/release"]
[http]
metrics_listen = "127.0.0.1:$port"
health_listen = "127.0.0.1:$((port + 1))"
[[collectors]]
name = "system"
plugin = "system"
[[collectors]]
name = "gpu"
plugin = "nvml"
[collectors.config]
library_path = "$PWD/target/release/libnvml_sim.so"
[[sinks]]
name = "prometheus"
plugin = "prometheus"
CONF
NVML_SIM_SCENARIO="$work/scenario.toml" valgrind --tool=callgrind --dump-instr=yes \
    --callgrind-out-file="$work/callgrind.out" target/release/metricsd -c "$work/metricsd.toml" \
    run 2> "$work/log" &
pid=$!
for _ in $(seq "$SECONDS_RUN"); do
    sleep 1
    curl -s -o /dev/null "http://127.0.0.1:$port/metrics" || true
    curl -s -o /dev/null --compressed -H 'Accept: application/openmetrics-text' \
        "http://127.0.0.1:$port/metrics" || true
done
for page in health metrics/stats; do
    curl -sf -o /dev/null "http://127.0.0.1:$((port + 1))/$page" \
        || { echo "the agent did not answer /$page; its log:" >&2; cat "$work/log" >&2; exit 1; }
done
kill -TERM "$pid"
wait "$pid" || true

objects=(target/release/metricsd target/release/libmetricsd_system.so
    target/release/libmetricsd_nvml.so target/release/libmetricsd_prometheus.so)
python3 scripts/code-order.py "$work/callgrind.out" "${objects[@]}" > "$work/order.txt"
mv "$work/order.txt" build-support/code-order.txt
cargo build --workspace --release
python3 scripts/code-order.py --check build-support/code-order.txt "${objects[@]}"
