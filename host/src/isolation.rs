//! `isolation = "process"`: a collector instance whose plugin runs in a child process.
//!
//! The child is this binary in its runner mode ([`RUNNER_ARG`], started as `/proc/self/exe`,
//! so an upgraded binary on disk does not matter). Its standard input is the plugin's
//! in-memory copy that the agent checked and loaded (the child loads exactly those bytes from
//! `/proc/self/fd/0`); its standard output is one end of a Unix socket pair, over which the two
//! exchange frames: `[u32 little-endian length][postcard message]`. The agent sends `Create`,
//! then `Collect` per tick and `Close`; the child answers each with `Created` / `Failed` /
//! `Batch` (the same [`Batch`] the ABI carries), and sends the plugin's log records as `Log`
//! whenever they happen. The child's standard error is the agent's.
//!
//! A child that dies (SIGSEGV, `abort()`, a plugin built to abort, a library that kills its
//! process) ends the socket: the call returns [`CollectError::Crashed`] naming the signal, the
//! scheduler counts it and starts a new child after the back-off. A call past its timeout gets
//! the child killed ([`Killer`]), which in-process mode cannot do.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use abi_stable::std_types::{RResult, RStr};
use metricsd_plugin_api::abi::{CollectorBox, HostLogger, InstanceArgs};
use metricsd_plugin_api::{Batch, ErrorKind, LogLevel, PluginError};
use serde::{Deserialize, Serialize};

use crate::loader::Plugin;

/// The first argument that makes `metricsd` a plugin runner (not for operators).
pub const RUNNER_ARG: &str = "__plugin-runner";

/// Largest frame accepted: a batch of a few million samples; more is a broken peer.
const MAX_FRAME: usize = 1 << 30;

#[derive(Serialize, Deserialize)]
enum ToChild {
    Create {
        instance: String,
        config_json: String,
        max_level: u8,
    },
    Collect,
    Close,
}

#[derive(Serialize, Deserialize)]
enum FromChild {
    Created,
    Failed {
        kind: u8,
        message: String,
    },
    Batch(Batch),
    Log {
        level: u8,
        target: String,
        message: String,
    },
}

/// Writes one frame, encoded in `buf` (kept by the caller: a batch of the same size next time
/// is encoded without growing it again).
fn write_frame(
    out: &mut impl Write,
    message: &impl Serialize,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    let mut frame = std::mem::take(buf);
    frame.clear();
    frame.extend_from_slice(&[0; 4]);
    let mut frame = postcard::to_extend(message, frame).map_err(std::io::Error::other)?;
    let len = u32::try_from(frame.len() - 4).map_err(std::io::Error::other)?;
    frame[..4].copy_from_slice(&len.to_le_bytes());
    let written = out.write_all(&frame);
    *buf = frame;
    written
}

/// One frame; `Ok(None)` at the end of the stream.
fn read_frame<T: for<'de> Deserialize<'de>>(
    input: &mut impl Read,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other(format!(
            "a frame of {len} bytes, more than {MAX_FRAME}"
        )));
    }
    buf.resize(len, 0);
    input.read_exact(buf)?;
    postcard::from_bytes(buf)
        .map(Some)
        .map_err(std::io::Error::other)
}

/// Why a collection gave no batch.
#[derive(Debug)]
pub enum CollectError {
    /// The plugin returned an error (or panicked, caught by the SDK).
    Plugin(PluginError),
    /// The plugin's process died or was killed.
    Crashed {
        /// For the crash counter: the signal's name (`SIGSEGV`, `SIGABRT`, ...), `timeout`
        /// (killed past the call's timeout), `exit` or `protocol`.
        cause: &'static str,
        /// What happened, for the operator.
        message: String,
    },
}

/// Kills a child whose call is past its timeout.
#[derive(Clone)]
pub struct Killer {
    pid: nix::unistd::Pid,
    killed: Arc<AtomicBool>,
    /// Set (under the lock) once the child is reaped: its pid may then belong to another
    /// process, which must never get the signal.
    reaped: Arc<Mutex<bool>>,
}

