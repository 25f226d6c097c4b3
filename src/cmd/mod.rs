//! Subcommands of the `shoal` CLI.

pub mod eval;
pub mod plan;
pub mod train;
