//! Crash states served over NBD, for checkers that take `{uri}` or `{uri-cow}`.
//!
//! One nbd-server runs in this process for the whole check, on a Unix socket in a private
//! temporary folder (mode 0700). It has two exports per checker slot (one slot per job):
//! `state-N`, read-only, and `state-N-cow`, writable, both over the same
//! [`OverlayBackend`]: the base image, the layers holding every epoch before the current
//! batch ([`ServedPrefix`]: runs into the log's payloads), the layers of the batch's epochs
//! before the state's, and a layer holding the state's own writes (built per state, as small
//! as the state's difference). Nothing disk-sized is written or copied per state. Writes through `state-N-cow` land in memory and are dropped
//! when the slot gets its next state, so they never reach another state.
//!
//! Between two checker runs a slot serves the bare base, and every connection to its
//! exports is dropped, so a client the checker left behind cannot read the next state as if
//! it were its own. Dropping a [`StateServer`] stops the server and removes the socket and
//! its folder.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nbd_server::backend::{Backend, Layer, Origin, OverlayBackend, Source};
use nbd_server::{BackgroundServer, Export, ExportRegistry, Server, ServerConfig};

use crate::history::{Epoch, Op, OpData};
use crate::overlay::{base_bytes, ImageError, LargerBase};
use crate::states::CrashState;

/// Longest Unix socket path the kernel takes (`sun_path` is 108 bytes with its NUL).
pub const SOCKET_PATH_BYTES_MAX: usize = 107;
/// Bytes read at a time when a served state is saved to a file.
const SAVE_CHUNK_BYTES: usize = 1024 * 1024;
// Two exports per job slot must fit one server.
const _: () = assert!(2 * crate::check::JOBS_MAX <= nbd_server::export::EXPORTS_MAX);

/// Index of the log's payloads among the backend's sources.
pub(crate) const LOG_SOURCE: usize = 0;
/// Index of the flattened prefix ([`FlatPrefix`]) among the backend's sources.
const FLAT_SOURCE: usize = 1;

/// Runs the prefix layer may hold (about 100 bytes of memory each) before it is flattened:
/// its bytes written into a file of the work folder, a sparse copy of the base, and the layer
/// replaced by one run over that file. Memory then stays bounded however large the disk and
/// however scattered the log's writes; a log whose prefix never reaches it is never copied.
pub const PREFIX_RUNS_MAX: usize = 1 << 20;

/// The prefix's run limit in effect: [`PREFIX_RUNS_MAX`], or `CRASHMONKEY_PREFIX_RUNS_MAX`
/// when set (so that tests can make a small log flatten its prefix).
fn prefix_runs_max() -> usize {
    crate::limit_from_env("CRASHMONKEY_PREFIX_RUNS_MAX", PREFIX_RUNS_MAX)
}

/// Bytes copied at a time when the prefix is flattened.
const FLATTEN_CHUNK_BYTES: usize = 1024 * 1024;

/// Levels the served prefix keeps after a merge, at most ([`ServedPrefix`]); a read of a
/// state goes through each.
pub const PREFIX_LEVELS_MAX: usize = 12;
/// A level of the prefix is merged with the one over it while it holds at most this many
/// times that one's runs, so each level is more than this many times the next one's size.
const LEVEL_RUNS_RATIO: usize = 2;

/// The flattened prefix: a file made at the first flattening, read as a source of every
/// slot's backend. It changes only while every slot is cleared (between batches).
#[derive(Default)]
struct FlatPrefix(std::sync::OnceLock<File>);

