//! The two switches an NBD export of fs-core turns on: `balance_dirty_pages` (a dirty limit
//! that makes writers wait for writeback) and IO completion per ioend (a contiguous run
//! completes in three steps, not three per block). Both are off in campaigns and bundles;
//! with them on, the model must stay as correct as without.

use fs_core::block::MemDevice;
use fs_core::engine::{Call, Engine};
use fs_core::oracle::Oracle;
use fs_core::sched::{RandomPolicy, FIRST_OP_TASK};
use fs_core::{Config, Fs, Op, TaskId, Workload};

const BLOCK: usize = 4096;

fn engine(cfg: &Config, seed: u64) -> Engine {
    let fs = Fs::new(cfg.clone(), Box::new(MemDevice::new(cfg.device_blocks)), 1);
    Engine::new(fs, Oracle::new(1), Box::new(RandomPolicy::new(seed)))
}

fn cfg(dirty_limit: usize, per_ioend: bool, folio_blocks: u64) -> Config {
    Config {
        cache_limit_folios: 64,
        device_blocks: 8192,
        dirty_limit_folios: dirty_limit,
        complete_per_ioend: per_ioend,
        folio_blocks,
        ..Config::default()
    }
}

/// Folios dirty plus folios under writeback, counted from the page cache itself (what
/// `dirty_or_writeback_folios` keeps count of as they change).
fn recount(fs: &Fs) -> usize {
    let folios = fs.inode(0).cache.folios.values();
    folios
        .map(|f| usize::from(f.dirty) + usize::from(f.writeback))
        .sum()
}

fn write(e: &mut Engine, offset: u64, data: Vec<u8>) -> TaskId {
    e.submit(Call::Write {
        ino: 0,
        offset,
        data,
    })
    .unwrap()
}

/// Runs one step of the first runnable task `prefer` accepts, else of the first runnable
/// task; false when none can run.
fn step_preferring(e: &mut Engine, prefer: impl Fn(TaskId) -> bool) -> bool {
    let runnable = e.runnable();
    let Some(&t) = runnable.iter().find(|&&t| prefer(t)).or(runnable.first()) else {
        return false;
    };
    e.step_task(t).unwrap();
    true
}

/// A call's task first, whenever one can run.
fn is_call(t: TaskId) -> bool {
    t >= FIRST_OP_TASK
}

/// Steps until idle, a call's task whenever one can run (writers as fast as they may go,
/// writeback only when they wait): returns the most folios dirty or under writeback seen.
fn drain_calls_first(e: &mut Engine) -> usize {
    let mut most = 0;
    while step_preferring(e, is_call) {
        most = most.max(e.fs().dirty_or_writeback_folios());
        assert_eq!(e.fs().dirty_or_writeback_folios(), recount(e.fs()));
    }
    most
}

/// Six writers of 96 KiB each (unaligned, two overlapping), stepped to the end (by the seeded
/// policy, or calls first); returns the most folios seen dirty or under writeback after any
/// step, and the file read back.
fn six_writers(cfg: &Config, seed: u64, calls_first: bool) -> (usize, Vec<u8>) {
    let mut e = engine(cfg, seed);
    for i in 0..6u64 {
        let offset = if i == 5 { 100_000 } else { i * 96 * 1024 + 7 };
        write(&mut e, offset, vec![b'a' + i as u8; 96 * 1024]);
    }
    let mut most = 0;
    if calls_first {
        most = drain_calls_first(&mut e);
    }
    while e.step().unwrap().is_some() {
        most = most.max(e.fs().dirty_or_writeback_folios());
        assert_eq!(
            e.fs().dirty_or_writeback_folios(),
            recount(e.fs()),
            "seed {seed}"
        );
    }
    assert!(e.failures().is_empty(), "seed {seed}: {:?}", e.failures());
    let r = e
        .submit(Call::Read {
            ino: 0,
            offset: 0,
            len: 6 * 96 * 1024 + 7,
        })
        .unwrap();
    while e.step().unwrap().is_some() {}
    let done = e.take_done();
    let data = done
        .iter()
        .find(|d| d.task == r)
        .unwrap()
        .data
        .clone()
        .unwrap();
    (most, data)
}

/// What the six writers leave, whatever the order of the overlapping two.
fn check_contents(data: &[u8], seed: u64) {
    assert_eq!(data[..7], [0; 7], "seed {seed}");
    for i in 0..5usize {
        let (lo, hi) = (i * 96 * 1024 + 7, (i + 1) * 96 * 1024 + 7);
        for (at, &b) in data[lo..hi].iter().enumerate() {
            let at = lo + at;
            let in_sixth = (100_000..100_000 + 96 * 1024).contains(&at);
            let ok = b == b'a' + i as u8 || (in_sixth && b == b'f');
            assert!(ok, "seed {seed}: byte {at} is {b}");
        }
    }
}

