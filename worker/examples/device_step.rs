//! Tiny-model training on a compute backend next to the CPU trainer, in the same run: the same
//! weights, batches and hyper-parameters; every step's losses side by side, and tokens/s of
//! each (the first step of each is a warm-up: it compiles the GPU's kernels, and is left out).
//!
//! ```sh
//! cargo run --release -p shoal-worker --example device_step -- --backend cpu
//! cargo run --release -p shoal-worker --features cuda --example device_step -- --backend cuda --json out.json
//! ```
//!
//! Options: `--backend cpu|cuda` (`cpu`: the CPU reference backend), `--precision
//! fp32|bf16|fp8` (default fp8, a job's default; FP8 and BF16 keep BF16 moments when the job
//! defaults do), `--steps N` (default 6), `--batch B` (8), `--seq S` (256), `--json PATH`.

use std::time::Instant;

use serde_json::json;
use shoal_kernels::backend::{Backend, Host};
use shoal_kernels::ops::linear::Precision;
use shoal_spec::ModelConfig;
use shoal_worker::data::{Batcher, DataSpec, TokenSource};
use shoal_worker::model::device::DeviceModel;
use shoal_worker::model::{Model, TokenBatch};
use shoal_worker::train::{TrainOptions, Trainer};

struct Args {
    backend: String,
    precision: Precision,
    steps: u64,
    batch: usize,
    seq: usize,
    json: Option<String>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        backend: "cpu".into(),
        precision: Precision::Fp8,
        steps: 6,
        batch: 8,
        seq: 256,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let num = |v: String| v.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--backend" => a.backend = value()?,
            "--precision" => {
                a.precision = match value()?.as_str() {
                    "fp32" => Precision::Fp32,
                    "bf16" => Precision::Bf16,
                    "fp8" => Precision::Fp8,
                    other => {
                        return Err(format!("--precision {other}: expected fp32, bf16 or fp8"));
                    }
                }
            }
            "--steps" => a.steps = num(value()?)? as u64,
            "--batch" => a.batch = num(value()?)?,
            "--seq" => a.seq = num(value()?)?,
            "--json" => a.json = Some(value()?),
            other => return Err(format!("unknown option {other}")),
        }
    }
    if a.steps < 2 {
        return Err("--steps: at least 2 (the first is a warm-up)".into());
    }
    Ok(a)
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("device_step: {e}");
            std::process::exit(2);
        }
    };
    let result = match args.backend.as_str() {
        "cpu" => run(Host, &args),
        #[cfg(feature = "cuda")]
        "cuda" => shoal_kernels::cuda::Gpu::open(0)
            .map_err(|e| e.to_string())
            .and_then(|g| run(g, &args)),
        other => Err(format!(
            "--backend {other}: expected cpu{}",
            if cfg!(feature = "cuda") {
                " or cuda"
            } else {
                " (cuda needs --features cuda)"
            }
        )),
    };
    if let Err(e) = result {
        eprintln!("device_step: {e}");
        std::process::exit(1);
    }
}

fn batcher(cfg: &ModelConfig, a: &Args) -> Result<Batcher, String> {
    let source =
        TokenSource::load(&DataSpec::synthetic(0), cfg.vocab_size).map_err(|e| e.to_string())?;
    Batcher::new(source, a.seq, a.batch, 0).map_err(|e| e.to_string())
}

fn run<B: Backend>(be: B, a: &Args) -> Result<(), String> {
    let cfg = ModelConfig::tiny();
    let model = Model::<f32>::new(&cfg, a.precision, 0).map_err(|e| e.to_string())?;
    let opts = TrainOptions::defaults(a.steps, a.precision);
    let precision = format!("{:?}", a.precision).to_lowercase();
    let mut cpu =
        Trainer::new(model.clone(), batcher(&cfg, a)?, opts.clone()).map_err(|e| e.to_string())?;
    let mut dev = DeviceModel::new(be, &model, opts.bf16_moments).map_err(|e| e.to_string())?;
    let device = dev.backend().describe();
    let mut data = batcher(&cfg, a)?;
    let mut rows = Vec::new();
    let (mut cpu_s, mut dev_s, mut tokens) = (0.0, 0.0, 0usize);
    eprintln!(
        "tiny, batch {} x {} tokens, {precision}: cpu trainer vs {device}",
        a.batch, a.seq
    );
    for step in 0..a.steps {
        let t = Instant::now();
        let want = cpu.train_step().map_err(|e| e.to_string())?;
        let tc = t.elapsed().as_secs_f64();
        let b = data.next_batch();
        let tb = TokenBatch {
            batch: b.batch,
            seq: b.seq_len,
            inputs: &b.inputs,
            targets: &b.targets,
        };
        let t = Instant::now();
        let got = dev
            .train_step(&tb, &opts.step_hyper(step))
            .map_err(|e| e.to_string())?;
        dev.backend().synchronize().map_err(|e| e.to_string())?;
        let td = t.elapsed().as_secs_f64();
        if step > 0 {
            cpu_s += tc;
            dev_s += td;
            tokens += want.tokens;
        }
        eprintln!(
            "step {}: loss cpu {:.6} device {:.6} (rel {:.1e}), {:.3} s vs {:.3} s",
            step + 1,
            want.loss,
            got.out.loss,
            (got.out.loss - want.loss).abs() / want.loss.abs().max(1e-12),
            tc,
            td
        );
        rows.push(json!({"step": step + 1, "cpu_loss": want.loss, "device_loss": got.out.loss,
            "cpu_grad_norm": want.grad_norm, "device_grad_norm": got.grad_norm, "cpu_s": tc, "device_s": td}));
    }
    let (cpu_tps, dev_tps) = (tokens as f64 / cpu_s, tokens as f64 / dev_s);
    eprintln!(
        "tokens/s: cpu {cpu_tps:.0}, {device} {dev_tps:.0} ({:.2}x), over {} steps after the warm-up",
        dev_tps / cpu_tps,
        a.steps - 1
    );
    let report = json!({
        "model": "tiny", "precision": precision, "bf16_moments": opts.bf16_moments, "batch": a.batch, "seq": a.seq,
        "device": device, "cpu_threads": rayon::current_num_threads(),
        "steps": rows, "cpu_tokens_per_s": cpu_tps, "device_tokens_per_s": dev_tps,
        "device_over_cpu": dev_tps / cpu_tps,
    });
    let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    if let Some(p) = &a.json {
        std::fs::write(p, &text).map_err(|e| format!("{p}: {e}"))?;
    }
    println!("{text}");
    Ok(())
}
