//! The page cache of one inode: folios of one or more 4 KiB blocks
//! ([`crate::fs::Config::folio_blocks`]) with the kernel's state bits, per-block uptodate and
//! dirty bits (`struct iomap_folio_state`, v6.6), and the LRU clock that reclaim uses.

use crate::block::BLOCK_SIZE;
use crate::foliomap::FolioMap;
use crate::TaskId;
use std::rc::Rc;

/// Blocks a folio holds at most ([`crate::fs::Config::folio_blocks`],
/// [`crate::fs::Config::max_folio_blocks`]): 1 MiB folios of 4 KiB blocks (x86-64 Linux
/// allows up to 2 MiB, `MAX_PAGECACHE_ORDER`). The per-block bits are a [`BlockBits`] each.
pub const FOLIO_BLOCKS_MAX: u64 = 256;

/// One bit per block of a folio, [`FOLIO_BLOCKS_MAX`] in all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockBits([u64; (FOLIO_BLOCKS_MAX / 64) as usize]);

impl BlockBits {
    /// Bits `[first, end)` set.
    fn range(first: u64, end: u64) -> Self {
        let end = end.min(FOLIO_BLOCKS_MAX);
        let mut b = BlockBits::default();
        for (w, word) in b.0.iter_mut().enumerate() {
            let lo = w as u64 * 64;
            let (s, e) = (first.max(lo), end.min(lo + 64));
            if s < e {
                *word = (u64::MAX >> (64 - (e - s))) << (s - lo);
            }
        }
        b
    }

    /// Whether bit `i` is set.
    pub fn has(&self, i: u64) -> bool {
        i < FOLIO_BLOCKS_MAX && self.0[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    fn or(&mut self, other: BlockBits) {
        self.0.iter_mut().zip(other.0).for_each(|(w, o)| *w |= o);
    }

    fn and_not(&mut self, other: BlockBits) {
        self.0.iter_mut().zip(other.0).for_each(|(w, o)| *w &= !o);
    }

    /// The set bits, lowest first.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().enumerate().flat_map(|(w, &word)| {
            let mut left = word;
            std::iter::from_fn(move || {
                (left != 0).then(|| {
                    let i = u64::from(left.trailing_zeros());
                    left &= left - 1;
                    w as u64 * 64 + i
                })
            })
        })
    }
}

/// A folio's memory: its own, or shared with block writes in flight (writeback of a whole
/// folio lends it to them, [`crate::block::BlockData::Shared`], as a bio points at the page).
/// Reading it needs nothing; changing it while it is shared copies it first (`Rc::make_mut`),
/// so the block writes keep the bytes they were submitted with, as the copies they used to
/// make kept them.
#[derive(Clone, Debug, Default)]
pub struct FolioBuf(Rc<Vec<u8>>);

impl FolioBuf {
    /// The memory, shared: a block write in flight holds it.
    pub fn lend(&self) -> Rc<Vec<u8>> {
        Rc::clone(&self.0)
    }

    /// The buffer, unless a block write still holds it.
    pub fn into_vec(self) -> Option<Vec<u8>> {
        Rc::try_unwrap(self.0).ok()
    }
}

impl From<Vec<u8>> for FolioBuf {
    fn from(v: Vec<u8>) -> Self {
        FolioBuf(Rc::new(v))
    }
}

impl std::ops::Deref for FolioBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl std::ops::DerefMut for FolioBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        Rc::make_mut(&mut self.0).as_mut_slice()
    }
}

