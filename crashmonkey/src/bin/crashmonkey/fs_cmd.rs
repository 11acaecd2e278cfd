//! `crashmonkey fs`: make, check, list, read and describe fs-core filesystems on image files
//! or NBD exports. The work is in `crashmonkey::fscore::image`; this file parses and prints.
//!
//! Exit codes: 0 = done (fsck: clean); 1 = fsck found the filesystem inconsistent; 2 = the
//! command could not run (bad arguments, unreadable image, not an fs-core filesystem, no
//! such file, NBD server unreachable).

use std::io::Write;

use anyhow::Context;
use clap::{Args, Subcommand};
use crashmonkey::fscore::device::Target;
use crashmonkey::fscore::image::{self, FileStat, Image, MkfsOptions, INODES_DEFAULT};
use fs_core::ondisk::format::DiskExtentState;
use fs_core::ondisk::journal::Recovery;

const IMAGE_HELP: &str = "Image file path, or nbd://HOST[:PORT]/EXPORT";

#[derive(Subcommand, Debug)]
#[command(
    after_help = "Every command but mkfs mounts the image read-only, in memory: journal \
recovery is replayed into a private copy, never into the image, and the command says whether \
it replayed anything.\n\n\
Examples:\n  \
crashmonkey fs mkfs disk.img --size 16M --file a --file b\n  \
crashmonkey fs ls disk.img\n  \
crashmonkey fs cat nbd://127.0.0.1:10809/disk a > a.out\n  \
crashmonkey fs fsck disk.img --json"
)]
pub enum FsCmd {
    /// Make an fs-core filesystem on an image file or an NBD export.
    #[command(
        after_help = "SIZE takes K, M, G suffixes (powers of 1024) and must be a multiple \
of 4096. An existing file is refused unless --force. For nbd:// the export's size is used; \
--size, if given, must match it.\n\n\
Examples:\n  \
crashmonkey fs mkfs disk.img --size 16M                       # empty root directory\n  \
crashmonkey fs mkfs disk.img --size 1G --inodes 512 --file f0 --file f1 --force\n  \
crashmonkey fs mkfs nbd://127.0.0.1:10809/disk --file f0      # formats the export\n\n\
Exit status: 0 made, 2 error."
    )]
    Mkfs(MkfsArgs),
    /// Check an fs-core filesystem (after recovery into a private copy).
    #[command(
        after_help = "Prints each problem in words, how many journal transactions \
recovery replayed (into memory; the image is not written) and the orphans (inodes in use with \
no name, which a mount frees).\n\n\
Examples:\n  \
crashmonkey fs fsck disk.img\n  \
crashmonkey fs fsck nbd://127.0.0.1:10809/disk --json\n\n\
Exit status: 0 clean, 1 inconsistent, 2 cannot check (unreadable, truncated, not an fs-core \
filesystem)."
    )]
    Fsck(FsckArgs),
    /// List the root directory: name, inode, size, link count.
    #[command(after_help = "Examples:\n  \
crashmonkey fs ls disk.img\n  \
crashmonkey fs ls nbd://127.0.0.1:10809/disk --json\n\n\
Exit status: 0 listed, 2 error (cannot mount: run fsck).")]
    Ls(LsArgs),
    /// Write a file's bytes to stdout.
    #[command(
        after_help = "Holes and unwritten extents read as zeros. A closed pipe (| head) \
ends quietly.\n\n\
Examples:\n  \
crashmonkey fs cat disk.img f0 | xxd | head\n  \
crashmonkey fs cat nbd://127.0.0.1:10809/disk f0 > f0.bin\n\n\
Exit status: 0 written, 2 error (no such file, cannot mount)."
    )]
    Cat(CatArgs),
    /// Describe a file: size, blocks on disk, links, generation, extents and their states.
    #[command(
        after_help = "Each extent: its first file block, its length in blocks, its \
first device block, and its state: WRITTEN (holds data) or UNWRITTEN (allocated, reads as \
zeros). Blocks not in an extent are holes.\n\n\
Examples:\n  \
crashmonkey fs stat disk.img f0\n  \
crashmonkey fs stat nbd://127.0.0.1:10809/disk f0 --json\n\n\
Exit status: 0 described, 2 error (no such file, cannot mount)."
    )]
    Stat(StatArgs),
    /// Crash campaigns: each run formats a fresh filesystem on a recorded emulated disk, runs
    /// a workload, and checks every crash state of its log (mount, fsck, crash oracle).
    Campaign(Box<crate::fs_campaign_cmd::CampaignArgs>),
    /// Shrink a failing crash state (an fs campaign's bundle) to the fewest surviving and
    /// torn writes that still fail the same way.
    Minimise(crate::minimise_cmd::FsMinimiseArgs),
    /// Sessions an fscore= export of nbd-server recorded.
    #[command(subcommand)]
    Session(SessionCmd),
}

