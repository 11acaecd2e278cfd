//! fs-core crash campaigns: each run formats a fresh filesystem, runs a workload on it
//! through the deterministic scheduler on nbd-server's emulated disk (in process, recorded),
//! unmounts it, and checks every crash state of the recorded log.

use std::path::{Path, PathBuf};
use std::time::Instant;

use fs_core::block::MemDevice;
use fs_core::ondisk;
use fs_core::sched::{run_mounted, PctPolicy, Policy, RandomPolicy, RunResult};
use fs_core::Config;
use nbd_server::fscore_device::RecordedDevice;

use super::states::{check_run, read_all, StatesChecked};
use super::workload::{self, FsWorkload, WorkloadKind, CAMPAIGN_DEVICE_BLOCKS, CAMPAIGN_INODES};
use crate::race::campaign::{PCT_DEPTH, PCT_STEPS_HINT};
use crate::race::PolicyKind;
use crate::states::StateOptions;

/// Failing states kept per run (the first is the finding).
pub const FAILING_STATES_KEPT_MAX: usize = 4;

/// How a campaign runs.
#[derive(Debug, Clone)]
pub struct FsCampaignOptions {
    pub seed: u64,
    pub runs: u64,
    pub workload: WorkloadKind,
    /// Switches and planted bugs.
    pub config: Config,
    pub states: StateOptions,
    /// Stop after this many failing runs (0: never).
    pub max_failures: u64,
    /// Threads (runs at once; a single run checks its states on them instead).
    pub jobs: usize,
    /// The runs of this process: run i (seed + i) when the shard owns i.
    pub shard: crate::shard::Shard,
}

impl FsCampaignOptions {
    /// Runs of the shard.
    pub fn own_runs(&self) -> u64 {
        self.shard.share_of(self.runs)
    }

    /// The seed of the shard's run `j`: the campaign's run `K + j N`.
    pub fn seed_of(&self, j: u64) -> u64 {
        let i = self.shard.index + j * self.shard.count;
        self.seed.wrapping_add(i)
    }
}

/// One run and what its crash states showed.
#[derive(Debug)]
pub struct FsRun {
    pub seed: u64,
    pub workload: FsWorkload,
    pub cfg: Config,
    pub result: RunResult,
    pub states: StatesChecked,
    /// How the crash states were generated.
    pub states_options: StateOptions,
    /// The image mkfs made (the log's base), and the write log (kept while the run is).
    pub base: Vec<u8>,
    pub log: tempfile::NamedTempFile,
    /// Seconds spent checking the crash states (mount, fsck, oracle), not running the workload.
    pub check_seconds: f64,
}

impl FsRun {
    pub fn failed(&self) -> bool {
        !self.states.failures.is_empty() || !self.result.failures.is_empty()
    }

    /// The run's failure signature (`folder::signature::fs_signature`): its first failing
    /// crash state's, else its first race failure's; `None` if it passed. Its bundle's
    /// [`FsBundle::signature`](super::bundle::FsBundle::signature) is the same.
    pub fn signature(&self) -> Option<String> {
        use crate::folder::signature::{fs_signature, CrashVerdict};
        let state = self.states.failures.first().map(|f| CrashVerdict {
            mount_error: f.mount_error.as_deref(),
            fsck: &f.fsck,
            violations: &f.violations,
        });
        let ops = &self.workload.workload;
        fs_signature(&self.cfg, state, &self.result.failures, ops)
    }
}

/// The workload of run `seed` (`cfg` says whether the random ones race direct writes).
pub fn workload_for(kind: WorkloadKind, seed: u64, cfg: &Config) -> FsWorkload {
    match kind {
        WorkloadKind::Ace => FsWorkload::plain(workload::ace(seed), seed),
        WorkloadKind::Random => workload::random(seed, cfg),
    }
}

fn policy_for(w: &FsWorkload) -> Box<dyn Policy> {
    match w.policy {
        PolicyKind::Random => Box::new(RandomPolicy::new(w.policy_seed)),
        PolicyKind::Pct => Box::new(PctPolicy::new(w.policy_seed, PCT_DEPTH, PCT_STEPS_HINT)),
    }
}

