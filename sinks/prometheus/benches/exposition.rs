//! Cost of the Prometheus sink's two paths: a write (merge a batch into the held series and
//! re-render the exposition cache) and a scrape (answer from that cache). Run with:
//!
//! ```text
//! cargo bench -p metricsd-sink-prometheus --bench exposition
//! ```
//!
//! The sink is called through the same ABI vtable the host uses (the test harness).

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use metricsd_plugin_api::abi::{Header, HttpRequest};
use metricsd_plugin_api::testing::SinkHarness;
use metricsd_plugin_api::{Batch, BatchBuilder};
use metricsd_prometheus::PrometheusSink;

/// `n` series of one gauge family with three labels each, like the testkit collector of the
/// scrape benchmark with a node and a job label.
fn synthetic(n: usize, tick: f64) -> Batch {
    let mut b = BatchBuilder::with_capacity(n);
    let f = b.gauge("testkit_value", "Synthetic series.", "");
    for i in 0..n {
        let series = i.to_string();
        b.sample(
            f,
            &[
                ("node", "gpu-node-17"),
                ("job", "train"),
                ("series", &series),
            ],
            i as f64 + tick,
        );
    }
    b.finish()
}

/// What the system collector writes each second: ~100 series in ~30 families.
fn small(tick: f64) -> Batch {
    let mut b = BatchBuilder::new();
    for fam in 0..30 {
        let f = b.gauge(&format!("node_small_{fam}"), "A small family.", "");
        for i in 0..4 {
            b.sample(f, &[("device", &format!("dev{i}"))], tick + f64::from(i));
        }
    }
    b.finish()
}

fn sink() -> SinkHarness {
    SinkHarness::new::<PrometheusSink>("prometheus", "{}").expect("sink")
}

fn scrape_request() -> HttpRequest {
    HttpRequest {
        method: "GET".into(),
        path: "/metrics".into(),
        query: "".into(),
        headers: vec![Header {
            name: "accept".into(),
            value: "text/plain".into(),
        }]
        .into_iter()
        .collect(),
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("write");
    for n in [1_000, 10_000, 100_000] {
        let h = sink();
        let batches = [synthetic(n, 0.0), synthetic(n, 1.0)];
        h.write(&batches[1]).expect("write");
        let mut i = 0;
        group.throughput(Throughput::Elements(n as u64));
        group.sample_size(if n >= 100_000 { 10 } else { 30 });
        group.bench_with_input(BenchmarkId::new("held_series", n), &n, |b, _| {
            b.iter(|| {
                i ^= 1;
                h.write(black_box(&batches[i])).expect("write");
            })
        });
    }
    // A small batch written while a large family from another collector is held: what the
    // system collector's and the agent's own writes cost beside 10,000 synthetic series.
    let h = sink();
    h.write(&synthetic(10_000, 0.0)).expect("write");
    let batches = [small(0.0), small(1.0)];
    let mut i = 0;
    group.throughput(Throughput::Elements(120));
    group.bench_function("small_beside_10000", |b| {
        b.iter(|| {
            i ^= 1;
            h.write(black_box(&batches[i])).expect("write");
        })
    });
    group.finish();

    let mut group = c.benchmark_group("scrape");
    for n in [1_000, 10_000, 100_000] {
        let h = sink();
        h.write(&synthetic(n, 0.0)).expect("write");
        let request = scrape_request();
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("cached", n), &n, |b, _| {
            b.iter(|| black_box(h.render(&request).expect("render")))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
