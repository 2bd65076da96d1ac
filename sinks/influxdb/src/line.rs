//! InfluxDB line protocol: escaping as the line-protocol reference says, and the two layouts.
//!
//! `measurement[,tag=value...] field=value[,field=value...] timestamp`
//!
//! * measurement: commas and spaces are escaped with a backslash;
//! * tag keys, tag values and field keys: commas, equals signs and spaces are escaped;
//! * field values here are always floats (metricsd samples are `f64`), written in the shortest
//!   form that reads back as the same number.
//!
//! What the protocol cannot carry is handled here rather than sent to be rejected by the
//! server (which refuses the whole line). A label is carried as far as it can be, as Telegraf
//! does: a line break or carriage return in a value is written as the two characters `\n` /
//! `\r`, and backslashes at the end of a value are removed (InfluxDB 1.x would read one as
//! escaping the delimiter after it). A label that still cannot be written (a backslash before
//! a delimiter inside the value, a name that is `time`, empty, or has a line break or such a
//! backslash) is left out of the line. Either way the sample is written and counted as
//! *altered*, with the reason. A sample itself is left out (counted as *skipped*) only when it
//! cannot be written at all: a NaN or infinite value (line protocol has no float for them), a
//! metric name that cannot be a measurement, or a series key (measurement and tags) longer
//! than InfluxDB's 65,535 bytes. An empty label value is left out, which is what an empty label
//! means in Prometheus too.

use std::collections::HashMap;

use metricsd_plugin_api::{Batch, Label};

/// How samples become lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// One line per measurement, label set and timestamp. The measurement is the metric name
    /// up to its first `_` and the field key the rest (`gpu_utilization_ratio` →
    /// measurement `gpu`, field `utilization_ratio`), so a GPU's metrics share a line.
    #[default]
    Grouped,
    /// One line per sample: measurement = metric name, one field `value`.
    PerMetric,
}

/// Timestamp precision of the written lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
pub enum Precision {
    /// Seconds.
    #[serde(rename = "s")]
    Seconds,
    /// Milliseconds (metricsd's own resolution).
    #[default]
    #[serde(rename = "ms")]
    Milliseconds,
    /// Microseconds.
    #[serde(rename = "us")]
    Microseconds,
    /// Nanoseconds.
    #[serde(rename = "ns")]
    Nanoseconds,
}

impl Precision {
    /// The `precision` query parameter.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Seconds => "s",
            Precision::Milliseconds => "ms",
            Precision::Microseconds => "us",
            Precision::Nanoseconds => "ns",
        }
    }

    fn convert_ms(self, ms: i64) -> i64 {
        match self {
            Precision::Seconds => ms.div_euclid(1000),
            Precision::Milliseconds => ms,
            Precision::Microseconds => ms.saturating_mul(1000),
            Precision::Nanoseconds => ms.saturating_mul(1_000_000),
        }
    }
}

/// A batch in line protocol.
#[derive(Debug, Default)]
pub struct Encoded {
    /// The lines, each ended by `\n`.
    pub body: Vec<u8>,
    /// Per line: where it ends in `body` and how many samples it carries.
    pub lines: Vec<(usize, usize)>,
    /// Samples left out because the protocol cannot carry them.
    pub skipped: usize,
    /// Why the first of them was left out.
    pub skipped_reason: Option<String>,
    /// Samples written with a label changed or left out.
    pub altered: usize,
    /// Why the first of them was altered.
    pub altered_reason: Option<String>,
}

impl Encoded {
    /// The bytes of lines `from..to`.
    pub fn slice(&self, from: usize, to: usize) -> &[u8] {
        let start = if from == 0 { 0 } else { self.lines[from - 1].0 };
        let end = if to == 0 { 0 } else { self.lines[to - 1].0 };
        &self.body[start..end]
    }

    /// Samples in lines `from..to`.
    pub fn samples_in(&self, from: usize, to: usize) -> usize {
        self.lines[from..to].iter().map(|l| l.1).sum()
    }

    fn alter(&mut self, samples: usize, why: &str) {
        self.altered += samples;
        if self.altered_reason.is_none() {
            self.altered_reason = Some(why.to_string());
        }
    }

    fn skip(&mut self, samples: usize, why: impl FnOnce() -> String) {
        self.skipped += samples;
        if self.skipped_reason.is_none() {
            self.skipped_reason = Some(why());
        }
    }
}

/// Escapes a measurement name.
pub fn escape_measurement(out: &mut Vec<u8>, s: &str) {
    escape(out, s, MEASUREMENT_SPECIAL);
}

