//! Delivery state and what each record does to it: the one state machine of Courier.
//!
//! Delivery state is, per inbox (an agent's, or a capability queue's, named
//! `capability:<name>`), the pending messages (ready, delayed or leased, with their attempts
//! and deadlines, and in a queue the agent that holds each lease) and the dead letters; besides it, the remembered client ids
//! (dedupe), the registered agents and their subscriptions. [`apply`] is the effect of one
//! record on that state, and [`prune_dedupe`] the forgetting of client ids whose window has
//! ended. They are written once, here, and both holders of the state use them:
//!
//! - the index ([`crate::index`]), the durable image in sled, for every committed record;
//! - the server's in-memory state, from which it decides leases and redeliveries.
//!
//! So "replay the log through [`apply`]" defines the state, whoever holds it; a consensus log
//! that delivers the same records in the same order gives every replica the same state.
//!
//! The functions are pure: no I/O, no clock (times come from the records), no locks. Where the
//! state lives and how it is laid out is a [`Store`]'s business; what changes is decided here.

use bincode::{Decode, Encode};

use crate::record::{Agent, DeadReason, Message, Record, Slot};
use crate::Offset;

/// What kind of deadline a timer marks. The order is the index's key order, and `Due` must
/// stay the lowest: the in-memory state's bound for "every timer due by now" uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimerKind {
    /// The lease deadline of a leased message, or the `not_before` time of a delayed or
    /// backed-off ready message.
    Due,
    /// The `ttl_ms` expiry of a message.
    Expiry,
}

/// Whether a pending message may be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, Decode)]
pub enum EntryState {
    /// Ready for delivery, but not before `not_before_ms` if set.
    Ready {
        /// Earliest delivery time, wall-clock ms.
        not_before_ms: Option<u64>,
    },
    /// Handed out under a lease that ends at `deadline_ms`.
    Leased {
        /// End of the lease, wall-clock ms.
        deadline_ms: u64,
    },
}

/// The delivery state of one message in one inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, Decode)]
pub struct EntryValue {
    /// Deliveries so far.
    pub attempts: u32,
    /// Ready or leased.
    pub state: EntryState,
    /// When the message's ttl runs out, if it has one.
    pub expires_at_ms: Option<u64>,
}

impl EntryValue {
    /// A redriven dead letter: ready now, attempts reset, no ttl.
    pub const REDRIVEN: Self = Self {
        attempts: 0,
        state: EntryState::Ready {
            not_before_ms: None,
        },
        expires_at_ms: None,
    };

    /// The timers this entry sets: when its delay, backoff or lease ends (`Due`), and when
    /// its ttl runs out (`Expiry`). A store keeps exactly these for each entry it holds.
    pub fn timers(&self) -> impl Iterator<Item = (u64, TimerKind)> {
        let due = match self.state {
            EntryState::Ready { not_before_ms } => not_before_ms,
            EntryState::Leased { deadline_ms } => Some(deadline_ms),
        };
        due.map(|ms| (ms, TimerKind::Due))
            .into_iter()
            .chain(self.expires_at_ms.map(|ms| (ms, TimerKind::Expiry)))
    }

    /// Whether the entry is leased.
    pub fn is_leased(&self) -> bool {
        matches!(self.state, EntryState::Leased { .. })
    }
}

/// A dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, Decode)]
pub struct DeadEntry {
    /// The message.
    pub slot: Slot,
    /// Why it was dead-lettered.
    pub reason: DeadReason,
    /// Deliveries made.
    pub attempts: u32,
    /// When, wall-clock ms (the timestamp of the dead-lettering record).
    pub dead_lettered_at_ms: u64,
}

/// A request remembered (`POST /v1/requests`): where it is, who sent it, its first reply.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct RequestValue {
    /// The request's offset.
    pub offset: Offset,
    /// Its sender: a reply without `to` goes to this agent's inbox.
    pub from: String,
    /// Remembered until this record time (ms).
    pub until_ms: u64,
    /// Its first reply (a message whose `in_reply_to` is the request's id), once published.
    pub reply: Option<Offset>,
}

