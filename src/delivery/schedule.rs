//! The retry schedule, as pure functions: when the next attempt is due after
//! a failure, with jitter, and what a `Retry-After` header asks for.

use std::time::Duration;

/// Delays between attempts: `delays[i]` follows the failure of attempt `i + 1`.
/// The first attempt is immediate; after the last delay's attempt fails, the
/// delivery is dead.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub delays: Vec<Duration>,
    /// Each delay is scaled by a random factor in `1 ± jitter`.
    pub jitter: f64,
    /// The longest `Retry-After` honoured.
    pub max_retry_after: Duration,
}

impl Schedule {
    /// Attempts in all: the immediate one and one per delay.
    pub fn max_attempts(&self) -> u32 {
        self.delays.len() as u32 + 1
    }

    /// The delay after attempt `attempt` (1-based) failed, or `None` when it
    /// was the last. `retry_after` (from a 429 or 503), clamped to
    /// `max_retry_after`, lengthens the schedule's delay, never shortens it:
    /// a receiver asking again and again for a second would otherwise use
    /// up a day's schedule in seconds. `unit` is a random number in [0, 1).
    pub fn next_delay(
        &self,
        attempt: u32,
        retry_after: Option<Duration>,
        unit: f64,
    ) -> Option<Duration> {
        let base = *self.delays.get(attempt.checked_sub(1)? as usize)?;
        let factor = 1.0 + self.jitter * (2.0 * unit - 1.0);
        let scheduled = base.mul_f64(factor.max(0.0));
        let asked = retry_after.map_or(Duration::ZERO, |a| a.min(self.max_retry_after));
        Some(scheduled.max(asked))
    }
}

/// Parses a schedule like `5s,5m,30m,2h,5h,10h,10h`.
pub fn parse_delays(text: &str) -> Result<Vec<Duration>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}")))
        .collect()
}

/// A `Retry-After` value: delay-seconds, or an HTTP date (relative to `now`).
pub fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    Some(
        (at.with_timezone(&chrono::Utc) - now)
            .to_std()
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> Schedule {
        Schedule {
            delays: parse_delays("5s,5m,30m,2h,5h,10h,10h").unwrap(),
            jitter: 0.1,
            max_retry_after: Duration::from_secs(3600),
        }
    }

    #[test]
    fn the_default_schedule_spans_about_a_day_in_eight_attempts() {
        let s = schedule();
        assert_eq!(s.max_attempts(), 8);
        let total: Duration = s.delays.iter().sum();
        assert_eq!(
            total.as_secs(),
            5 + 300 + 1800 + 7200 + 18000 + 36000 + 36000
        );
    }

    #[test]
    fn delays_follow_the_schedule_within_the_jitter_and_end() {
        let s = schedule();
        assert_eq!(s.next_delay(1, None, 0.5), Some(Duration::from_secs(5)));
        let low = s.next_delay(2, None, 0.0).unwrap();
        let high = s.next_delay(2, None, 0.999).unwrap();
        assert!(
            low >= Duration::from_secs(270) && high <= Duration::from_secs(330),
            "{low:?} {high:?}"
        );
        assert!(low < high);
        assert_eq!(s.next_delay(8, None, 0.5), None, "attempt 8 was the last");
        assert_eq!(s.next_delay(0, None, 0.5), None);
    }

    #[test]
    fn retry_after_lengthens_the_delay_never_shortens_it_and_is_clamped() {
        let s = schedule();
        assert_eq!(
            s.next_delay(1, Some(Duration::from_secs(42)), 0.5),
            Some(Duration::from_secs(42))
        );
        assert_eq!(
            s.next_delay(2, Some(Duration::from_secs(1)), 0.5),
            Some(Duration::from_secs(300)),
            "a second asked for: the schedule's five minutes"
        );
        assert_eq!(
            s.next_delay(1, Some(Duration::from_secs(999_999)), 0.5),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            s.next_delay(8, Some(Duration::from_secs(1)), 0.5),
            None,
            "no attempts left"
        );
    }

    #[test]
    fn retry_after_takes_seconds_or_an_http_date() {
        let now = chrono::DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .unwrap()
            .to_utc();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:29:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn schedules_parse_from_human_durations() {
        assert_eq!(
            parse_delays("100ms, 2s,1m").unwrap(),
            vec![
                Duration::from_millis(100),
                Duration::from_secs(2),
                Duration::from_secs(60)
            ]
        );
        assert!(parse_delays("5 parsecs").is_err());
    }
}
