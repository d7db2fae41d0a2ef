//! Opening a log after a crash (or a clean stop): torn tails, corruption, index replay.
//!
//! The rules (RELIABILITY.md rule 4): after the last valid record of the **newest** segment,
//! a cut or damaged record with nothing valid after it is a torn tail: it is truncated and
//! logged (segment, offset, bytes dropped). Damage anywhere else, or followed by a valid
//! record, is corruption: recovery refuses with [`Error::Corrupt`] naming file and position.
//! The index is brought up to date by replaying the log after its `applied` watermark; an
//! index that claims more than the log holds (possible only when appends were not fsynced)
//! is cleared and rebuilt.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::dir::{self, list_segments, Segment};
use crate::error::{Corruption, Error, Result};
use crate::index::Index;
use crate::io::Disk;
use crate::position::PositionRun;
use crate::record::Frame;
use crate::segment::{self, Ending};
use crate::Offset;

/// A torn tail that recovery cut off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    /// The segment file.
    pub segment: PathBuf,
    /// Byte position where the valid records end (the new length of the file).
    pub position: u64,
    /// The offset the first dropped record would have had.
    pub offset: Offset,
    /// Bytes removed.
    pub bytes_dropped: u64,
    /// What was wrong with them.
    pub reason: String,
    /// Where the dropped bytes were kept, if they were: a tail after unwritten pages may hold
    /// complete records (never fsynced), so it is copied to `quarantine/` before the cut.
    pub quarantined: Option<PathBuf>,
}

/// What [`crate::Log::open`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments in the log.
    pub segments: usize,
    /// How far the index was current when opened (its checkpoint), if it had any state.
    pub checkpoint: Option<Offset>,
    /// Records replayed into the index.
    pub replayed_records: u64,
    /// The torn tail truncated, if any.
    pub truncated: Option<Truncation>,
    /// Whether the index was rebuilt from the whole log (it was missing, damaged, or ahead of
    /// the log).
    pub index_rebuilt: bool,
    /// Where a damaged index was moved before the rebuild (kept for inspection, never
    /// deleted), if it was.
    pub index_set_aside: Option<PathBuf>,
    /// The offset the next append gets.
    pub next_offset: Offset,
}

pub(crate) struct Recovered {
    pub(crate) report: RecoveryReport,
    pub(crate) segments: BTreeMap<Offset, Arc<Segment>>,
    pub(crate) active_len: u64,
}

struct Replay<'a> {
    index: &'a Index,
    from: Offset,
    frames: Vec<Frame>,
    runs: Vec<PositionRun>,
    run: Option<PositionRun>,
    run_end: u32,
    replayed: u64,
}

impl<'a> Replay<'a> {
    const BATCH: usize = 4096;

    /// Replays records from offset `from` on into `index`.
    fn new(index: &'a Index, from: Offset) -> Self {
        Self {
            index,
            from,
            frames: Vec::new(),
            runs: Vec::new(),
            run: None,
            run_end: 0,
            replayed: 0,
        }
    }

    fn visit(&mut self, segment: Offset, frame: &Frame, position: u64, len: u64) -> Result<()> {
        if frame.offset < self.from {
            return Ok(());
        }
        let run = self.run.get_or_insert_with(|| PositionRun {
            segment,
            first: frame.offset,
            positions: Vec::new(),
        });
        run.positions
            .push(u32::try_from(position).expect("segments stay below 4 GiB"));
        self.run_end = u32::try_from(position + len).expect("segments stay below 4 GiB");
        self.frames.push(frame.clone());
        if self.frames.len() >= Self::BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if let Some(mut run) = self.run.take() {
            run.positions.push(self.run_end);
            self.runs.push(run);
        }
        self.index.apply(&self.frames, &self.runs)?;
        self.replayed += self.frames.len() as u64;
        // A long replay writes to sled as it goes rather than holding it all in memory.
        if self.index.pending_changes() > 256 * 1024 {
            self.index.checkpoint()?;
        }
        self.frames.clear();
        self.runs.clear();
        Ok(())
    }
}

pub(crate) fn recover(
    disk: &dyn Disk,
    log_dir: &Path,
    index: &Index,
    verify_sealed: bool,
) -> Result<Recovered> {
    let listed = list_segments(disk, log_dir)?;
    if listed.is_empty() {
        let checkpoint = index.applied()?;
        if checkpoint.is_some() {
            tracing::warn!("the index describes records but the log has none; rebuilding it");
            index.clear()?;
        }
        let mut segments = BTreeMap::new();
        let first = Segment::create(disk, log_dir, Offset(0))?;
        segments.insert(Offset(0), Arc::new(first));
        let report = RecoveryReport {
            segments: 1,
            checkpoint,
            replayed_records: 0,
            truncated: None,
            index_rebuilt: checkpoint.is_some(),
            index_set_aside: None,
            next_offset: Offset(0),
        };
        return Ok(Recovered {
            report,
            segments,
            active_len: 0,
        });
    }
    let checkpoint = index.applied()?;
    let first = attempt(disk, &listed, index, checkpoint, verify_sealed)?;
    if checkpoint.is_none_or(|c| c < first.report.next_offset) {
        return Ok(first);
    }
    tracing::warn!(
        checkpoint = checkpoint.map(|c| c.0),
        next_offset = first.report.next_offset.0,
        "the index is ahead of the log (records that were never fsynced are gone); rebuilding it"
    );
    index.clear()?;
    // The first pass already truncated any torn tail; the second finds the files clean.
    let mut rebuilt = attempt(disk, &listed, index, None, false)?;
    rebuilt.report.checkpoint = checkpoint;
    rebuilt.report.truncated = first.report.truncated;
    Ok(rebuilt)
}

