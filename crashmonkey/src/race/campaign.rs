//! The campaign runner: run seeds `seed..seed + runs`, each a generated workload under its
//! policy, checked by fs-core's oracle; and the human report of a failing run.

use super::workload::{generate, Generated, PolicyKind};
use fs_core::oracle::Seen;
use fs_core::sched::{
    self, PctPolicy, Policy, RandomPolicy, FIRST_OP_TASK, TASK_FLUSHER, TASK_IO_COMPLETION,
    TASK_RECLAIM,
};
use fs_core::{Config, Failure, Op, RunResult};
use serde::Serialize;
use std::fmt::Write as _;
use std::time::Instant;

/// Steps a PCT policy spreads its priority change points over (a typical run's length).
pub const PCT_STEPS_HINT: u64 = 120;
/// PCT depth (bug depth it targets).
pub const PCT_DEPTH: u32 = 3;
/// Failing seeds a summary lists.
pub const FAILING_SEEDS_LISTED_MAX: usize = 100;

/// One run and everything needed to report and replay it.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    pub seed: u64,
    pub generated: Generated,
    pub cfg: Config,
    pub result: RunResult,
}

/// Run seed `seed` with the switches of `base`.
pub fn run_one(seed: u64, base: &Config) -> RunOutcome {
    let (generated, cfg) = generate(seed, base);
    let mut policy: Box<dyn Policy> = match generated.policy {
        PolicyKind::Random => Box::new(RandomPolicy::new(generated.policy_seed)),
        PolicyKind::Pct => Box::new(PctPolicy::new(
            generated.policy_seed,
            PCT_DEPTH,
            PCT_STEPS_HINT,
        )),
    };
    let result = sched::run(&cfg, &generated.workload, policy.as_mut());
    RunOutcome {
        seed,
        generated,
        cfg,
        result,
    }
}

#[derive(Clone, Debug)]
pub struct CampaignOptions {
    pub seed: u64,
    pub runs: u64,
    pub config: Config,
    /// Stop after this many failing runs (0: never stop early).
    pub max_failures: u64,
    /// The runs of this process: run i is done when the shard owns i.
    pub shard: crate::shard::Shard,
}

#[derive(Debug, Serialize)]
pub struct CampaignSummary {
    pub runs: u64,
    pub failures: u64,
    pub first_failure_seed: Option<u64>,
    pub seconds: f64,
    pub steps: u64,
    pub failing_seeds: Vec<u64>,
    /// The failing run with the fewest steps: the one worth reading and bundling.
    pub smallest_failure_seed: Option<u64>,
    #[serde(skip)]
    pub first: Option<RunOutcome>,
    #[serde(skip)]
    pub smallest: Option<RunOutcome>,
}

/// Run the campaign; `progress` is called after each run with the number done.
pub fn run_campaign(opts: &CampaignOptions, progress: &mut dyn FnMut(u64, u64)) -> CampaignSummary {
    let start = Instant::now();
    let mut s = CampaignSummary {
        runs: 0,
        failures: 0,
        first_failure_seed: None,
        seconds: 0.0,
        steps: 0,
        failing_seeds: Vec::new(),
        smallest_failure_seed: None,
        first: None,
        smallest: None,
    };
    for i in (0..opts.runs).filter(|&i| opts.shard.owns(i)) {
        let seed = opts.seed.wrapping_add(i);
        let out = run_one(seed, &opts.config);
        s.runs += 1;
        s.steps += out.result.steps;
        if !out.result.passed() {
            s.failures += 1;
            if s.failing_seeds.len() < FAILING_SEEDS_LISTED_MAX {
                s.failing_seeds.push(seed);
            }
            if s.smallest
                .as_ref()
                .is_none_or(|m| out.result.steps < m.result.steps)
            {
                s.smallest_failure_seed = Some(seed);
                s.smallest = Some(out.clone());
            }
            if s.first.is_none() {
                s.first_failure_seed = Some(seed);
                s.first = Some(out);
            }
        }
        progress(s.runs, s.failures);
        if opts.max_failures > 0 && s.failures >= opts.max_failures {
            break;
        }
    }
    s.seconds = start.elapsed().as_secs_f64();
    s
}

fn byte(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("'{}' (0x{b:02x})", b as char)
    } else {
        format!("0x{b:02x}")
    }
}

fn task_name(t: u32, ops: &[&Op]) -> String {
    match t as usize {
        TASK_IO_COMPLETION => "io-completion".into(),
        TASK_FLUSHER => "flusher".into(),
        TASK_RECLAIM => "reclaim".into(),
        n if n >= FIRST_OP_TASK && n - FIRST_OP_TASK < ops.len() => {
            format!("op{}", n - FIRST_OP_TASK)
        }
        n => format!("sync{}", n.saturating_sub(FIRST_OP_TASK + ops.len())),
    }
}

