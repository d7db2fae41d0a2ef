//! The I/O seam: every file operation of the log goes through [`Disk`] and [`DiskFile`].
//!
//! [`FileDisk`] is the real file system and the only place in the crate that calls fsync.
//! [`crate::sim::SimDisk`] implements the same traits in memory and can lose whatever was not
//! synced, which is how the crash tests simulate power loss after every I/O operation.
//! The trait is deliberately small: positional reads and writes, length changes, data sync,
//! and the directory operations whose durability needs a directory fsync.

use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// A file system as the log sees it.
pub trait Disk: Send + Sync + Debug {
    /// Creates a directory and its parents (not durable until [`Disk::sync_dir`] of the parent).
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Names of the entries of a directory, in no particular order.
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Creates a new, empty file for reading and writing; fails if it exists.
    fn create(&self, path: &Path) -> io::Result<Box<dyn DiskFile>>;
    /// Opens an existing file for reading and, if `writable`, writing.
    fn open(&self, path: &Path, writable: bool) -> io::Result<Box<dyn DiskFile>>;
    /// Removes a file (not durable until [`Disk::sync_dir`]).
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Renames a file, replacing the target (not durable until [`Disk::sync_dir`]).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creates, renames, removes) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Takes an exclusive advisory lock on `path` (created if missing) for the guard's life.
    /// Fails with [`io::ErrorKind::WouldBlock`] when another process holds it.
    fn lock(&self, path: &Path) -> io::Result<DirLock>;
    /// Bytes free to an unprivileged writer on the file system that holds `dir`, if known
    /// (segment preallocation leaves room for the data).
    fn available_bytes(&self, dir: &Path) -> io::Result<Option<u64>> {
        let _ = dir;
        Ok(None)
    }
}

/// An open file.
#[expect(
    clippy::len_without_is_empty,
    reason = "a file's length is an I/O result, not a collection size"
)]
pub trait DiskFile: Send + Sync + Debug {
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Fills `buf` from `position`; fails with `UnexpectedEof` past the end.
    fn read_at(&self, buf: &mut [u8], position: u64) -> io::Result<()>;
    /// Writes all of `buf` at `position`, extending the file if needed.
    fn write_at(&self, buf: &[u8], position: u64) -> io::Result<()>;
    /// Truncates or extends (with zeros) to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes the file's data and length durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
}

/// Holds a lock taken by [`Disk::lock`] until dropped.
#[derive(Debug)]
pub struct DirLock {
    _file: Option<File>,
}

impl DirLock {
    /// A lock that holds nothing, for file systems without processes (the simulation).
    pub fn none() -> Self {
        Self { _file: None }
    }
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct FileDisk;

#[derive(Debug)]
struct RealFile(File);

impl Disk for FileDisk {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Box::new(RealFile(file)))
    }

    fn open(&self, path: &Path, writable: bool) -> io::Result<Box<dyn DiskFile>> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        Ok(Box::new(RealFile(file)))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    #[expect(
        clippy::disallowed_methods,
        reason = "the one place that fsyncs a directory"
    )]
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn lock(&self, path: &Path) -> io::Result<DirLock> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        match file.try_lock() {
            Ok(()) => Ok(DirLock { _file: Some(file) }),
            Err(std::fs::TryLockError::WouldBlock) => Err(io::ErrorKind::WouldBlock.into()),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }

    fn available_bytes(&self, dir: &Path) -> io::Result<Option<u64>> {
        let stat = rustix::fs::statvfs(dir)?;
        Ok(Some(stat.f_bavail.saturating_mul(stat.f_frsize)))
    }
}

impl DiskFile for RealFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn read_at(&self, buf: &mut [u8], position: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, position)
    }

    fn write_at(&self, buf: &[u8], position: u64) -> io::Result<()> {
        if let Some(error) = crate::failpoint::io_error("io.write") {
            return Err(error);
        }
        self.0.write_all_at(buf, position)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    #[expect(
        clippy::disallowed_methods,
        reason = "the one place that fsyncs a segment"
    )]
    fn sync_data(&self) -> io::Result<()> {
        if let Some(error) = crate::failpoint::io_error("io.sync") {
            return Err(error);
        }
        self.0.sync_data()
    }
}