/// Where a campaign keeps its temporary files: `/dev/shm` when it is there (a run's write log
/// is written and read again at once: memory is the place), else the system's temporary
/// folder.
pub fn temp_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() && tempfile::tempdir_in(shm).is_ok() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// The names mkfs gives: `f0 .. f<n-1>`.
fn mkfs_names(files: usize) -> Vec<String> {
    (0..files).map(fs_core::ops::file_name).collect()
}

/// The base image of every run: a fresh filesystem on a `blocks`-block device. mkfs is
/// deterministic, so each shape is made once per process and copied.
pub fn base_image(files: usize, blocks: u64) -> anyhow::Result<Vec<u8>> {
    type Made = std::collections::HashMap<(usize, u64), std::sync::Arc<Vec<u8>>>;
    static MADE: std::sync::Mutex<Option<Made>> = std::sync::Mutex::new(None);
    if let Some(img) = MADE
        .lock()
        .expect("base images")
        .get_or_insert_with(Made::new)
        .get(&(files, blocks))
    {
        return Ok(img.to_vec());
    }
    let mut dev = MemDevice::new(blocks);
    ondisk::mkfs(&mut dev, CAMPAIGN_INODES, &mkfs_names(files))?;
    let img = read_all(&mut dev)?;
    let mut made = MADE.lock().expect("base images");
    let made = made.get_or_insert_with(Made::new);
    if made.len() < BASE_IMAGES_CACHED_MAX {
        made.insert((files, blocks), std::sync::Arc::new(img.clone()));
    }
    Ok(img)
}

/// Base images kept (one per shape of filesystem a campaign formats).
const BASE_IMAGES_CACHED_MAX: usize = 16;

/// Runs `workload` (under the scheduler seeded with `seed`) on a fresh filesystem over a
/// recorded emulated disk, unmounts it, and checks every crash state of its log on up to
/// `jobs` threads.
pub fn run_one(
    seed: u64,
    workload: FsWorkload,
    cfg: &Config,
    states: StateOptions,
    tmp: &Path,
    jobs: usize,
) -> anyhow::Result<FsRun> {
    let policy = policy_for(&workload);
    run_with(seed, workload, cfg, states, tmp, policy, jobs)
}

/// [`run_one`] under a given policy (a replay's).
pub fn run_with(
    seed: u64,
    workload: FsWorkload,
    cfg: &Config,
    states: StateOptions,
    tmp: &Path,
    mut policy: Box<dyn Policy>,
    jobs: usize,
) -> anyhow::Result<FsRun> {
    let cfg = &Config {
        cache_limit_folios: workload
            .cache_limit_folios
            .unwrap_or(cfg.cache_limit_folios),
        ..cfg.clone()
    };
    let base = base_image(workload.workload.files, CAMPAIGN_DEVICE_BLOCKS)?;
    let log = tempfile::Builder::new()
        .prefix("fs-run-")
        .suffix(".log")
        .tempfile_in(tmp)?;
    // The recorder makes its log afresh: hand it the path of the (now empty) temp file.
    let log_path = log.path().to_path_buf();
    std::fs::remove_file(&log_path)?;
    let dev = RecordedDevice::with_image(&base, CAMPAIGN_DEVICE_BLOCKS, Some(&log_path))?;
    let disk = dev.disk().clone();
    let fs = ondisk::mount(cfg.clone(), Box::new(dev))?;
    let (result, fs) = run_mounted(fs, &workload.workload, policy.as_mut());
    let unmounted = fs.unmount();
    disk.sync_log()?;
    drop(unmounted);
    let started = Instant::now();
    let states_options = states;
    let states = check_run(
        cfg,
        &result.history,
        &log_path,
        base.clone(),
        states_options,
        FAILING_STATES_KEPT_MAX,
        jobs,
    )?;
    Ok(FsRun {
        seed,
        workload,
        cfg: cfg.clone(),
        result,
        states,
        states_options,
        base,
        log,
        check_seconds: started.elapsed().as_secs_f64(),
    })
}

/// What re-checking a run's crash states needs: kept from a run whose log was saved.
#[derive(Debug, Clone)]
pub struct Recheck {
    pub cfg: Config,
    pub history: fs_core::oracle::History,
    pub base: Vec<u8>,
    pub states: StateOptions,
}

