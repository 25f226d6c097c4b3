//! # shoal-proto
//!
//! The wire types of Shoal's public gRPC API, package `shoal.v1`: the job service, the cluster
//! service and the node-agent protocol, generated from the documented `.proto` files in
//! `proto/shoal/v1/`, and their conversions to and from the domain types of `shoal-spec`
//! ([`convert`]), which the coordinator, the node agents and the CLI use at the edge.
//!
//! [`transport`] holds the little both ends of the transport share (error chains, PEM checks,
//! the TLS-mismatch hint, the bearer header); [`trace_context`] carries W3C trace context in
//! gRPC metadata and in messages, so one job's spans, on every process, join one trace.
//!
//! Architecture Invariant: wire types, their conversions and those transport helpers only; no
//! other logic.

#![allow(missing_docs, clippy::doc_markdown, clippy::large_enum_variant)]

pub mod convert;
pub mod trace_context;
pub mod transport;

/// Package `shoal.v1`.
pub mod v1 {
    tonic::include_proto!("shoal.v1");
}

/// The shared buffer type of `bytes` fields such as [`v1::Assignment::mesh`].
pub use prost::bytes::Bytes;

/// Encodes a job's mesh once, for every node's [`v1::Assignment::mesh`].
pub fn encode_mesh(mesh: &v1::JobMesh) -> Bytes {
    use prost::Message;
    mesh.encode_to_vec().into()
}

/// The mesh of an assignment.
pub fn decode_mesh(a: &v1::Assignment) -> Result<v1::JobMesh, prost::DecodeError> {
    use prost::Message;
    v1::JobMesh::decode(a.mesh.as_ref())
}

/// The encoded file descriptor set of every `shoal.v1` file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("shoal_v1_descriptor");
