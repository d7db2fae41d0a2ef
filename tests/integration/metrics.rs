//! `GET /metrics` (SPEC §8): the Prometheus text format, and series that move by exactly what
//! the server did.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;

use crate::support::{eventually, receipts, TestServer};

/// Every sample of a scrape: `name{labels}` → value.
pub fn scrape(server: &TestServer) -> BTreeMap<String, f64> {
    let response = server.get("/metrics");
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(
        response.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    response
        .text
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("`series value`");
            (series.to_owned(), value.parse().expect("a number"))
        })
        .collect()
}

/// How far each series moved between two scrapes (series new in `after` count from 0).
fn moved(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, series: &str) -> f64 {
    after.get(series).copied().unwrap_or(0.0) - before.get(series).copied().unwrap_or(0.0)
}

#[test]
fn events_move_their_series_by_exactly_what_happened() {
    // Releases come back at once, so a redelivery needs no waiting for a backoff.
    let server = TestServer::start(&["--backoff-initial", "0s"]);
    server.register("worker", json!({}));
    server.register("slow", json!({"lease_ms": 200}));
    let before = scrape(&server);
    for n in 0..4 {
        server.publish("worker", json!({"n": n}));
    }
    let messages = server.receive("worker", json!({"max": 4, "wait_ms": 0}));
    assert_eq!(messages.len(), 4);
    let receipts = receipts(&messages);
    let (acked, rest) = receipts.split_at(2);
    let acked: Vec<&str> = acked.iter().map(String::as_str).collect();
    assert_eq!(
        server.settle("worker", "ack", json!({}), &acked),
        ["acked"; 2]
    );
    let nacked = [rest[0].as_str()];
    server.settle("worker", "nack", json!({}), &nacked);
    let rejected = [rest[1].as_str()];
    server.settle("worker", "nack", json!({"dead_letter": true}), &rejected);
    // A lease that runs out, then the redelivery of that message.
    server.publish("slow", json!({"late": true}));
    assert_eq!(server.receive("slow", json!({"wait_ms": 0})).len(), 1);
    let again = eventually(Duration::from_secs(10), "the lease to run out", || {
        // A long lease this time, so that it is still held at the scrape.
        let messages = server.receive("slow", json!({"wait_ms": 500, "lease_ms": 600_000}));
        (!messages.is_empty()).then_some(messages)
    });
    assert_eq!(again[0]["attempt"], 2);
    let after = scrape(&server);

    let expected = [
        ("courier_messages_published_total", 5.0),
        // 4 + the slow one twice.
        ("courier_deliveries_total", 6.0),
        ("courier_redeliveries_total", 1.0),
        ("courier_acks_total", 2.0),
        ("courier_nacks_total", 2.0),
        ("courier_lease_expirations_total", 1.0),
        ("courier_dead_letters_total{reason=\"rejected\"}", 1.0),
        ("courier_dead_letters_total{reason=\"max_attempts\"}", 0.0),
        ("courier_end_to_end_latency_seconds_count", 5.0),
        ("courier_publish_duration_seconds_count", 5.0),
        (
            "courier_http_requests_total{method=\"POST\",route=\"/v1/messages\",status=\"2xx\"}",
            5.0,
        ),
        ("courier_inbox_ready_messages{inbox=\"worker\"}", 1.0),
        ("courier_inbox_dead_letters{inbox=\"worker\"}", 1.0),
        ("courier_inbox_in_flight_messages{inbox=\"slow\"}", 1.0),
    ];
    for (series, by) in expected {
        assert!(after.contains_key(series), "{series} is not served");
        assert_eq!(moved(&before, &after, series), by, "{series}");
    }
    // Every durable write was fsynced (fsync = always): the histogram saw each fsync, and
    // each group commit with the records it made durable.
    let fsyncs = moved(&before, &after, "courier_log_fsyncs_total");
    assert!(fsyncs >= 5.0, "{fsyncs} fsyncs");
    assert_eq!(
        moved(&before, &after, "courier_fsync_duration_seconds_count"),
        fsyncs
    );
    assert!(moved(&before, &after, "courier_fsync_duration_seconds_sum") > 0.0);
    assert_eq!(
        moved(&before, &after, "courier_group_commit_records_sum"),
        moved(&before, &after, "courier_log_records_written_total")
    );
    assert_eq!(after["courier_ready"], 1.0);
    assert_eq!(
        after["courier_log_next_offset"],
        server.get("/v1/stats").json["log"]["next_offset"]
            .as_f64()
            .unwrap()
    );
}

