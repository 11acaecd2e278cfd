//! The deterministic scheduler. Every operation is a task: an explicit state machine whose
//! `step` runs the code between two yield points (named by [`YieldPoint`]; docs/fs-core.md
//! lists the ones the races turn on); tasks talk to the scheduler only through the protocol in
//! [`crate::step`], so the task modules never import this one. At each yield a
//! `Policy` picks the next runnable task: seeded random (ChaCha), PCT-style priorities, a
//! recorded schedule (replay), or a script (tests). The chosen steps, with any injected short
//! user copy, form the materialised schedule that replays the run exactly.
//!
//! Background tasks run for the whole run: IO completion (task 0), the flusher (1) and
//! reclaim (2); they are runnable only when they have work. A run ends when every workload
//! operation returned; then the world is quiesced deterministically, the invariants are
//! checked, everything is synced, the page cache dropped and each file compared with the
//! oracle's model.

use crate::block::{DeviceRecord, MemDevice};
use crate::buffered_io::{MmapStoreTask, ReadTask, WriteTask};
use crate::fs::{Config, Fs, FsError};
use crate::ops::{FsyncTask, Op, RangeKind, RangeTask, TruncateTask};
use crate::oracle::{Failure, Oracle};
use crate::step::{Cx, Step, YieldPoint};
use crate::writeback::{Flusher, IoCompletion, Reclaim, WbPass};
use crate::TaskId;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Steps after which a run is declared livelocked.
pub const STEPS_PER_RUN_MAX: u64 = 200_000;
/// Operations in one workload.
pub const OPS_PER_WORKLOAD_MAX: usize = 10_000;
/// Files in one workload (each costs the filesystem and the oracle a table entry up front).
pub const FILES_PER_WORKLOAD_MAX: usize = 64;
/// Task ids of the background tasks.
pub const TASK_IO_COMPLETION: TaskId = 0;
pub const TASK_FLUSHER: TaskId = 1;
pub const TASK_RECLAIM: TaskId = 2;
/// Id of the first workload operation's task.
pub const FIRST_OP_TASK: TaskId = 3;

pub(crate) enum Body {
    Write(WriteTask),
    Read(ReadTask),
    Mmap(MmapStoreTask),
    Dio(crate::direct_io::DioWriteTask),
    Range(RangeTask),
    Truncate(TruncateTask),
    Fsync(FsyncTask),
    Sync(WbPass),
    Ns(crate::ns::NsTask),
    Flusher(Flusher),
    Reclaim(Reclaim),
    Completion(IoCompletion),
}

pub(crate) struct Task {
    pub(crate) body: Body,
    pub(crate) op: u32,
    pub(crate) done: bool,
    /// The inode slot a data operation works on (it is one of the inode's users meanwhile).
    pub(crate) slot: Option<usize>,
    pub(crate) started: bool,
}

impl Task {
    pub(crate) fn background(body: Body) -> Self {
        Task {
            body,
            op: u32::MAX,
            done: false,
            slot: None,
            started: false,
        }
    }
}

impl Task {
    pub(crate) fn runnable(&self, fs: &Fs, me: TaskId) -> bool {
        !self.done
            && match &self.body {
                Body::Write(t) => t.runnable(fs, me),
                Body::Read(t) => t.runnable(fs, me),
                Body::Mmap(t) => t.runnable(fs, me),
                Body::Dio(t) => t.runnable(fs, me),
                Body::Range(t) => t.runnable(fs, me),
                Body::Truncate(t) => t.runnable(fs, me),
                Body::Fsync(t) => t.runnable(fs, me),
                Body::Sync(t) => t.runnable(fs, me),
                Body::Ns(t) => t.runnable(fs, me),
                Body::Flusher(t) => t.runnable(fs, me),
                Body::Reclaim(t) => t.runnable(fs),
                Body::Completion(t) => t.runnable(fs),
            }
    }

