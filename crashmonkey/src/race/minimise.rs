//! Minimisation of a failing race run by delta debugging: the run of a reproducer bundle
//! shrinks to fewer operations, shorter (and aligned) ranges, fewer preemptions and fewer
//! injected short copies, while it still fails **the same way** (the same failure signature,
//! `folder::signature`). The result is a bundle of its own, with a materialised schedule
//! that `crashmonkey race --replay` follows step for step.
//!
//! How a candidate runs: the current run's schedule is read as *slices* (a task and the
//! count of its own steps it has taken when the slice ends). A [`GuidedPolicy`] follows the
//! slices by each task's progress, not by the global step number, so a slice whose task has
//! already gone that far, or cannot run, is passed over; past the last slice it never
//! preempts (the task that ran last goes on while it can). So removing an operation removes
//! its task's slices, and removing a slice lets the task before it keep running: a
//! preemption less. A candidate is kept only if its run fails with the original signature
//! and is smaller by [`RunSize::key`]; its own run (schedule included) becomes the current
//! one, so every kept step is an exact, replayable run.
//!
//! The passes, repeated until none shrinks the run (at most [`MINIMISE_ROUNDS_MAX`] rounds):
//! ddmin over the operations; each operation's length, then offset (or size), toward the
//! smallest and 4096-aligned values; ddmin over the slices (the empty plan first: no
//! preemption at all); ddmin over the short copies. All of it is bounded by
//! [`MINIMISE_RUNS_MAX`] runs and [`MINIMISE_STEPS_MAX`] steps, and deterministic: the same
//! bundle gives the same result.

use super::repro::{Bundle, BUNDLE_VERSION};
use crate::folder::signature::race_signature;
use anyhow::Context;
use fs_core::sched::{self, Policy, PolicyError, RecordedStep, ReplayPolicy, FIRST_OP_TASK};
use fs_core::{Choice, Config, Op, RunResult, TaskId, Workload, YieldPoint};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Runs (candidate replays) one minimisation may make. A run of a generated workload costs
/// 50 to 200 µs in release builds: the bound is a few seconds of work at most.
pub const MINIMISE_RUNS_MAX: u64 = 20_000;
/// Model steps all the candidate runs of one minimisation may take together: what bounds
/// the work when each run is long (a livelock runs to `STEPS_PER_RUN_MAX`, 200,000 steps,
/// every time), where [`MINIMISE_RUNS_MAX`] alone would allow hours.
pub const MINIMISE_STEPS_MAX: u64 = 20_000_000;
/// Rounds of all the passes; a round that shrinks nothing ends the minimisation earlier.
pub const MINIMISE_ROUNDS_MAX: u32 = 8;
/// Lengths and offsets are moved toward multiples of this (the model's block and folio).
pub const ALIGN_BYTES: u64 = 4096;
/// Format version of `minimise.json`.
pub const MINIMISE_VERSION: u32 = 1;
/// The file a minimised bundle holds beside `bundle.json`: what minimisation did.
pub const MINIMISE_FILE: &str = "minimise.json";

/// Why a run could not be minimised.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MinimiseError {
    #[error(
        "the run does not fail when replayed (it passes the oracle): there is nothing to \
         minimise; minimisation takes a failing run's bundle"
    )]
    DoesNotFail,
    #[error(
        "the replayed run fails as {replayed:?}, not as its bundle records ({recorded:?}): \
         the bundle does not reproduce what it says"
    )]
    Differs { recorded: String, replayed: String },
}

/// How big a run is: what minimisation shrinks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSize {
    /// Workload operations.
    pub ops: u64,
    /// The operations' lengths summed (`len`, and a truncate's `size`), in bytes.
    pub bytes: u64,
    /// Context switches away from a task that could have gone on running.
    pub preemptions: u64,
    /// Short user copies injected by the schedule.
    pub short_copies: u64,
    /// Steps of the materialised schedule (the scheduler's choices).
    pub schedule_steps: u64,
    /// Every step of the run, the final quiesce and sync included (`smallest_steps`' unit).
    pub steps: u64,
    /// The operations' offsets summed, in bytes.
    pub offsets: u64,
}

