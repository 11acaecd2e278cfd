//! Appending records to a write log.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::format::*;

/// Appends records to a write log. Not thread-safe by itself: the emulated disk holds it under
/// the same lock that orders its IO, so log order is the order the disk applied things.
pub struct LogWriter {
    out: BufWriter<File>,
    next_seq: u64,
}

/// Buffer between the recorder and the file; large enough that a 4 KiB write costs no syscall.
const LOG_BUFFER_BYTES: usize = 1024 * 1024;

impl LogWriter {
    /// Creates (truncates) `path` and writes the file header.
    pub fn create(path: &Path, disk_bytes: u64) -> Result<Self, LogError> {
        let file = File::create(path)?;
        let mut out = BufWriter::with_capacity(LOG_BUFFER_BYTES, file);
        out.write_all(&FileHeader::new(disk_bytes).encode())?;
        out.flush()?;
        Ok(LogWriter { out, next_seq: 0 })
    }

    /// Sequence number the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends one record and returns its sequence number. Flush, mark, fault and power-cut records
    /// push the buffer to the file, so a reader started later sees them.
    pub fn append(
        &mut self,
        kind: RecordKind,
        flags: u8,
        conn: u64,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Result<u64, LogError> {
        assert!(payload.len() <= RECORD_PAYLOAD_BYTES_MAX as usize);
        if kind == RecordKind::Write {
            assert_eq!(
                payload.len() as u64,
                length,
                "a write record carries its data"
            );
        }
        let seq = self.next_seq;
        let header = RecordHeader::seal(kind, flags, seq, conn, offset, length, payload);
        self.out.write_all(&header.encode())?;
        self.out.write_all(payload)?;
        self.next_seq += 1;
        if matches!(
            kind,
            RecordKind::Flush | RecordKind::Mark | RecordKind::PowerCut | RecordKind::Fault
        ) {
            self.out.flush()?;
        }
        Ok(seq)
    }

    /// Pushes buffered records to the file.
    pub fn flush(&mut self) -> Result<(), LogError> {
        self.out.flush()?;
        Ok(())
    }

    /// Pushes buffered records and waits for the file to reach stable storage.
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.out.flush()?;
        self.out.get_ref().sync_data()?;
        Ok(())
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        if let Err(e) = self.out.flush() {
            tracing::error!("write log: final flush failed: {e}");
        }
    }
}
