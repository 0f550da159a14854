//! A pass-through FUSE file system that can lose power.
//!
//! `kill -9` tests a process crash: whatever the process wrote is in the kernel's page cache
//! and survives. A machine that loses power keeps only what reached the disk, and the only
//! promise a program gets about that is `fsync`/`fdatasync`. This file system makes the
//! difference testable: it serves a backing directory at a mount point, remembers for every
//! file what it looked like at its last fsync, and on [`Mounted::cut`] puts every file back
//! to that state and fails every later request, until it is unmounted.
//!
//! ```text
//!  broker ──pwrite──▶ kernel ──FUSE WRITE──▶ PowerCut ──save old pages──▶ undo log (memory)
//!                                                   └──pwrite──────────▶ backing file
//!  broker ──fsync───▶ kernel ──FUSE FSYNC──▶ PowerCut: forget that file's undo log
//!  cut ─────────────────────────────────────▶ PowerCut: write undo logs back, truncate, unmount
//! ```
//!
//! # The model
//!
//! - **File data is durable only after an fsync of that file.** Before the first change to a
//!   file after its last `fsync`/`fdatasync` (the FUSE `FSYNC` operation, sent by either, on
//!   any descriptor of the file), its length is recorded; before each page (4 KiB) of the
//!   old length is first overwritten or truncated away, its old bytes are saved. A cut writes
//!   the saved pages back and truncates every file to its recorded length: each file is
//!   exactly as it was at its last fsync. `fdatasync` is treated as `fsync`.
//! - **An fsync takes time** ([`Options::fsync_latency`], as a drive's cache flush does), and
//!   its file's data becomes durable when it ends. Requests are served one at a time, so
//!   nothing else is written meanwhile; a cut during it loses what it was making durable (the
//!   caller never saw it succeed). Without a latency the window between a program's write and
//!   its fsync is too short for a cut at a random moment to fall into it often.
//! - **`sync_file_range` is not durability.** It only starts write-back of the page cache;
//!   it sends nothing to a FUSE file system (files are opened with `direct_io`, so there is
//!   no page cache to write back), and so data "flushed" that way is lost on a cut, as it can
//!   be on a real machine (no drive cache flush, no metadata).
//! - **Metadata is durable at once**: create, mkdir, rename, unlink, rmdir and chmod reach
//!   the backing directory when they are made and are never undone. What a directory fsync
//!   would have protected is only *reported*: [`Cut::unsynced_names`] lists the names created,
//!   renamed or removed since their directory's last fsync, which a real file system may
//!   lose.
//! - **Nothing stale survives a cut in the kernel**: files are opened with `direct_io` (no
//!   page cache for their data) and a cut unmounts; the next mount starts with empty caches.
//!
//! # Limits (what this cannot show)
//!
//! - Missing *directory* fsyncs are reported, not enacted: a file created or renamed but
//!   whose directory was never synced keeps its name here, while on ext4 or XFS it may
//!   vanish after a crash (in practice only within the journal's commit interval).
//! - Torn or reordered writes *within* the unsynced window: a cut drops every unsynced
//!   write of a file, never a subset of them (real disks may persist any subset, in any
//!   order, and tear a sector). The state after a cut is always one that a real disk could
//!   also produce, but not every such state is produced.
//! - A newly created file that was never fsynced comes back empty (its name survives).
//! - `fallocate`, hard links, symlinks and extended attributes are not supported (the
//!   calls fail with `ENOSYS`/`EPERM`; sled 0.34 and the broker run without them).
//! - One lock serializes every operation: it is a test tool, not a fast file system.