impl Recheck {
    pub fn of(run: &FsRun) -> Recheck {
        Recheck {
            cfg: run.cfg.clone(),
            history: run.result.history.clone(),
            base: run.base.clone(),
            states: run.states_options,
        }
    }

    /// Crash states of the log at `log` checked per second in process (mounted, fsck'd,
    /// judged), on `jobs` threads that each check the whole log again and again for about
    /// `seconds`: the figure to set beside `crashmonkey check` on the same log.
    pub fn rate(&self, log: &Path, jobs: usize, seconds: f64) -> anyhow::Result<f64> {
        let started = Instant::now();
        let one = || -> anyhow::Result<usize> {
            let mut n = 0;
            while n == 0 || started.elapsed().as_secs_f64() < seconds {
                let base = self.base.clone();
                n += check_run(&self.cfg, &self.history, log, base, self.states, 0, 1)?.checked;
            }
            Ok(n)
        };
        let counts: Vec<anyhow::Result<usize>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..jobs.max(1)).map(|_| scope.spawn(one)).collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("a recheck panicked"))
                .collect()
        });
        let mut n = 0;
        for c in counts {
            n += c?;
        }
        Ok(n as f64 / started.elapsed().as_secs_f64().max(1e-9))
    }
}

/// What a campaign found.
#[derive(Debug, serde::Serialize)]
pub struct FsCampaignSummary {
    pub runs: u64,
    /// Unique crash states checked, over every run.
    pub crash_states: u64,
    /// Failing runs.
    pub failures: u64,
    pub first_failure_seed: Option<u64>,
    pub seconds: f64,
    /// Unique crash states per second of the whole campaign (workloads included).
    pub states_per_second: f64,
    /// Seconds spent checking crash states, and states per second of that.
    pub check_seconds: f64,
    pub check_states_per_second: f64,
    /// The reproducer bundle written for the first failure.
    pub reproducer: Option<PathBuf>,
    pub workload: WorkloadKind,
    pub bugs: Vec<&'static str>,
    pub failing_seeds: Vec<u64>,
    /// Set when a signal stopped the campaign early.
    pub interrupted: Option<String>,
}

impl FsCampaignSummary {
    /// The summary of a campaign of `opts` before any run.
    pub fn empty(opts: &FsCampaignOptions) -> Self {
        FsCampaignSummary {
            runs: 0,
            crash_states: 0,
            failures: 0,
            first_failure_seed: None,
            seconds: 0.0,
            states_per_second: 0.0,
            check_seconds: 0.0,
            check_states_per_second: 0.0,
            reproducer: None,
            workload: opts.workload,
            bugs: opts.config.bugs.names(),
            failing_seeds: Vec::new(),
            interrupted: None,
        }
    }
}

/// Runs the campaign; `first` receives the first failing run (to bundle), `keep` every run
/// (to save one, say), `progress` is told (runs done, states so far) after each run, and
/// `stop` is polled between runs. Runs go on `opts.jobs` threads, and come back to the
/// callbacks in seed order, so that the summary is the same whatever the threads.
pub fn run_campaign(
    opts: &FsCampaignOptions,
    tmp: &Path,
    first: &mut dyn FnMut(&FsRun) -> anyhow::Result<PathBuf>,
    keep: &mut dyn FnMut(&FsRun) -> anyhow::Result<()>,
    progress: &mut dyn FnMut(u64, u64),
    stop: &dyn Fn() -> Option<String>,
) -> anyhow::Result<FsCampaignSummary> {
    let started = Instant::now();
    let mut s = FsCampaignSummary::empty(opts);
    let mut take = |run: anyhow::Result<FsRun>| -> anyhow::Result<bool> {
        let run = run?;
        s.runs += 1;
        s.crash_states += run.states.checked as u64;
        s.check_seconds += run.check_seconds;
        keep(&run)?;
        if run.failed() {
            s.failures += 1;
            if s.failing_seeds.len() < crate::race::campaign::FAILING_SEEDS_LISTED_MAX {
                s.failing_seeds.push(run.seed);
            }
            if s.first_failure_seed.is_none() {
                s.first_failure_seed = Some(run.seed);
                s.reproducer = Some(first(&run)?);
            }
        }
        progress(s.runs, s.crash_states);
        Ok(opts.max_failures == 0 || s.failures < opts.max_failures)
    };
    let interrupted = in_seed_order(opts, tmp, 0, &mut take, stop)?;
    s.interrupted = interrupted;
    s.seconds = started.elapsed().as_secs_f64();
    s.states_per_second = s.crash_states as f64 / s.seconds.max(1e-9);
    // Checking ran on several threads at once: its seconds are thread-seconds; the rate is
    // per thread-second times the threads that shared the time.
    s.check_states_per_second =
        s.crash_states as f64 / s.check_seconds.max(1e-9) * runs_at_once(opts) as f64;
    Ok(s)
}

