//! `crashmonkey run`: any application's workload on the kernel's ext4, XFS or btrfs, and a
//! checker of the application's own on every crash state (what LazyFS users do over FUSE).
//!
//! The same machinery as the kernel campaigns: a sparse image formatted with the person's
//! mkfs options, served by the in-process recording nbd-server, attached with nbdfuse and a
//! loop device, mounted ([`super::device`]). The workload runs as `sh -c CMD` with the mount
//! point in `CRASHMONKEY_MNT` and the control socket in `CRASHMONKEY_CONTROL`; `crashmonkey
//! mark NAME` (this very binary is first on its `PATH`) puts a mark in the write log at that
//! moment. After the unmount, every crash state ([`super::crash`]: the durable and the prefix
//! state at each mark, and the final state, every write of the log) is built, mounted from a
//! copy at a temporary mount point so the kernel runs its recovery ([`super::verify`]), and
//! the checker runs with `{mnt}`, `{image}`, `{mark}` and `{state}` replaced; the state is
//! unmounted after it. A checker that does not exit 0 or a state that does not mount is a
//! failing state; failing states are grouped into findings by signature.
//!
//! Every child runs in its own process group under a named deadline and is killed with its
//! group at it or on Ctrl-C; the recording and the state mounts are guards whose drop
//! unmounts and detaches; the work folder is removed on every path out.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::crash::{sparse_copy, states_of, write_image, LogStates, State, Which};
use super::device::Recording;
use super::proc::{must, quote, run};
use super::verify::{mount_state, StateMount};
use super::{FsKind, KernelError, MKFS_TIMEOUT_SECONDS};
use crate::checker::{signal_name, CheckerEnd, StopFlag};

/// Deadline of the application's workload: an application may take its time.
pub const APP_WORKLOAD_TIMEOUT_SECONDS: u64 = 600;
/// Deadline of one checker run on one crash state.
pub const APP_CHECKER_TIMEOUT_SECONDS: u64 = 300;
/// Smallest disk `--size` accepts (below every mkfs's minimum anyway).
pub const APP_DISK_BYTES_MIN: u64 = 16 << 20;
/// Largest disk `--size` accepts: every state is a sparse copy of it.
pub const APP_DISK_BYTES_MAX: u64 = 64 << 30;
/// Bytes of the workload's output kept (with an error, and in the campaign folder).
pub const APP_WORKLOAD_OUTPUT_BYTES_MAX: usize = 64 * 1024;
/// Bytes of a failing state's output kept in the summary and the index line (the bundle
/// keeps the whole capped output).
pub const APP_OUTPUT_SUMMARY_BYTES_MAX: usize = 2048;

/// What a run runs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AppParams {
    pub fs: FsKind,
    pub size_bytes: u64,
    /// mkfs options (shell words); empty for the filesystem's defaults.
    pub mkfs_opts: String,
    /// Extra `mount -o` options for the recorded mount and every state's mount.
    pub mount_opts: String,
    /// The workload: `sh -c` runs it.
    pub workload: String,
    /// The checker: `{mnt}`, `{image}`, `{mark}`, `{state}` replaced, then `sh -c`.
    pub checker: String,
    pub lying_disk: bool,
}

/// One crash state whose checker failed, or that does not mount.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct AppStateFinding {
    /// The state's position among the run's states.
    pub index: usize,
    /// The last mark at or before the state; empty when none was set.
    pub mark: String,
    pub which: Which,
    pub signature: String,
    pub mounted: bool,
    /// How the checker ended (`exit code 1`); empty when the state did not mount.
    pub checker_end: String,
    /// The checker's output; or `mount`'s output and the kernel's last messages.
    pub output: String,
}

/// What a run did.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct AppResult {
    /// The marks the workload set, in order.
    pub marks: Vec<String>,
    pub states: usize,
    pub failing: Vec<AppStateFinding>,
    /// Seconds: attach, mount, workload, unmount, detach.
    pub workload_seconds: f64,
    /// Seconds building state images.
    pub build_seconds: f64,
    /// Seconds mounting (recovery) and unmounting states.
    pub mount_seconds: f64,
    pub checker_seconds: f64,
}

