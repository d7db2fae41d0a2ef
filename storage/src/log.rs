//! The log's public face: open (with recovery), append, read by offset, the durable end and
//! its notifications, retention, checkpoints, close. The work of committing appends is done by
//! the threads of [`crate::pipeline`].
//!
//! A write, fsync or index failure poisons the log: every waiter gets the error and every
//! later append gets [`Error::Poisoned`] (fail-stop; no fsync is ever retried).
//!
//! **Invariant:** offsets below [`Log::durable_end`] are durable under the policy and readable
//! (their positions are in `recent` or in the index); nothing above it is visible to readers.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::dir::{self, Segment, SegmentInfo};
use crate::error::{Error, Result};
use crate::index::Index;
use crate::io::DirLock;
use crate::options::{LogOptions, Retention};
use crate::pipeline::{Threads, Writer};
use crate::position::Location;
use crate::record::{self, Decoded, Frame, Record};
use crate::recovery::{self, RecoveryReport};
use crate::shared::{Appended, LogStats, Request, Shared};
use crate::Offset;

/// The most bytes one `pread` of [`Log::read_many`] reads for several records (a record
/// larger than this is still read whole).
const READ_SPAN: u64 = 256 * 1024;

/// Decodes the record of `offset` from `bytes`, read at `position` of `segment`.
fn decode_at(segment: &Path, offset: Offset, position: u64, bytes: &[u8]) -> Result<Frame> {
    let corrupt = |reason| Error::Corrupt {
        segment: segment.to_path_buf(),
        position,
        reason,
    };
    match record::decode(bytes) {
        Decoded::Record(frame, _) if frame.offset == offset => Ok(frame),
        Decoded::Record(frame, _) => Err(corrupt(crate::Corruption::OffsetMismatch {
            expected: offset.0,
            found: frame.offset.0,
        })),
        Decoded::Corrupt(reason) => Err(corrupt(reason)),
        Decoded::Zero => Err(corrupt(crate::Corruption::Zeroed)),
        Decoded::Incomplete { .. } => Err(corrupt(crate::Corruption::Truncated)),
    }
}

/// Where the writer puts the result of one blocking append ([`Log::append`]); the writer's
/// single notify after the commit wakes the appender. Dropped unanswered (the writer thread
/// died), it answers `Closed` and wakes the appender itself, which must not wait forever.
struct Answer {
    slot: Arc<Mutex<Option<Result<Appended>>>>,
    shared: Arc<Shared>,
    answered: bool,
}

impl Answer {
    fn set(mut self, result: Result<Appended>) {
        *self
            .slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(result);
        self.answered = true;
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        *self
            .slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Err(Error::Closed));
        self.shared.blocking.wake();
    }
}

/// The message log. See the module documentation.
pub struct Log {
    shared: Arc<Shared>,
    /// The background threads; `None` once closed.
    threads: Mutex<Option<Threads>>,
    /// Close without the closing checkpoint ([`Log::crash_on_close`]).
    crash_on_close: AtomicBool,
    _lock: DirLock,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

impl Log {
    /// Opens the log in `dir` (creating it if empty), recovering from whatever a crash left:
    /// a torn tail of the newest segment is truncated and reported, damage anywhere else is
    /// [`Error::Corrupt`], and the index is brought up to date from its checkpoint.
    pub fn open(dir: &Path, options: LogOptions) -> Result<(Self, RecoveryReport)> {
        let disk = options.disk.clone();
        let log_dir = dir.join("log");
        disk.create_dir_all(&log_dir)
            .map_err(|e| Error::io("create directory", &log_dir, e))?;
        disk.sync_dir(dir)
            .map_err(|e| Error::io("sync directory", dir, e))?;
        let lock = dir::lock(disk.as_ref(), dir)?;
        dir::remove_prepared(disk.as_ref(), &log_dir)?;
        let index_dir = options
            .index_dir
            .clone()
            .unwrap_or_else(|| dir.join("index"));
        let open_and_recover = || -> Result<_> {
            let index = Index::open(&index_dir, options.index_cache_bytes)?;
            let recovered =
                recovery::recover(disk.as_ref(), &log_dir, &index, options.verify_sealed)?;
            Ok((index, recovered))
        };
        let (index, recovered) = match open_and_recover() {
            // The index is derived from the log: a damaged one (sled's files torn, say, by a
            // full disk) is set aside, never deleted, and rebuilt.
            Err(Error::Index(sled::Error::Corruption { .. })) => {
                let aside = dir::set_aside(&index_dir)?;
                tracing::warn!(
                    index = %index_dir.display(),
                    moved_to = %aside.display(),
                    "the index is damaged; moved it aside and rebuilding it from the log"
                );
                let (index, mut recovered) = open_and_recover()?;
                recovered.report.index_set_aside = Some(aside);
                recovered.report.index_rebuilt = true;
                (index, recovered)
            }
            other => other?,
        };
        let end = recovered.report.next_offset;
        let shared = Arc::new(Shared::new(
            dir.to_path_buf(),
            options,
            index,
            recovered.segments,
            end,
        ));
        let writer = Writer::new(shared.clone(), end, recovered.active_len)?;
        let threads = Threads::spawn(&shared, writer)?;
        let log = Self {
            shared,
            threads: Mutex::new(Some(threads)),
            crash_on_close: AtomicBool::new(false),
            _lock: lock,
        };
        Ok((log, recovered.report))
    }

