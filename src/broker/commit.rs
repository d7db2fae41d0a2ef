//! The one way the broker changes state: **decide under the lock → apply → submit → answer
//! after durable.**
//!
//! Every operation takes the broker lock, decides (pure, [`crate::delivery::State`]), and
//! hands the records to one of two functions, which differ in when the records reach the
//! in-memory state:
//!
//! - [`Broker::commit_now`]: applied at once, before the lock is released. For records that
//!   touch only messages whose offsets are known (leases, acks, releases, dead letters,
//!   redrives, backfills) and for subscriptions, which change routing at their decision:
//!   applying them now gives the state that applying the log in order gives.
//! - [`Broker::commit_when_durable`]: applied by the log's completion callback, in commit
//!   order. For records that need their own offset (messages) or must not be seen before
//!   they are durable (registrations).
//!
//! [`Broker::commit_now_and_when_durable`] does both in one submission, the records applied
//! now first in the log (a signed publish's nonce ahead of its messages).
//!
//! All take the lock's contents (`&mut Core`) as an argument, so none can be called without
//! holding it: records are submitted in the order they were decided. All return a
//! [`Commit`], which the operation awaits (after releasing the lock) before it answers, so
//! concurrent requests share one group commit and nobody is answered before durable.

use std::sync::Arc;

use crate::metrics::{Tally, Writing};
use crate::telemetry::spans::{self, Kind, Recording};
use courier_storage::{failpoint, Appended, Offset, Record};
use tokio::sync::oneshot;

use super::{Broker, Core, Refusal, Result};

/// The crash points around one kind of write, for the crash-safety tests (feature
/// `failpoints`, see [`courier_storage::failpoint`]): once its records are decided and
/// submitted (in memory, not yet durable), and once they are durable (before any answer).
#[derive(Debug, Clone, Copy)]
pub(super) struct CrashPoints {
    submitted: &'static str,
    durable: &'static str,
    /// What the write's records count as in the metrics.
    writing: Writing,
}

impl CrashPoints {
    /// The kind of write (`publish`, `lease`, ...): its crash points' common prefix.
    fn write(&self) -> &'static str {
        let name = self.submitted;
        name.split_once('.').map_or(name, |(write, _)| write)
    }
}

const fn points(submitted: &'static str, durable: &'static str) -> CrashPoints {
    CrashPoints {
        submitted,
        durable,
        writing: Writing::Other,
    }
}

const fn counted(points: CrashPoints, writing: Writing) -> CrashPoints {
    CrashPoints { writing, ..points }
}

pub(super) const PUBLISH: CrashPoints = points("publish.submitted", "publish.durable");
pub(super) const LEASE: CrashPoints = counted(
    points("lease.submitted", "lease.durable"),
    Writing::Deliveries,
);
pub(super) const ACK: CrashPoints = points("ack.submitted", "ack.durable");
pub(super) const NACK: CrashPoints =
    counted(points("nack.submitted", "nack.durable"), Writing::Nacks);
pub(super) const EXTEND: CrashPoints = points("extend.submitted", "extend.durable");
pub(super) const EXPIRY: CrashPoints = counted(
    points("expiry.submitted", "expiry.durable"),
    Writing::Expiries,
);
pub(super) const DEAD_LETTER: CrashPoints = points("dead_letter.submitted", "dead_letter.durable");
/// A sweep that dead-letters: its releases, if any, are leases that ran out too.
pub(super) const SWEPT_DEAD_LETTER: CrashPoints = counted(DEAD_LETTER, Writing::Expiries);
/// The queue leases of a deleted agent going back to their queues: at the crash points of a
/// nack, but not counted as nacks.
pub(super) const UNHOLD: CrashPoints = counted(NACK, Writing::Other);
pub(super) const REDRIVE: CrashPoints = points("redrive.submitted", "redrive.durable");
pub(super) const AGENT: CrashPoints = points("agent.submitted", "agent.durable");
pub(super) const SUBSCRIPTION: CrashPoints =
    points("subscription.submitted", "subscription.durable");
pub(super) const BACKFILL: CrashPoints = points("backfill.submitted", "backfill.durable");
pub(super) const NONCE: CrashPoints = points("nonce.submitted", "nonce.durable");

type AppendRx = oneshot::Receiver<std::result::Result<Appended, courier_storage::Error>>;

/// Records submitted under the broker lock, on their way to disk.
#[must_use = "a change is answered only once durable: await `durable`"]
pub(super) struct Commit {
    rx: AppendRx,
    /// The span `append` (when spans are exported): submitted → durable, ended by the task
    /// that waits for it, so the log's writer thread does no tracing work.
    span: Option<Recording>,
    /// Records ahead of the caller's in the submission (applied now): left out of the
    /// [`Appended`] that `durable` returns.
    skip: u64,
}

/// Where an append's records after its first `skip` landed.
fn skipped(appended: Appended, skip: u64) -> Appended {
    Appended {
        first: Offset(appended.first.0 + skip),
        count: appended.count.saturating_sub(skip),
    }
}

impl Commit {
    /// Waits until the records are durable (per the fsync policy); where they landed.
    pub(super) async fn durable(self) -> Result<Appended> {
        let Self { rx, mut span, skip } = self;
        let answer = match rx.await {
            Ok(Ok(appended)) => Ok(skipped(appended, skip)),
            Ok(Err(error)) => Err(Refusal::Unavailable(format!(
                "the write failed and the server stopped accepting writes ({error}); restart it to recover"
            ))),
            Err(_) => Err(Refusal::Unavailable(
                "the log closed before the write completed".into(),
            )),
        };
        if let Some(span) = &mut span {
            match &answer {
                Ok(appended) => span.int("courier.offset", appended.first.0),
                Err(refusal) => span.error(refusal.to_string()),
            }
        }
        answer
    }

