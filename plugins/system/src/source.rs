//! Where the collector reads the host from (`procfs`, `sysfs`, `rootfs`, the udev database),
//! and the small readers that every source shares.

use std::collections::HashMap;
use std::fmt::Display;
use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
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

/// A whole file, read once (sources read every collection go through [`Files`]).
pub fn read(path: &Path) -> Result<String, Missing> {
    File::open(path)
        .and_then(|file| read_whole(&file))
        .map_err(|e| Missing::io(path, e))
}

/// A file that may be absent or unreadable: `None` then.
pub fn optional(path: &Path) -> Option<String> {
    read(path).ok()
}

/// A file holding one number (sysfs and `/proc/sys` style), in decimal or `0x` hex.
pub fn read_number(path: &Path) -> Result<f64, Missing> {
    let text = read(path)?;
    parse_number(text.trim())
        .ok_or_else(|| Missing::parse(path, format!("`{}` is not a number", text.trim())))
}

/// A sysfs attribute read once, `None` where it is absent or unreadable: see
/// [`Files::attribute`].
pub fn attribute(path: &Path) -> Option<String> {
    File::open(path).and_then(|file| read_at_start(&file)).ok()
}

/// A number attribute that may be absent: see [`attribute`].
pub fn number_attribute(path: &Path) -> Option<f64> {
    attribute(path).and_then(|s| parse_number(s.trim()))
}

/// The files every collection reads (procfs files, sysfs attributes), kept open between
/// collections and read again from offset 0 with `pread`, which makes the kernel render them
/// afresh. Opening costs far more than reading: a sysfs attribute takes 15-20 µs to open (the
/// kernel allocates its open-file state every time) and 2 µs to `pread` once open; an
/// interface has twenty attributes, an InfiniBand port thirty counters. Files held open also
/// keep being read when the process runs out of descriptors.
///
/// A file whose read fails with `ENODEV` (its device went away) is opened again; files not
/// read in a collection are closed after it ([`Files::sweep`]); at most a quarter of the
/// process's descriptor limit (and 1024) are kept, the rest are opened per read.
pub struct Files {
    open: HashMap<PathBuf, (File, u64)>,
    collection: u64,
    limit: usize,
}

impl Default for Files {
    fn default() -> Self {
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(1024);
        Files {
            open: HashMap::new(),
            collection: 0,
            limit: (soft / 4).min(1024) as usize,
        }
    }
}

impl Files {
    /// `read` on the open file of `path`, opening (and keeping) it first if it is not open.
    fn with_file<T>(
        &mut self,
        path: &Path,
        read: impl Fn(&File) -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        if let Some((file, used)) = self.open.get_mut(path) {
            *used = self.collection;
            match read(file) {
                // The device went away: open the path again, a new device may have its name.
                Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENODEV as i32) => {
                    self.open.remove(path);
                }
                other => return other,
            }
        }
        let file = File::open(path)?;
        let result = read(&file);
        if self.open.len() < self.limit {
            self.open
                .insert(path.to_path_buf(), (file, self.collection));
        }
        result
    }

    /// A sysfs attribute, or `None` where it is absent or has no value now (a link that is
    /// down answers `EINVAL` for its carrier), as node_exporter leaves such a series out.
    pub fn attribute(&mut self, path: &Path) -> Option<String> {
        self.with_file(path, read_at_start).ok()
    }

    /// A number attribute, decimal or `0x` hexadecimal.
    pub fn number(&mut self, path: &Path) -> Option<f64> {
        self.attribute(path).and_then(|s| parse_number(s.trim()))
    }

    /// A whole procfs file.
    pub fn read(&mut self, path: &Path) -> Result<String, Missing> {
        self.with_file(path, read_whole)
            .map_err(|e| Missing::io(path, e))
    }

    /// A procfs file that may be absent: `None` then.
    pub fn optional(&mut self, path: &Path) -> Option<String> {
        self.read(path).ok()
    }

    /// A procfs file holding one number.
    pub fn read_number(&mut self, path: &Path) -> Result<f64, Missing> {
        let text = self.read(path)?;
        parse_number(text.trim())
            .ok_or_else(|| Missing::parse(path, format!("`{}` is not a number", text.trim())))
    }

    /// After a collection: closes the files it did not read (devices that went away, sources
    /// switched off).
    pub fn sweep(&mut self) {
        let collection = self.collection;
        self.open.retain(|_, (_, used)| *used == collection);
        self.collection += 1;
    }
}

/// A sysfs attribute from offset 0: at most a page, in one read.
fn read_at_start(file: &File) -> std::io::Result<String> {
    let mut buf = [0u8; 4096];
    let n = file.read_at(&mut buf, 0)?;
    let text = std::str::from_utf8(&buf[..n])
        .map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e))?;
    Ok(text.trim_end_matches('\n').to_string())
}

