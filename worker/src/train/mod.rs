//! The single-process trainer: AdamW with FP32 master weights (BF16 moments in FP8 mode),
//! gradient clipping, a warmup-then-cosine learning-rate schedule, and the auxiliary-loss-free
//! expert-bias update after every step.

pub mod state;

use std::time::Instant;

use serde::{Deserialize, Serialize};
use shoal_kernels::ops::adamw::{
    AdamWConfig, AdamWState, adamw_step_scaled, clip_coefficient, grad_norm,
};
use shoal_kernels::ops::linear::Precision;

use shoal_spec::plan::{Schedule, balanced_layers};
use shoal_spec::schedule::{StepSchedule, build};

use crate::data::{Batcher, DataPosition};
use crate::model::StagePart;
use crate::model::params::Grads;
use crate::model::{Model, Objective, TokenBatch};
use crate::pipeline;
use crate::{Result, WorkerError};

/// Hyper-parameters of a training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Optimizer steps.
    pub steps: u64,
    /// Peak learning rate.
    pub lr: f32,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// The cosine schedule ends at `lr * min_lr_ratio`.
    pub min_lr_ratio: f32,
    /// AdamW decoupled weight decay (matrices only; norms and biases are not decayed).
    pub weight_decay: f32,
    /// AdamW betas.
    pub betas: (f32, f32),
    /// Clip the global gradient norm to this.
    pub grad_clip: f32,
    /// Expert-bias update speed gamma of auxiliary-loss-free balancing.
    pub bias_update_speed: f64,
    /// MTP weight lambda.
    pub mtp_lambda: f64,
    /// Sequence-wise balance-loss weight alpha.
    pub balance_alpha: f64,
    /// Keep AdamW moments in BF16.
    pub bf16_moments: bool,
    /// Micro-batches each step's batch is split into (by sequences). They run concurrently and
    /// their gradients accumulate before the optimizer step, so the step is the same
    /// objective; results depend on this number but not on the thread count.
    #[serde(default = "default_micro_batches")]
    pub micro_batches: usize,
    /// Pipeline parallelism on this process's threads: the model cut into `pp` stages, run as
    /// one rank each in the schedule's order (`None`: every micro-batch through the whole model).
    #[serde(default)]
    pub pipeline: Option<PipelineOptions>,
}

/// Pipeline parallelism inside one process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineOptions {
    /// Pipeline ranks (threads), each holding its stages' layers.
    pub pp: usize,
    /// Schedule: `1f1b`, `zb1p` or `dualpipe`.
    pub schedule: String,
}

/// Two micro-batches: one per core of a small machine, and cheap elsewhere.
fn default_micro_batches() -> usize {
    2
}

impl TrainOptions {
    /// Defaults for `steps` steps in `precision` (BF16 moments with FP8, as in the report).
    pub fn defaults(steps: u64, precision: Precision) -> Self {
        Self {
            steps,
            lr: 1e-3,
            warmup_steps: (steps / 20).clamp(1, 100),
            min_lr_ratio: 0.1,
            weight_decay: 0.1,
            betas: (0.9, 0.95),
            grad_clip: 1.0,
            bias_update_speed: 1e-3,
            mtp_lambda: 0.3,
            balance_alpha: 1e-4,
            bf16_moments: precision == Precision::Fp8,
            micro_batches: default_micro_batches(),
            pipeline: None,
        }
    }

