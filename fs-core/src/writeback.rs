//! Writeback (`iomap_writepages` over `write_cache_pages`: batched tagged lookups, XFS's
//! `map_blocks` and its cached mapping, ioends held open until they close or the pass ends),
//! IO completion (data on disk, then UNWRITTEN -> WRITTEN, then end of writeback), and reclaim.

use crate::alloc::Owner;
use crate::block::{BlockData, Request, BLOCK_SIZE};
use crate::extent::{Extent, ExtentState, FILE_BLOCKS_MAX};
use crate::fs::{Fs, FsError, IoEnd, Violation};
use crate::iomap::{IoMap, IoMapKind};
use crate::pagecache::Folio;
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

/// Folios one `filemap_get_folios_tag` lookup returns at most: `PAGEVEC_SIZE`, the size of a
/// `struct folio_batch` (include/linux/pagevec.h: 15 up to v6.8, including the v6.6 this
/// model follows; 31 from v6.9, commit 9cecde80aae0 "mm: increase folio batch size").
pub const PAGEVEC_SIZE_FOLIOS: usize = 15;
/// Folios one ioend holds at most before the next folio starts a new one (`IOEND_BATCH_SIZE`
/// in fs/iomap/buffered-io.c, v6.6), which bounds the work of its completion.
pub const IOEND_BATCH_FOLIOS: usize = 4096;
/// Writeback's block writes in flight at most (submitted, not yet completed): half the
/// device's queue ([`crate::block::REQUESTS_IN_FLIGHT_MAX`]), so that the journal's and the
/// reads' requests always find room. A pass waits before a folio that would go past it, as a
/// kernel submitter sleeps for a free request (`blk_mq_get_tag`); the device never refuses.
pub const WB_BLOCKS_IN_FLIGHT_MAX: usize = crate::block::REQUESTS_IN_FLIGHT_MAX / 2;
/// Blocks one ioend holds at most: `IOEND_BATCH_SIZE` ([`IOEND_BATCH_FOLIOS`]) would let one
/// ioend fill the queue alone; half of [`WB_BLOCKS_IN_FLIGHT_MAX`] keeps a pass that waits
/// for room from waiting on its own open ioend. (The model's workloads never reach it.)
pub const IOEND_BLOCKS_MAX: usize = WB_BLOCKS_IN_FLIGHT_MAX / 2;

/// One block's write: a bio in the kernel's terms (the kernel puts a contiguous run in one
/// bio; the model keeps one device write per block).
#[derive(Clone, Debug)]
struct Bio {
    fblock: u64,
    addr: u64,
    unwritten: bool,
    /// End of the file's data in the block when it was written back (EOF then): past it the
    /// IO carries zeros.
    end: u64,
}

/// An ioend being built (`struct iomap_ioend`): blocks contiguous in the file and on the
/// device, all UNWRITTEN or all not. Nothing of it reaches the device until it is submitted,
/// which happens when a block that cannot join it arrives or the pass ends; until then its
/// folios stay under writeback.
#[derive(Clone, Debug)]
struct Ioend {
    bios: Vec<Bio>,
}

impl Ioend {
    /// `iomap_can_add_to_ioend` (v6.6): same type, next file block, next device block, and
    /// under `IOEND_BATCH_SIZE` (counted in blocks here, which is folios with one block per
    /// folio). (The COW flag it also compares is not modelled.)
    fn can_add(&self, bio: &Bio) -> bool {
        let last = self.bios.last().expect("an ioend holds at least one block");
        last.unwritten == bio.unwritten
            && bio.fblock == last.fblock + 1
            && bio.addr == last.addr + 1
            && self.bios.len() < IOEND_BATCH_FOLIOS.min(IOEND_BLOCKS_MAX)
    }
}

/// Whether a lookup by a pass (`sync_all`, having `tagged` TOWRITE yet or not) returns `f`.
fn looked_up(sync_all: bool, tagged: bool, f: &crate::pagecache::Folio) -> bool {
    match (sync_all, tagged) {
        (false, _) => f.dirty,
        (true, true) => f.towrite,
        (true, false) => f.towrite || f.dirty,
    }
}

/// What a pass does with a folio of its batch when its turn comes (the checks
/// `write_cache_pages` makes with the folio locked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Turn {
    /// Truncated since the lookup (even if a new folio sits at the index now), cleaned by
    /// someone else, or under writeback in a WB_SYNC_NONE pass: skipped.
    Skip,
    /// Under writeback in a WB_SYNC_ALL pass: wait for it.
    Wait,
    /// Clean it for IO and write it.
    Write,
}

