//! The least an OTLP/HTTP collector can do, for measuring what exporting spans costs Courier
//! (README, "Tracing") without a real collector's own work in the measurement: it accepts
//! `POST /v1/traces`, reads the body and answers `200` with an empty (valid)
//! `ExportTraceServiceResponse`, on one thread. On SIGINT/SIGTERM it prints how many requests
//! and bytes it took.
//!
//! `cargo run --release --example otlp_sink -- 127.0.0.1:4318`, then start a server built with
//! `--features otel` with `--otel-endpoint http://127.0.0.1:4318`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::routing::post;
use axum::Router;
use tokio::signal::unix::{signal, SignalKind};

/// What the sink took.
#[derive(Default)]
struct Taken {
    requests: AtomicU64,
    bytes: AtomicU64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4318".into());
    let taken = Arc::new(Taken::default());
    let app = Router::new()
        .route(
            "/v1/traces",
            post(|State(taken): State<Arc<Taken>>, body: Bytes| async move {
                taken.requests.fetch_add(1, Ordering::Relaxed);
                taken.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                ([(CONTENT_TYPE, "application/x-protobuf")], Bytes::new())
            }),
        )
        .layer(DefaultBodyLimit::disable())
        .with_state(taken.clone());
    let listener = tokio::net::TcpListener::bind(&address).await?;
    println!("otlp sink listening on http://{address}/v1/traces");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        })
        .await?;
    println!(
        "took {} requests, {} bytes",
        taken.requests.load(Ordering::Relaxed),
        taken.bytes.load(Ordering::Relaxed)
    );
    Ok(())
}