impl Killer {
    /// Kills the child (SIGKILL); the call in flight then ends as [`CollectError::Crashed`].
    pub fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        let reaped = self.reaped.lock().unwrap_or_else(|p| p.into_inner());
        if !*reaped {
            let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// A collector instance: in the agent's process, or in a child process.
pub enum Collector {
    /// Called through the ABI in this process.
    InProcess(CollectorBox),
    /// Called over the socket of its child process.
    Process(ChildCollector),
}

impl Collector {
    /// Collects once.
    pub fn collect(&mut self) -> Result<Batch, CollectError> {
        match self {
            Collector::InProcess(instance) => instance
                .collect()
                .into_result()
                .map_err(CollectError::Plugin),
            Collector::Process(child) => child.collect(),
        }
    }

    /// Closes the instance before it is dropped.
    pub fn close(&mut self) {
        match self {
            Collector::InProcess(instance) => instance.close(),
            Collector::Process(child) => child.close(),
        }
    }

    /// What kills the call in flight, for a child process.
    pub fn killer(&self) -> Option<Killer> {
        match self {
            Collector::InProcess(_) => None,
            Collector::Process(child) => Some(child.killer.clone()),
        }
    }
}

/// The agent's side of one child process.
pub struct ChildCollector {
    instance: String,
    child: Child,
    socket: UnixStream,
    killer: Killer,
    /// Frames read, and frames written: kept, so a collection allocates neither.
    buf: Vec<u8>,
    out: Vec<u8>,
    timeout: Duration,
}

/// Starts a child process for `plugin` and creates the instance in it (`timeout` for that).
/// `runner`: the executable to start (`/proc/self/exe` but in benchmarks).
pub fn spawn_collector(
    plugin: &Plugin,
    instance: &str,
    config_json: &str,
    timeout: Duration,
    runner: &Path,
) -> Result<ChildCollector, (bool, String)> {
    let what = format!("collector `{instance}` (plugin `{}`)", plugin.name);
    let failed = |e: std::io::Error| (false, format!("{what}: cannot start its process: {e}"));
    let (ours, theirs) = UnixStream::pair().map_err(failed)?;
    let library = plugin.memory.try_clone().map_err(failed)?;
    let child = Command::new(runner)
        .arg(RUNNER_ARG)
        .arg(instance)
        .stdin(Stdio::from(library))
        .stdout(Stdio::from(OwnedFd::from(theirs)))
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(failed)?;
    let killer = Killer {
        pid: nix::unistd::Pid::from_raw(child.id() as i32),
        killed: Arc::new(AtomicBool::new(false)),
        reaped: Arc::new(Mutex::new(false)),
    };
    let mut collector = ChildCollector {
        instance: instance.to_string(),
        child,
        socket: ours,
        killer,
        buf: Vec::new(),
        out: Vec::new(),
        timeout,
    };
    let create = ToChild::Create {
        instance: instance.to_string(),
        config_json: config_json.to_string(),
        max_level: crate::plugin_log::host_logger().max_level.0,
    };
    // Creating gets its own deadline: a child stuck in `new` is killed.
    let _ = collector.socket.set_read_timeout(Some(timeout));
    let answer = write_frame(&mut collector.socket, &create, &mut collector.out)
        .and_then(|()| collector.answer())
        .map_err(|e| collector.died(e).1);
    let _ = collector.socket.set_read_timeout(None);
    match answer {
        Ok(FromChild::Created) => Ok(collector),
        Ok(FromChild::Failed { kind, message }) => {
            let config = ErrorKind(kind) == ErrorKind::CONFIG;
            let message = if config {
                format!("{what}: {message}")
            } else {
                format!("{what}: {} error: {message}", ErrorKind(kind).as_str())
            };
            Err((config, message))
        }
        Ok(_) => Err((false, format!("{what}: its process answered out of turn"))),
        Err(why) => Err((false, format!("{what}: {why}"))),
    }
}

impl ChildCollector {
    /// The next answer; log records on the way are handed to the agent's log.
    fn answer(&mut self) -> std::io::Result<FromChild> {
        loop {
            match read_frame::<FromChild>(&mut self.socket, &mut self.buf)? {
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "its process closed the connection",
                    ))
                }
                Some(FromChild::Log {
                    level,
                    target,
                    message,
                }) => {
                    crate::plugin_log::deliver(&self.instance, LogLevel(level), &target, &message)
                }
                Some(answer) => return Ok(answer),
            }
        }
    }

    /// What became of the child after the connection failed with `error`: killed and reaped;
    /// the cause for the counter, and a description for the operator.
    fn died(&mut self, error: std::io::Error) -> (&'static str, String) {
        let timed_out = matches!(
            error.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        );
        // Give a dying child a moment to be reaped with its real cause, then make sure.
        let patience = if timed_out { 0 } else { 50 };
        let status = match self.reap(patience) {
            Ok(s) => s,
            Err(e) => return ("lost", format!("its process is lost ({e})")),
        };
        if timed_out || self.killer.killed.load(Ordering::Acquire) {
            return (
                "timeout",
                format!(
                    "its process was killed: the call did not finish within {}",
                    humantime::format_duration(self.timeout)
                ),
            );
        }
        describe_exit(status, &error)
    }

    /// Waits for the child to end, polling `patience` times 2 ms, then kills it; marks it
    /// reaped for the [`Killer`].
    fn reap(&mut self, patience: u32) -> std::io::Result<ExitStatus> {
        for _ in 0..patience {
            let mut reaped = self.killer.reaped.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(status) = self.child.try_wait()? {
                *reaped = true;
                return Ok(status);
            }
            drop(reaped);
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut reaped = self.killer.reaped.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self.child.kill();
        let status = self.child.wait();
        *reaped = true;
        status
    }

    /// Collects once in the child.
    pub fn collect(&mut self) -> Result<Batch, CollectError> {
        let answer = write_frame(&mut self.socket, &ToChild::Collect, &mut self.out)
            .and_then(|()| self.answer());
        match answer {
            Ok(FromChild::Batch(batch)) => Ok(batch),
            Ok(FromChild::Failed { kind, message }) => Err(CollectError::Plugin(PluginError {
                kind: ErrorKind(kind),
                message: message.into(),
                retry_after_ms: abi_stable::std_types::ROption::RNone,
            })),
            Ok(_) => Err(CollectError::Crashed {
                cause: "protocol",
                message: "its process answered out of turn".to_string(),
            }),
            Err(e) => {
                let (cause, message) = self.died(e);
                Err(CollectError::Crashed { cause, message })
            }
        }
    }

    fn close(&mut self) {
        if write_frame(&mut self.socket, &ToChild::Close, &mut self.out).is_ok() {
            let _ = self.socket.set_read_timeout(Some(Duration::from_secs(1)));
            // Log records the plugin writes while closing still reach the log.
            let _ = self.answer();
        }
    }
}

