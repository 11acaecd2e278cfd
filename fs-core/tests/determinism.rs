//! Same seed, same run: the schedule, every device write and the verdict are identical on
//! two runs; a recorded schedule replays to the same result.

use fs_core::sched::{self, PctPolicy, RandomPolicy, ReplayPolicy};
use fs_core::{Config, Op, Workload};

fn workload() -> Workload {
    Workload {
        files: 1,
        phases: vec![
            vec![
                Op::Fallocate {
                    file: 0,
                    offset: 0,
                    len: 16384,
                },
                Op::Write {
                    file: 0,
                    offset: 12000,
                    len: 30,
                    byte: b'X',
                },
            ],
            vec![
                Op::Write {
                    file: 0,
                    offset: 0,
                    len: 12300,
                    byte: b'A',
                },
                Op::MmapStore {
                    file: 0,
                    offset: 13000,
                    len: 20,
                    byte: b'M',
                },
                Op::PunchHole {
                    file: 0,
                    offset: 4096,
                    len: 4096,
                },
                Op::Read {
                    file: 0,
                    offset: 0,
                    len: 16384,
                },
                Op::Fsync { file: 0 },
            ],
        ],
    }
}

#[test]
fn same_seed_gives_same_schedule_device_writes_and_verdict() {
    for cfg in [
        Config::default(),
        Config {
            iomap_valid: false,
            cache_limit_folios: 1,
            ..Config::default()
        },
    ] {
        for seed in 0..50 {
            let a = sched::run(&cfg, &workload(), &mut RandomPolicy::new(seed));
            let b = sched::run(&cfg, &workload(), &mut RandomPolicy::new(seed));
            assert_eq!(a.schedule, b.schedule);
            assert_eq!(a.trace, b.trace);
            assert_eq!(a.device_log, b.device_log);
            assert!(!a.device_log.is_empty());
            assert_eq!(a.failures, b.failures);
            assert_eq!(a.files, b.files);
            let c = sched::run(&cfg, &workload(), &mut PctPolicy::new(seed, 3, 100));
            let d = sched::run(&cfg, &workload(), &mut PctPolicy::new(seed, 3, 100));
            assert_eq!(
                (c.schedule, c.device_log, c.failures),
                (d.schedule, d.device_log, d.failures)
            );
            // The materialised schedule alone reproduces the run.
            let r = sched::run(
                &cfg,
                &workload(),
                &mut ReplayPolicy::new(a.schedule.clone(), true),
            );
            assert_eq!(
                (r.trace, r.device_log, r.failures),
                (a.trace, a.device_log, a.failures)
            );
        }
    }
}

#[test]
fn different_seeds_explore_different_schedules() {
    let cfg = Config::default();
    let schedules: std::collections::BTreeSet<_> = (0..20)
        .map(|s| sched::run(&cfg, &workload(), &mut RandomPolicy::new(s)).schedule)
        .collect();
    assert!(
        schedules.len() > 15,
        "only {} distinct schedules",
        schedules.len()
    );
}

#[test]
fn the_fixed_model_passes_every_seed_of_this_workload() {
    for seed in 0..300 {
        let r = sched::run(
            &Config::default(),
            &workload(),
            &mut RandomPolicy::new(seed),
        );
        assert!(r.passed(), "seed {seed}: {:?}", r.failures);
    }
}

/// Hostile operations (from a hand-edited reproducer, say) get errors, never a panic.
#[test]
fn hostile_operations_are_refused_not_panicked() {
    let w = Workload {
        files: 1,
        phases: vec![vec![
            Op::Write {
                file: 0,
                offset: u64::MAX - 1,
                len: 10,
                byte: 1,
            },
            Op::Read {
                file: 0,
                offset: u64::MAX,
                len: u64::MAX,
            },
            Op::MmapStore {
                file: 0,
                offset: u64::MAX - 3,
                len: 2,
                byte: 1,
            },
            Op::MmapStore {
                file: 0,
                offset: 4090,
                len: 100,
                byte: 1,
            },
            Op::Write {
                file: 7,
                offset: 0,
                len: 1,
                byte: 1,
            },
            Op::PunchHole {
                file: 0,
                offset: 1,
                len: 4096,
            },
            Op::ZeroRange {
                file: 0,
                offset: 0,
                len: u64::MAX,
            },
            Op::Fallocate {
                file: 0,
                offset: u64::MAX,
                len: 1,
            },
            Op::Truncate {
                file: 0,
                size: u64::MAX,
            },
            Op::Write {
                file: 0,
                offset: 0,
                len: 0,
                byte: 1,
            },
            Op::MmapStore {
                file: 0,
                offset: 0,
                len: 1,
                byte: 1,
            },
        ]],
    };
    let r = sched::run(&Config::default(), &w, &mut RandomPolicy::new(1));
    assert!(r.passed(), "{:?}", r.failures);
    assert!(
        r.results[..9].iter().all(|x| matches!(x, Some(Err(_)))),
        "{:?}",
        r.results
    );
    assert_eq!(r.results[9], Some(Ok(0)));
    assert!(matches!(r.results[10], Some(Err(fs_core::FsError::SigBus))));
    // A schedule that names tasks that do not exist is refused cleanly in strict replay.
    let bogus = vec![fs_core::Choice { t: 99, s: Some(5) }];
    let r = sched::run(
        &Config::default(),
        &workload(),
        &mut ReplayPolicy::new(bogus, true),
    );
    assert!(matches!(
        r.failures.first(),
        Some(fs_core::Failure::Harness { .. })
    ));
}

/// A workload of too many files (each costs a table entry up front) or none is a harness
/// failure before anything runs, not an allocation of 2^40 entries.
#[test]
fn workloads_outside_the_limits_are_refused_before_they_run() {
    for files in [0, sched::FILES_PER_WORKLOAD_MAX + 1, 1 << 40] {
        let w = Workload {
            files,
            ..workload()
        };
        assert!(w.check().is_err(), "{files} files");
        let r = sched::run(&Config::default(), &w, &mut RandomPolicy::new(1));
        assert!(
            matches!(r.failures.first(), Some(fs_core::Failure::Harness { .. })),
            "{files} files: {:?}",
            r.failures
        );
        assert!(r.results.iter().all(|x| x.is_none()), "nothing ran");
    }
    let w = workload();
    assert_eq!(w.check(), Ok(()));
}

/// A caller's device behind the trait sees the same writes as the built-in one.
#[test]
fn runs_on_a_caller_supplied_device() {
    use fs_core::block::MemDevice;
    let cfg = Config::default();
    let a = sched::run(&cfg, &workload(), &mut RandomPolicy::new(3));
    let dev = Box::new(MemDevice::new(cfg.device_blocks));
    let b = sched::run_on_device(&cfg, &workload(), dev, &mut RandomPolicy::new(3));
    assert_eq!(a.device_log, b.device_log);
    assert_eq!(a.files, b.files);
}
