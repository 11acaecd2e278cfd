//! Copy-on-write images: a prefix image that advances epoch by epoch, and per-worker images
//! that differ from it only in a tracked delta: which of the log's bytes (or zeros) each
//! range holds, or that its content is unknown. Turning a worker image into a new crash
//! state costs the difference between the two states, never the length of the log before
//! it, nor the size of the disk: the ranges the last state (and the epochs since) changed
//! that the new state does not write go back to the prefix's content, and of the new
//! state's writes only those the image does not hold already land (states of one epoch, and
//! of one batch of epochs, share most of theirs). Where the work folder's filesystem shares
//! blocks (XFS, btrfs), a worker image starts as a reflink of the prefix (`FICLONE`), and
//! ranges of at least [`REFLINK_RANGE_BYTES_MIN`] go back by reflink (`FICLONERANGE`,
//! metadata only, widened to whole blocks: what that overwrote of the new state's writes is
//! written again); smaller ones, and every range elsewhere, are copied.
//! Also: sparse copies and plain replay of a log into an image.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nbd_server::backend::{Layer, Origin};
use nbd_server::log::LogError;

use crate::history::{Epoch, Event, History, Op};
use crate::states::CrashState;

/// Copy buffer; zero runs of [`HOLE_BYTES`] are left as holes.
const COPY_CHUNK_BYTES: usize = 1024 * 1024;
const HOLE_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(
        "base image {path} is {actual} bytes, smaller than the logged disk ({expected} bytes)"
    )]
    BaseTooSmall {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error(
        "base image {path} is {actual} bytes, larger than the logged disk ({expected} bytes); \
         is it the right file? (--allow-larger-base uses its first {expected} bytes)"
    )]
    BaseTooLarge {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error("base image {path} is a directory, not a disk image")]
    BaseIsDirectory { path: PathBuf },
    #[error("base image {path} is not a regular file")]
    BaseNotFile { path: PathBuf },
    #[error("replay target not found: {0}")]
    TargetNotFound(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What to do with a base image larger than the logged disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LargerBase {
    /// Refuse it: a base of another size than the disk is most often the wrong file.
    #[default]
    Refuse,
    /// Use its first bytes, as many as the logged disk has.
    UseStart,
}

/// The size in bytes of the base image at `path`, once it is known to fit a logged disk of
/// `disk_bytes` bytes: a regular file, not smaller, and not larger unless `larger` allows it.
pub fn base_bytes(path: &Path, disk_bytes: u64, larger: LargerBase) -> Result<u64, ImageError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    let path = path.to_path_buf();
    if meta.is_dir() {
        return Err(ImageError::BaseIsDirectory { path });
    }
    if !meta.is_file() {
        return Err(ImageError::BaseNotFile { path });
    }
    let actual = meta.len();
    if actual < disk_bytes {
        return Err(ImageError::BaseTooSmall {
            path,
            actual,
            expected: disk_bytes,
        });
    }
    if actual > disk_bytes && larger == LargerBase::Refuse {
        return Err(ImageError::BaseTooLarge {
            path,
            actual,
            expected: disk_bytes,
        });
    }
    Ok(actual)
}

/// Copies the first `len` bytes of `src` into a new file `dst`, leaving zero runs as holes.
/// Only `src`'s data is read where its filesystem tells holes from data (`SEEK_DATA`), so a
/// sparse base of any size costs what it holds.
pub fn sparse_copy(src: &Path, dst: &Path, len: u64) -> Result<(), ImageError> {
    let from = File::open(src).map_err(io_err(src))?;
    let to = File::create(dst).map_err(io_err(dst))?;
    to.set_len(len).map_err(io_err(dst))?;
    let mut buf = vec![0u8; COPY_CHUNK_BYTES];
    let mut at = 0u64;
    while at < len {
        let (start, end) = match crate::checker::sys::next_data(&from, at) {
            Ok(Some((data, hole))) => (data.min(len), hole.min(len)),
            Ok(None) => break,
            // No SEEK_DATA here: every byte is read, and zeros are skipped.
            Err(_) => (at, len),
        };
        copy_nonzero(&from, src, &to, dst, (start, end), &mut buf)?;
        at = end.max(at + 1);
    }
    Ok(())
}

