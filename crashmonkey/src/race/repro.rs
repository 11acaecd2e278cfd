//! Reproducer bundles: a folder with the workload, the materialised schedule (the exact
//! choices, not only a seed, so a change of random-number library cannot break it), the
//! switches, the device's write log, the trace, the report and a README with the replay
//! command. `crashmonkey race --replay DIR` runs it again, step for step.

use super::campaign::{describe_failure, RunOutcome};
use anyhow::Context;
use fs_core::sched::RecordedStep;
use fs_core::{Choice, Config, Workload};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Bundle format version, in `bundle.json`.
pub const BUNDLE_VERSION: u32 = 1;

/// What `bundle.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Bundle {
    pub version: u32,
    pub seed: u64,
    pub config: Config,
    pub workload: Workload,
    pub schedule: Vec<Choice>,
    /// The recorded trace (task, label, argument per step): a replay under other switches
    /// follows it.
    #[serde(default)]
    pub trace: Vec<RecordedStep>,
    /// The failures the run found, as one-line text (for people and for replay comparison).
    pub failures: Vec<fs_core::Failure>,
}

/// The temporary folder a bundle is written in, beside where it goes, starts so (a writer
/// killed before its rename leaves one: [`sweep_partial_bundles`] removes them).
pub const PARTIAL_BUNDLE_PREFIX: &str = ".partial-race-seed-";

/// Write `o` as a bundle under `out`; returns the folder. The bundle is written whole in a
/// temporary folder and renamed into place, so `race-seed-N/` is either absent or complete;
/// an earlier bundle of the same seed there (this run's, written again) is replaced.
pub fn write_bundle(out: &Path, o: &RunOutcome) -> anyhow::Result<PathBuf> {
    let dir = out.join(format!("race-seed-{}", o.seed));
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!("{PARTIAL_BUNDLE_PREFIX}{}-", o.seed))
        .tempdir_in(out)
        .with_context(|| format!("creating a folder in {}", out.display()))?;
    write_bundle_files(tmp.path(), &dir, o, &describe_failure(o))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("replacing {}", dir.display()))?;
    }
    std::fs::rename(tmp.path(), &dir).with_context(|| format!("creating {}", dir.display()))?;
    // The rename moved the folder: nothing is left for the guard to remove.
    let _ = tmp.keep();
    Ok(dir)
}

/// Removes the temporary folders of bundle writers that were killed (SIGKILL leaves no
/// chance to).
pub fn sweep_partial_bundles(out: &Path) -> std::io::Result<()> {
    let Ok(entries) = std::fs::read_dir(out) else {
        return Ok(());
    };
    for e in entries {
        let e = e?;
        if e.file_name()
            .to_string_lossy()
            .starts_with(PARTIAL_BUNDLE_PREFIX)
        {
            std::fs::remove_dir_all(e.path())?;
        }
    }
    Ok(())
}

/// Writes the files of `o`'s bundle into folder `dir`, which exists; its README names the
/// folder `shown` (where `dir` will be once renamed) and holds `report`.
pub fn write_bundle_files(
    dir: &Path,
    shown: &Path,
    o: &RunOutcome,
    report: &str,
) -> anyhow::Result<()> {
    let bundle = Bundle {
        version: BUNDLE_VERSION,
        seed: o.seed,
        config: o.cfg.clone(),
        workload: o.generated.workload.clone(),
        schedule: o.result.schedule.clone(),
        trace: o.result.trace.iter().map(RecordedStep::from).collect(),
        failures: o.result.failures.clone(),
    };
    let w = |name: &str, data: String| -> anyhow::Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, data).with_context(|| format!("writing {}", p.display()))
    };
    w("bundle.json", serde_json::to_string_pretty(&bundle)?)?;
    w(
        "workload.json",
        serde_json::to_string_pretty(&bundle.workload)?,
    )?;
    w("schedule.json", serde_json::to_string(&bundle.schedule)?)?;
    w(
        "device-log.json",
        serde_json::to_string_pretty(&o.result.device_log)?,
    )?;
    record_device_log(&dir.join("device.log"), &bundle, &o.result)?;
    w("report.txt", report.to_string())?;
    let readme = format!(
        "# fs-core race reproducer, seed {seed}\n\n\
         A workload and the exact interleaving of its steps that fs-core's scheduler chose, which\n\
         made the oracle fail. Replay it, step for step:\n\n\
         ```\ncrashmonkey race --replay {dir}\n```\n\n\
         Replay it with the fixed (default) switches, following the same schedule as far as the\n\
         steps allow, to see the fix keep the data:\n\n\
         ```\ncrashmonkey race --replay {dir} --defaults\n```\n\n\
         Files: `bundle.json` (switches, workload, materialised schedule, failures; what replay\n\
         reads), `workload.json`, `schedule.json` (task chosen at each yield, `s` = injected short\n\
         copy), `device-log.json` (every write/flush that reached the in-memory device, in\n\
         completion order, with a hash of each payload), `device.log` (the same IO recorded by\n\
         nbd-server's emulated disk, payloads included: `crashmonkey log show {dir}/device.log`,\n\
         and `crashmonkey states` / `check` read it like a real client's log), `report.txt`\n\
         (below).\n\n\
         ```\n{report}```\n",
        seed = o.seed,
        dir = shown.display(),
    );
    w("README.md", readme)
}

