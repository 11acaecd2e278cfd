//! `crashmonkey race`: seeded race campaigns over fs-core, and replay of their reproducers.
//!
//! Exit codes: 0 = no failure found (or the replay passed); 1 = failures found (or the
//! replayed reproducer failed again); 2 = the command could not run (bad bundle, IO error).

use clap::{Args, Subcommand};
use crashmonkey::race::{self, campaign, CampaignOptions, RunOutcome};
use fs_core::sched::{self, ReplayPolicy};
use fs_core::Config;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

/// Runs above which a progress bar is drawn (when stderr is a terminal).
const PROGRESS_RUNS_MIN: u64 = 1_000;

#[derive(Args, Debug)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  \
crashmonkey race --seed 1 --runs 2000 --no-iomap-valid      # finds stale-mapping corruption\n  \
crashmonkey race --seed 1 --runs 100000                     # the fixed model: no failure\n  \
crashmonkey race --seed 1 --runs 20000 --no-iomap-valid --out camp   # resumable; then:\n  \
crashmonkey findings camp                                   # its distinct findings\n  \
crashmonkey race --replay fixtures/race/race-seed-9079      # replay a reproducer exactly\n  \
crashmonkey race --replay fixtures/race/race-seed-9079 --defaults   # same schedule, fix on\n  \
crashmonkey race minimise fixtures/race/race-seed-9079 -o min   # shrink it (see race minimise -h)\n  \
crashmonkey race --seed 1 --runs 2000 --no-iomap-valid --out camp --minimise   # and each finding\n\n\
Exit status: 0 no failure found (replay passed), 1 failures found (replay failed), 2 error,\n\
130/143 stopped by SIGINT/SIGTERM (with --out: what ran is recorded; rerun to go on)."
)]
pub struct RaceArgs {
    #[command(subcommand)]
    pub cmd: Option<RaceCmd>,
    /// First seed; run i uses seed + i, which alone decides its workload and schedule.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Number of runs.
    #[arg(long, default_value_t = 1000)]
    pub runs: u64,
    #[command(flatten)]
    pub switches: crate::switches::Switches,
    /// Stop after this many failing runs (0 = run them all).
    #[arg(long, default_value_t = 0)]
    pub max_failures: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// The campaign folder (docs/campaigns.md): its runs are recorded there as they are done,
    /// with a bundle for each finding's first and smallest failing run, and the same command
    /// run again goes on where it stopped (after Ctrl-C, SIGKILL or a crash). A folder of
    /// another campaign is refused. Without --out, the smallest failing run's bundle is
    /// written to ./crashmonkey-out and nothing is recorded.
    #[arg(long, value_name = "DIR", conflicts_with = "no_bundle")]
    pub out: Option<PathBuf>,
    /// Do not write a reproducer bundle.
    #[arg(long)]
    pub no_bundle: bool,
    /// With --out: record the runs done every this many seconds of running (what a SIGKILL
    /// may make the rerun redo; each record costs a few syncs). It changes no result.
    #[arg(long, value_name = "SECONDS", default_value_t = crashmonkey::folder::record::RECORD_SECONDS_DEFAULT, requires = "out")]
    pub record_seconds: f64,
    /// Replay a reproducer bundle instead of running a campaign. With switch flags (or
    /// --defaults) the schedule is followed as far as the changed steps allow.
    #[arg(long)]
    pub replay: Option<PathBuf>,
    /// With --replay: start from the default (fixed) switches instead of the recorded ones
    /// (the page-cache limit, device and folio size stay as recorded).
    #[arg(long)]
    pub defaults: bool,
    /// Run only shard K of N of the campaign (run i when i % N == K): `K/N`, or `N` with K
    /// from JOB_COMPLETION_INDEX (Kubernetes Indexed Jobs) or SLURM_ARRAY_TASK_ID. Without
    /// it, a Slurm array (SLURM_ARRAY_TASK_COUNT set) shards by itself. The N shards' failing
    /// seeds together are the unsharded campaign's (docs/scale-out.md).
    #[arg(long, value_name = "K/N")]
    pub shard: Option<String>,
    /// With --out: once the campaign's runs are done, minimise each finding's smallest
    /// failing run by delta debugging (as `race minimise` does) and keep it inside that run's
    /// bundle as `minimised/`. A rerun minimises what is not minimised yet.
    #[arg(long, requires = "out")]
    pub minimise: bool,
}

