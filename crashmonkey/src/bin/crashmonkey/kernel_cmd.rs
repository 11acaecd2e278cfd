//! `crashmonkey kernel`: crash campaigns on the kernel's own filesystems (docs/kernel-campaigns.md),
//! and `crashmonkey kernel-mark`, which a workload's script calls at each mark.
//!
//! Exit codes: 0 no finding; 1 findings; 2 the campaign could not run (or was stopped).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use crashmonkey::checker::StopFlag;
use crashmonkey::kernel::campaign::WorkloadRun;
use crashmonkey::kernel::campaign::{Campaign, KernelParams, WorkloadResult};
use crashmonkey::kernel::folder::Folder;
use crashmonkey::kernel::jobs::{run_in_order, KERNEL_JOBS_MAX};
use crashmonkey::kernel::{snapshot, FsKind, KernelError};
use crashmonkey::workload::{ace, KWorkload};

const EXAMPLES: &str = "\
For each workload: a copy of a base image formatted once, served by an in-process recording \
nbd-server (Unix socket), attached with nbdfuse and a loop device, mounted; the workload's \
shell script run as real system calls, with a mark and a snapshot of the tree after each \
persistence point; unmounted. Then at every mark two crash states, the durable one (only \
what FLUSH and FUA made durable) and the prefix (every write before the mark), and with \
--reorder and --torn the states between them and torn writes, each mounted \
from a copy so recovery runs, compared with what the persistence points promised (fsync: \
the file's data, size, mode and user.* xattrs; fdatasync: the data and size, under a name \
the file already had; fsync of a directory: its entries, mode and xattrs; sync: \
everything), and checked with the filesystem's fsck read-only (e2fsck -fn, xfs_repair -n, btrfs check \
--readonly). A state that does not mount, breaks a promise or fails fsck is a finding.

With --jobs J, J workloads run at once, each with its own server, nbdfuse mount, loop \
device and mount point; the output, summary and campaign folder are those of --jobs 1. \
Needs root, /dev/fuse, loop devices, nbdfuse, xfs_io, setfattr and the filesystem's mkfs \
and fsck.

Examples:
  sudo crashmonkey kernel --fs ext4 --workload ace --seq 1 --limit 10
  sudo crashmonkey kernel --fs xfs --workload ace --seq 1 --limit 5 --lying-disk   # findings
  sudo crashmonkey kernel --fs ext4 --workload ace --seq 2 --seed 7 --limit 50 --out camp
  sudo crashmonkey kernel --fs ext4 --limit 30 --reorder --torn --jobs 2   # more states, 2 at once
  sudo crashmonkey kernel --fs ext4 --workload camp/findings/X/workload.txt   # one workload again

Exit status: 0 no finding, 1 findings, 2 error or stopped (a campaign folder resumes).";

#[derive(Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct KernelArgs {
    /// The filesystem to test: ext4, xfs or btrfs.
    #[arg(long, value_parser = parse_fs)]
    pub fs: FsKind,
    /// `ace` (the generated ACE-style workloads, see --seq), a workload file, or a folder of
    /// workload files (*.txt; docs/kernel-workloads.md).
    #[arg(long, default_value = "ace")]
    pub workload: String,
    /// ACE sequence length: 1 (every core operation with every persistence point) or 2 (a
    /// seeded sample of two in a row).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2), default_value_t = 1)]
    pub seq: u8,
    /// At most this many workloads (--seq 2: the sample's size; default 100).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Seed of every random choice (the --seq 2 sample, the --reorder sample, the --torn
    /// tear points); printed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Workloads run at once (1 to 8), each with its own server, nbdfuse mount, loop device,
    /// mount point and work folder; results are reported in the workloads' order, as with 1.
    /// Example: --jobs 2.
    #[arg(long, default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=KERNEL_JOBS_MAX as u64))]
    pub jobs: u64,
    /// Keep the campaign in this folder (made if missing; resumed when it holds the same
    /// campaign; refused when it holds anything else): done records, finding bundles, index.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Run only shard K of N of the workloads (workload i when i % N == K): `K/N`.
    #[arg(long, value_name = "K/N")]
    pub shard: Option<String>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// A lying disk (export key flush=ignore): FLUSH and FUA answered, nothing made
    /// durable. Proves the checker: it must find what a power cut then loses.
    #[arg(long)]
    pub lying_disk: bool,
    /// Also check reorder states at each mark with writes pending: the durable state plus
    /// one pending write, the prefix minus one (at most 16 a mark, sampled with --seed).
    #[arg(long)]
    pub reorder: bool,
    /// Also check torn states at each mark with writes pending: the durable state plus the
    /// first 512-byte sectors of one pending write, the rest of it old (tear point drawn with
    /// --seed; at most 16 a mark). Their findings say `in torn states`.
    #[arg(long)]
    pub torn: bool,
}

