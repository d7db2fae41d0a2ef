//! The state the log's threads share (appenders, the writer, the indexer, the checkpointer,
//! the preallocator and readers), one part per concern. Every part keeps its fields private:
//! it changes only through the methods that name what its owner does (the writer advances
//! the durable end, the indexer the indexed end, appenders queue requests, ...), so a reader
//! of this file sees every way each part can change.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use crate::dir::{Segment, SegmentInfo};
use crate::error::{Error, Result};
use crate::index::Index;
use crate::io::{Disk, DiskFile};
use crate::options::LogOptions;
use crate::position::{Location, PositionRun};
use crate::record::Record;
use crate::Offset;

/// The offsets given to one completed append: `first .. first + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Offset of the first record.
    pub first: Offset,
    /// Number of records.
    pub count: u64,
}

/// Called once with an append's outcome, on the writer thread.
pub(crate) type Callback = Box<dyn FnOnce(Result<Appended>) + Send>;
/// Called with the new durable end after every commit.
pub(crate) type Listener = Arc<dyn Fn(Offset) + Send + Sync>;

/// One append waiting for the writer.
pub(crate) struct Request {
    pub(crate) timestamp_ms: u64,
    pub(crate) records: Vec<Record>,
    pub(crate) done: Callback,
}

/// Everything the threads share. The configuration parts are fixed at open; every part that
/// changes is a type of this module with private fields.
pub(crate) struct Shared {
    /// The data directory.
    pub(crate) dir: PathBuf,
    /// `<dir>/log`.
    pub(crate) log_dir: PathBuf,
    pub(crate) disk: Arc<dyn Disk>,
    pub(crate) options: LogOptions,
    /// The derived index; written only by the indexer and checkpointer threads (and
    /// recovery before they start).
    pub(crate) index: Index,
    /// Appends waiting for the writer.
    pub(crate) intake: Intake,
    /// Every segment by base offset; the last one is the active segment.
    pub(crate) segments: Segments,
    /// Every offset below is durable and readable (the writer advances it).
    pub(crate) durable: Progress,
    /// Every offset below is applied to the index (the indexer advances it).
    pub(crate) indexed: Progress,
    /// Where the durable records not yet in the index are.
    pub(crate) recent: Recent,
    /// Called with the new durable end after every commit.
    pub(crate) listeners: Listeners,
    /// Set after any failed write, fsync, index update or panic; never cleared.
    poisoned: AtomicBool,
    /// Serializes retention passes.
    pub(crate) retention: Mutex<()>,
    /// Wakes the checkpointer early (close, or a large backlog of index changes).
    pub(crate) checkpoints: Checkpoints,
    /// What the writer has done.
    pub(crate) counters: Counters,
    /// The preallocated next segment, handed from the preallocator to the writer.
    pub(crate) handover: Handover,
    /// Where blocking appends ([`crate::Log::append`]) wait for their results.
    pub(crate) blocking: Blocking,
}

impl Shared {
    /// The shared state of a log just recovered, whose next offset is `end`.
    pub(crate) fn new(
        dir: PathBuf,
        options: LogOptions,
        index: Index,
        segments: BTreeMap<Offset, Arc<Segment>>,
        end: Offset,
    ) -> Self {
        Self {
            log_dir: dir.join("log"),
            dir,
            disk: options.disk.clone(),
            options,
            index,
            intake: Intake::default(),
            segments: Segments(RwLock::new(segments)),
            durable: Progress::at(end),
            indexed: Progress::at(end),
            recent: Recent::default(),
            listeners: Listeners::default(),
            poisoned: AtomicBool::new(false),
            retention: Mutex::new(()),
            checkpoints: Checkpoints::default(),
            counters: Counters::default(),
            handover: Handover::default(),
            blocking: Blocking::default(),
        }
    }

    /// Whether the log is poisoned (fail-stop).
    pub(crate) fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// Marks the log poisoned (fail-stop), logs the first cause, and wakes whoever waits for
    /// the durable end or the index, since neither will advance any more.
    pub(crate) fn poison(&self, error: &Error) {
        if !self.poisoned.swap(true, Ordering::AcqRel) {
            tracing::error!(%error, "the log failed; refusing all further writes (fail-stop)");
        }
        self.indexed.wake();
        self.durable.wake();
    }
}

/// Takes a lock even if a panicking thread held it: the state behind these locks stays
/// consistent through a panic (each change is one assignment), and a poisoned log must still
/// answer its waiters.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Appends waiting for the writer: queued by appenders, taken by the writer in batches.
#[derive(Default)]
pub(crate) struct Intake {
    queue: Mutex<Queue>,
    /// Notified on a push while the writer waits, and on close.
    wake_writer: Condvar,
}

