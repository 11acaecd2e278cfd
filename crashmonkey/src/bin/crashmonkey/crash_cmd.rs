//! Write-log subcommands: `log`, `replay`, `states`, `check`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};

use crashmonkey::check::{check, CheckOptions, CheckSummary, StopFlag};
use crashmonkey::history::History;
use crashmonkey::overlay::{base_bytes, replay, LargerBase, ReplayTarget};
use crashmonkey::states::{CrashState, StateGenerator, StateOptions};
use nbd_server::log::{
    decode_payload, FaultPayload, FlushPayload, FullPayload, LogEnding, LogReader, PowerCutPayload,
    RecordKind,
};

#[derive(Subcommand)]
pub enum CrashCmd {
    /// Inspect, export or import a write log.
    #[command(subcommand)]
    Log(LogCmd),
    /// Build the disk image at one point of a write log.
    ///
    /// Example: crashmonkey replay disk.log --base empty.img --to-mark after-fsync-3 -o at-mark.img
    Replay(ReplayArgs),
    /// List the crash states of a write log (prefixes, ordered subsets, torn writes).
    ///
    /// Example: crashmonkey states disk.log --max-subset 2 --samples 64 --seed 7 --json
    States(StatesArgs),
    /// Build every crash state of a write log and run a checker on each.
    ///
    /// Each checker runs in its own process group, killed whole at its time limit. Ctrl-C or
    /// SIGTERM kills the running checkers, writes a partial summary.json (in --out), removes
    /// the temporary images and exits 130 or 143.
    ///
    /// Example: crashmonkey check disk.log --base empty.img --checker 'e2fsck -fn {image}' --jobs 2 --out failures/
    Check(CheckArgs),
}

