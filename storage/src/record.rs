//! Records and their framing: the only bytes the log ever writes.
//!
//! Pure: no I/O. Every record is framed as below (all integers little-endian):
//!
//! ```text
//! position  size  field
//! 0         4     crc32 (crc32fast, IEEE) over bytes 4 .. 28+len: header fields and payload
//! 4         1     version, currently 3 (0 never occurs: an all-zero header is "end of data")
//! 5         3     reserved, zero
//! 8         4     payload length `len` (u32)
//! 12        8     offset (u64): the record's position in the global log
//! 20        8     timestamp_ms (u64): wall-clock milliseconds since the Unix epoch, from the appender
//! 28        len   payload: the [`Record`], bincode 2 (standard configuration)
//! ```
//!
//! The CRC covers the header fields as well as the payload, so a flipped bit in the length
//! or the offset is caught like one in the payload. Message bodies are the raw JSON bytes the
//! client sent, stored as they came: never parsed or re-encoded here.
#![deny(clippy::indexing_slicing)]

use bincode::{Decode, Encode};

use crate::error::Corruption;
use crate::Offset;

/// Position of the CRC32 field.
pub const CRC_POSITION: usize = 0;
/// Position of the version byte.
pub const VERSION_POSITION: usize = CRC_POSITION + 4;
/// Position of the three reserved bytes.
pub const RESERVED_POSITION: usize = VERSION_POSITION + 1;
/// Position of the payload length.
pub const LENGTH_POSITION: usize = RESERVED_POSITION + 3;
/// Position of the offset.
pub const OFFSET_POSITION: usize = LENGTH_POSITION + 4;
/// Position of the timestamp.
pub const TIMESTAMP_POSITION: usize = OFFSET_POSITION + 8;
/// Size of the frame header; the payload follows it.
pub const HEADER_BYTES: usize = TIMESTAMP_POSITION + 8;
/// The record version this build writes. It reads every version from [`OLDEST_VERSION`] on:
/// version 1 is version 3 without `Message::ordering_key`, `Message::request_until_ms` and
/// `Backfill::ordering_key`; version 2 (development builds of routing only) is version 3
/// without `Backfill::ordering_key`.
pub const VERSION: u8 = 3;
/// The oldest record version this build reads.
pub const OLDEST_VERSION: u8 = 1;

/// Whether this build reads records of `version`.
pub fn is_known_version(version: u8) -> bool {
    (OLDEST_VERSION..=VERSION).contains(&version)
}
/// Hard upper bound on a payload, whatever the configuration: a length field above it is damage.
pub const MAX_PAYLOAD_BYTES: u32 = 64 * 1024 * 1024;

const _: () = assert!(HEADER_BYTES == 28);
const _: () = assert!(VERSION != 0, "version 0 marks the zeroed end of a segment");

const BINCODE: bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<{ MAX_PAYLOAD_BYTES as usize }>,
> = bincode::config::standard().with_limit::<{ MAX_PAYLOAD_BYTES as usize }>();

