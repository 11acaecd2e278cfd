//! `check --checker '... {uri}'`: every crash state served over NBD by the in-process server
//! holds the same bytes as its `{image}`, read through real clients (qemu-img, and nbdcopy
//! and nbdinfo where installed); a checker writing to `{uri-cow}` cannot change the next
//! state, and `{uri}` refuses writes; a failing checker is reported (and its state saved to
//! `--out`) as with `{image}`; the server's socket and folder go on every exit, Ctrl-C
//! included.

mod common;

#[path = "../../nbd-server/tests/common/skip.rs"]
mod skip;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Time limit of one `crashmonkey check` run here.
const RUN_SECONDS_MAX: u64 = 120;

fn run_limit() -> Duration {
    Duration::from_secs(RUN_SECONDS_MAX)
}

/// Whether `tool` runs here; otherwise the skip policy decides (never under CI).
fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    found || skip::skip(&format!("{tool} is not installed (make deps installs it)"))
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Many states of every kind (prefix, subsets, torn writes), seeded.
const STATE_ARGS: [&str; 6] = ["--seed", "7", "--samples", "8", "--max-subset", "2"];

/// `crashmonkey check LOG --base BASE --checker CHECKER` with [`STATE_ARGS`] and `extra`.
fn check(log: &Path, base: &Path, checker: &str, extra: &[&str]) -> std::process::Output {
    let mut c = crashmonkey();
    c.arg("check")
        .arg(log)
        .arg("--base")
        .arg(base)
        .args(["--checker", checker])
        .args(STATE_ARGS)
        .args(extra);
    output_within(&mut c, run_limit())
}

fn summary(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON summary ({e}); stderr:\n{}", stderr(out)))
}

/// The files `{prefix}-{state}.img` in `dir`, by state id.
fn images(dir: &Path, prefix: &str) -> std::collections::BTreeMap<u64, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            let id = name
                .strip_prefix(&format!("{prefix}-"))?
                .strip_suffix(".img")?;
            Some((id.parse().unwrap(), std::fs::read(dir.join(&name)).unwrap()))
        })
        .collect()
}

