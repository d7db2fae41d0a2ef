//! The HTTP API (SPEC §3): routes, and handlers that check input and call the broker.
//!
//! HTTP only: no delivery decisions are made here. Every error has the shape of
//! [`error::ApiError`], including unknown routes and wrong methods.

pub mod access;
pub mod agents;
pub mod capabilities;
pub mod error;
pub mod messages;
pub mod openapi;
pub mod ops;
pub mod requests;
pub mod signature;
pub mod topics;
pub mod wire;

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use futures_util::FutureExt;
use tower_layer::Layer;
use tower_service::Service;

use crate::broker::Broker;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::telemetry::context::{TraceId, TraceParent};
use crate::telemetry::{self, spans};
use error::ApiError;
use tracing::Instrument;

/// What every handler gets.
#[derive(Clone)]
pub struct AppState {
    /// The broker.
    pub broker: Arc<Broker>,
    /// The configuration.
    pub config: Arc<Config>,
    /// Authentication: the mode, the admin token's hash, refusal counts.
    pub access: Arc<access::Access>,
}

/// The router of the whole API.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/messages", post(messages::publish))
        .route("/v1/messages/batch", post(messages::publish_batch))
        .route("/v1/requests", post(requests::request))
        .route("/v1/agents", get(agents::list))
        .route(
            "/v1/agents/{agent}",
            put(agents::upsert).get(agents::get).delete(agents::delete),
        )
        .route("/v1/agents/{agent}/token", post(agents::rotate_token))
        .route("/v1/agents/{agent}/heartbeat", post(agents::heartbeat))
        .route("/v1/agents/{agent}/receive", post(messages::receive))
        .route("/v1/agents/{agent}/ack", post(messages::ack))
        .route("/v1/agents/{agent}/nack", post(messages::nack))
        .route("/v1/agents/{agent}/extend", post(messages::extend))
        .route(
            "/v1/agents/{agent}/dead-letters",
            get(messages::dead_letters),
        )
        .route(
            "/v1/agents/{agent}/dead-letters/redrive",
            post(messages::redrive),
        )
        .route("/v1/agents/{agent}/subscriptions", get(topics::list))
        .route(
            "/v1/agents/{agent}/subscriptions/{pattern}",
            put(topics::subscribe).delete(topics::unsubscribe),
        )
        .route("/v1/topics", get(topics::topics))
        .route("/v1/capabilities", get(capabilities::list))
        .route("/v1/capabilities/{name}", get(capabilities::get))
        .route(
            "/v1/capabilities/{name}/dead-letters",
            get(capabilities::dead_letters),
        )
        .route(
            "/v1/capabilities/{name}/dead-letters/redrive",
            post(capabilities::redrive),
        )
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/v1/stats", get(ops::stats))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(openapi::document))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            access::authorize,
        ))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(error::BODY_LIMIT_BYTES))
        .layer(GuardLayer(state.broker.metrics().clone()))
        .with_state(state)
}

/// The outermost layer of every route: runs the request in its span
/// ([`telemetry::request_span`], joining the caller's `traceparent`, and when spans are
/// exported, [`spans::server`] too); answers a handler that panics with 500 in the error
/// shape, and logs the panic with the request's method and route, instead of dropping the
/// connection without an answer; and counts every answer by route template, method and
/// status class (`courier_http_requests_total`). A service of its own rather than
/// `middleware::from_fn`, which costs three allocations per request where this costs one.
#[derive(Debug, Clone)]
struct GuardLayer(Arc<Metrics>);

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard(inner, self.0.clone())
    }
}

/// See [`GuardLayer`].
#[derive(Debug, Clone)]
struct Guard<S>(S, Arc<Metrics>);

impl<S> Service<Request> for Guard<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let method = request.method().clone();
        let route = request.extensions().get::<MatchedPath>().cloned();
        let caller = TraceParent::of_request(request.headers()).map(|(_, parsed)| parsed);
        let trace_id = caller.map_or_else(TraceId::random, |c| c.trace_id);
        let method_name = method_label(&method);
        let route_name = route_label(route.as_ref());
        let span = telemetry::request_span(method_name, route_name, trace_id, caller);
        let recording = spans::server(method_name, route_name, trace_id, caller);
        let inner = &mut self.0;
        let metrics = self.1.clone();
        let called =
            span.in_scope(|| std::panic::catch_unwind(AssertUnwindSafe(|| inner.call(request))));
        Box::pin(
            async move {
                let answered = match called {
                    Ok(future) => {
                        let scoped = spans::within(recording.as_ref(), future);
                        AssertUnwindSafe(scoped).catch_unwind().await
                    }
                    Err(panic) => Err(panic),
                };
                let response = answered
                    .unwrap_or_else(|panic| Ok(panicked(&method, route.as_ref(), &*panic)))?;
                let status = response.status();
                if let Some(mut recording) = recording {
                    recording.int("http.response.status_code", status.as_u16().into());
                    if status.is_server_error() {
                        recording.error(format!("answered {status}"));
                    }
                }
                metrics.answered(route_label(route.as_ref()), method_name, status.as_u16());
                Ok(response)
            }
            .instrument(span),
        )
    }
}

/// A request's route template as a label (of its span and its metric): `unmatched` for
/// one no route took.
fn route_label(route: Option<&MatchedPath>) -> &str {
    route.map_or("unmatched", MatchedPath::as_str)
}

/// A request method as a metric label: the methods of HTTP, else `other` (labels stay
/// bounded whatever clients send).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// The answer to a request whose handler panicked; the panic is logged with its context.
fn panicked(
    method: &Method,
    route: Option<&MatchedPath>,
    panic: &(dyn std::any::Any + Send),
) -> Response {
    let what = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    let route = route.map_or("(no route)", MatchedPath::as_str);
    tracing::error!(%method, route, panic = what, "a request handler panicked");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        format!("the server failed while answering {method} {route} (a bug; it is logged); retry, and report it if it happens again"),
    )
    .into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; the routes are listed in the README")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method; see the README for the routes and their methods",
    )
}

/// Parses the `{agent}` path segment.
pub fn agent_id(text: &str) -> Result<crate::ids::AgentId, ApiError> {
    crate::ids::AgentId::parse(text).map_err(|e| ApiError::bad_request("invalid_agent_id", e))
}
