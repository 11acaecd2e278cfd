//! `crashmonkey run`: any application's workload and checker on ext4, XFS or btrfs
//! (docs/kernel-campaigns.md, "Application campaigns"), and `crashmonkey mark`, which the
//! workload calls to put a mark in the write log.
//!
//! Exit codes: 0 no finding; 1 findings; 2 the run could not run (or was stopped).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use crashmonkey::checker::StopFlag;
use crashmonkey::kernel::app::{run_app, AppParams, AppResult, AppRun};
use crashmonkey::kernel::app_folder::{AppFolder, Opened};
use crashmonkey::kernel::{FsKind, KernelError};

const EXAMPLES: &str = "\
A sparse image formatted (--fs, --size, --mkfs-opts) is served by an in-process recording \
nbd-server (Unix socket), attached with nbdfuse and a loop device and mounted (--mount-opts). \
The workload runs as `sh -c CMD` with the mount point in $CRASHMONKEY_MNT; it calls \
`crashmonkey mark NAME` (first on its PATH) to put a mark in the write log at that moment, \
after each point the application promises something (a COMMIT that returned, say). After the \
unmount, every crash state (at each mark the durable state, only what FLUSH and FUA made \
durable, and the prefix state, every write before the mark; then the final state) is mounted \
from a copy at a temporary mount point (recovery runs) and the checker runs with these \
replaced, each by one quoted shell word (write them bare):
  {mnt}    the state's mount point        {image}  the state's image as the power cut left it
  {mark}   the last mark at the state     {state}  durable, prefix or final
A checker that does not exit 0, or a state that does not mount, is a failing state.

Needs root, /dev/fuse, loop devices, nbdfuse and the filesystem's mkfs.

Examples:
  sudo crashmonkey run --fs ext4 \\
      --workload 'sh fixtures/apps/sqlite/workload.sh FULL' \\
      --checker 'sh fixtures/apps/sqlite/check.sh {mnt} {mark}'
  sudo crashmonkey run --fs xfs --size 512M --mount-opts noatime --lying-disk \\
      --workload 'cd $CRASHMONKEY_MNT && echo hi > f && sync f && crashmonkey mark wrote' \\
      --checker 'test {mark} != wrote || grep -q hi {mnt}/f' --out camp

Exit status: 0 no finding, 1 findings, 2 error or stopped.";

#[derive(Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct RunArgs {
    /// The filesystem: ext4, xfs or btrfs.
    #[arg(long, value_parser = parse_fs)]
    pub fs: FsKind,
    /// Size of the disk: 4096, 64M, 1G (default: 64M for ext4, 128M for XFS and btrfs).
    #[arg(long, value_parser = nbd_server::export::parse_size)]
    pub size: Option<u64>,
    /// Options for mkfs.FS, as shell words (default: `-b 4096` for ext4, none for the
    /// others). Write it `--mkfs-opts='-O ^has_journal'` when it starts with a dash.
    #[arg(long, value_name = "OPTS", allow_hyphen_values = true)]
    pub mkfs_opts: Option<String>,
    /// Extra `mount -o` options (comma-separated), for the recorded mount and every state's.
    #[arg(long, value_name = "OPTS", default_value = "")]
    pub mount_opts: String,
    /// The application's workload, run by `sh -c` (its own process group, a deadline of
    /// 600 s). $CRASHMONKEY_MNT is the mount point.
    #[arg(long, value_name = "CMD")]
    pub workload: String,
    /// The checker, run by `sh -c` on every crash state with {mnt}, {image}, {mark} and
    /// {state} replaced (a deadline of 300 s each). Exit 0: the state is fine.
    #[arg(long, value_name = "CMD")]
    pub checker: String,
    /// Keep the run in this folder (made when missing or empty): a bundle per finding
    /// (commands, write log, state image, checker output, README), findings.jsonl. The same
    /// command on a folder of this run resumes it: done, it prints the stored summary and
    /// runs nothing; interrupted, it runs again. Any other folder is refused.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// A lying disk (export key flush=ignore): FLUSH and FUA answered, nothing made
    /// durable. Proves the checker: it must find what a power cut then loses.
    #[arg(long)]
    pub lying_disk: bool,
}

/// `crashmonkey mark NAME`: a mark in the write log of the running `crashmonkey run` (or
/// of any nbd-server control socket).
#[derive(Args, Debug)]
pub struct MarkArgs {
    /// The control socket (default: $CRASHMONKEY_CONTROL, which `crashmonkey run` sets).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// The mark's name (letters, digits and punctuation, no spaces).
    pub name: String,
}

fn parse_fs(s: &str) -> Result<FsKind, String> {
    FsKind::parse(s).ok_or_else(|| format!("{s:?}: ext4, xfs or btrfs"))
}

/// Puts the mark in the write log; it is there, in order with the disk's IO, when this
/// returns.
pub fn mark(a: MarkArgs) -> anyhow::Result<i32> {
    let socket = match a.socket {
        Some(s) => s,
        None => std::env::var_os("CRASHMONKEY_CONTROL")
            .map(PathBuf::from)
            .context("no --socket and no $CRASHMONKEY_CONTROL (run this under crashmonkey run)")?,
    };
    place_mark(&socket, &a.name)?;
    Ok(0)
}

/// Puts mark `name` in the write log of the disk served with control socket `socket`
/// (`crashmonkey mark`, and `kernel-mark` before its snapshot).
pub fn place_mark(socket: &std::path::Path, name: &str) -> anyhow::Result<()> {
    nbd_server::control::request(socket, &format!("mark {name}"))
        .map_err(anyhow::Error::msg)
        .context("placing the mark")?;
    Ok(())
}