#[derive(Subcommand, Debug)]
pub enum SessionCmd {
    /// Re-run a recorded session in process (no sockets, no kernel) and check it.
    #[command(
        after_help = "The volume is made as the server made it; each request is submitted where it arrived, each recorded scheduler step run, each power cut cut again. With the recorded switches every answer must equal the recorded one (reads by a hash of their bytes), and fs-core's oracle, which the server does not run, names the first wrong byte a read returned. --set changes a switch (the keys of an fscore= export: iomap-valid=on, wb-seq-check=off, punch=old, alloc=at-write, check-at=..., cache-folios=N, bug=NAME); the recorded steps are then followed where they can be.\n\n\
Examples:\n  \
nbd-server --export 'vm:size=64M,fscore=mem,iomap-valid=off,session=vm.session' ...\n  \
crashmonkey fs session replay vm.session\n  \
crashmonkey fs session replay vm.session --set iomap-valid=on --json\n\n\
Exit status: 0 the same answers and no wrong byte, 1 a wrong byte or a different answer, \
2 error (unreadable session, cannot replay)."
    )]
    Replay(ReplayArgs),
}

#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// The session file (fscore= export key session=PATH).
    pub session: std::path::PathBuf,
    /// Change a switch: KEY=VALUE as an fscore= export takes it (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct MkfsArgs {
    #[arg(help = IMAGE_HELP, value_parser = parse_target)]
    pub image: Target,
    /// Size of the image: 4096, 64K, 16M, 1G (required for an image file).
    #[arg(long, value_parser = nbd_server::export::parse_size)]
    pub size: Option<u64>,
    /// Inodes (files the filesystem can hold), 1..=4096.
    #[arg(long, default_value_t = INODES_DEFAULT)]
    pub inodes: u64,
    /// Create an empty file by this name (repeat for more; up to 255 bytes, no '/').
    #[arg(long = "file", value_name = "NAME")]
    pub files: Vec<String>,
    /// Overwrite an existing image file.
    #[arg(long)]
    pub force: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct FsckArgs {
    #[arg(help = IMAGE_HELP, value_parser = parse_target)]
    pub image: Target,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    #[arg(help = IMAGE_HELP, value_parser = parse_target)]
    pub image: Target,
    /// Print one JSON object instead of text (recovery is a field of it).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CatArgs {
    #[arg(help = IMAGE_HELP, value_parser = parse_target)]
    pub image: Target,
    /// The file's name in the root directory.
    pub name: String,
}

#[derive(Args, Debug)]
pub struct StatArgs {
    #[arg(help = IMAGE_HELP, value_parser = parse_target)]
    pub image: Target,
    /// The file's name in the root directory.
    pub name: String,
    /// Print one JSON object instead of text (recovery is a field of it).
    #[arg(long)]
    pub json: bool,
}

fn parse_target(s: &str) -> Result<Target, String> {
    Target::parse(s).map_err(|e| format!("{e:#}"))
}

pub fn run(cmd: FsCmd) -> anyhow::Result<i32> {
    let (name, r) = match cmd {
        FsCmd::Campaign(a) => return crate::fs_campaign_cmd::run(*a),
        FsCmd::Session(SessionCmd::Replay(a)) => ("session replay", session_replay(a)),
        FsCmd::Mkfs(a) => ("mkfs", mkfs(a)),
        FsCmd::Fsck(a) => ("fsck", fsck(a)),
        FsCmd::Ls(a) => ("ls", ls(a)),
        FsCmd::Cat(a) => ("cat", cat(a)),
        FsCmd::Stat(a) => ("stat", stat(a)),
        FsCmd::Minimise(a) => ("minimise", crate::minimise_cmd::fs_minimise(&a)),
    };
    match r {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("crashmonkey fs {name}: error: {e:#}");
            Ok(2)
        }
    }
}

