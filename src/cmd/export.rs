//! `shoal export`: a checkpoint as a Hugging Face model directory.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use shoal_kernels::ops::linear::Precision;
use shoal_worker::checkpoint::{StoreDtype, save_model_dir};

/// Options of `shoal export`.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// A committed sharded checkpoint (`<job>/checkpoints/step-N`), a directory of them (the
    /// newest that verifies), or a model directory.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The model directory to write (config.json and model.safetensors), replaced atomically.
    #[arg(long)]
    pub out: PathBuf,
    /// Element type of the weights written.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: ExportDtype,
}

/// Element types `shoal export` writes.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ExportDtype {
    /// IEEE single precision (exact).
    F32,
    /// bfloat16 (half the size).
    Bf16,
}

/// Runs `shoal export`.
pub fn run(args: &ExportArgs) -> Result<()> {
    let name = args.checkpoint.display().to_string();
    let dir = shoal_worker::job::resume_dir(&args.checkpoint)
        .with_context(|| format!("--checkpoint {name}"))?;
    let (model, _) = shoal_worker::job::load_model(&dir.display().to_string(), Precision::Fp32, 0)
        .with_context(|| format!("--checkpoint {name}"))?;
    let named = model.named_f32();
    let refs: Vec<(String, &shoal_kernels::Tensor<f32>)> =
        named.iter().map(|(n, t)| (n.clone(), t)).collect();
    let dtype = match args.dtype {
        ExportDtype::F32 => StoreDtype::F32,
        ExportDtype::Bf16 => StoreDtype::Bf16,
    };
    save_model_dir(&args.out, model.config(), &refs, dtype)
        .with_context(|| format!("--out {}", args.out.display()))?;
    println!(
        "exported {} ({} tensors) to {}",
        dir.display(),
        refs.len(),
        args.out.display()
    );
    Ok(())
}
