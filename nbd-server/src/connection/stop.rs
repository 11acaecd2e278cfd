//! Why a connection stops reading requests, and the signals that stop it from outside.

use tokio::sync::watch;

use super::sink::Sink;

/// Why a connection stops reading requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The server shuts down: requests in flight finish and their replies go out.
    Shutdown,
    /// Every connection of the export was dropped (`Export::disconnect_all`, or a power cut
    /// of its emulated disk): nothing more reaches the client.
    Dropped,
    /// The client took no reply for `REPLY_STALL_SECONDS_MAX` (its socket is cut already).
    Stalled,
    /// `NBD_CMD_DISC`: requests in flight finish, then the socket closes.
    Disconnect,
    /// The stream ended or cannot be trusted any more: end of stream, a read error, a bad
    /// request magic, a payload too large to discard.
    Ended,
}

/// Resolves once shutdown was asked for (or the handle is gone).
pub(crate) async fn wait_for_shutdown(rx: &mut watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// The server's shutdown signal and the export's disconnect signal, as one connection sees
/// them.
pub struct Signals {
    shutdown: watch::Receiver<bool>,
    /// Bumped by `Export::disconnect_all` and, for an emulated disk, by its power cut.
    kick: watch::Receiver<u64>,
}

impl Signals {
    pub fn new(shutdown: watch::Receiver<bool>, kick: watch::Receiver<u64>) -> Self {
        Signals { shutdown, kick }
    }

    /// A stop already signalled, checked before each request: with requests always
    /// buffered, [`Self::wait`] would never get its turn.
    pub fn check<W>(&self, sink: &Sink<W>) -> Result<(), Stop> {
        if *self.shutdown.borrow() {
            return Err(Stop::Shutdown);
        }
        if self.kick.has_changed().unwrap_or(false) {
            return Err(Stop::Dropped);
        }
        if sink.is_stalled() {
            return Err(Stop::Stalled);
        }
        Ok(())
    }

    /// Resolves with the first stop signalled.
    pub async fn wait<W>(&mut self, sink: &Sink<W>) -> Stop {
        tokio::select! {
            _ = wait_for_shutdown(&mut self.shutdown) => Stop::Shutdown,
            _ = self.kick.changed() => Stop::Dropped,
            _ = sink.stalled() => Stop::Stalled,
        }
    }
}
