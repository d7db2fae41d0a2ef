//! Trace context (SPEC §8): every request runs in a span joining the caller's W3C
//! `traceparent`, and the log lines written while answering it carry its trace id; only a
//! valid `traceparent` is stored with a message.

use serde_json::{json, Value};

use crate::support::{receipts, TestServer};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Publishes one message to `worker`, receives it and nacks it with `dead_letter` under
/// `traceparent`: the dead-lettering is logged while the nack is answered.
fn dead_letter_under(server: &TestServer, traceparent: &str) {
    server.register("worker", json!({}));
    server.publish("worker", json!("doomed"));
    let messages = server.receive("worker", json!({"wait_ms": 0}));
    let body = json!({"receipts": receipts(&messages), "dead_letter": true});
    let response = server.post_traced("/v1/agents/worker/nack", &body, traceparent);
    assert_eq!(response.status, 200, "{response:?}");
}

#[test]
fn log_lines_of_a_request_carry_the_callers_trace_id() {
    let server = TestServer::start(&[]);
    dead_letter_under(&server, TRACEPARENT);
    let logs = server.logs();
    let line = logs
        .lines()
        .find(|line| line.contains("dead-lettered a message"))
        .unwrap_or_else(|| panic!("no dead-letter line in:\n{logs}"));
    assert!(line.contains(&format!("trace_id={TRACE_ID}")), "{line}");
    assert!(line.contains("parent_id=00f067aa0ba902b7"), "{line}");
    assert!(line.contains("route=/v1/agents/{agent}/nack"), "{line}");
}

#[test]
fn json_log_lines_carry_the_trace_id_in_their_request_span() {
    let server = TestServer::start(&["--log-format", "json"]);
    dead_letter_under(&server, TRACEPARENT);
    let logs = server.logs();
    let line: Value = logs
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|line| line["fields"]["message"] == "dead-lettered a message")
        .unwrap_or_else(|| panic!("no dead-letter line in:\n{logs}"));
    let spans = line["spans"].as_array().expect("the span list");
    let request = spans
        .iter()
        .find(|span| span["name"] == "request")
        .unwrap_or_else(|| panic!("no request span in {line}"));
    assert_eq!(request["trace_id"], json!(TRACE_ID), "{line}");
}

#[test]
fn a_request_without_a_valid_traceparent_starts_a_trace_of_its_own() {
    let server = TestServer::start(&[]);
    // Uppercase hex is invalid: ignored, as the recommendation says.
    dead_letter_under(&server, &TRACEPARENT.to_uppercase());
    let logs = server.logs();
    let line = logs
        .lines()
        .find(|line| line.contains("dead-lettered a message"))
        .unwrap_or_else(|| panic!("no dead-letter line in:\n{logs}"));
    let trace_id = line
        .split("trace_id=")
        .nth(1)
        .and_then(|rest| rest.get(..32))
        .unwrap_or_else(|| panic!("no trace id in {line}"));
    assert!(
        trace_id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "{line}"
    );
    assert_ne!(trace_id, TRACE_ID.to_uppercase().to_lowercase());
    assert!(!line.contains("parent_id="), "{line}");
}

#[test]
fn only_a_valid_traceparent_is_stored_with_the_message() {
    let server = TestServer::start(&[]);
    server.register("planner", json!({}));
    let body = br#"{"to":"agent:planner","from":"a","body":1}"#;
    for header in [
        "garbage",
        &TRACEPARENT.to_uppercase(),
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        TRACEPARENT,
    ] {
        let r = server.raw(
            "POST",
            "/v1/messages",
            Some(body),
            Some("application/json"),
            &[("traceparent", header)],
        );
        assert_eq!(r.status, 201, "{r:?}");
    }
    let messages = server.receive("planner", json!({"max": 10, "wait_ms": 0}));
    let stored: Vec<&Value> = messages.iter().map(|m| &m["headers"]).collect();
    assert_eq!(
        stored,
        [
            &json!({}),
            &json!({}),
            &json!({}),
            &json!({}),
            &json!({"traceparent": TRACEPARENT})
        ]
    );
}

#[test]
fn warnings_carry_the_trace_id_whatever_the_log_level() {
    let mut server = TestServer::unstarted(&["--auth-mode", "token", "--log-level", "warn"]);
    server.set_env(
        "COURIER_ADMIN_TOKEN",
        Some("cour_admin_0123456789abcdef0123456789"),
    );
    server.restart();
    let response = server.raw(
        "GET",
        "/v1/agents",
        None,
        None,
        &[
            (
                "authorization",
                "Bearer cour_wrong_0123456789abcdef0123456789",
            ),
            ("traceparent", TRACEPARENT),
        ],
    );
    assert_eq!(response.status, 401, "{response:?}");
    let logs = server.logs();
    let line = logs
        .lines()
        .find(|line| line.contains("authentication failed"))
        .unwrap_or_else(|| panic!("no authentication line in:\n{logs}"));
    assert!(line.contains(&format!("trace_id={TRACE_ID}")), "{line}");
}

#[test]
fn a_traceparent_sent_twice_is_ignored() {
    let server = TestServer::start(&[]);
    server.register("planner", json!({}));
    let body = br#"{"to":"agent:planner","from":"a","body":1}"#;
    let r = server.raw(
        "POST",
        "/v1/messages",
        Some(body),
        Some("application/json"),
        &[("traceparent", TRACEPARENT), ("traceparent", TRACEPARENT)],
    );
    assert_eq!(r.status, 201, "{r:?}");
    let messages = server.receive("planner", json!({"wait_ms": 0}));
    assert_eq!(messages[0]["headers"], json!({}));
}
