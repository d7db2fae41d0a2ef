//! Request and response bodies of the API, and the checks that turn requests into the
//! broker's types. Only `api/` knows these shapes.

use std::collections::BTreeMap;

use courier_storage::{Frame, Message, Record};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::error::ApiError;
use crate::broker::{DeadView, Delivered, Outgoing, Published};
use crate::clock::rfc3339;
use crate::config::Limits;
use crate::ids::{check_message_id, Address, AgentId};

/// Most headers on one message.
pub const MAX_HEADERS: usize = 64;
/// Longest header name, bytes.
pub const MAX_HEADER_NAME_BYTES: usize = 128;
/// Longest header value, bytes.
pub const MAX_HEADER_VALUE_BYTES: usize = 4096;
/// Longest `type` and `correlation_id`, bytes.
pub const MAX_LABEL_BYTES: usize = 128;
/// Longest `delay_ms` and `ttl_ms`: 30 days.
pub const MAX_DELAY_MS: i64 = 30 * 86_400_000;

/// `POST /v1/messages` and each element of a batch.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishBody {
    /// Where it goes: `agent:<id>`, `topic:<name>` or `capability:<name>`; a reply (with
    /// `in_reply_to`) may leave it out to go to the request's sender.
    #[schema(
        pattern = r"^(agent:[a-z0-9][a-z0-9._-]{0,63}|topic:[a-z0-9_-]+(\.[a-z0-9_-]+)*|capability:[a-z0-9][a-z0-9._/:-]{0,127})$"
    )]
    to: Option<String>,
    /// The sender's agent id (with tokens on, the caller's own).
    #[schema(pattern = r"^[a-z0-9][a-z0-9._-]{0,63}$")]
    from: String,
    /// The payload: any JSON value, nested at most `limits.max_json_depth` deep.
    #[schema(value_type = serde_json::Value)]
    body: Box<RawValue>,
    /// A client id: a repeat within `dedupe_window` is answered as a duplicate.
    #[schema(pattern = r"^[A-Za-z0-9._:-]{1,128}$")]
    id: Option<String>,
    /// A label for consumers (1-128 bytes, no control characters).
    #[serde(rename = "type")]
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"
    )]
    kind: Option<String>,
    /// 0-9, higher first; 4 by default.
    #[schema(minimum = 0, maximum = 9)]
    priority: Option<i64>,
    /// At most 64 headers; names 1-128 bytes without control characters, values at most
    /// 4096 bytes. `traceparent` carries a W3C trace context.
    headers: Option<BTreeMap<String, String>>,
    /// Free text for the application (1-128 bytes, no control characters).
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"
    )]
    correlation_id: Option<String>,
    /// The id of the request this message answers.
    #[schema(pattern = r"^[A-Za-z0-9._:-]{1,128}$")]
    in_reply_to: Option<String>,
    /// Not delivered before this many ms from now (at most 30 days).
    #[schema(minimum = 0, maximum = 2_592_000_000_i64)]
    delay_ms: Option<i64>,
    /// Dead-lettered (`expired`) if not acked this many ms from now; 0 or absent: never.
    #[schema(minimum = 0, maximum = 2_592_000_000_i64)]
    ttl_ms: Option<i64>,
    /// Messages with one key are delivered one at a time, in order, per inbox (1-128 bytes,
    /// no control characters).
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"
    )]
    ordering_key: Option<String>,
}

/// `POST /v1/messages/batch`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchBody<'a> {
    #[serde(borrow)]
    /// The messages, each shaped like a single publish.
    #[schema(value_type = Vec<PublishBody>, min_items = 1, max_items = 1000)]
    pub messages: Vec<&'a RawValue>,
}

fn invalid(message: String) -> ApiError {
    ApiError::bad_request("invalid_request", message)
}

fn check_label(field: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() || value.len() > MAX_LABEL_BYTES || value.chars().any(char::is_control) {
        return Err(invalid(format!(
            "`{field}` must be 1-{MAX_LABEL_BYTES} bytes without control characters"
        )));
    }
    Ok(())
}

fn check_ms(field: &str, value: Option<i64>) -> Result<u64, ApiError> {
    match value {
        None => Ok(0),
        Some(ms) if (0..=MAX_DELAY_MS).contains(&ms) => Ok(ms.unsigned_abs()),
        Some(ms) => Err(invalid(format!(
            "`{field}` is {ms}; it must be between 0 and {MAX_DELAY_MS} (30 days)"
        ))),
    }
}

