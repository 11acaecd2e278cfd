//! crashmonkey: crash states from nbd-server write logs, checkers, and fs-core race campaigns.
//!
//! Map of the crate (keep it true):
//! - `history`  a write log read as history: operations with power-cut fates, cut into epochs
//! - `states`   crash-state generation (prefixes, ordered subsets, torn writes) with content hashes
//! - `sector_hash` the content hashes of sectors and of states (XXH3-128), defined byte by byte
//! - `state_tables` what state generation keeps between epochs, in files: bounded memory
//! - `ahead`    work done ahead on a thread of its own, bounded in memory (hashing, generating)
//! - `overlay`  copy-on-write images: a prefix image plus per-worker deltas; replay
//! - `check`    running a checker over every crash state, in parallel, keeping failures
//! - `served`   crash states served over NBD by an in-process nbd-server (`{uri}`, `{uri-cow}`)
//! - `checker`  running one checker: own process group, deadline, capped streamed output
//! - `dmlog`    import and export of the dm-log-writes format (fstests `replay-log`)
//! - `race`     seeded race campaigns over fs-core: workloads, runner, reproducer bundles,
//!   minimisation (delta debugging) of a failing run
//! - `fscore`   fs-core on disk: image and NBD devices, crash campaigns with in-process states,
//!   minimisation of a failing crash state
//! - `folder`   campaign folders: run records, findings by signature, sled index, resume, merge
//! - `report`   the HTML report of a campaign folder and SVG timelines of race runs and write logs
//! - `kernel`   crash campaigns on ext4, XFS and btrfs: recorded workloads, states mounted and checked
//! - `shard`    one campaign split across processes or machines, deterministically

pub mod ahead;
pub mod check;
pub mod checker;
pub mod dmlog;
pub mod folder;
pub mod fscore;
pub mod history;
pub mod kernel;
pub mod overlay;
pub mod race;
pub mod report;
pub mod sector_hash;
pub mod served;
pub mod shard;
pub mod state_tables;
pub mod states;
pub mod workload;

/// A named limit, or the value of the environment variable `var` when it is set and parses:
/// tests lower limits this way to reach what a long run would (never needed in normal use).
pub(crate) fn limit_from_env<T: std::str::FromStr>(var: &str, limit: T) -> T {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(limit)
}
