//! The filesystem state every task steps on: configuration switches, inodes (size, extent
//! map, page cache, locks), the allocator, the device, IO ends waiting for completion, and
//! the violations detected as they happen.

use crate::alloc::{Allocator, Owner};
use crate::block::{self, BlockDevice, DeviceError, Request, BLOCK_SIZE};
use crate::extent::{Extent, ExtentMap, ExtentState, FILE_BLOCKS_MAX};
use crate::pagecache::{Folio, PageCache};
use crate::TaskId;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Largest file size in bytes.
pub const FILE_BYTES_MAX: u64 = FILE_BLOCKS_MAX * BLOCK_SIZE as u64;
/// Diagnostic notes kept per run.
pub const NOTES_MAX: usize = 32;
/// Device blocks reserved at the start (room for a superblock in the on-disk step).
pub const RESERVED_BLOCKS: u64 = 1;
/// Folios reclaim looks at from the cold end of the LRU per step: the kernel isolates a
/// batch of `SWAP_CLUSTER_MAX` (32) from the inactive list tail (`shrink_inactive_list`).
/// When all of them are dirty, locked or under writeback, reclaim waits for writeback
/// (the kernel rotates them back; the model does not), so its cost per step stays bounded
/// however large the page cache.
pub const RECLAIM_SCAN_FOLIOS: usize = 32;
/// Bytes of dropped folios' buffers kept for new folios of the same size. Reusing them spares
/// the allocator fresh, kernel-zeroed memory per folio, which was most of the cost of a
/// streaming read or write through the page cache.
pub const SPARE_FOLIO_BYTES_MAX: usize = 16 << 20;
/// How far past its limit the page cache may run before buffered reads and writes wait for
/// reclaim ([`Config::reclaim_throttle`]), as a multiple of the limit.
pub const CACHE_OVERSHOOT_RATIO: usize = 2;

/// How blocks are allocated to buffered writes and faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AllocMode {
    /// XFS-like: reserve DELALLOC at write/fault time, allocate at writeback as UNWRITTEN,
    /// convert to WRITTEN at IO completion.
    Delalloc,
    /// gfs2-like: allocate (and zero) WRITTEN blocks at write/fault time; no delalloc, no
    /// unwritten extents.
    AtWrite,
}

/// Where the write path checks the iomap's validity cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValidityCheckAt {
    /// `->iomap_valid` in `iomap_write_begin`, after the folio is locked (the kernel today).
    AfterFolioLock,
    /// Inside `->get_folio`, which returns the folio locked (Andreas Gruenbacher's proposal).
    InGetFolio,
    /// Before the folio lock is taken: a deliberately racy placement, to show why the lock
    /// must come first.
    BeforeFolioLock,
}

/// Short-write delalloc punch in `iomap_end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PunchMode {
    /// Truncate the page cache over the range, then punch the delalloc: drops dirty mmap data.
    Old,
    /// Scan the range under the invalidate lock and keep delalloc under dirty folios.
    Fixed,
}

/// Where a direct write's completion drops the page cache over its range
/// (`iomap_dio_complete`, v6.6), relative to the filesystem's `->end_io`, which converts the
/// unwritten extents it wrote (`xfs_dio_write_end_io`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DioInvalidate {
    /// After `->end_io` (`kiocb_invalidate_post_direct_write`), as v6.6 does: "otherwise a
    /// racing buffer read would cache zeros from unwritten extents".
    #[default]
    AfterEndIo,
    /// Before `->end_io`: the order that comment warns against (a switch, to show the race).
    BeforeEndIo,
}

impl DioInvalidate {
    pub fn is_default(&self) -> bool {
        *self == DioInvalidate::AfterEndIo
    }
}

/// Every behaviour switch of the model. `Default` is the fixed kernel behaviour.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// The write path's cookie check (`iomap_valid`).
    pub iomap_valid: bool,
    /// Where that check runs.
    pub validity_check_at: ValidityCheckAt,
    /// Writeback's `map_blocks` compares its cached mapping's `seq` before reusing it.
    pub wb_seq_check: bool,
    /// Folios one writeback lookup (`filemap_get_folios_tag`) takes at most: the kernel's
    /// `PAGEVEC_SIZE` ([`crate::writeback::PAGEVEC_SIZE_FOLIOS`]). Smaller values let short
    /// files and scripts reach a pass longer than one batch; 0 is read as 1. Bundles written
    /// before the field existed load with the kernel's value.
    #[serde(default = "default_wb_batch_folios")]
    pub wb_batch_folios: usize,
    pub punch: PunchMode,
    pub alloc: AllocMode,
    /// `page_mkwrite` takes the inode lock shared, like gfs2's inode glock, which serialises
    /// faults against buffered writes.
    pub mkwrite_takes_inode_lock: bool,
    /// gfs2's locking and allocation behaviours (`--fs gfs2`; all off by default). Not
    /// written when all off, so bundles stay as they were.
    #[serde(default, skip_serializing_if = "Gfs2::is_off")]
    pub gfs2: Gfs2,
    /// Page-cache size in folios above which reclaim runs.
    pub cache_limit_folios: usize,
    /// Blocks per folio: 1 (4 KiB folios, one block each) or a power of two up to
    /// [`crate::pagecache::FOLIO_BLOCKS_MAX`] (large folios, as XFS has in its write path
    /// since about v6.6, with per-block uptodate and dirty bits). Not written when 1, so
    /// bundles stay as they were.
    #[serde(default = "one_block", skip_serializing_if = "is_one_block")]
    pub folio_blocks: u64,
    /// The largest folio, in blocks, that a buffered write or read creates
    /// (`mapping_max_folio_order`): a power of two from [`Config::folio_blocks`] to
    /// [`crate::pagecache::FOLIO_BLOCKS_MAX`]. Since Linux 6.6 a buffered write asks for a folio
    /// as large as the bytes it has left (`fgf_set_order`; see [`Fs::grab_folio`]). 0: every
    /// folio has `folio_blocks` blocks (the model's original behaviour, which campaigns and
    /// bundles keep). Not written when 0.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub max_folio_blocks: u64,
    /// Device size in blocks.
    pub device_blocks: u64,
    /// Planted bugs of the persistent filesystem (all off by default).
    #[serde(default)]
    pub bugs: Bugs,
    /// Scheduler steps between the journal timer's commits
    /// ([`crate::ondisk::COMMIT_INTERVAL_STEPS`] by default; an NBD export, whose steps come
    /// far faster than a workload's, commits less often). Not written when it is the default,
    /// so bundles stay as they were.
    #[serde(
        default = "default_commit_interval_steps",
        skip_serializing_if = "is_default_commit_interval"
    )]
    pub commit_interval_steps: u64,
    /// Where a direct write's completion invalidates the page cache. Not written when it is
    /// the default, so bundles stay as they were.
    #[serde(default, skip_serializing_if = "DioInvalidate::is_default")]
    pub dio_invalidate: DioInvalidate,
    /// Campaign workloads race direct writes too (`--direct-writes`). The model runs a direct
    /// write whatever this says; only generators read it. Not written when off, so bundles
    /// stay as they were.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub direct_writes: bool,
    /// `balance_dirty_pages`: a buffered write waits before its next folio while the folios
    /// dirty or under writeback number at least this many (and writeback can make
    /// progress). 0: no limit (the model's original behaviour; bundles and campaigns keep
    /// it). Not written when 0, so bundles stay as they were.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dirty_limit_folios: usize,
    /// IO completion finishes a whole ioend at a time, as the kernel does (one device
    /// completion, one unwritten conversion of the run, then the end of writeback of its
    /// folios: `iomap_finish_ioend`, `xfs_end_ioend`); off: one block at a time (the model's
    /// original granularity, which campaigns and bundles keep). Not written when off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub complete_per_ioend: bool,
    /// A buffered read or write waits before its next folio while the page cache holds more
    /// than [`CACHE_OVERSHOOT_RATIO`] times [`Config::cache_limit_folios`] and reclaim has a
    /// folio to take (the kernel's allocations reclaim directly under memory pressure, so
    /// the cache never runs far past its size; the model lets the reclaim task do it). Off:
    /// nothing waits for reclaim (the model's original behaviour, which campaigns and
    /// bundles keep; 1 MiB reads at queue depth 8 then ran an export's cache to four times
    /// its size). Not written when off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reclaim_throttle: bool,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

