//! Offline checks of a data directory: [`verify`] reads every record of every segment and
//! reports every damaged region; [`repair`] moves damaged bytes into `quarantine/` (never
//! deleting them) and rewrites the segment so that the log opens again.
//!
//! A repaired segment keeps every valid record byte for byte; each offset whose record was
//! lost gets a [`Record::Quarantined`] placeholder naming the quarantine file, so offsets stay
//! consecutive. Record positions change, so repair clears the index, which the next open
//! rebuilds from the log.

use std::path::{Path, PathBuf};

use crate::dir::{self, list_segments, quarantine_dir};
use crate::error::{Corruption, Error, Result};
use crate::io::Disk;
use crate::record::{self, Record};
use crate::segment::{self, Damage, Ending};
use crate::{Index, Offset};

/// One problem found by [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The segment file.
    pub segment: PathBuf,
    /// Byte position where the damaged bytes start.
    pub position: u64,
    /// How many bytes are affected.
    pub len: u64,
    /// What is wrong.
    pub reason: Corruption,
    /// Offsets whose records are lost (empty for a torn tail: nothing there was complete).
    pub lost: std::ops::Range<u64>,
    /// A torn tail of the newest segment, which opening the log truncates by itself; every
    /// other problem stops the log from opening until [`repair`].
    pub torn_tail: bool,
}

/// What [`verify`] found in one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentReport {
    /// The file.
    pub path: PathBuf,
    /// Its base offset.
    pub base: Offset,
    /// Valid records.
    pub records: u64,
    /// File length (for the newest segment, less its preallocated zero tail).
    pub bytes: u64,
    /// Timestamps of the first and last valid records.
    pub time_range_ms: Option<(u64, u64)>,
    /// The offset after its last valid record.
    pub next_offset: Offset,
}

/// The result of [`verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Every segment, oldest first.
    pub segments: Vec<SegmentReport>,
    /// Every problem, in log order.
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    /// No problem at all.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// Problems that stop the log from opening (everything but a torn tail).
    pub fn corruption(&self) -> impl Iterator<Item = &Problem> {
        self.problems.iter().filter(|p| !p.torn_tail)
    }

    /// Total valid records.
    pub fn records(&self) -> u64 {
        self.segments.iter().map(|s| s.records).sum()
    }
}

/// Checks every CRC and offset of every segment in `<dir>/log`. Reads only: safe to run
/// while a server writes to the directory (the newest segment may then show a partial tail).
pub fn verify(disk: &dyn Disk, dir: &Path) -> Result<VerifyReport> {
    let log_dir = dir.join("log");
    let listed = list_segments(disk, &log_dir)?;
    let mut report = VerifyReport::default();
    let mut expected: Option<Offset> = None;
    for (i, (base, path)) in listed.iter().enumerate() {
        let newest = i + 1 == listed.len();
        let next_base = listed.get(i + 1).map(|(b, _)| *b);
        let file = disk
            .open(path, false)
            .map_err(|e| Error::io("open segment", path, e))?;
        let mut scan = segment::scan(file.as_ref(), *base, true, None)?;
        if newest && scan.damage.first().is_some_and(|d| d.unwritten) {
            // Unwritten pages left by a crash: the newest segment's records end there, as
            // recovery will find (the records after them were never fsynced).
            scan = segment::scan(file.as_ref(), *base, false, None)?;
            scan.unwritten_as_torn_tail();
        }
        if let Some(expected) = expected.filter(|e| e != base) {
            report.problems.push(Problem {
                segment: path.clone(),
                position: 0,
                len: 0,
                reason: Corruption::OffsetMismatch {
                    expected: expected.0,
                    found: base.0,
                },
                lost: expected.0..base.0.max(expected.0),
                torn_tail: false,
            });
        }
        for damage in &scan.damage {
            report.problems.push(problem(path, damage, false));
        }
        let ending = scan.tail.judge(newest);
        let preallocated = matches!(ending, Ending::Preallocated { .. });
        let tail = match ending {
            Ending::Clean | Ending::Preallocated { .. } => None,
            Ending::TornTail { bytes, reason } | Ending::Corrupt { bytes, reason } => {
                Some((bytes, reason))
            }
        };
        if let Some((len, reason)) = tail {
            let lost_end = next_base.map_or(scan.next_offset.0, |b| b.0.max(scan.next_offset.0));
            report.problems.push(Problem {
                segment: path.clone(),
                position: scan.valid_end,
                len,
                reason,
                lost: scan.next_offset.0..lost_end,
                torn_tail: newest,
            });
        }
        expected = Some(scan.next_offset);
        report.segments.push(SegmentReport {
            path: path.clone(),
            base: *base,
            records: scan.records,
            bytes: if preallocated {
                scan.valid_end
            } else {
                scan.file_bytes
            },
            time_range_ms: scan.time_range_ms,
            next_offset: scan.next_offset,
        });
    }
    Ok(report)
}

fn problem(path: &Path, damage: &Damage, torn_tail: bool) -> Problem {
    Problem {
        segment: path.to_path_buf(),
        position: damage.position,
        len: damage.len,
        reason: damage.reason.clone(),
        lost: damage.lost.clone(),
        torn_tail,
    }
}

/// Bytes moved aside by [`repair`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// The problem that was repaired.
    pub problem: Problem,
    /// The file in `quarantine/` that now holds the damaged bytes.
    pub file: PathBuf,
}

