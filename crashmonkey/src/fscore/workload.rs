//! Workloads for fs-core crash campaigns.
//!
//! - `ace`: bounded and exhaustive, in the manner of CrashMonkey's ACE: after a fixed setup
//!   (file `f0` written and synced), one to three core operations over a small fixed set of
//!   files, each followed by a persistence point among fsync, fdatasync, sync and none (the
//!   last one never none). Workload `n` of the enumeration is run `n`: every sequence of one
//!   operation comes first, then every sequence of two, then of three.
//! - `random`: the race campaign's workloads (shaped to reach the stale-mapping races: a
//!   preallocated or extended file, a pre-dirtied folio, writes that straddle folios and end
//!   part-way into one, mmap stores, a page cache of one to three folios, PCT or random
//!   scheduling), followed by phases of one to three concurrent operations that mix data
//!   operations with create, unlink, rename and link (so freed blocks are reused) and
//!   persistence points, and a final sync or fsync (so what a race lost is made durable).
//!
//! Every write in a workload uses its own byte value, so a wrong byte names its writer.

use fs_core::block::BLOCK_SIZE;
use fs_core::{Config, Op, Workload};

use crate::race::{generate, PolicyKind};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const BS: u64 = BLOCK_SIZE as u64;
/// Files an fs campaign's filesystem names at mkfs (`f0`, `f1`, ...), and its inode count.
pub const CAMPAIGN_FILES: usize = 3;
pub const CAMPAIGN_INODES: u64 = 8;
/// The device of a campaign run, in blocks (1 MiB: small images keep states cheap).
pub const CAMPAIGN_DEVICE_BLOCKS: u64 = 256;
/// Longest `ace` sequence.
pub const ACE_SEQ_MAX: usize = 3;
/// Phases of a random workload.
pub const RANDOM_PHASES_MAX: usize = 6;

/// Which generator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadKind {
    Ace,
    Random,
}

/// The core operations of `ace` (before their byte values are given).
fn ace_core(byte: u8) -> Vec<Op> {
    let w = |file, offset, len| Op::Write {
        file,
        offset,
        len,
        byte,
    };
    vec![
        w(0, 8192, 6000),
        w(0, 1000, 3000),
        w(1, 0, 5000),
        Op::MmapStore {
            file: 0,
            offset: 200,
            len: 30,
            byte,
        },
        Op::Fallocate {
            file: 0,
            offset: 4096,
            len: 16384,
        },
        Op::FallocateKeepSize {
            file: 0,
            offset: 8192,
            len: 8192,
        },
        Op::PunchHole {
            file: 0,
            offset: 0,
            len: 4096,
        },
        Op::ZeroRange {
            file: 0,
            offset: 4096,
            len: 4096,
        },
        Op::Truncate {
            file: 0,
            size: 1000,
        },
        Op::Truncate {
            file: 0,
            size: 20000,
        },
        Op::Create { file: 1 },
        Op::Unlink { file: 0 },
        Op::Rename { from: 0, to: 1 },
        Op::Link { file: 0, to: 1 },
    ]
}

/// The persistence points of `ace`; index 0 is none.
fn ace_persist(i: usize) -> Option<Op> {
    match i {
        0 => None,
        1 => Some(Op::Fsync { file: 0 }),
        2 => Some(Op::Fdatasync { file: 0 }),
        3 => Some(Op::Fsync { file: 1 }),
        _ => Some(Op::Sync),
    }
}

const ACE_PERSIST: usize = 5;

/// Workloads of each `ace` length: (core x persistence) choices, the last never none.
fn ace_count(len: usize) -> u64 {
    let core = ace_core(0).len() as u64;
    let step = core * ACE_PERSIST as u64;
    step.pow(len as u32 - 1) * core * (ACE_PERSIST as u64 - 1)
}

/// Every `ace` workload, all lengths together.
pub fn ace_total() -> u64 {
    (1..=ACE_SEQ_MAX).map(ace_count).sum()
}

/// `ace` workload number `n` (taken modulo [`ace_total`]).
pub fn ace(n: u64) -> Workload {
    let mut n = n % ace_total();
    let mut len = 1;
    while n >= ace_count(len) {
        n -= ace_count(len);
        len += 1;
    }
    let core = ace_core(0).len() as u64;
    let mut phases = vec![
        vec![Op::Write {
            file: 0,
            offset: 0,
            len: 10_000,
            byte: b'A',
        }],
        vec![Op::Fsync { file: 0 }],
    ];
    for i in 0..len {
        let last = i + 1 == len;
        let persist_choices = if last { ACE_PERSIST - 1 } else { ACE_PERSIST } as u64;
        let p = (n % persist_choices) as usize + usize::from(last);
        n /= persist_choices;
        let c = (n % core) as usize;
        n /= core;
        let byte = b'B' + i as u8;
        phases.push(vec![ace_core(byte)[c].clone()]);
        if let Some(op) = ace_persist(p) {
            phases.push(vec![op]);
        }
    }
    Workload {
        files: CAMPAIGN_FILES,
        phases,
    }
}

