//! Large folios with blocks smaller than the folio (`Config::folio_blocks`), as XFS has had in
//! its buffered write path since about v6.6: per-block uptodate and dirty bits (`struct
//! iomap_folio_state`), `__iomap_write_begin` filling only the blocks a write touches,
//! `iomap_writepage_map` writing only dirty blocks, `iomap_write_delalloc_ifs_punch`, and
//! `truncate_inode_partial_folio`. Each test says which kernel function it mirrors.

use fs_core::block::MemDevice;
use fs_core::engine::{Call, Engine};
use fs_core::extent::ExtentState;
use fs_core::oracle::Oracle;
use fs_core::sched::{Directive::*, RandomPolicy, FIRST_OP_TASK, TASK_IO_COMPLETION};
use fs_core::{Config, Fs, FsError, Op, PunchMode, Workload};

#[allow(dead_code)]
mod common;
use common::run_script;

const K: u64 = 4096;
const KU: usize = 4096;

/// 16 KiB folios of four 4 KiB blocks, and a page cache that never reclaims in these tests.
fn cfg4() -> Config {
    Config {
        folio_blocks: 4,
        cache_limit_folios: 64,
        ..Config::default()
    }
}

fn engine(cfg: Config) -> Engine {
    let dev = MemDevice::new(cfg.device_blocks);
    engine_on(cfg, Box::new(dev))
}

fn engine_on(cfg: Config, dev: Box<dyn fs_core::block::BlockDevice>) -> Engine {
    let fs = Fs::new(cfg, dev, 1);
    Engine::new(fs, Oracle::new(1), Box::new(RandomPolicy::new(7)))
}

/// Runs `call` to its end with whatever else the policy picks (the flusher, IO completion).
fn settle(e: &mut Engine, call: Call) -> (Result<u64, FsError>, Option<Vec<u8>>) {
    let t = e.submit(call).unwrap();
    loop {
        if let Some(d) = e.take_done().into_iter().find(|d| d.task == t) {
            assert!(e.failures().is_empty(), "{:?}", e.failures());
            return (d.result, d.data);
        }
        e.step().unwrap().expect("the call is still in flight");
    }
}

/// Steps one call may take in these tests, at most: past it the call is stuck in a loop.
const CALL_STEPS_MAX: usize = 100_000;

/// Runs `call` stepping only its own task, so the page cache shows what it alone did.
fn alone(e: &mut Engine, call: Call) -> Result<u64, FsError> {
    let t = e.submit(call).unwrap();
    for _ in 0..CALL_STEPS_MAX {
        if let Some(d) = e.take_done().into_iter().find(|d| d.task == t) {
            return d.result;
        }
        e.step_task(t).unwrap();
    }
    panic!("the call did not end in {CALL_STEPS_MAX} steps");
}

fn read(offset: u64, len: u64) -> Call {
    Call::Read {
        ino: 0,
        offset,
        len,
    }
}

fn write(offset: u64, len: usize, byte: u8) -> Call {
    Call::Write {
        ino: 0,
        offset,
        data: vec![byte; len],
    }
}

fn bits(e: &Engine, idx: u64) -> (Vec<bool>, Vec<bool>) {
    let f = e.fs().inode(0).cache.get(idx).expect("cached");
    (
        (0..f.blocks()).map(|i| f.block_uptodate(i)).collect(),
        (0..f.blocks()).map(|i| f.block_dirty(i)).collect(),
    )
}

