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
}

/// One run and what its crash states showed.
#[derive(Debug)]
pub struct FsRun {
    pub seed: u64,
    pub workload: FsWorkload,
    pub cfg: Config,
    pub result: RunResult,
    pub states: StatesChecked,
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
}

/// The workload of run `seed`.
pub fn workload_for(kind: WorkloadKind, seed: u64) -> FsWorkload {
    match kind {
        WorkloadKind::Ace => FsWorkload::plain(workload::ace(seed), seed),
        WorkloadKind::Random => workload::random(seed),
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

/// The base image of every run: a fresh filesystem on a `blocks`-block device.
pub fn base_image(files: usize, blocks: u64) -> anyhow::Result<Vec<u8>> {
    let mut dev = MemDevice::new(blocks);
    ondisk::mkfs(&mut dev, CAMPAIGN_INODES, &mkfs_names(files))?;
    read_all(&mut dev)
}

/// Runs `workload` (under the scheduler seeded with `seed`) on a fresh filesystem over a
/// recorded emulated disk, unmounts it, and checks every crash state of its log.
pub fn run_one(
    seed: u64,
    workload: FsWorkload,
    cfg: &Config,
    states: StateOptions,
    tmp: &Path,
) -> anyhow::Result<FsRun> {
    let policy = policy_for(&workload);
    run_with(seed, workload, cfg, states, tmp, policy)
}

/// [`run_one`] under a given policy (a replay's).
pub fn run_with(
    seed: u64,
    workload: FsWorkload,
    cfg: &Config,
    states: StateOptions,
    tmp: &Path,
    mut policy: Box<dyn Policy>,
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
    let states = check_run(
        cfg,
        &result.history,
        &log_path,
        base.clone(),
        states,
        FAILING_STATES_KEPT_MAX,
    )?;
    Ok(FsRun {
        seed,
        workload,
        cfg: cfg.clone(),
        result,
        states,
        base,
        log,
        check_seconds: started.elapsed().as_secs_f64(),
    })
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

/// Runs the campaign; `first` receives the first failing run (to bundle), `keep` every run
/// (to save one, say), `progress` is told
/// (runs done, states so far) after each run, and `stop` is polled between runs.
pub fn run_campaign(
    opts: &FsCampaignOptions,
    tmp: &Path,
    first: &mut dyn FnMut(&FsRun) -> anyhow::Result<PathBuf>,
    keep: &mut dyn FnMut(&FsRun) -> anyhow::Result<()>,
    progress: &mut dyn FnMut(u64, u64),
    stop: &dyn Fn() -> Option<String>,
) -> anyhow::Result<FsCampaignSummary> {
    let started = Instant::now();
    let mut s = FsCampaignSummary {
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
    };
    for i in 0..opts.runs {
        if let Some(why) = stop() {
            s.interrupted = Some(why);
            break;
        }
        let seed = opts.seed.wrapping_add(i);
        let run = run_one(
            seed,
            workload_for(opts.workload, seed),
            &opts.config,
            opts.states,
            tmp,
        )?;
        s.runs += 1;
        s.crash_states += run.states.checked as u64;
        s.check_seconds += run.check_seconds;
        keep(&run)?;
        if run.failed() {
            s.failures += 1;
            if s.failing_seeds.len() < crate::race::campaign::FAILING_SEEDS_LISTED_MAX {
                s.failing_seeds.push(seed);
            }
            if s.first_failure_seed.is_none() {
                s.first_failure_seed = Some(seed);
                s.reproducer = Some(first(&run)?);
            }
        }
        progress(s.runs, s.crash_states);
        if opts.max_failures > 0 && s.failures >= opts.max_failures {
            break;
        }
    }
    s.seconds = started.elapsed().as_secs_f64();
    s.states_per_second = s.crash_states as f64 / s.seconds.max(1e-9);
    s.check_states_per_second = s.crash_states as f64 / s.check_seconds.max(1e-9);
    Ok(s)
}
