//! The `nbd-server` command: serve one or more exports over NBD until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use nbd_server::control::Disks;
use nbd_server::limits::WORKER_THREADS_MAX;
use nbd_server::priority::NICE_MAX;
use nbd_server::server::ServerHandle;
use nbd_server::tls::TlsConfig;
use nbd_server::{ExportRegistry, ExportSpec, Server, ServerConfig};

/// mimalloc rather than glibc's malloc: under a write load glibc grew and trimmed its
/// per-thread heaps with an `mprotect` call every few allocations (16,901 in 4 s of 4 KiB
/// random writes, measured with `strace -c -f`), and served each fresh 4 KiB block with a
/// page fault of its own.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EXAMPLES: &str = "\
Examples:
  # A 64 MiB sparse memory disk on the default address, named \"disk\":
  nbd-server --export disk:size=64M
  # Two exports, one backed by an image file, one read-only, on a chosen port:
  nbd-server --listen 127.0.0.1:10810 --export data:size=1G,file=/tmp/data.img \\
             --export golden:file=/tmp/golden.img,readonly
  # Also on a Unix socket (clients: nbd+unix:///disk?socket=/tmp/nbd.sock):
  nbd-server --export disk:size=64M --unix /tmp/nbd.sock
  # Look at it:
  nbdinfo nbd://127.0.0.1:10809/disk      nbdinfo --map nbd://127.0.0.1:10809/disk
  qemu-io -f raw -c 'write -P 0xab 0 64k' -c 'read -P 0xab 0 64k' nbd://127.0.0.1:10809/disk

TLS (certificates laid out as for nbdkit: ca-cert.pem, server-cert.pem, server-key.pem):
  nbd-server --export disk:size=64M --tls=require --tls-certificates /etc/pki/nbd
  nbdinfo 'nbds://127.0.0.1:10809/disk?tls-certificates=/etc/pki/nbd'
  qemu-io --object tls-creds-x509,id=tls0,endpoint=client,dir=/etc/pki/nbd \\
          --image-opts driver=nbd,host=127.0.0.1,port=10809,export=disk,tls-creds=tls0 -c 'read 0 4k'
  nbd-client 127.0.0.1 10809 /dev/nbd0 -N disk -cacertfile /etc/pki/nbd/ca-cert.pem
  Add --tls-verify-peer to admit only clients with a certificate signed by ca-cert.pem.

Logs go to stderr; set RUST_LOG=debug (or trace) for more. The line
'nbd-server: listening on ...' is printed once the sockets are bound.
Crash testing (a writable export is an emulated disk with a volatile write cache):
  nbd-server --export 'disk:size=64M,record=/tmp/disk.log' --control /tmp/nbd.ctl
  nbd-server ctl --socket /tmp/nbd.ctl mark after-fsync-a
  nbd-server ctl --socket /tmp/nbd.ctl crash --seed 7
  nbd-server ctl --socket /tmp/nbd.ctl stats
  Export keys for the emulated disk: record=PATH, cache=SIZE, eio-read=P, eio-write=P,
  eio-flush=P, latency-us=N, latency-rate=P, fault-seed=S, crash-after-writes=N, crash-seed=S.
  A memory export with none of them, on a server without --control, is plain memory (no
  emulated disk: nothing could observe its cache); --control or any of them adds the disk.
  The same holds for the disk under an fs-core volume in memory (fscore=mem).

An export that is a file of fs-core (the iomap model, with its journal) on an emulated disk:
  nbd-server --export 'vm:size=64M,fscore=mem,session=/tmp/vm.session' --control /tmp/nbd.ctl
  nbd-server --export 'vm:size=16M,fscore=mem,iomap-valid=off,cache-folios=2'
  Keys: fscore=PATH|mem, volume-size=SIZE, iomap-valid=on|off, wb-seq-check=on|off,
  punch=old|fixed, alloc=delalloc|at-write, check-at=after-lock|get-folio|before-lock,
  mkwrite-inode-lock, bug=NAME[+NAME], cache-folios=N, folio-blocks=N, max-folio-blocks=N,
  dirty-folios=N, io-completion=ioend|block, sched-seed=S, session=PATH.
  A write or read creates a folio of its length, up to max-folio-blocks (default 64 blocks).
  crashmonkey fs session replay /tmp/vm.session replays a session in process.

