//! proptest state-machine tests: random sequences of operations by a single workload task
//! (each operation its own phase, background writeback, completion and reclaim interleaved
//! by a seeded scheduler) must match the oracle's model byte for byte, with every read
//! checked at the step it copies data out, for every combination of allocation mode.

use fs_core::sched::{self, RandomPolicy};
use fs_core::{AllocMode, Config, Op, Workload};
use proptest::prelude::*;

const FILE_BYTES: u64 = 6 * 4096;

fn op() -> impl Strategy<Value = Op> {
    let off = 0..FILE_BYTES;
    let blk = 0u64..6;
    prop_oneof![
        4 => (off.clone(), 1..9000u64, any::<u8>()).prop_map(|(offset, len, byte)| Op::Write { file: 0, offset, len, byte }),
        2 => (off.clone(), 1..9000u64).prop_map(|(offset, len)| Op::Read { file: 0, offset, len }),
        2 => (off.clone(), 1..64u64, any::<u8>()).prop_map(|(o, len, byte)| {
            let offset = (o / 4096) * 4096 + (o % 4096).min(4096 - len);
            Op::MmapStore { file: 0, offset, len, byte }
        }),
        1 => (blk.clone(), 1..4u64).prop_map(|(b, n)| Op::Fallocate { file: 0, offset: b * 4096, len: n * 4096 }),
        1 => (blk.clone(), 1..4u64).prop_map(|(b, n)| Op::PunchHole { file: 0, offset: b * 4096, len: n * 4096 }),
        1 => (blk, 1..4u64).prop_map(|(b, n)| Op::ZeroRange { file: 0, offset: b * 4096, len: n * 4096 }),
        1 => (0..FILE_BYTES + 4096).prop_map(|size| Op::Truncate { file: 0, size }),
        1 => Just(Op::Fsync { file: 0 }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn single_task_sequences_match_the_model(
        ops in prop::collection::vec(op(), 1..12),
        seed in any::<u64>(),
        at_write in any::<bool>(),
        limit in 0usize..4,
    ) {
        let alloc = if at_write { AllocMode::AtWrite } else { AllocMode::Delalloc };
        let cfg = Config { alloc, cache_limit_folios: limit, ..Config::default() };
        let w = Workload { files: 1, phases: ops.iter().map(|o| vec![o.clone()]).collect() };
        let r = sched::run(&cfg, &w, &mut RandomPolicy::new(seed));
        prop_assert!(r.passed(), "failures: {:?}", r.failures);
        prop_assert!(r.results.iter().all(Option::is_some));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// The same, with the whole file read back (and checked against the model) after every
    /// operation, and racing the next one's start against background writeback.
    #[test]
    fn every_intermediate_state_reads_back_as_the_model(
        ops in prop::collection::vec(op(), 1..10),
        seed in any::<u64>(),
    ) {
        let cfg = Config { cache_limit_folios: 1, ..Config::default() };
        let mut phases = Vec::new();
        for o in &ops {
            phases.push(vec![o.clone()]);
            phases.push(vec![Op::Read { file: 0, offset: 0, len: FILE_BYTES + 4096 }]);
        }
        let w = Workload { files: 1, phases };
        let r = sched::run(&cfg, &w, &mut RandomPolicy::new(seed));
        prop_assert!(r.passed(), "failures: {:?}", r.failures);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    /// Folios sized by the write or read that creates them (`max_folio_blocks`), from one
    /// block or two up to 64, with a page cache that reclaims or not: sequences of one to
    /// three operations at a time, racing each other and background writeback, completion
    /// and reclaim, match the model byte for byte at every read.
    #[test]
    fn write_sized_folios_match_the_model(
        phases in prop::collection::vec(big_phase(), 1..8),
        seed in any::<u64>(),
        least in prop_oneof![Just(1u64), Just(2)],
        most in prop_oneof![Just(0u64), Just(4), Just(8), Just(64)],
        limit in prop_oneof![Just(2usize), Just(16), Just(4096)],
    ) {
        let cfg = Config {
            folio_blocks: least,
            max_folio_blocks: if most == 0 { 0 } else { most.max(least) },
            cache_limit_folios: limit,
            ..Config::default()
        };
        let mut all = phases.clone();
        all.push(vec![Op::Read { file: 0, offset: 0, len: BIG_FILE_BYTES + 4096 }]);
        let w = Workload { files: 1, phases: all };
        let r = sched::run(&cfg, &w, &mut RandomPolicy::new(seed));
        prop_assert!(r.passed(), "failures: {:?}", r.failures);
    }
}

const BIG_FILE_BYTES: u64 = 96 * 4096;

/// One to three operations racing each other, never a direct write beside an mmap store or
/// another direct write: those collide with no single right answer (docs/fs-core.md, "A
/// direct write is the one operation with two legal answers"), and the campaigns' generators
/// keep them apart too.
fn big_phase() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(big_op(), 1..4).prop_filter("a direct write would collide", |ops| {
        let dio = ops
            .iter()
            .filter(|o| matches!(o, Op::DirectWrite { .. }))
            .count();
        let store = ops.iter().any(|o| matches!(o, Op::MmapStore { .. }));
        dio == 0 || (dio == 1 && !store)
    })
}

/// Operations over a file of up to 96 blocks, writes and reads up to 64 blocks long.
fn big_op() -> impl Strategy<Value = Op> {
    let off = 0..BIG_FILE_BYTES;
    let blk = 0u64..96;
    prop_oneof![
        4 => (off.clone(), 1..262_144u64, any::<u8>()).prop_map(|(offset, len, byte)| Op::Write { file: 0, offset, len, byte }),
        2 => (off.clone(), 1..262_144u64).prop_map(|(offset, len)| Op::Read { file: 0, offset, len }),
        1 => (off.clone(), 1..64u64, any::<u8>()).prop_map(|(o, len, byte)| {
            let offset = (o / 4096) * 4096 + (o % 4096).min(4096 - len);
            Op::MmapStore { file: 0, offset, len, byte }
        }),
        1 => (blk.clone(), 1..16u64, any::<u8>()).prop_map(|(b, n, byte)| Op::DirectWrite { file: 0, offset: b * 4096, len: n * 4096, byte }),
        1 => (blk.clone(), 1..40u64).prop_map(|(b, n)| Op::PunchHole { file: 0, offset: b * 4096, len: n * 4096 }),
        1 => (blk, 1..40u64).prop_map(|(b, n)| Op::ZeroRange { file: 0, offset: b * 4096, len: n * 4096 }),
        1 => (0..BIG_FILE_BYTES + 4096).prop_map(|size| Op::Truncate { file: 0, size }),
        1 => Just(Op::Fsync { file: 0 }),
    ]
}
