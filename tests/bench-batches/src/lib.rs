//! The batches the sink benchmarks encode (InfluxDB line protocol, remote write), so that
//! their numbers compare. Not part of any plugin.

use metricsd_plugin_api::{Batch, BatchBuilder};

/// One GPU node's collection: 8 GPUs × 40 metrics sharing each GPU's label set, like the NVML
/// collector's, with the node's static labels, at `ts`; values shifted by `step`.
pub fn gpu_node(ts: i64, step: f64) -> Batch {
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

/// `n` collections of [`gpu_node`] one second apart, merged the way the host merges queued
/// batches into one write (after an outage, or with `batch_wait`).
pub fn merged_gpu_node(n: usize) -> Batch {
    let mut out = Batch::default();
    for i in 0..n {
        let part = gpu_node(1_700_000_000_000 + i as i64 * 1000, i as f64 / 1000.0);
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

/// `n` series of one family, each with its own label set (a worst case for label caches).
pub fn many_series(n: usize) -> Batch {
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

/// The batches both sink benchmarks use, by name.
pub fn all() -> Vec<(&'static str, Batch)> {
    vec![
        ("gpu_node_320", gpu_node(1_700_000_000_000, 0.0)),
        ("gpu_node_merged_3200", merged_gpu_node(10)),
        ("series_10k", many_series(10_000)),
    ]
}