/// Copies `[start, end)` of `from` to `to`, leaving chunks of zeros unwritten.
fn copy_nonzero(
    from: &File,
    src: &Path,
    to: &File,
    dst: &Path,
    (start, end): (u64, u64),
    buf: &mut [u8],
) -> Result<(), ImageError> {
    let mut at = start;
    while at < end {
        let n = ((end - at) as usize).min(buf.len());
        from.read_exact_at(&mut buf[..n], at).map_err(io_err(src))?;
        for (i, chunk) in buf[..n].chunks(HOLE_BYTES).enumerate() {
            if chunk.iter().any(|&b| b != 0) {
                to.write_all_at(chunk, at + (i * HOLE_BYTES) as u64)
                    .map_err(io_err(dst))?;
            }
        }
        at += n as u64;
    }
    Ok(())
}

/// Writes `pieces` of `op` into `img`.
pub fn apply_pieces(
    img: &File,
    img_path: &Path,
    op: &Op,
    pieces: &[(u64, u64)],
    log: &File,
) -> Result<(), ImageError> {
    let mut buf = vec![0u8; COPY_CHUNK_BYTES.min(op.length as usize).max(1)];
    for &(off, len) in pieces {
        let mut at = off;
        while at < off + len {
            let n = ((off + len - at) as usize).min(buf.len());
            op.read(log, at, &mut buf[..n])
                .map_err(|e| ImageError::Log(e.into()))?;
            img.write_all_at(&buf[..n], at).map_err(io_err(img_path))?;
            at += n as u64;
        }
    }
    Ok(())
}

/// A byte range of the disk: (offset, length).
type Range = (u64, u64);

/// The origin of a worker image's runs whose content is not known (see
/// [`WorkerImage::prefix_advanced`]): never the same bytes as any state's.
const UNKNOWN: Origin = Origin::Source {
    source: UNKNOWN_SOURCE,
    offset: 0,
};
const UNKNOWN_SOURCE: usize = usize::MAX;

/// Whether a run at `a.0` from origin `a.1` and one at `b.0` from `b.1` hold the same bytes
/// where they overlap: both zeros, or the same known source at the same distance.
fn same_bytes(a: (u64, Origin), b: (u64, Origin)) -> bool {
    match (a.1, b.1) {
        (Origin::Zero, Origin::Zero) => true,
        (
            Origin::Source {
                source: s,
                offset: x,
            },
            Origin::Source {
                source: t,
                offset: y,
            },
        ) => s == t && s != UNKNOWN_SOURCE && x.wrapping_sub(a.0) == y.wrapping_sub(b.0),
        _ => false,
    }
}

/// The ranges of `layer`'s runs, sorted and merged.
fn layer_ranges(layer: &Layer) -> Vec<Range> {
    merge(layer.iter().map(|(s, len, _)| (s, len)).collect())
}

/// `layer`'s runs (first byte, length, origin) outside `cut` (sorted, merged).
fn cut_runs(layer: &Layer, cut: &[Range]) -> Vec<(u64, u64, Origin)> {
    let mut out = Vec::new();
    for (s, len, from) in layer.iter() {
        for (off, n) in subtract_sorted(&[(s, len)], cut) {
            out.push((off, n, from.skip(off - s)));
        }
    }
    out
}

/// The parts of `want`'s runs whose bytes the image does not hold there already, each with
/// its origin; `held` is what the image holds over the prefix (runs in disk order).
fn unheld_parts(held: &[(u64, u64, Origin)], want: &Layer) -> Vec<(u64, u64, Origin)> {
    let mut writes = Vec::new();
    let mut k = 0;
    for (ws, wlen, wfrom) in want.iter() {
        let we = ws + wlen;
        while k < held.len() && held[k].0 + held[k].1 <= ws {
            k += 1;
        }
        let mut at = ws;
        for &(hs, hlen, hfrom) in held[k..].iter().take_while(|r| r.0 < we) {
            let (lo, hi) = (hs.max(at), (hs + hlen).min(we));
            if lo < hi && same_bytes((hs, hfrom), (ws, wfrom)) {
                if lo > at {
                    writes.push((at, lo - at, wfrom.skip(at - ws)));
                }
                at = hi;
            }
        }
        if at < we {
            writes.push((at, we - at, wfrom.skip(at - ws)));
        }
    }
    writes
}

/// The parts of `ranges` outside `cut`, both sorted and merged ([`merge`]).
fn subtract_sorted(ranges: &[(u64, u64)], cut: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::with_capacity(ranges.len());
    let mut c = 0;
    for &(off, len) in ranges {
        let (mut at, end) = (off, off + len);
        while c < cut.len() && cut[c].0 + cut[c].1 <= at {
            c += 1;
        }
        let mut k = c;
        while at < end && k < cut.len() && cut[k].0 < end {
            if cut[k].0 > at {
                out.push((at, cut[k].0 - at));
            }
            at = at.max(cut[k].0 + cut[k].1);
            k += 1;
        }
        if at < end {
            out.push((at, end - at));
        }
    }
    out
}

