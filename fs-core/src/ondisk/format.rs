//! The on-disk format, byte by byte (`docs/fs-core-format.md` is the same text for people, and
//! `fs-core/tests/format_doc.rs` holds the two together).
//!
//! One rule for all integers: little-endian, fixed width. Every block is 4096 bytes. Every
//! metadata block starts with the same 16-byte header:
//!
//! | offset | size | field | meaning |
//! |---:|---:|---|---|
//! | 0 | 4 | `magic` | the block's kind (below) |
//! | 4 | 4 | `crc` | CRC-32C of the whole block with these 4 bytes taken as zero |
//! | 8 | 8 | `blockno` | the device block the block belongs at (its home) |
//!
//! A block whose magic, checksum or home number is wrong is damage, never read as data.

use crate::block::BLOCK_SIZE;

/// Bytes of the common metadata block header.
pub const HEADER_BYTES: usize = 16;
/// Format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Block kinds (the header's `magic`, "FSxx" read as a little-endian u32).
pub const MAGIC_SUPER: u32 = u32::from_le_bytes(*b"FSSB");
pub const MAGIC_BITMAP: u32 = u32::from_le_bytes(*b"FSBM");
pub const MAGIC_INODE: u32 = u32::from_le_bytes(*b"FSIN");
pub const MAGIC_EXTENT: u32 = u32::from_le_bytes(*b"FSEX");
pub const MAGIC_DIR: u32 = u32::from_le_bytes(*b"FSDR");
pub const MAGIC_JOURNAL_SUPER: u32 = u32::from_le_bytes(*b"FSJS");
pub const MAGIC_DESCRIPTOR: u32 = u32::from_le_bytes(*b"FSJD");
pub const MAGIC_COMMIT: u32 = u32::from_le_bytes(*b"FSJC");

/// Device blocks a bitmap block describes (4080 bytes of bits after the header).
pub const BITS_PER_BITMAP_BLOCK: u64 = ((BLOCK_SIZE - HEADER_BYTES) * 8) as u64;
/// Bytes of one extent record.
pub const EXTENT_BYTES: usize = 24;
/// Offset of the first extent record in an inode block.
pub const INODE_EXTENTS_AT: usize = 80;
/// Extent records an inode block holds; more go to a chain of extent blocks.
pub const INODE_EXTENTS_MAX: usize = (BLOCK_SIZE - INODE_EXTENTS_AT) / EXTENT_BYTES;
/// Offset of the first extent record in an extent block.
pub const EXTENT_BLOCK_EXTENTS_AT: usize = 32;
/// Extent records one extent block holds.
pub const EXTENT_BLOCK_EXTENTS_MAX: usize = (BLOCK_SIZE - EXTENT_BLOCK_EXTENTS_AT) / EXTENT_BYTES;
/// Longest file name, in bytes.
pub const NAME_BYTES_MAX: usize = 255;
/// Bytes of one directory slot.
pub const DIR_SLOT_BYTES: usize = 264;
/// Directory slots in one directory block.
pub const DIR_SLOTS_PER_BLOCK: usize = (BLOCK_SIZE - HEADER_BYTES) / DIR_SLOT_BYTES;
/// Offset of the home-block list in a commit block: past the first 512-byte sector, so that
/// a commit torn at sector granularity can keep a valid start and lose its list.
pub const COMMIT_HOMES_AT: usize = 512;
/// Blocks one transaction may journal (its commit block lists their homes).
pub const TRANSACTION_BLOCKS_MAX: usize = (BLOCK_SIZE - COMMIT_HOMES_AT) / 8;

/// Inode record flag: the inode is in use.
pub const INODE_IN_USE: u32 = 1;
/// Extent record state values.
pub const EXTENT_UNWRITTEN: u8 = 1;
pub const EXTENT_WRITTEN: u8 = 2;

