//! The campaign folder's index: a `sled` database in `DIR/index/`, derived from the run
//! records and bundles (`crashmonkey findings reindex` rebuilds it from them). It answers
//! `crashmonkey findings` without reading every record, and a campaign updates it once per
//! record, in one atomic batch. docs/campaigns.md gives its keys and values byte by byte:
//! integers are big-endian, strings UTF-8 without a terminator.

use super::record::{Record, Tally, SEEDS_PER_FINDING_LISTED_MAX};
use super::FolderError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The index's format version, the value of [`KEY_FORMAT`].
pub const INDEX_FORMAT: u32 = 1;
/// The index's folder inside a campaign folder.
pub const INDEX_DIR: &str = "index";
/// Key of the format version (a u32).
pub const KEY_FORMAT: &[u8] = b"format";
/// Key of the digest of every other entry (32 bytes).
pub const KEY_DIGEST: &[u8] = b"digest";
/// Prefix of a run record's key; the record's file name follows.
pub const PREFIX_RECORD: &[u8] = b"r/";
/// Prefix of a finding's key; its signature follows.
pub const PREFIX_FINDING: &[u8] = b"f/";
/// Memory sled may cache, in bytes (an index is a few KiB per record and finding).
pub const INDEX_CACHE_BYTES_MAX: u64 = 16 << 20;

/// What the index holds of one run record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordEntry {
    pub runs: u64,
    pub steps: u64,
    pub failures: u64,
    /// blake3 of the record file's bytes.
    pub hash: [u8; 32],
}

impl RecordEntry {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(56);
        for n in [self.runs, self.steps, self.failures] {
            v.extend_from_slice(&n.to_be_bytes());
        }
        v.extend_from_slice(&self.hash);
        v
    }

    pub fn decode(v: &[u8]) -> Option<RecordEntry> {
        if v.len() != 56 {
            return None;
        }
        Some(RecordEntry {
            runs: be64(&v[0..8])?,
            steps: be64(&v[8..16])?,
            failures: be64(&v[16..24])?,
            hash: v[24..56].try_into().ok()?,
        })
    }
}

fn be64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

/// A finding's value: count, first seed, smallest seed, its steps, then the listed seeds
/// (a u32 count and that many u64).
pub fn encode_tally(t: &Tally) -> Vec<u8> {
    let mut v = Vec::with_capacity(36 + 8 * t.seeds.len());
    for n in [t.count, t.first_seed, t.smallest_seed, t.smallest_steps] {
        v.extend_from_slice(&n.to_be_bytes());
    }
    v.extend_from_slice(&(t.seeds.len() as u32).to_be_bytes());
    for s in &t.seeds {
        v.extend_from_slice(&s.to_be_bytes());
    }
    v
}

pub fn decode_tally(signature: String, v: &[u8]) -> Option<Tally> {
    let n = u32::from_be_bytes(v.get(32..36)?.try_into().ok()?) as usize;
    if n > SEEDS_PER_FINDING_LISTED_MAX || v.len() != 36 + 8 * n {
        return None;
    }
    Some(Tally {
        signature,
        count: be64(&v[0..8])?,
        first_seed: be64(&v[8..16])?,
        smallest_seed: be64(&v[16..24])?,
        smallest_steps: be64(&v[24..32])?,
        seeds: v[36..].chunks(8).map(be64).collect::<Option<Vec<u64>>>()?,
    })
}

/// One entry's share of the digest: the digest is the XOR of every entry's share, so a
/// batch updates it without reading the rest.
fn share(key: &[u8], value: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&(key.len() as u32).to_be_bytes());
    h.update(key);
    h.update(&(value.len() as u32).to_be_bytes());
    h.update(value);
    *h.finalize().as_bytes()
}

fn xor(a: &mut [u8; 32], b: &[u8; 32]) {
    a.iter_mut().zip(b).for_each(|(x, y)| *x ^= y);
}

/// An open index.
pub struct Index {
    db: sled::Db,
    path: PathBuf,
}

impl Index {
    /// Opens the index of campaign folder `dir`; `create` makes a new, empty one if there is
    /// none. The index is checked (format and digest) before it is used.
    pub fn open(dir: &Path, create: bool) -> Result<Index, FolderError> {
        Self::open_at(&dir.join(INDEX_DIR), dir, create)
    }

