//! Topics (SPEC §2, §3): one record per message whatever the number of subscribers, one
//! delivery per subscribed agent (own lease, attempts and dead letter), overlapping patterns
//! giving one copy, unsubscribing stopping new deliveries only, subscriptions and fan-out
//! surviving SIGKILL, and bad names and patterns refused with nothing written.

use serde_json::{json, Value};

use crate::support::{offsets, receipts, TestServer};

fn publish_topic(server: &TestServer, topic: &str, body: Value) -> Value {
    let response = server.post(
        "/v1/messages",
        json!({"to": format!("topic:{topic}"), "from": "tester", "body": body}),
    );
    assert_eq!(response.status, 201, "{response:?}");
    response.json
}

/// A pattern as a path segment: `>` is not a URI character, so it travels as `%3E`.
fn segment(pattern: &str) -> String {
    pattern.replace('>', "%3E")
}

fn subscribe(server: &TestServer, agent: &str, pattern: &str) -> u16 {
    let path = format!("/v1/agents/{agent}/subscriptions/{}", segment(pattern));
    let response = server.put(&path, json!({}));
    assert!(matches!(response.status, 200 | 201), "{response:?}");
    response.status
}

fn next_offset(server: &TestServer) -> u64 {
    server.get("/v1/stats").json["log"]["next_offset"]
        .as_u64()
        .expect("next_offset")
}

fn patterns(server: &TestServer, agent: &str) -> Vec<String> {
    let response = server.get(&format!("/v1/agents/{agent}/subscriptions"));
    assert_eq!(response.status, 200, "{response:?}");
    response.json["subscriptions"]
        .as_array()
        .expect("subscriptions")
        .iter()
        .map(|s| s["pattern"].as_str().expect("pattern").to_owned())
        .collect()
}

/// `GET /v1/topics` as (name, messages, subscribers).
fn topics(server: &TestServer) -> Vec<(String, u64, u64)> {
    let response = server.get("/v1/topics");
    assert_eq!(response.status, 200, "{response:?}");
    response.json["topics"]
        .as_array()
        .expect("topics")
        .iter()
        .map(|t| {
            (
                t["name"].as_str().expect("name").to_owned(),
                t["messages"].as_u64().expect("messages"),
                t["subscribers"].as_u64().expect("subscribers"),
            )
        })
        .collect()
}

#[test]
fn a_topic_message_is_stored_once_and_delivered_to_each_subscriber_on_its_own() {
    let server = TestServer::start(&[]);
    for agent in ["eu", "all", "idle"] {
        server.register(agent, json!({}));
    }
    assert_eq!(subscribe(&server, "eu", "tasks.eu.*"), 201);
    assert_eq!(subscribe(&server, "all", "tasks.>"), 201);
    // Overlapping patterns of one agent: still one copy.
    assert_eq!(subscribe(&server, "all", "tasks.*.created"), 201);
    assert_eq!(
        subscribe(&server, "all", "tasks.*.created"),
        200,
        "already subscribed"
    );
    assert_eq!(subscribe(&server, "idle", "other.>"), 201);

    let before = next_offset(&server);
    let eu = publish_topic(&server, "tasks.eu.created", json!({"n": 1}));
    assert_eq!(eu["destinations"], 2);
    assert_eq!(
        next_offset(&server),
        before + 1,
        "one record for two subscribers"
    );
    let us = publish_topic(&server, "tasks.us.created", json!({"n": 2}));
    assert_eq!(us["destinations"], 1);
    let none = publish_topic(&server, "nobody.listens", json!({"n": 3}));
    assert_eq!(none["destinations"], 0, "stored, routed nowhere");

    let all = server.receive("all", json!({"max": 10, "wait_ms": 0}));
    assert_eq!(
        offsets(&all),
        [
            eu["offset"].as_u64().unwrap(),
            us["offset"].as_u64().unwrap()
        ]
    );
    assert_eq!(all[0]["to"], "topic:tasks.eu.created");
    assert_eq!(all[0]["body"], json!({"n": 1}));
    let eu_got = server.receive("eu", json!({"max": 10, "wait_ms": 0}));
    assert_eq!(offsets(&eu_got), [eu["offset"].as_u64().unwrap()]);
    assert!(server
        .receive("idle", json!({"max": 10, "wait_ms": 0}))
        .is_empty());

    assert_eq!(
        topics(&server),
        [
            ("nobody.listens".to_owned(), 1, 0),
            ("tasks.eu.created".to_owned(), 1, 2),
            ("tasks.us.created".to_owned(), 1, 1)
        ]
    );
}

