//! # shoal-spec
//!
//! What the coordinator and the workers both need and neither owns: the model configuration
//! (read from and written to Hugging Face `config.json` files of `model_type: deepseek_v3`, plus
//! named presets). Job specifications and parallel plans will join it.
//!
//! Architecture Invariant: pure data and validation. No IO beyond parsing strings the caller has
//! read, no async, no dependency on any other Shoal crate.

pub mod cost;
pub mod eplb;
pub mod error;
pub mod job;
pub mod model;
pub mod plan;
pub mod schedule;

pub use error::SpecError;
pub use model::{ModelConfig, RopeScaling};
