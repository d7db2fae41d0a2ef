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
use std::sync::{Arc, RwLockWriteGuard};

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
            .or_else(|| self.frozen.as_ref()?.changes.get(key))
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

/// The value of `key`: the layers' newest change, else what sled holds.
pub(super) fn get(layers: &Layers, tree: &sled::Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
    match layers.lookup(key) {
        Some(change) => Ok(change.value().map(<[u8]>::to_vec)),
        None => super::store::get(tree, key),
    }
}

/// The keys and values in a range: sled's, with the layers' changes over them.
pub(super) fn range(
    layers: &Layers,
    tree: &sled::Tree,
    start: Bound<Vec<u8>>,
    end: Bound<Vec<u8>>,
) -> Merged {
    let overlay = layers.changes_in(&start, &end);
    Merged::new(super::store::range(tree, start, end), overlay)
}

/// Write access for applying records: reads see the batch's own writes.
pub(super) struct Txn<'a> {
    pub(super) layers: RwLockWriteGuard<'a, Layers>,
    pub(super) tree: &'a sled::Tree,
}

impl Txn<'_> {
    pub(super) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        get(&self.layers, self.tree, key)
    }

    /// Sets `key`, which may exist below.
    pub(super) fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        let changes = &mut self.layers.active.changes;
        let change = match changes.get(&key) {
            Some(Change::PutNew(_)) => Change::PutNew(value),
            _ => Change::Put(value),
        };
        changes.insert(key, change);
    }

    /// Sets `key`, which the caller knows exists in no layer and not in sled (a fresh offset).
    pub(super) fn insert_new(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.layers
            .active
            .changes
            .insert(key, Change::PutNew(value));
    }

    /// Sets `key`, which the merged view shows absent. A deletion of it in this layer means a
    /// lower layer has it (so it is an ordinary set); otherwise no layer and not sled has it,
    /// and it is set as new, so that removing it again in this layer leaves nothing for sled.
    pub(super) fn insert_absent(&mut self, key: Vec<u8>, value: Vec<u8>) {
        let changes = &mut self.layers.active.changes;
        let change = match changes.get(&key) {
            Some(Change::Delete) => Change::Put(value),
            _ => Change::PutNew(value),
        };
        changes.insert(key, change);
    }

    pub(super) fn remove(&mut self, key: Vec<u8>) {
        let changes = &mut self.layers.active.changes;
        if let Some(Change::PutNew(_)) = changes.get(&key) {
            changes.remove(&key);
        } else {
            changes.insert(key, Change::Delete);
        }
    }

    /// Every key and value with `prefix`, merged over all layers.
    pub(super) fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let start = Bound::Included(prefix.to_vec());
        self.range(start, prefix_end(prefix)).collect()
    }

    pub(super) fn range(&self, start: Bound<Vec<u8>>, end: Bound<Vec<u8>>) -> Merged {
        range(&self.layers, self.tree, start, end)
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