/// One `writepages` call over an inode (`iomap_writepages` over v6.6's `write_cache_pages`):
/// folios come in batches from a tagged lookup (DIRTY for the background flusher, TOWRITE,
/// tagged when the pass starts, for WB_SYNC_ALL); each is locked, cleaned, mapped through the
/// cached mapping, added to the open ioend and put under writeback. Ioends are submitted when
/// they close and when the pass ends.
///
/// Steps: one per folio written (`wb:map_blocks`), then one that submits the ioends that
/// folio closed (`wb:submit`, between folios), and a last one that submits the open ioend
/// (`wb:pass_end`). A lookup happens in the step that writes the first folio it returns
/// (the kernel may be preempted between the two; the model is not).
#[derive(Clone, Debug)]
pub struct WbPass {
    pub ino: usize,
    /// WB_SYNC_ALL (fsync, sync) waits for folios already under writeback and writes what
    /// was tagged TOWRITE at the start; WB_SYNC_NONE (the flusher) skips folios under
    /// writeback and looks up DIRTY folios.
    sync_all: bool,
    tagged: bool,
    /// The current batch: (index, folio identity) as the lookup saw them, and how far the
    /// pass is in it.
    batch: Vec<(u64, u64)>,
    batch_at: usize,
    /// Where the next lookup starts; `None` once a lookup came back short of a full batch
    /// (the kernel then moves its index past the end of the range).
    next_index: Option<u64>,
    /// One past the last folio the pass took (what `wb:pass_end` reports).
    cursor: u64,
    /// One past the last folio the pass may take (`wbc->range_end`; `u64::MAX` for the
    /// whole file).
    end: u64,
    wpc: WritepageCtx,
    /// `wpc->ioend`: the ioend folios are being added to.
    ioend: Option<Ioend>,
    /// Ioends the last folio closed, submitted by the next step (`submit_list` of
    /// `iomap_writepage_map`); `Some` from a folio's step to its submit step.
    closed: Option<(u64, Vec<Ioend>)>,
}

impl WbPass {
    pub fn new(ino: usize, sync_all: bool) -> Self {
        WbPass {
            ino,
            sync_all,
            tagged: false,
            batch: Vec::new(),
            batch_at: 0,
            next_index: Some(0),
            cursor: 0,
            end: u64::MAX,
            wpc: WritepageCtx::default(),
            ioend: None,
            closed: None,
        }
    }

    /// A WB_SYNC_ALL pass over folios `[start, end)` only (`filemap_fdatawrite_range`, as
    /// `filemap_write_and_wait_range` starts it).
    pub fn range(ino: usize, start: u64, end: u64) -> Self {
        WbPass {
            next_index: Some(start),
            cursor: start,
            end,
            ..WbPass::new(ino, true)
        }
    }

    /// Whether a lookup of this pass returns the folio: DIRTY, or TOWRITE for WB_SYNC_ALL
    /// (before the pass has tagged, what it is about to tag).
    fn tagged_for_us(&self, f: &crate::pagecache::Folio) -> bool {
        looked_up(self.sync_all, self.tagged, f)
    }

    fn turn(&self, fs: &Fs, idx: u64, gen: u64) -> Turn {
        match fs.inode(self.ino).cache.get(idx) {
            Some(f) if f.gen == gen && f.dirty => match (f.writeback, self.sync_all) {
                (false, _) => Turn::Write,
                (true, true) => Turn::Wait,
                (true, false) => Turn::Skip,
            },
            _ => Turn::Skip,
        }
    }

    /// The folio the pass would take next and what it would do with it, without changing
    /// anything: the rest of the batch first, then what lookups would return now. `None`:
    /// the pass is at its end.
    fn peek(&self, fs: &Fs) -> Option<(u64, Turn)> {
        for &(idx, gen) in &self.batch[self.batch_at..] {
            match self.turn(fs, idx, gen) {
                Turn::Skip => continue,
                t => return Some((idx, t)),
            }
        }
        let start = self.next_index?;
        let cache = &fs.inode(self.ino).cache;
        if !self.sync_all {
            // WB_SYNC_NONE skips what is under writeback: the folio it would write next is
            // the first dirty one not under writeback (an index of its own, so that a cache
            // full of folios still being written is not walked every step).
            return fs
                .idle_indexes(self.ino, start)
                .take_while(|&idx| idx < self.end)
                .find(|&idx| cache.get(idx).is_some_and(|f| f.dirty && !f.writeback))
                .map(|idx| (idx, Turn::Write));
        }
        // Every folio a lookup returns is dirty: the dirty index is enough to search.
        fs.dirty_indexes(self.ino, start)
            .take_while(|&idx| idx < self.end)
            .filter_map(|idx| cache.get(idx).map(|f| (idx, f)))
            .filter(|(_, f)| self.tagged_for_us(f))
            .map(|(idx, f)| (idx, self.turn(fs, idx, f.gen)))
            .find(|&(_, t)| t != Turn::Skip)
    }

