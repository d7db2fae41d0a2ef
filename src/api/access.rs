//! Authentication and authorization of HTTP requests (SPEC §7).
//!
//! One layer in front of the routes ([`authorize`]) finds who is calling (a bearer token →
//! a [`Principal`]) and checks the route's [`Rule`] from one table ([`rule`]): handlers never
//! look at tokens. The one check that needs the body, publishing only as oneself, goes
//! through the [`Caller`] extractor that the publishing handlers take. Every refusal is
//! logged (route, peer, the agent if known; never a token) and counted.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, RawPathParams, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;
use crate::auth::{Principal, Token, TokenHash};
use crate::config::{Auth, AuthMode};

/// Who may use a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Anyone, without a token.
    Open,
    /// Any agent or the admin. Publishing is further limited to one's own `from`.
    Authenticated,
    /// The agent the path's `{agent}` names, or the admin.
    OwnAgent,
    /// An agent that declares the capability the path's `{name}` names, or the admin.
    DeclaredCapability,
    /// The admin only.
    Admin,
    /// The admin, or anyone when `auth.metrics_open` is set.
    Operator,
}

/// Every route's rule: (method, route template, rule). A route missing here is the admin's
/// only (a new route is closed until it is given its rule).
pub const RULES: &[(Method, &str, Rule)] = &[
    (Method::GET, "/healthz", Rule::Open),
    (Method::GET, "/readyz", Rule::Open),
    (Method::GET, "/v1/stats", Rule::Operator),
    (Method::GET, "/metrics", Rule::Operator),
    (Method::GET, "/openapi.json", Rule::Open),
    (Method::POST, "/v1/messages", Rule::Authenticated),
    (Method::POST, "/v1/messages/batch", Rule::Authenticated),
    (Method::POST, "/v1/requests", Rule::Authenticated),
    (Method::GET, "/v1/agents", Rule::Authenticated),
    (Method::GET, "/v1/agents/{agent}", Rule::Authenticated),
    (Method::PUT, "/v1/agents/{agent}", Rule::Admin),
    (Method::DELETE, "/v1/agents/{agent}", Rule::Admin),
    (Method::POST, "/v1/agents/{agent}/token", Rule::OwnAgent),
    (Method::POST, "/v1/agents/{agent}/heartbeat", Rule::OwnAgent),
    (Method::POST, "/v1/agents/{agent}/receive", Rule::OwnAgent),
    (Method::POST, "/v1/agents/{agent}/ack", Rule::OwnAgent),
    (Method::POST, "/v1/agents/{agent}/nack", Rule::OwnAgent),
    (Method::POST, "/v1/agents/{agent}/extend", Rule::OwnAgent),
    (
        Method::GET,
        "/v1/agents/{agent}/dead-letters",
        Rule::OwnAgent,
    ),
    (
        Method::POST,
        "/v1/agents/{agent}/dead-letters/redrive",
        Rule::OwnAgent,
    ),
    (
        Method::GET,
        "/v1/agents/{agent}/subscriptions",
        Rule::OwnAgent,
    ),
    (
        Method::PUT,
        "/v1/agents/{agent}/subscriptions/{pattern}",
        Rule::OwnAgent,
    ),
    (
        Method::DELETE,
        "/v1/agents/{agent}/subscriptions/{pattern}",
        Rule::OwnAgent,
    ),
    (Method::GET, "/v1/topics", Rule::Authenticated),
    (Method::GET, "/v1/capabilities", Rule::Authenticated),
    (Method::GET, "/v1/capabilities/{name}", Rule::Authenticated),
    (
        Method::GET,
        "/v1/capabilities/{name}/dead-letters",
        Rule::DeclaredCapability,
    ),
    (
        Method::POST,
        "/v1/capabilities/{name}/dead-letters/redrive",
        Rule::DeclaredCapability,
    ),
];

/// The rule of `method` on the route template `route`.
pub fn rule(method: &Method, route: &str) -> Rule {
    // axum answers HEAD with the GET handler.
    let method = if method == Method::HEAD {
        &Method::GET
    } else {
        method
    };
    RULES
        .iter()
        .find(|(m, r, _)| m == method && *r == route)
        .map_or(Rule::Admin, |(_, _, rule)| *rule)
}

