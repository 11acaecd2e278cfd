//! A volume: an fs-core filesystem whose files are NBD exports, with no threads and no
//! sockets. NBD requests arrive ([`Volume::arrive`]); each becomes one or more fs-core calls
//! run one after another as tasks of the [`Engine`]; [`Volume::step`] runs one step of the
//! task the policy picks; a request is answered ([`Volume::take_answers`]) when its last call
//! completed. The server drives a volume from its engine thread; `crashmonkey fs session
//! replay` drives one from a recorded session, so both run exactly this code.
//!
//! How requests map to calls (a file block is 4 KiB):
//! - READ: a buffered read. CACHE: a buffered read whose bytes are dropped (readahead).
//! - WRITE: a buffered write, any alignment. FUA: then fsync of the file.
//! - FLUSH: fsync of the file.
//! - TRIM, and WRITE_ZEROES without NO_HOLE: punch hole over the whole blocks, and zeroes
//!   written into the partial blocks at either end (as `iomap_zero_range` does).
//! - WRITE_ZEROES with NO_HOLE: zero range over the whole blocks (they stay allocated), and
//!   zeroes written into the partial blocks.

use std::collections::{BTreeMap, VecDeque};

use fs_core::block::BLOCK_SIZE;
use fs_core::engine::{Call, Done, Engine, EngineError};
use fs_core::extent::ExtentState;
use fs_core::fs::FsError;
use fs_core::TaskId;

use crate::backend::StatusExtent;

const BS: u64 = BLOCK_SIZE as u64;

/// What a request asks of its file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolOp {
    Read { len: u64 },
    Write { data: Vec<u8> },
    Trim { len: u64 },
    Zero { len: u64, may_trim: bool },
    Flush,
    Cache { len: u64 },
}

/// One NBD request, as the volume sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolRequest {
    /// The file (its index among the volume's exports).
    pub file: usize,
    pub offset: u64,
    pub op: VolOp,
    pub fua: bool,
}

/// How a request ended: its bytes (for a read), or the error of the call that failed.
pub type Answer = Result<Option<Vec<u8>>, FsError>;

/// A file of the volume that is an export.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolFile {
    pub name: String,
    pub ino: usize,
    pub size: u64,
}

/// A request being run: its calls still to come, and what it read.
#[derive(Debug)]
struct Running {
    calls: VecDeque<Call>,
    data: Option<Vec<u8>>,
    keep_data: bool,
}

/// The filesystem and the requests running on it.
pub struct Volume {
    engine: Engine,
    files: Vec<VolFile>,
    running: BTreeMap<u64, Running>,
    by_task: BTreeMap<TaskId, u64>,
    next_request: u64,
    answers: Vec<(u64, Answer)>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("files", &self.files)
            .field("running", &self.running.len())
            .finish()
    }
}

impl Volume {
    pub fn new(engine: Engine, files: Vec<VolFile>) -> Self {
        Volume {
            engine,
            files,
            running: BTreeMap::new(),
            by_task: BTreeMap::new(),
            next_request: 0,
            answers: Vec::new(),
        }
    }

