//! Publishing: an address becomes destinations, admission decides, duplicates are answered
//! from what is remembered, and the rest become `Message` records, applied when durable
//! (they need their offsets).

use std::sync::Arc;

use courier_storage::state::{queue_inbox, Arrival};
use courier_storage::{Message, Offset, Record};
use tokio::sync::watch;

use super::admission::Signed;
use super::admission::{Candidate, Remembered};
use super::commit::{Commit, NONCE, PUBLISH};
use super::registry::Registry;
use super::{millis, Broker, Core, Refusal, Result};
use crate::clock::Stopwatch;
use crate::delivery::State;
use crate::ids::{Address, AgentId};
use crate::telemetry::spans::{self, Kind, Recording};

/// One message to publish, validated by the API.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The client's id (idempotency key), if any.
    pub client_id: Option<String>,
    /// Where it goes; the broker resolves it to destinations. `None` only for a reply
    /// (`in_reply_to`), which then goes to the request's sender.
    pub to: Option<Address>,
    /// The message as it will be stored, except for its destinations, times and server id.
    pub message: Message,
    /// Delay before delivery, ms.
    pub delay_ms: u64,
    /// Time to live, ms (0: none).
    pub ttl_ms: u64,
}

/// The result of publishing one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The message id: the client's, or the ULID the server gave it.
    pub id: String,
    /// Its offset (the original one for a duplicate).
    pub offset: u64,
    /// Whether the id was seen within the dedupe window, so nothing was written.
    pub duplicate: bool,
    /// How many inboxes it was routed to (for a duplicate: the original's, 0 if retention
    /// deleted it since).
    pub destinations: usize,
}

/// A message written by a publish: its index in the request, its id, how many inboxes it
/// was routed to.
type Written = (usize, String, usize);

/// A publish decided under the lock, waiting for its append.
struct Staged {
    /// Per message: known now (duplicates of committed ids), or filled in later.
    results: Vec<Option<Published>>,
    /// Duplicates of ids whose first publish is still being committed.
    waits: Vec<(usize, String, watch::Receiver<Option<u64>>)>,
    /// The messages written, in record order, and their commit.
    append: Option<(Vec<Written>, Commit)>,
    /// The client ids being committed by this publish.
    client_ids: Vec<String>,
    /// The nonce of a signed publish whose messages were all duplicates, committed alone
    /// (else it is written ahead of the messages, in their commit).
    spent: Option<Commit>,
}

/// The inboxes an address stands for: where routing is decided, in one place. A topic goes
/// to every registered agent subscribed to it now (each once), and to none if nobody is: the
/// message is stored all the same. A capability goes to its queue, whether or not an agent
/// declares it now.
fn resolve(registry: &Registry, delivery: &State, to: &Address) -> Result<Vec<String>> {
    match to {
        Address::Agent(agent) => {
            registry.get(agent.as_str())?;
            Ok(vec![agent.to_string()])
        }
        Address::Topic(topic) => {
            let mut subscribers = delivery.subscribers(topic);
            subscribers.retain(|agent| registry.contains(agent));
            Ok(subscribers)
        }
        // The queue: messages wait there until an agent that declares it receives them.
        Address::Capability(capability) => Ok(vec![queue_inbox(capability.as_str())]),
    }
}

/// The address of a reply without `to`: the sender of the request it replies to.
fn reply_address(delivery: &State, in_reply_to: Option<&str>) -> Result<AgentId> {
    let id = in_reply_to.unwrap_or_default();
    delivery
        .request(id)
        .and_then(|request| AgentId::parse(&request.from).ok())
        .ok_or_else(|| Refusal::UnknownRequest(id.to_owned()))
}

impl Broker {
    /// Publishes messages all-or-nothing: every destination must exist and have room, or
    /// nothing is written. Returns one result per message, in order, once durable.
    pub async fn publish(self: &Arc<Self>, outgoing: Vec<Outgoing>) -> Result<Vec<Published>> {
        self.publish_signed(outgoing, None).await
    }

    /// [`Broker::publish`] of a signed request: once the messages are admitted, its nonce is
    /// spent (refused if used before) in the same lock hold, ahead of their records. Runs as
    /// the span `publish` when spans are exported.
    pub async fn publish_signed(
        self: &Arc<Self>,
        outgoing: Vec<Outgoing>,
        signed: Option<Signed>,
    ) -> Result<Vec<Published>> {
        let count = outgoing.len() as u64;
        let describe = |span: &mut Recording| span.int("messaging.batch.message_count", count);
        let _span = spans::enter("publish", Kind::Producer, describe);
        self.publish_now(outgoing, signed).await
    }

