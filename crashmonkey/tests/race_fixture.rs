//! The committed reproducer `fixtures/race/race-seed-9079`, found by an unhinted campaign
//! with `--no-iomap-valid`: S1 (a write caches UNWRITTEN over folio 1 while fsync writes it,
//! completion converts it to WRITTEN and reclaim evicts it; the write zeroes byte 7839 'A').
//! Replayed exactly it fails the same way; replayed along the same interleaving with the
//! fix on, the stale mapping is caught and the byte survives.

use crashmonkey::race::load_bundle;
use fs_core::sched::{self, ReplayPolicy};
use fs_core::{Config, Failure, YieldPoint};
use std::path::PathBuf;

fn bundle_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/race/race-seed-9079")
}

#[test]
fn fixture_replays_the_same_failure() {
    let b = load_bundle(&bundle_dir()).expect("bundle");
    assert!(!b.config.iomap_valid);
    let r = sched::run(
        &b.config,
        &b.workload,
        &mut ReplayPolicy::new(b.schedule.clone(), true),
    );
    assert_eq!(r.failures, b.failures);
    assert!(matches!(
        r.failures.first(),
        Some(Failure::WrongData {
            file: 0,
            offset: 7839,
            expected: b'A',
            found: 0,
            found_from: None,
            ..
        })
    ));
    assert_eq!(r.files[0][7839], 0);
    // The model names the mechanism: folio 1 zero-filled from a stale UNWRITTEN mapping.
    assert!(
        r.notes.iter().any(|n| n.contains("zero-filled")
            && n.contains("folio 1")
            && n.contains("Unwritten at device block")
            && n.contains("now Written")),
        "{:?}",
        r.notes
    );
}

#[test]
fn fixture_passes_along_the_same_interleaving_with_the_fix_on() {
    let b = load_bundle(&bundle_dir()).expect("bundle");
    let cfg = Config {
        iomap_valid: true,
        ..b.config.clone()
    };
    let mut policy = ReplayPolicy::lenient(b.schedule.clone(), b.trace.clone());
    let r = sched::run(&cfg, &b.workload, &mut policy);
    assert!(r.passed(), "{:?}", r.failures);
    assert_eq!(
        policy.divergences, 0,
        "the fixed run followed every recorded step"
    );
    assert_eq!(r.files[0][7839..7875], [b'A'; 36]);
    // The write found its mapping stale at folio 1 and remapped there.
    assert!(r
        .trace
        .iter()
        .any(|s| s.label == YieldPoint::IomapBegin && s.arg == 4096));
}