impl Source for FlatPrefix {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self.0.get() {
            Some(f) => std::os::unix::fs::FileExt::read_exact_at(f, buf, offset),
            None => Err(io::Error::other("the prefix has not been flattened")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("serving crash states over NBD: {0}")]
    Io(#[from] io::Error),
    #[error(
        "the NBD socket path {path} is {bytes} bytes, longer than the {SOCKET_PATH_BYTES_MAX} \
         a Unix socket takes; set TMPDIR to a shorter folder"
    )]
    SocketPathTooLong { path: String, bytes: usize },
    #[error("serving crash states over NBD: {0}")]
    Export(#[from] nbd_server::ExportError),
}

/// The in-process NBD server of a check run. See the module docs.
pub struct StateServer {
    /// Declared first: dropped (shut down) before the folder of its socket goes.
    server: Option<BackgroundServer>,
    slots: Vec<Arc<OverlayBackend>>,
    exports: ExportRegistry,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

/// Every epoch before the batch being checked, as the layers its states stand on: levels
/// merged as batches join, each more than [`LEVEL_RUNS_RATIO`] times the size of the one
/// over it (so a run is merged about log(runs) times over a whole check, and a batch joins
/// without a search of the whole prefix a write). The batches' layers join as they are
/// ([`Self::join`]); [`Self::merge`] merges them in while the next batch is checked, on new
/// layers, since that batch's states stand on the old ones.
///
/// Past [`PREFIX_RUNS_MAX`] runs, between batches, the prefix is flattened
/// ([`Self::flatten_if_large`]): its bytes written into a file of the work folder, a sparse
/// copy of the base, and the levels replaced by one run over that file.
pub struct ServedPrefix {
    /// Merged levels, bottom (oldest) first.
    levels: Vec<Arc<Layer>>,
    /// Layers joined since the last merge, bottom first, over the levels.
    joined: Vec<Arc<Layer>>,
    /// The flattened prefix, its path, and what it is made from.
    flat: Arc<FlatPrefix>,
    flat_path: PathBuf,
    base: PathBuf,
    log: Arc<File>,
    disk_bytes: u64,
    runs_max: usize,
}

/// The layer of `op`'s `pieces`, added to `layer` (runs of the log's payloads, or zeros).
pub(crate) fn put_pieces(layer: &mut Layer, op: &Op, pieces: &[(u64, u64)]) {
    for &(off, len) in pieces {
        let origin = match op.data {
            OpData::Zero => Origin::Zero,
            OpData::Log { payload_offset } => Origin::Source {
                source: LOG_SOURCE,
                offset: payload_offset + (off - op.offset),
            },
        };
        layer.put(off, len, origin);
    }
}

/// `nbd+unix:///NAME?socket=PATH`, the path percent-encoded where a URI needs it.
pub fn nbd_unix_uri(export: &str, socket: &Path) -> String {
    let mut path = String::new();
    for &b in socket.as_os_str().as_encoded_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            path.push(char::from(b));
        } else {
            path.push_str(&format!("%{b:02X}"));
        }
    }
    format!("nbd+unix:///{export}?socket={path}")
}

impl StateServer {
    /// Serves `slots` states at once of a disk of `disk_bytes` over `base`, whose log's
    /// payloads are in `log`; with the (empty) prefix they stand on, flattened into `work`.
    pub fn start(
        base: &Path,
        log: File,
        disk_bytes: u64,
        larger: LargerBase,
        slots: usize,
        work: &Path,
    ) -> Result<(Self, ServedPrefix), ServeError> {
        let started = std::time::Instant::now();
        base_bytes(base, disk_bytes, larger)?;
        let base_file = File::open(base).map_err(|source| ImageError::Io {
            path: base.to_path_buf(),
            source,
        })?;
        let base_file: Arc<dyn Source> = Arc::new(base_file);
        let log = Arc::new(log);
        let flat = Arc::new(FlatPrefix::default());
        let sources: Vec<Arc<dyn Source>> = vec![log.clone(), flat.clone()];
        let dir = tempfile::Builder::new()
            .prefix("crashmonkey-nbd")
            .tempdir_in(std::env::temp_dir())?;
        let socket = dir.path().join("nbd.sock");
        let bytes = socket.as_os_str().len();
        if bytes > SOCKET_PATH_BYTES_MAX {
            let path = socket.display().to_string();
            return Err(ServeError::SocketPathTooLong { path, bytes });
        }
        let mut backends = Vec::with_capacity(slots);
        let mut exports = Vec::with_capacity(2 * slots);
        for slot in 0..slots {
            let b = Arc::new(OverlayBackend::new(
                disk_bytes,
                base_file.clone(),
                sources.clone(),
            ));
            exports.push(Export::new(export_name(slot, false), b.clone(), true));
            exports.push(Export::new(export_name(slot, true), b.clone(), false));
            backends.push(b);
        }
        let exports = ExportRegistry::new(exports)?;
        let server = Server::start_background(ServerConfig {
            listen: None,
            unix: Some(socket.clone()),
            exports: exports.clone(),
            tls: None,
        })?;
        tracing::debug!(
            "NBD server for {slots} slots listening on {} after {} us",
            socket.display(),
            started.elapsed().as_micros()
        );
        let prefix = ServedPrefix {
            levels: Vec::new(),
            joined: Vec::new(),
            flat,
            flat_path: work.join("flat-prefix.img"),
            base: base.to_path_buf(),
            log,
            disk_bytes,
            runs_max: prefix_runs_max(),
        };
        let server = StateServer {
            server: Some(server),
            slots: backends,
            exports,
            socket,
            _dir: dir,
        };
        Ok((server, prefix))
    }