/// `crashmonkey kernel-mark`: called by a workload's script at each mark.
#[derive(Args, Debug)]
pub struct KernelMarkArgs {
    /// The recording disk's control socket.
    #[arg(long)]
    pub socket: PathBuf,
    /// The mounted filesystem.
    #[arg(long)]
    pub mnt: PathBuf,
    /// Folder of the snapshots (NAME.json).
    #[arg(long)]
    pub snapshots: PathBuf,
    /// The mark's name.
    pub name: String,
}

fn parse_fs(s: &str) -> Result<FsKind, String> {
    FsKind::parse(s).ok_or_else(|| format!("{s:?}: ext4, xfs or btrfs"))
}

pub fn run(a: KernelArgs) -> anyhow::Result<i32> {
    match go(&a) {
        Ok(findings) => Ok(i32::from(findings > 0)),
        Err(e) => {
            eprintln!("crashmonkey kernel: error: {e:#}");
            Ok(2)
        }
    }
}

/// Puts the mark in the write log, then saves the snapshot of the tree.
pub fn mark(a: KernelMarkArgs) -> anyhow::Result<i32> {
    crate::run_cmd::place_mark(&a.socket, &a.name)?;
    let snap = snapshot::take(&a.mnt, &a.name).context("reading the mounted tree")?;
    let path = a.snapshots.join(format!("{}.json", a.name));
    anyhow::ensure!(!path.exists(), "mark {} is set twice", a.name);
    std::fs::write(&path, serde_json::to_string_pretty(&snap)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(0)
}

/// The workloads `a` names, in order.
fn workloads(a: &KernelArgs) -> anyhow::Result<Vec<KWorkload>> {
    if a.workload == "ace" {
        let mut all = if a.seq == 1 {
            ace::seq1()
        } else {
            ace::seq2(a.seed, a.limit.unwrap_or(100))
        };
        if let Some(n) = a.limit {
            all.truncate(n);
        }
        return Ok(all);
    }
    let p = PathBuf::from(&a.workload);
    let files: Vec<PathBuf> = if p.is_dir() {
        let mut f: Vec<PathBuf> = std::fs::read_dir(&p)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| f.extension().is_some_and(|x| x == "txt"))
            .collect();
        f.sort();
        f
    } else {
        vec![p]
    };
    let mut all = files
        .iter()
        .map(|f| crate::workloads_cmd::read(f))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(n) = a.limit {
        all.truncate(n);
    }
    Ok(all)
}

/// Totals of a campaign.
#[derive(Default, serde::Serialize)]
struct Summary {
    fs: String,
    lying_disk: bool,
    seed: u64,
    workloads: usize,
    resumed: usize,
    /// Workloads whose script failed (not findings).
    skipped: usize,
    states: usize,
    failing_states: usize,
    findings: usize,
    signatures: Vec<String>,
    seconds: f64,
    seconds_per_workload: f64,
    run_seconds: f64,
    build_seconds: f64,
    mount_seconds: f64,
    fsck_seconds: f64,
}

impl Summary {
    fn add(&mut self, r: &WorkloadResult) {
        self.workloads += 1;
        self.skipped += usize::from(r.skipped.is_some());
        self.states += r.states;
        self.failing_states += r.findings.len();
        self.run_seconds += r.run_seconds;
        self.build_seconds += r.build_seconds;
        self.mount_seconds += r.mount_seconds;
        self.fsck_seconds += r.fsck_seconds;
        for f in &r.findings {
            if !self.signatures.contains(&f.signature) {
                self.signatures.push(f.signature.clone());
            }
        }
        self.findings = self.signatures.len();
    }
}

