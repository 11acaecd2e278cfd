//! Buffered write (the iomap iterator, `write_begin`/`write_end`, `iomap_end` with the
//! short-write delalloc punch in its old and fixed forms), buffered read, and the mmap
//! store path (read fault, `page_mkwrite`, store). Each is a task: a state machine whose
//! `step` runs the code between two yield points.

use crate::block::{self, BLOCK_SIZE};
use crate::extent::{Extent, ExtentState};
use crate::fs::{Fs, FsError, PunchMode, ValidityCheckAt, FILE_BYTES_MAX};
use crate::iomap::{self, IoMap, IoMapFlags, IoMapKind};
use crate::step::{Cx, Step, YieldPoint};
use crate::TaskId;

const BS: u64 = BLOCK_SIZE as u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WState {
    LockInode,
    Begin,
    /// ValidityCheckAt::BeforeFolioLock only.
    PreCheck,
    GetFolio,
    Valid,
    Prepare,
    Copy,
    End,
    /// Old punch: truncate the page cache folio by folio, then punch.
    OldTruncate {
        idx: u64,
        end: u64,
    },
    OldPunch {
        start: u64,
        end: u64,
    },
    /// Fixed punch: scan folio by folio under the invalidate lock.
    FixedScan {
        idx: u64,
        end: u64,
        locked: bool,
    },
    Finish,
}

/// `iomap_file_buffered_write` over `[pos, pos + data.len())` with the inode lock held.
#[derive(Clone, Debug)]
pub struct WriteTask {
    ino: usize,
    start: u64,
    pos: u64,
    data: Vec<u8>,
    st: WState,
    map: Option<IoMap>,
    /// Position where the current mapping's iteration started.
    map_pos: u64,
    short: bool,
}

impl WriteTask {
    pub fn new(ino: usize, pos: u64, data: Vec<u8>) -> Self {
        WriteTask {
            ino,
            start: pos,
            pos,
            data,
            st: WState::LockInode,
            map: None,
            map_pos: pos,
            short: false,
        }
    }

    fn end(&self) -> u64 {
        self.start + self.data.len() as u64
    }

    fn idx(&self) -> u64 {
        self.pos / BS
    }

    /// Bytes of the current folio this write covers.
    fn plen(&self) -> u64 {
        let map = self.map.expect("mapped");
        let folio_end = (self.idx() + 1) * BS;
        folio_end.min(map.end()).min(self.end()) - self.pos
    }

    /// User copy length, when the next step is the copy.
    pub fn at_user_copy(&self) -> Option<u32> {
        (self.st == WState::Copy).then(|| self.plen() as u32)
    }

    pub fn runnable(&self, fs: &Fs, me: TaskId) -> bool {
        let inode = fs.inode(self.ino);
        match self.st {
            WState::LockInode => {
                inode.i_rwsem.can_write() && (!fs.cfg.gfs2.write_glock || inode.glock.can_write())
            }
            WState::GetFolio => inode.cache.lockable(self.idx(), me),
            WState::OldTruncate { idx, .. } => inode
                .cache
                .get(idx)
                .is_none_or(|f| f.lockable_by(me) && !f.writeback),
            WState::FixedScan { idx, locked, .. } => {
                (locked || inode.invalidate_lock.can_write()) && inode.cache.lockable(idx, me)
            }
            _ => true,
        }
    }

    /// After a folio (or a mapping) is done: the next folio, or `iomap_end`.
    fn next_folio(&mut self, fs: &Fs) -> WState {
        let map = self.map.expect("mapped");
        if self.short || self.pos >= self.end() || self.pos >= map.end() {
            WState::End
        } else if fs.cfg.iomap_valid && fs.cfg.validity_check_at == ValidityCheckAt::BeforeFolioLock
        {
            WState::PreCheck
        } else {
            WState::GetFolio
        }
    }

    fn punch_start(&self) -> u64 {
        if self.pos == self.map_pos {
            self.pos / BS
        } else {
            self.pos.div_ceil(BS)
        }
    }

