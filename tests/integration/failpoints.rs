//! Fail points (feature `failpoints`): the binary is built with named crash and error points
//! in its write paths, armed per start through `FAILPOINTS`.
//!
//! - T8: the crash workload of [`crate::workload`] runs while the server is restarted with
//!   one crash point armed at a time; the server aborts there (no unwinding, no flush), is
//!   restarted clean, and the history is checked as for T1. CI crashes once at every point;
//!   `COURIER_SOAK=1` ten times. A point the workload never reaches fails the test.
//! - T9: injected write and fsync errors (EIO, ENOSPC): publishers get 503, never a 2xx after
//!   the failure; the server reports not-ready and refuses writes; a restart recovers every
//!   message acknowledged before.
#![allow(
    clippy::disallowed_methods,
    reason = "the test paces its crashes and bounds its waits with the clock"
)]

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::json;

use crate::disk_errors;
use crate::support::{Rng, TestServer};
use crate::workload::{self, Load};

/// Every crash point of the server's write paths. (`agent.submitted` / `agent.durable`
/// exist too; this workload registers its agent only once.)
const POINTS: &[&str] = &[
    "publish.submitted",
    "publish.durable",
    "lease.submitted",
    "lease.durable",
    "ack.submitted",
    "ack.durable",
    "nack.submitted",
    "nack.durable",
    "extend.submitted",
    "extend.durable",
    "expiry.submitted",
    "expiry.durable",
    "dead_letter.submitted",
    "dead_letter.durable",
    "redrive.submitted",
    "redrive.durable",
    "segment.sealed",
    "segment.created",
    "checkpoint.start",
    "checkpoint.applied",
    "checkpoint.flushed",
    "retention.truncated",
    "retention.deleted",
];

/// Small segments and a small size limit, so that rolls and retention happen all the time;
/// few attempts, so that dead-lettering does (and, with the workload's short leases, expiry).
const FLAGS: &[&str] = &[
    "--max-attempts",
    "3",
    "--segment-bytes",
    "65536",
    "--retention-max-bytes",
    "262144",
];

/// Restarts the server with `point` armed to crash after `skip` passes; returns whether it
/// crashed there within `wait`.
fn crash_at(server: &mut TestServer, load: &Load, point: &str, skip: u64, wait: Duration) -> bool {
    let line = format!("crashing at fail point {point}");
    server.set_env("FAILPOINTS", Some(&format!("{point}={skip}*off->return")));
    let crashed = match server.try_restart() {
        // Retention runs at start: its points can crash the start itself.
        Err(logs) => {
            assert!(logs.contains(&line), "the start failed otherwise:\n{logs}");
            true
        }
        Ok(()) => {
            load.follow(server);
            match server.wait_exit(wait) {
                Some(status) => {
                    let logs = server.logs();
                    assert!(logs.contains(&line), "exited with {status}:\n{logs}");
                    true
                }
                None => false,
            }
        }
    };
    server.set_env("FAILPOINTS", None);
    server.restart();
    load.follow(server);
    crashed
}

#[test]
fn crash_at_every_fail_point_loses_nothing_acknowledged() {
    let runs = if std::env::var_os("COURIER_SOAK").is_some() {
        10
    } else {
        1
    };
    let seed = workload::seed();
    let mut rng = Rng(seed);
    let mut server = TestServer::start(&workload::flags(FLAGS));
    let load = Load::start(&server, seed);
    let mut missed = Vec::new();
    for _ in 0..runs {
        for &point in POINTS {
            // Retention runs at start (and then every 30 s): it deletes only what piled up
            // since the last start, which takes a moment of load, and may find nothing to
            // delete yet. So its points get a longer pause, a short wait and more tries.
            let retention = point.starts_with("retention.");
            let (pause, wait, tries) = if retention {
                (1500, Duration::from_secs(2), 4)
            } else {
                (100 + rng.below(200), Duration::from_secs(10), 1)
            };
            let reached = (0..tries).any(|_| {
                std::thread::sleep(Duration::from_millis(pause));
                let skip = if retention { 0 } else { rng.below(3) };
                crash_at(&mut server, &load, point, skip, wait)
            });
            if !reached {
                missed.push(point);
            }
        }
    }
    load.finish(&server, "T8").assert_clean();
    assert!(
        missed.is_empty(),
        "the workload never reached these fail points: {missed:?}"
    );
}

/// Arms `failpoints` on a server that holds some messages, publishes until the injected
/// error stops it, checks the fail-stop behaviour, restarts clean and drains.
fn disk_error_stops_writes_and_a_restart_recovers(failpoints: &str) {
    let mut server = TestServer::start(&[]);
    server.register("worker", json!({}));
    let mut acked: BTreeSet<u64> = (0..20)
        .map(|n| server.publish("worker", json!({"before": n})))
        .collect();
    server.set_env("FAILPOINTS", Some(failpoints));
    server.try_restart().expect("the server starts");
    acked.extend(disk_errors::publish_until_refused(&server, 16));
    disk_errors::assert_fail_stop(&server);
    server.set_env("FAILPOINTS", None);
    server.restart();
    disk_errors::assert_all_delivered(&server, &acked, &format!("T9 {failpoints}"));
}

#[test]
fn fsync_eio_fails_publishes_with_503_and_a_restart_recovers() {
    disk_error_stops_writes_and_a_restart_recovers("io.sync=30*off->return(EIO)");
}