/// One entry of the log.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Record {
    /// A published message, with the inboxes it was routed to.
    Message(Message),
    /// Messages handed to a consumer under a lease (also used to extend a lease: same attempt,
    /// new deadline).
    Leased {
        /// The inbox (agent id) the messages were delivered from.
        inbox: String,
        /// One entry per message.
        leases: Vec<Lease>,
    },
    /// Messages acknowledged: done, never delivered again.
    Acked {
        /// The inbox.
        inbox: String,
        /// The acknowledged messages.
        slots: Vec<Slot>,
    },
    /// Messages whose lease ended without an ack (nack or expiry): ready again at `not_before_ms`.
    Released {
        /// The inbox.
        inbox: String,
        /// One entry per message.
        releases: Vec<Release>,
    },
    /// Messages moved to the inbox's dead letters.
    DeadLettered {
        /// The inbox.
        inbox: String,
        /// One entry per message.
        letters: Vec<DeadLetter>,
    },
    /// Dead letters moved back into the inbox with their attempts reset.
    Redriven {
        /// The inbox.
        inbox: String,
        /// The redriven messages.
        slots: Vec<Slot>,
    },
    /// An agent registered or updated.
    AgentUpserted(Agent),
    /// An agent removed, with its inbox, dead letters and subscriptions.
    AgentDeleted {
        /// The agent's id.
        agent: String,
    },
    /// An agent subscribed to the topics a pattern matches.
    Subscribed {
        /// The subscriber.
        agent: String,
        /// The pattern.
        topic: String,
        /// Where its backfill starts ([`Record::Backfilled`]): `0` for `start: earliest`
        /// (every matching message still in the log), [`crate::state::LATEST`] for `latest`
        /// (none: only the messages published after it).
        start: Offset,
    },
    /// An agent unsubscribed from a topic.
    Unsubscribed {
        /// The subscriber.
        agent: String,
        /// The topic name.
        topic: String,
    },
    /// A placeholder written by `repair` for an offset whose record was damaged and moved to
    /// `quarantine/`; it has no effect on delivery state.
    Quarantined {
        /// The quarantine file that holds the damaged bytes.
        file: String,
    },
    /// Retention removed every message below `below`; their delivery state is forgotten.
    Truncated {
        /// The first offset that is kept.
        below: Offset,
    },
    /// Earlier messages of a subscription's topics entered the subscriber's inbox (a step of
    /// the backfill of a `start: earliest` subscription).
    Backfilled {
        /// The subscriber's inbox.
        inbox: String,
        /// The subscription's pattern.
        pattern: String,
        /// The messages, in offset order.
        messages: Vec<Backfill>,
        /// Every message of the topics below this offset has been considered; the backfill
        /// goes on from here, or ends with [`crate::state::BACKFILL_DONE`].
        through: Offset,
    },
    /// Messages of a capability queue handed to one of the agents that declare the
    /// capability, under a lease (also used to extend such a lease). The queue's other
    /// records (`Acked`, `Released`, `DeadLettered`, `Redriven`) name the queue as their inbox.
    LeasedTo {
        /// The queue's inbox name, `capability:<name>` ([`crate::state::queue_inbox`]).
        queue: String,
        /// The agent that holds the leases.
        agent: String,
        /// One entry per message.
        leases: Vec<Lease>,
    },
    /// A signed request's nonce was used (`auth.signing`): another request with the same
    /// signer and nonce is refused until `until_ms`. Written before the records the request
    /// writes, in the same commit.
    NonceUsed {
        /// Who signed: an agent id, or `$admin` (which no agent id can be).
        signer: String,
        /// The client's nonce.
        nonce: String,
        /// Until when it counts (wall-clock ms): the latest time at which the request's
        /// timestamp is still accepted.
        until_ms: u64,
    },
}

/// One earlier message backfilled into an inbox.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Backfill {
    /// The message.
    pub slot: Slot,
    /// Its delay, as published.
    pub not_before_ms: Option<u64>,
    /// Its ttl's end, as published.
    pub expires_at_ms: Option<u64>,
    /// Its ordering key, as published (version 3).
    pub ordering_key: Option<String>,
}

/// A `Backfilled` record as versions 1 and 2 wrote it: its messages without `ordering_key`.
#[derive(Decode)]
struct BackfilledV1 {
    inbox: String,
    pattern: String,
    messages: Vec<BackfillV1>,
    through: Offset,
}

/// A `Backfill` as versions 1 and 2 wrote it.
#[derive(Decode)]
struct BackfillV1 {
    slot: Slot,
    not_before_ms: Option<u64>,
    expires_at_ms: Option<u64>,
}

impl From<BackfilledV1> for Record {
    fn from(b: BackfilledV1) -> Self {
        let messages = b.messages.into_iter().map(|m| Backfill {
            slot: m.slot,
            not_before_ms: m.not_before_ms,
            expires_at_ms: m.expires_at_ms,
            ordering_key: None,
        });
        Self::Backfilled {
            inbox: b.inbox,
            pattern: b.pattern,
            messages: messages.collect(),
            through: b.through,
        }
    }
}

