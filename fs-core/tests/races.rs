//! The four stale-mapping races of docs/architecture.md, scripted step by step. Each test runs the
//! interleaving with the fix off (the data is lost, asserted byte for byte) and with the fix
//! on (the data survives), then replays the recorded schedule and checks it gives the same
//! bytes: the scripts are only a way to write down a schedule.

use fs_core::sched::{
    self, Directive::*, ReplayPolicy, ScriptPolicy, FIRST_OP_TASK, TASK_FLUSHER,
    TASK_IO_COMPLETION, TASK_RECLAIM,
};
use fs_core::{Config, Failure, Op, PunchMode, RunResult, Workload, YieldPoint};

const K: u64 = 4096;
const KIB: u64 = 1024;

fn run_script(cfg: &Config, w: &Workload, script: Vec<fs_core::Directive>) -> RunResult {
    let r = sched::run(cfg, w, &mut ScriptPolicy::new(script));
    if std::env::var_os("RACE_TRACE").is_some() {
        for s in &r.trace {
            eprintln!("t{} {} {}", s.task, s.label, s.arg);
        }
        eprintln!("{:?}", r.failures);
    }
    // The materialised schedule replays to the same bytes and verdict.
    let again = sched::run(cfg, w, &mut ReplayPolicy::new(r.schedule.clone(), true));
    assert_eq!(again.files, r.files);
    assert_eq!(again.failures, r.failures);
    assert_eq!(again.device_log, r.device_log);
    r
}

fn first_wrong(r: &RunResult) -> Option<(u64, u8, u8)> {
    r.failures.iter().find_map(|f| match f {
        Failure::WrongData {
            offset,
            expected,
            found,
            ..
        } => Some((*offset, *expected, *found)),
        _ => None,
    })
}

/// S1, unwritten + writeback + reclaim: fallocate 40 KiB; byte 40K-1 = 'X' dirty in folio 9;
/// a write of 36K+1 bytes caches UNWRITTEN and copies folios 0..8; writeback writes folio 9,
/// completion converts it to WRITTEN, reclaim evicts it; the write reaches folio 9 with its
/// stale UNWRITTEN mapping and zeroes the rest of the folio.
fn s1(cfg: &Config) -> RunResult {
    let w = Workload {
        files: 1,
        phases: vec![
            vec![Op::Fallocate {
                file: 0,
                offset: 0,
                len: 40 * KIB,
            }],
            vec![Op::Write {
                file: 0,
                offset: 40 * KIB - 1,
                len: 1,
                byte: b'X',
            }],
            vec![Op::Write {
                file: 0,
                offset: 0,
                len: 36 * KIB + 1,
                byte: b'A',
            }],
        ],
    };
    let big = FIRST_OP_TASK + 2;
    run_script(
        cfg,
        &w,
        vec![
            Until {
                task: big,
                label: YieldPoint::IomapBegin,
                arg: None,
            },
            Until {
                task: big,
                label: YieldPoint::CopyWriteEnd,
                arg: Some(8),
            },
            Until {
                task: TASK_FLUSHER,
                label: YieldPoint::WbPassEnd,
                arg: None,
            },
            Drain {
                task: TASK_IO_COMPLETION,
            },
            Drain { task: TASK_RECLAIM },
        ],
    )
}

#[test]
fn s1_unwritten_writeback_reclaim_loses_x_without_iomap_valid() {
    let cfg = Config {
        iomap_valid: false,
        cache_limit_folios: 2,
        ..Config::default()
    };
    let r = s1(&cfg);
    assert_eq!(r.files[0].len() as u64, 40 * KIB);
    assert!(r.files[0][..(36 * KIB + 1) as usize]
        .iter()
        .all(|&b| b == b'A'));
    assert_eq!(
        r.files[0][(40 * KIB - 1) as usize],
        0,
        "'X' was zeroed by the stale mapping"
    );
    assert_eq!(first_wrong(&r), Some((40 * KIB - 1, b'X', 0)));
}

#[test]
fn s1_keeps_x_with_iomap_valid() {
    let cfg = Config {
        cache_limit_folios: 2,
        ..Config::default()
    };
    let r = s1(&cfg);
    assert!(r.passed(), "{:?}", r.failures);
    let f = &r.files[0];
    assert!(f[..(36 * KIB + 1) as usize].iter().all(|&b| b == b'A'));
    assert!(f[(36 * KIB + 1) as usize..(40 * KIB - 1) as usize]
        .iter()
        .all(|&b| b == 0));
    assert_eq!(f[(40 * KIB - 1) as usize], b'X');
    // The write saw the stale mapping and remapped: a second iomap_begin at folio 9.
    let begins = r
        .trace
        .iter()
        .filter(|s| s.task == (FIRST_OP_TASK + 2) as u32 && s.label == YieldPoint::IomapBegin);
    assert_eq!(begins.map(|s| s.arg).collect::<Vec<_>>(), vec![0, 36 * KIB]);
}

