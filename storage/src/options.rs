//! How a log is opened and kept: the file system, the fsync policy, sizes, index options,
//! and the retention rule. Plain data, below everything that uses it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::io::{Disk, FileDisk};

/// When appended records are made durable (SPEC §4 `fsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// fdatasync before any append completes (group commit shares one fsync between all the
    /// appends of a batch).
    Always,
    /// Appends complete after the write; the writer fdatasyncs at most this long after.
    Interval(Duration),
    /// Appends complete after the write; the OS decides when bytes reach the disk (segments
    /// are still synced when sealed and when the log closes).
    Never,
}

impl std::str::FromStr for FsyncPolicy {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "always" => Ok(Self::Always),
            "never" => Ok(Self::Never),
            _ => {
                let interval = s.strip_prefix("interval:").ok_or_else(|| {
                    format!("fsync policy `{s}` is not one of always, never, interval:<duration>")
                })?;
                let every = crate::duration::parse(interval).map_err(|e| e.to_string())?;
                Ok(Self::Interval(every))
            }
        }
    }
}

/// Everything [`crate::Log::open`] needs besides the directory.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// The file system; [`FileDisk`] unless simulating.
    pub disk: Arc<dyn Disk>,
    /// When appends are made durable.
    pub fsync: FsyncPolicy,
    /// Roll to a new segment once the active one would grow past this.
    pub segment_bytes: u64,
    /// Largest accepted record frame.
    pub max_record_bytes: u64,
    /// sled's page cache (its default of 1 GiB is far more than the index needs).
    pub index_cache_bytes: u64,
    /// Where the sled index lives; `<dir>/index` by default.
    pub index_dir: Option<PathBuf>,
    /// Check the CRC of every record of the segments the index checkpoint covers when opening
    /// (no decoding: about as fast as reading the files), so that damage anywhere refuses the
    /// open. Off, opening reads only the log after the checkpoint, whatever the log's size, and
    /// older records are checked when read and by `verify`.
    pub verify_sealed: bool,
    /// How often index changes are written to sled (a checkpoint). Recovery replays at most
    /// about this much of the log; changes that cancel out in between never reach sled.
    pub checkpoint_interval: Duration,
    /// Zero-fill the next segment ahead of use, on a thread of its own (`log/.next.seg`, made
    /// the new segment by a rename at a roll). Appends then overwrite blocks that exist and
    /// pages that are cached, so an fdatasync writes no metadata and a write allocates
    /// nothing. Paused while less than four segments' worth of space is free (looked at again
    /// at every roll).
    pub preallocate: bool,
    /// Told of every fdatasync and group commit as it happens (metrics); none by default.
    pub observer: Option<Arc<dyn LogObserver>>,
}

/// What the writer tells of its work as it does it, on its own thread: implementations must
/// be cheap and must not block (an atomic add, a histogram observation).
pub trait LogObserver: Send + Sync + std::fmt::Debug {
    /// An fdatasync of a segment took `took`.
    fn synced(&self, took: Duration);
    /// A group commit made `records` records durable (visible to readers).
    fn committed(&self, records: u64);
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            disk: Arc::new(FileDisk),
            fsync: FsyncPolicy::Always,
            segment_bytes: 64 << 20,
            max_record_bytes: 16 << 20,
            index_cache_bytes: 64 << 20,
            index_dir: None,
            verify_sealed: true,
            checkpoint_interval: Duration::from_secs(1),
            preallocate: true,
            observer: None,
        }
    }
}

/// Whole segments to delete (SPEC §4 `retention.*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Keep the log's total size under this, deleting only segments with nothing pending.
    pub max_bytes: Option<u64>,
    /// Delete segments whose newest record is older than this, pending or not.
    pub max_age_ms: Option<u64>,
}