    /// Nobody waits for these records: the sweeper's own decisions, which the next start
    /// decides again from the recovered state if a crash loses them.
    pub(super) fn detach(self) {
        if let Some(span) = self.span {
            span.discard();
        }
    }
}

impl Broker {
    /// Applies `records` to the in-memory state now, wakes the inboxes they free or make
    /// ready, and submits them. The records must not need their offset (no `Message`,
    /// no registration: those go through [`Broker::commit_when_durable`]).
    pub(super) fn commit_now(
        self: &Arc<Self>,
        core: &mut Core,
        points: CrashPoints,
        now: u64,
        records: Vec<Record>,
    ) -> Result<Commit> {
        self.check_writable()?;
        self.apply_now(core, &records, now);
        Ok(self.submit(
            points,
            now,
            records,
            0,
            None::<fn(&mut Core, Appended) -> _>,
        ))
    }

    /// The in-memory effect of records committed now ([`Broker::commit_now`]).
    fn apply_now(self: &Arc<Self>, core: &mut Core, records: &[Record], now: u64) {
        let mut woken = Vec::new();
        let mut released = false;
        for record in records {
            debug_assert!(
                !matches!(
                    record,
                    Record::Message(_) | Record::AgentUpserted(_) | Record::AgentDeleted { .. }
                ),
                "applied when durable, not now"
            );
            // Only a `Message` record's effect depends on its offset.
            woken.extend(core.delivery.apply(record, Offset(0), now));
            log_dead_letters(record);
            released |= matches!(record, Record::Released { .. });
        }
        // Releases whose delay is already over (a nack without delay) are ready at once.
        if released {
            woken.extend(core.delivery.promote(now));
        }
        core.waiters.wake(&woken);
        self.poke_sweeper(core);
    }

    /// Submits `records`; once they are durable, `apply` (on the log's writer thread, under
    /// the broker lock, in commit order) applies them to memory and returns the inboxes to
    /// wake. `_core` proves the caller holds the lock.
    pub(super) fn commit_when_durable(
        self: &Arc<Self>,
        _core: &mut Core,
        points: CrashPoints,
        now: u64,
        records: Vec<Record>,
        apply: impl FnOnce(&mut Core, Appended) -> Vec<Arc<str>> + Send + 'static,
    ) -> Result<Commit> {
        self.check_writable()?;
        Ok(self.submit(points, now, records, 0, Some(apply)))
    }

    /// [`Broker::commit_now`] of `ahead` and [`Broker::commit_when_durable`] of `records`
    /// in one submission, `ahead` first in the log: one write, one completion, and `records`
    /// never durable without `ahead` (a signed publish's nonce and its messages). `apply`
    /// and the returned [`Commit`] see where `records` landed.
    pub(super) fn commit_now_and_when_durable(
        self: &Arc<Self>,
        core: &mut Core,
        points: CrashPoints,
        now: u64,
        ahead: Vec<Record>,
        records: Vec<Record>,
        apply: impl FnOnce(&mut Core, Appended) -> Vec<Arc<str>> + Send + 'static,
    ) -> Result<Commit> {
        if ahead.is_empty() {
            return self.commit_when_durable(core, points, now, records, apply);
        }
        self.check_writable()?;
        self.apply_now(core, &ahead, now);
        let skip = ahead.len() as u64;
        let mut all = ahead;
        all.extend(records);
        Ok(self.submit(points, now, all, skip, Some(apply)))
    }

    fn submit(
        self: &Arc<Self>,
        points: CrashPoints,
        now: u64,
        records: Vec<Record>,
        skip: u64,
        apply: Option<impl FnOnce(&mut Core, Appended) -> Vec<Arc<str>> + Send + 'static>,
    ) -> Commit {
        let (tx, rx) = oneshot::channel();
        let broker = self.clone();
        let tally = Tally::of(&records, points.writing);
        // Submitted → durable: the wait for the group commit, its write and its fsync.
        let mut span = spans::start("append", Kind::Internal);
        if let Some(span) = &mut span {
            span.static_text("courier.write", points.write());
            span.int("courier.records", records.len() as u64);
        }
        self.log.submit(now, records, move |result| {
            match &result {
                Ok(appended) => {
                    failpoint::crash(points.durable);
                    if !tally.is_empty() {
                        broker.metrics.count(&tally);
                    }
                    if let Some(apply) = apply {
                        let mut core = broker.lock();
                        let woken = apply(&mut core, skipped(*appended, skip));
                        core.waiters.wake(&woken);
                        broker.poke_sweeper(&core);
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "an append failed; the log refuses further writes");
                }
            }
            let _ = tx.send(result);
        });
        failpoint::crash(points.submitted);
        Commit { rx, span, skip }
    }
}

/// Logs each dead-lettering: the forensics an operator reads first.
fn log_dead_letters(record: &Record) {
    if let Record::DeadLettered { inbox, letters } = record {
        for letter in letters {
            tracing::info!(
                agent = %inbox,
                offset = letter.slot.offset.0,
                reason = letter.reason.as_str(),
                attempts = letter.attempts,
                "dead-lettered a message"
            );
        }
    }
}
