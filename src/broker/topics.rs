//! Topics: subscriptions (records, applied when durable like registrations) and the topics
//! seen. Which agents a topic message goes to is decided in [`super::publish`], from the
//! subscriptions in the delivery state when the publish is decided.

use std::sync::Arc;

use courier_storage::Record;

use super::commit::{Commit, SUBSCRIPTION};
use super::{Broker, Core, Result};
use crate::delivery::TopicView;
use crate::ids::{AgentId, TopicPattern};

/// Where a new subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// With the messages published after it.
    Latest,
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
        let Start::Latest = start;
        let now = self.clock.now_ms();
        let commit = {
            let mut core = self.lock();
            core.registry.get(agent.as_str())?;
            if core.delivery.is_subscribed(agent.as_str(), pattern) {
                return Ok(false);
            }
            let record = Record::Subscribed {
                agent: agent.to_string(),
                topic: pattern.to_string(),
                start: self.log.durable_end(),
            };
            self.commit_subscription(&mut core, now, record)?
        };
        commit.durable().await?;
        Ok(true)
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
