//! The sweeper: sleeps until the earliest timer (or until a commit adds an earlier one),
//! then makes delayed messages deliverable, releases expired leases with backoff or
//! dead-letters them at `max_attempts`, and dead-letters messages past their ttl.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use courier_storage::Record;

use super::commit::{EXPIRY, SWEPT_DEAD_LETTER};
use super::{Broker, Core};

impl Broker {
    /// Wakes the sweeper if the earliest timer is now before the time it sleeps until (a
    /// new delay, lease or backoff may be due sooner); otherwise it is left asleep.
    pub(super) fn poke_sweeper(&self, core: &Core) {
        let wakes_at = self.sweeper_wakes_at_ms.load(Ordering::Acquire);
        if core
            .delivery
            .next_due_ms()
            .is_some_and(|due| due < wakes_at)
        {
            self.sweeper.notify_one();
        }
    }

    /// One sweep at the current time: promotes delayed messages whose time came, releases or
    /// dead-letters expired leases, dead-letters expired messages. Returns how long to sleep
    /// (until the earliest timer, at most a second). Only due timers are read.
    pub fn sweep(self: &Arc<Self>) -> Duration {
        let now = self.clock.now_ms();
        let mut core = self.lock();
        let woken = core.delivery.promote(now);
        core.waiters.wake(&woken);
        let writable = self.check_writable().is_ok();
        if writable {
            let tick = core
                .delivery
                .tick(now, |inbox| self.policy(core.registry.agent(inbox)));
            if !tick.records.is_empty() {
                // The crash points say which kind of write this is; either way its releases
                // are leases that ran out (the metrics count them so).
                let points = if tick
                    .records
                    .iter()
                    .any(|r| matches!(r, Record::DeadLettered { .. }))
                {
                    SWEPT_DEAD_LETTER
                } else {
                    EXPIRY
                };
                // Not awaited: these are the server's own decisions; if they are lost in a
                // crash, the next start decides them again from the recovered state.
                if let Ok(commit) = self.commit_now(&mut core, points, now, tick.records) {
                    commit.detach();
                }
            }
        }
        // At least every second, so a clock anomaly can never stall the sweeper. Stored under
        // the lock, where every `poke_sweeper` compares with it.
        // A log that takes no writes leaves due timers due: then look once a second only.
        let sleep_ms = match core.delivery.next_due_ms() {
            Some(due) if writable => due.saturating_sub(now).clamp(1, 1000),
            _ => 1000,
        };
        self.sweeper_wakes_at_ms
            .store(now.saturating_add(sleep_ms), Ordering::Release);
        Duration::from_millis(sleep_ms)
    }

    /// Runs the sweeper until shutdown: sleeps until the earliest timer, or until woken by a
    /// change that may have added an earlier one.
    pub async fn run_sweeper(self: Arc<Self>) {
        let mut closing = self.closing.subscribe();
        loop {
            let woken = self.sweeper.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let sleep = self.sweep();
            if *closing.borrow_and_update() {
                return;
            }
            tokio::select! {
                () = &mut woken => {}
                () = tokio::time::sleep(sleep) => {}
                _ = closing.changed() => return,
            }
        }
    }
}