    pub fn files(&self) -> &[VolFile] {
        &self.files
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// Hands the engine back (requests still running are dropped unanswered).
    pub fn into_engine(self) -> Engine {
        self.engine
    }

    /// Requests arrived and not yet answered.
    pub fn requests_in_flight(&self) -> usize {
        self.running.len()
    }

    /// The id the next request gets.
    pub fn next_request(&self) -> u64 {
        self.next_request
    }

    /// A request arrives: its first call is submitted. Returns its id (requests are numbered
    /// in arrival order from 0).
    pub fn arrive(&mut self, req: VolRequest) -> u64 {
        let id = self.next_request;
        self.next_request += 1;
        let keep_data = matches!(req.op, VolOp::Read { .. });
        match self.calls_of(req) {
            Ok(calls) => {
                self.running.insert(
                    id,
                    Running {
                        calls,
                        data: None,
                        keep_data,
                    },
                );
                self.next_call(id);
                self.collect();
            }
            Err(e) => self.answers.push((id, Err(e))),
        }
        id
    }

    /// The fs-core calls a request runs, in order (a write's data moves into its call).
    fn calls_of(&self, req: VolRequest) -> Result<VecDeque<Call>, FsError> {
        let file = self
            .files
            .get(req.file)
            .ok_or(FsError::NoSuchFile(req.file))?;
        let ino = file.ino;
        let off = req.offset;
        let flush = matches!(req.op, VolOp::Flush);
        let mut calls = VecDeque::new();
        match req.op {
            VolOp::Read { len } | VolOp::Cache { len } => calls.push_back(Call::Read {
                ino,
                offset: off,
                len,
            }),
            VolOp::Write { data } => calls.push_back(Call::Write {
                ino,
                offset: off,
                data,
            }),
            VolOp::Trim { len } => zero_calls(&mut calls, ino, off, len, true),
            VolOp::Zero { len, may_trim } => zero_calls(&mut calls, ino, off, len, may_trim),
            VolOp::Flush => calls.push_back(Call::Fsync { ino }),
        }
        if req.fua && !flush {
            calls.push_back(Call::Fsync { ino });
        }
        Ok(calls)
    }

    /// Submits request `id`'s next call, or answers it when it has none left. A call that
    /// cannot run completes at once: [`Volume::collect`] takes it.
    fn next_call(&mut self, id: u64) {
        let run = self.running.get_mut(&id).expect("running request");
        let Some(call) = run.calls.pop_front() else {
            let run = self.running.remove(&id).expect("running request");
            self.answers.push((id, Ok(run.data)));
            return;
        };
        match self.engine.submit(call) {
            Ok(task) => {
                self.by_task.insert(task, id);
            }
            Err(e) => {
                self.running.remove(&id);
                self.answers
                    .push((id, Err(FsError::Invalid(e.to_string()))));
            }
        }
    }

    /// Takes the engine's completed calls, each moving its request on, until none is left
    /// (a next call may complete at once).
    fn collect(&mut self) {
        loop {
            let done = self.engine.take_done();
            if done.is_empty() {
                return;
            }
            for Done { task, result, data } in done {
                let Some(id) = self.by_task.remove(&task) else {
                    continue;
                };
                match result {
                    Ok(_) => {
                        let run = self.running.get_mut(&id).expect("running request");
                        if run.keep_data && data.is_some() {
                            run.data = data;
                        }
                        self.next_call(id);
                    }
                    Err(e) => {
                        self.running.remove(&id);
                        self.answers.push((id, Err(e)));
                    }
                }
            }
        }
    }

    /// Runs one step of the task the policy picks. `Ok(None)`: nothing can run (idle).
    pub fn step(&mut self) -> Result<Option<TaskId>, EngineError> {
        let t = self.engine.step()?;
        self.collect();
        Ok(t)
    }

    /// Runs one step of task `t` (a recorded choice).
    pub fn step_task(&mut self, t: TaskId) -> Result<(), EngineError> {
        self.engine.step_task(t)?;
        self.collect();
        Ok(())
    }

    /// Whether a step could run now.
    pub fn busy(&mut self) -> bool {
        self.engine.busy()
    }

    /// The requests answered since the last call, in the order they completed.
    pub fn take_answers(&mut self) -> Vec<(u64, Answer)> {
        std::mem::take(&mut self.answers)
    }

    /// Fails every running request with `error` (a deadlock, a power cut).
    pub fn fail_all(&mut self, error: &FsError) {
        for (id, _) in std::mem::take(&mut self.running) {
            self.answers.push((id, Err(error.clone())));
        }
        self.by_task.clear();
    }

    /// BLOCK_STATUS of `[offset, offset + len)` of `file`: holes read as zeros and own no
    /// storage; UNWRITTEN blocks read as zeros unless the page cache holds data for them;
    /// DELALLOC and WRITTEN blocks are data.
    pub fn block_status(&self, file: usize, offset: u64, len: u64) -> Vec<StatusExtent> {
        let Some(f) = self.files.get(file) else {
            return Vec::new();
        };
        let inode = self.engine.fs().inode(f.ino);
        let end = (offset + len).min(f.size);
        let mut out: Vec<StatusExtent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let b = pos / BS;
            let ext = inode.extents.get(b);
            let fs = self.engine.fs();
            let cached = inode.cache.get(fs.folio_of(f.ino, b)).is_some();
            let (hole, zero) = match ext.state {
                ExtentState::Hole if !cached => (true, true),
                ExtentState::Unwritten if !cached => (false, true),
                _ => (false, false),
            };
            let next = ((b + 1) * BS).min(end);
            match out.last_mut() {
                Some(last) if last.hole == hole && last.zero == zero => last.length += next - pos,
                _ => out.push(StatusExtent {
                    length: next - pos,
                    hole,
                    zero,
                }),
            }
            pos = next;
        }
        out
    }
}

/// Punch (or zero range) over the whole blocks of `[off, off + len)`, zeroes written into the
/// partial blocks at either end.
fn zero_calls(calls: &mut VecDeque<Call>, ino: usize, off: u64, len: u64, punch: bool) {
    let end = off + len;
    let first = off.div_ceil(BS) * BS;
    let last = end / BS * BS;
    if first >= last {
        calls.push_back(Call::Write {
            ino,
            offset: off,
            data: vec![0; len as usize],
        });
        return;
    }
    if off < first {
        calls.push_back(Call::Write {
            ino,
            offset: off,
            data: vec![0; (first - off) as usize],
        });
    }
    let (offset, len) = (first, last - first);
    calls.push_back(if punch {
        Call::Punch { ino, offset, len }
    } else {
        Call::ZeroRange { ino, offset, len }
    });
    if last < end {
        calls.push_back(Call::Write {
            ino,
            offset: last,
            data: vec![0; (end - last) as usize],
        });
    }
}
