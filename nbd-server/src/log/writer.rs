//! Appending records to a write log.
//!
//! The file is written with `O_DIRECT` where the filesystem allows it: records gather in an
//! aligned 1 MiB buffer that goes to the file in one write, without passing through the page
//! cache. Through the page cache the same bytes cost about 16 times the CPU (`dd bs=1M` of
//! 4 GB to this machine's ext4: 13.3 s of system time buffered, 0.8 s direct), which under a
//! 4 KiB write load took a quarter of the server's throughput away. A push (a FLUSH or FUA
//! reply waits for one) hands the records not yet in the file to the operating system
//! through the page cache, exactly, with no padding, so a reader always finds the records and
//! nothing after them. Where `O_DIRECT` is refused, the writer falls back to an ordinary
//! buffered file.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::format::*;

/// Appends records to a write log. Not thread-safe by itself: the emulated disk holds it under
/// the same lock that orders its IO, so log order is the order the disk applied things.
pub struct LogWriter {
    out: Out,
    next_seq: u64,
    /// Bytes of the log so far: the file header and every record appended (buffered or not).
    bytes: u64,
    /// The file is allocated (`fallocate`, keeping its size) up to here, so that the record
    /// saying the log disk is full always has room; `None` where the filesystem cannot
    /// allocate ahead.
    reserved_end: Option<u64>,
    /// A full record was written: nothing more is appended.
    full: bool,
    /// A power-cut record was written (the file header's flags then stay 0).
    power_cut: bool,
}

/// Bytes kept allocated past the log's last record for the full record (a header and its
/// small payload, padded to whole blocks by a direct write, from an unaligned start).
pub const LOG_FULL_RESERVE_BYTES: u64 = 2 * DIRECT_IO_ALIGN_BYTES as u64;
/// The allocation ahead of the log grows in steps (one `fallocate` each) as large as the log
/// already is, within these bounds: few calls for a long log, little waste for a short one
/// (a campaign makes thousands of short logs, on tmpfs, where allocating zeroes pages).
pub const LOG_RESERVE_STEP_MIN_BYTES: u64 = 64 * 1024;
pub const LOG_RESERVE_STEP_MAX_BYTES: u64 = 4 * 1024 * 1024;

/// Buffer between the recorder and the file; large enough that a 4 KiB write costs no syscall.
const LOG_BUFFER_BYTES: usize = 1024 * 1024;
/// Alignment of direct IO: offsets, lengths and buffer addresses (the largest logical block
/// size of common devices).
pub const DIRECT_IO_ALIGN_BYTES: usize = 4096;

enum Out {
    Direct(Direct),
    Buffered(io::BufWriter<File>),
}

/// An `O_DIRECT` file and its aligned buffer, which holds the file's bytes from `base` on.
///
/// Whole windows of the buffer go to the file with `O_DIRECT`. A push (at a FLUSH or FUA
/// reply, a mark, `sync`) must hand the records so far to the operating system at once, so
/// that a killed server loses none of them: it writes the bytes not yet in the file through a
/// second, ordinary descriptor (into the page cache: a copy, not a device write, which cost a
/// device round trip of about 150 us per FLUSH and held the connection meanwhile). Those bytes
/// are never written again with `O_DIRECT`: when the window fills, the rest of the pushed
/// block goes the same way, and only the blocks after it go direct.
struct Direct {
    file: File,
    /// The same file without `O_DIRECT`, for pushes.
    plain: File,
    path: PathBuf,
    /// Over-allocated once and never resized, so the window at `start` stays aligned.
    buf: Vec<u8>,
    start: usize,
    /// Bytes of the window in use.
    len: usize,
    /// File offset of the window's first byte (a multiple of the alignment).
    base: u64,
    /// Bytes of the window already in the file (through `plain`).
    pushed: usize,
    /// Tests: the `O_DIRECT` writes fail with EINVAL, as on a filesystem that accepts
    /// `O_DIRECT` at open and refuses the writes.
    #[cfg(test)]
    refuse_writes: bool,
}

