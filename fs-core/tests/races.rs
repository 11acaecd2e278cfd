//! The four stale-mapping races of docs/architecture.md, scripted step by step. Each test runs the
//! interleaving with the fix off (the data is lost, asserted byte for byte) and with the fix
//! on (the data survives), then replays the recorded schedule and checks it gives the same
//! bytes: the scripts are only a way to write down a schedule.

use fs_core::sched::{Directive::*, FIRST_OP_TASK, TASK_FLUSHER, TASK_IO_COMPLETION, TASK_RECLAIM};
use fs_core::{Config, Failure, Op, PunchMode, RunResult, ValidityCheckAt, Workload, YieldPoint};

mod common;
use common::{first_wrong, run_script};

const K: u64 = 4096;
const KIB: u64 = 1024;

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
    // The report says why: the block, the cached mapping and what the extent is now.
    assert_eq!(
        r.notes,
        [
            "op2 write_begin zero-filled the uncovered part of folio 9 of file 0: its cached \
          Unwritten mapping (cookie 10) says file block 9 is Unwritten at device block 10, but \
          it is now Written at device block 10 (seq 20)"
        ]
    );
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
    s2_at_folio(cfg, 1)
}

/// S2 with the write's trailing edge (and the store) in folio `tail` instead of folio 1.
fn s2_at_folio(cfg: &Config, tail: u64) -> RunResult {
    let w = Workload {
        files: 1,
        phases: vec![
            vec![Op::Truncate {
                file: 0,
                size: (tail + 1) * K,
            }],
            vec![
                Op::Write {
                    file: 0,
                    offset: 0,
                    len: tail * K + 100,
                    byte: b'W',
                },
                Op::MmapStore {
                    file: 0,
                    offset: tail * K + 200,
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
                arg: Some(tail - 1),
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
    assert_eq!(
        r.notes,
        [
            "op1 write_begin zero-filled the uncovered part of folio 1 of file 0: its cached \
          Delalloc|NEW mapping (cookie 2) says file block 1 is Delalloc, but it is now Written \
          at device block 2 (seq 6)"
        ]
    );
}

/// S2 with blocks allocated at write time (`alloc=at-write`): the write's mapping is
/// MAPPED|NEW, writeback writes the mmap store into that very block, and the extent and its
/// seq never change, so no cookie could see it; the write zeroes the store all the same, and
/// the report says the block is written, not new.
#[test]
fn s2_at_write_loses_store_to_a_new_mapping_writeback_has_written() {
    let cfg = Config {
        iomap_valid: false,
        cache_limit_folios: 0,
        alloc: fs_core::AllocMode::AtWrite,
        ..Config::default()
    };
    let r = s2_at_folio(&cfg, 2);
    assert_eq!(first_wrong(&r), Some((2 * K + 200, b'M', 0)));
    assert_eq!(
        r.notes,
        [
            "op1 write_begin zero-filled the uncovered part of folio 2 of file 0: its cached \
          Mapped|NEW mapping says device block 3 is new, but writeback has written data to it \
          since (the extent and seq did not change, so the cookie cannot see it)"
        ]
    );
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
    s2p_over(cfg, 2)
}

/// S2' over `folios` folios: the write reserves DELALLOC over all of them and comes up short
/// after folio 0, with an mmap store in each later folio.
fn s2p_over(cfg: &Config, folios: u64) -> RunResult {
    let store = |folio| Op::MmapStore {
        file: 0,
        offset: folio * K + 200,
        len: 10,
        byte: b'M',
    };
    let write = Op::Write {
        file: 0,
        offset: 0,
        len: (folios - 1) * K + 100,
        byte: b'W',
    };
    let w = Workload {
        files: 1,
        phases: vec![
            vec![Op::Truncate {
                file: 0,
                size: folios * K,
            }],
            std::iter::once(write)
                .chain((1..folios).map(store))
                .collect(),
        ],
    };
    let wr = FIRST_OP_TASK + 1;
    let until = |task, label| Until {
        task,
        label,
        arg: None,
    };
    let mut script = vec![until(wr, YieldPoint::IomapBegin)];
    script.extend((1..folios as usize).map(|k| until(wr + k, YieldPoint::Store)));
    script.extend([
        ShortCopy {
            task: wr,
            bytes: K as u32,
        },
        ShortCopy { task: wr, bytes: 0 },
        until(wr, YieldPoint::WriteDone),
    ]);
    run_script(cfg, &w, script)
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

/// S2' over three folios, with a store in each of folios 1 and 2: the old punch truncates the
/// page cache over both, folio by folio, and both stores are lost (the fixed punch keeps
/// them). A folio the old punch skipped would stay dirty over the punched hole, which
/// writeback reports.
#[test]
fn s2prime_old_punch_drops_every_dirty_folio_of_its_range() {
    let old = Config {
        punch: PunchMode::Old,
        ..Config::default()
    };
    for (cfg, lost) in [(old, true), (Config::default(), false)] {
        let r = s2p_over(&cfg, 3);
        assert_eq!(r.results[1], Some(Ok(K)));
        // Lost, not left behind: a dirty folio the punch skipped would stay over a hole.
        let lost_only = r
            .failures
            .iter()
            .all(|f| matches!(f, Failure::WrongData { .. }));
        assert!(lost_only, "{:?}", r.failures);
        assert_eq!(r.failures.is_empty(), !lost, "{:?}", r.failures);
        let f = &r.files[0];
        for at in [K + 200, 2 * K + 200] {
            let kept = f[at as usize..at as usize + 10].iter().all(|&b| b == b'M');
            assert_eq!(kept, !lost, "the store at {at}, punch {:?}", cfg.punch);
        }
    }
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

/// The file of S3: 20 folios written and made durable, so one WRITTEN extent [0,20) on
/// contiguous device blocks; then a write of 'B' over folios `0..b_folios` (the background
/// flusher's pass), a punch of folio `punched` and a write of 'C' into it.
fn s3_workload(b_folios: u64, punched: u64) -> Workload {
    Workload {
        files: 1,
        phases: vec![
            vec![Op::Write {
                file: 0,
                offset: 0,
                len: 20 * K,
                byte: b'A',
            }],
            vec![Op::Fsync { file: 0 }],
            vec![
                Op::Write {
                    file: 0,
                    offset: 0,
                    len: b_folios * K,
                    byte: b'B',
                },
                Op::PunchHole {
                    file: 0,
                    offset: punched * K,
                    len: K,
                },
                Op::Write {
                    file: 0,
                    offset: punched * K,
                    len: K,
                    byte: b'C',
                },
            ],
        ],
    }
}

/// Tasks of the racing phase of [`s3_workload`]: the 'B' write, the punch, the 'C' write.
const S3_B: usize = FIRST_OP_TASK + 2;
const S3_PUNCH: usize = FIRST_OP_TASK + 3;
const S3_C: usize = FIRST_OP_TASK + 4;

/// S3, writeback's cached mapping, as the kernel can run it. The background flusher's pass
/// (WB_SYNC_NONE, DIRTY lookups) takes folios 0..14, a full batch of `PAGEVEC_SIZE` = 15
/// (`filemap_get_folios_tag`, v6.6), caches WRITTEN [0,20) at folio 0 (`xfs_map_blocks`) and
/// adds all 15 to one ioend (`iomap_add_to_ioend`), which stays open. Folio 17 is beyond that
/// ioend and that batch, so the punch of it (`xfs_file_fallocate` ->
/// `xfs_flush_unmap_range`) waits for nothing of the pass: it frees block 17 and 'C' dirties
/// a new folio 17 over DELALLOC before the pass's next lookup, which finds it. Without the
/// seq check (`xfs_imap_valid`) the pass writes folio 17 through its cached mapping into the
/// freed block, and 'C' never reaches the file.
fn s3(cfg: &Config) -> RunResult {
    run_script(
        cfg,
        &s3_workload(15, 17),
        vec![
            Until {
                task: S3_B,
                label: YieldPoint::WriteDone,
                arg: None,
            },
            Until {
                task: TASK_FLUSHER,
                label: YieldPoint::WbSubmit,
                arg: Some(14),
            },
            Until {
                task: S3_PUNCH,
                label: YieldPoint::PunchFreeExtents,
                arg: None,
            },
            Until {
                task: S3_C,
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
    assert_eq!(cfg.wb_batch_folios, 15, "the kernel's PAGEVEC_SIZE (v6.6)");
    let r = s3(&cfg);
    let f = &r.files[0];
    assert_eq!(f.len() as u64, 20 * K);
    assert!(f[..15 * K as usize].iter().all(|&b| b == b'B'));
    assert!(
        f[17 * K as usize..18 * K as usize].iter().all(|&b| b == 0),
        "'C' never reached the file"
    );
    assert!(
        r.failures
            .iter()
            .any(|f| matches!(f, Failure::Invariant { what } if what.contains("file 0 block 17") && what.contains("free"))),
        "{:?}",
        r.failures
    );
    assert!(r.failures.iter().any(|f| matches!(f, Failure::Invariant { what } if what.contains("DELALLOC without a dirty folio"))));
    // The pass that wrote folio 17 is the one that looked up 0..14 before the punch.
    let flusher: Vec<(YieldPoint, u64)> = r
        .trace
        .iter()
        .filter(|s| s.task == TASK_FLUSHER as u32)
        .map(|s| (s.label, s.arg))
        .collect();
    let first_end = flusher
        .iter()
        .position(|s| s.0 == YieldPoint::WbPassEnd)
        .expect("the pass ended");
    assert!(flusher[..first_end].contains(&(YieldPoint::WbMapBlocks, 17)));
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
    assert!(f[..15 * K as usize].iter().all(|&b| b == b'B'));
    assert!(f[15 * K as usize..17 * K as usize]
        .iter()
        .all(|&b| b == b'A'));
    assert!(f[17 * K as usize..18 * K as usize]
        .iter()
        .all(|&b| b == b'C'));
    assert!(f[18 * K as usize..].iter().all(|&b| b == b'A'));
}

/// The S3 first scripted here (and in DESIGN.md), which the kernel cannot run: the flusher
/// caches WRITTEN [0,8) at folio 0 and the punch of [0,8) is to proceed before the pass ends.
/// Folio 0 sits in the pass's open ioend (`iomap_add_to_ioend`), under writeback but not
/// submitted, and the punch waits for its writeback (`xfs_flush_unmap_range` ->
/// `filemap_write_and_wait_range`), so the pass runs to its end first (folios 1..7 join the
/// ioend, which is submitted at `iomap_writepages`' end), the IO completes, and only then does
/// the punch free the blocks. 'C' lands in a new pass with a fresh mapping: even without the
/// seq check nothing is lost. (Before the ioend was modelled, each folio's IO was submitted
/// on its own, the punch went ahead at once and this schedule wrote folio 5 into a freed
/// block.)
#[test]
fn s3_as_first_scripted_cannot_lose_data_the_punch_waits_for_the_open_ioend() {
    let cfg = Config {
        wb_seq_check: false,
        cache_limit_folios: 64,
        ..Config::default()
    };
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
    let r = run_script(
        &cfg,
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
    );
    assert!(r.passed(), "{:?}", r.failures);
    let f = &r.files[0];
    assert!(f[..5 * K as usize].iter().all(|&b| b == 0));
    assert!(f[5 * K as usize..6 * K as usize].iter().all(|&b| b == b'C'));
    assert!(f[6 * K as usize..].iter().all(|&b| b == 0));
    // Nothing completed while folio 0's ioend was open; the punch removed folio 0 only after
    // the pass ended and the IO completed. (Positions count from the end of 'B', after the
    // fsync's own IO.)
    let b_done = r
        .trace
        .iter()
        .position(|s| s.task == b as u32 && s.label == YieldPoint::WriteDone)
        .expect("'B' returned");
    let at = |task: usize, label: YieldPoint, arg: u64| {
        r.trace[b_done..]
            .iter()
            .position(|s| s.task == task as u32 && s.label == label && s.arg == arg)
            .unwrap_or_else(|| panic!("no {label} {arg} by task {task}"))
    };
    let pass_end = at(TASK_FLUSHER, YieldPoint::WbPassEnd, 8);
    assert!(at(TASK_FLUSHER, YieldPoint::WbMapBlocks, 7) < pass_end);
    assert!(at(TASK_IO_COMPLETION, YieldPoint::IoComplete, 0) > pass_end);
    assert!(
        at(punch, YieldPoint::RangeTruncatePagecache, 0)
            > at(TASK_IO_COMPLETION, YieldPoint::IoEndWriteback, 0)
    );
}

/// A punch *inside* the pass's batch does not expose the stale mapping either:
/// `write_cache_pages` skips a folio of its batch that was truncated since the lookup "even
/// if there is now a new, dirty page at the same pagecache address" (its `folio->mapping`
/// check), and the pass's next lookup starts past the batch. The flusher's batch is folios
/// 0..14; it writes 0..4, then folio 10 is punched and rewritten with 'C'; the pass skips the
/// new folio 10, and a later pass maps it afresh. Without the seq check, nothing is lost.
#[test]
fn s3_inside_the_batch_is_skipped_by_the_pass() {
    let cfg = Config {
        wb_seq_check: false,
        cache_limit_folios: 64,
        ..Config::default()
    };
    let r = run_script(
        &cfg,
        &s3_workload(15, 10),
        vec![
            Until {
                task: S3_B,
                label: YieldPoint::WriteDone,
                arg: None,
            },
            Until {
                task: TASK_FLUSHER,
                label: YieldPoint::WbSubmit,
                arg: Some(4),
            },
            Until {
                task: S3_PUNCH,
                label: YieldPoint::PunchFreeExtents,
                arg: None,
            },
            Until {
                task: S3_C,
                label: YieldPoint::WriteDone,
                arg: None,
            },
            Until {
                task: TASK_FLUSHER,
                label: YieldPoint::WbPassEnd,
                arg: None,
            },
        ],
    );
    assert!(r.passed(), "{:?}", r.failures);
    let f = &r.files[0];
    assert!(f[10 * K as usize..11 * K as usize]
        .iter()
        .all(|&b| b == b'C'));
    let first_pass: Vec<u64> = r
        .trace
        .iter()
        .filter(|s| s.task == TASK_FLUSHER as u32)
        .take_while(|s| s.label != YieldPoint::WbPassEnd)
        .filter(|s| s.label == YieldPoint::WbMapBlocks)
        .map(|s| s.arg)
        .collect();
    assert_eq!(first_pass, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14]);
}

/// Truncate's zeroing goes through `iomap_write_begin` too: growing a file zeroes from the
/// old EOF (`xfs_setattr_size` -> `xfs_zero_range` -> `iomap_zero_iter`, with no flush
/// first). 'X' dirty over DELALLOC in folio 0 (size 100); a truncate up to 8 KiB maps block 0
/// (DELALLOC) to zero [100, 4096); writeback allocates and writes the folio, completion
/// converts the block to WRITTEN, reclaim evicts the folio; the zeroing then locks a new
/// folio and, trusting its DELALLOC mapping (not MAPPED, so "needs zeroing"), fills it with
/// zeros instead of reading the block: bytes 0..100 are lost.
fn truncate_zeroing(cfg: &Config) -> RunResult {
    let w = Workload {
        files: 1,
        phases: vec![
            vec![Op::Write {
                file: 0,
                offset: 0,
                len: 100,
                byte: b'X',
            }],
            vec![Op::Truncate {
                file: 0,
                size: 2 * K,
            }],
        ],
    };
    let truncate = FIRST_OP_TASK + 1;
    let until = |task, label| Until {
        task,
        label,
        arg: None,
    };
    let mut script = vec![until(truncate, YieldPoint::ZeroIomapBegin)];
    if cfg.iomap_valid && cfg.validity_check_at == ValidityCheckAt::BeforeFolioLock {
        script.push(until(truncate, YieldPoint::ZeroIomapValid));
    }
    script.extend([
        until(TASK_FLUSHER, YieldPoint::WbPassEnd),
        until(TASK_IO_COMPLETION, YieldPoint::IoEndWriteback),
        until(TASK_RECLAIM, YieldPoint::Reclaim),
        Drain { task: truncate },
    ]);
    run_script(cfg, &w, script)
}

/// `->iomap_valid` protects the zero path as it does the write path, and in the same place:
/// with the check off, or made before the folio lock, the zeroing loses the data below the
/// old EOF; after the folio lock, or inside `->get_folio` (which the zero path also
/// calls), it maps again and keeps it. This is where the placements of Q2 do not differ
/// either: every `iomap_write_begin` caller gets the check; writeback, which has no folio
/// operations, does not.
#[test]
fn truncate_zeroing_validates_its_mapping() {
    let base = Config {
        cache_limit_folios: 0,
        ..Config::default()
    };
    for (name, cfg) in [
        (
            "no iomap_valid",
            Config {
                iomap_valid: false,
                ..base.clone()
            },
        ),
        (
            "before the folio lock",
            Config {
                validity_check_at: ValidityCheckAt::BeforeFolioLock,
                ..base.clone()
            },
        ),
    ] {
        let r = truncate_zeroing(&cfg);
        assert_eq!(
            first_wrong(&r),
            Some((0, b'X', 0)),
            "{name}: {:?}",
            r.failures
        );
    }
    for at in [ValidityCheckAt::AfterFolioLock, ValidityCheckAt::InGetFolio] {
        let cfg = Config {
            validity_check_at: at,
            ..base.clone()
        };
        let r = truncate_zeroing(&cfg);
        assert!(r.failures.is_empty(), "{at:?}: {:?}", r.failures);
        let mut want = vec![b'X'; 100];
        want.resize(2 * K as usize, 0);
        assert_eq!(r.files[0], want, "{at:?}");
    }
}

/// Shrinking a file flushes its new EOF folio before zeroing its tail
/// (`xfs_setattr_size`: "iomap won't detect a dirty page over an unwritten block"): 'B' is
/// dirty over an UNWRITTEN block (fallocated); a truncate to 3152 bytes would otherwise map
/// the block UNWRITTEN, skip the zeroing (unwritten reads as zeros), and let writeback put
/// 'B' past the new EOF, where growing the file again shows it (unhinted seed 12570 of the
/// default campaign did, before the flush was modelled). Here the truncate runs as early as
/// it can: it waits for the flusher and the completion, then zeroes through the page cache.
#[test]
fn truncate_flushes_its_eof_folio_before_zeroing() {
    let w = Workload {
        files: 1,
        phases: vec![
            vec![Op::Fallocate {
                file: 0,
                offset: 0,
                len: 2 * K,
            }],
            vec![Op::Write {
                file: 0,
                offset: 0,
                len: 3921,
                byte: b'B',
            }],
            vec![Op::Truncate {
                file: 0,
                size: 3152,
            }],
            vec![Op::Truncate {
                file: 0,
                size: 4348,
            }],
        ],
    };
    let truncate = FIRST_OP_TASK + 2;
    let r = run_script(
        &Config::default(),
        &w,
        vec![
            Until {
                task: truncate,
                label: YieldPoint::TruncateLock,
                arg: None,
            },
            Until {
                task: truncate,
                label: YieldPoint::TruncateFlushEof,
                arg: None,
            },
            Drain { task: truncate },
        ],
    );
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    let mut want = vec![b'B'; 3152];
    want.resize(4348, 0);
    assert_eq!(r.files[0], want);
    let flush = r
        .trace
        .iter()
        .position(|s| s.label == YieldPoint::TruncateFlushEof);
    let wrote = r
        .trace
        .iter()
        .position(|s| s.label == YieldPoint::IoEndWriteback);
    assert!(
        wrote < flush,
        "the flush waited for the folio's writeback: {wrote:?} {flush:?}"
    );
}

/// S3 inside one batch, with large folios (4 blocks per folio): the flusher's pass looks up
/// folios 0 and 1 (one batch), caches UNWRITTEN [0,8) at folio 0 (`xfs_map_blocks` converts
/// the whole delalloc run) and adds folio 0 to its ioend. A punch of block 5 covers folio 1
/// in part: `truncate_inode_partial_folio` cannot split it while the pass's batch holds a
/// reference, so it stays, zeroed over block 5; the punch frees block 5's device block and
/// 'C' dirties block 5 again over new DELALLOC. The pass reaches folio 1 (same folio, still
/// dirty) and, without the seq check, writes block 5 through its cached mapping into the
/// freed block. With 4 KiB folios the punched folio leaves the cache and the pass skips it
/// (`s3_inside_the_batch_is_skipped_by_the_pass`).
fn s3_large_folio(cfg: &Config) -> RunResult {
    let w = Workload {
        files: 1,
        phases: vec![
            vec![Op::Write {
                file: 0,
                offset: 0,
                len: 8 * K,
                byte: b'A',
            }],
            vec![
                Op::PunchHole {
                    file: 0,
                    offset: 5 * K,
                    len: K,
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
    let (punch, c) = (FIRST_OP_TASK + 1, FIRST_OP_TASK + 2);
    let until = |task, label| Until {
        task,
        label,
        arg: None,
    };
    run_script(
        cfg,
        &w,
        vec![
            until(FIRST_OP_TASK, YieldPoint::WriteDone),
            Until {
                task: TASK_FLUSHER,
                label: YieldPoint::WbSubmit,
                arg: Some(0),
            },
            until(punch, YieldPoint::PunchFreeExtents),
            until(c, YieldPoint::WriteDone),
            until(TASK_FLUSHER, YieldPoint::WbPassEnd),
        ],
    )
}

#[test]
fn s3_inside_one_batch_with_large_folios_needs_the_seq_check() {
    let cfg = |wb_seq_check| Config {
        wb_seq_check,
        folio_blocks: 4,
        cache_limit_folios: 64,
        ..Config::default()
    };
    let r = s3_large_folio(&cfg(false));
    let lost = &r.files[0][5 * K as usize..6 * K as usize];
    assert!(lost.iter().all(|&b| b == 0), "'C' never reached the file");
    assert!(
        r.failures
            .iter()
            .any(|f| matches!(f, Failure::Invariant { what }
            if what.contains("file 0 block 5") && what.contains("free"))),
        "{:?}",
        r.failures
    );
    let r = s3_large_folio(&cfg(true));
    assert!(r.passed(), "{:?}", r.failures);
    let mut want = vec![b'A'; 8 * K as usize];
    want[5 * K as usize..6 * K as usize].fill(b'C');
    assert_eq!(r.files[0], want);
}
