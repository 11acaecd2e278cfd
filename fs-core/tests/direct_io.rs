//! Direct writes (`fs_core::direct_io`, after `iomap_dio_rw`, `iomap_dio_complete` and
//! `xfs_dio_write_end_io`, v6.6), scripted step by step: what a buffered read racing one may
//! see, the page cache it must leave behind, the flush and invalidation before its IO, the
//! size it moves at completion. Each script's schedule is replayed to the same run.

use fs_core::oracle::Seen;
use fs_core::sched::{Directive::*, FIRST_OP_TASK};
use fs_core::{Config, DioInvalidate, Failure, FsError, Op, RunResult, Workload, YieldPoint};

mod common;
use common::{first_wrong, run_script};

const K: u64 = 4096;

fn dio(offset: u64, len: u64, byte: u8) -> Op {
    Op::DirectWrite {
        file: 0,
        offset,
        len,
        byte,
    }
}

/// Two blocks preallocated UNWRITTEN; a direct write of 'B' over block 0 races a buffered
/// read of the file. The script stops the direct write at `stop` (its IO done), runs the read
/// to its end (block 0 is still UNWRITTEN: the read fills folio 0 with zeros and caches it),
/// then lets the direct write finish.
fn read_during_dio(order: DioInvalidate, stop: YieldPoint) -> RunResult {
    let cfg = Config {
        dio_invalidate: order,
        ..Config::default()
    };
    let w = Workload {
        files: 1,
        phases: vec![
            vec![Op::Fallocate {
                file: 0,
                offset: 0,
                len: 2 * K,
            }],
            vec![
                dio(0, K, b'B'),
                Op::Read {
                    file: 0,
                    offset: 0,
                    len: 2 * K,
                },
            ],
        ],
    };
    let (write, read) = (FIRST_OP_TASK + 1, FIRST_OP_TASK + 2);
    run_script(
        &cfg,
        &w,
        vec![
            Until {
                task: write,
                label: stop,
                arg: None,
            },
            Until {
                task: read,
                label: YieldPoint::ReadDone,
                arg: None,
            },
            Drain { task: write },
        ],
    )
}

/// `iomap_dio_complete` (v6.6) drops the page cache after `->end_io`: "otherwise a racing
/// buffer read would cache zeros from unwritten extents". The read ran between the IO and
/// the conversion and saw zeros (a read concurrent with the write may see either); the
/// invalidation after the conversion drops the folio it cached, so the file reads 'B'.
#[test]
fn a_read_racing_a_direct_write_caches_nothing_stale() {
    let r = read_during_dio(DioInvalidate::AfterEndIo, YieldPoint::DioSubmit);
    assert!(r.passed(), "{:?}", r.failures);
    assert_eq!(r.results[2], Some(Ok(2 * K)), "the read saw both blocks");
    assert!(r.notes.is_empty(), "{:?}", r.notes);
    assert!(r.files[0][..K as usize].iter().all(|&b| b == b'B'));
    let labels: Vec<YieldPoint> = r
        .trace
        .iter()
        .filter(|s| s.task == (FIRST_OP_TASK + 1) as u32)
        .map(|s| s.label)
        .collect();
    let at = |l| labels.iter().position(|&x| x == l).expect("stepped");
    assert!(at(YieldPoint::DioEndIo) < at(YieldPoint::DioDone));
}

/// The order that comment warns against: the page cache dropped, then the read caches zeros
/// through the UNWRITTEN mapping, then `->end_io` converts the block. The stale folio
/// outlives the write: the page cache says zeros where the file holds 'B' (seen with nothing
/// running, before sync drops the cache and hides it).
#[test]
fn invalidating_before_end_io_leaves_zeros_cached() {
    let r = read_during_dio(DioInvalidate::BeforeEndIo, YieldPoint::DioPostInvalidate);
    assert!(
        r.failures.iter().any(|f| matches!(
            f,
            Failure::WrongData {
                offset: 0,
                expected: b'B',
                found: 0,
                found_from: None,
                seen: Seen::Cached,
                ..
            }
        )),
        "{:?}",
        r.failures
    );
    assert_eq!(first_wrong(&r), Some((0, b'B', 0)));
    // What is on disk is right: sync dropped the stale folio.
    assert!(r.files[0][..K as usize].iter().all(|&b| b == b'B'));
}

/// An overwrite: block 0 holds 'A' on disk; the direct write's IO puts 'B' there before
/// `->end_io`, and a read in between finds the block uncached and WRITTEN and returns 'B'
/// before the write returned. That is allowed (the two are concurrent): the oracle admits
/// the old or the new bytes while the write is in flight, and nothing else.
#[test]
fn a_read_during_an_overwrite_may_see_the_new_bytes_early() {
    let w = Workload {
        files: 1,
        phases: vec![
            vec![Op::Write {
                file: 0,
                offset: 0,
                len: K,
                byte: b'A',
            }],
            vec![Op::Fsync { file: 0 }],
            vec![
                dio(0, K, b'B'),
                Op::Read {
                    file: 0,
                    offset: 0,
                    len: K,
                },
            ],
        ],
    };
    let (write, read) = (FIRST_OP_TASK + 2, FIRST_OP_TASK + 3);
    let script = vec![
        Until {
            task: write,
            label: YieldPoint::DioSubmit,
            arg: None,
        },
        Until {
            task: read,
            label: YieldPoint::ReadDone,
            arg: None,
        },
        Drain { task: write },
    ];
    let r = run_script(&Config::default(), &w, script);
    assert!(r.passed(), "{:?}", r.failures);
    assert!(r.files[0].iter().all(|&b| b == b'B'));
}

