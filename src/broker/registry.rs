//! Registered agents and their presence: who exists, when each was last seen, how many
//! long-polls each has open. Registrations are records (applied when durable); presence is
//! this process's memory only.

use std::collections::HashMap;
use std::sync::Arc;

use courier_storage::{Agent, Record};

use super::commit::{Commit, AGENT, UNHOLD};
use super::{millis, Broker, Core, Refusal, Result};
use crate::auth::{AgentTokens, Token, TokenHash};
use crate::delivery::Depth;
use crate::ids::AgentId;

/// A registered agent and what the server knows of it beyond the log.
#[derive(Debug, Clone)]
pub struct AgentView {
    /// The registration, as in the log.
    pub agent: Agent,
    /// When it last received or sent a heartbeat (this process only), epoch ms.
    pub last_seen_ms: Option<u64>,
    /// Whether it was seen within `presence_ttl`.
    pub online: bool,
    /// Inbox counts.
    pub depth: Depth,
    /// Receive calls open now.
    pub receivers: u32,
    /// Whether receives are held back by `max_in_flight` right now.
    pub throttled: bool,
}

/// One registered agent.
#[derive(Debug)]
pub(super) struct Registered {
    /// The registration, as in the log.
    pub(super) agent: Agent,
    /// The id, shared with listings.
    id: Arc<str>,
    /// When it was last seen (this process only), epoch ms.
    last_seen_ms: Option<u64>,
    /// Receive calls open now.
    receivers: u32,
    /// Its deletion is decided and on its way to disk: it takes no more publishes or
    /// receives (a message decided after the deletion would land in no inbox).
    deleting: bool,
}

/// Every registered agent, by id.
#[derive(Debug, Default)]
pub(super) struct Registry {
    agents: HashMap<String, Registered>,
}

impl Registry {
    /// The registered agent `id`, or the refusal that names it unknown.
    pub(super) fn get(&self, id: &str) -> Result<&Registered> {
        self.agents
            .get(id)
            .filter(|r| !r.deleting)
            .ok_or_else(|| Refusal::UnknownAgent(id.to_owned()))
    }

    /// Whether `id` is registered (and not being deleted).
    pub(super) fn contains(&self, id: &str) -> bool {
        self.get(id).is_ok()
    }

    /// The registration of `id`, if any.
    pub(super) fn agent(&self, id: &str) -> Option<&Agent> {
        self.get(id).ok().map(|r| &r.agent)
    }

    /// The deletion of `id` is decided: from now on it is as if unregistered.
    pub(super) fn deleting(&mut self, id: &str) {
        if let Some(registered) = self.agents.get_mut(id) {
            registered.deleting = true;
        }
    }

    /// Registers or updates an agent (presence is kept across updates).
    pub(super) fn upsert(&mut self, agent: Agent) {
        match self.agents.get_mut(&agent.id) {
            Some(registered) => registered.agent = agent,
            None => {
                let registered = Registered {
                    id: Arc::from(agent.id.as_str()),
                    agent,
                    last_seen_ms: None,
                    receivers: 0,
                    deleting: false,
                };
                self.agents.insert(registered.agent.id.clone(), registered);
            }
        }
    }

    /// Forgets an agent.
    pub(super) fn remove(&mut self, id: &str) {
        self.agents.remove(id);
    }

    /// When `id` was last seen (this process only), if it is registered and was.
    pub(super) fn last_seen(&self, id: &str) -> Option<u64> {
        self.get(id).ok()?.last_seen_ms
    }

    /// Whether a registered agent declares `capability`.
    pub(super) fn declared(&self, capability: &str) -> bool {
        self.agents
            .values()
            .any(|r| !r.deleting && r.agent.capabilities.iter().any(|c| c == capability))
    }

    /// The registered agents that declare `capability`, by id, with when each was last seen.
    pub(super) fn declaring(&self, capability: &str) -> Vec<(String, Option<u64>)> {
        let mut agents: Vec<(String, Option<u64>)> = self
            .agents
            .values()
            .filter(|r| !r.deleting && r.agent.capabilities.iter().any(|c| c == capability))
            .map(|r| (r.agent.id.clone(), r.last_seen_ms))
            .collect();
        agents.sort_unstable();
        agents
    }

