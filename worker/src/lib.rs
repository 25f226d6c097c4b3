//! # shoal-worker
//!
//! The worker: the DeepSeek-V3 model built from `shoal-kernels`, the stage, expert and
//! communication actors, and the pipeline schedules. It meets the coordinator over gRPC only and
//! never depends on `shoal-coordinator`.
//!
//! Empty until the model issue lands.
