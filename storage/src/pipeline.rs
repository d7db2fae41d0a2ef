//! The commit pipeline: the threads that turn queued appends into durable, indexed records.
//!
//! ```text
//! submit ─▶ queue ─▶ writer ──────────────▶ (publish): callbacks, listeners
//!                   encode, write, roll,          └─▶ indexer ─▶ index layer ─▶ checkpointer ─▶ sled
//!                   fdatasync (per policy)
//! ```
//!
//! The **writer** takes every queued append, gives the records their offsets, writes them as
//! one batch (with what arrives while it writes, for up to [`COMMIT_WINDOW`]), rolls segments,
//! and makes the batch durable per the fsync policy: under `always`, one fdatasync for the
//! whole batch (a group commit: whatever is submitted during that fdatasync is the next
//! batch). [`Outlet::publish`] makes a batch visible (positions in `recent`, then the durable
//! end) and answers its appends in commit order, on the writer thread; the **indexer**
//! applies it to the index's in-memory layer, and the **checkpointer** writes that layer to
//! sled.
//!
//! Completions run on the writer, not on a thread of their own: on two cores the hand-over's
//! wake-ups cost more (about 1.5 µs of CPU per single publish in the server) than the
//! callbacks delay the next batch.
//!
//! **Invariant:** the writer is the only thread that fsyncs segments while the log is open
//! (fsyncgate: a failed fsync is seen by exactly one caller, which poisons the log).

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::dir::{Segment, PREPARED_NAME};
use crate::error::{Error, Result};
use crate::options::FsyncPolicy;
use crate::position::PositionRun;
use crate::record::{self, Frame};
use crate::shared::{Appended, Callback, Need, Request, Shared};
use crate::Offset;

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
        if shared.is_poisoned() {
            continue;
        }
        // A panic here is a bug in applying a record: fail-stop, as after a failed write.
        let applied = std::panic::catch_unwind(AssertUnwindSafe(|| {
            shared.index.apply(&job.frames, &job.runs)
        }))
        .unwrap_or_else(|panic| Err(Error::panicked("the indexer thread", &*panic)));
        if let Err(error) = applied {
            shared.poison(&error);
            continue;
        }
        shared.recent.indexed(&job.runs);
        shared.indexed.advance(job.end);
        if shared.index.pending_changes() > CHECKPOINT_CHANGES {
            shared.checkpoints.request();
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
    while shared.checkpoints.wait(interval) {
        if shared.index.pending_changes() > 0 && !shared.is_poisoned() {
            let written = std::panic::catch_unwind(AssertUnwindSafe(|| shared.index.checkpoint()))
                .unwrap_or_else(|panic| Err(Error::panicked("the checkpointer thread", &*panic)));
            if let Err(error) = written {
                shared.poison(&error);
            }
        }
    }
}

/// The preallocator thread: keeps one zero-filled, synced segment file ready for the writer's
/// next roll. While space is low it prepares nothing and looks again at each roll (the writer
/// creates plain segments meanwhile). It stops for good when a preparation fails, and at
/// close, where it removes a file nobody took.
fn run_preallocator(shared: &Shared) {
    // Waiting for a roll when space was low last time (the roll count then).
    let mut space_low_at: Option<u64> = None;
    loop {
        if let Need::Stop { unused } = shared.handover.await_need(space_low_at) {
            if unused {
                let _ = shared.disk.remove_file(&shared.log_dir.join(PREPARED_NAME));
            }
            return;
        }
        match prepare_segment(shared) {
            Ok(Prepare::Ready(file)) => {
                if space_low_at.take().is_some() {
                    tracing::info!("segments are preallocated again: enough space is free");
                }
                shared.handover.offer(file);
            }
            Ok(Prepare::SpaceLow { free_bytes }) => {
                if space_low_at.is_none() {
                    tracing::info!(
                        free_bytes,
                        "segments are not preallocated while less than four segments' worth of space is free"
                    );
                }
                space_low_at = Some(shared.handover.rolls());
            }
            Ok(Prepare::Closing) => return,
            Err(error) => {
                tracing::warn!(%error, "could not preallocate a segment; new segments are not preallocated");
                return;
            }
        }
    }
}