/// Escapes a tag key, tag value or field key.
pub fn escape_key(out: &mut Vec<u8>, s: &str) {
    escape(out, s, KEY_SPECIAL);
}

fn escape(out: &mut Vec<u8>, s: &str, special: &[u8]) {
    let bytes = s.as_bytes();
    if !bytes.iter().any(|b| special.contains(b)) {
        out.extend_from_slice(bytes);
        return;
    }
    for &b in bytes {
        if special.contains(&b) {
            out.push(b'\\');
        }
        out.push(b);
    }
}

/// Why a name or label value cannot be written, if it cannot. InfluxDB 1.x reads a backslash
/// before any of `,"= ` as an escape wherever it stands (and one at the end as escaping the
/// delimiter after it), so such a backslash cannot be written as itself.
fn unrepresentable(what: &str, s: &str) -> Option<String> {
    let special = BACKSLASH_AMBIGUOUS;
    let bytes = s.as_bytes();
    // The common case, no line break and no backslash, in one pass.
    if !bytes.iter().any(|b| matches!(b, b'\n' | b'\r' | b'\\')) {
        return None;
    }
    if s.contains(['\n', '\r']) {
        Some(format!(
            "{what} {s:?} contains a line break, which line protocol cannot carry"
        ))
    } else if bytes.last() == Some(&b'\\')
        || bytes
            .windows(2)
            .any(|w| w[0] == b'\\' && special.contains(&w[1]))
    {
        Some(format!(
            "{what} {s:?} has a backslash before a delimiter or at its end, which InfluxDB would read as an escape"
        ))
    } else {
        None
    }
}

/// Why a name cannot be a measurement, if it cannot.
fn bad_measurement(name: &str) -> Option<String> {
    if name.is_empty() {
        Some("an empty metric name cannot be a measurement".to_string())
    } else if name.starts_with('#') {
        Some(format!(
            "metric name {name:?} starts with `#`, which makes the line a comment in line protocol"
        ))
    } else {
        unrepresentable("metric name", name)
    }
}

const MEASUREMENT_SPECIAL: &[u8] = b", ";
const KEY_SPECIAL: &[u8] = b",= ";
const BACKSLASH_AMBIGUOUS: &[u8] = b",\"= ";

/// The longest series key (measurement and tags) InfluxDB accepts.
pub const MAX_SERIES_KEY: usize = 65_535;

/// A label value as line protocol can carry it: line breaks written as `\n` / `\r`, trailing
/// backslashes removed; `Err` when a backslash before a delimiter remains (the label is left
/// out). The flag says whether the value was changed.
fn carried_value(value: &str) -> Result<(std::borrow::Cow<'_, str>, bool), String> {
    if unrepresentable("label value", value).is_none() {
        return Ok((std::borrow::Cow::Borrowed(value), false));
    }
    let replaced = value.replace('\n', "\\n").replace('\r', "\\r");
    let trimmed = replaced.trim_end_matches('\\');
    match unrepresentable("label value", trimmed) {
        Some(why) => Err(why),
        None => Ok((std::borrow::Cow::Owned(trimmed.to_string()), true)),
    }
}

/// The effective labels of a label set (own, then common ones it does not override), sorted
/// by name as InfluxDB prefers, rendered as `,k=v,k=v`, with the reason when a label had to be
/// changed or left out (see the module's description).
fn render_tags(own: &[Label], common: &[Label]) -> (Vec<u8>, Option<String>) {
    let mut out = Vec::with_capacity((own.len() + common.len()) * 16);
    let altered = render_tags_into(&mut out, &mut Vec::new(), own, common);
    (out, altered)
}

