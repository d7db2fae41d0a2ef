//! Accepting and serving HTTP connections (SPEC §7, slow and hostile clients): at most
//! `limits.max_connections` open at once (further ones wait in the listen backlog), request
//! headers within `limits.header_timeout` (else the connection is closed), the request line
//! and headers bounded (414 and 431), TLS when configured (the handshake within the header
//! timeout), `TCP_NODELAY`, and a graceful shutdown that lets requests in flight finish.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tower_service::Service;

use axum::http::StatusCode;
use axum::response::IntoResponse;

use crate::api::error::{ApiError, BodyTimeout};

/// The most bytes of a request's headers (names and values); more get 431. Also hyper's
/// read buffer for a request head.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The longest request target (path and query); longer gets 414.
pub const MAX_URI_BYTES: usize = 8 * 1024;

/// How connections are limited.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Time for a request's headers to arrive, from the connection's start or the end of
    /// the previous response.
    pub header_timeout: Duration,
    /// Time for a request's body to arrive once its headers have (checked where the body
    /// is read, [`crate::api::error::BodyTimeout`]).
    pub body_timeout: Duration,
}

/// Serves `router` on `listener` until `shutdown` completes; then stops accepting, lets the
/// requests in flight finish, and returns once every connection is closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let Some((stream, peer)) = accept(&listener, shutdown.as_mut()).await else {
            break;
        };
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            request
                .extensions_mut()
                .insert(BodyTimeout(limits.body_timeout));
            let mut router = router.clone();
            async move {
                if let Some(refused) = oversized(&request) {
                    return Ok(refused.into_response());
                }
                router.call(request).await
            }
        });
        let (http, watcher, tls) = (http.clone(), graceful.watcher(), tls.clone());
        tokio::spawn(async move {
            let served = match tls {
                None => {
                    let connection = http.serve_connection(TokioIo::new(stream), service);
                    watcher.watch(connection).await
                }
                // The handshake is bounded like the headers that follow it.
                Some(tls) => {
                    match tokio::time::timeout(limits.header_timeout, tls.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let connection = http.serve_connection(TokioIo::new(stream), service);
                            watcher.watch(connection).await
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(error) = served {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The next connection (with `TCP_NODELAY` set), or `None` once `shutdown` completes.
async fn accept(
    listener: &TcpListener,
    mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Responses leave at once: without TCP_NODELAY the tail of a large answer
                // waits for the client's delayed ACK of the segments before it.
                if let Err(error) = stream.set_nodelay(true) {
                    tracing::debug!(%error, "could not set TCP_NODELAY on a connection");
                }
                return Some((stream, peer));
            }
            Err(error) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(%error, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// 414 for a request target over [`MAX_URI_BYTES`], 431 for headers over [`MAX_HEAD_BYTES`]
/// (hyper's own limits answer the rest: a head larger than its buffer, more than 100 headers).
fn oversized<B>(request: &hyper::Request<B>) -> Option<ApiError> {
    let uri = request
        .uri()
        .path_and_query()
        .map_or(0, |p| p.as_str().len());
    if uri > MAX_URI_BYTES {
        return Some(ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("the request target is {uri} bytes; at most {MAX_URI_BYTES} are read"),
        ));
    }
    let headers: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    (headers > MAX_HEAD_BYTES).then(|| {
        ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("the request headers are {headers} bytes; at most {MAX_HEAD_BYTES} are read"),
        )
    })
}
