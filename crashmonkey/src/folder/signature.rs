//! Failure signatures: what makes two failing runs the same finding. A signature is the
//! kind of failure, the oracle's violation in words without the run's particulars (offsets,
//! files, bytes, operation numbers), the kind of operation whose data was lost, and the
//! switches the run had; many failing seeds share one.

use fs_core::oracle::Seen;
use fs_core::{Config, Failure, Workload};

/// Separates a signature's fields; no field holds it.
pub const FIELD_SEPARATOR: char = '|';

/// The signature of a race run that failed with `first` (its first failure) under `cfg`
/// running `workload`: `race|KIND|VIOLATION|LOST_BY|SWITCHES`.
pub fn race_signature(cfg: &Config, first: &Failure, workload: &Workload) -> String {
    [
        "race".to_string(),
        failure_kind(first),
        violation(first),
        lost_by(first, workload),
        switches(cfg),
    ]
    .join(&FIELD_SEPARATOR.to_string())
}

/// What an fs campaign's failing crash state showed: the parts of its verdict a signature
/// reads (`fscore::bundle::Verdict` and `fscore::states::StateFailure` both have them).
pub struct CrashVerdict<'a> {
    pub mount_error: Option<&'a str>,
    pub fsck: &'a [String],
    pub violations: &'a [fs_core::crash::CrashViolation],
}

/// The signature of an fs campaign's failing run under `cfg` running `workload`:
/// `fs|KIND|VIOLATION|LOST_BY|SWITCHES`. A failing crash state (`state`) makes it
/// `fs|crash_state|...`: the violation is whether it mounted, fsck's first problem and the
/// crash oracle's first violation (its text to the first `:` or `;`), each without
/// particulars; LOST_BY is the kind of persistence point whose promise the state broke
/// (`fsync`, `fdatasync`, `sync`...), `none` when it is judged against the filesystem as
/// mounted before the run, `-` when no file is wrong. A run whose crash states all passed but
/// which failed the race oracle is `fs|race_KIND|...` with the race signature's fields.
/// `None` when the run passed.
pub fn fs_signature(
    cfg: &Config,
    state: Option<CrashVerdict<'_>>,
    race_failures: &[Failure],
    workload: &Workload,
) -> Option<String> {
    let (kind, violation, lost) = match state {
        Some(v) => (
            "crash_state".to_string(),
            crash_violation(&v),
            promise_kind(&v, workload),
        ),
        None => {
            let first = race_failures.first()?;
            (
                format!("race_{}", failure_kind(first)),
                violation(first),
                lost_by(first, workload),
            )
        }
    };
    let fields = ["fs".to_string(), kind, violation, lost, switches(cfg)];
    Some(fields.join(&FIELD_SEPARATOR.to_string()))
}

/// A failing crash state's verdict without particulars, with no field separator in it.
fn crash_violation(v: &CrashVerdict<'_>) -> String {
    if let Some(e) = v.mount_error {
        return format!("mount={}", generic(e));
    }
    let fsck = v.fsck.first().map_or("clean".into(), |p| generic(p));
    let oracle = v.violations.first().map_or("none".into(), |x| {
        generic(x.what.split([':', ';']).next().unwrap_or(""))
    });
    format!("fsck={fsck},oracle={oracle}")
}

/// The kind of operation whose promise the first violation breaks.
fn promise_kind(v: &CrashVerdict<'_>, workload: &Workload) -> String {
    let Some(x) = v.violations.first() else {
        return "-".into();
    };
    let Some(op) = x.promised_by else {
        return "none".into();
    };
    op_kind(workload, op as usize)
}

/// The `op` name of operation `i` of `workload` (`write`, `fsync`, ...), `?` if there is none.
fn op_kind(workload: &Workload, i: usize) -> String {
    match workload.ops().nth(i) {
        Some(op) => serde_json::to_value(op)
            .ok()
            .and_then(|v| v["op"].as_str().map(str::to_string))
            .unwrap_or_else(|| "?".into()),
        None => "?".into(),
    }
}

/// The failure's kind as the bundle writes it (`wrong_data`, `wrong_size`, ...).
pub fn failure_kind(f: &Failure) -> String {
    match f {
        Failure::WrongData { .. } => "wrong_data",
        Failure::WrongSize { .. } => "wrong_size",
        Failure::Invariant { .. } => "invariant",
        Failure::Deadlock { .. } => "deadlock",
        Failure::StepLimit { .. } => "step_limit",
        Failure::Harness { .. } => "harness",
    }
    .to_string()
}

