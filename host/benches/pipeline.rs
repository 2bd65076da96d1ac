//! One collection crossing the ABI into a sink: collector `collect` (through the ABI vtable and
//! the SDK's panic guard) → host pipeline (validation, static labels, a relabel rule) → sink
//! `write` (through the ABI vtable). Run with:
//!
//! ```text
//! cargo bench -p metricsd --bench pipeline
//! ```
//!
//! The plugin types are linked into the bench rather than `dlopen`ed, but every call goes
//! through the same `extern "C"` vtables and wrappers a loaded `.so` uses.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use abi_stable::std_types::RStr;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use metricsd::config::{from_toml_with_env, ConfigSource};
use metricsd::events::Telemetry;
use metricsd::pipeline::Pipeline;
use metricsd_plugin_api::abi::{HostLogger, InstanceArgs, LogLevel};
use metricsd_plugin_api::{
    new_collector, new_sink, Batch, BatchBuilder, Collector, Context, Result, Sink,
};

/// Emits `samples` gauge samples with two labels each: like a GPU collector (one label set per
/// GPU, shared) or, with `distinct = 1`, a label set of its own per sample (the worst case, e.g.
/// per-process series).
struct Synthetic {
    samples: usize,
    distinct: bool,
    gpus: Vec<String>,
    tick: f64,
}

impl Collector for Synthetic {
    type Config = BTreeMap<String, usize>;

    fn new(config: Self::Config, _: &Context) -> Result<Self> {
        Ok(Self {
            samples: config.get("samples").copied().unwrap_or(0),
            distinct: config.get("distinct").copied().unwrap_or(0) == 1,
            gpus: (0..8).map(|i| i.to_string()).collect(),
            tick: 0.0,
        })
    }

    fn collect(&mut self, out: &mut BatchBuilder) -> Result<()> {
        self.tick += 1.0;
        if self.samples == 0 {
            return Ok(());
        }
        let families = [
            out.gauge("gpu_utilization_ratio", "GPU utilization.", "ratio"),
            out.gauge("gpu_temperature_celsius", "GPU temperature.", "celsius"),
            out.gauge("gpu_power_usage_watts", "Power draw.", "watts"),
            out.counter("gpu_energy_consumed_joules_total", "Energy.", "joules"),
        ];
        // One label set per GPU, shared by that GPU's samples, as the SDK recommends.
        let sets: Vec<_> = self
            .gpus
            .iter()
            .map(|gpu| {
                out.label_set(&[
                    ("gpu", gpu.as_str()),
                    ("uuid", "GPU-5fd7a3b2-0c1e-4f4e-9a53-8b1f3c2d4e5f"),
                ])
            })
            .collect();
        for i in 0..self.samples {
            let set = if self.distinct {
                let pid = i.to_string();
                out.label_set(&[("gpu", self.gpus[i % 8].as_str()), ("pid", pid.as_str())])
            } else {
                sets[i % 8]
            };
            out.sample_in(families[i % 4], set, self.tick + i as f64);
        }
        Ok(())
    }
}

/// Reads every sample, its family and its labels, and counts them.
struct Counting {
    seen: AtomicU64,
}

impl Sink for Counting {
    type Config = BTreeMap<String, String>;

    fn new(_: Self::Config, _: &Context) -> Result<Self> {
        Ok(Self {
            seen: AtomicU64::new(0),
        })
    }

    fn write(&self, batch: &Batch) -> Result<()> {
        let mut n = 0u64;
        for s in batch.samples.iter() {
            let family = batch.family_of(s).map(|f| f.name.len()).unwrap_or(0);
            let labels: usize = batch.labels_of(s).map(|l| l.value.len()).sum();
            n += 1;
            black_box((family, labels, s.value));
        }
        self.seen.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

extern "C" fn no_log(_: RStr<'_>, _: LogLevel, _: RStr<'_>, _: RStr<'_>) {}

fn args(config: &str) -> InstanceArgs {
    InstanceArgs {
        instance: "bench".into(),
        config_json: config.into(),
        logger: HostLogger {
            log: no_log,
            max_level: LogLevel::OFF,
        },
    }
}

fn pipeline() -> Pipeline {
    let config = from_toml_with_env(
        r#"
[agent]
labels = { node_id = "node-17", provider = "acme", region = "eu-west" }
[[relabel]]
action = "drop"
metrics = ["*_info"]
"#,
        &ConfigSource::BuiltinDefault,
        &BTreeMap::<String, String>::new(),
    )
    .expect("bench config");
    Pipeline::new(&config, BTreeMap::new(), Arc::new(Telemetry::new()))
}

fn collection_into_sink(c: &mut Criterion) {
    let pipeline = pipeline();
    let sink = new_sink::<Counting>(args("{}"), "bench")
        .into_result()
        .expect("sink");
    for (group_name, distinct) in [
        ("collect_pipeline_write", 0),
        ("collect_pipeline_write_distinct_labels", 1),
    ] {
        let mut group = c.benchmark_group(group_name);
        for n in [100usize, 1_000, 10_000] {
            let config = format!("{{\"samples\":{n},\"distinct\":{distinct}}}");
            let mut collector = new_collector::<Synthetic>(args(&config), "bench")
                .into_result()
                .expect("collector");
            group.throughput(Throughput::Elements(n as u64));
            group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
                b.iter(|| {
                    let mut batch = collector.collect().into_result().expect("collect");
                    pipeline.prepare("gpu", &mut batch);
                    sink.write(&batch).into_result().expect("write");
                })
            });
        }
        group.finish();
    }

    // The fixed cost of one batch crossing: an empty collection and an empty write.
    let mut empty = new_collector::<Synthetic>(args("{\"samples\":0}"), "bench")
        .into_result()
        .expect("collector");
    let empty_batch = Batch::default();
    c.bench_function("abi_crossing/collect_empty", |b| {
        b.iter(|| black_box(empty.collect().into_result().expect("collect")))
    });
    c.bench_function("abi_crossing/write_empty", |b| {
        b.iter(|| {
            sink.write(black_box(&empty_batch))
                .into_result()
                .expect("write")
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(std::time::Duration::from_secs(4));
    targets = collection_into_sink
}
criterion_main!(benches);