impl AppResult {
    /// The distinct signatures, in the order first seen.
    pub fn signatures(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for f in &self.failing {
            if !out.contains(&f.signature) {
                out.push(f.signature.clone());
            }
        }
        out
    }
}

/// A finished run: its result and, until dropped, its files (the write log, the image of
/// each failing state).
pub struct AppRun {
    pub params: AppParams,
    pub result: AppResult,
    /// The workload's output (capped).
    pub workload_output: String,
    dir: tempfile::TempDir,
}

impl AppRun {
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("disk.log")
    }

    /// The image of failing state `f` as the power cut left it (sparse).
    pub fn image(&self, f: &AppStateFinding) -> PathBuf {
        self.dir.path().join(format!("state-{}.img", f.index))
    }
}

/// The tools a run on `fs` needs.
fn tools(fs: FsKind) -> Vec<&'static str> {
    let mut t = vec![
        "nbdfuse",
        "fusermount3",
        "losetup",
        "mount",
        "umount",
        "dmesg",
    ];
    t.extend_from_slice(match fs {
        FsKind::Ext4 => &["mkfs.ext4"],
        FsKind::Xfs => &["mkfs.xfs"],
        FsKind::Btrfs => &["mkfs.btrfs", "btrfs"],
    });
    t
}

/// Runs `params`' workload on a recording disk and checks every crash state (module docs).
pub fn run_app(params: AppParams, stop: &StopFlag) -> Result<AppRun, KernelError> {
    let dir = prepare(&params, stop)?;
    let d = dir.path();
    let t = Instant::now();
    let workload_output = record(&params, d, stop)?;
    let mut result = AppResult {
        workload_seconds: t.elapsed().as_secs_f64(),
        ..Default::default()
    };
    let states = app_states(&d.join("disk.log"))?;
    result.marks = states.marks.clone();
    let mnt = d.join("state-mnt");
    std::fs::create_dir(&mnt).map_err(KernelError::io("creating state-mnt/"))?;
    for (i, state) in states.states.iter().enumerate() {
        let checked = check_one(&params, d, &states, (i, state), &mut result, stop)?;
        result.states += 1;
        result.failing.extend(checked);
    }
    Ok(AppRun {
        params,
        result,
        workload_output,
        dir,
    })
}

/// Checks the tools and the parameters, makes the work folder and formats `base.img` in it.
fn prepare(params: &AppParams, stop: &StopFlag) -> Result<tempfile::TempDir, KernelError> {
    for tool in tools(params.fs) {
        if super::campaign::which(tool).is_none() {
            return Err(KernelError::Setup(format!(
                "{tool} is not installed (scripts/install-deps.sh lists the packages)"
            )));
        }
    }
    if !(APP_DISK_BYTES_MIN..=APP_DISK_BYTES_MAX).contains(&params.size_bytes)
        || !params.size_bytes.is_multiple_of(4096)
    {
        return Err(KernelError::Setup(format!(
            "--size {} must be a multiple of 4096 between {APP_DISK_BYTES_MIN} and \
             {APP_DISK_BYTES_MAX} bytes",
            params.size_bytes
        )));
    }
    let dir = tempfile::Builder::new()
        .prefix("crashmonkey-run")
        .tempdir()
        .map_err(KernelError::io("creating the work folder"))?;
    let text = dir.path().to_string_lossy().into_owned();
    if text.chars().any(|c| c.is_whitespace() || c == ',') {
        return Err(KernelError::Setup(format!(
            "the work folder {text} has a space or a comma; set TMPDIR to a plainer folder"
        )));
    }
    let base = dir.path().join("base.img");
    let f = std::fs::File::create(&base).map_err(KernelError::io("creating the base image"))?;
    f.set_len(params.size_bytes)
        .map_err(KernelError::io("sizing the base image"))?;
    let mkfs = params.fs.mkfs_command_with(&base, &params.mkfs_opts);
    must(&mkfs, MKFS_TIMEOUT_SECONDS, stop)?;
    Ok(dir)
}

