//! fs-core crash campaigns: with the defaults no crash state breaks a promise (the oracle
//! would flag a journal, ordering or recovery bug as it flags the planted ones); with each
//! planted bug a campaign from an unhinted seed finds it within a bounded number of runs.

use std::path::PathBuf;

use crashmonkey::fscore::campaign::{run_campaign, FsCampaignOptions, FsCampaignSummary};
use crashmonkey::fscore::workload::WorkloadKind;
use crashmonkey::states::StateOptions;
use fs_core::Config;

/// Runs seeds `seeds` on two threads; returns (states checked, failing runs, first failing
/// seed).
fn run(kind: WorkloadKind, seeds: std::ops::Range<u64>, cfg: &Config) -> (u64, u64, Option<u64>) {
    let s = campaign(kind, seeds, cfg, 2);
    (s.crash_states, s.failures, s.first_failure_seed)
}

fn campaign(
    kind: WorkloadKind,
    seeds: std::ops::Range<u64>,
    cfg: &Config,
    jobs: usize,
) -> FsCampaignSummary {
    let tmp = tempfile::tempdir().unwrap();
    let opts = FsCampaignOptions {
        seed: seeds.start,
        runs: seeds.end - seeds.start,
        workload: kind,
        config: cfg.clone(),
        states: StateOptions::default(),
        max_failures: 0,
        jobs,
        shard: Default::default(),
    };
    run_campaign(
        &opts,
        tmp.path(),
        &mut |_| Ok(PathBuf::new()),
        &mut |_| Ok(()),
        &mut |_, _| {},
        &|| None,
    )
    .unwrap()
}

/// Runs on several threads come back in seed order: the same findings, counts and first
/// failure as one thread finds.
#[test]
fn threads_do_not_change_the_verdicts() {
    let mut cfg = Config::default();
    assert!(cfg.bugs.set("commit-without-flush"));
    let one = campaign(WorkloadKind::Random, 0..40, &cfg, 1);
    let three = campaign(WorkloadKind::Random, 0..40, &cfg, 3);
    assert!(one.failures > 1, "the bug shows in several runs: {one:?}");
    assert_eq!(one.crash_states, three.crash_states);
    assert_eq!(one.failing_seeds, three.failing_seeds);
    assert_eq!(one.first_failure_seed, three.first_failure_seed);
}

/// The floor: with the defaults, a campaign of at least 100,000 crash states finds
/// nothing.
#[test]
fn defaults_keep_every_promise() {
    let mut total = 0;
    for (kind, runs) in [(WorkloadKind::Ace, 1100), (WorkloadKind::Random, 300)] {
        let (states, failing, first) = run(kind, 0..runs, &Config::default());
        eprintln!("{kind:?}: {runs} runs, {states} crash states, {failing} failing runs");
        assert!(states > 10_000, "{kind:?}: only {states} states");
        assert_eq!(failing, 0, "{kind:?}: first failing seed {first:?}");
        total += states;
    }
    assert!(total >= 100_000, "only {total} crash states checked");
}

/// Each planted bug, and the runs within which a campaign from seed 0 must find it (about
/// ten times the measured figure, over both workloads).
const BUGS: [(&str, u64); 5] = [
    ("convert-before-data", 600),
    ("commit-without-flush", 30),
    ("fsync-no-log-force", 30),
    ("size-before-data", 100),
    ("replay-ignores-checksum", 100),
];

#[test]
fn each_planted_bug_is_found_from_an_unhinted_seed() {
    for (bug, within) in BUGS {
        let mut cfg = Config::default();
        assert!(cfg.bugs.set(bug));
        let found = [WorkloadKind::Ace, WorkloadKind::Random]
            .into_iter()
            .find_map(|kind| run(kind, 0..within, &cfg).2.map(|s| (kind, s)));
        eprintln!("{bug}: first found at {found:?}");
        assert!(found.is_some(), "{bug} not found within {within} runs");
    }
}