/// `__iomap_write_begin` with `iomap_adjust_read_range` (v6.6): a 100-byte write into block 1
/// of a folio that is not in the cache reads that block alone from disk; blocks 0, 2 and 3
/// stay not uptodate and clean. A read then fills them (`iomap_readpage_iter` reads only the
/// blocks that are not uptodate) without touching the written block, which stays the only
/// dirty one.
#[test]
fn a_write_reads_only_the_block_it_covers_in_part() {
    let mut e = engine(cfg4());
    settle(&mut e, write(0, 4 * KU, b'A')).0.unwrap();
    settle(&mut e, Call::Fsync { ino: 0 }).0.unwrap();
    e.fs_mut().drop_caches();
    assert_eq!(alone(&mut e, write(K + 10, 100, b'B')), Ok(100));
    let (up, dirty) = bits(&e, 0);
    assert_eq!(up, [false, true, false, false]);
    assert_eq!(dirty, [false, true, false, false]);
    let f = e.fs().inode(0).cache.get(0).unwrap();
    assert!(!f.uptodate());
    let mut want = vec![b'A'; 4 * KU];
    want[KU + 10..KU + 110].fill(b'B');
    assert_eq!(
        f.data[KU..2 * KU],
        want[KU..2 * KU],
        "block 1 read, then written"
    );
    let (r, data) = settle(&mut e, read(0, 4 * K));
    assert_eq!(r, Ok(4 * K));
    assert_eq!(data.unwrap(), want);
    let (up, dirty) = bits(&e, 0);
    assert_eq!(up, [true; 4]);
    assert_eq!(dirty, [false, true, false, false]);
}

/// `__iomap_write_begin` over written blocks: a write from inside block 0 to inside block 1
/// of a folio that is not in the cache reads the run of both blocks from disk (one run, as
/// `iomap_adjust_read_range` gives it), so the bytes around the write survive.
#[test]
fn a_write_across_two_blocks_reads_both_from_disk() {
    let mut e = engine(cfg4());
    settle(&mut e, write(0, 4 * KU, b'A')).0.unwrap();
    settle(&mut e, Call::Fsync { ino: 0 }).0.unwrap();
    e.fs_mut().drop_caches();
    assert_eq!(alone(&mut e, write(100, KU, b'B')), Ok(K));
    let (up, dirty) = bits(&e, 0);
    assert_eq!(up, [true, true, false, false]);
    assert_eq!(dirty, [true, true, false, false]);
    let mut want = vec![b'A'; 4 * KU];
    want[100..KU + 100].fill(b'B');
    let f = e.fs().inode(0).cache.get(0).unwrap();
    assert_eq!(
        f.data[..2 * KU],
        want[..2 * KU],
        "blocks 0 and 1 read, then written"
    );
    let (r, data) = settle(&mut e, read(0, 4 * K));
    assert_eq!(r, Ok(4 * K));
    assert_eq!(data.unwrap(), want);
}

/// `__iomap_write_begin` over a NEW (delalloc) mapping: the run of blocks the write touches
/// is zeroed outside the write, blocks it does not touch are left alone.
#[test]
fn a_write_over_a_hole_zeroes_the_edges_of_the_blocks_it_touches() {
    let mut e = engine(cfg4());
    assert_eq!(alone(&mut e, write(K + 10, 2 * KU, b'W')), Ok(2 * K));
    let (up, dirty) = bits(&e, 0);
    assert_eq!(up, [false, true, true, true]);
    assert_eq!(dirty, [false, true, true, true]);
    let f = e.fs().inode(0).cache.get(0).unwrap();
    assert!(f.data[KU..KU + 10].iter().all(|&b| b == 0));
    assert!(f.data[KU + 10..3 * KU + 10].iter().all(|&b| b == b'W'));
    assert!(f.data[3 * KU + 10..].iter().all(|&b| b == 0));
    let ext = |b| e.fs().inode(0).extents.get(b).state;
    assert_eq!(ext(0), ExtentState::Hole);
    assert_eq!(ext(1), ExtentState::Delalloc);
}