/// One cached folio.
#[derive(Clone, Debug)]
pub struct Folio {
    pub data: FolioBuf,
    /// The task holding the folio lock (taken and dropped through [`PageCache::lock`] and
    /// [`PageCache::unlock`], which count the locked folios).
    locked: Option<TaskId>,
    /// Per-block uptodate bits (`ifs->state`, first half): the block's contents match the
    /// file (read, zeroed, or written). The folio is uptodate when every block is.
    uptodate_bits: BlockBits,
    /// Per-block dirty bits (`ifs->state`, second half): the blocks writeback writes.
    dirty_bits: BlockBits,
    /// The folio's dirty flag (`PG_dirty`): it must be written back. Set with some dirty
    /// block; cleared, with every block's bit, when writeback cleans it for IO.
    pub dirty: bool,
    /// Blocks of this folio whose writeback IO is not complete yet (`ifs->write_bytes_pending`
    /// in blocks): writeback ends when it drops to zero.
    pub wb_pending: u32,
    /// Writeback IO is in flight; the folio cannot be reclaimed or truncated.
    pub writeback: bool,
    /// `PAGECACHE_TAG_TOWRITE`: tagged by a WB_SYNC_ALL pass when it starts
    /// (`tag_pages_for_writeback`), so that pass writes only what was dirty then; cleared when
    /// a pass cleans the folio for IO.
    pub towrite: bool,
    /// Mapped writable into a process: stores land without a fault. Writeback clears it
    /// (`folio_mkclean`) so the next store faults and dirties the folio again.
    pub mapped_writable: bool,
    /// LRU clock of the last access.
    pub lru: u64,
    /// Identity of this folio instance: a folio dropped and re-created at the same index
    /// is a different folio (what `folio->mapping` checks catch in the kernel).
    pub gen: u64,
    /// References held across steps (a fault between `filemap_fault` and `page_mkwrite`);
    /// reclaim cannot free a referenced folio, truncate can still remove it from the cache.
    pub pins: u32,
}

impl Folio {
    /// An empty (not uptodate, clean) folio of `blocks` blocks.
    pub fn new(lru: u64, gen: u64, blocks: u64) -> Self {
        debug_assert!((1..=FOLIO_BLOCKS_MAX).contains(&blocks));
        Folio::with_data(lru, gen, vec![0; BLOCK_SIZE * blocks as usize])
    }

    /// An empty folio over `data` (a whole number of blocks: a recycled buffer, whatever it
    /// holds; no block is uptodate, so none is read before it is filled).
    pub fn with_data(lru: u64, gen: u64, data: Vec<u8>) -> Self {
        debug_assert!(data.len().is_multiple_of(BLOCK_SIZE));
        Folio {
            data: data.into(),
            locked: None,
            uptodate_bits: BlockBits::default(),
            dirty_bits: BlockBits::default(),
            dirty: false,
            wb_pending: 0,
            writeback: false,
            towrite: false,
            mapped_writable: false,
            lru,
            gen,
            pins: 0,
        }
    }

    /// Blocks in this folio.
    pub fn blocks(&self) -> u64 {
        (self.data.len() / BLOCK_SIZE) as u64
    }

    fn all_bits(&self) -> BlockBits {
        BlockBits::range(0, self.blocks())
    }

    /// Bits of blocks `[first, first + n)` (clamped to the folio).
    fn bits(&self, first: u64, n: u64) -> BlockBits {
        BlockBits::range(first, (first + n).min(self.blocks()))
    }

    /// `folio_test_uptodate`: every block is uptodate.
    pub fn uptodate(&self) -> bool {
        self.uptodate_bits == self.all_bits()
    }

    /// `ifs_block_is_uptodate` for block `i` of the folio.
    pub fn block_uptodate(&self, i: u64) -> bool {
        self.uptodate_bits.has(i)
    }

    /// `iomap_set_range_uptodate` over blocks `[first, first + n)`.
    pub fn set_uptodate(&mut self, first: u64, n: u64) {
        self.uptodate_bits.or(self.bits(first, n));
    }

    /// The whole folio is uptodate (read, or filled).
    pub fn set_all_uptodate(&mut self) {
        self.uptodate_bits = self.all_bits();
    }

    /// `ifs_block_is_dirty` for block `i` of the folio.
    pub fn block_dirty(&self, i: u64) -> bool {
        self.dirty_bits.has(i)
    }