/// A published message as stored.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Message {
    /// The message id: the client's idempotency key, or a ULID assigned by the server.
    pub id: String,
    /// The sending agent.
    pub from: String,
    /// The address as published (`agent:x`, `topic:y`, `capability:z`).
    pub to: String,
    /// The inboxes the message was routed to; each gets its own delivery state.
    pub destinations: Vec<String>,
    /// The optional `type` of the message.
    pub kind: Option<String>,
    /// 0–9, higher first.
    pub priority: u8,
    /// String headers, in the order given.
    pub headers: Vec<(String, String)>,
    /// Optional correlation id.
    pub correlation_id: Option<String>,
    /// Optional id of the message this one replies to.
    pub in_reply_to: Option<String>,
    /// Not delivered before this wall-clock time (ms since the epoch).
    pub not_before_ms: Option<u64>,
    /// Dead-lettered with reason `expired` if still unacked at this time.
    pub expires_at_ms: Option<u64>,
    /// The client id is remembered for deduplication until this time.
    pub dedupe_until_ms: Option<u64>,
    /// The raw JSON bytes of the body, exactly as validated by the server.
    pub body: Vec<u8>,
    /// Its ordering key: one message per key in flight per inbox or queue (version 2).
    pub ordering_key: Option<String>,
    /// For a request (`POST /v1/requests`): until when it is remembered as one — its replies
    /// without `to` go to its sender, and its first reply is kept for a repeated call
    /// (version 2).
    pub request_until_ms: Option<u64>,
}

/// A `Message` as version 1 wrote it: without `ordering_key` and `request_until_ms`.
#[derive(Decode)]
struct MessageV1 {
    id: String,
    from: String,
    to: String,
    destinations: Vec<String>,
    kind: Option<String>,
    priority: u8,
    headers: Vec<(String, String)>,
    correlation_id: Option<String>,
    in_reply_to: Option<String>,
    not_before_ms: Option<u64>,
    expires_at_ms: Option<u64>,
    dedupe_until_ms: Option<u64>,
    body: Vec<u8>,
}

impl From<MessageV1> for Message {
    fn from(m: MessageV1) -> Self {
        Self {
            id: m.id,
            from: m.from,
            to: m.to,
            destinations: m.destinations,
            kind: m.kind,
            priority: m.priority,
            headers: m.headers,
            correlation_id: m.correlation_id,
            in_reply_to: m.in_reply_to,
            not_before_ms: m.not_before_ms,
            expires_at_ms: m.expires_at_ms,
            dedupe_until_ms: m.dedupe_until_ms,
            body: m.body,
            ordering_key: None,
            request_until_ms: None,
        }
    }
}

/// Where a message sits in an inbox: its offset and its priority (which orders the inbox).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Encode, Decode)]
pub struct Slot {
    /// The message's offset.
    pub offset: Offset,
    /// The message's priority, 0–9.
    pub priority: u8,
}

/// One message handed out under a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct Lease {
    /// The message.
    pub slot: Slot,
    /// Deliveries so far, this one included (1 on first delivery).
    pub attempt: u32,
    /// When the lease ends, wall-clock ms since the epoch.
    pub deadline_ms: u64,
}

/// One message made ready again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct Release {
    /// The message.
    pub slot: Slot,
    /// Not delivered again before this wall-clock time (backoff or nack delay).
    pub not_before_ms: u64,
}

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, Decode)]
pub enum DeadReason {
    /// Delivered `max_attempts` times without an ack.
    MaxAttempts,
    /// A consumer nacked it with `dead_letter: true`.
    Rejected,
    /// Its `ttl_ms` passed before it was acked.
    Expired,
}

impl DeadReason {
    /// The wire name of the reason (`max_attempts`, `rejected`, `expired`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxAttempts => "max_attempts",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
        }
    }
}

/// One message moved to the dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct DeadLetter {
    /// The message.
    pub slot: Slot,
    /// Why.
    pub reason: DeadReason,
    /// Deliveries made before it was dead-lettered.
    pub attempts: u32,
}

/// A registered agent.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Agent {
    /// The agent's id.
    pub id: String,
    /// Capabilities it declares.
    pub capabilities: Vec<String>,
    /// Raw JSON bytes of its metadata object.
    pub metadata: Vec<u8>,
    /// Default lease of its deliveries, if set.
    pub lease_ms: Option<u64>,
    /// Deliveries before dead-lettering, if set.
    pub max_attempts: Option<u32>,
    /// Most messages leased at once, if set.
    pub max_in_flight: Option<u32>,
    /// Hash of the agent's token when auth is on; the token itself is never stored.
    pub token_hash: Option<Vec<u8>>,
}

