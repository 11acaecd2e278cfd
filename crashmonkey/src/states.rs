//! Crash states: every disk image a power cut could have left, built from a write log.
//!
//! For each epoch (the operations between two flushes) on top of the full prefix before it:
//! - **prefix** states: the epoch up to and including each FUA write, up to each mark, and
//!   whole (the flush that closes it);
//! - **subset** states: an *ordered* subset of the epoch's operations, applied in log order
//!   (so at any sector an older write can never land after a newer one; an older write whose
//!   sectors a newer included write covers is coalesced away and adds nothing). A subset
//!   that contains an operation also contains every FUA write before it: a FUA write was
//!   durable before anything issued after it. The family is the subsets that keep at most
//!   `max_subset` operations or drop at most `max_subset`; it is enumerated exhaustively
//!   when it has at most `samples` members, and otherwise `samples` members are drawn with
//!   a generator seeded from `seed` and the epoch number;
//! - **torn** states: the operations before a multi-sector write, plus a seeded, proper,
//!   non-empty subset of that write's 512-byte sectors (or of its `atomic_bytes` units).
//!
//! Every state gets a content hash, computed incrementally (an additive hash over
//! `xxh3(sector, content)`, [`crate::sector_hash`]), so states with identical content are
//! checked once, and the cost of a state is the size of its own delta (or of what it leaves
//! out of its epoch, [`WholeEpoch`]), not the length of the log before it.
//!
//! Memory is bounded by [`STATE_MEMORY_BYTES_MAX`] however long the log: what the generator
//! keeps between epochs (the prefix's hash of every sector it wrote, the hash of every state
//! seen) lives in files ([`crate::state_tables`]); in memory it holds one epoch at a time,
//! whose payloads it reads from the log by offset, and an epoch too large for the bound is
//! refused.

use fs_core::block::BlockMap;
use std::collections::BTreeSet;
use std::path::PathBuf;

use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use nbd_server::log::{sector_pieces, torn_pieces, unit_pieces, KeptBytes, LogError, SECTOR_BYTES};

use crate::history::{Epoch, LogData, LogSpan, Op};
use crate::sector_hash::{contribution, hash_bytes, hash_partial, hash_sectors, SectorHash, Sum};
use crate::state_tables::{SectorHashes, SeenStates};

/// Memory one epoch's states may take to generate, at most: its operations, their sector
/// updates, the prefix's hashes of the sectors they touch, and its states' lists of
/// operations (estimated by [`epoch_memory_bytes`]). An epoch past it is refused. Nothing
/// else the generator holds grows with the log (see the module docs).
pub const STATE_MEMORY_BYTES_MAX: u64 = 256 << 20;
/// Memory per sector an epoch touches, at most: its update, its entries in the maps of the
/// prefix's hashes, of their sums, of a state's changes and of the whole epoch's content
/// ([`WholeEpoch`]; hash maps counted twice over: they grow by doubling), its place in the
/// whole epoch's list of updates, and its entries in the sorted lists read and written.
const EPOCH_SECTOR_BYTES: u64 = (std::mem::size_of::<SectorUpdate>()
    + 2 * (std::mem::size_of::<(u64, SectorHash)>()
        + std::mem::size_of::<(u64, Sum)>()
        + 2 * std::mem::size_of::<(u64, (SectorHash, Sum))>())
    + std::mem::size_of::<(u64, u32, u32)>()
    + 48) as u64;
/// Memory per operation of an epoch and per state of it: its index in the state's kept
/// operations or its sequence number among the dropped ones, with room for the set of kept
/// ones built on the way.
const STATE_OP_BYTES: u64 = 16;

/// Estimated memory [`StateGenerator::epoch_states`] takes for `epoch`: see
/// [`STATE_MEMORY_BYTES_MAX`].
pub fn epoch_memory_bytes(epoch: &Epoch, opts: &StateOptions) -> u64 {
    let n = epoch.ops.len() as u64;
    let (mut sectors, mut pieces, mut fua) = (0u64, 0u64, 0u64);
    for op in &epoch.ops {
        for &(off, len) in &op.pieces {
            sectors += (off + len).div_ceil(SECTOR_BYTES) - off / SECTOR_BYTES;
        }
        pieces += op.pieces.len() as u64;
        fua += u64::from(op.fua);
    }
    // Prefix states (one per mark and FUA write, the initial and the whole epoch), subsets
    // and torn writes (at most `samples` each).
    let states = 2 + epoch.marks.len() as u64 + fua + 2 * opts.samples as u64;
    let ops = n * std::mem::size_of::<Op>() as u64 + pieces * 16;
    ops.saturating_add(sectors.saturating_mul(EPOCH_SECTOR_BYTES))
        .saturating_add(states.saturating_mul(n).saturating_mul(STATE_OP_BYTES))
}

/// How states are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StateOptions {
    /// Subsets keep, or drop, at most this many operations of an epoch.
    pub max_subset: usize,
    /// Above this many candidates per epoch (subsets, and torn writes), sample this many.
    pub samples: usize,
    pub seed: u64,
    /// Generate torn-write states.
    pub torn: bool,
    /// The device's atomic write unit: a torn write lands whole units of this many bytes (a
    /// multiple of 512, a power of two). 512 models a 512-byte-sector disk; 4096 a 4Kn disk.
    pub atomic_bytes: u64,
}

