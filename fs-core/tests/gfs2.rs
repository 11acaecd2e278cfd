//! gfs2's locks and allocation (`Config::gfs2`, `crashmonkey race --fs gfs2`), scripted: each
//! test runs one interleaving with one part of gfs2 relaxed (the data is wrong, asserted byte
//! for byte) and with gfs2 as built (the lock makes the interleaving impossible, or the
//! behaviour repairs it), then replays the recorded schedule to the same bytes.
//!
//! gfs2 allocates blocks at write and fault time, does not zero them on disk (the write path
//! zeroes what a write does not cover in the folio, because the mapping is NEW), and has no
//! `->iomap_valid`: what keeps a new block's old bytes from being seen is its locking.

use fs_core::sched::{self, Directive::*, FIRST_OP_TASK};
use fs_core::{AllocMode, Config, Gfs2, Op, RunResult, Workload, YieldPoint};

mod common;
use common::{first_wrong, run_script};

const K: u64 = 4096;

/// The `--fs gfs2` preset.
fn gfs2() -> Config {
    Config {
        alloc: AllocMode::AtWrite,
        iomap_valid: false,
        wb_seq_check: false,
        gfs2: Gfs2::ALL,
        ..Config::default()
    }
}

/// Block 0 of f0 holds 'A' on disk and is then punched (freed, its bytes left there); a small
/// write into the hole allocates it again, not zeroed, and a read fault of that folio races
/// the write between its `iomap_begin` and its `get_folio`.
fn fault_reads_new_block(cfg: &Config) -> RunResult {
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
            vec![Op::PunchHole {
                file: 0,
                offset: 0,
                len: K,
            }],
            vec![
                Op::Write {
                    file: 0,
                    offset: 100,
                    len: 10,
                    byte: b'D',
                },
                Op::MmapStore {
                    file: 0,
                    offset: 2000,
                    len: 1,
                    byte: b'C',
                },
            ],
        ],
    };
    let (write, store) = (FIRST_OP_TASK + 3, FIRST_OP_TASK + 4);
    run_script(
        cfg,
        &w,
        vec![
            Until {
                task: write,
                label: YieldPoint::IomapBegin,
                arg: None,
            },
            Until {
                task: store,
                label: YieldPoint::FaultRead,
                arg: None,
            },
            Drain { task: write },
            Drain { task: store },
        ],
    )
}

/// `gfs2_fault` takes the inode glock shared: a read fault cannot read a block that a write
/// holding the glock exclusive has just allocated and not yet zeroed in its folio. Without
/// it, the fault reads the punched block's old 'A' from disk into an uptodate folio, the
/// write then finds the folio uptodate and zeroes nothing, and the 'A' comes back in a file
/// region that was punched (stale data exposure).
#[test]
fn fault_glock_keeps_a_new_blocks_old_bytes_unseen() {
    let mut relaxed = gfs2();
    relaxed.gfs2.fault_glock = false;
    let r = fault_reads_new_block(&relaxed);
    assert_eq!(first_wrong(&r), Some((0, 0, b'A')), "{:?}", r.failures);

    let r = fault_reads_new_block(&gfs2());
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    let f = &r.files[0];
    assert_eq!((f[0], f[100], f[2000], f[3000]), (0, b'D', b'C', 0));
}

/// The abstract at-write allocator zeroes new blocks on disk: the same schedule, with the
/// fault glock relaxed, reads zeros, not old bytes. gfs2 does not zero them, which is why
/// its locks matter.
#[test]
fn zeroing_new_blocks_hides_the_exposure() {
    let mut zeroing = gfs2();
    zeroing.gfs2.fault_glock = false;
    zeroing.gfs2.no_block_zeroing = false;
    let r = fault_reads_new_block(&zeroing);
    assert!(r.failures.is_empty(), "{:?}", r.failures);
}