/// [`render_tags`] appending to `out`; `scratch` is reused between calls.
fn render_tags_into<'b>(
    out: &mut Vec<u8>,
    scratch: &mut Vec<&'b Label>,
    own: &'b [Label],
    common: &'b [Label],
) -> Option<String> {
    scratch.clear();
    scratch.extend(
        own.iter()
            .chain(
                common
                    .iter()
                    .filter(|c| !own.iter().any(|o| o.name == c.name)),
            )
            .filter(|l| !l.value.is_empty()),
    );
    if !scratch.is_sorted_by(|a, b| a.name.as_str() < b.name.as_str()) {
        scratch.sort_by(|a, b| a.name.as_str().cmp(b.name.as_str()));
        scratch.dedup_by(|a, b| a.name == b.name);
    }
    let mut altered: Option<String> = None;
    for l in scratch.iter() {
        let name = l.name.as_str();
        let name_problem = if name == "time" {
            Some("the label `time` cannot be an InfluxDB tag key (left out)".to_string())
        } else if name.is_empty() {
            Some("an empty label name cannot be an InfluxDB tag key (left out)".to_string())
        } else {
            unrepresentable("label name", name).map(|why| format!("{why} (left out)"))
        };
        if let Some(why) = name_problem {
            altered.get_or_insert(why);
            continue;
        }
        let value = match carried_value(l.value.as_str()) {
            Ok((value, changed)) => {
                if changed {
                    altered.get_or_insert_with(|| {
                        format!(
                            "label `{name}`: line breaks written as \\n and trailing backslashes removed, as InfluxDB cannot carry them"
                        )
                    });
                }
                value
            }
            Err(why) => {
                altered.get_or_insert_with(|| format!("label `{name}`: {why} (left out)"));
                continue;
            }
        };
        if value.is_empty() {
            continue;
        }
        out.push(b',');
        escape_key(out, name);
        out.push(b'=');
        escape_key(out, &value);
    }
    altered
}

/// Splits a metric name for the grouped layout: (measurement, field key).
fn split_name(name: &str) -> (&str, &str) {
    match name.split_once('_') {
        Some((m, f)) if !m.is_empty() && !f.is_empty() && f != "time" => (m, f),
        _ => (name, "value"),
    }
}

fn push_float(out: &mut Vec<u8>, v: f64) {
    let mut buf = ryu::Buffer::new();
    out.extend_from_slice(buf.format_finite(v).as_bytes());
}

fn push_int(out: &mut Vec<u8>, v: i64) {
    let mut buf = itoa::Buffer::new();
    out.extend_from_slice(buf.format(v).as_bytes());
}

/// Per-metric layout: where a label set's rendered tags are in the body.
#[derive(Clone)]
enum TagRange {
    Todo,
    /// The bytes, and why the labels were altered if they were.
    Done(usize, usize, Option<String>),
}

/// Grouped layout: a family's escaped measurement and field key.
type GroupedName = (Vec<u8>, Vec<u8>);

/// Grouped layout: a line being assembled: (first family, label set, timestamp, fields as
/// (family, value)).
type PendingLine = (usize, u32, i64, Vec<(usize, f64)>);

