//! Nothing acknowledged is lost, nothing of the user's is overwritten, nothing hangs: the
//! `nbd-server` binary under a full filesystem, hostile paths, a kill, floods of connections
//! and requests. Each test names the defect it guards against; `docs/reliability.md` lists
//! them all.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::binary::Running;
use common::tmpfs::Tmpfs;
use common::wire::*;
use common::{raise_open_files_limit, root_or_skip, Raw};
use nbd_server::log::{LogEnding, LogReader, RecordKind};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

fn pattern(seed: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + seed * 7) % 251) as u8)
        .collect()
}

fn export(spec: String) -> Vec<String> {
    vec!["--export".into(), spec]
}

/// Writes `n` bytes of filler to `path` (to leave a filesystem with little room).
fn fill(path: &Path, n: u64) {
    std::fs::write(path, vec![0x77u8; n as usize]).unwrap();
}

/// Guards against the loss of acknowledged writes when the image's filesystem is full: the
/// cache used to take an entry out before its write-back, and drop it when the write-back
/// failed, so a range read back as zeroes while the server ran and never reached the file.
/// Now the entry stays: reads return it, every FLUSH answers ENOSPC until a retry succeeds,
/// the failure is logged once with the export and the byte range.
#[test]
fn full_filesystem_keeps_acknowledged_writes() {
    if !root_or_skip("full_filesystem_keeps_acknowledged_writes") {
        return;
    }
    let fs = Tmpfs::mount(2 * MIB);
    fill(&fs.path("filler"), 3 * MIB / 2); // 0.5 MiB left
    let img = fs.path("disk.img");
    let srv = Running::start(&export(format!("d:size=4M,file={}", img.display())));
    let mut c = Raw::attach(srv.addr, "d");
    let writes: Vec<(u64, Vec<u8>)> = (0..16)
        .map(|i| (i * 64 * KIB, pattern(i, 64 * KIB)))
        .collect();
    for (off, data) in &writes {
        assert_eq!(c.write_at(0, *off, data), 0, "write at {off}");
    }
    assert_eq!(
        c.flush_now(),
        NBD_ENOSPC,
        "the flush cannot write everything back"
    );
    assert_eq!(c.flush_now(), NBD_ENOSPC, "and keeps saying so");
    for (off, data) in &writes {
        assert_eq!(&c.read_at(*off, data.len()).unwrap(), data, "read at {off}");
    }
    let log = srv.wait_log("write-back of bytes", 10);
    let failures: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("write-back of bytes"))
        .collect();
    assert_eq!(failures.len(), 1, "one failed range, logged once:\n{log}");
    assert!(failures[0].contains("export=d"), "{log}");
    std::fs::remove_file(fs.path("filler")).unwrap();
    assert_eq!(c.flush_now(), 0, "room again: the retry succeeds");
    let on_disk = std::fs::read(&img).unwrap();
    for (off, data) in &writes {
        let at = *off as usize;
        assert_eq!(&on_disk[at..at + data.len()], &data[..], "image at {off}");
    }
    srv.wait_log("written back after", 10);
}

/// Guards against the same loss through the cache limit: a write that needs room the cache
/// cannot make (its write-back fails) is refused, and every write that was acknowledged
/// reads back and reaches the image once there is room.
#[test]
fn full_cache_over_full_filesystem_refuses_rather_than_drops() {
    if !root_or_skip("full_cache_over_full_filesystem_refuses_rather_than_drops") {
        return;
    }
    let fs = Tmpfs::mount(2 * MIB);
    fill(&fs.path("filler"), 3 * MIB / 2);
    let img = fs.path("disk.img");
    let srv = Running::start(&export(format!(
        "d:size=4M,cache=256K,file={}",
        img.display()
    )));
    let mut c = Raw::attach(srv.addr, "d");
    let mut acked = Vec::new();
    let mut refused = 0;
    for i in 0..16 {
        let (off, data) = (i * 64 * KIB, pattern(i + 100, 64 * KIB));
        match c.write_at(0, off, &data) {
            0 => acked.push((off, data)),
            e => {
                assert_eq!(e, NBD_ENOSPC, "write at {off}");
                refused += 1;
            }
        }
    }
    assert!(
        refused > 0,
        "a 256K cache over 0.5 MiB of room must refuse some writes"
    );
    for (off, data) in &acked {
        assert_eq!(&c.read_at(*off, data.len()).unwrap(), data, "read at {off}");
    }
    std::fs::remove_file(fs.path("filler")).unwrap();
    assert_eq!(c.flush_now(), 0);
    let on_disk = std::fs::read(&img).unwrap();
    for (off, data) in &acked {
        let at = *off as usize;
        assert_eq!(&on_disk[at..at + data.len()], &data[..], "image at {off}");
    }
}

