//! A raw image file as an export.
//!
//! - READ/WRITE are `pread`/`pwrite` (no shared file offset, so requests run concurrently).
//! - FLUSH is `fdatasync`. A FUA write is `pwritev2` with `RWF_DSYNC`: the kernel writes
//!   the range and makes just that range durable (its data, and the metadata needed to read it
//!   back), as an `O_DSYNC` write would, rather than every dirty page of the file. Where the
//!   kernel refuses the flag (before Linux 4.7), the write is followed by `fdatasync` of the
//!   whole file, a superset of the range. FUA on TRIM and WRITE_ZEROES is `fdatasync`: a hole
//!   punched or zeroed is metadata, which no range sync covers.
//! - TRIM and WRITE_ZEROES without NO_HOLE punch a hole (`FALLOC_FL_PUNCH_HOLE`); WRITE_ZEROES
//!   with NO_HOLE uses `FALLOC_FL_ZERO_RANGE`; where the filesystem supports neither, zero
//!   bytes are written (unless FAST_ZERO asked not to). A trimmed range reads as zeroes.
//! - BLOCK_STATUS uses `SEEK_DATA`/`SEEK_HOLE`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::{Backend, StatusExtent, Ticket, WriteData, WriteFailed};

/// Zeroes are written in pieces of this many bytes when the filesystem cannot punch or zero.
pub const ZERO_WRITE_BYTES_MAX: usize = 1 << 20;
/// Most runs one `block_status` call returns.
pub const STATUS_RUNS_MAX: usize = 4096;

/// Thin wrappers over the Linux calls std does not expose.
mod sys {
    use std::fs::File;
    use std::io;
    use std::os::unix::io::AsRawFd;

    /// `fallocate(2)` on an open file.
    #[allow(unsafe_code)]
    pub fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: the descriptor is owned by `file`, which outlives the call; fallocate reads
        // and writes no memory of this process.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// `pwritev2(2)` of `buf` at `offset` with `RWF_DSYNC`; returns the bytes written, which
    /// are durable when it returns.
    #[allow(unsafe_code)]
    pub fn pwrite_dsync(file: &File, buf: &[u8], offset: u64) -> io::Result<usize> {
        let Ok(off) = i64::try_from(offset) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        let iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: the descriptor is owned by `file`, which outlives the call; the one iovec
        // points at `buf`, which the kernel only reads, for `buf.len()` bytes.
        let r = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, off, libc::RWF_DSYNC) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    /// `flock(2)` with `LOCK_EX | LOCK_NB`: an advisory lock on the open file, released when
    /// it is closed. `Ok(false)` when another open file holds it.
    #[allow(unsafe_code)]
    pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
        // SAFETY: the descriptor is owned by `file`, which outlives the call; flock touches
        // no memory of this process.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(false)
        } else {
            Err(e)
        }
    }

    /// `lseek(2)` with `SEEK_DATA`/`SEEK_HOLE`. Moves the shared file offset, which this
    /// backend never uses (all IO is positional).
    #[allow(unsafe_code)]
    pub fn lseek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<u64> {
        let Ok(off) = i64::try_from(offset) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: as above; lseek touches no memory of this process.
        let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as u64)
        }
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

/// A raw image file.
pub struct FileBackend {
    file: File,
    path: PathBuf,
    size: u64,
    /// Cleared the first time the kernel refuses `RWF_DSYNC`; FUA writes then use `fdatasync`.
    range_sync: AtomicBool,
}

