//! # shoal-worker
//!
//! The worker: the DeepSeek-V3 model built from `shoal-kernels` with explicit forward, B and W
//! passes, training data, checkpoints and the single-process trainer. Actors, pipeline schedules
//! and communication join it with the distributed-execution work. It meets the coordinator over
//! gRPC only and never depends on `shoal-coordinator`.

pub mod agent;
pub mod checkpoint;
pub mod comm;
pub mod data;
pub mod devices;
pub mod error;
pub mod fault;
pub mod job;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod sim;
pub mod trace;
pub mod train;

pub use error::{Result, WorkerError};
