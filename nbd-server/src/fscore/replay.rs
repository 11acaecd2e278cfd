//! Replaying a session in process: the volume made as the server made it, each request
//! submitted where it arrived, each recorded step run, each power cut cut again, with no
//! sockets and no kernel. With the recorded switches the replay is exact: every answer must
//! be the recorded one (a read's bytes by their hash), and the oracle, which the server does
//! not run, names the first wrong byte any read returned. With switches changed the
//! recorded steps are followed where their task can run, and the policy picks elsewhere.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use fs_core::oracle::{Failure, Tracking};
use fs_core::Config;
use serde::Serialize;

use super::served::{fresh_volume, remount_seed, remount_tracked};
use super::session::{answer_hash, Event, SessionError, SessionHeader, SessionReader};
use super::volume::Volume;
use crate::backend::MemoryBackend;
use crate::disk::{DiskConfig, EmulatedDisk};

/// Answers that differ from the recorded ones, at most this many reported.
pub const REPLAY_MISMATCHES_MAX: usize = 16;

/// Why a replay could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    #[error("{0}")]
    Session(#[from] SessionError),
    #[error("{0}")]
    Volume(String),
    #[error("the session's step {step} runs task {task}, which cannot run in the replay ({why})")]
    Diverged { step: u64, task: u32, why: String },
    #[error("request {got} arrives where the session numbers it {want}")]
    RequestOrder { want: u64, got: u64 },
}

/// An answer the replay gave differently.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    pub request: u64,
    /// What the session recorded: ok, hash of the bytes, length.
    pub recorded: (bool, u64, u32),
    /// What the replay answered (`None`: it never answered).
    pub replayed: Option<(bool, u64, u32)>,
}

/// What a replay did and found.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    pub header: SessionHeader,
    /// The switches the replay ran with.
    pub config: Config,
    pub switches_changed: bool,
    pub requests: u64,
    pub steps: u64,
    /// Recorded steps whose task could not run (only with switches changed).
    pub steps_not_followed: u64,
    pub power_cuts: u64,
    pub answers_compared: u64,
    pub mismatches: Vec<Mismatch>,
    pub mismatches_total: u64,
    /// What the oracle found: the first wrong byte a read returned, first.
    pub failures: Vec<Failure>,
    /// The session ended with its end record (the server stopped cleanly).
    pub complete: bool,
    /// What the model noticed going wrong as it happened (a stale mapping used), first ones.
    pub notes: Vec<String>,
}

impl ReplayReport {
    /// Whether the replay saw what the server saw and found nothing wrong.
    /// With switches changed, answers may differ (that is the point): only the oracle counts.
    pub fn clean(&self) -> bool {
        self.failures.is_empty() && (self.switches_changed || self.mismatches_total == 0)
    }
}

struct Replay {
    volume: Volume,
    disk: Arc<EmulatedDisk>,
    config: Config,
    header: SessionHeader,
    strict: bool,
    recorded: HashMap<u64, (bool, u64, u32)>,
    replayed: HashMap<u64, (bool, u64, u32)>,
    report: ReplayReport,
}

/// Replays the session at `path`, with `config` instead of the recorded switches if given.
pub fn replay(path: &Path, config: Option<Config>) -> Result<ReplayReport, ReplayError> {
    let mut reader = SessionReader::open(path)?;
    let header = reader.header.clone();
    let config = config.unwrap_or_else(|| header.config.clone());
    let strict = config == header.config;
    let bytes = header.device_blocks * fs_core::block::BLOCK_SIZE as u64;
    let disk_config = DiskConfig {
        cache_bytes_max: header.disk_cache_bytes,
        ..DiskConfig::default()
    };
    let disk = EmulatedDisk::new(Arc::new(MemoryBackend::new(bytes)), disk_config)
        .map_err(|e| ReplayError::Volume(e.to_string()))?;
    let disk = Arc::new(disk);
    let run_header = SessionHeader {
        config: config.clone(),
        ..header.clone()
    };
    let volume =
        fresh_volume(disk.clone(), &run_header, Tracking::Files).map_err(ReplayError::Volume)?;
    let mut r = Replay {
        volume,
        disk,
        strict,
        recorded: HashMap::new(),
        replayed: HashMap::new(),
        report: ReplayReport {
            header: header.clone(),
            config: config.clone(),
            switches_changed: !strict,
            requests: 0,
            steps: 0,
            steps_not_followed: 0,
            power_cuts: 0,
            answers_compared: 0,
            mismatches: Vec::new(),
            mismatches_total: 0,
            failures: Vec::new(),
            complete: false,
            notes: Vec::new(),
        },
        config,
        header,
    };
    while let Some(event) = reader.next_event()? {
        r.event(event)?;
    }
    r.finish()
}

