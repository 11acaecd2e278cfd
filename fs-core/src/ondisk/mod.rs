//! fs-core on disk: the format, the journal, mkfs, mount (with recovery), commit and
//! unmount, and fsck.
//!
//! The model stays what it was; persisting is a view of it. A commit takes the metadata the
//! model changed since the last one (inode records with their extents, bitmap bits, directory
//! slots), encodes those blocks, and journals the ones whose content changed. What reaches
//! disk is only what the model says is on disk: DELALLOC is a hole there, an extent is
//! WRITTEN only once IO completion converted it (after its data write completed), and an
//! inode's size is its `disk_size`, which follows the data. The journal orders the data
//! before the commit with the flush it issues before every commit block.
//!
//! When commits happen: at fsync, fdatasync and sync (a log force), every
//! [`COMMIT_INTERVAL_STEPS`] steps of the scheduler (`Config::commit_interval_steps`) when
//! something changed (the journal
//! thread's timer), and whenever the running transaction grows near the largest one the
//! journal holds.

pub mod format;
pub mod fsck;
pub mod journal;

use std::collections::{BTreeSet, HashMap};

use crate::alloc::{Allocator, Owner, CHAIN_FBLOCK};
use crate::block::{self, BlockDevice, DeviceError, Request};
use crate::extent::{Extent, ExtentState};
use crate::fs::{Config, Fs, FsError, Inode};
use format::*;
use journal::{Journal, JournalBugs, Recovery};

/// Scheduler steps after which a running transaction with changes is committed anyway (the
/// journal thread's commit timer, counted in steps since the model has no clock).
pub const COMMIT_INTERVAL_STEPS: u64 = 64;
/// Blocks a running transaction may reach before it is committed early, below the largest
/// transaction the journal holds (a step changes far fewer than this many blocks).
pub const COMMIT_HEADROOM_BLOCKS: usize = 24;

/// The on-disk side of a mounted filesystem.
#[derive(Debug, Clone)]
pub struct Persist {
    pub geo: Geometry,
    pub journal: Journal,
    /// The last committed content of every metadata block, by home block: a commit journals
    /// only blocks whose content changed.
    committed: HashMap<u64, Vec<u8>>,
    /// Each inode's `(extents seq, meta_gen)` at its last commit.
    marks: Vec<(u64, u64)>,
    /// Each inode's extent-chain blocks.
    chains: Vec<Vec<u64>>,
    /// Each inode's on-disk extents as last computed, with the extent map's `seq` then.
    extents_at: Vec<Option<(u64, Vec<DiskExtent>)>>,
    /// Directory blocks changed since the last commit.
    dir_dirty: BTreeSet<u64>,
    /// Scheduler steps since the last commit.
    steps: u64,
    /// The running transaction frees an extent-chain block: its commit must checkpoint (see
    /// [`Fs::commit`]).
    chain_freed: bool,
    /// What recovery did at mount.
    pub recovery: Recovery,
}

