//! The log's public face: open (with recovery), append, read by offset, the durable end and
//! its notifications, retention, checkpoints, close. The work of committing appends is done by
//! the threads of [`crate::pipeline`].
//!
//! A write, fsync or index failure poisons the log: every waiter gets the error and every
//! later append gets [`Error::Poisoned`] (fail-stop; no fsync is ever retried).
//!
//! **Invariant:** offsets below [`Log::durable_end`] are durable under the policy and readable
//! (their positions are in `recent` or in the index); nothing above it is visible to readers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::index::{Index, Location};
use crate::io::{DirLock, Disk, DiskFile, FileDisk};
use crate::pipeline::{PositionRun, Threads, Writer};
use crate::record::{self, Decoded, Frame, Record};
use crate::recovery::{self, RecoveryReport};
use crate::Offset;

/// When appended records are made durable (SPEC §4 `fsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// fdatasync before any append completes (group commit shares one fsync between all the
    /// appends of a batch).
    Always,
    /// Appends complete after the write; the writer fdatasyncs at most this long after.
    Interval(Duration),
    /// Appends complete after the write; the OS decides when bytes reach the disk (segments
    /// are still synced when sealed and when the log closes).
    Never,
}

impl std::str::FromStr for FsyncPolicy {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "always" => Ok(Self::Always),
            "never" => Ok(Self::Never),
            _ => {
                let interval = s.strip_prefix("interval:").ok_or_else(|| {
                    format!("fsync policy `{s}` is not one of always, never, interval:<duration>")
                })?;
                let every = crate::duration::parse(interval).map_err(|e| e.to_string())?;
                Ok(Self::Interval(every))
            }
        }
    }
}

/// Everything [`Log::open`] needs besides the directory.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// The file system; [`FileDisk`] unless simulating.
    pub disk: Arc<dyn Disk>,
    /// When appends are made durable.
    pub fsync: FsyncPolicy,
    /// Roll to a new segment once the active one would grow past this.
    pub segment_bytes: u64,
    /// Largest accepted record frame.
    pub max_record_bytes: u64,
    /// sled's page cache (its default of 1 GiB is far more than the index needs).
    pub index_cache_bytes: u64,
    /// Where the sled index lives; `<dir>/index` by default.
    pub index_dir: Option<PathBuf>,
    /// Check the CRC of every record of the segments the index checkpoint covers when opening
    /// (no decoding: about as fast as reading the files), so that damage anywhere refuses the
    /// open. Off, opening reads only the log after the checkpoint, whatever the log's size, and
    /// older records are checked when read and by `verify`.
    pub verify_sealed: bool,
    /// How often index changes are written to sled (a checkpoint). Recovery replays at most
    /// about this much of the log; changes that cancel out in between never reach sled.
    pub checkpoint_interval: Duration,
    /// Zero-fill the next segment ahead of use, on a thread of its own (`log/.next.seg`, made
    /// the new segment by a rename at a roll). Appends then overwrite blocks that exist and
    /// pages that are cached, so an fdatasync writes no metadata and a write allocates
    /// nothing. Paused while less than four segments' worth of space is free (looked at again
    /// at every roll).
    pub preallocate: bool,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            disk: Arc::new(FileDisk),
            fsync: FsyncPolicy::Always,
            segment_bytes: 64 << 20,
            max_record_bytes: 16 << 20,
            index_cache_bytes: 64 << 20,
            index_dir: None,
            verify_sealed: true,
            checkpoint_interval: Duration::from_secs(1),
            preallocate: true,
        }
    }
}

/// The offsets given to one completed append: `first .. first + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Offset of the first record.
    pub first: Offset,
    /// Number of records.
    pub count: u64,
}

/// A segment as readers see it.
#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) base: Offset,
    pub(crate) path: PathBuf,
    pub(crate) file: Box<dyn DiskFile>,
    /// Bytes of records: the file's length, less the zero tail a preallocated active segment
    /// has. The writer advances it for the active segment.
    pub(crate) len: AtomicU64,
}

impl Segment {
    /// Creates the empty segment whose first offset is `base` and makes it durable: the file,
    /// then its entry in `log_dir` (a new file needs an fsync of its directory). Nothing may
    /// be written to it before this returns.
    pub(crate) fn create(disk: &dyn Disk, log_dir: &Path, base: Offset) -> Result<Self> {
        let path = log_dir.join(crate::segment::file_name(base));
        let file = disk
            .create(&path)
            .map_err(|e| Error::io("create segment", &path, e))?;
        file.sync_data()
            .map_err(|e| Error::io("fsync new segment", &path, e))?;
        crate::failpoint::crash("segment.created");
        disk.sync_dir(log_dir)
            .map_err(|e| Error::io("sync directory", log_dir, e))?;
        Ok(Self::new(base, path, file, 0))
    }