    fn mark_stale(&mut self) {
        if let Some(m) = self.map.as_mut() {
            m.flags.0 |= IoMapFlags::STALE;
        }
    }

    /// One step of `iomap_file_buffered_write` (`iomap_write_iter` over each mapping): the
    /// state names the part of the iterator that runs next, and each part is a method named
    /// after the kernel function it models. A step ends at a yield point, or ends the write.
    pub fn step(&mut self, cx: &mut Cx<'_>) -> Step {
        match self.st {
            WState::LockInode => self.lock_inode(cx),
            WState::Begin => self.iomap_begin(cx),
            WState::PreCheck | WState::GetFolio | WState::Valid | WState::Prepare => {
                self.write_begin(cx)
            }
            WState::Copy => self.copy_and_write_end(cx),
            WState::End => self.iomap_end(cx),
            WState::OldTruncate { idx, end } => self.old_punch_truncate(cx, idx, end),
            WState::OldPunch { start, end } => {
                if self.map.is_some_and(|m| m.kind == IoMapKind::Mapped) {
                    // gfs2: deallocate the NEW blocks the short write did not reach.
                    cx.fs.punch_blocks(self.ino, start, end);
                } else {
                    punch_delalloc(cx.fs, self.ino, start, end);
                }
                self.st = WState::Finish;
                self.finish_or_remap(cx)
            }
            WState::FixedScan { idx, end, locked } => self.fixed_punch_scan(cx, idx, end, locked),
            WState::Finish => self.finish_or_remap(cx),
        }
    }

    /// `iomap_file_buffered_write`'s caller takes the inode lock exclusive.
    fn lock_inode(&mut self, cx: &mut Cx<'_>) -> Step {
        let ino = self.ino;
        if self.end() > FILE_BYTES_MAX {
            return Step::Done(YieldPoint::WriteEfbig, 0, Err(FsError::FileTooBig));
        }
        cx.fs.inode_mut(ino).i_rwsem.down_write(cx.me);
        if cx.fs.cfg.gfs2.write_glock {
            cx.fs.inode_mut(ino).glock.down_write(cx.me);
        }
        if self.data.is_empty() {
            self.unlock_inode(cx);
            return Step::Done(YieldPoint::WriteEmpty, 0, Ok(0));
        }
        self.st = WState::Begin;
        Step::Yield(YieldPoint::WriteLockInode, self.pos)
    }

    /// `iomap_iter` -> `iomap_begin`: map (and reserve) from `pos` on; the mapping is cached
    /// with its validity cookie until `iomap_end`.
    fn iomap_begin(&mut self, cx: &mut Cx<'_>) -> Step {
        let ino = self.ino;
        match iomap::iomap_begin_write(cx.fs, ino, self.pos, self.end() - self.pos) {
            Ok(map) => {
                self.map = Some(map);
                self.map_pos = self.pos;
                self.st = self.next_folio(cx.fs);
                Step::Yield(YieldPoint::IomapBegin, self.pos)
            }
            Err(e) => {
                self.unlock_inode(cx);
                let done = self.pos - self.start;
                if done > 0 {
                    Step::Done(YieldPoint::IomapBeginError, self.pos, Ok(done))
                } else {
                    Step::Done(YieldPoint::IomapBeginError, self.pos, Err(e))
                }
            }
        }
    }