/// Why a filesystem could not be made or mounted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MountError {
    #[error("superblock: {0}")]
    Super(FormatError),
    #[error("journal recovery: {0}")]
    Recovery(#[from] journal::RecoveryError),
    #[error("{0}")]
    Metadata(FormatError),
    #[error("inconsistent: {0}")]
    Inconsistent(String),
    #[error("device: {0}")]
    Device(#[from] DeviceError),
    #[error("{0}")]
    Mkfs(String),
}

fn read(dev: &mut dyn BlockDevice, b: u64) -> Result<Vec<u8>, DeviceError> {
    block::read_block_sync(dev, b)
}

fn write(dev: &mut dyn BlockDevice, b: u64, data: Vec<u8>) -> Result<(), DeviceError> {
    block::submit_and_complete(
        dev,
        Request::Write {
            block: b,
            data: data.into(),
            fua: false,
        },
    )
}

/// The on-disk extents of an in-memory extent map: its UNWRITTEN and WRITTEN runs (DELALLOC
/// and holes have nothing on disk).
pub fn disk_extents(inode: &Inode) -> Vec<DiskExtent> {
    let span = inode.extents.span();
    let mut out = Vec::new();
    let mut b = 0;
    while b < span {
        let run = inode.extents.run_at(b, span - b);
        let state = match run.state {
            ExtentState::Unwritten => Some(DiskExtentState::Unwritten),
            ExtentState::Written => Some(DiskExtentState::Written),
            ExtentState::Hole | ExtentState::Delalloc => None,
        };
        if let Some(state) = state {
            out.push(DiskExtent {
                file_block: b,
                count: run.len as u32,
                state,
                dev_block: run.addr,
            });
        }
        b += run.len;
    }
    out
}

/// The record of inode `ino` as the disk holds it, its extents taken from `cached` when they
/// were computed at the extent map's current `seq` (a write over WRITTEN blocks changes the
/// inode's times, not its extents: the commit need not walk the whole map again).
fn disk_inode(ino: usize, inode: &Inode, cached: &mut Option<(u64, Vec<DiskExtent>)>) -> DiskInode {
    let seq = inode.extents.seq();
    let extents = if !inode.in_use {
        Vec::new()
    } else {
        match cached {
            Some((at, e)) if *at == seq => e.clone(),
            _ => {
                let e = disk_extents(inode);
                *cached = Some((seq, e.clone()));
                e
            }
        }
    };
    DiskInode {
        ino: ino as u32,
        in_use: inode.in_use,
        generation: inode.generation,
        size: inode.disk_size,
        nlink: inode.nlink,
        mtime: inode.mtime,
        ctime: inode.ctime,
        extents,
    }
}

/// Makes a filesystem on `dev` with `inodes` inodes, the first ones in use and named `names`
/// in the root directory: superblock, journal superblock, bitmap, inode table and directory,
/// written home and flushed.
pub fn mkfs(
    dev: &mut dyn BlockDevice,
    inodes: u64,
    names: &[String],
) -> Result<Geometry, MountError> {
    let geo = Geometry::for_device(dev.block_count(), inodes).map_err(MountError::Mkfs)?;
    if names.len() as u64 > inodes {
        return Err(MountError::Mkfs(format!(
            "{} names for {inodes} inodes",
            names.len()
        )));
    }
    if let Some(dup) = names
        .iter()
        .enumerate()
        .find(|(i, n)| names[..*i].contains(n))
    {
        return Err(MountError::Mkfs(format!(
            "the name {:?} is given twice",
            dup.1
        )));
    }
    // The whole journal is zeroed: sequence numbers start at 1 again, and on a device that
    // held an fs-core filesystem before, the old journal's transactions 1, 2, ... would
    // otherwise pass recovery's checks and be replayed over the new filesystem.
    let mut blocks = vec![(0, geo.encode())];
    for b in geo.journal_start + 1..geo.journal_start + geo.journal_blocks {
        blocks.push((b, vec![0; crate::block::BLOCK_SIZE]));
    }
    blocks.push((geo.journal_start, journal::encode_journal_super(&geo, 1, 1)));
    for k in 0..geo.bitmap_blocks {
        blocks.push(bitmap_block(&geo, k, &|b| b < geo.data_start));
    }
    let mut slots: Vec<Option<DirEntry>> =
        vec![None; (geo.dir_blocks as usize) * DIR_SLOTS_PER_BLOCK];
    for ino in 0..inodes {
        let name = names.get(ino as usize);
        let inode = DiskInode {
            ino: ino as u32,
            in_use: name.is_some(),
            generation: u64::from(name.is_some()),
            nlink: u32::from(name.is_some()),
            ..DiskInode::default()
        };
        if let Some(n) = name {
            check_name(n).map_err(MountError::Mkfs)?;
            slots[ino as usize] = Some(DirEntry {
                name: n.clone(),
                ino: ino as u32,
            });
        }
        blocks.extend(inode.encode(geo.inode_block(ino), &[]));
    }
    for k in 0..geo.dir_blocks {
        blocks.push(dir_block(&geo, k, &slots));
    }
    for (b, data) in blocks {
        write(dev, b, data)?;
    }
    block::submit_and_complete(dev, Request::Flush)?;
    Ok(geo)
}

fn bitmap_block(geo: &Geometry, k: u64, used: &dyn Fn(u64) -> bool) -> (u64, Vec<u8>) {
    let first = k * BITS_PER_BITMAP_BLOCK;
    let last = (first + BITS_PER_BITMAP_BLOCK).min(geo.blocks);
    let mut bits = vec![0u8; (BITS_PER_BITMAP_BLOCK / 8) as usize];
    for b in first..last {
        if used(b) {
            let i = (b - first) as usize;
            bits[i / 8] |= 1 << (i % 8);
        }
    }
    let home = geo.bitmap_start + k;
    (home, encode_bitmap_block(home, &bits))
}

fn dir_block(geo: &Geometry, k: u64, slots: &[Option<DirEntry>]) -> (u64, Vec<u8>) {
    let from = k as usize * DIR_SLOTS_PER_BLOCK;
    let to = (from + DIR_SLOTS_PER_BLOCK).min(slots.len());
    let home = geo.dir_start + k;
    (home, encode_dir_block(home, &slots[from.min(to)..to]))
}

/// What mount found on disk, decoded.
struct Loaded {
    inodes: Vec<(DiskInode, Vec<u64>)>,
    slots: Vec<Option<DirEntry>>,
    bitmap: Vec<bool>,
    images: HashMap<u64, Vec<u8>>,
}

fn load(geo: &Geometry, dev: &mut dyn BlockDevice) -> Result<Loaded, MountError> {
    let mut images = HashMap::new();
    let mut bitmap = vec![false; geo.blocks as usize];
    for k in 0..geo.bitmap_blocks {
        let home = geo.bitmap_start + k;
        let b = read(dev, home)?;
        let bits = decode_bitmap_block(&b, home).map_err(MountError::Metadata)?;
        let first = k * BITS_PER_BITMAP_BLOCK;
        for blk in first..(first + BITS_PER_BITMAP_BLOCK).min(geo.blocks) {
            let i = (blk - first) as usize;
            bitmap[blk as usize] = bits[i / 8] & (1 << (i % 8)) != 0;
        }
        images.insert(home, b);
    }
    let mut inodes = Vec::with_capacity(geo.inodes as usize);
    for ino in 0..geo.inodes {
        let home = geo.inode_block(ino);
        let b = read(dev, home)?;
        let mut rd = |blk: u64| {
            if blk < geo.data_start || blk >= geo.blocks {
                return Err(FormatError::Invalid {
                    block: home,
                    what: format!("extent chain points at block {blk}, outside the data area"),
                });
            }
            read(dev, blk).map_err(|e| FormatError::Invalid {
                block: blk,
                what: e.to_string(),
            })
        };
        let (inode, chain) = DiskInode::decode(&b, home, &mut rd).map_err(MountError::Metadata)?;
        if inode.ino as u64 != ino {
            return Err(MountError::Inconsistent(format!(
                "inode block {home} holds inode {} instead of {ino}",
                inode.ino
            )));
        }
        images.insert(home, b);
        inodes.push((inode, chain));
    }
    let mut slots = Vec::new();
    for k in 0..geo.dir_blocks {
        let home = geo.dir_start + k;
        let b = read(dev, home)?;
        slots.extend(decode_dir_block(&b, home).map_err(MountError::Metadata)?);
        images.insert(home, b);
    }
    for e in slots.iter().flatten() {
        let live = inodes.get(e.ino as usize).is_some_and(|(i, _)| i.in_use);
        if !live {
            return Err(MountError::Inconsistent(format!(
                "directory entry {:?} names inode {}, which is not in use",
                e.name, e.ino
            )));
        }
    }
    Ok(Loaded {
        inodes,
        slots,
        bitmap,
        images,
    })
}

/// The in-memory inode of an on-disk one, and the blocks it owns. Checks what the model
/// relies on (extents inside the data area and the largest file, not overlapping).
fn inode_of(
    geo: &Geometry,
    d: &DiskInode,
    chain: &[u64],
) -> Result<(Inode, Vec<(u64, Owner)>), MountError> {
    let ino = d.ino as usize;
    if d.size > crate::fs::FILE_BYTES_MAX {
        return Err(MountError::Inconsistent(format!(
            "inode {ino}: size {} is larger than a file can be ({})",
            d.size,
            crate::fs::FILE_BYTES_MAX
        )));
    }
    let mut inode = Inode {
        size: d.size,
        disk_size: d.size,
        nlink: d.nlink,
        generation: d.generation,
        in_use: d.in_use,
        mtime: d.mtime,
        ctime: d.ctime,
        ..Inode::default()
    };
    let mut owned = Vec::new();
    for e in &d.extents {
        let end = e.file_block + e.count as u64;
        let bad = end > crate::extent::FILE_BLOCKS_MAX
            || e.dev_block < geo.data_start
            || e.dev_block + e.count as u64 > geo.blocks;
        if bad {
            return Err(MountError::Inconsistent(format!(
                "inode {ino}: extent {e:?} lies outside the file or the data area"
            )));
        }
        for i in 0..e.count as u64 {
            let fblock = e.file_block + i;
            if inode.extents.get(fblock).state != ExtentState::Hole {
                return Err(MountError::Inconsistent(format!(
                    "inode {ino}: file block {fblock} is mapped twice"
                )));
            }
            let state = match e.state {
                DiskExtentState::Unwritten => ExtentState::Unwritten,
                DiskExtentState::Written => ExtentState::Written,
            };
            let addr = e.dev_block + i;
            inode.extents.set(fblock, Extent { state, addr });
            owned.push((addr, Owner { ino, fblock }));
        }
    }
    for (k, &b) in chain.iter().enumerate() {
        owned.push((
            b,
            Owner {
                ino,
                fblock: CHAIN_FBLOCK + k as u64,
            },
        ));
    }
    Ok((inode, owned))
}

/// What a mount did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MountReport {
    pub geometry: Geometry,
    pub recovery: Recovery,
}

