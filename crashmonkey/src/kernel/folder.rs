//! The folder of a kernel campaign (`crashmonkey kernel --out DIR`):
//!
//! - `campaign.json`: the campaign's parameters; a folder is resumed only by the same ones;
//! - `base.img`: the formatted base image every workload started from (sparse);
//! - `done/NAME.json`: one record per workload checked (its states, findings, timings),
//!   written last, so that the same command run again after Ctrl-C goes on with the
//!   workloads that have none;
//! - `findings/SIGNATURE/`: one bundle per finding (failing states grouped by
//!   [`super::campaign::signature`]), from its first failing state: the workload and its
//!   script, the write log, the failing state's image (sparse), the expected snapshot and
//!   claims, the kernel's and fsck's output, and a README with the command that shows it
//!   again; `more.txt` lists the finding's other failing states;
//! - `findings.jsonl`: the index, a line per failing state (signature, workload, mark,
//!   state, bundle).
//!
//! A folder that exists, is not empty and has no `campaign.json` of a kernel campaign is
//! refused: it is somebody's files.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::campaign::{KernelParams, StateFinding, WorkloadResult, WorkloadRun};
use super::KernelError;

/// The campaign file's content.
#[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
struct CampaignJson {
    kind: String,
    params: KernelParams,
}

/// An open campaign folder.
pub struct Folder {
    pub dir: PathBuf,
}

impl Folder {
    /// Opens `dir` for a campaign of `params`: makes it, or resumes it when it holds the
    /// same campaign; refuses anything else.
    pub fn open(dir: &Path, params: &KernelParams) -> Result<Folder, KernelError> {
        let file = dir.join("campaign.json");
        let want = CampaignJson {
            kind: "kernel".into(),
            params: params.clone(),
        };
        if file.exists() {
            let text = std::fs::read_to_string(&file).map_err(KernelError::at(&file))?;
            let have: Option<CampaignJson> = serde_json::from_str(&text).ok();
            match have {
                Some(h) if h == want => {}
                Some(h) => {
                    return Err(KernelError::Setup(format!(
                        "{} is a kernel campaign of other parameters ({:?}); use another --out",
                        dir.display(),
                        h.params
                    )))
                }
                None => {
                    return Err(KernelError::Setup(format!(
                        "{} is not a kernel campaign folder; use another --out",
                        dir.display()
                    )))
                }
            }
        } else {
            let nonempty = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
            if nonempty {
                return Err(KernelError::Setup(format!(
                    "{} is not empty and not a campaign folder; refusing to write into it",
                    dir.display()
                )));
            }
            std::fs::create_dir_all(dir).map_err(KernelError::at(dir))?;
            let text = serde_json::to_string_pretty(&want).expect("plain data");
            std::fs::write(&file, text + "\n").map_err(KernelError::at(&file))?;
        }
        for sub in ["done", "findings"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(KernelError::at(dir))?;
        }
        Ok(Folder {
            dir: dir.to_path_buf(),
        })
    }

    pub fn base(&self) -> PathBuf {
        self.dir.join("base.img")
    }