impl Default for StateOptions {
    fn default() -> Self {
        StateOptions {
            max_subset: 2,
            samples: 64,
            seed: 1,
            torn: true,
            atomic_bytes: SECTOR_BYTES,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StateKind {
    /// Nothing of the log: the base image.
    Initial,
    /// Every operation up to a FUA write, a mark, or the epoch's end.
    Prefix,
    Subset,
    Torn,
}

/// A write that landed in part.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TornOp {
    /// Index of the operation in its epoch.
    pub index: usize,
    pub seq: u64,
    /// Byte ranges that landed, sector aligned.
    pub pieces: Vec<(u64, u64)>,
}

/// One crash state: the full prefix before `epoch`, plus `included` operations of it (indices,
/// ascending), plus an optional torn operation applied after them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CrashState {
    pub id: usize,
    pub epoch: usize,
    pub kind: StateKind,
    /// What the state stands for, e.g. `flush@1234`, `fua@77`, `mark:after-fsync-a`.
    pub label: String,
    pub included: Vec<usize>,
    /// Sequence numbers of the epoch's operations left out.
    pub dropped_seqs: Vec<u64>,
    pub torn: Option<TornOp>,
    /// The last mark all of whose preceding writes are in the state.
    pub mark: Option<String>,
    /// Hex content hash.
    pub hash: String,
    /// Id of an earlier state with the same content; such a state is not checked again.
    pub duplicate_of: Option<usize>,
}

/// What an operation does to one sector.
#[derive(Clone, Copy, Debug)]
enum SectorUpdate {
    /// The whole sector: the hash of its bytes, and its contribution to an image's sum (a
    /// hash of its own, computed once per epoch: hashing was a tenth of a campaign).
    Full(u64, SectorHash, Sum),
    /// Part of a sector: offset, length and hash of the bytes.
    Partial(u64, u16, u16, SectorHash),
}

impl SectorUpdate {
    fn sector(&self) -> u64 {
        match *self {
            SectorUpdate::Full(s, ..) | SectorUpdate::Partial(s, ..) => s,
        }
    }
    fn apply(&self, prev: Option<&SectorHash>) -> SectorHash {
        match *self {
            SectorUpdate::Full(_, h, _) => h,
            SectorUpdate::Partial(_, off, len, h) => hash_partial(prev, off, len, &h),
        }
    }
    /// The sector's new content and its contribution to the sum, after `prev`.
    fn apply_sum(&self, prev: Option<&SectorHash>) -> (SectorHash, Sum) {
        match *self {
            SectorUpdate::Full(_, h, c) => (h, c),
            SectorUpdate::Partial(s, ..) => {
                let h = self.apply(prev);
                (h, contribution(s, &h))
            }
        }
    }
}

fn add(a: &mut Sum, b: &Sum) {
    for i in 0..4 {
        a[i] = a[i].wrapping_add(b[i]);
    }
}

fn sub(a: &mut Sum, b: &Sum) {
    for i in 0..4 {
        a[i] = a[i].wrapping_sub(b[i]);
    }
}

fn hex(sum: &Sum) -> String {
    sum.iter().map(|l| format!("{l:016x}")).collect()
}

/// Bytes of an operation's content read from the log at a time while its sectors are
/// hashed (one read per chunk, not per sector); a multiple of the sector size.
const HASH_READ_BYTES_MAX: u64 = 256 * 1024;

/// Sector updates of one operation over `pieces`, reading its data from the log.
fn op_updates(
    op: &Op,
    pieces: &[(u64, u64)],
    log: &dyn LogData,
) -> Result<Vec<SectorUpdate>, LogError> {
    // A piece's sectors, and one more for each end that is not on a sector boundary.
    let sectors: u64 = pieces.iter().map(|&(_, len)| len / SECTOR_BYTES + 2).sum();
    let mut out = Vec::with_capacity(sectors as usize);
    let mut buf = Vec::new();
    let mut hashes = Vec::with_capacity(sectors.min(HASH_READ_BYTES_MAX / SECTOR_BYTES) as usize);
    let zero = op.data == crate::history::OpData::Zero;
    for &(off, len) in pieces {
        // Chunks end on sector boundaries (but the piece's last), so a sector is never split.
        let mut at = off;
        while at < off + len {
            let boundary = (at / SECTOR_BYTES + HASH_READ_BYTES_MAX / SECTOR_BYTES) * SECTOR_BYTES;
            let end = boundary.min(off + len);
            let n = (end - at) as usize;
            // The bytes where the log holds them in memory, else a copy.
            let bytes = match op.bytes_in(log, at, n) {
                Some(bytes) => bytes,
                None => {
                    buf.resize(n, 0);
                    op.read(log, at, &mut buf)?;
                    &buf[..]
                }
            };
            chunk_updates(zero, at, bytes, &mut hashes, &mut out);
            at = end;
        }
    }
    Ok(out)
}

/// Appends the sector updates of `buf`, an operation's bytes at byte `at` (of zeros when
/// `zero`): the whole sectors in it are hashed together ([`hash_sectors`]); a part of a sector
/// at either end on its own.
fn chunk_updates(
    zero: bool,
    at: u64,
    buf: &[u8],
    hashes: &mut Vec<SectorHash>,
    out: &mut Vec<SectorUpdate>,
) {
    static ZERO_HASH: std::sync::OnceLock<SectorHash> = std::sync::OnceLock::new();
    let zero_hash = *ZERO_HASH.get_or_init(|| hash_bytes(&[0u8; SECTOR_BYTES as usize]));
    let end = at + buf.len() as u64;
    let whole_from = (at.div_ceil(SECTOR_BYTES) * SECTOR_BYTES).min(end);
    let whole_to = (end / SECTOR_BYTES * SECTOR_BYTES).max(whole_from);
    hashes.clear();
    if !zero {
        hash_sectors(
            &buf[(whole_from - at) as usize..(whole_to - at) as usize],
            hashes,
        );
    }
    let mut whole = 0;
    for (s_off, s_len) in sector_pieces(at, end - at) {
        let sector = s_off / SECTOR_BYTES;
        out.push(if s_len == SECTOR_BYTES {
            let h = if zero { zero_hash } else { hashes[whole] };
            whole += 1;
            SectorUpdate::Full(sector, h, contribution(sector, &h))
        } else {
            let b = &buf[(s_off - at) as usize..(s_off - at + s_len) as usize];
            let h = hash_bytes(b);
            SectorUpdate::Partial(sector, (s_off % SECTOR_BYTES) as u16, s_len as u16, h)
        });
    }
}

/// What an epoch's operations do to each sector they write, hashed: the part of state
/// generation that needs only the epoch and the log, so that it can run ahead on a thread of
/// its own ([`StateGenerator::epoch_states_hashed`]).
pub struct EpochHashes {
    updates: Vec<Vec<SectorUpdate>>,
}

impl EpochHashes {
    /// Hashes `epoch`'s sectors, reading its data from `log`; an epoch that would take more
    /// than [`STATE_MEMORY_BYTES_MAX`] to generate is refused first.
    pub fn of(epoch: &Epoch, opts: &StateOptions, log: &dyn LogData) -> Result<Self, LogError> {
        Self::of_kept(epoch, opts, log, None)
    }