/// What delivery needs of a published message: everything but its body and labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    /// The inboxes it goes to.
    pub destinations: Vec<String>,
    /// Its priority, 0–9.
    pub priority: u8,
    /// Not deliverable before this time, if delayed.
    pub not_before_ms: Option<u64>,
    /// Dead-lettered as expired at this time, if it has a ttl.
    pub expires_at_ms: Option<u64>,
    /// Its client id and until when the id is remembered, if the client gave one.
    pub dedupe: Option<(String, u64)>,
    /// The topic it was published to, for a `topic:` address.
    pub topic: Option<String>,
    /// For a request: its id, sender and until when it is remembered.
    pub request: Option<(String, String, u64)>,
    /// The id of the message it replies to, if any.
    pub in_reply_to: Option<String>,
    /// Its ordering key, if any.
    pub ordering_key: Option<String>,
}

impl Arrival {
    /// The arrival of `message`.
    pub fn of(message: &Message) -> Self {
        Self {
            destinations: message.destinations.clone(),
            priority: message.priority,
            not_before_ms: message.not_before_ms,
            expires_at_ms: message.expires_at_ms,
            dedupe: message
                .dedupe_until_ms
                .map(|until_ms| (message.id.clone(), until_ms)),
            topic: topic_of(message).map(str::to_owned),
            request: message
                .request_until_ms
                .map(|until_ms| (message.id.clone(), message.from.clone(), until_ms)),
            in_reply_to: message.in_reply_to.clone(),
            ordering_key: message.ordering_key.clone(),
        }
    }
}

/// What one message means to the requests: a request to remember, a reply to note.
#[derive(Debug, Clone, Copy)]
struct Exchange<'a> {
    request: Option<(&'a str, &'a str, u64)>,
    in_reply_to: Option<&'a str>,
}

/// The `start` of a `Subscribed` record that backfills nothing (`start: latest`).
pub const LATEST: Offset = Offset(u64::MAX);

/// The `through` of the `Backfilled` record that ends a backfill.
pub const BACKFILL_DONE: Offset = Offset(u64::MAX);

/// The prefix of a capability queue's inbox name. No agent id contains a `:`, so queue and
/// agent inboxes never share a name.
pub const QUEUE_PREFIX: &str = "capability:";

/// The inbox name of the queue of capability `capability`: `capability:<name>`.
pub fn queue_inbox(capability: &str) -> String {
    format!("{QUEUE_PREFIX}{capability}")
}

/// The capability whose queue `inbox` is, if it is a queue.
pub fn queue_of(inbox: &str) -> Option<&str> {
    inbox.strip_prefix(QUEUE_PREFIX)
}

/// The topic of a message published to `topic:<name>`.
pub fn topic_of(message: &Message) -> Option<&str> {
    message.to.strip_prefix("topic:")
}

/// What is known of a topic that messages were published to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct TopicSeen {
    /// Messages published to it (never decreases: retention does not change it).
    pub messages: u64,
    /// The offset of the latest one.
    pub last_offset: Offset,
}

/// Whether an entry that [`Store::put_entry`] writes may already exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Was<'a> {
    /// The message was just published: no entry of it exists anywhere, in any layer.
    New,
    /// The message is not pending in this inbox now (a redriven dead letter).
    Absent,
    /// The entry is pending with this value, which the new one replaces.
    Pending(&'a EntryValue),
}

/// Where delivery state is held. Each method is one primitive change, which the store makes
/// together with whatever it keeps in step (timers from [`EntryValue::timers`], counts, key
/// orders). What changes, and when, is decided by [`apply`] and [`prune_dedupe`] only.
pub trait Store {
    /// What reading or writing the store can fail with (`Infallible` in memory).
    type Error;

    /// The entry of `slot` in `inbox`, if the message is pending there.
    fn entry(&mut self, inbox: &str, slot: Slot) -> Result<Option<EntryValue>, Self::Error>;
    /// Writes the entry of `slot` in `inbox` and its timers (replacing `was`'s).
    fn put_entry(
        &mut self,
        inbox: &str,
        slot: Slot,
        value: &EntryValue,
        was: Was<'_>,
    ) -> Result<(), Self::Error>;
    /// Removes the pending entry `old` of `slot` in `inbox` and its timers.
    fn remove_entry(
        &mut self,
        inbox: &str,
        slot: Slot,
        old: &EntryValue,
    ) -> Result<(), Self::Error>;
    /// Notes the ordering key of the message at `offset` in `inbox` (before its entry is
    /// put): kept while the message is pending or dead-lettered there.
    fn note_ordering(&mut self, inbox: &str, offset: Offset, key: &str) -> Result<(), Self::Error>;
    /// The message at `offset` in `inbox` was acked: its ordering key is needed no more. (A
    /// store may keep it until retention removes the message, as the index does: one write
    /// fewer per ack.)
    fn forget_ordering(&mut self, inbox: &str, offset: Offset) -> Result<(), Self::Error>;
    /// Adds a dead letter to `inbox`.
    fn put_dead(&mut self, inbox: &str, dead: &DeadEntry) -> Result<(), Self::Error>;
    /// Removes the dead letter at `offset` from `inbox`; whether there was one.
    fn take_dead(&mut self, inbox: &str, offset: Offset) -> Result<bool, Self::Error>;