/// Records the workload on a copy of `d/base.img` into `d/disk.log`; its output.
fn record(params: &AppParams, d: &Path, stop: &StopFlag) -> Result<String, KernelError> {
    let image = d.join("disk.img");
    sparse_copy(&d.join("base.img"), &image)?;
    let bin = d.join("bin");
    std::fs::create_dir(&bin).map_err(KernelError::io("creating bin/"))?;
    // `crashmonkey mark` is this very binary, even if it is rebuilt while the run goes on.
    let exe = PathBuf::from(format!("/proc/{}/exe", std::process::id()));
    std::os::unix::fs::symlink(&exe, bin.join("crashmonkey"))
        .map_err(KernelError::io("linking bin/crashmonkey"))?;
    let rec = Recording::start(
        params.fs,
        &params.mount_opts,
        &image,
        &d.join("disk.log"),
        params.lying_disk,
        d,
        stop,
    )?;
    let cmd = format!(
        "export CRASHMONKEY_MNT={} CRASHMONKEY_CONTROL={} PATH={}:\"$PATH\"; exec sh -c {}",
        quote(&rec.mount_point().to_string_lossy()),
        quote(&rec.control_socket().to_string_lossy()),
        quote(&bin.to_string_lossy()),
        quote(&params.workload)
    );
    let ran = run(&cmd, APP_WORKLOAD_TIMEOUT_SECONDS, stop);
    rec.finish()?;
    let ran = ran?;
    let mut output = ran.output;
    output.truncate(output.floor_char_boundary(APP_WORKLOAD_OUTPUT_BYTES_MAX));
    if !ran.end.passed() {
        return Err(KernelError::Script {
            end: ran.end.to_string(),
            output: output.trim().to_owned(),
        });
    }
    let _ = std::fs::remove_file(&image);
    Ok(output)
}

/// The states of the log at `log`: the durable and the prefix state at each mark, then the
/// final state (every write), unless it is the last state already.
pub fn app_states(log: &Path) -> Result<LogStates, KernelError> {
    let mut states = states_of(log)?;
    let all: Vec<usize> = (0..states.ops.len()).collect();
    let mark_index = states.marks.len().saturating_sub(1);
    let same = states
        .states
        .last()
        .is_some_and(|s| s.ops == all && s.mark_index == mark_index);
    if !same {
        states.states.push(State {
            mark: states.marks.last().cloned().unwrap_or_default(),
            mark_index,
            which: Which::Final,
            ops: all,
            detail: String::new(),
            torn: None,
        });
    }
    Ok(states)
}

/// `template` with `{mnt}`, `{image}`, `{mark}` and `{state}` replaced, each by one quoted
/// shell word (write them bare, not inside quotes of your own).
pub fn fill_checker(template: &str, mnt: &Path, image: &Path, mark: &str, state: &str) -> String {
    template
        .replace("{mnt}", &quote(&mnt.to_string_lossy()))
        .replace("{image}", &quote(&image.to_string_lossy()))
        .replace("{mark}", &quote(mark))
        .replace("{state}", &quote(state))
}

/// How a failing state failed.
struct Failure {
    mounted: bool,
    /// For the signature: `checker exit 1`, `does not mount`.
    what: String,
    /// How the checker ended, in full; empty when the state did not mount.
    end: String,
    output: String,
}

/// Builds state `i`, mounts a copy of it, runs the checker, unmounts; the failing state, if
/// it fails. The image as the power cut left it (`{image}`) stays for the bundle when it does.
fn check_one(
    params: &AppParams,
    d: &Path,
    states: &LogStates,
    (i, state): (usize, &State),
    result: &mut AppResult,
    stop: &StopFlag,
) -> Result<Option<AppStateFinding>, KernelError> {
    let image = d.join(format!("state-{i}.img"));
    let live = d.join("state-live.img");
    let t = Instant::now();
    write_image(&d.join("base.img"), states, state, &image)?;
    sparse_copy(&image, &live)?;
    result.build_seconds += t.elapsed().as_secs_f64();
    let (t, checker_before) = (Instant::now(), result.checker_seconds);
    let failure = try_state(
        params,
        state,
        &image,
        &live,
        &d.join("state-mnt"),
        result,
        stop,
    );
    result.mount_seconds += t.elapsed().as_secs_f64() - (result.checker_seconds - checker_before);
    let _ = std::fs::remove_file(&live);
    let failure = failure?;
    if let Some(signal) = stop.signal() {
        return Err(KernelError::Stopped(signal));
    }
    let Some(f) = failure else {
        let _ = std::fs::remove_file(&image);
        return Ok(None);
    };
    // The checker may have changed `{image}`: the bundle keeps the state as the power cut
    // left it.
    write_image(&d.join("base.img"), states, state, &image)?;
    Ok(Some(AppStateFinding {
        index: i,
        mark: state.mark.clone(),
        which: state.which,
        signature: signature(params, &f.what, state.which),
        mounted: f.mounted,
        checker_end: f.end,
        output: f.output,
    }))
}

