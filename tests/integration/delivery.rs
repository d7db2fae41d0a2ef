//! Receiving: long-poll, order, delays, leases, settling, dead letters.

use std::time::Duration;

use serde_json::json;

use crate::support::{eventually, offsets, receipts, rfc3339_ms, TestServer};

#[test]
fn long_poll_wakes_on_the_publish() {
    let server = TestServer::start(&[]);
    server.register("worker", json!({}));
    let waiter =
        crate::support::receive_in_background(&server, "worker", r#"{"max": 5, "wait_ms": 30000}"#);
    // The waiter must be parked in its long-poll before the publish.
    eventually(Duration::from_secs(10), "the long-poll to open", || {
        (server.get("/v1/agents/worker").json["receivers"] == json!(1)).then_some(())
    });
    let offset = server.publish("worker", json!("wake up"));
    let (response, elapsed) = waiter.join().unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(
        offsets(response.json["messages"].as_array().unwrap()),
        vec![offset]
    );
    // Semantics, not speed: it returned because of the publish, long before wait_ms.
    assert!(
        elapsed < Duration::from_secs(25),
        "returned only at the timeout: {elapsed:?}"
    );
}

#[test]
fn empty_receive_returns_after_wait_ms_with_an_empty_list() {
    let server = TestServer::start(&[]);
    server.register("worker", json!({}));
    assert!(server.receive("worker", json!({"wait_ms": 50})).is_empty());
    let r = server.post("/v1/agents/ghost/receive", json!({}));
    assert_eq!((r.status, r.code()), (404, "unknown_agent"));
    for bad in [
        json!({"max": 0}),
        json!({"max": 1001}),
        json!({"wait_ms": 60001}),
        json!({"lease_ms": 0}),
        json!({"x": 1}),
    ] {
        let r = server.post("/v1/agents/worker/receive", bad.clone());
        assert_eq!(r.status, 400, "{bad}: {r:?}");
    }
}

#[test]
fn higher_priority_first_then_oldest_and_max_is_honoured() {
    let server = TestServer::start(&[]);
    server.register("worker", json!({}));
    let mut expected = Vec::new();
    for (n, priority) in [4, 9, 0, 9, 4].iter().enumerate() {
        let r = server.post(
            "/v1/messages",
            json!({"to": "agent:worker", "from": "a", "body": n, "priority": priority}),
        );
        expected.push((9 - priority, r.json["offset"].as_u64().unwrap()));
    }
    expected.sort();
    let expected: Vec<u64> = expected.into_iter().map(|(_, o)| o).collect();
    let first = server.receive("worker", json!({"max": 2, "wait_ms": 0}));
    let rest = server.receive("worker", json!({"max": 10, "wait_ms": 0}));
    assert_eq!(first.len(), 2);
    let got: Vec<u64> = offsets(&first).into_iter().chain(offsets(&rest)).collect();
    assert_eq!(got, expected);
    let m = &first[0];
    for field in [
        "id",
        "from",
        "to",
        "body",
        "priority",
        "offset",
        "published_at",
        "attempt",
        "receipt",
        "lease_expires_at",
    ] {
        assert!(!m[field].is_null(), "delivered message lacks {field}: {m}");
    }
    assert_eq!(m["attempt"], json!(1));
}

#[test]
fn delayed_message_is_not_delivered_early() {
    let server = TestServer::start(&["--lease", "10s"]);
    server.register("worker", json!({}));
    let r = server.post(
        "/v1/messages",
        json!({"to": "agent:worker", "from": "a", "body": "later", "delay_ms": 700}),
    );
    assert_eq!(r.status, 201);
    let messages = server.receive("worker", json!({"wait_ms": 10000}));
    assert_eq!(messages.len(), 1);
    // Both times are the server's: when the message was published, and when it was
    // delivered (its lease, 10 s, began then).
    let published_at = rfc3339_ms(messages[0]["published_at"].as_str().unwrap());
    let delivered_at = rfc3339_ms(messages[0]["lease_expires_at"].as_str().unwrap()) - 10_000;
    assert!(
        delivered_at >= published_at + 700,
        "delivered {} ms after it was published, before its delay of 700 ms",
        delivered_at - published_at
    );
}

#[test]
fn ack_is_final_and_a_second_ack_changes_nothing() {
    let server = TestServer::start(&["--lease", "300ms", "--backoff-initial", "10ms"]);
    server.register("worker", json!({}));
    server.publish("worker", json!(1));
    let messages = server.receive("worker", json!({"wait_ms": 0}));
    let receipt = receipts(&messages).remove(0);
    assert_eq!(
        server.settle("worker", "ack", json!({}), &[&receipt, "garbage"]),
        vec!["acked", "unknown"]
    );
    assert_eq!(
        server.settle("worker", "ack", json!({}), &[&receipt]),
        vec!["unknown"]
    );
    // Never delivered again, even after its lease would have run out.
    assert!(server.receive("worker", json!({"wait_ms": 800})).is_empty());
}

#[test]
fn lease_expiry_redelivers_then_dead_letters_then_redrive_resets() {
    let server = TestServer::start(&[
        "--lease",
        "200ms",
        "--backoff-initial",
        "50ms",
        "--max-attempts",
        "3",
    ]);
    server.register("worker", json!({}));
    let offset = server.publish("worker", json!("flaky"));
    let mut stale = Vec::new();
    for attempt in 1..=3 {
        let messages = server.receive("worker", json!({"wait_ms": 10000}));
        assert_eq!(offsets(&messages), vec![offset]);
        assert_eq!(messages[0]["attempt"], json!(attempt));
        stale.extend(receipts(&messages));
    }
    let dead = eventually(Duration::from_secs(10), "the dead letter", || {
        let r = server.get("/v1/agents/worker/dead-letters");
        let list = r.json["dead_letters"].as_array()?.clone();
        (!list.is_empty()).then_some(list)
    });
    assert_eq!(dead[0]["offset"], json!(offset));
    assert_eq!(dead[0]["reason"], json!("max_attempts"));
    assert_eq!(dead[0]["attempts"], json!(3));
    assert!(dead[0]["dead_lettered_at"].is_string());
    assert_eq!(dead[0]["body"], json!("flaky"));
    // Receipts of earlier deliveries are stale.
    let old: Vec<&str> = stale.iter().map(String::as_str).collect();
    assert_eq!(
        server.settle("worker", "ack", json!({}), &old),
        vec!["stale"; 3]
    );

    let r = server.post(
        "/v1/agents/worker/dead-letters/redrive",
        json!({"all": true}),
    );
    assert_eq!(r.json, json!({"redriven": 1}));
    let messages = server.receive("worker", json!({"wait_ms": 10000}));
    assert_eq!(messages[0]["attempt"], json!(1), "attempts were not reset");
    assert_eq!(
        server.get("/v1/agents/worker").json["inbox"]["dead_letters"],
        json!(0)
    );
}

#[test]
fn nack_with_delay_and_nack_to_dead_letters() {
    let server = TestServer::start(&[]);
    server.register("worker", json!({}));
    let a = server.publish("worker", json!("a"));
    let b = server.publish("worker", json!("b"));
    let messages = server.receive("worker", json!({"max": 2, "wait_ms": 0}));
    let r = receipts(&messages);
    assert_eq!(
        server.settle("worker", "nack", json!({"delay_ms": 600}), &[&r[0]]),
        vec!["nacked"]
    );
    assert_eq!(
        server.settle("worker", "nack", json!({"dead_letter": true}), &[&r[1]]),
        vec!["dead_lettered"]
    );
    assert!(
        server.receive("worker", json!({"wait_ms": 100})).is_empty(),
        "delivered before the nack delay"
    );
    let again = server.receive("worker", json!({"wait_ms": 10000}));
    assert_eq!(offsets(&again), vec![a]);
    assert_eq!(again[0]["attempt"], json!(2));
    let dead = server.get("/v1/agents/worker/dead-letters").json["dead_letters"].clone();
    assert_eq!(dead[0]["offset"], json!(b));
    assert_eq!(dead[0]["reason"], json!("rejected"));
    let r = server.post(
        "/v1/agents/worker/dead-letters/redrive",
        json!({"offsets": [b, 999]}),
    );
    assert_eq!(r.json, json!({"redriven": 1}));
}

#[test]
fn extend_keeps_the_lease() {
    let server = TestServer::start(&["--lease", "400ms"]);
    server.register("worker", json!({}));
    server.publish("worker", json!(1));
    let messages = server.receive("worker", json!({"wait_ms": 0}));
    let r = receipts(&messages);
    assert_eq!(
        server.settle("worker", "extend", json!({"lease_ms": 60000}), &[&r[0]]),
        vec!["extended"]
    );
    // Well past the original lease: still leased, not redelivered.
    assert!(server
        .receive("worker", json!({"wait_ms": 1000}))
        .is_empty());
    assert_eq!(
        server.get("/v1/agents/worker").json["inbox"]["in_flight"],
        json!(1)
    );
    assert_eq!(
        server.settle("worker", "ack", json!({}), &[&r[0]]),
        vec!["acked"]
    );
}

#[test]
fn ttl_expiry_dead_letters_with_reason_expired() {
    let server = TestServer::start(&[]);
    server.register("worker", json!({}));
    server.post(
        "/v1/messages",
        json!({"to": "agent:worker", "from": "a", "body": 1, "ttl_ms": 200}),
    );
    let dead = eventually(Duration::from_secs(10), "the expiry", || {
        let list = server.get("/v1/agents/worker/dead-letters").json["dead_letters"]
            .as_array()?
            .clone();
        (!list.is_empty()).then_some(list)
    });
    assert_eq!(dead[0]["reason"], json!("expired"));
    assert!(server.receive("worker", json!({"wait_ms": 0})).is_empty());
}

#[test]
fn agents_register_update_list_and_delete() {
    let server = TestServer::start(&["--presence-ttl", "30s"]);
    let r = server.put(
        "/v1/agents/alpha",
        json!({"capabilities": ["summarize"], "metadata": {"v": 1}, "max_attempts": 3}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let r = server.put(
        "/v1/agents/alpha",
        json!({"capabilities": ["summarize", "plan"]}),
    );
    assert_eq!(r.status, 200);
    server.register("beta", json!({}));
    let listed = server.get("/v1/agents?capability=plan").json["agents"].clone();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["id"], json!("alpha"));
    assert_eq!(listed[0]["online"], json!(false));
    let r = server.post("/v1/agents/alpha/heartbeat", json!({}));
    assert_eq!(r.json["online"], json!(true));
    assert!(r.json["last_seen"].is_string());
    assert_eq!(
        server.put("/v1/agents/Bad!", json!({})).code(),
        "invalid_agent_id"
    );
    assert_eq!(
        server
            .put("/v1/agents/x", json!({"max_attempts": 0}))
            .status,
        400
    );
    assert_eq!(
        server.request("DELETE", "/v1/agents/beta", None).status,
        204
    );
    assert_eq!(server.get("/v1/agents/beta").code(), "unknown_agent");
    assert_eq!(
        server.request("DELETE", "/v1/agents/beta", None).status,
        404
    );
    assert_eq!(
        server.get("/v1/agents").json["agents"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn receive_lease_ms_overrides_the_default_lease() {
    let server = TestServer::start(&["--lease", "60s", "--backoff-initial", "10ms"]);
    server.register("worker", json!({}));
    let offset = server.publish("worker", json!(1));
    let first = server.receive("worker", json!({"lease_ms": 100, "wait_ms": 0}));
    assert_eq!(offsets(&first), vec![offset]);
    // With the server's 60 s lease this would not come back within the test.
    let again = server.receive("worker", json!({"wait_ms": 10000}));
    assert_eq!(offsets(&again), vec![offset]);
    assert_eq!(again[0]["attempt"], json!(2));
}
