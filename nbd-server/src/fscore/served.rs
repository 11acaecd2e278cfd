//! A volume served: made or mounted on its emulated disk, driven by its engine thread, and
//! each of its files an export ([`FsCoreFile`], a [`Backend`]).
//!
//! The engine thread owns the [`Volume`]. Backends send it requests over a channel and wait
//! for the answer; between two steps it takes every request that arrived, so requests from
//! every connection interleave as the seeded policy picks their steps. When nothing can run
//! it sleeps until the next request. Each step holds the disk's power-cut gate, so a power
//! cut (`ctl crash`) falls between two steps; the thread then fails the requests in flight,
//! mounts the volume again (log recovery) and goes on serving.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};

use fs_core::engine::{Call, Engine};
use fs_core::fs::FsError;
use fs_core::oracle::{Oracle, Tracking};
use fs_core::sched::RandomPolicy;
use fs_core::Config;

use super::session::{SessionHeader, SessionWriter};
use super::volume::{Answer, VolFile, VolOp, VolRequest, Volume};
use crate::backend::{
    Backend, DeferredCall, DeferredDone, FileBackend, IoStyle, MemoryBackend, StatusExtent, Ticket,
    WriteData, WriteFailed,
};
use crate::disk::{DiskConfig, EmulatedDisk};
use crate::fscore_device::RecordedDevice;

/// What a volume is made of, gathered from the exports that name it.
#[derive(Debug, Clone)]
pub struct VolumeSetup {
    /// The raw image, or `None` for memory.
    pub image: Option<PathBuf>,
    /// Each file: its name and the size its export asks for (`None`: as it is).
    pub files: Vec<(String, Option<u64>)>,
    pub volume_size: Option<u64>,
    pub config: Config,
    pub sched_seed: u64,
    pub session: Option<PathBuf>,
    pub disk: DiskConfig,
    /// Nothing can observe the disk (`ExportSpec::plain`): fs-core's IO skips it
    /// ([`EmulatedDisk::pass_through`]).
    pub plain: bool,
    /// For log messages: the first export's name.
    pub label: String,
}

/// Gets a request's answer, on the engine thread. One dropped unanswered (the engine thread
/// stopped or died) answers with an error, so no client waits forever.
struct Waiter(Option<Box<dyn FnOnce(Answer) + Send>>);

impl Waiter {
    fn new(f: impl FnOnce(Answer) + Send + 'static) -> Self {
        Waiter(Some(Box::new(f)))
    }

    fn answer(mut self, a: Answer) {
        if let Some(f) = self.0.take() {
            f(a);
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f(Err(FsError::Device("the volume's engine stopped".into())));
        }
    }
}

/// A request to the engine thread.
enum Msg {
    Request(VolRequest, Waiter),
    Status(usize, u64, u64, SyncSender<Vec<StatusExtent>>),
    Stop(SyncSender<Result<(), String>>),
}

/// A volume being served: the handle its exports share.
pub struct ServedVolume {
    tx: Mutex<Option<Sender<Msg>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub disk: Arc<EmulatedDisk>,
    pub files: Vec<VolFile>,
    label: String,
}

impl std::fmt::Debug for ServedVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedVolume")
            .field("label", &self.label)
            .field("files", &self.files)
            .finish()
    }
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// The errno a failed fs-core call answers with.
fn answer_error(e: FsError) -> io::Error {
    match e {
        FsError::NoSpace => io::Error::from_raw_os_error(libc::ENOSPC),
        FsError::FileTooBig => io::Error::from_raw_os_error(libc::EFBIG),
        FsError::Invalid(_) => io::Error::from_raw_os_error(libc::EINVAL),
        FsError::Fault => io::Error::from_raw_os_error(libc::EFAULT),
        FsError::Unsupported(_) => io::Error::from_raw_os_error(libc::EOPNOTSUPP),
        other => io::Error::other(other.to_string()),
    }
}