#[test]
fn each_subscriber_settles_its_own_copy() {
    let server = TestServer::start(&[]);
    for agent in ["done", "fails"] {
        server.register(agent, json!({}));
        subscribe(&server, agent, "work.*");
    }
    let published = publish_topic(&server, "work.one", json!({"n": 1}));
    assert_eq!(published["destinations"], 2);
    let done = server.receive("done", json!({"max": 10, "wait_ms": 0}));
    let fails = server.receive("fails", json!({"max": 10, "wait_ms": 0}));
    assert_eq!(offsets(&done), offsets(&fails));
    // One acks, the other dead-letters its copy: neither touches the other's.
    assert_eq!(
        server.settle("done", "ack", json!({}), &[&receipts(&done)[0]]),
        ["acked"]
    );
    let status = server.settle(
        "fails",
        "nack",
        json!({"dead_letter": true}),
        &[&receipts(&fails)[0]],
    );
    assert_eq!(status, ["dead_lettered"]);
    let dead = server.get("/v1/agents/fails/dead-letters");
    assert_eq!(dead.json["dead_letters"].as_array().unwrap().len(), 1);
    let none = server.get("/v1/agents/done/dead-letters");
    assert!(none.json["dead_letters"].as_array().unwrap().is_empty());
    // The dead letter goes back to its own inbox only.
    let redrive = server.post(
        "/v1/agents/fails/dead-letters/redrive",
        json!({"all": true}),
    );
    assert_eq!(redrive.json["redriven"], 1);
    assert_eq!(
        offsets(&server.receive("fails", json!({"wait_ms": 0}))),
        offsets(&done)
    );
    assert!(server.receive("done", json!({"wait_ms": 0})).is_empty());
}

#[test]
fn unsubscribing_stops_new_deliveries_and_keeps_pending_ones() {
    let server = TestServer::start(&[]);
    server.register("w", json!({}));
    subscribe(&server, "w", "news.*");
    let first = publish_topic(&server, "news.eu", json!(1));
    let response = server.request("DELETE", "/v1/agents/w/subscriptions/news.*", None);
    assert_eq!(response.status, 204, "{response:?}");
    let again = server.request("DELETE", "/v1/agents/w/subscriptions/news.*", None);
    assert_eq!(again.status, 404);
    assert_eq!(again.code(), "unknown_subscription");
    let second = publish_topic(&server, "news.eu", json!(2));
    assert_eq!(second["destinations"], 0);
    let got = server.receive("w", json!({"max": 10, "wait_ms": 0}));
    assert_eq!(
        offsets(&got),
        [first["offset"].as_u64().unwrap()],
        "pending stays"
    );
    assert!(patterns(&server, "w").is_empty());
}

