#!/usr/bin/env bash
# Release artefacts for x86_64 and aarch64 Linux that start on glibc 2.28 or newer.
#
#   bash scripts/release.sh                  # both architectures: build, check, smoke, package
#   bash scripts/release.sh aarch64          # one architecture
#   bash scripts/release.sh --no-packages --no-smoke x86_64   # what the container build runs
#
# Steps, per architecture:
#  1. build the agent and the shipped plugins with cargo-zigbuild, linking against glibc 2.28's
#     symbol versions (zig's bundled glibc stubs), release profile;
#  2. stage the installed tree (usr/bin, usr/lib/metricsd/plugins) with debug info moved to
#     separate files (objcopy --only-keep-debug, then --strip-all with a debug link);
#  3. check every binary and plugin: the right ELF machine, no GLIBC_* version above 2.28, no
#     GLIBC_ABI_DT_RELR, no debug sections;
#  4. smoke: `metricsd once` and `metricsd run` against the NVML simulator (8 GPUs of
#     h100-sxm-8.toml), aarch64 under qemu-user;
#  5. package: .deb (cargo-deb), .rpm (cargo-generate-rpm), a tarball and a debug-info tarball.
#
# Output in target/dist/. Installs what it needs when missing: the rustup targets, zig (PyPI
# `ziglang`), cargo-zigbuild, cargo-deb and cargo-generate-rpm (crates.io, pinned), and Debian's
# binutils-aarch64-linux-gnu, qemu-user and libc6-arm64-cross.
set -euo pipefail
cd "$(dirname "$0")/.."

GLIBC_FLOOR=2.28
# The shipped plugins, as the file names say them (libmetricsd_NAME.so), and their packages.
PLUGINS=(system nvml discovery prometheus influxdb remote_write stdout)
PACKAGES=(metricsd metricsd-collector-system metricsd-collector-nvml metricsd-collector-discovery
          metricsd-sink-prometheus metricsd-sink-influxdb metricsd-sink-remote-write
          metricsd-sink-stdout)
ZIGLANG_VERSION=0.17.1
CARGO_ZIGBUILD_VERSION=0.24.1
CARGO_DEB_VERSION=3.8.0
CARGO_GENERATE_RPM_VERSION=0.21.1

packages=1
smoke=1
archs=()
for arg in "$@"; do
    case "$arg" in
        --no-packages) packages=0 ;;
        --no-smoke) smoke=0 ;;
        x86_64 | aarch64) archs+=("$arg") ;;
        *) echo "usage: $0 [--no-packages] [--no-smoke] [x86_64] [aarch64]" >&2; exit 2 ;;
    esac
done
[ "${#archs[@]}" -gt 0 ] || archs=(x86_64 aarch64)

target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
out="$target_dir/dist"
mkdir -p "$out"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' host/Cargo.toml | head -n 1)
# The commit's date for every timestamp the build and the packages write: the same source
# gives the same bytes (host/build.rs reads it for `metricsd --version`).
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
export SOURCE_DATE_EPOCH
# Nor may the checkout's or cargo's directory show in the code (panic messages) or Rust's debug
# info: the same commit gives the same code bytes wherever it is built. (zig's own libunwind
# objects still name the build directory in the separate debug files.)
RUSTFLAGS="${RUSTFLAGS:-} --remap-path-prefix=$PWD=/metricsd --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo"
export RUSTFLAGS

say() { printf '\n== %s\n' "$*"; }
fail() { printf 'release: %s\n' "$*" >&2; exit 1; }

