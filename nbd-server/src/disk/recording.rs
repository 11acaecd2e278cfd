//! The emulated disk's side of its write log: appending records in apply order, the log's cap
//! (`record-max`), and the rule that a failed log fails the disk for good.

use super::recorder::{Pusher, Record, Recorder};
use super::{Refusal, RECORD_MAX_SLACK_BYTES};
use crate::log::{
    encode_payload, FullPayload, FullReason, LogError, RecordKind, FULL_PAYLOAD_BYTES,
    RECORD_HEADER_BYTES,
};

/// The write log of one disk, if it records.
pub struct Recording {
    recorder: Option<Recorder>,
    /// Why the log stopped for good; every change is refused with it from then on.
    failed: Option<Refusal>,
    /// [`super::DiskConfig::record_max_bytes`].
    record_max: Option<u64>,
    /// The log reached `record_max` (a full record was appended).
    capped: bool,
}

impl Recording {
    pub fn new(recorder: Option<Recorder>, record_max: Option<u64>) -> Self {
        Recording {
            recorder,
            failed: None,
            record_max,
            capped: false,
        }
    }

    /// Records appended so far.
    pub fn records(&self) -> u64 {
        self.recorder.as_ref().map_or(0, Recorder::next_seq)
    }

    /// Refuses changes once the log failed.
    pub fn check(&self) -> Result<(), Refusal> {
        self.failed.map_or(Ok(()), Err)
    }

    /// Appends `record` if recording and returns its sequence number; a log failure fails the
    /// disk for good.
    pub fn append(&mut self, record: Record) -> Result<Option<u64>, Refusal> {
        self.check()?;
        if self.recorder.is_none() {
            return Ok(None);
        }
        if let Some(cap) = self.record_max {
            self.within_cap(record.head.kind, record.payload.len() as u64, cap)?;
        }
        let log = self.recorder.as_mut().expect("checked above");
        match log.append(record) {
            Ok(seq) => Ok(Some(seq)),
            Err(e) => {
                tracing::error!("write log failed: {e}; refusing further changes");
                let refusal = Refusal::of_log(&e);
                self.failed = Some(refusal);
                Err(refusal)
            }
        }
    }

    /// Refuses a record that would take the log past its cap (data records at the cap; the
    /// others [`RECORD_MAX_SLACK_BYTES`] later), appending the full record the first time a
    /// data record is refused.
    fn within_cap(&mut self, kind: RecordKind, payload: u64, cap: u64) -> Result<(), Refusal> {
        let log = self.recorder.as_mut().expect("caller checked");
        let full_record = (RECORD_HEADER_BYTES + FULL_PAYLOAD_BYTES) as u64;
        let after = log.bytes() + RECORD_HEADER_BYTES as u64 + payload;
        let limit = if kind.is_data() {
            cap.saturating_sub(full_record)
        } else {
            cap.saturating_add(RECORD_MAX_SLACK_BYTES)
        };
        if after <= limit {
            return Ok(());
        }
        if kind.is_data() && !self.capped {
            self.capped = true;
            tracing::error!(
                "write log reached its cap (record-max={cap} bytes): writes, trims and zero \
                 writes are refused with ENOSPC from now on"
            );
            let full = encode_payload(&FullPayload {
                reason: FullReason::Cap,
                log_bytes: log.bytes(),
            });
            if let Err(e) = log.append(Record::event(RecordKind::Full, 0, full)) {
                self.failed = Some(Refusal::of_log(&e));
            }
        }
        Err(Refusal::LogCapped)
    }

    /// The pusher of the log (if any), taken under the disk's lock for a FLUSH or FUA reply:
    /// push with [`wait_log`] after releasing it.
    pub fn pusher(&self) -> Option<Pusher> {
        self.recorder.as_ref().map(Recorder::pusher)
    }

    /// Waits until every record is in the file and the file is on stable storage.
    pub fn sync(&mut self) -> Result<(), LogError> {
        match self.recorder.as_mut() {
            Some(log) => log.sync(),
            None => Ok(()),
        }
    }
}

/// Puts every record so far in the log's file (see [`Pusher::push`]), on stable storage with
/// `durable`. A failed push fails the reply (and, through the recorder, every later change).
pub fn wait_log(pushed: Option<Pusher>, durable: bool) -> Result<(), Refusal> {
    match pushed.map(|p| p.push(durable)) {
        Some(Err(e)) => {
            tracing::error!("write log failed: {e}");
            Err(Refusal::of_log(&e))
        }
        _ => Ok(()),
    }
}
