//! The log: one writer thread owns the active segment and commits appends in groups.
//!
//! Appenders queue requests ([`Log::submit`], [`Log::append`]). The writer takes everything
//! queued, gives the records consecutive offsets, writes them with one positional write per
//! segment touched, makes them durable with one fdatasync (per [`FsyncPolicy`]), applies them
//! to the index in one atomic batch, publishes the new durable end, and only then completes
//! every request. A write or fsync error poisons the log: every waiter gets the error and
//! every later append gets [`Error::Poisoned`] (fail-stop; no fsync is ever retried).
//!
//! **Invariant:** offsets below [`Log::durable_end`] are durable under the policy, indexed,
//! and readable; nothing above it is visible to readers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::index::{Index, Location};
use crate::io::{DirLock, Disk, DiskFile, FileDisk};
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
                let d = s.strip_prefix("interval:").ok_or_else(|| {
                    format!("fsync policy `{s}` is not one of always, never, interval:<duration>")
                })?;
                let (num, unit) =
                    d.split_at(d.find(|c: char| !c.is_ascii_digit()).unwrap_or(d.len()));
                let n: u64 = num
                    .parse()
                    .map_err(|_| format!("`{d}` is not a duration like 250ms or 1s"))?;
                let ms = match unit {
                    "ms" => n,
                    "s" => n * 1000,
                    "m" => n * 60_000,
                    _ => return Err(format!("`{d}` is not a duration like 250ms or 1s")),
                };
                Ok(Self::Interval(Duration::from_millis(ms)))
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
    /// Under `fsync=always`, how long the syncer may wait for batches the writer is still
    /// writing, so that one fsync covers them too (like PostgreSQL's `commit_delay`). It waits
    /// only while the writer is busy: a lone append is never delayed. Zero disables it.
    pub commit_delay: Duration,
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
            commit_delay: Duration::from_micros(200),
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
}

/// One segment's description, for stats and tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// First offset.
    pub base: Offset,
    /// File path.
    pub path: PathBuf,
    /// Length in bytes.
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
struct Counters {
    records: AtomicU64,
    commits: AtomicU64,
    fsyncs: AtomicU64,
    bytes_written: AtomicU64,
}

/// Whole segments to delete (SPEC §4 `retention.*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Keep the log's total size under this, deleting only segments with nothing pending.
    pub max_bytes: Option<u64>,
    /// Delete segments whose newest record is older than this, pending or not.
    pub max_age_ms: Option<u64>,
}

type Callback = Box<dyn FnOnce(Result<Appended>) + Send>;
type Listener = Arc<dyn Fn(Offset) + Send + Sync>;

struct Request {
    timestamp_ms: u64,
    records: Vec<Record>,
    done: Callback,
}

#[derive(Default)]
struct Queue {
    requests: Vec<Request>,
    closed: bool,
}

/// State shared by the writer thread, appenders and readers.
pub(crate) struct Shared {
    /// The data directory.
    dir: PathBuf,
    /// `<dir>/log`.
    log_dir: PathBuf,
    disk: Arc<dyn Disk>,
    options: LogOptions,
    /// The derived index; written only by the writer thread (and recovery before it starts).
    index: Index,
    /// Appends waiting for the writer; `wake_writer` is notified on every push and on close.
    queue: Mutex<Queue>,
    wake_writer: Condvar,
    /// Every segment by base offset; the last one is the active segment.
    segments: RwLock<BTreeMap<Offset, Arc<Segment>>>,
    /// Next offset to be made visible: every offset below is durable and indexed.
    durable_end: Mutex<Offset>,
    durable_advanced: Condvar,
    /// Where the records not yet in the index are, by first offset: the writer adds a run
    /// before publishing it, the indexer removes it after sled has it, so a reader always
    /// finds a durable record in one of the two.
    recent: RwLock<BTreeMap<Offset, PositionRun>>,
    /// Next offset to be applied to the index; lags `durable_end` by the batches in flight.
    indexed_end: Mutex<Offset>,
    indexed_advanced: Condvar,
    /// Called with the new durable end after every commit.
    listeners: Mutex<Vec<Listener>>,
    /// Set after any failed write or fsync; never cleared.
    poisoned: AtomicBool,
    /// Serializes retention passes.
    retention: Mutex<()>,
    /// Set when the log closes; `checkpoint_due` wakes the checkpointer early (close, or a
    /// large backlog of index changes).
    closing: Mutex<bool>,
    checkpoint_due: Condvar,
    /// What the writer has done.
    counters: Counters,
    /// Whether requests are queued or being written behind the batch the syncer holds: its
    /// sign that more batches are on their way. Set by `submit`, cleared by the writer when it
    /// hands over a batch with nothing queued behind it; both under the queue lock.
    writer_busy: AtomicBool,
}

