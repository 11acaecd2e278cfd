//! The volatile write cache: pending writes in apply order plus an extent index for reads.

use std::collections::{BTreeMap, VecDeque};
use std::io;

use crate::backend::{Backend, WriteData};

/// Written-back payload buffers kept for reuse at most.
pub const SPARE_BUFFERS_MAX: usize = 32;
/// Payload buffers at least this large are kept for reuse (smaller ones are cheap to allocate).
pub const SPARE_BUFFER_BYTES_MIN: usize = 64 * 1024;
/// Payload buffers larger than this are freed rather than kept.
pub const SPARE_BUFFER_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Buffers of written-back entries, handed out again for new write payloads: a fresh large
/// allocation costs a page fault per 4 KiB and the unmapping when it is freed.
pub type Spares = std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>;

/// Bytes a zero-range entry counts for, toward the cache limit (its bookkeeping).
const ZERO_ENTRY_BYTES: u64 = 64;

pub enum EntryData {
    /// A write's data, shared with the write log until it has written the record.
    Data(WriteData),
    /// Reads back as zeroes; `trim` says it was a TRIM rather than WRITE_ZEROES.
    Zeroes { trim: bool },
}

pub struct Entry {
    pub id: u64,
    pub offset: u64,
    pub length: u64,
    pub data: EntryData,
    pub log_seq: Option<u64>,
    /// Flush generation when the reply was sent; `None` while in flight.
    pub answered_gen: Option<u64>,
    /// Failed write-backs of this entry (only the first is logged as an error).
    pub failures: u32,
}

impl EntryData {
    /// Bytes this data counts for toward the cache limit.
    pub fn cost(&self) -> u64 {
        match self {
            EntryData::Data(d) => d.len() as u64,
            EntryData::Zeroes { .. } => ZERO_ENTRY_BYTES,
        }
    }
}

impl Entry {
    fn cost(&self) -> u64 {
        self.data.cost()
    }
}

/// A run of bytes whose newest content is in entry `id`, from byte `src` of its data.
#[derive(Clone, Copy)]
struct Extent {
    end: u64,
    id: u64,
    src: u64,
}

pub struct Cache {
    entries: VecDeque<Entry>,
    /// Non-overlapping, keyed by start offset.
    extents: BTreeMap<u64, Extent>,
    bytes: u64,
    bytes_max: u64,
    entries_max: usize,
    next_id: u64,
    spares: Spares,
    /// The export's name, for the log.
    name: String,
}

/// Writes part `[off, off+len)` of `entry` to storage (a power cut's surviving piece).
pub fn write_piece(storage: &dyn Backend, entry: &Entry, off: u64, len: u64) -> io::Result<()> {
    assert!(off >= entry.offset && off + len <= entry.offset + entry.length);
    match &entry.data {
        EntryData::Data(d) => {
            let piece = if (off, len) == (entry.offset, entry.length) {
                d.clone()
            } else {
                d.copy_range((off - entry.offset) as usize, len as usize)
            };
            Ok(storage.write(None, off, piece, false)?)
        }
        EntryData::Zeroes { trim } => zero(storage, *trim, off, len, false),
    }
}

/// Zeroes `[off, off+len)` of storage: a trim where storage can trim and the entry was one.
fn zero(storage: &dyn Backend, trim: bool, off: u64, len: u64, fua: bool) -> io::Result<()> {
    if trim && storage.can_trim() {
        storage.trim(None, off, len, fua)
    } else {
        storage.write_zeroes(None, off, len, false, false, fua)
    }
}

/// Writes all of an entry's data to storage at `offset`; with `fua`, durable there on return.
/// Data held in blocks is handed over, so that storage keeping blocks moves them in once the
/// write log is done with them, and comes back if the write fails; data in one buffer is lent
/// (a clone), so that the buffer comes back to be reused ([`recycle`]) once storage copied it.
/// On success, the buffer to reuse (if any); on failure, the data back with the error.
fn write_entry(
    storage: &dyn Backend,
    offset: u64,
    length: u64,
    data: EntryData,
    fua: bool,
) -> Result<Option<Vec<u8>>, (EntryData, io::Error)> {
    match data {
        EntryData::Zeroes { trim } => zero(storage, trim, offset, length, fua)
            .map(|()| None)
            .map_err(|e| (EntryData::Zeroes { trim }, e)),
        EntryData::Data(d) if d.is_blocks() => storage
            .write(None, offset, d, fua)
            .map(|()| None)
            .map_err(|f| {
                let back = f
                    .data
                    .expect("storage hands back the data of a failed write");
                (EntryData::Data(back), f.error)
            }),
        EntryData::Data(d) => match storage.write(None, offset, d.clone(), fua) {
            Ok(()) => Ok(d.into_bytes()),
            Err(f) => Err((EntryData::Data(d), f.error)),
        },
    }
}