/// What [`prepare_segment`] did.
enum Prepare {
    /// `log/.next.seg` is zero-filled and synced.
    Ready(Box<dyn crate::io::DiskFile>),
    /// Less than four segments' worth of space is free: nothing was written.
    SpaceLow { free_bytes: u64 },
    /// The log is closing: nothing is left behind.
    Closing,
}

/// Zero-fills and syncs `log/.next.seg` at the segment size, unless space is low or the log
/// is closing. The fsync is of a file with no record in it (fsyncgate does not apply).
fn prepare_segment(shared: &Shared) -> Result<Prepare> {
    const CHUNK: u64 = 1 << 20;
    let disk = shared.disk.as_ref();
    let size = shared.options.segment_bytes;
    let path = shared.log_dir.join(PREPARED_NAME);
    let free = disk
        .available_bytes(&shared.log_dir)
        .map_err(|e| Error::io("stat file system", &shared.log_dir, e))?;
    if let Some(free_bytes) = free.filter(|free| *free < size.saturating_mul(4)) {
        return Ok(Prepare::SpaceLow { free_bytes });
    }
    let file = disk
        .create(&path)
        .map_err(|e| Error::io("create prepared segment", &path, e))?;
    let zeros = vec![0u8; usize::try_from(size.min(CHUNK)).unwrap_or(0)];
    let mut at = 0;
    let filled = loop {
        if shared.handover.stopping() {
            break Ok(false);
        }
        if at >= size {
            break file.sync_data().map(|()| true);
        }
        let n = usize::try_from((size - at).min(CHUNK)).unwrap_or(0);
        if let Err(e) = file.write_at(zeros.get(..n).unwrap_or_default(), at) {
            break Err(e);
        }
        at += n as u64;
    };
    match filled {
        Ok(true) => Ok(Prepare::Ready(file)),
        Ok(false) => {
            let _ = disk.remove_file(&path);
            Ok(Prepare::Closing)
        }
        Err(e) => {
            let _ = disk.remove_file(&path);
            Err(Error::io("preallocate segment", &path, e))
        }
    }
}

/// The log's background threads, in pipeline order.
pub(crate) struct Threads {
    writer: JoinHandle<()>,
    preallocator: Option<JoinHandle<()>>,
    indexer: JoinHandle<()>,
    checkpointer: JoinHandle<()>,
}

impl Threads {
    pub(crate) fn spawn(shared: &Arc<Shared>, mut writer: Writer) -> Result<Self> {
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(format!("courier-log-{name}"))
                .spawn(f)
                .map_err(|e| Error::io("spawn thread", &shared.dir, e))
        };
        // Bounded: a writer that outruns the indexer by this many batches waits for it.
        let (to_indexer, jobs) = mpsc::sync_channel(64);
        let outlet = Outlet {
            shared: shared.clone(),
            to_indexer,
        };
        writer.outlet = Some(outlet);
        let (s1, s2, s3) = (shared.clone(), shared.clone(), shared.clone());
        let preallocator = if shared.options.preallocate {
            Some(spawn("prealloc", Box::new(move || run_preallocator(&s3)))?)
        } else {
            None
        };
        Ok(Self {
            preallocator,
            indexer: spawn("indexer", Box::new(move || run_indexer(&s1, &jobs)))?,
            checkpointer: spawn("checkpointer", Box::new(move || run_checkpointer(&s2)))?,
            writer: spawn("writer", Box::new(move || writer.run()))?,
        })
    }

    /// Joins in pipeline order: the writer finishes the queue; its exit closes the indexer's
    /// channel, which drains and stops; then the checkpointer.
    pub(crate) fn join(self, shared: &Shared) {
        let _ = self.writer.join();
        shared.handover.stop();
        if let Some(preallocator) = self.preallocator {
            let _ = preallocator.join();
        }
        let _ = self.indexer.join();
        shared.checkpoints.close();
        let _ = self.checkpointer.join();
    }
}

/// A durable batch, to be announced.
struct Written {
    end: Offset,
    accepted: Vec<Accepted>,
    frames: Vec<Frame>,
    runs: Vec<PositionRun>,
}

