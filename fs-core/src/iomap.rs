//! The iomap layer's mapping: `IoMap` and the filesystem's `iomap_begin` for buffered
//! writes and page faults (mirroring `xfs_buffered_write_iomap_begin`), plus `iomap_valid`.
//! `iomap_end` (the short-write delalloc punch) and the iterator that remaps on STALE are
//! steps of the write task in `buffered_io`.

use crate::block::BLOCK_SIZE;
use crate::extent::{Extent, ExtentState, Run};
use crate::fs::{AllocMode, Fs, FsError};
use serde::{Deserialize, Serialize};

const BS: u64 = BLOCK_SIZE as u64;

/// The kernel's IOMAP_* types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoMapKind {
    Hole,
    Delalloc,
    /// IOMAP_MAPPED: written blocks.
    Mapped,
    Unwritten,
}

/// IOMAP_F_* flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoMapFlags(pub u8);

impl IoMapFlags {
    /// The mapping was created by this call (the blocks hold no data yet).
    pub const NEW: u8 = 1;
    /// The iomap core found the mapping stale and must remap.
    pub const STALE: u8 = 2;

    pub fn has(self, f: u8) -> bool {
        self.0 & f != 0
    }
}

/// A mapping of file range `[offset, offset + length)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoMap {
    pub offset: u64,
    pub length: u64,
    pub kind: IoMapKind,
    /// Device block of `offset` for Mapped/Unwritten.
    pub addr: u64,
    pub flags: IoMapFlags,
    /// The inode's extent `seq` when the mapping was made.
    pub validity_cookie: u64,
}

impl IoMap {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }

    pub fn covers(&self, pos: u64) -> bool {
        pos >= self.offset && pos < self.end()
    }

    /// Device block backing the file block at `pos`.
    pub fn addr_of(&self, pos: u64) -> u64 {
        self.addr + (pos - self.offset) / BS
    }

    pub fn from_run(run: Run, seq: u64) -> IoMap {
        let kind = match run.state {
            ExtentState::Hole => IoMapKind::Hole,
            ExtentState::Delalloc => IoMapKind::Delalloc,
            ExtentState::Unwritten => IoMapKind::Unwritten,
            ExtentState::Written => IoMapKind::Mapped,
        };
        IoMap {
            offset: run.start * BS,
            length: run.len * BS,
            kind,
            addr: run.addr,
            flags: IoMapFlags::default(),
            validity_cookie: seq,
        }
    }
}

/// `->iomap_valid`: is the mapping still what the extent map says?
pub fn iomap_valid(fs: &Fs, ino: usize, map: &IoMap) -> bool {
    map.validity_cookie == fs.inode(ino).extents.seq()
}

/// `iomap_begin` for a buffered write or a page fault over `[pos, pos + len)`: map the first
/// block's run; over a hole, reserve delalloc (or allocate, in AtWrite mode) for the hole part
/// of the range and flag the mapping NEW.
pub fn iomap_begin_write(fs: &mut Fs, ino: usize, pos: u64, len: u64) -> Result<IoMap, FsError> {
    let first = pos / BS;
    let last = (pos + len).div_ceil(BS);
    let run = fs.inode(ino).extents.run_at(first, last - first);
    if run.state != ExtentState::Hole {
        return Ok(IoMap::from_run(run, fs.inode(ino).extents.seq()));
    }
    match fs.cfg.alloc {
        AllocMode::Delalloc => {
            for b in run.start..run.start + run.len {
                fs.inode_mut(ino).extents.set(b, Extent::DELALLOC);
            }
            let run = Run {
                state: ExtentState::Delalloc,
                ..run
            };
            let mut map = IoMap::from_run(run, fs.inode(ino).extents.seq());
            map.flags.0 |= IoMapFlags::NEW;
            Ok(map)
        }
        AllocMode::AtWrite => {
            // Allocate block by block; the mapping covers the contiguous part.
            let mut len = 0;
            let mut base = 0;
            for b in run.start..run.start + run.len {
                if fs.alloc.free_blocks() == 0 {
                    break;
                }
                let addr = fs.alloc_block(ino, b, !fs.cfg.gfs2.no_block_zeroing)?;
                if len > 0 && addr != base + len {
                    fs.alloc.free(addr);
                    break;
                }
                if len == 0 {
                    base = addr;
                }
                fs.inode_mut(ino).extents.set(
                    b,
                    Extent {
                        state: ExtentState::Written,
                        addr,
                    },
                );
                len += 1;
            }
            if len == 0 {
                return Err(FsError::NoSpace);
            }
            let run = Run {
                start: run.start,
                len,
                state: ExtentState::Written,
                addr: base,
            };
            let mut map = IoMap::from_run(run, fs.inode(ino).extents.seq());
            map.flags.0 |= IoMapFlags::NEW;
            Ok(map)
        }
    }
}