SIGINT/SIGTERM: stop accepting, finish requests in flight, flush every export, exit 0; if a
cached write cannot be written back (say the image's filesystem is full), the byte ranges are
printed and the exit status is 1.";

/// An NBD server: sparse memory or raw-file exports, for every NBD client (qemu, libnbd
/// tools, nbd-client, fio's nbd engine).
#[derive(Debug, Parser)]
#[command(name = "nbd-server", version, after_help = EXAMPLES)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Cli {
    /// TCP address to listen on. Loopback by default; port 0 picks a free port (printed).
    #[arg(long, value_name = "ADDR", default_value = nbd_server::server::DEFAULT_LISTEN)]
    listen: SocketAddr,

    /// Do not listen on TCP at all (use with --unix).
    #[arg(long, requires = "unix")]
    no_tcp: bool,

    /// Also listen on this Unix socket path (a stale socket file there is replaced).
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,

    /// An export, NAME:KEY=VALUE,... Keys: size=SIZE (K/M/G/T suffixes, a multiple of 4096;
    /// required unless file= names an existing file), file=PATH (a raw image; default is a
    /// sparse memory disk), readonly, description=TEXT, fscore=PATH|mem (a file of an fs-core
    /// volume; see below). Repeat the flag for several exports.
    /// An empty NAME (":size=1M") is the default export; otherwise a client asking for ""
    /// gets the first export.
    #[arg(
        long = "export",
        value_name = "NAME:size=SIZE[,file=PATH][,readonly]",
        required = true
    )]
    exports: Vec<ExportSpec>,

    /// TLS: off (the default: NBD_OPT_STARTTLS is refused), on (each client chooses; plain
    /// clients work as without TLS) or require (nothing but STARTTLS and ABORT is answered
    /// before TLS; plain clients are refused). Needs --tls-certificates.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = TlsMode::Off)]
    tls: TlsMode,

    /// Directory holding ca-cert.pem, server-cert.pem and server-key.pem (the layout nbdkit
    /// and qemu-nbd read), and optionally ca-crl.pem.
    #[arg(long, value_name = "DIR")]
    tls_certificates: Option<PathBuf>,

    /// Ask TLS clients for a certificate and accept only one signed by ca-cert.pem (and not
    /// revoked by ca-crl.pem). Without it, as in nbdkit, client certificates are not checked.
    #[arg(long)]
    tls_verify_peer: bool,

    /// Serve the control socket (marks, power cut, stats) at this path; see `ctl`.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,

    /// Cut the power of every writable export after N writes (unless its export sets
    /// crash-after-writes itself).
    #[arg(long, value_name = "N")]
    crash_after_writes: Option<u64>,

    /// Seed for every export that sets no crash-seed / fault-seed of its own (printed).
    #[arg(long, value_name = "S")]
    seed: Option<u64>,

    /// Threads serving connections (the async runtime's workers; default: one per core).
    /// An fs-core volume runs its model on a thread of its own besides these (see
    /// --worker-nice); with one client on 2 cores the default served every fio job of an
    /// fscore export at least as fast as `--workers 1` (docs/fscore-export.md). Measure your
    /// own workload.
    #[arg(long, value_name = "N", value_parser = workers_in_range)]
    workers: Option<usize>,

    /// How much nicer (lower in priority) the threads serving connections run than the rest
    /// of the server, 0 to 19. Default: 10 when the server serves fs-core exports, else 0.
    /// Every request of an fs-core export passes through its volume's one engine thread;
    /// with the workers at the engine's priority the scheduler kept preempting the engine to
    /// run them, and everything waited (4 KiB random writes of an fscore export ran 41%
    /// faster at 10, random reads 50-60%; docs/fscore-export.md). Give 0 on a machine where
    /// the server must not yield to other work.
    #[arg(long, value_name = "N", value_parser = nice_in_range)]
    worker_nice: Option<i32>,

    #[command(subcommand)]
    command: Option<Command>,
}

/// A number from `range`'s start to its end (`unit` follows it in the message).
fn number_in<T>(s: &str, range: std::ops::RangeInclusive<T>, unit: &str) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
    T::Err: std::fmt::Display,
{
    let n: T = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number: {e}"))?;
    if range.contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "{n}{unit}: from {} to {}",
            range.start(),
            range.end()
        ))
    }
}

/// `--workers N`: from 1 to [`WORKER_THREADS_MAX`].
fn workers_in_range(s: &str) -> Result<usize, String> {
    number_in(s, 1..=WORKER_THREADS_MAX, " threads")
}

/// `--worker-nice N`: from 0 to [`NICE_MAX`].
fn nice_in_range(s: &str) -> Result<i32, String> {
    number_in(s, 0..=NICE_MAX, "")
}

/// `--worker-nice` when it is not given and the server serves fs-core exports.
const FSCORE_WORKER_NICE: i32 = 10;

/// The `--tls` modes, named as nbdkit names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TlsMode {
    Off,
    On,
    Require,
}

