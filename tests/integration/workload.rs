//! The crash tests' workload and checker: publishers (to an agent, to a capability queue and
//! to a topic with two subscribers, a third of the messages with ordering keys), consumers
//! (two agents that declare the capability and subscribe to the topic) that ack, nack,
//! extend, dead-letter or abandon what they receive, and a redriver of every inbox's and the
//! queue's dead letters, all against a server that may die at any moment; then a drain, and
//! a check of the history in Jepsen's terms, per inbox (an agent's, or the queue):
//!
//! - **lost**: a publish answered 2xx whose message was not delivered in as many inboxes as
//!   it was routed to (`destinations`): must be 0;
//! - **acked then redelivered**: a delivery in an inbox after an ack there answered `acked`
//!   (a higher attempt, or for a redriven message any delivery seen after the ack): must be
//!   0, since a 2xx ack under `fsync=always` is never undone;
//! - **unexpected**: a delivered message nobody published: must be 0;
//! - **attempt reset**: the same attempt number delivered twice in an inbox for a message
//!   that was never redriven there (redrive resets attempts on purpose): must be 0;
//! - **out of order**: in an inbox, a keyed message first delivered before an earlier one of
//!   its key (the next of a key is leased only after the one before is settled): must be 0;
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

/// The consuming agents: each declares the capability and subscribes to the topic.
const AGENTS: [&str; 2] = ["worker", "helper"];
/// The capability, and its queue's inbox name.
const CAPABILITY: &str = "work";
const QUEUE: &str = "capability:work";

/// (inbox, offset): a message's place in one inbox or in the queue.
type Place = (String, u64);

/// One delivery seen: where, the attempt, the publisher and number, and the ordering key.
#[derive(Clone)]
struct Seen {
    place: Place,
    attempt: u64,
    id: (u64, u64),
    key: Option<String>,
}

/// What the clients saw.
#[derive(Default)]
pub struct History {
    /// 2xx publishes: offset → (publisher, n, destinations).
    published: BTreeMap<u64, (u64, u64, u64)>,
    /// Publishes whose answer never came (the server died meanwhile): (publisher, n).
    unknown: BTreeSet<(u64, u64)>,
    /// Every delivery seen, in the order seen.
    delivered: Vec<Seen>,
    /// Receipts answered `acked`: place → (attempt, deliveries seen before the answer).
    acked: BTreeMap<Place, (u64, usize)>,
    /// Places asked to be redriven (whether or not the answer came).
    redriven: BTreeSet<Place>,
}

