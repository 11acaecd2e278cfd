//! Crash states served over NBD, for checkers that take `{uri}` or `{uri-cow}`.
//!
//! One nbd-server runs in this process for the whole check, on a Unix socket in a private
//! temporary folder (mode 0700). It has two exports per checker slot (one slot per job):
//! `state-N`, read-only, and `state-N-cow`, writable, both over the same
//! [`OverlayBackend`]: the base image, a layer holding every epoch before the current one
//! (runs into the log's payloads, moved on once per epoch), and a layer holding the state's
//! own writes (built per state, as small as the state's difference). Nothing disk-sized is
//! written or copied per state. Writes through `state-N-cow` land in memory and are dropped
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
    /// Every epoch before the current one, over the base.
    prefix: Arc<Layer>,
    /// The flattened prefix, its path, and what it is made from.
    flat: Arc<FlatPrefix>,
    flat_path: PathBuf,
    base: PathBuf,
    log: Arc<File>,
    disk_bytes: u64,
    prefix_runs_max: usize,
    socket: PathBuf,
    _dir: tempfile::TempDir,
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
    /// payloads are in `log`.
    /// A flattened prefix goes to `work`.
    pub fn start(
        base: &Path,
        log: File,
        disk_bytes: u64,
        larger: LargerBase,
        slots: usize,
        work: &Path,
    ) -> Result<Self, ServeError> {
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
        Ok(StateServer {
            server: Some(server),
            slots: backends,
            exports,
            prefix: Arc::new(Layer::new()),
            flat,
            flat_path: work.join("flat-prefix.img"),
            base: base.to_path_buf(),
            log,
            disk_bytes,
            prefix_runs_max: prefix_runs_max(),
            socket,
            _dir: dir,
        })
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
    pub fn put_epoch(layer: &mut Layer, epoch: &Epoch) {
        for op in &epoch.ops {
            put_pieces(layer, op, &op.pieces);
        }
    }

    /// Slot `slot` serves `state` (of `epoch`) from now on, on top of the prefix and of
    /// `between`, the layers of the epochs between the prefix and `epoch` ([`Self::put_epoch`]).
    pub fn serve(&self, slot: usize, between: &[Arc<Layer>], epoch: &Epoch, state: &CrashState) {
        let mut own = Layer::new();
        for &i in &state.included {
            let op = &epoch.ops[i];
            put_pieces(&mut own, op, &op.pieces);
        }
        if let Some(t) = &state.torn {
            put_pieces(&mut own, &epoch.ops[t.index], &t.pieces);
        }
        let mut view = Vec::with_capacity(between.len() + 2);
        view.push(self.prefix.clone());
        view.extend(between.iter().cloned());
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

    /// Every operation of `epoch` joins the prefix. Call it with every slot cleared, so
    /// that the prefix is updated in place rather than copied (and may be flattened).
    pub fn advance(&mut self, epoch: &Epoch) -> Result<(), ServeError> {
        let prefix = Arc::make_mut(&mut self.prefix);
        Self::put_epoch(prefix, epoch);
        if prefix.runs() > self.prefix_runs_max {
            self.flatten()?;
        }
        Ok(())
    }

    /// Writes the prefix's runs into the flat file (made first as a sparse copy of the base)
    /// and makes the prefix one run over it ([`PREFIX_RUNS_MAX`]).
    fn flatten(&mut self) -> Result<(), ServeError> {
        use std::os::unix::fs::FileExt;
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
        let runs = self.prefix.runs();
        for (start, len, from) in self.prefix.iter() {
            let mut at = 0;
            while at < len {
                let n = ((len - at) as usize).min(FLATTEN_CHUNK_BYTES);
                match from {
                    Origin::Source { source, .. } if source == FLAT_SOURCE => break,
                    Origin::Source { offset, .. } => {
                        Source::read_exact_at(&*self.log, &mut buf[..n], offset + at)?
                    }
                    Origin::Zero => buf[..n].fill(0),
                }
                flat.write_all_at(&buf[..n], start + at)?;
                at += n as u64;
            }
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
        self.prefix = Arc::new(one);
        tracing::debug!(
            "flattened the prefix ({runs} runs) in {} ms",
            started.elapsed().as_millis()
        );
        Ok(())
    }

    /// Writes `state` (of `epoch`) to a new file `path`, as the state's image, leaving zero
    /// runs as holes. Slot `slot` serves it meanwhile and is cleared after.
    pub fn save(
        &self,
        slot: usize,
        between: &[Arc<Layer>],
        epoch: &Epoch,
        state: &CrashState,
        path: &Path,
    ) -> Result<(), ServeError> {
        use std::os::unix::fs::FileExt;
        self.serve(slot, between, epoch, state);
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

    #[test]
    fn uris_escape_what_a_uri_cannot_hold() {
        assert_eq!(
            nbd_unix_uri("state-0", Path::new("/tmp/a b/nbd.sock")),
            "nbd+unix:///state-0?socket=/tmp/a%20b/nbd.sock"
        );
    }
}
