//! Write-log subcommands: `log`, `replay`, `states`, `check`.

use clap::Subcommand;

#[derive(Subcommand)]
pub enum CrashCmd {
    /// Inspect a write log.
    Log,
}

pub fn run(_cmd: CrashCmd) -> anyhow::Result<i32> {
    anyhow::bail!("write-log commands are not built yet")
}
