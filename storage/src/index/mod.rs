//! The index: state derived from the log, so that start-up need not replay all of it.
//!
//! Everything lives in one sled tree under one-byte key prefixes ([`keys`]). Applying records
//! changes only an in-memory layer ([`overlay`]); a checkpoint writes the accumulated changes
//! and the `applied` watermark saying how far they go in one atomic sled batch, then flushes
//! sled. After a crash sled holds exactly the state of the last checkpoint, so recovery
//! replays the log from `applied + 1` and nothing is applied twice.
//!
//! | prefix | key after the prefix | value |
//! |---|---|---|
//! | `m` | `applied`, `clock`, `truncated` | last applied offset; latest record timestamp; highest truncation point (u64 LE) |
//! | `p` | first offset (u64 BE) | segment base (u64 LE), then count+1 positions (u32 LE) |
//! | `i` | inbox, 9 − priority, offset ≫ 10 (a bucket, see [`store`]) | bincode list of (offset, [`EntryValue`]) |
//! | `t` | due ms (u64 BE), timer kind, slot key | empty |
//! | `d` | inbox, offset (u64 BE) | [`DeadEntry`] (bincode) |
//! | `u` | client message id | offset and remembered-until ms (bincode) |
//! | `x` | remembered-until ms (u64 BE), client id | empty (expiry order of `u`) |
//! | `a` | agent id | [`Agent`] (bincode) |
//! | `s` | agent, topic | start offset (u64 LE) |
//! | `n` | topic name | [`TopicSeen`] (bincode): messages published to it, the latest offset |
//! | `o` | topic, offset (u64 BE) | empty: the messages of a topic still in the log |
//! | `b` | agent, pattern | next offset (u64 LE): a backfill under way |
//! | `c` | queue inbox name (`capability:<name>`) | empty: a capability queue that messages entered |
//! | `h` | queue inbox name, 9 − priority, offset | agent id: who holds the lease of a leased queue message |
//! | `k` | inbox, offset (u64 BE) | ordering key of a message routed there (kept until retention removes it) |
//! | `r` | request id | [`RequestValue`] (bincode): offset, sender, remembered-until ms, first reply |
//! | `y` | remembered-until ms (u64 BE), request id | empty (expiry order of `r`) |
//! | `w` | until ms ≫ 10 (u64 BE), checkpoint's applied offset (u64 BE) | bincode list of used nonces (until ms, signer and nonce), see [`nonces`] |
//!
//! **Invariant:** the index is a pure function of the log: deleting `index/` and reopening
//! rebuilds an equal [`IndexSnapshot`].

mod apply;
mod keys;
mod nonces;
mod overlay;
mod store;

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use bincode::{Decode, Encode};

use crate::error::{Error, Result};
pub use crate::position::Location;
use crate::position::PositionRun;
use crate::record::{Agent, Frame, Slot};
pub use crate::state::{DeadEntry, EntryState, EntryValue, RequestValue, TimerKind, TopicSeen};
use crate::Offset;
use keys::{
    be64, decode_location, from_be64, inbox_prefix, parse_slot_key, parse_timer_key, positions_key,
    slot_key, take_str, topic_offset_key, trailing_offset, u64_le, with_prefix, A, APPLIED_KEY, B,
    C, CLOCK_KEY, D, H, I, K, N, O, P, R, S, T, TRUNCATED_KEY, U,
};
use overlay::{prefix_end, Change, Layer, Layers, Merged, Txn};

const CONFIG: bincode::config::Configuration = bincode::config::standard();

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

/// A pending message of an inbox with its delivery state.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InboxEntry {
    /// The message.
    pub slot: Slot,
    /// Its state.
    pub value: EntryValue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
struct DedupeValue {
    offset: u64,
    until_ms: u64,
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
    /// Topics that messages were published to.
    pub topics: BTreeMap<String, TopicSeen>,
    /// The messages of each topic still in the log, in offset order.
    pub topic_offsets: BTreeMap<String, Vec<Offset>>,
    /// Backfills under way: (agent, pattern) → next offset.
    pub backfills: BTreeMap<(String, String), Offset>,
    /// Capability queues that messages entered, by inbox name.
    pub queues: std::collections::BTreeSet<String>,
    /// Leased queue messages: (queue, slot) → the agent that holds the lease.
    pub holders: BTreeMap<(String, Slot), String>,
    /// Remembered requests by id.
    pub requests: BTreeMap<String, RequestValue>,
    /// Ordering keys of messages routed to an inbox: (inbox, offset) → key.
    pub orderings: BTreeMap<(String, Offset), String>,
    /// Used nonces of signed requests: (until ms, key).
    pub nonces: std::collections::BTreeSet<(u64, String)>,
}

/// A run of record positions as the index stores it (`p` keys): its first offset, then the
/// segment base and count+1 positions.
struct StoredRun {
    first: u64,
    value: Vec<u8>,
}

impl StoredRun {
    /// Whether the run holds `offset`: one of its `count` positions is the record's.
    fn holds(&self, offset: Offset) -> bool {
        let count = (self.value.len().saturating_sub(8) / 4).saturating_sub(1) as u64;
        offset.0 >= self.first && offset.0 - self.first < count
    }

