//! Reproducer bundles of fs-core crash campaigns: a folder holding the crash state's image
//! (sparse: it mounts, fsck judges it, `crashmonkey fs cat` shows the wrong bytes), the write
//! log it came from, the workload with its materialised schedule, which writes of the log
//! the state kept or tore, fsck's output, the oracle's report, and a README with the one
//! command that shows the finding. `crashmonkey fs campaign --replay DIR` runs it again.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use fs_core::crash::CrashViolation;
use fs_core::sched::{RecordedStep, ReplayPolicy};
use fs_core::{Choice, Config, Failure, Workload};
use serde::{Deserialize, Serialize};

use super::campaign::{run_with, FsRun};
use super::states::StateFailure;
use super::workload::{FsWorkload, WorkloadKind, CAMPAIGN_DEVICE_BLOCKS};
use crate::folder::signature::{fs_signature, CrashVerdict};
use crate::race::PolicyKind;
use crate::states::{CrashState, StateOptions};

/// Format version of `bundle.json`.
pub const FS_BUNDLE_VERSION: u32 = 1;
/// What `bundle.json` says it is.
pub const FS_BUNDLE_KIND: &str = "fs-crash";

/// The verdict on the bundled crash state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub mount_error: Option<String>,
    pub fsck: Vec<String>,
    pub violations: Vec<CrashViolation>,
}

impl Verdict {
    fn of(f: &StateFailure) -> Self {
        Verdict {
            mount_error: f.mount_error.clone(),
            fsck: f.fsck.clone(),
            violations: f.violations.clone(),
        }
    }
}

/// What `bundle.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FsBundle {
    pub version: u32,
    pub kind: String,
    pub seed: u64,
    pub workload_kind: WorkloadKind,
    pub workload: Workload,
    pub cache_limit_folios: Option<usize>,
    pub policy: PolicyKind,
    pub policy_seed: u64,
    pub config: Config,
    pub device_blocks: u64,
    /// The materialised schedule, and the trace a replay under other switches follows.
    pub schedule: Vec<Choice>,
    pub trace: Vec<RecordedStep>,
    pub state_options: StateOptions,
    /// The failing crash state (`None` when the run failed the race oracle only).
    pub state: Option<CrashState>,
    pub verdict: Option<Verdict>,
    pub race_failures: Vec<Failure>,
}

impl FsBundle {
    /// The failure signature of the bundled run (`folder::signature::fs_signature`), the
    /// same as its run's when it was found; `None` if the bundle shows no failure.
    pub fn signature(&self) -> Option<String> {
        let state = self.verdict.as_ref().map(|v| CrashVerdict {
            mount_error: v.mount_error.as_deref(),
            fsck: &v.fsck,
            violations: &v.violations,
        });
        fs_signature(&self.config, state, &self.race_failures, &self.workload)
    }

    fn workload(&self) -> FsWorkload {
        FsWorkload {
            workload: self.workload.clone(),
            cache_limit_folios: self.cache_limit_folios,
            policy: self.policy,
            policy_seed: self.policy_seed,
        }
    }
}

/// The name of the file that holds the wrong byte (or the first violation's file).
fn culprit(v: &Verdict) -> Option<String> {
    v.violations.first().map(|x| x.file.clone())
}

/// Writes `run` (a failing one) as a bundle under `out`; returns the folder.
pub fn write_bundle(
    out: &Path,
    kind: WorkloadKind,
    run: &FsRun,
    opts: StateOptions,
) -> anyhow::Result<PathBuf> {
    let dir = out.join(format!("fs-seed-{}", run.seed));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    write_bundle_files(&dir, &dir, kind, run, opts)?;
    Ok(dir)
}

