//! A kernel campaign: the base image formatted once, then each workload run on a fresh
//! copy of it ([`super::device`]), its crash states built ([`super::crash`]) and checked
//! ([`super::verify`]) against the snapshots `crashmonkey kernel-mark` saved at its marks
//! ([`super::snapshot`]); findings kept in the campaign folder ([`Folder`]).
//!
//! Workloads run one at a time, or `--jobs J` at once ([`super::jobs`]): each has its own
//! work folder, nbd-server, nbdfuse mount, loop device and mount point, so they share
//! nothing but the base image (read only) and the kernel.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::crash::{reorder_states, states_of, torn_states, write_image, LogStates, Which};
use super::device::Recording;
use super::proc::{must, quote, run};
use super::snapshot::{claims_at_marks, points_before_marks, Claim, Snapshot};
use super::verify::{check_state, StateReport};
use super::{FsKind, KernelError, MKFS_TIMEOUT_SECONDS, WORKLOAD_TIMEOUT_SECONDS};
use crate::checker::StopFlag;
use crate::workload::{script, KOp, KWorkload};

/// Bytes of a workload script's output kept with an error.
const SCRIPT_OUTPUT_BYTES_MAX: usize = 4096;

/// What a campaign runs on.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelParams {
    pub fs: FsKind,
    pub lying_disk: bool,
    /// `ace` or the workload files' folder or file.
    pub workload: String,
    pub seq: u8,
    pub seed: u64,
    pub limit: Option<usize>,
    /// Also the reorder states of each mark ([`super::crash::reorder_states`]).
    #[serde(default)]
    pub reorder: bool,
    /// Also the torn states of each mark ([`super::crash::torn_states`]).
    #[serde(default)]
    pub torn: bool,
}

/// One crash state that broke a promise, did not mount or failed fsck.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct StateFinding {
    pub workload: String,
    pub mark: String,
    pub which: Which,
    /// What a reorder or torn state changed; empty for the others.
    #[serde(default)]
    pub detail: String,
    pub signature: String,
    pub claims: Vec<Claim>,
    pub report: StateReport,
}

/// What one workload did.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct WorkloadResult {
    pub name: String,
    pub marks: usize,
    pub states: usize,
    pub findings: Vec<StateFinding>,
    /// Seconds: attach, mount, script, unmount, detach.
    pub run_seconds: f64,
    /// Seconds building state images.
    pub build_seconds: f64,
    /// Seconds mounting, comparing and unmounting states.
    pub mount_seconds: f64,
    pub fsck_seconds: f64,
    /// Why the workload was skipped (its script failed), if it was.
    #[serde(default)]
    pub skipped: Option<String>,
}

/// A workload's files while it is checked (removed with it).
pub struct WorkloadRun {
    pub result: WorkloadResult,
    pub dir: tempfile::TempDir,
    /// The image of each finding, by its index in `result.findings`.
    pub images: Vec<PathBuf>,
    pub snapshots: Vec<Snapshot>,
}

impl WorkloadRun {
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("disk.log")
    }
}

/// The campaign's set-up: its work folder and the formatted base image.
pub struct Campaign {
    pub params: KernelParams,
    work: tempfile::TempDir,
    pub base: PathBuf,
    /// The command the scripts call at each mark.
    exe: PathBuf,
}

impl Campaign {
    /// Checks the tools, makes the work folder and formats the base image (or takes
    /// `base`, the campaign folder's, when it has one).
    pub fn prepare(
        params: KernelParams,
        base: Option<&Path>,
        stop: &StopFlag,
    ) -> Result<Campaign, KernelError> {
        for tool in params.fs.tools() {
            if which(tool).is_none() {
                return Err(KernelError::Setup(format!(
                    "{tool} is not installed (scripts/install-deps.sh lists the packages)"
                )));
            }
        }
        let work = tempfile::Builder::new()
            .prefix("crashmonkey-kernel")
            .tempdir()
            .map_err(KernelError::io("creating the work folder"))?;
        let text = work.path().to_string_lossy().into_owned();
        if text.chars().any(|c| c.is_whitespace() || c == ',') {
            return Err(KernelError::Setup(format!(
                "the work folder {text} has a space or a comma; set TMPDIR to a plainer folder"
            )));
        }
        // This very binary, even if it is rebuilt (replaced) while the campaign runs.
        let exe = PathBuf::from(format!("/proc/{}/exe", std::process::id()));
        let local = work.path().join("base.img");
        match base {
            Some(b) if b.exists() => super::crash::sparse_copy(b, &local)?,
            _ => format(params.fs, &local, stop)?,
        }
        Ok(Campaign {
            params,
            work,
            base: local,
            exe,
        })
    }