/// Opens `path` for writing a new log: truncating what is there, or with `exclusive` refusing
/// an existing file (`O_EXCL`, so nothing that appears meanwhile is overwritten either).
fn open_options(exclusive: bool) -> OpenOptions {
    let mut o = OpenOptions::new();
    o.write(true);
    if exclusive {
        o.create_new(true);
    } else {
        o.create(true).truncate(true);
    }
    o
}

impl Direct {
    fn open(path: &Path, exclusive: bool) -> io::Result<Self> {
        let file = open_options(exclusive)
            .custom_flags(libc::O_DIRECT)
            .open(path)?;
        let plain = OpenOptions::new().write(true).open(path)?;
        let buf = vec![0u8; LOG_BUFFER_BYTES + DIRECT_IO_ALIGN_BYTES];
        let start = buf.as_ptr().align_offset(DIRECT_IO_ALIGN_BYTES);
        if start > DIRECT_IO_ALIGN_BYTES {
            return Err(io::Error::other("cannot align the log buffer"));
        }
        Ok(Direct {
            file,
            plain,
            path: path.to_path_buf(),
            buf,
            start,
            len: 0,
            base: 0,
            pushed: 0,
            #[cfg(test)]
            refuse_writes: false,
        })
    }

    /// One `O_DIRECT` write of whole blocks at `offset`.
    fn write_direct(&self, part: &[u8], offset: u64) -> io::Result<()> {
        #[cfg(test)]
        if self.refuse_writes {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.file.write_all_at(part, offset)
    }

    fn window(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + LOG_BUFFER_BYTES]
    }

    /// Copies `bytes` into the buffer, writing the buffer out whenever it is full. On an
    /// error, says how many bytes were taken before it.
    fn write_all(&mut self, bytes: &[u8]) -> Result<(), (usize, io::Error)> {
        let mut taken = 0;
        while taken < bytes.len() {
            if self.len == LOG_BUFFER_BYTES {
                self.write_window().map_err(|e| (taken, e))?;
            }
            let at = self.len;
            let n = (LOG_BUFFER_BYTES - at).min(bytes.len() - taken);
            self.window()[at..at + n].copy_from_slice(&bytes[taken..taken + n]);
            self.len += n;
            taken += n;
        }
        Ok(())
    }

    /// Writes out the full window: what a push left of its last block through `plain`, the
    /// whole blocks after it with `O_DIRECT`; then starts an empty window after it.
    fn write_window(&mut self) -> io::Result<()> {
        debug_assert_eq!(self.len, LOG_BUFFER_BYTES);
        let direct_from = self.pushed.next_multiple_of(DIRECT_IO_ALIGN_BYTES);
        let start = self.start;
        if self.pushed < direct_from {
            let part = &self.buf[start + self.pushed..start + direct_from];
            self.plain
                .write_all_at(part, self.base + self.pushed as u64)?;
        }
        if direct_from < LOG_BUFFER_BYTES {
            let part = &self.buf[start + direct_from..start + LOG_BUFFER_BYTES];
            self.write_direct(part, self.base + direct_from as u64)?;
        }
        self.base += LOG_BUFFER_BYTES as u64;
        self.len = 0;
        self.pushed = 0;
        Ok(())
    }

    /// Puts the buffered bytes that are not in the file yet there, through the page cache
    /// (see the type's doc): the file then ends exactly at the last record.
    fn push(&mut self) -> io::Result<()> {
        if self.pushed == self.len {
            return Ok(());
        }
        let start = self.start;
        let part = &self.buf[start + self.pushed..start + self.len];
        self.plain
            .write_all_at(part, self.base + self.pushed as u64)?;
        self.pushed = self.len;
        Ok(())
    }
}