/// Guards against a shutdown that silently drops what it cannot write back: it exits 1 and
/// names the byte ranges.
#[test]
fn shutdown_names_the_ranges_it_could_not_write() {
    if !root_or_skip("shutdown_names_the_ranges_it_could_not_write") {
        return;
    }
    let fs = Tmpfs::mount(MIB);
    fill(&fs.path("filler"), MIB);
    let img = fs.path("disk.img");
    let mut srv = Running::start(&export(format!(
        "d:size=4M,idle-writeback=0,file={}",
        img.display()
    )));
    let mut c = Raw::attach(srv.addr, "d");
    assert_eq!(c.write_at(0, 128 * KIB, &pattern(1, 64 * KIB)), 0);
    assert_eq!(c.write_at(0, MIB, &pattern(2, 4 * KIB)), 0);
    drop(c);
    srv.signal(libc::SIGTERM);
    let st = srv.wait_exit(30);
    let log = srv.log();
    assert_eq!(st.code(), Some(1), "{log}");
    assert!(log.contains("could not be written back"), "{log}");
    assert!(log.contains("bytes 131072..196608"), "{log}");
    assert!(log.contains("bytes 1048576..1052672"), "{log}");
}

/// Guards against `--control PATH` deleting whatever file is at PATH, a second server
/// silently taking over a live server's control socket, a socket anyone may use (the umask
/// decided its mode: another user could cut the power), and a socket left behind at exit.
#[test]
fn control_socket_is_never_someone_elses() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = dir.path().join("ctl");
    let args = |ctl: &Path| {
        let mut a = export("d:size=1M".into());
        a.extend(["--control".into(), ctl.display().to_string()]);
        a
    };
    std::fs::write(&ctl, b"precious").unwrap();
    let err = Running::try_start(&args(&ctl), None)
        .err()
        .expect("refused");
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&ctl).unwrap(), b"precious");
    std::fs::remove_file(&ctl).unwrap();

    let mut live = Running::try_start(&args(&ctl), Some(0o000)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&ctl).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "owner only, whatever the umask");
    let err = Running::try_start(&args(&ctl), None)
        .err()
        .expect("refused");
    assert!(err.contains("running server"), "{err}");
    let stats = nbd_server::control::request(&ctl, "stats").expect("the live server still answers");
    assert!(stats.contains("\"d\""), "{stats}");
    live.signal(libc::SIGTERM);
    assert!(live.wait_exit(30).success(), "{}", live.log());
    assert!(!ctl.exists(), "the socket is removed at exit");

    // A stale socket (nobody answers) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&ctl).unwrap());
    assert!(ctl.exists());
    let srv = Running::start(&args(&ctl));
    assert!(
        nbd_server::control::request(&ctl, "stats").is_ok(),
        "{}",
        srv.log()
    );
}