    /// Makes the prepared (zero-filled, synced) file `log_dir/.next.seg` the segment whose first
    /// offset is `base`: renamed, then the directory synced. Nothing may be written to it
    /// before this returns.
    pub(crate) fn adopt(
        disk: &dyn Disk,
        log_dir: &Path,
        base: Offset,
        file: Box<dyn DiskFile>,
    ) -> Result<Self> {
        let path = log_dir.join(crate::segment::file_name(base));
        disk.rename(&log_dir.join(crate::pipeline::PREPARED_NAME), &path)
            .map_err(|e| Error::io("rename prepared segment", &path, e))?;
        crate::failpoint::crash("segment.created");
        disk.sync_dir(log_dir)
            .map_err(|e| Error::io("sync directory", log_dir, e))?;
        Ok(Self::new(base, path, file, 0))
    }

    pub(crate) fn new(base: Offset, path: PathBuf, file: Box<dyn DiskFile>, len: u64) -> Self {
        Self {
            base,
            path,
            file,
            len: AtomicU64::new(len),
        }
    }
}

/// One segment's description, for stats and tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// First offset.
    pub base: Offset,
    /// File path.
    pub path: PathBuf,
    /// Bytes of records (a preallocated active segment's file is longer).
    pub bytes: u64,
}

/// Counters of the writer since the log was opened, for metrics and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Records made durable.
    pub records: u64,
    /// Group commits (batches written).
    pub commits: u64,
    /// fdatasync calls on segments.
    pub fsyncs: u64,
    /// Bytes written to segments.
    pub bytes_written: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) records: AtomicU64,
    pub(crate) commits: AtomicU64,
    pub(crate) fsyncs: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
}

/// Whole segments to delete (SPEC §4 `retention.*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Keep the log's total size under this, deleting only segments with nothing pending.
    pub max_bytes: Option<u64>,
    /// Delete segments whose newest record is older than this, pending or not.
    pub max_age_ms: Option<u64>,
}

pub(crate) type Callback = Box<dyn FnOnce(Result<Appended>) + Send>;
pub(crate) type Listener = Arc<dyn Fn(Offset) + Send + Sync>;

pub(crate) struct Request {
    pub(crate) timestamp_ms: u64,
    pub(crate) records: Vec<Record>,
    pub(crate) done: Callback,
}

#[derive(Default)]
pub(crate) struct Queue {
    pub(crate) requests: Vec<Request>,
    pub(crate) closed: bool,
    /// Whether the writer waits on `wake_writer`. While it writes or fsyncs, appends only
    /// queue up (the next group commit) and skip the futex wake.
    pub(crate) writer_waiting: bool,
}

/// State shared by the writer thread, appenders and readers.
pub(crate) struct Shared {
    /// The data directory.
    pub(crate) dir: PathBuf,
    /// `<dir>/log`.
    pub(crate) log_dir: PathBuf,
    pub(crate) disk: Arc<dyn Disk>,
    pub(crate) options: LogOptions,
    /// The derived index; written only by the writer thread (and recovery before it starts).
    pub(crate) index: Index,
    /// Appends waiting for the writer; `wake_writer` is notified on a push while the writer
    /// waits, and on close.
    pub(crate) queue: Mutex<Queue>,
    pub(crate) wake_writer: Condvar,
    /// Every segment by base offset; the last one is the active segment.
    pub(crate) segments: RwLock<BTreeMap<Offset, Arc<Segment>>>,
    /// Next offset to be made visible: every offset below is durable and indexed.
    pub(crate) durable_end: Mutex<Offset>,
    pub(crate) durable_advanced: Condvar,
    /// Where the records not yet in the index are, by first offset: the writer adds a run
    /// before publishing it, the indexer removes it after sled has it, so a reader always
    /// finds a durable record in one of the two.
    pub(crate) recent: RwLock<BTreeMap<Offset, PositionRun>>,
    /// Next offset to be applied to the index; lags `durable_end` by the batches in flight.
    pub(crate) indexed_end: Mutex<Offset>,
    pub(crate) indexed_advanced: Condvar,
    /// Called with the new durable end after every commit.
    pub(crate) listeners: Mutex<Vec<Listener>>,
    /// Set after any failed write or fsync; never cleared.
    pub(crate) poisoned: AtomicBool,
    /// Serializes retention passes.
    pub(crate) retention: Mutex<()>,
    /// Set when the log closes; `checkpoint_due` wakes the checkpointer early (close, or a
    /// large backlog of index changes).
    pub(crate) closing: Mutex<bool>,
    pub(crate) checkpoint_due: Condvar,
    /// What the writer has done.
    pub(crate) counters: Counters,
    /// The next segment file, zero-filled ahead of use; `prepared_taken` wakes the
    /// preallocator when the writer took it, and on close.
    pub(crate) prepared: Mutex<Prepared>,
    pub(crate) prepared_taken: Condvar,
    /// Blocking appends ([`Log::append`]) wait on `unblocked` for their result, and the writer
    /// wakes them all with one notify after each commit while `blocking_waiters` is not zero.
    /// One wake per append would cost the writer a syscall each, and each woken appender may
    /// preempt it.
    pub(crate) blocking: Mutex<()>,
    pub(crate) unblocked: Condvar,
    pub(crate) blocking_waiters: AtomicUsize,
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
        *self.slot.lock().expect("append slot lock") = Some(result);
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
        drop(
            self.shared
                .blocking
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        self.shared.unblocked.notify_all();
    }
}