/// One run's workload and how it is scheduled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsWorkload {
    pub workload: Workload,
    /// The page-cache limit, when the workload sets one (small ones make reclaim run).
    pub cache_limit_folios: Option<usize>,
    pub policy: PolicyKind,
    pub policy_seed: u64,
}

impl FsWorkload {
    /// A workload under the random policy seeded with `seed`, the default cache.
    pub fn plain(workload: Workload, seed: u64) -> Self {
        FsWorkload {
            workload,
            cache_limit_folios: None,
            policy: PolicyKind::Random,
            policy_seed: seed,
        }
    }
}

/// The next unused byte value after the ones `w` writes.
fn bytes_after(w: &Workload) -> u8 {
    w.ops()
        .filter_map(|op| match op {
            Op::Write { byte, .. } | Op::MmapStore { byte, .. } | Op::DirectWrite { byte, .. } => {
                Some(*byte)
            }
            _ => None,
        })
        .max()
        .map_or(b'A', |b| b.saturating_add(1).max(b'A'))
}

/// A random workload from `seed` (see the module doc); with `cfg.direct_writes`, its racing
/// phase races direct writes too (the rest is the same workload).
pub fn random(seed: u64, cfg: &Config) -> FsWorkload {
    let gen = Config {
        direct_writes: cfg.direct_writes,
        folio_blocks: cfg.folio_blocks,
        ..Config::default()
    };
    let (race, _) = generate(seed, &gen);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_f5c0_0e00_0001);
    let files = race.workload.files.clamp(2, CAMPAIGN_FILES);
    let mut next = bytes_after(&race.workload);
    let mut byte = || {
        let b = next;
        next = next.wrapping_add(1).max(b'0');
        b
    };
    let mut phases = race.workload.phases.clone();
    for _ in 0..rng.random_range(0..=RANDOM_PHASES_MAX / 2) {
        let n = rng.random_range(1..=3);
        let phase = (0..n).map(|_| random_op(&mut rng, files, byte())).collect();
        phases.push(phase);
    }
    phases.push(vec![match rng.random_range(0..3) {
        0 => Op::Sync,
        1 => Op::Fsync {
            file: rng.random_range(0..files),
        },
        _ => Op::Fdatasync {
            file: rng.random_range(0..files),
        },
    }]);
    FsWorkload {
        workload: Workload { files, phases },
        cache_limit_folios: Some(race.cache_limit_folios),
        policy: race.policy,
        policy_seed: race.policy_seed,
    }
}

fn random_op(rng: &mut ChaCha8Rng, files: usize, byte: u8) -> Op {
    let file = rng.random_range(0..files);
    let other = rng.random_range(0..files);
    let block = rng.random_range(0..4u64);
    let blocks = rng.random_range(1..=3u64);
    match rng.random_range(0..100) {
        0..=29 => Op::Write {
            file,
            offset: rng.random_range(0..4 * BS),
            len: rng.random_range(1..3 * BS),
            byte,
        },
        30..=37 => Op::MmapStore {
            file,
            offset: rng.random_range(0..BS),
            len: rng.random_range(1..64),
            byte,
        },
        38..=43 => Op::Fallocate {
            file,
            offset: block * BS,
            len: blocks * BS,
        },
        44..=47 => Op::FallocateKeepSize {
            file,
            offset: block * BS,
            len: blocks * BS,
        },
        48..=52 => Op::PunchHole {
            file,
            offset: block * BS,
            len: blocks * BS,
        },
        53..=56 => Op::ZeroRange {
            file,
            offset: block * BS,
            len: blocks * BS,
        },
        57..=61 => Op::Truncate {
            file,
            size: rng.random_range(0..5 * BS),
        },
        62..=66 => Op::Create { file },
        67..=71 => Op::Unlink { file },
        72..=76 => Op::Rename {
            from: file,
            to: other,
        },
        77..=80 => Op::Link { file, to: other },
        81..=88 => Op::Fsync { file },
        89..=93 => Op::Fdatasync { file },
        _ => Op::Sync,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ace_enumerates_every_sequence_once() {
        let core = ace_core(0).len() as u64;
        assert_eq!(ace_count(1), core * 4);
        let mut seen = std::collections::HashSet::new();
        for n in 0..ace_count(1) + ace_count(2) {
            let w = ace(n);
            assert!(seen.insert(format!("{:?}", w.phases)), "workload {n} twice");
            assert!(
                w.phases.last().unwrap()[0].persists(),
                "ends in a persistence point"
            );
        }
        assert_eq!(ace(0).phases, ace(ace_total()).phases);
    }

    #[test]
    fn random_workloads_are_deterministic() {
        let d = Config::default();
        assert_eq!(random(7, &d), random(7, &d));
        assert_ne!(random(7, &d), random(8, &d));
    }
}
