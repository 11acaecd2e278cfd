//! The engine: fs-core's scheduler for a caller whose operations arrive while it runs (an
//! NBD server whose export is a file of fs-core), where [`crate::sched::run`] takes a whole
//! workload up front.
//!
//! The caller submits [`Call`]s at any time; each becomes a task beside the background tasks
//! (IO completion, the flusher, reclaim), and [`Engine::step`] runs one step of a runnable
//! task chosen by the policy. A call is answered when its task completes ([`Engine::take_done`]).
//! Everything stays deterministic: the same calls submitted after the same steps, with the
//! same choices, give the same bytes; [`Engine::step_task`] runs a given task, which is how a
//! recorded session replays.
//!
//! Task ids are never reused (calls are numbered from [`FIRST_OP_TASK`] up), so a recorded
//! choice names one task for the whole session.

use std::collections::{BTreeMap, BTreeSet};

use crate::buffered_io::{ReadTask, WriteTask};
use crate::fs::{Fs, FsError, FILE_BYTES_MAX};
use crate::ops::{FsyncTask, RangeKind, RangeTask, TruncateTask};
use crate::oracle::{Failure, Oracle};
use crate::sched::{
    Body, Policy, Task, FIRST_OP_TASK, TASK_FLUSHER, TASK_IO_COMPLETION, TASK_RECLAIM,
};
use crate::step::{Cx, Step};
use crate::writeback::{Flusher, IoCompletion, Reclaim};
use crate::TaskId;

/// Calls in flight at once (the server bounds its requests far below this).
pub const CALLS_IN_FLIGHT_MAX: usize = 4096;

/// One operation a caller asks for. Byte ranges of punch and zero range are block-aligned;
/// reads and writes take any alignment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Read {
        ino: usize,
        offset: u64,
        len: u64,
    },
    Write {
        ino: usize,
        offset: u64,
        data: Vec<u8>,
    },
    Punch {
        ino: usize,
        offset: u64,
        len: u64,
    },
    ZeroRange {
        ino: usize,
        offset: u64,
        len: u64,
    },
    Fallocate {
        ino: usize,
        offset: u64,
        len: u64,
        keep_size: bool,
    },
    Truncate {
        ino: usize,
        size: u64,
    },
    Fsync {
        ino: usize,
    },
    Sync,
}

impl Call {
    /// The inode a data call works on (`Sync` names none).
    fn ino(&self) -> Option<usize> {
        match *self {
            Call::Read { ino, .. }
            | Call::Write { ino, .. }
            | Call::Punch { ino, .. }
            | Call::ZeroRange { ino, .. }
            | Call::Fallocate { ino, .. }
            | Call::Truncate { ino, .. }
            | Call::Fsync { ino } => Some(ino),
            Call::Sync => None,
        }
    }

    fn body(self) -> Result<Body, FsError> {
        Ok(match self {
            Call::Read { ino, offset, len } => {
                check_bytes(offset, len)?;
                Body::Read(ReadTask::collecting(ino, offset, len))
            }
            Call::Write { ino, offset, data } => {
                check_bytes(offset, data.len() as u64)?;
                Body::Write(WriteTask::new(ino, offset, data))
            }
            Call::Punch { ino, offset, len } => {
                Body::Range(RangeTask::new(RangeKind::Punch, ino, offset, len)?)
            }
            Call::ZeroRange { ino, offset, len } => {
                Body::Range(RangeTask::new(RangeKind::ZeroRange, ino, offset, len)?)
            }
            Call::Fallocate {
                ino,
                offset,
                len,
                keep_size,
            } => {
                let t = RangeTask::new(RangeKind::Fallocate, ino, offset, len)?;
                Body::Range(if keep_size { t.keeping_size() } else { t })
            }
            Call::Truncate { ino, size } => Body::Truncate(TruncateTask::new(ino, size)?),
            Call::Fsync { ino } => Body::Fsync(FsyncTask::new(ino)),
            Call::Sync => Body::Fsync(FsyncTask::sync()),
        })
    }
}

