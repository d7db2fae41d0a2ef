//! The delivery core: inboxes, leases, attempts, timers and dead letters, in memory.
//!
//! Pure: no I/O, no clock (`now_ms` is an argument), no locks. The broker owns one
//! [`State`] behind a mutex and uses it in two ways:
//!
//! - **Decisions** (`lease`, `settle`, `tick`, `redrive`) read the state and return the
//!   [`Record`]s that would carry them out, without changing anything.
//! - **[`State::apply`]** changes the state by one record. What a record changes is
//!   [`courier_storage::state::apply`], the one state machine that the storage index applies
//!   too; `State` is only a [`Store`] of it: maps in memory, with a ready set and a timer set
//!   kept in step so that decisions are cheap.
//!
//! **Invariant:** every change to delivery state is a record. The in-memory state is the
//! result of applying records in log order (the broker applies and submits under one lock),
//! so it can always be rebuilt from the index, which is itself rebuilt from the log.

pub mod backoff;
mod nonces;
mod receipt;
mod routing;
mod store;

pub use nonces::{NonceKey, Nonces};
pub use receipt::{Outcome, Receipt, Settle};
pub use routing::TopicView;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use courier_storage::state::{
    queue_of, DeadEntry, EntryState, EntryValue, RequestValue, TimerKind, TopicSeen,
};
use courier_storage::{DeadLetter, DeadReason, Lease, Offset, Record, Release, Slot};

use crate::config::Backoff;
use crate::ids::TopicPattern;

/// An inbox's order: higher priority first, then lower offset.
type Key = (u8, u64);

fn key(slot: Slot) -> Key {
    (9 - slot.priority.min(9), slot.offset.0)
}

fn slot(key: Key) -> Slot {
    Slot {
        offset: Offset(key.1),
        priority: 9 - key.0,
    }
}

/// A deadline: (due ms, kind, inbox, message).
type Timer = (u64, TimerKind, Arc<str>, Key);

/// The first timer that is not due at `now_ms`: every timer before it is.
fn first_not_due(now_ms: u64) -> Timer {
    (
        now_ms.saturating_add(1),
        TimerKind::Due,
        Arc::from(""),
        (0, 0),
    )
}

/// The delivery settings that apply to one inbox (the agent's, else the server's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Deliveries before dead-lettering.
    pub max_attempts: u32,
    /// Most messages leased at once, if capped.
    pub max_in_flight: Option<u32>,
    /// Redelivery backoff after an expired lease.
    pub backoff: Backoff,
}

/// Counts of one inbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Depth {
    /// Pending and not leased (including delayed ones).
    pub ready: u64,
    /// Leased.
    pub in_flight: u64,
    /// Dead letters.
    pub dead_letters: u64,
}

/// One inbox: an agent's, or a capability queue's (`capability:<name>`).
#[derive(Debug, Default)]
struct Inbox {
    /// Every pending message (ready, delayed or leased) and its state.
    entries: BTreeMap<Key, EntryValue>,
    /// The pending messages deliverable now, in delivery order.
    ready: BTreeSet<Key>,
    /// How many entries are leased.
    in_flight: u64,
    /// Dead letters by offset.
    dead: BTreeMap<u64, DeadEntry>,
    /// In a queue: the agent that holds each leased entry.
    holders: HashMap<Key, Arc<str>>,
    /// The ordering key of each message pending or dead here that has one, by offset.
    ordering: HashMap<u64, Arc<str>>,
    /// Per ordering key, its pending entries in offset order, (offset, rank): only the first
    /// (the key's head) may be ready; the others wait until it is acked or dead-lettered.
    lines: HashMap<Arc<str>, BTreeSet<(u64, u8)>>,
}

