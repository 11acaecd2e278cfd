//! Namespace operations on the root directory: create, unlink, rename (atomically replacing
//! the target) and link. Names are `f<N>`; a created file lives in inode slot `N`.
//!
//! Each is a task of three kinds of step, as the VFS and XFS do it: take the directory's
//! lock and the inode locks (the inode that may lose its last name only once no workload
//! operation is using it, as its last reference), change the directory and link counts in
//! one step; then, for an inode left with no name, drop its page cache folio by folio
//! (waiting for writeback, as truncate does) and free its blocks and the inode.

use crate::extent::FILE_BLOCKS_MAX;
use crate::fs::{Fs, FsError, Inode};
use crate::ondisk::format::DirEntry;
use crate::ops::{file_name, Op};
use crate::step::{Cx, Step, YieldPoint};
use crate::TaskId;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NsState {
    Apply,
    /// Dropping the page cache of the inode left with no name.
    Evict {
        ino: usize,
        cursor: u64,
    },
    Free {
        ino: usize,
    },
}

/// One namespace operation.
#[derive(Clone, Debug)]
pub struct NsTask {
    op: Op,
    st: NsState,
}

impl NsTask {
    pub fn new(op: Op) -> Self {
        debug_assert!(matches!(
            op,
            Op::Create { .. } | Op::Unlink { .. } | Op::Rename { .. } | Op::Link { .. }
        ));
        NsTask {
            op,
            st: NsState::Apply,
        }
    }

    /// The inode the operation may leave with no name: the unlinked one, or the renamed-over
    /// target.
    fn victim(&self, fs: &Fs) -> Option<usize> {
        let named = |file: usize| fs.lookup(&file_name(file)).and_then(|s| slot_ino(fs, s));
        match self.op {
            Op::Unlink { file } => named(file),
            Op::Rename { from, to } if from != to && named(from) != named(to) => named(to),
            _ => None,
        }
    }

    pub fn runnable(&self, fs: &Fs, me: TaskId) -> bool {
        match self.st {
            NsState::Apply => {
                fs.dir_lock.can_write()
                    && self.victim(fs).is_none_or(|ino| {
                        let i = fs.inode(ino);
                        i.users == 0 && i.i_rwsem.can_write() && i.invalidate_lock.can_write()
                    })
            }
            NsState::Evict { ino, cursor } => {
                match fs.inode(ino).cache.next_where(cursor, |_| true) {
                    Some(idx) => {
                        let f = fs.inode(ino).cache.get(idx).expect("found");
                        f.lockable_by(me) && !f.writeback
                    }
                    None => true,
                }
            }
            NsState::Free { .. } => true,
        }
    }

    pub fn step(&mut self, cx: &mut Cx<'_>) -> Step {
        match self.st {
            NsState::Apply => self.apply(cx),
            NsState::Evict { ino, cursor } => {
                match cx.fs.inode(ino).cache.next_where(cursor, |_| true) {
                    Some(idx) => {
                        cx.fs.remove_folio(ino, idx);
                        self.st = NsState::Evict {
                            ino,
                            cursor: idx + 1,
                        };
                        Step::Yield(YieldPoint::EvictPagecache, idx)
                    }
                    None => {
                        self.st = NsState::Free { ino };
                        Step::Yield(YieldPoint::EvictPagecacheDone, ino as u64)
                    }
                }
            }
            NsState::Free { ino } => {
                destroy(cx.fs, ino);
                let inode = cx.fs.inode_mut(ino);
                inode.invalidate_lock.up_write(cx.me);
                inode.i_rwsem.up_write(cx.me);
                cx.fs.dir_lock.up_write(cx.me);
                Step::Done(YieldPoint::EvictFree, ino as u64, Ok(0))
            }
        }
    }

    /// Locks, changes the directory and the link counts; an inode left with no name is
    /// marked free at once (no new operation can reach it) and evicted in the next steps.
    fn apply(&mut self, cx: &mut Cx<'_>) -> Step {
        let label = match self.op {
            Op::Create { .. } => YieldPoint::Creat,
            Op::Unlink { .. } => YieldPoint::Unlink,
            Op::Rename { .. } => YieldPoint::Rename,
            _ => YieldPoint::Link,
        };
        let r = match self.op {
            Op::Create { file } => create(cx, file),
            Op::Unlink { file } => unlink(cx, file),
            Op::Rename { from, to } => rename(cx, from, to),
            Op::Link { file, to } => link(cx, file, to),
            _ => unreachable!("a namespace operation"),
        };
        match r {
            Ok(Some(ino)) => {
                cx.fs.dir_lock.down_write(cx.me);
                let inode = cx.fs.inode_mut(ino);
                inode.i_rwsem.down_write(cx.me);
                inode.invalidate_lock.down_write(cx.me);
                self.st = NsState::Evict { ino, cursor: 0 };
                Step::Yield(label, ino as u64)
            }
            Ok(None) => Step::Done(label, 0, Ok(0)),
            Err(e) => Step::Done(label, 0, Err(e)),
        }
    }
}

/// The inode a directory slot names.
fn slot_ino(fs: &Fs, slot: usize) -> Option<usize> {
    fs.dir[slot].as_ref().map(|e| e.ino as usize)
}

