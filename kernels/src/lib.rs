//! # shoal-kernels
//!
//! The numerical core of Shoal, written as the CPU reference that every accelerated path must
//! match: FP8 formats ([`fp8`]), fine-grained quantization ([`quant`]), dense and FP8 GEMMs
//! ([`matmul`], [`fp8_gemm`]) and the training operators with explicit, split backward passes
//! ([`ops`]).
//!
//! Architecture invariant: this crate does no IO, spawns no tasks and knows nothing of tokio,
//! gRPC or the cluster. Every function is a pure computation over its arguments (rayon may split
//! it across threads), and bad input is reported as a [`KernelError`], never a panic.

pub mod error;
pub mod fp8;
pub mod fp8_gemm;
pub mod matmul;
pub mod ops;
pub mod quant;
pub mod real;
mod tensor;

pub use error::{KernelError, Result};
pub use fp8::Fp8Format;
pub use fp8_gemm::{Accumulation, TensorCoreModel, fp8_gemm};
pub use quant::{Fp8Matrix, Granularity, QuantConfig};
pub use real::Real;
pub use tensor::{Tensor, checked_numel};