/// The command that runs one workload of this campaign again.
fn again_command(a: &KernelArgs, bundle_workload: &str) -> String {
    format!(
        "sudo crashmonkey kernel --fs {} --workload {bundle_workload}{}{}",
        a.fs.name(),
        if a.lying_disk { " --lying-disk" } else { "" },
        match (a.reorder, a.torn) {
            (false, false) => String::new(),
            (true, false) => format!(" --reorder --seed {}", a.seed),
            (false, true) => format!(" --torn --seed {}", a.seed),
            (true, true) => format!(" --reorder --torn --seed {}", a.seed),
        }
    )
}

fn go(a: &KernelArgs) -> anyhow::Result<usize> {
    anyhow::ensure!(
        nix_root(),
        "crashmonkey kernel needs root (loop devices, mount)"
    );
    let stop = StopFlag::new();
    crate::crash_cmd::stop_on_signals(&stop)?;
    let shard = crashmonkey::shard::resolve(a.shard.as_deref()).map_err(anyhow::Error::msg)?;
    let params = KernelParams {
        fs: a.fs,
        lying_disk: a.lying_disk,
        workload: a.workload.clone(),
        seq: a.seq,
        seed: a.seed,
        limit: a.limit,
        reorder: a.reorder,
        torn: a.torn,
    };
    let all = workloads(a)?;
    eprintln!(
        "crashmonkey kernel: {} on {} disk, {} workloads (shard {}/{}), seed {}",
        a.fs.name(),
        if a.lying_disk { "a lying" } else { "an honest" },
        all.len(),
        shard.index,
        shard.count,
        a.seed
    );
    let (folder, campaign) = open(a, params, &stop)?;
    let t = Instant::now();
    let mut sum = Summary {
        fs: a.fs.name().into(),
        lying_disk: a.lying_disk,
        seed: a.seed,
        ..Default::default()
    };
    let owned: Vec<&KWorkload> = (all.iter().enumerate())
        .filter(|(i, _)| shard.owns(*i as u64))
        .map(|(_, w)| w)
        .collect();
    run_workloads(a, &owned, folder.as_ref(), &campaign, &mut sum, &stop)?;
    sum.seconds = t.elapsed().as_secs_f64();
    let ran = sum.workloads - sum.resumed;
    sum.seconds_per_workload = if ran > 0 {
        sum.seconds / ran as f64
    } else {
        0.0
    };
    print_summary(&sum, a.json);
    Ok(sum.findings)
}

/// The campaign folder (when --out) and the campaign, its base image formatted or taken
/// from the folder (and kept there).
fn open(
    a: &KernelArgs,
    params: KernelParams,
    stop: &StopFlag,
) -> anyhow::Result<(Option<Folder>, Campaign)> {
    let folder = a
        .out
        .as_deref()
        .map(|d| Folder::open(d, &params))
        .transpose()?;
    let base = folder.as_ref().map(Folder::base);
    let campaign = Campaign::prepare(params, base.as_deref(), stop)?;
    if let Some(b) = base.filter(|b| !b.exists()) {
        crashmonkey::kernel::crash::sparse_copy(&campaign.base, &b)?;
    }
    Ok((folder, campaign))
}

/// Runs and checks the workloads `ws` (`--jobs` at once) but those the folder has done
/// already; hands each one's result on in the order of `ws` (printed, kept in the folder,
/// added to `sum`), and stops at the first error, as one at a time would.
fn run_workloads(
    a: &KernelArgs,
    ws: &[&KWorkload],
    folder: Option<&Folder>,
    campaign: &Campaign,
    sum: &mut Summary,
    stop: &StopFlag,
) -> anyhow::Result<()> {
    let mut done = Vec::with_capacity(ws.len());
    for w in ws {
        done.push(folder.map(|f| f.done(&w.name)).transpose()?.flatten());
    }
    let todo: Vec<usize> = (0..ws.len()).filter(|&i| done[i].is_none()).collect();
    let mut failed: Option<anyhow::Error> = None;
    let mut next_done = 0;
    run_in_order(
        todo.len(),
        a.jobs as usize,
        |k| campaign.run_workload(ws[todo[k]], stop),
        |k, run| {
            add_resumed(&mut done[next_done..todo[k]], sum);
            next_done = todo[k] + 1;
            let kept = one_result(a, ws[todo[k]], run, folder, sum, stop);
            failed = kept.err();
            failed.is_none()
        },
    );
    if let Some(e) = failed {
        return Err(e);
    }
    add_resumed(&mut done[next_done..], sum);
    Ok(())
}

