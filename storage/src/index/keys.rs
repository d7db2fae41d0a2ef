//! Byte layout of index keys. Integers in keys are big-endian so that byte order is numeric
//! order; strings are length-prefixed (u16 BE) so that no id can run into the next field.

use crate::record::Slot;
use crate::Offset;

use super::TimerKind;

pub(super) const APPLIED_KEY: &[u8] = b"mapplied";
pub(super) const CLOCK_KEY: &[u8] = b"mclock";
pub(super) const TRUNCATED_KEY: &[u8] = b"mtruncated";
pub(super) const P: u8 = b'p';
pub(super) const I: u8 = b'i';
pub(super) const T: u8 = b't';
pub(super) const D: u8 = b'd';
pub(super) const U: u8 = b'u';
pub(super) const X: u8 = b'x';
pub(super) const A: u8 = b'a';
pub(super) const S: u8 = b's';
pub(super) const N: u8 = b'n';
pub(super) const O: u8 = b'o';
pub(super) const B: u8 = b'b';
pub(super) const H: u8 = b'h';
pub(super) const C: u8 = b'c';
pub(super) const R: u8 = b'r';
pub(super) const K: u8 = b'k';
pub(super) const Y: u8 = b'y';
pub(super) const W: u8 = b'w';
/// Used nonces one key each, as indexes before [`super::nonces`] kept them (migrated at open).
pub(super) const Z: u8 = b'z';

#[expect(
    clippy::big_endian_bytes,
    reason = "index keys sort numerically only as big-endian"
)]
pub(super) fn be64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

#[expect(
    clippy::big_endian_bytes,
    reason = "index keys sort numerically only as big-endian"
)]
pub(super) fn from_be64(bytes: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(bytes.get(..8).unwrap_or(&[0; 8]));
    u64::from_be_bytes(a)
}

pub(super) fn u64_le(bytes: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(bytes.get(..8).unwrap_or(&[0; 8]));
    u64::from_le_bytes(a)
}

/// The last 8 bytes of a key as a big-endian u64 (the offset that ends most keys).
pub(super) fn trailing_offset(key: &[u8]) -> u64 {
    from_be64(key.get(key.len().saturating_sub(8)..).unwrap_or_default())
}

#[expect(
    clippy::big_endian_bytes,
    reason = "index keys sort numerically only as big-endian"
)]
pub(super) fn push_str(key: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).expect("ids are validated far below 64 KiB");
    key.extend_from_slice(&len.to_be_bytes());
    key.extend_from_slice(s.as_bytes());
}

/// Reads a length-prefixed string at the start of `bytes`; returns it and the rest.
#[expect(
    clippy::big_endian_bytes,
    reason = "index keys sort numerically only as big-endian"
)]
pub(super) fn take_str(bytes: &[u8]) -> Option<(String, &[u8])> {
    let len = usize::from(u16::from_be_bytes(bytes.get(..2)?.try_into().ok()?));
    let s = std::str::from_utf8(bytes.get(2..2 + len)?).ok()?.to_owned();
    Some((s, bytes.get(2 + len..)?))
}

pub(super) fn with_prefix(prefix: u8, rest: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + rest.len());
    key.push(prefix);
    key.extend_from_slice(rest);
    key
}

/// `prefix`, inbox, 9 − priority, offset: delivery order within an inbox.
pub(super) fn slot_key(prefix: &[u8], inbox: &str, slot: Slot) -> Vec<u8> {
    let mut key = prefix.to_vec();
    push_str(&mut key, inbox);
    key.push(9u8.saturating_sub(slot.priority));
    key.extend_from_slice(&be64(slot.offset.0));
    key
}

pub(super) fn parse_slot_key(rest: &[u8]) -> Option<(String, Slot)> {
    let (inbox, rest) = take_str(rest)?;
    let rank = *rest.first()?;
    let offset = from_be64(rest.get(1..9)?);
    Some((
        inbox,
        Slot {
            offset: Offset(offset),
            priority: 9u8.saturating_sub(rank),
        },
    ))
}

