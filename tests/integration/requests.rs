//! Request/reply (SPEC §3): the call returns the first reply, which then does not come
//! through the requester's inbox; a timeout answers 504 and a later reply reaches the inbox;
//! a reply without `to` goes to the request's sender, also after SIGKILL; a repeated request
//! id returns the stored reply; `no_responders=fail` answers 503 and stores nothing; waiting
//! calls are bounded; bad requests are refused with nothing written.

use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{offsets, post_in_background, receipts, Response, TestServer};

/// `POST /v1/requests?<query>` on its own thread; join it for the answer and how long it took.
fn request_in_background(
    server: &TestServer,
    query: &str,
    body: &Value,
) -> JoinHandle<(Response, Duration)> {
    post_in_background(server, &format!("/v1/requests?{query}"), body)
}

fn next_offset(server: &TestServer) -> u64 {
    server.get("/v1/stats").json["log"]["next_offset"]
        .as_u64()
        .expect("next_offset")
}

/// Publishes a reply from `from` to request `id`, without `to`; the response.
fn reply(server: &TestServer, from: &str, id: &str, body: Value) -> Response {
    server.post(
        "/v1/messages",
        json!({"from": from, "in_reply_to": id, "body": body}),
    )
}

fn setup() -> TestServer {
    let server = TestServer::start(&[]);
    server.register("asker", json!({}));
    server.register("worker", json!({"capabilities": ["answer"]}));
    server
}

#[test]
fn a_request_returns_its_first_reply_which_does_not_come_again_through_the_inbox() {
    let server = setup();
    let call = request_in_background(
        &server,
        "timeout_ms=20000",
        &json!({"to": "capability:answer", "from": "asker", "body": {"q": 1}}),
    );
    let got = server.receive("worker", json!({"max": 1, "wait_ms": 10000}));
    assert_eq!(got.len(), 1, "the request reached the worker");
    let id = got[0]["id"].as_str().expect("id").to_owned();
    let replied = reply(&server, "worker", &id, json!({"a": 1}));
    assert_eq!(replied.status, 201, "{replied:?}");
    assert_eq!(replied.json["destinations"], 1, "to the asker's inbox");
    let (response, took) = call.join().expect("call thread");
    assert_eq!(response.status, 200, "{response:?}");
    let answer = &response.json["reply"];
    assert_eq!(answer["body"], json!({"a": 1}));
    assert_eq!(answer["in_reply_to"], id.as_str());
    assert_eq!(answer["from"], "worker");
    assert_eq!(
        answer["to"], "agent:asker",
        "a reply without `to` goes to the sender"
    );
    assert!(
        took < Duration::from_secs(15),
        "woken by the reply: {took:?}"
    );
    // Returned to the call: not again through the inbox.
    assert!(server
        .receive("asker", json!({"max": 10, "wait_ms": 0}))
        .is_empty());
    let inbox = &server.get("/v1/agents/asker").json["inbox"];
    assert_eq!(
        (inbox["ready"].as_u64(), inbox["in_flight"].as_u64()),
        (Some(0), Some(0))
    );
    // A second reply is an ordinary message to the inbox.
    let second = reply(&server, "worker", &id, json!({"a": 2}));
    assert_eq!(second.status, 201, "{second:?}");
    let late = server.receive("asker", json!({"max": 10, "wait_ms": 0}));
    assert_eq!(late.len(), 1);
    assert_eq!(late[0]["body"], json!({"a": 2}));
    assert_eq!(
        server.settle("worker", "ack", json!({}), &[&receipts(&got)[0]]),
        ["acked"]
    );
}

