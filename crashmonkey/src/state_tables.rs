//! The two things crash-state generation remembers from one epoch to the next, kept in files
//! rather than in memory, so that its memory stays bounded however long the log and however
//! large the disk ([`crate::states::STATE_MEMORY_BYTES_MAX`]):
//! - [`SectorHashes`]: the content hash of every sector the prefix has written (16 bytes a
//!   sector, at `16 * sector` in the file). Its pages stay in memory while they take at most
//!   [`SECTOR_HASHES_MEMORY_BYTES_MAX`] (64 MiB, a 2 GiB disk written all over), then all move
//!   to the file: a `pread`/`pwrite` per run of sectors was a sixth of crash-state generation
//!   on such a disk. (As a map of every sector ever written it was 281 MB of a 1 GiB disk
//!   filled by fio, growing with the log.)
//! - [`SeenStates`]: the content hash of every unique state and the id of the first state
//!   with it (an open-addressing hash table on disk), growing with the number of states.
//!
//! Both files are unlinked temporaries (`O_TMPFILE` where the filesystem has it): they go
//! when the generator does, on every exit. They are read and written with `pread`/`pwrite`
//! in runs, never mapped, so what the kernel caches of them is its page cache, not ours.
//!
//! On disk a slot of zero bytes is an empty slot: files are sparse and a hole reads as zeros.
//! A sector's hash is an XXH3-128 output, never all zeros in practice (asserted when written); a
//! state's slot stores its id plus one, never zero.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use fs_core::block::BlockMap;

use crate::sector_hash::{SectorHash, Sum};

/// Bytes of one sector's slot in [`SectorHashes`].
const SECTOR_SLOT_BYTES: u64 = crate::sector_hash::SECTOR_HASH_BYTES as u64;
/// Sectors read or written with one call, at most (the buffer is 64 KiB).
const RUN_SECTORS_MAX: u64 = 2048;

/// Memory the in-memory pages of a [`SectorHashes`] may take, at most; past it they move to
/// its file.
pub const SECTOR_HASHES_MEMORY_BYTES_MAX: u64 = 64 << 20;
/// The bound in effect: [`SECTOR_HASHES_MEMORY_BYTES_MAX`], or
/// `CRASHMONKEY_SECTOR_HASHES_MEMORY_BYTES` when set (so that a test can make a small disk's
/// table move to its file).
fn sector_hashes_memory_bytes_max() -> u64 {
    crate::limit_from_env(
        "CRASHMONKEY_SECTOR_HASHES_MEMORY_BYTES",
        SECTOR_HASHES_MEMORY_BYTES_MAX,
    )
}

/// Sectors per in-memory page of a [`SectorHashes`] (64 KiB a page).
const PAGE_SECTORS: u64 = 4096;

/// The prefix's hash of each sector it has written, in memory pages, then in a file. See the
/// module docs.
pub struct SectorHashes {
    file: File,
    /// Page `i` (its key) holds sectors `i * PAGE_SECTORS..`, in a map so that memory grows
    /// with the pages written, not with the highest sector; `None` once the table is in the
    /// file.
    pages: Option<BlockMap<Box<[SectorHash]>>>,
    /// How many pages may be allocated before the table moves to the file.
    pages_max: u64,
}

/// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as zeros.
fn read_zero_filled(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Runs of consecutive sectors in `sorted` (ascending, distinct), at most
/// [`RUN_SECTORS_MAX`] long: (index of its first sector in `sorted`, length).
fn runs(sorted: &[u64]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (i, &s) in sorted.iter().enumerate() {
        match out.last_mut() {
            Some((start, len))
                if sorted[*start] + *len as u64 == s && (*len as u64) < RUN_SECTORS_MAX =>
            {
                *len += 1
            }
            _ => out.push((i, 1)),
        }
    }
    out
}

impl SectorHashes {
    /// An empty table (no sector written), with its file (unlinked) in `dir`.
    pub fn new(dir: &Path) -> io::Result<Self> {
        Self::with_memory_max(dir, sector_hashes_memory_bytes_max())
    }

    /// As [`Self::new`], its pages in memory while they take at most `bytes`.
    pub fn with_memory_max(dir: &Path, bytes: u64) -> io::Result<Self> {
        Ok(SectorHashes {
            file: tempfile::tempfile_in(dir)?,
            pages: Some(BlockMap::default()),
            pages_max: bytes / (PAGE_SECTORS * SECTOR_SLOT_BYTES),
        })
    }

    /// Whether the table has moved to its file.
    pub fn in_file(&self) -> bool {
        self.pages.is_none()
    }

    /// The hashes of those of `sectors` (ascending, distinct) that the prefix has written.
    pub fn get_many(&self, sectors: &[u64]) -> io::Result<BlockMap<SectorHash>> {
        debug_assert!(sectors.windows(2).all(|w| w[0] < w[1]));
        let mut out = BlockMap::default();
        out.reserve(sectors.len());
        if let Some(pages) = &self.pages {
            for &s in sectors {
                let page = pages.get(&(s / PAGE_SECTORS));
                if let Some(h) = page.map(|p| p[(s % PAGE_SECTORS) as usize]) {
                    if h.iter().any(|&b| b != 0) {
                        out.insert(s, h);
                    }
                }
            }
            return Ok(out);
        }
        let mut buf = vec![0u8; (RUN_SECTORS_MAX * SECTOR_SLOT_BYTES) as usize];
        for (start, len) in runs(sectors) {
            let bytes = &mut buf[..len * SECTOR_SLOT_BYTES as usize];
            read_zero_filled(&self.file, bytes, sectors[start] * SECTOR_SLOT_BYTES)?;
            for (k, slot) in bytes.chunks_exact(SECTOR_SLOT_BYTES as usize).enumerate() {
                if slot.iter().any(|&b| b != 0) {
                    out.insert(
                        sectors[start + k],
                        slot.try_into().expect("a slot is a hash"),
                    );
                }
            }
        }
        Ok(out)
    }

    /// Sets the hashes of `entries`' sectors (ascending, distinct).
    pub fn put_many(&mut self, entries: &[(u64, SectorHash)]) -> io::Result<()> {
        for (_, h) in entries {
            assert!(h.iter().any(|&b| b != 0), "a zero hash reads as no hash");
        }
        if self.pages.is_some() && !self.pages_fit(entries) {
            self.move_to_file()?;
        }
        let Some(pages) = &mut self.pages else {
            return self.put_in_file(entries);
        };
        for &(s, h) in entries {
            let page = pages.entry(s / PAGE_SECTORS).or_insert_with(|| {
                vec![[0u8; SECTOR_SLOT_BYTES as usize]; PAGE_SECTORS as usize].into_boxed_slice()
            });
            page[(s % PAGE_SECTORS) as usize] = h;
        }
        Ok(())
    }

    /// Whether the pages `entries` need, with those allocated, stay within the bound.
    fn pages_fit(&self, entries: &[(u64, SectorHash)]) -> bool {
        let pages = self.pages.as_ref().expect("in memory");
        let mut new_pages = 0;
        let mut last = None;
        for &(s, _) in entries {
            let i = s / PAGE_SECTORS;
            if last != Some(i) && !pages.contains_key(&i) {
                new_pages += 1;
            }
            last = Some(i);
        }
        pages.len() as u64 + new_pages <= self.pages_max
    }

    /// Writes every in-memory page to the file, which holds the table from then on.
    fn move_to_file(&mut self) -> io::Result<()> {
        let pages = self.pages.as_ref().expect("in memory");
        let mut buf = Vec::with_capacity((PAGE_SECTORS * SECTOR_SLOT_BYTES) as usize);
        for (&i, page) in pages {
            buf.clear();
            page.iter().for_each(|h| buf.extend_from_slice(h));
            let at = i * PAGE_SECTORS * SECTOR_SLOT_BYTES;
            self.file.write_all_at(&buf, at)?;
        }
        self.pages = None;
        Ok(())
    }

    fn put_in_file(&self, entries: &[(u64, SectorHash)]) -> io::Result<()> {
        let sectors: Vec<u64> = entries.iter().map(|e| e.0).collect();
        let mut buf = Vec::with_capacity((RUN_SECTORS_MAX * SECTOR_SLOT_BYTES) as usize);
        for (start, len) in runs(&sectors) {
            buf.clear();
            for (_, h) in &entries[start..start + len] {
                buf.extend_from_slice(h);
            }
            self.file
                .write_all_at(&buf, sectors[start] * SECTOR_SLOT_BYTES)?;
        }
        Ok(())
    }
}

/// Bytes of one slot of [`SeenStates`]: the sum (4 x 8 bytes) and the id plus one (8 bytes),
/// little-endian.
const SEEN_SLOT_BYTES: u64 = 40;
/// Slots of a new [`SeenStates`] table; it doubles when half full.
const SEEN_SLOTS_MIN: u64 = 4096;
/// Slots read at a time when the table is copied into a larger one.
const SEEN_COPY_SLOTS: u64 = 4096;

/// The first state of each content hash, in an on-disk hash table. See the module docs.
pub struct SeenStates {
    file: File,
    slots: u64,
    used: u64,
    dir: std::path::PathBuf,
}

fn encode_slot(sum: &Sum, id: usize) -> [u8; SEEN_SLOT_BYTES as usize] {
    let mut out = [0u8; SEEN_SLOT_BYTES as usize];
    for (i, lane) in sum.iter().enumerate() {
        out[i * 8..i * 8 + 8].copy_from_slice(&lane.to_le_bytes());
    }
    out[32..].copy_from_slice(&(id as u64 + 1).to_le_bytes());
    out
}

/// The sum and id a slot holds, or `None` for an empty slot.
fn decode_slot(slot: &[u8]) -> Option<(Sum, usize)> {
    let word = |i: usize| u64::from_le_bytes(slot[i * 8..i * 8 + 8].try_into().expect("8"));
    let id = word(4).checked_sub(1)?;
    Some(([word(0), word(1), word(2), word(3)], id as usize))
}

impl SeenStates {
    /// An empty table in an unlinked file in `dir`.
    pub fn new(dir: &Path) -> io::Result<Self> {
        Self::with_slots(dir, SEEN_SLOTS_MIN)
    }

    fn with_slots(dir: &Path, slots: u64) -> io::Result<Self> {
        Ok(SeenStates {
            file: tempfile::tempfile_in(dir)?,
            slots,
            used: 0,
            dir: dir.to_path_buf(),
        })
    }

    /// The id of the first state with content `sum`, if there was one; otherwise `id` is
    /// remembered as that first state and `None` returned.
    pub fn first_or_insert(&mut self, sum: &Sum, id: usize) -> io::Result<Option<usize>> {
        let mut at = sum[0] % self.slots;
        let mut slot = [0u8; SEEN_SLOT_BYTES as usize];
        loop {
            read_zero_filled(&self.file, &mut slot, at * SEEN_SLOT_BYTES)?;
            match decode_slot(&slot) {
                Some((s, first)) if s == *sum => return Ok(Some(first)),
                Some(_) => at = (at + 1) % self.slots,
                None => break,
            }
        }
        self.file
            .write_all_at(&encode_slot(sum, id), at * SEEN_SLOT_BYTES)?;
        self.used += 1;
        if self.used * 2 > self.slots {
            self.grow()?;
        }
        Ok(None)
    }

    /// Copies every entry into a table twice as large (half full makes probes short).
    fn grow(&mut self) -> io::Result<()> {
        let mut bigger = SeenStates::with_slots(&self.dir, self.slots * 2)?;
        let mut buf = vec![0u8; (SEEN_COPY_SLOTS * SEEN_SLOT_BYTES) as usize];
        let mut at = 0;
        while at < self.slots {
            let n = SEEN_COPY_SLOTS.min(self.slots - at);
            let bytes = &mut buf[..(n * SEEN_SLOT_BYTES) as usize];
            read_zero_filled(&self.file, bytes, at * SEEN_SLOT_BYTES)?;
            for slot in bytes.chunks_exact(SEEN_SLOT_BYTES as usize) {
                if let Some((sum, id)) = decode_slot(slot) {
                    let earlier = bigger.first_or_insert(&sum, id)?;
                    assert!(earlier.is_none(), "a table holds each sum once");
                }
            }
            at += n;
        }
        *self = bigger;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(t: &SectorHashes, sectors: &[u64]) -> Vec<(u64, SectorHash)> {
        let mut got: Vec<_> = t.get_many(sectors).unwrap().into_iter().collect();
        got.sort_unstable();
        got
    }

    /// In memory, in the file from the start, and moved to the file on the way (its third
    /// page passes a bound of two): the same answers.
    #[test]
    fn sector_hashes_read_back_and_holes_are_absent() {
        let dir = tempfile::tempdir().unwrap();
        let page_bytes = PAGE_SECTORS * SECTOR_SLOT_BYTES;
        let h = |b: u8| [b; SECTOR_SLOT_BYTES as usize];
        // The last sector of a 1 TiB disk: one more page in memory, not a table up to it.
        let far = (1u64 << 40) / 512 - 1;
        for (max, moves) in [
            (SECTOR_HASHES_MEMORY_BYTES_MAX, false),
            (0, true),
            (2 * page_bytes, true),
        ] {
            let mut t = SectorHashes::with_memory_max(dir.path(), max).unwrap();
            t.put_many(&[(3, h(1)), (4, h(2)), (5000, h(3))]).unwrap();
            t.put_many(&[(4, h(9))]).unwrap();
            assert_eq!(t.in_file(), max == 0, "bound {max}");
            let probe = [0, 3, 4, 5, 4999, 5000, far, 1 << 30];
            assert_eq!(sorted(&t, &probe), vec![(3, h(1)), (4, h(9)), (5000, h(3))]);
            t.put_many(&[(5, h(4)), (far, h(5))]).unwrap();
            assert_eq!(t.in_file(), moves, "bound {max}");
            let pages = t.pages.as_ref().map(|p| p.len());
            assert_eq!(pages, (!moves).then_some(3), "pages 0, 1 and the far one's");
            let want = vec![(3, h(1)), (4, h(9)), (5, h(4)), (5000, h(3)), (far, h(5))];
            assert_eq!(sorted(&t, &probe), want, "bound {max}");
        }
    }

    #[test]
    fn runs_split_at_gaps_and_at_the_run_limit() {
        let long: Vec<u64> = (10..10 + RUN_SECTORS_MAX + 1).collect();
        assert_eq!(runs(&long), vec![(0, RUN_SECTORS_MAX as usize), (2048, 1)]);
        assert_eq!(runs(&[1, 2, 4]), vec![(0, 2), (2, 1)]);
    }

    /// The on-disk table against a HashMap, through several doublings, the zero sum (the
    /// initial state's) included.
    #[test]
    fn seen_states_agree_with_a_map() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = SeenStates::new(dir.path()).unwrap();
        let mut model = std::collections::HashMap::new();
        for i in 0..20_000usize {
            // Every third sum repeats an earlier one; pairs of sums share lane 0 (the slot).
            let k = if i % 3 == 0 { i / 7 } else { i } as u64;
            let sum = [(k / 2).wrapping_mul(0x9E37_79B9_7F4A_7C15), k, 0, 0];
            let want = model.get(&sum).copied();
            if want.is_none() {
                model.insert(sum, i);
            }
            assert_eq!(t.first_or_insert(&sum, i).unwrap(), want, "state {i}");
        }
        assert!(t.slots > SEEN_SLOTS_MIN);
    }
}