/// A record read back from the log, with the header fields the framing carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Its offset.
    pub offset: Offset,
    /// Its wall-clock timestamp, ms since the epoch.
    pub timestamp_ms: u64,
    /// The record.
    pub record: Record,
}

/// The result of decoding the bytes at a position.
#[expect(
    clippy::large_enum_variant,
    reason = "moved once to the caller; boxing would allocate per record"
)]
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A whole valid record, and the number of bytes it occupies.
    Record(Frame, usize),
    /// An all-zero header: no record was ever written here.
    Zero,
    /// The bytes end before the record does; `needed` bytes would be required.
    Incomplete {
        /// Total bytes the record claims to occupy (header alone if even that is short).
        needed: usize,
    },
    /// The bytes are not a valid record.
    Corrupt(Corruption),
}

/// Appends the frame of `record` at `offset` to `buf` and returns its length in bytes.
///
/// Fails only if the payload would exceed [`MAX_PAYLOAD_BYTES`] (reported as its size).
pub fn encode(
    offset: Offset,
    timestamp_ms: u64,
    record: &Record,
    buf: &mut Vec<u8>,
) -> Result<usize, u64> {
    let start = buf.len();
    buf.resize(start + HEADER_BYTES, 0);
    // Writing into a Vec cannot fail: the configured limit bounds decoding only.
    let encoded = bincode::encode_into_std_write(record, buf, BINCODE);
    let payload_len = buf.len() - start - HEADER_BYTES;
    let len = match (encoded, u32::try_from(payload_len)) {
        (Ok(_), Ok(len)) if len <= MAX_PAYLOAD_BYTES => len,
        _ => {
            buf.truncate(start);
            return Err(payload_len as u64);
        }
    };
    let frame = buf.get_mut(start..).expect("the frame was just written");
    let (_crc_field, rest) = frame.split_at_mut(VERSION_POSITION);
    let (version_field, rest) = rest.split_at_mut(LENGTH_POSITION - VERSION_POSITION);
    let (len_field, rest) = rest.split_at_mut(OFFSET_POSITION - LENGTH_POSITION);
    let (offset_field, rest) = rest.split_at_mut(TIMESTAMP_POSITION - OFFSET_POSITION);
    let (timestamp_field, _payload) = rest.split_at_mut(HEADER_BYTES - TIMESTAMP_POSITION);
    version_field.copy_from_slice(&[VERSION, 0, 0, 0]);
    len_field.copy_from_slice(&len.to_le_bytes());
    offset_field.copy_from_slice(&offset.0.to_le_bytes());
    timestamp_field.copy_from_slice(&timestamp_ms.to_le_bytes());
    let crc = crc32fast::hash(frame.get(VERSION_POSITION..).unwrap_or_default());
    frame
        .get_mut(CRC_POSITION..VERSION_POSITION)
        .expect("the header is HEADER_BYTES long")
        .copy_from_slice(&crc.to_le_bytes());
    Ok(HEADER_BYTES + payload_len)
}

/// Encodes one frame into a new buffer.
pub fn encode_to_vec(offset: Offset, timestamp_ms: u64, record: &Record) -> Result<Vec<u8>, u64> {
    let mut buf = Vec::new();
    encode(offset, timestamp_ms, record, &mut buf)?;
    Ok(buf)
}

/// A frame whose header and CRC are valid; its payload is not decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked<'a> {
    /// The record's offset.
    pub offset: Offset,
    /// The record's timestamp.
    pub timestamp_ms: u64,
    /// The payload bytes (CRC-checked).
    pub payload: &'a [u8],
    /// The record version of the payload.
    pub version: u8,
    /// Length of the whole frame.
    pub len: usize,
}

/// The result of checking the bytes at a position without decoding the payload.
#[derive(Debug, PartialEq, Eq)]
pub enum Check<'a> {
    /// A whole frame with a valid header and CRC.
    Valid(Checked<'a>),
    /// An all-zero header.
    Zero,
    /// The bytes end before the frame does.
    Incomplete {
        /// Total bytes the frame claims to occupy (header alone if even that is short).
        needed: usize,
    },
    /// The bytes are not a valid frame.
    Corrupt(Corruption),
}

