//! In-memory layers of index changes over sled.
//!
//! [`Index::apply`](super::Index) writes only to the **active** layer, in memory. A
//! checkpoint freezes the active layer (a new empty one takes its place), writes the frozen
//! one to sled as one atomic batch together with the `applied` watermark, flushes sled, and
//! drops it. Reads look at the active layer, then the frozen one, then sled. A key created
//! and removed within one active layer (a message published and acked between checkpoints,
//! the common case) never reaches sled at all.

use std::collections::BTreeMap;
use std::iter::Peekable;
use std::ops::Bound;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};

use crate::error::Result;
use crate::Offset;

/// One change to one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Change {
    /// The key has this value; lower layers may hold an older one.
    Put(Vec<u8>),
    /// The key has this value and no lower layer has the key: removing it removes the change.
    PutNew(Vec<u8>),
    /// The key is gone.
    Delete,
}

impl Change {
    pub(super) fn value(&self) -> Option<&[u8]> {
        match self {
            Self::Put(v) | Self::PutNew(v) => Some(v),
            Self::Delete => None,
        }
    }
}

/// A key and its newest value in the layers (`None`: deleted).
pub(super) type KeyChange = (Vec<u8>, Option<Vec<u8>>);

/// Changes not yet in sled, and how far in the log they go.
#[derive(Debug, Default)]
pub(super) struct Layer {
    pub(super) changes: BTreeMap<Vec<u8>, Change>,
    /// Nonces used since the previous layer: (until ms, key) ([`super::nonces`]).
    pub(super) nonces: Vec<(u64, String)>,
    pub(super) applied: Option<Offset>,
}

/// The active layer and, during a checkpoint, the frozen one being written.
#[derive(Debug, Default)]
pub(super) struct Layers {
    pub(super) active: Layer,
    pub(super) frozen: Option<Arc<Layer>>,
}

impl Layers {
    /// The newest change to `key` in the layers, if any.
    pub(super) fn lookup(&self, key: &[u8]) -> Option<&Change> {
        self.active
            .changes
            .get(key)
            .or_else(|| self.frozen_change(key))
    }

    /// The frozen layer's change to `key`, if a checkpoint is under way and it has one.
    fn frozen_change(&self, key: &[u8]) -> Option<&Change> {
        self.frozen.as_ref()?.changes.get(key)
    }

    /// The layers' changes in `range`, newest winning, in key order.
    pub(super) fn changes_in(
        &self,
        start: &Bound<Vec<u8>>,
        end: &Bound<Vec<u8>>,
    ) -> Vec<KeyChange> {
        let range: (Bound<&[u8]>, Bound<&[u8]>) = (as_slice(start), as_slice(end));
        let mut merged: BTreeMap<&[u8], Option<&[u8]>> = BTreeMap::new();
        if let Some(frozen) = &self.frozen {
            for (k, c) in frozen.changes.range::<[u8], _>(range) {
                merged.insert(k, c.value());
            }
        }
        for (k, c) in self.active.changes.range::<[u8], _>(range) {
            merged.insert(k, c.value());
        }
        merged
            .into_iter()
            .map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec)))
            .collect()
    }

    pub(super) fn applied(&self) -> Option<Option<Offset>> {
        if self.active.applied.is_some() {
            return Some(self.active.applied);
        }
        self.frozen.as_ref().map(|f| f.applied)
    }
}

fn as_slice(bound: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match bound {
        Bound::Included(v) => Bound::Included(v.as_slice()),
        Bound::Excluded(v) => Bound::Excluded(v.as_slice()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// The exclusive end of the keys that start with `prefix`.
pub(super) fn prefix_end(prefix: &[u8]) -> Bound<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Bound::Excluded(end);
        }
    }
    Bound::Unbounded
}

/// The value of `key`: the layers' newest change (looked up under the lock), else what sled
/// holds (read after the lock is released, so that nobody waits on the layers while sled is
/// slow, as it is while a checkpoint writes).
pub(super) fn get(
    layers: &RwLock<Layers>,
    tree: &sled::Tree,
    key: &[u8],
) -> Result<Option<Vec<u8>>> {
    let layered = read(layers)
        .lookup(key)
        .map(|c| c.value().map(<[u8]>::to_vec));
    match layered {
        Some(value) => Ok(value),
        None => super::store::get(tree, key),
    }
}