    fn location(&self, offset: Offset) -> Option<Location> {
        decode_location(self.first, &self.value, offset)
    }
}

/// The index. Cheap to clone; all clones share one database and one set of layers.
#[derive(Debug, Clone)]
pub struct Index {
    db: sled::Db,
    tree: sled::Tree,
    /// Changes not yet checkpointed to sled.
    layers: Arc<RwLock<Layers>>,
    /// Serializes checkpoints.
    checkpointing: Arc<Mutex<()>>,
    /// Held by each apply for its whole batch (which may wait on sled), and by a checkpoint
    /// while it freezes the active layer: see [`overlay::Txn`].
    applying: Arc<Mutex<()>>,
}

fn encode_value<T: Encode>(value: &T) -> Vec<u8> {
    bincode::encode_to_vec(value, CONFIG).expect("encoding into a Vec cannot fail")
}

fn decode_value<T: Decode<()>>(bytes: &[u8]) -> Result<T> {
    bincode::decode_from_slice(bytes, CONFIG)
        .map(|(v, _)| v)
        .map_err(|e| Error::IndexDamaged { why: e.to_string() })
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

impl Index {
    /// Opens (or creates) the index in `path` with a page cache of `cache_bytes`.
    ///
    /// sled releases its directory lock from a background thread shortly after the last handle
    /// is dropped, so a reopen in the same process can find it still held; the log's own lock
    /// has already excluded other processes, so a held lock is retried for up to five seconds.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self> {
        // Only checkpoints flush: sled's own periodic flush would add I/O and no safety.
        let config = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .flush_every_ms(None);
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
        nonces::migrate(&tree)?;
        Ok(Self {
            db,
            tree,
            layers: Arc::default(),
            checkpointing: Arc::default(),
            applying: Arc::default(),
        })
    }

    /// The layers for reading (see [`overlay::read`]).
    fn layers(&self) -> std::sync::RwLockReadGuard<'_, Layers> {
        overlay::read(&self.layers)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        overlay::get(&self.layers, &self.tree, key)
    }

    fn range(&self, start: Bound<Vec<u8>>, end: Bound<Vec<u8>>) -> Merged {
        overlay::range(&self.layers, &self.tree, start, end)
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Merged {
        self.range(Bound::Included(prefix.to_vec()), prefix_end(prefix))
    }

    /// The last offset whose effects are in the index, or `None` for an empty index.
    pub fn applied(&self) -> Result<Option<Offset>> {
        if let Some(applied) = self.layers().applied() {
            return Ok(applied);
        }
        self.checkpointed()
    }

    /// How far the last checkpoint goes: what recovery finds after a crash.
    pub fn checkpointed(&self) -> Result<Option<Offset>> {
        Ok(self.tree.get(APPLIED_KEY)?.map(|v| Offset(u64_le(&v))))
    }

    /// Changes waiting for the next checkpoint.
    pub fn pending_changes(&self) -> usize {
        let layers = self.layers();
        layers.active.changes.len() + layers.active.nonces.len()
    }

    /// Writes every change applied so far to sled, atomically with the watermark, and flushes
    /// sled (the checkpoint). Returns how far the checkpoint goes.
    pub fn checkpoint(&self) -> Result<Option<Offset>> {
        let _one_at_a_time = self.checkpointing.lock().expect("checkpoint lock");
        let frozen = {
            let _no_batch = self.applying.lock().unwrap_or_else(PoisonError::into_inner);
            let mut layers = self.layers.write().expect("index layers lock");
            let applied = layers.active.applied;
            let mut active = std::mem::replace(
                &mut layers.active,
                Layer {
                    changes: BTreeMap::new(),
                    nonces: Vec::new(),
                    applied,
                },
            );
            // A checkpoint that failed left its layer frozen: write it again, under the newer
            // changes, rather than hiding it.
            if let Some(failed) = layers.frozen.take() {
                let mut changes = failed.changes.clone();
                changes.append(&mut active.changes);
                active.changes = changes;
                let mut nonces = failed.nonces.clone();
                nonces.append(&mut active.nonces);
                active.nonces = nonces;
            }
            let frozen = Arc::new(active);
            layers.frozen = Some(frozen.clone());
            frozen
        };
        #[expect(
            clippy::disallowed_methods,
            reason = "how long a checkpoint took, for its log line; nothing is decided by it"
        )]
        let started = std::time::Instant::now();
        let mut batch = store::batch(&self.tree, &frozen.changes)?;
        let clock = match frozen.changes.get(CLOCK_KEY).and_then(Change::value) {
            Some(clock) => u64_le(clock),
            None => self.tree.get(CLOCK_KEY)?.map_or(0, |v| u64_le(&v)),
        };
        let seq = frozen.applied.map_or(0, |a| a.0);
        nonces::write(&self.tree, &mut batch, &frozen.nonces, seq, clock)?;
        let prepared = started.elapsed();
        if let Some(applied) = frozen.applied {
            batch.insert(APPLIED_KEY, &applied.0.to_le_bytes());
        }
        crate::failpoint::crash("checkpoint.start");
        let written = self.tree.apply_batch(batch).and_then(|()| {
            crate::failpoint::crash("checkpoint.applied");
            self.db.flush().map(|_| ())
        });
        // On failure the frozen layer stays readable; the caller poisons the log.
        written?;
        tracing::debug!(
            changes = frozen.changes.len(),
            prepare_us = prepared.as_micros(),
            total_us = started.elapsed().as_micros(),
            "index checkpoint written"
        );
        crate::failpoint::crash("checkpoint.flushed");
        self.layers.write().expect("index layers lock").frozen = None;
        match frozen.applied {
            Some(applied) => Ok(Some(applied)),
            None => self.checkpointed(),
        }
    }

    /// Removes everything: the index is rebuilt from the log.
    pub(crate) fn clear(&self) -> Result<()> {
        *self.layers.write().expect("index layers lock") = Layers::default();
        self.tree.clear()?;
        self.db.flush()?;
        Ok(())
    }

    /// Drops record positions above the checkpoint (only a damaged index could have them).
    pub(crate) fn drop_positions_after(&self, applied: Option<Offset>) -> Result<()> {
        let from = applied.map_or(0, |a| a.0 + 1);
        let mut batch = sled::Batch::default();
        for item in self.tree.range(positions_key(Offset(from))..vec![P + 1]) {
            batch.remove(item?.0);
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Where the record at `offset` is, if it is indexed: the run with the greatest first
    /// offset at or below `offset`, from the layers or from sled, whichever is newer.
    ///
    /// Runs are inserted once each, in offset order, and only the oldest are ever removed, so
    /// a run that the layers hold is newer than every run in sled: then sled is not asked.
    /// Reads of recent records (every delivery) thus never wait for a checkpoint, whose
    /// `apply_batch` holds sled's process-wide write lock against every reader.
    pub fn location(&self, offset: Offset) -> Result<Option<Location>> {
        Ok(self.run_at(offset)?.and_then(|run| run.location(offset)))
    }

    /// [`Index::location`] of each of `offsets`, in order: offsets that one run holds (the
    /// messages of one receive, mostly) cost one lookup together.
    pub fn locations(&self, offsets: &[Offset]) -> Result<Vec<Option<Location>>> {
        let mut last: Option<StoredRun> = None;
        let mut found = Vec::with_capacity(offsets.len());
        for &offset in offsets {
            if !last.as_ref().is_some_and(|run| run.holds(offset)) {
                last = self.run_at(offset)?;
            }
            found.push(last.as_ref().and_then(|run| run.location(offset)));
        }
        Ok(found)
    }

    /// The live run that holds `offset`, if any (see [`Index::location`]).
    fn run_at(&self, offset: Offset) -> Result<Option<StoredRun>> {
        let bounds = Self::run_bounds(offset);
        let mut best = Self::newest_run(&self.layers(), &bounds);
        if !matches!(best, Some((_, Some(_)))) {
            // No run in the layers, or the newest one there was removed: sled decides.
            if let Some((k, v)) = self.tree.range(bounds).next_back().transpose()? {
                if best
                    .as_ref()
                    .is_none_or(|(key, _)| k.as_ref() > key.as_slice())
                {
                    best = Some((k.to_vec(), Some(v.to_vec())));
                }
            }
        }
        // A deleted run was truncated by retention, and so is every offset it held.
        let Some((key, Some(value))) = best else {
            return Ok(None);
        };
        Ok(Some(StoredRun {
            first: from_be64(key.get(1..).unwrap_or_default()),
            value,
        }))
    }

    /// [`Index::location`] as far as the in-memory layers decide it: `None` if sled would
    /// have to be asked (which can wait for a checkpoint), so that callers on async threads
    /// can read recent records inline and hand the rest to a blocking thread.
    /// Never waits for the indexer either: while it holds the layers (its apply may itself
    /// wait for sled), this answers `None`.
    pub fn location_in_memory(&self, offset: Offset) -> Option<Option<Location>> {
        self.locations_in_memory(&[offset]).pop().flatten()
    }

    /// [`Index::location_in_memory`] of each of `offsets`, in order, under one look at the
    /// layers; offsets that one run holds cost one lookup together.
    pub fn locations_in_memory(&self, offsets: &[Offset]) -> Vec<Option<Option<Location>>> {
        let layers = match self.layers.try_read() {
            Ok(layers) => layers,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return vec![None; offsets.len()],
        };
        let mut last: Option<StoredRun> = None;
        let mut found = Vec::with_capacity(offsets.len());
        for &offset in offsets {
            if !last.as_ref().is_some_and(|run| run.holds(offset)) {
                // Only a live run of the layers decides; anything else is sled's to say.
                last = match Self::newest_run(&layers, &Self::run_bounds(offset)) {
                    Some((key, Some(value))) => Some(StoredRun {
                        first: from_be64(key.get(1..).unwrap_or_default()),
                        value,
                    }),
                    Some((_, None)) | None => None,
                };
            }
            found.push(last.as_ref().map(|run| run.location(offset)));
        }
        found
    }

    /// The position-run keys at or below `offset`'s.
    fn run_bounds(offset: Offset) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
        (
            Bound::Included(vec![P]),
            Bound::Included(positions_key(offset)),
        )
    }

    /// The run with the greatest first offset within `bounds` in the layers (`None` as its
    /// value if the newest change removed it); on a tie the newer layer wins.
    fn newest_run(
        layers: &Layers,
        bounds: &(Bound<Vec<u8>>, Bound<Vec<u8>>),
    ) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
        let newest_in = |layer: &Layer| {
            layer
                .changes
                .range::<Vec<u8>, _>(bounds.clone())
                .next_back()
                .map(|(k, c)| (k.clone(), c.value().map(<[u8]>::to_vec)))
        };
        let active = newest_in(&layers.active);
        let frozen = layers.frozen.as_deref().and_then(newest_in);
        let mut best: Option<(Vec<u8>, Option<Vec<u8>>)> = None;
        for candidate in [frozen, active].into_iter().flatten() {
            if best.as_ref().is_none_or(|(k, _)| candidate.0 >= *k) {
                best = Some(candidate);
            }
        }
        best
    }

    /// Applies the effects of `frames` (consecutive, in log order) and records where they
    /// lie (`runs`). In memory until the next [`Index::checkpoint`].
    pub(crate) fn apply(&self, frames: &[Frame], runs: &[PositionRun]) -> Result<()> {
        let _one_at_a_time = self.applying.lock().unwrap_or_else(PoisonError::into_inner);
        let mut txn = Txn::new(&self.layers, &self.tree);
        apply::apply(&mut txn, frames, runs)?;
        txn.install();
        Ok(())
    }

    /// The pending messages of `inbox` in delivery order (priority, then offset).
    pub fn inbox(&self, inbox: &str) -> impl Iterator<Item = Result<InboxEntry>> {
        self.scan_prefix(&inbox_prefix(I, inbox)).map(|item| {
            let (key, value) = item?;
            let (_, slot) = parse_slot_key(key.get(1..).unwrap_or_default()).ok_or_else(bad_key)?;
            Ok(InboxEntry {
                slot,
                value: decode_value(&value)?,
            })
        })
    }

    /// The inbox's ack floor: its lowest pending offset (everything below is acked,
    /// dead-lettered or not addressed to it), or `None` if nothing is pending.
    pub fn floor(&self, inbox: &str) -> Result<Option<Offset>> {
        let mut floor: Option<Offset> = None;
        for rank in 0..=9u8 {
            let mut prefix = inbox_prefix(I, inbox);
            prefix.push(rank);
            if let Some(item) = self.scan_prefix(&prefix).next() {
                let offset = Offset(trailing_offset(&item?.0));
                floor = Some(floor.map_or(offset, |f| f.min(offset)));
            }
        }
        Ok(floor)
    }

    /// The state of one message in one inbox, if it is pending there.
    pub fn entry(&self, inbox: &str, slot: Slot) -> Result<Option<EntryValue>> {
        self.get(&slot_key(&[I], inbox, slot))?
            .map(|v| decode_value(&v))
            .transpose()
    }

    /// Timers in deadline order, starting with the earliest.
    pub fn timers(&self) -> impl Iterator<Item = Result<Timer>> {
        self.scan_prefix(&[T]).map(|item| {
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
        let prefix = inbox_prefix(D, inbox);
        let start = match after {
            Some(after) => {
                let mut key = prefix.clone();
                key.extend_from_slice(&be64(after.0.saturating_add(1)));
                key
            }
            None => prefix.clone(),
        };
        self.range(Bound::Included(start), prefix_end(&prefix))
            .take(limit)
            .map(|item| decode_value(&item?.1))
            .collect()
    }

    /// The offset first published with client id `id`, if remembered at `now_ms`.
    pub fn dedupe(&self, id: &str, now_ms: u64) -> Result<Option<Offset>> {
        let Some(value) = self.get(&with_prefix(U, id.as_bytes()))? else {
            return Ok(None);
        };
        let value: DedupeValue = decode_value(&value)?;
        let current = crate::state::still_remembered(value.until_ms, now_ms);
        Ok(current.then_some(Offset(value.offset)))
    }

    /// Every remembered client id: (id, offset, until ms), in id order. Reads them all: for
    /// loading the server's memory at start.
    pub fn remembered(&self) -> Result<Vec<(String, Offset, u64)>> {
        self.scan_prefix(&[U])
            .map(|item| {
                let (key, value) = item?;
                let value: DedupeValue = decode_value(&value)?;
                let id = String::from_utf8_lossy(key.get(1..).unwrap_or_default()).into_owned();
                Ok((id, Offset(value.offset), value.until_ms))
            })
            .collect()
    }

    /// The latest record timestamp applied (0 for an empty index): the clock by which
    /// remembered ids are forgotten ([`crate::state::prune_dedupe`]).
    pub fn clock(&self) -> Result<u64> {
        Ok(self.get(CLOCK_KEY)?.map_or(0, |v| u64_le(&v)))
    }

    /// Every registered agent, by id.
    pub fn agents(&self) -> Result<Vec<Agent>> {
        self.scan_prefix(&[A])
            .map(|item| decode_value(&item?.1))
            .collect()
    }

    /// One agent.
    pub fn agent(&self, id: &str) -> Result<Option<Agent>> {
        self.get(&with_prefix(A, id.as_bytes()))?
            .map(|v| decode_value(&v))
            .transpose()
    }

    /// Every subscription: (agent, topic, start).
    pub fn subscriptions(&self) -> Result<Vec<(String, String, Offset)>> {
        let mut out = Vec::new();
        for item in self.scan_prefix(&[S]) {
            let (key, value) = item?;
            let (agent, rest) = take_str(key.get(1..).unwrap_or_default()).ok_or_else(bad_key)?;
            let (topic, _) = take_str(rest).ok_or_else(bad_key)?;
            out.push((agent, topic, Offset(u64_le(&value))));
        }
        Ok(out)
    }

    /// Every topic that messages were published to, by name.
    pub fn topics(&self) -> Result<Vec<(String, TopicSeen)>> {
        self.scan_prefix(&[N])
            .map(|item| {
                let (key, value) = item?;
                let topic = String::from_utf8_lossy(key.get(1..).unwrap_or_default()).into_owned();
                Ok((topic, decode_value(&value)?))
            })
            .collect()
    }

    /// Up to `limit` offsets of messages to `topic` in `from..to`, in order.
    pub fn topic_offsets(
        &self,
        topic: &str,
        from: Offset,
        to: Offset,
        limit: usize,
    ) -> Result<Vec<Offset>> {
        let start = Bound::Included(topic_offset_key(topic, from));
        let end = Bound::Excluded(topic_offset_key(topic, to));
        self.range(start, end)
            .take(limit)
            .map(|item| Ok(Offset(trailing_offset(&item?.0))))
            .collect()
    }

    /// The highest point retention truncated the log at (0 if it never did).
    pub fn truncated_below(&self) -> Result<Offset> {
        Ok(Offset(self.get(TRUNCATED_KEY)?.map_or(0, |v| u64_le(&v))))
    }

    /// Every backfill under way: (agent, pattern, next offset).
    pub fn backfills(&self) -> Result<Vec<(String, String, Offset)>> {
        let mut out = Vec::new();
        for item in self.scan_prefix(&[B]) {
            let (key, value) = item?;
            let (agent, rest) = take_str(key.get(1..).unwrap_or_default()).ok_or_else(bad_key)?;
            let (pattern, _) = take_str(rest).ok_or_else(bad_key)?;
            out.push((agent, pattern, Offset(u64_le(&value))));
        }
        Ok(out)
    }

    /// Every capability queue that a message ever entered, by inbox name
    /// (`capability:<name>`).
    pub fn queues(&self) -> Result<Vec<String>> {
        self.scan_prefix(&[C])
            .map(|item| {
                let (key, _) = item?;
                Ok(String::from_utf8_lossy(key.get(1..).unwrap_or_default()).into_owned())
            })
            .collect()
    }

    /// The ordering keys of the messages routed to `inbox` that retention kept: (offset, key),
    /// in offset order.
    pub fn orderings(&self, inbox: &str) -> Result<Vec<(Offset, String)>> {
        self.scan_prefix(&inbox_prefix(K, inbox))
            .map(|item| {
                let (key, value) = item?;
                let offset = Offset(trailing_offset(&key));
                Ok((offset, String::from_utf8_lossy(&value).into_owned()))
            })
            .collect()
    }

    /// Every remembered request, by id. Reads them all: for loading the server's memory at
    /// start.
    pub fn requests(&self) -> Result<Vec<(String, RequestValue)>> {
        self.scan_prefix(&[R])
            .map(|item| {
                let (key, value) = item?;
                let id = String::from_utf8_lossy(key.get(1..).unwrap_or_default()).into_owned();
                Ok((id, decode_value(&value)?))
            })
            .collect()
    }

    /// Every used nonce still remembered: (until ms, key). Reads them all: for loading the
    /// server's memory at start.
    pub fn nonces(&self) -> Result<Vec<(u64, String)>> {
        let clock = self.clock()?;
        let layered: Vec<(u64, String)> = {
            let layers = self.layers();
            let frozen = layers.frozen.iter().flat_map(|f| f.nonces.iter());
            frozen
                .chain(&layers.active.nonces)
                .filter(|(until, _)| *until > clock)
                .cloned()
                .collect()
        };
        let mut all = nonces::read(&self.tree, clock)?;
        all.extend(layered);
        Ok(all)
    }

    /// Every leased queue message and the agent that holds its lease: (queue, slot, agent).
    pub fn holders(&self) -> Result<Vec<(String, Slot, String)>> {
        self.scan_prefix(&[H])
            .map(|item| {
                let (key, value) = item?;
                let (queue, slot) =
                    parse_slot_key(key.get(1..).unwrap_or_default()).ok_or_else(bad_key)?;
                Ok((queue, slot, String::from_utf8_lossy(&value).into_owned()))
            })
            .collect()
    }

    /// The lowest offset still pending or dead-lettered in any inbox. Reads every entry.
    pub fn min_live_offset(&self) -> Result<Option<Offset>> {
        let mut min: Option<u64> = None;
        for prefix in [I, D] {
            for item in self.scan_prefix(&[prefix]) {
                let offset = trailing_offset(&item?.0);
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
        for item in self.range(Bound::Unbounded, Bound::Unbounded) {
            let (key, value) = item?;
            snap.add(&key, &value)?;
        }
        snap.nonces = self.nonces()?.into_iter().collect();
        Ok(snap)
    }
}

impl IndexSnapshot {
    /// Adds the locations of a stored run of positions that starts at `first`.
    fn add_locations(&mut self, first: u64, value: &[u8]) {
        let count = value.len().saturating_sub(12) / 4;
        for i in 0..count as u64 {
            if let Some(loc) = decode_location(first, value, Offset(first + i)) {
                self.locations.insert(Offset(first + i), loc);
            }
        }
    }

    /// Adds what one stored key and value hold.
    fn add(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        let snap = self;
        let rest = key.get(1..).unwrap_or_default();
        match key.first().copied() {
            Some(P) => snap.add_locations(from_be64(rest), value),
            Some(I) => {
                let (inbox, slot) = parse_slot_key(rest).ok_or_else(bad_key)?;
                let value = decode_value(value)?;
                snap.inboxes
                    .entry(inbox)
                    .or_default()
                    .push(InboxEntry { slot, value });
            }
            Some(T) => snap.timers.push(parse_timer_key(rest).ok_or_else(bad_key)?),
            Some(D) => {
                let (inbox, _) = take_str(rest).ok_or_else(bad_key)?;
                let dead = decode_value(value)?;
                snap.dead_letters.entry(inbox).or_default().push(dead);
            }
            Some(U) => {
                let v: DedupeValue = decode_value(value)?;
                let id = String::from_utf8_lossy(rest).into_owned();
                snap.dedupe.insert(id, (Offset(v.offset), v.until_ms));
            }
            Some(A) => {
                let agent: Agent = decode_value(value)?;
                snap.agents.insert(agent.id.clone(), agent);
            }
            _ => snap.add_routing(key, value)?,
        }
        Ok(())
    }

    /// [`IndexSnapshot::add`] of the keys of routing, requests and signatures.
    fn add_routing(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        let snap = self;
        let rest = key.get(1..).unwrap_or_default();
        match key.first().copied() {
            Some(S) => {
                let (agent, rest) = take_str(rest).ok_or_else(bad_key)?;
                let (topic, _) = take_str(rest).ok_or_else(bad_key)?;
                snap.subscriptions
                    .insert((agent, topic), Offset(u64_le(value)));
            }
            Some(N) => {
                let topic = String::from_utf8_lossy(rest).into_owned();
                snap.topics.insert(topic, decode_value(value)?);
            }
            Some(O) => {
                let (topic, offset) = take_str(rest).ok_or_else(bad_key)?;
                let offset = Offset(from_be64(offset));
                snap.topic_offsets.entry(topic).or_default().push(offset);
            }
            Some(B) => {
                let (agent, rest) = take_str(rest).ok_or_else(bad_key)?;
                let (pattern, _) = take_str(rest).ok_or_else(bad_key)?;
                snap.backfills
                    .insert((agent, pattern), Offset(u64_le(value)));
            }
            Some(C) => {
                snap.queues
                    .insert(String::from_utf8_lossy(rest).into_owned());
            }
            Some(K) => {
                let (inbox, offset) = take_str(rest).ok_or_else(bad_key)?;
                let key = String::from_utf8_lossy(value).into_owned();
                snap.orderings
                    .insert((inbox, Offset(from_be64(offset))), key);
            }
            Some(R) => {
                let id = String::from_utf8_lossy(rest).into_owned();
                snap.requests.insert(id, decode_value(value)?);
            }
            Some(H) => {
                let (queue, slot) = parse_slot_key(rest).ok_or_else(bad_key)?;
                let agent = String::from_utf8_lossy(value).into_owned();
                snap.holders.insert((queue, slot), agent);
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Record;
    use apply::MAX_RUN;
    use keys::W;

    fn run(first: u64, positions: &[u32]) -> PositionRun {
        PositionRun {
            segment: Offset(0),
            first: Offset(first),
            positions: positions.to_vec(),
        }
    }

    /// A checkpoint's `apply_batch` holds sled's process-wide write lock; a read of a record
    /// that is not checkpointed yet must not wait for it. A sled transaction holds the same
    /// lock while its closure runs, which here waits until the read has answered.
    #[test]
    fn recent_locations_are_read_without_waiting_for_sled() {
        let dir = tempfile::tempdir().unwrap();
        let index = Arc::new(Index::open(dir.path(), 1 << 20).unwrap());
        index.apply(&[], &[run(0, &[0, 100, 200])]).unwrap();
        index.checkpoint().unwrap();
        index.apply(&[], &[run(2, &[200, 260, 400])]).unwrap();

        let (locked_tx, locked_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let tree = index.tree.clone();
        let holder = std::thread::spawn(move || {
            tree.transaction(|_| {
                locked_tx.send(()).unwrap();
                let _ = release_rx.recv();
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .unwrap();
        });
        locked_rx.recv().unwrap();
        let (read_tx, read_rx) = std::sync::mpsc::channel();
        let reader = index.clone();
        let read = std::thread::spawn(move || {
            read_tx
                .send([2, 3].map(|o| reader.location(Offset(o)).unwrap()))
                .unwrap();
        });
        // A guard against a hang, not a timing: with sled's lock held, a read that asks sled
        // never answers.
        let answered = read_rx.recv_timeout(std::time::Duration::from_secs(30));
        drop(release_tx); // also ends a retried closure's wait
        holder.join().unwrap();
        read.join().unwrap();
        let location = |position, len| {
            Some(Location {
                segment: Offset(0),
                position,
                len,
            })
        };
        assert_eq!(
            answered.expect("the read of offsets 2 and 3 waited for sled's lock"),
            [location(200, 60), location(260, 140)]
        );
        // Checkpointed runs come from sled, and an offset past every run is not indexed.
        assert_eq!(index.location(Offset(1)).unwrap(), location(100, 100));
        assert_eq!(index.location(Offset(4)).unwrap(), None);
        // Without sled: the layers decide offsets 2 and 3 (and that 4 is past every run);
        // offset 1 is only in sled, so the answer is "ask sled".
        assert_eq!(index.location_in_memory(Offset(2)), Some(location(200, 60)));
        assert_eq!(index.location_in_memory(Offset(4)), Some(None));
        assert_eq!(index.location_in_memory(Offset(1)), None);
    }

    /// The indexer's apply can wait on sled (here for the record clock, which only sled holds
    /// after a checkpoint) while a checkpoint writes; readers of the layers must not wait
    /// with it, and see the batch whole once it is in.
    #[test]
    fn an_apply_waiting_for_sled_holds_no_reader_up() {
        let dir = tempfile::tempdir().unwrap();
        let index = Arc::new(Index::open(dir.path(), 1 << 20).unwrap());
        let frame = |offset| Frame {
            offset: Offset(offset),
            timestamp_ms: 5,
            record: Record::AgentDeleted {
                agent: "nobody".into(),
            },
        };
        index
            .apply(&[frame(0), frame(1)], &[run(0, &[0, 100, 200])])
            .unwrap();
        index.checkpoint().unwrap();
        index.apply(&[], &[run(2, &[200, 300])]).unwrap();

        let (locked_tx, locked_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let tree = index.tree.clone();
        let holder = std::thread::spawn(move || {
            tree.transaction(|_| {
                let _ = locked_tx.send(());
                let _ = release_rx.recv();
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .unwrap();
        });
        locked_rx.recv().unwrap();
        let applier = index.clone();
        let apply = std::thread::spawn(move || {
            applier.apply(&[frame(3)], &[run(3, &[300, 350])]).unwrap();
        });
        // Whatever the apply has reached (it waits on sled for the clock), the layers answer
        // at once, and never half of its batch.
        for _ in 0..200 {
            assert_eq!(
                index.location_in_memory(Offset(2)),
                Some(Some(Location {
                    segment: Offset(0),
                    position: 200,
                    len: 100
                })),
                "a reader waited for the apply"
            );
            assert!(matches!(index.applied(), Ok(Some(Offset(1)))));
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        drop(release_tx);
        holder.join().unwrap();
        apply.join().unwrap();
        assert_eq!(index.applied().unwrap(), Some(Offset(3)));
        assert_eq!(
            index
                .location(Offset(3))
                .unwrap()
                .map(|l| (l.position, l.len)),
            Some((300, 50))
        );
    }

    fn run_keys(index: &Index) -> Vec<u64> {
        index
            .scan_prefix(&[P])
            .map(|item| from_be64(item.unwrap().0.get(1..).unwrap()))
            .collect()
    }

    /// Small batches of one segment share one position key until it holds `MAX_RUN`
    /// records; a gap, another segment or a checkpointed run starts a new key, and every
    /// offset is found where it was written.
    #[test]
    fn consecutive_runs_share_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path(), 1 << 20).unwrap();
        index.apply(&[], &[run(0, &[0, 100, 200])]).unwrap();
        index.apply(&[], &[run(2, &[200, 250])]).unwrap();
        index.apply(&[], &[run(3, &[250, 300, 420])]).unwrap();
        assert_eq!(run_keys(&index), [0]);
        let located = |o| {
            index
                .location(Offset(o))
                .unwrap()
                .map(|l| (l.position, l.len))
        };
        let expected = [(0, 100), (100, 100), (200, 50), (250, 50), (300, 120)];
        for (o, want) in expected.into_iter().enumerate() {
            assert_eq!(located(o as u64), Some(want), "offset {o}");
        }
        assert_eq!(located(5), None);
        // Offset 5 is not where offset 4 ended (a record in between was never indexed):
        // its own key.
        index.apply(&[], &[run(5, &[500, 510])]).unwrap();
        // Another segment.
        let mut other = run(6, &[0, 10]);
        other.segment = Offset(6);
        index.apply(&[], &[other]).unwrap();
        assert_eq!(run_keys(&index), [0, 5, 6]);
        index.checkpoint().unwrap();
        // A checkpointed run is not extended (it is sled's), a new key follows it.
        let mut next = run(7, &[10, 20]);
        next.segment = Offset(6);
        index.apply(&[], &[next]).unwrap();
        assert_eq!(run_keys(&index), [0, 5, 6, 7]);
        assert_eq!(located(7), Some((10, 10)));
        // A key holds at most MAX_RUN records.
        for i in 0..MAX_RUN as u32 {
            let mut more = run(8 + u64::from(i), &[20 + i, 21 + i]);
            more.segment = Offset(6);
            index.apply(&[], &[more]).unwrap();
        }
        assert_eq!(run_keys(&index), [0, 5, 6, 7, 8 + MAX_RUN as u64 - 1]);
        assert_eq!(
            located(8 + MAX_RUN as u64 - 1),
            Some((20 + MAX_RUN as u64 - 1, 1))
        );
    }

    fn used(offset: u64, timestamp_ms: u64, nonce: &str, until_ms: u64) -> Frame {
        Frame {
            offset: Offset(offset),
            timestamp_ms,
            record: Record::NonceUsed {
                signer: "alice".into(),
                nonce: nonce.into(),
                until_ms,
            },
        }
    }

    fn keys_with(index: &Index, prefix: u8) -> Vec<Vec<u8>> {
        index
            .tree
            .scan_prefix([prefix])
            .map(|item| item.unwrap().0.to_vec())
            .collect()
    }

    fn nonces(index: &Index) -> Vec<(u64, String)> {
        let mut all = index.nonces().unwrap();
        all.sort();
        all
    }

    /// Used nonces reach sled as one list per bucket and checkpoint, are read back from the
    /// layers and from sled alike, stop counting once the record clock passes them, and their
    /// bucket leaves sled at the first checkpoint after the clock has passed all of it.
    #[test]
    fn used_nonces_are_kept_by_bucket_until_the_clock_passes_them() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path(), 1 << 20).unwrap();
        index
            .apply(
                &[used(0, 1_000, "a", 5_000), used(1, 1_000, "b", 5_100)],
                &[run(0, &[0, 10, 20])],
            )
            .unwrap();
        let both = vec![(5_000, "alice a".to_owned()), (5_100, "alice b".to_owned())];
        assert_eq!(nonces(&index), both, "from the active layer");
        index.checkpoint().unwrap();
        assert_eq!(nonces(&index), both, "from sled");
        assert_eq!(keys_with(&index, W).len(), 1, "one bucket (4096..5120 ms)");
        // A later nonce in the same bucket, at another checkpoint: a second list.
        index
            .apply(&[used(2, 2_000, "c", 5_119)], &[run(2, &[20, 30])])
            .unwrap();
        index.checkpoint().unwrap();
        assert_eq!(keys_with(&index, W).len(), 2);
        assert_eq!(index.snapshot().unwrap().nonces.len(), 3);

        // The clock passes 5,000 and 5,100: those no longer count; 5,119 still does.
        index
            .apply(&[used(3, 5_100, "d", 9_000)], &[run(3, &[30, 40])])
            .unwrap();
        let left = vec![(5_119, "alice c".to_owned()), (9_000, "alice d".to_owned())];
        assert_eq!(nonces(&index), left);
        index.checkpoint().unwrap();
        assert_eq!(keys_with(&index, W).len(), 3, "bucket 4 is not over yet");
        // At 5,119 the whole bucket is over: its lists go.
        index
            .apply(&[used(4, 5_119, "e", 9_001)], &[run(4, &[40, 50])])
            .unwrap();
        index.checkpoint().unwrap();
        assert_eq!(
            keys_with(&index, W).len(),
            2,
            "bucket 8 (8192..9216), twice"
        );
        drop(index);
        let index = Index::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            nonces(&index),
            vec![(9_000, "alice d".to_owned()), (9_001, "alice e".to_owned())]
        );
    }

    /// An index that kept one `z` key per nonce has them moved into buckets at open.
    #[test]
    fn nonces_kept_one_key_each_are_moved_into_buckets() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path(), 1 << 20).unwrap();
        for (until, key) in [(7_000, "bob n1"), (70_000, "bob n2")] {
            index
                .tree
                .insert(keys::expiry_key(keys::Z, until, key), Vec::new())
                .unwrap();
        }
        index
            .tree
            .insert(CLOCK_KEY, &1_000u64.to_le_bytes())
            .unwrap();
        drop(index);
        let index = Index::open(dir.path(), 1 << 20).unwrap();
        assert!(keys_with(&index, keys::Z).is_empty());
        assert_eq!(keys_with(&index, W).len(), 2);
        assert_eq!(
            nonces(&index),
            vec![(7_000, "bob n1".to_owned()), (70_000, "bob n2".to_owned())]
        );
    }
}
