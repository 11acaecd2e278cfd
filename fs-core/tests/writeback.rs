//! Writeback as v6.6 runs it, one behaviour per test, each scripted step by step: the ioend's
//! lifetime (`iomap_add_to_ioend`, `iomap_writepages`), the batched tagged lookup
//! (`write_cache_pages` over `filemap_get_folios_tag`), and WB_SYNC_ALL's TOWRITE tagging
//! (`tag_pages_for_writeback`). The stale-mapping race these shape (S3) is in `races.rs`.

use fs_core::sched::{
    self, Directive::*, ScriptPolicy, TraceStep, FIRST_OP_TASK, TASK_FLUSHER, TASK_IO_COMPLETION,
};
use fs_core::writeback::PAGEVEC_SIZE_FOLIOS;
use fs_core::{Config, Op, RunResult, Workload, YieldPoint};

const K: u64 = 4096;

fn run_script(cfg: &Config, w: &Workload, script: Vec<fs_core::Directive>) -> RunResult {
    let r = sched::run(cfg, w, &mut ScriptPolicy::new(script));
    assert!(r.passed(), "{:?}", r.failures);
    r
}

fn write(folio: u64, byte: u8) -> Op {
    Op::Write {
        file: 0,
        offset: folio * K,
        len: K,
        byte,
    }
}

/// Position of the first step of `task` with `label` and `arg`.
fn at(trace: &[TraceStep], task: usize, label: YieldPoint, arg: u64) -> usize {
    trace
        .iter()
        .position(|s| s.task == task as u32 && s.label == label && s.arg == arg)
        .unwrap_or_else(|| panic!("no {label} {arg} by task {task}"))
}

/// The folios a task wrote (its `wb:map_blocks` steps), in order.
fn written_by(trace: &[TraceStep], task: usize) -> Vec<u64> {
    trace
        .iter()
        .filter(|s| s.task == task as u32 && s.label == YieldPoint::WbMapBlocks)
        .map(|s| s.arg)
        .collect()
}

/// An ioend lives from its first folio until a folio that cannot join it arrives or the pass
/// ends (`iomap_add_to_ioend` / `iomap_can_add_to_ioend`, then `iomap_writepage_map`'s
/// submit list and `iomap_writepages`' last `iomap_submit_ioend`, fs/iomap/buffered-io.c
/// v6.6); until it is submitted its folios are under writeback and nothing of it can
/// complete. Folios 0, 1 and 3 of a preallocated file are dirty: 0 and 1 share an ioend,
/// folio 3 is not the next file block, so it closes that ioend (submitted after folio 3) and
/// opens its own (submitted at the pass's end).
#[test]
fn an_ioend_is_submitted_when_it_closes_or_the_pass_ends() {
    let w = Workload {
        files: 1,
        phases: vec![
            vec![Op::Fallocate {
                file: 0,
                offset: 0,
                len: 4 * K,
            }],
            vec![write(0, b'A')],
            vec![write(1, b'B')],
            // The read keeps the workload running while the flusher works (a run ends
            // when its last operation returns).
            vec![
                write(3, b'D'),
                Op::Read {
                    file: 0,
                    offset: 0,
                    len: K,
                },
            ],
        ],
    };
    let drain = Drain {
        task: TASK_IO_COMPLETION,
    };
    let script = vec![
        Until {
            task: FIRST_OP_TASK + 3,
            label: YieldPoint::WriteDone,
            arg: None,
        },
        Until {
            task: TASK_FLUSHER,
            label: YieldPoint::WbSubmit,
            arg: Some(1),
        },
        drain.clone(),
        Until {
            task: TASK_FLUSHER,
            label: YieldPoint::WbSubmit,
            arg: Some(3),
        },
        drain.clone(),
        Until {
            task: TASK_FLUSHER,
            label: YieldPoint::WbPassEnd,
            arg: None,
        },
        drain,
    ];
    let cfg = Config {
        cache_limit_folios: 64,
        ..Config::default()
    };
    let r = run_script(&cfg, &w, script);
    let t = &r.trace;
    assert_eq!(written_by(t, TASK_FLUSHER), [0, 1, 3]);
    let submit_1 = at(t, TASK_FLUSHER, YieldPoint::WbSubmit, 1);
    let submit_3 = at(t, TASK_FLUSHER, YieldPoint::WbSubmit, 3);
    let pass_end = at(t, TASK_FLUSHER, YieldPoint::WbPassEnd, 4);
    let complete = |fblock| at(t, TASK_IO_COMPLETION, YieldPoint::IoComplete, fblock);
    // The drain after folio 1 found nothing to complete: the ioend [0, 1] was still open.
    assert_eq!(t[submit_1 + 1].label, YieldPoint::WbMapBlocks);
    assert!(complete(0) > submit_3 && complete(1) > submit_3 && complete(1) < pass_end);
    assert!(complete(3) > pass_end);
    assert_eq!(
        &r.files[0][..],
        [[b'A'; 4096], [b'B'; 4096], [0; 4096], [b'D'; 4096]].concat()
    );
}