    /// `iomap_set_range_dirty` over blocks `[first, first + n)` and `filemap_dirty_folio`.
    /// The caller tells the flusher ([`crate::fs::Fs::dirtied`]).
    pub fn set_dirty(&mut self, first: u64, n: u64) {
        self.dirty_bits.or(self.bits(first, n));
        self.dirty = true;
    }

    /// Clears the dirty bits of blocks `[first, first + n)`; the folio stays dirty while any
    /// block is. Returns whether it is still dirty.
    pub fn clear_dirty_blocks(&mut self, first: u64, n: u64) -> bool {
        self.dirty_bits.and_not(self.bits(first, n));
        self.dirty &= !self.dirty_bits.is_empty();
        self.dirty
    }

    /// `folio_clear_dirty_for_io` and `iomap_clear_range_dirty` over the whole folio (which
    /// also write-protects its mappings, `folio_mkclean`): returns the blocks that were dirty.
    pub fn clean_for_io(&mut self) -> BlockBits {
        let bits = std::mem::take(&mut self.dirty_bits);
        self.dirty = false;
        self.towrite = false;
        self.mapped_writable = false;
        bits
    }

    /// Whether block `i` of the folio holds data below byte `eof` of its file (`lo` is the
    /// folio's first byte): a non-zero byte. A dirty block over a HOLE that holds none loses
    /// nothing when writeback skips it (`page_mkwrite` dirties every block of a large folio,
    /// and a later size increase can bring one past the old EOF below the new one).
    pub fn block_holds_data(&self, i: u64, lo: u64, eof: u64) -> bool {
        let start = i as usize * BLOCK_SIZE;
        let end = (start + BLOCK_SIZE).min(eof.saturating_sub(lo) as usize);
        start < end && self.data[start..end].iter().any(|&b| b != 0)
    }

    /// The task holding the folio lock.
    pub fn locked(&self) -> Option<TaskId> {
        self.locked
    }

    /// May `me` take the lock now?
    pub fn lockable_by(&self, me: TaskId) -> bool {
        self.locked.is_none_or(|t| t == me)
    }

    /// Reclaim may drop only clean, unlocked, unreferenced folios not under writeback. Being
    /// mapped does not keep a folio (`shrink_folio_list` unmaps it with `try_to_unmap`, and the
    /// next store faults); a writable mapping goes with the dirty bit anyway, since the
    /// cleaning for writeback write-protects it (`folio_mkclean`).
    pub fn reclaimable(&self) -> bool {
        self.locked.is_none() && !self.dirty && !self.writeback && self.pins == 0
    }
}

/// One inode's cached folios, by index: the folio's first block divided by the smallest
/// folio's blocks ([`crate::fs::Config::folio_blocks`]). A larger folio spans the indexes up
/// to the next folio's ([`PageCache::covering`]).
#[derive(Clone, Debug, Default)]
pub struct PageCache {
    pub folios: FolioMap,
    /// Folios of `folios` whose lock is held: with none, every folio is lockable by anyone,
    /// which the tasks that wait for a folio lock ask at every step (a read of 1 MiB asked
    /// the tree once a step, a tenth of the engine's time).
    locked_folios: usize,
    /// Blocks of every folio in `folios` together: when they are as many as the folios times
    /// the smallest folio's, every folio is of the smallest size and the folio over an index
    /// is the one at it ([`PageCache::covering`] then looks up one key, not a range).
    pub(crate) blocks: u64,
}

impl PageCache {
    pub fn get(&self, idx: u64) -> Option<&Folio> {
        self.folios.get(idx)
    }

    pub fn get_mut(&mut self, idx: u64) -> Option<&mut Folio> {
        self.folios.get_mut(idx)
    }

