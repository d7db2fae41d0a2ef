//! One segment file: its name, and the scan that reads it back and classifies its end.
//!
//! A segment is a sequence of frames ([`crate::record`]) with consecutive offsets starting at
//! the base offset in its name, `log/<base, 20 digits>.seg`. The scan decides what the bytes
//! after the last valid record are:
//! - nothing, or only zeros: a clean end;
//! - a damaged or cut record with no valid record anywhere after it: a **torn tail**, which
//!   recovery truncates in the newest segment (a write that a crash interrupted);
//! - a damaged record followed by a valid one: **corruption**, never truncated silently.

use std::io;

use crate::error::Corruption;
use crate::io::DiskFile;
use crate::record::{self, Check, Frame, HEADER_BYTES, VERSION_POSITION};
use crate::Offset;

/// File name suffix of segments.
pub const SUFFIX: &str = ".seg";
/// The page size assumed for write-back: a crash may persist any subset of a write's pages.
pub const PAGE_BYTES: u64 = 4096;
const CHUNK_BYTES: usize = 4 << 20;

/// The file name of the segment whose first offset is `base`.
pub fn file_name(base: Offset) -> String {
    format!("{:020}{SUFFIX}", base.0)
}

/// The base offset named by a segment file name, if it is one.
pub fn parse_file_name(name: &str) -> Option<Offset> {
    let digits = name.strip_suffix(SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(Offset)
}

/// How the valid records of a segment end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// The last record ends at the end of the file.
    Clean,
    /// Only zero bytes follow the last record (never written: preallocation or a crash).
    Zeroed {
        /// How many zero bytes.
        bytes: u64,
    },
    /// A cut or damaged record with nothing valid after it.
    Torn {
        /// Bytes from the end of the last valid record to the end of the file.
        bytes: u64,
        /// What is wrong with the first of them.
        reason: Corruption,
    },
}

/// What the bytes after a segment's valid records mean, by the torn-tail rule
/// ([`Tail::judge`]), which recovery and `verify` both apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Nothing follows the valid records.
    Clean,
    /// Zeros after the newest segment's records: preallocated space, which the next records
    /// overwrite. Kept.
    Preallocated {
        /// How many zero bytes.
        bytes: u64,
    },
    /// A write a crash interrupted, at the end of the newest segment: cut at recovery.
    TornTail {
        /// Bytes from the end of the last valid record to the end of the file.
        bytes: u64,
        /// What is wrong with the first of them.
        reason: Corruption,
    },
    /// A zero or torn tail anywhere but the newest segment, which was sealed whole: damage.
    Corrupt {
        /// Bytes from the end of the last valid record to the end of the file.
        bytes: u64,
        /// What is wrong with the first of them.
        reason: Corruption,
    },
}

impl Tail {
    /// The torn-tail rule: only the log's `newest` segment may end in a zero tail
    /// (preallocated space) or a torn tail (a write a crash interrupted, which recovery cuts);
    /// a sealed segment ends exactly at its last record, so anything else there is corruption.
    pub fn judge(&self, newest: bool) -> Ending {
        match self {
            Self::Clean => Ending::Clean,
            Self::Zeroed { bytes } if newest => Ending::Preallocated { bytes: *bytes },
            Self::Zeroed { bytes } => Ending::Corrupt {
                bytes: *bytes,
                reason: Corruption::Zeroed,
            },
            Self::Torn { bytes, reason } if newest => Ending::TornTail {
                bytes: *bytes,
                reason: reason.clone(),
            },
            Self::Torn { bytes, reason } => Ending::Corrupt {
                bytes: *bytes,
                reason: reason.clone(),
            },
        }
    }
}

/// A damaged region followed by a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Whether the region looks like pages that were never written back rather than damaged
    /// bytes: zeros from its start to the next page boundary, or a run of at least a header's
    /// worth of zeros ending at a page boundary inside it. A crash leaves this when a later
    /// page of a write reached the disk and an earlier one did not (no ordered data on the
    /// file system); in the newest segment nothing from there on was acknowledged, since the
    /// fdatasync that would have acknowledged it writes every page before it.
    pub unwritten: bool,
    /// Byte position where the damage starts.
    pub position: u64,
    /// Bytes up to the next valid record.
    pub len: u64,
    /// What is wrong with the first record there.
    pub reason: Corruption,
    /// The offsets whose records are lost: from the one expected at `position` up to the
    /// offset of the next valid record.
    pub lost: std::ops::Range<u64>,
}