#[test]
fn depth_series_are_bounded_and_sum_to_the_whole() {
    let server = TestServer::start(&["--metrics-max-agent-series", "2"]);
    for (agent, messages) in [("a", 3), ("b", 1), ("c", 2), ("d", 0)] {
        server.register(agent, json!({}));
        for n in 0..messages {
            server.publish(agent, json!({"n": n}));
        }
    }
    let samples = scrape(&server);
    let ready: BTreeMap<&str, f64> = samples
        .iter()
        .filter_map(|(series, value)| {
            let inbox = series
                .strip_prefix("courier_inbox_ready_messages{inbox=\"")?
                .strip_suffix("\"}")?;
            Some((inbox, *value))
        })
        .collect();
    // The two deepest by name, the rest summed.
    assert_eq!(
        ready,
        BTreeMap::from([("a", 3.0), ("c", 2.0), ("$other", 1.0)])
    );
}

#[test]
fn metrics_need_the_admin_token_unless_opened() {
    let admin = "metrics-admin-token-0123456789";
    let mut server = TestServer::unstarted(&["--auth-mode", "token"]);
    server.set_env("COURIER_ADMIN_TOKEN", Some(admin));
    server.restart();
    assert_eq!(server.get("/metrics").status, 401);
    let bearer = format!("Bearer {admin}");
    let response = server.raw(
        "GET",
        "/metrics",
        None,
        None,
        &[("authorization", bearer.as_str())],
    );
    assert_eq!(response.status, 200);
    assert!(response
        .text
        .lines()
        .any(|line| line == "courier_auth_failures_total{reason=\"unauthenticated\"} 1"));
    server.set_args(&["--auth-mode", "token", "--auth-metrics-open", "true"]);
    server.restart();
    assert_eq!(server.get("/metrics").status, 200);
}

/// Releases are told apart by who made them: a consumer's nack (also on the last attempt,
/// which dead-letters), a lease that ran out (also in a sweep that dead-letters another
/// message at the same time), a deleted agent's queue leases going back (neither).
#[test]
fn nacks_expiries_and_deletions_are_told_apart() {
    let server = TestServer::start(&["--backoff-initial", "0s"]);
    server.register("last", json!({"max_attempts": 1}));
    server.register("mixed", json!({"max_attempts": 2}));
    server.register("holder", json!({"capabilities": ["work"]}));
    let before = scrape(&server);

    // A nack on the last attempt dead-letters the message: a nack all the same.
    server.publish("last", json!(1));
    let messages = server.receive("last", json!({"wait_ms": 0}));
    let receipt = receipts(&messages);
    let nacked = server.settle("last", "nack", json!({}), &[receipt[0].as_str()]);
    assert_eq!(nacked, ["dead_lettered"]);

    // A deleted agent's queue lease goes back to the queue: not a nack.
    let queued = server.post(
        "/v1/messages",
        json!({"to": "capability:work", "from": "tester", "body": 2}),
    );
    assert_eq!(queued.status, 201, "{queued:?}");
    assert_eq!(server.receive("holder", json!({"wait_ms": 0})).len(), 1);
    assert_eq!(
        server.request("DELETE", "/v1/agents/holder", None).status,
        204
    );

    // One sweep both releases a lease (attempt 1 of 2) and dead-letters another message
    // (attempt 2 of 2): both leases were taken in one receive, so they end together.
    server.publish("mixed", json!("a"));
    assert_eq!(
        server
            .receive("mixed", json!({"wait_ms": 0, "lease_ms": 100}))
            .len(),
        1
    );
    eventually(
        Duration::from_secs(10),
        "the first lease to run out",
        || {
            let depth = &server.get("/v1/agents/mixed").json["inbox"];
            (depth["ready"] == 1).then_some(())
        },
    );
    server.publish("mixed", json!("b"));
    let both = server.receive("mixed", json!({"max": 2, "wait_ms": 0, "lease_ms": 300}));
    assert_eq!(both.len(), 2);
    eventually(Duration::from_secs(10), "both leases to run out", || {
        let depth = &server.get("/v1/agents/mixed").json["inbox"];
        (depth["dead_letters"] == 1 && depth["ready"] == 1).then_some(())
    });
    let after = scrape(&server);
    for (series, by) in [
        ("courier_nacks_total", 1.0),
        ("courier_dead_letters_total{reason=\"max_attempts\"}", 2.0),
        ("courier_lease_expirations_total", 2.0),
    ] {
        assert_eq!(moved(&before, &after, series), by, "{series}");
    }
}
