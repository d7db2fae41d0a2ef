//! The data directory and its files: the lock, the segment files (listed, created, adopted
//! from the preallocated `log/.next.seg`), `quarantine/`, and a damaged index set aside.
//!
//! ```text
//! <dir>/log/<base offset, 20 digits>.seg   segments
//! <dir>/log/.next.seg                      the next segment, zero-filled ahead of use
//! <dir>/log/.lock                          held while the log is open or repaired
//! <dir>/index/                             sled (derived)
//! <dir>/quarantine/<segment>.<position>.bad bytes moved aside
//! ```
//!
//! Every file or directory entry created here is made durable (the file, then its directory)
//! before it is used.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

use crate::error::{Error, Result};
use crate::io::{DirLock, Disk, DiskFile, FileDisk};
use crate::segment;
use crate::Offset;

/// The name of the preallocated next segment in `log/`.
pub(crate) const PREPARED_NAME: &str = ".next.seg";

/// Takes the data directory's lock (`log/.lock`), held while the log is open or repaired.
/// Another holder (a running server) is [`Error::Locked`].
pub(crate) fn lock(disk: &dyn Disk, dir: &Path) -> Result<DirLock> {
    let lock_path = dir.join("log").join(".lock");
    disk.lock(&lock_path).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock => Error::Locked {
            path: dir.to_path_buf(),
        },
        _ => Error::io("lock", &lock_path, e),
    })
}

/// The segment files in `log_dir`, oldest first. Other non-hidden files are an error.
pub fn list_segments(disk: &dyn Disk, log_dir: &Path) -> Result<Vec<(Offset, PathBuf)>> {
    let names = disk
        .list_dir(log_dir)
        .map_err(|e| Error::io("list directory", log_dir, e))?;
    let mut segments = Vec::new();
    for name in names {
        if name.starts_with('.') {
            continue;
        }
        let base = segment::parse_file_name(&name).ok_or_else(|| Error::Layout {
            path: log_dir.join(&name),
            why: "not a segment file (<20-digit base offset>.seg); move it out of log/".into(),
        })?;
        segments.push((base, log_dir.join(name)));
    }
    segments.sort();
    Ok(segments)
}

/// One segment's description, for stats and tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// First offset.
    pub base: Offset,
    /// File path.
    pub path: PathBuf,
    /// Bytes of records (a preallocated active segment's file is longer).
    pub bytes: u64,
}

/// A segment as readers see it.
#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) base: Offset,
    pub(crate) path: PathBuf,
    pub(crate) file: Box<dyn DiskFile>,
    /// Bytes of records: the file's length, less the zero tail a preallocated active segment
    /// has. The writer advances it for the active segment.
    pub(crate) len: AtomicU64,
}

impl Segment {
    /// Creates the empty segment whose first offset is `base` and makes it durable: the file,
    /// then its entry in `log_dir` (a new file needs an fsync of its directory). Nothing may
    /// be written to it before this returns.
    pub(crate) fn create(disk: &dyn Disk, log_dir: &Path, base: Offset) -> Result<Self> {
        let path = log_dir.join(crate::segment::file_name(base));
        let file = disk
            .create(&path)
            .map_err(|e| Error::io("create segment", &path, e))?;
        file.sync_data()
            .map_err(|e| Error::io("fsync new segment", &path, e))?;
        crate::failpoint::crash("segment.created");
        disk.sync_dir(log_dir)
            .map_err(|e| Error::io("sync directory", log_dir, e))?;
        Ok(Self::new(base, path, file, 0))
    }

    /// Makes the prepared (zero-filled, synced) file `log_dir/.next.seg` the segment whose first
    /// offset is `base`: renamed, then the directory synced. Nothing may be written to it
    /// before this returns.
    pub(crate) fn adopt(
        disk: &dyn Disk,
        log_dir: &Path,
        base: Offset,
        file: Box<dyn DiskFile>,
    ) -> Result<Self> {
        let path = log_dir.join(crate::segment::file_name(base));
        disk.rename(&log_dir.join(PREPARED_NAME), &path)
            .map_err(|e| Error::io("rename prepared segment", &path, e))?;
        crate::failpoint::crash("segment.created");
        disk.sync_dir(log_dir)
            .map_err(|e| Error::io("sync directory", log_dir, e))?;
        Ok(Self::new(base, path, file, 0))
    }