/// A read or write range must lie inside the largest file.
fn check_bytes(offset: u64, len: u64) -> Result<(), FsError> {
    match offset.checked_add(len) {
        Some(end) if end <= FILE_BYTES_MAX => Ok(()),
        _ => Err(FsError::FileTooBig),
    }
}

/// A call that completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    pub task: TaskId,
    pub result: Result<u64, FsError>,
    /// What a read copied out.
    pub data: Option<Vec<u8>>,
}

/// Why the engine cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error("no task can run, and calls {blocked:?} wait (a deadlock in the model)")]
    Deadlock { blocked: Vec<TaskId> },
    #[error("task {task} cannot run now (runnable: {runnable:?})")]
    NotRunnable { task: TaskId, runnable: Vec<TaskId> },
    #[error("more than {CALLS_IN_FLIGHT_MAX} calls in flight")]
    TooManyCalls,
    #[error("no file {0}")]
    NoSuchFile(usize),
}

/// The filesystem, its tasks and the policy that orders them.
pub struct Engine {
    fs: Fs,
    oracle: Oracle,
    tasks: BTreeMap<TaskId, Task>,
    /// Buffered writes that have not run yet, by inode: each can run exactly when its
    /// inode's lock is free ([`WriteTask::inode_lock_free`]), so [`Engine::runnable`] asks
    /// once per inode. Under a client's queue of writes to one file most tasks are here, and
    /// asking each of them at every step was a fifth of the engine's time.
    unstarted_writes: BTreeMap<usize, Vec<TaskId>>,
    /// Every other task (ids of `tasks` not in `unstarted_writes`).
    others: BTreeSet<TaskId>,
    next: TaskId,
    policy: Box<dyn Policy>,
    steps: u64,
    done: Vec<Done>,
    runnable: Vec<TaskId>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("tasks", &self.tasks.len())
            .field("next", &self.next)
            .field("steps", &self.steps)
            .finish()
    }
}

impl Engine {
    /// An engine over `fs` (mounted or in memory), checking reads against `oracle` (give it
    /// [`crate::oracle::Tracking::Off`] for a run with no end), choosing steps with `policy`.
    pub fn new(fs: Fs, oracle: Oracle, policy: Box<dyn Policy>) -> Self {
        let mut tasks = BTreeMap::new();
        tasks.insert(
            TASK_IO_COMPLETION,
            Task::background(Body::Completion(IoCompletion)),
        );
        tasks.insert(
            TASK_FLUSHER,
            Task::background(Body::Flusher(Flusher::default())),
        );
        tasks.insert(TASK_RECLAIM, Task::background(Body::Reclaim(Reclaim)));
        Engine {
            fs,
            oracle,
            others: tasks.keys().copied().collect(),
            tasks,
            unstarted_writes: BTreeMap::new(),
            next: FIRST_OP_TASK,
            policy,
            steps: 0,
            done: Vec::new(),
            runnable: Vec::new(),
        }
    }

    pub fn fs(&self) -> &Fs {
        &self.fs
    }

    pub fn fs_mut(&mut self) -> &mut Fs {
        &mut self.fs
    }

    /// What the oracle found wrong so far.
    pub fn failures(&self) -> &[Failure] {
        &self.oracle.failures
    }

    /// Steps run so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Calls submitted and not yet completed.
    pub fn calls_in_flight(&self) -> usize {
        self.tasks.len() - FIRST_OP_TASK
    }

    /// The id the next submitted call gets.
    pub fn next_task(&self) -> TaskId {
        self.next
    }

    /// Hands the filesystem back (tasks still in flight are dropped).
    pub fn into_fs(self) -> Fs {
        self.fs
    }