    /// A data operation's first step: it becomes one of its inode's users, or, with the
    /// inode gone, ends with ENOENT (the step returned).
    pub(crate) fn begin(&mut self, fs: &mut Fs, oracle: &mut Oracle) -> Option<Step> {
        self.started = true;
        if self.op != u32::MAX {
            oracle.running(self.op, true);
        }
        let slot = self.slot?;
        if !fs.inode(slot).reachable() {
            self.slot = None;
            return Some(Step::Done(
                YieldPoint::Enoent,
                slot as u64,
                Err(FsError::NoSuchFile(slot)),
            ));
        }
        fs.inode_mut(slot).users += 1;
        None
    }

    /// The task returned: it is no longer running, nor one of its inode's users.
    pub(crate) fn end(&mut self, fs: &mut Fs, oracle: &mut Oracle) {
        self.done = true;
        if self.op != u32::MAX {
            oracle.running(self.op, false);
        }
        if let Some(slot) = self.slot.take() {
            fs.inode_mut(slot).users -= 1;
        }
    }

    fn at_user_copy(&self) -> Option<u32> {
        match &self.body {
            Body::Write(t) => t.at_user_copy(),
            _ => None,
        }
    }

    pub(crate) fn step(&mut self, cx: &mut Cx<'_>) -> Step {
        match &mut self.body {
            Body::Write(t) => t.step(cx),
            Body::Read(t) => t.step(cx),
            Body::Mmap(t) => t.step(cx),
            Body::Dio(t) => t.step(cx),
            Body::Range(t) => t.step(cx),
            Body::Truncate(t) => t.step(cx),
            Body::Fsync(t) => t.step(cx),
            Body::Sync(t) => t.step(cx),
            Body::Ns(t) => t.step(cx),
            Body::Flusher(t) => t.step(cx),
            Body::Reclaim(t) => t.step(cx),
            Body::Completion(t) => t.step(cx),
        }
    }
}

fn task_for(op: &Op, files: usize) -> Result<Body, FsError> {
    if op.file() >= files {
        return Err(FsError::NoSuchFile(op.file()));
    }
    let len_ok = |len: u64| -> Result<usize, FsError> {
        usize::try_from(len)
            .ok()
            .filter(|l| *l as u64 <= crate::fs::FILE_BYTES_MAX)
            .ok_or(FsError::FileTooBig)
    };
    // Byte ranges must end inside the largest file (this also rules out overflow).
    if let Op::Write { offset, len, .. }
    | Op::Read { offset, len, .. }
    | Op::MmapStore { offset, len, .. }
    | Op::DirectWrite { offset, len, .. } = *op
    {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > crate::fs::FILE_BYTES_MAX)
        {
            return Err(FsError::FileTooBig);
        }
    }
    Ok(match *op {
        Op::Write {
            file,
            offset,
            len,
            byte,
        } => Body::Write(WriteTask::new(file, offset, vec![byte; len_ok(len)?])),
        Op::Read { file, offset, len } => {
            Body::Read(ReadTask::new(file, offset, len_ok(len)? as u64))
        }
        Op::MmapStore {
            file,
            offset,
            len,
            byte,
        } => Body::Mmap(MmapStoreTask::new(file, offset, vec![byte; len_ok(len)?])?),
        Op::DirectWrite {
            file,
            offset,
            len,
            byte,
        } => Body::Dio(crate::direct_io::DioWriteTask::new(
            file,
            offset,
            vec![byte; len_ok(len)?],
        )?),
        Op::Fallocate { file, offset, len } => {
            Body::Range(RangeTask::new(RangeKind::Fallocate, file, offset, len)?)
        }
        Op::PunchHole { file, offset, len } => {
            Body::Range(RangeTask::new(RangeKind::Punch, file, offset, len)?)
        }
        Op::ZeroRange { file, offset, len } => {
            Body::Range(RangeTask::new(RangeKind::ZeroRange, file, offset, len)?)
        }
        Op::Truncate { file, size } => Body::Truncate(TruncateTask::new(file, size)?),
        Op::Fsync { file } | Op::Fdatasync { file } => Body::Fsync(FsyncTask::new(file)),
        Op::FallocateKeepSize { file, offset, len } => {
            Body::Range(RangeTask::new(RangeKind::Fallocate, file, offset, len)?.keeping_size())
        }
        Op::Sync => Body::Fsync(FsyncTask::sync()),
        Op::Create { .. } | Op::Unlink { .. } | Op::Rename { .. } | Op::Link { .. } => {
            Body::Ns(crate::ns::NsTask::new(op.clone()))
        }
    })
}