use std::{
    collections::{BTreeMap, HashMap},
    ffi::OsStr,
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{FileExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};

/// The unit of saved data. Any size works; 4 KiB matches the page size real write-back uses.
const PAGE: u64 = 4096;

/// How long the kernel may cache names and attributes. Every change goes through this file
/// system, so the kernel's cached view only goes stale on a cut, which unmounts.
const TTL: Duration = Duration::from_secs(1);

/// `O_TRUNC` as the kernel passes it in `create`'s flags.
const O_TRUNC: i32 = 0o1000;

/// What changed in one file since its last fsync: enough to put it back.
struct Undo {
    /// The file, opened when the record was made, so that a cut reaches it under whatever
    /// name it has by then.
    file: Arc<File>,
    /// Its length at the last fsync.
    len: u64,
    /// Page index → the page's bytes at the last fsync (only pages below `len`).
    pages: BTreeMap<u64, Vec<u8>>,
}

impl Undo {
    /// Saves every page in `[from, to)` (clipped to the length at the last fsync) that is not
    /// saved yet, reading it from the file before it is changed.
    fn save(&mut self, from: u64, to: u64) -> io::Result<()> {
        let to = to.min(self.len);
        if from >= to {
            return Ok(());
        }
        for page in from / PAGE..to.div_ceil(PAGE) {
            if self.pages.contains_key(&page) {
                continue;
            }
            let start = page * PAGE;
            let want = (self.len - start).min(PAGE);
            let mut buf = vec![0u8; usize::try_from(want).expect("a page fits in usize")];
            let mut got = 0;
            while got < buf.len() {
                let n = self.file.read_at(&mut buf[got..], start + got as u64)?;
                if n == 0 {
                    // Cannot happen: bytes below `len` are only removed by a truncation,
                    // which saves them first. Keep zeros rather than fail the write.
                    break;
                }
                got += n;
            }
            self.pages.insert(page, buf);
        }
        Ok(())
    }

    /// Puts the file back as it was at its last fsync.
    fn revert(&self) -> io::Result<()> {
        for (page, bytes) in &self.pages {
            self.file.write_all_at(bytes, page * PAGE)?;
        }
        self.file.set_len(self.len)?;
        self.file.sync_all()
    }
}

/// Counters, for the caller to show that a cut had something to throw away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// FUSE `WRITE` operations served.
    pub writes: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// FUSE `FSYNC` operations served (fsync and fdatasync of files).
    pub fsyncs: u64,
    /// At the cut: files that had changes since their last fsync, and were put back.
    pub files_reverted: u64,
    /// At the cut: saved pages written back.
    pub pages_restored: u64,
    /// At the cut: bytes past the fsynced length that were cut off.
    pub bytes_truncated: u64,
}

/// What a power cut did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cut {
    /// Counters, including the cut's own.
    pub stats: Stats,
    /// Names (relative to the mount) created, renamed or removed since their directory's
    /// last fsync. Kept by this file system's model; a real one may have lost them.
    pub unsynced_names: Vec<PathBuf>,
}

/// Everything the file system knows, behind one lock.
struct State {
    /// The directory served.
    backing: PathBuf,
    /// The backing root's inode number (served as FUSE inode 1).
    root_ino: u64,
    /// FUSE inode → path relative to `backing` (last name it was seen under).
    paths: HashMap<u64, PathBuf>,
    /// Open files by handle.
    handles: HashMap<u64, Arc<File>>,
    next_fh: u64,
    /// FUSE inode → its changes since its last fsync.
    undo: HashMap<u64, Undo>,
    /// Directory inode → names changed in it since its last fsync (relative paths).
    unsynced_names: HashMap<u64, std::collections::BTreeSet<PathBuf>>,
    /// Set by a cut: from then on every operation fails with `EIO`, as on a dead machine.
    cut: bool,
    stats: Stats,
}

impl State {
    /// Backing inode number → FUSE inode number (the root is 1; a backing file that happens
    /// to have inode 1 takes the root's number instead).
    fn fuse_ino(&self, backing_ino: u64) -> u64 {
        if backing_ino == self.root_ino {
            1
        } else if backing_ino == 1 {
            self.root_ino
        } else {
            backing_ino
        }
    }

