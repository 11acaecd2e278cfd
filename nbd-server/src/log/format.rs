//! Byte layout of the write log: file header, record header, record kinds and payloads.

use bincode::{Decode, Encode};

/// First 8 bytes of every write log.
pub const LOG_MAGIC: [u8; 8] = *b"NBDWLOG\0";
/// Format version this code writes and reads.
pub const LOG_VERSION: u32 = 1;
/// Size of the file header in bytes.
pub const FILE_HEADER_BYTES: usize = 32;
/// First 4 bytes of every record (`"WREC"` read as a little-endian u32).
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"WREC");
/// Size of a record header in bytes.
pub const RECORD_HEADER_BYTES: usize = 52;
/// Largest payload a record may carry: an NBD write is at most 32 MiB; the rest is headroom
/// for power-cut records. A header claiming more is damage, not data.
pub const RECORD_PAYLOAD_BYTES_MAX: u32 = 64 * 1024 * 1024;
/// Longest mark name, in bytes of UTF-8.
pub const MARK_NAME_BYTES_MAX: usize = 256;
/// Torn writes and crash states work at this granularity.
pub const SECTOR_BYTES: u64 = 512;

/// Record flag: the request carried NBD_CMD_FLAG_FUA.
pub const FLAG_FUA: u8 = 1;

/// The bincode configuration of every binary structure in the log.
pub fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_fixed_int_encoding()
        .with_little_endian()
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    #[error("write log I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a write log (bad magic {0:02x?})")]
    BadMagic([u8; 8]),
    #[error("write log version {0} is not supported (this build reads version {LOG_VERSION})")]
    BadVersion(u32),
    #[error("write log file header is damaged (checksum mismatch)")]
    BadFileHeader,
    #[error("write log is corrupt at byte {offset}: {what}")]
    Corrupt { offset: u64, what: String },
    #[error("record payload could not be decoded: {0}")]
    Payload(String),
    #[error("the disk of the write log is full")]
    LogDiskFull,
}

/// The kind of a record. Values are part of the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecordKind {
    /// Data written; the payload is the data.
    Write = 1,
    /// Range discarded (reads back as zeroes); no payload.
    Trim = 2,
    /// Range zeroed; no payload.
    WriteZeroes = 3,
    /// A flush arrived; payload: [`FlushPayload`].
    Flush = 4,
    /// A named point; payload: the UTF-8 name.
    Mark = 5,
    /// An injected fault; payload: [`FaultPayload`].
    Fault = 6,
    /// A power cut; payload: [`PowerCutPayload`].
    PowerCut = 7,
    /// The log is full: no data record follows; payload: [`FullPayload`].
    Full = 8,
}

impl RecordKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Write,
            2 => Self::Trim,
            3 => Self::WriteZeroes,
            4 => Self::Flush,
            5 => Self::Mark,
            6 => Self::Fault,
            7 => Self::PowerCut,
            8 => Self::Full,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Write => "write",
            Self::Trim => "trim",
            Self::WriteZeroes => "write-zeroes",
            Self::Flush => "flush",
            Self::Mark => "mark",
            Self::Fault => "fault",
            Self::PowerCut => "power-cut",
            Self::Full => "full",
        }
    }
    /// Whether the record changes disk content (write, trim, write-zeroes).
    pub fn is_data(self) -> bool {
        matches!(self, Self::Write | Self::Trim | Self::WriteZeroes)
    }
}

/// The 32-byte file header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct FileHeader {
    pub magic: [u8; 8],
    pub version: u32,
    /// Always [`SECTOR_BYTES`].
    pub sector_bytes: u32,
    /// Size of the recorded disk in bytes.
    pub disk_bytes: u64,
    /// crc32c of the 24 bytes before it.
    pub header_crc: u32,
    /// [`FILE_FLAG_NO_POWER_CUTS`]; other bits 0. Written last, when the writer closes the
    /// log, and outside `header_crc`: a log whose writer never closed it keeps 0 here.
    pub flags: u32,
}

/// Bit of [`FileHeader::flags`]: the writer closed the log and wrote no power-cut record in
/// it. A reader then needs no first pass for power cuts' fates, and a power-cut record it
/// meets is damage.
pub const FILE_FLAG_NO_POWER_CUTS: u32 = 1;
/// Byte offset of [`FileHeader::flags`] in the file.
pub const FILE_FLAGS_OFFSET: u64 = 28;