/// `ranges` widened to whole blocks of `block` bytes (a power of two), within `disk_bytes`.
fn align_out(ranges: &[(u64, u64)], block: u64, disk_bytes: u64) -> Vec<(u64, u64)> {
    let widened = ranges
        .iter()
        .map(|&(off, len)| {
            let start = off & !(block - 1);
            let end = (off + len).next_multiple_of(block).min(disk_bytes);
            (start, end - start)
        })
        .collect();
    merge(widened)
}

/// Ranges a worker image tracks as differing from the prefix, at most (16 bytes each): a
/// worker that gets no state for many epochs (the prefix moving under it) would otherwise
/// track every scattered write of them. Past it the ranges are widened, which only makes the
/// next restore copy more than it must.
pub const DIRTY_RANGES_MAX: usize = 1 << 16;

/// `ranges` (sorted, merged) if they are at most [`DIRTY_RANGES_MAX`], else the same ranges
/// widened to the smallest power-of-two block (from 4 KiB) that brings them under it.
fn coarsen(ranges: Vec<(u64, u64)>, disk_bytes: u64) -> Vec<(u64, u64)> {
    let mut out = ranges;
    let mut block = REFLINK_BLOCK_BYTES_DEFAULT;
    while out.len() > DIRTY_RANGES_MAX {
        out = align_out(&out, block, disk_bytes);
        block *= 2;
    }
    out
}

/// Sorts and merges ranges.
fn merge(mut r: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    r.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(r.len());
    for (off, len) in r {
        match out.last_mut() {
            Some(last) if last.0 + last.1 >= off => {
                let end = (last.0 + last.1).max(off + len);
                last.1 = end - last.0;
            }
            _ => out.push((off, len)),
        }
    }
    out
}

/// The image of the full prefix: every operation of every epoch before the current one.
pub struct PrefixImage {
    pub path: PathBuf,
    file: File,
    pub disk_bytes: u64,
}

impl PrefixImage {
    /// Starts from a sparse copy of `base` in `dir`.
    pub fn new(
        base: &Path,
        dir: &Path,
        disk_bytes: u64,
        larger: LargerBase,
    ) -> Result<Self, ImageError> {
        base_bytes(base, disk_bytes, larger)?;
        let path = dir.join("prefix.img");
        sparse_copy(base, &path, disk_bytes)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(PrefixImage {
            path,
            file,
            disk_bytes,
        })
    }

    /// Applies every operation of `epoch`.
    pub fn advance(&self, epoch: &Epoch, log: &File) -> Result<(), ImageError> {
        for op in &epoch.ops {
            apply_pieces(&self.file, &self.path, op, &op.pieces, log)?;
        }
        Ok(())
    }
}

/// A worker's image: the prefix plus a tracked delta.
pub struct WorkerImage {
    pub path: PathBuf,
    file: File,
    /// What this image holds where it may differ from the prefix image: runs of the log's
    /// payloads or of zeros the last state wrote, and runs of unknown content (the prefix
    /// moved on under them); everywhere else it holds the prefix's bytes.
    held: Layer,
    stamp: Option<(SystemTime, u64)>,
    /// Whether ranges go back to the prefix by reflink.
    reflink: Reflink,
}

/// Whether a worker image shares blocks with the prefix image (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reflink {
    /// Not tried yet: the first restore tries it.
    Untried,
    /// Reflinks work: ranges go back by `FICLONERANGE`.
    Works,
    /// The filesystem cannot: ranges are copied.
    Unsupported,
}

/// Ranges smaller than this go back to the prefix by copying, even where reflinks work:
/// XFS writes back the source's dirty pages in a range before it shares them, and the prefix
/// image is rewritten every epoch, so reflinking every 4 KiB range of the 1 GiB fio log's
/// states made `{image}` 9 states/s where copying them made 34 (same machine and run).
pub const REFLINK_RANGE_BYTES_MIN: u64 = 1 << 20;

/// Block size reflinked ranges are aligned to when the filesystem does not say one.
const REFLINK_BLOCK_BYTES_DEFAULT: u64 = 4096;

/// Whether reflinks may be tried: not when `CRASHMONKEY_REFLINK=0` (so the copying path can
/// be tested, and measured, on a filesystem that has reflinks).
fn reflinks_allowed() -> bool {
    std::env::var_os("CRASHMONKEY_REFLINK").is_none_or(|v| v != "0")
}

