//! Long-poll wake-ups: one `Notify` per inbox that has had a receive call. A commit that
//! may make a message deliverable (or free room under `max_in_flight`) wakes its inbox's
//! receive calls, which then try to lease; nobody polls.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Notify;

/// The wake-ups of every inbox with receive calls.
#[derive(Debug, Default)]
pub(super) struct Waiters {
    by_inbox: HashMap<String, Arc<Notify>>,
}

impl Waiters {
    /// The wake-up of `inbox`, created on first use.
    pub(super) fn of(&mut self, inbox: &str) -> Arc<Notify> {
        if let Some(notify) = self.by_inbox.get(inbox) {
            return notify.clone();
        }
        self.by_inbox.entry(inbox.to_owned()).or_default().clone()
    }

    /// Wakes every receive call waiting on one of `inboxes`.
    pub(super) fn wake(&self, inboxes: &[Arc<str>]) {
        for inbox in inboxes {
            if let Some(notify) = self.by_inbox.get(&**inbox) {
                notify.notify_waiters();
            }
        }
    }

    /// Wakes and forgets the receive calls of a deleted inbox.
    pub(super) fn remove(&mut self, inbox: &str) {
        if let Some(notify) = self.by_inbox.remove(inbox) {
            notify.notify_waiters();
        }
    }
}
