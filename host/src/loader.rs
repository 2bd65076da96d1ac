//! Finds plugin files, refuses the ones that must not or cannot load, and loads the rest
//! through abi_stable's checked loader.
//!
//! Each file is opened with `lib_header_from_path` + `init_root_module`, never with
//! `RootModule::load_from_file`, which caches the first library loaded for a module type and
//! would hand every later file the first plugin's module. Each file is read once through one
//! descriptor, checked, hashed and loaded from an in-memory copy of those bytes ([`scan`]).
//! Libraries are never unloaded.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use abi_stable::library::{lib_header_from_path, LibraryError};
use metricsd_plugin_api::abi::{PluginInfo, PluginKind, PluginModuleRef};
use metricsd_plugin_api::API_VERSION;
use sha2::{Digest, Sha256};

/// The system-wide plugin directory.
pub const SYSTEM_PLUGIN_DIR: &str = "/usr/lib/metricsd/plugins";

/// A plugin that loaded.
#[derive(Clone)]
pub struct Plugin {
    /// The file it came from.
    pub path: PathBuf,
    /// The plugin's entry points.
    pub module: PluginModuleRef,
    /// Name (as used in the config).
    pub name: String,
    /// Collector or sink.
    pub kind: PluginKind,
    /// The plugin's own version.
    pub version: String,
    /// The plugin-api version it was built against.
    pub api_version: String,
    /// What it does.
    pub description: String,
    /// The in-memory copy it was loaded from (kept open for the life of the process): a child
    /// process of `isolation = "process"` loads the same bytes from it.
    pub memory: std::sync::Arc<std::fs::File>,
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("kind", &self.kind.as_str())
            .finish()
    }
}

/// What happened to one file.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Loaded; the plugin's name.
    Loaded(String),
    /// Loaded, but an earlier directory already provides a plugin of that name.
    Shadowed {
        /// The plugin name.
        name: String,
        /// The file that wins.
        by: PathBuf,
    },
    /// Not loaded; one line for the operator.
    Refused(String),
    /// Not opened: its name says it holds a plugin the running config does not use.
    Unused,
}

impl Verdict {
    /// The word `/plugins`, `metricsd plugins` and `metricsd_plugin_files` use.
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Loaded(_) => "loaded",
            Verdict::Shadowed { .. } => "shadowed",
            Verdict::Refused(_) => "refused",
            Verdict::Unused => "unused",
        }
    }
}

/// One file found in a plugin directory.
#[derive(Debug, Clone)]
pub struct PluginFile {
    /// The file.
    pub path: PathBuf,
    /// SHA-256 of its content, when it could be read.
    pub sha256: Option<String>,
    /// What happened.
    pub verdict: Verdict,
}

/// A refused plugin directory.
#[derive(Debug, Clone)]
pub struct RefusedDir {
    /// The directory.
    pub path: PathBuf,
    /// Why.
    pub reason: String,
}

/// Everything found in the plugin directories.
#[derive(Debug, Default, Clone)]
pub struct PluginSet {
    /// Loaded plugins by name (first directory wins).
    pub plugins: BTreeMap<String, Plugin>,
    /// Every file looked at, in search order.
    pub files: Vec<PluginFile>,
    /// Directories that were refused.
    pub refused_dirs: Vec<RefusedDir>,
    /// The directories searched, in order.
    pub dirs: Vec<PathBuf>,
}

impl PluginSet {
    /// The plugin of that name.
    pub fn get(&self, name: &str) -> Option<&Plugin> {
        self.plugins.get(name)
    }

    /// Why no plugin of that name is available, in words for the operator.
    pub fn why_missing(&self, name: &str) -> String {
        let known: Vec<&str> = self.plugins.keys().map(String::as_str).collect();
        let hint = crate::config::did_you_mean(name, &known);
        let refused = self
            .files
            .iter()
            .filter(|f| matches!(f.verdict, Verdict::Refused(_)))
            .count();
        let mut text = format!(
            "no plugin named `{name}` in {}{hint}",
            display_dirs(&self.dirs)
        );
        if !known.is_empty() {
            text.push_str(&format!("; found: {}", known.join(", ")));
        }
        // A refused file whose name says it holds this plugin is most likely the one meant.
        let meant: Vec<String> = self
            .files
            .iter()
            .filter_map(|f| match &f.verdict {
                Verdict::Refused(why) if conventional_name(&f.path) == Some(name) => {
                    Some(format!("{} was refused: {why}", f.path.display()))
                }
                _ => None,
            })
            .collect();
        if !meant.is_empty() {
            text.push_str(&format!("; {}", meant.join("; ")));
        }
        let others = refused - meant.len();
        if others > 0 {
            text.push_str(&format!(
                "; {others} {}file(s) were refused, see `metricsd plugins`",
                if meant.is_empty() { "" } else { "other " }
            ));
        }
        text
    }
}