impl Drop for ChildCollector {
    fn drop(&mut self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        // A child that does not leave on end of input within a second is killed.
        let _ = self.reap(500);
    }
}

/// `("SIGSEGV", "its process was killed by signal SIGSEGV (11)")`, `("exit", "its process
/// exited with status 3 (…)")`.
fn describe_exit(status: ExitStatus, error: &std::io::Error) -> (&'static str, String) {
    if let Some(signal) = status.signal() {
        let (cause, name) = match nix::sys::signal::Signal::try_from(signal) {
            Ok(s) => (s.as_str(), s.as_str().to_string()),
            Err(_) => ("signal", format!("signal {signal}")),
        };
        let core = if status.core_dumped() {
            ", core dumped"
        } else {
            ""
        };
        (
            cause,
            format!("its process was killed by signal {name} ({signal}{core})"),
        )
    } else {
        match status.code() {
            Some(code) => (
                "exit",
                format!("its process exited with status {code} ({error})"),
            ),
            None => ("exit", format!("its process ended ({error})")),
        }
    }
}

// --- the child's side ------------------------------------------------------------------------

/// Where the child's log records go: the socket, shared with the answers.
static TO_PARENT: Mutex<Option<(UnixStream, Vec<u8>)>> = Mutex::new(None);

fn send(message: &FromChild) -> std::io::Result<()> {
    let mut guard = TO_PARENT.lock().unwrap_or_else(|p| p.into_inner());
    match guard.as_mut() {
        Some((out, buf)) => write_frame(out, message, buf),
        None => Err(std::io::Error::other("no connection")),
    }
}

extern "C" fn log_to_parent(
    _instance: RStr<'_>,
    level: LogLevel,
    target: RStr<'_>,
    message: RStr<'_>,
) {
    // Nothing may unwind back into the plugin; a lost connection loses the record.
    let _ = std::panic::catch_unwind(|| {
        send(&FromChild::Log {
            level: level.0,
            target: target.to_string(),
            message: message.to_string(),
        })
    });
}