/// Keeps `v` for a later payload if it is worth keeping and the pool has room.
pub fn recycle(spares: &Spares, mut v: Vec<u8>) {
    if (SPARE_BUFFER_BYTES_MIN..=SPARE_BUFFER_BYTES_MAX).contains(&v.capacity()) {
        let mut spares = spares.lock().unwrap_or_else(|e| e.into_inner());
        if spares.len() < SPARE_BUFFERS_MAX {
            v.clear();
            spares.push(v);
        }
    }
}

impl Cache {
    pub fn new(bytes_max: u64, entries_max: usize, name: &str) -> Self {
        Cache {
            name: name.to_owned(),
            entries: VecDeque::new(),
            extents: BTreeMap::new(),
            bytes: 0,
            bytes_max,
            entries_max,
            next_id: 0,
            spares: Spares::default(),
        }
    }

    /// The pool written-back buffers go to.
    pub fn spares(&self) -> Spares {
        self.spares.clone()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Keys of extents overlapping `[s, e)`, in ascending order.
    fn overlapping(&self, s: u64, e: u64) -> Vec<u64> {
        let mut keys: Vec<u64> = self
            .extents
            .range(..e)
            .rev()
            .take_while(|(_, x)| x.end > s)
            .map(|(&k, _)| k)
            .collect();
        keys.reverse();
        keys
    }

    pub fn insert(
        &mut self,
        offset: u64,
        length: u64,
        data: EntryData,
        log_seq: Option<u64>,
        answered_gen: Option<u64>,
    ) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let end = offset + length;
        for k in self.overlapping(offset, end) {
            let x = self.extents.remove(&k).expect("key just listed");
            if k < offset {
                self.extents.insert(k, Extent { end: offset, ..x });
            }
            if x.end > end {
                self.extents.insert(
                    end,
                    Extent {
                        end: x.end,
                        id: x.id,
                        src: x.src + (end - k),
                    },
                );
            }
        }
        if length > 0 {
            self.extents.insert(offset, Extent { end, id, src: 0 });
        }
        let entry = Entry {
            id,
            offset,
            length,
            data,
            log_seq,
            answered_gen,
            failures: 0,
        };
        self.bytes += entry.cost();
        self.entries.push_back(entry);
        id
    }

    fn find(&self, id: u64) -> Option<usize> {
        self.entries.binary_search_by_key(&id, |e| e.id).ok()
    }

    pub fn answered(&mut self, id: u64, gen: u64) {
        if let Some(i) = self.find(id) {
            self.entries[i].answered_gen = Some(gen);
        }
    }

    /// Whether any cached run overlaps `[offset, offset+length)` (no allocation).
    pub fn overlaps(&self, offset: u64, length: u64) -> bool {
        self.extents
            .range(..offset + length)
            .next_back()
            .is_some_and(|(_, x)| x.end > offset)
    }

    /// Copies cached content over `buf`, which holds storage content from `offset`.
    pub fn overlay(&self, offset: u64, buf: &mut [u8]) {
        let end = offset + buf.len() as u64;
        for k in self.overlapping(offset, end) {
            let x = self.extents[&k];
            let s = k.max(offset);
            let e = x.end.min(end);
            let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
            let i = self.find(x.id).expect("extent points at a cached entry");
            match &self.entries[i].data {
                EntryData::Data(d) => d.copy_to((x.src + (s - k)) as usize, dst),
                EntryData::Zeroes { .. } => dst.fill(0),
            }
        }
    }

