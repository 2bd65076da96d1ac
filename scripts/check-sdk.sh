#!/usr/bin/env bash
# The plugin SDK as a third party gets it (issue 22, item 5):
#  1. `cargo publish --dry-run -p metricsd-plugin-api`: the crate packages and builds on its own;
#  2. examples/hello-collector is copied out of the workspace and built with the git dependency
#     that plugin-api/README.md documents (the same line, pointed at a local clone of this
#     commit carrying the documented tag);
#  3. the release agent (scripts/release.sh's x86_64 tree) loads the result and `metricsd once`
#     prints its samples.
# Run after scripts/release.sh (CI does); needs network access for crates.io like any build.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { printf 'check-sdk: %s\n' "$*" >&2; exit 1; }
say() { printf '\n== %s\n' "$*"; }

target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
agent_root="$target_dir/x86_64-unknown-linux-gnu/release/package-root"
# METRICSD_BIN / METRICSD_PLUGINS: another agent and plugin directory (e.g. target/debug) for a
# quick run without the release build.
agent=${METRICSD_BIN:-$agent_root/usr/bin/metricsd}
agent_plugins=${METRICSD_PLUGINS:-$agent_root/usr/lib/metricsd/plugins}
[ -x "$agent" ] || fail "no release agent at $agent: run scripts/release.sh x86_64 first"

say "cargo publish --dry-run -p metricsd-plugin-api"
# --allow-dirty: the packaged files are the same either way; CI runs on a clean clone.
cargo publish --dry-run --allow-dirty -p metricsd-plugin-api

# The tag the docs name: plugin-api-<crate version>-for-metricsd-<host major.minor>.
api_version=$(sed -n 's/^version = "\(.*\)"$/\1/p' plugin-api/Cargo.toml | head -n 1)
host_version=$(sed -n 's/^version = "\(.*\)"$/\1/p' host/Cargo.toml | head -n 1)
tag="plugin-api-${api_version}-for-metricsd-${host_version%.*}"
dep_line=$(grep -m1 '^metricsd-plugin-api = { git = ' plugin-api/README.md) \
    || fail "plugin-api/README.md has no git dependency line"
grep -qF "tag = \"$tag\"" <<< "$dep_line" \
    || fail "plugin-api/README.md names another tag than $tag: $dep_line"
grep -qF "tag = \"$tag\"" plugin-api/src/lib.rs \
    || fail "plugin-api/src/lib.rs (rustdoc) does not name the tag $tag"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
say "hello-collector outside the workspace, from git tag $tag"
git clone -q --bare --no-local . "$work/metricsd.git"
git -C "$work/metricsd.git" tag -f "$tag" HEAD > /dev/null
cp -r examples/hello-collector "$work/hello-collector"
url=$(sed -n 's/.*git = "\([^"]*\)".*/\1/p' <<< "$dep_line")
local_line=${dep_line/"$url"/"file://$work/metricsd.git"}
python3 - "$work/hello-collector/Cargo.toml" "$local_line" <<'PY'
import re, sys
path, line = sys.argv[1], sys.argv[2]
text = open(path).read()
new, n = re.subn(r'^metricsd-plugin-api = \{ path = [^\n]*$', line, text, flags=re.M)
if n != 1:
    sys.exit("hello-collector/Cargo.toml: no path dependency on metricsd-plugin-api to replace")
open(path, "w").write(new)
PY
grep -n 'metricsd-plugin-api' "$work/hello-collector/Cargo.toml"
# The workspace's lock file pins the same dependency versions (cargo drops what it does not use).
cp Cargo.lock "$work/hello-collector/Cargo.lock"
(cd "$work/hello-collector" && CARGO_TARGET_DIR="$target_dir/sdk-check" cargo build --release)
so="$target_dir/sdk-check/release/libmetricsd_hello.so"
[ -f "$so" ] || fail "the out-of-tree build made no $so"
mkdir "$work/plugins"
cp "$so" "$work/plugins/"

say "release agent runs it"
cat > "$work/hello.toml" <<'TOML'
[[collectors]]
name = "hello"
plugin = "hello"
[collectors.config]
greeting = "from-git"
series = 3
[[sinks]]
name = "console"
plugin = "stdout"
TOML
env -i PATH="$PATH" METRICSD_PLUGIN_PATH="$work/plugins:$agent_plugins" \
    "$agent" -c "$work/hello.toml" plugins | tee "$work/plugins.txt"
grep -q "^loaded  *hello .*$work/plugins/libmetricsd_hello.so" "$work/plugins.txt" \
    || fail "the release agent did not load the out-of-tree hello plugin"
env -i PATH="$PATH" METRICSD_PLUGIN_PATH="$work/plugins:$agent_plugins" \
    "$agent" -c "$work/hello.toml" once > "$work/once.txt"
grep -q '^hello_collections_total{.*greeting="from-git"' "$work/once.txt" \
    || fail "metricsd once printed no hello_collections_total: $(head -n 20 "$work/once.txt")"
[ "$(grep -c '^hello_sequence{' "$work/once.txt")" = 3 ] \
    || fail "metricsd once printed $(grep -c '^hello_sequence{' "$work/once.txt") hello_sequence samples, not 3"
echo "ok: hello-collector built from tag $tag outside the workspace; the release agent loads and runs it"
