//! T15: slow and hostile clients. Connections whose headers do not arrive within
//! `limits.header_timeout` are closed (300 slowloris connections, while a normal client keeps
//! getting 2xx); a body that does not arrive within `limits.body_timeout` gets 408 and the
//! connection closes; `limits.max_connections` caps open connections; an oversized request
//! line or header block gets 414 / 431; none of them writes anything.
#![expect(
    clippy::disallowed_methods,
    reason = "the test measures how long the server takes to close connections"
)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::TestServer;

/// Whether the server closes `stream` by `deadline` (EOF or a reset, after any answer).
fn closed_by(stream: &mut TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        // At least one look, however late: a connection closed long ago reads EOF at once.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

fn next_offset(server: &TestServer) -> u64 {
    server.get("/v1/stats").json["log"]["next_offset"]
        .as_u64()
        .expect("next_offset")
}

#[test]
fn t15_slowloris_connections_are_closed_while_others_are_served() {
    let server = TestServer::start(&[
        "--limits-header-timeout",
        "1s",
        "--limits-max-connections",
        "1000",
    ]);
    server.register("sink", json!({}));
    let before = next_offset(&server);
    let opened = Instant::now();
    let mut slow: Vec<TcpStream> = (0..300)
        .map(|_| {
            let mut stream = TcpStream::connect(server.addr).expect("connect");
            // A request line and one header, then nothing: the headers never end.
            stream
                .write_all(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n")
                .expect("send");
            stream
        })
        .collect();
    // A normal client is served meanwhile.
    let mut served = 0;
    while opened.elapsed() < Duration::from_millis(1500) {
        assert_eq!(server.get("/healthz").status, 200);
        served += 1;
    }
    assert!(served > 10, "the normal client got {served} answers");
    let deadline = opened + Duration::from_secs(4);
    let still_open = slow
        .iter_mut()
        .map(|stream| closed_by(stream, deadline))
        .filter(|closed| !closed)
        .count();
    assert_eq!(
        still_open, 0,
        "slowloris connections left open past the header timeout"
    );
    assert!(opened.elapsed() < Duration::from_secs(5));
    assert_eq!(
        next_offset(&server),
        before,
        "a slow request wrote something"
    );
}

#[test]
fn t15_a_body_that_does_not_arrive_gets_408_and_writes_nothing() {
    let server = TestServer::start(&["--limits-body-timeout", "1s"]);
    server.register("sink", json!({}));
    let before = next_offset(&server);
    let mut stream = TcpStream::connect(server.addr).expect("connect");
    let started = Instant::now();
    stream
        .write_all(
            b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"to\": \"agent:sink\"",
        )
        .expect("send");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "answered before the timeout"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the connection stayed open"
    );
    assert_eq!(next_offset(&server), before);
}

#[test]
fn t15_max_connections_holds_new_connections_until_one_closes() {
    let server = TestServer::start(&[
        "--limits-max-connections",
        "5",
        "--limits-header-timeout",
        "1s",
    ]);
    let idle: Vec<TcpStream> = (0..5)
        .map(|_| TcpStream::connect(server.addr).expect("connect"))
        .collect();
    // Let the server accept them: every slot is taken.
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let response = server.get("/healthz");
    assert_eq!(response.status, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "served at once although 5 of 5 connections were open ({:?})",
        started.elapsed()
    );
    drop(idle);
}

#[test]
fn t15_oversized_request_lines_and_headers_are_refused() {
    let server = TestServer::start(&[]);
    server.register("sink", json!({}));
    let before = next_offset(&server);
    let long_path = format!("/v1/agents/{}", "a".repeat(70 * 1024));
    let mut stream = TcpStream::connect(server.addr).expect("connect");
    stream
        .write_all(format!("GET {long_path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .expect("send");
    let mut answer = Vec::new();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 414") || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );

    let response = server.get(&format!("/v1/agents/{}", "a".repeat(10 * 1024)));
    assert_eq!(response.status, 414, "{response:?}");
    assert_eq!(response.code(), "uri_too_long");

    let big = "x".repeat(70 * 1024);
    let response = server.raw(
        "POST",
        "/v1/messages",
        Some(br#"{"to": "agent:sink", "from": "t", "body": 1}"#),
        Some("application/json"),
        &[("X-Padding", &big)],
    );
    assert_eq!(response.status, 431, "{response:?}");
    assert_eq!(response.code(), "headers_too_large");
    assert_eq!(next_offset(&server), before);
}