/// Encodes a batch; `now_ms` stamps samples of a batch that carries no timestamp.
pub fn encode(batch: &Batch, layout: Layout, precision: Precision, now_ms: i64) -> Encoded {
    let mut enc = Encoded {
        body: Vec::with_capacity(batch.samples.len() * 64),
        ..Encoded::default()
    };
    // Per label set, its rendered tags (once per batch).
    let mut tags: Vec<Option<(Vec<u8>, Option<String>)>> = vec![None; batch.label_sets.len()];
    let batch_ts = batch.timestamp_ms.into_option().unwrap_or(now_ms);
    // " <timestamp>\n" of samples without their own timestamp, rendered once.
    let mut batch_suffix = Vec::with_capacity(24);
    batch_suffix.push(b' ');
    push_int(&mut batch_suffix, precision.convert_ms(batch_ts));
    batch_suffix.push(b'\n');
    match layout {
        Layout::PerMetric => {
            let names: Vec<Result<Vec<u8>, String>> = batch
                .families
                .iter()
                .map(|f| match bad_measurement(f.name.as_str()) {
                    Some(why) => Err(why),
                    None => {
                        let mut m = Vec::with_capacity(f.name.len());
                        escape_measurement(&mut m, f.name.as_str());
                        Ok(m)
                    }
                })
                .collect();
            let mut ranges: Vec<TagRange> = vec![TagRange::Todo; batch.label_sets.len()];
            let mut scratch: Vec<&Label> = Vec::new();
            for s in batch.samples.iter() {
                let Some(name) = writable(&mut enc, &names, batch, s) else {
                    continue;
                };
                let line_start = enc.body.len();
                enc.body.extend_from_slice(name);
                // Each label set is rendered once, into the first line that uses it; later
                // lines copy those bytes.
                match ranges.get(s.labels as usize) {
                    Some(TagRange::Done(from, to, altered)) => {
                        let (from, to) = (*from, *to);
                        if let Some(why) = altered {
                            let why = why.clone();
                            enc.alter(1, &why);
                        }
                        enc.body.extend_from_within(from..to);
                    }
                    Some(TagRange::Todo) => {
                        let own = batch.label_sets[s.labels as usize].as_slice();
                        let from = enc.body.len();
                        let altered = render_tags_into(
                            &mut enc.body,
                            &mut scratch,
                            own,
                            batch.common_labels.as_slice(),
                        );
                        if let Some(why) = &altered {
                            enc.alter(1, why);
                        }
                        ranges[s.labels as usize] = TagRange::Done(from, enc.body.len(), altered);
                    }
                    None => {
                        enc.body.truncate(line_start);
                        enc.skip(1, || {
                            "a sample refers to a label set the batch does not have".into()
                        });
                        continue;
                    }
                }
                if enc.body.len() - line_start > MAX_SERIES_KEY {
                    enc.body.truncate(line_start);
                    enc.skip(1, series_key_too_long);
                    continue;
                }
                let out = &mut enc.body;
                out.extend_from_slice(b" value=");
                push_float(out, s.value);
                match s.timestamp_ms.into_option() {
                    None => out.extend_from_slice(&batch_suffix),
                    Some(ts) => {
                        out.push(b' ');
                        push_int(out, precision.convert_ms(ts));
                        out.push(b'\n');
                    }
                }
                enc.lines.push((out.len(), 1));
            }
        }
        Layout::Grouped => {
            // Per family: escaped (measurement, field key), or why it cannot be written.
            let names: Vec<Result<GroupedName, String>> = batch
                .families
                .iter()
                .map(|f| {
                    let (m, field) = split_name(f.name.as_str());
                    (
                        f,
                        bad_measurement(m).or_else(|| unrepresentable("metric name", field)),
                    )
                })
                .map(|(f, bad)| match bad {
                    Some(why) => Err(why),
                    None => {
                        let (m, field) = split_name(f.name.as_str());
                        let mut em = Vec::with_capacity(m.len());
                        escape_measurement(&mut em, m);
                        let mut ef = Vec::with_capacity(field.len());
                        escape_key(&mut ef, field);
                        Ok((em, ef))
                    }
                })
                .collect();
            // Families of one measurement share an id, so lines are keyed by integers.
            let mut measurement_ids: HashMap<&[u8], u32> = HashMap::new();
            let family_measurement: Vec<u32> = names
                .iter()
                .map(|n| match n {
                    Ok((m, _)) => {
                        let next = measurement_ids.len() as u32;
                        *measurement_ids.entry(m.as_slice()).or_insert(next)
                    }
                    Err(_) => u32::MAX,
                })
                .collect();
            // Lines in first-seen order: (measurement, label set, timestamp) → fields.
            let mut index: HashMap<(u32, u32, i64), usize> = HashMap::new();
            let mut lines: Vec<PendingLine> = Vec::new();
            for s in batch.samples.iter() {
                if writable(&mut enc, &names, batch, s).is_none() {
                    continue;
                }
                match tags_of(&mut tags, batch, s.labels) {
                    Some((_, None)) => {}
                    Some((_, Some(why))) => {
                        let why = why.clone();
                        enc.alter(1, &why);
                    }
                    None => {
                        enc.skip(1, || {
                            "a sample refers to a label set the batch does not have".into()
                        });
                        continue;
                    }
                }
                let ts = s.timestamp_ms.into_option().unwrap_or(batch_ts);
                let measurement = family_measurement[s.family as usize];
                let at = *index.entry((measurement, s.labels, ts)).or_insert_with(|| {
                    lines.push((s.family as usize, s.labels, ts, Vec::with_capacity(8)));
                    lines.len() - 1
                });
                let fields = &mut lines[at].3;
                // A field written twice for one line keeps its last value. (Family names are
                // unique in a batch, so one field key is one family.)
                match fields
                    .iter_mut()
                    .rev()
                    .find(|(f, _)| *f == s.family as usize)
                {
                    Some(existing) => existing.1 = s.value,
                    None => fields.push((s.family as usize, s.value)),
                }
            }
            for (family, set, ts, fields) in lines {
                let Some(Ok((measurement, _))) = names.get(family) else {
                    continue;
                };
                let Some(Some((tag_bytes, _))) = tags.get(set as usize) else {
                    continue;
                };
                if measurement.len() + tag_bytes.len() > MAX_SERIES_KEY {
                    enc.skip(fields.len(), series_key_too_long);
                    continue;
                }
                let out = &mut enc.body;
                out.extend_from_slice(measurement);
                out.extend_from_slice(tag_bytes);
                out.push(b' ');
                for (i, (f, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    if let Ok((_, key)) = &names[*f] {
                        out.extend_from_slice(key);
                    }
                    out.push(b'=');
                    push_float(out, *v);
                }
                out.push(b' ');
                push_int(out, precision.convert_ms(ts));
                out.push(b'\n');
                enc.lines.push((out.len(), fields.len()));
            }
        }
    }
    enc
}

fn series_key_too_long() -> String {
    format!("a series key (measurement and tags) longer than InfluxDB's {MAX_SERIES_KEY} bytes")
}

fn tags_of<'t>(
    tags: &'t mut [Option<(Vec<u8>, Option<String>)>],
    batch: &Batch,
    set: u32,
) -> Option<&'t (Vec<u8>, Option<String>)> {
    let slot = tags.get_mut(set as usize)?;
    if slot.is_none() {
        let own = batch.label_sets.get(set as usize)?;
        *slot = Some(render_tags(own.as_slice(), batch.common_labels.as_slice()));
    }
    slot.as_ref()
}

