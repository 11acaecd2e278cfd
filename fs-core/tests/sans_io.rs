//! fs-core must stay sans-IO: no threads, no clocks, no async runtime, no global state, so
//! that a schedule alone decides a run. This test reads the crate's sources and manifest.

use std::path::Path;

const FORBIDDEN_IN_SOURCE: &[&str] = &[
    "std::thread",
    "std::time",
    "Instant",
    "SystemTime",
    "tokio",
    "async fn",
    ".await",
    "static mut",
    "thread_local",
    "std::sync",
    "std::net",
    "std::fs",
];
const FORBIDDEN_DEPS: &[&str] = &[
    "tokio",
    "async-std",
    "futures",
    "smol",
    "rayon",
    "crossbeam",
    "nbd-server",
];

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_threads_clocks_or_async_in_fs_core_sources() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    sources(&root.join("src"), &mut files);
    assert!(files.len() >= 10, "found only {files:?}");
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read");
        for bad in FORBIDDEN_IN_SOURCE {
            assert!(
                !text.contains(bad),
                "{} uses `{bad}`: fs-core must stay sans-IO",
                f.display()
            );
        }
    }
}

#[test]
fn no_runtime_dependencies_in_manifest() {
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .expect("read");
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .expect("has deps")
        .split("\n[")
        .next()
        .unwrap_or("");
    for line in deps.lines() {
        let name = line.split(['.', '=', ' ']).next().unwrap_or("").trim();
        assert!(!FORBIDDEN_DEPS.contains(&name), "fs-core depends on {name}");
    }
    assert!(
        deps.contains("rand_chacha"),
        "the manifest parse found the dependency list"
    );
}
