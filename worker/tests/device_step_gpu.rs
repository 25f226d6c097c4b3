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
use shoal_kernels::ops::linear::Precision;
use shoal_worker::model::device::DeviceModel;

const GPU: Tolerance = Tolerance {
    loss: 1e-4,
    grad: 2e-3,
    same_routing: false,
    params_over_lr: None,
};

fn gpu() -> Gpu {
    Gpu::open(0).unwrap_or_else(|e| panic!("these tests need a CUDA GPU: {e}"))
}

/// BF16 and FP8: cuBLAS's BF16 GEMMs and the FP8 GEMM's tensor-core accumulation sum in other
/// orders and widths than the CPU's FP32 sums, and an output on the other side of a BF16
/// rounding tie moves by one BF16 unit.
const GPU_MIXED: Tolerance = Tolerance {
    loss: 2e-3,
    grad: 3e-2,
    same_routing: false,
    params_over_lr: None,
};

#[test]
fn one_pass_of_the_small_model_matches_the_cpu_model() {
    one_pass_matches_the_cpu_model(gpu(), &common::small_cfg(), Precision::Fp32, 4, GPU);
}

#[test]
fn one_pass_of_the_tiny_preset_matches_the_cpu_model() {
    let tiny = shoal_spec::ModelConfig::tiny();
    one_pass_matches_the_cpu_model(gpu(), &tiny, Precision::Fp32, 2, GPU);
}

#[test]
fn five_training_steps_match_the_cpu_trainer() {
    training_steps_match_the_cpu_trainer(gpu(), &common::small_cfg(), Precision::Fp32, 5, GPU);
}

/// The tiny preset (every FP8 layer's dimensions are multiples of 16, as the GPU's FP8 GEMM
/// needs; the small test model's are not).
#[test]
fn one_pass_in_bf16_and_fp8_matches_the_cpu_model() {
    let tiny = shoal_spec::ModelConfig::tiny();
    for p in [Precision::Bf16, Precision::Fp8] {
        one_pass_matches_the_cpu_model(gpu(), &tiny, p, 2, GPU_MIXED);
    }
}

#[test]
fn training_steps_in_bf16_and_fp8_match_the_cpu_trainer() {
    let small = common::small_cfg();
    training_steps_match_the_cpu_trainer(gpu(), &small, Precision::Bf16, 3, GPU_MIXED);
    let tiny = shoal_spec::ModelConfig::tiny();
    training_steps_match_the_cpu_trainer(gpu(), &tiny, Precision::Fp8, 3, GPU_MIXED);
}

/// An FP8 layer whose width the GPU GEMM cannot take (the small model's `kv_a_proj_with_mqa`:
/// 40 outputs) is refused when the device model is made, naming the parameter (a job then trains
/// on the CPU and says why).
#[test]
fn an_fp8_layer_of_unsupported_width_is_refused_by_name() {
    use shoal_worker::model::Model;
    let small = common::small_cfg();
    let model = Model::<f32>::new(&small, Precision::Fp8, 1).unwrap();
    let why = DeviceModel::unsupported(&gpu(), &model).unwrap();
    let e = DeviceModel::new(gpu(), &model, false)
        .unwrap_err()
        .to_string();
    for text in [&why, &e] {
        assert!(
            text.contains("kv_a_proj_with_mqa")
                && text.contains("linear.weight")
                && text.contains("multiple of 16"),
            "{text}"
        );
    }
    // BF16 has no such limit.
    let bf16 = Model::<f32>::new(&small, Precision::Bf16, 1).unwrap();
    assert_eq!(DeviceModel::unsupported(&gpu(), &bf16), None);
}
