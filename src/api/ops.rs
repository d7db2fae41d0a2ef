//! Operations: liveness, readiness and statistics.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::error::ApiError;
use super::AppState;

/// `GET /healthz`: the process is alive.
pub async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// `GET /readyz`: recovery is done and the log takes writes; else 503.
pub async fn readyz(State(state): State<AppState>) -> Result<Response, ApiError> {
    if state.broker.is_ready() {
        Ok(Json(json!({"status": "ready"})).into_response())
    } else {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the server is shutting down or its log failed (fail-stop); see its log and restart it",
        )
        .retry_after(1))
    }
}

/// `GET /v1/stats`.
pub async fn stats(State(state): State<AppState>) -> Response {
    let stats = state.broker.stats();
    let segments: Vec<serde_json::Value> = stats
        .segments
        .iter()
        .map(|s| json!({"base_offset": s.base.0, "bytes": s.bytes, "path": s.path.display().to_string()}))
        .collect();
    let agents: Vec<serde_json::Value> = stats
        .agents
        .iter()
        .map(|a| {
            json!({
                "id": a.agent.id,
                "ready": a.depth.ready,
                "in_flight": a.depth.in_flight,
                "dead_letters": a.depth.dead_letters,
            })
        })
        .collect();
    Json(json!({
        "log": {
            "next_offset": stats.durable_end,
            "segments": stats.segments.len(),
            "bytes": stats.segments.iter().map(|s| s.bytes).sum::<u64>(),
            "records_written": stats.log.records,
            "commits": stats.log.commits,
            "fsyncs": stats.log.fsyncs,
            "bytes_written": stats.log.bytes_written,
        },
        "segments": segments,
        "agents": agents,
        "ready": state.broker.is_ready(),
    }))
    .into_response()
}
