//! Request/reply (SPEC §3): a request is a message published durably (to an agent or a
//! capability queue) and remembered as a request ([`courier_storage::state::RequestValue`]);
//! the call then waits for its first reply, the first message published with `in_reply_to`
//! equal to the request's id. The reply's commit wakes the call (never a poll) and settles
//! the reply in the requester's inbox, under the same lock, so it does not also come through
//! a receive; a call that times out leaves later replies to the inbox.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use courier_storage::state::Arrival;
use courier_storage::{Frame, Offset, Record, Slot};
use futures_util::future::{FutureExt, Shared};
use tokio::sync::oneshot;

use super::admission::Signed;
use super::commit::{Commit, ACK};
use super::publish::{new_id, Outgoing};
use super::{millis, Broker, Core, Refusal, Result};
use crate::ids::Address;
use crate::telemetry::spans::{self, Kind, Recording};

/// Resolves once the reply's settling in the requester's inbox is durable (or failed: then
/// the reply stays in the inbox, and the call is answered all the same).
type Settled = Shared<Pin<Box<dyn Future<Output = ()> + Send>>>;

/// What a waiting call is told: its reply's offset, and when its settling is durable.
type Answer = (Offset, Settled);

/// The calls waiting for replies, by request id.
#[derive(Default)]
pub(super) struct Calls {
    waiting: HashMap<String, Vec<(u64, oneshot::Sender<Answer>)>>,
    count: usize,
    next_ticket: u64,
}

impl std::fmt::Debug for Calls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Calls")
            .field("requests", &self.waiting.len())
            .field("count", &self.count)
            .finish()
    }
}

impl Calls {
    /// Registers a call waiting for the reply to `id`; its ticket, to leave with.
    fn wait(&mut self, id: &str, tx: oneshot::Sender<Answer>) -> u64 {
        self.next_ticket += 1;
        self.count += 1;
        let ticket = self.next_ticket;
        self.waiting
            .entry(id.to_owned())
            .or_default()
            .push((ticket, tx));
        ticket
    }

    /// The call `ticket` stops waiting for `id` (timed out, or its publish failed).
    fn leave(&mut self, id: &str, ticket: u64) {
        if let Some(calls) = self.waiting.get_mut(id) {
            let before = calls.len();
            calls.retain(|(t, _)| *t != ticket);
            self.count -= before - calls.len();
            if calls.is_empty() {
                self.waiting.remove(id);
            }
        }
    }

    /// Takes every call waiting for `id`.
    fn take(&mut self, id: &str) -> Vec<oneshot::Sender<Answer>> {
        let calls = self.waiting.remove(id).unwrap_or_default();
        self.count -= calls.len();
        calls.into_iter().map(|(_, tx)| tx).collect()
    }
}

/// What a request asks for besides its message.
#[derive(Debug, Clone)]
pub struct RequestOptions {
    /// How long the call waits for the reply.
    pub timeout: Duration,
    /// Answer 503 at once, storing nothing, when no agent that could take the request was
    /// seen within `presence_ttl`.
    pub fail_without_responders: bool,
    /// The request's checked signature (`auth.signing`): its nonce is spent once the call
    /// is decided.
    pub signed: Option<Signed>,
}

/// A call waiting for its reply; leaving it (dropped) takes it off the waiting calls.
struct Waiting<'a> {
    broker: &'a Broker,
    id: &'a str,
    ticket: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.broker.lock().calls.leave(self.id, self.ticket);
    }
}

/// Where a call stands once decided under the lock.
enum Decided {
    /// The request (a repeated client id) was answered already: its stored reply.
    Answered(Offset),
    /// Waiting for the reply; `publish` if the request is new and must be written.
    Waiting {
        ticket: u64,
        rx: oneshot::Receiver<Answer>,
        publish: bool,
    },
}

impl Broker {
    /// Publishes a request durably and waits up to `options.timeout` for its first reply,
    /// whose message is returned. A request whose client id was already answered returns
    /// the stored reply without publishing anything. Runs as the span `request_reply` when
    /// spans are exported.
    pub async fn request(
        self: &Arc<Self>,
        outgoing: Outgoing,
        options: RequestOptions,
    ) -> Result<Frame> {
        let timeout_ms = millis(options.timeout);
        let describe = |span: &mut Recording| span.int("courier.timeout_ms", timeout_ms);
        let _span = spans::enter("request_reply", Kind::Internal, describe);
        self.call(outgoing, options).await
    }

