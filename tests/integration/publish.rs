//! Publishing: validation, ids, idempotency, batches.

use serde_json::json;

use crate::support::TestServer;

fn server() -> TestServer {
    let server = TestServer::start(&[]);
    server.register("planner", json!({}));
    server
}

#[test]
fn publish_returns_201_with_a_ulid_and_the_offset() {
    let server = server();
    let response = server.post(
        "/v1/messages",
        json!({"to": "agent:planner", "from": "researcher", "body": {"task": 1}}),
    );
    assert_eq!(response.status, 201, "{response:?}");
    let id = response.json["id"].as_str().unwrap();
    assert_eq!(id.len(), 26, "a ULID: {id}");
    assert_eq!(response.json["duplicate"], json!(false));
    assert!(response.json["offset"].is_u64());
}

#[test]
fn invalid_publishes_get_400_with_the_error_shape_and_write_nothing() {
    let server = server();
    let before = server.get("/v1/stats").json["log"]["next_offset"].clone();
    let base = json!({"to": "agent:planner", "from": "researcher", "body": 1});
    let with = |key: &str, value: serde_json::Value| {
        let mut body = base.clone();
        body[key] = value;
        body
    };
    let without = |key: &str| {
        let mut body = base.clone();
        body.as_object_mut().unwrap().remove(key);
        body
    };
    let cases = [
        (without("to"), "invalid_request"),
        (without("from"), "invalid_request"),
        (without("body"), "invalid_request"),
        (with("bogus", json!(1)), "invalid_request"),
        (with("to", json!("planner")), "invalid_address"),
        (with("to", json!("queue:x")), "invalid_address"),
        (with("to", json!("agent:Bad")), "invalid_address"),
        (with("from", json!("Not Valid")), "invalid_request"),
        (with("id", json!("has space")), "invalid_request"),
        (with("id", json!("x".repeat(129))), "invalid_request"),
        (with("priority", json!(10)), "invalid_priority"),
        (with("priority", json!(-1)), "invalid_priority"),
        (with("priority", json!("high")), "invalid_request"),
        (with("type", json!("")), "invalid_request"),
        (with("headers", json!({"k": 1})), "invalid_request"),
        (with("delay_ms", json!(-5)), "invalid_request"),
        (with("ttl_ms", json!(1u64 << 60)), "invalid_request"),
        (with("in_reply_to", json!("a b")), "invalid_request"),
    ];
    for (body, code) in cases {
        let response = server.post("/v1/messages", body.clone());
        assert_eq!(response.status, 400, "{body}: {response:?}");
        assert_eq!(response.code(), code, "{body}: {response:?}");
        let message = response.json["error"]["message"].as_str().unwrap();
        assert!(message.len() > 10, "an unhelpful message: {message:?}");
    }
    let many: serde_json::Map<String, serde_json::Value> =
        (0..65).map(|i| (format!("h{i}"), json!("v"))).collect();
    let response = server.post("/v1/messages", with("headers", json!(many)));
    assert_eq!(
        (response.status, response.code()),
        (400, "too_many_headers")
    );
    let after = server.get("/v1/stats").json["log"]["next_offset"].clone();
    assert_eq!(before, after, "a refused publish wrote something");
}

#[test]
fn malformed_json_wrong_content_type_and_unknown_agent() {
    let server = server();
    let r = server.raw(
        "POST",
        "/v1/messages",
        Some(b"{\"to\": "),
        Some("application/json"),
        &[],
    );
    assert_eq!((r.status, r.code()), (400, "invalid_json"));
    let body = br#"{"to":"agent:planner","from":"a","body":1}"#;
    let r = server.raw("POST", "/v1/messages", Some(body), Some("text/plain"), &[]);
    assert_eq!((r.status, r.code()), (415, "unsupported_media_type"));
    let r = server.post(
        "/v1/messages",
        json!({"to": "agent:ghost", "from": "a", "body": 1}),
    );
    assert_eq!((r.status, r.code()), (404, "unknown_agent"));
}

#[test]
fn oversized_message_gets_413() {
    let server = TestServer::start(&["--limits-max-message-bytes", "1000"]);
    server.register("planner", json!({}));
    let r = server.post(
        "/v1/messages",
        json!({"to": "agent:planner", "from": "a", "body": "x".repeat(2000)}),
    );
    assert_eq!((r.status, r.code()), (413, "payload_too_large"), "{r:?}");
}