impl Inbox {
    /// Puts a new pending entry in its ordering key's line, if it has a key. An entry that
    /// joins ahead of the line's head (a redriven dead letter, a backfilled earlier message,
    /// or loading at start in priority order) becomes the head: the one it displaces is no
    /// longer ready. (A displaced head already leased stays leased: after a redrive into a
    /// key whose next message is in flight, two of the key may be in flight once.)
    fn join_line(&mut self, k: Key) {
        let Some(key) = self.ordering.get(&k.1) else {
            return;
        };
        let line = self.lines.entry(key.clone()).or_default();
        line.insert((k.1, k.0));
        let mut members = line.iter();
        if members.next() == Some(&(k.1, k.0)) {
            if let Some(&(offset, rank)) = members.next() {
                self.ready.remove(&(rank, offset));
            }
        }
    }

    /// Whether `k` may be delivered as far as ordering goes: it has no key, or heads its
    /// key's line.
    fn is_head(&self, k: Key) -> bool {
        let Some(line) = self.ordering.get(&k.1) else {
            return true;
        };
        self.lines
            .get(line)
            .and_then(BTreeSet::first)
            .is_none_or(|(offset, _)| *offset == k.1)
    }

    /// Takes a settled entry out of its line; the next one there, now the head, becomes
    /// ready if it is due.
    fn leave_line(&mut self, k: Key) {
        let Some(key) = self.ordering.get(&k.1) else {
            return;
        };
        let Some(line) = self.lines.get_mut(key) else {
            return;
        };
        let was_head = line.first() == Some(&(k.1, k.0));
        line.remove(&(k.1, k.0));
        match line.first() {
            None => {
                let key = key.clone();
                self.lines.remove(&key);
            }
            Some(&(offset, rank)) if was_head => {
                let next = (rank, offset);
                let due = self.entries.get(&next).is_some_and(|v| {
                    v.state
                        == EntryState::Ready {
                            not_before_ms: None,
                        }
                });
                if due {
                    self.ready.insert(next);
                }
            }
            Some(_) => {}
        }
    }
}

/// The delivery state of every inbox, the timers that drive the sweeper, and the client ids
/// remembered for dedupe.
#[derive(Debug, Default)]
pub struct State {
    inboxes: HashMap<Arc<str>, Inbox>,
    /// Every deadline, earliest first: the sweeper reads only the due ones.
    timers: BTreeSet<Timer>,
    /// Remembered client ids: the offset first published with each, and until when.
    remembered: HashMap<String, (Offset, u64)>,
    /// Expiries of `remembered`, earliest first (an id may be listed again after a repeat).
    expiries: BTreeSet<(u64, String)>,
    /// The latest record timestamp applied: remembered ids are forgotten by it.
    clock_ms: u64,
    /// Subscriptions by agent: pattern → the first offset it covers.
    subscriptions: BTreeMap<String, BTreeMap<TopicPattern, Offset>>,
    /// Topics that messages were published to, by name.
    topics: BTreeMap<String, TopicSeen>,
    /// Backfills under way: (agent, pattern) → the next offset to consider.
    backfills: BTreeMap<(String, String), Offset>,
    /// The highest point retention truncated the log at.
    truncated_below: Offset,
    /// Queue leases held, by agent (counted against its `max_in_flight`).
    held: HashMap<Arc<str>, u64>,
    /// Remembered requests by id.
    requests: HashMap<String, RequestValue>,
    /// Expiries of `requests`, earliest first.
    request_expiries: BTreeSet<(u64, String)>,
    /// Used nonces of signed requests.
    nonces: Nonces,
}

/// A message chosen by [`State::lease`]: from the agent's inbox, or from a capability queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draw {
    /// The queue's inbox name, or `None` for the agent's own inbox.
    pub queue: Option<Arc<str>>,
    /// The lease.
    pub lease: Lease,
}

impl Draw {
    /// The receipt that names this delivery.
    pub fn receipt(&self) -> Receipt {
        Receipt {
            slot: self.lease.slot,
            attempt: self.lease.attempt,
            queue: self.queue.as_deref().map(str::to_owned),
        }
    }
}

/// What a sweeper tick decided.
#[derive(Debug, Default)]
pub struct Tick {
    /// Records to append: releases and dead letters of expired leases and ttls.
    pub records: Vec<Record>,
}

impl State {
    /// An empty state.
    pub fn new() -> Self {
        Self::default()
    }