/// The preallocator's hand-over.
#[derive(Default)]
pub(crate) struct Prepared {
    pub(crate) file: Option<Box<dyn DiskFile>>,
    pub(crate) stop: bool,
    /// Segment rolls so far: a preallocator that found too little space waits for the next.
    pub(crate) rolls: u64,
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

#[expect(
    clippy::disallowed_methods,
    reason = "the fsync interval is measured on the monotonic clock"
)]
pub(crate) fn monotonic_now() -> Instant {
    Instant::now()
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
        let lock = recovery::lock_data_dir(disk.as_ref(), dir)?;
        crate::pipeline::remove_prepared(disk.as_ref(), &log_dir)?;
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
                let aside = set_aside(&index_dir)?;
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
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            log_dir,
            disk,
            options,
            index,
            queue: Mutex::new(Queue::default()),
            wake_writer: Condvar::new(),
            segments: RwLock::new(recovered.segments),
            durable_end: Mutex::new(end),
            durable_advanced: Condvar::new(),
            recent: RwLock::new(BTreeMap::new()),
            indexed_end: Mutex::new(end),
            indexed_advanced: Condvar::new(),
            listeners: Mutex::new(Vec::new()),
            poisoned: AtomicBool::new(false),
            retention: Mutex::new(()),
            closing: Mutex::new(false),
            checkpoint_due: Condvar::new(),
            counters: Counters::default(),
            prepared: Mutex::new(Prepared::default()),
            prepared_taken: Condvar::new(),
            blocking: Mutex::new(()),
            unblocked: Condvar::new(),
            blocking_waiters: AtomicUsize::new(0),
        });
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
    /// from the writer thread once they are durable (or failed). All or none are appended.
    /// `done` must be quick and must not block (above all not on this log): the next group
    /// commit waits for it.
    pub fn submit(
        &self,
        timestamp_ms: u64,
        records: Vec<Record>,
        done: impl FnOnce(Result<Appended>) + Send + 'static,
    ) {
        if self.shared.poisoned.load(Ordering::Acquire) {
            return done(Err(Error::Poisoned));
        }
        let mut queue = self.shared.queue.lock().expect("queue lock");
        if queue.closed {
            drop(queue);
            return done(Err(Error::Closed));
        }
        queue.requests.push(Request {
            timestamp_ms,
            records,
            done: Box::new(done),
        });
        let wake = queue.writer_waiting;
        drop(queue);
        if wake {
            self.shared.wake_writer.notify_one();
        }
    }

    /// Appends `records` and blocks until they are durable under the fsync policy.
    pub fn append(&self, timestamp_ms: u64, records: Vec<Record>) -> Result<Appended> {
        let shared = &self.shared;
        let slot: Arc<Mutex<Option<Result<Appended>>>> = Arc::default();
        shared.blocking_waiters.fetch_add(1, Ordering::SeqCst);
        let answer = Answer {
            slot: slot.clone(),
            shared: shared.clone(),
            answered: false,
        };
        self.submit(timestamp_ms, records, move |result| answer.set(result));
        // The writer fills the slot, then takes `blocking` before it notifies: a check made
        // under `blocking` either sees the result or waits in time for the notify.
        let mut blocking = shared.blocking.lock().expect("blocking lock");
        let result = loop {
            if let Some(result) = slot.lock().expect("append slot lock").take() {
                break result;
            }
            blocking = shared.unblocked.wait(blocking).expect("blocking lock");
        };
        shared.blocking_waiters.fetch_sub(1, Ordering::SeqCst);
        result
    }

    /// Reads the record at `offset` through the index (never a scan).
    pub fn read(&self, offset: Offset) -> Result<Frame> {
        if offset >= self.durable_end() {
            return Err(Error::NotFound(offset.0));
        }
        let recent = {
            let recent = self.shared.recent.read().expect("recent lock");
            recent
                .range(..=offset)
                .next_back()
                .and_then(|(_, run)| run.location(offset))
        };
        let location = match recent {
            Some(location) => location,
            None => self
                .shared
                .index
                .location(offset)?
                .ok_or(Error::NotFound(offset.0))?,
        };
        self.read_at(offset, location)
    }

    fn read_at(&self, offset: Offset, location: Location) -> Result<Frame> {
        let segment = {
            let segments = self.shared.segments.read().expect("segments lock");
            segments
                .get(&location.segment)
                .cloned()
                .ok_or(Error::NotFound(offset.0))?
        };
        let len = usize::try_from(location.len).map_err(|_| Error::NotFound(offset.0))?;
        let mut buf = vec![0u8; len];
        segment
            .file
            .read_at(&mut buf, location.position)
            .map_err(|e| Error::io("read segment", &segment.path, e))?;
        let corrupt = |reason| Error::Corrupt {
            segment: segment.path.clone(),
            position: location.position,
            reason,
        };
        match record::decode(&buf) {
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

    /// The offset after the last durable record: every offset below it can be read.
    pub fn durable_end(&self) -> Offset {
        *self.shared.durable_end.lock().expect("durable lock")
    }

    /// Blocks until the durable end passes `end` or `timeout` elapses; returns the durable end.
    pub fn wait_past(&self, end: Offset, timeout: Duration) -> Offset {
        let guard = self.shared.durable_end.lock().expect("durable lock");
        let (guard, _) = self
            .shared
            .durable_advanced
            .wait_timeout_while(guard, timeout, |current| *current <= end)
            .expect("durable lock");
        *guard
    }

    /// Registers `listener`, called from the writer thread with the new durable end after each
    /// commit (for example to wake async long-polls). It must not block.
    pub fn on_durable(&self, listener: impl Fn(Offset) + Send + Sync + 'static) {
        self.shared
            .listeners
            .lock()
            .expect("listeners lock")
            .push(Arc::new(listener));
    }

    /// The derived index (read access; the indexer thread is its only writer).
    ///
    /// The index is updated by a thread of its own, just behind the durable end; this waits
    /// until it reflects every append completed before the call (read-your-writes), or until
    /// the log is poisoned (then it may lag; every record stays readable through [`Log::read`]).
    pub fn index(&self) -> &Index {
        let target = self.durable_end();
        let indexed = self.shared.indexed_end.lock().expect("indexed lock");
        let _caught_up = self
            .shared
            .indexed_advanced
            .wait_while(indexed, |indexed| {
                *indexed < target && !self.shared.poisoned.load(Ordering::Acquire)
            })
            .expect("indexed lock");
        &self.shared.index
    }

    /// What the writer has done since the log was opened; `records / fsyncs` is the mean
    /// group-commit size.
    pub fn stats(&self) -> LogStats {
        let c = &self.shared.counters;
        LogStats {
            records: c.records.load(Ordering::Relaxed),
            commits: c.commits.load(Ordering::Relaxed),
            fsyncs: c.fsyncs.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
        }
    }

    /// Whether an earlier I/O failure stopped the log.
    pub fn is_poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::Acquire)
    }

    /// Makes the index durable up to what is applied (the checkpoint) and returns that offset.
    /// Recovery replays only the log after the last checkpoint. sled also checkpoints by itself
    /// every second.
    pub fn checkpoint(&self) -> Result<Option<Offset>> {
        self.index().checkpoint()
    }

    /// The segments, oldest first.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        let segments = self.shared.segments.read().expect("segments lock");
        segments
            .values()
            .map(|s| SegmentInfo {
                base: s.base,
                path: s.path.clone(),
                bytes: s.len.load(Ordering::Acquire),
            })
            .collect()
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
        let doomed: Vec<Arc<Segment>> = {
            let mut map = self.shared.segments.write().expect("segments lock");
            let keep = map.split_off(&below);
            std::mem::replace(&mut *map, keep).into_values().collect()
        };
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
        self.shared.queue.lock().expect("queue lock").closed = true;
        self.shared.wake_writer.notify_all();
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

/// Renames a damaged index directory to the first free `<name>.damaged-<n>` beside it and
/// makes the rename durable; returns the new path.
fn set_aside(index_dir: &Path) -> Result<PathBuf> {
    let parent = index_dir.parent().unwrap_or(Path::new("."));
    let name = index_dir
        .file_name()
        .map_or_else(|| "index".into(), |n| n.to_string_lossy().into_owned());
    let aside = (1..)
        .map(|n| parent.join(format!("{name}.damaged-{n}")))
        .find(|p| !p.exists())
        .unwrap_or_else(|| parent.join(format!("{name}.damaged")));
    std::fs::rename(index_dir, &aside).map_err(|e| Error::io("set aside index", index_dir, e))?;
    FileDisk
        .sync_dir(parent)
        .map_err(|e| Error::io("sync directory", parent, e))?;
    Ok(aside)
}

impl Drop for Log {
    fn drop(&mut self) {
        let _ = self.close();
    }
}
