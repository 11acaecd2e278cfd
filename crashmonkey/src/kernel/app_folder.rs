//! The folder of an application run (`crashmonkey run --out DIR`):
//!
//! - `campaign.json`: `{"kind": "app", "params": ...}`, the run's parameters;
//! - `summary.json`: the run's summary (what `--json` prints);
//! - `workload-output.txt`: what the workload printed (capped);
//! - `findings/SIGNATURE/`: one bundle per finding (failing states grouped by
//!   [`super::app::signature`]), from its first failing state: `workload.txt` and
//!   `checker.txt` (the commands), `disk.log` (the write log), `state.img.gz` (the failing
//!   state as the power cut left it, gzip-compressed), `output.txt` (the checker's output, or
//!   mount's and the kernel's words), `check.sh` (mounts a copy of the state and runs the checker
//!   on it, as the run did) and a `README.md` with the one command that shows it again;
//!   `more.txt` lists the finding's other failing states;
//! - `findings.jsonl`: the index, one line per failing state (signature, mark, state,
//!   bundle, how the checker ended).
//!
//! The same command on a folder of its run resumes it ([`AppFolder::open`]): a run done
//! (`summary.json`, written last, whole) is not run again; an interrupted one runs again
//! after what it wrote is removed. Any other folder that is not empty is refused and left as
//! it is.

use std::path::{Path, PathBuf};

use super::app::{again_command, fill_checker, AppParams, AppRun, AppStateFinding};
use super::crash::{gzip_copy, STATE_IMAGE_GZ};
use super::folder::append;
use super::proc::quote;
use super::KernelError;

/// An application run's folder.
pub struct AppFolder {
    pub dir: PathBuf,
}

/// The files a run writes into its folder, besides `campaign.json`: what an interrupted run
/// of the same command may have left, removed before it runs again.
const RUN_FILES: [&str; 4] = [
    "findings",
    "findings.jsonl",
    "workload-output.txt",
    "summary.json.tmp",
];

/// What [`AppFolder::open`] found in the folder.
pub enum Opened {
    /// A new run goes into it (it was empty, or held this run interrupted).
    Run(AppFolder),
    /// It holds this run, done: its `summary.json`.
    Done(serde_json::Value),
}

impl AppFolder {
    /// Opens `dir` for the run of `params`. An empty or missing folder is made the run's; a
    /// folder of the same run **resumes**: done (it has `summary.json`), its summary is
    /// returned and nothing runs again; interrupted, what the run had written is removed and
    /// it runs again. A folder of another run, another kind, or other files is refused.
    pub fn open(dir: &Path, params: &AppParams) -> Result<Opened, KernelError> {
        let want = serde_json::json!({ "kind": "app", "params": params });
        let file = dir.join("campaign.json");
        let nonempty = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
        if !nonempty {
            std::fs::create_dir_all(dir.join("findings")).map_err(KernelError::at(dir))?;
            let text = serde_json::to_string_pretty(&want).expect("plain data");
            std::fs::write(&file, text + "\n").map_err(KernelError::at(&file))?;
            return Ok(Opened::Run(AppFolder {
                dir: dir.to_path_buf(),
            }));
        }
        let have: Option<serde_json::Value> = std::fs::read_to_string(&file)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        if have.as_ref() != Some(&want) {
            let what = match have {
                Some(h) if h["kind"] == "app" => {
                    format!("holds another run ({}); give another --out", h["params"])
                }
                _ => "is not empty and not this run's folder; refusing to write into it".into(),
            };
            return Err(KernelError::Setup(format!("{} {what}", dir.display())));
        }
        Self::resume(dir)
    }

