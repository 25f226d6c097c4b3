//! `shoal train`: train a DeepSeek-V3 model in this process.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;
use shoal_kernels::ops::linear::Precision;
use shoal_spec::ModelConfig;
use shoal_worker::data::{Batcher, DataSpec, TokenDtype, TokenSource};
use shoal_worker::model::Model;
use shoal_worker::train::{StepMetrics, TrainOptions, Trainer};

/// Precision modes on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionArg {
    /// FP32 reference.
    Fp32,
    /// BF16 GEMM inputs, FP32 accumulation.
    Bf16,
    /// The DeepSeek-V3 FP8 recipe.
    Fp8,
}

impl From<PrecisionArg> for Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::Fp32 => Precision::Fp32,
            PrecisionArg::Bf16 => Precision::Bf16,
            PrecisionArg::Fp8 => Precision::Fp8,
        }
    }
}

/// Options of `shoal train`. Flags override the job file given with `--config`.
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// A TOML job file with any of the options below (same names, `-` or `_`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model: a preset (`tiny`, `small`) or a directory with config.json and model.safetensors.
    #[arg(long)]
    pub model: Option<String>,
    /// Resume from a checkpoint written by `shoal train` (weights, optimizer, data position).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Optimizer steps.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Precision mode.
    #[arg(long, value_enum)]
    pub precision: Option<PrecisionArg>,
    /// Data: `synthetic`, a token file (`.bin`, little-endian ids) or a text file (bytes).
    #[arg(long)]
    pub data: Option<String>,
    /// Element type of `.bin` token files.
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// Tokens per sequence.
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Sequences per step.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Seed of the initialisation, the data order and the synthetic corpus.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f32>,
    /// Expert-bias update speed gamma.
    #[arg(long)]
    pub gamma: Option<f64>,
    /// Micro-batches per step, computed concurrently (default 2).
    #[arg(long)]
    pub micro_batches: Option<usize>,
    /// Write a checkpoint every this many steps (and always at the end).
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Output directory: checkpoint/, metrics.jsonl, summary.json.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// End with one JSON summary line on stdout (and no progress bar).
    #[arg(long)]
    pub json: bool,
}

/// Token file element types on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DtypeArg {
    /// Little-endian u16 ids.
    U16,
    /// Little-endian u32 ids.
    U32,
}

impl From<DtypeArg> for TokenDtype {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::U16 => TokenDtype::U16,
            DtypeArg::U32 => TokenDtype::U32,
        }
    }
}

/// The job file: every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobFile {
    name: Option<String>,
    model: Option<String>,
    steps: Option<u64>,
    precision: Option<PrecisionArg>,
    data: Option<String>,
    dtype: Option<DtypeArg>,
    #[serde(alias = "seq-len")]
    seq_len: Option<usize>,
    batch: Option<usize>,
    seed: Option<u64>,
    lr: Option<f32>,
    gamma: Option<f64>,
    #[serde(alias = "micro-batches")]
    micro_batches: Option<usize>,
    #[serde(alias = "checkpoint-every")]
    checkpoint_every: Option<u64>,
    out: Option<PathBuf>,
}

/// Resolved settings.
struct Settings {
    /// The job's name (from the job file), shown in the header.
    name: Option<String>,
    model: String,
    steps: u64,
    precision: Precision,
    data: String,
    dtype: TokenDtype,
    seq_len: usize,
    batch: usize,
    seed: u64,
    lr: Option<f32>,
    gamma: Option<f64>,
    micro_batches: Option<usize>,
    checkpoint_every: Option<u64>,
    out: PathBuf,
}

/// Default steps: enough for the loss to fall clearly within about two minutes here.
pub const DEFAULT_STEPS: u64 = 60;