impl RunSize {
    /// The order in which a candidate must be smaller than the current run to be kept.
    pub fn key(&self) -> (u64, u64, u64, u64, u64, u64) {
        (
            self.ops,
            self.bytes,
            self.preemptions,
            self.short_copies,
            self.offsets,
            self.schedule_steps,
        )
    }
}

/// What `minimise.json` holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MinimiseReport {
    pub version: u32,
    /// The seed of the run minimised (the bundle's `seed`, kept by the minimised bundle).
    pub seed: u64,
    /// The failure signature both runs have.
    pub signature: String,
    /// Candidate runs made.
    pub runs: u64,
    pub before: RunSize,
    pub after: RunSize,
}

/// A minimised run: its bundle and the report.
#[derive(Clone, Debug)]
pub struct Minimised {
    pub bundle: Bundle,
    pub result: RunResult,
    pub report: MinimiseReport,
}

/// The length-like field of an operation (`len`, a truncate's `size`).
fn len_of(op: &Op) -> Option<u64> {
    match *op {
        Op::Write { len, .. }
        | Op::Read { len, .. }
        | Op::MmapStore { len, .. }
        | Op::DirectWrite { len, .. }
        | Op::Fallocate { len, .. }
        | Op::PunchHole { len, .. }
        | Op::ZeroRange { len, .. }
        | Op::FallocateKeepSize { len, .. } => Some(len),
        Op::Truncate { size, .. } => Some(size),
        _ => None,
    }
}

fn offset_of(op: &Op) -> Option<u64> {
    match *op {
        Op::Write { offset, .. }
        | Op::Read { offset, .. }
        | Op::MmapStore { offset, .. }
        | Op::DirectWrite { offset, .. }
        | Op::Fallocate { offset, .. }
        | Op::PunchHole { offset, .. }
        | Op::ZeroRange { offset, .. }
        | Op::FallocateKeepSize { offset, .. } => Some(offset),
        _ => None,
    }
}

/// Which of an operation's numbers a candidate changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Len,
    Offset,
    /// The length, cut from the front: the range keeps its end.
    Front,
}

fn with_field(op: &Op, field: Field, v: u64) -> Op {
    if field == Field::Front {
        let (Some(offset), Some(len)) = (offset_of(op), len_of(op)) else {
            return op.clone();
        };
        let op = with_field(op, Field::Offset, (offset + len).saturating_sub(v));
        return with_field(&op, Field::Len, v);
    }
    let mut op = op.clone();
    match (&mut op, field) {
        (
            Op::Write { len, .. }
            | Op::Read { len, .. }
            | Op::MmapStore { len, .. }
            | Op::DirectWrite { len, .. }
            | Op::Fallocate { len, .. }
            | Op::PunchHole { len, .. }
            | Op::ZeroRange { len, .. }
            | Op::FallocateKeepSize { len, .. }
            | Op::Truncate { size: len, .. },
            Field::Len,
        )
        | (
            Op::Write { offset: len, .. }
            | Op::Read { offset: len, .. }
            | Op::MmapStore { offset: len, .. }
            | Op::DirectWrite { offset: len, .. }
            | Op::Fallocate { offset: len, .. }
            | Op::PunchHole { offset: len, .. }
            | Op::ZeroRange { offset: len, .. }
            | Op::FallocateKeepSize { offset: len, .. },
            Field::Offset,
        ) => *len = v,
        _ => {}
    }
    op
}

/// Ranges the model refuses unless block-aligned (punch hole, zero range, fallocate with
/// KEEP_SIZE, direct write): their candidates stay multiples of [`ALIGN_BYTES`].
fn aligned_only(op: &Op) -> bool {
    matches!(
        op,
        Op::PunchHole { .. }
            | Op::ZeroRange { .. }
            | Op::FallocateKeepSize { .. }
            | Op::DirectWrite { .. }
    )
}

