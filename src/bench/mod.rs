//! `shoal bench`: benchmarks that print ratios against peers measured in the same run.

pub mod control;
pub mod kernels;
mod numpy;
pub mod pipeline;
mod profile;
pub mod train;
