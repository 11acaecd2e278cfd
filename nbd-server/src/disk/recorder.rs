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
//!
//! **Pushes.** A FLUSH or FUA reply waits until every record before it is in the file (see
//! [`Pusher::push`]). The caller does that work itself rather than ask the thread: whoever
//! holds the writer takes the queue and writes it, so taking and writing stay in sequence
//! order, and a flush costs no hand-over between threads (asking the thread, and waiting for
//! its answer, more than doubled the latency of a FLUSH: 90 us -> 218 us with fio, qd 1).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::backend::WriteData;
use crate::log::{LogError, LogWriter, RecordHead, FILE_HEADER_BYTES, RECORD_HEADER_BYTES};

/// Where the recorder's records go: the log file ([`LogWriter`]) in the server; in tests, a
/// writer that fails on demand, to drive every path a failed log takes.
pub trait LogSink: Send {
    /// Appends one record and returns its sequence number (see [`LogWriter::append_parts`]).
    fn append_parts(&mut self, head: &RecordHead, parts: &[&[u8]]) -> Result<u64, LogError>;
    /// Hands the records appended so far to the operating system.
    fn flush(&mut self) -> Result<(), LogError>;
    /// Puts the records appended so far on stable storage.
    fn sync(&mut self) -> Result<(), LogError>;
}

impl LogSink for LogWriter {
    fn append_parts(&mut self, head: &RecordHead, parts: &[&[u8]]) -> Result<u64, LogError> {
        LogWriter::append_parts(self, head, parts)
    }
    fn flush(&mut self) -> Result<(), LogError> {
        LogWriter::flush(self)
    }
    fn sync(&mut self) -> Result<(), LogError> {
        LogWriter::sync(self)
    }
}

/// Records queued for the writer thread at most; appending beyond waits.
pub const RECORDER_QUEUE_RECORDS_MAX: usize = 4096;
/// Payload bytes queued at most; appending beyond waits until the thread has taken the queue.
pub const RECORDER_QUEUE_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// After a batch of fewer than [`RECORDER_SMALL_BATCH_RECORDS`] records the thread waits this
/// long before taking the next one, so that records gather.
pub const RECORDER_GATHER_MICROS: u64 = 200;
/// When out of work, the thread pushes its buffer to the file at most this often, so that a
/// reader sees the records; FLUSH and FUA replies, marks and `sync` push at once.
pub const RECORDER_PUSH_INTERVAL_MILLIS: u64 = 20;
/// Batches smaller than this are followed by a gather pause.
pub const RECORDER_SMALL_BATCH_RECORDS: usize = 64;

/// A record on its way to the log: its header fields and its payload (for a write, the cache
/// entry's data, shared).
#[derive(Debug)]
pub struct Record {
    pub head: RecordHead,
    pub payload: WriteData,
}

impl Record {
    /// A record that covers no range of the disk, with a small payload.
    pub fn event(kind: crate::log::RecordKind, conn: u64, payload: Vec<u8>) -> Self {
        Record {
            head: RecordHead::event(kind, conn),
            payload: WriteData::bytes(payload),
        }
    }
}

struct Msg {
    seq: u64,
    record: Record,
}

/// Why the log stopped taking records (cloned to every later appender). `LogError` is not
/// `Clone` (it holds an `io::Error`), so the first error is kept by its parts: its kind, and
/// its OS error number when it had one, so every later appender gets the same typed error
/// (`raw_os_error`, `kind`), not a message wrapped in `io::Error::other`.
#[derive(Debug, Clone)]
pub struct Failure {
    message: String,
    kind: std::io::ErrorKind,
    os_error: Option<i32>,
    /// The disk holding the log is full (so changes are refused with ENOSPC).
    full: bool,
}

impl Failure {
    fn of(e: &LogError) -> Self {
        let (kind, os_error) = match e {
            LogError::Io(io) => (io.kind(), io.raw_os_error()),
            _ => (std::io::ErrorKind::InvalidData, None),
        };
        Failure {
            message: e.to_string(),
            kind,
            os_error,
            full: matches!(e, LogError::LogDiskFull),
        }
    }

