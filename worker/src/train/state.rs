//! Trainer checkpoints: a Hugging Face model directory plus the optimizer and trainer state, so
//! that training resumes exactly.
//!
//! ```text
//! DIR/config.json             the model configuration (Hugging Face field names)
//! DIR/model.safetensors       FP32 master weights under Hugging Face tensor names
//! DIR/optimizer.safetensors   AdamW moments: NAME.exp_avg and NAME.exp_avg_sq (BF16 or F32)
//! DIR/trainer_state.json      step, data position, options, precision, seed, data source
//! ```
//! The directory appears only once complete (written to a temporary sibling, then renamed).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use shoal_kernels::Tensor;
use shoal_kernels::ops::adamw::{AdamWState, Moments};
use shoal_kernels::ops::linear::Precision;
use shoal_spec::ModelConfig;

use super::{TrainOptions, Trainer};
use crate::checkpoint::{
    CONFIG_FILE, CheckpointWriter, StoreDtype, WEIGHTS_FILE, load_model_dir, load_safetensors,
};
use crate::data::{Batcher, DataPosition};
use crate::model::Model;
use crate::{Result, WorkerError};

/// The optimizer moments file.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The trainer state file.
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";

/// `trainer_state.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Format version of this file.
    pub format: u32,
    /// Optimizer steps taken.
    pub step: u64,
    /// Where the data stream stands.
    pub data_position: DataPosition,
    /// The data source's name (a path or `synthetic`).
    pub data_source: String,
    /// Sequence length of the data windows.
    pub seq_len: usize,
    /// Sequences per step.
    pub batch: usize,
    /// The data seed (shuffling; the synthetic corpus).
    pub data_seed: u64,
    /// Precision mode: `fp32`, `bf16` or `fp8`.
    pub precision: String,
    /// Hyper-parameters.
    pub options: TrainOptions,
}

/// The name of a precision mode in files and on the command line.
pub fn precision_name(p: Precision) -> &'static str {
    match p {
        Precision::Fp32 => "fp32",
        Precision::Bf16 => "bf16",
        Precision::Fp8 => "fp8",
    }
}

/// Parses `fp32`, `bf16` or `fp8`.
pub fn parse_precision(s: &str) -> Result<Precision> {
    match s {
        "fp32" => Ok(Precision::Fp32),
        "bf16" => Ok(Precision::Bf16),
        "fp8" => Ok(Precision::Fp8),
        other => Err(WorkerError::invalid(
            "precision",
            format!("expected fp32, bf16 or fp8, got {other:?}"),
        )),
    }
}

fn moment_tensors(state: &AdamWState, shape: &[usize]) -> Result<(Tensor<f32>, Tensor<f32>)> {
    Ok((
        Tensor::new(shape.to_vec(), state.moments.first_f32())?,
        Tensor::new(shape.to_vec(), state.moments.second_f32())?,
    ))
}

impl Trainer {
    /// Writes a complete checkpoint to `dir` (replacing one that is there). With ranks in
    /// several processes, every process calls it at the same step: the state is gathered onto
    /// the process holding rank 0, which writes it; the others write nothing.
    pub fn save_checkpoint(&mut self, dir: &Path) -> Result<()> {
        self.sync_device()?;
        let (named, states) = if self.is_distributed() {
            match self.gather_checkpoint()? {
                Some(g) => g,
                None => return Ok(()),
            }
        } else {
            (self.named_f32(), self.param_moments()?)
        };
        let writer = CheckpointWriter::begin(dir)?;
        let cfg = self.model().config();
        writer.write_json(CONFIG_FILE, &cfg.to_hf_json())?;
        let refs: Vec<(String, &Tensor<f32>)> = named.iter().map(|(n, t)| (n.clone(), t)).collect();
        writer.write_safetensors(WEIGHTS_FILE, &refs, StoreDtype::F32)?;

        let mut moments = Vec::new();
        for (id, state) in states {
            let name = self.params().name(id);
            let shape = self.model().params().layout_shape(id);
            let (m, v) = moment_tensors(&state, &shape)?;
            moments.push((format!("{name}.exp_avg"), m));
            moments.push((format!("{name}.exp_avg_sq"), v));
        }
        let refs: Vec<(String, &Tensor<f32>)> =
            moments.iter().map(|(n, t)| (n.clone(), t)).collect();
        let dtype = if self.opts.bf16_moments {
            StoreDtype::Bf16
        } else {
            StoreDtype::F32
        };
        writer.write_safetensors(OPTIMIZER_FILE, &refs, dtype)?;

        let state = self.trainer_state();
        let json = serde_json::to_value(&state).map_err(|e| WorkerError::checkpoint(dir, e))?;
        writer.write_json(TRAINER_STATE_FILE, &json)?;
        writer.commit()
    }

    /// Reads `dir/trainer_state.json`.
    pub fn read_state(dir: &Path) -> Result<TrainerState> {
        let path = dir.join(TRAINER_STATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| WorkerError::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| WorkerError::checkpoint(&path, e))
    }

