//! nbd-server: an NBD server whose emulated disk records every write.
//!
//! Map of the crate (keep it true):
//! - `proto`       wire constants and pure codecs: handshake, options, requests, replies (no IO)
//! - `server`      listener (TCP, Unix), connection tasks, named limits, graceful shutdown
//! - `handshake`   fixed-newstyle option haggling up to the transmission phase, STARTTLS
//! - `tls`         TLS credentials (nbdkit's certificate directory), the TLS stream's halves
//! - `connection`  the transmission phase: request checks, concurrent execution, reply writer
//! - `lent`        READ replies sent straight from a backend's memory (vectored, non-blocking)
//! - `export`      export configuration (`NAME:size=SIZE[,file=PATH][,readonly]`) and registry
//! - `backend`     the `Backend` trait the server drives; memory, file, and overlay (crash states)
//! - `disk`        the emulated disk: durability rule, epochs, recorder, power cut, faults
//! - `fscore_device` fs-core's `BlockDevice` over the emulated disk, so models leave write logs
//! - `log`         the write-log format: writer and streaming reader
//! - `priority`    the nice value of the runtime's threads beside an fs-core engine thread
//! - `control`     control socket (`--control PATH`): mark, crash, stats; and its client

pub mod backend;
pub mod connection;
pub mod control;
pub mod disk;
pub mod export;
pub mod fscore;
pub mod fscore_device;
pub mod handshake;
pub mod lent;
pub mod limits;
pub mod log;
pub mod priority;
pub mod proto;
pub mod reply;
pub mod server;
pub mod tls;

/// The test suite's skip policy (`tests/common/skip.rs`), for unit tests that need something
/// the machine may lack.
#[cfg(test)]
#[path = "../tests/common/skip.rs"]
pub(crate) mod test_skip;

/// The test suite's tmpfs of a fixed size (`tests/common/tmpfs.rs`), for unit tests of a full
/// filesystem.
#[cfg(test)]
#[path = "../tests/common/tmpfs.rs"]
#[allow(dead_code)]
pub(crate) mod test_tmpfs;

pub use export::{build_backend, Export, ExportError, ExportRegistry, ExportSpec};
pub use server::{BackgroundServer, Server, ServerConfig, ServerHandle};
