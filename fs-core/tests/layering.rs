//! The tasks and the scheduler talk only through the step protocol (`src/step.rs`): the
//! scheduler owns the tasks, and no task module imports the scheduler. This guards against
//! the import cycle sched <-> tasks coming back (it did exist: `Step` and `Cx` lived in
//! `sched.rs`, which imported every task module). The test reads the crate's sources.

use std::path::Path;

/// Modules whose tasks the scheduler runs.
const TASK_MODULES: &[&str] = &["buffered_io.rs", "writeback.rs", "ops.rs", "ns.rs"];

fn source(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The leading identifier of `text` (empty if it starts with anything else).
fn ident(text: &str) -> &str {
    let text = text.trim_start();
    let end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// The first identifier of each top-level item in a `use` group: for `{a::b, c, d::{e}}`
/// (given without its opening brace) that is `a`, `c`, `d`.
fn group_heads(group: &str) -> Vec<&str> {
    let mut heads = Vec::new();
    let mut depth = 0usize;
    let mut item_start = 0;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            ',' | '}' if depth == 0 => {
                heads.push(ident(&group[item_start..i]));
                if c == '}' {
                    break;
                }
                item_start = i + 1;
            }
            '}' => depth -= 1,
            _ => {}
        }
    }
    heads.retain(|h| !h.is_empty());
    heads
}

/// The top-level modules a source names after `crate::` or `super::` (the task modules sit
/// at the crate's root, so `super::` is `crate::` there), in paths and in `use` lines,
/// grouped (`use crate::{sched, step}`) or not.
fn crate_modules(text: &str) -> Vec<&str> {
    let mut modules = Vec::new();
    for prefix in ["crate::", "super::"] {
        for (i, m) in text.match_indices(prefix) {
            let rest = &text[i + m.len()..];
            match rest.strip_prefix('{') {
                Some(group) => modules.extend(group_heads(group)),
                None => modules.push(ident(rest)),
            }
        }
    }
    modules
}

#[test]
fn task_modules_do_not_import_the_scheduler() {
    for m in TASK_MODULES {
        let text = source(m);
        assert!(
            !crate_modules(&text).contains(&"sched"),
            "{m} names crate::sched: tasks talk to the scheduler through crate::step only"
        );
        assert!(
            crate_modules(&text).contains(&"step"),
            "{m} does not use crate::step (is the list of task modules out of date?)"
        );
    }
}

#[test]
fn the_step_protocol_imports_neither_the_scheduler_nor_a_task() {
    let text = source("step.rs");
    for m in crate_modules(&text) {
        let file = format!("{m}.rs");
        assert!(
            m != "sched" && !TASK_MODULES.contains(&file.as_str()),
            "step.rs names crate::{m}"
        );
    }
}

/// The scanner itself: each way a task module could name the scheduler is seen (a grouped
/// `use crate::{sched::X, TaskId}` once slipped past a scanner that read only `crate::name`).
#[test]
fn the_scanner_sees_every_way_of_naming_a_module() {
    let cases: &[(&str, &[&str])] = &[
        ("use crate::sched::TASK_FLUSHER;", &["sched"]),
        ("use crate::sched;", &["sched"]),
        ("let t = crate::sched::TASK_FLUSHER;", &["sched"]),
        (
            "use crate::{sched::TASK_FLUSHER, TaskId};",
            &["sched", "TaskId"],
        ),
        (
            "use crate::{\n    fs::{Fs, FsError},\n    sched,\n};",
            &["fs", "sched"],
        ),
        ("use super::sched::Policy;", &["sched"]),
        ("use super::{step::Cx, sched};", &["step", "sched"]),
        ("use crate::step::{Cx, Step};", &["step"]),
    ];
    for (text, want) in cases {
        assert_eq!(crate_modules(text), *want, "{text}");
    }
}
