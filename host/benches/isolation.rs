//! What `isolation = "process"` adds to one collection: the same plugin `.so`, loaded through
//! the real loader, called in this process through the ABI and in a child process (the real
//! `metricsd` binary in its runner mode) over the socket. Two batches: the NVML plugin on the
//! simulator's 8 H100s (`h100-sxm-8.toml`, about 1,300 samples), and the testkit collector
//! with 10,000 series. The overhead is the difference between the two lines of a group.
//! Build the plugins first, in the same profile:
//!
//! ```text
//! cargo build --release -p metricsd-collector-nvml -p nvml-sim -p metricsd-testkit
//! cargo bench -p metricsd --bench isolation
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use metricsd::isolation::spawn_collector;
use metricsd::loader::{scan, Plugin};
use metricsd_plugin_api::abi::{CollectorBox, InstanceArgs};

fn plugins() -> (PathBuf, Vec<Plugin>) {
    let runner = PathBuf::from(env!("CARGO_BIN_EXE_metricsd"));
    let dir = runner.parent().expect("target dir").to_path_buf();
    let needed: BTreeSet<String> = ["nvml", "testkit"].map(String::from).into();
    let set = scan(std::slice::from_ref(&dir), &[], Some(&needed));
    let found: Vec<Plugin> = needed
        .iter()
        .map(|n| {
            set.get(n).cloned().unwrap_or_else(|| {
                panic!(
                    "{}; build it first: cargo build --release -p metricsd-collector-nvml -p nvml-sim -p metricsd-testkit",
                    set.why_missing(n)
                )
            })
        })
        .collect();
    (runner, found)
}

fn in_process(plugin: &Plugin, config_json: &str) -> CollectorBox {
    let args = InstanceArgs {
        instance: "bench".into(),
        config_json: config_json.into(),
        logger: metricsd::plugin_log::host_logger(),
    };
    (plugin.module.new_collector())(args)
        .into_result()
        .unwrap_or_else(|e| panic!("{}: {}", plugin.name, e.message))
}

fn bench(c: &mut Criterion) {
    let (runner, found) = plugins();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = runner.parent().expect("target dir");
    // The simulator's scenario reaches the child through the environment it inherits.
    std::env::set_var(
        "NVML_SIM_SCENARIO",
        root.join("tests/nvml-sim/scenarios/h100-sxm-8.toml"),
    );
    let nvml_config = format!(
        r#"{{"library_path":"{}"}}"#,
        dir.join("libnvml_sim.so").display()
    );
    let cases = [
        ("nvml_8_gpus", &found[0], nvml_config.as_str()),
        ("testkit_10000_series", &found[1], r#"{"series":10000}"#),
    ];
    for (name, plugin, config) in cases {
        let mut local = in_process(plugin, config);
        let mut child = spawn_collector(plugin, "bench", config, Duration::from_secs(30), &runner)
            .unwrap_or_else(|(_, why)| panic!("{why}"));
        let first = local.collect().into_result().expect("collect");
        let samples = first.samples.len();
        let distinct: std::collections::BTreeSet<_> = first
            .label_sets
            .iter()
            .map(|set| format!("{set:?}"))
            .collect();
        let strings: usize = first.label_sets.iter().map(|s| 2 * s.len()).sum();
        eprintln!(
            "{name}: {samples} samples, {} families, {} label sets ({} distinct, {strings} label strings)",
            first.families.len(),
            first.label_sets.len(),
            distinct.len()
        );
        let mut group = c.benchmark_group(format!("isolation/{name}"));
        group.throughput(Throughput::Elements(samples as u64));
        group.bench_function("in_process", |b| {
            b.iter(|| local.collect().into_result().expect("collect"))
        });
        group.bench_function("process", |b| {
            b.iter(|| child.collect().unwrap_or_else(|e| panic!("{e:?}")))
        });
        // The part of the difference that is the batch's encoding and decoding alone.
        let batch = local.collect().into_result().expect("collect");
        let mut bytes = Vec::new();
        group.bench_function("encode", |b| {
            b.iter(|| {
                bytes.clear();
                bytes = postcard::to_extend(&batch, std::mem::take(&mut bytes)).expect("encode");
            })
        });
        group.bench_function("decode", |b| {
            b.iter(|| postcard::from_bytes::<metricsd_plugin_api::Batch>(&bytes).expect("decode"))
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