/// The keys and values in a range: sled's, with the layers' changes over them.
pub(super) fn range(
    layers: &RwLock<Layers>,
    tree: &sled::Tree,
    start: Bound<Vec<u8>>,
    end: Bound<Vec<u8>>,
) -> Merged {
    let overlay = read(layers).changes_in(&start, &end);
    Merged::new(super::store::range(tree, start, end), overlay)
}

/// The layers for reading. A panic while they were written (the indexer's, which poisons the
/// log) leaves them as far as it got: readers go on, writes are refused anyway.
pub(super) fn read(layers: &RwLock<Layers>) -> RwLockReadGuard<'_, Layers> {
    layers.read().unwrap_or_else(PoisonError::into_inner)
}

/// Write access for applying records, one batch at a time.
///
/// The batch's changes collect here and reach the active layer together in
/// [`Txn::install`], so readers never see half a batch and never wait while the batch reads
/// sled (which a checkpoint's write holds for milliseconds). Reads see the batch's own writes.
/// The caller holds the index's apply lock for the Txn's life, so no other batch and no
/// checkpoint changes the active layer meanwhile, and the kind of each change (which depends
/// on what the active layer holds) stays right until installed.
pub(super) struct Txn<'a> {
    layers: &'a RwLock<Layers>,
    tree: &'a sled::Tree,
    /// The batch's changes over the active layer; `None`: the active layer's change to the
    /// key is taken out (a key created and removed between two checkpoints).
    changes: BTreeMap<Vec<u8>, Option<Change>>,
    /// Nonces the batch used: (until ms, key).
    pub(super) nonces: Vec<(u64, String)>,
    /// The last offset the batch applies.
    pub(super) applied: Option<Offset>,
}

impl<'a> Txn<'a> {
    pub(super) fn new(layers: &'a RwLock<Layers>, tree: &'a sled::Tree) -> Self {
        Self {
            layers,
            tree,
            changes: BTreeMap::new(),
            nonces: Vec::new(),
            applied: None,
        }
    }

    /// Puts the batch's changes into the active layer, at once.
    pub(super) fn install(self) {
        let mut layers = self.layers.write().unwrap_or_else(PoisonError::into_inner);
        for (key, change) in self.changes {
            match change {
                Some(change) => layers.active.changes.insert(key, change),
                None => layers.active.changes.remove(&key),
            };
        }
        layers.active.nonces.extend(self.nonces);
        if self.applied.is_some() {
            layers.active.applied = self.applied;
        }
    }

    /// `test` of the change the active layer will hold for `key`, the batch's first.
    fn active_change(&self, key: &[u8], test: impl FnOnce(Option<&Change>) -> bool) -> bool {
        match self.changes.get(key) {
            Some(change) => test(change.as_ref()),
            None => test(read(self.layers).active.changes.get(key)),
        }
    }

    /// The greatest key in `start..=end` whose change in the active layer (with the batch's
    /// over it) is new to the layers, with its value; `None` if that key's change is another
    /// kind, or no key of the range has a change there.
    pub(super) fn newest_new_in_active(
        &self,
        start: Bound<Vec<u8>>,
        end: Bound<Vec<u8>>,
    ) -> Option<(Vec<u8>, Vec<u8>)> {
        let bounds = (start, end);
        let batch = self.changes.range(bounds.clone()).next_back();
        let layers = read(self.layers);
        let active = layers.active.changes.range(bounds).next_back();
        let change = match (batch, active) {
            (Some((bk, bc)), Some((ak, _))) if bk >= ak => bc.as_ref(),
            (Some((_, bc)), None) => bc.as_ref(),
            (_, Some((ak, ac))) => return new_value(ak, ac),
            (None, None) => None,
        };
        let (key, change) = batch.map(|(k, _)| (k, change))?;
        new_value(key, change?)
    }