/// Mounts the filesystem on `dev`: recovers the journal (replaying committed transactions to
/// their homes through `dev`, so wrap a device that must not change in a
/// [`crate::block::CowDevice`]), starts the journal afresh, and loads the metadata.
pub fn mount(cfg: Config, mut dev: Box<dyn BlockDevice>) -> Result<Fs, MountError> {
    let sb = read(dev.as_mut(), 0)?;
    let geo = Geometry::decode(&sb).map_err(MountError::Super)?;
    if geo.blocks != dev.block_count() {
        return Err(MountError::Inconsistent(format!(
            "the superblock says {} blocks, the device has {}",
            geo.blocks,
            dev.block_count()
        )));
    }
    let bugs = JournalBugs {
        commit_without_flush: cfg.bugs.commit_without_flush,
        replay_ignores_checksum: cfg.bugs.replay_ignores_checksum,
    };
    let recovery = {
        let d = std::cell::RefCell::new(&mut dev);
        journal::recover(
            &geo,
            bugs,
            &mut |b| read(d.borrow_mut().as_mut(), b),
            &mut |b, data| write(d.borrow_mut().as_mut(), b, data),
        )?
    };
    // The replayed blocks are home: make them durable, then start the journal over.
    block::submit_and_complete(dev.as_mut(), Request::Flush)?;
    let jsb = journal::encode_journal_super(&geo, recovery.next_seq, 1);
    block::submit_and_complete(
        dev.as_mut(),
        Request::Write {
            block: geo.journal_start,
            data: jsb.into(),
            fua: true,
        },
    )?;
    let loaded = load(&geo, dev.as_mut())?;
    build(cfg, dev, geo, loaded, recovery, bugs)
}

