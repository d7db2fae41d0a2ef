//! A span as OTLP's protobuf `opentelemetry.proto.trace.v1.Span` (feature `otel`), encoded
//! straight from what was recorded: a span costs a few allocations and one pass of encoding,
//! where building the generated `Span` message first cost a dozen allocations per span. The
//! field numbers are those of `opentelemetry-proto`'s generated types, and the tests decode
//! what this writes with them.

use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};

use super::context::SpanId;
use super::spans::{Context, Kind};

/// A recorded span, ready to encode.
#[derive(Debug)]
pub struct Record {
    /// Its trace and id.
    pub context: Context,
    /// Its parent, and whether the parent is remote (the caller's, from a `traceparent`).
    pub parent: Option<(SpanId, bool)>,
    /// Another span it relates to.
    pub link: Option<Context>,
    /// Its name.
    pub name: Name,
    /// What it is.
    pub kind: Kind,
    /// When it started and ended, Unix nanoseconds.
    pub start_ns: u64,
    /// See `start_ns`.
    pub end_ns: u64,
    /// Its attributes, in order.
    pub attributes: Vec<(&'static str, Value)>,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// A span's name.
#[derive(Debug)]
pub enum Name {
    /// A fixed name (`publish`).
    Static(&'static str),
    /// A name made at run time (`POST /v1/messages`).
    Owned(String),
}

/// An attribute's value.
#[derive(Debug)]
pub enum Value {
    /// A string known at compile time.
    Static(&'static str),
    /// A string.
    Text(String),
    /// An integer.
    Int(i64),
}

/// Span flags: the W3C sampled flag, and whether the parent is remote.
const SAMPLED: u32 = 0x1;
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

/// `Span.kind` values.
fn kind_number(kind: Kind) -> u64 {
    match kind {
        Kind::Internal => 1,
        Kind::Server => 2,
        Kind::Producer => 4,
        Kind::Consumer => 5,
    }
}

/// `Status.code` of an error.
const STATUS_ERROR: u64 = 2;

/// The length of a length-delimited field of `len` bytes.
fn delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn put_delimited(tag: u32, bytes: &[u8], buf: &mut Vec<u8>) {
    put_header(tag, bytes.len(), buf);
    buf.extend_from_slice(bytes);
}

/// The key and length of a length-delimited field whose `len` bytes follow.
fn put_header(tag: u32, len: usize, buf: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
}

fn put_varint(tag: u32, value: u64, buf: &mut Vec<u8>) {
    encode_key(tag, WireType::Varint, buf);
    encode_varint(value, buf);
}

fn put_fixed64(tag: u32, value: u64, buf: &mut Vec<u8>) {
    encode_key(tag, WireType::SixtyFourBit, buf);
    buf.extend_from_slice(&value.to_le_bytes());
}

fn put_fixed32(tag: u32, value: u32, buf: &mut Vec<u8>) {
    encode_key(tag, WireType::ThirtyTwoBit, buf);
    buf.extend_from_slice(&value.to_le_bytes());
}

impl Value {
    fn text(&self) -> Option<&str> {
        match self {
            Self::Static(text) => Some(text),
            Self::Text(text) => Some(text),
            Self::Int(_) => None,
        }
    }

    /// `AnyValue`: `string_value` (1) or `int_value` (3).
    fn len(&self) -> usize {
        match (self, self.text()) {
            (_, Some(text)) => delimited_len(1, text.len()),
            (Self::Int(i), None) => key_len(3) + encoded_len_varint(*i as u64),
            _ => 0,
        }
    }

    fn put(&self, buf: &mut Vec<u8>) {
        match (self, self.text()) {
            (_, Some(text)) => put_delimited(1, text.as_bytes(), buf),
            (Self::Int(i), None) => put_varint(3, *i as u64, buf),
            _ => {}
        }
    }
}

/// `KeyValue`: `key` (1), `value` (2).
fn attribute_len(key: &str, value: &Value) -> usize {
    delimited_len(1, key.len()) + delimited_len(2, value.len())
}

/// `Link`: `trace_id` (1), `span_id` (2), `flags` (6).
fn link_len() -> usize {
    delimited_len(1, 16) + delimited_len(2, 8) + key_len(6) + 4
}

/// `Status`: `message` (2), `code` (3).
fn status_len(message: &str) -> usize {
    delimited_len(2, message.len()) + key_len(3) + encoded_len_varint(STATUS_ERROR)
}

impl Record {
    fn name(&self) -> &str {
        match &self.name {
            Name::Static(name) => name,
            Name::Owned(name) => name,
        }
    }

    fn flags(&self) -> u32 {
        match self.parent {
            Some((_, true)) => SAMPLED | HAS_IS_REMOTE | IS_REMOTE,
            Some((_, false)) => SAMPLED | HAS_IS_REMOTE,
            None => SAMPLED,
        }
    }

    /// The encoded length of the `Span` message.
    fn len(&self) -> usize {
        let mut len = delimited_len(1, 16) + delimited_len(2, 8);
        if self.parent.is_some() {
            len += delimited_len(4, 8);
        }
        len += delimited_len(5, self.name().len());
        len += key_len(6) + encoded_len_varint(kind_number(self.kind));
        len += 2 * (key_len(7) + 8);
        for (key, value) in &self.attributes {
            len += delimited_len(9, attribute_len(key, value));
        }
        if self.link.is_some() {
            len += delimited_len(13, link_len());
        }
        if let Some(message) = &self.error {
            len += delimited_len(15, status_len(message));
        }
        len + key_len(16) + 4
    }

    /// Appends the span as field `tag` of its parent message (2: `ScopeSpans.spans`).
    pub fn encode_as_field(&self, tag: u32, buf: &mut Vec<u8>) {
        let len = self.len();
        buf.reserve(delimited_len(tag, len));
        put_header(tag, len, buf);
        put_delimited(1, &self.context.trace_id.to_bytes(), buf);
        put_delimited(2, &self.context.span_id.to_bytes(), buf);
        if let Some((parent, _)) = self.parent {
            put_delimited(4, &parent.to_bytes(), buf);
        }
        put_delimited(5, self.name().as_bytes(), buf);
        put_varint(6, kind_number(self.kind), buf);
        put_fixed64(7, self.start_ns, buf);
        put_fixed64(8, self.end_ns, buf);
        for (key, value) in &self.attributes {
            put_header(9, attribute_len(key, value), buf);
            put_delimited(1, key.as_bytes(), buf);
            put_header(2, value.len(), buf);
            value.put(buf);
        }
        if let Some(link) = self.link {
            put_header(13, link_len(), buf);
            put_delimited(1, &link.trace_id.to_bytes(), buf);
            put_delimited(2, &link.span_id.to_bytes(), buf);
            put_fixed32(6, SAMPLED | HAS_IS_REMOTE, buf);
        }
        if let Some(message) = &self.error {
            put_header(15, status_len(message), buf);
            put_delimited(2, message.as_bytes(), buf);
            put_varint(3, STATUS_ERROR, buf);
        }
        put_fixed32(16, self.flags(), buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::context::TraceId;
    use opentelemetry_proto::tonic::common::v1::any_value;
    use opentelemetry_proto::tonic::trace::v1::{span, status, ScopeSpans};
    use prost::Message;

    fn context(trace: u128, span: u64) -> Context {
        Context {
            trace_id: TraceId(trace),
            span_id: SpanId(span),
        }
    }

    #[test]
    fn a_span_decodes_with_the_generated_types_field_for_field() {
        let record = Record {
            context: context(
                0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c,
                0xb7ad_6b71_6920_3331,
            ),
            parent: Some((SpanId(0x00f0_67aa_0ba9_02b7), true)),
            link: Some(context(7, 8)),
            name: Name::Owned("POST /v1/messages".into()),
            kind: Kind::Server,
            start_ns: 1_795_000_000_000_000_000,
            end_ns: 1_795_000_000_000_123_456,
            attributes: vec![
                ("http.route", Value::Static("/v1/messages")),
                ("messaging.message.id", Value::Text("m-1".into())),
                ("http.response.status_code", Value::Int(503)),
                ("courier.offset", Value::Int(0)),
                ("courier.big", Value::Int(i64::MAX)),
            ],
            error: Some("answered 503".into()),
        };
        let mut buf = Vec::new();
        record.encode_as_field(2, &mut buf);
        let decoded = ScopeSpans::decode(&buf[..]).expect("valid protobuf");
        assert_eq!(decoded.spans.len(), 1);
        let span = &decoded.spans[0];
        assert_eq!(hex(&span.trace_id), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(hex(&span.span_id), "b7ad6b7169203331");
        assert_eq!(hex(&span.parent_span_id), "00f067aa0ba902b7");
        assert_eq!(span.name, "POST /v1/messages");
        assert_eq!(span.kind, i32::from(span::SpanKind::Server));
        assert_eq!(span.start_time_unix_nano, record.start_ns);
        assert_eq!(span.end_time_unix_nano, record.end_ns);
        assert_eq!(span.flags, 0x301);
        let values: Vec<(String, any_value::Value)> = span
            .attributes
            .iter()
            .map(|kv| {
                let value = kv.value.clone().and_then(|v| v.value).expect("a value");
                (kv.key.clone(), value)
            })
            .collect();
        assert_eq!(
            values,
            [
                (
                    "http.route".into(),
                    any_value::Value::StringValue("/v1/messages".into())
                ),
                (
                    "messaging.message.id".into(),
                    any_value::Value::StringValue("m-1".into())
                ),
                (
                    "http.response.status_code".into(),
                    any_value::Value::IntValue(503)
                ),
                ("courier.offset".into(), any_value::Value::IntValue(0)),
                ("courier.big".into(), any_value::Value::IntValue(i64::MAX)),
            ]
        );
        assert_eq!(span.links.len(), 1);
        assert_eq!(hex(&span.links[0].trace_id), format!("{:032x}", 7));
        assert_eq!(hex(&span.links[0].span_id), format!("{:016x}", 8));
        assert_eq!(span.links[0].flags, 0x101);
        let failed = span.status.as_ref().expect("a status");
        assert_eq!(failed.code, i32::from(status::StatusCode::Error));
        assert_eq!(failed.message, "answered 503");
        // The generated types encode what they decoded in as many bytes: nothing was lost
        // (they write the fields in another order, so the bytes themselves differ).
        let mut again = Vec::new();
        prost::encoding::message::encode(2, span, &mut again);
        assert_eq!(again.len(), buf.len());
    }

    #[test]
    fn a_root_span_has_no_parent_link_or_status() {
        let record = Record {
            context: context(1, 2),
            parent: None,
            link: None,
            name: Name::Static("append"),
            kind: Kind::Internal,
            start_ns: 5,
            end_ns: 6,
            attributes: Vec::new(),
            error: None,
        };
        let mut buf = Vec::new();
        record.encode_as_field(2, &mut buf);
        let span = &ScopeSpans::decode(&buf[..]).expect("valid").spans[0];
        assert!(span.parent_span_id.is_empty());
        assert!(span.links.is_empty());
        assert_eq!(span.status, None);
        assert_eq!(span.kind, i32::from(span::SpanKind::Internal));
        assert_eq!(span.flags, 0x1);
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}
