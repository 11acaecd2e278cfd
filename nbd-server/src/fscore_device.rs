//! fs-core on the emulated disk: [`RecordedDevice`] implements fs-core's `BlockDevice` over an
//! [`EmulatedDisk`], so every IO a modelled filesystem issues goes through the same durability
//! rule and recorder a real client's IO does, and a race campaign leaves a write log that
//! `crashmonkey log show`, `states` and `check` read like any other.
//!
//! fs-core submits and completes requests as separate steps; a request reaches the disk at
//! completion (arrival, IO and reply in one go), which is the moment the model says its data is
//! on the device. Completion order is therefore the log's order.

use crate::backend::{Arrival, Backend, RequestKind, Ticket, WriteData};
use crate::disk::{DiskConfig, DiskError, EmulatedDisk};
use fs_core::block::{
    BlockData, BlockDevice, Completion, DeviceError, DeviceRecord, RecordKind, ReqId, Request,
    RequestQueue, BLOCK_SIZE,
};
use std::path::Path;
use std::sync::Arc;

/// The connection number fs-core's IO is recorded under.
pub const FSCORE_CONN_ID: u64 = 0;

/// An fs-core block device backed by an emulated disk (memory storage), optionally recording.
pub struct RecordedDevice {
    disk: Arc<EmulatedDisk>,
    blocks: u64,
    queue: RequestQueue,
    /// fs-core's own copy of what it completed (`None`: kept only in the disk's log, for a
    /// device that serves for as long as the server runs).
    records: Option<Vec<DeviceRecord>>,
}

impl std::fmt::Debug for RecordedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordedDevice")
            .field("blocks", &self.blocks)
            .field("in_flight", &self.queue.len())
            .finish()
    }
}

impl RecordedDevice {
    /// A fresh, zeroed device of `blocks` 4 KiB blocks; with `record`, its write log goes there.
    pub fn new(blocks: u64, record: Option<&Path>) -> Result<Self, DiskError> {
        Self::with_image(&[], blocks, record)
    }

    /// A device of `blocks` blocks that starts out holding `image` (shorter than the device:
    /// the rest reads as zeros), which the write log takes as its base: the log records only
    /// what comes after.
    pub fn with_image(image: &[u8], blocks: u64, record: Option<&Path>) -> Result<Self, DiskError> {
        let bytes = blocks * BLOCK_SIZE as u64;
        assert!(image.len() as u64 <= bytes, "image larger than the device");
        let storage: Arc<dyn Backend> = Arc::new(crate::backend::memory::MemoryBackend::new(bytes));
        if !image.is_empty() {
            storage
                .write(None, 0, WriteData::copy_of(image), false)
                .map_err(std::io::Error::from)?;
        }
        let config = DiskConfig {
            record: record.map(Path::to_path_buf),
            ..DiskConfig::default()
        };
        Ok(RecordedDevice {
            disk: Arc::new(EmulatedDisk::new(storage, config)?),
            blocks,
            queue: RequestQueue::new(blocks),
            records: Some(Vec::new()),
        })
    }

    /// A device over `disk` (its whole size, in 4 KiB blocks) that keeps no copy of what it
    /// completed: the disk's recorder, if it has one, is the log.
    pub fn over(disk: Arc<EmulatedDisk>) -> Self {
        let blocks = disk.size() / BLOCK_SIZE as u64;
        RecordedDevice {
            disk,
            blocks,
            queue: RequestQueue::new(blocks),
            records: None,
        }
    }

    /// The emulated disk underneath (marks, stats, power cut).
    pub fn disk(&self) -> &Arc<EmulatedDisk> {
        &self.disk
    }

    fn record(&mut self, kind: RecordKind, block: u64, count: u64, payload: &[u8]) {
        if let Some(records) = self.records.as_mut() {
            let seq = records.len() as u64;
            records.push(DeviceRecord::new(seq, kind, block, count, payload));
        }
    }