    /// Every capability that registered agents declare, sorted, each once.
    pub(super) fn capabilities(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .agents
            .values()
            .filter(|r| !r.deleting)
            .flat_map(|r| r.agent.capabilities.iter().cloned())
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// Every registered id, sorted.
    pub(super) fn ids(&self) -> Vec<Arc<str>> {
        let mut ids: Vec<Arc<str>> = self
            .agents
            .values()
            .filter(|r| !r.deleting)
            .map(|r| r.id.clone())
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Marks `id` as seen at `now_ms`; whether it is registered.
    pub(super) fn seen(&mut self, id: &str, now_ms: u64) -> bool {
        self.agents
            .get_mut(id)
            .filter(|r| !r.deleting)
            .map(|r| r.last_seen_ms = Some(now_ms))
            .is_some()
    }

    /// Counts a receive call opening for `id` (which is seen now), unless `max` are open.
    pub(super) fn open_receive(&mut self, id: &str, max: u32, now_ms: u64) -> Result<()> {
        let registered = self
            .agents
            .get_mut(id)
            .filter(|r| !r.deleting)
            .ok_or_else(|| Refusal::UnknownAgent(id.to_owned()))?;
        if registered.receivers >= max {
            return Err(Refusal::TooManyReceivers {
                agent: id.to_owned(),
                open: registered.receivers,
            });
        }
        registered.receivers += 1;
        registered.last_seen_ms = Some(now_ms);
        Ok(())
    }

    /// Counts a receive call of `id` closing.
    pub(super) fn close_receive(&mut self, id: &str) {
        if let Some(registered) = self.agents.get_mut(id) {
            registered.receivers = registered.receivers.saturating_sub(1);
        }
    }
}

/// Makes `agent`'s token (or none) the one that authenticates it.
pub(super) fn note_token(tokens: &AgentTokens, agent: &Agent) {
    let Ok(id) = AgentId::parse(&agent.id) else {
        return;
    };
    let hash = agent.token_hash.as_deref().and_then(TokenHash::from_stored);
    tokens.set(&id, hash);
}

/// Whether a registration hands out a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tokens {
    /// No (`auth.mode = none`): registrations keep whatever token hash they have.
    Off,
    /// Yes, to an agent that has none yet (created, or registered while auth was off).
    Issue,
}

/// What [`Broker::upsert_agent`] did.
#[derive(Debug)]
pub struct Upserted {
    /// Whether the agent is new.
    pub created: bool,
    /// The token handed out with this registration, the only time it is shown.
    pub token: Option<Token>,
}

impl Broker {
    /// Registers or updates an agent (its token, if it has one, stays); with
    /// [`Tokens::Issue`], one without a token gets one.
    pub async fn upsert_agent(
        self: &Arc<Self>,
        mut agent: Agent,
        tokens: Tokens,
    ) -> Result<Upserted> {
        let _one_at_a_time = self.registrations.lock().await;
        let now = self.clock.now_ms();
        let (upserted, commit) = {
            let mut core = self.lock();
            let existing = core.registry.agent(&agent.id);
            let created = existing.is_none();
            agent.token_hash = existing.and_then(|a| a.token_hash.clone());
            let token = (tokens == Tokens::Issue && agent.token_hash.is_none()).then(|| {
                let token = Token::generate();
                agent.token_hash = Some(token.hash().to_stored());
                token
            });
            let commit = self.commit_upsert(&mut core, now, agent)?;
            (Upserted { created, token }, commit)
        };
        commit.durable().await?;
        Ok(upserted)
    }

    /// Gives `id` a new token; the old one stops working once this returns.
    pub async fn rotate_token(self: &Arc<Self>, id: &AgentId) -> Result<Token> {
        let _one_at_a_time = self.registrations.lock().await;
        let now = self.clock.now_ms();
        let (token, commit) = {
            let mut core = self.lock();
            let mut agent = core.registry.get(id.as_str())?.agent.clone();
            let token = Token::generate();
            agent.token_hash = Some(token.hash().to_stored());
            (token, self.commit_upsert(&mut core, now, agent)?)
        };
        commit.durable().await?;
        Ok(token)
    }

    /// The agent whose token hashes to `hash`, if any.
    pub fn agent_of_token(&self, hash: &TokenHash) -> Option<AgentId> {
        self.tokens.find(hash)
    }

    fn commit_upsert(self: &Arc<Self>, core: &mut Core, now: u64, agent: Agent) -> Result<Commit> {
        let tokens = self.tokens.clone();
        let record = Record::AgentUpserted(agent);
        self.commit_registration(core, now, record, move |core, record| {
            if let Record::AgentUpserted(agent) = record {
                note_token(&tokens, &agent);
                // Its open receives wait on the queues of its capabilities of now.
                core.waiters.wake(&[Arc::from(agent.id.as_str())]);
                core.registry.upsert(agent);
            }
        })
    }

