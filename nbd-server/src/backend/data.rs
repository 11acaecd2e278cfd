//! Write data: one type for a write's bytes from the socket to storage and the write log,
//! however they are held.
//!
//! A WRITE's payload is received into a buffer its backend hands out
//! ([`super::Backend::write_buffer`]): one `Vec<u8>`, or 4 KiB [`Block`]s where storage keeps
//! blocks (the memory backend), so that the payload goes from the socket straight into the
//! blocks storage will keep, with no copy in between. Once filled it is a [`WriteData`]:
//! shared, never changed again, cheap to clone. The emulated disk keeps one clone as its cache
//! entry and hands another to its write log; storage that keeps blocks takes them when it is
//! given the only clone ([`WriteData::into_blocks`]), and copies them otherwise.

use std::io;
use std::sync::Arc;

/// Bytes in a [`Block`].
pub const BLOCK_BYTES: usize = 4096;

/// One 4 KiB block on the heap: the unit the memory backend stores, and a form write data can
/// be held in, so that storing a write moves its blocks instead of copying them.
pub type Block = Box<[u8; BLOCK_BYTES]>;

/// A block holding `bytes` (exactly [`BLOCK_BYTES`] of them), copied straight into its
/// allocation without zeroing it first.
pub fn block_from(bytes: &[u8]) -> Block {
    let whole: Box<[u8]> = bytes.into();
    whole
        .try_into()
        .unwrap_or_else(|_| Box::new([0u8; BLOCK_BYTES]))
}

/// How the bytes of a [`WriteData`] are held.
pub enum Form {
    /// One buffer.
    Bytes(Vec<u8>),
    /// Whole blocks, in order (the data is a multiple of [`BLOCK_BYTES`] long).
    Blocks(Vec<Block>),
}

/// The data of a write (or the payload of a log record). Clones share the bytes.
#[derive(Clone)]
pub struct WriteData(Arc<Form>);

impl std::fmt::Debug for WriteData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let form = if self.is_blocks() { "blocks" } else { "bytes" };
        write!(f, "WriteData({} {form})", self.len())
    }
}

impl From<Vec<u8>> for WriteData {
    fn from(v: Vec<u8>) -> Self {
        WriteData::bytes(v)
    }
}

impl WriteData {
    /// Data held in one buffer.
    pub fn bytes(v: Vec<u8>) -> Self {
        WriteData(Arc::new(Form::Bytes(v)))
    }

    /// One block's bytes, held as a [`Block`] (moved, not copied, when `v`'s allocation is
    /// exactly one block, as fs-core's block writes are), so that memory storage keeps the
    /// allocation as it is; any other length stays one buffer.
    pub fn block_or_bytes(v: Vec<u8>) -> Self {
        if v.len() != BLOCK_BYTES {
            return WriteData::bytes(v);
        }
        match Block::try_from(v.into_boxed_slice()) {
            Ok(b) => WriteData::blocks(vec![b]),
            Err(whole) => WriteData::bytes(whole.into_vec()),
        }
    }

    /// Data held in blocks.
    pub fn blocks(blocks: Vec<Block>) -> Self {
        WriteData(Arc::new(Form::Blocks(blocks)))
    }

    /// A copy of `bytes`.
    pub fn copy_of(bytes: &[u8]) -> Self {
        WriteData::bytes(bytes.to_vec())
    }

    /// No bytes (the payload of a trim record).
    pub fn empty() -> Self {
        WriteData::bytes(Vec::new())
    }

    pub fn len(&self) -> usize {
        match &*self.0 {
            Form::Bytes(v) => v.len(),
            Form::Blocks(b) => b.len() * BLOCK_BYTES,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the data is held in blocks.
    pub fn is_blocks(&self) -> bool {
        matches!(&*self.0, Form::Blocks(_))
    }

    /// The buffer to fill, while this is its only handle: a receive buffer is filled before
    /// it is shared. `None` once it is shared.
    pub fn form_mut(&mut self) -> Option<&mut Form> {
        Arc::get_mut(&mut self.0)
    }

    /// The bytes in order: one slice, or one per block.
    pub fn parts(&self) -> impl Iterator<Item = &[u8]> {
        let (one, blocks): (Option<&[u8]>, &[Block]) = match &*self.0 {
            Form::Bytes(v) => (Some(v), &[]),
            Form::Blocks(b) => (None, b),
        };
        one.into_iter().chain(blocks.iter().map(|b| &b[..]))
    }

    /// The bytes as one slice, when they are held in one (or in one block).
    pub fn as_slice(&self) -> Option<&[u8]> {
        match &*self.0 {
            Form::Bytes(v) => Some(v),
            Form::Blocks(b) if b.len() == 1 => Some(&b[0][..]),
            Form::Blocks(_) => None,
        }
    }

    /// Copies bytes `at..at + dst.len()` of the data into `dst`.
    pub fn copy_to(&self, at: usize, dst: &mut [u8]) {
        match &*self.0 {
            Form::Bytes(v) => dst.copy_from_slice(&v[at..at + dst.len()]),
            Form::Blocks(blocks) => {
                let mut done = 0;
                while done < dst.len() {
                    let (bi, bo) = ((at + done) / BLOCK_BYTES, (at + done) % BLOCK_BYTES);
                    let n = (BLOCK_BYTES - bo).min(dst.len() - done);
                    dst[done..done + n].copy_from_slice(&blocks[bi][bo..bo + n]);
                    done += n;
                }
            }
        }
    }

    /// A copy of bytes `at..at + len`, in one buffer.
    pub fn copy_range(&self, at: usize, len: usize) -> WriteData {
        let mut v = vec![0u8; len];
        self.copy_to(at, &mut v);
        WriteData::bytes(v)
    }

    /// All the bytes in one new buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        for p in self.parts() {
            v.extend_from_slice(p);
        }
        v
    }

