//! The unhinted campaigns: random workloads under random/PCT schedules, no scripted
//! interleaving. With a fix off they find data loss within a bounded number of runs; with
//! the defaults (every fix on) they find none in 100,000 runs.

use crashmonkey::race::workload::WORKLOAD_FILE_FOLIOS_MAX;
use crashmonkey::race::{run_campaign, run_one, CampaignOptions};
use fs_core::{Config, Failure, PunchMode};

fn first_failure(config: Config, runs: u64) -> Option<u64> {
    let opts = CampaignOptions {
        seed: 1,
        runs,
        config,
        max_failures: 1,
        shard: Default::default(),
    };
    run_campaign(&opts, &mut |_, _| {}).first_failure_seed
}

#[test]
fn no_iomap_valid_loses_data_within_2000_runs() {
    let seed = first_failure(
        Config {
            iomap_valid: false,
            ..Config::default()
        },
        2000,
    )
    .expect("a finding");
    let o = run_one(
        seed,
        &Config {
            iomap_valid: false,
            ..Config::default()
        },
    );
    assert!(
        o.result
            .failures
            .iter()
            .any(|f| matches!(f, Failure::WrongData { .. })),
        "{:?}",
        o.result.failures
    );
    // The same seed with the fix on passes.
    assert!(run_one(seed, &Config::default()).result.passed());
}

/// S3 needs a writeback pass longer than one lookup batch (`filemap_get_folios_tag` takes
/// `PAGEVEC_SIZE` = 15 folios in v6.6): a punch or truncate beyond the batch, and a write
/// there before the next lookup. The generated files have at most 5 folios, so with the
/// kernel's batch no run can get there, and none does.
#[test]
fn no_wb_seq_check_loses_nothing_in_files_shorter_than_a_batch() {
    let cfg = Config {
        wb_seq_check: false,
        ..Config::default()
    };
    assert!(fs_core::writeback::PAGEVEC_SIZE_FOLIOS as u64 > WORKLOAD_FILE_FOLIOS_MAX);
    assert_eq!(first_failure(cfg, 20_000), None);
}

/// With a batch of one folio (what a file of more than `PAGEVEC_SIZE` dirty folios is to the
/// kernel's batch) the same campaigns find S3: writeback writes a block freed under its
/// cached mapping.
#[test]
fn no_wb_seq_check_writes_freed_blocks_within_5000_runs_with_a_batch_of_one() {
    let cfg = Config {
        wb_seq_check: false,
        wb_batch_folios: 1,
        ..Config::default()
    };
    let seed = first_failure(cfg.clone(), 5000).expect("a finding");
    let o = run_one(seed, &cfg);
    assert!(
        o.result
            .failures
            .iter()
            .any(|f| matches!(f, Failure::Invariant { what } if what.contains("writeback wrote"))),
        "{:?}",
        o.result.failures
    );
    // The same seed with the seq check on passes.
    let fixed = Config {
        wb_seq_check: true,
        ..cfg
    };
    assert!(run_one(seed, &fixed).result.passed());
}

#[test]
fn old_punch_loses_mmap_data_within_5000_runs() {
    assert!(first_failure(
        Config {
            punch: PunchMode::Old,
            ..Config::default()
        },
        5000
    )
    .is_some());
}

/// The claim `make demo` and the README make: the fixed model survives 100,000 unhinted
/// runs. About 10 s in release (`make unit` tests in release), about 25 s at the test
/// profile's opt-level 1.
#[test]
fn defaults_find_nothing_in_100k_runs() {
    let opts = CampaignOptions {
        seed: 1_000_000,
        runs: 100_000,
        config: Config::default(),
        max_failures: 1,
        shard: Default::default(),
    };
    let s = run_campaign(&opts, &mut |_, _| {});
    assert_eq!(s.runs, 100_000);
    assert_eq!(s.failures, 0, "seed {:?} failed", s.first_failure_seed);
}

#[test]
fn a_run_is_a_function_of_its_seed() {
    for seed in [5, 638, 9079, 123_456] {
        for cfg in [
            Config::default(),
            Config {
                iomap_valid: false,
                ..Config::default()
            },
        ] {
            let a = run_one(seed, &cfg);
            let b = run_one(seed, &cfg);
            assert_eq!(a.result.schedule, b.result.schedule);
            assert_eq!(a.result.device_log, b.result.device_log);
            assert_eq!(a.result.failures, b.result.failures);
        }
    }
}
