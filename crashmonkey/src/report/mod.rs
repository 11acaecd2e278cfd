//! Reports a person reads: one self-contained HTML page per campaign folder, with an SVG
//! timeline per finding, and the same drawing of one write log (docs/campaigns.md, "The
//! report").
//!
//! - `draw`   the SVG shapes the timelines are made of
//! - `text`   escaping and clipping of every text put into HTML or SVG
//! - `race`   a race bundle as a timeline: a lane per task, its steps, where a mapping was
//!   cached, went stale and was used stale, and the step that wrote the wrong byte
//! - `log`    a write log as a timeline: epochs, writes, flushes, FUA, marks, the crash point
//!   and the fate of each write
//! - `crash`  an fs bundle's crash state on its write log: kept, dropped and torn writes, the
//!   crash point, the block holding the wrong byte, each write's role in fs-core's format
//! - `page`   a campaign folder as one HTML page (inline CSS and SVG, no script, no network)
//! - `bundle_page` one bundle folder as a page (a race bundle, or an fs bundle's crash state)
//! - `check_page` a `crashmonkey check --out` folder as a page: each failing state, its
//!   checker's output, and the state drawn on the write log checked
//! - `kernel_page` a kernel campaign's or an application run's folder as a page: findings by
//!   signature, each with its bundle, the command that shows it again and its report
//! - `output` writing a report file without ever replacing a user's file by accident
//!
//! Everything drawn is bounded by named constants; a page says when it left something out.

pub mod bundle_page;
pub mod check_page;
pub mod crash;
pub mod draw;
pub mod kernel_page;
pub mod log;
pub mod output;
pub mod page;
pub mod race;
pub mod text;

use std::path::PathBuf;

pub use output::write_new;
pub use page::{campaign_report, report};

/// Why a report could not be made or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    #[error(transparent)]
    Folder(#[from] crate::folder::FolderError),
    #[error("{}: {what}", path.display())]
    Bundle { path: PathBuf, what: String },
    #[error("{}: {source}", path.display())]
    Log {
        path: PathBuf,
        source: nbd_server::log::LogError,
    },
    #[error("{} exists; give --force to replace it", path.display())]
    Exists { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}
