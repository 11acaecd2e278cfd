//! A disk made of layers over a read-only base, swappable as a whole: what a crash state is
//! (the base image, the writes of every epoch before it, then its own writes), served without
//! copying anything disk-sized.
//!
//! A [`Layer`] maps disjoint byte ranges of the disk to where their bytes are: zeroes, or a
//! range of one of the backend's read-only [`Source`]s (a write log's payloads, say). A read
//! fills its buffer from the base and then lets each layer of the current view, bottom to
//! top, overwrite the ranges it holds. [`OverlayBackend::set_view`] replaces the view at once
//! (the next state) and forgets what clients wrote.
//!
//! Writes, when the export lets them through, never reach a source: they go to a private
//! copy-on-write map of 4 KiB blocks on top of the view, at most [`COW_BYTES_MAX`] of them,
//! dropped at the next `set_view`.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use super::{Backend, Block, IoStyle, StatusExtent, Ticket, WriteData, WriteFailed, BLOCK_BYTES};

/// Most bytes one backend keeps of what clients wrote over its view (256 MiB); past it a
/// write fails with ENOSPC.
pub const COW_BYTES_MAX: u64 = 256 << 20;

/// Bytes that can be read by offset and do not change while they are served.
pub trait Source: Send + Sync {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl Source for std::fs::File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl Source for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = usize::try_from(offset)
            .ok()
            .and_then(|at| self.get(at..at.checked_add(buf.len())?))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(bytes);
        Ok(())
    }
}

/// Where the bytes of a run come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Zero,
    /// Source number `source` of the backend, from byte `offset` on.
    Source {
        source: usize,
        offset: u64,
    },
}

impl Origin {
    /// The same origin, `by` bytes further on.
    pub fn skip(self, by: u64) -> Origin {
        match self {
            Origin::Zero => Origin::Zero,
            Origin::Source { source, offset } => Origin::Source {
                source,
                offset: offset + by,
            },
        }
    }
}

/// A run of a layer: `len` bytes from `from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    len: u64,
    from: Origin,
}

/// A layer's runs by their first byte: in a map while runs are put into it, in a sorted
/// vector once made by [`Layer::merged`] (built in one pass and in one allocation, read by
/// binary search; a put turns it back into a map).
#[derive(Debug, Clone)]
enum Runs {
    Map(BTreeMap<u64, Run>),
    Sorted(Vec<(u64, Run)>),
}

/// Disjoint byte ranges of the disk and where their bytes come from; later puts win.
#[derive(Debug, Clone)]
pub struct Layer {
    runs: Runs,
}

impl Default for Layer {
    fn default() -> Self {
        Layer {
            runs: Runs::Map(BTreeMap::new()),
        }
    }
}

/// Layers are equal when they hold the same runs, however they keep them.
impl PartialEq for Layer {
    fn eq(&self, other: &Layer) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for Layer {}

impl Layer {
    pub fn new() -> Self {
        Layer::default()
    }

    /// Number of runs held.
    pub fn runs(&self) -> usize {
        match &self.runs {
            Runs::Map(m) => m.len(),
            Runs::Sorted(v) => v.len(),
        }
    }

