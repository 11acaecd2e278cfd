//! Copy-on-write images: a prefix image that advances epoch by epoch, and per-worker images
//! that differ from it only in a tracked delta. Turning a worker image into a new crash state
//! costs the size of the old delta plus the new one, never the length of the log before it.
//! Also: sparse copies and plain replay of a log into an image.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

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
pub fn sparse_copy(src: &Path, dst: &Path, len: u64) -> Result<(), ImageError> {
    let from = File::open(src).map_err(io_err(src))?;
    let to = File::create(dst).map_err(io_err(dst))?;
    to.set_len(len).map_err(io_err(dst))?;
    let mut buf = vec![0u8; COPY_CHUNK_BYTES];
    let mut at = 0u64;
    while at < len {
        let n = ((len - at) as usize).min(COPY_CHUNK_BYTES);
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
    /// Ranges where this image may differ from the prefix image.
    dirty: Vec<(u64, u64)>,
    stamp: Option<(SystemTime, u64)>,
}

impl WorkerImage {
    pub fn new(prefix: &PrefixImage, path: PathBuf) -> Result<Self, ImageError> {
        sparse_copy(&prefix.path, &path, prefix.disk_bytes)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(WorkerImage {
            path,
            file,
            dirty: Vec::new(),
            stamp: None,
        })
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
        // If the last checker changed the image, the delta no longer describes it: start over.
        if let Some(stamp) = self.stamp {
            if self.stamp_now()? != stamp {
                tracing::debug!(
                    "{}: changed by the checker; copying the prefix again",
                    self.path.display()
                );
                sparse_copy(&prefix.path, &self.path, prefix.disk_bytes)?;
                self.file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&self.path)
                    .map_err(io_err(&self.path))?;
                self.dirty.clear();
            }
        }
        let mut buf = vec![0u8; COPY_CHUNK_BYTES];
        for &(off, len) in &self.dirty {
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
        let mut dirty = Vec::new();
        for &i in &state.included {
            let op = &epoch.ops[i];
            apply_pieces(&self.file, &self.path, op, &op.pieces, log)?;
            dirty.extend_from_slice(&op.pieces);
        }
        if let Some(t) = &state.torn {
            apply_pieces(&self.file, &self.path, &epoch.ops[t.index], &t.pieces, log)?;
            dirty.extend_from_slice(&t.pieces);
        }
        self.dirty = merge(dirty);
        self.stamp = Some(self.stamp_now()?);
        Ok(())
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

    /// The prefix moved past `epoch`: its ranges now differ from this image too.
    pub fn prefix_advanced(&mut self, epoch: &Epoch) {
        let mut d = std::mem::take(&mut self.dirty);
        for op in &epoch.ops {
            d.extend_from_slice(&op.pieces);
        }
        self.dirty = merge(d);
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