/// The runner: `metricsd __plugin-runner INSTANCE` with the plugin's in-memory copy as
/// standard input and the socket as standard output. Returns the exit code.
pub fn child_main() -> u8 {
    // Die with the agent, even when a plugin call never returns.
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    if nix::unistd::getppid() == nix::unistd::Pid::from_raw(1) {
        return 1;
    }
    let instance = std::env::args().nth(2).unwrap_or_default();
    let fail = |why: String| {
        eprintln!("metricsd plugin runner for `{instance}`: {why}");
        1
    };
    let socket = match std::io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => UnixStream::from(fd),
        Err(e) => return fail(format!("no connection to the agent: {e}")),
    };
    let mut input = match socket.try_clone() {
        Ok(s) => s,
        Err(e) => return fail(format!("no connection to the agent: {e}")),
    };
    // The socket is held through its own descriptors now; standard output becomes standard
    // error, so that a plugin's `println!` lands in the agent's log instead of in the frames.
    if let Err(e) = nix::unistd::dup2(2, 1) {
        return fail(format!(
            "cannot point standard output at standard error: {e}"
        ));
    }
    *TO_PARENT.lock().unwrap_or_else(|p| p.into_inner()) = Some((socket, Vec::new()));
    let module =
        match crate::loader::open_module(Path::new(&instance), Path::new("/proc/self/fd/0")) {
            Ok(module) => module,
            Err((_, why)) => {
                let _ = send(&FromChild::Failed {
                    kind: ErrorKind::FATAL.0,
                    message: why.clone(),
                });
                return fail(why);
            }
        };
    let mut buf = Vec::new();
    let mut collector: Option<CollectorBox> = None;
    // Until the agent closes the connection (or is gone).
    while let Ok(Some(request)) = read_frame::<ToChild>(&mut input, &mut buf) {
        let answer = match request {
            ToChild::Create {
                instance,
                config_json,
                max_level,
            } => {
                let args = InstanceArgs {
                    instance: instance.as_str().into(),
                    config_json: config_json.into(),
                    logger: HostLogger {
                        log: log_to_parent,
                        max_level: LogLevel(max_level),
                    },
                };
                match (module.new_collector())(args) {
                    RResult::ROk(created) => {
                        collector = Some(created);
                        FromChild::Created
                    }
                    RResult::RErr(e) => failed(e),
                }
            }
            ToChild::Collect => match collector.as_mut() {
                Some(c) => match c.collect() {
                    RResult::ROk(batch) => FromChild::Batch(batch),
                    RResult::RErr(e) => failed(e),
                },
                None => FromChild::Failed {
                    kind: ErrorKind::FATAL.0,
                    message: "no instance".to_string(),
                },
            },
            ToChild::Close => {
                if let Some(mut c) = collector.take() {
                    c.close();
                }
                let _ = send(&FromChild::Created);
                break;
            }
        };
        if send(&answer).is_err() {
            break;
        }
    }
    0
}

fn failed(e: PluginError) -> FromChild {
    FromChild::Failed {
        kind: e.kind.0,
        message: e.message.into_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metricsd_plugin_api::BatchBuilder;

    #[test]
    fn a_batch_crosses_a_frame_whole_and_an_oversized_frame_is_refused() {
        let mut b = BatchBuilder::new();
        let f = b.gauge("gpu_temperature_celsius", "Temperature.", "celsius");
        b.sample(f, &[("gpu", "0"), ("uuid", "GPU-1")], 61.5);
        b.sample(
            f,
            &[("gpu", "1")],
            f64::from_bits(metricsd_plugin_api::STALE_NAN_BITS),
        );
        let batch = b.finish();
        let mut wire = Vec::new();
        let mut buf = Vec::new();
        write_frame(&mut wire, &FromChild::Batch(batch.clone()), &mut buf).expect("write");
        write_frame(&mut wire, &ToChild::Collect, &mut buf).expect("write");
        let mut input = wire.as_slice();
        let mut buf = Vec::new();
        match read_frame::<FromChild>(&mut input, &mut buf).expect("read") {
            Some(FromChild::Batch(back)) => {
                assert_eq!(back.families, batch.families);
                assert_eq!(back.label_sets, batch.label_sets);
                // NaN payloads (staleness markers) keep their bits.
                let bits: Vec<u64> = back.samples.iter().map(|s| s.value.to_bits()).collect();
                let want: Vec<u64> = batch.samples.iter().map(|s| s.value.to_bits()).collect();
                assert_eq!(bits, want);
            }
            _ => panic!("not a batch"),
        }
        assert!(matches!(
            read_frame::<ToChild>(&mut input, &mut buf),
            Ok(Some(ToChild::Collect))
        ));
        assert!(matches!(
            read_frame::<ToChild>(&mut input, &mut buf),
            Ok(None)
        ));
        let huge = ((MAX_FRAME + 1) as u32).to_le_bytes();
        let err = read_frame::<ToChild>(&mut huge.as_slice(), &mut buf)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("more than"), "{err}");
    }

    #[test]
    fn an_exit_by_signal_names_the_signal() {
        use std::os::unix::process::ExitStatusExt;
        let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        let (cause, text) = describe_exit(ExitStatus::from_raw(11), &eof);
        assert_eq!(cause, "SIGSEGV");
        assert_eq!(text, "its process was killed by signal SIGSEGV (11)");
        let (cause, text) = describe_exit(ExitStatus::from_raw(6 | 0x80), &eof);
        assert_eq!(cause, "SIGABRT");
        assert!(text.ends_with("(6, core dumped)"), "{text}");
        let (cause, text) = describe_exit(ExitStatus::from_raw(3 << 8), &eof);
        assert_eq!(cause, "exit");
        assert!(
            text.starts_with("its process exited with status 3"),
            "{text}"
        );
    }
}
