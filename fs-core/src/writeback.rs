//! Writeback (`iomap_writepages` with XFS's `map_blocks` and its cached mapping), IO
//! completion (data on disk, then UNWRITTEN -> WRITTEN, then end of writeback), and reclaim.

use crate::alloc::Owner;
use crate::block::{Request, BLOCK_SIZE};
use crate::extent::{Extent, ExtentState, FILE_BLOCKS_MAX};
use crate::fs::{Fs, FsError, IoEnd, Violation};
use crate::iomap::{IoMap, IoMapKind};
use crate::step::{Cx, Step, YieldPoint};
use crate::TaskId;

const BS: u64 = BLOCK_SIZE as u64;

/// Writeback's context: the cached mapping (its `validity_cookie` is the seq it was made at).
#[derive(Clone, Debug, Default)]
pub struct WritepageCtx {
    pub map: Option<IoMap>,
}

/// `xfs_map_blocks`: reuse the cached mapping if it covers `fblock` (and, with the seq check
/// on, the inode's seq has not moved); else look the block up, converting DELALLOC to
/// UNWRITTEN by allocating the whole delalloc run from `fblock` on.
pub fn map_blocks(
    fs: &mut Fs,
    wpc: &mut WritepageCtx,
    ino: usize,
    fblock: u64,
) -> Result<IoMap, FsError> {
    if let Some(m) = wpc.map {
        let fresh = !fs.cfg.wb_seq_check || m.validity_cookie == fs.inode(ino).extents.seq();
        if m.covers(fblock * BS) && fresh {
            if let Some(why) = crate::iomap::stale_view(fs, ino, &m, fblock) {
                fs.note(|| format!("writeback map_blocks reused a stale mapping for folio {fblock} of file {ino}: {why}"));
            }
            return Ok(m);
        }
    }
    let max = FILE_BLOCKS_MAX - fblock;
    let mut run = fs.inode(ino).extents.run_at(fblock, max);
    if run.state == ExtentState::Delalloc {
        for b in run.start..run.start + run.len {
            let addr = fs.alloc_block(ino, b, false)?;
            fs.inode_mut(ino).extents.set(
                b,
                Extent {
                    state: ExtentState::Unwritten,
                    addr,
                },
            );
        }
        run = fs.inode(ino).extents.run_at(fblock, max);
    }
    let map = IoMap::from_run(run, fs.inode(ino).extents.seq());
    wpc.map = Some(map);
    Ok(map)
}

#[derive(Clone, Debug)]
struct Bio {
    idx: u64,
    addr: u64,
    unwritten: bool,
    /// End of the file's data in the folio when it was written back (EOF then): past it the
    /// IO carries zeros.
    end: u64,
}

/// One `writepages` call over an inode: folio by folio in index order. A step locks the next
/// dirty folio, clears its dirty bit, maps it, starts writeback and unlocks it; the next step
/// submits the IO.
#[derive(Clone, Debug)]
pub struct WbPass {
    pub ino: usize,
    /// WB_SYNC_ALL (fsync) waits for folios already under writeback; WB_SYNC_NONE skips them.
    sync_all: bool,
    cursor: u64,
    wpc: WritepageCtx,
    bio: Option<Bio>,
}

impl WbPass {
    pub fn new(ino: usize, sync_all: bool) -> Self {
        WbPass {
            ino,
            sync_all,
            cursor: 0,
            wpc: WritepageCtx::default(),
            bio: None,
        }
    }

    fn next_dirty(&self, fs: &Fs) -> Option<u64> {
        let sync_all = self.sync_all;
        fs.inode(self.ino)
            .cache
            .next_where(self.cursor, |f| f.dirty && (sync_all || !f.writeback))
    }

    pub fn runnable(&self, fs: &Fs, me: TaskId) -> bool {
        if self.bio.is_some() {
            return true;
        }
        match self.next_dirty(fs) {
            None => true,
            Some(idx) => {
                let f = fs.inode(self.ino).cache.get(idx).expect("found");
                f.lockable_by(me) && !f.writeback
            }
        }
    }