    /// Remembers client id `id` as published at `offset`, until `until_ms` (replacing an
    /// older memory of the same id; the older expiry stays listed until pruned).
    fn remember(&mut self, id: &str, offset: Offset, until_ms: u64) -> Result<(), Self::Error>;
    /// Until when `id` is remembered, if it is.
    fn remembered_until(&mut self, id: &str) -> Result<Option<u64>, Self::Error>;
    /// The listed expiries `(until_ms, id)` with `until_ms <= clock_ms`.
    fn expired_ids(&mut self, clock_ms: u64) -> Result<Vec<(u64, String)>, Self::Error>;
    /// Unlists the expiry `(until_ms, id)`, and forgets `id` itself if `forget_id`.
    fn unlist_expiry(
        &mut self,
        until_ms: u64,
        id: &str,
        forget_id: bool,
    ) -> Result<(), Self::Error>;

    /// Registers or updates an agent; its inbox exists from now on.
    fn upsert_agent(&mut self, agent: &Agent) -> Result<(), Self::Error>;
    /// Removes an agent with its inbox, ordering keys, dead letters, subscriptions and
    /// backfills.
    fn delete_agent(&mut self, agent: &str) -> Result<(), Self::Error>;
    /// Adds (or moves the start of) a subscription.
    fn subscribe(&mut self, agent: &str, topic: &str, start: Offset) -> Result<(), Self::Error>;
    /// Removes a subscription.
    fn unsubscribe(&mut self, agent: &str, topic: &str) -> Result<(), Self::Error>;
    /// A message was published to `topic` at `offset`.
    fn note_topic(&mut self, topic: &str, offset: Offset) -> Result<(), Self::Error>;
    /// A message entered the capability queue `queue` (an inbox name): the queue exists
    /// from now on.
    fn note_queue(&mut self, queue: &str) -> Result<(), Self::Error>;
    /// Sets the agent that holds the lease of `slot` in `queue`; `replacing` if the entry
    /// was leased already (an extension: a holder is recorded), else none is.
    fn hold(
        &mut self,
        queue: &str,
        slot: Slot,
        agent: &str,
        replacing: bool,
    ) -> Result<(), Self::Error>;
    /// Clears the holder of the lease of `slot` in `queue`, which was leased.
    fn unhold(&mut self, queue: &str, slot: Slot) -> Result<(), Self::Error>;
    /// Where the backfill of `agent`'s subscription to `pattern` stands (the next offset to
    /// consider), if one is under way.
    fn backfill(&mut self, agent: &str, pattern: &str) -> Result<Option<Offset>, Self::Error>;
    /// Sets (or, with `None`, ends) the backfill of `agent`'s subscription to `pattern`.
    fn set_backfill(
        &mut self,
        agent: &str,
        pattern: &str,
        next: Option<Offset>,
    ) -> Result<(), Self::Error>;
    /// Remembers (or updates) request `id` and lists its expiry `(until_ms, id)`.
    fn put_request(&mut self, id: &str, request: &RequestValue) -> Result<(), Self::Error>;
    /// The request `id`, if remembered.
    fn request(&mut self, id: &str) -> Result<Option<RequestValue>, Self::Error>;
    /// The listed request expiries `(until_ms, id)` with `until_ms <= clock_ms`.
    fn expired_requests(&mut self, clock_ms: u64) -> Result<Vec<(u64, String)>, Self::Error>;
    /// Unlists the request expiry `(until_ms, id)`, and forgets the request itself if
    /// `forget`.
    fn unlist_request(&mut self, until_ms: u64, id: &str, forget: bool) -> Result<(), Self::Error>;
    /// Remembers the nonce `nonce` of `signer` as used until `until_ms` (a holder that keys
    /// nonces by one string uses [`nonce_key`]).
    fn put_nonce(&mut self, signer: &str, nonce: &str, until_ms: u64) -> Result<(), Self::Error>;
    /// Forgets the used nonces remembered until `clock_ms` or before. A holder may drop
    /// them later (the index drops a whole bucket of them at a checkpoint), but never again
    /// reports one as used.
    fn forget_nonces(&mut self, clock_ms: u64) -> Result<(), Self::Error>;
    /// Retention removed the records below `below`: forgets the pending entries, lease
    /// holders, ordering keys, dead letters and remembered ids of messages there (and any location of those records), and
    /// remembers `below` as [`Store::truncated_below`]. Requests below it are forgotten too.
    fn forget_below(&mut self, below: Offset) -> Result<(), Self::Error>;
    /// The highest `below` retention truncated the log at (0 if it never did).
    fn truncated_below(&mut self) -> Result<Offset, Self::Error>;
}

