//! Block allocator. It remembers who owns each allocated block (inode, file block), so a
//! write to a freed block, or to a block that now belongs to someone else, is detected at
//! submit time. Freed blocks are reused first, lowest first, which turns a stale write
//! into a visible overwrite of another owner's data instead of a silent no-op.
//!
//! On a filesystem that persists, a block freed in the running transaction is not handed out
//! again until that transaction has committed (as jbd2 does): were it reused and written,
//! and the free then lost in a crash, its old owner would read the new owner's data.

use std::collections::BTreeSet;

/// Who a block belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub ino: usize,
    pub fblock: u64,
}

#[derive(Clone, Debug)]
pub struct Allocator {
    blocks: u64,
    owner: Vec<Option<Owner>>,
    freed: BTreeSet<u64>,
    never_used: u64,
    /// Writeback has written data to the block since it was allocated (diagnostics: a
    /// mapping that still calls the block NEW is stale).
    data_written: Vec<bool>,
    /// Frees wait for the running transaction's commit ([`Self::release_pending`]).
    persistent: bool,
    /// Blocks freed in the running transaction.
    pending: Vec<u64>,
    /// Blocks whose allocation changed since the last commit (their bitmap bits).
    changed: BTreeSet<u64>,
    /// Made by [`Self::mounted`]: every block free at mount counts as freed.
    mounted: bool,
}

/// Owner file block of an inode's extent-chain blocks (metadata, not file data): the chain's
/// `k`-th block is owned as file block `CHAIN_FBLOCK + k`.
pub const CHAIN_FBLOCK: u64 = u64::MAX / 2;

impl Allocator {
    /// An allocator for device blocks `[first, blocks)`; blocks below `first` are reserved.
    pub fn new(first: u64, blocks: u64) -> Self {
        Allocator {
            blocks,
            owner: Vec::new(),
            freed: BTreeSet::new(),
            never_used: first,
            data_written: Vec::new(),
            persistent: false,
            pending: Vec::new(),
            changed: BTreeSet::new(),
            mounted: false,
        }
    }

    /// An allocator for a mounted filesystem: blocks `[first, blocks)`, with `owned` the blocks
    /// in use and who owns them. Frees wait for commits.
    pub fn mounted(first: u64, blocks: u64, owned: &[(u64, Owner)]) -> Self {
        let mut a = Allocator::new(first, blocks);
        a.persistent = true;
        a.owner = vec![None; blocks as usize];
        for &(b, o) in owned {
            a.owner[b as usize] = Some(o);
        }
        // The free blocks below the last one in use are `freed`; those above it are handed
        // out in order from `never_used`: the same lowest-first order as one set of every
        // free block, without building it at each mount (a twentieth of checking a crash
        // state). `is_freed` counts the blocks above as freed, as they were at mount.
        let end = owned
            .iter()
            .map(|&(b, _)| b + 1)
            .max()
            .unwrap_or(first)
            .max(first);
        a.never_used = end;
        a.mounted = true;
        a.freed = (first..end)
            .filter(|&b| a.owner[b as usize].is_none())
            .collect();
        a
    }

    /// Whether `block` is allocated.
    pub fn used(&self, block: u64) -> bool {
        self.owner(block).is_some()
    }

    /// The blocks freed in the running transaction become allocatable: it committed.
    pub fn release_pending(&mut self) {
        self.freed.extend(self.pending.drain(..));
    }

    /// Blocks freed in the running transaction.
    pub fn pending_frees(&self) -> &[u64] {
        &self.pending
    }

    /// Blocks whose allocation changed since the last call, ascending.
    pub fn take_changed(&mut self) -> BTreeSet<u64> {
        std::mem::take(&mut self.changed)
    }

    pub fn free_blocks(&self) -> u64 {
        self.blocks - self.never_used + self.freed.len() as u64
    }