    /// The index of the cached folio that holds index `unit` (a folio of `unit_blocks`
    /// blocks would have index `unit`): that folio, or a larger one before it that spans it.
    pub fn covering(&self, unit: u64, unit_blocks: u64) -> Option<u64> {
        if self.all_smallest(unit_blocks) {
            return self.folios.contains_key(unit).then_some(unit);
        }
        let (first, f) = self.folios.last_at_or_before(unit)?;
        (first + f.blocks() / unit_blocks > unit).then_some(first)
    }

    /// Every cached folio has `unit_blocks` blocks (the smallest size): the folio over an
    /// index is the one at it, and its size needs no lookup.
    pub fn all_smallest(&self, unit_blocks: u64) -> bool {
        self.blocks == self.folios.len() as u64 * unit_blocks
    }

    /// No folio is locked: every folio is lockable by anyone (asked before looking up which
    /// folio a task needs).
    pub fn none_locked(&self) -> bool {
        self.locked_folios == 0
    }

    /// Is the folio absent or lockable by `me`?
    pub fn lockable(&self, idx: u64, me: TaskId) -> bool {
        self.locked_folios == 0 || self.get(idx).is_none_or(|f| f.lockable_by(me))
    }

    /// `me` takes the lock of folio `idx`, which is cached and lockable by `me`.
    pub fn lock(&mut self, idx: u64, me: TaskId) {
        let f = self.folios.get_mut(idx).expect("locking a cached folio");
        debug_assert!(f.lockable_by(me));
        if f.locked.replace(me).is_none() {
            self.locked_folios += 1;
        }
    }

    /// Drops the lock of folio `idx`, if it is cached and locked.
    pub fn unlock(&mut self, idx: u64) {
        if let Some(f) = self.folios.get_mut(idx) {
            if f.locked.take().is_some() {
                self.locked_folios -= 1;
            }
        }
    }

    /// Takes folio `idx` out of the cache.
    pub fn remove(&mut self, idx: u64) -> Option<Folio> {
        let f = *self.folios.remove(idx)?;
        self.blocks -= f.blocks();
        if f.locked.is_some() {
            self.locked_folios -= 1;
        }
        Some(f)
    }

    /// Puts folio `f` in the cache at index `idx`, where there is none.
    pub fn insert(&mut self, idx: u64, f: Folio) -> &mut Folio {
        self.blocks += f.blocks();
        let old = self.folios.insert(idx, Box::new(f));
        debug_assert!(old.is_none(), "a folio at {idx} already");
        self.get_mut(idx).expect("just put")
    }

    /// First folio at or after `idx` that satisfies `pred`.
    pub fn next_where(&self, idx: u64, pred: impl Fn(&Folio) -> bool) -> Option<u64> {
        self.folios
            .range(idx, u64::MAX)
            .find(|(_, f)| pred(f))
            .map(|(i, _)| i)
    }

    pub fn len(&self) -> usize {
        self.folios.len()
    }