    /// Its runs in disk order: (first byte, length, where their bytes come from).
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, Origin)> + '_ {
        let (map, sorted) = match &self.runs {
            Runs::Map(m) => (Some(m), None),
            Runs::Sorted(v) => (None, Some(v)),
        };
        let map = map.into_iter().flatten().map(|(&s, r)| (s, r.len, r.from));
        map.chain(
            sorted
                .into_iter()
                .flatten()
                .map(|&(s, r)| (s, r.len, r.from)),
        )
    }

    /// The runs in a map, to put into (a sorted layer's are moved into one first).
    fn map_mut(&mut self) -> &mut BTreeMap<u64, Run> {
        if let Runs::Sorted(v) = &mut self.runs {
            self.runs = Runs::Map(std::mem::take(v).into_iter().collect());
        }
        match &mut self.runs {
            Runs::Map(m) => m,
            Runs::Sorted(_) => unreachable!("made a map above"),
        }
    }

    /// The runs that start before `end`, from the last one that starts at or before `offset`
    /// (or the first after it): every run that can meet `[offset, end)`, in order.
    fn runs_near(&self, offset: u64, end: u64) -> impl Iterator<Item = (u64, Run)> + '_ {
        let (map, sorted) = match &self.runs {
            Runs::Map(m) => {
                let first = m.range(..=offset).next_back().map_or(offset, |(&s, _)| s);
                (Some(m.range(first..end)), None)
            }
            Runs::Sorted(v) => {
                let at = v.partition_point(|&(s, _)| s <= offset).saturating_sub(1);
                let until = v.partition_point(|&(s, _)| s < end).max(at);
                (None, Some(&v[at..until]))
            }
        };
        let map = map.into_iter().flatten().map(|(&s, &r)| (s, r));
        map.chain(sorted.into_iter().flatten().copied())
    }

    /// `[start, start+len)` now comes from `from`, whatever held it before.
    pub fn put(&mut self, start: u64, len: u64, from: Origin) {
        if len == 0 {
            return;
        }
        let runs = self.map_mut();
        let end = start + len;
        // A run that starts before `start` and reaches into the range keeps its head.
        let before = runs.range(..start).next_back().map(|(&s, &r)| (s, r));
        if let Some((s, r)) = before {
            if s + r.len > start {
                runs.insert(
                    s,
                    Run {
                        len: start - s,
                        from: r.from,
                    },
                );
                if s + r.len > end {
                    let tail = Run {
                        len: s + r.len - end,
                        from: r.from.skip(end - s),
                    };
                    runs.insert(end, tail);
                }
            }
        }
        // Runs that start inside the range go, but for the tail of the last one.
        let inside: Vec<(u64, Run)> = runs.range(start..end).map(|(&s, &r)| (s, r)).collect();
        for (s, r) in inside {
            runs.remove(&s);
            if s + r.len > end {
                let tail = Run {
                    len: s + r.len - end,
                    from: r.from.skip(end - s),
                };
                runs.insert(end, tail);
            }
        }
        runs.insert(start, Run { len, from });
    }

    /// `lower` with `upper` over it, as one layer: every run of `upper`, and the parts of
    /// `lower`'s runs that `upper` leaves uncovered. Reads through it are reads through the
    /// two, bottom first, and it equals `lower` given each of `upper`'s runs by [`Self::put`];
    /// it costs one pass over both layers, not a search of `lower` a run.
    pub fn merged(lower: &Layer, upper: &Layer) -> Layer {
        let mut kept: Vec<(u64, Run)> = Vec::with_capacity(lower.runs() + upper.runs());
        // Two cursors over `upper`: `over` for the runs that cut the lower run at hand, `ups`
        // for emitting upper runs in disk order between the lower pieces.
        let mut over = upper.iter().map(|(s, len, _)| (s, s + len)).peekable();
        let mut ups = upper.iter().peekable();
        for (s, len, from) in lower.iter() {
            let end = s + len;
            let mut at = s;
            // Upper runs are disjoint and in order: each one that meets [at, end) cuts it.
            while let Some(&(us, ue)) = over.peek() {
                if ue <= at {
                    over.next();
                    continue;
                }
                if us >= end {
                    break;
                }
                if us > at {
                    let from = from.skip(at - s);
                    upper_before(&mut kept, &mut ups, at);
                    kept.push((at, Run { len: us - at, from }));
                }
                at = ue;
                if ue > end {
                    break; // it reaches into the next lower run
                }
                over.next();
            }
            if at < end {
                let from = from.skip(at - s);
                upper_before(&mut kept, &mut ups, at);
                kept.push((
                    at,
                    Run {
                        len: end - at,
                        from,
                    },
                ));
            }
        }
        upper_before(&mut kept, &mut ups, u64::MAX);
        Layer {
            runs: Runs::Sorted(kept),
        }
    }

    /// Overwrites the parts of `buf` (the disk from `offset`) this layer holds.
    fn overlay(&self, sources: &[Arc<dyn Source>], offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        for (s, r) in self.runs_near(offset, end) {
            let (lo, hi) = (s.max(offset), (s + r.len).min(end));
            if lo >= hi {
                continue;
            }
            let dst = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            match r.from.skip(lo - s) {
                Origin::Zero => dst.fill(0),
                Origin::Source { source, offset } => {
                    let src = sources.get(source).ok_or_else(|| {
                        io::Error::other(format!("overlay: no source number {source}"))
                    })?;
                    src.read_exact_at(dst, offset)?;
                }
            }
        }
        Ok(())
    }
}