#[derive(Subcommand)]
pub enum LogCmd {
    /// Print every record (one line each; with --json one JSON object per line), or draw
    /// the log as an SVG timeline (--svg): epochs, writes coloured by their fate (durable,
    /// not yet flushed, survived, torn or dropped by a power cut), FUA, flushes, marks, the
    /// crash point, and where on the disk each write landed.
    ///
    /// Examples: crashmonkey log show disk.log;
    /// crashmonkey log show disk.log --svg -o disk.svg --highlight-byte 8192;
    /// crashmonkey log show fs-seed-2/device.log --svg --fs-bundle fs-seed-2 -o state.svg
    Show {
        /// Write log recorded by nbd-server (its export option record=PATH).
        log: PathBuf,
        #[arg(long, conflicts_with = "svg")]
        json: bool,
        /// Draw the log as one SVG document, to stdout or to -o FILE.
        #[arg(long)]
        svg: bool,
        /// With --svg: the file to write (it must not exist, unless --force).
        #[arg(short = 'o', long = "output", value_name = "FILE", requires = "svg")]
        output: Option<PathBuf>,
        /// With -o: replace FILE if it exists.
        #[arg(long, requires = "output")]
        force: bool,
        /// With --svg: outline the writes that cover this disk byte (the block that holds a
        /// wrong byte) and mark it on the disk lane.
        #[arg(long, value_name = "BYTE", requires = "svg")]
        highlight_byte: Option<u64>,
        /// With --svg: draw the crash state of this fs bundle (`fs-seed-N/`, whose log LOG
        /// is): the writes it kept, dropped and tore, its crash point, each write's role in
        /// fs-core's format, and the block holding its wrong byte (unless --highlight-byte).
        #[arg(long, value_name = "DIR", requires = "svg")]
        fs_bundle: Option<PathBuf>,
    },
    /// Count records, bytes, epochs and marks.
    ///
    /// Example: crashmonkey log stats disk.log --json
    Stats {
        /// Write log recorded by nbd-server (its export option record=PATH).
        log: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Write the log in another format.
    ///
    /// Example: crashmonkey log export disk.log --format dm-log-writes -o disk.dmlog
    Export {
        /// Write log recorded by nbd-server (its export option record=PATH).
        log: PathBuf,
        #[arg(long, value_enum)]
        format: Format,
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Read a log of another format into this project's format.
    ///
    /// Example: crashmonkey log import disk.dmlog --format dm-log-writes -o disk.log
    Import {
        /// The log to read.
        input: PathBuf,
        #[arg(long, value_enum)]
        format: Format,
        /// Output write log.
        #[arg(short, long)]
        output: PathBuf,
        /// Size of the disk in bytes (default: the end of the furthest write, rounded up to 4096).
        #[arg(long)]
        disk_bytes: Option<u64>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    /// The kernel's dm-log-writes target / fstests replay-log format.
    DmLogWrites,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("target").args(["to", "to_mark", "to_flush"])))]
pub struct ReplayArgs {
    /// Write log recorded by nbd-server (its export option record=PATH).
    log: PathBuf,
    /// Image the log was recorded on top of (e.g. an empty file of the disk's size).
    #[arg(long)]
    base: PathBuf,
    /// Stop after the record with this sequence number.
    #[arg(long)]
    to: Option<u64>,
    /// Stop just before the first mark with this name.
    #[arg(long)]
    to_mark: Option<String>,
    /// Stop at the K-th flush (1-based), including everything recorded before it.
    #[arg(long)]
    to_flush: Option<u64>,
    /// Output image.
    #[arg(short, long)]
    output: PathBuf,
    /// Accept a base image larger than the logged disk and use its first bytes (refused
    /// without this flag: most often it is the wrong file).
    #[arg(long)]
    allow_larger_base: bool,
}

#[derive(Args, Clone)]
pub struct StateFlags {
    /// Subsets keep, or drop, at most K operations of an epoch.
    #[arg(long, default_value_t = 2)]
    max_subset: usize,
    /// Per epoch: enumerate subsets exhaustively up to N of them, else draw N seeded samples
    /// (the same bound applies to torn-write states).
    #[arg(long, default_value_t = 64)]
    samples: usize,
    /// Seed of every random choice (printed).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Do not generate torn-write states.
    #[arg(long)]
    no_torn: bool,
    /// The device's atomic write unit in bytes: torn writes land whole units (512: a
    /// 512-byte-sector disk; 4096: a 4Kn disk, as filesystems with checksummed metadata
    /// blocks assume).
    #[arg(long, default_value_t = 512)]
    atomic_bytes: u64,
}

impl StateFlags {
    fn options(&self) -> StateOptions {
        StateOptions {
            max_subset: self.max_subset,
            samples: self.samples,
            seed: self.seed,
            torn: !self.no_torn,
            atomic_bytes: self.atomic_bytes,
        }
    }
}

#[derive(Args)]
pub struct StatesArgs {
    /// Write log recorded by nbd-server (its export option record=PATH).
    log: PathBuf,
    #[command(flatten)]
    flags: StateFlags,
    /// Print one JSON object per state (then a summary object).
    #[arg(long)]
    json: bool,
    /// Folder for the generator's temporary tables (sector hashes and the states seen, a
    /// few bytes per sector the log writes; unlinked at once, gone when the command ends).
    /// Default: the system's temporary folder. Example: --work-dir /var/tmp.
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct CheckArgs {
    /// Write log recorded by nbd-server (its export option record=PATH).
    log: PathBuf,
    /// Image the log was recorded on top of.
    #[arg(long)]
    base: PathBuf,
    /// Shell command run on each state; exit 0 = pass. Placeholders: {image} (the state's
    /// image; do not modify it, copy it first), {uri} (the state as a read-only NBD export
    /// served from memory, nbd+unix:///state-N?socket=PATH, for qemu-img, nbdinfo, nbdcopy,
    /// nbdfuse: nothing disk-sized is written per state), {uri-cow} (the same state, writable:
    /// writes stay in memory and are dropped before the next state), {mark} (last mark all of
    /// whose preceding writes are in the state, empty if none), {state} (the state's id). At
    /// least one of {image}, {uri}, {uri-cow}; without {image} no image is made.
    /// Example: --checker 'qemu-img convert -O raw {uri} /tmp/s-{state}.img'.
    #[arg(long)]
    checker: String,
    /// Checkers run at once.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Folder for failing images, checker outputs and summary.json.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Time limit of one checker run; a checker that takes longer is killed with its whole
    /// process group (SIGKILL) and its state fails.
    #[arg(long, default_value_t = crashmonkey::check::CHECKER_SECONDS_DEFAULT)]
    timeout_seconds: u64,
    /// Accept a base image larger than the logged disk and use its first bytes (refused
    /// without this flag: most often it is the wrong file).
    #[arg(long)]
    allow_larger_base: bool,
    #[command(flatten)]
    flags: StateFlags,
    /// Check only shard K of N of the unique states (state id % N == K): `K/N`, or `N` with K
    /// from JOB_COMPLETION_INDEX or SLURM_ARRAY_TASK_ID (docs/scale-out.md). Every shard
    /// generates every state (the ids need it) and checks its own.
    #[arg(long, value_name = "K/N")]
    shard: Option<String>,
    /// Folder for the temporary state images (default: the system's temporary folder). The
    /// space they may take is checked before the run starts.
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// How much nicer (lower in priority) the checkers run than crashmonkey's own threads,
    /// 0 to 19: the threads that read the log and generate the states are a pipeline every
    /// check waits on, and at the checkers' priority they kept waiting for a CPU behind them
    /// (`true {uri}` on a 1 GiB log ran 8% faster at 10; docs/check-uri.md). 0 runs the
    /// checkers as crashmonkey runs. Example: --checker-nice 0.
    #[arg(long, value_name = "N", default_value_t = crashmonkey::check::CHECKER_NICE_DEFAULT,
          value_parser = clap::value_parser!(i32).range(0..=19))]
    checker_nice: i32,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: CrashCmd) -> anyhow::Result<i32> {
    match cmd {
        CrashCmd::Log(LogCmd::Show {
            log,
            svg: true,
            output,
            force,
            highlight_byte,
            fs_bundle,
            ..
        }) => show_svg(
            &log,
            output.as_deref(),
            force,
            highlight_byte,
            fs_bundle.as_deref(),
        ),
        CrashCmd::Log(LogCmd::Show { log, json, .. }) => show(&log, json),
        CrashCmd::Log(LogCmd::Stats { log, json }) => stats(&log, json),
        CrashCmd::Log(LogCmd::Export {
            log,
            format: Format::DmLogWrites,
            output,
        }) => {
            let s = crashmonkey::dmlog::export(&log, &output)
                .with_context(|| format!("exporting {}", log.display()))?;
            println!("{}", serde_json::to_string(&s)?);
            Ok(0)
        }
        CrashCmd::Log(LogCmd::Import {
            input,
            format: Format::DmLogWrites,
            output,
            disk_bytes,
        }) => {
            let s = crashmonkey::dmlog::import(&input, &output, disk_bytes)
                .with_context(|| format!("importing {}", input.display()))?;
            println!("{}", serde_json::to_string(&s)?);
            Ok(0)
        }
        CrashCmd::Replay(a) => {
            let target = match (a.to, a.to_mark, a.to_flush) {
                (Some(n), _, _) => ReplayTarget::Seq(n),
                (_, Some(m), _) => ReplayTarget::Mark(m),
                (_, _, Some(k)) => ReplayTarget::Flush(k),
                _ => ReplayTarget::End,
            };
            let larger = larger_base(a.allow_larger_base);
            note_larger_base(&a.log, &a.base, larger);
            let r = replay(&a.log, &a.base, &a.output, &target, larger)
                .with_context(|| format!("replaying {}", a.log.display()))?;
            println!(
                "replayed {} operations ({} bytes) into {}",
                r.ops_applied,
                r.bytes_applied,
                a.output.display()
            );
            Ok(0)
        }
        CrashCmd::States(a) => states(a),
        CrashCmd::Check(a) => check_cmd(a),
    }
}