/// `iomap_writepage_map` (v6.6, per-block dirty tracking): only the dirty blocks of a folio
/// are mapped and written, each its own IO here; `iomap_finish_folio_write` ends the folio's
/// writeback only when the last of them completes.
#[test]
fn writeback_writes_the_dirty_blocks_and_ends_with_the_last() {
    let mut e = engine(cfg4());
    settle(&mut e, write(0, 4 * KU, b'A')).0.unwrap();
    settle(&mut e, Call::Fsync { ino: 0 }).0.unwrap();
    alone(&mut e, write(0, 10, b'C')).unwrap();
    alone(&mut e, write(2 * K, 10, b'D')).unwrap();
    let t = e.submit(Call::Fsync { ino: 0 }).unwrap();
    while e.runnable().contains(&t) && e.fs().ioends.len() < 2 {
        e.step_task(t).unwrap();
    }
    let blocks: Vec<u64> = e.fs().ioends.iter().map(|io| io.fblock).collect();
    assert_eq!(blocks, [0, 2], "the clean blocks 1 and 3 are not written");
    let f = e.fs().inode(0).cache.get(0).unwrap();
    assert!(f.writeback && !f.dirty && f.wb_pending == 2);
    while e.fs().ioends.len() == 2 {
        e.step_task(TASK_IO_COMPLETION).unwrap();
    }
    assert!(
        e.fs().inode(0).cache.get(0).unwrap().writeback,
        "one block's IO is still pending"
    );
    while !e.fs().ioends.is_empty() {
        e.step_task(TASK_IO_COMPLETION).unwrap();
    }
    assert!(!e.fs().inode(0).cache.get(0).unwrap().writeback);
    while e.runnable().contains(&t) {
        e.step_task(t).unwrap();
    }
    assert_eq!(e.take_done()[0].result, Ok(0));
}

/// `iomap_write_delalloc_ifs_punch` (v6.6): a write whose buffer faults at once leaves the
/// delalloc it reserved over blocks 1-3 of a folio whose block 0 is dirty; the fixed punch
/// keeps block 0's reservation and punches the clean blocks (before per-block dirty
/// tracking, a dirty folio kept all of them, and they leaked: DELALLOC with nothing dirty
/// over it, which the quiescent check reports).
#[test]
fn the_fixed_punch_punches_the_clean_blocks_of_a_dirty_folio() {
    for punch in [PunchMode::Fixed, PunchMode::Old] {
        let cfg = Config { punch, ..cfg4() };
        let w = Workload {
            files: 1,
            phases: vec![
                vec![Op::Truncate {
                    file: 0,
                    size: 4 * K,
                }],
                vec![Op::Write {
                    file: 0,
                    offset: 0,
                    len: 10,
                    byte: b'X',
                }],
                vec![Op::Write {
                    file: 0,
                    offset: K,
                    len: 3 * K,
                    byte: b'W',
                }],
            ],
        };
        let wr = FIRST_OP_TASK + 2;
        let script = vec![
            Until {
                task: FIRST_OP_TASK + 1,
                label: fs_core::YieldPoint::WriteDone,
                arg: None,
            },
            ShortCopy { task: wr, bytes: 0 },
            Drain { task: wr },
        ];
        let r = run_script(&cfg, &w, script);
        assert!(r.passed(), "{punch:?}: {:?}", r.failures);
        assert_eq!(r.results[2], Some(Err(FsError::Fault)), "{punch:?}");
        let mut want = vec![0; 4 * KU];
        want[..10].fill(b'X');
        assert_eq!(r.files[0], want, "{punch:?}");
    }
}