    /// The URI of slot `slot`'s state: read-only, or copy-on-write.
    pub fn uri(&self, slot: usize, cow: bool) -> String {
        nbd_unix_uri(&export_name(slot, cow), &self.socket)
    }

    /// The Unix socket the server listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Puts every operation of `epoch` on `layer`: the layer of the epochs between the
    /// prefix and a later one whose states are checked before the prefix moves past them
    /// ([`Self::serve`]). Consecutive epochs share one layer, so that a read of a state goes
    /// through one layer per epoch with states before it in its batch, not one per epoch.
    /// The layers join the prefix after their batch ([`ServedPrefix::join`]).
    pub fn put_epoch(layer: &mut Layer, epoch: &Epoch) {
        for op in &epoch.ops {
            put_pieces(layer, op, &op.pieces);
        }
    }

    /// Slot `slot` serves `state` (of `epoch`) from now on, on top of `below`: the layers of
    /// the prefix ([`ServedPrefix::layers`]) and of the epochs between it and `epoch`
    /// ([`Self::put_epoch`]), bottom first.
    pub fn serve(&self, slot: usize, below: &[Arc<Layer>], epoch: &Epoch, state: &CrashState) {
        let mut own = Layer::new();
        for &i in &state.included {
            let op = &epoch.ops[i];
            put_pieces(&mut own, op, &op.pieces);
        }
        if let Some(t) = &state.torn {
            put_pieces(&mut own, &epoch.ops[t.index], &t.pieces);
        }
        let mut view = Vec::with_capacity(below.len() + 1);
        view.extend(below.iter().cloned());
        view.push(Arc::new(own));
        self.set_view(slot, view);
    }

    /// Slot `slot` serves the bare base until its next state.
    pub fn clear(&self, slot: usize) {
        self.set_view(slot, Vec::new());
    }

    fn set_view(&self, slot: usize, layers: Vec<Arc<Layer>>) {
        for cow in [false, true] {
            if let Some(e) = self.exports.lookup(&export_name(slot, cow)) {
                e.disconnect_all();
            }
        }
        self.slots[slot].set_view(layers);
    }

    /// Writes `state` (of `epoch`) to a new file `path`, as the state's image, leaving zero
    /// runs as holes. Slot `slot` serves it meanwhile and is cleared after.
    pub fn save(
        &self,
        slot: usize,
        below: &[Arc<Layer>],
        epoch: &Epoch,
        state: &CrashState,
        path: &Path,
    ) -> Result<(), ServeError> {
        use std::os::unix::fs::FileExt;
        self.serve(slot, below, epoch, state);
        let backend = &self.slots[slot];
        let file = File::create(path)?;
        let size = backend.size();
        file.set_len(size)?;
        let mut buf = vec![0u8; SAVE_CHUNK_BYTES];
        let mut at = 0u64;
        while at < size {
            let n = ((size - at) as usize).min(SAVE_CHUNK_BYTES);
            backend.read(None, at, &mut buf[..n])?;
            if buf[..n].iter().any(|&b| b != 0) {
                file.write_all_at(&buf[..n], at)?;
            }
            at += n as u64;
        }
        self.clear(slot);
        Ok(())
    }