/// Why a block does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    #[error("block {block}: magic {found:#010x} is not a {want} block")]
    BadMagic {
        block: u64,
        want: &'static str,
        found: u32,
    },
    #[error("block {block}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadChecksum {
        block: u64,
        stored: u32,
        computed: u32,
    },
    #[error("block {block}: says it belongs at block {claims}")]
    Misplaced { block: u64, claims: u64 },
    #[error("block {block}: {what}")]
    Invalid { block: u64, what: String },
}

pub fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}
pub fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
pub fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
pub fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
pub fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// The checksum of a block: CRC-32C with the `crc` field (bytes 4..8) taken as zero.
pub fn block_crc(b: &[u8]) -> u32 {
    let c = crc32c::crc32c(&b[..4]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &b[8..])
}

/// A zeroed block with its header filled in except the checksum ([`seal`] sets it).
pub fn new_block(magic: u32, home: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    put_u32(&mut b, 0, magic);
    put_u64(&mut b, 8, home);
    b
}

/// Fills in the block's checksum; call it last.
pub fn seal(b: &mut [u8]) {
    let crc = block_crc(b);
    put_u32(b, 4, crc);
}

/// Checks a block read from `block`: its magic is `magic`, its checksum holds, and it says it
/// belongs at `block`.
pub fn check(b: &[u8], block: u64, magic: u32, want: &'static str) -> Result<(), FormatError> {
    if b.len() != BLOCK_SIZE {
        return Err(FormatError::Invalid {
            block,
            what: format!("{} bytes, not {BLOCK_SIZE}", b.len()),
        });
    }
    let found = get_u32(b, 0);
    if found != magic {
        return Err(FormatError::BadMagic { block, want, found });
    }
    let (stored, computed) = (get_u32(b, 4), block_crc(b));
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
    Ok(())
}

/// Where everything is, fixed at mkfs (the superblock's content).
///
/// Superblock, block 0, after the header:
///
/// | offset | size | field |
/// |---:|---:|---|
/// | 16 | 4 | `version` (1) |
/// | 20 | 4 | `block_bytes` (4096) |
/// | 24 | 8 | `blocks`: device size in blocks |
/// | 32 | 8 | `journal_start` |
/// | 40 | 8 | `journal_blocks` (the journal superblock is its first block) |
/// | 48 | 8 | `bitmap_start` |
/// | 56 | 8 | `bitmap_blocks` |
/// | 64 | 8 | `inode_start` (one block per inode) |
/// | 72 | 8 | `inodes` |
/// | 80 | 8 | `dir_start` (the root directory) |
/// | 88 | 8 | `dir_blocks` |
/// | 96 | 8 | `data_start`: the first block the allocator hands out |
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Geometry {
    pub blocks: u64,
    pub journal_start: u64,
    pub journal_blocks: u64,
    pub bitmap_start: u64,
    pub bitmap_blocks: u64,
    pub inode_start: u64,
    pub inodes: u64,
    pub dir_start: u64,
    pub dir_blocks: u64,
    pub data_start: u64,
}

/// Smallest journal, in blocks.
pub const JOURNAL_BLOCKS_MIN: u64 = 32;
/// Largest journal, in blocks.
pub const JOURNAL_BLOCKS_MAX: u64 = 4096;
/// Most inodes a filesystem has.
pub const INODES_MAX: u64 = 4096;
/// Data blocks a filesystem must have at least.
pub const DATA_BLOCKS_MIN: u64 = 16;