/// `iomap_page_mkwrite` dirties every block of the folio (`iomap_dirty_folio`), past EOF too;
/// a truncate up then brings a dirty block over a hole below EOF, which holds only zeros.
/// `iomap_writepage_map` skips HOLE blocks: nothing is lost, and no invariant may say so.
#[test]
fn mkwrite_dirties_the_whole_folio_and_writeback_skips_its_holes() {
    let w = Workload {
        files: 1,
        phases: vec![
            vec![Op::Write {
                file: 0,
                offset: 0,
                len: 3 * K,
                byte: b'A',
            }],
            vec![Op::MmapStore {
                file: 0,
                offset: 2 * K + 100,
                len: 17,
                byte: b'C',
            }],
            vec![Op::Truncate {
                file: 0,
                size: 4 * K - 5,
            }],
        ],
    };
    let r = run_script(&cfg4(), &w, vec![]);
    assert!(r.passed(), "{:?}", r.failures);
    let mut want = vec![b'A'; 3 * KU];
    want[2 * KU + 100..2 * KU + 117].fill(b'C');
    want.resize(4 * KU - 5, 0);
    assert_eq!(r.files[0], want);
}

/// `xfs_setattr_size` into a large folio: `filemap_write_and_wait_range` cleans the whole
/// folio, `iomap_truncate_page` zeroes the rest of the EOF block and dirties that block
/// alone, and `truncate_inode_partial_folio` keeps the folio with the blocks past EOF zeroed;
/// growing the file again reads zeros there.
#[test]
fn truncate_into_a_large_folio_zeroes_its_tail() {
    let mut e = engine(cfg4());
    settle(&mut e, write(0, 4 * KU, b'A')).0.unwrap();
    settle(&mut e, Call::Fsync { ino: 0 }).0.unwrap();
    // Alone: the flusher, which zeroes past EOF too, does not run.
    alone(&mut e, Call::Truncate { ino: 0, size: 5000 }).unwrap();
    let (_, dirty) = bits(&e, 0);
    assert_eq!(dirty, [false, true, false, false], "only the EOF block");
    let f = e.fs().inode(0).cache.get(0).expect("the folio stays");
    assert!(f.data[5000..].iter().all(|&b| b == 0));
    settle(
        &mut e,
        Call::Truncate {
            ino: 0,
            size: 4 * K,
        },
    )
    .0
    .unwrap();
    let (r, data) = settle(&mut e, read(0, 4 * K));
    assert_eq!(r, Ok(4 * K));
    let mut want = vec![b'A'; 5000];
    want.resize(4 * KU, 0);
    assert_eq!(data.unwrap(), want);
}

/// A folio size the model cannot run is refused with the reason.
#[test]
fn folio_sizes_are_powers_of_two_up_to_the_limit() {
    for (n, ok) in [
        (1, true),
        (4, true),
        (16, true),
        (64, true),
        (256, true),
        (3, false),
        (512, false),
        (0, false),
    ] {
        let cfg = Config {
            folio_blocks: n,
            ..Config::default()
        };
        assert_eq!(cfg.validate().is_ok(), ok, "{n}");
    }
    for (least, most, ok) in [
        (1, 0, true),
        (1, 64, true),
        (4, 4, true),
        (4, 16, true),
        (4, 2, false),
        (1, 24, false),
        (1, 256, true),
        (1, 512, false),
    ] {
        let cfg = Config {
            folio_blocks: least,
            max_folio_blocks: most,
            ..Config::default()
        };
        assert_eq!(cfg.validate().is_ok(), ok, "{least} to {most}");
    }
}

/// A memory device whose reads (or writes) fail while `failing` is set, and which counts the
/// block writes it is given by how their bytes came: lent from a folio or copied.
struct FlakyDevice {
    inner: MemDevice,
    failing: std::rc::Rc<std::cell::Cell<bool>>,
    writes: bool,
    /// (lent, copied) block writes submitted.
    seen: std::rc::Rc<std::cell::Cell<(u32, u32)>>,
}