    /// Stops the server; its socket and folder go when `self` drops.
    pub fn shutdown(mut self) -> io::Result<()> {
        let started = std::time::Instant::now();
        let done = match self.server.take() {
            Some(s) => s.shutdown(),
            None => Ok(()),
        };
        tracing::debug!("NBD server stopped in {} us", started.elapsed().as_micros());
        done
    }
}

impl ServedPrefix {
    /// The layers of every epoch before the batch to check next, bottom first: what its
    /// states stand on. They never change; joins and merges make new ones.
    pub fn layers(&self) -> Vec<Arc<Layer>> {
        self.levels.iter().chain(&self.joined).cloned().collect()
    }

    /// `layers` (a checked batch's, bottom first) join the prefix, over what it holds.
    pub fn join(&mut self, layers: impl IntoIterator<Item = Arc<Layer>>) {
        self.joined.extend(layers);
    }

    /// Merges the joined layers into the levels, and levels into the ones under them while
    /// those are not [`LEVEL_RUNS_RATIO`] times larger, or while there are more than
    /// [`PREFIX_LEVELS_MAX`]. Layers handed out before keep their content.
    pub fn merge(&mut self) {
        let Some(first) = self.joined.first().cloned() else {
            return;
        };
        let batch = self.joined[1..]
            .iter()
            .fold(first, |lower, upper| Arc::new(Layer::merged(&lower, upper)));
        self.joined.clear();
        self.levels.push(batch);
        while let [.., lower, upper] = &self.levels[..] {
            let small = lower.runs() <= LEVEL_RUNS_RATIO * upper.runs();
            if !small && self.levels.len() <= PREFIX_LEVELS_MAX {
                break;
            }
            let one = Arc::new(Layer::merged(lower, upper));
            self.levels.truncate(self.levels.len() - 2);
            self.levels.push(one);
        }
    }

    /// Runs the prefix's layers hold.
    pub fn runs(&self) -> usize {
        self.levels
            .iter()
            .chain(&self.joined)
            .map(|l| l.runs())
            .sum()
    }

    /// Flattens the prefix if it holds more than [`PREFIX_RUNS_MAX`] runs. Call it only
    /// while no state is served (between batches): the flat file changes under every layer
    /// that reads it.
    pub fn flatten_if_large(&mut self) -> Result<(), ServeError> {
        if self.runs() > self.runs_max {
            self.flatten()?;
        }
        Ok(())
    }

    /// Writes the prefix's runs into the flat file (made first as a sparse copy of the base),
    /// bottom layer first, and makes the prefix one run over it ([`PREFIX_RUNS_MAX`]).
    fn flatten(&mut self) -> Result<(), ServeError> {
        let started = std::time::Instant::now();
        if self.flat.0.get().is_none() {
            crate::overlay::sparse_copy(&self.base, &self.flat_path, self.disk_bytes)?;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.flat_path)?;
            let _ = self.flat.0.set(f);
        }
        let flat = self.flat.0.get().expect("made above");
        let mut buf = vec![0u8; FLATTEN_CHUNK_BYTES];
        let runs = self.runs();
        for layer in self.levels.iter().chain(&self.joined) {
            write_runs(layer, &self.log, flat, &mut buf)?;
        }
        let mut one = Layer::new();
        one.put(
            0,
            self.disk_bytes,
            Origin::Source {
                source: FLAT_SOURCE,
                offset: 0,
            },
        );
        self.levels = vec![Arc::new(one)];
        self.joined.clear();
        tracing::debug!(
            "flattened the prefix ({runs} runs) in {} ms",
            started.elapsed().as_millis()
        );
        Ok(())
    }
}

