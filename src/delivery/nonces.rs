//! The used nonces of signed requests, in memory: which (signer, nonce) pairs were spent and
//! until when they count.
//!
//! Every signed publish looks its nonce up and adds it, and the window (five minutes) holds
//! millions of them under load, so a nonce is kept as a fixed-size [`NonceKey`], a keyed
//! 128-bit hash of its signer and nonce, rather than as a string: no allocation and no
//! string hashing per lookup. The hash keys are random per process (what the keys are is
//! never stored; the index keeps the signer and nonce themselves and start-up hashes them
//! again), so a client cannot choose nonces that collide. A collision of two different
//! nonces, about one in 2^64 even among billions, could only refuse a fresh nonce as used,
//! never accept a used one.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::LazyLock;

/// A used nonce as memory keeps it: a keyed 128-bit hash of its signer and nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NonceKey(u64, u64);

/// Two independently keyed SipHash instances, one per half of a [`NonceKey`]; the same in
/// every [`Nonces`] of the process, so that two states built from the same records agree.
static KEYS: LazyLock<(RandomState, RandomState)> =
    LazyLock::new(|| (RandomState::new(), RandomState::new()));

impl NonceKey {
    /// The key of `signer`'s `nonce`.
    pub fn of(signer: &str, nonce: &str) -> Self {
        let half = |keys: &RandomState| {
            let mut hasher = keys.build_hasher();
            // Lengths first, so that no two (signer, nonce) pairs feed the same bytes.
            hasher.write_usize(signer.len());
            hasher.write(signer.as_bytes());
            hasher.write_usize(nonce.len());
            hasher.write(nonce.as_bytes());
            hasher.finish()
        };
        Self(half(&KEYS.0), half(&KEYS.1))
    }
}

/// Used nonces and when each stops counting.
#[derive(Debug, Default)]
pub struct Nonces {
    /// Key → until when it counts (epoch ms).
    until: HashMap<NonceKey, u64>,
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

    /// Remembers `signer`'s `nonce` as used until `until_ms`.
    pub fn put(&mut self, signer: &str, nonce: &str, until_ms: u64) {
        let key = NonceKey::of(signer, nonce);
        self.until.insert(key, until_ms);
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
}