impl fs_core::block::BlockDevice for FlakyDevice {
    fn block_count(&self) -> u64 {
        self.inner.block_count()
    }
    fn submit(
        &mut self,
        req: fs_core::block::Request,
    ) -> Result<fs_core::block::ReqId, fs_core::block::DeviceError> {
        let write = matches!(req, fs_core::block::Request::Write { .. });
        let read = matches!(req, fs_core::block::Request::Read { .. });
        if self.failing.get() && ((self.writes && write) || (!self.writes && read)) {
            return Err(fs_core::block::DeviceError::Io("request refused".into()));
        }
        if let fs_core::block::Request::Write { data, .. } = &req {
            let (lent, copied) = self.seen.get();
            self.seen.set(match data {
                fs_core::block::BlockData::Shared { .. } => (lent + 1, copied),
                fs_core::block::BlockData::Owned(_) => (lent, copied + 1),
            });
        }
        self.inner.submit(req)
    }
    fn complete(
        &mut self,
        id: fs_core::block::ReqId,
    ) -> Result<fs_core::block::Completion, fs_core::block::DeviceError> {
        self.inner.complete(id)
    }
    fn write_log(&self) -> Option<&[fs_core::block::DeviceRecord]> {
        self.inner.write_log()
    }
}

/// An engine on a [`FlakyDevice`] failing writes (`writes`) or reads, and its switch.
fn flaky_engine(cfg: Config, writes: bool) -> (Engine, std::rc::Rc<std::cell::Cell<bool>>) {
    let (e, failing, _) = probed_engine(cfg, writes);
    (e, failing)
}

/// [`flaky_engine`], with the device's count of lent and copied block writes.
#[allow(clippy::type_complexity)]
fn probed_engine(
    cfg: Config,
    writes: bool,
) -> (
    Engine,
    std::rc::Rc<std::cell::Cell<bool>>,
    std::rc::Rc<std::cell::Cell<(u32, u32)>>,
) {
    let failing = std::rc::Rc::new(std::cell::Cell::new(false));
    let seen = std::rc::Rc::new(std::cell::Cell::new((0, 0)));
    let dev = FlakyDevice {
        inner: MemDevice::new(cfg.device_blocks),
        failing: failing.clone(),
        writes,
        seen: seen.clone(),
    };
    (engine_on(cfg, Box::new(dev)), failing, seen)
}

/// `__iomap_write_begin` cannot read the part of a folio a write does not cover: the write
/// fails with the device's error when it wrote nothing under the mapping, and returns what it
/// wrote before the failing folio otherwise; the file keeps its bytes either way.
#[test]
fn a_write_that_cannot_read_its_folio_fails_or_returns_what_it_wrote() {
    let (mut e, failing) = flaky_engine(Config::default(), false);
    settle(&mut e, write(0, 3 * KU, b'A')).0.unwrap();
    settle(&mut e, Call::Fsync { ino: 0 }).0.unwrap();
    e.fs_mut().drop_caches();
    failing.set(true);
    let r = alone(&mut e, write(100, 100, b'B'));
    assert!(matches!(r, Err(FsError::Device(_))), "{r:?}");
    // Folio 0 covered whole, folio 1 not: the write stops there with folio 0's bytes.
    assert_eq!(alone(&mut e, write(0, KU + 100, b'C')), Ok(K));
    failing.set(false);
    let (r, data) = settle(&mut e, read(0, 3 * K));
    assert_eq!(r, Ok(3 * K));
    let mut want = vec![b'A'; 3 * KU];
    want[..KU].fill(b'C');
    assert_eq!(data.unwrap(), want);
}

/// Writeback whose device writes are refused: the folios it could not write are dirty again
/// (`redirty`), every one of them, and the next fsync writes them all.
#[test]
fn folios_whose_writes_were_refused_are_written_by_the_next_fsync() {
    for cfg in [Config::default(), cfg4()] {
        let blocks = cfg.folio_blocks;
        let (mut e, failing) = flaky_engine(cfg, true);
        assert_eq!(alone(&mut e, write(0, 8 * KU, b'A')), Ok(8 * K));
        failing.set(true);
        let r = alone(&mut e, Call::Fsync { ino: 0 });
        assert!(r.is_err(), "fsync with every write refused: {r:?}");
        failing.set(false);
        settle(&mut e, Call::Fsync { ino: 0 }).0.unwrap();
        e.fs_mut().drop_caches();
        let (r, data) = settle(&mut e, read(0, 8 * K));
        assert_eq!(r, Ok(8 * K));
        assert!(data.unwrap() == vec![b'A'; 8 * KU], "folio_blocks {blocks}");
    }
}