impl Geometry {
    /// The layout mkfs gives a device of `blocks` blocks with `inodes` inodes: the journal is
    /// a sixteenth of the device (within its bounds), with room for a transaction that
    /// touches every metadata block but the journal's.
    pub fn for_device(blocks: u64, inodes: u64) -> Result<Geometry, String> {
        if inodes == 0 || inodes > INODES_MAX {
            return Err(format!("{inodes} inodes (1..={INODES_MAX} allowed)"));
        }
        let bitmap_blocks = blocks.div_ceil(BITS_PER_BITMAP_BLOCK).max(1);
        let dir_blocks = inodes.div_ceil(DIR_SLOTS_PER_BLOCK as u64);
        let metadata = bitmap_blocks + inodes + dir_blocks;
        let journal_blocks = (blocks / 16)
            .max(JOURNAL_BLOCKS_MIN)
            .max((metadata + 4).min(TRANSACTION_BLOCKS_MAX as u64 + 3))
            .min(JOURNAL_BLOCKS_MAX);
        let journal_start = 1;
        let bitmap_start = journal_start + journal_blocks;
        let inode_start = bitmap_start + bitmap_blocks;
        let dir_start = inode_start + inodes;
        let data_start = dir_start + dir_blocks;
        if data_start + DATA_BLOCKS_MIN > blocks {
            return Err(format!(
                "a {blocks}-block device is too small: the metadata takes {data_start} blocks \
                 and at least {DATA_BLOCKS_MIN} must be left for data"
            ));
        }
        Ok(Geometry {
            blocks,
            journal_start,
            journal_blocks,
            bitmap_start,
            bitmap_blocks,
            inode_start,
            inodes,
            dir_start,
            dir_blocks,
            data_start,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = new_block(MAGIC_SUPER, 0);
        put_u32(&mut b, 16, FORMAT_VERSION);
        put_u32(&mut b, 20, BLOCK_SIZE as u32);
        for (i, v) in self.fields().into_iter().enumerate() {
            put_u64(&mut b, 24 + 8 * i, v);
        }
        seal(&mut b);
        b
    }

    fn fields(&self) -> [u64; 10] {
        [
            self.blocks,
            self.journal_start,
            self.journal_blocks,
            self.bitmap_start,
            self.bitmap_blocks,
            self.inode_start,
            self.inodes,
            self.dir_start,
            self.dir_blocks,
            self.data_start,
        ]
    }

    /// Decodes and checks a superblock: its fields must describe the layout mkfs makes for
    /// its device size and inode count, so a damaged field is never trusted.
    pub fn decode(b: &[u8]) -> Result<Geometry, FormatError> {
        check(b, 0, MAGIC_SUPER, "superblock")?;
        let bad = |what: String| FormatError::Invalid { block: 0, what };
        let version = get_u32(b, 16);
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {version}; this build reads version {FORMAT_VERSION}"
            )));
        }
        if get_u32(b, 20) != BLOCK_SIZE as u32 {
            return Err(bad(format!("block size {} is not 4096", get_u32(b, 20))));
        }
        let f: Vec<u64> = (0..10).map(|i| get_u64(b, 24 + 8 * i)).collect();
        let want = Geometry::for_device(f[0], f[6]).map_err(bad)?;
        if want.fields()[..] != f[..] {
            return Err(bad(format!(
                "the layout {f:?} is not the one mkfs makes for {} blocks and {} inodes",
                f[0], f[6]
            )));
        }
        Ok(want)
    }

    /// Home block of inode `ino`'s record.
    pub fn inode_block(&self, ino: u64) -> u64 {
        self.inode_start + ino
    }

    /// Home block of the bitmap block covering device block `block`, and the bit in it.
    pub fn bitmap_bit(&self, block: u64) -> (u64, usize) {
        (
            self.bitmap_start + block / BITS_PER_BITMAP_BLOCK,
            (block % BITS_PER_BITMAP_BLOCK) as usize,
        )
    }

    /// Whether `block` is a metadata block at a fixed place (superblock, journal, bitmap,
    /// inode table, directory): never handed out by the allocator.
    pub fn is_fixed_metadata(&self, block: u64) -> bool {
        block < self.data_start
    }
}

/// The on-disk state of one extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskExtentState {
    Unwritten,
    Written,
}