impl FileBackend {
    /// Opens (and unless `readonly`, creates) `path`. With `size`, a shorter writable file is
    /// extended (sparsely) to it; a longer file, or a shorter read-only one, is an error.
    /// Without `size`, the file's length is the export size.
    pub fn open(path: &Path, size: Option<u64>, readonly: bool) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .create(!readonly)
            .truncate(false)
            .open(path)?;
        // As qemu does: a second writer of one image (another export, another server) would
        // interleave its writes with ours behind both caches' backs.
        if !readonly && !sys::try_lock_exclusive(&file)? {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "{} is in use: another writable export or server holds its lock",
                    path.display()
                ),
            ));
        }
        let len = file.metadata()?.len();
        let size = match size {
            None => len,
            Some(s) if s == len => s,
            Some(s) if s > len && !readonly => {
                file.set_len(s)?;
                s
            }
            Some(s) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{} is {len} bytes but the export size is {s} bytes",
                        path.display()
                    ),
                ))
            }
        };
        Ok(FileBackend {
            file,
            path: path.to_owned(),
            size,
            range_sync: AtomicBool::new(true),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether FUA writes still sync just their range (see the module doc).
    pub fn syncs_fua_ranges(&self) -> bool {
        self.range_sync.load(Ordering::Relaxed)
    }

    /// Writes `data` at `offset` and makes it durable before returning.
    fn write_durable(&self, mut offset: u64, mut data: &[u8]) -> io::Result<()> {
        while self.range_sync.load(Ordering::Relaxed) && !data.is_empty() {
            match sys::pwrite_dsync(&self.file, data, offset) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => {
                    data = &data[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if unsupported(&e) => {
                    tracing::info!(
                        path = %self.path.display(),
                        error = %e,
                        "the kernel refuses RWF_DSYNC; FUA writes sync the whole file"
                    );
                    self.range_sync.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        if data.is_empty() {
            return Ok(());
        }
        self.file.write_all_at(data, offset)?;
        self.file.sync_data()
    }

    fn write_zero_bytes(&self, offset: u64, length: u64) -> io::Result<()> {
        let zeroes = vec![0u8; ZERO_WRITE_BYTES_MAX.min(length as usize)];
        let mut pos = 0u64;
        while pos < length {
            let n = (length - pos).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset + pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    fn punch(&self, offset: u64, length: u64) -> io::Result<()> {
        sys::fallocate(
            &self.file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            length,
        )
    }

    fn zero_range(&self, offset: u64, length: u64) -> io::Result<()> {
        sys::fallocate(
            &self.file,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            length,
        )
    }
}

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn can_fast_zero(&self) -> bool {
        true
    }

    fn read(&self, _t: Option<Ticket>, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// One `pwrite` (`pwritev2` for FUA) of the data in one piece; data held in blocks (which
    /// the server never gives a file) is gathered first.
    fn write(
        &self,
        _t: Option<Ticket>,
        offset: u64,
        data: WriteData,
        fua: bool,
    ) -> Result<(), WriteFailed> {
        let gathered;
        let bytes = match data.as_slice() {
            Some(b) => b,
            None => {
                gathered = data.to_vec();
                &gathered
            }
        };
        let written = if fua {
            self.write_durable(offset, bytes)
        } else {
            self.file.write_all_at(bytes, offset)
        };
        written.map_err(WriteFailed::returning(data))
    }

    fn write_zeroes(
        &self,
        _t: Option<Ticket>,
        offset: u64,
        length: u64,
        may_trim: bool,
        fast_only: bool,
        fua: bool,
    ) -> io::Result<()> {
        let fast = if may_trim {
            self.punch(offset, length).or_else(|e| {
                if unsupported(&e) {
                    self.zero_range(offset, length)
                } else {
                    Err(e)
                }
            })
        } else {
            self.zero_range(offset, length)
        };
        match fast {
            Ok(()) => {}
            Err(e) if unsupported(&e) => {
                if fast_only {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "the filesystem cannot zero quickly",
                    ));
                }
                self.write_zero_bytes(offset, length)?;
            }
            Err(e) => return Err(e),
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn trim(&self, _t: Option<Ticket>, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        match self.punch(offset, length) {
            Ok(()) => {}
            // Keep the promise that trimmed bytes read as zeroes.
            Err(e) if unsupported(&e) => self.write_zero_bytes(offset, length)?,
            Err(e) => return Err(e),
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn flush(&self, _t: Option<Ticket>) -> io::Result<()> {
        self.file.sync_data()
    }

    fn block_status(
        &self,
        _t: Option<Ticket>,
        offset: u64,
        length: u64,
    ) -> io::Result<Vec<StatusExtent>> {
        let end = offset + length;
        let mut runs = Vec::new();
        let mut pos = offset;
        while pos < end && runs.len() < STATUS_RUNS_MAX {
            let data = match sys::lseek(&self.file, pos, libc::SEEK_DATA) {
                Ok(d) => d,
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end, // only a hole remains
                Err(e) if unsupported(&e) => {
                    runs.push(StatusExtent {
                        length: end - pos,
                        hole: false,
                        zero: false,
                    });
                    break;
                }
                Err(e) => return Err(e),
            };
            if data > pos {
                let n = data.min(end) - pos;
                runs.push(StatusExtent {
                    length: n,
                    hole: true,
                    zero: true,
                });
                pos += n;
                continue;
            }
            let hole = match sys::lseek(&self.file, pos, libc::SEEK_HOLE) {
                Ok(h) => h.max(pos + 1),
                Err(_) => end,
            };
            let n = hole.min(end) - pos;
            runs.push(StatusExtent {
                length: n,
                hole: false,
                zero: false,
            });
            pos += n;
        }
        Ok(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Option<Ticket> = None;

    #[test]
    fn write_read_trim_status() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        let f = FileBackend::open(&p, Some(4 << 20), false).unwrap();
        assert_eq!(f.size(), 4 << 20);
        f.write(T, 1 << 20, WriteData::copy_of(&[7u8; 65536]), true)
            .unwrap();
        let mut b = vec![0u8; 65536];
        f.read(T, 1 << 20, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 7));
        let s = f.block_status(T, 0, 4 << 20).unwrap();
        assert_eq!(s.iter().map(|r| r.length).sum::<u64>(), 4 << 20);
        assert!(s.iter().any(|r| !r.hole));
        assert!(s[0].hole, "the start was never written: {s:?}");
        f.trim(T, 1 << 20, 65536, false).unwrap();
        f.read(T, 1 << 20, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        f.write(T, 0, WriteData::copy_of(&[1u8; 8192]), false)
            .unwrap();
        f.write_zeroes(T, 0, 8192, false, false, true).unwrap();
        f.read(T, 0, &mut b[..8192]).unwrap();
        assert!(b[..8192].iter().all(|&x| x == 0));
        f.flush(T).unwrap();
    }

    /// Dirty pages of `file` in `[offset, offset + len)`, by `cachestat(2)` (Linux 6.5+).
    #[allow(unsafe_code)]
    fn dirty_pages(file: &File, offset: u64, len: u64) -> io::Result<u64> {
        use std::os::unix::io::AsRawFd;
        /// `cachestat`'s number on x86_64 and every architecture with the generic table.
        const SYS_CACHESTAT: libc::c_long = 451;
        let range = [offset, len];
        // nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted
        let mut stat = [0u64; 5];
        // SAFETY: `range` and `stat` have the layout of `struct cachestat_range` and
        // `struct cachestat` and outlive the call; the descriptor is owned by `file`.
        let r = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                file.as_raw_fd(),
                range.as_ptr(),
                stat.as_mut_ptr(),
                0u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stat[1])
    }

    #[test]
    fn fua_write_syncs_its_range_not_the_whole_file() {
        const DIRTY_BYTES: u64 = 8 << 20;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        let f = FileBackend::open(&p, Some(16 << 20), false).unwrap();
        f.write(
            T,
            0,
            WriteData::bytes(vec![5u8; DIRTY_BYTES as usize]),
            false,
        )
        .unwrap();
        let dirty = match dirty_pages(&f.file, 0, DIRTY_BYTES) {
            Ok(d) => d,
            Err(e) => {
                crate::test_skip::skip(&format!("cachestat(2) failed ({e}); it needs Linux 6.5"));
                return;
            }
        };
        // The control: a plain write leaves its pages dirty (on tmpfs nothing is ever dirty,
        // and this test would measure nothing).
        assert!(
            dirty >= DIRTY_BYTES / 4096 / 2,
            "only {dirty} pages dirty after an {DIRTY_BYTES}-byte write in {}",
            dir.path().display()
        );
        f.write(T, 12 << 20, WriteData::copy_of(&[9u8; 4096]), true)
            .unwrap();
        assert!(f.syncs_fua_ranges(), "RWF_DSYNC refused");
        assert_eq!(dirty_pages(&f.file, 12 << 20, 4096).unwrap(), 0);
        let left = dirty_pages(&f.file, 0, DIRTY_BYTES).unwrap();
        assert!(
            left >= dirty / 2,
            "the FUA write of 4 KiB also wrote back {} of {dirty} other dirty pages",
            dirty - left
        );
        let mut b = [0u8; 4096];
        f.read(T, 12 << 20, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 9));
        // FLUSH writes back everything.
        f.flush(T).unwrap();
        assert_eq!(dirty_pages(&f.file, 0, 16 << 20).unwrap(), 0);
        // A write the kernel splits still ends up whole.
        let big: Vec<u8> = (0..(3 << 20) + 5).map(|i| (i % 251) as u8).collect();
        f.write(T, 4096 + 3, WriteData::copy_of(&big), true)
            .unwrap();
        let mut back = vec![0u8; big.len()];
        f.read(T, 4096 + 3, &mut back).unwrap();
        assert_eq!(back, big);
    }

    #[test]
    fn size_mismatch_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        assert!(FileBackend::open(&p, Some(4096), false).is_err());
        assert!(FileBackend::open(&p, Some(16384), true).is_err());
        assert_eq!(FileBackend::open(&p, None, true).unwrap().size(), 8192);
    }
}