#[test]
fn subscriptions_and_fan_out_survive_sigkill() {
    let mut server = TestServer::start(&[]);
    for agent in ["a", "b"] {
        server.register(agent, json!({}));
        subscribe(&server, agent, "jobs.>");
    }
    subscribe(&server, "b", "alerts.*");
    let first = publish_topic(&server, "jobs.new", json!("before"));
    // a leases its copy; b does not look yet.
    let leased = server.receive("a", json!({"max": 1, "wait_ms": 0, "lease_ms": 60000}));
    assert_eq!(offsets(&leased), [first["offset"].as_u64().unwrap()]);
    server.kill9();
    server.restart();
    assert_eq!(patterns(&server, "a"), ["jobs.>"]);
    assert_eq!(patterns(&server, "b"), ["alerts.*", "jobs.>"]);
    // b's copy is still ready; a's is still leased to a.
    let b_got = server.receive("b", json!({"max": 10, "wait_ms": 0}));
    assert_eq!(offsets(&b_got), [first["offset"].as_u64().unwrap()]);
    assert!(server
        .receive("a", json!({"max": 10, "wait_ms": 0}))
        .is_empty());
    // Routing after the restart uses the recovered subscriptions.
    let second = publish_topic(&server, "alerts.fire", json!("after"));
    assert_eq!(second["destinations"], 1);
    let b_more = server.receive("b", json!({"max": 10, "wait_ms": 0}));
    assert_eq!(offsets(&b_more), [second["offset"].as_u64().unwrap()]);
    assert_eq!(
        topics(&server),
        [
            ("alerts.fire".to_owned(), 1, 1),
            ("jobs.new".to_owned(), 1, 2)
        ]
    );
    // Deleting an agent removes its subscriptions: nothing more is routed to it.
    let deleted = server.request("DELETE", "/v1/agents/b", None);
    assert_eq!(deleted.status, 204);
    let third = publish_topic(&server, "jobs.next", json!("after delete"));
    assert_eq!(third["destinations"], 1);
    server.kill9();
    server.restart();
    server.register("b", json!({}));
    assert!(
        patterns(&server, "b").is_empty(),
        "a new agent b starts without subscriptions"
    );
}

#[test]
fn bad_topic_names_and_patterns_are_refused_and_nothing_is_written() {
    let server = TestServer::start(&[]);
    server.register("w", json!({}));
    let before = next_offset(&server);
    for bad in ["tasks..x", "Tasks", "a/b", "a.*", "a.>", ""] {
        let response = server.post(
            "/v1/messages",
            json!({"to": format!("topic:{bad}"), "from": "tester", "body": 1}),
        );
        assert_eq!(response.status, 400, "{bad}: {response:?}");
        assert_eq!(response.code(), "invalid_address", "{bad}");
    }
    for bad in ["a.%3E.b", "%3E.a", "a*", "A.b", "a..b"] {
        let response = server.put(&format!("/v1/agents/w/subscriptions/{bad}"), json!({}));
        assert_eq!(response.status, 400, "{bad}: {response:?}");
        assert_eq!(response.code(), "invalid_pattern", "{bad}");
    }
    let bad_start = server.put("/v1/agents/w/subscriptions/a.b", json!({"start": "now"}));
    assert_eq!(bad_start.status, 400, "{bad_start:?}");
    let unknown_field = server.put("/v1/agents/w/subscriptions/a.b", json!({"from": 1}));
    assert_eq!(unknown_field.status, 400, "{unknown_field:?}");
    let unknown_agent = server.put("/v1/agents/nobody/subscriptions/a.b", json!({}));
    assert_eq!(unknown_agent.status, 404);
    assert_eq!(unknown_agent.code(), "unknown_agent");
    assert_eq!(server.get("/v1/agents/nobody/subscriptions").status, 404);
    assert_eq!(next_offset(&server), before, "nothing was written");
    assert!(patterns(&server, "w").is_empty());
}

/// Receives (and acks) from `agent` until `want` messages came (or 60 long-polls passed),
/// then once more to see that nothing else comes; the offsets in the order they came.
fn drain_offsets(server: &TestServer, agent: &str, want: usize) -> Vec<u64> {
    let mut got = Vec::new();
    // At most 60 long-polls of up to half a second each.
    for _ in 0..60 {
        if got.len() >= want {
            break;
        }
        let messages = server.receive(agent, json!({"max": 1000, "wait_ms": 500}));
        let r = receipts(&messages);
        if !r.is_empty() {
            let refs: Vec<&str> = r.iter().map(String::as_str).collect();
            server.settle(agent, "ack", json!({}), &refs);
        }
        got.extend(offsets(&messages));
    }
    // Nothing more comes: every message once.
    got.extend(offsets(
        &server.receive(agent, json!({"max": 1000, "wait_ms": 300})),
    ));
    got
}

