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

/// The module paths a source names after `crate::` (in `use` lines and in paths).
fn crate_modules(text: &str) -> Vec<&str> {
    text.match_indices("crate::")
        .map(|(i, m)| {
            let rest = &text[i + m.len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect()
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
