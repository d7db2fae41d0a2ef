//! Routing state: the subscriptions of each agent and the topics messages were published
//! to. Changed only by records (`Subscribed`, `Unsubscribed`, `AgentDeleted`, `Message`),
//! through the one state machine, like the rest of [`State`].

use courier_storage::state::TopicSeen;
use courier_storage::Offset;

use super::State;
use crate::ids::{TopicName, TopicPattern};

/// A topic with what is known of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicView {
    /// The name.
    pub name: String,
    /// Messages published to it, and the latest offset.
    pub seen: TopicSeen,
    /// Agents subscribed to it now (by any of their patterns).
    pub subscribers: usize,
}

impl State {
    /// The agents subscribed to `topic` now, each once however many of its patterns match,
    /// sorted by id.
    pub fn subscribers(&self, topic: &TopicName) -> Vec<String> {
        self.subscriptions
            .iter()
            .filter(|(_, patterns)| patterns.keys().any(|p| p.matches(topic)))
            .map(|(agent, _)| agent.clone())
            .collect()
    }

    /// The subscriptions of `agent`: each pattern and the first offset it covers.
    pub fn subscriptions_of(&self, agent: &str) -> Vec<(TopicPattern, Offset)> {
        self.subscriptions
            .get(agent)
            .map(|patterns| patterns.iter().map(|(p, o)| (p.clone(), *o)).collect())
            .unwrap_or_default()
    }

    /// The start of `agent`'s subscription to `pattern`, if it has one.
    pub fn subscription_start(&self, agent: &str, pattern: &TopicPattern) -> Option<Offset> {
        self.subscriptions.get(agent)?.get(pattern).copied()
    }

    /// Whether `agent` is subscribed to `pattern`.
    pub fn is_subscribed(&self, agent: &str, pattern: &TopicPattern) -> bool {
        self.subscriptions
            .get(agent)
            .is_some_and(|patterns| patterns.contains_key(pattern))
    }

    /// Every topic that messages were published to, by name, with its subscriber count.
    pub fn topics(&self) -> Vec<TopicView> {
        self.topics
            .iter()
            .map(|(name, seen)| TopicView {
                name: name.clone(),
                seen: *seen,
                subscribers: TopicName::parse(name)
                    .map(|topic| self.subscribers(&topic).len())
                    .unwrap_or(0),
            })
            .collect()
    }

    /// Where the backfill of `agent`'s subscription to `pattern` stands (the next offset to
    /// consider), if one is under way.
    pub fn backfill_of(&self, agent: &str, pattern: &str) -> Option<Offset> {
        self.backfills
            .get(&(agent.to_owned(), pattern.to_owned()))
            .copied()
    }

    /// Every backfill under way: (agent, pattern).
    pub fn backfills(&self) -> Vec<(String, String)> {
        self.backfills.keys().cloned().collect()
    }

    /// The names of the topics seen that `pattern` matches.
    pub fn topics_matching(&self, pattern: &TopicPattern) -> Vec<String> {
        self.topics
            .keys()
            .filter(|name| TopicName::parse(name).is_ok_and(|topic| pattern.matches(&topic)))
            .cloned()
            .collect()
    }

    /// Loads a backfill under way as the index holds it (start-up).
    pub fn load_backfill(&mut self, agent: &str, pattern: &str, next: Offset) {
        self.backfills
            .insert((agent.to_owned(), pattern.to_owned()), next);
    }

    /// Loads a subscription as the index holds it (start-up).
    pub fn load_subscription(&mut self, agent: &str, pattern: &str, start: Offset) {
        self.add_subscription(agent, pattern, start);
    }

    /// Loads a topic as the index holds it (start-up).
    pub fn load_topic(&mut self, name: &str, seen: TopicSeen) {
        self.topics.insert(name.to_owned(), seen);
    }

    pub(super) fn add_subscription(&mut self, agent: &str, pattern: &str, start: Offset) {
        match TopicPattern::parse(pattern) {
            Ok(pattern) => {
                self.subscriptions
                    .entry(agent.to_owned())
                    .or_default()
                    .insert(pattern, start);
            }
            // Only patterns the API checked are ever written.
            Err(why) => tracing::warn!(agent, why, "a stored subscription is ignored"),
        }
    }

    pub(super) fn remove_subscription(&mut self, agent: &str, pattern: &str) {
        let Ok(pattern) = TopicPattern::parse(pattern) else {
            return;
        };
        if let Some(patterns) = self.subscriptions.get_mut(agent) {
            patterns.remove(&pattern);
            if patterns.is_empty() {
                self.subscriptions.remove(agent);
            }
        }
    }

    pub(super) fn remove_subscriptions(&mut self, agent: &str) {
        self.subscriptions.remove(agent);
    }

    pub(super) fn count_topic(&mut self, name: &str, offset: Offset) {
        let seen = self.topics.entry(name.to_owned()).or_default();
        seen.messages += 1;
        seen.last_offset = offset;
    }
}