impl FileHeader {
    pub fn new(disk_bytes: u64) -> Self {
        let mut h = FileHeader {
            magic: LOG_MAGIC,
            version: LOG_VERSION,
            sector_bytes: SECTOR_BYTES as u32,
            disk_bytes,
            header_crc: 0,
            flags: 0,
        };
        let bytes = h.encode_raw();
        h.header_crc = crc32c::crc32c(&bytes[..24]);
        h
    }

    fn encode_raw(&self) -> [u8; FILE_HEADER_BYTES] {
        let mut out = [0u8; FILE_HEADER_BYTES];
        let n = bincode::encode_into_slice(self, &mut out, bincode_config())
            .expect("file header fits its fixed size");
        assert_eq!(n, FILE_HEADER_BYTES);
        out
    }

    pub fn encode(&self) -> [u8; FILE_HEADER_BYTES] {
        self.encode_raw()
    }

    /// Whether the log says it holds no power-cut record ([`FILE_FLAG_NO_POWER_CUTS`]).
    pub fn no_power_cuts(&self) -> bool {
        self.flags & FILE_FLAG_NO_POWER_CUTS != 0
    }

    pub fn decode(bytes: &[u8; FILE_HEADER_BYTES]) -> Result<Self, LogError> {
        let (h, _): (FileHeader, usize) = bincode::decode_from_slice(bytes, bincode_config())
            .map_err(|e| LogError::Payload(e.to_string()))?;
        if h.magic != LOG_MAGIC {
            return Err(LogError::BadMagic(h.magic));
        }
        if crc32c::crc32c(&bytes[..24]) != h.header_crc {
            return Err(LogError::BadFileHeader);
        }
        if h.version != LOG_VERSION {
            return Err(LogError::BadVersion(h.version));
        }
        if h.sector_bytes as u64 != SECTOR_BYTES {
            return Err(LogError::BadFileHeader);
        }
        Ok(h)
    }
}

/// The 52-byte record header. Field order is the byte order on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct RecordHeader {
    pub magic: u32,
    pub kind: u8,
    pub flags: u8,
    pub reserved: u16,
    /// Position of the record in the log, from 0, with no gaps.
    pub seq: u64,
    /// Connection that issued the request (0 for marks and power cuts from the control channel).
    pub conn: u64,
    pub offset: u64,
    pub length: u64,
    pub payload_len: u32,
    /// crc32c over bytes 0..44 of this header followed by the payload.
    pub crc: u32,
    /// crc32c over bytes 0..48 of this header.
    pub header_crc: u32,
}

/// What a record says before the log numbers it: the header fields its writer chooses (the
/// log adds the sequence number, the payload length and the checksums).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHead {
    pub kind: RecordKind,
    pub flags: u8,
    pub conn: u64,
    pub offset: u64,
    pub length: u64,
}

impl RecordHead {
    /// A record that covers no range of the disk (flush, mark, fault, power cut, full).
    pub fn event(kind: RecordKind, conn: u64) -> Self {
        RecordHead {
            kind,
            flags: 0,
            conn,
            offset: 0,
            length: 0,
        }
    }
}

impl RecordHeader {
    /// Builds the header of record `seq` with both checksums filled in for `payload`.
    pub fn seal(head: &RecordHead, seq: u64, payload: &[u8]) -> Self {
        Self::seal_parts(head, seq, &[payload])
    }

    /// [`Self::seal`] for a payload held in pieces (their concatenation is the payload).
    pub fn seal_parts(head: &RecordHead, seq: u64, parts: &[&[u8]]) -> Self {
        let payload_len: usize = parts.iter().map(|p| p.len()).sum();
        let mut h = RecordHeader {
            magic: RECORD_MAGIC,
            kind: head.kind as u8,
            flags: head.flags,
            reserved: 0,
            seq,
            conn: head.conn,
            offset: head.offset,
            length: head.length,
            payload_len: u32::try_from(payload_len).expect("payload length checked by caller"),
            crc: 0,
            header_crc: 0,
        };
        h.crc = h.record_crc(parts);
        let raw = h.encode();
        h.header_crc = crc32c::crc32c(&raw[..48]);
        h
    }

    /// The record checksum of this header with a payload of `parts` (concatenated): crc32c
    /// over bytes 0..44 of the header, then the payload.
    pub fn record_crc(&self, parts: &[&[u8]]) -> u32 {
        let raw = self.encode();
        parts.iter().fold(crc32c::crc32c(&raw[..44]), |c, p| {
            crc32c::crc32c_append(c, p)
        })
    }

    pub fn encode(&self) -> [u8; RECORD_HEADER_BYTES] {
        let mut out = [0u8; RECORD_HEADER_BYTES];
        let n = bincode::encode_into_slice(self, &mut out, bincode_config())
            .expect("record header fits its fixed size");
        assert_eq!(n, RECORD_HEADER_BYTES);
        out
    }