/// The inode slot a data operation works on (namespace operations and sync name none).
fn data_slot(op: &Op) -> Option<usize> {
    match op {
        Op::Sync | Op::Create { .. } | Op::Unlink { .. } | Op::Rename { .. } | Op::Link { .. } => {
            None
        }
        _ => Some(op.file()),
    }
}

/// A workload: files, and phases of operations. The operations of one phase run
/// concurrently; a phase starts when every operation of the previous one returned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    pub files: usize,
    pub phases: Vec<Vec<Op>>,
}

impl Workload {
    /// Operations in order; an operation's index is its id in traces and reports.
    pub fn ops(&self) -> impl Iterator<Item = &Op> {
        self.phases.iter().flatten()
    }

    /// Why this workload cannot run, if it cannot: a file count outside
    /// 1..=[`FILES_PER_WORKLOAD_MAX`] or more than [`OPS_PER_WORKLOAD_MAX`] operations.
    /// (An operation on a file the workload lacks is not an error here: it runs and fails,
    /// as a system call on a bad descriptor does.) Workloads read from files (reproducer
    /// bundles) are checked with this before they run.
    pub fn check(&self) -> Result<(), String> {
        if !(1..=FILES_PER_WORKLOAD_MAX).contains(&self.files) {
            return Err(format!(
                "the workload has {} files (1..={FILES_PER_WORKLOAD_MAX} allowed)",
                self.files
            ));
        }
        let n = self.ops().count();
        if n > OPS_PER_WORKLOAD_MAX {
            return Err(format!(
                "the workload has {n} operations (at most {OPS_PER_WORKLOAD_MAX})"
            ));
        }
        Ok(())
    }
}

/// One scheduling decision: the task that ran, and the short copy injected into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Choice {
    pub t: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s: Option<u32>,
}

/// One executed step, for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TraceStep {
    pub task: u32,
    pub label: YieldPoint,
    pub arg: u64,
}

/// Error of a policy that cannot go on.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PolicyError {
    #[error("replay diverged at step {step}: recorded task {task} is not runnable (runnable: {runnable:?})")]
    Diverged {
        step: u64,
        task: u32,
        runnable: Vec<u32>,
    },
    #[error("replay schedule ended at step {0} before the run did")]
    Exhausted(u64),
}

/// Picks the next task at each yield point.
pub trait Policy {
    /// `runnable` is sorted and non-empty.
    fn pick(&mut self, runnable: &[TaskId], step: u64) -> Result<TaskId, PolicyError>;
    /// The chosen task is at its user copy of `len` bytes: inject a short copy?
    fn short_copy(&mut self, _task: TaskId, _len: u32) -> Option<u32> {
        None
    }
    /// Told what the step did (scripts wait for yield points).
    fn observe(&mut self, _task: TaskId, _label: YieldPoint, _arg: u64) {}
}

/// Probability that a random policy shortens a user copy.
pub const SHORT_COPY_PER_MILLE: u32 = 30;

fn maybe_short(rng: &mut ChaCha8Rng, len: u32) -> Option<u32> {
    (rng.random_range(0..1000) < SHORT_COPY_PER_MILLE).then(|| rng.random_range(0..len.max(1)))
}

/// Uniformly random among runnable tasks.
pub struct RandomPolicy {
    rng: ChaCha8Rng,
}

