//! Direct write (`pwrite` on an `O_DIRECT` file), as XFS runs an aligned one
//! (`xfs_file_dio_write_aligned` -> `iomap_dio_rw` -> `xfs_dio_write_end_io`, v6.6), with the
//! IO waited for (a synchronous `pwrite`, not AIO):
//!
//! 1. `i_rwsem` shared (`XFS_IOLOCK_SHARED`): direct writes, buffered reads and faults run
//!    beside it; buffered writes, truncate, fallocate, punch and zero range wait.
//! 2. `kiocb_invalidate_pages`: `filemap_write_and_wait_range` over the range (a
//!    WB_SYNC_ALL pass over its folios, then wait for their writeback), then
//!    `invalidate_inode_pages2_range` (each folio over the range leaves the cache; one that
//!    is dirty again cannot, and the write fails with `-ENOTBLK`, on which XFS falls back to
//!    a buffered write: the model returns [`FsError::NotBlock`]).
//! 3. `xfs_direct_write_iomap_begin`: holes and delalloc blocks are allocated UNWRITTEN
//!    (`xfs_iomap_write_direct`), unwritten and written ones mapped as they are.
//! 4. The bios: the data goes to the mapped blocks (the caller waits for them).
//! 5. `iomap_dio_complete`: `->end_io` (`xfs_dio_write_end_io`) converts the UNWRITTEN blocks
//!    it wrote (`xfs_iomap_write_unwritten`, a change of the extent map: every cached
//!    iomap over them is stale now) and moves the size when the write ends past EOF; then
//!    `kiocb_invalidate_post_direct_write` drops what buffered reads cached over the range
//!    meanwhile. [`DioInvalidate::BeforeEndIo`] swaps the two.
//!
//! A direct write that starts past EOF is refused ([`FsError::Invalid`]): XFS takes the lock
//! exclusive then and zeroes the gap from the old EOF (`xfs_file_write_checks`), which the
//! model does not do for direct IO (see docs/fs-core.md, "Not modelled").

use crate::block::{self, Request, BLOCK_SIZE};
use crate::extent::{Extent, ExtentState};
use crate::fs::{AllocMode, DioInvalidate, Fs, FsError};
use crate::ops::check_range;
use crate::step::{Cx, Step, YieldPoint};
use crate::writeback::WbPass;
use crate::TaskId;

const BS: u64 = BLOCK_SIZE as u64;

#[derive(Clone, Debug)]
enum DState {
    Lock,
    /// `filemap_write_and_wait_range`'s write part.
    Flush(WbPass),
    /// ... and its wait for the range's writeback.
    FlushWait,
    Invalidate,
    Map,
    /// The mapped block of each block of the range, and whether it was UNWRITTEN.
    Submit(Vec<(u64, bool)>),
    EndIo(Vec<(u64, bool)>),
    PostInvalidate,
    /// `DioInvalidate::BeforeEndIo`: the invalidation first, ...
    EarlyInvalidate(Vec<(u64, bool)>),
    /// ... then `->end_io`.
    LateEndIo(Vec<(u64, bool)>),
}

/// A synchronous direct write of `data` at `pos` (both block-aligned).
#[derive(Clone, Debug)]
pub struct DioWriteTask {
    ino: usize,
    pos: u64,
    data: Vec<u8>,
    st: DState,
}

impl DioWriteTask {
    pub fn new(ino: usize, pos: u64, data: Vec<u8>) -> Result<Self, FsError> {
        check_range(pos, data.len() as u64, true)?;
        Ok(DioWriteTask {
            ino,
            pos,
            data,
            st: DState::Lock,
        })
    }

    fn end(&self) -> u64 {
        self.pos + self.data.len() as u64
    }

    /// The folios the range touches, `[first, end)` (`first` is the cached folio over the
    /// range's first byte, which may start before it).
    fn folios(&self, fs: &Fs) -> (u64, u64) {
        let fb = fs.folio_bytes();
        (
            fs.folio_of(self.ino, self.pos / BS),
            self.end().div_ceil(fb),
        )
    }

