//! Remote-write encoding: `cargo bench -p metricsd-sink-remote-write --bench encode`.
//!
//! What the sink does per write before the HTTP request: encode the protobuf `WriteRequest`
//! and compress it with snappy. Throughput is in samples per second on one core; the bytes on
//! the wire per sample are printed first. The batches are those of the InfluxDB sink's bench
//! (`metricsd-bench-batches`), so the two compare (docs/BENCHMARKS.md).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use metricsd_plugin_api::Batch;

/// The compressed request body.
fn remote_write(batch: &Batch) -> Vec<u8> {
    let enc = metricsd_remote_write::encode(batch, 0);
    let request = metricsd_remote_write::write_request(&enc, 0, enc.series.len(), &[]);
    snap::raw::Encoder::new()
        .compress_vec(&request)
        .expect("snappy")
}

fn bench(c: &mut Criterion) {
    let batches = metricsd_bench_batches::all();
    for (name, batch) in &batches {
        let n = batch.samples.len() as f64;
        let enc = metricsd_remote_write::encode(batch, 0);
        let raw = metricsd_remote_write::write_request(&enc, 0, enc.series.len(), &[]).len();
        eprintln!(
            "{name}: remote write {:.2} bytes/sample uncompressed, {:.2} with snappy",
            raw as f64 / n,
            remote_write(batch).len() as f64 / n,
        );
    }
    let mut group = c.benchmark_group("remote_write");
    for (name, batch) in &batches {
        group.throughput(Throughput::Elements(batch.samples.len() as u64));
        group.bench_with_input(BenchmarkId::new("encode", name), batch, |b, batch| {
            b.iter(|| metricsd_remote_write::encode(batch, 0))
        });
        group.bench_with_input(
            BenchmarkId::new("encode_snappy", name),
            batch,
            |b, batch| b.iter(|| remote_write(batch)),
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