/// Guards against `record=PATH` truncating whatever it names (the export's own image, another
/// export's image, a previous log), two exports recording into one file, a read-only export
/// that would record nothing, two writable exports of one image (in one server or two), and
/// a key given twice.
#[test]
fn record_and_file_paths_are_never_clobbered() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).display().to_string();
    std::fs::write(p("old.log"), b"a previous log").unwrap();
    std::fs::write(p("a.img"), vec![0xa5u8; 64 * 1024]).unwrap();
    std::fs::write(p("b.img"), vec![0x5au8; 64 * 1024]).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            export(format!("d:size=1M,record={}", p("old.log"))),
            "record-overwrite",
        ),
        (
            export(format!(
                "d:file={},record={},record-overwrite",
                p("a.img"),
                p("a.img")
            )),
            "is the image of export",
        ),
        (
            [
                export(format!("a:file={}", p("a.img"))),
                export(format!("b:size=1M,record={}", p("a.img"))),
            ]
            .concat(),
            "is the image of export",
        ),
        (
            [
                export(format!("a:size=1M,record={}", p("new.log"))),
                export(format!("b:size=1M,record={}", p("new.log"))),
            ]
            .concat(),
            "records to",
        ),
        (
            export(format!(
                "d:file={},readonly,record={}",
                p("b.img"),
                p("x.log")
            )),
            "read-only export records nothing",
        ),
        (
            [
                export(format!("a:file={}", p("a.img"))),
                export(format!("b:file={}", p("a.img"))),
            ]
            .concat(),
            "already the image of writable export",
        ),
        (export("d:size=1M,size=2M".into()), "given twice"),
    ];
    for (args, needle) in cases {
        let err = Running::try_start(&args, None)
            .err()
            .unwrap_or_else(|| panic!("{args:?} was accepted"));
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert_eq!(std::fs::read(p("old.log")).unwrap(), b"a previous log");
    assert_eq!(std::fs::read(p("a.img")).unwrap(), vec![0xa5u8; 64 * 1024]);
    assert_eq!(std::fs::read(p("b.img")).unwrap(), vec![0x5au8; 64 * 1024]);
    assert!(!Path::new(&p("new.log")).exists());
    assert!(!Path::new(&p("x.log")).exists());

    // Another server already writing the image holds its lock.
    let first = Running::start(&export(format!("a:file={}", p("a.img"))));
    let err = Running::try_start(&export(format!("a:file={}", p("a.img"))), None)
        .err()
        .expect("second writer refused");
    assert!(err.contains("in use"), "{err}");
    drop(first);
    // Asked for, a log is replaced.
    let srv = Running::start(&export(format!(
        "d:size=1M,record={},record-overwrite",
        p("old.log")
    )));
    drop(srv);
    assert!(LogReader::open(Path::new(&p("old.log"))).is_ok());
}

/// Reads every record of a log: (kind, offset, length) in order, and how it ends.
fn records(path: &Path) -> (Vec<(RecordKind, u64, u64)>, LogEnding) {
    let mut r = LogReader::open(path).unwrap();
    let mut out = Vec::new();
    for rec in r.by_ref() {
        let rec = rec.unwrap();
        out.push((rec.kind, rec.header.offset, rec.header.length));
    }
    (out, r.ending())
}

/// Guards against a write log that lacks writes whose FLUSH (or FUA) was answered when the
/// server is killed: the log was written by a thread that pushed its buffer to the file only
/// every 20 ms. A FLUSH or FUA reply now waits until every record before it is in the file.
#[test]
fn killed_server_log_holds_every_write_a_flush_or_fua_answered() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..11u64 {
        let log = dir.path().join(format!("r{round}.log"));
        let srv = Running::start(&export(format!("d:size=8M,record={}", log.display())));
        let mut c = Raw::attach(srv.addr, "d");
        let n = 1 + round * 3;
        for i in 0..n {
            assert_eq!(c.write_at(0, i * 4096, &pattern(i, 4096)), 0);
        }
        let fua = round % 2 == 1;
        if fua {
            assert_eq!(c.write_at(NBD_CMD_FLAG_FUA, n * 4096, &pattern(n, 4096)), 0);
        } else {
            assert_eq!(c.flush_now(), 0);
        }
        srv.signal(libc::SIGKILL);
        drop(srv);
        let (recs, _) = records(&log);
        let writes = recs.iter().filter(|r| r.0 == RecordKind::Write).count() as u64;
        let want = if fua { n + 1 } else { n };
        assert!(
            writes >= want,
            "round {round}: {writes} of {want} answered writes in the log"
        );
        if !fua {
            assert!(
                recs.iter().any(|r| r.0 == RecordKind::Flush),
                "round {round}: no flush"
            );
        }
    }
}

