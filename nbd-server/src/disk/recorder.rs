//! The recorder: the write log written by a thread of its own, so the file's system calls stay
//! off the emulated disk's lock. Sequence numbers are still given under that lock, and records
//! reach the thread through one FIFO queue, so the log's order is the disk's apply order.
//! A write's payload is the cache's own buffer (shared, not copied).
//!
//! The queue is handed over in batches: the thread takes everything queued at once, and after
//! a small batch it pauses for [`RECORDER_GATHER_MICROS`] before looking again, so that under
//! a stream of small writes it wakes a few thousand times a second rather than once per
//! write. An appender only pays for a wake-up (a futex call) when the thread is asleep.
//! (Measured with `BINS=... ab.py "randwrite 4k 32"`: one hand-over per record through a
//! channel cost about 30% of the IOPS of 4 KiB random writes on 2 cores, mostly in wake-ups
//! and context switches.)

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::backend::{Block, BLOCK_BYTES};
use crate::log::{LogError, LogWriter, RecordKind, FILE_HEADER_BYTES, RECORD_HEADER_BYTES};

/// Records queued for the writer thread at most; appending beyond waits.
pub const RECORDER_QUEUE_RECORDS_MAX: usize = 4096;
/// Payload bytes queued at most; appending beyond waits until the thread has taken the queue.
pub const RECORDER_QUEUE_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// After a batch of fewer than [`RECORDER_SMALL_BATCH_RECORDS`] records the thread waits this
/// long before taking the next one, so that records gather.
pub const RECORDER_GATHER_MICROS: u64 = 200;
/// When out of work, the thread pushes its buffer to the file at most this often (a push of
/// a partial block is one more synchronous write); mark, fault and power-cut records and
/// `sync` push at once.
pub const RECORDER_PUSH_INTERVAL_MILLIS: u64 = 20;
/// Batches smaller than this are followed by a gather pause.
pub const RECORDER_SMALL_BATCH_RECORDS: usize = 64;

enum Payload {
    Owned(Vec<u8>),
    Shared(Arc<Vec<u8>>),
    /// The cache entry's blocks, in order.
    Blocks(Arc<Vec<Block>>),
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
    /// Put everything queued so far in the file (and with `durable`, on stable storage), then
    /// answer. Pushes that meet in one batch share one write (and one sync).
    Push {
        durable: bool,
        reply: std::sync::mpsc::Sender<Result<(), Failure>>,
    },
}

/// Why the log stopped taking records (cloned to every later appender).
#[derive(Debug, Clone)]
pub struct Failure {
    message: String,
    /// The disk holding the log is full (so changes are refused with ENOSPC).
    full: bool,
}

impl Failure {
    fn of(e: &LogError) -> Self {
        Failure {
            message: e.to_string(),
            full: matches!(e, LogError::LogDiskFull),
        }
    }

    fn error(&self) -> LogError {
        if self.full {
            LogError::LogDiskFull
        } else {
            LogError::Io(std::io::Error::other(self.message.clone()))
        }
    }
}

/// A push on its way (see [`Recorder::push`]): wait for it with [`PushWait::wait`], without
/// holding the emulated disk's lock.
pub struct PushWait(std::sync::mpsc::Receiver<Result<(), Failure>>);

impl PushWait {
    /// Waits until the records queued before the push are in the file (or on stable storage).
    pub fn wait(self) -> Result<(), LogError> {
        match self.0.recv() {
            Ok(r) => r.map_err(|f| f.error()),
            Err(_) => Err(failure("write-log thread is gone")),
        }
    }
}

