//! Retention: deletes whole old segments per `retention.*`; when age retention dropped
//! messages that were still pending, the in-memory state forgets them too.

use std::sync::Arc;
use std::time::Duration;

use courier_storage::{Offset, Record};

use super::{millis, Broker};

impl Broker {
    /// Deletes whole old segments per `retention.*` (blocking: call it off the async threads).
    /// When age retention dropped messages that were still pending, the log holds a
    /// `Truncated` record; the in-memory state forgets the same messages.
    pub fn enforce_retention(&self) -> std::result::Result<usize, courier_storage::Error> {
        let retention = courier_storage::Retention {
            max_bytes: self.config.retention_max_bytes,
            max_age_ms: self.config.retention_max_age.map(millis),
        };
        if retention.max_bytes.is_none() && retention.max_age_ms.is_none() {
            return Ok(0);
        }
        let oldest = || self.log.segments().first().map(|segment| segment.base);
        let before = oldest();
        let deleted = self.log.enforce_retention(retention, self.clock.now_ms());
        // Once its `Truncated` record is durable the log no longer has the segments below the
        // oldest one left, even if deleting a file then failed: memory forgets them as the
        // index does.
        if let Some(below) = oldest().filter(|after| Some(*after) != before) {
            let now = self.clock.now_ms();
            let mut core = self.lock();
            core.delivery
                .apply(&Record::Truncated { below }, Offset(0), now);
            tracing::info!(below = below.0, "retention deleted old segments");
        }
        Ok(deleted?.len())
    }

    /// Runs retention at start and then every `interval` until shutdown.
    pub async fn run_retention(self: Arc<Self>, interval: Duration) {
        let mut closing = self.closing.subscribe();
        loop {
            let broker = self.clone();
            match tokio::task::spawn_blocking(move || broker.enforce_retention()).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => tracing::error!(%error, "retention failed"),
                Err(error) => tracing::error!(%error, "retention task failed"),
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                _ = closing.changed() => return,
            }
        }
    }
}