fn display_dirs(dirs: &[PathBuf]) -> String {
    if dirs.is_empty() {
        return "no plugin directory".to_string();
    }
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The plugin directories in search order: `METRICSD_PLUGIN_PATH` (colon-separated), the
/// config's `agent.plugin_path`, the executable's directory, `/usr/lib/metricsd/plugins`.
/// Directories that do not exist are left out; duplicates are removed.
pub fn search_dirs(env_path: Option<&str>, configured: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(list) = env_path {
        dirs.extend(list.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
    }
    dirs.extend(configured.iter().cloned());
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        dirs.push(exe_dir);
    }
    dirs.push(PathBuf::from(SYSTEM_PLUGIN_DIR));
    let mut unique: Vec<PathBuf> = Vec::new();
    for d in dirs {
        let canonical = d.canonicalize().unwrap_or(d);
        if canonical.is_dir() && !unique.contains(&canonical) {
            unique.push(canonical);
        }
    }
    unique
}

/// Why a file (or a directory on its path) that the agent is about to run code from is not
/// to be trusted: owned by another user than root or the agent's own, or writable by its group
/// or every user. A root-owned directory with the sticky bit (`/tmp`) is trusted as a
/// directory: others can add entries to it but not replace the ones they do not own.
fn untrusted(meta: &std::fs::Metadata, path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let mode = meta.mode();
    let owner = meta.uid();
    let me = nix::unistd::geteuid().as_raw();
    if owner != 0 && owner != me {
        return Some(format!(
            "{} is owned by user {owner}, not by root or the agent's user ({me}): its owner could replace the code the agent runs; `chown root {}`",
            path.display(),
            path.display()
        ));
    }
    if meta.is_dir() && owner == 0 && mode & 0o1000 != 0 {
        return None;
    }
    let by = if mode & 0o002 != 0 {
        "every user"
    } else if mode & 0o020 != 0 {
        "its group"
    } else {
        return None;
    };
    Some(format!(
        "{} is writable by {by} (mode {:o}); loading it would run code others can replace: `chmod go-w {}`",
        path.display(),
        mode & 0o7777,
        path.display()
    ))
}

/// A plugin file read once, through one descriptor, after the checks that make its content
/// the operator's: the bytes that are hashed are the bytes that are loaded.
struct CheckedFile {
    bytes: Vec<u8>,
    sha256: String,
}

/// Opens `path` once and checks it: every directory on its resolved path and the file itself
/// (through the open descriptor) are owned by root or the agent's user and not writable by
/// others; the file is a regular file. Then reads and hashes it.
fn read_checked(path: &Path) -> Result<CheckedFile, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let cannot = |e: std::io::Error| format!("{}: cannot be read: {e}", path.display());
    let resolved = path.canonicalize().map_err(cannot)?;
    for dir in resolved.ancestors().skip(1) {
        let meta = std::fs::metadata(dir).map_err(cannot)?;
        if let Some(why) = untrusted(&meta, dir) {
            let via = if resolved == path {
                String::new()
            } else {
                format!(" (it resolves to {})", resolved.display())
            };
            return Err(format!("{}{via}: directory {why}", path.display()));
        }
    }
    // No symlink is followed from here: the resolved path's directories cannot change under
    // us (no one else can write them), and the last component is opened without following.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&resolved)
        .map_err(cannot)?;
    let meta = file.metadata().map_err(cannot)?;
    if !meta.is_file() {
        return Err(format!("{}: not a regular file", path.display()));
    }
    if let Some(why) = untrusted(&meta, &resolved) {
        return Err(why);
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.read_to_end(&mut bytes).map_err(cannot)?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    Ok(CheckedFile { bytes, sha256 })
}

/// Turns abi_stable's error into one line that names the file and what to do.
pub fn describe_library_error(path: &Path, err: &LibraryError) -> String {
    let file = path.display();
    match err {
        LibraryError::OpenError { err, .. } => {
            let detail = err.to_string();
            // dlerror repeats the path; keep what follows it.
            let detail = detail
                .rsplit_once(": ")
                .map(|(_, tail)| tail.to_string())
                .unwrap_or(detail);
            format!("{file}: cannot be opened as a shared library ({detail})")
        }
        LibraryError::GetSymbolError { .. } => format!(
            "{file}: not a metricsd plugin (it exports no metricsd plugin module; build it with metricsd_plugin_api::export_plugin!)"
        ),
        LibraryError::InvalidAbiHeader(_) => format!(
            "{file}: built with an incompatible abi_stable version; rebuild it against metricsd-plugin-api {API_VERSION}"
        ),
        LibraryError::IncompatibleVersionNumber {
            expected_version,
            actual_version,
            ..
        } => format!(
            "{file}: built for plugin API {actual_version}, this host has {expected_version}; rebuild it against metricsd-plugin-api {API_VERSION}"
        ),
        LibraryError::AbiInstability(_) => format!(
            "{file}: its plugin interface layout differs from this host's; rebuild it against metricsd-plugin-api {API_VERSION}"
        ),
        LibraryError::ParseVersionError(e) => {
            format!("{file}: declares an unreadable plugin API version ({e})")
        }
        LibraryError::RootModule { err, .. } => {
            format!("{file}: the plugin failed to initialise: {err}")
        }
        LibraryError::InvalidCAbi { .. } => format!(
            "{file}: built by a Rust compiler with a different C ABI; rebuild it against metricsd-plugin-api {API_VERSION}"
        ),
        LibraryError::Many(errors) => match errors.iter().next() {
            Some(first) => describe_library_error(path, first),
            None => format!("{file}: cannot be loaded"),
        },
    }
}

/// What loading one content gave, kept for the life of the process: libraries are never
/// unloaded, so the same bytes found again (a reload, a copy under another name) reuse the
/// library instead of mapping another copy.
#[derive(Clone)]
struct Loaded {
    module: PluginModuleRef,
    info: (String, PluginKind, String, String, String),
    memory: std::sync::Arc<std::fs::File>,
}

type LoadCache = BTreeMap<String, Result<Loaded, (PathBuf, String)>>;

/// The in-memory copies whose library is mapped (even one refused after mapping): never
/// closed, see [`open_in_memory`].
static RETAINED: std::sync::Mutex<Vec<std::sync::Arc<std::fs::File>>> =
    std::sync::Mutex::new(Vec::new());

/// Opens the plugin library at `library` (an in-memory copy's `/proc/self/fd/N`) through
/// abi_stable's checks; errors name `path`. `Err((true, _))`: it could not even be mapped.
pub fn open_module(path: &Path, library: &Path) -> Result<PluginModuleRef, (bool, String)> {
    let header = lib_header_from_path(library).map_err(|e| {
        tracing::debug!(file = %path.display(), "plugin load error detail: {e}");
        (
            matches!(e, LibraryError::OpenError { .. }),
            describe_library_error(path, &e),
        )
    })?;
    header.init_root_module::<PluginModuleRef>().map_err(|e| {
        // The layout dump of AbiInstability is long: debug level only.
        tracing::debug!(file = %path.display(), "plugin load error detail: {e}");
        (false, describe_library_error(path, &e))
    })
}

static LOADED: std::sync::Mutex<LoadCache> = std::sync::Mutex::new(BTreeMap::new());

/// Loads a plugin from `bytes` read from `path` whose SHA-256 is `sha256` (no permission or
/// digest checks: see [`scan`]). The bytes are copied into an anonymous memory file
/// (`memfd_create`) and the library is opened from there, so the file on disk can be replaced
/// or rewritten at any time without touching the running code, and a changed file is loaded
/// as a new library (the old one stays mapped).
fn load_bytes(path: &Path, bytes: &[u8], sha256: &str) -> Result<Plugin, String> {
    let mut cache = LOADED.lock().unwrap_or_else(|p| p.into_inner());
    let loaded = match cache.get(sha256) {
        Some(known) => known.clone(),
        None => {
            let loaded = open_in_memory(path, bytes).map_err(|e| (path.to_path_buf(), e));
            cache.insert(sha256.to_string(), loaded.clone());
            loaded
        }
    };
    drop(cache);
    match loaded {
        Ok(Loaded {
            module,
            info: (name, kind, version, api_version, description),
            memory,
        }) => Ok(Plugin {
            path: path.to_path_buf(),
            module,
            name,
            kind,
            version,
            api_version,
            description,
            memory,
        }),
        // The same content under another name: the same refusal, naming this file.
        Err((first, why)) => {
            Err(why.replace(&first.display().to_string(), &path.display().to_string()))
        }
    }
}

fn open_in_memory(path: &Path, bytes: &[u8]) -> Result<Loaded, String> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| std::ffi::CString::new(n).ok())
        .unwrap_or_else(|| c"metricsd-plugin".to_owned());
    let cannot =
        |e: &dyn fmt::Display| format!("{}: cannot create an in-memory copy: {e}", path.display());
    use nix::sys::memfd::MemFdCreateFlag;
    let memory = nix::sys::memfd::memfd_create(
        &name,
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )
    .map_err(|e| cannot(&e))?;
    let mut copy = std::fs::File::from(memory);
    copy.write_all(bytes).map_err(|e| cannot(&e))?;
    // Sealed: no one (a child process of `isolation = "process"` included) can change the
    // copy that the agent and its children run.
    {
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        let seals = SealFlag::F_SEAL_WRITE
            | SealFlag::F_SEAL_SHRINK
            | SealFlag::F_SEAL_GROW
            | SealFlag::F_SEAL_SEAL;
        fcntl(copy.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals)).map_err(|e| cannot(&e))?;
    }
    let in_memory = PathBuf::from(format!("/proc/self/fd/{}", copy.as_raw_fd()));
    let memory = std::sync::Arc::new(copy);
    let opened = open_module(path, &in_memory);
    if !matches!(&opened, Err((true, _))) {
        // The library is mapped under this descriptor's path; the descriptor stays open so
        // that no later library gets the same path (the dynamic loader would hand back this
        // one): the cache of loaded libraries keeps it, for the life of the process.
        RETAINED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(std::sync::Arc::clone(&memory));
    }
    let module = opened.map_err(|(_, why)| why)?;
    let info: PluginInfo = (module.info())();
    let kind = info.kind;
    if kind != PluginKind::COLLECTOR && kind != PluginKind::SINK {
        return Err(format!(
            "{}: declares an unknown plugin kind {}; this host knows collectors and sinks",
            path.display(),
            kind.0
        ));
    }
    Ok(Loaded {
        module,
        memory,
        info: (
            info.name.to_string(),
            kind,
            info.version.to_string(),
            info.api_version.to_string(),
            info.description.to_string(),
        ),
    })
}