    /// First cached run overlapping `[offset, offset+length)`, as (start, end, zeroes) where
    /// zeroes is `Some(trim)` for a zero range and `None` for data.
    pub fn first_overlap(&self, offset: u64, length: u64) -> Option<(u64, u64, Option<bool>)> {
        self.overlapping(offset, offset + length).first().map(|k| {
            let x = self.extents[k];
            let i = self.find(x.id).expect("extent points at a cached entry");
            let zeroes = match self.entries[i].data {
                EntryData::Data(_) => None,
                EntryData::Zeroes { trim } => Some(trim),
            };
            (*k, x.end, zeroes)
        })
    }

    /// Writes back the oldest entry, and takes it out of the cache only once storage has it:
    /// a write-back that fails (a full filesystem under a file export) leaves the entry, and
    /// its data, where reads find it and the next write-back retries it. With `fua` the entry
    /// is durable in storage on return.
    fn write_back_front(&mut self, storage: &dyn Backend, fua: bool) -> io::Result<()> {
        let mut entry = self.entries.pop_front().expect("caller checked non-empty");
        let cost = entry.cost();
        // The whole write goes out, even parts a newer cached write covers: storage sees
        // writes in apply order, and the newer one overwrites it when its turn comes.
        let spare = match write_entry(storage, entry.offset, entry.length, entry.data, fua) {
            Ok(spare) => spare,
            Err((data, e)) => {
                entry.data = data;
                entry.failures += 1;
                if entry.failures == 1 {
                    let (start, end) = (entry.offset, entry.offset + entry.length);
                    tracing::error!(
                        export = %self.name,
                        "write-back of bytes {start}..{end} ({} bytes) failed: {e}; the data \
                         stays in the cache, reads return it, and every FLUSH retries it (and \
                         fails) until storage takes it",
                        end - start
                    );
                }
                self.entries.push_front(entry);
                return Err(e);
            }
        };
        if entry.failures > 0 {
            tracing::info!(
                export = %self.name,
                "bytes {}..{} written back after {} failed attempts",
                entry.offset,
                entry.offset + entry.length,
                entry.failures
            );
        }
        let end = entry.offset + entry.length;
        for k in self.overlapping(entry.offset, end) {
            if self.extents[&k].id == entry.id {
                self.extents.remove(&k);
            }
        }
        self.bytes -= cost;
        if let Some(v) = spare {
            recycle(&self.spares, v);
        }
        Ok(())
    }

    /// Writes back every entry up to and including `id`, oldest first. With `fua`, entry `id`
    /// is made durable in storage (a FUA write): the older entries are not synced, since FUA
    /// promises only its own write, so storage syncs just that range (the file backend's
    /// `RWF_DSYNC`) rather than all of it. Storage sees the writes in apply order either way.
    /// The first failure stops it; the entries from the failed one on stay cached.
    pub fn write_back_through(
        &mut self,
        storage: &dyn Backend,
        id: u64,
        fua: bool,
    ) -> io::Result<()> {
        let mut synced = !fua;
        while let Some(front) = self.entries.front().filter(|e| e.id <= id) {
            let last = fua && front.id == id;
            self.write_back_front(storage, last)?;
            synced |= last;
        }
        if synced {
            Ok(())
        } else {
            // Entry `id` was written back earlier, without a sync: sync everything.
            storage.flush(None)
        }
    }

    /// Writes back every entry answered before flush generation `cover_gen` (and, to keep
    /// storage in apply order, every older entry).
    pub fn write_back_covered(&mut self, storage: &dyn Backend, cover_gen: u64) -> io::Result<()> {
        let last = self
            .entries
            .iter()
            .filter(|e| e.answered_gen.is_some_and(|g| g < cover_gen))
            .map(|e| e.id)
            .next_back();
        if let Some(id) = last {
            self.write_back_through(storage, id, false)?;
        }
        Ok(())
    }

    /// Writes back every entry (idle write-back and shutdown); storage is not synced.
    pub fn write_back_all(&mut self, storage: &dyn Backend) -> io::Result<()> {
        while !self.entries.is_empty() {
            self.write_back_front(storage, false)?;
        }
        Ok(())
    }

    /// Writes back the oldest entries until an entry costing `incoming` bytes fits under the
    /// limits; returns how many were written back. A failed write-back stops it with the
    /// error, so that the caller refuses the new write rather than let the cache grow past
    /// its limit (nothing already cached is dropped).
    pub fn make_room(&mut self, storage: &dyn Backend, incoming: u64) -> io::Result<u64> {
        let mut n = 0;
        // Just under the limit: a full cache then writes back about one entry per new one,
        // spread evenly over requests. (Going further down at once made one request in
        // thousands stall the connection, with the disk lock held, for milliseconds.)
        while !self.entries.is_empty()
            && (self.bytes + incoming > self.bytes_max || self.entries.len() >= self.entries_max)
        {
            self.write_back_front(storage, false)?;
            n += 1;
        }
        Ok(n)
    }