pub(super) fn timer_key(due_ms: u64, kind: TimerKind, inbox: &str, slot: Slot) -> Vec<u8> {
    let mut prefix = vec![T];
    prefix.extend_from_slice(&be64(due_ms));
    prefix.push(match kind {
        TimerKind::Due => 0,
        TimerKind::Expiry => 1,
    });
    slot_key(&prefix, inbox, slot)
}

pub(super) fn parse_timer_key(rest: &[u8]) -> Option<super::Timer> {
    let due_ms = from_be64(rest.get(..8)?);
    let kind = match rest.get(8)? {
        0 => TimerKind::Due,
        _ => TimerKind::Expiry,
    };
    let (inbox, slot) = parse_slot_key(rest.get(9..)?)?;
    Some(super::Timer {
        due_ms,
        kind,
        inbox,
        slot,
    })
}

pub(super) fn inbox_prefix(prefix: u8, inbox: &str) -> Vec<u8> {
    let mut key = vec![prefix];
    push_str(&mut key, inbox);
    key
}

/// `prefix`, a name (inbox or topic), offset (u64 BE): one message under that name, in offset
/// order.
fn named_offset_key(prefix: u8, name: &str, offset: Offset) -> Vec<u8> {
    let mut key = inbox_prefix(prefix, name);
    key.extend_from_slice(&be64(offset.0));
    key
}

/// `d`, inbox, offset: a dead letter.
pub(super) fn dead_key(inbox: &str, offset: Offset) -> Vec<u8> {
    named_offset_key(D, inbox, offset)
}

/// `k`, inbox, offset: the ordering key of a message routed to an inbox.
pub(super) fn ordering_key(inbox: &str, offset: Offset) -> Vec<u8> {
    named_offset_key(K, inbox, offset)
}

pub(super) fn subscription_key(agent: &str, topic: &str) -> Vec<u8> {
    let mut key = inbox_prefix(S, agent);
    push_str(&mut key, topic);
    key
}

/// `o`, topic, offset: the messages of a topic in offset order.
pub(super) fn topic_offset_key(topic: &str, offset: Offset) -> Vec<u8> {
    named_offset_key(O, topic, offset)
}

/// `b`, agent, pattern: where the backfill of a subscription stands.
pub(super) fn backfill_key(agent: &str, pattern: &str) -> Vec<u8> {
    let mut key = inbox_prefix(B, agent);
    push_str(&mut key, pattern);
    key
}

/// `prefix` (`x` for client ids, `y` for requests, `z` for used nonces of older indexes),
/// remembered-until ms, id: the expiry order of the remembered client ids (`u`), requests (`r`)
/// or nonces.
pub(super) fn expiry_key(prefix: u8, until_ms: u64, id: &str) -> Vec<u8> {
    let mut key = vec![prefix];
    key.extend_from_slice(&be64(until_ms));
    key.extend_from_slice(id.as_bytes());
    key
}

/// The remembered-until ms and the id of an [`expiry_key`] (whatever its prefix).
pub(super) fn parse_expiry_key(key: &[u8]) -> (u64, String) {
    let until_ms = from_be64(key.get(1..9).unwrap_or_default());
    let id = String::from_utf8_lossy(key.get(9..).unwrap_or_default()).into_owned();
    (until_ms, id)
}

pub(super) fn positions_key(first: Offset) -> Vec<u8> {
    with_prefix(P, &be64(first.0))
}

/// The location of `offset` in a positions value whose run starts at `first`.
pub(super) fn decode_location(first: u64, value: &[u8], offset: Offset) -> Option<super::Location> {
    let segment = u64_le(value.get(..8)?);
    let i = usize::try_from(offset.0.checked_sub(first)?).ok()?;
    let at = |n: usize| -> Option<u64> {
        let b = value.get(8 + 4 * n..12 + 4 * n)?;
        Some(u64::from(u32::from_le_bytes(b.try_into().ok()?)))
    };
    let position = at(i)?;
    let end = at(i + 1)?;
    Some(super::Location {
        segment: Offset(segment),
        position,
        len: end - position,
    })
}
