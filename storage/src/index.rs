//! The sled index: state derived from the log, so that start-up need not replay all of it.
//!
//! Everything lives in one sled tree under one-byte key prefixes, so that the effects of a
//! run of records and the `applied` watermark saying how far they go are written by one
//! atomic `apply_batch`. After a crash sled recovers some prefix of its batches, so the
//! watermark always describes exactly the state it sits beside: recovery replays the log
//! from `applied + 1` and nothing is applied twice. Record positions (`p`) are the one
//! exception: they are written just before the batch they belong to, so that readers woken
//! by an append can find the record; recovery drops positions above the watermark.
//!
//! | prefix | key after the prefix | value |
//! |---|---|---|
//! | `m` | `applied` | last applied offset (u64 LE) |
//! | `p` | first offset (u64 BE) | segment base (u64 LE), then count+1 positions (u32 LE) |
//! | `i` | slot key: inbox, 9 − priority, offset | [`InboxEntry`] state (bincode) |
//! | `t` | due ms (u64 BE), timer kind, slot key | empty |
//! | `d` | inbox, offset (u64 BE) | [`DeadEntry`] (bincode) |
//! | `u` | client message id | offset and remembered-until ms (bincode) |
//! | `a` | agent id | [`Agent`] (bincode) |
//! | `s` | agent, topic | start offset (u64 LE) |
//!
//! Strings inside keys are length-prefixed (u16 BE), so no id can run into the next field.
//! Integers in keys are big-endian so that sled's byte order is numeric order; every other
//! integer in the engine is little-endian.
//!
//! **Invariant:** the index is a pure function of the log: deleting `index/` and reopening
//! rebuilds an equal [`IndexSnapshot`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use bincode::{Decode, Encode};

use crate::error::{Error, Result};
use crate::log::PositionRun;
use crate::record::{Agent, DeadReason, Frame, Record, Slot};
use crate::Offset;

const CONFIG: bincode::config::Configuration = bincode::config::standard();
const APPLIED_KEY: &[u8] = b"mapplied";
const P: u8 = b'p';
const I: u8 = b'i';
const T: u8 = b't';
const D: u8 = b'd';
const U: u8 = b'u';
const A: u8 = b'a';
const S: u8 = b's';

/// What kind of deadline a timer marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimerKind {
    /// The lease deadline of a leased message, or the `not_before` time of a delayed or
    /// backed-off ready message.
    Due,
    /// The `ttl_ms` expiry of a message.
    Expiry,
}

/// A deadline the sweeper must act on; timers are ordered by `due_ms`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timer {
    /// When, in wall-clock ms since the epoch.
    pub due_ms: u64,
    /// What kind of deadline.
    pub kind: TimerKind,
    /// The inbox.
    pub inbox: String,
    /// The message.
    pub slot: Slot,
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

/// A pending message of an inbox with its delivery state.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InboxEntry {
    /// The message.
    pub slot: Slot,
    /// Its state.
    pub value: EntryValue,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
struct DedupeValue {
    offset: u64,
    until_ms: u64,
}

/// Where a record is: its segment's base offset, byte position and frame length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Location {
    /// Base offset of the segment that holds it.
    pub segment: Offset,
    /// Byte position of the frame inside the segment.
    pub position: u64,
    /// Length of the frame in bytes.
    pub len: u64,
}

/// The logical content of the index, for comparing two indexes (tests, `courierctl`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexSnapshot {
    /// Last applied offset.
    pub applied: Option<Offset>,
    /// Every indexed record location.
    pub locations: BTreeMap<Offset, Location>,
    /// Pending messages per inbox, in delivery order.
    pub inboxes: BTreeMap<String, Vec<InboxEntry>>,
    /// Every timer.
    pub timers: Vec<Timer>,
    /// Dead letters per inbox.
    pub dead_letters: BTreeMap<String, Vec<DeadEntry>>,
    /// Remembered client ids: id → (offset, until ms).
    pub dedupe: BTreeMap<String, (Offset, u64)>,
    /// Registered agents.
    pub agents: BTreeMap<String, Agent>,
    /// Subscriptions: (agent, topic) → start.
    pub subscriptions: BTreeMap<(String, String), Offset>,
}

