//! The model's behaviour switches as command-line flags, shared by `race` and `fs campaign`.

use clap::{Args, ValueEnum};
use fs_core::{AllocMode, Config, DioInvalidate, Gfs2, PunchMode, ValidityCheckAt};

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FsPreset {
    /// XFS (the defaults): delalloc, unwritten extents, ->iomap_valid, writeback's seq check.
    Xfs,
    /// gfs2 as built (v6.6): blocks allocated at write and fault time and not zeroed on
    /// disk, no ->iomap_valid and no writeback seq check, the inode glock exclusive around a
    /// buffered write and in page_mkwrite and shared in a read fault, and the short-write
    /// punch that truncates the page cache first.
    Gfs2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DioInvalidateArg {
    /// After ->end_io converted the unwritten extents (iomap_dio_complete, the kernel today).
    AfterEndIo,
    /// Before ->end_io: the order the kernel's comment warns against (a racing buffered read
    /// would cache zeros from unwritten extents).
    BeforeEndIo,
}

/// One part of the gfs2 preset, to turn off with `--gfs2-without`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Gfs2Part {
    /// The glock a buffered write holds exclusive.
    WriteGlock,
    /// The glock a read fault takes shared.
    FaultGlock,
    /// The glock page_mkwrite takes exclusive.
    MkwriteGlock,
    /// Not zeroing new blocks on disk (without it, new blocks are zeroed as the abstract
    /// --alloc at-write does).
    NoBlockZeroing,
    /// The short-write punch of gfs2_iomap_end.
    ShortWritePunch,
    /// Dropping the glock, faulting the user pages in and retaking it when a write with
    /// page faults disabled comes up short.
    FaultRetry,
}

/// The stale-mapping switches of fs-core (defaults: the fixed kernel behaviour).
#[derive(Args, Debug, Clone, Default)]
pub struct Switches {
    /// Behave as this filesystem does (a preset of the switches below, which still apply
    /// on top of it). Example: `--fs gfs2`, or `--fs gfs2 --gfs2-without write-glock`.
    #[arg(long, value_enum)]
    pub fs: Option<FsPreset>,
    /// Turn one part of the gfs2 preset off, to see what it protects (repeatable).
    #[arg(long, value_enum, value_name = "PART", requires = "fs")]
    pub gfs2_without: Vec<Gfs2Part>,
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
    /// Blocks per folio: 1 (4 KiB folios, the default) or 2, 4, 8, 16 (large folios of 4 KiB
    /// blocks, with per-block uptodate and dirty bits, as XFS has since about v6.6).
    /// Example: `--folio-blocks 4` for 16 KiB folios.
    #[arg(long, value_name = "BLOCKS", value_parser = parse_folio_blocks)]
    pub folio_blocks: Option<u64>,
    /// Write-sized folios: a buffered write or read creates a folio as large as the bytes it
    /// has left (Linux 6.6's `fgf_set_order`), up to this many blocks (a power of two from
    /// `--folio-blocks` to 256); folios then differ in size within a file. Off by default.
    /// Example: `--max-folio-blocks 4`.
    #[arg(long, value_name = "BLOCKS", value_parser = parse_max_folio_blocks)]
    pub max_folio_blocks: Option<u64>,
    /// Race direct writes too: each run's racing phase gets one or two O_DIRECT writes
    /// (block-aligned, clear of the phase's mmap stores), added to the workload the seed
    /// gives without them. XFS's direct write path: not with `--fs gfs2`.
    /// Example: `--direct-writes --dio-invalidate before-end-io`.
    #[arg(long)]
    pub direct_writes: bool,
    /// Where a direct write's completion drops the page cache over its range, relative to
    /// the unwritten-extent conversion of ->end_io.
    #[arg(long, value_enum, value_name = "WHEN")]
    pub dio_invalidate: Option<DioInvalidateArg>,
}

/// `--folio-blocks`: a power of two up to the model's largest folio.
fn parse_folio_blocks(s: &str) -> Result<u64, String> {
    let n: u64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    let cfg = Config {
        folio_blocks: n,
        ..Config::default()
    };
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(n)
}

/// `--max-folio-blocks`: a power of two up to the model's largest folio (checked against
/// `--folio-blocks` when both are applied).
fn parse_max_folio_blocks(s: &str) -> Result<u64, String> {
    let n: u64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    let cfg = Config {
        max_folio_blocks: n,
        ..Config::default()
    };
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(n)
}

impl Switches {
    /// `cfg` with these switches applied.
    pub fn apply(&self, mut cfg: Config) -> Config {
        if self.fs == Some(FsPreset::Gfs2) {
            cfg.alloc = AllocMode::AtWrite;
            cfg.iomap_valid = false;
            cfg.wb_seq_check = false;
            cfg.gfs2 = Gfs2::ALL;
            for part in &self.gfs2_without {
                let on = match part {
                    Gfs2Part::WriteGlock => &mut cfg.gfs2.write_glock,
                    Gfs2Part::FaultGlock => &mut cfg.gfs2.fault_glock,
                    Gfs2Part::MkwriteGlock => &mut cfg.gfs2.mkwrite_glock,
                    Gfs2Part::NoBlockZeroing => &mut cfg.gfs2.no_block_zeroing,
                    Gfs2Part::ShortWritePunch => &mut cfg.gfs2.short_write_punch,
                    Gfs2Part::FaultRetry => &mut cfg.gfs2.fault_retry,
                };
                *on = false;
            }
        }
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
        if let Some(n) = self.folio_blocks {
            cfg.folio_blocks = n;
        }
        if let Some(n) = self.max_folio_blocks {
            cfg.max_folio_blocks = n.max(cfg.folio_blocks);
        }
        if self.direct_writes {
            cfg.direct_writes = true;
        }
        if let Some(w) = self.dio_invalidate {
            cfg.dio_invalidate = match w {
                DioInvalidateArg::AfterEndIo => DioInvalidate::AfterEndIo,
                DioInvalidateArg::BeforeEndIo => DioInvalidate::BeforeEndIo,
            };
        }
        cfg
    }

    /// Refuses switches that do not go together, with the reason.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.direct_writes && self.fs == Some(FsPreset::Gfs2) {
            anyhow::bail!(
                "--direct-writes models XFS's direct write path; gfs2's (which falls back to \
                 buffered IO to allocate) is not modelled: drop --fs gfs2 or --direct-writes"
            );
        }
        Ok(())
    }
}