/// The server's side of authentication: the mode, the admin token's hash, and the counts of
/// refusals.
#[derive(Debug)]
pub struct Access {
    mode: AuthMode,
    admin: Option<TokenHash>,
    metrics_open: bool,
    unauthenticated: AtomicU64,
    forbidden: AtomicU64,
    bad_signatures: AtomicU64,
}

/// Refusals so far, for `/v1/stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusals {
    /// 401s: no token, a malformed one, or one nobody has.
    pub unauthenticated: u64,
    /// 403s: a known caller, not allowed that.
    pub forbidden: u64,
    /// 401s of signed requests (`bad_signature`), not in `unauthenticated`.
    pub bad_signatures: u64,
}

impl Access {
    /// Access as configured; `admin` is the admin token when `auth.mode = token`.
    pub fn new(auth: &Auth, admin: Option<&Token>) -> Self {
        Self {
            mode: auth.mode,
            admin: admin.map(Token::hash),
            metrics_open: auth.metrics_open,
            unauthenticated: AtomicU64::new(0),
            forbidden: AtomicU64::new(0),
            bad_signatures: AtomicU64::new(0),
        }
    }

    /// Whether requests need a token.
    pub fn is_on(&self) -> bool {
        self.mode == AuthMode::Token
    }

    /// Counts a request refused for its signature (a 401 after authentication).
    pub fn count_bad_signature(&self) {
        self.bad_signatures.fetch_add(1, Ordering::Relaxed);
    }

    /// Refusals so far.
    pub fn refusals(&self) -> Refusals {
        Refusals {
            unauthenticated: self.unauthenticated.load(Ordering::Relaxed),
            forbidden: self.forbidden.load(Ordering::Relaxed),
            bad_signatures: self.bad_signatures.load(Ordering::Relaxed),
        }
    }
}

/// Why a request was not authenticated.
#[derive(Debug, Clone, Copy)]
pub(super) enum Unauthenticated {
    Missing,
    Malformed,
    Unknown,
}

impl Unauthenticated {
    fn why(self) -> &'static str {
        match self {
            Self::Missing => "no token",
            Self::Malformed => "a malformed Authorization header",
            Self::Unknown => "a token nobody has",
        }
    }
}

/// Who holds the bearer token of `headers`.
fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Principal, Unauthenticated> {
    let token = bearer_token(headers)?;
    let hash = TokenHash::of(token.as_bytes());
    if state
        .access
        .admin
        .as_ref()
        .is_some_and(|a| a.matches(&hash))
    {
        return Ok(Principal::Admin);
    }
    state
        .broker
        .agent_of_token(&hash)
        .map(Principal::Agent)
        .ok_or(Unauthenticated::Unknown)
}

/// The token of the request's `Authorization: Bearer <token>` header (also the key of its
/// signature, [`super::signature`]).
pub(super) fn bearer_token(headers: &HeaderMap) -> Result<&str, Unauthenticated> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(Unauthenticated::Missing)?;
    let text = value.to_str().map_err(|_| Unauthenticated::Malformed)?;
    let (scheme, token) = text.split_once(' ').ok_or(Unauthenticated::Malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer")
        || token.is_empty()
        || !token.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(Unauthenticated::Malformed);
    }
    Ok(token)
}