/// Where durable (or failed) batches go: their appenders and listeners, and the indexer.
#[derive(Clone)]
struct Outlet {
    shared: Arc<Shared>,
    to_indexer: mpsc::SyncSender<IndexJob>,
}

impl Outlet {
    /// Makes a durable batch visible (positions, then the durable end), queues it for the
    /// index and completes its appends.
    fn publish(&self, batch: Written) {
        let end = batch.end;
        self.shared.recent.add(&batch.runs);
        self.shared.counters.committed(batch.frames.len() as u64);
        if let Some(observer) = &self.shared.options.observer {
            observer.committed(batch.frames.len() as u64);
        }
        self.shared.durable.advance(end);
        let job = IndexJob {
            frames: batch.frames,
            runs: batch.runs,
            end,
        };
        if self.to_indexer.send(job).is_err() {
            self.shared.poison(&Error::Closed);
        }
        let done = batch
            .accepted
            .into_iter()
            .map(|a| {
                let appended = Appended {
                    first: a.first,
                    count: a.count,
                };
                (a.done, Ok(appended))
            })
            .collect();
        self.complete(Some(end), done);
    }

    /// Poisons the log and fails every append in `accepted` with `error`.
    fn fail(&self, accepted: Vec<Accepted>, error: &Error) {
        self.shared.poison(error);
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

    /// Tells listeners the new durable end (if the appends succeeded), then answers the
    /// appends, in commit order.
    fn complete(&self, end: Option<Offset>, done: Vec<(Callback, Result<Appended>)>) {
        if let Some(end) = end {
            self.shared.listeners.tell(end);
        }
        for (done, result) in done {
            // A callback that panics is a bug in its owner, whose state may now be half
            // changed: fail-stop, as after a failed write. The other appends of the batch are
            // durable and still get their answers; the panicking one's waiter sees its
            // callback dropped.
            let answered = std::panic::catch_unwind(AssertUnwindSafe(|| done(result)));
            if let Err(panic) = answered {
                let error = Error::panicked("a completion callback", &*panic);
                self.shared.poison(&error);
            }
        }
    }
}

/// Under `fsync=always`, how long after a batch began the appends queued during its writing
/// may still join it, so that one fsync covers them too. The writer never waits for them: a
/// lone append is fsynced at once. With 64 appends in flight this took records per fsync from
/// 32 to 51.
const COMMIT_WINDOW: Duration = Duration::from_micros(200);

/// The writer thread's own state.
pub(crate) struct Writer {
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
}

struct Accepted {
    first: Offset,
    count: u64,
    done: Callback,
}

impl Writer {
    pub(crate) fn new(shared: Arc<Shared>, next_offset: Offset, active_len: u64) -> Result<Self> {
        let active = shared.segments.newest().ok_or_else(|| Error::Layout {
            path: shared.log_dir.clone(),
            why: "no active segment after recovery".into(),
        })?;
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
        })
    }

    /// Commits batches until the log closes. A panic (a bug) poisons the log; the thread
    /// then answers every append still queued, and every later one, with that error instead
    /// of leaving them waiting.
    fn run(mut self) {
        let served = std::panic::catch_unwind(AssertUnwindSafe(|| self.serve()));
        let Err(panic) = served else {
            return;
        };
        let error = Error::panicked("the writer thread", &*panic);
        self.shared.poison(&error);
        // `submit` refuses appends once the log is poisoned; these were queued before. A
        // blocking append's answer is in its slot, so wake the blocking appenders each time.
        let shared = self.shared.clone();
        shared.intake.refuse_until_closed(|request| {
            (request.done)(Err(Error::Poisoned));
            shared.blocking.wake();
        });
    }

    fn serve(&mut self) {
        while let Some(requests) = self.next_requests() {
            if requests.is_empty() {
                if let Err(e) = self.sync() {
                    self.shared.poison(&e);
                }
                continue;
            }
            self.commit(requests);
            self.wake_blocking();
        }
        if self.unsynced && !self.shared.is_poisoned() {
            let _ = self.sync().map_err(|e| self.shared.poison(&e));
        }
    }

    /// Waits for the next batch: every queued append, or none when an `interval` fsync is
    /// due; `None` once the log is closed and the queue drained.
    fn next_requests(&self) -> Option<Vec<Request>> {
        self.shared.intake.next(|| match self.shared.options.fsync {
            FsyncPolicy::Interval(every) if self.unsynced => {
                Some(every.saturating_sub(self.last_sync.elapsed()))
            }
            _ => None,
        })
    }

    /// Wakes the blocking appends ([`crate::Log::append`]) whose results the last commit set:
    /// one notify for all of them.
    fn wake_blocking(&self) {
        self.shared.blocking.wake_if_waiting();
    }

    fn sync(&mut self) -> Result<()> {
        let started = monotonic_now();
        self.active
            .file
            .sync_data()
            .map_err(|e| Error::io("fdatasync segment", &self.active.path, e))?;
        self.unsynced = false;
        self.last_sync = monotonic_now();
        self.shared.counters.synced();
        if let Some(observer) = &self.shared.options.observer {
            observer.synced(self.last_sync.saturating_duration_since(started));
        }
        Ok(())
    }

    /// Writes one batch, makes it durable per the policy and publishes it.
    fn commit(&mut self, requests: Vec<Request>) {
        crate::failpoint::panic("writer.commit");
        let outlet = self.outlet.clone().expect("spawned with an outlet");
        if self.shared.is_poisoned() {
            for request in requests {
                (request.done)(Err(Error::Poisoned));
            }
            return;
        }
        let mut accepted = Vec::with_capacity(requests.len());
        let mut frames = Vec::new();
        let mut runs = Vec::new();
        let started = monotonic_now();
        let mut requests = requests;
        let result = loop {
            if let Err(error) = self.write(requests, &mut accepted, &mut frames, &mut runs) {
                break Err(error);
            }
            // Under `always`, appends that arrived during the write join this batch's fsync.
            let joining = self.shared.options.fsync == FsyncPolicy::Always
                && started.elapsed() < COMMIT_WINDOW;
            if !joining {
                break self.make_durable();
            }
            match self.take_queued() {
                Some(more) => requests = more,
                None => break self.make_durable(),
            }
        };
        if let Err(error) = result {
            return outlet.fail(accepted, &error);
        }
        outlet.publish(Written {
            end: self.next_offset,
            accepted,
            frames,
            runs,
        });
    }

    /// Takes the appends queued meanwhile, if any.
    fn take_queued(&self) -> Option<Vec<Request>> {
        self.shared.intake.take_queued()
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
        self.active.len.store(self.active_len, Ordering::Release);
        let written = self.buf.len() as u64;
        self.shared.counters.wrote(written);
        self.buf.clear();
        self.unsynced = true;
        Ok(())
    }

    /// Seals the active segment (synced whatever the policy, so that a torn tail can only ever
    /// be in the newest segment) and makes a new one durable before anything is written to it.
    fn roll(&mut self) -> Result<()> {
        // A preallocated segment is cut to its records first: only the newest one ever has a
        // zero tail.
        let file_len = self
            .active
            .file
            .len()
            .map_err(|e| Error::io("stat segment", &self.active.path, e))?;
        if file_len > self.active_len {
            self.active
                .file
                .set_len(self.active_len)
                .map_err(|e| Error::io("trim segment", &self.active.path, e))?;
        }
        self.sync()?;
        crate::failpoint::crash("segment.sealed");
        let base = self.next_offset;
        let shared = &self.shared;
        let prepared = shared.handover.take();
        let disk = shared.disk.as_ref();
        let segment = match prepared {
            Some(file) => Segment::adopt(disk, &shared.log_dir, base, file),
            None => Segment::create(disk, &shared.log_dir, base),
        };
        // Only now is the name free for the next one; a preallocator that found too little
        // space looks again.
        shared.handover.rolled();
        let segment = Arc::new(segment?);
        tracing::info!(segment = %segment.path.display(), base = base.0, "rolled to a new segment");
        self.shared.segments.add(segment.clone());
        self.active = segment;
        self.active_len = 0;
        Ok(())
    }
}

#[expect(
    clippy::disallowed_methods,
    reason = "the fsync interval and the fsyncs' durations are measured on the monotonic clock"
)]
pub(crate) fn monotonic_now() -> Instant {
    Instant::now()
}