/// Makes a fresh volume on `disk` as `header` says: mkfs with the files, mount, each file
/// truncated up to its size, synced. The server and a replay both start this way.
pub fn fresh_volume(
    disk: Arc<EmulatedDisk>,
    header: &SessionHeader,
    tracking: Tracking,
) -> Result<Volume, String> {
    let mut dev = RecordedDevice::over(disk);
    let names: Vec<String> = header.files.iter().map(|f| f.name.clone()).collect();
    fs_core::ondisk::mkfs(&mut dev, header.inodes, &names).map_err(|e| format!("mkfs: {e}"))?;
    let fs = fs_core::ondisk::mount(header.config.clone(), Box::new(dev))
        .map_err(|e| format!("mount after mkfs: {e}"))?;
    let mut engine = engine_over(fs, header.sched_seed, tracking);
    for f in &header.files {
        engine
            .submit(Call::Truncate {
                ino: f.ino,
                size: f.size,
            })
            .map_err(|e| e.to_string())?;
    }
    engine.submit(Call::Sync).map_err(|e| e.to_string())?;
    while engine.step().map_err(|e| e.to_string())?.is_some() {}
    for d in engine.take_done() {
        d.result.map_err(|e| format!("sizing the files: {e}"))?;
    }
    Ok(Volume::new(engine, header.files.clone()))
}

/// An engine over `fs` with the seeded random policy.
pub fn engine_over(fs: fs_core::Fs, seed: u64, tracking: Tracking) -> Engine {
    let files = fs.inodes.len();
    let oracle = Oracle::mounted(
        (0..files).map(|_| (true, 1, Vec::new())).collect(),
        Default::default(),
    )
    .tracking(tracking);
    Engine::new(fs, oracle, Box::new(RandomPolicy::new(seed)))
}

/// The scheduler's seed after the `n`th remount of a volume seeded `base`.
pub fn remount_seed(base: u64, n: u64) -> u64 {
    base ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Mounts the volume on `disk` again (after a power cut: log recovery runs). With an oracle
/// that keeps the files, it starts from the files as mounted.
pub fn remount_tracked(
    disk: Arc<EmulatedDisk>,
    config: &Config,
    files: &[VolFile],
    seed: u64,
    tracking: Tracking,
) -> Result<Volume, String> {
    let dev = RecordedDevice::over(disk);
    let mut fs =
        fs_core::ondisk::mount(config.clone(), Box::new(dev)).map_err(|e| e.to_string())?;
    let mut contents = Vec::with_capacity(fs.inodes.len());
    for ino in 0..fs.inodes.len() {
        let data = if tracking == Tracking::Off || !fs.inode(ino).in_use {
            Vec::new()
        } else {
            fs.read_from_disk(ino).map_err(|e| e.to_string())?
        };
        let i = fs.inode(ino);
        contents.push((i.in_use, i.generation, data));
    }
    let oracle = Oracle::mounted(contents, Default::default()).tracking(tracking);
    let engine = Engine::new(fs, oracle, Box::new(RandomPolicy::new(seed)));
    Ok(Volume::new(engine, files.to_vec()))
}

impl ServedVolume {
    /// Opens (or makes) the volume and starts its engine thread. The filesystem is made and
    /// lives on that thread (fs-core is single-threaded: its device is not `Send`).
    pub fn start(setup: VolumeSetup) -> Result<Arc<ServedVolume>, String> {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let thread_setup = setup.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fscore {}", setup.label))
            .spawn(move || {
                let (disk, volume, session, header) = match open(&thread_setup) {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let gate = Arc::new(Mutex::new(()));
                disk.set_power_cut_gate(gate.clone());
                let _ = ready_tx.send(Ok((disk.clone(), volume.files().to_vec())));
                let worker = Worker {
                    cuts: disk.power_cuts(),
                    volume: Some(volume),
                    disk,
                    session,
                    waiters: HashMap::new(),
                    gate,
                    header,
                    broken: None,
                    remounts: 0,
                    held: Vec::with_capacity(ANSWERS_HELD_MAX),
                    held_steps: 0,
                };
                worker.run(rx)
            })
            .map_err(|e| format!("starting the engine thread: {e}"))?;
        let (disk, files) = ready_rx
            .recv()
            .map_err(|_| "the engine thread died while opening the volume".to_owned())??;
        Ok(Arc::new(ServedVolume {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            disk,
            files,
            label: setup.label,
        }))
    }

    fn send(&self, msg: Msg) -> io::Result<()> {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        match tx.as_ref() {
            Some(tx) => tx
                .send(msg)
                .map_err(|_| io_err("the volume's engine has stopped")),
            None => Err(io_err("the volume is shut down")),
        }
    }

    /// Runs one request and waits for its answer.
    pub fn request(&self, req: VolRequest) -> io::Result<Option<Vec<u8>>> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Msg::Request(
            req,
            Waiter::new(move |a| {
                let _ = tx.send(a);
            }),
        ))?;
        match rx.recv() {
            Ok(answer) => answer.map_err(answer_error),
            Err(_) => Err(io_err("the volume's engine stopped before answering")),
        }
    }

    /// Starts one request; `done` gets its outcome on the engine thread (or here, at once,
    /// if the engine has stopped).
    pub fn request_then(&self, req: VolRequest, done: crate::backend::DeferredDone) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(tx) = tx else {
            return done(Err(io_err("the volume is shut down")));
        };
        // A request the engine never takes is answered when its waiter is dropped.
        let waiter = Waiter::new(move |a: Answer| done(a.map_err(answer_error)));
        let _ = tx.send(Msg::Request(req, waiter));
    }

    fn status(&self, file: usize, offset: u64, len: u64) -> io::Result<Vec<StatusExtent>> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Msg::Status(file, offset, len, tx))?;
        rx.recv()
            .map_err(|_| io_err("the volume's engine stopped before answering"))
    }

    /// Syncs every file, unmounts (journal checkpointed), ends the session and stops the
    /// engine thread. Later requests fail.
    pub fn shutdown(&self) -> Result<(), String> {
        let (tx, rx) = mpsc::sync_channel(1);
        let sent = self.send(Msg::Stop(tx)).is_ok();
        let r = if sent {
            rx.recv()
                .unwrap_or_else(|_| Err("the engine thread stopped".into()))
        } else {
            Ok(())
        };
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
        r
    }
}

