//! T10: seeded random sequences of publish (to agents, to topics and to a capability queue,
//! some with client ids, so with duplicates, some with ordering keys) / subscribe / unsubscribe / declaring or dropping
//! the capability / receive (merging an agent's inbox with the queue) / ack / nack / extend /
//! time passing and sweeps / redrive / checkpoint / power loss, over several inboxes, driven
//! through the
//! broker's real commit path (`Broker::publish`, `subscribe`, `unsubscribe`, `receive`,
//! `settle`, `sweep`, `redrive`, with a manual clock) on the
//! real storage engine (on `SimDisk`, so a crash is a power loss), and checked after every
//! step against a small reference model written independently of the core.
//!
//! A crash drops the broker with its log, skipping the closing checkpoint (as a crash leaves
//! the index: at its last checkpoint), tears the simulated disk, reopens the log and builds
//! a new broker, exactly as the server's start-up does. Checked: every answer (offsets and
//! duplicates, topic destinations, leases and attempts, settle outcomes, redrive counts)
//! equals the model's, and so do every agent's subscriptions and the delivery state of every
//! message in every inbox and in the queue, with the agent holding each queue lease (so
//! attempt counts never reset); every `max_attempts` dead letter had exactly `max_attempts` deliveries; nothing
//! is both acked and dead-lettered.
//!
//! CI runs 1,000 seeds; `COURIER_SOAK=1` runs 100,000. A failure prints its seed; replay it
//! with `COURIER_SEED=<seed>`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use courier::broker::Start;
use courier::broker::{Broker, InboxRef, Outgoing, ReceiveRequest, Refusal};
use courier::clock::Clock;
use courier::config::{Backoff, Config, RawConfig};
use courier::delivery::{backoff, Outcome, Settle};
use courier::ids::{Address, AgentId, CapabilityName, TopicName, TopicPattern};
use courier_storage::index::{DeadEntry, EntryState, EntryValue};
use courier_storage::sim::{SimDisk, TEAR_MODES};
use courier_storage::{Agent, DeadReason, FsyncPolicy, Log, LogOptions, Message, Offset, Slot};

use crate::support::Rng;

/// The inboxes of the model.
const AGENTS: [&str; 3] = ["w0", "w1", "w2"];
/// An agent outside the model: a publish to it after a sweep waits for the sweep's records.
const FENCE: &str = "fence";
const MAX_ATTEMPTS: u32 = 3;
const LEASE_MS: u64 = 100;
const WINDOW_MS: u64 = 400;
const STEPS: usize = 60;
/// The topics published to and the patterns subscribed with.
const TOPICS: [&str; 3] = ["t.a", "t.b.c", "u.x"];
const PATTERNS: [&str; 4] = ["t.a", "t.*", "t.>", "u.*"];
/// The capability of the model's queue, and its inbox name.
const CAPABILITY: &str = "q";
/// The ordering keys one publish in three carries.
const KEYS: [&str; 2] = ["k0", "k1"];
const QUEUE: &str = "capability:q";

/// Whether `topic` matches `pattern` (`*` one segment, a final `>` one or more): the model's
/// own reading of SPEC §2, independent of `TopicPattern::matches`.
fn model_matches(pattern: &str, topic: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let t: Vec<&str> = topic.split('.').collect();
    if p.last() == Some(&">") {
        let fixed = p.len() - 1;
        return t.len() > fixed && p[..fixed].iter().zip(&t).all(|(a, b)| *a == "*" || a == b);
    }
    p.len() == t.len() && p.iter().zip(&t).all(|(a, b)| *a == "*" || a == b)
}

fn backoff_policy() -> Backoff {
    Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
        multiplier: 2.0,
    }
}

fn config() -> Arc<Config> {
    let mut config = RawConfig::defaults()
        .validate()
        .expect("the defaults are valid");
    config.max_attempts = MAX_ATTEMPTS;
    config.lease = Duration::from_millis(LEASE_MS);
    config.backoff = backoff_policy();
    config.dedupe_window = Duration::from_millis(WINDOW_MS);
    Arc::new(config)
}

// ---- the reference model -------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ready { not_before: u64 },
    Leased { deadline: u64 },
    Acked,
    Dead(DeadReason),
}