fn build(
    cfg: Config,
    dev: Box<dyn BlockDevice>,
    geo: Geometry,
    loaded: Loaded,
    recovery: Recovery,
    bugs: JournalBugs,
) -> Result<Fs, MountError> {
    let mut inodes = Vec::with_capacity(loaded.inodes.len());
    let mut owned = Vec::new();
    let mut chains = Vec::new();
    for (d, chain) in &loaded.inodes {
        let (inode, own) = inode_of(&geo, d, chain)?;
        inodes.push(inode);
        owned.extend(own);
        chains.push(chain.clone());
    }
    let mut seen = vec![false; geo.blocks as usize];
    for &(b, o) in &owned {
        if std::mem::replace(&mut seen[b as usize], true) {
            return Err(MountError::Inconsistent(format!(
                "block {b} is owned twice (again by inode {})",
                o.ino
            )));
        }
    }
    let alloc = Allocator::mounted(geo.data_start, geo.blocks, &owned);
    let marks = inodes
        .iter()
        .map(|i| (i.extents.seq(), i.meta_gen))
        .collect();
    let _ = loaded.bitmap;
    let clock = inodes
        .iter()
        .map(|i| i.mtime.max(i.ctime))
        .max()
        .unwrap_or(0);
    let mut fs = Fs::new(cfg, dev, 0);
    fs.inodes = inodes;
    fs.alloc = alloc;
    fs.dir = loaded.slots;
    fs.clock = clock;
    fs.persist = Some(Persist {
        geo,
        journal: Journal::new(geo, 1, recovery.next_seq, bugs),
        committed: loaded.images,
        marks,
        extents_at: vec![None; chains.len()],
        chains,
        dir_dirty: BTreeSet::new(),
        steps: 0,
        chain_freed: false,
        recovery,
    });
    free_orphans(&mut fs);
    Ok(fs)
}