#[test]
fn a_timed_out_request_answers_504_and_a_late_reply_reaches_the_inbox_also_after_sigkill() {
    let mut server = setup();
    let response = server.post(
        "/v1/requests?timeout_ms=200",
        json!({"to": "agent:worker", "from": "asker", "body": "slow"}),
    );
    assert_eq!(response.status, 504, "{response:?}");
    assert_eq!(response.code(), "reply_timeout");
    // The request is durable and remembered across a crash.
    server.kill9();
    server.restart();
    let got = server.receive("worker", json!({"max": 1, "wait_ms": 0}));
    assert_eq!(got.len(), 1, "the request survived");
    let id = got[0]["id"].as_str().expect("id");
    let replied = reply(&server, "worker", id, json!("done"));
    assert_eq!(replied.status, 201, "{replied:?}");
    let late = server.receive("asker", json!({"max": 10, "wait_ms": 0}));
    assert_eq!(late.len(), 1, "the late reply is in the inbox");
    assert_eq!(late[0]["in_reply_to"], id);
    assert_eq!(late[0]["body"], json!("done"));
}

#[test]
fn a_repeated_request_id_returns_the_stored_reply_without_writing() {
    let mut server = setup();
    let body = json!({"to": "agent:worker", "from": "asker", "id": "req-1", "body": 7});
    let call = request_in_background(&server, "timeout_ms=20000", &body);
    let got = server.receive("worker", json!({"max": 1, "wait_ms": 10000}));
    assert_eq!(got[0]["id"], "req-1");
    let replied = reply(&server, "worker", "req-1", json!("seven"));
    let reply_offset = replied.json["offset"].as_u64().expect("offset");
    let (first, _) = call.join().expect("call thread");
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.json["reply"]["offset"], reply_offset);
    let before = next_offset(&server);
    let again = server.post("/v1/requests?timeout_ms=1000", body.clone());
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.json["reply"]["offset"], reply_offset);
    assert_eq!(again.json["reply"]["body"], json!("seven"));
    assert_eq!(next_offset(&server), before, "nothing written");
    server.kill9();
    server.restart();
    let after_crash = server.post("/v1/requests?timeout_ms=1000", body);
    assert_eq!(after_crash.status, 200, "{after_crash:?}");
    assert_eq!(after_crash.json["reply"]["offset"], reply_offset);
}

#[test]
fn no_responders_fail_answers_503_and_stores_nothing() {
    let server = setup();
    let before = next_offset(&server);
    for to in ["agent:worker", "capability:answer", "capability:nobody"] {
        let response = server.post(
            "/v1/requests?no_responders=fail",
            json!({"to": to, "from": "asker", "body": 1}),
        );
        assert_eq!(response.status, 503, "{to}: {response:?}");
        assert_eq!(response.code(), "no_responders");
    }
    assert_eq!(next_offset(&server), before, "nothing stored");
    // Once the worker was seen, the request is stored and waits.
    let beat = server.post("/v1/agents/worker/heartbeat", json!({}));
    assert_eq!(beat.status, 200, "{beat:?}");
    let response = server.post(
        "/v1/requests?no_responders=fail&timeout_ms=100",
        json!({"to": "capability:answer", "from": "asker", "body": 1}),
    );
    assert_eq!(response.status, 504, "{response:?}");
    assert_eq!(next_offset(&server), before + 1);
}

#[test]
fn waiting_calls_are_bounded_by_max_waiting_requests() {
    let server = TestServer::start(&["--limits-max-waiting-requests", "1"]);
    server.register("asker", json!({}));
    server.register("worker", json!({}));
    let first = request_in_background(
        &server,
        "timeout_ms=3000",
        &json!({"to": "agent:worker", "from": "asker", "body": 1}),
    );
    // The first call waits once its request is in the worker's inbox.
    let waiting = server.receive(
        "worker",
        json!({"max": 1, "wait_ms": 2000, "lease_ms": 60000}),
    );
    assert_eq!(waiting.len(), 1);
    let second = server.post(
        "/v1/requests?timeout_ms=1000",
        json!({"to": "agent:worker", "from": "asker", "body": 2}),
    );
    assert_eq!(second.status, 429, "{second:?}");
    assert_eq!(second.code(), "too_many_requests");
    assert!(second.header("retry-after").is_some());
    let (first, _) = first.join().expect("call thread");
    assert_eq!(first.status, 504, "{first:?}");
}

