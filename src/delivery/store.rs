//! `State` as a [`Store`] of the one delivery state machine
//! ([`courier_storage::state`]): the primitive changes on maps in memory, with the ready
//! set, the in-flight count and the timer set kept in step; and loading what the index holds
//! at start.

use std::convert::Infallible;
use std::sync::Arc;

use courier_storage::state::{
    self as machine, Arrival, DeadEntry, EntryState, EntryValue, RequestValue, Store, Was,
};
use courier_storage::{Agent, Offset, Record, Slot};

use super::{key, Key, State, Timer};

impl State {
    /// Loads a pending message as the index holds it (start-up).
    pub fn load_entry(&mut self, inbox: &str, slot: Slot, value: EntryValue) {
        self.put(inbox, key(slot), value);
    }

    /// Loads the ordering key of a message pending or dead in `inbox` as the index holds it
    /// (start-up, before the inbox's entries).
    pub fn load_ordering(&mut self, inbox: &str, offset: Offset, key: &str) {
        let Ok(()) = self.note_ordering(inbox, offset, key);
    }

    /// Forgets the ordering keys of `inbox` whose messages are neither pending nor dead there
    /// (start-up, after its entries and dead letters: the index keeps the keys of acked
    /// messages until retention).
    pub fn prune_orderings(&mut self, inbox: &str) {
        if let Some(i) = self.inboxes.get_mut(inbox) {
            let pending: std::collections::HashSet<u64> = i.entries.keys().map(|k| k.1).collect();
            let dead = &i.dead;
            i.ordering
                .retain(|offset, _| pending.contains(offset) || dead.contains_key(offset));
        }
    }

    /// Loads a dead letter as the index holds it (start-up).
    pub fn load_dead(&mut self, inbox: &str, dead: DeadEntry) {
        let Ok(()) = self.put_dead(inbox, &dead);
    }

    /// Loads a remembered client id as the index holds it (start-up).
    pub fn load_remembered(&mut self, id: &str, offset: Offset, until_ms: u64) {
        let Ok(()) = self.remember(id, offset, until_ms);
    }

    /// Loads the holder of a leased queue message as the index holds it (start-up).
    pub fn load_holder(&mut self, queue: &str, slot: Slot, agent: &str) {
        let Ok(()) = self.hold(queue, slot, agent, false);
    }

    /// Loads a remembered request as the index holds it (start-up).
    pub fn load_request(&mut self, id: &str, request: RequestValue) {
        let Ok(()) = self.put_request(id, &request);
    }

    /// Loads a used nonce as the index holds it (start-up).
    pub fn load_nonce(&mut self, signer: &str, nonce: &str, until_ms: u64) {
        let Ok(()) = self.put_nonce(signer, nonce, until_ms);
    }

    /// Sets the truncation mark as the index holds it (start-up).
    pub fn load_truncated_below(&mut self, below: Offset) {
        self.truncated_below = below;
    }

    /// Sets the record clock as the index holds it (start-up).
    pub fn load_clock(&mut self, clock_ms: u64) {
        self.clock_ms = clock_ms;
    }

    /// Makes sure an (empty) inbox exists, for a registered agent.
    pub fn open_inbox(&mut self, inbox: &str) {
        self.inbox_mut(inbox);
    }

    pub(super) fn timers_of(
        name: &Arc<str>,
        k: Key,
        value: &EntryValue,
    ) -> impl Iterator<Item = Timer> {
        let name = name.clone();
        value
            .timers()
            .map(move |(due, kind)| (due, kind, name.clone(), k))
    }

    /// Inserts or replaces an entry, keeping `ready` (only heads of ordering-key lines),
    /// `in_flight`, the lines and the timers in step.
    pub(super) fn put(&mut self, inbox: &str, k: Key, value: EntryValue) {
        let fresh = self.detach(inbox, k).is_none();
        let (name, state_inbox) = self.inbox_mut(inbox);
        if fresh {
            state_inbox.join_line(k);
        }
        match value.state {
            EntryState::Ready {
                not_before_ms: None,
            } if state_inbox.is_head(k) => {
                state_inbox.ready.insert(k);
            }
            EntryState::Ready { .. } => {}
            EntryState::Leased { .. } => state_inbox.in_flight += 1,
        }
        state_inbox.entries.insert(k, value);
        self.timers.extend(Self::timers_of(&name, k, &value));
    }

    /// Removes an entry and its timers (settled: it leaves its ordering-key line too);
    /// returns it if it was pending.
    pub(super) fn remove(&mut self, inbox: &str, k: Key) -> Option<EntryValue> {
        let old = self.detach(inbox, k)?;
        self.inbox_mut(inbox).1.leave_line(k);
        Some(old)
    }

