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

use crate::checkpoint::background::BackgroundWriter;
use crate::checkpoint::{load_model_dir, sharded};
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

/// Loads a model named by a preset, a model directory (config.json and safetensors), a sharded
/// checkpoint, or a directory of sharded checkpoints (the newest that verifies). Returns the
/// model and the names of tensors the directory lacked (initialised from `seed`).
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
    let dir = resume_dir(path)?;
    let (cfg, tensors) = if crate::train::snapshot::is_sharded(&dir) {
        crate::train::snapshot::load_weights(&dir)?
    } else {
        load_model_dir(&dir)?
    };
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
        let dir = resume_dir(Path::new(&spec.checkpointing.resume))?;
        return resume_trainer(spec, &dir, mesh, true);
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

/// The checkpoint a `checkpointing.resume` path names: a sharded checkpoint (it has a
/// manifest), a directory of them (the newest that verifies), or a consolidated model directory.
pub fn resume_dir(path: &Path) -> Result<PathBuf> {
    if crate::train::snapshot::is_sharded(path)
        || path.join(crate::checkpoint::CONFIG_FILE).is_file()
    {
        return Ok(path.to_path_buf());
    }
    if !sharded::step_dirs(path)?.is_empty() {
        return match sharded::latest_valid(path)? {
            Some((dir, _)) => Ok(dir),
            None => Err(WorkerError::checkpoint(
                path,
                "no checkpoint under it verifies (every one is torn, corrupt or uncommitted)",
            )),
        };
    }
    if !path.exists() {
        return Err(WorkerError::checkpoint(path, "no such directory"));
    }
    Err(WorkerError::checkpoint(
        path,
        "neither a checkpoint (manifest.json or config.json) nor a directory of step-* checkpoints",
    ))
}

/// A trainer continuing from the checkpoint in `dir` (sharded or consolidated): its options,
/// data order and step; `training.steps` still sets where the run ends (with `one_more`, at
/// least one step past the checkpoint, as a user's resume asks; a recovery ends where the job
/// does), and the spec's parallelism replaces the checkpoint's.
fn resume_trainer(
    spec: &JobSpec,
    dir: &Path,
    mesh: Option<Vec<LocalTransport>>,
    one_more: bool,
) -> Result<Trainer> {
    let dtype = match spec.data.dtype {
        job::TokenDtype::U16 => TokenDtype::U16,
        job::TokenDtype::U32 => TokenDtype::U32,
    };
    let state = Trainer::read_state(dir)?;
    let config_path = dir.join(crate::checkpoint::CONFIG_FILE);
    let text =
        std::fs::read_to_string(&config_path).map_err(|e| WorkerError::io(&config_path, e))?;
    let cfg = ModelConfig::from_hf_json(&text, &config_path.display().to_string())?;
    let source = TokenSource::load(
        &data_spec(&spec.data.source, dtype, state.data_seed),
        cfg.vocab_size,
    )?;
    let batcher = Batcher::new(source, state.seq_len, state.batch, state.data_seed)?;
    let mut o = state.options.clone();
    o.steps = spec.training.steps.max(state.step + u64::from(one_more));
    // The spec's parallelism may differ from the checkpoint's (the same spec gives the same
    // run).
    let now = options(spec);
    o.pipeline = now.pipeline;
    o.micro_batches = now.micro_batches;
    o.dp = now.dp;
    o.ep = now.ep;
    o.comm_timeout_s = now.comm_timeout_s;
    if crate::train::snapshot::is_sharded(dir) {
        Trainer::restore_sharded(dir, batcher, o, mesh)
    } else {
        Trainer::resume_on(dir, batcher, o, mesh)
    }
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
    /// The background checkpoints this run wrote (this process's view).
    #[serde(default)]
    pub checkpoints: Vec<CheckpointTiming>,
}

/// How a run ended.
#[derive(Clone, Debug)]
pub enum RunEnd {
    /// Every step ran; the final checkpoint and `summary.json` are written.
    Finished(Box<RunSummary>),
    /// `on_step` stopped it after this many steps (no final checkpoint, no summary).
    Stopped(u64),
}

