//! `crashmonkey findings`: what campaign folders found, merged folders, and a rebuilt index.
//!
//! Exit codes: 0 the folder holds no finding; 1 it holds findings; 2 the command could not
//! run (not a campaign folder, a damaged index or bundle, an IO error).

use clap::{Args, Subcommand};
use crashmonkey::folder::{self, Findings};
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "A campaign folder is what `crashmonkey race --out DIR` or `crashmonkey fs \
campaign --out DIR` writes (docs/campaigns.md), or `crashmonkey kernel --out DIR` and `crashmonkey \
run --out DIR` (docs/kernel-campaigns.md: their findings.jsonl by signature): run records, one bundle per finding's first and smallest failing run, and \
a sled index derived from them. A finding is every failing run with one failure signature: the \
kind of failure, the oracle's violation, the kind of operation that lost data, the switches.\n\n\
Examples:\n  \
crashmonkey race --seed 1 --runs 20000 --no-iomap-valid --out camp\n  \
crashmonkey findings camp                         # distinct findings, with counts\n  \
crashmonkey findings camp --json\n  \
crashmonkey fs campaign --seed 1 --runs 400 --bug size-before-data --out fscamp\n  \
crashmonkey findings fscamp                       # an fs campaign's crash findings\n  \
crashmonkey findings merge all shard0 shard1 shard2   # the union of shards' folders\n  \
crashmonkey findings merge kall k0 k1             # a kernel campaign's shards, as one run's\n  \
crashmonkey findings reindex camp                 # rebuild the index from the files\n\n\
Exit status: 0 no finding, 1 findings, 2 error."
)]
pub struct FindingsArgs {
    #[command(subcommand)]
    pub cmd: Option<FindingsCmd>,
    /// The campaign folder to read.
    #[arg(value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum FindingsCmd {
    /// Merge campaign folders (shards of one campaign, or several campaigns) into a new one:
    /// the union of their runs, each finding's counts summed, its first and smallest run kept.
    /// Kernel campaign folders merge only with the other shards of their campaign, into the
    /// folder the unsharded campaign writes (docs/kernel-campaigns.md).
    Merge {
        /// The new folder (it must not exist, or be empty).
        out: PathBuf,
        /// The folders to merge.
        #[arg(required = true, value_name = "DIR")]
        dirs: Vec<PathBuf>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild a folder's index from its run records and bundles alone (after damage, or to
    /// check it): the findings read the same as before.
    Reindex {
        dir: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: FindingsArgs) -> anyhow::Result<i32> {
    let r = match (&args.cmd, &args.dir) {
        (Some(FindingsCmd::Merge { out, dirs, json }), _)
            if dirs
                .iter()
                .any(|d| crashmonkey::kernel::findings::folder_kind(d).is_some()) =>
        {
            let merged = crashmonkey::kernel::merge::merge(out, dirs);
            return show_kernel(merged, out, *json);
        }
        (Some(FindingsCmd::Merge { out, dirs, json }), _) => {
            folder::merge(out, dirs).map(|f| (f, out.clone(), *json))
        }
        (Some(FindingsCmd::Reindex { dir, json }), _) => {
            folder::reindex(dir).map(|f| (f, dir.clone(), *json))
        }
        (None, Some(dir)) if crashmonkey::kernel::findings::folder_kind(dir).is_some() => {
            return kernel_findings(dir, args.json);
        }
        (None, Some(dir)) => folder::findings(dir).map(|f| (f, dir.clone(), args.json)),
        (None, None) => {
            eprintln!("crashmonkey findings: give a campaign folder (see --help)");
            return Ok(2);
        }
    };
    match r {
        Ok((f, dir, json)) => {
            show(&f, &dir, json)?;
            if let Some(first) = f.orphan_bundles.first() {
                eprintln!(
                    "crashmonkey findings: note: {} bundle folder(s) no finding names, first {} \
                     (left by an interrupted campaign; they change no answer, and running the \
                     campaign again removes them)",
                    f.orphan_bundles.len(),
                    first.display()
                );
            }
            Ok(if f.findings.is_empty() { 0 } else { 1 })
        }
        Err(e) => {
            eprintln!("crashmonkey findings: error: {e}");
            Ok(2)
        }
    }
}

/// `crashmonkey findings DIR` of a kernel campaign's (`kernel --out`) or a run's (`run
/// --out`) folder: its findings by signature, most frequent first.
fn kernel_findings(dir: &Path, json: bool) -> anyhow::Result<i32> {
    show_kernel(crashmonkey::kernel::findings::read(dir), dir, json)
}

/// Shows a kernel or run folder's findings (or why they could not be read): the exit code.
fn show_kernel(
    read: Result<crashmonkey::kernel::findings::KernelFindings, crashmonkey::kernel::KernelError>,
    dir: &Path,
    json: bool,
) -> anyhow::Result<i32> {
    use crate::race_cmd::emitln;
    let f = match read {
        Ok(f) => f,
        Err(e) => {
            eprintln!("crashmonkey findings: error: {e}");
            return Ok(2);
        }
    };
    if json {
        emitln(&serde_json::to_string_pretty(&f)?);
    } else {
        emitln(&format!(
            "{}: a {} folder, {} workloads, {} failing states, {} distinct findings",
            dir.display(),
            if f.kind == "app" {
                "run"
            } else {
                "kernel campaign"
            },
            f.workloads,
            f.failing_states,
            f.findings.len()
        ));
        for (n, x) in f.findings.iter().enumerate() {
            let first = &x.first;
            emitln(&format!(
                "\n#{n} {} failing states: {}\n   first: {} mark {} ({} state)\n   bundle: {}\n   \
                 again (in the bundle): {}",
                x.count,
                x.signature,
                first["workload"]
                    .as_str()
                    .map_or("the run at".to_owned(), |w| format!("workload {w},")),
                first["mark"],
                first["state"].as_str().unwrap_or_default(),
                dir.join(&x.bundle).display(),
                x.again
            ));
        }
    }
    Ok(i32::from(!f.findings.is_empty()))
}

fn show(f: &Findings, dir: &Path, json: bool) -> anyhow::Result<()> {
    use crate::race_cmd::emitln;
    if json {
        emitln(&serde_json::to_string_pretty(f)?);
        return Ok(());
    }
    emitln(&format!(
        "{}: {} runs, {} failing, {} distinct findings",
        dir.display(),
        f.runs,
        f.failing_runs,
        f.findings.len()
    ));
    for (n, x) in f.findings.iter().enumerate() {
        let replay = if folder::is_fs_signature(&x.signature) {
            "fs campaign --replay"
        } else {
            "race --replay"
        };
        emitln(&format!(
            "\n#{n} {} runs: {} ({}), data lost by: {}\n   switches: {}\n   first seed {}, \
             smallest seed {} ({} steps); seeds {:?}{}\n   replay: crashmonkey {replay} {}",
            x.count,
            x.kind,
            x.violation,
            x.lost_by,
            x.switches,
            x.first_seed,
            x.smallest_seed,
            x.smallest_steps,
            x.seeds,
            if x.count > x.seeds.len() as u64 {
                " ..."
            } else {
                ""
            },
            dir.join(&x.bundle).display()
        ));
        if let Some(m) = &x.minimised {
            emitln(&minimised_text(m, dir));
        }
        if let Some(m) = &x.minimised_state {
            emitln(&minimised_state_text(m, dir));
        }
    }
    Ok(())
}

/// The smallest reproducer of a finding and what minimisation removed from it.
fn minimised_text(m: &crashmonkey::folder::minimised::MinimisedRun, dir: &Path) -> String {
    let (b, a) = (&m.before, &m.after);
    format!(
        "   smallest reproducer (minimised in {} runs): {} ops ({} removed), {} bytes ({} \
         shortened), {} preemptions ({} removed), {} steps (was {})\n   replay: crashmonkey \
         race --replay {}",
        m.runs,
        a.ops,
        b.ops - a.ops,
        a.bytes,
        b.bytes.saturating_sub(a.bytes),
        a.preemptions,
        b.preemptions.saturating_sub(a.preemptions),
        a.schedule_steps,
        b.schedule_steps,
        dir.join(&m.bundle).display()
    )
}

/// The smallest reproducer of an fs finding: its crash state minimised.
fn minimised_state_text(
    m: &crashmonkey::folder::fs_campaign::MinimisedState,
    dir: &Path,
) -> String {
    let (b, a) = (&m.before, &m.after);
    format!(
        "   smallest reproducer (crash state minimised in {} checks): {} writes kept whole \
         (was {}), {} torn (was {}), {} torn bytes landed (was {})\n   replay: crashmonkey fs \
         campaign --replay {}",
        m.checks,
        a.kept,
        b.kept,
        a.torn,
        b.torn,
        a.torn_bytes,
        b.torn_bytes,
        dir.join(&m.bundle).display()
    )
}
