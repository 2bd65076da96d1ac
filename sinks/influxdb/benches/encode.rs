//! Line-protocol encoding: `cargo bench -p metricsd-sink-influxdb --bench encode`.
//!
//! `encode`: line protocol alone, in lines per second. `encode_gzip`: what the sink does per
//! write before the HTTP request (encode, then gzip at level 1), in samples per second on one
//! core; the bytes on the wire per sample are printed first. The batches are those of the
//! remote-write sink's bench (`metricsd-bench-batches`), so the two compare
//! (docs/BENCHMARKS.md).

use std::io::Write as _;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use metricsd_influxdb::{encode, Layout, Precision};
use metricsd_plugin_api::Batch;

/// The gzip-compressed request body.
fn gzipped(batch: &Batch, layout: Layout) -> Vec<u8> {
    let enc = encode(batch, layout, Precision::Milliseconds, 0);
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(enc.body.len() / 4),
        flate2::Compression::fast(),
    );
    gz.write_all(&enc.body).expect("gzip");
    gz.finish().expect("gzip")
}

fn bench(c: &mut Criterion) {
    let batches = metricsd_bench_batches::all();
    let layouts = [
        ("per_metric", Layout::PerMetric),
        ("grouped", Layout::Grouped),
    ];
    for (name, batch) in &batches {
        let n = batch.samples.len() as f64;
        for (layout_name, layout) in layouts {
            let raw = encode(batch, layout, Precision::Milliseconds, 0).body.len();
            eprintln!(
                "{name}: line protocol {layout_name} {:.2} bytes/sample uncompressed, {:.2} with gzip",
                raw as f64 / n,
                gzipped(batch, layout).len() as f64 / n,
            );
        }
    }
    let mut group = c.benchmark_group("encode");
    for (name, batch) in &batches {
        for (layout_name, layout) in layouts {
            let lines = encode(batch, layout, Precision::Milliseconds, 0)
                .lines
                .len();
            group.throughput(Throughput::Elements(lines as u64));
            group.bench_with_input(
                BenchmarkId::new(layout_name, name),
                batch,
                |bench, batch| bench.iter(|| encode(batch, layout, Precision::Milliseconds, 0)),
            );
        }
    }
    group.finish();
    let mut group = c.benchmark_group("encode_gzip");
    for (name, batch) in &batches {
        group.throughput(Throughput::Elements(batch.samples.len() as u64));
        for (layout_name, layout) in layouts {
            group.bench_with_input(
                BenchmarkId::new(layout_name, name),
                batch,
                |bench, batch| bench.iter(|| gzipped(batch, layout)),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
