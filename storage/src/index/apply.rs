//! What each record does to the index: a pure function of the record and the current index
//! state (read through the same transaction), so that replaying the log rebuilds the index.

use std::ops::Bound;

use super::keys::{
    be64, dead_key, decode_location, dedupe_expiry_key, from_be64, inbox_prefix, parse_slot_key,
    positions_key, slot_key, subscription_key, trailing_offset, u64_le, with_prefix, A, CLOCK_KEY,
    D, I, P, U, X,
};
use super::overlay::Txn;
use super::{
    decode_value, encode_value, DeadEntry, DedupeValue, EntryState, EntryValue, TimerKind,
};
use crate::error::Result;
use crate::pipeline::PositionRun;
use crate::record::{Frame, Record, Slot};
use crate::Offset;

/// Applies `frames` (consecutive, in log order) and their positions `runs`.
pub(super) fn apply(txn: &mut Txn<'_>, frames: &[Frame], runs: &[PositionRun]) -> Result<()> {
    for run in runs {
        let p = &run.positions;
        debug_assert!(p.len() >= 2 && p.windows(2).all(|w| w[0] < w[1]));
        let mut value = Vec::with_capacity(8 + 4 * p.len());
        value.extend_from_slice(&run.segment.0.to_le_bytes());
        for position in p {
            value.extend_from_slice(&position.to_le_bytes());
        }
        txn.insert_new(positions_key(run.first), value);
    }
    let mut clock = txn.get(CLOCK_KEY)?.map_or(0, |v| u64_le(&v));
    for frame in frames {
        apply_record(txn, frame)?;
        clock = clock.max(frame.timestamp_ms);
    }
    if let Some(last) = frames.last() {
        prune_dedupe(txn, clock)?;
        txn.insert(CLOCK_KEY.to_vec(), clock.to_le_bytes().to_vec());
        txn.layers.active.applied = Some(last.offset);
    }
    Ok(())
}

/// Forgets client ids whose window ended by `clock`, the latest record timestamp seen. A
/// function of the log alone, so a rebuilt index forgets the same ids.
fn prune_dedupe(txn: &mut Txn<'_>, clock: u64) -> Result<()> {
    let end = Bound::Excluded(with_prefix(X, &be64(clock.saturating_add(1))));
    let expired = txn
        .range(Bound::Included(vec![X]), end)
        .collect::<Result<Vec<_>>>()?;
    for (key, _) in expired {
        let until_ms = from_be64(key.get(1..9).unwrap_or_default());
        let id = key.get(9..).unwrap_or_default();
        let dedupe_key = with_prefix(U, id);
        if let Some(value) = txn.get(&dedupe_key)? {
            if decode_value::<DedupeValue>(&value)?.until_ms == until_ms {
                txn.remove(dedupe_key);
            }
        }
        txn.remove(key);
    }
    Ok(())
}

fn remove_timers(txn: &mut Txn<'_>, inbox: &str, slot: Slot, value: &EntryValue) {
    match value.state {
        EntryState::Ready {
            not_before_ms: Some(due),
        }
        | EntryState::Leased { deadline_ms: due } => {
            txn.remove(super::keys::timer_key(due, TimerKind::Due, inbox, slot));
        }
        EntryState::Ready {
            not_before_ms: None,
        } => {}
    }
    if let Some(due) = value.expires_at_ms {
        txn.remove(super::keys::timer_key(due, TimerKind::Expiry, inbox, slot));
    }
}

/// Writes an entry and its timers; `fresh` when the message was just published, so that no
/// lower layer can hold its keys.
fn put_entry(txn: &mut Txn<'_>, inbox: &str, slot: Slot, value: &EntryValue, fresh: bool) {
    let put = |txn: &mut Txn<'_>, key: Vec<u8>, v: Vec<u8>| {
        if fresh {
            txn.insert_new(key, v);
        } else {
            txn.insert(key, v);
        }
    };
    match value.state {
        EntryState::Ready {
            not_before_ms: Some(due),
        }
        | EntryState::Leased { deadline_ms: due } => {
            put(
                txn,
                super::keys::timer_key(due, TimerKind::Due, inbox, slot),
                Vec::new(),
            );
        }
        EntryState::Ready {
            not_before_ms: None,
        } => {}
    }
    if let Some(due) = value.expires_at_ms {
        put(
            txn,
            super::keys::timer_key(due, TimerKind::Expiry, inbox, slot),
            Vec::new(),
        );
    }
    put(txn, slot_key(&[I], inbox, slot), encode_value(value));
}

/// Replaces the entry of `slot` by `update(old)`, or removes it if that returns `None`.
/// Does nothing if the message is not pending in the inbox (acked, dead or forgotten).
fn update_entry(
    txn: &mut Txn<'_>,
    inbox: &str,
    slot: Slot,
    update: impl FnOnce(EntryValue) -> Option<EntryValue>,
) -> Result<Option<EntryValue>> {
    let key = slot_key(&[I], inbox, slot);
    let Some(old) = txn.get(&key)? else {
        return Ok(None);
    };
    let old: EntryValue = decode_value(&old)?;
    remove_timers(txn, inbox, slot, &old);
    match update(old) {
        Some(new) => put_entry(txn, inbox, slot, &new, false),
        None => txn.remove(key),
    }
    Ok(Some(old))
}

