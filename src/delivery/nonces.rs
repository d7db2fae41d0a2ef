//! The used nonces of signed requests, in memory: which (signer, nonce) pairs were spent and
//! until when they count.
//!
//! Every signed publish looks its nonce up and adds it, and the window (five minutes) holds
//! millions of them under load, so a nonce is kept as a fixed-size [`NonceKey`], a keyed
//! 128-bit hash of its signer and nonce, rather than as a string: no string built, copied or
//! allocated per lookup, and the map hashes 8 bytes. The hash key is random per process (it
//! is never stored; the index keeps the signer and nonce themselves and start-up hashes them
//! again), so a client cannot choose nonces that collide. Two different nonces share a key
//! with a chance of about 2^-128 per pair (about 2^-64 even among billions of nonces), and a
//! collision could only refuse a fresh nonce as used: a key remembers the latest time any of
//! its nonces counts until, so it never forgets a used one early.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::sync::LazyLock;

/// A used nonce as memory keeps it: a keyed 128-bit hash of its signer and nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NonceKey(u64, u64);

/// The SipHash key of every [`NonceKey`] in the process, so that two states built from the
/// same records agree.
static KEY: LazyLock<RandomState> = LazyLock::new(RandomState::new);

impl NonceKey {
    /// The key of `signer`'s `nonce`: SipHash under [`KEY`] of two inputs that differ in
    /// their first byte, one per half.
    pub fn of(signer: &str, nonce: &str) -> Self {
        let half = |which: u8| {
            let mut hasher = KEY.build_hasher();
            hasher.write_u8(which);
            // Lengths first, so that no two (signer, nonce) pairs feed the same bytes.
            hasher.write_usize(signer.len());
            hasher.write(signer.as_bytes());
            hasher.write_usize(nonce.len());
            hasher.write(nonce.as_bytes());
            hasher.finish()
        };
        Self(half(0), half(1))
    }
}

impl Hash for NonceKey {
    /// Already a keyed hash: its first half is the map's hash.
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0);
    }
}

/// The map hasher of [`NonceKey`]s: passes their first half through.
#[derive(Debug, Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used; any other input is still mixed in.
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

/// Used nonces and when each stops counting.
#[derive(Debug, Default)]
pub struct Nonces {
    /// Key → until when it counts (epoch ms).
    until: HashMap<NonceKey, u64, BuildHasherDefault<Prehashed>>,
    /// The same by until when, earliest first (the nonces signed in one second share a
    /// time). A key whose time changed since stays listed under its old one too.
    expiries: BTreeMap<u64, Vec<NonceKey>>,
}

impl Nonces {
    /// Whether `signer`'s `nonce` was used and still counts at `now_ms`.
    pub fn used(&self, signer: &str, nonce: &str, now_ms: u64) -> bool {
        self.until
            .get(&NonceKey::of(signer, nonce))
            .is_some_and(|until| *until >= now_ms)
    }

    /// Remembers `signer`'s `nonce` as used until `until_ms` (or later, if it already was).
    pub fn put(&mut self, signer: &str, nonce: &str, until_ms: u64) {
        let key = NonceKey::of(signer, nonce);
        // The latest time wins: a nonce is used again only after its window, so only a
        // collision of two nonces (or loading them in another order) could bring an earlier.
        let until = self.until.entry(key).or_insert(until_ms);
        *until = (*until).max(until_ms);
        self.expiries.entry(until_ms).or_default().push(key);
    }

    /// The earliest time a nonce stops counting, if any is remembered.
    pub fn next_expiry(&self) -> Option<u64> {
        self.expiries.first_key_value().map(|(until, _)| *until)
    }

    /// Forgets the nonces that counted until `clock_ms` or before (a nonce used again since,
    /// with a later time, stays).
    pub fn forget(&mut self, clock_ms: u64) {
        while let Some(entry) = self.expiries.first_entry() {
            if *entry.key() > clock_ms {
                break;
            }
            let until = *entry.key();
            for key in entry.remove() {
                if self.until.get(&key) == Some(&until) {
                    self.until.remove(&key);
                }
            }
        }
    }

    /// How many nonces are remembered.
    pub fn len(&self) -> usize {
        self.until.len()
    }

    /// Whether no nonce is remembered.
    pub fn is_empty(&self) -> bool {
        self.until.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_tell_signers_and_nonces_apart_and_agree_across_sets() {
        assert_eq!(NonceKey::of("alice", "n1"), NonceKey::of("alice", "n1"));
        assert_ne!(NonceKey::of("alice", "n1"), NonceKey::of("bob", "n1"));
        assert_ne!(NonceKey::of("ab", "c"), NonceKey::of("a", "bc"));
        let (mut one, mut two) = (Nonces::default(), Nonces::default());
        one.put("alice", "n1", 10);
        two.put("alice", "n1", 10);
        assert_eq!(one.until, two.until);
    }

    #[test]
    fn a_key_keeps_the_latest_time_it_counts_until() {
        let mut nonces = Nonces::default();
        nonces.put("alice", "n1", 20);
        nonces.put("alice", "n1", 10);
        nonces.forget(10);
        assert!(
            nonces.used("alice", "n1", 20),
            "not forgotten at the earlier time"
        );
        nonces.forget(20);
        assert!(nonces.is_empty());
    }
}
