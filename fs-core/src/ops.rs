//! The operations a workload is made of (`Op`), and the tasks for fallocate, punch hole,
//! zero range, truncate and fsync. Buffered IO and mmap tasks live in `buffered_io`.

use crate::block::{self, Request, BLOCK_SIZE};
use crate::extent::{Extent, ExtentState, FILE_BLOCKS_MAX};
use crate::fs::{AllocMode, Fs, FsError, FILE_BYTES_MAX};
use crate::step::{Cx, Step, YieldPoint};
use crate::writeback::WbPass;
use crate::TaskId;
use serde::{Deserialize, Serialize};

const BS: u64 = BLOCK_SIZE as u64;

/// One operation of a workload. Data written is one byte value repeated, which makes every
/// byte of a file name the operation that wrote it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    Write {
        file: usize,
        offset: u64,
        len: u64,
        byte: u8,
    },
    Read {
        file: usize,
        offset: u64,
        len: u64,
    },
    MmapStore {
        file: usize,
        offset: u64,
        len: u64,
        byte: u8,
    },
    Fallocate {
        file: usize,
        offset: u64,
        len: u64,
    },
    PunchHole {
        file: usize,
        offset: u64,
        len: u64,
    },
    ZeroRange {
        file: usize,
        offset: u64,
        len: u64,
    },
    Truncate {
        file: usize,
        size: u64,
    },
    Fsync {
        file: usize,
    },
    /// fallocate with `FALLOC_FL_KEEP_SIZE`: allocates, never changes the size.
    FallocateKeepSize {
        file: usize,
        offset: u64,
        len: u64,
    },
    Fdatasync {
        file: usize,
    },
    /// syncfs: every file's data, then the journal.
    Sync,
    /// Creates file `file` (inode slot `file`) under the name `f<file>`: EEXIST if the name
    /// exists, EBUSY-like (`Invalid`) if the slot still holds a live inode.
    Create {
        file: usize,
    },
    /// Removes the name `f<file>`; its inode goes when its last name does.
    Unlink {
        file: usize,
    },
    /// Renames `f<from>` to `f<to>`, atomically replacing what `f<to>` named.
    Rename {
        from: usize,
        to: usize,
    },
    /// Links the inode that `f<file>` names under the name `f<to>`.
    Link {
        file: usize,
        to: usize,
    },
}

impl Op {
    /// The highest file (inode slot, or the number in a name) the operation names.
    pub fn file(&self) -> usize {
        match self {
            Op::Write { file, .. }
            | Op::Read { file, .. }
            | Op::MmapStore { file, .. }
            | Op::Fallocate { file, .. }
            | Op::FallocateKeepSize { file, .. }
            | Op::PunchHole { file, .. }
            | Op::ZeroRange { file, .. }
            | Op::Truncate { file, .. }
            | Op::Fsync { file }
            | Op::Fdatasync { file }
            | Op::Create { file }
            | Op::Unlink { file } => *file,
            Op::Rename { from: a, to: b } | Op::Link { file: a, to: b } => *a.max(b),
            Op::Sync => 0,
        }
    }

    /// Whether the operation is a persistence point (fsync, fdatasync, sync).
    pub fn persists(&self) -> bool {
        matches!(self, Op::Fsync { .. } | Op::Fdatasync { .. } | Op::Sync)
    }
}

/// The name of file `file`: `f<file>`.
pub fn file_name(file: usize) -> String {
    format!("f{file}")
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ch = |b: &u8| {
            if b.is_ascii_graphic() {
                format!("'{}'", *b as char)
            } else {
                format!("0x{b:02x}")
            }
        };
        match self {
            Op::Write {
                file,
                offset,
                len,
                byte,
            } => write!(
                f,
                "pwrite(f{file}, off={offset}, len={len}, byte={})",
                ch(byte)
            ),
            Op::Read { file, offset, len } => write!(f, "pread(f{file}, off={offset}, len={len})"),
            Op::MmapStore {
                file,
                offset,
                len,
                byte,
            } => {
                write!(
                    f,
                    "mmap_store(f{file}, off={offset}, len={len}, byte={})",
                    ch(byte)
                )
            }
            Op::Fallocate { file, offset, len } => {
                write!(f, "fallocate(f{file}, off={offset}, len={len})")
            }
            Op::PunchHole { file, offset, len } => {
                write!(f, "punch_hole(f{file}, off={offset}, len={len})")
            }
            Op::ZeroRange { file, offset, len } => {
                write!(f, "zero_range(f{file}, off={offset}, len={len})")
            }
            Op::Truncate { file, size } => write!(f, "truncate(f{file}, size={size})"),
            Op::Fsync { file } => write!(f, "fsync(f{file})"),
            Op::FallocateKeepSize { file, offset, len } => {
                write!(f, "fallocate(f{file}, KEEP_SIZE, off={offset}, len={len})")
            }
            Op::Fdatasync { file } => write!(f, "fdatasync(f{file})"),
            Op::Sync => write!(f, "sync()"),
            Op::Create { file } => write!(f, "creat(f{file})"),
            Op::Unlink { file } => write!(f, "unlink(f{file})"),
            Op::Rename { from, to } => write!(f, "rename(f{from}, f{to})"),
            Op::Link { file, to } => write!(f, "link(f{file}, f{to})"),
        }
    }
}

