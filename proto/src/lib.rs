//! # shoal-proto
//!
//! The wire types of Shoal's public gRPC API (package `shoal.v1`). This crate holds wire types
//! only; every other crate converts them to its domain types at the edge.
//!
//! Empty until the control-plane issue lands the `.proto` files and their generated code.