/// Frees the orphans (inodes in use with no link: unlinked before a crash, not yet freed),
/// as XFS's recovery of its unlinked list does. In memory: the next commit writes it, and
/// their blocks are reusable once it has.
fn free_orphans(fs: &mut Fs) {
    for ino in 0..fs.inodes.len() {
        let i = fs.inode(ino);
        if !i.in_use || i.nlink > 0 {
            continue;
        }
        let span = i.extents.span();
        fs.punch_blocks(ino, 0, span);
        let chain = std::mem::take(&mut fs.persist.as_mut().expect("mounted").chains[ino]);
        for b in chain {
            fs.alloc.free(b);
        }
        let inode = fs.inode_mut(ino);
        inode.in_use = false;
        inode.size = 0;
        inode.disk_size = 0;
        inode.meta_gen += 1;
    }
}

impl Fs {
    /// Whether the filesystem persists (was made or mounted on disk).
    pub fn persistent(&self) -> bool {
        self.persist.is_some()
    }

    /// The directory slot holding `name`.
    pub fn lookup(&self, name: &str) -> Option<usize> {
        self.dir
            .iter()
            .position(|s| s.as_ref().is_some_and(|e| e.name == name))
    }

    /// Marks directory slot `slot` changed.
    pub fn dir_changed(&mut self, slot: usize) {
        if let Some(p) = self.persist.as_mut() {
            p.dir_dirty.insert((slot / DIR_SLOTS_PER_BLOCK) as u64);
        }
    }

