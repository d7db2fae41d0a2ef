//! The imperative shell around the delivery core: owns the log, the in-memory delivery
//! state, the agent registry, admission and the long-poll waiters, and turns requests into
//! records. One module per responsibility:
//!
//! - [`commit`]: the one way state changes: decide under the lock, apply, submit, answer
//!   after durable;
//! - [`registry`]: registered agents and their presence;
//! - [`admission`]: what a publish must pass (destinations, depth, rate, dedupe);
//! - [`publish`] and [`consume`]: the operations of producers and of consumers;
//! - [`topics`] and [`capabilities`]: subscriptions, and the views of capability queues;
//! - [`waiters`]: long-poll wake-ups; [`sweeper`]: timers; [`retention`]: old segments.
//!
//! **Invariant:** the log order equals the order of decisions, because records are submitted
//! under the same lock that decided them ([`commit`]). Memory equals "apply the log in
//! order": records that need their own offset or commit order are applied when durable,
//! all others at decision time, and both go through `courier_storage::state::apply`.

mod admission;
mod capabilities;
mod commit;
mod consume;
mod publish;
mod registry;
mod requests;
mod retention;
mod sweeper;
mod topics;
mod waiters;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use courier_storage::{Agent, Index, Log, LogStats, SegmentInfo};
use tokio::sync::{watch, Notify};

use crate::auth::AgentTokens;
use crate::clock::Clock;
use crate::config::Config;
use crate::delivery::{self, Depth, Policy};
use crate::metrics::Metrics;

pub use admission::Signed;
pub use capabilities::CapabilityView;
pub use consume::{DeadView, Delivered, InboxRef, ReceiveRequest};
pub use publish::{Outgoing, Published};
pub use registry::{AgentView, Tokens, Upserted};
pub use requests::RequestOptions;
pub use topics::{Start, Subscription};

/// Why the broker refused a request; the API turns each into a status and an error code.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The agent is not registered.
    #[error("agent `{0}` is not registered; register it with PUT /v1/agents/{0}")]
    UnknownAgent(String),
    /// The destination inbox is at `limits.max_inbox_depth`.
    #[error("the inbox of `{agent}` holds {depth} messages, the limit (limits.max_inbox_depth); retry when its consumer has caught up")]
    InboxFull {
        /// The full inbox.
        agent: String,
        /// Its depth.
        depth: u64,
    },
    /// The sender is over `limits.publish_rate`.
    #[error("`{agent}` publishes faster than limits.publish_rate ({rate}/s); slow down")]
    RateLimited {
        /// The sender.
        agent: String,
        /// The configured rate.
        rate: u32,
    },
    /// Too many long-polls open for one agent.
    #[error("agent `{agent}` already has {open} receive calls open (limits.max_receivers); close some or wait")]
    TooManyReceivers {
        /// The agent.
        agent: String,
        /// How many are open.
        open: u32,
    },
    /// No agent declares the capability and no message was ever sent to its queue.
    #[error("no agent declares capability `{0}` and no message was sent to capability:{0}; register an agent with it (PUT /v1/agents/{{id}} with \"capabilities\") or publish to it")]
    UnknownCapability(String),
    /// A reply without `to` names no remembered request.
    #[error("`to` is missing and `in_reply_to` {0:?} names no request this server remembers (a request is remembered for its timeout plus dedupe_window); address the reply with `to`")]
    UnknownRequest(String),
    /// A client id (of a message or a request) that another sender's remembered message has.
    #[error("id `{id}` is another sender's; use an id of your own")]
    IdTaken {
        /// The id.
        id: String,
        /// Who sent the request that has it (not shown to the caller).
        owner: String,
    },
    /// A signed request whose window has already ended by the clocks that forget nonces.
    #[error("this signature's time is too old for the server to remember its nonce (its clock, or the time of its latest record, is past t + 300 s): sign the request again")]
    SignatureExpired,
    /// A signed request's nonce was used before, within its window.
    #[error("this signature's nonce was used before (a replay, or a retry that kept its nonce): sign the request again with a new nonce")]
    NonceReused,
    /// Nobody could take a request with `no_responders=fail`.
    #[error("{0} was seen within presence_ttl, so nobody could take the request; nothing was stored (drop no_responders=fail to leave it waiting)")]
    NoResponders(String),
    /// Too many request calls wait for replies.
    #[error(
        "{limit} request calls already wait for replies (limits.max_waiting_requests); retry later"
    )]
    TooManyWaiting {
        /// The limit.
        limit: u32,
    },
    /// No reply came within the call's timeout.
    #[error("no reply to request `{id}` within {timeout_ms} ms; a later reply goes to the requester's inbox")]
    ReplyTimeout {
        /// The request's id.
        id: String,
        /// The timeout.
        timeout_ms: u64,
    },
    /// The log cannot take writes (fail-stop after an I/O error, or shutting down).
    #[error("{0}")]
    Unavailable(String),
}

