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
//! Read-only data is spread the same way, and most of it cannot be named in that file: string
//! constants, format templates and jump tables live in unnamed `.rodata` input sections
//! (`.rodata..Lanon.<hash>.<n>`). A linker script per package, `data-order/<package>.ld`,
//! names the sections the ordered functions read and puts them first in `.rodata`, and
//! `.rodata` (with gdb's script section, which `main` reads) before the exception tables, so
//! the data the agent reads shares the first pages of the file with the ELF headers. The
//! script only inserts into lld's default layout (`INSERT BEFORE .gcc_except_table`); a name
//! it lists that no longer exists matches nothing. The host crate's own constants are
//! renumbered by edits of its code, so the script loses some precision with each such edit
//! until `scripts/code-order.sh` rewrites it (`NATIVE_ONLY=1`, no valgrind needed). The scripts
//! apply to the same builds as the ordering file, and `METRICSD_CODE_ORDER=off` turns them off
//! with it.
//!
//! It applies to release builds for `x86_64-unknown-linux-gnu` with rustc 1.90 or newer, whose
//! default linker there is lld (GNU ld has no ordering option), and stays off when the build
//! chooses its own linker (`target.<triple>.linker` in cargo's config, or `RUSTFLAGS` naming a
//! linker, linker features or `-fuse-ld`). `METRICSD_CODE_ORDER=off` turns it off too.
//!
//! The same builds pack their relative relocations (`DT_RELR`) when they are made on and for a
//! system with glibc 2.36 or newer; see [`packs_relocations`] for why and for `METRICSD_RELR`.

use std::process::Command;

/// The ordering file, one mangled symbol per line.
pub const ORDER_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/code-order.txt");

/// The linker scripts that place each package's read-only data, `<package>.ld`.
pub const DATA_ORDER_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data-order");

/// Call from a `build.rs`: links the package's binaries and cdylibs with [`ORDER_FILE`] and
/// the package's script in [`DATA_ORDER_DIR`], and with packed relocations where the system
/// allows them, when the build is one it applies to (see the crate's documentation).
pub fn link_in_run_order() {
    println!("cargo:rerun-if-changed={ORDER_FILE}");
    println!("cargo:rerun-if-changed={DATA_ORDER_DIR}");
    println!("cargo:rerun-if-env-changed=METRICSD_CODE_ORDER");
    println!("cargo:rerun-if-env-changed=METRICSD_RELR");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    println!("cargo:rerun-if-env-changed=METRICSD_LINK_MAP");
    if !links_with_lld() {
        return;
    }
    if std::env::var("METRICSD_CODE_ORDER").unwrap_or_default() != "off" {
        if std::path::Path::new(ORDER_FILE).is_file() {
            println!("cargo:rustc-link-arg=-Wl,--symbol-ordering-file={ORDER_FILE}");
            println!("cargo:rustc-link-arg=-Wl,--no-warn-symbol-ordering");
        }
        // The script places `.rodata` before `.gcc_except_table`, which lld requires to exist:
        // it does wherever code can unwind (std's landing pads are enough).
        let package = std::env::var("CARGO_PKG_NAME").unwrap_or_default();
        let script = format!("{DATA_ORDER_DIR}/{package}.ld");
        if std::env::var("CARGO_CFG_PANIC").as_deref() == Ok("unwind")
            && std::path::Path::new(&script).is_file()
        {
            println!("cargo:rustc-link-arg=-Wl,-T,{script}");
        }
    }
    if packs_relocations() {
        println!("cargo:rustc-link-arg=-Wl,-z,pack-relative-relocs");
    }
    // For scripts/code-order.sh: where each input section landed (`-Map` changes nothing in
    // the output; checked byte for byte).
    if let Ok(dir) = std::env::var("METRICSD_LINK_MAP") {
        let name = std::env::var("CARGO_PKG_NAME").unwrap_or_default();
        println!("cargo:rustc-link-arg=-Wl,-Map={dir}/{name}.map");
    }
}

/// A release build for x86_64 Linux (glibc) whose linker is rustc's default, lld.
fn links_with_lld() -> bool {
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    var("PROFILE") == "release"
        && var("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu"
        && var("RUSTC_LINKER").is_empty()
        && !chooses_linker(&var("CARGO_ENCODED_RUSTFLAGS"))
        && rustc_minor(&var("RUSTC")).is_some_and(|minor| minor >= 90)
}

/// Whether to pack relative relocations (`DT_RELR`, lld's `-z pack-relative-relocs`). A
/// position-independent binary carries one 24-byte record per pointer in its data, which the
/// loader reads once at start and which then stays resident (about 0.45 MiB over the agent and
/// two plugins); packed, they take a few KiB. Loaders before glibc 2.36 cannot read the packed
/// form, and lld then also marks the binary as needing `GLIBC_ABI_DT_RELR`, so an older system
/// refuses it at start with "version `GLIBC_ABI_DT_RELR' not found". Hence it is on when the
/// build runs on, and for, a system with glibc 2.36 or newer (a build for this machine, the
/// Docker image's Debian 12); `METRICSD_RELR=off` keeps binaries meant for older nodes
/// (Ubuntu 22.04, RHEL 9) loadable there, `METRICSD_RELR=on` forces it.
fn packs_relocations() -> bool {
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    match var("METRICSD_RELR").as_str() {
        "on" => true,
        "off" => false,
        _ => var("HOST") == var("TARGET") && glibc_minor().is_some_and(|minor| minor >= 36),
    }
}

/// The minor version of this machine's glibc (`getconf GNU_LIBC_VERSION` says "glibc 2.36").
fn glibc_minor() -> Option<u32> {
    let out = Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
        .ok()?;
    parse_glibc_minor(&String::from_utf8_lossy(&out.stdout))
}

fn parse_glibc_minor(version: &str) -> Option<u32> {
    let number = version.trim().strip_prefix("glibc ")?;
    let mut parts = number.split('.');
    if parts.next()? != "2" {
        return None;
    }
    parts.next()?.parse().ok()
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
    use super::{chooses_linker, parse_glibc_minor, parse_minor};

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

    #[test]
    fn reads_the_minor_version_of_glibc() {
        assert_eq!(parse_glibc_minor("glibc 2.36\n"), Some(36));
        assert_eq!(parse_glibc_minor("glibc 2.35"), Some(35));
        assert_eq!(parse_glibc_minor("glibc 3.0"), None);
        assert_eq!(parse_glibc_minor(""), None);
        assert_eq!(parse_glibc_minor("musl 1.2.4"), None);
    }
}