/// Makes `path` a copy of the first `len` bytes of the prefix image: a reflink where the
/// filesystem has them, else a sparse copy. Returns the file, open for reading and writing,
/// and whether ranges may go back by reflink ([`Reflink::Untried`] after a whole-file reflink:
/// ranges are another call).
fn copy_prefix(prefix: &PrefixImage, path: &Path) -> Result<(File, Reflink), ImageError> {
    let _ = std::fs::remove_file(path);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err(path))?;
    let cloned = match reflinks_allowed() {
        true => crate::checker::sys::clone_file(&prefix.file, &file),
        false => Err(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
    };
    match cloned {
        Ok(()) => return Ok((file, Reflink::Untried)),
        Err(e) if crate::checker::sys::reflink_unsupported(&e) => {}
        Err(e) => return Err(io_err(path)(e)),
    }
    drop(file);
    sparse_copy(&prefix.path, path, prefix.disk_bytes)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    Ok((file, Reflink::Unsupported))
}

impl WorkerImage {
    pub fn new(prefix: &PrefixImage, path: PathBuf) -> Result<Self, ImageError> {
        let (file, reflink) = copy_prefix(prefix, &path)?;
        tracing::debug!(
            "{}: made from the prefix, reflink {reflink:?}",
            path.display()
        );
        Ok(WorkerImage {
            path,
            file,
            held: Layer::new(),
            stamp: None,
            reflink,
        })
    }

    /// How this image's ranges go back to the prefix.
    pub fn reflink(&self) -> Reflink {
        self.reflink
    }

    fn stamp_now(&self) -> Result<(SystemTime, u64), ImageError> {
        let m = std::fs::metadata(&self.path).map_err(io_err(&self.path))?;
        Ok((m.modified().map_err(io_err(&self.path))?, m.len()))
    }

    /// Makes this image hold `state` (of `epoch`, on top of `prefix`).
    pub fn materialize(
        &mut self,
        prefix: &PrefixImage,
        epoch: &Epoch,
        state: &CrashState,
        log: &File,
    ) -> Result<(), ImageError> {
        self.materialize_on(prefix, &[], epoch, state, log)
    }

    /// Makes this image hold `state` (of `epoch`, on top of `prefix` and every operation of
    /// the epochs `before`, which lie between the prefix and `epoch`).
    pub fn materialize_on(
        &mut self,
        prefix: &PrefixImage,
        before: &[Epoch],
        epoch: &Epoch,
        state: &CrashState,
        log: &File,
    ) -> Result<(), ImageError> {
        // If the last checker changed the image, the delta no longer describes it: start over.
        if let Some(stamp) = self.stamp {
            if self.stamp_now()? != stamp {
                tracing::debug!(
                    "{}: changed by the checker; copying the prefix again",
                    self.path.display()
                );
                (self.file, self.reflink) = copy_prefix(prefix, &self.path)?;
                self.held = Layer::new();
            }
        }
        let mut want = Layer::new();
        for op in before.iter().flat_map(|e| &e.ops) {
            crate::served::put_pieces(&mut want, op, &op.pieces);
        }
        for &i in &state.included {
            let op = &epoch.ops[i];
            crate::served::put_pieces(&mut want, op, &op.pieces);
        }
        if let Some(t) = &state.torn {
            crate::served::put_pieces(&mut want, &epoch.ops[t.index], &t.pieces);
        }
        // Only what differs from the image's last state is written: the ranges it held that
        // this state does not go back to the prefix, and this state's runs that the image
        // does not hold already (the epochs between the prefix and a state, and the writes
        // states of one epoch share, stay as they are).
        if let Err(e) = self.change_to(prefix, &want, log) {
            // Stopped half way: what the image holds is known only to lie within the ranges
            // of the two states.
            let mut ranges = layer_ranges(&self.held);
            ranges.extend(layer_ranges(&want));
            self.held = Layer::new();
            for (off, len) in merge(ranges) {
                self.held.put(off, len, UNKNOWN);
            }
            return Err(e);
        }
        self.held = want;
        self.stamp = Some(self.stamp_now()?);
        Ok(())
    }

    /// Makes the image, which holds `self.held` over the prefix, hold `want`.
    fn change_to(
        &mut self,
        prefix: &PrefixImage,
        want: &Layer,
        log: &File,
    ) -> Result<(), ImageError> {
        let undo = subtract_sorted(&layer_ranges(&self.held), &layer_ranges(want));
        // A reflinked range widens to whole blocks: what it overwrote of this state's runs
        // holds the prefix's bytes now, and is written again below.
        let restored = self.restore(prefix, &undo)?;
        let writes = unheld_parts(&cut_runs(&self.held, &restored), want);
        let mut buf = Vec::new();
        for (start, len, from) in writes {
            self.write_from(start, len, from, log, &mut buf)?;
        }
        Ok(())
    }

