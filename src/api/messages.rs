//! Publishing, receiving, settling leases and dead letters.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::access::Caller;
use super::error::{parse_json, too_large, ApiError, ErrorBody, JsonBody};
use super::openapi::AgentPath;
use super::signature;
use super::wire::{
    check_message_size, in_range, AckBody, BatchBody, DeadLetterView, DeadLetters, DeliveredView,
    Deliveries, ExtendBody, NackBody, PublishBody, PublishedView, ReceiveBody, RedriveBody,
    Redriven, Results, SettledView,
};
use super::{agent_id, AppState};
use crate::broker::{InboxRef, ReceiveRequest};
use crate::delivery::{Outcome, Settle};
use crate::telemetry::context::TraceParent;

/// Most messages one receive returns.
pub const MAX_RECEIVE: i64 = 1000;
/// Longest long-poll, ms.
pub const MAX_WAIT_MS: i64 = 60_000;
/// Default long-poll, ms.
pub const DEFAULT_WAIT_MS: u64 = 20_000;
/// Longest lease a receive or extend may ask for: 12 hours (SQS's limit).
pub const MAX_LEASE_MS: i64 = 12 * 3_600_000;
/// Most receipts in one ack, nack or extend.
pub const MAX_RECEIPTS: usize = 1000;
/// Most dead letters one listing returns.
pub const MAX_DEAD_LETTERS: i64 = 1000;

/// The request's W3C `traceparent` header, if it has exactly one and it is valid (an invalid
/// one is ignored, as the recommendation says: it is not stored with the message).
pub fn traceparent(headers: &HeaderMap) -> Option<&str> {
    TraceParent::of_request(headers).map(|(text, _)| text)
}

/// `POST /v1/messages`.
#[utoipa::path(
    post,
    path = "/v1/messages",
    tag = "messages",
    params(("Courier-Signature" = Option<String>, Header, description = "With auth.signing: `t=<unix seconds>,n=<nonce>,s=<hex HMAC-SHA256 of \"t.n.<body>\" keyed by the bearer token>`"), ("traceparent" = Option<String>, Header, description = "W3C trace context, stored with the message unless its headers carry one")),
    request_body(content = PublishBody, example = json!({"to": "agent:planner", "from": "researcher", "type": "task.assign", "priority": 7, "headers": {"k": "v"}, "body": {"task": "summarize", "doc": 42}})),
    responses(
        (status = 201, description = "Stored durably and routed.", body = PublishedView, example = json!({"id": "01JD3Q8Z5X0000000000000000", "offset": 41, "duplicate": false, "destinations": 1})),
        (status = 200, description = "A duplicate of a message with the same `id` within the dedupe window: the first one's offset, nothing written.", body = PublishedView),
        (status = 401, description = "With auth.signing: a missing, malformed, stale or replayed signature (`bad_signature`).", body = ErrorBody),
        (status = 404, description = "The address names an agent or a capability nobody declares (`unknown_agent`, `unknown_capability`).", body = ErrorBody),
        (status = 409, description = "The `id` is another sender's message (`id_taken`).", body = ErrorBody),
        (status = 429, description = "A destination inbox is full (`inbox_full`) or the sender is over `limits.publish_rate` (`rate_limited`); see `Retry-After`.", body = ErrorBody),
    )
)]
pub async fn publish(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    JsonBody(bytes): JsonBody,
) -> Result<Response, ApiError> {
    check_message_size(bytes.len(), &state.config.limits)?;
    let signed = signature::check(&state, &caller.principal, &headers, &bytes)?;
    let body: PublishBody = parse_json(&bytes)?;
    let outgoing = body.into_outgoing(traceparent(&headers), &state.config.limits)?;
    caller.check_sender(&outgoing.message.from)?;
    let results = state.broker.publish_signed(vec![outgoing], signed).await?;
    let result = results.first().expect("one result per message");
    let status = if result.duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(PublishedView::of(result))).into_response())
}

