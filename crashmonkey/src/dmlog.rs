//! Import and export of the dm-log-writes format (the kernel's `dm-log-writes` target and
//! fstests' `replay-log`), so each side reads the other's logs. `docs/dm-log-writes.md` gives
//! the layout byte by byte and where the conversion is not one to one.
//!
//! The format, all little-endian, in units of `sectorsize` (this code writes 512):
//! sector 0 holds the super block `{magic u64 = 0x6a736677736872, version u64 = 1,
//! nr_entries u64, sectorsize u32}`; entries follow from sector 1. Each entry is one sector
//! holding `{sector u64, nr_sectors u64, flags u64, data_len u64}` (a mark's name follows in
//! the same sector, `data_len` bytes, then at least one zero byte), then `nr_sectors` sectors
//! of data unless it is a discard. Flags: FLUSH=1, FUA=2, DISCARD=4, MARK=8 (METADATA=16 is
//! read as a plain write).
//!
//! What does not carry over: connections, flushes' in-flight lists (dm-log-writes logs a
//! write when it completes, which is what ours records when nothing is in flight), faults;
//! power cuts are exported as their outcome (dropped writes left out, torn ones as the
//! sectors that landed). WRITE_ZEROES is exported as a write of zero bytes.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use nbd_server::log::{encode_payload, FlushPayload, LogError, LogWriter, RecordKind, FLAG_FUA};

use crate::history::{Event, History, OpData};

pub const DM_MAGIC: u64 = 0x6a736677736872;
pub const DM_VERSION: u64 = 1;
pub const DM_FLUSH: u64 = 1;
pub const DM_FUA: u64 = 2;
pub const DM_DISCARD: u64 = 4;
pub const DM_MARK: u64 = 8;
pub const DM_METADATA: u64 = 16;
/// Sector size this code writes.
pub const DM_SECTOR_BYTES: u64 = 512;
/// Bytes of an entry header (`struct log_write_entry`); a mark's name follows them.
pub const DM_ENTRY_HEADER_BYTES: u64 = 32;
/// Largest sector size accepted on import.
pub const DM_SECTOR_BYTES_MAX: u64 = 64 * 1024;
/// Largest single entry's data accepted on import.
pub const DM_ENTRY_DATA_BYTES_MAX: u64 = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DmLogError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a dm-log-writes log: {0}")]
    Bad(String),
    #[error("operation seq {seq} at byte {offset} (+{length}) is not 512-byte aligned; dm-log-writes cannot hold it")]
    Unaligned { seq: u64, offset: u64, length: u64 },
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct DmStats {
    pub entries: u64,
    pub writes: u64,
    pub discards: u64,
    pub flushes: u64,
    pub marks: u64,
    pub disk_bytes: u64,
}

/// The longest mark name the kernel logs in a sector of `sectorsize` bytes: `log_mark` keeps
/// `sectorsize - 32 - 1` characters, so a zero byte always follows the name (replay-log
/// compares names up to `data_len + 1` bytes).
pub fn mark_bytes_max(sectorsize: u64) -> u64 {
    sectorsize - DM_ENTRY_HEADER_BYTES - 1
}

/// A mark name as the kernel would log it: a C string (cut at its first zero byte), at most
/// [`mark_bytes_max`] bytes.
fn kernel_mark_name(name: &[u8]) -> &[u8] {
    let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
    &name[..name.len().min(mark_bytes_max(DM_SECTOR_BYTES) as usize)]
}

fn entry(sector: u64, nr: u64, flags: u64, data_len: u64, mark: &[u8]) -> Vec<u8> {
    let mut s = vec![0u8; DM_SECTOR_BYTES as usize];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..16].copy_from_slice(&nr.to_le_bytes());
    s[16..24].copy_from_slice(&flags.to_le_bytes());
    s[24..32].copy_from_slice(&data_len.to_le_bytes());
    let at = DM_ENTRY_HEADER_BYTES as usize;
    s[at..at + mark.len()].copy_from_slice(mark);
    s
}