    /// As [`Self::of`], with the log's bytes the reader kept while it read the epoch
    /// ([`crate::history::Epochs::take_kept`]), when it did: its payloads are then not read
    /// again (what lies outside them, an operation carried over, is read from `log`).
    pub fn of_kept(
        epoch: &Epoch,
        opts: &StateOptions,
        log: &dyn LogData,
        kept: Option<&KeptBytes>,
    ) -> Result<Self, LogError> {
        let bytes = epoch_memory_bytes(epoch, opts);
        if bytes > STATE_MEMORY_BYTES_MAX {
            return Err(LogError::Payload(format!(
                "epoch {} ({} operations) needs about {bytes} bytes of memory for its crash \
                 states, more than the {STATE_MEMORY_BYTES_MAX} a state generator may take",
                epoch.index,
                epoch.ops.len()
            )));
        }
        let span = match kept {
            Some(kept) => LogSpan::of_kept(log, kept),
            None => LogSpan::of_ops(log, &epoch.ops)?,
        };
        let updates = epoch
            .ops
            .iter()
            .map(|op| op_updates(op, &op.pieces, &span))
            .collect::<Result<_, _>>()?;
        Ok(EpochHashes { updates })
    }

    /// Estimated memory it holds.
    pub fn bytes(&self) -> usize {
        self.updates
            .iter()
            .map(|u| u.len() * std::mem::size_of::<SectorUpdate>())
            .sum()
    }
}

/// The sum of the state of `included` (and `torn`, its operation's index and its sector
/// updates), from the prefix's (of sum `prefix_sum`): each sector the state writes. `old`
/// holds the prefix's hashes of the sectors the epoch touches, `before` their contributions
/// to its sum.
fn state_sum(
    prefix_sum: Sum,
    updates: &[Vec<SectorUpdate>],
    (old, before): (&BlockMap<SectorHash>, &BlockMap<Sum>),
    included: &[usize],
    torn: Option<(usize, &[SectorUpdate])>,
) -> Sum {
    let mut changed: BlockMap<(SectorHash, Sum)> = BlockMap::default();
    changed.reserve(included.iter().map(|&i| updates[i].len()).sum());
    let apply = |u: &SectorUpdate, changed: &mut BlockMap<(SectorHash, Sum)>| {
        let s = u.sector();
        let prev = changed.get(&s).map(|c| &c.0).or_else(|| old.get(&s));
        let new = u.apply_sum(prev);
        changed.insert(s, new);
    };
    for &i in included {
        for u in &updates[i] {
            apply(u, &mut changed);
        }
    }
    for u in torn.map_or(&[][..], |t| t.1) {
        apply(u, &mut changed);
    }
    with_changes(prefix_sum, &changed, before)
}

/// `sum` with each sector of `changed` holding its new content: its contribution in `before`
/// (if the prefix has one) taken out, its new one added.
fn with_changes(
    mut sum: Sum,
    changed: &BlockMap<(SectorHash, Sum)>,
    before: &BlockMap<Sum>,
) -> Sum {
    for (s, (_, c)) in changed {
        if let Some(p) = before.get(s) {
            sub(&mut sum, p);
        }
        add(&mut sum, c);
    }
    sum
}

/// What a whole epoch does on top of the prefix: what every sector it touches holds after
/// all of its operations, the image's sum then, and which updates touch each sector. A state
/// that drops few of the epoch's operations is summed from it, by the sectors the dropped
/// ones touch ([`WholeEpoch::state_sum`]), not from the prefix by every sector it writes: a
/// state that drops one write of a 256-write epoch then costs one write's sectors, not 256.
struct WholeEpoch {
    /// Each touched sector's hash and contribution with every operation applied.
    now: BlockMap<(SectorHash, Sum)>,
    /// The image's sum with every operation applied.
    sum: Sum,
    /// `(sector, operation, index in its updates)` of every update, by sector, then in the
    /// order they apply.
    touches: Vec<(u64, u32, u32)>,
    /// How many updates the epoch has.
    updates: usize,
}

impl WholeEpoch {
    /// The epoch of `updates` over a prefix of sum `prefix_sum`; `old` and `before` as in
    /// [`state_sum`].
    fn of(
        updates: &[Vec<SectorUpdate>],
        old: &BlockMap<SectorHash>,
        before: &BlockMap<Sum>,
        prefix_sum: Sum,
    ) -> Self {
        let count = updates.iter().map(Vec::len).sum();
        let mut now: BlockMap<(SectorHash, Sum)> = BlockMap::default();
        now.reserve(count);
        let mut touches = Vec::with_capacity(count);
        for (i, op) in updates.iter().enumerate() {
            for (k, u) in op.iter().enumerate() {
                let s = u.sector();
                let new = u.apply_sum(now.get(&s).map(|n| &n.0).or_else(|| old.get(&s)));
                now.insert(s, new);
                touches.push((s, i as u32, k as u32));
            }
        }
        touches.sort_unstable();
        let sum = with_changes(prefix_sum, &now, before);
        WholeEpoch {
            now,
            sum,
            touches,
            updates: count,
        }
    }