    /// Queues `records` for appending with the given wall-clock timestamp; `done` is called
    /// from the writer thread once they are durable (or failed), or at once on the caller's
    /// thread if the log is poisoned or closed. All or none are appended.
    /// `done` must be quick and must not block (above all not on this log): the next group
    /// commit waits for it.
    pub fn submit(
        &self,
        timestamp_ms: u64,
        records: Vec<Record>,
        done: impl FnOnce(Result<Appended>) + Send + 'static,
    ) {
        if self.shared.is_poisoned() {
            return done(Err(Error::Poisoned));
        }
        let request = Request {
            timestamp_ms,
            records,
            done: Box::new(done),
        };
        if let Err(refused) = self.shared.intake.push(request) {
            (refused.done)(Err(Error::Closed));
        }
    }

    /// Appends `records` and blocks until they are durable under the fsync policy.
    pub fn append(&self, timestamp_ms: u64, records: Vec<Record>) -> Result<Appended> {
        let slot: Arc<Mutex<Option<Result<Appended>>>> = Arc::default();
        let answer = Answer {
            slot: slot.clone(),
            shared: self.shared.clone(),
            answered: false,
        };
        self.submit(timestamp_ms, records, move |result| answer.set(result));
        self.shared.blocking.wait_for(&slot)
    }

    /// Reads the record at `offset` through the index (never a scan).
    pub fn read(&self, offset: Offset) -> Result<Frame> {
        self.read_many(&[offset])
            .pop()
            .unwrap_or(Err(Error::NotFound(offset.0)))
    }

    /// [`Log::read`] of each of `offsets`, in order. Offsets that one position run holds are
    /// located with one index lookup, and records that lie next to each other in a segment
    /// are read with one `pread` (the messages of one receive, mostly).
    pub fn read_many(&self, offsets: &[Offset]) -> Vec<Result<Frame>> {
        let located = self.locate(offsets, |unknown| {
            match self.shared.index.locations(unknown) {
                Ok(found) => found
                    .into_iter()
                    .zip(unknown)
                    .map(|(l, o)| Some(l.ok_or(Error::NotFound(o.0))))
                    .collect(),
                // Each offset gets its own error (errors are not `Clone`).
                Err(_) => unknown
                    .iter()
                    .map(|o| {
                        let location = self.shared.index.location(*o);
                        Some(location.and_then(|l| l.ok_or(Error::NotFound(o.0))))
                    })
                    .collect(),
            }
        });
        let wanted = offsets
            .iter()
            .zip(located)
            .map(|(o, l)| (*o, l.unwrap_or(Err(Error::NotFound(o.0)))))
            .collect();
        self.read_located(wanted)
    }

    /// [`Log::read_many`] for the records that can be found without asking sled (every
    /// recent record): then each costs at most a `pread` from the page cache, cheap enough for
    /// an async thread. `None` for those only sled knows the place of: read them with
    /// [`Log::read_many`] on a blocking thread.
    pub fn read_many_recent(&self, offsets: &[Offset]) -> Vec<Option<Result<Frame>>> {
        let located = self.locate(offsets, |unknown| {
            self.shared
                .index
                .locations_in_memory(unknown)
                .into_iter()
                .zip(unknown)
                .map(|(l, o)| l.map(|l| l.ok_or(Error::NotFound(o.0))))
                .collect()
        });
        let known: Vec<bool> = located.iter().map(Option::is_some).collect();
        let wanted = offsets
            .iter()
            .zip(located)
            .filter_map(|(o, l)| Some((*o, l?)))
            .collect();
        let mut read = self.read_located(wanted).into_iter();
        known
            .into_iter()
            .map(|known| if known { read.next() } else { None })
            .collect()
    }

