//! The imperative shell around the delivery core: owns the log, the in-memory delivery
//! state, the agent registry and the long-poll waiters, and turns requests into records.
//!
//! Every mutation follows one pattern, under the [`Broker::core`] lock:
//! decide (pure, [`delivery::State`]) → apply the records to the in-memory state → submit them
//! to the log. The lock is released before waiting for the fsync, so concurrent requests share
//! one group commit; nobody is answered before the records are durable.
//!
//! **Invariant:** the log order equals the order of decisions, because records are submitted
//! under the same lock that decided them. Records that need their own offset (`Message`) or
//! their commit order (agent registrations) are applied to memory when durable, from the log's
//! completion callback, which runs in commit order; all other records touch only messages that
//! are already in memory, so applying them at decision time gives the same state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use courier_storage::failpoint;
use courier_storage::index::DeadEntry;
use courier_storage::state::Arrival;
use courier_storage::{
    Agent, Appended, Frame, Index, Log, LogStats, Message, Offset, Record, SegmentInfo,
};
use tokio::sync::{oneshot, watch, Notify};

use crate::clock::Clock;
use crate::config::Config;
use crate::delivery::{self, Depth, Outcome, Policy, Receipt, Settle};

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
    /// The log cannot take writes (fail-stop after an I/O error, or shutting down).
    #[error("{0}")]
    Unavailable(String),
}

type Result<T> = std::result::Result<T, Refusal>;

/// A registered agent and what the server knows of it beyond the log.
#[derive(Debug, Clone)]
pub struct AgentView {
    /// The registration, as in the log.
    pub agent: Agent,
    /// When it last received or sent a heartbeat (this process only), epoch ms.
    pub last_seen_ms: Option<u64>,
    /// Whether it was seen within `presence_ttl`.
    pub online: bool,
    /// Inbox counts.
    pub depth: Depth,
    /// Receive calls open now.
    pub receivers: u32,
    /// Whether receives are held back by `max_in_flight` right now.
    pub throttled: bool,
}

/// A message handed out under a lease.
#[derive(Debug)]
pub struct Delivered {
    /// The message record and its offset and time.
    pub frame: Frame,
    /// Delivery number (1 for the first).
    pub attempt: u32,
    /// The receipt to ack, nack or extend with.
    pub receipt: String,
    /// When the lease ends, epoch ms.
    pub lease_deadline_ms: u64,
}

/// A dead letter with its message.
#[derive(Debug)]
pub struct DeadView {
    /// The message record.
    pub frame: Frame,
    /// Why and when it died.
    pub dead: DeadEntry,
}

/// The result of publishing one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The message id: the client's, or the ULID the server gave it.
    pub id: String,
    /// Its offset (the original one for a duplicate).
    pub offset: u64,
    /// Whether the id was seen within the dedupe window, so nothing was written.
    pub duplicate: bool,
}

/// What a client id's earlier publish is known as.
#[derive(Debug, Clone)]
enum Remembered {
    /// Its message is being committed; the receiver yields the offset.
    Pending(watch::Receiver<Option<u64>>),
    /// Committed at `offset` and still within its dedupe window.
    Done { offset: u64 },
}

/// Per-agent state that is not in the log.
#[derive(Debug)]
struct Registered {
    agent: Agent,
    last_seen_ms: Option<u64>,
    receivers: u32,
    /// Publish rate token bucket: tokens and when they were counted.
    tokens: f64,
    tokens_at_ms: u64,
}

impl Registered {
    /// A newly registered (or recovered) agent: not seen yet, no receivers, no tokens.
    fn new(agent: Agent) -> Self {
        Self {
            agent,
            last_seen_ms: None,
            receivers: 0,
            tokens: 0.0,
            tokens_at_ms: 0,
        }
    }
}

/// Everything behind the broker's lock.
#[derive(Debug, Default)]
struct Core {
    /// Inboxes, leases, timers and dead letters.
    delivery: delivery::State,
    /// Registered agents by id.
    agents: HashMap<String, Registered>,
    /// Client ids whose first publish is being committed (committed ones are remembered
    /// by the delivery state).
    committing: HashMap<String, watch::Receiver<Option<u64>>>,
    /// Long-poll wake-ups per inbox.
    waiters: HashMap<String, Arc<Notify>>,
}

impl Core {
    /// The registered agent `agent`, or the refusal that names it unknown.
    fn registered(&self, agent: &str) -> Result<&Registered> {
        self.agents
            .get(agent)
            .ok_or_else(|| Refusal::UnknownAgent(agent.to_owned()))
    }