#[derive(Default)]
struct Queue {
    requests: Vec<Request>,
    closed: bool,
    /// Whether the writer waits on `wake_writer`. While it writes or fsyncs, appends only
    /// queue up (the next group commit) and skip the futex wake.
    writer_waiting: bool,
}

impl Intake {
    /// Queues `request`; gives it back if the log is closed.
    pub(crate) fn push(&self, request: Request) -> std::result::Result<(), Request> {
        let mut queue = lock(&self.queue);
        if queue.closed {
            return Err(request);
        }
        queue.requests.push(request);
        let wake = queue.writer_waiting;
        drop(queue);
        if wake {
            self.wake_writer.notify_one();
        }
        Ok(())
    }

    /// No more appends: the writer finishes what is queued and stops.
    pub(crate) fn close(&self) {
        lock(&self.queue).closed = true;
        self.wake_writer.notify_all();
    }

    /// The writer waits for its next batch: every queued append, or none when `sync_due`
    /// (asked again after each wait) says an interval fsync is due now; `None` once the log
    /// is closed and the queue drained.
    pub(crate) fn next(&self, sync_due: impl Fn() -> Option<Duration>) -> Option<Vec<Request>> {
        let mut queue = lock(&self.queue);
        loop {
            if !queue.requests.is_empty() {
                return Some(std::mem::take(&mut queue.requests));
            }
            if queue.closed {
                return None;
            }
            let due = sync_due();
            queue.writer_waiting = true;
            queue = match due {
                Some(wait) if wait.is_zero() => {
                    queue.writer_waiting = false;
                    return Some(Vec::new());
                }
                Some(wait) => {
                    self.wake_writer
                        .wait_timeout(queue, wait)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => self
                    .wake_writer
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner),
            };
            queue.writer_waiting = false;
        }
    }

    /// After the writer failed for good (a panic): answers every queued append, and every
    /// one queued later, with `refuse`, until the log is closed.
    pub(crate) fn refuse_until_closed(&self, refuse: impl Fn(Request)) {
        let mut queue = lock(&self.queue);
        loop {
            let refused = std::mem::take(&mut queue.requests);
            if !refused.is_empty() {
                // Answered without the lock: a callback may append again (and be refused).
                drop(queue);
                refused.into_iter().for_each(&refuse);
                queue = lock(&self.queue);
                continue;
            }
            if queue.closed {
                return;
            }
            queue.writer_waiting = true;
            queue = self
                .wake_writer
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
            queue.writer_waiting = false;
        }
    }

    /// The appends queued meanwhile, if any (they join the batch being written).
    pub(crate) fn take_queued(&self) -> Option<Vec<Request>> {
        let mut queue = lock(&self.queue);
        (!queue.requests.is_empty()).then(|| std::mem::take(&mut queue.requests))
    }
}

/// How far the log has got in one respect (durable, or indexed): every offset below the end.
pub(crate) struct Progress {
    end: Mutex<Offset>,
    advanced: Condvar,
}

impl Progress {
    fn at(end: Offset) -> Self {
        Self {
            end: Mutex::new(end),
            advanced: Condvar::new(),
        }
    }

    /// The end now.
    pub(crate) fn get(&self) -> Offset {
        *lock(&self.end)
    }

    /// Moves the end to `end` and wakes the waiters (the one thread that owns this progress).
    pub(crate) fn advance(&self, end: Offset) {
        *lock(&self.end) = end;
        self.advanced.notify_all();
    }

    /// Blocks until the end passes `end` or `timeout` elapses; returns the end.
    pub(crate) fn wait_past(&self, end: Offset, timeout: Duration) -> Offset {
        let guard = lock(&self.end);
        let (guard, _) = self
            .advanced
            .wait_timeout_while(guard, timeout, |current| *current <= end)
            .unwrap_or_else(PoisonError::into_inner);
        *guard
    }

    /// Blocks until the end reaches `target`, or `give_up` says it never will.
    pub(crate) fn wait_for(&self, target: Offset, give_up: impl Fn() -> bool) {
        let guard = lock(&self.end);
        let _reached = self
            .advanced
            .wait_while(guard, |end| *end < target && !give_up())
            .unwrap_or_else(PoisonError::into_inner);
    }

