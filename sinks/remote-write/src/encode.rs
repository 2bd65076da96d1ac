//! A batch as the `timeseries` of remote-write `WriteRequest`s.
//!
//! What the specification asks of a sender, and what this encoder does:
//!
//! * every series has a `__name__` label and its labels sorted by name, without repeats: a
//!   label set's labels (its own, then the batch's common labels it does not override) are
//!   sorted once per batch and `__name__` is put in its place;
//! * label names match `[a-zA-Z_][a-zA-Z0-9_]*` and do not start with `__` (reserved), metric
//!   names match `[a-zA-Z_:][a-zA-Z0-9_:]*`; what does not is refused here with a reason and
//!   counted, rather than sent for the receiver to refuse the whole request;
//! * a label with an empty value is left out (it means "no label" in Prometheus);
//! * the samples of a series are in timestamp order, in one `TimeSeries` (a merged batch of
//!   several collections holds several samples of each series).
//!
//! A label set is encoded once per batch; each series copies those bytes and adds its
//! `__name__` and samples, using prost's wire-format primitives. `metricsd_prompb` decodes
//! the result in the tests.

use std::collections::HashMap;

use metricsd_plugin_api::{Batch, Label, MetricKind};
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
use prost::Message as _;

use metricsd_prompb::{MetricMetadata, MetricType};

/// One encoded series.
#[derive(Debug, Clone, Copy)]
pub struct SeriesEntry {
    /// Where its `timeseries` field ends in [`Encoded::body`].
    pub end: usize,
    /// How many samples it carries.
    pub samples: usize,
    /// Its family (index into the batch's families).
    pub family: u32,
}

/// A batch as remote-write time series.
#[derive(Debug, Default)]
pub struct Encoded {
    /// `WriteRequest.timeseries` fields (key, length, `TimeSeries`), one after the other.
    pub body: Vec<u8>,
    /// The series in `body`, in order.
    pub series: Vec<SeriesEntry>,
    /// Samples left out because a receiver would refuse them.
    pub skipped: usize,
    /// Why the first of them was left out.
    pub skipped_reason: Option<String>,
}

impl Encoded {
    /// The bytes of series `from..to`.
    pub fn slice(&self, from: usize, to: usize) -> &[u8] {
        let start = if from == 0 {
            0
        } else {
            self.series[from - 1].end
        };
        let end = if to == 0 { 0 } else { self.series[to - 1].end };
        &self.body[start..end]
    }

    /// Samples in series `from..to`.
    pub fn samples_in(&self, from: usize, to: usize) -> usize {
        self.series[from..to].iter().map(|s| s.samples).sum()
    }

    /// The families of series `from..to`, each once, in order of first use.
    pub fn families_in(&self, from: usize, to: usize) -> Vec<u32> {
        let mut seen = Vec::new();
        for s in &self.series[from..to] {
            if !seen.contains(&s.family) {
                seen.push(s.family);
            }
        }
        seen
    }

    fn skip(&mut self, samples: usize, why: impl FnOnce() -> String) {
        self.skipped += samples;
        if self.skipped_reason.is_none() {
            self.skipped_reason = Some(why());
        }
    }
}

/// Whether `name` is a metric name every remote-write receiver accepts.
pub fn valid_metric_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_' || b == b':')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

/// Whether `name` is a label name every remote-write receiver accepts (reserved `__` names
/// excluded).
pub fn valid_label_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    !name.starts_with("__")
        && matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Length of a `Label` message (without its key and length).
fn label_len(name: &str, value: &str) -> usize {
    1 + encoded_len_varint(name.len() as u64)
        + name.len()
        + 1
        + encoded_len_varint(value.len() as u64)
        + value.len()
}

/// Appends one `Label` field (`TimeSeries.labels`, tag 1) to `out`.
fn push_label(out: &mut Vec<u8>, name: &str, value: &str) {
    let inner = label_len(name, value);
    encode_key(1, WireType::LengthDelimited, out);
    encode_varint(inner as u64, out);
    encode_key(1, WireType::LengthDelimited, out);
    encode_varint(name.len() as u64, out);
    out.extend_from_slice(name.as_bytes());
    encode_key(2, WireType::LengthDelimited, out);
    encode_varint(value.len() as u64, out);
    out.extend_from_slice(value.as_bytes());
}

/// Length of one `Sample` field (`TimeSeries.samples`, tag 2), key included.
fn sample_field_len(timestamp: i64) -> usize {
    let inner = 1 + 8 + 1 + encoded_len_varint(timestamp as u64);
    1 + encoded_len_varint(inner as u64) + inner
}