/// Checks the frame at the start of `bytes`: header fields and CRC, not the payload's
/// encoding. Never panics, whatever the bytes.
pub fn check(bytes: &[u8]) -> Check<'_> {
    let Some(header) = bytes.get(..HEADER_BYTES) else {
        if !bytes.is_empty() && bytes.iter().all(|b| *b == 0) {
            return Check::Zero;
        }
        return Check::Incomplete {
            needed: HEADER_BYTES,
        };
    };
    if header.iter().all(|b| *b == 0) {
        return Check::Zero;
    }
    let field = |at: usize, n: usize| header.get(at..at + n).unwrap_or_default();
    let stored_crc = u32::from_le_bytes(field(CRC_POSITION, 4).try_into().unwrap_or_default());
    let version = field(VERSION_POSITION, 1)
        .first()
        .copied()
        .unwrap_or_default();
    let len = u32::from_le_bytes(field(LENGTH_POSITION, 4).try_into().unwrap_or_default());
    if len > MAX_PAYLOAD_BYTES {
        return Check::Corrupt(Corruption::BadLength(len));
    }
    let total = HEADER_BYTES + len as usize;
    let Some(frame) = bytes.get(..total) else {
        return Check::Incomplete { needed: total };
    };
    let computed = crc32fast::hash(frame.get(VERSION_POSITION..).unwrap_or_default());
    if computed != stored_crc {
        return Check::Corrupt(Corruption::ChecksumMismatch {
            stored: stored_crc,
            computed,
        });
    }
    if !is_known_version(version) {
        return Check::Corrupt(Corruption::UnknownVersion(version));
    }
    if field(RESERVED_POSITION, 3).iter().any(|b| *b != 0) {
        return Check::Corrupt(Corruption::ReservedBits);
    }
    let offset = u64::from_le_bytes(field(OFFSET_POSITION, 8).try_into().unwrap_or_default());
    let timestamp_ms =
        u64::from_le_bytes(field(TIMESTAMP_POSITION, 8).try_into().unwrap_or_default());
    Check::Valid(Checked {
        offset: Offset(offset),
        timestamp_ms,
        payload: frame.get(HEADER_BYTES..).unwrap_or_default(),
        version,
        len: total,
    })
}

/// Decodes the payload of a checked frame, of any known version.
pub fn decode_checked(checked: &Checked<'_>) -> Result<Frame, Corruption> {
    let payload = checked.payload;
    let decoded = match (checked.version, payload.split_first()) {
        // Versions 1 and 2 differ only in `Message` (1) and `Backfilled` (1 and 2), variants 0
        // and 12 (one varint byte each): their other variants are laid out as now.
        (1, Some((0, message))) => bincode::decode_from_slice::<MessageV1, _>(message, BINCODE)
            .map(|(m, used)| (Record::Message(m.into()), used + 1)),
        (1 | 2, Some((12, backfilled))) => {
            bincode::decode_from_slice::<BackfilledV1, _>(backfilled, BINCODE)
                .map(|(b, used)| (b.into(), used + 1))
        }
        _ => bincode::decode_from_slice::<Record, _>(payload, BINCODE),
    };
    match decoded {
        Ok((record, used)) if used == payload.len() => Ok(Frame {
            offset: checked.offset,
            timestamp_ms: checked.timestamp_ms,
            record,
        }),
        Ok((_, used)) => Err(Corruption::Undecodable(format!(
            "{} trailing payload bytes",
            payload.len() - used
        ))),
        Err(e) => Err(Corruption::Undecodable(e.to_string())),
    }
}

/// Decodes the frame at the start of `bytes`. Never panics, whatever the bytes.
pub fn decode(bytes: &[u8]) -> Decoded {
    match check(bytes) {
        Check::Valid(checked) => match decode_checked(&checked) {
            Ok(frame) => Decoded::Record(frame, checked.len),
            Err(reason) => Decoded::Corrupt(reason),
        },
        Check::Zero => Decoded::Zero,
        Check::Incomplete { needed } => Decoded::Incomplete { needed },
        Check::Corrupt(reason) => Decoded::Corrupt(reason),
    }
}

/// Reads the offset field of a header without checking anything (for repair's resync).
pub fn peek_offset(header: &[u8]) -> Option<u64> {
    let bytes = header.get(OFFSET_POSITION..OFFSET_POSITION + 8)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}