impl Drop for ServedVolume {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!("fs-core volume {:?}: {e}", self.label);
        }
    }
}

/// The emulated disk over the volume's storage: memory, or the image (made when missing).
fn open_disk(setup: &VolumeSetup, new_bytes: u64) -> Result<(Arc<EmulatedDisk>, bool), String> {
    let (storage, fresh): (Arc<dyn Backend>, bool) = match &setup.image {
        None => (Arc::new(MemoryBackend::new(new_bytes)), true),
        Some(path) => {
            let fresh = !path.exists();
            let size = fresh.then_some(new_bytes);
            let f = FileBackend::open(path, size, false)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            (Arc::new(f), fresh)
        }
    };
    let disk = EmulatedDisk::named(storage, setup.disk.clone(), &setup.label)
        .map_err(|e| e.to_string())?;
    if setup.plain {
        disk.pass_through();
    }
    Ok((Arc::new(disk), fresh))
}

/// Opens the volume `setup` names: a fresh one is made with its files; an existing image is
/// mounted and its files found by name (and grown to the size asked, never shrunk).
/// Returns the disk, the volume, the session being recorded and the session's header.
pub fn open(
    setup: &VolumeSetup,
) -> Result<
    (
        Arc<EmulatedDisk>,
        Volume,
        Option<SessionWriter>,
        SessionHeader,
    ),
    String,