/// Appends to `kept` (in disk order) the runs of `ups` that start before `at`.
fn upper_before(
    kept: &mut Vec<(u64, Run)>,
    ups: &mut std::iter::Peekable<impl Iterator<Item = (u64, u64, Origin)>>,
    at: u64,
) {
    while let Some((s, len, from)) = ups.next_if(|&(s, _, _)| s < at) {
        kept.push((s, Run { len, from }));
    }
}

/// The base, the sources, the current view and what clients wrote over it. See the module
/// docs.
pub struct OverlayBackend {
    size: u64,
    base: Arc<dyn Source>,
    sources: Vec<Arc<dyn Source>>,
    /// Layers over the base, bottom first.
    view: RwLock<Arc<[Arc<Layer>]>>,
    /// Blocks written by clients over the view, by block number.
    cow: Mutex<HashMap<u64, Block>>,
}

impl OverlayBackend {
    /// A disk of `size` bytes (a multiple of 4096) reading as the first `size` bytes of
    /// `base` until a view is set; runs of layers name `sources` by their index.
    pub fn new(size: u64, base: Arc<dyn Source>, sources: Vec<Arc<dyn Source>>) -> Self {
        OverlayBackend {
            size,
            base,
            sources,
            view: RwLock::new(Arc::from(Vec::new())),
            cow: Mutex::new(HashMap::new()),
        }
    }

    /// Serves `layers` (bottom first) over the base from now on, and forgets every write.
    pub fn set_view(&self, layers: Vec<Arc<Layer>>) {
        let mut cow = self.cow();
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::from(layers);
        cow.clear();
    }

    /// Bytes clients wrote over the current view and that are kept.
    pub fn cow_bytes(&self) -> u64 {
        self.cow().len() as u64 * BLOCK_BYTES as u64
    }

    fn cow(&self) -> MutexGuard<'_, HashMap<u64, Block>> {
        self.cow.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The view's bytes from `offset` (the base under its layers), ignoring client writes.
    fn read_view(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let view = self.view.read().unwrap_or_else(|e| e.into_inner()).clone();
        self.base.read_exact_at(buf, offset)?;
        for layer in view.iter() {
            layer.overlay(&self.sources, offset, buf)?;
        }
        Ok(())
    }

    /// Applies `fill` to the bytes `[offset, offset+length)` of the copy-on-write blocks,
    /// copying a block from the view the first time it is written.
    fn write_with(
        &self,
        offset: u64,
        length: u64,
        mut fill: impl FnMut(u64, &mut [u8]),
    ) -> io::Result<()> {
        let block_bytes = BLOCK_BYTES as u64;
        let mut cow = self.cow();
        let (first, last) = (offset / block_bytes, (offset + length - 1) / block_bytes);
        let new_blocks = (first..=last).filter(|b| !cow.contains_key(b)).count() as u64;
        if (cow.len() as u64 + new_blocks) * block_bytes > COW_BYTES_MAX {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!("overlay: clients wrote more than {COW_BYTES_MAX} bytes over the view"),
            ));
        }
        for b in first..=last {
            let start = b * block_bytes;
            let block = match cow.entry(b) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    let mut block: Block = Box::new([0u8; BLOCK_BYTES]);
                    self.read_view(start, &mut block[..])?;
                    e.insert(block)
                }
            };
            let lo = offset.max(start);
            let hi = (offset + length).min(start + block_bytes);
            fill(
                lo - offset,
                &mut block[(lo - start) as usize..(hi - start) as usize],
            );
        }
        Ok(())
    }
}

