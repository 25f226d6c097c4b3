//! Helpers shared by the trainer tests: a small model, its data, options and comparisons.

#![allow(dead_code)] // each test binary uses its own subset
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

pub mod device;

use shoal_kernels::ops::linear::Precision;
use shoal_spec::ModelConfig;
use shoal_worker::data::{Batcher, DataSpec, TokenSource};
use shoal_worker::model::Model;
use shoal_worker::train::{TrainOptions, Trainer};

/// A two-layer model (one dense, one MoE layer of 8 experts, an MTP module), 64 wide.
pub fn small_cfg() -> ModelConfig {
    ModelConfig {
        vocab_size: 256,
        hidden_size: 64,
        intermediate_size: 128,
        moe_intermediate_size: 32,
        num_hidden_layers: 2,
        first_k_dense_replace: 1,
        num_attention_heads: 2,
        n_routed_experts: 8,
        n_shared_experts: 1,
        num_experts_per_tok: 2,
        n_group: 4,
        topk_group: 2,
        routed_scaling_factor: 2.5,
        norm_topk_prob: true,
        q_lora_rank: Some(32),
        kv_lora_rank: 32,
        qk_nope_head_dim: 16,
        qk_rope_head_dim: 8,
        v_head_dim: 16,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        rope_interleave: true,
        rope_scaling: None,
        num_nextn_predict_layers: 1,
        max_position_embeddings: 512,
        initializer_range: 0.02,
    }
}

/// The synthetic corpus of `tokens` tokens with `seed`, in windows of 32, `batch` per step.
pub fn batcher_of(seed: u64, tokens: usize, batch: usize) -> Batcher {
    let source = TokenSource::load(&DataSpec::Synthetic { seed, tokens }, 256).unwrap();
    Batcher::new(source, 32, batch, seed).unwrap()
}

/// 8 sequences of 32 tokens per step from a 100k-token corpus.
pub fn batcher(seed: u64) -> Batcher {
    batcher_of(seed, 100_000, 8)
}

/// Defaults with a higher peak rate, `dp` data-parallel ranks in groups of `ep`, `micro`
/// micro-batches per rank.
pub fn opts(precision: Precision, steps: u64, dp: usize, ep: usize, micro: usize) -> TrainOptions {
    let mut o = TrainOptions::defaults(steps, precision);
    o.lr = 3e-3;
    o.dp = dp;
    o.ep = ep;
    o.micro_batches = micro;
    o
}

/// A fresh small model (seeded) on [`batcher`].
pub fn trainer(precision: Precision, o: TrainOptions, seed: u64) -> Trainer {
    let model = Model::<f32>::new(&small_cfg(), precision, seed).unwrap();
    Trainer::new(model, batcher(seed), o).unwrap()
}

/// Every parameter of `a` equals `b`'s, bit for bit (`what` names the comparison).
pub fn assert_same_weights(a: &Model<f32>, b: &Model<f32>, what: &str) {
    for ((_, name, x), (_, _, y)) in a.params().iter().zip(b.params().iter()) {
        assert_eq!(x, y, "{what}: {name} differs");
    }
}

/// `|a - b| / |b|`.
pub fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}
