//! `crashmonkey fs campaign`: fs-core crash campaigns, and replay of their reproducers.
//!
//! Exit codes: 0 nothing found (or the replay kept its promises); 1 findings (or the replayed
//! state failed again); 2 the command could not run; 130 / 143 stopped by SIGINT / SIGTERM.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use crashmonkey::check::StopFlag;
use crashmonkey::fscore::bundle;
use crashmonkey::fscore::campaign::{
    run_campaign, temp_root, FsCampaignOptions, FsCampaignSummary, Recheck,
};
use crashmonkey::fscore::workload::WorkloadKind;
use crashmonkey::states::StateOptions;
use fs_core::Config;
use indicatif::{ProgressBar, ProgressStyle};

/// Runs above which a progress bar is drawn (when stderr is a terminal).
const PROGRESS_RUNS_MIN: u64 = 20;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum WorkloadArg {
    /// Bounded and exhaustive: 1 to 3 core operations, each with a persistence point.
    Ace,
    /// The race campaign's racing workloads, with namespace operations and persistence.
    Random,
}

#[derive(Args, Debug)]
#[command(
    after_help = "Each run formats a fresh fs-core filesystem on an in-process emulated \
disk that records every write, runs a workload through the deterministic scheduler (flusher, IO \
completion and reclaim race it), unmounts, and checks every crash state of the recorded log: \
mounted with recovery, fsck'd, and judged by the crash oracle (docs/fs-core-crash.md).\n\n\
Examples:\n  \
crashmonkey fs campaign --seed 1 --runs 500                       # defaults: nothing found\n  \
crashmonkey fs campaign --seed 1 --runs 50 --bug fsync-no-log-force  # a planted bug\n  \
crashmonkey fs campaign --workload random --runs 3000 --no-iomap-valid\n  \
crashmonkey fs campaign --seed 1 --runs 400 --bug size-before-data --out camp  # resumable\n  \
crashmonkey findings camp                                          # its distinct findings\n  \
crashmonkey report camp -o camp.html                               # and as one HTML page\n  \
crashmonkey fs campaign --seed 1 --runs 400 --bug size-before-data --shard 0/3 --out s0\n  \
crashmonkey fs campaign --replay crashmonkey-out/fs-seed-0        # the finding, again\n  \
crashmonkey fs campaign --replay crashmonkey-out/fs-seed-0 --defaults   # bugs off: kept\n\n\
Planted bugs (--bug): convert-before-data, commit-without-flush, fsync-no-log-force, \
size-before-data, replay-ignores-checksum.\n\
Exit status: 0 nothing found, 1 findings, 2 error, 130/143 stopped by SIGINT/SIGTERM (with \
--out: what ran is recorded; rerun the same command to go on)."
)]
pub struct CampaignArgs {
    /// First seed; run i uses seed + i (its workload, and its schedule).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Number of runs.
    #[arg(long, default_value_t = 100)]
    pub runs: u64,
    /// The workload generator.
    #[arg(long, value_enum, default_value = "ace")]
    pub workload: WorkloadArg,
    /// Plant a bug (repeatable); see the list below.
    #[arg(long = "bug", value_name = "NAME")]
    pub bugs: Vec<String>,
    #[command(flatten)]
    pub switches: crate::switches::Switches,
    /// Crash states: ordered subsets keep or drop at most this many writes of an epoch.
    #[arg(long, default_value_t = 2)]
    pub max_subset: usize,
    /// Crash states: above this many candidates per epoch, sample this many.
    #[arg(long, default_value_t = 64)]
    pub samples: usize,
    /// Stop after this many failing runs (0 = run them all).
    #[arg(long, default_value_t = 0)]
    pub max_failures: u64,
    /// Threads: runs go on them at once (0 = one per core). The results are the same for
    /// any number: runs are reported, bundled and counted in seed order.
    #[arg(long, default_value_t = 0)]
    pub jobs: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// The campaign folder (docs/campaigns.md): its runs are recorded there as they are done,
    /// with the crash bundle (`fs-seed-N/`) of each finding's first and smallest failing run,
    /// and the same command run again goes on where it stopped (after Ctrl-C, SIGKILL or a
    /// crash). A folder of another campaign, or of other files, is refused. Without --out,
    /// the first failing run's bundle is written to ./crashmonkey-out and nothing is recorded.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["no_bundle", "save_largest"])]
    pub out: Option<PathBuf>,
    /// With --out: record the runs done every this many seconds of running (what a SIGKILL
    /// may make the rerun redo; each record costs a few syncs). It changes no result.
    #[arg(long, value_name = "SECONDS", default_value_t = crashmonkey::folder::record::RECORD_SECONDS_DEFAULT, requires = "out")]
    pub record_seconds: f64,
    /// Run only shard K of N of the campaign (run i when i % N == K): `K/N`, or `N` with K
    /// from JOB_COMPLETION_INDEX (Kubernetes Indexed Jobs) or SLURM_ARRAY_TASK_ID. The N
    /// shards' findings together are the unsharded campaign's (`crashmonkey findings merge`;
    /// docs/scale-out.md).
    #[arg(long, value_name = "K/N")]
    pub shard: Option<String>,
    /// Do not write a reproducer bundle.
    #[arg(long)]
    pub no_bundle: bool,
    /// Minimise the bundled crash state (as `fs minimise` does) into the bundle's
    /// `minimised/` folder: the fewest surviving and torn writes that fail the same way. With
    /// --out, each finding's smallest run once the runs are done (a rerun minimises what is
    /// not minimised yet). A `minimised/` already there is kept, not replaced.
    #[arg(long, conflicts_with = "no_bundle")]
    pub minimise: bool,
    /// Save the run with the most crash states here (device.log, base.img, run.json with its
    /// seed, states and checking time), to compare checkers on one log (make bench-fscore).
    #[arg(long, value_name = "DIR")]
    pub save_largest: Option<PathBuf>,
    /// Replay a bundle instead: the same run and crash state (exit 1 if it fails again).
    #[arg(long, value_name = "DIR")]
    pub replay: Option<PathBuf>,
    /// With --replay: planted bugs off and the default switches (plus any given here); the
    /// page-cache limit, device and folio size stay as recorded.
    #[arg(long)]
    pub defaults: bool,
}

