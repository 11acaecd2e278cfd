//! Running a checker over every crash state of a write log.
//!
//! States come epoch by epoch from [`StateGenerator`]; each unique one is materialised on a
//! worker's copy-on-write image ([`WorkerImage`]) and handed to the checker command, `jobs`
//! at a time ([`crate::checker`] runs one). A failing state keeps its image and the checker's
//! output in the output folder. A checker that damages its image (removes it, resizes it)
//! fails its state, and the worker's image is built again.
//!
//! With `{uri}` (or `{uri-cow}`) in the command, the state is also served over NBD by an
//! in-process server ([`crate::served`]): base plus layers, nothing disk-sized written per
//! state. A command without `{image}` gets no images at all.
//!
//! A run can be stopped early ([`StopFlag`]; the CLI raises it on SIGINT and SIGTERM): no
//! new state starts, running checkers are killed, and the summary says how far the run got.
//! The temporary images live in one temporary folder that goes on every return.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use nbd_server::backend::Layer;

use crate::ahead::AheadBudget;
use crate::checker::{run_checker, CheckerRun};
pub use crate::checker::{signal_name, CheckerEnd, StopFlag, CHECKER_OUTPUT_BYTES_MAX};
use crate::history::{Epoch, History};
use crate::overlay::{sparse_copy, ImageError, LargerBase, PrefixImage, WorkerImage};
use crate::served::StateServer;
use crate::states::{CrashState, EpochHashes, StateGenerator, StateOptions};

/// Most checker processes run at once.
pub const JOBS_MAX: usize = 64;
/// Default time limit of one checker run; past it the checker is killed and the state fails.
pub const CHECKER_SECONDS_DEFAULT: u64 = 600;

#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Shell command; `{image}`, `{uri}`, `{uri-cow}`, `{mark}` and `{state}` are replaced.
    pub checker: String,
    pub jobs: usize,
    /// Where failing images and outputs go.
    pub out: Option<PathBuf>,
    pub states: StateOptions,
    pub progress: bool,
    /// Time limit of one checker run, in seconds; past it the checker's process group is
    /// killed and its state fails.
    pub timeout_seconds: u64,
    /// What to do with a base image larger than the logged disk.
    pub larger_base: LargerBase,
    /// Stops the run early when raised.
    pub stop: StopFlag,
    /// The states of this process: a unique state is checked when the shard owns its id.
    pub shard: crate::shard::Shard,
    /// Where the temporary images go (default: the system's temporary folder).
    pub work_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FailedState {
    pub id: usize,
    pub epoch: usize,
    pub label: String,
    pub mark: Option<String>,
    /// The checker's exit code; `None` when a signal ended it.
    pub exit_code: Option<i32>,
    /// The signal that ended the checker ("SIGKILL"), if one did; at a timeout, ours.
    pub signal: Option<String>,
    /// The checker ran past its time limit and was killed.
    pub timed_out: bool,
    /// Why the state failed, in words ("exit code 1", "killed by signal 9 (SIGKILL)",
    /// "timed out after 600 s ...", "the checker removed the state's image ...").
    pub reason: String,
    pub image: Option<PathBuf>,
    pub output: String,
    /// The state itself: which writes of its epoch it kept, dropped or tore (what
    /// `crashmonkey report` draws on the log).
    pub state: CrashState,
}

/// Where a stopped run stopped.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Interruption {
    /// The signal that stopped the run ("SIGINT").
    pub signal: String,
    pub signal_number: i32,
    /// Index of the epoch being checked; the epochs before it were checked whole.
    pub epoch: usize,
    /// States of that epoch whose verdicts were in (and are counted) before the stop.
    pub epoch_states_checked: usize,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CheckSummary {
    /// States generated, duplicates included.
    pub states: usize,
    /// States with distinct content: the ones checked (in a stopped run, the ones found).
    pub unique: usize,
    pub passed: usize,
    pub failed: usize,
    pub seconds: f64,
    pub epochs: usize,
    pub seed: u64,
    pub failures: Vec<FailedState>,
    /// Set when a signal stopped the run: only `passed + failed` states were checked.
    pub interrupted: Option<Interruption>,
    /// The write log checked, as an absolute path (for `crashmonkey report` of `--out`).
    pub log: Option<PathBuf>,
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
    #[error(transparent)]
    Serve(#[from] crate::served::ServeError),
    #[error(
        "checker command must contain {{image}} (the state as an image file), {{uri}} (the state \
         as a read-only NBD export) or {{uri-cow}} (a writable copy-on-write one)"
    )]
    NoImagePlaceholder,
    #[error("--jobs must be 1..={JOBS_MAX}")]
    BadJobs,
    #[error(
        "{dir}: {free} bytes free, and the state images may take up to {needed} ({images} \
         sparse images of the disk holding at most the base's and the log's data); free some \
         space or give --work-dir on a larger filesystem"
    )]
    NoSpace {
        dir: String,
        free: u64,
        needed: u64,
        images: u64,
    },
}

