//! A structure-aware protocol fuzzer against a live server (seeded; the seed is printed).
//!
//! Each case builds a mostly valid client session (client flags, a few options, an export
//! choice, then requests with payloads) over the server's exports (memory, read-only, raw
//! file, emulated disk with a write log), mutates it (flipped bytes, fields set to edge
//! values, truncation, inserted or repeated spans), sends it in random pieces while a second
//! thread drains the replies, then half-closes. Checked, for every case: the server closes
//! the connection within [`CASE_TIMEOUT`] (no hang on any input); and at the end: no panic
//! anywhere in the server (a panic hook counts them: tokio would otherwise swallow a
//! connection task's panic), a well-behaved client that wrote and verified its own export
//! during the whole run saw its data intact, the read-only export still reads as zeroes, the
//! write log of the emulated disk still parses to its end, and a fresh client reads and writes.
//!
//! Replay a failure with `NBD_FUZZ_SEED=<seed> cargo test -p nbd-server --test fuzz`;
//! `NBD_FUZZ_CASES` sets the number of cases (default [`CASES_DEFAULT`]).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nbd_server::log::LogReader;
#[path = "common/wire.rs"]
mod wire;
use nbd_server::backend::{Backend, MemoryBackend, WriteData};
use nbd_server::{Export, ExportRegistry, ExportSpec, Server, ServerConfig};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use wire::*;

const CASES_DEFAULT: u64 = 3000;
const THREADS: u64 = 4;
/// Longest one case may take, from connecting to seeing the server close the connection.
const CASE_TIMEOUT: Duration = Duration::from_secs(20);
const DISK_BYTES: u64 = 16 << 20;
const KEPT_BYTES: u64 = 4 << 20;
/// Largest write payload a case actually sends (its header may claim any length).
const CASE_PAYLOAD_BYTES_MAX: usize = 256 * 1024;

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Exports a case may name; "kept" is never named (the checker client owns it).
const NAMES: [&str; 6] = ["disk", "ro", "file", "emu", "", "nope"];

fn be16(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_be_bytes());
}
fn be32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_be_bytes());
}

fn request(v: &mut Vec<u8>, flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
    let h = RequestHeader {
        flags,
        command,
        cookie,
        offset,
        length,
    };
    v.extend_from_slice(&h.encode());
}

fn option(v: &mut Vec<u8>, opt: u32, data: &[u8]) {
    v.extend_from_slice(&IHAVEOPT_BYTES);
    be32(v, opt);
    be32(v, data.len() as u32);
    v.extend_from_slice(data);
}

fn name(rng: &mut ChaCha8Rng) -> Vec<u8> {
    if rng.random_bool(0.1) {
        let mut b = vec![0u8; rng.random_range(0..300)];
        rng.fill_bytes(&mut b);
        b
    } else {
        // Mostly the exports that take writes, so most cases reach deep.
        let i = match rng.random_range(0..20) {
            0..=6 => 0,
            7..=13 => 3,
            14..=16 => 2,
            17 => 1,
            _ => rng.random_range(0..NAMES.len()),
        };
        NAMES[i].as_bytes().to_vec()
    }
}

/// NBD_OPT_INFO / NBD_OPT_GO data: name, then information requests.
fn info_data(rng: &mut ChaCha8Rng, name: &[u8]) -> Vec<u8> {
    let mut d = Vec::new();
    be32(&mut d, name.len() as u32);
    d.extend_from_slice(name);
    let n = rng.random_range(0..5u16);
    be16(&mut d, n);
    for _ in 0..n {
        be16(&mut d, rng.random_range(0..6));
    }
    d
}

/// LIST_META_CONTEXT / SET_META_CONTEXT data.
fn meta_data(rng: &mut ChaCha8Rng, name: &[u8]) -> Vec<u8> {
    let mut d = Vec::new();
    be32(&mut d, name.len() as u32);
    d.extend_from_slice(name);
    let queries: Vec<&[u8]> = (0..rng.random_range(0..4))
        .map(|_| match rng.random_range(0..4) {
            0 => &b"base:"[..],
            1 => &b"qemu:dirty-bitmap:x"[..],
            _ => &b"base:allocation"[..],
        })
        .collect();
    be32(&mut d, queries.len() as u32);
    for q in queries {
        be32(&mut d, q.len() as u32);
        d.extend_from_slice(q);
    }
    d
}