/// Guards against a log without a cap (20 GB in 40 s): with `record-max`, writes past it
/// are refused with ENOSPC, flushes still work, and the log says why it ends.
#[test]
fn record_max_caps_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("d.log");
    let srv = Running::start(&export(format!(
        "d:size=8M,record={},record-max=1M",
        log.display()
    )));
    let mut c = Raw::attach(srv.addr, "d");
    let mut acked = 0;
    for i in 0..32u64 {
        match c.write_at(0, i * 64 * KIB, &pattern(i, 64 * KIB)) {
            0 => acked += 1,
            e => assert_eq!(e, NBD_ENOSPC),
        }
    }
    assert!(
        (14..16).contains(&acked),
        "{acked} writes of 64K fit a 1 MiB log"
    );
    assert_eq!(c.flush_now(), 0, "a capped log still records flushes");
    drop(c);
    drop(srv);
    let (recs, ending) = records(&log);
    assert!(std::fs::metadata(&log).unwrap().len() <= MIB + 4 * KIB);
    assert_eq!(
        recs.iter().filter(|r| r.0 == RecordKind::Write).count(),
        acked
    );
    assert!(matches!(ending, LogEnding::Full { .. }), "{ending:?}");
    assert!(ending.to_string().contains("record-max"), "{ending}");
}

/// Guards against a log cut by a full log disk reading as an ordinary torn tail: it reads
/// "incomplete: the disk of the log was full", and the disk refuses changes with ENOSPC.
#[test]
fn log_disk_full_reads_as_incomplete() {
    if !root_or_skip("log_disk_full_reads_as_incomplete") {
        return;
    }
    let fs = Tmpfs::mount(2 * MIB);
    let log = fs.path("d.log");
    let srv = Running::start(&export(format!("d:size=8M,record={}", log.display())));
    let mut c = Raw::attach(srv.addr, "d");
    let mut failed_at = None;
    for i in 0..64u64 {
        let e = c.write_at(0, i * 64 * KIB, &pattern(i, 64 * KIB));
        if e != 0 {
            assert_eq!(e, NBD_ENOSPC);
            failed_at = Some(i);
            break;
        }
        if i % 4 == 3 {
            // Pushes make the thread meet the full disk soon after it happens.
            let _ = c.flush_now();
        }
    }
    assert!(failed_at.is_some(), "a 2 MiB log disk must fill");
    assert_eq!(
        c.write_at(0, 0, &[1u8; 4096]),
        NBD_ENOSPC,
        "and stay refused"
    );
    drop(c);
    drop(srv);
    let (_, ending) = records(&log);
    assert!(
        ending
            .to_string()
            .starts_with("incomplete: the disk of the log was full"),
        "{ending}"
    );
}