apt_install() {
    local missing=()
    for pkg in "$@"; do
        grep -q "install ok installed" <<< "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

cargo_install() {
    local crate=$1 version=$2
    # (grep -q on a pipe under pipefail: the writer can die of SIGPIPE; read the output first.)
    grep -qxF "$crate v$version:" <<< "$(cargo install --list)" || cargo install --locked "$crate@$version"
}

triple() { echo "$1-unknown-linux-gnu"; }

ensure_tools() {
    say "tools"
    local debs=(binutils file)
    for arch in "${archs[@]}"; do
        grep -qx "$(triple "$arch")" <<< "$(rustup target list --installed)" || rustup target add "$(triple "$arch")"
        if [ "$arch" = aarch64 ]; then
            debs+=(binutils-aarch64-linux-gnu)
            [ "$smoke" = 0 ] || debs+=(qemu-user libc6-arm64-cross curl)
        fi
    done
    [ "$packages" = 0 ] || debs+=(rpm)
    apt_install "${debs[@]}"
    grep -qxF "$ZIGLANG_VERSION" <<< "$(python3 -m ziglang version 2>/dev/null)" \
        || python3 -m pip install --quiet "ziglang==$ZIGLANG_VERSION" \
        || python3 -m pip install --quiet --break-system-packages "ziglang==$ZIGLANG_VERSION"
    cargo_install cargo-zigbuild "$CARGO_ZIGBUILD_VERSION"
    if [ "$packages" = 1 ]; then
        cargo_install cargo-deb "$CARGO_DEB_VERSION"
        cargo_install cargo-generate-rpm "$CARGO_GENERATE_RPM_VERSION"
    fi
}

build() {
    say "build: ${archs[*]} for glibc $GLIBC_FLOOR"
    local args=()
    for arch in "${archs[@]}"; do args+=(--target "$(triple "$arch").$GLIBC_FLOOR"); done
    for p in "${PACKAGES[@]}"; do args+=(-p "$p"); done
    # The NVML simulator is not shipped; the smoke run needs it for each architecture.
    [ "$smoke" = 0 ] || args+=(-p nvml-sim)
    cargo zigbuild --release --locked "${args[@]}"
}

objcopy_for() {
    case "$1" in
        x86_64) echo objcopy ;;
        aarch64) echo aarch64-linux-gnu-objcopy ;;
    esac
}

# The installed tree of one architecture, under target/<triple>/release/package-root (where
# the packaging metadata in host/Cargo.toml finds it), and the debug files beside it.
stage() {
    local arch=$1
    local release="$target_dir/$(triple "$arch")/release"
    local root="$release/package-root" debug="$release/package-debug"
    local objcopy
    objcopy=$(objcopy_for "$arch")
    say "stage: $arch"
    rm -rf "$root" "$debug"
    install -d -m 0755 "$root/usr/bin" "$root/usr/lib/metricsd/plugins" "$debug"
    split_debug "$objcopy" "$release/metricsd" "$root/usr/bin/metricsd" "$debug" 0755
    for p in "${PLUGINS[@]}"; do
        split_debug "$objcopy" "$release/libmetricsd_$p.so" \
            "$root/usr/lib/metricsd/plugins/libmetricsd_$p.so" "$debug" 0644
    done
}

split_debug() {
    local objcopy=$1 from=$2 to=$3 debug_dir=$4 mode=$5
    local debug_file
    debug_file="$debug_dir/$(basename "$to").debug"
    "$objcopy" --only-keep-debug "$from" "$debug_file"
    "$objcopy" --strip-all --add-gnu-debuglink="$debug_file" "$from" "$to"
    chmod "$mode" "$to"
    chmod 0644 "$debug_file"
}