fn edge_u64(rng: &mut ChaCha8Rng, size: u64) -> u64 {
    match rng.random_range(0..10) {
        0 => 0,
        1 => size,
        2 => size.saturating_sub(4096),
        3 => u64::MAX - rng.random_range(0..8192),
        4 => 1 << rng.random_range(0..64),
        5 => rng.random(),
        _ => rng.random_range(0..size.max(1)) & !511,
    }
}

fn edge_u32(rng: &mut ChaCha8Rng) -> u32 {
    match rng.random_range(0..10) {
        0 => 0,
        1 => 1,
        2 => u32::MAX,
        3 => (32 << 20) + 1,
        4 => 1 << rng.random_range(0..32),
        5 => rng.random(),
        _ => rng.random_range(1..=64u32) * 512,
    }
}

/// One session: handshake, options, then (if it chose an export) requests.
fn session(rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut v = Vec::new();
    let flags = match rng.random_range(0..10) {
        0 => rng.random(),
        1 => NBD_FLAG_C_FIXED_NEWSTYLE,
        _ => NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES,
    };
    be32(&mut v, flags);
    let mut structured = false;
    for _ in 0..rng.random_range(0..6) {
        match rng.random_range(0..9) {
            0 => option(&mut v, NBD_OPT_LIST, &[]),
            1 => {
                let n = name(rng);
                let d = info_data(rng, &n);
                option(&mut v, NBD_OPT_INFO, &d)
            }
            2 | 3 => {
                structured = true;
                option(&mut v, NBD_OPT_STRUCTURED_REPLY, &[])
            }
            4 => {
                let n = name(rng);
                let d = meta_data(rng, &n);
                option(&mut v, NBD_OPT_LIST_META_CONTEXT, &d)
            }
            5 | 6 => {
                let n = name(rng);
                let d = meta_data(rng, &n);
                option(&mut v, NBD_OPT_SET_META_CONTEXT, &d)
            }
            7 => {
                let mut d = vec![0u8; rng.random_range(0..64)];
                rng.fill_bytes(&mut d);
                option(&mut v, rng.random_range(0..20), &d)
            }
            _ => option(&mut v, NBD_OPT_EXTENDED_HEADERS, &[]),
        }
    }
    if rng.random_bool(0.1) {
        option(&mut v, NBD_OPT_ABORT, &[]);
        return v;
    }
    let n = name(rng);
    if rng.random_bool(0.2) {
        option(&mut v, NBD_OPT_EXPORT_NAME, &n);
    } else {
        let d = info_data(rng, &n);
        option(&mut v, NBD_OPT_GO, &d);
    }
    let size = DISK_BYTES;
    for cookie in 0..rng.random_range(0..40u64) {
        let command = match rng.random_range(0..20) {
            0..=4 => NBD_CMD_WRITE,
            5..=8 => NBD_CMD_READ,
            9 => NBD_CMD_FLUSH,
            10 | 11 => NBD_CMD_TRIM,
            12 => NBD_CMD_CACHE,
            13 | 14 => NBD_CMD_WRITE_ZEROES,
            15 | 16 => NBD_CMD_BLOCK_STATUS,
            17 => NBD_CMD_DISC,
            _ => rng.random_range(0..16),
        };
        let flags: u16 = if rng.random_bool(0.1) {
            rng.random()
        } else {
            let mut f = 0;
            for bit in [
                NBD_CMD_FLAG_FUA,
                NBD_CMD_FLAG_NO_HOLE,
                NBD_CMD_FLAG_DF,
                NBD_CMD_FLAG_REQ_ONE,
                NBD_CMD_FLAG_FAST_ZERO,
            ] {
                if rng.random_bool(if structured { 0.2 } else { 0.1 }) {
                    f |= bit;
                }
            }
            f
        };
        let offset = edge_u64(rng, size);
        let length = if rng.random_bool(0.7) {
            rng.random_range(1..=32u32) * 512
        } else {
            edge_u32(rng)
        };
        request(&mut v, flags, command, cookie, offset, length);
        if command == NBD_CMD_WRITE {
            let n = (length as usize).min(CASE_PAYLOAD_BYTES_MAX);
            let byte: u8 = rng.random();
            v.extend(std::iter::repeat_n(byte, n));
        }
        if command == NBD_CMD_DISC {
            break;
        }
    }
    v
}