/// The violation without the run's particulars.
fn violation(f: &Failure) -> String {
    match f {
        Failure::WrongData {
            found_from, seen, ..
        } => format!(
            "seen={},found={}",
            match seen {
                Seen::Read { .. } => "read",
                Seen::AfterSync => "after_sync",
                Seen::Cached => "cached",
            },
            // Old data of another operation came back, or bytes nobody wrote (zero-fill).
            if found_from.is_some() {
                "old_data"
            } else {
                "unwritten"
            }
        ),
        Failure::WrongSize {
            expected, found, ..
        } => format!("size={}", if found < expected { "short" } else { "long" }),
        Failure::Invariant { what } | Failure::Harness { what } => generic(what),
        Failure::Deadlock { .. } => "blocked".into(),
        Failure::StepLimit { .. } => "no_progress".into(),
    }
}

/// `what` with every run of digits as `#` and the separator as `/`: the same broken rule at
/// another block or offset is the same violation.
pub fn generic(what: &str) -> String {
    let mut out = String::with_capacity(what.len());
    for c in what.chars() {
        match c {
            '0'..='9' if out.ends_with('#') => {}
            '0'..='9' => out.push('#'),
            FIELD_SEPARATOR => out.push('/'),
            c => out.push(c),
        }
    }
    out
}

/// The kind of operation whose data was lost (`write`, `mmap_store`, ...); `none` when the
/// lost bytes were the zeros of no operation, `-` for a failure that is not about data.
fn lost_by(f: &Failure, workload: &Workload) -> String {
    let Failure::WrongData { expected_from, .. } = f else {
        return "-".into();
    };
    let Some(i) = expected_from else {
        return "none".into();
    };
    op_kind(workload, *i as usize)
}

/// The switches, every one, in a fixed order; the page-cache limit and the device size are
/// left out: a race campaign draws the first per run and fixes the second.
pub fn switches(cfg: &Config) -> String {
    let on = |b: bool| if b { "on" } else { "off" };
    let bugs = cfg.bugs.names();
    format!(
        "iomap_valid={},check_at={:?},wb_seq_check={},wb_batch_folios={},punch={:?},alloc={:?},\
         mkwrite_inode_lock={},bugs={}",
        on(cfg.iomap_valid),
        cfg.validity_check_at,
        on(cfg.wb_seq_check),
        cfg.wb_batch_folios,
        cfg.punch,
        cfg.alloc,
        on(cfg.mkwrite_takes_inode_lock),
        if bugs.is_empty() {
            "none".to_string()
        } else {
            bugs.join("+")
        }
    ) + &optional_switches(cfg)
}

/// Large folios and direct writes, named only when on, so signatures of runs without them
/// stay as they were.
fn optional_switches(cfg: &Config) -> String {
    let mut s = match cfg.folio_blocks {
        1 => String::new(),
        n => format!(",folio_blocks={n}"),
    };
    if cfg.max_folio_blocks > cfg.folio_blocks {
        s += &format!(",max_folio_blocks={}", cfg.max_folio_blocks);
    }
    if cfg.direct_writes {
        s += ",direct_writes=on";
    }
    if !cfg.dio_invalidate.is_default() {
        s += &format!(",dio_invalidate={:?}", cfg.dio_invalidate);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn particulars_do_not_split_a_finding() {
        assert_eq!(
            generic("block 12 freed twice at 7"),
            "block # freed twice at #"
        );
        assert_eq!(generic("a|b"), "a/b");
        let w = Workload {
            files: 1,
            phases: vec![vec![fs_core::Op::Write {
                file: 0,
                offset: 0,
                len: 1,
                byte: b'A',
            }]],
        };
        let f = |offset, found_from| Failure::WrongData {
            file: 0,
            offset,
            expected: b'A',
            found: 0,
            expected_from: Some(0),
            found_from,
            seen: Seen::AfterSync,
        };
        let cfg = Config::default();
        let a = race_signature(&cfg, &f(10, None), &w);
        assert_eq!(a, race_signature(&cfg, &f(4000, None), &w));
        assert_ne!(a, race_signature(&cfg, &f(10, Some(0)), &w));
        assert!(a.starts_with("race|wrong_data|seen=after_sync,found=unwritten|write|"));
        assert_eq!(a.matches(FIELD_SEPARATOR).count(), 4);
    }
}
