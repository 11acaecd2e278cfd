//! An fs bundle's crash state drawn on its write log: which writes the state kept (the whole
//! prefix before its epoch, and the operations of its epoch it includes), which it dropped or
//! tore, which came after the crash point; the crash point itself; the block that holds the
//! wrong byte; and the role of each write in fs-core's on-disk format (data, metadata, or
//! journal), read from the block headers of the write's payload (docs/fs-core-format.md:
//! every metadata block starts with its kind's magic and its home block number, and a journal
//! copy of a block is one whose home is elsewhere).

use super::log::{ItemKind, LogTimeline, WriteFate};
use super::ReportError;
use crate::fscore::bundle::FsBundle;
use crate::history::{Epochs, History};
use crate::states::CrashState;
use fs_core::block::BLOCK_SIZE;
use fs_core::ondisk::format as f;
use nbd_server::log::{LogReader, RecordKind};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Blocks of one write whose headers are read to tell its role.
pub const ROLE_BLOCKS_PER_WRITE_MAX: u64 = 64;

/// What a crash state made of the log's writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CrashView {
    /// Writes of the epochs before the state's: all in it.
    pub before: BTreeSet<u64>,
    /// Writes of the state's epoch it keeps.
    pub kept: BTreeSet<u64>,
    /// Writes of the state's epoch it leaves out.
    pub dropped: BTreeSet<u64>,
    /// The write that landed in part, and the byte ranges that did.
    pub torn: Option<(u64, Vec<(u64, u64)>)>,
    /// The record the crash came before (the flush or power cut that ended the epoch), if any.
    pub cut_before_seq: Option<u64>,
    /// What the state is, in words.
    pub label: String,
}

/// The crash state of fs bundle `b`, read against its log `log` (`None`: the bundle has no
/// crash state, its run failed the race oracle only).
pub fn crash_view(b: &FsBundle, log: &Path) -> Result<Option<CrashView>, ReportError> {
    b.state.as_ref().map(|s| state_view(s, log)).transpose()
}

/// What crash state `state` made of the writes of the log at `log`.
pub fn state_view(state: &CrashState, log: &Path) -> Result<CrashView, ReportError> {
    let err = |source| ReportError::Log {
        path: log.to_path_buf(),
        source,
    };
    let mut view = CrashView {
        dropped: state.dropped_seqs.iter().copied().collect(),
        torn: state.torn.as_ref().map(|t| (t.seq, t.pieces.clone())),
        label: format!(
            "crash state {} ({}, epoch {})",
            state.id, state.label, state.epoch
        ),
        ..CrashView::default()
    };
    for epoch in Epochs::new(History::open(log).map_err(err)?) {
        let epoch = epoch.map_err(err)?;
        if epoch.index < state.epoch {
            view.before.extend(epoch.ops.iter().map(|o| o.seq));
            continue;
        }
        for &i in &state.included {
            let op = epoch.ops.get(i).ok_or_else(|| ReportError::Bundle {
                path: log.to_path_buf(),
                what: format!(
                    "the crash state includes operation {i} of epoch {}, which has {}",
                    epoch.index,
                    epoch.ops.len()
                ),
            })?;
            view.kept.insert(op.seq);
        }
        view.cut_before_seq = epoch.end_seq;
        break;
    }
    Ok(view)
}

/// Gives `t`'s writes the fates `view` says, and puts the crash point where it says.
pub fn apply(t: &mut LogTimeline, view: &CrashView) {
    for item in &mut t.items {
        let ItemKind::Write { fate, .. } = &mut item.kind else {
            continue;
        };
        let seq = item.seq;
        *fate = match &view.torn {
            Some((s, pieces)) if *s == seq => WriteFate::Torn(pieces.clone()),
            _ if view.before.contains(&seq) => WriteFate::Durable,
            _ if view.kept.contains(&seq) => WriteFate::Survived,
            _ if view.dropped.contains(&seq) => WriteFate::Dropped,
            _ => WriteFate::AfterCrash,
        };
    }
    let at = view
        .cut_before_seq
        .and_then(|s| t.items.iter().position(|i| i.seq == s))
        .unwrap_or(t.items.len());
    t.crash_at = Some((at, view.label.clone()));
}

/// The write log of the fs bundle folder `bundle` (or `log`, when given) with the bundle's
/// crash state on it, each write's role, and the disk byte holding the wrong byte (or
/// `highlight`) marked.
pub fn bundle_log(
    bundle: &Path,
    log: Option<&Path>,
    highlight: Option<u64>,
) -> Result<LogTimeline, ReportError> {
    let b = crate::fscore::bundle::load(bundle).map_err(|e| ReportError::Bundle {
        path: bundle.to_path_buf(),
        what: format!("{e:#}"),
    })?;
    let log = log.map_or_else(|| bundle.join("device.log"), Path::to_path_buf);
    let highlight = highlight.or_else(|| wrong_disk_byte(&b, &bundle.join("crash.img")));
    let mut t = super::log::read_log(&log, highlight)?;
    t.roles = roles(&log)?;
    if let Some(view) = crash_view(&b, &log)? {
        apply(&mut t, &view);
    }
    Ok(t)
}

