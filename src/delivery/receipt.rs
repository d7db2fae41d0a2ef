//! What consumers hold and send: receipts naming a delivery, how they settle one, and the
//! answer per receipt.

use courier_storage::{Offset, Slot};

/// One lease handed to a consumer: opaque to clients, names the message and the delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    /// The message.
    pub slot: Slot,
    /// The delivery it names (1 for the first).
    pub attempt: u32,
}

impl Receipt {
    /// 25 hex digits: offset (16), priority (1), attempt (8).
    pub fn encode(&self) -> String {
        format!(
            "{:016x}{:x}{:08x}",
            self.slot.offset.0, self.slot.priority, self.attempt
        )
    }

    /// The inverse of [`Receipt::encode`]; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != 25 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let offset = u64::from_str_radix(text.get(..16)?, 16).ok()?;
        let priority = u8::from_str_radix(text.get(16..17)?, 16).ok()?;
        let attempt = u32::from_str_radix(text.get(17..)?, 16).ok()?;
        (priority <= 9 && attempt > 0).then_some(Self {
            slot: Slot {
                offset: Offset(offset),
                priority,
            },
            attempt,
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
    /// The receipt names no pending message of this inbox: nothing changed.
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
