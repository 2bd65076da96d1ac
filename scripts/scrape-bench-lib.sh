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

# wrk_stats CONNECTIONS URL: "p50 p99 requests/s" of a WRK_SECONDS-long wrk run.
wrk_stats() {
    local out
    out=$(wrk -t"$([ "$1" -gt 1 ] && echo 2 || echo 1)" -c"$1" -d"${WRK_SECONDS}s" --latency "$2" 2>&1)
    echo "$(awk '$1 == "50%" {print $2}' <<< "$out") $(awk '$1 == "99%" {print $2}' <<< "$out") $(awk '/^Requests\/sec/ {print $2}' <<< "$out")"
}
