//! Every crash state of an fs-core run, checked in process: each state of the recorded log
//! (the same prefix / ordered-subset / torn generator `crashmonkey check` uses) is built in
//! memory as the epoch's prefix image plus the state's own blocks, mounted with recovery,
//! fsck'd, and judged by fs-core's crash oracle. Nothing is written to disk per state.

use std::path::Path;
use std::sync::Arc;

use fs_core::block::{read_block_sync, BlockDevice, BlockMap, BLOCK_SIZE};
use fs_core::crash::{CrashViolation, Judge};
use fs_core::ondisk::{self, fsck};
use fs_core::oracle::History;
use fs_core::Config;

use crate::history::{Epoch, Epochs, History as LogHistory, Op, OpData};
use crate::states::{CrashState, StateGenerator, StateOptions};

use super::device::StateDevice;

const BS: u64 = BLOCK_SIZE as u64;

/// One crash state that broke a promise, with everything a report needs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StateFailure {
    pub state: CrashState,
    /// Why it did not mount, if it did not.
    pub mount_error: Option<String>,
    /// What fsck found wrong (after recovery).
    pub fsck: Vec<String>,
    /// What the crash oracle found wrong.
    pub violations: Vec<CrashViolation>,
    /// Transactions recovery replayed.
    pub replayed: u64,
    /// The state's image, as the crash left it (before recovery; filled in by `check_run`).
    #[serde(skip)]
    pub image: Vec<u8>,
}

/// The full image of a state: the prefix with its blocks laid over it.
pub(crate) fn state_image(prefix: &[u8], blocks: &BlockMap<Vec<u8>>) -> Vec<u8> {
    let mut img = prefix.to_vec();
    for (b, data) in blocks {
        img[(b * BS) as usize..((b + 1) * BS) as usize].copy_from_slice(data);
    }
    img
}

/// The outcome of checking a run's states.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StatesChecked {
    /// States generated (duplicates included).
    pub generated: usize,
    /// States with distinct content: the ones checked.
    pub checked: usize,
    pub failures: Vec<StateFailure>,
    /// Epochs of the log.
    pub epochs: usize,
}

/// A state's own blocks: the prefix blocks its writes touch, with the writes applied.
pub(crate) fn state_blocks(
    prefix: &[u8],
    epoch: &Epoch,
    state: &CrashState,
    log: &[u8],
) -> BlockMap<Vec<u8>> {
    let mut blocks = BlockMap::default();
    let mut apply = |op: &Op, pieces: &[(u64, u64)]| {
        for &(off, len) in pieces {
            let mut at = off;
            while at < off + len {
                let b = at / BS;
                let end = ((b + 1) * BS).min(off + len);
                let block = blocks
                    .entry(b)
                    .or_insert_with(|| prefix[(b * BS) as usize..((b + 1) * BS) as usize].to_vec());
                let dst = &mut block[(at - b * BS) as usize..(end - b * BS) as usize];
                fill(op, at, dst, log);
                at = end;
            }
        }
    };
    for &i in &state.included {
        let op = &epoch.ops[i];
        apply(op, &op.pieces);
    }
    if let Some(t) = &state.torn {
        apply(&epoch.ops[t.index], &t.pieces);
    }
    blocks
}

/// The bytes `op` writes at `[at, at + dst.len())`.
fn fill(op: &Op, at: u64, dst: &mut [u8], log: &[u8]) {
    match op.data {
        OpData::Zero => dst.fill(0),
        OpData::Log { payload_offset } => {
            let from = (payload_offset + (at - op.offset)) as usize;
            dst.copy_from_slice(&log[from..from + dst.len()]);
        }
    }
}

/// Applies every operation of `epoch` to the prefix image.
pub(crate) fn advance(prefix: &mut [u8], epoch: &Epoch, log: &[u8]) {
    for op in &epoch.ops {
        for &(off, len) in &op.pieces {
            fill(
                op,
                off,
                &mut prefix[off as usize..(off + len) as usize],
                log,
            );
        }
    }
}

/// Mounts one state (recovery into the state's own blocks), fscks it and judges it. `None`
/// when it keeps every promise.
pub fn check_state(
    cfg: &Config,
    judge: &Judge<'_>,
    prefix: &Arc<Vec<u8>>,
    blocks: BlockMap<Vec<u8>>,
    state: &CrashState,
) -> Option<StateFailure> {
    let dev = StateDevice::new(prefix.clone(), blocks);
    let mut fs = match ondisk::mount(cfg.clone(), Box::new(dev)) {
        Ok(fs) => fs,
        Err(e) => {
            return Some(StateFailure {
                state: state.clone(),
                mount_error: Some(e.to_string()),
                fsck: Vec::new(),
                violations: Vec::new(),
                replayed: 0,
                image: Vec::new(),
            })
        }
    };
    let replayed = fs.persist.as_ref().map_or(0, |p| p.recovery.replayed);
    let report = fsck::check(&mut |b| read_block_sync(fs.dev.as_mut(), b));
    let violations = judge.check(state.mark.as_deref(), &mut fs);
    if report.clean() && violations.is_empty() {
        return None;
    }
    Some(StateFailure {
        state: state.clone(),
        mount_error: None,
        fsck: report.problems,
        violations,
        replayed,
        image: Vec::new(),
    })
}