/// One extent record (24 bytes):
///
/// | offset | size | field |
/// |---:|---:|---|
/// | 0 | 8 | `file_block`: first file block |
/// | 8 | 4 | `count`: blocks (at least 1) |
/// | 12 | 1 | `state`: 1 unwritten (reads as zeros), 2 written |
/// | 13 | 3 | zero |
/// | 16 | 8 | `dev_block`: device block of `file_block` (the run is contiguous) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DiskExtent {
    pub file_block: u64,
    pub count: u32,
    pub state: DiskExtentState,
    pub dev_block: u64,
}

impl DiskExtent {
    pub fn encode(&self, b: &mut [u8], at: usize) {
        put_u64(b, at, self.file_block);
        put_u32(b, at + 8, self.count);
        b[at + 12] = match self.state {
            DiskExtentState::Unwritten => EXTENT_UNWRITTEN,
            DiskExtentState::Written => EXTENT_WRITTEN,
        };
        b[at + 13..at + 16].fill(0);
        put_u64(b, at + 16, self.dev_block);
    }

    pub fn decode(b: &[u8], at: usize, block: u64) -> Result<DiskExtent, FormatError> {
        let state = match b[at + 12] {
            EXTENT_UNWRITTEN => DiskExtentState::Unwritten,
            EXTENT_WRITTEN => DiskExtentState::Written,
            s => {
                return Err(FormatError::Invalid {
                    block,
                    what: format!("extent at byte {at} has state {s}"),
                })
            }
        };
        let e = DiskExtent {
            file_block: get_u64(b, at),
            count: get_u32(b, at + 8),
            state,
            dev_block: get_u64(b, at + 16),
        };
        if e.count == 0 {
            return Err(FormatError::Invalid {
                block,
                what: format!("extent at byte {at} is empty"),
            });
        }
        Ok(e)
    }
}

/// One inode record (the whole block `inode_start + ino`), after the header:
///
/// | offset | size | field |
/// |---:|---:|---|
/// | 16 | 4 | `ino` |
/// | 20 | 4 | `flags`: bit 0 in use |
/// | 24 | 8 | `generation`: bumped each time the inode is created again |
/// | 32 | 8 | `size` in bytes |
/// | 40 | 4 | `nlink` |
/// | 44 | 4 | `extent_count`: extents in all (here and in the chain) |
/// | 48 | 8 | `mtime` (a logical clock: the filesystem's operation counter) |
/// | 56 | 8 | `ctime` (likewise) |
/// | 64 | 8 | `extent_block`: first block of the extent chain, 0 for none |
/// | 72 | 8 | zero |
/// | 80 | 24 x n | the first `min(extent_count, 167)` extents, by file block |
///
/// An extent block (magic `FSEX`, allocated from the data area), after the header: `next`
/// (8 bytes at 16: the next extent block, 0 for none), `count` (4 bytes at 24: extents in this
/// block), 4 zero bytes, then up to 169 extents from byte 32.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct DiskInode {
    pub ino: u32,
    pub in_use: bool,
    pub generation: u64,
    pub size: u64,
    pub nlink: u32,
    pub mtime: u64,
    pub ctime: u64,
    pub extents: Vec<DiskExtent>,
}

impl DiskInode {
    /// Extent blocks the chain needs for this many extents.
    pub fn chain_blocks(extents: usize) -> usize {
        extents
            .saturating_sub(INODE_EXTENTS_MAX)
            .div_ceil(EXTENT_BLOCK_EXTENTS_MAX)
    }