/// The background flusher (WB_SYNC_NONE) looks folios up by the DIRTY tag a batch at a time
/// (`write_cache_pages` -> `filemap_get_folios_tag`, v6.6): a lookup that returns less than a
/// full batch moves the pass's index past the end of its range, so a folio dirtied after it is
/// left to the next pass; after a full batch, the next lookup reads the tags again and finds
/// it. Folio 0 is dirty; the flusher looks up and writes it, then a write dirties folio 3.
#[test]
fn the_flusher_sees_a_folio_dirtied_mid_pass_only_after_a_full_batch() {
    let w = Workload {
        files: 1,
        phases: vec![
            vec![Op::Truncate {
                file: 0,
                size: 4 * K,
            }],
            vec![write(0, b'A')],
            vec![write(3, b'D')],
        ],
    };
    let script = vec![
        Until {
            task: TASK_FLUSHER,
            label: YieldPoint::WbSubmit,
            arg: Some(0),
        },
        Until {
            task: FIRST_OP_TASK + 2,
            label: YieldPoint::WriteDone,
            arg: None,
        },
        Until {
            task: TASK_FLUSHER,
            label: YieldPoint::WbPassEnd,
            arg: None,
        },
    ];
    let first_pass = |batch: usize| {
        let cfg = Config {
            cache_limit_folios: 64,
            wb_batch_folios: batch,
            ..Config::default()
        };
        let r = run_script(&cfg, &w, script.clone());
        let end = r
            .trace
            .iter()
            .position(|s| s.task == TASK_FLUSHER as u32 && s.label == YieldPoint::WbPassEnd)
            .expect("the pass ended");
        written_by(&r.trace[..end], TASK_FLUSHER)
    };
    assert_eq!(Config::default().wb_batch_folios, PAGEVEC_SIZE_FOLIOS);
    assert_eq!(
        first_pass(PAGEVEC_SIZE_FOLIOS),
        [0],
        "a short batch ends the pass"
    );
    assert_eq!(first_pass(1), [0, 3], "a full batch looks up again");
}

/// A WB_SYNC_ALL pass (fsync) first tags every dirty folio TOWRITE
/// (`tag_pages_for_writeback`) and then looks up only that tag (`write_cache_pages`, v6.6),
/// so a folio dirtied after the pass started is not its business (no livelock behind a
/// steady writer). fsync writes folio 0; meanwhile a write dirties folio 3, which fsync leaves
/// alone even though its next lookup comes after that write. (A batch of one folio makes
/// that next lookup happen: with a full `PAGEVEC_SIZE` the first lookup would come back short
/// and end the pass whatever the tag.)
#[test]
fn fsync_writes_only_what_was_dirty_when_it_started() {
    let w = Workload {
        files: 1,
        phases: vec![
            vec![Op::Truncate {
                file: 0,
                size: 4 * K,
            }],
            vec![write(0, b'A')],
            vec![Op::Fsync { file: 0 }, write(3, b'D')],
        ],
    };
    let (fsync, writer) = (FIRST_OP_TASK + 2, FIRST_OP_TASK + 3);
    let script = vec![
        Until {
            task: fsync,
            label: YieldPoint::WbMapBlocks,
            arg: Some(0),
        },
        Until {
            task: writer,
            label: YieldPoint::WriteDone,
            arg: None,
        },
        Until {
            task: fsync,
            label: YieldPoint::FsyncFlush,
            arg: None,
        },
    ];
    let cfg = Config {
        cache_limit_folios: 64,
        wb_batch_folios: 1,
        ..Config::default()
    };
    let r = run_script(&cfg, &w, script);
    assert_eq!(written_by(&r.trace, fsync), [0]);
    assert_eq!(&r.files[0][3 * K as usize..], [b'D'; 4096]);
}
