//! The index of one inode's page cache: folio index -> folio, in index order. Like the
//! kernel's xarray (`mapping->i_pages`, a radix tree of 64-slot nodes), it keeps the folios in
//! chunks of [`CHUNK_FOLIOS`] consecutive indexes, one slot each, found through an ordered map
//! of the chunks. A lookup descends a tree of a sixty-fourth as many entries and indexes a
//! slot; a folio coming or going changes one slot. A B-tree of the folios themselves took
//! about a fifth of the fscore export's engine thread under 4 KiB random writes, in searches
//! of its nodes and in moving folios within them.

use crate::pagecache::Folio;
use std::collections::BTreeMap;

/// Consecutive folio indexes one chunk holds (`XA_CHUNK_SIZE`).
pub const CHUNK_FOLIOS: u64 = 64;

/// The slots of one chunk.
type Slots = [Option<Box<Folio>>; CHUNK_FOLIOS as usize];

/// Folios by index, in index order.
#[derive(Clone, Debug, Default)]
pub struct FolioMap {
    /// Chunk number (index / [`CHUNK_FOLIOS`]) -> its slots; a chunk with no folio is removed.
    chunks: BTreeMap<u64, Chunk>,
    len: usize,
}

#[derive(Clone, Debug)]
struct Chunk {
    slots: Box<Slots>,
    used: usize,
}

/// Chunk number and slot of folio index `idx`.
fn split(idx: u64) -> (u64, usize) {
    (idx / CHUNK_FOLIOS, (idx % CHUNK_FOLIOS) as usize)
}

/// The folios of one chunk, `(index, folio)` in index order, from slot `from` to slot `to`
/// (exclusive).
fn chunk_folios(
    c: u64,
    chunk: &Chunk,
    from: usize,
    to: usize,
) -> impl DoubleEndedIterator<Item = (u64, &Folio)> {
    chunk.slots[from..to]
        .iter()
        .enumerate()
        .filter_map(move |(i, s)| {
            s.as_deref()
                .map(|f| (c * CHUNK_FOLIOS + (from + i) as u64, f))
        })
}

impl FolioMap {
    pub fn get(&self, idx: u64) -> Option<&Folio> {
        let (c, s) = split(idx);
        self.chunks.get(&c)?.slots[s].as_deref()
    }

    pub fn get_mut(&mut self, idx: u64) -> Option<&mut Folio> {
        let (c, s) = split(idx);
        self.chunks.get_mut(&c)?.slots[s].as_deref_mut()
    }

    pub fn contains_key(&self, idx: u64) -> bool {
        self.get(idx).is_some()
    }

    /// Puts `f` at `idx`; returns the folio that was there.
    pub fn insert(&mut self, idx: u64, f: Box<Folio>) -> Option<Box<Folio>> {
        let (c, s) = split(idx);
        let chunk = self.chunks.entry(c).or_insert_with(|| Chunk {
            slots: Box::new(std::array::from_fn(|_| None)),
            used: 0,
        });
        let old = chunk.slots[s].replace(f);
        if old.is_none() {
            chunk.used += 1;
            self.len += 1;
        }
        old
    }

    /// Takes the folio at `idx` out.
    pub fn remove(&mut self, idx: u64) -> Option<Box<Folio>> {
        let (c, s) = split(idx);
        let chunk = self.chunks.get_mut(&c)?;
        let f = chunk.slots[s].take()?;
        chunk.used -= 1;
        self.len -= 1;
        if chunk.used == 0 {
            self.chunks.remove(&c);
        }
        Some(f)
    }

    /// Folios at indexes `[from, to)`, in index order.
    pub fn range(&self, from: u64, to: u64) -> impl Iterator<Item = (u64, &Folio)> {
        let chunks = (from < to).then(|| {
            self.chunks
                .range(from / CHUNK_FOLIOS..=(to - 1) / CHUNK_FOLIOS)
        });
        chunks.into_iter().flatten().flat_map(move |(&c, chunk)| {
            let lo = c * CHUNK_FOLIOS;
            let first = from.saturating_sub(lo).min(CHUNK_FOLIOS) as usize;
            let end = (to - lo).min(CHUNK_FOLIOS) as usize;
            chunk_folios(c, chunk, first, end)
        })
    }

    /// The folio at the highest index at or below `idx`.
    pub fn last_at_or_before(&self, idx: u64) -> Option<(u64, &Folio)> {
        let (last, s) = split(idx);
        self.chunks.range(..=last).rev().find_map(|(&c, chunk)| {
            let end = if c == last {
                s + 1
            } else {
                CHUNK_FOLIOS as usize
            };
            chunk_folios(c, chunk, 0, end).next_back()
        })
    }

    /// Every folio, `(index, folio)` in index order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Folio)> {
        self.range(0, u64::MAX)
    }

    /// Every folio, in index order.
    pub fn values(&self) -> impl Iterator<Item = &Folio> {
        self.iter().map(|(_, f)| f)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn folio(gen: u64) -> Box<Folio> {
        Box::new(Folio::new(0, gen, 1))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Inserts and removes at indexes within and across chunks: every query answers as a
        /// `BTreeMap` of the same folios does.
        #[test]
        fn answers_as_an_ordered_map_does(
            ops in prop::collection::vec((any::<bool>(), 0u64..400), 1..200),
            asks in prop::collection::vec((0u64..450, 0u64..450), 1..20),
        ) {
            let (mut m, mut model) = (FolioMap::default(), BTreeMap::new());
            for (n, (put, idx)) in ops.into_iter().enumerate() {
                let gen = n as u64;
                if put {
                    let old = m.insert(idx, folio(gen)).map(|f| f.gen);
                    prop_assert_eq!(old, model.insert(idx, gen));
                } else {
                    prop_assert_eq!(m.remove(idx).map(|f| f.gen), model.remove(&idx));
                }
                prop_assert_eq!(m.len(), model.len());
            }
            let gens = |it: Vec<(u64, &Folio)>| it.into_iter().map(|(i, f)| (i, f.gen)).collect::<Vec<_>>();
            let want: Vec<(u64, u64)> = model.iter().map(|(&i, &g)| (i, g)).collect();
            prop_assert_eq!(gens(m.iter().collect()), want);
            for (a, b) in asks {
                let want: Vec<(u64, u64)> = model.range(a..b.max(a)).map(|(&i, &g)| (i, g)).collect();
                prop_assert_eq!(gens(m.range(a, b).collect()), want);
                let last = model.range(..=a).next_back().map(|(&i, &g)| (i, g));
                prop_assert_eq!(m.last_at_or_before(a).map(|(i, f)| (i, f.gen)), last);
                prop_assert_eq!(m.get(a).map(|f| f.gen), model.get(&a).copied());
                prop_assert_eq!(m.contains_key(b), model.contains_key(&b));
            }
            prop_assert_eq!(m.is_empty(), model.is_empty());
        }
    }

    /// A chunk whose last folio goes is dropped: a cache emptied holds no memory.
    #[test]
    fn an_emptied_chunk_is_dropped() {
        let mut m = FolioMap::default();
        m.insert(5, folio(1));
        m.insert(70, folio(2));
        assert_eq!(m.chunks.len(), 2);
        m.remove(5);
        assert_eq!(m.chunks.len(), 1);
        m.remove(70);
        assert!(m.chunks.is_empty() && m.is_empty());
    }
}