    /// `iomap_write_begin`, one step per stage: the cookie check before the folio lock (the
    /// racy placement, `ValidityCheckAt::BeforeFolioLock`), `__iomap_get_folio` (which makes
    /// the check inside `->get_folio` for `ValidityCheckAt::InGetFolio`), the check with the
    /// folio locked (`->iomap_valid`, `ValidityCheckAt::AfterFolioLock`), then
    /// `__iomap_write_begin`. A stale mapping is marked STALE and sent to `iomap_end`, so the
    /// iterator maps again.
    fn write_begin(&mut self, cx: &mut Cx<'_>) -> Step {
        let ino = self.ino;
        match self.st {
            WState::PreCheck => {
                let map = self.map.expect("mapped");
                if iomap::iomap_valid(cx.fs, ino, &map) {
                    self.st = WState::GetFolio;
                } else {
                    self.mark_stale();
                    self.st = WState::End;
                }
                Step::Yield(YieldPoint::IomapValidBeforeLock, self.pos)
            }
            WState::GetFolio => {
                let me = cx.me;
                let f = cx.fs.get_folio(ino, self.idx());
                f.locked = Some(me);
                let map = self.map.expect("mapped");
                let check = cx.fs.cfg.iomap_valid;
                match cx.fs.cfg.validity_check_at {
                    ValidityCheckAt::InGetFolio if check => {
                        if iomap::iomap_valid(cx.fs, ino, &map) {
                            self.st = WState::Prepare;
                        } else {
                            self.unlock(cx.fs);
                            self.mark_stale();
                            self.st = WState::End;
                        }
                    }
                    ValidityCheckAt::AfterFolioLock if check => self.st = WState::Valid,
                    _ => self.st = WState::Prepare,
                }
                Step::Yield(YieldPoint::GetFolio, self.idx())
            }
            WState::Valid => {
                let map = self.map.expect("mapped");
                if iomap::iomap_valid(cx.fs, ino, &map) {
                    self.st = WState::Prepare;
                } else {
                    self.unlock(cx.fs);
                    self.mark_stale();
                    self.st = WState::End;
                }
                Step::Yield(YieldPoint::IomapValid, self.idx())
            }
            WState::Prepare => self.write_begin_uncovered(cx),
            st => unreachable!("{st:?} is not a stage of write_begin"),
        }
    }

    /// `__iomap_write_begin`: the folio is locked; make the part the write does not cover
    /// valid: zeros where `iomap_block_needs_zeroing` says so (the mapping is not MAPPED, or
    /// is NEW, or the block is past EOF), else the block read from disk.
    fn write_begin_uncovered(&mut self, cx: &mut Cx<'_>) -> Step {
        let ino = self.ino;
        let map = self.map.expect("mapped");
        let idx = self.idx();
        let poff = self.pos - idx * BS;
        let plen = self.plen();
        let size = cx.fs.inode(ino).size;
        let f = cx.fs.inode(ino).cache.get(idx).expect("locked folio");
        let whole_folio = poff == 0 && plen == BS;
        if !f.uptodate && !whole_folio {
            self.note_uncovered_fill(cx, &map, idx, size);
            if iomap::block_needs_zeroing(&map, idx * BS, size) {
                let f = cx
                    .fs
                    .inode_mut(ino)
                    .cache
                    .get_mut(idx)
                    .expect("locked folio");
                f.data[..poff as usize].fill(0);
                f.data[(poff + plen) as usize..].fill(0);
                f.uptodate = true;
            } else {
                let data = match block::read_block_sync(cx.fs.dev.as_mut(), map.addr_of(self.pos)) {
                    Ok(d) => d,
                    Err(e) => {
                        self.unlock(cx.fs);
                        self.unlock_inode(cx);
                        return Step::Done(YieldPoint::WriteBeginReadError, idx, Err(e.into()));
                    }
                };
                let f = cx
                    .fs
                    .inode_mut(ino)
                    .cache
                    .get_mut(idx)
                    .expect("locked folio");
                f.data = data;
                f.uptodate = true;
            }
        }
        self.st = WState::Copy;
        Step::Yield(YieldPoint::WriteBegin, idx)
    }

