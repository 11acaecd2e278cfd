//! `crashmonkey race`: seeded race campaigns over fs-core.

use clap::Args;

#[derive(Args)]
pub struct RaceArgs {
    /// First seed of the campaign.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

pub fn run(_args: RaceArgs) -> anyhow::Result<i32> {
    anyhow::bail!("race campaigns are not built yet")
}