impl CampaignArgs {
    fn config(&self, base: Config) -> anyhow::Result<Config> {
        self.switches.check()?;
        anyhow::ensure!(
            !self.switches.direct_writes || matches!(self.workload, WorkloadArg::Random),
            "--direct-writes races direct writes in the random workloads: add --workload random"
        );
        let mut cfg = self.switches.apply(base);
        for b in &self.bugs {
            anyhow::ensure!(
                cfg.bugs.set(b),
                "unknown bug {b:?} (known: {})",
                fs_core::fs::Bugs::NAMES.join(", ")
            );
        }
        Ok(cfg)
    }

    fn states(&self) -> StateOptions {
        StateOptions {
            max_subset: self.max_subset,
            samples: self.samples.max(1),
            seed: self.seed,
            ..StateOptions::default()
        }
    }
}

pub fn run(args: CampaignArgs) -> anyhow::Result<i32> {
    let r = if args.replay.is_some() {
        replay(&args)
    } else {
        campaign(&args)
    };
    r.or_else(|e| {
        eprintln!("crashmonkey fs campaign: error: {e:#}");
        Ok(2)
    })
}

/// Where a campaign without --out writes its bundle.
const DEFAULT_OUT: &str = "crashmonkey-out";

fn options(args: &CampaignArgs) -> anyhow::Result<FsCampaignOptions> {
    let kind = match args.workload {
        WorkloadArg::Ace => WorkloadKind::Ace,
        WorkloadArg::Random => WorkloadKind::Random,
    };
    Ok(FsCampaignOptions {
        seed: args.seed,
        runs: args.runs,
        workload: kind,
        config: args.config(Config::default())?,
        states: args.states(),
        max_failures: args.max_failures,
        jobs: if args.jobs == 0 {
            crashmonkey::fscore::states::cores()
        } else {
            args.jobs
        },
        shard: crashmonkey::shard::resolve(args.shard.as_deref()).map_err(anyhow::Error::msg)?,
    })
}

