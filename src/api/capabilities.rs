//! Capability queues: `GET /v1/capabilities`, `GET /v1/capabilities/{name}`, and the queue's
//! dead letters under `/v1/capabilities/{name}/dead-letters` (the same two routes as an
//! agent's).

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::error::{ApiError, ErrorBody, JsonBody};
use super::messages::{list_dead_letters, redrive_dead_letters, DeadLetterQuery};
use super::openapi::CapabilityPath;
use super::wire::{DeadLetters, RedriveBody, Redriven};
use super::AppState;
use crate::broker::{CapabilityView, InboxRef};
use crate::ids::CapabilityName;

/// A capability queue as clients see it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct CapabilityJson<'a> {
    name: &'a str,
    ready: u64,
    in_flight: u64,
    dead_letters: u64,
    agents: &'a [String],
    online: usize,
}

impl<'a> CapabilityJson<'a> {
    fn of(view: &'a CapabilityView) -> Self {
        Self {
            name: &view.name,
            ready: view.depth.ready,
            in_flight: view.depth.in_flight,
            dead_letters: view.depth.dead_letters,
            agents: &view.agents,
            online: view.online,
        }
    }
}

/// `{"capabilities": [...]}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct CapabilityList<'a> {
    capabilities: Vec<CapabilityJson<'a>>,
}

/// Parses the `{name}` path segment.
fn capability_name(text: &str) -> Result<CapabilityName, ApiError> {
    CapabilityName::parse(text).map_err(|e| ApiError::bad_request("invalid_capability", e))
}

/// `GET /v1/capabilities`: every capability that an agent declares or messages were sent
/// to, with its queue's counts and the agents that declare it.
#[utoipa::path(
    get,
    path = "/v1/capabilities",
    operation_id = "list_capabilities",
    tag = "capabilities",
    responses((status = 200, description = "Every capability declared or addressed, with its queue's counts.", body = CapabilityList))
)]
pub async fn list(State(state): State<AppState>) -> Response {
    let views = state.broker.capabilities();
    let capabilities = views.iter().map(CapabilityJson::of).collect();
    Json(CapabilityList { capabilities }).into_response()
}

/// `GET /v1/capabilities/{name}`: one capability; 404 `unknown_capability` if no agent
/// declares it and no message was sent to it.
#[utoipa::path(
    get,
    path = "/v1/capabilities/{name}",
    operation_id = "get_capability",
    tag = "capabilities",
    params(CapabilityPath),
    responses(
        (status = 200, description = "The capability's queue and the agents that declare it.", body = CapabilityJson),
        (status = 400, description = "Not a valid capability name (`invalid_capability`).", body = ErrorBody),
        (status = 404, description = "Nobody declares it and nothing was sent to it (`unknown_capability`).", body = ErrorBody),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let name = capability_name(&name)?;
    let view = state.broker.capability(&name)?;
    Ok(Json(CapabilityJson::of(&view)).into_response())
}

/// `GET /v1/capabilities/{name}/dead-letters?limit=100&after=<offset>`.
#[utoipa::path(
    get,
    path = "/v1/capabilities/{name}/dead-letters",
    operation_id = "capability_dead_letters",
    tag = "capabilities",
    params(CapabilityPath, DeadLetterQuery),
    responses(
        (status = 200, description = "A page of the queue's dead letters, oldest first.", body = DeadLetters),
    )
)]
pub async fn dead_letters(
    State(state): State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<DeadLetterQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let name = capability_name(&name)?;
    list_dead_letters(&state, InboxRef::Capability(&name), query).await
}

/// `POST /v1/capabilities/{name}/dead-letters/redrive`: `{"offsets": [...]}` or
/// `{"all": true}`.
#[utoipa::path(
    post,
    path = "/v1/capabilities/{name}/dead-letters/redrive",
    operation_id = "redrive_capability_dead_letters",
    tag = "capabilities",
    params(CapabilityPath),
    request_body(content = RedriveBody, example = json!({"offsets": [12, 40]})),
    responses(
        (status = 200, description = "How many dead letters went back to the queue.", body = Redriven),
    )
)]
pub async fn redrive(
    State(state): State<AppState>,
    Path(name): Path<String>,
    JsonBody(bytes): JsonBody,
) -> Result<Response, ApiError> {
    let name = capability_name(&name)?;
    redrive_dead_letters(&state, InboxRef::Capability(&name), &bytes).await
}