/// Builds `index` (a new, empty one, in a scratch directory) from the log in `log_dir`
/// without locking or changing anything there: for offline tools, also while a server writes.
/// Reads every segment in order up to its last valid record (a partial tail is where a
/// running server is writing, or a torn tail); damage before that is [`Error::Corrupt`].
/// Returns the offset after the last record applied.
pub fn replay_into(disk: &dyn Disk, log_dir: &Path, index: &Index) -> Result<Offset> {
    let listed = list_segments(disk, log_dir)?;
    let mut replay = Replay::new(index, Offset(0));
    let mut next = listed.first().map_or(Offset(0), |(b, _)| *b);
    for (i, (base, path)) in listed.iter().enumerate() {
        let file = disk
            .open(path, false)
            .map_err(|e| Error::io("open segment", path, e))?;
        let newest = i + 1 == listed.len();
        next = scan_segment(&mut replay, file.as_ref(), *base, path, next, newest)?.next_offset;
    }
    index.checkpoint()?;
    Ok(next)
}

/// One pass over the segments: checks the sealed ones before the checkpoint (CRCs only, if
/// `verify_sealed`), replays the rest into the index, truncates a torn tail.
fn attempt(
    disk: &dyn Disk,
    listed: &[(Offset, PathBuf)],
    index: &Index,
    checkpoint: Option<Offset>,
    verify_sealed: bool,
) -> Result<Recovered> {
    index.drop_positions_after(checkpoint)?;
    let first_base = listed.first().map_or(Offset(0), |(b, _)| *b);
    let from = Offset(checkpoint.map_or(0, |c| c.0 + 1).max(first_base.0));
    let start = listed
        .iter()
        .rposition(|(base, _)| *base <= from)
        .unwrap_or(0);
    let newest = listed.len() - 1;
    let mut replay = Replay::new(index, from);
    let mut segments = BTreeMap::new();
    let mut truncated = None;
    let mut next = if verify_sealed {
        first_base
    } else {
        listed.get(start).map_or(Offset(0), |(b, _)| *b)
    };
    let mut active_len = 0;
    for (i, (base, path)) in listed.iter().enumerate() {
        let file = disk
            .open(path, i == newest)
            .map_err(|e| Error::io("open segment", path, e))?;
        if i >= start {
            let (scan, truncation) = replay_segment(
                disk,
                &mut replay,
                file.as_ref(),
                *base,
                path,
                next,
                i == newest,
            )?;
            truncated = truncation.or(truncated);
            next = scan.next_offset;
            active_len = scan.valid_end;
        } else if verify_sealed {
            next = check_sealed(file.as_ref(), *base, path, i == 0, next)?;
        }
        let len = if i == newest {
            active_len
        } else {
            file.len().map_err(|e| Error::io("stat segment", path, e))?
        };
        let path = path.clone();
        segments.insert(*base, Arc::new(Segment::new(*base, path, file, len)));
    }
    if replay.replayed > 0 || checkpoint.is_none() {
        tracing::info!(
            checkpoint = checkpoint.map(|c| c.0),
            replayed = replay.replayed,
            next_offset = next.0,
            "recovered the index from the log"
        );
    }
    let report = RecoveryReport {
        segments: listed.len(),
        checkpoint,
        replayed_records: replay.replayed,
        truncated,
        index_rebuilt: checkpoint.is_none(),
        index_set_aside: None,
        next_offset: next,
    };
    Ok(Recovered {
        report,
        segments,
        active_len,
    })
}

/// Checks the frames of a sealed segment that the checkpoint covers: header, CRC and offset
/// of every record, without decoding. Returns the offset after its last record.
fn check_sealed(
    file: &dyn crate::io::DiskFile,
    base: Offset,
    path: &Path,
    first: bool,
    expected_base: Offset,
) -> Result<Offset> {
    let corrupt = |position, reason| Error::Corrupt {
        segment: path.to_path_buf(),
        position,
        reason,
    };
    if !first && base != expected_base {
        let reason = Corruption::OffsetMismatch {
            expected: expected_base.0,
            found: base.0,
        };
        return Err(corrupt(0, reason));
    }
    let scan = segment::scan(file, base, false, None).map_err(|e| with_path(e, path))?;
    if let Some(damage) = scan.damage.first() {
        return Err(corrupt(damage.position, damage.reason.clone()));
    }
    match scan.tail.judge(false) {
        Ending::Corrupt { reason, .. } | Ending::TornTail { reason, .. } => {
            Err(corrupt(scan.valid_end, reason))
        }
        Ending::Clean | Ending::Preallocated { .. } => Ok(scan.next_offset),
    }
}