/// Runs in flight beyond the next one to hand over, per thread: bounds the runs (images and
/// logs) held while an earlier, slower one finishes.
pub const RUNS_AHEAD_PER_JOB_MAX: u64 = 4;

/// Threads that run whole runs at once (the rest of `opts.jobs` check one run's states).
pub fn runs_at_once(opts: &FsCampaignOptions) -> usize {
    opts.jobs.max(1).min(opts.own_runs().max(1) as usize)
}

/// Where the workers are: the next run index to start, the next to hand over, and whether
/// to stop starting runs.
struct Turns {
    next: u64,
    handed: u64,
    stop: bool,
}

/// Runs the shard's runs from its run `first` on ([`FsCampaignOptions::seed_of`]) on worker
/// threads and hands each to `take` in seed order until `take` says enough, every run is
/// done, or `stop` says why not (returned).
pub fn in_seed_order(
    opts: &FsCampaignOptions,
    tmp: &Path,
    first: u64,
    take: &mut dyn FnMut(anyhow::Result<FsRun>) -> anyhow::Result<bool>,
    stop: &dyn Fn() -> Option<String>,
) -> anyhow::Result<Option<String>> {
    use std::sync::{mpsc, Condvar, Mutex};
    let workers = runs_at_once(opts);
    let check_jobs = (opts.jobs.max(1) / workers).max(1);
    let ahead = workers as u64 * RUNS_AHEAD_PER_JOB_MAX;
    let own = opts.own_runs();
    let turns = Mutex::new(Turns {
        next: first,
        handed: first,
        stop: false,
    });
    let moved = Condvar::new();
    let (tx, rx) = mpsc::channel::<(u64, anyhow::Result<FsRun>)>();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let (tx, turns, moved) = (tx.clone(), &turns, &moved);
            scope.spawn(move || loop {
                let i = {
                    let mut t = turns.lock().expect("campaign turns");
                    while !t.stop && t.next < own && t.next >= t.handed + ahead {
                        t = moved.wait(t).expect("campaign turns");
                    }
                    if t.stop || t.next >= own {
                        return;
                    }
                    t.next += 1;
                    t.next - 1
                };
                let seed = opts.seed_of(i);
                let w = workload_for(opts.workload, seed, &opts.config);
                let run = run_one(seed, w, &opts.config, opts.states, tmp, check_jobs);
                if tx.send((i, run)).is_err() {
                    return;
                }
            });
        }
        drop(tx);
        let result = hand_over(&rx, first, &turns, &moved, take, stop);
        turns.lock().expect("campaign turns").stop = true;
        moved.notify_all();
        result
    })
}

/// The receiving side of [`in_seed_order`]: reorders finished runs and hands them over.
fn hand_over(
    rx: &std::sync::mpsc::Receiver<(u64, anyhow::Result<FsRun>)>,
    first: u64,
    turns: &std::sync::Mutex<Turns>,
    moved: &std::sync::Condvar,
    take: &mut dyn FnMut(anyhow::Result<FsRun>) -> anyhow::Result<bool>,
    stop: &dyn Fn() -> Option<String>,
) -> anyhow::Result<Option<String>> {
    let mut waiting = std::collections::BTreeMap::new();
    let mut handed = first;
    loop {
        if let Some(why) = stop() {
            return Ok(Some(why));
        }
        let Ok((i, run)) = rx.recv() else {
            return Ok(None);
        };
        waiting.insert(i, run);
        while let Some(run) = waiting.remove(&handed) {
            handed += 1;
            turns.lock().expect("campaign turns").handed = handed;
            moved.notify_all();
            if !take(run)? {
                return Ok(None);
            }
        }
    }
}
