//! What a publish must pass before anything is written: every destination registered and
//! below `limits.max_inbox_depth`, the sender within `limits.publish_rate`; and what a client
//! id is known as (a duplicate of a committed message, or of one still being committed).

use std::collections::HashMap;

use tokio::sync::watch;

use std::sync::Arc;

use courier_storage::Record;

use super::commit::{Commit, NONCE};
use super::{Broker, Core, Refusal, Result};
use crate::config::Limits;
use crate::delivery;

/// What a client id's earlier publish is known as.
#[derive(Debug, Clone)]
pub(super) enum Remembered {
    /// Its message is being committed; the receiver yields the offset.
    Pending(watch::Receiver<Option<u64>>),
    /// Committed at `offset` and still within its dedupe window.
    Done {
        /// The offset of the first publish.
        offset: u64,
    },
}

/// A sender's publish-rate token bucket.
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    tokens: f64,
    counted_at_ms: u64,
}

/// Rate buckets per sender and the client ids whose first publish is being committed
/// (committed ones are remembered by the delivery state).
#[derive(Debug, Default)]
pub(super) struct Admission {
    buckets: HashMap<String, Bucket>,
    committing: HashMap<String, watch::Receiver<Option<u64>>>,
}

/// One message's part in a publish: its sender and destinations.
pub(super) struct Candidate<'a> {
    /// The sending agent (rate-limited if registered).
    pub(super) from: &'a str,
    /// The inboxes it goes to.
    pub(super) destinations: &'a [String],
}

impl Admission {
    /// Checks a whole publish: destinations (registered, checked by the caller) have room
    /// for all of it, and every registered sender has the tokens; takes the tokens. Nothing
    /// is taken if anything is refused.
    pub(super) fn check(
        &mut self,
        delivery: &delivery::State,
        is_registered: impl Fn(&str) -> bool,
        limits: &Limits,
        candidates: &[Candidate<'_>],
        now_ms: u64,
    ) -> Result<()> {
        let mut adding: HashMap<&str, u64> = HashMap::new();
        for candidate in candidates {
            for inbox in candidate.destinations {
                *adding.entry(inbox).or_default() += 1;
            }
        }
        for (inbox, n) in adding {
            let d = delivery.depth(inbox);
            let depth = d.ready + d.in_flight;
            if depth + n > limits.max_inbox_depth {
                return Err(Refusal::InboxFull {
                    agent: inbox.to_owned(),
                    depth,
                });
            }
        }
        let rate = limits.publish_rate;
        if rate == 0 {
            return Ok(());
        }
        let mut per_sender: HashMap<&str, f64> = HashMap::new();
        for candidate in candidates {
            // Unregistered senders are limited by their destinations only.
            if is_registered(candidate.from) {
                *per_sender.entry(candidate.from).or_default() += 1.0;
            }
        }
        let capacity = f64::from(rate);
        let mut refilled = Vec::with_capacity(per_sender.len());
        for (from, n) in per_sender {
            let bucket = self.buckets.get(from).copied().unwrap_or_default();
            let elapsed = now_ms.saturating_sub(bucket.counted_at_ms) as f64 / 1000.0;
            let tokens = (bucket.tokens + elapsed * capacity).min(capacity);
            if tokens < n {
                return Err(Refusal::RateLimited {
                    agent: from.to_owned(),
                    rate,
                });
            }
            refilled.push((from, tokens - n));
        }
        for (from, tokens) in refilled {
            let bucket = Bucket {
                tokens,
                counted_at_ms: now_ms,
            };
            self.buckets.insert(from.to_owned(), bucket);
        }
        Ok(())
    }

    /// What the earlier publish of client id `id` is, if it counts at `now_ms`.
    pub(super) fn recall(
        &self,
        delivery: &delivery::State,
        id: &str,
        now_ms: u64,
    ) -> Option<Remembered> {
        if let Some(pending) = self.pending(id) {
            return Some(pending);
        }
        let offset = delivery.recall(id, now_ms)?;
        Some(Remembered::Done { offset: offset.0 })
    }

    /// `id`'s first publish, if it is being committed now.
    pub(super) fn pending(&self, id: &str) -> Option<Remembered> {
        let rx = self.committing.get(id)?;
        Some(Remembered::Pending(rx.clone()))
    }

    /// Marks `id` as being committed; duplicates meanwhile wait on `rx`.
    pub(super) fn committing(&mut self, id: String, rx: watch::Receiver<Option<u64>>) {
        self.committing.insert(id, rx);
    }

    /// `id` is durable (and remembered by the delivery state from now on).
    pub(super) fn committed(&mut self, id: &str) {
        self.committing.remove(id);
    }

    /// Forgets a deleted agent's rate bucket.
    pub(super) fn forget(&mut self, agent: &str) {
        self.buckets.remove(agent);
    }
}

/// A signed request's signature, checked by the API (`auth.signing`): its nonce is spent
/// durably with what the request writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// Who signed: the agent's id, or `$admin`.
    pub signer: String,
    /// The client's nonce.
    pub nonce: String,
    /// Until when the nonce counts (epoch ms): the signature's time plus the allowed skew.
    pub until_ms: u64,
}

impl Broker {
    /// Refuses a signed request whose nonce was used, before anything else is checked (so
    /// a replay costs its signer nothing, not even publish-rate tokens).
    pub(super) fn check_nonce(core: &Core, signed: Option<&Signed>, now: u64) -> Result<()> {
        let Some(signed) = signed else {
            return Ok(());
        };
        if core.delivery.nonce_used(&signed.signer, &signed.nonce, now) {
            return Err(Refusal::NonceReused);
        }
        Ok(())
    }

    /// Spends a signed request's nonce under the lock: refused if it was used within its
    /// window; else a `NonceUsed` record, applied now (a concurrent replay is refused at
    /// once) and submitted before whatever the request writes next under the same lock, so
    /// the request's records are never durable without it.
    pub(super) fn spend_nonce(
        self: &Arc<Self>,
        core: &mut Core,
        signed: &Signed,
        now: u64,
    ) -> Result<Commit> {
        let record = Self::nonce_record(core, signed.clone(), now)?;
        self.commit_now(core, NONCE, now, vec![record])
    }

    /// The `NonceUsed` record that spends a signed request's nonce, to be committed now
    /// (alone, or ahead of the request's messages in their submission); refused if the
    /// nonce was used within its window or its window has ended.
    pub(super) fn nonce_record(core: &Core, signed: Signed, now: u64) -> Result<Record> {
        Self::check_nonce(core, Some(&signed), now)?;
        // A window that has ended, by the server's clock or by the record clock (which
        // forgets nonces and can be ahead after the system clock was set back), could not
        // be remembered: the nonce would be forgotten at once and could be used again.
        if signed.until_ms <= now.max(core.delivery.record_clock_ms()) {
            return Err(Refusal::SignatureExpired);
        }
        Ok(Record::NonceUsed {
            signer: signed.signer,
            nonce: signed.nonce,
            until_ms: signed.until_ms,
        })
    }
}
