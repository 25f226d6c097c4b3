//! Running a submitted job ([`JobSpec`]) on this process: the model, the data and the trainer
//! the spec describes, stepped until the end or until the caller stops it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use shoal_kernels::ops::linear::Precision;
use shoal_spec::ModelConfig;
use shoal_spec::job::{self, JobSpec};

use crate::checkpoint::load_model_dir;
use crate::comm::transport::{LocalTransport, Transport};
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
    o.comm_timeout_s = t.comm_timeout_s;
    let par = &spec.parallelism;
    o.dp = par.dp.max(1);
    o.ep = par.ep.max(1);
    if par.pp > 1 {
        o.pipeline = Some(crate::train::PipelineOptions {
            pp: par.pp,
            schedule: par.schedule.clone(),
            overlap: true,
        });
    }
    o
}

/// A trainer for a spec that runs in this process (its `pp x dp` ranks as threads): at step
/// 0, or where the checkpoint named by `checkpointing.resume` left off (its options, data order
/// and step; `training.steps` still sets where the run ends, at least one step past the
/// checkpoint).
pub fn trainer_for(spec: &JobSpec) -> Result<Trainer> {
    trainer_for_on(spec, None)
}

/// [`trainer_for`] for the ranks of `mesh` (this process's endpoints of a job whose ranks span
/// processes; see [`Trainer::new_on`]).
pub fn trainer_for_on(spec: &JobSpec, mesh: Option<Vec<LocalTransport>>) -> Result<Trainer> {
    let t = &spec.training;
    let dtype = match spec.data.dtype {
        job::TokenDtype::U16 => TokenDtype::U16,
        job::TokenDtype::U32 => TokenDtype::U32,
    };
    if !spec.checkpointing.resume.is_empty() {
        let dir = Path::new(&spec.checkpointing.resume);
        let state = Trainer::read_state(dir)?;
        let (cfg, _) = load_model_dir(dir)?;
        let source = TokenSource::load(
            &data_spec(&spec.data.source, dtype, state.data_seed),
            cfg.vocab_size,
        )?;
        let batcher = Batcher::new(source, state.seq_len, state.batch, state.data_seed)?;
        let mut o = state.options.clone();
        o.steps = t.steps.max(state.step + 1);
        // The spec's parallelism may differ from the checkpoint's (the same spec gives the
        // same run).
        let now = options(spec);
        o.pipeline = now.pipeline;
        o.micro_batches = now.micro_batches;
        o.dp = now.dp;
        o.ep = now.ep;
        o.comm_timeout_s = now.comm_timeout_s;
        return Trainer::resume_on(dir, batcher, o, mesh);
    }
    let (model, initialized) = load_model(&spec.model, precision(spec.precision), t.seed)?;
    if !initialized.is_empty() {
        tracing::warn!(
            model = %spec.model,
            tensors = initialized.len(),
            seed = t.seed,
            "the model has no MTP weights; initialised them from the seed"
        );
    }
    let source = TokenSource::load(
        &data_spec(&spec.data.source, dtype, t.seed),
        model.config().vocab_size,
    )?;
    let batcher = Batcher::new(source, t.seq_len, t.batch, t.seed)?;
    Trainer::new_on(model, batcher, options(spec), mesh)
}

/// A job's directory: `checkpointing.dir`, or `runs/<name>`. It holds `checkpoint/`,
/// `metrics.jsonl` (one line per step, appended) and `summary.json`.
pub fn run_dir(spec: &JobSpec) -> PathBuf {
    if spec.checkpointing.dir.is_empty() {
        PathBuf::from("runs").join(&spec.name)
    } else {
        PathBuf::from(&spec.checkpointing.dir)
    }
}

