//! [`SimDisk`]: an in-memory [`Disk`] that can lose power.
//!
//! Every file keeps two images: what the process sees (`live`) and what would survive a power
//! failure (`durable`), plus the writes made since the last fsync (`pending`). Directory
//! entries likewise: a created, renamed or removed file changes the durable directory only
//! after [`Disk::sync_dir`] (ALICE, OSDI'14). [`SimDisk::crash`] turns the durable state, plus
//! some torn part of the pending writes chosen by a [`TearMode`] and a seed, into the new
//! state, as a power failure would. [`SimDisk::crash_after`] makes every operation after the
//! n-th fail, so a test can stop a workload at any I/O step; [`SimDisk::fail_sync`] and
//! [`SimDisk::fail_write`] inject errors (a failed fsync also drops the pending writes, as
//! Linux does: "fsyncgate").
//!
//! Simplification: directories themselves are always durable once created.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::io::{DirLock, Disk, DiskFile};

/// What a power failure does to writes that were not fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TearMode {
    /// All of them are lost.
    DropPending,
    /// A prefix of them survives, the last one cut at a random byte.
    TornPrefix,
    /// A prefix survives, and the next write's bytes are replaced by random garbage.
    Garbage,
    /// Writeback in any order, a page ([`crate::segment::PAGE_BYTES`]) at a time: every page
    /// holds its contents as of a random point among the pending writes (before all of them,
    /// after some, or after all), and so does the file's length. A later page can survive
    /// where an earlier one did not, leaving a hole of zeros before records that were written
    /// after it.
    Pages,
}

/// Every tear mode, for tests that try them all.
pub const TEAR_MODES: [TearMode; 4] = [
    TearMode::DropPending,
    TearMode::TornPrefix,
    TearMode::Garbage,
    TearMode::Pages,
];

