//! Validated names: agent ids, message ids and addresses (SPEC §2, §3).
//!
//! Functions past the API take these types, not `&str`, so that an unchecked name cannot
//! reach the log.

use std::fmt;

/// An agent id: 1–64 chars of `[a-z0-9._-]`, starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentId(String);

impl AgentId {
    /// Checks `text`; the error says what is wrong and what would be right.
    pub fn parse(text: &str) -> Result<Self, String> {
        let valid_char =
            |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-');
        let starts_well = text
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if text.is_empty() || text.len() > 64 || !starts_well || !text.chars().all(valid_char) {
            return Err(format!(
                "{text:?} is not a valid agent id: use 1-64 characters of a-z, 0-9, '.', '_' and '-', starting with a letter or digit"
            ));
        }
        Ok(Self(text.to_owned()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a client message id (idempotency key): 1–128 chars of `[A-Za-z0-9._:-]`.
pub fn check_message_id(field: &str, text: &str) -> Result<(), String> {
    let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
    if text.is_empty() || text.len() > 128 || !text.chars().all(valid_char) {
        return Err(format!(
            "`{field}` {text:?} is not a valid message id: use 1-128 characters of A-Z, a-z, 0-9, '.', '_', ':' and '-'"
        ));
    }
    Ok(())
}

/// A destination address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// `agent:<id>`: that agent's inbox.
    Agent(AgentId),
    /// `topic:<name>`: every subscriber of the topic.
    Topic(TopicName),
    /// `capability:<name>`: one of the agents that declare the capability.
    Capability(CapabilityName),
}

impl Address {
    /// Parses `agent:<id>`, `topic:<name>` or `capability:<name>`. Capability names follow
    /// the agent id rules, plus `/` and `:` inside; topic names are [`TopicName`]s.
    pub fn parse(text: &str) -> Result<Self, String> {
        let Some((kind, name)) = text.split_once(':') else {
            return Err(format!(
                "`to` {text:?} is not an address: write agent:<id>, topic:<name> or capability:<name>"
            ));
        };
        match kind {
            "agent" => AgentId::parse(name).map(Self::Agent),
            "topic" => TopicName::parse(name).map(Self::Topic),
            "capability" => CapabilityName::parse(name).map(Self::Capability),
            _ => Err(format!(
                "`to` {text:?} has the unknown kind {kind:?}: use agent:, topic: or capability:"
            )),
        }
    }
}

/// A capability name: 1–128 chars of `[a-z0-9._/:-]`, starting with a letter or digit. An
/// agent declares capabilities by these names, and `capability:<name>` addresses the queue
/// of one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CapabilityName(String);

impl CapabilityName {
    /// Checks `text`; the error says what is wrong and what would be right.
    pub fn parse(text: &str) -> Result<Self, String> {
        check_name("capability", text).map(|()| Self(text.to_owned()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CapabilityName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a topic name or pattern segment may be made of: `[a-z0-9_-]`, at least one.
fn is_plain_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// A topic name (SPEC §2): 1–128 characters, segments of `[a-z0-9_-]` joined by `.`
/// (`tasks.eu.created`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(String);

impl TopicName {
    /// Checks `text`; the error says what is wrong and what would be right.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() || text.len() > 128 || !text.split('.').all(is_plain_segment) {
            return Err(format!(
                "{text:?} is not a valid topic name: use 1-128 characters, segments of a-z, 0-9, '_' and '-' joined by '.' (tasks.eu.created)"
            ));
        }
        Ok(Self(text.to_owned()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A subscription pattern (SPEC §2): a topic name whose segments may also be `*` (exactly
/// one segment) or, as the last one, `>` (one or more trailing segments), as NATS subjects.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPattern(String);

impl TopicPattern {
    /// Checks `text`; the error says what is wrong and what would be right.
    pub fn parse(text: &str) -> Result<Self, String> {
        let segments: Vec<&str> = text.split('.').collect();
        let last = segments.len() - 1;
        let valid = segments
            .iter()
            .enumerate()
            .all(|(i, s)| is_plain_segment(s) || *s == "*" || (*s == ">" && i == last));
        if text.is_empty() || text.len() > 128 || !valid {
            return Err(format!(
                "{text:?} is not a valid subscription pattern: use a topic name (segments of a-z, 0-9, '_' and '-' joined by '.', 1-128 characters) whose segments may be '*' for exactly one segment, and whose last segment may be '>' for one or more (tasks.*.created, tasks.>)"
            ));
        }
        Ok(Self(text.to_owned()))
    }

    /// The pattern as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `topic` matches: `*` stands for one segment, a final `>` for one or more.
    pub fn matches(&self, topic: &TopicName) -> bool {
        let mut names = topic.0.split('.');
        for segment in self.0.split('.') {
            match (segment, names.next()) {
                (">", Some(_)) => return true,
                ("*", Some(_)) => {}
                (literal, Some(name)) if literal == name => {}
                _ => return false,
            }
        }
        names.next().is_none()
    }
}

impl fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn check_name(kind: &str, name: &str) -> Result<(), String> {
    let valid_char = |c: char| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-' | '/' | ':')
    };
    let starts_well = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if name.is_empty() || name.len() > 128 || !starts_well || !name.chars().all(valid_char) {
        return Err(format!(
            "{name:?} is not a valid {kind} name: use 1-128 characters of a-z, 0-9, '.', '_', '-', '/' and ':', starting with a letter or digit"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids_follow_the_spec() {
        for good in ["a", "planner", "agent-7.b_c", "0x", &"a".repeat(64)] {
            assert!(AgentId::parse(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", ".a", "A", "a b", "é", "a/b", &"a".repeat(65)] {
            let error = AgentId::parse(bad).unwrap_err();
            assert!(error.contains("1-64 characters"), "{bad}: {error}");
        }
    }

    #[test]
    fn message_ids_follow_the_spec() {
        assert!(check_message_id("id", "Order:42.b_c-d").is_ok());
        assert!(check_message_id("id", &"x".repeat(128)).is_ok());
        for bad in ["", "a b", "a/b", &"x".repeat(129)] {
            assert!(check_message_id("id", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn addresses_parse_by_kind() {
        assert_eq!(
            Address::parse("agent:planner"),
            Ok(Address::Agent(AgentId::parse("planner").unwrap()))
        );
        assert_eq!(
            Address::parse("topic:news.eu"),
            Ok(Address::Topic(TopicName::parse("news.eu").unwrap()))
        );
        assert_eq!(
            Address::parse("capability:summarize"),
            Ok(Address::Capability(
                CapabilityName::parse("summarize").unwrap()
            ))
        );
        for bad in [
            "planner",
            "agent:",
            "agent:Bad",
            "queue:x",
            "topic:",
            ":x",
            "topic:a/b",
        ] {
            assert!(Address::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn topic_names_follow_the_spec() {
        for good in ["a", "tasks.eu.created", "x_1-b.c", &"a".repeat(128)] {
            assert!(TopicName::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "a.",
            ".a",
            "a..b",
            "A",
            "a b",
            "a/b",
            "a.*",
            "a.>",
            &"a".repeat(129),
        ] {
            let error = TopicName::parse(bad).unwrap_err();
            assert!(error.contains("segments of a-z"), "{bad}: {error}");
        }
    }

    #[test]
    fn patterns_follow_the_spec() {
        for good in ["a", "tasks.*.created", "tasks.>", "*", ">", "*.>", "a.*.*"] {
            assert!(TopicPattern::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a.>.b",
            ">.a",
            "a*",
            "a.>>",
            "a..b",
            "a.",
            "A.*",
            &"a".repeat(129),
        ] {
            assert!(TopicPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn patterns_match_as_nats_subjects_do() {
        let cases = [
            ("tasks.eu.created", "tasks.eu.created", true),
            ("tasks.eu.created", "tasks.eu", false),
            ("tasks.eu", "tasks.eu.created", false),
            ("tasks.*.created", "tasks.eu.created", true),
            ("tasks.*.created", "tasks.eu.deleted", false),
            ("tasks.*.created", "tasks.created", false),
            ("tasks.*", "tasks.eu.created", false),
            ("tasks.>", "tasks.eu", true),
            ("tasks.>", "tasks.eu.created", true),
            ("tasks.>", "tasks", false),
            (">", "a", true),
            (">", "a.b.c", true),
            ("*", "a", true),
            ("*", "a.b", false),
            ("*.>", "a", false),
            ("*.>", "a.b", true),
        ];
        for (pattern, topic, expected) in cases {
            let p = TopicPattern::parse(pattern).unwrap();
            let t = TopicName::parse(topic).unwrap();
            assert_eq!(p.matches(&t), expected, "{pattern} ~ {topic}");
        }
    }
}