/// If `map` no longer describes file block `block` (the extent changed since it was made),
/// say how: "cached UNWRITTEN mapping, block is now WRITTEN". Diagnostics only.
pub fn stale_view(fs: &Fs, ino: usize, map: &IoMap, block: u64) -> Option<String> {
    let cur = fs.inode(ino).extents.get(block);
    let (state, addr) = match map.kind {
        IoMapKind::Hole => (ExtentState::Hole, None),
        IoMapKind::Delalloc => (ExtentState::Delalloc, None),
        IoMapKind::Unwritten => (ExtentState::Unwritten, Some(map.addr_of(block * BS))),
        IoMapKind::Mapped => (ExtentState::Written, Some(map.addr_of(block * BS))),
    };
    let same = cur.state == state && addr.is_none_or(|a| a == cur.addr);
    let new = if map.flags.has(IoMapFlags::NEW) {
        "|NEW"
    } else {
        ""
    };
    let where_ = |s: ExtentState, a: u64| match s {
        ExtentState::Unwritten | ExtentState::Written => format!("{s:?} at device block {a}"),
        _ => format!("{s:?}"),
    };
    (!same).then(|| {
        format!(
            "its cached {:?}{new} mapping (cookie {}) says file block {block} is {}, but it is now {} (seq {})",
            map.kind,
            map.validity_cookie,
            where_(state, addr.unwrap_or(0)),
            where_(cur.state, cur.addr),
            fs.inode(ino).extents.seq()
        )
    })
}

/// `iomap_block_needs_zeroing`: the parts of a block a write does not cover are zeroed (not
/// read) when the mapping is not MAPPED, is NEW, or the block starts at or past EOF.
pub fn block_needs_zeroing(map: &IoMap, block_start: u64, size: u64) -> bool {
    map.kind != IoMapKind::Mapped || map.flags.has(IoMapFlags::NEW) || block_start >= size
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::MemDevice;
    use crate::fs::Config;

    #[test]
    fn write_over_hole_reserves_delalloc_new_and_cookie_tracks_seq() {
        let mut fs = Fs::new(Config::default(), Box::new(MemDevice::new(64)), 1);
        let m = iomap_begin_write(&mut fs, 0, 100, 2 * BS).unwrap();
        assert_eq!(
            (m.offset, m.length, m.kind),
            (0, 3 * BS, IoMapKind::Delalloc)
        );
        assert!(m.flags.has(IoMapFlags::NEW));
        assert!(iomap_valid(&fs, 0, &m));
        let again = iomap_begin_write(&mut fs, 0, 0, BS).unwrap();
        assert!(!again.flags.has(IoMapFlags::NEW));
        fs.inode_mut(0).extents.set(1, Extent::HOLE);
        assert!(!iomap_valid(&fs, 0, &m));
    }

    /// Allocating at write time, a mapping covers only device-contiguous blocks: a block
    /// that does not follow goes back and the next `iomap_begin` maps from there.
    #[test]
    fn at_write_mappings_cover_contiguous_blocks_only() {
        let cfg = Config {
            alloc: AllocMode::AtWrite,
            ..Config::default()
        };
        let mut fs = Fs::new(cfg, Box::new(MemDevice::new(64)), 2);
        let a = fs.alloc_block(1, 0, false).unwrap();
        let b = fs.alloc_block(1, 1, false).unwrap();
        fs.alloc_block(1, 2, false).unwrap();
        assert_eq!(b, a + 1);
        fs.alloc.free(b);
        let free = fs.alloc.free_blocks();
        let m = iomap_begin_write(&mut fs, 0, 0, 2 * BS).unwrap();
        assert_eq!((m.length, m.addr), (BS, b), "only the block that was freed");
        assert_eq!(fs.inode(0).extents.get(1).state, ExtentState::Hole);
        assert_eq!(
            fs.alloc.free_blocks(),
            free - 1,
            "the other block went back"
        );
    }
}