/// The message log. See the module documentation.
pub struct Log {
    shared: Arc<Shared>,
    /// The background threads; `None` once closed.
    threads: Mutex<Option<Threads>>,
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
fn monotonic_now() -> Instant {
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
        let index_dir = options
            .index_dir
            .clone()
            .unwrap_or_else(|| dir.join("index"));
        let index = Index::open(&index_dir, options.index_cache_bytes)?;
        let recovered = recovery::recover(disk.as_ref(), &log_dir, &index, options.verify_sealed)?;
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
            writer_busy: AtomicBool::new(false),
        });
        let writer = Writer::new(shared.clone(), end, recovered.active_len)?;
        let threads = Threads::spawn(&shared, writer)?;
        let log = Self {
            shared,
            threads: Mutex::new(Some(threads)),
            _lock: lock,
        };
        Ok((log, recovered.report))
    }

    /// Queues `records` for appending with the given wall-clock timestamp; `done` is called
    /// from the writer thread once they are durable (or failed). All or none are appended.
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
        self.shared.writer_busy.store(true, Ordering::Release);
        queue.requests.push(Request {
            timestamp_ms,
            records,
            done: Box::new(done),
        });
        drop(queue);
        self.shared.wake_writer.notify_one();
    }

    /// Appends `records` and blocks until they are durable under the fsync policy.
    pub fn append(&self, timestamp_ms: u64, records: Vec<Record>) -> Result<Appended> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(timestamp_ms, records, move |result| {
            let _ = tx.send(result);
        });
        rx.recv().unwrap_or(Err(Error::Closed))
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

    /// The derived index (read access; the writer thread is its only writer).
    ///
    /// The index is updated by a thread of its own, just behind the durable end; this waits
    /// until it reflects every append completed before the call (read-your-writes).
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
                bytes: s.file.len().unwrap_or(0),
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
        let live = self.index().min_live_offset()?;
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
            let oversize = retention.max_bytes.is_some_and(|max| total > max)
                && live.is_none_or(|live| live >= next.base);
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
        self.shared.index.checkpoint()?;
        Ok(())
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// A run of consecutive records in one segment, as the index records it.
#[derive(Debug, Clone)]
pub(crate) struct PositionRun {
    pub(crate) segment: Offset,
    pub(crate) first: Offset,
    /// Each record's byte position, then the end of the last.
    pub(crate) positions: Vec<u32>,
}

impl PositionRun {
    /// Where `offset` is, if this run holds it.
    fn location(&self, offset: Offset) -> Option<Location> {
        let i = usize::try_from(offset.0.checked_sub(self.first.0)?).ok()?;
        let position = u64::from(*self.positions.get(i)?);
        let end = u64::from(*self.positions.get(i + 1)?);
        Some(Location {
            segment: self.segment,
            position,
            len: end - position,
        })
    }
}

/// Committed records on their way into the index.
struct IndexJob {
    frames: Vec<Frame>,
    runs: Vec<PositionRun>,
    end: Offset,
}

/// The indexer thread: applies committed batches to sled in log order, then drops their
/// runs from `recent`. A failure poisons the log like a failed write.
fn run_indexer(shared: &Shared, jobs: &mpsc::Receiver<IndexJob>) {
    for job in jobs {
        if shared.poisoned.load(Ordering::Acquire) {
            continue;
        }
        if let Err(error) = shared.index.apply(&job.frames, &job.runs) {
            shared.poisoned.store(true, Ordering::Release);
            tracing::error!(%error, "index update failed; refusing all further writes (fail-stop)");
            shared.indexed_advanced.notify_all();
            continue;
        }
        {
            let mut recent = shared.recent.write().expect("recent lock");
            for run in &job.runs {
                recent.remove(&run.first);
            }
        }
        *shared.indexed_end.lock().expect("indexed lock") = job.end;
        shared.indexed_advanced.notify_all();
        if shared.index.pending_changes() > CHECKPOINT_CHANGES {
            shared.checkpoint_due.notify_all();
        }
    }
}