impl Out {
    fn create(path: &Path, exclusive: bool) -> io::Result<Out> {
        match Direct::open(path, exclusive) {
            Ok(d) => Ok(Out::Direct(d)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(e),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "write log: no O_DIRECT, buffered");
                // A file O_DIRECT refused was created all the same: this open replaces it.
                let file = open_options(false).open(path)?;
                Ok(Out::Buffered(io::BufWriter::with_capacity(
                    LOG_BUFFER_BYTES,
                    file,
                )))
            }
        }
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Out::Direct(d) => match d.write_all(bytes) {
                Ok(()) => Ok(()),
                Err((taken, e)) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.fall_back()?;
                    self.write_all(&bytes[taken..])
                }
                Err((_, e)) => Err(e),
            },
            Out::Buffered(b) => b.write_all(bytes),
        }
    }

    /// Hands everything appended so far to the operating system.
    fn flush(&mut self) -> io::Result<()> {
        match self {
            // A push writes through the ordinary descriptor: O_DIRECT's refusals (EINVAL,
            // see `write_all`) cannot come from it.
            Out::Direct(d) => d.push(),
            Out::Buffered(b) => b.flush(),
        }
    }

    fn fall_back(&mut self) -> io::Result<()> {
        let Out::Direct(d) = self else {
            return Ok(());
        };
        tracing::debug!(path = %d.path.display(), "write log: O_DIRECT writes refused, buffered");
        let file = OpenOptions::new().write(true).open(&d.path)?;
        file.set_len(d.base)?;
        let mut b = io::BufWriter::with_capacity(LOG_BUFFER_BYTES, file);
        io::Seek::seek(&mut b, io::SeekFrom::Start(d.base))?;
        let (start, len) = (d.start, d.len);
        b.write_all(&d.buf[start..start + len])?;
        b.flush()?;
        *self = Out::Buffered(b);
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        self.flush()?;
        match self {
            Out::Direct(d) => d.plain.sync_data(),
            Out::Buffered(b) => b.get_ref().sync_data(),
        }
    }

    /// Allocates `[offset, offset+len)` of the file without changing its size.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let file = match self {
            Out::Direct(d) => &d.file,
            Out::Buffered(b) => b.get_ref(),
        };
        fallocate_keep_size(file, offset, len)
    }

    /// Overwrites the file header's flags word (through the page cache, after a flush).
    fn write_flags(&self, flags: u32) -> io::Result<()> {
        let file = match self {
            Out::Direct(d) => &d.plain,
            Out::Buffered(b) => b.get_ref(),
        };
        file.write_all_at(&flags.to_le_bytes(), FILE_FLAGS_OFFSET)
    }

    /// Whether the file is written with `O_DIRECT`.
    fn is_direct(&self) -> bool {
        matches!(self, Out::Direct(_))
    }
}

