//! Redelivery delay after an expired lease: exponential, capped, with deterministic jitter.

use crate::config::Backoff;

/// The delay in ms before the redelivery that follows failed delivery number `attempt`
/// (1 for the first): `initial × multiplier^(attempt−1)`, capped at `max`, then scaled by a
/// jitter factor in [0.5, 1.0) ("equal jitter"), so that messages that expired together do
/// not all come back in the same millisecond.
///
/// The jitter is a hash of `(offset, attempt)`, not a random draw: the delivery core stays a
/// pure function of its inputs, and a model test can replay it.
pub fn delay_ms(backoff: &Backoff, attempt: u32, offset: u64) -> u64 {
    let initial = backoff.initial.as_millis() as f64;
    let max = backoff.max.as_millis() as f64;
    let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
    let base = (initial * backoff.multiplier.powi(exponent)).min(max);
    let jitter = 0.5 + 0.5 * unit_hash(offset, attempt);
    // Truncation is intended: a delay in whole milliseconds.
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "0 ≤ value ≤ max"
    )]
    let delay = (base * jitter) as u64;
    delay
}

/// A number in [0, 1) from a 64-bit mix (splitmix64) of the inputs.
fn unit_hash(offset: u64, attempt: u32) -> f64 {
    let mut z = offset ^ (u64::from(attempt) << 48) ^ 0x9E37_79B9_7F4A_7C15;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn backoff() -> Backoff {
        Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
            multiplier: 2.0,
        }
    }

    #[test]
    fn delay_grows_exponentially_within_jitter_bounds() {
        for attempt in 1..=8u32 {
            let base = 1000.0 * 2f64.powi(attempt as i32 - 1);
            for offset in 0..200 {
                let d = delay_ms(&backoff(), attempt, offset) as f64;
                assert!(
                    d >= base * 0.5 - 1.0 && d < base,
                    "attempt {attempt}: {d} vs {base}"
                );
            }
        }
    }

    #[test]
    fn delay_is_capped_at_max() {
        for offset in 0..100 {
            assert!(delay_ms(&backoff(), 40, offset) < 300_000);
            assert!(delay_ms(&backoff(), u32::MAX, offset) >= 150_000);
        }
    }

    #[test]
    fn jitter_spreads_messages_that_expired_together() {
        let delays: std::collections::BTreeSet<u64> = (0..100)
            .map(|offset| delay_ms(&backoff(), 3, offset))
            .collect();
        assert!(delays.len() > 90, "only {} distinct delays", delays.len());
    }

    #[test]
    fn delay_is_a_function_of_its_inputs() {
        assert_eq!(delay_ms(&backoff(), 2, 77), delay_ms(&backoff(), 2, 77));
    }
}
