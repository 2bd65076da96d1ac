//! Helpers for the end-to-end tests: build the binary, the plugin `.so` files and the
//! incompatible fixtures, run `metricsd` as a child process with a config, talk to its
//! listeners, and wait for conditions with deadlines (never fixed sleeps).

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

pub mod scripted;
pub mod servers;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// The main target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn run_cargo(mut cmd: Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo for {what}: {e}"));
    assert!(
        out.status.success(),
        "building {what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds the host and every plugin of the workspace (debug) once per test process; returns
/// the directory holding `metricsd` and the plugin `.so` files.
pub fn build() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let mut cmd = cargo();
            cmd.args(["build", "--workspace", "--lib", "--bins"]);
            run_cargo(cmd, "the workspace");
            target_dir().join("debug")
        })
        .clone()
}

/// Builds the host and every plugin with the optimised `fleet` profile (release code, no LTO)
/// once per test process, for tests that run many agents at once; returns its directory.
pub fn build_optimised() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let profile = std::env::var("METRICSD_E2E_PROFILE").unwrap_or_else(|_| "fleet".into());
            let mut cmd = cargo();
            cmd.args([
                "build",
                "--workspace",
                "--lib",
                "--bins",
                "--profile",
                &profile,
            ]);
            run_cargo(cmd, &format!("the workspace ({profile} profile)"));
            target_dir().join(profile)
        })
        .clone()
}

/// The `metricsd` binary.
pub fn binary() -> PathBuf {
    build().join("metricsd")
}

/// A plugin `.so` of the workspace, e.g. `plugin("hello")` → `libmetricsd_hello.so`.
pub fn plugin(name: &str) -> PathBuf {
    let path = build().join(format!("libmetricsd_{name}.so"));
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// Builds an incompatible fixture plugin (tests/fixtures/NAME) and returns its `.so`.
pub fn fixture(name: &str) -> PathBuf {
    fixture_lib(name, &format!("fixture_{}", name.replace('-', "_")))
}

/// Builds the fixture workspace tests/fixtures/NAME and returns its library `lib`'s `.so`.
pub fn fixture_lib(name: &str, lib: &str) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let dir = root().join("tests/fixtures").join(name);
    // Manifests of crates named `metricsd-plugin-api` are kept as `Cargo.toml.fixture`: a git
    // dependency on this repository makes cargo read every `Cargo.toml` in it, and would pick
    // a fixture's (tests/fixtures/README.md).
    for sub in [dir.clone(), dir.join("plugin-api")] {
        let template = sub.join("Cargo.toml.fixture");
        if template.exists() {
            fs::copy(&template, sub.join("Cargo.toml")).expect("write the fixture's Cargo.toml");
        }
    }
    // Same dependency versions as the main workspace, so compiled artifacts are reused.
    fs::copy(root().join("Cargo.lock"), dir.join("Cargo.lock")).expect("copy Cargo.lock");
    let target = target_dir().join("fixtures");
    let mut cmd = cargo();
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target);
    run_cargo(cmd, &format!("fixture {name}"));
    let path = target.join("debug").join(format!("lib{lib}.so"));
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A free TCP port on 127.0.0.1.
///
/// Ports come from 20000–32767, below Linux's ephemeral range (32768–60999), so that an
/// outgoing connection of another test cannot take the port between this call and the bind of
/// the process it is for; a port is handed out once per test process.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher as _, Hasher as _};
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..10_000 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(handed.len());
        let port = 20_000 + (h.finish() % 12_768) as u16;
        if handed.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed.push(port);
            return port;
        }
    }
    panic!("no free port in 20000-32767")
}

/// Waits until `f` returns `Some`, polling every 50 ms, up to `deadline`.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A directory with a config file, for one test.
pub struct Workdir {
    /// The temporary directory (removed on drop).
    pub dir: tempfile::TempDir,
}

