# Shared by bench-scrape.sh and ab-scrape.sh (sourced, not run).

# metricsd_toml PLUGIN_DIR PORT SERIES: a metricsd config at a 1 s interval with the system
# collector, SERIES synthetic series from the testkit collector (none when 0) and the Prometheus
# sink on 127.0.0.1:PORT (health on PORT + 1).
metricsd_toml() {
    cat <<TOML
[agent]
interval = "1s"
plugin_path = ["$1"]
[http]
metrics_listen = "127.0.0.1:$2"
health_listen = "127.0.0.1:$(($2 + 1))"
[[collectors]]
name = "system"
plugin = "system"
[[sinks]]
name = "prometheus"
plugin = "prometheus"
TOML
    if [ "$3" -gt 0 ]; then
        printf '[[collectors]]\nname = "synthetic"\nplugin = "testkit"\n[collectors.config]\nseries = %d\n' "$3"
    fi
}

# collectd_conf PORT: collectd with the plugins that match the system collector's set (cpu,
# memory, df, disk, interface, load) at a 1 s interval, exposed by write_prometheus on PORT.
collectd_conf() {
    cat <<EOF
Interval 1
FQDNLookup false
LoadPlugin cpu
LoadPlugin memory
LoadPlugin df
LoadPlugin disk
LoadPlugin interface
LoadPlugin load
LoadPlugin write_prometheus
<Plugin write_prometheus>
  Port "$1"
</Plugin>
EOF
}

# wait_series PORT N: waits (up to 10 s) until /metrics on PORT answers with N testkit_value
# series.
wait_series() {
    local body
    for _ in $(seq 50); do
        if body=$(curl -sf "http://127.0.0.1:$1/metrics"); then
            [ "$(grep -c '^testkit_value' <<< "$body")" -ge "$2" ] && return 0
        fi
        sleep 0.2
    done
    return 1
}

# wrk_stats CONNECTIONS URL [WRK ARGS...]: "p50 p99 requests/s" of a WRK_SECONDS-long wrk run.
wrk_stats() {
    local out c=$1 url=$2
    shift 2
    out=$(wrk -t"$([ "$c" -gt 1 ] && echo 2 || echo 1)" -c"$c" -d"${WRK_SECONDS}s" --latency "$@" "$url" 2>&1)
    echo "$(awk '$1 == "50%" {print $2}' <<< "$out") $(awk '$1 == "99%" {print $2}' <<< "$out") $(awk '/^Requests\/sec/ {print $2}' <<< "$out")"
}

# to_us DURATION: a wrk duration (850.00us, 1.20ms, 2.00s) in microseconds.
to_us() {
    awk -v d="$1" 'BEGIN {
        if (d ~ /us$/) m = 1; else if (d ~ /ms$/) m = 1000; else if (d ~ /s$/) m = 1000000; else m = 1;
        sub(/[a-z]+$/, "", d); printf "%.0f", d * m }'
}

# median_us VALUES...: the median of microsecond values, printed as "850 µs" or "1.20 ms".
median_us() {
    printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END {
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2;
        if (m < 1000) printf "%.0f µs", m; else printf "%.2f ms", m / 1000 }'
}