#[derive(Debug, Clone)]
struct ModelMessage {
    priority: u8,
    attempts: u32,
    /// Deliveries since it was published or last redriven.
    deliveries: u32,
    expires_at: Option<u64>,
    status: Status,
    /// In the queue: the agent that holds its lease, while leased.
    holder: Option<&'static str>,
    /// Its ordering key, if any.
    key: Option<&'static str>,
}

/// One inbox of the model.
#[derive(Debug, Default)]
struct Inbox {
    messages: BTreeMap<u64, ModelMessage>,
}

impl Inbox {
    fn pending(m: &ModelMessage) -> bool {
        matches!(m.status, Status::Ready { .. } | Status::Leased { .. })
    }

    /// The messages deliverable at `now`, in delivery order: (9 − priority, offset).
    /// Ordering keys: a keyed message may go only while it is the pending message of its
    /// key with the lowest offset in this inbox.
    fn ready(&self, now: u64) -> Vec<(u8, u64)> {
        let heads: BTreeMap<&str, u64> = self
            .messages
            .iter()
            .filter(|(_, m)| Self::pending(m))
            .filter_map(|(o, m)| Some((m.key?, *o)))
            .fold(BTreeMap::new(), |mut heads, (key, offset)| {
                heads.entry(key).or_insert(offset);
                heads
            });
        self.messages
            .iter()
            .filter(|(_, m)| matches!(m.status, Status::Ready { not_before } if not_before <= now))
            .filter(|(o, m)| m.key.is_none_or(|key| heads.get(key) == Some(*o)))
            .map(|(o, m)| (9 - m.priority, *o))
            .collect()
    }

    /// Leases the message at `offset` to `holder`; its attempt.
    fn lease(&mut self, offset: u64, now: u64, holder: Option<&'static str>) -> u32 {
        let m = self.messages.get_mut(&offset).expect("listed");
        m.attempts += 1;
        m.deliveries += 1;
        m.status = Status::Leased {
            deadline: now + LEASE_MS,
        };
        m.holder = holder;
        m.attempts
    }

    /// One receipt of `agent`, judged against `before`, the state before the call; a repeat
    /// (in `seen`) is stale; a queue message is `agent`'s if it holds the lease, or if nobody
    /// does and it draws from the queue (`draws`).
    fn settle_one(
        &mut self,
        (before, seen): (&BTreeMap<u64, ModelMessage>, &mut BTreeSet<u64>),
        (offset, attempt): (u64, u32),
        (agent, draws): (&str, bool),
        how: Settle,
        now: u64,
    ) -> Outcome {
        let Some(m) = before.get(&offset) else {
            return Outcome::Unknown;
        };
        if !Self::pending(m) {
            return match m.status {
                Status::Dead(_) => Outcome::Stale,
                _ => Outcome::Unknown,
            };
        }
        let mine = match m.holder {
            Some(holder) => holder == agent,
            None => draws,
        };
        if !mine {
            return Outcome::Unknown;
        }
        if m.attempts != attempt || !seen.insert(offset) {
            return Outcome::Stale;
        }
        let leased = matches!(m.status, Status::Leased { .. });
        let target = self.messages.get_mut(&offset).expect("exists");
        let (status, outcome) = match how {
            Settle::Ack => (Status::Acked, Outcome::Acked),
            _ if !leased => return Outcome::Stale,
            Settle::Extend { lease_ms } => {
                let deadline = now + lease_ms;
                (Status::Leased { deadline }, Outcome::Extended)
            }
            Settle::Nack {
                dead_letter: true, ..
            } => (Status::Dead(DeadReason::Rejected), Outcome::DeadLettered),
            Settle::Nack { .. } if m.attempts >= MAX_ATTEMPTS => {
                (Status::Dead(DeadReason::MaxAttempts), Outcome::DeadLettered)
            }
            Settle::Nack { delay_ms, .. } => (
                Status::Ready {
                    not_before: now + delay_ms,
                },
                Outcome::Nacked,
            ),
        };
        target.status = status;
        if !matches!(status, Status::Leased { .. }) {
            target.holder = None;
        }
        outcome
    }

    fn sweep(&mut self, now: u64) {
        for (offset, m) in &mut self.messages {
            if !Self::pending(m) {
                continue;
            }
            if m.expires_at.is_some_and(|at| at <= now) {
                m.status = Status::Dead(DeadReason::Expired);
                m.holder = None;
            } else if let Status::Leased { deadline } = m.status {
                if deadline <= now {
                    m.holder = None;
                    m.status = if m.attempts >= MAX_ATTEMPTS {
                        Status::Dead(DeadReason::MaxAttempts)
                    } else {
                        let delay = backoff::delay_ms(&backoff_policy(), m.attempts, *offset);
                        Status::Ready {
                            not_before: now + delay,
                        }
                    };
                }
            }
        }
    }

