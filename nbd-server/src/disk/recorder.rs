//! The recorder: the write log written by a thread of its own, so the file's system calls stay
//! off the emulated disk's lock. Sequence numbers are still given under that lock, and records
//! reach the thread through one FIFO queue, so the log's order is the disk's apply order.
//! A write's payload is the cache's own buffer (shared, not copied).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::log::{LogError, LogWriter, RecordKind};

/// Records queued for the writer thread at most; appending beyond waits.
pub const RECORDER_QUEUE_RECORDS_MAX: usize = 4096;
/// Payload bytes queued at most; appending beyond waits until the queue has drained.
pub const RECORDER_QUEUE_BYTES_MAX: u64 = 64 * 1024 * 1024;

enum Payload {
    Owned(Vec<u8>),
    Shared(Arc<Vec<u8>>),
}

enum Msg {
    Record {
        seq: u64,
        kind: RecordKind,
        flags: u8,
        conn: u64,
        offset: u64,
        length: u64,
        payload: Payload,
    },
    /// Write everything queued so far and fsync, then answer.
    Sync(std::sync::mpsc::Sender<Result<(), String>>),
}

pub struct Recorder {
    tx: Option<SyncSender<Msg>>,
    thread: Option<JoinHandle<()>>,
    next_seq: u64,
    queued_bytes: Arc<AtomicU64>,
    failed: Arc<Mutex<Option<String>>>,
}

fn failure(msg: &str) -> LogError {
    LogError::Io(std::io::Error::other(msg.to_string()))
}

impl Recorder {
    pub fn create(path: &std::path::Path, disk_bytes: u64) -> Result<Self, LogError> {
        let writer = LogWriter::create(path, disk_bytes)?;
        let (tx, rx) = sync_channel(RECORDER_QUEUE_RECORDS_MAX);
        let queued_bytes = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(Mutex::new(None));
        let thread = {
            let (queued_bytes, failed) = (queued_bytes.clone(), failed.clone());
            std::thread::Builder::new()
                .name("write-log".into())
                .spawn(move || run(writer, rx, queued_bytes, failed))?
        };
        Ok(Recorder {
            tx: Some(tx),
            thread: Some(thread),
            next_seq: 0,
            queued_bytes,
            failed,
        })
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    fn check(&self) -> Result<(), LogError> {
        match &*self.failed.lock().expect("recorder flag lock") {
            Some(e) => Err(failure(e)),
            None => Ok(()),
        }
    }

    fn send(&mut self, msg: Msg) -> Result<(), LogError> {
        let tx = self.tx.as_ref().expect("sender lives until drop");
        tx.send(msg)
            .map_err(|_| failure("write-log thread is gone"))
    }

    fn push(
        &mut self,
        kind: RecordKind,
        flags: u8,
        conn: u64,
        offset: u64,
        length: u64,
        payload: Payload,
    ) -> Result<u64, LogError> {
        self.check()?;
        let bytes = match &payload {
            Payload::Owned(v) => v.len() as u64,
            Payload::Shared(a) => a.len() as u64,
        };
        if self.queued_bytes.load(Ordering::Acquire) + bytes > RECORDER_QUEUE_BYTES_MAX {
            self.drain()?; // back-pressure: bounded memory
        }
        let seq = self.next_seq;
        self.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        self.send(Msg::Record {
            seq,
            kind,
            flags,
            conn,
            offset,
            length,
            payload,
        })?;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Queues a record whose payload is copied (small payloads: flush, mark, fault, cut).
    pub fn append(
        &mut self,
        kind: RecordKind,
        flags: u8,
        conn: u64,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Result<u64, LogError> {
        self.push(
            kind,
            flags,
            conn,
            offset,
            length,
            Payload::Owned(payload.to_vec()),
        )
    }

    /// Queues a write record whose payload is the cache's buffer.
    pub fn append_shared(
        &mut self,
        kind: RecordKind,
        flags: u8,
        conn: u64,
        offset: u64,
        data: Arc<Vec<u8>>,
    ) -> Result<u64, LogError> {
        let n = data.len() as u64;
        self.push(kind, flags, conn, offset, n, Payload::Shared(data))
    }

    /// Waits until the writer thread has written (and fsynced) everything queued.
    fn drain(&mut self) -> Result<(), LogError> {
        let (reply_tx, reply_rx) = std::sync::mpsc::channel();
        self.send(Msg::Sync(reply_tx))?;
        reply_rx
            .recv()
            .map_err(|_| failure("write-log thread is gone"))?
            .map_err(|e| failure(&e))
    }

    /// Waits until every queued record is in the file and the file is on stable storage.
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.check()?;
        self.drain()
    }
}

fn run(
    mut writer: LogWriter,
    rx: Receiver<Msg>,
    queued_bytes: Arc<AtomicU64>,
    failed: Arc<Mutex<Option<String>>>,
) {
    let mut error: Option<String> = None;
    for msg in rx {
        match msg {
            Msg::Record {
                seq,
                kind,
                flags,
                conn,
                offset,
                length,
                payload,
            } => {
                let bytes: &[u8] = match &payload {
                    Payload::Owned(v) => v,
                    Payload::Shared(a) => a,
                };
                let n = bytes.len() as u64;
                if error.is_none() {
                    match writer.append(kind, flags, conn, offset, length, bytes) {
                        Ok(s) => assert_eq!(s, seq, "records reach the writer in sequence order"),
                        Err(e) => {
                            tracing::error!("write log failed: {e}");
                            error = Some(e.to_string());
                            *failed.lock().expect("recorder flag lock") = error.clone();
                        }
                    }
                }
                queued_bytes.fetch_sub(n, Ordering::AcqRel);
            }
            Msg::Sync(reply) => {
                let r = match &error {
                    Some(e) => Err(e.clone()),
                    None => writer.sync().map_err(|e| e.to_string()),
                };
                let _ = reply.send(r);
            }
        }
    }
    // The sender is gone: LogWriter's drop flushes what is buffered.
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