/// The sled-backed index. Cheap to clone; all clones share one database.
#[derive(Debug, Clone)]
pub struct Index {
    db: sled::Db,
    tree: sled::Tree,
}

#[expect(
    clippy::big_endian_bytes,
    reason = "index keys sort numerically only as big-endian"
)]
fn be64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

#[expect(
    clippy::big_endian_bytes,
    reason = "index keys sort numerically only as big-endian"
)]
fn from_be64(bytes: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(bytes.get(..8).unwrap_or(&[0; 8]));
    u64::from_be_bytes(a)
}

#[expect(
    clippy::big_endian_bytes,
    reason = "index keys sort numerically only as big-endian"
)]
fn push_str(key: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).expect("ids are validated far below 64 KiB");
    key.extend_from_slice(&len.to_be_bytes());
    key.extend_from_slice(s.as_bytes());
}

/// Reads a length-prefixed string at the start of `bytes`; returns it and the rest.
#[expect(
    clippy::big_endian_bytes,
    reason = "index keys sort numerically only as big-endian"
)]
fn take_str(bytes: &[u8]) -> Option<(String, &[u8])> {
    let len = usize::from(u16::from_be_bytes(bytes.get(..2)?.try_into().ok()?));
    let s = std::str::from_utf8(bytes.get(2..2 + len)?).ok()?.to_owned();
    Some((s, bytes.get(2 + len..)?))
}

fn slot_key(prefix: &[u8], inbox: &str, slot: Slot) -> Vec<u8> {
    let mut key = prefix.to_vec();
    push_str(&mut key, inbox);
    key.push(9u8.saturating_sub(slot.priority));
    key.extend_from_slice(&be64(slot.offset.0));
    key
}

fn parse_slot_key(rest: &[u8]) -> Option<(String, Slot)> {
    let (inbox, rest) = take_str(rest)?;
    let rank = *rest.first()?;
    let offset = from_be64(rest.get(1..9)?);
    Some((
        inbox,
        Slot {
            offset: Offset(offset),
            priority: 9u8.saturating_sub(rank),
        },
    ))
}

fn timer_key(due_ms: u64, kind: TimerKind, inbox: &str, slot: Slot) -> Vec<u8> {
    let mut prefix = vec![T];
    prefix.extend_from_slice(&be64(due_ms));
    prefix.push(match kind {
        TimerKind::Due => 0,
        TimerKind::Expiry => 1,
    });
    slot_key(&prefix, inbox, slot)
}

fn inbox_prefix(prefix: u8, inbox: &str) -> Vec<u8> {
    let mut key = vec![prefix];
    push_str(&mut key, inbox);
    key
}

fn dead_key(inbox: &str, offset: Offset) -> Vec<u8> {
    let mut key = inbox_prefix(D, inbox);
    key.extend_from_slice(&be64(offset.0));
    key
}

fn encode_value<T: Encode>(value: &T) -> Vec<u8> {
    bincode::encode_to_vec(value, CONFIG).expect("encoding into a Vec cannot fail")
}

fn decode_value<T: Decode<()>>(bytes: &[u8]) -> Result<T> {
    bincode::decode_from_slice(bytes, CONFIG)
        .map(|(v, _)| v)
        .map_err(|e| Error::IndexDamaged { why: e.to_string() })
}