    /// Writes `len` bytes at `start` from `from`: the log's payload bytes, or zeros.
    fn write_from(
        &self,
        start: u64,
        len: u64,
        from: Origin,
        log: &File,
        buf: &mut Vec<u8>,
    ) -> Result<(), ImageError> {
        buf.resize((len as usize).min(COPY_CHUNK_BYTES), 0);
        let mut at = 0;
        while at < len {
            let n = ((len - at) as usize).min(buf.len());
            match from {
                Origin::Zero => buf[..n].fill(0),
                Origin::Source { source, offset } => {
                    debug_assert_eq!(source, crate::served::LOG_SOURCE, "a state's own bytes");
                    log.read_exact_at(&mut buf[..n], offset + at)
                        .map_err(|e| ImageError::Log(e.into()))?;
                }
            }
            self.file
                .write_all_at(&buf[..n], start + at)
                .map_err(io_err(&self.path))?;
            at += n as u64;
        }
        Ok(())
    }

    /// Makes `ranges` (sorted, merged) hold the prefix's bytes again: the large ones by
    /// reflink where the filesystem has them (found out at the first try), else by copying.
    /// Returns the ranges it overwrote (sorted, merged): reflinked ones widen to whole blocks.
    fn restore(
        &mut self,
        prefix: &PrefixImage,
        ranges: &[(u64, u64)],
    ) -> Result<Vec<Range>, ImageError> {
        let reflinks = self.reflink != Reflink::Unsupported;
        let (large, mut small): (Vec<Range>, Vec<Range>) = ranges
            .iter()
            .partition(|r| reflinks && r.1 >= REFLINK_RANGE_BYTES_MIN);
        let mut overwritten = Vec::new();
        if !large.is_empty() {
            match self.restore_by_reflink(prefix, &large) {
                Ok(widened) => {
                    overwritten = widened;
                    if self.reflink == Reflink::Untried {
                        tracing::debug!("{}: ranges restored by reflink", self.path.display());
                    }
                    self.reflink = Reflink::Works;
                }
                Err(e)
                    if self.reflink == Reflink::Untried
                        && crate::checker::sys::reflink_unsupported(&e) =>
                {
                    tracing::debug!("{}: no reflinks ({e}); copying", self.path.display());
                    self.reflink = Reflink::Unsupported;
                    small = ranges.to_vec();
                }
                Err(e) => return Err(io_err(&self.path)(e)),
            }
        }
        let mut buf = vec![0u8; COPY_CHUNK_BYTES];
        for &(off, len) in &small {
            let mut at = off;
            while at < off + len {
                let n = ((off + len - at) as usize).min(COPY_CHUNK_BYTES);
                prefix
                    .file
                    .read_exact_at(&mut buf[..n], at)
                    .map_err(io_err(&prefix.path))?;
                self.file
                    .write_all_at(&buf[..n], at)
                    .map_err(io_err(&self.path))?;
                at += n as u64;
            }
        }
        overwritten.extend_from_slice(&small);
        Ok(merge(overwritten))
    }

    /// `ranges`, widened to whole filesystem blocks, shared again with the prefix image;
    /// returns the widened ranges.
    fn restore_by_reflink(
        &self,
        prefix: &PrefixImage,
        ranges: &[(u64, u64)],
    ) -> std::io::Result<Vec<Range>> {
        use std::os::unix::fs::MetadataExt;
        let block = match self.file.metadata()?.blksize() {
            b if b.is_power_of_two() => b,
            _ => REFLINK_BLOCK_BYTES_DEFAULT,
        };
        let widened = align_out(ranges, block, prefix.disk_bytes);
        for &(off, len) in &widened {
            crate::checker::sys::clone_range(&prefix.file, &self.file, off, len)?;
        }
        Ok(widened)
    }