    /// `filemap_get_folios_tag`: up to a batch of tagged folios from `next_index` on.
    fn lookup(&mut self, fs: &Fs) {
        let Some(start) = self.next_index else {
            self.batch.clear();
            return;
        };
        let batch_max = fs.cfg.wb_batch_folios.max(1);
        let (sync_all, tagged, end) = (self.sync_all, self.tagged, self.end);
        self.batch.clear();
        self.batch_at = 0;
        // Every folio a lookup returns is dirty (TOWRITE is only set on dirty folios and
        // cleared with DIRTY), so the dirty index is enough to search, as the xarray's tags are.
        let cache = &fs.inode(self.ino).cache;
        self.batch.extend(
            fs.dirty_indexes(self.ino, start)
                .take_while(|&idx| idx < end)
                .filter_map(|idx| cache.get(idx).map(|f| (idx, f)))
                .filter(|(_, f)| looked_up(sync_all, tagged, f))
                .map(|(idx, f)| (idx, f.gen))
                .take(batch_max),
        );
        self.next_index = match self.batch.last() {
            Some(&(last, _)) if self.batch.len() == batch_max => Some(last + 1),
            _ => None,
        };
    }

    /// Moves through the batch (and new lookups) to the next folio to write, skipping what
    /// `write_cache_pages` skips; `None` at the end of the pass.
    fn advance(&mut self, fs: &Fs) -> Option<u64> {
        loop {
            while let Some(&(idx, gen)) = self.batch.get(self.batch_at) {
                self.batch_at += 1;
                match self.turn(fs, idx, gen) {
                    Turn::Skip => continue,
                    Turn::Write => return Some(idx),
                    Turn::Wait => unreachable!("stepped while waiting for writeback"),
                }
            }
            self.next_index?;
            self.lookup(fs);
            if self.batch.is_empty() {
                return None;
            }
        }
    }

    /// `tag_pages_for_writeback`: a WB_SYNC_ALL pass first tags every dirty folio TOWRITE.
    fn tag_pages_for_writeback(&mut self, fs: &mut Fs) {
        self.tagged = true;
        if self.sync_all {
            // The dirty folios are the ones the flusher's hint holds (an index, as the
            // xarray's DIRTY tag is).
            let dirty: Vec<u64> = fs
                .dirty_indexes(self.ino, self.cursor)
                .take_while(|&idx| idx < self.end)
                .collect();
            for idx in dirty {
                if let Some(f) = fs.inode_mut(self.ino).cache.get_mut(idx) {
                    f.towrite |= f.dirty;
                }
            }
        }
    }

    pub fn runnable(&self, fs: &Fs, me: TaskId) -> bool {
        if self.closed.is_some() {
            return true;
        }
        match self.peek(fs) {
            None => true,
            Some((_, Turn::Wait)) => false,
            Some((idx, _)) => {
                fs.inode(self.ino)
                    .cache
                    .get(idx)
                    .is_some_and(|f| f.lockable_by(me))
                    && self.room_for_a_folio(fs)
            }
        }
    }

    /// Whether the next folio's blocks fit under [`WB_BLOCKS_IN_FLIGHT_MAX`] with those
    /// already in flight and those of the open ioend. When they do not, some are in flight
    /// (the open ioend holds at most [`IOEND_BLOCKS_MAX`]), so IO completion can run.
    fn room_for_a_folio(&self, fs: &Fs) -> bool {
        let open = self.ioend.as_ref().map_or(0, |io| io.bios.len());
        room_for_blocks(fs, open + fs.cfg.largest_folio_blocks() as usize)
    }

