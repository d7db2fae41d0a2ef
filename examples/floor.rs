//! The least a durable HTTP publish can cost on Courier's stack: a reference point for the
//! single-publish benchmark, next to `hello` (no durability) and Redis.
//!
//! An axum POST handler parses the JSON body (as Courier does, into a `serde_json::Value`),
//! queues the bytes for one writer thread and answers `201` once its batch is durable. The
//! writer appends each batch to a preallocated file with one `pwrite` and one fdatasync (a
//! group commit, as Courier's). Nothing else: no record format, CRC, index, delivery state,
//! dedupe or checkpoint. The file is zero-filled and synced before the server listens and is
//! overwritten in a ring, so no write extends it.
//!
//! `cargo run --release --example floor -- 127.0.0.1:7080 /var/tmp/floor.dat`, then wrk with
//! `benches/publish.lua`. The file (256 MiB) stays when the server stops; `benches/run.sh`
//! keeps it in its temporary directory.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use tokio::sync::oneshot;

/// Size of the ring file.
const FILE_BYTES: u64 = 256 << 20;

/// Appends waiting for the writer, and whether it sleeps.
#[derive(Default)]
struct Queue {
    state: Mutex<Pending>,
    wake: Condvar,
}

#[derive(Default)]
struct Pending {
    appends: Vec<(Bytes, oneshot::Sender<u64>)>,
    writer_waiting: bool,
}

fn writer(queue: &Queue, file: &std::fs::File) {
    let mut position = 0u64;
    let mut written = 0u64;
    let mut buffer = Vec::new();
    loop {
        let batch = {
            let mut pending = queue.state.lock().expect("queue lock");
            while pending.appends.is_empty() {
                pending.writer_waiting = true;
                pending = queue.wake.wait(pending).expect("queue lock");
                pending.writer_waiting = false;
            }
            std::mem::take(&mut pending.appends)
        };
        buffer.clear();
        for (body, _) in &batch {
            let len = u32::try_from(body.len()).expect("bodies are small");
            buffer.extend_from_slice(&len.to_le_bytes());
            buffer.extend_from_slice(body);
        }
        if position + buffer.len() as u64 > FILE_BYTES {
            position = 0;
        }
        file.write_all_at(&buffer, position).expect("write");
        position += buffer.len() as u64;
        #[expect(
            clippy::disallowed_methods,
            reason = "a reference program, not Courier"
        )]
        file.sync_data().expect("fdatasync");
        for (_, done) in batch {
            written += 1;
            let _ = done.send(written);
        }
    }
}

async fn publish(State(queue): State<Arc<Queue>>, body: Bytes) -> (StatusCode, String) {
    if serde_json::from_slice::<serde_json::Value>(&body).is_err() {
        return (
            StatusCode::BAD_REQUEST,
            "{\"error\":\"invalid JSON\"}".into(),
        );
    }
    let (done, durable) = oneshot::channel();
    let wake = {
        let mut pending = queue.state.lock().expect("queue lock");
        pending.appends.push((body, done));
        pending.writer_waiting
    };
    if wake {
        queue.wake.notify_one();
    }
    let n = durable.await.expect("the writer never stops");
    (StatusCode::CREATED, format!("{{\"n\":{n}}}"))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let address = args.next().unwrap_or_else(|| "127.0.0.1:7080".into());
    let path = args.next().unwrap_or_else(|| "/var/tmp/floor.dat".into());
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..FILE_BYTES >> 20 {
        file.write_all(&zeros)?;
    }
    #[expect(
        clippy::disallowed_methods,
        reason = "a reference program, not Courier"
    )]
    file.sync_all()?;
    let queue = Arc::new(Queue::default());
    let for_writer = queue.clone();
    std::thread::spawn(move || writer(&for_writer, &file));
    let app = Router::new()
        .route("/v1/messages", post(publish))
        .with_state(queue);
    let listener = tokio::net::TcpListener::bind(&address).await?;
    println!("floor listening on http://{address}, writing {path}");
    axum::serve(listener, app).await
}
