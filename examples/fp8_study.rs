//! One training run of the `tiny` preset with every knob of the FP8-vs-BF16 comparison exposed:
//! precision, moment precision, model seed, data-order seed, learning rate and steps. Prints one
//! JSON object: the per-step main loss, its last-quarter mean, and the final model's main loss on
//! held-out batches evaluated both in the run's precision and in FP32.
//!
//! `cargo run --release --example fp8_study -- bf16 fp32-moments 0 0 3e-3 150`

use anyhow::{Context, Result, bail};
use shoal_kernels::ops::linear::Precision;
use shoal_spec::ModelConfig;
use shoal_worker::data::{Batcher, DataSpec, TokenSource};
use shoal_worker::model::{Model, TokenBatch};
use shoal_worker::train::{TrainOptions, Trainer};

fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() != 6 {
        bail!("usage: fp8_study PRECISION {{fp32|bf16}}-moments MODEL_SEED DATA_SEED LR STEPS");
    }
    let precision = match a[0].as_str() {
        "fp32" => Precision::Fp32,
        "bf16" => Precision::Bf16,
        "fp8" => Precision::Fp8,
        p => bail!("unknown precision {p}"),
    };
    let bf16_moments = match a[1].as_str() {
        "bf16-moments" => true,
        "fp32-moments" => false,
        m => bail!("unknown moments {m}"),
    };
    let model_seed: u64 = a[2].parse().context("MODEL_SEED")?;
    let data_seed: u64 = a[3].parse().context("DATA_SEED")?;
    let lr: f32 = a[4].parse().context("LR")?;
    let steps: u64 = a[5].parse().context("STEPS")?;

    let cfg = ModelConfig::tiny();
    let model = Model::<f32>::new(&cfg, precision, model_seed)?;
    // The corpus is fixed (seed 0, as in `shoal bench train`); the data seed shuffles its windows.
    let source = TokenSource::load(&DataSpec::synthetic(0), cfg.vocab_size)?;
    let batcher = Batcher::new(source.clone(), 256, 8, data_seed)?;
    let mut opts = TrainOptions::defaults(steps, precision);
    opts.lr = lr;
    opts.bf16_moments = bf16_moments;
    let objective = opts.objective();
    let mut t = Trainer::new(model, batcher, opts)?;
    let mut losses = Vec::new();
    for _ in 0..steps {
        losses.push(t.train_step()?.main_loss);
    }
    let n = (losses.len() / 4).max(1);
    let tail = losses[losses.len() - n..].iter().sum::<f64>() / n as f64;

    // Held-out: four batches of another shuffle of the same corpus (the windows overlap the
    // training ones only by chance; with 150 x 8 of ~16k windows seen, mostly unseen).
    let mut held = Batcher::new(source, 256, 8, 1_000_003)?;
    let batches: Vec<_> = (0..4).map(|_| held.next_batch()).collect();
    let params = t.model().params().clone();
    let eval = |p: Precision| -> Result<f64> {
        let m = Model::<f32>::from_params(&cfg, params.clone(), p)?;
        let mut s = 0.0;
        for b in &batches {
            let tb = TokenBatch {
                batch: b.batch,
                seq: b.seq_len,
                inputs: &b.inputs,
                targets: &b.targets,
            };
            s += m.evaluate(&tb, &objective)?.main_loss;
        }
        Ok(s / batches.len() as f64)
    };
    let eval_native = eval(precision)?;
    let eval_fp32 = eval(Precision::Fp32)?;
    println!(
        "{}",
        serde_json::json!({
            "precision": a[0], "moments": a[1], "model_seed": model_seed, "data_seed": data_seed,
            "lr": lr, "steps": steps, "tail_mean": tail, "eval_native": eval_native,
            "eval_fp32": eval_fp32, "losses": losses,
        })
    );
    Ok(())
}
