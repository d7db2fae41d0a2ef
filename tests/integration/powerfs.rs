//! A FUSE file system (the `fuser` crate, mounted with the `mount` system call, no libfuse)
//! that remembers what is durable and can lose the rest, like a machine losing power:
//!
//! - a file's bytes and length are durable once the file is fsynced (`fsync`/`fdatasync`);
//! - a directory's entries (creates, renames, unlinks) are durable once the directory is
//!   fsynced: a new file whose directory was never synced disappears, data and all;
//! - [`PowerFs::cut`] reverts every file and directory to its durable state.
//!
//! Everything lives in memory. Files are opened with `FOPEN_DIRECT_IO` and every attribute
//! and entry has a zero TTL, so the kernel caches nothing that a cut could make stale.
#![allow(
    clippy::disallowed_methods,
    reason = "file times are wall-clock by definition"
)]

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};

const TTL: Duration = Duration::ZERO;
const ROOT: u64 = 1;

/// A write or truncation not yet made durable by an fsync of its file.
enum Pending {
    Write(u64, Vec<u8>),
    Truncate(u64),
}

enum Body {
    File {
        data: Vec<u8>,
        durable: Vec<u8>,
        pending: Vec<Pending>,
    },
    Dir {
        entries: BTreeMap<OsString, u64>,
        durable: BTreeMap<OsString, u64>,
    },
}

struct Node {
    body: Body,
    perm: u16,
    uid: u32,
    gid: u32,
}

#[derive(Default)]
struct State {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    /// fsyncs of files seen, for the report.
    fsyncs: u64,
    /// Bytes the last cut threw away.
    lost_bytes: u64,
}

fn apply(data: &mut Vec<u8>, op: &Pending) {
    match op {
        Pending::Write(offset, bytes) => {
            let start = usize::try_from(*offset).expect("offset fits");
            let end = start + bytes.len();
            if data.len() < end {
                data.resize(end, 0);
            }
            data[start..end].copy_from_slice(bytes);
        }
        Pending::Truncate(len) => data.resize(usize::try_from(*len).expect("len fits"), 0),
    }
}