/// Flipped bytes, fields set to edge values, truncation, inserted or repeated spans.
fn mutate(rng: &mut ChaCha8Rng, v: &mut Vec<u8>) {
    for _ in 0..rng.random_range(1..5) {
        if v.is_empty() {
            return;
        }
        let at = rng.random_range(0..v.len());
        match rng.random_range(0..6) {
            0 => v[at] ^= 1 << rng.random_range(0..8),
            1 => v[at] = rng.random(),
            2 => {
                let e = edge_u32(rng).to_be_bytes();
                let end = (at + 4).min(v.len());
                v[at..end].copy_from_slice(&e[..end - at]);
            }
            3 => v.truncate(at),
            4 => {
                let mut junk = vec![0u8; rng.random_range(1..64)];
                rng.fill_bytes(&mut junk);
                v.splice(at..at, junk);
            }
            _ => {
                let end = (at + rng.random_range(1..200)).min(v.len());
                let span = v[at..end].to_vec();
                v.splice(at..at, span);
            }
        }
    }
}

/// Sends one case and waits until the server closes the connection; returns what failed.
fn run_case(addr: SocketAddr, seed: u64) -> Result<(), String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut bytes = session(&mut rng);
    if rng.random_bool(0.7) {
        mutate(&mut rng, &mut bytes);
    }
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(CASE_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(CASE_TIMEOUT)).unwrap();
    let mut r = s.try_clone().unwrap();
    // Drain replies as they come, so the server never waits on us; report how it ended.
    let drain = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let mut sent = 0;
    while sent < bytes.len() {
        let n = rng.random_range(1..=bytes.len() - sent).min(64 * 1024);
        // The server may close early (a fatal error in the stream): that is allowed.
        if s.write_all(&bytes[sent..sent + n]).is_err() {
            break;
        }
        sent += n;
    }
    let _ = s.shutdown(Shutdown::Write);
    match drain.join().unwrap() {
        Ok(()) => Ok(()),
        Err(e) => Err(format!(
            "the server did not close the connection within {CASE_TIMEOUT:?} ({e}; \
             {:?} since connecting); {} of {} bytes sent",
            start.elapsed(),
            sent,
            bytes.len()
        )),
    }
}

/// A well-behaved client that writes and reads back its own export until told to stop.
/// The read-only export's bytes: no zero byte, no two neighbouring sectors alike.
fn ro_pattern() -> Vec<u8> {
    (0..DISK_BYTES).map(|i| (i % 251) as u8 + 1).collect()
}

fn checker(addr: SocketAddr, stop: Arc<AtomicBool>) -> Result<u64, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(CASE_TIMEOUT)).unwrap();
    let mut greeting = [0u8; GREETING_BYTES];
    s.read_exact(&mut greeting).map_err(|e| e.to_string())?;
    let mut v = Vec::new();
    be32(&mut v, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
    option(&mut v, NBD_OPT_EXPORT_NAME, b"kept");
    s.write_all(&v).map_err(|e| e.to_string())?;
    let mut info = [0u8; 10];
    s.read_exact(&mut info).map_err(|e| e.to_string())?;
    let mut rounds = 0u64;
    let mut shadow = vec![0u8; KEPT_BYTES as usize];
    while !stop.load(Ordering::Relaxed) || rounds < 20 {
        let off = (rounds * 7919 * 4096) % (KEPT_BYTES - 65536);
        let len = 4096 * (1 + rounds % 16) as usize;
        let byte = (rounds % 251) as u8 + 1;
        let mut req = Vec::new();
        request(&mut req, 0, NBD_CMD_WRITE, rounds, off, len as u32);
        req.extend(std::iter::repeat_n(byte, len));
        s.write_all(&req).map_err(|e| e.to_string())?;
        let mut rep = [0u8; SIMPLE_REPLY_HEADER_BYTES];
        s.read_exact(&mut rep).map_err(|e| e.to_string())?;
        if rep[4..8] != [0; 4] {
            return Err(format!("write {rounds} failed: {rep:?}"));
        }
        shadow[off as usize..off as usize + len].fill(byte);
        // Read back a wider window than was written: neighbours must be intact too.
        let roff = off.saturating_sub(8192);
        let rlen = len + 16384;
        let mut req = Vec::new();
        request(&mut req, 0, NBD_CMD_READ, rounds, roff, rlen as u32);
        s.write_all(&req).map_err(|e| e.to_string())?;
        s.read_exact(&mut rep).map_err(|e| e.to_string())?;
        let mut got = vec![0u8; rlen];
        s.read_exact(&mut got).map_err(|e| e.to_string())?;
        if got[..] != shadow[roff as usize..roff as usize + rlen] {
            return Err(format!("round {rounds}: read back other bytes at {roff}"));
        }
        rounds += 1;
    }
    Ok(rounds)
}

