//! Running a checker over every crash state of a write log.
//!
//! States come epoch by epoch from [`StateGenerator`]; each unique one is materialised on a
//! worker's copy-on-write image ([`WorkerImage`]) and handed to the checker command, `jobs`
//! at a time. A failing state keeps its image and the checker's output in the output folder.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::history::{Epochs, History};
use crate::overlay::{sparse_copy, ImageError, PrefixImage, WorkerImage};
use crate::states::{CrashState, StateGenerator, StateOptions};

/// Most checker processes run at once.
pub const JOBS_MAX: usize = 64;
/// Checker output kept per failing state, in bytes (the rest is cut).
pub const CHECKER_OUTPUT_BYTES_MAX: usize = 1024 * 1024;
/// Default time limit of one checker run; past it the checker is killed and the state fails.
pub const CHECKER_SECONDS_DEFAULT: u64 = 600;

#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Shell command; `{image}`, `{mark}` and `{state}` are replaced.
    pub checker: String,
    pub jobs: usize,
    /// Where failing images and outputs go.
    pub out: Option<PathBuf>,
    pub states: StateOptions,
    pub progress: bool,
    /// Time limit of one checker run, in seconds (coreutils `timeout` enforces it).
    pub timeout_seconds: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FailedState {
    pub id: usize,
    pub epoch: usize,
    pub label: String,
    pub mark: Option<String>,
    pub exit_code: Option<i32>,
    pub image: Option<PathBuf>,
    pub output: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckSummary {
    /// States generated, duplicates included.
    pub states: usize,
    /// States with distinct content: the ones checked.
    pub unique: usize,
    pub passed: usize,
    pub failed: usize,
    pub seconds: f64,
    pub epochs: usize,
    pub seed: u64,
    pub failures: Vec<FailedState>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Log(#[from] nbd_server::log::LogError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("checker command must contain {{image}}")]
    NoImagePlaceholder,
    #[error("--jobs must be 1..={JOBS_MAX}")]
    BadJobs,
}

/// Quotes `s` for `sh`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The checker command for one state.
pub fn checker_command(template: &str, image: &Path, state: &CrashState) -> String {
    template
        .replace("{image}", &shell_quote(&image.to_string_lossy()))
        .replace("{mark}", &shell_quote(state.mark.as_deref().unwrap_or("")))
        .replace("{state}", &state.id.to_string())
}

struct Outcome {
    state: CrashState,
    ok: bool,
    exit_code: Option<i32>,
    output: String,
}

fn run_checker(cmd: &str, timeout_seconds: u64) -> std::io::Result<(bool, Option<i32>, String)> {
    // `timeout` kills the whole checker (SIGTERM, then SIGKILL 5 s later) if it hangs.
    let out = Command::new("timeout")
        .args([
            "--kill-after=5",
            &timeout_seconds.to_string(),
            "sh",
            "-c",
            cmd,
        ])
        .output()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.code() == Some(124) {
        text.push_str(&format!("\n[checker killed after {timeout_seconds} s]\n"));
    }
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    if text.len() > CHECKER_OUTPUT_BYTES_MAX {
        let mut cut = CHECKER_OUTPUT_BYTES_MAX;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("\n[output cut]\n");
    }
    Ok((out.status.success(), out.status.code(), text))
}

/// Checks every unique crash state of `log` on top of `base`.
pub fn check(log: &Path, base: &Path, opts: &CheckOptions) -> Result<CheckSummary, CheckError> {
    if !opts.checker.contains("{image}") {
        return Err(CheckError::NoImagePlaceholder);
    }
    if opts.jobs == 0 || opts.jobs > JOBS_MAX {
        return Err(CheckError::BadJobs);
    }
    let started = Instant::now();
    let history = History::open(log)?;
    let data = history.data_file()?;
    let disk_bytes = history.disk_bytes;
    let work = tempfile::Builder::new()
        .prefix("crashmonkey-check")
        .tempdir()?;
    let prefix = PrefixImage::new(base, work.path(), disk_bytes)?;
    let mut workers: Vec<WorkerImage> = (0..opts.jobs)
        .map(|i| WorkerImage::new(&prefix, work.path().join(format!("worker-{i}.img"))))
        .collect::<Result<_, _>>()?;
    if let Some(out) = &opts.out {
        std::fs::create_dir_all(out)?;
    }
    let mut generator = StateGenerator::new(opts.states, history.data_file()?);
    let bar = if opts.progress {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} states {msg}")
                .expect("static template")
                .progress_chars("=> "),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let mut summary = CheckSummary {
        states: 0,
        unique: 0,
        passed: 0,
        failed: 0,
        seconds: 0.0,
        epochs: 0,
        seed: opts.states.seed,
        failures: Vec::new(),
    };
    for epoch in Epochs::new(history) {
        let epoch = epoch?;
        summary.epochs += 1;
        let states = generator.epoch_states(&epoch)?;
        let todo: Vec<CrashState> = states
            .into_iter()
            .filter(|s| s.duplicate_of.is_none())
            .collect();
        bar.inc_length(todo.len() as u64);
        let next = AtomicUsize::new(0);
        let outcomes: Mutex<Vec<Outcome>> = Mutex::new(Vec::new());
        let first_error: Mutex<Option<CheckError>> = Mutex::new(None);
        std::thread::scope(|scope| {
            for worker in workers.iter_mut() {
                let (todo, next, outcomes, first_error, prefix, epoch, data, bar) = (
                    &todo,
                    &next,
                    &outcomes,
                    &first_error,
                    &prefix,
                    &epoch,
                    &data,
                    &bar,
                );
                scope.spawn(move || loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(state) = todo.get(i) else { break };
                    let result = worker
                        .materialize(prefix, epoch, state, data)
                        .map_err(CheckError::from)
                        .and_then(|()| {
                            let cmd = checker_command(&opts.checker, &worker.path, state);
                            let (ok, exit_code, output) = run_checker(&cmd, opts.timeout_seconds)?;
                            if !ok {
                                if let Some(out) = &opts.out {
                                    let img = out.join(format!("state-{}.img", state.id));
                                    sparse_copy(&worker.path, &img, prefix.disk_bytes)?;
                                    let report = format!(
                                        "state {} (epoch {}, {}), mark {:?}\ncommand: {}\nexit code: {:?}\n\n{}",
                                        state.id, state.epoch, state.label, state.mark, cmd, exit_code, output
                                    );
                                    std::fs::write(out.join(format!("state-{}.txt", state.id)), report)?;
                                }
                            }
                            Ok(Outcome { state: state.clone(), ok, exit_code, output })
                        });
                    match result {
                        Ok(o) => outcomes.lock().expect("no panics under lock").push(o),
                        Err(e) => {
                            first_error.lock().expect("no panics under lock").get_or_insert(e);
                            break;
                        }
                    }
                    bar.inc(1);
                });
            }
        });
        if let Some(e) = first_error.into_inner().expect("threads joined") {
            return Err(e);
        }
        let mut outcomes = outcomes.into_inner().expect("threads joined");
        outcomes.sort_by_key(|o| o.state.id);
        for o in outcomes {
            if o.ok {
                summary.passed += 1;
            } else {
                summary.failed += 1;
                summary.failures.push(FailedState {
                    id: o.state.id,
                    epoch: o.state.epoch,
                    label: o.state.label.clone(),
                    mark: o.state.mark.clone(),
                    exit_code: o.exit_code,
                    image: opts
                        .out
                        .as_ref()
                        .map(|d| d.join(format!("state-{}.img", o.state.id))),
                    output: o.output,
                });
            }
        }
        bar.set_message(format!("epoch {}, {} failed", epoch.index, summary.failed));
        prefix.advance(&epoch, &data)?;
        for w in &mut workers {
            w.prefix_advanced(&epoch);
        }
    }
    bar.finish_and_clear();
    summary.states = generator.generated;
    summary.unique = generator.unique;
    summary.seconds = started.elapsed().as_secs_f64();
    if let Some(out) = &opts.out {
        std::fs::write(
            out.join("summary.json"),
            serde_json::to_string_pretty(&summary).map_err(std::io::Error::other)?,
        )?;
    }
    Ok(summary)
}