    fn path(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        self.paths
            .get(&ino.0)
            .map(|rel| self.backing.join(rel))
            .ok_or(Errno::ENOENT)
    }

    fn rel(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        self.paths.get(&ino.0).cloned().ok_or(Errno::ENOENT)
    }

    /// Stats `rel`, remembers its inode's path, and returns its attributes.
    fn remember(&mut self, rel: PathBuf) -> Result<FileAttr, Errno> {
        let meta = std::fs::symlink_metadata(self.backing.join(&rel))?;
        let ino = self.fuse_ino(meta.ino());
        self.paths.insert(ino, rel);
        Ok(attr(ino, &meta))
    }

    /// The undo record of `ino`, made on its first change since its last fsync.
    fn undo_for(&mut self, ino: INodeNo, file: Option<&Arc<File>>) -> Result<&mut Undo, Errno> {
        if !self.undo.contains_key(&ino.0) {
            let file = match file {
                Some(f) => f.clone(),
                None => Arc::new(
                    OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(self.path(ino)?)?,
                ),
            };
            let len = file.metadata()?.len();
            self.undo.insert(
                ino.0,
                Undo {
                    file,
                    len,
                    pages: BTreeMap::new(),
                },
            );
        }
        Ok(self.undo.get_mut(&ino.0).expect("inserted above"))
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<File>, Errno> {
        self.handles.get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn open_handle(&mut self, file: File) -> FileHandle {
        self.next_fh += 1;
        self.handles.insert(self.next_fh, Arc::new(file));
        FileHandle(self.next_fh)
    }

    /// Notes that the entry `rel` of directory `dir` changed.
    fn name_changed(&mut self, dir: INodeNo, rel: &Path) {
        self.unsynced_names
            .entry(dir.0)
            .or_default()
            .insert(rel.to_owned());
    }

    /// Forgets `ino`'s undo record when its last name is gone.
    fn forget_if_unlinked(&mut self, ino: u64, nlink_before: u64) {
        if nlink_before <= 1 {
            self.undo.remove(&ino);
            self.paths.remove(&ino);
        }
    }
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    let nanos = u32::try_from(nsecs).unwrap_or(0);
    match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH + Duration::new(s, nanos),
        Err(_) => UNIX_EPOCH,
    }
}

fn attr(ino: u64, m: &std::fs::Metadata) -> FileAttr {
    let kind = if m.is_dir() {
        FileType::Directory
    } else if m.file_type().is_symlink() {
        FileType::Symlink
    } else {
        FileType::RegularFile
    };
    FileAttr {
        ino: INodeNo(ino),
        size: m.size(),
        blocks: m.blocks(),
        atime: time(m.atime(), m.atime_nsec()),
        mtime: time(m.mtime(), m.mtime_nsec()),
        ctime: time(m.ctime(), m.ctime_nsec()),
        crtime: time(m.ctime(), m.ctime_nsec()),
        kind,
        perm: u16::try_from(m.mode() & 0o7777).expect("masked to 12 bits"),
        nlink: u32::try_from(m.nlink()).unwrap_or(u32::MAX),
        uid: m.uid(),
        gid: m.gid(),
        rdev: u32::try_from(m.rdev()).unwrap_or(0),
        blksize: u32::try_from(m.blksize()).unwrap_or(4096),
        flags: 0,
    }
}

/// How the file system behaves.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// How long each fsync takes before it returns (and before its data counts as durable).
    pub fsync_latency: Duration,
}

/// The file system served to the kernel; [`Mounted`] holds the other end of its state.
struct PowerCutFs {
    state: Arc<Mutex<State>>,
    options: Options,
}

impl PowerCutFs {
    /// The state, or `EIO` once the power is cut.
    fn live(&self) -> Result<MutexGuard<'_, State>, Errno> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.cut {
            return Err(Errno::EIO);
        }
        Ok(state)
    }
}

