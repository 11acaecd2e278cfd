//! Seeded random workloads, shaped to reach stale-mapping races in few runs: one or two
//! files of a few folios, a setup phase (preallocate, extend, pre-dirty the tail folio),
//! then two to four concurrent operations whose writes straddle folios and end part-way into
//! a folio, with a page-cache limit of one to three folios so reclaim runs constantly.

use fs_core::block::BLOCK_SIZE;
use fs_core::{Config, Op, Workload};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

const BS: u64 = BLOCK_SIZE as u64;
/// Largest file a generated workload touches, in folios.
pub const WORKLOAD_FILE_FOLIOS_MAX: u64 = 5;
/// Concurrent operations in the racing phase.
pub const CONCURRENT_OPS_MAX: usize = 4;

/// Which scheduling policy a run used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    Random,
    Pct,
}

/// Everything one run is made of, derived from its seed alone.
#[derive(Clone, Debug)]
pub struct Generated {
    pub workload: Workload,
    pub cache_limit_folios: usize,
    pub policy: PolicyKind,
    pub policy_seed: u64,
}

/// Generate run `seed`'s workload, page-cache limit and policy. `base` gives the switches.
pub fn generate(seed: u64, base: &Config) -> (Generated, Config) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut fill = FillBytes(b'A');
    let files = if rng.random_range(0..4) == 0 { 2 } else { 1 };
    let (setup, sizes) = setup_phase(&mut rng, files, &mut fill);
    let n = rng.random_range(2..=CONCURRENT_OPS_MAX);
    let mut racing: Vec<Op> = (0..n)
        .map(|_| racing_op(&mut rng, files, &sizes, &mut fill))
        .collect();
    if base.direct_writes {
        add_direct_writes(seed, &mut racing, &sizes, base.folio_blocks, &mut fill);
    }
    let cache_limit_folios = rng.random_range(1..=3);
    let policy = if rng.random_bool(0.5) {
        PolicyKind::Random
    } else {
        PolicyKind::Pct
    };
    let policy_seed = rng.random();
    let cfg = Config {
        cache_limit_folios,
        device_blocks: 256,
        ..base.clone()
    };
    (
        Generated {
            workload: Workload {
                files,
                phases: vec![setup, racing],
            },
            cache_limit_folios,
            policy,
            policy_seed,
        },
        cfg,
    )
}

/// The byte each write fills its range with: 'A', 'B', ... in the order the writes are
/// generated, so that a file's content shows which write each byte came from.
struct FillBytes(u8);

impl FillBytes {
    fn next(&mut self) -> u8 {
        let b = self.0;
        self.0 = if b == b'Z' { b'a' } else { b + 1 };
        b
    }
}

/// The setup phase: each file made a few folios long (preallocated, extended or written),
/// sometimes with part of a folio dirtied and sometimes fsynced. Returns it and the sizes.
fn setup_phase(rng: &mut ChaCha8Rng, files: usize, fill: &mut FillBytes) -> (Vec<Op>, Vec<u64>) {
    let mut setup = Vec::new();
    let mut sizes = Vec::new();
    for file in 0..files {
        let folios = rng.random_range(2..=WORKLOAD_FILE_FOLIOS_MAX);
        let size = folios * BS;
        match rng.random_range(0..3) {
            0 => setup.push(Op::Fallocate {
                file,
                offset: 0,
                len: size,
            }),
            1 => setup.push(Op::Truncate { file, size }),
            _ => setup.push(Op::Write {
                file,
                offset: 0,
                len: size,
                byte: fill.next(),
            }),
        }
        // Pre-dirty part of a folio (S1's 'X'), sometimes.
        if rng.random_bool(0.6) {
            let folio = rng.random_range(0..folios);
            let off = folio * BS + rng.random_range(0..BS - 64);
            setup.push(Op::Write {
                file,
                offset: off,
                len: rng.random_range(1..64),
                byte: fill.next(),
            });
        }
        if rng.random_bool(0.2) {
            setup.push(Op::Fsync { file });
        }
        sizes.push(size);
    }
    (setup, sizes)
}

/// Direct writes a racing phase gets at most (`--direct-writes`).
pub const DIRECT_WRITES_MAX: usize = 2;
/// Blocks a generated direct write covers at most.
const DIRECT_WRITE_BLOCKS_MAX: u64 = 3;
/// Tries to place a direct write clear of the phase's mmap stores and direct writes.
const DIRECT_WRITE_TRIES_MAX: usize = 8;

