//! The single-process trainer: AdamW with FP32 master weights (BF16 moments in FP8 mode),
//! gradient clipping, a warmup-then-cosine learning-rate schedule, and the auxiliary-loss-free
//! expert-bias update after every step.

pub mod device;
mod dp;
mod gather;
pub mod snapshot;
pub mod state;
pub mod zero;

use std::time::Instant;

use serde::{Deserialize, Serialize};
use shoal_kernels::Tensor;
use shoal_kernels::ops::adamw::{AdamWConfig, AdamWState};
use shoal_kernels::ops::linear::Precision;

use shoal_spec::plan::{Schedule, balanced_layers};
use shoal_spec::schedule::{StepSchedule, build};

use self::dp::{Part, Replica, StepPlan, rank_step};
use self::zero::ZeroLayout;
use crate::comm::collective::Group;
use crate::comm::transport::{ByteCounts, LocalMesh, LocalTransport, Transport};
use crate::data::{Batcher, DataPosition};
use crate::model::params::ParamId;
use crate::model::{Model, Objective, TokenBatch, split_micro};
use crate::model::{StagePart, params::ParamStore};
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
    /// Data-parallel ranks (threads of this process), each computing the gradients of its share
    /// of every batch and keeping the optimizer state of its ZeRO-1 shard.
    #[serde(default = "one")]
    pub dp: usize,
    /// Expert-parallel group size: each group of `ep` consecutive data-parallel ranks shares
    /// the routed experts, `n_routed_experts / ep` per rank, reached through dispatch and
    /// combine (must divide `dp`).
    #[serde(default = "one")]
    pub ep: usize,
    /// Dispatch to every expert-parallel member directly, even across nodes (the peer of the
    /// default hierarchical route: one network crossing per token and node, then forwarding
    /// inside the node).
    #[serde(default)]
    pub direct_dispatch: bool,
    /// Seconds any wait for another rank's data may take before the step fails with an error
    /// naming the peer and the operation.
    #[serde(default = "default_comm_timeout_s")]
    pub comm_timeout_s: f64,
}

fn one() -> usize {
    1
}

fn default_comm_timeout_s() -> f64 {
    crate::pipeline::DEFAULT_TIMEOUT.as_secs_f64()
}

/// Pipeline parallelism inside one process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineOptions {
    /// Pipeline ranks (threads), each holding its stages' layers.
    pub pp: usize,
    /// Schedule: `1f1b`, `zb1p`, `dualpipe` or `dualpipev` (`2 pp` stages in a V).
    pub schedule: String,
    /// Run the forward and backward chunks of DualPipe's overlapped pairs at once, on two
    /// threads of the rank (otherwise one after the other).
    #[serde(default = "yes")]
    pub overlap: bool,
}

