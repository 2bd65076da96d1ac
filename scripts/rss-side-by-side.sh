#!/usr/bin/env bash
# Idle RSS of two metricsd builds and collectd, running side by side on the same machine:
#
#   bash scripts/rss-side-by-side.sh OLD_DIR NEW_DIR     # dirs holding metricsd and the plugins
#
# Each build is installed by copying (SMALL=1: with 4 KiB writes, so that the copies sit in small
# page-cache folios, as packaged libraries do) into its own directory with the system and
# Prometheus plugins, and runs the system collector and the Prometheus sink at 1 s
# (scrape-bench-lib.sh's metricsd_toml); collectd runs the matching plugins with
# write_prometheus (collectd_conf). Each is scraped once; after SETTLE seconds (default 35) it
# prints each one's VmRSS, then with DETAIL=1 where it is (scripts/rss-breakdown.py).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { sed -n '2,11p' "$0" >&2; exit 2; }
command -v collectd >/dev/null || { echo "missing collectd (apt-get install collectd-core libmicrohttpd12 libprotobuf-c1)" >&2; exit 1; }
SETTLE=${SETTLE:-35}
source scripts/scrape-bench-lib.sh
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

install_copy() { # FILE DIR
    if [ -n "${SMALL:-}" ]; then
        dd if="$1" of="$2/$(basename "$1")" bs=4k status=none
        chmod 755 "$2/$(basename "$1")"
    else
        cp "$1" "$2/"
    fi
}

ports=(19480 19580)
names=(old new)
for name in "${names[@]}"; do mkdir -p "$work/$name/bin" "$work/$name/plugins"; done
install_copy "$1/metricsd" "$work/old/bin"
install_copy "$2/metricsd" "$work/new/bin"
for plugin in system prometheus; do
    install_copy "$1/libmetricsd_$plugin.so" "$work/old/plugins"
    install_copy "$2/libmetricsd_$plugin.so" "$work/new/plugins"
done
for i in 0 1; do
    dir="$work/${names[$i]}"
    metricsd_toml "$dir/plugins" "${ports[$i]}" 0 > "$dir/metricsd.toml"
    "$dir/bin/metricsd" -c "$dir/metricsd.toml" run > "$dir/log" 2>&1 &
    pids+=($!)
done
collectd_conf 19603 > "$work/collectd.conf"
collectd -f -C "$work/collectd.conf" > "$work/collectd.log" 2>&1 &
pids+=($!)

for port in "${ports[@]}" 19603; do
    for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/metrics" && break; sleep 0.1; done
    curl -sf -o /dev/null "http://127.0.0.1:$port/metrics" \
        || { echo "no answer on port $port" >&2; cat "$work"/*/log "$work/collectd.log" >&2; exit 1; }
done
sleep "$SETTLE"
rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
echo "old $(rss "${pids[0]}") KiB, new $(rss "${pids[1]}") KiB, collectd $(rss "${pids[2]}") KiB"
if [ -n "${DETAIL:-}" ]; then
    python3 scripts/rss-breakdown.py "${pids[@]}"
fi