    fn wake(&self, inboxes: &[Arc<str>]) {
        for inbox in inboxes {
            if let Some(notify) = self.waiters.get(&**inbox) {
                notify.notify_waiters();
            }
        }
    }

    /// What the earlier publish of client id `id` is, if it counts at `now_ms`.
    fn recall(&self, id: &str, now_ms: u64) -> Option<Remembered> {
        if let Some(rx) = self.committing.get(id) {
            return Some(Remembered::Pending(rx.clone()));
        }
        let offset = self.delivery.recall(id, now_ms)?;
        Some(Remembered::Done { offset: offset.0 })
    }
}

/// One message to publish, validated by the API.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The client's id (idempotency key), if any.
    pub client_id: Option<String>,
    /// The message as it will be stored, except for times and the server id.
    pub message: Message,
    /// Delay before delivery, ms.
    pub delay_ms: u64,
    /// Time to live, ms (0: none).
    pub ttl_ms: u64,
}

/// The broker: one per server. Shared by the HTTP handlers and the sweeper.
pub struct Broker {
    /// The log (and through it the index).
    log: Log,
    /// Monotonic epoch-ms time.
    clock: Clock,
    /// The configuration.
    config: Arc<Config>,
    /// The in-memory state; see the module docs for the locking rule.
    core: Mutex<Core>,
    /// Wakes the sweeper when a timer earlier than the one it sleeps for may exist.
    sweeper: Notify,
    /// When the sweeper will look next on its own (epoch ms), written under the core lock.
    sweeper_wakes_at_ms: AtomicU64,
    /// Set once when shutdown begins: long-polls return, writes are refused.
    closing: watch::Sender<bool>,
}