#[derive(Subcommand, Debug)]
pub enum RaceCmd {
    /// Shrink a failing run's bundle by delta debugging to the smallest run that fails the
    /// same way: fewer operations, shorter ranges, fewer preemptions.
    Minimise(crate::minimise_cmd::MinimiseArgs),
}

impl RaceArgs {
    fn apply(&self, cfg: Config) -> Config {
        self.switches.apply(cfg)
    }
}

/// The campaign's summary in words.
fn print_text(
    args: &RaceArgs,
    shard: crashmonkey::shard::Shard,
    summary: &campaign::CampaignSummary,
    config: &Config,
    bundle_dir: Option<&std::path::Path>,
) {
    let of = if shard.count > 1 {
        format!(", shard {shard}")
    } else {
        String::new()
    };
    emitln(&format!(
        "race campaign: seeds {}..{} ({} runs{of}) in {:.2}s, {:.0} runs/s",
        args.seed,
        // The seeds this process went through (a shard spans the campaign's).
        args.seed.wrapping_add(if shard.count > 1 {
            args.runs
        } else {
            summary.runs
        }),
        summary.runs,
        summary.seconds,
        summary.runs as f64 / summary.seconds.max(1e-9)
    ));
    emitln(&format!(
        "switches: {}",
        campaign::switches(config).replace(", cache_limit=4 folios", "")
    ));
    emitln(&format!("failing runs: {}", summary.failures));
    if let Some(first) = summary.first_failure_seed {
        emitln(&format!("first failing seed: {first}"));
    }
    if let Some(smallest) = &summary.smallest {
        emitln(&format!(
            "\nthe failing run with the fewest steps:\n{}",
            race::describe_failure(smallest)
        ));
        if let Some(d) = bundle_dir {
            emitln(&format!("reproducer written to {}", d.display()));
            emitln(&format!(
                "replay it:            crashmonkey race --replay {}",
                d.display()
            ));
            emitln(&format!(
                "replay with the fix:  crashmonkey race --replay {} --defaults",
                d.display()
            ));
        }
    }
}

/// Print a line to stdout; a closed pipe (`| head`) ends the output quietly, no panic.
pub(crate) fn emitln(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out
        .write_all(text.as_bytes())
        .and_then(|()| out.write_all(b"\n"));
}

pub fn run(args: RaceArgs) -> anyhow::Result<i32> {
    if let Some(RaceCmd::Minimise(m)) = &args.cmd {
        return crate::minimise_cmd::run(m);
    }
    let r = if let Err(e) = args.switches.check() {
        Err(e)
    } else if args.replay.is_some() {
        replay(&args)
    } else {
        campaign_cmd(&args)
    };
    match r {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("crashmonkey race: error: {e:#}");
            Ok(2)
        }
    }
}

