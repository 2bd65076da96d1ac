//! Helpers for sinks that write the Prometheus text or OpenMetrics formats: escaping and
//! number formatting exactly as the formats specify. Pure functions; nothing here crosses the
//! ABI.

use std::fmt::Write as _;

/// Appends a label value escaped for the text format and OpenMetrics (`\\`, `\"`, `\n`).
pub fn push_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Appends HELP text escaped for the text format 0.0.4 (`\\`, `\n`).
pub fn push_help(out: &mut String, help: &str) {
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
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
}