fn one_block() -> u64 {
    1
}

fn is_one_block(n: &u64) -> bool {
    *n == 1
}

impl Config {
    /// Refuses a configuration the model cannot run, with the reason.
    pub fn validate(&self) -> Result<(), FsError> {
        let max = crate::pagecache::FOLIO_BLOCKS_MAX;
        if !self.folio_blocks.is_power_of_two() || self.folio_blocks > max {
            return Err(FsError::Invalid(format!(
                "folio_blocks {} is not a power of two from 1 to {max}",
                self.folio_blocks
            )));
        }
        let largest = self.max_folio_blocks;
        if largest != 0
            && (!largest.is_power_of_two() || largest < self.folio_blocks || largest > max)
        {
            return Err(FsError::Invalid(format!(
                "max_folio_blocks {largest} is not a power of two from folio_blocks ({}) to {max}",
                self.folio_blocks
            )));
        }
        Ok(())
    }

    /// The largest folio a buffered write or read creates, in blocks.
    pub fn largest_folio_blocks(&self) -> u64 {
        if self.max_folio_blocks == 0 {
            self.folio_blocks
        } else {
            self.max_folio_blocks
        }
    }
}

fn default_commit_interval_steps() -> u64 {
    crate::ondisk::COMMIT_INTERVAL_STEPS
}

fn is_default_commit_interval(steps: &u64) -> bool {
    *steps == crate::ondisk::COMMIT_INTERVAL_STEPS
}

/// What gfs2 does beyond allocating at write time (fs/gfs2/file.c, bmap.c, aops.c, v6.6),
/// each part a switch so that a campaign can relax one lock at a time and see which one
/// protects what. [`Gfs2::ALL`] is the preset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gfs2 {
    /// `gfs2_file_buffered_write` holds the inode glock exclusive around the whole iomap
    /// write, inside `i_rwsem`.
    pub write_glock: bool,
    /// `gfs2_fault` takes the glock shared around the read fault (`filemap_fault`).
    pub fault_glock: bool,
    /// `gfs2_page_mkwrite` takes the glock exclusive, then allocates the folio's blocks
    /// (`gfs2_allocate_page_backing`) and dirties it.
    pub mkwrite_glock: bool,
    /// Newly allocated data blocks are not zeroed on disk (the write path zeroes the parts of
    /// the folio it does not cover, because the mapping is NEW; the block keeps its old bytes
    /// until writeback writes the folio).
    pub no_block_zeroing: bool,
    /// `gfs2_iomap_end` after a short write: truncate the page cache over the NEW blocks the
    /// write did not reach, then punch (deallocate) them.
    pub short_write_punch: bool,
    /// `gfs2_file_buffered_write` runs the iomap write with page faults disabled: a user
    /// page that is not resident ends the iomap write short; if it made progress, gfs2 drops
    /// the glock (keeping `i_rwsem`), faults the pages in, retakes the glock and writes the
    /// rest. Without it, the write returns short, as it does when the buffer is unmapped.
    #[serde(default)]
    pub fault_retry: bool,
}

impl Gfs2 {
    /// Every behaviour on: gfs2 as built.
    pub const ALL: Gfs2 = Gfs2 {
        write_glock: true,
        fault_glock: true,
        mkwrite_glock: true,
        no_block_zeroing: true,
        short_write_punch: true,
        fault_retry: true,
    };

    pub fn is_off(&self) -> bool {
        *self == Gfs2::default()
    }
}

/// Bugs the persistent filesystem can be told to have, so that crash campaigns show they find
/// each one. None of them changes the in-memory model's behaviour.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bugs {
    /// UNWRITTEN -> WRITTEN happens when the data write is submitted, not when it completed:
    /// a commit in between makes the block WRITTEN on disk before its data is.
    pub convert_before_data: bool,
    /// The commit block is not ordered after the transaction's blocks (no flush before it).
    pub commit_without_flush: bool,
    /// fsync and sync return without committing the journal (they only flush the device).
    pub fsync_no_log_force: bool,
    /// The on-disk size grows when a write extends the file, before its data is written.
    pub size_before_data: bool,
    /// Recovery replays a transaction whose checksums do not hold.
    pub replay_ignores_checksum: bool,
}