    /// Whether every folio over the range is out of writeback and lockable by `me`.
    fn range_settled(&self, fs: &Fs, me: TaskId) -> bool {
        let (first, end) = self.folios(fs);
        let cache = &fs.inode(self.ino).cache;
        (first..end).all(|idx| {
            cache
                .get(idx)
                .is_none_or(|f| f.lockable_by(me) && !f.writeback)
        })
    }

    pub fn runnable(&self, fs: &Fs, me: TaskId) -> bool {
        match &self.st {
            DState::Lock => fs.inode(self.ino).i_rwsem.can_read(),
            DState::Flush(pass) => pass.runnable(fs, me),
            DState::FlushWait
            | DState::Invalidate
            | DState::PostInvalidate
            | DState::EarlyInvalidate(_) => self.range_settled(fs, me),
            DState::Map | DState::Submit(_) | DState::EndIo(_) | DState::LateEndIo(_) => true,
        }
    }

    fn finish(&self, fs: &mut Fs, label: YieldPoint, r: Result<u64, FsError>) -> Step {
        fs.inode_mut(self.ino).i_rwsem.up_read();
        Step::Done(label, self.pos / BS, r)
    }

    pub fn step(&mut self, cx: &mut Cx<'_>) -> Step {
        let at = self.pos / BS;
        match std::mem::replace(&mut self.st, DState::Map) {
            DState::Lock => {
                cx.fs.inode_mut(self.ino).i_rwsem.down_read();
                if self.pos > cx.fs.inode(self.ino).size {
                    let why = "a direct write starting past EOF (the gap is not modelled)";
                    return self.finish(cx.fs, YieldPoint::DioPastEof, Err(inval(why)));
                }
                let (first, end) = self.folios(cx.fs);
                self.st = DState::Flush(WbPass::range(self.ino, first, end));
                Step::Yield(YieldPoint::DioLock, at)
            }
            DState::Flush(mut pass) => match pass.step(cx) {
                Step::Done(_, _, Ok(_)) => {
                    self.st = DState::FlushWait;
                    Step::Yield(YieldPoint::DioFlush, at)
                }
                Step::Done(_, _, Err(e)) => self.finish(cx.fs, YieldPoint::DioFlushError, Err(e)),
                other => {
                    self.st = DState::Flush(pass);
                    other
                }
            },
            DState::FlushWait => {
                self.st = DState::Invalidate;
                Step::Yield(YieldPoint::DioFlushWait, at)
            }
            DState::Invalidate => {
                if !self.invalidate(cx.fs) {
                    let r = Err(FsError::NotBlock);
                    return self.finish(cx.fs, YieldPoint::DioInvalidateBusy, r);
                }
                Step::Yield(YieldPoint::DioInvalidate, at)
            }
            DState::Map => match self.map(cx.fs) {
                Ok(blocks) => {
                    self.st = DState::Submit(blocks);
                    Step::Yield(YieldPoint::DioIomapBegin, at)
                }
                Err(e) => self.finish(cx.fs, YieldPoint::DioIomapBeginError, Err(e)),
            },
            DState::Submit(blocks) => self.submit(cx, blocks),
            DState::EndIo(blocks) => {
                self.end_io(cx, &blocks);
                self.st = DState::PostInvalidate;
                Step::Yield(YieldPoint::DioEndIo, at)
            }
            DState::PostInvalidate => {
                self.post_invalidate(cx);
                self.done(cx, YieldPoint::DioDone)
            }
            DState::EarlyInvalidate(blocks) => {
                self.post_invalidate(cx);
                self.st = DState::LateEndIo(blocks);
                Step::Yield(YieldPoint::DioPostInvalidate, at)
            }
            DState::LateEndIo(blocks) => {
                self.end_io(cx, &blocks);
                self.done(cx, YieldPoint::DioLateEndIo)
            }
        }
    }