    /// Returns Done when the pass has no more folios to write.
    pub fn step(&mut self, cx: &mut Cx<'_>) -> Step {
        if let Some((idx, ioends)) = self.closed.take() {
            return match self.submit_all(cx.fs, ioends) {
                Ok(()) => Step::Yield(YieldPoint::WbSubmit, idx),
                Err(e) => Step::Done(YieldPoint::WbSubmitError, idx, Err(e)),
            };
        }
        if !self.tagged {
            self.tag_pages_for_writeback(cx.fs);
        }
        let Some(idx) = self.advance(cx.fs) else {
            // iomap_writepages: the ioend still open is submitted as the pass ends.
            let last = self.ioend.take().into_iter().collect();
            return match self.submit_all(cx.fs, last) {
                Ok(()) => Step::Done(YieldPoint::WbPassEnd, self.cursor, Ok(0)),
                Err(e) => Step::Done(YieldPoint::WbSubmitError, 0, Err(e)),
            };
        };
        self.cursor = idx + 1;
        self.write_folio(cx.fs, idx)
    }

    /// One folio: `folio_clear_dirty_for_io`, `iomap_do_writepage` (EOF handling) and
    /// `iomap_writepage_map` (each dirty block below EOF mapped and added to the ioend; the
    /// folio under writeback until every block's IO completes).
    fn write_folio(&mut self, fs: &mut Fs, idx: u64) -> Step {
        let ino = self.ino;
        let size = fs.inode(ino).size;
        let (first, nb) = (fs.folio_start(idx), fs.folio_len(ino, idx));
        let (lo, hi) = (first * BS, (first + nb) * BS);
        let f = fs.inode_mut(ino).cache.get_mut(idx).expect("found");
        let dirty = f.clean_for_io();
        if lo >= size {
            fs.cleaned(ino, idx);
            return Step::Yield(YieldPoint::WbBeyondEof, idx);
        }
        // iomap_do_writepage: zero the part of the EOF folio past EOF.
        if hi > size {
            f.data[(size - lo) as usize..].fill(0);
        }
        fs.cleaned(ino, idx);
        let mut count = 0;
        for i in dirty.iter().take_while(|&i| i < nb) {
            let fblock = first + i;
            if fblock * BS >= size {
                break;
            }
            match self.writepage_map_block(fs, fblock, size) {
                Ok(added) => count += u32::from(added),
                Err(e) => return self.map_failed(fs, idx, fblock, count, e),
            }
        }
        if count == 0 {
            return Step::Yield(YieldPoint::WbHole, idx);
        }
        fs.set_writeback(ino, idx, count);
        Step::Yield(YieldPoint::WbMapBlocks, idx)
    }

    /// One dirty block of `iomap_writepage_map`: `map_blocks`, then the block joins the ioend
    /// (closing the open one if it cannot join it: those go out after this folio). A block
    /// over a HOLE is skipped and its data dropped. Returns whether the block was added.
    fn writepage_map_block(
        &mut self,
        fs: &mut Fs,
        fblock: u64,
        size: u64,
    ) -> Result<bool, FsError> {
        let ino = self.ino;
        let map = map_blocks(fs, &mut self.wpc, ino, fblock)?;
        match map.kind {
            IoMapKind::Hole => {
                // iomap_writepage_map skips the block. That loses data only if it holds some.
                let idx = fs.folio_of(ino, fblock);
                let first = fs.folio_start(idx);
                let f = fs.inode(ino).cache.get(idx).expect("found");
                if f.block_holds_data(fblock - first, first * BS, size) {
                    fs.violations
                        .push(Violation::DirtyFolioOverHole { ino, fblock });
                }
                Ok(false)
            }
            IoMapKind::Delalloc => unreachable!("map_blocks converts delalloc"),
            IoMapKind::Mapped | IoMapKind::Unwritten => {
                let bio = Bio {
                    fblock,
                    addr: map.addr_of(fblock * BS),
                    unwritten: map.kind == IoMapKind::Unwritten,
                    end: ((fblock + 1) * BS).min(size),
                };
                let closed = self.add_to_ioend(bio);
                let idx = fs.folio_of(ino, fblock);
                match self.closed.as_mut() {
                    Some((_, list)) => list.extend(closed),
                    None => self.closed = Some((idx, closed)),
                }
                Ok(true)
            }
        }
    }