fn campaign_cmd(args: &RaceArgs) -> anyhow::Result<i32> {
    let shard = crashmonkey::shard::resolve(args.shard.as_deref()).map_err(anyhow::Error::msg)?;
    let opts = CampaignOptions {
        seed: args.seed,
        runs: args.runs,
        config: args.apply(Config::default()),
        max_failures: args.max_failures,
        shard,
    };
    let stop = crashmonkey::check::StopFlag::new();
    let (summary, bundle_dir) = match &args.out {
        Some(dir) => {
            crate::crash_cmd::stop_on_signals(&stop)?;
            folder_campaign(dir, &opts, args, &stop)?
        }
        None => plain_campaign(args, &opts)?,
    };
    if args.json {
        let first = summary.first.as_ref().map(first_failure_json);
        let v = serde_json::json!({
            "seed": args.seed,
            "shard": shard.to_string(),
            "runs": summary.runs,
            "failures": summary.failures,
            "first_failure_seed": summary.first_failure_seed,
            "seconds": summary.seconds,
            "runs_per_second": summary.runs as f64 / summary.seconds.max(1e-9),
            "steps": summary.steps,
            "failing_seeds": summary.failing_seeds,
            "switches": opts.config,
            "first_failure": first,
            "smallest_failure_seed": summary.smallest_failure_seed,
            "smallest_failure": summary.smallest.as_ref().map(first_failure_json),
            "reproducer": bundle_dir.as_ref().map(|d| d.display().to_string()),
        });
        emitln(&serde_json::to_string_pretty(&v)?);
    } else {
        print_text(args, shard, &summary, &opts.config, bundle_dir.as_deref());
        if let Some(dir) = &args.out {
            emitln(&format!(
                "campaign folder: {0} (its findings: crashmonkey findings {0})",
                dir.display()
            ));
        }
    }
    if let Some(signal) = stop.signal() {
        eprintln!(
            "crashmonkey race: stopped by {} after {} runs, which are recorded; run the same \
             command again to go on",
            crashmonkey::checker::signal_name(signal),
            summary.runs
        );
        return Ok(128 + signal);
    }
    Ok(if summary.failures > 0 { 1 } else { 0 })
}

/// A progress bar over a shard's `own` runs that starts at the `done` ones (`failures` of
/// them failing), and whose rate and ETA count only the runs made now.
fn progress_bar(own: u64, done: u64, failures: u64) -> ProgressBar {
    use indicatif::ProgressDrawTarget;
    if own < PROGRESS_RUNS_MIN {
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
            "{elapsed_precise} [{bar:40}] {pos}/{len} runs ({rate}), {msg}, ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key(
            "rate",
            |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0}/s", s.per_sec());
            },
        ),
    );
    bar.set_message(format!("{failures} failing"));
    bar.set_draw_target(ProgressDrawTarget::stderr());
    bar
}

/// Runs between progress bar updates.
const PROGRESS_EVERY_RUNS: u64 = 256;

/// A campaign without a folder: the smallest failing run's bundle goes to ./crashmonkey-out.
fn plain_campaign(
    args: &RaceArgs,
    opts: &CampaignOptions,
) -> anyhow::Result<(campaign::CampaignSummary, Option<PathBuf>)> {
    let bar = progress_bar(opts.shard.share_of(opts.runs), 0, 0);
    let summary = race::run_campaign(opts, &mut |done, failures| {
        if done % PROGRESS_EVERY_RUNS == 0 {
            bar.set_position(done);
            bar.set_message(format!("{failures} failing"));
        }
    });
    bar.finish_and_clear();
    let mut bundle_dir = None;
    if let Some(smallest) = &summary.smallest {
        if !args.no_bundle {
            bundle_dir = Some(race::write_bundle(
                std::path::Path::new(DEFAULT_OUT),
                smallest,
            )?);
        }
    }
    Ok((summary, bundle_dir))
}

/// Where a campaign without --out writes its bundle.
const DEFAULT_OUT: &str = "crashmonkey-out";

/// A campaign in folder `dir`: resumed if the folder holds its records.
fn folder_campaign(
    dir: &std::path::Path,
    opts: &CampaignOptions,
    args: &RaceArgs,
    stop: &crashmonkey::check::StopFlag,
) -> anyhow::Result<(campaign::CampaignSummary, Option<PathBuf>)> {
    use crashmonkey::folder::{campaign::RaceFolder, RaceParams};
    let mut folder = RaceFolder::open(
        dir,
        RaceParams {
            seed: opts.seed,
            runs: opts.runs,
            config: opts.config.clone(),
            max_failures: opts.max_failures,
            shard: opts.shard.to_string(),
        },
    )?;
    folder.record_every(args.record_seconds);
    let done = folder.done()?;
    if done.runs > 0 {
        tracing::info!(runs = done.runs, "resuming: runs already recorded");
    }
    let bar = progress_bar(opts.shard.share_of(opts.runs), done.runs, done.failures);
    let summary = folder.run(
        opts,
        &mut |p| {
            if p.runs % PROGRESS_EVERY_RUNS == 0 {
                bar.set_position(p.runs);
                bar.set_message(format!("{} failing, {} findings", p.failures, p.findings));
            }
        },
        &|| stop.signal().is_some(),
    )?;
    bar.finish_and_clear();
    if args.minimise && stop.signal().is_none() {
        minimise_findings(&folder)?;
    }
    let bundle = summary.smallest_failure_seed.map(|s| folder.bundle_dir(s));
    Ok((summary, bundle))
}