impl Bugs {
    /// Every bug by its command-line name.
    pub const NAMES: [&'static str; 5] = [
        "convert-before-data",
        "commit-without-flush",
        "fsync-no-log-force",
        "size-before-data",
        "replay-ignores-checksum",
    ];

    /// Switches on the bug called `name`; false if there is none by that name.
    pub fn set(&mut self, name: &str) -> bool {
        let flag = match name {
            "convert-before-data" => &mut self.convert_before_data,
            "commit-without-flush" => &mut self.commit_without_flush,
            "fsync-no-log-force" => &mut self.fsync_no_log_force,
            "size-before-data" => &mut self.size_before_data,
            "replay-ignores-checksum" => &mut self.replay_ignores_checksum,
            _ => return false,
        };
        *flag = true;
        true
    }

    /// The names of the bugs switched on.
    pub fn names(&self) -> Vec<&'static str> {
        let on = [
            self.convert_before_data,
            self.commit_without_flush,
            self.fsync_no_log_force,
            self.size_before_data,
            self.replay_ignores_checksum,
        ];
        Self::NAMES
            .iter()
            .zip(on)
            .filter(|(_, on)| *on)
            .map(|(n, _)| *n)
            .collect()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            iomap_valid: true,
            validity_check_at: ValidityCheckAt::AfterFolioLock,
            wb_seq_check: true,
            wb_batch_folios: crate::writeback::PAGEVEC_SIZE_FOLIOS,
            punch: PunchMode::Fixed,
            alloc: AllocMode::Delalloc,
            mkwrite_takes_inode_lock: false,
            gfs2: Gfs2::default(),
            cache_limit_folios: 4,
            folio_blocks: 1,
            max_folio_blocks: 0,
            device_blocks: 4096,
            bugs: Bugs::default(),
            commit_interval_steps: crate::ondisk::COMMIT_INTERVAL_STEPS,
            dio_invalidate: DioInvalidate::AfterEndIo,
            direct_writes: false,
            dirty_limit_folios: 0,
            complete_per_ioend: false,
            reclaim_throttle: false,
        }
    }
}

fn default_wb_batch_folios() -> usize {
    crate::writeback::PAGEVEC_SIZE_FOLIOS
}

/// Errors an operation returns to its caller (the model's errno).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FsError {
    #[error("no space left on device")]
    NoSpace,
    #[error("file would exceed {FILE_BYTES_MAX} bytes")]
    FileTooBig,
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("no such file {0}")]
    NoSuchFile(usize),
    #[error("store beyond end of file (SIGBUS)")]
    SigBus,
    #[error("bad address (EFAULT): the user buffer could not be faulted in")]
    Fault,
    #[error("operation not supported (EOPNOTSUPP): {0}")]
    Unsupported(&'static str),
    #[error("device: {0}")]
    Device(String),
    /// A direct write whose page cache could not be invalidated first (`-ENOTBLK` from
    /// `iomap_dio_rw`: XFS falls back to a buffered write; the model returns it).
    #[error("page cache over a direct write could not be invalidated (ENOTBLK)")]
    NotBlock,
}

impl From<DeviceError> for FsError {
    fn from(e: DeviceError) -> Self {
        FsError::Device(e.to_string())
    }
}

/// A reader/writer semaphore held across steps (i_rwsem, invalidate_lock).
#[derive(Clone, Debug, Default)]
pub struct RwSem {
    writer: Option<TaskId>,
    readers: u32,
}

impl RwSem {
    pub fn can_read(&self) -> bool {
        self.writer.is_none()
    }
    pub fn can_write(&self) -> bool {
        self.writer.is_none() && self.readers == 0
    }
    pub fn down_read(&mut self) {
        assert!(self.can_read());
        self.readers += 1;
    }
    pub fn up_read(&mut self) {
        assert!(self.readers > 0);
        self.readers -= 1;
    }
    pub fn down_write(&mut self, me: TaskId) {
        assert!(self.can_write());
        self.writer = Some(me);
    }
    pub fn up_write(&mut self, me: TaskId) {
        assert_eq!(self.writer, Some(me));
        self.writer = None;
    }
}

/// One file.
#[derive(Clone, Debug, Default)]
pub struct Inode {
    /// The size reads and writes see (i_size).
    pub size: u64,
    /// The size the inode record on disk holds (di_size). It follows the data: IO completion
    /// moves it up to what was written (XFS's `xfs_setfilesize`), and truncate, fallocate and
    /// zero range set it; a buffered write alone never moves it.
    pub disk_size: u64,
    /// Names linking to the inode.
    pub nlink: u32,
    /// Bumped each time the inode is created again: tells incarnations apart.
    pub generation: u64,
    pub in_use: bool,
    /// Logical times: the filesystem's operation clock at the last data / inode change.
    pub mtime: u64,
    pub ctime: u64,
    /// Bumped whenever a field the inode record holds changes, but for the extents (whose
    /// own `seq` counts), so a commit knows which inodes to write.
    pub meta_gen: u64,
    /// Workload operations running on the inode (its open references): an inode whose last
    /// name goes is destroyed only once none is.
    pub users: u32,
    pub extents: ExtentMap,
    pub cache: PageCache,
    /// Taken exclusive by writes, fallocate, punch, zero range, truncate; shared by reads.
    pub i_rwsem: RwSem,
    /// Taken exclusive by punch/zero range/truncate/fallocate and the fixed delalloc punch;
    /// shared by page faults (XFS's MMAPLOCK).
    pub invalidate_lock: RwSem,
    /// gfs2's inode glock as one node sees it ([`Gfs2`]): exclusive for a buffered write and
    /// `page_mkwrite`, shared for a read fault. Unused unless a [`Gfs2`] switch is on.
    pub glock: RwSem,
}

impl Inode {
    /// Whether a workload operation can reach the inode: in use and named.
    pub fn reachable(&self) -> bool {
        self.in_use && self.nlink > 0
    }

    /// A fresh, empty inode in use, of generation `generation`, with one link.
    pub fn created(generation: u64) -> Self {
        Inode {
            nlink: 1,
            generation,
            in_use: true,
            ..Inode::default()
        }
    }
}