/// `POST /v1/messages/batch`: all-or-nothing.
#[utoipa::path(
    post,
    path = "/v1/messages/batch",
    tag = "messages",
    params(("Courier-Signature" = Option<String>, Header, description = "With auth.signing: `t=<unix seconds>,n=<nonce>,s=<hex HMAC-SHA256 of \"t.n.<body>\" keyed by the bearer token>`"), ("traceparent" = Option<String>, Header, description = "W3C trace context, stored with the message unless its headers carry one")),
    request_body(content = BatchBody, example = json!({"messages": [{"to": "agent:planner", "from": "researcher", "body": 1}, {"to": "topic:news.eu", "from": "researcher", "body": 2}]})),
    responses(
        (status = 201, description = "Every message stored, in order (all or nothing).", body = Results<PublishedView>),
        (status = 401, description = "With auth.signing: a bad signature (`bad_signature`).", body = ErrorBody),
        (status = 404, description = "A message names an unknown agent or capability; nothing was written.", body = ErrorBody),
        (status = 409, description = "An `id` is another sender's message (`id_taken`); nothing was written.", body = ErrorBody),
        (status = 429, description = "An inbox is full or the sender is over its rate; nothing was written.", body = ErrorBody),
    )
)]
pub async fn publish_batch(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    JsonBody(bytes): JsonBody,
) -> Result<Response, ApiError> {
    let limits = state.config.limits;
    if bytes.len() as u64 > limits.max_batch_bytes {
        return Err(too_large("the batch", limits.max_batch_bytes));
    }
    let signed = signature::check(&state, &caller.principal, &headers, &bytes)?;
    let batch: BatchBody<'_> = parse_json(&bytes)?;
    if batch.messages.is_empty() || batch.messages.len() > limits.max_batch_messages as usize {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!(
                "a batch holds 1-{} messages; this one has {}",
                limits.max_batch_messages,
                batch.messages.len()
            ),
        ));
    }
    let mut outgoing = Vec::with_capacity(batch.messages.len());
    for (i, raw) in batch.messages.iter().enumerate() {
        let checked = check_message_size(raw.get().len(), &limits)
            .and_then(|()| parse_json::<PublishBody>(raw.get().as_bytes()))
            .and_then(|body| body.into_outgoing(traceparent(&headers), &limits))
            .and_then(|o| caller.check_sender(&o.message.from).map(|()| o));
        match checked {
            Ok(o) => outgoing.push(o),
            Err(mut error) => {
                error.message = format!("message {i}: {}", error.message);
                return Err(error);
            }
        }
    }
    let results = state.broker.publish_signed(outgoing, signed).await?;
    let results = results.iter().map(PublishedView::of).collect();
    Ok((StatusCode::CREATED, Json(Results { results })).into_response())
}

/// `POST /v1/agents/{agent}/receive`: long-poll.
#[utoipa::path(
    post,
    path = "/v1/agents/{agent}/receive",
    tag = "messages",
    params(AgentPath),
    request_body(content = ReceiveBody, example = json!({"max": 10, "wait_ms": 20000, "lease_ms": 30000})),
    responses(
        (status = 200, description = "Up to `max` messages leased to the caller (empty after `wait_ms` without any).", body = Deliveries),
        (status = 429, description = "Too many receive calls open for this agent (`too_many_receivers`).", body = ErrorBody),
    )
)]
pub async fn receive(
    State(state): State<AppState>,
    Path(agent): Path<String>,
    JsonBody(bytes): JsonBody,
) -> Result<Response, ApiError> {
    let agent = agent_id(&agent)?;
    let body: ReceiveBody = parse_json(&bytes)?;
    let request = ReceiveRequest {
        max: in_range("max", body.max, 1, MAX_RECEIVE)?.unwrap_or(10) as usize,
        wait: Duration::from_millis(
            in_range("wait_ms", body.wait_ms, 0, MAX_WAIT_MS)?.unwrap_or(DEFAULT_WAIT_MS),
        ),
        lease_ms: in_range("lease_ms", body.lease_ms, 1, MAX_LEASE_MS)?,
    };
    let delivered = state.broker.receive(&agent, request).await?;
    courier_storage::failpoint::panic("api.receive");
    let messages = delivered.iter().filter_map(DeliveredView::of).collect();
    Ok(Json(Deliveries { messages }).into_response())
}

fn receipts(receipts: &[String]) -> Result<(), ApiError> {
    if receipts.is_empty() || receipts.len() > MAX_RECEIPTS {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!(
                "`receipts` must hold 1-{MAX_RECEIPTS} receipts; it has {}",
                receipts.len()
            ),
        ));
    }
    Ok(())
}

async fn settle(
    state: &AppState,
    agent: &str,
    list: &[String],
    how: Settle,
) -> Result<Response, ApiError> {
    receipts(list)?;
    let agent = agent_id(agent)?;
    let outcomes: Vec<Outcome> = state.broker.settle(&agent, list, how).await?;
    let results = list
        .iter()
        .zip(outcomes)
        .map(|(receipt, outcome)| SettledView {
            receipt,
            status: outcome.as_str(),
        })
        .collect();
    Ok(Json(Results { results }).into_response())
}

/// `POST /v1/agents/{agent}/ack`.
#[utoipa::path(
    post,
    path = "/v1/agents/{agent}/ack",
    tag = "messages",
    params(AgentPath),
    request_body(content = AckBody),
    responses(
        (status = 200, description = "One status per receipt, in order: acked, or `stale` (the lease ended) or `unknown`.", body = Results<SettledView>),
    )
)]
pub async fn ack(
    State(state): State<AppState>,
    Path(agent): Path<String>,
    JsonBody(bytes): JsonBody,
) -> Result<Response, ApiError> {
    let body: AckBody = parse_json(&bytes)?;
    settle(&state, &agent, &body.receipts, Settle::Ack).await
}

