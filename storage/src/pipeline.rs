//! The commit pipeline: the threads that turn queued appends into durable, indexed records.
//!
//! ```text
//! submit ─▶ queue ─▶ writer ─▶ syncer ─▶ (publish) ─▶ completer ─▶ callbacks, listeners
//!                   encode,    fdatasync           └─▶ indexer ─▶ index layer ─▶ checkpointer ─▶ sled
//!                   write, roll  (always)
//! ```
//!
//! The **writer** gives records their offsets, writes them and rolls segments. Under
//! `fsync=always` the **syncer** makes every batch written meanwhile durable with one
//! fdatasync, so disk and CPU work overlap; under `interval` and `never` the writer publishes
//! itself. [`Outlet::publish`] makes a batch visible (positions in `recent`, then the durable
//! end), the **completer** answers its appends in commit order, the **indexer** applies it to
//! the index's in-memory layer, and the **checkpointer** writes that layer to sled.
//!
//! **Invariant:** under `fsync=always` the syncer is the only thread that fsyncs segments
//! while the log is open (fsyncgate: a failed fsync is seen by exactly one caller).

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::index::Location;
use crate::log::{monotonic_now, Appended, Callback, FsyncPolicy, Request, Segment, Shared};
use crate::record::{self, Frame};
use crate::Offset;

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
    pub(crate) fn location(&self, offset: Offset) -> Option<Location> {
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
            poison(shared, &error);
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
        // Checked before waiting too: a close that came while the lock was released (during
        // the last checkpoint) must not wait out a whole interval.
        if *closing {
            return;
        }
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
                poison(shared, &error);
            }
        }
        closing = shared.closing.lock().expect("closing lock");
    }
}

/// The log's background threads, in pipeline order.
pub(crate) struct Threads {
    writer: JoinHandle<()>,
    syncer: Option<JoinHandle<()>>,
    completer: JoinHandle<()>,
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
    pub(crate) fn join(self, shared: &Shared) {
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

/// Marks the log poisoned (fail-stop), logs the first cause, and wakes whoever waits for the
/// durable end or the index, since neither will advance any more.
pub(crate) fn poison(shared: &Shared, error: &Error) {
    if !shared.poisoned.swap(true, Ordering::AcqRel) {
        tracing::error!(%error, "the log failed; refusing all further writes (fail-stop)");
    }
    // Taking each lock before notifying: a waiter between its check and its wait is not missed.
    drop(shared.indexed_end.lock().expect("indexed lock"));
    shared.indexed_advanced.notify_all();
    drop(shared.durable_end.lock().expect("durable lock"));
    shared.durable_advanced.notify_all();
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
    /// publishes them. Returns whether that segment was synced.
    fn sync_and_publish(&self, batches: Vec<Written>) -> bool {
        let Some(segment) = batches.last().map(|b| b.segment.clone()) else {
            return false;
        };
        let accepted = |batches: Vec<Written>| -> Vec<Accepted> {
            batches.into_iter().flat_map(|b| b.accepted).collect()
        };
        if self.shared.poisoned.load(Ordering::Acquire) {
            self.fail(accepted(batches), &Error::Poisoned);
            return false;
        }
        match self.sync(&segment) {
            Ok(()) => {
                self.publish(batches);
                true
            }
            Err(error) => {
                self.fail(accepted(batches), &error);
                false
            }
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
                    // Batches that arrived with the seal are synced after the writer's last
                    // write to their segment; if that is the sealed one, it is already durable.
                    let same = batches
                        .last()
                        .is_some_and(|b| Arc::ptr_eq(&b.segment, &segment));
                    let synced = outlet.sync_and_publish(std::mem::take(&mut batches));
                    let sealed = if outlet.shared.poisoned.load(Ordering::Acquire) {
                        Err(Error::Poisoned)
                    } else if same && synced {
                        Ok(())
                    } else {
                        outlet.sync(&segment)
                    };
                    let _ = reply.send(sealed);
                }
            }
        }
        let _ = outlet.sync_and_publish(batches);
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
    /// The syncer's queue under fsync=always.
    to_syncer: Option<mpsc::SyncSender<ToSyncer>>,
}

struct Accepted {
    first: Offset,
    count: u64,
    done: Callback,
}

impl Writer {
    pub(crate) fn new(shared: Arc<Shared>, next_offset: Offset, active_len: u64) -> Result<Self> {
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
        crate::failpoint::crash("segment.sealed");
        let base = self.next_offset;
        let shared = &self.shared;
        let segment = Arc::new(Segment::create(
            shared.disk.as_ref(),
            &shared.log_dir,
            base,
        )?);
        tracing::info!(segment = %segment.path.display(), base = base.0, "rolled to a new segment");
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
