#!/usr/bin/env bash
# Installs the x86_64 .deb that scripts/release.sh made on this (Debian) machine, runs the
# installed agent the way its systemd unit runs it, scrapes it, reloads and stops it, purges the
# package and checks what is left. Also compares the .rpm's file list and scripts with the
# .deb's. Run as root, after `bash scripts/release.sh x86_64` (CI runs both).
#
#   bash scripts/check-packages.sh [target/dist/metricsd_VERSION-1_amd64.deb]
#
# systemd is not PID 1 on the machines this runs on, so the unit's own start cannot be used:
# the script starts ExecStartPre= and ExecStart= itself, as the unit's User= with the unit's
# EnvironmentFile=, after creating its StateDirectory= as systemd would.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { printf 'check-packages: %s\n' "$*" >&2; exit 1; }
say() { printf '\n== %s\n' "$*"; }

[ "$(id -u)" -eq 0 ] || fail "run as root (it installs and purges a package)"
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
deb=${1:-$(ls "$target_dir"/dist/metricsd_*_amd64.deb 2>/dev/null | head -n 1)}
[ -f "$deb" ] || fail "no .deb found: run scripts/release.sh x86_64 first"
rpm_file=$(ls "$target_dir"/dist/metricsd-*.x86_64.rpm 2>/dev/null | head -n 1)