    async fn call(
        self: &Arc<Self>,
        mut outgoing: Outgoing,
        options: RequestOptions,
    ) -> Result<Frame> {
        self.check_writable()?;
        let now = self.clock.now_ms();
        let window = millis(self.config.dedupe_window);
        let timeout_ms = millis(options.timeout);
        outgoing.message.request_until_ms =
            Some(now.saturating_add(timeout_ms).saturating_add(window));
        if outgoing.message.id.is_empty() {
            outgoing.message.id = new_id(now).to_string();
        }
        let id = outgoing.message.id.clone();
        let (decided, spent) = self.decide_call(&outgoing, &options, now)?;
        let (ticket, mut rx, publish) = match decided {
            Decided::Answered(reply) => {
                if let Some(spent) = spent {
                    spent.durable().await?;
                }
                return self.read_reply(&id, reply).await;
            }
            Decided::Waiting {
                ticket,
                rx,
                publish,
            } => (ticket, rx, publish),
        };
        // However the call ends (answered, failed, timed out, or dropped with its client's
        // connection, even while its nonce is being written), it stops waiting: no leaked
        // slot, no reply settled for nobody.
        let _waiting = Waiting {
            broker: self,
            id: &id,
            ticket,
        };
        if let Some(spent) = spent {
            spent.durable().await?;
        }
        if publish {
            self.publish(vec![outgoing]).await?;
        }
        // A shutdown ends the wait too (replies are refused from then on): 503, not a call
        // that holds the shutdown up for its whole timeout.
        let mut closing = self.closing.subscribe();
        let shutting_down = async move {
            if !*closing.borrow_and_update() {
                let _ = closing.changed().await;
            }
        };
        let answer = tokio::select! {
            answer = tokio::time::timeout(options.timeout, &mut rx) => match answer {
                Ok(answer) => answer.ok(),
                Err(_) => {
                    // A reply that came as the time ran out took our ticket and sent, under
                    // the lock: after leaving under the lock, it is in `rx` or it never comes.
                    self.lock().calls.leave(&id, ticket);
                    rx.try_recv().ok()
                }
            },
            () = shutting_down => {
                self.lock().calls.leave(&id, ticket);
                match rx.try_recv() {
                    Ok(answer) => Some(answer),
                    Err(_) => return Err(Refusal::Unavailable(format!(
                        "the server is shutting down; request `{id}` is stored and a reply reaches the sender's inbox: after the restart, call again with this id to get the reply"
                    ))),
                }
            }
        };
        let Some((reply, settled)) = answer else {
            return Err(Refusal::ReplyTimeout {
                id: id.clone(),
                timeout_ms,
            });
        };
        settled.await;
        self.read_reply(&id, reply).await
    }

    /// Decides a call under the lock: the stored reply of an answered request, or a wait for
    /// the reply (after publishing the request if it is new). A signed call's nonce is spent
    /// once every check has passed, before the call waits, in the same lock hold.
    fn decide_call(
        self: &Arc<Self>,
        outgoing: &Outgoing,
        options: &RequestOptions,
        now: u64,
    ) -> Result<(Decided, Option<Commit>)> {
        let mut core = self.lock();
        Self::check_nonce(&core, options.signed.as_ref(), now)?;
        let (reply, known) = self.check_call(&core, outgoing, options, now)?;
        let spent = options
            .signed
            .as_ref()
            .map(|signed| self.spend_nonce(&mut core, signed, now))
            .transpose()?;
        let decided = match reply {
            Some(reply) => Decided::Answered(reply),
            None => {
                let (tx, rx) = oneshot::channel();
                let ticket = core.calls.wait(&outgoing.message.id, tx);
                Decided::Waiting {
                    ticket,
                    rx,
                    publish: !known,
                }
            }
        };
        Ok((decided, spent))
    }

