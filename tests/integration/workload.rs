//! The crash tests' workload and checker: publishers, consumers that ack, nack, extend,
//! dead-letter or abandon what they receive, and a redriver, all against a server that may
//! die at any moment; then a drain, and a check of the history in Jepsen's terms:
//!
//! - **lost**: a publish answered 2xx whose message was never delivered: must be 0;
//! - **acked then redelivered**: a delivery after an ack answered `acked` (a higher attempt,
//!   or for a redriven message any delivery seen after the ack): must be 0, since a 2xx ack
//!   under `fsync=always` is never undone;
//! - **unexpected**: a delivered message nobody published: must be 0;
//! - **attempt reset**: the same attempt number delivered twice for a message that was never
//!   redriven (redrive resets attempts on purpose): must be 0;
//! - **recovered / unknown**: publishes whose answer was lost to a crash that were / were
//!   not delivered (reported, both allowed).
#![allow(
    clippy::disallowed_methods,
    reason = "the workload paces itself and bounds its drain with the clock"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{send, Rng, TestServer};

/// The agent every message goes to.
const WORKER: &str = "worker";

/// What the clients saw.
#[derive(Default)]
pub struct History {
    /// 2xx publishes: offset → (publisher, n).
    published: BTreeMap<u64, (u64, u64)>,
    /// Publishes whose answer never came (the server died meanwhile): (publisher, n).
    unknown: BTreeSet<(u64, u64)>,
    /// Every delivery seen, in the order seen: (offset, attempt, publisher, n).
    delivered: Vec<(u64, u64, u64, u64)>,
    /// Receipts answered `acked`: offset → (attempt, deliveries seen before the answer).
    acked: BTreeMap<u64, (u64, usize)>,
    /// Offsets asked to be redriven (whether or not the answer came).
    redriven: BTreeSet<u64>,
}

/// The outcome of a request to a server that may die at any moment.
enum Outcome {
    Answered(u16, Value),
    /// The connection was refused: the request never reached a server.
    NotSent,
    /// Sent, but no answer (killed meanwhile): it may or may not have taken effect.
    Unknown,
}

fn request(addr: &RwLock<SocketAddr>, method: &str, path: &str, body: Option<&Value>) -> Outcome {
    let addr = *addr.read().unwrap();
    let bytes = body.map(|b| serde_json::to_vec(b).unwrap());
    match send(
        addr,
        method,
        path,
        bytes.as_deref(),
        Some("application/json"),
        &[],
    ) {
        Ok(r) => Outcome::Answered(r.status, r.json),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Outcome::NotSent,
        Err(_) => Outcome::Unknown,
    }
}

fn post(addr: &RwLock<SocketAddr>, path: &str, body: &Value) -> Option<(u16, Value)> {
    match request(addr, "POST", path, Some(body)) {
        Outcome::Answered(status, json) => Some((status, json)),
        Outcome::NotSent | Outcome::Unknown => None,
    }
}

fn publisher(id: u64, addr: &RwLock<SocketAddr>, stop: &AtomicBool, history: &Mutex<History>) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let body = json!({"to": "agent:worker", "from": "publisher", "body": {"p": id, "n": n}});
        match request(addr, "POST", "/v1/messages", Some(&body)) {
            Outcome::Answered(201, reply) => {
                let offset = reply["offset"].as_u64().expect("offset");
                history.lock().unwrap().published.insert(offset, (id, n));
            }
            // The server is shutting down or failed a write: the outcome is unknown.
            Outcome::Answered(503, _) | Outcome::Unknown => {
                history.lock().unwrap().unknown.insert((id, n));
            }
            Outcome::Answered(status, reply) => panic!("publish answered {status}: {reply}"),
            Outcome::NotSent => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// What a consumer does with one delivery.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fate {
    Ack,
    ExtendThenAck,
    Nack,
    DeadLetter,
    Abandon,
}

fn fate(rng: &mut Rng) -> Fate {
    match rng.below(20) {
        0..=11 => Fate::Ack,
        12..=13 => Fate::ExtendThenAck,
        14..=15 => Fate::Nack,
        16 => Fate::DeadLetter,
        _ => Fate::Abandon,
    }
}