fn campaign(args: &CampaignArgs) -> anyhow::Result<i32> {
    let opts = options(args)?;
    let stop = StopFlag::new();
    crate::crash_cmd::stop_on_signals(&stop)?;
    let tmp = tempfile::Builder::new()
        .prefix("crashmonkey-fs-")
        .tempdir_in(temp_root())?;
    let summary = match &args.out {
        Some(dir) => folder_campaign(args, &opts, dir, tmp.path(), &stop)?,
        None => plain_campaign(args, &opts, tmp.path(), &stop)?,
    };
    report(args, &opts, &summary)?;
    Ok(match (stop.signal(), summary.failures) {
        (Some(s), _) => 128 + s,
        (None, 0) => 0,
        (None, _) => 1,
    })
}

/// A campaign in folder `dir`: resumed if the folder holds its records.
fn folder_campaign(
    args: &CampaignArgs,
    opts: &FsCampaignOptions,
    dir: &std::path::Path,
    tmp: &std::path::Path,
    stop: &StopFlag,
) -> anyhow::Result<FsCampaignSummary> {
    use crashmonkey::folder::{fs_campaign::FsFolder, FsParams};
    let mut folder = FsFolder::open(
        dir,
        FsParams {
            seed: opts.seed,
            runs: opts.runs,
            workload: opts.workload,
            config: opts.config.clone(),
            states: opts.states,
            max_failures: opts.max_failures,
            shard: opts.shard.to_string(),
        },
    )?;
    folder.record_every(args.record_seconds);
    let done = folder.done()?;
    if done.runs > 0 {
        tracing::info!(runs = done.runs, "resuming: runs already recorded");
    }
    let bar = progress(args, opts.own_runs(), done.runs);
    let summary = folder.run(
        opts,
        tmp,
        &mut |p| {
            bar.set_position(p.runs);
            bar.set_message(format!("{} failing, {} findings", p.failures, p.findings));
        },
        &|| stop.signal().map(crashmonkey::checker::signal_name),
    )?;
    bar.finish_and_clear();
    if args.minimise && stop.signal().is_none() {
        let made = folder.minimise(tmp)?;
        tracing::info!(minimised = made, "findings' crash states minimised");
    }
    Ok(summary)
}

/// A campaign without a folder: the first failing run's bundle goes to ./crashmonkey-out.
fn plain_campaign(
    args: &CampaignArgs,
    opts: &FsCampaignOptions,
    tmp: &std::path::Path,
    stop: &StopFlag,
) -> anyhow::Result<FsCampaignSummary> {
    let bar = progress(args, opts.own_runs(), 0);
    let mut largest = 0;
    let mut saved = None;
    let out = std::path::Path::new(DEFAULT_OUT);
    let summary = run_campaign(
        opts,
        tmp,
        &mut |run| {
            if args.no_bundle {
                return Ok(PathBuf::new());
            }
            let dir = bundle::write_bundle(out, opts.workload, run, opts.states)?;
            if args.minimise {
                minimise_bundle(&dir, tmp)?;
            }
            Ok(dir)
        },
        &mut |run| match &args.save_largest {
            Some(dir) if run.states.checked > largest => {
                largest = run.states.checked;
                saved = Some(Recheck::of(run));
                save_run(dir, run)
            }
            _ => Ok(()),
        },
        &mut |runs, states| {
            bar.set_position(runs);
            bar.set_message(format!("{states} crash states"));
        },
        &|| stop.signal().map(crashmonkey::checker::signal_name),
    )?;
    bar.finish_and_clear();
    if let (Some(dir), Some(r)) = (&args.save_largest, saved) {
        note_recheck(dir, &r)?;
    }
    Ok(summary)
}