impl State {
    fn new() -> Self {
        let mut state = Self {
            next_ino: ROOT + 1,
            ..Self::default()
        };
        let root = Node {
            body: Body::Dir {
                entries: BTreeMap::new(),
                durable: BTreeMap::new(),
            },
            perm: 0o755,
            uid: 0,
            gid: 0,
        };
        state.nodes.insert(ROOT, root);
        state
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let node = self.nodes.get(&ino)?;
        let (kind, size, nlink) = match &node.body {
            Body::File { data, .. } => (FileType::RegularFile, data.len() as u64, 1),
            Body::Dir { .. } => (FileType::Directory, 4096, 2),
        };
        let now = SystemTime::now();
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind,
            perm: node.perm,
            nlink,
            uid: node.uid,
            gid: node.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn entries(&mut self, ino: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.body) {
            Some(Body::Dir { entries, .. }) => Ok(entries),
            Some(Body::File { .. }) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn lookup(&mut self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.entries(parent)?
            .get(name)
            .copied()
            .ok_or(Errno::ENOENT)
    }

    fn make(
        &mut self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        dir: bool,
        mode: u32,
    ) -> Result<u64, Errno> {
        if self.entries(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let body = if dir {
            Body::Dir {
                entries: BTreeMap::new(),
                durable: BTreeMap::new(),
            }
        } else {
            Body::File {
                data: Vec::new(),
                durable: Vec::new(),
                pending: Vec::new(),
            }
        };
        let perm = u16::try_from(mode & 0o7777).expect("permission bits");
        let node = Node {
            body,
            perm,
            uid: req.uid(),
            gid: req.gid(),
        };
        self.nodes.insert(ino, node);
        self.entries(parent)?.insert(name.to_owned(), ino);
        Ok(ino)
    }

    fn file(&mut self, ino: u64) -> Result<(&mut Vec<u8>, &mut Vec<Pending>), Errno> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.body) {
            Some(Body::File { data, pending, .. }) => Ok((data, pending)),
            Some(Body::Dir { .. }) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }

    /// Power loss: every file and directory back to what was durable.
    fn cut(&mut self) {
        let mut lost = 0;
        for node in self.nodes.values_mut() {
            match &mut node.body {
                Body::File {
                    data,
                    durable,
                    pending,
                } => {
                    lost += pending
                        .iter()
                        .map(|p| match p {
                            Pending::Write(_, bytes) => bytes.len() as u64,
                            Pending::Truncate(_) => 0,
                        })
                        .sum::<u64>();
                    pending.clear();
                    data.clone_from(durable);
                }
                Body::Dir { entries, durable } => entries.clone_from(durable),
            }
        }
        self.lost_bytes = lost;
    }
}

/// The file system; cheap to clone (the state is shared with the mount's thread).
#[derive(Clone)]
struct PowerLossFs(Arc<Mutex<State>>);

impl PowerLossFs {
    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().expect("powerfs state")
    }

    fn reply_entry(&self, result: Result<u64, Errno>, reply: ReplyEntry) {
        let state = self.state();
        match result.map(|ino| state.attr(ino)) {
            Ok(Some(attr)) => reply.entry(&TTL, &attr, Generation(0)),
            Ok(None) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(e),
        }
    }
}

fn empty(result: Result<(), Errno>, reply: ReplyEmpty) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for PowerLossFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = self.state().lookup(parent.0, name);
        self.reply_entry(found, reply);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.state().attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut state = self.state();
        if let Some(size) = size {
            match state.file(ino.0) {
                Ok((data, pending)) => {
                    let op = Pending::Truncate(size);
                    apply(data, &op);
                    pending.push(op);
                }
                Err(e) => return reply.error(e),
            }
        }
        if let (Some(mode), Some(node)) = (mode, state.nodes.get_mut(&ino.0)) {
            node.perm = u16::try_from(mode & 0o7777).expect("permission bits");
        }
        match state.attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let made = self.state().make(req, parent.0, name, true, mode);
        self.reply_entry(made, reply);
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let made = self.state().make(req, parent.0, name, false, mode);
        self.reply_entry(made, reply);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut state = self.state();
        match state.make(req, parent.0, name, false, mode) {
            Ok(ino) => {
                let attr = state.attr(ino).expect("just made");
                reply.created(
                    &TTL,
                    &attr,
                    Generation(0),
                    FileHandle(ino),
                    FopenFlags::FOPEN_DIRECT_IO,
                );
            }
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut state = self.state();
        let removed = state
            .entries(parent.0)
            .and_then(|e| e.remove(name).map(|_| ()).ok_or(Errno::ENOENT));
        empty(removed, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut state = self.state();
        let result = state.lookup(parent.0, name).and_then(|ino| {
            if !state.entries(ino)?.is_empty() {
                return Err(Errno::ENOTEMPTY);
            }
            state.entries(parent.0)?.remove(name);
            Ok(())
        });
        empty(result, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut state = self.state();
        let result = state.lookup(parent.0, name).and_then(|ino| {
            state.entries(parent.0)?.remove(name);
            state.entries(newparent.0)?.insert(newname.to_owned(), ino);
            Ok(())
        });
        empty(result, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(ino.0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let mut state = self.state();
        match state.file(ino.0) {
            Ok((data, _)) => {
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                let end = start.saturating_add(size as usize).min(data.len());
                reply.data(&data[start..end]);
            }
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        bytes: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut state = self.state();
        match state.file(ino.0) {
            Ok((data, pending)) => {
                let op = Pending::Write(offset, bytes.to_vec());
                apply(data, &op);
                pending.push(op);
                reply.written(u32::try_from(bytes.len()).expect("write size"));
            }
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut state = self.state();
        state.fsyncs += 1;
        let result = match state.nodes.get_mut(&ino.0).map(|n| &mut n.body) {
            Some(Body::File {
                durable, pending, ..
            }) => {
                for op in pending.drain(..) {
                    apply(durable, &op);
                }
                Ok(())
            }
            Some(Body::Dir { .. }) => Ok(()),
            None => Err(Errno::ENOENT),
        };
        empty(result, reply);
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut state = self.state();
        let listing: Vec<(u64, FileType, OsString)> = match state.entries(ino.0) {
            Ok(entries) => entries
                .iter()
                .map(|(n, i)| (*i, FileType::RegularFile, n.clone()))
                .collect(),
            Err(e) => return reply.error(e),
        };
        let mut all = vec![
            (ino.0, FileType::Directory, OsString::from(".")),
            (ino.0, FileType::Directory, OsString::from("..")),
        ];
        for (child, _, name) in listing {
            let kind = state.attr(child).map_or(FileType::RegularFile, |a| a.kind);
            all.push((child, kind, name));
        }
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (n, (child, kind, name)) in all.into_iter().enumerate().skip(skip) {
            if reply.add(INodeNo(child), n as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut state = self.state();
        let result = match state.nodes.get_mut(&ino.0).map(|n| &mut n.body) {
            Some(Body::Dir { entries, durable }) => {
                durable.clone_from(entries);
                Ok(())
            }
            Some(Body::File { .. }) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        };
        empty(result, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(1 << 24, 1 << 23, 1 << 23, 1 << 20, 1 << 19, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }
}

/// The file system mounted at a directory; unmounted (lazily) when dropped.
pub struct PowerFs {
    fs: PowerLossFs,
    path: PathBuf,
    session: Option<BackgroundSession>,
}

impl PowerFs {
    /// Mounts an empty file system at `dir`, or says why it cannot be done here.
    pub fn mount(dir: &Path) -> Result<Self, String> {
        if !Path::new("/dev/fuse").exists() {
            return Err("/dev/fuse is missing".into());
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("mount point: {e}"))?;
        let fs = PowerLossFs(Arc::new(Mutex::new(State::new())));
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("courier-powerfs".into()),
            MountOption::RW,
        ];
        let session =
            fuser::spawn_mount(fs.clone(), dir, &config).map_err(|e| format!("mount: {e}"))?;
        Ok(Self {
            fs,
            path: dir.to_owned(),
            session: Some(session),
        })
    }

    /// Loses everything not made durable. Call it only while nothing uses the file system.
    pub fn cut(&self) -> u64 {
        let mut state = self.fs.state();
        state.cut();
        state.lost_bytes
    }

    /// fsyncs of files so far.
    pub fn fsyncs(&self) -> u64 {
        self.fs.state().fsyncs
    }
}

impl Drop for PowerFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        drop(self.session.take());
    }
}