#[test]
fn write_enospc_fails_publishes_with_503_and_a_restart_recovers() {
    disk_error_stops_writes_and_a_restart_recovers("io.write=30*off->return(ENOSPC)");
}

/// A handler that panics (here after its receive leased a message, at the panic point
/// `api.receive`) answers 500 in the error shape and logs the panic with its route; the
/// connection is not dropped, and the server keeps serving the same inbox: the message
/// comes back after its lease.
#[test]
fn a_panicking_handler_answers_500_and_the_server_keeps_serving() {
    let mut server = TestServer::unstarted(&["--lease", "1s"]);
    server.set_env("FAILPOINTS", Some("api.receive=1*return"));
    server.restart();
    server.register("planner", json!({}));
    let offset = server.publish("planner", json!("task"));

    let failed = server.post(
        "/v1/agents/planner/receive",
        json!({"max": 1, "wait_ms": 0}),
    );
    assert_eq!(failed.status, 500, "{failed:?}");
    assert_eq!(failed.code(), "internal_error");
    let message = failed.json["error"]["message"].as_str().unwrap();
    assert!(message.contains("/v1/agents/{agent}/receive"), "{message}");
    let logs = server.logs();
    assert!(
        logs.contains("a request handler panicked") && logs.contains("fail point api.receive"),
        "{logs}"
    );

    assert_eq!(server.get("/readyz").status, 200);
    let again = server.receive("planner", json!({"max": 1, "wait_ms": 5000}));
    assert_eq!(crate::support::offsets(&again), [offset]);
    assert_eq!(
        again[0]["attempt"], 2,
        "the lease of the failed answer ran out"
    );
}

/// The log's writer thread panics (at the panic point `writer.commit`, in its third commit):
/// the publish in that commit and every later write get 503 at once instead of hanging,
/// `/readyz` says not ready, and a restart recovers everything acknowledged before.
#[test]
fn a_panicking_writer_thread_fails_writes_and_a_restart_recovers() {
    let mut server = TestServer::unstarted(&[]);
    server.set_env("FAILPOINTS", Some("writer.commit=2*off->return"));
    server.restart();
    server.register("planner", json!({}));
    let kept = server.publish("planner", json!("kept"));
    let publish = || {
        server.post(
            "/v1/messages",
            json!({"to": "agent:planner", "from": "x", "body": "lost"}),
        )
    };
    for _ in 0..3 {
        let refused = publish();
        assert_eq!(
            (refused.status, refused.code()),
            (503, "unavailable"),
            "{refused:?}"
        );
    }
    assert_eq!(server.get("/readyz").status, 503);
    let logs = server.logs();
    assert!(logs.contains("the writer thread panicked"), "{logs}");

    server.set_env("FAILPOINTS", None);
    server.restart();
    let messages = server.receive("planner", json!({"max": 10, "wait_ms": 0}));
    assert_eq!(crate::support::offsets(&messages), [kept]);
}

/// A backfill crashed after its first chunk was durable (the fail point
/// `backfill.durable`, second pass) resumes at the next start from its durable cursor: every
/// message of the topic reaches the subscriber exactly once.
#[test]
fn a_backfill_crashed_between_chunks_resumes_and_delivers_each_message_once() {
    let mut server = TestServer::start(&[]);
    server.register("late", json!({}));
    let mut expected = Vec::new();
    for chunk in 0..5 {
        let messages: Vec<_> = (0..500)
            .map(|n| json!({"to": "topic:bulk.items", "from": "tester", "body": chunk * 500 + n}))
            .collect();
        let response = server.post("/v1/messages/batch", json!({ "messages": messages }));
        assert_eq!(response.status, 201, "{response:?}");
        expected.extend(
            response.json["results"]
                .as_array()
                .expect("results")
                .iter()
                .map(|r| r["offset"].as_u64().expect("offset")),
        );
    }
    server.set_env("FAILPOINTS", Some("backfill.durable=1*off->return"));
    server.restart();
    let response = server.put(
        "/v1/agents/late/subscriptions/bulk.%3E",
        json!({"start": "earliest"}),
    );
    assert_eq!(response.status, 201, "{response:?}");
    let status = server.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some(),
        "the backfill never reached its second chunk"
    );
    assert!(server
        .logs()
        .contains("crashing at fail point backfill.durable"));
    server.set_env("FAILPOINTS", None);
    server.restart();
    let mut got = Vec::new();
    for _ in 0..100 {
        let response = server.post(
            "/v1/agents/late/receive",
            json!({"max": 1000, "wait_ms": 300}),
        );
        let messages = response.json["messages"]
            .as_array()
            .expect("messages")
            .clone();
        if messages.is_empty() && got.len() >= expected.len() {
            break;
        }
        let receipts: Vec<&str> = messages
            .iter()
            .map(|m| m["receipt"].as_str().expect("receipt"))
            .collect();
        if !receipts.is_empty() {
            let acked = server.post("/v1/agents/late/ack", json!({ "receipts": receipts }));
            assert_eq!(acked.status, 200);
        }
        got.extend(
            messages
                .iter()
                .map(|m| m["offset"].as_u64().expect("offset")),
        );
    }
    got.sort_unstable();
    assert_eq!(got, expected, "every message once");
    assert!(server.logs().contains("resuming the backfill"));
}