    /// Inodes whose record changed since the last commit.
    fn dirty_inodes(&self) -> impl Iterator<Item = usize> + '_ {
        let p = self.persist.as_ref();
        (0..self.inodes.len()).filter(move |&i| {
            p.is_some_and(|p| p.marks[i] != (self.inodes[i].extents.seq(), self.inodes[i].meta_gen))
        })
    }

    /// About how many blocks the running transaction would journal now.
    pub fn dirty_estimate(&self) -> usize {
        let Some(p) = &self.persist else { return 0 };
        self.dirty_inodes().count()
            + p.dir_dirty.len()
            + usize::from(!self.alloc.pending_frees().is_empty())
            + 2
    }

    /// The most [`Fs::dirty_estimate`] could be now, without its scan of the inodes: every
    /// inode dirty, and the frees pending.
    fn dirty_estimate_max(&self) -> usize {
        let Some(p) = &self.persist else { return 0 };
        self.inodes.len() + p.dir_dirty.len() + 1 + 2
    }

    /// The images of the running transaction: every changed inode (with its extent chain,
    /// whose blocks are allocated or freed here), bitmap and directory block whose content
    /// differs from its last committed image.
    fn transaction(&mut self) -> Result<Vec<(u64, Vec<u8>)>, FsError> {
        let mut images = Vec::new();
        for ino in self.dirty_inodes().collect::<Vec<_>>() {
            let p = self.persist.as_mut().expect("persistent");
            let d = disk_inode(ino, &self.inodes[ino], &mut p.extents_at[ino]);
            let chain = self.resize_chain(ino, DiskInode::chain_blocks(d.extents.len()))?;
            let home = self
                .persist
                .as_ref()
                .expect("persistent")
                .geo
                .inode_block(ino as u64);
            images.extend(d.encode(home, &chain));
            let p = self.persist.as_mut().expect("persistent");
            p.marks[ino] = (self.inodes[ino].extents.seq(), self.inodes[ino].meta_gen);
        }
        // Frees of this transaction are durable with it: their bits go out clear.
        self.alloc.release_pending();
        let changed = self.alloc.take_changed();
        let p = self.persist.as_mut().expect("persistent");
        let geo = p.geo;
        let bitmap_blocks: BTreeSet<u64> = changed
            .iter()
            .map(|&b| geo.bitmap_bit(b).0 - geo.bitmap_start)
            .collect();
        for k in bitmap_blocks {
            let alloc = &self.alloc;
            images.push(bitmap_block(&geo, k, &|b| {
                b < geo.data_start || alloc.used(b)
            }));
        }
        for k in std::mem::take(&mut p.dir_dirty) {
            images.push(dir_block(&geo, k, &self.dir));
        }
        images.retain(|(home, image)| p.committed.get(home) != Some(image));
        Ok(images)
    }

    /// Gives inode `ino` an extent chain of `n` blocks, allocating or freeing blocks.
    fn resize_chain(&mut self, ino: usize, n: usize) -> Result<Vec<u64>, FsError> {
        let mut chain = std::mem::take(&mut self.persist.as_mut().expect("persistent").chains[ino]);
        while chain.len() > n {
            let b = chain.pop().expect("longer than n");
            self.alloc.free(b);
            let p = self.persist.as_mut().expect("persistent");
            p.chain_freed = true;
            // Its home may hold file data next: the last committed image says nothing.
            p.committed.remove(&b);
        }
        while chain.len() < n {
            let owner = Owner {
                ino,
                fblock: CHAIN_FBLOCK + chain.len() as u64,
            };
            let b = self.alloc.alloc(owner).ok_or(FsError::NoSpace)?;
            chain.push(b);
        }
        self.persist.as_mut().expect("persistent").chains[ino] = chain.clone();
        Ok(chain)
    }

    /// Commits the running transaction, if it changed anything; returns the blocks it
    /// journaled. A filesystem that lives in memory has nothing to commit.
    ///
    /// A transaction that frees an extent-chain block is checkpointed at once, before the
    /// block can be handed out again: once it is file data, neither a checkpoint nor a replay
    /// may write the chain block's old image over it, and after the checkpoint the journal
    /// holds none (jbd2 keeps revoke records for this; this journal has no room for them).
    /// The orphans mount frees need none: mount starts the journal afresh.
    pub fn commit(&mut self) -> Result<usize, FsError> {
        if self.persist.is_none() {
            return Ok(0);
        }
        let images = self.transaction()?;
        let p = self.persist.as_mut().expect("persistent");
        p.steps = 0;
        let n = images.len();
        let max = p.journal.transaction_blocks_max();
        for part in images.chunks(max) {
            p.journal.commit(self.dev.as_mut(), part.to_vec())?;
        }
        if std::mem::take(&mut p.chain_freed) {
            p.journal.checkpoint(self.dev.as_mut())?;
        }
        p.committed.extend(images);
        Ok(n)
    }

    /// fsync's and sync's end: commit the journal (which flushes the device before its
    /// commit block), or, with nothing to commit, flush the device. (With the planted bug
    /// `fsync-no-log-force`, only the flush.)
    pub fn log_force(&mut self) -> Result<(), FsError> {
        let committed = if self.cfg.bugs.fsync_no_log_force {
            0
        } else {
            self.commit()?
        };
        if committed == 0 {
            block::submit_and_complete(self.dev.as_mut(), Request::Flush)?;
        }
        Ok(())
    }

    /// After every scheduler step: the journal's timer, and an early commit when the running
    /// transaction nears the largest the journal holds. A failed commit is returned for the
    /// caller to report.
    pub fn after_step(&mut self) -> Result<(), FsError> {
        let Some(p) = self.persist.as_mut() else {
            return Ok(());
        };
        p.steps += 1;
        let (steps, max) = (p.steps, p.journal.transaction_blocks_max());
        // The estimate counts the dirty inodes, a scan of them all. Between commits it only
        // matters if it could reach the headroom: with every inode dirty it could not, the
        // scan is skipped (it was 3% of the engine's time under 4 KiB random writes).
        let interval = self.cfg.commit_interval_steps;
        if steps < interval && self.dirty_estimate_max() + COMMIT_HEADROOM_BLOCKS < max {
            return Ok(());
        }
        let estimate = self.dirty_estimate();
        let due = steps >= interval && estimate > 2;
        if due || estimate + COMMIT_HEADROOM_BLOCKS >= max {
            self.commit()?;
        }
        Ok(())
    }

    /// Unmounts: commits, checkpoints the journal (every metadata block home, the journal
    /// empty) and hands the device back. The caller syncs the files' data first.
    pub fn unmount(mut self) -> Result<Box<dyn BlockDevice>, FsError> {
        if self.persist.is_some() {
            self.commit()?;
            let p = self.persist.as_mut().expect("persistent");
            p.journal.checkpoint(self.dev.as_mut())?;
        }
        Ok(self.dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{MemDevice, BLOCK_SIZE};

    /// Gives file block `fblock` of `ino` a fresh block in state `state`.
    fn map(fs: &mut Fs, ino: usize, fblock: u64, state: ExtentState) -> u64 {
        let addr = fs.alloc_block(ino, fblock, false).unwrap();
        fs.inode_mut(ino)
            .extents
            .set(fblock, Extent { state, addr });
        addr
    }

    fn geo(fs: &Fs) -> Geometry {
        fs.persist.as_ref().unwrap().geo
    }

    /// The byte file 1's data block holds.
    const DATA: u8 = 0xab;

    /// File 0 gets one more extent than its inode block holds (a chain of one block, X),
    /// commits, loses an extent (X is freed) and commits; then X becomes file 1's block 1,
    /// whose data (`DATA`) is written and whose extent commits. Returns the filesystem, X and
    /// file 0's first block.
    fn chain_block_becomes_data() -> (Fs, u64, u64) {
        let mut dev = MemDevice::new(2048);
        let names = ["f0".to_string(), "f1".to_string()];
        mkfs(&mut dev, 4, &names).unwrap();
        let mut fs = mount(Config::default(), Box::new(dev)).unwrap();
        let data_start = geo(&fs).data_start;
        let n = INODE_EXTENTS_MAX as u64 + 1;
        for i in 0..n {
            assert_eq!(
                map(&mut fs, 0, 2 * i, ExtentState::Unwritten),
                data_start + i
            );
        }
        fs.commit().unwrap();
        let x = data_start + n;
        assert_eq!(fs.persist.as_ref().unwrap().chains[0], vec![x]);
        fs.punch_blocks(0, 0, 1);
        fs.commit().unwrap();
        assert!(fs.persist.as_ref().unwrap().chains[0].is_empty());
        assert_eq!(map(&mut fs, 1, 0, ExtentState::Written), data_start);
        assert_eq!(map(&mut fs, 1, 1, ExtentState::Written), x);
        // Writeback wrote the data and its IO completed; the next commit makes it reachable.
        for (b, byte) in [(data_start, 0), (x, DATA)] {
            let data = vec![byte; BLOCK_SIZE];
            let req = Request::Write {
                block: b,
                data: data.into(),
                fua: false,
            };
            block::submit_and_complete(fs.dev.as_mut(), req).unwrap();
        }
        fs.set_disk_size(1, 2 * BLOCK_SIZE as u64);
        fs.commit().unwrap();
        (fs, x, data_start)
    }

    /// A step that leaves the running transaction near the largest the journal holds
    /// commits it at once, long before the commit interval (the scan of the dirty inodes that
    /// decides it is skipped only when no number of dirty inodes could get there).
    #[test]
    fn a_transaction_near_the_journal_limit_commits_before_the_interval() {
        let mut dev = MemDevice::new(2048);
        let names: Vec<String> = (0..200).map(|i| format!("f{i}")).collect();
        mkfs(&mut dev, 200, &names).unwrap();
        let mut fs = mount(Config::default(), Box::new(dev)).unwrap();
        let max = fs
            .persist
            .as_ref()
            .unwrap()
            .journal
            .transaction_blocks_max();
        // The estimate is the dirty inodes and 2: one inode short of the headroom.
        let dirty = max - COMMIT_HEADROOM_BLOCKS - 3;
        assert!(
            dirty < fs.inodes.len(),
            "the journal holds every inode's image"
        );
        for ino in 0..dirty {
            fs.set_disk_size(ino, BLOCK_SIZE as u64);
        }
        // Short of the headroom: no commit yet.
        fs.after_step().unwrap();
        assert!(fs.dirty_estimate() >= dirty, "committed early");
        fs.set_disk_size(dirty, BLOCK_SIZE as u64);
        fs.after_step().unwrap();
        assert!(fs.persist.as_ref().unwrap().steps < COMMIT_INTERVAL_STEPS);
        assert_eq!(fs.dirty_estimate(), 2, "the transaction did not commit");
    }

    /// Guards against the journal writing an extent-chain block's old image over the file
    /// data its block holds now (what jbd2's revoke records prevent): neither the checkpoint
    /// at unmount nor recovery after a crash may put the stale image back.
    #[test]
    fn a_freed_chain_block_image_never_lands_on_data() {
        let (fs, x, _) = chain_block_becomes_data();
        let mut dev = fs.unmount().unwrap();
        let at_x = block::read_block_sync(dev.as_mut(), x).unwrap();
        let stale = |b: &[u8]| format!("stale image at {x}: {:02x?}", &b[..8]);
        assert!(
            at_x == vec![DATA; BLOCK_SIZE],
            "checkpoint: {}",
            stale(&at_x)
        );

        let (mut fs, x, _) = chain_block_becomes_data();
        // A power cut now (this device has no cache: everything written is durable).
        let dev = std::mem::replace(&mut fs.dev, Box::new(MemDevice::new(1)));
        let mut fs = mount(Config::default(), dev).unwrap();
        let at_x = block::read_block_sync(fs.dev.as_mut(), x).unwrap();
        assert!(at_x == vec![DATA; BLOCK_SIZE], "recovery: {}", stale(&at_x));
    }

    /// Guards against a commit that skips an extent-chain block because the same content was
    /// committed at that block before: in between the block held file data, so the disk no
    /// longer holds the old image. Skipping is only sound for blocks at fixed homes.
    #[test]
    fn a_reused_chain_block_is_journaled_again() {
        let (mut fs, x, first) = chain_block_becomes_data();
        fs.punch_blocks(1, 0, 2);
        fs.commit().unwrap();
        // File 0's extents as they were: the same chain block X, with the same content.
        assert_eq!(map(&mut fs, 0, 0, ExtentState::Unwritten), first);
        fs.commit().unwrap();
        assert_eq!(fs.persist.as_ref().unwrap().chains[0], vec![x]);
        let mut dev = fs.unmount().unwrap();
        let report = fsck::check(&mut |b| block::read_block_sync(dev.as_mut(), b));
        let first: Vec<_> = report.problems.iter().take(3).collect();
        assert!(report.clean(), "{first:?}");
        let fs = mount(Config::default(), dev).unwrap();
        assert_eq!(disk_extents(fs.inode(0)).len(), INODE_EXTENTS_MAX + 1);
    }
}