#[test]
fn a_dirty_limit_bounds_the_dirty_folios_and_every_write_completes() {
    let writers = 6;
    let limit = 8;
    for seed in 0..40 {
        for (folio_blocks, calls_first) in [(1, false), (4, false), (1, true), (4, true)] {
            let c = cfg(limit, false, folio_blocks);
            let (most, data) = six_writers(&c, seed, calls_first);
            // Each writer checks the limit before its next folio: at most one folio each
            // past it.
            assert!(
                most <= limit + writers,
                "seed {seed}: {most} dirty or writeback"
            );
            check_contents(&data, seed);
        }
    }
    // Without the limit, writers that run first dirty every folio they write (so the bound
    // above is the limit's doing).
    let (most, _) = six_writers(&cfg(0, false, 1), 0, true);
    assert!(most > 100, "without a limit at most {most}");
}

#[test]
fn ioend_completion_keeps_every_byte_and_completes_runs_whole() {
    for seed in 0..40 {
        for folio_blocks in [1, 16] {
            let (_, data) = six_writers(&cfg(16, true, folio_blocks), seed, seed % 2 == 0);
            check_contents(&data, seed);
        }
    }
    // One 64 KiB write, then fsync: per ioend, one IO end of 16 blocks; per block, 16.
    for (per_ioend, want) in [(true, vec![16]), (false, vec![1; 16])] {
        let mut e = engine(&cfg(0, per_ioend, 1), 3);
        let w = write(&mut e, 0, vec![7; 16 * BLOCK]);
        while e.take_done().is_empty() {
            e.step_task(w).unwrap();
        }
        e.submit(Call::Fsync { ino: 0 }).unwrap();
        let (mut seen, mut last_front) = (Vec::new(), None);
        // The fsync's pass first, so that the flusher does not split the run.
        while step_preferring(&mut e, is_call) {
            let front = e.fs().ioends.front().map(|io| (io.fblock, io.count));
            if front != last_front {
                seen.extend(front.map(|(_, n)| n));
                last_front = front;
            }
        }
        assert_eq!(seen, want, "per ioend: {per_ioend}");
        assert!(e.failures().is_empty());
        e.fs_mut().drop_caches();
        assert_eq!(e.fs_mut().read_from_disk(0).unwrap(), vec![7; 16 * BLOCK]);
    }
}

#[test]
fn the_fixed_model_passes_random_schedules_with_both_switches() {
    let w = workload();
    for seed in 0..200 {
        let c = Config {
            dirty_limit_folios: 2,
            complete_per_ioend: true,
            ..Config::default()
        };
        let r = fs_core::run(&c, &w, &mut RandomPolicy::new(seed));
        assert!(r.passed(), "seed {seed}: {:?}", r.failures);
    }
}

/// Writes, a punch, an overwrite and fsyncs over one file, racing.
fn workload() -> Workload {
    let write = |offset, len, byte| Op::Write {
        file: 0,
        offset,
        len,
        byte,
    };
    Workload {
        files: 1,
        phases: vec![
            vec![
                write(0, 20_000, b'A'),
                write(9000, 9000, b'B'),
                Op::Fsync { file: 0 },
            ],
            vec![
                Op::PunchHole {
                    file: 0,
                    offset: 4096,
                    len: 4096,
                },
                write(3000, 7000, b'C'),
                Op::Read {
                    file: 0,
                    offset: 0,
                    len: 24_000,
                },
                Op::Fsync { file: 0 },
            ],
        ],
    }
}

/// Writeback never has more block writes in flight than the device's queue takes (it waits
/// instead), so a read or a journal commit always finds room: before the bound, a flusher
/// that ran ahead of IO completion filled the queue, the device refused the next write, and
/// reads failed with EIO (found with fio against a 256 MiB export of 64 KiB folios).
///
/// With a lookup batch of one folio, every folio of a background pass after its first is
/// found by the lookup `runnable` makes (not from a batch), which must wait for room too.
#[test]
fn writeback_waits_for_room_in_the_device_queue() {
    for batch in [fs_core::writeback::PAGEVEC_SIZE_FOLIOS, 1] {
        let c = Config {
            cache_limit_folios: 64,
            device_blocks: 32_768,
            folio_blocks: 16,
            wb_batch_folios: batch,
            ..Config::default()
        };
        waits_for_room(&c);
    }
}

