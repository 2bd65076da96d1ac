//! Line-protocol encoding throughput: `cargo bench -p metricsd-sink-influxdb --bench encode`.
//!
//! Two batches: a GPU node's (8 GPUs × 40 metrics sharing each GPU's label set, like the NVML
//! collector's) and 10,000 series of one family with their own label sets (a synthetic worst
//! case for the tag cache). Throughput is reported in lines per second.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use metricsd_influxdb::{encode, Layout, Precision};
use metricsd_plugin_api::{Batch, BatchBuilder};

fn gpu_node() -> Batch {
    let mut b = BatchBuilder::new();
    let families: Vec<_> = (0..40)
        .map(|i| b.gauge(&format!("gpu_metric_{i}_ratio"), "", "ratio"))
        .collect();
    for gpu in 0..8 {
        let g = gpu.to_string();
        let uuid = format!("GPU-5f7c{gpu:04x}-1d2e-4c3b-9a8f-0e1d2c3b{gpu:04x}");
        let set = b.label_set(&[
            ("gpu", g.as_str()),
            ("uuid", uuid.as_str()),
            ("name", "NVIDIA H100 80GB HBM3"),
            ("pci_bus_id", "00000000:18:00.0"),
        ]);
        for (i, f) in families.iter().enumerate() {
            b.sample_in(*f, set, 0.5 + i as f64 / 100.0);
        }
    }
    b.common_label("node", "gpu-node-17");
    b.timestamp_ms(1_700_000_000_000);
    b.finish()
}

fn many_series(n: usize) -> Batch {
    let mut b = BatchBuilder::new();
    let f = b.gauge("synthetic_value", "", "");
    for i in 0..n {
        let s = i.to_string();
        b.sample(
            f,
            &[("series", s.as_str()), ("zone", "rack 7")],
            i as f64 * 1.5,
        );
    }
    b.timestamp_ms(1_700_000_000_000);
    b.finish()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for (name, batch) in [
        ("gpu_node_320", gpu_node()),
        ("series_10k", many_series(10_000)),
    ] {
        for (layout_name, layout) in [
            ("per_metric", Layout::PerMetric),
            ("grouped", Layout::Grouped),
        ] {
            let lines = encode(&batch, layout, Precision::Milliseconds, 0)
                .lines
                .len();
            group.throughput(Throughput::Elements(lines as u64));
            group.bench_with_input(
                BenchmarkId::new(layout_name, name),
                &batch,
                |bench, batch| bench.iter(|| encode(batch, layout, Precision::Milliseconds, 0)),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