/// Writeback IO waiting for completion: one block, or with [`Config::complete_per_ioend`] a
/// run of blocks contiguous in the file and on the device (one ioend).
#[derive(Clone, Debug)]
pub struct IoEnd {
    /// The device writes of its blocks, in block order.
    pub reqs: Vec<block::ReqId>,
    pub ino: usize,
    /// The first file block and device block of the run; `count` blocks, contiguous in
    /// both (1 unless [`Config::complete_per_ioend`]).
    pub fblock: u64,
    pub addr: u64,
    pub count: u64,
    /// The mapping was UNWRITTEN: completion converts it to WRITTEN.
    pub unwritten: bool,
    /// Byte end of the file's data this IO carries (EOF when it was written back, within
    /// its last block): the on-disk size may reach it at completion, no further.
    pub end: u64,
    /// Completion stages done so far (0 = submitted).
    pub stage: u8,
}

/// An invariant broken at the moment it happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Violation {
    /// Writeback wrote file block `fblock` of `ino` to device block `addr`, which it does not own.
    WriteToForeignBlock {
        ino: usize,
        fblock: u64,
        addr: u64,
        freed: bool,
        owner: Option<(usize, u64)>,
    },
    /// Writeback cleaned a dirty block holding data over a HOLE without writing it: its data
    /// is gone.
    DirtyFolioOverHole { ino: usize, fblock: u64 },
    /// The device failed a writeback write: the data did not reach it.
    WritebackIoError {
        ino: usize,
        fblock: u64,
        error: String,
    },
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::WriteToForeignBlock {
                ino,
                fblock,
                addr,
                freed,
                owner,
            } => {
                write!(
                    f,
                    "writeback wrote file {ino} block {fblock} to device block {addr}, which is "
                )?;
                match owner {
                    Some((o, b)) => write!(f, "owned by file {o} block {b}"),
                    None if *freed => write!(f, "free (it was freed)"),
                    None => write!(f, "not allocated"),
                }
            }
            Violation::WritebackIoError { ino, fblock, error } => {
                write!(
                    f,
                    "the device failed the writeback of file {ino} block {fblock}: {error}"
                )
            }
            Violation::DirtyFolioOverHole { ino, fblock } => {
                write!(
                    f,
                    "writeback found dirty folio {fblock} of file {ino} over a HOLE and skipped it"
                )
            }
        }
    }
}

/// The whole model.
pub struct Fs {
    pub cfg: Config,
    pub dev: Box<dyn BlockDevice>,
    pub alloc: Allocator,
    pub inodes: Vec<Inode>,
    /// The root directory's slots (name -> inode); empty for a filesystem that lives only in
    /// memory, where files are known by number.
    pub dir: Vec<Option<crate::ondisk::format::DirEntry>>,
    /// The on-disk side (journal, geometry, committed images) when the filesystem persists.
    pub persist: Option<crate::ondisk::Persist>,
    /// Operation clock for the logical times.
    pub clock: u64,
    /// The root directory's lock (i_rwsem of the directory), taken by namespace operations.
    pub dir_lock: RwSem,
    pub ioends: VecDeque<IoEnd>,
    pub violations: Vec<Violation>,
    /// What went wrong, told as it happened (a stale mapping used, a dirty folio dropped):
    /// diagnostics for reports only, never read by the model.
    pub notes: Vec<String>,
    lru_clock: u64,
    /// Cached folios counted in folios of [`Config::folio_blocks`] (a larger folio counts as
    /// the ones it spans, as the kernel counts pages): what [`Config::cache_limit_folios`]
    /// bounds.
    folio_count: usize,
    /// Every cached folio by its last use (`Folio::lru`): reclaim takes the first
    /// reclaimable one without scanning the whole cache.
    lru_index: std::collections::BTreeMap<u64, (usize, u64)>,
    /// The dirty folios (added by [`Fs::dirtied`] wherever a folio is dirtied, removed by
    /// [`Fs::cleaned`] and [`Fs::remove_folio`]), so the flusher finds work without scanning
    /// the whole cache. The oracle's `check_quiescent` checks that no dirty folio is missing.
    dirty_hint: std::collections::BTreeSet<(usize, u64)>,
    /// The folios of `dirty_hint` counted as `folio_count` counts them.
    dirty_units: usize,
    /// The dirty folios not under writeback: what the flusher can start on (kept beside the
    /// hint so that finding work does not walk past folios that are still being written).
    dirty_idle: std::collections::BTreeSet<(usize, u64)>,
    /// Folios under writeback (what `balance_dirty_pages` counts beside the dirty ones),
    /// counted as `folio_count` counts them.
    writeback_units: usize,
    /// Writeback's block writes submitted and not yet completed
    /// ([`crate::writeback::WB_BLOCKS_IN_FLIGHT_MAX`] bounds them).
    wb_blocks_in_flight: usize,
    /// Buffers of dropped folios, for new folios of the same size
    /// ([`SPARE_FOLIO_BYTES_MAX`]), by the log2 of their blocks. Their bytes are what the
    /// dropped folio held: a new folio's blocks are not uptodate, and every block is filled
    /// (read, zeroed or written whole) before it is, as the kernel's page cache does not
    /// zero the pages it allocates either.
    spare_buffers: Vec<Vec<Vec<u8>>>,
    /// Bytes in `spare_buffers`.
    spare_bytes: usize,
}

impl Fs {
    /// A filesystem with `files` empty files on `dev`, living in memory only.
    pub fn new(cfg: Config, dev: Box<dyn BlockDevice>, files: usize) -> Self {
        let blocks = dev.block_count();
        Fs {
            cfg,
            dev,
            alloc: Allocator::new(RESERVED_BLOCKS, blocks),
            inodes: (0..files).map(|_| Inode::created(1)).collect(),
            dir: Vec::new(),
            persist: None,
            clock: 0,
            dir_lock: RwSem::default(),
            ioends: VecDeque::new(),
            violations: Vec::new(),
            notes: Vec::new(),
            lru_clock: 0,
            folio_count: 0,
            lru_index: Default::default(),
            dirty_hint: Default::default(),
            dirty_units: 0,
            dirty_idle: Default::default(),
            writeback_units: 0,
            wb_blocks_in_flight: 0,
            spare_buffers: Vec::new(),
            spare_bytes: 0,
        }
    }

    pub fn inode(&self, ino: usize) -> &Inode {
        &self.inodes[ino]
    }

    pub fn inode_mut(&mut self, ino: usize) -> &mut Inode {
        &mut self.inodes[ino]
    }