/// The TLS configuration the flags ask for, with every inconsistency a clear error.
fn tls_config(cli: &Cli) -> Result<Option<TlsConfig>> {
    let dir = match (cli.tls, &cli.tls_certificates) {
        (TlsMode::Off, None) if cli.tls_verify_peer => {
            anyhow::bail!("--tls-verify-peer needs --tls=on or --tls=require")
        }
        (TlsMode::Off, None) => return Ok(None),
        (TlsMode::Off, Some(_)) => {
            anyhow::bail!("--tls-certificates needs --tls=on or --tls=require (TLS is off)")
        }
        (_, None) => anyhow::bail!(
            "--tls={} needs --tls-certificates DIR (with ca-cert.pem, server-cert.pem, \
             server-key.pem)",
            if cli.tls == TlsMode::On {
                "on"
            } else {
                "require"
            }
        ),
        (_, Some(dir)) => dir,
    };
    let config = TlsConfig::load(dir, cli.tls == TlsMode::Require, cli.tls_verify_peer)
        .with_context(|| format!("cannot use the TLS certificates in {}", dir.display()))?;
    Ok(Some(config))
}

#[derive(Debug, Subcommand)]
enum CtlAction {
    /// Put a named mark in the write log, in order with the IO around it.
    Mark { name: String },
    /// Cut the power: drop every connection, persist a seeded choice of non-durable writes.
    Crash {
        /// Seed of the choice (default: derived from the export's crash seed).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Print the emulated disks' counters as JSON.
    Stats,
    /// Push the write logs to stable storage.
    Sync,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Drive a running server through its control socket.
    ///
    /// Example: nbd-server ctl --socket /tmp/nbd.ctl mark after-fsync-a
    Ctl {
        /// The server's --control path.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// Address one export (default: every writable export).
        #[arg(long, value_name = "NAME")]
        export: Option<String>,
        #[command(subcommand)]
        action: CtlAction,
    },
    /// Print the server's named limits (connections, requests in flight, payload sizes, ...).
    Limits {
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match &cli.command {
        Some(Command::Ctl {
            socket,
            export,
            action,
        }) => ctl(socket, export.as_deref(), action),
        Some(Command::Limits { json }) => {
            print_limits(*json);
            Ok(())
        }
        None => serve(&cli),
    }
}

/// `nbd-server ctl`: sends one request line to the control socket and prints the answer
/// (JSON); a failure is said on stderr with exit status 1.
fn ctl(socket: &Path, export: Option<&str>, action: &CtlAction) -> Result<()> {
    let line = match action {
        CtlAction::Mark { name } => format!("mark {name}"),
        CtlAction::Crash { seed: Some(s) } => format!("crash {s}"),
        CtlAction::Crash { seed: None } => "crash".to_owned(),
        CtlAction::Stats => "stats".to_owned(),
        CtlAction::Sync => "sync".to_owned(),
    };
    let line = match export {
        Some(e) => format!("@{e} {line}"),
        None => line,
    };
    match nbd_server::control::request(socket, &line) {
        Ok(json) => {
            println!("{json}");
            Ok(())
        }
        Err(e) => {
            eprintln!("nbd-server ctl: {e}");
            std::process::exit(1);
        }
    }
}

/// The exports as given, with the server-wide crash and seed flags filled in where an export
/// sets none of its own.
fn export_specs(cli: &Cli) -> Vec<ExportSpec> {
    let mut specs = cli.exports.clone();
    for spec in &mut specs {
        if spec.disk.crash_after_writes.is_none() {
            spec.disk.crash_after_writes = cli.crash_after_writes;
        }
        if let Some(seed) = cli.seed {
            spec.disk.crash_seed.get_or_insert(seed);
            if spec.disk.faults.seed == 0 {
                spec.disk.faults.seed = seed;
            }
        }
        spec.plain = !spec.disk_observable(cli.control.is_some());
    }
    specs
}

/// Sets the exports up and serves them until SIGINT or SIGTERM.
fn serve(cli: &Cli) -> Result<()> {
    let specs = export_specs(cli);
    if let Some(seed) = cli.seed {
        eprintln!("nbd-server: seed {seed}");
    }
    let tls = tls_config(cli)?;
    let exports = ExportRegistry::from_specs(&specs).context("cannot set up the exports")?;
    let mut disks: Disks = Vec::new();
    for e in exports.iter() {
        // The exports of one fs-core volume share its disk: it is listed once.
        if let Some(d) = e.disk.clone() {
            if !disks.iter().any(|(_, x)| Arc::ptr_eq(x, &d)) {
                disks.push((e.name.clone(), d));
            }
        }
    }
    let volumes: Vec<_> = exports.iter().filter_map(|e| e.fscore.clone()).collect();
    let config = ServerConfig {
        listen: (!cli.no_tcp).then_some(cli.listen),
        unix: cli.unix.clone(),
        exports,
        tls,
    };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.workers {
        rt.worker_threads(n);
    }
    let default_nice = if volumes.is_empty() {
        0
    } else {
        FSCORE_WORKER_NICE
    };
    let nice = cli.worker_nice.unwrap_or(default_nice);
    if nice > 0 {
        // The engine threads already run (started with the exports, on this thread), so
        // only the runtime's threads become nicer.
        rt.on_thread_start(move || {
            if let Err(e) = nbd_server::priority::lower_this_thread(nice) {
                tracing::warn!("--worker-nice {nice}: {e}");
            }
        });
    }
    let rt = rt.enable_all().build().context("tokio runtime")?;
    rt.block_on(run(config, cli.control.as_deref(), disks, volumes))
}

/// Binds the sockets, says what is served, waits for SIGINT or SIGTERM, then shuts down:
/// stop accepting, finish requests in flight, flush, write back every cache.
async fn run(
    config: ServerConfig,
    control: Option<&Path>,
    disks: Disks,
    volumes: Vec<Arc<nbd_server::fscore::served::ServedVolume>>,
) -> Result<()> {
    let handle = Server::bind(config.clone())
        .await
        .with_context(|| match config.listen {
            Some(a) => format!("cannot listen on {a}"),
            None => "cannot listen".to_owned(),
        })?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the SIGINT handler")?;
    // Bound before the "listening on" line, so that the line means ready.
    let control = match control {
        Some(path) => {
            let socket = nbd_server::control::serve(path.to_path_buf(), disks.clone())
                .await
                .with_context(|| format!("cannot serve the control socket {}", path.display()))?;
            eprintln!("nbd-server: control socket {} (mode 0600)", path.display());
            Some(socket)
        }
        None => None,
    };
    announce(&config, &handle);
    tokio::select! {
        _ = int.recv() => tracing::info!("SIGINT"),
        _ = term.recv() => tracing::info!("SIGTERM"),
    }
    // Removes the control socket, whatever happens next.
    drop(control);
    let flushed = handle.shutdown().await;
    // fs-core volumes sync and unmount onto their disks before the disks write back.
    let mut lost = 0;
    for v in &volumes {
        if let Err(e) = v.shutdown() {
            eprintln!("nbd-server: fs-core volume: {e}");
            lost += 1;
        }
    }

    lost += write_back_at_exit(&disks);
    if let Err(e) = &flushed {
        eprintln!("nbd-server: flushing the exports at shutdown failed: {e}");
    }
    if flushed.is_err() || lost > 0 {
        anyhow::bail!("stopped with data not written back (see above)");
    }
    eprintln!("nbd-server: stopped");
    Ok(())
}

/// Says on stderr what is served and where; the "listening on" lines come last and mean
/// ready.
fn announce(config: &ServerConfig, handle: &ServerHandle) {
    for e in config.exports.iter() {
        eprintln!(
            "nbd-server: export {:?}: {} bytes{}",
            e.name,
            e.size(),
            if e.readonly {
                ", read-only"
            } else if e.disk.is_none() {
                ", memory with no emulated disk (no record, faults or crash options, \
                 no --control: a volatile cache could not be observed)"
            } else if e.disk.as_ref().is_some_and(|d| d.plain_storage().is_some()) {
                ", a file of an fs-core volume in memory with no emulated disk under it (no \
                 record, faults or crash options, no --control: a volatile cache could not be \
                 observed)"
            } else {
                ""
            }
        );
    }
    if let Some(t) = &config.tls {
        eprintln!(
            "nbd-server: TLS {} (certificates in {}{})",
            if t.required { "required" } else { "offered" },
            t.dir.display(),
            if t.verify_peer {
                "; client certificates checked"
            } else {
                ""
            }
        );
    }
    if let Some(a) = handle.local_addr() {
        eprintln!("nbd-server: listening on {a}");
    }
    if let Some(p) = handle.unix_path() {
        eprintln!("nbd-server: listening on unix:{}", p.display());
    }
}

/// Prints [`nbd_server::limits::LIMITS`]: as a JSON object of name to value, or one line
/// each (name, value, what it bounds).
fn print_limits(json: bool) {
    let limits = nbd_server::limits::LIMITS;
    if json {
        let m: serde_json::Map<String, serde_json::Value> = limits
            .iter()
            .map(|l| (l.name.to_owned(), l.value.into()))
            .collect();
        println!("{}", serde_json::Value::Object(m));
    } else {
        for l in limits {
            println!("{:<30} {:>12}  {}", l.name, l.shown(), l.what);
        }
    }
}

/// Writes back what every emulated disk still caches and syncs its log; says which byte
/// ranges of which export could not be written. Returns how many exports failed.
fn write_back_at_exit(disks: &Disks) -> usize {
    let mut failed = 0;
    for (name, d) in disks {
        if let Err(e) = d.write_back_everything() {
            eprintln!("nbd-server: export {name:?}: {e}");
            failed += 1;
        }
        if let Err(e) = d.sync_log() {
            eprintln!("nbd-server: export {name:?}: syncing its write log: {e}");
            failed += 1;
        }
    }
    failed
}