    pub fn is_empty(&self) -> bool {
        self.folios.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_clean_unlocked_idle_folios_are_reclaimable() {
        let mut f = Folio::new(0, 0, 1);
        assert!(f.reclaimable());
        f.dirty = true;
        assert!(!f.reclaimable());
        f.dirty = false;
        f.writeback = true;
        assert!(!f.reclaimable());
        f.writeback = false;
        f.locked = Some(3);
        assert!(!f.reclaimable() && f.lockable_by(3) && !f.lockable_by(4));
        f.locked = None;
        f.mapped_writable = true;
        assert!(
            f.reclaimable(),
            "a clean mapped folio is unmapped and reclaimed"
        );
        f.pins = 1;
        assert!(!f.reclaimable());
    }

    /// The count of locked folios follows every lock, unlock and removal, so that `lockable`
    /// can skip the lookup only when no folio is locked.
    #[test]
    fn the_locked_count_follows_locks_unlocks_and_removals() {
        let mut c = PageCache::default();
        c.insert(1, Folio::new(0, 0, 1));
        c.insert(2, Folio::new(0, 0, 1));
        assert!(c.lockable(1, 7) && c.lockable(9, 7));
        c.lock(1, 7);
        c.lock(1, 7);
        assert_eq!(c.locked_folios, 1, "a lock taken again counts once");
        assert!(!c.lockable(1, 8) && c.lockable(1, 7) && c.lockable(2, 8));
        c.unlock(1);
        c.unlock(1);
        assert_eq!(c.locked_folios, 0);
        assert!(c.lockable(1, 8));
        c.lock(2, 7);
        assert_eq!(c.remove(2).unwrap().locked(), Some(7));
        assert_eq!(
            c.locked_folios, 0,
            "a locked folio removed is no longer counted"
        );
        c.insert(2, Folio::new(0, 0, 1));
        assert!(c.lockable(2, 8));
        c.lock(1, 3);
        assert!(
            !c.lockable(1, 8),
            "a lock taken after a removal still counts"
        );
    }

    /// The bit set's ranges and iteration, a word at a time, equal setting and reading one
    /// bit at a time, across and at the edges of its words.
    #[test]
    fn block_bits_ranges_equal_bit_by_bit() {
        for first in (0..FOLIO_BLOCKS_MAX).step_by(7) {
            let ends = [
                first,
                first + 1,
                first + 63,
                first + 64,
                first + 65,
                FOLIO_BLOCKS_MAX + 3,
            ];
            for end in ends {
                let b = BlockBits::range(first, end);
                let want: Vec<u64> = (first..end.min(FOLIO_BLOCKS_MAX)).collect();
                assert_eq!(b.iter().collect::<Vec<_>>(), want, "{first}..{end}");
                assert!((0..FOLIO_BLOCKS_MAX + 2).all(|i| b.has(i) == want.contains(&i)));
            }
        }
    }

    /// `struct iomap_folio_state`'s bits: the folio is uptodate only when every block is,
    /// and stays dirty while any block is.
    #[test]
    fn per_block_bits_make_the_folio_state() {
        let mut f = Folio::new(0, 0, 4);
        assert_eq!(f.data.len(), 4 * BLOCK_SIZE);
        f.set_uptodate(1, 2);
        assert!(!f.uptodate() && f.block_uptodate(1) && f.block_uptodate(2));
        assert!(!f.block_uptodate(0) && !f.block_uptodate(3));
        f.set_uptodate(0, 9);
        assert!(f.uptodate());
        f.set_dirty(1, 1);
        f.set_dirty(3, 1);
        assert!(f.dirty && f.block_dirty(1) && !f.block_dirty(2));
        assert!(f.clear_dirty_blocks(1, 1), "block 3 is still dirty");
        assert!(!f.clear_dirty_blocks(3, 1) && !f.dirty);
        f.set_dirty(0, 4);
        assert_eq!(f.clean_for_io().iter().collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert!(!f.dirty && !f.block_dirty(0));
        let mut one = Folio::new(0, 0, 1);
        one.set_uptodate(0, 1);
        assert!(one.uptodate());
        let mut max = Folio::new(0, 0, FOLIO_BLOCKS_MAX);
        max.set_uptodate(0, FOLIO_BLOCKS_MAX - 1);
        assert!(!max.uptodate() && max.block_uptodate(FOLIO_BLOCKS_MAX - 2));
        max.set_uptodate(FOLIO_BLOCKS_MAX - 1, 5);
        assert!(max.uptodate());
        // Bits across the words of the bit set.
        max.set_dirty(60, 10);
        max.set_dirty(200, 1);
        assert!(max.clear_dirty_blocks(63, 2), "60-62, 65-69 and 200 stay");
        let dirty: Vec<u64> = max.clean_for_io().iter().collect();
        assert_eq!(dirty, [60, 61, 62, 65, 66, 67, 68, 69, 200]);
        assert!(!max.dirty && !max.block_dirty(60));
    }
}