/// Index changes that trigger a checkpoint before the interval is up, bounding the memory
/// the unwritten changes take.
const CHECKPOINT_CHANGES: usize = 256 * 1024;

/// The checkpointer thread: writes the index's in-memory changes to sled every
/// `checkpoint_interval`, or sooner when they pile up. A failure poisons the log.
fn run_checkpointer(shared: &Shared) {
    let interval = shared.options.checkpoint_interval;
    let mut closing = shared.closing.lock().expect("closing lock");
    loop {
        closing = shared
            .checkpoint_due
            .wait_timeout(closing, interval)
            .expect("closing lock")
            .0;
        if *closing {
            return;
        }
        drop(closing);
        if shared.index.pending_changes() > 0 && !shared.poisoned.load(Ordering::Acquire) {
            if let Err(error) = shared.index.checkpoint() {
                shared.poisoned.store(true, Ordering::Release);
                tracing::error!(%error, "index checkpoint failed; refusing all further writes (fail-stop)");
            }
        }
        closing = shared.closing.lock().expect("closing lock");
    }
}

/// The log's background threads, in pipeline order.
struct Threads {
    writer: JoinHandle<()>,
    syncer: Option<JoinHandle<()>>,
    completer: JoinHandle<()>,
    indexer: JoinHandle<()>,
    checkpointer: JoinHandle<()>,
}

impl Threads {
    fn spawn(shared: &Arc<Shared>, mut writer: Writer) -> Result<Self> {
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(format!("courier-log-{name}"))
                .spawn(f)
                .map_err(|e| Error::io("spawn thread", &shared.dir, e))
        };
        // Bounded: a writer that outruns the indexer by this many batches waits for it.
        let (to_indexer, jobs) = mpsc::sync_channel(64);
        let (to_completer, completions) = mpsc::channel();
        let outlet = Outlet {
            shared: shared.clone(),
            to_completer,
            to_indexer,
        };
        writer.outlet = Some(outlet.clone());
        let syncer = match shared.options.fsync {
            FsyncPolicy::Always => {
                // Bounded: a writer this far ahead of the disk waits for it.
                let (to_syncer, items) = mpsc::sync_channel(64);
                writer.to_syncer = Some(to_syncer);
                Some(spawn(
                    "syncer",
                    Box::new(move || run_syncer(&outlet, &items)),
                )?)
            }
            FsyncPolicy::Interval(_) | FsyncPolicy::Never => None,
        };
        let (s1, s2, s3) = (shared.clone(), shared.clone(), shared.clone());
        Ok(Self {
            syncer,
            completer: spawn(
                "completer",
                Box::new(move || run_completer(&s1, &completions)),
            )?,
            indexer: spawn("indexer", Box::new(move || run_indexer(&s2, &jobs)))?,
            checkpointer: spawn("checkpointer", Box::new(move || run_checkpointer(&s3)))?,
            writer: spawn("writer", Box::new(move || writer.run()))?,
        })
    }

    /// Joins in pipeline order: the writer finishes the queue; its exit closes the syncer's
    /// channel, and theirs close the completer's and indexer's, which drain and stop; then
    /// the checkpointer.
    fn join(self, shared: &Shared) {
        let _ = self.writer.join();
        if let Some(syncer) = self.syncer {
            let _ = syncer.join();
        }
        let _ = self.completer.join();
        let _ = self.indexer.join();
        *shared.closing.lock().expect("closing lock") = true;
        shared.checkpoint_due.notify_all();
        let _ = self.checkpointer.join();
    }
}

/// Marks the log poisoned (fail-stop) and logs the first cause.
fn poison(shared: &Shared, error: &Error) {
    if !shared.poisoned.swap(true, Ordering::AcqRel) {
        tracing::error!(%error, "log write failed; refusing all further writes (fail-stop)");
    }
}

/// A batch written to its segment, waiting to be made durable and announced.
struct Written {
    /// The segment its last record is in (earlier segments were sealed by a roll).
    segment: Arc<Segment>,
    end: Offset,
    accepted: Vec<Accepted>,
    frames: Vec<Frame>,
    runs: Vec<PositionRun>,
}