    pub(super) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let layered = match self.changes.get(key) {
            Some(Some(change)) => return Ok(change.value().map(<[u8]>::to_vec)),
            // Taken out of the active layer: what lies below it.
            Some(None) => read(self.layers)
                .frozen_change(key)
                .map(|c| c.value().map(<[u8]>::to_vec)),
            None => read(self.layers)
                .lookup(key)
                .map(|c| c.value().map(<[u8]>::to_vec)),
        };
        match layered {
            Some(value) => Ok(value),
            None => super::store::get(self.tree, key),
        }
    }

    /// Sets `key`, which may exist below.
    pub(super) fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        let change = if self.active_change(&key, |c| matches!(c, Some(Change::PutNew(_)))) {
            Change::PutNew(value)
        } else {
            Change::Put(value)
        };
        self.changes.insert(key, Some(change));
    }

    /// Sets `key`, which the caller knows exists in no layer and not in sled (a fresh offset).
    pub(super) fn insert_new(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.changes.insert(key, Some(Change::PutNew(value)));
    }

    /// Sets `key`, which the merged view shows absent. A deletion of it in this layer means a
    /// lower layer has it (so it is an ordinary set); otherwise no layer and not sled has it,
    /// and it is set as new, so that removing it again in this layer leaves nothing for sled.
    pub(super) fn insert_absent(&mut self, key: Vec<u8>, value: Vec<u8>) {
        let change = if self.active_change(&key, |c| matches!(c, Some(Change::Delete))) {
            Change::Put(value)
        } else {
            Change::PutNew(value)
        };
        self.changes.insert(key, Some(change));
    }

    pub(super) fn remove(&mut self, key: Vec<u8>) {
        let change = if self.active_change(&key, |c| matches!(c, Some(Change::PutNew(_)))) {
            None
        } else {
            Some(Change::Delete)
        };
        self.changes.insert(key, change);
    }

    /// Every key and value with `prefix`, merged over all layers.
    pub(super) fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let start = Bound::Included(prefix.to_vec());
        self.range(start, prefix_end(prefix)).collect()
    }

    pub(super) fn range(&self, start: Bound<Vec<u8>>, end: Bound<Vec<u8>>) -> Merged {
        let overlay = {
            let layers = read(self.layers);
            let mut merged: BTreeMap<Vec<u8>, Option<Vec<u8>>> =
                layers.changes_in(&start, &end).into_iter().collect();
            let bounds: (Bound<&[u8]>, Bound<&[u8]>) = (as_slice(&start), as_slice(&end));
            for (key, change) in self.changes.range::<[u8], _>(bounds) {
                let below = match change {
                    Some(change) => Some(change.value().map(<[u8]>::to_vec)),
                    None => layers
                        .frozen_change(key)
                        .map(|c| c.value().map(<[u8]>::to_vec)),
                };
                match below {
                    Some(value) => merged.insert(key.clone(), value),
                    None => merged.remove(key),
                };
            }
            merged.into_iter().collect()
        };
        Merged::new(super::store::range(self.tree, start, end), overlay)
    }
}

fn new_value(key: &[u8], change: &Change) -> Option<(Vec<u8>, Vec<u8>)> {
    match change {
        Change::PutNew(value) => Some((key.to_vec(), value.clone())),
        Change::Put(_) | Change::Delete => None,
    }
}

/// Sled's entries merged with the layers' changes, in key order.
pub(super) struct Merged {
    sled: Peekable<super::store::Entries>,
    overlay: Peekable<std::vec::IntoIter<KeyChange>>,
}

impl Merged {
    pub(super) fn new(sled: super::store::Entries, overlay: Vec<KeyChange>) -> Self {
        Self {
            sled: sled.peekable(),
            overlay: overlay.into_iter().peekable(),
        }
    }
}

impl Iterator for Merged {
    type Item = Result<(Vec<u8>, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let from_overlay = match (self.sled.peek(), self.overlay.peek()) {
                (None, None) => return None,
                (Some(Err(_)), _) => return self.sled.next(),
                (Some(Ok(_)), None) => false,
                (None, Some(_)) => true,
                (Some(Ok((sled_key, _))), Some((key, _))) => {
                    let ordering = sled_key.as_slice().cmp(key.as_slice());
                    if ordering == std::cmp::Ordering::Equal {
                        self.sled.next(); // the layer's change replaces sled's value
                    }
                    ordering != std::cmp::Ordering::Less
                }
            };
            if from_overlay {
                let (key, value) = self.overlay.next()?;
                if let Some(value) = value {
                    return Some(Ok((key, value)));
                }
            } else {
                return self.sled.next();
            }
        }
    }
}