/// `fs campaign --minimise`: the bundle at `dir` minimised into `dir/minimised` (unless a
/// folder of that name is there: it is kept).
fn minimise_bundle(dir: &std::path::Path, tmp: &std::path::Path) -> anyhow::Result<()> {
    use crashmonkey::fscore::minimise as m;
    let target = dir.join(crashmonkey::folder::minimised::MINIMISED_DIR);
    if target.exists() {
        eprintln!(
            "crashmonkey fs campaign: {} exists: kept, not replaced",
            target.display()
        );
        return Ok(());
    }
    let b = bundle::load(dir)?;
    if b.state.is_none() {
        return Ok(());
    }
    let r = m::minimise_state(&b, tmp)?;
    m::write_state_minimised(&target, &b, &r)?;
    tracing::info!(bundle = %target.display(), "crash state minimised");
    Ok(())
}

/// Seconds spent checking a saved run's states again, to measure their rate.
const RECHECK_SECONDS: f64 = 0.5;

/// Saves a run's log and base image, with a note of what checking its states took.
fn save_run(
    dir: &std::path::Path,
    run: &crashmonkey::fscore::campaign::FsRun,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::copy(run.log.path(), dir.join("device.log"))?;
    std::fs::write(dir.join("base.img"), &run.base)?;
    let note = serde_json::json!({
        "seed": run.seed,
        "crash_states": run.states.checked,
        "check_seconds": run.check_seconds,
        "check_states_per_second": run.states.checked as f64 / run.check_seconds.max(1e-9),
    });
    std::fs::write(dir.join("run.json"), serde_json::to_string_pretty(&note)?)?;
    Ok(())
}

/// Adds to the saved run's note the rate of its states checked again in process on every
/// core for [`RECHECK_SECONDS`]: the figure to compare with `crashmonkey check` on the same
/// log (make bench-fscore).
fn note_recheck(dir: &std::path::Path, r: &Recheck) -> anyhow::Result<()> {
    let path = dir.join("run.json");
    let mut note: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let jobs = crashmonkey::fscore::states::cores();
    note["recheck_jobs"] = serde_json::json!(jobs);
    note["recheck_states_per_second"] =
        serde_json::json!(r.rate(&dir.join("device.log"), jobs, RECHECK_SECONDS)?);
    std::fs::write(&path, serde_json::to_string_pretty(&note)?)?;
    Ok(())
}

/// A progress bar over a shard's `own` runs that starts at the `done` ones (recorded by an
/// earlier invocation), and whose rate and ETA count only the runs made now.
fn progress(args: &CampaignArgs, own: u64, done: u64) -> ProgressBar {
    use indicatif::ProgressDrawTarget;
    let shown = own >= PROGRESS_RUNS_MIN
        && !args.json
        && std::io::IsTerminal::is_terminal(&std::io::stderr());
    if !shown {
        return ProgressBar::hidden();
    }
    // Drawn nowhere until the estimator has taken `done` in and forgotten the rate of
    // jumping there at once.
    let bar =
        ProgressBar::with_draw_target(Some(own), ProgressDrawTarget::hidden()).with_position(done);
    bar.tick();
    bar.reset_eta();
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} runs ({per_sec}), {msg}, ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_draw_target(ProgressDrawTarget::stderr());
    bar
}

