//! Topics: subscriptions (records), the backfill of `start: earliest` subscriptions, and the
//! topics seen. Which agents a topic message goes to is decided in [`super::publish`], from
//! the subscriptions in the delivery state when the publish is decided.
//!
//! **Subscriptions change routing at their decision**: `Subscribed` and `Unsubscribed`
//! records go through `commit_now`, so every message decided after a subscription lands after
//! its record in the log and is routed by it, and every message decided before it lands
//! before. Memory and the log agree by construction (decision order is log order), and the
//! answer still waits for durability.
//!
//! **Backfill.** A `start: earliest` subscription opens a backfill cursor at offset 0 (in the
//! delivery state and the index alike). A task reads the matching topics' messages from the
//! cursor up to the durable end it finds at its first step (the index keeps each topic's
//! offsets, key `o`), a chunk at a time, and appends `Backfilled` records that put into the
//! inbox those not already routed to the agent (their `destinations` name it: every one
//! published after the subscription), not matching another `earliest` pattern of the agent
//! (whose own backfill takes them), not past their ttl and not below retention's truncation;
//! each record moves the cursor, the last one ends it. The cursor is durable, so a restart
//! resumes where it stood.

use std::sync::Arc;

use courier_storage::state::{BACKFILL_DONE, LATEST};
use courier_storage::{Backfill, Offset, Record, Slot};

use tokio::sync::watch;

use super::commit::{Commit, BACKFILL, SUBSCRIPTION};
use super::{Broker, Refusal, Result};
use crate::delivery::TopicView;
use crate::ids::{AgentId, TopicName, TopicPattern};

/// Most messages one `Backfilled` record considers.
const BACKFILL_CHUNK: usize = 1000;

/// What a subscribe did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscription {
    /// Whether it is new (an existing one is left as it is, and nothing is written).
    pub created: bool,
    /// Where the subscription started (the existing one's, if it existed).
    pub start: Start,
}

/// Where a new subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// With the messages published after it.
    Latest,
    /// With every message of its topics still in the log, then those published after it.
    Earliest,
}