impl PublishBody {
    /// Checks every field (SPEC §3) and builds the message. `traceparent` is the request's
    /// W3C trace header, stored unless the message has its own.
    pub fn into_outgoing(
        self,
        traceparent: Option<&str>,
        limits: &Limits,
    ) -> Result<Outgoing, ApiError> {
        check_json_depth("body", self.body.get(), limits.max_json_depth)?;
        let to = match (&self.to, &self.in_reply_to) {
            (Some(to), _) => {
                Some(Address::parse(to).map_err(|e| ApiError::bad_request("invalid_address", e))?)
            }
            // A reply without `to` goes to the request's sender.
            (None, Some(_)) => None,
            (None, None) => {
                return Err(invalid(
                    "missing field `to`: address the message (agent:<id>, topic:<name> or capability:<name>); only a reply (with `in_reply_to`) may leave it out, to go to the request's sender".into(),
                ))
            }
        };
        let from = AgentId::parse(&self.from).map_err(|e| invalid(format!("`from`: {e}")))?;
        if let Some(id) = &self.id {
            check_message_id("id", id).map_err(invalid)?;
        }
        if let Some(reply_to) = &self.in_reply_to {
            check_message_id("in_reply_to", reply_to).map_err(invalid)?;
        }
        if let Some(kind) = &self.kind {
            check_label("type", kind)?;
        }
        if let Some(correlation_id) = &self.correlation_id {
            check_label("correlation_id", correlation_id)?;
        }
        if let Some(ordering_key) = &self.ordering_key {
            check_label("ordering_key", ordering_key)?;
        }
        let priority = match self.priority {
            None => 4,
            Some(p @ 0..=9) => u8::try_from(p).expect("0..=9 fits"),
            Some(p) => {
                return Err(ApiError::bad_request(
                    "invalid_priority",
                    format!("`priority` is {p}; it must be 0-9 (higher first, default 4)"),
                ))
            }
        };
        let mut headers = self.headers.unwrap_or_default();
        check_headers(&headers)?;
        if let Some(traceparent) = traceparent {
            headers
                .entry("traceparent".to_owned())
                .or_insert_with(|| traceparent.to_owned());
        }
        let delay_ms = check_ms("delay_ms", self.delay_ms)?;
        let ttl_ms = check_ms("ttl_ms", self.ttl_ms)?;
        Ok(Outgoing {
            client_id: self.id.clone(),
            to,
            message: Message {
                id: self.id.unwrap_or_default(),
                from: from.to_string(),
                to: self.to.unwrap_or_default(),
                destinations: Vec::new(),
                kind: self.kind,
                priority,
                headers: headers.into_iter().collect(),
                correlation_id: self.correlation_id,
                in_reply_to: self.in_reply_to,
                not_before_ms: None,
                expires_at_ms: None,
                dedupe_until_ms: None,
                body: self.body.get().as_bytes().to_vec(),
                ordering_key: self.ordering_key,
                request_until_ms: None,
            },
            delay_ms,
            ttl_ms,
        })
    }
}

fn check_headers(headers: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if headers.len() > MAX_HEADERS {
        return Err(ApiError::bad_request(
            "too_many_headers",
            format!(
                "the message has {} headers; at most {MAX_HEADERS} are allowed",
                headers.len()
            ),
        ));
    }
    for (name, value) in headers {
        if name.is_empty()
            || name.len() > MAX_HEADER_NAME_BYTES
            || name.chars().any(char::is_control)
        {
            return Err(invalid(format!(
                "header name {name:?} must be 1-{MAX_HEADER_NAME_BYTES} bytes without control characters"
            )));
        }
        if value.len() > MAX_HEADER_VALUE_BYTES {
            return Err(invalid(format!(
                "header {name:?} has {} bytes; at most {MAX_HEADER_VALUE_BYTES} are allowed",
                value.len()
            )));
        }
    }
    Ok(())
}

