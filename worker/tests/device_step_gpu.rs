//! The device step on a GPU: the conformance suite of `common/device.rs` (the same body
//! `device_step.rs` runs on the CPU reference backend), on `shoal_kernels::cuda::Gpu`. Needs a
//! CUDA GPU and fails without one; `scripts/gpu-check.sh` runs it, the CPU-only test command
//! does not. The GPU sums in other orders (cuBLAS, warp reductions) than the CPU, so a
//! near-tie in the router may send a token to another expert: the losses are held to 1e-4.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

mod common;

use common::device::{
    Tolerance, one_pass_matches_the_cpu_model, training_steps_match_the_cpu_trainer,
};
use shoal_kernels::cuda::Gpu;

const GPU: Tolerance = Tolerance {
    loss: 1e-4,
    grad: 2e-3,
    same_routing: false,
    params_over_lr: None,
};

fn gpu() -> Gpu {
    Gpu::open(0).unwrap_or_else(|e| panic!("these tests need a CUDA GPU: {e}"))
}

#[test]
fn one_pass_of_the_small_model_matches_the_cpu_model() {
    one_pass_matches_the_cpu_model(gpu(), &common::small_cfg(), 4, GPU);
}

#[test]
fn one_pass_of_the_tiny_preset_matches_the_cpu_model() {
    one_pass_matches_the_cpu_model(gpu(), &shoal_spec::ModelConfig::tiny(), 2, GPU);
}

#[test]
fn five_training_steps_match_the_cpu_trainer() {
    training_steps_match_the_cpu_trainer(gpu(), 5, GPU);
}