impl Workdir {
    /// A new empty directory.
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// Path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a file and returns its path.
    pub fn write(&self, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path(name);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).expect("mkdir");
        }
        fs::write(&p, content).expect("write");
        p
    }

    /// Runs `metricsd ARGS` to completion with `env`.
    pub fn metricsd(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(binary());
        cmd.args(args).current_dir(self.dir.path());
        clean_env(&mut cmd);
        cmd.envs(env.iter().copied());
        cmd.output().expect("run metricsd")
    }
}

impl Default for Workdir {
    fn default() -> Self {
        Self::new()
    }
}

/// Removes variables that would change the agent's config behind a test's back.
fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars() {
        if k.starts_with("METRICSD_")
            || [
                "LOG_LEVEL",
                "PROMETHEUS_ENABLED",
                "GPU_COLLECTION_INTERVAL",
                "TIMESERIES_BACKEND",
                "GPU_DISCOVERY_HOST",
                "INFLUXDB_URL",
                "INFLUXDB_DATABASE",
                "INFLUXDB_USERNAME",
                "INFLUXDB_PASSWORD",
                "INFLUXDB_ORG",
                "INFLUXDB_BUCKET",
                "INFLUXDB_TOKEN",
            ]
            .contains(&k.as_str())
        {
            cmd.env_remove(k);
        }
    }
}

/// A running `metricsd run` child process.
pub struct Agent {
    child: Option<Child>,
    /// Where its stdout goes.
    pub stdout_path: PathBuf,
    /// Where its stderr goes.
    pub stderr_path: PathBuf,
    /// Port of its health listener.
    pub health_port: u16,
    /// Port of its metrics listener.
    pub metrics_port: u16,
}

impl Agent {
    /// Starts `metricsd -c CONFIG run` in `work`. `config` may use `{health}` and `{metrics}`
    /// for the listener ports.
    pub fn start(work: &Workdir, config: &str, env: &[(&str, &str)]) -> Result<Agent> {
        Self::start_files(work, "", config, env)
    }

    /// Like [`Agent::start`], for one of several agents in `work`: its files are
    /// `{name}.toml`, `{name}.stdout.log` and `{name}.stderr.log`.
    pub fn start_named(
        work: &Workdir,
        name: &str,
        config: &str,
        env: &[(&str, &str)],
    ) -> Result<Agent> {
        Self::start_files(work, &format!("{name}."), config, env)
    }

    /// Like [`Agent::start_named`] with the `metricsd` of `dir` (e.g. [`build_optimised`]),
    /// which loads the plugins beside it.
    pub fn start_named_from(
        dir: &Path,
        work: &Workdir,
        name: &str,
        config: &str,
        env: &[(&str, &str)],
    ) -> Result<Agent> {
        Self::start_binary(
            &dir.join("metricsd"),
            work,
            &format!("{name}."),
            config,
            env,
        )
    }

    fn start_files(
        work: &Workdir,
        prefix: &str,
        config: &str,
        env: &[(&str, &str)],
    ) -> Result<Agent> {
        Self::start_binary(&binary(), work, prefix, config, env)
    }

    /// Like [`Agent::start`], run through `wrapper` (a command that execs the rest of its
    /// arguments, e.g. `prlimit --nofile=1024:4096 --`).
    pub fn start_wrapped(
        work: &Workdir,
        config: &str,
        env: &[(&str, &str)],
        wrapper: &[String],
    ) -> Result<Agent> {
        Self::start_command(&binary(), work, "", config, env, wrapper)
    }

    fn start_binary(
        binary: &Path,
        work: &Workdir,
        prefix: &str,
        config: &str,
        env: &[(&str, &str)],
    ) -> Result<Agent> {
        Self::start_command(binary, work, prefix, config, env, &[])
    }

    /// Starts `metricsd run` without a config file (the built-in default and the environment);
    /// the listeners go to loopback ports through `METRICSD_HTTP__*`.
    pub fn start_without_config(work: &Workdir, env: &[(&str, &str)]) -> Result<Agent> {
        Self::start_with(&binary(), work, "", None, env, &[])
    }

