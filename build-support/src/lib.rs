//! Build-script helper for the agent binary and the shipped plugins.
//!
//! Linux maps a binary's code into memory in windows of about 64 KiB around each page that
//! runs (fault-around, and the page cache's large folios), and those pages stay resident. The
//! code an idle agent runs is small (about 0.6 MiB of the host's 5.4 MiB of `.text`), but a
//! normal link scatters it over the whole file, so most of the binary ends up resident.
//! [`link_in_run_order`] hands the linker `code-order.txt`, the functions a profiled run
//! executed, and lld places them side by side at the start of `.text`.
//!
//! The file names functions by their mangled symbols, which carry hashes of the toolchain and
//! the dependency versions. A name that no longer exists is skipped without a warning, so a
//! stale file only makes the layout less compact, never the build fail. `scripts/code-order.sh`
//! profiles the agent and rewrites the file; `docs/BENCHMARKS.md` shows its effect.
//!
//! It applies to release builds for `x86_64-unknown-linux-gnu` with rustc 1.90 or newer, whose
//! default linker there is lld (GNU ld has no ordering option), and stays off when the build
//! chooses its own linker (`target.<triple>.linker` in cargo's config, or `RUSTFLAGS` naming a
//! linker, linker features or `-fuse-ld`). `METRICSD_CODE_ORDER=off` turns it off too.

use std::process::Command;

/// The ordering file, one mangled symbol per line.
pub const ORDER_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/code-order.txt");

/// Call from a `build.rs`: links the package's binaries and cdylibs with [`ORDER_FILE`] when
/// the build is one it applies to (see the crate's documentation).
pub fn link_in_run_order() {
    println!("cargo:rerun-if-changed={ORDER_FILE}");
    println!("cargo:rerun-if-env-changed=METRICSD_CODE_ORDER");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    if applies() {
        println!("cargo:rustc-link-arg=-Wl,--symbol-ordering-file={ORDER_FILE}");
        println!("cargo:rustc-link-arg=-Wl,--no-warn-symbol-ordering");
    }
}

fn applies() -> bool {
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    var("METRICSD_CODE_ORDER") != "off"
        && var("PROFILE") == "release"
        && var("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu"
        && var("RUSTC_LINKER").is_empty()
        && !chooses_linker(&var("CARGO_ENCODED_RUSTFLAGS"))
        && std::path::Path::new(ORDER_FILE).is_file()
        && rustc_minor(&var("RUSTC")).is_some_and(|minor| minor >= 90)
}

/// Whether the build's rustc flags (cargo's `\x1f`-separated form) pick a linker other than the
/// default: `-C linker=…`, `-C linker-flavor=…`, `-C linker-features=…`,
/// `-C link-self-contained=-linker`, or `-fuse-ld=…` passed through `link-arg(s)`.
fn chooses_linker(encoded_rustflags: &str) -> bool {
    encoded_rustflags
        .split('\x1f')
        .any(|flag| flag.contains("linker") || flag.contains("fuse-ld"))
}

/// The minor version of `rustc --version` ("rustc 1.95.0 (...)" gives 95).
fn rustc_minor(rustc: &str) -> Option<u32> {
    let rustc = if rustc.is_empty() { "rustc" } else { rustc };
    let out = Command::new(rustc).arg("--version").output().ok()?;
    parse_minor(&String::from_utf8_lossy(&out.stdout))
}

fn parse_minor(version: &str) -> Option<u32> {
    let number = version.split_whitespace().nth(1)?;
    let mut parts = number.split('.');
    if parts.next()? != "1" {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::{chooses_linker, parse_minor};

    #[test]
    fn a_build_that_picks_its_linker_is_left_alone() {
        assert!(!chooses_linker(""));
        assert!(!chooses_linker("-C\x1fopt-level=3\x1f-Ctarget-cpu=native"));
        assert!(chooses_linker("-C\x1flinker=clang"));
        assert!(chooses_linker("-Clinker-features=-lld"));
        assert!(chooses_linker("-C\x1flink-arg=-fuse-ld=bfd"));
        assert!(chooses_linker("-Clink-self-contained=-linker"));
    }

    #[test]
    fn reads_the_minor_version_of_rustc() {
        assert_eq!(parse_minor("rustc 1.95.0 (59807616e 2026-04-14)"), Some(95));
        assert_eq!(
            parse_minor("rustc 1.89.0-nightly (abc 2025-06-01)"),
            Some(89)
        );
        assert_eq!(parse_minor("rustc 2.0.0"), None);
        assert_eq!(parse_minor("garbage"), None);
    }
}
