//! Agent registration, discovery and presence.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::error::{parse_json, ApiError, ErrorBody, JsonBody};
use super::messages::MAX_LEASE_MS;
use super::openapi::AgentPath;
use super::wire::{check_json_depth, in_range, AgentBody};
use super::{agent_id, AppState};
use crate::auth::Token;
use crate::broker::{AgentView, Refusal, Tokens};
use crate::clock::rfc3339;
use crate::ids::CapabilityName;
use courier_storage::Agent;

/// Most capabilities per agent.
pub const MAX_CAPABILITIES: usize = 64;
/// Largest metadata object, bytes.
pub const MAX_METADATA_BYTES: usize = 64 * 1024;

/// An agent as clients see it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct AgentJson<'a> {
    id: &'a str,
    capabilities: &'a [String],
    /// What the agent registered as its metadata.
    #[schema(value_type = Object)]
    metadata: &'a RawValue,
    lease_ms: Option<u64>,
    max_attempts: Option<u32>,
    max_in_flight: Option<u32>,
    last_seen: Option<String>,
    online: bool,
    receivers: u32,
    throttled: bool,
    inbox: InboxJson,
}

/// An inbox's counts.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct InboxJson {
    ready: u64,
    in_flight: u64,
    dead_letters: u64,
}

/// `{"agents": [...]}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct AgentList<'a> {
    agents: Vec<AgentJson<'a>>,
}

const EMPTY_OBJECT: &str = "{}";

fn view_json(view: &AgentView) -> AgentJson<'_> {
    let a = &view.agent;
    let metadata = serde_json::from_slice::<&RawValue>(&a.metadata).unwrap_or_else(|error| {
        // Registration checks the metadata, so only damage that the CRC missed gets here.
        tracing::error!(agent = %a.id, %error, "stored agent metadata is not JSON; shown as {{}}");
        serde_json::from_str(EMPTY_OBJECT).expect("`{}` is JSON")
    });
    AgentJson {
        id: &a.id,
        capabilities: &a.capabilities,
        metadata,
        lease_ms: a.lease_ms,
        max_attempts: a.max_attempts,
        max_in_flight: a.max_in_flight,
        last_seen: view.last_seen_ms.map(rfc3339),
        online: view.online,
        receivers: view.receivers,
        throttled: view.throttled,
        inbox: InboxJson {
            ready: view.depth.ready,
            in_flight: view.depth.in_flight,
            dead_letters: view.depth.dead_letters,
        },
    }
}

/// `PUT /v1/agents/{agent}` → 201 created / 200 updated.
#[utoipa::path(
    put,
    path = "/v1/agents/{agent}",
    operation_id = "register_agent",
    tag = "agents",
    params(AgentPath),
    request_body(content = AgentBody, example = json!({"capabilities": ["summarize"], "metadata": {"model": "m-1"}, "lease_ms": 60000, "max_attempts": 5})),
    responses(
        (status = 201, description = "Registered; with auth.mode = token, `token` is the agent's token, shown this once.", body = Registered),
        (status = 200, description = "Updated (the token is kept and not shown).", body = Registered),
    )
)]
pub async fn upsert(
    State(state): State<AppState>,
    Path(agent): Path<String>,
    JsonBody(bytes): JsonBody,
) -> Result<Response, ApiError> {
    let id = agent_id(&agent)?;
    let body: AgentBody = parse_json(&bytes)?;
    let capabilities = body.capabilities.unwrap_or_default();
    if capabilities.len() > MAX_CAPABILITIES {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!("an agent declares at most {MAX_CAPABILITIES} capabilities"),
        ));
    }
    // Every declared capability must be addressable as capability:<name>.
    for capability in &capabilities {
        CapabilityName::parse(capability)
            .map_err(|e| ApiError::bad_request("invalid_request", e))?;
    }
    if let Some(metadata) = &body.metadata {
        check_json_depth(
            "metadata",
            metadata.get(),
            state.config.limits.max_json_depth,
        )?;
    }
    let metadata = match body.metadata {
        None => b"{}".to_vec(),
        Some(raw)
            if raw.get().trim_start().starts_with('{') && raw.get().len() <= MAX_METADATA_BYTES =>
        {
            raw.get().as_bytes().to_vec()
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!("`metadata` must be a JSON object of at most {MAX_METADATA_BYTES} bytes"),
            ))
        }
    };
    let agent = Agent {
        id: id.to_string(),
        capabilities,
        metadata,
        lease_ms: in_range("lease_ms", body.lease_ms, 1, MAX_LEASE_MS)?,
        max_attempts: in_range("max_attempts", body.max_attempts, 1, 1000)?
            .map(|n| u32::try_from(n).expect("at most 1000")),
        max_in_flight: in_range("max_in_flight", body.max_in_flight, 1, 1_000_000)?
            .map(|n| u32::try_from(n).expect("at most a million")),
        token_hash: None,
    };
    let tokens = if state.access.is_on() {
        Tokens::Issue
    } else {
        Tokens::Off
    };
    let upserted = state.broker.upsert_agent(agent, tokens).await?;
    let view = state
        .broker
        .agent(&id)
        .ok_or_else(|| ApiError::not_found("the agent was deleted meanwhile"))?;
    let status = if upserted.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let body = Registered {
        agent: view_json(&view),
        token: upserted.token.as_ref().map(Token::reveal),
    };
    Ok((status, Json(body)).into_response())
}