    fn name(&self, inbox: &str) -> Arc<str> {
        self.inboxes
            .get_key_value(inbox)
            .map_or_else(|| Arc::from(inbox), |(name, _)| name.clone())
    }

    fn inbox_mut(&mut self, inbox: &str) -> (Arc<str>, &mut Inbox) {
        let name = self.name(inbox);
        let inbox = self.inboxes.entry(name.clone()).or_default();
        (name, inbox)
    }

    /// Makes delayed and backed-off messages whose time has come deliverable. Returns the
    /// inboxes that gained ready messages. Costs O(log n) per due timer, nothing for others.
    pub fn promote(&mut self, now_ms: u64) -> Vec<Arc<str>> {
        let mut woken: Vec<Arc<str>> = Vec::new();
        let due: Vec<Timer> = self
            .timers
            .range(..first_not_due(now_ms))
            .filter(|t| t.1 == TimerKind::Due)
            .cloned()
            .collect();
        for (_, _, name, k) in due {
            let Some(inbox) = self.inboxes.get_mut(&name) else {
                continue;
            };
            if let Some(value) = inbox.entries.get(&k) {
                if let EntryState::Ready {
                    not_before_ms: Some(_),
                } = value.state
                {
                    let mut value = *value;
                    value.state = EntryState::Ready {
                        not_before_ms: None,
                    };
                    // Through `put`, so that the timer goes; the entry's record is unchanged
                    // (the index keeps `not_before_ms`, which is in the past and means the same).
                    self.put(&name, k, value);
                    if woken.last() != Some(&name) {
                        woken.push(name);
                    }
                }
            }
        }
        woken
    }

    /// Chooses up to `max` ready messages of `agent`'s inbox and of the capability `queues`
    /// (inbox names) it draws from, merged in delivery order (priority, then offset), and
    /// returns their leases (attempt + 1, deadline `now + lease_ms`). Respects
    /// `max_in_flight`, which counts the agent's queue leases too.
    pub fn lease(
        &mut self,
        agent: &str,
        queues: &[String],
        max: usize,
        now_ms: u64,
        lease_ms: u64,
        policy: &Policy,
    ) -> Vec<Draw> {
        self.promote(now_ms);
        let room = policy.max_in_flight.map_or(usize::MAX, |cap| {
            usize::try_from(u64::from(cap).saturating_sub(self.in_flight_of(agent)))
                .unwrap_or(usize::MAX)
        });
        let want = max.min(room);
        let mut chosen: Vec<(Key, Option<&Arc<str>>, &Inbox)> = Vec::new();
        if let Some(inbox) = self.inboxes.get(agent) {
            chosen.extend(inbox.ready.iter().take(want).map(|k| (*k, None, inbox)));
        }
        for queue in queues {
            if let Some((name, inbox)) = self.inboxes.get_key_value(queue.as_str()) {
                chosen.extend(
                    inbox
                        .ready
                        .iter()
                        .take(want)
                        .map(|k| (*k, Some(name), inbox)),
                );
            }
        }
        if !queues.is_empty() {
            chosen.sort_by_key(|(k, _, _)| *k);
        }
        chosen
            .into_iter()
            .take(want)
            .map(|(k, queue, inbox)| Draw {
                queue: queue.cloned(),
                lease: Lease {
                    slot: slot(k),
                    attempt: inbox.entries[&k].attempts + 1,
                    deadline_ms: now_ms.saturating_add(lease_ms),
                },
            })
            .collect()
    }

    /// The records that carry out `agent`'s draws: `Leased` for its inbox, `LeasedTo` per
    /// queue.
    pub fn lease_records(agent: &str, draws: &[Draw]) -> Vec<Record> {
        let mut own = Vec::new();
        let mut per_queue: BTreeMap<&str, Vec<Lease>> = BTreeMap::new();
        for draw in draws {
            match &draw.queue {
                None => own.push(draw.lease),
                Some(queue) => per_queue.entry(queue).or_default().push(draw.lease),
            }
        }
        let mut records = Vec::new();
        if !own.is_empty() {
            records.push(Record::Leased {
                inbox: agent.to_owned(),
                leases: own,
            });
        }
        records.extend(
            per_queue
                .into_iter()
                .map(|(queue, leases)| Record::LeasedTo {
                    queue: queue.to_owned(),
                    agent: agent.to_owned(),
                    leases,
                }),
        );
        records
    }