    /// Encodes the inode block (at `home`) and its extent chain (at `chain`, which must have
    /// [`Self::chain_blocks`] entries): the blocks, in order, inode block first.
    pub fn encode(&self, home: u64, chain: &[u64]) -> Vec<(u64, Vec<u8>)> {
        assert_eq!(chain.len(), Self::chain_blocks(self.extents.len()));
        let mut b = new_block(MAGIC_INODE, home);
        put_u32(&mut b, 16, self.ino);
        put_u32(&mut b, 20, if self.in_use { INODE_IN_USE } else { 0 });
        put_u64(&mut b, 24, self.generation);
        put_u64(&mut b, 32, self.size);
        put_u32(&mut b, 40, self.nlink);
        put_u32(&mut b, 44, self.extents.len() as u32);
        put_u64(&mut b, 48, self.mtime);
        put_u64(&mut b, 56, self.ctime);
        put_u64(&mut b, 64, chain.first().copied().unwrap_or(0));
        let (inline, rest) = self
            .extents
            .split_at(self.extents.len().min(INODE_EXTENTS_MAX));
        for (i, e) in inline.iter().enumerate() {
            e.encode(&mut b, INODE_EXTENTS_AT + i * EXTENT_BYTES);
        }
        seal(&mut b);
        let mut out = vec![(home, b)];
        for (k, part) in rest.chunks(EXTENT_BLOCK_EXTENTS_MAX).enumerate() {
            let mut x = new_block(MAGIC_EXTENT, chain[k]);
            put_u64(&mut x, 16, chain.get(k + 1).copied().unwrap_or(0));
            put_u32(&mut x, 24, part.len() as u32);
            for (i, e) in part.iter().enumerate() {
                e.encode(&mut x, EXTENT_BLOCK_EXTENTS_AT + i * EXTENT_BYTES);
            }
            seal(&mut x);
            out.push((chain[k], x));
        }
        out
    }

    /// Decodes an inode block; `read` fetches its chain's extent blocks. Returns the inode
    /// and the chain's blocks.
    pub fn decode(
        b: &[u8],
        home: u64,
        read: &mut dyn FnMut(u64) -> Result<Vec<u8>, FormatError>,
    ) -> Result<(DiskInode, Vec<u64>), FormatError> {
        check(b, home, MAGIC_INODE, "inode")?;
        let bad = |what: String| FormatError::Invalid { block: home, what };
        let flags = get_u32(b, 20);
        if flags & !INODE_IN_USE != 0 {
            return Err(bad(format!("unknown inode flags {flags:#x}")));
        }
        let count = get_u32(b, 44) as usize;
        let mut inode = DiskInode {
            ino: get_u32(b, 16),
            in_use: flags & INODE_IN_USE != 0,
            generation: get_u64(b, 24),
            size: get_u64(b, 32),
            nlink: get_u32(b, 40),
            mtime: get_u64(b, 48),
            ctime: get_u64(b, 56),
            extents: Vec::with_capacity(count.min(INODE_EXTENTS_MAX)),
        };
        for i in 0..count.min(INODE_EXTENTS_MAX) {
            inode.extents.push(DiskExtent::decode(
                b,
                INODE_EXTENTS_AT + i * EXTENT_BYTES,
                home,
            )?);
        }
        let chain = Self::decode_chain(&mut inode, count, get_u64(b, 64), home, read)?;
        Ok((inode, chain))
    }

    fn decode_chain(
        inode: &mut DiskInode,
        count: usize,
        first: u64,
        home: u64,
        read: &mut dyn FnMut(u64) -> Result<Vec<u8>, FormatError>,
    ) -> Result<Vec<u64>, FormatError> {
        let want = Self::chain_blocks(count);
        let mut chain = Vec::with_capacity(want);
        let mut next = first;
        while next != 0 {
            if chain.len() == want {
                return Err(FormatError::Invalid {
                    block: home,
                    what: format!(
                        "extent chain longer than the {want} blocks {count} extents need"
                    ),
                });
            }
            let x = read(next)?;
            check(&x, next, MAGIC_EXTENT, "extent")?;
            let n = get_u32(&x, 24) as usize;
            if n == 0 || n > EXTENT_BLOCK_EXTENTS_MAX {
                return Err(FormatError::Invalid {
                    block: next,
                    what: format!(
                        "extent block holds {n} extents (1..={EXTENT_BLOCK_EXTENTS_MAX})"
                    ),
                });
            }
            for i in 0..n {
                inode.extents.push(DiskExtent::decode(
                    &x,
                    EXTENT_BLOCK_EXTENTS_AT + i * EXTENT_BYTES,
                    next,
                )?);
            }
            chain.push(next);
            next = get_u64(&x, 16);
        }
        if inode.extents.len() != count || chain.len() != want {
            return Err(FormatError::Invalid {
                block: home,
                what: format!(
                    "says {count} extents but holds {} in {} chain blocks",
                    inode.extents.len(),
                    chain.len()
                ),
            });
        }
        Ok(chain)
    }
}