fn larger_base(allowed: bool) -> LargerBase {
    if allowed {
        LargerBase::UseStart
    } else {
        LargerBase::Refuse
    }
}

/// Says so when only the start of a larger base image is used. (A base that does not fit is
/// refused by `check` and `replay` themselves, after the checks they make first.)
fn note_larger_base(log: &Path, base: &Path, larger: LargerBase) {
    let Ok(disk_bytes) = LogReader::open(log).map(|r| r.disk_bytes()) else {
        return;
    };
    if let Ok(actual) = base_bytes(base, disk_bytes, larger) {
        if actual > disk_bytes {
            eprintln!(
                "note: base image {} is {actual} bytes; only its first {disk_bytes} bytes (the \
                 logged disk) are used",
                base.display()
            );
        }
    }
}

/// SIGINT (Ctrl-C) and SIGTERM raise `stop` instead of ending the process: the run kills its
/// checkers, writes a partial summary and removes its temporary images.
pub(crate) fn stop_on_signals(stop: &StopFlag) -> anyhow::Result<()> {
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let value = usize::try_from(signal)?;
        signal_hook::flag::register_usize(signal, stop.shared(), value)
            .context("installing a signal handler")?;
    }
    Ok(())
}

fn check_cmd(a: CheckArgs) -> anyhow::Result<i32> {
    check_flags(&a.flags.options())?;
    if let Err(e) = crashmonkey::check::disable_huge_pages() {
        tracing::debug!("transparent huge pages stay on: {e}");
    }
    let larger = larger_base(a.allow_larger_base);
    note_larger_base(&a.log, &a.base, larger);
    let stop = StopFlag::new();
    stop_on_signals(&stop)?;
    let shard = crashmonkey::shard::resolve(a.shard.as_deref()).map_err(anyhow::Error::msg)?;
    let opts = CheckOptions {
        shard,
        work_dir: a.work_dir,
        checker_nice: a.checker_nice,
        checker: a.checker,
        jobs: a.jobs,
        out: a.out,
        states: a.flags.options(),
        progress: !a.json && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        timeout_seconds: a.timeout_seconds.max(1),
        larger_base: larger,
        stop,
    };
    eprintln!("crashmonkey check: seed {}", opts.states.seed);
    let s =
        check(&a.log, &a.base, &opts).with_context(|| format!("checking {}", a.log.display()))?;
    print_summary(&s, a.json)?;
    if let Some(i) = &s.interrupted {
        eprintln!(
            "crashmonkey check: stopped by {} in epoch {} ({} of its states checked); the \
             counts cover only the states checked",
            i.signal, i.epoch, i.epoch_states_checked
        );
        // The shell's convention for a process ended by a signal.
        return Ok(128 + i.signal_number);
    }
    Ok(if s.failed > 0 { 1 } else { 0 })
}

