//! Request/reply: `POST /v1/requests?timeout_ms=30000&no_responders=fail`.

use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::access::Caller;
use super::error::{parse_json, ApiError, ErrorBody, JsonBody};
use super::messages::traceparent;
use super::signature;
use super::wire::{check_message_size, in_range, MessageView, PublishBody};
use super::AppState;
use crate::broker::RequestOptions;
use crate::ids::Address;

/// The longest a request call may wait for its reply, ms: 5 minutes.
pub const MAX_TIMEOUT_MS: i64 = 300_000;
/// How long a request call waits when it does not say, ms.
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;

/// Query of `POST /v1/requests`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RequestQuery {
    /// How long to wait for the reply, ms (1-300000, default 30000).
    #[param(minimum = 1, maximum = 300_000)]
    timeout_ms: Option<i64>,
    /// `fail`: 503 at once when nobody could take the request; `wait` (default): wait.
    no_responders: Option<String>,
}

/// `{"reply": <message>}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct Replied<'a> {
    reply: MessageView<'a>,
}

/// `POST /v1/requests`: publishes the request durably and answers with its first reply, or
/// 504 `reply_timeout`.
#[utoipa::path(
    post,
    path = "/v1/requests",
    tag = "requests",
    params(RequestQuery, ("Courier-Signature" = Option<String>, Header, description = "With auth.signing: `t=<unix seconds>,n=<nonce>,s=<hex HMAC-SHA256 of \"t.n.<body>\" keyed by the bearer token>`"), ("traceparent" = Option<String>, Header, description = "W3C trace context, stored with the message unless its headers carry one")),
    request_body(content = PublishBody, example = json!({"to": "capability:translate", "from": "planner", "id": "req-7", "body": {"text": "bonjour"}})),
    responses(
        (status = 200, description = "The first reply to the request.", body = Replied),
        (status = 401, description = "With auth.signing: a bad signature (`bad_signature`).", body = ErrorBody),
        (status = 404, description = "The address names an unknown agent or capability.", body = ErrorBody),
        (status = 409, description = "The `id` is another sender's request (`id_taken`).", body = ErrorBody),
        (status = 429, description = "Too many calls waiting (`too_many_requests`), an inbox full or the sender over its rate.", body = ErrorBody),
        (status = 503, description = "`no_responders=fail` and nobody could take the request (`no_responders`), or the server refuses writes.", body = ErrorBody),
        (status = 504, description = "No reply within `timeout_ms` (`reply_timeout`); the request stays stored and a later call with the same `id` gets its reply.", body = ErrorBody),
    )
)]
pub async fn request(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<RequestQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    JsonBody(bytes): JsonBody,
) -> Result<Response, ApiError> {
    let Query(query) =
        query.map_err(|e| ApiError::bad_request("invalid_request", e.body_text()))?;
    let timeout_ms =
        in_range("timeout_ms", query.timeout_ms, 1, MAX_TIMEOUT_MS)?.unwrap_or(DEFAULT_TIMEOUT_MS);
    let fail_without_responders = match query.no_responders.as_deref() {
        None | Some("wait") => false,
        Some("fail") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!("`no_responders` is {other:?}; use `fail` (answer 503 at once when nobody could take the request) or `wait` (the default)"),
            ))
        }
    };
    check_message_size(bytes.len(), &state.config.limits)?;
    let signed = signature::check(&state, &caller.principal, &headers, &bytes)?;
    let body: PublishBody = parse_json(&bytes)?;
    let outgoing = body.into_outgoing(traceparent(&headers), &state.config.limits)?;
    caller.check_sender(&outgoing.message.from)?;
    if !matches!(
        outgoing.to,
        Some(Address::Agent(_) | Address::Capability(_))
    ) {
        return Err(ApiError::bad_request(
            "invalid_address",
            "a request goes to one agent or one capability queue: set `to` to agent:<id> or capability:<name>",
        ));
    }
    let options = RequestOptions {
        timeout: Duration::from_millis(timeout_ms),
        fail_without_responders,
        signed,
    };
    let frame = state.broker.request(outgoing, options).await?;
    let reply = MessageView::of(&frame).ok_or_else(|| {
        ApiError::from(crate::broker::Refusal::Unavailable(
            "the reply could not be read back; it stays in the requester's inbox".into(),
        ))
    })?;
    Ok(Json(Replied { reply }).into_response())
}