impl RandomPolicy {
    pub fn new(seed: u64) -> Self {
        RandomPolicy {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }
}

impl Policy for RandomPolicy {
    fn pick(&mut self, runnable: &[TaskId], _step: u64) -> Result<TaskId, PolicyError> {
        Ok(runnable[self.rng.random_range(0..runnable.len())])
    }
    fn short_copy(&mut self, _task: TaskId, len: u32) -> Option<u32> {
        maybe_short(&mut self.rng, len)
    }
}

/// PCT (probabilistic concurrency testing): random distinct priorities; the highest-priority
/// runnable task runs; at `depth - 1` random steps the running task drops below all others.
pub struct PctPolicy {
    rng: ChaCha8Rng,
    prio: Vec<u64>,
    change_points: Vec<u64>,
    lowered: u64,
    steps_hint: u64,
}

/// PCT runs strict priorities for this many times its step hint, then picks at random.
pub const PCT_FAIR_AFTER_HINTS: u64 = 4;

impl PctPolicy {
    /// `steps_hint`: the expected run length, over which change points are spread.
    pub fn new(seed: u64, depth: u32, steps_hint: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let change_points = (1..depth)
            .map(|_| rng.random_range(0..steps_hint.max(1)))
            .collect();
        PctPolicy {
            rng,
            prio: Vec::new(),
            change_points,
            lowered: 0,
            steps_hint: steps_hint.max(1),
        }
    }
}

impl Policy for PctPolicy {
    fn pick(&mut self, runnable: &[TaskId], step: u64) -> Result<TaskId, PolicyError> {
        // Strict priorities can starve a task forever in a retry loop (a fault refaulting
        // while reclaim keeps evicting): past a budget, fall back to random choice.
        if step > self.steps_hint * PCT_FAIR_AFTER_HINTS {
            return Ok(runnable[self.rng.random_range(0..runnable.len())]);
        }
        let top = *runnable.iter().max().expect("non-empty");
        while self.prio.len() <= top {
            let p = self.rng.random_range(1_000..u64::MAX / 2);
            self.prio.push(p);
        }
        let t = *runnable
            .iter()
            .max_by_key(|&&t| self.prio[t])
            .expect("non-empty");
        if self.change_points.contains(&step) {
            self.lowered += 1;
            self.prio[t] = self.lowered;
        }
        Ok(t)
    }
    fn short_copy(&mut self, _task: TaskId, len: u32) -> Option<u32> {
        maybe_short(&mut self.rng, len)
    }
}

/// A step of a recorded trace, owned (for replay from a bundle).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedStep {
    pub task: u32,
    pub label: YieldPoint,
    pub arg: u64,
}

impl From<&TraceStep> for RecordedStep {
    fn from(s: &TraceStep) -> Self {
        RecordedStep {
            task: s.task,
            label: s.label,
            arg: s.arg,
        }
    }
}

/// Extra steps a lenient replay gives a task to reach the recorded step's label.
pub const REPLAY_EXTRA_STEPS_MAX: u32 = 16;

/// Replays a recorded schedule. Strict: exactly the recorded choices; a recorded task that
/// is not runnable is an error. Lenient (replaying under other switches, where a task may
/// take more or fewer steps): each recorded step `(task, label)` runs that task until it
/// emits that label (at most `REPLAY_EXTRA_STEPS_MAX` extra steps), skipping recorded steps
/// whose task cannot run, so the interleaving of the tasks is kept as far as it can be.
pub struct ReplayPolicy {
    choices: Vec<Choice>,
    labels: Vec<RecordedStep>,
    next: usize,
    strict: bool,
    pending_short: Option<u32>,
    extra: u32,
    /// Recorded steps that could not be followed.
    pub divergences: u64,
}

impl ReplayPolicy {
    pub fn new(choices: Vec<Choice>, strict: bool) -> Self {
        ReplayPolicy {
            choices,
            labels: Vec::new(),
            next: 0,
            strict,
            pending_short: None,
            extra: 0,
            divergences: 0,
        }
    }

    /// A lenient replay that follows `labels` (the recorded trace).
    /// Steps past the schedule's length (quiesce and sync) are not choices and are ignored.
    pub fn lenient(choices: Vec<Choice>, mut labels: Vec<RecordedStep>) -> Self {
        labels.truncate(choices.len());
        ReplayPolicy {
            labels,
            ..ReplayPolicy::new(choices, false)
        }
    }
}