    pub fn folio_count(&self) -> usize {
        self.folio_count
    }

    /// Blocks of the smallest folio ([`Config::folio_blocks`]): a folio's index is its first
    /// block divided by this.
    pub fn folio_blocks(&self) -> u64 {
        self.cfg.folio_blocks
    }

    /// Bytes of the smallest folio.
    pub fn folio_bytes(&self) -> u64 {
        self.cfg.folio_blocks * BLOCK_SIZE as u64
    }

    /// The folio holding file block `fblock` of `ino`: the cached folio over it, or the index
    /// a folio of [`Config::folio_blocks`] would have there.
    pub fn folio_of(&self, ino: usize, fblock: u64) -> u64 {
        let (fb, unit) = (self.cfg.folio_blocks, fblock / self.cfg.folio_blocks);
        if self.cfg.largest_folio_blocks() == fb {
            return unit;
        }
        self.inodes[ino].cache.covering(unit, fb).unwrap_or(unit)
    }

    /// Blocks of folio `idx` of `ino`: the cached folio's, or the smallest folio's.
    pub fn folio_len(&self, ino: usize, idx: u64) -> u64 {
        let (fb, cache) = (self.cfg.folio_blocks, &self.inodes[ino].cache);
        // Every folio of the smallest size (always, when that is the largest too): no lookup.
        if self.cfg.largest_folio_blocks() == fb || cache.all_smallest(fb) {
            return fb;
        }
        cache.get(idx).map_or(fb, Folio::blocks)
    }

    /// First file block of folio `idx`.
    pub fn folio_start(&self, idx: u64) -> u64 {
        idx * self.cfg.folio_blocks
    }

    /// The file block after folio `idx` of `ino` (where the next folio starts).
    pub fn folio_end(&self, ino: usize, idx: u64) -> u64 {
        self.folio_start(idx) + self.folio_len(ino, idx)
    }

    /// Folios of the smallest size that folio `idx` of `ino` counts as.
    fn folio_units(&self, ino: usize, idx: u64) -> usize {
        (self.folio_len(ino, idx) / self.cfg.folio_blocks) as usize
    }

    /// The cached folios of `ino` over file blocks `[from, to)`, in index order (the first may
    /// start before `from`).
    pub fn cached_folios_over(&self, ino: usize, from: u64, to: u64) -> Vec<u64> {
        let fb = self.cfg.folio_blocks;
        let (first, end, cache) = (from / fb, to.div_ceil(fb), &self.inodes[ino].cache);
        let head = cache.covering(first, fb).filter(|&i| i < first);
        let rest = cache.folios.range(first, end).map(|(i, _)| i);
        head.into_iter().chain(rest).collect()
    }

    /// Whether `me` may lock the folio holding file block `fblock` of `ino` now (or it is not
    /// cached). Which folio that is is looked up only when some folio is locked.
    pub fn folio_lockable_at(&self, ino: usize, fblock: u64, me: TaskId) -> bool {
        let cache = &self.inodes[ino].cache;
        cache.none_locked() || cache.lockable(self.folio_of(ino, fblock), me)
    }

    /// Look a folio up, creating an empty (not uptodate) one of the smallest size if absent,
    /// and mark it used.
    pub fn get_folio(&mut self, ino: usize, idx: u64) -> &mut Folio {
        self.get_folio_sized(ino, idx, self.cfg.folio_blocks)
    }

    /// `__filemap_get_folio` with `FGP_CREAT` and `fgf_set_order(len)` (Linux 6.6), for a
    /// buffered write or read that has `len` bytes left from file block `fblock`: the cached
    /// folio holding `fblock`, or a new one starting there of the largest power of two of
    /// blocks in `len` bytes (`ilog2(len) - PAGE_SHIFT`), no larger than
    /// [`Config::largest_folio_blocks`] nor than the page cache's limit, cut to the alignment
    /// of its first block, and smaller again while a cached folio is in its way
    /// (`filemap_add_folio` refusing it). The smallest size is [`Config::folio_blocks`]
    /// (`mapping_min_folio_order`). Returns the folio's index. Not modelled: 6.6 turning an
    /// order-1 folio into order 0.
    pub fn grab_folio(&mut self, ino: usize, fblock: u64, len: u64) -> u64 {
        let idx = self.folio_of(ino, fblock);
        let blocks = match self.inodes[ino].cache.get(idx) {
            Some(f) => f.blocks(),
            None => self.new_folio_blocks(ino, idx, len),
        };
        self.get_folio_sized(ino, idx, blocks);
        idx
    }

    /// The size of a new folio at index `idx` (not cached) for `len` bytes: see
    /// [`Fs::grab_folio`].
    fn new_folio_blocks(&self, ino: usize, idx: u64, len: u64) -> u64 {
        let fb = self.cfg.folio_blocks;
        let cache_blocks = (self.cfg.cache_limit_folios as u64)
            .saturating_mul(fb)
            .max(fb);
        let largest = self
            .cfg
            .largest_folio_blocks()
            .min(1 << cache_blocks.ilog2());
        let mut n = (1u64 << (len / BLOCK_SIZE as u64).max(1).ilog2()).clamp(fb, largest.max(fb));
        let (first, cache) = (idx * fb, &self.inodes[ino].cache);
        while n > fb
            && (!first.is_multiple_of(n)
                || cache.folios.range(idx + 1, idx + n / fb).next().is_some())
        {
            n /= 2;
        }
        n
    }

    /// [`Fs::get_folio`] creating a folio of `blocks` blocks if absent. The folio used last is
    /// left where it is: using it again changes nothing in the LRU order (a read or a write
    /// looks its folio up several times a step; moving it in the LRU index each time was a
    /// tenth of the engine thread under 1 MiB reads).
    fn get_folio_sized(&mut self, ino: usize, idx: u64, blocks: u64) -> &mut Folio {
        let (last, fb) = (self.lru_clock, self.cfg.folio_blocks);
        let Fs {
            inodes,
            lru_clock,
            lru_index,
            folio_count,
            spare_buffers,
            spare_bytes,
            ..
        } = self;
        let clock = last + 1;
        let cache = &mut inodes[ino].cache;
        let f = if cache.folios.contains_key(idx) {
            let f = cache.folios.get_mut(idx).expect("cached");
            if f.lru == last {
                return f;
            }
            f
        } else {
            *folio_count += (blocks / fb) as usize;
            let kept = spare_buffers
                .get_mut(blocks.ilog2() as usize)
                .and_then(Vec::pop);
            cache.insert(
                idx,
                match kept {
                    Some(data) => {
                        *spare_bytes -= data.len();
                        Folio::with_data(clock, clock, data)
                    }
                    None => Folio::new(clock, clock, blocks),
                },
            )
        };
        *lru_clock = clock;
        lru_index.remove(&f.lru);
        lru_index.insert(clock, (ino, idx));
        f.lru = clock;
        f
    }

