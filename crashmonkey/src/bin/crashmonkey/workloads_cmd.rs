//! `crashmonkey workloads`: the ACE-style workloads of kernel crash campaigns, as workload
//! files and the shell scripts that run them on any Linux.
//!
//! Exit codes: 0 done; 2 the command could not run (a bad workload file, a file already
//! there, an IO error).

use anyhow::Context;
use clap::Args;
use crashmonkey::workload::{self, ace, script, KWorkload};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
#[command(
    after_help = "Workloads in the manner of CrashMonkey's ACE (docs/kernel-workloads.md): \
a setup made durable (a directory A, files foo and A/foo of 16 KiB), then a core operation \
(creat, mkdir, write, direct write, mmap write + msync, fallocate in its modes, link, unlink, \
rename, truncate, setxattr, removexattr) followed by a persistence point (fsync or fdatasync of \
what it changed, fsync of a directory, sync) and a mark. --seq 1 is every such pair; --seq 2 a \
seeded sample of two pairs in a row.\n\n\
Examples:\n  \
crashmonkey workloads --seq 1 --out ace1          # ace1/seq1-0001.txt, ace1/seq1-0001.sh, ...\n  \
crashmonkey workloads --seq 2 --seed 7 --limit 50 --out ace2\n  \
crashmonkey workloads --script ace1/seq1-0001.txt # print the shell script of one workload\n  \
bash ace1/seq1-0001.sh /mnt/scratch               # run it on any Linux\n\n\
Exit status: 0 done, 2 error."
)]
pub struct WorkloadsArgs {
    /// Operations per workload: 1 (every core operation with every persistence point) or 2
    /// (a seeded sample of two in a row).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2), default_value_t = 1)]
    pub seq: u8,
    /// Seed of the --seq 2 sample (printed; the same seed gives the same workloads).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// At most this many workloads (--seq 2: how many to sample; default 100).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Write NAME.txt and NAME.sh per workload into this folder (made if missing; files
    /// already there are not replaced). Without it, the workloads' names are listed.
    #[arg(long, value_name = "DIR", conflicts_with = "script")]
    pub out: Option<PathBuf>,
    /// Print the shell script of this workload file instead.
    #[arg(long, value_name = "FILE")]
    pub script: Option<PathBuf>,
}

/// --seq 2 samples this many workloads when --limit is not given.
const SEQ2_DEFAULT_COUNT: usize = 100;

pub fn run(a: WorkloadsArgs) -> anyhow::Result<i32> {
    match go(a) {
        Ok(()) => Ok(0),
        Err(e) => {
            eprintln!("crashmonkey workloads: error: {e:#}");
            Ok(2)
        }
    }
}

fn go(a: WorkloadsArgs) -> anyhow::Result<()> {
    if let Some(file) = &a.script {
        let w = read(file)?;
        print!("{}", script::render(&w));
        return Ok(());
    }
    let mut all = if a.seq == 1 {
        ace::seq1()
    } else {
        eprintln!("crashmonkey workloads: --seq 2 sample, seed {}", a.seed);
        ace::seq2(a.seed, a.limit.unwrap_or(SEQ2_DEFAULT_COUNT))
    };
    if let Some(n) = a.limit {
        all.truncate(n);
    }
    match &a.out {
        Some(dir) => write_all(dir, &all),
        None => {
            for w in &all {
                println!("{}", w.name);
            }
            Ok(())
        }
    }
}

/// Reads and parses a workload file (named after the file when it names itself nowhere).
pub fn read(file: &Path) -> anyhow::Result<KWorkload> {
    let meta = std::fs::metadata(file).with_context(|| format!("reading {}", file.display()))?;
    anyhow::ensure!(
        meta.len() <= workload::WORKLOAD_TEXT_BYTES_MAX as u64,
        "{}: {} bytes is more than a workload ({} at most)",
        file.display(),
        meta.len(),
        workload::WORKLOAD_TEXT_BYTES_MAX
    );
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let stem = file
        .file_stem()
        .map_or("workload".into(), |s| s.to_string_lossy());
    workload::parse(&text, &stem).with_context(|| format!("{}", file.display()))
}

fn write_all(dir: &Path, all: &[KWorkload]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for w in all {
        create(&dir.join(format!("{}.txt", w.name)), &w.to_string())?;
        create(&dir.join(format!("{}.sh", w.name)), &script::render(w))?;
    }
    eprintln!(
        "crashmonkey workloads: {} workloads in {}",
        all.len(),
        dir.display()
    );
    Ok(())
}

/// Creates `path` with `text`; a file already there is an error and stays as it was.
fn create(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {} (a file there is not replaced)", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
