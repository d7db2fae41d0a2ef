//! T1: SIGKILL under load. Publishers and consumers (that ack, nack, or let leases run out)
//! run against the real binary while it is killed at random moments and restarted on the
//! same data directory; then everything is drained and checked, in Jepsen's terms:
//!
//! - **lost**: a publish answered 2xx whose message was never delivered: must be 0;
//! - **acked then redelivered**: a delivery with a higher attempt than one answered `acked`:
//!   must be 0 (a 2xx ack under `fsync=always` is never undone);
//! - **unexpected**: a delivered message nobody published: must be 0;
//! - **attempt reset**: the same attempt number delivered twice for one message: must be 0;
//! - **recovered / unknown**: publishes whose answer was lost to a kill that were / were not
//!   delivered (reported, both allowed).
//!
//! CI runs 20 kill cycles; `COURIER_SOAK=1` runs 200. The seed is printed; replay with
//! `COURIER_SEED`.
#![allow(
    clippy::disallowed_methods,
    reason = "the test paces its load and its kills with the clock"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{send, Rng, TestServer};

/// What the clients saw.
#[derive(Default)]
struct History {
    /// 2xx publishes: offset → (publisher, n).
    published: BTreeMap<u64, (u64, u64)>,
    /// Publishes whose answer never came (the server was killed): (publisher, n).
    unknown: BTreeSet<(u64, u64)>,
    /// Every delivery seen: (offset, attempt, publisher, n).
    delivered: Vec<(u64, u64, u64, u64)>,
    /// Receipts answered `acked`: offset → attempt.
    acked: BTreeMap<u64, u64>,
}

/// The outcome of a request to a server that may be killed at any moment.
enum Outcome {
    Answered(u16, Value),
    /// The connection was refused: the request never reached a server.
    NotSent,
    /// Sent, but no answer (killed meanwhile): it may or may not have taken effect.
    Unknown,
}

fn request(addr: &RwLock<SocketAddr>, path: &str, body: &Value) -> Outcome {
    let addr = *addr.read().unwrap();
    let bytes = serde_json::to_vec(body).unwrap();
    match send(
        addr,
        "POST",
        path,
        Some(&bytes),
        Some("application/json"),
        &[],
    ) {
        Ok(r) => Outcome::Answered(r.status, r.json),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Outcome::NotSent,
        Err(_) => Outcome::Unknown,
    }
}

fn post(addr: &RwLock<SocketAddr>, path: &str, body: &Value) -> Option<(u16, Value)> {
    match request(addr, path, body) {
        Outcome::Answered(status, json) => Some((status, json)),
        Outcome::NotSent | Outcome::Unknown => None,
    }
}