/// Applies one record, committed at `offset` and written at `timestamp_ms`, to `store`.
/// Returns the inboxes that may have a message to deliver now, or room to deliver one (the
/// ones to wake).
pub fn apply<'r, S: Store + ?Sized>(
    store: &mut S,
    record: &'r Record,
    offset: Offset,
    timestamp_ms: u64,
) -> Result<&'r [String], S::Error> {
    match record {
        Record::Message(m) => {
            apply_message(store, m, offset)?;
            Ok(&m.destinations)
        }
        Record::Leased { .. }
        | Record::LeasedTo { .. }
        | Record::Acked { .. }
        | Record::Released { .. }
        | Record::DeadLettered { .. }
        | Record::Redriven { .. } => apply_delivery(store, record, timestamp_ms),
        Record::AgentUpserted(agent) => {
            store.upsert_agent(agent)?;
            Ok(&[])
        }
        Record::AgentDeleted { agent } => {
            store.delete_agent(agent)?;
            Ok(&[])
        }
        Record::Subscribed {
            agent,
            topic,
            start,
        } => {
            store.subscribe(agent, topic, *start)?;
            if *start != LATEST {
                store.set_backfill(agent, topic, Some(*start))?;
            }
            Ok(&[])
        }
        Record::Unsubscribed { agent, topic } => {
            store.unsubscribe(agent, topic)?;
            store.set_backfill(agent, topic, None)?;
            Ok(&[])
        }
        Record::Backfilled {
            inbox,
            pattern,
            messages,
            through,
        } => {
            // Only a backfill under way takes messages, and never one that retention deleted
            // meanwhile (the step read it before the `Truncated` record).
            if store.backfill(inbox, pattern)?.is_none() {
                return Ok(&[]);
            }
            let kept = store.truncated_below()?;
            for m in messages.iter().filter(|m| m.slot.offset >= kept) {
                if store.entry(inbox, m.slot)?.is_none() {
                    if let Some(key) = &m.ordering_key {
                        store.note_ordering(inbox, m.slot.offset, key)?;
                    }
                    let value = published(m.not_before_ms, m.expires_at_ms);
                    store.put_entry(inbox, m.slot, &value, Was::Absent)?;
                }
            }
            let next = (*through != BACKFILL_DONE).then_some(*through);
            store.set_backfill(inbox, pattern, next)?;
            Ok(std::slice::from_ref(inbox))
        }
        Record::Truncated { .. } | Record::Quarantined { .. } | Record::NonceUsed { .. } => {
            apply_bookkeeping(store, record)?;
            Ok(&[])
        }
    }
}

/// The records that deliver nothing: retention's, repair's and signatures'.
fn apply_bookkeeping<S: Store + ?Sized>(store: &mut S, record: &Record) -> Result<(), S::Error> {
    match record {
        Record::Truncated { below } => store.forget_below(*below),
        Record::NonceUsed {
            signer,
            nonce,
            until_ms,
        } => store.put_nonce(signer, nonce, *until_ms),
        _ => Ok(()),
    }
}

/// The key of a used nonce: its signer and the nonce, apart (neither holds a space).
pub fn nonce_key(signer: &str, nonce: &str) -> String {
    format!("{signer} {nonce}")
}

/// The signer and the nonce of a [`nonce_key`]; `None` for a string that is not one.
pub fn split_nonce_key(key: &str) -> Option<(&str, &str)> {
    key.split_once(' ')
}