fn mkfs(a: MkfsArgs) -> anyhow::Result<i32> {
    let opts = MkfsOptions {
        size: a.size,
        inodes: a.inodes,
        names: a.files,
        force: a.force,
    };
    let made = image::mkfs(&a.image, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string(&made)?);
    } else {
        let g = &made.geometry;
        println!(
            "{}: fs-core filesystem of {} bytes ({} blocks): {} inodes, journal of {} blocks, \
             data from block {}",
            made.image, made.bytes, g.blocks, g.inodes, g.journal_blocks, g.data_start
        );
        if !made.files.is_empty() {
            let names: Vec<String> = made.files.iter().map(|n| shown(n)).collect();
            println!("empty files: {}", names.join(", "));
        }
    }
    Ok(0)
}

/// A recovery, in words.
fn recovery_words(r: &Recovery) -> String {
    if r.replayed == 0 {
        "recovery: nothing to replay (the journal was clean)".into()
    } else {
        format!(
            "recovery: replayed {} transaction{} ({} blocks) into a private copy; the image was \
             not written",
            r.replayed,
            if r.replayed == 1 { "" } else { "s" },
            r.blocks
        )
    }
}

fn fsck(a: FsckArgs) -> anyhow::Result<i32> {
    let out = image::fsck(&a.image)?;
    let code = if out.clean { 0 } else { 1 };
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
        return Ok(code);
    }
    let r = &out.report;
    match &r.recovery {
        Some(rec) => println!("{}", recovery_words(rec)),
        None => println!("recovery: did not run (the journal could not be read)"),
    }
    println!(
        "{} inodes in use, {} names, {} data blocks used",
        r.inodes_in_use, r.names, r.data_blocks_used
    );
    let orphans: Vec<String> = r.orphans.iter().map(|i| format!("inode {i}")).collect();
    println!(
        "orphans (in use, no name; a mount frees them): {}",
        if orphans.is_empty() {
            "none".to_string()
        } else {
            orphans.join(", ")
        }
    );
    if out.clean {
        println!("{}: clean", out.image);
    } else {
        let n = r.problems.len() + r.more_problems;
        println!("{}: INCONSISTENT: {n} problem(s)", out.image);
        for p in &r.problems {
            println!("  - {p}");
        }
        if r.more_problems > 0 {
            println!("  ... and {} more", r.more_problems);
        }
    }
    Ok(code)
}

fn ls(a: LsArgs) -> anyhow::Result<i32> {
    let img = Image::open(&a.image)?;
    let entries = img.list()?;
    if a.json {
        let v = serde_json::json!({
            "image": img.label,
            "recovery": img.recovery,
            "files": entries,
        });
        println!("{v}");
        return Ok(0);
    }
    eprintln!("{}", recovery_words(&img.recovery));
    println!("{:>6} {:>10} {:>5}  NAME", "INODE", "SIZE", "NLINK");
    for e in &entries {
        println!(
            "{:>6} {:>10} {:>5}  {}",
            e.ino,
            e.size,
            e.nlink,
            shown(&e.name)
        );
    }
    Ok(0)
}

fn cat(a: CatArgs) -> anyhow::Result<i32> {
    let mut img = Image::open(&a.image)?;
    eprintln!("{}", recovery_words(&img.recovery));
    let data = img.read_file(&a.name)?;
    let mut out = std::io::stdout().lock();
    match out.write_all(&data).and_then(|()| out.flush()) {
        Ok(()) => Ok(0),
        // The reader went away (`| head`): what it wanted it has.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(0),
        Err(e) => Err(e).context("writing to stdout"),
    }
}

fn stat(a: StatArgs) -> anyhow::Result<i32> {
    let img = Image::open(&a.image)?;
    let st = img.stat(&a.name)?;
    if a.json {
        let v = serde_json::json!({
            "image": img.label,
            "recovery": img.recovery,
            "file": st,
        });
        println!("{v}");
        return Ok(0);
    }
    eprintln!("{}", recovery_words(&img.recovery));
    print_stat(&st);
    Ok(0)
}