/// `fallocate(2)` with `FALLOC_FL_KEEP_SIZE`.
#[allow(unsafe_code)]
fn fallocate_keep_size(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: the descriptor is owned by `file`, which outlives the call; fallocate reads and
    // writes no memory of this process.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, off, len) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn is_enospc(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

impl LogWriter {
    /// Creates `path` (truncating whatever is there: the caller decides whether that is
    /// allowed) and writes the file header.
    pub fn create(path: &Path, disk_bytes: u64) -> Result<Self, LogError> {
        Self::start(path, disk_bytes, false)
    }

    /// [`Self::create`], refusing a file that already exists at `path`.
    pub fn create_new(path: &Path, disk_bytes: u64) -> Result<Self, LogError> {
        Self::start(path, disk_bytes, true)
    }

    fn start(path: &Path, disk_bytes: u64, exclusive: bool) -> Result<Self, LogError> {
        let mut w = LogWriter {
            out: Out::create(path, exclusive)?,
            next_seq: 0,
            bytes: 0,
            reserved_end: Some(0),
            full: false,
            power_cut: false,
        };
        let header = FileHeader::new(disk_bytes).encode();
        if w.reserve(header.len() as u64).is_err() {
            return Err(LogError::LogDiskFull);
        }
        w.out.write_all(&header)?;
        w.bytes = header.len() as u64;
        w.sync()?;
        Ok(w)
    }

    /// Bytes of the log so far (file header and records, buffered ones included).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Makes sure the file is allocated up to `end` plus room for the full record. Where the
    /// filesystem cannot allocate ahead, it does nothing. `Err` means there is no room.
    fn reserve(&mut self, end: u64) -> Result<(), ()> {
        let Some(reserved) = self.reserved_end else {
            return Ok(());
        };
        let need = end + LOG_FULL_RESERVE_BYTES;
        if need <= reserved {
            return Ok(());
        }
        // A whole step when there is room for it, else just what this record needs.
        let step = reserved.clamp(LOG_RESERVE_STEP_MIN_BYTES, LOG_RESERVE_STEP_MAX_BYTES);
        for to in [need + step, need] {
            match self.out.allocate(reserved, to - reserved) {
                Ok(()) => {
                    self.reserved_end = Some(to);
                    return Ok(());
                }
                Err(e) if is_enospc(&e) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "write log: cannot allocate ahead");
                    self.reserved_end = None;
                    return Ok(());
                }
            }
        }
        Err(())
    }

    /// Ends the log with a full record saying its disk is full (in the room kept for it) and
    /// puts it on stable storage; nothing more is appended afterwards.
    fn end_full(&mut self) -> Result<u64, LogError> {
        let payload = encode_payload(&FullPayload {
            reason: FullReason::LogDiskFull,
            log_bytes: self.bytes,
        });
        let seq = self.write_record(&RecordHead::event(RecordKind::Full, 0), &[&payload])?;
        self.full = true;
        self.out.sync()?;
        Ok(seq)
    }

    /// Sequence number the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Whether the log bypasses the page cache (`O_DIRECT`); false where the filesystem
    /// refused it and the log is written through the page cache instead.
    pub fn is_direct(&self) -> bool {
        self.out.is_direct()
    }

    /// Appends one record and returns its sequence number (for tools that write logs of
    /// their own; see [`Self::append_parts`]).
    pub fn append(
        &mut self,
        kind: RecordKind,
        flags: u8,
        conn: u64,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Result<u64, LogError> {
        let head = RecordHead {
            kind,
            flags,
            conn,
            offset,
            length,
        };
        self.append_parts(&head, &[payload])
    }

    /// Appends the record `head` says, with a payload held in pieces (their concatenation is
    /// the payload), and returns its sequence number. Mark, fault and power-cut records push
    /// the buffer to the file, so a reader started later sees them (flush records do not:
    /// they come too often; the recorder pushes the buffer whenever it runs out of work).
    /// When the log's filesystem has no room for the record, the log ends with a full
    /// record instead and [`LogError::LogDiskFull`] is returned (then and ever after).
    pub fn append_parts(&mut self, head: &RecordHead, parts: &[&[u8]]) -> Result<u64, LogError> {
        if self.full {
            return Err(LogError::LogDiskFull);
        }
        let payload_len: usize = parts.iter().map(|p| p.len()).sum();
        let end = self.bytes + (RECORD_HEADER_BYTES + payload_len) as u64;
        if self.reserve(end).is_err() {
            tracing::error!(
                "the disk of the write log is full at {} bytes; the log ends here",
                self.bytes
            );
            self.end_full()?;
            return Err(LogError::LogDiskFull);
        }
        match self.write_record(head, parts) {
            Err(LogError::Io(e)) if is_enospc(&e) => Err(LogError::LogDiskFull),
            r => r,
        }
    }

    /// Appends one record to the buffer (and the file, as the buffer fills).
    fn write_record(&mut self, head: &RecordHead, parts: &[&[u8]]) -> Result<u64, LogError> {
        let payload_len: usize = parts.iter().map(|p| p.len()).sum();
        assert!(payload_len <= RECORD_PAYLOAD_BYTES_MAX as usize);
        if head.kind == RecordKind::Write {
            assert_eq!(
                payload_len as u64, head.length,
                "a write record carries its data"
            );
        }
        let seq = self.next_seq;
        let header = RecordHeader::seal_parts(head, seq, parts);
        self.out.write_all(&header.encode())?;
        for p in parts {
            self.out.write_all(p)?;
        }
        self.next_seq += 1;
        self.bytes += (RECORD_HEADER_BYTES + payload_len) as u64;
        self.power_cut |= head.kind == RecordKind::PowerCut;
        if matches!(
            head.kind,
            RecordKind::Mark | RecordKind::PowerCut | RecordKind::Fault | RecordKind::Full
        ) {
            self.out.flush()?;
        }
        Ok(seq)
    }

    /// Pushes buffered records to the file. A direct-IO log may then end in zero padding up
    /// to the next 4 KiB boundary (a torn tail to readers) until [`Self::sync`] or drop.
    pub fn flush(&mut self) -> Result<(), LogError> {
        self.out.flush()?;
        Ok(())
    }

    /// Pushes buffered records and waits for the file to reach stable storage. The file is
    /// cut to its true length, which frees what was allocated ahead of it.
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.out.sync()?;
        if self.reserved_end.is_some() {
            self.reserved_end = Some(self.bytes);
        }
        Ok(())
    }
}

