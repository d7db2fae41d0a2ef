//! Consuming: long-poll receives under leases, acks, nacks and extends, dead letters and
//! their redrive. Decisions are [`crate::delivery::State`]'s; every one is committed now
//! (the records touch only messages already in memory) and answered once durable.

use std::sync::Arc;
use std::time::Duration;

use courier_storage::index::DeadEntry;
use courier_storage::state::queue_inbox;
use courier_storage::{Agent, Frame, Offset, Record};
use tokio::sync::Notify;

use super::commit::{Commit, ACK, DEAD_LETTER, EXTEND, LEASE, NACK, REDRIVE};
use super::{millis, Broker, Core, Refusal, Result};
use crate::delivery::{self, Draw, Outcome, Receipt, Settle};
use crate::ids::{AgentId, CapabilityName};
use crate::telemetry::spans::{self, Kind, Recording};

/// What a receive asks for.
#[derive(Debug, Clone, Copy)]
pub struct ReceiveRequest {
    /// Most messages to return.
    pub max: usize,
    /// How long to wait for the first one.
    pub wait: Duration,
    /// Lease length; `None`: the agent's, else the server's.
    pub lease_ms: Option<u64>,
}

/// A message handed out under a lease.
#[derive(Debug)]
pub struct Delivered {
    /// The message record and its offset and time.
    pub frame: Frame,
    /// Delivery number (1 for the first).
    pub attempt: u32,
    /// The receipt to ack, nack or extend with.
    pub receipt: String,
    /// When the lease ends, epoch ms.
    pub lease_deadline_ms: u64,
}

/// A dead letter with its message.
#[derive(Debug)]
pub struct DeadView {
    /// The message record.
    pub frame: Frame,
    /// Why and when it died.
    pub dead: DeadEntry,
}

/// Records a message's delivery as the span `deliver`, in the trace of the `traceparent`
/// stored with it (see [`spans::delivered`]).
fn delivered_span(frame: &Frame, attempt: u32) {
    let Record::Message(message) = &frame.record else {
        return;
    };
    let traceparent = message
        .headers
        .iter()
        .find(|(name, _)| name == "traceparent")
        .map(|(_, value)| value.as_str());
    spans::delivered(traceparent, |span| {
        span.text("messaging.message.id", &message.id);
        span.int("courier.offset", frame.offset.0);
        span.int("courier.attempt", attempt.into());
    });
}

/// Counts an open receive call while it lives.
struct OpenReceive<'a> {
    broker: &'a Broker,
    agent: &'a AgentId,
}

impl Drop for OpenReceive<'_> {
    fn drop(&mut self) {
        self.broker
            .lock()
            .registry
            .close_receive(self.agent.as_str());
    }
}

impl Broker {
    /// Long-poll: leases up to `max` ready messages of `agent`'s inbox and of the queues of
    /// the capabilities it declares, waiting up to `wait` for the first. Wakes on the commit
    /// that makes a message ready in one of them (or changes the agent), never by polling.
    pub async fn receive(
        self: &Arc<Self>,
        agent: &AgentId,
        request: ReceiveRequest,
    ) -> Result<Vec<Delivered>> {
        let mut notifies = {
            let mut core = self.lock();
            let now = self.clock.now_ms();
            let max = self.config.limits.max_receivers;
            core.registry.open_receive(agent.as_str(), max, now)?;
            wake_ups(&mut core, agent)
        };
        let _open = OpenReceive {
            broker: self,
            agent,
        };
        let _waiting = self.metrics.long_poll();
        let mut closing = self.closing.subscribe();
        let deadline = tokio::time::Instant::now() + request.wait;
        loop {
            let mut notified: Vec<_> = notifies.iter().map(|n| Box::pin(n.notified())).collect();
            for n in &mut notified {
                n.as_mut().enable();
            }
            if let Some(leased) = self.try_lease(agent, request)? {
                return self.deliver(leased).await;
            }
            if *closing.borrow_and_update() {
                return Ok(Vec::new());
            }
            tokio::select! {
                _ = futures_util::future::select_all(notified.iter_mut()) => {}
                () = tokio::time::sleep_until(deadline) => return Ok(Vec::new()),
                _ = closing.changed() => return Ok(Vec::new()),
            }
            drop(notified);
            // The agent's capabilities may have changed: wait on its queues of now.
            notifies = wake_ups(&mut self.lock(), agent);
        }
    }

    /// Leases what is ready now, if anything: decided, applied and submitted under the lock.
    fn try_lease(
        self: &Arc<Self>,
        agent: &AgentId,
        request: ReceiveRequest,
    ) -> Result<Option<(Vec<Draw>, Commit)>> {
        let now = self.clock.now_ms();
        let mut core = self.lock();
        let registered = core.registry.get(agent.as_str())?;
        let policy = self.policy(Some(&registered.agent));
        let lease_ms = request
            .lease_ms
            .unwrap_or_else(|| self.lease_of(&registered.agent));
        let queues = queues_of(&registered.agent);
        let draws =
            core.delivery
                .lease(agent.as_str(), &queues, request.max, now, lease_ms, &policy);
        if draws.is_empty() {
            return Ok(None);
        }
        let records = delivery::State::lease_records(agent.as_str(), &draws);
        let commit = self.commit_now(&mut core, LEASE, now, records)?;
        Ok(Some((draws, commit)))
    }

