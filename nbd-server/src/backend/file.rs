//! A raw image file as an export.
//!
//! - READ/WRITE are `pread`/`pwrite` (no shared file offset, so requests run concurrently).
//! - FLUSH is `fdatasync`; a FUA write is the write followed by `fdatasync` (the whole file's
//!   dirty data, a superset of the range, which is what FUA requires at least).
//! - TRIM and WRITE_ZEROES without NO_HOLE punch a hole (`FALLOC_FL_PUNCH_HOLE`); WRITE_ZEROES
//!   with NO_HOLE uses `FALLOC_FL_ZERO_RANGE`; where the filesystem supports neither, zero
//!   bytes are written (unless FAST_ZERO asked not to). A trimmed range reads as zeroes.
//! - BLOCK_STATUS uses `SEEK_DATA`/`SEEK_HOLE`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{Backend, StatusExtent, Ticket};

/// Zeroes are written in pieces of this many bytes when the filesystem cannot punch or zero.
pub const ZERO_WRITE_BYTES_MAX: usize = 1 << 20;
/// Most runs one `block_status` call returns.
pub const STATUS_RUNS_MAX: usize = 4096;

/// Thin wrappers over the three Linux calls std does not expose.
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
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
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

    fn read(&self, _t: Ticket, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write(&self, _t: Ticket, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.file.write_all_at(data, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn write_zeroes(
        &self,
        _t: Ticket,
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

    fn trim(&self, _t: Ticket, offset: u64, length: u64, fua: bool) -> io::Result<()> {
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

    fn flush(&self, _t: Ticket) -> io::Result<()> {
        self.file.sync_data()
    }

    fn block_status(&self, _t: Ticket, offset: u64, length: u64) -> io::Result<Vec<StatusExtent>> {
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

    const T: Ticket = Ticket(0);

    #[test]
    fn write_read_trim_status() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        let f = FileBackend::open(&p, Some(4 << 20), false).unwrap();
        assert_eq!(f.size(), 4 << 20);
        f.write(T, 1 << 20, &[7u8; 65536], true).unwrap();
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
        f.write(T, 0, &[1u8; 8192], false).unwrap();
        f.write_zeroes(T, 0, 8192, false, false, true).unwrap();
        f.read(T, 0, &mut b[..8192]).unwrap();
        assert!(b[..8192].iter().all(|&x| x == 0));
        f.flush(T).unwrap();
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