    /// Returns Done when the pass has no more dirty folios to write.
    pub fn step(&mut self, cx: &mut Cx<'_>) -> Step {
        let ino = self.ino;
        if let Some(bio) = self.bio.take() {
            return self.submit(cx.fs, bio);
        }
        let Some(idx) = self.next_dirty(cx.fs) else {
            return Step::Done(YieldPoint::WbPassEnd, self.cursor, Ok(0));
        };
        self.cursor = idx + 1;
        let size = cx.fs.inode(ino).size;
        let f = cx.fs.inode_mut(ino).cache.get_mut(idx).expect("found");
        // folio_clear_dirty_for_io, which also write-protects the mapping (folio_mkclean).
        f.dirty = false;
        f.mapped_writable = false;
        if idx * BS >= size {
            return Step::Yield(YieldPoint::WbBeyondEof, idx);
        }
        // iomap_writepage_handle_eof: zero the part of the EOF folio past EOF.
        if (idx + 1) * BS > size {
            f.data[(size - idx * BS) as usize..].fill(0);
        }
        let map = match map_blocks(cx.fs, &mut self.wpc, ino, idx) {
            Ok(m) => m,
            Err(e) => {
                // A writeback error: drop the delalloc reservation, lose the data (as XFS does).
                if cx.fs.inode(ino).extents.get(idx).state == ExtentState::Delalloc {
                    cx.fs.inode_mut(ino).extents.set(idx, Extent::HOLE);
                }
                return Step::Done(YieldPoint::WbMapBlocksError, idx, Err(e));
            }
        };
        match map.kind {
            IoMapKind::Hole => {
                // Nothing to write to: the block is skipped and the data dropped.
                cx.fs
                    .violations
                    .push(Violation::DirtyFolioOverHole { ino, fblock: idx });
                Step::Yield(YieldPoint::WbHole, idx)
            }
            IoMapKind::Delalloc => unreachable!("map_blocks converts delalloc"),
            IoMapKind::Mapped | IoMapKind::Unwritten => {
                let f = cx.fs.inode_mut(ino).cache.get_mut(idx).expect("found");
                f.writeback = true;
                self.bio = Some(Bio {
                    idx,
                    addr: map.addr_of(idx * BS),
                    unwritten: map.kind == IoMapKind::Unwritten,
                    end: ((idx + 1) * BS).min(size),
                });
                Step::Yield(YieldPoint::WbMapBlocks, idx)
            }
        }
    }

    fn submit(&mut self, fs: &mut Fs, bio: Bio) -> Step {
        let ino = self.ino;
        let owner = fs.alloc.owner(bio.addr);
        if owner
            != Some(Owner {
                ino,
                fblock: bio.idx,
            })
        {
            fs.violations.push(Violation::WriteToForeignBlock {
                ino,
                fblock: bio.idx,
                addr: bio.addr,
                freed: fs.alloc.is_freed(bio.addr),
                owner: owner.map(|o| (o.ino, o.fblock)),
            });
        }
        let data = fs
            .inode(ino)
            .cache
            .get(bio.idx)
            .expect("under writeback")
            .data
            .clone();
        fs.alloc.mark_data_written(bio.addr);
        let mut unwritten = bio.unwritten;
        if unwritten && fs.cfg.bugs.convert_before_data {
            // The planted bug: the block is WRITTEN before its data is on the device.
            let written = Extent {
                state: ExtentState::Written,
                addr: bio.addr,
            };
            fs.inode_mut(ino).extents.set(bio.idx, written);
            unwritten = false;
        }
        match fs.dev.submit(Request::Write {
            block: bio.addr,
            data,
            fua: false,
        }) {
            Ok(req) => {
                fs.ioends.push_back(IoEnd {
                    req,
                    ino,
                    fblock: bio.idx,
                    addr: bio.addr,
                    unwritten,
                    end: bio.end,
                    stage: 0,
                });
                Step::Yield(YieldPoint::WbSubmit, bio.idx)
            }
            Err(e) => {
                if let Some(f) = fs.inode_mut(ino).cache.get_mut(bio.idx) {
                    f.writeback = false;
                    f.dirty = true;
                }
                Step::Done(YieldPoint::WbSubmitError, bio.idx, Err(e.into()))
            }
        }
    }
}