/// How an attempt at a job starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// `Some(step)`: continue from the newest committed checkpoint in the job's `checkpoints/`
    /// at or before `step` that verifies (a recovery: every process of an attempt is given the
    /// same step, so all restore the same checkpoint; `u64::MAX` takes the newest). Without
    /// one (or with `None`), start as the spec says.
    pub restore: Option<u64>,
    /// The CUDA GPU (ordinal) to train on. The run trains there when it is eligible
    /// ([`Trainer::device_eligibility`]) and on the CPU otherwise, with a warning saying why;
    /// failing to open the GPU fails the run with the typed error. `None`: the CPU.
    pub gpu: Option<usize>,
}

/// What a run tells its caller as it goes.
#[derive(Debug)]
pub enum RunEvent<'a> {
    /// The trainer is ready at this step (0, or the checkpoint's): steps after it follow.
    Started {
        /// The step it starts after.
        step: u64,
        /// The checkpoint it continues from, if any.
        from: Option<&'a Path>,
    },
    /// A step completed. The callback's `false` stops the run.
    Step(&'a StepMetrics),
    /// A checkpoint was committed (in the process holding rank 0) or written (elsewhere).
    Checkpoint(&'a crate::checkpoint::background::Written),
    /// A checkpoint's snapshot was handed to the background writer: training stalled this
    /// long for it (the copy of the weights and optimizer state; the write goes on behind).
    CheckpointStall {
        /// Its step.
        step: u64,
        /// Seconds the step loop waited.
        stall_s: f64,
    },
    /// A checkpoint could not be written; training goes on.
    CheckpointFailed {
        /// Its step.
        step: u64,
        /// Why.
        error: String,
    },
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
    run_with(spec, mesh, RunOptions::default(), |ev| match ev {
        RunEvent::Step(m) => on_step(m),
        _ => true,
    })
}

/// Puts the trainer's steps on GPU `ordinal` when the run is eligible; warns and leaves them on
/// the CPU otherwise.
fn attach_gpu(trainer: &mut Trainer, ordinal: usize) -> Result<()> {
    if let Some(why) = trainer.device_eligibility() {
        tracing::warn!(gpu = ordinal, reason = %why, "training on the cpu, not the gpu");
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    {
        use crate::model::device::DeviceModel;
        let gpu = shoal_kernels::cuda::Gpu::open(ordinal)?;
        if let Some(why) = DeviceModel::unsupported(&gpu, trainer.model()) {
            tracing::warn!(gpu = ordinal, reason = %why, "training on the cpu, not the gpu");
            return Ok(());
        }
        let device = DeviceModel::new(gpu, trainer.model(), trainer.options().bf16_moments)?;
        trainer.attach_device(Box::new(device))
    }
    #[cfg(not(feature = "cuda"))]
    {
        tracing::warn!(
            gpu = ordinal,
            "this build has no CUDA support (rebuild with --features cuda); training on the cpu"
        );
        Ok(())
    }
}

/// Keeps the lines of `metrics.jsonl` of steps up to `step` (a run that goes back to a
/// checkpoint redoes the later ones).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(WorkerError::io(path, e)),
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64))
                .is_some_and(|s| s <= step)
        })
        .flat_map(|l| [l, "\n"])
        .collect();
    crate::checkpoint::write_file_atomic(path, kept.as_bytes())
}

/// The job's split, as a checkpoint's manifest records it.
fn plan_of(spec: &JobSpec) -> serde_json::Value {
    let p = &spec.parallelism;
    serde_json::json!({
        "pp": p.pp, "dp": p.dp, "ep": p.ep,
        "schedule": p.schedule, "micro_batches": p.micro_batches,
    })
}