/// A write allocates blocks for 3 folios at `iomap_begin` (MAPPED|NEW), copies folio 0 and is
/// cut short (a fault in the user buffer); `gfs2_iomap_end` truncates the page cache over the
/// NEW blocks it did not reach and punches them. Without that punch the blocks stay allocated
/// with their old bytes under a size that does not cover them; an extending write over one of
/// them later zeroes only its own folio's uncovered part... and a read of the other finds the
/// old bytes on disk.
fn short_write(cfg: &Config) -> RunResult {
    let w = Workload {
        files: 1,
        phases: vec![
            vec![Op::Write {
                file: 0,
                offset: 0,
                len: 3 * K,
                byte: b'A',
            }],
            vec![Op::Fsync { file: 0 }],
            vec![Op::Truncate { file: 0, size: 0 }],
            vec![Op::Write {
                file: 0,
                offset: 0,
                len: 3 * K,
                byte: b'B',
            }],
            vec![Op::Truncate {
                file: 0,
                size: 3 * K,
            }],
        ],
    };
    let write = FIRST_OP_TASK + 3;
    run_script(
        cfg,
        &w,
        vec![
            ShortCopy {
                task: write,
                bytes: 0,
            },
            Until {
                task: write,
                label: YieldPoint::IomapBegin,
                arg: None,
            },
        ],
    )
}

/// `gfs2_iomap_end`'s short-write punch deallocates the NEW blocks a short write did not
/// reach: without it they stay in the file, not zeroed, and growing the file over them
/// shows the bytes their previous owner left.
#[test]
fn short_write_punch_deallocates_unreached_new_blocks() {
    let mut relaxed = gfs2();
    relaxed.gfs2.short_write_punch = false;
    let r = short_write(&relaxed);
    assert_eq!(first_wrong(&r), Some((0, 0, b'A')), "{:?}", r.failures);

    let r = short_write(&gfs2());
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert_eq!(r.files[0], vec![0; 3 * K as usize]);
}

/// Q1 for gfs2: file of 3 folios, all holes. A read fault pins folio 2 before the write
/// starts; the write (`iomap_begin`) allocates blocks 0..2 and caches them MAPPED|NEW; the
/// store's `page_mkwrite` dirties folio 2 (its block is allocated already, so nothing in the
/// extent map changes); writeback writes it and reclaim evicts it; the write reaches folio 2
/// and, trusting NEW, zero-fills what it does not cover: the store's 'C' is gone.
fn new_flag_goes_stale(cfg: &Config) -> RunResult {
    let w = Workload {
        files: 1,
        phases: vec![
            vec![Op::Truncate {
                file: 0,
                size: 3 * K,
            }],
            vec![
                Op::MmapStore {
                    file: 0,
                    offset: 2 * K + 500,
                    len: 1,
                    byte: b'C',
                },
                Op::Write {
                    file: 0,
                    offset: 0,
                    len: 2 * K + 10,
                    byte: b'W',
                },
            ],
        ],
    };
    let (store, write) = (FIRST_OP_TASK + 1, FIRST_OP_TASK + 2);
    let until = |task, label| Until {
        task,
        label,
        arg: None,
    };
    run_script(
        cfg,
        &w,
        vec![
            until(store, YieldPoint::FaultRead),
            until(write, YieldPoint::IomapBegin),
            until(store, YieldPoint::Store),
            until(sched::TASK_FLUSHER, YieldPoint::WbPassEnd),
            until(sched::TASK_IO_COMPLETION, YieldPoint::IoEndWriteback),
            until(sched::TASK_RECLAIM, YieldPoint::Reclaim),
            Drain { task: write },
        ],
    )
}

/// The buffered write holds the glock exclusive (`gfs2_file_buffered_write`) and
/// `page_mkwrite` takes it exclusive (`gfs2_page_mkwrite`): together they keep a store out
/// of a write's NEW range, which is what protects gfs2 from Q1's race (it has no
/// `->iomap_valid`, and a cookie could not see a stale NEW flag anyway). Relax either and the
/// store is lost.
#[test]
fn write_and_mkwrite_glocks_keep_a_store_out_of_a_writes_new_range() {
    let mut cfg = gfs2();
    cfg.cache_limit_folios = 0;
    for relax in ["write", "mkwrite"] {
        let mut relaxed = cfg.clone();
        match relax {
            "write" => relaxed.gfs2.write_glock = false,
            _ => relaxed.gfs2.mkwrite_glock = false,
        }
        let r = new_flag_goes_stale(&relaxed);
        assert_eq!(
            first_wrong(&r),
            Some((2 * K + 500, b'C', 0)),
            "without the {relax} glock: {:?}",
            r.failures
        );
    }
    let r = new_flag_goes_stale(&cfg);
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    let f = &r.files[0];
    assert_eq!(
        (f[0], f[2 * K as usize + 9], f[2 * K as usize + 500]),
        (b'W', b'W', b'C')
    );
}