    /// Where each of `offsets` is: from the durable end and the recent runs, and for the
    /// rest from `index`, asked once with those offsets in order (one answer each; `None`:
    /// not known there either).
    fn locate(
        &self,
        offsets: &[Offset],
        index: impl FnOnce(&[Offset]) -> Vec<Option<Result<Location>>>,
    ) -> Vec<Option<Result<Location>>> {
        let mut located = self.locate_recent(offsets);
        let unknown: Vec<Offset> = offsets
            .iter()
            .zip(&located)
            .filter(|(_, l)| l.is_none())
            .map(|(o, _)| *o)
            .collect();
        if !unknown.is_empty() {
            let mut answers = index(&unknown).into_iter();
            for slot in located.iter_mut().filter(|l| l.is_none()) {
                *slot = answers.next().flatten();
            }
        }
        located
    }

    /// Where each of `offsets` is as far as the durable end and the recent runs say:
    /// `Some(Err(NotFound))` past the durable end, `None` where the index must say.
    fn locate_recent(&self, offsets: &[Offset]) -> Vec<Option<Result<Location>>> {
        let durable_end = self.durable_end();
        offsets
            .iter()
            .map(|&offset| {
                if offset >= durable_end {
                    return Some(Err(Error::NotFound(offset.0)));
                }
                self.shared.recent.locate(offset).map(Ok)
            })
            .collect()
    }

    /// Reads the records at their places, one `pread` for each stretch of records that lie
    /// next to each other in one segment (up to [`READ_SPAN`] bytes).
    fn read_located(&self, wanted: Vec<(Offset, Result<Location>)>) -> Vec<Result<Frame>> {
        let mut frames = Vec::with_capacity(wanted.len());
        let mut rest = wanted.into_iter().peekable();
        while let Some((offset, place)) = rest.next() {
            let first = match place {
                Ok(location) => location,
                Err(e) => {
                    frames.push(Err(e));
                    continue;
                }
            };
            // The stretch: following records that start where the previous one ends.
            let mut stretch = vec![(offset, first)];
            let mut span_end = first.position + first.len;
            while let Some((_, Ok(next))) = rest.peek() {
                if next.segment != first.segment
                    || next.position != span_end
                    || next.position + next.len - first.position > READ_SPAN
                {
                    break;
                }
                span_end = next.position + next.len;
                if let Some((offset, Ok(next))) = rest.next() {
                    stretch.push((offset, next));
                }
            }
            match self.read_span(offset, first.segment, first.position, span_end) {
                Ok((segment, buf)) => {
                    for (offset, place) in stretch {
                        let from = usize::try_from(place.position - first.position);
                        let len = usize::try_from(place.len);
                        let bytes = match (from, len) {
                            (Ok(from), Ok(len)) => buf.get(from..from.saturating_add(len)),
                            _ => None,
                        };
                        frames.push(decode_at(
                            &segment.path,
                            offset,
                            place.position,
                            bytes.unwrap_or_default(),
                        ));
                    }
                }
                // Each record gets its own error (errors are not `Clone`).
                Err(e) if stretch.len() == 1 => frames.push(Err(e)),
                Err(_) => frames.extend(stretch.into_iter().map(|(offset, place)| {
                    let end = place.position + place.len;
                    let (segment, buf) =
                        self.read_span(offset, place.segment, place.position, end)?;
                    decode_at(&segment.path, offset, place.position, &buf)
                })),
            }
        }
        frames
    }

    /// The bytes `from..to` of the segment based at `base`, where the record at `offset`
    /// starts (the one a missing segment is reported for).
    fn read_span(
        &self,
        offset: Offset,
        base: Offset,
        from: u64,
        to: u64,
    ) -> Result<(Arc<Segment>, Vec<u8>)> {
        let segment = self
            .shared
            .segments
            .get(base)
            .ok_or(Error::NotFound(offset.0))?;
        let len = usize::try_from(to - from).map_err(|_| Error::NotFound(offset.0))?;
        let mut buf = vec![0u8; len];
        segment
            .file
            .read_at(&mut buf, from)
            .map_err(|e| Error::io("read segment", &segment.path, e))?;
        Ok((segment, buf))
    }

    /// The offset after the last durable record: every offset below it can be read.
    pub fn durable_end(&self) -> Offset {
        self.shared.durable.get()
    }

    /// Blocks until the durable end passes `end` or `timeout` elapses; returns the durable end.
    pub fn wait_past(&self, end: Offset, timeout: Duration) -> Offset {
        self.shared.durable.wait_past(end, timeout)
    }

    /// Registers `listener`, called from the writer thread with the new durable end after each
    /// commit (for example to wake async long-polls). It must not block.
    pub fn on_durable(&self, listener: impl Fn(Offset) + Send + Sync + 'static) {
        self.shared.listeners.add(Arc::new(listener));
    }