    /// The record of workload `name`, if it was checked.
    pub fn done(&self, name: &str) -> Result<Option<WorkloadResult>, KernelError> {
        let p = self.dir.join("done").join(format!("{name}.json"));
        match std::fs::read_to_string(&p) {
            Ok(t) => serde_json::from_str(&t)
                .map(Some)
                .map_err(|e| KernelError::Setup(format!("{}: {e}", p.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(KernelError::at(&p)(e)),
        }
    }

    /// Keeps what `run` found (bundles, index), then its record.
    pub fn keep(&self, run: &WorkloadRun, command: &str) -> Result<(), KernelError> {
        self.keep_findings(run, command)?;
        self.record(&run.result)
    }

    fn keep_findings(&self, run: &WorkloadRun, command: &str) -> Result<(), KernelError> {
        for (i, f) in run.result.findings.iter().enumerate() {
            let bundle = self.bundle(run, i, f, command)?;
            let line = serde_json::json!({
                "signature": f.signature,
                "workload": f.workload,
                "mark": f.mark,
                "state": f.which,
                "bundle": bundle,
            });
            append(&self.dir.join("findings.jsonl"), &format!("{line}\n"))?;
        }
        Ok(())
    }

    /// The done record of a workload (written whole, then renamed into place).
    pub fn record(&self, result: &WorkloadResult) -> Result<(), KernelError> {
        let p = self.dir.join("done").join(format!("{}.json", result.name));
        let tmp = p.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(result).expect("plain data");
        std::fs::write(&tmp, text).map_err(KernelError::at(&tmp))?;
        std::fs::rename(&tmp, &p).map_err(KernelError::at(&p))
    }

    /// The bundle of finding `f`'s signature: made from `f` when it is the first, else
    /// `f` is listed in its `more.txt`. Returns its name.
    fn bundle(
        &self,
        run: &WorkloadRun,
        i: usize,
        f: &StateFinding,
        command: &str,
    ) -> Result<String, KernelError> {
        let name = slug(&f.signature);
        let dir = self.dir.join("findings").join(&name);
        let who = format!(
            "{} mark {} ({} state)\n",
            f.workload,
            f.mark,
            f.which.name()
        );
        if dir.exists() {
            append(&dir.join("more.txt"), &who)?;
            return Ok(name);
        }
        let tmp = self.dir.join("findings").join(format!(".{name}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(KernelError::at(&tmp))?;
        let d = run.dir.path();
        for file in ["workload.txt", "workload.sh", "disk.log"] {
            std::fs::copy(d.join(file), tmp.join(file)).map_err(KernelError::at(&tmp))?;
        }
        super::crash::gzip_copy(&run.images[i], &tmp.join(super::crash::STATE_IMAGE_GZ))?;
        let snapshot = run.snapshots.iter().find(|s| s.mark == f.mark);
        let expected = serde_json::json!({ "claims": f.claims, "snapshot": snapshot });
        let files = [
            (
                "expected.json",
                serde_json::to_string_pretty(&expected).expect("plain data"),
            ),
            ("report.txt", report_text(f)),
            ("README.md", readme(f, command)),
        ];
        for (file, text) in files {
            std::fs::write(tmp.join(file), text).map_err(KernelError::at(&tmp))?;
        }
        std::fs::rename(&tmp, &dir).map_err(KernelError::at(&dir))?;
        Ok(name)
    }
}

/// Appends `text` to the file at `path` (made if missing).
pub fn append(path: &Path, text: &str) -> Result<(), KernelError> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(KernelError::at(path))?;
    f.write_all(text.as_bytes()).map_err(KernelError::at(path))
}

/// A signature as a folder name: lower-case letters, digits and single dashes.
pub fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    out.trim_end_matches('-').chars().take(120).collect()
}

/// What the state did, in words: the broken claims, the kernel's and fsck's output.
pub fn report_text(f: &StateFinding) -> String {
    let r = &f.report;
    let mut s = format!(
        "{}\nworkload {}, the {} state at mark {} {}\n\n",
        f.signature,
        f.workload,
        f.which.name(),
        f.mark,
        f.detail
    );
    if r.mounted {
        s.push_str("Mounted (recovery ran).\n");
        for v in &r.violations {
            s.push_str(&format!("  {}\n", v.text));
        }
    } else {
        s.push_str(&format!(
            "Does not mount:\n{}\n\nKernel log (last lines):\n{}\n",
            r.mount_output.trim(),
            r.dmesg
        ));
    }
    s.push_str(&format!(
        "\nfsck ({}):\n{}\n",
        if r.fsck_passed { "passed" } else { "FAILED" },
        r.fsck_output.trim()
    ));
    s
}

fn readme(f: &StateFinding, command: &str) -> String {
    format!(
        "# {sig}\n\n\
         Workload `{w}` (`workload.txt`; `workload.sh` runs it on any Linux:\n\
         `bash workload.sh MOUNTPOINT`), the {which} state at mark `{mark}`.\n\
         See `report.txt` for what broke, `expected.json` for what the persistence points\n\
         promised (the claims) and the tree at the mark (the snapshot).\n\n\
         Show it again (runs the workload, rebuilds and checks its crash states; root):\n\n\
         ```\n{command}\n```\n\n\
         Look at the failing state itself (`state.img.gz`, the image as the power cut left \
         it, compressed; mounting it runs the filesystem's recovery):\n\n\
         ```\ngzip -dc state.img.gz | cp --sparse=always /dev/stdin /tmp/state.img\n\
         mkdir -p /tmp/s && mount -o loop /tmp/state.img /tmp/s && ls -la /tmp/s; umount /tmp/s\n```\n\n\
         `disk.log` is the write log (`crashmonkey log stats disk.log`, `crashmonkey log show \
         disk.log`); its base image is the campaign folder's `base.img`.\n",
        sig = f.signature,
        w = f.workload,
        which = f.which.name(),
        mark = f.mark,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_plain_folder_names() {
        assert_eq!(
            slug("ext4 lying disk: missing after sync [write]"),
            "ext4-lying-disk-missing-after-sync-write"
        );
    }

    #[test]
    fn a_folder_of_other_files_is_refused_and_left_alone() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("thesis.tex"), "precious").unwrap();
        let p = KernelParams {
            fs: super::super::FsKind::Ext4,
            lying_disk: false,
            workload: "ace".into(),
            seq: 1,
            seed: 1,
            limit: Some(2),
            reorder: false,
            torn: false,
        };
        let e = Folder::open(d.path(), &p).err().expect("refused");
        assert!(e.to_string().contains("not empty"), "{e}");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        let fresh = d.path().join("camp");
        Folder::open(&fresh, &p).unwrap();
        Folder::open(&fresh, &p).unwrap();
        let other = KernelParams { seed: 2, ..p };
        let e = Folder::open(&fresh, &other).err().expect("refused");
        assert!(e.to_string().contains("other parameters"), "{e}");
    }
}
