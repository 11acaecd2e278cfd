//! fs-core on disk, driven from crashmonkey: the `crashmonkey fs` commands' devices (an image
//! file, an NBD export), crash campaigns that check every crash state of a run in process,
//! their workloads and their reproducer bundles.
//!
//! - `device`    block devices for fs-core: stream (file, NBD), in-memory crash state
//! - `image`     the `crashmonkey fs` commands' work: mkfs, fsck, and read-only mounts that
//!   list, read and describe files (recovery into a private copy, never the image)
//! - `workload`  `ace` (bounded, exhaustive) and `random` (racing, with namespace operations)
//! - `states`    every crash state of a run's log: built in memory, mounted, fsck'd, judged
//! - `campaign`  runs, summaries
//! - `bundle`    reproducer bundles of findings, and their replay
//! - `minimise`  a failing crash state shrunk to the fewest surviving and torn writes

pub mod bundle;
pub mod campaign;
pub mod device;
pub mod image;
pub mod minimise;
pub mod states;
pub mod workload;
