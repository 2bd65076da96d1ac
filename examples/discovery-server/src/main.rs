//! Reference GPU discovery server (`gpudiscovery.v1`): serves one node's GPU inventory from a
//! TOML or JSON file and, with `--nvml`, from NVML with the file's entries merged in by uuid.
//! When the file changes, the changes are pushed to every `WatchGpus` stream.
//!
//! It is what metricsd's discovery tests talk to, and what an operator without a discovery
//! service can run beside the agent to give the node's GPUs their network identity.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use metricsd_discovery_proto::v1::gpu_event::Kind;
use metricsd_discovery_proto::{
    Gpu, GpuDiscovery, GpuDiscoveryServer, GpuEvent, Health, ListGpusRequest, ListGpusResponse,
    WatchGpusRequest,
};
use serde::Deserialize;
use tokio::sync::broadcast;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};

/// Command line.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// The inventory file (`.toml` or `.json`); watched for changes.
    #[arg(long)]
    inventory: Option<PathBuf>,
    /// List the GPUs NVML sees, with the inventory file's entries merged in by uuid.
    #[arg(long)]
    nvml: bool,
    /// The NVML library to load with `--nvml` (default: the system's libnvidia-ml.so.1).
    #[arg(long)]
    nvml_library: Option<PathBuf>,
    /// The node id served (default: the file's `node_id`).
    #[arg(long)]
    node_id: Option<String>,
    /// PEM certificate (chain) to serve TLS with; needs `--tls-key`.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// How often the inventory file is checked for changes.
    #[arg(long, default_value = "500ms", value_parser = humantime_duration)]
    poll_interval: Duration,
}

fn humantime_duration(s: &str) -> std::result::Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// The inventory file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Inventory {
    /// The node's id (the default of each GPU's `node_id`).
    #[serde(default)]
    node_id: String,
    /// The default of each GPU's `provider`.
    #[serde(default)]
    provider: String,
    #[serde(default)]
    gpus: Vec<GpuEntry>,
}

/// One GPU of the inventory file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GpuEntry {
    uuid: String,
    #[serde(default)]
    index: u32,
    #[serde(default)]
    gpu_id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    pci_bus_id: String,
    #[serde(default)]
    memory_bytes: u64,
    #[serde(default)]
    node_id: Option<String>,
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    health: HealthName,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum HealthName {
    #[default]
    Unknown,
    Healthy,
    Degraded,
    Unhealthy,
}

impl From<HealthName> for Health {
    fn from(h: HealthName) -> Self {
        match h {
            HealthName::Unknown => Health::Unspecified,
            HealthName::Healthy => Health::Healthy,
            HealthName::Degraded => Health::Degraded,
            HealthName::Unhealthy => Health::Unhealthy,
        }
    }
}

fn read_inventory(path: &Path) -> Result<Inventory> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let inventory: Inventory = match path.extension().and_then(|e| e.to_str()) {
        Some("json") => serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid inventory", path.display()))?,
        _ => toml::from_str(&text)
            .with_context(|| format!("{} is not a valid inventory", path.display()))?,
    };
    Ok(inventory)
}

/// The GPUs NVML sees: (uuid, index, name, PCI bus id, memory).
fn nvml_gpus(library: Option<&Path>) -> Result<Vec<Gpu>> {
    let nvml = match library {
        Some(path) => nvml_wrapper::Nvml::builder()
            .lib_path(path.as_os_str())
            .init(),
        None => nvml_wrapper::Nvml::init(),
    }
    .context("cannot initialise NVML")?;
    let mut gpus = Vec::new();
    for index in 0..nvml.device_count()? {
        let device = nvml.device_by_index(index)?;
        gpus.push(Gpu {
            uuid: device.uuid()?,
            index,
            model: device.name().unwrap_or_default(),
            pci_bus_id: device.pci_info().map(|p| p.bus_id).unwrap_or_default(),
            memory_bytes: device.memory_info().map(|m| m.total).unwrap_or_default(),
            ..Gpu::default()
        });
    }
    Ok(gpus)
}