    /// The derived index (read access; the indexer thread is its only writer).
    ///
    /// The index is updated by a thread of its own, just behind the durable end; this waits
    /// until it reflects every append completed before the call (read-your-writes), or until
    /// the log is poisoned (then it may lag; every record stays readable through [`Log::read`]).
    pub fn index(&self) -> &Index {
        let target = self.durable_end();
        let shared = &self.shared;
        shared.indexed.wait_for(target, || shared.is_poisoned());
        &shared.index
    }

    /// What the writer has done since the log was opened; `records / fsyncs` is the mean
    /// group-commit size.
    pub fn stats(&self) -> LogStats {
        self.shared.counters.stats()
    }

    /// Whether an earlier I/O failure stopped the log.
    pub fn is_poisoned(&self) -> bool {
        self.shared.is_poisoned()
    }

    /// Makes the index durable up to what is applied (the checkpoint) and returns that offset.
    /// Recovery replays only the log after the last checkpoint. sled also checkpoints by itself
    /// every second.
    pub fn checkpoint(&self) -> Result<Option<Offset>> {
        self.index().checkpoint()
    }

    /// The segments, oldest first.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.shared.segments.infos()
    }

    /// Deletes whole old segments per `retention` at wall-clock time `now_ms` and returns the
    /// paths deleted. The active segment is never deleted; a segment is deleted for size only
    /// if no message in it is pending or dead-lettered, and for age regardless (their delivery
    /// state is dropped by a [`Record::Truncated`] appended first). Agents and subscriptions
    /// are appended again first, so that no registration lives only in a deleted segment.
    pub fn enforce_retention(&self, retention: Retention, now_ms: u64) -> Result<Vec<PathBuf>> {
        let _serial = self.shared.retention.lock().expect("retention lock");
        let segments = self.segments();
        let mut total: u64 = segments.iter().map(|s| s.bytes).sum();
        // Records the index has not applied yet may hold live messages: count them as live.
        let unindexed = self
            .index()
            .applied()?
            .map_or(Offset(0), |a| Offset(a.0 + 1));
        let live = match self.index().min_live_offset()? {
            Some(live) => live.min(unindexed),
            None => unindexed,
        };
        let mut below = None;
        for pair in segments.windows(2) {
            let (segment, next) = (&pair[0], &pair[1]);
            let expired = match retention.max_age_ms {
                Some(max_age) if next.base.0 > segment.base.0 => {
                    let newest = self.read(Offset(next.base.0 - 1))?.timestamp_ms;
                    newest.saturating_add(max_age) < now_ms
                }
                _ => false,
            };
            let oversize = retention.max_bytes.is_some_and(|max| total > max) && live >= next.base;
            if !expired && !oversize {
                break;
            }
            total -= segment.bytes;
            below = Some(next.base);
        }
        let Some(below) = below else {
            return Ok(Vec::new());
        };
        let mut records: Vec<Record> = self
            .shared
            .index
            .agents()?
            .into_iter()
            .map(Record::AgentUpserted)
            .collect();
        for (agent, topic, start) in self.index().subscriptions()? {
            records.push(Record::Subscribed {
                agent,
                topic,
                start,
            });
        }
        records.push(Record::Truncated { below });
        self.append(now_ms, records)?;
        crate::failpoint::crash("retention.truncated");
        let doomed: Vec<Arc<Segment>> = self.shared.segments.remove_below(below);
        let mut deleted = Vec::new();
        for segment in doomed {
            self.shared
                .disk
                .remove_file(&segment.path)
                .map_err(|e| Error::io("delete segment", &segment.path, e))?;
            tracing::info!(segment = %segment.path.display(), "deleted segment by retention");
            crate::failpoint::crash("retention.deleted");
            deleted.push(segment.path.clone());
        }
        let log_dir = &self.shared.log_dir;
        self.shared
            .disk
            .sync_dir(log_dir)
            .map_err(|e| Error::io("sync directory", log_dir, e))?;
        Ok(deleted)
    }

    /// Stops the writer after the queued appends, syncs the active segment and flushes the
    /// index. Called by `Drop` too; calling it twice is harmless.
    pub fn close(&self) -> Result<()> {
        self.shared.intake.close();
        if let Some(threads) = self.threads.lock().expect("threads lock").take() {
            threads.join(&self.shared);
        }
        if self.is_poisoned() {
            return Err(Error::Poisoned);
        }
        if self.crash_on_close.load(Ordering::Acquire) {
            return Ok(());
        }
        self.shared.index.checkpoint()?;
        Ok(())
    }

    /// Makes closing (and dropping) the log skip its closing checkpoint, so that the index
    /// is left as a crash leaves it: at its last checkpoint, with recovery to replay the rest.
    /// For crash tests on a simulated disk, whose `crash` then decides what the log keeps.
    pub fn crash_on_close(&self) {
        self.crash_on_close.store(true, Ordering::Release);
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        let _ = self.close();
    }
}
