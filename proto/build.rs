//! Compiles `shoal/v1/*.proto` with `protox` (a protobuf compiler in Rust, so no `protoc` is
//! needed) and generates the messages and the tonic services, plus the file descriptor set that
//! gRPC server reflection serves.

use std::path::PathBuf;

use prost::Message;

const PROTOS: [&str; 3] = [
    "shoal/v1/job.proto",
    "shoal/v1/cluster.proto",
    "shoal/v1/agent.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("shoal_v1_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // Shared by every node's assignment: cloning it is a reference count.
        .bytes(".shoal.v1.Assignment.mesh")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