/// Check a byte range: block-aligned when `aligned`, inside the file size limit.
pub fn check_range(offset: u64, len: u64, aligned: bool) -> Result<(), FsError> {
    let end = offset.checked_add(len).ok_or(FsError::FileTooBig)?;
    if end > FILE_BYTES_MAX {
        return Err(FsError::FileTooBig);
    }
    if len == 0 {
        return Err(FsError::Invalid("zero length".into()));
    }
    if aligned && (!offset.is_multiple_of(BS) || !len.is_multiple_of(BS)) {
        return Err(FsError::Invalid(format!(
            "range {offset}+{len} is not {BS}-byte aligned"
        )));
    }
    Ok(())
}

/// Which extent-changing operation a `RangeTask` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeKind {
    Fallocate,
    Punch,
    ZeroRange,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RgState {
    Lock,
    Truncate { idx: u64 },
    Extents,
}

/// fallocate, punch hole and zero range, with the inode and invalidate locks held
/// exclusive: drop the page cache over the range folio by folio (waiting for writeback),
/// yield, then change the extents.
#[derive(Clone, Debug)]
pub struct RangeTask {
    kind: RangeKind,
    ino: usize,
    start: u64,
    end: u64,
    /// Byte end of the request: fallocate and zero range extend the size to it.
    byte_end: u64,
    /// fallocate's `FALLOC_FL_KEEP_SIZE`: the size stays.
    keep_size: bool,
    st: RgState,
}

impl RangeTask {
    pub fn new(kind: RangeKind, ino: usize, offset: u64, len: u64) -> Result<Self, FsError> {
        check_range(offset, len, kind != RangeKind::Fallocate)?;
        Ok(RangeTask {
            kind,
            ino,
            start: offset / BS,
            end: (offset + len).div_ceil(BS),
            byte_end: offset + len,
            keep_size: false,
            st: RgState::Lock,
        })
    }

    /// fallocate with `FALLOC_FL_KEEP_SIZE`.
    pub fn keeping_size(mut self) -> Self {
        self.keep_size = true;
        self
    }

    pub fn runnable(&self, fs: &Fs, me: TaskId) -> bool {
        let inode = fs.inode(self.ino);
        match self.st {
            RgState::Lock => inode.i_rwsem.can_write() && inode.invalidate_lock.can_write(),
            RgState::Truncate { idx } => inode
                .cache
                .get(idx)
                .is_none_or(|f| f.lockable_by(me) && !f.writeback),
            RgState::Extents => true,
        }
    }

    fn unlock_all(&self, fs: &mut Fs, me: TaskId) {
        let inode = fs.inode_mut(self.ino);
        inode.invalidate_lock.up_write(me);
        inode.i_rwsem.up_write(me);
    }