/// `POST /v1/agents/{agent}/nack`.
#[utoipa::path(
    post,
    path = "/v1/agents/{agent}/nack",
    tag = "messages",
    params(AgentPath),
    request_body(content = NackBody),
    responses(
        (status = 200, description = "One status per receipt, in order: nacked or dead-lettered, or `stale` (the lease ended) or `unknown`.", body = Results<SettledView>),
    )
)]
pub async fn nack(
    State(state): State<AppState>,
    Path(agent): Path<String>,
    JsonBody(bytes): JsonBody,
) -> Result<Response, ApiError> {
    let body: NackBody = parse_json(&bytes)?;
    let how = Settle::Nack {
        delay_ms: in_range("delay_ms", body.delay_ms, 0, super::wire::MAX_DELAY_MS)?.unwrap_or(0),
        dead_letter: body.dead_letter.unwrap_or(false),
    };
    settle(&state, &agent, &body.receipts, how).await
}

/// `POST /v1/agents/{agent}/extend`.
#[utoipa::path(
    post,
    path = "/v1/agents/{agent}/extend",
    tag = "messages",
    params(AgentPath),
    request_body(content = ExtendBody),
    responses(
        (status = 200, description = "One status per receipt, in order: extended, or `stale` (the lease ended) or `unknown`.", body = Results<SettledView>),
    )
)]
pub async fn extend(
    State(state): State<AppState>,
    Path(agent): Path<String>,
    JsonBody(bytes): JsonBody,
) -> Result<Response, ApiError> {
    let body: ExtendBody = parse_json(&bytes)?;
    let lease_ms = match in_range("lease_ms", body.lease_ms, 1, MAX_LEASE_MS)? {
        Some(ms) => ms,
        None => state.broker.lease_ms_of(&agent_id(&agent)?),
    };
    settle(&state, &agent, &body.receipts, Settle::Extend { lease_ms }).await
}

/// Query of `GET /v1/agents/{agent}/dead-letters`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterQuery {
    /// At most this many (1-1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// Only those above this offset (the last of the previous page).
    after: Option<u64>,
}

/// `GET /v1/agents/{agent}/dead-letters?limit=100&after=<offset>`.
#[utoipa::path(
    get,
    path = "/v1/agents/{agent}/dead-letters",
    operation_id = "agent_dead_letters",
    tag = "messages",
    params(AgentPath, DeadLetterQuery),
    responses(
        (status = 200, description = "A page of the agent's dead letters, oldest first, with why each died.", body = DeadLetters),
    )
)]
pub async fn dead_letters(
    State(state): State<AppState>,
    Path(agent): Path<String>,
    query: Result<Query<DeadLetterQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let agent = agent_id(&agent)?;
    list_dead_letters(&state, InboxRef::Agent(&agent), query).await
}

/// `POST /v1/agents/{agent}/dead-letters/redrive`: `{"offsets": [...]}` or `{"all": true}`.
#[utoipa::path(
    post,
    path = "/v1/agents/{agent}/dead-letters/redrive",
    operation_id = "redrive_agent_dead_letters",
    tag = "messages",
    params(AgentPath),
    request_body(content = RedriveBody, example = json!({"all": true})),
    responses(
        (status = 200, description = "How many dead letters went back to the inbox, attempts reset.", body = Redriven),
    )
)]
pub async fn redrive(
    State(state): State<AppState>,
    Path(agent): Path<String>,
    JsonBody(bytes): JsonBody,
) -> Result<Response, ApiError> {
    let agent = agent_id(&agent)?;
    redrive_dead_letters(&state, InboxRef::Agent(&agent), &bytes).await
}

/// Lists the dead letters of an agent's inbox or a capability's queue.
pub async fn list_dead_letters(
    state: &AppState,
    inbox: InboxRef<'_>,
    query: Result<Query<DeadLetterQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) =
        query.map_err(|e| ApiError::bad_request("invalid_request", e.body_text()))?;
    let limit = in_range("limit", query.limit, 1, MAX_DEAD_LETTERS)?.unwrap_or(100) as usize;
    let dead = state.broker.dead_letters(inbox, query.after, limit).await?;
    let dead_letters = dead.iter().filter_map(DeadLetterView::of).collect();
    Ok(Json(DeadLetters { dead_letters }).into_response())
}

/// Redrives dead letters of an agent's inbox or a capability's queue.
pub async fn redrive_dead_letters(
    state: &AppState,
    inbox: InboxRef<'_>,
    bytes: &[u8],
) -> Result<Response, ApiError> {
    let body: RedriveBody = parse_json(bytes)?;
    let offsets = match (body.offsets, body.all) {
        (Some(offsets), None | Some(false)) if !offsets.is_empty() && offsets.len() <= 10_000 => {
            Some(offsets)
        }
        (None, Some(true)) => None,
        _ => {
            return Err(ApiError::bad_request(
                "invalid_request",
                "give either `offsets` (1-10000 dead-letter offsets) or `\"all\": true`",
            ))
        }
    };
    let count = state.broker.redrive(inbox, offsets.as_deref()).await?;
    Ok(Json(Redriven { redriven: count }).into_response())
}