    /// The same run's folder: done, or cleared of what the interrupted run wrote.
    fn resume(dir: &Path) -> Result<Opened, KernelError> {
        let summary = dir.join("summary.json");
        if let Ok(text) = std::fs::read_to_string(&summary) {
            let v = serde_json::from_str(&text)
                .map_err(|e| KernelError::Setup(format!("{}: {e}", summary.display())))?;
            return Ok(Opened::Done(v));
        }
        for entry in std::fs::read_dir(dir).map_err(KernelError::at(dir))? {
            let name = entry.map_err(KernelError::at(dir))?.file_name();
            let name = name.to_string_lossy();
            if name != "campaign.json" && !RUN_FILES.contains(&name.as_ref()) {
                return Err(KernelError::Setup(format!(
                    "{} holds {name}, which a run does not write; refusing to resume into it",
                    dir.display()
                )));
            }
        }
        for name in RUN_FILES {
            let p = dir.join(name);
            let gone = match p.is_dir() {
                true => std::fs::remove_dir_all(&p),
                false => std::fs::remove_file(&p),
            };
            match gone {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(KernelError::at(&p)(e))
                }
                _ => {}
            }
        }
        tracing::info!(folder = %dir.display(), "running an interrupted run again");
        std::fs::create_dir_all(dir.join("findings")).map_err(KernelError::at(dir))?;
        Ok(Opened::Run(AppFolder {
            dir: dir.to_path_buf(),
        }))
    }

    /// Keeps `run`: the workload's output, a bundle per finding, the index, `summary`.
    pub fn keep(&self, run: &AppRun, summary: &serde_json::Value) -> Result<(), KernelError> {
        let out = self.dir.join("workload-output.txt");
        std::fs::write(&out, &run.workload_output).map_err(KernelError::at(&out))?;
        for f in &run.result.failing {
            let bundle = self.bundle(run, f)?;
            let line = serde_json::json!({
                "signature": f.signature,
                "mark": f.mark,
                "state": f.which,
                "index": f.index,
                "mounted": f.mounted,
                "checker_end": f.checker_end,
                "bundle": bundle,
            });
            append(&self.dir.join("findings.jsonl"), &format!("{line}\n"))?;
        }
        // Written whole, then renamed: its presence says the run is done (see `open`).
        let file = self.dir.join("summary.json");
        let tmp = self.dir.join("summary.json.tmp");
        let text = serde_json::to_string_pretty(summary).expect("plain data");
        std::fs::write(&tmp, text + "\n").map_err(KernelError::at(&tmp))?;
        std::fs::rename(&tmp, &file).map_err(KernelError::at(&file))
    }

    /// The bundle of `f`'s signature: made from `f` when it is the first, else `f` is
    /// listed in its `more.txt`. Returns its name.
    fn bundle(&self, run: &AppRun, f: &AppStateFinding) -> Result<String, KernelError> {
        let name = super::folder::slug(&f.signature);
        let dir = self.dir.join("findings").join(&name);
        if dir.exists() {
            let who = format!(
                "state {} at mark {:?} ({})\n",
                f.index,
                f.mark,
                f.which.name()
            );
            append(&dir.join("more.txt"), &who)?;
            return Ok(name);
        }
        let tmp = self.dir.join("findings").join(format!(".{name}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(KernelError::at(&tmp))?;
        std::fs::copy(run.log(), tmp.join("disk.log")).map_err(KernelError::at(&tmp))?;
        gzip_copy(&run.image(f), &tmp.join(STATE_IMAGE_GZ))?;
        let p = &run.params;
        let files = [
            ("workload.txt", format!("{}\n", p.workload)),
            ("checker.txt", format!("{}\n", p.checker)),
            ("output.txt", f.output.clone()),
            ("check.sh", check_script(p, f, &name)),
            ("README.md", readme(p, f)),
        ];
        for (file, text) in files {
            std::fs::write(tmp.join(file), text).map_err(KernelError::at(&tmp))?;
        }
        std::fs::rename(&tmp, &dir).map_err(KernelError::at(&dir))?;
        Ok(name)
    }
}

/// A script that mounts a copy of the bundle's `state.img.gz`, uncompressed, and runs the checker on it with
/// the placeholders filled in as the run filled them (a fixed folder under /tmp, so that the
/// command is written out here whole), from the folder the run was started in.
fn check_script(p: &AppParams, f: &AppStateFinding, name: &str) -> String {
    let work = PathBuf::from(format!("/tmp/crashmonkey-state-{name}"));
    let (mnt, image) = (work.join("mnt"), work.join("state.img"));
    let checker = fill_checker(&p.checker, &mnt, &image, &f.mark, f.which.name());
    let opts = match p.fs.mount_options_with(&p.mount_opts).as_str() {
        "" => "loop".to_owned(),
        o => format!("loop,{o}"),
    };
    let cwd = std::env::current_dir().unwrap_or_default();
    let btrfs = if p.fs == super::FsKind::Btrfs {
        "btrfs device scan --forget\n"
    } else {
        ""
    };
    format!(
        "#!/bin/sh\n\
         # Mounts a copy of state.img.gz, uncompressed (the kernel runs its recovery), runs the checker on it as\n\
         # `crashmonkey run` did, unmounts. Root. Exit status: the checker's.\n\
         set -u\n\
         here=$(cd \"$(dirname \"$0\")\" && pwd)\n\
         work={work}\n\
         umount \"$work/mnt\" 2>/dev/null; rm -rf \"$work\"; mkdir -p \"$work/mnt\"\n\
         trap 'umount \"$work/mnt\" 2>/dev/null; rm -rf \"$work\"' EXIT\n\
         gzip -dc \"$here/state.img.gz\" | cp --sparse=always /dev/stdin \"$work/live.img\"\n\
         cp --sparse=always \"$work/live.img\" \"$work/state.img\"\n\
         {btrfs}mount -t {fs} -o {opts} \"$work/live.img\" \"$work/mnt\" || \
         {{ echo 'the state does not mount'; exit 1; }}\n\
         cd {cwd} || exit 2\n\
         sh -c {cmd}\n\
         rc=$?\n\
         echo \"checker exit code $rc\"\n\
         exit $rc\n",
        work = quote(&work.to_string_lossy()),
        fs = p.fs.name(),
        cwd = quote(&cwd.to_string_lossy()),
        cmd = quote(&checker),
    )
}

fn readme(p: &AppParams, f: &AppStateFinding) -> String {
    let failed = if f.mounted {
        format!("the checker failed ({})", f.checker_end)
    } else {
        "the state does not mount".into()
    };
    format!(
        "# {sig}\n\n\
         The {which} state at mark `{mark}` (state {index} of the run): {failed}; \
         `output.txt` has its words.\n\n\
         Show it again (mounts a copy of `state.img.gz`, the state as the power cut left it, and \
         runs the checker on it; root):\n\n\
         ```\nsudo sh check.sh\n```\n\n\
         Run the whole workload again and check every state (from the folder it was first \
         run in; an application's run need not write the same blocks twice):\n\n\
         ```\n{again}\n```\n\n\
         `workload.txt` and `checker.txt` are the two commands; `disk.log` is the write log \
         (`crashmonkey log stats disk.log`, `crashmonkey log show disk.log`).\n",
        sig = f.signature,
        which = f.which.name(),
        mark = f.mark,
        index = f.index,
        again = again_command(p),
    )
}