fn apply_record(txn: &mut Txn<'_>, frame: &Frame) -> Result<()> {
    match &frame.record {
        Record::Message(m) => {
            let slot = Slot {
                offset: frame.offset,
                priority: m.priority,
            };
            let value = EntryValue {
                attempts: 0,
                state: EntryState::Ready {
                    not_before_ms: m.not_before_ms,
                },
                expires_at_ms: m.expires_at_ms,
            };
            for inbox in &m.destinations {
                put_entry(txn, inbox, slot, &value, true);
            }
            if let Some(until_ms) = m.dedupe_until_ms {
                let value = DedupeValue {
                    offset: frame.offset.0,
                    until_ms,
                };
                txn.insert(with_prefix(U, m.id.as_bytes()), encode_value(&value));
                txn.insert(dedupe_expiry_key(until_ms, &m.id), Vec::new());
            }
        }
        Record::Leased { .. }
        | Record::Acked { .. }
        | Record::Released { .. }
        | Record::DeadLettered { .. }
        | Record::Redriven { .. } => apply_delivery(txn, frame)?,
        Record::AgentUpserted(agent) => {
            txn.insert(with_prefix(A, agent.id.as_bytes()), encode_value(agent));
        }
        Record::AgentDeleted { agent } => delete_agent(txn, agent)?,
        Record::Subscribed {
            agent,
            topic,
            start,
        } => {
            txn.insert(
                subscription_key(agent, topic),
                start.0.to_le_bytes().to_vec(),
            );
        }
        Record::Unsubscribed { agent, topic } => txn.remove(subscription_key(agent, topic)),
        Record::Quarantined { .. } => {}
        Record::Truncated { below } => truncate(txn, *below)?,
    }
    Ok(())
}

/// Records that change the delivery state of messages already in an inbox.
fn apply_delivery(txn: &mut Txn<'_>, frame: &Frame) -> Result<()> {
    match &frame.record {
        Record::Leased { inbox, leases } => {
            for lease in leases {
                update_entry(txn, inbox, lease.slot, |old| {
                    Some(EntryValue {
                        attempts: lease.attempt,
                        state: EntryState::Leased {
                            deadline_ms: lease.deadline_ms,
                        },
                        ..old
                    })
                })?;
            }
        }
        Record::Acked { inbox, slots } => {
            for slot in slots {
                update_entry(txn, inbox, *slot, |_| None)?;
            }
        }
        Record::Released { inbox, releases } => {
            for release in releases {
                update_entry(txn, inbox, release.slot, |old| {
                    let state = EntryState::Ready {
                        not_before_ms: Some(release.not_before_ms),
                    };
                    Some(EntryValue { state, ..old })
                })?;
            }
        }
        Record::DeadLettered { inbox, letters } => {
            for letter in letters {
                if update_entry(txn, inbox, letter.slot, |_| None)?.is_some() {
                    let dead = DeadEntry {
                        slot: letter.slot,
                        reason: letter.reason,
                        attempts: letter.attempts,
                        dead_lettered_at_ms: frame.timestamp_ms,
                    };
                    txn.insert(dead_key(inbox, letter.slot.offset), encode_value(&dead));
                }
            }
        }
        Record::Redriven { inbox, slots } => {
            for slot in slots {
                let key = dead_key(inbox, slot.offset);
                if txn.get(&key)?.is_some() {
                    txn.remove(key);
                    let value = EntryValue {
                        attempts: 0,
                        state: EntryState::Ready {
                            not_before_ms: None,
                        },
                        expires_at_ms: None,
                    };
                    put_entry(txn, inbox, *slot, &value, false);
                }
            }
        }
        _ => {}
    }
    Ok(())
}

fn delete_agent(txn: &mut Txn<'_>, agent: &str) -> Result<()> {
    txn.remove(with_prefix(A, agent.as_bytes()));
    for (key, value) in txn.scan_prefix(&inbox_prefix(I, agent))? {
        if let Some((inbox, slot)) = parse_slot_key(key.get(1..).unwrap_or_default()) {
            remove_timers(txn, &inbox, slot, &decode_value(&value)?);
        }
        txn.remove(key);
    }
    for prefix in [inbox_prefix(D, agent), inbox_prefix(super::keys::S, agent)] {
        for (key, _) in txn.scan_prefix(&prefix)? {
            txn.remove(key);
        }
    }
    Ok(())
}

/// Retention removed the messages below `below`: forget their delivery state and locations.
fn truncate(txn: &mut Txn<'_>, below: Offset) -> Result<()> {
    for (key, value) in txn.scan_prefix(&[I])? {
        let Some((inbox, slot)) = parse_slot_key(key.get(1..).unwrap_or_default()) else {
            continue;
        };
        if slot.offset < below {
            remove_timers(txn, &inbox, slot, &decode_value(&value)?);
            txn.remove(key);
        }
    }
    for (key, _) in txn.scan_prefix(&[D])? {
        if trailing_offset(&key) < below.0 {
            txn.remove(key);
        }
    }
    for (key, value) in txn.scan_prefix(&[U])? {
        let dedupe: DedupeValue = decode_value(&value)?;
        if dedupe.offset < below.0 {
            txn.remove(dedupe_expiry_key(
                dedupe.until_ms,
                key.get(1..)
                    .and_then(|id| std::str::from_utf8(id).ok())
                    .unwrap_or_default(),
            ));
            txn.remove(key);
        }
    }
    let end = Bound::Excluded(positions_key(below));
    let runs = txn
        .range(Bound::Included(vec![P]), end)
        .collect::<Result<Vec<_>>>()?;
    for (key, value) in runs {
        let first = from_be64(key.get(1..).unwrap_or_default());
        // A run that straddles `below` stays: its upper part is still in the log.
        if decode_location(first, &value, below).is_none() {
            txn.remove(key);
        }
    }
    Ok(())
}