/// Epochs with fewer unique states than this are checked on one thread.
pub const PARALLEL_STATES_MIN: usize = 16;

/// The machine's cores (asked once: the answer comes from cgroup files, slow to read).
pub fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Checks `todo` (states of `epoch`), on up to `jobs` threads when there are enough of them;
/// the verdicts come back in `todo`'s order.
fn check_epoch(
    cfg: &Config,
    judge: &Judge<'_>,
    prefix: &Arc<Vec<u8>>,
    epoch: &Epoch,
    todo: &[CrashState],
    log: &[u8],
    jobs: usize,
) -> Vec<Option<StateFailure>> {
    let one = |s: &CrashState| {
        let blocks = state_blocks(prefix, epoch, s, log);
        check_state(cfg, judge, prefix, blocks, s).map(|mut f| {
            f.image = state_image(prefix, &state_blocks(prefix, epoch, s, log));
            f
        })
    };
    if jobs < 2 || todo.len() < PARALLEL_STATES_MIN {
        return todo.iter().map(one).collect();
    }
    let mut out: Vec<Option<StateFailure>> = vec![None; todo.len()];
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..jobs)
            .map(|j| {
                let one = &one;
                scope.spawn(move || {
                    (j..todo.len())
                        .step_by(jobs)
                        .map(|i| (i, one(&todo[i])))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for w in workers {
            for (i, v) in w.join().expect("a state check panicked") {
                out[i] = v;
            }
        }
    });
    out
}

/// Checks every unique crash state of the log at `log_path` (over the image `base`), in
/// order, on up to `jobs` threads; stops after `max_failures` failing states (0: never).
pub fn check_run(
    cfg: &Config,
    history: &History,
    log_path: &Path,
    base: Vec<u8>,
    opts: StateOptions,
    max_failures: usize,
    jobs: usize,
) -> anyhow::Result<StatesChecked> {
    let log = Arc::new(std::fs::read(log_path)?);
    let events = LogHistory::open(log_path)?;
    let mut generator = StateGenerator::new(opts, log.clone());
    let judge = Judge::new(history);
    let mut prefix = Arc::new(base);
    let mut out = StatesChecked::default();
    for epoch in Epochs::new(events) {
        let epoch = epoch?;
        out.epochs += 1;
        let todo: Vec<CrashState> = generator
            .epoch_states(&epoch)?
            .into_iter()
            .filter(|s| s.duplicate_of.is_none())
            .collect();
        out.checked += todo.len();
        for f in check_epoch(cfg, &judge, &prefix, &epoch, &todo, &log, jobs)
            .into_iter()
            .flatten()
        {
            out.failures.push(f);
            if max_failures > 0 && out.failures.len() >= max_failures {
                out.generated = generator.generated;
                return Ok(out);
            }
        }
        advance(Arc::make_mut(&mut prefix).as_mut_slice(), &epoch, &log);
    }
    out.generated = generator.generated;
    Ok(out)
}

/// Finds the state `want` among the states of the log at `log_path` (the same generator
/// options make the same states of the same log) and checks it: `None` when the log has no
/// such state, `Some(None)` when it keeps every promise, `Some(Some(failure))` when not.
pub fn find_and_check(
    cfg: &Config,
    history: &History,
    log_path: &Path,
    base: &[u8],
    opts: StateOptions,
    want: &CrashState,
) -> anyhow::Result<Option<Option<StateFailure>>> {
    let log = Arc::new(std::fs::read(log_path)?);
    let mut generator = StateGenerator::new(opts, log.clone());
    let mut prefix = Arc::new(base.to_vec());
    for epoch in Epochs::new(LogHistory::open(log_path)?) {
        let epoch = epoch?;
        if epoch.index == want.epoch {
            // A minimised state need not be one the generator draws: it is appended.
            let wanted = [(want.included.clone(), want.torn.clone())];
            let Some(state) = generator
                .epoch_states_and(&epoch, &wanted)?
                .into_iter()
                .find(|s| s.included == want.included && s.torn == want.torn)
            else {
                return Ok(None);
            };
            let blocks = state_blocks(&prefix, &epoch, &state, &log);
            let judge = Judge::new(history);
            let failure = check_state(cfg, &judge, &prefix, blocks, &state).map(|mut f| {
                f.image = state_image(&prefix, &state_blocks(&prefix, &epoch, &state, &log));
                f
            });
            return Ok(Some(failure));
        }
        generator.epoch_states(&epoch)?;
        advance(Arc::make_mut(&mut prefix).as_mut_slice(), &epoch, &log);
    }
    Ok(None)
}

/// The content of a device, block by block (the base image of a campaign run).
pub fn read_all(dev: &mut dyn BlockDevice) -> anyhow::Result<Vec<u8>> {
    let n = dev.block_count();
    let mut out = Vec::with_capacity((n * BS) as usize);
    for b in 0..n {
        out.extend(read_block_sync(dev, b)?);
    }
    Ok(out)
}