    /// `invalidate_inode_pages2_range` over the range: every folio over it leaves the cache
    /// (its mappings are torn down first). `false`: one is dirty, and stays.
    fn invalidate(&self, fs: &mut Fs) -> bool {
        let (first, end) = self.folios(fs);
        let mut clean = true;
        for idx in first..end {
            match fs.inode(self.ino).cache.get(idx) {
                Some(f) if f.dirty => clean = false,
                Some(_) => fs.remove_folio(self.ino, idx),
                None => {}
            }
        }
        clean
    }

    /// `xfs_direct_write_iomap_begin` over the whole range: holes and delalloc blocks get new
    /// UNWRITTEN blocks (written ones, zeroed, when blocks are allocated at write time).
    fn map(&self, fs: &mut Fs) -> Result<Vec<(u64, bool)>, FsError> {
        let (ino, at_write) = (self.ino, fs.cfg.alloc == AllocMode::AtWrite);
        let mut blocks = Vec::new();
        for b in self.pos / BS..self.end() / BS {
            let e = fs.inode(ino).extents.get(b);
            let e = match e.state {
                ExtentState::Hole | ExtentState::Delalloc => {
                    let addr = fs.alloc_block(ino, b, at_write)?;
                    let state = if at_write {
                        ExtentState::Written
                    } else {
                        ExtentState::Unwritten
                    };
                    let e = Extent { state, addr };
                    fs.inode_mut(ino).extents.set(b, e);
                    e
                }
                ExtentState::Unwritten | ExtentState::Written => e,
            };
            blocks.push((e.addr, e.state == ExtentState::Unwritten));
        }
        Ok(blocks)
    }

    /// The bios: each block's data to its mapped block, waited for. The bytes are in flux
    /// for buffered readers from here to the write's return.
    fn submit(&mut self, cx: &mut Cx<'_>, blocks: Vec<(u64, bool)>) -> Step {
        cx.oracle.dio_begin(self.ino, self.pos, &self.data, cx.op);
        for (i, &(addr, _)) in blocks.iter().enumerate() {
            let data = self.data[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE].to_vec();
            cx.fs.alloc.mark_data_written(addr);
            let req = Request::Write {
                block: addr,
                data: data.into(),
                fua: false,
            };
            if let Err(e) = block::submit_and_complete(cx.fs.dev.as_mut(), req) {
                cx.oracle.dio_end(cx.op);
                return self.finish(cx.fs, YieldPoint::DioSubmitError, Err(e.into()));
            }
        }
        self.st = match cx.fs.cfg.dio_invalidate {
            DioInvalidate::AfterEndIo => DState::EndIo(blocks),
            DioInvalidate::BeforeEndIo => DState::EarlyInvalidate(blocks),
        };
        Step::Yield(YieldPoint::DioSubmit, self.pos / BS)
    }

    /// `xfs_dio_write_end_io`: the blocks that were UNWRITTEN (and still are those blocks)
    /// become WRITTEN, and the size moves when the write ends past EOF (in memory and, by
    /// `xfs_setfilesize`, on disk). The write's bytes are the file's from here.
    fn end_io(&self, cx: &mut Cx<'_>, blocks: &[(u64, bool)]) {
        let ino = self.ino;
        for (b, &(addr, unwritten)) in (self.pos / BS..).zip(blocks) {
            let state = ExtentState::Unwritten;
            if unwritten && cx.fs.inode(ino).extents.get(b) == (Extent { state, addr }) {
                let state = ExtentState::Written;
                cx.fs.inode_mut(ino).extents.set(b, Extent { state, addr });
            }
        }
        cx.oracle.write(ino, self.pos, &self.data, cx.op);
        let end = self.end();
        if end > cx.fs.inode(ino).size {
            cx.fs.inode_mut(ino).size = end;
        }
        if end > cx.fs.inode(ino).disk_size {
            cx.fs.set_disk_size(ino, end);
        }
        cx.fs.touch(ino, true);
    }

