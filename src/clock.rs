//! The only place that reads the clock.
//!
//! Courier's times are milliseconds since the Unix epoch, but they advance with the
//! monotonic clock: [`Clock::now_ms`] is the wall time read once at start plus the monotonic
//! time elapsed since. Lease deadlines, delays and expiries therefore never jump when the
//! system clock is set (RELIABILITY.md rule 6), while the times written into records and
//! shown to clients stay readable wall-clock times.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A monotonic clock expressed in epoch milliseconds. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Clock {
    source: Source,
}

#[derive(Debug, Clone)]
enum Source {
    /// The wall clock read once, advanced by the monotonic clock.
    Monotonic { start: Instant, start_ms: u64 },
    /// Whatever the holder of the cell sets (tests that step time, such as the model check).
    Manual(Arc<AtomicU64>),
}

impl Clock {
    /// Reads the wall clock once and anchors the monotonic clock to it.
    #[expect(clippy::disallowed_methods, reason = "clock.rs is where time is read")]
    pub fn start() -> Self {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Self {
            source: Source::Monotonic {
                start: Instant::now(),
                start_ms: u64::try_from(wall.as_millis()).unwrap_or(u64::MAX),
            },
        }
    }

    /// A clock that reads `now_ms` from the cell, which its holder advances (tests that step
    /// time deterministically).
    pub fn manual(now_ms: Arc<AtomicU64>) -> Self {
        Self {
            source: Source::Manual(now_ms),
        }
    }

    /// Now, in epoch milliseconds, advancing monotonically.
    pub fn now_ms(&self) -> u64 {
        match &self.source {
            Source::Monotonic { start, start_ms } => {
                let elapsed = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
                start_ms.saturating_add(elapsed)
            }
            Source::Manual(now_ms) => now_ms.load(Ordering::Acquire),
        }
    }
}

/// Formats epoch milliseconds as RFC 3339 UTC with millisecond precision.
///
/// Written digit by digit: every delivered message carries two of these, and `format!` with
/// seven padded numbers cost a few per cent of the server's CPU under a drain.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX);
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let Ok(year @ 0..=9999) = u64::try_from(year) else {
        // Past year 9999: no fixed width, so the slow path.
        return format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60,
            ms % 1000
        );
    };
    let mut out = String::with_capacity(24);
    let mut digits = |value: u64, width: u32, then: char| {
        for place in (0..width).rev() {
            let digit = value / 10u64.pow(place) % 10;
            out.push(char::from(b'0' + u8::try_from(digit).unwrap_or(0)));
        }
        out.push(then);
    };
    let (month, day) = (month.unsigned_abs(), day.unsigned_abs());
    digits(year, 4, '-');
    digits(month, 2, '-');
    digits(day, 2, 'T');
    digits(rem / 3600, 2, ':');
    digits(rem % 3600 / 60, 2, ':');
    digits(rem % 60, 2, '.');
    digits(ms % 1000, 3, 'Z');
    out
}

/// Measures how long something took, on the monotonic clock (for metrics only: nothing is
/// decided by it).
#[derive(Debug, Clone, Copy)]
pub struct Stopwatch(Instant);

impl Stopwatch {
    /// Starts measuring.
    #[expect(clippy::disallowed_methods, reason = "clock.rs is where time is read")]
    pub fn start() -> Self {
        Self(Instant::now())
    }

    /// The time since [`Stopwatch::start`], in seconds.
    pub fn seconds(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}

/// Now, in nanoseconds since the Unix epoch, from the wall clock: the start and end of a
/// trace span (tracing only: nothing is decided by it).
#[expect(clippy::disallowed_methods, reason = "clock.rs is where time is read")]
pub fn unix_nanos() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_000_000_123), "2026-11-18T11:06:40.123Z");
        assert_eq!(rfc3339(253_402_300_799_999), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(253_402_300_800_000), "10000-01-01T00:00:00.000Z");
    }

    #[test]
    fn rfc3339_agrees_with_humantime() {
        // Every month boundary of 1970–2400, and odd instants in between.
        for ms in (0..430u64 * 365 * 86_400_000).step_by(86_400_000 * 14 + 3_723_457) {
            let ours = rfc3339(ms);
            let theirs = humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
            )
            .to_string();
            assert_eq!(ours, theirs, "{ms}");
        }
    }

    #[test]
    fn clock_never_goes_back() {
        let clock = Clock::start();
        let a = clock.now_ms();
        let b = clock.now_ms();
        assert!(b >= a);
    }
}
