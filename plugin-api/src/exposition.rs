//! Helpers for sinks that write the Prometheus text or OpenMetrics formats: escaping and
//! number formatting exactly as the formats specify. Pure functions; nothing here crosses the
//! ABI.

use std::fmt::Write as _;

/// Appends a label value escaped for the text format and OpenMetrics (`\\`, `\"`, `\n`).
pub fn push_label_value(out: &mut String, value: &str) {
    push_escaped(out, value, |b| matches!(b, b'\\' | b'"' | b'\n'));
}

/// Appends `text` with the bytes `special` picks escaped (`\\`, `\"`, `\n`); runs without one
/// are copied whole. The special bytes are ASCII, so every run is whole UTF-8.
fn push_escaped(out: &mut String, text: &str, special: impl Fn(u8) -> bool) {
    let mut rest = text;
    while let Some(at) = rest.bytes().position(&special) {
        out.push_str(&rest[..at]);
        out.push_str(match rest.as_bytes()[at] {
            b'\\' => "\\\\",
            b'"' => "\\\"",
            _ => "\\n",
        });
        rest = &rest[at + 1..];
    }
    out.push_str(rest);
}

/// Appends HELP text escaped for the text format 0.0.4 (`\\`, `\n`).
pub fn push_help(out: &mut String, help: &str) {
    push_escaped(out, help, |b| matches!(b, b'\\' | b'\n'));
}

/// Appends HELP text escaped for OpenMetrics (`\\`, `\n`, `\"`).
pub fn push_help_openmetrics(out: &mut String, help: &str) {
    push_label_value(out, help);
}

/// Appends a sample value: `NaN`, `+Inf`, `-Inf`, or the shortest decimal that round-trips.
pub fn push_value(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.fract() == 0.0 && v.abs() < 1e15 && (v != 0.0 || v.is_sign_positive()) {
        // Whole numbers (counters, bytes, states) print as integers, which is what `{v}`
        // prints for them too, at a fraction of the cost.
        let _ = write!(out, "{}", v as i64);
    } else {
        let _ = write!(out, "{v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_as_the_format_says() {
        let mut s = String::new();
        push_label_value(&mut s, "a\\b\"c\nd é");
        assert_eq!(s, r#"a\\b\"c\nd é"#);
        let mut s = String::new();
        push_help(&mut s, "x \"y\"\\\n");
        assert_eq!(s, r#"x "y"\\\n"#);
    }

    #[test]
    fn special_values() {
        let mut s = String::new();
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 2.0, 0.25, -1e-7] {
            push_value(&mut s, v);
            s.push(' ');
        }
        assert_eq!(s, "NaN +Inf -Inf 2 0.25 -0.0000001 ");
    }

    #[test]
    fn whole_numbers_print_as_the_float_formatter_prints_them() {
        for v in [
            0.0,
            -0.0,
            1.0,
            -3.0,
            1e6,
            123_456_789_012.0,
            999_999_999_999_999.0,
            1e15,
            1e300,
        ] {
            let mut fast = String::new();
            push_value(&mut fast, v);
            assert_eq!(fast, format!("{v}"), "{v:?}");
        }
    }
}