/// Scans one segment from `attempt`'s start on: replays its records into the index and
/// truncates its torn tail if it is the newest; refuses any other damage.
fn replay_segment(
    disk: &dyn Disk,
    replay: &mut Replay<'_>,
    file: &dyn crate::io::DiskFile,
    base: Offset,
    path: &Path,
    expected_base: Offset,
    newest: bool,
) -> Result<(segment::Scan, Option<Truncation>)> {
    let scan = scan_segment(replay, file, base, path, expected_base, newest)?;
    let truncation = truncate_tail(disk, file, path, &scan, newest)?;
    Ok((scan, truncation))
}

/// Replays one segment's records into the index, reading only: refuses a segment that does
/// not start at `expected_base`, and damage followed by valid records (a torn tail is left to
/// the caller), except, in the `newest` segment, unwritten pages left by a crash, which end
/// its valid records as a torn tail does.
fn scan_segment(
    replay: &mut Replay<'_>,
    file: &dyn crate::io::DiskFile,
    base: Offset,
    path: &Path,
    expected_base: Offset,
    newest: bool,
) -> Result<segment::Scan> {
    let corrupt = |position, reason| Error::Corrupt {
        segment: path.to_path_buf(),
        position,
        reason,
    };
    if base != expected_base {
        let reason = Corruption::OffsetMismatch {
            expected: expected_base.0,
            found: base.0,
        };
        return Err(corrupt(0, reason));
    }
    let mut visit = |frame: &Frame, position, len| replay.visit(base, frame, position, len);
    let mut scan =
        segment::scan(file, base, false, Some(&mut visit)).map_err(|e| with_path(e, path))?;
    replay.flush()?;
    if newest {
        scan.unwritten_as_torn_tail();
    }
    if let Some(damage) = scan.damage.first() {
        return Err(corrupt(damage.position, damage.reason.clone()));
    }
    Ok(scan)
}

/// Truncates the torn tail of the newest segment (keeping a zero tail, which is preallocated
/// space); refuses either anywhere else. A tail after unwritten pages is first copied to
/// `quarantine/`.
fn truncate_tail(
    disk: &dyn Disk,
    file: &dyn crate::io::DiskFile,
    path: &Path,
    scan: &segment::Scan,
    newest: bool,
) -> Result<Option<Truncation>> {
    let (bytes, reason) = match scan.tail.judge(newest) {
        Ending::Clean => return Ok(None),
        // The writer goes on at the valid end, over the zeros.
        Ending::Preallocated { bytes } => {
            tracing::debug!(segment = %path.display(), bytes, "the newest segment has a zero tail; kept");
            return Ok(None);
        }
        Ending::TornTail { bytes, reason } => (bytes, reason),
        Ending::Corrupt { reason, .. } => {
            return Err(Error::Corrupt {
                segment: path.to_path_buf(),
                position: scan.valid_end,
                reason,
            })
        }
    };
    let quarantined = match reason {
        Corruption::Unwritten => Some(quarantine_tail(disk, file, path, scan, bytes)?),
        _ => None,
    };
    file.set_len(scan.valid_end)
        .map_err(|e| Error::io("truncate torn tail", path, e))?;
    file.sync_data()
        .map_err(|e| Error::io("fsync truncated segment", path, e))?;
    tracing::warn!(
        segment = %path.display(),
        offset = scan.next_offset.0,
        position = scan.valid_end,
        bytes_dropped = bytes,
        %reason,
        "truncated torn tail"
    );
    Ok(Some(Truncation {
        segment: path.to_path_buf(),
        position: scan.valid_end,
        offset: scan.next_offset,
        bytes_dropped: bytes,
        reason: reason.to_string(),
        quarantined,
    }))
}

/// Copies the newest segment's tail from `scan.valid_end` (`bytes` long) into
/// `<data dir>/quarantine/` durably and returns the file.
fn quarantine_tail(
    disk: &dyn Disk,
    file: &dyn crate::io::DiskFile,
    path: &Path,
    scan: &segment::Scan,
    bytes: u64,
) -> Result<PathBuf> {
    let log_dir = path.parent().unwrap_or(Path::new("."));
    let quarantine = dir::quarantine_dir(disk, log_dir.parent().unwrap_or(log_dir))?;
    let moved = dir::quarantine_region(disk, file, path, &quarantine, scan.valid_end, bytes)?;
    disk.sync_dir(&quarantine)
        .map_err(|e| Error::io("sync directory", &quarantine, e))?;
    Ok(moved)
}

fn with_path(error: Error, path: &Path) -> Error {
    match error {
        Error::Io { op, source, .. } => Error::Io {
            op,
            path: path.to_path_buf(),
            source,
        },
        other => other,
    }
}
