//! `shoal bench train`: training throughput of the `tiny` preset against Hugging Face
//! transformers' `DeepseekV3ForCausalLM` in PyTorch (same configuration, batch, optimizer),
//! FP8 against BF16 loss, and MaxVio with and without the expert-bias update. All measured in the
//! same run.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use shoal_kernels::ops::linear::Precision;
use shoal_spec::ModelConfig;
use shoal_worker::data::{Batcher, DataSpec, TokenSource};
use shoal_worker::model::Model;
use shoal_worker::train::{StepMetrics, TrainOptions, Trainer};
use tracing_subscriber::layer::SubscriberExt;

/// Options of `shoal bench train`.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainBenchArgs {
    /// Steps timed per precision for tokens/s (after two warm-up steps).
    #[arg(long, default_value_t = 8)]
    pub speed_steps: u64,
    /// Steps of the FP8-vs-BF16 and bias-update comparisons.
    #[arg(long, default_value_t = 150)]
    pub steps: u64,
    /// Peak learning rate of the comparisons (training's default). At 3e-3 `tiny` is past the
    /// edge of stability: the loss spikes early, ends near 4.8 instead of 2.8, and runs that
    /// differ only in rounding end several percent apart, which swamps the FP8 effect.
    #[arg(long, default_value_t = 1e-3)]
    pub compare_lr: f32,
    /// Model seeds of the FP8-vs-BF16 comparison: seed `s` initialises both runs of pair `s`; every
    /// run sees the same batches. With two or more, the BF16 runs' seed-to-seed spread is reported
    /// as the noise floor.
    #[arg(long, default_value_t = 2)]
    pub seeds: u64,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Skip the PyTorch peer.
    #[arg(long)]
    pub no_torch: bool,
    /// Python environment with torch and transformers (made by scripts/hf/setup_venv.sh if absent).
    #[arg(long, default_value = "target/hf-venv")]
    pub venv: PathBuf,
    /// Precisions to time (repeat the flag; default all three).
    #[arg(long = "precision", value_parser = ["fp32", "bf16", "fp8"])]
    pub precisions: Vec<String>,
    /// Rounds of (Shoal, PyTorch) measurements per precision, alternating, so that both sides
    /// see the same drift of a shared machine; the table reports medians over rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Micro-batches Shoal splits each batch into (run concurrently; the trainer's default when
    /// absent). The result is the same arithmetic either way; only the speed differs.
    #[arg(long)]
    pub micro_batches: Option<usize>,
    /// Print where the time of a step goes (per model phase) after each timed run.
    #[arg(long)]
    pub profile: bool,
    /// Skip the FP8-vs-BF16 and bias-update comparisons (only the tokens/s table).
    #[arg(long)]
    pub speed_only: bool,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Speed {
    precision: &'static str,
    /// Shoal on the tiny preset without its MTP module: the work transformers does (its
    /// `DeepseekV3ForCausalLM` has no MTP), so this is the like-for-like figure.
    shoal_tokens_per_s: f64,
    /// Shoal on the full tiny preset, MTP module included (more work per token).
    shoal_with_mtp_tokens_per_s: f64,
    torch_tokens_per_s: Option<f64>,
    /// Median over rounds of the per-round ratio Shoal / PyTorch.
    ratio: Option<f64>,
    /// Per round: (Shoal without MTP, PyTorch) tokens/s.
    rounds: Vec<(f64, Option<f64>)>,
}

#[derive(Debug, Serialize)]
struct Report {
    batch: usize,
    seq_len: usize,
    speed: Vec<Speed>,
    torch: Option<String>,
    /// Absent with `--speed-only`.
    comparison: Option<Comparison>,
}

