//! Topics: subscriptions (records), the backfill of `start: earliest` subscriptions, and the
//! topics seen. Which agents a topic message goes to is decided in [`super::publish`], from
//! the subscriptions in the delivery state when the publish is decided.
//!
//! **Backfill.** An `earliest` subscription is routed from its decision on (applied at
//! once), so every message decided after it lands after its `Subscribed` record in the log
//! and is routed to the agent, and every message below the record was decided before it.
//! Once the record is durable, its offset is the end of a backfill cursor (in the delivery
//! state and the index alike): a task reads the matching topics' messages below the end from
//! the index's topic keys, a chunk at a time, and appends `Backfilled` records that put into
//! the inbox those not already routed to the agent (by another pattern) and not past their
//! ttl, moving the cursor. The cursor is durable, so a restart resumes where it stood.

use std::sync::Arc;

use courier_storage::{Backfill, Offset, Record, Slot};

use super::commit::{Commit, BACKFILL, SUBSCRIPTION};
use super::{Broker, Core, Refusal, Result};
use crate::delivery::TopicView;
use crate::ids::{AgentId, TopicName, TopicPattern};

/// Most messages one `Backfilled` record considers.
const BACKFILL_CHUNK: usize = 1000;

/// Where a new subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// With the messages published after it.
    Latest,
    /// With every message of its topics still in the log, then those published after it.
    Earliest,
}

impl Broker {
    /// Subscribes `agent` to the topics `pattern` matches; returns whether the subscription
    /// is new (an existing one is left as it is, and nothing is written).
    pub async fn subscribe(
        self: &Arc<Self>,
        agent: &AgentId,
        pattern: &TopicPattern,
        start: Start,
    ) -> Result<bool> {
        let now = self.clock.now_ms();
        let commit = {
            let mut core = self.lock();
            core.registry.get(agent.as_str())?;
            if core.delivery.is_subscribed(agent.as_str(), pattern) {
                return Ok(false);
            }
            let start_offset = match start {
                Start::Latest => self.log.durable_end(),
                Start::Earliest => Offset(0),
            };
            let record = Record::Subscribed {
                agent: agent.to_string(),
                topic: pattern.to_string(),
                start: start_offset,
            };
            if start == Start::Earliest {
                self.check_writable()?;
                // Routed from now on (see the module's doc); applied again with its offset
                // once durable, which sets the backfill's end.
                core.delivery.apply(&record, Offset(0), now);
            }
            self.commit_subscription(&mut core, now, record)?
        };
        commit.durable().await?;
        if start == Start::Earliest {
            tokio::spawn(
                self.clone()
                    .run_backfill(agent.to_string(), pattern.to_string()),
            );
        }
        Ok(true)
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
        let (cursor, topics) = {
            let core = self.lock();
            let topics: Vec<String> = core
                .delivery
                .topics()
                .into_iter()
                .filter(|t| TopicName::parse(&t.name).is_ok_and(|n| parsed.matches(&n)))
                .map(|t| t.name)
                .collect();
            (core.delivery.backfill_of(agent, pattern), topics)
        };
        let Some((next, end)) = cursor else {
            return Ok(false);
        };
        let broker = self.clone();
        let (offsets, frames, through) = tokio::task::spawn_blocking(move || {
            // Every message below `end` is durable; the index has them once it caught up.
            let index = broker.log.index();
            let mut offsets = Vec::new();
            for topic in &topics {
                offsets.extend(index.topic_offsets(topic, next, end, BACKFILL_CHUNK)?);
            }
            offsets.sort_unstable();
            offsets.truncate(BACKFILL_CHUNK);
            // Each topic gave all of its offsets below its chunk's last, so everything below
            // the merged chunk's last has been seen.
            let through = match offsets.last() {
                Some(last) if offsets.len() == BACKFILL_CHUNK => Offset(last.0 + 1),
                _ => end,
            };
            let frames = broker.log.read_many(&offsets);
            Ok::<_, courier_storage::Error>((offsets, frames, through))
        })
        .await
        .map_err(|e| Refusal::Unavailable(format!("a backfill failed: {e}")))?
        .map_err(|e| Refusal::Unavailable(format!("a backfill could not read the index: {e}")))?;
        let now = self.clock.now_ms();
        let messages = to_backfill(agent, offsets, frames, now)?;
        let commit = {
            let mut core = self.lock();
            // Unsubscribed, deleted or moved on meanwhile: this step is not wanted.
            if core.delivery.backfill_of(agent, pattern) != Some((next, end))
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
        Ok(through < end)
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
            self.commit_subscription(&mut core, now, record)?
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

    /// Commits a subscription change; applied to the delivery state once durable, so a
    /// publish routes by it only after it is on disk (and after it in the log).
    fn commit_subscription(
        self: &Arc<Self>,
        core: &mut Core,
        now: u64,
        record: Record,
    ) -> Result<Commit> {
        let records = vec![record.clone()];
        self.commit_when_durable(core, SUBSCRIPTION, now, records, move |core, appended| {
            core.delivery.apply(&record, appended.first, now);
            Vec::new()
        })
    }
}

/// The messages of a backfill chunk that enter `agent`'s inbox: those still in the log, not
/// routed to it already (by another pattern) and not past their ttl.
fn to_backfill(
    agent: &str,
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
        let expired = message.expires_at_ms.is_some_and(|t| t <= now);
        if !routed && !expired {
            messages.push(Backfill {
                slot: Slot {
                    offset,
                    priority: message.priority,
                },
                // A delay already over makes it ready at once.
                not_before_ms: message.not_before_ms.filter(|t| *t > now),
                expires_at_ms: message.expires_at_ms,
            });
        }
    }
    Ok(messages)
}