/// `xfs_discard_folio` after `map_blocks` found no space: the delalloc reservation of the rest
/// of the folio goes (its blocks are holes again, their data lost and the fsync failing with
/// ENOSPC), while a block of the folio mapped before it stays mapped and is written.
#[test]
fn writeback_out_of_space_drops_the_rest_of_the_folio_s_delalloc() {
    let mut e = engine(cfg4());
    // Block 0 of folio 1 written and allocated; then every block but one taken by file data.
    settle(&mut e, write(4 * K, KU, b'A')).0.unwrap();
    settle(&mut e, Call::Fsync { ino: 0 }).0.unwrap();
    let filler = e.fs().alloc.free_blocks() - 1;
    let at = 64 * K;
    settle(&mut e, write(at, filler as usize * KU, b'F'))
        .0
        .unwrap();
    settle(&mut e, Call::Fsync { ino: 0 }).0.unwrap();
    assert_eq!(e.fs().alloc.free_blocks(), 1);
    // Folio 1 whole: block 4 mapped, blocks 5..8 delalloc needing three blocks, one free.
    assert_eq!(alone(&mut e, write(4 * K, 4 * KU, b'B')), Ok(4 * K));
    let r = alone(&mut e, Call::Fsync { ino: 0 });
    assert_eq!(r, Err(FsError::NoSpace));
    // Block 4 went out under writeback; its completion leaves nothing dirty or in flight.
    while e.runnable().contains(&TASK_IO_COMPLETION) {
        e.step_task(TASK_IO_COMPLETION).unwrap();
    }
    assert_eq!(e.fs().dirty_or_writeback_folios(), 0);
    let extents = &e.fs().inode(0).extents;
    let states: Vec<ExtentState> = (4..8).map(|b| extents.get(b).state).collect();
    assert!(
        !states.contains(&ExtentState::Delalloc),
        "delalloc left in the failed folio: {states:?}"
    );
    assert_eq!(states[0], ExtentState::Written, "{states:?}");
    // Block 4 reached the disk with the write; the rest of the folio was lost.
    e.fs_mut().drop_caches();
    let (r, data) = settle(&mut e, read(4 * K, K));
    assert_eq!(r, Ok(K));
    assert_eq!(data.unwrap(), vec![b'B'; KU]);
}

/// Write-sized folios: the smallest folio of one block, the largest of `most` blocks, and a
/// page cache of `cache` folios of one block.
fn sized(most: u64, cache: usize) -> Config {
    Config {
        max_folio_blocks: most,
        cache_limit_folios: cache,
        ..Config::default()
    }
}

/// The cached folios of file 0: (index, blocks), in index order.
fn folio_sizes(e: &Engine) -> Vec<(u64, u64)> {
    let cache = &e.fs().inode(0).cache;
    cache.folios.iter().map(|(i, f)| (i, f.blocks())).collect()
}

