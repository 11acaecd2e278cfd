//! Zero range as the filesystems implement it: XFS punches the range and preallocates it
//! unwritten on new blocks (`xfs_file_fallocate` with `FALLOC_FL_ZERO_RANGE`, v6.6), which is
//! an extent change writeback's cached mapping must notice; gfs2 does not support it.

use fs_core::block::MemDevice;
use fs_core::engine::{Call, Engine};
use fs_core::extent::ExtentState;
use fs_core::oracle::Oracle;
use fs_core::sched::RandomPolicy;
use fs_core::{AllocMode, Config, Fs, FsError, Gfs2};

const K: u64 = 4096;

fn run(cfg: Config, calls: Vec<Call>) -> (Engine, Vec<Result<u64, FsError>>) {
    let fs = Fs::new(cfg.clone(), Box::new(MemDevice::new(cfg.device_blocks)), 1);
    let mut e = Engine::new(fs, Oracle::new(1), Box::new(RandomPolicy::new(1)));
    let mut results = Vec::new();
    for c in calls {
        e.submit(c).unwrap();
        while e.step().unwrap().is_some() {}
        results.extend(e.take_done().into_iter().map(|d| d.result));
    }
    assert!(e.failures().is_empty(), "{:?}", e.failures());
    (e, results)
}

/// A written block, a block written since (delalloc or written by the flusher by then) and a
/// hole, zeroed: all three become unwritten (the old blocks are freed first, then the range
/// preallocated; an in-place conversion would have left the hole a hole).
#[test]
fn xfs_zero_range_punches_and_preallocates_unwritten() {
    let calls = vec![
        Call::Write {
            ino: 0,
            offset: 0,
            data: vec![b'A'; K as usize],
        },
        Call::Fsync { ino: 0 },
        Call::Write {
            ino: 0,
            offset: K,
            data: vec![b'B'; K as usize],
        },
        Call::Truncate {
            ino: 0,
            size: 3 * K,
        },
    ];
    let (mut e, _) = run(Config::default(), calls);
    assert_eq!(e.fs().inode(0).extents.get(0).state, ExtentState::Written);
    assert_eq!(e.fs().inode(0).extents.get(2).state, ExtentState::Hole);
    e.submit(Call::ZeroRange {
        ino: 0,
        offset: 0,
        len: 3 * K,
    })
    .unwrap();
    while e.step().unwrap().is_some() {}
    assert_eq!(e.take_done()[0].result, Ok(0));
    let ext: Vec<_> = (0..3).map(|b| e.fs().inode(0).extents.get(b)).collect();
    assert!(
        ext.iter().all(|x| x.state == ExtentState::Unwritten),
        "{ext:?}"
    );
    e.fs_mut().drop_caches();
    assert_eq!(
        e.fs_mut().read_from_disk(0).unwrap(),
        vec![0; 3 * K as usize]
    );
}

/// `gfs2_fallocate` accepts only FALLOC_FL_PUNCH_HOLE and FALLOC_FL_KEEP_SIZE.
#[test]
fn gfs2_has_no_zero_range() {
    let cfg = Config {
        alloc: AllocMode::AtWrite,
        iomap_valid: false,
        wb_seq_check: false,
        gfs2: Gfs2::ALL,
        ..Config::default()
    };
    let calls = vec![
        Call::Write {
            ino: 0,
            offset: 0,
            data: vec![b'A'; K as usize],
        },
        Call::ZeroRange {
            ino: 0,
            offset: 0,
            len: K,
        },
    ];
    let (mut e, results) = run(cfg, calls);
    assert!(
        matches!(results[1], Err(FsError::Unsupported(_))),
        "{results:?}"
    );
    e.fs_mut().drop_caches();
    assert_eq!(
        e.fs_mut().read_from_disk(0).unwrap(),
        vec![b'A'; K as usize]
    );
}
