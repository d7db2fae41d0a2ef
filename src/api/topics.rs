//! Topics and subscriptions: `PUT`/`DELETE /v1/agents/{agent}/subscriptions/{pattern}`,
//! `GET /v1/agents/{agent}/subscriptions` and `GET /v1/topics`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::error::{parse_json, ApiError, ErrorBody, JsonBody};
use super::openapi::{AgentPath, SubscriptionPath};
use super::{agent_id, AppState};
use crate::broker::Start;
use crate::ids::{AgentId, TopicPattern};

/// Body of `PUT /v1/agents/{agent}/subscriptions/{pattern}`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct SubscribeBody {
    /// `latest` (the default) or `earliest`.
    start: Option<String>,
}

/// A subscription as clients see it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct SubscriptionJson<'a> {
    agent: &'a str,
    pattern: &'a str,
    start: &'static str,
}

/// `{"subscriptions": [{"pattern": ...}]}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct SubscriptionList<'a> {
    subscriptions: Vec<PatternJson<'a>>,
}

/// One pattern of a listing.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct PatternJson<'a> {
    pattern: &'a str,
}

/// `{"topics": [...]}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct TopicList<'a> {
    topics: Vec<TopicJson<'a>>,
}

/// A topic as clients see it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct TopicJson<'a> {
    name: &'a str,
    messages: u64,
    last_offset: u64,
    subscribers: usize,
}

fn pattern(agent: &str, text: &str) -> Result<(AgentId, TopicPattern), ApiError> {
    let id = agent_id(agent)?;
    let pattern =
        TopicPattern::parse(text).map_err(|e| ApiError::bad_request("invalid_pattern", e))?;
    Ok((id, pattern))
}

/// `PUT /v1/agents/{agent}/subscriptions/{pattern}` → 201 subscribed / 200 already was.
#[utoipa::path(
    put,
    path = "/v1/agents/{agent}/subscriptions/{pattern}",
    tag = "topics",
    params(SubscriptionPath),
    request_body(content = SubscribeBody, example = json!({"start": "earliest"})),
    responses(
        (status = 201, description = "Subscribed.", body = SubscriptionJson),
        (status = 200, description = "It already was.", body = SubscriptionJson),
    )
)]
pub async fn subscribe(
    State(state): State<AppState>,
    Path((agent, text)): Path<(String, String)>,
    JsonBody(bytes): JsonBody,
) -> Result<Response, ApiError> {
    let (id, pattern) = pattern(&agent, &text)?;
    let body: SubscribeBody = parse_json(&bytes)?;
    let start = match body.start.as_deref() {
        None | Some("latest") => Start::Latest,
        Some("earliest") => Start::Earliest,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!("`start` is {other:?}: use \"latest\" or \"earliest\""),
            ))
        }
    };
    let subscription = state.broker.subscribe(&id, &pattern, start).await?;
    let status = if subscription.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let json = SubscriptionJson {
        agent: id.as_str(),
        pattern: pattern.as_str(),
        start: match subscription.start {
            Start::Latest => "latest",
            Start::Earliest => "earliest",
        },
    };
    Ok((status, Json(json)).into_response())
}

/// `DELETE /v1/agents/{agent}/subscriptions/{pattern}` → 204, or 404 if there was none.
#[utoipa::path(
    delete,
    path = "/v1/agents/{agent}/subscriptions/{pattern}",
    tag = "topics",
    params(SubscriptionPath),
    responses(
        (status = 204, description = "Unsubscribed; messages already routed stay in the inbox."),
        (status = 400, description = "A bad agent id or pattern.", body = ErrorBody),
        (status = 404, description = "No such agent, or no such subscription (`not_subscribed`).", body = ErrorBody),
    )
)]
pub async fn unsubscribe(
    State(state): State<AppState>,
    Path((agent, text)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (id, pattern) = pattern(&agent, &text)?;
    if state.broker.unsubscribe(&id, &pattern).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_subscription",
            format!("agent `{id}` is not subscribed to \"{pattern}\"; GET /v1/agents/{id}/subscriptions lists its patterns"),
        ))
    }
}

/// `GET /v1/agents/{agent}/subscriptions`.
#[utoipa::path(
    get,
    path = "/v1/agents/{agent}/subscriptions",
    operation_id = "list_subscriptions",
    tag = "topics",
    params(AgentPath),
    responses(
        (status = 200, description = "The agent's subscription patterns.", body = SubscriptionList),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    Path(agent): Path<String>,
) -> Result<Response, ApiError> {
    let id = agent_id(&agent)?;
    let patterns = state.broker.subscriptions(&id)?;
    let subscriptions = patterns
        .iter()
        .map(|p| PatternJson {
            pattern: p.as_str(),
        })
        .collect();
    Ok(Json(SubscriptionList { subscriptions }).into_response())
}

/// `GET /v1/topics`: the topics messages were published to, with their subscriber counts.
#[utoipa::path(
    get,
    path = "/v1/topics",
    operation_id = "list_topics",
    tag = "topics",
    responses((status = 200, description = "The topics messages were published to, with their subscriber counts.", body = TopicList))
)]
pub async fn topics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let views = state.broker.topics();
    let topics = views
        .iter()
        .map(|t| TopicJson {
            name: &t.name,
            messages: t.seen.messages,
            last_offset: t.seen.last_offset.0,
            subscribers: t.subscribers,
        })
        .collect();
    Ok(Json(TopicList { topics }).into_response())
}