impl Broker {
    /// Builds the in-memory state from the recovered index and returns the broker.
    pub fn new(
        log: Log,
        config: Arc<Config>,
        clock: Clock,
    ) -> std::result::Result<Self, courier_storage::Error> {
        let (delivery, agents) = recover_state(log.index())?;
        let mut core = Core {
            delivery,
            ..Core::default()
        };
        for agent in agents {
            core.agents.insert(agent.id.clone(), Registered::new(agent));
        }
        Ok(Self {
            log,
            clock,
            config,
            core: Mutex::new(core),
            sweeper: Notify::new(),
            sweeper_wakes_at_ms: AtomicU64::new(0),
            closing: watch::Sender::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().expect("broker lock")
    }

    /// The clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Whether the log takes writes and shutdown has not begun.
    pub fn is_ready(&self) -> bool {
        !self.log.is_poisoned() && !*self.closing.borrow()
    }

    /// Wakes the sweeper if the earliest timer is now before the time it sleeps until (a
    /// new delay, lease or backoff may be due sooner); otherwise it is left asleep.
    fn poke_sweeper(&self, core: &Core) {
        let wakes_at = self.sweeper_wakes_at_ms.load(Ordering::Acquire);
        if core
            .delivery
            .next_due_ms()
            .is_some_and(|due| due < wakes_at)
        {
            self.sweeper.notify_one();
        }
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

    fn policy(&self, agent: Option<&Agent>) -> Policy {
        Policy {
            max_attempts: agent
                .and_then(|a| a.max_attempts)
                .unwrap_or(self.config.max_attempts),
            max_in_flight: agent.and_then(|a| a.max_in_flight),
            backoff: self.config.backoff,
        }
    }

    /// Submits `records` (already decided, under the lock) and returns a receiver for the
    /// outcome. `on_durable` runs on the log's writer thread before the receiver fires.
    fn submit(
        self: &Arc<Self>,
        points: CrashPoints,
        timestamp_ms: u64,
        records: Vec<Record>,
        on_durable: impl FnOnce(&Self, Appended) + Send + 'static,
    ) -> AppendRx {
        let (tx, rx) = oneshot::channel();
        let broker = self.clone();
        self.log.submit(timestamp_ms, records, move |result| {
            if let Ok(appended) = &result {
                failpoint::crash(points.durable);
                on_durable(&broker, *appended);
            } else if let Err(error) = &result {
                tracing::error!(%error, "an append failed; the log refuses further writes");
            }
            let _ = tx.send(result);
        });
        failpoint::crash(points.submitted);
        rx
    }

    /// Waits for a submitted append.
    async fn durable(rx: AppendRx) -> Result<Appended> {
        match rx.await {
            Ok(Ok(appended)) => Ok(appended),
            Ok(Err(error)) => Err(Refusal::Unavailable(format!(
                "the write failed and the server stopped accepting writes ({error}); restart it to recover"
            ))),
            Err(_) => Err(Refusal::Unavailable("the log closed before the write completed".into())),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if *self.closing.borrow() {
            return Err(Refusal::Unavailable(
                "the server is shutting down; retry against the next instance".into(),
            ));
        }
        if self.log.is_poisoned() {
            return Err(Refusal::Unavailable(
                "the log failed and the server stopped accepting writes (fail-stop); restart it to recover".into(),
            ));
        }
        Ok(())
    }

    // ---- agents -------------------------------------------------------------------------

    /// Registers or updates an agent; returns whether it is new.
    pub async fn upsert_agent(self: &Arc<Self>, agent: Agent) -> Result<bool> {
        self.check_writable()?;
        let now = self.clock.now_ms();
        let (created, rx) = {
            let core = self.lock();
            let created = !core.agents.contains_key(&agent.id);
            let record = Record::AgentUpserted(agent);
            let rx = self.submit(AGENT, now, vec![record.clone()], move |broker, appended| {
                let mut core = broker.lock();
                core.delivery.apply(&record, appended.first, now);
                let Record::AgentUpserted(agent) = record else {
                    unreachable!("built above")
                };
                match core.agents.get_mut(&agent.id) {
                    Some(registered) => registered.agent = agent,
                    None => {
                        core.agents.insert(agent.id.clone(), Registered::new(agent));
                    }
                }
            });
            (created, rx)
        };
        Self::durable(rx).await?;
        Ok(created)
    }

    /// Removes an agent with its inbox and dead letters; `false` if it was not registered.
    pub async fn delete_agent(self: &Arc<Self>, id: &str) -> Result<bool> {
        self.check_writable()?;
        let now = self.clock.now_ms();
        let rx = {
            let core = self.lock();
            if !core.agents.contains_key(id) {
                return Ok(false);
            }
            let record = Record::AgentDeleted {
                agent: id.to_owned(),
            };
            self.submit(AGENT, now, vec![record.clone()], move |broker, appended| {
                let mut core = broker.lock();
                core.delivery.apply(&record, appended.first, now);
                if let Record::AgentDeleted { agent } = &record {
                    core.agents.remove(agent);
                    if let Some(notify) = core.waiters.remove(agent) {
                        notify.notify_waiters();
                    }
                }
            })
        };
        Self::durable(rx).await?;
        Ok(true)
    }

    fn view(&self, core: &Core, registered: &Registered, now: u64) -> AgentView {
        let ttl = millis(self.config.presence_ttl);
        let policy = self.policy(Some(&registered.agent));
        AgentView {
            agent: registered.agent.clone(),
            last_seen_ms: registered.last_seen_ms,
            online: registered
                .last_seen_ms
                .is_some_and(|seen| now.saturating_sub(seen) <= ttl),
            depth: core.delivery.depth(&registered.agent.id),
            receivers: registered.receivers,
            throttled: core.delivery.at_cap(&registered.agent.id, &policy),
        }
    }

    /// One agent, if registered.
    pub fn agent(&self, id: &str) -> Option<AgentView> {
        let now = self.clock.now_ms();
        let core = self.lock();
        core.agents.get(id).map(|r| self.view(&core, r, now))
    }

    /// Every agent (with `capability`, if given), by id.
    pub fn agents(&self, capability: Option<&str>) -> Vec<AgentView> {
        let now = self.clock.now_ms();
        let core = self.lock();
        let mut views: Vec<AgentView> = core
            .agents
            .values()
            .filter(|r| capability.is_none_or(|c| r.agent.capabilities.iter().any(|x| x == c)))
            .map(|r| self.view(&core, r, now))
            .collect();
        views.sort_by(|a, b| a.agent.id.cmp(&b.agent.id));
        views
    }

    /// Marks an agent as seen now; `None` if it is not registered.
    pub fn heartbeat(&self, id: &str) -> Option<AgentView> {
        let now = self.clock.now_ms();
        let mut core = self.lock();
        core.agents.get_mut(id)?.last_seen_ms = Some(now);
        core.agents.get(id).map(|r| self.view(&core, r, now))
    }

    // ---- publish ------------------------------------------------------------------------

    /// Publishes messages all-or-nothing: every destination must exist and have room, or
    /// nothing is written. Returns one result per message, in order, once durable.
    pub async fn publish(self: &Arc<Self>, outgoing: Vec<Outgoing>) -> Result<Vec<Published>> {
        self.check_writable()?;
        let now = self.clock.now_ms();
        let staged = {
            let mut core = self.lock();
            self.check_publish(&mut core, &outgoing, now)?;
            self.stage_publish(&mut core, outgoing, now)?
        };
        let mut results = staged.results;
        if let Some((written, rx)) = staged.append {
            let appended = Self::durable(rx).await?;
            for (n, (i, id)) in written.into_iter().enumerate() {
                results[i] = Some(Published {
                    id,
                    offset: appended.first.0 + n as u64,
                    duplicate: false,
                });
            }
        }
        for (i, id, mut wait) in staged.waits {
            let offset = wait
                .wait_for(Option::is_some)
                .await
                .map_err(|_| {
                    Refusal::Unavailable("the first publish of this id failed; retry it".into())
                })?
                .expect("waited for Some");
            results[i] = Some(Published {
                id,
                offset,
                duplicate: true,
            });
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every message has a result"))
            .collect())
    }

    fn check_publish(&self, core: &mut Core, outgoing: &[Outgoing], now: u64) -> Result<()> {
        let mut adding: HashMap<&str, u64> = HashMap::new();
        for o in outgoing {
            for inbox in &o.message.destinations {
                if !core.agents.contains_key(inbox) {
                    return Err(Refusal::UnknownAgent(inbox.clone()));
                }
                *adding.entry(inbox).or_default() += 1;
            }
        }
        for (inbox, n) in adding {
            let d = core.delivery.depth(inbox);
            let depth = d.ready + d.in_flight;
            if depth + n > self.config.limits.max_inbox_depth {
                return Err(Refusal::InboxFull {
                    agent: inbox.to_owned(),
                    depth,
                });
            }
        }
        let rate = self.config.limits.publish_rate;
        if rate > 0 {
            let mut per_sender: HashMap<&str, f64> = HashMap::new();
            for o in outgoing {
                *per_sender.entry(&o.message.from).or_default() += 1.0;
            }
            for (from, n) in per_sender {
                let Some(sender) = core.agents.get_mut(from) else {
                    continue; // unregistered senders are limited by their destinations only
                };
                let elapsed = now.saturating_sub(sender.tokens_at_ms) as f64 / 1000.0;
                let capacity = f64::from(rate);
                let tokens = (sender.tokens + elapsed * capacity).min(capacity);
                if tokens < n {
                    return Err(Refusal::RateLimited {
                        agent: from.to_owned(),
                        rate,
                    });
                }
                sender.tokens = tokens - n;
                sender.tokens_at_ms = now;
            }
        }
        Ok(())
    }

    /// Decides a publish: duplicates are answered from memory or the index, the rest become
    /// `Message` records, submitted now and applied to memory when durable.
    fn stage_publish(
        self: &Arc<Self>,
        core: &mut Core,
        outgoing: Vec<Outgoing>,
        now: u64,
    ) -> Result<Staged> {
        let window = millis(self.config.dedupe_window);
        let mut staged = Staged {
            results: vec![None; outgoing.len()],
            waits: Vec::new(),
            append: None,
        };
        let mut written = Vec::new();
        let mut records = Vec::new();
        let mut ids: Vec<Option<(String, watch::Sender<Option<u64>>)>> = Vec::new();
        for (i, o) in outgoing.into_iter().enumerate() {
            if let Some(id) = &o.client_id {
                match core.recall(id, now) {
                    Some(Remembered::Done { offset }) => {
                        staged.results[i] = Some(Published {
                            id: id.clone(),
                            offset,
                            duplicate: true,
                        });
                        continue;
                    }
                    Some(Remembered::Pending(rx)) => {
                        staged.waits.push((i, id.clone(), rx));
                        continue;
                    }
                    None => {}
                }
            }
            let mut message = o.message;
            message.not_before_ms = (o.delay_ms > 0).then(|| now.saturating_add(o.delay_ms));
            message.expires_at_ms = (o.ttl_ms > 0).then(|| now.saturating_add(o.ttl_ms));
            if let Some(id) = o.client_id {
                message.id.clone_from(&id);
                message.dedupe_until_ms = Some(now.saturating_add(window));
                let (tx, rx) = watch::channel(None);
                core.committing.insert(id.clone(), rx);
                ids.push(Some((id, tx)));
            } else {
                message.id = new_id(now).to_string();
                ids.push(None);
            }
            written.push((i, message.id.clone()));
            records.push(Record::Message(message));
        }
        if records.is_empty() {
            return Ok(staged);
        }
        // What delivery needs of each message, without its body.
        let arrivals: Vec<Arrival> = records
            .iter()
            .filter_map(|r| match r {
                Record::Message(m) => Some(Arrival::of(m)),
                _ => None,
            })
            .collect();
        let rx = self.submit(PUBLISH, now, records, move |broker, appended| {
            broker.messages_durable(&arrivals, ids, appended, now);
        });
        staged.append = Some((written, rx));
        Ok(staged)
    }

    /// Applies durable `Message` records to memory (in commit order, from the log's
    /// writer thread), which remembers their client ids, and wakes the long-polls and any
    /// duplicate publish waiting for the offset.
    fn messages_durable(
        &self,
        arrivals: &[Arrival],
        ids: Vec<Option<(String, watch::Sender<Option<u64>>)>>,
        appended: Appended,
        now: u64,
    ) {
        let mut core = self.lock();
        let mut woken = Vec::new();
        for (n, (arrival, id)) in arrivals.iter().zip(ids).enumerate() {
            let offset = Offset(appended.first.0 + n as u64);
            woken.extend(core.delivery.arrive(arrival, offset, now));
            if let Some((id, tx)) = id {
                core.committing.remove(&id);
                tx.send_replace(Some(offset.0));
            }
        }
        core.wake(&woken);
        self.poke_sweeper(&core);
    }
}

/// Rebuilds the in-memory delivery state and the agent registry from a recovered index
/// (which recovery made current with the log). Start-up and the model test both use it.
pub fn recover_state(
    index: &Index,
) -> std::result::Result<(delivery::State, Vec<Agent>), courier_storage::Error> {
    let mut state = delivery::State::new();
    let agents = index.agents()?;
    for agent in &agents {
        state.open_inbox(&agent.id);
        for entry in index.inbox(&agent.id) {
            let entry = entry?;
            state.load_entry(&agent.id, entry.slot, entry.value);
        }
        for dead in index.dead_letters(&agent.id, None, usize::MAX)? {
            state.load_dead(&agent.id, dead);
        }
    }
    for (id, offset, until_ms) in index.remembered()? {
        state.load_remembered(&id, offset, until_ms);
    }
    state.load_clock(index.clock()?);
    Ok((state, agents))
}

/// A duration in whole milliseconds (saturating), the unit of every time in the core.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// What a receive asks for.
#[derive(Debug, Clone, Copy)]
pub struct ReceiveRequest {
    /// Most messages to return.
    pub max: usize,
    /// How long to wait for the first one.
    pub wait: Duration,
    /// Lease length; `None`: the agent's, else the server's.
    pub lease_ms: Option<u64>,
}

impl Broker {
    // ---- receive, ack, nack, extend ------------------------------------------------------

    /// Long-poll: leases up to `max` ready messages of `agent`, waiting up to `wait` for the
    /// first. Wakes on the append that makes a message ready, never by polling.
    pub async fn receive(
        self: &Arc<Self>,
        agent: &str,
        request: ReceiveRequest,
    ) -> Result<Vec<Delivered>> {
        let notify = {
            let mut core = self.lock();
            let max_receivers = self.config.limits.max_receivers;
            let now = self.clock.now_ms();
            let registered = core
                .agents
                .get_mut(agent)
                .ok_or_else(|| Refusal::UnknownAgent(agent.to_owned()))?;
            if registered.receivers >= max_receivers {
                return Err(Refusal::TooManyReceivers {
                    agent: agent.to_owned(),
                    open: registered.receivers,
                });
            }
            registered.receivers += 1;
            registered.last_seen_ms = Some(now);
            core.waiters.entry(agent.to_owned()).or_default().clone()
        };
        let _open = OpenReceive {
            broker: self,
            agent,
        };
        let mut closing = self.closing.subscribe();
        let deadline = tokio::time::Instant::now() + request.wait;
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(rx) = self.try_lease(agent, request)? {
                return self.deliver(rx).await;
            }
            if *closing.borrow_and_update() {
                return Ok(Vec::new());
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(deadline) => return Ok(Vec::new()),
                _ = closing.changed() => return Ok(Vec::new()),
            }
        }
    }

    /// Leases what is ready now, if anything: decided, applied and submitted under the lock.
    fn try_lease(
        self: &Arc<Self>,
        agent: &str,
        request: ReceiveRequest,
    ) -> Result<Option<(Vec<courier_storage::Lease>, AppendRx)>> {
        let now = self.clock.now_ms();
        let mut core = self.lock();
        let registered = core.registered(agent)?;
        let policy = self.policy(Some(&registered.agent));
        let lease_ms = request
            .lease_ms
            .unwrap_or_else(|| self.lease_of(&registered.agent));
        let leases = core
            .delivery
            .lease(agent, request.max, now, lease_ms, &policy);
        if leases.is_empty() {
            return Ok(None);
        }
        self.check_writable()?;
        let record = Record::Leased {
            inbox: agent.to_owned(),
            leases: leases.clone(),
        };
        core.delivery.apply(&record, Offset(0), now);
        let rx = self.submit(LEASE, now, vec![record], |_, _| {});
        self.poke_sweeper(&core);
        Ok(Some((leases, rx)))
    }

    /// The lease an extend without `lease_ms` gets: the agent's, else the server's.
    pub fn lease_ms_of(&self, agent: &str) -> u64 {
        let core = self.lock();
        core.agents
            .get(agent)
            .map_or_else(|| millis(self.config.lease), |r| self.lease_of(&r.agent))
    }

    /// The lease of `agent`'s deliveries: its own `lease_ms`, else the server's `lease`.
    fn lease_of(&self, agent: &Agent) -> u64 {
        agent.lease_ms.unwrap_or_else(|| millis(self.config.lease))
    }

    /// Waits for a lease to be durable, then reads its messages.
    async fn deliver(
        &self,
        (leases, rx): (Vec<courier_storage::Lease>, AppendRx),
    ) -> Result<Vec<Delivered>> {
        Self::durable(rx).await?;
        let mut delivered = Vec::with_capacity(leases.len());
        for lease in leases {
            // A message that age retention deleted meanwhile is gone: nothing to deliver.
            let Some(frame) = self.read_message(lease.slot.offset)? else {
                continue;
            };
            delivered.push(Delivered {
                frame,
                attempt: lease.attempt,
                receipt: Receipt {
                    slot: lease.slot,
                    attempt: lease.attempt,
                }
                .encode(),
                lease_deadline_ms: lease.deadline_ms,
            });
        }
        Ok(delivered)
    }

    /// Reads a message; `None` if retention deleted its segment.
    fn read_message(&self, offset: Offset) -> Result<Option<Frame>> {
        match self.log.read(offset) {
            Ok(frame) => Ok(Some(frame)),
            Err(courier_storage::Error::NotFound(_)) => Ok(None),
            Err(error) => Err(Refusal::Unavailable(format!(
                "reading message {offset} failed: {error}"
            ))),
        }
    }

    /// Acks, nacks or extends leases of `agent`; one outcome per receipt, once durable.
    pub async fn settle(
        self: &Arc<Self>,
        agent: &str,
        receipts: &[String],
        how: Settle,
    ) -> Result<Vec<Outcome>> {
        let now = self.clock.now_ms();
        let parsed: Vec<Option<Receipt>> = receipts.iter().map(|r| Receipt::parse(r)).collect();
        let (outcomes, rx) = {
            let mut core = self.lock();
            let policy = self.policy(Some(&core.registered(agent)?.agent));
            let (outcomes, records) = core.delivery.settle(agent, &parsed, how, now, &policy);
            if records.is_empty() {
                return Ok(outcomes);
            }
            self.check_writable()?;
            let mut woken = Vec::new();
            for record in &records {
                woken.extend(core.delivery.apply(record, Offset(0), now));
                log_dead_letters(record);
            }
            woken.extend(core.delivery.promote(now));
            core.wake(&woken);
            self.poke_sweeper(&core);
            (
                outcomes,
                self.submit(settle_points(how), now, records, |_, _| {}),
            )
        };
        Self::durable(rx).await?;
        Ok(outcomes)
    }

    // ---- dead letters ---------------------------------------------------------------------

    /// Dead letters of `agent` above `after`, oldest first, at most `limit`.
    pub fn dead_letters(
        &self,
        agent: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<DeadView>> {
        let dead = {
            let core = self.lock();
            core.registered(agent)?;
            core.delivery.dead_letters(agent, after, limit)
        };
        let mut views = Vec::with_capacity(dead.len());
        for dead in dead {
            if let Some(frame) = self.read_message(dead.slot.offset)? {
                views.push(DeadView { frame, dead });
            }
        }
        Ok(views)
    }

    /// Moves dead letters back into the inbox with attempts reset; `None` redrives all.
    pub async fn redrive(self: &Arc<Self>, agent: &str, offsets: Option<&[u64]>) -> Result<usize> {
        let now = self.clock.now_ms();
        let (count, rx) = {
            let mut core = self.lock();
            core.registered(agent)?;
            let Some(record) = core.delivery.redrive(agent, offsets) else {
                return Ok(0);
            };
            self.check_writable()?;
            let count = match &record {
                Record::Redriven { slots, .. } => slots.len(),
                _ => 0,
            };
            let woken = core.delivery.apply(&record, Offset(0), now);
            core.wake(&woken);
            tracing::info!(agent, count, "redrove dead letters");
            (count, self.submit(REDRIVE, now, vec![record], |_, _| {}))
        };
        Self::durable(rx).await?;
        Ok(count)
    }

    // ---- sweeper --------------------------------------------------------------------------

    /// One sweep at the current time: promotes delayed messages whose time came, releases or
    /// dead-letters expired leases, dead-letters expired messages. Returns how long to sleep
    /// (until the earliest timer, at most a second). Only due timers are read.
    pub fn sweep(self: &Arc<Self>) -> Duration {
        let now = self.clock.now_ms();
        let mut core = self.lock();
        let mut woken = core.delivery.promote(now);
        let writable = self.check_writable().is_ok();
        if writable {
            let tick = {
                let core = &*core;
                core.delivery.tick(now, |inbox| {
                    self.policy(core.agents.get(inbox).map(|r| &r.agent))
                })
            };
            if !tick.records.is_empty() {
                for record in &tick.records {
                    woken.extend(core.delivery.apply(record, Offset(0), now));
                    log_dead_letters(record);
                }
                woken.extend(core.delivery.promote(now));
                // Not awaited: these are the server's own decisions; if they are lost in a
                // crash, the next start decides them again from the recovered state.
                let points = if tick
                    .records
                    .iter()
                    .any(|r| matches!(r, Record::DeadLettered { .. }))
                {
                    DEAD_LETTER
                } else {
                    EXPIRY
                };
                drop(self.submit(points, now, tick.records, |_, _| {}));
            }
        }
        core.wake(&woken);
        // At least every second, so a clock anomaly can never stall the sweeper. Stored under
        // the lock, where every `poke_sweeper` compares with it.
        // A log that takes no writes leaves due timers due: then look once a second only.
        let sleep_ms = match core.delivery.next_due_ms() {
            Some(due) if writable => due.saturating_sub(now).clamp(1, 1000),
            _ => 1000,
        };
        self.sweeper_wakes_at_ms
            .store(now.saturating_add(sleep_ms), Ordering::Release);
        Duration::from_millis(sleep_ms)
    }

    /// Runs the sweeper until shutdown: sleeps until the earliest timer, or until woken by a
    /// change that may have added an earlier one.
    pub async fn run_sweeper(self: Arc<Self>) {
        let mut closing = self.closing.subscribe();
        loop {
            let woken = self.sweeper.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let sleep = self.sweep();
            if *closing.borrow_and_update() {
                return;
            }
            tokio::select! {
                () = &mut woken => {}
                () = tokio::time::sleep(sleep) => {}
                _ = closing.changed() => return,
            }
        }
    }

    // ---- retention ------------------------------------------------------------------------

    /// Deletes whole old segments per `retention.*` (blocking: call it off the async threads).
    /// When age retention dropped messages that were still pending, the log holds a
    /// `Truncated` record; the in-memory state forgets the same messages.
    pub fn enforce_retention(&self) -> std::result::Result<usize, courier_storage::Error> {
        let retention = courier_storage::Retention {
            max_bytes: self.config.retention_max_bytes,
            max_age_ms: self.config.retention_max_age.map(millis),
        };
        if retention.max_bytes.is_none() && retention.max_age_ms.is_none() {
            return Ok(0);
        }
        let deleted = self.log.enforce_retention(retention, self.clock.now_ms())?;
        if !deleted.is_empty() {
            let below = self
                .log
                .segments()
                .first()
                .map_or(Offset(0), |segment| segment.base);
            let now = self.clock.now_ms();
            let mut core = self.lock();
            core.delivery
                .apply(&Record::Truncated { below }, Offset(0), now);
            tracing::info!(
                segments = deleted.len(),
                below = below.0,
                "retention deleted old segments"
            );
        }
        Ok(deleted.len())
    }

    /// Runs retention at start and then every `interval` until shutdown.
    pub async fn run_retention(self: Arc<Self>, interval: Duration) {
        let mut closing = self.closing.subscribe();
        loop {
            let broker = self.clone();
            match tokio::task::spawn_blocking(move || broker.enforce_retention()).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => tracing::error!(%error, "retention failed"),
                Err(error) => tracing::error!(%error, "retention task failed"),
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                _ = closing.changed() => return,
            }
        }
    }

    // ---- stats ----------------------------------------------------------------------------

    /// Log figures and per-agent counts.
    pub fn stats(&self) -> Stats {
        Stats {
            durable_end: self.log.durable_end().0,
            segments: self.log.segments(),
            log: self.log.stats(),
            agents: self.agents(None),
        }
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
    /// Every agent with its counts.
    pub agents: Vec<AgentView>,
}

/// Counts an open receive call while it lives.
struct OpenReceive<'a> {
    broker: &'a Broker,
    agent: &'a str,
}

impl Drop for OpenReceive<'_> {
    fn drop(&mut self) {
        if let Some(registered) = self.broker.lock().agents.get_mut(self.agent) {
            registered.receivers = registered.receivers.saturating_sub(1);
        }
    }
}

/// The crash points around one kind of write, for the crash-safety tests (feature
/// `failpoints`, see [`courier_storage::failpoint`]): once its records are decided and
/// submitted (in memory, not yet durable), and once they are durable (before any answer).
#[derive(Debug, Clone, Copy)]
struct CrashPoints {
    submitted: &'static str,
    durable: &'static str,
}

const fn points(submitted: &'static str, durable: &'static str) -> CrashPoints {
    CrashPoints { submitted, durable }
}

const PUBLISH: CrashPoints = points("publish.submitted", "publish.durable");
const LEASE: CrashPoints = points("lease.submitted", "lease.durable");
const ACK: CrashPoints = points("ack.submitted", "ack.durable");
const NACK: CrashPoints = points("nack.submitted", "nack.durable");
const EXTEND: CrashPoints = points("extend.submitted", "extend.durable");
const EXPIRY: CrashPoints = points("expiry.submitted", "expiry.durable");
const DEAD_LETTER: CrashPoints = points("dead_letter.submitted", "dead_letter.durable");
const REDRIVE: CrashPoints = points("redrive.submitted", "redrive.durable");
const AGENT: CrashPoints = points("agent.submitted", "agent.durable");

fn settle_points(how: Settle) -> CrashPoints {
    match how {
        Settle::Ack => ACK,
        Settle::Nack {
            dead_letter: true, ..
        } => DEAD_LETTER,
        Settle::Nack { .. } => NACK,
        Settle::Extend { .. } => EXTEND,
    }
}

fn log_dead_letters(record: &Record) {
    if let Record::DeadLettered { inbox, letters } = record {
        for letter in letters {
            tracing::info!(
                agent = %inbox,
                offset = letter.slot.offset.0,
                reason = letter.reason.as_str(),
                attempts = letter.attempts,
                "dead-lettered a message"
            );
        }
    }
}

/// A publish decided under the lock, waiting for its append.
struct Staged {
    /// Per message: known now (duplicates of committed ids), or filled in later.
    results: Vec<Option<Published>>,
    /// Duplicates of ids whose first publish is still being committed.
    waits: Vec<(usize, String, watch::Receiver<Option<u64>>)>,
    /// The indexes and ids of the messages written, in record order, and the append's outcome.
    append: Option<(Vec<(usize, String)>, AppendRx)>,
}

type AppendRx = oneshot::Receiver<std::result::Result<Appended, courier_storage::Error>>;

/// A server-assigned message id: a ULID whose time part is `now_ms` and whose random part
/// is a random start (drawn once per process) plus a counter, so ids are unique and sort by
/// time within a process without a random draw per message.
fn new_id(now_ms: u64) -> ulid::Ulid {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static START: OnceLock<u128> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let start = *START.get_or_init(|| ulid::Ulid::new().random() >> 16);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let random = start.wrapping_add(u128::from(count)) & ((1u128 << 80) - 1);
    ulid::Ulid::from_parts(now_ms, random)
}
