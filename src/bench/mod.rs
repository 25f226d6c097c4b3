//! `shoal bench`: benchmarks that print ratios against peers measured in the same run.

pub mod comm;
pub mod control;
pub mod dashboard;
pub mod kernels;
mod numpy;
pub mod pipeline;
mod profile;
pub mod recovery;
pub mod tracing;
pub mod train;

/// The middle value (the upper one of an even count; NaN when empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}
