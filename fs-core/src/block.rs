//! The block-device boundary: the `BlockDevice` trait fs-core owns, its requests and
//! completions, and `MemDevice`, an in-memory device that records every write it applies.
//!
//! Submitting a request and completing it are separate calls so that IO completion is a step
//! of its own that the scheduler orders: a write is on the device only once `complete` ran.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One filesystem block; also the folio size (the model keeps block = folio = 4 KiB).
pub const BLOCK_SIZE: usize = 4096;
/// Requests a device accepts before the caller must complete some.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 4096;

/// A map keyed by block (or sector) number, with [`BlockHasher`].
pub type BlockMap<V> = std::collections::HashMap<u64, V, BuildBlockHasher>;
/// Builds [`BlockHasher`]s.
pub type BuildBlockHasher = std::hash::BuildHasherDefault<BlockHasher>;

/// A hasher for `u64` block and sector numbers: one multiply (Fx's constant) instead of
/// SipHash, which was a sixth of the instructions of checking fs-core crash states (fsck's
/// block owners, the state device's blocks, the state generator's sectors). The keys are
/// numbers from images and logs, not chosen to collide; the worst an image crafted to
/// collide can do is make fsck slow, never wrong.
#[derive(Debug, Default, Clone, Copy)]
pub struct BlockHasher(u64);

impl std::hash::Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        // hashbrown takes the top seven bits as the tag and the low bits as the bucket:
        // fold the well-mixed high half into the low one.
        self.0 ^ (self.0 >> 32)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        const FX_K: u64 = 0x517c_c1b7_2722_0a95;
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(FX_K);
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

/// Identifies a submitted request until it completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReqId(pub u64);

/// The bytes of one block write: its own buffer, or one block of a folio's buffer that the
/// request shares with the page cache (writeback of a whole folio lends the folio's memory to
/// its block writes, as a bio points at the page, instead of copying every block out; a store
/// into the folio while they are in flight copies the folio first, so the request keeps the
/// bytes it was submitted with, as a copy would have).
#[derive(Clone)]
pub enum BlockData {
    Owned(Vec<u8>),
    Shared {
        buf: std::rc::Rc<Vec<u8>>,
        at: usize,
    },
}

impl BlockData {
    /// One block of `buf` from byte `at` (which must leave a whole block).
    pub fn shared(buf: std::rc::Rc<Vec<u8>>, at: usize) -> Self {
        assert!(
            at + BLOCK_SIZE <= buf.len(),
            "a shared block past its buffer"
        );
        BlockData::Shared { buf, at }
    }

    /// The bytes in a buffer of their own: moved when they have one, else copied.
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            BlockData::Owned(v) => v,
            BlockData::Shared { buf, at } => buf[at..at + BLOCK_SIZE].to_vec(),
        }
    }
}

impl std::ops::Deref for BlockData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            BlockData::Owned(v) => v,
            BlockData::Shared { buf, at } => &buf[*at..*at + BLOCK_SIZE],
        }
    }
}

impl From<Vec<u8>> for BlockData {
    fn from(v: Vec<u8>) -> Self {
        BlockData::Owned(v)
    }
}

impl PartialEq for BlockData {
    fn eq(&self, other: &Self) -> bool {
        self[..] == other[..]
    }
}

impl Eq for BlockData {}

impl std::fmt::Debug for BlockData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let form = match self {
            BlockData::Owned(_) => "owned",
            BlockData::Shared { .. } => "shared",
        };
        write!(f, "BlockData({} bytes, {form})", self.len())
    }
}

/// A request to the device. Writes are whole blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Read {
        block: u64,
    },
    Write {
        block: u64,
        data: BlockData,
        fua: bool,
    },
    Flush,
    Trim {
        block: u64,
        count: u64,
    },
}

/// What a completed request gives back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    Read { data: Vec<u8> },
    Done,
}