/// What a finished run reports; written as the job directory's `summary.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunSummary {
    /// Steps taken in all (a resumed run counts the checkpoint's).
    pub steps: u64,
    /// Main loss of this run's first step.
    pub initial_loss: Option<f64>,
    /// Main loss of the last step.
    pub final_loss: Option<f64>,
    /// Main loss of every step this run took.
    pub losses: Vec<f64>,
    /// MTP loss of the last step.
    pub mtp_loss: Option<f64>,
    /// MaxVio per MoE layer at the last step.
    pub max_vio: Option<Vec<f64>>,
    /// Tokens per second over this run's steps.
    pub tokens_per_s: f64,
    /// Seconds this run's steps took.
    pub seconds: f64,
    /// `fp32`, `bf16` or `fp8`.
    pub precision: String,
    /// The final checkpoint.
    pub checkpoint: String,
    /// The per-step metrics file.
    pub metrics: String,
    /// The Chrome trace of one step (the run's second, or its only one): `trace.json`.
    #[serde(default)]
    pub trace: Option<String>,
    /// Bytes moved over the run by the whole job, per transport: `in_process`, tensors handed
    /// between pipeline ranks on one process's threads; `shm`, frames between devices of one
    /// node (data-parallel collectives, MoE dispatch and combine, pipeline transfers); `tcp`,
    /// frames between nodes.
    #[serde(default)]
    pub bytes_moved: BTreeMap<String, u64>,
    /// Seconds over the run a device spent blocked waiting for other devices' frames, and
    /// seconds its network writers spent sending behind its compute (means over the devices).
    #[serde(default)]
    pub comm_seconds: BTreeMap<String, f64>,
    /// What each device of the job holds (weights, gradients, its ZeRO-1 optimizer shard), in
    /// device order (`pp_rank * dp + dp_rank` across processes).
    #[serde(default)]
    pub memory_per_rank: Vec<crate::train::MemoryUse>,
}

/// How a run ended.
#[derive(Clone, Debug)]
pub enum RunEnd {
    /// Every step ran; the final checkpoint and `summary.json` are written.
    Finished(Box<RunSummary>),
    /// `on_step` stopped it after this many steps (no final checkpoint, no summary).
    Stopped(u64),
}

/// Trains a job whose ranks all run in this process to the end, calling `on_step` after every
/// step; it returns `false` to stop early (the job was revoked). Appends every step to
/// `metrics.jsonl`, checkpoints every `checkpointing.interval` steps and at the end, then writes
/// `summary.json`.
pub fn run(spec: &JobSpec, on_step: impl FnMut(&StepMetrics) -> bool) -> Result<RunEnd> {
    run_on(spec, None, on_step)
}