    fn start_command(
        binary: &Path,
        work: &Workdir,
        prefix: &str,
        config: &str,
        env: &[(&str, &str)],
        wrapper: &[String],
    ) -> Result<Agent> {
        Self::start_with(binary, work, prefix, Some(config), env, wrapper)
    }

    fn start_with(
        binary: &Path,
        work: &Workdir,
        prefix: &str,
        config: Option<&str>,
        env: &[(&str, &str)],
        wrapper: &[String],
    ) -> Result<Agent> {
        let health_port = free_port();
        let metrics_port = free_port();
        let config_path = config.map(|config| {
            let text = config
                .replace("{health}", &health_port.to_string())
                .replace("{metrics}", &metrics_port.to_string());
            if prefix.is_empty() {
                work.write("metricsd.toml", text)
            } else {
                work.write(&format!("{prefix}toml"), text)
            }
        });
        let stdout_path = work.path(&format!("{prefix}stdout.log"));
        let stderr_path = work.path(&format!("{prefix}stderr.log"));
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(binary);
                cmd
            }
            None => Command::new(binary),
        };
        if let Some(path) = &config_path {
            cmd.arg("-c").arg(path);
        }
        cmd.arg("run")
            .current_dir(work.dir.path())
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout_path)?)
            .stderr(fs::File::create(&stderr_path)?);
        clean_env(&mut cmd);
        cmd.env("NO_COLOR", "1");
        if config_path.is_none() {
            cmd.env(
                "METRICSD_HTTP__HEALTH_LISTEN",
                format!("127.0.0.1:{health_port}"),
            )
            .env(
                "METRICSD_HTTP__METRICS_LISTEN",
                format!("127.0.0.1:{metrics_port}"),
            );
        }
        cmd.envs(env.iter().copied());
        let child = cmd.spawn().context("spawn metricsd")?;
        Ok(Agent {
            child: Some(child),
            stdout_path,
            stderr_path,
            health_port,
            metrics_port,
        })
    }

    /// Its stdout so far.
    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    /// Its stderr (logs) so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// GET on the health listener: (status, body).
    pub fn get_health(&self, path: &str) -> Result<(u16, String)> {
        http_get(self.health_port, path)
    }

    /// The agent's own metrics (`/metrics/stats`).
    pub fn stats(&self) -> Result<String> {
        let (status, body) = self.get_health("/metrics/stats")?;
        if status != 200 {
            bail!("/metrics/stats answered {status}");
        }
        Ok(body)
    }

    /// The value of one series in `/metrics/stats`, e.g.
    /// `metricsd_collector_panics_total{collector="tk"}`.
    pub fn stat(&self, series: &str) -> Option<f64> {
        let body = self.stats().ok()?;
        series_value(&body, series)
    }

    /// Waits (up to `deadline`) until `series` of `/metrics/stats` reaches `at_least`, and
    /// returns its value; the error carries the agent's log.
    pub fn wait_stat(&self, series: &str, at_least: f64, deadline: Duration) -> Result<f64> {
        wait_for(&format!("{series} >= {at_least}"), deadline, || {
            self.stat(series).filter(|v| *v >= at_least)
        })
        .map_err(|e| anyhow!("{e}\n{}", self.stderr()))
    }

    /// A sink's delivery accounts, from one `/metrics/stats` answer.
    pub fn accounts(&self, sink: &str) -> Result<Accounts> {
        let body = self.stats()?;
        let one = |family: &str| series_value(&body, &format!("{family}{{sink=\"{sink}\"}}"));
        let dropped: Vec<(String, f64)> = body
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("metricsd_sink_dropped_samples_total{")?;
                let (labels, value) = rest.split_once("} ")?;
                labels
                    .contains(&format!("sink=\"{sink}\""))
                    .then(|| Some((labels.to_string(), value.trim().parse().ok()?)))
                    .flatten()
            })
            .collect();
        Ok(Accounts {
            received: one("metricsd_sink_received_samples_total")
                .ok_or_else(|| anyhow!("no received count for sink {sink}:\n{body}"))?,
            written: one("metricsd_sink_samples_written_total").unwrap_or(0.0),
            dropped: dropped.iter().map(|(_, v)| v).sum(),
            queued: one("metricsd_sink_queue_samples").unwrap_or(0.0),
            dropped_by_reason: dropped,
        })
    }

    /// Waits (up to 30 s) until every sample routed to `sink` is written, dropped (and
    /// counted) or still queued (received = written + dropped + queued: a write in progress
    /// is counted as queued, so this holds at any moment a scrape catches both counters in
    /// step) with at most `queued_at_most` queued, and returns the accounts; the error has the
    /// last accounts seen and the agent's log.
    pub fn settled_accounts(&self, sink: &str, queued_at_most: f64) -> Result<Accounts> {
        let mut last = None;
        wait_for(
            &format!("sink {sink}: received = written + dropped + queued"),
            Duration::from_secs(30),
            || {
                let a = self.accounts(sink).ok()?;
                last = Some(a.clone());
                (a.received == a.written + a.dropped + a.queued && a.queued <= queued_at_most)
                    .then_some(a)
            },
        )
        .map_err(|e| anyhow!("{e}: last {last:?}\n{}", self.stderr()))
    }

    /// Waits (up to 20 s) for a moment when no write to `sink` is in flight and the samples it
    /// counts written equal `accepted()`, what the receiving server says it took (read just
    /// before and just after the agent's accounts, and equal both times), with received =
    /// written + dropped.
    pub fn wait_written_is_accepted(&self, sink: &str, accepted: impl Fn() -> Option<f64>) {
        wait_for("written = accepted", Duration::from_secs(20), || {
            let before = accepted()?;
            let a = self.accounts(sink).ok()?;
            let after = accepted()?;
            (a.queued == 0.0
                && before == after
                && a.written == before
                && a.received == a.written + a.dropped)
                .then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", self.accounts(sink), self.stderr()));
    }

    /// Waits until the health listener answers.
    pub fn wait_ready(&mut self) -> Result<()> {
        let deadline = Duration::from_secs(30);
        let start = Instant::now();
        loop {
            if !self.is_running() {
                bail!("metricsd exited during start-up:\n{}", self.stderr());
            }
            if self.get_health("/health").is_ok() {
                return Ok(());
            }
            if start.elapsed() > deadline {
                bail!("metricsd not ready after {deadline:?}:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to `deadline` for the agent to exit on its own; its exit status.
    pub fn wait_exit(&mut self, deadline: Duration) -> Result<ExitStatus> {
        let child = self
            .child
            .as_mut()
            .ok_or_else(|| anyhow!("already stopped"))?;
        let status = wait_for("metricsd to exit", deadline, || {
            child.try_wait().ok().flatten()
        })?;
        self.child = None;
        Ok(status)
    }

    /// Sends SIGTERM and waits (up to 30 s) for the exit status.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("already stopped"))?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                bail!("metricsd did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A sink's delivery accounts (see [`Agent::accounts`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Accounts {
    /// Samples routed to the sink.
    pub received: f64,
    /// Samples it wrote.
    pub written: f64,
    /// Samples it dropped, all reasons.
    pub dropped: f64,
    /// Samples waiting or being written.
    pub queued: f64,
    /// The dropped counters by their label sets.
    pub dropped_by_reason: Vec<(String, f64)>,
}

/// A number of `/proc/PID/status` (`VmRSS` in KiB, `Threads`, …); `None` when the process is
/// gone.
pub fn proc_status(pid: u32, key: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A process's resident memory (`VmRSS` of `/proc/PID/status`) in KiB; 0 when it is gone.
pub fn rss_kib(pid: u32) -> u64 {
    proc_status(pid, "VmRSS").unwrap_or(0)
}

/// The value of `series` (exact text up to the value) in Prometheus text.
pub fn series_value(body: &str, series: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(series)?;
        let value = rest.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// A plain HTTP/1.1 GET on 127.0.0.1:port: (status, body).
pub fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(5))
        .build();
    match agent.get(&format!("http://127.0.0.1:{port}{path}")).call() {
        Ok(resp) => {
            let status = resp.status();
            Ok((status, resp.into_string()?))
        }
        Err(ureq::Error::Status(status, resp)) => Ok((status, resp.into_string()?)),
        Err(e) => Err(e.into()),
    }
}

/// Parses JSON lines printed by the stdout sink.
pub fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A program the tests need from a Debian package; a missing one fails the test (CI installs
/// them in `.ci/run`), it never skips it.
pub fn require_tool(name: &str, package: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("`{name}` not found on PATH: install Debian's `{package}` package (.ci/run does)")
    })
}

/// `promtool check metrics` on a body: (exit code, what it printed).
pub fn promtool_check_metrics(body: &str) -> (Option<i32>, String) {
    use std::io::Write as _;
    let mut child = Command::new(require_tool("promtool", "prometheus"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(body.as_bytes()).expect("write to promtool");
    }
    let out = child.wait_with_output().expect("promtool output");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A real Prometheus server on a loopback port, with its own data directory.
pub struct PrometheusServer {
    child: Child,
    /// Its HTTP port.
    pub port: u16,
    /// Its log file.
    pub log_path: PathBuf,
}

impl PrometheusServer {
    /// Starts Prometheus with `scrape_configs` (YAML list items, indented two spaces) and waits
    /// until it is ready.
    pub fn start(work: &Workdir, scrape_configs: &str) -> Result<Self> {
        let port = free_port();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\nscrape_configs:\n{scrape_configs}"
        );
        let config_path = work.write("prometheus.yml", config);
        let data = work.path("prometheus-data");
        fs::create_dir_all(&data)?;
        let log_path = work.path("prometheus.log");
        let child = Command::new(require_tool("prometheus", "prometheus"))
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log_path)?)
            .stderr(fs::File::create(work.path("prometheus.err"))?)
            .spawn()
            .context("start prometheus")?;
        let server = Self {
            child,
            port,
            log_path: work.path("prometheus.err"),
        };
        wait_for("prometheus to be ready", Duration::from_secs(30), || {
            http_get(port, "/-/ready").ok().filter(|(s, _)| *s == 200)
        })?;
        Ok(server)
    }

    /// Runs an instant query; returns the `data.result` array.
    pub fn query(&self, promql: &str) -> Result<Vec<serde_json::Value>> {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(5))
            .build();
        let text = agent
            .get(&format!("http://127.0.0.1:{}/api/v1/query", self.port))
            .query("query", promql)
            .call()?
            .into_string()?;
        let body: serde_json::Value = serde_json::from_str(&text)?;
        if body["status"] != "success" {
            bail!("query {promql} failed: {body}");
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The active targets (`/api/v1/targets`).
    pub fn targets(&self) -> Result<Vec<serde_json::Value>> {
        let (_, body) = http_get(self.port, "/api/v1/targets")?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        Ok(v["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Prometheus's own log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Response headers, names lower case.
pub type Headers = Vec<(String, String)>;

/// GET with extra headers: (status, headers, body bytes).
pub fn http_get_with(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, Headers, Vec<u8>)> {
    use std::io::Read as _;
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(5))
        .build();
    let mut req = agent.get(&format!("http://127.0.0.1:{port}{path}"));
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(e.into()),
    };
    let status = resp.status();
    let names = resp.headers_names();
    let hdrs = names
        .iter()
        .filter_map(|n| resp.header(n).map(|v| (n.to_lowercase(), v.to_string())))
        .collect();
    let mut body = Vec::new();
    resp.into_reader().read_to_end(&mut body)?;
    Ok((status, hdrs, body))
}

#[cfg(test)]
mod proc_status_tests {
    use super::{proc_status, rss_kib};

    #[test]
    fn reads_numbers_with_and_without_a_unit() {
        let me = std::process::id();
        assert!(rss_kib(me) > 0, "VmRSS (in kB) of this test process");
        assert!(proc_status(me, "Threads").is_some_and(|n| n >= 1));
        assert_eq!(proc_status(me, "NoSuchKey"), None);
        assert_eq!(proc_status(u32::MAX, "Threads"), None, "no such process");
    }
}
