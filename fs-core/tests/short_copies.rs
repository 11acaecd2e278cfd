//! Short copies as `iomap_write_iter` (fs/iomap/buffered-io.c, v6.6) runs them, scripted
//! through the scheduler: an injected short copy is a user buffer that cannot be read from
//! there on. Unit tests beside the write task (`buffered_io.rs`) look at the page cache and
//! extents; these look at what the workload sees and at the schedule.

use fs_core::sched::{Directive::*, FIRST_OP_TASK};
use fs_core::{Config, FsError, Op, PunchMode, RunResult, Workload, YieldPoint};

// Not every helper of the shared module is used here.
#[allow(dead_code)]
mod common;
use common::run_script;

const K: u64 = 4096;

/// A write of two folios into an empty file (nothing mapped, so `__iomap_write_begin`
/// leaves a wholly covered folio not uptodate), whose buffer faults `fault_at` bytes in.
fn faulting_write(cfg: &Config, fault_at: u32) -> RunResult {
    faulting_write_at(cfg, 0, fault_at)
}

/// [`faulting_write`] from byte `offset` of the file.
fn faulting_write_at(cfg: &Config, offset: u64, fault_at: u32) -> RunResult {
    let w = Workload {
        files: 1,
        phases: vec![vec![write(offset, 2 * K, b'W')]],
    };
    let wr = FIRST_OP_TASK;
    run_script(
        cfg,
        &w,
        vec![
            ShortCopy {
                task: wr,
                bytes: fault_at,
            },
            Drain { task: wr },
        ],
    )
}

/// A write of `len` bytes of `byte` at `offset` of file 0.
fn write(offset: u64, len: u64, byte: u8) -> Op {
    Op::Write {
        file: 0,
        offset,
        len,
        byte,
    }
}

/// Directives that run phase 0's write and phase 1's fsync to their end, and then reclaim
/// (with `cache_limit_folios: 0`): what the write wrote is on disk, and not in the cache.
fn on_disk_not_cached() -> Vec<fs_core::Directive> {
    [
        FIRST_OP_TASK,
        FIRST_OP_TASK + 1,
        fs_core::sched::TASK_IO_COMPLETION,
        FIRST_OP_TASK + 1,
        fs_core::sched::TASK_RECLAIM,
    ]
    .map(|task| Drain { task })
    .to_vec()
}

fn labels(r: &RunResult) -> Vec<YieldPoint> {
    let wr = FIRST_OP_TASK as u32;
    r.trace
        .iter()
        .filter(|s| s.task == wr)
        .map(|s| s.label)
        .collect()
}

/// `__iomap_write_end` rejects a copy short of a folio that is not uptodate (it returns 0);
/// `iomap_write_iter` retries with `bytes = copied`, `__iomap_write_begin` zeroes the rest of
/// the folio, and the 100 readable bytes are written; then `fault_in_iov_iter_readable` faults
/// in nothing and the write returns 100. The model before this wrote nothing (returned 0).
#[test]
fn a_rejected_copy_is_retried_and_writes_what_could_be_read() {
    for punch in [PunchMode::Fixed, PunchMode::Old] {
        let cfg = Config {
            punch,
            ..Config::default()
        };
        let r = faulting_write(&cfg, 100);
        assert!(r.passed(), "{:?}", r.failures);
        assert_eq!(r.results[0], Some(Ok(100)));
        let l = labels(&r);
        let short = l.iter().position(|&x| x == YieldPoint::CopyShort).unwrap();
        assert_eq!(
            l[short + 1..short + 4],
            [
                YieldPoint::GetFolio,
                YieldPoint::IomapValid,
                YieldPoint::WriteBegin
            ],
            "{l:?}"
        );
        assert_eq!(l[short + 4], YieldPoint::CopyWriteEnd, "{l:?}");
        let f = &r.files[0];
        assert_eq!(f.len(), 100);
        assert!(f.iter().all(|&b| b == b'W'));
    }
}

/// A buffer that faults at its first byte: nothing is written, the write fails with EFAULT,
/// and the reservation it made is punched (the file stays empty).
#[test]
fn a_buffer_that_faults_at_once_fails_with_efault() {
    let r = faulting_write(&Config::default(), 0);
    assert!(r.passed(), "{:?}", r.failures);
    assert_eq!(r.results[0], Some(Err(FsError::Fault)));
    assert!(r.files[0].is_empty());
}

