//! Subcommands of the `shoal` CLI.

pub mod eval;
pub mod train;
