//! The index as a [`Store`] of delivery state: how each primitive change of
//! [`crate::state`] is laid out in keys, through the same transaction that reads them. What
//! a record changes is decided there, once, for the index and the server alike.

use std::ops::Bound;

use super::keys::{
    backfill_key, be64, dead_key, decode_location, expiry_key, from_be64, inbox_prefix,
    ordering_key, parse_expiry_key, parse_slot_key, positions_key, slot_key, subscription_key,
    timer_key, topic_offset_key, trailing_offset, u64_le, with_prefix, A, B, C, CLOCK_KEY, D, H, I,
    K, N, O, P, R, S, TRUNCATED_KEY, U, X, Y,
};
use super::overlay::Txn;
use super::{decode_value, encode_value, DedupeValue};
use crate::error::{Error, Result};
use crate::position::PositionRun;
use crate::record::{Agent, Frame, Slot};
use crate::state::{self, nonce_key, DeadEntry, EntryValue, RequestValue, Store, TopicSeen, Was};
use crate::Offset;

/// Applies `frames` (consecutive, in log order) and their positions `runs`, then forgets the
/// client ids whose window ended by the latest record time.
pub(super) fn apply(txn: &mut Txn<'_>, frames: &[Frame], runs: &[PositionRun]) -> Result<()> {
    for run in runs {
        txn.put_run(run);
    }
    let mut clock = txn.get(CLOCK_KEY)?.map_or(0, |v| u64_le(&v));
    for frame in frames {
        state::apply(txn, &frame.record, frame.offset, frame.timestamp_ms)?;
        clock = clock.max(frame.timestamp_ms);
    }
    if let Some(last) = frames.last() {
        state::prune_dedupe(txn, clock)?;
        txn.insert(CLOCK_KEY.to_vec(), clock.to_le_bytes().to_vec());
        txn.applied = Some(last.offset);
    }
    Ok(())
}

/// The most records one position-run key holds once consecutive batches are joined (4 KiB
/// of positions).
pub(super) const MAX_RUN: usize = 1024;

impl Txn<'_> {
    /// Records where `run`'s records are. A run that continues the newest run of the active
    /// layer (same segment, the next offset, starting where it ended) extends it, up to
    /// [`MAX_RUN`] records: one key for many small batches, not one each, so a checkpoint
    /// writes a few keys for a second of single publishes instead of thousands.
    fn put_run(&mut self, run: &PositionRun) {
        let p = &run.positions;
        debug_assert!(p.len() >= 2 && p.windows(2).all(|w| w[0] < w[1]));
        let key = positions_key(run.first);
        let newest =
            self.newest_new_in_active(Bound::Included(vec![P]), Bound::Included(key.clone()));
        if let Some((newest_key, mut value)) = newest {
            let first = from_be64(newest_key.get(1..).unwrap_or_default());
            let count = (value.len().saturating_sub(8) / 4).saturating_sub(1);
            let ends_at = value
                .get(value.len().saturating_sub(4)..)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes);
            let continues = value.get(..8).map(u64_le) == Some(run.segment.0)
                && first + count as u64 == run.first.0
                && ends_at == p.first().copied()
                && count + p.len() - 1 <= MAX_RUN;
            if continues {
                for position in &p[1..] {
                    value.extend_from_slice(&position.to_le_bytes());
                }
                self.insert_new(newest_key, value);
                return;
            }
        }
        let mut value = Vec::with_capacity(8 + 4 * p.len());
        value.extend_from_slice(&run.segment.0.to_le_bytes());
        for position in p {
            value.extend_from_slice(&position.to_le_bytes());
        }
        self.insert_new(key, value);
    }

    /// Writes the timers of an entry whose old timers are already removed. A timer key exists
    /// only while its entry has that timer, so none of these is in the merged view now: a
    /// lease taken and acked between two checkpoints leaves no timer key for sled to write.
    fn put_timers(&mut self, inbox: &str, slot: Slot, value: &EntryValue) {
        for (due, kind) in value.timers() {
            self.insert_absent(timer_key(due, kind, inbox, slot), Vec::new());
        }
    }

    fn remove_timers(&mut self, inbox: &str, slot: Slot, value: &EntryValue) {
        for (due, kind) in value.timers() {
            self.remove(timer_key(due, kind, inbox, slot));
        }
    }

    /// The expiries `(until_ms, id)` listed under `prefix` ([`expiry_key`]) with
    /// `until_ms <= clock_ms`.
    fn expired(&mut self, prefix: u8, clock_ms: u64) -> Result<Vec<(u64, String)>> {
        let end = Bound::Excluded(with_prefix(prefix, &be64(clock_ms.saturating_add(1))));
        self.range(Bound::Included(vec![prefix]), end)
            .map(|item| Ok(parse_expiry_key(&item?.0)))
            .collect()
    }

    /// Removes every key under `prefix` whose trailing offset is below `below`.
    fn remove_below(&mut self, prefix: u8, below: Offset) -> Result<()> {
        for (key, _) in self.scan_prefix(&[prefix])? {
            if trailing_offset(&key) < below.0 {
                self.remove(key);
            }
        }
        Ok(())
    }

    /// Removes every key under `prefix`.
    fn remove_prefix(&mut self, prefix: &[u8]) -> Result<()> {
        for (key, _) in self.scan_prefix(prefix)? {
            self.remove(key);
        }
        Ok(())
    }
}

