//! Signed publishes (`auth.signing`, SPEC §7): the `Courier-Signature` header of a publish,
//! a batch or a request, checked before anything is decided.
//!
//! `Courier-Signature: t=<unix seconds>,n=<nonce>,s=<hex HMAC-SHA256>` over
//! `"<t>.<n>.<raw body>"`, keyed by the caller's bearer token. A bad MAC, a time more than
//! [`MAX_SKEW_S`] from the server's, or a malformed header → 401 before the body is parsed; a
//! nonce used before within its window → 401 from the broker, which spends the nonce durably
//! with what the request writes ([`crate::broker::Signed`]).

use axum::http::{HeaderMap, StatusCode};
use ring::hmac;

use super::access::bearer_token;
use super::error::{ApiError, SIGNATURE_CHALLENGE};
use super::AppState;
use crate::auth::{constant_time_eq, Principal};
use crate::broker::Signed;

/// The header.
pub const HEADER: &str = "courier-signature";
/// How far a signature's time may be from the server's, seconds.
pub const MAX_SKEW_S: u64 = 300;
/// The signer name of the admin's signatures: no agent id has a `$`.
pub const ADMIN_SIGNER: &str = "$admin";
/// The longest nonce.
pub const MAX_NONCE_CHARS: usize = 64;

/// The signature of a request whose route needs one, checked: `None` when signing is off.
pub fn check(
    state: &AppState,
    principal: &Principal,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Option<Signed>, ApiError> {
    if !state.config.auth.signing {
        return Ok(None);
    }
    let signer = match principal {
        Principal::Agent(id) => id.to_string(),
        // Not a valid agent id, so the admin's nonces never meet an agent's.
        Principal::Admin => ADMIN_SIGNER.to_owned(),
        // Signing needs tokens; the configuration refuses one without the other.
        Principal::Anyone => return Ok(None),
    };
    let refused = |message: String| {
        state.access.count_bad_signature();
        tracing::warn!(signer, reason = %message, "signature refused");
        ApiError::new(StatusCode::UNAUTHORIZED, "bad_signature", message)
            .challenge(SIGNATURE_CHALLENGE)
    };
    let value = headers
        .get(HEADER)
        .ok_or_else(|| refused("this server needs signed publishes: send `Courier-Signature: t=<unix seconds>,n=<nonce>,s=<hex HMAC-SHA256 of \"t.n.<body>\" keyed by your token>`".into()))?;
    let parsed = value
        .to_str()
        .ok()
        .and_then(parse)
        .ok_or_else(|| refused("the Courier-Signature header is not `t=<unix seconds>,n=<nonce of 1-64 letters, digits, - or _>,s=<64 hex digits>`".into()))?;
    // In milliseconds, so that a signature is accepted exactly while its nonce counts
    // (until t + 300 s, the `until_ms` below), not for up to a second more.
    let now_ms = state.broker.clock().now_ms();
    let time_ms = parsed.time_s.saturating_mul(1000);
    if time_ms.abs_diff(now_ms) > MAX_SKEW_S * 1000 {
        return Err(refused(format!(
            "the signature's time t={} is {:.1} s from the server's ({}); more than {MAX_SKEW_S} s is refused: check the client's clock",
            parsed.time_s,
            time_ms.abs_diff(now_ms) as f64 / 1000.0,
            now_ms / 1000
        )));
    }
    let token = bearer_token(headers)
        .map_err(|_| refused("no bearer token to check the signature with".into()))?;
    let key = hmac::Key::new(hmac::HMAC_SHA256, token.as_bytes());
    let mut context = hmac::Context::with_key(&key);
    let mut digits = [0u8; 20];
    context.update(decimal(parsed.time_s, &mut digits));
    context.update(b".");
    context.update(parsed.nonce.as_bytes());
    context.update(b".");
    context.update(body);
    let expected = context.sign();
    if !constant_time_eq(expected.as_ref(), &parsed.mac) {
        return Err(refused("the signature does not match the body: sign \"t.n.<the exact body bytes>\" with HMAC-SHA256 keyed by the same token as the Authorization header".into()));
    }
    Ok(Some(Signed {
        signer,
        nonce: parsed.nonce,
        until_ms: time_ms.saturating_add(MAX_SKEW_S * 1000),
    }))
}

/// A parsed `Courier-Signature`.
#[derive(Debug, PartialEq, Eq)]
struct Parsed {
    time_s: u64,
    nonce: String,
    mac: [u8; 32],
}

/// Parses `t=…,n=…,s=…` (in any order, each once).
fn parse(text: &str) -> Option<Parsed> {
    let (mut time_s, mut nonce, mut mac) = (None, None, None);
    for part in text.split(',') {
        let (name, value) = part.trim().split_once('=')?;
        let slot_taken = match name {
            "t" => time_s.replace(value.parse::<u64>().ok()?).is_some(),
            "n" => {
                let good = !value.is_empty()
                    && value.len() <= MAX_NONCE_CHARS
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                if !good {
                    return None;
                }
                nonce.replace(value.to_owned()).is_some()
            }
            "s" => mac.replace(hex(value)?).is_some(),
            _ => return None,
        };
        if slot_taken {
            return None;
        }
    }
    Some(Parsed {
        time_s: time_s?,
        nonce: nonce?,
        mac: mac?,
    })
}

/// 64 hex digits → 32 bytes.
fn hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let digit = |b: u8| char::from(b).to_digit(16);
    let mut mac = [0u8; 32];
    for (byte, pair) in mac.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
        *byte = u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()?;
    }
    Some(mac)
}

/// `value` in decimal, as `format!` writes it, into `buf` (a `u64` has at most 20 digits).
fn decimal(mut value: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            return &buf[start..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_header_in_any_order_and_refuses_the_malformed() {
        let s = "ab".repeat(32);
        let parsed = parse(&format!("t=17,n=abc-1_x,s={s}")).unwrap();
        assert_eq!(parsed.time_s, 17);
        assert_eq!(parsed.nonce, "abc-1_x");
        assert_eq!(parsed.mac, [0xab; 32]);
        assert_eq!(parse(&format!("s={s}, n=abc-1_x, t=17")), Some(parsed));
        for bad in [
            String::new(),
            format!("t=17,n=abc,s={s},t=18"),
            format!("t=-1,n=abc,s={s}"),
            format!("t=17,n=a b,s={s}"),
            format!("t=17,n=,s={s}"),
            format!("t=17,n={},s={s}", "x".repeat(65)),
            "t=17,n=abc,s=abcd".into(),
            format!("t=17,n=abc,s={}", "zz".repeat(32)),
            format!("t=17,n=abc,s={s},x=1"),
            "t=17,n=abc".into(),
        ] {
            assert_eq!(parse(&bad), None, "{bad}");
        }
    }

    #[test]
    fn writes_times_in_decimal_as_format_does() {
        let mut buf = [0u8; 20];
        for value in [0, 7, 10, 1_764_000_000, u64::MAX] {
            assert_eq!(decimal(value, &mut buf), value.to_string().as_bytes());
        }
    }
}