/// Reads, checks and loads one plugin file (no digest check: see [`scan`]).
pub fn load_file(path: &Path) -> Result<Plugin, String> {
    let checked = read_checked(path)?;
    load_bytes(path, &checked.bytes, &checked.sha256)
}

fn is_plugin_candidate(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "so")
        && path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| !n.starts_with('.'))
}

/// The plugin a file holds by the naming convention: `libmetricsd_<name>.so`,
/// `lib<name>.so` or `<name>.so`.
pub fn conventional_name(path: &Path) -> Option<&str> {
    let stem = path.file_stem()?.to_str()?;
    let stem = stem.strip_prefix("lib").unwrap_or(stem);
    Some(stem.strip_prefix("metricsd_").unwrap_or(stem))
}

/// Scans the directories and loads the plugin files that pass the checks: every one with
/// `needed = None` (`metricsd plugins`), otherwise only what those plugin names need.
///
/// Loading a `.so` runs its code and maps it into memory for good, so with a set of needed
/// names a file whose name follows [`conventional_name`] for a plugin not needed (or one an
/// earlier file already provides) is left unopened (`Verdict::Unused`). If a needed plugin
/// is still missing after that, every file left unopened is loaded too: a plugin's file name
/// is only a convention, and an operator looking for a missing plugin wants every refusal.
pub fn scan(
    dirs: &[PathBuf],
    allowed_sha256: &[String],
    needed: Option<&BTreeSet<String>>,
) -> PluginSet {
    let allowed: Vec<String> = allowed_sha256.iter().map(|d| d.to_lowercase()).collect();
    let mut set = PluginSet {
        dirs: dirs.to_vec(),
        ..PluginSet::default()
    };
    let mut candidates: Vec<PathBuf> = Vec::new();
    for dir in dirs {
        match std::fs::metadata(dir).map(|meta| untrusted(&meta, dir)) {
            Ok(Some(why)) => {
                let reason = format!("plugin directory {why}");
                tracing::error!("{reason}");
                set.refused_dirs.push(RefusedDir {
                    path: dir.clone(),
                    reason,
                });
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                set.refused_dirs.push(RefusedDir {
                    path: dir.clone(),
                    reason: format!("plugin directory {} cannot be read: {e}", dir.display()),
                });
                continue;
            }
        }
        let mut entries: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_plugin_candidate(p) && p.is_file())
                .collect(),
            Err(e) => {
                set.refused_dirs.push(RefusedDir {
                    path: dir.clone(),
                    reason: format!("plugin directory {} cannot be read: {e}", dir.display()),
                });
                continue;
            }
        };
        entries.sort();
        candidates.extend(entries);
    }
    let mut verdicts: Vec<Option<PluginFile>> = vec![None; candidates.len()];
    for (path, verdict) in candidates.iter().zip(verdicts.iter_mut()) {
        let skip = needed.is_some_and(|needed| {
            conventional_name(path)
                .is_some_and(|name| !needed.contains(name) || set.plugins.contains_key(name))
        });
        if !skip {
            *verdict = Some(check_and_load(path, &allowed, &mut set.plugins));
        }
    }
    if needed.is_some_and(|needed| needed.iter().any(|name| !set.plugins.contains_key(name))) {
        for (path, verdict) in candidates.iter().zip(verdicts.iter_mut()) {
            if verdict.is_none() {
                *verdict = Some(check_and_load(path, &allowed, &mut set.plugins));
            }
        }
    }
    set.files = candidates
        .iter()
        .zip(verdicts)
        .map(|(path, verdict)| {
            verdict.unwrap_or_else(|| PluginFile {
                path: path.clone(),
                sha256: None,
                verdict: Verdict::Unused,
            })
        })
        .collect();
    set
}

