//! node_exporter's `textfile` collector: the `*.prom` files of a directory (cron jobs and
//! scripts write them), in the Prometheus text format, passed on as they are; with
//! `node_textfile_mtime_seconds` for each file read and `node_textfile_scrape_error`.
//!
//! The parser is this module's own: the text format is line-based and small, and no
//! well-kept crate parses it without pulling a date library in for timestamps, which the
//! textfile collector refuses anyway.

use std::collections::HashSet;
use std::path::Path;
use std::time::UNIX_EPOCH;

use metricsd_plugin_api::{BatchBuilder, MetricKind};

use crate::source::Outcome;
use crate::SystemCollector;

/// The kind a `# TYPE` line gives a family.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Counter,
    Gauge,
    Untyped,
    Histogram,
    Summary,
}

/// A sample's labels, in file order until sorted.
pub type Labels = Vec<(String, String)>;

/// One family of a file: its `# HELP`, `# TYPE` and samples `(name, labels, value)`.
#[derive(Debug, PartialEq)]
pub struct Family {
    pub name: String,
    pub help: Option<String>,
    pub kind: Kind,
    pub samples: Vec<(String, Labels, f64)>,
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn unescape(s: &str, quotes: bool) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('\\') => out.push('\\'),
            Some('"') if quotes => out.push('"'),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => return Err("a line ends in `\\`".into()),
        }
    }
    Ok(out)
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        s => s.parse().map_err(|_| format!("`{s}` is not a number")),
    }
}

/// `{a="x",b="y"} 1` after the metric name: the labels and the rest of the line.
fn parse_labels(s: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    let mut rest = s.trim_start();
    loop {
        rest = rest.trim_start_matches([' ', ',']);
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let (name, after) = rest
            .split_once('=')
            .ok_or_else(|| "a label without `=`".to_string())?;
        let name = name.trim();
        if !valid_name(name) || name.contains(':') {
            return Err(format!("`{name}` is not a label name"));
        }
        let after = after
            .trim_start()
            .strip_prefix('"')
            .ok_or_else(|| format!("label `{name}`: the value is not quoted"))?;
        // The closing quote: the first `"` not escaped.
        let mut end = None;
        let mut escaped = false;
        for (i, c) in after.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        let end = end.ok_or_else(|| format!("label `{name}`: the value is not closed"))?;
        if labels.iter().any(|(n, _)| n == name) {
            return Err(format!("label `{name}` given twice"));
        }
        labels.push((name.to_string(), unescape(&after[..end], true)?));
        rest = &after[end + 1..];
    }
}

/// The family a sample name belongs to: itself, or for `_bucket`, `_sum`, `_count` the
/// histogram or summary declared under the base name.
fn family_of(sample: &str, families: &[Family]) -> Option<usize> {
    if let Some(i) = families.iter().position(|f| f.name == sample) {
        return Some(i);
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = sample.strip_suffix(suffix) {
            if let Some(i) = families
                .iter()
                .position(|f| f.name == base && matches!(f.kind, Kind::Histogram | Kind::Summary))
            {
                return Some(i);
            }
        }
    }
    None
}

/// The index of the family `found` picks, or of a new untyped family `name` without help.
fn family_index(families: &mut Vec<Family>, name: &str, found: impl Fn(&Family) -> bool) -> usize {
    if let Some(i) = families.iter().position(found) {
        return i;
    }
    families.push(Family {
        name: name.to_string(),
        help: None,
        kind: Kind::Untyped,
        samples: Vec::new(),
    });
    families.len() - 1
}