impl Policy for ReplayPolicy {
    fn pick(&mut self, runnable: &[TaskId], step: u64) -> Result<TaskId, PolicyError> {
        loop {
            let Some(c) = self.choices.get(self.next).copied() else {
                if self.strict {
                    return Err(PolicyError::Exhausted(step));
                }
                self.pending_short = None;
                return Ok(*runnable
                    .iter()
                    .find(|&&t| t >= FIRST_OP_TASK)
                    .unwrap_or(&runnable[0]));
            };
            if runnable.contains(&(c.t as TaskId)) {
                self.pending_short = c.s;
                if self.strict || self.labels.len() != self.choices.len() {
                    self.next += 1;
                }
                return Ok(c.t as TaskId);
            }
            if self.strict {
                return Err(PolicyError::Diverged {
                    step,
                    task: c.t,
                    runnable: runnable.iter().map(|&t| t as u32).collect(),
                });
            }
            self.divergences += 1;
            self.next += 1;
            self.extra = 0;
        }
    }
    fn short_copy(&mut self, _task: TaskId, _len: u32) -> Option<u32> {
        self.pending_short.take()
    }
    fn observe(&mut self, task: TaskId, label: YieldPoint, arg: u64) {
        if self.strict || self.labels.len() != self.choices.len() {
            return;
        }
        let Some(want) = self.labels.get(self.next) else {
            return;
        };
        if want.task as TaskId != task {
            return;
        }
        if want.label == label && want.arg == arg {
            self.next += 1;
            self.extra = 0;
        } else {
            self.extra += 1;
            if self.extra > REPLAY_EXTRA_STEPS_MAX {
                self.divergences += 1;
                self.next += 1;
                self.extra = 0;
            }
        }
    }
}

/// A directive of a `ScriptPolicy`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Directive {
    /// Run `task` until one of its steps emits `label` (and `arg`, if given).
    Until {
        task: TaskId,
        label: YieldPoint,
        arg: Option<u64>,
    },
    /// Run `task` while it is runnable.
    Drain { task: TaskId },
    /// Shorten `task`'s next user copy to `bytes`.
    ShortCopy { task: TaskId, bytes: u32 },
}

/// A hand-written interleaving for tests: directives in order, then the lowest runnable
/// workload task (background tasks only when no workload task can run).
pub struct ScriptPolicy {
    script: Vec<Directive>,
    at: usize,
    shorts: Vec<(TaskId, u32)>,
    last: Option<(TaskId, YieldPoint, u64)>,
}

impl ScriptPolicy {
    pub fn new(script: Vec<Directive>) -> Self {
        ScriptPolicy {
            script,
            at: 0,
            shorts: Vec::new(),
            last: None,
        }
    }
}

impl ScriptPolicy {
    /// The lowest runnable workload task, else the lowest background task.
    fn fallback(runnable: &[TaskId]) -> TaskId {
        *runnable
            .iter()
            .find(|&&t| t >= FIRST_OP_TASK)
            .unwrap_or(&runnable[0])
    }
}

impl Policy for ScriptPolicy {
    fn pick(&mut self, runnable: &[TaskId], _step: u64) -> Result<TaskId, PolicyError> {
        loop {
            match self.script.get(self.at).cloned() {
                Some(Directive::ShortCopy { task, bytes }) => {
                    self.shorts.push((task, bytes));
                    self.at += 1;
                }
                Some(Directive::Until { task, label, arg }) => {
                    if let Some((t, l, a)) = self.last {
                        if t == task && l == label && arg.is_none_or(|x| x == a) {
                            self.at += 1;
                            self.last = None;
                            continue;
                        }
                    }
                    if runnable.contains(&task) {
                        return Ok(task);
                    }
                    // Not runnable yet (a later phase, or blocked): let others run meanwhile.
                    return Ok(Self::fallback(runnable));
                }
                Some(Directive::Drain { task }) => {
                    if runnable.contains(&task) {
                        return Ok(task);
                    }
                    self.at += 1;
                }
                None => return Ok(Self::fallback(runnable)),
            }
        }
    }
    fn short_copy(&mut self, task: TaskId, _len: u32) -> Option<u32> {
        let i = self.shorts.iter().position(|(t, _)| *t == task)?;
        Some(self.shorts.remove(i).1)
    }
    fn observe(&mut self, task: TaskId, label: YieldPoint, arg: u64) {
        self.last = Some((task, label, arg));
    }
}