/// What a scan found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// The segment's base offset.
    pub base: Offset,
    /// Valid records seen.
    pub records: u64,
    /// Position just after the last valid record.
    pub valid_end: u64,
    /// Length of the file.
    pub file_bytes: u64,
    /// The offset after the last valid record (the next one to write).
    pub next_offset: Offset,
    /// Timestamps of the first and last valid records.
    pub time_range_ms: Option<(u64, u64)>,
    /// Damaged regions with valid records after them (all of them if `continue_after_damage`,
    /// else at most the first, after which the scan stopped).
    pub damage: Vec<Damage>,
    /// How the file ends after the last valid record.
    pub tail: Tail,
}

impl Scan {
    /// For the newest segment, stopped at its first damage: if that damage looks unwritten
    /// ([`Damage::unwritten`]), the valid records end there and the rest of the file is a torn
    /// tail. Returns whether it did.
    pub fn unwritten_as_torn_tail(&mut self) -> bool {
        let Some(first) = self.damage.first().filter(|d| d.unwritten) else {
            return false;
        };
        self.valid_end = first.position;
        self.next_offset = Offset(first.lost.start);
        self.tail = Tail::Torn {
            bytes: self.file_bytes - first.position,
            reason: Corruption::Unwritten,
        };
        self.damage.clear();
        true
    }
}

/// What a position holds, owned (the reader's buffer is reused).
#[expect(
    clippy::large_enum_variant,
    reason = "moved once per record, never stored"
)]
enum At {
    Valid {
        offset: Offset,
        timestamp_ms: u64,
        len: u64,
        frame: Option<Frame>,
    },
    Zero,
    Incomplete,
    Corrupt(Corruption),
}

impl At {
    fn from_check(check: Check<'_>, decode: bool) -> Self {
        match check {
            Check::Valid(checked) if decode => match record::decode_checked(&checked) {
                Ok(frame) => Self::Valid {
                    offset: checked.offset,
                    timestamp_ms: checked.timestamp_ms,
                    len: checked.len as u64,
                    frame: Some(frame),
                },
                Err(reason) => Self::Corrupt(reason),
            },
            Check::Valid(checked) => Self::Valid {
                offset: checked.offset,
                timestamp_ms: checked.timestamp_ms,
                len: checked.len as u64,
                frame: None,
            },
            Check::Zero => Self::Zero,
            Check::Incomplete { .. } => Self::Incomplete,
            Check::Corrupt(reason) => Self::Corrupt(reason),
        }
    }
}

/// What [`scan`] does with each valid record.
pub type Visitor<'v> = &'v mut dyn FnMut(&Frame, u64, u64) -> crate::Result<()>;

struct Reader<'a> {
    file: &'a dyn DiskFile,
    len: u64,
    buf: Vec<u8>,
    start: u64,
}

impl<'a> Reader<'a> {
    /// Up to `want` bytes from `position` (fewer only at the end of the file).
    fn bytes(&mut self, position: u64, want: usize) -> io::Result<&[u8]> {
        let end = position.saturating_add(want as u64).min(self.len);
        let have_end = self.start + self.buf.len() as u64;
        if position < self.start || end > have_end {
            let read_end = position
                .saturating_add(want.max(CHUNK_BYTES) as u64)
                .min(self.len);
            self.buf
                .resize(usize::try_from(read_end - position).unwrap_or(0), 0);
            self.file.read_at(&mut self.buf, position)?;
            self.start = position;
        }
        let from = usize::try_from(position - self.start).unwrap_or(0);
        let to = usize::try_from(end - self.start).unwrap_or(0);
        Ok(self.buf.get(from..to).unwrap_or_default())
    }

    /// What is at `position`; the payload is decoded only if `decode`.
    fn at(&mut self, position: u64, decode: bool) -> io::Result<At> {
        let file_len = self.len;
        let needed = match record::check(self.bytes(position, HEADER_BYTES)?) {
            Check::Incomplete { needed } if position + needed as u64 <= file_len => needed,
            other => return Ok(At::from_check(other, decode)),
        };
        Ok(At::from_check(
            record::check(self.bytes(position, needed)?),
            decode,
        ))
    }

    /// The first position after `from` that holds a valid frame with an offset ≥ `min_offset`.
    fn next_valid(&mut self, from: u64, min_offset: u64) -> io::Result<Option<(u64, Offset)>> {
        let mut position = from;
        while position + HEADER_BYTES as u64 <= self.len {
            let header = self.bytes(position, HEADER_BYTES)?;
            if header
                .get(VERSION_POSITION)
                .is_some_and(|v| record::is_known_version(*v))
            {
                if let At::Valid { offset, .. } = self.at(position, false)? {
                    if offset.0 >= min_offset {
                        return Ok(Some((position, offset)));
                    }
                }
            }
            position += 1;
        }
        Ok(None)
    }