/// The served GPUs: the file's, or NVML's with the file's merged in.
fn build_inventory(args: &Args, nvml: Option<&[Gpu]>) -> Result<(String, Vec<Gpu>)> {
    let file = match &args.inventory {
        Some(path) => read_inventory(path)?,
        None => Inventory::default(),
    };
    let node_id = args.node_id.clone().unwrap_or(file.node_id.clone());
    let from_file = |e: &GpuEntry, base: Gpu| Gpu {
        uuid: e.uuid.clone(),
        index: if base.uuid.is_empty() {
            e.index
        } else {
            base.index
        },
        model: if e.model.is_empty() {
            base.model
        } else {
            e.model.clone()
        },
        pci_bus_id: if e.pci_bus_id.is_empty() {
            base.pci_bus_id
        } else {
            e.pci_bus_id.clone()
        },
        memory_bytes: if e.memory_bytes == 0 {
            base.memory_bytes
        } else {
            e.memory_bytes
        },
        gpu_id: e.gpu_id.clone(),
        node_id: e.node_id.clone().unwrap_or(node_id.clone()),
        provider: e.provider.clone().unwrap_or(file.provider.clone()),
        labels: e.labels.clone().into_iter().collect(),
        health: Health::from(e.health) as i32,
    };
    let gpus = match nvml {
        None => file
            .gpus
            .iter()
            .map(|e| from_file(e, Gpu::default()))
            .collect(),
        Some(seen) => {
            for e in &file.gpus {
                if !seen.iter().any(|g| g.uuid == e.uuid) {
                    tracing::warn!("{}: NVML does not see this GPU; not served", e.uuid);
                }
            }
            seen.iter()
                .map(|g| match file.gpus.iter().find(|e| e.uuid == g.uuid) {
                    Some(e) => from_file(e, g.clone()),
                    None => Gpu {
                        node_id: node_id.clone(),
                        provider: file.provider.clone(),
                        ..g.clone()
                    },
                })
                .collect()
        }
    };
    Ok((node_id, gpus))
}

/// What the server serves now.
struct Served {
    node_id: String,
    revision: u64,
    gpus: Vec<Gpu>,
}

struct Server {
    served: Arc<RwLock<Served>>,
    events: broadcast::Sender<GpuEvent>,
}

type EventStream = Pin<Box<dyn Stream<Item = std::result::Result<GpuEvent, Status>> + Send>>;