/// The deepest nesting of arrays and objects in `json`, which must be valid JSON text (a
/// scalar is 0 deep, `[]` 1, `{"a": [1]}` 2). Counts without recursing, so any depth is
/// safe to measure, and skips the inside of strings with `memchr` (a 1 KiB string costs tens
/// of nanoseconds, not a microsecond); stops counting once past `stop_above`.
pub fn json_depth(json: &str, stop_above: usize) -> usize {
    let bytes = json.as_bytes();
    let (mut depth, mut deepest, mut at) = (0usize, 0usize, 0usize);
    while let Some(&byte) = bytes.get(at) {
        at += 1;
        match byte {
            b'"' => {
                // Find the closing quote: the next quote not escaped by a backslash.
                loop {
                    let Some(found) = bytes
                        .get(at..)
                        .and_then(|rest| memchr::memchr2(b'"', b'\\', rest))
                    else {
                        return deepest;
                    };
                    let quote = bytes.get(at + found) == Some(&b'"');
                    at += found + if quote { 1 } else { 2 };
                    if quote {
                        break;
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
                if deepest > stop_above {
                    return deepest;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Refuses JSON nested deeper than `limits.max_json_depth` (400 `invalid_request`): every
/// stored body must stay deliverable and listable by any JSON reader.
pub fn check_json_depth(field: &str, json: &str, max_depth: u32) -> Result<(), ApiError> {
    let max = max_depth as usize;
    if json_depth(json, max) > max {
        return Err(invalid(format!(
            "`{field}` nests arrays and objects more than {max} deep (limits.max_json_depth); flatten it or raise the limit"
        )));
    }
    Ok(())
}

/// Checks a publish body's size against the message limit.
pub fn check_message_size(bytes: usize, limits: &Limits) -> Result<(), ApiError> {
    if bytes as u64 > limits.max_message_bytes {
        return Err(super::error::too_large(
            "the message",
            limits.max_message_bytes,
        ));
    }
    Ok(())
}

/// A published message as clients see it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MessageView<'a> {
    id: &'a str,
    from: &'a str,
    to: &'a str,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'a str>,
    priority: u8,
    headers: BTreeMap<&'a str, &'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlation_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    in_reply_to: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ordering_key: Option<&'a str>,
    /// The payload as published.
    #[schema(value_type = serde_json::Value)]
    body: &'a RawValue,
    offset: u64,
    published_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
}

impl<'a> MessageView<'a> {
    /// The view of a message frame; `None` if the frame is not a message.
    pub fn of(frame: &'a Frame) -> Option<Self> {
        let Record::Message(m) = &frame.record else {
            return None;
        };
        let body = match serde_json::from_slice::<&RawValue>(&m.body) {
            Ok(body) => body,
            Err(error) => {
                // Publish checks every body, so only damage that the CRC missed gets here.
                tracing::error!(offset = frame.offset.0, %error, "a stored message body is not JSON; it is left out of the answer");
                return None;
            }
        };
        Some(Self {
            id: &m.id,
            from: &m.from,
            to: &m.to,
            kind: m.kind.as_deref(),
            priority: m.priority,
            headers: m
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            correlation_id: m.correlation_id.as_deref(),
            in_reply_to: m.in_reply_to.as_deref(),
            ordering_key: m.ordering_key.as_deref(),
            body,
            offset: frame.offset.0,
            published_at: rfc3339(frame.timestamp_ms),
            expires_at: m.expires_at_ms.map(rfc3339),
        })
    }
}

/// A message delivered under a lease.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeliveredView<'a> {
    #[serde(flatten)]
    message: MessageView<'a>,
    attempt: u32,
    receipt: &'a str,
    lease_expires_at: String,
}

impl<'a> DeliveredView<'a> {
    /// The view of a delivery.
    pub fn of(delivered: &'a Delivered) -> Option<Self> {
        Some(Self {
            message: MessageView::of(&delivered.frame)?,
            attempt: delivered.attempt,
            receipt: &delivered.receipt,
            lease_expires_at: rfc3339(delivered.lease_deadline_ms),
        })
    }
}

/// A dead letter: the message plus why and when it died.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeadLetterView<'a> {
    #[serde(flatten)]
    message: MessageView<'a>,
    attempts: u32,
    reason: &'static str,
    dead_lettered_at: String,
}

impl<'a> DeadLetterView<'a> {
    /// The view of a dead letter.
    pub fn of(dead: &'a DeadView) -> Option<Self> {
        Some(Self {
            message: MessageView::of(&dead.frame)?,
            attempts: dead.dead.attempts,
            reason: dead.dead.reason.as_str(),
            dead_lettered_at: rfc3339(dead.dead.dead_lettered_at_ms),
        })
    }
}

/// The answer for one published message.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PublishedView<'a> {
    id: &'a str,
    offset: u64,
    duplicate: bool,
    destinations: usize,
}

impl<'a> PublishedView<'a> {
    /// The view of a publish result.
    pub fn of(published: &'a Published) -> Self {
        Self {
            id: &published.id,
            offset: published.offset,
            duplicate: published.duplicate,
            destinations: published.destinations,
        }
    }
}

/// `{"results": [...]}`: one entry per message or receipt, in request order.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Results<T> {
    /// The entries.
    pub results: Vec<T>,
}

/// The answer for one receipt of an ack, nack or extend.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SettledView<'a> {
    /// The receipt as sent.
    pub receipt: &'a str,
    /// `acked`, `nacked`, `extended`, `dead_lettered`, `stale` or `unknown`.
    pub status: &'static str,
}

/// `{"messages": [...]}`: the answer of a receive.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Deliveries<'a> {
    /// The delivered messages, in delivery order.
    pub messages: Vec<DeliveredView<'a>>,
}