    /// How many messages `agent` holds leased: of its inbox, and of queues.
    fn in_flight_of(&self, agent: &str) -> u64 {
        let own = self.inboxes.get(agent).map_or(0, |i| i.in_flight);
        own + self.held.get(agent).copied().unwrap_or(0)
    }

    /// Whether `agent` is at its `max_in_flight` cap.
    pub fn at_cap(&self, agent: &str, policy: &Policy) -> bool {
        policy
            .max_in_flight
            .is_some_and(|cap| self.in_flight_of(agent) >= u64::from(cap))
    }

    /// The agent that holds the lease of `s` in `queue`, if it is leased.
    pub fn holder(&self, queue: &str, s: Slot) -> Option<&Arc<str>> {
        self.inboxes.get(queue)?.holders.get(&key(s))
    }

    /// Decides to hand back every queue lease `agent` holds, ready at `now_ms` (on its
    /// deletion: the messages go to other capable agents now, not when the leases end).
    pub fn release_held(&self, agent: &str, now_ms: u64) -> Vec<Record> {
        let mut per_queue: BTreeMap<&str, Vec<Release>> = BTreeMap::new();
        for (name, inbox) in &self.inboxes {
            for (k, holder) in &inbox.holders {
                if &**holder == agent {
                    per_queue.entry(name).or_default().push(Release {
                        slot: slot(*k),
                        not_before_ms: now_ms,
                    });
                }
            }
        }
        per_queue
            .into_iter()
            .map(|(queue, mut releases)| {
                releases.sort_by_key(|r| key(r.slot));
                Record::Released {
                    inbox: queue.to_owned(),
                    releases,
                }
            })
            .collect()
    }

    /// The request `id`, if it is remembered.
    pub fn request(&self, id: &str) -> Option<&RequestValue> {
        self.requests.get(id)
    }

    /// The record clock: the latest record time applied (what forgets client ids, requests
    /// and nonces).
    pub fn record_clock_ms(&self) -> u64 {
        self.clock_ms
    }

    /// Whether `signer`'s `nonce` was used and still counts at `now_ms`.
    pub fn nonce_used(&self, signer: &str, nonce: &str, now_ms: u64) -> bool {
        self.nonces.used(signer, nonce, now_ms)
    }

    /// Whether `inbox` exists: a registered agent's, or a queue that messages entered.
    pub fn has_inbox(&self, inbox: &str) -> bool {
        self.inboxes.contains_key(inbox)
    }

    /// The inbox name of every capability queue that messages entered, in no order.
    pub fn queue_names(&self) -> impl Iterator<Item = &str> {
        self.inboxes
            .keys()
            .map(|name| &**name)
            .filter(|name| queue_of(name).is_some())
    }

