//! A dense in-memory storage backend: the simplest thing the emulated disk can wrap, for tests
//! and tools that drive the disk without a server.

use std::io;
use std::sync::Mutex;

use crate::backend::{Backend, StatusExtent, Ticket, WriteData, WriteFailed};

/// Largest disk this backend holds (it allocates the whole size up front).
pub const VEC_STORAGE_BYTES_MAX: u64 = 1 << 30;

pub struct VecStorage {
    bytes: Mutex<Vec<u8>>,
}

impl VecStorage {
    /// `size` must be at most [`VEC_STORAGE_BYTES_MAX`].
    pub fn new(size: u64) -> io::Result<Self> {
        if size > VEC_STORAGE_BYTES_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "disk too large for VecStorage",
            ));
        }
        Ok(VecStorage {
            bytes: Mutex::new(vec![0; size as usize]),
        })
    }

    /// A copy of the whole content.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.lock().expect("lock").clone()
    }

    fn range(&self, offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        let size = self.bytes.lock().expect("lock").len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "beyond end of disk",
            )),
        }
    }
}

impl Backend for VecStorage {
    fn size(&self) -> u64 {
        self.bytes.lock().expect("lock").len() as u64
    }
    fn read(&self, _t: Option<Ticket>, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let r = self.range(offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.bytes.lock().expect("lock")[r]);
        Ok(())
    }
    fn write(
        &self,
        _t: Option<Ticket>,
        offset: u64,
        data: WriteData,
        _fua: bool,
    ) -> Result<(), WriteFailed> {
        let r = match self.range(offset, data.len() as u64) {
            Ok(r) => r,
            Err(e) => return Err(WriteFailed::returning(data)(e)),
        };
        data.copy_to(0, &mut self.bytes.lock().expect("lock")[r]);
        Ok(())
    }
    fn write_zeroes(
        &self,
        _t: Option<Ticket>,
        offset: u64,
        length: u64,
        _m: bool,
        _f: bool,
        _fua: bool,
    ) -> io::Result<()> {
        let r = self.range(offset, length)?;
        self.bytes.lock().expect("lock")[r].fill(0);
        Ok(())
    }
    fn trim(&self, t: Option<Ticket>, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.write_zeroes(t, offset, length, true, false, fua)
    }
    fn flush(&self, _t: Option<Ticket>) -> io::Result<()> {
        Ok(())
    }
    fn block_status(
        &self,
        _t: Option<Ticket>,
        _offset: u64,
        length: u64,
    ) -> io::Result<Vec<StatusExtent>> {
        Ok(vec![StatusExtent {
            length,
            hole: false,
            zero: false,
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Anything past the end, or whose end overflows, is refused with InvalidInput (no panic,
    /// no partial IO), and a refused write hands its data back; a disk over the limit is not
    /// allocated.
    #[test]
    fn ranges_past_the_end_are_refused() {
        assert!(VecStorage::new(VEC_STORAGE_BYTES_MAX + 1).is_err());
        let s = VecStorage::new(8192).unwrap();
        let invalid = |r: io::Result<()>| r.unwrap_err().kind() == io::ErrorKind::InvalidInput;
        assert!(invalid(s.read(None, 4096, &mut [0; 4097])));
        assert!(invalid(s.read(None, u64::MAX, &mut [0; 2])));
        assert!(invalid(
            s.write_zeroes(None, 8000, 193, false, false, false)
        ));
        assert!(invalid(s.trim(None, 8192, 1, false)));
        let refused = s.write(None, 8191, WriteData::bytes(vec![1; 2]), false);
        let back = refused.unwrap_err().data.expect("the data comes back");
        assert_eq!(back.to_vec(), [1, 1]);
        s.write(None, 8190, WriteData::bytes(vec![2; 2]), false)
            .unwrap();
        s.read(None, 0, &mut [0; 8192]).unwrap();
        assert_eq!(s.snapshot()[8189..], [0, 2, 2]);
    }
}