/// The values tried for `field` of `op` (now `x`), smallest first, each below `x`.
fn candidates(op: &Op, field: Field, x: u64) -> Vec<u64> {
    let g = if aligned_only(op) { ALIGN_BYTES } else { 1 };
    let min = match (field, op) {
        (Field::Offset, _) | (Field::Len, Op::Truncate { .. }) => 0,
        (Field::Len | Field::Front, _) => g,
    };
    let down = |v: u64, to: u64| v - v % to;
    let mut v = vec![
        min,
        down(x / 2, g).max(min),
        down(x.saturating_sub(ALIGN_BYTES), g).max(min),
        down(x, ALIGN_BYTES).max(min),
    ];
    if let (Field::Front, Some(offset)) = (field, offset_of(op)) {
        // The length that starts the range at the next aligned offset.
        let start = offset.div_ceil(ALIGN_BYTES) * ALIGN_BYTES;
        v.push((offset + x).saturating_sub(start).max(min));
    }
    v.retain(|&c| c < x);
    v.sort_unstable();
    v.dedup();
    v
}

/// The size of `w` run as `r`, with `preemptions` counted during the run.
fn size_of(w: &Workload, r: &RunResult, preemptions: u64) -> RunSize {
    RunSize {
        ops: w.ops().count() as u64,
        bytes: w.ops().filter_map(len_of).sum(),
        preemptions,
        short_copies: r.schedule.iter().filter(|c| c.s.is_some()).count() as u64,
        schedule_steps: r.schedule.len() as u64,
        steps: r.steps,
        offsets: w.ops().filter_map(offset_of).sum(),
    }
}

/// A task's run of consecutive steps: it runs until it has taken `until` steps in all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slice {
    task: u32,
    until: u64,
}

/// A schedule as slices, and its short copies by (task, the task's own step number).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Plan {
    slices: Vec<Slice>,
    shorts: BTreeMap<(u32, u64), u32>,
}

impl Plan {
    fn of(schedule: &[Choice]) -> Plan {
        let mut taken: BTreeMap<u32, u64> = BTreeMap::new();
        let mut plan = Plan::default();
        for c in schedule {
            let k = taken.entry(c.t).or_default();
            if let Some(s) = c.s {
                plan.shorts.insert((c.t, *k), s);
            }
            *k += 1;
            plan.push(Slice {
                task: c.t,
                until: *k,
            });
        }
        plan
    }

    /// Appends a slice, merged into the last one when it is the same task's.
    fn push(&mut self, s: Slice) {
        match self.slices.last_mut() {
            Some(l) if l.task == s.task => l.until = l.until.max(s.until),
            _ => self.slices.push(s),
        }
    }

    /// The plan of the workload that keeps only operations `kept` (ascending indices):
    /// the others' slices and short copies go, later operations' tasks are renumbered. The
    /// slices of a removed operation in `to_flusher` go to the flusher instead: the
    /// background writeback that does what a removed fsync did, at the same points.
    fn keeping(&self, kept: &[usize], to_flusher: &dyn Fn(usize) -> bool) -> Plan {
        let first = FIRST_OP_TASK as u32;
        let new_task = |t: u32| -> Option<u32> {
            if t < first {
                return Some(t);
            }
            let op = (t - first) as usize;
            match kept.binary_search(&op) {
                Ok(i) => Some(first + i as u32),
                Err(_) if to_flusher(op) => Some(sched::TASK_FLUSHER as u32),
                Err(_) => None,
            }
        };
        // Each task's steps are counted again: a slice moved to the flusher adds its
        // length to the flusher's count.
        let mut was: BTreeMap<u32, u64> = BTreeMap::new();
        let mut now: BTreeMap<u32, u64> = BTreeMap::new();
        let mut plan = Plan::default();
        for s in &self.slices {
            let len = s.until - was.get(&s.task).copied().unwrap_or(0);
            was.insert(s.task, s.until);
            if let Some(task) = new_task(s.task) {
                let until = now.entry(task).or_default();
                *until += len;
                plan.push(Slice {
                    task,
                    until: *until,
                });
            }
        }
        for (&(t, k), &s) in &self.shorts {
            if let Some(t) = new_task(t) {
                plan.shorts.insert((t, k), s);
            }
        }
        plan
    }