/// The background flusher: whenever some folio is dirty and not under writeback, run a
/// WB_SYNC_NONE pass over the lowest such inode.
#[derive(Clone, Debug, Default)]
pub struct Flusher {
    pass: Option<WbPass>,
}

impl Flusher {
    pub fn busy(&self) -> bool {
        self.pass.is_some()
    }

    pub fn runnable(&self, fs: &Fs, me: TaskId) -> bool {
        match &self.pass {
            Some(p) => p.runnable(fs, me),
            None => fs.has_writeback_work(),
        }
    }

    pub fn step(&mut self, cx: &mut Cx<'_>) -> Step {
        if self.pass.is_none() {
            let ino = (0..cx.fs.inodes.len())
                .find(|&i| {
                    cx.fs
                        .inode(i)
                        .cache
                        .folios
                        .values()
                        .any(|f| f.dirty && !f.writeback)
                })
                .expect("runnable only with work");
            self.pass = Some(WbPass::new(ino, false));
        }
        let pass = self.pass.as_mut().expect("set");
        match pass.step(cx) {
            Step::Done(l, a, _) => {
                self.pass = None;
                Step::Yield(l, a)
            }
            y => y,
        }
    }
}

/// The IO completion worker: finishes the oldest IO end in three steps.
#[derive(Clone, Debug, Default)]
pub struct IoCompletion;

impl IoCompletion {
    pub fn runnable(&self, fs: &Fs) -> bool {
        !fs.ioends.is_empty()
    }

    pub fn step(&mut self, cx: &mut Cx<'_>) -> Step {
        let fs = &mut *cx.fs;
        let io = fs.ioends.front_mut().expect("runnable only with work");
        match io.stage {
            0 => {
                let (req, idx) = (io.req, io.fblock);
                io.stage = if io.unwritten { 1 } else { 2 };
                if let Err(e) = fs.dev.complete(req) {
                    let (ino, fblock) = (io.ino, io.fblock);
                    fs.violations.push(Violation::WritebackIoError {
                        ino,
                        fblock,
                        error: e.to_string(),
                    });
                }
                Step::Yield(YieldPoint::IoComplete, idx)
            }
            1 => {
                io.stage = 2;
                let (ino, b, addr) = (io.ino, io.fblock, io.addr);
                // xfs_iomap_write_unwritten: convert only if still that unwritten block.
                if fs.inode(ino).extents.get(b)
                    == (Extent {
                        state: ExtentState::Unwritten,
                        addr,
                    })
                {
                    fs.inode_mut(ino).extents.set(
                        b,
                        Extent {
                            state: ExtentState::Written,
                            addr,
                        },
                    );
                }
                Step::Yield(YieldPoint::IoConvertUnwritten, b)
            }
            _ => {
                let io = fs.ioends.pop_front().expect("front");
                if let Some(f) = fs.inode_mut(io.ino).cache.get_mut(io.fblock) {
                    f.writeback = false;
                }
                // xfs_setfilesize: the on-disk size may now cover what this IO wrote.
                let e = fs.inode(io.ino).extents.get(io.fblock);
                if e.state == ExtentState::Written && e.addr == io.addr {
                    fs.data_landed(io.ino, io.end);
                }
                Step::Yield(YieldPoint::IoEndWriteback, io.fblock)
            }
        }
    }
}

/// Reclaim (kswapd): while the cache is over its limit, evict the least recently used clean,
/// unlocked folio not under writeback. One folio per step.
#[derive(Clone, Debug, Default)]
pub struct Reclaim;

impl Reclaim {
    pub fn runnable(&self, fs: &Fs) -> bool {
        fs.reclaim_victim().is_some()
    }

    pub fn step(&mut self, cx: &mut Cx<'_>) -> Step {
        let (ino, idx) = cx.fs.reclaim_victim().expect("runnable only with a victim");
        cx.fs.remove_folio(ino, idx);
        Step::Yield(YieldPoint::Reclaim, idx)
    }
}