/// Writes the files of `run`'s bundle into folder `dir`, which exists; its README names the
/// folder `shown` (where `dir` will be once renamed).
pub fn write_bundle_files(
    dir: &Path,
    shown: &Path,
    kind: WorkloadKind,
    run: &FsRun,
    opts: StateOptions,
) -> anyhow::Result<()> {
    let failure = run.states.failures.first();
    let bundle = FsBundle {
        version: FS_BUNDLE_VERSION,
        kind: FS_BUNDLE_KIND.into(),
        seed: run.seed,
        workload_kind: kind,
        workload: run.workload.workload.clone(),
        cache_limit_folios: run.workload.cache_limit_folios,
        policy: run.workload.policy,
        policy_seed: run.workload.policy_seed,
        config: run.cfg.clone(),
        device_blocks: CAMPAIGN_DEVICE_BLOCKS,
        schedule: run.result.schedule.clone(),
        trace: run.result.trace.iter().map(RecordedStep::from).collect(),
        state_options: opts,
        state: failure.map(|f| f.state.clone()),
        verdict: failure.map(Verdict::of),
        race_failures: run.result.failures.clone(),
    };
    let w = |name: &str, data: &[u8]| -> anyhow::Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, data).with_context(|| format!("writing {}", p.display()))
    };
    w(
        "bundle.json",
        serde_json::to_string_pretty(&bundle)?.as_bytes(),
    )?;
    std::fs::copy(run.log.path(), dir.join("device.log"))
        .with_context(|| format!("copying the write log into {}", dir.display()))?;
    write_sparse(&dir.join("base.img"), &run.base)?;
    if let Some(f) = failure {
        write_sparse(&dir.join("crash.img"), &f.image)?;
        w("fsck.txt", lines(&f.fsck).as_bytes())?;
        w("oracle.txt", report(f).as_bytes())?;
    }
    w("README.md", readme(shown, &bundle).as_bytes())?;
    Ok(())
}

fn lines(v: &[String]) -> String {
    if v.is_empty() {
        "fsck: clean\n".into()
    } else {
        v.iter().map(|l| format!("{l}\n")).collect()
    }
}

/// The oracle's report on the bundled state, in words.
pub fn report(f: &StateFailure) -> String {
    let s = &f.state;
    let mut out = format!(
        "crash state {} ({:?}, {}), epoch {}: after the last mark {}, with {} writes of the \
         epoch kept, {} dropped{}; recovery replayed {} transactions\n",
        s.id,
        s.kind,
        s.label,
        s.epoch,
        s.mark.as_deref().unwrap_or("(none)"),
        s.included.len(),
        s.dropped_seqs.len(),
        s.torn
            .as_ref()
            .map_or(String::new(), |t| format!(", write {} torn", t.seq)),
        f.replayed
    );
    if let Some(e) = &f.mount_error {
        out.push_str(&format!("does not mount: {e}\n"));
    }
    for p in &f.fsck {
        out.push_str(&format!("fsck: {p}\n"));
    }
    for v in &f.violations {
        let against = v.promised_by.map_or(
            "the filesystem as mounted before the run".to_string(),
            |op| format!("what op {op} made durable"),
        );
        out.push_str(&format!(
            "{}: {} (judged against {against})\n",
            v.file, v.what
        ));
    }
    out
}

fn readme(dir: &Path, b: &FsBundle) -> String {
    let Some(verdict) = &b.verdict else {
        return readme_race(dir, b);
    };
    let mut show = match culprit(verdict) {
        Some(file) => format!(
            "crashmonkey fs cat {0}/crash.img {file} | od -A d -c | less\n\
             crashmonkey fs stat {0}/crash.img {file}\n",
            dir.display()
        ),
        None => String::new(),
    };
    if b.config.bugs.replay_ignores_checksum {
        show.push_str(
            "# The bug is in recovery: mounted by these commands (whose recovery checks\n\
             # checksums) the image is clean; the replay below recovers it the buggy way.\n",
        );
    }
    format!(
        "# fs-core crash reproducer, seed {seed}\n\n\
         A crash state of an fs-core run (switches and planted bugs in `bundle.json`) that breaks\n\
         a promise of `docs/fs-core-crash.md`. See it:\n\n```\n{show}\
         crashmonkey fs fsck {dir}/crash.img\n```\n\n\
         Replay the run and check the same crash state again (exit 1: it still fails):\n\n\
         ```\ncrashmonkey fs campaign --replay {dir}\n```\n\n\
         With the planted bugs off and the default switches, the same schedule (as far as it\n\
         goes) keeps its promises:\n\n```\ncrashmonkey fs campaign --replay {dir} --defaults\n```\n\n\
         Files: `crash.img` (the state, sparse: mount it with the commands above), `base.img`\n\
         (the filesystem mkfs made, the log's base), `device.log` (the run's write log:\n\
         `crashmonkey log show`, `crashmonkey states`, `crashmonkey check --base base.img` read\n\
         it), `bundle.json` (workload, materialised schedule, switches, the crash state: which\n\
         writes of its epoch it kept, dropped or tore; the verdict), `fsck.txt`, `oracle.txt`.\n",
        seed = b.seed,
        dir = dir.display(),
    )
}