    /// Folio `idx` of `ino` was just marked dirty: the flusher will find it.
    pub fn dirtied(&mut self, ino: usize, idx: u64) {
        if self.dirty_hint.insert((ino, idx)) {
            self.dirty_units += self.folio_units(ino, idx);
        }
        if self.inodes[ino]
            .cache
            .get(idx)
            .is_some_and(|f| !f.writeback)
        {
            self.dirty_idle.insert((ino, idx));
        }
    }

    /// Folio `idx` of `ino` goes under writeback with `pending` blocks in flight, or (0)
    /// comes out of it.
    pub fn set_writeback(&mut self, ino: usize, idx: u64, pending: u32) {
        let units = self.folio_units(ino, idx);
        if let Some(f) = self.inodes[ino].cache.get_mut(idx) {
            let was = f.writeback;
            f.wb_pending = pending;
            f.writeback = pending > 0;
            match (was, f.writeback) {
                (false, true) => self.writeback_units += units,
                (true, false) => self.writeback_units = self.writeback_units.saturating_sub(units),
                _ => {}
            }
        }
    }

    /// Writeback's block writes in flight (submitted, not completed).
    pub fn wb_blocks_in_flight(&self) -> usize {
        self.wb_blocks_in_flight
    }

    /// Writeback submitted `n` block writes.
    pub fn wb_blocks_submitted(&mut self, n: usize) {
        self.wb_blocks_in_flight += n;
    }

    /// IO completion completed `n` of writeback's block writes.
    pub fn wb_blocks_completed(&mut self, n: usize) {
        self.wb_blocks_in_flight = self.wb_blocks_in_flight.saturating_sub(n);
    }

    /// Folios dirty or under writeback, counted in folios of the smallest size: what
    /// [`Config::dirty_limit_folios`] bounds.
    pub fn dirty_or_writeback_folios(&self) -> usize {
        self.dirty_units + self.writeback_units
    }

    /// Whether a buffered write must wait before its next folio (`balance_dirty_pages`):
    /// the folios dirty or under writeback reach [`Config::dirty_limit_folios`], and
    /// writeback or IO completion can run (so waiting cannot deadlock).
    pub fn over_dirty_limit(&self) -> bool {
        let limit = self.cfg.dirty_limit_folios;
        limit > 0
            && self.dirty_or_writeback_folios() >= limit
            && (!self.ioends.is_empty() || self.has_writeback_work())
    }

    /// Whether a buffered read or write must wait before its next folio for reclaim
    /// ([`Config::reclaim_throttle`]): the cache holds more than [`CACHE_OVERSHOOT_RATIO`]
    /// times its limit and reclaim can take a folio now (so waiting cannot deadlock).
    pub fn over_cache_limit(&self) -> bool {
        self.cfg.reclaim_throttle
            && self.folio_count
                > self
                    .cfg
                    .cache_limit_folios
                    .saturating_mul(CACHE_OVERSHOOT_RATIO)
            && self.reclaim_victim().is_some()
    }

    /// Folio `idx` of `ino` is no longer under writeback: the flusher may start on it again
    /// if it was dirtied meanwhile.
    pub fn writeback_ended(&mut self, ino: usize, idx: u64) {
        if self.inodes[ino].cache.get(idx).is_some_and(|f| f.dirty) {
            self.dirty_idle.insert((ino, idx));
        }
    }

    /// Dirty folios the flusher's hint does not know of (none, unless a place that dirties
    /// a folio forgot [`Fs::dirtied`]).
    pub fn dirty_hint_misses(&self) -> Vec<(usize, u64)> {
        let mut out = Vec::new();
        for (ino, inode) in self.inodes.iter().enumerate() {
            for (idx, f) in inode.cache.folios.iter() {
                let idle = f.writeback || self.dirty_idle.contains(&(ino, idx));
                if f.dirty && (!idle || !self.dirty_hint.contains(&(ino, idx))) {
                    out.push((ino, idx));
                }
            }
        }
        out
    }

    /// Drop a folio from the cache (truncate, punch, reclaim). It must be unlocked by others
    /// and not under writeback.
    pub fn remove_folio(&mut self, ino: usize, idx: u64) {
        let units = self.folio_units(ino, idx);
        if let Some(f) = self.inodes[ino].cache.remove(idx) {
            assert!(!f.writeback, "removing folio {idx} under writeback");
            self.lru_index.remove(&f.lru);
            if let Some(data) = f.data.into_vec() {
                self.keep_spare_buffer(data);
            }
            self.folio_count -= units;
            if self.dirty_hint.remove(&(ino, idx)) {
                self.dirty_units -= units;
            }
            self.dirty_idle.remove(&(ino, idx));
        }
    }

    /// Keeps a dropped folio's buffer (a power of two of blocks) for a new folio of its size,
    /// within [`SPARE_FOLIO_BYTES_MAX`]: when full, smaller buffers make room for it, and it is
    /// dropped when there are none. A pool left full of 4 KiB buffers by random IO sent every
    /// 256 KiB folio of a following streaming write to the allocator for fresh memory, zeroed
    /// page by page (a fifth of the engine thread); a small buffer's fresh allocation costs
    /// little (the allocator reuses the small blocks just freed), and letting small buffers
    /// push large ones out made 4 KiB random reads after a 1 MiB fill 15% slower (the engine
    /// thread switched out far more often; measured, not explained).
    fn keep_spare_buffer(&mut self, data: Vec<u8>) {
        let order = (data.len() / BLOCK_SIZE).ilog2() as usize;
        if self.spare_buffers.len() <= order {
            self.spare_buffers.resize_with(order + 1, Vec::new);
        }
        while self.spare_bytes + data.len() > SPARE_FOLIO_BYTES_MAX {
            let other = (0..order).find_map(|o| self.spare_buffers[o].pop());
            let Some(dropped) = other else {
                return;
            };
            self.spare_bytes -= dropped.len();
        }
        self.spare_bytes += data.len();
        self.spare_buffers[order].push(data);
    }