    fn redrive_all(&mut self, now: u64) -> usize {
        let mut n = 0;
        for m in self.messages.values_mut() {
            if let Status::Dead(_) = m.status {
                m.status = Status::Ready { not_before: now };
                m.attempts = 0;
                m.deliveries = 0;
                m.expires_at = None;
                n += 1;
            }
        }
        n
    }
}

/// The whole model: every inbox, the queue and who declares its capability, the client ids
/// remembered for dedupe, the subscriptions.
#[derive(Debug, Default)]
struct Model {
    inboxes: BTreeMap<&'static str, Inbox>,
    /// The capability queue.
    queue: Inbox,
    /// The agents that declare the capability now.
    capable: BTreeSet<&'static str>,
    /// Client id → (offset of its first publish, remembered until).
    ids: BTreeMap<String, (u64, u64)>,
    /// Agent → its patterns.
    subscriptions: BTreeMap<&'static str, BTreeSet<&'static str>>,
}

impl Model {
    /// The offset a publish with client id `id` at `now` is a duplicate of, if any.
    fn duplicate_of(&self, id: Option<&str>, now: u64) -> Option<u64> {
        let (offset, until) = self.ids.get(id?)?;
        (*until > now).then_some(*offset)
    }

    /// A receive of `agent`: its inbox and, if it declares the capability, the queue, merged
    /// by priority then offset; (offset, attempt, from the queue) per delivery.
    fn receive(&mut self, agent: &'static str, max: usize, now: u64) -> Vec<(u64, u32, bool)> {
        let inbox = self.inboxes.get_mut(agent).expect("inbox");
        let mut ready: Vec<(u8, u64, bool)> = inbox
            .ready(now)
            .into_iter()
            .map(|(rank, offset)| (rank, offset, false))
            .collect();
        if self.capable.contains(agent) {
            let queued = self.queue.ready(now).into_iter();
            ready.extend(queued.map(|(rank, offset)| (rank, offset, true)));
        }
        ready.sort_unstable();
        ready
            .into_iter()
            .take(max)
            .map(|(_, offset, queued)| {
                let attempt = if queued {
                    self.queue.lease(offset, now, Some(agent))
                } else {
                    inbox.lease(offset, now, None)
                };
                (offset, attempt, queued)
            })
            .collect()
    }

    /// `agent` settles receipts (offset, attempt, of the queue), each against the state
    /// before the call.
    fn settle(
        &mut self,
        agent: &'static str,
        receipts: &[(u64, u32, bool)],
        how: Settle,
        now: u64,
    ) -> Vec<Outcome> {
        let inbox = self.inboxes.get_mut(agent).expect("inbox");
        let before = (inbox.messages.clone(), self.queue.messages.clone());
        let mut seen = (BTreeSet::new(), BTreeSet::new());
        receipts
            .iter()
            .map(|&(offset, attempt, queued)| {
                if queued {
                    let draws = self.capable.contains(agent);
                    let judged = (&before.1, &mut seen.1);
                    let who = (agent, draws);
                    self.queue
                        .settle_one(judged, (offset, attempt), who, how, now)
                } else {
                    let judged = (&before.0, &mut seen.0);
                    inbox.settle_one(judged, (offset, attempt), (agent, true), how, now)
                }
            })
            .collect()
    }

    /// The agents a message to `topic` goes to now.
    fn subscribers(&self, topic: &str) -> Vec<&'static str> {
        self.subscriptions
            .iter()
            .filter(|(_, patterns)| patterns.iter().any(|p| model_matches(p, topic)))
            .map(|(agent, _)| *agent)
            .collect()
    }
}

// ---- the system under test ------------------------------------------------------------------

struct System {
    sim: SimDisk,
    index_dir: tempfile::TempDir,
    time: Arc<AtomicU64>,
    broker: Arc<Broker>,
    runtime: tokio::runtime::Runtime,
}

fn data_dir() -> &'static Path {
    Path::new("/sim/model")
}

fn agent_id(agent: &str) -> AgentId {
    AgentId::parse(agent).expect("a valid agent id")
}