/// A write of 3 folios into an empty file whose user buffer is not resident from byte 100
/// on, while an mmap store waits to dirty folio 0 (its read fault done before the write).
fn fault_retry(cfg: &Config) -> RunResult {
    let w = Workload {
        files: 1,
        phases: vec![
            vec![Op::Truncate { file: 0, size: 200 }],
            vec![
                Op::MmapStore {
                    file: 0,
                    offset: 150,
                    len: 10,
                    byte: b'M',
                },
                Op::Write {
                    file: 0,
                    offset: 0,
                    len: 3 * K,
                    byte: b'W',
                },
            ],
        ],
    };
    let (mm, wr) = (FIRST_OP_TASK + 1, FIRST_OP_TASK + 2);
    run_script(
        cfg,
        &w,
        vec![
            Until {
                task: mm,
                label: YieldPoint::FaultRead,
                arg: None,
            },
            ShortCopy {
                task: wr,
                bytes: 100,
            },
            Until {
                task: wr,
                label: YieldPoint::Gfs2GlockDrop,
                arg: None,
            },
            Until {
                task: mm,
                label: YieldPoint::Store,
                arg: None,
            },
            Drain { task: wr },
        ],
    )
}

fn labels(r: &RunResult, task: u32) -> Vec<YieldPoint> {
    r.trace
        .iter()
        .filter(|s| s.task == task)
        .map(|s| s.label)
        .collect()
}

/// `gfs2_file_buffered_write` runs the iomap write with page faults disabled: a user page that
/// is not resident ends it short (`iomap_write_iter` writes the 100 bytes it can read, then
/// its fault-in fails). Having made progress, gfs2 drops the glock with `i_rwsem` still held,
/// faults the buffer in, retakes the glock and writes the rest: the write returns all of it.
/// While the glock is down, `page_mkwrite` (which takes it exclusive) dirties folio 0 and the
/// store lands; the resumed write then overwrites it (the later write wins, as the oracle
/// allows). Without the retry the write returns 100 bytes and the store's bytes stay.
#[test]
fn a_short_write_drops_the_glock_faults_in_and_goes_on() {
    let r = fault_retry(&gfs2());
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    let wr = labels(&r, (FIRST_OP_TASK + 2) as u32);
    let drop = wr.iter().position(|&l| l == YieldPoint::Gfs2GlockDrop);
    let retake = wr.iter().position(|&l| l == YieldPoint::Gfs2GlockRetake);
    assert!(drop.is_some() && drop < retake, "{wr:?}");
    assert_eq!(r.results[2], Some(Ok(3 * K)));
    let mkwrite_in_window = r
        .trace
        .iter()
        .skip_while(|s| s.label != YieldPoint::Gfs2GlockDrop)
        .take_while(|s| s.label != YieldPoint::Gfs2GlockRetake)
        .any(|s| s.label == YieldPoint::PageMkwrite);
    assert!(mkwrite_in_window, "{:?}", r.trace);
    assert_eq!(r.files[0], vec![b'W'; 3 * K as usize]);

    let mut no_retry = gfs2();
    no_retry.gfs2.fault_retry = false;
    let r = fault_retry(&no_retry);
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert_eq!(r.results[2], Some(Ok(100)));
    assert!(!r.trace.iter().any(|s| s.label == YieldPoint::Gfs2GlockDrop));
    let f = &r.files[0];
    assert_eq!(f.len(), 200);
    assert!(f[..100].iter().all(|&b| b == b'W'));
    assert!(f[150..160].iter().all(|&b| b == b'M'));
}
