//! fs-core: a deterministic, sans-IO filesystem core that models the Linux iomap layer, so
//! the stale-mapping races of buffered writes, writeback, IO completion, reclaim and mmap
//! faults are steps a scheduler orders and every race replays from its schedule.
//!
//! No threads, no clocks, no async, no global state: concurrency is the interleaving of
//! task steps chosen by a `sched::Policy`.
//!
//! Module map:
//! - `block`       the `BlockDevice` trait (submit and complete are separate), `MemDevice`
//!   with its write log.
//! - `extent`      per-inode extent map: HOLE / DELALLOC / UNWRITTEN / WRITTEN and `seq`.
//! - `alloc`       block allocator with ownership, so writes to freed blocks are caught.
//! - `pagecache`   4 KiB folios (locked, uptodate, dirty, writeback, mapped-writable), LRU.
//! - `fs`          the filesystem state, the behaviour switches (`Config`), locks, errors.
//! - `iomap`       `IoMap`, `iomap_begin` for writes and faults, `iomap_valid`.
//! - `buffered_io` buffered write (iterator, write_begin/end, iomap_end delalloc punch old
//!   and fixed), buffered read, mmap fault + `page_mkwrite` + store.
//! - `writeback`   writepages (batched tagged lookups, a cached mapping (`map_blocks`), open
//!   ioends), IO completion, reclaim.
//! - `direct_io`   direct write (`iomap_dio_rw` on XFS's aligned path): flush and
//!   invalidate, allocate unwritten, write, convert at completion, invalidate again.
//! - `ops`         workload operations (`Op`), fallocate, punch, zero range, truncate, fsync,
//!   fdatasync, sync.
//! - `ns`          namespace operations: create, unlink, rename, link.
//! - `step`        the step protocol between tasks and the scheduler: `Cx` (what a step may
//!   touch), `Step` (what it hands back), `YieldPoint` (where it stopped, by label).
//! - `engine`      the scheduler for calls that arrive while it runs (an NBD export on fs-core).
//! - `sched`       the task table, policies (random, PCT, replay, script), the runner.
//! - `oracle`      the fsx-style file model, first-wrong-byte reports, invariants.
//! - `crash`       the crash oracle: what a filesystem recovered from a crash state must show.
//! - `ondisk`      the on-disk format, the journal with ordered data, mkfs, mount with
//!   recovery, commit and unmount, and fsck.

pub mod alloc;
pub mod block;
pub mod buffered_io;
pub mod crash;
pub mod direct_io;
pub mod engine;
pub mod extent;
pub mod foliomap;
pub mod fs;
pub mod iomap;
pub mod ns;
pub mod ondisk;
pub mod ops;
pub mod oracle;
pub mod pagecache;
pub mod sched;
pub mod step;
pub mod writeback;

/// Identifies a task of the scheduler (an index into its task table).
pub type TaskId = usize;

pub use fs::{AllocMode, Config, DioInvalidate, Fs, FsError, Gfs2, PunchMode, ValidityCheckAt};
pub use ops::Op;
pub use oracle::Failure;
pub use sched::{run, Choice, Directive, RunResult, Workload};
pub use step::YieldPoint;