/// A registration's answer: the agent, and its token the one time it is handed out.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct Registered<'a> {
    #[serde(flatten)]
    agent: AgentJson<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<&'a str>,
}

/// `{"token": "cour_..."}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct Rotated<'a> {
    token: &'a str,
}

/// `POST /v1/agents/{agent}/token`: a new token for the agent; the old one stops working.
#[utoipa::path(
    post,
    path = "/v1/agents/{agent}/token",
    tag = "agents",
    params(AgentPath),
    responses(
        (status = 200, description = "The agent's new token; the old one stops working at once.", body = Rotated),
        (status = 400, description = "Not a valid agent id, or tokens are off (`auth_off`).", body = ErrorBody),
    )
)]
pub async fn rotate_token(
    State(state): State<AppState>,
    Path(agent): Path<String>,
) -> Result<Response, ApiError> {
    let id = agent_id(&agent)?;
    let token = state.broker.rotate_token(&id).await?;
    Ok(Json(Rotated {
        token: token.reveal(),
    })
    .into_response())
}

fn unknown(id: &str) -> ApiError {
    Refusal::UnknownAgent(id.to_owned()).into()
}

/// `GET /v1/agents/{agent}`.
#[utoipa::path(
    get,
    path = "/v1/agents/{agent}",
    operation_id = "get_agent",
    tag = "agents",
    params(AgentPath),
    responses(
        (status = 200, description = "The agent, its presence and its inbox's counts.", body = AgentJson),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    Path(agent): Path<String>,
) -> Result<Response, ApiError> {
    let id = agent_id(&agent)?;
    let view = state
        .broker
        .agent(&id)
        .ok_or_else(|| unknown(id.as_str()))?;
    Ok(Json(view_json(&view)).into_response())
}

/// `DELETE /v1/agents/{agent}` → 204.
#[utoipa::path(
    delete,
    path = "/v1/agents/{agent}",
    operation_id = "delete_agent",
    tag = "agents",
    params(AgentPath),
    responses(
        (status = 204, description = "Deleted, with its inbox, dead letters, subscriptions and token."),
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    Path(agent): Path<String>,
) -> Result<Response, ApiError> {
    let id = agent_id(&agent)?;
    if state.broker.delete_agent(&id).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(unknown(id.as_str()))
    }
}

/// `POST /v1/agents/{agent}/heartbeat`.
#[utoipa::path(
    post,
    path = "/v1/agents/{agent}/heartbeat",
    tag = "agents",
    params(AgentPath),
    responses(
        (status = 200, description = "Marked online for `presence_ttl`.", body = AgentJson),
    )
)]
pub async fn heartbeat(
    State(state): State<AppState>,
    Path(agent): Path<String>,
) -> Result<Response, ApiError> {
    let id = agent_id(&agent)?;
    let view = state
        .broker
        .heartbeat(&id)
        .ok_or_else(|| unknown(id.as_str()))?;
    Ok(Json(view_json(&view)).into_response())
}

/// Query of `GET /v1/agents`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only the agents that declare this capability.
    capability: Option<String>,
}

/// `GET /v1/agents?capability=X`.
#[utoipa::path(
    get,
    path = "/v1/agents",
    operation_id = "list_agents",
    tag = "agents",
    params(ListQuery),
    responses((status = 200, description = "Every registered agent (with `capability`: those that declare it).", body = AgentList))
)]
pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) =
        query.map_err(|e| ApiError::bad_request("invalid_request", e.body_text()))?;
    let views = state.broker.agents(query.capability.as_deref());
    let agents = views.iter().map(view_json).collect();
    Ok(Json(AgentList { agents }).into_response())
}