/// Mounts `live` at `mnt`, runs the checker on it (with `image` as `{image}`) and unmounts:
/// how it failed, if it did.
fn try_state(
    params: &AppParams,
    state: &State,
    image: &Path,
    live: &Path,
    mnt: &Path,
    result: &mut AppResult,
    stop: &StopFlag,
) -> Result<Option<Failure>, KernelError> {
    match mount_state(params.fs, &params.mount_opts, live, mnt, stop)? {
        StateMount::Mounted(m) => {
            let cmd = fill_checker(&params.checker, mnt, image, &state.mark, state.which.name());
            let t = Instant::now();
            // On a stop this is an error and `m`, dropped, unmounts.
            let ran = run(&cmd, APP_CHECKER_TIMEOUT_SECONDS, stop);
            result.checker_seconds += t.elapsed().as_secs_f64();
            m.unmount()?;
            let ran = ran?;
            Ok((!ran.end.passed()).then(|| Failure {
                mounted: true,
                what: end_words(ran.end),
                end: ran.end.to_string(),
                output: ran.output,
            }))
        }
        StateMount::Failed { output, dmesg } => Ok(Some(Failure {
            mounted: false,
            what: "does not mount".into(),
            end: String::new(),
            output: format!("{}\n\nKernel log (last lines):\n{dmesg}\n", output.trim()),
        })),
    }
}

/// How a checker failed, without particulars a signature should not split on.
fn end_words(end: CheckerEnd) -> String {
    match end {
        CheckerEnd::Exited(code) => format!("checker exit {code}"),
        CheckerEnd::Signalled(s) => format!("checker killed by {}", signal_name(s)),
        CheckerEnd::TimedOut(_) => "checker timed out".into(),
        CheckerEnd::Stopped(_) => "checker stopped".into(),
    }
}

/// What makes failing states one finding: the filesystem, the disk, how the state failed
/// and which kind of state it is (`ext4 honest disk: checker exit 1 in durable states`).
pub fn signature(p: &AppParams, what: &str, which: Which) -> String {
    let disk = if p.lying_disk {
        "lying disk"
    } else {
        "honest disk"
    };
    format!("{} {disk}: {what} in {} states", p.fs.name(), which.name())
}

/// The command that runs `p` again (from the folder it was first run in).
pub fn again_command(p: &AppParams) -> String {
    let mut s = format!(
        "sudo crashmonkey run --fs {} --size {}",
        p.fs.name(),
        p.size_bytes
    );
    if !p.mkfs_opts.is_empty() {
        s.push_str(&format!(" --mkfs-opts={}", quote(&p.mkfs_opts)));
    }
    if !p.mount_opts.is_empty() {
        s.push_str(&format!(" --mount-opts={}", quote(&p.mount_opts)));
    }
    s.push_str(&format!(
        " --workload {} --checker {}",
        quote(&p.workload),
        quote(&p.checker)
    ));
    if p.lying_disk {
        s.push_str(" --lying-disk");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_one_quoted_word_each() {
        let stop = StopFlag::new();
        let mnt = Path::new("/tmp/a b'c");
        let cmd = fill_checker(
            "printf '%s|' {mnt} {image} {mark} {state}",
            mnt,
            Path::new("/x/$HOME.img"),
            "after \"commit\" 3",
            "durable",
        );
        let out = must(&cmd, 10, &stop).unwrap();
        assert_eq!(out, "/tmp/a b'c|/x/$HOME.img|after \"commit\" 3|durable|");
    }
}
