//! `crashmonkey report`: a campaign folder as one HTML page a person reads.
//!
//! Exit codes: 0 the report was written; 2 it could not be (not a campaign folder, a damaged
//! bundle, the output exists without `--force`, an IO error).

use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
#[command(
    after_help = "The report is one self-contained HTML file (inline CSS and SVG, no \
script, nothing fetched): the campaign, its findings most frequent first, and per finding its \
signature, counts, seeds, replay commands, the failure, the notes the model made, and an SVG \
timeline: a lane per task (the operations, flusher, IO completion, reclaim), its steps, where a \
mapping was cached, what may have made it stale, where it was used stale, and the step that \
made the wrong byte; then the run's device IO (epochs, writes, flushes, FUA, marks). Given one \
fs bundle, the page shows its crash state's verdict and its write log with the state on it: \
the writes kept, dropped and torn, the crash point, each write's role (data, metadata, \
journal) and the block holding the wrong byte. An fs campaign's folder (`fs campaign --out`) \
shows each of its findings so, with its counts and seeds. A `crashmonkey check --out` folder \
shows what the check found and, per failing state, its reason, the checker's output and the \
state on the write log the check read. A kernel campaign's folder (`kernel --out`) or an \
application run's (`run --out`) shows its findings by signature, each with its bundle, the \
command that shows it again and its report. It is \
written beside its target and renamed into place, so no partial report is ever left; an \
existing file is replaced only with --force.\n\n\
Examples:\n  \
crashmonkey race --seed 1 --runs 2000 --no-iomap-valid --out camp\n  \
crashmonkey report camp -o report.html\n  \
crashmonkey report camp -o report.html --force    # replace an older report\n  \
crashmonkey report fixtures/fs/commit-without-flush/fs-seed-2 -o crash.html\n  \
crashmonkey fs campaign --seed 1 --runs 400 --bug size-before-data --out fscamp\n  \
crashmonkey report fscamp -o fscamp.html\n  \
crashmonkey check disk.log --base base.img --checker 'fsck.ext4 -fn {image}' --out failed\n  \
crashmonkey report failed -o failed.html\n\n\
Exit status: 0 written, 2 error."
)]
pub struct ReportArgs {
    /// The campaign folder (`crashmonkey race --out DIR`, `fs campaign --out DIR`, `kernel
    /// --out DIR`, `run --out DIR` or `findings merge`), a `crashmonkey check --out DIR`
    /// folder, or one bundle
    /// folder (`race-seed-N`, or an fs crash bundle `fs-seed-N`).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// The HTML file to write.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: PathBuf,
    /// Replace FILE if it exists (without it, an existing file is never touched).
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: ReportArgs) -> anyhow::Result<i32> {
    let made = crashmonkey::report::report(&args.dir)
        .and_then(|html| crashmonkey::report::write_new(&args.output, html.as_bytes(), args.force));
    match made {
        Ok(()) => {
            eprintln!("crashmonkey report: wrote {}", args.output.display());
            Ok(0)
        }
        Err(e) => {
            eprintln!("crashmonkey report: error: {e}");
            Ok(2)
        }
    }
}
