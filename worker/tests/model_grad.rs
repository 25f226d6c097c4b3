//! Finite-difference gradient check of the whole model in f64: every parameter kind
//! (embedding, each MLA projection and norm, dense MLP, router, routed and shared experts, MTP
//! projection and norms, final norm, head) against central differences of the full objective
//! (main loss + MTP loss + balance loss).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use shoal_kernels::Tensor;
use shoal_kernels::ops::linear::Precision;
use shoal_spec::ModelConfig;
use shoal_worker::model::{Model, Objective, TokenBatch};

fn micro(q_lora: Option<usize>) -> ModelConfig {
    ModelConfig {
        vocab_size: 19,
        hidden_size: 16,
        intermediate_size: 24,
        moe_intermediate_size: 8,
        num_hidden_layers: 2,
        first_k_dense_replace: 1,
        num_attention_heads: 2,
        n_routed_experts: 4,
        n_shared_experts: 1,
        num_experts_per_tok: 2,
        n_group: 2,
        topk_group: 1,
        routed_scaling_factor: 2.5,
        norm_topk_prob: true,
        q_lora_rank: q_lora,
        kv_lora_rank: 6,
        qk_nope_head_dim: 4,
        qk_rope_head_dim: 4,
        v_head_dim: 4,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        rope_interleave: true,
        rope_scaling: None,
        num_nextn_predict_layers: 1,
        max_position_embeddings: 64,
        initializer_range: 0.4,
    }
}

/// `n` token ids `(i * mul + add) mod 19`, below the micro vocabulary.
fn ids(n: usize, mul: usize, add: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * mul + add) % 19) as u32).collect()
}

/// Every term of the objective on, the balance loss strongly weighted.
fn objective() -> Objective {
    Objective {
        mtp_lambda: 0.3,
        balance_alpha: 0.1,
        loss_scale: 1.0,
    }
}

fn check(cfg: &ModelConfig) {
    let mut model = Model::<f64>::new(cfg, Precision::Fp32, 3).unwrap();
    // Non-zero expert biases, so selection uses them.
    for id in model.expert_biases() {
        let n = model.params().get(id).numel();
        let bias = Tensor::new([n], (0..n).map(|i| 0.05 * (i as f64 - 1.5)).collect()).unwrap();
        model.params_mut().set(id, bias).unwrap();
    }
    let (batch, seq) = (2, 6);
    let inputs = ids(batch * seq, 7, 3);
    let targets = ids(batch * seq, 5, 1);
    let b = TokenBatch {
        batch,
        seq,
        inputs: &inputs,
        targets: &targets,
    };
    let obj = objective();
    let mut grads = model.params().zero_grads();
    let base = model.forward_backward(&b, &obj, &mut grads).unwrap();
    assert!(base.balance_loss > 0.0 && base.mtp_losses.len() == 1);

    let ids: Vec<_> = model
        .params()
        .iter()
        .map(|(id, name, _)| (id, name.to_string()))
        .collect();
    let h = 1e-6;
    let mut checked = 0;
    for (id, name) in ids {
        if !model.params().trainable(id) {
            continue;
        }
        let n = model.params().get(id).numel();
        // Up to five elements spread over the tensor.
        let picks: Vec<usize> = (0..5.min(n))
            .map(|i| i * n / 5.min(n) + (i * 7) % (n / 5.min(n)).max(1))
            .collect();
        for &i in &picks {
            let orig = model.params().get(id).data()[i];
            let mut eval = |v: f64| {
                model.params_mut().get_mut(id).data_mut()[i] = v;
                let out = model.evaluate(&b, &obj).unwrap();
                (out.loss, out.expert_loads)
            };
            let (up, loads_up) = eval(orig + h);
            let (down, loads_down) = eval(orig - h);
            eval(orig);
            assert_eq!(
                loads_up, loads_down,
                "{name}[{i}]: routing changed under the probe"
            );
            let numeric = (up - down) / (2.0 * h);
            let analytic = grads.get(id).data()[i];
            let err = (numeric - analytic).abs();
            assert!(
                err <= 1e-6 + 1e-5 * numeric.abs().max(analytic.abs()),
                "{name}[{i}]: analytic {analytic:e} vs numeric {numeric:e}"
            );
            checked += 1;
        }
    }
    assert!(checked > 100, "only {checked} elements checked");
}

#[test]
fn whole_model_gradients_match_finite_differences() {
    check(&micro(Some(8)));
}

#[test]
fn plain_query_projection_gradients_match_finite_differences() {
    check(&micro(None));
}

/// Splitting a batch into concurrent micro-batches computes the gradients and losses of the
/// whole batch (up to rounding): every parameter's gradient, each loss, and the expert loads.
#[test]
fn micro_batches_give_the_whole_batch_gradients() {
    let cfg = micro(Some(6));
    let model = Model::<f64>::new(&cfg, Precision::Fp32, 5).unwrap();
    let (batch, seq) = (5, 6);
    let inputs = ids(batch * seq, 11, 2);
    let targets = ids(batch * seq, 3, 4);
    let b = TokenBatch {
        batch,
        seq,
        inputs: &inputs,
        targets: &targets,
    };
    let obj = objective();
    let mut whole = model.params().zero_grads();
    let want = model.forward_backward(&b, &obj, &mut whole).unwrap();
    // 2 and 3 split 5 sequences unevenly; 5 gives one sequence each; 9 is clamped to 5.
    for parts in [2, 3, 5, 9] {
        let mut split = model.params().zero_grads();
        let got = model
            .forward_backward_micro(&b, &obj, parts, &mut split)
            .unwrap();
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * (1.0 + b.abs());
        assert!(
            close(got.loss, want.loss),
            "{parts}: loss {} vs {}",
            got.loss,
            want.loss
        );
        assert!(close(got.main_loss, want.main_loss), "{parts}: main loss");
        assert!(
            close(got.balance_loss, want.balance_loss),
            "{parts}: balance loss"
        );
        assert_eq!(got.mtp_losses.len(), want.mtp_losses.len());
        for (g, w) in got.mtp_losses.iter().zip(&want.mtp_losses) {
            assert!(close(*g, *w), "{parts}: mtp loss {g} vs {w}");
        }
        assert_eq!(got.expert_loads, want.expert_loads, "{parts}");
        assert_eq!(got.tokens, want.tokens);
        for (i, (g, w)) in split.tensors().iter().zip(whole.tensors()).enumerate() {
            let diff = g.max_abs_diff(w).unwrap();
            let scale = w.data().iter().fold(0f64, |m, v| m.max(v.abs()));
            assert!(
                diff <= 1e-10 * (1.0 + scale),
                "{parts} micro-batches: gradient {i} differs by {diff} (scale {scale})"
            );
        }
    }
}