/// Moves every damaged region of `<dir>/log` into `<dir>/quarantine/`, rewrites the affected
/// segments without them, and clears the index at `index_dir` (rebuilt at the next open).
/// Refuses with [`Error::Locked`] while a server holds the directory.
pub fn repair(disk: &dyn Disk, dir: &Path, index_dir: &Path) -> Result<Vec<Quarantined>> {
    let log_dir = dir.join("log");
    let _lock = dir::lock(disk, dir)?;
    let report = verify(disk, dir)?;
    if report.is_clean() {
        return Ok(Vec::new());
    }
    // A whole missing segment shows as a gap before the next one: there are no bytes to move
    // aside and no place in that segment for the missing offsets. Change nothing.
    if let Some(gap) = report
        .problems
        .iter()
        .find(|p| p.len == 0 && !p.lost.is_empty())
    {
        return Err(Error::Layout {
            path: gap.segment.clone(),
            why: format!(
                "offsets {}..{} are missing before this segment (a segment file was removed); \
                 restore it from a backup: repair cannot recreate lost records",
                gap.lost.start, gap.lost.end
            ),
        });
    }
    let quarantine = quarantine_dir(disk, dir)?;
    let mut moved = Vec::new();
    for segment in &report.segments {
        let problems: Vec<&Problem> = report
            .problems
            .iter()
            .filter(|p| p.segment == segment.path)
            .collect();
        if problems.is_empty() {
            continue;
        }
        moved.extend(repair_segment(
            disk,
            &log_dir,
            &quarantine,
            segment,
            &problems,
        )?);
    }
    let index = Index::open(index_dir, 16 << 20)?;
    index.clear()?;
    Ok(moved)
}

/// Copies each problem's bytes (of the segment `file` at `path`) into its own durable file in
/// `quarantine/`.
fn quarantine_bytes(
    disk: &dyn Disk,
    file: &dyn crate::io::DiskFile,
    path: &Path,
    quarantine: &Path,
    problems: &[&Problem],
) -> Result<Vec<Quarantined>> {
    let mut moved = Vec::new();
    for problem in problems {
        let target =
            dir::quarantine_region(disk, file, path, quarantine, problem.position, problem.len)?;
        moved.push(Quarantined {
            problem: (*problem).clone(),
            file: target,
        });
    }
    disk.sync_dir(quarantine)
        .map_err(|e| Error::io("sync directory", quarantine, e))?;
    Ok(moved)
}

fn repair_segment(
    disk: &dyn Disk,
    log_dir: &Path,
    quarantine: &Path,
    segment: &SegmentReport,
    problems: &[&Problem],
) -> Result<Vec<Quarantined>> {
    let path = &segment.path;
    let file = disk
        .open(path, false)
        .map_err(|e| Error::io("open segment", path, e))?;
    let name = segment_file_name(path);
    let moved = quarantine_bytes(disk, file.as_ref(), path, quarantine, problems)?;

    // Rebuild the segment: valid frames byte for byte, placeholders for lost offsets.
    let mut out = Vec::new();
    let mut last_ts = 0;
    let placeholders = |out: &mut Vec<u8>, lost: &std::ops::Range<u64>, file: &Path, ts: u64| {
        for offset in lost.clone() {
            let record = Record::Quarantined {
                file: file.display().to_string(),
            };
            record::encode(Offset(offset), ts, &record, out).expect("a placeholder is tiny");
        }
    };
    // Nothing after a torn tail is kept (after unwritten pages there may be valid frames,
    // never fsynced; they are in quarantine with the rest of the tail).
    let tail_at = problems
        .iter()
        .filter(|p| p.torn_tail)
        .map(|p| p.position)
        .min();
    let mut pending: Vec<&Quarantined> = moved.iter().collect();
    pending.sort_by_key(|q| q.problem.position);
    let mut next = pending.into_iter().peekable();
    let mut copy = |frame: &crate::Frame, position, len| {
        if tail_at.is_some_and(|t| position >= t) {
            return Ok(());
        }
        while let Some(q) = next.next_if(|q| q.problem.position < position) {
            placeholders(&mut out, &q.problem.lost, &q.file, last_ts);
        }
        let mut bytes = vec![0u8; usize::try_from(len).unwrap_or(0)];
        file.read_at(&mut bytes, position)
            .map_err(|e| Error::io("read segment", path, e))?;
        out.extend_from_slice(&bytes);
        last_ts = frame.timestamp_ms;
        Ok(())
    };
    segment::scan(file.as_ref(), segment.base, true, Some(&mut copy))?;
    for q in next {
        placeholders(&mut out, &q.problem.lost, &q.file, last_ts);
    }
    let temp = log_dir.join(format!(".{name}.repair"));
    let new = disk
        .create(&temp)
        .map_err(|e| Error::io("create repaired segment", &temp, e))?;
    new.write_at(&out, 0)
        .map_err(|e| Error::io("write repaired segment", &temp, e))?;
    new.sync_data()
        .map_err(|e| Error::io("fsync repaired segment", &temp, e))?;
    disk.rename(&temp, path)
        .map_err(|e| Error::io("replace segment", path, e))?;
    disk.sync_dir(log_dir)
        .map_err(|e| Error::io("sync directory", log_dir, e))?;
    Ok(moved)
}

fn segment_file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