/// S2, mmap at the trailing edge: a write of 4K+100 bytes reserves DELALLOC over folios 0..1;
/// an mmap store lands in folio 1; writeback, completion and reclaim of folio 1; the write
/// zeroes folio 1 past byte 100 from its stale DELALLOC|NEW mapping.
fn s2(cfg: &Config) -> RunResult {
    let w = Workload {
        files: 1,
        phases: vec![
            vec![Op::Truncate {
                file: 0,
                size: 2 * K,
            }],
            vec![
                Op::Write {
                    file: 0,
                    offset: 0,
                    len: K + 100,
                    byte: b'W',
                },
                Op::MmapStore {
                    file: 0,
                    offset: K + 200,
                    len: 10,
                    byte: b'M',
                },
            ],
        ],
    };
    let (wr, mm) = (FIRST_OP_TASK + 1, FIRST_OP_TASK + 2);
    run_script(
        cfg,
        &w,
        vec![
            Until {
                task: wr,
                label: YieldPoint::IomapBegin,
                arg: None,
            },
            Until {
                task: wr,
                label: YieldPoint::CopyWriteEnd,
                arg: Some(0),
            },
            Until {
                task: mm,
                label: YieldPoint::Store,
                arg: None,
            },
            Until {
                task: TASK_FLUSHER,
                label: YieldPoint::WbPassEnd,
                arg: None,
            },
            Drain {
                task: TASK_IO_COMPLETION,
            },
            Drain { task: TASK_RECLAIM },
        ],
    )
}

#[test]
fn s2_mmap_trailing_edge_loses_store_without_iomap_valid() {
    let cfg = Config {
        iomap_valid: false,
        cache_limit_folios: 0,
        ..Config::default()
    };
    let r = s2(&cfg);
    let f = &r.files[0];
    assert!(f[..(K + 100) as usize].iter().all(|&b| b == b'W'));
    assert!(
        f[(K + 200) as usize..(K + 210) as usize]
            .iter()
            .all(|&b| b == 0),
        "mmap store zeroed"
    );
    assert_eq!(first_wrong(&r), Some((K + 200, b'M', 0)));
}

#[test]
fn s2_keeps_store_with_iomap_valid() {
    let cfg = Config {
        cache_limit_folios: 0,
        ..Config::default()
    };
    let r = s2(&cfg);
    assert!(r.passed(), "{:?}", r.failures);
    let f = &r.files[0];
    assert_eq!(f.len() as u64, 2 * K);
    assert!(f[..(K + 100) as usize].iter().all(|&b| b == b'W'));
    assert!(f[(K + 100) as usize..(K + 200) as usize]
        .iter()
        .all(|&b| b == 0));
    assert!(f[(K + 200) as usize..(K + 210) as usize]
        .iter()
        .all(|&b| b == b'M'));
}

/// S2', short-write punch: the write reserves DELALLOC over folios 0..1, an mmap store dirties
/// folio 1, the write's copy into folio 1 comes up short; `iomap_end` punches the unused
/// delalloc. The old punch truncates the page cache first and drops the dirty mmap folio.
fn s2p(cfg: &Config) -> RunResult {
    let w = Workload {
        files: 1,
        phases: vec![
            vec![Op::Truncate {
                file: 0,
                size: 2 * K,
            }],
            vec![
                Op::Write {
                    file: 0,
                    offset: 0,
                    len: K + 100,
                    byte: b'W',
                },
                Op::MmapStore {
                    file: 0,
                    offset: K + 200,
                    len: 10,
                    byte: b'M',
                },
            ],
        ],
    };
    let (wr, mm) = (FIRST_OP_TASK + 1, FIRST_OP_TASK + 2);
    run_script(
        cfg,
        &w,
        vec![
            Until {
                task: wr,
                label: YieldPoint::IomapBegin,
                arg: None,
            },
            Until {
                task: mm,
                label: YieldPoint::Store,
                arg: None,
            },
            ShortCopy {
                task: wr,
                bytes: K as u32,
            },
            ShortCopy { task: wr, bytes: 0 },
            Until {
                task: wr,
                label: YieldPoint::WriteDone,
                arg: None,
            },
        ],
    )
}

