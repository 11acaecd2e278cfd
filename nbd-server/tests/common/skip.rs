//! The test suite's skip policy, shared by the integration tests (`tests/common`) and the
//! crate's unit tests (included by path from `src/lib.rs`), so both skip the same way.

use std::io::Write;

/// Whether this is CI's run: `CI` set to anything but the empty string (CI=true, CI=1, ...).
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

/// The running test cannot run here, for `reason`. Under CI that fails it. Elsewhere it
/// fails too, unless `ALLOW_SKIP=1`: then the caller returns early (`false`), and the skip
/// is said on stderr and added to the file `SKIP_LOG` names (`make test` sets it and lists
/// every skipped test with its reason at the end, so a skip never reads as a pass).
pub fn skip(reason: &str) -> bool {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    if in_ci() {
        panic!("{test}: {reason}; under CI nothing may skip (.ci/run installs every tool)");
    }
    if std::env::var("ALLOW_SKIP").as_deref() != Ok("1") {
        panic!(
            "{test}: {reason}. Install what is missing (make deps, as root), or set \
             ALLOW_SKIP=1 to skip such tests (make test does, and lists them)"
        );
    }
    eprintln!("SKIP {test}: {reason}");
    if let Some(log) = std::env::var_os("SKIP_LOG") {
        let line = format!("{test}: {reason}\n");
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
    }
    false
}