    /// `map_blocks` failed on `fblock` of folio `idx`: drop the delalloc reservation of the
    /// rest of the folio and lose its data, as XFS does (`xfs_discard_folio`). The blocks
    /// already added stay under writeback; the pass stops and the ioends it built are
    /// submitted as `iomap_writepages` ends. (v6.6 fails that ioend when the pass returns an
    /// error; the model writes it: writeback errors are not modelled.)
    fn map_failed(&mut self, fs: &mut Fs, idx: u64, fblock: u64, count: u32, e: FsError) -> Step {
        let ino = self.ino;
        let folio_end = fs.folio_end(ino, idx);
        crate::buffered_io::punch_delalloc(fs, ino, fblock, folio_end);
        if count > 0 {
            fs.set_writeback(ino, idx, count);
        }
        let mut pending: Vec<Ioend> = self.closed.take().map(|(_, l)| l).unwrap_or_default();
        pending.extend(self.ioend.take());
        let _ = self.submit_all(fs, pending);
        Step::Done(YieldPoint::WbMapBlocksError, idx, Err(e))
    }

    /// `iomap_add_to_ioend`: the folio joins the open ioend if it can; otherwise that ioend
    /// closes (returned, for submission after this folio) and the folio opens a new one.
    fn add_to_ioend(&mut self, bio: Bio) -> Vec<Ioend> {
        match self.ioend.as_mut() {
            Some(open) if open.can_add(&bio) => {
                open.bios.push(bio);
                Vec::new()
            }
            _ => {
                let closed = self.ioend.replace(Ioend { bios: vec![bio] });
                closed.into_iter().collect()
            }
        }
    }

    /// `iomap_submit_ioend` for each of `ioends`: every block's write goes to the device and
    /// waits for IO completion. A device that refuses a write leaves that block and the rest
    /// dirty (their folios out of writeback once none of their blocks is pending): they are
    /// written again later.
    fn submit_all(&mut self, fs: &mut Fs, ioends: Vec<Ioend>) -> Result<(), FsError> {
        let per_ioend = fs.cfg.complete_per_ioend;
        let mut bios = ioends
            .into_iter()
            .flat_map(|io| io.bios.into_iter().enumerate());
        while let Some((i, bio)) = bios.next() {
            let io = match self.submit(fs, &bio) {
                Ok(io) => io,
                Err(e) => {
                    let rest = std::iter::once(bio).chain(bios.map(|(_, b)| b));
                    self.redirty(fs, rest);
                    return Err(e);
                }
            };
            // Past an ioend's first block, the IO end at the back is that ioend's.
            match fs.ioends.back_mut() {
                Some(run) if per_ioend && i > 0 => {
                    run.reqs.extend(io.reqs);
                    run.count += 1;
                    run.end = io.end;
                }
                _ => fs.ioends.push_back(io),
            }
        }
        Ok(())
    }

    /// Blocks whose write the device refused: dirty again, their folios out of writeback
    /// once none of their blocks is pending.
    fn redirty(&mut self, fs: &mut Fs, bios: impl Iterator<Item = Bio>) {
        for b in bios {
            let idx = fs.folio_of(self.ino, b.fblock);
            let i = b.fblock - fs.folio_start(idx);
            if let Some(f) = fs.inode_mut(self.ino).cache.get_mut(idx) {
                let pending = f.wb_pending.saturating_sub(1);
                f.set_dirty(i, 1);
                fs.set_writeback(self.ino, idx, pending);
                fs.dirtied(self.ino, idx);
            }
        }
    }

    /// One block's write to the device; the IO end that completes it (one block).
    fn submit(&mut self, fs: &mut Fs, bio: &Bio) -> Result<IoEnd, FsError> {
        let ino = self.ino;
        let fblock = bio.fblock;
        let owner = fs.alloc.owner(bio.addr);
        if owner != Some(Owner { ino, fblock }) {
            fs.violations.push(Violation::WriteToForeignBlock {
                ino,
                fblock,
                addr: bio.addr,
                freed: fs.alloc.is_freed(bio.addr),
                owner: owner.map(|o| (o.ino, o.fblock)),
            });
        }
        let idx = fs.folio_of(ino, fblock);
        let at = (fblock - fs.folio_start(idx)) as usize * BLOCK_SIZE;
        let data = block_data(fs.inode(ino).cache.get(idx).expect("under writeback"), at);
        fs.alloc.mark_data_written(bio.addr);
        let mut unwritten = bio.unwritten;
        if unwritten && fs.cfg.bugs.convert_before_data {
            // The planted bug: the block is WRITTEN before its data is on the device.
            let written = Extent {
                state: ExtentState::Written,
                addr: bio.addr,
            };
            fs.inode_mut(ino).extents.set(fblock, written);
            unwritten = false;
        }
        let req = fs.dev.submit(Request::Write {
            block: bio.addr,
            data,
            fua: false,
        })?;
        fs.wb_blocks_submitted(1);
        Ok(IoEnd {
            reqs: vec![req],
            ino,
            fblock,
            addr: bio.addr,
            count: 1,
            unwritten,
            end: bio.end,
            stage: 0,
        })
    }
}