    /// Removes an agent with its inbox and dead letters; `false` if it was not registered.
    pub async fn delete_agent(self: &Arc<Self>, id: &AgentId) -> Result<bool> {
        let _one_at_a_time = self.registrations.lock().await;
        let now = self.clock.now_ms();
        let commit = {
            let mut core = self.lock();
            if !core.registry.contains(id.as_str()) {
                return Ok(false);
            }
            // The queue leases it holds go back to their queues now, for the other agents.
            let released = core.delivery.release_held(id.as_str(), now);
            if !released.is_empty() {
                self.commit_now(&mut core, UNHOLD, now, released)?.detach();
            }
            let record = Record::AgentDeleted {
                agent: id.to_string(),
            };
            let tokens = self.tokens.clone();
            let commit =
                self.commit_registration(&mut core, now, record, move |core, record| {
                    if let Record::AgentDeleted { agent } = record {
                        if let Ok(id) = AgentId::parse(&agent) {
                            tokens.set(&id, None);
                        }
                        core.registry.remove(&agent);
                        core.admission.forget(&agent);
                        // Its open long-polls return (and find no agent).
                        core.waiters.remove(&agent);
                    }
                })?;
            // Under the same lock: no publish to it is decided after the deletion.
            core.registry.deleting(id.as_str());
            commit
        };
        commit.durable().await?;
        Ok(true)
    }

    /// Commits a registration record; once it is durable (a registration is never seen
    /// before), applies it to the delivery state and lets `update` change the registry.
    fn commit_registration(
        self: &Arc<Self>,
        core: &mut Core,
        now: u64,
        record: Record,
        update: impl FnOnce(&mut Core, Record) + Send + 'static,
    ) -> Result<Commit> {
        let records = vec![record.clone()];
        self.commit_when_durable(core, AGENT, now, records, move |core, appended| {
            core.delivery.apply(&record, appended.first, now);
            update(core, record);
            Vec::new()
        })
    }

    /// Whether an agent last seen at `last_seen_ms` is online at `now`: seen within
    /// `presence_ttl`.
    pub(super) fn is_online(&self, last_seen_ms: Option<u64>, now: u64) -> bool {
        let ttl = millis(self.config.presence_ttl);
        last_seen_ms.is_some_and(|seen| now.saturating_sub(seen) <= ttl)
    }

    fn view(&self, core: &Core, registered: &Registered, now: u64) -> AgentView {
        let policy = self.policy(Some(&registered.agent));
        AgentView {
            agent: registered.agent.clone(),
            last_seen_ms: registered.last_seen_ms,
            online: self.is_online(registered.last_seen_ms, now),
            depth: core.delivery.depth(&registered.agent.id),
            receivers: registered.receivers,
            throttled: core.delivery.at_cap(&registered.agent.id, &policy),
        }
    }

    /// One agent, if registered.
    pub fn agent(&self, id: &AgentId) -> Option<AgentView> {
        let now = self.clock.now_ms();
        let core = self.lock();
        let registered = core.registry.get(id.as_str()).ok()?;
        Some(self.view(&core, registered, now))
    }

    /// Every agent (with `capability`, if given), by id. Read in chunks, so the lock that
    /// the log's completions also take is never held for all agents at once.
    pub fn agents(&self, capability: Option<&str>) -> Vec<AgentView> {
        let now = self.clock.now_ms();
        let ids = self.lock().registry.ids();
        let mut views = Vec::new();
        for chunk in ids.chunks(256) {
            let core = self.lock();
            let registered = chunk.iter().filter_map(|id| core.registry.get(id).ok());
            views.extend(
                registered
                    .filter(|r| {
                        capability.is_none_or(|c| r.agent.capabilities.iter().any(|x| x == c))
                    })
                    .map(|r| self.view(&core, r, now)),
            );
        }
        views
    }

    /// Marks an agent as seen now; `None` if it is not registered.
    pub fn heartbeat(&self, id: &AgentId) -> Option<AgentView> {
        let now = self.clock.now_ms();
        let mut core = self.lock();
        if !core.registry.seen(id.as_str(), now) {
            return None;
        }
        let registered = core.registry.get(id.as_str()).ok()?;
        Some(self.view(&core, registered, now))
    }
}