    /// The sum of the state that keeps the operations `kept` says (and `torn`, as in
    /// [`state_sum`]): the whole epoch's, with each sector a left-out operation touches
    /// taken back to what the state's own updates of it make (or to the prefix's content,
    /// when it has none). Equal to [`state_sum`]'s: the sectors only kept operations touch
    /// hold the same in both.
    fn state_sum(
        &self,
        updates: &[Vec<SectorUpdate>],
        (old, before): (&BlockMap<SectorHash>, &BlockMap<Sum>),
        kept: &[bool],
        torn: Option<(usize, &[SectorUpdate])>,
    ) -> Sum {
        let torn_updates = torn.map_or(&[][..], |t| t.1);
        let mut affected: Vec<u64> = (0..kept.len())
            .filter(|&i| !kept[i])
            .flat_map(|i| updates[i].iter().map(SectorUpdate::sector))
            .chain(torn_updates.iter().map(SectorUpdate::sector))
            .collect();
        affected.sort_unstable();
        affected.dedup();
        let mut sum = self.sum;
        for s in affected {
            let from = self.touches.partition_point(|t| t.0 < s);
            let mut cur: Option<(SectorHash, Sum)> = None;
            let kept_updates = self.touches[from..]
                .iter()
                .take_while(|t| t.0 == s)
                .filter(|t| kept[t.1 as usize])
                .map(|t| &updates[t.1 as usize][t.2 as usize]);
            let torn_of_s = torn_updates.iter().filter(|u| u.sector() == s);
            for u in kept_updates.chain(torn_of_s) {
                cur = Some(u.apply_sum(cur.as_ref().map(|c| &c.0).or_else(|| old.get(&s))));
            }
            let state = cur.map(|c| c.1).or_else(|| before.get(&s).copied());
            sub(
                &mut sum,
                &self.now.get(&s).expect("a sector of the epoch").1,
            );
            add(&mut sum, &state.unwrap_or([0; 4]));
        }
        sum
    }
}

/// The contributions to the prefix's sum of the sectors in `old` (the prefix's hashes of
/// those an epoch touches): each state of the epoch takes some of them out of the sum.
fn prefix_contribs(old: &BlockMap<SectorHash>) -> BlockMap<Sum> {
    old.iter().map(|(&s, h)| (s, contribution(s, h))).collect()
}

/// A crash state before its content is hashed.
struct Candidate {
    kind: StateKind,
    label: String,
    included: Vec<usize>,
    torn: Option<TornOp>,
}

/// The prefix states of `epoch`: at each mark, after each FUA write and at its end (and the
/// initial state before the first epoch).
fn prefix_candidates(epoch: &Epoch) -> Vec<Candidate> {
    let n = epoch.ops.len();
    let prefix = |label: String, len: usize| Candidate {
        kind: StateKind::Prefix,
        label,
        included: (0..len).collect(),
        torn: None,
    };
    let mut out = Vec::new();
    if epoch.index == 0 {
        out.push(Candidate {
            kind: StateKind::Initial,
            label: "initial".into(),
            included: vec![],
            torn: None,
        });
    }
    for (pos, name) in &epoch.marks {
        if *pos < n {
            out.push(prefix(format!("mark:{name}"), *pos));
        }
    }
    for (i, op) in epoch.ops.iter().enumerate() {
        if op.fua && i + 1 < n {
            out.push(prefix(format!("fua@{}", op.seq), i + 1));
        }
    }
    let end_label = match epoch.end_seq {
        Some(seq) => format!(
            "{}@{seq}",
            serde_json::to_value(epoch.end)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default()
        ),
        None => "end-of-log".into(),
    };
    if n > 0 || epoch.index == 0 {
        out.push(prefix(end_label, n));
    }
    out
}

/// Whether `included` (with `torn`) is a state a power cut could leave of `epoch`:
/// operations of the epoch, ascending; every FUA write before the last one kept (or torn)
/// kept whole, since it was durable before anything issued after it; a torn write after every
/// kept one (the generator's torn states are so: an older write cannot land over a newer
/// one) with some, not all, of its bytes landed, in pieces of its own, ascending.
pub fn legal(epoch: &Epoch, included: &[usize], torn: Option<&TornOp>) -> bool {
    let n = epoch.ops.len();
    if included.windows(2).any(|w| w[0] >= w[1]) || included.last().is_some_and(|&i| i >= n) {
        return false;
    }
    let last = match torn {
        Some(t) => Some(t.index),
        None => included.last().copied(),
    };
    let fua_kept = (0..last.unwrap_or(0))
        .filter(|&j| epoch.ops[j].fua)
        .all(|j| included.binary_search(&j).is_ok());
    fua_kept && torn.is_none_or(|t| legal_torn(epoch, included, t))
}

fn legal_torn(epoch: &Epoch, included: &[usize], t: &TornOp) -> bool {
    let Some(op) = epoch.ops.get(t.index) else {
        return false;
    };
    let inside = |&(off, len): &(u64, u64)| {
        len > 0
            && op
                .pieces
                .iter()
                .any(|&(o, l)| off >= o && off + len <= o + l)
    };
    let landed: u64 = t.pieces.iter().map(|p| p.1).sum();
    let whole: u64 = op.pieces.iter().map(|p| p.1).sum();
    op.seq == t.seq
        && included.last().is_none_or(|&i| i < t.index)
        && !t.pieces.is_empty()
        && t.pieces.iter().all(inside)
        && t.pieces.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0)
        && landed < whole
}