pub fn run(a: RunArgs) -> anyhow::Result<i32> {
    match go(&a) {
        Ok(findings) => Ok(i32::from(findings > 0)),
        Err(e) => {
            eprintln!("crashmonkey run: error: {e:#}");
            Ok(2)
        }
    }
}

fn go(a: &RunArgs) -> anyhow::Result<usize> {
    anyhow::ensure!(
        crate::kernel_cmd::nix_root(),
        "crashmonkey run needs root (loop devices, mount)"
    );
    let stop = StopFlag::new();
    crate::crash_cmd::stop_on_signals(&stop)?;
    let params = AppParams {
        fs: a.fs,
        size_bytes: a.size.unwrap_or(a.fs.disk_bytes()),
        mkfs_opts: a.mkfs_opts.clone().unwrap_or_else(|| match a.fs {
            FsKind::Ext4 => "-b 4096".into(),
            FsKind::Xfs | FsKind::Btrfs => String::new(),
        }),
        mount_opts: a.mount_opts.clone(),
        workload: a.workload.clone(),
        checker: a.checker.clone(),
        lying_disk: a.lying_disk,
    };
    let folder = match a
        .out
        .as_deref()
        .map(|d| AppFolder::open(d, &params))
        .transpose()?
    {
        Some(Opened::Done(summary)) => return Ok(done_already(a, &summary)),
        Some(Opened::Run(f)) => Some(f),
        None => None,
    };
    eprintln!(
        "crashmonkey run: {} ({} bytes) on {} disk",
        a.fs.name(),
        params.size_bytes,
        if a.lying_disk { "a lying" } else { "an honest" },
    );
    let t = Instant::now();
    let run = run_app(params, &stop).map_err(|e| stopped(e, &stop))?;
    let summary = summary(&run, t.elapsed().as_secs_f64(), a.out.as_ref());
    if let Some(f) = &folder {
        f.keep(&run, &summary)?;
    }
    print(&run.result, &summary, a.json);
    Ok(run.result.signatures().len())
}

/// A run whose folder holds it done: its stored summary is the answer; the number of
/// findings.
fn done_already(a: &RunArgs, summary: &serde_json::Value) -> usize {
    let dir = a.out.as_deref().unwrap_or(Path::new("."));
    eprintln!(
        "crashmonkey run: {} holds this run, done; nothing runs again (its findings: \
         crashmonkey findings {})",
        dir.display(),
        dir.display()
    );
    if a.json {
        println!("{summary}");
    } else {
        println!(
            "{} states, {} failing, {} findings (as stored in {})",
            summary["states"],
            summary["failing_states"],
            summary["findings"],
            dir.join("summary.json").display()
        );
    }
    summary["findings"].as_u64().unwrap_or(0) as usize
}

fn stopped(e: KernelError, stop: &StopFlag) -> anyhow::Error {
    match (stop.signal(), e) {
        (Some(s), _) => anyhow::anyhow!("stopped by signal {s} (everything undone)"),
        (None, KernelError::Script { end, output }) => {
            anyhow::anyhow!("the workload failed ({end}); nothing was checked:\n{output}")
        }
        (None, e) => e.into(),
    }
}

/// The machine summary (`--json`, and `summary.json` in the folder).
fn summary(run: &AppRun, seconds: f64, out: Option<&PathBuf>) -> serde_json::Value {
    let r = &run.result;
    let failing: Vec<serde_json::Value> = r
        .failing
        .iter()
        .map(|f| {
            let mut output = f.output.clone();
            let cap = crashmonkey::kernel::app::APP_OUTPUT_SUMMARY_BYTES_MAX;
            output.truncate(output.floor_char_boundary(cap));
            serde_json::json!({
                "signature": f.signature, "mark": f.mark, "state": f.which,
                "mounted": f.mounted, "checker_end": f.checker_end, "output": output,
            })
        })
        .collect();
    serde_json::json!({
        "fs": run.params.fs.name(),
        "lying_disk": run.params.lying_disk,
        "marks": r.marks,
        "states": r.states,
        "failing_states": r.failing.len(),
        "findings": r.signatures().len(),
        "signatures": r.signatures(),
        "failing": failing,
        "seconds": seconds,
        "workload_seconds": r.workload_seconds,
        "build_seconds": r.build_seconds,
        "mount_seconds": r.mount_seconds,
        "checker_seconds": r.checker_seconds,
        "out": out,
    })
}

fn print(r: &AppResult, summary: &serde_json::Value, json: bool) {
    if json {
        println!("{summary}");
        return;
    }
    for f in &r.failing {
        println!(
            "state {} ({} at mark {:?}): {}",
            f.index,
            f.which.name(),
            f.mark,
            f.signature
        );
        for line in f.output.lines().take(5) {
            println!("    {line}");
        }
    }
    println!(
        "run: {} marks, {} crash states, {} failing, {} findings; {:.1} s (workload {:.1} s, \
         state images {:.1} s, mount and unmount {:.1} s, checker {:.1} s)",
        r.marks.len(),
        r.states,
        r.failing.len(),
        r.signatures().len(),
        summary["seconds"].as_f64().unwrap_or_default(),
        r.workload_seconds,
        r.build_seconds,
        r.mount_seconds,
        r.checker_seconds,
    );
    for sig in r.signatures() {
        println!("  finding: {sig}");
    }
}