type Result<T> = std::result::Result<T, Refusal>;

/// Everything behind the broker's lock.
#[derive(Debug, Default)]
struct Core {
    /// Inboxes, leases, timers, dead letters and remembered client ids.
    delivery: delivery::State,
    /// Registered agents and their presence.
    registry: registry::Registry,
    /// Rate buckets and the client ids being committed.
    admission: admission::Admission,
    /// Long-poll wake-ups per inbox.
    waiters: waiters::Waiters,
    /// Request calls waiting for their replies.
    calls: requests::Calls,
    /// Subscriptions decided (and routing) but not durable yet, by (agent, pattern): a
    /// repeated subscribe answers only once the first one is durable.
    subscribing: std::collections::HashMap<(String, String), watch::Receiver<bool>>,
}

/// The broker: one per server. Shared by the HTTP handlers and the sweeper.
pub struct Broker {
    /// The log (and through it the index).
    log: Log,
    /// Monotonic epoch-ms time.
    clock: Clock,
    /// The configuration.
    config: Arc<Config>,
    /// The in-memory state; see [`commit`] for the locking rule.
    core: Mutex<Core>,
    /// Wakes the sweeper when a timer earlier than the one it sleeps for may exist.
    sweeper: Notify,
    /// When the sweeper will look next on its own (epoch ms), written under the core lock.
    sweeper_wakes_at_ms: AtomicU64,
    /// Set once when shutdown begins: long-polls return, writes are refused.
    closing: watch::Sender<bool>,
    /// Whether the fail-stop after a panic under the broker lock was logged (the lock's own
    /// poisoning is the failure; see [`Broker::lock`]).
    failure_logged: AtomicBool,
    /// The agents' token hashes, as durable registrations set them.
    tokens: Arc<AgentTokens>,
    /// Held by each registration change (upsert, token rotation, deletion) until it is
    /// durable: each decides from the one before it (which token an agent has), not from a
    /// state that a change still on its way to disk is about to replace.
    registrations: tokio::sync::Mutex<()>,
    /// The Prometheus series the broker counts.
    metrics: Arc<Metrics>,
}

impl Broker {
    /// Builds the in-memory state from the recovered index and returns the broker, which
    /// counts its events in `metrics`.
    pub fn new(
        log: Log,
        config: Arc<Config>,
        clock: Clock,
        metrics: Arc<Metrics>,
    ) -> std::result::Result<Self, courier_storage::Error> {
        let (delivery, agents) = recover_state(log.index())?;
        let mut core = Core {
            delivery,
            ..Core::default()
        };
        let tokens = Arc::new(AgentTokens::default());
        for agent in agents {
            registry::note_token(&tokens, &agent);
            core.registry.upsert(agent);
        }
        Ok(Self {
            log,
            clock,
            config,
            core: Mutex::new(core),
            sweeper: Notify::new(),
            sweeper_wakes_at_ms: AtomicU64::new(0),
            closing: watch::Sender::new(false),
            failure_logged: AtomicBool::new(false),
            tokens,
            registrations: tokio::sync::Mutex::new(()),
            metrics,
        })
    }