/// Refuses to start when the work directory cannot hold the images a check makes: the
/// prefix image and one per job, each a sparse copy of the base plus at most the log's data.
fn check_space(
    dir: &Path,
    base: &Path,
    log: &Path,
    disk_bytes: u64,
    jobs: usize,
) -> Result<(), CheckError> {
    use std::os::unix::fs::MetadataExt;
    let base_bytes = std::fs::metadata(base)?.blocks() * 512;
    let log_bytes = std::fs::metadata(log)?.len();
    let images = jobs as u64 + 1;
    let needed = images.saturating_mul(disk_bytes.min(base_bytes.saturating_add(log_bytes)));
    let free = crate::checker::sys::free_bytes(dir)?;
    if free < needed {
        return Err(CheckError::NoSpace {
            dir: dir.display().to_string(),
            free,
            needed,
            images,
        });
    }
    Ok(())
}

/// Quotes `s` for `sh`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Where a state is for its checker: an image file, NBD URIs, or both.
#[derive(Debug, Clone, Default)]
pub struct StatePlaces<'a> {
    pub image: Option<&'a Path>,
    /// Read-only export.
    pub uri: Option<String>,
    /// Writable copy-on-write export.
    pub uri_cow: Option<String>,
}

/// The checker command for one state.
pub fn checker_command(template: &str, places: &StatePlaces<'_>, state: &CrashState) -> String {
    let quoted = |s: Option<&str>| shell_quote(s.unwrap_or(""));
    let image = places.image.map(|p| p.to_string_lossy());
    template
        .replace("{image}", &quoted(image.as_deref()))
        .replace("{uri-cow}", &quoted(places.uri_cow.as_deref()))
        .replace("{uri}", &quoted(places.uri.as_deref()))
        .replace("{mark}", &quoted(state.mark.as_deref()))
        .replace("{state}", &state.id.to_string())
}

/// Which places of a state a checker command asks for.
#[derive(Debug, Clone, Copy)]
struct Wants {
    image: bool,
    uri: bool,
}

impl Wants {
    fn of(template: &str) -> Result<Self, CheckError> {
        let wants = Wants {
            image: template.contains("{image}"),
            uri: template.contains("{uri}") || template.contains("{uri-cow}"),
        };
        if !wants.image && !wants.uri {
            return Err(CheckError::NoImagePlaceholder);
        }
        Ok(wants)
    }
}

/// One checker slot: its image (for `{image}`) and its exports (slot number, for `{uri}`).
struct Worker {
    slot: usize,
    image: Option<WorkerImage>,
}

/// Where the states of a run are built: the prefix and worker images, the NBD server.
struct Stage {
    prefix: Option<PrefixImage>,
    workers: Vec<Worker>,
    server: Option<StateServer>,
}

impl Stage {
    fn new(
        wants: Wants,
        base: &Path,
        history: &History,
        work: &Path,
        opts: &CheckOptions,
    ) -> Result<Self, CheckError> {
        let prefix = match wants.image {
            true => Some(PrefixImage::new(
                base,
                work,
                history.disk_bytes,
                opts.larger_base,
            )?),
            false => None,
        };
        let mut workers = Vec::with_capacity(opts.jobs);
        while workers.len() < opts.jobs && opts.stop.signal().is_none() {
            let path = work.join(format!("worker-{}.img", workers.len()));
            let image = match &prefix {
                Some(p) => Some(WorkerImage::new(p, path)?),
                None => None,
            };
            let slot = workers.len();
            workers.push(Worker { slot, image });
        }
        let server = match wants.uri {
            true => Some(StateServer::start(
                base,
                history.data_file()?,
                history.disk_bytes,
                opts.larger_base,
                workers.len(),
                work,
            )?),
            false => None,
        };
        Ok(Stage {
            prefix,
            workers,
            server,
        })
    }