    pub fn step(&mut self, cx: &mut Cx<'_>) -> Step {
        let ino = self.ino;
        match self.st {
            RgState::Lock => {
                let inode = cx.fs.inode_mut(ino);
                inode.i_rwsem.down_write(cx.me);
                inode.invalidate_lock.down_write(cx.me);
                self.st = if self.kind == RangeKind::Fallocate {
                    RgState::Extents
                } else {
                    RgState::Truncate { idx: self.start }
                };
                Step::Yield(YieldPoint::RangeLock, self.start)
            }
            RgState::Truncate { idx } => {
                // Each folio's bytes become zero when it leaves the page cache: until then a
                // store through an existing writable mapping still lands in it (faults are
                // held off by the invalidate lock, reads and writes by the inode lock).
                cx.fs.remove_folio(ino, idx);
                cx.oracle.zero(ino, idx * BS, BS, cx.op);
                self.st = if idx + 1 < self.end {
                    RgState::Truncate { idx: idx + 1 }
                } else {
                    RgState::Extents
                };
                Step::Yield(YieldPoint::RangeTruncatePagecache, idx)
            }
            RgState::Extents => {
                let r = self.change_extents(cx.fs);
                let end_byte = self.byte_end;
                let grows = self.kind != RangeKind::Punch && !self.keep_size;
                if r.is_ok() && grows && end_byte > cx.fs.inode(ino).size {
                    cx.fs.inode_mut(ino).size = end_byte;
                    cx.oracle.set_size(ino, end_byte, cx.op);
                    // The new size is zeros (unwritten blocks): it may reach disk at once.
                    cx.fs.set_disk_size(ino, end_byte);
                }
                if r.is_ok() {
                    cx.fs.touch(ino, true);
                }
                self.unlock_all(cx.fs, cx.me);
                Step::Done(
                    match self.kind {
                        RangeKind::Fallocate => YieldPoint::FallocateAlloc,
                        RangeKind::Punch => YieldPoint::PunchFreeExtents,
                        RangeKind::ZeroRange => YieldPoint::ZeroRangeConvert,
                    },
                    self.start,
                    r.map(|()| 0),
                )
            }
        }
    }