/// Appends one `Sample` field to `out`.
fn push_sample(out: &mut Vec<u8>, value: f64, timestamp: i64) {
    let inner = 1 + 8 + 1 + encoded_len_varint(timestamp as u64);
    encode_key(2, WireType::LengthDelimited, out);
    encode_varint(inner as u64, out);
    encode_key(1, WireType::SixtyFourBit, out);
    out.extend_from_slice(&value.to_le_bytes());
    encode_key(2, WireType::Varint, out);
    encode_varint(timestamp as u64, out);
}

/// A label set's labels, encoded: those that sort before `__name__`, then those after.
struct EncodedLabels {
    bytes: Vec<u8>,
    /// Where `__name__` goes in `bytes`.
    name_at: usize,
}

/// The effective labels of a label set (own, then common ones it does not override, empty
/// values left out), sorted and encoded; `Err` with the reason when a receiver would refuse
/// one.
fn encode_labels(own: &[Label], common: &[Label]) -> Result<EncodedLabels, String> {
    let mut labels: Vec<&Label> = own
        .iter()
        .chain(
            common
                .iter()
                .filter(|c| !own.iter().any(|o| o.name == c.name)),
        )
        .collect();
    // Stable: of two labels with one name, the first (own before common) stays.
    labels.sort_by(|a, b| a.name.as_str().cmp(b.name.as_str()));
    labels.dedup_by(|a, b| a.name == b.name);
    labels.retain(|l| !l.value.is_empty());
    let mut bytes = Vec::with_capacity(labels.len() * 24);
    let mut name_at = None;
    for l in labels {
        let name = l.name.as_str();
        if !valid_label_name(name) {
            return Err(if name.starts_with("__") {
                format!("label name {name:?} starts with `__`, which Prometheus reserves")
            } else {
                format!("label name {name:?} is not a valid Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)")
            });
        }
        if name_at.is_none() && name > "__name__" {
            name_at = Some(bytes.len());
        }
        push_label(&mut bytes, name, l.value.as_str());
    }
    Ok(EncodedLabels {
        name_at: name_at.unwrap_or(bytes.len()),
        bytes,
    })
}

/// Encodes a batch; `now_ms` stamps samples of a batch that carries no timestamp.
pub fn encode(batch: &Batch, now_ms: i64) -> Encoded {
    let mut enc = Encoded {
        body: Vec::with_capacity(batch.samples.len() * 96),
        ..Encoded::default()
    };
    let batch_ts = batch.timestamp_ms.into_option().unwrap_or(now_ms);
    let names_ok: Vec<bool> = batch
        .families
        .iter()
        .map(|f| valid_metric_name(f.name.as_str()))
        .collect();
    // Families of one name are one series name, even where a batch lists a name twice.
    let mut first_of_name: HashMap<&str, u32> = HashMap::with_capacity(batch.families.len());
    let family_key: Vec<u32> = batch
        .families
        .iter()
        .enumerate()
        .map(|(i, f)| *first_of_name.entry(f.name.as_str()).or_insert(i as u32))
        .collect();
    // Label sets, each encoded once. A merged batch repeats each set per collection: equal
    // encodings share the index of the first (`canonical[i]`, into `sets`), so that one
    // series' samples of several collections become one `TimeSeries`.
    let sets: Vec<Result<EncodedLabels, String>> = batch
        .label_sets
        .iter()
        .map(|own| encode_labels(own, &batch.common_labels))
        .collect();
    let mut first_of_bytes: HashMap<&[u8], u32> = HashMap::with_capacity(sets.len());
    let canonical: Vec<Result<u32, &String>> = sets
        .iter()
        .enumerate()
        .map(|(i, set)| match set {
            Ok(l) => Ok(*first_of_bytes.entry(l.bytes.as_slice()).or_insert(i as u32)),
            Err(why) => Err(why),
        })
        .collect();
    // Each sample's series (family, canonical label set), numbered in order of first use.
    let mut series_of: HashMap<(u32, u32), u32> = HashMap::with_capacity(batch.samples.len());
    let mut series_keys: Vec<(u32, u32)> = Vec::new();
    let mut points: Vec<(u32, i64, f64)> = Vec::with_capacity(batch.samples.len());
    for s in batch.samples.iter() {
        let Some(family) = batch.families.get(s.family as usize) else {
            enc.skip(1, || {
                "a sample refers to a family the batch does not have".into()
            });
            continue;
        };
        if !names_ok[s.family as usize] {
            enc.skip(1, || {
                format!(
                    "metric name {:?} is not a valid Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)",
                    family.name.as_str()
                )
            });
            continue;
        }
        let set = match canonical.get(s.labels as usize) {
            Some(Ok(set)) => *set,
            Some(Err(why)) => {
                enc.skip(1, || why.to_string());
                continue;
            }
            None => {
                enc.skip(1, || {
                    "a sample refers to a label set the batch does not have".into()
                });
                continue;
            }
        };
        let next = series_keys.len() as u32;
        let family = family_key[s.family as usize];
        let series = *series_of.entry((family, set)).or_insert_with(|| {
            series_keys.push((family, set));
            next
        });
        let ts = s.timestamp_ms.into_option().unwrap_or(batch_ts);
        points.push((series, ts, s.value));
    }
    // Series in order of first use, each one's samples in timestamp order. One collection's
    // batch is already in that order.
    if !points.is_sorted_by(|a, b| (a.0, a.1) <= (b.0, b.1)) {
        points.sort_by_key(|p| (p.0, p.1));
    }
    let mut at = 0;
    while at < points.len() {
        let series = points[at].0;
        let end = at + points[at..].iter().take_while(|p| p.0 == series).count();
        let (family, set) = series_keys[series as usize];
        let name = batch.families[family as usize].name.as_str();
        // A canonical index always names a set that encoded.
        let Some(Ok(labels)) = sets.get(set as usize) else {
            at = end;
            continue;
        };
        let name_label = label_len("__name__", name);
        let samples_len: usize = points[at..end].iter().map(|p| sample_field_len(p.1)).sum();
        let ts_len = labels.bytes.len()
            + 1
            + encoded_len_varint(name_label as u64)
            + name_label
            + samples_len;
        encode_key(1, WireType::LengthDelimited, &mut enc.body);
        encode_varint(ts_len as u64, &mut enc.body);
        enc.body.extend_from_slice(&labels.bytes[..labels.name_at]);
        push_label(&mut enc.body, "__name__", name);
        enc.body.extend_from_slice(&labels.bytes[labels.name_at..]);
        for p in &points[at..end] {
            push_sample(&mut enc.body, p.2, p.1);
        }
        enc.series.push(SeriesEntry {
            end: enc.body.len(),
            samples: end - at,
            family,
        });
        at = end;
    }
    enc
}