    /// What the checker did to this image that it must not have: `None` if it is still a
    /// regular file of `disk_bytes` bytes, else what became of it, in words.
    pub fn damage(&self, disk_bytes: u64) -> Result<Option<String>, ImageError> {
        let meta = match std::fs::symlink_metadata(&self.path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Some("the checker removed the state's image".into()))
            }
            Err(e) => return Err(io_err(&self.path)(e)),
        };
        Ok(if meta.is_dir() {
            Some("the checker replaced the state's image with a directory".into())
        } else if !meta.is_file() {
            Some("the checker replaced the state's image with something not a regular file".into())
        } else if meta.len() != disk_bytes {
            Some(format!(
                "the checker changed the size of the state's image from {disk_bytes} to {} bytes",
                meta.len()
            ))
        } else {
            None
        })
    }

    /// Builds this image again from `prefix`, whatever the checker left at its path.
    pub fn rebuild(&mut self, prefix: &PrefixImage) -> Result<(), ImageError> {
        let gone = match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&self.path),
            Ok(_) => std::fs::remove_file(&self.path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        gone.map_err(io_err(&self.path))?;
        *self = WorkerImage::new(prefix, self.path.clone())?;
        Ok(())
    }

    /// The prefix (of a disk of `disk_bytes`) moved past `epoch`: its ranges may now differ
    /// from this image too, their content unknown. Past [`DIRTY_RANGES_MAX`] runs every
    /// range held becomes unknown, widened ([`coarsen`]).
    pub fn prefix_advanced(&mut self, epoch: &Epoch, disk_bytes: u64) {
        for op in &epoch.ops {
            for &(off, len) in &op.pieces {
                self.held.put(off, len, UNKNOWN);
            }
        }
        if self.held.runs() > DIRTY_RANGES_MAX {
            let ranges = layer_ranges(&self.held);
            self.held = Layer::new();
            for (off, len) in coarsen(ranges, disk_bytes) {
                self.held.put(off, len, UNKNOWN);
            }
        }
    }
}

