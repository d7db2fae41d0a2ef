//! Where records are: a [`PositionRun`] is the positions of consecutive records in one
//! segment, as the writer makes them and the index stores them; a [`Location`] is one
//! record's place. Shared by the writer, the index, recovery and readers, below all of them.

use crate::Offset;

/// Where a record is: its segment's base offset, byte position and frame length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Location {
    /// Base offset of the segment that holds it.
    pub segment: Offset,
    /// Byte position of the frame inside the segment.
    pub position: u64,
    /// Length of the frame in bytes.
    pub len: u64,
}

/// A run of consecutive records in one segment, as the index records it.
#[derive(Debug, Clone)]
pub(crate) struct PositionRun {
    pub(crate) segment: Offset,
    pub(crate) first: Offset,
    /// Each record's byte position, then the end of the last.
    pub(crate) positions: Vec<u32>,
}

impl PositionRun {
    /// Where `offset` is, if this run holds it.
    pub(crate) fn location(&self, offset: Offset) -> Option<Location> {
        let i = usize::try_from(offset.0.checked_sub(self.first.0)?).ok()?;
        let position = u64::from(*self.positions.get(i)?);
        let end = u64::from(*self.positions.get(i + 1)?);
        Some(Location {
            segment: self.segment,
            position,
            len: end - position,
        })
    }
}