    /// Allocate one block for (ino, fblock); None when the device is full.
    pub fn alloc(&mut self, owner: Owner) -> Option<u64> {
        let b = if let Some(b) = self.freed.pop_first() {
            b
        } else if self.never_used < self.blocks {
            self.never_used += 1;
            self.never_used - 1
        } else {
            return None;
        };
        let i = b as usize;
        if self.owner.len() <= i {
            self.owner.resize(i + 1, None);
        }
        self.owner[i] = Some(owner);
        if let Some(w) = self.data_written.get_mut(i) {
            *w = false;
        }
        if self.persistent {
            self.changed.insert(b);
        }
        Some(b)
    }

    pub fn free(&mut self, block: u64) {
        let slot = self.owner.get_mut(block as usize).and_then(Option::take);
        assert!(slot.is_some(), "double free of block {block}");
        if self.persistent {
            self.changed.insert(block);
            self.pending.push(block);
        } else {
            self.freed.insert(block);
        }
    }

    pub fn owner(&self, block: u64) -> Option<Owner> {
        self.owner.get(block as usize).copied().flatten()
    }

    pub fn mark_data_written(&mut self, block: u64) {
        let i = block as usize;
        if self.data_written.len() <= i {
            self.data_written.resize(i + 1, false);
        }
        self.data_written[i] = true;
    }

    pub fn data_written(&self, block: u64) -> bool {
        self.data_written
            .get(block as usize)
            .copied()
            .unwrap_or(false)
    }

    /// Was this block freed and not reallocated since?
    pub fn is_freed(&self, block: u64) -> bool {
        self.freed.contains(&block)
            || self.pending.contains(&block)
            || (self.mounted && block >= self.never_used && block < self.blocks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_blocks_are_reused_lowest_first_and_tracked() {
        let mut a = Allocator::new(1, 10);
        let o = Owner { ino: 0, fblock: 0 };
        let b1 = a.alloc(o).unwrap();
        let b2 = a.alloc(o).unwrap();
        assert_eq!((b1, b2), (1, 2));
        a.free(b2);
        a.free(b1);
        assert!(a.is_freed(1) && a.owner(1).is_none());
        assert_eq!(a.alloc(Owner { ino: 1, fblock: 3 }), Some(1));
        assert_eq!(a.owner(1), Some(Owner { ino: 1, fblock: 3 }));
        assert_eq!(a.free_blocks(), 8);
    }

    /// A mounted allocator keeps only the free blocks below the last one in use as a set:
    /// it must still hand out the lowest free block each time, count every free block, and
    /// call every block free at mount freed, as one set of them all did.
    #[test]
    fn a_mounted_allocator_hands_out_the_lowest_free_block() {
        let o = Owner { ino: 0, fblock: 0 };
        for owned in [vec![], vec![4], vec![2, 3, 7], vec![9], vec![2, 5, 6, 8, 9]] {
            let pairs: Vec<(u64, Owner)> = owned.iter().map(|&b| (b, o)).collect();
            let mut a = Allocator::mounted(2, 10, &pairs);
            let mut free: Vec<u64> = (2..10).filter(|b| !owned.contains(b)).collect();
            assert_eq!(a.free_blocks(), free.len() as u64, "{owned:?}");
            for &b in &free {
                assert!(a.is_freed(b), "{owned:?}: block {b} free at mount");
            }
            for &b in &owned {
                assert!(!a.is_freed(b), "{owned:?}: block {b} in use");
            }
            // Free one block (an owned one, else one just handed out): it comes back.
            let freed = match owned.first() {
                Some(&b) => b,
                None => a.alloc(o).unwrap(),
            };
            a.free(freed);
            a.release_pending();
            if !free.contains(&freed) {
                free.push(freed);
            }
            free.sort_unstable();
            let handed: Vec<u64> = std::iter::from_fn(|| a.alloc(o)).collect();
            assert_eq!(handed, free, "{owned:?}");
        }
    }
}