/// What the writer hands the syncer, in order.
enum ToSyncer {
    /// Make this batch durable, then announce it.
    Batch(Written),
    /// Sync this segment, which a roll is sealing, and answer before the next one exists.
    Seal(Arc<Segment>, mpsc::SyncSender<Result<()>>),
}

/// Where durable (or failed) batches go: the completer and the indexer.
#[derive(Clone)]
struct Outlet {
    shared: Arc<Shared>,
    to_completer: mpsc::Sender<Completion>,
    to_indexer: mpsc::SyncSender<IndexJob>,
}

impl Outlet {
    /// Makes durable batches visible (positions, then the durable end), completes their
    /// appends and queues them for the index.
    fn publish(&self, batches: Vec<Written>) {
        let Some(end) = batches.last().map(|b| b.end) else {
            return;
        };
        {
            let mut recent = self.shared.recent.write().expect("recent lock");
            for run in batches.iter().flat_map(|b| &b.runs) {
                recent.insert(run.first, run.clone());
            }
        }
        let counters = &self.shared.counters;
        let records: usize = batches.iter().map(|b| b.frames.len()).sum();
        counters
            .commits
            .fetch_add(batches.len() as u64, Ordering::Relaxed);
        counters
            .records
            .fetch_add(records as u64, Ordering::Relaxed);
        *self.shared.durable_end.lock().expect("durable lock") = end;
        self.shared.durable_advanced.notify_all();
        let mut done = Vec::new();
        let mut jobs = Vec::with_capacity(batches.len());
        for batch in batches {
            done.extend(batch.accepted.into_iter().map(|a| {
                let appended = Appended {
                    first: a.first,
                    count: a.count,
                };
                (a.done, Ok(appended))
            }));
            jobs.push(IndexJob {
                frames: batch.frames,
                runs: batch.runs,
                end: batch.end,
            });
        }
        self.complete(Some(end), done);
        for job in jobs {
            if self.to_indexer.send(job).is_err() {
                poison(&self.shared, &Error::Closed);
            }
        }
    }

    /// Poisons the log and fails every append in `accepted` with `error`.
    fn fail(&self, accepted: Vec<Accepted>, error: &Error) {
        poison(&self.shared, error);
        let (kind, text) = match error {
            Error::Io { source, .. } => (Some(source.kind()), error.to_string()),
            _ => (None, error.to_string()),
        };
        let done = accepted
            .into_iter()
            .map(|a| {
                let e = match kind {
                    Some(kind) => Error::Io {
                        op: "append",
                        path: self.shared.log_dir.clone(),
                        source: std::io::Error::new(kind, text.clone()),
                    },
                    None => Error::Poisoned,
                };
                (a.done, Err(e))
            })
            .collect();
        self.complete(None, done);
    }

    /// Hands finished appends to the completer thread (or completes them here if it is gone).
    fn complete(&self, end: Option<Offset>, done: Vec<(Callback, Result<Appended>)>) {
        let completion = Completion { end, done };
        if let Err(mpsc::SendError(completion)) = self.to_completer.send(completion) {
            for (done, result) in completion.done {
                done(result);
            }
        }
    }