/// Device errors: the request was malformed or the device failed it.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceError {
    #[error("block {block} is past the end of a {blocks}-block device")]
    OutOfRange { block: u64, blocks: u64 },
    #[error("write of {0} bytes is not exactly one {BLOCK_SIZE}-byte block")]
    BadLength(usize),
    #[error("request {0:?} is not in flight")]
    UnknownRequest(ReqId),
    #[error("more than {REQUESTS_IN_FLIGHT_MAX} requests in flight")]
    TooManyInFlight,
    #[error("device failed the request: {0}")]
    Io(String),
}

/// Kind of a recorded device event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordKind {
    Write,
    FuaWrite,
    Flush,
    Trim,
}

/// One entry of a device's write log: what reached the device, in completion order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Position in the log (0, 1, 2, ...).
    pub seq: u64,
    pub kind: RecordKind,
    pub block: u64,
    pub count: u64,
    /// `content_hash` of the payload (0 for flush/trim): enough to tell writes apart in a log.
    pub hash: u64,
    /// First byte of the payload: the workloads fill each write with one byte, so this names it.
    pub first_byte: u8,
}

/// The device fs-core runs on. Implemented by `MemDevice` here and by nbd-server's emulated
/// disk, so a race in fs-core leaves the same write log a real run would.
pub trait BlockDevice {
    /// Size in blocks.
    fn block_count(&self) -> u64;
    /// Queue a request; nothing reaches the medium until `complete`.
    fn submit(&mut self, req: Request) -> Result<ReqId, DeviceError>;
    /// Finish a request: a write's data is on the device when this returns.
    fn complete(&mut self, id: ReqId) -> Result<Completion, DeviceError>;
    /// The device's own record of applied writes, where it keeps one.
    fn write_log(&self) -> Option<&[DeviceRecord]> {
        None
    }
    /// Puts a named mark in the device's record, in order with its IO (a persistence point
    /// completed). Devices that record nothing ignore it.
    fn mark(&mut self, _name: &str) {}
    /// Reads the `out.len() / BLOCK_SIZE` blocks from `block` on into `out`, each submitted
    /// and completed at once (what [`read_block_sync`] does for one). A device that can read
    /// into the caller's buffer in one request overrides it.
    fn read_blocks_sync(&mut self, block: u64, out: &mut [u8]) -> Result<(), DeviceError> {
        for (i, part) in out.chunks_exact_mut(BLOCK_SIZE).enumerate() {
            let id = self.submit(Request::Read {
                block: block + i as u64,
            })?;
            match self.complete(id)? {
                Completion::Read { data } => part.copy_from_slice(&data),
                Completion::Done => {
                    return Err(DeviceError::Io("read completed without data".into()))
                }
            }
        }
        Ok(())
    }
}

/// A device that keeps its writes to itself: reads see them, the device underneath never
/// does. A read-only mount recovers its journal into one, and so does a check of a crash
/// state, which must not change the image it was given.
pub struct CowDevice {
    inner: Box<dyn BlockDevice>,
    written: BTreeMap<u64, Vec<u8>>,
    queue: RequestQueue,
}

impl CowDevice {
    pub fn new(inner: Box<dyn BlockDevice>) -> Self {
        let blocks = inner.block_count();
        CowDevice {
            inner,
            written: BTreeMap::new(),
            queue: RequestQueue::new(blocks),
        }
    }

    /// Blocks written through this device (kept in memory).
    pub fn written_blocks(&self) -> usize {
        self.written.len()
    }
}

impl BlockDevice for CowDevice {
    fn block_count(&self) -> u64 {
        self.inner.block_count()
    }

    fn submit(&mut self, req: Request) -> Result<ReqId, DeviceError> {
        self.queue.submit(req)
    }

    fn complete(&mut self, id: ReqId) -> Result<Completion, DeviceError> {
        match self.queue.take(id)? {
            Request::Read { block } => {
                let data = match self.written.get(&block) {
                    Some(d) => d.clone(),
                    None => read_block_sync(self.inner.as_mut(), block)?,
                };
                Ok(Completion::Read { data })
            }
            Request::Write { block, data, .. } => {
                self.written.insert(block, data.into_vec());
                Ok(Completion::Done)
            }
            Request::Trim { block, count } => {
                for b in block..block + count {
                    self.written.insert(b, vec![0; BLOCK_SIZE]);
                }
                Ok(Completion::Done)
            }
            Request::Flush => Ok(Completion::Done),
        }
    }
}