#[test]
fn a_call_whose_client_leaves_frees_its_slot_and_leaves_the_reply_in_the_inbox() {
    let server = TestServer::start(&["--limits-max-waiting-requests", "1"]);
    server.register("asker", json!({}));
    server.register("worker", json!({}));
    // A client sends a request and goes away without waiting for the answer.
    let body = br#"{"to": "agent:worker", "from": "asker", "body": "bye"}"#;
    let head = format!(
        "POST /v1/requests?timeout_ms=60000 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut stream = std::net::TcpStream::connect(server.addr).expect("connect");
    std::io::Write::write_all(&mut stream, head.as_bytes()).expect("write");
    std::io::Write::write_all(&mut stream, body).expect("write");
    let got = server.receive("worker", json!({"max": 1, "wait_ms": 5000}));
    assert_eq!(got.len(), 1, "the request was stored");
    drop(stream);
    // Its slot is free again: another call is not refused (it times out instead).
    let other = crate::support::eventually(
        Duration::from_secs(5),
        "the gone call's slot to be freed",
        || {
            let r = server.post(
                "/v1/requests?timeout_ms=50",
                json!({"to": "agent:worker", "from": "asker", "body": 2}),
            );
            (r.status != 429).then_some(r)
        },
    );
    assert_eq!(other.status, 504, "{other:?}");
    // The reply to the gone call is not settled for nobody: it is in the inbox.
    let id = got[0]["id"].as_str().expect("id");
    assert_eq!(reply(&server, "worker", id, json!("late")).status, 201);
    let inbox = server.receive("asker", json!({"max": 10, "wait_ms": 0}));
    assert_eq!(inbox.len(), 1, "{inbox:?}");
    assert_eq!(inbox[0]["body"], json!("late"));
}

#[test]
fn bad_requests_and_replies_are_refused_with_nothing_written() {
    let server = setup();
    let before = next_offset(&server);
    let body = json!({"to": "agent:worker", "from": "asker", "body": 1});
    for query in [
        "timeout_ms=0",
        "timeout_ms=300001",
        "timeout_ms=-5",
        "timeout_ms=soon",
        "no_responders=maybe",
        "unknown=1",
    ] {
        let response = server.post(&format!("/v1/requests?{query}"), body.clone());
        assert_eq!(response.status, 400, "{query}: {response:?}");
    }
    for (body, status) in [
        (json!({"to": "topic:news", "from": "asker", "body": 1}), 400),
        (json!({"from": "asker", "body": 1}), 400),
        (
            json!({"to": "agent:worker", "from": "ghost", "body": 1}),
            404,
        ),
        (
            json!({"to": "agent:ghost", "from": "asker", "body": 1}),
            404,
        ),
        (json!({"to": "agent:worker", "from": "asker"}), 400),
    ] {
        let response = server.post("/v1/requests?timeout_ms=100", body.clone());
        assert_eq!(response.status, status, "{body}: {response:?}");
    }
    // A reply without `to` to an id that is no request: nowhere to go.
    let stray = reply(&server, "worker", "no-such-request", json!(1));
    assert_eq!(stray.status, 400, "{stray:?}");
    assert_eq!(stray.code(), "unknown_request");
    let plain = server.post("/v1/messages", json!({"from": "worker", "body": 1}));
    assert_eq!(plain.status, 400, "{plain:?}");
    assert_eq!(next_offset(&server), before, "nothing written");
    // With `to`, a reply to an unknown id is an ordinary message.
    let ordinary = server.post(
        "/v1/messages",
        json!({"to": "agent:asker", "from": "worker", "in_reply_to": "no-such-request", "body": 1}),
    );
    assert_eq!(ordinary.status, 201, "{ordinary:?}");
    let got = server.receive("asker", json!({"wait_ms": 0}));
    assert_eq!(offsets(&got), [ordinary.json["offset"].as_u64().unwrap()]);
}