    /// `read_folio` (`iomap_readpage_iter`): fill the blocks of a folio that are not
    /// uptodate from a fresh mapping taken while it is locked (zeros for holes, unwritten and
    /// delalloc blocks and blocks past EOF); blocks already uptodate keep their bytes.
    pub fn read_folio(&mut self, ino: usize, idx: u64) -> Result<(), FsError> {
        let (first, bs) = (self.folio_start(idx), BLOCK_SIZE as u64);
        self.get_folio(ino, idx);
        let Fs { dev, inodes, .. } = self;
        let inode = &mut inodes[ino];
        let (size, extents) = (inode.size, &inode.extents);
        let f = inode.cache.get_mut(idx).expect("just got");
        // The blocks a read must fill from `first + i`: written, below EOF, not uptodate.
        let from_disk = |f: &Folio, i: u64| {
            let e = extents.get(first + i);
            (e.state == ExtentState::Written && (first + i) * bs < size && !f.block_uptodate(i))
                .then_some(e.addr)
        };
        let mut i = 0;
        while i < f.blocks() {
            let at = i as usize * BLOCK_SIZE;
            let Some(addr) = from_disk(f, i) else {
                if !f.block_uptodate(i) {
                    f.data[at..at + BLOCK_SIZE].fill(0);
                }
                i += 1;
                continue;
            };
            // One read for the run of such blocks that follow each other on disk.
            let n = (1..f.blocks() - i)
                .take_while(|&k| from_disk(f, i + k) == Some(addr + k))
                .count() as u64
                + 1;
            dev.read_blocks_sync(addr, &mut f.data[at..at + n as usize * BLOCK_SIZE])?;
            i += n;
        }
        f.set_all_uptodate();
        Ok(())
    }

    /// `truncate_inode_partial_folio` (or the whole folio, when the range covers it): the
    /// bytes `[from, to)` of folio `idx` of `ino` leave the page cache. A folio wholly in
    /// the range is removed; otherwise that part is zeroed and its blocks wholly in the range
    /// are no longer dirty (what the range held is gone: the callers punch or truncate the
    /// blocks under it). Returns whether the folio was removed.
    pub fn truncate_folio_range(&mut self, ino: usize, idx: u64, from: u64, to: u64) -> bool {
        let bs = BLOCK_SIZE as u64;
        let (lo, hi) = (self.folio_start(idx) * bs, self.folio_end(ino, idx) * bs);
        let (from, to) = (from.max(lo), to.min(hi));
        let Some(f) = self.inodes[ino].cache.get_mut(idx) else {
            return false;
        };
        if from <= lo && to >= hi {
            self.remove_folio(ino, idx);
            return true;
        }
        if from < to {
            // The range's pages are unmapped: the next store to the folio faults.
            f.mapped_writable = false;
            f.data[(from - lo) as usize..(to - lo) as usize].fill(0);
            let (first, end) = ((from - lo).div_ceil(bs), (to - lo) / bs);
            if end > first && !f.clear_dirty_blocks(first, end - first) {
                self.cleaned(ino, idx);
            }
        }
        false
    }

    /// Allocate a block for (ino, fblock). In AtWrite mode the block is zeroed on the device
    /// first, as gfs2 does, so a read of a block allocated ahead of its data sees zeros.
    pub fn alloc_block(&mut self, ino: usize, fblock: u64, zero: bool) -> Result<u64, FsError> {
        let addr = self
            .alloc
            .alloc(Owner { ino, fblock })
            .ok_or(FsError::NoSpace)?;
        if zero {
            block::submit_and_complete(
                self.dev.as_mut(),
                Request::Write {
                    block: addr,
                    data: vec![0; BLOCK_SIZE].into(),
                    fua: false,
                },
            )?;
        }
        Ok(addr)
    }

    /// Moves the on-disk size of `ino` to `size` (see [`Inode::disk_size`]).
    pub fn set_disk_size(&mut self, ino: usize, size: u64) {
        let inode = &mut self.inodes[ino];
        if inode.disk_size != size {
            inode.disk_size = size;
            inode.meta_gen += 1;
        }
    }

    /// IO completion put file data up to byte `data_end` of `ino` on disk (`xfs_setfilesize`
    /// with the ioend's range, which ends at EOF as writeback saw it): the on-disk size may
    /// cover it now, up to the in-memory size (a truncate since may have made it smaller).
    /// Bytes a later write put past that EOF are in a later IO, not this one.
    pub fn data_landed(&mut self, ino: usize, data_end: u64) {
        let inode = &self.inodes[ino];
        if !inode.in_use {
            return;
        }
        let end = data_end.min(inode.size);
        if end > inode.disk_size {
            self.set_disk_size(ino, end);
        }
    }

    /// Advances the operation clock and stamps `ino`'s times (mtime too when `data`).
    pub fn touch(&mut self, ino: usize, data: bool) {
        self.clock += 1;
        let (clock, inode) = (self.clock, &mut self.inodes[ino]);
        inode.ctime = clock;
        if data {
            inode.mtime = clock;
        }
        inode.meta_gen += 1;
    }

    /// Turn blocks `[start, end)` into holes, freeing allocated ones.
    pub fn punch_blocks(&mut self, ino: usize, start: u64, end: u64) {
        for b in start..end.min(FILE_BLOCKS_MAX) {
            let e = self.inodes[ino].extents.get(b);
            if matches!(e.state, ExtentState::Unwritten | ExtentState::Written) {
                self.alloc.free(e.addr);
            }
            self.inodes[ino].extents.set(b, Extent::HOLE);
        }
    }

    /// The least recently used reclaimable folio among the [`RECLAIM_SCAN_FOLIOS`] least
    /// recently used, if the cache is over its limit.
    pub fn reclaim_victim(&self) -> Option<(usize, u64)> {
        if self.folio_count <= self.cfg.cache_limit_folios {
            return None;
        }
        // The least recently used first: the first reclaimable one is the victim.
        let mut lru = self.lru_index.values().copied().take(RECLAIM_SCAN_FOLIOS);
        lru.find(|&(ino, idx)| {
            self.inodes[ino]
                .cache
                .get(idx)
                .is_some_and(Folio::reclaimable)
        })
    }