#[derive(Debug, Clone)]
enum Write {
    Data { position: u64, bytes: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct Inode {
    live: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<Write>,
}

#[derive(Debug, Default)]
struct State {
    inodes: HashMap<u64, Inode>,
    next_inode: u64,
    live_entries: BTreeMap<PathBuf, u64>,
    durable_entries: BTreeMap<PathBuf, u64>,
    ops: u64,
    crash_after: Option<u64>,
    crashed: bool,
    fail_sync: Option<io::ErrorKind>,
    fail_write: Option<io::ErrorKind>,
}

/// The simulated file system. Clones share the same state.
#[derive(Debug, Clone, Default)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct SimFile {
    state: Arc<Mutex<State>>,
    inode: u64,
    writable: bool,
}

fn crashed_error() -> io::Error {
    io::Error::other("simulated power failure: the process is gone")
}

fn apply(image: &mut Vec<u8>, write: &Write) {
    match write {
        Write::Data { position, bytes } => {
            let start = usize::try_from(*position).expect("simulated files are small");
            if image.len() < start + bytes.len() {
                image.resize(start + bytes.len(), 0);
            }
            image
                .get_mut(start..start + bytes.len())
                .expect("resized above")
                .copy_from_slice(bytes);
        }
        Write::SetLen(len) => {
            image.resize(usize::try_from(*len).expect("simulated files are small"), 0)
        }
    }
}

/// splitmix64: a tiny deterministic generator, so that every crash state replays from its seed.
fn next_random(seed: &mut u64) -> u64 {
    *seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *seed;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The image [`TearMode::Pages`] leaves: the length and every page each as of a random
/// number of the pending writes applied to the durable image.
fn pages_torn(durable: &[u8], pending: &[Write], seed: &mut u64) -> Vec<u8> {
    let mut versions = vec![durable.to_vec()];
    for write in pending {
        let mut next = versions.last().expect("starts with one").clone();
        apply(&mut next, write);
        versions.push(next);
    }
    let mut pick = || {
        let n = versions.len() as u64;
        usize::try_from(next_random(seed) % n).unwrap_or(0)
    };
    let page_bytes = usize::try_from(crate::segment::PAGE_BYTES).expect("a page fits in memory");
    let len = versions.get(pick()).map_or(0, Vec::len);
    let mut image = vec![0u8; len];
    for (page, out) in image.chunks_mut(page_bytes).enumerate() {
        let version = versions.get(pick()).map_or(&[][..], Vec::as_slice);
        let start = page * page_bytes;
        let from = version.get(start..).unwrap_or_default();
        let n = from.len().min(out.len());
        out.get_mut(..n)
            .expect("n fits")
            .copy_from_slice(from.get(..n).expect("n fits"));
    }
    image
}

impl State {
    /// Counts an operation that changes state; fails it if the simulated power is off.
    fn tick(&mut self) -> io::Result<()> {
        if self.crashed {
            return Err(crashed_error());
        }
        if self.crash_after.is_some_and(|n| self.ops >= n) {
            self.crashed = true;
            return Err(crashed_error());
        }
        self.ops += 1;
        Ok(())
    }

    fn alive(&self) -> io::Result<()> {
        if self.crashed {
            Err(crashed_error())
        } else {
            Ok(())
        }
    }

    fn inode(&mut self, id: u64) -> &mut Inode {
        self.inodes
            .get_mut(&id)
            .expect("open files keep their inode")
    }
}

impl SimDisk {
    /// A new, empty file system.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("sim disk lock")
    }

    /// Operations counted so far (writes, length changes, syncs, creates, renames, removes).
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Lets `n` more counted operations succeed, then fails every operation as if the power
    /// went off.
    pub fn crash_after(&self, n: u64) {
        let mut state = self.lock();
        state.crash_after = Some(state.ops + n);
    }

    /// Whether the simulated power is off.
    pub fn is_crashed(&self) -> bool {
        self.lock().crashed
    }

    /// Writes made since their file's last fdatasync, over all files.
    pub fn unsynced_writes(&self) -> usize {
        let state = self.lock();
        state.inodes.values().map(|i| i.pending.len()).sum()
    }

    /// The next fdatasync fails with `kind` and drops the pending writes of its file.
    pub fn fail_sync(&self, kind: io::ErrorKind) {
        self.lock().fail_sync = Some(kind);
    }

    /// The next write fails with `kind` (for example `StorageFull`) and writes nothing.
    pub fn fail_write(&self, kind: io::ErrorKind) {
        self.lock().fail_write = Some(kind);
    }

    /// Whether a failure set by [`SimDisk::fail_sync`] or [`SimDisk::fail_write`] still waits
    /// for the operation it will fail.
    pub fn failure_pending(&self) -> bool {
        let state = self.lock();
        state.fail_sync.is_some() || state.fail_write.is_some()
    }

    /// Power failure: every file becomes its durable image plus what `mode` keeps of its
    /// pending writes (chosen from `seed`); directories keep only their synced entries. The
    /// power comes back on and the counters reset. Open handles must not be used afterwards.
    pub fn crash(&self, mode: TearMode, seed: u64) {
        let mut state = self.lock();
        let mut seed = seed;
        let entries = state.durable_entries.clone();
        let mut inodes = HashMap::new();
        for id in entries.values() {
            let Some(inode) = state.inodes.get(id) else {
                continue;
            };
            let mut image = inode.durable.clone();
            let pending = &inode.pending;
            if mode == TearMode::Pages && !pending.is_empty() {
                image = pages_torn(&inode.durable, pending, &mut seed);
            } else if mode != TearMode::DropPending && !pending.is_empty() {
                let keep = usize::try_from(next_random(&mut seed) % (pending.len() as u64 + 1))
                    .unwrap_or(0);
                for write in pending.iter().take(keep) {
                    apply(&mut image, write);
                }
                if let Some(Write::Data { position, bytes }) = pending.get(keep) {
                    let cut = usize::try_from(next_random(&mut seed) % (bytes.len() as u64 + 1))
                        .unwrap_or(0);
                    let mut torn = bytes.get(..cut).unwrap_or_default().to_vec();
                    if mode == TearMode::Garbage {
                        for b in &mut torn {
                            *b = u8::try_from(next_random(&mut seed) & 0xff).unwrap_or(0);
                        }
                    }
                    apply(
                        &mut image,
                        &Write::Data {
                            position: *position,
                            bytes: torn,
                        },
                    );
                }
            }
            inodes.insert(
                *id,
                Inode {
                    live: image.clone(),
                    durable: image,
                    pending: Vec::new(),
                },
            );
        }
        state.inodes = inodes;
        state.live_entries = entries;
        state.ops = 0;
        state.crash_after = None;
        state.crashed = false;
        state.fail_sync = None;
        state.fail_write = None;
    }

    /// The live contents of a file, for tests that damage or inspect bytes.
    pub fn read_file(&self, path: &Path) -> Option<Vec<u8>> {
        let state = self.lock();
        let id = state.live_entries.get(path)?;
        Some(state.inodes.get(id)?.live.clone())
    }

    /// Replaces a file's contents, durably (for tests that damage bytes).
    pub fn write_file(&self, path: &Path, bytes: Vec<u8>) {
        let mut state = self.lock();
        let id = match state.live_entries.get(path) {
            Some(id) => *id,
            None => {
                state.next_inode += 1;
                let id = state.next_inode;
                state.live_entries.insert(path.to_path_buf(), id);
                state.durable_entries.insert(path.to_path_buf(), id);
                id
            }
        };
        state.inodes.insert(
            id,
            Inode {
                live: bytes.clone(),
                durable: bytes,
                pending: Vec::new(),
            },
        );
    }
}

impl Disk for SimDisk {
    fn create_dir_all(&self, _path: &Path) -> io::Result<()> {
        self.lock().alive()
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let state = self.lock();
        state.alive()?;
        Ok(state
            .live_entries
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        let mut state = self.lock();
        state.tick()?;
        if state.live_entries.contains_key(path) {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        state.next_inode += 1;
        let id = state.next_inode;
        state.inodes.insert(id, Inode::default());
        state.live_entries.insert(path.to_path_buf(), id);
        Ok(Box::new(SimFile {
            state: self.state.clone(),
            inode: id,
            writable: true,
        }))
    }

    fn open(&self, path: &Path, writable: bool) -> io::Result<Box<dyn DiskFile>> {
        let state = self.lock();
        state.alive()?;
        let id = *state
            .live_entries
            .get(path)
            .ok_or(io::ErrorKind::NotFound)?;
        Ok(Box::new(SimFile {
            state: self.state.clone(),
            inode: id,
            writable,
        }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.tick()?;
        state
            .live_entries
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| io::ErrorKind::NotFound.into())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.tick()?;
        let id = state
            .live_entries
            .remove(from)
            .ok_or(io::ErrorKind::NotFound)?;
        state.live_entries.insert(to.to_path_buf(), id);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.tick()?;
        let in_dir = |p: &PathBuf| p.parent() == Some(dir);
        state.durable_entries.retain(|p, _| !in_dir(p));
        let live: Vec<(PathBuf, u64)> = state
            .live_entries
            .iter()
            .filter(|(p, _)| in_dir(p))
            .map(|(p, id)| (p.clone(), *id))
            .collect();
        state.durable_entries.extend(live);
        Ok(())
    }

    fn lock(&self, _path: &Path) -> io::Result<DirLock> {
        self.lock().alive()?;
        Ok(DirLock::none())
    }
}

impl SimFile {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("sim disk lock")
    }
}

impl DiskFile for SimFile {
    fn len(&self) -> io::Result<u64> {
        let mut state = self.state();
        state.alive()?;
        Ok(state.inode(self.inode).live.len() as u64)
    }

    fn read_at(&self, buf: &mut [u8], position: u64) -> io::Result<()> {
        let mut state = self.state();
        state.alive()?;
        let live = &state.inode(self.inode).live;
        let start = usize::try_from(position).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let bytes = live
            .get(start..start + buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(bytes);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], position: u64) -> io::Result<()> {
        let mut state = self.state();
        state.tick()?;
        if !self.writable {
            return Err(io::ErrorKind::PermissionDenied.into());
        }
        if let Some(kind) = state.fail_write.take() {
            return Err(io::Error::new(kind, "injected write error"));
        }
        let write = Write::Data {
            position,
            bytes: buf.to_vec(),
        };
        let inode = state.inode(self.inode);
        apply(&mut inode.live, &write);
        inode.pending.push(write);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.state();
        state.tick()?;
        let inode = state.inode(self.inode);
        apply(&mut inode.live, &Write::SetLen(len));
        inode.pending.push(Write::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.state();
        state.tick()?;
        if let Some(kind) = state.fail_sync.take() {
            // Like Linux after a failed fsync: the dirty pages are dropped from the path to
            // the disk, although the process may still read them.
            state.inode(self.inode).pending.clear();
            return Err(io::Error::new(kind, "injected fsync error"));
        }
        let inode = state.inode(self.inode);
        inode.durable = inode.live.clone();
        inode.pending.clear();
        Ok(())
    }
}
