//! The metadata journal, with ordered data, as jbd2 and XFS's log do it.
//!
//! A transaction is the new images of the metadata blocks it changed. Committing it writes,
//! at the journal's head, a descriptor block, then the images, then flushes the device (so
//! they, and every data block written before, are durable), then writes the commit block
//! with FUA. A transaction counts once its commit block is on the device.
//!
//! Checkpointing writes the images of every committed transaction since the last checkpoint
//! to their homes, flushes, and then advances the tail in the journal superblock (FUA). The
//! journal then starts again at its first block.
//!
//! Recovery reads the journal superblock and, from its tail, replays transaction after
//! transaction while each is whole: a descriptor with the expected sequence number and a
//! good checksum, and a commit block with the same number, the same block count, a good
//! checksum of its own and a good checksum of the descriptor and the images. It stops at the
//! first that is not.
//!
//! Journal layout (blocks relative to `journal_start`):
//! - block 0, the journal superblock: the common header, then `tail_seq` (8 bytes at 16: the
//!   sequence number of the first transaction to replay) and `tail` (8 bytes at 24: the
//!   journal block of its descriptor). Its checksum covers only its first 512 bytes (the
//!   rest is zero), so that a write torn at sector granularity leaves the old or the new
//!   superblock, never a damaged one.
//! - a descriptor block: the common header (home: its own device block), `seq` (8 bytes at
//!   16), `count` (4 bytes at 24: images that follow).
//! - `count` image blocks: copies of the metadata blocks, headers included.
//! - a commit block: the common header, `seq` (8 at 16), `count` (4 at 24), `txn_crc` (4 at
//!   28: CRC-32C of the descriptor block followed by the images), and from byte 512 the
//!   images' home blocks (8 bytes each), past the first sector so that a commit torn at
//!   sector granularity keeps a valid start but not its list.

use std::collections::BTreeMap;

use crate::block::{self, BlockDevice, DeviceError, Request, BLOCK_SIZE};

use super::format::*;

/// Bytes of the journal superblock its checksum covers.
pub const JOURNAL_SUPER_CRC_BYTES: usize = 512;

/// Bugs the journal can be told to have (off by default), so that crash campaigns show they
/// find each one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JournalBugs {
    /// The commit block is written without the flush that orders it after the transaction's
    /// blocks (and the data before them).
    pub commit_without_flush: bool,
    /// Recovery replays a transaction whose checksums do not hold.
    pub replay_ignores_checksum: bool,
}

/// The journal's state in memory.
#[derive(Debug, Clone)]
pub struct Journal {
    geo: Geometry,
    /// Journal block where the next transaction's descriptor goes.
    head: u64,
    /// Sequence number of the next transaction.
    next_seq: u64,
    /// Committed images not yet written home, by home block.
    pending: BTreeMap<u64, Vec<u8>>,
    pub bugs: JournalBugs,
    /// Transactions committed (for reports).
    pub commits: u64,
    pub checkpoints: u64,
}

/// What recovery found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Recovery {
    /// Transactions replayed.
    pub replayed: u64,
    /// Blocks written home by the replay.
    pub blocks: u64,
    /// Journal block and sequence number where the next transaction goes.
    pub head: u64,
    pub next_seq: u64,
}

/// Encodes the journal superblock.
pub fn encode_journal_super(geo: &Geometry, tail_seq: u64, tail: u64) -> Vec<u8> {
    let mut b = new_block(MAGIC_JOURNAL_SUPER, geo.journal_start);
    put_u64(&mut b, 16, tail_seq);
    put_u64(&mut b, 24, tail);
    let crc = journal_super_crc(&b);
    put_u32(&mut b, 4, crc);
    b
}

fn journal_super_crc(b: &[u8]) -> u32 {
    let c = crc32c::crc32c(&b[..4]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &b[8..JOURNAL_SUPER_CRC_BYTES])
}

/// Decodes the journal superblock: `(tail_seq, tail)`.
pub fn decode_journal_super(geo: &Geometry, b: &[u8]) -> Result<(u64, u64), FormatError> {
    let block = geo.journal_start;
    let found = get_u32(b, 0);
    if found != MAGIC_JOURNAL_SUPER {
        return Err(FormatError::BadMagic {
            block,
            want: "journal superblock",
            found,
        });
    }
    let (stored, computed) = (get_u32(b, 4), journal_super_crc(b));
    if stored != computed {
        return Err(FormatError::BadChecksum {
            block,
            stored,
            computed,
        });
    }
    let claims = get_u64(b, 8);
    if claims != block {
        return Err(FormatError::Misplaced { block, claims });
    }
    let (tail_seq, tail) = (get_u64(b, 16), get_u64(b, 24));
    if tail == 0 || tail >= geo.journal_blocks {
        return Err(FormatError::Invalid {
            block,
            what: format!("tail at journal block {tail} of {}", geo.journal_blocks),
        });
    }
    Ok((tail_seq, tail))
}