    /// Opens `dir`'s index without waiting for a lock another process holds.
    pub fn try_open(dir: &Path) -> Result<Index, FolderError> {
        Self::open_with(&dir.join(INDEX_DIR), dir, false, 0)
    }

    /// Opens (or makes) an index at `path` for folder `dir`.
    pub fn open_at(path: &Path, dir: &Path, create: bool) -> Result<Index, FolderError> {
        Self::open_with(path, dir, create, INDEX_LOCK_WAIT_MS_MAX)
    }

    fn open_with(
        path: &Path,
        dir: &Path,
        create: bool,
        wait_ms: u64,
    ) -> Result<Index, FolderError> {
        let bad = |what: String| FolderError::Index {
            dir: dir.to_path_buf(),
            what,
        };
        let existed = path.join("conf").is_file();
        if !existed && !create {
            return Err(bad(format!("{} has no index", path.display())));
        }
        let db = open_waiting(path, dir, wait_ms)?;
        let index = Index {
            db,
            path: path.to_path_buf(),
        };
        if !existed {
            index.init()?;
        }
        index.check(dir)?;
        Ok(index)
    }

    fn init(&self) -> Result<(), FolderError> {
        let format = INDEX_FORMAT.to_be_bytes();
        let mut digest = [0u8; 32];
        xor(&mut digest, &share(KEY_FORMAT, &format));
        let mut b = sled::Batch::default();
        b.insert(KEY_FORMAT, &format);
        b.insert(KEY_DIGEST, &digest);
        self.db.apply_batch(b).map_err(|e| self.err(e))?;
        self.flush()
    }

    fn err(&self, e: sled::Error) -> FolderError {
        FolderError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e.to_string()),
        }
    }

    pub fn flush(&self) -> Result<(), FolderError> {
        self.db.flush().map(|_| ()).map_err(|e| self.err(e))
    }

    /// The format is this build's and the digest is the entries'.
    fn check(&self, dir: &Path) -> Result<(), FolderError> {
        let bad = |what: String| FolderError::Index {
            dir: dir.to_path_buf(),
            what,
        };
        let format = self.db.get(KEY_FORMAT).map_err(|e| self.err(e))?;
        if format.as_deref() != Some(&INDEX_FORMAT.to_be_bytes()[..]) {
            return Err(bad(format!(
                "no format {INDEX_FORMAT} key (found {:?})",
                format.as_deref()
            )));
        }
        let mut digest = [0u8; 32];
        let mut stored = None;
        for kv in self.db.iter() {
            let (k, v) = kv.map_err(|e| bad(format!("unreadable: {e}")))?;
            if &*k == KEY_DIGEST {
                stored = Some(v);
            } else {
                xor(&mut digest, &share(&k, &v));
            }
        }
        if stored.as_deref() != Some(&digest[..]) {
            return Err(bad("its digest does not match its entries".into()));
        }
        Ok(())
    }

    /// Every record the index holds, by file name.
    pub fn records(&self) -> Result<BTreeMap<String, RecordEntry>, FolderError> {
        let mut out = BTreeMap::new();
        for kv in self.db.scan_prefix(PREFIX_RECORD) {
            let (k, v) = kv.map_err(|e| self.err(e))?;
            let name = String::from_utf8_lossy(&k[PREFIX_RECORD.len()..]).into_owned();
            let e = RecordEntry::decode(&v).ok_or_else(|| self.damaged(&k))?;
            out.insert(name, e);
        }
        Ok(out)
    }

    fn damaged(&self, key: &[u8]) -> FolderError {
        FolderError::Index {
            dir: self.path.parent().unwrap_or(&self.path).to_path_buf(),
            what: format!("the value of {:?} is damaged", String::from_utf8_lossy(key)),
        }
    }

    /// Every finding, by signature.
    pub fn findings(&self) -> Result<Vec<Tally>, FolderError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(PREFIX_FINDING) {
            let (k, v) = kv.map_err(|e| self.err(e))?;
            let sig = String::from_utf8_lossy(&k[PREFIX_FINDING.len()..]).into_owned();
            out.push(decode_tally(sig, &v).ok_or_else(|| self.damaged(&k))?);
        }
        Ok(out)
    }

    pub fn finding(&self, signature: &str) -> Result<Option<Tally>, FolderError> {
        let key = [PREFIX_FINDING, signature.as_bytes()].concat();
        match self.db.get(&key).map_err(|e| self.err(e))? {
            None => Ok(None),
            Some(v) => Ok(Some(
                decode_tally(signature.to_string(), &v).ok_or_else(|| self.damaged(&key))?,
            )),
        }
    }

    /// Adds a record (whose file holds `bytes`) in one atomic batch, durably; returns each
    /// finding it touched as it was before and is after. A record already indexed is refused.
    pub fn apply(
        &self,
        record: &Record,
        bytes: &[u8],
    ) -> Result<Vec<(Option<Tally>, Tally)>, FolderError> {
        let rkey = [PREFIX_RECORD, record.file_name().as_bytes()].concat();
        if self.db.contains_key(&rkey).map_err(|e| self.err(e))? {
            return Err(FolderError::Index {
                dir: self.path.parent().unwrap_or(&self.path).to_path_buf(),
                what: format!("run record {} is indexed already", record.file_name()),
            });
        }
        let mut digest: [u8; 32] = match self.db.get(KEY_DIGEST).map_err(|e| self.err(e))? {
            Some(d) => d
                .as_ref()
                .try_into()
                .map_err(|_| self.damaged(KEY_DIGEST))?,
            None => return Err(self.damaged(KEY_DIGEST)),
        };
        let mut batch = sled::Batch::default();
        let entry = RecordEntry {
            runs: record.runs,
            steps: record.steps,
            failures: record.failures,
            hash: *blake3::hash(bytes).as_bytes(),
        }
        .encode();
        xor(&mut digest, &share(&rkey, &entry));
        batch.insert(rkey, entry);
        let mut changed = Vec::new();
        for t in &record.findings {
            let key = [PREFIX_FINDING, t.signature.as_bytes()].concat();
            let before = self.finding(&t.signature)?;
            let mut after = t.clone();
            if let Some(b) = &before {
                xor(&mut digest, &share(&key, &encode_tally(b)));
                after.absorb(b);
            }
            let value = encode_tally(&after);
            xor(&mut digest, &share(&key, &value));
            batch.insert(key, value);
            changed.push((before, after));
        }
        batch.insert(KEY_DIGEST, &digest);
        self.db.apply_batch(batch).map_err(|e| self.err(e))?;
        self.flush()?;
        Ok(changed)
    }
}