/// FP8 against BF16 (like for like: same learning rate, BF16 AdamW moments in both, same data),
/// and MaxVio with and without the bias update.
#[derive(Debug, Serialize)]
struct Comparison {
    steps: u64,
    lr: f32,
    /// Model seeds `0..seeds`, one BF16 and one FP8 run each.
    seeds: u64,
    /// Last-quarter mean main loss, averaged over the seeds.
    bf16_final_loss: f64,
    fp8_final_loss: f64,
    /// Mean over the seeds of `(fp8 - bf16) / bf16`, each pair from the same initialisation.
    fp8_vs_bf16_relative_loss_difference: f64,
    /// `(fp8 - bf16) / bf16` of each seed.
    per_seed_relative_difference: Vec<f64>,
    /// Noise floor: mean over pairs of BF16 runs of `|a - b| / mean(a, b)` (absent with one seed).
    bf16_seed_to_seed_relative_difference: Option<f64>,
    /// From the BF16 run of seed 0.
    max_vio_with_bias_update: f64,
    max_vio_without_bias_update: f64,
}

/// One run of `tiny` for the comparisons: model `seed`, data seed 0, BF16 moments whatever the
/// precision (so that only the GEMMs differ between BF16 and FP8).
fn comparison_trainer(
    precision: Precision,
    seed: u64,
    args: &TrainBenchArgs,
    gamma: f64,
) -> Result<Trainer> {
    let mut opts = TrainOptions::defaults(args.steps, precision);
    opts.lr = args.compare_lr;
    opts.bf16_moments = true;
    opts.bias_update_speed = gamma;
    trainer_for(ModelConfig::tiny(), precision, seed, args, opts)
}

fn trainer_for(
    cfg: ModelConfig,
    precision: Precision,
    seed: u64,
    args: &TrainBenchArgs,
    opts: TrainOptions,
) -> Result<Trainer> {
    let model = Model::<f32>::new(&cfg, precision, seed)?;
    let source = TokenSource::load(&DataSpec::synthetic(0), cfg.vocab_size)?;
    let batcher = Batcher::new(source, args.seq_len, args.batch, 0)?;
    Ok(Trainer::new(model, batcher, opts)?)
}

fn shoal_speed(precision: Precision, args: &TrainBenchArgs, mtp: bool) -> Result<f64> {
    let mut cfg = ModelConfig::tiny();
    if !mtp {
        cfg.num_nextn_predict_layers = 0;
    }
    let mut opts = TrainOptions::defaults(args.speed_steps + 2, precision);
    if let Some(m) = args.micro_batches {
        opts.micro_batches = m;
    }
    let mut t = trainer_for(cfg, precision, 0, args, opts)?;
    let times = super::profile::SpanTimes::default();
    let subscriber = tracing_subscriber::registry().with(times.clone());
    let _guard = args
        .profile
        .then(|| tracing::subscriber::set_default(subscriber));
    let mut rates = Vec::new();
    for i in 0..args.speed_steps + 2 {
        if i == 2 {
            times.reset();
        }
        let m = t.train_step()?;
        if i >= 2 {
            rates.push(m.tokens as f64 / m.seconds);
        }
    }
    if args.profile {
        let name = shoal_worker::train::state::precision_name(precision);
        let title = format!("{name}, {}", if mtp { "with MTP" } else { "without MTP" });
        super::profile::print(&title, &times, args.speed_steps);
    }
    Ok(super::median(rates))
}

/// Mean of a metric over the last quarter of a run.
fn tail_mean(history: &[StepMetrics], f: impl Fn(&StepMetrics) -> f64) -> f64 {
    let n = (history.len() / 4).max(1);
    let tail = &history[history.len().saturating_sub(n)..];
    tail.iter().map(f).sum::<f64>() / tail.len() as f64
}

fn run_steps(mut t: Trainer, steps: u64) -> Result<Vec<StepMetrics>> {
    (0..steps).map(|_| Ok(t.train_step()?)).collect()
}