/// Where `replay` stops.
#[derive(Debug, Clone)]
pub enum ReplayTarget {
    /// Through the record with this sequence number.
    Seq(u64),
    /// Just before the first mark with this name.
    Mark(String),
    /// Just after the K-th flush (1-based) was recorded.
    Flush(u64),
    /// The whole log.
    End,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplayReport {
    pub ops_applied: u64,
    pub bytes_applied: u64,
    pub disk_bytes: u64,
}

/// Builds the image `out` from `base` and the log's operations in log order up to `target`.
pub fn replay(
    log: &Path,
    base: &Path,
    out: &Path,
    target: &ReplayTarget,
    larger: LargerBase,
) -> Result<ReplayReport, ImageError> {
    let history = History::open(log)?;
    let disk_bytes = history.disk_bytes;
    base_bytes(base, disk_bytes, larger)?;
    sparse_copy(base, out, disk_bytes)?;
    let img = OpenOptions::new()
        .write(true)
        .open(out)
        .map_err(io_err(out))?;
    let data = history.data_file()?;
    let mut report = ReplayReport {
        ops_applied: 0,
        bytes_applied: 0,
        disk_bytes,
    };
    let mut flushes = 0;
    let mut reached = matches!(target, ReplayTarget::End);
    for ev in history {
        let ev = ev?;
        match (&ev, target) {
            (Event::Op(op), ReplayTarget::Seq(n)) if op.seq > *n => {
                reached = true;
                break;
            }
            (Event::Mark { name, .. }, ReplayTarget::Mark(want)) if name == want => {
                reached = true;
                break;
            }
            (Event::Flush { .. }, ReplayTarget::Flush(k)) => {
                flushes += 1;
                if flushes == *k {
                    reached = true;
                    break;
                }
            }
            _ => {}
        }
        if let Event::Op(op) = ev {
            apply_pieces(&img, out, &op, &op.pieces, &data)?;
            report.ops_applied += 1;
            report.bytes_applied += op.bytes();
        }
    }
    if let ReplayTarget::Seq(_) = target {
        reached = true;
    }
    if !reached {
        return Err(ImageError::TargetNotFound(format!("{target:?}")));
    }
    img.sync_all().map_err(io_err(out))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `subtract_sorted` against a byte-by-byte model.
    #[test]
    fn subtract_sorted_agrees_with_a_byte_model() {
        let cases: [(&[Range], &[Range]); 5] = [
            (&[(0, 100)], &[(10, 10), (50, 60)]),
            (&[(0, 10), (20, 10), (40, 10)], &[(5, 20), (45, 100)]),
            (&[(10, 10)], &[(0, 5), (30, 5)]),
            (&[(0, 8), (8, 0)], &[]),
            (&[(0, 4), (6, 4), (12, 4)], &[(0, 16)]),
        ];
        for (ranges, cut) in cases {
            let inside = |r: &[(u64, u64)], b: u64| r.iter().any(|&(o, l)| b >= o && b < o + l);
            let want: Vec<u64> = (0..200)
                .filter(|&b| inside(ranges, b) && !inside(cut, b))
                .collect();
            let got = subtract_sorted(ranges, cut);
            let got_bytes: Vec<u64> = (0..200).filter(|&b| inside(&got, b)).collect();
            assert_eq!(got_bytes, want, "{ranges:?} - {cut:?} = {got:?}");
            assert!(got.iter().all(|&(_, l)| l > 0), "an empty range: {got:?}");
        }
    }

    /// Scattered ranges past the limit are widened under it, still cover every byte they
    /// covered, stay within the disk and come out sorted and disjoint; few stay as they are.
    #[test]
    fn the_bytes_an_image_holds_are_not_written_again() {
        let log = |offset| Origin::Source {
            source: crate::served::LOG_SOURCE,
            offset,
        };
        let mut held = Layer::new();
        held.put(0, 4096, log(10_000)); // the same bytes as wanted below
        held.put(8192, 4096, log(50_000)); // other bytes of the log
        held.put(16384, 4096, Origin::Zero);
        held.put(24576, 4096, UNKNOWN);
        held.put(40960, 4096, log(90_000)); // not wanted: back to the prefix
        let mut want = Layer::new();
        want.put(0, 8192, log(10_000)); // its first half held already
        want.put(8192, 4096, log(60_000));
        want.put(16384, 4096, Origin::Zero);
        want.put(24576, 4096, log(70_000));
        let writes = unheld_parts(&cut_runs(&held, &[]), &want);
        assert_eq!(
            writes,
            vec![
                (4096, 4096, log(14_096)),
                (8192, 4096, log(60_000)),
                (24576, 4096, log(70_000)),
            ]
        );
        assert_eq!(
            subtract_sorted(&layer_ranges(&held), &layer_ranges(&want)),
            vec![(40960, 4096)]
        );
        // What a restore overwrote (a reflink widened over the first held run) is written
        // again.
        let writes = unheld_parts(&cut_runs(&held, &[(2048, 4096)]), &want);
        assert_eq!(writes[0], (2048, 6144, log(12_048)));
    }

    /// A state whose writing failed half way leaves the image's content unknown where the
    /// two states write: the next state writes those ranges again, rather than trusting what
    /// the image held before (here: the first range already holds the failed state's bytes
    /// when the second one's read fails).
    #[test]
    fn a_state_stopped_half_way_leaves_nothing_trusted() {
        use crate::states::{CrashState, StateKind};
        let dir = tempfile::tempdir().unwrap();
        let disk = 1 << 20;
        let base = dir.path().join("base.img");
        File::create(&base).unwrap().set_len(disk).unwrap();
        let bytes: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8 + 1).collect();
        let (full, short) = (dir.path().join("log"), dir.path().join("short"));
        std::fs::write(&full, &bytes).unwrap();
        std::fs::write(&short, &bytes[..4096]).unwrap();
        let (full, short) = (File::open(&full).unwrap(), File::open(&short).unwrap());
        let op = |seq: u64, offset: u64, payload_offset: u64| Op {
            seq,
            kind: nbd_server::log::RecordKind::Write,
            fua: false,
            offset,
            length: 4096,
            pieces: vec![(offset, 4096)],
            data: crate::history::OpData::Log { payload_offset },
        };
        let epoch = Epoch {
            index: 0,
            ops: vec![op(0, 0, 4096), op(1, 0, 0), op(2, 8192, 8192)],
            marks: Vec::new(),
            end: crate::history::EpochEnd::Flush,
            end_seq: None,
        };
        let state = |id: usize, included: Vec<usize>| CrashState {
            id,
            epoch: 0,
            kind: StateKind::Subset,
            label: "subset".into(),
            included,
            dropped_seqs: Vec::new(),
            torn: None,
            mark: None,
            hash: String::new(),
            duplicate_of: None,
        };
        let prefix = PrefixImage::new(&base, dir.path(), disk, LargerBase::Refuse).unwrap();
        let mut w = WorkerImage::new(&prefix, dir.path().join("w.img")).unwrap();
        w.materialize(&prefix, &epoch, &state(0, vec![0]), &full)
            .unwrap();
        let before = std::fs::metadata(&w.path).unwrap().modified().unwrap();
        let failed = w.materialize(&prefix, &epoch, &state(1, vec![1, 2]), &short);
        assert!(
            failed.is_err(),
            "the short log cannot give the second write"
        );
        // As if it all happened within one tick of the file's clock: the image's change
        // stamp alone does not show it.
        let f = OpenOptions::new().write(true).open(&w.path).unwrap();
        f.set_modified(before).unwrap();
        w.materialize(&prefix, &epoch, &state(0, vec![0]), &full)
            .unwrap();
        let mut fresh = WorkerImage::new(&prefix, dir.path().join("fresh.img")).unwrap();
        fresh
            .materialize(&prefix, &epoch, &state(0, vec![0]), &full)
            .unwrap();
        assert!(
            std::fs::read(&w.path).unwrap() == std::fs::read(&fresh.path).unwrap(),
            "the state after a failed one differs from the same state made afresh"
        );
    }

