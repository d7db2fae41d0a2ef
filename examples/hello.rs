//! axum's hello-world POST, the ceiling the benchmarks compare Courier's HTTP path with:
//! `cargo run --release --example hello -- 127.0.0.1:7080`, then wrk with `benches/publish.lua`.

use axum::routing::post;
use axum::Router;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7080".into());
    let app = Router::new().route(
        "/v1/messages",
        post(|body: axum::body::Bytes| async move { format!("{{\"bytes\":{}}}", body.len()) }),
    );
    let listener = tokio::net::TcpListener::bind(&address).await?;
    println!("hello listening on http://{address}");
    axum::serve(listener, app).await
}
