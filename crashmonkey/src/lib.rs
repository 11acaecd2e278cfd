//! crashmonkey: crash states from nbd-server write logs, checkers, and fs-core race campaigns.
pub mod race;