/// A base image that is not all zeroes, so a state that lost its base would show.
fn patterned_base(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("patterned.img");
    let bytes: Vec<u8> = (0..DISK_BYTES).map(|i| (i / 512 % 251) as u8).collect();
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Every state's `{uri}` (read by qemu-img) equals its `{image}`, with `env` set for
/// crashmonkey; returns its stderr.
fn uri_states_equal_images(env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (log, base) = (log(dir.path()), patterned_base(dir.path()));
    let got = dir.path().join("got");
    std::fs::create_dir(&got).unwrap();
    let g = got.display();
    let checker = format!(
        "qemu-img convert -f raw -O raw {{uri}} '{g}/uri-{{state}}.img' && \
         cp {{image}} '{g}/image-{{state}}.img'"
    );
    let mut c = crashmonkey();
    c.arg("check").arg(&log).arg("--base").arg(&base);
    c.args(["--checker", &checker]).args(STATE_ARGS);
    c.args(["--jobs", "2", "--json"]).envs(env.iter().copied());
    let out = output_within(&mut c, run_limit());
    assert!(out.status.success(), "{}", stderr(&out));
    let s = summary(&out);
    let (uri, image) = (images(&got, "uri"), images(&got, "image"));
    assert_eq!(uri.len() as u64, s["unique"].as_u64().unwrap(), "{s}");
    assert!(uri.len() > 20, "too few states to prove much: {s}");
    assert_eq!(
        uri.keys().collect::<Vec<_>>(),
        image.keys().collect::<Vec<_>>()
    );
    let mut distinct = std::collections::HashSet::new();
    for (id, bytes) in &uri {
        assert_eq!(bytes.len() as u64, DISK_BYTES, "state {id}");
        assert!(
            bytes == &image[id],
            "state {id}: {{uri}} and {{image}} differ"
        );
        distinct.insert(bytes.clone());
    }
    assert_eq!(
        distinct.len(),
        uri.len(),
        "unique states hold distinct bytes"
    );
    stderr(&out)
}

#[test]
fn every_uri_state_is_byte_identical_to_its_image() {
    if !have("qemu-img") {
        return;
    }
    uri_states_equal_images(&[]);
}

/// Past `PREFIX_RUNS_MAX` runs the server's prefix is written into a file and becomes one
/// run over it; a limit of 1 here makes every epoch's advance flatten it, so every state
/// stands on a flattened prefix, and each must still equal its `{image}`.
#[test]
fn states_on_a_flattened_prefix_are_byte_identical_to_their_images() {
    if !have("qemu-img") {
        return;
    }
    let err = uri_states_equal_images(&[
        ("CRASHMONKEY_PREFIX_RUNS_MAX", "1"),
        ("RUST_LOG", "crashmonkey=debug"),
    ]);
    let flattened = err.matches("flattened the prefix").count();
    assert!(flattened >= 2, "flattened {flattened} times:\n{err}");
}

#[test]
fn nbdcopy_and_nbdinfo_read_the_same_state() {
    if !have("nbdcopy") || !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (log, base) = (log(dir.path()), patterned_base(dir.path()));
    let got = dir.path().join("got");
    std::fs::create_dir(&got).unwrap();
    let g = got.display();
    let checker = format!(
        "nbdinfo --size {{uri}} > '{g}/size-{{state}}' && \
         nbdcopy {{uri}} '{g}/uri-{{state}}.img' && cp {{image}} '{g}/image-{{state}}.img'"
    );
    let out = check(&log, &base, &checker, &["--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (uri, image) = (images(&got, "uri"), images(&got, "image"));
    assert!(!uri.is_empty());
    assert_eq!(uri, image, "nbdcopy read other bytes than {{image}} holds");
    let size = std::fs::read_to_string(got.join("size-0")).unwrap();
    assert_eq!(size.trim(), DISK_BYTES.to_string());
}

#[test]
fn writes_to_uri_cow_never_reach_the_next_state_and_uri_refuses_them() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (log, base) = (log(dir.path()), patterned_base(dir.path()));
    let got = dir.path().join("got");
    std::fs::create_dir(&got).unwrap();
    let g = got.display();
    // Each checker reads its state, overwrites the whole disk through {uri-cow}, and reads
    // it back; with one job every state is served by the slot the previous checker wrote to.
    let checker = format!(
        "qemu-img convert -f raw -O raw {{uri-cow}} '{g}/before-{{state}}.img' && \
         qemu-io -f raw -c 'write -P 0xab 0 {DISK_BYTES}' {{uri-cow}} >/dev/null && \
         qemu-img convert -f raw -O raw {{uri-cow}} '{g}/after-{{state}}.img' && \
         cp {{image}} '{g}/image-{{state}}.img'"
    );
    let out = check(&log, &base, &checker, &["--jobs", "1", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (before, image) = (images(&got, "before"), images(&got, "image"));
    assert!(before.len() > 20);
    assert_eq!(before, image, "a state saw what an earlier checker wrote");
    for (id, after) in images(&got, "after") {
        assert!(
            after.iter().all(|&b| b == 0xab),
            "state {id}: the write did not land"
        );
    }
    // Through {uri} the same write is refused, and the state fails.
    let checker = "qemu-io -f raw -c 'write -P 0xab 0 4096' {uri}";
    let out = check(&log, &base, checker, &["--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let s = summary(&out);
    assert_eq!(s["passed"], 0, "{s}");
}

#[test]
fn a_failing_uri_checker_is_reported_with_its_state_saved() {
    if !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (log, base) = (log(dir.path()), patterned_base(dir.path()));
    let (out_uri, out_image) = (dir.path().join("out-uri"), dir.path().join("out-image"));
    // State 3 fails; a {uri}-only run saves it from the server, an {image} run copies it.
    let fail = "test {state} -ne 3";
    let uri_run = check(
        &log,
        &base,
        &format!("{fail} && qemu-img info -f raw {{uri}} >/dev/null"),
        &["--json", "--out", out_uri.to_str().unwrap()],
    );
    let image_run = check(
        &log,
        &base,
        &format!("{fail} && true {{image}}"),
        &["--json", "--out", out_image.to_str().unwrap()],
    );
    assert_eq!(uri_run.status.code(), Some(1), "{}", stderr(&uri_run));
    assert_eq!(image_run.status.code(), Some(1), "{}", stderr(&image_run));
    let (su, si) = (summary(&uri_run), summary(&image_run));
    assert_eq!(su["failed"], 1, "{su}");
    assert_eq!(su["passed"], si["passed"], "{su} {si}");
    assert_eq!(su["failures"][0]["id"], 3, "{su}");
    assert_eq!(su["failures"][0]["reason"], "exit code 1", "{su}");
    let saved = std::fs::read(out_uri.join("state-3.img")).unwrap();
    assert!(saved == std::fs::read(out_image.join("state-3.img")).unwrap());
    assert!(out_uri.join("state-3.txt").exists());
}

/// The socket a `{uri}` names.
fn socket_of(uri: &str) -> std::path::PathBuf {
    let (_, path) = uri.trim().split_once("?socket=").expect("an nbd+unix URI");
    assert!(!path.contains('%'), "a test path needs no escapes: {path}");
    path.into()
}

#[test]
fn the_server_and_its_socket_go_at_the_end_and_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let (log, base) = (log(dir.path()), base(dir.path(), DISK_BYTES));
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let uris = dir.path().join("uris");
    let u = uris.display();
    // A whole run: the socket existed while the checkers ran, and is gone after.
    let checker = format!("u={{uri}}; test -S \"${{u#*socket=}}\" && echo \"$u\" >> '{u}'");
    let mut cmd = crashmonkey();
    cmd.arg("check").arg(&log).arg("--base").arg(&base);
    cmd.args(["--checker", &checker]).env("TMPDIR", &tmp);
    let out = output_within(&mut cmd, run_limit());
    assert!(out.status.success(), "{}", stderr(&out));
    let first = std::fs::read_to_string(&uris).unwrap();
    assert!(!socket_of(first.lines().next().unwrap()).exists());
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "left in TMPDIR"
    );
    // Ctrl-C while checkers run: exit 130, nothing left.
    std::fs::remove_file(&uris).unwrap();
    let pids = dir.path().join("pids");
    let _reap = KillOnDrop(pids.clone());
    let p = pids.display();
    let checker = format!(
        "echo {{uri}} >> '{u}'; echo $$ >> '{p}'; sleep 300 & echo $! >> '{p}'; wait; true"
    );
    let child = crashmonkey()
        .arg("check")
        .arg(&log)
        .arg("--base")
        .arg(&base)
        .args(["--checker", &checker, "--jobs", "2"])
        .env("TMPDIR", &tmp)
        .process_group(0)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while pids_in(&pids).len() < 4 {
        assert!(
            started.elapsed() < run_limit(),
            "the checkers never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let line = std::fs::read_to_string(&uris).unwrap();
    let socket = socket_of(line.lines().next().unwrap());
    assert!(socket.exists(), "the server listens while checkers run");
    let sent = Command::new("kill")
        .args(["-INT", "--", &format!("-{}", child.id())])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = wait_within(child, run_limit());
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(!socket.exists(), "the socket outlived the run");
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "left in TMPDIR"
    );
    assert!(all_gone_within(&pids, Duration::from_secs(5)));
}

#[test]
fn a_socket_path_too_long_is_refused_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (log, base) = (log(dir.path()), base(dir.path(), DISK_BYTES));
    let tmp = dir.path().join("t".repeat(100));
    std::fs::create_dir(&tmp).unwrap();
    let mut cmd = crashmonkey();
    cmd.arg("check").arg(&log).arg("--base").arg(&base);
    cmd.args(["--checker", "true {uri}"]).env("TMPDIR", &tmp);
    let out = output_within(&mut cmd, run_limit());
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("longer than the 107 a Unix socket takes"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "left in TMPDIR"
    );
}

#[test]
fn a_checker_without_a_placeholder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (log, base) = (log(dir.path()), base(dir.path(), DISK_BYTES));
    let out = check(&log, &base, "true", &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("{uri}") && err.contains("{image}"), "{err}");
}