/// A published message enters its inboxes; what it means to dedupe, topics and requests.
fn apply_message<S: Store + ?Sized>(
    store: &mut S,
    m: &Message,
    offset: Offset,
) -> Result<(), S::Error> {
    let slot = Slot {
        offset,
        priority: m.priority,
    };
    let value = published(m.not_before_ms, m.expires_at_ms);
    let dedupe = m.dedupe_until_ms.map(|until_ms| (m.id.as_str(), until_ms));
    let keyed = Keyed {
        topic: topic_of(m),
        ordering_key: m.ordering_key.as_deref(),
    };
    publish(store, slot, &m.destinations, &value, dedupe, keyed)?;
    let exchange = Exchange {
        request: m
            .request_until_ms
            .map(|until| (m.id.as_str(), m.from.as_str(), until)),
        in_reply_to: m.in_reply_to.as_deref(),
    };
    exchange_requests(store, exchange, offset)
}

/// The records that change messages already in an inbox (or among its dead letters).
fn apply_delivery<'r, S: Store + ?Sized>(
    store: &mut S,
    record: &'r Record,
    timestamp_ms: u64,
) -> Result<&'r [String], S::Error> {
    let inbox_of = |inbox: &'r String| std::slice::from_ref(inbox);
    match record {
        Record::Leased { inbox, leases } => {
            lease(store, inbox, leases, None)?;
            Ok(&[])
        }
        Record::LeasedTo {
            queue,
            agent,
            leases,
        } => {
            lease(store, queue, leases, Some(agent))?;
            Ok(&[])
        }
        Record::Acked { inbox, slots } => {
            for slot in slots {
                if let Some(old) = store.entry(inbox, *slot)? {
                    store.remove_entry(inbox, *slot, &old)?;
                    unhold(store, inbox, *slot, &old)?;
                    store.forget_ordering(inbox, slot.offset)?;
                }
            }
            Ok(inbox_of(inbox))
        }
        Record::Released { inbox, releases } => {
            for release in releases {
                if let Some(old) = store.entry(inbox, release.slot)? {
                    let value = EntryValue {
                        state: EntryState::Ready {
                            not_before_ms: Some(release.not_before_ms),
                        },
                        ..old
                    };
                    store.put_entry(inbox, release.slot, &value, Was::Pending(&old))?;
                    unhold(store, inbox, release.slot, &old)?;
                }
            }
            Ok(inbox_of(inbox))
        }
        Record::DeadLettered { inbox, letters } => {
            for letter in letters {
                if let Some(old) = store.entry(inbox, letter.slot)? {
                    store.remove_entry(inbox, letter.slot, &old)?;
                    unhold(store, inbox, letter.slot, &old)?;
                    let dead = DeadEntry {
                        slot: letter.slot,
                        reason: letter.reason,
                        attempts: letter.attempts,
                        dead_lettered_at_ms: timestamp_ms,
                    };
                    store.put_dead(inbox, &dead)?;
                }
            }
            Ok(inbox_of(inbox))
        }
        Record::Redriven { inbox, slots } => {
            for slot in slots {
                if store.take_dead(inbox, slot.offset)? {
                    store.put_entry(inbox, *slot, &EntryValue::REDRIVEN, Was::Absent)?;
                }
            }
            Ok(inbox_of(inbox))
        }
        _ => Ok(&[]),
    }
}

/// Leases messages of `inbox` (`Leased`), or of the queue `inbox` to `holder` (`LeasedTo`).
/// A lease of a message that is no longer pending changes nothing.
fn lease<S: Store + ?Sized>(
    store: &mut S,
    inbox: &str,
    leases: &[crate::record::Lease],
    holder: Option<&str>,
) -> Result<(), S::Error> {
    for lease in leases {
        if let Some(old) = store.entry(inbox, lease.slot)? {
            let value = EntryValue {
                attempts: lease.attempt,
                state: EntryState::Leased {
                    deadline_ms: lease.deadline_ms,
                },
                ..old
            };
            store.put_entry(inbox, lease.slot, &value, Was::Pending(&old))?;
            if let Some(agent) = holder {
                store.hold(inbox, lease.slot, agent, old.is_leased())?;
            }
        }
    }
    Ok(())
}

/// A queue message's lease ended (ack, release, dead letter of the `old` entry): nobody
/// holds it any more. A lease holder exists exactly while a queue entry is leased.
fn unhold<S: Store + ?Sized>(
    store: &mut S,
    inbox: &str,
    slot: Slot,
    old: &EntryValue,
) -> Result<(), S::Error> {
    if old.is_leased() && queue_of(inbox).is_some() {
        store.unhold(inbox, slot)?;
    }
    Ok(())
}