fn torch_peer(args: &TrainBenchArgs, dtype: &str, config: &Path) -> Result<(f64, String)> {
    let python = args.venv.join("bin").join("python");
    if !python.exists() {
        eprintln!(
            "bench: preparing torch and transformers in {} (one time, a few minutes)",
            args.venv.display()
        );
        let status = Command::new("bash")
            .arg("scripts/hf/setup_venv.sh")
            .arg(&args.venv)
            .status()
            .context("running scripts/hf/setup_venv.sh")?;
        if !status.success() {
            bail!("scripts/hf/setup_venv.sh failed");
        }
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let out = Command::new(&python)
        .args(["scripts/hf/hf_tool.py", "bench-train", "--config"])
        .arg(config)
        .args([
            "--batch",
            &args.batch.to_string(),
            "--seq-len",
            &args.seq_len.to_string(),
        ])
        .args([
            "--steps",
            &args.speed_steps.to_string(),
            "--warmup",
            "2",
            "--threads",
            &threads.to_string(),
        ])
        .args(["--dtype", dtype])
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "the PyTorch benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or_default())
        .context("reading the PyTorch benchmark's output")?;
    let rate = v["tokens_per_s"]
        .as_f64()
        .context("tokens_per_s missing from the PyTorch benchmark")?;
    let version = format!(
        "torch {} / transformers {}",
        v["torch"].as_str().unwrap_or("?"),
        v["transformers"].as_str().unwrap_or("?")
    );
    Ok((rate, version))
}

/// Runs the benchmark and prints the report.
pub fn run(args: &TrainBenchArgs) -> Result<()> {
    if args.batch == 0
        || args.seq_len == 0
        || args.speed_steps == 0
        || args.steps == 0
        || args.rounds == 0
        || args.seeds == 0
    {
        bail!(
            "--batch, --seq-len, --steps, --speed-steps, --rounds and --seeds must be at least 1"
        );
    }
    if !(args.compare_lr.is_finite() && args.compare_lr > 0.0) {
        bail!("--compare-lr must be a finite number > 0");
    }
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        serde_json::to_vec_pretty(&ModelConfig::tiny().to_hf_json())?,
    )?;
    let mut speed = Vec::new();
    let mut torch_version = None;
    for (precision, name) in [
        (Precision::Fp32, "fp32"),
        (Precision::Bf16, "bf16"),
        (Precision::Fp8, "fp8"),
    ] {
        if !args.precisions.is_empty() && !args.precisions.iter().any(|p| p == name) {
            continue;
        }
        let mut rounds = Vec::new();
        for _ in 0..args.rounds {
            let ours = shoal_speed(precision, args, false)?;
            let peer = if args.no_torch || precision == Precision::Fp8 {
                None
            } else {
                let (rate, version) = torch_peer(args, name, &config)?;
                torch_version = Some(version);
                Some(rate)
            };
            rounds.push((ours, peer));
        }
        let with_mtp = shoal_speed(precision, args, true)?;
        let ours = super::median(rounds.iter().map(|r| r.0).collect());
        let peers: Vec<f64> = rounds.iter().filter_map(|r| r.1).collect();
        let ratios: Vec<f64> = rounds
            .iter()
            .filter_map(|(o, p)| p.map(|p| o / p))
            .collect();
        speed.push(Speed {
            precision: name,
            shoal_tokens_per_s: ours,
            shoal_with_mtp_tokens_per_s: with_mtp,
            torch_tokens_per_s: (!peers.is_empty()).then(|| super::median(peers)),
            ratio: (!ratios.is_empty()).then(|| super::median(ratios)),
            rounds,
        });
    }
    let comparison = if args.speed_only {
        None
    } else {
        Some(compare(args)?)
    };
    let report = Report {
        batch: args.batch,
        seq_len: args.seq_len,
        speed,
        torch: torch_version,
        comparison,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "training tokens/s (median over rounds), tiny preset without MTP (as transformers runs it), batch {} x seq {}, AdamW; peer: {}",
        report.batch,
        report.seq_len,
        report.torch.as_deref().unwrap_or("skipped")
    );
    for s in &report.speed {
        let peer = s
            .torch_tokens_per_s
            .map_or("-".into(), |v| format!("{v:.0}"));
        let ratio = s.ratio.map_or("-".into(), |v| format!("{v:.2}x"));
        let per_round: Vec<String> = s
            .rounds
            .iter()
            .map(|(o, p)| match p {
                Some(p) => format!("{o:.0}/{p:.0}={:.2}x", o / p),
                None => format!("{o:.0}"),
            })
            .collect();
        println!(
            "  {:>5}  shoal {:>8.0} (with MTP {:.0})  pytorch {:>8}  {}  rounds: {}",
            s.precision,
            s.shoal_tokens_per_s,
            s.shoal_with_mtp_tokens_per_s,
            peer,
            ratio,
            per_round.join(" ")
        );
    }
    if let Some(c) = &report.comparison {
        let per_seed: Vec<String> = c
            .per_seed_relative_difference
            .iter()
            .map(|d| format!("{:+.3}%", 100.0 * d))
            .collect();
        println!(
            "FP8 vs BF16 after {} steps at lr {}, BF16 AdamW moments in both, same data, {} seed(s) \
             (mean of the last quarter): bf16 loss {:.4}, fp8 loss {:.4}, relative difference \
             {:+.3}% (per seed {})",
            c.steps,
            c.lr,
            c.seeds,
            c.bf16_final_loss,
            c.fp8_final_loss,
            100.0 * c.fp8_vs_bf16_relative_loss_difference,
            per_seed.join(", ")
        );
        if let Some(noise) = c.bf16_seed_to_seed_relative_difference {
            println!(
                "  noise floor: bf16 runs of different seeds differ by {:.3}%",
                100.0 * noise
            );
        }
        println!(
            "MaxVio (mean over MoE layers, last quarter, bf16 seed 0): {:.3} with the bias update, {:.3} without",
            c.max_vio_with_bias_update, c.max_vio_without_bias_update
        );
    }
    Ok(())
}