    /// All the bytes in one buffer: the buffer itself when this is its only handle, else a
    /// copy.
    pub fn into_vec(self) -> Vec<u8> {
        match Arc::try_unwrap(self.0) {
            Ok(Form::Bytes(v)) => v,
            Ok(form) => WriteData(Arc::new(form)).to_vec(),
            Err(shared) => WriteData(shared).to_vec(),
        }
    }

    /// The blocks, when the data is held in blocks and this is its only handle (so they can
    /// be moved into storage); otherwise the data back, untouched.
    pub fn into_blocks(self) -> Result<Vec<Block>, WriteData> {
        match Arc::try_unwrap(self.0) {
            Ok(Form::Blocks(b)) => Ok(b),
            Ok(form) => Err(WriteData(Arc::new(form))),
            Err(shared) => Err(WriteData(shared)),
        }
    }

    /// The buffer, when the data is held in one and this is its only handle (so it can be
    /// reused for another payload).
    pub fn into_bytes(self) -> Option<Vec<u8>> {
        match Arc::try_unwrap(self.0) {
            Ok(Form::Bytes(v)) => Some(v),
            _ => None,
        }
    }
}

/// A write a backend did not do: the error, and the data handed back so that a caller holding
/// the only copy of acknowledged data (the emulated disk's cache, writing it back) keeps it.
/// `data` is `None` only where the backend dropped or kept it itself (the emulated disk, whose
/// caller, the server, has no use for it).
pub struct WriteFailed {
    pub error: io::Error,
    pub data: Option<WriteData>,
}

impl WriteFailed {
    /// `error`, with `data` handed back.
    pub fn returning(data: WriteData) -> impl FnOnce(io::Error) -> WriteFailed {
        move |error| WriteFailed {
            error,
            data: Some(data),
        }
    }
}

impl std::fmt::Debug for WriteFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteFailed")
            .field("error", &self.error)
            .field("data", &self.data)
            .finish()
    }
}

impl std::fmt::Display for WriteFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for WriteFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl From<WriteFailed> for io::Error {
    fn from(f: WriteFailed) -> io::Error {
        f.error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block's bytes in a `Vec` of exactly one block become that block without a copy (the
    /// same allocation); any other length stays one buffer, with the same bytes.
    #[test]
    fn one_block_of_bytes_moves_into_a_block() {
        let v: Vec<u8> = (0..BLOCK_BYTES).map(|i| (i % 253) as u8).collect();
        let (bytes, at) = (v.clone(), v.as_ptr());
        let d = WriteData::block_or_bytes(v);
        assert!(d.is_blocks());
        assert_eq!(d.as_slice().unwrap().as_ptr(), at, "moved, not copied");
        assert_eq!(d.to_vec(), bytes);
        let mut roomy = Vec::with_capacity(2 * BLOCK_BYTES);
        roomy.extend_from_slice(&bytes);
        let d = WriteData::block_or_bytes(roomy);
        assert!(d.is_blocks());
        assert_eq!(d.to_vec(), bytes);
        for len in [0, 512, BLOCK_BYTES + 1] {
            let d = WriteData::block_or_bytes(vec![7; len]);
            assert!(!d.is_blocks(), "{len} bytes");
            assert_eq!(d.to_vec(), vec![7; len]);
        }
    }

    #[test]
    fn forms_read_the_same() {
        let bytes: Vec<u8> = (0..3 * BLOCK_BYTES).map(|i| (i % 251) as u8).collect();
        let blocks = WriteData::blocks(bytes.chunks(BLOCK_BYTES).map(block_from).collect());
        let one = WriteData::copy_of(&bytes);
        for d in [&blocks, &one] {
            assert_eq!(d.len(), bytes.len());
            assert_eq!(d.parts().flatten().copied().collect::<Vec<u8>>(), bytes);
            let mut part = vec![0u8; 5000];
            d.copy_to(4000, &mut part);
            assert_eq!(part, bytes[4000..9000]);
            assert_eq!(d.clone().into_vec(), bytes);
        }
        assert!(blocks.as_slice().is_none());
        assert_eq!(one.as_slice(), Some(&bytes[..]));
    }

    #[test]
    fn blocks_move_only_from_their_only_handle() {
        let d = WriteData::blocks(vec![Box::new([7u8; BLOCK_BYTES])]);
        let other = d.clone();
        let d = d.into_blocks().expect_err("shared: handed back");
        drop(other);
        assert_eq!(d.into_blocks().expect("only handle").len(), 1);
        assert!(WriteData::copy_of(&[1; 4096]).into_blocks().is_err());
    }
}