    /// Checks the ranges; errors name the option.
    pub fn validate(&self) -> Result<()> {
        let bad = |name: &str, why: String| Err(WorkerError::invalid(name, why));
        if self.steps == 0 {
            return bad("steps", "must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(
                "lr",
                format!("must be a finite number > 0, got {}", self.lr),
            );
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad(
                "min_lr_ratio",
                format!("must be in [0, 1], got {}", self.min_lr_ratio),
            );
        }
        if self.micro_batches == 0 {
            return bad("micro_batches", "must be at least 1".into());
        }
        if !(self.grad_clip.is_finite() && self.grad_clip > 0.0) {
            return bad(
                "grad_clip",
                format!("must be a finite number > 0, got {}", self.grad_clip),
            );
        }
        for (name, v) in [
            ("gamma", self.bias_update_speed),
            ("mtp_lambda", self.mtp_lambda),
            ("alpha", self.balance_alpha),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(name, format!("must be a finite number >= 0, got {v}"));
            }
        }
        self.adamw().validate()?;
        if let Some(p) = &self.pipeline {
            let schedule: Schedule = p.schedule.parse()?;
            shoal_spec::schedule::build(schedule, p.pp, self.micro_batches)?;
        }
        Ok(())
    }

    fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.lr,
            beta1: self.betas.0,
            beta2: self.betas.1,
            eps: 1e-8,
            weight_decay: self.weight_decay,
            bf16_moments: self.bf16_moments,
        }
    }

    /// The learning rate of step `step` (0-based): linear warmup, then cosine decay to
    /// `lr * min_lr_ratio` at the last step.
    pub fn lr_at(&self, step: u64) -> f32 {
        let lr = f64::from(self.lr);
        let w = self.warmup_steps.min(self.steps);
        if step < w {
            return (lr * (step + 1) as f64 / w as f64) as f32;
        }
        let span = (self.steps - w).max(1) as f64;
        let t = ((step - w) as f64 / span).min(1.0);
        let min = lr * f64::from(self.min_lr_ratio);
        (min + (lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())) as f32
    }

    /// The training objective's weights.
    pub fn objective(&self) -> Objective {
        Objective {
            mtp_lambda: self.mtp_lambda,
            balance_alpha: self.balance_alpha,
            loss_scale: 1.0,
        }
    }
}

/// What one optimizer step measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// 1-based step number.
    pub step: u64,
    /// The objective.
    pub loss: f64,
    /// Main next-token cross-entropy.
    pub main_loss: f64,
    /// Mean MTP cross-entropy over depths (0 without MTP).
    pub mtp_loss: f64,
    /// Sum over MoE layers of the balance loss (before alpha).
    pub balance_loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f32,
    /// MaxVio per MoE layer: max expert load / mean load - 1.
    pub max_vio: Vec<f64>,
    /// Tokens processed.
    pub tokens: usize,
    /// Wall time of the step.
    pub seconds: f64,
    /// Bytes the pipeline ranks sent each other (activations and gradients; 0 without
    /// pipeline parallelism).
    #[serde(default)]
    pub bytes_sent: u64,
}

/// Optimizer and schedule state, everything a checkpoint needs besides the weights.
pub struct Trainer {
    model: Model<f32>,
    /// The stages and the step's schedule with pipeline parallelism.
    pipeline: Option<(Vec<StagePart>, StepSchedule)>,
    grads: Grads<f32>,
    moments: Vec<Option<AdamWState>>,
    batcher: Batcher,
    opts: TrainOptions,
    step: u64,
}

/// MaxVio of a load vector: `max / mean - 1` (0 for an empty layer).
pub fn max_violation(load: &[usize]) -> f64 {
    let total: usize = load.iter().sum();
    if load.is_empty() || total == 0 {
        return 0.0;
    }
    let mean = total as f64 / load.len() as f64;
    load.iter().copied().max().unwrap_or(0) as f64 / mean - 1.0
}

impl Trainer {
    /// A trainer at step 0 with fresh optimizer moments.
    pub fn new(model: Model<f32>, batcher: Batcher, opts: TrainOptions) -> Result<Self> {
        opts.validate()?;
        let cfg = opts.adamw();
        let moments = model
            .params()
            .iter()
            .map(|(id, _, t)| {
                model
                    .params()
                    .trainable(id)
                    .then(|| AdamWState::new(t.numel(), &cfg))
            })
            .collect();
        let grads = model.params().zero_grads();
        let pipeline = match &opts.pipeline {
            Some(p) => {
                let layers = model.config().num_hidden_layers;
                if p.pp > layers {
                    return Err(WorkerError::invalid(
                        "pp",
                        format!("{} pipeline ranks for a model of {layers} layers", p.pp),
                    ));
                }
                if opts.micro_batches > batcher.batch_size() {
                    return Err(WorkerError::invalid(
                        "micro_batches",
                        format!(
                            "{} micro-batches of a batch of {} sequences",
                            opts.micro_batches,
                            batcher.batch_size()
                        ),
                    ));
                }
                let split = balanced_layers(model.config(), p.pp, batcher.seq_len());
                let stages = StagePart::split(layers, &split)?;
                let schedule = build(p.schedule.parse()?, p.pp, opts.micro_batches)?;
                Some((stages, schedule))
            }
            None => None,
        };
        Ok(Self {
            model,
            pipeline,
            grads,
            moments,
            batcher,
            opts,
            step: 0,
        })
    }