/// `iomap_get_folio` with `fgf_set_order(len)` (Linux 6.6): a buffered write asks for a folio
/// as large as the bytes it has left (the largest power of two of pages in them), no larger
/// than the largest folio nor than the alignment of its index, and smaller while a cached
/// folio is in its way (`filemap_add_folio` refusing it); `iomap_write_begin` then trims the
/// copy to the folio it got.
#[test]
fn a_write_asks_for_a_folio_as_large_as_what_it_has_left() {
    let mut e = engine(sized(64, 4096));
    assert_eq!(alone(&mut e, write(0, 1 << 20, b'A')), Ok(1 << 20));
    assert_eq!(folio_sizes(&e), [(0, 64), (64, 64), (128, 64), (192, 64)]);

    let mut e = engine(sized(8, 4096));
    assert_eq!(alone(&mut e, write(0, 1 << 20, b'A')), Ok(1 << 20));
    let eights: Vec<(u64, u64)> = (0..32).map(|i| (i * 8, 8)).collect();
    assert_eq!(folio_sizes(&e), eights, "no larger than the largest folio");

    let mut e = engine(sized(64, 16));
    alone(&mut e, write(0, 256 * KU, b'A')).unwrap();
    assert!(
        e.fs()
            .inode(0)
            .cache
            .folios
            .values()
            .all(|f| f.blocks() <= 16),
        "no larger than the page cache: {:?}",
        folio_sizes(&e)
    );

    // 12 KiB from block 1: order 1 asked, cut to order 0 at the odd index; then the 8 KiB
    // left from block 2 take a folio of two blocks.
    let mut e = engine(sized(64, 4096));
    alone(&mut e, write(K, 3 * KU, b'B')).unwrap();
    assert_eq!(folio_sizes(&e), [(1, 1), (2, 2)]);
    // A write of 5 KiB asks for order 0 (ilog2 of its length): one block, then the rest.
    alone(&mut e, write(16 * K, 5 * 1024, b'C')).unwrap();
    assert_eq!(folio_sizes(&e)[2..], [(16, 1), (17, 1)]);

    // A cached folio at block 3 is in the way of a 16 KiB write at 0: two blocks at 0, one
    // at 2 (two would cover block 3), then the cached one.
    let mut e = engine(sized(64, 4096));
    alone(&mut e, write(3 * K, 1, b'C')).unwrap();
    alone(&mut e, write(0, 4 * KU, b'D')).unwrap();
    assert_eq!(folio_sizes(&e), [(0, 2), (2, 1), (3, 1)]);
    let (r, data) = settle(&mut e, read(0, 4 * K));
    assert_eq!((r, data.unwrap()), (Ok(4 * K), vec![b'D'; 4 * KU]));
}

/// A write, a read, a store and a punch inside a large folio use that folio wherever in it
/// they start: its own first block and size place every byte and every per-block bit.
#[test]
fn io_inside_a_large_folio_lands_in_its_blocks() {
    let mut e = engine(sized(64, 4096));
    alone(&mut e, write(0, 64 * KU, b'A')).unwrap();
    settle(&mut e, Call::Fsync { ino: 0 }).0.unwrap();
    assert_eq!(folio_sizes(&e), [(0, 64)]);
    assert_eq!(alone(&mut e, write(37 * K + 5, 10, b'B')), Ok(10));
    assert_eq!(
        folio_sizes(&e),
        [(0, 64)],
        "the write used the folio over it"
    );
    let (_, dirty) = bits(&e, 0);
    let dirty_blocks: Vec<usize> = (0..64).filter(|&i| dirty[i]).collect();
    assert_eq!(dirty_blocks, [37], "only the block written is dirty");
    let (r, data) = settle(&mut e, read(37 * K, K));
    assert_eq!(r, Ok(K));
    let mut want = vec![b'A'; KU];
    want[5..15].fill(b'B');
    assert_eq!(data.unwrap(), want);
    settle(
        &mut e,
        Call::Punch {
            ino: 0,
            offset: 8 * K,
            len: 4 * K,
        },
    )
    .0
    .unwrap();
    assert_eq!(
        folio_sizes(&e),
        [(0, 64)],
        "a punch in part zeroes, keeps it"
    );
    let (_, data) = settle(&mut e, read(0, 64 * K));
    let data = data.unwrap();
    assert!(data[8 * KU..12 * KU].iter().all(|&b| b == 0));
    assert!(data[..8 * KU].iter().all(|&b| b == b'A'));
    settle(&mut e, Call::Fsync { ino: 0 }).0.unwrap();
    e.fs_mut().drop_caches();
    let (_, again) = settle(&mut e, read(0, 64 * K));
    assert_eq!(again.unwrap(), data, "the disk holds what the folio held");
    assert_eq!(folio_sizes(&e), [(0, 64)], "a read asks for its length too");
}