/// [`run`] for this process's ranks of a job whose ranks span processes (`mesh`, see
/// [`Trainer::new_on`]). Every process trains and checkpoints in step; the process holding
/// rank 0 writes the job directory (metrics, trace, checkpoints, summary), the others nothing.
pub fn run_on(
    spec: &JobSpec,
    mesh: Option<Vec<LocalTransport>>,
    mut on_step: impl FnMut(&StepMetrics) -> bool,
) -> Result<RunEnd> {
    let out = run_dir(spec);
    let writes = mesh
        .as_ref()
        .is_none_or(|m| m.first().is_some_and(|t| t.rank() == 0));
    if writes {
        std::fs::create_dir_all(&out).map_err(|e| WorkerError::io(&out, e))?;
    }
    let mut trainer = trainer_for_on(spec, mesh)?;
    let ckpt = out.join("checkpoint");
    let metrics_path = out.join("metrics.jsonl");
    let mut metrics: Box<dyn Write> = if writes {
        Box::new(
            std::fs::File::options()
                .create(true)
                .append(true)
                .open(&metrics_path)
                .map(std::io::BufWriter::new)
                .map_err(|e| WorkerError::io(&metrics_path, e))?,
        )
    } else {
        Box::new(std::io::sink())
    };
    let total = trainer.options().steps;
    let started = Instant::now();
    let mut history: Vec<StepMetrics> = Vec::new();
    // The step to trace: the run's second (its first pays for warm-up), or its only one.
    let traced = (trainer.step() + 2).min(total);
    let trace_path = out.join("trace.json");
    let mut trace = None;
    while trainer.step() < total {
        let m = if trainer.step() + 1 == traced {
            // Every node records the step; rank 0's process gathers them onto its clock.
            let (m, t) = crate::trace::record(|| trainer.train_step());
            let m = m?;
            if let Some(parts) = trainer.gather_trace(t)?
                && writes
            {
                crate::trace::write_chrome_parts(&trace_path, &parts)?;
                trace = Some(trace_path.display().to_string());
            }
            m
        } else {
            trainer.train_step()?
        };
        if !m.loss.is_finite() {
            return Err(WorkerError::invalid(
                "training",
                format!("step {}: the loss is {} (diverged)", m.step, m.loss),
            ));
        }
        serde_json::to_writer(&mut metrics, &m)
            .map_err(|e| WorkerError::io(&metrics_path, e))
            .and_then(|()| {
                metrics
                    .write_all(b"\n")
                    .and_then(|()| metrics.flush())
                    .map_err(|e| WorkerError::io(&metrics_path, e))
            })?;
        let go_on = on_step(&m);
        let every = spec.checkpointing.interval;
        if every > 0 && m.step % every == 0 && m.step < total {
            trainer.save_checkpoint(&ckpt)?;
        }
        history.push(m);
        if !go_on {
            return Ok(RunEnd::Stopped(trainer.step()));
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    trainer.save_checkpoint(&ckpt)?;
    let tokens: usize = history.iter().map(|m| m.tokens).sum();
    let losses: Vec<f64> = history.iter().map(|m| m.main_loss).collect();
    let last = history.last();
    let summary = RunSummary {
        steps: trainer.step(),
        initial_loss: losses.first().copied(),
        final_loss: losses.last().copied(),
        losses,
        mtp_loss: last.map(|m| m.mtp_loss),
        max_vio: last.map(|m| m.max_vio.clone()),
        tokens_per_s: tokens as f64 / seconds.max(1e-9),
        seconds,
        precision: crate::train::state::precision_name(trainer.model().precision()).to_string(),
        checkpoint: ckpt.display().to_string(),
        metrics: metrics_path.display().to_string(),
        trace,
        bytes_moved: BTreeMap::from([
            (
                "in_process".to_string(),
                history.iter().map(|m| m.bytes_sent).sum(),
            ),
            ("shm".to_string(), history.iter().map(|m| m.comm.shm).sum()),
            ("tcp".to_string(), history.iter().map(|m| m.comm.tcp).sum()),
        ]),
        comm_seconds: BTreeMap::from([
            (
                "blocked".to_string(),
                history.iter().map(|m| m.exposed_comm_s).sum(),
            ),
            (
                "sending".to_string(),
                history.iter().map(|m| m.wire_s).sum(),
            ),
        ]),
        memory_per_rank: trainer.memory_per_device()?,
    };
    if writes {
        let path = out.join("summary.json");
        let text = serde_json::to_vec_pretty(&summary).map_err(|e| WorkerError::io(&path, e))?;
        std::fs::write(&path, text).map_err(|e| WorkerError::io(&path, e))?;
    }
    Ok(RunEnd::Finished(Box::new(summary)))
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
        let RunEnd::Finished(summary) = run(&spec, |_| {
            seen += 1;
            true
        })
        .unwrap() else {
            panic!("the run stopped early")
        };
        assert_eq!((summary.steps, summary.losses.len(), seen), (3, 3, 3));
        assert!(dir.path().join("checkpoint").join("config.json").is_file());
        let written: RunSummary =
            serde_json::from_slice(&std::fs::read(dir.path().join("summary.json")).unwrap())
                .unwrap();
        assert_eq!(written.losses, summary.losses);
        // Resuming from the checkpoint continues at step 3 to step 5, appending to the metrics.
        let mut more = spec.clone();
        more.training.steps = 5;
        more.checkpointing.resume = dir.path().join("checkpoint").display().to_string();
        let RunEnd::Finished(resumed) = run(&more, |_| true).unwrap() else {
            panic!("the resumed run stopped early")
        };
        assert_eq!((resumed.steps, resumed.losses.len()), (5, 2));
        let lines = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 5);
        // Stopping early.
        assert!(matches!(
            run(&spec, |m| m.step < 2).unwrap(),
            RunEnd::Stopped(2)
        ));
        // An expert-parallel group that does not divide the data-parallel ranks is refused by
        // name.
        let mut wide = spec.clone();
        wide.parallelism.dp = 2;
        wide.parallelism.ep = 3;
        let e = trainer_for(&wide).err().unwrap().to_string();
        assert!(e.contains("ep"), "{e}");
    }
}
