//! # shoal-kernels
//!
//! The numerical core of Shoal, written as the CPU reference that every accelerated path must
//! match: FP8 formats ([`fp8`]), fine-grained quantization ([`quant`]), dense and FP8 GEMMs
//! ([`matmul`], [`fp8_gemm`]) and the training operators with explicit, split backward passes
//! ([`ops`]).
//!
//! With feature `cuda`, the `cuda` module runs the same operations on NVIDIA GPUs (kernels compiled at run
//! time by NVRTC, cuBLAS, NCCL), held to the CPU reference by the GPU tests; [`two_hop`] is the
//! host side of the expert-parallel transport both share.
//!
//! Architecture invariant: this crate does no file or network IO, spawns no tasks and knows
//! nothing of tokio, gRPC or the cluster. Every CPU function is a pure computation over its
//! arguments (rayon may split it across threads), and bad input is reported as a
//! [`KernelError`], never a panic.

pub mod backend;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod fp8;
pub mod fp8_gemm;
pub mod inter_node;
pub mod matmul;
pub mod ops;
pub mod quant;
pub mod real;
mod tensor;
pub mod two_hop;

pub use error::{KernelError, Result};
pub use fp8::Fp8Format;
pub use fp8_gemm::{Accumulation, TensorCoreModel, fp8_gemm};
pub use quant::{Fp8Matrix, Granularity, QuantConfig};
pub use real::Real;
pub use tensor::{Tensor, checked_numel};