fn waits_for_room(c: &Config) {
    use fs_core::sched::TASK_IO_COMPLETION;
    use fs_core::writeback::WB_BLOCKS_IN_FLIGHT_MAX;
    let mut e = engine(c, 1);
    // 5,120 blocks: more than the device's queue holds.
    const CHUNKS: u8 = 5;
    let chunk = 4 << 20;
    for i in 0..CHUNKS {
        write(&mut e, u64::from(i) * chunk as u64, vec![i + 1; chunk]);
    }
    // IO completion only when nothing else can run: writeback runs as far ahead as it may.
    let mut most = 0;
    let mut read = None;
    // Bounded: a flusher refused by the device would otherwise retry forever.
    for _ in 0..1_000_000 {
        if !step_preferring(&mut e, |t| t != TASK_IO_COMPLETION) {
            break;
        }
        most = most.max(e.fs().wb_blocks_in_flight());
        if read.is_none() && most >= WB_BLOCKS_IN_FLIGHT_MAX - 16 {
            let len = u64::from(CHUNKS) * chunk as u64;
            read = Some(
                e.submit(Call::Read {
                    ino: 0,
                    offset: 0,
                    len,
                })
                .unwrap(),
            );
        }
    }
    assert!(e.failures().is_empty(), "{:?}", e.failures());
    assert!(e.fs().violations.is_empty(), "{:?}", e.fs().violations);
    assert!(
        most <= WB_BLOCKS_IN_FLIGHT_MAX,
        "{most} block writes in flight"
    );
    let read = read.expect("writeback reached the bound");
    let done = e.take_done();
    let data = done.iter().find(|d| d.task == read).unwrap();
    let data = data.data.as_ref().expect("the read succeeded");
    for (i, part) in data.chunks(chunk).enumerate() {
        assert!(part.iter().all(|&b| b == i as u8 + 1), "chunk {i}");
    }
    // Writeback finished: nothing dirty or in flight, and every byte on the disk.
    assert_eq!(e.fs().dirty_or_writeback_folios(), 0);
    assert_eq!(e.fs().wb_blocks_in_flight(), 0);
    e.fs_mut().drop_caches();
    let disk = e.fs_mut().read_from_disk(0).unwrap();
    assert_eq!(disk.len(), usize::from(CHUNKS) * chunk);
    for (i, part) in disk.chunks(chunk).enumerate() {
        assert!(part.iter().all(|&b| b == i as u8 + 1), "chunk {i} on disk");
    }
}

/// `reclaim_throttle`: eight readers of 128 KiB each, stepped reads first (readers as fast as
/// they may go, reclaim only when they wait), over a cache of 16 folios. With the switch the
/// cache never holds more than twice its limit plus the folio being made; without it the
/// readers run it to the whole file. Same bytes either way, with 4 KiB and write-sized folios.
#[test]
fn reads_wait_for_reclaim_past_twice_the_cache_limit() {
    for (most_blocks, throttle) in [(0, true), (8, true), (0, false), (8, false)] {
        let c = Config {
            cache_limit_folios: 16,
            max_folio_blocks: most_blocks,
            reclaim_throttle: throttle,
            ..cfg(0, true, 1)
        };
        let mut e = engine(&c, 3);
        let file: Vec<u8> = (0..256 * BLOCK)
            .map(|i| (i / BLOCK) as u8 ^ i as u8)
            .collect();
        write(&mut e, 0, file.clone());
        e.submit(Call::Fsync { ino: 0 }).unwrap();
        while e.step().unwrap().is_some() {}
        e.fs_mut().drop_caches();
        let readers: Vec<TaskId> = (0..8u64)
            .map(|i| {
                let (offset, len) = (i * 32 * BLOCK as u64, 32 * BLOCK as u64);
                e.submit(Call::Read {
                    ino: 0,
                    offset,
                    len,
                })
                .unwrap()
            })
            .collect();
        let mut most = 0;
        while step_preferring(&mut e, is_call) {
            most = most.max(e.fs().folio_count());
        }
        let bound = 2 * 16 + most_blocks.max(1) as usize;
        if throttle {
            assert!(most <= bound, "{most_blocks}: {most} folios cached");
        } else {
            assert!(most > bound, "{most_blocks}: unthrottled, only {most}");
        }
        let done = e.take_done();
        for (i, t) in readers.iter().enumerate() {
            let d = done.iter().find(|d| d.task == *t).expect("read done");
            let want = &file[i * 32 * BLOCK..(i + 1) * 32 * BLOCK];
            assert_eq!(d.data.as_deref(), Some(want), "reader {i}");
        }
        assert!(e.failures().is_empty(), "{:?}", e.failures());
    }
}
