//! # shoal-proto
//!
//! The wire types of Shoal's public gRPC API, package `shoal.v1`: the job service, the cluster
//! service and the node-agent protocol, generated from the documented `.proto` files in
//! `proto/shoal/v1/`. Other crates convert these types to their domain types at the edge.
//!
//! Architecture Invariant: wire types only; no logic beyond what the code generator emits.

#![allow(missing_docs, clippy::doc_markdown, clippy::large_enum_variant)]

/// Package `shoal.v1`.
pub mod v1 {
    tonic::include_proto!("shoal.v1");
}

/// The encoded file descriptor set of every `shoal.v1` file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("shoal_v1_descriptor");