fn print_summary(s: &CheckSummary, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(s)?);
        return Ok(());
    }
    for f in &s.failures {
        println!(
            "FAIL state {} (epoch {}, {}, mark {:?}): {}{}",
            f.id,
            f.epoch,
            f.label,
            f.mark.as_deref().unwrap_or(""),
            f.reason,
            f.image
                .as_ref()
                .map(|p| format!(", image {}", p.display()))
                .unwrap_or_default()
        );
    }
    println!(
        "{} states ({} unique) in {} epochs: {} passed, {} failed, {:.1}s, seed {}{}{}",
        s.states,
        s.unique,
        s.epochs,
        s.passed,
        s.failed,
        s.seconds,
        s.seed,
        if s.interrupted.is_some() {
            " (interrupted)"
        } else {
            ""
        },
        s.cpu
            .map(|c| format!(
                "; CPU: crashmonkey {:.1}s, checkers {:.1}s",
                c.crashmonkey, c.checkers
            ))
            .unwrap_or_default()
    );
    Ok(())
}

/// `log show --svg`: the log drawn as the report draws it.
fn show_svg(
    path: &Path,
    output: Option<&Path>,
    force: bool,
    highlight: Option<u64>,
    fs_bundle: Option<&Path>,
) -> anyhow::Result<i32> {
    use crashmonkey::report;
    let t = match fs_bundle {
        Some(b) => report::crash::bundle_log(b, Some(path), highlight)?,
        None => report::log::read_log(path, highlight)?,
    };
    if t.records as usize > t.items.len() {
        eprintln!(
            "crashmonkey log show: the first {} of {} records drawn (at most {})",
            t.items.len(),
            t.records,
            report::log::RECORDS_DRAWN_MAX
        );
    }
    let svg = report::log::render_svg(&t);
    match output {
        Some(out) => report::write_new(out, svg.as_bytes(), force)?,
        None => println!("{svg}"),
    }
    Ok(0)
}

fn show(path: &Path, json: bool) -> anyhow::Result<i32> {
    match show_records(path, json) {
        // A reader that stopped reading (`| head`) is not an error.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(0)
        }
        r => r,
    }
}

/// [`show`], writing to stdout and failing when it cannot.
fn show_records(path: &Path, json: bool) -> anyhow::Result<i32> {
    use std::io::Write;
    let reader = LogReader::open(path).with_context(|| format!("opening {}", path.display()))?;
    let payloads = LogReader::open(path)?;
    let mut out = std::io::stdout().lock();
    if !json {
        let closed = match reader.file_header().no_power_cuts() {
            true => ", closed by its writer with no power cut in it",
            false => "",
        };
        writeln!(out, "# disk {} bytes{closed}", reader.disk_bytes())?;
    }
    let mut reader = reader;
    for rec in reader.by_ref() {
        let rec = rec.with_context(|| format!("reading {}", path.display()))?;
        let h = rec.header;
        let detail = match rec.kind {
            RecordKind::Mark => String::from_utf8_lossy(&payloads.read_payload(&rec)?).into_owned(),
            RecordKind::Flush => {
                let p: FlushPayload = decode_payload(&payloads.read_payload(&rec)?)?;
                format!("in-flight {:?}", p.in_flight)
            }
            RecordKind::Fault => {
                let p: FaultPayload = decode_payload(&payloads.read_payload(&rec)?)?;
                format!(
                    "{} on request {} latency {}us",
                    if p.fault == 1 { "eio" } else { "latency" },
                    p.request,
                    p.latency_us
                )
            }
            RecordKind::PowerCut => {
                let p: PowerCutPayload = decode_payload(&payloads.read_payload(&rec)?)?;
                serde_json::to_string(&p)?
            }
            RecordKind::Full => {
                let p: FullPayload = decode_payload(&payloads.read_payload(&rec)?)?;
                serde_json::to_string(&p)?
            }
            _ => String::new(),
        };
        if json {
            writeln!(
                out,
                "{}",
                serde_json::json!({"seq": h.seq, "kind": rec.kind.name(), "conn": h.conn, "offset": h.offset,
                    "length": h.length, "fua": h.fua(), "detail": detail})
            )?;
        } else {
            writeln!(
                out,
                "{:>8} {:<12} conn {:<3} off {:<12} len {:<9}{} {}",
                h.seq,
                rec.kind.name(),
                h.conn,
                h.offset,
                h.length,
                if h.fua() { " FUA" } else { "" },
                detail
            )?;
        }
    }
    if reader.ending() != LogEnding::Complete {
        eprintln!("note: {}", reader.ending());
    }
    Ok(0)
}

