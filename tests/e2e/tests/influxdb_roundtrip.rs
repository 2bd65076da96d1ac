//! Property test: samples with arbitrary metric names, label names and values go through the
//! InfluxDB sink's encoder into a real InfluxDB 1.x and come back as the sink's README says:
//! equal; or with a label carried as far as line protocol allows (line breaks as `\n`, trailing
//! backslashes removed) or left out, reported as altered; or refused with a reason and reported
//! as dropped — never a line the server misreads.

use std::cell::Cell;
use std::collections::BTreeMap;

use metricsd_e2e::servers::InfluxServer;
use metricsd_e2e::Workdir;
use metricsd_influxdb::{encode, InfluxSink, Layout, Precision};
use metricsd_plugin_api::testing::{logs_of, SinkHarness};
use metricsd_plugin_api::BatchBuilder;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// Text from characters line protocol and InfluxQL find awkward, plus plain ones.
fn awkward(max: usize) -> impl Strategy<Value = String> {
    let chars = prop_oneof![
        8 => proptest::char::range('a', 'z'),
        1 => Just(' '),
        1 => Just(','),
        1 => Just('='),
        1 => Just('"'),
        1 => Just('\''),
        1 => Just('\\'),
        1 => Just('#'),
        1 => Just('\n'),
        1 => Just('ü'),
        1 => Just('🚀'),
        1 => Just('_'),
    ];
    proptest::collection::vec(chars, 0..max).prop_map(|v| v.into_iter().collect())
}

fn value() -> impl Strategy<Value = f64> {
    prop_oneof![
        6 => any::<f64>(),
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(0.0),
        1 => -1.0e6..1.0e6f64,
    ]
}

#[test]
fn arbitrary_names_and_values_round_trip_or_are_refused_with_a_reason() {
    let work = Workdir::new();
    let influx = InfluxServer::start(&work, false).expect("influxd");
    round_trip(&influx, Layout::PerMetric, "per_metric");
    round_trip(&influx, Layout::Grouped, "grouped");
}

/// An InfluxQL double-quoted identifier. (A query over several measurements, `FROM /.*/`,
/// would merge their schemas and rename a tag key that is another measurement's field key.)
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The (measurement, field key) a metric name becomes.
fn expected_names(name: &str, layout: Layout) -> (String, String) {
    match (layout, name.split_once('_')) {
        (Layout::Grouped, Some((m, f))) if !m.is_empty() && !f.is_empty() && f != "time" => {
            (m.to_string(), f.to_string())
        }
        _ => (name.to_string(), "value".to_string()),
    }
}

/// Whether a backslash stands before one of `,"= ` or at the end: InfluxDB 1.x would read it
/// as an escape.
fn ambiguous_backslash(s: &str) -> bool {
    let b = s.as_bytes();
    b.last() == Some(&b'\\')
        || b.windows(2)
            .any(|w| w[0] == b'\\' && b",\"= ".contains(&w[1]))
}

/// The tag a label becomes, by the README's rules (written independently of the encoder).
fn expected_tag(key: &str, value: &str) -> Option<(String, String)> {
    if value.is_empty()
        || key.is_empty()
        || key == "time"
        || key.contains(['\n', '\r'])
        || ambiguous_backslash(key)
    {
        return None;
    }
    let value = value.replace('\n', "\\n").replace('\r', "\\r");
    let value = value.trim_end_matches('\\');
    if value.is_empty() || ambiguous_backslash(value) {
        return None;
    }
    Some((key.to_string(), value.to_string()))
}

fn round_trip(influx: &InfluxServer, layout: Layout, db: &str) {
    influx
        .query("", &format!("CREATE DATABASE \"{db}\""))
        .expect("db");
    let config = format!(
        r#"{{"url":"http://127.0.0.1:{}","database":"{db}","layout":"{db}"}}"#,
        influx.port
    );
    let instance = format!("prop-{db}");
    let sink = SinkHarness::new::<InfluxSink>(&instance, &config).expect("sink");
    let case = Cell::new(0u64);
    let written = Cell::new(0u64);
    let refused = Cell::new(0u64);
    let altered = Cell::new(0u64);
    let mut runner = TestRunner::new(Config {
        cases: 500,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(
            &(awkward(12), awkward(8), awkward(12), value()),
            |(name, key, label, v)| {
                case.set(case.get() + 1);
                let case = case.get();
                // Each case gets a measurement of its own: InfluxDB renames a tag key that
                // equals a field key written earlier to the same measurement (`key_1`), which
                // is its schema at work, not the encoding. Names starting with `#` and empty
                // names are covered by the encoder's unit tests.
                let name = format!("m{case}{name}");
                // Keys the check itself uses (the case tag, the field) stay out of the way.
                let (measurement, field) = expected_names(&name, layout);
                prop_assume!(key != "case" && key != field);
                let case_tag = case.to_string();
                let mut b = BatchBuilder::new();
                let f = b.gauge(&name, "", "");
                b.sample(f, &[(key.as_str(), label.as_str()), ("case", &case_tag)], v);
                b.timestamp_ms(1_700_000_000_000 + case as i64);
                let batch = b.finish();
                let encoded = encode(&batch, layout, Precision::Milliseconds, 0);
                sink.write(&batch)
                    .map_err(|e| TestCaseError::fail(format!("write failed: {}", e.message)))?;
                if encoded.skipped == 1 {
                    // Refused by the encoder: a reason, and a drop report to the host.
                    refused.set(refused.get() + 1);
                    let reason = encoded.skipped_reason.clone().unwrap_or_default();
                    prop_assert!(!reason.is_empty());
                    let reported = logs_of(&instance)
                        .iter()
                        .any(|r| r.2 == "metricsd::dropped" && r.3.contains("invalid"));
                    prop_assert!(reported, "no drop report for {reason}");
                    return Ok(());
                }
                written.set(written.get() + 1);
                if encoded.altered == 1 {
                    altered.set(altered.get() + 1);
                    let reported = logs_of(&instance)
                        .iter()
                        .any(|r| r.2 == "metricsd::altered");
                    prop_assert!(reported, "no alteration report");
                }
                let rows = influx
                    .rows(
                        db,
                        &format!(
                            "SELECT * FROM {} WHERE \"case\" = '{case}'",
                            ident(&measurement)
                        ),
                    )
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(rows.len(), 1, "case {}: {:?}", case, rows);
                let row = &rows[0];
                prop_assert_eq!(row["_measurement"].as_str(), Some(measurement.as_str()));
                let mut tags = BTreeMap::new();
                for (k, val) in row {
                    if !["_measurement", "time", field.as_str(), "case"].contains(&k.as_str()) {
                        if let Some(s) = val.as_str() {
                            tags.insert(k.clone(), s.to_string());
                        }
                    }
                }
                let expected: BTreeMap<String, String> =
                    expected_tag(&key, &label).into_iter().collect();
                prop_assert_eq!(
                    encoded.altered == 1,
                    expected_tag(&key, &label) != Some((key.clone(), label.clone()))
                        && !label.is_empty()
                );
                prop_assert_eq!(tags, expected);
                prop_assert_eq!(row[field.as_str()].as_f64(), Some(v));
                prop_assert_eq!(row["time"].as_i64(), Some(1_700_000_000_000 + case as i64));
                Ok(())
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", influx.log()));
    // The generator reaches every outcome; the bounds are far below how often it does.
    assert!(written.get() > 40, "{db}: {} written", written.get());
    assert!(refused.get() > 40, "{db}: {} refused", refused.get());
    assert!(altered.get() > 20, "{db}: {} altered", altered.get());
}
