#!/usr/bin/env bash
# Side-by-side scrape benchmark and idle cost of metricsd, prometheus-node-exporter and
# collectd (write_prometheus), all on loopback. Prints Markdown tables for docs/BENCHMARKS.md.
#
#   apt-get install prometheus-node-exporter collectd-core libmicrohttpd12 libprotobuf-c1 wrk \
#       nginx-light
#   cargo build --workspace --release
#   bash scripts/bench-scrape.sh    # IDLE_SECONDS=120 WRK_SECONDS=10 ROUNDS=3 by default
#
# At 10,000 and 100,000 series, metricsd's one-connection latency is also measured in ROUNDS
# rounds that take turns with a gzip scrape (what Prometheus asks for) and with nginx serving
# the same body from a file: the latency this machine gives any server for that many bytes.
#
# BUILD_DIR=/some/other/target/release runs another build's metricsd and plugins (the
# baseline of a before/after comparison on the same machine).
set -euo pipefail
cd "$(dirname "$0")/.."

IDLE_SECONDS=${IDLE_SECONDS:-120}
WRK_SECONDS=${WRK_SECONDS:-10}
ROUNDS=${ROUNDS:-3}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

for tool in wrk prometheus-node-exporter collectd nginx; do
    command -v "$tool" >/dev/null || { echo "missing $tool (see the header of this script)" >&2; exit 1; }
done
build=${BUILD_DIR:-target/release}
[ -x "$build/metricsd" ] || { echo "build first: cargo build --workspace --release" >&2; exit 1; }

# Installed as an operator would: the binary alone, and only the plugins the configs use (the
# synthetic collector is the test-only testkit plugin).
mkdir -p "$work/bin" "$work/plugins"
cp "$build/metricsd" "$work/bin/"
cp "$build"/libmetricsd_{system,prometheus,testkit}.so "$work/plugins/"
chmod 755 "$work" "$work/bin" "$work/plugins"
metricsd="$work/bin/metricsd"

source scripts/scrape-bench-lib.sh

metricsd_config() { # $1 port base, $2 synthetic series; prints the config's path
    metricsd_toml "$work/plugins" "$1" "$2" > "$work/metricsd-$1.toml"
    echo "$work/metricsd-$1.toml"
}

started=0
start() { # name, command...; sets $started to the pid
    local name=$1; shift
    "$@" > "$work/$name.log" 2>&1 &
    started=$!
    pids+=("$started")
}

