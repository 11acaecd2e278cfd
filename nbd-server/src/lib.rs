//! nbd-server: an NBD server whose emulated disk records every write.
//!
//! Map of the crate (keep it true):
//! - `backend`  the `Backend` trait the server drives, and the plain backends (memory, file)
//! - `proto`    wire constants, headers, option and request codecs (pure, no IO)
//! - `server`   listener, connection tasks, limits, graceful shutdown
//! - `export`   export configuration (`NAME:size=SIZE[,file=PATH][,readonly]`) and registry
//! - `disk`     the emulated disk: durability rule, epochs, recorder, power cut, faults
//! - `log`      the write-log format: writer and streaming reader

pub mod backend;
pub mod disk;
pub mod log;