fn print_stat(st: &FileStat) {
    println!("name:       {}", shown(&st.name));
    println!("inode:      {} (generation {})", st.ino, st.generation);
    println!("size:       {} bytes", st.size);
    println!(
        "on disk:    {} bytes in {} blocks ({} written, {} unwritten)",
        st.disk_bytes,
        st.written_blocks + st.unwritten_blocks,
        st.written_blocks,
        st.unwritten_blocks
    );
    println!("links:      {}", st.nlink);
    println!("mtime:      {} (operation clock)", st.mtime);
    println!("ctime:      {} (operation clock)", st.ctime);
    if st.extents.is_empty() {
        println!("extents:    none");
        return;
    }
    println!("extents:");
    println!(
        "  {:>10} {:>6} {:>12}  STATE",
        "FILE BLOCK", "COUNT", "DEVICE BLOCK"
    );
    for e in &st.extents {
        let state = match e.state {
            DiskExtentState::Written => "WRITTEN",
            DiskExtentState::Unwritten => "UNWRITTEN",
        };
        println!(
            "  {:>10} {:>6} {:>12}  {state}",
            e.file_block, e.count, e.dev_block
        );
    }
}

/// A name as text output shows it: as it is, or quoted with escapes when it holds control
/// characters (a name may hold anything but '/' and NUL) or leading or trailing spaces.
fn shown(name: &str) -> String {
    let plain = !name.chars().any(char::is_control) && name.trim() == name;
    if plain {
        name.to_string()
    } else {
        format!("{name:?}")
    }
}

/// `fs session replay`: the switches changed as asked, the replay, its report.
fn session_replay(a: ReplayArgs) -> anyhow::Result<i32> {
    use nbd_server::fscore::{replay, session::SessionReader, FsCoreSpec};
    let config = if a.set.is_empty() {
        None
    } else {
        let header = SessionReader::open(&a.session)
            .with_context(|| format!("{}", a.session.display()))?
            .header;
        let mut spec = FsCoreSpec {
            config: header.config,
            ..FsCoreSpec::default()
        };
        for kv in &a.set {
            let (k, v) = match kv.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (kv.as_str(), None),
            };
            if matches!(k, "fscore" | "session" | "volume-size" | "sched-seed") {
                anyhow::bail!("--set {k}: not a switch (the session fixes it)");
            }
            spec.set(k, v)
                .map_err(|e| anyhow::anyhow!("--set {kv}: {k} {e}"))?;
        }
        Some(spec.config)
    };
    let report = replay::replay(&a.session, config)
        .with_context(|| format!("replaying {}", a.session.display()))?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_replay(&a.session, &report);
    }
    Ok(if report.clean() { 0 } else { 1 })
}

fn print_replay(path: &std::path::Path, r: &nbd_server::fscore::replay::ReplayReport) {
    println!(
        "{}: {} requests, {} steps, {} power cuts{}{}",
        path.display(),
        r.requests,
        r.steps,
        r.power_cuts,
        if r.switches_changed {
            format!(
                "; switches changed ({} recorded steps not followed)",
                r.steps_not_followed
            )
        } else {
            String::new()
        },
        if r.complete {
            ""
        } else {
            "; the session has no end record (the server did not stop cleanly)"
        }
    );
    println!(
        "answers: {} compared with the recording, {} differ{}",
        r.answers_compared,
        r.mismatches_total,
        if r.switches_changed {
            " (the switches changed: reads may rightly differ)"
        } else {
            ""
        }
    );
    for m in r.mismatches.iter().filter(|_| !r.switches_changed) {
        println!(
            "  request {}: recorded {:?}, replayed {:?} (ok, hash, length)",
            m.request, m.recorded, m.replayed
        );
    }
    for n in &r.notes {
        println!("model: {n}");
    }
    if r.failures.is_empty() {
        println!("oracle: every read returned the bytes the model holds");
    }
    for f in &r.failures {
        match f {
            fs_core::Failure::WrongData {
                file,
                offset,
                expected,
                found,
                ..
            } => {
                let name = r
                    .header
                    .files
                    .iter()
                    .find(|v| v.ino == *file)
                    .map_or("?", |v| v.name.as_str());
                println!(
                    "WRONG DATA: file {name:?} byte {offset} (block {}): expected 0x{expected:02x}, \
                     read 0x{found:02x}",
                    offset / 4096
                );
            }
            other => println!("FAILURE: {other:?}"),
        }
    }
}
