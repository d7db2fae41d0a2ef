//! Capability queues as operators see them: which capabilities exist (declared by an agent,
//! or sent to), each queue's counts, and the agents that declare it. The queues themselves
//! are inboxes of the delivery state named `capability:<name>`; receives draw from them in
//! [`super::consume`].

use std::collections::BTreeSet;

use courier_storage::state::{queue_inbox, queue_of};

use super::{Broker, Core, Refusal, Result};
use crate::delivery::Depth;
use crate::ids::CapabilityName;

/// A capability queue and the agents that can take its messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapabilityView {
    /// The capability.
    pub name: String,
    /// The queue's counts (ready includes delayed messages).
    pub depth: Depth,
    /// The registered agents that declare it, by id.
    pub agents: Vec<String>,
    /// How many of them were seen within `presence_ttl`.
    pub online: usize,
}

impl Broker {
    /// Every capability that an agent declares or that messages were sent to, by name.
    pub fn capabilities(&self) -> Vec<CapabilityView> {
        let now = self.clock.now_ms();
        let core = self.lock();
        let mut names: BTreeSet<String> = core.registry.capabilities().into_iter().collect();
        names.extend(
            core.delivery
                .queue_names()
                .filter_map(|queue| queue_of(queue).map(str::to_owned)),
        );
        names
            .into_iter()
            .map(|name| self.capability_view(&core, name, now))
            .collect()
    }

    /// One capability, or the refusal that names it unknown (no agent declares it and no
    /// message was sent to it).
    pub fn capability(&self, name: &CapabilityName) -> Result<CapabilityView> {
        let now = self.clock.now_ms();
        let core = self.lock();
        let known = core.registry.declared(name.as_str())
            || core.delivery.has_inbox(&queue_inbox(name.as_str()));
        if !known {
            return Err(Refusal::UnknownCapability(name.to_string()));
        }
        Ok(self.capability_view(&core, name.to_string(), now))
    }

    fn capability_view(&self, core: &Core, name: String, now: u64) -> CapabilityView {
        let declaring = core.registry.declaring(&name);
        let online = declaring
            .iter()
            .filter(|(_, seen)| self.is_online(*seen, now))
            .count();
        CapabilityView {
            depth: core.delivery.depth(&queue_inbox(&name)),
            agents: declaring.into_iter().map(|(id, _)| id).collect(),
            online,
            name,
        }
    }
}