    /// The byte ranges of the entries still cached, oldest first (what a failed shutdown
    /// flush could not write).
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.entries.iter().map(|e| (e.offset, e.length)).collect()
    }

    /// Takes every pending entry out, oldest first (for a power cut).
    pub fn drain_all(&mut self) -> Vec<Entry> {
        self.extents.clear();
        self.bytes = 0;
        self.entries.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlaps_sees_exactly_the_cached_runs() {
        let mut c = Cache::new(1 << 20, 16, "test");
        assert!(!c.overlaps(0, 4096));
        c.insert(4096, 4096, EntryData::Zeroes { trim: false }, None, None);
        c.insert(
            16384,
            512,
            EntryData::Data(WriteData::bytes(vec![1; 512])),
            None,
            None,
        );
        assert!(!c.overlaps(0, 4096));
        assert!(c.overlaps(0, 4097));
        assert!(c.overlaps(8191, 1));
        assert!(!c.overlaps(8192, 8192));
        assert!(c.overlaps(8192, 8193));
        assert!(c.overlaps(16895, 4096));
        assert!(!c.overlaps(16896, 4096));
        assert!(c.overlaps(0, 1 << 20));
    }

    /// Written-back buffers from 64 KiB to 4 MiB are kept for reuse, at most 32 of them: the
    /// pool's memory stays under 128 MiB, and small buffers (cheap to allocate) are not kept.
    #[test]
    fn recycling_keeps_buffers_of_the_documented_sizes_up_to_the_pool_limit() {
        let spares = Spares::default();
        let kept = |cap: usize| {
            let before = spares.lock().unwrap().len();
            recycle(&spares, Vec::with_capacity(cap));
            spares.lock().unwrap().len() > before
        };
        assert!(!kept(64 * 1024 - 1));
        assert!(kept(64 * 1024));
        assert!(kept(4 * 1024 * 1024));
        assert!(!kept(4 * 1024 * 1024 + 1));
        for _ in 2..32 {
            assert!(kept(1 << 20));
        }
        assert!(!kept(1 << 20), "a 33rd buffer");
        assert!(spares.lock().unwrap().iter().all(|v| v.is_empty()));
    }

    /// The first cached run of a range: none when the range ends where a run starts, the run
    /// (with its kind) as soon as one byte overlaps.
    #[test]
    fn first_overlap_finds_the_first_run_of_a_range() {
        let mut c = Cache::new(1 << 20, 16, "test");
        c.insert(
            8192,
            4096,
            EntryData::Data(WriteData::bytes(vec![1; 4096])),
            None,
            None,
        );
        c.insert(20480, 512, EntryData::Zeroes { trim: true }, None, None);
        assert_eq!(c.first_overlap(4096, 4096), None);
        assert_eq!(c.first_overlap(4096, 4097), Some((8192, 12288, None)));
        assert_eq!(c.first_overlap(12288, 8192), None);
        assert_eq!(
            c.first_overlap(12288, 8193),
            Some((20480, 20992, Some(true)))
        );
    }

    /// A write that ends exactly where a cached neighbour starts leaves the neighbour's run
    /// in the index (an empty run at the split point must not replace it).
    #[test]
    fn a_split_at_a_neighbours_start_keeps_the_neighbour() {
        let mut c = Cache::new(1 << 20, 16, "test");
        let data = |b: u8| EntryData::Data(WriteData::bytes(vec![b; 100]));
        c.insert(0, 100, data(1), None, None);
        c.insert(100, 100, data(2), None, None);
        c.insert(
            50,
            50,
            EntryData::Data(WriteData::bytes(vec![3; 50])),
            None,
            None,
        );
        let mut buf = vec![0; 200];
        c.overlay(0, &mut buf);
        let want: Vec<u8> = [[1; 50], [3; 50]]
            .concat()
            .into_iter()
            .chain([2; 100])
            .collect();
        assert_eq!(buf, want);
    }
}
