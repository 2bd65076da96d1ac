//! The agent's own `process_*` metrics, named and typed as every Prometheus client library
//! exposes them: CPU seconds, resident and virtual memory, open and maximum file descriptors,
//! start time and threads. Read from `/proc/self` (parsed by the `procfs` crate) each time the
//! registry is gathered, so a descriptor leak or a memory spike is visible in Prometheus.
//!
//! The three `/proc/self` files are opened once and read again from the start each time: the
//! metrics keep working when the process is out of descriptors, which is when they matter.
//!
//! Written here rather than taken from `prometheus`'s `process` feature: that collector counts
//! CPU time in whole seconds, which makes `rate(process_cpu_seconds_total[5m])` of an agent
//! that uses a fraction of a core mostly 0.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::sync::Mutex;

use procfs::FromRead;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Counter, Gauge, IntGauge, Opts};

/// The `process_*` metrics of this process.
pub struct ProcessMetrics {
    cpu: Counter,
    resident: IntGauge,
    virtual_memory: IntGauge,
    open_fds: IntGauge,
    max_fds: IntGauge,
    start_time: Gauge,
    threads: IntGauge,
    /// The open `/proc/self` files; also serialises refreshes (the CPU counter is advanced by
    /// the difference to the last reading).
    files: Mutex<Files>,
}

/// `/proc/self/stat`, `/proc/self/limits` and the `/proc/self/fd` directory, held open.
#[derive(Default)]
struct Files {
    stat: Option<File>,
    limits: Option<File>,
    fds: Option<nix::dir::Dir>,
}

impl Files {
    fn open() -> Self {
        use nix::fcntl::OFlag;
        Self {
            stat: File::open("/proc/self/stat").ok(),
            limits: File::open("/proc/self/limits").ok(),
            fds: nix::dir::Dir::open(
                "/proc/self/fd",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .ok(),
        }
    }
}

/// The whole of a held `/proc` file, read again from its start.
fn reread(file: &mut Option<File>) -> Option<Vec<u8>> {
    let f = file.as_mut()?;
    let mut text = Vec::with_capacity(1024);
    f.seek(SeekFrom::Start(0)).ok()?;
    f.read_to_end(&mut text).ok()?;
    Some(text)
}

/// A metric whose definition is a constant, so creating it cannot fail.
fn metric<M>(new: fn(Opts) -> prometheus::Result<M>, name: &str, help: &str) -> M {
    new(Opts::new(name, help)).expect("valid metric definition")
}

impl ProcessMetrics {
    /// The metrics, with the start time read once.
    pub fn new() -> Self {
        let m = Self {
            cpu: metric(
                Counter::with_opts,
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
            ),
            resident: metric(
                IntGauge::with_opts,
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
            ),
            virtual_memory: metric(
                IntGauge::with_opts,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
            ),
            open_fds: metric(
                IntGauge::with_opts,
                "process_open_fds",
                "Number of open file descriptors.",
            ),
            max_fds: metric(
                IntGauge::with_opts,
                "process_max_fds",
                "Maximum number of open file descriptors (the soft limit).",
            ),
            start_time: metric(
                Gauge::with_opts,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
            ),
            threads: metric(
                IntGauge::with_opts,
                "process_threads",
                "Number of OS threads in the process.",
            ),
            files: Mutex::new(Files::open()),
        };
        if let (Ok(me), Ok(boot)) = (procfs::process::Process::myself(), procfs::boot_time_secs()) {
            if let Ok(stat) = me.stat() {
                let ticks = procfs::ticks_per_second().max(1) as f64;
                m.start_time
                    .set(boot as f64 + stat.starttime as f64 / ticks);
            }
        }
        m
    }

    /// Reads `/proc/self` into the metrics; a file that cannot be read leaves its metrics at
    /// their last value.
    fn update(&self) {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let stat = reread(&mut files.stat)
            .and_then(|text| procfs::process::Stat::from_read(text.as_slice()).ok());
        if let Some(stat) = stat {
            let ticks = procfs::ticks_per_second().max(1) as f64;
            let cpu = (stat.utime + stat.stime) as f64 / ticks;
            let delta = cpu - self.cpu.get();
            if delta > 0.0 {
                self.cpu.inc_by(delta);
            }
            let page = i64::try_from(procfs::page_size()).unwrap_or(4096);
            self.resident.set(
                i64::try_from(stat.rss)
                    .unwrap_or(i64::MAX)
                    .saturating_mul(page),
            );
            self.virtual_memory
                .set(i64::try_from(stat.vsize).unwrap_or(i64::MAX));
            self.threads.set(stat.num_threads);
        }
        if let Some(dir) = files.fds.as_mut() {
            // Every entry but `.` and `..`; the iterator rewinds the directory when dropped.
            let n = dir
                .iter()
                .filter_map(Result::ok)
                .filter(|e| !matches!(e.file_name().to_bytes(), b"." | b".."))
                .count();
            self.open_fds.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let limits = reread(&mut files.limits)
            .and_then(|text| procfs::process::Limits::from_read(text.as_slice()).ok());
        if let Some(limits) = limits {
            let max = match limits.max_open_files.soft_limit {
                procfs::process::LimitValue::Value(v) => i64::try_from(v).unwrap_or(i64::MAX),
                procfs::process::LimitValue::Unlimited => i64::MAX,
            };
            self.max_fds.set(max);
        }
    }
}

impl Default for ProcessMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&Desc> {
        [
            self.cpu.desc(),
            self.resident.desc(),
            self.virtual_memory.desc(),
            self.open_fds.desc(),
            self.max_fds.desc(),
            self.start_time.desc(),
            self.threads.desc(),
        ]
        .concat()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.update();
        [
            self.cpu.collect(),
            self.resident.collect(),
            self.virtual_memory.collect(),
            self.open_fds.collect(),
            self.max_fds.collect(),
            self.start_time.collect(),
            self.threads.collect(),
        ]
        .concat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let m = ProcessMetrics::new();
        let file = std::fs::File::open("/proc/self/status").expect("open");
        let families = m.collect();
        let value = |name: &str| {
            let f = families
                .iter()
                .find(|f| f.name() == name)
                .unwrap_or_else(|| panic!("{name} missing"));
            let metric = &f.get_metric()[0];
            if f.get_field_type() == prometheus::proto::MetricType::COUNTER {
                metric.get_counter().get_value()
            } else {
                metric.get_gauge().get_value()
            }
        };
        assert_eq!(families.len(), 7);
        let open_now = value("process_open_fds");
        drop(file);
        assert!(
            open_now >= 4.0,
            "stdin, stdout, stderr and the file: {open_now}"
        );
        assert!(value("process_max_fds") >= open_now);
        assert!(value("process_resident_memory_bytes") > 1_000_000.0);
        assert!(value("process_virtual_memory_bytes") >= value("process_resident_memory_bytes"));
        assert!(value("process_threads") >= 1.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        let start = value("process_start_time_seconds");
        assert!(
            start > now - 3600.0 && start <= now + 1.0,
            "{start} vs {now}"
        );
        // Busy for a moment: the CPU counter moves in fractions of a second, not whole ones.
        let spin = std::time::Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        std::hint::black_box(x);
        let families = m.collect();
        let cpu = families
            .iter()
            .find(|f| f.name() == "process_cpu_seconds_total")
            .map(|f| f.get_metric()[0].get_counter().get_value())
            .expect("cpu");
        assert!(cpu > 0.0 && cpu.fract() != 0.0, "cpu seconds {cpu}");
    }
}