fn write(
    dev: &mut dyn BlockDevice,
    block: u64,
    data: Vec<u8>,
    fua: bool,
) -> Result<(), DeviceError> {
    block::submit_and_complete(
        dev,
        Request::Write {
            block,
            data: data.into(),
            fua,
        },
    )
}

impl Journal {
    /// A journal that starts at `head` with sequence number `next_seq` (after mkfs: 1, 1;
    /// after recovery: where it ended).
    pub fn new(geo: Geometry, head: u64, next_seq: u64, bugs: JournalBugs) -> Self {
        Journal {
            geo,
            head,
            next_seq,
            pending: BTreeMap::new(),
            bugs,
            commits: 0,
            checkpoints: 0,
        }
    }

    /// Most images one transaction may hold on this journal.
    pub fn transaction_blocks_max(&self) -> usize {
        TRANSACTION_BLOCKS_MAX.min(self.geo.journal_blocks as usize - 3)
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Commits one transaction (`images`: home block and new content). Checkpoints first if
    /// the journal has no room left for it.
    pub fn commit(
        &mut self,
        dev: &mut dyn BlockDevice,
        images: Vec<(u64, Vec<u8>)>,
    ) -> Result<(), DeviceError> {
        let n = images.len();
        if n == 0 {
            return Ok(());
        }
        assert!(
            n <= self.transaction_blocks_max(),
            "transaction of {n} blocks"
        );
        if self.head + n as u64 + 2 > self.geo.journal_blocks {
            self.checkpoint(dev)?;
        }
        let start = self.geo.journal_start + self.head;
        let seq = self.next_seq;
        let mut desc = new_block(MAGIC_DESCRIPTOR, start);
        put_u64(&mut desc, 16, seq);
        put_u32(&mut desc, 24, n as u32);
        seal(&mut desc);
        let mut crc = crc32c::crc32c(&desc);
        let mut commit = new_block(MAGIC_COMMIT, start + 1 + n as u64);
        put_u64(&mut commit, 16, seq);
        put_u32(&mut commit, 24, n as u32);
        write(dev, start, desc, false)?;
        for (i, (home, image)) in images.iter().enumerate() {
            crc = crc32c::crc32c_append(crc, image);
            put_u64(&mut commit, COMMIT_HOMES_AT + 8 * i, *home);
            write(dev, start + 1 + i as u64, image.clone(), false)?;
        }
        put_u32(&mut commit, 28, crc);
        seal(&mut commit);
        if !self.bugs.commit_without_flush {
            block::submit_and_complete(dev, Request::Flush)?;
        }
        write(dev, start + 1 + n as u64, commit, true)?;
        self.head += n as u64 + 2;
        self.next_seq += 1;
        self.commits += 1;
        self.pending.extend(images);
        Ok(())
    }

    /// Writes every committed image home, flushes, then moves the tail to the journal's start
    /// (FUA): what was replayable no longer needs to be.
    pub fn checkpoint(&mut self, dev: &mut dyn BlockDevice) -> Result<(), DeviceError> {
        for (home, image) in std::mem::take(&mut self.pending) {
            write(dev, home, image, false)?;
        }
        block::submit_and_complete(dev, Request::Flush)?;
        self.head = 1;
        let sb = encode_journal_super(&self.geo, self.next_seq, self.head);
        write(dev, self.geo.journal_start, sb, true)?;
        self.checkpoints += 1;
        Ok(())
    }
}

/// Reads one block, synchronously.
pub type ReadFn<'a> = dyn FnMut(u64) -> Result<Vec<u8>, DeviceError> + 'a;
/// Writes one block, synchronously.
pub type WriteFn<'a> = dyn FnMut(u64, Vec<u8>) -> Result<(), DeviceError> + 'a;

/// Why recovery could not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecoveryError {
    #[error("journal superblock: {0}")]
    Super(FormatError),
    #[error("device: {0}")]
    Device(#[from] DeviceError),
}

/// A transaction's images, each with its home block.
pub type Images = Vec<(u64, Vec<u8>)>;

/// One transaction as found in the journal: its images and their homes, or `None` when it is
/// not whole. `ignore_checksums` is the planted bug.
fn read_transaction(
    geo: &Geometry,
    pos: u64,
    seq: u64,
    ignore_checksums: bool,
    read: &mut ReadFn<'_>,
) -> Result<Option<Images>, DeviceError> {
    let start = geo.journal_start + pos;
    let desc = read(start)?;
    let desc_ok = if ignore_checksums {
        get_u32(&desc, 0) == MAGIC_DESCRIPTOR
    } else {
        check(&desc, start, MAGIC_DESCRIPTOR, "descriptor").is_ok()
    };
    let n = get_u32(&desc, 24) as u64;
    if !desc_ok
        || get_u64(&desc, 16) != seq
        || n == 0
        || n > TRANSACTION_BLOCKS_MAX as u64
        || pos + n + 2 > geo.journal_blocks
    {
        return Ok(None);
    }
    let commit_at = start + 1 + n;
    let commit = read(commit_at)?;
    let commit_ok = get_u32(&commit, 0) == MAGIC_COMMIT
        && get_u64(&commit, 16) == seq
        && get_u32(&commit, 24) as u64 == n
        && (ignore_checksums || check(&commit, commit_at, MAGIC_COMMIT, "commit").is_ok());
    if !commit_ok {
        return Ok(None);
    }
    let mut crc = crc32c::crc32c(&desc);
    let mut images = Vec::with_capacity(n as usize);
    for i in 0..n {
        let image = read(start + 1 + i)?;
        crc = crc32c::crc32c_append(crc, &image);
        let home = get_u64(&commit, COMMIT_HOMES_AT + 8 * i as usize);
        images.push((home, image));
    }
    if !ignore_checksums && crc != get_u32(&commit, 28) {
        return Ok(None);
    }
    Ok(Some(images))
}

/// Replays the journal through `read` and `write` (which may write to a private copy), and
/// says what it did. A home outside the device, or inside the journal, ends the replay there
/// (only a replay that ignores checksums can meet one).
pub fn recover(
    geo: &Geometry,
    bugs: JournalBugs,
    read: &mut ReadFn<'_>,
    write: &mut WriteFn<'_>,
) -> Result<Recovery, RecoveryError> {
    let sb = read(geo.journal_start)?;
    let (mut seq, mut pos) = decode_journal_super(geo, &sb).map_err(RecoveryError::Super)?;
    let mut out = Recovery {
        replayed: 0,
        blocks: 0,
        head: pos,
        next_seq: seq,
    };
    while let Some(images) = read_transaction(geo, pos, seq, bugs.replay_ignores_checksum, read)? {
        // A transaction is replayed whole or not at all: every home is checked first (only a
        // replay that ignores checksums can meet one outside the device, or in the journal).
        let n = images.len() as u64;
        let journal = geo.journal_start..geo.journal_start + geo.journal_blocks;
        if images.iter().any(|(home, image)| {
            *home >= geo.blocks || journal.contains(home) || image.len() != BLOCK_SIZE
        }) {
            break;
        }
        for (home, image) in images {
            write(home, image)?;
            out.blocks += 1;
        }
        pos += n + 2;
        seq += 1;
        out.replayed += 1;
        out.head = pos;
        out.next_seq = seq;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards against a journal superblock read from the wrong block being reported as a bad
    /// tail (the home check was folded into the tail check): it is misplaced, like any block
    /// whose home number is wrong.
    #[test]
    fn a_journal_superblock_from_another_block_is_misplaced() {
        let geo = Geometry::for_device(1024, 16).unwrap();
        let sb = encode_journal_super(&geo, 7, 1);
        assert_eq!(decode_journal_super(&geo, &sb), Ok((7, 1)));
        let mut moved = geo;
        moved.journal_start += 1;
        assert_eq!(
            decode_journal_super(&moved, &sb),
            Err(FormatError::Misplaced {
                block: moved.journal_start,
                claims: geo.journal_start
            })
        );
        let bad_tail = encode_journal_super(&geo, 7, geo.journal_blocks);
        assert!(matches!(
            decode_journal_super(&geo, &bad_tail),
            Err(FormatError::Invalid { .. })
        ));
    }

    /// The checksum covers the first 512 bytes only: a write torn after the first sector
    /// leaves a superblock that still decodes, and damage inside the first sector does not.
    #[test]
    fn the_journal_superblock_checksum_spans_its_first_sector() {
        let geo = Geometry::for_device(1024, 16).unwrap();
        let mut sb = encode_journal_super(&geo, 7, 1);
        sb[JOURNAL_SUPER_CRC_BYTES] = 0xff;
        assert_eq!(decode_journal_super(&geo, &sb), Ok((7, 1)));
        sb[JOURNAL_SUPER_CRC_BYTES - 1] = 0xff;
        assert!(matches!(
            decode_journal_super(&geo, &sb),
            Err(FormatError::BadChecksum { .. })
        ));
    }
}
