//! The model's behaviour switches as command-line flags, shared by `race` and `fs campaign`.

use clap::{Args, ValueEnum};
use fs_core::{AllocMode, Config, PunchMode, ValidityCheckAt};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum AllocArg {
    /// XFS-like delayed allocation, unwritten extents at writeback.
    Delalloc,
    /// gfs2-like: blocks allocated (and zeroed) at write/fault time.
    AtWrite,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum CheckAtArg {
    /// ->iomap_valid after the folio lock in write_begin (the kernel today).
    AfterLock,
    /// Inside ->get_folio, which returns the folio locked.
    GetFolio,
    /// Before the folio lock (deliberately racy).
    BeforeLock,
}

/// The stale-mapping switches of fs-core (defaults: the fixed kernel behaviour).
#[derive(Args, Debug, Clone, Default)]
pub struct Switches {
    /// Turn off the write path's validity-cookie check (->iomap_valid).
    #[arg(long)]
    pub no_iomap_valid: bool,
    /// Turn off writeback's seq check of its cached mapping in map_blocks.
    #[arg(long)]
    pub no_wb_seq_check: bool,
    /// Use the old short-write delalloc punch (truncate page cache, then punch).
    #[arg(long)]
    pub old_punch: bool,
    /// Allocation behaviour.
    #[arg(long, value_enum)]
    pub alloc: Option<AllocArg>,
    /// Where the write path checks the cookie.
    #[arg(long, value_enum)]
    pub check_at: Option<CheckAtArg>,
    /// page_mkwrite takes the inode lock shared (gfs2's glock serialises faults and writes).
    #[arg(long)]
    pub mkwrite_inode_lock: bool,
    /// Folios one writeback lookup takes (the kernel's PAGEVEC_SIZE: 15 in v6.6). The
    /// generated files have at most 5 folios, so only a smaller batch gives them a writeback
    /// pass longer than one batch, which is what a file of more than 15 dirty folios has.
    #[arg(long, value_name = "FOLIOS")]
    pub wb_batch_folios: Option<usize>,
}

impl Switches {
    /// `cfg` with these switches applied.
    pub fn apply(&self, mut cfg: Config) -> Config {
        if self.no_iomap_valid {
            cfg.iomap_valid = false;
        }
        if self.no_wb_seq_check {
            cfg.wb_seq_check = false;
        }
        if self.old_punch {
            cfg.punch = PunchMode::Old;
        }
        if let Some(a) = self.alloc {
            cfg.alloc = match a {
                AllocArg::Delalloc => AllocMode::Delalloc,
                AllocArg::AtWrite => AllocMode::AtWrite,
            };
        }
        if let Some(c) = self.check_at {
            cfg.validity_check_at = match c {
                CheckAtArg::AfterLock => ValidityCheckAt::AfterFolioLock,
                CheckAtArg::GetFolio => ValidityCheckAt::InGetFolio,
                CheckAtArg::BeforeLock => ValidityCheckAt::BeforeFolioLock,
            };
        }
        if self.mkwrite_inode_lock {
            cfg.mkwrite_takes_inode_lock = true;
        }
        if let Some(n) = self.wb_batch_folios {
            cfg.wb_batch_folios = n.max(1);
        }
        cfg
    }
}