    pub(crate) fn new(base: Offset, path: PathBuf, file: Box<dyn DiskFile>, len: u64) -> Self {
        Self {
            base,
            path,
            file,
            len: AtomicU64::new(len),
        }
    }
}

/// Removes `log/.next.seg` if it is there (left by a crash before a roll took it).
pub(crate) fn remove_prepared(disk: &dyn Disk, log_dir: &Path) -> Result<()> {
    let prepared = log_dir.join(PREPARED_NAME);
    match disk.remove_file(&prepared) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::io("remove prepared segment", &prepared, e))
        }
        _ => Ok(()),
    }
}

/// `<dir>/quarantine`, created if missing, with its entry in `dir` made durable.
pub(crate) fn quarantine_dir(disk: &dyn Disk, dir: &Path) -> Result<PathBuf> {
    let quarantine = dir.join("quarantine");
    disk.create_dir_all(&quarantine)
        .map_err(|e| Error::io("create directory", &quarantine, e))?;
    disk.sync_dir(dir)
        .map_err(|e| Error::io("sync directory", dir, e))?;
    Ok(quarantine)
}

/// Copies `len` bytes at `position` of the segment `file` (at `path`) into a new durable file
/// in `quarantine` named after the segment and the position (never overwriting an earlier
/// one); returns it. The caller syncs `quarantine` once it has copied every region.
pub(crate) fn quarantine_region(
    disk: &dyn Disk,
    file: &dyn DiskFile,
    path: &Path,
    quarantine: &Path,
    position: u64,
    len: u64,
) -> Result<PathBuf> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let existing = disk
        .list_dir(quarantine)
        .map_err(|e| Error::io("list directory", quarantine, e))?;
    let mut bytes = vec![0u8; usize::try_from(len).unwrap_or(0)];
    file.read_at(&mut bytes, position)
        .map_err(|e| Error::io("read segment", path, e))?;
    // A later repair of the same segment never overwrites an earlier quarantine file.
    let stem = format!("{name}.{position:020}");
    let mut target = quarantine.join(format!("{stem}.bad"));
    for n in 1.. {
        let taken = target
            .file_name()
            .is_some_and(|f| existing.iter().any(|e| f.to_string_lossy() == *e));
        if !taken {
            break;
        }
        target = quarantine.join(format!("{stem}.{n}.bad"));
    }
    let out = disk
        .create(&target)
        .map_err(|e| Error::io("create quarantine file", &target, e))?;
    out.write_at(&bytes, 0)
        .map_err(|e| Error::io("write quarantine file", &target, e))?;
    out.sync_data()
        .map_err(|e| Error::io("fsync quarantine file", &target, e))?;
    tracing::warn!(
        segment = %path.display(),
        position,
        bytes = len,
        quarantine = %target.display(),
        "moved damaged bytes to quarantine"
    );
    Ok(target)
}

/// Renames a damaged index directory to the first free `<name>.damaged-<n>` beside it and
/// makes the rename durable; returns the new path.
pub(crate) fn set_aside(index_dir: &Path) -> Result<PathBuf> {
    let parent = index_dir.parent().unwrap_or(Path::new("."));
    let name = index_dir
        .file_name()
        .map_or_else(|| "index".into(), |n| n.to_string_lossy().into_owned());
    let aside = (1..)
        .map(|n| parent.join(format!("{name}.damaged-{n}")))
        .find(|p| !p.exists())
        .unwrap_or_else(|| parent.join(format!("{name}.damaged")));
    std::fs::rename(index_dir, &aside).map_err(|e| Error::io("set aside index", index_dir, e))?;
    FileDisk
        .sync_dir(parent)
        .map_err(|e| Error::io("sync directory", parent, e))?;
    Ok(aside)
}
