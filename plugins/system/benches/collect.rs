//! Cost of one system collection (reads /proc, statvfs per filesystem, sysinfo temperatures),
//! through the same ABI wrapper the host calls:
//!
//! ```text
//! cargo bench -p metricsd-collector-system --bench collect
//! ```

use criterion::{criterion_group, criterion_main, Criterion};
use metricsd_plugin_api::testing::CollectorHarness;
use metricsd_system::SystemCollector;

fn collect(c: &mut Criterion) {
    let mut harness = CollectorHarness::new::<SystemCollector>("bench", "{}").expect("collector");
    let samples = harness.collect().expect("collect").samples.len();
    c.bench_function(&format!("system_collect ({samples} samples)"), |b| {
        b.iter(|| harness.collect().expect("collect"))
    });
}

criterion_group!(benches, collect);
criterion_main!(benches);