/// `filemap_write_and_wait_range` first: the dirty folio of an earlier buffered write goes
/// to disk before the direct write's IO, so the direct write's bytes are the last; over the
/// hole past it, `xfs_direct_write_iomap_begin` allocates an UNWRITTEN block, which `->end_io`
/// converts, and the size moves at completion.
#[test]
fn a_direct_write_flushes_first_and_extends_at_completion() {
    let w = Workload {
        files: 1,
        phases: vec![
            vec![Op::Write {
                file: 0,
                offset: 0,
                len: K + 10,
                byte: b'A',
            }],
            vec![dio(K, 2 * K, b'B')],
        ],
    };
    let r = run_script(&Config::default(), &w, vec![]);
    assert!(r.passed(), "{:?}", r.failures);
    let f = &r.files[0];
    assert_eq!(f.len() as u64, 3 * K);
    assert!(f[..K as usize].iter().all(|&b| b == b'A'));
    assert!(f[K as usize..].iter().all(|&b| b == b'B'));
    let flushed = r
        .trace
        .iter()
        .position(|s| s.label == YieldPoint::DioFlush)
        .expect("flushed");
    let submitted = r
        .trace
        .iter()
        .position(|s| s.label == YieldPoint::DioSubmit)
        .expect("submitted");
    assert!(flushed < submitted);
}

/// A two-block file; a direct write of 'B' over block `dio_block` stops once its flush is
/// done, an mmap store of "MMMMM" at byte 10 (block 0) runs to its end, then the write ends.
fn store_after_the_flush(dio_block: u64) -> RunResult {
    let w = Workload {
        files: 1,
        phases: vec![
            vec![Op::Truncate {
                file: 0,
                size: 2 * K,
            }],
            vec![
                dio(dio_block * K, K, b'B'),
                Op::MmapStore {
                    file: 0,
                    offset: 10,
                    len: 5,
                    byte: b'M',
                },
            ],
        ],
    };
    let (write, store) = (FIRST_OP_TASK + 1, FIRST_OP_TASK + 2);
    let script = vec![
        Until {
            task: write,
            label: YieldPoint::DioFlushWait,
            arg: None,
        },
        Drain { task: store },
        Drain { task: write },
    ];
    run_script(&Config::default(), &w, script)
}

/// A store through a shared mapping that dirties a folio of the range after the flush: the
/// invalidation cannot drop it, `iomap_dio_rw` returns `-ENOTBLK` (XFS would redo the write
/// buffered) and the direct write changes nothing.
#[test]
fn a_folio_dirtied_after_the_flush_fails_the_direct_write() {
    let r = store_after_the_flush(0);
    assert!(r.passed(), "{:?}", r.failures);
    assert_eq!(r.results[1], Some(Err(FsError::NotBlock)));
    assert_eq!(&r.files[0][10..15], b"MMMMM");
    assert!(r.files[0][..10].iter().all(|&b| b == 0));
}

/// A direct write that starts past EOF is refused: XFS zeroes the gap from the old EOF under
/// the exclusive lock first, which the model does not do for direct writes.
#[test]
fn a_direct_write_past_eof_is_refused() {
    let w = Workload {
        files: 1,
        phases: vec![
            vec![Op::Truncate { file: 0, size: K }],
            vec![dio(2 * K, K, b'B')],
        ],
    };
    let r = run_script(&Config::default(), &w, vec![]);
    assert!(r.passed(), "{:?}", r.failures);
    assert!(matches!(r.results[1], Some(Err(FsError::Invalid(_)))));
    assert_eq!(r.files[0], vec![0; K as usize]);
}

/// Direct IO needs block-aligned offsets and lengths.
#[test]
fn unaligned_direct_writes_are_refused() {
    let w = Workload {
        files: 1,
        phases: vec![vec![dio(100, K, b'B')]],
    };
    let r = run_script(&Config::default(), &w, vec![]);
    assert!(matches!(r.results[0], Some(Err(FsError::Invalid(_)))));
}

/// The flush and the invalidations cover the folios of the range only: a store dirtying the
/// folio before it, after the direct write's flush, does not fail the write, and stays.
#[test]
fn folios_outside_the_range_are_left_alone() {
    let r = store_after_the_flush(1);
    assert!(r.passed(), "{:?}", r.failures);
    assert_eq!(r.results[1], Some(Ok(K)));
    assert_eq!(&r.files[0][10..15], b"MMMMM");
    assert!(r.files[0][K as usize..].iter().all(|&b| b == b'B'));
}

/// A direct write starting exactly at EOF appends (only one starting past it is refused).
#[test]
fn a_direct_write_at_eof_appends() {
    let w = Workload {
        files: 1,
        phases: vec![
            vec![Op::Truncate { file: 0, size: K }],
            vec![dio(K, K, b'B')],
        ],
    };
    let r = run_script(&Config::default(), &w, vec![]);
    assert!(r.passed(), "{:?}", r.failures);
    assert_eq!(r.results[1], Some(Ok(K)));
    assert_eq!(r.files[0].len() as u64, 2 * K);
    assert!(r.files[0][K as usize..].iter().all(|&b| b == b'B'));
}
