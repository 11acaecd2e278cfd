//! Exports that are files of an fs-core volume (`--export 'vm:size=1G,fscore=PATH|mem'`).
//!
//! The volume is an fs-core filesystem on an emulated disk (memory, or a raw image at PATH,
//! formatted when new); each export naming the volume is one of its files. Every request
//! becomes fs-core calls ([`volume`]), run as tasks of fs-core's deterministic scheduler on
//! the volume's engine thread ([`served`]) beside writeback, IO completion and reclaim; the
//! emulated disk (and its recorder) sits under fs-core. A session file ([`session`]) keeps
//! each request and the schedule, so the run replays in process (`crashmonkey fs session
//! replay`).
//!
//! Keys (besides `size=`, and the emulated-disk keys, which apply to the disk under fs-core
//! and are given on the first export of a volume):
//!
//! | key | meaning |
//! |---|---|
//! | `fscore=PATH\|mem` | the volume: a raw image (made and formatted when missing) or memory; exports naming the same one share it |
//! | `volume-size=SIZE` | the device under a new volume (default: the files' sizes plus room for metadata) |
//! | `iomap-valid=on\|off` | the write path's validity-cookie check |
//! | `wb-seq-check=on\|off` | writeback's seq check of its cached mapping |
//! | `punch=old\|fixed` | the short-write delalloc punch |
//! | `alloc=delalloc\|at-write` | allocation behaviour |
//! | `check-at=after-lock\|get-folio\|before-lock` | where the write path checks the cookie |
//! | `mkwrite-inode-lock` | page_mkwrite takes the inode lock shared |
//! | `bug=NAME[+NAME...]` | planted bugs of the persistent filesystem |
//! | `cache-folios=N` | the page-cache limit in folios of `folio-blocks` (a larger folio counts as the ones it spans; small values force reclaim) |
//! | `folio-blocks=N` | the smallest folio in blocks: 1 (default), 2, 4, ... 256 (large folios of 4 KiB blocks) |
//! | `max-folio-blocks=N` | the largest folio a write or read creates, in blocks (default 64: 256 KiB; a write asks for a folio of its length, as Linux 6.6 does); `max-folio-blocks=1` with `folio-blocks=1` gives every folio one block |
//! | `commit-steps=N` | the journal timer: scheduler steps between timed commits (default 1024) |
//! | `dirty-folios=N` | `balance_dirty_pages`: writes wait while N folios are dirty or under writeback (default a quarter of the page cache, at least 16; 0: no limit) |
//! | `io-completion=ioend\|block` | IO completion finishes a whole ioend at a time, as the kernel does (default), or one block at a time (as campaigns run) |
//! | `sched-seed=S` | the scheduler's seed |
//! | `session=PATH` | record the session there (a new volume only; never replaces a file) |

pub mod replay;
pub mod served;
pub mod session;
pub mod volume;

use std::path::PathBuf;

use fs_core::{AllocMode, Config, PunchMode, ValidityCheckAt};

/// Default page-cache limit of an fs-core export, in 4 KiB folios (64 MiB; with larger
/// folios, `folio-blocks=N`, the default is the same 64 MiB in fewer folios).
pub const EXPORT_CACHE_FOLIOS_DEFAULT: usize = 16_384;
/// Default largest folio of an fs-core export, in blocks (256 KiB): a write or read creates a
/// folio of its length up to it, as XFS does since Linux 6.6, so 1 MiB requests take four
/// folios and 4 KiB ones one block. (1 MiB folios measured no better: 1 MiB reads 12% faster,
/// 1 MiB writes 3% slower; docs/fscore-export.md.)
pub const EXPORT_MAX_FOLIO_BLOCKS_DEFAULT: u64 = 64;
/// Default journal timer of an fs-core export, in scheduler steps: about 100 4 KiB writes
/// (a workload's 64 steps would commit after every few writes of a busy client).
pub const EXPORT_COMMIT_INTERVAL_STEPS: u64 = 1024;
/// Default dirty limit of an fs-core export (`dirty-folios`): a quarter of the page cache,
/// as the kernel's `dirty_ratio` is a fraction of memory, and never under
/// [`EXPORT_DIRTY_FOLIOS_MIN`]. Without a limit a client that writes faster than the model
/// writes back fills memory with dirty folios, and writeback walks ever more of them.
pub const EXPORT_DIRTY_CACHE_DIVISOR: usize = 4;
/// The least default dirty limit of an export, in folios (a tiny page cache still lets
/// a few writes run ahead of writeback).
pub const EXPORT_DIRTY_FOLIOS_MIN: usize = 16;