#[test]
fn s2prime_old_punch_drops_dirty_mmap_folio() {
    let cfg = Config {
        punch: PunchMode::Old,
        ..Config::default()
    };
    let r = s2p(&cfg);
    assert_eq!(
        r.results[1],
        Some(Ok(K)),
        "the write came up short after one folio"
    );
    let f = &r.files[0];
    assert!(f[..K as usize].iter().all(|&b| b == b'W'));
    assert!(f[(K + 200) as usize..(K + 210) as usize]
        .iter()
        .all(|&b| b == 0));
    assert_eq!(first_wrong(&r), Some((K + 200, b'M', 0)));
}

#[test]
fn s2prime_fixed_punch_keeps_dirty_mmap_folio() {
    let r = s2p(&Config::default());
    assert!(r.passed(), "{:?}", r.failures);
    assert_eq!(r.results[1], Some(Ok(K)));
    let f = &r.files[0];
    assert!(f[..K as usize].iter().all(|&b| b == b'W'));
    assert!(f[K as usize..(K + 200) as usize].iter().all(|&b| b == 0));
    assert!(f[(K + 200) as usize..(K + 210) as usize]
        .iter()
        .all(|&b| b == b'M'));
}

/// S3, writeback's cached mapping: writeback caches WRITTEN [0,8) at folio 0; a punch frees
/// the blocks and a new write dirties folio 5 (DELALLOC); without the seq check writeback
/// writes folio 5 into a freed block and the new data never reaches the file.
fn s3(cfg: &Config) -> RunResult {
    let w = Workload {
        files: 1,
        phases: vec![
            vec![Op::Write {
                file: 0,
                offset: 0,
                len: 8 * K,
                byte: b'A',
            }],
            vec![Op::Fsync { file: 0 }],
            vec![
                Op::Write {
                    file: 0,
                    offset: 0,
                    len: 8 * K,
                    byte: b'B',
                },
                Op::PunchHole {
                    file: 0,
                    offset: 0,
                    len: 8 * K,
                },
                Op::Write {
                    file: 0,
                    offset: 5 * K,
                    len: K,
                    byte: b'C',
                },
            ],
        ],
    };
    let (b, punch, c) = (FIRST_OP_TASK + 2, FIRST_OP_TASK + 3, FIRST_OP_TASK + 4);
    run_script(
        cfg,
        &w,
        vec![
            Until {
                task: b,
                label: YieldPoint::WriteDone,
                arg: None,
            },
            Until {
                task: TASK_FLUSHER,
                label: YieldPoint::WbSubmit,
                arg: Some(0),
            },
            Drain {
                task: TASK_IO_COMPLETION,
            },
            Until {
                task: punch,
                label: YieldPoint::PunchFreeExtents,
                arg: None,
            },
            Until {
                task: c,
                label: YieldPoint::WriteDone,
                arg: None,
            },
            Until {
                task: TASK_FLUSHER,
                label: YieldPoint::WbPassEnd,
                arg: None,
            },
        ],
    )
}

#[test]
fn s3_writeback_writes_freed_block_without_seq_check() {
    let cfg = Config {
        wb_seq_check: false,
        cache_limit_folios: 64,
        ..Config::default()
    };
    let r = s3(&cfg);
    let f = &r.files[0];
    assert_eq!(f.len() as u64, 8 * K);
    assert!(
        f[5 * K as usize..6 * K as usize].iter().all(|&b| b == 0),
        "'C' never reached the file"
    );
    assert!(
        r.failures
            .iter()
            .any(|f| matches!(f, Failure::Invariant { what } if what.contains("free"))),
        "{:?}",
        r.failures
    );
    assert!(r.failures.iter().any(|f| matches!(f, Failure::Invariant { what } if what.contains("DELALLOC without a dirty folio"))));
}

#[test]
fn s3_seq_check_remaps_and_keeps_data() {
    let cfg = Config {
        cache_limit_folios: 64,
        ..Config::default()
    };
    let r = s3(&cfg);
    assert!(r.passed(), "{:?}", r.failures);
    let f = &r.files[0];
    assert!(f[..5 * K as usize].iter().all(|&b| b == 0));
    assert!(f[5 * K as usize..6 * K as usize].iter().all(|&b| b == b'C'));
    assert!(f[6 * K as usize..].iter().all(|&b| b == 0));
}