/// One directory slot (264 bytes), [`DIR_SLOTS_PER_BLOCK`] to a directory block after the
/// header: `ino` (4 bytes), `name_len` (2 bytes; 0: the slot is free), 2 zero bytes, then the
/// name (UTF-8, up to 255 bytes, no `/` or NUL), zero-padded to 256 bytes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DirEntry {
    pub name: String,
    pub ino: u32,
}

/// Why a name cannot be a file name.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > NAME_BYTES_MAX {
        return Err(format!(
            "a name is 1..={NAME_BYTES_MAX} bytes, not {}",
            name.len()
        ));
    }
    if name.contains(['/', '\0']) || name == "." || name == ".." {
        return Err(format!("{name:?} is not a file name"));
    }
    Ok(())
}

/// Encodes directory block `k` (slots `k * DIR_SLOTS_PER_BLOCK ..`) at `home`.
pub fn encode_dir_block(home: u64, slots: &[Option<DirEntry>]) -> Vec<u8> {
    assert!(slots.len() <= DIR_SLOTS_PER_BLOCK);
    let mut b = new_block(MAGIC_DIR, home);
    for (i, slot) in slots.iter().enumerate() {
        if let Some(e) = slot {
            let at = HEADER_BYTES + i * DIR_SLOT_BYTES;
            put_u32(&mut b, at, e.ino);
            put_u16(&mut b, at + 4, e.name.len() as u16);
            b[at + 8..at + 8 + e.name.len()].copy_from_slice(e.name.as_bytes());
        }
    }
    seal(&mut b);
    b
}

/// Decodes a directory block's slots.
pub fn decode_dir_block(b: &[u8], home: u64) -> Result<Vec<Option<DirEntry>>, FormatError> {
    check(b, home, MAGIC_DIR, "directory")?;
    let mut out = Vec::with_capacity(DIR_SLOTS_PER_BLOCK);
    for i in 0..DIR_SLOTS_PER_BLOCK {
        let at = HEADER_BYTES + i * DIR_SLOT_BYTES;
        let len = get_u16(b, at + 4) as usize;
        if len == 0 {
            out.push(None);
            continue;
        }
        let bad = |what: String| FormatError::Invalid { block: home, what };
        if len > NAME_BYTES_MAX {
            return Err(bad(format!("slot {i}: name of {len} bytes")));
        }
        let name = std::str::from_utf8(&b[at + 8..at + 8 + len])
            .map_err(|_| bad(format!("slot {i}: name is not UTF-8")))?;
        check_name(name).map_err(|e| bad(format!("slot {i}: {e}")))?;
        out.push(Some(DirEntry {
            name: name.to_owned(),
            ino: get_u32(b, at),
        }));
    }
    Ok(out)
}

/// Encodes bitmap block `k` at `home` from the used-bits of its device blocks.
pub fn encode_bitmap_block(home: u64, bits: &[u8]) -> Vec<u8> {
    assert!(bits.len() <= BLOCK_SIZE - HEADER_BYTES);
    let mut b = new_block(MAGIC_BITMAP, home);
    b[HEADER_BYTES..HEADER_BYTES + bits.len()].copy_from_slice(bits);
    seal(&mut b);
    b
}