    /// One request through the disk's whole lifecycle: arrival, IO, reply; or straight to
    /// the storage of a disk that passes through ([`EmulatedDisk::pass_through`]).
    fn run<T>(
        &self,
        kind: RequestKind,
        block: u64,
        count: u64,
        fua: bool,
        io: impl FnOnce(&dyn Backend, Option<Ticket>) -> std::io::Result<T>,
    ) -> Result<T, DeviceError> {
        if let Some(storage) = self.disk.plain_storage() {
            return io(storage.as_ref(), None).map_err(|e| DeviceError::Io(e.to_string()));
        }
        let ticket = self.disk.arrived(&Arrival {
            conn: FSCORE_CONN_ID,
            kind,
            offset: block * BLOCK_SIZE as u64,
            length: count * BLOCK_SIZE as u64,
            fua,
        });
        let r = io(self.disk.as_ref(), ticket);
        if let Some(t) = ticket {
            self.disk.reply_sent(t);
        }
        r.map_err(|e| DeviceError::Io(e.to_string()))
    }

    /// One block write. Bytes lent from a folio go straight from it into storage that the
    /// disk passes through (the one copy that storage makes); a disk that keeps writes (its
    /// cache, its recorder) gets a buffer of their own, moved when the request has one.
    fn write_block(&self, block: u64, data: BlockData, fua: bool) -> Result<(), DeviceError> {
        let offset = block * BLOCK_SIZE as u64;
        match (&data, self.disk.plain_storage()) {
            (BlockData::Shared { .. }, Some(storage)) => storage
                .write_from(offset, &data, fua)
                .map_err(|e| DeviceError::Io(e.to_string())),
            _ => self.run(RequestKind::Write, block, 1, fua, |d, t| {
                let data = WriteData::block_or_bytes(data.into_vec());
                Ok(d.write(t, offset, data, fua)?)
            }),
        }
    }
}

impl BlockDevice for RecordedDevice {
    fn block_count(&self) -> u64 {
        self.blocks
    }

    fn submit(&mut self, req: Request) -> Result<ReqId, DeviceError> {
        self.queue.submit(req)
    }

    /// One read request of every block, straight into `out`.
    fn read_blocks_sync(&mut self, block: u64, out: &mut [u8]) -> Result<(), DeviceError> {
        let count = (out.len() / BLOCK_SIZE) as u64;
        if block.checked_add(count).is_none_or(|end| end > self.blocks) {
            return Err(DeviceError::OutOfRange {
                block,
                blocks: self.blocks,
            });
        }
        self.run(RequestKind::Read, block, count, false, |d, t| {
            d.read(t, block * BLOCK_SIZE as u64, out)
        })
    }

    fn complete(&mut self, id: ReqId) -> Result<Completion, DeviceError> {
        let req = self.queue.take(id)?;
        match req {
            Request::Read { block } => {
                let mut data = vec![0u8; BLOCK_SIZE];
                self.run(RequestKind::Read, block, 1, false, |d, t| {
                    d.read(t, block * BLOCK_SIZE as u64, &mut data)
                })?;
                Ok(Completion::Read { data })
            }
            Request::Write { block, data, fua } => {
                // The data moves to the disk unless fs-core keeps its own record of it.
                let kept = self.records.is_some().then(|| data.to_vec());
                self.write_block(block, data, fua)?;
                let kind = if fua {
                    RecordKind::FuaWrite
                } else {
                    RecordKind::Write
                };
                if let Some(data) = kept {
                    self.record(kind, block, 1, &data);
                }
                Ok(Completion::Done)
            }
            Request::Flush => {
                self.run(RequestKind::Flush, 0, 0, false, |d, t| d.flush(t))?;
                self.record(RecordKind::Flush, 0, 0, &[]);
                Ok(Completion::Done)
            }
            Request::Trim { block, count } => {
                self.run(RequestKind::Trim, block, count, false, |d, t| {
                    d.trim(
                        t,
                        block * BLOCK_SIZE as u64,
                        count * BLOCK_SIZE as u64,
                        false,
                    )
                })?;
                self.record(RecordKind::Trim, block, count, &[]);
                Ok(Completion::Done)
            }
        }
    }

