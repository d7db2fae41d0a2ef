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
    Topic(String),
    /// `capability:<name>`: one of the agents that declare the capability.
    Capability(String),
}

impl Address {
    /// Parses `agent:<id>`, `topic:<name>` or `capability:<name>`. Topic and capability
    /// names follow the agent id rules, plus `/` and `:` inside.
    pub fn parse(text: &str) -> Result<Self, String> {
        let Some((kind, name)) = text.split_once(':') else {
            return Err(format!(
                "`to` {text:?} is not an address: write agent:<id>, topic:<name> or capability:<name>"
            ));
        };
        match kind {
            "agent" => AgentId::parse(name).map(Self::Agent),
            "topic" => check_name("topic", name).map(|()| Self::Topic(name.to_owned())),
            "capability" => {
                check_name("capability", name).map(|()| Self::Capability(name.to_owned()))
            }
            _ => Err(format!(
                "`to` {text:?} has the unknown kind {kind:?}: use agent:, topic: or capability:"
            )),
        }
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
            Address::parse("topic:news/eu"),
            Ok(Address::Topic("news/eu".into()))
        );
        assert_eq!(
            Address::parse("capability:summarize"),
            Ok(Address::Capability("summarize".into()))
        );
        for bad in ["planner", "agent:", "agent:Bad", "queue:x", "topic:", ":x"] {
            assert!(Address::parse(bad).is_err(), "{bad}");
        }
    }
}