/// One line per failure.
pub fn failure_line(f: &Failure, ops: &[&Op]) -> String {
    let op = |i: Option<u32>| match i {
        Some(i) => format!(
            "op{i} {}",
            ops.get(i as usize).map_or("?".into(), |o| o.to_string())
        ),
        None => "no operation (zero-fill or stale data the filesystem produced)".into(),
    };
    match f {
        Failure::WrongData {
            file,
            offset,
            expected,
            found,
            expected_from,
            found_from,
            seen,
        } => {
            let when = match seen {
                Seen::Read { op: r } => format!("returned by read op{r}"),
                Seen::AfterSync => "read back after sync + drop_caches".into(),
                Seen::Cached => "held in the page cache once nothing ran".into(),
            };
            format!(
                "first wrong byte: file {file} offset {offset} ({when}): expected {} written by {}, found {} {}",
                byte(*expected),
                op(*expected_from),
                byte(*found),
                match found_from {
                    Some(_) => format!("= what {} left there earlier (old data came back)", op(*found_from)),
                    None => "written by no operation (zero-fill or stale data the filesystem produced)".into(),
                }
            )
        }
        Failure::WrongSize {
            file,
            expected,
            found,
        } => format!("file {file} size: expected {expected}, found {found}"),
        Failure::Invariant { what } => format!("invariant broken: {what}"),
        Failure::Deadlock { blocked } => format!("deadlock: {}", blocked.join("; ")),
        Failure::StepLimit { steps } => format!("no progress after {steps} steps (livelock)"),
        Failure::Harness { what } => format!("harness: {what}"),
    }
}

/// The schedule, grouped into runs of consecutive steps of one task.
pub fn schedule_text(r: &RunResult, ops: &[&Op]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < r.trace.len() {
        let t = r.trace[i].task;
        let mut j = i;
        let mut parts = Vec::new();
        while j < r.trace.len() && r.trace[j].task == t {
            parts.push(format!("{}@{}", r.trace[j].label, r.trace[j].arg));
            j += 1;
        }
        let _ = writeln!(
            out,
            "  [{i:>4}] {:<14} {}",
            task_name(t, ops),
            parts.join(" ")
        );
        i = j;
    }
    out
}

/// The switches in one line.
pub fn switches(cfg: &Config) -> String {
    let gfs2 = if cfg.gfs2.is_off() {
        String::new()
    } else {
        let g = cfg.gfs2;
        format!(
            ", gfs2: write_glock={} fault_glock={} mkwrite_glock={} no_block_zeroing={} short_write_punch={} fault_retry={}",
            g.write_glock,
            g.fault_glock,
            g.mkwrite_glock,
            g.no_block_zeroing,
            g.short_write_punch,
            g.fault_retry
        )
    };
    let main = format!(
        "iomap_valid={} (at {:?}), wb_seq_check={}, wb_batch={} folios, punch={:?}, alloc={:?}, mkwrite_takes_inode_lock={}, cache_limit={} folios",
        if cfg.iomap_valid { "on" } else { "off" },
        cfg.validity_check_at,
        if cfg.wb_seq_check { "on" } else { "off" },
        cfg.wb_batch_folios,
        cfg.punch,
        cfg.alloc,
        cfg.mkwrite_takes_inode_lock,
        cfg.cache_limit_folios
    );
    let mut optional = match cfg.folio_blocks {
        1 => String::new(),
        n => format!(", folios of {n} blocks"),
    };
    if cfg.max_folio_blocks > cfg.folio_blocks {
        optional += &format!(", write-sized folios up to {} blocks", cfg.max_folio_blocks);
    }
    if cfg.direct_writes {
        optional += ", direct writes raced";
    }
    if !cfg.dio_invalidate.is_default() {
        optional += &format!(", direct-write invalidation {:?}", cfg.dio_invalidate);
    }
    main + &optional + &gfs2
}

/// The full human report of a run.
pub fn describe_failure(o: &RunOutcome) -> String {
    let ops: Vec<&Op> = o.generated.workload.ops().collect();
    let mut s = String::new();
    let verdict = if o.result.passed() {
        "PASSED"
    } else {
        "FAILED"
    };
    let _ = writeln!(
        s,
        "seed {} {verdict} ({:?} policy, {} steps)",
        o.seed, o.generated.policy, o.result.steps
    );
    let _ = writeln!(s, "switches: {}", switches(&o.cfg));
    let _ = writeln!(s, "operations (those of one phase race each other; a phase starts when the previous one returned):");
    let mut i = 0;
    for (p, phase) in o.generated.workload.phases.iter().enumerate() {
        for op in phase {
            let res = match &o.result.results[i] {
                Some(Ok(n)) => format!("-> {n}"),
                Some(Err(e)) => format!("-> error: {e}"),
                None => "-> did not return".into(),
            };
            let _ = writeln!(s, "  op{i} (phase {p}): {op} {res}");
            i += 1;
        }
    }
    let _ = writeln!(
        s,
        "schedule ({} steps; task step@arg, arg = folio index or byte offset):",
        o.result.trace.len()
    );
    s.push_str(&schedule_text(&o.result, &ops));
    if !o.result.notes.is_empty() {
        let _ = writeln!(s, "what the model saw go wrong:");
        for n in o.result.notes.iter().take(5) {
            let _ = writeln!(s, "  {n}");
        }
    }
    for f in o.result.failures.iter().take(5) {
        let _ = writeln!(s, "{}", failure_line(f, &ops));
    }
    s
}