    /// Wakes every waiter to look again (the log was poisoned). Taking the lock first: a
    /// waiter between its check and its wait is not missed.
    fn wake(&self) {
        drop(lock(&self.end));
        self.advanced.notify_all();
    }
}

/// Where the durable records not yet in the index are, by first offset: the writer adds a
/// run before it makes it durable-visible, the indexer removes it after the index has it, so
/// a reader always finds a durable record in one of the two.
#[derive(Default)]
pub(crate) struct Recent(RwLock<BTreeMap<Offset, PositionRun>>);

impl Recent {
    /// The writer: these runs are about to become visible.
    pub(crate) fn add(&self, runs: &[PositionRun]) {
        let mut recent = self.0.write().unwrap_or_else(PoisonError::into_inner);
        for run in runs {
            recent.insert(run.first, run.clone());
        }
    }

    /// The indexer: the index has these runs now.
    pub(crate) fn indexed(&self, runs: &[PositionRun]) {
        let mut recent = self.0.write().unwrap_or_else(PoisonError::into_inner);
        for run in runs {
            recent.remove(&run.first);
        }
    }

    /// Where `offset` is, if a recent run holds it.
    pub(crate) fn locate(&self, offset: Offset) -> Option<Location> {
        let recent = self.0.read().unwrap_or_else(PoisonError::into_inner);
        recent
            .range(..=offset)
            .next_back()
            .and_then(|(_, run)| run.location(offset))
    }
}

/// Every segment by base offset: the writer adds one at each roll, retention removes the
/// oldest, readers look them up.
pub(crate) struct Segments(RwLock<BTreeMap<Offset, Arc<Segment>>>);

impl Segments {
    /// The segment whose base offset is `base`.
    pub(crate) fn get(&self, base: Offset) -> Option<Arc<Segment>> {
        let segments = self.0.read().unwrap_or_else(PoisonError::into_inner);
        segments.get(&base).cloned()
    }

    /// The newest (active) segment.
    pub(crate) fn newest(&self) -> Option<Arc<Segment>> {
        let segments = self.0.read().unwrap_or_else(PoisonError::into_inner);
        segments.values().next_back().cloned()
    }

    /// The writer rolled to `segment`.
    pub(crate) fn add(&self, segment: Arc<Segment>) {
        let mut segments = self.0.write().unwrap_or_else(PoisonError::into_inner);
        segments.insert(segment.base, segment);
    }

    /// Retention: removes and returns every segment below `below`.
    pub(crate) fn remove_below(&self, below: Offset) -> Vec<Arc<Segment>> {
        let mut segments = self.0.write().unwrap_or_else(PoisonError::into_inner);
        let keep = segments.split_off(&below);
        std::mem::replace(&mut *segments, keep)
            .into_values()
            .collect()
    }

    /// Every segment, oldest first.
    pub(crate) fn infos(&self) -> Vec<SegmentInfo> {
        let segments = self.0.read().unwrap_or_else(PoisonError::into_inner);
        segments
            .values()
            .map(|s| SegmentInfo {
                base: s.base,
                path: s.path.clone(),
                bytes: s.len.load(Ordering::Acquire),
            })
            .collect()
    }
}

/// Functions called with the new durable end after every commit.
#[derive(Default)]
pub(crate) struct Listeners(Mutex<Vec<Listener>>);

impl Listeners {
    /// Registers `listener`.
    pub(crate) fn add(&self, listener: Listener) {
        lock(&self.0).push(listener);
    }

    /// The writer tells every listener the new durable end.
    pub(crate) fn tell(&self, end: Offset) {
        let listeners = lock(&self.0).clone();
        for listener in listeners {
            listener(end);
        }
    }
}

/// When the checkpointer runs: every interval, sooner when asked, never after close.
#[derive(Default)]
pub(crate) struct Checkpoints {
    closing: Mutex<bool>,
    due: Condvar,
}

impl Checkpoints {
    /// The checkpointer waits out `interval` (or until asked); whether to checkpoint now,
    /// `false` once the log closes. A close while it checkpointed is seen before it waits.
    pub(crate) fn wait(&self, interval: Duration) -> bool {
        let closing = lock(&self.closing);
        if *closing {
            return false;
        }
        let closing = self
            .due
            .wait_timeout(closing, interval)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        !*closing
    }

    /// The indexer: the backlog of index changes is large; checkpoint now.
    pub(crate) fn request(&self) {
        self.due.notify_all();
    }

    /// The log closes: the checkpointer stops.
    pub(crate) fn close(&self) {
        *lock(&self.closing) = true;
        self.due.notify_all();
    }
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

/// What the writer has done; it is the only one to count.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    records: AtomicU64,
    commits: AtomicU64,
    fsyncs: AtomicU64,
    bytes_written: AtomicU64,
}

