//! Backpressure and limits, error shapes of unknown routes, and the log format.

use serde_json::json;

use crate::support::{receipts, TestServer};

#[test]
fn max_in_flight_caps_receives_and_says_so() {
    let server = TestServer::start(&[]);
    server.register("worker", json!({"max_in_flight": 2}));
    for n in 0..5 {
        server.publish("worker", json!(n));
    }
    let first = server.receive("worker", json!({"max": 10, "wait_ms": 0}));
    assert_eq!(first.len(), 2);
    let agent = server.get("/v1/agents/worker").json;
    assert_eq!(agent["throttled"], json!(true), "{agent}");
    assert_eq!(agent["inbox"]["in_flight"], json!(2));
    assert!(server
        .receive("worker", json!({"max": 10, "wait_ms": 100}))
        .is_empty());
    let r = receipts(&first);
    server.settle("worker", "ack", json!({}), &[&r[0]]);
    assert_eq!(
        server
            .receive("worker", json!({"max": 10, "wait_ms": 0}))
            .len(),
        1
    );
}

#[test]
fn full_inbox_gets_429_with_retry_after() {
    let server = TestServer::start(&["--limits-max-inbox-depth", "3"]);
    server.register("worker", json!({}));
    for n in 0..3 {
        server.publish("worker", json!(n));
    }
    let before = server.get("/v1/stats").json["log"]["next_offset"].clone();
    let r = server.post(
        "/v1/messages",
        json!({"to": "agent:worker", "from": "a", "body": 4}),
    );
    assert_eq!((r.status, r.code()), (429, "inbox_full"), "{r:?}");
    assert!(r.header("retry-after").is_some());
    assert_eq!(server.get("/v1/stats").json["log"]["next_offset"], before);
}

#[test]
fn open_long_polls_per_agent_are_capped() {
    let server = TestServer::start(&["--limits-max-receivers", "1"]);
    server.register("worker", json!({}));
    let waiter = crate::support::receive_in_background(&server, "worker", r#"{"wait_ms": 3000}"#);
    crate::support::eventually(
        std::time::Duration::from_secs(10),
        "the first long-poll",
        || (server.get("/v1/agents/worker").json["receivers"] == json!(1)).then_some(()),
    );
    let r = server.post("/v1/agents/worker/receive", json!({"wait_ms": 0}));
    assert_eq!((r.status, r.code()), (429, "too_many_receivers"));
    assert!(r.header("retry-after").is_some());
    assert_eq!(waiter.join().unwrap().0.status, 200);
}

#[test]
fn publish_rate_is_limited_per_sender() {
    // One token a second: the bucket starts full (one token) and gains the next one only a
    // second later, far longer than the next three requests take.
    let server = TestServer::start(&["--limits-publish-rate", "1"]);
    server.register("worker", json!({}));
    server.register("sender", json!({}));
    server.register("other", json!({}));
    let next_offset = || server.get("/v1/stats").json["log"]["next_offset"].as_u64();
    let before = next_offset();
    let publish = |from: &str, n: u32| {
        server.post(
            "/v1/messages",
            json!({"to": "agent:worker", "from": from, "body": n}),
        )
    };
    let answers: Vec<(u16, String)> = (0..4)
        .map(|n| {
            let r = publish("sender", n);
            (r.status, r.code().to_owned())
        })
        .collect();
    let limited = (429, "rate_limited".to_owned());
    assert_eq!(
        answers,
        [
            (201, String::new()),
            limited.clone(),
            limited.clone(),
            limited
        ],
        "the first publish takes the one token; the rest are refused"
    );
    // Another sender has a bucket of its own.
    assert_eq!(publish("other", 9).status, 201);
    // Only the two accepted messages were written, and only they are delivered.
    assert_eq!(next_offset(), before.map(|b| b + 2));
    let messages = server.receive("worker", json!({"max": 10, "wait_ms": 0}));
    let bodies: Vec<&serde_json::Value> = messages.iter().map(|m| &m["body"]).collect();
    assert_eq!(bodies, [&json!(0), &json!(9)]);
}

#[test]
fn unknown_routes_and_methods_use_the_error_shape() {
    let server = TestServer::start(&[]);
    let r = server.get("/v1/nope");
    assert_eq!((r.status, r.code()), (404, "not_found"));
    let r = server.request("PATCH", "/v1/messages", None);
    assert_eq!((r.status, r.code()), (405, "method_not_allowed"));
    assert_eq!(server.get("/healthz").status, 200);
    assert_eq!(server.get("/readyz").status, 200);
}

#[test]
fn json_logs_are_one_object_per_line() {
    let server = TestServer::start(&["--log-format", "json"]);
    server.register("worker", json!({}));
    let logs = server.logs();
    let lines: Vec<&str> = logs.lines().filter(|l| !l.is_empty()).collect();
    assert!(lines.len() >= 3, "{logs}");
    for line in lines {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            value["level"].is_string() && value["fields"].is_object(),
            "{line}"
        );
    }
    assert!(logs.contains("recovered the log"));
}

/// A retry of a stored message is answered as a duplicate, with the original offset, even
/// when the inbox is full or the sender out of tokens: duplicates are not admitted again.
#[test]
fn a_duplicate_is_answered_even_when_the_inbox_is_full() {
    let server = TestServer::start(&[
        "--limits-max-inbox-depth",
        "1",
        "--limits-publish-rate",
        "1",
    ]);
    server.register("worker", json!({}));
    server.register("sender", json!({}));
    let publish = |id: &str| {
        server.post(
            "/v1/messages",
            json!({"to": "agent:worker", "from": "sender", "id": id, "body": 1}),
        )
    };
    let first = publish("order-1");
    assert_eq!(first.status, 201, "{first:?}");
    for _ in 0..3 {
        let again = publish("order-1");
        assert_eq!(again.status, 200, "{again:?}");
        assert_eq!(again.json["duplicate"], json!(true));
        assert_eq!(again.json["offset"], first.json["offset"]);
    }
    // A new id is still refused: the inbox is full (or the sender out of tokens).
    assert_eq!(publish("order-2").status, 429);
}
