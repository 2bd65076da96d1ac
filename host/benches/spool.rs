//! The disk spool's cost per batch: an append (encode, CRC, write to the page cache) under the
//! default sync policy (`spool_sync = "1s"`: the fsync runs once a second, off the append
//! path) and with `spool_sync = "0s"` (an `fdatasync` per append), plus the read back of a
//! batch evicted from the memory cache. Run with:
//!
//! ```text
//! cargo bench -p metricsd --bench spool
//! ```
//!
//! The spool lives in a temporary directory (`TMPDIR`, else `/tmp`): point `TMPDIR` at the
//! disk the agent's `spool_dir` is on, since the fsync cost is the disk's.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use metricsd::spool::{Options, Spool};
use metricsd_plugin_api::{Batch, BatchBuilder};

/// A batch like one collection of one GPU: 60 gauges with two labels.
fn gpu_batch() -> Arc<Batch> {
    let mut b = BatchBuilder::new();
    for i in 0..60 {
        let f = b.gauge(&format!("gpu_metric_{i}"), "A GPU metric.", "");
        b.sample(
            f,
            &[
                ("gpu", "0"),
                ("uuid", "GPU-8c3e2f0a-1b2c-4d5e-9f00-aabbccddeeff"),
            ],
            f64::from(i),
        );
    }
    Arc::new(b.finish())
}

fn bench(c: &mut Criterion) {
    let batch = gpu_batch();
    let mut group = c.benchmark_group("spool");
    group.throughput(Throughput::Elements(batch.samples.len() as u64));
    for (name, sync) in [
        ("append_sync_1s", Duration::from_secs(1)),
        ("append_sync_0s", Duration::ZERO),
    ] {
        let dir = tempfile::tempdir().expect("tmp");
        let options = Options {
            max_bytes: 64 * 1024 * 1024,
            cache_limit: 10_000,
            sync,
        };
        let (spool, _) = Spool::open(dir.path(), options).expect("open");
        let mut order = 0u64;
        group.bench_function(name, |b| {
            b.iter(|| {
                order += 1;
                spool.append(&batch, order).expect("append")
            })
        });
    }
    {
        // Read back from disk: no memory cache.
        let dir = tempfile::tempdir().expect("tmp");
        let options = Options {
            max_bytes: 64 * 1024 * 1024,
            cache_limit: 0,
            sync: Duration::from_secs(1),
        };
        let (spool, _) = Spool::open(dir.path(), options).expect("open");
        for order in 0..10_000 {
            spool.append(&batch, order).expect("append");
        }
        group.bench_function("read_back", |b| {
            b.iter(|| {
                let (group, _) = spool.front_group(1, u64::MAX);
                group.len()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