/// Writes our log `log` as a dm-log-writes log `out`.
pub fn export(log: &Path, out: &Path) -> Result<DmStats, DmLogError> {
    let history = History::open(log)?;
    let data = history.data_file()?;
    let mut stats = DmStats {
        disk_bytes: history.disk_bytes,
        ..DmStats::default()
    };
    let mut w = BufWriter::new(File::create(out)?);
    w.write_all(&[0u8; DM_SECTOR_BYTES as usize])?; // super block, filled in at the end
    let mut buf = Vec::new();
    for ev in history {
        match ev? {
            Event::Op(op) => {
                for &(off, len) in &op.pieces {
                    if off % DM_SECTOR_BYTES != 0 || len % DM_SECTOR_BYTES != 0 {
                        return Err(DmLogError::Unaligned {
                            seq: op.seq,
                            offset: off,
                            length: len,
                        });
                    }
                    let fua = if op.fua { DM_FUA } else { 0 };
                    let (sector, nr) = (off / DM_SECTOR_BYTES, len / DM_SECTOR_BYTES);
                    if op.kind == RecordKind::Trim {
                        w.write_all(&entry(sector, nr, DM_DISCARD | fua, 0, &[]))?;
                        stats.discards += 1;
                    } else {
                        w.write_all(&entry(sector, nr, fua, 0, &[]))?;
                        buf.resize(len as usize, 0);
                        match op.data {
                            OpData::Zero => buf.fill(0),
                            OpData::Log { .. } => op.read(&data, off, &mut buf)?,
                        }
                        w.write_all(&buf)?;
                        stats.writes += 1;
                    }
                    stats.entries += 1;
                }
            }
            Event::Flush { .. } => {
                w.write_all(&entry(0, 0, DM_FLUSH, 0, &[]))?;
                stats.entries += 1;
                stats.flushes += 1;
            }
            Event::Mark { name, .. } => {
                let b = kernel_mark_name(name.as_bytes());
                w.write_all(&entry(0, 0, DM_MARK, b.len() as u64, b))?;
                stats.entries += 1;
                stats.marks += 1;
            }
            Event::PowerCut { .. } => {}
        }
    }
    let mut sup = vec![0u8; DM_SECTOR_BYTES as usize];
    sup[0..8].copy_from_slice(&DM_MAGIC.to_le_bytes());
    sup[8..16].copy_from_slice(&DM_VERSION.to_le_bytes());
    sup[16..24].copy_from_slice(&stats.entries.to_le_bytes());
    sup[24..28].copy_from_slice(&(DM_SECTOR_BYTES as u32).to_le_bytes());
    w.seek(SeekFrom::Start(0))?;
    w.write_all(&sup)?;
    w.flush()?;
    Ok(stats)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

struct DmReader {
    r: BufReader<File>,
    sectorsize: u64,
    entries: u64,
    /// Number of the next entry (replay-log's numbering: from 0) and the byte it starts at.
    index: u64,
    at: u64,
}

/// One parsed entry; `data` is read into the caller's buffer.
struct DmEntry {
    /// Its number (from 0, as replay-log counts) and the byte of the log it starts at.
    index: u64,
    at: u64,
    sector: u64,
    nr: u64,
    flags: u64,
    mark: Vec<u8>,
}

impl DmEntry {
    /// The byte just past the entry's range, or `None` if that is not a 64-bit number.
    fn end_byte(&self, sectorsize: u64) -> Option<u64> {
        self.sector.checked_add(self.nr)?.checked_mul(sectorsize)
    }

    fn bad(&self, what: &str) -> DmLogError {
        bad_entry(self.index, self.at, what)
    }
}

/// An error about entry `index`, which starts at byte `at` of the log.
fn bad_entry(index: u64, at: u64, what: &str) -> DmLogError {
    DmLogError::Bad(format!("entry {index} (byte {at} of the log): {what}"))
}

impl DmReader {
    fn open(path: &Path) -> Result<Self, DmLogError> {
        let mut r = BufReader::new(File::open(path)?);
        let mut sup = [0u8; 28];
        r.read_exact(&mut sup)
            .map_err(|_| DmLogError::Bad("file shorter than the super block".into()))?;
        if u64_at(&sup, 0) != DM_MAGIC {
            return Err(DmLogError::Bad(format!("magic {:#x}", u64_at(&sup, 0))));
        }
        if u64_at(&sup, 8) != DM_VERSION {
            return Err(DmLogError::Bad(format!("version {}", u64_at(&sup, 8))));
        }
        let sectorsize = u32::from_le_bytes(sup[24..28].try_into().expect("4 bytes")) as u64;
        if !sectorsize.is_power_of_two() || !(512..=DM_SECTOR_BYTES_MAX).contains(&sectorsize) {
            return Err(DmLogError::Bad(format!("sector size {sectorsize}")));
        }
        r.seek(SeekFrom::Start(sectorsize))?;
        Ok(DmReader {
            r,
            sectorsize,
            entries: u64_at(&sup, 16),
            index: 0,
            at: sectorsize,
        })
    }

    fn next(&mut self, data: &mut Vec<u8>) -> Result<DmEntry, DmLogError> {
        let (index, at) = (self.index, self.at);
        let mut s = vec![0u8; self.sectorsize as usize];
        self.r
            .read_exact(&mut s)
            .map_err(|_| bad_entry(index, at, "the log ends inside its header"))?;
        let (sector, nr, flags, data_len) =
            (u64_at(&s, 0), u64_at(&s, 8), u64_at(&s, 16), u64_at(&s, 24));
        let mut mark = Vec::new();
        data.clear();
        if flags & DM_MARK != 0 {
            let header = DM_ENTRY_HEADER_BYTES as usize;
            if data_len > self.sectorsize - DM_ENTRY_HEADER_BYTES {
                let what = format!("a mark of {data_len} bytes in a {}-byte sector", s.len());
                return Err(bad_entry(index, at, &what));
            }
            mark = s[header..header + data_len as usize].to_vec();
        } else if flags & DM_DISCARD == 0 && nr > 0 {
            let bytes = nr
                .checked_mul(self.sectorsize)
                .filter(|&b| b <= DM_ENTRY_DATA_BYTES_MAX)
                .ok_or_else(|| bad_entry(index, at, &format!("{nr} sectors of data")))?;
            data.resize(bytes as usize, 0);
            self.r
                .read_exact(data)
                .map_err(|_| bad_entry(index, at, "the log ends inside its data"))?;
        }
        // Cannot overflow: every byte counted was read from the file.
        self.at += self.sectorsize + data.len() as u64;
        self.index += 1;
        Ok(DmEntry {
            index,
            at,
            sector,
            nr,
            flags,
            mark,
        })
    }
}

/// Reads a dm-log-writes log `input` into our format at `out`. The disk size is `disk_bytes`,
/// or the end of the furthest write rounded up to 4096.
pub fn import(input: &Path, out: &Path, disk_bytes: Option<u64>) -> Result<DmStats, DmLogError> {
    let mut stats = DmStats::default();
    let mut buf = Vec::new();
    let disk_bytes = match disk_bytes {
        Some(b) => b,
        None => {
            let mut r = DmReader::open(input)?;
            let mut end = 0u64;
            for _ in 0..r.entries {
                let e = r.next(&mut buf)?;
                let past_any_disk = || e.bad("it reaches past any 64-bit disk size");
                end = end.max(e.end_byte(r.sectorsize).ok_or_else(past_any_disk)?);
                if end.checked_next_multiple_of(4096).is_none() {
                    return Err(past_any_disk());
                }
            }
            end.next_multiple_of(4096)
        }
    };
    stats.disk_bytes = disk_bytes;
    let mut r = DmReader::open(input)?;
    let mut w = LogWriter::create(out, disk_bytes)?;
    for _ in 0..r.entries {
        let e = r.next(&mut buf)?;
        stats.entries += 1;
        // Checked first, so neither product below can overflow.
        if e.end_byte(r.sectorsize).is_none_or(|end| end > disk_bytes) {
            return Err(e.bad(&format!("it reaches past the disk ({disk_bytes} bytes)")));
        }
        let (off, len) = (e.sector * r.sectorsize, e.nr * r.sectorsize);
        if e.flags & DM_FLUSH != 0 {
            w.append(
                RecordKind::Flush,
                0,
                0,
                0,
                0,
                &encode_payload(&FlushPayload::default()),
            )?;
            stats.flushes += 1;
        }
        let fua = if e.flags & DM_FUA != 0 { FLAG_FUA } else { 0 };
        if e.flags & DM_MARK != 0 {
            w.append(RecordKind::Mark, 0, 0, 0, 0, &e.mark)?;
            stats.marks += 1;
        } else if e.flags & DM_DISCARD != 0 {
            w.append(RecordKind::Trim, fua, 0, off, len, &[])?;
            stats.discards += 1;
        } else if e.nr > 0 {
            w.append(RecordKind::Write, fua, 0, off, len, &buf)?;
            stats.writes += 1;
        }
    }
    w.sync()?;
    Ok(stats)
}
