//! How the index lies in sled. Every key is stored as itself except inbox entries (`i`):
//! those are packed into **buckets** of 1,024 consecutive offsets per inbox and priority,
//! keyed like an entry whose offset is `offset >> 10`, with a bincode list of
//! `(offset, value)` as value. A stream of pending messages then costs one sled write per
//! bucket at a checkpoint instead of one per message (sled's copy-on-write nodes make each
//! write cost microseconds). Readers above this module only ever see per-entry keys.

use std::collections::BTreeMap;
use std::ops::Bound;

use super::keys::{be64, trailing_offset, I};
use super::overlay::Change;
use super::{decode_value, encode_value};
use crate::error::Result;

const BUCKET_BITS: u32 = 10;

/// Whether `key` is an inbox entry key: `i`, u16 length, inbox, rank, u64 offset.
fn is_entry_key(key: &[u8]) -> bool {
    let (Some(&first), Some(len)) = (key.first(), key.get(1..3)) else {
        return false;
    };
    let len = usize::from(len.first().copied().unwrap_or(0)) << 8
        | usize::from(len.get(1).copied().unwrap_or(0));
    first == I && key.len() == 1 + 2 + len + 1 + 8
}

fn bucket_key(entry_key: &[u8]) -> Vec<u8> {
    let split = entry_key.len() - 8;
    let mut key = entry_key.get(..split).unwrap_or_default().to_vec();
    key.extend_from_slice(&be64(trailing_offset(entry_key) >> BUCKET_BITS));
    key
}

fn entry_key(bucket_key: &[u8], offset: u64) -> Vec<u8> {
    let split = bucket_key.len() - 8;
    let mut key = bucket_key.get(..split).unwrap_or_default().to_vec();
    key.extend_from_slice(&be64(offset));
    key
}

fn decode_bucket(value: &[u8]) -> Result<Vec<(u64, Vec<u8>)>> {
    decode_value(value)
}

/// The stored value of `key`.
pub(super) fn get(tree: &sled::Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
    if !is_entry_key(key) {
        return Ok(tree.get(key)?.map(|v| v.to_vec()));
    }
    let bucket_key = bucket_key(key);
    let Some(bucket) = tree.get(&bucket_key)? else {
        return Ok(None);
    };
    let offset = trailing_offset(key);
    LAST_BUCKET.with(|cell| {
        let mut last = cell.borrow_mut();
        // The same bucket again (an inbox drained in order touches each one 1,024 times):
        // reuse its table of entries if sled still holds exactly the same bytes. sled hands
        // out a stored value as a shared buffer, and the one kept here stays alive (so its
        // address cannot be reused): the same address and length are the same bytes, without
        // comparing kilobytes on every lookup. A copy elsewhere is just indexed anew.
        let hit = last.as_ref().is_some_and(|l| {
            l.bytes.as_ptr() == bucket.as_ptr()
                && l.bytes.len() == bucket.len()
                && l.key == bucket_key
        });
        if !hit {
            *last = Some(Positions {
                table: index_bucket(&bucket)?,
                key: bucket_key,
                bytes: bucket,
            });
        }
        let l = last.as_ref().expect("just set");
        Ok(l.table
            .binary_search_by_key(&offset, |(o, _, _)| *o)
            .ok()
            .and_then(|i| l.table.get(i))
            .and_then(|(_, start, len)| l.bytes.get(*start..*start + *len))
            .map(<[u8]>::to_vec))
    })
}

/// A bucket read from sled with the position of every entry's value in it.
struct Positions {
    key: Vec<u8>,
    bytes: sled::IVec,
    /// (offset, start, length) per entry, sorted by offset.
    table: Vec<(u64, usize, usize)>,
}

thread_local! {
    /// The bucket this thread looked into last (the indexer's hot path).
    static LAST_BUCKET: std::cell::RefCell<Option<Positions>> = const { std::cell::RefCell::new(None) };
}

/// The positions of the entries of an encoded bucket, without copying their values: a
/// bucket holds up to 1,024 entries, and decoding them all (an allocation each) for every
/// lookup made updates of checkpointed entries cost tens of microseconds.
///
/// The bucket is a bincode-2 (standard configuration) `Vec<(u64, Vec<u8>)>`: a varint count,
/// then per entry a varint offset, a varint length and the bytes. Varints are one byte below
/// 251, else a marker (251, 252, 253) followed by a little-endian u16, u32 or u64.
fn index_bucket(bytes: &[u8]) -> Result<Vec<(u64, usize, usize)>> {
    let damaged = || crate::error::Error::IndexDamaged {
        why: "malformed inbox bucket".into(),
    };
    let mut rest = bytes;
    let varint = |rest: &mut &[u8]| -> Result<u64> {
        let (&first, tail) = rest.split_first().ok_or_else(damaged)?;
        let width = match first {
            0..=250 => {
                *rest = tail;
                return Ok(u64::from(first));
            }
            251 => 2,
            252 => 4,
            253 => 8,
            _ => return Err(damaged()),
        };
        let (number, tail) = tail.split_at_checked(width).ok_or_else(damaged)?;
        let mut le = [0u8; 8];
        le.get_mut(..width)
            .ok_or_else(damaged)?
            .copy_from_slice(number);
        *rest = tail;
        Ok(u64::from_le_bytes(le))
    };
    let count = usize::try_from(varint(&mut rest)?).map_err(|_| damaged())?;
    let mut table = Vec::with_capacity(count.min(1 << BUCKET_BITS));
    for _ in 0..count {
        let offset = varint(&mut rest)?;
        let len = usize::try_from(varint(&mut rest)?).map_err(|_| damaged())?;
        let start = bytes.len() - rest.len();
        rest = rest.get(len..).ok_or_else(damaged)?;
        table.push((offset, start, len));
    }
    Ok(table)
}