    /// Any dirty folio that background writeback could start on now.
    pub fn has_writeback_work(&self) -> bool {
        self.first_writeback_inode().is_some()
    }

    /// The first inode with a dirty folio that writeback could start on.
    pub fn first_writeback_inode(&self) -> Option<usize> {
        self.dirty_idle
            .iter()
            .find(|&&(ino, idx)| {
                self.inodes[ino]
                    .cache
                    .get(idx)
                    .is_some_and(|f| f.dirty && !f.writeback)
            })
            .map(|&(ino, _)| ino)
    }

    /// The dirty folios of `ino` from index `start` on, in index order.
    pub fn dirty_indexes(&self, ino: usize, start: u64) -> impl Iterator<Item = u64> + '_ {
        self.dirty_hint
            .range((ino, start)..=(ino, u64::MAX))
            .map(|&(_, idx)| idx)
    }

    /// The dirty folios of `ino` not under writeback (as last told), from index `start` on,
    /// in index order.
    pub fn idle_indexes(&self, ino: usize, start: u64) -> impl Iterator<Item = u64> + '_ {
        self.dirty_idle
            .range((ino, start)..=(ino, u64::MAX))
            .map(|&(_, idx)| idx)
    }

    /// Folio `idx` of `ino` is clean now (it went to writeback).
    pub fn cleaned(&mut self, ino: usize, idx: u64) {
        if self.dirty_hint.remove(&(ino, idx)) {
            self.dirty_units -= self.folio_units(ino, idx);
        }
        self.dirty_idle.remove(&(ino, idx));
    }

    /// Record a diagnostic note (bounded by `NOTES_MAX`).
    pub fn note(&mut self, text: impl FnOnce() -> String) {
        if self.notes.len() < NOTES_MAX {
            self.notes.push(text());
        }
    }

    /// Drop every clean folio (echo 1 > drop_caches).
    pub fn drop_caches(&mut self) {
        for ino in 0..self.inodes.len() {
            let idxs: Vec<u64> = self.inodes[ino]
                .cache
                .folios
                .iter()
                .filter(|(_, f)| f.reclaimable())
                .map(|(i, _)| i)
                .collect();
            for i in idxs {
                self.remove_folio(ino, i);
            }
        }
    }

    /// What a read of the whole file returns with an empty page cache: the durable view.
    pub fn read_from_disk(&mut self, ino: usize) -> Result<Vec<u8>, FsError> {
        let size = self.inodes[ino].size;
        let mut out = Vec::with_capacity(size as usize);
        let mut b = 0;
        while (out.len() as u64) < size {
            let ext = self.inodes[ino].extents.get(b);
            let data = if ext.state == ExtentState::Written {
                block::read_block_sync(self.dev.as_mut(), ext.addr)?
            } else {
                vec![0; BLOCK_SIZE]
            };
            let take = (size - out.len() as u64).min(BLOCK_SIZE as u64) as usize;
            out.extend_from_slice(&data[..take]);
            b += 1;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::MemDevice;

    /// The spare buffers, full, make room for a larger buffer by letting go of smaller ones
    /// (an earlier workload's 4 KiB folios must not keep a streaming one's 256 KiB folios
    /// out); a buffer that finds only its own size or larger ones is dropped. The pool never
    /// holds more than its limit.
    #[test]
    fn spare_buffers_let_a_larger_buffer_push_smaller_ones_out() {
        let cfg = Config::default();
        let mut fs = Fs::new(cfg.clone(), Box::new(MemDevice::new(cfg.device_blocks)), 1);
        let small = SPARE_FOLIO_BYTES_MAX / BLOCK_SIZE;
        for _ in 0..small + 5 {
            fs.keep_spare_buffer(vec![1; BLOCK_SIZE]);
        }
        assert_eq!(fs.spare_buffers[0].len(), small);
        fs.keep_spare_buffer(vec![2; 64 * BLOCK_SIZE]);
        assert_eq!(fs.spare_buffers[6].len(), 1);
        assert_eq!(fs.spare_buffers[0].len(), small - 64);
        assert_eq!(fs.spare_bytes, SPARE_FOLIO_BYTES_MAX);
        for _ in 0..SPARE_FOLIO_BYTES_MAX / (64 * BLOCK_SIZE) + 3 {
            fs.keep_spare_buffer(vec![2; 64 * BLOCK_SIZE]);
        }
        assert!(fs.spare_buffers[0].is_empty());
        assert_eq!(fs.spare_bytes, SPARE_FOLIO_BYTES_MAX);
        fs.keep_spare_buffer(vec![1; BLOCK_SIZE]);
        assert!(
            fs.spare_buffers[0].is_empty(),
            "a small buffer does not push a large one out"
        );
        let total: usize = fs.spare_buffers.iter().flatten().map(Vec::len).sum();
        assert_eq!(total, fs.spare_bytes);
        // A new folio of that size takes one.
        fs.get_folio_sized(0, 0, 64);
        assert_eq!(fs.spare_bytes, SPARE_FOLIO_BYTES_MAX - 64 * BLOCK_SIZE);
    }

    /// Reclaim takes the least recently used folio, however often the last one used was
    /// looked up again (those lookups leave it where it is), and a folio made again at an
    /// index is the most recent.
    #[test]
    fn reclaim_takes_the_least_recently_used_folio() {
        let cfg = Config {
            cache_limit_folios: 2,
            ..Config::default()
        };
        let mut fs = Fs::new(cfg.clone(), Box::new(MemDevice::new(cfg.device_blocks)), 1);
        for idx in [1, 2, 2, 2, 3, 1, 1, 3, 2, 2] {
            fs.get_folio(0, idx);
        }
        assert_eq!(fs.reclaim_victim(), Some((0, 1)));
        fs.remove_folio(0, 1);
        assert_eq!(fs.reclaim_victim(), None, "two folios: within the limit");
        fs.get_folio(0, 4);
        assert_eq!(fs.reclaim_victim(), Some((0, 3)));
        fs.get_folio(0, 3);
        fs.get_folio(0, 3);
        assert_eq!(fs.reclaim_victim(), Some((0, 2)));
        fs.remove_folio(0, 2);
        fs.get_folio(0, 2);
        assert_eq!(fs.reclaim_victim(), Some((0, 4)));
    }
}