    /// fdatasyncs `segment`; a failure poisons the log (it is never retried).
    fn sync(&self, segment: &Segment) -> Result<()> {
        let synced = segment.file.sync_data();
        let synced = synced.map_err(|e| Error::io("fdatasync segment", &segment.path, e));
        match &synced {
            Ok(()) => {
                self.shared.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => poison(&self.shared, error),
        }
        synced
    }

    /// One fdatasync for every batch queued meanwhile (all in the last one's segment), then
    /// publishes them.
    fn sync_and_publish(&self, batches: Vec<Written>) {
        let Some(segment) = batches.last().map(|b| b.segment.clone()) else {
            return;
        };
        let accepted = |batches: Vec<Written>| -> Vec<Accepted> {
            batches.into_iter().flat_map(|b| b.accepted).collect()
        };
        if self.shared.poisoned.load(Ordering::Acquire) {
            return self.fail(accepted(batches), &Error::Poisoned);
        }
        match self.sync(&segment) {
            Ok(()) => self.publish(batches),
            Err(error) => self.fail(accepted(batches), &error),
        }
    }
}

/// The syncer thread (fsync=always): the only thread that fsyncs segments while the log is
/// open, so a failed fsync is seen by exactly one caller. It takes every batch the writer has
/// written meanwhile and makes them durable with one fdatasync, while the writer goes on
/// writing the next ones.
fn run_syncer(outlet: &Outlet, items: &mpsc::Receiver<ToSyncer>) {
    while let Ok(first) = items.recv() {
        let mut pending = vec![first];
        pending.extend(items.try_iter());
        wait_for_more(&outlet.shared, items, &mut pending);
        let mut batches = Vec::new();
        for item in pending {
            match item {
                ToSyncer::Batch(batch) => batches.push(batch),
                ToSyncer::Seal(segment, reply) => {
                    outlet.sync_and_publish(std::mem::take(&mut batches));
                    let sealed = if outlet.shared.poisoned.load(Ordering::Acquire) {
                        Err(Error::Poisoned)
                    } else {
                        outlet.sync(&segment)
                    };
                    let _ = reply.send(sealed);
                }
            }
        }
        outlet.sync_and_publish(batches);
    }
}

/// The commit delay: while the writer is still busy writing what was submitted meanwhile,
/// waits up to `commit_delay` for its batches, so that one fsync covers them too. A seal ends
/// the wait at once (the writer is blocked on it).
fn wait_for_more(shared: &Shared, items: &mpsc::Receiver<ToSyncer>, pending: &mut Vec<ToSyncer>) {
    let sealing = |pending: &[ToSyncer]| pending.iter().any(|i| matches!(i, ToSyncer::Seal(..)));
    let delay = shared.options.commit_delay;
    if delay.is_zero() || sealing(pending) {
        return;
    }
    let deadline = monotonic_now() + delay;
    while shared.writer_busy.load(Ordering::Acquire) {
        let left = deadline.saturating_duration_since(monotonic_now());
        match items.recv_timeout(left) {
            Ok(item) => {
                pending.push(item);
                pending.extend(items.try_iter());
                if sealing(pending) {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// Appends whose outcome is known, with the durable end to announce if they succeeded.
struct Completion {
    end: Option<Offset>,
    done: Vec<(Callback, Result<Appended>)>,
}

/// The completer thread: tells listeners and appenders, in commit order, so that the writer
/// can start the next write and fsync while the previous batch's waiters are woken.
fn run_completer(shared: &Shared, completions: &mpsc::Receiver<Completion>) {
    for completion in completions {
        if let Some(end) = completion.end {
            let listeners = shared.listeners.lock().expect("listeners lock").clone();
            for listener in listeners {
                listener(end);
            }
        }
        for (done, result) in completion.done {
            done(result);
        }
    }
}

/// The writer thread's own state.
struct Writer {
    shared: Arc<Shared>,
    active: Arc<Segment>,
    active_len: u64,
    next_offset: Offset,
    unsynced: bool,
    last_sync: Instant,
    scratch: Vec<u8>,
    buf: Vec<u8>,
    /// Set by [`Threads::spawn`]; dropped with the writer, which closes the channels.
    outlet: Option<Outlet>,
    /// The syncer's queue under fsync=always.
    to_syncer: Option<mpsc::SyncSender<ToSyncer>>,
}

struct Accepted {
    first: Offset,
    count: u64,
    done: Callback,
}

impl Writer {
    fn new(shared: Arc<Shared>, next_offset: Offset, active_len: u64) -> Result<Self> {
        let active = {
            let segments = shared.segments.read().expect("segments lock");
            segments
                .values()
                .next_back()
                .cloned()
                .ok_or_else(|| Error::Layout {
                    path: shared.log_dir.clone(),
                    why: "no active segment after recovery".into(),
                })?
        };
        Ok(Self {
            shared,
            active,
            active_len,
            next_offset,
            unsynced: false,
            last_sync: monotonic_now(),
            scratch: Vec::new(),
            buf: Vec::new(),
            outlet: None,
            to_syncer: None,
        })
    }

    fn run(mut self) {
        loop {
            let requests = {
                let mut queue = self.shared.queue.lock().expect("queue lock");
                loop {
                    if !queue.requests.is_empty() {
                        break std::mem::take(&mut queue.requests);
                    }
                    if queue.closed {
                        drop(queue);
                        let writer_syncs = self.to_syncer.is_none();
                        if writer_syncs
                            && self.unsynced
                            && !self.shared.poisoned.load(Ordering::Acquire)
                        {
                            let _ = self.sync().map_err(|e| poison(&self.shared, &e));
                        }
                        return;
                    }
                    let due = match self.shared.options.fsync {
                        FsyncPolicy::Interval(every) if self.unsynced => {
                            Some(every.saturating_sub(self.last_sync.elapsed()))
                        }
                        _ => None,
                    };
                    match due {
                        Some(wait) if wait.is_zero() => break Vec::new(),
                        Some(wait) => {
                            queue = self
                                .shared
                                .wake_writer
                                .wait_timeout(queue, wait)
                                .expect("queue lock")
                                .0
                        }
                        None => queue = self.shared.wake_writer.wait(queue).expect("queue lock"),
                    }
                }
            };
            if requests.is_empty() {
                if let Err(e) = self.sync() {
                    poison(&self.shared, &e);
                }
                continue;
            }
            self.commit(requests);
        }
    }

    fn sync(&mut self) -> Result<()> {
        self.active
            .file
            .sync_data()
            .map_err(|e| Error::io("fdatasync segment", &self.active.path, e))?;
        self.unsynced = false;
        self.last_sync = monotonic_now();
        self.shared.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn commit(&mut self, requests: Vec<Request>) {
        let outlet = self.outlet.clone().expect("spawned with an outlet");
        if self.shared.poisoned.load(Ordering::Acquire) {
            for request in requests {
                (request.done)(Err(Error::Poisoned));
            }
            return;
        }
        let mut accepted = Vec::with_capacity(requests.len());
        let mut frames = Vec::new();
        let mut runs = Vec::new();
        let result = self.write(requests, &mut accepted, &mut frames, &mut runs);
        // Under fsync=always the syncer makes the batch durable; otherwise it is done here.
        let result = match self.to_syncer {
            Some(_) => result,
            None => result.and_then(|()| self.make_durable()),
        };
        if let Err(error) = result {
            return outlet.fail(accepted, &error);
        }
        let batch = Written {
            segment: self.active.clone(),
            end: self.next_offset,
            accepted,
            frames,
            runs,
        };
        match &self.to_syncer {
            Some(tx) => {
                {
                    // Nothing queued behind this batch: the syncer need not wait for more.
                    let queue = self.shared.queue.lock().expect("queue lock");
                    let more = !queue.requests.is_empty();
                    self.shared.writer_busy.store(more, Ordering::Release);
                }
                if let Err(mpsc::SendError(ToSyncer::Batch(batch))) =
                    tx.send(ToSyncer::Batch(batch))
                {
                    outlet.fail(batch.accepted, &Error::Closed);
                }
            }
            None => outlet.publish(vec![batch]),
        }
    }

    fn make_durable(&mut self) -> Result<()> {
        match self.shared.options.fsync {
            FsyncPolicy::Always => self.sync(),
            FsyncPolicy::Interval(every) if self.last_sync.elapsed() >= every => self.sync(),
            FsyncPolicy::Interval(_) | FsyncPolicy::Never => Ok(()),
        }
    }

    /// Encodes and writes every acceptable request, rolling segments as needed. On an I/O
    /// error every request not yet failed ends up in `accepted`, which the caller fails.
    fn write(
        &mut self,
        requests: Vec<Request>,
        accepted: &mut Vec<Accepted>,
        frames: &mut Vec<Frame>,
        runs: &mut Vec<PositionRun>,
    ) -> Result<()> {
        let mut run: Option<PositionRun> = None;
        let mut requests = requests.into_iter();
        while let Some(request) = requests.next() {
            let lens = match self.encode(&request) {
                Ok(lens) => lens,
                Err(error) => {
                    (request.done)(Err(error));
                    continue;
                }
            };
            let first = self.next_offset;
            if let Err(error) = self.place(&lens, &mut run, runs) {
                let failed = std::iter::once(request).chain(requests);
                accepted.extend(failed.map(|r| Accepted {
                    first,
                    count: 0,
                    done: r.done,
                }));
                return Err(error);
            }
            let count = self.next_offset.0 - first.0;
            for (i, record) in request.records.into_iter().enumerate() {
                let offset = Offset(first.0 + i as u64);
                frames.push(Frame {
                    offset,
                    timestamp_ms: request.timestamp_ms,
                    record,
                });
            }
            accepted.push(Accepted {
                first,
                count,
                done: request.done,
            });
        }
        self.flush_buf()?;
        self.finish_run(run, runs);
        Ok(())
    }

    /// Encodes a whole request into `scratch` at the next offsets and returns the frame
    /// lengths, so that a record over the limit fails the request before anything is written.
    fn encode(&mut self, request: &Request) -> Result<Vec<usize>> {
        let max = self.shared.options.max_record_bytes;
        self.scratch.clear();
        let mut lens = Vec::with_capacity(request.records.len());
        for (i, record) in request.records.iter().enumerate() {
            let offset = Offset(self.next_offset.0 + i as u64);
            let size_bytes =
                match record::encode(offset, request.timestamp_ms, record, &mut self.scratch) {
                    Ok(n) if n as u64 <= max => {
                        lens.push(n);
                        continue;
                    }
                    Ok(n) => n as u64,
                    Err(n) => n,
                };
            return Err(Error::TooLarge {
                size_bytes,
                max_bytes: max,
            });
        }
        Ok(lens)
    }

    /// Moves the frames encoded in `scratch` into the write buffer, rolling the segment first
    /// where a frame would not fit.
    fn place(
        &mut self,
        lens: &[usize],
        run: &mut Option<PositionRun>,
        runs: &mut Vec<PositionRun>,
    ) -> Result<()> {
        let mut at = 0usize;
        for &len in lens {
            let end_now = self.active_len + self.buf.len() as u64;
            if end_now > 0 && end_now + len as u64 > self.shared.options.segment_bytes {
                self.flush_buf()?;
                self.finish_run(run.take(), runs);
                self.roll()?;
            }
            let position = self.active_len + self.buf.len() as u64;
            let run = run.get_or_insert_with(|| PositionRun {
                segment: self.active.base,
                first: self.next_offset,
                positions: Vec::new(),
            });
            run.positions
                .push(u32::try_from(position).expect("segments stay below 4 GiB"));
            let frame = self.scratch.get(at..at + len).expect("encoded above");
            self.buf.extend_from_slice(frame);
            at += len;
            self.next_offset = Offset(self.next_offset.0 + 1);
        }
        Ok(())
    }

    /// Closes a run at the end of what was written to the active segment.
    fn finish_run(&self, run: Option<PositionRun>, runs: &mut Vec<PositionRun>) {
        if let Some(mut run) = run {
            run.positions
                .push(u32::try_from(self.active_len).expect("segments stay below 4 GiB"));
            runs.push(run);
        }
    }

    fn flush_buf(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.active
            .file
            .write_at(&self.buf, self.active_len)
            .map_err(|e| Error::io("write segment", &self.active.path, e))?;
        self.active_len += self.buf.len() as u64;
        let written = self.buf.len() as u64;
        self.shared
            .counters
            .bytes_written
            .fetch_add(written, Ordering::Relaxed);
        self.buf.clear();
        self.unsynced = true;
        Ok(())
    }

    /// Seals the active segment (synced whatever the policy, so that a torn tail can only ever
    /// be in the newest segment) and makes a new one durable before anything is written to it.
    fn roll(&mut self) -> Result<()> {
        match &self.to_syncer {
            Some(tx) => {
                let (reply, sealed) = mpsc::sync_channel(1);
                tx.send(ToSyncer::Seal(self.active.clone(), reply))
                    .map_err(|_| Error::Closed)?;
                sealed.recv().unwrap_or(Err(Error::Closed))?;
            }
            None => self.sync()?,
        }
        let base = self.next_offset;
        let path = self.shared.log_dir.join(crate::segment::file_name(base));
        let disk = &self.shared.disk;
        let file = disk
            .create(&path)
            .map_err(|e| Error::io("create segment", &path, e))?;
        file.sync_data()
            .map_err(|e| Error::io("fsync new segment", &path, e))?;
        disk.sync_dir(&self.shared.log_dir)
            .map_err(|e| Error::io("sync directory", &self.shared.log_dir, e))?;
        tracing::info!(segment = %path.display(), base = base.0, "rolled to a new segment");
        let segment = Arc::new(Segment { base, path, file });
        self.shared
            .segments
            .write()
            .expect("segments lock")
            .insert(base, segment.clone());
        self.active = segment;
        self.active_len = 0;
        Ok(())
    }
}