/// [`apply`] of a `Message` record given only its [`Arrival`] (the server keeps that, not
/// the body, until the message is durable and has its offset). Returns its destinations.
pub fn arrive<'a, S: Store + ?Sized>(
    store: &mut S,
    arrival: &'a Arrival,
    offset: Offset,
) -> Result<&'a [String], S::Error> {
    let slot = Slot {
        offset,
        priority: arrival.priority,
    };
    let value = published(arrival.not_before_ms, arrival.expires_at_ms);
    let dedupe = arrival
        .dedupe
        .as_ref()
        .map(|(id, until)| (id.as_str(), *until));
    let keyed = Keyed {
        topic: arrival.topic.as_deref(),
        ordering_key: arrival.ordering_key.as_deref(),
    };
    publish(store, slot, &arrival.destinations, &value, dedupe, keyed)?;
    let exchange = Exchange {
        request: arrival
            .request
            .as_ref()
            .map(|(id, from, until)| (id.as_str(), from.as_str(), *until)),
        in_reply_to: arrival.in_reply_to.as_deref(),
    };
    exchange_requests(store, exchange, offset)?;
    Ok(&arrival.destinations)
}

/// A request is remembered; a reply to a remembered request that has none yet becomes its
/// reply. A reply to an id that is not a remembered request is an ordinary message.
fn exchange_requests<S: Store + ?Sized>(
    store: &mut S,
    exchange: Exchange<'_>,
    offset: Offset,
) -> Result<(), S::Error> {
    if let Some((id, from, until_ms)) = exchange.request {
        let request = RequestValue {
            offset,
            from: from.to_owned(),
            until_ms,
            reply: None,
        };
        store.put_request(id, &request)?;
    }
    if let Some(id) = exchange.in_reply_to {
        if let Some(mut request) = store.request(id)? {
            if request.reply.is_none() && request.offset < offset {
                request.reply = Some(offset);
                store.put_request(id, &request)?;
            }
        }
    }
    Ok(())
}

/// The names a published message is filed under besides its inboxes.
#[derive(Debug, Clone, Copy)]
struct Keyed<'a> {
    topic: Option<&'a str>,
    ordering_key: Option<&'a str>,
}

/// A published message enters each of its inboxes (in its ordering key's line there, if it
/// has one); its client id is remembered, and its topic counted.
fn publish<S: Store + ?Sized>(
    store: &mut S,
    slot: Slot,
    destinations: &[String],
    value: &EntryValue,
    dedupe: Option<(&str, u64)>,
    keyed: Keyed<'_>,
) -> Result<(), S::Error> {
    for inbox in destinations {
        if let Some(key) = keyed.ordering_key {
            store.note_ordering(inbox, slot.offset, key)?;
        }
        store.put_entry(inbox, slot, value, Was::New)?;
        if queue_of(inbox).is_some() {
            store.note_queue(inbox)?;
        }
    }
    if let Some((id, until_ms)) = dedupe {
        store.remember(id, slot.offset, until_ms)?;
    }
    if let Some(topic) = keyed.topic {
        store.note_topic(topic, slot.offset)?;
    }
    Ok(())
}

/// The entry of a message just published.
fn published(not_before_ms: Option<u64>, expires_at_ms: Option<u64>) -> EntryValue {
    EntryValue {
        attempts: 0,
        state: EntryState::Ready { not_before_ms },
        expires_at_ms,
    }
}

/// Forgets the client ids whose window ended by `clock_ms`, the latest record timestamp
/// applied, and the requests and used nonces remembered until then: a function of the log alone, so every
/// holder forgets the same ones. An id published again after its window keeps its newer
/// memory.
pub fn prune_dedupe<S: Store + ?Sized>(store: &mut S, clock_ms: u64) -> Result<(), S::Error> {
    for (until_ms, id) in store.expired_ids(clock_ms)? {
        let current = store.remembered_until(&id)? == Some(until_ms);
        store.unlist_expiry(until_ms, &id, current)?;
    }
    for (until_ms, id) in store.expired_requests(clock_ms)? {
        let current = store.request(&id)?.is_some_and(|r| r.until_ms == until_ms);
        store.unlist_request(until_ms, &id, current)?;
    }
    store.forget_nonces(clock_ms)
}

/// Whether a remembered id still counts at `now_ms`: its window has not ended.
pub fn still_remembered(until_ms: u64, now_ms: u64) -> bool {
    until_ms > now_ms
}
