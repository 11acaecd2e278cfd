//! The write-log format: an append-only, versioned record of every write, trim, write-zeroes,
//! flush, mark, injected fault and power cut the emulated disk saw, in the order it applied
//! them. `docs/write-log.md` describes it byte by byte; a test keeps the two in agreement.
//!
//! Layout: a 32-byte file header, then records. A record is a 52-byte header (bincode 2,
//! fixed-int little-endian) followed by `payload_len` raw payload bytes. Each record carries
//! two checksums: `header_crc` over its first 48 bytes (so a damaged length is never trusted)
//! and `crc` over its first 44 bytes plus the payload.
//!
//! [`sector_pieces`] and [`torn_pieces`] are the sector arithmetic of torn writes, shared by
//! the emulated disk's power cut and crashmonkey's crash states.
//!
//! Reading is streaming: [`LogReader`] holds one record header at a time and hands out the
//! payload's position in the file; payloads are checksummed in bounded chunks and read again
//! only when the caller asks. A torn tail (the writer died mid-record: a truncated record, or
//! a record whose unwritten bytes read back as zeroes) ends the log silently; a damaged record
//! anywhere else is an error, never misread.

mod format;
mod reader;
mod sectors;
mod writer;

pub use format::*;
pub use reader::{KeptBytes, LogEnding, LogReader, Record};
pub use sectors::{merge_pieces, sector_pieces, torn_pieces, unit_pieces};
pub use writer::LogWriter;
