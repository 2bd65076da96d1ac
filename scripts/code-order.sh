#!/usr/bin/env bash
# Rewrites build-support/code-order.txt, the functions the agent runs, for lld to lay them out
# side by side, and build-support/data-order/*.ld, the read-only data they read (see
# build-support/src/lib.rs). Run it after a toolchain or dependency update: the files name
# functions and data by mangled symbols and section names, whose hashes change with both.
#
#   bash scripts/code-order.sh        # needs valgrind and perf; about 25 minutes on 2 cores
#
# It builds the workspace in release (the README's build command), runs the agent under
# callgrind for SECONDS_RUN (default 40) with the system collector, the NVML collector on the
# simulator (2 GPUs) and the Prometheus sink at a 1 s interval, scraped each second (text,
# OpenMetrics with gzip, the health and stats pages), stops it with SIGTERM, writes the file,
# relinks, and prints how many of the file's functions each object has. From the code of those
# functions and the tables it addresses, scripts/data-order.py then writes each object's data
# script (--static), and the build relinks with it.
#
# Then, where `perf` is installed, it runs the relinked agent natively (that config, and the
# system collector with the Prometheus sink alone) recording every page fault, appends the
# functions that faulted outside the ordered ones (code valgrind cannot show: CPU-feature
# paths such as SHA-NI, or the blocking pool retiring an idle thread after 10 s) and the
# read-only data that faulted outside the listed sections, relinks, and repeats up to
# NATIVE_ROUNDS (default 3) times. NATIVE_ONLY=1 skips the callgrind profile and only adds to
# the committed function list (a quick refresh, without valgrind, about 12 minutes; after an
# edit of the host's own code this is enough to bring the data scripts up to date).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_RUN=${SECONDS_RUN:-40}
NATIVE_ROUNDS=${NATIVE_ROUNDS:-3}
port=${PORT:-19380}
NATIVE_ONLY=${NATIVE_ONLY:-}
[ -n "$NATIVE_ONLY" ] || command -v valgrind >/dev/null \
    || { echo "valgrind is needed: apt-get install valgrind" >&2; exit 1; }
work=$(mktemp -d)
pid=""
trap '[ -z "$pid" ] || kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
maps="$work/maps"
mkdir -p "$maps"
# The README's build: symbol hashes depend on the features cargo unifies over the packages it
# builds, so a build of fewer packages would name some functions differently. Each link also
# writes its lld map, named after the package (where every input section went, which
# data-order.py reads); the map does not change what is linked.
build() { METRICSD_LINK_MAP="$maps" cargo build --workspace --release; }
build

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
scrape() { # PORT SECONDS: what Prometheus and an operator ask of the agent, once a second
    for _ in $(seq "$2"); do
        sleep 1
        curl -s -o /dev/null "http://127.0.0.1:$1/metrics" || true
        curl -s -o /dev/null --compressed -H 'Accept: application/openmetrics-text' \
            "http://127.0.0.1:$1/metrics" || true
    done
    for page in health metrics/stats; do
        curl -sf -o /dev/null "http://127.0.0.1:$(($1 + 1))/$page" \
            || { echo "the agent did not answer /$page; its log:" >&2; cat "$work/log" >&2; exit 1; }
    done
}
objects=(target/release/metricsd target/release/libmetricsd_system.so
    target/release/libmetricsd_nvml.so target/release/libmetricsd_prometheus.so)
packages=(metricsd metricsd-collector-system metricsd-collector-nvml metricsd-sink-prometheus)
linked=() # OBJECT=MAP, for data-order.py
for i in "${!objects[@]}"; do linked+=("${objects[$i]}=$maps/${packages[$i]}.map"); done
if [ -z "$NATIVE_ONLY" ]; then
    NVML_SIM_SCENARIO="$work/scenario.toml" valgrind --tool=callgrind --dump-instr=yes \
        --callgrind-out-file="$work/callgrind.out" target/release/metricsd -c "$work/metricsd.toml" \
        run 2> "$work/log" &
    pid=$!
    scrape "$port" "$SECONDS_RUN"
    kill -TERM "$pid"
    wait "$pid" || true
    python3 scripts/code-order.py "$work/callgrind.out" "${objects[@]}" > "$work/order.txt"
    mv "$work/order.txt" build-support/code-order.txt
    build
fi
# The data scripts start afresh from the code each time (cheap, and the host crate's own constants
# are renumbered by any edit of it); the native rounds below add what the code does not show.
mkdir -p build-support/data-order
python3 scripts/data-order.py --static build-support/code-order.txt build-support/data-order \
    "${linked[@]}"
build

if ! command -v perf >/dev/null; then
    echo "perf not found (apt-get install linux-perf): code that only runs natively stays unordered" >&2
    NATIVE_ROUNDS=0
fi
source scripts/scrape-bench-lib.sh
metricsd_toml "$PWD/target/release" "$port" 0 > "$work/plain.toml" # system + Prometheus alone
for round in $(seq "$NATIVE_ROUNDS"); do
    : > "$work/faults.txt"
    for config in metricsd plain; do
        # Out of the page cache first, so that each window of code faults on its own.
        sync
        python3 -c 'import os, sys
for f in sys.argv[1:]:
    fd = os.open(f, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)' \
            "${objects[@]}"
        NVML_SIM_SCENARIO="$work/scenario.toml" perf record -q -e page-faults -c 1 -d \
            -o "$work/perf.data" -- target/release/metricsd -c "$work/$config.toml" run \
            2> "$work/log" &
        pid=$!
        sleep 2
        scrape "$port" 10
        sleep 12 # an idle blocking-pool thread retires after 10 s
        pkill -TERM -P "$pid" || true
        wait "$pid" || true
        pid=""
        perf script -i "$work/perf.data" --show-mmap-events -F addr >> "$work/faults.txt" 2>/dev/null
    done
    python3 scripts/code-order.py --faults "$work/faults.txt" build-support/code-order.txt \
        "${objects[@]}" > "$work/new.txt"
    python3 scripts/data-order.py --faults "$work/faults.txt" build-support/data-order \
        "${linked[@]}" > "$work/new-data.txt"
    echo "native round $round: $(wc -l < "$work/new.txt") more functions," \
        "$(wc -l < "$work/new-data.txt") more data sections" >&2
    [ -s "$work/new.txt" ] || [ -s "$work/new-data.txt" ] || break
    cat "$work/new.txt" >> build-support/code-order.txt
    build
done
python3 scripts/code-order.py --check build-support/code-order.txt "${objects[@]}"
python3 scripts/data-order.py --check build-support/data-order "${linked[@]}"
