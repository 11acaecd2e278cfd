//! `crashmonkey race minimise BUNDLE [-o OUT]`: shrink a failing race run by delta debugging.
//!
//! Exit codes: 0 the minimised bundle was written; 2 the command could not run (the bundle
//! does not load, its run does not fail, the output exists, an IO error).

use clap::Args;
use crashmonkey::race::minimise::{self, RunSize, MINIMISE_RUNS_MAX};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
#[command(
    after_help = "Replays the bundle's failing run, then shrinks it by delta debugging \
while it keeps failing with the same failure signature (docs/campaigns.md): fewer operations \
(ddmin), shorter and 4096-aligned lengths and offsets, fewer preemptions in the schedule (the \
task that ran goes on instead of being switched away from), fewer injected short copies. The \
result is a bundle of its own with an exact schedule, written to a new folder (never over an \
existing file), and replayed like any other.\n\n\
Examples:\n  \
crashmonkey race minimise fixtures/race/race-seed-9079 -o /tmp/min   # then:\n  \
crashmonkey race --replay /tmp/min                                   # fails the same way\n  \
crashmonkey race minimise crashmonkey-out/race-seed-42      # writes .../race-seed-42/minimised\n  \
crashmonkey race --seed 1 --runs 2000 --no-iomap-valid --out camp --minimise   # every finding\n\n\
Exit status: 0 minimised, 2 error (a run that does not fail is refused)."
)]
pub struct MinimiseArgs {
    /// The failing run's bundle: a `race-seed-N` folder (or its bundle.json).
    #[arg(value_name = "BUNDLE")]
    pub bundle: PathBuf,
    /// The minimised bundle's folder, which must not exist [default: BUNDLE/minimised].
    #[arg(short, long, value_name = "OUT")]
    pub out: Option<PathBuf>,
    /// Candidate runs at most (each a full run of the model).
    #[arg(long, value_name = "N", default_value_t = MINIMISE_RUNS_MAX)]
    pub max_runs: u64,
    /// Print the minimisation report as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &MinimiseArgs) -> anyhow::Result<i32> {
    match minimise_cmd(args) {
        Ok(()) => Ok(0),
        Err(e) => {
            eprintln!("crashmonkey race minimise: error: {e:#}");
            Ok(2)
        }
    }
}

/// The folder a bundle path names (`bundle.json`'s folder for the file).
fn bundle_folder(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.to_path_buf()
    } else {
        p.parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    }
}

fn minimise_cmd(args: &MinimiseArgs) -> anyhow::Result<()> {
    use crate::race_cmd::emitln;
    let b = crashmonkey::race::load_bundle(&args.bundle)?;
    let out = args.out.clone().unwrap_or_else(|| {
        bundle_folder(&args.bundle).join(crashmonkey::folder::minimised::MINIMISED_DIR)
    });
    anyhow::ensure!(
        std::fs::symlink_metadata(&out).is_err(),
        "{} exists: minimisation never replaces a file; give another -o",
        out.display()
    );
    let bar = bar(args.max_runs);
    let m = minimise::minimise(&b, args.max_runs, &mut |runs, size| {
        if runs % 64 == 0 {
            bar.set_position(runs);
            bar.set_message(size_text(size));
        }
    });
    bar.finish_and_clear();
    let m = m?;
    minimise::write_minimised(&out, &m)?;
    if args.json {
        let mut v = serde_json::to_value(&m.report)?;
        v["bundle"] = out.display().to_string().into();
        emitln(&serde_json::to_string_pretty(&v)?);
    } else {
        emitln(minimise::summary_text(&m.report).trim_end());
        emitln(&format!(
            "minimised bundle written to {0}\nreplay it:  crashmonkey race --replay {0}",
            out.display()
        ));
    }
    Ok(())
}

/// A size in a few words, for the progress bar.
fn size_text(s: &RunSize) -> String {
    format!(
        "{} ops, {} bytes, {} preemptions, {} steps",
        s.ops, s.bytes, s.preemptions, s.schedule_steps
    )
}

/// A bar over the run budget (drawn only when stderr is a terminal); minimisation usually
/// ends well before the budget.
pub fn bar(runs_max: u64) -> ProgressBar {
    let bar = ProgressBar::new(runs_max);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} minimising: {pos}/{len} runs at most, now {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Shown by `race --out DIR --minimise` while it minimises the findings.
pub fn finding_text(n: usize, s: &RunSize) -> String {
    format!("finding #{n}: {}", size_text(s))
}

#[derive(Args, Debug)]
#[command(
    after_help = "Replays the bundle's run exactly (the same log), checks that its crash \
state still fails, then shrinks the state by delta debugging while it fails the same way (the \
same kind of mount error, first fsck problem and first oracle violation, digits aside): fewer \
writes of its epoch surviving whole, the torn write dropped or fewer of its atomic units \
landed. Every candidate is a state a power cut could leave (FUA writes before a kept write \
kept). The result is an fs bundle of its own (crash.img the minimised state), written to a new \
folder, never over an existing file; `fs campaign --replay` replays it.\n\n\
Examples:\n  \
crashmonkey fs minimise fixtures/fs/commit-without-flush/fs-seed-2 -o /tmp/min\n  \
crashmonkey fs campaign --replay /tmp/min                 # fails the same way (exit 1)\n  \
crashmonkey fs fsck /tmp/min/crash.img\n\n\
Exit status: 0 minimised, 2 error (a state that does not fail is refused)."
)]
pub struct FsMinimiseArgs {
    /// The fs campaign's bundle: an `fs-seed-N` folder (or its bundle.json).
    #[arg(value_name = "BUNDLE")]
    pub bundle: PathBuf,
    /// The minimised bundle's folder, which must not exist [default: BUNDLE/minimised].
    #[arg(short, long, value_name = "OUT")]
    pub out: Option<PathBuf>,
    /// Print the minimisation report as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `crashmonkey fs minimise`.
pub fn fs_minimise(args: &FsMinimiseArgs) -> anyhow::Result<i32> {
    use crashmonkey::fscore::{bundle, minimise as m};
    let b = bundle::load(&args.bundle)?;
    let out = args.out.clone().unwrap_or_else(|| {
        bundle_folder(&args.bundle).join(crashmonkey::folder::minimised::MINIMISED_DIR)
    });
    anyhow::ensure!(
        std::fs::symlink_metadata(&out).is_err(),
        "{} exists: minimisation never replaces a file; give another -o",
        out.display()
    );
    let tmp = tempfile::Builder::new()
        .prefix("crashmonkey-fs-")
        .tempdir_in(crashmonkey::fscore::campaign::temp_root())?;
    let spinner = ProgressBar::new_spinner().with_message("minimising the crash state");
    let r = m::minimise_state(&b, tmp.path());
    spinner.finish_and_clear();
    let r = r?;
    m::write_state_minimised(&out, &b, &r)?;
    if args.json {
        let mut v = serde_json::to_value(&r.report)?;
        v["bundle"] = out.display().to_string().into();
        crate::race_cmd::emitln(&serde_json::to_string_pretty(&v)?);
    } else {
        crate::race_cmd::emitln(m::summary_text(&r.report).trim_end());
        crate::race_cmd::emitln(&format!(
            "minimised bundle written to {0}\nreplay it:  crashmonkey fs campaign --replay {0}",
            out.display()
        ));
    }
    Ok(0)
}