> {
    // Checked before anything is made, so a refused volume leaves no image behind.
    if let Some((name, size)) = setup.files.iter().find_map(|(n, s)| {
        s.filter(|&s| s > fs_core::fs::FILE_BYTES_MAX)
            .map(|s| (n, s))
    }) {
        return Err(format!(
            "file {name:?}: size {size} is more than an fs-core file holds ({} bytes)",
            fs_core::fs::FILE_BYTES_MAX
        ));
    }
    let sizes: u64 = setup.files.iter().map(|f| f.1.unwrap_or(0)).sum();
    let bs = fs_core::block::BLOCK_SIZE as u64;
    let new_bytes = setup
        .volume_size
        .unwrap_or_else(|| super::default_volume_blocks(sizes) * bs);
    let (disk, fresh) = open_disk(setup, new_bytes)?;
    // What this call made goes again if the volume cannot be served: the new image, and the
    // write log the disk just created.
    let mut made = Made(Vec::new());
    if fresh {
        made.0.extend(setup.image.clone());
    }
    made.0.extend(setup.disk.record.clone());
    let mut header = SessionHeader {
        config: setup.config.clone(),
        files: Vec::new(),
        inodes: setup.files.len() as u64 + super::VOLUME_SPARE_INODES,
        device_blocks: new_bytes / bs,
        sched_seed: setup.sched_seed,
        disk_cache_bytes: setup.disk.cache_bytes_max,
    };
    if !fresh {
        if setup.session.is_some() {
            return Err("session= records a new volume only (replay starts from mkfs)".into());
        }
        let volume = mount_existing(disk.clone(), setup)?;
        header.files = volume.files().to_vec();
        made.0.clear();
        return Ok((disk, volume, None, header));
    }
    for (i, (name, size)) in setup.files.iter().enumerate() {
        let size = size.ok_or_else(|| format!("the new volume's file {name:?} needs size="))?;
        header.files.push(VolFile {
            name: name.clone(),
            ino: i,
            size,
        });
    }
    let volume = fresh_volume(disk.clone(), &header, Tracking::Off)?;
    let session = match &setup.session {
        Some(p) => Some(
            SessionWriter::create(p, &header)
                .map_err(|e| format!("session={}: {e}", p.display()))?,
        ),
        None => None,
    };
    made.0.clear();
    Ok((disk, volume, session, header))
}

/// Files a failed [`open`] made, removed when it returns an error.
struct Made(Vec<PathBuf>);