/// What the generator keeps between epochs, in files (made at the first epoch).
struct Tables {
    /// The prefix's hash of every sector it wrote.
    prefix: SectorHashes,
    /// The first state of each content hash.
    seen: SeenStates,
}

/// Keeps the content hash of the prefix and turns epochs into crash states.
pub struct StateGenerator {
    opts: StateOptions,
    /// Where the files of `tables` go.
    dir: PathBuf,
    tables: Option<Tables>,
    prefix_sum: Sum,
    next_id: usize,
    last_mark: Option<String>,
    log: Box<dyn LogData>,
    pub generated: usize,
    pub unique: usize,
}

impl StateGenerator {
    /// A generator over the log whose bytes `log` reads (its file, or the log in memory).
    /// Its files go to the system's temporary folder.
    pub fn new(opts: StateOptions, log: impl LogData + 'static) -> Self {
        Self::in_dir(opts, log, std::env::temp_dir())
    }

    /// As [`Self::new`], with the generator's files (unlinked) in `dir`.
    pub fn in_dir(opts: StateOptions, log: impl LogData + 'static, dir: PathBuf) -> Self {
        StateGenerator {
            opts,
            dir,
            tables: None,
            prefix_sum: [0; 4],
            next_id: 0,
            last_mark: None,
            log: Box::new(log),
            generated: 0,
            unique: 0,
        }
    }

    /// The states of `epoch`, then advances the prefix past it.
    pub fn epoch_states(&mut self, epoch: &Epoch) -> Result<Vec<CrashState>, LogError> {
        self.epoch_states_and(epoch, &[])
    }

    /// As [`Self::epoch_states`], with the states `extra` names appended after the drawn
    /// ones (so the draws are the same): each an ordered set of the epoch's operations and a
    /// torn write, as a minimisation makes them, which the generator need not draw. Those
    /// that are not crash states of the epoch ([`legal`]) are left out.
    pub fn epoch_states_and(
        &mut self,
        epoch: &Epoch,
        extra: &[(Vec<usize>, Option<TornOp>)],
    ) -> Result<Vec<CrashState>, LogError> {
        let hashed = EpochHashes::of(epoch, &self.opts, self.log.as_ref())?;
        self.hashed_epoch_states(epoch, hashed, extra)
    }

    /// As [`Self::epoch_states`], with the epoch's sectors already hashed (by
    /// [`EpochHashes::of`], on another thread, for the same log and options).
    pub fn epoch_states_hashed(
        &mut self,
        epoch: &Epoch,
        hashed: EpochHashes,
    ) -> Result<Vec<CrashState>, LogError> {
        self.hashed_epoch_states(epoch, hashed, &[])
    }

    fn hashed_epoch_states(
        &mut self,
        epoch: &Epoch,
        hashed: EpochHashes,
        extra: &[(Vec<usize>, Option<TornOp>)],
    ) -> Result<Vec<CrashState>, LogError> {
        let updates = hashed.updates;
        let old = self.prefix_hashes(&updates)?;
        let before = prefix_contribs(&old);
        let whole = WholeEpoch::of(&updates, &old, &before, self.prefix_sum);
        let candidates = self.candidates(epoch, extra);
        let states = candidates
            .into_iter()
            .map(|c| self.state(epoch, &updates, (&old, &before, &whole), c))
            .collect::<Result<Vec<_>, _>>()?;
        self.advance_prefix(whole)?;
        if let Some((_, name)) = epoch.marks.last() {
            self.last_mark = Some(name.clone());
        }
        Ok(states)
    }

