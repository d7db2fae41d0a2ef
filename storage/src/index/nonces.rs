//! Used nonces of signed requests in sled: written a checkpoint's worth at a time, dropped a
//! bucket at a time.
//!
//! Every signed request adds a nonce that must be remembered for about five minutes and is
//! then forgotten, and nothing but start-up ever reads them back. One sled key per nonce cost a
//! sled insert at one checkpoint and a sled remove at a later one (several microseconds
//! each, the largest part of a signed publish's extra cost). Here a checkpoint writes the
//! nonces it carries as one list per **bucket** of 1,024 ms of expiry time, keyed `w`,
//! bucket (u64 BE), the checkpoint's `applied` offset (u64 BE), and drops, in the same
//! atomic batch, every bucket that ended before the index's clock. Readers filter by that
//! clock, so a nonce kept a little past its window (until its bucket goes) is never
//! reported as used.

use super::keys::{be64, parse_expiry_key, W, Z};
use super::{decode_value, encode_value};
use crate::error::Result;

/// Bits of `until_ms` one bucket spans.
const BUCKET_BITS: u32 = 10;

fn bucket_key(bucket: u64, seq: u64) -> Vec<u8> {
    let mut key = vec![W];
    key.extend_from_slice(&be64(bucket));
    key.extend_from_slice(&be64(seq));
    key
}

/// Adds to `batch` the lists of `nonces` (those still remembered at `clock_ms`) under `seq`,
/// and the removal of every stored bucket that ended by `clock_ms`.
pub(super) fn write(
    tree: &sled::Tree,
    batch: &mut sled::Batch,
    nonces: &[(u64, String)],
    seq: u64,
    clock_ms: u64,
) -> Result<()> {
    let mut buckets: std::collections::BTreeMap<u64, Vec<(u64, &str)>> = Default::default();
    for (until_ms, key) in nonces {
        if *until_ms > clock_ms {
            buckets
                .entry(until_ms >> BUCKET_BITS)
                .or_default()
                .push((*until_ms, key));
        }
    }
    for (bucket, list) in buckets {
        batch.insert(bucket_key(bucket, seq), encode_value(&list));
    }
    // Bucket b holds expiries up to ((b + 1) << BUCKET_BITS) - 1: all of them are past once
    // that is at most `clock_ms`, so the buckets below (clock_ms + 1) >> BUCKET_BITS go.
    let end = bucket_key(clock_ms.saturating_add(1) >> BUCKET_BITS, 0);
    for item in tree.range(vec![W]..end) {
        batch.remove(item?.0);
    }
    Ok(())
}

/// Every used nonce stored in sled and still remembered at `clock_ms`: (until ms, key).
pub(super) fn read(tree: &sled::Tree, clock_ms: u64) -> Result<Vec<(u64, String)>> {
    let start = bucket_key(clock_ms >> BUCKET_BITS, 0);
    let mut all = Vec::new();
    for item in tree.range(start..vec![W + 1]) {
        let list: Vec<(u64, String)> = decode_value(&item?.1)?;
        all.extend(list.into_iter().filter(|(until, _)| *until > clock_ms));
    }
    Ok(all)
}

/// Moves the nonces an older index kept one key each (`z`, until ms, key) into buckets, once,
/// at open.
pub(super) fn migrate(tree: &sled::Tree) -> Result<()> {
    let mut legacy = Vec::new();
    let mut batch = sled::Batch::default();
    for item in tree.scan_prefix([Z]) {
        let (key, _) = item?;
        legacy.push(parse_expiry_key(&key));
        batch.remove(key);
    }
    if legacy.is_empty() {
        return Ok(());
    }
    // Their own sequence number: no checkpoint's `applied` offset reaches it.
    write(tree, &mut batch, &legacy, u64::MAX, 0)?;
    tree.apply_batch(batch)?;
    tree.flush()?;
    Ok(())
}