    /// Past the bound, a worker's runs become fewer, all of unknown content, covering every
    /// range the prefix moved under it.
    #[test]
    fn a_worker_s_runs_past_the_limit_become_fewer_unknown_ones() {
        let dir = tempfile::tempdir().unwrap();
        let disk = 3 * 8192 * DIRTY_RANGES_MAX as u64;
        let base = dir.path().join("base.img");
        File::create(&base).unwrap().set_len(disk).unwrap();
        let prefix = PrefixImage::new(&base, dir.path(), disk, LargerBase::Refuse).unwrap();
        let mut w = WorkerImage::new(&prefix, dir.path().join("w.img")).unwrap();
        let many: Vec<Range> = (0..3 * DIRTY_RANGES_MAX as u64)
            .map(|i| (i * 8192 + 512, 512))
            .collect();
        let ops = many
            .iter()
            .enumerate()
            .map(|(i, &(off, len))| Op {
                seq: i as u64,
                kind: nbd_server::log::RecordKind::Write,
                fua: false,
                offset: off,
                length: len,
                pieces: vec![(off, len)],
                data: crate::history::OpData::Zero,
            })
            .collect();
        let epoch = Epoch {
            index: 0,
            ops,
            marks: Vec::new(),
            end: crate::history::EpochEnd::Flush,
            end_seq: None,
        };
        w.prefix_advanced(&epoch, disk);
        assert!(w.held.runs() <= DIRTY_RANGES_MAX, "{} runs", w.held.runs());
        assert!(w.held.iter().all(|(_, _, from)| from == UNKNOWN));
        let covered = layer_ranges(&w.held);
        assert!(
            subtract_sorted(&many, &covered).is_empty(),
            "a range left out"
        );
    }

    #[test]
    fn dirty_ranges_past_the_limit_are_widened_under_it() {
        let disk = 3 * 8192 * DIRTY_RANGES_MAX as u64 + 1000;
        let many: Vec<Range> = (0..3 * DIRTY_RANGES_MAX as u64)
            .map(|i| (i * 8192 + 512, 512))
            .collect();
        let few = many[..10].to_vec();
        assert_eq!(coarsen(few.clone(), disk), few);
        let out = coarsen(many.clone(), disk);
        assert!(out.len() <= DIRTY_RANGES_MAX, "{} ranges", out.len());
        assert!(out.windows(2).all(|w| w[0].0 + w[0].1 < w[1].0));
        assert!(out.iter().all(|&(o, l)| o + l <= disk));
        let mut i = 0;
        for &(o, l) in &many {
            while out[i].0 + out[i].1 <= o {
                i += 1;
            }
            assert!(
                out[i].0 <= o && o + l <= out[i].0 + out[i].1,
                "{o}+{l} not covered"
            );
        }
    }

    /// `sparse_copy` copies every byte of the first `len`, data in any chunk of a copy
    /// buffer and past the last, and leaves chunks of zeros (written or holes) unallocated.
    #[test]
    fn sparse_copy_copies_the_bytes_and_leaves_zeros_as_holes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        let len = 2 * COPY_CHUNK_BYTES as u64 + 3 * HOLE_BYTES as u64;
        let mut bytes = vec![0u8; len as usize + 4096];
        // Data at the very start, inside a chunk, across a copy-buffer boundary, and in the
        // last partial chunk; written zeros between; the tail past `len` is not copied.
        let runs = [
            (0, 100),
            (5 * HOLE_BYTES as u64 + 7, 3000),
            (COPY_CHUNK_BYTES as u64 - 10, 20),
            (len - 5, 5),
            (len, 4096),
        ];
        for (i, &(at, n)) in runs.iter().enumerate() {
            bytes[at as usize..(at + n) as usize].fill(i as u8 + 1);
        }
        std::fs::write(&src, &bytes).unwrap();
        sparse_copy(&src, &dst, len).unwrap();
        let got = std::fs::read(&dst).unwrap();
        assert_eq!(got.len() as u64, len);
        assert!(got == bytes[..len as usize], "the copy differs");
        // Data lies in at most 6 chunks of HOLE_BYTES; the rest stays unallocated.
        let allocated = std::fs::metadata(&dst).unwrap().blocks() * 512;
        assert!(
            allocated <= 8 * HOLE_BYTES as u64,
            "{allocated} bytes allocated of {len}"
        );
    }

    #[test]
    fn align_out_widens_to_blocks_within_the_disk() {
        assert_eq!(
            align_out(&[(512, 512), (4096, 1), (13_000, 100)], 4096, 14_000),
            vec![(0, 8192), (12_288, 1712)]
        );
    }
}
