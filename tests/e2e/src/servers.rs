//! Real time-series servers on loopback ports for the sink tests: InfluxDB 1.x (Debian's
//! `influxdb`) and VictoriaMetrics (Debian's `victoria-metrics`). Each has its own directories
//! under the test's work directory and is stopped when dropped.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{free_port, require_tool, wait_for, Workdir};

fn terminate(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build()
}

/// A real InfluxDB 1.x on loopback ports.
pub struct InfluxServer {
    child: Option<Child>,
    /// HTTP port.
    pub port: u16,
    rpc_port: u16,
    dir: PathBuf,
    auth: bool,
}

impl InfluxServer {
    /// Starts `influxd` (with `auth-enabled` when `auth`) and waits for `/ping`.
    pub fn start(work: &Workdir, auth: bool) -> Result<Self> {
        let mut server = Self {
            child: None,
            port: free_port(),
            rpc_port: free_port(),
            dir: work.path(&format!("influxdb-{}", free_port())),
            auth,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<()> {
        fs::create_dir_all(&self.dir)?;
        let d = self.dir.display();
        let config = format!(
            "reporting-disabled = true\nbind-address = \"127.0.0.1:{rpc}\"\n[meta]\n  dir = \"{d}/meta\"\n[data]\n  dir = \"{d}/data\"\n  wal-dir = \"{d}/wal\"\n  query-log-enabled = false\n[http]\n  bind-address = \"127.0.0.1:{port}\"\n  log-enabled = false\n  auth-enabled = {auth}\n[monitor]\n  store-enabled = false\n",
            rpc = self.rpc_port,
            port = self.port,
            auth = self.auth,
        );
        let config_path = self.dir.join("influxdb.conf");
        fs::write(&config_path, config)?;
        let child = Command::new(require_tool("influxd", "influxdb"))
            .arg("run")
            .arg("-config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(fs::File::create(self.dir.join("influxd.out"))?)
            .stderr(fs::File::create(self.dir.join("influxd.log"))?)
            .spawn()
            .context("start influxd")?;
        self.child = Some(child);
        let port = self.port;
        wait_for("influxd to answer /ping", Duration::from_secs(30), || {
            agent()
                .get(&format!("http://127.0.0.1:{port}/ping"))
                .call()
                .ok()
                .filter(|r| r.status() == 204)
        })?;
        Ok(())
    }

    /// Stops the server (SIGTERM), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()
    }

    /// Runs InfluxQL (POST /query, timestamps in ms); `auth` as (user, password).
    pub fn query_as(
        &self,
        db: &str,
        q: &str,
        auth: Option<(&str, &str)>,
    ) -> Result<serde_json::Value> {
        let mut form = vec![("q", q), ("epoch", "ms")];
        if !db.is_empty() {
            form.push(("db", db));
        }
        let mut request = agent().post(&format!("http://127.0.0.1:{}/query", self.port));
        if let Some((u, p)) = auth {
            use base64::Engine as _;
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            request = request.set("Authorization", &format!("Basic {token}"));
        }
        let response = request.send_form(&form);
        let text = match response {
            Ok(r) => r.into_string()?,
            Err(ureq::Error::Status(code, r)) => {
                bail!(
                    "query {q:?}: HTTP {code}: {}",
                    r.into_string().unwrap_or_default()
                )
            }
            Err(e) => return Err(e.into()),
        };
        let body: serde_json::Value = serde_json::from_str(&text)?;
        if let Some(e) = body["results"][0]["error"].as_str() {
            bail!("query {q:?}: {e}");
        }
        Ok(body)
    }

    /// Runs InfluxQL without credentials.
    pub fn query(&self, db: &str, q: &str) -> Result<serde_json::Value> {
        self.query_as(db, q, None)
    }

    /// The rows of a query's first result, each as an object of column (and tag) → value.
    pub fn rows(
        &self,
        db: &str,
        q: &str,
    ) -> Result<Vec<serde_json::Map<String, serde_json::Value>>> {
        let body = self.query(db, q)?;
        let mut out = Vec::new();
        for series in body["results"][0]["series"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let columns: Vec<String> = series["columns"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c.as_str().map(str::to_string))
                .collect();
            for values in series["values"].as_array().into_iter().flatten() {
                let mut row = serde_json::Map::new();
                if let Some(tags) = series["tags"].as_object() {
                    row.extend(tags.clone());
                }
                if let Some(name) = series["name"].as_str() {
                    row.insert("_measurement".into(), name.into());
                }
                for (c, v) in columns.iter().zip(values.as_array().into_iter().flatten()) {
                    row.insert(c.clone(), v.clone());
                }
                out.push(row);
            }
        }
        Ok(out)
    }

    /// influxd's log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("influxd.log")).unwrap_or_default()
    }
}

impl Drop for InfluxServer {
    fn drop(&mut self) {
        // The test is over: no need for a clean shutdown.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A real single-node VictoriaMetrics on a loopback port.
pub struct VictoriaMetrics {
    child: Option<Child>,
    /// HTTP port (Prometheus query API, InfluxDB and remote-write ingestion).
    pub port: u16,
    dir: PathBuf,
}

impl VictoriaMetrics {
    /// Starts `victoria-metrics` and waits for `/health`.
    pub fn start(work: &Workdir) -> Result<Self> {
        let port = free_port();
        let mut server = Self {
            child: None,
            port,
            dir: work.path(&format!("victoria-metrics-{port}")),
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<()> {
        fs::create_dir_all(&self.dir)?;
        let port = self.port;
        let child = Command::new(require_tool("victoria-metrics", "victoria-metrics"))
            .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
            .arg(format!(
                "-storageDataPath={}",
                self.dir.join("data").display()
            ))
            .arg("-search.latencyOffset=0s")
            .arg("-search.disableCache")
            .arg("-loggerLevel=WARN")
            .stdin(Stdio::null())
            .stdout(
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join("vm.out"))?,
            )
            .stderr(
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join("vm.log"))?,
            )
            .spawn()
            .context("start victoria-metrics")?;
        self.child = Some(child);
        wait_for(
            "victoria-metrics to be healthy",
            Duration::from_secs(30),
            || {
                agent()
                    .get(&format!("http://127.0.0.1:{port}/health"))
                    .call()
                    .ok()
                    .filter(|r| r.status() == 200)
            },
        )?;
        Ok(())
    }

    /// Stops the server (SIGTERM: it writes what it holds in memory), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()
    }

    /// The remote-write endpoint.
    pub fn write_url(&self) -> String {
        format!("http://127.0.0.1:{}/api/v1/write", self.port)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The raw samples of the series matching `selector` (`/api/v1/export`): one object per
    /// series with `metric`, `values` and `timestamps`.
    pub fn export(&self, selector: &str) -> Result<Vec<serde_json::Value>> {
        let text = agent()
            .get(&format!("http://127.0.0.1:{}/api/v1/export", self.port))
            .query("match[]", selector)
            .call()?
            .into_string()?;
        Ok(crate::json_lines(&text))
    }

    /// VictoriaMetrics' log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("vm.log")).unwrap_or_default()
    }
}

impl Drop for VictoriaMetrics {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
