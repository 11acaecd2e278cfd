//! Logs whose records all pass their checksums but say impossible things (a range past the
//! disk or past 2^64, a torn write whose pieces lie outside it, a flush payload that does not
//! decode). nbd-server never writes these; a damaged or hand-made log may hold them. Every
//! command that reads a log must refuse it with an error that names the record, exit
//! non-zero, and never panic. (`log show` and `log stats` print records as they are, so a
//! power cut's fates and a flush's payload are theirs to show, not to judge: only the range
//! checks apply to them.)

use std::path::{Path, PathBuf};
use std::process::Command;

use nbd_server::log::*;

const DISK_BYTES: u64 = 1 << 20;

fn cm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_crashmonkey"))
        .args(args)
        .output()
        .unwrap()
}

/// A log of a good write and a flush, then `bad` appended by the caller.
fn log_with(dir: &Path, name: &str, bad: impl FnOnce(&mut LogWriter)) -> PathBuf {
    let path = dir.join(format!("{name}.log"));
    let mut w = LogWriter::create(&path, DISK_BYTES).unwrap();
    w.append(RecordKind::Write, 0, 1, 0, 4096, &[1u8; 4096])
        .unwrap();
    w.append(
        RecordKind::Flush,
        0,
        1,
        0,
        0,
        &encode_payload(&FlushPayload::default()),
    )
    .unwrap();
    bad(&mut w);
    w.flush().unwrap();
    path
}

fn torn(seq_offset_len: (u64, u64), pieces: Vec<(u64, u64)>) -> impl FnOnce(&mut LogWriter) {
    move |w: &mut LogWriter| {
        let (off, len) = seq_offset_len;
        let seq = w
            .append(RecordKind::Write, 0, 1, off, len, &vec![2u8; len as usize])
            .unwrap();
        let cut = PowerCutPayload {
            seed: 1,
            mode: CutMode::Torn,
            fates: vec![WriteFate {
                seq,
                fate: Fate::Torn,
                pieces,
            }],
        };
        w.append(RecordKind::PowerCut, 0, 0, 0, 0, &encode_payload(&cut))
            .unwrap();
    }
}

#[test]
fn impossible_records_are_refused_by_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    std::fs::write(&base, vec![0u8; DISK_BYTES as usize]).unwrap();
    let cases: Vec<(&str, PathBuf)> = vec![
        (
            "write past the disk",
            log_with(dir.path(), "past", |w| {
                w.append(RecordKind::Write, 0, 1, DISK_BYTES, 4096, &[3u8; 4096])
                    .unwrap();
            }),
        ),
        (
            "write straddling the end",
            log_with(dir.path(), "straddle", |w| {
                w.append(
                    RecordKind::Write,
                    0,
                    1,
                    DISK_BYTES - 512,
                    4096,
                    &[3u8; 4096],
                )
                .unwrap();
            }),
        ),
        (
            "write whose end overflows",
            log_with(dir.path(), "wrap", |w| {
                w.append(RecordKind::Write, 0, 1, u64::MAX - 511, 4096, &[3u8; 4096])
                    .unwrap();
            }),
        ),
        (
            "trim of 2^64-1 bytes",
            log_with(dir.path(), "trim", |w| {
                w.append(RecordKind::Trim, 0, 1, 4096, u64::MAX, &[])
                    .unwrap();
            }),
        ),
        (
            "zeroes past the disk",
            log_with(dir.path(), "zero", |w| {
                w.append(RecordKind::WriteZeroes, 0, 1, DISK_BYTES, 8192, &[])
                    .unwrap();
            }),
        ),
        (
            "torn piece outside its write (content)",
            log_with(dir.path(), "torn-out", torn((8192, 4096), vec![(0, 512)])),
        ),
        (
            "torn piece overflowing (content)",
            log_with(
                dir.path(),
                "torn-wrap",
                torn((8192, 4096), vec![(u64::MAX - 255, 512)]),
            ),
        ),
        (
            "fate of a record that is not a write (content)",
            log_with(dir.path(), "fate-flush", |w| {
                let cut = PowerCutPayload {
                    seed: 1,
                    mode: CutMode::Torn,
                    fates: vec![WriteFate {
                        seq: 1,
                        fate: Fate::Torn,
                        pieces: vec![(0, 512)],
                    }],
                };
                w.append(RecordKind::PowerCut, 0, 0, 0, 0, &encode_payload(&cut))
                    .unwrap();
            }),
        ),
        (
            "flush payload that does not decode (content)",
            log_with(dir.path(), "flush-junk", |w| {
                w.append(RecordKind::Flush, 0, 1, 0, 0, &[0xff; 7]).unwrap();
            }),
        ),
    ];
    let out = dir.path().join("out.img");
    let dm = dir.path().join("out.dmlog");
    let fails = dir.path().join("failures");
    for (what, log) in &cases {
        let log = log.to_str().unwrap();
        let base = base.to_str().unwrap();
        let commands: Vec<Vec<&str>> = vec![
            vec!["log", "show", log],
            vec!["log", "stats", log],
            vec![
                "log",
                "export",
                log,
                "--format",
                "dm-log-writes",
                "-o",
                dm.to_str().unwrap(),
            ],
            vec!["replay", log, "--base", base, "-o", out.to_str().unwrap()],
            vec!["states", log],
            vec![
                "check",
                log,
                "--base",
                base,
                "--checker",
                "test -f {image}",
                "--out",
                fails.to_str().unwrap(),
            ],
        ];
        for args in commands {
            if what.ends_with("(content)") && args[0] == "log" && args[1] != "export" {
                continue;
            }
            let o = cm(&args);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                !err.contains("panicked"),
                "{what}: `crashmonkey {}` panicked:\n{err}",
                args.join(" ")
            );
            assert!(
                !o.status.success(),
                "{what}: `crashmonkey {}` accepted the log:\n{}",
                args.join(" "),
                String::from_utf8_lossy(&o.stdout)
            );
            assert!(
                err.contains("seq") || err.contains("record") || err.contains("payload"),
                "{what}: `crashmonkey {}` does not say which record is wrong:\n{err}",
                args.join(" ")
            );
        }
    }
}