/// [`check_file`], with a refusal logged.
fn check_and_load(
    path: &Path,
    allowed: &[String],
    plugins: &mut BTreeMap<String, Plugin>,
) -> PluginFile {
    let file = check_file(path, allowed, plugins);
    if let Verdict::Refused(reason) = &file.verdict {
        tracing::warn!("plugin refused: {reason}");
    }
    file
}

fn check_file(
    path: &Path,
    allowed: &[String],
    plugins: &mut BTreeMap<String, Plugin>,
) -> PluginFile {
    let refused = |sha256: Option<String>, reason: String| PluginFile {
        path: path.to_path_buf(),
        sha256,
        verdict: Verdict::Refused(reason),
    };
    let checked = match read_checked(path) {
        Ok(c) => c,
        Err(why) => return refused(None, why),
    };
    let sha256 = checked.sha256.clone();
    if !allowed.is_empty() && !allowed.contains(&sha256) {
        return refused(
            Some(sha256.clone()),
            format!(
                "{}: its SHA-256 {sha256} is not in agent.plugin_sha256",
                path.display()
            ),
        );
    }
    match load_bytes(path, &checked.bytes, &checked.sha256) {
        Ok(plugin) => {
            let name = plugin.name.clone();
            let verdict = match plugins.get(&name) {
                Some(first) => Verdict::Shadowed {
                    name,
                    by: first.path.clone(),
                },
                None => {
                    tracing::debug!(
                        file = %path.display(),
                        "loaded {} plugin `{name}` {}",
                        plugin.kind.as_str(),
                        plugin.version
                    );
                    plugins.insert(name.clone(), plugin);
                    Verdict::Loaded(name)
                }
            };
            PluginFile {
                path: path.to_path_buf(),
                sha256: Some(sha256),
                verdict,
            }
        }
        Err(reason) => refused(Some(sha256), reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_plugin_names_the_refused_file_that_would_have_provided_it() {
        let file = |path: &str, why: &str| PluginFile {
            path: PathBuf::from(path),
            sha256: None,
            verdict: Verdict::Refused(why.to_string()),
        };
        let set = PluginSet {
            files: vec![
                file(
                    "/p/libmetricsd_acme.so",
                    "/p/libmetricsd_acme.so: group-writable",
                ),
                file(
                    "/p/libmetricsd_other.so",
                    "/p/libmetricsd_other.so: not a plugin",
                ),
            ],
            dirs: vec![PathBuf::from("/p")],
            ..PluginSet::default()
        };
        let text = set.why_missing("acme");
        assert!(
            text.contains(
                "/p/libmetricsd_acme.so was refused: /p/libmetricsd_acme.so: group-writable"
            ),
            "{text}"
        );
        assert!(text.contains("1 other file(s) were refused"), "{text}");
        let text = set.why_missing("zzz");
        assert!(text.contains("; 2 file(s) were refused"), "{text}");
        assert!(!text.contains("was refused:"), "{text}");
    }

    #[test]
    fn conventional_names() {
        for (file, name) in [
            ("/p/libmetricsd_remote_write.so", "remote_write"),
            ("/p/libacme.so", "acme"),
            ("/p/acme-gpu.so", "acme-gpu"),
            ("/p/metricsd_x.so", "x"),
        ] {
            assert_eq!(conventional_name(Path::new(file)), Some(name), "{file}");
        }
    }
}