#[test]
fn repeated_id_is_a_duplicate_also_after_a_restart() {
    let mut server = server();
    let body = json!({"to": "agent:planner", "from": "a", "body": 1, "id": "order-42"});
    let first = server.post("/v1/messages", body.clone());
    assert_eq!(first.status, 201);
    let again = server.post("/v1/messages", body.clone());
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.json["duplicate"], json!(true));
    assert_eq!(again.json["offset"], first.json["offset"]);
    assert_eq!(again.json["id"], json!("order-42"));

    server.restart();
    let after = server.post("/v1/messages", body);
    assert_eq!(after.status, 200, "{after:?}");
    assert_eq!(after.json["offset"], first.json["offset"]);
    let inbox = server.get("/v1/agents/planner").json["inbox"].clone();
    assert_eq!(
        inbox["ready"],
        json!(1),
        "the duplicate was written: {inbox}"
    );
}

#[test]
fn dedupe_window_ends() {
    let server = TestServer::start(&["--dedupe-window", "300ms"]);
    server.register("planner", json!({}));
    let body = json!({"to": "agent:planner", "from": "a", "body": 1, "id": "short"});
    let first = server.post("/v1/messages", body.clone());
    let second = crate::support::eventually(
        std::time::Duration::from_secs(10),
        "the window to end",
        || {
            let r = server.post("/v1/messages", body.clone());
            (r.status == 201).then_some(r)
        },
    );
    assert_ne!(first.json["offset"], second.json["offset"]);
}

#[test]
fn batch_is_all_or_nothing_and_in_order() {
    let server = server();
    let good = |n: u64| json!({"to": "agent:planner", "from": "a", "body": n});
    let before = server.get("/v1/stats").json["log"]["next_offset"].clone();
    let bad =
        json!({"messages": [good(1), good(2), {"to": "agent:ghost", "from": "a", "body": 3}]});
    let r = server.post("/v1/messages/batch", bad);
    assert_eq!((r.status, r.code()), (404, "unknown_agent"));
    let invalid = json!({"messages": [good(1), {"to": "agent:planner", "body": 3}]});
    let r = server.post("/v1/messages/batch", invalid);
    assert_eq!((r.status, r.code()), (400, "invalid_request"));
    assert!(
        r.json["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("message 1:"),
        "{r:?}"
    );
    assert_eq!(server.get("/v1/stats").json["log"]["next_offset"], before);

    let batch = json!({"messages": [good(1), good(2), {"to": "agent:planner", "from": "a", "body": 3, "id": "b3"}, {"to": "agent:planner", "from": "a", "body": 3, "id": "b3"}]});
    let r = server.post("/v1/messages/batch", batch);
    assert_eq!(r.status, 201, "{r:?}");
    let results = r.json["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    let offsets: Vec<u64> = results
        .iter()
        .map(|x| x["offset"].as_u64().unwrap())
        .collect();
    assert!(
        offsets[0] < offsets[1] && offsets[1] < offsets[2],
        "{offsets:?}"
    );
    assert_eq!(
        offsets[3], offsets[2],
        "the repeated id inside a batch is a duplicate"
    );
    assert_eq!(results[3]["duplicate"], json!(true));
    let messages = server.receive("planner", json!({"max": 10, "wait_ms": 0}));
    let bodies: Vec<_> = messages.iter().map(|m| m["body"].clone()).collect();
    assert_eq!(bodies, vec![json!(1), json!(2), json!(3)]);
}

#[test]
fn traceparent_header_is_stored_unless_the_message_has_one() {
    let server = server();
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let body = br#"{"to":"agent:planner","from":"a","body":1}"#;
    let r = server.raw(
        "POST",
        "/v1/messages",
        Some(body),
        Some("application/json"),
        &[("traceparent", tp)],
    );
    assert_eq!(r.status, 201);
    let own = br#"{"to":"agent:planner","from":"a","body":2,"headers":{"traceparent":"mine"}}"#;
    let r = server.raw(
        "POST",
        "/v1/messages",
        Some(own),
        Some("application/json"),
        &[("traceparent", tp)],
    );
    assert_eq!(r.status, 201);
    let messages = server.receive("planner", json!({"max": 2, "wait_ms": 0}));
    assert_eq!(messages[0]["headers"]["traceparent"], json!(tp));
    assert_eq!(messages[1]["headers"]["traceparent"], json!("mine"));
}