/// The bits of a bitmap block (bit `i` of byte `j` is device block `8j + i` of its range).
pub fn decode_bitmap_block(b: &[u8], home: u64) -> Result<&[u8], FormatError> {
    check(b, home, MAGIC_BITMAP, "bitmap")?;
    Ok(&b[HEADER_BYTES..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_round_trips_and_rejects_damage() {
        let g = Geometry::for_device(1024, 64).unwrap();
        assert_eq!(g.journal_start, 1);
        assert!(g.journal_blocks >= JOURNAL_BLOCKS_MIN);
        assert_eq!(g.data_start, g.dir_start + g.dir_blocks);
        let b = g.encode();
        assert_eq!(Geometry::decode(&b).unwrap(), g);
        let mut bad = b.clone();
        bad[100] ^= 1;
        assert!(matches!(
            Geometry::decode(&bad),
            Err(FormatError::BadChecksum { .. })
        ));
        let mut lie = g;
        lie.data_start += 1;
        assert!(
            Geometry::decode(&lie.encode()).is_err(),
            "a layout mkfs would not make"
        );
        assert!(Geometry::for_device(40, 64).is_err());
    }

    #[test]
    fn inodes_with_long_extent_chains_round_trip() {
        let extents: Vec<DiskExtent> = (0..400)
            .map(|i| DiskExtent {
                file_block: 2 * i,
                count: 1,
                state: if i % 2 == 0 {
                    DiskExtentState::Written
                } else {
                    DiskExtentState::Unwritten
                },
                dev_block: 1000 + 3 * i,
            })
            .collect();
        let inode = DiskInode {
            ino: 7,
            in_use: true,
            generation: 3,
            size: 12345,
            nlink: 2,
            mtime: 9,
            ctime: 10,
            extents,
        };
        let chain: Vec<u64> = vec![500, 501];
        assert_eq!(DiskInode::chain_blocks(400), 2);
        let blocks = inode.encode(77, &chain);
        assert_eq!(blocks.len(), 3);
        let map: std::collections::HashMap<u64, Vec<u8>> = blocks.iter().cloned().collect();
        let (back, back_chain) =
            DiskInode::decode(&map[&77], 77, &mut |b| Ok(map[&b].clone())).unwrap();
        assert_eq!(back, inode);
        assert_eq!(back_chain, chain);
    }

    /// Guards against an extent block whose `count` passes what a block holds being read as
    /// a full block: the decoder used to clamp the count to 169 and accept the block whenever
    /// the totals still added up.
    #[test]
    fn an_extent_block_count_past_its_capacity_is_damage() {
        let extents: Vec<DiskExtent> = (0..400)
            .map(|i| DiskExtent {
                file_block: 2 * i,
                count: 1,
                state: DiskExtentState::Written,
                dev_block: 1000 + i,
            })
            .collect();
        let inode = DiskInode {
            ino: 1,
            in_use: true,
            nlink: 1,
            extents,
            ..DiskInode::default()
        };
        let mut map: std::collections::HashMap<u64, Vec<u8>> =
            inode.encode(5, &[500, 501]).into_iter().collect();
        let first = map.get_mut(&500).unwrap();
        assert_eq!(get_u32(first, 24) as usize, EXTENT_BLOCK_EXTENTS_MAX);
        put_u32(first, 24, 500);
        seal(first);
        let got = DiskInode::decode(&map[&5], 5, &mut |b| Ok(map[&b].clone()));
        assert!(
            matches!(got, Err(FormatError::Invalid { block: 500, .. })),
            "{got:?}"
        );
    }

    #[test]
    fn directory_slots_round_trip_and_names_are_checked() {
        let mut slots = vec![None; DIR_SLOTS_PER_BLOCK];
        slots[0] = Some(DirEntry {
            name: "a".repeat(255),
            ino: 3,
        });
        slots[5] = Some(DirEntry {
            name: "f1".into(),
            ino: 1,
        });
        let b = encode_dir_block(9, &slots);
        assert_eq!(decode_dir_block(&b, 9).unwrap(), slots);
        assert!(check_name("a/b").is_err());
        assert!(check_name(&"x".repeat(256)).is_err());
        assert!(decode_dir_block(&b, 10).is_err(), "misplaced block");
    }
}