impl Backend for OverlayBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn io_style(&self) -> IoStyle {
        // Reads go to files (the page cache, mostly, but a disk read may block).
        IoStyle::Blocking
    }

    fn read(&self, _t: Option<Ticket>, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_view(offset, buf)?;
        let cow = self.cow();
        if cow.is_empty() || buf.is_empty() {
            return Ok(());
        }
        let block_bytes = BLOCK_BYTES as u64;
        let end = offset + buf.len() as u64;
        for b in offset / block_bytes..=(end - 1) / block_bytes {
            if let Some(block) = cow.get(&b) {
                let start = b * block_bytes;
                let (lo, hi) = (offset.max(start), end.min(start + block_bytes));
                buf[(lo - offset) as usize..(hi - offset) as usize]
                    .copy_from_slice(&block[(lo - start) as usize..(hi - start) as usize]);
            }
        }
        Ok(())
    }

    fn write(
        &self,
        _t: Option<Ticket>,
        offset: u64,
        data: WriteData,
        _fua: bool,
    ) -> Result<(), WriteFailed> {
        if data.is_empty() {
            return Ok(());
        }
        let d = data.clone();
        self.write_with(offset, data.len() as u64, |at, dst| {
            d.copy_to(at as usize, dst)
        })
        .map_err(WriteFailed::returning(data))
    }

    fn write_zeroes(
        &self,
        _t: Option<Ticket>,
        offset: u64,
        length: u64,
        _may_trim: bool,
        fast_only: bool,
        _fua: bool,
    ) -> io::Result<()> {
        if fast_only {
            return Err(io::ErrorKind::Unsupported.into());
        }
        if length == 0 {
            return Ok(());
        }
        self.write_with(offset, length, |_, dst| dst.fill(0))
    }

    fn trim(&self, t: Option<Ticket>, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.write_zeroes(t, offset, length, true, false, fua)
    }

    fn flush(&self, _t: Option<Ticket>) -> io::Result<()> {
        Ok(())
    }

    fn block_status(
        &self,
        _t: Option<Ticket>,
        _offset: u64,
        length: u64,
    ) -> io::Result<Vec<StatusExtent>> {
        Ok(vec![StatusExtent {
            length,
            hole: false,
            zero: false,
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(base: Vec<u8>, log: Vec<u8>) -> OverlayBackend {
        let size = base.len() as u64;
        OverlayBackend::new(size, Arc::new(base), vec![Arc::new(log)])
    }

    fn read_all(b: &OverlayBackend) -> Vec<u8> {
        let mut buf = vec![0u8; b.size() as usize];
        b.read(None, 0, &mut buf).unwrap();
        buf
    }

    #[test]
    fn later_puts_win_and_split_earlier_runs() {
        let mut l = Layer::new();
        l.put(
            0,
            100,
            Origin::Source {
                source: 0,
                offset: 1000,
            },
        );
        l.put(10, 20, Origin::Zero);
        l.put(
            90,
            20,
            Origin::Source {
                source: 0,
                offset: 0,
            },
        );
        let runs: Vec<(u64, Run)> = l
            .iter()
            .map(|(s, len, from)| (s, Run { len, from }))
            .collect();
        let src = |offset| Origin::Source { source: 0, offset };
        assert_eq!(
            runs,
            vec![
                (
                    0,
                    Run {
                        len: 10,
                        from: src(1000)
                    }
                ),
                (
                    10,
                    Run {
                        len: 20,
                        from: Origin::Zero
                    }
                ),
                (
                    30,
                    Run {
                        len: 60,
                        from: src(1030)
                    }
                ),
                (
                    90,
                    Run {
                        len: 20,
                        from: src(0)
                    }
                ),
            ]
        );
        // A put inside one run leaves its head and its tail.
        l.put(40, 5, Origin::Zero);
        assert_eq!(l.iter().find(|r| r.0 == 45), Some((45, 45, src(1045))));
    }

    /// A layer of `n` seeded random runs (some zero, some overlapping) within `disk` bytes.
    fn random_layer(seed: u64, n: usize, disk: u64) -> Layer {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        let mut l = Layer::new();
        for _ in 0..n {
            let start = next(disk);
            let len = 1 + next((disk - start).min(300));
            let from = match next(4) {
                0 => Origin::Zero,
                _ => Origin::Source {
                    source: next(2) as usize,
                    offset: next(1 << 20),
                },
            };
            l.put(start, len, from);
        }
        l
    }

    #[test]
    fn a_merged_layer_is_the_upper_put_over_the_lower() {
        for seed in 0..300u64 {
            let disk = 64 + seed * 7;
            let lower = random_layer(seed, (seed % 40) as usize, disk);
            let upper = random_layer(seed + 1000, (seed % 23) as usize, disk);
            let mut put = lower.clone();
            for (s, len, from) in upper.iter() {
                put.put(s, len, from);
            }
            let merged = Layer::merged(&lower, &upper);
            assert_eq!(merged, put, "seed {seed}");
            // Read through (binary search of its sorted runs), as the two layers it merges.
            let log: Vec<u8> = (0..=255u8).cycle().take(2 << 20).collect();
            let sources: Vec<Arc<dyn Source>> = vec![Arc::new(log.clone()), Arc::new(log)];
            let b = OverlayBackend::new(disk, Arc::new(vec![7u8; disk as usize]), sources);
            // In 97-byte reads, so that most start inside a run.
            let read = |b: &OverlayBackend| {
                let mut all = vec![0u8; disk as usize];
                for (i, chunk) in all.chunks_mut(97).enumerate() {
                    b.read(None, i as u64 * 97, chunk).unwrap();
                }
                all
            };
            b.set_view(vec![Arc::new(lower.clone()), Arc::new(upper.clone())]);
            let want = read(&b);
            b.set_view(vec![Arc::new(merged.clone())]);
            assert!(read(&b) == want, "seed {seed}");
            // And put to (back in a map), as the layer put to.
            let (mut m, mut p) = (merged, put);
            m.put(seed % disk, 1 + seed % 50, Origin::Zero);
            p.put(seed % disk, 1 + seed % 50, Origin::Zero);
            assert_eq!(m, p, "seed {seed}");
        }
        let l = random_layer(7, 50, 4096);
        assert_eq!(Layer::merged(&l, &Layer::new()), l);
        assert_eq!(Layer::merged(&Layer::new(), &l), l);
    }

    #[test]
    fn reads_are_the_base_under_the_layers_in_order() {
        let b = backend(vec![1u8; 8192], (0..=255u8).cycle().take(8192).collect());
        let mut low = Layer::new();
        low.put(
            100,
            1000,
            Origin::Source {
                source: 0,
                offset: 0,
            },
        );
        let mut high = Layer::new();
        high.put(600, 10, Origin::Zero);
        b.set_view(vec![Arc::new(low), Arc::new(high)]);
        let got = read_all(&b);
        let mut want = vec![1u8; 8192];
        for (i, byte) in want[100..1100].iter_mut().enumerate() {
            *byte = i as u8;
        }
        want[600..610].fill(0);
        assert_eq!(got, want);
        let mut part = vec![0u8; 3];
        b.read(None, 605, &mut part).unwrap();
        assert_eq!(part, vec![0, 0, 0]);
    }

    #[test]
    fn writes_stay_over_the_view_until_it_changes() {
        let b = backend(vec![7u8; 8192], vec![]);
        b.write(None, 4000, WriteData::copy_of(&[9u8; 200]), false)
            .unwrap();
        let got = read_all(&b);
        assert_eq!(
            &got[3999..4201],
            &[[7u8].as_slice(), &[9u8; 200], &[7u8]].concat()[..]
        );
        assert_eq!(b.cow_bytes(), 8192);
        b.set_view(Vec::new());
        assert_eq!(
            read_all(&b),
            vec![7u8; 8192],
            "a new view forgets the writes"
        );
        assert_eq!(b.cow_bytes(), 0);
    }

    #[test]
    fn too_many_written_bytes_fail_with_enospc() {
        let size = COW_BYTES_MAX + BLOCK_BYTES as u64;
        let b = OverlayBackend::new(size, Arc::new(Zeroes), Vec::new());
        let err = b
            .write_zeroes(None, 0, size, false, false, false)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
    }

    struct Zeroes;
    impl Source for Zeroes {
        fn read_exact_at(&self, buf: &mut [u8], _offset: u64) -> io::Result<()> {
            buf.fill(0);
            Ok(())
        }
    }
}