    /// Decides `how` for each of `agent`'s receipts — of its inbox, or of queue messages
    /// whose lease it holds, or that nobody holds in a queue it `draws_from` — with each
    /// inbox's policy: the outcome per receipt and the records to append.
    pub fn settle(
        &self,
        agent: &str,
        receipts: &[Option<Receipt>],
        how: Settle,
        now_ms: u64,
        (policy_of, draws_from): (impl Fn(&str) -> Policy, impl Fn(&str) -> bool),
    ) -> (Vec<Outcome>, Vec<Record>) {
        // Per inbox: its policy (looked up once per call) and what was decided there.
        let mut decided: BTreeMap<&str, (Policy, Decided)> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        let outcomes = receipts
            .iter()
            .map(|receipt| {
                let Some(receipt) = receipt else {
                    return Outcome::Unknown;
                };
                let inbox = receipt.queue.as_deref().unwrap_or(agent);
                let k = key(receipt.slot);
                let Some(entry) = self.entry(inbox, k) else {
                    let is_dead = self
                        .inboxes
                        .get(inbox)
                        .is_some_and(|i| i.dead.contains_key(&receipt.slot.offset.0));
                    return if is_dead {
                        Outcome::Stale
                    } else {
                        Outcome::Unknown
                    };
                };
                // A queue message is this agent's to settle if it holds its lease, or if nobody
                // does and the agent draws from the queue (a late ack after the lease ended).
                let mine = match self.holder(inbox, receipt.slot) {
                    Some(holder) => &**holder == agent,
                    None => receipt.queue.is_none() || draws_from(inbox),
                };
                if !mine {
                    return Outcome::Unknown;
                }
                if entry.attempts != receipt.attempt || !seen.insert((inbox, k)) {
                    return Outcome::Stale;
                }
                let (policy, decided) = decided
                    .entry(inbox)
                    .or_insert_with(|| (policy_of(inbox), Decided::default()));
                decided.decide(receipt.slot, entry, how, now_ms, policy)
            })
            .collect();
        let records = decided
            .into_iter()
            .flat_map(|(inbox, (_, d))| {
                let holder = queue_of(inbox).map(|_| agent);
                group(inbox, holder, d)
            })
            .collect();
        (outcomes, records)
    }

    /// The sweeper's decisions at `now_ms`: expired leases are released after backoff, or
    /// dead-lettered (`max_attempts`) if that was the last attempt; messages past their ttl
    /// are dead-lettered (`expired`). Reads only the timers that are due.
    pub fn tick(&self, now_ms: u64, policy_of: impl Fn(&str) -> Policy) -> Tick {
        let mut per_inbox: BTreeMap<Arc<str>, (Vec<Release>, Vec<DeadLetter>)> = BTreeMap::new();
        let mut decided = BTreeSet::new();
        for (_, kind, name, k) in self.timers.range(..first_not_due(now_ms)) {
            let Some(entry) = self.entry(name, *k) else {
                continue;
            };
            if !decided.insert((name.clone(), *k)) {
                continue;
            }
            let (releases, letters) = per_inbox.entry(name.clone()).or_default();
            let s = slot(*k);
            // A message past its ttl dies as expired, whichever of its timers came first.
            let expired = entry.expires_at_ms.is_some_and(|at| at <= now_ms);
            match (kind, entry.state) {
                _ if expired => letters.push(DeadLetter {
                    slot: s,
                    reason: DeadReason::Expired,
                    attempts: entry.attempts,
                }),
                (TimerKind::Due, EntryState::Leased { .. }) => {
                    let policy = policy_of(name);
                    if entry.attempts >= policy.max_attempts {
                        letters.push(DeadLetter {
                            slot: s,
                            reason: DeadReason::MaxAttempts,
                            attempts: entry.attempts,
                        });
                    } else {
                        let delay = backoff::delay_ms(&policy.backoff, entry.attempts, s.offset.0);
                        releases.push(Release {
                            slot: s,
                            not_before_ms: now_ms.saturating_add(delay),
                        });
                    }
                }
                // A delay ending is a promotion, not a record (and an expiry timer that is
                // due is always expired, above).
                (TimerKind::Due, EntryState::Ready { .. }) | (TimerKind::Expiry, _) => {
                    decided.remove(&(name.clone(), *k));
                }
            }
        }
        let mut tick = Tick::default();
        for (name, (releases, letters)) in per_inbox {
            let decided = Decided {
                releases,
                letters,
                ..Decided::default()
            };
            tick.records.extend(group(&name, None, decided));
        }
        tick
    }