/// Receives once and settles each delivery by its fate; with `drain`, acks everything.
/// Returns how many messages it received.
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
    let mut by_fate: BTreeMap<u8, Vec<(u64, u64, String)>> = BTreeMap::new();
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
            let fate = if drain { Fate::Ack } else { fate(rng) };
            by_fate
                .entry(fate as u8)
                .or_default()
                .push((offset, attempt, receipt));
        }
    }
    let receipts = |fate: Fate| -> Vec<(u64, u64, String)> {
        by_fate.get(&(fate as u8)).cloned().unwrap_or_default()
    };
    let only = |list: &[(u64, u64, String)]| -> Vec<String> {
        list.iter().map(|(_, _, r)| r.clone()).collect()
    };
    let nack = receipts(Fate::Nack);
    if !nack.is_empty() {
        let _ = post(
            addr,
            "/v1/agents/worker/nack",
            &json!({"receipts": only(&nack)}),
        );
    }
    let dead = receipts(Fate::DeadLetter);
    if !dead.is_empty() {
        let body = json!({"receipts": only(&dead), "dead_letter": true});
        let _ = post(addr, "/v1/agents/worker/nack", &body);
    }
    let extend = receipts(Fate::ExtendThenAck);
    if !extend.is_empty() {
        let body = json!({"receipts": only(&extend), "lease_ms": 500});
        let _ = post(addr, "/v1/agents/worker/extend", &body);
    }
    let mut ack = receipts(Fate::Ack);
    ack.extend(extend);
    if !ack.is_empty() {
        ack_all(addr, &ack, history);
    }
    messages.len()
}

fn ack_all(addr: &RwLock<SocketAddr>, ack: &[(u64, u64, String)], history: &Mutex<History>) {
    let receipts: Vec<&str> = ack.iter().map(|(_, _, r)| r.as_str()).collect();
    let Some((200, reply)) = post(
        addr,
        "/v1/agents/worker/ack",
        &json!({"receipts": receipts}),
    ) else {
        return;
    };
    let mut h = history.lock().unwrap();
    let seen = h.delivered.len();
    for ((offset, attempt, _), result) in ack.iter().zip(reply["results"].as_array().unwrap()) {
        if result["status"] == "acked" {
            h.acked.insert(*offset, (*attempt, seen));
        }
    }
}

/// Lists the dead letters and redrives them; returns how many it asked for.
fn redrive_once(addr: &RwLock<SocketAddr>, history: &Mutex<History>) -> usize {
    let Outcome::Answered(200, reply) = request(
        addr,
        "GET",
        "/v1/agents/worker/dead-letters?limit=100",
        None,
    ) else {
        return 0;
    };
    let offsets: Vec<u64> = reply["dead_letters"]
        .as_array()
        .expect("dead_letters")
        .iter()
        .map(|d| d["offset"].as_u64().expect("offset"))
        .collect();
    if offsets.is_empty() {
        return 0;
    }
    history
        .lock()
        .unwrap()
        .redriven
        .extend(offsets.iter().copied());
    let _ = post(
        addr,
        "/v1/agents/worker/dead-letters/redrive",
        &json!({"offsets": offsets}),
    );
    offsets.len()
}

/// The clients, running on their own threads against whatever server `addr` names.
pub struct Load {
    /// Where the clients send; update it when the server restarts on a new port.
    pub addr: Arc<RwLock<SocketAddr>>,
    history: Arc<Mutex<History>>,
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
    seed: u64,
}

impl Load {
    /// Registers the worker agent and starts 3 publishers, 2 consumers and a redriver.
    pub fn start(server: &TestServer, seed: u64) -> Self {
        server.register(WORKER, json!({}));
        let mut load = Self {
            addr: Arc::new(RwLock::new(server.addr)),
            history: Arc::default(),
            stop: Arc::default(),
            received: Arc::default(),
            threads: Vec::new(),
            seed,
        };
        for id in 0..3 {
            let (addr, stop, history) = load.handles();
            load.threads.push(std::thread::spawn(move || {
                publisher(id, &addr, &stop, &history);
            }));
        }
        for c in 0..2 {
            let (addr, stop, history) = load.handles();
            let received = load.received.clone();
            load.threads.push(std::thread::spawn(move || {
                let mut rng = Rng(seed ^ (c + 1));
                while !stop.load(Ordering::Relaxed) {
                    let n = consume_once(&addr, &mut rng, false, &history);
                    received.fetch_add(n as u64, Ordering::Relaxed);
                }
            }));
        }
        let (addr, stop, history) = load.handles();
        load.threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                redrive_once(&addr, &history);
                std::thread::sleep(Duration::from_millis(250));
            }
        }));
        load
    }

    fn handles(
        &self,
    ) -> (
        Arc<RwLock<SocketAddr>>,
        Arc<AtomicBool>,
        Arc<Mutex<History>>,
    ) {
        (self.addr.clone(), self.stop.clone(), self.history.clone())
    }

    /// Points the clients at the server's current address.
    pub fn follow(&self, server: &TestServer) {
        *self.addr.write().unwrap() = server.addr;
    }

    /// Stops the clients, drains the inbox (redriving dead letters, acking everything) and
    /// tallies the history, printing a report line labelled `name`.
    pub fn finish(mut self, server: &TestServer, name: &str) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().expect("client thread");
        }
        assert!(
            self.received.load(Ordering::Relaxed) > 0,
            "the consumers received nothing under load"
        );
        self.drain(server);
        tally(&self.history.lock().unwrap(), name, self.seed)
    }

    /// Acks everything until the inbox and its dead letters are empty. (An ack whose answer
    /// a crash swallowed may have taken effect: those messages are done without an `acked`.)
    fn drain(&self, server: &TestServer) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut rng = Rng(self.seed ^ 99);
        loop {
            let inbox = server.get("/v1/agents/worker").json["inbox"].clone();
            let empty = ["ready", "in_flight", "dead_letters"]
                .iter()
                .all(|k| inbox[k] == json!(0));
            if empty {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the inbox does not drain: {inbox}"
            );
            redrive_once(&self.addr, &self.history);
            consume_once(&self.addr, &mut rng, true, &self.history);
        }
    }
}

