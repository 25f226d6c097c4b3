//! RoPE frequencies for a model configuration, with YaRN when `rope_scaling` asks for it (the
//! formulas of Hugging Face's `_compute_yarn_parameters`).

use shoal_kernels::ops::rope::RopeTable;
use shoal_spec::ModelConfig;

use crate::{Result, WorkerError};

fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// Inverse frequencies of the RoPE dimensions.
pub fn inv_freq(cfg: &ModelConfig) -> Vec<f64> {
    let dim = cfg.qk_rope_head_dim as f64;
    let base = cfg.rope_theta;
    let plain: Vec<f64> = (0..cfg.qk_rope_head_dim / 2)
        .map(|i| 1.0 / base.powf(2.0 * i as f64 / dim))
        .collect();
    let Some(y) = &cfg.rope_scaling else {
        return plain;
    };
    let orig = y.original_max_position_embeddings as f64;
    let correction =
        |rot: f64| dim * (orig / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln());
    let low = correction(y.beta_fast).floor().max(0.0);
    let high = correction(y.beta_slow).ceil().min(dim - 1.0);
    let high = if low == high { high + 0.001 } else { high };
    plain
        .iter()
        .enumerate()
        .map(|(i, &extrapolation)| {
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            let extrapolation_factor = 1.0 - ramp;
            let interpolation = extrapolation / y.factor;
            interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
        })
        .collect()
}

/// The attention softmax scale: `1/sqrt(qk_head_dim)`, times `mscale^2` under YaRN.
pub fn softmax_scale(cfg: &ModelConfig) -> f64 {
    let base = 1.0 / (cfg.qk_head_dim() as f64).sqrt();
    match &cfg.rope_scaling {
        Some(y) if y.mscale_all_dim != 0.0 => {
            let m = yarn_mscale(y.factor, y.mscale_all_dim);
            base * m * m
        }
        _ => base,
    }
}

/// The cos/sin table for `positions` positions.
pub fn table(cfg: &ModelConfig, positions: usize) -> Result<RopeTable> {
    if let Some(y) = &cfg.rope_scaling {
        // Hugging Face scales cos/sin by mscale(factor, mscale) / mscale(factor, mscale_all_dim);
        // that is 1 for every released DeepSeek configuration and the only case supported here.
        let att = if y.mscale != 0.0 && y.mscale_all_dim != 0.0 {
            yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)
        } else {
            yarn_mscale(y.factor, 1.0)
        };
        if (att - 1.0).abs() > 1e-12 {
            return Err(WorkerError::invalid(
                "rope_scaling",
                "yarn with mscale != mscale_all_dim (an attention factor other than 1) is not supported",
            ));
        }
    }
    Ok(RopeTable::from_inv_freq(&inv_freq(cfg), positions)?)
}