    async fn publish_now(
        self: &Arc<Self>,
        mut outgoing: Vec<Outgoing>,
        signed: Option<Signed>,
    ) -> Result<Vec<Published>> {
        self.check_writable()?;
        let stopwatch = Stopwatch::start();
        self.check_id_owners(&outgoing).await?;
        let now = self.clock.now_ms();
        let staged = {
            let mut core = self.lock();
            Self::check_nonce(&core, signed.as_ref(), now)?;
            let recalled = self.admit(&mut core, &mut outgoing, now)?;
            let nonce = signed
                .map(|signed| Self::nonce_record(&core, signed, now))
                .transpose()?;
            self.stage_publish(&mut core, outgoing, recalled, nonce, now)?
        };
        let mut results = staged.results;
        if let Some((written, commit)) = staged.append {
            let appended = match commit.durable().await {
                Ok(appended) => appended,
                Err(refusal) => {
                    // Not written: the ids are free again (their waiting duplicates see the
                    // first publish fail, and a retry publishes anew).
                    let mut core = self.lock();
                    for id in &staged.client_ids {
                        core.admission.committed(id);
                    }
                    return Err(refusal);
                }
            };
            for (n, (i, id, destinations)) in written.into_iter().enumerate() {
                results[i] = Some(Published {
                    id,
                    offset: appended.first.0 + n as u64,
                    duplicate: false,
                    destinations,
                });
            }
        }
        for (i, id, mut wait) in staged.waits {
            let offset = wait
                .wait_for(Option::is_some)
                .await
                .map_err(|_| {
                    Refusal::Unavailable("the first publish of this id failed; retry it".into())
                })?
                .expect("waited for Some");
            results[i] = Some(Published {
                id,
                offset,
                duplicate: true,
                destinations: 0,
            });
        }
        if let Some(spent) = staged.spent {
            // The nonce of a signed publish that wrote no message.
            spent.durable().await?;
        }
        let mut results: Vec<Published> = results
            .into_iter()
            .map(|r| r.expect("every message has a result"))
            .collect();
        self.count_original_destinations(&mut results).await?;
        self.metrics.published_in(stopwatch.seconds());
        Ok(results)
    }

    /// Refuses a message whose client id is remembered as another sender's message: a
    /// client id answers duplicates of its own sender's message only (another agent must
    /// neither learn of it nor have its own message taken for a duplicate). Reads the
    /// originals of the remembered ids, before anything is decided.
    async fn check_id_owners(self: &Arc<Self>, outgoing: &[Outgoing]) -> Result<()> {
        if outgoing.iter().all(|o| o.client_id.is_none()) {
            return Ok(());
        }
        let now = self.clock.now_ms();
        let recalled: Vec<(usize, Offset)> = {
            let core = self.lock();
            outgoing
                .iter()
                .enumerate()
                .filter_map(|(i, o)| Some((i, core.delivery.recall(o.client_id.as_deref()?, now)?)))
                .collect()
        };
        if recalled.is_empty() {
            return Ok(());
        }
        let frames = self
            .read_messages(recalled.iter().map(|(_, offset)| *offset).collect())
            .await?;
        for ((i, _), frame) in recalled.into_iter().zip(frames) {
            let (Some(o), Some(Record::Message(original))) =
                (outgoing.get(i), frame.map(|f| f.record))
            else {
                continue;
            };
            if original.from != o.message.from {
                return Err(Refusal::IdTaken {
                    id: o.client_id.clone().unwrap_or_default(),
                    owner: original.from,
                });
            }
        }
        Ok(())
    }

    /// Fills in the destination count of each duplicate from its original record.
    async fn count_original_destinations(
        self: &Arc<Self>,
        results: &mut [Published],
    ) -> Result<()> {
        let duplicates: Vec<usize> = (0..results.len())
            .filter(|&i| results.get(i).is_some_and(|r| r.duplicate))
            .collect();
        if duplicates.is_empty() {
            return Ok(());
        }
        let offsets = duplicates
            .iter()
            .filter_map(|&i| results.get(i).map(|r| Offset(r.offset)))
            .collect();
        let frames = self.read_messages(offsets).await?;
        for (i, frame) in duplicates.into_iter().zip(frames) {
            if let (Some(result), Some(Record::Message(m))) =
                (results.get_mut(i), frame.map(|f| f.record))
            {
                result.destinations = m.destinations.len();
            }
        }
        Ok(())
    }

    /// Routes and admits what is not a duplicate: a client id remembered within the window
    /// is answered as a duplicate, not routed or admitted again (a retry of a stored message
    /// is never refused for a full inbox or the sender's rate). Returns what each message's
    /// client id is remembered as.
    fn admit(
        &self,
        core: &mut Core,
        outgoing: &mut [Outgoing],
        now: u64,
    ) -> Result<Vec<Option<Remembered>>> {
        let recalled: Vec<Option<Remembered>> = outgoing
            .iter()
            .map(|o| {
                let id = o.client_id.as_deref()?;
                core.admission.recall(&core.delivery, id, now)
            })
            .collect();
        for (o, _) in outgoing
            .iter_mut()
            .zip(&recalled)
            .filter(|(_, r)| r.is_none())
        {
            if o.to.is_none() {
                let to = reply_address(&core.delivery, o.message.in_reply_to.as_deref())?;
                o.message.to = format!("agent:{to}");
                o.to = Some(Address::Agent(to));
            }
            let to = o.to.as_ref().expect("just resolved");
            o.message.destinations = resolve(&core.registry, &core.delivery, to)?;
        }
        let candidates: Vec<Candidate<'_>> = outgoing
            .iter()
            .zip(&recalled)
            .filter(|(_, r)| r.is_none())
            .map(|(o, _)| Candidate {
                from: &o.message.from,
                destinations: &o.message.destinations,
            })
            .collect();
        let Core {
            admission,
            delivery,
            registry,
            ..
        } = core;
        admission.check(
            delivery,
            |id| registry.contains(id),
            &self.config.limits,
            &candidates,
            now,
        )?;
        Ok(recalled)
    }

