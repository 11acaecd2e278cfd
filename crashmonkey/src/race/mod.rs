//! Race campaigns over fs-core: seeded random workloads (`workload`), the campaign runner
//! and its reports (`campaign`), and reproducer bundles that replay a finding exactly
//! (`repro`), shrunk by delta debugging to the smallest run that fails the same way
//! (`minimise`).

pub mod campaign;
pub mod minimise;
pub mod repro;
pub mod workload;

pub use campaign::{
    describe_failure, run_campaign, run_one, CampaignOptions, CampaignSummary, RunOutcome,
};
pub use repro::{load_bundle, write_bundle, Bundle};
pub use workload::{generate, PolicyKind};
