//! Issue 21: crash-state generation kept the prefix's hash of every sector it had seen
//! written, and the hash of every state, in memory: `crashmonkey states` of a 1 GiB disk
//! filled by fio took 281 MB, growing with the log. Those tables now live in files
//! (`crashmonkey::state_tables`) and the generator holds one epoch at a time, bounded by
//! `STATE_MEMORY_BYTES_MAX`. The sector table's pages stay in memory up to
//! `SECTOR_HASHES_MEMORY_BYTES_MAX` (64 MiB), then move to its file. This test writes every
//! sector of a 256 MiB disk in short epochs and holds the peak RSS of `crashmonkey states`
//! well below what the in-memory tables took (about 90 MB here), and the same for the doubled
//! log: with the sector table in its file from the start, under 48 MiB; with its bound
//! lowered to 8 MiB (both tables, 16 and 32 MiB, move to their files), under 48 MiB plus
//! that bound; with the default bound, under 48 MiB plus 64.
//!
//! Alone in its test binary: `getrusage(RUSAGE_CHILDREN)` reports the largest child this
//! process waited for, so no other test may spawn one here.

use std::path::{Path, PathBuf};
use std::process::Command;

use nbd_server::log::{encode_payload, FlushPayload, LogWriter, RecordKind};

/// Bytes of each write of the generated logs.
const WRITE_BYTES: u64 = 64 * 1024;
/// Writes between two flushes: epochs of 1 MiB.
const WRITES_PER_EPOCH: u64 = 16;
/// `crashmonkey states`' peak resident set may not exceed this plus the sector table's memory
/// bound, whatever the log's length. (It is about 30 MiB on these logs with the table in its
/// file from the start, give or take a few MiB of the allocator's 2 MiB pages from run to
/// run; the in-memory tables made it 90 MB on the 256 MiB one.)
const PEAK_RSS_BYTES_MAX: u64 = 48 << 20;
/// The lowered bound of the sector table's memory.
const LOW_TABLE_BYTES: u64 = 8 << 20;

/// Peak resident set of the largest child waited for, in bytes.
#[allow(unsafe_code)]
fn children_peak_rss_bytes() -> u64 {
    // SAFETY: getrusage writes one `rusage` into the zeroed value we own; zero is a valid
    // bit pattern for every field of it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    assert_eq!(r, 0, "getrusage: {}", std::io::Error::last_os_error());
    // Linux reports ru_maxrss in KiB.
    u64::try_from(usage.ru_maxrss).unwrap() * 1024
}

/// A log writing every sector of a disk of `disk_bytes` once, in [`WRITE_BYTES`] writes
/// (each its own bytes) in a shuffled order, with a flush every [`WRITES_PER_EPOCH`].
fn fill_log(dir: &Path, disk_bytes: u64) -> PathBuf {
    let path = dir.join(format!("fill-{disk_bytes}.log"));
    let mut w = LogWriter::create(&path, disk_bytes).unwrap();
    let writes = disk_bytes / WRITE_BYTES;
    let mut data = vec![0u8; WRITE_BYTES as usize];
    for i in 0..writes {
        // An odd multiplier visits every block once.
        let block = i.wrapping_mul(2_654_435_761) % writes;
        for (k, chunk) in data.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&(i << 32 | k as u64).to_le_bytes());
        }
        w.append(
            RecordKind::Write,
            0,
            1,
            block * WRITE_BYTES,
            WRITE_BYTES,
            &data,
        )
        .unwrap();
        if i % WRITES_PER_EPOCH == WRITES_PER_EPOCH - 1 {
            let flush = encode_payload(&FlushPayload::default());
            w.append(RecordKind::Flush, 0, 1, 0, 0, &flush).unwrap();
        }
    }
    w.flush().unwrap();
    path
}

/// `crashmonkey states LOG` with a few states per epoch: its summary line and peak RSS so far.
fn states(log: &Path, table_bytes: u64) -> (serde_json::Value, u64) {
    let out = Command::new(env!("CARGO_BIN_EXE_crashmonkey"))
        .env(
            "CRASHMONKEY_SECTOR_HASHES_MEMORY_BYTES",
            table_bytes.to_string(),
        )
        .arg("states")
        .arg(log)
        .args(["--max-subset", "1", "--samples", "2", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().last().unwrap();
    (
        serde_json::from_str(last).unwrap(),
        children_peak_rss_bytes(),
    )
}

#[test]
fn state_generation_memory_does_not_grow_with_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let default_bound = crashmonkey::state_tables::SECTOR_HASHES_MEMORY_BYTES_MAX;
    // The lowest bound first: a peak is the largest of every run so far.
    for table_bytes in [0, LOW_TABLE_BYTES, default_bound] {
        for disk_bytes in [256u64 << 20, 512 << 20] {
            let log = fill_log(dir.path(), disk_bytes);
            let (summary, peak) = states(&log, table_bytes);
            std::fs::remove_file(&log).unwrap();
            let epochs = disk_bytes / WRITE_BYTES / WRITES_PER_EPOCH + 1;
            eprintln!(
                "{disk_bytes} bytes written, table bound {table_bytes}: {summary}, peak RSS {} KiB",
                peak / 1024
            );
            assert_eq!(summary["epochs"], epochs, "{summary}");
            assert!(
                peak < PEAK_RSS_BYTES_MAX + table_bytes,
                "crashmonkey states' peak RSS was {peak} bytes on a log writing {disk_bytes} \
                 bytes, with the sector table's memory bounded at {table_bytes}"
            );
        }
    }
}
