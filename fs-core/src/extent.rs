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
    /// Which blocks continue the run of the block before them ([`continues`]).
    runs: RunBits,
    seq: u64,
}

/// Whether `cur` continues the run `prev` is in: the same state and, for allocated blocks,
/// the next device block.
fn continues(prev: Extent, cur: Extent) -> bool {
    let allocated = matches!(cur.state, ExtentState::Unwritten | ExtentState::Written);
    cur.state == prev.state && (!allocated || prev.addr.checked_add(1) == Some(cur.addr))
}

/// Blocks one word of [`RunBits`] covers.
const WORD_BLOCKS: u64 = 64;
/// Words of [`RunBits::words`] one bit of [`RunBits::full`] stands for.
const FULL_BIT_WORDS: usize = 64;

/// One bit per block of an [`ExtentMap`], set when the block continues the run of the one
/// before it, and one bit per word of those with all 64 set, so that [`ExtentMap::run_at`]
/// measures a run a word (64 blocks) or a full word's worth of words (4,096 blocks) at a
/// time. Walking the blocks one by one took 6% of the fscore export's engine thread under
/// 4 KiB random writes, whose writeback maps runs of about 300 blocks, and grew with the
/// file (a file written in order is one run).
#[derive(Clone, Debug, Default)]
struct RunBits {
    words: Vec<u64>,
    full: Vec<u64>,
}

impl RunBits {
    /// Sets bit `i` to `on`.
    fn put(&mut self, i: u64, on: bool) {
        let (w, b) = ((i / WORD_BLOCKS) as usize, i % WORD_BLOCKS);
        if self.words.len() <= w {
            self.words.resize(w + 1, 0);
            self.full.resize(w / FULL_BIT_WORDS + 1, 0);
        }
        if on {
            self.words[w] |= 1 << b;
        } else {
            self.words[w] &= !(1 << b);
        }
        let (fw, fb) = (w / FULL_BIT_WORDS, w % FULL_BIT_WORDS);
        if self.words[w] == u64::MAX {
            self.full[fw] |= 1 << fb;
        } else {
            self.full[fw] &= !(1 << fb);
        }
    }

    /// How many bits in a row are set from bit `from` on, counting up to bit `end` at most.
    fn ones_from(&self, from: u64, end: u64) -> u64 {
        let mut i = from;
        while i < end {
            let (w, b) = ((i / WORD_BLOCKS) as usize, i % WORD_BLOCKS);
            if b == 0 {
                let (fw, fb) = (w / FULL_BIT_WORDS, w % FULL_BIT_WORDS);
                let full = self.full.get(fw).map_or(0, |&x| x >> fb);
                let full_words = u64::from((!full).trailing_zeros());
                if full_words > 0 {
                    i += full_words * WORD_BLOCKS;
                    continue;
                }
            }
            let word = self.words.get(w).map_or(0, |&x| x >> b);
            let ones = u64::from((!word).trailing_zeros());
            if ones < WORD_BLOCKS - b {
                return (i + ones).min(end) - from;
            }
            i += WORD_BLOCKS - b;
        }
        end - from
    }
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
        let (i, old_len) = (block as usize, self.blocks.len());
        if old_len <= i {
            self.blocks.resize(i + 1, Extent::HOLE);
            // The new holes continue one another, and the block before them if a hole.
            for b in old_len.max(1)..i {
                self.runs
                    .put(b as u64, continues(self.blocks[b - 1], Extent::HOLE));
            }
        }
        self.blocks[i] = ext;
        for b in [i, i + 1] {
            if b >= 1 && b < self.blocks.len() {
                self.runs
                    .put(b as u64, continues(self.blocks[b - 1], self.blocks[b]));
            }
        }
        self.seq += 1;
    }

    /// The run starting at `block`, at most `max_len` blocks long (one block at least).
    /// Blocks past the last recorded one are a hole without end.
    pub fn run_at(&self, block: u64, max_len: u64) -> Run {
        let (first, span) = (self.get(block), self.span());
        let len = if block >= span {
            max_len.max(1)
        } else {
            let limit = max_len.max(1).min(span - block);
            let len = 1 + self.runs.ones_from(block + 1, block + limit);
            let to_the_end = len == span - block && first.state == ExtentState::Hole;
            if to_the_end {
                len.max(max_len)
            } else {
                len
            }
        };
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
    use proptest::prelude::*;

    /// What [`ExtentMap::run_at`] must return: the blocks walked one by one.
    fn run_walking(m: &ExtentMap, block: u64, max_len: u64) -> Run {
        let first = m.get(block);
        let mut len = 1;
        while len < max_len {
            let e = m.get(block + len);
            let allocated = matches!(first.state, ExtentState::Unwritten | ExtentState::Written);
            if e.state != first.state || (allocated && e.addr != first.addr + len) {
                break;
            }
            if !allocated && block + len >= m.span() && first.state == ExtentState::Hole {
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

    fn state(i: u8) -> ExtentState {
        [
            ExtentState::Hole,
            ExtentState::Delalloc,
            ExtentState::Unwritten,
            ExtentState::Written,
        ][usize::from(i % 4)]
    }

    /// Every run asked of `m`, from every block up to past its end, at several lengths.
    fn assert_runs_match(m: &ExtentMap, max_lens: &[u64]) {
        for b in 0..m.span() + 70 {
            for &n in max_lens {
                assert_eq!(m.run_at(b, n), run_walking(m, b, n), "block {b}, max {n}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Mappings set in any order, mostly in runs of contiguous device blocks (as the
        /// allocator gives them), over and over: the runs measured by the bit index are the
        /// runs walked block by block.
        #[test]
        fn runs_measured_by_bits_are_the_runs_walked(
            sets in prop::collection::vec((0u64..400, 0u8..4, 0u64..3, 1u64..90), 1..40)
        ) {
            let mut m = ExtentMap::default();
            for (start, st, gap, len) in sets {
                for b in start..start + len {
                    m.set(b, Extent { state: state(st), addr: 1000 + b + gap * (b % 7) });
                }
            }
            assert_runs_match(&m, &[0, 1, 2, 63, 64, 65, 130, 1000]);
        }
    }

    /// A run of many thousand blocks (measured a summary word at a time), cut in the middle
    /// and mended again.
    #[test]
    fn a_long_run_is_measured_through_the_summary_bits() {
        let mut m = ExtentMap::default();
        let written = |addr| Extent {
            state: ExtentState::Written,
            addr,
        };
        for b in 0..20_000 {
            m.set(b, written(5000 + b));
        }
        assert_eq!(m.run_at(3, u64::MAX).len, 19_997);
        assert_eq!(m.run_at(0, 9000).len, 9000);
        m.set(12_345, written(7));
        assert_eq!(m.run_at(100, u64::MAX).len, 12_245);
        assert_eq!(m.run_at(12_345, u64::MAX).len, 1);
        assert_eq!(m.run_at(12_346, u64::MAX).len, 20_000 - 12_346);
        m.set(12_345, written(5000 + 12_345));
        assert_eq!(m.run_at(0, u64::MAX).len, 20_000);
        m.set(30_000, Extent::DELALLOC);
        assert_eq!(m.run_at(20_000, u64::MAX).len, 10_000);
        assert_eq!(m.run_at(30_001, 77).len, 77);
        assert_runs_match(&m, &[1, 4096, u64::MAX]);
    }

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