/// `race --out DIR --minimise`: each finding's smallest run, minimised into its bundle.
fn minimise_findings(folder: &crashmonkey::folder::campaign::RaceFolder) -> anyhow::Result<()> {
    use crashmonkey::race::minimise::MINIMISE_RUNS_MAX;
    let bar = crate::minimise_cmd::bar(MINIMISE_RUNS_MAX);
    let made = folder.minimise(MINIMISE_RUNS_MAX, &mut |n, runs, size| {
        if runs % 64 == 0 {
            bar.set_position(runs);
            bar.set_message(crate::minimise_cmd::finding_text(n, size));
        }
    });
    bar.finish_and_clear();
    tracing::info!(minimised = made?, "findings minimised");
    Ok(())
}

fn first_failure_json(o: &RunOutcome) -> serde_json::Value {
    let ops: Vec<&fs_core::Op> = o.generated.workload.ops().collect();
    serde_json::json!({
        "seed": o.seed,
        "failures": o.result.failures,
        "summary": o.result.failures.first().map(|f| campaign::failure_line(f, &ops)),
        "steps": o.result.steps,
    })
}

fn replay(args: &RaceArgs) -> anyhow::Result<i32> {
    let dir = args.replay.as_ref().expect("replay path");
    let b = race::load_bundle(dir)?;
    let base = if args.defaults {
        Config {
            cache_limit_folios: b.config.cache_limit_folios,
            device_blocks: b.config.device_blocks,
            folio_blocks: b.config.folio_blocks,
            max_folio_blocks: b.config.max_folio_blocks,
            direct_writes: b.config.direct_writes,
            ..Config::default()
        }
    } else {
        b.config.clone()
    };
    let cfg = args.apply(base);
    let strict = cfg == b.config;
    let mut policy = if strict {
        ReplayPolicy::new(b.schedule.clone(), true)
    } else {
        ReplayPolicy::lenient(b.schedule.clone(), b.trace.clone())
    };
    let result = sched::run(&cfg, &b.workload, &mut policy);
    let same = result.failures == b.failures;
    let outcome = RunOutcome {
        seed: b.seed,
        generated: race::workload::Generated {
            workload: b.workload.clone(),
            cache_limit_folios: cfg.cache_limit_folios,
            policy: race::PolicyKind::Random,
            policy_seed: 0,
        },
        cfg: cfg.clone(),
        result,
    };
    if args.json {
        let ops: Vec<&fs_core::Op> = b.workload.ops().collect();
        let v = serde_json::json!({
            "replay": dir.display().to_string(),
            "strict": strict,
            "divergences": policy.divergences,
            "passed": outcome.result.passed(),
            "same_failures_as_recorded": same,
            "failures": outcome.result.failures,
            "summary": outcome.result.failures.first().map(|f| campaign::failure_line(f, &ops)),
        });
        emitln(&serde_json::to_string_pretty(&v)?);
    } else {
        emitln(&race::describe_failure(&outcome).replacen(
            "(Random policy",
            "(replayed schedule",
            1,
        ));
        if strict {
            emitln(&format!(
                "replay: {} ({})",
                if outcome.result.passed() {
                    "PASSED"
                } else {
                    "FAILED"
                },
                if same {
                    "the same verdict as recorded"
                } else {
                    "a DIFFERENT verdict from the recorded one"
                }
            ));
        } else {
            emitln(&format!(
                "replay with changed switches: {} ({} steps could not follow the recorded schedule)",
                if outcome.result.passed() { "PASSED" } else { "FAILED" },
                policy.divergences
            ));
        }
    }
    Ok(if outcome.result.passed() { 0 } else { 1 })
}
