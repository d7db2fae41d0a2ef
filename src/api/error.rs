//! The one error shape of the API: `{"error": {"code", "message"}}` with a fitting status,
//! and the extractor that reads JSON bodies into it.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::broker::Refusal;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A stable snake_case code.
    pub code: &'static str,
    /// What went wrong and how to fix it.
    pub message: String,
    /// Seconds for `Retry-After` (429, 503).
    pub retry_after_s: Option<u64>,
    /// `WWW-Authenticate` (401).
    pub challenge: Option<&'static str>,
    /// Close the connection after this answer (the client is too slow to keep).
    pub close: bool,
}

/// The `WWW-Authenticate` challenge of a refused signature.
pub const SIGNATURE_CHALLENGE: &str = r#"Courier-Signature realm="courier""#;

impl ApiError {
    /// An error with a status, a code and a message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_s: None,
            challenge: None,
            close: false,
        }
    }

    /// Adds a `WWW-Authenticate` challenge.
    pub fn challenge(mut self, challenge: &'static str) -> Self {
        self.challenge = Some(challenge);
        self
    }

    /// 400 with `code`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// Adds a `Retry-After`.
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after_s = Some(seconds);
        self
    }
}

/// `{"error": {"code", "message"}}`: the shape of every error.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(example = json!({"error": {"code": "unknown_agent", "message": "no agent `bob` is registered; register it with PUT /v1/agents/bob"}}))]
pub struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

/// What went wrong.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail<'a> {
    /// A stable snake_case code.
    code: &'static str,
    /// What went wrong and how to fix it.
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, code = self.code, message = %self.message, "request failed");
        } else {
            tracing::debug!(status = %self.status, code = self.code, message = %self.message, "request refused");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
            },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after_s {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.close {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(challenge) = self.challenge {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        response
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        let message = refusal.to_string();
        match refusal {
            Refusal::UnknownAgent(_) => Self::new(StatusCode::NOT_FOUND, "unknown_agent", message),
            Refusal::UnknownCapability(_) => {
                Self::new(StatusCode::NOT_FOUND, "unknown_capability", message)
            }
            Refusal::InboxFull { .. } => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "inbox_full", message).retry_after(1)
            }
            Refusal::RateLimited { .. } => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message).retry_after(1)
            }
            Refusal::TooManyReceivers { .. } => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "too_many_receivers", message)
                    .retry_after(1)
            }
            Refusal::UnknownRequest(_) => {
                Self::new(StatusCode::BAD_REQUEST, "unknown_request", message)
            }
            Refusal::IdTaken { .. } => Self::new(StatusCode::CONFLICT, "id_taken", message),
            Refusal::NonceReused | Refusal::SignatureExpired => {
                Self::new(StatusCode::UNAUTHORIZED, "bad_signature", message)
                    .challenge(SIGNATURE_CHALLENGE)
            }
            Refusal::NoResponders(_) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "no_responders", message).retry_after(1)
            }
            Refusal::TooManyWaiting { .. } => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "too_many_requests", message)
                    .retry_after(1)
            }
            Refusal::ReplyTimeout { .. } => {
                Self::new(StatusCode::GATEWAY_TIMEOUT, "reply_timeout", message)
            }
            Refusal::Unavailable(_) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message).retry_after(1)
            }
        }
    }
}

/// The raw bytes of a JSON request body, checked for content type and size; an empty body
/// reads as `{}` so that requests whose fields are all optional need none.
pub struct JsonBody(pub Bytes);

/// The largest request body read at all; each route checks its own smaller limit.
pub const BODY_LIMIT_BYTES: usize = 64 * 1024 * 1024 + 64 * 1024;

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, ApiError> {
        let is_json = json_content_type(request.headers());
        let timeout = request
            .extensions()
            .get::<BodyTimeout>()
            .map_or(std::time::Duration::MAX, |t| t.0);
        let read = axum::body::to_bytes(request.into_body(), BODY_LIMIT_BYTES);
        let bytes = tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| body_timed_out(timeout))?
            .map_err(|_| too_large("the request body", BODY_LIMIT_BYTES as u64))?;
        if bytes.is_empty() {
            return Ok(Self(Bytes::from_static(b"{}")));
        }
        if !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON with `Content-Type: application/json`",
            ));
        }
        Ok(Self(bytes))
    }
}

/// How long a request's body may take to arrive (`limits.body_timeout`), set on each request
/// by [`crate::connections::serve`].
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeout(pub std::time::Duration);

/// 408, and the connection is closed: the body did not arrive in time.
fn body_timed_out(timeout: std::time::Duration) -> ApiError {
    let mut error = ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        format!(
            "the request body did not arrive within {} ms (limits.body_timeout); send it at once after the headers",
            timeout.as_millis()
        ),
    );
    error.close = true;
    error
}

fn json_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// 413 for `what` over `limit_bytes`.
pub fn too_large(what: &str, limit_bytes: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("{what} is larger than {limit_bytes} bytes; send less, or raise the limit in the server's configuration"),
    )
}

/// Parses `bytes` as `T`: syntax errors are `invalid_json`, shape errors (missing or unknown
/// fields, wrong types) `invalid_request`, both naming line and column.
pub fn parse_json<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|error| match error.classify() {
        serde_json::error::Category::Data => ApiError::bad_request(
            "invalid_request",
            format!("the request does not fit the API: {error}"),
        ),
        _ => ApiError::bad_request(
            "invalid_json",
            format!("the body is not valid JSON: {error}"),
        ),
    })
}