/// The bytes of the block at byte `at` of folio `f` for its write: the folio's memory, lent,
/// when every block of the folio is under writeback (a store into it before they complete
/// then copies the folio, which streaming writes never do); a copy of the block otherwise,
/// so that writes into a large folio, of which random writes put a block or two at a time
/// under writeback, do not copy all of it.
fn block_data(f: &Folio, at: usize) -> BlockData {
    if u64::from(f.wb_pending) == f.blocks() {
        BlockData::shared(f.data.lend(), at)
    } else {
        f.data[at..at + BLOCK_SIZE].to_vec().into()
    }
}

/// Whether `n` more of writeback's block writes fit under [`WB_BLOCKS_IN_FLIGHT_MAX`].
fn room_for_blocks(fs: &Fs, n: usize) -> bool {
    fs.wb_blocks_in_flight() + n <= WB_BLOCKS_IN_FLIGHT_MAX
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
            // A new pass writes a folio in its first step.
            None => {
                fs.has_writeback_work()
                    && room_for_blocks(fs, fs.cfg.largest_folio_blocks() as usize)
            }
        }
    }

    pub fn step(&mut self, cx: &mut Cx<'_>) -> Step {
        if self.pass.is_none() {
            let ino = cx
                .fs
                .first_writeback_inode()
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

/// The IO completion worker: finishes the oldest IO end in three steps (its device
/// completions, the conversion of its UNWRITTEN blocks, the end of writeback).
#[derive(Clone, Debug, Default)]
pub struct IoCompletion;

impl IoCompletion {
    pub fn runnable(&self, fs: &Fs) -> bool {
        !fs.ioends.is_empty()
    }

    pub fn step(&mut self, cx: &mut Cx<'_>) -> Step {
        let fs = &mut *cx.fs;
        let io = fs.ioends.front_mut().expect("runnable only with work");
        let b = io.fblock;
        match io.stage {
            0 => {
                io.stage = if io.unwritten { 1 } else { 2 };
                let (reqs, ino) = (std::mem::take(&mut io.reqs), io.ino);
                fs.wb_blocks_completed(reqs.len());
                for (i, req) in reqs.into_iter().enumerate() {
                    if let Err(e) = fs.dev.complete(req) {
                        fs.violations.push(Violation::WritebackIoError {
                            ino,
                            fblock: b + i as u64,
                            error: e.to_string(),
                        });
                    }
                }
                Step::Yield(YieldPoint::IoComplete, b)
            }
            1 => {
                io.stage = 2;
                let (ino, addr, count) = (io.ino, io.addr, io.count);
                for i in 0..count {
                    convert_unwritten(fs, ino, b + i, addr + i);
                }
                Step::Yield(YieldPoint::IoConvertUnwritten, b)
            }
            _ => {
                let io = fs.ioends.pop_front().expect("front");
                for i in 0..io.count {
                    let end = ((io.fblock + i + 1) * BS).min(io.end);
                    end_block_writeback(fs, io.ino, io.fblock + i, io.addr + i, end);
                }
                Step::Yield(YieldPoint::IoEndWriteback, b)
            }
        }
    }
}

/// `xfs_iomap_write_unwritten` for one block: convert only if still that unwritten block.
fn convert_unwritten(fs: &mut Fs, ino: usize, fblock: u64, addr: u64) {
    let unwritten = Extent {
        state: ExtentState::Unwritten,
        addr,
    };
    if fs.inode(ino).extents.get(fblock) == unwritten {
        let written = Extent {
            state: ExtentState::Written,
            addr,
        };
        fs.inode_mut(ino).extents.set(fblock, written);
    }
}

/// `iomap_finish_folio_write` for one block (the folio's writeback ends with its last
/// block), then `xfs_setfilesize`: the on-disk size may now cover what the block's IO wrote.
fn end_block_writeback(fs: &mut Fs, ino: usize, fblock: u64, addr: u64, end: u64) {
    let idx = fs.folio_of(ino, fblock);
    if let Some(f) = fs.inode(ino).cache.get(idx) {
        let pending = f.wb_pending.saturating_sub(1);
        fs.set_writeback(ino, idx, pending);
        if pending == 0 {
            fs.writeback_ended(ino, idx);
        }
    }
    let e = fs.inode(ino).extents.get(fblock);
    if e.state == ExtentState::Written && e.addr == addr {
        fs.data_landed(ino, end);
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