/// Adds one or two direct writes to the racing phase, at seeded places, from a random stream
/// of their own (the rest of the workload is the one the seed gives without them). Each is
/// block-aligned, starts inside the file as set up and may end a block past it, and touches
/// no folio an mmap store or another direct write of the phase touches: a store racing a
/// direct write over the same folio is the collision the kernel only warns of ("Possible
/// data corruption due to collision with buffered I/O"), with no single right answer.
fn add_direct_writes(
    seed: u64,
    racing: &mut Vec<Op>,
    sizes: &[u64],
    folio_blocks: u64,
    fill: &mut FillBytes,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xd10_d10_d10_d10);
    let folio = |b: u64| b * BS / (folio_blocks * BS);
    for _ in 0..rng.random_range(1..=DIRECT_WRITES_MAX) {
        let pick = (0..DIRECT_WRITE_TRIES_MAX).find_map(|_| {
            let file = rng.random_range(0..sizes.len());
            let blocks = sizes[file] / BS;
            let first = rng.random_range(0..blocks);
            let len = rng.random_range(1..=DIRECT_WRITE_BLOCKS_MAX.min(blocks + 1 - first));
            let folios = folio(first)..=folio(first + len - 1);
            let clear = racing.iter().all(|op| match *op {
                Op::MmapStore {
                    file: f, offset, ..
                } => f != file || !folios.contains(&folio(offset / BS)),
                Op::DirectWrite {
                    file: f,
                    offset,
                    len,
                    ..
                } => {
                    f != file
                        || folio((offset + len) / BS - 1) < *folios.start()
                        || folio(offset / BS) > *folios.end()
                }
                _ => true,
            });
            clear.then_some((file, first * BS, len * BS))
        });
        if let Some((file, offset, len)) = pick {
            let at = rng.random_range(0..=racing.len());
            let byte = fill.next();
            racing.insert(
                at,
                Op::DirectWrite {
                    file,
                    offset,
                    len,
                    byte,
                },
            );
        }
    }
}

/// One operation of the racing phase, on one of the `files` (of `sizes` bytes).
fn racing_op(rng: &mut ChaCha8Rng, files: usize, sizes: &[u64], fill: &mut FillBytes) -> Op {
    let file = rng.random_range(0..files);
    let size = sizes[file];
    let folios = size / BS;
    match rng.random_range(0..100) {
        0..=44 => {
            // Straddle folios, end part-way into one (the trailing edge).
            let offset = if rng.random_bool(0.5) {
                0
            } else {
                rng.random_range(0..size - 1)
            };
            let max_len = (size - offset).max(1) + BS;
            let len = rng.random_range(1..=max_len);
            Op::Write {
                file,
                offset,
                len,
                byte: fill.next(),
            }
        }
        45..=69 => {
            let folio = rng.random_range(0..folios);
            let len = rng.random_range(1..=64);
            let offset = folio * BS + rng.random_range(0..BS - len);
            Op::MmapStore {
                file,
                offset,
                len,
                byte: fill.next(),
            }
        }
        70..=76 => Op::Read {
            file,
            offset: 0,
            len: size,
        },
        77..=81 => {
            let a = rng.random_range(0..folios);
            Op::PunchHole {
                file,
                offset: a * BS,
                len: rng.random_range(1..=folios - a) * BS,
            }
        }
        82..=85 => {
            let a = rng.random_range(0..folios);
            Op::ZeroRange {
                file,
                offset: a * BS,
                len: rng.random_range(1..=folios - a) * BS,
            }
        }
        86..=89 => {
            let a = rng.random_range(0..folios);
            Op::Fallocate {
                file,
                offset: a * BS,
                len: rng.random_range(1..=folios - a) * BS,
            }
        }
        90..=94 => Op::Truncate {
            file,
            size: rng.random_range(BS / 2..=size + BS),
        },
        _ => Op::Fsync { file },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_workload() {
        let a = generate(42, &Config::default());
        let b = generate(42, &Config::default());
        assert_eq!(a.0.workload, b.0.workload);
        assert_eq!(a.1, b.1);
        assert_ne!(generate(43, &Config::default()).0.workload, a.0.workload);
    }

    /// `--direct-writes` adds direct writes to the same workload, aligned, clear of every
    /// mmap store's folio and of each other.
    #[test]
    fn direct_writes_join_the_same_workload_clear_of_mmap_stores() {
        let dio = Config {
            direct_writes: true,
            folio_blocks: 2,
            ..Config::default()
        };
        let mut with_dio = 0;
        for seed in 0..500 {
            let (plain, _) = generate(
                seed,
                &Config {
                    folio_blocks: 2,
                    ..Config::default()
                },
            );
            let (g, _) = generate(seed, &dio);
            let racing = &g.workload.phases[1];
            let others: Vec<&Op> = racing
                .iter()
                .filter(|op| !matches!(op, Op::DirectWrite { .. }))
                .collect();
            assert_eq!(others, plain.workload.phases[1].iter().collect::<Vec<_>>());
            let folio = |b: u64| b / (2 * BS);
            for op in racing {
                let Op::DirectWrite {
                    file, offset, len, ..
                } = *op
                else {
                    continue;
                };
                with_dio += 1;
                assert!(offset % BS == 0 && len % BS == 0 && len > 0, "{op}");
                for other in racing.iter().filter(|o| *o != op) {
                    let (f, lo, hi) = match *other {
                        Op::MmapStore { file, offset, .. } => (file, offset, offset),
                        Op::DirectWrite {
                            file, offset, len, ..
                        } => (file, offset, offset + len - 1),
                        _ => continue,
                    };
                    let apart = folio(hi) < folio(offset) || folio(lo) > folio(offset + len - 1);
                    assert!(
                        f != file || apart,
                        "seed {seed}: {op} collides with {other}"
                    );
                }
            }
        }
        assert!(with_dio > 500, "only {with_dio} direct writes in 500 seeds");
    }
}
