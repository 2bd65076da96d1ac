//! metricsd sink that prints samples on standard output, as JSON lines (default) or as
//! Prometheus-style text lines. Used by `metricsd once` and for debugging pipelines.

use std::fmt::Write as _;
use std::io::{self, BufWriter, Stdout, Write};
use std::sync::Mutex;

use metricsd_plugin_api::exposition::{push_label_value, push_value};
use metricsd_plugin_api::{export_plugin, Batch, Context, Error, Result, Sink};
use serde::Deserialize;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One JSON object per sample: `{"name","kind","unit","labels","value","timestamp_ms"}`.
    Json,
    /// One line per sample: `name{label="value"} value timestamp_ms`.
    Text,
}

/// When output reaches the terminal or pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flush {
    /// After every batch.
    Batch,
    /// When the 64 KiB buffer is full, and when the host flushes (shutdown).
    Buffer,
}

/// The instance's `[sinks.config]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `json` (default) or `text`.
    #[serde(default = "default_format")]
    pub format: Format,
    /// `batch` (default) or `buffer`.
    #[serde(default = "default_flush")]
    pub flush: Flush,
}

fn default_format() -> Format {
    Format::Json
}

fn default_flush() -> Flush {
    Flush::Batch
}

/// The sink instance.
pub struct StdoutSink {
    format: Format,
    flush: Flush,
    out: Mutex<BufWriter<Stdout>>,
}

/// Encodes a batch in the given format, one line per sample.
pub fn encode(batch: &Batch, format: Format) -> String {
    let mut text = String::with_capacity(batch.samples.len() * 96);
    for sample in batch.samples.iter() {
        // The end of a series (see `is_stale_marker`) is not a value to print.
        if metricsd_plugin_api::is_stale_marker(sample.value) {
            continue;
        }
        let Some(family) = batch.family_of(sample) else {
            continue;
        };
        let ts = batch.timestamp_of(sample);
        match format {
            Format::Json => {
                let labels: serde_json::Map<String, serde_json::Value> = batch
                    .labels_of(sample)
                    .map(|l| (l.name.to_string(), l.value.as_str().into()))
                    .collect();
                let value = if sample.value.is_finite() {
                    serde_json::json!(sample.value)
                } else {
                    let mut s = String::new();
                    push_value(&mut s, sample.value);
                    serde_json::json!(s)
                };
                let obj = serde_json::json!({
                    "name": family.name.as_str(),
                    "kind": family.kind.as_str(),
                    "unit": family.unit.as_str(),
                    "labels": labels,
                    "value": value,
                    "timestamp_ms": ts,
                });
                let _ = writeln!(text, "{obj}");
            }
            Format::Text => {
                text.push_str(&family.name);
                let mut first = true;
                for l in batch.labels_of(sample) {
                    text.push(if first { '{' } else { ',' });
                    first = false;
                    text.push_str(&l.name);
                    text.push_str("=\"");
                    push_label_value(&mut text, &l.value);
                    text.push('"');
                }
                if !first {
                    text.push('}');
                }
                text.push(' ');
                push_value(&mut text, sample.value);
                if let Some(ts) = ts {
                    let _ = write!(text, " {ts}");
                }
                text.push('\n');
            }
        }
    }
    text
}

impl StdoutSink {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, BufWriter<Stdout>>> {
        self.out
            .lock()
            .map_err(|_| Error::fatal("stdout writer lock poisoned"))
    }
}

impl Sink for StdoutSink {
    type Config = Config;

    fn new(config: Config, _ctx: &Context) -> Result<Self> {
        Ok(StdoutSink {
            format: config.format,
            flush: config.flush,
            out: Mutex::new(BufWriter::with_capacity(64 * 1024, io::stdout())),
        })
    }

    fn write(&self, batch: &Batch) -> Result<()> {
        let text = encode(batch, self.format);
        let mut out = self.lock()?;
        out.write_all(text.as_bytes())?;
        if self.flush == Flush::Batch {
            out.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.lock()?.flush()?;
        Ok(())
    }

    fn close(&self) {
        if let Ok(mut out) = self.out.lock() {
            let _ = out.flush();
        }
    }
}

export_plugin! {
    name: "stdout",
    description: "Prints samples on stdout as JSON lines or Prometheus-style text",
    sink: StdoutSink,
}

#[cfg(test)]
mod tests {
    use super::*;
    use metricsd_plugin_api::BatchBuilder;

    fn batch() -> Batch {
        let mut b = BatchBuilder::new();
        let f = b.gauge("temp_celsius", "t", "celsius");
        b.sample(f, &[("name", "a \"quoted\"\\ \n line")], 1.5);
        b.sample(f, &[("name", "nan")], f64::NAN);
        b.common_label("node", "n1");
        b.timestamp_ms(1000);
        b.finish()
    }

    #[test]
    fn text_escapes_labels_and_special_values() {
        let text = encode(&batch(), Format::Text);
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(
            lines[0],
            r#"temp_celsius{name="a \"quoted\"\\ \n line",node="n1"} 1.5 1000"#
        );
        assert_eq!(lines[1], r#"temp_celsius{name="nan",node="n1"} NaN 1000"#);
    }

    #[test]
    fn json_lines_parse_back() {
        let text = encode(&batch(), Format::Json);
        let rows: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("valid json"))
            .collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["labels"]["name"], "a \"quoted\"\\ \n line");
        assert_eq!(rows[0]["labels"]["node"], "n1");
        assert_eq!(rows[0]["value"], 1.5);
        assert_eq!(rows[0]["kind"], "gauge");
        assert_eq!(rows[1]["value"], "NaN");
        assert_eq!(rows[1]["timestamp_ms"], 1000);
    }
}