/// Puts `name -> ino` in a free directory slot.
fn add_name(fs: &mut Fs, name: String, ino: usize) -> Result<(), FsError> {
    let slot = fs
        .dir
        .iter()
        .position(Option::is_none)
        .ok_or(FsError::NoSpace)?;
    fs.dir[slot] = Some(DirEntry {
        name,
        ino: ino as u32,
    });
    fs.dir_changed(slot);
    Ok(())
}

fn remove_slot(fs: &mut Fs, slot: usize) {
    fs.dir[slot] = None;
    fs.dir_changed(slot);
}

/// Drops one link of `ino`; `Some(ino)` when that was its last (it is then marked free).
fn drop_link(cx: &mut Cx<'_>, ino: usize) -> Option<usize> {
    let inode = cx.fs.inode_mut(ino);
    inode.nlink -= 1;
    inode.meta_gen += 1;
    cx.fs.touch(ino, false);
    if cx.fs.inode(ino).nlink > 0 {
        return None;
    }
    // Unreachable now (no new operation can open it); on disk an inode in use with no link
    // (an orphan, as XFS's unlinked list holds them) until `destroy` frees it; a crash in
    // between leaves the orphan for mount to free.
    cx.oracle.gone(ino, cx.op);
    Some(ino)
}

fn create(cx: &mut Cx<'_>, file: usize) -> Result<Option<usize>, FsError> {
    let name = file_name(file);
    if cx.fs.lookup(&name).is_some() {
        return Err(FsError::Invalid(format!("{name} exists")));
    }
    if file >= cx.fs.inodes.len() || cx.fs.inode(file).in_use {
        // In use, or an orphan still being freed.
        return Err(FsError::Invalid(format!("inode slot {file} is busy")));
    }
    add_name(cx.fs, name, file)?;
    let generation = cx.fs.inode(file).generation + 1;
    let old = std::mem::replace(cx.fs.inode_mut(file), Inode::created(generation));
    cx.fs.inode_mut(file).meta_gen = old.meta_gen + 1;
    cx.fs.inode_mut(file).extents = old.extents;
    cx.fs.touch(file, true);
    cx.oracle.created(file, generation, cx.op);
    cx.oracle.name(&file_name(file), Some(file), cx.op);
    Ok(None)
}

fn unlink(cx: &mut Cx<'_>, file: usize) -> Result<Option<usize>, FsError> {
    let name = file_name(file);
    let slot = cx.fs.lookup(&name).ok_or(FsError::NoSuchFile(file))?;
    let ino = slot_ino(cx.fs, slot).expect("found");
    remove_slot(cx.fs, slot);
    cx.oracle.name(&name, None, cx.op);
    Ok(drop_link(cx, ino))
}

fn rename(cx: &mut Cx<'_>, from: usize, to: usize) -> Result<Option<usize>, FsError> {
    let (src, dst) = (file_name(from), file_name(to));
    let s = cx.fs.lookup(&src).ok_or(FsError::NoSuchFile(from))?;
    let ino = slot_ino(cx.fs, s).expect("found");
    if from == to {
        return Ok(None);
    }
    let replaced = cx
        .fs
        .lookup(&dst)
        .map(|d| (d, slot_ino(cx.fs, d).expect("found")));
    remove_slot(cx.fs, s);
    match replaced {
        Some((d, _)) => {
            cx.fs.dir[d] = Some(DirEntry {
                name: dst.clone(),
                ino: ino as u32,
            });
            cx.fs.dir_changed(d);
        }
        None => add_name(cx.fs, dst.clone(), ino)?,
    }
    cx.fs.touch(ino, false);
    cx.oracle.name(&src, None, cx.op);
    cx.oracle.name(&dst, Some(ino), cx.op);
    Ok(match replaced {
        // Two names of one inode: the rename only drops the source name's link.
        Some((_, old)) if old == ino => drop_link(cx, ino),
        Some((_, old)) => drop_link(cx, old),
        None => None,
    })
}

fn link(cx: &mut Cx<'_>, file: usize, to: usize) -> Result<Option<usize>, FsError> {
    let (src, dst) = (file_name(file), file_name(to));
    let s = cx.fs.lookup(&src).ok_or(FsError::NoSuchFile(file))?;
    if cx.fs.lookup(&dst).is_some() {
        return Err(FsError::Invalid(format!("{dst} exists")));
    }
    let ino = slot_ino(cx.fs, s).expect("found");
    add_name(cx.fs, dst.clone(), ino)?;
    let inode = cx.fs.inode_mut(ino);
    inode.nlink += 1;
    cx.fs.touch(ino, false);
    cx.oracle.name(&dst, Some(ino), cx.op);
    Ok(None)
}

/// Frees an inode left with no name: its blocks (its page cache is gone already), size and
/// record. Its generation stays, for the next create to bump.
fn destroy(fs: &mut Fs, ino: usize) {
    let span = fs.inode(ino).extents.span().min(FILE_BLOCKS_MAX);
    fs.punch_blocks(ino, 0, span);
    let inode = fs.inode_mut(ino);
    inode.size = 0;
    inode.disk_size = 0;
    inode.nlink = 0;
    inode.in_use = false;
    inode.meta_gen += 1;
}
