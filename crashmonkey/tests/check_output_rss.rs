//! Issue 13, item 10: checker output was read whole before it was cut to
//! `CHECKER_OUTPUT_BYTES_MAX`: a checker printing 300 MB made crashmonkey 886 MB big. The
//! output is streamed: the head is kept, the rest counted and dropped, the pipes drained.
//!
//! Alone in its test binary: `getrusage(RUSAGE_CHILDREN)` reports the largest child this
//! process waited for, so no other test may spawn one here.

mod common;

use std::time::Duration;

use common::{base, check_cmd, log, output_within, DISK_BYTES};
use crashmonkey::check::CHECKER_OUTPUT_BYTES_MAX;

/// Bytes the checker prints to stdout, and to stderr.
const STDOUT_BYTES: u64 = 300_000_000;
const STDERR_BYTES: u64 = 3_000_000;
/// crashmonkey's peak resident set may not exceed this. (It is about 10 MiB with a checker
/// that prints nothing; it was 886 MB when the output was buffered whole.)
const PEAK_RSS_BYTES_MAX: u64 = 64 << 20;

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

/// The numbers in "[NAME cut: K bytes kept, D bytes dropped]".
fn cut_note(output: &str, name: &str) -> (u64, u64) {
    let start = output
        .find(&format!("[{name} cut: "))
        .unwrap_or_else(|| panic!("no note that {name} was cut"));
    let note = &output[start..];
    let note = &note[..note.find(']').unwrap()];
    let numbers: Vec<u64> = note
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(numbers.len(), 2, "{note}");
    (numbers[0], numbers[1])
}

#[test]
fn huge_checker_output_is_streamed_and_capped() {
    let dir = tempfile::tempdir().unwrap();
    let (l, b) = (log(dir.path()), base(dir.path(), DISK_BYTES));
    // Only state 0 prints: one big output is enough, and the test stays quick.
    let checker = format!(
        "if [ {{state}} = 0 ]; then yes 0123456789abcdef | head -c {STDOUT_BYTES}; \
         yes err | head -c {STDERR_BYTES} >&2; fi; false {{image}}"
    );
    let out = output_within(
        &mut check_cmd(&l, &b, &checker, &["--json"]),
        Duration::from_secs(120),
    );
    let peak = children_peak_rss_bytes();
    eprintln!("crashmonkey peak RSS: {} KiB", peak / 1024);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let first = &s["failures"][0];
    assert_eq!(first["id"], 0, "{first}");
    let output = first["output"].as_str().unwrap();
    assert!(
        output.len() <= CHECKER_OUTPUT_BYTES_MAX + 4096,
        "{}",
        output.len()
    );
    let (kept, dropped) = cut_note(output, "stdout");
    assert_eq!(kept + dropped, STDOUT_BYTES);
    assert!(output.starts_with("0123456789abcdef\n0123"));
    let (kept_err, dropped_err) = cut_note(output, "stderr");
    assert_eq!(kept_err + dropped_err, STDERR_BYTES);
    assert!(kept + kept_err <= CHECKER_OUTPUT_BYTES_MAX as u64);
    assert!(
        peak < PEAK_RSS_BYTES_MAX,
        "crashmonkey's peak RSS was {peak} bytes with {STDOUT_BYTES} bytes of checker output"
    );
}