    /// Resumes from a checkpoint written by [`Trainer::save_checkpoint`]: weights, moments,
    /// step and data position. `batcher` must read the same data with the same seed, sequence
    /// length and batch size (checked against the saved state).
    pub fn resume(dir: &Path, batcher: Batcher, opts: TrainOptions) -> Result<Self> {
        Self::resume_on(dir, batcher, opts, None)
    }

    /// [`Self::resume`] for the ranks of `mesh` (see [`Trainer::new_on`]): every process reads
    /// the same checkpoint and keeps its ranks' shards.
    pub fn resume_on(
        dir: &Path,
        batcher: Batcher,
        opts: TrainOptions,
        mesh: Option<Vec<crate::comm::transport::LocalTransport>>,
    ) -> Result<Self> {
        let state = Self::read_state(dir)?;
        let (cfg, tensors): (ModelConfig, BTreeMap<String, Tensor<f32>>) = load_model_dir(dir)?;
        let opt_path = dir.join(OPTIMIZER_FILE);
        let mut moments = load_safetensors(&opt_path)?;
        Self::resume_from(
            Restored {
                cfg,
                tensors,
                state,
                origin: dir,
            },
            batcher,
            opts,
            mesh,
            |name, fresh| {
                let mut take = |suffix: &str| {
                    let key = format!("{name}.{suffix}");
                    moments.remove(&key).map(Tensor::into_data).ok_or_else(|| {
                        WorkerError::checkpoint(&opt_path, format!("missing tensor {key}"))
                    })
                };
                let (m, v) = (take("exp_avg")?, take("exp_avg_sq")?);
                Ok(Moments::from_f32(m, v, fresh.is_bf16()))
            },
        )
    }

    /// A trainer from restored weights and state; `moments(name, fresh)` gives a trained
    /// parameter's moments in the precision of `fresh` (the optimizer's).
    pub(crate) fn resume_from(
        r: Restored<'_>,
        mut batcher: Batcher,
        opts: TrainOptions,
        mesh: Option<Vec<crate::comm::transport::LocalTransport>>,
        mut moments: impl FnMut(&str, &Moments) -> Result<Moments>,
    ) -> Result<Self> {
        let Restored {
            cfg,
            tensors,
            state,
            origin,
        } = r;
        let precision = parse_precision(&state.precision)?;
        let (model, _) =
            Model::from_named(&cfg, tensors, precision, 0, &origin.display().to_string())?;
        for (what, saved, now) in [
            ("seq_len", state.seq_len, batcher.seq_len()),
            ("batch", state.batch, batcher.batch_size()),
        ] {
            if saved != now {
                return Err(WorkerError::invalid(
                    what,
                    format!("the checkpoint was trained with {saved}, not {now}"),
                ));
            }
        }
        if state.data_seed != batcher.seed() || state.data_source != batcher.source().name() {
            return Err(WorkerError::invalid(
                "data",
                format!(
                    "the checkpoint read {} with seed {}, not {} with seed {}",
                    state.data_source,
                    state.data_seed,
                    batcher.source().name(),
                    batcher.seed()
                ),
            ));
        }
        batcher.seek(state.data_position)?;
        // One state per trained parameter, to fill from the checkpoint.
        let cfg_adamw = opts.adamw();
        let mut whole: Vec<(crate::model::params::ParamId, AdamWState)> = model
            .params()
            .iter()
            .filter(|(id, _, _)| model.params().trainable(*id))
            .map(|(id, _, t)| (id, AdamWState::new(t.numel(), &cfg_adamw)))
            .collect();
        let mut trainer = Trainer::new_on(model, batcher, opts, mesh)?;
        for (id, st) in whole.iter_mut() {
            let name = trainer.params().name(*id).to_string();
            let got = moments(&name, &st.moments)?;
            let (lm, lv) = match &got {
                Moments::F32 { m, v } => (m.len(), v.len()),
                Moments::Bf16 { m, v } => (m.len(), v.len()),
            };
            if lm != st.len() || lv != st.len() {
                return Err(WorkerError::checkpoint(
                    origin,
                    format!("moments of {name} have the wrong size"),
                ));
            }
            st.moments = got;
            st.step = state.step;
        }
        trainer.set_param_moments(&whole)?;
        trainer.step = state.step;
        Ok(trainer)
    }

    /// What a checkpoint records of the trainer besides tensors.
    pub fn trainer_state(&self) -> TrainerState {
        TrainerState {
            format: 1,
            step: self.step,
            data_position: self.batcher.position(),
            data_source: self.batcher.source().name().to_string(),
            seq_len: self.batcher.seq_len(),
            batch: self.batcher.batch_size(),
            data_seed: self.batcher.seed(),
            precision: precision_name(self.model().precision()).to_string(),
            options: self.opts.clone(),
        }
    }
}

/// Weights and state read back from a checkpoint, and where from (for errors).
pub(crate) struct Restored<'a> {
    pub(crate) cfg: ModelConfig,
    pub(crate) tensors: BTreeMap<String, Tensor<f32>>,
    pub(crate) state: TrainerState,
    pub(crate) origin: &'a Path,
}