/// Adds the records of resumed workloads to `sum`, in order.
fn add_resumed(done: &mut [Option<WorkloadResult>], sum: &mut Summary) {
    for d in done.iter_mut().filter_map(Option::take) {
        sum.resumed += 1;
        sum.add(&d);
    }
}

/// Hands on the result of running `w`: printed, kept in the folder, added to `sum`.
fn one_result(
    a: &KernelArgs,
    w: &KWorkload,
    run: Result<WorkloadRun, KernelError>,
    folder: Option<&Folder>,
    sum: &mut Summary,
    stop: &StopFlag,
) -> anyhow::Result<()> {
    let run = match run {
        Ok(run) => run,
        Err(KernelError::Script { end, output }) if stop.signal().is_none() => {
            let result = skipped(w, &end, &output, a.json);
            if let Some(f) = folder {
                f.record(&result)?;
            }
            sum.add(&result);
            return Ok(());
        }
        Err(e) => return Err(stopped(e, stop)).with_context(|| format!("workload {}", w.name)),
    };
    print_workload(&run.result, a.json);
    if let Some(f) = folder {
        f.keep(&run, &again_command(a, "workload.txt"))?;
    }
    sum.add(&run.result);
    Ok(())
}

/// The record of a workload whose script failed (not a finding: the workload does not
/// apply, say a link over an existing name).
fn skipped(w: &KWorkload, end: &str, output: &str, json: bool) -> WorkloadResult {
    if !json {
        println!("{}: skipped, its script failed ({end}): {output}", w.name);
    }
    WorkloadResult {
        name: w.name.clone(),
        skipped: Some(format!("{end}: {output}")),
        ..Default::default()
    }
}

fn stopped(e: KernelError, stop: &StopFlag) -> anyhow::Error {
    match stop.signal() {
        Some(s) => anyhow::anyhow!("stopped by signal {s} (everything undone; --out resumes)"),
        None => e.into(),
    }
}

pub(crate) fn nix_root() -> bool {
    // SAFETY-free: the effective uid of this process, from /proc.
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

fn print_workload(r: &WorkloadResult, json: bool) {
    if json {
        return;
    }
    println!(
        "{}: {} marks, {} states, {} failing ({:.1} s)",
        r.name,
        r.marks,
        r.states,
        r.findings.len(),
        r.run_seconds + r.build_seconds + r.mount_seconds + r.fsck_seconds
    );
    for f in &r.findings {
        let detail = if f.detail.is_empty() {
            String::new()
        } else {
            format!(" ({})", f.detail)
        };
        println!(
            "  {} state at {}{detail}: {}",
            f.which.name(),
            f.mark,
            f.signature
        );
        for v in &f.report.violations {
            println!("    {}", v.text);
        }
    }
}

fn print_summary(s: &Summary, json: bool) {
    if json {
        println!("{}", serde_json::to_string(s).expect("plain data"));
        return;
    }
    println!(
        "kernel: {} workloads ({} resumed, {} skipped), {} crash states, {} failing, {} findings; {:.1} s \
         ({:.2} s per workload run: workload {:.1} s, state images {:.1} s, mount and compare \
         {:.1} s, fsck {:.1} s); seed {}",
        s.workloads,
        s.resumed,
        s.skipped,
        s.states,
        s.failing_states,
        s.findings,
        s.seconds,
        s.seconds_per_workload,
        s.run_seconds,
        s.build_seconds,
        s.mount_seconds,
        s.fsck_seconds,
        s.seed
    );
    for sig in &s.signatures {
        println!("  finding: {sig}");
    }
}
