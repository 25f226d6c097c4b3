//! # shoal-coordinator
//!
//! The coordinator: the job API, scheduling and placement, cluster membership and the persistent
//! store. It meets workers over gRPC only and never depends on `shoal-worker`.
//!
//! So far: the error type and its gRPC mapping, and the store (embedded backend and the
//! conformance suite every backend runs).

pub mod error;
pub mod store;

pub use error::{CoordinatorError, Result};