    /// Takes an entry out of `entries`, `ready`, `in_flight` and the timers, leaving its place
    /// in its line (it is being replaced, or [`State::remove`] takes that too).
    fn detach(&mut self, inbox: &str, k: Key) -> Option<EntryValue> {
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

    pub(super) fn entry(&self, inbox: &str, k: Key) -> Option<&EntryValue> {
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

    /// One queue lease of `agent` fewer.
    fn unheld(&mut self, agent: &str) {
        if let Some(count) = self.held.get_mut(agent) {
            *count -= 1;
            if *count == 0 {
                self.held.remove(agent);
            }
        }
    }

    fn advance_clock(&mut self, timestamp_ms: u64) {
        self.clock_ms = self.clock_ms.max(timestamp_ms);
        let due = |expiries: &std::collections::BTreeSet<(u64, String)>| {
            expiries
                .first()
                .is_some_and(|(until, _)| *until <= self.clock_ms)
        };
        let nonces_due = self
            .nonces
            .next_expiry()
            .is_some_and(|until| until <= self.clock_ms);
        if due(&self.expiries) || due(&self.request_expiries) || nonces_due {
            let Ok(()) = machine::prune_dedupe(self, self.clock_ms);
        }
    }

    /// The offset first published with client id `id`, if it is remembered at `now_ms`.
    pub fn recall(&self, id: &str, now_ms: u64) -> Option<Offset> {
        let (offset, until_ms) = self.remembered.get(id)?;
        machine::still_remembered(*until_ms, now_ms).then_some(*offset)
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

    fn note_ordering(&mut self, inbox: &str, offset: Offset, key: &str) -> Result<(), Infallible> {
        let state_inbox = self.inbox_mut(inbox).1;
        let key = state_inbox
            .lines
            .get_key_value(key)
            .map_or_else(|| Arc::from(key), |(name, _)| name.clone());
        state_inbox.ordering.insert(offset.0, key);
        Ok(())
    }

    fn forget_ordering(&mut self, inbox: &str, offset: Offset) -> Result<(), Infallible> {
        self.inbox_mut(inbox).1.ordering.remove(&offset.0);
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
        self.remove_subscriptions(agent);
        self.backfills.retain(|(a, _), _| a != agent);
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

    fn subscribe(&mut self, agent: &str, topic: &str, start: Offset) -> Result<(), Infallible> {
        self.add_subscription(agent, topic, start);
        Ok(())
    }

    fn unsubscribe(&mut self, agent: &str, topic: &str) -> Result<(), Infallible> {
        self.remove_subscription(agent, topic);
        Ok(())
    }

    fn note_topic(&mut self, topic: &str, offset: Offset) -> Result<(), Infallible> {
        self.count_topic(topic, offset);
        Ok(())
    }

    fn note_queue(&mut self, queue: &str) -> Result<(), Infallible> {
        self.open_inbox(queue);
        Ok(())
    }

    fn hold(
        &mut self,
        queue: &str,
        slot: Slot,
        agent: &str,
        _replacing: bool,
    ) -> Result<(), Infallible> {
        let agent: Arc<str> = self
            .held
            .get_key_value(agent)
            .map_or_else(|| Arc::from(agent), |(name, _)| name.clone());
        *self.held.entry(agent.clone()).or_default() += 1;
        let old = self.inbox_mut(queue).1.holders.insert(key(slot), agent);
        if let Some(old) = old {
            self.unheld(&old);
        }
        Ok(())
    }

    fn unhold(&mut self, queue: &str, slot: Slot) -> Result<(), Infallible> {
        if let Some(old) = self.inbox_mut(queue).1.holders.remove(&key(slot)) {
            self.unheld(&old);
        }
        Ok(())
    }

    fn put_request(&mut self, id: &str, request: &RequestValue) -> Result<(), Infallible> {
        self.request_expiries
            .insert((request.until_ms, id.to_owned()));
        self.requests.insert(id.to_owned(), request.clone());
        Ok(())
    }

    fn request(&mut self, id: &str) -> Result<Option<RequestValue>, Infallible> {
        Ok(self.requests.get(id).cloned())
    }

    fn expired_requests(&mut self, clock_ms: u64) -> Result<Vec<(u64, String)>, Infallible> {
        let end = (clock_ms.saturating_add(1), String::new());
        Ok(self.request_expiries.range(..end).cloned().collect())
    }

    fn unlist_request(&mut self, until_ms: u64, id: &str, forget: bool) -> Result<(), Infallible> {
        if forget {
            self.requests.remove(id);
        }
        self.request_expiries.remove(&(until_ms, id.to_owned()));
        Ok(())
    }

    fn put_nonce(&mut self, signer: &str, nonce: &str, until_ms: u64) -> Result<(), Infallible> {
        self.nonces.put(signer, nonce, until_ms);
        Ok(())
    }

    fn forget_nonces(&mut self, clock_ms: u64) -> Result<(), Infallible> {
        self.nonces.forget(clock_ms);
        Ok(())
    }

    fn backfill(&mut self, agent: &str, pattern: &str) -> Result<Option<Offset>, Infallible> {
        Ok(self.backfill_of(agent, pattern))
    }

    fn set_backfill(
        &mut self,
        agent: &str,
        pattern: &str,
        next: Option<Offset>,
    ) -> Result<(), Infallible> {
        let key = (agent.to_owned(), pattern.to_owned());
        match next {
            Some(next) => self.backfills.insert(key, next),
            None => self.backfills.remove(&key),
        };
        Ok(())
    }

    fn truncated_below(&mut self) -> Result<Offset, Infallible> {
        Ok(self.truncated_below)
    }

    fn forget_below(&mut self, below: Offset) -> Result<(), Infallible> {
        self.truncated_below = self.truncated_below.max(below);
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
                if let Some(holder) = self.inbox_mut(&name).1.holders.remove(&k) {
                    self.unheld(&holder);
                }
            }
            let inbox = self.inbox_mut(&name).1;
            inbox.dead = inbox.dead.split_off(&below.0);
            inbox.ordering.retain(|offset, _| *offset >= below.0);
        }
        let request_expiries = &mut self.request_expiries;
        self.requests.retain(|id, request| {
            let keep = request.offset >= below;
            if !keep {
                request_expiries.remove(&(request.until_ms, id.clone()));
            }
            keep
        });
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