    /// Notes (for the report, without changing anything) when `__iomap_write_begin` is about
    /// to fill folio `idx` from a mapping that no longer tells the truth.
    fn note_uncovered_fill(&self, cx: &mut Cx<'_>, map: &IoMap, idx: u64, size: u64) {
        let ino = self.ino;
        let new_but_written = map.flags.has(IoMapFlags::NEW)
            && matches!(map.kind, IoMapKind::Mapped | IoMapKind::Unwritten)
            && cx.fs.alloc.data_written(map.addr_of(idx * BS));
        if new_but_written {
            let (op, addr) = (cx.op, map.addr_of(idx * BS));
            cx.fs.note(|| {
                format!(
                    "op{op} write_begin zero-filled the uncovered part of folio {idx} of file {ino}: its cached \
                     {:?}|NEW mapping says device block {addr} is new, but writeback has written data to it \
                     since (the extent and seq did not change, so the cookie cannot see it)",
                    map.kind
                )
            });
        } else if let Some(why) = iomap::stale_view(cx.fs, ino, map, idx) {
            let (op, zero) = (cx.op, iomap::block_needs_zeroing(map, idx * BS, size));
            let act = if zero {
                "zero-filled"
            } else {
                "read from disk"
            };
            cx.fs.note(|| {
                format!("op{op} write_begin {act} the uncovered part of folio {idx} of file {ino}: {why}")
            });
        }
    }

    /// The user copy (`copy_folio_from_iter_atomic`, where a short copy can be injected) and
    /// `iomap_write_end`: the folio's linearisation point for the oracle.
    fn copy_and_write_end(&mut self, cx: &mut Cx<'_>) -> Step {
        let ino = self.ino;
        let idx = self.idx();
        let poff = (self.pos - idx * BS) as usize;
        let plen = self.plen() as usize;
        let mut copied = cx.short_copy.map_or(plen, |s| (s as usize).min(plen));
        let f = cx
            .fs
            .inode_mut(ino)
            .cache
            .get_mut(idx)
            .expect("locked folio");
        // __iomap_write_end: a short copy into a !uptodate folio counts as nothing.
        if copied < plen && !f.uptodate {
            copied = 0;
        }
        if copied > 0 {
            let src = (self.pos - self.start) as usize;
            f.data[poff..poff + copied].copy_from_slice(&self.data[src..src + copied]);
            f.uptodate = true;
            f.dirty = true;
            cx.oracle
                .write(ino, self.pos, &self.data[src..src + copied], cx.op);
            cx.fs.dirtied(ino, idx);
            let inode = cx.fs.inode_mut(ino);
            inode.size = inode.size.max(self.pos + copied as u64);
            let size = inode.size;
            if cx.fs.cfg.bugs.size_before_data && size > cx.fs.inode(ino).disk_size {
                // The planted bug: the on-disk size runs ahead of the data.
                cx.fs.set_disk_size(ino, size);
            }
            cx.fs.touch(ino, true);
        }
        self.unlock(cx.fs);
        self.pos += copied as u64;
        if copied < plen {
            self.short = true;
        }
        self.st = self.next_folio(cx.fs);
        Step::Yield(
            if copied < plen {
                YieldPoint::CopyShort
            } else {
                YieldPoint::CopyWriteEnd
            },
            idx,
        )
    }

    /// `iomap_end` (xfs_buffered_write_iomap_end): punch the delalloc this call reserved but
    /// did not write, in the old or the fixed form.
    fn iomap_end(&mut self, cx: &mut Cx<'_>) -> Step {
        let map = self.map.expect("mapped");
        // iomap_last_written_block: with nothing written, round down.
        let punch_start = self.punch_start();
        let punch_end = map.end().min(self.end()).div_ceil(BS);
        let gfs2_punch = cx.fs.cfg.gfs2.short_write_punch && map.kind == IoMapKind::Mapped;
        if (map.kind == IoMapKind::Delalloc || gfs2_punch)
            && map.flags.has(IoMapFlags::NEW)
            && punch_start < punch_end
        {
            // gfs2_iomap_end: truncate_pagecache_range, then punch_hole, whatever the punch
            // switch says (gfs2 never had the fixed form).
            let punch = if gfs2_punch {
                PunchMode::Old
            } else {
                cx.fs.cfg.punch
            };
            self.st = match punch {
                PunchMode::Old => WState::OldTruncate {
                    idx: punch_start,
                    end: punch_end,
                },
                PunchMode::Fixed => WState::FixedScan {
                    idx: punch_start,
                    end: punch_end,
                    locked: false,
                },
            };
            return Step::Yield(YieldPoint::IomapEnd, self.pos);
        }
        self.st = WState::Finish;
        self.finish_or_remap(cx)
    }