#[cfg(test)]
impl LogWriter {
    /// From here on the file's `O_DIRECT` writes fail with EINVAL (see `Direct::refuse_writes`).
    fn refuse_direct_writes(&mut self) {
        if let Out::Direct(d) = &mut self.out {
            d.refuse_writes = true;
        }
    }
}

impl Drop for LogWriter {
    /// Pushes what is buffered, then, when no power-cut record was written, says so in the
    /// file header ([`FILE_FLAG_NO_POWER_CUTS`]), last: a log whose writer stopped before
    /// this keeps 0 there, and a reader makes its first pass for power cuts.
    fn drop(&mut self) {
        if let Err(e) = self.out.flush() {
            tracing::error!("write log: final flush failed: {e}");
            return;
        }
        if !self.power_cut {
            if let Err(e) = self.out.write_flags(FILE_FLAG_NO_POWER_CUTS) {
                tracing::error!("write log: the file header's flags: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct writer leaves exactly the bytes a plain buffered file would: records of
    /// every size across buffer boundaries, flushed at unaligned points, read back whole.
    #[test]
    fn direct_and_buffered_files_hold_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.log");
        let Some(mut w) = direct_writer(&path) else {
            return;
        };
        let mut expect = FileHeader::new(1 << 30).encode().to_vec();
        let sizes = [
            1usize,
            511,
            4096,
            4097,
            100_000,
            1 << 20,
            3 * (1 << 20) + 5,
            0,
        ];
        for (i, &n) in sizes.iter().cycle().take(40).enumerate() {
            append_expecting(&mut w, &mut expect, i, n);
            if i % 3 == 0 {
                w.sync().unwrap();
                assert_eq!(std::fs::read(&path).unwrap(), expect, "after record {i}");
            } else if i % 3 == 1 {
                // Pushed: the file holds exactly the records so far.
                w.flush().unwrap();
                assert_eq!(std::fs::read(&path).unwrap(), expect, "after record {i}");
            }
        }
        drop(w);
        assert_eq!(std::fs::read(&path).unwrap(), closed(expect));
    }

    /// `bytes` of a log as its writer leaves them when it closes it without a power cut: the
    /// file header's flags say so.
    fn closed(mut bytes: Vec<u8>) -> Vec<u8> {
        let at = FILE_FLAGS_OFFSET as usize;
        bytes[at..at + 4].copy_from_slice(&FILE_FLAG_NO_POWER_CUTS.to_le_bytes());
        bytes
    }

    /// A new log at `path` written with `O_DIRECT`; `None` where the filesystem refuses it and
    /// the skip policy lets the test skip (see `test_skip`).
    fn direct_writer(path: &Path) -> Option<LogWriter> {
        let w = LogWriter::create(path, 1 << 30).unwrap();
        if !w.is_direct() {
            let folder = path.parent().unwrap_or(path);
            let reason = format!("{} refuses O_DIRECT", folder.display());
            if !crate::test_skip::skip(&reason) {
                return None;
            }
        }
        Some(w)
    }

    /// Appends record `i` with `n` bytes of payload, and its bytes to `expect`.
    fn append_expecting(w: &mut LogWriter, expect: &mut Vec<u8>, i: usize, n: usize) {
        let payload: Vec<u8> = (0..n).map(|b| (b * 7 + i) as u8).collect();
        let head = RecordHead {
            kind: RecordKind::Write,
            flags: 0,
            conn: 1,
            offset: (i * 4096) as u64,
            length: n as u64,
        };
        let seq = w
            .append(
                head.kind,
                head.flags,
                head.conn,
                head.offset,
                n as u64,
                &payload,
            )
            .unwrap();
        assert_eq!(seq, i as u64);
        let h = RecordHeader::seal(&head, seq, &payload);
        expect.extend_from_slice(&h.encode());
        expect.extend_from_slice(&payload);
    }

    /// A filesystem that accepts `O_DIRECT` at open and refuses the writes: the writer goes
    /// on through the page cache from where its buffer starts, and the file holds every
    /// record exactly, whether the refusal comes at the first window, after pushes, or after
    /// windows went direct.
    #[test]
    fn refused_direct_writes_fall_back_to_buffered_keeping_every_record() {
        for refuse_at in [0usize, 3, 7] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("w.log");
            let Some(mut w) = direct_writer(&path) else {
                return;
            };
            let mut expect = FileHeader::new(1 << 30).encode().to_vec();
            for i in 0..12 {
                if i == refuse_at {
                    w.refuse_direct_writes();
                }
                append_expecting(&mut w, &mut expect, i, [300_000, 4097, 1 << 20][i % 3]);
                if i % 4 == 1 {
                    w.flush().unwrap();
                }
            }
            assert!(
                !w.is_direct(),
                "refused at record {refuse_at}: still direct"
            );
            w.sync().unwrap();
            assert_eq!(
                std::fs::read(&path).unwrap(),
                expect,
                "refused at {refuse_at}"
            );
            append_expecting(&mut w, &mut expect, 12, 5000);
            drop(w);
            assert_eq!(
                std::fs::read(&path).unwrap(),
                closed(expect),
                "refused at {refuse_at}"
            );
        }
    }

    /// `create_new` leaves an existing file alone; `create` replaces it with a new log.
    #[test]
    fn create_new_refuses_an_existing_file_and_create_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.log");
        std::fs::write(&path, b"precious").unwrap();
        let err = LogWriter::create_new(&path, 1 << 20).err().unwrap();
        assert!(
            matches!(&err, LogError::Io(e) if e.kind() == io::ErrorKind::AlreadyExists),
            "{err:?}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        let w = LogWriter::create(&path, 1 << 20).unwrap();
        assert_eq!((w.bytes(), w.next_seq()), (FILE_HEADER_BYTES as u64, 0));
        drop(w);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            closed(FileHeader::new(1 << 20).encode().to_vec())
        );
        let fresh = dir.path().join("new.log");
        drop(LogWriter::create_new(&fresh, 1 << 20).unwrap());
        assert_eq!(std::fs::metadata(&fresh).unwrap().len(), 32);
    }

    /// Mark, fault, power-cut and full records reach the file as they are appended (a reader
    /// started later sees them, and every record before them); writes and flushes wait in the
    /// buffer for a push.
    #[test]
    fn events_reach_the_file_at_once_and_data_waits_for_a_push() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.log");
        let mut w = LogWriter::create(&path, 1 << 30).unwrap();
        let file_len = || std::fs::metadata(&path).unwrap().len();
        let mut expect = FileHeader::new(1 << 30).encode().to_vec();
        let kinds = [
            (RecordKind::Write, false),
            (RecordKind::Flush, false),
            (RecordKind::Mark, true),
            (RecordKind::Trim, false),
            (RecordKind::Fault, true),
            (RecordKind::WriteZeroes, false),
            (RecordKind::PowerCut, true),
            (RecordKind::Full, true),
        ];
        let mut in_file = expect.len() as u64;
        for (i, (kind, pushed)) in kinds.into_iter().enumerate() {
            let payload: Vec<u8> = match kind {
                RecordKind::Write => vec![i as u8; 700],
                RecordKind::Trim | RecordKind::WriteZeroes => vec![],
                _ => vec![b'e'; i],
            };
            let head = RecordHead {
                kind,
                flags: 0,
                conn: 2,
                offset: 4096,
                length: if kind.is_data() { 700 } else { 0 },
            };
            let seq = w.append_parts(&head, &[&payload]).unwrap();
            assert_eq!((seq, w.next_seq()), (i as u64, i as u64 + 1));
            expect.extend_from_slice(&RecordHeader::seal(&head, seq, &payload).encode());
            expect.extend_from_slice(&payload);
            assert_eq!(w.bytes(), expect.len() as u64, "{kind:?}");
            if pushed {
                in_file = expect.len() as u64;
            }
            assert_eq!(file_len(), in_file, "after a {kind:?} record");
        }
        assert_eq!(std::fs::read(&path).unwrap(), expect);
    }