    fn change_extents(&self, fs: &mut Fs) -> Result<(), FsError> {
        let ino = self.ino;
        let at_write = fs.cfg.alloc == AllocMode::AtWrite;
        match self.kind {
            RangeKind::Punch => fs.punch_blocks(ino, self.start, self.end),
            RangeKind::Fallocate => {
                let holes = (self.start..self.end)
                    .filter(|&b| fs.inode(ino).extents.get(b).state == ExtentState::Hole);
                if holes.count() as u64 > fs.alloc.free_blocks() {
                    return Err(FsError::NoSpace);
                }
                for b in self.start..self.end {
                    if fs.inode(ino).extents.get(b).state == ExtentState::Hole {
                        // gfs2 has no unwritten extents: it zeroes what it preallocates.
                        let addr = fs.alloc_block(ino, b, at_write)?;
                        let state = if at_write {
                            ExtentState::Written
                        } else {
                            ExtentState::Unwritten
                        };
                        fs.inode_mut(ino).extents.set(b, Extent { state, addr });
                    }
                }
            }
            RangeKind::ZeroRange => {
                for b in self.start..self.end {
                    let e = fs.inode(ino).extents.get(b);
                    match e.state {
                        ExtentState::Written if at_write => {
                            let req = Request::Write {
                                block: e.addr,
                                data: vec![0; BLOCK_SIZE],
                                fua: false,
                            };
                            block::submit_and_complete(fs.dev.as_mut(), req)?;
                        }
                        ExtentState::Written => fs.inode_mut(ino).extents.set(
                            b,
                            Extent {
                                state: ExtentState::Unwritten,
                                addr: e.addr,
                            },
                        ),
                        ExtentState::Delalloc => fs.inode_mut(ino).extents.set(b, Extent::HOLE),
                        ExtentState::Hole | ExtentState::Unwritten => {}
                    }
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TrState {
    Lock,
    ZeroTail,
    Pagecache { cursor: u64 },
    Extents,
}

/// truncate (setattr size) with both locks exclusive: zero the new EOF block's tail, set the
/// size, drop the page cache past EOF folio by folio, yield, then free the extents past EOF.
#[derive(Clone, Debug)]
pub struct TruncateTask {
    ino: usize,
    size: u64,
    st: TrState,
}

impl TruncateTask {
    pub fn new(ino: usize, size: u64) -> Result<Self, FsError> {
        if size > FILE_BYTES_MAX {
            return Err(FsError::FileTooBig);
        }
        Ok(TruncateTask {
            ino,
            size,
            st: TrState::Lock,
        })
    }

    fn first_gone(&self) -> u64 {
        self.size.div_ceil(BS)
    }

    /// The size change of xfs_setattr_size: zero the tail of the new last block when the
    /// file shrinks, then set the size in memory, in the oracle and on disk.
    fn setsize(&mut self, cx: &mut Cx<'_>) -> Step {
        let ino = self.ino;
        let old = cx.fs.inode(ino).size;
        if self.size < old && !self.size.is_multiple_of(BS) {
            if let Err((idx, e)) = self.iomap_truncate_page(cx) {
                let inode = cx.fs.inode_mut(ino);
                inode.invalidate_lock.up_write(cx.me);
                inode.i_rwsem.up_write(cx.me);
                return Step::Done(YieldPoint::TruncateReadError, idx, Err(e));
            }
        }
        cx.fs.inode_mut(ino).size = self.size;
        cx.oracle.set_size(ino, self.size, cx.op);
        cx.fs.set_disk_size(ino, self.size);
        cx.fs.touch(ino, true);
        self.st = if self.size < old {
            TrState::Pagecache {
                cursor: self.first_gone(),
            }
        } else {
            TrState::Extents
        };
        Step::Yield(YieldPoint::TruncateSetsize, self.size)
    }

    /// iomap_truncate_page: zero [size, block end) through the page cache so the bytes
    /// cannot come back if the file grows again. A failed read of the block names it.
    fn iomap_truncate_page(&self, cx: &mut Cx<'_>) -> Result<(), (u64, FsError)> {
        let ino = self.ino;
        let idx = self.size / BS;
        let state = cx.fs.inode(ino).extents.get(idx).state;
        let written = state == ExtentState::Written;
        // An UNWRITTEN block may have data in flight from this very folio: the zeroed tail
        // must be written after it.
        let allocated = written || state == ExtentState::Unwritten;
        let cached = cx.fs.inode(ino).cache.get(idx).is_some_and(|f| f.uptodate);
        if written && !cached {
            cx.fs.read_folio(ino, idx).map_err(|e| (idx, e))?;
        }
        if let Some(f) = cx.fs.inode_mut(ino).cache.get_mut(idx) {
            if f.uptodate {
                f.data[(self.size % BS) as usize..].fill(0);
                f.dirty |= allocated;
                if f.dirty {
                    cx.fs.dirtied(ino, idx);
                }
            }
        }
        Ok(())
    }

    pub fn runnable(&self, fs: &Fs, me: TaskId) -> bool {
        let inode = fs.inode(self.ino);
        match self.st {
            TrState::Lock => inode.i_rwsem.can_write() && inode.invalidate_lock.can_write(),
            TrState::ZeroTail => inode.cache.lockable(self.size / BS, me),
            TrState::Pagecache { cursor } => match inode.cache.next_where(cursor, |_| true) {
                Some(idx) => {
                    let f = inode.cache.get(idx).expect("found");
                    f.lockable_by(me) && !f.writeback
                }
                None => true,
            },
            TrState::Extents => true,
        }
    }

    pub fn step(&mut self, cx: &mut Cx<'_>) -> Step {
        let ino = self.ino;
        match self.st {
            TrState::Lock => {
                let inode = cx.fs.inode_mut(ino);
                inode.i_rwsem.down_write(cx.me);
                inode.invalidate_lock.down_write(cx.me);
                self.st = TrState::ZeroTail;
                Step::Yield(YieldPoint::TruncateLock, self.size)
            }
            TrState::ZeroTail => self.setsize(cx),
            TrState::Pagecache { cursor } => {
                match cx.fs.inode(ino).cache.next_where(cursor, |_| true) {
                    Some(idx) => {
                        cx.fs.remove_folio(ino, idx);
                        self.st = TrState::Pagecache { cursor: idx + 1 };
                        Step::Yield(YieldPoint::TruncatePagecache, idx)
                    }
                    None => {
                        self.st = TrState::Extents;
                        Step::Yield(YieldPoint::TruncatePagecacheDone, cursor)
                    }
                }
            }
            TrState::Extents => {
                let span = cx.fs.inode(ino).extents.span().min(FILE_BLOCKS_MAX);
                cx.fs.punch_blocks(ino, self.first_gone(), span);
                let inode = cx.fs.inode_mut(ino);
                inode.invalidate_lock.up_write(cx.me);
                inode.i_rwsem.up_write(cx.me);
                Step::Done(YieldPoint::TruncateFreeExtents, self.size, Ok(0))
            }
        }
    }
}

#[derive(Clone, Debug)]
enum FsyncState {
    /// Writing back `inos[at]`.
    Writeback {
        at: usize,
        pass: WbPass,
    },
    Wait,
}

/// fsync, fdatasync (one file) and sync (every file): WB_SYNC_ALL writeback passes, wait for
/// the files' IO, then force the journal (a filesystem in memory only flushes the device).
/// fdatasync forces the journal too: the model keeps no timestamp-only changes apart. A
/// completed one is a persistence point: the oracle keeps what it promised, and on a
/// filesystem that persists a mark goes into the device's log.
#[derive(Clone, Debug)]
pub struct FsyncTask {
    /// `Some(ino)` for fsync and fdatasync, `None` for sync.
    file: Option<usize>,
    inos: Vec<usize>,
    /// Each file's size when the operation started: everything below it is written (or a
    /// hole) once the passes and their IO are done, so the on-disk size may reach it.
    sizes: Vec<u64>,
    begun: bool,
    st: FsyncState,
}

impl FsyncTask {
    pub fn new(ino: usize) -> Self {
        FsyncTask {
            file: Some(ino),
            inos: vec![ino],
            sizes: Vec::new(),
            begun: false,
            st: FsyncState::Writeback {
                at: 0,
                pass: WbPass::new(ino, true),
            },
        }
    }

    /// sync: every file in use when it starts.
    pub fn sync() -> Self {
        FsyncTask {
            file: None,
            inos: Vec::new(),
            sizes: Vec::new(),
            begun: false,
            st: FsyncState::Wait,
        }
    }

    pub fn runnable(&self, fs: &Fs, me: TaskId) -> bool {
        match &self.st {
            FsyncState::Writeback { pass, .. } => pass.runnable(fs, me),
            FsyncState::Wait if !self.begun => true,
            FsyncState::Wait => self.inos.iter().all(|&ino| {
                !fs.ioends.iter().any(|io| io.ino == ino)
                    && !fs.inode(ino).cache.folios.values().any(|f| f.writeback)
            }),
        }
    }

    /// The first step: the promise is taken, and sync learns its files.
    fn begin(&mut self, cx: &mut Cx<'_>) {
        self.begun = true;
        cx.oracle.promise_begin(cx.op, self.file);
        if self.file.is_none() {
            self.inos = (0..cx.fs.inodes.len())
                .filter(|&i| cx.fs.inode(i).in_use)
                .collect();
            if let Some(&ino) = self.inos.first() {
                self.st = FsyncState::Writeback {
                    at: 0,
                    pass: WbPass::new(ino, true),
                };
            }
        }
        self.sizes = self.inos.iter().map(|&i| cx.fs.inode(i).size).collect();
    }

    /// The on-disk size of every file covered moves up to its size at the start (or its size
    /// now, if a truncate made it smaller since): fsync persists the size too, even where no
    /// IO completed to move it (the last block was punched, or is a hole).
    fn settle_sizes(&self, fs: &mut Fs) {
        for (&ino, &at_start) in self.inos.iter().zip(&self.sizes) {
            let i = fs.inode(ino);
            let size = at_start.min(i.size);
            if i.in_use && size > i.disk_size {
                fs.set_disk_size(ino, size);
            }
        }
    }

    pub fn step(&mut self, cx: &mut Cx<'_>) -> Step {
        if !self.begun {
            self.begin(cx);
            if self.file.is_none() {
                // sync's first step only learns its files: the next one waits its turn
                // (its first pass may not be runnable yet).
                return Step::Yield(YieldPoint::SyncBegin, self.inos.len() as u64);
            }
        }
        match &mut self.st {
            FsyncState::Writeback { at, pass } => match pass.step(cx) {
                Step::Done(l, a, Ok(_)) => {
                    let next = *at + 1;
                    self.st = match self.inos.get(next) {
                        Some(&ino) => FsyncState::Writeback {
                            at: next,
                            pass: WbPass::new(ino, true),
                        },
                        None => FsyncState::Wait,
                    };
                    Step::Yield(l, a)
                }
                other => other,
            },
            FsyncState::Wait => {
                let arg = self.file.unwrap_or(usize::MAX) as u64;
                self.settle_sizes(cx.fs);
                let forced = if cx.fs.persistent() {
                    cx.fs.log_force()
                } else {
                    block::submit_and_complete(cx.fs.dev.as_mut(), Request::Flush)
                        .map_err(FsError::from)
                };
                match forced {
                    Ok(()) => {
                        if let Some(mark) = cx.oracle.promise_done(cx.op) {
                            if cx.fs.persistent() {
                                cx.fs.dev.mark(&mark);
                            }
                        }
                        Step::Done(YieldPoint::FsyncFlush, arg, Ok(0))
                    }
                    Err(e) => Step::Done(YieldPoint::FsyncFlushError, arg, Err(e)),
                }
            }
        }
    }
}
