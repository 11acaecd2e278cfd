//! Streaming reader of a write log: bounded memory whatever the log's size.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::format::*;

/// Payloads are checksummed in chunks of this size, never held whole while scanning.
const CRC_CHUNK_BYTES: usize = 64 * 1024;

/// One record as the reader found it: its header and where its payload lives in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub header: RecordHeader,
    pub kind: RecordKind,
    /// Byte offset of the record header in the log file.
    pub file_offset: u64,
}

impl Record {
    pub fn seq(&self) -> u64 {
        self.header.seq
    }
    /// Byte offset of the payload in the log file.
    pub fn payload_offset(&self) -> u64 {
        self.file_offset + RECORD_HEADER_BYTES as u64
    }
    pub fn payload_len(&self) -> u64 {
        self.header.payload_len as u64
    }
}

/// Reads records one at a time. After the last whole record it returns `None`; a torn tail is
/// reported by [`LogReader::torn_tail_bytes`].
pub struct LogReader {
    stream: BufReader<File>,
    /// A second handle for positional payload reads, so they never disturb the stream.
    file: File,
    header: FileHeader,
    pos: u64,
    file_len: u64,
    next_seq: u64,
    torn_tail_bytes: u64,
    /// The full record met so far: its sequence number and payload.
    full: Option<(u64, FullPayload)>,
    /// The buffer payloads are read and checksummed through, kept from record to record.
    chunk: Vec<u8>,
    /// The log's bytes read since [`LogReader::take_kept`], when asked to keep them.
    kept: Option<Kept>,
    done: bool,
}

/// The log's bytes as the reader read them, from file offset `start` on, at most `max`;
/// `overflowed` once more were read (then none are kept until the next take).
struct Kept {
    start: u64,
    bytes: Vec<u8>,
    max: usize,
    overflowed: bool,
}

/// A run of a log's bytes kept by [`LogReader::take_kept`]: `bytes` are the file's bytes
/// from offset `start`.
#[derive(Debug, Default)]
pub struct KeptBytes {
    pub start: u64,
    pub bytes: Vec<u8>,
}