impl Broker {
    /// Subscribes `agent` to the topics `pattern` matches, once the record is durable. An
    /// existing subscription is left as it is (nothing is written) and answered with its own
    /// start.
    pub async fn subscribe(
        self: &Arc<Self>,
        agent: &AgentId,
        pattern: &TopicPattern,
        start: Start,
    ) -> Result<Subscription> {
        let now = self.clock.now_ms();
        let key = (agent.to_string(), pattern.to_string());
        let decided = {
            let mut core = self.lock();
            core.registry.get(agent.as_str())?;
            if let Some(existing) = core.delivery.subscription_start(agent.as_str(), pattern) {
                let existing = if existing == LATEST {
                    Start::Latest
                } else {
                    Start::Earliest
                };
                Err((existing, core.subscribing.get(&key).cloned()))
            } else {
                let record = Record::Subscribed {
                    agent: key.0.clone(),
                    topic: key.1.clone(),
                    start: match start {
                        Start::Latest => LATEST,
                        Start::Earliest => Offset(0),
                    },
                };
                let commit = self.commit_now(&mut core, SUBSCRIPTION, now, vec![record])?;
                let (tx, rx) = watch::channel(false);
                core.subscribing.insert(key.clone(), rx.clone());
                Ok((commit, (tx, rx)))
            }
        };
        let (commit, (durable_tx, mine)) = match decided {
            Ok(decided) => decided,
            Err((existing, pending)) => {
                // Decided by another call and not durable yet: answer once it is.
                if let Some(mut pending) = pending {
                    pending.wait_for(|durable| *durable).await.map_err(|_| {
                        Refusal::Unavailable("the subscription's commit failed; retry".into())
                    })?;
                }
                return Ok(Subscription {
                    created: false,
                    start: existing,
                });
            }
        };
        // Awaited by a task of its own, so that a backfill starts once the record is durable
        // whether or not this caller still waits for the answer.
        let broker = self.clone();
        let (answer_tx, answer_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let durable = broker.subscribed(&key, commit, durable_tx, &mine).await;
            let ok = durable.is_ok();
            let _ = answer_tx.send(durable);
            if ok && start == Start::Earliest {
                broker.run_backfill(key.0, key.1).await;
            }
        });
        answer_rx.await.map_err(|_| {
            Refusal::Unavailable("the subscription's commit was dropped; retry".into())
        })??;
        Ok(Subscription {
            created: true,
            start,
        })
    }

    /// Waits for a subscription's record to be durable, then tells the calls waiting on it.
    async fn subscribed(
        &self,
        key: &(String, String),
        commit: Commit,
        durable_tx: watch::Sender<bool>,
        mine: &watch::Receiver<bool>,
    ) -> Result<()> {
        let durable = commit.durable().await.map(|_| ());
        {
            // Unless a later subscription of the same pattern took the place meanwhile.
            let mut core = self.lock();
            if core
                .subscribing
                .get(key)
                .is_some_and(|rx| rx.same_channel(mine))
            {
                core.subscribing.remove(key);
            }
        }
        if durable.is_ok() {
            durable_tx.send_replace(true);
        }
        durable
    }

    /// Ends a subscription of `agent`; `false` if it had none to `pattern`. Messages already
    /// routed to the agent stay in its inbox until settled.
    pub async fn unsubscribe(
        self: &Arc<Self>,
        agent: &AgentId,
        pattern: &TopicPattern,
    ) -> Result<bool> {
        let now = self.clock.now_ms();
        let commit = {
            let mut core = self.lock();
            core.registry.get(agent.as_str())?;
            if !core.delivery.is_subscribed(agent.as_str(), pattern) {
                return Ok(false);
            }
            let record = Record::Unsubscribed {
                agent: agent.to_string(),
                topic: pattern.to_string(),
            };
            self.commit_now(&mut core, SUBSCRIPTION, now, vec![record])?
        };
        commit.durable().await?;
        Ok(true)
    }

    /// The patterns `agent` is subscribed to, sorted.
    pub fn subscriptions(&self, agent: &AgentId) -> Result<Vec<TopicPattern>> {
        let core = self.lock();
        core.registry.get(agent.as_str())?;
        Ok(core
            .delivery
            .subscriptions_of(agent.as_str())
            .into_iter()
            .map(|(pattern, _)| pattern)
            .collect())
    }

    /// Every topic that messages were published to, by name, with its subscriber count.
    pub fn topics(&self) -> Vec<TopicView> {
        self.lock().delivery.topics()
    }

    /// Resumes the backfills that were under way when the server stopped (start-up).
    pub fn resume_backfills(self: &Arc<Self>) {
        let backfills = self.lock().delivery.backfills();
        for (agent, pattern) in backfills {
            tracing::info!(agent, pattern, "resuming the backfill of a subscription");
            tokio::spawn(self.clone().run_backfill(agent, pattern));
        }
    }

    /// Backfills `agent`'s subscription to `pattern` until done, unsubscribed or the log
    /// stops taking writes (then a restart resumes it).
    async fn run_backfill(self: Arc<Self>, agent: String, pattern: String) {
        loop {
            match self.backfill_step(&agent, &pattern).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(refusal) => {
                    tracing::warn!(agent, pattern, %refusal, "a backfill stopped; a restart resumes it");
                    return;
                }
            }
        }
    }

    /// One `Backfilled` record; whether there is more to do.
    async fn backfill_step(self: &Arc<Self>, agent: &str, pattern: &str) -> Result<bool> {
        let Ok(parsed) = TopicPattern::parse(pattern) else {
            return Ok(false);
        };
        let (next, topics, others) = {
            let core = self.lock();
            let Some(next) = core.delivery.backfill_of(agent, pattern) else {
                return Ok(false);
            };
            let topics = core.delivery.topics_matching(&parsed);
            // The agent's other `earliest` patterns: their own backfills take what they match.
            let others: Vec<TopicPattern> = core
                .delivery
                .subscriptions_of(agent)
                .into_iter()
                .filter(|(p, start)| *p != parsed && *start != LATEST)
                .map(|(p, _)| p)
                .collect();
            (next, topics, others)
        };
        // Every message decided before the subscription is below the durable end now.
        let end = self.log.durable_end();
        let broker = self.clone();
        let (offsets, frames, through) = tokio::task::spawn_blocking(move || {
            let index = broker.log.index();
            let mut offsets = Vec::new();
            for topic in &topics {
                offsets.extend(index.topic_offsets(topic, next, end, BACKFILL_CHUNK)?);
            }
            offsets.sort_unstable();
            offsets.truncate(BACKFILL_CHUNK);
            // Each topic gave all of its offsets below its chunk's last, so everything below
            // the merged chunk's last has been seen; a short chunk saw everything.
            let through = match offsets.last() {
                Some(last) if offsets.len() == BACKFILL_CHUNK => Offset(last.0 + 1),
                _ => BACKFILL_DONE,
            };
            let frames = broker.log.read_many(&offsets);
            Ok::<_, courier_storage::Error>((offsets, frames, through))
        })
        .await
        .map_err(|e| Refusal::Unavailable(format!("a backfill failed: {e}")))?
        .map_err(|e| Refusal::Unavailable(format!("a backfill could not read the index: {e}")))?;
        let now = self.clock.now_ms();
        let messages = to_backfill(agent, &others, offsets, frames, now)?;
        let commit = {
            let mut core = self.lock();
            // Unsubscribed, deleted or moved on meanwhile: this step is not wanted.
            if core.delivery.backfill_of(agent, pattern) != Some(next)
                || !core.registry.contains(agent)
            {
                return Ok(false);
            }
            let record = Record::Backfilled {
                inbox: agent.to_owned(),
                pattern: pattern.to_owned(),
                messages,
                through,
            };
            self.commit_now(&mut core, BACKFILL, now, vec![record])?
        };
        commit.durable().await?;
        Ok(through != BACKFILL_DONE)
    }
}