impl Store for Txn<'_> {
    type Error = Error;

    fn entry(&mut self, inbox: &str, slot: Slot) -> Result<Option<EntryValue>> {
        self.get(&slot_key(&[I], inbox, slot))?
            .map(|v| decode_value(&v))
            .transpose()
    }

    fn put_entry(
        &mut self,
        inbox: &str,
        slot: Slot,
        value: &EntryValue,
        was: Was<'_>,
    ) -> Result<()> {
        // A new message's keys exist in no lower layer: inserted as new, a removal in the same
        // layer leaves nothing behind for sled.
        let fresh = was == Was::New;
        if let Was::Pending(old) = was {
            self.remove_timers(inbox, slot, old);
        }
        self.put_timers(inbox, slot, value);
        let key = slot_key(&[I], inbox, slot);
        if fresh {
            self.insert_new(key, encode_value(value));
        } else {
            self.insert(key, encode_value(value));
        }
        Ok(())
    }

    fn remove_entry(&mut self, inbox: &str, slot: Slot, old: &EntryValue) -> Result<()> {
        self.remove_timers(inbox, slot, old);
        self.remove(slot_key(&[I], inbox, slot));
        Ok(())
    }

    fn note_ordering(&mut self, inbox: &str, offset: Offset, key: &str) -> Result<()> {
        self.insert(ordering_key(inbox, offset), key.as_bytes().to_vec());
        Ok(())
    }

    /// Kept: `k` keys go when retention removes their messages (or with their agent), as
    /// the topics' `o` keys do; an ack writes nothing more here for them.
    fn forget_ordering(&mut self, _inbox: &str, _offset: Offset) -> Result<()> {
        Ok(())
    }

    fn put_dead(&mut self, inbox: &str, dead: &DeadEntry) -> Result<()> {
        self.insert(dead_key(inbox, dead.slot.offset), encode_value(dead));
        Ok(())
    }

    fn take_dead(&mut self, inbox: &str, offset: Offset) -> Result<bool> {
        let key = dead_key(inbox, offset);
        let was = self.get(&key)?.is_some();
        if was {
            self.remove(key);
        }
        Ok(was)
    }

    fn remember(&mut self, id: &str, offset: Offset, until_ms: u64) -> Result<()> {
        let value = DedupeValue {
            offset: offset.0,
            until_ms,
        };
        self.insert(with_prefix(U, id.as_bytes()), encode_value(&value));
        self.insert(expiry_key(X, until_ms, id), Vec::new());
        Ok(())
    }

    fn remembered_until(&mut self, id: &str) -> Result<Option<u64>> {
        let value = self.get(&with_prefix(U, id.as_bytes()))?;
        Ok(value
            .map(|v| decode_value::<DedupeValue>(&v))
            .transpose()?
            .map(|v| v.until_ms))
    }

    fn expired_ids(&mut self, clock_ms: u64) -> Result<Vec<(u64, String)>> {
        self.expired(X, clock_ms)
    }

    fn unlist_expiry(&mut self, until_ms: u64, id: &str, forget_id: bool) -> Result<()> {
        if forget_id {
            self.remove(with_prefix(U, id.as_bytes()));
        }
        self.remove(expiry_key(X, until_ms, id));
        Ok(())
    }

    fn upsert_agent(&mut self, agent: &Agent) -> Result<()> {
        self.insert(with_prefix(A, agent.id.as_bytes()), encode_value(agent));
        Ok(())
    }

    fn delete_agent(&mut self, agent: &str) -> Result<()> {
        self.remove(with_prefix(A, agent.as_bytes()));
        for (key, value) in self.scan_prefix(&inbox_prefix(I, agent))? {
            if let Some((inbox, slot)) = parse_slot_key(key.get(1..).unwrap_or_default()) {
                self.remove_timers(&inbox, slot, &decode_value(&value)?);
            }
            self.remove(key);
        }
        self.remove_prefix(&inbox_prefix(D, agent))?;
        self.remove_prefix(&inbox_prefix(K, agent))?;
        self.remove_prefix(&inbox_prefix(B, agent))?;
        self.remove_prefix(&inbox_prefix(S, agent))
    }

    fn subscribe(&mut self, agent: &str, topic: &str, start: Offset) -> Result<()> {
        let key = subscription_key(agent, topic);
        self.insert(key, start.0.to_le_bytes().to_vec());
        Ok(())
    }

    fn unsubscribe(&mut self, agent: &str, topic: &str) -> Result<()> {
        self.remove(subscription_key(agent, topic));
        Ok(())
    }

    fn note_topic(&mut self, topic: &str, offset: Offset) -> Result<()> {
        self.insert_new(topic_offset_key(topic, offset), Vec::new());
        let key = with_prefix(N, topic.as_bytes());
        let mut seen: TopicSeen = self
            .get(&key)?
            .map(|v| decode_value(&v))
            .transpose()?
            .unwrap_or_default();
        seen.messages += 1;
        seen.last_offset = offset;
        self.insert(key, encode_value(&seen));
        Ok(())
    }

    fn note_queue(&mut self, queue: &str) -> Result<()> {
        self.insert(with_prefix(C, queue.as_bytes()), Vec::new());
        Ok(())
    }

    fn hold(&mut self, queue: &str, slot: Slot, agent: &str, replacing: bool) -> Result<()> {
        let key = slot_key(&[H], queue, slot);
        // A first holder's key is absent: set so, a lease and its ack between two
        // checkpoints leave nothing for sled to write.
        if replacing {
            self.insert(key, agent.as_bytes().to_vec());
        } else {
            self.insert_absent(key, agent.as_bytes().to_vec());
        }
        Ok(())
    }

    fn unhold(&mut self, queue: &str, slot: Slot) -> Result<()> {
        self.remove(slot_key(&[H], queue, slot));
        Ok(())
    }

    fn put_request(&mut self, id: &str, request: &RequestValue) -> Result<()> {
        self.insert(with_prefix(R, id.as_bytes()), encode_value(request));
        self.insert(expiry_key(Y, request.until_ms, id), Vec::new());
        Ok(())
    }

    fn request(&mut self, id: &str) -> Result<Option<RequestValue>> {
        self.get(&with_prefix(R, id.as_bytes()))?
            .map(|v| decode_value(&v))
            .transpose()
    }

    fn expired_requests(&mut self, clock_ms: u64) -> Result<Vec<(u64, String)>> {
        self.expired(Y, clock_ms)
    }

    fn unlist_request(&mut self, until_ms: u64, id: &str, forget: bool) -> Result<()> {
        if forget {
            self.remove(with_prefix(R, id.as_bytes()));
        }
        self.remove(expiry_key(Y, until_ms, id));
        Ok(())
    }

    fn put_nonce(&mut self, signer: &str, nonce: &str, until_ms: u64) -> Result<()> {
        self.nonces.push((until_ms, nonce_key(signer, nonce)));
        Ok(())
    }

    /// Nothing now: a checkpoint drops the nonces' buckets once the clock has passed them,
    /// and reads filter by the clock ([`super::nonces`]).
    fn forget_nonces(&mut self, _clock_ms: u64) -> Result<()> {
        Ok(())
    }

    fn backfill(&mut self, agent: &str, pattern: &str) -> Result<Option<Offset>> {
        Ok(self
            .get(&backfill_key(agent, pattern))?
            .map(|v| Offset(u64_le(&v))))
    }

    fn set_backfill(&mut self, agent: &str, pattern: &str, next: Option<Offset>) -> Result<()> {
        let key = backfill_key(agent, pattern);
        match next {
            Some(next) => self.insert(key, next.0.to_le_bytes().to_vec()),
            None => self.remove(key),
        }
        Ok(())
    }

    fn truncated_below(&mut self) -> Result<Offset> {
        Ok(Offset(self.get(TRUNCATED_KEY)?.map_or(0, |v| u64_le(&v))))
    }

    fn forget_below(&mut self, below: Offset) -> Result<()> {
        if below > self.truncated_below()? {
            self.insert(TRUNCATED_KEY.to_vec(), below.0.to_le_bytes().to_vec());
        }
        // Keys that end in the offset of the message they are about: topics' offsets,
        // ordering keys, queue lease holders, dead letters.
        for prefix in [O, K, H, D] {
            self.remove_below(prefix, below)?;
        }
        for (key, value) in self.scan_prefix(&[I])? {
            let Some((inbox, slot)) = parse_slot_key(key.get(1..).unwrap_or_default()) else {
                continue;
            };
            if slot.offset < below {
                self.remove_timers(&inbox, slot, &decode_value(&value)?);
                self.remove(key);
            }
        }
        for (key, value) in self.scan_prefix(&[U])? {
            let dedupe: DedupeValue = decode_value(&value)?;
            if dedupe.offset < below.0 {
                let id = key.get(1..).and_then(|id| std::str::from_utf8(id).ok());
                self.remove(expiry_key(X, dedupe.until_ms, id.unwrap_or_default()));
                self.remove(key);
            }
        }
        for (key, value) in self.scan_prefix(&[R])? {
            let request: RequestValue = decode_value(&value)?;
            if request.offset < below {
                let id = key.get(1..).and_then(|id| std::str::from_utf8(id).ok());
                self.remove(expiry_key(Y, request.until_ms, id.unwrap_or_default()));
                self.remove(key);
            }
        }
        let end = Bound::Excluded(positions_key(below));
        let runs = self
            .range(Bound::Included(vec![P]), end)
            .collect::<Result<Vec<_>>>()?;
        for (key, value) in runs {
            let first = from_be64(key.get(1..).unwrap_or_default());
            // A run that straddles `below` stays: its upper part is still in the log.
            if decode_location(first, &value, below).is_none() {
                self.remove(key);
            }
        }
        Ok(())
    }
}