    /// Everything of `epoch` joins the prefix.
    fn advance(&mut self, epoch: &Epoch, data: &std::fs::File) -> Result<(), CheckError> {
        if let Some(prefix) = &self.prefix {
            prefix.advance(epoch, data)?;
            for w in self.workers.iter_mut().filter_map(|w| w.image.as_mut()) {
                w.prefix_advanced(epoch, prefix.disk_bytes);
            }
        }
        if let Some(server) = &mut self.server {
            server.advance(epoch)?;
        }
        Ok(())
    }

    /// Stops the NBD server, if there is one.
    fn finish(self) -> Result<(), CheckError> {
        if let Some(server) = self.server {
            server.shutdown()?;
        }
        Ok(())
    }
}

/// One state's verdict: `None` if it passed.
struct Outcome {
    id: usize,
    failure: Option<FailedState>,
}

/// Checks every unique crash state of `log` on top of `base`.
pub fn check(log: &Path, base: &Path, opts: &CheckOptions) -> Result<CheckSummary, CheckError> {
    let wants = Wants::of(&opts.checker)?;
    if opts.jobs == 0 || opts.jobs > JOBS_MAX {
        return Err(CheckError::BadJobs);
    }
    let started = Instant::now();
    let history = History::open(log)?;
    let data = history.data_file()?;
    if let Some(out) = &opts.out {
        std::fs::create_dir_all(out)?;
    }
    let parent = opts.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    if wants.image {
        check_space(&parent, base, log, history.disk_bytes, opts.jobs)?;
    }
    // Every temporary image lives in here; it goes when `work` drops, on every return.
    let work = tempfile::Builder::new()
        .prefix("crashmonkey-check")
        .tempdir_in(&parent)?;
    let mut stage = Stage::new(wants, base, &history, work.path(), opts)?;
    let generator =
        StateGenerator::in_dir(opts.states, history.data_file()?, work.path().to_path_buf());
    let bar = progress_bar(opts.progress);
    let mut summary = CheckSummary::new(opts.states.seed);
    summary.log = std::path::absolute(log).ok();
    // States are generated one epoch ahead, on a thread of their own, while the epoch before
    // is checked (on a long log generating them was a third of the run).
    let budget = AheadBudget::new(GENERATED_AHEAD_BYTES_MAX);
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel(EPOCHS_AHEAD_MAX);
        let gen_budget = &budget;
        scope.spawn(move || generate(history, generator, opts, tx, gen_budget));
        // Its end closes the budget and drops the receiver, which ends the generator.
        let _closed = budget.closer();
        check_epochs(rx, &mut stage, &data, opts, &bar, &mut summary, &budget)
    })?;
    stage.finish()?;
    bar.finish_and_clear();
    summary.seconds = started.elapsed().as_secs_f64();
    if let Some(out) = &opts.out {
        let json = serde_json::to_string_pretty(&summary).map_err(std::io::Error::other)?;
        std::fs::write(out.join("summary.json"), json)?;
    }
    Ok(summary)
}

/// Epochs whose states are generated ahead of the one being checked, at most: enough for
/// the next batch to be ready when one ends (generating them meanwhile left the jobs idle),
/// and for the generator to use what the jobs leave of the CPUs while the stage moves past a
/// batch: eight batches rather than two took `true {uri}` on the 1 GiB log from 1,198 to
/// 1,249 states/s (medians of four; the generator had waited on a full channel for half the
/// run).
const EPOCHS_AHEAD_MAX: usize = 8 * BATCH_EPOCHS_MAX;
/// Memory those epochs and their states may take, at most (estimated; an epoch larger than
/// this alone still goes, on its own).
const GENERATED_AHEAD_BYTES_MAX: usize = 64 << 20;

/// One epoch, the states of it this process checks, and the generator's counts after it.
struct Generated {
    epoch: Epoch,
    todo: Vec<CrashState>,
    states: usize,
    unique: usize,
    /// Its estimated memory, taken from the [`AheadBudget`] until it is received.
    bytes: usize,
}