/// Replay `bundle` strictly on nbd-server's emulated disk with its recorder writing `path`,
/// so the bundle carries a write log in the project's own format (payloads included) that the
/// crash-state tools read. The replay must issue exactly the IO the original run did: the
/// model is deterministic and the device is only a different medium.
pub fn record_device_log(
    path: &Path,
    bundle: &Bundle,
    original: &fs_core::sched::RunResult,
) -> anyhow::Result<()> {
    let dev =
        nbd_server::fscore_device::RecordedDevice::new(bundle.config.device_blocks, Some(path))
            .with_context(|| format!("creating the recorded device for {}", path.display()))?;
    let disk = dev.disk().clone();
    let mut policy = fs_core::sched::ReplayPolicy::new(bundle.schedule.clone(), true);
    let replayed =
        fs_core::sched::run_on_device(&bundle.config, &bundle.workload, Box::new(dev), &mut policy);
    disk.sync_log()
        .with_context(|| format!("syncing {}", path.display()))?;
    anyhow::ensure!(
        replayed.device_log == original.device_log,
        "replaying seed {} on the emulated disk issued different IO ({} records, not {}): \
         the model is not deterministic",
        bundle.seed,
        replayed.device_log.len(),
        original.device_log.len()
    );
    Ok(())
}

/// Read a bundle folder (or a `bundle.json` path).
pub fn load_bundle(path: &Path) -> anyhow::Result<Bundle> {
    let file = if path.is_dir() {
        path.join("bundle.json")
    } else {
        path.to_path_buf()
    };
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let b: Bundle =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    anyhow::ensure!(
        b.version == BUNDLE_VERSION,
        "{}: bundle version {} (expected {BUNDLE_VERSION})",
        file.display(),
        b.version
    );
    b.workload
        .check()
        .map_err(|what| anyhow::anyhow!("{}: {what}", file.display()))?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bundle is written whole or not at all: writing one again (a campaign resumed after
    /// a kill between its bundle and its record) replaces it, and a killed writer's
    /// temporary folder is swept. Writing into the final folder directly failed the second
    /// time (the recorder will not replace an existing `device.log`).
    #[test]
    fn bundles_are_renamed_into_place_and_can_be_written_again() {
        let out = tempfile::tempdir().unwrap();
        let o = super::super::campaign::run_one(7, &Config::default());
        let dir = write_bundle(out.path(), &o).unwrap();
        let first = std::fs::read(dir.join("device.log")).unwrap();
        let again = write_bundle(out.path(), &o).unwrap();
        assert_eq!(again, dir);
        assert_eq!(std::fs::read(dir.join("device.log")).unwrap(), first);
        load_bundle(&dir).unwrap();
        let partial = out.path().join(format!("{PARTIAL_BUNDLE_PREFIX}7-abc"));
        std::fs::create_dir(&partial).unwrap();
        std::fs::write(partial.join("device.log"), b"torn").unwrap();
        sweep_partial_bundles(out.path()).unwrap();
        let left: Vec<_> = std::fs::read_dir(out.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("race-seed-7")]);
    }
}
