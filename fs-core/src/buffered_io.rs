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
    /// Old punch: truncate the page cache folio by folio from `idx`, then punch
    /// `[start, end)`.
    OldTruncate {
        idx: u64,
        start: u64,
        end: u64,
    },
    OldPunch {
        start: u64,
        end: u64,
    },
    /// Fixed punch: scan folio by folio under the invalidate lock up to `scan_end` (EOF),
    /// then punch everything up to `end`.
    FixedScan {
        idx: u64,
        scan_end: u64,
        end: u64,
        locked: bool,
    },
    Finish,
    /// gfs2: the glock was dropped after a short iomap write; fault in, retake it, go on.
    Gfs2Retake,
}

/// `iomap_file_buffered_write` over `[pos, pos + data.len())` with the inode lock held.
///
/// Short copies follow `iomap_write_iter` (v6.6): an injected short copy of `s` bytes means
/// the user buffer cannot be read from `pos + s` on (unmapped under the writer; for the gfs2
/// preset, not resident while page faults are disabled). A short copy into a folio that is
/// not uptodate is rejected by `write_end` and retried with the length that was copied; the
/// write stops only when `fault_in_iov_iter_readable` cannot fault in a byte, and every
/// readable byte is written first.
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
    /// The user buffer cannot be copied from this file position on.
    unreadable_from: Option<u64>,
    /// `write_end` rejected a short copy: the retry copies this many bytes.
    retry_len: Option<u64>,
    /// Why the write stops: an iteration failed with nothing written under its mapping.
    stop: Option<FsError>,
    /// Where the current `iomap_file_buffered_write` call began (gfs2 calls it again after
    /// retaking the glock).
    call_start: u64,
    /// The folio this iteration got (`__iomap_get_folio`): its index and its bytes
    /// `[lo, hi)` in the file.
    folio: FolioAt,
}

/// Where a folio is: its index and its bytes `[lo, hi)` in the file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct FolioAt {
    idx: u64,
    lo: u64,
    hi: u64,
}

impl FolioAt {
    fn of(fs: &Fs, ino: usize, idx: u64) -> Self {
        FolioAt {
            idx,
            lo: fs.folio_start(idx) * BS,
            hi: fs.folio_end(ino, idx) * BS,
        }
    }