    /// The Prometheus series (events counted here, and by the API and the log).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Takes the broker lock. A panic while it was held (a bug) may have left the state half
    /// changed: then the broker fails stop, as the log does after a failed write — not ready,
    /// every write refused — while reads and the unwinding of other requests go on.
    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|poisoned| {
            if !self.failure_logged.swap(true, Ordering::AcqRel) {
                tracing::error!("a panic left the broker's state half changed; refusing all writes (fail-stop); restart to recover");
            }
            poisoned.into_inner()
        })
    }

    /// The clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The log (tools and tests: checkpoints, a simulated crash).
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// Reads the in-memory delivery state under the broker lock (the model check compares
    /// it with its reference model).
    pub fn inspect_delivery<R>(&self, read: impl FnOnce(&delivery::State) -> R) -> R {
        read(&self.lock().delivery)
    }

    /// Whether the log takes writes and shutdown has not begun.
    pub fn is_ready(&self) -> bool {
        !self.log.is_poisoned() && !*self.closing.borrow() && !self.has_failed()
    }

    /// Whether a panic under the broker lock stopped the broker (see [`Broker::lock`]).
    fn has_failed(&self) -> bool {
        self.core.is_poisoned()
    }

    /// Begins shutdown: open long-polls return what they have, new writes are refused.
    pub fn close(&self) {
        self.closing.send_replace(true);
        self.sweeper.notify_one();
    }

    /// Closes the log: waits for queued appends, checkpoints, releases the directory.
    pub fn shutdown_log(&self) -> std::result::Result<(), courier_storage::Error> {
        self.log.close()
    }

    /// The delivery settings of an inbox: its agent's, else the server's.
    fn policy(&self, agent: Option<&Agent>) -> Policy {
        Policy {
            max_attempts: agent
                .and_then(|a| a.max_attempts)
                .unwrap_or(self.config.max_attempts),
            max_in_flight: agent.and_then(|a| a.max_in_flight),
            backoff: self.config.backoff,
        }
    }

    /// Refuses writes once shutdown has begun or the log failed.
    fn check_writable(&self) -> Result<()> {
        if *self.closing.borrow() {
            return Err(Refusal::Unavailable(
                "the server is shutting down; retry against the next instance".into(),
            ));
        }
        if self.log.is_poisoned() || self.has_failed() {
            return Err(Refusal::Unavailable(
                "the log failed and the server stopped accepting writes (fail-stop); restart it to recover".into(),
            ));
        }
        Ok(())
    }

    /// Log figures and per-agent counts. The per-agent counts are read in chunks, so the
    /// lock that the log's completions also take is never held for all agents at once.
    pub fn stats(&self) -> Stats {
        let ids = self.lock().registry.ids();
        Stats {
            durable_end: self.log.durable_end().0,
            segments: self.log.segments(),
            log: self.log.stats(),
            agents: self.depths_of(&ids),
        }
    }

    /// Every capability queue's counts, by inbox name (`capability:<name>`), read like
    /// [`Broker::stats`]'s per-agent counts.
    pub fn queue_depths(&self) -> Vec<(Arc<str>, Depth)> {
        let queues: Vec<Arc<str>> = self.lock().delivery.queue_names().map(Arc::from).collect();
        self.depths_of(&queues)
    }

    /// The counts of the inboxes `names`, 256 per lock hold.
    fn depths_of(&self, names: &[Arc<str>]) -> Vec<(Arc<str>, Depth)> {
        let mut depths = Vec::with_capacity(names.len());
        for chunk in names.chunks(256) {
            let core = self.lock();
            depths.extend(chunk.iter().map(|id| (id.clone(), core.delivery.depth(id))));
        }
        depths
    }
}

/// What `GET /v1/stats` shows.
#[derive(Debug)]
pub struct Stats {
    /// The offset after the last durable record.
    pub durable_end: u64,
    /// The segments, oldest first.
    pub segments: Vec<SegmentInfo>,
    /// Writer counters since start.
    pub log: LogStats,
    /// Every agent's inbox counts, by id.
    pub agents: Vec<(Arc<str>, Depth)>,
}

/// Rebuilds the in-memory delivery state and the agent registry from a recovered index
/// (which recovery made current with the log).
pub fn recover_state(
    index: &Index,
) -> std::result::Result<(delivery::State, Vec<Agent>), courier_storage::Error> {
    let mut state = delivery::State::new();
    let agents = index.agents()?;
    for agent in &agents {
        state.open_inbox(&agent.id);
        for (offset, key) in index.orderings(&agent.id)? {
            state.load_ordering(&agent.id, offset, &key);
        }
        for entry in index.inbox(&agent.id) {
            let entry = entry?;
            state.load_entry(&agent.id, entry.slot, entry.value);
        }
        for dead in index.dead_letters(&agent.id, None, usize::MAX)? {
            state.load_dead(&agent.id, dead);
        }
        state.prune_orderings(&agent.id);
    }
    for queue in index.queues()? {
        state.open_inbox(&queue);
        for (offset, key) in index.orderings(&queue)? {
            state.load_ordering(&queue, offset, &key);
        }
        for entry in index.inbox(&queue) {
            let entry = entry?;
            state.load_entry(&queue, entry.slot, entry.value);
        }
        for dead in index.dead_letters(&queue, None, usize::MAX)? {
            state.load_dead(&queue, dead);
        }
        state.prune_orderings(&queue);
    }
    for (queue, slot, agent) in index.holders()? {
        state.load_holder(&queue, slot, &agent);
    }
    for (id, request) in index.requests()? {
        state.load_request(&id, request);
    }
    for (until_ms, key) in index.nonces()? {
        let (signer, nonce) = courier_storage::state::split_nonce_key(&key).ok_or_else(|| {
            courier_storage::Error::IndexDamaged {
                why: format!("the used nonce {key:?} has no signer"),
            }
        })?;
        state.load_nonce(signer, nonce, until_ms);
    }
    for (id, offset, until_ms) in index.remembered()? {
        state.load_remembered(&id, offset, until_ms);
    }
    for (agent, pattern, start) in index.subscriptions()? {
        state.load_subscription(&agent, &pattern, start);
    }
    for (name, seen) in index.topics()? {
        state.load_topic(&name, seen);
    }
    state.load_truncated_below(index.truncated_below()?);
    for (agent, pattern, next) in index.backfills()? {
        state.load_backfill(&agent, &pattern, next);
    }
    state.load_clock(index.clock()?);
    Ok((state, agents))
}

/// A duration in whole milliseconds (saturating), the unit of every time in the core.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
