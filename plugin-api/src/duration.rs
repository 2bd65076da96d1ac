//! Durations in config files (`"5s"`, `"250ms"`, `"1h 30m"`), for `#[serde(with = …)]`:
//! humantime's syntax, with one rule added: a duration longer than [`MAX`] is refused with a
//! clear error. Without it a typo such as `"300000000000years"` parses, and the first
//! `Instant + duration` at run time overflows and panics.
//!
//! ```
//! # use std::time::Duration;
//! #[derive(serde::Deserialize)]
//! struct Config {
//!     #[serde(with = "metricsd_plugin_api::duration")]
//!     timeout: Duration,
//!     #[serde(default, with = "metricsd_plugin_api::duration::option")]
//!     interval: Option<Duration>,
//! }
//! let c: Config = serde_json::from_str(r#"{"timeout": "5s"}"#).unwrap();
//! assert_eq!(c.timeout, Duration::from_secs(5));
//! assert!(serde_json::from_str::<Config>(r#"{"timeout": "300000000000years"}"#).is_err());
//! ```

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// The longest duration a config key accepts: ten years (365-day years).
pub const MAX: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Parses `text` as a duration of at most [`MAX`].
pub fn parse(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| format!("`{text}` is not a duration like 5s, 250ms or 1h 30m ({e})"))?;
    if d > MAX {
        return Err(format!(
            "`{text}` is longer than the longest duration accepted ({})",
            humantime::format_duration(MAX)
        ));
    }
    Ok(d)
}

/// Deserialises a duration string (see [`parse`]).
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse(&text).map_err(serde::de::Error::custom)
}

/// Serialises a duration as humantime text.
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

/// The same for `Option<Duration>` (use with `#[serde(default)]`).
pub mod option {
    use super::*;

    /// Deserialises an optional duration string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(text) => super::parse(&text)
                .map(Some)
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }

    /// Serialises an optional duration.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::serialize(d, s),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_bounds() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse(" 1h 30m "), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("3650days"), Ok(MAX));
        let e = parse("300000000000years").unwrap_err();
        assert!(
            e.contains("longer than the longest duration accepted"),
            "{e}"
        );
        assert!(parse("soon").unwrap_err().contains("not a duration"));
    }
}
