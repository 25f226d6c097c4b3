//! # shoal-coordinator
//!
//! The coordinator: the job API, scheduling and placement, cluster membership and the persistent
//! store. It meets workers over gRPC only and never depends on `shoal-worker`.
//!
//! So far: the job API (submit, get, list, cancel, watch) over gRPC with health checking and
//! reflection, jobs as a persisted state machine owned by one actor, the error type and its
//! gRPC mapping, and the store (embedded backend and the conformance suite every backend runs).
//! Node agents, scheduling and etcd come next.

pub mod actor;
pub mod error;
pub mod grpc;
pub mod jobs;
pub mod nodes;
pub mod store;
pub mod stragglers;

pub use error::{CoordinatorError, Result};
