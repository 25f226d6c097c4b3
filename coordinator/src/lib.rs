//! # shoal-coordinator
//!
//! The coordinator: the job API, scheduling and placement, cluster membership and the persistent
//! store. It meets workers over gRPC only and never depends on `shoal-worker`.
//!
//! The job API (submit, get, list, cancel, watch) and the node agents' sessions over gRPC,
//! jobs as persisted state machines owned by one control actor (scheduling, placement,
//! liveness, recovery, adoption after a failover), the store (embedded and etcd backends with
//! one conformance suite) and leader election among coordinators sharing a store.

pub mod actor;
pub mod dashboard;
pub mod error;
pub mod grpc;
pub mod http;
pub mod jobs;
pub mod leader;
pub mod nodes;
pub mod store;
pub mod stragglers;

pub use error::{CoordinatorError, Result};
