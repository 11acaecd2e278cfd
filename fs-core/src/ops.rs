//! The operations a workload is made of (`Op`), and the tasks for fallocate, punch hole,
//! zero range, truncate and fsync. Buffered IO and mmap tasks live in `buffered_io`.

use crate::block::{self, Request, BLOCK_SIZE};
use crate::extent::{Extent, ExtentState, FILE_BLOCKS_MAX};
use crate::fs::{AllocMode, Fs, FsError, ValidityCheckAt, FILE_BYTES_MAX};
use crate::iomap::{self, IoMap, IoMapKind};
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
    /// `pwrite` on a file opened `O_DIRECT` (block-aligned offset and length).
    DirectWrite {
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
            | Op::DirectWrite { file, .. }
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
            Op::DirectWrite {
                file,
                offset,
                len,
                byte,
            } => write!(
                f,
                "pwrite(f{file}, O_DIRECT, off={offset}, len={len}, byte={})",
                ch(byte)
            ),
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
                .get(fs.folio_of(self.ino, idx))
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
            RgState::Lock if self.kind == RangeKind::ZeroRange && !cx.fs.cfg.gfs2.is_off() => {
                // gfs2_fallocate: only FALLOC_FL_PUNCH_HOLE and FALLOC_FL_KEEP_SIZE.
                Step::Done(
                    YieldPoint::ZeroRangeUnsupported,
                    self.start,
                    Err(FsError::Unsupported(
                        "zero range (gfs2 has no FALLOC_FL_ZERO_RANGE)",
                    )),
                )
            }
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
                // Each folio's bytes in the range become zero when it leaves the page cache
                // (a folio the range covers in part stays, with that part zeroed): until then
                // a store through an existing writable mapping still lands in it (faults are
                // held off by the invalidate lock, reads and writes by the inode lock).
                let folio = cx.fs.folio_of(ino, idx);
                let next = cx.fs.folio_end(ino, folio).min(self.end);
                cx.fs
                    .truncate_folio_range(ino, folio, self.start * BS, self.end * BS);
                cx.oracle.zero(ino, idx * BS, (next - idx) * BS, cx.op);
                self.st = if next < self.end {
                    RgState::Truncate { idx: next }
                } else {
                    RgState::Extents
                };
                Step::Yield(YieldPoint::RangeTruncatePagecache, folio)
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
            RangeKind::ZeroRange if at_write => self.zero_in_place(fs)?,
            RangeKind::ZeroRange => self.punch_and_preallocate(fs)?,
        }
        Ok(())
    }

    /// Zero range with blocks allocated at write time (the abstract `--alloc at-write`):
    /// write zeros over the written blocks, drop the rest.
    fn zero_in_place(&self, fs: &mut Fs) -> Result<(), FsError> {
        let ino = self.ino;
        for b in self.start..self.end {
            let e = fs.inode(ino).extents.get(b);
            match e.state {
                ExtentState::Written => {
                    let req = Request::Write {
                        block: e.addr,
                        data: vec![0; BLOCK_SIZE].into(),
                        fua: false,
                    };
                    block::submit_and_complete(fs.dev.as_mut(), req)?;
                }
                ExtentState::Delalloc => fs.inode_mut(ino).extents.set(b, Extent::HOLE),
                ExtentState::Hole | ExtentState::Unwritten => {}
            }
        }
        Ok(())
    }

    /// XFS's zero range (`xfs_file_fallocate` with `FALLOC_FL_ZERO_RANGE`, v6.6): punch the
    /// range (`xfs_free_file_space`), then preallocate it unwritten (`xfs_alloc_file_space`),
    /// on new blocks; "if prealloc returns ENOSPC, the file range is still zero-valued by
    /// virtue of the hole punch".
    fn punch_and_preallocate(&self, fs: &mut Fs) -> Result<(), FsError> {
        let ino = self.ino;
        fs.punch_blocks(ino, self.start, self.end);
        for b in self.start..self.end {
            if fs.alloc.free_blocks() == 0 {
                return Err(FsError::NoSpace);
            }
            let addr = fs.alloc_block(ino, b, false)?;
            let state = ExtentState::Unwritten;
            fs.inode_mut(ino).extents.set(b, Extent { state, addr });
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TrState {
    Lock,
    /// `xfs_setattr_size`'s `filemap_write_and_wait_range(newsize, newsize)` before the
    /// zeroing: "iomap won't detect a dirty page over an unwritten block". Waits until the
    /// new EOF folio is clean and not under writeback (the flusher and IO completion do the
    /// work; the truncate holds both inode locks, so nothing dirties it again).
    FlushEof,
    /// `iomap_zero_range` over `[zero_from, end of its block)` (`iomap_truncate_page` when
    /// the file shrinks, `xfs_zero_range` from the old EOF when it grows): map that block.
    ZeroBegin,
    /// The cookie check before the folio lock (`ValidityCheckAt::BeforeFolioLock` only).
    ZeroPreCheck {
        map: IoMap,
    },
    /// `iomap_zero_iter` with the mapping `ZeroBegin` cached: skip it (a hole or unwritten
    /// block reads as zeros), or lock the folio, check the cookie, fill what is not uptodate
    /// (`__iomap_write_begin`) and zero the tail.
    ZeroFolio {
        map: IoMap,
    },
    /// Set the size (the tail is zeroed, or needs no zeroing).
    SetSize,
    Pagecache {
        cursor: u64,
    },
    Extents,
}

/// truncate (setattr size, `xfs_setattr_size` v6.6) with both locks exclusive: zero the
/// part of the EOF block past the smaller of the two sizes through the page cache (after
/// flushing it, when shrinking), set the size, drop the page cache past EOF folio by folio,
/// yield, then free the extents past EOF.
#[derive(Clone, Debug)]
pub struct TruncateTask {
    ino: usize,
    size: u64,
    /// Where the zeroing starts: the new size when the file shrinks (the tail of the new
    /// last block), the old size when it grows (`xfs_zero_range` from the old EOF: what lies
    /// past it in its block must read as zeros once the size covers it).
    zero_from: u64,
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
            zero_from: size,
            st: TrState::Lock,
        })
    }

    fn first_gone(&self) -> u64 {
        self.size.div_ceil(BS)
    }

    /// The size change of xfs_setattr_size, once the tail of the new last block is zeroed:
    /// set the size in memory, in the oracle and on disk.
    fn setsize(&mut self, cx: &mut Cx<'_>) -> Step {
        let ino = self.ino;
        let old = cx.fs.inode(ino).size;
        cx.fs.inode_mut(ino).size = self.size;
        cx.oracle.set_size(ino, self.size, cx.op);
        cx.fs.set_disk_size(ino, self.size);
        cx.fs.touch(ino, true);
        self.st = if self.size < old {
            TrState::Pagecache {
                cursor: cx.fs.folio_of(ino, self.first_gone()),
            }
        } else {
            TrState::Extents
        };
        Step::Yield(YieldPoint::TruncateSetsize, self.size)
    }

    /// `iomap_truncate_page` -> `iomap_zero_range` -> `iomap_iter`: map the block the new
    /// EOF falls in. The mapping is cached until the folio is locked.
    fn zero_begin(&mut self, cx: &mut Cx<'_>) -> Step {
        let ino = self.ino;
        let idx = self.zero_from / BS;
        let inode = cx.fs.inode(ino);
        let map = IoMap::from_run(inode.extents.run_at(idx, 1), inode.extents.seq());
        let racy = cx.fs.cfg.validity_check_at == ValidityCheckAt::BeforeFolioLock;
        self.st = if cx.fs.cfg.iomap_valid && racy {
            TrState::ZeroPreCheck { map }
        } else {
            TrState::ZeroFolio { map }
        };
        Step::Yield(YieldPoint::ZeroIomapBegin, idx)
    }

    /// The racy placement: the cookie checked before the folio is locked.
    fn zero_precheck(&mut self, cx: &mut Cx<'_>, map: IoMap) -> Step {
        self.st = if iomap::iomap_valid(cx.fs, self.ino, &map) {
            TrState::ZeroFolio { map }
        } else {
            TrState::ZeroBegin
        };
        Step::Yield(YieldPoint::ZeroIomapValid, self.zero_from / BS)
    }

    /// `iomap_zero_iter` over the EOF block with the cached `map`: a hole or unwritten
    /// block needs nothing (it reads as zeros, and the flush before made any data in its
    /// folio written); otherwise `iomap_write_begin`: lock the folio, check the cookie (a
    /// stale mapping is mapped again, as the write path does), fill the folio if it is not
    /// uptodate (zeros where `iomap_block_needs_zeroing` says so, else the block read through
    /// the mapping), zero the tail, dirty it.
    fn zero_folio(&mut self, cx: &mut Cx<'_>, map: IoMap) -> Step {
        let (ino, idx) = (self.ino, self.zero_from / BS);
        let folio = cx.fs.folio_of(ino, idx);
        if matches!(map.kind, IoMapKind::Hole | IoMapKind::Unwritten) {
            return self.setsize(cx);
        }
        let check = cx.fs.cfg.iomap_valid
            && cx.fs.cfg.validity_check_at != ValidityCheckAt::BeforeFolioLock;
        if check && !iomap::iomap_valid(cx.fs, ino, &map) {
            self.st = TrState::ZeroBegin;
            return Step::Yield(YieldPoint::ZeroIomapValid, idx);
        }
        if let Err(e) = self.zero_fill(cx, &map) {
            let inode = cx.fs.inode_mut(ino);
            inode.invalidate_lock.up_write(cx.me);
            inode.i_rwsem.up_write(cx.me);
            return Step::Done(YieldPoint::TruncateReadError, folio, Err(e));
        }
        self.setsize(cx)
    }

    /// The folio part of `iomap_zero_iter`: `__iomap_write_begin` with `map` (the EOF block
    /// filled if it is not uptodate), then zero `[size, block end)` and dirty the block
    /// (`iomap_write_end`).
    fn zero_fill(&self, cx: &mut Cx<'_>, map: &IoMap) -> Result<(), FsError> {
        let (ino, b) = (self.ino, self.zero_from / BS);
        let folio = cx.fs.folio_of(ino, b);
        let i = b - cx.fs.folio_start(folio);
        let at = (i * BS) as usize;
        let old_size = cx.fs.inode(ino).size;
        if !cx.fs.get_folio(ino, folio).block_uptodate(i) {
            let data = if iomap::block_needs_zeroing(map, b * BS, old_size) {
                vec![0; BLOCK_SIZE]
            } else {
                block::read_block_sync(cx.fs.dev.as_mut(), map.addr_of(b * BS))?
            };
            if let Some(why) = iomap::stale_view(cx.fs, ino, map, b) {
                let op = cx.op;
                cx.fs.note(|| {
                    format!("op{op} truncate's zeroing filled folio {b} of file {ino} through a stale mapping: {why}")
                });
            }
            let f = cx.fs.get_folio(ino, folio);
            f.data[at..at + BLOCK_SIZE].copy_from_slice(&data);
            f.set_uptodate(i, 1);
        }
        let f = cx.fs.get_folio(ino, folio);
        f.data[at + (self.zero_from % BS) as usize..at + BLOCK_SIZE].fill(0);
        f.set_dirty(i, 1);
        cx.fs.dirtied(ino, folio);
        Ok(())
    }

    pub fn runnable(&self, fs: &Fs, me: TaskId) -> bool {
        let inode = fs.inode(self.ino);
        match self.st {
            TrState::Lock => inode.i_rwsem.can_write() && inode.invalidate_lock.can_write(),
            TrState::ZeroFolio { .. } => fs.folio_lockable_at(self.ino, self.zero_from / BS, me),
            TrState::FlushEof => inode
                .cache
                .get(fs.folio_of(self.ino, self.zero_from / BS))
                .is_none_or(|f| !f.dirty && !f.writeback),
            TrState::ZeroBegin | TrState::ZeroPreCheck { .. } | TrState::SetSize => true,
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
                let old = inode.size;
                self.zero_from = self.size.min(old);
                self.st = if self.size == old || self.zero_from.is_multiple_of(BS) {
                    TrState::SetSize
                } else if self.size < old {
                    TrState::FlushEof
                } else {
                    // Growing: v6.6 zeroes from the old EOF with no flush first.
                    TrState::ZeroBegin
                };
                Step::Yield(YieldPoint::TruncateLock, self.size)
            }
            TrState::FlushEof => {
                self.st = TrState::ZeroBegin;
                Step::Yield(YieldPoint::TruncateFlushEof, self.zero_from / BS)
            }
            TrState::ZeroBegin => self.zero_begin(cx),
            TrState::ZeroPreCheck { map } => self.zero_precheck(cx, map),
            TrState::ZeroFolio { map } => self.zero_folio(cx, map),
            TrState::SetSize => self.setsize(cx),
            TrState::Pagecache { cursor } => {
                match cx.fs.inode(ino).cache.next_where(cursor, |_| true) {
                    Some(idx) => {
                        let gone = self.first_gone() * BS;
                        cx.fs.truncate_folio_range(ino, idx, gone, u64::MAX);
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