/// How long a campaign, a reindex or a merge waits for another process's lock on an index
/// (a `findings` reading it), in milliseconds; a campaign holds it while it runs.
pub const INDEX_LOCK_WAIT_MS_MAX: u64 = 3_000;

/// Opens sled at `path`, waiting up to `wait_ms` for a lock.
fn open_waiting(path: &Path, dir: &Path, wait_ms: u64) -> Result<sled::Db, FolderError> {
    let cfg = sled::Config::new()
        .path(path)
        .cache_capacity(INDEX_CACHE_BYTES_MAX);
    let started = std::time::Instant::now();
    loop {
        // sled panics on some damaged files rather than answering an error.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cfg.open()))
            .map_err(|_| FolderError::Index {
                dir: dir.to_path_buf(),
                what: "sled could not open it (panicked)".into(),
            })?
            .map_err(|e| open_error(dir, e));
        match r {
            Err(FolderError::InUse { .. })
                if started.elapsed().as_millis() < u128::from(wait_ms) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            r => return r,
        }
    }
}

/// sled's refusal in words: a lock held by another process, or damage.
fn open_error(dir: &Path, e: sled::Error) -> FolderError {
    let text = e.to_string();
    if text.contains("could not acquire lock") {
        return FolderError::InUse {
            dir: dir.to_path_buf(),
        };
    }
    FolderError::Index {
        dir: dir.to_path_buf(),
        what: format!("sled could not open it: {text}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip() {
        let t = Tally {
            signature: "s".into(),
            count: 3,
            first_seed: u64::MAX,
            smallest_seed: 2,
            smallest_steps: 40,
            seeds: vec![2, 9, u64::MAX],
        };
        let v = encode_tally(&t);
        assert_eq!(v.len(), 36 + 24);
        assert_eq!(decode_tally("s".into(), &v), Some(t));
        assert_eq!(decode_tally("s".into(), &v[..v.len() - 1]), None);
        let e = RecordEntry {
            runs: 1,
            steps: 2,
            failures: 3,
            hash: [7; 32],
        };
        assert_eq!(RecordEntry::decode(&e.encode()), Some(e));
    }
}