    /// Decides a publish: duplicates are answered from what is remembered (`recalled`, by
    /// [`Broker::admit`] under the same lock), the rest become `Message` records, submitted
    /// now and applied to memory when durable.
    fn stage_publish(
        self: &Arc<Self>,
        core: &mut Core,
        outgoing: Vec<Outgoing>,
        recalled: Vec<Option<Remembered>>,
        nonce: Option<Record>,
        now: u64,
    ) -> Result<Staged> {
        // Checked before any id is marked as being committed.
        self.check_writable()?;
        let window = millis(self.config.dedupe_window);
        let mut staged = Staged {
            results: vec![None; outgoing.len()],
            waits: Vec::new(),
            append: None,
            client_ids: Vec::new(),
            spent: None,
        };
        let mut written = Vec::new();
        let mut records = Vec::new();
        let mut ids: Vec<Option<(String, watch::Sender<Option<u64>>)>> = Vec::new();
        for (i, (o, recalled)) in outgoing.into_iter().zip(recalled).enumerate() {
            if let Some(id) = &o.client_id {
                // Nothing but this batch's own ids can have changed since `admit`.
                match recalled.or_else(|| core.admission.pending(id)) {
                    Some(Remembered::Done { offset }) => {
                        staged.results[i] = Some(Published {
                            id: id.clone(),
                            offset,
                            duplicate: true,
                            destinations: 0,
                        });
                        continue;
                    }
                    Some(Remembered::Pending(rx)) => {
                        staged.waits.push((i, id.clone(), rx));
                        continue;
                    }
                    None => {}
                }
            }
            let mut message = o.message;
            message.not_before_ms = (o.delay_ms > 0).then(|| now.saturating_add(o.delay_ms));
            message.expires_at_ms = (o.ttl_ms > 0).then(|| now.saturating_add(o.ttl_ms));
            if let Some(id) = o.client_id {
                message.id.clone_from(&id);
                message.dedupe_until_ms = Some(now.saturating_add(window));
                let (tx, rx) = watch::channel(None);
                core.admission.committing(id.clone(), rx);
                staged.client_ids.push(id.clone());
                ids.push(Some((id, tx)));
            } else {
                if message.id.is_empty() {
                    message.id = new_id(now).to_string();
                }
                ids.push(None);
            }
            written.push((i, message.id.clone(), message.destinations.len()));
            records.push(Record::Message(message));
        }
        if records.is_empty() {
            if let Some(nonce) = nonce {
                staged.spent = Some(self.commit_now(core, NONCE, now, vec![nonce])?);
            }
            return Ok(staged);
        }
        let ahead = Vec::from_iter(nonce);
        staged.append = Some((
            written,
            self.commit_messages(core, ahead, records, ids, now)?,
        ));
        Ok(staged)
    }

    /// Submits `Message` records (after `ahead`, a signed publish's nonce, committed now);
    /// once durable, each arrives in its inboxes with its offset, and its client id (if any)
    /// is remembered and answered to the duplicates waiting on it.
    fn commit_messages(
        self: &Arc<Self>,
        core: &mut Core,
        ahead: Vec<Record>,
        records: Vec<Record>,
        ids: Vec<Option<(String, watch::Sender<Option<u64>>)>>,
        now: u64,
    ) -> Result<Commit> {
        // What delivery needs of each message, without its body.
        let arrivals: Vec<Arrival> = records
            .iter()
            .filter_map(|r| match r {
                Record::Message(m) => Some(Arrival::of(m)),
                _ => None,
            })
            .collect();
        let broker = self.clone();
        self.commit_now_and_when_durable(
            core,
            PUBLISH,
            now,
            ahead,
            records,
            move |core, appended| {
                let mut woken = Vec::new();
                for (n, (arrival, id)) in arrivals.iter().zip(ids).enumerate() {
                    let offset = Offset(appended.first.0 + n as u64);
                    woken.extend(core.delivery.arrive(arrival, offset, now));
                    broker.answer_calls(core, arrival, offset, now);
                    if let Some((id, tx)) = id {
                        core.admission.committed(&id);
                        tx.send_replace(Some(offset.0));
                    }
                }
                woken
            },
        )
    }
}

/// A server-assigned message id: a ULID whose time part is `now_ms` and whose random part
/// is a random start (drawn once per process) plus a counter, so ids are unique and sort by
/// time within a process without a random draw per message.
pub(super) fn new_id(now_ms: u64) -> ulid::Ulid {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static START: OnceLock<u128> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let start = *START.get_or_init(|| ulid::Ulid::new().random() >> 16);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let random = start.wrapping_add(u128::from(count)) & ((1u128 << 80) - 1);
    ulid::Ulid::from_parts(now_ms, random)
}