    /// Block `b` of the file as a block of this folio.
    fn block(&self, b: u64) -> u64 {
        b - self.lo / BS
    }
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
            unreadable_from: None,
            retry_len: None,
            stop: None,
            call_start: pos,
            folio: FolioAt::default(),
        }
    }

    fn end(&self) -> u64 {
        self.start + self.data.len() as u64
    }

    /// The folio this iteration got (valid from `__iomap_get_folio` on).
    fn idx(&self) -> u64 {
        self.folio.idx
    }

    /// Bytes this iteration asks a folio for (`bytes` in `iomap_write_iter`, before
    /// `iomap_write_begin` trims it to the folio it got): up to the end of the write and of
    /// the mapping, and of the largest folio's chunk (`chunk - offset`).
    fn want_len(&self, fs: &Fs) -> u64 {
        let map = self.map.expect("mapped");
        let chunk = fs.cfg.largest_folio_blocks() * BS;
        let n = map
            .end()
            .min(self.end())
            .min(self.pos - self.pos % chunk + chunk)
            - self.pos;
        self.retry_len.map_or(n, |r| r.min(n))
    }

    /// Bytes of the current folio this iteration covers (`bytes`, trimmed to the folio).
    fn plen(&self) -> u64 {
        let map = self.map.expect("mapped");
        let n = self.folio.hi.min(map.end()).min(self.end()) - self.pos;
        self.retry_len.map_or(n, |r| r.min(n))
    }

    /// User copy length, when the next step is the copy.
    pub fn at_user_copy(&self) -> Option<u32> {
        (self.st == WState::Copy).then(|| self.plen() as u32)
    }

    /// Whether a write that has not run yet (its first step takes the inode lock) can run:
    /// the same for every such write of `ino`, which [`crate::engine::Engine`] relies on to
    /// ask once per inode instead of once per write.
    pub fn inode_lock_free(fs: &Fs, ino: usize) -> bool {
        let inode = fs.inode(ino);
        inode.i_rwsem.can_write() && (!fs.cfg.gfs2.write_glock || inode.glock.can_write())
    }

    pub fn runnable(&self, fs: &Fs, me: TaskId) -> bool {
        let inode = fs.inode(self.ino);
        match self.st {
            WState::LockInode => Self::inode_lock_free(fs, self.ino),
            // balance_dirty_pages_ratelimited, which iomap_write_iter calls between
            // folios: the write waits while too much of the cache is dirty.
            WState::PreCheck => !fs.over_dirty_limit(),
            WState::GetFolio => {
                fs.folio_lockable_at(self.ino, self.pos / BS, me)
                    && !fs.over_dirty_limit()
                    && !fs.over_cache_limit()
            }
            WState::OldTruncate { idx, .. } => inode
                .cache
                .get(fs.folio_of(self.ino, idx))
                .is_none_or(|f| f.lockable_by(me) && !f.writeback),
            WState::FixedScan {
                idx,
                scan_end,
                locked,
                ..
            } => {
                (locked || inode.invalidate_lock.can_write())
                    && (idx >= scan_end || fs.folio_lockable_at(self.ino, idx, me))
            }
            WState::Gfs2Retake => !fs.cfg.gfs2.write_glock || inode.glock.can_write(),
            _ => true,
        }
    }

    /// After a folio (or a mapping) is done: the next folio, or `iomap_end`. The head of
    /// `iomap_write_iter`'s loop: `fault_in_iov_iter_readable` fails when no byte can be
    /// faulted in (-EFAULT). With bytes written under this mapping the iteration returns
    /// them, and the iterator maps again (the next iteration then fails with nothing
    /// written, and the write stops).
    fn next_folio(&mut self, fs: &Fs) -> WState {
        let map = self.map.expect("mapped");
        if self.pos >= self.end() || self.pos >= map.end() {
            WState::End
        } else if self.unreadable_from.is_some_and(|u| self.pos >= u) {
            if self.pos == self.map_pos {
                self.stop = Some(FsError::Fault);
            }
            WState::End
        } else if fs.cfg.iomap_valid && fs.cfg.validity_check_at == ValidityCheckAt::BeforeFolioLock
        {
            WState::PreCheck
        } else {
            WState::GetFolio
        }
    }

    /// `iomap_write_begin` failed: the iteration returns what it wrote under this mapping,
    /// or the error when it wrote nothing.
    fn fail(&mut self, e: FsError) {
        if self.pos == self.map_pos {
            self.stop = Some(e);
        }
        self.st = WState::End;
    }

    /// First block the short-write punch may remove: xfs (`iomap_file_buffered_write_punch_delalloc`)
    /// rounds down when nothing was written under the mapping and up otherwise; gfs2
    /// (`gfs2_iomap_end`) always rounds up.
    fn punch_start(&self, gfs2: bool) -> u64 {
        if self.pos == self.map_pos && !gfs2 {
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
            WState::OldTruncate { idx, start, end } => self.old_punch_truncate(cx, idx, start, end),
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
            WState::FixedScan {
                idx,
                scan_end,
                end,
                locked,
            } => self.fixed_punch_scan(cx, idx, scan_end, end, locked),
            WState::Finish => self.finish_or_remap(cx),
            WState::Gfs2Retake => self.gfs2_retake(cx),
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
                let len = self.want_len(cx.fs);
                let idx = cx.fs.grab_folio(ino, self.pos / BS, len);
                self.folio = FolioAt::of(cx.fs, ino, idx);
                cx.fs.inode_mut(ino).cache.lock(idx, cx.me);
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

    /// `__iomap_write_begin` (v6.6): the folio is locked; unless it is uptodate, make valid
    /// the blocks the write touches but does not cover. They are taken in runs of blocks that
    /// are not uptodate (`iomap_adjust_read_range`, which also splits a run at the EOF
    /// block); a run the write covers whole is skipped, any other is zeroed where
    /// `iomap_block_needs_zeroing` says so (the mapping is not MAPPED, or is NEW, or the run
    /// starts past EOF) and read from disk otherwise, then marked uptodate.
    fn write_begin_uncovered(&mut self, cx: &mut Cx<'_>) -> Step {
        let idx = self.idx();
        let (from, to) = (self.pos, self.pos + self.plen());
        if !cx
            .fs
            .inode(self.ino)
            .cache
            .get(idx)
            .expect("locked")
            .uptodate()
        {
            for (first, end) in self.uncovered_runs(cx.fs, from, to) {
                if from <= first * BS && to >= end * BS {
                    continue;
                }
                if let Err(e) = self.fill_run(cx, first, end) {
                    // iomap_write_begin's error path: unlock, iomap_write_failed.
                    self.unlock(cx.fs);
                    iomap_write_failed(cx.fs, self.ino, from, to - from);
                    self.fail(e);
                    return Step::Yield(YieldPoint::WriteBeginReadError, idx);
                }
            }
        }
        self.st = WState::Copy;
        Step::Yield(YieldPoint::WriteBegin, idx)
    }

    /// The runs `[first, end)` (file blocks) of blocks that are not uptodate among those
    /// `[from, to)` touches, split after the block holding the last byte below EOF when the
    /// write crosses EOF (`iomap_adjust_read_range`).
    fn uncovered_runs(&self, fs: &Fs, from: u64, to: u64) -> Vec<(u64, u64)> {
        let f = fs.inode(self.ino).cache.get(self.idx()).expect("locked");
        let size = fs.inode(self.ino).size;
        let eof_split = (from <= size && to > size && size > 0).then(|| size.div_ceil(BS));
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for b in from / BS..to.div_ceil(BS) {
            if f.block_uptodate(self.folio.block(b)) {
                continue;
            }
            match runs.last_mut() {
                Some(run) if run.1 == b && eof_split != Some(b) => run.1 = b + 1,
                _ => runs.push((b, b + 1)),
            }
        }
        runs
    }

    /// One run of `__iomap_write_begin`: zero blocks `[first, end)` (the kernel zeroes the
    /// parts outside the write, which the copy then fills), or read the run from disk through
    /// the cached mapping; then the run is uptodate.
    fn fill_run(&self, cx: &mut Cx<'_>, first: u64, end: u64) -> Result<(), FsError> {
        let (ino, idx) = (self.ino, self.idx());
        let map = self.map.expect("mapped");
        let size = cx.fs.inode(ino).size;
        let lo = self.folio.lo;
        self.note_uncovered_fill(cx, &map, first, size);
        let zero = iomap::block_needs_zeroing(&map, first * BS, size);
        let mut blocks = Vec::new();
        if !zero {
            for b in first..end {
                blocks.push(block::read_block_sync(
                    cx.fs.dev.as_mut(),
                    map.addr_of(b * BS),
                )?);
            }
        }
        let f = cx
            .fs
            .inode_mut(ino)
            .cache
            .get_mut(idx)
            .expect("locked folio");
        let (rs, re) = ((first * BS - lo) as usize, (end * BS - lo) as usize);
        if zero {
            // folio_zero_segments zeroes the run outside [from, to) and leaves the write's
            // part as the page held until the copy; the model zeroes that part too, since
            // a recycled buffer may hold another folio's bytes and a short copy must not
            // show them (the kernel's copy fills it or the write fails).
            f.data[rs..re].fill(0);
        } else {
            f.data[rs..re].copy_from_slice(&blocks.concat());
        }
        f.set_uptodate(self.folio.block(first), end - first);
        Ok(())
    }

    /// Notes (for the report, without changing anything) when `__iomap_write_begin` is about
    /// to fill the run starting at file block `b` from a mapping that no longer tells the
    /// truth.
    fn note_uncovered_fill(&self, cx: &mut Cx<'_>, map: &IoMap, b: u64, size: u64) {
        let (ino, idx) = (self.ino, b);
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
    /// `iomap_write_end`: the folio's linearisation point for the oracle. A copy short of a
    /// folio that is not uptodate counts as nothing (`__iomap_write_end`), and the loop
    /// retries with the length that was copied; bytes cut off past EOF are truncated from
    /// the page cache (`iomap_write_failed`).
    fn copy_and_write_end(&mut self, cx: &mut Cx<'_>) -> Step {
        let ino = self.ino;
        let idx = self.idx();
        let poff = (self.pos - self.folio.lo) as usize;
        let plen = self.plen() as usize;
        self.retry_len = None;
        if let Some(s) = cx.short_copy {
            let from = self.pos + u64::from(s);
            self.unreadable_from = Some(self.unreadable_from.map_or(from, |u| u.min(from)));
        }
        let copied = self
            .unreadable_from
            .map_or(plen, |u| u.saturating_sub(self.pos) as usize)
            .min(plen);
        let uptodate = cx.fs.inode(ino).cache.get(idx).expect("locked").uptodate();
        let written = if copied < plen && !uptodate {
            0
        } else {
            copied
        };
        if written > 0 {
            self.commit_copy(cx, poff, written);
        }
        self.unlock(cx.fs);
        if written < plen {
            iomap_write_failed(
                cx.fs,
                ino,
                self.pos + written as u64,
                (plen - written) as u64,
            );
        }
        self.pos += written as u64;
        if written == 0 && copied > 0 {
            self.retry_len = Some(copied as u64);
        }
        self.st = self.next_folio(cx.fs);
        let label = if written < plen {
            YieldPoint::CopyShort
        } else {
            YieldPoint::CopyWriteEnd
        };
        Step::Yield(label, idx)
    }

    /// `__iomap_write_end` accepted `n` bytes at `pos`: they are in the folio, their blocks
    /// uptodate and dirty (`iomap_set_range_uptodate`, `iomap_set_range_dirty`); the size
    /// grows (`i_size_write`).
    fn commit_copy(&mut self, cx: &mut Cx<'_>, poff: usize, n: usize) {
        let (ino, idx) = (self.ino, self.idx());
        let src = (self.pos - self.start) as usize;
        let f = cx.fs.inode_mut(ino).cache.get_mut(idx).expect("locked");
        f.data[poff..poff + n].copy_from_slice(&self.data[src..src + n]);
        let (first, end) = (poff / BLOCK_SIZE, (poff + n).div_ceil(BLOCK_SIZE));
        f.set_uptodate(first as u64, (end - first) as u64);
        f.set_dirty(first as u64, (end - first) as u64);
        cx.oracle
            .write(ino, self.pos, &self.data[src..src + n], cx.op);
        cx.fs.dirtied(ino, idx);
        let inode = cx.fs.inode_mut(ino);
        inode.size = inode.size.max(self.pos + n as u64);
        let size = inode.size;
        if cx.fs.cfg.bugs.size_before_data && size > cx.fs.inode(ino).disk_size {
            // The planted bug: the on-disk size runs ahead of the data.
            cx.fs.set_disk_size(ino, size);
        }
        cx.fs.touch(ino, true);
    }

    /// `iomap_end` (xfs_buffered_write_iomap_end, gfs2_iomap_end): punch the blocks this
    /// call reserved or allocated but did not write, in the old or the fixed form.
    fn iomap_end(&mut self, cx: &mut Cx<'_>) -> Step {
        let map = self.map.expect("mapped");
        let gfs2_punch = cx.fs.cfg.gfs2.short_write_punch && map.kind == IoMapKind::Mapped;
        let punch_start = self.punch_start(gfs2_punch);
        let punch_end = map.end().min(self.end()).div_ceil(BS);
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
                    start: punch_start,
                    end: punch_end,
                },
                // iomap_write_delalloc_release scans the page cache only below EOF.
                PunchMode::Fixed => WState::FixedScan {
                    idx: punch_start,
                    scan_end: punch_end.min(cx.fs.inode(self.ino).size.div_ceil(BS)),
                    end: punch_end,
                    locked: false,
                },
            };
            return Step::Yield(YieldPoint::IomapEnd, self.pos);
        }
        self.st = WState::Finish;
        self.finish_or_remap(cx)
    }

    /// The old punch, first half: `truncate_pagecache_range` over blocks `[start, end)`, one
    /// folio per step (`idx` is the first block of it in the range); it drops a folio the
    /// range covers whatever it holds, and zeroes the part of one it covers in part.
    fn old_punch_truncate(&mut self, cx: &mut Cx<'_>, idx: u64, start: u64, end: u64) -> Step {
        let ino = self.ino;
        let folio = cx.fs.folio_of(ino, idx);
        let next = cx.fs.folio_end(ino, folio);
        if cx.fs.inode(ino).cache.get(folio).is_some_and(|f| f.dirty) {
            let op = cx.op;
            cx.fs.note(|| {
                format!("op{op} short-write punch (old form) dropped dirty folio {folio} of file {ino} from the page cache")
            });
        }
        cx.fs.truncate_folio_range(ino, folio, start * BS, end * BS);
        self.st = if next < end {
            WState::OldTruncate {
                idx: next,
                start,
                end,
            }
        } else {
            WState::OldPunch { start, end }
        };
        Step::Yield(YieldPoint::PunchTruncatePagecache, folio)
    }

    /// The fixed punch (`iomap_write_delalloc_release`, v6.6): under the invalidate lock, one
    /// folio per step below EOF (`idx` is the first block of it in the range), punch the
    /// delalloc under a folio that is not dirty, and under the blocks of a dirty one that
    /// are not dirty (`iomap_write_delalloc_ifs_punch`; a dirty block keeps its
    /// reservation); past EOF, punch it all.
    fn fixed_punch_scan(
        &mut self,
        cx: &mut Cx<'_>,
        idx: u64,
        scan_end: u64,
        end: u64,
        locked: bool,
    ) -> Step {
        let ino = self.ino;
        if !locked {
            cx.fs.inode_mut(ino).invalidate_lock.down_write(cx.me);
        }
        if idx < scan_end {
            let folio = FolioAt::of(cx.fs, ino, cx.fs.folio_of(ino, idx));
            let part_end = (folio.hi / BS).min(scan_end);
            for b in idx..part_end {
                let keep = cx
                    .fs
                    .inode(ino)
                    .cache
                    .get(folio.idx)
                    .is_some_and(|f| f.dirty && f.block_dirty(folio.block(b)));
                if !keep {
                    punch_delalloc(cx.fs, ino, b, b + 1);
                }
            }
            if part_end < scan_end {
                self.st = WState::FixedScan {
                    idx: part_end,
                    scan_end,
                    end,
                    locked: true,
                };
                return Step::Yield(YieldPoint::PunchScan, folio.idx);
            }
        }
        punch_delalloc(cx.fs, ino, scan_end.max(idx), end);
        cx.fs.inode_mut(ino).invalidate_lock.up_write(cx.me);
        self.st = WState::Finish;
        let at = cx.fs.folio_of(ino, idx);
        Step::Yield(YieldPoint::PunchScanDone, at)
    }

    /// Between `iomap_end` and the next `iomap_begin`: continue (remap after STALE, after a
    /// short iteration, or for the next extent) or return what was written (the error when
    /// nothing was). gfs2 retries a write that faulted after making progress.
    fn finish_or_remap(&mut self, cx: &mut Cx<'_>) -> Step {
        if self.stop.is_none() && self.pos < self.end() {
            self.st = WState::Begin;
            return Step::Yield(YieldPoint::IomapEnd, self.pos);
        }
        let faulted = matches!(self.stop, Some(FsError::Fault));
        if faulted && cx.fs.cfg.gfs2.fault_retry && self.pos > self.call_start {
            // gfs2_file_buffered_write: progress was made, so drop the glock (i_rwsem stays
            // held) and fault the rest of the buffer in before retaking it.
            if cx.fs.cfg.gfs2.write_glock {
                cx.fs.inode_mut(self.ino).glock.up_write(cx.me);
            }
            self.st = WState::Gfs2Retake;
            return Step::Yield(YieldPoint::Gfs2GlockDrop, self.pos);
        }
        self.unlock_inode(cx);
        let done = self.pos - self.start;
        let result = match self.stop.take() {
            Some(e) if done == 0 => Err(e),
            _ => Ok(done),
        };
        Step::Done(YieldPoint::WriteDone, self.pos, result)
    }

    /// gfs2: the user pages are faulted in (they are resident now), the glock is retaken
    /// exclusive, and `iomap_file_buffered_write` is called again for the rest.
    fn gfs2_retake(&mut self, cx: &mut Cx<'_>) -> Step {
        self.unreadable_from = None;
        self.stop = None;
        self.call_start = self.pos;
        if cx.fs.cfg.gfs2.write_glock {
            cx.fs.inode_mut(self.ino).glock.down_write(cx.me);
        }
        self.st = WState::Begin;
        Step::Yield(YieldPoint::Gfs2GlockRetake, self.pos)
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
        fs.inode_mut(self.ino).cache.unlock(self.idx());
    }
}