/// A fault at the folio boundary, after one whole folio: the iteration returns 4096 bytes,
/// `iomap_end` punches the rest, `iomap_iter` maps again from 4096, that iteration's fault-in
/// fails with nothing written, and its `iomap_end` punches again: two `iomap_begin`s.
#[test]
fn a_fault_after_progress_maps_again_before_returning() {
    let r = faulting_write(&Config::default(), K as u32);
    assert!(r.passed(), "{:?}", r.failures);
    assert_eq!(r.results[0], Some(Ok(K)));
    let l = labels(&r);
    let begins = l.iter().filter(|&&x| x == YieldPoint::IomapBegin).count();
    assert_eq!(begins, 2, "{l:?}");
    assert_eq!(r.files[0], vec![b'W'; K as usize]);
}

/// A write from the middle of block 0 whose buffer faults at once wrote nothing under its
/// mapping: `xfs_buffered_write_iomap_end` rounds the punch start down, so the delalloc
/// reservation of block 0 goes too (rounding up, as after progress or on gfs2, would leak it).
#[test]
fn a_fault_at_once_mid_block_punches_from_that_block() {
    let r = faulting_write_at(&Config::default(), 100, 0);
    assert!(r.passed(), "{:?}", r.failures);
    assert_eq!(r.results[0], Some(Err(FsError::Fault)));
    assert!(r.files[0].is_empty());
    let wr = FIRST_OP_TASK as u32;
    let punched_from = r
        .trace
        .iter()
        .find(|s| s.task == wr && s.label == YieldPoint::PunchScanDone)
        .map(|s| s.arg);
    assert_eq!(punched_from, Some(0), "the punch starts at block 0");
}

/// A short copy into a folio that `__iomap_write_begin` has just read from disk (the write
/// covers only part of it) is accepted as it is: the folio is uptodate, so `__iomap_write_end`
/// keeps the 50 bytes copied, and the write returns them without a second trip through
/// `write_begin`.
#[test]
fn a_short_copy_into_a_folio_read_from_disk_is_kept() {
    let cfg = Config {
        cache_limit_folios: 0,
        ..Config::default()
    };
    let w = Workload {
        files: 1,
        phases: vec![
            vec![write(0, K, b'A')],
            vec![Op::Fsync { file: 0 }],
            vec![write(100, 100, b'B')],
        ],
    };
    let wr = FIRST_OP_TASK + 2;
    let r = run_script(
        &cfg,
        &w,
        [
            on_disk_not_cached(),
            vec![
                ShortCopy {
                    task: wr,
                    bytes: 50,
                },
                Drain { task: wr },
            ],
        ]
        .concat(),
    );
    assert!(r.passed(), "{:?}", r.failures);
    assert_eq!(r.results[2], Some(Ok(50)));
    let l: Vec<_> = r
        .trace
        .iter()
        .filter(|s| s.task == wr as u32)
        .map(|s| s.label)
        .collect();
    let short = l.iter().position(|&x| x == YieldPoint::CopyShort).unwrap();
    assert_eq!(l[short + 1], YieldPoint::IomapEnd, "{l:?}");
    let mut want = vec![b'A'; K as usize];
    want[100..150].fill(b'B');
    assert_eq!(r.files[0], want);
}

/// `iomap_adjust_read_range` in a large folio: the blocks a write touches that are not
/// uptodate are read in runs of neighbours, and an uptodate block between two of them splits
/// the run (it holds newer bytes than the disk). Here block 1 of a 4-block folio holds a
/// write's 'B' (dirty, not on disk); a write of 'C' from inside block 0 to inside block 2
/// reads blocks 0 and 2 from disk, copies 50 bytes short (rejected: the folio is not
/// uptodate), writes the 50 on its retry and faults: block 1 must still hold 'B'.
#[test]
fn a_read_around_a_write_skips_an_uptodate_block_between() {
    let cfg = Config {
        folio_blocks: 4,
        cache_limit_folios: 0,
        ..Config::default()
    };
    let w = Workload {
        files: 1,
        phases: vec![
            vec![write(0, 4 * K, b'A')],
            vec![Op::Fsync { file: 0 }],
            vec![write(K, K, b'B')],
            vec![write(100, 2 * K, b'C')],
        ],
    };
    let wr = FIRST_OP_TASK + 3;
    let r = run_script(
        &cfg,
        &w,
        [
            on_disk_not_cached(),
            vec![
                Drain {
                    task: FIRST_OP_TASK + 2,
                },
                ShortCopy {
                    task: wr,
                    bytes: 50,
                },
                Drain { task: wr },
            ],
        ]
        .concat(),
    );
    assert!(r.passed(), "{:?}", r.failures);
    assert_eq!(r.results[3], Some(Ok(50)));
    let mut want = vec![b'A'; 4 * K as usize];
    want[K as usize..2 * K as usize].fill(b'B');
    want[100..150].fill(b'C');
    assert!(
        r.files[0] == want,
        "block 1: {:?}",
        &r.files[0][K as usize..K as usize + 8]
    );
}
