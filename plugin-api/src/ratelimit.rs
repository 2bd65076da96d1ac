//! Log lines for causes that repeat: the first event of a cause is logged when it starts, the
//! following ones are summarised at most once a minute with a count, and the end is logged
//! once, while the metrics count every event. A flood of errors cannot fill the journal or
//! drown the one line that matters.

use std::time::{Duration, Instant};

/// How often a repeating cause is summarised.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(60);

/// What to log for one event of a repeating cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Log {
    /// The first event: log it in full.
    First,
    /// A minute has passed: log a summary of this many events since the last line.
    Summary(u64),
    /// Counted, not logged.
    Quiet,
}

impl Log {
    /// Writes the line at warn level; `counter` names the metric that counts every event.
    pub fn warn(self, message: &str, counter: &str) {
        match self {
            Log::First => tracing::warn!(
                "{message} (repeats are summarised once a minute; {counter} counts every one)"
            ),
            Log::Summary(n) => {
                tracing::warn!("{message} ({n} times in the last minute or more)")
            }
            Log::Quiet => tracing::debug!("{message}"),
        }
    }

    /// Writes the line at error level; `counter` names the metric that counts every event.
    pub fn error(self, message: &str, counter: &str) {
        match self {
            Log::First => tracing::error!(
                "{message} (repeats are summarised once a minute; {counter} counts every one)"
            ),
            Log::Summary(n) => {
                tracing::error!("{message} ({n} times in the last minute or more)")
            }
            Log::Quiet => tracing::debug!("{message}"),
        }
    }
}

/// One repeating cause.
#[derive(Debug)]
pub struct Repeating {
    active: bool,
    total: u64,
    since_line: u64,
    last_line: Option<Instant>,
    interval: Duration,
}

impl Default for Repeating {
    fn default() -> Self {
        Self::new()
    }
}

impl Repeating {
    /// A cause that has not happened yet, summarised every [`SUMMARY_INTERVAL`].
    pub fn new() -> Self {
        Self::every(SUMMARY_INTERVAL)
    }

    /// A cause summarised every `interval`.
    pub fn every(interval: Duration) -> Self {
        Self {
            active: false,
            total: 0,
            since_line: 0,
            last_line: None,
            interval,
        }
    }

    /// One event of the cause: what to log.
    pub fn event(&mut self) -> Log {
        self.event_at(Instant::now())
    }

    fn event_at(&mut self, now: Instant) -> Log {
        self.total += 1;
        if !self.active {
            self.active = true;
            self.since_line = 0;
            self.last_line = Some(now);
            return Log::First;
        }
        self.since_line += 1;
        if self
            .last_line
            .is_some_and(|t| now.duration_since(t) >= self.interval)
        {
            self.last_line = Some(now);
            return Log::Summary(std::mem::take(&mut self.since_line));
        }
        Log::Quiet
    }

    /// Whether the cause is going on.
    pub fn active(&self) -> bool {
        self.active
    }

    /// The cause stopped: the number of events it had, once (then `None` until it starts again).
    pub fn ended(&mut self) -> Option<u64> {
        if !self.active {
            return None;
        }
        self.active = false;
        Some(std::mem::take(&mut self.total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_first_then_summaries_then_end() {
        let mut r = Repeating::every(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(r.event_at(t0), Log::First);
        for i in 1..1000 {
            assert_eq!(r.event_at(t0 + Duration::from_millis(i)), Log::Quiet);
        }
        assert_eq!(r.event_at(t0 + Duration::from_secs(61)), Log::Summary(1000));
        assert_eq!(r.event_at(t0 + Duration::from_secs(62)), Log::Quiet);
        assert_eq!(r.ended(), Some(1002));
        assert_eq!(r.ended(), None);
        assert_eq!(r.event_at(t0 + Duration::from_secs(63)), Log::First);
    }
}