    /// Whether `from..to` holds only zeros.
    fn zero_range(&mut self, from: u64, to: u64) -> io::Result<bool> {
        let mut position = from;
        while position < to {
            let want = usize::try_from(to - position)
                .unwrap_or(CHUNK_BYTES)
                .min(CHUNK_BYTES);
            let chunk = self.bytes(position, want)?;
            if chunk.is_empty() || chunk.iter().any(|b| *b != 0) {
                return Ok(false);
            }
            position += chunk.len() as u64;
        }
        Ok(true)
    }

    /// Whether the damaged region `from..to` looks unwritten (see [`Damage::unwritten`]).
    fn unwritten(&mut self, from: u64, to: u64) -> io::Result<bool> {
        let first_boundary = (from / PAGE_BYTES + 1) * PAGE_BYTES;
        if first_boundary <= to && self.zero_range(from, first_boundary)? {
            return Ok(true);
        }
        let mut boundary = first_boundary;
        while boundary <= to {
            let run_start = boundary - HEADER_BYTES as u64;
            if run_start >= from && self.zero_range(run_start, boundary)? {
                return Ok(true);
            }
            boundary += PAGE_BYTES;
        }
        Ok(false)
    }

    fn zero_from(&mut self, from: u64) -> io::Result<bool> {
        self.zero_range(from, self.len)
    }
}

/// Reads every record of a segment in order and classifies what follows the last one. With a
/// visitor, each record is decoded and passed as `visit(frame, position, len)`; without, only
/// headers, offsets and CRCs are checked (fast). With `continue_after_damage` the scan resumes
/// at the next valid record after each damaged region (verify); without, it stops at the first.
pub fn scan(
    file: &dyn DiskFile,
    base: Offset,
    continue_after_damage: bool,
    mut visit: Option<Visitor<'_>>,
) -> crate::Result<Scan> {
    let len = file
        .len()
        .map_err(|e| crate::Error::io("stat segment", "", e))?;
    let mut reader = Reader {
        file,
        len,
        buf: Vec::new(),
        start: 0,
    };
    let io_err = |e| crate::Error::io("read segment", "", e);
    let mut scan = Scan {
        base,
        records: 0,
        valid_end: 0,
        file_bytes: len,
        next_offset: base,
        time_range_ms: None,
        damage: Vec::new(),
        tail: Tail::Clean,
    };
    let mut position = 0u64;
    while position < len {
        let decode = visit.is_some();
        let reason = match reader.at(position, decode).map_err(io_err)? {
            At::Valid {
                offset,
                timestamp_ms: ts,
                len: n,
                frame,
            } if offset == scan.next_offset => {
                if let (Some(visit), Some(frame)) = (visit.as_mut(), frame) {
                    visit(&frame, position, n)?;
                }
                scan.time_range_ms = Some(scan.time_range_ms.map_or((ts, ts), |(a, _)| (a, ts)));
                scan.records += 1;
                position += n;
                scan.valid_end = position;
                scan.next_offset = Offset(offset.0 + 1);
                continue;
            }
            At::Valid { offset, .. } => Corruption::OffsetMismatch {
                expected: scan.next_offset.0,
                found: offset.0,
            },
            At::Zero if reader.zero_from(position).map_err(io_err)? => {
                scan.tail = Tail::Zeroed {
                    bytes: len - position,
                };
                return Ok(scan);
            }
            At::Zero => Corruption::Zeroed,
            At::Incomplete => Corruption::Truncated,
            At::Corrupt(reason) => reason,
        };
        let Some(next) = resync(&mut reader, &mut scan, position, reason)? else {
            return Ok(scan);
        };
        if !continue_after_damage {
            return Ok(scan);
        }
        position = next;
    }
    Ok(scan)
}

/// After a bad record at `position`: records the damage and returns where the next valid
/// record starts, or, if none follows, records a torn tail and returns `None`.
fn resync(
    reader: &mut Reader<'_>,
    scan: &mut Scan,
    position: u64,
    reason: Corruption,
) -> crate::Result<Option<u64>> {
    let next = reader
        .next_valid(position + 1, scan.next_offset.0)
        .map_err(|e| crate::Error::io("read segment", "", e))?;
    let Some((next, next_offset)) = next else {
        scan.tail = Tail::Torn {
            bytes: reader.len - position,
            reason,
        };
        return Ok(None);
    };
    let unwritten = reader
        .unwritten(position, next)
        .map_err(|e| crate::Error::io("read segment", "", e))?;
    scan.damage.push(Damage {
        unwritten,
        position,
        len: next - position,
        reason,
        lost: scan.next_offset.0..next_offset.0,
    });
    scan.next_offset = next_offset;
    Ok(Some(next))
}