/// Writes `layer`'s runs into `flat` at their places (runs of the flat file itself are there
/// already), through `buf`.
fn write_runs(layer: &Layer, log: &File, flat: &File, buf: &mut [u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    for (start, len, from) in layer.iter() {
        if matches!(from, Origin::Source { source, .. } if source == FLAT_SOURCE) {
            continue;
        }
        let mut at = 0;
        while at < len {
            let n = ((len - at) as usize).min(buf.len());
            match from.skip(at) {
                Origin::Source { offset, .. } => Source::read_exact_at(log, &mut buf[..n], offset)?,
                Origin::Zero => buf[..n].fill(0),
            }
            flat.write_all_at(&buf[..n], start + at)?;
            at += n as u64;
        }
    }
    Ok(())
}

/// The export of slot `slot`: `state-N`, or `state-N-cow`.
fn export_name(slot: usize, cow: bool) -> String {
    if cow {
        format!("state-{slot}-cow")
    } else {
        format!("state-{slot}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DISK: u64 = 1 << 16;
    const LOG: u64 = 1 << 16;

    /// A prefix over a zero base of `DISK` bytes whose log is `LOG` seeded bytes, flattened
    /// past `runs_max` runs into `dir`; and a backend reading the same sources.
    fn prefix_and_backend(dir: &Path, runs_max: usize) -> (ServedPrefix, OverlayBackend) {
        let base = dir.join("base.img");
        File::create(&base).unwrap().set_len(DISK).unwrap();
        let bytes: Vec<u8> = (0..LOG).map(|i| (i * 131 % 251) as u8).collect();
        std::fs::write(dir.join("log"), bytes).unwrap();
        let log = Arc::new(File::open(dir.join("log")).unwrap());
        let flat = Arc::new(FlatPrefix::default());
        let sources: Vec<Arc<dyn Source>> = vec![log.clone(), flat.clone()];
        let base_file: Arc<dyn Source> = Arc::new(File::open(&base).unwrap());
        let prefix = ServedPrefix {
            levels: Vec::new(),
            joined: Vec::new(),
            flat,
            flat_path: dir.join("flat.img"),
            base,
            log,
            disk_bytes: DISK,
            runs_max,
        };
        (prefix, OverlayBackend::new(DISK, base_file, sources))
    }

    fn read_through(b: &OverlayBackend, layers: Vec<Arc<Layer>>) -> Vec<u8> {
        b.set_view(layers);
        let mut buf = vec![0u8; DISK as usize];
        b.read(None, 0, &mut buf).unwrap();
        buf
    }

    /// Batches of seeded layers join and merge (and, with a small limit, flatten): the prefix
    /// always reads as every run put in order on one layer, and keeps few levels.
    #[test]
    fn a_merged_prefix_reads_as_every_batch_put_in_order() {
        for runs_max in [usize::MAX, 50] {
            let dir = tempfile::tempdir().unwrap();
            let (mut prefix, backend) = prefix_and_backend(dir.path(), runs_max);
            let mut all = Layer::new();
            let mut x: u64 = 0x2545_F491_4F6C_DD1D;
            let mut next = |m: u64| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % m
            };
            for batch in 0..60 {
                let mut layers = Vec::new();
                for _ in 0..1 + next(4) {
                    let mut l = Layer::new();
                    for _ in 0..1 + next(40) {
                        let (start, len) = (next(DISK - 4096), 1 + next(4096));
                        let from = match next(5) {
                            0 => Origin::Zero,
                            _ => Origin::Source {
                                source: LOG_SOURCE,
                                offset: next(LOG - len),
                            },
                        };
                        l.put(start, len, from);
                        all.put(start, len, from);
                    }
                    layers.push(Arc::new(l));
                }
                let before = prefix.layers();
                let was = read_through(&backend, before.clone());
                prefix.join(layers);
                if batch % 3 != 2 {
                    prefix.merge();
                    assert!(prefix.levels.len() <= PREFIX_LEVELS_MAX);
                    // Layers handed out before a merge keep their content.
                    assert!(read_through(&backend, before) == was, "batch {batch}");
                }
                prefix.flatten_if_large().unwrap();
                let want = read_through(&backend, vec![Arc::new(all.clone())]);
                let got = read_through(&backend, prefix.layers());
                assert!(got == want, "batch {batch}, limit {runs_max}");
            }
            let merged = prefix.flat.0.get().is_some();
            assert_eq!(
                merged,
                runs_max != usize::MAX,
                "flattened only past the limit"
            );
        }
    }

    #[test]
    fn uris_escape_what_a_uri_cannot_hold() {
        assert_eq!(
            nbd_unix_uri("state-0", Path::new("/tmp/a b/nbd.sock")),
            "nbd+unix:///state-0?socket=/tmp/a%20b/nbd.sock"
        );
    }
}
