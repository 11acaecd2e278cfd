//! The page cache of one inode: 4 KiB folios with the kernel's state bits, and the LRU
//! clock that reclaim uses. Block = folio in this model, so "per-block uptodate/dirty" is
//! one bit each.

use crate::block::BLOCK_SIZE;
use crate::TaskId;
use std::collections::BTreeMap;

/// One cached folio.
#[derive(Clone, Debug)]
pub struct Folio {
    pub data: Vec<u8>,
    /// The task holding the folio lock.
    pub locked: Option<TaskId>,
    /// Contents match the file (read, zeroed, or fully written).
    pub uptodate: bool,
    /// Must be written back.
    pub dirty: bool,
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
    pub fn new(lru: u64, gen: u64) -> Self {
        Folio {
            data: vec![0; BLOCK_SIZE],
            locked: None,
            uptodate: false,
            dirty: false,
            writeback: false,
            towrite: false,
            mapped_writable: false,
            lru,
            gen,
            pins: 0,
        }
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

/// One inode's cached folios, by index.
#[derive(Clone, Debug, Default)]
pub struct PageCache {
    pub folios: BTreeMap<u64, Folio>,
}

impl PageCache {
    pub fn get(&self, idx: u64) -> Option<&Folio> {
        self.folios.get(&idx)
    }

    pub fn get_mut(&mut self, idx: u64) -> Option<&mut Folio> {
        self.folios.get_mut(&idx)
    }

    /// Is the folio absent or lockable by `me`?
    pub fn lockable(&self, idx: u64, me: TaskId) -> bool {
        self.get(idx).is_none_or(|f| f.lockable_by(me))
    }

    /// First folio at or after `idx` that satisfies `pred`.
    pub fn next_where(&self, idx: u64, pred: impl Fn(&Folio) -> bool) -> Option<u64> {
        self.folios
            .range(idx..)
            .find(|(_, f)| pred(f))
            .map(|(i, _)| *i)
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
        let mut f = Folio::new(0, 0);
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
}