    /// The lease an extend without `lease_ms` gets: the agent's, else the server's.
    pub fn lease_ms_of(&self, agent: &AgentId) -> u64 {
        let core = self.lock();
        core.registry
            .agent(agent.as_str())
            .map_or_else(|| millis(self.config.lease), |a| self.lease_of(a))
    }

    /// The lease of `agent`'s deliveries: its own `lease_ms`, else the server's `lease`.
    fn lease_of(&self, agent: &Agent) -> u64 {
        agent.lease_ms.unwrap_or_else(|| millis(self.config.lease))
    }

    /// Waits for a lease to be durable, then reads its messages.
    async fn deliver(
        self: &Arc<Self>,
        (draws, commit): (Vec<Draw>, Commit),
    ) -> Result<Vec<Delivered>> {
        commit.durable().await?;
        let offsets = draws.iter().map(|d| d.lease.slot.offset).collect();
        let frames = self.read_messages(offsets).await?;
        let now = self.clock.now_ms();
        let traced = spans::exporting();
        let mut delivered = Vec::with_capacity(draws.len());
        for (draw, frame) in draws.into_iter().zip(frames) {
            // A message that age retention deleted meanwhile is gone: nothing to deliver.
            let Some(frame) = frame else {
                continue;
            };
            if draw.lease.attempt == 1 {
                let waited_ms = now.saturating_sub(frame.timestamp_ms);
                self.metrics.first_delivery_after(waited_ms as f64 / 1000.0);
            }
            if traced {
                delivered_span(&frame, draw.lease.attempt);
            }
            delivered.push(Delivered {
                frame,
                attempt: draw.lease.attempt,
                receipt: draw.receipt().encode(),
                lease_deadline_ms: draw.lease.deadline_ms,
            });
        }
        Ok(delivered)
    }

    /// Reads messages by offset, `None` for one that retention deleted. Recent records are
    /// read inline; any whose place only sled knows (which can wait for a checkpoint) are
    /// read together on a blocking thread, never on the async threads.
    pub(super) async fn read_messages(
        self: &Arc<Self>,
        offsets: Vec<Offset>,
    ) -> Result<Vec<Option<Frame>>> {
        let mut frames = Vec::with_capacity(offsets.len());
        let mut older = Vec::new();
        for (i, (offset, read)) in offsets
            .iter()
            .zip(self.log.read_many_recent(&offsets))
            .enumerate()
        {
            match read {
                Some(read) => frames.push(found(*offset, read)?),
                None => {
                    frames.push(None);
                    older.push((i, *offset));
                }
            }
        }
        if older.is_empty() {
            return Ok(frames);
        }
        let broker = self.clone();
        let read = tokio::task::spawn_blocking(move || {
            let offsets: Vec<Offset> = older.iter().map(|(_, offset)| *offset).collect();
            older
                .into_iter()
                .zip(broker.log.read_many(&offsets))
                .map(|((i, offset), read)| Ok((i, found(offset, read)?)))
                .collect::<Result<Vec<_>>>()
        })
        .await
        .map_err(|e| Refusal::Unavailable(format!("reading messages failed: {e}")))??;
        for (i, frame) in read {
            if let Some(slot) = frames.get_mut(i) {
                *slot = frame;
            }
        }
        Ok(frames)
    }

    /// Acks, nacks or extends leases of `agent` (of its inbox, or queue leases it holds);
    /// one outcome per receipt, once durable.
    pub async fn settle(
        self: &Arc<Self>,
        agent: &AgentId,
        receipts: &[String],
        how: Settle,
    ) -> Result<Vec<Outcome>> {
        let (name, kind) = match how {
            Settle::Ack => ("ack", Kind::Internal),
            Settle::Nack { .. } => ("nack", Kind::Internal),
            Settle::Extend { .. } => ("extend", Kind::Internal),
        };
        let count = receipts.len() as u64;
        let describe = |span: &mut Recording| {
            span.text("courier.agent", agent.as_str());
            span.int("courier.receipts", count);
        };
        let _span = spans::enter(name, kind, describe);
        self.settle_now(agent, receipts, how).await
    }