#[derive(Default)]
struct Queue {
    msgs: VecDeque<Msg>,
    bytes: u64,
    /// The thread waits on `Shared::ready` for something to do.
    idle: bool,
    /// Appenders wait on `Shared::space` for the queue to shrink.
    full_waiters: usize,
    /// No more records come: the thread writes what is left and ends.
    closed: bool,
    /// The first error of the log file; every later append fails with it.
    failed: Option<Failure>,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    space: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct Recorder {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    next_seq: u64,
    /// Bytes the log will hold once every queued record is written.
    bytes: u64,
}

fn failure(msg: &str) -> LogError {
    LogError::Io(std::io::Error::other(msg.to_string()))
}

impl Recorder {
    /// Starts recording to `path`. A file already there is refused unless `overwrite`.
    pub fn create(
        path: &std::path::Path,
        disk_bytes: u64,
        overwrite: bool,
    ) -> Result<Self, LogError> {
        let writer = if overwrite {
            LogWriter::create(path, disk_bytes)?
        } else {
            LogWriter::create_new(path, disk_bytes)?
        };
        let shared = Arc::new(Shared::default());
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("write-log".into())
                .spawn(move || run(writer, &shared))?
        };
        Ok(Recorder {
            shared,
            thread: Some(thread),
            next_seq: 0,
            bytes: FILE_HEADER_BYTES as u64,
        })
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Bytes the log will hold once every record appended so far is written.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Queues `msg` (waiting while the queue is full) and wakes the thread if it sleeps.
    fn send(&mut self, msg: Msg, bytes: u64) -> Result<(), LogError> {
        let mut q = self.shared.lock();
        if let Some(f) = &q.failed {
            return Err(f.error());
        }
        while q.msgs.len() >= RECORDER_QUEUE_RECORDS_MAX
            || (q.bytes > 0 && q.bytes + bytes > RECORDER_QUEUE_BYTES_MAX)
        {
            // Back-pressure keeps memory bounded; the thread is surely awake with a full queue,
            // but tell it anyway rather than rely on that.
            if q.idle {
                self.shared.ready.notify_one();
            }
            q.full_waiters += 1;
            q = self.shared.space.wait(q).unwrap_or_else(|e| e.into_inner());
            q.full_waiters -= 1;
            if let Some(f) = &q.failed {
                return Err(f.error());
            }
        }
        q.msgs.push_back(msg);
        q.bytes += bytes;
        if q.idle {
            q.idle = false;
            self.shared.ready.notify_one();
        }
        Ok(())
    }

    fn enqueue(
        &mut self,
        kind: RecordKind,
        flags: u8,
        conn: u64,
        offset: u64,
        length: u64,
        payload: Payload,
    ) -> Result<u64, LogError> {
        let bytes = match &payload {
            Payload::Owned(v) => v.len() as u64,
            Payload::Shared(a) => a.len() as u64,
            Payload::Blocks(b) => (b.len() * BLOCK_BYTES) as u64,
        };
        let seq = self.next_seq;
        self.send(
            Msg::Record {
                seq,
                kind,
                flags,
                conn,
                offset,
                length,
                payload,
            },
            bytes,
        )?;
        self.next_seq += 1;
        self.bytes += RECORD_HEADER_BYTES as u64 + bytes;
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
        self.enqueue(
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
        self.enqueue(kind, flags, conn, offset, n, Payload::Shared(data))
    }

    /// Queues a write record whose payload is the cache entry's blocks.
    pub fn append_blocks(
        &mut self,
        flags: u8,
        conn: u64,
        offset: u64,
        blocks: Arc<Vec<Block>>,
    ) -> Result<u64, LogError> {
        let n = (blocks.len() * BLOCK_BYTES) as u64;
        self.enqueue(
            RecordKind::Write,
            flags,
            conn,
            offset,
            n,
            Payload::Blocks(blocks),
        )
    }

    /// Asks the thread to put every record queued so far in the file (handed to the operating
    /// system, so that a killed server loses none of them) and, with `durable`, on stable
    /// storage. Wait for it with [`PushWait::wait`] once the disk's lock is released.
    pub fn push(&mut self, durable: bool) -> Result<PushWait, LogError> {
        let (reply, rx) = std::sync::mpsc::channel();
        self.send(Msg::Push { durable, reply }, 0)?;
        Ok(PushWait(rx))
    }

    /// Waits until every queued record is in the file and the file is on stable storage.
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.push(true)?.wait()
    }
}

/// The thread: takes the whole queue at a time and writes it, in order.
fn run(writer: LogWriter, shared: &Shared) {
    let mut t = Thread {
        writer,
        shared,
        error: None,
        last_push: std::time::Instant::now(),
        unpushed: false,
    };
    while let Some(batch) = t.next_batch() {
        let small = !batch.is_empty() && batch.len() < RECORDER_SMALL_BATCH_RECORDS;
        t.write_batch(batch);
        t.push_if_idle();
        if small {
            std::thread::sleep(Duration::from_micros(RECORDER_GATHER_MICROS));
        }
    }
    // Closed: LogWriter's drop flushes what is buffered.
}

/// The writer thread's state between batches.
struct Thread<'a> {
    writer: LogWriter,
    shared: &'a Shared,
    /// The first failure; nothing more goes to the file after it.
    error: Option<Failure>,
    last_push: std::time::Instant,
    /// Records appended to the writer since the last push to the file.
    unpushed: bool,
}

