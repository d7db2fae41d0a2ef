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
mod receipt;
mod routing;
mod store;

pub use receipt::{Outcome, Receipt, Settle};
pub use routing::TopicView;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use courier_storage::state::{DeadEntry, EntryState, EntryValue, TimerKind, TopicSeen};
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

/// One agent's inbox.
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

    /// Chooses up to `max` ready messages of `inbox` in delivery order and returns their
    /// leases (attempt + 1, deadline `now + lease_ms`). Respects `max_in_flight`.
    pub fn lease(
        &mut self,
        inbox: &str,
        max: usize,
        now_ms: u64,
        lease_ms: u64,
        policy: &Policy,
    ) -> Vec<Lease> {
        self.promote(now_ms);
        let Some(state_inbox) = self.inboxes.get(inbox) else {
            return Vec::new();
        };
        let room = policy.max_in_flight.map_or(usize::MAX, |cap| {
            usize::try_from(u64::from(cap).saturating_sub(state_inbox.in_flight))
                .unwrap_or(usize::MAX)
        });
        state_inbox
            .ready
            .iter()
            .take(max.min(room))
            .map(|k| Lease {
                slot: slot(*k),
                attempt: state_inbox.entries[k].attempts + 1,
                deadline_ms: now_ms.saturating_add(lease_ms),
            })
            .collect()
    }

    /// Whether `inbox` is at its `max_in_flight` cap.
    pub fn at_cap(&self, inbox: &str, policy: &Policy) -> bool {
        let in_flight = self.inboxes.get(inbox).map_or(0, |i| i.in_flight);
        policy
            .max_in_flight
            .is_some_and(|cap| in_flight >= u64::from(cap))
    }

    /// Decides `how` for each receipt: the outcome per receipt and the records to append.
    pub fn settle(
        &self,
        inbox: &str,
        receipts: &[Option<Receipt>],
        how: Settle,
        now_ms: u64,
        policy: &Policy,
    ) -> (Vec<Outcome>, Vec<Record>) {
        let mut acked = Vec::new();
        let mut released = Vec::new();
        let mut leased = Vec::new();
        let mut dead = Vec::new();
        let mut seen = BTreeSet::new();
        let outcomes = receipts
            .iter()
            .map(|receipt| {
                let Some(receipt) = receipt else {
                    return Outcome::Unknown;
                };
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
                if entry.attempts != receipt.attempt || !seen.insert(k) {
                    return Outcome::Stale;
                }
                let leased_now = matches!(entry.state, EntryState::Leased { .. });
                match how {
                    Settle::Ack => {
                        acked.push(receipt.slot);
                        Outcome::Acked
                    }
                    Settle::Extend { .. } | Settle::Nack { .. } if !leased_now => Outcome::Stale,
                    Settle::Extend { lease_ms } => {
                        leased.push(Lease {
                            slot: receipt.slot,
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
                        dead.push(DeadLetter {
                            slot: receipt.slot,
                            reason,
                            attempts: entry.attempts,
                        });
                        Outcome::DeadLettered
                    }
                    Settle::Nack { delay_ms, .. } => {
                        released.push(Release {
                            slot: receipt.slot,
                            not_before_ms: now_ms.saturating_add(delay_ms),
                        });
                        Outcome::Nacked
                    }
                }
            })
            .collect();
        let records = group(inbox, acked, released, leased, dead);
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
            tick.records
                .extend(group(&name, Vec::new(), releases, Vec::new(), letters));
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

/// The records that carry out one inbox's decisions, in a fixed order.
fn group(
    inbox: &str,
    acked: Vec<Slot>,
    releases: Vec<Release>,
    leases: Vec<Lease>,
    letters: Vec<DeadLetter>,
) -> Vec<Record> {
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
        records.push(Record::Leased {
            inbox: inbox.clone(),
            leases,
        });
    }
    if !letters.is_empty() {
        records.push(Record::DeadLettered { inbox, letters });
    }
    records
}

#[cfg(test)]
mod tests;
