//! What consumers hold and send: receipts naming a delivery, how they settle one, and the
//! answer per receipt.

use courier_storage::state::{queue_inbox, queue_of};
use courier_storage::{Offset, Slot};

use crate::ids::CapabilityName;

/// One lease handed to a consumer: opaque to clients, names the message, the delivery and,
/// for a message of a capability queue, the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The message.
    pub slot: Slot,
    /// The delivery it names (1 for the first).
    pub attempt: u32,
    /// The queue's inbox name (`capability:<name>`) for a queue message; `None` for one of
    /// the agent's own inbox.
    pub queue: Option<String>,
}

impl Receipt {
    /// 25 hex digits: offset (16), priority (1), attempt (8); then, for a queue message,
    /// `@` and the capability.
    pub fn encode(&self) -> String {
        let mut text = format!(
            "{:016x}{:x}{:08x}",
            self.slot.offset.0, self.slot.priority, self.attempt
        );
        if let Some(capability) = self.queue.as_deref().and_then(queue_of) {
            text.push('@');
            text.push_str(capability);
        }
        text
    }

    /// The inverse of [`Receipt::encode`]; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let (digits, queue) = match text.split_once('@') {
            Some((digits, capability)) => {
                let capability = CapabilityName::parse(capability).ok()?;
                (digits, Some(queue_inbox(capability.as_str())))
            }
            None => (text, None),
        };
        if digits.len() != 25 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let offset = u64::from_str_radix(digits.get(..16)?, 16).ok()?;
        let priority = u8::from_str_radix(digits.get(16..17)?, 16).ok()?;
        let attempt = u32::from_str_radix(digits.get(17..)?, 16).ok()?;
        (priority <= 9 && attempt > 0).then_some(Self {
            slot: Slot {
                offset: Offset(offset),
                priority,
            },
            attempt,
            queue,
        })
    }
}

/// What a consumer asks for a receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Done: never deliver again.
    Ack,
    /// Not done: ready again after `delay_ms`, or dead-letter now.
    Nack {
        /// Delay before the message is ready again.
        delay_ms: u64,
        /// Dead-letter now with reason `rejected`.
        dead_letter: bool,
    },
    /// Still working: the lease ends `lease_ms` from now.
    Extend {
        /// The new lease length.
        lease_ms: u64,
    },
}

/// The answer for one receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged: the message is done.
    Acked,
    /// Made ready again (after its delay).
    Nacked,
    /// Moved to the dead letters (nack with `dead_letter`, or the last attempt).
    DeadLettered,
    /// Lease extended.
    Extended,
    /// The message was delivered again since (or dead-lettered): nothing changed.
    Stale,
    /// The receipt names no pending message of this inbox, or a queue lease that another
    /// agent holds: nothing changed.
    Unknown,
}

impl Outcome {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Acked => "acked",
            Self::Nacked => "nacked",
            Self::DeadLettered => "dead_lettered",
            Self::Extended => "extended",
            Self::Stale => "stale",
            Self::Unknown => "unknown",
        }
    }
}