    /// Decodes without judging; see [`RecordHeader::header_ok`].
    pub fn decode(bytes: &[u8; RECORD_HEADER_BYTES]) -> Self {
        let (h, _): (RecordHeader, usize) = bincode::decode_from_slice(bytes, bincode_config())
            .expect("a fixed-size header of plain integers always decodes");
        h
    }

    /// Magic and header checksum agree.
    pub fn header_ok(&self, bytes: &[u8; RECORD_HEADER_BYTES]) -> bool {
        self.magic == RECORD_MAGIC && crc32c::crc32c(&bytes[..48]) == self.header_crc
    }

    pub fn kind(&self) -> Option<RecordKind> {
        RecordKind::from_u8(self.kind)
    }

    pub fn fua(&self) -> bool {
        self.flags & FLAG_FUA != 0
    }
}

/// Payload of a flush record: writes already applied but not yet answered when the flush
/// arrived. The flush does not cover them; they belong to the next epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode, serde::Serialize)]
pub struct FlushPayload {
    pub in_flight: Vec<u64>,
}

/// What kind of fault was injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// The request failed with EIO and changed nothing.
    Eio = 1,
    /// The request was delayed by `latency_us`.
    Latency = 2,
}

/// Payload of a fault record. The record's offset/length are the request's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct FaultPayload {
    /// [`FaultKind`] value.
    pub fault: u8,
    /// The request kind, as [`crate::log::RecordKind`]-like code: 0 read, then RecordKind values.
    pub request: u8,
    pub latency_us: u32,
}

/// Fate of one non-durable write at a power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fate {
    /// Nothing of the write reached the disk.
    Dropped,
    /// The whole write reached the disk.
    Kept,
    /// Only the listed byte ranges (512-byte sectors) reached the disk.
    Torn,
}

/// One non-durable write and what the power cut did with it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, serde::Serialize)]
pub struct WriteFate {
    /// Sequence number of the write's record.
    pub seq: u64,
    pub fate: Fate,
    /// For `Torn`: (offset, length) ranges that landed, in bytes, sector aligned.
    pub pieces: Vec<(u64, u64)>,
}

/// How the power cut chose among non-durable writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CutMode {
    /// Every non-durable write was lost.
    None,
    /// A seeded subset landed whole.
    Some,
    /// A seeded subset landed, some of it torn at sector granularity.
    Torn,
}

/// Payload of a power-cut record. Every write that was not durable and not already persisted
/// at the cut is listed; a write not listed reached the disk whole.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, serde::Serialize)]
pub struct PowerCutPayload {
    pub seed: u64,
    pub mode: CutMode,
    pub fates: Vec<WriteFate>,
}

/// Why a log took no more data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FullReason {
    /// The log reached its cap (`record-max`): from here on writes, trims and zero writes
    /// were refused with ENOSPC. Flush, mark, fault and power-cut records may still follow.
    Cap,
    /// The filesystem holding the log ran out of space: nothing follows, and the disk refused
    /// every change from here on.
    LogDiskFull,
}

/// Bytes of an encoded [`FullPayload`]: the reason (`u32`) and `log_bytes` (`u64`).
pub const FULL_PAYLOAD_BYTES: usize = 12;

/// Payload of a full record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, serde::Serialize)]
pub struct FullPayload {
    pub reason: FullReason,
    /// Bytes of the log up to this record (the file header and every record before it).
    pub log_bytes: u64,
}

/// Encodes a payload structure with the log's bincode configuration.
pub fn encode_payload<T: Encode>(value: &T) -> Vec<u8> {
    bincode::encode_to_vec(value, bincode_config()).expect("in-memory encoding cannot fail")
}

/// Decodes a payload structure, requiring every byte to be used.
pub fn decode_payload<T: Decode<()>>(bytes: &[u8]) -> Result<T, LogError> {
    // The limit stops a damaged length field from asking for a huge allocation.
    let config = bincode::config::standard()
        .with_fixed_int_encoding()
        .with_little_endian()
        .with_limit::<{ RECORD_PAYLOAD_BYTES_MAX as usize }>();
    let (v, used) =
        bincode::decode_from_slice(bytes, config).map_err(|e| LogError::Payload(e.to_string()))?;
    if used != bytes.len() {
        return Err(LogError::Payload(format!(
            "{} trailing bytes after payload",
            bytes.len() - used
        )));
    }
    Ok(v)
}