impl System {
    fn open(sim: SimDisk, index_dir: tempfile::TempDir, time: Arc<AtomicU64>) -> Self {
        let options = LogOptions {
            disk: Arc::new(sim.clone()),
            fsync: FsyncPolicy::Always,
            segment_bytes: 4096,
            index_dir: Some(index_dir.path().to_path_buf()),
            checkpoint_interval: Duration::from_secs(3600),
            ..LogOptions::default()
        };
        let (log, _) = Log::open(data_dir(), options).expect("open");
        let metrics = Arc::new(courier::metrics::Metrics::new(0.0));
        let broker =
            Broker::new(log, config(), Clock::manual(time.clone()), metrics).expect("broker");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Self {
            sim,
            index_dir,
            time,
            broker: Arc::new(broker),
            runtime,
        }
    }

    fn now(&self) -> u64 {
        self.time.load(Ordering::Acquire)
    }

    fn register(&self, agent: &str, capable: bool) {
        let capabilities = if capable {
            vec![CAPABILITY.to_owned()]
        } else {
            vec![]
        };
        let agent = Agent {
            id: agent.into(),
            capabilities,
            metadata: b"{}".to_vec(),
            lease_ms: None,
            max_attempts: None,
            max_in_flight: None,
            token_hash: None,
        };
        self.runtime
            .block_on(
                self.broker
                    .upsert_agent(agent, courier::broker::Tokens::Off),
            )
            .expect("register");
    }

    /// Publishes one message to `agent:<to>`, or `topic:<to>` if `to` has a dot, or to
    /// `to` itself if it is the queue's address; (offset, duplicate, destinations).
    fn publish(
        &self,
        to: &str,
        priority: u8,
        (delay_ms, ttl_ms): (u64, u64),
        id: Option<String>,
        key: Option<&str>,
    ) -> (u64, bool, usize) {
        let (address, text) = if to == QUEUE {
            let capability = CapabilityName::parse(CAPABILITY).expect("a valid capability");
            (Address::Capability(capability), QUEUE.to_owned())
        } else if to.contains('.') {
            let topic = TopicName::parse(to).expect("a valid topic");
            (Address::Topic(topic), format!("topic:{to}"))
        } else {
            (Address::Agent(agent_id(to)), format!("agent:{to}"))
        };
        let outgoing = Outgoing {
            client_id: id,
            to: Some(address),
            message: Message {
                id: String::new(),
                from: "model".into(),
                to: text,
                destinations: vec![],
                kind: None,
                priority,
                headers: vec![],
                correlation_id: None,
                in_reply_to: None,
                not_before_ms: None,
                expires_at_ms: None,
                dedupe_until_ms: None,
                body: b"{}".to_vec(),
                ordering_key: key.map(str::to_owned),
                request_until_ms: None,
            },
            delay_ms,
            ttl_ms,
        };
        let published = self
            .runtime
            .block_on(self.broker.publish(vec![outgoing]))
            .expect("publish");
        let p = &published[0];
        (p.offset, p.duplicate, p.destinations)
    }

    /// Subscribes (`on`) or unsubscribes; whether anything changed.
    fn subscription(&self, agent: &str, pattern: &str, on: bool) -> bool {
        let pattern = TopicPattern::parse(pattern).expect("a valid pattern");
        let id = agent_id(agent);
        let changed = if on {
            self.runtime
                .block_on(self.broker.subscribe(&id, &pattern, Start::Latest))
                .map(|s| s.created)
        } else {
            self.runtime
                .block_on(self.broker.unsubscribe(&id, &pattern))
        };
        changed.expect("subscription")
    }

    /// The patterns `agent` is subscribed to, sorted.
    fn patterns(&self, agent: &str) -> Vec<String> {
        let patterns = self
            .broker
            .subscriptions(&agent_id(agent))
            .expect("registered");
        patterns.iter().map(ToString::to_string).collect()
    }

    /// Receives without waiting: (offset, attempt, receipt) per delivery.
    fn receive(&self, agent: &str, max: usize) -> Vec<Issued> {
        let request = ReceiveRequest {
            max,
            wait: Duration::ZERO,
            lease_ms: None,
        };
        let delivered = self
            .runtime
            .block_on(self.broker.receive(&agent_id(agent), request))
            .expect("receive");
        delivered
            .into_iter()
            .map(|d| {
                (
                    d.frame.offset.0,
                    d.attempt,
                    d.receipt.contains('@'),
                    d.receipt,
                )
            })
            .collect()
    }