/// The page-cache and dirty limits count a large folio as the smallest folios it spans, as
/// the kernel counts pages: 256 KiB of dirty data is 64, whatever the folios' sizes.
#[test]
fn limits_count_a_large_folio_as_the_blocks_it_holds() {
    let mut e = engine(sized(64, 4096));
    alone(&mut e, write(0, 256 * KU, b'A')).unwrap();
    assert_eq!(e.fs().folio_count(), 256);
    assert_eq!(e.fs().dirty_or_writeback_folios(), 256);
    settle(&mut e, Call::Fsync { ino: 0 }).0.unwrap();
    assert_eq!(e.fs().dirty_or_writeback_folios(), 0);
    e.fs_mut().drop_caches();
    assert_eq!(e.fs().folio_count(), 0);
}

/// Steps `t` alone until the probe has seen `n` block writes or `t` cannot go on by itself.
fn step_until_submitted(e: &mut Engine, t: usize, seen: &std::cell::Cell<(u32, u32)>, n: u32) {
    for _ in 0..CALL_STEPS_MAX {
        let (lent, copied) = seen.get();
        if lent + copied >= n || !e.runnable().contains(&t) {
            return;
        }
        e.step_task(t).unwrap();
    }
}

/// Writeback of a folio whose every block is dirty lends the folio's memory to its block
/// writes (a bio points at the page) instead of copying each block out; a write into the folio
/// while they are in flight changes the folio, not what they write: the device gets the bytes
/// the folio held when they were submitted, and the next fsync writes the new ones. A folio
/// with some blocks dirty copies the blocks it writes.
#[test]
fn whole_folio_writeback_lends_the_folio_and_writes_what_it_held() {
    let cfg = Config {
        max_folio_blocks: 16,
        cache_limit_folios: 64,
        ..Config::default()
    };
    let (mut e, _, seen) = probed_engine(cfg, true);
    assert_eq!(alone(&mut e, write(0, 16 * KU, b'A')), Ok(16 * K));
    assert_eq!(e.fs().folio_len(0, 0), 16);
    let fsync = e.submit(Call::Fsync { ino: 0 }).unwrap();
    step_until_submitted(&mut e, fsync, &seen, 16);
    assert_eq!(seen.get(), (16, 0), "every block write lends the folio");
    assert_eq!(alone(&mut e, write(K, 2 * KU, b'B')), Ok(2 * K));
    loop {
        if e.take_done().iter().any(|d| d.task == fsync) {
            break;
        }
        e.step().unwrap().expect("the fsync is still in flight");
    }
    // Each data block's first write carries 'A' (the folio's bytes at submission); blocks
    // 1 and 2 (device blocks 2 and 3) are dirty again and written later, by the flusher or
    // the next fsync, each from a copy (two of sixteen blocks dirty).
    settle(&mut e, Call::Fsync { ino: 0 }).0.unwrap();
    assert_eq!(seen.get(), (16, 2));
    let log = e.fs().dev.write_log().unwrap();
    for addr in 1..=16u64 {
        let bytes: Vec<u8> = log
            .iter()
            .filter(|r| r.block == addr)
            .map(|r| r.first_byte)
            .collect();
        let want: &[u8] = if matches!(addr, 2 | 3) { b"AB" } else { b"A" };
        assert_eq!(bytes, want, "device block {addr}");
    }
    e.fs_mut().drop_caches();
    let mut want = vec![b'A'; 16 * KU];
    want[KU..3 * KU].fill(b'B');
    assert_eq!(settle(&mut e, read(0, 16 * K)).1.unwrap(), want);
}
