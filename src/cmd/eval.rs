//! `shoal eval`: mean next-token cross-entropy of a checkpoint on a token file.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use shoal_kernels::ops::linear::Precision;
use shoal_worker::data::{TokenSource, sequential_batches};
use shoal_worker::model::{Objective, TokenBatch};

use shoal_worker::job::data_spec;

use super::train::{DtypeArg, load_model};

/// Options of `shoal eval`.
#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// A checkpoint or model directory (config.json and model.safetensors).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Token file (`.bin`), text file, or `synthetic`.
    #[arg(long)]
    pub data: String,
    /// Tokens per sequence.
    #[arg(long)]
    pub seq_len: usize,
    /// Element type of `.bin` token files.
    #[arg(long, value_enum, default_value = "u16")]
    pub dtype: DtypeArg,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Runs `shoal eval`.
pub fn run(args: &EvalArgs) -> Result<()> {
    if args.seq_len == 0 || args.batch == 0 {
        bail!("--seq-len and --batch must be at least 1");
    }
    if !args.checkpoint.is_dir() {
        bail!(
            "--checkpoint {}: not a directory",
            args.checkpoint.display()
        );
    }
    let name = args.checkpoint.display().to_string();
    let model = load_model(&name, Precision::Fp32, 0)?;
    let source = TokenSource::load(
        &data_spec(&args.data, args.dtype.into(), 0),
        model.config().vocab_size,
    )?;
    let objective = Objective {
        mtp_lambda: 0.0,
        balance_alpha: 0.0,
        loss_scale: 1.0,
    };
    let (mut loss_sum, mut tokens) = (0.0f64, 0usize);
    let (mut mtp_sum, mut mtp_tokens) = (0.0f64, 0usize);
    for b in sequential_batches(&source, args.seq_len, args.batch)? {
        let tb = TokenBatch {
            batch: b.batch,
            seq: b.seq_len,
            inputs: &b.inputs,
            targets: &b.targets,
        };
        let out = model.evaluate(&tb, &objective)?;
        loss_sum += out.main_loss * out.tokens as f64;
        tokens += out.tokens;
        if let Some(m) = out.mtp_losses.first() {
            let n = b.batch * (b.seq_len - 1);
            mtp_sum += m * n as f64;
            mtp_tokens += n;
        }
    }
    let loss = loss_sum / tokens.max(1) as f64;
    let mtp = (mtp_tokens > 0).then(|| mtp_sum / mtp_tokens as f64);
    if args.json {
        println!(
            "{}",
            serde_json::json!({"loss": loss, "tokens": tokens, "mtp_loss": mtp})
        );
    } else {
        println!(
            "loss {loss:.6} over {tokens} tokens{}",
            mtp.map(|m| format!(", mtp loss {m:.6}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}
