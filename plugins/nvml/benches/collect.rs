//! Cost of one NVML collection against the simulator, through the ABI wrapper the host calls.
//! The simulator reads its scenario once per process, so `scripts/bench-nvml.sh` runs this
//! bench once per GPU count:
//!
//! ```text
//! cargo build --release -p nvml-sim
//! bash scripts/bench-nvml.sh
//! ```

use criterion::{criterion_group, criterion_main, Criterion};
use metricsd_nvml::NvmlCollector;
use metricsd_plugin_api::testing::CollectorHarness;

fn collect(c: &mut Criterion) {
    let library = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../target/release/libnvml_sim.so"
    );
    let processes = std::env::var("NVML_BENCH_PROCESSES")
        .map(|v| v == "1")
        .unwrap_or(true);
    let gpm = std::env::var("NVML_BENCH_GPM")
        .map(|v| v == "1")
        .unwrap_or(true);
    let nvlink = std::env::var("NVML_BENCH_NVLINK")
        .map(|v| v == "1")
        .unwrap_or(true);
    let config = format!(
        r#"{{"library_path":"{library}","xid_events":false,"processes":{processes},"gpm":{gpm},"nvlink":{nvlink}}}"#
    );
    let mut harness = CollectorHarness::new::<NvmlCollector>("bench", &config)
        .expect("build the simulator first: cargo build --release -p nvml-sim");
    let batch = harness.collect().expect("collect");
    let gpus = batch
        .samples
        .iter()
        .filter(|s| {
            batch
                .family_of(s)
                .is_some_and(|f| f.name.as_str() == "gpu_up")
        })
        .count();
    let name = format!(
        "nvml_collect/{gpus}_gpus/processes_{}/{}_samples",
        if processes { "on" } else { "off" },
        batch.samples.len()
    );
    c.bench_function(&name, |b| b.iter(|| harness.collect().expect("collect")));
}

criterion_group!(benches, collect);
criterion_main!(benches);
