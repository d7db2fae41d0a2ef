//! Hostile input that publish once accepted and every later read then choked on: JSON
//! nested deeper than a tree reader takes (serde_json's recursion limit, 128). Publish
//! refuses what is deeper than `limits.max_json_depth`, and whatever it accepts — with the
//! limit raised far beyond 128 — is deliverable, listable and redrivable byte for byte.

use serde_json::json;

use crate::support::{Response, TestServer};

/// `[[…]]`, `depth` arrays deep.
fn arrays(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// `{"a":{"a":…1}}`, `depth` objects deep.
fn objects(depth: usize) -> String {
    format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth))
}

fn publish_raw(server: &TestServer, body: &str) -> Response {
    let text = format!(r#"{{"to": "agent:planner", "from": "researcher", "body": {body}}}"#);
    server.raw(
        "POST",
        "/v1/messages",
        Some(text.as_bytes()),
        Some("application/json"),
        &[],
    )
}

fn next_offset(server: &TestServer) -> u64 {
    server.get("/v1/stats").json["log"]["next_offset"]
        .as_u64()
        .expect("next_offset")
}

/// The receipts in a receive's answer, read from its text (a deep body makes the answer
/// too deep for the test's own tree reader).
fn receipts_in(text: &str) -> Vec<String> {
    text.match_indices("\"receipt\":\"")
        .map(|(at, key)| text[at + key.len()..at + key.len() + 25].to_owned())
        .collect()
}

#[test]
fn json_nested_deeper_than_the_limit_is_refused_and_nothing_is_written() {
    let server = TestServer::start(&[]);
    server.register("planner", json!({}));
    let end = next_offset(&server);
    for body in [
        arrays(65),
        objects(65),
        arrays(200),
        format!("[1, {}]", objects(70)),
    ] {
        let response = publish_raw(&server, &body);
        assert_eq!(response.status, 400, "{response:?}");
        assert_eq!(response.code(), "invalid_request");
        let message = response.json["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("64") && message.contains("limits.max_json_depth"),
            "{message}"
        );
    }
    let batch = format!(
        r#"{{"messages": [{{"to": "agent:planner", "from": "r", "body": 1}},
                          {{"to": "agent:planner", "from": "r", "body": {}}}]}}"#,
        arrays(100)
    );
    let response = server.raw(
        "POST",
        "/v1/messages/batch",
        Some(batch.as_bytes()),
        Some("application/json"),
        &[],
    );
    assert_eq!(response.status, 400, "{response:?}");
    assert!(response.json["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("message 1:"));
    let metadata = format!(r#"{{"metadata": {{"a": {}}}}}"#, arrays(64));
    let response = server.raw(
        "PUT",
        "/v1/agents/deep",
        Some(metadata.as_bytes()),
        Some("application/json"),
        &[],
    );
    assert_eq!(response.status, 400, "{response:?}");
    assert_eq!(server.get("/v1/agents/deep").status, 404);
    assert_eq!(next_offset(&server), end, "a refused request wrote nothing");

    // At the limit, and brackets inside strings (which are not nesting), are accepted and
    // delivered as sent.
    for body in [
        arrays(64),
        objects(64),
        format!(
            r#"{{"text": "{} \" {}"}}"#,
            "[".repeat(300),
            "{".repeat(300)
        ),
    ] {
        let response = publish_raw(&server, &body);
        assert_eq!(response.status, 201, "{body}: {response:?}");
        let received = server.post(
            "/v1/agents/planner/receive",
            json!({"max": 1, "wait_ms": 0}),
        );
        assert_eq!(received.status, 200);
        assert!(received.text.contains(&format!("\"body\":{body}")));
    }
}

#[test]
fn every_read_path_serves_bodies_nested_deeper_than_tree_readers_take() {
    let server = TestServer::start(&["--limits-max-json-depth", "2000", "--max-attempts", "1"]);
    let metadata = format!(r#"{{"metadata": {{"deep": {}}}}}"#, arrays(300));
    let response = server.raw(
        "PUT",
        "/v1/agents/planner",
        Some(metadata.as_bytes()),
        Some("application/json"),
        &[],
    );
    assert_eq!(response.status, 201, "{response:?}");
    for path in [
        "/v1/agents/planner",
        "/v1/agents",
        "/v1/agents?capability=x",
    ] {
        let response = server.get(path);
        assert_eq!(response.status, 200, "{path}: {response:?}");
    }
    assert!(server.get("/v1/agents").text.contains(&arrays(300)));

    let deep = [arrays(200), objects(1000)];
    for body in &deep {
        assert_eq!(publish_raw(&server, body).status, 201);
    }
    // Receive (twice: the first answer must not have broken the inbox).
    let mut receipts = Vec::new();
    for body in &deep {
        let received = server.post(
            "/v1/agents/planner/receive",
            json!({"max": 1, "wait_ms": 0}),
        );
        assert_eq!(received.status, 200, "{received:?}");
        assert!(received.text.contains(&format!("\"body\":{body}")));
        receipts.extend(receipts_in(&received.text));
    }
    assert_eq!(receipts.len(), 2);
    let receipts: Vec<&str> = receipts.iter().map(String::as_str).collect();
    assert_eq!(
        server.settle("planner", "nack", json!({}), &receipts),
        ["dead_lettered", "dead_lettered"]
    );
    // Dead letters list them, and redrive brings them back, deliverable again.
    let listed = server.get("/v1/agents/planner/dead-letters");
    assert_eq!(listed.status, 200, "{listed:?}");
    for body in &deep {
        assert!(listed.text.contains(&format!("\"body\":{body}")));
    }
    let redriven = server.post(
        "/v1/agents/planner/dead-letters/redrive",
        json!({"all": true}),
    );
    assert_eq!(redriven.json["redriven"], 2);
    let received = server.post(
        "/v1/agents/planner/receive",
        json!({"max": 10, "wait_ms": 0}),
    );
    assert_eq!(received.status, 200);
    assert_eq!(receipts_in(&received.text).len(), 2);
    assert_eq!(server.get("/v1/stats").status, 200);
}