    /// The old punch, first half: `truncate_pagecache_range`, one folio per step; it drops
    /// the folio whatever it holds.
    fn old_punch_truncate(&mut self, cx: &mut Cx<'_>, idx: u64, end: u64) -> Step {
        let ino = self.ino;
        if cx.fs.inode(ino).cache.get(idx).is_some_and(|f| f.dirty) {
            let op = cx.op;
            cx.fs.note(|| {
                format!("op{op} short-write punch (old form) dropped dirty folio {idx} of file {ino} from the page cache")
            });
        }
        cx.fs.remove_folio(ino, idx);
        self.st = if idx + 1 < end {
            WState::OldTruncate { idx: idx + 1, end }
        } else {
            WState::OldPunch {
                start: self.punch_start(),
                end,
            }
        };
        Step::Yield(YieldPoint::PunchTruncatePagecache, idx)
    }

    /// The fixed punch: under the invalidate lock, one folio per step, punch the delalloc
    /// under every folio that is not dirty (a dirty one keeps its reservation).
    fn fixed_punch_scan(&mut self, cx: &mut Cx<'_>, idx: u64, end: u64, locked: bool) -> Step {
        let ino = self.ino;
        if !locked {
            cx.fs.inode_mut(ino).invalidate_lock.down_write(cx.me);
        }
        let keep = cx.fs.inode(ino).cache.get(idx).is_some_and(|f| f.dirty);
        if !keep {
            punch_delalloc(cx.fs, ino, idx, idx + 1);
        }
        if idx + 1 < end {
            self.st = WState::FixedScan {
                idx: idx + 1,
                end,
                locked: true,
            };
            Step::Yield(YieldPoint::PunchScan, idx)
        } else {
            cx.fs.inode_mut(ino).invalidate_lock.up_write(cx.me);
            self.st = WState::Finish;
            Step::Yield(YieldPoint::PunchScanDone, idx)
        }
    }

    /// Between `iomap_end` and the next `iomap_begin`: continue (remap after STALE or the next
    /// extent) or return.
    fn finish_or_remap(&mut self, cx: &mut Cx<'_>) -> Step {
        if self.short || self.pos >= self.end() {
            self.unlock_inode(cx);
            Step::Done(YieldPoint::WriteDone, self.pos, Ok(self.pos - self.start))
        } else {
            self.st = WState::Begin;
            Step::Yield(YieldPoint::IomapEnd, self.pos)
        }
    }

    /// Drops what `lock_inode` took: gfs2's glock (when modelled), then `i_rwsem`.
    fn unlock_inode(&self, cx: &mut Cx<'_>) {
        let glock = cx.fs.cfg.gfs2.write_glock;
        let inode = cx.fs.inode_mut(self.ino);
        if glock {
            inode.glock.up_write(cx.me);
        }
        inode.i_rwsem.up_write(cx.me);
    }

    fn unlock(&self, fs: &mut Fs) {
        if let Some(f) = fs.inode_mut(self.ino).cache.get_mut(self.idx()) {
            f.locked = None;
        }
    }
}