/// A whole file; the first error refuses it (line number and what is wrong).
pub fn parse(text: &str) -> Result<Vec<Family>, String> {
    let mut families: Vec<Family> = Vec::new();
    let mut declared: HashSet<(String, &'static str)> = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}", n + 1);
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, char::is_whitespace);
            let (keyword, name, rest) = (words.next(), words.next(), words.next().unwrap_or(""));
            let (Some(keyword @ ("HELP" | "TYPE")), Some(name)) = (keyword, name) else {
                continue;
            };
            if !valid_name(name) {
                return Err(at(format!("`{name}` is not a metric name")));
            }
            let key = if keyword == "HELP" { "HELP" } else { "TYPE" };
            if !declared.insert((name.to_string(), key)) {
                return Err(at(format!("second {keyword} line for `{name}`")));
            }
            let i = family_index(&mut families, name, |f| f.name == name);
            if keyword == "HELP" {
                families[i].help = Some(unescape(rest.trim(), false).map_err(at)?);
            } else {
                if !families[i].samples.is_empty() {
                    return Err(at(format!("TYPE of `{name}` after its samples")));
                }
                families[i].kind = match rest.trim() {
                    "counter" => Kind::Counter,
                    "gauge" => Kind::Gauge,
                    "untyped" => Kind::Untyped,
                    "histogram" => Kind::Histogram,
                    "summary" => Kind::Summary,
                    other => return Err(at(format!("unknown type `{other}`"))),
                };
            }
            continue;
        }
        let name_end = line
            .find(|c: char| c == '{' || c.is_whitespace())
            .unwrap_or(line.len());
        let name = &line[..name_end];
        if !valid_name(name) {
            return Err(at(format!("`{name}` is not a metric name")));
        }
        let rest = line[name_end..].trim_start();
        let (labels, rest) = match rest.strip_prefix('{') {
            Some(inner) => parse_labels(inner).map_err(at)?,
            None => (Vec::new(), rest),
        };
        let mut fields = rest.split_whitespace();
        let value = parse_value(fields.next().ok_or_else(|| at("no value".into()))?).map_err(at)?;
        if fields.next().is_some() {
            return Err(at(
                "a sample with a timestamp (node_exporter refuses those too)".into(),
            ));
        }
        let i = match family_of(name, &families) {
            Some(i) => i,
            None => family_index(&mut families, name, |_| false),
        };
        families[i].samples.push((name.to_string(), labels, value));
    }
    families.retain(|f| !f.samples.is_empty());
    Ok(families)
}

/// `textfile`: every `*.prom` file of `textfile_directory`, in name order. A file that does
/// not parse, or that redefines a family another source reports, is left out whole and
/// `node_textfile_scrape_error` is 1.
pub fn textfile(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let mut errored = false;
    let mut mtimes = Vec::new();
    let dir = c.textfile_directory.clone();
    if !dir.is_empty() {
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                let mut files: Vec<_> = entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "prom"))
                    .collect();
                files.sort();
                let mut seen = HashSet::new();
                for path in files {
                    match read_file(&path, out, &mut seen) {
                        Ok(mtime) => {
                            c.textfile_errors.remove(&path);
                            mtimes.push((path, mtime));
                        }
                        Err(e) => {
                            errored = true;
                            if c.textfile_errors.insert(path.clone()) {
                                tracing::warn!(
                                    "textfile {}: {e}; the file is left out until it is fixed",
                                    path.display()
                                );
                            }
                        }
                    }
                }
            }
            Err(e) => {
                errored = true;
                tracing::debug!("cannot read the textfile directory {dir}: {e}");
            }
        }
    }
    if !mtimes.is_empty() {
        let f = out.gauge(
            "node_textfile_mtime_seconds",
            "Unixtime mtime of textfiles successfully read.",
            "seconds",
        );
        for (path, mtime) in mtimes {
            out.sample(f, &[("file", &path.display().to_string())], mtime);
        }
    }
    let f = out.gauge(
        "node_textfile_scrape_error",
        "1 if there was an error opening or reading a file, 0 otherwise",
        "",
    );
    out.sample(f, &[], if errored { 1.0 } else { 0.0 });
    Ok(())
}