fn stats(path: &Path, json: bool) -> anyhow::Result<i32> {
    let mut reader =
        LogReader::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut counts: BTreeMap<&'static str, u64> = BTreeMap::new();
    let (mut records, mut data_bytes, mut fua) = (0u64, 0u64, 0u64);
    for rec in reader.by_ref() {
        let rec = rec.with_context(|| format!("reading {}", path.display()))?;
        records += 1;
        *counts.entry(rec.kind.name()).or_default() += 1;
        if rec.kind.is_data() {
            data_bytes += rec.header.length;
        }
        if rec.header.fua() {
            fua += 1;
        }
    }
    let epochs = counts.get("flush").copied().unwrap_or(0)
        + counts.get("power-cut").copied().unwrap_or(0)
        + 1;
    let v = serde_json::json!({
        "disk_bytes": reader.disk_bytes(), "records": records, "kinds": counts, "data_bytes": data_bytes,
        "fua": fua, "epochs": epochs, "torn_tail_bytes": reader.torn_tail_bytes(),
        "ending": reader.ending(), "ending_text": reader.ending().to_string(),
    });
    if json {
        println!("{v}");
    } else {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(0)
}

/// One line of `crashmonkey states`: the state as JSON, or in words.
fn print_state(s: &CrashState, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(s)?);
        return Ok(());
    }
    println!(
        "state {:>6} epoch {:>5} {:<8} {:<24} dropped {:<4} torn {:<5} mark {:<16} {}{}",
        s.id,
        s.epoch,
        serde_json::to_value(s.kind)?.as_str().unwrap_or(""),
        s.label,
        s.dropped_seqs.len(),
        s.torn
            .as_ref()
            .map(|t| t.seq.to_string())
            .unwrap_or("-".into()),
        s.mark.as_deref().unwrap_or("-"),
        &s.hash[..16],
        s.duplicate_of
            .map(|d| format!(" (same as {d})"))
            .unwrap_or_default()
    );
    Ok(())
}

fn states(a: StatesArgs) -> anyhow::Result<i32> {
    let opts = a.flags.options();
    check_flags(&opts)?;
    eprintln!("crashmonkey states: seed {}", opts.seed);
    let history = History::open(&a.log).with_context(|| format!("opening {}", a.log.display()))?;
    let dir = a.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    anyhow::ensure!(
        dir.is_dir(),
        "--work-dir {}: not a folder (the generator's temporary tables go there)",
        dir.display()
    );
    let mut generator = StateGenerator::in_dir(opts, history.data_file()?, dir);
    let mut epochs = 0;
    let mut failed = None;
    // The epochs' sectors are hashed ahead, on a thread of their own.
    crashmonkey::ahead::hashed_epochs(history, &opts, |hashed| {
        let shown = hashed.map_err(anyhow::Error::from).and_then(|(epoch, h)| {
            epochs += 1;
            let states = generator.epoch_states_hashed(&epoch, h)?;
            states.iter().try_for_each(|s| print_state(s, a.json))
        });
        failed = shown.err();
        failed.is_none()
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    let summary = serde_json::json!({"states": generator.generated, "unique": generator.unique, "epochs": epochs, "seed": opts.seed});
    if a.json {
        println!("{summary}");
    } else {
        println!(
            "{} states ({} unique) in {} epochs, seed {}",
            generator.generated, generator.unique, epochs, opts.seed
        );
    }
    Ok(0)
}

fn check_flags(o: &StateOptions) -> anyhow::Result<()> {
    if o.samples == 0 {
        bail!("--samples must be at least 1");
    }
    if o.atomic_bytes < 512 || !o.atomic_bytes.is_power_of_two() {
        bail!("--atomic-bytes must be a power of two of at least 512");
    }
    Ok(())
}
