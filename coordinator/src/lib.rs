//! # shoal-coordinator
//!
//! The coordinator: the job API, scheduling and placement, cluster membership and the persistent
//! store. It meets workers over gRPC only and never depends on `shoal-worker`.
//!
//! Empty until the control-plane issue lands.