/// Guards against unbounded memory: 48 connections that pipeline 32 MiB READs and never read
/// a reply took the server to 1.64 GB. The server-wide budget holds it near 512 MiB, small
/// requests from other clients are still served meanwhile, and a client that takes no reply
/// for REPLY_STALL_SECONDS_MAX is dropped, which frees its share.
#[test]
fn a_flood_of_unread_reads_stays_bounded_and_others_are_served() {
    const FLOODERS: usize = 48;
    const READS_EACH: u64 = 4;
    const RSS_BYTES_MAX: u64 = 800 * MIB;
    // The peak may pass it by up to about one more budget: when the stalled clients are
    // dropped, their buffers are freed on the threads that served them while the next
    // reads fill new ones on others, and the allocator keeps freed memory for reuse for a
    // while. Alone the peak is about 550 MiB; under a loaded CI run it was 831 MiB once.
    // Unbounded, the flood took 1.64 GB.
    const PEAK_RSS_BYTES_MAX: u64 =
        2 * nbd_server::limits::SERVER_PAYLOAD_BYTES_MAX as u64 + 128 * MIB;
    // A file export: its reads fill buffers (a memory export lends its memory instead).
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    let srv = Running::start(&export(format!("d:size=64M,file={}", img.display())));
    let mut flooders = Vec::new();
    for i in 0..FLOODERS {
        let mut c = Raw::attach(srv.addr, "d");
        for k in 0..READS_EACH {
            c.request(0, NBD_CMD_READ, k, (i as u64 % 2) * 32 * MIB, 32 << 20, &[]);
        }
        flooders.push(c);
    }
    std::thread::sleep(Duration::from_secs(2));
    let rss = srv.rss_bytes();
    assert!(rss < RSS_BYTES_MAX, "server RSS {} MiB", rss / MIB);
    let started = Instant::now();
    let mut c = Raw::attach(srv.addr, "d");
    assert_eq!(c.write_at(0, 4096, &pattern(9, 4096)), 0);
    assert_eq!(c.read_at(4096, 4096).unwrap(), pattern(9, 4096));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "small requests waited"
    );
    // The flooders take no reply: they are dropped after REPLY_STALL_SECONDS_MAX.
    let wait = nbd_server::limits::REPLY_STALL_SECONDS_MAX + 10;
    let deadline = Instant::now() + Duration::from_secs(wait);
    while !srv.log().contains("took no reply") {
        assert!(
            Instant::now() < deadline,
            "no stalled client dropped:\n{}",
            srv.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Closed flooders free the rest of their share at once.
    drop(flooders);
    let mut big = Raw::attach(srv.addr, "d");
    assert_eq!(big.read_at(0, 32 << 20).unwrap().len(), 32 << 20);
    let peak = srv.peak_rss_bytes();
    eprintln!(
        "flood: server RSS {} MiB, peak {} MiB",
        rss / MIB,
        peak / MIB
    );
    // The flood filled buffers up to the budget: the bound above was tested, not idle.
    assert!(
        peak > 256 * MIB,
        "peak RSS {} MiB: the flood never filled the budget",
        peak / MIB
    );
    assert!(
        peak < PEAK_RSS_BYTES_MAX,
        "server peak RSS {} MiB",
        peak / MIB
    );
}

/// Guards against idle connections locking everyone out: 512 connections that never
/// negotiate used to hold every connection slot for 60 s. Now at most HANDSHAKES_MAX
/// negotiate at once (a new one closes the oldest) for at most HANDSHAKE_SECONDS_MAX, and
/// established connections keep working.
#[test]
fn idle_handshakes_do_not_lock_anyone_out() {
    raise_open_files_limit(4096);
    let srv = Running::start(&export("d:size=1M".into()));
    let mut established = Raw::attach(srv.addr, "d");
    let idle: Vec<std::net::TcpStream> = (0..512)
        .filter_map(|_| std::net::TcpStream::connect(srv.addr).ok())
        .collect();
    assert!(idle.len() >= 500, "{} idle connections", idle.len());
    let started = Instant::now();
    // The fresh client was accepted after every idle one, so it is never the one closed to
    // make room (CI once saw it closed: the queue of handshakes followed the order the
    // connection tasks started in, not the order of accept; it is registered at accept now).
    let mut fresh = Raw::attach(srv.addr, "d");
    assert_eq!(fresh.write_at(0, 0, &pattern(3, 4096)), 0);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(established.read_at(0, 4096).unwrap(), pattern(3, 4096));
    drop(idle);
}

/// Guards against unflushed writes to a file export never reaching the file while the client
/// is idle: after `idle-writeback` (1 s by default) the cache is written back.
#[test]
fn idle_writeback_reaches_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    let srv = Running::start(&export(format!("d:size=1M,file={}", img.display())));
    let mut c = Raw::attach(srv.addr, "d");
    assert_eq!(c.write_at(0, 8192, &pattern(5, 4096)), 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let on_disk = std::fs::read(&img).unwrap();
        if on_disk[8192..12288] == pattern(5, 4096)[..] {
            break;
        }
        assert!(Instant::now() < deadline, "not in the file after 5 s idle");
        std::thread::sleep(Duration::from_millis(100));
    }
    // With idle-writeback=0 it stays in the cache.
    let img2 = dir.path().join("e.img");
    let srv2 = Running::start(&export(format!(
        "e:size=1M,idle-writeback=0,file={}",
        img2.display()
    )));
    let mut c = Raw::attach(srv2.addr, "e");
    assert_eq!(c.write_at(0, 0, &pattern(6, 4096)), 0);
    std::thread::sleep(Duration::from_secs(2));
    assert!(std::fs::read(&img2).unwrap()[..4096]
        .iter()
        .all(|&b| b == 0));
    drop(srv);
}
