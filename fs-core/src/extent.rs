//! Per-inode extent map: the state of every file block, and the sequence number (`seq`)
//! bumped on every change, which is what an iomap's validity cookie is compared with.

use serde::{Deserialize, Serialize};

/// Largest file the model handles, in blocks: 4 GiB, so that an NBD export can be a file of
/// fs-core (nbd-server's `fscore=` exports). Every per-block vector stays bounded by it (an
/// extent map of a full file takes 16 MiB).
pub const FILE_BLOCKS_MAX: u64 = 1 << 20;

/// The state of one file block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExtentState {
    /// Nothing allocated; reads as zeros.
    Hole,
    /// Space reserved in memory only; no block yet. Must sit under a dirty folio.
    Delalloc,
    /// A block is allocated but holds no data yet; reads as zeros.
    Unwritten,
    /// A block holding the file's data.
    Written,
}

/// One block's mapping: its state and, for `Unwritten`/`Written`, the device block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub state: ExtentState,
    pub addr: u64,
}

impl Extent {
    pub const HOLE: Extent = Extent {
        state: ExtentState::Hole,
        addr: 0,
    };
    pub const DELALLOC: Extent = Extent {
        state: ExtentState::Delalloc,
        addr: 0,
    };
}

/// A run of blocks with the same state (and contiguous device blocks when allocated).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub start: u64,
    pub len: u64,
    pub state: ExtentState,
    /// Device block of `start` (meaningless for holes and delalloc).
    pub addr: u64,
}

/// Extent map stored per block: files in the model are small, so a vector is simplest.
#[derive(Clone, Debug, Default)]
pub struct ExtentMap {
    blocks: Vec<Extent>,
    seq: u64,
}

impl ExtentMap {
    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn get(&self, block: u64) -> Extent {
        self.blocks
            .get(block as usize)
            .copied()
            .unwrap_or(Extent::HOLE)
    }

    /// Change one block's mapping; bumps `seq` when it changes anything.
    pub fn set(&mut self, block: u64, ext: Extent) {
        assert!(
            block < FILE_BLOCKS_MAX,
            "block {block} beyond FILE_BLOCKS_MAX"
        );
        if self.get(block) == ext {
            return;
        }
        let i = block as usize;
        if self.blocks.len() <= i {
            self.blocks.resize(i + 1, Extent::HOLE);
        }
        self.blocks[i] = ext;
        self.seq += 1;
    }

    /// The run starting at `block`, at most `max_len` blocks long.
    pub fn run_at(&self, block: u64, max_len: u64) -> Run {
        let first = self.get(block);
        let mut len = 1;
        while len < max_len {
            let e = self.get(block + len);
            let allocated = matches!(first.state, ExtentState::Unwritten | ExtentState::Written);
            if e.state != first.state || (allocated && e.addr != first.addr + len) {
                break;
            }
            if !allocated
                && block + len >= self.blocks.len() as u64
                && first.state == ExtentState::Hole
            {
                // Past the last mapped block everything is a hole: extend to max_len at once.
                len = max_len;
                break;
            }
            len += 1;
        }
        Run {
            start: block,
            len,
            state: first.state,
            addr: first.addr,
        }
    }

    /// Number of blocks with a recorded mapping (the rest are holes).
    pub fn span(&self) -> u64 {
        self.blocks.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_changes_only_on_real_changes_and_runs_coalesce() {
        let mut m = ExtentMap::default();
        m.set(
            0,
            Extent {
                state: ExtentState::Written,
                addr: 10,
            },
        );
        m.set(
            1,
            Extent {
                state: ExtentState::Written,
                addr: 11,
            },
        );
        m.set(
            2,
            Extent {
                state: ExtentState::Written,
                addr: 20,
            },
        );
        assert_eq!(m.seq(), 3);
        m.set(
            2,
            Extent {
                state: ExtentState::Written,
                addr: 20,
            },
        );
        assert_eq!(m.seq(), 3);
        assert_eq!(
            m.run_at(0, 8),
            Run {
                start: 0,
                len: 2,
                state: ExtentState::Written,
                addr: 10
            }
        );
        assert_eq!(m.run_at(3, 5).len, 5);
        assert_eq!(m.run_at(3, 5).state, ExtentState::Hole);
    }
}