    fn settle(&self, agent: &str, receipts: &[String], how: Settle) -> Vec<Outcome> {
        self.runtime
            .block_on(self.broker.settle(&agent_id(agent), receipts, how))
            .expect("settle")
    }

    /// A sweep at the current time; its records are durable when this returns (the sweeper
    /// does not wait for them, so a publish queued behind them does).
    fn sweep(&self) {
        self.broker.sweep();
        self.publish(FENCE, 4, (0, 0), None, None);
    }

    /// Redrives every dead letter of `agent`'s inbox, or of the queue if `agent` is `None`;
    /// `None` if the queue is unknown (nobody declares it, nothing was sent to it).
    fn redrive(&self, agent: Option<&str>) -> Option<usize> {
        let id = agent.map(agent_id);
        let capability = CapabilityName::parse(CAPABILITY).expect("a valid capability");
        let inbox = match &id {
            Some(id) => InboxRef::Agent(id),
            None => InboxRef::Capability(&capability),
        };
        match self.runtime.block_on(self.broker.redrive(inbox, None)) {
            Ok(n) => Some(n),
            Err(Refusal::UnknownCapability(_)) if agent.is_none() => None,
            Err(refusal) => panic!("redrive: {refusal}"),
        }
    }

    /// A power loss: the broker and its log stop without a closing checkpoint, the disk
    /// keeps what `rng`'s tear mode keeps of what was not synced, and everything reopens.
    fn crash(self, rng: &mut Rng) -> Self {
        let Self {
            sim,
            index_dir,
            time,
            mut broker,
            runtime,
        } = self;
        broker.log().crash_on_close();
        drop(runtime);
        // The writer thread drops its completed callbacks (and their broker handles) just
        // after answering; wait for the last one, so that the log really closes here.
        loop {
            match Arc::try_unwrap(broker) {
                Ok(only) => break drop(only),
                Err(shared) => {
                    broker = shared;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        let mode = TEAR_MODES[rng.below(TEAR_MODES.len() as u64) as usize];
        sim.crash(mode, rng.next());
        Self::open(sim, index_dir, time)
    }
}

/// Every agent's subscriptions equal the model's.
fn check_subscriptions(system: &System, model: &Model, context: &str) {
    for agent in AGENTS {
        let expected: Vec<String> = model
            .subscriptions
            .get(agent)
            .map(|p| p.iter().map(ToString::to_string).collect())
            .unwrap_or_default();
        assert_eq!(
            system.patterns(agent),
            expected,
            "{context}: {agent}'s subscriptions"
        );
    }
}

/// Every agent's subscriptions and the delivery state of every inbox and of the queue equal
/// the model, message by message.
fn check(system: &System, model: &Model, context: &str) {
    check_subscriptions(system, model, context);
    let now = system.now();
    system.broker.inspect_delivery(|state| {
        let inboxes = model.inboxes.iter().map(|(agent, inbox)| (*agent, inbox));
        for (name, inbox) in inboxes.chain([(QUEUE, &model.queue)]) {
            let dead: BTreeMap<u64, _> = state
                .dead_letters(name, None, usize::MAX)
                .into_iter()
                .map(|d| (d.slot.offset.0, d))
                .collect();
            for (offset, m) in &inbox.messages {
                let slot = Slot {
                    offset: Offset(*offset),
                    priority: m.priority,
                };
                let entry = state.entry_of(name, slot);
                let holder = state.holder(name, slot).map(|h| h.to_string());
                let what = format!(
                    "{context}: {name} message {offset}: model {m:?}, system {entry:?} / {:?} held by {holder:?}",
                    dead.get(offset)
                );
                assert_eq!(holder.as_deref(), m.holder, "{what}");
                check_message(m, entry, dead.get(offset), now, &what);
            }
        }
    });
}

/// One message of the model against its entry or dead letter in the system.
fn check_message(
    m: &ModelMessage,
    entry: Option<EntryValue>,
    dead: Option<&DeadEntry>,
    now: u64,
    what: &str,
) {
    match m.status {
        Status::Acked => {
            assert!(entry.is_none() && dead.is_none(), "{what}");
        }
        Status::Dead(reason) => {
            assert!(entry.is_none(), "{what}");
            let d = dead.unwrap_or_else(|| panic!("{what}"));
            assert_eq!((d.reason, d.attempts), (reason, m.attempts), "{what}");
            if reason == DeadReason::MaxAttempts {
                assert_eq!(m.deliveries, MAX_ATTEMPTS, "{what}");
            }
        }
        Status::Ready { not_before } => {
            let e = entry.unwrap_or_else(|| panic!("{what}"));
            assert_eq!(
                (e.attempts, e.expires_at_ms),
                (m.attempts, m.expires_at),
                "{what}"
            );
            match e.state {
                EntryState::Ready {
                    not_before_ms: None,
                } => assert!(not_before <= now, "{what}"),
                EntryState::Ready {
                    not_before_ms: Some(t),
                } => {
                    assert!(t == not_before || (t <= now && not_before <= now), "{what}");
                }
                EntryState::Leased { .. } => panic!("{what}"),
            }
        }
        Status::Leased { deadline } => {
            let e = entry.unwrap_or_else(|| panic!("{what}"));
            assert_eq!(e.attempts, m.attempts, "{what}");
            assert_eq!(
                e.state,
                EntryState::Leased {
                    deadline_ms: deadline
                },
                "{what}"
            );
        }
    }
}

/// A delivery as issued: offset, attempt, whether it came from the queue, receipt.
type Issued = (u64, u32, bool, String);

/// Up to three receipts issued to `agent` (repeats allowed: a repeat is stale).
fn pick_receipts(rng: &mut Rng, issued: &[Issued]) -> Vec<Issued> {
    if issued.is_empty() {
        return Vec::new();
    }
    let n = 1 + rng.below(3) as usize;
    (0..n)
        .map(|_| issued[rng.below(issued.len() as u64) as usize].clone())
        .collect()
}

#[expect(
    clippy::too_many_lines,
    reason = "one match arm per operation reads best in one place"
)]
fn run_seed(seed: u64) {
    let mut rng = Rng(seed);
    let time = Arc::new(AtomicU64::new(1_000_000));
    let mut system = System::open(
        SimDisk::new(),
        tempfile::tempdir().expect("index dir"),
        time.clone(),
    );
    let mut model = Model::default();
    let mut issued: BTreeMap<&str, Vec<Issued>> = BTreeMap::new();
    // w0 and w1 declare the capability from the start; w2 may later.
    for agent in AGENTS.into_iter().chain([FENCE]) {
        let capable = agent != "w2" && agent != FENCE;
        system.register(agent, capable);
        if capable {
            model.capable.insert(agent);
        }
    }
    for agent in AGENTS {
        model.inboxes.insert(agent, Inbox::default());
    }
    for step in 0..STEPS {
        let op = rng.below(116);
        let agent = AGENTS[rng.below(AGENTS.len() as u64) as usize];
        let now = system.now();
        let context = format!("seed {seed} step {step} op {op} agent {agent}");
        match op {
            0..=24 => {
                // One publish in five goes to a topic, one in five to the queue.
                let to = match rng.below(5) {
                    0 => TOPICS[rng.below(TOPICS.len() as u64) as usize],
                    1 => QUEUE,
                    _ => agent,
                };
                let priority = rng.below(10) as u8;
                let delay = if rng.below(4) == 0 { rng.below(300) } else { 0 };
                let ttl = if rng.below(5) == 0 {
                    1 + rng.below(600)
                } else {
                    0
                };
                let id = (rng.below(3) == 0).then(|| format!("id-{}", rng.below(5)));
                let key = (rng.below(3) == 0).then(|| KEYS[rng.below(KEYS.len() as u64) as usize]);
                let expected = model.duplicate_of(id.as_deref(), now);
                let (offset, duplicate, destinations) =
                    system.publish(to, priority, (delay, ttl), id.clone(), key);
                assert_eq!(duplicate, expected.is_some(), "{context}: publish {id:?}");
                if let Some(original) = expected {
                    assert_eq!(offset, original, "{context}: duplicate of {id:?}");
                } else {
                    if let Some(id) = id {
                        model.ids.insert(id, (offset, now + WINDOW_MS));
                    }
                    let inboxes = if to == QUEUE {
                        vec![QUEUE]
                    } else if to.contains('.') {
                        model.subscribers(to)
                    } else {
                        vec![agent]
                    };
                    assert_eq!(destinations, inboxes.len(), "{context}: publish to {to}");
                    for inbox in inboxes {
                        let message = ModelMessage {
                            priority,
                            attempts: 0,
                            deliveries: 0,
                            expires_at: (ttl > 0).then(|| now + ttl),
                            status: Status::Ready {
                                not_before: now + delay,
                            },
                            holder: None,
                            key,
                        };
                        let inbox = if inbox == QUEUE {
                            &mut model.queue
                        } else {
                            model.inboxes.get_mut(inbox).expect("inbox")
                        };
                        inbox.messages.insert(offset, message);
                    }
                }
            }
            25..=44 => {
                let max = 1 + rng.below(4) as usize;
                let got = system.receive(agent, max);
                let expected = model.receive(agent, max, now);
                let triples: Vec<(u64, u32, bool)> =
                    got.iter().map(|(o, a, q, _)| (*o, *a, *q)).collect();
                assert_eq!(triples, expected, "{context}: receive");
                issued.entry(agent).or_default().extend(got);
            }
            45..=69 => {
                let chosen = pick_receipts(&mut rng, issued.get(agent).map_or(&[], Vec::as_slice));
                let how = match rng.below(4) {
                    0 | 1 => Settle::Ack,
                    2 => Settle::Nack {
                        delay_ms: rng.below(200),
                        dead_letter: rng.below(4) == 0,
                    },
                    _ => Settle::Extend {
                        lease_ms: 1 + rng.below(300),
                    },
                };
                let receipts: Vec<String> = chosen.iter().map(|(.., r)| r.clone()).collect();
                let outcomes = system.settle(agent, &receipts, how);
                let triples: Vec<(u64, u32, bool)> =
                    chosen.iter().map(|(o, a, q, _)| (*o, *a, *q)).collect();
                let expected = model.settle(agent, &triples, how, now);
                assert_eq!(outcomes, expected, "{context}: {how:?} of {triples:?}");
            }
            70..=84 => {
                time.fetch_add(rng.below(250), Ordering::AcqRel);
                let now = system.now();
                system.sweep();
                for inbox in model.inboxes.values_mut() {
                    inbox.sweep(now);
                }
                model.queue.sweep(now);
            }
            85..=89 => {
                // One redrive in three is of the queue.
                let (inbox, name, known) = if rng.below(3) == 0 {
                    let known = !model.capable.is_empty() || !model.queue.messages.is_empty();
                    (&mut model.queue, None, known)
                } else {
                    let inbox = model.inboxes.get_mut(agent).expect("inbox");
                    (inbox, Some(agent), true)
                };
                let expected = known.then(|| inbox.redrive_all(now));
                assert_eq!(system.redrive(name), expected, "{context}: redrive");
            }
            90..=93 => {
                system.broker.log().checkpoint().expect("checkpoint");
            }
            100..=109 => {
                let pattern = PATTERNS[rng.below(PATTERNS.len() as u64) as usize];
                let on = op < 106;
                let patterns = model.subscriptions.entry(agent).or_default();
                let expected = if on {
                    patterns.insert(pattern)
                } else {
                    patterns.remove(pattern)
                };
                let changed = system.subscription(agent, pattern, on);
                assert_eq!(changed, expected, "{context}: subscription {on} {pattern}");
            }
            94..=99 => {
                system = system.crash(&mut rng);
            }
            110..=115 => {
                // The agent declares the capability, or stops declaring it: its receives
                // draw from the queue or not from now on; leases it holds stay its own.
                let capable = rng.below(2) == 0;
                system.register(agent, capable);
                if capable {
                    model.capable.insert(agent);
                } else {
                    model.capable.remove(agent);
                }
            }
            _ => unreachable!("op {op} is below 116"),
        }
        check(&system, &model, &context);
    }
    // Finally: a crash, and the recovered state still equals the model.
    system = system.crash(&mut rng);
    check(
        &system,
        &model,
        &format!("seed {seed} after the final crash"),
    );
}

#[test]
fn model_check_of_delivery_over_random_operations_and_crashes() {
    let soak = std::env::var_os("COURIER_SOAK").is_some();
    let seeds: u64 = if soak { 100_000 } else { 1_000 };
    let base = std::env::var("COURIER_SEED")
        .ok()
        .and_then(|s| s.parse().ok());
    if let Some(seed) = base {
        run_seed(seed);
        return;
    }
    std::thread::scope(|scope| {
        for parity in 0..2u64 {
            scope.spawn(move || {
                for n in (parity..seeds).step_by(2) {
                    run_seed(0xC0FF_EE00 + n);
                }
            });
        }
    });
}
