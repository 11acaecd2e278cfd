//! fsck: reads the metadata straight from blocks (not through mount, so a bug there cannot
//! hide one here) and checks that it holds together:
//! - every metadata block decodes: magic, checksum, home block, sane fields;
//! - every extent lies in the data area and inside the largest file, and no file block is
//!   mapped twice;
//! - every block is owned once (by one file block, or one inode's extent chain);
//! - the bitmap marks exactly the owned blocks and the fixed metadata;
//! - a free inode has no links, size or extents; an inode in use has at least one link;
//! - every directory entry names an inode in use, names are unique, and each inode's link
//!   count is the number of entries naming it.
//!
//! Run it on a recovered filesystem: [`check_device`] replays the journal into a private copy
//! first (the device itself is never written).

use std::collections::HashMap;

use crate::block::{read_block_sync, BlockDevice, BlockMap, CowDevice, DeviceError};
use crate::extent::FILE_BLOCKS_MAX;

use super::format::*;
use super::journal::{self, JournalBugs, Recovery};

/// Problems reported at most (the rest are counted).
pub const PROBLEMS_MAX: usize = 256;

/// What fsck found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct FsckReport {
    /// Each problem, in words.
    pub problems: Vec<String>,
    /// Problems found beyond [`PROBLEMS_MAX`].
    pub more_problems: usize,
    pub inodes_in_use: usize,
    /// Inodes in use with no link: unlinked before a crash, not yet freed (mount frees them).
    pub orphans: Vec<u32>,
    pub names: usize,
    pub data_blocks_used: u64,
    /// What recovery replayed before the check (when it ran one).
    pub recovery: Option<Recovery>,
}

impl FsckReport {
    pub fn clean(&self) -> bool {
        self.problems.is_empty()
    }

    fn problem(&mut self, p: String) {
        if self.problems.len() < PROBLEMS_MAX {
            self.problems.push(p);
        } else {
            self.more_problems += 1;
        }
    }
}

/// Who owns a block, for the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    File { ino: u32, fblock: u64 },
    Chain { ino: u32 },
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::File { ino, fblock } => write!(f, "inode {ino} file block {fblock}"),
            Holder::Chain { ino } => write!(f, "inode {ino}'s extent chain"),
        }
    }
}

/// Recovers the journal of the filesystem on `dev` into a private copy, then checks it.
pub fn check_device(dev: Box<dyn BlockDevice>, bugs: JournalBugs) -> FsckReport {
    let blocks = dev.block_count();
    let mut cow = CowDevice::new(dev);
    let mut report = FsckReport::default();
    let geo = match read_block_sync(&mut cow, 0)
        .map_err(|e| e.to_string())
        .and_then(|b| Geometry::decode(&b).map_err(|e| describe_super(&b, e)))
    {
        Ok(g) => g,
        Err(e) => {
            report.problem(format!("superblock: {e}"));
            return report;
        }
    };
    if geo.blocks != blocks {
        report.problem(format!(
            "superblock: the filesystem has {} blocks but the device {blocks}",
            geo.blocks
        ));
        return report;
    }
    let cow = std::cell::RefCell::new(cow);
    let recovered = journal::recover(
        &geo,
        bugs,
        &mut |b| read_block_sync(&mut *cow.borrow_mut(), b),
        &mut |b, data| {
            crate::block::submit_and_complete(
                &mut *cow.borrow_mut(),
                crate::block::Request::Write {
                    block: b,
                    data: data.into(),
                    fua: false,
                },
            )
        },
    );
    match recovered {
        Ok(r) => report.recovery = Some(r),
        Err(e) => report.problem(format!("journal: {e}")),
    }
    let mut cow = cow.into_inner();
    let mut rest = check(&mut |b| read_block_sync(&mut cow, b));
    rest.recovery = report.recovery;
    rest.problems.splice(0..0, report.problems);
    rest
}

/// A superblock that does not decode, in words: "not an fs-core filesystem" when its magic
/// is not ours at all.
fn describe_super(b: &[u8], e: FormatError) -> String {
    match e {
        FormatError::BadMagic { found, .. } => format!(
            "not an fs-core filesystem (block 0 starts with {:02x?}, not \"FSSB\", {found:#010x})",
            &b[..4.min(b.len())]
        ),
        e => e.to_string(),
    }
}

