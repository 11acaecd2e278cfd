//! The step protocol between the tasks and the scheduler: what a task's step may touch
//! ([`Cx`]), what it hands back ([`Step`]) and where it stopped ([`YieldPoint`]).
//!
//! The task modules (`buffered_io`, `writeback`, `ops`, `ns`) and the scheduler (`sched`) both
//! depend on this module and not on each other's internals: the scheduler owns the tasks, and
//! a task knows nothing of the scheduler but this protocol.

use crate::fs::{Fs, FsError};
use crate::oracle::Oracle;
use crate::TaskId;
use serde::{Deserialize, Serialize};

/// What a step hands back: a yield (where, and an argument for the trace) or the end of the
/// task with its result.
#[derive(Debug)]
pub enum Step {
    Yield(YieldPoint, u64),
    Done(YieldPoint, u64, Result<u64, FsError>),
}

/// What a step may touch.
pub struct Cx<'a> {
    pub fs: &'a mut Fs,
    pub oracle: &'a mut Oracle,
    pub me: TaskId,
    /// Index of the workload operation this task runs (for the oracle's attribution).
    pub op: u32,
    /// Injected short copy for this step, if it is a user copy.
    pub short_copy: Option<u32>,
}

/// Declares [`YieldPoint`] from one table, so that a variant's label (what traces show and
/// what bundles and scripts store on disk) is written once: serde's name and
/// [`YieldPoint::label`] both come from it.
macro_rules! yield_points {
    ($($(#[$doc:meta])* $variant:ident = $label:literal,)*) => {
        /// Where a step of a task stopped: a yield point, or the end of the task (the step
        /// that returns `Step::Done`). Traces, reproducer bundles and scripted schedules name
        /// steps by these; each is stored as its label (serde reads and writes the label, and
        /// an unknown label fails to parse).
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize,
        )]
        pub enum YieldPoint {
            $($(#[$doc])* #[serde(rename = $label)] $variant,)*
        }

        impl YieldPoint {
            /// Every yield point, in declaration order.
            pub const ALL: &'static [YieldPoint] = &[$(YieldPoint::$variant,)*];

            /// The label traces show and files store.
            pub const fn label(self) -> &'static str {
                match self {
                    $(YieldPoint::$variant => $label,)*
                }
            }
        }
    };
}

yield_points! {
    // Buffered write (`buffered_io::WriteTask`).
    /// The write is past the largest file (ends the task).
    WriteEfbig = "write:efbig",
    /// A write of no bytes (ends the task).
    WriteEmpty = "write:empty",
    /// The inode lock is taken.
    WriteLockInode = "write:lock_inode",
    /// After `iomap_begin`: the mapping is cached.
    IomapBegin = "iomap_begin",
    /// `iomap_begin` failed (ends the task).
    IomapBeginError = "iomap_begin:error",
    /// After the cookie check made before the folio lock (the racy placement).
    IomapValidBeforeLock = "iomap_valid(before lock)",
    /// Folio lookup and lock.
    GetFolio = "get_folio",
    /// After the cookie check made with the folio locked.
    IomapValid = "iomap_valid",
    /// Reading the uncovered part of the folio failed: `iomap_end` next, then the write
    /// returns what it wrote (or the error).
    WriteBeginReadError = "write_begin:read_error",
    /// The folio is ready for the user copy (a short copy can be injected next).
    WriteBegin = "write_begin",
    /// The user copy came up short.
    CopyShort = "copy:short",
    /// The user copy and `write_end` of one folio (between folios).
    CopyWriteEnd = "copy+write_end",
    /// Between `iomap_end` and the next `iomap_begin`.
    IomapEnd = "iomap_end",
    /// Old short-write punch: one folio of the page cache truncated.
    PunchTruncatePagecache = "punch:truncate_pagecache",
    /// Fixed short-write punch: one folio of the scan.
    PunchScan = "punch:scan",
    /// Fixed short-write punch: the scan's last folio.
    PunchScanDone = "punch:scan_done",
    /// The write returned (ends the task).
    WriteDone = "write:done",
    /// gfs2: a short write dropped the inode glock to fault the user buffer in.
    Gfs2GlockDrop = "gfs2:glock_drop",
    /// gfs2: the glock is retaken; the write goes on.
    Gfs2GlockRetake = "gfs2:glock_retake",

    // Direct write (`direct_io::DioWriteTask`).
    /// `i_rwsem` taken shared.
    DioLock = "dio:lock",
    /// The write starts past EOF: refused, not modelled (ends the task).
    DioPastEof = "dio:past_eof",
    /// The range's writeback pass ended (`filemap_write_and_wait_range`, its write part).
    DioFlush = "dio:flush",
    /// The flush failed (ends the task).
    DioFlushError = "dio:flush_error",
    /// The range's writeback completed (its wait part).
    DioFlushWait = "dio:flush_wait",
    /// The page cache over the range dropped (`invalidate_inode_pages2_range`).
    DioInvalidate = "dio:invalidate",
    /// A folio over the range is dirty again: `-ENOTBLK` (ends the task).
    DioInvalidateBusy = "dio:invalidate_busy",
    /// `iomap_begin`: holes and delalloc allocated unwritten; the mapping is the task's.
    DioIomapBegin = "dio:iomap_begin",
    /// Allocation failed (ends the task).
    DioIomapBeginError = "dio:iomap_begin_error",
    /// The data is on the device (the bios completed).
    DioSubmit = "dio:submit",
    /// The device refused a write (ends the task).
    DioSubmitError = "dio:submit_error",
    /// `->end_io`: unwritten blocks converted, the size moved.
    DioEndIo = "dio:end_io",
    /// The page cache over the range dropped again, then the write returns (ends the task).
    DioDone = "dio:done",
    /// `DioInvalidate::BeforeEndIo`: the page cache dropped before `->end_io`.
    DioPostInvalidate = "dio:post_invalidate",
    /// ... and `->end_io` after it, then the write returns (ends the task).
    DioLateEndIo = "dio:late_end_io",
    // Buffered read (`buffered_io::ReadTask`).
    /// Nothing to read below EOF (ends the task).
    ReadEof = "read:eof",
    /// The inode lock is taken shared.
    ReadLockInode = "read:lock_inode",
    /// Reading a folio failed (ends the task).
    ReadError = "read:error",
    /// The read returned (ends the task).
    ReadDone = "read:done",
    /// One folio copied out.
    ReadFolio = "read:folio",

    // mmap store (`buffered_io::MmapStoreTask`).
    /// The fault is past EOF (ends the task).
    FaultSigbus = "fault:sigbus",
    /// The fault's read failed (ends the task).
    FaultReadError = "fault:read_error",
    /// Between the read fault and `page_mkwrite`.
    FaultRead = "fault:read",
    /// The folio went away since the fault: fault again.
    PageMkwriteRefault = "page_mkwrite:refault",
    /// `page_mkwrite` found the store past EOF (ends the task).
    PageMkwriteSigbus = "page_mkwrite:sigbus",
    /// `page_mkwrite` could not map the folio (ends the task).
    PageMkwriteError = "page_mkwrite:error",
    /// After `page_mkwrite`.
    PageMkwrite = "page_mkwrite",
    /// The store landed (ends the task).
    Store = "store",
    /// The folio is no longer mapped writable: fault again.
    StoreRefault = "store:refault",

    // fallocate, punch hole, zero range (`ops::RangeTask`).
    /// Both inode locks are taken.
    RangeLock = "range:lock",
    /// One folio of the page cache truncated (before the extents change).
    RangeTruncatePagecache = "range:truncate_pagecache",
    /// fallocate changed the extents (ends the task).
    FallocateAlloc = "fallocate:alloc",
    /// punch hole freed the extents (ends the task).
    PunchFreeExtents = "punch:free_extents",
    /// zero range changed the extents (XFS: punched and preallocated unwritten; ends the
    /// task).
    ZeroRangeConvert = "zero_range:convert",
    /// The filesystem has no zero range (gfs2: EOPNOTSUPP; ends the task).
    ZeroRangeUnsupported = "zero_range:unsupported",

    // truncate (`ops::TruncateTask`).
    /// Both inode locks are taken.
    TruncateLock = "truncate:lock",
    /// Reading the new EOF block failed (ends the task).
    TruncateReadError = "truncate:read_error",
    /// The new EOF folio is clean and not under writeback (the flush before the zeroing).
    TruncateFlushEof = "truncate:flush_eof",
    /// `iomap_zero_range` mapped the new EOF block (its mapping is cached from here).
    ZeroIomapBegin = "zero:iomap_begin",
    /// The zeroing's cookie check before the folio lock (the racy placement), or a stale
    /// mapping found after it (the zeroing maps again).
    ZeroIomapValid = "zero:iomap_valid",
    /// The size is set.
    TruncateSetsize = "truncate:setsize",
    /// One folio past EOF dropped from the page cache.
    TruncatePagecache = "truncate:pagecache",
    /// Between page-cache truncation and extent removal.
    TruncatePagecacheDone = "truncate:pagecache_done",
    /// The extents past EOF are freed (ends the task).
    TruncateFreeExtents = "truncate:free_extents",

    // fsync, fdatasync, sync (`ops::FsyncTask`).
    /// sync learnt its files.
    SyncBegin = "sync:begin",
    /// The journal is forced or the device flushed (ends the task).
    FsyncFlush = "fsync:flush",
    /// Forcing the journal or flushing failed (ends the task).
    FsyncFlushError = "fsync:flush_error",

    // Writeback (`writeback::WbPass`, run by the flusher and by fsync).
    /// No more dirty folios (ends the pass).
    WbPassEnd = "wb:pass_end",
    /// A dirty folio past EOF is cleaned without IO.
    WbBeyondEof = "wb:beyond_eof",
    /// `map_blocks` failed (ends the pass).
    WbMapBlocksError = "wb:map_blocks_error",
    /// The folio maps to a hole: skipped, its data dropped.
    WbHole = "wb:hole",
    /// Writeback started, before submit.
    WbMapBlocks = "wb:map_blocks",
    /// The IO is submitted (between folios of writeback).
    WbSubmit = "wb:submit",
    /// Submitting the IO failed (ends the pass).
    WbSubmitError = "wb:submit_error",

    // IO completion (`writeback::IoCompletion`).
    /// The device completed the IO.
    IoComplete = "io:complete",
    /// UNWRITTEN -> WRITTEN.
    IoConvertUnwritten = "io:convert_unwritten",
    /// Writeback ended on the folio.
    IoEndWriteback = "io:end_writeback",

    // Reclaim (`writeback::Reclaim`).
    /// One folio evicted.
    Reclaim = "reclaim",

    // Namespace operations (`ns::NsTask`).
    /// One folio of an inode left with no name dropped from the page cache.
    EvictPagecache = "evict:pagecache",
    /// The page cache of the inode left with no name is gone.
    EvictPagecacheDone = "evict:pagecache_done",
    /// The inode left with no name is freed (ends the task).
    EvictFree = "evict:free",
    /// create applied to the directory (ends the task).
    Creat = "creat",
    /// unlink applied to the directory (ends the task unless an inode lost its last name).
    Unlink = "unlink",
    /// rename applied to the directory (ends the task unless an inode lost its last name).
    Rename = "rename",
    /// link applied to the directory (ends the task).
    Link = "link",

    // The scheduler (`sched`).
    /// A data operation whose inode is gone before its first step (ends the task).
    Enoent = "enoent",
}

impl std::fmt::Display for YieldPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::YieldPoint;
    use serde::de::value::{Error, StrDeserializer};
    use serde::Deserialize;

    fn parse(label: &str) -> Result<YieldPoint, Error> {
        YieldPoint::deserialize(StrDeserializer::<Error>::new(label))
    }

    #[test]
    fn every_label_parses_back_to_its_yield_point() {
        for &y in YieldPoint::ALL {
            assert_eq!(parse(y.label()), Ok(y), "{y:?}");
            assert_eq!(y.to_string(), y.label());
        }
    }

    /// A misspelt label read from a file must not quietly become another yield point.
    #[test]
    fn an_unknown_label_fails_to_parse_and_names_itself() {
        let e = parse("iomap_begn").expect_err("unknown label");
        let msg = e.to_string();
        assert!(msg.contains("unknown variant `iomap_begn`"), "{msg}");
        assert!(msg.contains("`iomap_begin`"), "{msg}");
    }
}