    /// The states of `epoch` before their content is hashed: drawn, then `extra`'s legal ones.
    fn candidates(&self, epoch: &Epoch, extra: &[(Vec<usize>, Option<TornOp>)]) -> Vec<Candidate> {
        let mut rng = ChaCha8Rng::seed_from_u64(
            self.opts.seed ^ (epoch.index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        // The draws happen in this order (subsets, then torn writes): keep it, a seed's
        // states depend on it.
        let mut candidates = prefix_candidates(epoch);
        for set in self.subsets(epoch, &mut rng) {
            candidates.push(Candidate {
                kind: StateKind::Subset,
                label: "subset".into(),
                included: set,
                torn: None,
            });
        }
        if self.opts.torn {
            candidates.extend(self.torn_candidates(epoch, &mut rng));
        }
        for (included, torn) in extra {
            if legal(epoch, included, torn.as_ref()) {
                candidates.push(Candidate {
                    kind: torn.as_ref().map_or(StateKind::Subset, |_| StateKind::Torn),
                    label: torn
                        .as_ref()
                        .map_or("subset".into(), |t| format!("torn@{}", t.seq)),
                    included: included.clone(),
                    torn: torn.clone(),
                });
            }
        }
        candidates
    }

    /// The generator's files, made on first use.
    fn tables(&mut self) -> Result<&mut Tables, LogError> {
        if self.tables.is_none() {
            let made = SectorHashes::new(&self.dir)
                .and_then(|prefix| Ok((prefix, SeenStates::new(&self.dir)?)))
                .map_err(|e| self.table_error(e))?;
            self.tables = Some(Tables {
                prefix: made.0,
                seen: made.1,
            });
        }
        Ok(self.tables.as_mut().expect("made above"))
    }

    fn table_error(&self, e: std::io::Error) -> LogError {
        let what = format!("crash-state tables in {}: {e}", self.dir.display());
        LogError::Io(std::io::Error::new(e.kind(), what))
    }

    /// The prefix's hashes of the sectors `updates` touch (those it has written).
    fn prefix_hashes(
        &mut self,
        updates: &[Vec<SectorUpdate>],
    ) -> Result<BlockMap<SectorHash>, LogError> {
        let mut sectors: Vec<u64> = updates.iter().flatten().map(|u| u.sector()).collect();
        sectors.sort_unstable();
        sectors.dedup();
        let got = self.tables()?.prefix.get_many(&sectors);
        got.map_err(|e| self.table_error(e))
    }

    /// Torn states: operations that span several atomic units (at most `samples` of them,
    /// drawn), each with every operation before it and a drawn part of its own units.
    fn torn_candidates(&self, epoch: &Epoch, rng: &mut ChaCha8Rng) -> Vec<Candidate> {
        let unit = self.opts.atomic_bytes.max(SECTOR_BYTES);
        let units = |op: &Op| -> Vec<(u64, u64)> {
            op.pieces
                .iter()
                .flat_map(|p| unit_pieces(p.0, p.1, unit))
                .collect()
        };
        let n = epoch.ops.len();
        let multi: Vec<usize> = (0..n).filter(|&i| units(&epoch.ops[i]).len() > 1).collect();
        let chosen: Vec<usize> = if multi.len() <= self.opts.samples {
            multi
        } else {
            let mut idx: Vec<usize> = sample(rng, multi.len(), self.opts.samples)
                .into_iter()
                .map(|i| multi[i])
                .collect();
            idx.sort_unstable();
            idx
        };
        chosen
            .into_iter()
            .map(|t| {
                let op = &epoch.ops[t];
                Candidate {
                    kind: StateKind::Torn,
                    label: format!("torn@{}", op.seq),
                    included: (0..t).collect(),
                    torn: Some(TornOp {
                        index: t,
                        seq: op.seq,
                        pieces: torn_pieces(rng, &units(op)),
                    }),
                }
            })
            .collect()
    }

    /// The crash state `c` stands for: its content hash, its mark, and whether an earlier
    /// state had the same content.
    fn state(
        &mut self,
        epoch: &Epoch,
        updates: &[Vec<SectorUpdate>],
        (old, before, whole): (&BlockMap<SectorHash>, &BlockMap<Sum>, &WholeEpoch),
        c: Candidate,
    ) -> Result<CrashState, LogError> {
        let mut kept = vec![false; epoch.ops.len()];
        for &i in &c.included {
            kept[i] = true;
        }
        let torn = match &c.torn {
            Some(t) => Some((
                t,
                op_updates(&epoch.ops[t.index], &t.pieces, self.log.as_ref())?,
            )),
            None => None,
        };
        let torn = torn.as_ref().map(|(t, u)| (t.index, &u[..]));
        let dropped_updates: usize = (0..kept.len())
            .filter(|&i| !kept[i])
            .map(|i| updates[i].len())
            .sum();
        // Summed by the smaller side: the sectors the state leaves out or those it writes.
        let sum = if 2 * dropped_updates < whole.updates {
            whole.state_sum(updates, (old, before), &kept, torn)
        } else {
            state_sum(self.prefix_sum, updates, (old, before), &c.included, torn)
        };
        let mark = self.mark_for(epoch, &c.included);
        let dropped_seqs = (0..epoch.ops.len())
            .filter(|&i| !kept[i])
            .map(|i| epoch.ops[i].seq)
            .collect();
        let id = self.next_id;
        self.next_id += 1;
        self.generated += 1;
        let first = self.tables()?.seen.first_or_insert(&sum, id);
        let duplicate_of = first.map_err(|e| self.table_error(e))?;
        if duplicate_of.is_none() {
            self.unique += 1;
        }
        Ok(CrashState {
            id,
            epoch: epoch.index,
            kind: c.kind,
            label: c.label,
            included: c.included,
            dropped_seqs,
            torn: c.torn,
            mark,
            hash: hex(&sum),
            duplicate_of,
        })
    }

    /// Advances the prefix past a whole epoch ([`WholeEpoch`]).
    fn advance_prefix(&mut self, whole: WholeEpoch) -> Result<(), LogError> {
        self.prefix_sum = whole.sum;
        let mut entries: Vec<(u64, SectorHash)> =
            whole.now.into_iter().map(|(s, (h, _))| (s, h)).collect();
        entries.sort_unstable_by_key(|e| e.0);
        let put = self.tables()?.prefix.put_many(&entries);
        put.map_err(|e| self.table_error(e))
    }

    /// The last mark all of whose preceding operations are in the state.
    fn mark_for(&self, epoch: &Epoch, included: &[usize]) -> Option<String> {
        // Length of the all-included prefix of the epoch's operations.
        let full = included
            .iter()
            .enumerate()
            .take_while(|(k, &i)| *k == i)
            .count();
        epoch
            .marks
            .iter()
            .rev()
            .find(|(pos, _)| *pos <= full)
            .map(|(_, name)| name.clone())
            .or_else(|| self.last_mark.clone())
    }

    /// The subset family of the module docs, exhaustive or sampled, with the FUA closure.
    fn subsets(&self, epoch: &Epoch, rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
        let n = epoch.ops.len();
        if n < 2 {
            return Vec::new();
        }
        let k_max = self.opts.max_subset.min(n - 1);
        let mut family_size: u128 = 0;
        let mut c: u128 = 1;
        for k in 1..=k_max {
            c = c * (n - k + 1) as u128 / k as u128;
            family_size = family_size.saturating_add(2 * c);
        }
        let fua: Vec<usize> = (0..n).filter(|&i| epoch.ops[i].fua).collect();
        let close = |mut set: Vec<usize>| -> Vec<usize> {
            if let Some(&last) = set.last() {
                for &f in &fua {
                    if f < last {
                        set.push(f);
                    }
                }
                set.sort_unstable();
                set.dedup();
            }
            set
        };
        let complement = |set: &[usize]| -> Vec<usize> {
            let s: BTreeSet<usize> = set.iter().copied().collect();
            (0..n).filter(|i| !s.contains(i)).collect()
        };
        let mut out: BTreeSet<Vec<usize>> = BTreeSet::new();
        let mut ordered = Vec::new();
        let push =
            |set: Vec<usize>, out: &mut BTreeSet<Vec<usize>>, ordered: &mut Vec<Vec<usize>>| {
                let set = close(set);
                if !set.is_empty() && set.len() < n && out.insert(set.clone()) {
                    ordered.push(set);
                }
            };
        if family_size <= self.opts.samples as u128 {
            for k in 1..=k_max {
                for combo in combinations(n, k) {
                    let comp = complement(&combo);
                    push(combo, &mut out, &mut ordered);
                    push(comp, &mut out, &mut ordered);
                }
            }
        } else {
            for _ in 0..self.opts.samples {
                let k = rng.random_range(1..=k_max);
                let mut combo: Vec<usize> = sample(rng, n, k).into_iter().collect();
                combo.sort_unstable();
                let set = if rng.random_bool(0.5) {
                    combo
                } else {
                    complement(&combo)
                };
                push(set, &mut out, &mut ordered);
            }
        }
        ordered
    }
}

/// All k-element subsets of 0..n, ascending, in lexicographic order.
fn combinations(n: usize, k: usize) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    let mut idx: Vec<usize> = (0..k).collect();
    if k == 0 || k > n {
        return out;
    }
    loop {
        out.push(idx.clone());
        let mut i = k;
        while i > 0 && idx[i - 1] == n - k + i - 1 {
            i -= 1;
        }
        if i == 0 {
            return out;
        }
        idx[i - 1] += 1;
        for j in i..k {
            idx[j] = idx[j - 1] + 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An epoch whose states would take more than [`STATE_MEMORY_BYTES_MAX`] is refused
    /// before anything is read or allocated for it; one just under the bound is not.
    #[test]
    fn an_epoch_past_the_memory_bound_is_refused() {
        let write = |seq: u64, bytes: u64| Op {
            seq,
            kind: nbd_server::log::RecordKind::Write,
            fua: false,
            offset: 0,
            length: bytes,
            pieces: vec![(0, bytes)],
            data: crate::history::OpData::Zero,
        };
        let opts = StateOptions::default();
        let sectors_max = STATE_MEMORY_BYTES_MAX / EPOCH_SECTOR_BYTES;
        let epoch = |bytes: u64| Epoch {
            index: 0,
            ops: vec![write(0, bytes)],
            marks: vec![],
            end: crate::history::EpochEnd::Flush,
            end_seq: Some(1),
        };
        let small = epoch((sectors_max - 16) * SECTOR_BYTES);
        assert!(epoch_memory_bytes(&small, &opts) <= STATE_MEMORY_BYTES_MAX);
        let big = epoch((sectors_max + 1) * SECTOR_BYTES);
        assert!(epoch_memory_bytes(&big, &opts) > STATE_MEMORY_BYTES_MAX);
        let mut g = StateGenerator::new(opts, std::sync::Arc::new(Vec::<u8>::new()));
        match g.epoch_states(&big) {
            Err(LogError::Payload(what)) => assert!(what.contains("memory"), "{what}"),
            other => panic!("not refused: {other:?}"),
        }
    }

    /// The estimate is the documented budget, term by term: per operation its `Op` and 16
    /// bytes a piece; per sector touched its update and 2 x (40 + 40 + 72 + 40) + 48 bytes of
    /// map and list entries; per operation and state 16 bytes, for 2 + marks + FUA writes +
    /// 2 x samples states.
    #[test]
    fn the_memory_estimate_is_the_documented_budget() {
        let op = |seq: u64, fua: bool, pieces: Vec<(u64, u64)>| Op {
            seq,
            kind: nbd_server::log::RecordKind::Write,
            fua,
            offset: 0,
            length: 8192,
            pieces,
            data: crate::history::OpData::Zero,
        };
        let epoch = Epoch {
            index: 0,
            // Sectors: 0-1, 1-2 (1000..1100 crosses into sector 2), 9-10: six in all.
            ops: vec![
                op(0, false, vec![(0, 1024), (1000, 100)]),
                op(1, true, vec![(5000, 512)]),
            ],
            marks: vec![(1, "m".into())],
            end: crate::history::EpochEnd::Flush,
            end_seq: Some(2),
        };
        let opts = StateOptions {
            samples: 4,
            ..StateOptions::default()
        };
        let op_bytes = std::mem::size_of::<Op>() as u64;
        // Map entries of 24, 40, 56 and 56 bytes, doubled; 16 in the whole epoch's list.
        let sector_bytes = std::mem::size_of::<SectorUpdate>() as u64 + 2 * 176 + 16 + 48;
        let states = 2 + 1 + 1 + 2 * 4;
        let want = 2 * op_bytes + 3 * 16 + 6 * sector_bytes + states * 2 * 16;
        assert_eq!(epoch_memory_bytes(&epoch, &opts), want);
        // Hashed, it holds one update per sector each operation touches.
        let log = std::sync::Arc::new(Vec::<u8>::new());
        let hashed = EpochHashes::of(&epoch, &opts, &log).unwrap();
        assert_eq!(hashed.bytes(), 6 * std::mem::size_of::<SectorUpdate>());
    }

    /// `legal`, case by case: sets of operations a power cut could leave, and not.
    #[test]
    fn legal_sets_keep_order_and_every_fua_write_before_the_last_kept() {
        let op = |seq: u64, fua: bool| Op {
            seq,
            kind: nbd_server::log::RecordKind::Write,
            fua,
            offset: seq * 4096,
            length: 4096,
            pieces: vec![(seq * 4096, 4096)],
            data: crate::history::OpData::Zero,
        };
        // Operation 1 is a FUA write.
        let epoch = Epoch {
            index: 0,
            ops: vec![op(0, false), op(1, true), op(2, false), op(3, false)],
            marks: vec![],
            end: crate::history::EpochEnd::Flush,
            end_seq: Some(4),
        };
        let torn = |index: usize, pieces: Vec<(u64, u64)>| TornOp {
            index,
            seq: index as u64,
            pieces,
        };
        for ok in [
            &[][..],
            &[0],
            &[1],
            &[0, 1],
            &[1, 2],
            &[1, 3],
            &[0, 1, 2, 3],
        ] {
            assert!(legal(&epoch, ok, None), "{ok:?} is legal");
        }
        for bad in [&[2][..], &[0, 3], &[2, 1], &[1, 1], &[0, 4], &[3, 1]] {
            assert!(!legal(&epoch, bad, None), "{bad:?} is not legal");
        }
        let half = |i: usize| torn(i, vec![(i as u64 * 4096, 512)]);
        assert!(legal(&epoch, &[1], Some(&half(2))));
        assert!(legal(&epoch, &[], Some(&half(1))));
        assert!(
            !legal(&epoch, &[], Some(&half(2))),
            "the FUA write is not kept"
        );
        assert!(
            !legal(&epoch, &[1, 3], Some(&half(2))),
            "torn before a kept write"
        );
        assert!(
            !legal(&epoch, &[1], Some(&torn(2, vec![(8192, 4096)]))),
            "not torn"
        );
        assert!(
            !legal(&epoch, &[1], Some(&torn(2, vec![(0, 512)]))),
            "outside it"
        );
        let not_legal = [
            ("empty piece", torn(2, vec![(8192, 0)])),
            ("nothing landed", torn(2, vec![])),
            (
                "overlapping pieces",
                torn(2, vec![(8192, 1024), (8704, 512)]),
            ),
            ("another operation's seq", TornOp { seq: 9, ..half(2) }),
            ("no such operation", half(4)),
        ];
        for (why, t) in not_legal {
            assert!(!legal(&epoch, &[1], Some(&t)), "{why}");
        }
        let apart = torn(2, vec![(8192, 512), (9216, 512)]);
        assert!(legal(&epoch, &[1], Some(&apart)), "pieces apart, ascending");
    }

    /// A state's sum taken from the whole epoch by the sectors it leaves out equals the one
    /// summed from the prefix by the sectors it writes, for every subset of seeded epochs
    /// whose operations overlap, write parts of sectors, and land over a written prefix.
    #[test]
    fn a_sum_from_the_whole_epoch_equals_the_sum_from_the_prefix() {
        use rand::{Rng, SeedableRng};
        let h = |rng: &mut ChaCha8Rng| -> SectorHash { rng.random() };
        for seed in 0..40 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let ops = rng.random_range(1..7usize);
            let updates: Vec<Vec<SectorUpdate>> = (0..ops)
                .map(|_| {
                    (0..rng.random_range(0..5))
                        .map(|_| {
                            let s = rng.random_range(0..8u64);
                            if rng.random_bool(0.3) {
                                SectorUpdate::Partial(s, rng.random_range(0..256), 17, h(&mut rng))
                            } else {
                                let x = h(&mut rng);
                                SectorUpdate::Full(s, x, contribution(s, &x))
                            }
                        })
                        .collect()
                })
                .collect();
            let mut old: BlockMap<SectorHash> = BlockMap::default();
            for s in 0..8u64 {
                if rng.random_bool(0.5) {
                    old.insert(s, h(&mut rng));
                }
            }
            let before = prefix_contribs(&old);
            let prefix_sum: Sum = rng.random();
            let whole = WholeEpoch::of(&updates, &old, &before, prefix_sum);
            for mask in 0..1u32 << ops {
                let kept: Vec<bool> = (0..ops).map(|i| mask & 1 << i != 0).collect();
                let included: Vec<usize> = (0..ops).filter(|&i| kept[i]).collect();
                // A torn write: a part of the first operation left out, over the kept ones
                // before it (as the generator makes them).
                let first_out = (0..ops).find(|&i| !kept[i]);
                let torn_updates: Vec<SectorUpdate> = first_out
                    .map(|t| updates[t].iter().take(1).cloned().collect())
                    .unwrap_or_default();
                for torn in [None, first_out.map(|t| (t, &torn_updates[..]))] {
                    let included = match torn {
                        Some((t, _)) => included.iter().copied().filter(|&i| i < t).collect(),
                        None => included.clone(),
                    };
                    let kept: Vec<bool> = (0..ops).map(|i| included.contains(&i)).collect();
                    let direct = state_sum(prefix_sum, &updates, (&old, &before), &included, torn);
                    let by_whole = whole.state_sum(&updates, (&old, &before), &kept, torn);
                    assert_eq!(
                        by_whole, direct,
                        "seed {seed}, kept {kept:?}, torn {torn:?}"
                    );
                }
            }
            let all: Vec<usize> = (0..ops).collect();
            let direct = state_sum(prefix_sum, &updates, (&old, &before), &all, None);
            assert_eq!(whole.sum, direct, "seed {seed}: the whole epoch");
        }
    }

    #[test]
    fn combinations_count() {
        assert_eq!(combinations(5, 2).len(), 10);
        assert_eq!(combinations(4, 4).len(), 1);
        assert_eq!(combinations(3, 1), vec![vec![0], vec![1], vec![2]]);
    }
}
