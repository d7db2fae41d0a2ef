//! Crashes and shutdowns: what a SIGKILL keeps and forgets, and a clean SIGTERM.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::json;

use crate::support::{eventually, offsets, receipts, TestServer};

#[test]
fn sigkill_keeps_unacked_forgets_acked_and_keeps_attempts() {
    let mut server = TestServer::start(&["--lease", "60s"]);
    server.register("worker", json!({"max_attempts": 4}));
    let published: Vec<u64> = (0..20)
        .map(|n| server.publish("worker", json!(n)))
        .collect();
    let delivered = server.receive("worker", json!({"max": 10, "wait_ms": 0}));
    let acked: BTreeSet<u64> = offsets(&delivered[..5]).into_iter().collect();
    let r = receipts(&delivered[..5]);
    let r: Vec<&str> = r.iter().map(String::as_str).collect();
    assert_eq!(
        server.settle("worker", "ack", json!({}), &r),
        vec!["acked"; 5]
    );
    let dead = server.receive("worker", json!({"max": 1, "wait_ms": 0}));
    let dead_receipt = receipts(&dead);
    server.settle(
        "worker",
        "nack",
        json!({"dead_letter": true}),
        &[&dead_receipt[0]],
    );

    server.restart();

    let agent = server.get("/v1/agents/worker").json;
    assert_eq!(
        agent["max_attempts"],
        json!(4),
        "registration lost: {agent}"
    );
    assert_eq!(agent["inbox"]["dead_letters"], json!(1));
    assert_eq!(
        agent["inbox"]["in_flight"],
        json!(5),
        "leases lost: {agent}"
    );
    assert_eq!(agent["inbox"]["ready"], json!(9));
    // The 9 never-delivered ones come first (attempt 1); the 5 leased come back after their
    // lease with attempt 2.
    let fresh = server.receive("worker", json!({"max": 100, "wait_ms": 0}));
    assert!(fresh.iter().all(|m| m["attempt"] == json!(1)));
    let leased_earlier: BTreeSet<u64> = offsets(&delivered[5..]).into_iter().collect();
    let expected: BTreeSet<u64> = published
        .iter()
        .copied()
        .filter(|o| !acked.contains(o) && !leased_earlier.contains(o) && *o != offsets(&dead)[0])
        .collect();
    assert_eq!(
        offsets(&fresh).into_iter().collect::<BTreeSet<_>>(),
        expected
    );
    let stale: Vec<String> = receipts(&delivered[5..]);
    // The leases granted before the crash are still valid after it.
    let still: Vec<&str> = stale.iter().map(String::as_str).collect();
    assert_eq!(
        server.settle("worker", "extend", json!({"lease_ms": 1}), &still),
        vec!["extended"; 5]
    );
    let again = eventually(Duration::from_secs(10), "the redeliveries", || {
        let m = server.receive("worker", json!({"max": 100, "wait_ms": 2000}));
        (!m.is_empty()).then_some(m)
    });
    assert!(
        again.iter().all(|m| m["attempt"] == json!(2)),
        "attempt counts reset: {again:?}"
    );
    for m in &again {
        assert!(leased_earlier.contains(&m["offset"].as_u64().unwrap()));
        assert!(
            !acked.contains(&m["offset"].as_u64().unwrap()),
            "an acked message came back"
        );
    }
}

#[test]
fn sigkill_with_an_index_deleted_rebuilds_the_same_state() {
    let mut server = TestServer::start(&[]);
    server.register("worker", json!({}));
    for n in 0..10 {
        server.publish("worker", json!(n));
    }
    let delivered = server.receive("worker", json!({"max": 3, "wait_ms": 0}));
    let r = receipts(&delivered);
    server.settle("worker", "ack", json!({}), &[&r[0]]);
    let before = server.get("/v1/agents/worker").json["inbox"].clone();
    server.kill9();
    std::fs::remove_dir_all(server.data_dir().join("index")).unwrap();
    server.restart();
    assert_eq!(server.get("/v1/agents/worker").json["inbox"], before);
}

