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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::sync::Arc;

use courier_storage::state::{
    self as machine, Arrival, DeadEntry, EntryState, EntryValue, Store, TimerKind, Was,
};
use courier_storage::{Agent, DeadLetter, DeadReason, Lease, Offset, Record, Release, Slot};

use crate::config::Backoff;

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

/// One lease handed to a consumer: opaque to clients, names the message and the delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    /// The message.
    pub slot: Slot,
    /// The delivery it names (1 for the first).
    pub attempt: u32,
}

impl Receipt {
    /// 25 hex digits: offset (16), priority (1), attempt (8).
    pub fn encode(&self) -> String {
        format!(
            "{:016x}{:x}{:08x}",
            self.slot.offset.0, self.slot.priority, self.attempt
        )
    }

    /// The inverse of [`Receipt::encode`]; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != 25 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let offset = u64::from_str_radix(text.get(..16)?, 16).ok()?;
        let priority = u8::from_str_radix(text.get(16..17)?, 16).ok()?;
        let attempt = u32::from_str_radix(text.get(17..)?, 16).ok()?;
        (priority <= 9 && attempt > 0).then_some(Self {
            slot: Slot {
                offset: Offset(offset),
                priority,
            },
            attempt,
        })
    }
}

/// What a consumer asks for a receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Done: never deliver again.
    Ack,
    /// Not done: ready again after `delay_ms`, or dead-letter now.
    Nack {
        /// Delay before the message is ready again.
        delay_ms: u64,
        /// Dead-letter now with reason `rejected`.
        dead_letter: bool,
    },
    /// Still working: the lease ends `lease_ms` from now.
    Extend {
        /// The new lease length.
        lease_ms: u64,
    },
}

/// The answer for one receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged: the message is done.
    Acked,
    /// Made ready again (after its delay).
    Nacked,
    /// Moved to the dead letters (nack with `dead_letter`, or the last attempt).
    DeadLettered,
    /// Lease extended.
    Extended,
    /// The message was delivered again since (or dead-lettered): nothing changed.
    Stale,
    /// The receipt names no pending message of this inbox: nothing changed.
    Unknown,
}