/// The README of a run that failed the race oracle while every crash state kept its promises.
fn readme_race(dir: &Path, b: &FsBundle) -> String {
    format!(
        "# fs-core run that failed the race oracle, seed {seed}\n\n\
         Every crash state of this run kept its promises, but the run itself broke an invariant\n\
         of fs-core's race oracle:\n\n```\n{failures:#?}\n```\n\n\
         Replay it (exit 1: it fails again), and with the default switches (exit 0):\n\n\
         ```\ncrashmonkey fs campaign --replay {dir}\n\
         crashmonkey fs campaign --replay {dir} --defaults\n```\n",
        seed = b.seed,
        failures = b.race_failures,
        dir = dir.display(),
    )
}

/// Writes `data` to `path`, leaving runs of zero blocks as holes.
fn write_sparse(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    const CHUNK: usize = 4096;
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    for (i, c) in data.chunks(CHUNK).enumerate() {
        if c.iter().any(|&b| b != 0) {
            f.seek(SeekFrom::Start((i * CHUNK) as u64))?;
            f.write_all(c)?;
        }
    }
    f.set_len(data.len() as u64)?;
    Ok(())
}

/// Reads a bundle folder (or its `bundle.json`).
pub fn load(path: &Path) -> anyhow::Result<FsBundle> {
    let file = if path.is_dir() {
        path.join("bundle.json")
    } else {
        path.to_path_buf()
    };
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let b: FsBundle =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    anyhow::ensure!(
        b.version == FS_BUNDLE_VERSION && b.kind == FS_BUNDLE_KIND,
        "{}: not an fs-core crash bundle of version {FS_BUNDLE_VERSION}",
        file.display()
    );
    b.workload
        .check()
        .map_err(|what| anyhow::anyhow!("{}: {what}", file.display()))?;
    anyhow::ensure!(
        b.device_blocks == CAMPAIGN_DEVICE_BLOCKS,
        "{}: a {}-block device (this build runs {CAMPAIGN_DEVICE_BLOCKS})",
        file.display(),
        b.device_blocks
    );
    Ok(b)
}

/// What a replay found.
#[derive(Debug)]
pub struct Replayed {
    pub run: FsRun,
    /// Whether the bundled crash state arose again, and its verdict now (`None`: it passes).
    pub state_found: bool,
    pub state_failure: Option<StateFailure>,
}

impl Replayed {
    /// The replay failed as the bundle did (or at all, under other switches).
    pub fn failed(&self) -> bool {
        self.state_failure.is_some() || !self.run.result.failures.is_empty()
    }
}

/// Replays bundle `b`: the run under its recorded schedule (strictly when `cfg` is the
/// bundle's own, else following its trace as far as the changed steps allow), then the
/// bundled crash state of the new log.
pub fn replay(b: &FsBundle, cfg: &Config, tmp: &Path) -> anyhow::Result<Replayed> {
    let policy: Box<dyn fs_core::sched::Policy> = if cfg == &b.config {
        Box::new(ReplayPolicy::new(b.schedule.clone(), true))
    } else {
        Box::new(ReplayPolicy::lenient(b.schedule.clone(), b.trace.clone()))
    };
    let jobs = super::states::cores();
    let run = run_with(
        b.seed,
        b.workload(),
        cfg,
        b.state_options,
        tmp,
        policy,
        jobs,
    )?;
    let exact = cfg == &b.config;
    let (state_found, state_failure) = match (&b.state, exact) {
        // The same run: the same log, so the bundled state is there to check again.
        (Some(want), true) => {
            let found = super::states::find_and_check(
                cfg,
                &run.result.history,
                run.log.path(),
                &run.base,
                b.state_options,
                want,
            )?;
            (found.is_some(), found.flatten())
        }
        // Other switches write another log: every state of it is checked.
        _ => (false, run.states.failures.first().cloned()),
    };
    Ok(Replayed {
        run,
        state_found,
        state_failure,
    })
}
