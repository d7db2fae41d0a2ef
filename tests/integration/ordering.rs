//! Ordering keys (SPEC §2): within one inbox or capability queue, one message per key is in
//! flight, in offset order whatever the priorities; an ack or a dead-lettering releases the
//! key, a nack or an expired lease does not; other keys and unkeyed messages are not held
//! back; the holds survive SIGKILL; bad keys are refused with nothing written.

use serde_json::{json, Value};

use crate::support::{offsets, receipts, TestServer};

fn publish(server: &TestServer, to: &str, key: Option<&str>, priority: u8, body: Value) -> u64 {
    let mut message = json!({"to": to, "from": "tester", "body": body, "priority": priority});
    if let Some(key) = key {
        message["ordering_key"] = json!(key);
    }
    let response = server.post("/v1/messages", message);
    assert_eq!(response.status, 201, "{response:?}");
    response.json["offset"].as_u64().expect("offset")
}

fn receive_all(server: &TestServer, agent: &str) -> Vec<Value> {
    server.receive(agent, json!({"max": 100, "wait_ms": 0}))
}

#[test]
fn one_message_per_key_is_in_flight_in_offset_order_and_others_are_not_held_back() {
    let server = TestServer::start(&[]);
    server.register("w", json!({}));
    let a1 = publish(&server, "agent:w", Some("conv-a"), 4, json!("a1"));
    let a2 = publish(&server, "agent:w", Some("conv-a"), 9, json!("a2"));
    let b1 = publish(&server, "agent:w", Some("conv-b"), 4, json!("b1"));
    let free = publish(&server, "agent:w", None, 4, json!("free"));
    let first = receive_all(&server, "w");
    // a2 has the higher priority but waits behind a1, its key's head.
    assert_eq!(offsets(&first), [a1, b1, free]);
    assert_eq!(first[0]["ordering_key"], "conv-a");
    assert!(first[2].get("ordering_key").is_none());
    assert!(receive_all(&server, "w").is_empty(), "a2 is held");
    // A nack keeps the key: a1 comes again, not a2.
    let status = server.settle("w", "nack", json!({}), &[&receipts(&first)[0]]);
    assert_eq!(status, ["nacked"]);
    let again = receive_all(&server, "w");
    assert_eq!(offsets(&again), [a1]);
    assert_eq!(again[0]["attempt"], 2);
    // The ack releases it.
    assert_eq!(
        server.settle("w", "ack", json!({}), &[&receipts(&again)[0]]),
        ["acked"]
    );
    assert_eq!(offsets(&receive_all(&server, "w")), [a2]);
}

#[test]
fn a_dead_lettered_message_releases_its_key() {
    let server = TestServer::start(&[]);
    server.register("w", json!({}));
    let k1 = publish(&server, "agent:w", Some("k"), 4, json!(1));
    let k2 = publish(&server, "agent:w", Some("k"), 4, json!(2));
    let got = receive_all(&server, "w");
    assert_eq!(offsets(&got), [k1]);
    let status = server.settle(
        "w",
        "nack",
        json!({"dead_letter": true}),
        &[&receipts(&got)[0]],
    );
    assert_eq!(status, ["dead_lettered"]);
    let next = receive_all(&server, "w");
    assert_eq!(offsets(&next), [k2]);
    // Redriven, the dead letter rejoins its key's line ahead of k2 (which is in flight).
    let redrive = server.post("/v1/agents/w/dead-letters/redrive", json!({"all": true}));
    assert_eq!(redrive.json["redriven"], 1, "{redrive:?}");
    assert_eq!(
        server.settle("w", "ack", json!({}), &[&receipts(&next)[0]]),
        ["acked"]
    );
    assert_eq!(offsets(&receive_all(&server, "w")), [k1]);
}

#[test]
fn a_capability_queue_keeps_one_per_key_in_flight_across_workers() {
    let server = TestServer::start(&[]);
    for worker in ["w1", "w2"] {
        server.register(worker, json!({"capabilities": ["bill"]}));
    }
    let first = publish(&server, "capability:bill", Some("customer-7"), 4, json!(1));
    let second = publish(&server, "capability:bill", Some("customer-7"), 4, json!(2));
    let other = publish(&server, "capability:bill", Some("customer-8"), 4, json!(3));
    let w1 = server.receive("w1", json!({"max": 1, "wait_ms": 0}));
    assert_eq!(offsets(&w1), [first]);
    let w2 = receive_all(&server, "w2");
    assert_eq!(
        offsets(&w2),
        [other],
        "customer-7's second waits for its first"
    );
    assert_eq!(
        server.settle("w1", "ack", json!({}), &[&receipts(&w1)[0]]),
        ["acked"]
    );
    assert_eq!(offsets(&receive_all(&server, "w2")), [second]);
}

#[test]
fn backfilled_messages_keep_their_keys() {
    let server = TestServer::start(&[]);
    server.register("w", json!({}));
    let k1 = publish(&server, "topic:t.x", Some("k"), 4, json!(1));
    let k2 = publish(&server, "topic:t.x", Some("k"), 9, json!(2));
    let path = "/v1/agents/w/subscriptions/t.*";
    let response = server.put(path, json!({"start": "earliest"}));
    assert_eq!(response.status, 201, "{response:?}");
    let first = server.receive("w", json!({"max": 10, "wait_ms": 5000}));
    assert_eq!(
        offsets(&first),
        [k1],
        "k2 waits behind k1, its priority aside"
    );
    assert_eq!(first[0]["ordering_key"], "k");
    assert!(receive_all(&server, "w").is_empty());
    assert_eq!(
        server.settle("w", "ack", json!({}), &[&receipts(&first)[0]]),
        ["acked"]
    );
    assert_eq!(offsets(&receive_all(&server, "w")), [k2]);
}

#[test]
fn key_holds_survive_sigkill() {
    let mut server = TestServer::start(&[]);
    server.register("w", json!({}));
    let k1 = publish(&server, "agent:w", Some("k"), 2, json!(1));
    let k2 = publish(&server, "agent:w", Some("k"), 8, json!(2));
    let k3 = publish(&server, "agent:w", Some("k"), 9, json!(3));
    let held = server.receive("w", json!({"max": 10, "wait_ms": 0, "lease_ms": 60000}));
    assert_eq!(offsets(&held), [k1]);
    server.kill9();
    server.restart();
    assert!(
        receive_all(&server, "w").is_empty(),
        "k1 is still in flight"
    );
    assert_eq!(
        server.settle("w", "ack", json!({}), &[&receipts(&held)[0]]),
        ["acked"]
    );
    server.kill9();
    server.restart();
    // Reloaded in priority order (k3, then k2), the line is still by offset: k2 first.
    assert_eq!(offsets(&receive_all(&server, "w")), [k2]);
    let _ = k3;
}

#[test]
fn bad_ordering_keys_are_refused_with_nothing_written() {
    let server = TestServer::start(&[]);
    server.register("w", json!({}));
    let before = server.get("/v1/stats").json["log"]["next_offset"].clone();
    for key in [
        json!(""),
        json!("k".repeat(129)),
        json!(7),
        json!("a\u{7}b"),
    ] {
        let response = server.post(
            "/v1/messages",
            json!({"to": "agent:w", "from": "t", "body": 1, "ordering_key": key}),
        );
        assert_eq!(response.status, 400, "{key}: {response:?}");
    }
    assert_eq!(server.get("/v1/stats").json["log"]["next_offset"], before);
}