/// The encoded name of a sample's family when the sample can be written (a writable name, a
/// finite value); otherwise the sample is counted as skipped, with the reason.
fn writable<'n, T>(
    enc: &mut Encoded,
    names: &'n [Result<T, String>],
    batch: &Batch,
    s: &metricsd_plugin_api::Sample,
) -> Option<&'n T> {
    if metricsd_plugin_api::is_stale_marker(s.value) {
        // The end of a series: nothing InfluxDB stores; neither written nor dropped.
        return None;
    }
    match names.get(s.family as usize) {
        Some(Ok(name)) if s.value.is_finite() => Some(name),
        Some(Ok(_)) => {
            enc.skip(1, || non_finite(batch, s.family, s.value));
            None
        }
        Some(Err(why)) => {
            enc.skip(1, || why.clone());
            None
        }
        None => {
            enc.skip(1, || {
                "a sample refers to a family the batch does not have".to_string()
            });
            None
        }
    }
}

fn non_finite(batch: &Batch, family: u32, value: f64) -> String {
    let name = batch
        .families
        .get(family as usize)
        .map_or("?", |f| f.name.as_str());
    format!("`{name}` has the value {value}, which line protocol cannot carry")
}

/// The measurement and the field keys of one encoded line, escapes removed: what an InfluxDB
/// error message names.
pub fn line_shape(line: &[u8]) -> (String, Vec<String>) {
    #[derive(PartialEq)]
    enum At {
        Measurement,
        Tags,
        Key,
        Value,
        Timestamp,
    }
    let mut at = At::Measurement;
    let mut measurement = Vec::new();
    let mut key = Vec::new();
    let mut fields = Vec::new();
    let mut escaped = false;
    for &b in line {
        if escaped {
            escaped = false;
            match at {
                At::Measurement => measurement.push(b),
                At::Key => key.push(b),
                _ => {}
            }
            continue;
        }
        match (b, &at) {
            (b'\\', _) => escaped = true,
            (b',', At::Measurement) => at = At::Tags,
            (b' ', At::Measurement | At::Tags) => at = At::Key,
            (b'=', At::Key) => {
                fields.push(String::from_utf8_lossy(&std::mem::take(&mut key)).into_owned());
                at = At::Value;
            }
            (b',', At::Value) => at = At::Key,
            (b' ', At::Value) => at = At::Timestamp,
            (_, At::Measurement) => measurement.push(b),
            (_, At::Key) => key.push(b),
            _ => {}
        }
    }
    (String::from_utf8_lossy(&measurement).into_owned(), fields)
}

#[cfg(test)]
mod tests {
    use super::*;
    use metricsd_plugin_api::BatchBuilder;

    fn text(e: &Encoded) -> String {
        String::from_utf8(e.body.clone()).expect("utf-8")
    }

    #[test]
    fn escaping_follows_the_reference() {
        let mut b = BatchBuilder::new();
        let f = b.gauge("disk free", "", "");
        b.sample(f, &[("path", "/mnt/a b,c=d"), ("empty", "")], 1.5);
        b.common_label("node", "n 1");
        b.timestamp_ms(1_700_000_000_123);
        let e = encode(&b.finish(), Layout::PerMetric, Precision::Milliseconds, 0);
        assert_eq!(
            text(&e),
            "disk\\ free,node=n\\ 1,path=/mnt/a\\ b\\,c\\=d value=1.5 1700000000123\n"
        );
    }

