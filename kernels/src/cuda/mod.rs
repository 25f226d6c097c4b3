//! The CUDA path (feature `cuda`): GPUs through cudarc, kernels compiled at run time by NVRTC for
//! the device's architecture, cuBLAS for BF16 GEMMs, cuBLASLt's block-scaled FP8 GEMM as the peer
//! of Shoal's, and NCCL for collectives.
//!
//! Every library is loaded at run time (cudarc's `dynamic-loading`), so this builds without a CUDA
//! toolkit. Before any call into a library its presence is checked ([`source::nvrtc_present`],
//! [`device::driver_present`]): cudarc panics on a missing library, Shoal returns
//! [`crate::KernelError::CudaUnavailable`] and the caller falls back to the CPU.
//!
//! Every kernel has a CPU reference elsewhere in this crate; the GPU conformance tests
//! (`tests/gpu.rs`) hold each to it: bit-exact for FP8 casts, quantization, AdamW and transports,
//! a stated tolerance for GEMMs and reductions.

pub mod backend;
pub mod blaslt;
pub mod device;
pub mod dispatch;
pub mod ipc;
pub mod launch;
pub mod mixed;
pub mod nccl;
pub mod source;

pub use device::{Gpu, GpuInfo, driver_present, probe};
pub use source::{SOURCES, Source, compile, nvrtc_present};