#[test]
fn sigterm_wakes_long_polls_and_exits_zero() {
    let mut server = TestServer::start(&[]);
    server.register("worker", json!({}));
    let waiter = crate::support::receive_in_background(&server, "worker", r#"{"wait_ms": 60000}"#);
    eventually(Duration::from_secs(10), "the long-poll to open", || {
        (server.get("/v1/agents/worker").json["receivers"] == json!(1)).then_some(())
    });
    let status = server.terminate();
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        server.logs()
    );
    let (response, _) = waiter.join().unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.json["messages"], json!([]));
    assert!(
        server.logs().contains("shut down cleanly"),
        "{}",
        server.logs()
    );
}

/// A request call waiting for its reply does not hold a shutdown up for its timeout: it gets
/// 503 at once, and its request (stored) is answered after the restart by its id.
#[test]
fn sigterm_ends_waiting_request_calls_with_503() {
    let mut server = TestServer::start(&[]);
    server.register("asker", json!({}));
    server.register("worker", json!({}));
    let body = json!({"id": "ask-1", "to": "agent:worker", "from": "asker", "body": 1});
    let call = crate::support::post_in_background(&server, "/v1/requests?timeout_ms=120000", &body);
    eventually(Duration::from_secs(10), "the request to be stored", || {
        (server.get("/v1/agents/worker").json["inbox"]["ready"] == json!(1)).then_some(())
    });
    let status = server.terminate();
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        server.logs()
    );
    let (response, took) = call.join().unwrap();
    assert_eq!(response.status, 503, "{response:?}");
    assert!(response.text.contains("ask-1"), "{response:?}");
    assert!(
        took < Duration::from_secs(30),
        "the call held the shutdown up: {took:?}"
    );
    server.restart();
    let messages = server.receive("worker", json!({"wait_ms": 0}));
    assert_eq!(messages.len(), 1, "the request survives the shutdown");
}

#[test]
fn torn_tail_is_truncated_at_startup_and_earlier_messages_survive() {
    let mut server = TestServer::start(&[]);
    server.register("worker", json!({}));
    let kept = server.publish("worker", json!("kept"));
    let end = next_offset(&server);
    assert!(
        server.logs().contains("recovered the log"),
        "{}",
        server.logs()
    );
    server.kill9();
    // A garbage tail is a torn write: truncated and logged, and the message survives.
    let segment = server.data_dir().join("log").join(format!("{:020}.seg", 0));
    let mut bytes = std::fs::read(&segment).unwrap();
    let records_end = bytes.len();
    bytes.extend_from_slice(&[0xAB; 37]);
    std::fs::write(&segment, &bytes).unwrap();
    server.restart();
    assert!(
        server.logs().contains("torn_tail_truncated=true"),
        "{}",
        server.logs()
    );
    // The cut is exactly the garbage: the log ends where it ended, and the next append
    // takes the next offset and is read back after the kept message.
    assert_eq!(std::fs::read(&segment).unwrap().len(), records_end);
    assert_eq!(next_offset(&server), end);
    let after = server.publish("worker", json!("after"));
    assert_eq!(
        after, end,
        "the first append after the cut takes the next offset"
    );
    assert_eq!(next_offset(&server), end + 1);
    let messages = server.receive("worker", json!({"max": 10, "wait_ms": 0}));
    assert_eq!(offsets(&messages), [kept, after]);
    assert_eq!(messages[0]["body"], json!("kept"));
    assert_eq!(messages[1]["body"], json!("after"));
    // And it survives another restart: the segment is whole again.
    let before_restart = next_offset(&server);
    server.restart();
    assert!(
        server.logs().contains("torn_tail_truncated=false"),
        "{}",
        server.logs()
    );
    assert_eq!(next_offset(&server), before_restart);
}

fn next_offset(server: &TestServer) -> u64 {
    server.get("/v1/stats").json["log"]["next_offset"]
        .as_u64()
        .expect("next_offset")
}

