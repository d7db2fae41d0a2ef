//! `courier-storage`: the part of Courier that makes messages durable.
//!
//! A [`Log`] is a directory of segment files (`log/<base offset>.seg`) holding CRC-checked
//! [`Record`]s with consecutive [`Offset`]s, plus a derived sled [`Index`] (`index/`). One
//! writer thread commits appends in groups: one write and one fdatasync for every append
//! queued meanwhile. This crate knows nothing of HTTP or JSON; its core is synchronous.
//!
//! # Guarantees
//! - With [`FsyncPolicy::Always`], [`Log::append`] returns only after the records are on disk
//!   (fdatasync), and they survive a crash or power loss.
//! - A torn tail of the newest segment is truncated at open and reported; damage anywhere else
//!   refuses to open ([`Error::Corrupt`], naming file and byte position) until `repair`.
//! - A failed write or fsync poisons the log: no retry, every later write fails (fail-stop).
//! - The index can be deleted at any time: [`Log::open`] rebuilds the same state from the log.
//!
//! # Example
//! ```
//! use courier_storage::{Log, LogOptions, Record};
//! let dir = tempfile::tempdir()?;
//! let (log, report) = Log::open(dir.path(), LogOptions::default())?;
//! assert_eq!(report.next_offset.0, 0);
//! let appended = log.append(1_700_000_000_000, vec![Record::Truncated { below: 0.into() }])?;
//! assert_eq!(log.read(appended.first)?.record, Record::Truncated { below: 0.into() });
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs, clippy::unwrap_used)]

mod dir;
pub mod duration;
pub mod error;
pub mod failpoint;
pub mod index;
pub mod io;
mod log;
mod options;
mod pipeline;
mod position;
pub mod record;
mod recovery;
pub mod segment;
mod shared;
pub mod sim;
pub mod state;
pub mod verify;

pub use dir::list_segments;
pub use dir::SegmentInfo;
pub use error::{Corruption, Error, Result};
pub use index::{Index, IndexSnapshot};
pub use log::Log;
pub use options::{FsyncPolicy, LogObserver, LogOptions, Retention};
pub use record::{
    Agent, Backfill, DeadLetter, DeadReason, Frame, Lease, Message, Record, Release, Slot,
};
pub use recovery::{replay_into, RecoveryReport, Truncation};
pub use shared::{Appended, LogStats};

/// A record's position in the global log: strictly increasing, one per record.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    bincode::Encode,
    bincode::Decode,
)]
pub struct Offset(pub u64);

impl From<u64> for Offset {
    fn from(value: u64) -> Self {
        Self(value)
    }
}

impl std::fmt::Display for Offset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
