//! Where the collector reads the host from (`procfs`, `sysfs`, `rootfs`, the udev database),
//! and the small readers that every source shares.

use std::fmt::Display;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

/// Why a source gave nothing.
#[derive(Debug)]
pub enum Missing {
    /// The file does not exist here (a kernel without the feature, a module not loaded, no
    /// such hardware): node_exporter's "no data". Not an error: the source's
    /// `node_scrape_collector_success` is 0 and nothing is logged above debug.
    Absent,
    /// It exists but cannot be read or parsed: logged, and the instance is `degraded`.
    Failed(String),
}

/// What one source's collection came to.
pub type Outcome = Result<(), Missing>;

impl Missing {
    /// An I/O error on `path`: a file that is not there is [`Missing::Absent`].
    pub fn io(path: &Path, e: std::io::Error) -> Missing {
        if e.kind() == ErrorKind::NotFound {
            Missing::Absent
        } else {
            Missing::Failed(format!("{}: {e}", path.display()))
        }
    }

    /// Content of `path` that does not parse.
    pub fn parse(path: &Path, what: impl Display) -> Missing {
        Missing::Failed(format!("{}: {what}", path.display()))
    }

    /// An error of the `procfs` crate's parsers.
    pub fn procfs(e: procfs::ProcError) -> Missing {
        match e {
            procfs::ProcError::NotFound(_) => Missing::Absent,
            e => Missing::Failed(e.to_string()),
        }
    }
}

/// The host's file systems as this agent sees them; node_exporter's `--path.procfs`,
/// `--path.sysfs`, `--path.rootfs` and `--path.udev.data`.
#[derive(Debug, Clone)]
pub struct Host {
    proc: PathBuf,
    sys: PathBuf,
    root: PathBuf,
    udev: PathBuf,
}

impl Host {
    /// From the config's paths.
    pub fn new(proc: &str, sys: &str, root: &str, udev: &str) -> Host {
        Host {
            proc: PathBuf::from(proc),
            sys: PathBuf::from(sys),
            root: PathBuf::from(root),
            udev: PathBuf::from(udev),
        }
    }

    /// `rel` under procfs (`"net/dev"` → `/proc/net/dev`).
    pub fn proc(&self, rel: &str) -> PathBuf {
        self.proc.join(rel)
    }

    /// `rel` under sysfs (`"class/net"` → `/sys/class/net`).
    pub fn sys(&self, rel: &str) -> PathBuf {
        self.sys.join(rel)
    }

    /// The host's absolute path `abs` as this process reaches it (under `rootfs`).
    pub fn root(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    /// `name` in the udev database (`"b8:0"`).
    pub fn udev(&self, name: &str) -> PathBuf {
        self.udev.join(name)
    }

    /// A mount point as the host names it: without the `rootfs` prefix, where a mount table
    /// read from inside a container shows the host's tree under it.
    pub fn strip_root(&self, mount_point: &str) -> String {
        let root = self.root.to_string_lossy();
        let root = root.trim_end_matches('/');
        if root.is_empty() {
            return mount_point.to_string();
        }
        match mount_point.strip_prefix(root) {
            Some("") => "/".to_string(),
            Some(rest) if rest.starts_with('/') => rest.to_string(),
            _ => mount_point.to_string(),
        }
    }
}

/// A whole file.
pub fn read(path: &Path) -> Result<String, Missing> {
    std::fs::read_to_string(path).map_err(|e| Missing::io(path, e))
}

/// A file holding one number (sysfs and `/proc/sys` style), in decimal or `0x` hex.
pub fn read_number(path: &Path) -> Result<f64, Missing> {
    let text = read(path)?;
    parse_number(text.trim())
        .ok_or_else(|| Missing::parse(path, format!("`{}` is not a number", text.trim())))
}

/// A sysfs attribute that may be absent or unreadable (a link that is down answers `EINVAL`
/// for its carrier): `None` then, as node_exporter leaves such a series out.
pub fn attribute(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim_end_matches('\n').to_string())
}

/// A number attribute that may be absent: see [`attribute`].
pub fn number_attribute(path: &Path) -> Option<f64> {
    attribute(path).and_then(|s| parse_number(s.trim()))
}

/// Decimal (integer or float) or `0x` hexadecimal.
pub fn parse_number(s: &str) -> Option<f64> {
    if let Some(hex) = s.strip_prefix("0x") {
        return u64::from_str_radix(hex, 16).ok().map(|v| v as f64);
    }
    s.parse::<f64>().ok()
}

/// The entries of a directory, sorted by name; a directory that is not there is `Absent`.
pub fn entries(path: &Path) -> Result<Vec<String>, Missing> {
    let dir = std::fs::read_dir(path).map_err(|e| Missing::io(path, e))?;
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_root_keeps_host_paths() {
        let h = Host::new("/proc", "/sys", "/host/root", "/run/udev/data");
        assert_eq!(h.strip_root("/host/root"), "/");
        assert_eq!(h.strip_root("/host/root/var"), "/var");
        assert_eq!(h.strip_root("/host/rootfs"), "/host/rootfs");
        assert_eq!(h.strip_root("/boot"), "/boot");
        assert_eq!(h.root("/boot"), PathBuf::from("/host/root/boot"));
        let plain = Host::new("/proc", "/sys", "/", "/run/udev/data");
        assert_eq!(plain.strip_root("/var"), "/var");
        assert_eq!(plain.root("/var"), PathBuf::from("/var"));
    }

    #[test]
    fn numbers_in_sysfs_forms() {
        assert_eq!(parse_number("0x1003"), Some(4099.0));
        assert_eq!(parse_number("-1"), Some(-1.0));
        assert_eq!(parse_number("0.5"), Some(0.5));
        assert_eq!(parse_number("up"), None);
    }
}