/// Pending sled writes with read-your-writes, flushed as one atomic batch.
struct Pending<'a> {
    tree: &'a sled::Tree,
    batch: sled::Batch,
    overlay: HashMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'a> Pending<'a> {
    fn new(tree: &'a sled::Tree) -> Self {
        Self {
            tree,
            batch: sled::Batch::default(),
            overlay: HashMap::new(),
        }
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.overlay.get(key) {
            Some(v) => Ok(v.clone()),
            None => Ok(self.tree.get(key)?.map(|v| v.to_vec())),
        }
    }

    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.batch.insert(key.clone(), value.clone());
        self.overlay.insert(key, Some(value));
    }

    fn remove(&mut self, key: Vec<u8>) {
        self.batch.remove(key.clone());
        self.overlay.insert(key, None);
    }

    fn commit(self, applied: Offset) -> Result<()> {
        let mut batch = self.batch;
        batch.insert(APPLIED_KEY, &applied.0.to_le_bytes());
        self.tree.apply_batch(batch)?;
        Ok(())
    }
}

impl Index {
    /// Opens (or creates) the index in `path` with a page cache of `cache_bytes`.
    ///
    /// sled releases its directory lock from a background thread shortly after the last handle
    /// is dropped, so a reopen in the same process can find it still held; the log's own lock
    /// has already excluded other processes, so a held lock is retried for up to five seconds.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self> {
        let config = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .flush_every_ms(Some(1000));
        let mut tries = 0;
        let db = loop {
            match config.open() {
                Ok(db) => break db,
                Err(sled::Error::Io(e)) if is_lock_conflict(&e) && tries < 5000 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(sled::Error::Io(e)) if is_lock_conflict(&e) => {
                    return Err(Error::Locked {
                        path: path.to_path_buf(),
                    });
                }
                Err(other) => return Err(Error::Index(other)),
            }
        };
        let tree = db.open_tree("courier")?;
        Ok(Self { db, tree })
    }

    /// Opens a throwaway in-memory index (for tools that must not touch a server's index).
    pub fn temporary() -> Result<Self> {
        let db = sled::Config::new()
            .temporary(true)
            .cache_capacity(64 << 20)
            .open()?;
        let tree = db.open_tree("courier")?;
        Ok(Self { db, tree })
    }

    /// The last offset whose effects are in the index, or `None` for an empty index.
    pub fn applied(&self) -> Result<Option<Offset>> {
        Ok(self.tree.get(APPLIED_KEY)?.map(|v| {
            let mut a = [0u8; 8];
            a.copy_from_slice(v.get(..8).unwrap_or(&[0; 8]));
            Offset(u64::from_le_bytes(a))
        }))
    }

    /// Makes everything applied so far durable (the checkpoint) and returns how far it goes.
    pub fn flush(&self) -> Result<Option<Offset>> {
        let applied = self.applied()?;
        self.db.flush()?;
        Ok(applied)
    }

    /// Removes everything: the index is rebuilt from the log.
    pub(crate) fn clear(&self) -> Result<()> {
        self.tree.clear()?;
        Ok(())
    }

    /// Drops record positions above the watermark (written before a batch that never landed).
    pub(crate) fn drop_positions_after(&self, applied: Option<Offset>) -> Result<()> {
        let from = applied.map_or(0, |a| a.0 + 1);
        let mut start = vec![P];
        start.extend_from_slice(&be64(from));
        let mut batch = sled::Batch::default();
        for item in self.tree.range(start..vec![P + 1]) {
            batch.remove(item?.0);
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Where the record at `offset` is, if it is indexed.
    pub fn location(&self, offset: Offset) -> Result<Option<Location>> {
        let mut key = vec![P];
        key.extend_from_slice(&be64(offset.0));
        let Some(item) = self.tree.range(vec![P]..=key).next_back() else {
            return Ok(None);
        };
        let (k, v) = item?;
        let first = from_be64(k.get(1..).unwrap_or_default());
        Ok(decode_location(first, &v, offset))
    }

    /// Applies the effects of `frames` (consecutive, in log order) and records where they
    /// lie (`runs`), atomically with the new `applied` watermark.
    pub(crate) fn apply(&self, frames: &[Frame], runs: &[PositionRun]) -> Result<()> {
        let mut pending = Pending::new(&self.tree);
        for run in runs {
            let p = &run.positions;
            debug_assert!(p.len() >= 2 && p.windows(2).all(|w| w[0] < w[1]));
            let mut key = vec![P];
            key.extend_from_slice(&be64(run.first.0));
            let mut value = Vec::with_capacity(8 + 4 * p.len());
            value.extend_from_slice(&run.segment.0.to_le_bytes());
            for position in p {
                value.extend_from_slice(&position.to_le_bytes());
            }
            pending.insert(key, value);
        }
        let mut last: Option<Offset> = None;
        for frame in frames {
            match &frame.record {
                Record::AgentDeleted { .. } | Record::Truncated { .. } => {
                    if let Some(last) = last.take() {
                        pending.commit(last)?;
                        pending = Pending::new(&self.tree);
                    }
                    self.apply_sweeping(pending, frame)?;
                    pending = Pending::new(&self.tree);
                    continue;
                }
                _ => apply_simple(&mut pending, frame)?,
            }
            last = Some(frame.offset);
        }
        if let Some(last) = last {
            pending.commit(last)?;
        }
        Ok(())
    }

    /// Records that touch many keys: applied alone, on committed state, as one batch.
    fn apply_sweeping(&self, mut pending: Pending<'_>, frame: &Frame) -> Result<()> {
        match &frame.record {
            Record::AgentDeleted { agent } => {
                pending.remove([&[A][..], agent.as_bytes()].concat());
                for item in self.tree.scan_prefix(inbox_prefix(I, agent)) {
                    let (key, value) = item?;
                    if let Some((inbox, slot)) = parse_slot_key(key.get(1..).unwrap_or_default()) {
                        remove_timers(&mut pending, &inbox, slot, &decode_value(&value)?);
                    }
                    pending.remove(key.to_vec());
                }
                for prefix in [inbox_prefix(D, agent), inbox_prefix(S, agent)] {
                    for item in self.tree.scan_prefix(prefix) {
                        pending.remove(item?.0.to_vec());
                    }
                }
            }
            Record::Truncated { below } => {
                for item in self.tree.scan_prefix([I]) {
                    let (key, value) = item?;
                    let Some((inbox, slot)) = parse_slot_key(key.get(1..).unwrap_or_default())
                    else {
                        continue;
                    };
                    if slot.offset < *below {
                        remove_timers(&mut pending, &inbox, slot, &decode_value(&value)?);
                        pending.remove(key.to_vec());
                    }
                }
                for item in self.tree.scan_prefix([D]) {
                    let (key, _) = item?;
                    if from_be64(key.get(key.len().saturating_sub(8)..).unwrap_or_default())
                        < below.0
                    {
                        pending.remove(key.to_vec());
                    }
                }
                for item in self.tree.scan_prefix([U]) {
                    let (key, value) = item?;
                    if decode_value::<DedupeValue>(&value)?.offset < below.0 {
                        pending.remove(key.to_vec());
                    }
                }
                let mut end = vec![P];
                end.extend_from_slice(&be64(below.0));
                for item in self.tree.range(vec![P]..end) {
                    let (key, value) = item?;
                    let first = from_be64(key.get(1..).unwrap_or_default());
                    // A run that straddles `below` stays: its upper part is still in the log.
                    if decode_location(first, &value, Offset(below.0)).is_none() {
                        pending.remove(key.to_vec());
                    }
                }
            }
            _ => unreachable!("only sweeping records are passed here"),
        }
        pending.commit(frame.offset)
    }

    /// The pending messages of `inbox` in delivery order (priority, then offset).
    pub fn inbox(&self, inbox: &str) -> impl Iterator<Item = Result<InboxEntry>> + '_ {
        self.tree.scan_prefix(inbox_prefix(I, inbox)).map(|item| {
            let (key, value) = item?;
            let (_, slot) = parse_slot_key(key.get(1..).unwrap_or_default()).ok_or_else(bad_key)?;
            Ok(InboxEntry {
                slot,
                value: decode_value(&value)?,
            })
        })
    }

    /// The state of one message in one inbox, if it is pending there.
    pub fn entry(&self, inbox: &str, slot: Slot) -> Result<Option<EntryValue>> {
        self.tree
            .get(slot_key(&[I], inbox, slot))?
            .map(|v| decode_value(&v))
            .transpose()
    }

    /// Timers in deadline order, starting with the earliest.
    pub fn timers(&self) -> impl Iterator<Item = Result<Timer>> + '_ {
        self.tree.scan_prefix([T]).map(|item| {
            let (key, _) = item?;
            parse_timer_key(key.get(1..).unwrap_or_default()).ok_or_else(bad_key)
        })
    }

    /// Dead letters of `inbox` with offsets above `after`, oldest first, at most `limit`.
    pub fn dead_letters(
        &self,
        inbox: &str,
        after: Option<Offset>,
        limit: usize,
    ) -> Result<Vec<DeadEntry>> {
        let start = match after {
            Some(after) => dead_key(inbox, Offset(after.0.saturating_add(1))),
            None => inbox_prefix(D, inbox),
        };
        let prefix = inbox_prefix(D, inbox);
        let mut out = Vec::new();
        for item in self.tree.range(start..) {
            let (key, value) = item?;
            if !key.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            out.push(decode_value(&value)?);
        }
        Ok(out)
    }

    /// The offset first published with client id `id`, if remembered at `now_ms`.
    pub fn dedupe(&self, id: &str, now_ms: u64) -> Result<Option<Offset>> {
        let Some(value) = self.tree.get([&[U][..], id.as_bytes()].concat())? else {
            return Ok(None);
        };
        let value: DedupeValue = decode_value(&value)?;
        Ok((value.until_ms > now_ms).then_some(Offset(value.offset)))
    }

    /// Forgets client ids whose window ended before `now_ms`; returns how many.
    pub fn prune_dedupe(&self, now_ms: u64) -> Result<usize> {
        let mut removed = 0;
        for item in self.tree.scan_prefix([U]) {
            let (key, value) = item?;
            if decode_value::<DedupeValue>(&value)?.until_ms <= now_ms {
                // Compare-and-swap so that a concurrent re-publish of the same id is kept.
                if self
                    .tree
                    .compare_and_swap(&key, Some(&value), None::<&[u8]>)?
                    .is_ok()
                {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Every registered agent, by id.
    pub fn agents(&self) -> Result<Vec<Agent>> {
        self.tree
            .scan_prefix([A])
            .map(|item| decode_value(&item?.1))
            .collect()
    }

    /// One agent.
    pub fn agent(&self, id: &str) -> Result<Option<Agent>> {
        self.tree
            .get([&[A][..], id.as_bytes()].concat())?
            .map(|v| decode_value(&v))
            .transpose()
    }

    /// Every subscription: (agent, topic, start).
    pub fn subscriptions(&self) -> Result<Vec<(String, String, Offset)>> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix([S]) {
            let (key, value) = item?;
            let (agent, rest) = take_str(key.get(1..).unwrap_or_default()).ok_or_else(bad_key)?;
            let (topic, _) = take_str(rest).ok_or_else(bad_key)?;
            out.push((agent, topic, Offset(u64_le(&value))));
        }
        Ok(out)
    }

    /// The lowest offset still pending or dead-lettered in any inbox.
    pub fn min_live_offset(&self) -> Result<Option<Offset>> {
        let mut min: Option<u64> = None;
        for prefix in [I, D] {
            for item in self.tree.scan_prefix([prefix]) {
                let key = item?.0;
                let offset = from_be64(key.get(key.len().saturating_sub(8)..).unwrap_or_default());
                min = Some(min.map_or(offset, |m| m.min(offset)));
            }
        }
        Ok(min.map(Offset))
    }

    /// The whole logical content, for comparisons. Reads everything: not for hot paths.
    pub fn snapshot(&self) -> Result<IndexSnapshot> {
        let mut snap = IndexSnapshot {
            applied: self.applied()?,
            ..IndexSnapshot::default()
        };
        for item in self.tree.iter() {
            let (key, value) = item?;
            let rest = key.get(1..).unwrap_or_default();
            match key.first().copied() {
                Some(P) => {
                    let first = from_be64(rest);
                    let count = value.len().saturating_sub(12) / 4;
                    for i in 0..count as u64 {
                        if let Some(loc) = decode_location(first, &value, Offset(first + i)) {
                            snap.locations.insert(Offset(first + i), loc);
                        }
                    }
                }
                Some(I) => {
                    let (inbox, slot) = parse_slot_key(rest).ok_or_else(bad_key)?;
                    let entry = InboxEntry {
                        slot,
                        value: decode_value(&value)?,
                    };
                    snap.inboxes.entry(inbox).or_default().push(entry);
                }
                Some(T) => snap.timers.push(parse_timer_key(rest).ok_or_else(bad_key)?),
                Some(D) => {
                    let (inbox, _) = take_str(rest).ok_or_else(bad_key)?;
                    snap.dead_letters
                        .entry(inbox)
                        .or_default()
                        .push(decode_value(&value)?);
                }
                Some(U) => {
                    let v: DedupeValue = decode_value(&value)?;
                    let id = String::from_utf8_lossy(rest).into_owned();
                    snap.dedupe.insert(id, (Offset(v.offset), v.until_ms));
                }
                Some(A) => {
                    let agent: Agent = decode_value(&value)?;
                    snap.agents.insert(agent.id.clone(), agent);
                }
                Some(S) => {
                    let (agent, rest) = take_str(rest).ok_or_else(bad_key)?;
                    let (topic, _) = take_str(rest).ok_or_else(bad_key)?;
                    snap.subscriptions
                        .insert((agent, topic), Offset(u64_le(&value)));
                }
                _ => {}
            }
        }
        Ok(snap)
    }
}

/// sled reports a held lock as an `Other` error wrapping `WouldBlock` in its text.
fn is_lock_conflict(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock")
}

fn bad_key() -> Error {
    Error::IndexDamaged {
        why: "malformed key".into(),
    }
}

fn u64_le(bytes: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(bytes.get(..8).unwrap_or(&[0; 8]));
    u64::from_le_bytes(a)
}

fn decode_location(first: u64, value: &[u8], offset: Offset) -> Option<Location> {
    let segment = u64_le(value.get(..8)?);
    let i = usize::try_from(offset.0.checked_sub(first)?).ok()?;
    let at = |n: usize| -> Option<u64> {
        let b = value.get(8 + 4 * n..12 + 4 * n)?;
        Some(u64::from(u32::from_le_bytes(b.try_into().ok()?)))
    };
    let position = at(i)?;
    let end = at(i + 1)?;
    Some(Location {
        segment: Offset(segment),
        position,
        len: end - position,
    })
}

fn parse_timer_key(rest: &[u8]) -> Option<Timer> {
    let due_ms = from_be64(rest.get(..8)?);
    let kind = match rest.get(8)? {
        0 => TimerKind::Due,
        _ => TimerKind::Expiry,
    };
    let (inbox, slot) = parse_slot_key(rest.get(9..)?)?;
    Some(Timer {
        due_ms,
        kind,
        inbox,
        slot,
    })
}

fn remove_timers(pending: &mut Pending<'_>, inbox: &str, slot: Slot, value: &EntryValue) {
    match value.state {
        EntryState::Ready {
            not_before_ms: Some(due),
        }
        | EntryState::Leased { deadline_ms: due } => {
            pending.remove(timer_key(due, TimerKind::Due, inbox, slot));
        }
        EntryState::Ready {
            not_before_ms: None,
        } => {}
    }
    if let Some(due) = value.expires_at_ms {
        pending.remove(timer_key(due, TimerKind::Expiry, inbox, slot));
    }
}

fn put_entry(pending: &mut Pending<'_>, inbox: &str, slot: Slot, value: &EntryValue) {
    match value.state {
        EntryState::Ready {
            not_before_ms: Some(due),
        }
        | EntryState::Leased { deadline_ms: due } => {
            pending.insert(timer_key(due, TimerKind::Due, inbox, slot), Vec::new());
        }
        EntryState::Ready {
            not_before_ms: None,
        } => {}
    }
    if let Some(due) = value.expires_at_ms {
        pending.insert(timer_key(due, TimerKind::Expiry, inbox, slot), Vec::new());
    }
    pending.insert(slot_key(&[I], inbox, slot), encode_value(value));
}

/// Replaces the entry of `slot` by `update(old)`, or removes it if that returns `None`.
/// Does nothing if the message is not pending in the inbox (acked, dead or forgotten).
fn update_entry(
    pending: &mut Pending<'_>,
    inbox: &str,
    slot: Slot,
    update: impl FnOnce(EntryValue) -> Option<EntryValue>,
) -> Result<Option<EntryValue>> {
    let key = slot_key(&[I], inbox, slot);
    let Some(old) = pending.get(&key)? else {
        return Ok(None);
    };
    let old: EntryValue = decode_value(&old)?;
    remove_timers(pending, inbox, slot, &old);
    match update(old) {
        Some(new) => put_entry(pending, inbox, slot, &new),
        None => pending.remove(key),
    }
    Ok(Some(old))
}

#[expect(
    clippy::too_many_lines,
    reason = "one arm per record type reads best as one match"
)]
fn apply_simple(pending: &mut Pending<'_>, frame: &Frame) -> Result<()> {
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
                put_entry(pending, inbox, slot, &value);
            }
            if let Some(until_ms) = m.dedupe_until_ms {
                let value = DedupeValue {
                    offset: frame.offset.0,
                    until_ms,
                };
                pending.insert([&[U][..], m.id.as_bytes()].concat(), encode_value(&value));
            }
        }
        Record::Leased { inbox, leases } => {
            for lease in leases {
                update_entry(pending, inbox, lease.slot, |old| {
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
                update_entry(pending, inbox, *slot, |_| None)?;
            }
        }
        Record::Released { inbox, releases } => {
            for release in releases {
                update_entry(pending, inbox, release.slot, |old| {
                    let state = EntryState::Ready {
                        not_before_ms: Some(release.not_before_ms),
                    };
                    Some(EntryValue { state, ..old })
                })?;
            }
        }
        Record::DeadLettered { inbox, letters } => {
            for letter in letters {
                if update_entry(pending, inbox, letter.slot, |_| None)?.is_some() {
                    let dead = DeadEntry {
                        slot: letter.slot,
                        reason: letter.reason,
                        attempts: letter.attempts,
                        dead_lettered_at_ms: frame.timestamp_ms,
                    };
                    pending.insert(dead_key(inbox, letter.slot.offset), encode_value(&dead));
                }
            }
        }
        Record::Redriven { inbox, slots } => {
            for slot in slots {
                let key = dead_key(inbox, slot.offset);
                if pending.get(&key)?.is_some() {
                    pending.remove(key);
                    let value = EntryValue {
                        attempts: 0,
                        state: EntryState::Ready {
                            not_before_ms: None,
                        },
                        expires_at_ms: None,
                    };
                    put_entry(pending, inbox, *slot, &value);
                }
            }
        }
        Record::AgentUpserted(agent) => {
            pending.insert(
                [&[A][..], agent.id.as_bytes()].concat(),
                encode_value(agent),
            );
        }
        Record::Subscribed {
            agent,
            topic,
            start,
        } => {
            let mut key = inbox_prefix(S, agent);
            push_str(&mut key, topic);
            pending.insert(key, start.0.to_le_bytes().to_vec());
        }
        Record::Unsubscribed { agent, topic } => {
            let mut key = inbox_prefix(S, agent);
            push_str(&mut key, topic);
            pending.remove(key);
        }
        Record::Quarantined { .. } => {}
        Record::AgentDeleted { .. } | Record::Truncated { .. } => {
            unreachable!("sweeping records are applied by Index::apply_sweeping")
        }
    }
    Ok(())
}
