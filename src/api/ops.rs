//! Operations: liveness, readiness, statistics and metrics.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::metrics::{Scraped, CONTENT_TYPE};

/// `{"status": ...}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct Status {
    status: &'static str,
}

/// `GET /healthz`: the process is alive.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "The process is alive.", body = Status, example = json!({"status": "ok"})))
)]
pub async fn healthz() -> Response {
    Json(Status { status: "ok" }).into_response()
}

/// `GET /readyz`: recovery is done and the log takes writes; else 503.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Recovered, and the log takes writes.", body = Status, example = json!({"status": "ready"})),
        (status = 503, description = "Shutting down, or the log failed (`not_ready`).", body = ErrorBody),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> Result<Response, ApiError> {
    if state.broker.is_ready() {
        Ok(Json(Status { status: "ready" }).into_response())
    } else {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the server is shutting down or its log failed (fail-stop); see its log and restart it",
        )
        .retry_after(1))
    }
}

/// The answer of `GET /v1/stats`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct StatsJson<'a> {
    log: LogJson,
    segments: Vec<SegmentJson>,
    agents: Vec<AgentCounts<'a>>,
    ready: bool,
    auth: AuthJson,
}

/// Requests refused by authentication (401) and authorization (403) since the start.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct AuthJson {
    unauthenticated: u64,
    forbidden: u64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct LogJson {
    next_offset: u64,
    segments: usize,
    bytes: u64,
    records_written: u64,
    commits: u64,
    fsyncs: u64,
    bytes_written: u64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct SegmentJson {
    base_offset: u64,
    bytes: u64,
    path: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct AgentCounts<'a> {
    id: &'a str,
    ready: u64,
    in_flight: u64,
    dead_letters: u64,
}

/// `GET /v1/stats`.
#[utoipa::path(
    get,
    path = "/v1/stats",
    tag = "operations",
    responses((status = 200, description = "Log offsets, segments, bytes, writer counters, per-agent counts, refusals.", body = StatsJson))
)]
pub async fn stats(State(state): State<AppState>) -> Response {
    let stats = state.broker.stats();
    let refusals = state.access.refusals();
    let segments = stats
        .segments
        .iter()
        .map(|s| SegmentJson {
            base_offset: s.base.0,
            bytes: s.bytes,
            path: s.path.display().to_string(),
        })
        .collect();
    let agents = stats
        .agents
        .iter()
        .map(|(id, depth)| AgentCounts {
            id,
            ready: depth.ready,
            in_flight: depth.in_flight,
            dead_letters: depth.dead_letters,
        })
        .collect();
    Json(StatsJson {
        log: LogJson {
            next_offset: stats.durable_end,
            segments: stats.segments.len(),
            bytes: stats.segments.iter().map(|s| s.bytes).sum(),
            records_written: stats.log.records,
            commits: stats.log.commits,
            fsyncs: stats.log.fsyncs,
            bytes_written: stats.log.bytes_written,
        },
        segments,
        agents,
        ready: state.broker.is_ready(),
        auth: AuthJson {
            unauthenticated: refusals.unauthenticated + refusals.bad_signatures,
            forbidden: refusals.forbidden,
        },
    })
    .into_response()
}

/// `GET /metrics`: every series in the Prometheus text format ([`crate::metrics`]).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Every series in the Prometheus text format (see the README's Observability).", content_type = "text/plain; version=0.0.4; charset=utf-8", body = String))
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let stats = state.broker.stats();
    let refusals = state.access.refusals();
    let mut inboxes = stats.agents;
    inboxes.extend(state.broker.queue_depths());
    let scraped = Scraped {
        ready: state.broker.is_ready(),
        next_offset: stats.durable_end,
        log_bytes: stats.segments.iter().map(|s| s.bytes).sum(),
        segments: stats.segments.len() as u64,
        records_written: stats.log.records,
        commits: stats.log.commits,
        fsyncs: stats.log.fsyncs,
        bytes_written: stats.log.bytes_written,
        unauthenticated: refusals.unauthenticated,
        forbidden: refusals.forbidden,
        bad_signatures: refusals.bad_signatures,
        inboxes,
        max_inbox_series: state.config.metrics.max_agent_series as usize,
        trace_spans: crate::telemetry::span_counts(),
    };
    let text = state.broker.metrics().render(&scraped);
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}