fn settings(args: &TrainArgs) -> Result<Settings> {
    let job = match &args.config {
        Some(path) => {
            let text = fs::read_to_string(path)
                .with_context(|| format!("reading job file {}", path.display()))?;
            toml::from_str::<JobFile>(&text)
                .with_context(|| format!("job file {}", path.display()))?
        }
        None => JobFile::default(),
    };
    let s = Settings {
        name: job.name,
        model: args
            .model
            .clone()
            .or(job.model)
            .unwrap_or_else(|| "tiny".into()),
        steps: args.steps.or(job.steps).unwrap_or(DEFAULT_STEPS),
        precision: args
            .precision
            .or(job.precision)
            .unwrap_or(PrecisionArg::Fp8)
            .into(),
        data: args
            .data
            .clone()
            .or(job.data)
            .unwrap_or_else(|| "synthetic".into()),
        dtype: args.dtype.or(job.dtype).unwrap_or(DtypeArg::U16).into(),
        seq_len: args.seq_len.or(job.seq_len).unwrap_or(256),
        batch: args.batch.or(job.batch).unwrap_or(8),
        seed: args.seed.or(job.seed).unwrap_or(0),
        lr: args.lr.or(job.lr),
        gamma: args.gamma.or(job.gamma),
        micro_batches: args.micro_batches.or(job.micro_batches),
        checkpoint_every: args.checkpoint_every.or(job.checkpoint_every),
        out: args
            .out
            .clone()
            .or(job.out)
            .unwrap_or_else(|| PathBuf::from("runs/train")),
    };
    if s.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if s.seq_len == 0 || s.batch == 0 {
        bail!("--seq-len and --batch must be at least 1");
    }
    if s.checkpoint_every == Some(0) {
        bail!("--checkpoint-every must be at least 1");
    }
    Ok(s)
}

/// The data source a `--data` value names.
pub fn data_spec(data: &str, dtype: TokenDtype, seed: u64) -> DataSpec {
    shoal_worker::job::data_spec(data, dtype, seed)
}

/// Loads a model named by a preset or a directory (as a node agent does for a job), saying
/// which MTP tensors a directory lacked.
pub fn load_model(name: &str, precision: Precision, seed: u64) -> Result<Model<f32>> {
    let (model, initialized) = shoal_worker::job::load_model(name, precision, seed)
        .with_context(|| format!("--model {name}"))?;
    if !initialized.is_empty() {
        eprintln!(
            "shoal: {name} has no MTP weights; initialised {} MTP tensors from seed {seed}",
            initialized.len()
        );
    }
    Ok(model)
}

fn prepare_out(out: &Path) -> Result<()> {
    fs::create_dir_all(out)
        .with_context(|| format!("cannot create output directory {}", out.display()))?;
    let probe = out.join(".shoal-write-test");
    fs::write(&probe, b"")
        .with_context(|| format!("output directory {} is not writable", out.display()))?;
    let _ = fs::remove_file(probe);
    Ok(())
}

fn progress(steps: u64, quiet: bool) -> ProgressBar {
    let bar = ProgressBar::new(steps);
    if quiet {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    } else {
        let style = ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
    }
    bar
}