fn report(
    args: &CampaignArgs,
    opts: &FsCampaignOptions,
    s: &FsCampaignSummary,
) -> anyhow::Result<()> {
    let reproducer = s.reproducer.as_ref().filter(|p| !p.as_os_str().is_empty());
    if args.json {
        let mut v = serde_json::to_value(s)?;
        v["reproducer"] = serde_json::json!(reproducer.map(|p| p.display().to_string()));
        v["seed"] = serde_json::json!(args.seed);
        v["shard"] = serde_json::json!(opts.shard.to_string());
        crate::race_cmd::emitln(&serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let mut of = if opts.shard.count > 1 {
        format!(", shard {}", opts.shard)
    } else {
        String::new()
    };
    if opts.config.direct_writes && s.workload == WorkloadKind::Random {
        of += ", direct writes raced";
    }
    crate::race_cmd::emitln(&format!(
        "fs campaign ({:?} workloads, bugs: {}): seeds {}..{} ({} runs{of}), {} crash states \
         in {:.2}s ({:.0} states/s)",
        s.workload,
        if s.bugs.is_empty() {
            "none".to_string()
        } else {
            s.bugs.join(", ")
        },
        args.seed,
        // The seeds this process went through (a shard spans the campaign's).
        args.seed.wrapping_add(if opts.shard.count > 1 {
            args.runs
        } else {
            s.runs
        }),
        s.runs,
        s.crash_states,
        s.seconds,
        s.states_per_second
    ));
    crate::race_cmd::emitln(&format!("failing runs: {}", s.failures));
    if let Some(seed) = s.first_failure_seed {
        crate::race_cmd::emitln(&format!("first failing seed: {seed}"));
    }
    if let Some(p) = reproducer {
        crate::race_cmd::emitln(&format!(
            "reproducer written to {0}\n{1}",
            p.display(),
            std::fs::read_to_string(p.join("oracle.txt")).unwrap_or_default()
        ));
        crate::race_cmd::emitln(&format!(
            "see it: crashmonkey fs campaign --replay {}",
            p.display()
        ));
    }
    if let Some(dir) = &args.out {
        crate::race_cmd::emitln(&format!(
            "campaign folder: {0} (its findings: crashmonkey findings {0})",
            dir.display()
        ));
    }
    if let Some(why) = &s.interrupted {
        let more = if args.out.is_some() {
            ", which are recorded; run the same command again to go on"
        } else {
            ""
        };
        eprintln!(
            "crashmonkey fs campaign: stopped by {why} after {} runs{more}",
            s.runs
        );
    }
    Ok(())
}

fn replay(args: &CampaignArgs) -> anyhow::Result<i32> {
    let dir = args.replay.as_ref().expect("replay path");
    let b = bundle::load(dir)?;
    let base = if args.defaults {
        Config {
            cache_limit_folios: b.config.cache_limit_folios,
            device_blocks: b.config.device_blocks,
            folio_blocks: b.config.folio_blocks,
            max_folio_blocks: b.config.max_folio_blocks,
            ..Config::default()
        }
    } else {
        b.config.clone()
    };
    let cfg = args.config(base)?;
    let tmp = tempfile::Builder::new()
        .prefix("crashmonkey-fs-")
        .tempdir_in(temp_root())?;
    let r = bundle::replay(&b, &cfg, tmp.path())?;
    let exact = cfg == b.config;
    if args.json {
        let v = serde_json::json!({
            "replay": dir.display().to_string(),
            "exact": exact,
            "state_found": r.state_found,
            "failed": r.failed(),
            "verdict": r.state_failure.as_ref().map(bundle::report),
            "race_failures": r.run.result.failures,
            "crash_states": r.run.states.checked,
        });
        crate::race_cmd::emitln(&serde_json::to_string_pretty(&v)?);
    } else {
        let what = match (&r.state_failure, exact) {
            (Some(f), _) => format!("FAILED\n{}", bundle::report(f)),
            (None, true) if !r.state_found => "the bundled crash state did not arise".into(),
            (None, true) => "PASSED: the bundled crash state keeps its promises".into(),
            (None, false) => format!(
                "PASSED: with these switches all {} crash states keep their promises",
                r.run.states.checked
            ),
        };
        crate::race_cmd::emitln(&format!("replay of {}: {what}", dir.display()));
    }
    Ok(if r.failed() { 1 } else { 0 })
}