/// Replies with `r`'s value through `ok`, or with its error.
macro_rules! answer {
    ($reply:expr, $r:expr, |$v:ident| $ok:expr) => {
        match $r {
            Ok($v) => $ok,
            Err(e) => $reply.error(e),
        }
    };
}

impl Filesystem for PowerCutFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self.live().and_then(|mut s| {
            let rel = s.rel(parent)?.join(name);
            s.remember(rel)
        });
        answer!(reply, r, |a| reply.entry(&TTL, &a, Generation(0)));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let r = self.live().and_then(|mut s| {
            let rel = s.rel(ino)?;
            s.remember(rel)
        });
        answer!(reply, r, |a| reply.attr(&TTL, &a));
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
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = self.live().and_then(|mut s| {
            let path = s.path(ino)?;
            if let Some(mode) = mode {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))?;
            }
            if let Some(size) = size {
                let handle = fh.map(|fh| s.handle(fh)).transpose()?;
                let undo = s.undo_for(ino, handle.as_ref())?;
                let current = undo.file.metadata()?.len();
                // Bytes cut off now must come back on a power cut.
                undo.save(size, current)?;
                undo.file.set_len(size)?;
            }
            let rel = s.rel(ino)?;
            s.remember(rel)
        });
        answer!(reply, r, |a| reply.attr(&TTL, &a));
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.live().and_then(|mut s| {
            let rel = s.rel(parent)?.join(name);
            let path = s.backing.join(&rel);
            std::fs::create_dir(&path)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & !umask))?;
            s.name_changed(parent, &rel);
            s.remember(rel)
        });
        answer!(reply, r, |a| reply.entry(&TTL, &a, Generation(0)));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.live().and_then(|mut s| {
            let path = s.path(parent)?.join(name);
            let meta = std::fs::symlink_metadata(&path)?;
            std::fs::remove_file(&path)?;
            let rel = s.rel(parent)?.join(name);
            s.name_changed(parent, &rel);
            let ino = s.fuse_ino(meta.ino());
            s.forget_if_unlinked(ino, meta.nlink());
            Ok(())
        });
        answer!(reply, r, |_v| reply.ok());
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.live().and_then(|mut s| {
            let path = s.path(parent)?.join(name);
            let meta = std::fs::symlink_metadata(&path)?;
            std::fs::remove_dir(&path)?;
            let rel = s.rel(parent)?.join(name);
            s.name_changed(parent, &rel);
            let ino = s.fuse_ino(meta.ino());
            s.paths.remove(&ino);
            Ok(())
        });
        answer!(reply, r, |_v| reply.ok());
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.live().and_then(|mut s| {
            if !flags.is_empty() {
                return Err(Errno::EINVAL);
            }
            let from = s.rel(parent)?.join(name);
            let to = s.rel(newparent)?.join(newname);
            // A file replaced by the rename loses its last name: forget its changes.
            if let Ok(old) = std::fs::symlink_metadata(s.backing.join(&to))
                && !old.is_dir()
            {
                let ino = s.fuse_ino(old.ino());
                s.forget_if_unlinked(ino, old.nlink());
            }
            std::fs::rename(s.backing.join(&from), s.backing.join(&to))?;
            s.name_changed(parent, &from);
            s.name_changed(newparent, &to);
            // Everything under the old name now lives under the new one.
            for rel in s.paths.values_mut() {
                if let Ok(rest) = rel.strip_prefix(&from) {
                    *rel = to.join(rest);
                }
            }
            s.remember(to).map(|_| ())
        });
        answer!(reply, r, |_v| reply.ok());
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let r = self.live().and_then(|mut s| {
            // Always read-write: the kernel has checked the caller's access mode already.
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(s.path(ino)?)?;
            Ok(s.open_handle(file))
        });
        answer!(reply, r, |fh| reply.opened(fh, FopenFlags::FOPEN_DIRECT_IO));
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.live().and_then(|mut s| {
            let rel = s.rel(parent)?.join(name);
            let path = s.backing.join(&rel);
            // The kernel looked the name up first: create is only called for a new name.
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(flags & O_TRUNC != 0)
                .open(&path)?;
            file.set_permissions(std::fs::Permissions::from_mode(mode & !umask & 0o7777))?;
            s.name_changed(parent, &rel);
            let attr = s.remember(rel)?;
            Ok((attr, s.open_handle(file)))
        });
        answer!(reply, r, |v| reply.created(
            &TTL,
            &v.0,
            Generation(0),
            v.1,
            FopenFlags::FOPEN_DIRECT_IO
        ));
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let r = self.live().and_then(|s| {
            let file = s.handle(fh)?;
            let mut buf = vec![0u8; size as usize];
            let mut got = 0;
            while got < buf.len() {
                let n = file.read_at(&mut buf[got..], offset + got as u64)?;
                if n == 0 {
                    break;
                }
                got += n;
            }
            buf.truncate(got);
            Ok(buf)
        });
        answer!(reply, r, |buf| reply.data(&buf));
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let r = self.live().and_then(|mut s| {
            let file = s.handle(fh)?;
            let end = offset + data.len() as u64;
            s.undo_for(ino, Some(&file))?.save(offset, end)?;
            file.write_all_at(data, offset)?;
            s.stats.writes += 1;
            s.stats.bytes_written += data.len() as u64;
            u32::try_from(data.len()).map_err(|_| Errno::EINVAL)
        });
        answer!(reply, r, |n| reply.written(n));
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) makes nothing durable.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.handles.remove(&fh.0);
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
        // Outside the lock, so that a cut can happen meanwhile; nothing else is served (one
        // request at a time), so the file does not change during it.
        std::thread::sleep(self.options.fsync_latency);
        let r = self.live().map(|mut s| {
            // The file as it is now is what a power cut leaves.
            s.undo.remove(&ino.0);
            s.stats.fsyncs += 1;
        });
        answer!(reply, r, |_v| reply.ok());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.live().and_then(|s| {
            let path = s.path(ino)?;
            let mut entries = vec![
                (ino.0, FileType::Directory, ".".into()),
                (ino.0, FileType::Directory, "..".into()),
            ];
            let mut names = Vec::new();
            for e in std::fs::read_dir(&path)? {
                let e = e?;
                let meta = e.metadata()?;
                let kind = if meta.is_dir() {
                    FileType::Directory
                } else {
                    FileType::RegularFile
                };
                names.push((s.fuse_ino(meta.ino()), kind, e.file_name()));
            }
            names.sort_by(|a, b| a.2.cmp(&b.2));
            entries.extend(names);
            Ok(entries)
        });
        match r {
            Ok(entries) => {
                let skip = usize::try_from(offset).unwrap_or(usize::MAX);
                for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(skip) {
                    if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Metadata is durable at once in this model (see the module doc); only the report
        // of names a real file system could lose changes.
        let r = self.live().map(|mut s| {
            s.unsynced_names.remove(&ino.0);
        });
        answer!(reply, r, |_v| reply.ok());
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let r = self.live().and_then(|s| {
            rustix::fs::statvfs(&s.backing).map_err(|e| Errno::from_i32(e.raw_os_error()))
        });
        answer!(reply, r, |st| reply.statfs(
            st.f_blocks,
            st.f_bfree,
            st.f_bavail,
            st.f_files,
            st.f_ffree,
            u32::try_from(st.f_bsize).unwrap_or(4096),
            u32::try_from(st.f_namemax).unwrap_or(255),
            u32::try_from(st.f_frsize).unwrap_or(4096),
        ));
    }
}

/// A mounted power-cut file system. Dropping it unmounts without a cut (nothing is lost).
pub struct Mounted {
    state: Arc<Mutex<State>>,
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
}

impl Mounted {
    /// Serves `backing` at `mountpoint` (an existing, empty directory) until cut or dropped,
    /// with default [`Options`]. Needs `/dev/fuse` and either root (mount(2) directly) or
    /// `fusermount3`.
    pub fn mount(backing: &Path, mountpoint: &Path) -> io::Result<Mounted> {
        Mounted::mount_with(backing, mountpoint, Options::default())
    }

    /// [`Mounted::mount`] with `options`.
    pub fn mount_with(backing: &Path, mountpoint: &Path, options: Options) -> io::Result<Mounted> {
        let backing = backing.canonicalize()?;
        let root_ino = std::fs::metadata(&backing)?.ino();
        let state = Arc::new(Mutex::new(State {
            backing,
            root_ino,
            paths: HashMap::from([(1, PathBuf::new())]),
            handles: HashMap::new(),
            next_fh: 0,
            undo: HashMap::new(),
            unsynced_names: HashMap::new(),
            cut: false,
            stats: Stats::default(),
        }));
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("sealpost-powercut".into()),
            MountOption::Subtype("powercut".into()),
        ];
        // One request at a time (fuser's default, said here because the fsync model needs it).
        config.n_threads = Some(1);
        let fs = PowerCutFs {
            state: state.clone(),
            options,
        };
        let session = fuser::spawn_mount(fs, mountpoint, &config)?;
        Ok(Mounted {
            state,
            session: Some(session),
            mountpoint: mountpoint.to_owned(),
        })
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).stats
    }

    /// Cuts the power: from now on every operation fails with `EIO` (the programs using the
    /// mount see a dead disk, and no fsync in progress completes), and every file goes back
    /// to its state at its last completed fsync. The mount stays until [`Mounted::unmount`]:
    /// kill the programs using it first. Cutting a cut file system changes nothing more.
    ///
    /// Cut, then kill: a process killed while it waits in an fsync is only reaped once the
    /// fsync returns, so killing first would let every fsync in progress complete.
    pub fn cut(&self) -> io::Result<Cut> {
        let cut = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            s.cut = true;
            let undo = std::mem::take(&mut s.undo);
            for u in undo.values() {
                let now = u.file.metadata()?.len();
                u.revert()?;
                s.stats.files_reverted += 1;
                s.stats.pages_restored += u.pages.len() as u64;
                s.stats.bytes_truncated += now.saturating_sub(u.len);
            }
            s.handles.clear();
            let mut unsynced_names: Vec<PathBuf> =
                s.unsynced_names.values().flatten().cloned().collect();
            unsynced_names.sort();
            Cut {
                stats: s.stats,
                unsynced_names,
            }
        };
        Ok(cut)
    }

    /// Unmounts (after a cut, or without one: then nothing is lost). Fails while a program
    /// still has a file open on the mount.
    pub fn unmount(mut self) -> io::Result<()> {
        self.unmount_session()
    }

    fn unmount_session(&mut self) -> io::Result<()> {
        match self.session.take() {
            Some(session) => session.umount_and_join(),
            None => Ok(()),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = self.unmount_session();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Overwrites, a truncation and a regrowth past the old end all come undone.
    #[test]
    fn revert_restores_saved_pages_and_length() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let before: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &before).expect("write");
        let file = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .expect("open"),
        );
        let mut undo = Undo {
            file: file.clone(),
            len: 10_000,
            pages: BTreeMap::new(),
        };
        undo.save(5000, 5001).expect("save");
        file.write_all_at(&[0xff], 5000).expect("overwrite");
        undo.save(3000, 10_000).expect("save");
        file.set_len(3000).expect("truncate");
        undo.save(3000, 12_000).expect("save");
        file.write_all_at(&[0xee; 9000], 3000).expect("regrow");
        assert_eq!(undo.pages.len(), 3, "pages 0, 1 and 2 of the old length");
        undo.revert().expect("revert");
        assert_eq!(std::fs::read(&path).expect("read"), before);
    }
}