/// The default dirty limit for a page cache of `cache_folios`.
pub fn export_dirty_limit(cache_folios: usize) -> usize {
    (cache_folios / EXPORT_DIRTY_CACHE_DIVISOR).max(EXPORT_DIRTY_FOLIOS_MIN)
}

/// Inodes of a new volume beyond its exports' files.
pub const VOLUME_SPARE_INODES: u64 = 16;
/// Blocks of a new volume beyond its files' blocks, for the journal, inodes and bitmap.
pub const VOLUME_METADATA_BLOCKS: u64 = 4096 + 512;
/// Blocks of a new volume's extent chains, per 16 file blocks (one extent record of 24 bytes
/// per file block at worst: 96 KiB of chain per 16 MiB of file, here 1 in 16).
pub const VOLUME_CHAIN_BLOCKS_PER_16: u64 = 1;

/// The keys of one export that make it a file of an fs-core volume.
#[derive(Debug, Clone, PartialEq)]
pub struct FsCoreSpec {
    /// `None`: the memory volume.
    pub image: Option<PathBuf>,
    pub volume_size: Option<u64>,
    pub config: Config,
    pub sched_seed: u64,
    pub session: Option<PathBuf>,
    /// Which keys were given (a later export of a volume may not give volume-wide keys).
    pub keys: Vec<String>,
}

impl Default for FsCoreSpec {
    fn default() -> Self {
        FsCoreSpec {
            image: None,
            volume_size: None,
            config: Config {
                cache_limit_folios: EXPORT_CACHE_FOLIOS_DEFAULT,
                commit_interval_steps: EXPORT_COMMIT_INTERVAL_STEPS,
                dirty_limit_folios: export_dirty_limit(EXPORT_CACHE_FOLIOS_DEFAULT),
                complete_per_ioend: true,
                max_folio_blocks: EXPORT_MAX_FOLIO_BLOCKS_DEFAULT,
                reclaim_throttle: true,
                ..Config::default()
            },
            sched_seed: 0,
            session: None,
            keys: Vec::new(),
        }
    }
}

/// Every fs-core key an export accepts.
pub const FSCORE_KEYS: &[&str] = &[
    "fscore",
    "volume-size",
    "iomap-valid",
    "wb-seq-check",
    "punch",
    "alloc",
    "check-at",
    "mkwrite-inode-lock",
    "bug",
    "cache-folios",
    "folio-blocks",
    "max-folio-blocks",
    "commit-steps",
    "dirty-folios",
    "io-completion",
    "sched-seed",
    "session",
];

/// The keys whose value is a whole number.
const COUNT_KEYS: &[&str] = &[
    "cache-folios",
    "folio-blocks",
    "max-folio-blocks",
    "commit-steps",
    "dirty-folios",
    "sched-seed",
];

/// A switch's value: on or off, or what any flag key takes (true/false, 1/0, yes/no).
fn on_off(v: &str) -> Result<bool, String> {
    match v {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => crate::export::parse_bool(Some(v)).map_err(|_| format!("is on or off, not {v:?}")),
    }
}

impl FsCoreSpec {
    /// Applies one key (without `fscore=` itself); the error says what is wrong.
    pub fn set(&mut self, key: &str, value: Option<&str>) -> Result<(), String> {
        if COUNT_KEYS.contains(&key) {
            let n: u64 = value
                .ok_or_else(|| "needs a value (KEY=VALUE)".to_owned())?
                .parse()
                .map_err(|_| "needs a whole number".to_owned())?;
            self.set_count(key, n)?;
        } else {
            self.set_other(key, value)?;
        }
        self.keys.push(key.to_owned());
        if !self.keys.iter().any(|k| k == "dirty-folios") {
            let c = &mut self.config;
            c.dirty_limit_folios = export_dirty_limit(c.cache_limit_folios);
        }
        Ok(())
    }