    /// `kiocb_invalidate_post_direct_write`: what buffered reads cached over the range while
    /// the write ran leaves the cache. A folio dirty again cannot leave, and the kernel warns
    /// ("Possible data corruption due to collision with buffered I/O!"): a note here.
    fn post_invalidate(&mut self, cx: &mut Cx<'_>) -> bool {
        let clean = self.invalidate(cx.fs);
        if !clean {
            let (op, ino) = (cx.op, self.ino);
            cx.fs.note(|| {
                format!("op{op}: page cache invalidation failure on direct IO to file {ino}")
            });
        }
        clean
    }

    /// The write returns: its bytes are no longer in flux.
    fn done(&self, cx: &mut Cx<'_>, label: YieldPoint) -> Step {
        cx.oracle.dio_end(cx.op);
        let len = self.data.len() as u64;
        self.finish(cx.fs, label, Ok(len))
    }
}

fn inval(why: &str) -> FsError {
    FsError::Invalid(why.into())
}

#[cfg(test)]
mod tests {
    //! The extent map as a direct write leaves it at each step (the scripted tests in
    //! `tests/direct_io.rs` see only bytes, and a zeroed WRITTEN block reads like an
    //! UNWRITTEN one).
    use super::*;
    use crate::block::MemDevice;
    use crate::fs::Config;
    use crate::oracle::Oracle;

    /// Steps a direct write of block 1 over a hole in a file of `size` bytes (`disk_size` on
    /// disk) until `stop`; the file's block 1 then, the steps, and the on-disk size.
    fn block_after(
        stop: YieldPoint,
        size: u64,
        disk_size: u64,
    ) -> (Extent, Vec<(YieldPoint, u64)>, u64) {
        let mut fs = Fs::new(Config::default(), Box::new(MemDevice::new(64)), 1);
        fs.inode_mut(0).size = size;
        fs.set_disk_size(0, disk_size);
        let mut oracle = Oracle::new(1);
        let mut t = DioWriteTask::new(0, BS, vec![b'D'; BLOCK_SIZE]).expect("aligned");
        let mut steps = Vec::new();
        loop {
            assert!(t.runnable(&fs, 7), "blocked alone at {steps:?}");
            let mut cx = Cx {
                fs: &mut fs,
                oracle: &mut oracle,
                me: 7,
                op: 0,
                short_copy: None,
            };
            let (label, arg) = match t.step(&mut cx) {
                Step::Yield(l, a) => (l, a),
                Step::Done(l, a, r) => {
                    assert_eq!(r, Ok(BS));
                    (l, a)
                }
            };
            steps.push((label, arg));
            if label == stop {
                return (fs.inode(0).extents.get(1), steps, fs.inode(0).disk_size);
            }
        }
    }

    /// `xfs_iomap_write_direct` allocates the hole UNWRITTEN; `->end_io` converts it.
    #[test]
    fn a_hole_is_allocated_unwritten_and_converted_at_end_io() {
        let (e, _, _) = block_after(YieldPoint::DioSubmit, 2 * BS, 0);
        assert_eq!(e.state, ExtentState::Unwritten);
        let (e, steps, _) = block_after(YieldPoint::DioDone, 2 * BS, 0);
        assert_eq!(e.state, ExtentState::Written);
        // Every step names the write's first block.
        assert!(steps.iter().all(|&(_, arg)| arg == 1), "{steps:?}");
    }

    /// `xfs_setfilesize` at `->end_io` moves the on-disk size up to the write's end, never
    /// down: a direct write inside the file leaves it.
    #[test]
    fn end_io_moves_the_disk_size_up_only() {
        assert_eq!(block_after(YieldPoint::DioSubmit, BS, 0).2, 0);
        assert_eq!(block_after(YieldPoint::DioDone, BS, 0).2, 2 * BS);
        assert_eq!(block_after(YieldPoint::DioDone, 4 * BS, 4 * BS).2, 4 * BS);
    }
}