    /// The refusals of a call, and else its stored reply (if answered) and whether the
    /// request is known.
    fn check_call(
        &self,
        core: &Core,
        outgoing: &Outgoing,
        options: &RequestOptions,
        now: u64,
    ) -> Result<(Option<Offset>, bool)> {
        core.registry.get(&outgoing.message.from)?;
        let id = &outgoing.message.id;
        let known = core.delivery.request(id);
        if let Some(known) = known.filter(|r| r.from != outgoing.message.from) {
            // Another sender's request: neither its reply nor a wait for it.
            return Err(Refusal::IdTaken {
                id: id.clone(),
                owner: known.from.clone(),
            });
        }
        if let Some(reply) = known.and_then(|r| r.reply) {
            return Ok((Some(reply), true));
        }
        if known.is_none() && options.fail_without_responders {
            self.check_responders(core, outgoing.to.as_ref(), now)?;
        }
        let limit = self.config.limits.max_waiting_requests;
        if core.calls.count >= limit as usize {
            return Err(Refusal::TooManyWaiting { limit });
        }
        Ok((None, known.is_some()))
    }

    /// Refuses a request that no agent could take now: its agent, or any agent declaring
    /// its capability, must have been seen within `presence_ttl`.
    fn check_responders(&self, core: &Core, to: Option<&Address>, now: u64) -> Result<()> {
        let fresh = |seen: Option<u64>| self.is_online(seen, now);
        let (online, what) = match to {
            Some(Address::Agent(agent)) => (
                fresh(core.registry.last_seen(agent.as_str())),
                format!("agent `{agent}`"),
            ),
            Some(Address::Capability(capability)) => (
                core.registry
                    .declaring(capability.as_str())
                    .iter()
                    .any(|(_, seen)| fresh(*seen)),
                format!("no agent declaring `{capability}`"),
            ),
            _ => (true, String::new()),
        };
        if online {
            Ok(())
        } else {
            Err(Refusal::NoResponders(what))
        }
    }

    /// Reads a reply's message.
    async fn read_reply(self: &Arc<Self>, id: &str, reply: Offset) -> Result<Frame> {
        let frame = self.read_messages(vec![reply]).await?.pop().flatten();
        frame.ok_or_else(|| {
            Refusal::Unavailable(format!(
                "the reply to request `{id}` (offset {reply}) was deleted by retention"
            ))
        })
    }

    /// After a message arrived (in the completion callback, under the lock): if it is the
    /// first reply to a request whose calls wait, settles it in the requester's inbox (an
    /// `Acked` record, applied now) and hands it to the calls.
    pub(super) fn answer_calls(
        self: &Arc<Self>,
        core: &mut Core,
        arrival: &Arrival,
        offset: Offset,
        now: u64,
    ) {
        let Some(id) = arrival.in_reply_to.as_deref() else {
            return;
        };
        let Some(request) = core.delivery.request(id) else {
            return;
        };
        if request.reply != Some(offset) {
            return;
        }
        let requester = request.from.clone();
        let calls = core.calls.take(id);
        if calls.is_empty() {
            return;
        }
        // The calls are handed the reply first, with a settling that resolves once the ack
        // (decided below) is durable: the reply is acked only if a call is still there to
        // take it (a call whose client went away has dropped its receiver).
        let (commit_tx, commit_rx) = oneshot::channel::<super::commit::Commit>();
        let settled: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move {
            // If the ack is lost, the reply comes again through the inbox: at least once.
            if let Ok(commit) = commit_rx.await {
                let _ = commit.durable().await;
            }
        });
        let settled = settled.shared();
        // A call whose client went away has dropped its receiver: its send fails.
        let taken = calls
            .into_iter()
            .map(|call| call.send((offset, settled.clone())))
            .filter(|sent| sent.is_ok())
            .count();
        if taken == 0 || !arrival.destinations.contains(&requester) {
            return;
        }
        let record = Record::Acked {
            inbox: requester,
            slots: vec![Slot {
                offset,
                priority: arrival.priority,
            }],
        };
        if let Ok(commit) = self.commit_now(core, ACK, now, vec![record]) {
            let _ = commit_tx.send(commit);
        }
    }
}