/// The estimated memory of an epoch and its states to check.
fn generated_bytes(epoch: &Epoch, todo: &[CrashState]) -> usize {
    let states: usize = todo
        .iter()
        .map(|s| {
            std::mem::size_of::<CrashState>()
                + (s.included.len() + s.dropped_seqs.len()) * 8
                + s.label.len()
                + s.hash.len()
                + s.torn.as_ref().map_or(0, |t| t.pieces.len() * 16)
        })
        .sum();
    crate::ahead::epoch_bytes(epoch) + states
}

/// Generates the states of every epoch of `history`, in order, into `tx`; stops at the first
/// error (sent too) or once nobody receives. The epochs' sectors are hashed ahead on a
/// thread of their own ([`crate::ahead::hashed_epochs`]).
fn generate(
    history: History,
    mut generator: StateGenerator,
    opts: &CheckOptions,
    tx: std::sync::mpsc::SyncSender<Result<Generated, CheckError>>,
    budget: &AheadBudget,
) {
    let r = crate::ahead::hashed_epochs(history, &opts.states, |hashed| {
        let item = hashed
            .map_err(CheckError::from)
            .and_then(|(epoch, h)| generated(&mut generator, opts, epoch, h));
        let failed = item.is_err();
        if item.as_ref().is_ok_and(|g| !budget.take(g.bytes)) {
            return false;
        }
        tx.send(item).is_ok() && !failed
    });
    if let Err(e) = r {
        let _ = tx.send(Err(e.into()));
    }
}

/// The states of `epoch` this process checks, with the generator's counts after it.
fn generated(
    generator: &mut StateGenerator,
    opts: &CheckOptions,
    epoch: Epoch,
    hashed: EpochHashes,
) -> Result<Generated, CheckError> {
    let todo: Vec<CrashState> = generator
        .epoch_states_hashed(&epoch, hashed)?
        .into_iter()
        .filter(|s| s.duplicate_of.is_none() && opts.shard.owns(s.id as u64))
        .collect();
    Ok(Generated {
        bytes: generated_bytes(&epoch, &todo),
        epoch,
        todo,
        states: generator.generated,
        unique: generator.unique,
    })
}

/// Epochs whose states are checked at once, at most (see [`Batch`]), when they are served
/// (`{uri}`) only. A read of a served state goes through one layer per epoch with states
/// before its own in the batch (epochs without states share a layer), so this bounds
/// batching, not reads: on the 1 GiB fio log (a state every six epochs) 64 ended most
/// batches at ten states, not sixteen, and 256 took `true {uri}` from 1,210 to 1,256
/// states/s (1,024: 1,250).
const BATCH_EPOCHS_MAX: usize = 256;

/// States per job a batch of served states gathers before it is checked (unless it reaches
/// [`BATCH_EPOCHS_MAX`] first): each batch ends with the jobs waiting for its slowest state
/// and the stage moving on alone, so a batch of one state per job kept them half idle, and
/// 32 rather than 8 took `true {uri}` on the 1 GiB fio log from 1,180 to 1,280 states/s
/// (medians of four; the 10,000-write log 1,968 to 1,982).
const BATCH_STATES_PER_JOB: usize = 32;

/// [`BATCH_EPOCHS_MAX`] and [`BATCH_STATES_PER_JOB`] when states are also materialised
/// (`{image}`): a worker image is given every write of the batch's epochs before a state's
/// own, so the larger batches took `true {image}` on the 1 GiB log from 12.6 s to 16.7 s.
const IMAGE_BATCH_EPOCHS_MAX: usize = 64;
const IMAGE_BATCH_STATES_PER_JOB: usize = 8;