wait_http() { for _ in $(seq 100); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "no answer from $1" >&2; cat "$work"/*.log >&2; return 1; }

collectd_conf 19103 > "$work/collectd.conf"

# The machine's own latency floor, before anything runs (scripts/cpu-stalls.py).
python3 scripts/cpu-stalls.py 5
echo

start metricsd "$metricsd" -c "$(metricsd_config 19080 0)" run; m_pid=$started
start node-exporter prometheus-node-exporter --web.listen-address=127.0.0.1:19100; n_pid=$started
start collectd collectd -f -C "$work/collectd.conf"; c_pid=$started
wait_http http://127.0.0.1:19080/metrics
wait_http http://127.0.0.1:19100/metrics
wait_http http://127.0.0.1:19103/metrics
sleep 3
for p in "$m_pid" "$n_pid" "$c_pid"; do
    kill -0 "$p" 2>/dev/null || { echo "process $p exited (port in use?)" >&2; cat "$work"/*.log >&2; exit 1; }
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hz=$(getconf CLK_TCK)

echo "## Idle cost at a 1 s collection interval (${IDLE_SECONDS} s, no scrapes)"
echo
echo "| agent | series exposed | CPU per collection cycle | CPU per hour | RSS |"
echo "|---|---|---|---|---|"
declare -A start_ticks
for pair in "metricsd:$m_pid" "node_exporter:$n_pid" "collectd:$c_pid"; do
    start_ticks[${pair%%:*}]=$(cpu_ticks "${pair##*:}")
done
sleep "$IDLE_SECONDS"
for pair in "metricsd:$m_pid:19080" "node_exporter:$n_pid:19100" "collectd:$c_pid:19103"; do
    IFS=: read -r name pid port <<< "$pair"
    ticks=$(( $(cpu_ticks "$pid") - ${start_ticks[$name]} ))
    series=$(curl -s "http://127.0.0.1:$port/metrics" | grep -vc '^#')
    awk -v n="$name" -v s="$series" -v t="$ticks" -v hz="$hz" -v secs="$IDLE_SECONDS" -v rss="$(rss_kib "$pid")" 'BEGIN {
        cpu = t / hz;
        note = (n == "node_exporter") ? "(collects on scrape: none here)" : sprintf("%.2f ms", cpu / secs * 1000);
        printf "| %s | %d | %s | %.1f s | %.1f MiB |\n", n, s, note, cpu / secs * 3600, rss / 1024 }'
done
echo
echo "node_exporter collects when scraped, so its idle CPU is not a collection cost; its cost per"
echo "scrape is in the latency table below."
echo
echo "## Where the idle RSS is (scripts/rss-breakdown.py)"
echo
python3 scripts/rss-breakdown.py "$m_pid" "$c_pid"

wrk_row() { # label url connections
    local p50 p99 rps
    read -r p50 p99 rps <<< "$(wrk_stats "$3" "$2")"
    echo "| $1 | $3 | $p50 | $p99 | $rps |"
}

echo "## Scrape latency (wrk, ${WRK_SECONDS} s each)"
echo
echo "| target | connections | p50 | p99 | requests/s |"
echo "|---|---|---|---|---|"
for c in 1 64; do
    wrk_row "metricsd, default set" http://127.0.0.1:19080/metrics "$c"
    wrk_row "node_exporter, default collectors" http://127.0.0.1:19100/metrics "$c"
    wrk_row "collectd write_prometheus" http://127.0.0.1:19103/metrics "$c"
done

# nginx serves whatever body is in $work/www/metrics: the floor rows below.
mkdir -p "$work/www" "$work/nginx"
chmod 755 "$work/www"
cat > "$work/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path $work/nginx;
    server {
        listen 127.0.0.1:19300;
        root $work/www;
        location = /metrics { default_type "text/plain; version=0.0.4"; }
    }
}
EOF
start nginx nginx -e "$work/nginx/error.log" -p "$work/nginx" -c "$work/nginx/nginx.conf"
declare -A floor_rows
for n in 10000 100000; do
    port=$((19200 + n / 10000))
    kill "$m_pid" 2>/dev/null || true
    cfg=$(metricsd_config "$port" "$n")
    start "metricsd-$n" "$metricsd" -c "$cfg" run; m_pid=$started
    wait_http "http://127.0.0.1:$port/metrics"
    wait_series "$port" "$n" || echo "fewer than $n series on :$port" >&2
    for c in 1 64; do
        wrk_row "metricsd, $n synthetic series" "http://127.0.0.1:$port/metrics" "$c"
    done
    curl -sf "http://127.0.0.1:$port/metrics" > "$work/www/metrics"
    chmod 644 "$work/www/metrics"
    wait_http http://127.0.0.1:19300/metrics
    bytes=$(stat -c %s "$work/www/metrics")
    gz_bytes=$(curl -sf -H 'Accept-Encoding: gzip' "http://127.0.0.1:$port/metrics" | wc -c)
    declare -A p50s=() p99s=()
    for _ in $(seq "$ROUNDS"); do
        for target in plain gzip nginx; do
            case $target in
                plain) stats=$(wrk_stats 1 "http://127.0.0.1:$port/metrics") ;;
                gzip) stats=$(wrk_stats 1 "http://127.0.0.1:$port/metrics" -H 'Accept-Encoding: gzip') ;;
                nginx) stats=$(wrk_stats 1 http://127.0.0.1:19300/metrics) ;;
            esac
            read -r p50 p99 _ <<< "$stats"
            p50s[$target]+="$(to_us "$p50") "
            p99s[$target]+="$(to_us "$p99") "
        done
    done
    for target in plain gzip nginx; do
        case $target in
            plain) label="metricsd, $n series ($bytes bytes)" ;;
            gzip) label="metricsd, $n series, gzip ($gz_bytes bytes)" ;;
            nginx) label="nginx, the same $bytes bytes from a file" ;;
        esac
        each=$(for v in ${p99s[$target]}; do median_us "$v"; echo; done | paste -sd, | sed 's/,/, /g')
        # shellcheck disable=SC2086 # the value lists are meant to be split into words
        floor_rows[$n-$target]="| $label | $(median_us ${p50s[$target]}) | $(median_us ${p99s[$target]}) | $each |"
    done
done

echo
echo "## One connection at 10,000 and 100,000 series, against the machine's floor"
echo
echo "$ROUNDS rounds of $WRK_SECONDS s; in each round metricsd (plain), metricsd with gzip and"
echo "nginx (the same body from a file) take turns."
echo
echo "| target | p50 (median) | p99 (median) | p99 in each round |"
echo "|---|---|---|---|"
for n in 10000 100000; do
    for target in plain gzip nginx; do echo "${floor_rows[$n-$target]}"; done
done
