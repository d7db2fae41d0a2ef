//! W3C Trace Context (`traceparent`, <https://www.w3.org/TR/trace-context/>): which trace a
//! request or a message belongs to, and which span is its parent.
//!
//! A request that carries a valid `traceparent` joins the caller's trace; one without (or with
//! an invalid one, which the recommendation says to ignore) starts a trace of its own. The
//! same parser reads the `traceparent` stored in a message's headers when it is delivered, so
//! the consumer's side joins the producer's trace.

use std::fmt;

use axum::http::HeaderMap;

/// A 16-byte trace id, never all zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub u128);

/// An 8-byte span id, never all zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(pub u64);

impl TraceId {
    /// A random trace id.
    pub fn random() -> Self {
        loop {
            let id = rand::random::<u128>();
            if id != 0 {
                return Self(id);
            }
        }
    }

    /// Its 32 lowercase hex digits.
    pub fn parse(text: &str) -> Option<Self> {
        lower_hex(text, 32)
            .and_then(|id| u128::from_str_radix(id, 16).ok())
            .filter(|&id| id != 0)
            .map(Self)
    }

    /// The bytes in the order of its hex digits, as OTLP carries them.
    #[expect(
        clippy::big_endian_bytes,
        reason = "the id's bytes in the order of its hex digits"
    )]
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }
}

impl SpanId {
    /// A random span id.
    pub fn random() -> Self {
        loop {
            let id = rand::random::<u64>();
            if id != 0 {
                return Self(id);
            }
        }
    }

    /// Its 16 lowercase hex digits.
    pub fn parse(text: &str) -> Option<Self> {
        lower_hex(text, 16)
            .and_then(|id| u64::from_str_radix(id, 16).ok())
            .filter(|&id| id != 0)
            .map(Self)
    }

    /// The bytes in the order of its hex digits, as OTLP carries them.
    #[expect(
        clippy::big_endian_bytes,
        reason = "the id's bytes in the order of its hex digits"
    )]
    pub fn to_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// `text` if it is exactly `len` lowercase hex digits.
fn lower_hex(text: &str, len: usize) -> Option<&str> {
    (text.len() == len && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then_some(text)
}

/// A parsed `traceparent`: the trace, the caller's span (the parent of ours), and whether
/// the caller records the trace (the `sampled` flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace.
    pub trace_id: TraceId,
    /// The caller's span.
    pub parent_id: SpanId,
    /// Bit 0 of the trace flags: the caller records this trace.
    pub sampled: bool,
}

impl TraceParent {
    /// Parses a `traceparent` value as version 00 of the recommendation reads it:
    /// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, lowercase, neither id all
    /// zeros. A later version is read the same way when its first four fields have that
    /// shape (what follows a `-` after them is for that version); version `ff` is invalid.
    /// `None` for anything else: the caller's context is then ignored, as the
    /// recommendation says.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim_matches([' ', '\t']);
        let version = lower_hex(text.get(..2)?, 2)?;
        match (version, text.len()) {
            ("ff", _) => return None,
            ("00", 55) => {}
            ("00", _) => return None,
            (_, 55) => {}
            (_, len) if len > 55 && text.as_bytes()[55] == b'-' => {}
            _ => return None,
        }
        let fields = text.get(..55)?;
        let mut parts = fields.split('-');
        let (_, trace_id, parent_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let flags = u8::from_str_radix(lower_hex(flags, 2)?, 16).ok()?;
        Some(Self {
            trace_id: TraceId::parse(trace_id)?,
            parent_id: SpanId::parse(parent_id)?,
            sampled: flags & 1 == 1,
        })
    }
}

impl TraceParent {
    /// The request's `traceparent` header and what it says, if the request has exactly one
    /// and it is valid: several are as good as none, as the recommendation says.
    pub fn of_request(headers: &HeaderMap) -> Option<(&str, Self)> {
        let mut values = headers.get_all("traceparent").iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return None;
        };
        let text = value.to_str().ok()?.trim_matches([' ', '\t']);
        let parsed = Self::parse(text).filter(|_| text.len() <= 256)?;
        Some((text, parsed))
    }
}

impl fmt::Display for TraceParent {
    /// The version 00 header value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id,
            self.parent_id,
            u8::from(self.sampled)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_read_and_written_back_unchanged() {
        let parsed = TraceParent::parse(VALID).expect("valid");
        assert_eq!(
            parsed.trace_id,
            TraceId(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736)
        );
        assert_eq!(parsed.parent_id, SpanId(0x00f0_67aa_0ba9_02b7));
        assert!(parsed.sampled);
        assert_eq!(parsed.to_string(), VALID);
        let unsampled = TraceParent::parse(&VALID.replace("-01", "-00")).expect("valid");
        assert!(!unsampled.sampled);
        // Other flag bits are allowed; only `sampled` is read.
        assert!(TraceParent::parse(&VALID.replace("-01", "-03")).is_some_and(|t| t.sampled));
    }

    #[test]
    fn what_the_recommendation_calls_invalid_is_refused() {
        for bad in [
            "",
            "garbage",
            &VALID.to_uppercase(),
            &VALID.replace("4bf92f3577b34da6a3ce929d0e0e4736", &"0".repeat(32)),
            &VALID.replace("00f067aa0ba902b7", &"0".repeat(16)),
            &VALID.replacen("00-", "ff-", 1),
            &format!("{VALID}-extra"),
            &VALID[..54],
            &VALID.replace('-', "_"),
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1x",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_by_its_first_fields() {
        let later = VALID.replacen("00-", "01-", 1);
        assert!(TraceParent::parse(&later).is_some());
        assert!(TraceParent::parse(&format!("{later}-what-comes-next")).is_some());
        assert_eq!(TraceParent::parse(&format!("{later}x")), None);
    }

    #[test]
    fn random_ids_are_never_zero_and_print_at_full_width() {
        let trace = TraceId(1);
        assert_eq!(trace.to_string(), format!("{}1", "0".repeat(31)));
        assert_eq!(SpanId(0xab).to_string(), "00000000000000ab");
        assert_ne!(TraceId::random().0, 0);
        assert_ne!(SpanId::random().0, 0);
    }
}