/// Punch DELALLOC blocks in `[start, end)` back to holes (other states are left alone).
pub fn punch_delalloc(fs: &mut Fs, ino: usize, start: u64, end: u64) {
    for b in start..end {
        if fs.inode(ino).extents.get(b).state == ExtentState::Delalloc {
            fs.inode_mut(ino).extents.set(b, Extent::HOLE);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RState {
    Lock,
    Folio,
}

/// Buffered read of `[pos, pos + len)`, clamped to EOF, under the shared inode lock. Each
/// folio is locked, read with a fresh mapping if not uptodate, and copied out in one step;
/// the bytes are checked against the oracle there.
#[derive(Clone, Debug)]
pub struct ReadTask {
    ino: usize,
    pos: u64,
    end: u64,
    st: RState,
    got: u64,
    /// The bytes read, when the caller wants them ([`ReadTask::collecting`]).
    out: Option<Vec<u8>>,
}

impl ReadTask {
    pub fn new(ino: usize, pos: u64, len: u64) -> Self {
        ReadTask {
            ino,
            pos,
            end: pos + len,
            st: RState::Lock,
            got: 0,
            out: None,
        }
    }

    /// A read that keeps the bytes it copies out, for [`ReadTask::take_data`]. Bytes past the
    /// end of the file are not read (the data is shorter than `len`).
    pub fn collecting(ino: usize, pos: u64, len: u64) -> Self {
        ReadTask {
            out: Some(Vec::with_capacity(len as usize)),
            ..ReadTask::new(ino, pos, len)
        }
    }

    /// The bytes a collecting read copied out so far.
    pub fn take_data(&mut self) -> Option<Vec<u8>> {
        self.out.take()
    }

    pub fn runnable(&self, fs: &Fs, me: TaskId) -> bool {
        match self.st {
            RState::Lock => fs.inode(self.ino).i_rwsem.can_read(),
            RState::Folio => fs.inode(self.ino).cache.lockable(self.pos / BS, me),
        }
    }

    pub fn step(&mut self, cx: &mut Cx<'_>) -> Step {
        let ino = self.ino;
        match self.st {
            RState::Lock => {
                cx.fs.inode_mut(ino).i_rwsem.down_read();
                self.end = self.end.min(cx.fs.inode(ino).size);
                if self.pos >= self.end {
                    cx.fs.inode_mut(ino).i_rwsem.up_read();
                    return Step::Done(YieldPoint::ReadEof, self.pos, Ok(0));
                }
                self.st = RState::Folio;
                Step::Yield(YieldPoint::ReadLockInode, self.pos)
            }
            RState::Folio => {
                let idx = self.pos / BS;
                let uptodate = cx.fs.get_folio(ino, idx).uptodate;
                if !uptodate {
                    if let Err(e) = cx.fs.read_folio(ino, idx) {
                        cx.fs.inode_mut(ino).i_rwsem.up_read();
                        return Step::Done(YieldPoint::ReadError, idx, Err(e));
                    }
                }
                let n = ((idx + 1) * BS).min(self.end) - self.pos;
                let off = (self.pos - idx * BS) as usize;
                let f = cx.fs.inode(ino).cache.get(idx).expect("just read");
                let bytes = &f.data[off..off + n as usize];
                cx.oracle.check_read(ino, self.pos, bytes, cx.op);
                if let Some(out) = self.out.as_mut() {
                    out.extend_from_slice(bytes);
                }
                self.pos += n;
                self.got += n;
                if self.pos >= self.end {
                    cx.fs.inode_mut(ino).i_rwsem.up_read();
                    return Step::Done(YieldPoint::ReadDone, idx, Ok(self.got));
                }
                Step::Yield(YieldPoint::ReadFolio, idx)
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MState {
    Fault,
    Mkwrite,
    Store,
}

/// A store through a shared mapping to `[pos, pos + data.len())`, inside one folio: read
/// fault, `page_mkwrite` (reserve/allocate, dirty, map writable), then the store, which lands
/// only while the folio is still mapped writable and otherwise faults again.
#[derive(Clone, Debug)]
pub struct MmapStoreTask {
    ino: usize,
    pos: u64,
    data: Vec<u8>,
    st: MState,
    /// The folio the read fault pinned (its `gen`).
    pinned: Option<u64>,
}

impl MmapStoreTask {
    pub fn new(ino: usize, pos: u64, data: Vec<u8>) -> Result<Self, FsError> {
        if data.is_empty() || pos / BS != (pos + data.len() as u64 - 1) / BS {
            return Err(FsError::Invalid(
                "an mmap store must be non-empty and inside one folio".into(),
            ));
        }
        Ok(MmapStoreTask {
            ino,
            pos,
            data,
            st: MState::Fault,
            pinned: None,
        })
    }

    fn idx(&self) -> u64 {
        self.pos / BS
    }

    fn beyond_eof(&self, fs: &Fs) -> bool {
        self.pos + self.data.len() as u64 > fs.inode(self.ino).size
    }

    pub fn runnable(&self, fs: &Fs, me: TaskId) -> bool {
        let inode = fs.inode(self.ino);
        match self.st {
            MState::Fault => {
                inode.invalidate_lock.can_read()
                    && inode.cache.lockable(self.idx(), me)
                    && (!fs.cfg.gfs2.fault_glock || inode.glock.can_read())
            }
            MState::Mkwrite => {
                inode.invalidate_lock.can_read()
                    && inode.cache.lockable(self.idx(), me)
                    && (!fs.cfg.mkwrite_takes_inode_lock || inode.i_rwsem.can_read())
                    && (!fs.cfg.gfs2.mkwrite_glock || inode.glock.can_write())
            }
            MState::Store => true,
        }
    }

    pub fn step(&mut self, cx: &mut Cx<'_>) -> Step {
        let ino = self.ino;
        let idx = self.idx();
        match self.st {
            MState::Fault => {
                if self.beyond_eof(cx.fs) {
                    return Step::Done(YieldPoint::FaultSigbus, idx, Err(FsError::SigBus));
                }
                let uptodate = cx.fs.get_folio(ino, idx).uptodate;
                if !uptodate {
                    if let Err(e) = cx.fs.read_folio(ino, idx) {
                        return Step::Done(YieldPoint::FaultReadError, idx, Err(e));
                    }
                }
                // The fault returns with a reference on the folio, held into page_mkwrite.
                let f = cx.fs.get_folio(ino, idx);
                f.pins += 1;
                self.pinned = Some(f.gen);
                self.st = MState::Mkwrite;
                Step::Yield(YieldPoint::FaultRead, idx)
            }
            MState::Mkwrite => {
                let gen = self.pinned.take();
                let same = match cx.fs.inode_mut(ino).cache.get_mut(idx) {
                    Some(f) if Some(f.gen) == gen => {
                        f.pins -= 1;
                        true
                    }
                    _ => false,
                };
                if !same {
                    // Truncated or punched since the fault: fault again.
                    self.st = MState::Fault;
                    return Step::Yield(YieldPoint::PageMkwriteRefault, idx);
                }
                if self.beyond_eof(cx.fs) {
                    return Step::Done(YieldPoint::PageMkwriteSigbus, idx, Err(FsError::SigBus));
                }
                // iomap_page_mkwrite with the folio locked: map the folio (reserving delalloc
                // over a hole), then dirty it.
                if let Err(e) = iomap::iomap_begin_write(cx.fs, ino, idx * BS, BS) {
                    return Step::Done(YieldPoint::PageMkwriteError, idx, Err(e));
                }
                let f = cx.fs.inode_mut(ino).cache.get_mut(idx).expect("present");
                f.dirty = true;
                f.mapped_writable = true;
                cx.fs.dirtied(ino, idx);
                self.st = MState::Store;
                Step::Yield(YieldPoint::PageMkwrite, idx)
            }
            MState::Store => {
                let eof = self.beyond_eof(cx.fs);
                match cx.fs.inode_mut(ino).cache.get_mut(idx) {
                    Some(f) if f.mapped_writable && !eof => {
                        let off = (self.pos - idx * BS) as usize;
                        f.data[off..off + self.data.len()].copy_from_slice(&self.data);
                        f.dirty = true;
                        cx.oracle.write(ino, self.pos, &self.data, cx.op);
                        cx.fs.dirtied(ino, idx);
                        Step::Done(YieldPoint::Store, idx, Ok(self.data.len() as u64))
                    }
                    _ => {
                        self.st = MState::Fault;
                        Step::Yield(YieldPoint::StoreRefault, idx)
                    }
                }
            }
        }
    }
}