/// What the checker found; [`Tally::assert_clean`] for the tests that expect nothing.
pub struct Tally {
    seed: u64,
    /// 2xx publishes never delivered.
    pub lost: Vec<u64>,
    /// Deliveries after an `acked` answer: (offset, attempt).
    pub acked_then_redelivered: Vec<(u64, u64)>,
    /// Deliveries of messages nobody published.
    pub unexpected: usize,
    /// Attempt numbers delivered twice (never-redriven messages): (offset, attempt).
    pub resets: Vec<(u64, u64)>,
}

impl Tally {
    /// Panics, naming the seed, unless every figure is 0.
    pub fn assert_clean(&self) {
        let seed = self.seed;
        assert!(self.lost.is_empty(), "seed {seed}: lost {:?}", self.lost);
        assert!(
            self.acked_then_redelivered.is_empty(),
            "seed {seed}: acked then redelivered {:?}",
            self.acked_then_redelivered
        );
        assert_eq!(self.unexpected, 0, "seed {seed}: unexpected deliveries");
        assert!(
            self.resets.is_empty(),
            "seed {seed}: attempt numbers delivered twice {:?}",
            self.resets
        );
    }
}

fn tally(history: &History, name: &str, seed: u64) -> Tally {
    let mut delivered_offsets = BTreeSet::new();
    let mut attempts: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    let mut delivered_ids = BTreeSet::new();
    let mut unexpected = 0;
    let mut resets = Vec::new();
    let mut acked_then_redelivered = Vec::new();
    for (seen, &(offset, attempt, p, n)) in history.delivered.iter().enumerate() {
        delivered_offsets.insert(offset);
        delivered_ids.insert((p, n));
        let known =
            history.published.get(&offset) == Some(&(p, n)) || history.unknown.contains(&(p, n));
        if !known {
            unexpected += 1;
        }
        let redriven = history.redriven.contains(&offset);
        if !attempts.entry(offset).or_default().insert(attempt) && !redriven {
            resets.push((offset, attempt));
        }
        if let Some(&(acked, before)) = history.acked.get(&offset) {
            let again = if redriven {
                seen >= before
            } else {
                attempt > acked
            };
            if again {
                acked_then_redelivered.push((offset, attempt));
            }
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
        "{name} seed {seed}: {} acknowledged publishes, {} deliveries ({redeliveries} redeliveries), \
         {} acks, {} redriven; lost {}, acked-then-redelivered {}, unexpected {unexpected}, \
         attempt resets {}; unknown publishes {}: recovered {recovered}, not delivered {}",
        history.published.len(),
        history.delivered.len(),
        history.acked.len(),
        history.redriven.len(),
        lost.len(),
        acked_then_redelivered.len(),
        resets.len(),
        history.unknown.len(),
        history.unknown.len() - recovered,
    );
    Tally {
        seed,
        lost,
        acked_then_redelivered,
        unexpected,
        resets,
    }
}

/// The server flags the workload is written for, plus `extra`: leases of 300 ms, so that
/// abandoned deliveries come back quickly, and a short backoff.
pub fn flags<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut flags = vec![
        "--lease",
        "300ms",
        "--backoff-initial",
        "20ms",
        "--backoff-max",
        "100ms",
    ];
    flags.extend_from_slice(extra);
    flags
}

/// The seed of a seeded test: `COURIER_SEED` to replay, else a new one (printed by the check).
pub fn seed() -> u64 {
    std::env::var("COURIER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| u64::from(std::process::id()) * 7919 + 17)
}
