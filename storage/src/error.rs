//! The storage engine's one error type. Every variant carries the context an operator needs
//! (which file, which byte position, which operation) so that a message can say what to do.

use std::path::PathBuf;

/// What was wrong with a damaged record. Carried by [`Error::Corrupt`] and by verify reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Corruption {
    /// The header's version byte is not one this build reads.
    UnknownVersion(u8),
    /// Reserved header bytes are not zero.
    ReservedBits,
    /// The length field points past the end of the segment or over the record limit.
    BadLength(u32),
    /// The stored CRC32 does not match the bytes.
    ChecksumMismatch {
        /// CRC stored in the header.
        stored: u32,
        /// CRC computed over the bytes read.
        computed: u32,
    },
    /// The CRC matched but the payload is not a valid record.
    Undecodable(String),
    /// The record's offset is not the one its place in the log requires.
    OffsetMismatch {
        /// Offset the position requires.
        expected: u64,
        /// Offset stored in the record.
        found: u64,
    },
    /// The segment ends in the middle of a record.
    Truncated,
    /// Zero bytes where a record header was expected, with non-zero bytes after them.
    Zeroed,
    /// Pages that were never written back (zeros to a page boundary) before records written
    /// after them, in the newest segment after a crash: nothing from there on was fsynced.
    Unwritten,
}

impl std::fmt::Display for Corruption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UnknownVersion(v) => write!(f, "unknown record version {v}"),
            Self::ReservedBits => write!(f, "reserved header bytes are not zero"),
            Self::BadLength(len) => write!(f, "impossible payload length {len}"),
            Self::ChecksumMismatch { stored, computed } => {
                write!(
                    f,
                    "crc mismatch (stored {stored:#010x}, computed {computed:#010x})"
                )
            }
            Self::Undecodable(why) => write!(f, "payload does not decode: {why}"),
            Self::OffsetMismatch { expected, found } => {
                write!(f, "offset {found} where {expected} was expected")
            }
            Self::Truncated => write!(f, "record cut short by the end of the segment"),
            Self::Zeroed => write!(f, "zeroed header followed by data"),
            Self::Unwritten => write!(
                f,
                "pages never written back before a crash, followed by records that were never fsynced"
            ),
        }
    }
}

/// Errors of the storage engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file operation failed.
    #[error("{op} failed on {}: {source}", path.display())]
    Io {
        /// The operation, e.g. `"write segment"`.
        op: &'static str,
        /// The file or directory it was applied to.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A damaged record outside the torn tail: the log refuses to open until it is repaired.
    #[error(
        "corrupt record in {} at byte {position}: {reason}; run `courierctl verify` for a full \
         report and `courierctl repair` to move the damaged bytes to quarantine/",
        segment.display()
    )]
    Corrupt {
        /// The segment file.
        segment: PathBuf,
        /// Byte position of the damaged record inside the segment.
        position: u64,
        /// What is wrong with it.
        reason: Corruption,
    },
    /// A record is larger than the configured limit.
    #[error("record of {size_bytes} bytes is over the limit of {max_bytes} bytes")]
    TooLarge {
        /// Encoded size of the record.
        size_bytes: u64,
        /// The limit.
        max_bytes: u64,
    },
    /// An earlier write or fsync failed; the engine refuses every further write (fail-stop).
    /// Restart the process to recover from the files on disk.
    #[error("the log is poisoned by an earlier write or fsync failure; restart to recover")]
    Poisoned,
    /// A bug: a thread of the log (writer, indexer, checkpointer) or a completion callback
    /// panicked. The log is poisoned like after a failed write; restart the process to
    /// recover from the files on disk.
    #[error("{what} panicked ({message}); the log refuses further writes, restart to recover")]
    Panicked {
        /// What panicked: `the writer thread`, `a completion callback`, ...
        what: &'static str,
        /// The panic's message.
        message: String,
    },
    /// The log was closed.
    #[error("the log is closed")]
    Closed,
    /// The requested offset is not in the log (never written, or deleted by retention).
    #[error("offset {0} is not in the log")]
    NotFound(u64),
    /// The sled index failed. The index is derived: deleting `index/` rebuilds it from the log.
    #[error("index error: {0}{advice}", advice = index_advice(.0))]
    Index(#[from] sled::Error),
    /// A value in the index does not decode. Delete `index/` to rebuild it from the log.
    #[error(
        "the index is damaged ({why}); delete the index/ directory to rebuild it from the log"
    )]
    IndexDamaged {
        /// What did not decode.
        why: String,
    },
    /// The directory layout is not one this engine wrote.
    #[error("unexpected layout in {}: {why}", path.display())]
    Layout {
        /// The offending path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Another process holds the data directory.
    #[error("{} is locked by another process (is a courier server running?)", path.display())]
    Locked {
        /// The directory.
        path: PathBuf,
    },
}

/// Result alias of the storage engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The error for a caught panic of `what`, with the panic's message.
    pub(crate) fn panicked(what: &'static str, payload: &(dyn std::any::Any + Send)) -> Self {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".to_owned());
        Self::Panicked { what, message }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// What to do about a sled error: free space for a full disk, else rebuild the index.
fn index_advice(error: &sled::Error) -> &'static str {
    match error {
        sled::Error::Io(e) if e.kind() == std::io::ErrorKind::StorageFull => {
            "; the disk is full: free space, then start again"
        }
        _ => "; the index can be rebuilt by deleting the index/ directory",
    }
}