    fn with_slices(&self, slices: &[Slice]) -> Plan {
        let mut plan = Plan {
            slices: Vec::new(),
            shorts: self.shorts.clone(),
        };
        for s in slices {
            plan.push(*s);
        }
        plan
    }
}

/// Follows a [`Plan`] by each task's own progress, and never preempts past its end.
struct GuidedPolicy<'p> {
    plan: &'p Plan,
    at: usize,
    taken: BTreeMap<TaskId, u64>,
    last: Option<TaskId>,
    pending_short: Option<u32>,
    /// Picks that switched away from a task that could have gone on.
    preemptions: u64,
}

impl<'p> GuidedPolicy<'p> {
    fn new(plan: &'p Plan) -> Self {
        GuidedPolicy {
            plan,
            at: 0,
            taken: BTreeMap::new(),
            last: None,
            pending_short: None,
            preemptions: 0,
        }
    }

    fn choose(&mut self, runnable: &[TaskId]) -> TaskId {
        while let Some(s) = self.plan.slices.get(self.at) {
            let t = s.task as TaskId;
            let taken = self.taken.get(&t).copied().unwrap_or(0);
            if taken < s.until && runnable.contains(&t) {
                return t;
            }
            self.at += 1;
        }
        match self.last {
            Some(l) if runnable.contains(&l) => l,
            _ => *runnable
                .iter()
                .find(|&&t| t >= FIRST_OP_TASK)
                .unwrap_or(&runnable[0]),
        }
    }
}

impl Policy for GuidedPolicy<'_> {
    fn pick(&mut self, runnable: &[TaskId], _step: u64) -> Result<TaskId, PolicyError> {
        let t = self.choose(runnable);
        if self.last.is_some_and(|l| l != t && runnable.contains(&l)) {
            self.preemptions += 1;
        }
        self.last = Some(t);
        let k = self.taken.entry(t).or_default();
        self.pending_short = self.plan.shorts.get(&(t as u32, *k)).copied();
        *k += 1;
        Ok(t)
    }
    fn short_copy(&mut self, _task: TaskId, _len: u32) -> Option<u32> {
        self.pending_short.take()
    }
}

/// A policy that counts the preemptions of another.
struct Counting<P> {
    inner: P,
    last: Option<TaskId>,
    preemptions: u64,
}

impl<P: Policy> Policy for Counting<P> {
    fn pick(&mut self, runnable: &[TaskId], step: u64) -> Result<TaskId, PolicyError> {
        let t = self.inner.pick(runnable, step)?;
        if self.last.is_some_and(|l| l != t && runnable.contains(&l)) {
            self.preemptions += 1;
        }
        self.last = Some(t);
        Ok(t)
    }
    fn short_copy(&mut self, task: TaskId, len: u32) -> Option<u32> {
        self.inner.short_copy(task, len)
    }
    fn observe(&mut self, task: TaskId, label: YieldPoint, arg: u64) {
        self.inner.observe(task, label, arg);
    }
}

/// The run as minimisation stands: a workload, its exact run, its size.
#[derive(Clone, Debug)]
struct Current {
    workload: Workload,
    result: RunResult,
    size: RunSize,
}

impl Current {
    fn plan(&self) -> Plan {
        Plan::of(&self.result.schedule)
    }
}

/// Candidate runs and the budget for them.
struct Trial<'a> {
    cfg: &'a Config,
    signature: String,
    runs: u64,
    runs_max: u64,
    /// Model steps the candidate runs took.
    steps: u64,
    progress: &'a mut dyn FnMut(u64, &RunSize),
}