impl LogReader {
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let file = File::open(path)?;
        let file_len = file.metadata()?.len();
        let mut stream = BufReader::with_capacity(256 * 1024, file.try_clone()?);
        let mut raw = [0u8; FILE_HEADER_BYTES];
        if file_len < FILE_HEADER_BYTES as u64 {
            return Err(LogError::Corrupt {
                offset: 0,
                what: format!("file is {file_len} bytes, shorter than the file header"),
            });
        }
        stream.read_exact(&mut raw)?;
        let header = FileHeader::decode(&raw)?;
        Ok(LogReader {
            stream,
            file,
            header,
            pos: FILE_HEADER_BYTES as u64,
            file_len,
            next_seq: 0,
            torn_tail_bytes: 0,
            full: None,
            chunk: Vec::new(),
            kept: None,
            done: false,
        })
    }

    /// From here on, keeps the bytes of the records it reads (headers and payloads, as in
    /// the file), at most `max` between two [`Self::take_kept`]: a caller that needs the
    /// payloads again (to hash them) then has them without reading the file a second time.
    pub fn keep_bytes(&mut self, max: usize) {
        self.kept = Some(Kept {
            start: self.pos,
            bytes: Vec::new(),
            max,
            overflowed: false,
        });
    }

    /// The bytes kept since the last take (none if more than the bound were read, or none
    /// at all), and keeps on from here into `spare` (a buffer given back, so that no new
    /// memory is touched).
    pub fn take_kept(&mut self, mut spare: Vec<u8>) -> Option<KeptBytes> {
        let kept = self.kept.as_mut()?;
        spare.clear();
        let bytes = std::mem::replace(&mut kept.bytes, spare);
        let start = std::mem::replace(&mut kept.start, self.pos);
        let overflowed = std::mem::replace(&mut kept.overflowed, false);
        (!overflowed && !bytes.is_empty()).then_some(KeptBytes { start, bytes })
    }

    pub fn file_header(&self) -> &FileHeader {
        &self.header
    }

    /// Size of the recorded disk.
    pub fn disk_bytes(&self) -> u64 {
        self.header.disk_bytes
    }

    /// Bytes at the end of the file that form no whole record (0 if none, or not there yet).
    pub fn torn_tail_bytes(&self) -> u64 {
        self.torn_tail_bytes
    }

    /// Reads a record's whole payload (bounded by [`RECORD_PAYLOAD_BYTES_MAX`]).
    pub fn read_payload(&self, rec: &Record) -> Result<Vec<u8>, LogError> {
        let mut buf = vec![0u8; rec.payload_len() as usize];
        self.file.read_exact_at(&mut buf, rec.payload_offset())?;
        Ok(buf)
    }

    /// Reads part of a record's payload into `buf`, from `offset` within the payload.
    pub fn read_payload_at(
        &self,
        rec: &Record,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), LogError> {
        assert!(offset + buf.len() as u64 <= rec.payload_len());
        self.file
            .read_exact_at(buf, rec.payload_offset() + offset)?;
        Ok(())
    }

    /// A handle other threads can use to read payloads by position.
    pub fn payload_file(&self) -> Result<File, LogError> {
        Ok(self.file.try_clone()?)
    }

    /// The records of the log by their headers alone, from the first, without reading or
    /// checking a payload: a quick first pass over a long log (one `pread` of a header per
    /// record; reading every payload through the stream and checksumming it took a tenth
    /// of generating a 1 GiB log's crash states). It ends quietly at the first header the
    /// full pass would stop at or refuse (that pass says why), and does not move the stream.
    /// A failed read is an error (it ends the pass too): a pass that ended quietly there
    /// could miss a power cut the full pass then reads.
    pub fn headers(&self) -> impl Iterator<Item = Result<Record, LogError>> + '_ {
        let mut pos = FILE_HEADER_BYTES as u64;
        let mut seq = 0;
        let mut failed = false;
        std::iter::from_fn(move || {
            let mut raw = [0u8; RECORD_HEADER_BYTES];
            if failed || pos + RECORD_HEADER_BYTES as u64 > self.file_len {
                return None;
            }
            if let Err(e) = self.file.read_exact_at(&mut raw, pos) {
                failed = true;
                return Some(Err(e.into()));
            }
            let header = RecordHeader::decode(&raw);
            let kind = header
                .kind()
                .filter(|_| header.header_ok(&raw) && header.seq == seq)?;
            let end = pos + RECORD_HEADER_BYTES as u64 + header.payload_len as u64;
            if header.payload_len > RECORD_PAYLOAD_BYTES_MAX || end > self.file_len {
                return None;
            }
            let rec = Record {
                header,
                kind,
                file_offset: pos,
            };
            (pos, seq) = (end, seq + 1);
            Some(Ok(rec))
        })
    }

    /// Reads a record's whole payload, as [`Self::read_payload`], and checks the record's
    /// checksum (for a record met by [`Self::headers`]).
    pub fn read_checked_payload(&self, rec: &Record) -> Result<Vec<u8>, LogError> {
        let payload = self.read_payload(rec)?;
        if rec.header.record_crc(&[&payload]) != rec.header.crc {
            return Err(LogError::Corrupt {
                offset: rec.file_offset,
                what: "record checksum mismatch".into(),
            });
        }
        Ok(payload)
    }

    fn corrupt(&self, what: impl Into<String>) -> LogError {
        LogError::Corrupt {
            offset: self.pos,
            what: what.into(),
        }
    }

    /// Whether every byte from `from` to the end of the file is zero: the shape of a tail
    /// whose space was allocated but never written.
    fn zeroes_to_end(&self, from: u64) -> Result<bool, LogError> {
        let mut buf = vec![0u8; CRC_CHUNK_BYTES];
        let mut at = from;
        while at < self.file_len {
            let n = ((self.file_len - at) as usize).min(CRC_CHUNK_BYTES);
            self.file.read_exact_at(&mut buf[..n], at)?;
            if buf[..n].iter().any(|&b| b != 0) {
                return Ok(false);
            }
            at += n as u64;
        }
        Ok(true)
    }

    fn end_torn(&mut self) -> Option<Result<Record, LogError>> {
        self.torn_tail_bytes = self.file_len - self.pos;
        self.done = true;
        None
    }

    fn next_record(&mut self) -> Option<Result<Record, LogError>> {
        if self.done {
            return None;
        }
        let remaining = self.file_len - self.pos;
        if remaining == 0 {
            self.done = true;
            return None;
        }
        if remaining < RECORD_HEADER_BYTES as u64 {
            return self.end_torn();
        }
        // Every way out but a whole, sound record ends the log.
        self.done = true;
        let mut raw = [0u8; RECORD_HEADER_BYTES];
        if let Err(e) = self.stream.read_exact(&mut raw) {
            return Some(Err(e.into()));
        }
        let header = RecordHeader::decode(&raw);
        if !header.header_ok(&raw) {
            // Torn: at most a header's worth of written bytes, then nothing but zeroes.
            return match self.zeroes_to_end(self.pos + RECORD_HEADER_BYTES as u64) {
                Ok(true) => self.end_torn(),
                Ok(false) => Some(Err(self.corrupt("record header checksum mismatch"))),
                Err(e) => Some(Err(e)),
            };
        }
        let kind = match self.trusted_kind(&header) {
            Ok(kind) => kind,
            Err(e) => return Some(Err(e)),
        };
        let end = self.pos + RECORD_HEADER_BYTES as u64 + header.payload_len as u64;
        if end > self.file_len {
            return self.end_torn();
        }
        let payload = match self.checked_payload(&raw, &header, end) {
            Ok(Some(payload)) => payload,
            Ok(None) => return self.end_torn(),
            Err(e) => return Some(Err(e)),
        };
        if let Err(e) = self.note_full(kind, &header, &payload) {
            return Some(Err(e));
        }
        self.chunk = payload;
        let rec = Record {
            header,
            kind,
            file_offset: self.pos,
        };
        self.pos = end;
        self.next_seq += 1;
        self.done = false;
        Some(Ok(rec))
    }

    /// The kind of a record whose header checksum is right. From here on the header is
    /// trusted, so anything in it inconsistent with the log is damage: an unknown kind, a
    /// payload over the limit or not as long as a write says, a range past the disk, a
    /// sequence number out of turn.
    fn trusted_kind(&self, header: &RecordHeader) -> Result<RecordKind, LogError> {
        let Some(kind) = header.kind() else {
            return Err(self.corrupt(format!("unknown record kind {}", header.kind)));
        };
        if header.payload_len > RECORD_PAYLOAD_BYTES_MAX {
            return Err(self.corrupt(format!(
                "payload of {} bytes exceeds the limit",
                header.payload_len
            )));
        }
        if kind == RecordKind::Write && header.payload_len as u64 != header.length {
            return Err(self.corrupt("write record payload length differs from its length"));
        }
        if matches!(
            kind,
            RecordKind::Write | RecordKind::Trim | RecordKind::WriteZeroes
        ) && header
            .offset
            .checked_add(header.length)
            .is_none_or(|end| end > self.header.disk_bytes)
        {
            return Err(self.corrupt(format!(
                "record {}: {} of {} bytes at byte {} reaches past the disk ({} bytes)",
                header.seq,
                kind.name(),
                header.length,
                header.offset,
                self.header.disk_bytes
            )));
        }
        if header.seq != self.next_seq {
            return Err(self.corrupt(format!(
                "record has sequence number {}, expected {}",
                header.seq, self.next_seq
            )));
        }
        Ok(kind)
    }

    /// Reads the payload of the record `raw` heads, which ends at `end`, and checks the
    /// record's checksum. Returns the payload's last chunk (all of a short payload), or
    /// `None` when the checksum is wrong and nothing but zeroes follows: a torn tail.
    fn checked_payload(
        &mut self,
        raw: &[u8; RECORD_HEADER_BYTES],
        header: &RecordHeader,
        end: u64,
    ) -> Result<Option<Vec<u8>>, LogError> {
        let mut crc = crc32c::crc32c(&raw[..44]);
        let mut left = header.payload_len as usize;
        if let Some(at) = self.keep_record(raw, left)? {
            let payload = &self.kept.as_ref().expect("kept").bytes[at..];
            crc = crc32c::crc32c_append(crc, payload);
            if crc == header.crc {
                // What `next_record` reads of the payload: a full record's reason.
                let mut chunk = std::mem::take(&mut self.chunk);
                chunk.clear();
                if header.kind() == Some(RecordKind::Full) {
                    chunk.extend_from_slice(payload);
                }
                return Ok(Some(chunk));
            }
            let kept = self.kept.as_mut().expect("kept");
            kept.bytes.truncate(at - RECORD_HEADER_BYTES);
        } else {
            // The buffer of the record before (given back by `next_record`), not a new one.
            let mut chunk = std::mem::take(&mut self.chunk);
            chunk.resize(left.min(CRC_CHUNK_BYTES), 0);
            while left > 0 {
                let n = left.min(CRC_CHUNK_BYTES);
                self.stream.read_exact(&mut chunk[..n])?;
                crc = crc32c::crc32c_append(crc, &chunk[..n]);
                left -= n;
            }
            if crc == header.crc {
                return Ok(Some(chunk));
            }
        }
        if self.zeroes_to_end(end)? {
            return Ok(None);
        }
        Err(self.corrupt("record checksum mismatch"))
    }

    /// When bytes are kept and this record fits: appends its header `raw` and its payload,
    /// read from the stream, to them and returns where the payload (unchecked) starts in
    /// them. Otherwise `None`, the stream untouched (and, past the bound, nothing kept until
    /// the next take).
    fn keep_record(
        &mut self,
        raw: &[u8; RECORD_HEADER_BYTES],
        payload_len: usize,
    ) -> Result<Option<usize>, LogError> {
        let Some(kept) = self.kept.as_mut().filter(|k| !k.overflowed) else {
            return Ok(None);
        };
        let at = kept.bytes.len() + RECORD_HEADER_BYTES;
        if at + payload_len > kept.max {
            kept.overflowed = true;
            kept.bytes.clear();
            return Ok(None);
        }
        kept.bytes.extend_from_slice(raw);
        kept.bytes.resize(at + payload_len, 0);
        self.stream.read_exact(&mut kept.bytes[at..])?;
        Ok(Some(at))
    }

    /// Keeps a full record's reason; refuses a data record after one (the writer never puts
    /// one there). `payload` holds the record's payload when it is short.
    fn note_full(
        &mut self,
        kind: RecordKind,
        header: &RecordHeader,
        payload: &[u8],
    ) -> Result<(), LogError> {
        if kind.is_data() && self.full.is_some() {
            return Err(self.corrupt(format!(
                "record {}: a {} after the log was full",
                header.seq,
                kind.name()
            )));
        }
        if kind == RecordKind::Full {
            let bytes = payload
                .get(..header.payload_len as usize)
                .ok_or_else(|| self.corrupt("full record payload too long"))?;
            let p: FullPayload = decode_payload(bytes)?;
            self.full = Some((header.seq, p));
        }
        Ok(())
    }

    /// How the log ends: complete, torn, or full (and why). Known once the records have
    /// been read to the end.
    pub fn ending(&self) -> LogEnding {
        match self.full {
            Some((seq, p)) => LogEnding::Full {
                seq,
                reason: p.reason,
                log_bytes: p.log_bytes,
            },
            None if self.torn_tail_bytes > 0 => LogEnding::TornTail {
                bytes: self.torn_tail_bytes,
            },
            None => LogEnding::Complete,
        }
    }

    /// Rewinds to the first record (for a second pass).
    pub fn rewind(&mut self) -> Result<(), LogError> {
        self.stream
            .seek(SeekFrom::Start(FILE_HEADER_BYTES as u64))?;
        self.pos = FILE_HEADER_BYTES as u64;
        self.next_seq = 0;
        self.torn_tail_bytes = 0;
        self.full = None;
        self.done = false;
        Ok(())
    }
}

/// How a log ends (see [`LogReader::ending`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "ending")]
pub enum LogEnding {
    /// The last record is whole and nothing follows it.
    Complete,
    /// The writer stopped in the middle of a record: that many bytes were ignored.
    TornTail { bytes: u64 },
    /// A full record at `seq`: the log took no more data from there on.
    Full {
        seq: u64,
        reason: FullReason,
        log_bytes: u64,
    },
}

impl std::fmt::Display for LogEnding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogEnding::Complete => write!(f, "complete"),
            LogEnding::TornTail { bytes } => {
                write!(
                    f,
                    "torn tail of {bytes} bytes ignored (the writer stopped mid-record)"
                )
            }
            LogEnding::Full {
                seq,
                reason: FullReason::Cap,
                log_bytes,
            } => write!(
                f,
                "capped: the log reached its record-max at {log_bytes} bytes (record {seq}); \
                 writes after it were refused with ENOSPC"
            ),
            LogEnding::Full { seq, log_bytes, .. } => write!(
                f,
                "incomplete: the disk of the log was full (at {log_bytes} bytes, record {seq}); \
                 the disk refused every change after it"
            ),
        }
    }
}

impl Iterator for LogReader {
    type Item = Result<Record, LogError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_record()
    }
}