/// Everything a run produced.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub schedule: Vec<Choice>,
    pub trace: Vec<TraceStep>,
    /// The first failure is the finding; more may follow from it.
    pub failures: Vec<Failure>,
    /// Each workload operation's result, by operation index.
    pub results: Vec<Option<Result<u64, FsError>>>,
    /// File contents read back after sync and dropping the page cache.
    pub files: Vec<Vec<u8>>,
    pub device_log: Vec<DeviceRecord>,
    pub steps: u64,
    /// What the model noticed going wrong (stale mappings used, dirty folios dropped).
    pub notes: Vec<String>,
    /// The files at the start, every effect and every persistence point: what a crash
    /// state of the run is judged against.
    pub history: crate::oracle::History,
}

impl RunResult {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Run `workload` under `policy` on a fresh in-memory device and check it.
pub fn run(cfg: &Config, workload: &Workload, policy: &mut dyn Policy) -> RunResult {
    run_on_device(
        cfg,
        workload,
        Box::new(MemDevice::new(cfg.device_blocks)),
        policy,
    )
}

/// Run on a device of the caller's (nbd-server's emulated disk, whose recorder then keeps
/// the write log). The device must read as zeros where nothing was written.
pub fn run_on_device(
    cfg: &Config,
    workload: &Workload,
    dev: Box<dyn crate::block::BlockDevice>,
    policy: &mut dyn Policy,
) -> RunResult {
    // A workload that fails `check` still gets a filesystem of bounded size; `run` then
    // reports it as a harness failure without running it.
    let fs = Fs::new(cfg.clone(), dev, workload.files.min(FILES_PER_WORKLOAD_MAX));
    Sim::new(fs, workload).run(policy).0
}

/// Run `workload` on a mounted filesystem (one that persists: see `ondisk::mount`) and hand
/// it back, synced, for the caller to unmount. The oracle starts from the files as mounted;
/// the workload's files are the inode slots (`workload.files` at most the inode count).
pub fn run_mounted(mut fs: Fs, workload: &Workload, policy: &mut dyn Policy) -> (RunResult, Fs) {
    let mut files = Vec::with_capacity(fs.inodes.len());
    let mut unreadable = None;
    for ino in 0..fs.inodes.len() {
        let data = fs.read_from_disk(ino).unwrap_or_else(|e| {
            unreadable.get_or_insert(format!("reading file {ino} at mount: {e}"));
            Vec::new()
        });
        let i = fs.inode(ino);
        files.push((i.in_use, i.generation, data));
    }
    let names = fs
        .dir
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.ino as usize))
        .collect();
    let mut sim = Sim::new(fs, workload);
    sim.oracle = Oracle::mounted(files, names);
    if let Some(what) = unreadable {
        sim.oracle.failures.push(Failure::Harness { what });
        return sim.finish();
    }
    if workload.files > sim.fs.inodes.len() {
        let what = format!(
            "the workload has {} files; the filesystem has {} inodes",
            workload.files,
            sim.fs.inodes.len()
        );
        sim.oracle.failures.push(Failure::Harness { what });
        return sim.finish();
    }
    sim.run(policy)
}

struct Sim<'w> {
    fs: Fs,
    oracle: Oracle,
    tasks: Vec<Task>,
    workload: &'w Workload,
    schedule: Vec<Choice>,
    trace: Vec<TraceStep>,
    results: Vec<Option<Result<u64, FsError>>>,
    steps: u64,
}

impl<'w> Sim<'w> {
    fn new(fs: Fs, workload: &'w Workload) -> Self {
        let n_ops = workload.ops().count();
        let tasks = vec![
            Task::background(Body::Completion(IoCompletion)),
            Task::background(Body::Flusher(Flusher::default())),
            Task::background(Body::Reclaim(Reclaim)),
        ];
        Sim {
            oracle: Oracle::new(workload.files.min(FILES_PER_WORKLOAD_MAX)),
            fs,
            tasks,
            workload,
            schedule: Vec::new(),
            trace: Vec::new(),
            results: vec![None; n_ops],
            steps: 0,
        }
    }