/// Checks the filesystem whose blocks `read` returns (already recovered).
pub fn check(read: &mut dyn FnMut(u64) -> Result<Vec<u8>, DeviceError>) -> FsckReport {
    let mut r = FsckReport::default();
    let geo = match read(0).map(|b| Geometry::decode(&b)) {
        Ok(Ok(g)) => g,
        Ok(Err(e)) => {
            r.problem(format!("superblock: {e}"));
            return r;
        }
        Err(e) => {
            r.problem(format!("superblock: cannot read: {e}"));
            return r;
        }
    };
    match read(geo.journal_start) {
        Ok(b) => {
            if let Err(e) = journal::decode_journal_super(&geo, &b) {
                r.problem(format!("journal superblock: {e}"));
            }
        }
        Err(e) => r.problem(format!("journal superblock: cannot read: {e}")),
    }
    let owners = check_inodes(&geo, read, &mut r);
    let links = check_directory(&geo, read, &owners.in_use, &mut r);
    for (ino, &nlink) in owners.nlink.iter().enumerate() {
        let names = links.get(&(ino as u32)).copied().unwrap_or(0);
        if owners.in_use[ino] && nlink != names {
            r.problem(format!(
                "inode {ino}: link count {nlink}, but {names} directory entries name it"
            ));
        }
    }
    check_bitmap(&geo, read, &owners.by_block, &mut r);
    r.data_blocks_used = owners.by_block.len() as u64;
    r
}

struct Owners {
    by_block: BlockMap<Holder>,
    in_use: Vec<bool>,
    nlink: Vec<u32>,
}

fn check_inodes(
    geo: &Geometry,
    read: &mut dyn FnMut(u64) -> Result<Vec<u8>, DeviceError>,
    r: &mut FsckReport,
) -> Owners {
    let mut o = Owners {
        by_block: BlockMap::default(),
        in_use: vec![false; geo.inodes as usize],
        nlink: vec![0; geo.inodes as usize],
    };
    for ino in 0..geo.inodes {
        let home = geo.inode_block(ino);
        let raw = match read(home) {
            Ok(b) => b,
            Err(e) => {
                r.problem(format!("inode {ino}: cannot read block {home}: {e}"));
                continue;
            }
        };
        let mut rd = |b: u64| {
            if b < geo.data_start || b >= geo.blocks {
                return Err(FormatError::Invalid {
                    block: home,
                    what: format!("extent chain block {b} is outside the data area"),
                });
            }
            read(b).map_err(|e| FormatError::Invalid {
                block: b,
                what: e.to_string(),
            })
        };
        let decoded = DiskInode::decode(&raw, home, &mut rd);
        let (inode, chain) = match decoded {
            Ok(x) => x,
            Err(e) => {
                r.problem(format!("inode {ino}: {e}"));
                continue;
            }
        };
        check_inode(geo, ino, &inode, &chain, &mut o, r);
    }
    o
}

fn check_inode(
    geo: &Geometry,
    ino: u64,
    inode: &DiskInode,
    chain: &[u64],
    o: &mut Owners,
    r: &mut FsckReport,
) {
    let i = ino as usize;
    if inode.ino as u64 != ino {
        r.problem(format!("inode block {ino} holds inode {}", inode.ino));
    }
    o.in_use[i] = inode.in_use;
    o.nlink[i] = inode.nlink;
    if !inode.in_use {
        if inode.nlink != 0 || inode.size != 0 || !inode.extents.is_empty() {
            r.problem(format!(
                "inode {ino} is free but has {} links, size {}, {} extents",
                inode.nlink,
                inode.size,
                inode.extents.len()
            ));
        }
        return;
    }
    r.inodes_in_use += 1;
    if inode.size > crate::fs::FILE_BYTES_MAX {
        r.problem(format!(
            "inode {ino}: size {} is larger than a file can be ({})",
            inode.size,
            crate::fs::FILE_BYTES_MAX
        ));
    }
    if inode.nlink == 0 {
        r.orphans.push(ino as u32);
    }
    let mut mapped: Vec<(u64, u64)> = Vec::new();
    for e in &inode.extents {
        let end = e.file_block + e.count as u64;
        if end > FILE_BLOCKS_MAX {
            r.problem(format!("inode {ino}: extent {e:?} passes the largest file"));
        }
        if e.dev_block < geo.data_start || e.dev_block + e.count as u64 > geo.blocks {
            r.problem(format!(
                "inode {ino}: extent {e:?} lies outside the data area"
            ));
            continue;
        }
        if mapped.iter().any(|&(s, t)| e.file_block < t && s < end) {
            r.problem(format!(
                "inode {ino}: file blocks of extent {e:?} are mapped twice"
            ));
        }
        mapped.push((e.file_block, end));
        for k in 0..e.count as u64 {
            let holder = Holder::File {
                ino: ino as u32,
                fblock: e.file_block + k,
            };
            claim(e.dev_block + k, holder, o, r);
        }
    }
    for &b in chain {
        claim(b, Holder::Chain { ino: ino as u32 }, o, r);
    }
}

