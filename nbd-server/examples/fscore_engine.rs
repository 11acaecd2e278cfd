//! The fs-core export's engine alone: the requests `make bench-nbd` sends to a fscore export,
//! submitted in process to the same volume (the export's defaults, a memory disk passed
//! through), with no sockets, channels or threads. What it prints is the engine thread's own
//! cost per request, which bounds what the served export can reach: at 100% of one core, one
//! request every that many microseconds. Deterministic work (the offsets come from a fixed
//! seed), so a change to the model is measured here far more steadily than through fio on a
//! shared machine.

use std::time::Instant;

use anyhow::{anyhow, Result};
use clap::Parser;
use nbd_server::disk::DiskConfig;
use nbd_server::fscore::served::{open, VolumeSetup};
use nbd_server::fscore::volume::{VolOp, VolRequest, Volume};
use nbd_server::fscore::FsCoreSpec;

/// The server's allocator, so allocation costs as much as in the server.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Fill bytes of a filling write (1 MiB), as fio's first pass writes.
const FILL_WRITE_BYTES: u64 = 1 << 20;
/// Requests in flight while filling (fio's 1 MiB jobs in `make bench-nbd`).
const FILL_DEPTH: u64 = 8;

/// Runs random writes through an fs-core export's engine in process and prints the engine's
/// cost per write (the ceiling of the served export on one core).
///
/// The file is first filled by sequential 1 MiB writes (as `make bench-nbd` fills it), then
/// each round writes `--writes` blocks of `--bs` bytes at random aligned offsets with `--depth`
/// in flight, stepping the engine with its seeded policy, exactly as the server's engine
/// thread does.
///
/// Example: cargo run --release -p nbd-server --example fscore_engine -- --rounds 3
#[derive(Parser, Debug)]
struct Args {
    /// Writes per round.
    #[arg(long, default_value_t = 200_000)]
    writes: u64,
    /// Bytes per write.
    #[arg(long, default_value_t = 4096)]
    bs: u64,
    /// Writes in flight.
    #[arg(long, default_value_t = 32)]
    depth: u64,
    /// The export's size in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Rounds (each on the same volume, after the ones before).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Random reads instead of writes (after the same fill): what `make bench-nbd`'s 4K
    /// random read job asks of the engine.
    #[arg(long)]
    read: bool,
    /// fscore= export keys, KEY=VALUE[,KEY=VALUE...] (repeatable), e.g. cache-folios=65536.
    #[arg(long = "key")]
    keys: Vec<String>,
}

/// The export's size in bytes, at most what an fs-core file holds.
fn export_bytes(args: &Args) -> Result<u64> {
    args.size_mib
        .checked_mul(1 << 20)
        .filter(|&b| b <= fs_core::fs::FILE_BYTES_MAX)
        .ok_or_else(|| {
            anyhow!(
                "--size-mib {}: more than an fs-core file holds",
                args.size_mib
            )
        })
}

fn volume(args: &Args) -> Result<Volume> {
    let mut spec = FsCoreSpec::default();
    for kv in args.keys.iter().flat_map(|k| k.split(',')) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow!("{kv}: not KEY=VALUE"))?;
        spec.set(k, Some(v)).map_err(|e| anyhow!("{k}: {e}"))?;
    }
    // The server's own way to a volume, for an export nothing observes (a memory disk that
    // passes writes through).
    let setup = VolumeSetup {
        image: None,
        files: vec![("bench".into(), Some(export_bytes(args)?))],
        volume_size: spec.volume_size,
        config: spec.config,
        sched_seed: spec.sched_seed,
        session: None,
        disk: DiskConfig::default(),
        plain: true,
        label: "bench".into(),
    };
    let (_disk, volume, _session, _header) = open(&setup).map_err(|e| anyhow!(e))?;
    Ok(volume)
}

/// Writes (or with `read`, reads) `n` blocks of `bs` bytes, `depth` in flight, at the offsets
/// `offset(i)` gives; returns the seconds it took.
fn run(
    v: &mut Volume,
    (n, bs, depth): (u64, u64, u64),
    read: bool,
    offset: impl Fn(u64) -> u64,
) -> Result<f64> {
    let (mut sent, mut done) = (0u64, 0u64);
    let start = Instant::now();
    while done < n {
        while sent - done < depth && sent < n {
            let byte = (sent % 251) as u8 + 1;
            let op = if read {
                VolOp::Read { len: bs }
            } else {
                VolOp::Write {
                    data: vec![byte; bs as usize],
                }
            };
            v.arrive(VolRequest {
                file: 0,
                offset: offset(sent),
                op,
                fua: false,
            });
            sent += 1;
        }
        v.step()?;
        for (_, answer) in v.take_answers() {
            answer?;
            done += 1;
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let size = export_bytes(&args)?;
    if args.bs == 0 || size < args.bs || args.depth == 0 || args.writes == 0 {
        return Err(anyhow!(
            "--writes, --bs and --depth must be positive, --bs at most the size"
        ));
    }
    let mut v = volume(&args)?;
    let fill = (size / FILL_WRITE_BYTES, FILL_WRITE_BYTES, FILL_DEPTH);
    run(&mut v, fill, false, |i| i * FILL_WRITE_BYTES)?;
    let slots = size / args.bs;
    for round in 0..args.rounds {
        // xorshift over the request number: the same offsets every run.
        let offset = move |i: u64| {
            let mut x = (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(round);
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % slots) * args.bs
        };
        let steps = v.engine().steps();
        let job = (args.writes, args.bs, args.depth);
        let secs = run(&mut v, job, args.read, offset)?;
        let n = args.writes as f64;
        let what = if args.read { "reads" } else { "writes" };
        println!(
            "fscore_engine bs={} depth={} round={}: {:.0} {what}/s, {:.2} us each, {:.1} steps each",
            args.bs,
            args.depth,
            round + 1,
            n / secs,
            secs * 1e6 / n,
            (v.engine().steps() - steps) as f64 / n
        );
    }
    Ok(())
}