impl Trial<'_> {
    fn exhausted(&self) -> bool {
        self.runs >= self.runs_max || self.steps >= MINIMISE_STEPS_MAX
    }

    /// Runs `workload` along `plan`; it replaces `cur` if it fails the same way and is
    /// smaller. Returns whether it did.
    fn attempt(&mut self, cur: &mut Current, workload: Workload, plan: &Plan) -> bool {
        if self.exhausted() || workload.phases.is_empty() {
            return false;
        }
        self.runs += 1;
        let mut policy = GuidedPolicy::new(plan);
        let result = sched::run(self.cfg, &workload, &mut policy);
        self.steps += result.steps;
        let same = result
            .failures
            .first()
            .is_some_and(|f| race_signature(self.cfg, f, &workload) == self.signature);
        let size = size_of(&workload, &result, policy.preemptions);
        let kept = same && size.key() < cur.size.key();
        if kept {
            *cur = Current {
                workload,
                result,
                size,
            };
        }
        (self.progress)(self.runs, &cur.size);
        kept
    }
}

/// Delta debugging (ddmin, Zeller and Hildebrandt 2002): the smallest sublist of `items` the
/// test accepts that it could find, removing chunks (complements) before keeping one chunk
/// alone. `test` is never called with the whole list; `try_empty` tries the empty list first.
pub(crate) fn ddmin<T: Clone>(
    items: Vec<T>,
    try_empty: bool,
    test: &mut dyn FnMut(&[T]) -> bool,
) -> Vec<T> {
    if try_empty && !items.is_empty() && test(&[]) {
        return Vec::new();
    }
    let mut cur = items;
    let mut n = 2usize;
    while cur.len() >= 2 {
        let chunk = cur.len().div_ceil(n);
        let parts: Vec<Vec<T>> = cur.chunks(chunk).map(<[T]>::to_vec).collect();
        let mut next = None;
        for i in 0..parts.len() {
            let rest: Vec<T> = (0..parts.len())
                .filter(|&j| j != i)
                .flat_map(|j| parts[j].iter().cloned())
                .collect();
            if test(&rest) {
                next = Some((rest, n.saturating_sub(1).max(2)));
                break;
            }
        }
        if next.is_none() && parts.len() > 2 {
            next = parts.iter().find(|p| test(p)).map(|p| (p.clone(), 2));
        }
        match next {
            Some((c, m)) => (cur, n) = (c, m),
            None if n >= cur.len() => break,
            None => n = (n * 2).min(cur.len()),
        }
    }
    if cur.len() == 1 && try_empty && test(&[]) {
        cur.clear();
    }
    cur
}

/// The workload that keeps operations `kept` (ascending indices), empty phases dropped.
fn keep_ops(w: &Workload, kept: &[usize]) -> Workload {
    let mut i = 0;
    let mut phases = Vec::new();
    for phase in &w.phases {
        let mut p = Vec::new();
        for op in phase {
            if kept.binary_search(&i).is_ok() {
                p.push(op.clone());
            }
            i += 1;
        }
        if !p.is_empty() {
            phases.push(p);
        }
    }
    Workload {
        files: w.files,
        phases,
    }
}

/// Operations whose work the flusher can take over when they are removed.
fn syncs(op: &Op) -> bool {
    matches!(op, Op::Fsync { .. } | Op::Fdatasync { .. } | Op::Sync)
}

/// ddmin over the operations. A candidate runs along the plan without the removed
/// operations' slices; if it does not fail the same way and it removed a sync, it runs again
/// with the syncs' slices given to the flusher.
fn pass_ops(t: &mut Trial<'_>, cur: &mut Current) {
    let start = cur.clone();
    let plan = start.plan();
    let ops: Vec<Op> = start.workload.ops().cloned().collect();
    let all: Vec<usize> = (0..ops.len()).collect();
    let to_flusher = |i: usize| syncs(&ops[i]);
    ddmin(all, false, &mut |kept| {
        let w = keep_ops(&start.workload, kept);
        if t.attempt(cur, w.clone(), &plan.keeping(kept, &|_| false)) {
            return true;
        }
        let removed_sync =
            (0..ops.len()).any(|i| kept.binary_search(&i).is_err() && syncs(&ops[i]));
        removed_sync && t.attempt(cur, w, &plan.keeping(kept, &to_flusher))
    });
}