    fn step_task(&mut self, t: TaskId, short: Option<u32>) -> YieldPoint {
        let task = &mut self.tasks[t];
        let early = if task.started {
            None
        } else {
            task.begin(&mut self.fs, &mut self.oracle)
        };
        let step = match early {
            Some(step) => step,
            None => task.step(&mut Cx {
                fs: &mut self.fs,
                oracle: &mut self.oracle,
                me: t,
                op: task.op,
                short_copy: short,
            }),
        };
        self.steps += 1;
        let (label, arg) = match step {
            Step::Yield(l, a) => (l, a),
            Step::Done(l, a, r) => {
                task.end(&mut self.fs, &mut self.oracle);
                if let Some(slot) = self.results.get_mut(task.op as usize) {
                    *slot = Some(r);
                }
                (l, a)
            }
        };
        if let Err(e) = self.fs.after_step() {
            self.oracle.failures.push(Failure::Invariant {
                what: format!("a journal commit failed: {e}"),
            });
        }
        self.trace.push(TraceStep {
            task: t as u32,
            label,
            arg,
        });
        label
    }

    fn blocked_report(&self) -> Vec<String> {
        let ops: Vec<&Op> = self.workload.ops().collect();
        self.tasks
            .iter()
            .enumerate()
            .filter(|(_, t)| !t.done && t.op != u32::MAX)
            .map(|(i, t)| format!("task {i} ({}) is blocked", ops[t.op as usize]))
            .collect()
    }

    /// A task for each operation of `phase`, the first numbered `*op_index`. An operation
    /// that cannot run has its error as its result at once.
    fn spawn_phase(&mut self, phase: &[Op], op_index: &mut u32) {
        for op in phase {
            match task_for(op, self.workload.files) {
                Ok(body) => self.tasks.push(Task {
                    body,
                    op: *op_index,
                    done: false,
                    slot: data_slot(op),
                    started: false,
                }),
                Err(e) => {
                    self.results[*op_index as usize] = Some(Err(e));
                    // Keep task ids stable: a finished placeholder.
                    self.tasks.push(Task {
                        done: true,
                        op: *op_index,
                        ..Task::background(Body::Reclaim(Reclaim))
                    });
                }
            }
            *op_index += 1;
        }
    }

