//! Work done ahead on a thread of its own, bounded in memory: an epoch's sectors hashed
//! while the states of the one before are generated ([`hashed_epochs`]), and `check`'s epochs
//! generated while the ones before are checked. [`AheadBudget`] bounds what waits.

use std::sync::{Condvar, Mutex};

use nbd_server::log::LogError;

use crate::history::{Epoch, Epochs, History, Op, LOG_SPAN_BYTES_MAX};
use crate::states::{EpochHashes, StateOptions};

/// Epochs hashed ahead of the one whose states are being generated, at most (64: see
/// `check`'s `EPOCHS_AHEAD_MAX`), and the memory they may take (an epoch larger than this
/// alone still goes, on its own).
pub const HASHED_AHEAD_EPOCHS_MAX: usize = 64;
pub const HASHED_AHEAD_BYTES_MAX: usize = 64 << 20;

/// Bytes sent ahead on a channel and not yet received (at most `max`), and whether the
/// receiving side has ended (then the sender stops waiting).
pub struct AheadBudget {
    max: usize,
    state: Mutex<(usize, bool)>,
    freed: Condvar,
}

impl AheadBudget {
    pub fn new(max: usize) -> Self {
        AheadBudget {
            max,
            state: Mutex::new((0, false)),
            freed: Condvar::new(),
        }
    }

    /// Waits until `bytes` fit (or nothing is ahead); `false` if the receiver has ended.
    pub fn take(&self, bytes: usize) -> bool {
        let mut g = self.state.lock().expect("no panics under lock");
        while !g.1 && g.0 > 0 && g.0 + bytes > self.max {
            g = self.freed.wait(g).expect("no panics under lock");
        }
        g.0 += bytes;
        !g.1
    }

    /// `bytes` taken earlier were received.
    pub fn give(&self, bytes: usize) {
        let mut g = self.state.lock().expect("no panics under lock");
        g.0 = g.0.saturating_sub(bytes);
        self.freed.notify_all();
    }

    /// A guard that marks the receiving side ended when it drops, on every way out.
    pub fn closer(&self) -> AheadCloser<'_> {
        AheadCloser(self)
    }
}

/// See [`AheadBudget::closer`].
pub struct AheadCloser<'a>(&'a AheadBudget);

impl Drop for AheadCloser<'_> {
    fn drop(&mut self) {
        let mut g = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        g.1 = true;
        self.0.freed.notify_all();
    }
}

/// The estimated memory of an epoch's operations.
pub fn epoch_bytes(epoch: &Epoch) -> usize {
    epoch
        .ops
        .iter()
        .map(|o| std::mem::size_of::<Op>() + o.pieces.len() * 16)
        .sum()
}

/// An epoch and its sectors hashed, with its estimated memory, or why not.
type Hashed = Result<(Epoch, EpochHashes, usize), LogError>;

/// Calls `each` with every epoch of `history` and its sectors hashed, in order, on this
/// thread, while the epochs after it are read and hashed on another (on a long log hashing
/// was half of generating states). Stops after an error or when `each` returns `false`.
pub fn hashed_epochs(
    history: History,
    opts: &StateOptions,
    mut each: impl FnMut(Result<(Epoch, EpochHashes), LogError>) -> bool,
) -> Result<(), LogError> {
    let data = history.data_file()?;
    let budget = AheadBudget::new(HASHED_AHEAD_BYTES_MAX);
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Hashed>(HASHED_AHEAD_EPOCHS_MAX);
        let ahead = &budget;
        scope.spawn(move || hash_epochs(history, opts, &data, tx, ahead));
        // Closes the budget (and, after the loop, drops the receiver) on every way out, which
        // ends the hashing thread.
        let _closed = budget.closer();
        for item in rx {
            let failed = item.is_err();
            let item = item.map(|(epoch, h, bytes)| {
                budget.give(bytes);
                (epoch, h)
            });
            if !each(item) || failed {
                return;
            }
        }
    });
    Ok(())
}

/// Reads every epoch of `history` and hashes its sectors, in order, into `tx`; stops at the
/// first error (sent too) or once nobody receives.
fn hash_epochs(
    history: History,
    opts: &StateOptions,
    data: &std::fs::File,
    tx: std::sync::mpsc::SyncSender<Hashed>,
    budget: &AheadBudget,
) {
    let mut epochs = Epochs::new(history);
    // The payloads are hashed from the bytes the reader read to check them (reading them
    // again was a tenth of `crashmonkey states` of a 1 GiB log); the buffer is reused.
    epochs.keep_bytes(LOG_SPAN_BYTES_MAX as usize);
    let mut spare = Vec::new();
    while let Some(epoch) = epochs.next() {
        let kept = epochs.take_kept(std::mem::take(&mut spare));
        let item = epoch.and_then(|epoch| {
            let h = EpochHashes::of_kept(&epoch, opts, data, kept.as_ref())?;
            let bytes = h.bytes() + epoch_bytes(&epoch);
            Ok((epoch, h, bytes))
        });
        if let Some(kept) = kept {
            spare = kept.bytes;
        }
        let failed = item.is_err();
        if item.as_ref().is_ok_and(|(_, _, b)| !budget.take(*b)) {
            return;
        }
        if tx.send(item).is_err() || failed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::RecvTimeoutError;
    use std::sync::Arc;
    use std::time::Duration;

    /// Long enough for a `take` that should not wait to have returned.
    const SETTLE: Duration = Duration::from_millis(200);
    /// A `take` that should be released and is not fails the test after this (its thread is
    /// left behind, so that a broken budget fails rather than hangs).
    const RELEASE_WAIT: Duration = Duration::from_secs(10);

    /// `take(bytes)` on a thread of its own; its answer comes on the receiver.
    fn take_aside(b: &Arc<AheadBudget>, bytes: usize) -> std::sync::mpsc::Receiver<bool> {
        let (tx, rx) = std::sync::mpsc::channel();
        let b = b.clone();
        std::thread::spawn(move || tx.send(b.take(bytes)));
        rx
    }

    /// A take that does not fit waits until bytes are given back, and one that comes
    /// when nothing is ahead goes whatever its size.
    #[test]
    fn a_take_past_the_budget_waits_for_a_give() {
        let b = Arc::new(AheadBudget::new(10));
        assert!(
            b.take(25),
            "nothing ahead: an epoch larger than the budget goes alone"
        );
        b.give(25);
        assert!(b.take(6));
        let rx = take_aside(&b, 6);
        assert_eq!(rx.recv_timeout(SETTLE), Err(RecvTimeoutError::Timeout));
        b.give(6);
        assert_eq!(rx.recv_timeout(RELEASE_WAIT), Ok(true));
    }

    /// Once the receiving side has ended, a waiting take returns `false` instead of waiting
    /// for ever, and so does every later one.
    #[test]
    fn the_closer_releases_a_waiting_take() {
        let b = Arc::new(AheadBudget::new(10));
        assert!(b.take(10));
        let rx = take_aside(&b, 1);
        assert_eq!(rx.recv_timeout(SETTLE), Err(RecvTimeoutError::Timeout));
        drop(b.closer());
        assert_eq!(rx.recv_timeout(RELEASE_WAIT), Ok(false));
        assert!(!b.take(0));
    }
}