/// A whole file from offset 0, to its end: procfs files report no size, so this reads into a
/// growing buffer without asking for one (`std::fs::read_to_string` costs a `statx` per file).
fn read_whole(file: &File) -> std::io::Result<String> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(len * 2, 0);
        }
        let n = file.read_at(&mut buf[len..], len as u64)?;
        if n == 0 {
            break;
        }
        len += n;
    }
    buf.truncate(len);
    String::from_utf8(buf).map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e))
}

/// The fields of a key-value file that a pattern selects, each decided once: the field names of
/// `/proc/net/netstat` or `/proc/vmstat` do not change while the kernel runs, and matching the
/// pattern against each of their hundreds of fields every collection was most of these
/// sources' own time.
pub struct Selection {
    pattern: regex::Regex,
    decided: HashMap<String, bool>,
}

impl Selection {
    /// Fields matching `pattern`.
    pub fn new(pattern: regex::Regex) -> Selection {
        Selection {
            pattern,
            decided: HashMap::new(),
        }
    }

    /// Whether the pattern selects `field`.
    pub fn selects(&mut self, field: &str) -> bool {
        if let Some(&selected) = self.decided.get(field) {
            return selected;
        }
        let selected = self.pattern.is_match(field);
        self.decided.insert(field.to_string(), selected);
        selected
    }
}

/// The lines of a statistics file made of a keyword and numbers (`/proc/net/rpc/nfs`, XFS's
/// `stats`): each keyword with its numbers. A field that is not a number fails the file.
pub fn keyed_numbers(path: &Path, text: &str) -> Result<HashMap<String, Vec<f64>>, Missing> {
    let mut lines = HashMap::new();
    for line in text.lines() {
        let mut fields = line.split_ascii_whitespace();
        let Some(key) = fields.next() else { continue };
        let values: Result<Vec<f64>, _> = fields.map(|f| f.parse::<f64>()).collect();
        let values = values.map_err(|_| {
            Missing::parse(path, format!("`{line}` has a field that is not a number"))
        })?;
        lines.insert(key.to_string(), values);
    }
    Ok(lines)
}

/// The number of a numbered entry (`cpu12` with prefix `cpu` → `12`); `None` for other names
/// (`cpufreq`, `cpuidle`).
pub fn numbered<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    name.strip_prefix(prefix)
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Decimal (integer or float) or `0x` hexadecimal.
pub fn parse_number(s: &str) -> Option<f64> {
    if let Some(hex) = s.strip_prefix("0x") {
        return u64::from_str_radix(hex, 16).ok().map(|v| v as f64);
    }
    s.parse::<f64>().ok()
}

/// The entries of a directory that may not exist: none then (a filesystem type or module the
/// host does not use, whose source succeeds with nothing to report, as node_exporter's does).
pub fn entries_if_present(path: &Path) -> Result<Vec<String>, Missing> {
    match entries(path) {
        Err(Missing::Absent) => Ok(Vec::new()),
        other => other,
    }
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
    fn files_stay_open_read_afresh_and_close_when_unused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b, c) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        std::fs::write(&a, "1\n").expect("write");
        std::fs::write(&b, "0x10\n").expect("write");
        let long = "x".repeat(10_000);
        std::fs::write(&c, &long).expect("write");
        let mut files = Files::default();
        assert_eq!(files.attribute(&a).as_deref(), Some("1"));
        assert_eq!(files.number(&b), Some(16.0));
        assert_eq!(files.read(&c).expect("read"), long, "read to the end");
        assert_eq!(files.open.len(), 3);
        // Read again through the open file, from the start: the new value.
        std::fs::write(&a, "22\n").expect("write");
        assert_eq!(files.attribute(&a).as_deref(), Some("22"));
        assert!(files.attribute(&dir.path().join("absent")).is_none());
        assert!(matches!(
            files.read(&dir.path().join("absent")),
            Err(Missing::Absent)
        ));
        files.sweep();
        // `b` and `c` are not read in this collection: closed after it.
        assert_eq!(files.attribute(&a).as_deref(), Some("22"));
        files.sweep();
        assert_eq!(files.open.keys().collect::<Vec<_>>(), vec![&a]);
    }

    #[test]
    fn numbers_in_sysfs_forms() {
        assert_eq!(parse_number("0x1003"), Some(4099.0));
        assert_eq!(parse_number("-1"), Some(-1.0));
        assert_eq!(parse_number("0.5"), Some(0.5));
        assert_eq!(parse_number("up"), None);
    }
}