# systemd-analyze (Debian's systemd package) and Debian's node_exporter, whose unit is the bar
# for the hardening score.
missing=()
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
[ -f /lib/systemd/system/prometheus-node-exporter.service ] || missing+=(prometheus-node-exporter)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v rpm >/dev/null 2>&1 || missing+=(rpm)
if [ "${#missing[@]}" -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if dpkg-query -W metricsd >/dev/null 2>&1; then
    say "a metricsd package is installed already: purging it first"
    dpkg -P metricsd
fi

snapshot() {
    find /etc /usr /var/lib /opt -xdev \
        -not -path '/var/lib/dpkg/*' -not -path '/var/lib/apt/*' -not -path '/var/lib/systemd/deb-systemd-helper-*' \
        2>/dev/null | sort
}
work=$(mktemp -d)
agent_pid=""
cleanup() {
    [ -z "$agent_pid" ] || kill -KILL "$agent_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
snapshot > "$work/before.txt"

say "install $(basename "$deb")"
dpkg -i "$deb"
for f in /usr/bin/metricsd /etc/metricsd/metricsd.toml /etc/default/metricsd \
         /usr/share/doc/metricsd/README.md; do
    [ -f "$f" ] || fail "$f is not installed"
done
unit=$(dpkg -L metricsd | grep '/systemd/system/metricsd.service$' || true)
[ -n "$unit" ] && [ -f "$unit" ] || fail "the package installs no metricsd.service"
plugins=$(ls /usr/lib/metricsd/plugins/libmetricsd_*.so | wc -l)
[ "$plugins" -ge 7 ] || fail "only $plugins plugins in /usr/lib/metricsd/plugins"
conffiles=$(dpkg-query -W -f='${Conffiles}' metricsd)
for f in /etc/metricsd/metricsd.toml /etc/default/metricsd; do
    grep -q " $f " <<<"$conffiles " || fail "$f is not a conffile: $conffiles"
done
getent passwd metricsd >/dev/null || fail "no system user metricsd"
[ "$(stat -c %U /usr/lib/metricsd/plugins)" = root ] || fail "the plugin directory is not root's"
echo "installed: $unit, $plugins plugins, conffiles and user metricsd"

say "systemd-analyze verify and security"
verify=$(systemd-analyze verify "$unit" 2>&1) || fail "systemd-analyze verify failed: $verify"
[ -z "$verify" ] || fail "systemd-analyze verify warns: $verify"
exposure() {
    systemd-analyze security --offline=true "$1" 2>&1 | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p'
}
ours=$(exposure "$unit")
theirs=$(exposure /lib/systemd/system/prometheus-node-exporter.service)
[ -n "$ours" ] && [ -n "$theirs" ] || fail "no exposure level from systemd-analyze security"
python3 -c "import sys; sys.exit(0 if float('$ours') <= float('$theirs') else 1)" \
    || fail "exposure $ours is worse than Debian's node_exporter unit ($theirs)"
echo "verify: clean; exposure $ours (Debian's prometheus-node-exporter.service: $theirs)"

say "run the installed agent as the unit does"
unit_value() { sed -n "s/^$1=//p" "$unit"; }
user=$(unit_value User)
[ "$user" = metricsd ] || fail "the unit runs as '$user', not metricsd"
group=$(unit_value Group)
[ "$(unit_value RestartPreventExitStatus)" = 2 ] || fail "RestartPreventExitStatus is not 2"
grep -qx 'ExecReload=/bin/kill -HUP $MAINPID' "$unit" || fail "no ExecReload sending SIGHUP"
env_file=$(unit_value EnvironmentFile | sed 's/^-//' | grep '^/etc/default/')
[ "$env_file" = /etc/default/metricsd ] || fail "no EnvironmentFile=/etc/default/metricsd"
state=$(unit_value StateDirectory)
install -d -o "$user" -g "$group" -m 0750 "/var/lib/$state"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
metrics_port=$(free_port)
health_port=$(free_port)
# The operator's way to change a key without editing the config: the EnvironmentFile.
printf 'METRICSD_HTTP__METRICS_LISTEN=127.0.0.1:%s\nMETRICSD_HTTP__HEALTH_LISTEN=127.0.0.1:%s\n' \
    "$metrics_port" "$health_port" >> "$env_file"
as_unit() {
    # systemd's environment: the EnvironmentFile's assignments, nothing inherited.
    local vars=()
    mapfile -t vars < <(grep -E '^[A-Za-z_][A-Za-z0-9_]*=' "$env_file")
    setpriv --reuid="$user" --regid="$group" --init-groups \
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "${vars[@]}" "$@"
}
read -r -a pre <<<"$(unit_value ExecStartPre)"
read -r -a start <<<"$(unit_value ExecStart)"
(cd / && as_unit "${pre[@]}") || fail "ExecStartPre (${pre[*]}) failed"
(cd / && as_unit "${start[@]}") 2> "$work/agent.log" &
agent_pid=$!
scraped=""
for _ in $(seq 1 60); do
    if curl -sf "http://127.0.0.1:$metrics_port/metrics" > "$work/metrics.txt" 2>/dev/null \
        && grep -q '^node_cpu_seconds_total{' "$work/metrics.txt"; then
        scraped=1
        break
    fi
    kill -0 "$agent_pid" 2>/dev/null || break
    sleep 0.5
done
[ -n "$scraped" ] || fail "the installed agent served no node_cpu_seconds_total:
$(tail -n 20 "$work/agent.log")"
health=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$health_port/health")
[ "$health" = 200 ] || fail "/health answered $health"
runs_as=$(ps -o user= -p "$(pgrep -P "$agent_pid" -x metricsd || echo "$agent_pid")" | tr -d ' ')
echo "scraped: $(grep -c '^node_' "$work/metrics.txt") node_* series, /health 200, running as $runs_as"
# ExecReload, then ExecStop's SIGTERM.
pid=$(pgrep -u "$user" -x metricsd | head -n 1)
[ -n "$pid" ] || fail "no metricsd process of user $user"
kill -HUP "$pid"
for _ in $(seq 1 40); do
    grep -q "SIGHUP" "$work/agent.log" && break
    sleep 0.25
done
grep -q "SIGHUP" "$work/agent.log" || fail "no reload logged after SIGHUP:
$(tail -n 20 "$work/agent.log")"
kill -TERM "$pid"
status=0
wait "$agent_pid" || status=$?
agent_pid=""
[ "$status" = 0 ] || fail "the agent exited $status after SIGTERM:
$(tail -n 20 "$work/agent.log")"
echo "reloaded on SIGHUP, exit 0 on SIGTERM"

say "purge"
dpkg -P metricsd
snapshot > "$work/after.txt"
left=$(comm -13 "$work/before.txt" "$work/after.txt")
[ -z "$left" ] || fail "left after dpkg -P: $left"
gone=$(comm -23 "$work/before.txt" "$work/after.txt")
[ -z "$gone" ] || fail "removed by install + purge although not the package's: $gone"
echo "nothing left but the system user metricsd (Debian keeps system users: $(getent passwd metricsd))"

if [ -n "$rpm_file" ]; then
    say "rpm: $(basename "$rpm_file")"
    rpm -qp --qf '%{NAME} %{VERSION}-%{RELEASE} %{ARCH}\n' "$rpm_file"
    # The same payload as the .deb, but for the distribution's own paths.
    # Files only (directories start with d), without Debian's copyright file.
    dpkg-deb -c "$deb" | awk '$1 !~ /^d/ {print $NF}' | sed 's|^\./|/|' \
        | sed 's|^/etc/default/metricsd$|/etc/sysconfig/metricsd|; s|^/lib/systemd/|/usr/lib/systemd/|' \
        | grep -v '^/usr/share/doc/metricsd/copyright$' | sort > "$work/deb-files.txt"
    rpm -qpl "$rpm_file" | sort > "$work/rpm-files.txt"
    diff "$work/deb-files.txt" "$work/rpm-files.txt" || fail "the .rpm's files differ from the .deb's"
    # (grep -q on a pipe under pipefail: the writer can die of SIGPIPE; read the output first.)
    grep -qx /etc/metricsd/metricsd.toml <<< "$(rpm -qp --configfiles "$rpm_file")" \
        || fail "/etc/metricsd/metricsd.toml is not a config file in the .rpm"
    grep -q 'useradd --system' <<< "$(rpm -qp --scripts "$rpm_file")" || fail "the .rpm creates no user"
    echo "rpm: same files as the .deb, config marked, user created in %pre"
fi
say "packages ok"