/// One file into `out`; its modification time.
fn read_file(
    path: &Path,
    out: &mut BatchBuilder,
    seen: &mut HashSet<(String, Labels)>,
) -> Result<f64, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let mtime = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .map_err(|e| e.to_string())?
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as f64)
        .unwrap_or(0.0);
    let families = parse(&text)?;
    let file = path.display().to_string();
    // Histograms and summaries travel as their untyped series (`_bucket`, `_sum`, `_count`,
    // quantiles): metricsd's batches have no histogram kind.
    let mut declarations = Vec::new();
    for f in &families {
        let help = f
            .help
            .clone()
            .unwrap_or_else(|| format!("Metric read from {file}"));
        let kind = match f.kind {
            Kind::Counter => MetricKind::COUNTER,
            Kind::Gauge => MetricKind::GAUGE,
            _ => MetricKind::UNTYPED,
        };
        for (sample, _, _) in &f.samples {
            if declarations.iter().any(|(n, _, _)| n == sample) {
                continue;
            }
            if let Some(existing) = out.declared(sample) {
                if existing.kind != kind
                    || existing.help.as_str() != help
                    || !existing.unit.is_empty()
                {
                    return Err(format!(
                        "`{sample}` is already reported (as {}, help {:?}) by another source",
                        existing.kind.as_str(),
                        existing.help.as_str()
                    ));
                }
            }
            declarations.push((sample.clone(), help.clone(), kind));
        }
    }
    for (name, help, kind) in &declarations {
        out.family(name, help, "", *kind);
    }
    for f in families {
        for (sample, mut labels, value) in f.samples {
            labels.sort();
            if !seen.insert((sample.clone(), labels.clone())) {
                continue;
            }
            let Some((_, help, kind)) = declarations.iter().find(|(n, _, _)| *n == sample) else {
                continue;
            };
            let family = out.family(&sample, help, "", *kind);
            let labels: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            out.sample(family, &labels, value);
        }
    }
    Ok(mtime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_text_format() {
        let families = parse(
            "# HELP backup_age_seconds Age of the \\\\ last \\n backup.\n# TYPE backup_age_seconds gauge\nbackup_age_seconds{job=\"db\",path=\"/a \\\"b\\\"\"} 12.5\nbackup_age_seconds{job=\"web\"} +Inf\n\n# a comment\nraid_ok 1\n# TYPE rpc histogram\nrpc_bucket{le=\"0.1\"} 3\nrpc_bucket{le=\"+Inf\"} 4\nrpc_sum 0.3\nrpc_count 4\n",
        )
        .expect("parses");
        assert_eq!(families.len(), 3);
        assert_eq!(families[0].name, "backup_age_seconds");
        assert_eq!(families[0].kind, Kind::Gauge);
        assert_eq!(
            families[0].help.as_deref(),
            Some("Age of the \\ last \n backup.")
        );
        assert_eq!(
            families[0].samples[0],
            (
                "backup_age_seconds".to_string(),
                vec![
                    ("job".to_string(), "db".to_string()),
                    ("path".to_string(), "/a \"b\"".to_string())
                ],
                12.5
            )
        );
        assert_eq!(families[0].samples[1].2, f64::INFINITY);
        assert_eq!(families[1].kind, Kind::Untyped);
        assert_eq!(families[2].kind, Kind::Histogram);
        assert_eq!(families[2].samples.len(), 4);
    }

    #[test]
    fn refuses_what_node_exporter_refuses() {
        for (text, what) in [
            ("up 1 1700000000000\n", "timestamp"),
            ("# TYPE a gauge\n# TYPE a counter\na 1\n", "second TYPE"),
            ("a{b=\"c} 1\n", "not closed"),
            ("a{b=c} 1\n", "not quoted"),
            ("a x\n", "not a number"),
            ("1a 1\n", "not a metric name"),
            ("# TYPE a bogus\na 1\n", "unknown type"),
            ("a 1\n# TYPE a gauge\n", "after its samples"),
            ("a{b=\"1\",b=\"2\"} 1\n", "given twice"),
        ] {
            let err = parse(text).expect_err(text);
            assert!(err.contains(what), "{text:?}: {err}");
            assert!(err.starts_with("line "), "{err}");
        }
    }
}