/// `iomap_write_failed`: a write that failed or copied short of `[pos, pos + len)` truncates
/// what it instantiated past EOF (`truncate_pagecache_range(max(pos, i_size), pos + len - 1)`):
/// folios wholly in that range leave the cache, the part of a folio in it is zeroed.
fn iomap_write_failed(fs: &mut Fs, ino: usize, pos: u64, len: u64) {
    let size = fs.inode(ino).size;
    let (from, to) = (pos.max(size), pos + len);
    if from >= to {
        return;
    }
    for idx in fs.cached_folios_over(ino, from / BS, to.div_ceil(BS)) {
        let (lo, hi) = (fs.folio_start(idx) * BS, fs.folio_end(ino, idx) * BS);
        let Some(f) = fs.inode_mut(ino).cache.get_mut(idx) else {
            continue;
        };
        if from <= lo && to >= hi && (f.writeback || f.locked().is_some()) {
            f.data.fill(0);
        } else {
            fs.truncate_folio_range(ino, idx, from, to);
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
            RState::Folio => {
                fs.folio_lockable_at(self.ino, self.pos / BS, me) && !fs.over_cache_limit()
            }
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
                let idx = cx.fs.grab_folio(ino, self.pos / BS, self.end - self.pos);
                let folio = FolioAt::of(cx.fs, ino, idx);
                if !cx.fs.get_folio(ino, idx).uptodate() {
                    if let Err(e) = cx.fs.read_folio(ino, idx) {
                        cx.fs.inode_mut(ino).i_rwsem.up_read();
                        return Step::Done(YieldPoint::ReadError, idx, Err(e));
                    }
                }
                let n = folio.hi.min(self.end) - self.pos;
                let off = (self.pos - folio.lo) as usize;
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

/// `iomap_page_mkwrite` with folio `idx` locked: `iomap_begin` over the folio up to EOF
/// (`folio_mkwrite_check_truncate`), reserving delalloc over holes (allocating, at write
/// time), one mapping at a time.
fn mkwrite_map(fs: &mut Fs, ino: usize, idx: u64) -> Result<(), FsError> {
    let folio = FolioAt::of(fs, ino, idx);
    let end = folio.hi.min(fs.inode(ino).size.div_ceil(BS) * BS);
    let mut pos = folio.lo;
    while pos < end {
        let map = iomap::iomap_begin_write(fs, ino, pos, end - pos)?;
        pos = map.end().min(end);
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MState {
    Fault,
    Mkwrite,
    Store,
}

/// A store through a shared mapping to `[pos, pos + data.len())`, inside one block (so inside
/// one folio): read fault, `page_mkwrite` (reserve/allocate the folio's blocks below EOF,
/// dirty every block, map writable), then the store, which lands only while the folio is
/// still mapped writable and otherwise faults again.
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
                "an mmap store must be non-empty and inside one block".into(),
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

    fn idx(&self, fs: &Fs) -> u64 {
        fs.folio_of(self.ino, self.pos / BS)
    }

    fn beyond_eof(&self, fs: &Fs) -> bool {
        self.pos + self.data.len() as u64 > fs.inode(self.ino).size
    }

    pub fn runnable(&self, fs: &Fs, me: TaskId) -> bool {
        let inode = fs.inode(self.ino);
        match self.st {
            MState::Fault => {
                inode.invalidate_lock.can_read()
                    && fs.folio_lockable_at(self.ino, self.pos / BS, me)
                    && (!fs.cfg.gfs2.fault_glock || inode.glock.can_read())
            }
            MState::Mkwrite => {
                inode.invalidate_lock.can_read()
                    && fs.folio_lockable_at(self.ino, self.pos / BS, me)
                    && (!fs.cfg.mkwrite_takes_inode_lock || inode.i_rwsem.can_read())
                    && (!fs.cfg.gfs2.mkwrite_glock || inode.glock.can_write())
            }
            MState::Store => true,
        }
    }

    pub fn step(&mut self, cx: &mut Cx<'_>) -> Step {
        let ino = self.ino;
        let idx = self.idx(cx.fs);
        match self.st {
            MState::Fault => {
                if self.beyond_eof(cx.fs) {
                    return Step::Done(YieldPoint::FaultSigbus, idx, Err(FsError::SigBus));
                }
                if !cx.fs.get_folio(ino, idx).uptodate() {
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
                if let Err(e) = mkwrite_map(cx.fs, ino, idx) {
                    return Step::Done(YieldPoint::PageMkwriteError, idx, Err(e));
                }
                let f = cx.fs.inode_mut(ino).cache.get_mut(idx).expect("present");
                f.set_dirty(0, f.blocks());
                f.mapped_writable = true;
                cx.fs.dirtied(ino, idx);
                self.st = MState::Store;
                Step::Yield(YieldPoint::PageMkwrite, idx)
            }
            MState::Store => {
                let eof = self.beyond_eof(cx.fs);
                let lo = cx.fs.folio_start(idx) * BS;
                match cx.fs.inode_mut(ino).cache.get_mut(idx) {
                    Some(f) if f.mapped_writable && !eof => {
                        let off = (self.pos - lo) as usize;
                        f.data[off..off + self.data.len()].copy_from_slice(&self.data);
                        f.set_dirty((off / BLOCK_SIZE) as u64, 1);
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

#[cfg(test)]
mod tests {
    //! The write iterator's short-copy and punch paths, driven step by step so that the page
    //! cache and the extent map can be looked at after the write.
    use super::*;
    use crate::block::MemDevice;
    use crate::fs::Config;
    use crate::oracle::Oracle;

    const ME: TaskId = 10;

    /// Runs one write to the end, injecting `shorts` (in order) at its user copies; returns
    /// the result and the labels of its steps.
    fn run_write(
        fs: &mut Fs,
        pos: u64,
        len: usize,
        mut shorts: Vec<u32>,
    ) -> (Result<u64, FsError>, Vec<YieldPoint>) {
        let mut oracle = Oracle::new(fs.inodes.len());
        let mut w = WriteTask::new(0, pos, vec![b'W'; len]);
        let mut labels = Vec::new();
        loop {
            assert!(w.runnable(fs, ME), "{:?} blocked alone", w.st);
            let short = w
                .at_user_copy()
                .and_then(|_| (!shorts.is_empty()).then(|| shorts.remove(0)));
            let mut cx = Cx {
                fs,
                oracle: &mut oracle,
                me: ME,
                op: 0,
                short_copy: short,
            };
            match w.step(&mut cx) {
                Step::Yield(l, _) => labels.push(l),
                Step::Done(l, _, r) => {
                    labels.push(l);
                    return (r, labels);
                }
            }
            assert!(labels.len() < 1000, "the write does not end: {labels:?}");
        }
    }

    fn fs() -> Fs {
        fs_with(Config::default())
    }

    /// One file on a 64-block memory device.
    fn fs_with(cfg: Config) -> Fs {
        Fs::new(cfg, Box::new(MemDevice::new(64)), 1)
    }

    /// Runs `w` to its end (no injection); its result and the labels of the steps taken.
    fn finish_write(fs: &mut Fs, w: &mut WriteTask) -> (Result<u64, FsError>, Vec<YieldPoint>) {
        let mut oracle = Oracle::new(fs.inodes.len());
        let mut labels = Vec::new();
        for _ in 0..1000 {
            let mut cx = Cx {
                fs,
                oracle: &mut oracle,
                me: ME,
                op: 0,
                short_copy: None,
            };
            match w.step(&mut cx) {
                Step::Yield(l, _) => labels.push(l),
                Step::Done(l, _, r) => {
                    labels.push(l);
                    return (r, labels);
                }
            }
        }
        panic!("the write does not end: {labels:?}");
    }

    /// Steps `w` (with `shorts` injected at its copies) until `stop` holds of its state.
    fn step_until(fs: &mut Fs, w: &mut WriteTask, mut shorts: Vec<u32>, stop: fn(WState) -> bool) {
        let mut oracle = Oracle::new(fs.inodes.len());
        for _ in 0..1000 {
            if stop(w.st) {
                return;
            }
            let short = w
                .at_user_copy()
                .and_then(|_| (!shorts.is_empty()).then(|| shorts.remove(0)));
            let mut cx = Cx {
                fs,
                oracle: &mut oracle,
                me: ME,
                op: 0,
                short_copy: short,
            };
            assert!(matches!(w.step(&mut cx), Step::Yield(..)), "ended first");
        }
        panic!("never reached the state");
    }

    /// `iomap_write_failed`: a write past EOF that copies nothing takes out of the page cache
    /// what it instantiated there (`truncate_pagecache_range(max(pos, i_size), pos + len - 1)`):
    /// a folio wholly in that range goes, one partly in it stays (zeroed there). The fixed
    /// punch leaves the page cache past EOF alone, so nothing else removes them.
    #[test]
    fn a_write_past_eof_that_copies_nothing_leaves_no_folio_behind() {
        let cfg = Config {
            punch: PunchMode::Fixed,
            ..Config::default()
        };
        let mut fs = fs_with(cfg);
        fs.inode_mut(0).size = 10;
        let (r, _) = run_write(&mut fs, BS, BLOCK_SIZE, vec![0]);
        assert_eq!(r, Err(FsError::Fault));
        assert!(
            fs.inode(0).cache.get(1).is_none(),
            "folio 1 left in the cache"
        );
        let f = fs.get_folio(0, 0);
        f.data[..10].fill(b'x');
        f.set_uptodate(0, 1);
        let (r, _) = run_write(&mut fs, 100, 50, vec![0]);
        assert_eq!(r, Err(FsError::Fault));
        let f = fs.inode(0).cache.get(0).expect("folio 0 stays");
        assert!(f.data[..10].iter().all(|&b| b == b'x'));
        assert!(f.data[10..].iter().all(|&b| b == 0));
        assert_eq!(fs.inode(0).size, 10);
    }

    /// `iomap_adjust_read_range` as `uncovered_runs` mirrors it, in a 4-block folio: the
    /// blocks a write touches that are not uptodate go in runs of neighbours; an uptodate
    /// block splits a run; a write crossing EOF splits its run after the block holding EOF
    /// (the blocks after it are zeroed, never read, whatever the mapping says).
    #[test]
    fn uncovered_runs_split_at_an_uptodate_block_and_after_eof() {
        let cfg = Config {
            folio_blocks: 4,
            ..Config::default()
        };
        let mut fs = fs_with(cfg);
        let mut w = WriteTask::new(0, 100, vec![b'W'; 2 * BLOCK_SIZE]);
        let (from, to) = (100, 2 * BS + 100);
        fs.get_folio(0, 0);
        w.folio = FolioAt::of(&fs, 0, 0);
        fs.inode_mut(0).size = 4 * BS;
        assert_eq!(w.uncovered_runs(&fs, from, to), [(0, 3)]);
        fs.inode_mut(0).size = BS + 10;
        assert_eq!(w.uncovered_runs(&fs, from, to), [(0, 2), (2, 3)]);
        fs.inode_mut(0).size = to;
        assert_eq!(w.uncovered_runs(&fs, from, to), [(0, 3)], "ends at EOF");
        fs.inode_mut(0).size = 0;
        assert_eq!(w.uncovered_runs(&fs, from, to), [(0, 3)], "all past EOF");
        fs.inode_mut(0).size = 4 * BS;
        fs.get_folio(0, 0).set_uptodate(1, 1);
        assert_eq!(w.uncovered_runs(&fs, from, to), [(0, 1), (2, 3)]);
    }

    /// The short-write punch waits for each folio it drops (old form: unlocked and not under
    /// writeback, as `truncate_pagecache_range` does) or scans (fixed form: unlocked, under
    /// the invalidate lock).
    #[test]
    fn punches_wait_for_the_folios_they_drop_or_scan() {
        for punch in [PunchMode::Old, PunchMode::Fixed] {
            let cfg = Config {
                punch,
                ..Config::default()
            };
            let mut fs = fs_with(cfg);
            fs.inode_mut(0).size = 3 * BS;
            let mut w = WriteTask::new(0, 0, vec![b'W'; 3 * BLOCK_SIZE]);
            let punching = |st| matches!(st, WState::OldTruncate { .. } | WState::FixedScan { .. });
            step_until(&mut fs, &mut w, vec![BLOCK_SIZE as u32], punching);
            assert!(w.runnable(&fs, ME), "{punch:?}");
            fs.get_folio(0, 1);
            fs.inode_mut(0).cache.lock(1, ME + 1);
            assert!(!w.runnable(&fs, ME), "{punch:?}: folio 1 is locked");
            fs.inode_mut(0).cache.unlock(1);
            if punch == PunchMode::Old {
                fs.get_folio(0, 1).writeback = true;
                assert!(!w.runnable(&fs, ME), "folio 1 is under writeback");
                fs.get_folio(0, 1).writeback = false;
            } else {
                fs.inode_mut(0).invalidate_lock.down_write(ME + 1);
                assert!(!w.runnable(&fs, ME), "the invalidate lock is taken");
                fs.inode_mut(0).invalidate_lock.up_write(ME + 1);
            }
            assert!(w.runnable(&fs, ME), "{punch:?}");
        }
    }

    fn count(labels: &[YieldPoint], l: YieldPoint) -> usize {
        labels.iter().filter(|&&x| x == l).count()
    }

    /// `iomap_write_iter`: a copy short of a folio that is not uptodate is rejected by
    /// `__iomap_write_end`, and the loop retries with `bytes = copied`: `__iomap_write_begin`
    /// now zeroes the rest of the folio, the bytes that could be read are written, and only
    /// then does the fault-in of the rest fail. The old model stopped at the rejection and
    /// wrote nothing.
    #[test]
    fn rejected_short_copy_is_retried_with_what_was_copied() {
        let mut fs = fs();
        let (r, labels) = run_write(&mut fs, 0, 2 * BLOCK_SIZE, vec![100]);
        assert_eq!(r, Ok(100), "{labels:?}");
        assert_eq!(count(&labels, YieldPoint::GetFolio), 2, "{labels:?}");
        let inode = fs.inode(0);
        assert_eq!(inode.size, 100);
        let f = inode.cache.get(0).expect("folio 0 stays");
        assert!(f.uptodate() && f.dirty);
        assert!(f.data[..100].iter().all(|&b| b == b'W'));
        assert!(f.data[100..].iter().all(|&b| b == 0));
        assert_eq!(inode.extents.get(0).state, ExtentState::Delalloc);
        assert_eq!(inode.extents.get(1).state, ExtentState::Hole, "punched");
        assert!(inode.cache.get(1).is_none());
    }

    /// A fault at the first byte: nothing is written, `iomap_write_failed` drops the folio
    /// the write instantiated past EOF, the reservation is punched, and the write fails with
    /// EFAULT.
    #[test]
    fn nothing_copied_past_eof_leaves_no_folio_and_no_reservation() {
        let mut fs = fs();
        let (r, labels) = run_write(&mut fs, 0, BLOCK_SIZE, vec![0]);
        assert_eq!(r, Err(FsError::Fault), "{labels:?}");
        let inode = fs.inode(0);
        assert_eq!(inode.size, 0);
        assert!(inode.cache.is_empty(), "the folio past EOF is truncated");
        assert_eq!(inode.extents.get(0).state, ExtentState::Hole);
    }

    /// With bytes written under the mapping, the iteration returns them; the iterator calls
    /// `iomap_end` (which punches what was not reached), maps again, and the next iteration's
    /// fault-in fails with nothing written: a second `iomap_begin`/`iomap_end` pair.
    #[test]
    fn a_fault_after_progress_maps_again_before_the_write_stops() {
        let mut fs = fs();
        let (r, labels) = run_write(&mut fs, 0, 3 * BLOCK_SIZE, vec![BLOCK_SIZE as u32]);
        assert_eq!(r, Ok(BS), "{labels:?}");
        assert_eq!(count(&labels, YieldPoint::IomapBegin), 2, "{labels:?}");
        let inode = fs.inode(0);
        assert_eq!(inode.extents.get(0).state, ExtentState::Delalloc);
        for b in 1..3 {
            assert_eq!(inode.extents.get(b).state, ExtentState::Hole);
        }
    }

    /// `iomap_write_delalloc_release` scans the page cache only below EOF and punches the
    /// rest without looking: a short append scans no folio.
    #[test]
    fn fixed_punch_scans_only_below_eof() {
        let mut fs = fs();
        let (r, labels) = run_write(&mut fs, 0, 4 * BLOCK_SIZE, vec![10]);
        assert_eq!(r, Ok(10));
        assert_eq!(count(&labels, YieldPoint::PunchScan), 0, "{labels:?}");
        assert_eq!(count(&labels, YieldPoint::PunchScanDone), 1, "{labels:?}");
        for b in 1..4 {
            assert_eq!(fs.inode(0).extents.get(b).state, ExtentState::Hole);
        }
    }

    /// Inside the file the scan goes folio by folio, and a dirty folio keeps its
    /// reservation.
    #[test]
    fn fixed_punch_below_eof_keeps_dirty_folios() {
        let mut fs = fs();
        let (r, _) = run_write(&mut fs, 0, 4 * BLOCK_SIZE, vec![]);
        assert_eq!(r, Ok(4 * BS));
        fs.punch_blocks(0, 1, 4);
        for i in 1..4 {
            fs.remove_folio(0, i);
        }
        fs.get_folio(0, 2).set_dirty(0, 1);
        let (r, labels) = run_write(&mut fs, 0, 4 * BLOCK_SIZE, vec![BLOCK_SIZE as u32]);
        assert_eq!(r, Ok(BS), "{labels:?}");
        assert_eq!(count(&labels, YieldPoint::PunchScan), 2, "{labels:?}");
        let ext = |b| fs.inode(0).extents.get(b).state;
        assert_eq!(
            [ext(1), ext(2), ext(3)],
            [ExtentState::Hole, ExtentState::Delalloc, ExtentState::Hole]
        );
    }

    /// A write past the largest file fails before it takes anything (the engine and the
    /// workload check refuse it earlier; the task checks again).
    #[test]
    fn a_write_past_the_largest_file_is_efbig() {
        let mut fs = fs();
        let (r, labels) = run_write(&mut fs, FILE_BYTES_MAX - 1, 2, vec![]);
        assert_eq!(r, Err(FsError::FileTooBig));
        assert_eq!(labels, vec![YieldPoint::WriteEfbig]);
        let (r, _) = run_write(&mut fs, FILE_BYTES_MAX - 2, 2, vec![]);
        assert_eq!(r, Ok(2), "a write ending at the limit is fine");
    }

    /// Allocating at write time, the device fills up part-way: the write returns what it
    /// wrote from its own start (not from 0), and the next `iomap_begin`'s ENOSPC is not
    /// reported.
    #[test]
    fn running_out_of_space_part_way_returns_the_bytes_written() {
        let cfg = Config {
            alloc: crate::fs::AllocMode::AtWrite,
            ..Config::default()
        };
        let mut fs = fs_with(cfg);
        while fs.alloc.free_blocks() > 2 {
            let b = 100 + fs.alloc.free_blocks();
            fs.alloc_block(0, b, false).unwrap();
        }
        let (r, labels) = run_write(&mut fs, 100, 4 * BLOCK_SIZE, vec![]);
        assert_eq!(r, Ok(2 * BS - 100), "{labels:?}");
        assert_eq!(labels.last(), Some(&YieldPoint::IomapBeginError));
        let (r, _) = run_write(&mut fs, 3 * BS, 10, vec![]);
        assert_eq!(r, Err(FsError::NoSpace), "nothing written: the error");
    }

    /// With `->iomap_valid` off, a mapping that went stale between `iomap_begin` and the folio
    /// lock is used as it is, wherever the check would have been.
    #[test]
    fn with_the_check_off_a_stale_mapping_is_not_remapped() {
        for at in [ValidityCheckAt::InGetFolio, ValidityCheckAt::AfterFolioLock] {
            for check in [false, true] {
                let cfg = Config {
                    iomap_valid: check,
                    validity_check_at: at,
                    ..Config::default()
                };
                let mut fs = fs_with(cfg);
                let mut w = WriteTask::new(0, 0, vec![b'W'; 100]);
                step_until(&mut fs, &mut w, vec![], |st| st == WState::GetFolio);
                // Something else changes the extent map (a block elsewhere in the file).
                fs.inode_mut(0).extents.set(9, Extent::DELALLOC);
                let (r, labels) = finish_write(&mut fs, &mut w);
                assert_eq!(r, Ok(100));
                let begins = labels
                    .iter()
                    .filter(|&&l| l == YieldPoint::IomapBegin)
                    .count();
                assert_eq!(
                    begins,
                    usize::from(check),
                    "{at:?} check {check}: {labels:?}"
                );
            }
        }
    }

    /// A copy short of a folio that is not uptodate, over data on disk: the rejected copy
    /// leaves the folio as it was (not uptodate), so the retry's `__iomap_write_begin` reads
    /// the rest of the block from disk; the old bytes beyond the copied ones stay.
    #[test]
    fn a_rejected_copy_over_written_data_reads_the_rest_from_disk() {
        let mut fs = fs();
        let (r, _) = run_write(&mut fs, 0, BLOCK_SIZE, vec![]);
        assert_eq!(r, Ok(BS));
        // Make it WRITTEN on disk with 'O' and drop the cache.
        let addr = fs.alloc_block(0, 0, false).unwrap();
        fs.inode_mut(0).extents.set(
            0,
            Extent {
                state: ExtentState::Written,
                addr,
            },
        );
        let req = crate::block::Request::Write {
            block: addr,
            data: vec![b'O'; BLOCK_SIZE].into(),
            fua: false,
        };
        block::submit_and_complete(fs.dev.as_mut(), req).unwrap();
        fs.remove_folio(0, 0);
        let (r, labels) = run_write(&mut fs, 0, BLOCK_SIZE, vec![100]);
        assert_eq!(r, Ok(100), "{labels:?}");
        let f = fs.inode(0).cache.get(0).expect("cached");
        assert!(f.data[..100].iter().all(|&b| b == b'W'));
        assert!(
            f.data[100..].iter().all(|&b| b == b'O'),
            "the rest was read"
        );
    }

    /// The old punch drops the page cache of exactly the blocks it punches: a dirty folio
    /// just past them stays, after a short write and after a write that wrote everything.
    #[test]
    fn the_old_punch_drops_only_its_range() {
        let cfg = Config {
            punch: PunchMode::Old,
            ..Config::default()
        };
        for (len, shorts, next) in [(2, vec![BLOCK_SIZE as u32], 2u64), (1, vec![], 1)] {
            let mut fs = fs_with(cfg.clone());
            let (r, _) = run_write(&mut fs, next * BS, BLOCK_SIZE, vec![]);
            assert_eq!(r, Ok(BS));
            let (r, labels) = run_write(&mut fs, 0, len * BLOCK_SIZE, shorts);
            assert_eq!(r, Ok(BS), "{labels:?}");
            let f = fs
                .inode(0)
                .cache
                .get(next)
                .expect("the folio past the punch stays");
            assert!(f.dirty && f.data.iter().all(|&b| b == b'W'));
        }
    }

    /// The planted bug `size_before_data`: the on-disk size follows the in-memory size at
    /// the copy, before the data is written back (without it, only IO completion moves it).
    #[test]
    fn the_size_before_data_bug_moves_the_disk_size_at_the_copy() {
        for bug in [false, true] {
            let mut cfg = Config::default();
            cfg.bugs.size_before_data = bug;
            let mut fs = fs_with(cfg);
            run_write(&mut fs, 0, 100, vec![]).0.unwrap();
            run_write(&mut fs, 0, 200, vec![]).0.unwrap();
            let want = if bug { 200 } else { 0 };
            assert_eq!(fs.inode(0).disk_size, want, "bug {bug}");
        }
    }

    /// A read returns how many bytes it copied out (up to EOF), folio by folio.
    #[test]
    fn a_read_returns_the_bytes_it_copied() {
        let mut fs = fs();
        run_write(&mut fs, 0, 2 * BLOCK_SIZE + 100, vec![])
            .0
            .unwrap();
        let mut oracle = Oracle::new(1);
        oracle.write(0, 0, &vec![b'W'; 2 * BLOCK_SIZE + 100], 0);
        let mut r = ReadTask::collecting(0, 10, 3 * BS);
        let result = loop {
            let mut cx = Cx {
                fs: &mut fs,
                oracle: &mut oracle,
                me: ME,
                op: 1,
                short_copy: None,
            };
            if let Step::Done(_, _, res) = r.step(&mut cx) {
                break res;
            }
        };
        assert_eq!(result, Ok(2 * BS + 90));
        assert_eq!(r.take_data().unwrap().len() as u64, 2 * BS + 90);
    }

    /// A fault's folio truncated and made again before `page_mkwrite`: the reference the
    /// fault took was on the old folio, so `page_mkwrite` faults again (and leaves the new
    /// folio's references alone).
    #[test]
    fn mkwrite_refaults_when_its_folio_was_replaced() {
        let mut fs = fs();
        run_write(&mut fs, 0, BLOCK_SIZE, vec![]).0.unwrap();
        let mut oracle = Oracle::new(1);
        let mut m = MmapStoreTask::new(0, 10, vec![b'M'; 5]).unwrap();
        let mut step = |fs: &mut Fs, m: &mut MmapStoreTask| {
            let mut cx = Cx {
                fs,
                oracle: &mut oracle,
                me: ME,
                op: 1,
                short_copy: None,
            };
            match m.step(&mut cx) {
                Step::Yield(l, _) | Step::Done(l, _, _) => l,
            }
        };
        assert_eq!(step(&mut fs, &mut m), YieldPoint::FaultRead);
        fs.remove_folio(0, 0);
        fs.get_folio(0, 0).set_all_uptodate();
        assert_eq!(step(&mut fs, &mut m), YieldPoint::PageMkwriteRefault);
        assert_eq!(fs.inode(0).cache.get(0).unwrap().pins, 0);
    }
}