/// Submit and complete a read at once: fs-core's reads are synchronous (`read_folio` waits).
pub fn read_block_sync(dev: &mut dyn BlockDevice, block: u64) -> Result<Vec<u8>, DeviceError> {
    let id = dev.submit(Request::Read { block })?;
    match dev.complete(id)? {
        Completion::Read { data } => Ok(data),
        Completion::Done => Err(DeviceError::Io("read completed without data".into())),
    }
}

/// Submit and complete a write at once (allocation-time zeroing, fsync's flush).
pub fn submit_and_complete(dev: &mut dyn BlockDevice, req: Request) -> Result<(), DeviceError> {
    let id = dev.submit(req)?;
    dev.complete(id).map(|_| ())
}

/// A 64-bit content hash for the write log: FNV-1a's constants applied to 8-byte words in
/// four independent lanes (a byte-at-a-time FNV costs more than the rest of a write).
/// Not cryptographic; it only tells payloads apart in a log.
pub fn content_hash(data: &[u8]) -> u64 {
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut lanes = [
        0xcbf2_9ce4_8422_2325u64,
        0x8422_2325_cbf2_9ce4,
        0x9ce4_cbf2_2325_8422,
        0x2325_8422_9ce4_cbf2,
    ];
    let mut chunks = data.chunks_exact(32);
    for c in &mut chunks {
        for (i, lane) in lanes.iter_mut().enumerate() {
            let w = u64::from_le_bytes(c[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            *lane = (*lane ^ w).wrapping_mul(PRIME);
        }
    }
    let mut h = lanes.iter().fold(data.len() as u64, |h, l| {
        (h ^ l).wrapping_mul(PRIME).rotate_left(23)
    });
    for b in chunks.remainder() {
        h = (h ^ u64::from(*b)).wrapping_mul(PRIME);
    }
    h
}

impl DeviceRecord {
    /// The record of one applied request; `payload` is the written data (empty for flush and
    /// trim).
    pub fn new(seq: u64, kind: RecordKind, block: u64, count: u64, payload: &[u8]) -> Self {
        DeviceRecord {
            seq,
            kind,
            block,
            count,
            hash: if payload.is_empty() {
                0
            } else {
                content_hash(payload)
            },
            first_byte: payload.first().copied().unwrap_or(0),
        }
    }
}

/// Requests submitted and not yet completed, as every device keeps them: `submit` checks a
/// request (room in flight, range inside a device of `blocks` blocks, whole-block writes) and
/// numbers it; `take` hands it back at completion.
#[derive(Debug, Clone, Default)]
pub struct RequestQueue {
    blocks: u64,
    in_flight: BTreeMap<ReqId, Request>,
    next_id: u64,
}

impl RequestQueue {
    pub fn new(blocks: u64) -> Self {
        RequestQueue {
            blocks,
            ..RequestQueue::default()
        }
    }

    pub fn len(&self) -> usize {
        self.in_flight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    pub fn contains(&self, id: ReqId) -> bool {
        self.in_flight.contains_key(&id)
    }

    pub fn submit(&mut self, req: Request) -> Result<ReqId, DeviceError> {
        if self.in_flight.len() >= REQUESTS_IN_FLIGHT_MAX {
            return Err(DeviceError::TooManyInFlight);
        }
        let blocks = self.blocks;
        let in_range = |block: u64, count: u64| {
            if block.checked_add(count).is_none_or(|end| end > blocks) {
                Err(DeviceError::OutOfRange { block, blocks })
            } else {
                Ok(())
            }
        };
        match &req {
            Request::Read { block } => in_range(*block, 1)?,
            Request::Write { block, data, .. } => {
                in_range(*block, 1)?;
                if data.len() != BLOCK_SIZE {
                    return Err(DeviceError::BadLength(data.len()));
                }
            }
            Request::Trim { block, count } => in_range(*block, *count)?,
            Request::Flush => {}
        }
        let id = ReqId(self.next_id);
        self.next_id += 1;
        self.in_flight.insert(id, req);
        Ok(id)
    }

    pub fn take(&mut self, id: ReqId) -> Result<Request, DeviceError> {
        self.in_flight
            .remove(&id)
            .ok_or(DeviceError::UnknownRequest(id))
    }
}

/// A sparse in-memory device: unwritten blocks read as zeros. Every applied write, flush and
/// trim is appended to `log`.
#[derive(Debug, Clone)]
pub struct MemDevice {
    blocks: u64,
    data: BTreeMap<u64, Vec<u8>>,
    queue: RequestQueue,
    log: Vec<DeviceRecord>,
}

impl MemDevice {
    pub fn new(blocks: u64) -> Self {
        MemDevice {
            blocks,
            data: BTreeMap::new(),
            queue: RequestQueue::new(blocks),
            log: Vec::new(),
        }
    }

    /// The block's current content on the medium (zeros if never written).
    pub fn block(&self, block: u64) -> Vec<u8> {
        self.data
            .get(&block)
            .cloned()
            .unwrap_or_else(|| vec![0; BLOCK_SIZE])
    }

    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }

    fn record(&mut self, kind: RecordKind, block: u64, count: u64, payload: &[u8]) {
        let seq = self.log.len() as u64;
        self.log
            .push(DeviceRecord::new(seq, kind, block, count, payload));
    }
}

impl BlockDevice for MemDevice {
    fn block_count(&self) -> u64 {
        self.blocks
    }

    fn submit(&mut self, req: Request) -> Result<ReqId, DeviceError> {
        self.queue.submit(req)
    }

    fn complete(&mut self, id: ReqId) -> Result<Completion, DeviceError> {
        let req = self.queue.take(id)?;
        Ok(match req {
            Request::Read { block } => Completion::Read {
                data: self.block(block),
            },
            Request::Write { block, data, fua } => {
                let kind = if fua {
                    RecordKind::FuaWrite
                } else {
                    RecordKind::Write
                };
                self.record(kind, block, 1, &data);
                self.data.insert(block, data.into_vec());
                Completion::Done
            }
            Request::Flush => {
                self.record(RecordKind::Flush, 0, 0, &[]);
                Completion::Done
            }
            Request::Trim { block, count } => {
                self.record(RecordKind::Trim, block, count, &[]);
                for b in block..block + count {
                    self.data.remove(&b);
                }
                Completion::Done
            }
        })
    }

    fn write_log(&self) -> Option<&[DeviceRecord]> {
        Some(&self.log)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_is_invisible_until_completed_then_logged() {
        let mut d = MemDevice::new(8);
        let id = d
            .submit(Request::Write {
                block: 3,
                data: vec![7; BLOCK_SIZE].into(),
                fua: false,
            })
            .unwrap();
        assert_eq!(d.block(3), vec![0; BLOCK_SIZE]);
        d.complete(id).unwrap();
        assert_eq!(d.block(3), vec![7; BLOCK_SIZE]);
        let log = d.write_log().unwrap();
        assert_eq!(log.len(), 1);
        assert_eq!(
            (log[0].block, log[0].first_byte, log[0].kind),
            (3, 7, RecordKind::Write)
        );
    }

    #[test]
    fn content_hash_tells_blocks_apart() {
        let a = vec![1u8; BLOCK_SIZE];
        let mut b = a.clone();
        b[4095] = 2;
        assert_ne!(content_hash(&a), content_hash(&b));
        assert_ne!(content_hash(&[0; 10]), content_hash(&[0; 11]));
        assert_eq!(content_hash(&a), content_hash(&a.clone()));
    }

    #[test]
    fn bad_requests_are_refused() {
        let mut d = MemDevice::new(8);
        assert!(matches!(
            d.submit(Request::Read { block: 8 }),
            Err(DeviceError::OutOfRange { .. })
        ));
        assert!(matches!(
            d.submit(Request::Write {
                block: 0,
                data: vec![0; 10].into(),
                fua: false
            }),
            Err(DeviceError::BadLength(10))
        ));
        assert!(matches!(
            d.complete(ReqId(99)),
            Err(DeviceError::UnknownRequest(_))
        ));
    }
}