    /// The earliest timer, if any: when the sweeper must look again.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.timers.first().map(|t| t.0)
    }

    /// Decides a redrive of the given dead letters (`None`: all of them).
    pub fn redrive(&self, inbox: &str, offsets: Option<&[u64]>) -> Option<Record> {
        let dead = &self.inboxes.get(inbox)?.dead;
        let slots: Vec<Slot> = match offsets {
            None => dead.values().map(|d| d.slot).collect(),
            Some(offsets) => offsets
                .iter()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .filter_map(|o| dead.get(o).map(|d| d.slot))
                .collect(),
        };
        (!slots.is_empty()).then(|| Record::Redriven {
            inbox: inbox.to_owned(),
            slots,
        })
    }

    /// The counts of `inbox`.
    pub fn depth(&self, inbox: &str) -> Depth {
        self.inboxes
            .get(inbox)
            .map_or_else(Depth::default, |i| Depth {
                ready: i.entries.len() as u64 - i.in_flight,
                in_flight: i.in_flight,
                dead_letters: i.dead.len() as u64,
            })
    }

    /// Dead letters of `inbox` above `after`, oldest first, at most `limit`.
    pub fn dead_letters(&self, inbox: &str, after: Option<u64>, limit: usize) -> Vec<DeadEntry> {
        let Some(i) = self.inboxes.get(inbox) else {
            return Vec::new();
        };
        let start = after.map_or(0, |a| a.saturating_add(1));
        i.dead.range(start..).take(limit).map(|(_, d)| *d).collect()
    }

    /// The state of one pending message (tests and the model check).
    pub fn entry_of(&self, inbox: &str, s: Slot) -> Option<EntryValue> {
        self.entry(inbox, key(s)).copied()
    }
}

/// What a settle decided for one inbox.
#[derive(Debug, Default)]
struct Decided {
    acked: Vec<Slot>,
    releases: Vec<Release>,
    leases: Vec<Lease>,
    letters: Vec<DeadLetter>,
}

impl Decided {
    /// Decides `how` for one pending `entry` at `slot`, whose receipt names its current
    /// delivery.
    fn decide(
        &mut self,
        slot: Slot,
        entry: &EntryValue,
        how: Settle,
        now_ms: u64,
        policy: &Policy,
    ) -> Outcome {
        let leased_now = entry.is_leased();
        match how {
            Settle::Ack => {
                self.acked.push(slot);
                Outcome::Acked
            }
            Settle::Extend { .. } | Settle::Nack { .. } if !leased_now => Outcome::Stale,
            Settle::Extend { lease_ms } => {
                self.leases.push(Lease {
                    slot,
                    attempt: entry.attempts,
                    deadline_ms: now_ms.saturating_add(lease_ms),
                });
                Outcome::Extended
            }
            Settle::Nack { dead_letter, .. }
                if dead_letter || entry.attempts >= policy.max_attempts =>
            {
                let reason = if dead_letter {
                    DeadReason::Rejected
                } else {
                    DeadReason::MaxAttempts
                };
                self.letters.push(DeadLetter {
                    slot,
                    reason,
                    attempts: entry.attempts,
                });
                Outcome::DeadLettered
            }
            Settle::Nack { delay_ms, .. } => {
                self.releases.push(Release {
                    slot,
                    not_before_ms: now_ms.saturating_add(delay_ms),
                });
                Outcome::Nacked
            }
        }
    }
}

/// The records that carry out one inbox's decisions, in a fixed order. Leases of a queue
/// name their `holder`.
fn group(inbox: &str, holder: Option<&str>, decided: Decided) -> Vec<Record> {
    let Decided {
        acked,
        releases,
        leases,
        letters,
    } = decided;
    let inbox = inbox.to_owned();
    let mut records = Vec::new();
    if !acked.is_empty() {
        records.push(Record::Acked {
            inbox: inbox.clone(),
            slots: acked,
        });
    }
    if !releases.is_empty() {
        records.push(Record::Released {
            inbox: inbox.clone(),
            releases,
        });
    }
    if !leases.is_empty() {
        records.push(match holder {
            Some(agent) => Record::LeasedTo {
                queue: inbox.clone(),
                agent: agent.to_owned(),
                leases,
            },
            None => Record::Leased {
                inbox: inbox.clone(),
                leases,
            },
        });
    }
    if !letters.is_empty() {
        records.push(Record::DeadLettered { inbox, letters });
    }
    records
}

#[cfg(test)]
mod tests;