/// Consecutive epochs whose states are checked at once, so that `--jobs` checkers keep busy
/// on a log whose epochs have no new state or one (most of a long fio log's do). The first
/// has states; each state stands on the prefix before the first epoch plus the batch's
/// epochs before its own (as layers of its export, or as writes on its worker image).
/// Verdicts come out by state id, as epoch by epoch.
#[derive(Default)]
struct Batch {
    epochs: Vec<Epoch>,
    /// For the server (empty without one): the layers of the batch's epochs, one for each
    /// run of epochs that ends before an epoch with states to check.
    layers: Vec<Arc<Layer>>,
    /// The layer of the epochs since the last one with states (from it on), still growing.
    open: Option<Layer>,
    /// For each epoch: how many of `layers` lie before it (its states see those).
    layers_before: Vec<usize>,
    /// The states to check: (position of their epoch in `epochs`, state), by id.
    todo: Vec<(usize, CrashState)>,
}

impl Batch {
    /// Whether it is time to check it: enough states for every job, or enough epochs.
    fn full(&self, jobs: usize, stage: &Stage) -> bool {
        let (epochs, per_job) = match stage.prefix {
            Some(_) => (IMAGE_BATCH_EPOCHS_MAX, IMAGE_BATCH_STATES_PER_JOB),
            None => (BATCH_EPOCHS_MAX, BATCH_STATES_PER_JOB),
        };
        self.todo.len() >= jobs * per_job || self.epochs.len() >= epochs
    }

    fn push(&mut self, epoch: Epoch, todo: Vec<CrashState>, stage: &Stage) {
        let at = self.epochs.len();
        if stage.server.is_some() {
            if !todo.is_empty() {
                self.layers.extend(self.open.take().map(Arc::new));
            }
            self.layers_before.push(self.layers.len());
            StateServer::put_epoch(self.open.get_or_insert_with(Layer::new), &epoch);
        }
        self.epochs.push(epoch);
        self.todo.extend(todo.into_iter().map(|s| (at, s)));
    }

    /// The layers states of the epoch at `pos` are served on (none without a server).
    fn layers_for(&self, pos: usize) -> &[Arc<Layer>] {
        let n = self.layers_before.get(pos).copied().unwrap_or(0);
        &self.layers[..n]
    }
}

/// Checks the epochs `rx` brings, in order, into `summary`, until they end or a stop.
fn check_epochs(
    rx: std::sync::mpsc::Receiver<Result<Generated, CheckError>>,
    stage: &mut Stage,
    data: &std::fs::File,
    opts: &CheckOptions,
    bar: &ProgressBar,
    summary: &mut CheckSummary,
    budget: &AheadBudget,
) -> Result<(), CheckError> {
    let mut batch = Batch::default();
    for item in rx {
        let g = item?;
        budget.give(g.bytes);
        if let Some(signal) = opts.stop.signal() {
            let first = batch.epochs.first().unwrap_or(&g.epoch).index;
            summary.interrupted = Some(interruption(signal, first, 0));
            return Ok(());
        }
        (summary.states, summary.unique) = (g.states, g.unique);
        bar.inc_length(g.todo.len() as u64);
        if batch.epochs.is_empty() && g.todo.is_empty() {
            summary.epochs += 1;
            stage.advance(&g.epoch, data)?;
            continue;
        }
        batch.push(g.epoch, g.todo, stage);
        if batch.full(opts.jobs, stage)
            && !check_batch(std::mem::take(&mut batch), stage, data, opts, bar, summary)?
        {
            return Ok(());
        }
    }
    if !batch.epochs.is_empty() {
        check_batch(batch, stage, data, opts, bar, summary)?;
    }
    Ok(())
}

/// Checks `batch` into `summary`, then moves the stage past its epochs. `false`: a stop
/// left states unchecked (said in `summary`).
fn check_batch(
    batch: Batch,
    stage: &mut Stage,
    data: &std::fs::File,
    opts: &CheckOptions,
    bar: &ProgressBar,
    summary: &mut CheckSummary,
) -> Result<bool, CheckError> {
    tracing::debug!(
        "checking {} states of {} epochs at once",
        batch.todo.len(),
        batch.epochs.len()
    );
    let outcomes = check_epoch(stage, &batch, data, opts, bar)?;
    let checked: std::collections::HashSet<usize> = outcomes.iter().map(|o| o.id).collect();
    summary.record(outcomes);
    let last = batch.epochs.last().expect("a batch has epochs").index;
    bar.set_message(format!("epoch {last}, {} failed", summary.failed));
    // The first epoch with a state left unchecked, and how many of its states were checked.
    let mut unchecked = None;
    for (at, epoch) in batch.epochs.iter().enumerate() {
        let ids = batch
            .todo
            .iter()
            .filter(|(a, _)| *a == at)
            .map(|(_, s)| s.id);
        let (done, all) = ids.fold((0, 0), |(d, n), id| {
            (d + usize::from(checked.contains(&id)), n + 1)
        });
        summary.epochs += 1;
        if done < all {
            unchecked = Some((epoch.index, done));
            break;
        }
    }
    if let Some((epoch, done)) = unchecked {
        let signal = opts
            .stop
            .signal()
            .expect("only a stop leaves states unchecked");
        summary.interrupted = Some(interruption(signal, epoch, done));
        return Ok(false);
    }
    for epoch in &batch.epochs {
        stage.advance(epoch, data)?;
    }
    Ok(true)
}