#[test]
fn earliest_backfills_every_matching_message_still_in_the_log_once() {
    let server = TestServer::start(&[]);
    server.register("late", json!({}));
    let mut expected = Vec::new();
    let mut other = Vec::new();
    for n in 0..3 {
        expected.push(
            publish_topic(&server, "t.a", json!(n))["offset"]
                .as_u64()
                .unwrap(),
        );
        expected.push(
            publish_topic(&server, "t.b.c", json!(n))["offset"]
                .as_u64()
                .unwrap(),
        );
        other.push(
            publish_topic(&server, "u.x", json!(n))["offset"]
                .as_u64()
                .unwrap(),
        );
    }
    // Already routed to the agent by another pattern: not backfilled again.
    assert_eq!(subscribe(&server, "late", "t.a"), 201);
    let routed = publish_topic(&server, "t.a", json!("routed"))["offset"]
        .as_u64()
        .unwrap();
    let path = format!("/v1/agents/late/subscriptions/{}", segment("t.>"));
    let response = server.put(&path, json!({"start": "earliest"}));
    assert_eq!(response.status, 201, "{response:?}");
    assert_eq!(response.json["start"], "earliest");
    let after = publish_topic(&server, "t.b.d", json!("after"))["offset"]
        .as_u64()
        .unwrap();
    expected.extend([routed, after]);
    let mut got = drain_offsets(&server, "late", expected.len());
    got.sort_unstable();
    expected.sort_unstable();
    assert_eq!(got, expected, "every t.* message once, no u.x ({other:?})");
    // Subscribing again changes nothing and backfills nothing; it answers the existing start.
    let again = server.put(&path, json!({"start": "latest"}));
    assert_eq!(
        (again.status, again.json["start"].as_str()),
        (200, Some("earliest"))
    );
    assert!(server.receive("late", json!({"wait_ms": 300})).is_empty());
    // An overlapping `earliest` pattern backfills only what the first one does not match,
    // even though the first one's copies were acked (gone from the inbox).
    let deep = publish_topic(&server, "t.b.c.d", json!("deep"))["offset"]
        .as_u64()
        .unwrap();
    let wider = format!("/v1/agents/late/subscriptions/{}", segment(">"));
    assert_eq!(server.put(&wider, json!({"start": "earliest"})).status, 201);
    let mut more = drain_offsets(&server, "late", 4);
    more.sort_unstable();
    let mut want = other.clone();
    want.push(deep);
    want.sort_unstable();
    assert_eq!(
        more, want,
        "the u.x messages and the one published since, once"
    );
}

#[test]
fn a_backfill_cut_by_sigkill_resumes_and_delivers_each_message_once() {
    let mut server = TestServer::start(&[]);
    server.register("late", json!({}));
    let count = 2500;
    let mut expected = Vec::new();
    for chunk in 0..(count / 500) {
        let messages: Vec<Value> = (0..500)
            .map(|n| json!({"to": "topic:bulk.items", "from": "tester", "body": chunk * 500 + n}))
            .collect();
        let response = server.post("/v1/messages/batch", json!({"messages": messages}));
        assert_eq!(response.status, 201, "{response:?}");
        expected.extend(
            response.json["results"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["offset"].as_u64().unwrap()),
        );
    }
    let path = format!("/v1/agents/late/subscriptions/{}", segment("bulk.>"));
    assert_eq!(server.put(&path, json!({"start": "earliest"})).status, 201);
    // Cut wherever the backfill stands (its chunks are 1,000 messages).
    server.kill9();
    server.restart();
    let mut got = drain_offsets(&server, "late", expected.len());
    got.sort_unstable();
    assert_eq!(got.len(), expected.len(), "each message once");
    assert_eq!(got, expected);
    assert_eq!(patterns(&server, "late"), ["bulk.>"]);
}