fn yes() -> bool {
    true
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
            dp: 1,
            ep: 1,
            direct_dispatch: false,
            comm_timeout_s: default_comm_timeout_s(),
        }
    }

    /// How long a wait for another rank's data may take.
    pub fn comm_timeout(&self) -> std::time::Duration {
        // `validate` keeps it finite and positive.
        std::time::Duration::try_from_secs_f64(self.comm_timeout_s)
            .unwrap_or(crate::pipeline::DEFAULT_TIMEOUT)
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
        let max = shoal_spec::job::MAX_COMM_TIMEOUT_S;
        if !(self.comm_timeout_s > 0.0 && self.comm_timeout_s <= max) {
            return bad(
                "comm_timeout_s",
                format!("must be in (0, {max}] seconds, got {}", self.comm_timeout_s),
            );
        }
        if self.dp == 0 || self.dp > shoal_spec::schedule::MAX_RANKS {
            return bad(
                "dp",
                format!(
                    "must be in 1..={}, got {}",
                    shoal_spec::schedule::MAX_RANKS,
                    self.dp
                ),
            );
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
        if self.ep == 0 || !self.dp.is_multiple_of(self.ep) {
            return bad("ep", format!("{} does not divide dp {}", self.ep, self.dp));
        }
        self.adamw().validate()?;
        if let Some(p) = &self.pipeline {
            let schedule: Schedule = p.schedule.parse()?;
            shoal_spec::schedule::build(schedule, p.pp, self.micro_batches)?;
        }
        Ok(())
    }

    pub(crate) fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.lr,
            beta1: self.betas.0,
            beta2: self.betas.1,
            eps: 1e-8,
            weight_decay: self.weight_decay,
            bf16_moments: self.bf16_moments,
        }
    }

    /// The hyper-parameters of optimizer step `step` (0-based) for the device step
    /// ([`crate::model::device::DeviceModel::train_step`]): the same schedule, clipping, AdamW
    /// and bias update speed this trainer uses.
    pub fn step_hyper(&self, step: u64) -> crate::model::device::StepHyper {
        crate::model::device::StepHyper {
            lr: self.lr_at(step),
            adamw: self.adamw(),
            grad_clip: self.grad_clip,
            gamma: self.bias_update_speed as f32,
            micro_batches: self.micro_batches,
            obj: self.objective(),
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
    /// Tokens routed to each expert, per MoE layer (the whole batch's).
    pub expert_loads: Vec<Vec<usize>>,
    /// Seconds of the step a pipeline rank did not compute (the mean over this process's
    /// ranks): the pipeline bubble, plus waits for peers; 0 without pipeline parallelism.
    pub bubble_s: f64,
    /// Tokens processed.
    pub tokens: usize,
    /// Wall time of the step.
    pub seconds: f64,
    /// Seconds this process's busiest device computed: the wall time less the least time any
    /// of its devices waited for other devices' frames (peers wait for a straggler).
    #[serde(default)]
    pub busy_s: f64,
    /// Bytes the pipeline ranks on threads of one process handed each other (activations and
    /// gradients; 0 without pipeline parallelism, and for ranks on devices of a mesh, whose
    /// transfers `comm` counts).
    #[serde(default)]
    pub bytes_sent: u64,
    /// Bytes the devices sent each other, per transport and operation: the whole job's (every
    /// process reports the sum over the mesh).
    #[serde(default)]
    pub comm: ByteCounts,
    /// Seconds a device spent blocked waiting for other devices' frames (the mean over the
    /// job's devices): communication that compute did not hide, and waits for peers' compute.
    #[serde(default)]
    pub exposed_comm_s: f64,
    /// Seconds a device's network writers spent sending (the mean over the job's devices),
    /// while the device went on computing.
    #[serde(default)]
    pub wire_s: f64,
    /// The most nodes other than its own that one token was dispatched to this step (what
    /// node-limited routing bounds when routing groups live on nodes; 0 within one node).
    #[serde(default)]
    pub max_target_nodes: u64,
}

/// What one data-parallel rank holds, in bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryUse {
    /// Weights (FP32 master copy; ZeRO-1 keeps them whole on every rank).
    pub params: u64,
    /// Gradient buffers (whole on every rank).
    pub grads: u64,
    /// Optimizer state (AdamW moments) of the rank's shard.
    pub optimizer: u64,
}

impl MemoryUse {
    /// All of it.
    pub fn total(&self) -> u64 {
        self.params + self.grads + self.optimizer
    }
}

/// A batch as the model reads it.
fn tokens_of(b: &crate::data::Batch) -> TokenBatch<'_> {
    TokenBatch {
        batch: b.batch,
        seq: b.seq_len,
        inputs: &b.inputs,
        targets: &b.targets,
    }
}

/// The mean MTP loss over depths (0 without MTP).
fn mean_mtp(out: &crate::model::StepOutput) -> f64 {
    if out.mtp_losses.is_empty() {
        0.0
    } else {
        out.mtp_losses.iter().sum::<f64>() / out.mtp_losses.len() as f64
    }
}