#[test]
fn mutated_sessions_never_panic_hang_or_lose_data() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));
    let seed: u64 = std::env::var("NBD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x0f0e_2026);
    let cases: u64 = std::env::var("NBD_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(CASES_DEFAULT);
    println!("seed {seed}, {cases} cases (replay: NBD_FUZZ_SEED={seed})");

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("emu.log");
    let specs: Vec<ExportSpec> = [
        format!("disk:size={DISK_BYTES}"),
        format!("file:size=8M,file={}", dir.path().join("f.img").display()),
        format!("emu:size={DISK_BYTES},record={}", log.display()),
        format!("kept:size={KEPT_BYTES}"),
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    let mut exports: Vec<Export> = specs
        .iter()
        .map(|s| Export::from_spec(s).unwrap())
        .collect();
    // The read-only export holds a pattern in memory, so a wrongly accepted WRITE, TRIM or
    // WRITE_ZEROES shows as changed bytes (on zeroes the last two were invisible; a file
    // export would not show them either, as its file is opened read-only).
    let ro = MemoryBackend::new(DISK_BYTES);
    ro.write(None, 0, WriteData::bytes(ro_pattern()), false)
        .unwrap();
    exports.push(Export::new("ro", Arc::new(ro), true));
    let server = Server::start_background(ServerConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        unix: None,
        exports: ExportRegistry::new(exports).unwrap(),
        tls: None,
    })
    .unwrap();
    let addr = server.local_addr().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let check = {
        let stop = stop.clone();
        std::thread::spawn(move || checker(addr, stop))
    };
    let failures = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let failures = failures.clone();
            std::thread::spawn(move || {
                for case in (t..cases).step_by(THREADS as usize) {
                    let case_seed = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ case;
                    if let Err(e) = run_case(addr, case_seed) {
                        failures.lock().unwrap().push(format!("case {case}: {e}"));
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = check.join().unwrap().expect("the checker client");
    println!("checker: {rounds} write+verify rounds on \"kept\" during the run");
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "seed {seed}: {failures:#?}");
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
        "seed {seed}: the server panicked"
    );

    // The read-only export was never changed.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(CASE_TIMEOUT)).unwrap();
    let mut greeting = [0u8; GREETING_BYTES];
    s.read_exact(&mut greeting).unwrap();
    let mut v = Vec::new();
    be32(&mut v, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
    option(&mut v, NBD_OPT_EXPORT_NAME, b"ro");
    request(&mut v, 0, NBD_CMD_READ, 1, 0, DISK_BYTES as u32);
    s.write_all(&v).unwrap();
    let mut info = [0u8; 10 + SIMPLE_REPLY_HEADER_BYTES];
    s.read_exact(&mut info).unwrap();
    assert_eq!(info[14..18], [0; 4], "reading the read-only export");
    let mut data = vec![0u8; DISK_BYTES as usize];
    s.read_exact(&mut data).unwrap();
    assert!(
        data == ro_pattern(),
        "seed {seed}: the read-only export changed"
    );
    drop(s);

    // Stop the server (it flushes the log), then read the log to its end.
    drop(server);
    let mut records = 0u64;
    for r in LogReader::open(&log).expect("open the write log") {
        r.unwrap_or_else(|e| panic!("seed {seed}: the write log does not parse: {e}"));
        records += 1;
    }
    println!("write log of \"emu\": {records} records");
    assert!(records > 0, "no case reached the emulated disk");
}
