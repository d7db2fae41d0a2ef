//! Durations as configuration writes them: `250ms`, `30s`, `5m`, `2h`, `7d`, or any other
//! form humantime reads (`1h 30m`, `1.5h`, `2weeks`); never a bare number, whose unit a
//! reader would have to guess. The one duration parser of the workspace: the server's
//! configuration and [`crate::FsyncPolicy`]'s `interval:<duration>` both use it.

use std::time::Duration;

/// Why a text is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// A number without its unit (`30`: seconds? milliseconds?).
    #[error("`{0}` has no unit; write it as 250ms, 30s, 5m, 2h or 7d")]
    NoUnit(String),
    /// A unit that humantime does not know.
    #[error("unknown unit `{unit}` in `{text}`; use ms, s, m, h or d")]
    UnknownUnit {
        /// The whole text.
        text: String,
        /// The unit as written.
        unit: String,
    },
    /// Not a duration at all.
    #[error("`{text}` is not a duration ({reason}); write it as 250ms, 30s, 5m, 2h or 7d")]
    Invalid {
        /// The whole text.
        text: String,
        /// What humantime found wrong.
        reason: String,
    },
}

/// Parses a duration such as `250ms`, `30s`, `5m`, `2h` or `7d`; a bare number is refused.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    // humantime takes a bare `0` as zero; every other bare number it refuses as a unit of "".
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DurationError::NoUnit(text.to_owned()));
    }
    humantime::parse_duration(text).map_err(|error| match error {
        humantime::DurationError::UnknownUnit { unit, .. } if unit.is_empty() => {
            DurationError::NoUnit(text.to_owned())
        }
        humantime::DurationError::UnknownUnit { unit, .. } => DurationError::UnknownUnit {
            text: text.to_owned(),
            unit,
        },
        other => DurationError::Invalid {
            text: text.to_owned(),
            reason: other.to_string(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_and_refuse_bare_numbers() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("2h"), Ok(Duration::from_secs(7_200)));
        assert_eq!(parse("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse(" 1h 30m "), Ok(Duration::from_secs(5_400)));
        for bare in ["30", "0", "1h 30"] {
            let error = parse(bare).unwrap_err().to_string();
            assert!(error.contains("no unit"), "{bare}: {error}");
        }
        assert!(parse("3x")
            .unwrap_err()
            .to_string()
            .contains("unknown unit"));
        for bad in ["-1s", "", "ms", "s30", "99999999999999999999s"] {
            assert!(
                matches!(parse(bad), Err(DurationError::Invalid { .. })),
                "{bad} must be refused"
            );
        }
    }
}