/// Optimizer and schedule state, everything a checkpoint needs besides the weights.
pub struct Trainer {
    /// One per data-parallel rank of this process; the first one's weights are the model.
    replicas: Vec<Replica>,
    /// The data-parallel rank of each replica.
    ranks: Vec<usize>,
    /// With ranks in other processes: this process's endpoints (kept across steps).
    mesh: Option<Vec<LocalTransport>>,
    /// How the trained parameters are sharded over the devices (ZeRO-1): each group of
    /// parameters used by the same pipeline ranks (and, for routed experts, held at the same
    /// expert-parallel position) over the devices that use it.
    layouts: Vec<ZeroLayout>,
    /// The devices sharing each layout, in shard order.
    members: Vec<Vec<usize>>,
    /// The stages and the step's schedule with pipeline parallelism.
    pipeline: Option<(Vec<StagePart>, StepSchedule)>,
    batcher: Batcher,
    opts: TrainOptions,
    step: u64,
    /// Where the steps run when not on the CPU replicas (see `device.rs`).
    device: Option<Box<dyn device::DeviceStepper>>,
    /// The device has stepped since the host copy (weights, biases, moments) was last brought up
    /// to date ([`Self::sync_device`]).
    host_behind: bool,
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
        Self::new_on(model, batcher, opts, None)
    }

    /// A trainer at step 0 for the data-parallel ranks of `mesh` (endpoints of the ranks that
    /// live in this process, connected to the others, see [`crate::comm::tcp`]); `None`: every
    /// rank here, over in-memory queues. Every process of the mesh must run the same options
    /// and data, and call [`Self::train_step`] and [`Self::save_checkpoint`] at the same steps.
    pub fn new_on(
        model: Model<f32>,
        batcher: Batcher,
        opts: TrainOptions,
        mesh: Option<Vec<LocalTransport>>,
    ) -> Result<Self> {
        opts.validate()?;
        let cfg = opts.adamw();
        if opts.dp > batcher.batch_size() {
            return Err(WorkerError::invalid(
                "dp",
                format!(
                    "{} data-parallel ranks for a batch of {} sequences",
                    opts.dp,
                    batcher.batch_size()
                ),
            ));
        }
        let pipeline = match &opts.pipeline {
            Some(p) => {
                let layers = model.config().num_hidden_layers;
                let schedule_name: Schedule = p.schedule.parse()?;
                let n_stages = schedule_name.stages(p.pp);
                if n_stages > layers {
                    return Err(WorkerError::invalid(
                        "pp",
                        format!(
                            "{} pipeline ranks ({n_stages} stages under {schedule_name}) for a \
                             model of {layers} layers",
                            p.pp
                        ),
                    ));
                }
                let per_rank = batcher.batch_size() / opts.dp;
                if opts.micro_batches > per_rank {
                    return Err(WorkerError::invalid(
                        "micro_batches",
                        format!(
                            "{} micro-batches of a batch of {} sequences per data-parallel rank",
                            opts.micro_batches, per_rank
                        ),
                    ));
                }
                let split = balanced_layers(model.config(), n_stages, batcher.seq_len());
                let stages = StagePart::split(layers, &split)?;
                let schedule = build(schedule_name, p.pp, opts.micro_batches)?;
                Some((stages, schedule))
            }
            None => None,
        };
        let (dp, ep) = (opts.dp, opts.ep);
        let experts = model.config().n_routed_experts;
        if ep > 1 && (experts == 0 || !experts.is_multiple_of(ep)) {
            return Err(WorkerError::invalid(
                "ep",
                format!("{ep} does not divide the model's {experts} routed experts"),
            ));
        }
        // Across processes, each pipeline rank of each data-parallel rank is a device of the
        // mesh: device `s * dp + d` runs pipeline rank `s` of data-parallel rank `d`, and the
        // optimizer state is sharded over the devices that use each parameter.
        let pp = match (&mesh, &pipeline) {
            (Some(_), Some((_, schedule))) => schedule.pp,
            _ => 1,
        };
        let devices = pp * dp;
        let zero::Groups {
            layouts,
            members,
            group_of,
        } = zero::Groups::new(
            model.params(),
            model.config(),
            pipeline.as_ref().filter(|_| pp > 1),
            dp,
            ep,
        );
        let ranks: Vec<usize> = match &mesh {
            None => (0..dp).collect(),
            Some(m) => {
                let ranks: Vec<usize> = m.iter().map(Transport::rank).collect();
                if m.is_empty()
                    || m.iter().any(|t| t.world() != devices)
                    || ranks.windows(2).any(|w| w[0] >= w[1])
                {
                    return Err(WorkerError::invalid(
                        "mesh",
                        format!(
                            "endpoints for ranks {ranks:?} of a mesh of {:?}, expected increasing \
                             ranks of {devices} (pp {pp} x dp {dp})",
                            m.first().map(Transport::world)
                        ),
                    ));
                }
                ranks
            }
        };
        let mut models = vec![model];
        for _ in 1..ranks.len() {
            models.push(models[0].clone());
        }
        let replicas = models
            .into_iter()
            .zip(ranks.iter().copied())
            .map(|(mut m, k)| {
                let mut parts = Vec::new();
                for (li, group) in members.iter().enumerate() {
                    if let Some(member) = group.iter().position(|&j| j == k) {
                        parts.push(Part {
                            layout: li,
                            group: Group {
                                ranks: group.clone(),
                            },
                            member,
                            moments: layouts[li].fresh_moments(member, &cfg),
                        });
                    }
                }
                // What this device does not use (other positions' experts, other stages'
                // layers): not held here.
                let others: Vec<ParamId> = m
                    .params()
                    .iter()
                    .filter(|(_, n, _)| {
                        group_of
                            .get(*n)
                            .is_some_and(|&li| !members[li].contains(&k))
                    })
                    .map(|(id, _, _)| id)
                    .collect();
                for id in others {
                    m.params_mut().release(id);
                }
                Replica {
                    grads: m.params().zero_grads(),
                    parts,
                    model: m,
                    pipe_rank: (pp > 1).then_some(k / dp),
                }
            })
            .collect();
        Ok(Self {
            replicas,
            ranks,
            mesh,
            layouts,
            members,
            pipeline,
            batcher,
            opts,
            step: 0,
            device: None,
            host_behind: false,
        })
    }

    /// Devices of the mesh: one per data-parallel rank, or across processes with pipeline
    /// parallelism one per pipeline rank of each.
    fn devices(&self) -> usize {
        match (&self.mesh, &self.pipeline) {
            (Some(_), Some((_, schedule))) => schedule.pp * self.opts.dp,
            _ => self.opts.dp,
        }
    }

    /// Replica 0's model (every data-parallel replica holds the same weights). With expert
    /// parallelism it holds only its own routed experts (the others are empty): see
    /// [`Self::consolidated_model`].
    ///
    /// With a device attached, the host copy is the device's as of the last
    /// [`Self::sync_device`] (checkpoints sync first): sync before reading weights.
    pub fn model(&self) -> &Model<f32> {
        self.assert_host_current("model");
        &self.replicas[0].model
    }

    /// Every parameter under its Hugging Face name, each routed expert taken from a rank that
    /// holds it.
    pub fn named_f32(&self) -> Vec<(String, Tensor<f32>)> {
        self.assert_host_current("named_f32");
        let mut named = self.replicas[0].model.named_f32();
        let ids: Vec<ParamId> = self.params().iter().map(|(id, _, _)| id).collect();
        for (slot, id) in named.iter_mut().zip(ids) {
            if self.params().holds(id) {
                continue;
            }
            // Another position's expert: from the first replica here that holds it.
            if let Some(rep) = self.replicas.iter().find(|r| r.model.params().holds(id)) {
                slot.1 = rep.model.params().get(id).clone();
            }
        }
        named
    }

    /// The whole model, with every routed expert (a copy when experts are spread over ranks).
    pub fn consolidated_model(&self) -> Result<Model<f32>> {
        let m = self.model();
        let (model, _) = Model::from_named(
            m.config(),
            self.named_f32().into_iter().collect(),
            m.precision(),
            0,
            "trainer",
        )?;
        Ok(model)
    }

    /// Data-parallel replica `r`'s copy of the model (ZeRO-1 keeps the replicas identical).
    pub fn replica(&self, r: usize) -> Option<&Model<f32>> {
        self.assert_host_current("replica");
        self.replicas.get(r).map(|rep| &rep.model)
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

    /// What every device of the job holds, in device order, from all processes (a collective:
    /// every process calls it at the same point); see [`Self::memory_per_rank`].
    pub fn memory_per_device(&mut self) -> Result<Vec<MemoryUse>> {
        let local = self.memory_per_rank();
        if self.mesh.is_none() {
            return Ok(local);
        }
        let devices = self.devices();
        let group = Group {
            ranks: (0..devices).collect(),
        };
        let mine: Vec<(usize, MemoryUse)> = self.ranks.iter().copied().zip(local).collect();
        let tag = crate::comm::transport::Tag {
            step: self.step,
            op: crate::comm::transport::CommOp::AllReduce,
            seq: 1 << 33,
        };
        let mut no_stages: Vec<Vec<LocalTransport>> =
            (0..self.replicas.len()).map(|_| Vec::new()).collect();
        let sums = Self::on_ranks(
            &mut self.replicas,
            self.mesh.as_deref_mut(),
            &self.ranks,
            &mut no_stages,
            |_, t, _| {
                // Each device fills its own three slots; the sum is everyone's.
                let mut v = vec![0u64; 3 * devices];
                if let Some((_, m)) = mine.iter().find(|(k, _)| *k == t.rank()) {
                    let k = t.rank();
                    v[3 * k..3 * k + 3].copy_from_slice(&[m.params, m.grads, m.optimizer]);
                }
                crate::comm::collective::all_reduce_u64(t, &group, tag, &v)
            },
        )?;
        let v = sums.into_iter().next().unwrap_or_default();
        Ok(v.chunks_exact(3)
            .map(|c| MemoryUse {
                params: c[0],
                grads: c[1],
                optimizer: c[2],
            })
            .collect())
    }

    /// What each data-parallel rank (device) of this process holds: its weights and gradients
    /// (without other positions' experts and, across processes, other stages' layers), and the
    /// optimizer state of its shard only (ZeRO-1), measured from the buffers it owns.
    pub fn memory_per_rank(&self) -> Vec<MemoryUse> {
        self.replicas
            .iter()
            .map(|r| {
                let params: usize = r.model.params().iter().map(|(_, _, t)| t.numel()).sum();
                let grads: usize = r.grads.tensors().iter().map(|t| t.numel()).sum();
                let optimizer: usize = r
                    .parts
                    .iter()
                    .flat_map(|p| &p.moments)
                    .map(|st| st.len() * if st.moments.is_bf16() { 4 } else { 8 })
                    .sum();
                MemoryUse {
                    params: params as u64 * 4,
                    grads: grads as u64 * 4,
                    optimizer: optimizer as u64,
                }
            })
            .collect()
    }

    /// The optimizer state of every trained parameter, joined from the shards.
    pub(crate) fn param_moments(&self) -> Result<Vec<(ParamId, AdamWState)>> {
        self.assert_host_current("param_moments");
        let mut all = Vec::new();
        for (li, layout) in self.layouts.iter().enumerate() {
            // The members holding this layout's shards, in shard order.
            let mut members: Vec<(usize, Vec<AdamWState>)> = self
                .replicas
                .iter()
                .flat_map(|r| r.parts.iter())
                .filter(|p| p.layout == li)
                .map(|p| (p.member, p.moments.clone()))
                .collect();
            members.sort_by_key(|(m, _)| *m);
            let per_member: Vec<Vec<AdamWState>> = members.into_iter().map(|(_, m)| m).collect();
            all.extend(layout.assemble(&per_member)?);
        }
        all.sort_by_key(|(id, _)| id.index());
        Ok(all)
    }

    /// Replaces the optimizer state with `whole` (one per trained parameter), cut into shards.
    pub(crate) fn set_param_moments(&mut self, whole: &[(ParamId, AdamWState)]) -> Result<()> {
        let split: Vec<Vec<Vec<AdamWState>>> = self
            .layouts
            .iter()
            .map(|l| l.split(whole))
            .collect::<Result<_>>()?;
        for rep in &mut self.replicas {
            for part in &mut rep.parts {
                part.moments = split[part.layout][part.member].clone();
            }
        }
        Ok(())
    }

    /// The parameters (replica 0's).
    pub(crate) fn params(&self) -> &ParamStore<f32> {
        self.replicas[0].model.params()
    }

    /// Runs `f` for every replica of this process with its endpoint of the step's mesh (the
    /// kept one across processes, else `fresh` over in-memory queues) and its pipeline ranks'
    /// endpoints, each on a thread named after its device (`device-K`). A failing rank
    /// releases the others; the root cause is returned.
    fn on_ranks<R: Send>(
        replicas: &mut [Replica],
        mesh: Option<&mut [LocalTransport]>,
        ranks: &[usize],
        stage_ts: &mut [Vec<LocalTransport>],
        f: impl Fn(&mut Replica, &mut LocalTransport, &mut [LocalTransport]) -> Result<R> + Sync,
    ) -> Result<Vec<R>> {
        let mesh = mesh.ok_or_else(|| WorkerError::invalid("mesh", "no endpoints"))?;
        let run = |rep: &mut Replica, t: &mut LocalTransport, sts: &mut Vec<LocalTransport>| {
            let res = f(rep, t, sts);
            if res.is_err() {
                t.abort();
                for st in sts.iter() {
                    st.abort();
                }
            }
            res
        };
        // Each device on a thread of its own (a track of its own in a trace), even alone.
        let results: Vec<Result<R>> = {
            let dispatch = tracing::dispatcher::get_default(|d| d.clone());
            let parent = tracing::Span::current();
            std::thread::scope(|scope| {
                let handles: Vec<_> = replicas
                    .iter_mut()
                    .zip(mesh.iter_mut())
                    .zip(stage_ts.iter_mut())
                    .map(|((rep, t), sts)| {
                        let (run, dispatch, parent) = (&run, dispatch.clone(), parent.clone());
                        let r = t.rank();
                        std::thread::Builder::new()
                            .name(format!("device-{r}"))
                            .spawn_scoped(scope, move || {
                                tracing::dispatcher::with_default(&dispatch, || {
                                    let _s =
                                        tracing::debug_span!(parent: &parent, "dp_rank", rank = r)
                                            .entered();
                                    run(rep, t, sts)
                                })
                            })
                    })
                    .collect();
                handles
                    .into_iter()
                    .zip(ranks)
                    .map(|(h, r)| match h {
                        Ok(h) => h.join().unwrap_or_else(|_| {
                            Err(WorkerError::invalid(
                                "dp",
                                format!("data-parallel rank {r} panicked"),
                            ))
                        }),
                        Err(e) => Err(WorkerError::invalid(
                            "dp",
                            format!("cannot start data-parallel rank {r}: {e}"),
                        )),
                    })
                    .collect()
            })
        };
        // The root cause: the first error that is not a rank stopping because another failed.
        if results.iter().any(Result::is_err) {
            let mut errs: Vec<WorkerError> = results.into_iter().filter_map(Result::err).collect();
            let root = errs.iter().position(|e| {
                !matches!(e, WorkerError::Comm { reason, .. }
                    if reason.starts_with(crate::comm::transport::PEER_FAILED))
            });
            return Err(errs.swap_remove(root.unwrap_or(0)));
        }
        results.into_iter().collect()
    }

    /// Runs one optimizer step on the next batch.
    pub fn train_step(&mut self) -> Result<StepMetrics> {
        if self.device.is_some() {
            return self.device_train_step();
        }
        let t0 = Instant::now();
        let _span = tracing::debug_span!("step", step = self.step + 1).entered();
        let batch = self.batcher.next_batch();
        let tb = tokens_of(&batch);
        let dp = self.opts.dp;
        let devices = self.devices();
        let group = Group {
            ranks: (0..devices).collect(),
        };
        let lr = self.opts.lr_at(self.step);
        let parts = if dp == 1 {
            vec![(tb, 1.0)]
        } else {
            split_micro(&tb, dp)?
        };
        let plan = StepPlan {
            step: self.step + 1,
            lr,
            obj: self.opts.objective(),
            micro_batches: self.opts.micro_batches,
            adamw: self.opts.adamw(),
            grad_clip: self.opts.grad_clip,
            gamma: self.opts.bias_update_speed as f32,
            pipeline: self.pipeline.as_ref(),
            layouts: &self.layouts,
            group: &group,
            dp,
            ep: self.opts.ep,
            direct_dispatch: self.opts.direct_dispatch,
            timeout: self.opts.comm_timeout(),
            overlap: self.opts.pipeline.as_ref().is_none_or(|p| p.overlap),
        };
        // All ranks here: a mesh of in-memory queues for the step.
        let mut fresh = self
            .mesh
            .is_none()
            .then(|| LocalMesh::new(dp, self.opts.comm_timeout()));
        // Expert parallelism inside pipeline stages: one mesh per pipeline rank, joining that
        // rank of every replica; replica r takes endpoint r of each.
        let mut stage_ts: Vec<Vec<LocalTransport>> =
            (0..self.replicas.len()).map(|_| Vec::new()).collect();
        if let (Some((_, schedule)), true, None) = (&self.pipeline, self.opts.ep > 1, &self.mesh) {
            for _ in 0..schedule.pp {
                for (r, t) in LocalMesh::new(dp, self.opts.comm_timeout())
                    .into_iter()
                    .enumerate()
                {
                    stage_ts[r].push(t);
                }
            }
        }
        // Across processes, each device's bytes are summed over the mesh, so every process
        // reports the whole job's traffic (the sum's own few bytes are left out).
        let across = self.mesh.is_some();
        let mesh = fresh.as_deref_mut().or(self.mesh.as_deref_mut());
        let results = Self::on_ranks(
            &mut self.replicas,
            mesh,
            &self.ranks,
            &mut stage_ts,
            |rep, t, sts| {
                let before = t.bytes().clone();
                let times = |t: &LocalTransport, sts: &[LocalTransport]| {
                    sts.iter().fold(t.times(), |(w, b), st| {
                        let (w2, b2) = st.times();
                        (w + w2, b + b2)
                    })
                };
                let (wait0, wire0) = times(t, sts);
                let (part, share) = &parts[t.rank() % dp];
                let o = rank_step(rep, t, sts, &plan, part, *share)?;
                let mut bytes = t.bytes().since(&before);
                for st in sts.iter() {
                    bytes.merge(st.bytes());
                }
                let (wait1, wire1) = times(t, sts);
                let mut v = bytes.to_vec();
                // Microseconds blocked on peers' frames and of network writing.
                v.push(((wait1 - wait0) * 1e6) as u64);
                v.push(((wire1 - wire0) * 1e6) as u64);
                // Each device's most target nodes per token, in its own slot (a sum of one-hot
                // slots is a gather).
                let mut most = vec![0u64; devices];
                if let Some(slot) = most.get_mut(t.rank()) {
                    *slot = o.max_target_nodes;
                }
                v.extend(most);
                if across {
                    let tag = crate::comm::transport::Tag {
                        step: plan.step,
                        op: crate::comm::transport::CommOp::AllReduce,
                        seq: 3,
                    };
                    v = crate::comm::collective::all_reduce_u64(t, &group, tag, &v)?;
                }
                Ok((o, v, wait1 - wait0))
            },
        )?;
        let mut comm = ByteCounts::default();
        let mut bytes_sent = 0;
        let (mut wait_us, mut wire_us, mut max_nodes) = (0u64, 0u64, 0u64);
        // This process's least-waiting device: the busiest.
        let own_wait = results
            .iter()
            .map(|(_, _, w)| *w)
            .fold(f64::INFINITY, f64::min);
        for (i, (o, v, _)) in results.iter().enumerate() {
            bytes_sent += o.pipeline_bytes;
            // Summed over the mesh already: the first device's sum is the job's.
            if !across || i == 0 {
                let n = v.len() - devices;
                comm.merge(&ByteCounts::from_vec(&v[..n - 2]));
                wait_us += v[n - 2];
                wire_us += v[n - 1];
                max_nodes = max_nodes.max(v[n..].iter().copied().max().unwrap_or(0));
            }
        }
        let bubble_s =
            results.iter().map(|(o, _, _)| o.bubble_s).sum::<f64>() / results.len().max(1) as f64;
        let Some((first, _, _)) = results.into_iter().next() else {
            return Err(WorkerError::invalid("dp", "no rank ran"));
        };
        let (out, grad_norm) = (first.out, first.grad_norm);
        let seconds = t0.elapsed().as_secs_f64();

        self.step += 1;
        let mtp = mean_mtp(&out);
        Ok(StepMetrics {
            step: self.step,
            loss: out.loss,
            main_loss: out.main_loss,
            mtp_loss: mtp,
            balance_loss: out.balance_loss,
            grad_norm,
            lr,
            max_vio: out.expert_loads.iter().map(|l| max_violation(l)).collect(),
            expert_loads: out.expert_loads.clone(),
            bubble_s,
            tokens: out.tokens,
            seconds,
            busy_s: (seconds - own_wait.min(seconds)).max(0.0),
            bytes_sent,
            comm,
            exposed_comm_s: wait_us as f64 / 1e6 / devices as f64,
            max_target_nodes: max_nodes,
            wire_s: wire_us as f64 / 1e6 / devices as f64,
        })
    }
}
