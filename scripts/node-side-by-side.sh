#!/usr/bin/env bash
# The system collector against node_exporter and collectd, side by side in one run on one
# machine: CPU per collection with every default source, scrape latency (p50/p99 over one
# keep-alive connection) and RSS. Prints Markdown tables for docs/BENCHMARKS.md.
#
#   apt-get install prometheus-node-exporter collectd-core libmicrohttpd12 libprotobuf-c1 curl
#   cargo build --release -p metricsd -p metricsd-collector-system -p metricsd-sink-prometheus
#   bash scripts/node-side-by-side.sh [BUILD_DIR]    # default target/release; WINDOW=120 s
#
# Every agent does one collection a second for WINDOW seconds: metricsd (system + prometheus,
# the default sources) and collectd (scrape-bench-lib.sh's collectd_conf) on their 1 s
# interval, node_exporter (Debian's 1.5, default collectors) because it is scraped once a
# second, and it collects on each scrape. All three are scraped once a second, so each one's
# CPU covers its collections and the same number of scrapes. CPU per collection is the run
# time of every thread over the window (schedstat) divided by the collections counted
# (metricsd's own counter, node_exporter's scrapes, collectd's interval). Then SCRAPES scrapes of each over one
# keep-alive connection, back to back, give the scrape latency (node_exporter's includes its
# collection). RSS is VmRSS at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

build=${1:-target/release}
WINDOW=${WINDOW:-120}
SCRAPES=${SCRAPES:-300}
for tool in prometheus-node-exporter collectd curl python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool (see the header of this script)" >&2; exit 1; }
done
for f in metricsd libmetricsd_system.so libmetricsd_prometheus.so; do
    [ -f "$build/$f" ] || { echo "$build/$f missing (see the header of this script)" >&2; exit 1; }
done
source scripts/scrape-bench-lib.sh

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

mkdir -p "$work/bin" "$work/plugins"
cp "$build/metricsd" "$work/bin/"
cp "$build"/libmetricsd_{system,prometheus}.so "$work/plugins/"
chmod 755 "$work" "$work/bin" "$work/plugins"
metricsd_toml "$work/plugins" 19680 0 > "$work/metricsd.toml"
collectd_conf 19703 > "$work/collectd.conf"

"$work/bin/metricsd" -c "$work/metricsd.toml" run > "$work/metricsd.log" 2>&1 &
pids+=($!); m_pid=$!
prometheus-node-exporter --web.listen-address=127.0.0.1:19700 > "$work/ne.log" 2>&1 &
pids+=($!); n_pid=$!
collectd -f -C "$work/collectd.conf" > "$work/collectd.log" 2>&1 &
pids+=($!); c_pid=$!
ports=(19680 19700 19703)
for port in "${ports[@]}"; do
    for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/metrics" && break; sleep 0.1; done
done
sleep 3

# CPU time in µs: the run time of every thread (/proc/PID/task/*/schedstat, nanoseconds; exact,
# where utime + stime are sampled at the clock tick).
cpu_us() { cat /proc/"$1"/task/*/schedstat | awk '{ s += $1 } END { printf "%.0f", s / 1000 }'; }
collections() {
    curl -sf "http://127.0.0.1:19681/metrics/stats" |
        awk '/^metricsd_collector_collections_total\{.*collector="system"/ { print $NF }'
}

m0=$(cpu_us $m_pid); n0=$(cpu_us $n_pid); c0=$(cpu_us $c_pid); k0=$(collections)
for _ in $(seq "$WINDOW"); do
    for port in "${ports[@]}"; do curl -sf -o "$work/last-$port.txt" "http://127.0.0.1:$port/metrics" || true; done
    sleep 1
done
m1=$(cpu_us $m_pid); n1=$(cpu_us $n_pid); c1=$(cpu_us $c_pid); k1=$(collections)

series() { grep -vc '^#' "$1"; }
families() { grep -c '^# TYPE' "$1"; }
rss() { awk '/^VmRSS/ { printf "%.1f MiB", $2 / 1024 }' "/proc/$1/status"; }

latency() { # port: "p50 p99" in µs over SCRAPES keep-alive scrapes
    python3 - "$1" "$SCRAPES" <<'PY'
import http.client, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
c = http.client.HTTPConnection("127.0.0.1", port)
times = []
for _ in range(n):
    t = time.perf_counter()
    c.request("GET", "/metrics")
    r = c.getresponse()
    r.read()
    times.append((time.perf_counter() - t) * 1e6)
times.sort()
print(f"{times[len(times) // 2]:.0f} {times[int(len(times) * 0.99)]:.0f}")
PY
}
read -r m50 m99 <<< "$(latency 19680)"
read -r n50 n99 <<< "$(latency 19700)"
read -r c50 c99 <<< "$(latency 19703)"

k=$((k1 - k0))
echo "| agent | families | series | CPU per collection | scrape p50 | scrape p99 | RSS |"
echo "|---|---|---|---|---|---|---|"
awk -v cpu=$((m1 - m0)) -v k="$k" -v f="$(families "$work/last-19680.txt")" -v s="$(series "$work/last-19680.txt")" \
    -v p50="$m50" -v p99="$m99" -v rss="$(rss $m_pid)" \
    'BEGIN { printf "| metricsd: system (default sources) + prometheus | %d | %d | %.2f ms (%d collections) | %d µs | %d µs | %s |\n", f, s, cpu / k / 1000, k, p50, p99, rss }'
awk -v cpu=$((n1 - n0)) -v k="$WINDOW" -v f="$(families "$work/last-19700.txt")" -v s="$(series "$work/last-19700.txt")" \
    -v p50="$n50" -v p99="$n99" -v rss="$(rss $n_pid)" -v v="$(prometheus-node-exporter --version 2>&1 | awk 'NR == 1 {print $3}')" \
    'BEGIN { printf "| node_exporter %s (default collectors) | %d | %d | %.2f ms (%d scrapes) | %d µs | %d µs | %s |\n", v, f, s, cpu / k / 1000, k, p50, p99, rss }'
awk -v cpu=$((c1 - c0)) -v k="$WINDOW" -v f="$(families "$work/last-19703.txt")" -v s="$(series "$work/last-19703.txt")" \
    -v p50="$c50" -v p99="$c99" -v rss="$(rss $c_pid)" \
    'BEGIN { printf "| collectd (cpu, memory, df, disk, interface, load) | %d | %d | %.2f ms (%d intervals) | %d µs | %d µs | %s |\n", f, s, cpu / k / 1000, k, p50, p99, rss }'