    fn run(mut self, policy: &mut dyn Policy) -> (RunResult, Fs) {
        if let Err(what) = self.workload.check() {
            self.oracle.failures.push(Failure::Harness { what });
            return self.finish();
        }
        let mut op_index = 0u32;
        let mut runnable = Vec::new();
        'phases: for phase in &self.workload.phases {
            let first = self.tasks.len();
            self.spawn_phase(phase, &mut op_index);
            // Tasks not yet done: background ones and this phase's (earlier phases are done).
            let mut live: Vec<TaskId> = (0..FIRST_OP_TASK).chain(first..self.tasks.len()).collect();
            while self.tasks[first..].iter().any(|t| !t.done) {
                live.retain(|&t| !self.tasks[t].done);
                runnable.clear();
                runnable.extend(
                    live.iter()
                        .copied()
                        .filter(|&t| self.tasks[t].runnable(&self.fs, t)),
                );
                if runnable.is_empty() {
                    let blocked = self.blocked_report();
                    self.oracle.failures.push(Failure::Deadlock { blocked });
                    break 'phases;
                }
                let t = match policy.pick(&runnable, self.steps) {
                    Ok(t) => t,
                    Err(e) => {
                        self.oracle.failures.push(Failure::Harness {
                            what: e.to_string(),
                        });
                        break 'phases;
                    }
                };
                let short = self.tasks[t]
                    .at_user_copy()
                    .and_then(|len| policy.short_copy(t, len));
                self.schedule.push(Choice {
                    t: t as u32,
                    s: short,
                });
                let label = self.step_task(t, short);
                policy.observe(t, label, self.trace.last().map_or(0, |s| s.arg));
                if self.steps > STEPS_PER_RUN_MAX {
                    self.oracle
                        .failures
                        .push(Failure::StepLimit { steps: self.steps });
                    break 'phases;
                }
            }
        }
        if self.oracle.failures.is_empty() {
            self.quiesce_and_check();
        }
        self.finish()
    }

    /// Run `t` (and IO completion) until `t` is done or idle; deterministic.
    fn drive(&mut self, t: TaskId, until_idle: bool) {
        loop {
            let done = self.tasks[t].done
                || (until_idle && !self.tasks[t].runnable(&self.fs, t) && !self.busy(t));
            if done && self.fs.ioends.is_empty() {
                return;
            }
            if self.steps > STEPS_PER_RUN_MAX {
                self.oracle
                    .failures
                    .push(Failure::StepLimit { steps: self.steps });
                return;
            }
            if !done && self.tasks[t].runnable(&self.fs, t) {
                self.step_task(t, None);
            } else if self.tasks[TASK_IO_COMPLETION].runnable(&self.fs, TASK_IO_COMPLETION) {
                self.step_task(TASK_IO_COMPLETION, None);
            } else {
                self.oracle.failures.push(Failure::Deadlock {
                    blocked: vec![format!("quiesce: task {t} cannot finish")],
                });
                return;
            }
        }
    }

    fn busy(&self, t: TaskId) -> bool {
        matches!(&self.tasks[t].body, Body::Flusher(f) if f.busy())
    }

    fn quiesce_and_check(&mut self) {
        // Let the flusher finish the pass it is in (its cached mapping may be stale: that is
        // a finding, not something to skip), and all IO complete.
        if self.busy(TASK_FLUSHER) {
            self.drive(TASK_FLUSHER, true);
        }
        self.drive(TASK_IO_COMPLETION, true);
        if !self.oracle.failures.is_empty() {
            return;
        }
        self.oracle.check_quiescent(&self.fs);
        // sync: a WB_SYNC_ALL pass per file, wait for all IO.
        for ino in 0..self.fs.inodes.len() {
            let t = self.tasks.len();
            self.tasks
                .push(Task::background(Body::Sync(WbPass::new(ino, true))));
            self.drive(t, false);
        }
        let dirty = self
            .fs
            .inodes
            .iter()
            .any(|i| i.cache.folios.values().any(|f| f.dirty || f.writeback));
        if dirty {
            self.oracle.failures.push(Failure::Invariant {
                what: "dirty or writeback folios remain after sync".into(),
            });
        }
        if self.oracle.failures.is_empty() {
            // Violations raised during quiesce and sync.
            for v in &self.fs.violations {
                self.oracle.failures.push(Failure::Invariant {
                    what: v.to_string(),
                });
            }
        }
        if let Err(e) = self.fs.log_force() {
            self.oracle.failures.push(Failure::Invariant {
                what: format!("the final sync's journal commit failed: {e}"),
            });
        }
        self.fs.drop_caches();
    }

    fn finish(mut self) -> (RunResult, Fs) {
        let mut files = Vec::new();
        for ino in 0..self.fs.inodes.len() {
            match self.fs.read_from_disk(ino) {
                Ok(data) => files.push(data),
                Err(e) => {
                    self.oracle.failures.push(Failure::Harness {
                        what: format!("reading file {ino}: {e}"),
                    });
                    files.push(Vec::new());
                }
            }
        }
        let checkable = !self.oracle.failures.iter().any(|f| {
            matches!(
                f,
                Failure::Deadlock { .. } | Failure::StepLimit { .. } | Failure::Harness { .. }
            )
        });
        if checkable {
            for (ino, data) in files.iter().enumerate() {
                self.oracle.check_durable(ino, data);
            }
            self.oracle.check_cached();
        }
        let history = self.oracle.history();
        let result = RunResult {
            schedule: self.schedule,
            trace: self.trace,
            failures: self.oracle.failures,
            results: self.results,
            files,
            device_log: self
                .fs
                .dev
                .write_log()
                .map(<[DeviceRecord]>::to_vec)
                .unwrap_or_default(),
            steps: self.steps,
            notes: std::mem::take(&mut self.fs.notes),
            history,
        };
        (result, self.fs)
    }
}

/// Convenience: the random policy for a seed, or PCT when `pct`.
pub fn seeded_policy(seed: u64, pct: bool) -> Box<dyn Policy> {
    if pct {
        Box::new(PctPolicy::new(seed, 3, 120))
    } else {
        Box::new(RandomPolicy::new(seed))
    }
}