    async fn settle_now(
        self: &Arc<Self>,
        agent: &AgentId,
        receipts: &[String],
        how: Settle,
    ) -> Result<Vec<Outcome>> {
        let now = self.clock.now_ms();
        let parsed: Vec<Option<Receipt>> = receipts.iter().map(|r| Receipt::parse(r)).collect();
        let (outcomes, commit) = {
            let mut core = self.lock();
            let registered = &core.registry.get(agent.as_str())?.agent;
            let draws_from = |queue: &str| {
                let capability = courier_storage::state::queue_of(queue);
                registered
                    .capabilities
                    .iter()
                    .any(|c| Some(c.as_str()) == capability)
            };
            let policy_of = |inbox: &str| self.policy(core.registry.agent(inbox));
            let (outcomes, records) =
                core.delivery
                    .settle(agent.as_str(), &parsed, how, now, (policy_of, draws_from));
            if records.is_empty() {
                return Ok(outcomes);
            }
            let points = match how {
                Settle::Ack => ACK,
                Settle::Nack {
                    dead_letter: true, ..
                } => DEAD_LETTER,
                Settle::Nack { .. } => NACK,
                Settle::Extend { .. } => EXTEND,
            };
            let commit = self.commit_now(&mut core, points, now, records)?;
            // A settled queue lease frees room under the agent's `max_in_flight` even if it
            // no longer draws from that queue (whose wake-up it then does not wait on).
            if parsed.iter().flatten().any(|r| r.queue.is_some()) {
                core.waiters.wake(&[Arc::from(agent.as_str())]);
            }
            (outcomes, commit)
        };
        commit.durable().await?;
        Ok(outcomes)
    }

    /// Dead letters of an inbox above `after`, oldest first, at most `limit`.
    pub async fn dead_letters(
        self: &Arc<Self>,
        inbox: InboxRef<'_>,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<DeadView>> {
        let dead = {
            let core = self.lock();
            let name = inbox.check(&core)?;
            core.delivery.dead_letters(&name, after, limit)
        };
        let offsets = dead.iter().map(|d| d.slot.offset).collect();
        let frames = self.read_messages(offsets).await?;
        Ok(dead
            .into_iter()
            .zip(frames)
            .filter_map(|(dead, frame)| {
                Some(DeadView {
                    frame: frame?,
                    dead,
                })
            })
            .collect())
    }

    /// Moves dead letters back into their inbox with attempts reset; `None` redrives all.
    pub async fn redrive(
        self: &Arc<Self>,
        inbox: InboxRef<'_>,
        offsets: Option<&[u64]>,
    ) -> Result<usize> {
        let now = self.clock.now_ms();
        let (count, commit) = {
            let mut core = self.lock();
            let name = inbox.check(&core)?;
            let Some(record) = core.delivery.redrive(&name, offsets) else {
                return Ok(0);
            };
            let count = match &record {
                Record::Redriven { slots, .. } => slots.len(),
                _ => 0,
            };
            let commit = self.commit_now(&mut core, REDRIVE, now, vec![record])?;
            tracing::info!(inbox = %name, count, "redrove dead letters");
            (count, commit)
        };
        commit.durable().await?;
        Ok(count)
    }
}

/// An inbox named by a request: an agent's, or a capability's queue.
#[derive(Debug, Clone, Copy)]
pub enum InboxRef<'a> {
    /// The inbox of a registered agent.
    Agent(&'a AgentId),
    /// The queue of a capability.
    Capability(&'a CapabilityName),
}

impl InboxRef<'_> {
    /// The inbox's name, if it exists: a registered agent, or a capability that an agent
    /// declares or a message was sent to.
    fn check(self, core: &Core) -> Result<String> {
        match self {
            Self::Agent(agent) => {
                core.registry.get(agent.as_str())?;
                Ok(agent.to_string())
            }
            Self::Capability(capability) => {
                let queue = queue_inbox(capability.as_str());
                if core.delivery.has_inbox(&queue) || core.registry.declared(capability.as_str()) {
                    Ok(queue)
                } else {
                    Err(Refusal::UnknownCapability(capability.to_string()))
                }
            }
        }
    }
}

/// The inbox names of the queues `agent` draws from: those of the capabilities it declares.
fn queues_of(agent: &Agent) -> Vec<String> {
    agent.capabilities.iter().map(|c| queue_inbox(c)).collect()
}

/// The wake-ups a receive of `agent` waits on: its inbox's and its capability queues'.
fn wake_ups(core: &mut Core, agent: &AgentId) -> Vec<Arc<Notify>> {
    let queues = core
        .registry
        .agent(agent.as_str())
        .map(queues_of)
        .unwrap_or_default();
    let mut notifies = vec![core.waiters.of(agent.as_str())];
    notifies.extend(queues.iter().map(|q| core.waiters.of(q)));
    notifies
}

/// A read message, `None` if retention deleted its segment, or the refusal for a failed read.
fn found(offset: Offset, read: courier_storage::Result<Frame>) -> Result<Option<Frame>> {
    match read {
        Ok(frame) => Ok(Some(frame)),
        Err(courier_storage::Error::NotFound(_)) => Ok(None),
        Err(error) => Err(Refusal::Unavailable(format!(
            "reading message {offset} failed: {error}"
        ))),
    }
}