impl CheckSummary {
    fn new(seed: u64) -> Self {
        CheckSummary {
            states: 0,
            unique: 0,
            passed: 0,
            failed: 0,
            seconds: 0.0,
            epochs: 0,
            seed,
            failures: Vec::new(),
            interrupted: None,
            log: None,
        }
    }

    fn record(&mut self, outcomes: Vec<Outcome>) {
        for o in outcomes {
            match o.failure {
                None => self.passed += 1,
                Some(f) => {
                    self.failed += 1;
                    self.failures.push(f);
                }
            }
        }
    }
}

fn interruption(signal: i32, epoch: usize, epoch_states_checked: usize) -> Interruption {
    Interruption {
        signal: signal_name(signal),
        signal_number: signal,
        epoch,
        epoch_states_checked,
    }
}

fn progress_bar(shown: bool) -> ProgressBar {
    if !shown {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(0);
    b.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} states {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    b
}

/// Checks the states of `batch`, one worker thread per worker image. Returns their verdicts
/// by state id; fewer than the batch's states only if the run was stopped.
fn check_epoch(
    stage: &mut Stage,
    batch: &Batch,
    data: &std::fs::File,
    opts: &CheckOptions,
    bar: &ProgressBar,
) -> Result<Vec<Outcome>, CheckError> {
    let todo = &batch.todo;
    let next = AtomicUsize::new(0);
    let outcomes: Mutex<Vec<Outcome>> = Mutex::new(Vec::new());
    let first_error: Mutex<Option<CheckError>> = Mutex::new(None);
    let Stage {
        prefix,
        workers,
        server,
    } = stage;
    let at = Places {
        prefix: prefix.as_ref(),
        server: server.as_ref(),
    };
    // One thread per state at most: most epochs of a long log have no new state, or one,
    // and starting threads for nothing was most of such a run's time.
    std::thread::scope(|scope| {
        for worker in workers.iter_mut().take(todo.len()) {
            let (next, outcomes, first_error) = (&next, &outcomes, &first_error);
            scope.spawn(move || loop {
                // After a stop or another worker's error, no new state starts.
                let failed = first_error.lock().expect("no panics under lock").is_some();
                if failed || opts.stop.signal().is_some() {
                    break;
                }
                let Some((pos, state)) = todo.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    break;
                };
                let on = On {
                    before: &batch.epochs[..*pos],
                    layers: batch.layers_for(*pos),
                    epoch: &batch.epochs[*pos],
                };
                match check_state(worker, at, on, state, data, opts) {
                    Ok(Some(o)) => outcomes.lock().expect("no panics under lock").push(o),
                    Ok(None) => break,
                    Err(e) => {
                        first_error
                            .lock()
                            .expect("no panics under lock")
                            .get_or_insert(e);
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
    outcomes.sort_by_key(|o| o.id);
    Ok(outcomes)
}

/// What a state stands on: the prefix (of the stage), then the epochs `before` its own in its
/// batch (`layers` are theirs, for the server), then `epoch`, of which it holds some writes.
#[derive(Clone, Copy)]
struct On<'a> {
    before: &'a [Epoch],
    layers: &'a [Arc<Layer>],
    epoch: &'a Epoch,
}

/// The shared places states are built in, for a worker thread.
#[derive(Clone, Copy)]
struct Places<'a> {
    prefix: Option<&'a PrefixImage>,
    server: Option<&'a StateServer>,
}

/// Builds `state` on `worker`, runs the checker on it and judges it. `None`: the run was
/// stopped while the checker ran, so there is no verdict.
fn check_state(
    worker: &mut Worker,
    at: Places<'_>,
    on: On<'_>,
    state: &CrashState,
    data: &std::fs::File,
    opts: &CheckOptions,
) -> Result<Option<Outcome>, CheckError> {
    if let (Some(image), Some(prefix)) = (worker.image.as_mut(), at.prefix) {
        image.materialize_on(prefix, on.before, on.epoch, state, data)?;
    }
    if opts.stop.signal().is_some() {
        return Ok(None);
    }
    let places = StatePlaces {
        image: worker.image.as_ref().map(|i| i.path.as_path()),
        uri: at.server.map(|s| s.uri(worker.slot, false)),
        uri_cow: at.server.map(|s| s.uri(worker.slot, true)),
    };
    let cmd = checker_command(&opts.checker, &places, state);
    if let Some(server) = at.server {
        server.serve(worker.slot, on.layers, on.epoch, state);
    }
    let run = run_checker(&cmd, opts.timeout_seconds, &opts.stop);
    if let Some(server) = at.server {
        server.clear(worker.slot);
    }
    let run = run?;
    if let CheckerEnd::Stopped(_) = run.end {
        return Ok(None);
    }
    let damage = match (worker.image.as_mut(), at.prefix) {
        (Some(image), Some(prefix)) => repair(image, prefix, on, state, data)?,
        _ => None,
    };
    if run.end.passed() && damage.is_none() {
        return Ok(Some(Outcome {
            id: state.id,
            failure: None,
        }));
    }
    let reason = match damage {
        Some(d) => format!("{d} (the checker ended with {})", run.end),
        None => run.end.to_string(),
    };
    let image = keep_failure(worker, at, on, state, &cmd, &reason, &run, opts)?;
    Ok(Some(Outcome {
        id: state.id,
        failure: Some(FailedState {
            id: state.id,
            epoch: state.epoch,
            label: state.label.clone(),
            mark: state.mark.clone(),
            exit_code: run.end.exit_code(),
            signal: run.end.signal().map(signal_name),
            timed_out: matches!(run.end, CheckerEnd::TimedOut(_)),
            reason,
            image,
            output: run.output,
            state: state.clone(),
        }),
    }))
}

/// What the checker did to `image` that it must not have, if anything; the image is then
/// built again (holding `state` once more, for `--out`), so the next state has a whole one.
fn repair(
    image: &mut WorkerImage,
    prefix: &PrefixImage,
    on: On<'_>,
    state: &CrashState,
    data: &std::fs::File,
) -> Result<Option<String>, CheckError> {
    let damage = image.damage(prefix.disk_bytes)?;
    if let Some(d) = &damage {
        tracing::debug!("state {}: {d}; building the worker image again", state.id);
        image.rebuild(prefix)?;
        image.materialize_on(prefix, on.before, on.epoch, state, data)?;
    }
    Ok(damage)
}

/// Copies a failing state's image and writes its report into `--out`, if there is one;
/// returns where the image went. Without a worker image the state is saved from the server.
#[allow(clippy::too_many_arguments)]
fn keep_failure(
    worker: &Worker,
    at: Places<'_>,
    on: On<'_>,
    state: &CrashState,
    cmd: &str,
    reason: &str,
    run: &CheckerRun,
    opts: &CheckOptions,
) -> Result<Option<PathBuf>, CheckError> {
    let Some(out) = &opts.out else {
        return Ok(None);
    };
    let img = out.join(format!("state-{}.img", state.id));
    match (&worker.image, at.prefix, at.server) {
        (Some(image), Some(prefix), _) => sparse_copy(&image.path, &img, prefix.disk_bytes)?,
        (_, _, Some(server)) => server.save(worker.slot, on.layers, on.epoch, state, &img)?,
        _ => unreachable!("a check has images or a server"),
    }
    let report = format!(
        "state {} (epoch {}, {}), mark {:?}\ncommand: {}\nresult: {}\n\n{}",
        state.id, state.epoch, state.label, state.mark, cmd, reason, run.output
    );
    std::fs::write(out.join(format!("state-{}.txt", state.id)), report)?;
    Ok(Some(img))
}