    fn write_log(&self) -> Option<&[DeviceRecord]> {
        self.records.as_deref()
    }

    /// A mark in the emulated disk's write log (a recording failure shows at the next IO).
    fn mark(&mut self, name: &str) {
        if let Err(e) = self.disk.mark(name) {
            tracing::warn!("mark {name:?} not recorded: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::LogReader;

    /// Guards the bridge: what fs-core completes must be in the nbd-server log, in completion
    /// order, and nothing it merely submitted.
    #[test]
    fn completed_requests_reach_the_log_in_completion_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fs.log");
        let mut dev = RecordedDevice::new(16, Some(&path)).unwrap();
        let a = dev
            .submit(Request::Write {
                block: 3,
                data: vec![b'a'; BLOCK_SIZE].into(),
                fua: false,
            })
            .unwrap();
        let b = dev
            .submit(Request::Write {
                block: 5,
                data: vec![b'b'; BLOCK_SIZE].into(),
                fua: true,
            })
            .unwrap();
        let never = dev
            .submit(Request::Write {
                block: 7,
                data: vec![b'c'; BLOCK_SIZE].into(),
                fua: false,
            })
            .unwrap();
        dev.complete(b).unwrap();
        dev.complete(a).unwrap();
        let f = dev.submit(Request::Flush).unwrap();
        dev.complete(f).unwrap();
        let r = dev.submit(Request::Read { block: 3 }).unwrap();
        assert_eq!(
            dev.complete(r).unwrap(),
            Completion::Read {
                data: vec![b'a'; BLOCK_SIZE]
            }
        );
        assert!(dev.queue.contains(never));
        dev.disk().sync_log().unwrap();
        let recs: Vec<_> = LogReader::open(&path)
            .unwrap()
            .map(|r| r.unwrap())
            .filter(|r| r.kind.is_data() || r.kind == crate::log::RecordKind::Flush)
            .map(|r| (r.kind.name(), r.header.offset / BLOCK_SIZE as u64))
            .collect();
        assert_eq!(recs, vec![("write", 5), ("write", 3), ("flush", 0)]);
        assert_eq!(dev.write_log().unwrap().len(), 3);
    }

    /// A read of several blocks in one request returns what reading them one by one does,
    /// through a disk that passes through and through one that does not (whose cache holds
    /// some of them); a read past the end is refused.
    #[test]
    fn a_run_of_blocks_reads_as_the_blocks_one_by_one() {
        for plain in [true, false] {
            let storage: Arc<dyn Backend> = Arc::new(crate::backend::memory::MemoryBackend::new(
                16 * BLOCK_SIZE as u64,
            ));
            let disk = Arc::new(EmulatedDisk::new(storage, DiskConfig::default()).unwrap());
            if plain {
                disk.pass_through();
            }
            let mut dev = RecordedDevice::over(disk);
            for b in [3u64, 4, 6, 9] {
                let data = vec![b as u8 + 1; BLOCK_SIZE];
                let id = dev
                    .submit(Request::Write {
                        block: b,
                        data: data.into(),
                        fua: false,
                    })
                    .unwrap();
                dev.complete(id).unwrap();
            }
            let mut run = vec![0xeeu8; 8 * BLOCK_SIZE];
            dev.read_blocks_sync(2, &mut run).unwrap();
            let one_by_one: Vec<u8> = (2..10)
                .flat_map(|b| fs_core::block::read_block_sync(&mut dev, b).unwrap())
                .collect();
            assert_eq!(run, one_by_one, "pass-through {plain}");
            assert_eq!(run[BLOCK_SIZE], 4, "block 3 holds its write");
            let past = dev.read_blocks_sync(12, &mut vec![0; 8 * BLOCK_SIZE]);
            assert!(
                matches!(past, Err(DeviceError::OutOfRange { .. })),
                "{past:?}"
            );
        }
    }

    /// A block write whose bytes are lent from a folio (`BlockData::Shared`) lands as a copy
    /// would, on a disk that passes through (straight from the folio into storage) and on one
    /// that does not (a buffer of its own), is recorded with its bytes, and leaves the folio's
    /// memory to the folio once complete.
    #[test]
    fn a_block_lent_from_a_folio_lands_as_a_copy_would() {
        for plain in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let mut dev = RecordedDevice::new(16, Some(&dir.path().join("fs.log"))).unwrap();
            if plain {
                dev.disk().pass_through();
            }
            let mut folio = vec![b'x'; 3 * BLOCK_SIZE];
            folio[BLOCK_SIZE..2 * BLOCK_SIZE].fill(b'y');
            let folio = std::rc::Rc::new(folio);
            let id = dev
                .submit(Request::Write {
                    block: 5,
                    data: BlockData::shared(folio.clone(), BLOCK_SIZE),
                    fua: false,
                })
                .unwrap();
            dev.complete(id).unwrap();
            assert_eq!(std::rc::Rc::strong_count(&folio), 1, "plain {plain}");
            let got = fs_core::block::read_block_sync(&mut dev, 5).unwrap();
            assert_eq!(got, vec![b'y'; BLOCK_SIZE], "plain {plain}");
            let rec = &dev.write_log().unwrap()[0];
            assert_eq!((rec.block, rec.first_byte), (5, b'y'));
            let counted = dev.disk().stats().writes;
            assert_eq!(
                counted,
                u64::from(!plain),
                "only a disk that keeps writes sees it"
            );
        }
    }

    /// Writes block 2, trims block 3, flushes and reads block 2 back through a device over
    /// `disk`.
    fn write_trim_flush_read(disk: &Arc<EmulatedDisk>) {
        let mut dev = RecordedDevice::over(disk.clone());
        let reqs = [
            Request::Write {
                block: 2,
                data: vec![b'p'; BLOCK_SIZE].into(),
                fua: false,
            },
            Request::Trim { block: 3, count: 1 },
            Request::Flush,
        ];
        for req in reqs {
            let id = dev.submit(req).unwrap();
            dev.complete(id).unwrap();
        }
        let r = dev.submit(Request::Read { block: 2 }).unwrap();
        let want = Completion::Read {
            data: vec![b'p'; BLOCK_SIZE],
        };
        assert_eq!(dev.complete(r).unwrap(), want);
    }

    /// A disk that passes through takes no part in fs-core's IO (no request counted, nothing
    /// cached): the storage has the bytes at once. Any other disk sees every request.
    #[test]
    fn a_disk_that_passes_through_leaves_the_io_to_its_storage() {
        let blocks = 8u64;
        let bytes = blocks * BLOCK_SIZE as u64;
        for plain in [true, false] {
            let storage: Arc<dyn Backend> =
                Arc::new(crate::backend::memory::MemoryBackend::new(bytes));
            let disk = Arc::new(EmulatedDisk::new(storage.clone(), DiskConfig::default()).unwrap());
            if plain {
                disk.pass_through();
            }
            assert_eq!(disk.plain_storage().is_some(), plain);
            write_trim_flush_read(&disk);
            let st = disk.stats();
            let counted = (st.writes, st.trims, st.flushes, st.reads);
            assert_eq!(counted, if plain { (0, 0, 0, 0) } else { (1, 1, 1, 1) });
            let mut got = vec![0u8; BLOCK_SIZE];
            storage.read(None, 2 * BLOCK_SIZE as u64, &mut got).unwrap();
            assert_eq!(got, vec![b'p'; BLOCK_SIZE], "plain {plain}");
        }
    }
}
