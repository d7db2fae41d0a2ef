//! Who is calling (SPEC §7), without HTTP: bearer tokens, their hashes, the table that finds
//! an agent by its token's hash, and the admin token's file. The HTTP side (which route
//! needs whom, 401 and 403) is [`crate::api::access`].
//!
//! A token is `cour_` and 64 hex digits (256 random bits). Only its SHA-256 is kept, in the
//! agent's registration record and in memory; looking an agent up by that hash takes the
//! same time whatever the token, and the admin token's hash is compared in constant time.

mod admin;
mod token;

pub use admin::load_admin_token;
pub use token::{constant_time_eq, Token, TokenHash, TOKEN_PREFIX};

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

use crate::ids::AgentId;

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// `auth.mode = none`: anyone who reaches the port, allowed everything.
    Anyone,
    /// The holder of the admin token.
    Admin,
    /// An agent, by its own token.
    Agent(AgentId),
}

impl Principal {
    /// Whether this principal may act as `agent` (its own routes, publishing as it): the
    /// agent itself, the admin, or anyone when auth is off.
    pub fn may_act_as(&self, agent: &str) -> bool {
        match self {
            Self::Anyone | Self::Admin => true,
            Self::Agent(id) => id.as_str() == agent,
        }
    }
}

/// The agents' token hashes, for finding the agent a token belongs to. Written by the
/// broker when a registration is durable, read by every authenticated request.
#[derive(Debug, Default)]
pub struct AgentTokens(RwLock<Table>);

#[derive(Debug, Default)]
struct Table {
    by_hash: HashMap<TokenHash, AgentId>,
    by_agent: HashMap<AgentId, TokenHash>,
}

impl AgentTokens {
    /// The agent whose token hashes to `hash`.
    pub fn find(&self, hash: &TokenHash) -> Option<AgentId> {
        let table = self.0.read().unwrap_or_else(PoisonError::into_inner);
        table.by_hash.get(hash).cloned()
    }

    /// `agent`'s token is now `hash` (`None`: it has none); its earlier one stops working.
    pub fn set(&self, agent: &AgentId, hash: Option<TokenHash>) {
        let mut table = self.0.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = table.by_agent.remove(agent) {
            table.by_hash.remove(&old);
        }
        if let Some(hash) = hash {
            table.by_hash.insert(hash, agent.clone());
            table.by_agent.insert(agent.clone(), hash);
        }
    }
}