    /// The log is allocated ahead of its last record, always with room for the full record,
    /// in steps that grow with the log up to their bound (few `fallocate` calls for a long
    /// log); `sync` forgets what was allocated past the last record.
    #[test]
    fn the_log_is_allocated_ahead_in_bounded_steps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.log");
        let mut w = LogWriter::create(&path, 1 << 30).unwrap();
        let Some(mut reserved) = w.reserved_end else {
            crate::test_skip::skip("the test folder's filesystem cannot allocate ahead");
            return;
        };
        let mut growths = 0;
        let payload = vec![5u8; 4096];
        for i in 0..4096u64 {
            w.append(RecordKind::Write, 0, 1, i * 4096, 4096, &payload)
                .unwrap();
            let now = w.reserved_end.expect("still allocating ahead");
            assert!(now >= w.bytes() + LOG_FULL_RESERVE_BYTES, "record {i}");
            let bound = w.bytes() + LOG_FULL_RESERVE_BYTES + LOG_RESERVE_STEP_MAX_BYTES;
            assert!(now <= bound, "record {i}: {now} allocated, bound {bound}");
            if now != reserved {
                growths += 1;
                assert!(now - reserved >= LOG_RESERVE_STEP_MIN_BYTES, "record {i}");
                reserved = now;
            }
        }
        // 16 MiB of records: steps of 64 KiB doubling to 4 MiB, then 4 MiB.
        assert!((7..=12).contains(&growths), "{growths} allocations");
        w.flush().unwrap();
        let allocated =
            std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path).unwrap()) * 512;
        assert!(
            allocated >= reserved,
            "{allocated} bytes allocated of {reserved}"
        );
        w.sync().unwrap();
        assert_eq!(w.reserved_end, Some(w.bytes()));
    }

    /// A tmpfs of `bytes`; `None` where mounting needs root this process lacks (and the skip
    /// policy allows skipping).
    fn small_fs(bytes: u64) -> Option<crate::test_tmpfs::Tmpfs> {
        let fs = crate::test_tmpfs::Tmpfs::try_mount(bytes);
        if fs.is_none() {
            crate::test_skip::skip("mounting a tmpfs needs root");
        }
        fs
    }

    /// Where the filesystem cannot allocate ahead, a record that meets a full filesystem is
    /// refused as [`LogError::LogDiskFull`] (not as an IO error), and so is every later one.
    #[test]
    fn without_allocation_ahead_a_full_filesystem_refuses_records_as_full() {
        const FS_BYTES: u64 = 128 * 1024;
        let Some(fs) = small_fs(FS_BYTES) else {
            return;
        };
        let path = fs.dir.path().join("w.log");
        let mut w = LogWriter::create(&path, 1 << 30).unwrap();
        w.sync().unwrap();
        w.reserved_end = None; // as on a filesystem without fallocate
        let payload = vec![3u8; 16384];
        let mut refused = None;
        for i in 0..64u64 {
            // Power-cut records go to the file as they are appended.
            match w.append(RecordKind::PowerCut, 0, 0, 0, 0, &payload) {
                Ok(seq) => assert_eq!(seq, i),
                Err(LogError::LogDiskFull) => {
                    refused = Some(i);
                    break;
                }
                Err(e) => panic!("record {i}: {e:?}"),
            }
        }
        let refused = refused.expect("a 128 KiB filesystem fills");
        assert!(refused >= 6, "refused at record {refused}");
        assert_eq!(w.reserved_end, None);
    }

    /// Records that end exactly at page boundaries fill a tmpfs to its last page: the room
    /// kept past the last record still takes the full record (without it, the full record
    /// itself meets ENOSPC and the log ends torn, with an IO error).
    #[test]
    fn a_log_full_at_a_page_boundary_still_has_room_for_its_full_record() {
        let Some(fs) = small_fs(128 * 1024) else {
            return;
        };
        let path = fs.dir.path().join("w.log");
        let mut w = LogWriter::create(&path, 1 << 30).unwrap();
        let page = 4096;
        for i in 0..64u64 {
            // The first record ends the file header's page; each later one is a page.
            let first = i == 0;
            let n = page - RECORD_HEADER_BYTES - if first { FILE_HEADER_BYTES } else { 0 };
            match w.append(RecordKind::PowerCut, 0, 0, 0, 0, &vec![1; n]) {
                Ok(_) => assert_eq!(w.bytes() % page as u64, 0),
                Err(LogError::LogDiskFull) => break,
                Err(e) => panic!("record {i}: {e:?}"),
            }
        }
        drop(w);
        let mut r = crate::log::LogReader::open(&path).unwrap();
        assert!(r.by_ref().all(|rec| rec.is_ok()));
        assert!(
            matches!(r.ending(), crate::log::LogEnding::Full { .. }),
            "{:?}",
            r.ending()
        );
    }

    /// When the log's filesystem fills, the log ends with a full record in the room kept for
    /// it: every record before it whole, the record saying how long the log was, the file
    /// ending right after it, and every later append refused.
    #[test]
    fn a_full_log_disk_ends_the_log_with_a_full_record() {
        const FS_BYTES: u64 = 256 * 1024;
        let Some(fs) = small_fs(FS_BYTES) else {
            return;
        };
        let path = fs.dir.path().join("w.log");
        let mut w = LogWriter::create(&path, 1 << 30).unwrap();
        let mut before = 0;
        let mut written = 0u64;
        for i in 0..1000u64 {
            before = w.bytes();
            match w.append(RecordKind::Write, 0, 1, i * 16384, 16384, &[i as u8; 16384]) {
                Ok(seq) => assert_eq!(seq, i),
                Err(LogError::LogDiskFull) => break,
                Err(e) => panic!("record {i}: {e}"),
            }
            written += 1;
        }
        // The log fills its filesystem to within a record or so (an allocation ahead that
        // does not fit is retried with just what the record needs).
        let record = (RECORD_HEADER_BYTES + 16384) as u64;
        let most = (FS_BYTES - FILE_HEADER_BYTES as u64 - LOG_FULL_RESERVE_BYTES) / record;
        assert!(
            (most - 1..=most).contains(&written),
            "{written} records of at most {most}"
        );
        let full_bytes = (RECORD_HEADER_BYTES + FULL_PAYLOAD_BYTES) as u64;
        assert_eq!(w.bytes(), before + full_bytes);
        for kind in [RecordKind::Mark, RecordKind::Write] {
            let n = if kind == RecordKind::Write { 1 } else { 0 };
            let err = w.append(kind, 0, 0, 0, n, &vec![1; n as usize]);
            assert!(
                matches!(err, Err(LogError::LogDiskFull)),
                "{kind:?}: {err:?}"
            );
        }
        drop(w);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), before + full_bytes);
        let mut r = crate::log::LogReader::open(&path).unwrap();
        let recs: Vec<_> = r.by_ref().collect::<Result<_, _>>().unwrap();
        assert_eq!(recs.len() as u64, written + 1);
        for (i, rec) in recs[..written as usize].iter().enumerate() {
            assert_eq!(r.read_payload(rec).unwrap(), vec![i as u8; 16384]);
        }
        assert_eq!(
            r.ending(),
            crate::log::LogEnding::Full {
                seq: written,
                reason: FullReason::LogDiskFull,
                log_bytes: before
            }
        );
    }
}
