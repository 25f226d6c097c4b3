//! Subcommands of the `shoal` CLI.

pub mod cluster;
pub mod eval;
pub mod export;
pub mod local;
pub mod plan;
pub mod simulate;
pub mod train;
