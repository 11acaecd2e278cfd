//! Throughput of the model (run by `make bench-fscore`, never as a timed test): simulated
//! 4 KiB buffered writes per second, with background writeback, IO completion and reclaim
//! scheduled by the seeded random policy, and everything synced and checked at the end;
//! once in memory only, and once on a filesystem that persists (journal commits, on-disk
//! metadata), on the same in-memory device: the difference is the journal's cost.

use fs_core::block::MemDevice;
use fs_core::ondisk;
use fs_core::sched::{self, Policy, PolicyError, RandomPolicy, RunResult};
use fs_core::TaskId;
use fs_core::{Config, Op, Workload};
use std::time::Instant;

/// Writes per measured run (into a 1 MiB file, so blocks are rewritten and reclaimed).
const WRITES_PER_RUN: u64 = 4096;
/// 1 MiB writes per measured run of the large-write measurement (into a 16 MiB file).
const BIG_WRITES_PER_RUN: u64 = 64;
const BIG_WRITE_BYTES: u64 = 1 << 20;
const FILE_BLOCKS: u64 = 256;
const RUNS: u64 = 5;

/// Nanoseconds this thread has run on a CPU (Linux `/proc/thread-self/schedstat`), so the
/// figure means the model's speed, not how busy the machine's other tenants are.
fn cpu_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Runs `w` in memory, or on a freshly made and mounted filesystem (`persistent`).
fn run_once(cfg: &Config, w: &Workload, seed: u64, persistent: bool) -> RunResult {
    let mut policy = RandomPolicy::new(seed);
    if !persistent {
        return sched::run(cfg, w, &mut policy);
    }
    let mut dev = MemDevice::new(cfg.device_blocks);
    ondisk::mkfs(&mut dev, 16, &["f0".to_string()]).expect("mkfs");
    let fs = ondisk::mount(cfg.clone(), Box::new(dev)).expect("mount");
    let (r, fs) = sched::run_mounted(fs, w, &mut policy);
    fs.unmount().expect("unmount");
    r
}

/// Best of [`RUNS`]: (CPU seconds, wall seconds, scheduler steps) of one run.
fn measure(cfg: &Config, w: &Workload, persistent: bool) -> (f64, f64, u64) {
    let mut best = f64::MAX;
    let mut best_cpu = f64::MAX;
    let mut steps = 0;
    for seed in 0..RUNS {
        let t = Instant::now();
        let c = cpu_ns();
        let r = run_once(cfg, w, seed, persistent);
        let dt = t.elapsed().as_secs_f64();
        if let (Some(a), Some(b)) = (c, cpu_ns()) {
            best_cpu = best_cpu.min(b.saturating_sub(a) as f64 / 1e9);
        }
        assert!(r.passed(), "{:?}", r.failures);
        steps = r.steps;
        best = best.min(dt);
    }
    let cpu = if best_cpu < f64::MAX { best_cpu } else { best };
    (cpu, best, steps)
}

fn main() {
    let ops: Vec<Op> = (0..WRITES_PER_RUN)
        .map(|i| Op::Write {
            file: 0,
            offset: (i * 7 % FILE_BLOCKS) * 4096,
            len: 4096,
            byte: (i % 251) as u8 + 1,
        })
        .collect();
    // Four writers at a time, racing the background tasks; an fsync every 64 writes.
    let mut phases: Vec<Vec<Op>> = ops.chunks(4).map(<[Op]>::to_vec).collect();
    for i in (16..phases.len()).step_by(16).rev() {
        phases.insert(i, vec![Op::Fsync { file: 0 }]);
    }
    let w = Workload { files: 1, phases };
    let cfg = Config {
        cache_limit_folios: 16,
        device_blocks: 4096,
        ..Config::default()
    };
    let (cpu, wall, steps) = measure(&cfg, &w, false);
    println!(
        "buffered_4k_writes_per_second {:.0}",
        WRITES_PER_RUN as f64 / cpu
    );
    println!(
        "buffered_4k_writes_per_wall_second {:.0}",
        WRITES_PER_RUN as f64 / wall
    );
    println!("steps_per_second {:.0}", steps as f64 / cpu);
    let (pcpu, _, _) = measure(&cfg, &w, true);
    println!(
        "persistent_buffered_4k_writes_per_second {:.0}",
        WRITES_PER_RUN as f64 / pcpu
    );
    println!(
        "(best of {RUNS} runs of {WRITES_PER_RUN} 4 KiB writes with an fsync every 64, {steps} \
         scheduler steps each, synced and checked; per second of CPU time, and of wall time; \
         the persistent run adds mkfs, mount, journal commits and unmount)"
    );
    big_writes();
}

/// The random policy without its injected short copies (each user copy has a 3% chance of
/// being cut, which would end most 1 MiB writes of 256 copies early): every write is whole.
struct WholeCopies(RandomPolicy);

impl Policy for WholeCopies {
    fn pick(&mut self, runnable: &[TaskId], step: u64) -> Result<TaskId, PolicyError> {
        self.0.pick(runnable, step)
    }
}

/// 1 MiB writes, two at a time, with 4 KiB folios and with 64 KiB folios (16 blocks), and
/// a page cache of 8 MiB either way, no short copies: MiB written per CPU-second (best of
/// [`RUNS`]) and the scheduler steps they took.
fn big_writes() {
    let file_mib = 16;
    let ops: Vec<Op> = (0..BIG_WRITES_PER_RUN)
        .map(|i| Op::Write {
            file: 0,
            offset: (i * 5 % file_mib) * BIG_WRITE_BYTES,
            len: BIG_WRITE_BYTES,
            byte: (i % 251) as u8 + 1,
        })
        .collect();
    let w = Workload {
        files: 1,
        phases: ops.chunks(2).map(<[Op]>::to_vec).collect(),
    };
    for folio_blocks in [1, 16] {
        let cfg = Config {
            folio_blocks,
            cache_limit_folios: (2048 / folio_blocks) as usize,
            device_blocks: 8192,
            ..Config::default()
        };
        let mut best_cpu = f64::MAX;
        let mut steps = 0;
        for seed in 0..RUNS {
            let c = cpu_ns();
            let t = Instant::now();
            let r = sched::run(&cfg, &w, &mut WholeCopies(RandomPolicy::new(seed)));
            let cpu = match (c, cpu_ns()) {
                (Some(a), Some(b)) => b.saturating_sub(a) as f64 / 1e9,
                _ => t.elapsed().as_secs_f64(),
            };
            assert!(r.passed(), "{:?}", r.failures);
            let whole = Some(Ok(BIG_WRITE_BYTES));
            assert!(r.results.iter().all(|x| *x == whole), "{:?}", r.results);
            best_cpu = best_cpu.min(cpu);
            steps = r.steps;
        }
        let mib = (BIG_WRITES_PER_RUN * BIG_WRITE_BYTES) as f64 / (1 << 20) as f64;
        println!(
            "buffered_1m_write_mib_per_second_folio_blocks_{folio_blocks} {:.0} ({steps} steps)",
            mib / best_cpu
        );
    }
}