check() {
    local arch=$1
    local root="$target_dir/$(triple "$arch")/release/package-root"
    local machine
    case "$arch" in
        x86_64) machine="Advanced Micro Devices X86-64" ;;
        aarch64) machine="AArch64" ;;
    esac
    say "check: $arch"
    local file highest
    for file in "$root/usr/bin/metricsd" "$root"/usr/lib/metricsd/plugins/*.so; do
        grep -q "Machine: *$machine" <<< "$(readelf -h "$file")" \
            || fail "$file is not built for $arch: $(readelf -h "$file" | grep Machine)"
        highest=$(readelf -V --wide "$file" | grep -o 'GLIBC_2\.[0-9.]*' | sort -V -u | tail -n 1)
        [ -n "$highest" ] || fail "$file: no GLIBC version needs found (readelf -V)"
        [ "$(printf '%s\n%s\n' "GLIBC_$GLIBC_FLOOR" "$highest" | sort -V | tail -n 1)" = "GLIBC_$GLIBC_FLOOR" ] \
            || fail "$file needs $highest, above the floor GLIBC_$GLIBC_FLOOR"
        if grep -q GLIBC_ABI_DT_RELR <<< "$(readelf -V --wide "$file")"; then
            fail "$file needs GLIBC_ABI_DT_RELR (packed relocations), which glibc < 2.36 refuses"
        fi
        # (.debug_gdb_scripts is loaded data, not debug info: it stays.)
        if readelf -S --wide "$file" | grep -Eq ' \.z?debug_(info|line|str|abbrev|ranges|rnglists|loc|loclists|aranges) '; then
            fail "$file still has debug sections"
        fi
        printf '%-40s %-8s needs up to %s, %s bytes\n' "${file#"$root"/}" "$arch" "$highest" "$(stat -c %s "$file")"
    done
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# `metricsd once` must print 8 GPUs, and `metricsd run` serve them on /metrics.
smoke() {
    local arch=$1
    local release="$target_dir/$(triple "$arch")/release"
    local root="$release/package-root"
    local run=()
    if [ "$arch" != "$(uname -m)" ]; then
        run=("qemu-$arch" -L "/usr/$arch-linux-gnu")
    fi
    say "smoke: $arch ${run[*]}"
    local work
    work=$(mktemp -d)
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" RETURN
    local metrics_port health_port
    metrics_port=$(free_port)
    health_port=$(free_port)
    cat > "$work/gpu.toml" <<EOF
[agent]
interval = "1s"
[http]
metrics_listen = "127.0.0.1:$metrics_port"
health_listen = "127.0.0.1:$health_port"
[[collectors]]
name = "gpu"
plugin = "nvml"
[collectors.config]
library_path = "$release/libnvml_sim.so"
[[sinks]]
name = "prometheus"
plugin = "prometheus"
EOF
    local env=(env -i PATH="$PATH" METRICSD_PLUGIN_PATH="$root/usr/lib/metricsd/plugins"
               NVML_SIM_SCENARIO="$PWD/tests/nvml-sim/scenarios/h100-sxm-8.toml")
    "${env[@]}" "${run[@]}" "$root/usr/bin/metricsd" --version
    "${env[@]}" "${run[@]}" "$root/usr/bin/metricsd" -c "$work/gpu.toml" once > "$work/once.txt"
    local gpus
    gpus=$(grep -c '^gpu_up{' "$work/once.txt" || true)
    [ "$gpus" = 8 ] || fail "$arch: metricsd once printed $gpus gpu_up series, not 8:
$(head -n 20 "$work/once.txt")"
    echo "once: 8 GPUs, $(wc -l < "$work/once.txt") lines"

    "${env[@]}" "${run[@]}" "$root/usr/bin/metricsd" -c "$work/gpu.toml" run 2> "$work/run.log" &
    local pid=$! served=""
    for _ in $(seq 1 120); do
        if curl -sf "http://127.0.0.1:$metrics_port/metrics" > "$work/metrics.txt" 2>/dev/null \
            && [ "$(grep -c '^gpu_up{' "$work/metrics.txt")" = 8 ]; then
            served=1
            break
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    kill -TERM "$pid" 2>/dev/null || true
    local status=0
    wait "$pid" || status=$?
    [ -n "$served" ] || fail "$arch: metricsd run did not serve 8 GPUs on /metrics within 60 s:
$(tail -n 20 "$work/run.log")"
    [ "$status" = 0 ] || fail "$arch: metricsd run exited $status after SIGTERM:
$(tail -n 20 "$work/run.log")"
    echo "run: /metrics served 8 GPUs ($(grep -c '^gpu_' "$work/metrics.txt") gpu_* series), exit 0 on SIGTERM"
}

package() {
    local arch=$1
    local t
    t=$(triple "$arch")
    local release="$target_dir/$t/release"
    say "package: $arch"
    cargo deb -p metricsd --no-build --no-strip --target "$t" --output "$out/" --deb-version "$version-1"
    # xz: the payload compression every RPM distribution with glibc >= 2.28 reads.
    cargo generate-rpm -p host --target "$t" --output "$out/" --payload-compress xz
    local name="metricsd-$version-$arch-linux-gnu"
    local tree="$release/$name"
    rm -rf "$tree"
    install -d -m 0755 "$tree/plugins"
    cp "$release/package-root/usr/bin/metricsd" "$tree/"
    cp "$release/package-root/usr/lib/metricsd/plugins/"*.so "$tree/plugins/"
    cp deploy/systemd/metricsd.service deploy/packaging/metricsd.toml deploy/packaging/metricsd.env \
        README.md "$tree/"
    tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" \
        -C "$release" -czf "$out/$name.tar.gz" "$name"
    tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" \
        -C "$release" -czf "$out/$name-debug.tar.gz" package-debug
}

ensure_tools
build
for arch in "${archs[@]}"; do
    stage "$arch"
    check "$arch"
    [ "$smoke" = 0 ] || smoke "$arch"
    [ "$packages" = 0 ] || package "$arch"
done
say "artefacts in $out"
ls -l "$out"
