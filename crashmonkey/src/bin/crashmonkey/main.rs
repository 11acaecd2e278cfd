//! The `crashmonkey` CLI. Thin: each subcommand family lives in its own file.

mod crash_cmd;
mod findings_cmd;
mod fs_campaign_cmd;
mod fs_cmd;
mod kernel_cmd;
mod minimise_cmd;
mod race_cmd;
mod report_cmd;
mod run_cmd;
mod switches;
mod workloads_cmd;

use clap::{Parser, Subcommand};

/// mimalloc rather than glibc's malloc: an fs campaign allocates and frees a 4 KiB block per
/// block read of every crash state, and a 1 MiB image per run; with glibc, malloc, free and
/// the page faults of fresh images took about a tenth of a campaign (perf).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "crashmonkey",
    version,
    about = "Find what a power cut or a race does to your data",
    long_about = "crashmonkey replays nbd-server write logs into every crash state a power cut \
could leave and checks each one, and runs seeded race campaigns over fs-core's iomap model.\n\n\
Examples:\n  crashmonkey race --seed 1 --runs 1000 --no-iomap-valid\n  \
crashmonkey race --seed 1 --runs 20000 --no-iomap-valid --out camp && crashmonkey findings camp\n  \
crashmonkey report camp -o report.html\n  \
crashmonkey check disk.log --base empty.img --checker 'e2fsck -fn {image}'\n  \
crashmonkey fs ls disk.img\n  \
sudo crashmonkey kernel --fs ext4 --workload ace --seq 1 --limit 10\n  \
sudo crashmonkey run --fs ext4 --workload 'sh app.sh' --checker 'sh check.sh {mnt} {mark}'\n  \
crashmonkey fs campaign --seed 1 --runs 100 --bug fsync-no-log-force"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a seeded race campaign over fs-core (or replay or minimise a reproducer).
    Race(race_cmd::RaceArgs),
    #[command(flatten)]
    Crash(crash_cmd::CrashCmd),
    /// fs-core filesystems on image files or NBD exports (mkfs, fsck, ls, cat, stat), and
    /// crash campaigns over fs-core.
    #[command(subcommand)]
    Fs(fs_cmd::FsCmd),
    /// Distinct findings of campaign folders (`race --out DIR`); merge folders; rebuild an
    /// index.
    Findings(findings_cmd::FindingsArgs),
    /// ACE-style workloads for kernel crash campaigns: workload files and the shell scripts
    /// that run them on any Linux.
    Workloads(workloads_cmd::WorkloadsArgs),
    /// Crash campaigns on the kernel's ext4, XFS or btrfs (root): workloads recorded through
    /// nbdfuse and a loop device, every crash state at each mark mounted, compared with what
    /// the persistence points promised, and fsck'd.
    Kernel(kernel_cmd::KernelArgs),
    /// Any application's workload on ext4, XFS or btrfs (root): recorded through nbdfuse and
    /// a loop device, then your checker run on every crash state, mounted from a copy.
    Run(run_cmd::RunArgs),
    /// A mark in the write log of the running `crashmonkey run` (its workload calls it).
    Mark(run_cmd::MarkArgs),
    /// Used by `kernel`'s workload scripts: a mark in the write log and a snapshot of the tree.
    #[command(hide = true)]
    KernelMark(kernel_cmd::KernelMarkArgs),
    /// One self-contained HTML report of a campaign folder, with an SVG timeline per finding.
    Report(report_cmd::ReportArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    quiet_when_stdout_closes();
    let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cli))) {
        Ok(code) => code?,
        Err(p) if stdout_closed(&*p) => 0,
        Err(p) => std::panic::resume_unwind(p),
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    Ok(match cli.cmd {
        Cmd::Race(args) => race_cmd::run(args)?,
        Cmd::Crash(cmd) => crash_cmd::run(cmd)?,
        Cmd::Fs(cmd) => fs_cmd::run(cmd)?,
        Cmd::Findings(args) => findings_cmd::run(args)?,
        Cmd::Workloads(args) => workloads_cmd::run(args)?,
        Cmd::Report(args) => report_cmd::run(args)?,
        Cmd::Kernel(args) => kernel_cmd::run(args)?,
        Cmd::KernelMark(args) => kernel_cmd::mark(args)?,
        Cmd::Run(args) => run_cmd::run(args)?,
        Cmd::Mark(args) => run_cmd::mark(args)?,
    })
}

/// `println!` panics when stdout's reader has gone (`crashmonkey states LOG | head`). That
/// panic prints nothing, and ends the command with 0 once it has unwound (so temporary
/// files and folders still go); any other panic is reported as before.
fn quiet_when_stdout_closes() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !stdout_closed(info.payload()) {
            report(info);
        }
    }));
}

/// Whether a panic's payload is `println!`'s on a closed pipe (EPIPE, os error 32).
fn stdout_closed(payload: &(dyn std::any::Any + Send)) -> bool {
    let text = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied());
    text.is_some_and(|t| t.starts_with("failed printing to stdout") && t.contains("os error 32"))
}