/// `{"dead_letters": [...]}`: a page of dead letters.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeadLetters<'a> {
    /// Dead letters, oldest first.
    pub dead_letters: Vec<DeadLetterView<'a>>,
}

/// `{"redriven": n}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Redriven {
    /// How many dead letters went back to the inbox.
    pub redriven: usize,
}

/// `POST /v1/agents/{agent}/receive`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReceiveBody {
    /// At most this many messages (1-1000, default 10).
    #[schema(minimum = 1, maximum = 1000)]
    pub max: Option<i64>,
    /// How long to wait for the first message, ms (0-60000, default 20000).
    #[schema(minimum = 0, maximum = 60_000)]
    pub wait_ms: Option<i64>,
    /// The lease of what is delivered, ms (1 ms to 12 h; default the agent's, else `lease`).
    #[schema(minimum = 1, maximum = 43_200_000)]
    pub lease_ms: Option<i64>,
}

/// `POST /v1/agents/{agent}/ack`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AckBody {
    /// The receipts of the deliveries (1-1000).
    #[schema(min_items = 1, max_items = 1000)]
    pub receipts: Vec<String>,
}

/// `POST /v1/agents/{agent}/nack`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NackBody {
    /// The receipts of the deliveries (1-1000).
    #[schema(min_items = 1, max_items = 1000)]
    pub receipts: Vec<String>,
    /// Ready again after this many ms (at most 30 days; default 0).
    #[schema(minimum = 0, maximum = 2_592_000_000_i64)]
    pub delay_ms: Option<i64>,
    /// Move them to the dead letters (`rejected`) instead.
    pub dead_letter: Option<bool>,
}

/// `POST /v1/agents/{agent}/extend`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtendBody {
    /// The receipts of the deliveries (1-1000).
    #[schema(min_items = 1, max_items = 1000)]
    pub receipts: Vec<String>,
    /// The new lease from now, ms (1 ms to 12 h; default the agent's, else `lease`).
    #[schema(minimum = 1, maximum = 43_200_000)]
    pub lease_ms: Option<i64>,
}

/// `PUT /v1/agents/{agent}`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentBody {
    /// What it can do (at most 64): each makes it draw from the queue `capability:<name>`.
    #[schema(max_items = 64)]
    pub capabilities: Option<Vec<String>>,
    /// Free-form JSON object about the agent (at most 64 KiB).
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Box<RawValue>>,
    /// Its deliveries' lease, ms (1 ms to 12 h; default `lease`).
    #[schema(minimum = 1, maximum = 43_200_000)]
    pub lease_ms: Option<i64>,
    /// Deliveries before dead-lettering (1-1000; default `max_attempts`).
    #[schema(minimum = 1, maximum = 1000)]
    pub max_attempts: Option<i64>,
    /// Messages it may hold leased at once (1-1000000; default unlimited).
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub max_in_flight: Option<i64>,
}

/// `POST /v1/agents/{agent}/dead-letters/redrive`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RedriveBody {
    /// The dead letters to redrive, by offset (1-10000); or
    #[schema(min_items = 1, max_items = 10_000)]
    pub offsets: Option<Vec<u64>>,
    /// `true`: every dead letter.
    pub all: Option<bool>,
}

/// Checks an optional integer field against a range, with a message naming both.
pub fn in_range(
    field: &str,
    value: Option<i64>,
    min: i64,
    max: i64,
) -> Result<Option<u64>, ApiError> {
    match value {
        None => Ok(None),
        Some(v) if (min..=max).contains(&v) => Ok(Some(v.unsigned_abs())),
        Some(v) => Err(invalid(format!(
            "`{field}` is {v}; it must be between {min} and {max}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::json_depth;

    #[test]
    fn json_depth_counts_arrays_and_objects_not_strings() {
        let cases = [
            ("1", 0),
            ("\"[[[\"", 0),
            ("[]", 1),
            ("{\"a\": [1]}", 2),
            ("[[[]], [[[]]]]", 4),
            // Escaped quotes and backslashes inside strings end nothing early.
            (r#"["\"[[[", "\\", [["\\\"{{"]]]"#, 3),
            (r#"{"k\\": {"\\\\": [1]}}"#, 3),
        ];
        for (json, depth) in cases {
            assert_eq!(json_depth(json, usize::MAX), depth, "{json}");
        }
        let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
        assert_eq!(json_depth(&deep, usize::MAX), 1000);
        assert_eq!(json_depth(&deep, 64), 65, "stops once past the limit");
    }
}
