//! Remote write against InfluxDB line protocol on the same batches:
//! `cargo bench -p metricsd-sink-remote-write --bench encode`.
//!
//! Each measurement is what a sink does per write before the HTTP request: remote write
//! encodes the protobuf `WriteRequest` and compresses it with snappy; the InfluxDB sink encodes
//! line protocol and compresses it with gzip (level 1, as it sends it). Throughput is in
//! samples per second on one core. Bytes on the wire per sample are printed before the
//! measurements.
//!
//! Batches: one GPU node's collection (8 GPUs × 40 metrics sharing each GPU's label set, like
//! the NVML collector's), ten such collections merged (what the host sends after an outage or
//! with `batch_wait`), and 10,000 series of one family with their own label sets.

use std::io::Write as _;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use metricsd_influxdb::{Layout, Precision};
use metricsd_plugin_api::{Batch, BatchBuilder};

fn gpu_node(ts: i64, step: f64) -> Batch {
    let mut b = BatchBuilder::new();
    let families: Vec<_> = (0..40)
        .map(|i| b.gauge(&format!("gpu_metric_{i}_ratio"), "A GPU metric.", "ratio"))
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
            b.sample_in(*f, set, 0.5 + i as f64 / 100.0 + step);
        }
    }
    b.common_label("node_id", "gpu-node-17");
    b.common_label("provider", "acme");
    b.timestamp_ms(ts);
    b.finish()
}

/// Ten collections one second apart, merged the way the host merges queued batches.
fn merged_gpu_node() -> Batch {
    let mut out = Batch::default();
    for i in 0..10 {
        let part = gpu_node(1_700_000_000_000 + i * 1000, i as f64 / 1000.0);
        if out.families.is_empty() {
            out.families = part.families.clone();
        }
        let offset = out.label_sets.len() as u32;
        for set in part.label_sets.iter() {
            let mut set = set.clone();
            set.extend(part.common_labels.iter().cloned());
            out.label_sets.push(set);
        }
        for s in part.samples.iter() {
            let mut s = *s;
            s.labels += offset;
            s.timestamp_ms = part.timestamp_ms;
            out.samples.push(s);
        }
    }
    out
}

fn many_series(n: usize) -> Batch {
    let mut b = BatchBuilder::new();
    let f = b.gauge("synthetic_value", "", "");
    for i in 0..n {
        let s = i.to_string();
        b.sample(
            f,
            &[("series", s.as_str()), ("zone", "rack_7")],
            i as f64 * 1.5,
        );
    }
    b.timestamp_ms(1_700_000_000_000);
    b.finish()
}

/// The compressed remote-write request body.
fn remote_write(batch: &Batch) -> Vec<u8> {
    let enc = metricsd_remote_write::encode(batch, 0);
    let request = metricsd_remote_write::write_request(&enc, 0, enc.series.len(), &[]);
    snap::raw::Encoder::new()
        .compress_vec(&request)
        .expect("snappy")
}

/// The compressed line-protocol request body.
fn influx(batch: &Batch, layout: Layout) -> Vec<u8> {
    let enc = metricsd_influxdb::encode(batch, layout, Precision::Milliseconds, 0);
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(enc.body.len() / 4),
        flate2::Compression::fast(),
    );
    gz.write_all(&enc.body).expect("gzip");
    gz.finish().expect("gzip")
}

fn bench(c: &mut Criterion) {
    let batches = [
        ("gpu_node_320", gpu_node(1_700_000_000_000, 0.0)),
        ("gpu_node_merged_3200", merged_gpu_node()),
        ("series_10k", many_series(10_000)),
    ];
    eprintln!("bytes on the wire per sample (compressed request body):");
    for (name, batch) in &batches {
        let n = batch.samples.len() as f64;
        eprintln!(
            "  {name}: remote write + snappy {:.2}, line protocol grouped + gzip {:.2}, per_metric + gzip {:.2}",
            remote_write(batch).len() as f64 / n,
            influx(batch, Layout::Grouped).len() as f64 / n,
            influx(batch, Layout::PerMetric).len() as f64 / n,
        );
    }
    let mut group = c.benchmark_group("wire");
    for (name, batch) in &batches {
        group.throughput(Throughput::Elements(batch.samples.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("remote_write_snappy", name),
            batch,
            |b, batch| b.iter(|| remote_write(batch)),
        );
        group.bench_with_input(
            BenchmarkId::new("influx_grouped_gzip", name),
            batch,
            |b, batch| b.iter(|| influx(batch, Layout::Grouped)),
        );
        group.bench_with_input(
            BenchmarkId::new("influx_per_metric_gzip", name),
            batch,
            |b, batch| b.iter(|| influx(batch, Layout::PerMetric)),
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
