//! Shards: one campaign split across N processes or machines, deterministically. Shard K of N
//! owns the runs (or states) whose index i has `i % N == K`, so the N shards together run
//! exactly what one unsharded campaign runs, each once, whatever order they run in.
//!
//! Where the shard comes from: `--shard K/N`; or `--shard N` with K from the batch system
//! (`JOB_COMPLETION_INDEX`, which a Kubernetes Indexed Job sets, or `SLURM_ARRAY_TASK_ID`
//! less `SLURM_ARRAY_TASK_MIN`); or, with no flag, both from Slurm when it sets
//! `SLURM_ARRAY_TASK_COUNT`. docs/scale-out.md has ready manifests.

use std::fmt;

/// Most shards a campaign is split into.
pub const SHARDS_MAX: u64 = 1 << 20;

/// One shard of a campaign.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { index: 0, count: 1 }
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// The environment variables a shard index may come from, in the order they are tried.
pub const SHARD_INDEX_VARS: [&str; 2] = ["JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID"];

impl Shard {
    /// Whether run (or state) number `i` belongs to this shard.
    pub fn owns(&self, i: u64) -> bool {
        i % self.count == self.index
    }

    /// How many of `0..n` this shard owns.
    pub fn share_of(&self, n: u64) -> u64 {
        n / self.count + u64::from(n % self.count > self.index)
    }

    /// `K/N` or `N` (K from the environment, `env` looks a variable up).
    pub fn parse_with(spec: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Shard, String> {
        let (index, count) = match spec.split_once('/') {
            Some((k, n)) => (parse_num(k, "K")?, parse_num(n, "N")?),
            None => {
                let n = parse_num(spec, "N")?;
                let k = index_from_env(env).ok_or_else(|| {
                    format!(
                        "--shard {spec}: no shard index in the environment ({} or \
                         SLURM_ARRAY_TASK_ID); give --shard K/{spec}",
                        SHARD_INDEX_VARS[0]
                    )
                })??;
                (k, n)
            }
        };
        Shard::new(index, count)
    }

    /// With no `--shard`: the Slurm array's shard if Slurm says how many there are, else the
    /// whole campaign.
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Shard, String> {
        let Some(n) = env("SLURM_ARRAY_TASK_COUNT") else {
            return Ok(Shard::default());
        };
        let n = parse_num(&n, "SLURM_ARRAY_TASK_COUNT")?;
        let k = index_from_env(env).unwrap_or(Ok(0))?;
        Shard::new(k, n)
    }

    fn new(index: u64, count: u64) -> Result<Shard, String> {
        if count == 0 || count > SHARDS_MAX {
            return Err(format!("{count} shards: 1..={SHARDS_MAX} allowed"));
        }
        if index >= count {
            return Err(format!("shard {index} of {count}: K must be below N"));
        }
        Ok(Shard { index, count })
    }
}

fn parse_num(s: &str, what: &str) -> Result<u64, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{what} {s:?} is not a whole number"))
}

/// The shard index the batch system gives, if any.
fn index_from_env(env: &dyn Fn(&str) -> Option<String>) -> Option<Result<u64, String>> {
    if let Some(k) = env("JOB_COMPLETION_INDEX") {
        return Some(parse_num(&k, "JOB_COMPLETION_INDEX"));
    }
    let k = env("SLURM_ARRAY_TASK_ID")?;
    Some(parse_num(&k, "SLURM_ARRAY_TASK_ID").and_then(|k| {
        let min = match env("SLURM_ARRAY_TASK_MIN") {
            Some(m) => parse_num(&m, "SLURM_ARRAY_TASK_MIN")?,
            None => 0,
        };
        k.checked_sub(min)
            .ok_or_else(|| format!("SLURM_ARRAY_TASK_ID {k} is below SLURM_ARRAY_TASK_MIN {min}"))
    }))
}

/// The shard a command runs: `--shard SPEC` if given, else what the environment says.
pub fn resolve(spec: Option<&str>) -> Result<Shard, String> {
    match spec {
        Some(spec) => Shard::parse_with(spec, &process_env),
        None => Shard::from_env(&process_env),
    }
}

/// The process environment, for [`Shard::parse_with`] and [`Shard::from_env`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn shards_partition_the_runs() {
        for n in 1..6 {
            let shards: Vec<Shard> = (0..n).map(|k| Shard::new(k, n).unwrap()).collect();
            for i in 0..50 {
                assert_eq!(shards.iter().filter(|s| s.owns(i)).count(), 1);
            }
            for total in 0..20 {
                let sum: u64 = shards.iter().map(|s| s.share_of(total)).sum();
                assert_eq!(sum, total);
                for s in &shards {
                    assert_eq!(
                        s.share_of(total),
                        (0..total).filter(|&i| s.owns(i)).count() as u64
                    );
                }
            }
        }
    }

    #[test]
    fn the_index_comes_from_the_flag_or_the_batch_system() {
        let none = env(&[]);
        assert_eq!(
            Shard::parse_with("2/5", &none),
            Ok(Shard { index: 2, count: 5 })
        );
        assert!(Shard::parse_with("5/5", &none)
            .unwrap_err()
            .contains("below"));
        assert!(Shard::parse_with("1/0", &none).is_err());
        assert!(Shard::parse_with("4", &none)
            .unwrap_err()
            .contains("JOB_COMPLETION_INDEX"));
        let k8s = env(&[("JOB_COMPLETION_INDEX", "3")]);
        assert_eq!(
            Shard::parse_with("4", &k8s),
            Ok(Shard { index: 3, count: 4 })
        );
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "11"),
            ("SLURM_ARRAY_TASK_MIN", "10"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ]);
        assert_eq!(Shard::from_env(&slurm), Ok(Shard { index: 1, count: 3 }));
        assert_eq!(Shard::from_env(&none), Ok(Shard::default()));
        assert!(Shard::parse_with("x/2", &none).is_err());
    }
}