    /// Runs `w` on a fresh copy of the base and checks its crash states.
    pub fn run_workload(&self, w: &KWorkload, stop: &StopFlag) -> Result<WorkloadRun, KernelError> {
        let dir = tempfile::Builder::new()
            .prefix("w")
            .tempdir_in(self.work.path())
            .map_err(KernelError::io("creating a workload folder"))?;
        let d = dir.path();
        let t = Instant::now();
        let image = d.join("disk.img");
        super::crash::sparse_copy(&self.base, &image)?;
        std::fs::create_dir(d.join("snap")).map_err(KernelError::io("creating snap/"))?;
        self.write_scripts(w, d)?;
        let rec = Recording::start(
            self.params.fs,
            "",
            &image,
            &d.join("disk.log"),
            self.params.lying_disk,
            d,
            stop,
        )?;
        let cmd = format!(
            "CRASHMONKEY_MARK={} bash {} {}",
            quote(&d.join("mark.sh").to_string_lossy()),
            quote(&d.join("workload.sh").to_string_lossy()),
            quote(&rec.mount_point().to_string_lossy())
        );
        let script_run = run(&cmd, WORKLOAD_TIMEOUT_SECONDS, stop);
        rec.finish()?;
        let script_run = script_run?;
        if !script_run.end.passed() {
            let mut output = script_run.output.trim().to_owned();
            output.truncate(output.floor_char_boundary(SCRIPT_OUTPUT_BYTES_MAX));
            let end = script_run.end.to_string();
            return Err(KernelError::Script { end, output });
        }
        let _ = std::fs::remove_file(&image);
        let mut result = WorkloadResult {
            name: w.name.clone(),
            run_seconds: t.elapsed().as_secs_f64(),
            ..Default::default()
        };
        let (snapshots, images) = self.check_states(w, d, &mut result, stop)?;
        Ok(WorkloadRun {
            result,
            dir,
            images,
            snapshots,
        })
    }

    /// The workload's script and the mark helper the script calls (a file, so that no path
    /// needs quoting inside `$CRASHMONKEY_MARK`).
    fn write_scripts(&self, w: &KWorkload, d: &Path) -> Result<(), KernelError> {
        let helper = format!(
            "#!/bin/sh\nexec {} kernel-mark --socket {} --mnt {} --snapshots {} \"$1\"\n",
            quote(&self.exe.to_string_lossy()),
            quote(&d.join("ctl.sock").to_string_lossy()),
            quote(&d.join("mnt").to_string_lossy()),
            quote(&d.join("snap").to_string_lossy()),
        );
        let files = [
            ("mark.sh", helper),
            ("workload.sh", script::render(w)),
            ("workload.txt", w.to_string()),
        ];
        for (name, text) in files {
            let p = d.join(name);
            std::fs::write(&p, text)
                .map_err(KernelError::io(format!("writing {}", p.display())))?;
        }
        use std::os::unix::fs::PermissionsExt;
        let p = d.join("mark.sh");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
            .map_err(KernelError::io("making mark.sh executable"))
    }

    /// Builds and checks every state of the workload's log.
    fn check_states(
        &self,
        w: &KWorkload,
        d: &Path,
        result: &mut WorkloadResult,
        stop: &StopFlag,
    ) -> Result<(Vec<Snapshot>, Vec<PathBuf>), KernelError> {
        let mut states = states_of(&d.join("disk.log"))?;
        if self.params.reorder {
            let more = reorder_states(&states, self.params.seed);
            states.states.extend(more);
        }
        if self.params.torn {
            let more = torn_states(&states, self.params.seed);
            states.states.extend(more);
        }
        let (snapshots, claims) = expectations(w, &states, &d.join("snap"))?;
        result.marks = states.marks.len();
        let mnt = d.join("state-mnt");
        std::fs::create_dir(&mnt).map_err(KernelError::io("creating state-mnt/"))?;
        let mut images = Vec::new();
        for (i, state) in states.states.iter().enumerate() {
            let img = d.join(format!("state-{i}.img"));
            let t = Instant::now();
            write_image(&self.base, &states, state, &img)?;
            result.build_seconds += t.elapsed().as_secs_f64();
            let claims = &claims[state.mark_index];
            let report = check_state(self.params.fs, &img, &mnt, claims, stop)?;
            result.states += 1;
            result.mount_seconds += report.mount_seconds;
            result.fsck_seconds += report.fsck_seconds;
            if !report.failed() {
                let _ = std::fs::remove_file(&img);
                continue;
            }
            // The mount replayed the journal into `img`: the bundle keeps the state as the
            // power cut left it, so it is built again.
            write_image(&self.base, &states, state, &img)?;
            result.findings.push(StateFinding {
                workload: w.name.clone(),
                mark: state.mark.clone(),
                which: state.which,
                detail: state.detail.clone(),
                signature: state_signature(&self.params, w, state.which, &report),
                claims: claims.clone(),
                report,
            });
            images.push(img);
        }
        Ok((snapshots, images))
    }
}

