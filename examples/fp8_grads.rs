//! Gradient fidelity of the mixed-precision modes on the `tiny` preset: for the same weights and
//! batch, the relative L2 error of the BF16 and FP8 gradients (and FP32's) against an f64
//! reference, for the whole model and per parameter kind, at initialisation and after `STEPS`
//! FP32 training steps. Unlike a loss curve, this does not depend on where training wanders.
//!
//! `cargo run --release --example fp8_grads -- 30`

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use shoal_kernels::ops::linear::Precision;
use shoal_spec::ModelConfig;
use shoal_worker::data::{Batcher, DataSpec, TokenSource};
use shoal_worker::model::params::ParamStore;
use shoal_worker::model::{Model, Objective, TokenBatch};
use shoal_worker::train::{TrainOptions, Trainer};

/// A coarse kind for a parameter name, to group the errors.
fn kind(name: &str) -> &'static str {
    if name.contains("embed") {
        "embedding"
    } else if name.contains("lm_head") {
        "head"
    } else if name.contains("norm") {
        "norms"
    } else if name.contains("self_attn") {
        "attention"
    } else if name.contains("gate.weight") {
        "router"
    } else if name.contains("experts") {
        "experts"
    } else if name.contains("mlp") {
        "dense/shared mlp"
    } else {
        "other"
    }
}

fn grads_f32(
    cfg: &ModelConfig,
    params: &ParamStore<f32>,
    p: Precision,
    tb: &TokenBatch<'_>,
    obj: &Objective,
) -> Result<Vec<Vec<f64>>> {
    let m = Model::<f32>::from_params(cfg, params.clone(), p)?;
    let mut g = m.params().zero_grads();
    m.forward_backward(tb, obj, &mut g)?;
    Ok(g.tensors()
        .iter()
        .map(|t| t.data().iter().map(|&v| f64::from(v)).collect())
        .collect())
}

fn main() -> Result<()> {
    let steps: u64 = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "0".into())
        .parse()
        .context("STEPS")?;
    let cfg = ModelConfig::tiny();
    let source = TokenSource::load(&DataSpec::synthetic(0), cfg.vocab_size)?;
    let model = Model::<f32>::new(&cfg, Precision::Fp32, 0)?;
    let opts = TrainOptions::defaults(150, Precision::Fp32);
    let obj = opts.objective();
    let mut t = Trainer::new(model, Batcher::new(source.clone(), 256, 8, 0)?, opts)?;
    for _ in 0..steps {
        t.train_step()?;
    }
    let params = t.model().params().clone();
    let batch = Batcher::new(source, 256, 8, 1_000_003)?.next_batch();
    let tb = TokenBatch {
        batch: batch.batch,
        seq: batch.seq_len,
        inputs: &batch.inputs,
        targets: &batch.targets,
    };

    let m64 = Model::<f64>::from_params(&cfg, params.cast::<f64>(), Precision::Fp32)?;
    let mut g64 = m64.params().zero_grads();
    m64.forward_backward(&tb, &obj, &mut g64)?;
    let reference: Vec<&[f64]> = g64.tensors().iter().map(|t| t.data()).collect();
    let names: Vec<String> = params.iter().map(|(_, n, _)| n.to_string()).collect();

    println!("after {steps} FP32 steps: relative L2 gradient error against f64");
    for (p, label) in [
        (Precision::Fp32, "fp32"),
        (Precision::Bf16, "bf16"),
        (Precision::Fp8, "fp8"),
    ] {
        let g = grads_f32(&cfg, &params, p, &tb, &obj)?;
        // kind -> (squared error, squared reference norm)
        let mut by_kind: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
        let mut worst = (0.0, String::new());
        for ((name, got), want) in names.iter().zip(&g).zip(&reference) {
            let err: f64 = got.iter().zip(*want).map(|(a, b)| (a - b) * (a - b)).sum();
            let norm: f64 = want.iter().map(|b| b * b).sum();
            let e = by_kind.entry(kind(name)).or_default();
            e.0 += err;
            e.1 += norm;
            if norm > 0.0 && (err / norm).sqrt() > worst.0 {
                worst = ((err / norm).sqrt(), name.clone());
            }
        }
        let (te, tn) = by_kind
            .values()
            .fold((0.0, 0.0), |(a, b), (e, n)| (a + e, b + n));
        print!("  {label:>4}: total {:.2e}", (te / tn).sqrt());
        for (k, (e, n)) in &by_kind {
            if *n > 0.0 {
                print!(", {k} {:.2e}", (e / n).sqrt());
            }
        }
        println!("; worst {} {:.2e}", worst.1, worst.0);
    }
    Ok(())
}