impl Server {
    fn check_node(&self, asked: &str) -> std::result::Result<(), Status> {
        let served = self.served.read().unwrap_or_else(|p| p.into_inner());
        if !asked.is_empty() && !served.node_id.is_empty() && asked != served.node_id {
            return Err(Status::not_found(format!(
                "this server serves node {:?}, not {asked:?}",
                served.node_id
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl GpuDiscovery for Server {
    async fn list_gpus(
        &self,
        request: Request<ListGpusRequest>,
    ) -> std::result::Result<Response<ListGpusResponse>, Status> {
        self.check_node(&request.get_ref().node_id)?;
        let served = self.served.read().unwrap_or_else(|p| p.into_inner());
        Ok(Response::new(ListGpusResponse {
            gpus: served.gpus.clone(),
            revision: served.revision,
        }))
    }

    type WatchGpusStream = EventStream;

    async fn watch_gpus(
        &self,
        request: Request<WatchGpusRequest>,
    ) -> std::result::Result<Response<Self::WatchGpusStream>, Status> {
        self.check_node(&request.get_ref().node_id)?;
        // Subscribe before comparing revisions, so that no change falls in between.
        let events = self.events.subscribe();
        let since = request.get_ref().since_revision;
        let current = self
            .served
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .revision;
        if since != current {
            return Err(Status::aborted(format!(
                "the inventory is at revision {current}, not {since}: list again"
            )));
        }
        let stream = tokio_stream::wrappers::BroadcastStream::new(events)
            .map(|e| e.map_err(|_| Status::aborted("this watcher fell behind: list again")));
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The events that turn `old` into `new`.
fn diff(old: &[Gpu], new: &[Gpu]) -> Vec<(Kind, Gpu)> {
    let mut changes = Vec::new();
    for g in old {
        if !new.iter().any(|n| n.uuid == g.uuid) {
            changes.push((Kind::Removed, g.clone()));
        }
    }
    for g in new {
        match old.iter().find(|o| o.uuid == g.uuid) {
            None => changes.push((Kind::Added, g.clone())),
            Some(o) if o == g => {}
            Some(o)
                if o.health != g.health
                    && Gpu {
                        health: g.health,
                        ..o.clone()
                    } == *g =>
            {
                changes.push((Kind::HealthChanged, g.clone()))
            }
            Some(_) => changes.push((Kind::LabelsChanged, g.clone())),
        }
    }
    changes
}

/// Re-reads the inventory when its file changes and pushes the changes.
async fn watch_file(
    args: Arc<Args>,
    nvml: Option<Vec<Gpu>>,
    served: Arc<RwLock<Served>>,
    events: broadcast::Sender<GpuEvent>,
) {
    let Some(path) = args.inventory.clone() else {
        return;
    };
    let mut last = std::fs::read(&path).ok();
    loop {
        tokio::time::sleep(args.poll_interval).await;
        let now = std::fs::read(&path).ok();
        if now == last {
            continue;
        }
        last = now;
        let (node_id, gpus) = match build_inventory(&args, nvml.as_deref()) {
            Ok(inventory) => inventory,
            Err(e) => {
                tracing::error!("{e:#}; still serving the previous inventory");
                continue;
            }
        };
        let mut s = served.write().unwrap_or_else(|p| p.into_inner());
        let changes = diff(&s.gpus, &gpus);
        s.node_id = node_id;
        s.gpus = gpus;
        for (kind, gpu) in changes {
            s.revision += 1;
            tracing::info!(revision = s.revision, "{}: {kind:?}", gpu.uuid);
            // No watcher is not an error.
            let _ = events.send(GpuEvent {
                kind: kind as i32,
                gpu: Some(gpu),
                revision: s.revision,
            });
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Arc::new(Args::parse());
    if args.inventory.is_none() && !args.nvml {
        bail!("give --inventory FILE, --nvml, or both");
    }
    let nvml = if args.nvml {
        Some(nvml_gpus(args.nvml_library.as_deref())?)
    } else {
        None
    };
    let (node_id, gpus) = build_inventory(&args, nvml.as_deref())?;
    tracing::info!(
        "serving {} GPU(s) of node {node_id:?} on {}{}",
        gpus.len(),
        args.listen,
        if args.tls_cert.is_some() {
            " (TLS)"
        } else {
            ""
        }
    );
    let served = Arc::new(RwLock::new(Served {
        node_id,
        revision: 1,
        gpus,
    }));
    let (events, _) = broadcast::channel(1024);
    tokio::spawn(watch_file(
        Arc::clone(&args),
        nvml,
        Arc::clone(&served),
        events.clone(),
    ));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let mut server = tonic::transport::Server::builder();
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let cert =
            std::fs::read(cert).with_context(|| format!("cannot read {}", cert.display()))?;
        let key = std::fs::read(key).with_context(|| format!("cannot read {}", key.display()))?;
        server = server
            .tls_config(
                tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(cert, key)),
            )
            .context("TLS configuration")?;
    }
    server
        .add_service(GpuDiscoveryServer::new(Server { served, events }))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async {
                let _ = tokio::signal::ctrl_c().await;
            },
        )
        .await
        .context("serving")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(uuid: &str, rental: &str, health: Health) -> Gpu {
        Gpu {
            uuid: uuid.into(),
            labels: [("rental".to_string(), rental.to_string())].into(),
            health: health as i32,
            ..Gpu::default()
        }
    }

    #[test]
    fn diffs_name_each_kind_of_change() {
        let old = vec![
            gpu("a", "idle", Health::Healthy),
            gpu("b", "idle", Health::Healthy),
            gpu("c", "idle", Health::Healthy),
        ];
        let new = vec![
            gpu("a", "rented", Health::Healthy),
            gpu("b", "idle", Health::Degraded),
            gpu("d", "idle", Health::Healthy),
        ];
        let kinds: Vec<(Kind, String)> = diff(&old, &new)
            .into_iter()
            .map(|(k, g)| (k, g.uuid))
            .collect();
        assert_eq!(
            kinds,
            [
                (Kind::Removed, "c".to_string()),
                (Kind::LabelsChanged, "a".to_string()),
                (Kind::HealthChanged, "b".to_string()),
                (Kind::Added, "d".to_string()),
            ]
        );
        assert!(diff(&new, &new).is_empty());
    }

    #[test]
    fn inventory_files_parse_as_toml_and_json() {
        let dir = std::env::temp_dir().join(format!("discovery-inv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let toml_path = dir.join("inv.toml");
        std::fs::write(
            &toml_path,
            "node_id = \"n1\"\nprovider = \"acme\"\n[[gpus]]\nuuid = \"GPU-1\"\ngpu_id = \"net-1\"\nhealth = \"healthy\"\nlabels = { rental = \"idle\" }\n",
        )
        .expect("write");
        let json_path = dir.join("inv.json");
        std::fs::write(
            &json_path,
            r#"{"node_id":"n1","gpus":[{"uuid":"GPU-1","gpu_id":"net-1"}]}"#,
        )
        .expect("write");
        let args = Args::parse_from(["x", "--inventory", toml_path.to_str().expect("utf-8")]);
        let (node, gpus) = build_inventory(&args, None).expect("toml");
        assert_eq!(node, "n1");
        assert_eq!(gpus[0].provider, "acme");
        assert_eq!(gpus[0].node_id, "n1");
        assert_eq!(gpus[0].health, Health::Healthy as i32);
        let args = Args::parse_from(["x", "--inventory", json_path.to_str().expect("utf-8")]);
        assert_eq!(
            build_inventory(&args, None).expect("json").1[0].gpu_id,
            "net-1"
        );
        std::fs::write(&json_path, r#"{"gpus":[{"uuid":"x","colour":"red"}]}"#).expect("write");
        let e = build_inventory(&args, None).expect_err("unknown key");
        assert!(format!("{e:#}").contains("colour"), "{e:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