impl Replay {
    fn event(&mut self, event: Event) -> Result<(), ReplayError> {
        match event {
            Event::Steps(tasks) => {
                for t in tasks {
                    self.step(t)?;
                }
            }
            Event::Arrive { id, req } => {
                let got = self.volume.next_request();
                if got != id {
                    return Err(ReplayError::RequestOrder { want: id, got });
                }
                self.volume.arrive(req);
                self.report.requests += 1;
                self.collect();
            }
            Event::Answer { id, ok, hash, len } => {
                self.recorded.insert(id, (ok, hash, len));
                self.compare(id);
            }
            Event::PowerCut { seed } => self.power_cut(seed)?,
            Event::End { .. } => self.report.complete = true,
        }
        Ok(())
    }

    fn step(&mut self, t: u32) -> Result<(), ReplayError> {
        self.report.steps += 1;
        match self.volume.step_task(t as usize) {
            Ok(()) => {}
            Err(e) if self.strict => {
                return Err(ReplayError::Diverged {
                    step: self.report.steps,
                    task: t,
                    why: e.to_string(),
                })
            }
            Err(_) => {
                self.report.steps_not_followed += 1;
                let _ = self.volume.step();
            }
        }
        self.collect();
        Ok(())
    }

    fn collect(&mut self) {
        for (id, answer) in self.volume.take_answers() {
            self.replayed.insert(id, answer_hash(&answer));
            self.compare(id);
        }
    }

    fn compare(&mut self, id: u64) {
        let (Some(&want), Some(&got)) = (self.recorded.get(&id), self.replayed.get(&id)) else {
            return;
        };
        self.recorded.remove(&id);
        self.replayed.remove(&id);
        self.report.answers_compared += 1;
        if want != got {
            self.mismatch(id, want, Some(got));
        }
    }

    fn mismatch(
        &mut self,
        request: u64,
        recorded: (bool, u64, u32),
        got: Option<(bool, u64, u32)>,
    ) {
        self.report.mismatches_total += 1;
        if self.report.mismatches.len() < REPLAY_MISMATCHES_MAX {
            self.report.mismatches.push(Mismatch {
                request,
                recorded,
                replayed: got,
            });
        }
    }

    fn power_cut(&mut self, seed: u64) -> Result<(), ReplayError> {
        self.report.power_cuts += 1;
        self.volume
            .fail_all(&fs_core::fs::FsError::Device("power cut".into()));
        self.collect();
        self.keep_failures();
        self.disk
            .power_cut(Some(seed))
            .map_err(|e| ReplayError::Volume(e.to_string()))?;
        let files = self.volume.files().to_vec();
        let seed = remount_seed(self.header.sched_seed, self.report.power_cuts);
        self.volume = remount_tracked(
            self.disk.clone(),
            &self.config,
            &files,
            seed,
            Tracking::Files,
        )
        .map_err(ReplayError::Volume)?;
        Ok(())
    }

    fn keep_failures(&mut self) {
        let notes = &self.volume.engine().fs().notes;
        let room = fs_core::fs::NOTES_MAX.saturating_sub(self.report.notes.len());
        self.report.notes.extend(notes.iter().take(room).cloned());
        let found = self.volume.engine().failures();
        let room = REPLAY_MISMATCHES_MAX.saturating_sub(self.report.failures.len());
        self.report
            .failures
            .extend(found.iter().take(room).cloned());
    }

    fn finish(mut self) -> Result<ReplayReport, ReplayError> {
        if !self.strict {
            // Let the calls the changed switches left running finish.
            while let Ok(Some(_)) = self.volume.step() {
                self.collect();
            }
        }
        self.collect();
        let mut left: Vec<(u64, (bool, u64, u32))> = self.recorded.drain().collect();
        left.sort_unstable();
        for (id, want) in left {
            self.mismatch(id, want, None);
        }
        self.keep_failures();
        Ok(self.report)
    }
}