    /// Submits a call; it runs as the policy picks it. A call that cannot run at all (a
    /// range outside the largest file, punch not block-aligned) completes at once with its
    /// error, in [`Engine::take_done`].
    pub fn submit(&mut self, call: Call) -> Result<TaskId, EngineError> {
        if self.calls_in_flight() >= CALLS_IN_FLIGHT_MAX {
            return Err(EngineError::TooManyCalls);
        }
        let slot = call.ino();
        if let Some(ino) = slot.filter(|&i| i >= self.fs.inodes.len()) {
            return Err(EngineError::NoSuchFile(ino));
        }
        let id = self.next;
        self.next += 1;
        match call.body() {
            Ok(body) => {
                match (&body, slot) {
                    (Body::Write(_), Some(ino)) => {
                        self.unstarted_writes.entry(ino).or_default().push(id);
                    }
                    _ => {
                        self.others.insert(id);
                    }
                }
                let op = u32::try_from(id).unwrap_or(u32::MAX - 1);
                self.tasks.insert(
                    id,
                    Task {
                        body,
                        op,
                        done: false,
                        slot,
                        started: false,
                    },
                );
            }
            Err(e) => self.done.push(Done {
                task: id,
                result: Err(e),
                data: None,
            }),
        }
        Ok(id)
    }

    /// The tasks that can run now, sorted: those of them that would answer
    /// [`Task::runnable`] yes, found asking each unstarted write's inode once.
    pub fn runnable(&mut self) -> &[TaskId] {
        self.runnable.clear();
        for &t in &self.others {
            if self.tasks[&t].runnable(&self.fs, t) {
                self.runnable.push(t);
            }
        }
        let mut merged = false;
        for (&ino, writes) in &self.unstarted_writes {
            if WriteTask::inode_lock_free(&self.fs, ino) {
                self.runnable.extend_from_slice(writes);
                merged = true;
            }
        }
        if merged {
            self.runnable.sort_unstable();
        }
        &self.runnable
    }

    /// Task `t` is about to run: an unstarted write leaves [`Engine::unstarted_writes`].
    fn starting(&mut self, t: TaskId) {
        let task = &self.tasks[&t];
        if let (false, Body::Write(_), Some(ino)) = (task.started, &task.body, task.slot) {
            if let Some(writes) = self.unstarted_writes.get_mut(&ino) {
                writes.retain(|&w| w != t);
                if writes.is_empty() {
                    self.unstarted_writes.remove(&ino);
                }
            }
            self.others.insert(t);
        }
    }

    /// Runs one step of the task the policy picks; `Ok(None)` when no task can run and no
    /// call waits (the engine is idle until the next submit).
    pub fn step(&mut self) -> Result<Option<TaskId>, EngineError> {
        if self.runnable().is_empty() {
            let blocked: Vec<TaskId> = self.tasks.range(FIRST_OP_TASK..).map(|(&t, _)| t).collect();
            return if blocked.is_empty() {
                Ok(None)
            } else {
                Err(EngineError::Deadlock { blocked })
            };
        }
        let t = self
            .policy
            .pick(&self.runnable, self.steps)
            .expect("a random policy always picks");
        self.run_step(t);
        Ok(Some(t))
    }

    /// Runs one step of task `t`, which must be runnable (a recorded choice, replayed).
    pub fn step_task(&mut self, t: TaskId) -> Result<(), EngineError> {
        let ok = self
            .tasks
            .get(&t)
            .is_some_and(|task| task.runnable(&self.fs, t));
        if !ok {
            let runnable = self.runnable().to_vec();
            return Err(EngineError::NotRunnable { task: t, runnable });
        }
        self.run_step(t);
        Ok(())
    }

    /// Whether any task could run now.
    pub fn busy(&mut self) -> bool {
        !self.runnable().is_empty()
    }

    /// The calls completed since the last call of this.
    pub fn take_done(&mut self) -> Vec<Done> {
        std::mem::take(&mut self.done)
    }