/// Each operation's length, then its offset, toward the smallest and aligned values.
fn pass_ranges(t: &mut Trial<'_>, cur: &mut Current) {
    let n = cur.workload.ops().count();
    for i in 0..n {
        for field in [Field::Len, Field::Front, Field::Offset] {
            shrink_field(t, cur, i, field);
        }
    }
}

fn field_of(op: &Op, field: Field) -> Option<u64> {
    match field {
        Field::Len => len_of(op),
        Field::Front => offset_of(op).and(len_of(op)),
        Field::Offset => offset_of(op),
    }
}

/// Tries `field` of operation `i` at `v`, along the current run's plan.
fn try_value(t: &mut Trial<'_>, cur: &mut Current, i: usize, field: Field, v: u64) -> bool {
    let op = cur.workload.ops().nth(i).expect("op i").clone();
    let w = replace_op(&cur.workload, i, with_field(&op, field, v));
    let plan = cur.plan();
    t.attempt(cur, w, &plan)
}

/// Shrinks `field` of operation `i`: the [`candidates`] smallest first while one is kept,
/// then a bisection between the largest refused candidate and the value kept (a write
/// must still reach the folio the race is in: 6293 bytes become 4097, not 4096).
fn shrink_field(t: &mut Trial<'_>, cur: &mut Current, i: usize, field: Field) {
    let value = |cur: &Current| cur.workload.ops().nth(i).and_then(|op| field_of(op, field));
    let mut refused = None;
    while let Some(x) = value(cur) {
        let op = cur.workload.ops().nth(i).expect("op i").clone();
        let mut kept = false;
        for v in candidates(&op, field, x) {
            if t.exhausted() {
                return;
            }
            if try_value(t, cur, i, field, v) {
                kept = true;
                break;
            }
            refused = Some(refused.map_or(v, |r: u64| r.max(v)));
        }
        if !kept {
            break;
        }
    }
    let g = match cur.workload.ops().nth(i) {
        Some(op) if aligned_only(op) => ALIGN_BYTES,
        _ => 1,
    };
    let (Some(mut lo), Some(mut hi)) = (refused, value(cur)) else {
        return;
    };
    while hi > lo + g && !t.exhausted() {
        let mid = lo + ((hi - lo) / 2).div_ceil(g) * g;
        if mid >= hi {
            break;
        }
        if try_value(t, cur, i, field, mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
}

fn replace_op(w: &Workload, i: usize, new: Op) -> Workload {
    let mut w = w.clone();
    if let Some(op) = w.phases.iter_mut().flatten().nth(i) {
        *op = new;
    }
    w
}

/// ddmin over the schedule's slices: fewer preemptions.
fn pass_slices(t: &mut Trial<'_>, cur: &mut Current) {
    let start = cur.clone();
    let plan = start.plan();
    ddmin(plan.slices.clone(), true, &mut |slices| {
        t.attempt(cur, start.workload.clone(), &plan.with_slices(slices))
    });
}

/// ddmin over the injected short copies.
fn pass_shorts(t: &mut Trial<'_>, cur: &mut Current) {
    let start = cur.clone();
    let plan = start.plan();
    let shorts: Vec<((u32, u64), u32)> = plan.shorts.clone().into_iter().collect();
    ddmin(shorts, true, &mut |kept| {
        let p = Plan {
            slices: plan.slices.clone(),
            shorts: kept.iter().copied().collect(),
        };
        t.attempt(cur, start.workload.clone(), &p)
    });
}

/// Replays `b` exactly and checks that it fails as it records: the starting point.
fn replay_original(b: &Bundle) -> Result<(Current, String), MinimiseError> {
    let mut policy = Counting {
        inner: ReplayPolicy::new(b.schedule.clone(), true),
        last: None,
        preemptions: 0,
    };
    let result = sched::run(&b.config, &b.workload, &mut policy);
    let sig = |f: Option<&fs_core::Failure>| f.map(|f| race_signature(&b.config, f, &b.workload));
    let Some(signature) = sig(result.failures.first()) else {
        return Err(MinimiseError::DoesNotFail);
    };
    if sig(b.failures.first()).as_deref() != Some(signature.as_str()) {
        return Err(MinimiseError::Differs {
            recorded: sig(b.failures.first()).unwrap_or_else(|| "no failure".into()),
            replayed: signature,
        });
    }
    let size = size_of(&b.workload, &result, policy.preemptions);
    let cur = Current {
        workload: b.workload.clone(),
        result,
        size,
    };
    Ok((cur, signature))
}

/// Minimises the failing run of bundle `b` within `runs_max` candidate runs; `progress`
/// hears the runs made and the current size after each.
pub fn minimise(
    b: &Bundle,
    runs_max: u64,
    progress: &mut dyn FnMut(u64, &RunSize),
) -> Result<Minimised, MinimiseError> {
    let (mut cur, signature) = replay_original(b)?;
    let before = cur.size;
    let mut t = Trial {
        cfg: &b.config,
        signature,
        runs: 0,
        runs_max,
        steps: 0,
        progress,
    };
    for _ in 0..MINIMISE_ROUNDS_MAX {
        let was = cur.size;
        pass_ops(&mut t, &mut cur);
        pass_ranges(&mut t, &mut cur);
        pass_slices(&mut t, &mut cur);
        pass_shorts(&mut t, &mut cur);
        if cur.size == was || t.exhausted() {
            break;
        }
    }
    let bundle = Bundle {
        version: BUNDLE_VERSION,
        seed: b.seed,
        config: b.config.clone(),
        workload: cur.workload.clone(),
        schedule: cur.result.schedule.clone(),
        trace: cur.result.trace.iter().map(RecordedStep::from).collect(),
        failures: cur.result.failures.clone(),
    };
    let report = MinimiseReport {
        version: MINIMISE_VERSION,
        seed: b.seed,
        signature: t.signature,
        runs: t.runs,
        before,
        after: cur.size,
    };
    Ok(Minimised {
        bundle,
        result: cur.result,
        report,
    })
}

/// What minimisation removed, in words: one line per measure, before -> after.
pub fn summary_text(r: &MinimiseReport) -> String {
    let (b, a) = (&r.before, &r.after);
    let line = |what: &str, x: u64, y: u64| {
        format!(
            "  {what:<13} {x:>7} -> {y:<7} ({} removed)\n",
            x.saturating_sub(y)
        )
    };
    let mut s = format!(
        "minimised the run of seed {} in {} runs, still failing as {}:\n",
        r.seed, r.runs, r.signature
    );
    s += &line("operations", b.ops, a.ops);
    s += &line("bytes", b.bytes, a.bytes);
    s += &line("preemptions", b.preemptions, a.preemptions);
    s += &line("short copies", b.short_copies, a.short_copies);
    s += &line("steps", b.schedule_steps, a.schedule_steps);
    s
}

/// The minimised run as a campaign's run outcome (for the bundle writer and its report).
fn outcome(m: &Minimised) -> super::RunOutcome {
    super::RunOutcome {
        seed: m.bundle.seed,
        generated: super::workload::Generated {
            workload: m.bundle.workload.clone(),
            cache_limit_folios: m.bundle.config.cache_limit_folios,
            policy: super::PolicyKind::Random,
            policy_seed: 0,
        },
        cfg: m.bundle.config.clone(),
        result: m.result.clone(),
    }
}

/// Writes `m` as a bundle folder at `target`, which must not exist: built in a temporary
/// folder beside it, then renamed to it with no replacing (`RENAME_NOREPLACE`), so a
/// folder is either whole or not there, and nothing a user has is ever overwritten.
pub fn write_minimised(target: &Path, m: &Minimised) -> anyhow::Result<()> {
    anyhow::ensure!(
        std::fs::symlink_metadata(target).is_err(),
        "{} exists: minimisation never replaces a file; give another output (-o)",
        target.display()
    );
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".minimise-")
        .tempdir_in(parent)
        .with_context(|| format!("making a temporary folder in {}", parent.display()))?;
    let o = outcome(m);
    let report = format!(
        "{}\n{}",
        summary_text(&m.report),
        super::describe_failure(&o).replacen("(Random policy", "(minimised schedule", 1)
    );
    super::repro::write_bundle_files(tmp.path(), target, &o, &report)?;
    let json = serde_json::to_string_pretty(&m.report)?;
    let file = tmp.path().join(MINIMISE_FILE);
    std::fs::write(&file, json).with_context(|| format!("writing {}", file.display()))?;
    for name in ["bundle.json", MINIMISE_FILE] {
        let p = tmp.path().join(name);
        std::fs::File::open(&p)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", p.display()))?;
    }
    crate::checker::sys::rename_noreplace(tmp.path(), target)
        .with_context(|| format!("renaming {} to {}", tmp.path().display(), target.display()))?;
    // Renamed: nothing is left for the guard to remove.
    let _ = tmp.keep();
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", parent.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ddmin finds the one-minimal pair a test needs, whatever else the list holds.
    #[test]
    fn ddmin_finds_a_minimal_sublist() {
        let items: Vec<u32> = (0..20).collect();
        let mut calls = 0;
        let got = ddmin(items, false, &mut |s| {
            calls += 1;
            s.contains(&3) && s.contains(&17)
        });
        assert_eq!(got, vec![3, 17]);
        assert!(calls < 100, "{calls}");
        let got = ddmin(vec![1, 2, 3], true, &mut |_| true);
        assert!(got.is_empty());
    }

    #[test]
    fn plans_follow_tasks_and_renumber_on_removal() {
        let c = |t| Choice { t, s: None };
        let mut sched = vec![c(3), c(3), c(4), c(0), c(3), c(5)];
        sched[4].s = Some(7);
        let p = Plan::of(&sched);
        assert_eq!(p.slices.len(), 5);
        assert_eq!(p.shorts.get(&(3, 2)), Some(&7));
        // Without op 1 (task 4): task 5 becomes 4; op 0's slices around task 4 stay apart
        // because task 0 ran between them.
        let q = p.keeping(&[0, 2], &|_| false);
        let tasks: Vec<u32> = q.slices.iter().map(|s| s.task).collect();
        assert_eq!(tasks, vec![3, 0, 3, 4]);
        assert_eq!(q.slices[0].until, 2);
        assert_eq!(q.slices[2].until, 3);
        // Op 1's slice given to the flusher (task 1) instead.
        let r = p.keeping(&[0, 2], &|op| op == 1);
        let tasks: Vec<(u32, u64)> = r.slices.iter().map(|s| (s.task, s.until)).collect();
        assert_eq!(tasks, vec![(3, 2), (1, 1), (0, 1), (3, 3), (4, 1)]);
    }

    #[test]
    fn candidates_are_smaller_and_aligned_where_needed() {
        let w = Op::Write {
            file: 0,
            offset: 7839,
            len: 6293,
            byte: b'A',
        };
        assert_eq!(candidates(&w, Field::Len, 6293), vec![1, 2197, 3146, 4096]);
        assert_eq!(
            candidates(&w, Field::Offset, 7839),
            vec![0, 3743, 3919, 4096]
        );
        let p = Op::PunchHole {
            file: 0,
            offset: 8192,
            len: 12288,
        };
        assert_eq!(candidates(&p, Field::Len, 12288), vec![4096, 8192]);
        let moved = Op::PunchHole {
            file: 0,
            offset: 0,
            len: 12288,
        };
        assert_eq!(with_field(&p, Field::Offset, 0), moved);
        // Cut from the front: the end stays at 7839 + 6293; one candidate starts at 8192.
        assert_eq!(
            candidates(&w, Field::Front, 6293),
            vec![1, 2197, 3146, 4096, 5940]
        );
        let front = with_field(&w, Field::Front, 5940);
        assert_eq!(
            (offset_of(&front), len_of(&front)),
            (Some(8192), Some(5940))
        );
    }
}