fn claim(block: u64, holder: Holder, o: &mut Owners, r: &mut FsckReport) {
    if let Some(other) = o.by_block.insert(block, holder) {
        r.problem(format!(
            "block {block} is owned twice: by {other} and by {holder}"
        ));
    }
}

fn check_directory(
    geo: &Geometry,
    read: &mut dyn FnMut(u64) -> Result<Vec<u8>, DeviceError>,
    in_use: &[bool],
    r: &mut FsckReport,
) -> HashMap<u32, u32> {
    let mut links: HashMap<u32, u32> = HashMap::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    for k in 0..geo.dir_blocks {
        let home = geo.dir_start + k;
        let slots = match read(home).map(|b| decode_dir_block(&b, home)) {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                r.problem(format!("directory: {e}"));
                continue;
            }
            Err(e) => {
                r.problem(format!("directory block {home}: cannot read: {e}"));
                continue;
            }
        };
        for (i, e) in slots.into_iter().enumerate() {
            let Some(e) = e else { continue };
            let slot = k as usize * DIR_SLOTS_PER_BLOCK + i;
            r.names += 1;
            if !in_use.get(e.ino as usize).copied().unwrap_or(false) {
                r.problem(format!(
                    "directory entry {:?} (slot {slot}) names inode {}, which is not in use",
                    e.name, e.ino
                ));
            }
            if let Some(first) = names.insert(e.name.clone(), slot) {
                r.problem(format!(
                    "name {:?} is in the directory twice (slots {first} and {slot})",
                    e.name
                ));
            }
            *links.entry(e.ino).or_default() += 1;
        }
    }
    links
}

fn check_bitmap(
    geo: &Geometry,
    read: &mut dyn FnMut(u64) -> Result<Vec<u8>, DeviceError>,
    owners: &BlockMap<Holder>,
    r: &mut FsckReport,
) {
    for k in 0..geo.bitmap_blocks {
        let home = geo.bitmap_start + k;
        let b = match read(home) {
            Ok(b) => b,
            Err(e) => {
                r.problem(format!("bitmap block {home}: cannot read: {e}"));
                continue;
            }
        };
        let bits = match decode_bitmap_block(&b, home) {
            Ok(bits) => bits,
            Err(e) => {
                r.problem(format!("bitmap: {e}"));
                continue;
            }
        };
        let first = k * BITS_PER_BITMAP_BLOCK;
        for blk in first..(first + BITS_PER_BITMAP_BLOCK).min(geo.blocks) {
            let i = (blk - first) as usize;
            let marked = bits[i / 8] & (1 << (i % 8)) != 0;
            let owned = blk < geo.data_start || owners.contains_key(&blk);
            if marked && !owned {
                r.problem(format!(
                    "block {blk} is marked used in the bitmap but nobody owns it"
                ));
            } else if !marked && owned {
                let who = owners
                    .get(&blk)
                    .map_or("the fixed metadata".to_string(), |h| h.to_string());
                r.problem(format!(
                    "block {blk} is owned by {who} but free in the bitmap"
                ));
            }
        }
    }
}