/// The messages of a backfill chunk that enter `agent`'s inbox: those still in the log, not
/// routed to it already, not matching its `others` `earliest` patterns and not past their
/// ttl.
fn to_backfill(
    agent: &str,
    others: &[TopicPattern],
    offsets: Vec<Offset>,
    frames: Vec<courier_storage::Result<courier_storage::Frame>>,
    now: u64,
) -> Result<Vec<Backfill>> {
    let mut messages = Vec::new();
    for (offset, frame) in offsets.into_iter().zip(frames) {
        let message = match frame {
            Ok(frame) => match frame.record {
                Record::Message(m) => m,
                _ => continue,
            },
            // Deleted by retention meanwhile: nothing to deliver.
            Err(courier_storage::Error::NotFound(_)) => continue,
            Err(e) => {
                return Err(Refusal::Unavailable(format!(
                    "a backfill could not read offset {offset}: {e}"
                )))
            }
        };
        let routed = message.destinations.iter().any(|d| d == agent);
        let elsewhere = courier_storage::state::topic_of(&message)
            .and_then(|t| TopicName::parse(t).ok())
            .is_some_and(|t| others.iter().any(|p| p.matches(&t)));
        let expired = message.expires_at_ms.is_some_and(|t| t <= now);
        if !routed && !elsewhere && !expired {
            messages.push(Backfill {
                slot: Slot {
                    offset,
                    priority: message.priority,
                },
                // A delay already over makes it ready at once.
                not_before_ms: message.not_before_ms.filter(|t| *t > now),
                expires_at_ms: message.expires_at_ms,
                ordering_key: message.ordering_key.clone(),
            });
        }
    }
    Ok(messages)
}
