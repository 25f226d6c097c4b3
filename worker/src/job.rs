//! Running a submitted job ([`JobSpec`]) on this process: the model, the data and the trainer
//! the spec describes, stepped until the end or until the caller stops it.

use std::path::{Path, PathBuf};

use shoal_kernels::ops::linear::Precision;
use shoal_spec::ModelConfig;
use shoal_spec::job::{self, JobSpec};

use crate::checkpoint::load_model_dir;
use crate::data::{Batcher, DataSpec, TokenDtype, TokenSource};
use crate::model::Model;
use crate::train::{StepMetrics, TrainOptions, Trainer};
use crate::{Result, WorkerError};

/// The kernels' precision for a spec's.
pub fn precision(p: job::Precision) -> Precision {
    match p {
        job::Precision::Fp32 => Precision::Fp32,
        job::Precision::Bf16 => Precision::Bf16,
        job::Precision::Fp8 => Precision::Fp8,
    }
}

/// Loads a model named by a preset or a checkpoint directory (config.json and safetensors).
/// Returns the model and the names of tensors the directory lacked (initialised from `seed`).
pub fn load_model(
    name: &str,
    precision: Precision,
    seed: u64,
) -> Result<(Model<f32>, Vec<String>)> {
    let path = Path::new(name);
    if !path.is_dir() {
        let cfg = ModelConfig::preset(name).map_err(|e| {
            WorkerError::invalid(
                "model",
                format!("{name}: neither a preset nor a directory ({e})"),
            )
        })?;
        return Ok((Model::new(&cfg, precision, seed)?, Vec::new()));
    }
    let (cfg, tensors) = load_model_dir(path)?;
    let (model, report) = Model::from_named(&cfg, tensors, precision, seed, name)?;
    Ok((model, report.initialized))
}

/// The data source a spec's `data.source` names.
pub fn data_spec(source: &str, dtype: TokenDtype, seed: u64) -> DataSpec {
    if source == "synthetic" {
        DataSpec::synthetic(seed)
    } else {
        DataSpec::from_path(source, dtype)
    }
}

/// The trainer's options for a spec.
pub fn options(spec: &JobSpec) -> TrainOptions {
    let t = &spec.training;
    let mut o = TrainOptions::defaults(t.steps, precision(spec.precision));
    o.lr = t.lr as f32;
    if let Some(w) = t.warmup_steps {
        o.warmup_steps = w;
    }
    o.min_lr_ratio = t.min_lr_ratio as f32;
    o.bias_update_speed = t.gamma;
    o.balance_alpha = t.alpha;
    o.mtp_lambda = t.mtp_lambda;
    o.micro_batches = spec.parallelism.micro_batches.max(1);
    o
}

/// A trainer at step 0 for a spec that runs on one device.
pub fn trainer_for(spec: &JobSpec) -> Result<Trainer> {
    let par = &spec.parallelism;
    if par.pp * par.dp != 1 {
        return Err(WorkerError::invalid(
            "parallelism",
            format!(
                "pp x dp = {} devices: this worker runs single-device jobs only until distributed execution lands",
                par.pp * par.dp
            ),
        ));
    }
    let t = &spec.training;
    let (model, _) = load_model(&spec.model, precision(spec.precision), t.seed)?;
    let dtype = match spec.data.dtype {
        job::TokenDtype::U16 => TokenDtype::U16,
        job::TokenDtype::U32 => TokenDtype::U32,
    };
    let source = TokenSource::load(
        &data_spec(&spec.data.source, dtype, t.seed),
        model.config().vocab_size,
    )?;
    let batcher = Batcher::new(source, t.seq_len, t.batch, t.seed)?;
    Trainer::new(model, batcher, options(spec))
}

/// Where a spec's checkpoints go: `checkpointing.dir`, or `runs/<name>`.
pub fn checkpoint_dir(spec: &JobSpec) -> PathBuf {
    if spec.checkpointing.dir.is_empty() {
        PathBuf::from("runs").join(&spec.name)
    } else {
        PathBuf::from(&spec.checkpointing.dir)
    }
}

/// Trains a single-device job to the end, calling `on_step` after every step; it returns
/// `false` to stop early (the job was revoked). Checkpoints every `checkpointing.interval` steps
/// and at the end. Returns the metrics of every step run.
pub fn run(
    spec: &JobSpec,
    mut on_step: impl FnMut(&StepMetrics) -> bool,
) -> Result<Vec<StepMetrics>> {
    let mut trainer = trainer_for(spec)?;
    let dir = checkpoint_dir(spec).join("checkpoint");
    let total = trainer.options().steps;
    let mut history = Vec::new();
    while trainer.step() < total {
        let m = trainer.train_step()?;
        if !m.loss.is_finite() {
            return Err(WorkerError::invalid(
                "training",
                format!("step {}: the loss is {} (diverged)", m.step, m.loss),
            ));
        }
        let go_on = on_step(&m);
        let every = spec.checkpointing.interval;
        if every > 0 && m.step % every == 0 && m.step < total {
            trainer.save_checkpoint(&dir)?;
        }
        history.push(m);
        if !go_on {
            return Ok(history);
        }
    }
    trainer.save_checkpoint(&dir)?;
    Ok(history)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_job_trains_and_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "name = \"t\"\nprecision = \"fp32\"\n[training]\nsteps = 3\nseq_len = 32\nbatch = 2\n[parallelism]\nmicro_batches = 1\n[checkpointing]\ndir = \"{}\"",
            dir.path().display()
        );
        let spec = JobSpec::from_toml(&text, "t.toml").unwrap();
        let mut seen = 0;
        let history = run(&spec, |_| {
            seen += 1;
            true
        })
        .unwrap();
        assert_eq!((history.len(), seen), (3, 3));
        assert!(dir.path().join("checkpoint").join("config.json").is_file());
        // Stopping early.
        let early = run(&spec, |m| m.step < 2).unwrap();
        assert_eq!(early.len(), 2);
        // Multi-device jobs are refused by name.
        let mut wide = spec.clone();
        wide.parallelism.dp = 2;
        let e = trainer_for(&wide).err().unwrap().to_string();
        assert!(e.contains("parallelism"), "{e}");
    }
}