/// FP8 against BF16 loss over `args.seeds` paired runs, and MaxVio with and without the bias
/// update, over `args.steps` steps.
fn compare(args: &TrainBenchArgs) -> Result<Comparison> {
    let mut bf16_losses = Vec::new();
    let mut fp8_losses = Vec::new();
    let mut bf16_seed0 = None;
    for seed in 0..args.seeds {
        let bf16 = run_steps(
            comparison_trainer(Precision::Bf16, seed, args, 1e-3)?,
            args.steps,
        )?;
        let fp8 = run_steps(
            comparison_trainer(Precision::Fp8, seed, args, 1e-3)?,
            args.steps,
        )?;
        bf16_losses.push(tail_mean(&bf16, |m| m.main_loss));
        fp8_losses.push(tail_mean(&fp8, |m| m.main_loss));
        if seed == 0 {
            bf16_seed0 = Some(bf16);
        }
    }
    let bf16 = bf16_seed0.context("no seeds")?;
    let no_bias = run_steps(
        comparison_trainer(Precision::Bf16, 0, args, 0.0)?,
        args.steps,
    )?;
    let vio = |h: &[StepMetrics]| {
        tail_mean(h, |m| {
            m.max_vio.iter().sum::<f64>() / m.max_vio.len().max(1) as f64
        })
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let per_seed: Vec<f64> = bf16_losses
        .iter()
        .zip(&fp8_losses)
        .map(|(b, f)| (f - b) / b)
        .collect();
    let mut spreads = Vec::new();
    for (i, a) in bf16_losses.iter().enumerate() {
        for b in &bf16_losses[i + 1..] {
            spreads.push((a - b).abs() / (0.5 * (a + b)));
        }
    }
    Ok(Comparison {
        steps: args.steps,
        lr: args.compare_lr,
        seeds: args.seeds,
        bf16_final_loss: mean(&bf16_losses),
        fp8_final_loss: mean(&fp8_losses),
        fp8_vs_bf16_relative_loss_difference: mean(&per_seed),
        per_seed_relative_difference: per_seed,
        bf16_seed_to_seed_relative_difference: (!spreads.is_empty()).then(|| mean(&spreads)),
        max_vio_with_bias_update: vio(&bf16),
        max_vio_without_bias_update: vio(&no_bias),
    })
}