/// Registers the consuming agents with the capability and subscribes them to the topic:
/// idempotent, so it can be repeated after a power cut that lost them.
pub fn setup(server: &TestServer) {
    for agent in AGENTS {
        server.register(agent, json!({"capabilities": [CAPABILITY]}));
        let path = format!("/v1/agents/{agent}/subscriptions/events.%3E");
        let response = server.put(&path, json!({}));
        assert!(matches!(response.status, 200 | 201), "{response:?}");
    }
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

/// The `n`th message of publisher `id`: to the worker, the queue or the topic, in turn; a
/// third of them with one of eight ordering keys.
fn message(id: u64, n: u64) -> Value {
    let to = match n % 4 {
        0 | 1 => "agent:worker".to_owned(),
        2 => QUEUE.to_owned(),
        _ => format!("topic:events.p{id}"),
    };
    let mut body = json!({"to": to, "from": "publisher", "body": {"p": id, "n": n}});
    if n.is_multiple_of(3) {
        body["ordering_key"] = json!(format!("k{}", n % 8));
    }
    body
}

fn publisher(id: u64, addr: &RwLock<SocketAddr>, stop: &AtomicBool, history: &Mutex<History>) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let body = message(id, n);
        match request(addr, "POST", "/v1/messages", Some(&body)) {
            Outcome::Answered(201, reply) => {
                let offset = reply["offset"].as_u64().expect("offset");
                let destinations = reply["destinations"].as_u64().expect("destinations");
                let published = &mut history.lock().unwrap().published;
                published.insert(offset, (id, n, destinations));
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

/// Receives once as `agent` (its inbox and the queue) and settles each delivery by its
/// fate; with `drain`, acks everything. Returns how many messages it received.
fn consume_once(
    addr: &RwLock<SocketAddr>,
    agent: &str,
    rng: &mut Rng,
    drain: bool,
    history: &Mutex<History>,
) -> usize {
    // Draining, nothing is published any more: no need to wait for more.
    let wait_ms = if drain { 0 } else { 200 };
    let Some((200, reply)) = post(
        addr,
        &format!("/v1/agents/{agent}/receive"),
        &json!({"max": 10, "wait_ms": wait_ms}),
    ) else {
        std::thread::sleep(Duration::from_millis(5));
        return 0;
    };
    let messages = reply["messages"].as_array().expect("messages").clone();
    let mut by_fate: BTreeMap<u8, Vec<(Place, u64, String)>> = BTreeMap::new();
    {
        let mut h = history.lock().unwrap();
        for m in &messages {
            let receipt = m["receipt"].as_str().unwrap().to_owned();
            let inbox = if receipt.contains('@') { QUEUE } else { agent };
            let seen = Seen {
                place: (inbox.to_owned(), m["offset"].as_u64().unwrap()),
                attempt: m["attempt"].as_u64().unwrap(),
                id: (
                    m["body"]["p"].as_u64().unwrap(),
                    m["body"]["n"].as_u64().unwrap(),
                ),
                key: m["ordering_key"].as_str().map(str::to_owned),
            };
            let fate = if drain { Fate::Ack } else { fate(rng) };
            by_fate.entry(fate as u8).or_default().push((
                seen.place.clone(),
                seen.attempt,
                receipt,
            ));
            h.delivered.push(seen);
        }
    }
    let receipts = |fate: Fate| -> Vec<(Place, u64, String)> {
        by_fate.get(&(fate as u8)).cloned().unwrap_or_default()
    };
    let only = |list: &[(Place, u64, String)]| -> Vec<String> {
        list.iter().map(|(_, _, r)| r.clone()).collect()
    };
    let settle = |verb: &str, body: Value| {
        let _ = post(addr, &format!("/v1/agents/{agent}/{verb}"), &body);
    };
    let nack = receipts(Fate::Nack);
    if !nack.is_empty() {
        settle("nack", json!({"receipts": only(&nack)}));
    }
    let dead = receipts(Fate::DeadLetter);
    if !dead.is_empty() {
        settle(
            "nack",
            json!({"receipts": only(&dead), "dead_letter": true}),
        );
    }
    let extend = receipts(Fate::ExtendThenAck);
    if !extend.is_empty() {
        settle(
            "extend",
            json!({"receipts": only(&extend), "lease_ms": 500}),
        );
    }
    let mut ack = receipts(Fate::Ack);
    ack.extend(extend);
    if !ack.is_empty() {
        ack_all(addr, agent, &ack, history);
    }
    messages.len()
}

fn ack_all(
    addr: &RwLock<SocketAddr>,
    agent: &str,
    ack: &[(Place, u64, String)],
    history: &Mutex<History>,
) {
    let receipts: Vec<&str> = ack.iter().map(|(_, _, r)| r.as_str()).collect();
    let Some((200, reply)) = post(
        addr,
        &format!("/v1/agents/{agent}/ack"),
        &json!({"receipts": receipts}),
    ) else {
        return;
    };
    let mut h = history.lock().unwrap();
    let seen = h.delivered.len();
    for ((place, attempt, _), result) in ack.iter().zip(reply["results"].as_array().unwrap()) {
        if result["status"] == "acked" {
            h.acked.insert(place.clone(), (*attempt, seen));
        }
    }
}

/// The path of an inbox's (or the queue's) dead letters.
fn dead_letters_path(inbox: &str) -> String {
    match inbox.strip_prefix("capability:") {
        Some(capability) => format!("/v1/capabilities/{capability}/dead-letters"),
        None => format!("/v1/agents/{inbox}/dead-letters"),
    }
}

/// Lists the dead letters of every inbox and the queue and redrives them; returns how many
/// it asked for.
fn redrive_all(addr: &RwLock<SocketAddr>, history: &Mutex<History>) -> usize {
    AGENTS
        .into_iter()
        .chain([QUEUE])
        .map(|inbox| redrive_once(addr, inbox, history))
        .sum()
}

/// Lists the dead letters of `inbox` and redrives them; returns how many it asked for.
fn redrive_once(addr: &RwLock<SocketAddr>, inbox: &str, history: &Mutex<History>) -> usize {
    let path = format!("{}?limit=100", dead_letters_path(inbox));
    let Outcome::Answered(200, reply) = request(addr, "GET", &path, None) else {
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
    let places = offsets.iter().map(|o| (inbox.to_owned(), *o));
    history.lock().unwrap().redriven.extend(places);
    let path = format!("{}/redrive", dead_letters_path(inbox));
    let _ = post(addr, &path, &json!({"offsets": offsets}));
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
    /// Registers the agents (see [`setup`]) and starts 3 publishers, a consumer per agent
    /// and a redriver.
    pub fn start(server: &TestServer, seed: u64) -> Self {
        setup(server);
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
        for (c, agent) in (1..).zip(AGENTS) {
            let (addr, stop, history) = load.handles();
            let received = load.received.clone();
            load.threads.push(std::thread::spawn(move || {
                let mut rng = Rng(seed ^ c);
                while !stop.load(Ordering::Relaxed) {
                    let n = consume_once(&addr, agent, &mut rng, false, &history);
                    received.fetch_add(n as u64, Ordering::Relaxed);
                }
            }));
        }
        let (addr, stop, history) = load.handles();
        load.threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                redrive_all(&addr, &history);
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

    /// Acks everything until the inboxes, the queue and their dead letters are empty. (An
    /// ack whose answer a crash swallowed may have taken effect: those messages are done
    /// without an `acked`.)
    fn drain(&self, server: &TestServer) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut rng = Rng(self.seed ^ 99);
        loop {
            let mut left: Vec<Value> = AGENTS
                .iter()
                .map(|a| server.get(&format!("/v1/agents/{a}")).json["inbox"].clone())
                .collect();
            left.push(server.get(&format!("/v1/capabilities/{CAPABILITY}")).json);
            let empty = left.iter().all(|depth| {
                ["ready", "in_flight", "dead_letters"]
                    .iter()
                    .all(|k| depth[*k] == json!(0))
            });
            if empty {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the inboxes do not drain: {left:?}\n{}",
                server.logs()
            );
            redrive_all(&self.addr, &self.history);
            // Each receive frees the next message of its ordering keys: take them all.
            for agent in AGENTS {
                while consume_once(&self.addr, agent, &mut rng, true, &self.history) > 0 {}
            }
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
    /// Keyed messages first delivered before an earlier one of their key, in one inbox:
    /// (offset, the earlier offset).
    pub out_of_order: Vec<(u64, u64)>,
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
        assert!(
            self.out_of_order.is_empty(),
            "seed {seed}: keyed messages delivered out of order {:?}",
            self.out_of_order
        );
    }
}

fn tally(history: &History, name: &str, seed: u64) -> Tally {
    let mut inboxes: BTreeMap<u64, BTreeSet<&str>> = BTreeMap::new();
    let mut attempts: BTreeMap<&Place, BTreeSet<u64>> = BTreeMap::new();
    let mut delivered_ids = BTreeSet::new();
    let mut unexpected = 0;
    let mut resets = Vec::new();
    let mut acked_then_redelivered = Vec::new();
    // Per (inbox, key): the highest offset first delivered so far.
    let mut key_heads: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    let mut out_of_order = Vec::new();
    for (seen, d) in history.delivered.iter().enumerate() {
        let (inbox, offset) = (&d.place.0, d.place.1);
        delivered_ids.insert(d.id);
        let known = history.published.get(&offset).map(|&(p, n, _)| (p, n)) == Some(d.id)
            || history.unknown.contains(&d.id);
        if !known {
            unexpected += 1;
        }
        let redriven = history.redriven.contains(&d.place);
        let first = !attempts.contains_key(&d.place);
        if !attempts.entry(&d.place).or_default().insert(d.attempt) && !redriven {
            resets.push((offset, d.attempt));
        }
        if let (true, Some(key)) = (first, d.key.as_deref()) {
            let head = key_heads.entry((inbox, key)).or_insert(offset);
            if *head > offset {
                out_of_order.push((offset, *head));
            }
            *head = (*head).max(offset);
        }
        inboxes.entry(offset).or_default().insert(inbox);
        if let Some(&(acked, before)) = history.acked.get(&d.place) {
            let again = if redriven {
                seen >= before
            } else {
                d.attempt > acked
            };
            if again {
                acked_then_redelivered.push((offset, d.attempt));
            }
        }
    }
    let lost: Vec<u64> = history
        .published
        .iter()
        .filter(|(o, (_, _, destinations))| {
            inboxes.get(o).map_or(0, |i| i.len() as u64) < *destinations
        })
        .map(|(o, _)| *o)
        .collect();
    let tally = Tally {
        seed,
        lost,
        acked_then_redelivered,
        unexpected,
        resets,
        out_of_order,
    };
    let recovered = history
        .unknown
        .iter()
        .filter(|id| delivered_ids.contains(id))
        .count();
    report(history, name, &tally, attempts.len(), recovered);
    tally
}

/// Prints the tally's line: the figures and the history's size.
fn report(history: &History, name: &str, tally: &Tally, places: usize, recovered: usize) {
    let redeliveries = history.delivered.len() - places;
    println!(
        "{name} seed {}: {} acknowledged publishes, {} deliveries ({redeliveries} redeliveries), \
         {} acks, {} redriven; lost {}, acked-then-redelivered {}, unexpected {}, \
         attempt resets {}, out of order {}; unknown publishes {}: recovered {recovered}, \
         not delivered {}",
        tally.seed,
        history.published.len(),
        history.delivered.len(),
        history.acked.len(),
        history.redriven.len(),
        tally.lost.len(),
        tally.acked_then_redelivered.len(),
        tally.unexpected,
        tally.resets.len(),
        tally.out_of_order.len(),
        history.unknown.len(),
        history.unknown.len() - recovered,
    );
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
