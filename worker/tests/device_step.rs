//! The device step on the CPU reference backend ([`Host`]): the conformance suite of
//! `common/device.rs`, which `device_step_gpu.rs` runs on a GPU. On the host the operators are
//! the CPU model's own, so the forward pass routes identically and the losses agree to rounding.

mod common;

use common::device::{
    Tolerance, one_pass_matches_the_cpu_model, training_steps_match_the_cpu_trainer,
};
use shoal_kernels::backend::Host;

const HOST: Tolerance = Tolerance {
    loss: 1e-6,
    grad: 1e-4,
    same_routing: true,
    params_over_lr: Some(1e-3),
};

#[test]
fn one_pass_of_the_small_model_matches_the_cpu_model() {
    one_pass_matches_the_cpu_model(Host, &common::small_cfg(), 4, HOST);
}

#[test]
fn one_pass_of_the_tiny_preset_matches_the_cpu_model() {
    one_pass_matches_the_cpu_model(Host, &shoal_spec::ModelConfig::tiny(), 2, HOST);
}

#[test]
fn three_training_steps_match_the_cpu_trainer() {
    training_steps_match_the_cpu_trainer(Host, 3, HOST);
}
