#!/usr/bin/env bash
# End-to-end points per second from metricsd into a local InfluxDB 1.x, and who spends the CPU.
#
#   apt-get install influxdb
#   cargo build --workspace --release
#   SERIES=20000 INTERVAL=250ms SECONDS_TOTAL=30 LAYOUT=per_metric bash scripts/bench-influx.sh
#
# metricsd runs the test-only testkit collector emitting SERIES samples every INTERVAL into the
# InfluxDB sink; the script measures the samples the sink wrote (metricsd_sink_samples_written_total),
# and the CPU time (utime + stime) of metricsd and of influxd over SECONDS_TOTAL.
set -euo pipefail
cd "$(dirname "$0")/.."
SERIES=${SERIES:-20000}
INTERVAL=${INTERVAL:-250ms}
SECONDS_TOTAL=${SECONDS_TOTAL:-30}
LAYOUT=${LAYOUT:-per_metric}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; sleep 1; rm -rf "$work"' EXIT
mkdir -p "$work/bin" "$work/plugins" "$work/influx"
cp target/release/metricsd "$work/bin/"
cp target/release/libmetricsd_{influxdb,testkit}.so "$work/plugins/"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http=$(free_port); rpc=$(free_port); health=$(free_port)
cat > "$work/influx/influxdb.conf" <<CONF
reporting-disabled = true
bind-address = "127.0.0.1:$rpc"
[meta]
  dir = "$work/influx/meta"
[data]
  dir = "$work/influx/data"
  wal-dir = "$work/influx/wal"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.1:$http"
  log-enabled = false
[monitor]
  store-enabled = false
CONF
influxd run -config "$work/influx/influxdb.conf" >"$work/influx/log" 2>&1 &
influx_pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$http/ping" >/dev/null && break; sleep 0.1; done
cat > "$work/metricsd.toml" <<CONF
[agent]
plugin_path = ["$work/plugins"]
interval = "$INTERVAL"
queue_capacity = 10000000
internal_metrics = false
log_level = "warn"
[http]
health_listen = "127.0.0.1:$health"
[[collectors]]
name = "tk"
plugin = "testkit"
[collectors.config]
series = $SERIES
[[sinks]]
name = "influx"
plugin = "influxdb"
[sinks.config]
url = "http://127.0.0.1:$http"
database = "bench"
create_database = true
layout = "$LAYOUT"
CONF
"$work/bin/metricsd" -c "$work/metricsd.toml" run >"$work/metricsd.log" 2>&1 &
agent_pid=$!
written() {
    curl -s "http://127.0.0.1:$health/metrics/stats" |
        awk '/^metricsd_sink_samples_written_total\{sink="influx"\}/ {print $2}'
}
for _ in $(seq 100); do [ -n "$(written)" ] && break; sleep 0.1; done
sleep 3 # warm-up: the database exists and the first writes are done
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
w0=$(written); a0=$(cpu_ticks $agent_pid); i0=$(cpu_ticks $influx_pid); t0=$(date +%s.%N)
sleep "$SECONDS_TOTAL"
w1=$(written); a1=$(cpu_ticks $agent_pid); i1=$(cpu_ticks $influx_pid); t1=$(date +%s.%N)
queued=$(curl -s "http://127.0.0.1:$health/metrics/stats" | awk '/^metricsd_sink_queue_samples\{sink="influx"\}/ {print $2}')
python3 - "$w0" "$w1" "$a0" "$a1" "$i0" "$i1" "$t0" "$t1" "$hz" "$queued" <<'PY'
import sys
w0, w1, a0, a1, i0, i1, t0, t1, hz, queued = map(float, sys.argv[1:])
secs = t1 - t0
rate = (w1 - w0) / secs
agent = (a1 - a0) / hz
influx = (i1 - i0) / hz
print(f"samples written: {w1 - w0:.0f} in {secs:.1f} s = {rate:,.0f} samples/s; queue at the end: {queued:.0f}")
print(f"CPU: metricsd {agent:.2f} s ({agent / secs * 100:.0f}% of a core), influxd {influx:.2f} s ({influx / secs * 100:.0f}% of a core)")
if w1 > w0:
    print(f"CPU per million samples: metricsd {agent / (w1 - w0) * 1e6:.2f} s, influxd {influx / (w1 - w0) * 1e6:.2f} s")
PY
