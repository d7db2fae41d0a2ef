//! Capability queues (SPEC §2, §3): each message goes to exactly one of the agents that
//! declare the capability at a time, merged with their own inbox by priority then age; an
//! expired or nacked lease may go to another; messages wait while nobody can take them;
//! counts, dead letters and redrive per queue; a lease is settled only by its holder; queue
//! positions and leases survive SIGKILL; deleting an agent or changing its capabilities
//! changes what it receives and loses nothing; bad names are refused with nothing written.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{offsets, receipts, receive_in_background, TestServer};

fn publish_to(server: &TestServer, to: &str, body: Value, priority: u8) -> u64 {
    let response = server.post(
        "/v1/messages",
        json!({"to": to, "from": "tester", "body": body, "priority": priority}),
    );
    assert_eq!(response.status, 201, "{response:?}");
    assert_eq!(response.json["destinations"], 1, "{response:?}");
    response.json["offset"].as_u64().expect("offset")
}

fn next_offset(server: &TestServer) -> u64 {
    server.get("/v1/stats").json["log"]["next_offset"]
        .as_u64()
        .expect("next_offset")
}

/// `GET /v1/capabilities/{name}` as (ready, in_flight, dead_letters, agents, online).
fn queue(server: &TestServer, name: &str) -> (u64, u64, u64, Vec<String>, u64) {
    let response = server.get(&format!("/v1/capabilities/{name}"));
    assert_eq!(response.status, 200, "{response:?}");
    let j = &response.json;
    let agents = j["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .map(|a| a.as_str().expect("id").to_owned())
        .collect();
    (
        j["ready"].as_u64().expect("ready"),
        j["in_flight"].as_u64().expect("in_flight"),
        j["dead_letters"].as_u64().expect("dead_letters"),
        agents,
        j["online"].as_u64().expect("online"),
    )
}

fn worker(server: &TestServer, id: &str, capabilities: &[&str]) {
    server.register(id, json!({"capabilities": capabilities}));
}

#[test]
fn a_queue_message_goes_to_one_capable_agent_and_only_its_holder_settles_it() {
    let server = TestServer::start(&[]);
    worker(&server, "w1", &["summarize"]);
    worker(&server, "w2", &["summarize", "translate"]);
    worker(&server, "other", &["translate"]);
    let before = next_offset(&server);
    let published: Vec<u64> = (0..6)
        .map(|n| publish_to(&server, "capability:summarize", json!({ "n": n }), 4))
        .collect();
    assert_eq!(next_offset(&server), before + 6, "one record per message");

    let first = server.receive("w1", json!({"max": 4, "wait_ms": 0}));
    let second = server.receive("w2", json!({"max": 10, "wait_ms": 0}));
    assert!(server
        .receive("other", json!({"max": 10, "wait_ms": 0}))
        .is_empty());
    assert_eq!(offsets(&first), published[..4]);
    assert_eq!(offsets(&second), published[4..]);
    assert_eq!(first[0]["to"], "capability:summarize");
    assert_eq!(first[0]["attempt"], 1);
    assert!(receipts(&first)[0].ends_with("@summarize"));
    assert_eq!(
        queue(&server, "summarize"),
        (0, 6, 0, vec!["w1".into(), "w2".into()], 2)
    );

    // w2 cannot settle w1's lease; each settles its own.
    let r1 = receipts(&first);
    assert_eq!(
        server.settle("w2", "ack", json!({}), &[&r1[0]]),
        ["unknown"]
    );
    let all1: Vec<&str> = r1.iter().map(String::as_str).collect();
    assert_eq!(server.settle("w1", "ack", json!({}), &all1), ["acked"; 4]);
    let r2 = receipts(&second);
    let all2: Vec<&str> = r2.iter().map(String::as_str).collect();
    assert_eq!(server.settle("w2", "ack", json!({}), &all2), ["acked"; 2]);
    let (ready, in_flight, ..) = queue(&server, "summarize");
    assert_eq!((ready, in_flight), (0, 0));

    let listed = server.get("/v1/capabilities");
    assert_eq!(listed.status, 200, "{listed:?}");
    let names: Vec<&str> = listed.json["capabilities"]
        .as_array()
        .expect("capabilities")
        .iter()
        .map(|c| c["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["summarize", "translate"]);
}

#[test]
fn messages_wait_for_a_capable_agent_and_merge_with_its_inbox_by_priority_then_age() {
    let server = TestServer::start(&[]);
    let low = publish_to(&server, "capability:ocr", json!("low"), 2);
    let high = publish_to(&server, "capability:ocr", json!("high"), 7);
    assert_eq!(queue(&server, "ocr"), (2, 0, 0, vec![], 0), "waiting");
    worker(&server, "reader", &["ocr"]);
    let own_high = publish_to(&server, "agent:reader", json!("own-high"), 7);
    let own_top = publish_to(&server, "agent:reader", json!("own-top"), 9);
    let got = server.receive("reader", json!({"max": 10, "wait_ms": 0}));
    assert_eq!(offsets(&got), [own_top, high, own_high, low]);
    assert!(!receipts(&got)[0].contains('@'), "an inbox receipt");
    assert!(receipts(&got)[1].ends_with("@ocr"), "a queue receipt");
}

#[test]
fn a_nacked_or_expired_lease_goes_to_another_capable_agent() {
    let server = TestServer::start(&["--backoff-initial", "10ms"]);
    worker(&server, "a", &["work"]);
    worker(&server, "b", &["work"]);
    let offset = publish_to(&server, "capability:work", json!(1), 4);
    let got = server.receive("a", json!({"max": 1, "wait_ms": 0}));
    assert_eq!(
        server.settle("a", "nack", json!({}), &[&receipts(&got)[0]]),
        ["nacked"]
    );
    let again = server.receive("b", json!({"max": 1, "wait_ms": 2000}));
    assert_eq!(offsets(&again), [offset]);
    assert_eq!(again[0]["attempt"], 2);
    // b lets its lease run out: a gets it next.
    let expired = server.receive("a", json!({"max": 1, "wait_ms": 0}));
    assert!(expired.is_empty(), "leased to b");
    let _ = server.post(
        "/v1/agents/b/extend",
        json!({"receipts": receipts(&again), "lease_ms": 100}),
    );
    let third = server.receive("a", json!({"max": 1, "wait_ms": 5000}));
    assert_eq!(offsets(&third), [offset]);
    assert_eq!(third[0]["attempt"], 3);
    // b's receipt names a lease a holds now.
    assert_eq!(
        server.settle("b", "ack", json!({}), &[&receipts(&again)[0]]),
        ["unknown"],
        "held by a now"
    );
    // a hands it back for a minute: nobody holds it. An agent that does not draw from the
    // queue cannot settle it; a capable one can (a late ack, as for an inbox).
    let mine = &receipts(&third)[0];
    let later = json!({"delay_ms": 60000});
    assert_eq!(server.settle("a", "nack", later, &[mine]), ["nacked"]);
    worker(&server, "outsider", &[]);
    assert_eq!(
        server.settle("outsider", "ack", json!({}), &[mine]),
        ["unknown"]
    );
    assert_eq!(server.settle("a", "ack", json!({}), &[mine]), ["acked"]);
}

#[test]
fn a_queue_has_its_own_dead_letters_and_redrive() {
    let server = TestServer::start(&[]);
    worker(&server, "w", &["parse"]);
    let offset = publish_to(&server, "capability:parse", json!("bad"), 4);
    let got = server.receive("w", json!({"wait_ms": 0}));
    let status = server.settle(
        "w",
        "nack",
        json!({"dead_letter": true}),
        &[&receipts(&got)[0]],
    );
    assert_eq!(status, ["dead_lettered"]);
    assert_eq!(queue(&server, "parse"), (0, 0, 1, vec!["w".into()], 1));
    let dead = server.get("/v1/capabilities/parse/dead-letters");
    assert_eq!(dead.status, 200, "{dead:?}");
    let letters = dead.json["dead_letters"].as_array().expect("dead_letters");
    assert_eq!(offsets(letters), [offset]);
    assert_eq!(letters[0]["reason"], "rejected");
    let agent_dead = server.get("/v1/agents/w/dead-letters");
    assert!(agent_dead.json["dead_letters"]
        .as_array()
        .unwrap()
        .is_empty());
    let redrive = server.post(
        "/v1/capabilities/parse/dead-letters/redrive",
        json!({"all": true}),
    );
    assert_eq!(redrive.json["redriven"], 1, "{redrive:?}");
    let back = server.receive("w", json!({"wait_ms": 0}));
    assert_eq!(offsets(&back), [offset]);
    assert_eq!(back[0]["attempt"], 1, "attempts reset");
}

#[test]
fn queue_positions_and_leases_survive_sigkill() {
    let mut server = TestServer::start(&[]);
    worker(&server, "w1", &["index"]);
    worker(&server, "w2", &["index"]);
    let published: Vec<u64> = (0..3)
        .map(|n| publish_to(&server, "capability:index", json!(n), 4))
        .collect();
    let leased = server.receive("w1", json!({"max": 1, "wait_ms": 0, "lease_ms": 60000}));
    assert_eq!(offsets(&leased), [published[0]]);
    server.kill9();
    server.restart();
    let (ready, in_flight, ..) = queue(&server, "index");
    assert_eq!((ready, in_flight), (2, 1));
    // The lease is w1's still: w2 gets the others, cannot settle it, and w1 can.
    let rest = server.receive("w2", json!({"max": 10, "wait_ms": 0}));
    assert_eq!(offsets(&rest), published[1..]);
    let receipt = &receipts(&leased)[0];
    assert_eq!(
        server.settle("w2", "ack", json!({}), &[receipt]),
        ["unknown"]
    );
    assert_eq!(server.settle("w1", "ack", json!({}), &[receipt]), ["acked"]);
    server.kill9();
    server.restart();
    let (ready, in_flight, ..) = queue(&server, "index");
    assert_eq!((ready, in_flight), (0, 2), "w2's two leases remain");
}

#[test]
fn deleting_an_agent_or_dropping_a_capability_changes_what_it_receives_and_loses_nothing() {
    let server = TestServer::start(&[]);
    worker(&server, "leaving", &["plan"]);
    worker(&server, "staying", &["plan"]);
    let published: Vec<u64> = (0..2)
        .map(|n| publish_to(&server, "capability:plan", json!(n), 4))
        .collect();
    let held = server.receive(
        "leaving",
        json!({"max": 10, "wait_ms": 0, "lease_ms": 60000}),
    );
    assert_eq!(offsets(&held), published);
    let deleted = server.request("DELETE", "/v1/agents/leaving", None);
    assert_eq!(deleted.status, 204, "{deleted:?}");
    // Its leases went back to the queue at once, not after 60 s.
    let taken = server.receive("staying", json!({"max": 10, "wait_ms": 0}));
    assert_eq!(offsets(&taken), published);
    assert!(taken.iter().all(|m| m["attempt"] == 2));
    let all: Vec<String> = receipts(&taken);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    assert_eq!(
        server.settle("staying", "ack", json!({}), &all),
        ["acked"; 2]
    );

    // Dropping the capability: new queue messages wait, the inbox still works.
    worker(&server, "staying", &[]);
    let waiting = publish_to(&server, "capability:plan", json!("later"), 4);
    assert!(server
        .receive("staying", json!({"max": 10, "wait_ms": 0}))
        .is_empty());
    assert_eq!(queue(&server, "plan"), (1, 0, 0, vec![], 0));
    // A long-poll in progress sees the capability come back.
    let poll = receive_in_background(&server, "staying", r#"{"wait_ms": 10000}"#);
    std::thread::sleep(Duration::from_millis(200));
    worker(&server, "staying", &["plan"]);
    let (response, took) = poll.join().expect("receive thread");
    assert_eq!(response.status, 200, "{response:?}");
    let got = response.json["messages"].as_array().expect("messages");
    assert_eq!(offsets(got), [waiting]);
    assert!(
        took < Duration::from_secs(5),
        "woken by the change: {took:?}"
    );
}

#[test]
fn a_long_poll_of_a_capable_agent_wakes_on_a_queue_publish() {
    let server = TestServer::start(&[]);
    worker(&server, "w", &["wake"]);
    let poll = receive_in_background(&server, "w", r#"{"wait_ms": 10000}"#);
    std::thread::sleep(Duration::from_millis(200));
    let offset = publish_to(&server, "capability:wake", json!("now"), 4);
    let (response, took) = poll.join().expect("receive thread");
    let got = response.json["messages"].as_array().expect("messages");
    assert_eq!(offsets(got), [offset]);
    assert!(
        took < Duration::from_secs(5),
        "woken by the publish: {took:?}"
    );
}

#[test]
fn bad_capability_names_are_refused_and_nothing_is_written() {
    let server = TestServer::start(&[]);
    let before = next_offset(&server);
    let unknown = server.get("/v1/capabilities/nobody-has-this");
    assert_eq!(unknown.status, 404, "{unknown:?}");
    assert_eq!(unknown.code(), "unknown_capability");
    for path in [
        "/v1/capabilities/Bad%20Name",
        "/v1/capabilities/-dash/dead-letters",
    ] {
        let response = server.get(path);
        assert_eq!(response.status, 400, "{path}: {response:?}");
        assert_eq!(response.code(), "invalid_capability");
    }
    let dead = server.get("/v1/capabilities/nobody-has-this/dead-letters");
    assert_eq!(dead.status, 404, "{dead:?}");
    let register = server.put("/v1/agents/w", json!({"capabilities": ["Summarize Text"]}));
    assert_eq!(register.status, 400, "{register:?}");
    assert!(register.json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("capability"));
    for to in ["capability:", "capability:UPPER", "capability:a b"] {
        let response = server.post(
            "/v1/messages",
            json!({"to": to, "from": "tester", "body": 1}),
        );
        assert_eq!(response.status, 400, "{to}: {response:?}");
    }
    assert_eq!(next_offset(&server), before, "nothing written");
    let garbage = server.post(
        "/v1/agents/w/ack",
        json!({"receipts": ["00000000000000000400000001@Bad Name"]}),
    );
    assert_eq!(garbage.status, 404, "w is not registered: {garbage:?}");
}