impl Drop for Made {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Mounts an existing image and finds the files.
fn mount_existing(disk: Arc<EmulatedDisk>, setup: &VolumeSetup) -> Result<Volume, String> {
    let dev = RecordedDevice::over(disk);
    let fs = fs_core::ondisk::mount(setup.config.clone(), Box::new(dev))
        .map_err(|e| format!("mount: {e}"))?;
    let mut files = Vec::new();
    let mut grow = Vec::new();
    for (name, want) in &setup.files {
        let ino = fs.lookup(name).ok_or_else(|| {
            format!("the volume has no file {name:?} (make a new volume, or name a file it has)")
        })?;
        let ino = fs.dir[ino].as_ref().expect("looked up").ino as usize;
        let size = fs.inode(ino).size;
        let size = match *want {
            Some(w) if w < size => {
                return Err(format!(
                    "file {name:?} holds {size} bytes; size={w} would cut it (never done)"
                ))
            }
            Some(w) => {
                grow.push((ino, w));
                w
            }
            None => size,
        };
        files.push(VolFile {
            name: name.clone(),
            ino,
            size,
        });
    }
    let mut engine = engine_over(fs, setup.sched_seed, Tracking::Off);
    for (ino, size) in grow {
        engine
            .submit(Call::Truncate { ino, size })
            .map_err(|e| e.to_string())?;
    }
    while engine.step().map_err(|e| e.to_string())?.is_some() {}
    Ok(Volume::new(engine, files))
}

/// The engine thread's state.
struct Worker {
    volume: Option<Volume>,
    disk: Arc<EmulatedDisk>,
    session: Option<SessionWriter>,
    waiters: HashMap<u64, Waiter>,
    cuts: tokio::sync::watch::Receiver<u64>,
    gate: Arc<Mutex<()>>,
    header: SessionHeader,
    /// Why the volume cannot serve (a deadlock in the model, a failed remount).
    broken: Option<String>,
    remounts: u64,
    /// Answers of completed requests not handed out yet ([`ANSWERS_HELD_MAX`]).
    held: Vec<(Waiter, Answer)>,
    /// Steps run since the first of `held` completed.
    held_steps: u64,
}

/// Completed requests' answers the engine thread holds back to hand out together, at most:
/// each release wakes the connections whose requests completed. When the engine thread was
/// the bottleneck (about 13 us a served 4 KiB write, before the page cache's index became a
/// [`fs_core::foliomap::FolioMap`]), holding 16 made 4 KiB random writes at queue depth 32
/// 15-20% faster. With the engine at about 7 us a write it idles a quarter of the time under
/// them, and holding only delays answers: alternating fresh servers (three rounds each, 4 KiB
/// random writes then reads at queue depth 32) ran 299-314 and 315-336 MiB/s holding 16
/// answers for up to 192 steps, 349-363 and 412-440 holding 2 for up to 24, and 340-378 and
/// 405-470 holding none; 4 answers for up to 48 steps were in between. Everything held is
/// handed out as soon as the engine has no step to run, so a request is never kept waiting
/// by an idle engine.
pub const ANSWERS_HELD_MAX: usize = 2;
/// Steps the engine may run, at most, while it holds an answer: a bound on the delay one
/// answer can see while other requests keep the engine busy (about two 4 KiB writes' steps).
pub const ANSWER_HELD_STEPS_MAX: u64 = 24;
/// With fewer requests than this in the engine (the answers held among them), answers go out
/// at once: the clients are waiting on them to send more (a client at queue depth 1 would
/// otherwise see each answer only once the engine went idle, and 1 MiB writes at queue depth
/// 8 take 41 steps each).
pub const REQUESTS_FEW_MAX: usize = 16;

/// Whether the answers held (`held` of them, the first held for `steps` steps) go out now,
/// with `running` requests still in the engine: when [`ANSWERS_HELD_MAX`] are held, when the
/// first has waited [`ANSWER_HELD_STEPS_MAX`] steps, or when the engine has fewer than
/// [`REQUESTS_FEW_MAX`] requests in all.
fn release_now(held: usize, running: usize, steps: u64) -> bool {
    held > 0
        && (held >= ANSWERS_HELD_MAX
            || steps >= ANSWER_HELD_STEPS_MAX
            || held + running < REQUESTS_FEW_MAX)
}

/// Answers still held go out on every way the engine thread ends (a waiter dropped
/// unanswered would tell its client the engine stopped, of a request that completed).
impl Drop for Worker {
    fn drop(&mut self) {
        self.release();
    }
}

impl Worker {
    fn run(mut self, rx: Receiver<Msg>) {
        loop {
            // Take everything that arrived before the next step.
            let msg = match rx.try_recv() {
                Ok(m) => Some(m),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => break,
            };
            if let Some(m) = msg {
                if let Some(reply) = self.handle(m) {
                    let _ = reply.send(self.stop());
                    return;
                }
                continue;
            }
            if self.step() {
                continue;
            }
            // Idle: hand out what is held and the session to the OS, then sleep until the
            // next request.
            self.release();
            self.session_io(|s| s.flush());
            match rx.recv() {
                Ok(m) => {
                    if let Some(reply) = self.handle(m) {
                        let _ = reply.send(self.stop());
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        if let Err(e) = self.stop() {
            tracing::error!("fs-core volume: {e}");
        }
    }

    /// Handles one message; returns the reply channel of a stop.
    fn handle(&mut self, msg: Msg) -> Option<SyncSender<Result<(), String>>> {
        self.check_power_cut();
        match msg {
            Msg::Request(req, reply) => {
                if let Some(why) = &self.broken {
                    reply.answer(Err(FsError::Device(why.clone())));
                    return None;
                }
                let id = self.volume.as_ref().expect("serving").next_request();
                self.session_io(|s| s.arrive(id, &req));
                self.volume.as_mut().expect("serving").arrive(req);
                self.waiters.insert(id, reply);
                self.deliver();
            }
            Msg::Status(file, offset, len, reply) => {
                let runs = match &self.volume {
                    Some(v) if self.broken.is_none() => v.block_status(file, offset, len),
                    _ => Vec::new(),
                };
                let _ = reply.send(runs);
            }
            Msg::Stop(reply) => return Some(reply),
        }
        None
    }

    /// Runs one step if one can run; false when idle.
    fn step(&mut self) -> bool {
        if self.check_power_cut() || self.broken.is_some() {
            return false;
        }
        let stepped = {
            let _held = self.gate.lock().unwrap_or_else(|p| p.into_inner());
            self.volume.as_mut().expect("serving").step()
        };
        if !self.held.is_empty() {
            self.held_steps += 1;
        }
        let progress = match stepped {
            Ok(Some(t)) => {
                let t = u32::try_from(t).unwrap_or(u32::MAX);
                self.session_io(|s| s.step(t));
                true
            }
            Ok(None) => false,
            Err(e) => {
                let why = format!("the model stopped: {e}");
                tracing::error!("fs-core volume: {why}");
                self.volume
                    .as_mut()
                    .expect("serving")
                    .fail_all(&FsError::Device(why.clone()));
                self.broken = Some(why);
                true
            }
        };
        self.deliver();
        progress
    }

    /// Remounts if the disk lost power since the last look; says whether it did.
    fn check_power_cut(&mut self) -> bool {
        if self.broken.is_none() && self.cuts.has_changed().unwrap_or(false) {
            self.cuts.mark_unchanged();
            self.after_power_cut();
            return true;
        }
        false
    }

    /// Takes the answers of the requests that completed, to be handed out with the next
    /// release: at once when [`ANSWERS_HELD_MAX`] are held or the first of them has waited
    /// [`ANSWER_HELD_STEPS_MAX`] steps, else when the engine goes idle.
    fn deliver(&mut self) {
        let Some(volume) = self.volume.as_mut() else {
            return;
        };
        for (id, answer) in volume.take_answers() {
            self.session_io(|s| s.answer(id, &answer));
            if let Some(w) = self.waiters.remove(&id) {
                self.held.push((w, answer));
            }
        }
        if release_now(self.held.len(), self.waiters.len(), self.held_steps) {
            self.release();
        }
    }

    /// Hands out every answer held.
    fn release(&mut self) {
        self.held_steps = 0;
        for (w, answer) in self.held.drain(..) {
            w.answer(answer);
        }
    }

    fn session_io(&mut self, f: impl FnOnce(&mut SessionWriter) -> io::Result<()>) {
        if let Some(s) = self.session.as_mut() {
            if let Err(e) = f(s) {
                tracing::error!("session: {e}; recording stops");
                self.session = None;
            }
        }
    }

    /// The disk lost power: the requests in flight fail (their clients were dropped), and
    /// the volume is mounted again, with log recovery.
    fn after_power_cut(&mut self) {
        let seed = self.disk.last_power_cut_seed().unwrap_or(0);
        self.session_io(|s| s.power_cut(seed));
        let cut = FsError::Device("power cut".into());
        self.volume.as_mut().expect("serving").fail_all(&cut);
        self.deliver();
        self.release();
        let files = self.volume.take().expect("serving").files().to_vec();
        self.remounts += 1;
        let seed = remount_seed(self.header.sched_seed, self.remounts);
        match remount_tracked(
            self.disk.clone(),
            &self.header.config,
            &files,
            seed,
            Tracking::Off,
        ) {
            Ok(v) => {
                tracing::warn!("fs-core volume mounted again after a power cut (log recovery)");
                self.volume = Some(v);
            }
            Err(e) => {
                let why = format!("mount after the power cut failed: {e}");
                tracing::error!("fs-core volume: {why}");
                self.broken = Some(why);
            }
        }
    }

    /// Syncs and unmounts the volume, ends the session.
    fn stop(&mut self) -> Result<(), String> {
        self.release();
        let mut result = Ok(());
        if let (Some(mut volume), None) = (self.volume.take(), &self.broken) {
            for file in 0..volume.files().len() {
                volume.arrive(VolRequest {
                    file,
                    offset: 0,
                    op: VolOp::Flush,
                    fua: false,
                });
            }
            loop {
                match volume.step() {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        result = Err(format!("syncing at shutdown: {e}"));
                        break;
                    }
                }
            }
            for (_, a) in volume.take_answers() {
                if let Err(e) = a {
                    result = Err(format!("syncing at shutdown: {e}"));
                }
            }
            let fs = volume.into_engine().into_fs();
            if let Err(e) = fs.unmount() {
                result = Err(format!("unmount: {e}"));
            }
        }
        if let Some(s) = self.session.take() {
            if let Err(e) = s.end(0) {
                result = Err(format!("ending the session: {e}"));
            }
        }
        result
    }
}

/// One export: a file of a served volume.
#[derive(Debug)]
pub struct FsCoreFile {
    pub volume: Arc<ServedVolume>,
    pub file: usize,
}

impl FsCoreFile {
    fn run(&self, offset: u64, op: VolOp, fua: bool) -> io::Result<Option<Vec<u8>>> {
        self.volume.request(VolRequest {
            file: self.file,
            offset,
            op,
            fua,
        })
    }
}

impl Backend for FsCoreFile {
    fn size(&self) -> u64 {
        self.volume.files[self.file].size
    }

    fn io_style(&self) -> IoStyle {
        IoStyle::Deferred
    }

    fn defer(&self, _t: Option<Ticket>, call: DeferredCall, done: DeferredDone) {
        let (offset, op, fua) = match call {
            DeferredCall::Read { offset, length } => (offset, VolOp::Read { len: length }, false),
            DeferredCall::Write { offset, data, fua } => {
                let data = data.into_vec();
                (offset, VolOp::Write { data }, fua)
            }
            DeferredCall::Flush => (0, VolOp::Flush, false),
            DeferredCall::Trim {
                offset,
                length,
                fua,
            } => (offset, VolOp::Trim { len: length }, fua),
            DeferredCall::WriteZeroes {
                offset,
                length,
                may_trim,
                fua,
            } => (
                offset,
                VolOp::Zero {
                    len: length,
                    may_trim,
                },
                fua,
            ),
            DeferredCall::Cache { offset, length } => (offset, VolOp::Cache { len: length }, false),
        };
        let req = VolRequest {
            file: self.file,
            offset,
            op,
            fua,
        };
        self.volume.request_then(req, done);
    }

    fn read(&self, _t: Option<Ticket>, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len() as u64;
        let data = self
            .run(offset, VolOp::Read { len }, false)?
            .unwrap_or_default();
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        buf[n..].fill(0);
        Ok(())
    }

    fn write(
        &self,
        _t: Option<Ticket>,
        offset: u64,
        data: WriteData,
        fua: bool,
    ) -> Result<(), WriteFailed> {
        let bytes = data.to_vec();
        self.run(offset, VolOp::Write { data: bytes }, fua)
            .map(|_| ())
            .map_err(WriteFailed::returning(data))
    }

    fn write_zeroes(
        &self,
        _t: Option<Ticket>,
        offset: u64,
        length: u64,
        may_trim: bool,
        _fast_only: bool,
        fua: bool,
    ) -> io::Result<()> {
        let op = VolOp::Zero {
            len: length,
            may_trim,
        };
        self.run(offset, op, fua).map(|_| ())
    }

    fn trim(&self, _t: Option<Ticket>, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.run(offset, VolOp::Trim { len: length }, fua)
            .map(|_| ())
    }

    fn flush(&self, _t: Option<Ticket>) -> io::Result<()> {
        self.run(0, VolOp::Flush, false).map(|_| ())
    }

    fn cache(&self, _t: Option<Ticket>, offset: u64, length: u64) -> io::Result<()> {
        self.run(offset, VolOp::Cache { len: length }, false)
            .map(|_| ())
    }

    fn block_status(
        &self,
        _t: Option<Ticket>,
        offset: u64,
        length: u64,
    ) -> io::Result<Vec<StatusExtent>> {
        self.volume.status(self.file, offset, length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_held_only_while_many_requests_are_in_the_engine() {
        // Nothing held: nothing to release.
        assert!(!release_now(0, 100, 1000));
        // Many requests running: a few answers wait for company...
        assert!(!release_now(1, 31, 0));
        assert!(!release_now(
            ANSWERS_HELD_MAX - 1,
            31,
            ANSWER_HELD_STEPS_MAX - 1
        ));
        // ...until there are enough of them, or the first has waited long enough.
        assert!(release_now(ANSWERS_HELD_MAX, 31, 0));
        assert!(release_now(1, 31, ANSWER_HELD_STEPS_MAX));
        // A client with few requests out (queue depth 1, or 8 large writes) waits on its
        // answers: they go at once.
        assert!(release_now(1, 0, 0));
        assert!(release_now(1, 7, 0));
        assert!(release_now(1, REQUESTS_FEW_MAX - 2, 0));
        assert!(!release_now(1, REQUESTS_FEW_MAX - 1, 0));
    }
}