impl Thread<'_> {
    /// Waits for work and takes the whole queue; `None` once closed and drained. While idle
    /// with records not yet in the file, it waits no longer than their push is due.
    fn next_batch(&mut self) -> Option<VecDeque<Msg>> {
        let push_interval = Duration::from_millis(RECORDER_PUSH_INTERVAL_MILLIS);
        let shared = self.shared;
        let mut q = shared.lock();
        while q.msgs.is_empty() && !q.closed {
            q.idle = true;
            if !self.unpushed {
                q = shared.ready.wait(q).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            let due = push_interval.saturating_sub(self.last_push.elapsed());
            if due.is_zero() {
                break;
            }
            q = shared
                .ready
                .wait_timeout(q, due)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        q.idle = false;
        if q.msgs.is_empty() && q.closed {
            return None;
        }
        q.bytes = 0;
        if q.full_waiters > 0 {
            shared.space.notify_all();
        }
        Some(std::mem::take(&mut q.msgs))
    }

    /// Writes the batch's records in order, then answers its pushes with one write to the
    /// file (and one sync if any asked for it).
    fn write_batch(&mut self, batch: VecDeque<Msg>) {
        let mut pushes = Vec::new();
        self.unpushed |= !batch.is_empty();
        for msg in batch {
            match msg {
                Msg::Record {
                    seq,
                    kind,
                    flags,
                    conn,
                    offset,
                    length,
                    payload,
                } if self.error.is_none() => {
                    let appended = match &payload {
                        Payload::Owned(v) => {
                            self.writer.append(kind, flags, conn, offset, length, v)
                        }
                        Payload::Shared(a) => {
                            self.writer.append(kind, flags, conn, offset, length, a)
                        }
                        Payload::Blocks(b) => {
                            let parts: Vec<&[u8]> = b.iter().map(|b| &b[..]).collect();
                            self.writer
                                .append_parts(kind, flags, conn, offset, length, &parts)
                        }
                    };
                    match appended {
                        Ok(s) => assert_eq!(s, seq, "records reach the writer in sequence order"),
                        Err(e) => self.fail(&e),
                    }
                }
                Msg::Record { .. } => {}
                Msg::Push { durable, reply } => pushes.push((durable, reply)),
            }
        }
        if pushes.is_empty() {
            return;
        }
        let durable = pushes.iter().any(|(d, _)| *d);
        let pushed = self.push(durable);
        for (_, reply) in pushes {
            let _ = reply.send(pushed.clone());
        }
    }

    /// Puts what is buffered in the file (and with `durable` on stable storage).
    fn push(&mut self, durable: bool) -> Result<(), Failure> {
        if let Some(f) = &self.error {
            return Err(f.clone());
        }
        let r = if durable {
            self.writer.sync()
        } else {
            self.writer.flush()
        };
        match r {
            Ok(()) => {
                self.last_push = std::time::Instant::now();
                self.unpushed = false;
                Ok(())
            }
            Err(e) => {
                self.fail(&e);
                Err(Failure::of(&e))
            }
        }
    }

    /// Out of work: put what is buffered in the file, so that a reader sees it.
    fn push_if_idle(&mut self) {
        let interval = Duration::from_millis(RECORDER_PUSH_INTERVAL_MILLIS);
        if self.unpushed
            && self.error.is_none()
            && self.last_push.elapsed() >= interval
            && self.shared.lock().msgs.is_empty()
        {
            let _ = self.push(false);
        }
    }

    /// Records the first failure: later appends fail with it, and nothing more is written.
    fn fail(&mut self, e: &LogError) {
        tracing::error!("write log failed: {e}");
        let f = Failure::of(e);
        self.error = Some(f.clone());
        self.unpushed = false;
        let mut q = self.shared.lock();
        q.failed = Some(f);
        self.shared.space.notify_all();
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        {
            let mut q = self.shared.lock();
            q.closed = true;
            self.shared.ready.notify_one();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