/// Runs `shoal train`.
pub fn run(args: &TrainArgs) -> Result<()> {
    let s = settings(args)?;
    prepare_out(&s.out)?;
    let mut opts = TrainOptions::defaults(s.steps, s.precision);
    if let Some(lr) = s.lr {
        opts.lr = lr;
    }
    if let Some(g) = s.gamma {
        opts.bias_update_speed = g;
    }
    if let Some(m) = s.micro_batches {
        opts.micro_batches = m;
    }
    let mut trainer = match &args.resume {
        Some(dir) => {
            let state = Trainer::read_state(dir)?;
            let cfg_text = fs::read_to_string(dir.join("config.json"))
                .with_context(|| format!("reading {}", dir.join("config.json").display()))?;
            let cfg = ModelConfig::from_hf_json(
                &cfg_text,
                &dir.join("config.json").display().to_string(),
            )?;
            let spec = data_spec(&s.data, s.dtype, state.data_seed);
            let source = TokenSource::load(&spec, cfg.vocab_size)?;
            let batcher = Batcher::new(source, state.seq_len, state.batch, state.data_seed)?;
            let mut o = state.options.clone();
            o.steps = s.steps.max(state.step + 1);
            Trainer::resume(dir, batcher, o)?
        }
        None => {
            let model = load_model(&s.model, s.precision, s.seed)?;
            let spec = data_spec(&s.data, s.dtype, s.seed);
            let source = TokenSource::load(&spec, model.config().vocab_size)?;
            let batcher = Batcher::new(source, s.seq_len, s.batch, s.seed)?;
            Trainer::new(model, batcher, opts)?
        }
    };

    let total = trainer.options().steps;
    let metrics_path = s.out.join("metrics.jsonl");
    let mut metrics = BufWriter::new(
        File::options()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .with_context(|| format!("opening {}", metrics_path.display()))?,
    );
    let checkpoint_dir = s.out.join("checkpoint");
    let bar = progress(total - trainer.step(), args.json);
    let (params, active) = trainer.model().config().parameter_count();
    if !args.json {
        eprintln!(
            "shoal train{}: {} ({:.1}M parameters, {:.1}M active), {}, data {}, {} x {} tokens per step, {} steps",
            s.name
                .as_deref()
                .map(|n| format!(" {n}"))
                .unwrap_or_default(),
            s.model,
            params as f64 / 1e6,
            active as f64 / 1e6,
            shoal_worker::train::state::precision_name(trainer.model().precision()),
            trainer.batcher().source().name(),
            trainer.batcher().batch_size(),
            trainer.batcher().seq_len(),
            total
        );
    }
    let started = Instant::now();
    let mut history: Vec<StepMetrics> = Vec::new();
    while trainer.step() < total {
        let m = trainer.train_step()?;
        if !m.loss.is_finite() {
            bail!("step {}: the loss is {} (diverged)", m.step, m.loss);
        }
        serde_json::to_writer(&mut metrics, &m)?;
        metrics.write_all(b"\n")?;
        let tok_s = m.tokens as f64 / m.seconds;
        let vio = m.max_vio.iter().copied().fold(0.0, f64::max);
        bar.set_message(format!(
            "loss {:.4} | {:.0} tok/s | MaxVio {:.2}",
            m.main_loss, tok_s, vio
        ));
        bar.inc(1);
        if s.checkpoint_every.is_some_and(|n| m.step % n == 0) && m.step < total {
            trainer.save_checkpoint(&checkpoint_dir)?;
        }
        history.push(m);
    }
    metrics.flush()?;
    bar.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64();
    trainer.save_checkpoint(&checkpoint_dir)?;

    let tokens: usize = history.iter().map(|m| m.tokens).sum();
    let losses: Vec<f64> = history.iter().map(|m| m.main_loss).collect();
    let last = history.last();
    let summary = serde_json::json!({
        "steps": trainer.step(),
        "initial_loss": losses.first(),
        "final_loss": losses.last(),
        "losses": losses,
        "mtp_loss": last.map(|m| m.mtp_loss),
        "max_vio": last.map(|m| m.max_vio.clone()),
        "tokens_per_s": tokens as f64 / elapsed,
        "seconds": elapsed,
        "precision": shoal_worker::train::state::precision_name(trainer.model().precision()),
        "checkpoint": checkpoint_dir.display().to_string(),
        "metrics": metrics_path.display().to_string(),
    });
    fs::write(
        s.out.join("summary.json"),
        serde_json::to_vec_pretty(&summary)?,
    )
    .with_context(|| format!("writing {}", s.out.join("summary.json").display()))?;
    if args.json {
        println!("{summary}");
    } else if let (Some(first), Some(last)) = (history.first(), last) {
        println!(
            "trained {} steps in {:.1}s: loss {:.4} -> {:.4}, {:.0} tokens/s, MaxVio {:.3}; checkpoint {}",
            history.len(),
            elapsed,
            first.main_loss,
            last.main_loss,
            tokens as f64 / elapsed,
            last.max_vio.iter().copied().fold(0.0, f64::max),
            checkpoint_dir.display()
        );
    }
    Ok(())
}