impl Outcome {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Acked => "acked",
            Self::Nacked => "nacked",
            Self::DeadLettered => "dead_lettered",
            Self::Extended => "extended",
            Self::Stale => "stale",
            Self::Unknown => "unknown",
        }
    }
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

    /// Loads a pending message as the index holds it (start-up).
    pub fn load_entry(&mut self, inbox: &str, slot: Slot, value: EntryValue) {
        self.put(inbox, key(slot), value);
    }

    /// Loads a dead letter as the index holds it (start-up).
    pub fn load_dead(&mut self, inbox: &str, dead: DeadEntry) {
        let Ok(()) = self.put_dead(inbox, &dead);
    }

    /// Loads a remembered client id and the record clock as the index holds them (start-up).
    pub fn load_remembered(&mut self, id: &str, offset: Offset, until_ms: u64) {
        let Ok(()) = self.remember(id, offset, until_ms);
    }

    /// Sets the record clock as the index holds it (start-up).
    pub fn load_clock(&mut self, clock_ms: u64) {
        self.clock_ms = clock_ms;
    }

    /// Makes sure an (empty) inbox exists, for a registered agent.
    pub fn open_inbox(&mut self, inbox: &str) {
        self.inbox_mut(inbox);
    }

    fn timers_of(name: &Arc<str>, k: Key, value: &EntryValue) -> impl Iterator<Item = Timer> {
        let name = name.clone();
        value
            .timers()
            .map(move |(due, kind)| (due, kind, name.clone(), k))
    }

    /// Inserts or replaces an entry, keeping `ready`, `in_flight` and the timers in step.
    fn put(&mut self, inbox: &str, k: Key, value: EntryValue) {
        self.remove(inbox, k);
        let (name, state_inbox) = self.inbox_mut(inbox);
        match value.state {
            EntryState::Ready {
                not_before_ms: None,
            } => {
                state_inbox.ready.insert(k);
            }
            EntryState::Ready { .. } => {}
            EntryState::Leased { .. } => state_inbox.in_flight += 1,
        }
        state_inbox.entries.insert(k, value);
        self.timers.extend(Self::timers_of(&name, k, &value));
    }

    /// Removes an entry and its timers; returns it if it was pending.
    fn remove(&mut self, inbox: &str, k: Key) -> Option<EntryValue> {
        let (name, state_inbox) = self.inbox_mut(inbox);
        let old = state_inbox.entries.remove(&k)?;
        state_inbox.ready.remove(&k);
        if old.is_leased() {
            state_inbox.in_flight -= 1;
        }
        for timer in Self::timers_of(&name, k, &old) {
            self.timers.remove(&timer);
        }
        Some(old)
    }

    fn entry(&self, inbox: &str, k: Key) -> Option<&EntryValue> {
        self.inboxes.get(inbox)?.entries.get(&k)
    }

    /// Applies one record at `offset`, written at `timestamp_ms`
    /// ([`courier_storage::state::apply`]), then forgets the client ids whose window ended by
    /// the latest record time. Returns the inboxes that may have messages ready now.
    pub fn apply(&mut self, record: &Record, offset: Offset, timestamp_ms: u64) -> Vec<Arc<str>> {
        let Ok(touched) = machine::apply(self, record, offset, timestamp_ms);
        let woken = touched.iter().map(|inbox| self.name(inbox)).collect();
        self.advance_clock(timestamp_ms);
        woken
    }

    /// Applies a published message given only what delivery needs of it
    /// ([`courier_storage::state::arrive`]): the effect of [`State::apply`] on its `Message`
    /// record, without the body. Returns the inboxes that may have messages ready now.
    pub fn arrive(
        &mut self,
        arrival: &Arrival,
        offset: Offset,
        timestamp_ms: u64,
    ) -> Vec<Arc<str>> {
        let Ok(touched) = machine::arrive(self, arrival, offset);
        let woken = touched.iter().map(|inbox| self.name(inbox)).collect();
        self.advance_clock(timestamp_ms);
        woken
    }

    fn advance_clock(&mut self, timestamp_ms: u64) {
        self.clock_ms = self.clock_ms.max(timestamp_ms);
        if self
            .expiries
            .first()
            .is_some_and(|(until, _)| *until <= self.clock_ms)
        {
            let Ok(()) = machine::prune_dedupe(self, self.clock_ms);
        }
    }

    /// The offset first published with client id `id`, if it is remembered at `now_ms`.
    pub fn recall(&self, id: &str, now_ms: u64) -> Option<Offset> {
        let (offset, until_ms) = self.remembered.get(id)?;
        machine::still_remembered(*until_ms, now_ms).then_some(*offset)
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

impl Store for State {
    type Error = Infallible;

    fn entry(&mut self, inbox: &str, slot: Slot) -> Result<Option<EntryValue>, Infallible> {
        Ok(State::entry(self, inbox, key(slot)).copied())
    }

    fn put_entry(
        &mut self,
        inbox: &str,
        slot: Slot,
        value: &EntryValue,
        _was: Was<'_>,
    ) -> Result<(), Infallible> {
        self.put(inbox, key(slot), *value);
        Ok(())
    }

    fn remove_entry(
        &mut self,
        inbox: &str,
        slot: Slot,
        _old: &EntryValue,
    ) -> Result<(), Infallible> {
        self.remove(inbox, key(slot));
        Ok(())
    }

    fn put_dead(&mut self, inbox: &str, dead: &DeadEntry) -> Result<(), Infallible> {
        self.inbox_mut(inbox)
            .1
            .dead
            .insert(dead.slot.offset.0, *dead);
        Ok(())
    }

    fn take_dead(&mut self, inbox: &str, offset: Offset) -> Result<bool, Infallible> {
        Ok(self.inbox_mut(inbox).1.dead.remove(&offset.0).is_some())
    }

    fn remember(&mut self, id: &str, offset: Offset, until_ms: u64) -> Result<(), Infallible> {
        self.remembered.insert(id.to_owned(), (offset, until_ms));
        self.expiries.insert((until_ms, id.to_owned()));
        Ok(())
    }

    fn remembered_until(&mut self, id: &str) -> Result<Option<u64>, Infallible> {
        Ok(self.remembered.get(id).map(|(_, until)| *until))
    }

    fn expired_ids(&mut self, clock_ms: u64) -> Result<Vec<(u64, String)>, Infallible> {
        let end = (clock_ms.saturating_add(1), String::new());
        Ok(self.expiries.range(..end).cloned().collect())
    }

    fn unlist_expiry(
        &mut self,
        until_ms: u64,
        id: &str,
        forget_id: bool,
    ) -> Result<(), Infallible> {
        if forget_id {
            self.remembered.remove(id);
        }
        self.expiries.remove(&(until_ms, id.to_owned()));
        Ok(())
    }

    fn upsert_agent(&mut self, agent: &Agent) -> Result<(), Infallible> {
        self.open_inbox(&agent.id);
        Ok(())
    }

    fn delete_agent(&mut self, agent: &str) -> Result<(), Infallible> {
        if let Some(inbox) = self.inboxes.remove(agent) {
            let name: Arc<str> = Arc::from(agent);
            for (k, value) in &inbox.entries {
                for timer in Self::timers_of(&name, *k, value) {
                    self.timers.remove(&timer);
                }
            }
        }
        Ok(())
    }

    /// Subscriptions are not routed by this build: the index keeps them, memory does not.
    fn subscribe(&mut self, _agent: &str, _topic: &str, _start: Offset) -> Result<(), Infallible> {
        Ok(())
    }

    fn unsubscribe(&mut self, _agent: &str, _topic: &str) -> Result<(), Infallible> {
        Ok(())
    }

    fn forget_below(&mut self, below: Offset) -> Result<(), Infallible> {
        let names: Vec<Arc<str>> = self.inboxes.keys().cloned().collect();
        for name in names {
            let doomed: Vec<Key> = self.inboxes[&name]
                .entries
                .keys()
                .filter(|k| k.1 < below.0)
                .copied()
                .collect();
            for k in doomed {
                self.remove(&name, k);
            }
            let inbox = self.inbox_mut(&name).1;
            inbox.dead = inbox.dead.split_off(&below.0);
        }
        let expiries = &mut self.expiries;
        self.remembered.retain(|id, (offset, until_ms)| {
            let keep = *offset >= below;
            if !keep {
                expiries.remove(&(*until_ms, id.clone()));
            }
            keep
        });
        Ok(())
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