    /// The model.
    pub fn model(&self) -> &Model<f32> {
        &self.model
    }

    /// The options.
    pub fn options(&self) -> &TrainOptions {
        &self.opts
    }

    /// Steps taken so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Where the data stream stands.
    pub fn data_position(&self) -> DataPosition {
        self.batcher.position()
    }

    /// The data stream.
    pub fn batcher(&self) -> &Batcher {
        &self.batcher
    }

    /// Runs one optimizer step on the next batch.
    pub fn train_step(&mut self) -> Result<StepMetrics> {
        let t0 = Instant::now();
        let _span = tracing::debug_span!("step", step = self.step + 1).entered();
        let batch = self.batcher.next_batch();
        let tb = TokenBatch {
            batch: batch.batch,
            seq: batch.seq_len,
            inputs: &batch.inputs,
            targets: &batch.targets,
        };
        self.grads.zero();
        let (out, bytes_sent) = match &self.pipeline {
            Some((stages, schedule)) => {
                let r = pipeline::run_step(
                    &self.model,
                    stages,
                    schedule,
                    &tb,
                    &self.opts.objective(),
                    &mut self.grads,
                    pipeline::DEFAULT_TIMEOUT,
                )?;
                (r.out, r.bytes_sent.iter().sum())
            }
            None => (
                self.model.forward_backward_micro(
                    &tb,
                    &self.opts.objective(),
                    self.opts.micro_batches,
                    &mut self.grads,
                )?,
                0,
            ),
        };

        let opt_span = tracing::debug_span!("optimizer").entered();
        // Clip the global norm over the trained parameters.
        let params = self.model.params();
        let trained: Vec<bool> = params
            .iter()
            .map(|(id, _, _)| params.trainable(id))
            .collect();
        let slices: Vec<&[f32]> = self
            .grads
            .tensors()
            .iter()
            .zip(&trained)
            .filter(|(_, t)| **t)
            .map(|(g, _)| g.data())
            .collect();
        let grad_norm = grad_norm(&slices)?;
        // The clipping factor is applied inside the AdamW update (no pass that rescales the
        // gradients in memory).
        let clip = clip_coefficient(grad_norm, self.opts.grad_clip)?;

        // AdamW; no weight decay on vectors (norms).
        let lr = self.opts.lr_at(self.step);
        let cfg = self.opts.adamw();
        let no_decay = AdamWConfig {
            weight_decay: 0.0,
            ..cfg
        };
        let ids: Vec<_> = self.model.params().iter().map(|(id, _, _)| id).collect();
        for id in ids {
            let Some(state) = self.moments[id.index()].as_mut() else {
                continue;
            };
            let c = if self.model.params().decays(id) {
                &cfg
            } else {
                &no_decay
            };
            let g = self.grads.get(id);
            let p = self.model.params_mut().get_mut(id);
            adamw_step_scaled(p.data_mut(), g.data(), clip, state, c, lr)?;
        }

        // Auxiliary-loss-free balancing: move each expert's bias toward the mean load.
        let gamma = self.opts.bias_update_speed as f32;
        let biases = self.model.expert_biases();
        for (bias, load) in biases.iter().zip(&out.expert_loads) {
            let total: usize = load.iter().sum();
            let mean = total as f64 / load.len().max(1) as f64;
            let b = self.model.params_mut().get_mut(*bias);
            for (v, &l) in b.data_mut().iter_mut().zip(load) {
                let l = l as f64;
                if l > mean {
                    *v -= gamma;
                } else if l < mean {
                    *v += gamma;
                }
            }
        }

        drop(opt_span);
        self.step += 1;
        let mtp = if out.mtp_losses.is_empty() {
            0.0
        } else {
            out.mtp_losses.iter().sum::<f64>() / out.mtp_losses.len() as f64
        };
        Ok(StepMetrics {
            step: self.step,
            loss: out.loss,
            main_loss: out.main_loss,
            mtp_loss: mtp,
            balance_loss: out.balance_loss,
            grad_norm,
            lr,
            max_vio: out.expert_loads.iter().map(|l| max_violation(l)).collect(),
            tokens: out.tokens,
            seconds: t0.elapsed().as_secs_f64(),
            bytes_sent,
        })
    }
}