    fn run_step(&mut self, t: TaskId) {
        self.starting(t);
        let task = self.tasks.get_mut(&t).expect("live task");
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
                short_copy: None,
            }),
        };
        self.steps += 1;
        if let Step::Done(_, _, result) = step {
            self.finish(t, result);
        }
        if let Err(e) = self.fs.after_step() {
            self.oracle.failures.push(Failure::Invariant {
                what: format!("a journal commit failed: {e}"),
            });
        }
    }

    fn finish(&mut self, t: TaskId, result: Result<u64, FsError>) {
        let mut task = self.tasks.remove(&t).expect("live task");
        self.others.remove(&t);
        task.end(&mut self.fs, &mut self.oracle);
        let data = match &mut task.body {
            Body::Read(r) => r.take_data(),
            _ => None,
        };
        self.done.push(Done {
            task: t,
            result,
            data,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::MemDevice;
    use crate::oracle::Tracking;
    use crate::sched::RandomPolicy;
    use crate::Config;

    fn engine(seed: u64, cfg: Config) -> Engine {
        let fs = Fs::new(cfg.clone(), Box::new(MemDevice::new(cfg.device_blocks)), 1);
        Engine::new(fs, Oracle::new(1), Box::new(RandomPolicy::new(seed)))
    }

    /// Runs until every call completed; returns them by task id.
    fn drain(e: &mut Engine) -> BTreeMap<TaskId, Done> {
        let mut out = BTreeMap::new();
        while e.step().unwrap().is_some() {
            for d in e.take_done() {
                out.insert(d.task, d);
            }
        }
        out
    }

    #[test]
    fn concurrent_unaligned_writes_then_a_read_see_every_byte() {
        for seed in 0..20 {
            let mut e = engine(seed, Config::default());
            let a = e
                .submit(Call::Write {
                    ino: 0,
                    offset: 1000,
                    data: vec![b'a'; 6000],
                })
                .unwrap();
            let b = e
                .submit(Call::Write {
                    ino: 0,
                    offset: 9000,
                    data: vec![b'b'; 3000],
                })
                .unwrap();
            let done = drain(&mut e);
            assert_eq!(done[&a].result, Ok(6000));
            assert_eq!(done[&b].result, Ok(3000));
            let r = e
                .submit(Call::Read {
                    ino: 0,
                    offset: 0,
                    len: 12_000,
                })
                .unwrap();
            let done = drain(&mut e);
            let data = done[&r].data.clone().unwrap();
            assert_eq!(data.len(), 12_000);
            assert!(data[..1000].iter().all(|&x| x == 0));
            assert!(data[1000..7000].iter().all(|&x| x == b'a'));
            assert!(data[7000..9000].iter().all(|&x| x == 0));
            assert!(data[9000..].iter().all(|&x| x == b'b'));
            assert!(e.failures().is_empty(), "seed {seed}: {:?}", e.failures());
        }
    }

    /// What [`Engine::runnable`] must equal: every task asked.
    fn runnable_asking_every_task(e: &Engine) -> Vec<TaskId> {
        e.tasks
            .iter()
            .filter(|&(&t, task)| task.runnable(&e.fs, t))
            .map(|(&t, _)| t)
            .collect()
    }

    /// A seeded call on one of two files: mostly writes (which wait for their inode's lock
    /// before their first step), with reads, punches, truncates and fsyncs that take or wait
    /// for the same locks.
    fn random_call(rng: &mut impl rand::Rng) -> Call {
        let ino = rng.random_range(0..2);
        let offset = rng.random_range(0..64u64) * 1024;
        match rng.random_range(0..10) {
            0 => Call::Read {
                ino,
                offset,
                len: 9000,
            },
            1 => Call::Punch {
                ino,
                offset: offset / 4096 * 4096,
                len: 8192,
            },
            2 => Call::Truncate {
                ino,
                size: offset * 2,
            },
            3 => Call::Fsync { ino },
            _ => Call::Write {
                ino,
                offset,
                data: vec![rng.random(); rng.random_range(1..12_000)],
            },
        }
    }

    /// Asking each inode once for its unstarted writes gives the same runnable tasks, in the
    /// same order, as asking every task, at every step of seeded runs with calls arriving
    /// while others run, on a small page cache (reclaim) with the dirty limit and gfs2's
    /// glock on in some of them.
    #[test]
    fn the_runnable_tasks_are_what_asking_every_task_gives() {
        use rand::{Rng, SeedableRng};
        for seed in 0..40u64 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut cfg = Config {
                cache_limit_folios: 6,
                dirty_limit_folios: if seed % 2 == 0 { 4 } else { 0 },
                ..Config::default()
            };
            cfg.gfs2.write_glock = seed % 5 == 0;
            let fs = Fs::new(cfg.clone(), Box::new(MemDevice::new(cfg.device_blocks)), 2);
            let oracle = Oracle::new(2).tracking(Tracking::Off);
            let mut e = Engine::new(fs, oracle, Box::new(RandomPolicy::new(seed)));
            let (mut submitted, mut steps) = (0, 0u64);
            loop {
                while submitted < 60 && rng.random_range(0..3) == 0 {
                    e.submit(random_call(&mut rng)).unwrap();
                    submitted += 1;
                }
                let asked = runnable_asking_every_task(&e);
                assert_eq!(e.runnable(), asked.as_slice(), "seed {seed}, step {steps}");
                if e.step().unwrap().is_none() && submitted >= 60 {
                    break;
                }
                steps += 1;
            }
            assert!(steps > 200, "seed {seed}: only {steps} steps");
            assert!(e.unstarted_writes.is_empty() && e.others.len() == 3);
        }
    }

    #[test]
    fn replaying_the_choices_gives_the_same_steps() {
        let calls = || {
            (0..6u8).map(|i| Call::Write {
                ino: 0,
                offset: u64::from(i) * 2500,
                data: vec![i + 1; 3000],
            })
        };
        let mut live = engine(7, Config::default());
        let mut choices = Vec::new();
        for c in calls() {
            live.submit(c).unwrap();
        }
        while let Some(t) = live.step().unwrap() {
            choices.push(t);
        }
        let mut again = engine(99, Config::default());
        for c in calls() {
            again.submit(c).unwrap();
        }
        for &t in &choices {
            again.step_task(t).unwrap();
        }
        assert!(!again.busy());
        let read = |e: &mut Engine| e.fs_mut().read_from_disk(0).unwrap();
        live.fs_mut().drop_caches();
        again.fs_mut().drop_caches();
        assert_eq!(live.steps(), again.steps());
        assert_eq!(read(&mut live), read(&mut again));
    }

    #[test]
    fn bad_calls_complete_with_their_error_and_unknown_files_are_refused() {
        let mut e = engine(1, Config::default());
        let t = e
            .submit(Call::Punch {
                ino: 0,
                offset: 1,
                len: 4096,
            })
            .unwrap();
        let done = e.take_done();
        assert_eq!(done[0].task, t);
        assert!(matches!(done[0].result, Err(FsError::Invalid(_))));
        assert_eq!(
            e.submit(Call::Fsync { ino: 5 }),
            Err(EngineError::NoSuchFile(5))
        );
        let oracle_off = Oracle::new(1).tracking(Tracking::Off);
        let cfg = Config::default();
        let fs = Fs::new(cfg.clone(), Box::new(MemDevice::new(cfg.device_blocks)), 1);
        let mut e = Engine::new(fs, oracle_off, Box::new(RandomPolicy::new(3)));
        e.submit(Call::Write {
            ino: 0,
            offset: 0,
            data: vec![1; 100],
        })
        .unwrap();
        drain(&mut e);
        assert!(e.failures().is_empty());
    }
}