/// The snapshots the marks saved, and the claims in force at each mark. The log's marks
/// must be the workload's, in order.
fn expectations(
    w: &KWorkload,
    states: &LogStates,
    snap_dir: &Path,
) -> Result<(Vec<Snapshot>, Vec<Vec<Claim>>), KernelError> {
    let points = points_before_marks(&w.ops);
    let names: Vec<&String> = points.iter().map(|(m, _)| m).collect();
    if names
        .iter()
        .map(|s| s.as_str())
        .ne(states.marks.iter().map(|s| s.as_str()))
    {
        return Err(KernelError::Setup(format!(
            "the write log's marks {:?} are not the workload's {names:?}",
            states.marks
        )));
    }
    let mut snaps = Vec::new();
    for (mark, _) in &points {
        let p = snap_dir.join(format!("{mark}.json"));
        let text = std::fs::read_to_string(&p)
            .map_err(KernelError::io(format!("reading {}", p.display())))?;
        let s: Snapshot = serde_json::from_str(&text)
            .map_err(|e| KernelError::Setup(format!("{}: {e}", p.display())))?;
        snaps.push(s);
    }
    let ops: Vec<Vec<KOp>> = points.into_iter().map(|(_, p)| p).collect();
    let claims = claims_at_marks(&ops, &snaps);
    Ok((snaps, claims))
}

/// [`signature`], and `in torn states` for a torn state's: a torn write is a crash the
/// other states do not have, and its findings say so.
fn state_signature(p: &KernelParams, w: &KWorkload, which: Which, r: &StateReport) -> String {
    let sig = signature(p, w, r);
    if which == Which::Torn {
        format!("{sig} in torn states")
    } else {
        sig
    }
}

/// What makes two failing states the same finding: the filesystem, the disk, how the state
/// failed (without paths, sizes or hashes) and the workload's core operations.
pub fn signature(p: &KernelParams, w: &KWorkload, r: &StateReport) -> String {
    let mut what: Vec<String> = if r.mounted {
        r.violations
            .iter()
            .map(|v| format!("{} after {}", v.kind, v.by_op))
            .collect()
    } else {
        vec!["does not mount".into()]
    };
    if !r.fsck_passed {
        what.push("fsck fails".into());
    }
    what.sort();
    what.dedup();
    let disk = if p.lying_disk {
        "lying disk"
    } else {
        "honest disk"
    };
    format!(
        "{} {disk}: {} [{}]",
        p.fs.name(),
        what.join(", "),
        core_ops(w)
    )
}

/// The names of the workload's operations after its setup mark, persistence points and
/// marks left out (`write`, `rename+unlink`).
pub fn core_ops(w: &KWorkload) -> String {
    let after_setup = w
        .ops
        .iter()
        .position(|o| matches!(o, KOp::Mark(m) if m == "setup"))
        .map_or(0, |i| i + 1);
    let names: Vec<String> = w.ops[after_setup..]
        .iter()
        .filter(|o| !o.is_persistence_point() && !matches!(o, KOp::Mark(_)))
        .map(|o| {
            o.to_string()
                .split(' ')
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    if names.is_empty() {
        "setup only".into()
    } else {
        names.join("+")
    }
}

/// Formats `image` (a new sparse file of the filesystem's disk size).
fn format(fs: FsKind, image: &Path, stop: &StopFlag) -> Result<(), KernelError> {
    let f = std::fs::File::create(image).map_err(KernelError::io("creating the base image"))?;
    f.set_len(fs.disk_bytes())
        .map_err(KernelError::io("sizing the base image"))?;
    must(&fs.mkfs_command(image), MKFS_TIMEOUT_SECONDS, stop)?;
    Ok(())
}

/// The path of `tool` on `PATH`.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/sbin".into(), "/usr/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}