impl Counters {
    /// One group commit of `records` records.
    pub(crate) fn committed(&self, records: u64) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.records.fetch_add(records, Ordering::Relaxed);
    }

    /// One fdatasync of a segment.
    pub(crate) fn synced(&self) {
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
    }

    /// `bytes` written to a segment.
    pub(crate) fn wrote(&self, bytes: u64) {
        self.bytes_written.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The counts now.
    pub(crate) fn stats(&self) -> LogStats {
        LogStats {
            records: self.records.load(Ordering::Relaxed),
            commits: self.commits.load(Ordering::Relaxed),
            fsyncs: self.fsyncs.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
        }
    }
}

/// The preallocated next segment, on its way from the preallocator to the writer.
#[derive(Default)]
pub(crate) struct Handover {
    state: Mutex<Prepared>,
    /// Wakes the preallocator when the writer took the file or rolled, and on close.
    taken: Condvar,
}

#[derive(Default)]
struct Prepared {
    file: Option<Box<dyn DiskFile>>,
    stop: bool,
    /// Segment rolls so far: a preallocator that found too little space waits for the next.
    rolls: u64,
}

/// What the preallocator is to do next ([`Handover::await_need`]).
pub(crate) enum Need {
    /// Prepare the next segment.
    Prepare,
    /// Stop; remove the prepared file if nobody took it (`unused`).
    Stop {
        /// A prepared file that no roll took.
        unused: bool,
    },
}

impl Handover {
    /// The preallocator waits until the writer needs a prepared file: none is ready, and a
    /// roll happened since space was found low (at roll count `space_low_at`).
    pub(crate) fn await_need(&self, space_low_at: Option<u64>) -> Need {
        let mut prepared = lock(&self.state);
        while !prepared.stop && (prepared.file.is_some() || space_low_at == Some(prepared.rolls)) {
            prepared = self
                .taken
                .wait(prepared)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if prepared.stop {
            let unused = prepared.file.take().is_some();
            return Need::Stop { unused };
        }
        Need::Prepare
    }

    /// The preallocator: `file` is zero-filled and synced.
    pub(crate) fn offer(&self, file: Box<dyn DiskFile>) {
        lock(&self.state).file = Some(file);
    }

    /// Segment rolls so far.
    pub(crate) fn rolls(&self) -> u64 {
        lock(&self.state).rolls
    }

    /// Whether the log is closing (a preparation in progress stops).
    pub(crate) fn stopping(&self) -> bool {
        lock(&self.state).stop
    }

    /// The writer rolls: takes the prepared file, if one is ready.
    pub(crate) fn take(&self) -> Option<Box<dyn DiskFile>> {
        lock(&self.state).file.take()
    }

    /// The writer rolled: the name of the next segment is free, and a preallocator that
    /// found too little space looks again.
    pub(crate) fn rolled(&self) {
        lock(&self.state).rolls += 1;
        self.taken.notify_all();
    }

    /// The log closes: the preallocator stops.
    pub(crate) fn stop(&self) {
        lock(&self.state).stop = true;
        self.taken.notify_all();
    }
}

/// Blocking appends ([`crate::Log::append`]) wait here for their results; the writer wakes
/// them all with one notify after each commit while any waits. One wake per append would
/// cost the writer a syscall each, and each woken appender may preempt it.
#[derive(Default)]
pub(crate) struct Blocking {
    lock: Mutex<()>,
    unblocked: Condvar,
    waiters: AtomicUsize,
}

impl Blocking {
    /// An appender waits until `slot` holds its result.
    pub(crate) fn wait_for<T>(&self, slot: &Mutex<Option<T>>) -> T {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        // The writer fills the slot, then takes `lock` before it notifies: a check made under
        // `lock` either sees the result or waits in time for the notify.
        let mut guard = lock(&self.lock);
        let result = loop {
            if let Some(result) = lock(slot).take() {
                break result;
            }
            guard = self
                .unblocked
                .wait(guard)
                .unwrap_or_else(PoisonError::into_inner);
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        result
    }

    /// The writer, after a commit: wakes the blocking appenders, if any waits.
    pub(crate) fn wake_if_waiting(&self) {
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.wake();
        }
    }

    /// Wakes every blocking appender to look at its slot.
    pub(crate) fn wake(&self) {
        drop(lock(&self.lock));
        self.unblocked.notify_all();
    }
}
