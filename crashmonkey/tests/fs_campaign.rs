//! fs-core crash campaigns: with the defaults no crash state breaks a promise (the oracle
//! would flag a journal, ordering or recovery bug as it flags the planted ones); with each
//! planted bug a campaign from an unhinted seed finds it within a bounded number of runs.

use crashmonkey::fscore::campaign::{run_one, workload_for};
use crashmonkey::fscore::workload::WorkloadKind;
use crashmonkey::states::StateOptions;
use fs_core::Config;

/// Runs seeds `seeds`; returns (states checked, failing runs, first failing seed).
fn run(kind: WorkloadKind, seeds: std::ops::Range<u64>, cfg: &Config) -> (u64, u64, Option<u64>) {
    let tmp = tempfile::tempdir().unwrap();
    let (mut states, mut failing, mut first) = (0, 0, None);
    for seed in seeds {
        let r = run_one(
            seed,
            workload_for(kind, seed),
            cfg,
            StateOptions::default(),
            tmp.path(),
        )
        .unwrap();
        states += r.states.checked as u64;
        if r.failed() {
            failing += 1;
            first.get_or_insert(seed);
        }
    }
    (states, failing, first)
}

#[test]
fn defaults_keep_every_promise() {
    for kind in [WorkloadKind::Ace, WorkloadKind::Random] {
        let (states, failing, first) = run(kind, 0..150, &Config::default());
        eprintln!("{kind:?}: {states} crash states, {failing} failing runs");
        assert!(states > 10_000, "{kind:?}: only {states} states");
        assert_eq!(failing, 0, "{kind:?}: first failing seed {first:?}");
    }
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