fn publisher(id: u64, addr: &RwLock<SocketAddr>, stop: &AtomicBool, history: &Mutex<History>) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let body = json!({"to": "agent:worker", "from": "publisher", "body": {"p": id, "n": n}});
        match request(addr, "/v1/messages", &body) {
            Outcome::Answered(201, reply) => {
                let offset = reply["offset"].as_u64().expect("offset");
                history.lock().unwrap().published.insert(offset, (id, n));
            }
            Outcome::Answered(status, reply) => panic!("publish answered {status}: {reply}"),
            Outcome::Unknown => {
                history.lock().unwrap().unknown.insert((id, n));
            }
            Outcome::NotSent => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Receives and settles: acks most, nacks some, lets some leases run out. With `drain`, acks
/// everything.
fn consume_once(
    addr: &RwLock<SocketAddr>,
    rng: &mut Rng,
    drain: bool,
    history: &Mutex<History>,
) -> usize {
    let Some((200, reply)) = post(
        addr,
        "/v1/agents/worker/receive",
        &json!({"max": 10, "wait_ms": 200}),
    ) else {
        std::thread::sleep(Duration::from_millis(5));
        return 0;
    };
    let messages = reply["messages"].as_array().expect("messages").clone();
    let mut ack = Vec::new();
    let mut nack = Vec::new();
    {
        let mut h = history.lock().unwrap();
        for m in &messages {
            let offset = m["offset"].as_u64().unwrap();
            let attempt = m["attempt"].as_u64().unwrap();
            let (p, n) = (
                m["body"]["p"].as_u64().unwrap(),
                m["body"]["n"].as_u64().unwrap(),
            );
            h.delivered.push((offset, attempt, p, n));
            let receipt = m["receipt"].as_str().unwrap().to_owned();
            match (drain, rng.next() % 10) {
                (true, _) | (false, 0..=6) => ack.push((offset, attempt, receipt)),
                (false, 7) => nack.push(receipt),
                _ => {} // let the lease run out
            }
        }
    }
    if !nack.is_empty() {
        let _ = post(addr, "/v1/agents/worker/nack", &json!({"receipts": nack}));
    }
    if !ack.is_empty() {
        let receipts: Vec<&str> = ack.iter().map(|(_, _, r)| r.as_str()).collect();
        if let Some((200, reply)) = post(
            addr,
            "/v1/agents/worker/ack",
            &json!({"receipts": receipts}),
        ) {
            let mut h = history.lock().unwrap();
            for ((offset, attempt, _), result) in
                ack.iter().zip(reply["results"].as_array().unwrap())
            {
                if result["status"] == "acked" {
                    h.acked.insert(*offset, *attempt);
                }
            }
        }
    }
    messages.len()
}

fn check(history: &History, seed: u64) {
    let mut delivered_offsets = BTreeSet::new();
    let mut attempts: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    let mut delivered_ids = BTreeSet::new();
    let mut unexpected = 0;
    let mut resets = Vec::new();
    let mut acked_then_redelivered = Vec::new();
    for &(offset, attempt, p, n) in &history.delivered {
        delivered_offsets.insert(offset);
        delivered_ids.insert((p, n));
        let known =
            history.published.get(&offset) == Some(&(p, n)) || history.unknown.contains(&(p, n));
        if !known {
            unexpected += 1;
        }
        if !attempts.entry(offset).or_default().insert(attempt) {
            resets.push((offset, attempt));
        }
        if history
            .acked
            .get(&offset)
            .is_some_and(|acked| attempt > *acked)
        {
            acked_then_redelivered.push((offset, attempt));
        }
    }
    let lost: Vec<u64> = history
        .published
        .keys()
        .filter(|o| !delivered_offsets.contains(o))
        .copied()
        .collect();
    let recovered = history
        .unknown
        .iter()
        .filter(|id| delivered_ids.contains(id))
        .count();
    let redeliveries = history.delivered.len() - delivered_offsets.len();
    println!(
        "T1 seed {seed}: {} acknowledged publishes, {} deliveries ({redeliveries} redeliveries), {} acks; \
         lost {}, acked-then-redelivered {}, unexpected {unexpected}, attempt resets {}; \
         unknown publishes {}: recovered {recovered}, not delivered {}",
        history.published.len(),
        history.delivered.len(),
        history.acked.len(),
        lost.len(),
        acked_then_redelivered.len(),
        resets.len(),
        history.unknown.len(),
        history.unknown.len() - recovered,
    );
    assert!(lost.is_empty(), "seed {seed}: lost {lost:?}");
    assert!(
        acked_then_redelivered.is_empty(),
        "seed {seed}: acked then redelivered {acked_then_redelivered:?}"
    );
    assert_eq!(unexpected, 0, "seed {seed}: unexpected deliveries");
    assert!(
        resets.is_empty(),
        "seed {seed}: attempt numbers delivered twice {resets:?}"
    );
}

/// Acks everything until the inbox is empty. (An ack whose answer a kill swallowed may have
/// taken effect: those messages are done without an `acked` answer.)
fn drain(server: &TestServer, addr: &RwLock<SocketAddr>, seed: u64, history: &Mutex<History>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut rng = Rng(seed ^ 99);
    loop {
        let inbox = server.get("/v1/agents/worker").json["inbox"].clone();
        if inbox["ready"] == json!(0) && inbox["in_flight"] == json!(0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the inbox does not drain: {inbox}"
        );
        consume_once(addr, &mut rng, true, history);
    }
}

#[test]
fn sigkill_under_load_loses_nothing_acknowledged() {
    let soak = std::env::var_os("COURIER_SOAK").is_some();
    let cycles = if soak { 200 } else { 20 };
    let seed = std::env::var("COURIER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| u64::from(std::process::id()) * 7919 + 17);
    let mut rng = Rng(seed);
    let mut server = TestServer::start(&[
        "--lease",
        "300ms",
        "--backoff-initial",
        "20ms",
        "--backoff-max",
        "100ms",
        "--max-attempts",
        "1000",
    ]);
    server.register("worker", json!({}));
    let addr = Arc::new(RwLock::new(server.addr));
    let history = Arc::new(Mutex::new(History::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for id in 0..3 {
        let (addr, stop, history) = (addr.clone(), stop.clone(), history.clone());
        threads.push(std::thread::spawn(move || {
            publisher(id, &addr, &stop, &history)
        }));
    }
    for c in 0..2 {
        let (addr, stop, history, received) = (
            addr.clone(),
            stop.clone(),
            history.clone(),
            received.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(seed ^ (c + 1));
            while !stop.load(Ordering::Relaxed) {
                let n = consume_once(&addr, &mut rng, false, &history);
                received.fetch_add(n as u64, Ordering::Relaxed);
            }
        }));
    }
    for _ in 0..cycles {
        std::thread::sleep(Duration::from_millis(100 + rng.next() % 300));
        server.kill9();
        server.restart();
        *addr.write().unwrap() = server.addr;
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("client thread");
    }
    drain(&server, &addr, seed, &history);
    assert!(
        received.load(Ordering::Relaxed) > 0,
        "the consumers received nothing under load"
    );
    check(&history.lock().unwrap(), seed);
}