    fn error(&self) -> LogError {
        if self.full {
            return LogError::LogDiskFull;
        }
        LogError::Io(match self.os_error {
            Some(code) => std::io::Error::from_raw_os_error(code),
            None => std::io::Error::new(self.kind, self.message.clone()),
        })
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

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    space: Condvar,
    /// The writer. Whoever holds it takes records from the queue (under `queue`, which is
    /// always locked after `out`, never before) and writes them, so records reach the file
    /// in sequence order whoever writes them.
    out: Mutex<Out>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_out(&self) -> MutexGuard<'_, Out> {
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The writer and what it knows.
struct Out {
    writer: Box<dyn LogSink>,
    /// The first failure; nothing more goes to the file after it.
    error: Option<Failure>,
}

pub struct Recorder {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    next_seq: u64,
    /// Bytes the log will hold once every queued record is written.
    bytes: u64,
}

/// Pushes the log to its file from any thread (see the module doc); cheap to clone.
#[derive(Clone)]
pub struct Pusher(Arc<Shared>);

impl Pusher {
    /// Puts every record appended so far (and perhaps some later ones) in the file: handed
    /// to the operating system, so that a killed server loses none of them, and with
    /// `durable` on stable storage. Call it without the emulated disk's lock.
    pub fn push(&self, durable: bool) -> Result<(), LogError> {
        let mut out = self.0.lock_out();
        let batch = take_queue(&self.0);
        out.write_batch(batch, &self.0);
        out.push(durable, &self.0).map_err(|f| f.error())
    }
}

/// Takes everything queued (the caller holds `out`) and makes room for waiting appenders.
fn take_queue(shared: &Shared) -> VecDeque<Msg> {
    let mut q = shared.lock();
    q.bytes = 0;
    if q.full_waiters > 0 {
        shared.space.notify_all();
    }
    std::mem::take(&mut q.msgs)
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
        Self::start(Box::new(writer))
    }

    /// Starts recording to `writer`, whose file header is already written.
    pub fn start(writer: Box<dyn LogSink>) -> Result<Self, LogError> {
        let shared = Arc::new(Shared {
            queue: Mutex::default(),
            ready: Condvar::new(),
            space: Condvar::new(),
            out: Mutex::new(Out {
                writer,
                error: None,
            }),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("write-log".into())
                .spawn(move || run(&shared))?
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

    /// A handle that pushes the log from another thread, without the disk's lock.
    pub fn pusher(&self) -> Pusher {
        Pusher(self.shared.clone())
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

    /// Queues `record` and returns its sequence number.
    pub fn append(&mut self, record: Record) -> Result<u64, LogError> {
        let bytes = record.payload.len() as u64;
        let seq = self.next_seq;
        self.send(Msg { seq, record }, bytes)?;
        self.next_seq += 1;
        self.bytes += RECORD_HEADER_BYTES as u64 + bytes;
        Ok(seq)
    }

    /// Waits until every queued record is in the file and the file is on stable storage.
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.pusher().push(true)
    }
}

/// The thread: takes the whole queue at a time and writes it, in order; when out of work,
/// pushes what it wrote to the file within [`RECORDER_PUSH_INTERVAL_MILLIS`]. Its timing is
/// decided by [`due_after_batch`], [`push_is_due`], [`gathers`] and [`idle_wait`].
fn run(shared: &Shared) {
    // When the records written since the thread's last push must be in the file.
    let mut push_due: Option<Instant> = None;
    while wait_for_work(shared, push_due) {
        let taken = {
            let mut out = shared.lock_out();
            let batch = take_queue(shared);
            let taken = batch.len();
            push_due = due_after_batch(push_due, taken, Instant::now());
            out.write_batch(batch, shared);
            if push_is_due(push_due, Instant::now(), || shared.lock().msgs.is_empty()) {
                // A pusher may have pushed already; then this costs nothing.
                let _ = out.push(false, shared);
                push_due = None;
            }
            taken
        };
        if gathers(taken) {
            std::thread::sleep(Duration::from_micros(RECORDER_GATHER_MICROS));
        }
    }
    // Closed: what is queued goes to the file (LogWriter's drop pushes it again, harmlessly).
    let mut out = shared.lock_out();
    let batch = take_queue(shared);
    out.write_batch(batch, shared);
    let _ = out.push(false, shared);
}

/// When the records written so far must be pushed, after the thread took `taken` records at
/// `now`: [`RECORDER_PUSH_INTERVAL_MILLIS`] after the first batch since the last push.
fn due_after_batch(due: Option<Instant>, taken: usize, now: Instant) -> Option<Instant> {
    match due {
        None if taken > 0 => Some(now + Duration::from_millis(RECORDER_PUSH_INTERVAL_MILLIS)),
        due => due,
    }
}

/// Whether the thread pushes now: the push is due and nothing more is queued (a queued batch
/// is written first, and pushed with it). `queue_empty` takes the queue's lock, which every
/// append takes too: it is asked only once the push is due.
fn push_is_due(due: Option<Instant>, now: Instant, queue_empty: impl FnOnce() -> bool) -> bool {
    due.is_some_and(|d| d <= now) && queue_empty()
}

/// Whether the thread pauses for [`RECORDER_GATHER_MICROS`] after taking `taken` records: a
/// small batch, so that more gather before the next.
fn gathers(taken: usize) -> bool {
    taken > 0 && taken < RECORDER_SMALL_BATCH_RECORDS
}

/// How an idle thread waits for records, with a push due at `due` (or none).
#[derive(Debug, PartialEq)]
enum IdleWait {
    /// The push is due: do it now.
    Push,
    /// Until the push is due, at most.
    For(Duration),
    /// Until records come.
    Forever,
}

fn idle_wait(due: Option<Instant>, now: Instant) -> IdleWait {
    match due.map(|d| d.saturating_duration_since(now)) {
        Some(left) if left.is_zero() => IdleWait::Push,
        Some(left) => IdleWait::For(left),
        None => IdleWait::Forever,
    }
}

/// Waits until records are queued or `push_due` has come; false once closed.
fn wait_for_work(shared: &Shared, push_due: Option<Instant>) -> bool {
    let mut q = shared.lock();
    loop {
        if q.closed {
            return false;
        }
        if !q.msgs.is_empty() {
            q.idle = false;
            return true;
        }
        q.idle = true;
        q = match idle_wait(push_due, Instant::now()) {
            IdleWait::Push => {
                q.idle = false;
                return true;
            }
            IdleWait::For(left) => {
                shared
                    .ready
                    .wait_timeout(q, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
            IdleWait::Forever => shared.ready.wait(q).unwrap_or_else(|e| e.into_inner()),
        };
    }
}

impl Out {
    /// Writes the records in order (after a failure, drops them).
    fn write_batch(&mut self, batch: VecDeque<Msg>, shared: &Shared) {
        for m in batch {
            if self.error.is_some() {
                return;
            }
            let (head, payload) = (&m.record.head, &m.record.payload);
            let appended = match payload.as_slice() {
                Some(one) => self.writer.append_parts(head, &[one]),
                None => self
                    .writer
                    .append_parts(head, &payload.parts().collect::<Vec<_>>()),
            };
            match appended {
                Ok(s) => assert_eq!(s, m.seq, "records reach the writer in sequence order"),
                Err(e) => self.fail(&e, shared),
            }
        }
    }

    /// Puts what is buffered in the file (and with `durable` on stable storage).
    fn push(&mut self, durable: bool, shared: &Shared) -> Result<(), Failure> {
        if let Some(f) = &self.error {
            return Err(f.clone());
        }
        let r = if durable {
            self.writer.sync()
        } else {
            self.writer.flush()
        };
        match r {
            Ok(()) => Ok(()),
            Err(e) => {
                self.fail(&e, shared);
                Err(Failure::of(&e))
            }
        }
    }

    /// Records the first failure: later appends fail with it, and nothing more is written.
    fn fail(&mut self, e: &LogError, shared: &Shared) {
        tracing::error!("write log failed: {e}");
        let f = Failure::of(e);
        self.error = Some(f.clone());
        let mut q = shared.lock();
        q.failed = Some(f);
        shared.space.notify_all();
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

#[cfg(test)]
mod failure_tests {
    use super::*;

    /// Every appender after the first failure gets the first error's OS error number and
    /// kind, not a string: a read-only log file stays EROFS, a full disk stays ENOSPC.
    #[test]
    fn a_kept_failure_is_the_same_typed_error() {
        let rofs = Failure::of(&LogError::Io(std::io::Error::from_raw_os_error(30))).error();
        assert!(
            matches!(&rofs, LogError::Io(e) if e.raw_os_error() == Some(30)),
            "{rofs:?}"
        );
        let full = Failure::of(&LogError::LogDiskFull).error();
        assert!(matches!(full, LogError::LogDiskFull), "{full:?}");
        let timed_out = std::io::Error::new(std::io::ErrorKind::TimedOut, "slow disk");
        let kept = Failure::of(&LogError::Io(timed_out)).error();
        assert!(
            matches!(&kept, LogError::Io(e) if e.kind() == std::io::ErrorKind::TimedOut),
            "{kept:?}"
        );
    }
}

#[cfg(test)]
mod queue_tests {
    use super::*;
    use crate::log::RecordKind;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A sink that holds every append until the gate opens, counting the appends it entered.
    struct Gated {
        open: Arc<(Mutex<bool>, Condvar)>,
        entered: Arc<AtomicUsize>,
        seq: u64,
    }

    impl LogSink for Gated {
        fn append_parts(&mut self, _: &RecordHead, _: &[&[u8]]) -> Result<u64, LogError> {
            self.entered.fetch_add(1, Ordering::SeqCst);
            let (lock, cv) = &*self.open;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            self.seq += 1;
            Ok(self.seq - 1)
        }
        fn flush(&mut self) -> Result<(), LogError> {
            Ok(())
        }
        fn sync(&mut self) -> Result<(), LogError> {
            Ok(())
        }
    }

    /// Appends `count` records of `payload_len` bytes from a thread while the sink holds
    /// every append; returns how many returned while it was held (the appender then waits),
    /// after letting them all through and checking none was lost. With `first_alone`, the
    /// appender waits after the first record until the thread holds it in the sink, so the
    /// thread's batch is exactly that one record and the rest are all in the queue.
    fn appends_while_held(payload_len: usize, count: u64, first_alone: bool) -> usize {
        let open = Arc::new((Mutex::new(false), Condvar::new()));
        let entered = Arc::new(AtomicUsize::new(0));
        let sink = Gated {
            open: open.clone(),
            entered: entered.clone(),
            seq: 0,
        };
        let mut rec = Recorder::start(Box::new(sink)).unwrap();
        let done = Arc::new(AtomicUsize::new(0));
        let payload = WriteData::bytes(vec![7; payload_len]);
        let appender = {
            let done = done.clone();
            std::thread::spawn(move || {
                for i in 0..count {
                    let head = RecordHead {
                        kind: RecordKind::Write,
                        flags: 0,
                        conn: 1,
                        offset: i * payload_len as u64,
                        length: payload_len as u64,
                    };
                    let payload = payload.clone();
                    rec.append(Record { head, payload }).unwrap();
                    done.fetch_add(1, Ordering::SeqCst);
                    while first_alone && i == 0 && entered.load(Ordering::SeqCst) == 0 {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                rec
            })
        };
        // Wait until the count stops moving: the appender is held.
        let mut last = usize::MAX;
        while done.load(Ordering::SeqCst) != last {
            last = done.load(Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(300));
        }
        *open.0.lock().unwrap() = true;
        open.1.notify_all();
        let mut rec = appender.join().unwrap();
        assert_eq!(done.load(Ordering::SeqCst) as u64, count);
        rec.sync().unwrap();
        assert_eq!(rec.next_seq(), count);
        last
    }

    /// While the log's file is slow, appends queue up to `RECORDER_QUEUE_BYTES_MAX` (64 MiB)
    /// of payload, or `RECORDER_QUEUE_RECORDS_MAX` (4,096) records, and then wait: memory
    /// stays bounded, and nothing is dropped. The thread holds its batch in the sink (what was
    /// queued when it woke: from one record to a full queue) and a full queue waits behind it.
    #[test]
    fn a_slow_log_holds_appenders_at_a_full_queue() {
        let large = appends_while_held(1024 * 1024, 200, false);
        assert!(
            (65..=128).contains(&large),
            "{large} appends of 1 MiB returned"
        );
        let small = appends_while_held(512, 10_000, false);
        assert!(
            (4097..=8192).contains(&small),
            "{small} appends of 512 B returned"
        );
    }

    /// The queue's bounds are exact: with the thread holding one record in the sink, the
    /// queue takes 64 records of 1 MiB (64 MiB, `RECORDER_QUEUE_BYTES_MAX` to the byte) or
    /// 4,096 records of 512 bytes (`RECORDER_QUEUE_RECORDS_MAX`), and the next append waits.
    #[test]
    fn the_queue_holds_its_bounds_to_the_record() {
        let mib = 1024 * 1024;
        assert_eq!(
            appends_while_held(mib, 100, true) as u64,
            1 + RECORDER_QUEUE_BYTES_MAX / mib as u64
        );
        assert_eq!(
            appends_while_held(512, 5_000, true),
            1 + RECORDER_QUEUE_RECORDS_MAX
        );
    }

    /// A record larger than the queue's byte bound is queued when the queue is empty (the
    /// bound waits for room, and no room would ever do), and reaches the sink.
    #[test]
    fn a_record_over_the_byte_bound_is_queued_alone() {
        let open = Arc::new((Mutex::new(true), Condvar::new()));
        let entered = Arc::new(AtomicUsize::new(0));
        let sink = Gated {
            open,
            entered: entered.clone(),
            seq: 0,
        };
        let mut rec = Recorder::start(Box::new(sink)).unwrap();
        let len = RECORDER_QUEUE_BYTES_MAX as usize + 512;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let head = RecordHead {
                kind: RecordKind::Write,
                flags: 0,
                conn: 1,
                offset: 0,
                length: len as u64,
            };
            let payload = WriteData::bytes(vec![7; len]);
            let r = rec
                .append(Record { head, payload })
                .and_then(|_| rec.sync());
            let _ = tx.send(r);
        });
        let r = rx.recv_timeout(Duration::from_secs(30));
        assert!(matches!(r, Ok(Ok(()))), "{r:?}");
        assert_eq!(entered.load(Ordering::SeqCst), 1);
    }

    /// The thread's timing: a push is due `RECORDER_PUSH_INTERVAL_MILLIS` after the first batch
    /// since the last one, done when due (not before) with nothing more queued; a small batch
    /// (not an empty one, nor one of `RECORDER_SMALL_BATCH_RECORDS`) makes it pause; an idle
    /// thread waits until the push is due, or for good with none due.
    #[test]
    fn the_thread_s_timing() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let interval = ms(RECORDER_PUSH_INTERVAL_MILLIS);
        assert_eq!(due_after_batch(None, 0, now), None);
        assert_eq!(due_after_batch(None, 3, now), Some(now + interval));
        assert_eq!(
            due_after_batch(Some(now + ms(1)), 3, now),
            Some(now + ms(1))
        );
        assert_eq!(due_after_batch(Some(now), 0, now), Some(now));
        let not_asked = || -> bool { panic!("the queue was looked at before the push was due") };
        assert!(!push_is_due(None, now, not_asked));
        assert!(push_is_due(Some(now), now, || true));
        assert!(push_is_due(Some(now), now + ms(1), || true));
        assert!(!push_is_due(Some(now + ms(1)), now, not_asked));
        assert!(!push_is_due(Some(now), now + ms(1), || false));
        assert!(!gathers(0));
        assert!(gathers(1));
        assert!(gathers(RECORDER_SMALL_BATCH_RECORDS - 1));
        assert!(!gathers(RECORDER_SMALL_BATCH_RECORDS));
        assert_eq!(idle_wait(None, now), IdleWait::Forever);
        assert_eq!(idle_wait(Some(now), now), IdleWait::Push);
        assert_eq!(idle_wait(Some(now), now + ms(1)), IdleWait::Push);
        assert_eq!(idle_wait(Some(now + ms(5)), now), IdleWait::For(ms(5)));
    }
}