/// The stored keys and values in a range, buckets unpacked, in key order.
pub(super) fn range(tree: &sled::Tree, start: Bound<Vec<u8>>, end: Bound<Vec<u8>>) -> Entries {
    let to_bucket = |bound: &Bound<Vec<u8>>| match bound {
        Bound::Included(k) | Bound::Excluded(k) if is_entry_key(k) => {
            Bound::Included(bucket_key(k))
        }
        other => other.clone(),
    };
    let inner = tree.range((to_bucket(&start), to_bucket(&end)));
    Entries {
        inner,
        unpacked: Vec::new().into_iter(),
        start,
        end,
    }
}

/// Iterator of [`range`].
pub(super) struct Entries {
    inner: sled::Iter,
    unpacked: std::vec::IntoIter<(Vec<u8>, Vec<u8>)>,
    start: Bound<Vec<u8>>,
    end: Bound<Vec<u8>>,
}

impl Entries {
    fn in_range(&self, key: &[u8]) -> bool {
        let after_start = match &self.start {
            Bound::Included(s) => key >= s.as_slice(),
            Bound::Excluded(s) => key > s.as_slice(),
            Bound::Unbounded => true,
        };
        let before_end = match &self.end {
            Bound::Included(e) => key <= e.as_slice(),
            Bound::Excluded(e) => key < e.as_slice(),
            Bound::Unbounded => true,
        };
        after_start && before_end
    }
}

impl Iterator for Entries {
    type Item = Result<(Vec<u8>, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((key, value)) = self.unpacked.next() {
                if self.in_range(&key) {
                    return Some(Ok((key, value)));
                }
                continue;
            }
            let (key, value) = match self.inner.next()? {
                Ok(kv) => kv,
                Err(e) => return Some(Err(e.into())),
            };
            if !is_entry_key(&key) {
                return Some(Ok((key.to_vec(), value.to_vec())));
            }
            match decode_bucket(&value) {
                Ok(entries) => {
                    let unpacked: Vec<_> = entries
                        .into_iter()
                        .map(|(o, v)| (entry_key(&key, o), v))
                        .collect();
                    self.unpacked = unpacked.into_iter();
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// The sled batch that writes `changes` over what sled holds (read-modify-write of buckets).
pub(super) fn batch(tree: &sled::Tree, changes: &BTreeMap<Vec<u8>, Change>) -> Result<sled::Batch> {
    let mut batch = sled::Batch::default();
    let mut buckets: BTreeMap<Vec<u8>, Vec<(u64, &Change)>> = BTreeMap::new();
    for (key, change) in changes {
        if is_entry_key(key) {
            let offset = trailing_offset(key);
            buckets
                .entry(bucket_key(key))
                .or_default()
                .push((offset, change));
            continue;
        }
        match change {
            Change::Put(v) | Change::PutNew(v) => batch.insert(key.as_slice(), v.as_slice()),
            Change::Delete => batch.remove(key.as_slice()),
        }
    }
    for (key, changes) in buckets {
        let mut entries: BTreeMap<u64, Vec<u8>> = match tree.get(&key)? {
            Some(bucket) => decode_bucket(&bucket)?.into_iter().collect(),
            None => BTreeMap::new(),
        };
        for (offset, change) in changes {
            match change {
                Change::Put(v) | Change::PutNew(v) => entries.insert(offset, v.clone()),
                Change::Delete => entries.remove(&offset),
            };
        }
        if entries.is_empty() {
            batch.remove(key);
        } else {
            let list: Vec<(u64, Vec<u8>)> = entries.into_iter().collect();
            batch.insert(key, encode_value(&list));
        }
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_positions_agree_with_decoding_the_whole_bucket() {
        // Offsets and value lengths on both sides of every varint width boundary.
        let offsets = [
            0u64,
            1,
            250,
            251,
            252,
            65_535,
            65_536,
            1 << 32,
            u64::MAX - 1,
        ];
        let entries: Vec<(u64, Vec<u8>)> = offsets
            .iter()
            .enumerate()
            .map(|(i, o)| (*o, vec![i as u8; [0, 3, 250, 251, 300][i % 5]]))
            .collect();
        let bucket = encode_value(&entries);
        for (offset, value) in &entries {
            let table = index_bucket(&bucket).unwrap();
            let (_, start, len) = table.iter().find(|(o, _, _)| o == offset).unwrap();
            assert_eq!(&bucket[*start..start + len], value.as_slice());
        }
        assert_eq!(decode_bucket(&bucket).unwrap(), entries);
        for cut in 0..bucket.len() - 1 {
            // A cut bucket is an error, never a panic.
            assert!(index_bucket(&bucket[..cut]).is_err(), "cut at {cut}");
        }
    }
}