    #[test]
    fn grouped_layout_joins_a_gpus_fields_into_one_line() {
        let mut b = BatchBuilder::new();
        let util = b.gauge("gpu_utilization_ratio", "", "ratio");
        let temp = b.gauge("gpu_temperature_celsius", "", "celsius");
        let set = b.label_set(&[("gpu", "0"), ("uuid", "GPU-1"), ("name", "H100")]);
        b.sample_in(util, set, 0.93);
        b.sample_in(temp, set, 61.0);
        b.timestamp_ms(1_000);
        let e = encode(&b.finish(), Layout::Grouped, Precision::Seconds, 0);
        assert_eq!(
            text(&e),
            "gpu,gpu=0,name=H100,uuid=GPU-1 utilization_ratio=0.93,temperature_celsius=61.0 1\n"
        );
        assert_eq!(e.lines, vec![(e.body.len(), 2)]);
    }

    #[test]
    fn values_it_cannot_carry_are_skipped_labels_are_carried_or_left_out() {
        let mut b = BatchBuilder::new();
        let f = b.gauge("x", "", "");
        b.sample(f, &[], f64::NAN);
        b.sample(f, &[], f64::INFINITY);
        b.sample(f, &[("a", "line\nbreak")], 1.0);
        b.sample(f, &[("a", "NVIDIA \"H100\" 80GB\\")], 2.0);
        b.sample(f, &[("time", "x"), ("b", "1")], 3.0);
        b.sample(f, &[("a", "ok")], 4.0);
        b.timestamp_ms(5);
        let e = encode(&b.finish(), Layout::PerMetric, Precision::Milliseconds, 0);
        assert_eq!(
            text(&e),
            "x,a=line\\nbreak value=1.0 5\nx,a=NVIDIA\\ \"H100\"\\ 80GB value=2.0 5\nx,b=1 value=3.0 5\nx,a=ok value=4.0 5\n"
        );
        assert_eq!(e.skipped, 2);
        assert!(e.skipped_reason.expect("reason").contains("NaN"));
        assert_eq!(e.altered, 3);
        assert!(e.altered_reason.expect("reason").contains("label `a`"));
    }

    #[test]
    fn a_backslash_before_a_delimiter_leaves_its_label_out_and_a_comment_name_is_refused() {
        let mut b = BatchBuilder::new();
        let f = b.gauge("x", "", "");
        b.sample(f, &[("a", "x\\,y"), ("gpu", "0")], 1.0);
        b.sample(f, &[("a", "x\\y")], 2.0);
        let hash = b.gauge("#x", "", "");
        b.sample(hash, &[], 3.0);
        b.timestamp_ms(1);
        let e = encode(&b.finish(), Layout::PerMetric, Precision::Milliseconds, 0);
        assert_eq!(text(&e), "x,gpu=0 value=1.0 1\nx,a=x\\y value=2.0 1\n");
        assert_eq!((e.skipped, e.altered), (1, 1));
        // The grouped layout alters the same way.
        let mut b = BatchBuilder::new();
        let f = b.gauge("gpu_name_length", "", "");
        b.sample(f, &[("gpu", "0"), ("name", "line\nbreak")], 1.0);
        b.timestamp_ms(1);
        let e = encode(&b.finish(), Layout::Grouped, Precision::Milliseconds, 0);
        assert_eq!(text(&e), "gpu,gpu=0,name=line\\nbreak name_length=1.0 1\n");
        assert_eq!(e.altered, 1);
    }

    #[test]
    fn series_keys_over_the_limit_are_skipped() {
        let long = "v".repeat(MAX_SERIES_KEY);
        for layout in [Layout::PerMetric, Layout::Grouped] {
            let mut b = BatchBuilder::new();
            let f = b.gauge("gpu_x", "", "");
            b.sample(f, &[("a", long.as_str())], 1.0);
            b.sample(f, &[("a", "short")], 2.0);
            b.timestamp_ms(1);
            let e = encode(&b.finish(), layout, Precision::Milliseconds, 0);
            assert_eq!(e.lines.len(), 1, "{layout:?}");
            assert_eq!(e.skipped, 1, "{layout:?}");
            assert!(e.skipped_reason.expect("reason").contains("65535"));
        }
    }

    #[test]
    fn precision_converts_milliseconds() {
        assert_eq!(Precision::Seconds.convert_ms(1_999), 1);
        assert_eq!(Precision::Microseconds.convert_ms(2), 2_000);
        assert_eq!(Precision::Nanoseconds.convert_ms(3), 3_000_000);
    }
}