/// The layer: authenticates the request and checks its route's rule; the principal goes
/// into the request's extensions for [`Caller`].
pub async fn authorize(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if !state.access.is_on() {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    let route = parts
        .extensions
        .get::<MatchedPath>()
        .map_or("", MatchedPath::as_str)
        .to_owned();
    let rule = rule(&parts.method, &route);
    let open = rule == Rule::Open || (rule == Rule::Operator && state.access.metrics_open);
    if open {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| *addr);
    let principal = match authenticate(&state, &parts.headers) {
        Ok(principal) => principal,
        Err(why) => {
            state.access.unauthenticated.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(route, peer = ?peer, reason = why.why(), "authentication failed");
            return unauthorized(why);
        }
    };
    // Only an agent on a route of its own or of a capability needs the path's parameters.
    let needs_params = matches!(principal, Principal::Agent(_))
        && matches!(rule, Rule::OwnAgent | Rule::DeclaredCapability);
    let params = match needs_params {
        true => RawPathParams::from_request_parts(&mut parts, &state)
            .await
            .ok(),
        false => None,
    };
    let param = |name: &str| {
        params
            .as_ref()
            .and_then(|p| {
                p.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.to_owned())
            })
            .unwrap_or_default()
    };
    let allowed = match (&principal, rule) {
        (Principal::Anyone | Principal::Admin, _) | (_, Rule::Open | Rule::Authenticated) => true,
        (Principal::Agent(_), Rule::Admin | Rule::Operator) => false,
        (Principal::Agent(id), Rule::OwnAgent) => id.as_str() == param("agent"),
        (Principal::Agent(id), Rule::DeclaredCapability) => {
            let name = param("name");
            state
                .broker
                .agent(id)
                .is_some_and(|view| view.agent.capabilities.contains(&name))
        }
    };
    if !allowed {
        state.access.forbidden.fetch_add(1, Ordering::Relaxed);
        let agent = match &principal {
            Principal::Agent(id) => id.as_str(),
            _ => "",
        };
        tracing::warn!(route, peer = ?peer, agent, method = %parts.method, "authorization refused");
        return forbidden(rule).into_response();
    }
    parts.extensions.insert(principal);
    next.run(Request::from_parts(parts, body)).await
}

/// 401 with `WWW-Authenticate` (RFC 6750).
fn unauthorized(why: Unauthenticated) -> Response {
    let (message, challenge) = match why {
        Unauthenticated::Missing => (
            "this route needs a token: send `Authorization: Bearer <token>` (an agent's token from its registration, or the admin token)",
            r#"Bearer realm="courier""#,
        ),
        Unauthenticated::Malformed => (
            "the Authorization header is not `Bearer <token>`",
            r#"Bearer realm="courier", error="invalid_request""#,
        ),
        Unauthenticated::Unknown => (
            "the token is not valid: it was never issued, was rotated, or its agent was deleted; ask the operator for a new one",
            r#"Bearer realm="courier", error="invalid_token""#,
        ),
    };
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
        .challenge(challenge)
        .into_response()
}

fn forbidden(rule: Rule) -> ApiError {
    let message = match rule {
        Rule::OwnAgent => "an agent's token reaches only its own routes (/v1/agents/<its id>/...); use that agent's token or the admin token",
        Rule::DeclaredCapability => "only agents that declare this capability (or the admin) reach its queue's dead letters",
        _ => "this route needs the admin token",
    };
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
}

/// Who is calling, for the handlers whose check needs the body (publishing as oneself).
#[derive(Debug, Clone)]
pub struct Caller {
    /// The caller.
    pub principal: Principal,
    access: Arc<Access>,
}

impl Caller {
    /// Refuses a message whose `from` is not the caller (the admin may send as anyone).
    pub fn check_sender(&self, from: &str) -> Result<(), ApiError> {
        if self.principal.may_act_as(from) {
            return Ok(());
        }
        self.access.forbidden.fetch_add(1, Ordering::Relaxed);
        if let Principal::Agent(id) = &self.principal {
            tracing::warn!(
                agent = id.as_str(),
                from,
                "authorization refused: publishing as another agent"
            );
        }
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("`from` is {from:?}, but this token is another agent's: an agent publishes only as itself; set `from` to its own id"),
        ))
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let principal = match parts.extensions.get::<Principal>() {
            Some(principal) => principal.clone(),
            None if !state.access.is_on() => Principal::Anyone,
            // Only a route without the layer's check could get here: refuse, do not guess.
            None => return Err(forbidden(Rule::Admin)),
        };
        Ok(Self {
            principal,
            access: state.access.clone(),
        })
    }
}