#[test]
fn retention_by_age_deletes_old_segments_and_forgets_their_messages() {
    let server = TestServer::start(&["--segment-bytes", "4096", "--retention-max-age", "1s"]);
    server.register("worker", json!({}));
    for n in 0..40 {
        server.publish("worker", json!({"n": n, "pad": "x".repeat(200)}));
    }
    let segments = |s: &TestServer| s.get("/v1/stats").json["log"]["segments"].as_u64().unwrap();
    assert!(segments(&server) > 2, "the messages span several segments");
    eventually(
        Duration::from_secs(20),
        "retention to delete old segments",
        || {
            let logged = server.logs().contains("retention deleted old segments");
            (segments(&server) <= 2 && logged).then_some(())
        },
    );
    // What is left is consistent: every message still counted can be delivered.
    let ready = server.get("/v1/agents/worker").json["inbox"]["ready"]
        .as_u64()
        .unwrap();
    assert!(ready < 40, "nothing was forgotten: {ready}");
    let delivered = server.receive("worker", json!({"max": 100, "wait_ms": 0}));
    assert_eq!(delivered.len() as u64, ready);
}

#[test]
fn retention_by_size_never_deletes_pending_messages() {
    let mut server =
        TestServer::start(&["--segment-bytes", "4096", "--retention-max-bytes", "5000"]);
    server.register("worker", json!({}));
    for n in 0..60 {
        server.publish("worker", json!({"n": n, "pad": "x".repeat(200)}));
    }
    let segments = |s: &TestServer| s.get("/v1/stats").json["log"]["segments"].as_u64().unwrap();
    let before = segments(&server);
    assert!(before >= 4, "the messages span several segments: {before}");
    // The oldest half is acked: the segments holding only acked messages may go; the
    // newer half stays pending, and no segment holding one of them may.
    let first = server.receive("worker", json!({"max": 20, "wait_ms": 0}));
    let r = receipts(&first);
    let all: Vec<&str> = r.iter().map(String::as_str).collect();
    assert_eq!(
        server.settle("worker", "ack", json!({}), &all),
        vec!["acked"; 20]
    );
    // Retention runs at start, in the background: wait until it has deleted something, so
    // that what follows is checked after a run, not before one.
    server.restart();
    eventually(
        Duration::from_secs(20),
        "retention to delete the acked segments",
        || {
            let logged = server.logs().contains("retention deleted old segments");
            (logged && segments(&server) < before).then_some(())
        },
    );
    let rest = server.receive("worker", json!({"max": 100, "wait_ms": 0}));
    let ns: Vec<u64> = rest
        .iter()
        .map(|m| m["body"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ns,
        (20..60).collect::<Vec<u64>>(),
        "every pending message survived"
    );
}

#[test]
fn flipped_bit_in_an_old_segment_refuses_start_until_repaired() {
    let mut server = TestServer::start(&["--segment-bytes", "4096"]);
    server.register("worker", json!({}));
    for n in 0..40 {
        server.publish("worker", json!({"n": n, "pad": "x".repeat(200)}));
    }
    server.kill9();
    let segment = server.data_dir().join("log").join(format!("{:020}.seg", 0));
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[300] ^= 0x10; // inside the first message, in a sealed segment
    std::fs::write(&segment, &bytes).unwrap();

    let logs = server.restart_expecting_failure();
    assert!(
        logs.contains("00000000000000000000.seg"),
        "the error does not name the segment:\n{logs}"
    );
    assert!(
        logs.contains(" at byte "),
        "the error does not name the position:\n{logs}"
    );

    let dir = server.data_dir();
    let quarantined =
        courier_storage::verify::repair(&courier_storage::io::FileDisk, &dir, &dir.join("index"))
            .unwrap();
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    server.restart();
    // One message was quarantined; every other one is still delivered.
    let messages = server.receive("worker", json!({"max": 100, "wait_ms": 0}));
    assert_eq!(messages.len(), 39);
    assert!(std::fs::read_dir(dir.join("quarantine")).unwrap().count() == 1);
}