    /// Applies a key that is not a number.
    fn set_other(&mut self, key: &str, value: Option<&str>) -> Result<(), String> {
        let need = || value.ok_or_else(|| "needs a value (KEY=VALUE)".to_owned());
        let c = &mut self.config;
        match key {
            "volume-size" => self.volume_size = Some(crate::export::parse_size(need()?)?),
            "iomap-valid" => c.iomap_valid = on_off(need()?)?,
            "wb-seq-check" => c.wb_seq_check = on_off(need()?)?,
            "punch" => {
                c.punch = match need()? {
                    "old" => PunchMode::Old,
                    "fixed" => PunchMode::Fixed,
                    v => return Err(format!("is old or fixed, not {v:?}")),
                }
            }
            "alloc" => {
                c.alloc = match need()? {
                    "delalloc" => AllocMode::Delalloc,
                    "at-write" => AllocMode::AtWrite,
                    v => return Err(format!("is delalloc or at-write, not {v:?}")),
                }
            }
            "check-at" => {
                c.validity_check_at = match need()? {
                    "after-lock" => ValidityCheckAt::AfterFolioLock,
                    "get-folio" => ValidityCheckAt::InGetFolio,
                    "before-lock" => ValidityCheckAt::BeforeFolioLock,
                    v => {
                        return Err(format!(
                            "is after-lock, get-folio or before-lock, not {v:?}"
                        ))
                    }
                }
            }
            "mkwrite-inode-lock" => {
                c.mkwrite_takes_inode_lock = value.map_or(Ok(true), on_off)?;
            }
            "bug" => {
                for name in need()?.split('+') {
                    if !c.bugs.set(name) {
                        return Err(format!(
                            "names no planted bug {name:?} (known: {})",
                            fs_core::fs::Bugs::NAMES.join(", ")
                        ));
                    }
                }
            }
            "io-completion" => {
                c.complete_per_ioend = match need()? {
                    "ioend" => true,
                    "block" => false,
                    v => return Err(format!("is ioend or block, not {v:?}")),
                }
            }
            "session" => match need()? {
                "" => return Err("needs a path".into()),
                p => self.session = Some(PathBuf::from(p)),
            },
            _ => {
                return Err(format!(
                    "is not an fs-core key ({})",
                    FSCORE_KEYS.join(", ")
                ))
            }
        }
        Ok(())
    }

    /// Applies a key whose value is a whole number `n`.
    fn set_count(&mut self, key: &str, n: u64) -> Result<(), String> {
        let c = &mut self.config;
        let folios = usize::try_from(n).map_err(|_| "is too large".to_owned())?;
        match key {
            "cache-folios" => c.cache_limit_folios = folios.max(1),
            "folio-blocks" => {
                c.folio_blocks = n;
                if !self.keys.iter().any(|k| k == "max-folio-blocks") {
                    c.max_folio_blocks = c.max_folio_blocks.max(n);
                }
                c.validate().map_err(|e| e.to_string())?;
                if !self.keys.iter().any(|k| k == "cache-folios") {
                    // The default page cache keeps its size in bytes.
                    c.cache_limit_folios = (EXPORT_CACHE_FOLIOS_DEFAULT as u64 / n) as usize;
                }
            }
            "max-folio-blocks" => {
                c.max_folio_blocks = n.max(1);
                c.validate().map_err(|e| e.to_string())?;
            }
            "commit-steps" => c.commit_interval_steps = n.max(1),
            "dirty-folios" => c.dirty_limit_folios = folios,
            _ => self.sched_seed = n,
        }
        Ok(())
    }

    /// The volume this export is a file of, as a key: the image's path, or "mem".
    pub fn volume_key(&self) -> String {
        match &self.image {
            Some(p) => format!("file:{}", p.display()),
            None => "mem".into(),
        }
    }
}

/// The device size in blocks a new volume gets for files of `file_bytes` in all.
pub fn default_volume_blocks(file_bytes: u64) -> u64 {
    let data = file_bytes.div_ceil(fs_core::block::BLOCK_SIZE as u64);
    data + data.div_ceil(16) * VOLUME_CHAIN_BLOCKS_PER_16 + VOLUME_METADATA_BLOCKS
}