/// The metadata of a family: what Prometheus sends after scraping the text format (the
/// family named as its series, info families as gauges).
pub fn metadata(batch: &Batch, family: u32) -> Option<MetricMetadata> {
    let f = batch.families.get(family as usize)?;
    let kind = match f.kind {
        MetricKind::COUNTER => MetricType::Counter,
        MetricKind::GAUGE | MetricKind::INFO => MetricType::Gauge,
        _ => MetricType::Unknown,
    };
    Some(MetricMetadata {
        r#type: kind as i32,
        metric_family_name: f.name.to_string(),
        help: f.help.to_string(),
        unit: f.unit.to_string(),
    })
}

/// An uncompressed `WriteRequest`: series `from..to` of `enc` and the given metadata.
pub fn write_request(
    enc: &Encoded,
    from: usize,
    to: usize,
    metadata: &[MetricMetadata],
) -> Vec<u8> {
    let series = enc.slice(from, to);
    let meta_len: usize = metadata
        .iter()
        .map(|m| {
            let len = m.encoded_len();
            1 + encoded_len_varint(len as u64) + len
        })
        .sum();
    let mut out = Vec::with_capacity(series.len() + meta_len);
    out.extend_from_slice(series);
    for m in metadata {
        // Field 3 of WriteRequest.
        encode_key(3, WireType::LengthDelimited, &mut out);
        encode_varint(m.encoded_len() as u64, &mut out);
        m.encode_raw(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use metricsd_plugin_api::BatchBuilder;
    use metricsd_prompb::{self as proto, WriteRequest};

    fn decode(enc: &Encoded, metadata: &[MetricMetadata]) -> WriteRequest {
        let bytes = write_request(enc, 0, enc.series.len(), metadata);
        WriteRequest::decode(bytes.as_slice()).expect("valid protobuf")
    }

    fn labels(ts: &proto::TimeSeries) -> Vec<(String, String)> {
        ts.labels
            .iter()
            .map(|l| (l.name.clone(), l.value.clone()))
            .collect()
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn series_have_sorted_labels_with_the_name_in_place() {
        let mut b = BatchBuilder::new();
        let temp = b.gauge("gpu_temperature_celsius", "Temperature.", "celsius");
        b.sample(
            temp,
            &[("uuid", "GPU-1"), ("gpu", "0"), ("Zone", "a"), ("_x", "y")],
            61.5,
        );
        b.common_label("node_id", "n1");
        b.common_label("gpu", "overridden");
        b.timestamp_ms(1_700_000_000_123);
        let batch = b.finish();
        let enc = encode(&batch, 0);
        assert_eq!(enc.skipped, 0);
        let meta = metadata(&batch, 0).expect("family");
        let req = decode(&enc, std::slice::from_ref(&meta));
        assert_eq!(req.timeseries.len(), 1);
        assert_eq!(
            labels(&req.timeseries[0]),
            pairs(&[
                ("Zone", "a"),
                ("__name__", "gpu_temperature_celsius"),
                ("_x", "y"),
                ("gpu", "0"),
                ("node_id", "n1"),
                ("uuid", "GPU-1"),
            ])
        );
        assert_eq!(
            req.timeseries[0].samples,
            vec![proto::Sample {
                value: 61.5,
                timestamp: 1_700_000_000_123
            }]
        );
        assert_eq!(req.metadata, vec![meta]);
        assert_eq!(req.metadata[0].r#type, MetricType::Gauge as i32);
        assert_eq!(req.metadata[0].unit, "celsius");
    }

    #[test]
    fn a_merged_batch_gives_one_series_with_its_samples_in_time_order() {
        let mut batch = Batch::default();
        for (ts, v) in [(3000, 3.0), (1000, 1.0), (2000, 2.0)] {
            let mut b = BatchBuilder::new();
            let c = b.counter("calls_total", "", "");
            let g = b.gauge("zero", "", "");
            b.sample(c, &[("a", "1"), ("empty", "")], v);
            b.sample(g, &[], 0.0);
            b.timestamp_ms(ts);
            let part = b.finish();
            // What the host's merge does: families and label sets appended per batch.
            let offset_f = batch.families.len() as u32;
            let offset_l = batch.label_sets.len() as u32;
            batch.families.extend(part.families.iter().cloned());
            batch.label_sets.extend(part.label_sets.iter().cloned());
            for s in part.samples.iter() {
                let mut s = *s;
                s.family += offset_f;
                s.labels += offset_l;
                s.timestamp_ms = part.timestamp_ms;
                batch.samples.push(s);
            }
        }
        // Families repeat under one name: they are one series name.
        let enc = encode(&batch, 0);
        let req = decode(&enc, &[]);
        assert_eq!(req.timeseries.len(), 2, "{req:?}");
        let calls = &req.timeseries[0];
        assert_eq!(
            labels(calls),
            pairs(&[("__name__", "calls_total"), ("a", "1")])
        );
        let got: Vec<(i64, f64)> = calls
            .samples
            .iter()
            .map(|s| (s.timestamp, s.value))
            .collect();
        assert_eq!(got, vec![(1000, 1.0), (2000, 2.0), (3000, 3.0)]);
        assert_eq!(enc.series[0].samples, 3);
        // A zero value is sent (a proto3 decoder reads the absent field as 0 too).
        assert_eq!(req.timeseries[1].samples.len(), 3);
        assert!(req.timeseries[1].samples.iter().all(|s| s.value == 0.0));
    }

    #[test]
    fn what_receivers_refuse_is_skipped_with_a_reason() {
        let mut b = BatchBuilder::new();
        let bad_name = b.gauge("gpu-temp", "", "");
        let good = b.gauge("ok", "", "");
        b.sample(bad_name, &[], 1.0);
        b.sample(good, &[("__reserved", "x")], 1.0);
        b.sample(good, &[("bad-label", "x")], 1.0);
        b.sample(good, &[("fine", "ünïcødé \"q\" \\ \n")], f64::NAN);
        let batch = b.finish();
        let enc = encode(&batch, 5);
        assert_eq!(enc.skipped, 3);
        assert!(
            enc.skipped_reason
                .as_deref()
                .is_some_and(|r| r.contains("\"gpu-temp\"")),
            "{:?}",
            enc.skipped_reason
        );
        let req = decode(&enc, &[]);
        assert_eq!(req.timeseries.len(), 1);
        assert_eq!(
            labels(&req.timeseries[0]),
            pairs(&[("__name__", "ok"), ("fine", "ünïcødé \"q\" \\ \n")])
        );
        assert!(req.timeseries[0].samples[0].value.is_nan());
        assert_eq!(
            req.timeseries[0].samples[0].timestamp, 5,
            "stamped with now"
        );
    }

    #[test]
    fn names_follow_the_prometheus_rules() {
        assert!(valid_metric_name("a:b_c9"));
        assert!(valid_metric_name("_x"));
        assert!(!valid_metric_name("9a"));
        assert!(!valid_metric_name(""));
        assert!(!valid_metric_name("a.b"));
        assert!(valid_label_name("_a"));
        assert!(!valid_label_name("__a"));
        assert!(!valid_label_name("a:b"));
        assert!(!valid_label_name(""));
    }

    #[test]
    fn slices_split_a_request_at_series_boundaries() {
        let mut b = BatchBuilder::new();
        let f = b.gauge("x", "", "");
        for i in 0..5 {
            b.sample(f, &[("i", &i.to_string())], i as f64);
        }
        b.timestamp_ms(1);
        let enc = encode(&b.finish(), 0);
        assert_eq!(enc.series.len(), 5);
        let first = WriteRequest::decode(write_request(&enc, 0, 2, &[]).as_slice()).expect("a");
        let rest = WriteRequest::decode(write_request(&enc, 2, 5, &[]).as_slice()).expect("b");
        assert_eq!(first.timeseries.len(), 2);
        assert_eq!(rest.timeseries.len(), 3);
        assert_eq!(rest.timeseries[0].samples[0].value, 2.0);
        assert_eq!(enc.samples_in(1, 4), 3);
        assert_eq!(enc.families_in(0, 5), vec![0]);
    }

    mod model {
        use super::*;
        use proptest::prelude::*;
        use std::collections::BTreeMap;

        fn label_name() -> impl Strategy<Value = String> {
            prop_oneof![
                8 => "[a-zA-Z_][a-zA-Z0-9_]{0,6}",
                1 => "[^\\x00]{0,4}",
            ]
        }

        /// (family name, labels, value, timestamp).
        type Input = (String, Vec<(String, String)>, f64, i64);
        /// Series (sorted labels, `__name__` among them) → (timestamp, value bits).
        type Model = BTreeMap<Vec<(String, String)>, Vec<(i64, u64)>>;

        fn samples() -> impl Strategy<Value = Vec<Input>> {
            proptest::collection::vec(
                (
                    prop_oneof![4 => "[a-z_:][a-z0-9_:]{0,5}", 1 => ".{0,3}"],
                    proptest::collection::vec((label_name(), ".{0,5}"), 0..4),
                    any::<f64>(),
                    -5i64..5_000_000_000_000,
                ),
                0..20,
            )
        }

        proptest! {
            #[test]
            fn decoded_series_match_a_simple_model(
                input in samples(),
                common in proptest::collection::vec((label_name(), ".{0,5}"), 0..3),
            ) {
                let mut b = BatchBuilder::new();
                for (name, labels, value, ts) in &input {
                    let f = b.gauge(name, "", "");
                    let refs: Vec<(&str, &str)> =
                        labels.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
                    let set = b.label_set(&refs);
                    b.sample_at(f, set, *value, *ts);
                }
                for (n, v) in &common {
                    b.common_label(n, v);
                }
                let batch = b.finish();
                let enc = encode(&batch, 0);
                let req = WriteRequest::decode(
                    write_request(&enc, 0, enc.series.len(), &[]).as_slice(),
                )
                .expect("decodes");
                // The model: effective labels (own first, then common), empty values out,
                // names checked; series keyed by their sorted labels, samples in time order.
                let mut model = Model::new();
                let mut skipped = 0;
                for (name, labels, value, ts) in &input {
                    let mut eff: BTreeMap<String, String> = BTreeMap::new();
                    for (n, v) in labels.iter().chain(common.iter()) {
                        eff.entry(n.clone()).or_insert_with(|| v.clone());
                    }
                    eff.retain(|_, v| !v.is_empty());
                    if !valid_metric_name(name) || !eff.keys().all(|k| valid_label_name(k)) {
                        skipped += 1;
                        continue;
                    }
                    eff.insert("__name__".into(), name.clone());
                    model.entry(eff.into_iter().collect()).or_default().push((*ts, value.to_bits()));
                }
                for v in model.values_mut() {
                    v.sort_by_key(|p| p.0);
                }
                prop_assert_eq!(enc.skipped, skipped);
                let mut got = Model::new();
                for ts in &req.timeseries {
                    let l = labels(ts);
                    let mut sorted = l.clone();
                    sorted.sort();
                    prop_assert_eq!(&l, &sorted, "labels sorted");
                    let samples: Vec<(i64, u64)> =
                        ts.samples.iter().map(|s| (s.timestamp, s.value.to_bits())).collect();
                    prop_assert!(samples.windows(2).all(|w| w[0].0 <= w[1].0));
                    prop_assert!(got.insert(l, samples).is_none(), "one TimeSeries per series");
                }
                prop_assert_eq!(got, model);
            }
        }
    }
}