/// [`run_on`] with options, telling `on_event` of every step, checkpoint and the start.
/// Periodic checkpoints (`checkpointing.interval`, and then the last step too) are sharded
/// (every device writes its own shard) and written in the background under
/// `checkpoints/step-N/`, committed by the process holding rank 0, the newest
/// `checkpointing.keep` kept; the final one is also consolidated into `checkpoint/` (a Hugging
/// Face model directory).
pub fn run_with(
    spec: &JobSpec,
    mesh: Option<Vec<LocalTransport>>,
    run: RunOptions,
    mut on_event: impl FnMut(RunEvent<'_>) -> bool,
) -> Result<RunEnd> {
    // The run's steps are its children (and, under a node agent, the attempt's).
    let span = tracing::info_span!("run", job = %spec.name);
    let _in = span.enter();
    let out = run_dir(spec);
    let writes = mesh
        .as_ref()
        .is_none_or(|m| m.first().is_some_and(|t| t.rank() == 0));
    if writes {
        std::fs::create_dir_all(&out).map_err(|e| WorkerError::io(&out, e))?;
    }
    let root = out.join("checkpoints");
    let from = match run.restore {
        Some(step) => sharded::latest_valid_at_most(&root, step)?.map(|(d, _)| d),
        None => None,
    };
    let mut trainer = match &from {
        Some(dir) => resume_trainer(spec, dir, mesh, false)?,
        None => trainer_for_on(spec, mesh)?,
    };
    if let Some(ordinal) = run.gpu {
        attach_gpu(&mut trainer, ordinal)?;
    }
    let ckpt = out.join("checkpoint");
    let metrics_path = out.join("metrics.jsonl");
    if writes {
        // What a failed attempt (or an earlier run in this directory) left past this start.
        sharded::remove_after(&root, trainer.step())?;
        truncate_metrics(&metrics_path, trainer.step())?;
    }
    if !on_event(RunEvent::Started {
        step: trainer.step(),
        from: from.as_deref(),
    }) {
        return Ok(RunEnd::Stopped(trainer.step()));
    }
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
    let mut writer = BackgroundWriter::start()?;
    let mut written = Vec::new();
    let mut stalls: BTreeMap<u64, f64> = BTreeMap::new();
    let mut report = |done: Vec<(u64, Result<crate::checkpoint::background::Written>)>,
                      on_event: &mut dyn FnMut(RunEvent<'_>) -> bool|
     -> bool {
        let mut go_on = true;
        for (step, r) in done {
            go_on &= match r {
                Ok(w) => {
                    let ok = on_event(RunEvent::Checkpoint(&w));
                    written.push(w);
                    ok
                }
                Err(e) => {
                    tracing::warn!(step, error = %e, "checkpoint not written; training goes on");
                    on_event(RunEvent::CheckpointFailed {
                        step,
                        error: e.to_string(),
                    })
                }
            };
        }
        go_on
    };
    let total = trainer.options().steps;
    let started = Instant::now();
    let mut history: Vec<StepMetrics> = Vec::new();
    // The step to trace: the run's second (its first pays for warm-up), or its only one.
    let traced = (trainer.step() + 2).min(total);
    let trace_path = out.join("trace.json");
    let mut trace = None;
    let wait = trainer
        .options()
        .comm_timeout()
        .max(std::time::Duration::from_secs(600));
    let keep = spec.checkpointing.keep.max(1);
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
        let mut go_on = on_event(RunEvent::Step(&m));
        let every = spec.checkpointing.interval;
        if every > 0 && m.step % every == 0 && m.step < total {
            let t0 = Instant::now();
            let snap = trainer.checkpoint_snapshot(&root, plan_of(spec), wait, keep)?;
            let done = writer.submit(snap);
            let stall = t0.elapsed().as_secs_f64();
            tracing::debug!(
                step = m.step,
                stall_s = stall,
                "checkpoint handed to the writer"
            );
            stalls.insert(m.step, stall);
            go_on &= on_event(RunEvent::CheckpointStall {
                step: m.step,
                stall_s: stall,
            });
            go_on &= report(done, &mut on_event);
        } else {
            go_on &= report(writer.poll(), &mut on_event);
        }
        history.push(m);
        if !go_on {
            return Ok(RunEnd::Stopped(trainer.step()));
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    // With periodic checkpoints, the last step is committed as one too.
    if spec.checkpointing.interval > 0 && !history.is_empty() {
        let snap = trainer.checkpoint_snapshot(&root, plan_of(spec), wait, keep)?;
        let done = writer.submit(snap);
        report(done, &mut on_event);
    }
    let done = writer.finish();
    report(done, &mut on_event);
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
        checkpoints: written
            .iter()
            .map(|w| CheckpointTiming {
                step: w.step,
                stall_s: stalls.get(&w.step).copied().unwrap_or(0.0),
                write_s: w.seconds,
                bytes: w.bytes,
            })
            .collect(),
    };
    if writes {
        let path = out.join("summary.json");
        let text = serde_json::to_vec_pretty(&summary).map_err(|e| WorkerError::io(&path, e))?;
        std::fs::write(&path, text).map_err(|e| WorkerError::io(&path, e))?;
    }
    Ok(RunEnd::Finished(Box::new(summary)))
}

/// How long one background checkpoint held the step loop up, and how long it took to write.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointTiming {
    /// Its step.
    pub step: u64,
    /// Seconds the step loop stopped for it (copying the shards out, and waiting for the
    /// previous checkpoint if that was still being written).
    pub stall_s: f64,
    /// Seconds the writer took (in the committing process: until the manifest was written).
    pub write_s: f64,
    /// Bytes this process wrote.
    pub bytes: u64,
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

    fn gpu_spec(dir: &Path) -> JobSpec {
        let text = format!(
            "name = \"g\"\nprecision = \"fp32\"\n[training]\nsteps = 2\nseq_len = 32\nbatch = 2\n[parallelism]\nmicro_batches = 1\n[checkpointing]\ndir = \"{}\"",
            dir.display()
        );
        JobSpec::from_toml(&text, "g.toml").unwrap()
    }

    fn run_on_gpu(spec: &JobSpec) -> Result<RunEnd> {
        let opts = RunOptions {
            restore: None,
            gpu: Some(0),
        };
        run_with(spec, None, opts, |_| true)
    }

    /// Without CUDA support in the build, a run placed on a GPU trains on the CPU (warning why).
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn devices_a_gpu_run_in_a_build_without_cuda_trains_on_the_cpu() {
        let dir = tempfile::tempdir().unwrap();
        let RunEnd::Finished(s) = run_on_gpu(&gpu_spec(dir.path())).unwrap() else {
            panic!("the run stopped early")
        };
        assert_eq!(s.steps, 2);
    }

    /// With CUDA support but no usable GPU, a run placed on one fails with the typed error that
    /// names the missing library (what the agent reports to the coordinator); an ineligible run
    /// trains on the CPU.
    #[cfg(feature = "cuda")]
    #[test]
    fn devices_a_gpu_run_without_a_gpu_fails_with_the_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let spec = gpu_spec(dir.path());
        // FP32, and the report's FP8 recipe with BF16 moments (a job's defaults): both train on
        // the GPU.
        let mut fp8 = spec.clone();
        fp8.precision = shoal_spec::job::Precision::Fp8;
        for s in [&spec, &fp8] {
            if shoal_kernels::cuda::driver_present() {
                // A machine with a driver: the run trains on its GPU.
                assert!(matches!(run_on_gpu(s).unwrap(), RunEnd::Finished(_)));
            } else {
                let e = run_on_gpu(s).unwrap_err().to_string();
                assert!(
                    e.contains("cuda unavailable") && e.contains("libcuda"),
                    "{e}"
                );
            }
        }
        let mut two_ranks = spec.clone();
        two_ranks.parallelism.dp = 2;
        assert!(matches!(
            run_on_gpu(&two_ranks).unwrap(),
            RunEnd::Finished(_)
        ));
    }
}