/// The role of one 4 KiB block in fs-core's format, from its header.
pub fn block_role(block: u64, head: &[u8]) -> String {
    let word = |at: usize, n: usize| head.get(at..at + n);
    let Some(magic) = word(0, 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))) else {
        return "data".into();
    };
    let kind = match magic {
        f::MAGIC_SUPER => "superblock",
        f::MAGIC_BITMAP => "bitmap",
        f::MAGIC_INODE => "inode",
        f::MAGIC_EXTENT => "extent block",
        f::MAGIC_DIR => "directory",
        f::MAGIC_JOURNAL_SUPER => return "journal superblock".into(),
        f::MAGIC_DESCRIPTOR => return "journal descriptor".into(),
        f::MAGIC_COMMIT => return "journal commit".into(),
        _ => return "data".into(),
    };
    let home = word(8, 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    match home {
        Some(h) if h != block => format!("journal copy of {kind} block {h}"),
        _ => kind.into(),
    }
}

/// The fs-core roles of every write of the log at `path`, by sequence number: each block's
/// role, the distinct ones joined (`inode, data`).
pub fn roles(path: &Path) -> Result<BTreeMap<u64, String>, ReportError> {
    let err = |source| ReportError::Log {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = LogReader::open(path).map_err(err)?;
    let payloads = LogReader::open(path).map_err(err)?;
    let bs = BLOCK_SIZE as u64;
    let mut out = BTreeMap::new();
    for rec in reader.by_ref() {
        let rec = rec.map_err(err)?;
        if rec.kind != RecordKind::Write {
            continue;
        }
        let mut kinds: Vec<String> = Vec::new();
        let blocks = rec
            .header
            .length
            .div_ceil(bs)
            .min(ROLE_BLOCKS_PER_WRITE_MAX);
        for k in 0..blocks {
            let mut head = vec![0u8; f::HEADER_BYTES.min((rec.header.length - k * bs) as usize)];
            payloads
                .read_payload_at(&rec, k * bs, &mut head)
                .map_err(err)?;
            let role = block_role(rec.header.offset / bs + k, &head);
            if !kinds.contains(&role) {
                kinds.push(role);
            }
        }
        out.insert(rec.seq(), kinds.join(", "));
    }
    Ok(out)
}

/// The disk byte that holds the wrong byte of the bundle's first violation: its file offset
/// (the violation's "byte N") through the file's extents in the crash image. `None` when the
/// violation names no inode or offset, the image does not mount, or the block is a hole there.
pub fn wrong_disk_byte(b: &FsBundle, crash_img: &Path) -> Option<u64> {
    let v = b.verdict.as_ref()?.violations.first()?;
    let ino = v.ino?;
    let offset: u64 = v
        .what
        .strip_prefix("byte ")?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    let target = crate::fscore::device::Target::File(crash_img.to_path_buf());
    let image = crate::fscore::image::Image::open(&target).ok()?;
    let inode = image.fs.inodes.get(ino)?;
    let bs = BLOCK_SIZE as u64;
    let e = inode.extents.get(offset / bs);
    use fs_core::extent::ExtentState::{Unwritten, Written};
    matches!(e.state, Written | Unwritten).then_some(e.addr * bs + offset % bs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed commit-without-flush fixture. Its oracle.txt (written when it was found)
    /// says the state keeps 6 writes of its epoch and drops 13, and its fsck.txt that inode 0's
    /// file block 3, which holds the wrong byte 12288, is device block 46.
    #[test]
    fn the_fixture_crash_state_is_drawn_as_its_bundle_says() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/fs/commit-without-flush/fs-seed-2");
        let oracle = std::fs::read_to_string(dir.join("oracle.txt")).unwrap();
        assert!(
            oracle.contains("6 writes of the epoch kept, 13 dropped"),
            "{oracle}"
        );
        let t = bundle_log(&dir, None, None).unwrap();
        let count = |want: &WriteFate| {
            t.items
                .iter()
                .filter(|i| matches!(&i.kind, ItemKind::Write { fate, .. } if fate == want))
                .count()
        };
        assert_eq!(count(&WriteFate::Survived), 6);
        assert_eq!(count(&WriteFate::Dropped), 13);
        assert_eq!(t.highlight, Some(46 * BLOCK_SIZE as u64));
        assert!(t.roles.values().any(|r| r == "journal commit"));
        assert!(t.roles.values().any(|r| r == "data"));
        let (at, what) = t.crash_at.clone().expect("a crash point");
        assert!(what.starts_with("crash state 9"), "{what}");
        assert!(t.items[at..].iter().all(|i| !matches!(
            &i.kind,
            ItemKind::Write {
                fate: WriteFate::Survived | WriteFate::Dropped,
                ..
            }
        )));
        let svg = super::super::log::render_svg(&t);
        assert!(svg.contains(">role (fs-core)</text>"));
        assert!(svg.contains("byte 188416 (block 46)"));
    }

    #[test]
    fn roles_come_from_block_headers() {
        let mut inode = vec![0u8; 16];
        inode[..4].copy_from_slice(&f::MAGIC_INODE.to_le_bytes());
        inode[8..16].copy_from_slice(&7u64.to_le_bytes());
        assert_eq!(block_role(7, &inode), "inode");
        assert_eq!(block_role(30, &inode), "journal copy of inode block 7");
        let mut commit = vec![0u8; 16];
        commit[..4].copy_from_slice(&f::MAGIC_COMMIT.to_le_bytes());
        assert_eq!(block_role(31, &commit), "journal commit");
        assert_eq!(block_role(40, &[b'B'; 16]), "data");
        assert_eq!(block_role(40, &[]), "data");
    }
}
