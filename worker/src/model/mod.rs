//! The DeepSeek-V3 model: embedding, MLA + dense/MoE blocks, final norm and output head, and
//! Multi-Token Prediction modules, with explicit forward, B and W passes.
//!
//! Precision: in `bf16` and `fp8` modes every Linear of attention and the MLPs/experts runs in
//! that precision; the embedding, the output head, the router, the norms and the attention core
//! stay in FP32 (the report's Figure 6 and section 3.3.1).

mod block;
mod ctx;
pub mod device;
pub mod ep;
pub mod linear;
mod mla;
mod mlp;
mod moe;
mod moe_ep;
pub mod params;
pub mod rope;
pub mod stage;
pub mod tensor_ops;
pub mod wgrad;

use shoal_kernels::Tensor;
use shoal_kernels::ops::linear::Precision;
use shoal_kernels::ops::rope::{RopeLayout, RopeTable};
use shoal_spec::ModelConfig;

pub use self::block::Block;
pub use self::ctx::Ctx;
use self::ep::ExpertExchange;
pub use self::linear::ModelFloat;
pub use self::moe::MoeStats;
use self::params::{Grads, Init, Layout, ParamId, ParamStore, Trainable};
pub use self::stage::{StagePart, StageSaved, StageStats};
use self::wgrad::WTask;
use crate::{Result, WorkerError};

/// Loss weights of the training objective.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Objective {
    /// MTP weight lambda: the MTP losses enter as `lambda / D * sum_k L_k`.
    pub mtp_lambda: f64,
    /// Sequence-wise balance-loss weight alpha.
    pub balance_alpha: f64,
    /// Multiplies every gradient: the pass differentiates `loss_scale * loss` (a micro-batch's
    /// share of its step). The reported losses are not scaled.
    pub loss_scale: f64,
}

impl Default for Objective {
    fn default() -> Self {
        Self {
            mtp_lambda: 0.3,
            balance_alpha: 1e-4,
            loss_scale: 1.0,
        }
    }
}

/// One Multi-Token Prediction module (depth k): `h' = eh_proj([enorm(emb(t_{i+k})); hnorm(h_{k-1})])`,
/// then one transformer block, then `shared_head.norm` and the shared output head.
#[derive(Clone, Debug)]
struct Mtp {
    enorm: ParamId,
    hnorm: ParamId,
    eh_proj: ParamId,
    block: Block,
    head_norm: ParamId,
}

/// The model: its configuration, parameters and structure.
#[derive(Clone, Debug)]
pub struct Model<T> {
    cfg: ModelConfig,
    params: ParamStore<T>,
    embed: ParamId,
    blocks: Vec<Block>,
    norm: ParamId,
    head: ParamId,
    mtp: Vec<Mtp>,
    rope: RopeTable,
    softmax_scale: f64,
    precision: Precision,
}

/// Losses and routing statistics of one forward pass.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutput {
    /// `main + lambda/D * sum(mtp) + alpha * sum(balance)`: the objective that was differentiated.
    pub loss: f64,
    /// Mean next-token cross-entropy of the main head.
    pub main_loss: f64,
    /// Mean cross-entropy of each MTP depth.
    pub mtp_losses: Vec<f64>,
    /// Sum over MoE layers of the sequence-wise balance loss (before alpha).
    pub balance_loss: f64,
    /// Tokens routed to each expert, per MoE layer (main layers, then MTP modules).
    pub expert_loads: Vec<Vec<usize>>,
    /// Predicted tokens of the main head.
    pub tokens: usize,
}

impl StepOutput {
    /// Nothing yet, for a model with `mtp_depth` MTP modules: the start of [`Self::accumulate`].
    pub fn zero(mtp_depth: usize) -> Self {
        Self {
            loss: 0.0,
            main_loss: 0.0,
            mtp_losses: vec![0.0; mtp_depth],
            balance_loss: 0.0,
            expert_loads: Vec::new(),
            tokens: 0,
        }
    }

    /// Adds a micro-batch's output: losses weighted by its `share` of the batch, expert loads
    /// and tokens summed. Accumulating micro-batches in index order gives the batch's output.
    pub fn accumulate(&mut self, o: StepOutput, share: f64) {
        self.loss += share * o.loss;
        self.main_loss += share * o.main_loss;
        for (a, m) in self.mtp_losses.iter_mut().zip(&o.mtp_losses) {
            *a += share * m;
        }
        self.balance_loss += share * o.balance_loss;
        if self.expert_loads.is_empty() {
            self.expert_loads = o.expert_loads;
        } else {
            for (acc, l) in self.expert_loads.iter_mut().zip(&o.expert_loads) {
                for (a, v) in acc.iter_mut().zip(l) {
                    *a += v;
                }
            }
        }
        self.tokens += o.tokens;
    }
}

/// The micro-batches of a batch: its sequences split as evenly as possible, in order, each with
/// its share of the batch (`sequences / batch`).
pub fn split_micro<'a>(b: &TokenBatch<'a>, micro: usize) -> Result<Vec<(TokenBatch<'a>, f64)>> {
    if micro == 0 || micro > b.batch {
        return Err(WorkerError::invalid(
            "micro_batches",
            format!(
                "must be 1 to the batch's {} sequences, got {micro}",
                b.batch
            ),
        ));
    }
    Ok((0..micro)
        .map(|i| {
            let lo = i * b.batch / micro;
            let hi = (i + 1) * b.batch / micro;
            let range = lo * b.seq..hi * b.seq;
            let part = TokenBatch {
                batch: hi - lo,
                seq: b.seq,
                inputs: &b.inputs[range.clone()],
                targets: &b.targets[range],
            };
            (part, (hi - lo) as f64 / b.batch as f64)
        })
        .collect())
}

/// What [`Model::from_named`] did besides loading tensors.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadReport {
    /// Parameters the source did not have, initialised fresh (MTP modules only).
    pub initialized: Vec<String>,
    /// Tensors the source had that the model does not use.
    pub ignored: Vec<String>,
}

/// A micro-batch of token ids: `inputs` and `targets` are `[batch, seq]`, row-major.
#[derive(Clone, Copy, Debug)]
pub struct TokenBatch<'a> {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Input ids.
    pub inputs: &'a [u32],
    /// Target ids (the inputs shifted by one).
    pub targets: &'a [u32],
}

impl<T: ModelFloat> Model<T> {
    /// A freshly initialised model (normal(0, initializer_range) matrices, unit norms, zero
    /// expert biases), deterministic in `seed`.
    pub fn new(cfg: &ModelConfig, precision: Precision, seed: u64) -> Result<Self> {
        cfg.validate("model")?;
        let (layout, parts) = Self::declare(cfg);
        let params = ParamStore::init(layout, seed)?;
        Self::assemble(cfg, params, parts, precision)
    }

    /// A model from existing parameters (a loaded checkpoint), checked against `cfg`'s layout.
    pub fn from_params(
        cfg: &ModelConfig,
        params: ParamStore<T>,
        precision: Precision,
    ) -> Result<Self> {
        let (_, parts) = Self::declare(cfg);
        Self::assemble(cfg, params, parts, precision)
    }

    /// A model whose parameters come from `tensors` (Hugging Face names), checked against `cfg`.
    ///
    /// Every main-model tensor must be present with its exact shape (errors name the tensor).
    /// MTP modules may be absent as a whole (`transformers` does not implement them and saves
    /// none): they are then initialised from `seed` and listed in the report. Tensors the model
    /// does not use (for example the MTP copies of the embedding and head in DeepSeek's release)
    /// are listed as ignored.
    pub fn from_named(
        cfg: &ModelConfig,
        mut tensors: std::collections::BTreeMap<String, Tensor<f32>>,
        precision: Precision,
        seed: u64,
        source: &str,
    ) -> Result<(Self, LoadReport)> {
        cfg.validate(source)?;
        let (layout, parts) = Self::declare(cfg);
        let mut params = ParamStore::<T>::init(layout, seed)?;
        let mtp_prefixes: Vec<String> = (0..cfg.num_nextn_predict_layers)
            .map(|k| format!("model.layers.{}.", cfg.num_hidden_layers + k))
            .collect();
        let is_mtp = |name: &str| mtp_prefixes.iter().any(|p| name.starts_with(p.as_str()));
        let ids: Vec<(ParamId, String)> = params
            .iter()
            .map(|(id, n, _)| (id, n.to_string()))
            .collect();
        let mtp_present = ids
            .iter()
            .any(|(_, n)| is_mtp(n) && tensors.contains_key(n));
        let mut report = LoadReport::default();
        for (id, name) in ids {
            match tensors.remove(&name) {
                Some(t) => {
                    let expected = params.get(id).shape().to_vec();
                    if t.shape() != expected.as_slice() {
                        return Err(WorkerError::checkpoint(
                            source,
                            format!(
                                "tensor {name}: expected shape {expected:?}, got {:?}",
                                t.shape()
                            ),
                        ));
                    }
                    params.set(id, t.cast::<T>())?;
                }
                None if is_mtp(&name) && !mtp_present => report.initialized.push(name),
                None => {
                    return Err(WorkerError::checkpoint(
                        source,
                        format!("missing tensor {name}"),
                    ));
                }
            }
        }
        report.ignored = tensors.into_keys().collect();
        Ok((Self::assemble(cfg, params, parts, precision)?, report))
    }

    /// `(name, tensor)` of every parameter in FP32, for checkpoints.
    pub fn named_f32(&self) -> Vec<(String, Tensor<f32>)> {
        self.params
            .iter()
            .map(|(_, n, t)| (n.to_string(), t.cast::<f32>()))
            .collect()
    }

    /// The parameter layout of `cfg` (names, shapes, initialisers) without allocating anything.
    pub fn layout(cfg: &ModelConfig) -> Layout {
        Self::declare(cfg).0
    }

    #[allow(clippy::type_complexity)]
    fn declare(cfg: &ModelConfig) -> (Layout, (ParamId, Vec<Block>, ParamId, ParamId, Vec<Mtp>)) {
        let mut l = Layout::default();
        let h = cfg.hidden_size;
        let embed = l.add(
            "model.embed_tokens.weight".into(),
            vec![cfg.vocab_size, h],
            Init::Normal(cfg.initializer_range),
            Trainable::Yes,
        );
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| {
                Block::declare(
                    &mut l,
                    &format!("model.layers.{i}"),
                    cfg,
                    cfg.is_moe_layer(i),
                )
            })
            .collect();
        let norm = l.add(
            "model.norm.weight".into(),
            vec![h],
            Init::Ones,
            Trainable::Yes,
        );
        let head = l.add(
            "lm_head.weight".into(),
            vec![cfg.vocab_size, h],
            Init::Normal(cfg.initializer_range),
            Trainable::Yes,
        );
        let mtp = (0..cfg.num_nextn_predict_layers)
            .map(|k| {
                let prefix = format!("model.layers.{}", cfg.num_hidden_layers + k);
                let enorm = l.add(
                    format!("{prefix}.enorm.weight"),
                    vec![h],
                    Init::Ones,
                    Trainable::Yes,
                );
                let hnorm = l.add(
                    format!("{prefix}.hnorm.weight"),
                    vec![h],
                    Init::Ones,
                    Trainable::Yes,
                );
                let eh_proj = l.add(
                    format!("{prefix}.eh_proj.weight"),
                    vec![h, 2 * h],
                    Init::Normal(cfg.initializer_range),
                    Trainable::Yes,
                );
                let block = Block::declare(&mut l, &prefix, cfg, cfg.has_moe_layers());
                let head_norm = l.add(
                    format!("{prefix}.shared_head.norm.weight"),
                    vec![h],
                    Init::Ones,
                    Trainable::Yes,
                );
                Mtp {
                    enorm,
                    hnorm,
                    eh_proj,
                    block,
                    head_norm,
                }
            })
            .collect();
        (l, (embed, blocks, norm, head, mtp))
    }

    fn assemble(
        cfg: &ModelConfig,
        params: ParamStore<T>,
        (embed, blocks, norm, head, mtp): (ParamId, Vec<Block>, ParamId, ParamId, Vec<Mtp>),
        precision: Precision,
    ) -> Result<Self> {
        let rope = rope::table(cfg, cfg.max_position_embeddings.min(1 << 16))?;
        Ok(Self {
            cfg: cfg.clone(),
            params,
            embed,
            blocks,
            norm,
            head,
            mtp,
            rope,
            softmax_scale: rope::softmax_scale(cfg),
            precision,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The parameters.
    pub fn params(&self) -> &ParamStore<T> {
        &self.params
    }

    /// The parameters, mutably (the optimizer updates them).
    pub fn params_mut(&mut self) -> &mut ParamStore<T> {
        &mut self.params
    }

    /// The precision mode.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The weights whose linear layers run in the model's precision: every matrix but the
    /// embedding, the output head and the MoE routers (which stay FP32, as the report keeps them).
    pub fn mixed_precision_weights(&self) -> Vec<ParamId> {
        let routers: Vec<ParamId> = self
            .blocks
            .iter()
            .chain(self.mtp.iter().map(|m| &m.block))
            .filter_map(|b| b.moe().map(|m| m.router))
            .collect();
        self.params
            .iter()
            .filter(|(id, _, t)| {
                t.shape().len() == 2
                    && *id != self.embed
                    && *id != self.head
                    && !routers.contains(id)
            })
            .map(|(id, _, _)| id)
            .collect()
    }

    /// The expert-bias parameters of every MoE layer, in the order of `StepOutput::expert_loads`.
    pub fn expert_biases(&self) -> Vec<ParamId> {
        self.blocks
            .iter()
            .chain(self.mtp.iter().map(|m| &m.block))
            .filter_map(|b| b.moe().map(|m| m.bias()))
            .collect()
    }

    fn ctx(&self, batch: usize, seq: usize, alpha: f64) -> Ctx<'_> {
        Ctx {
            batch,
            seq,
            precision: self.precision,
            rope: &self.rope,
            rope_layout: if self.cfg.rope_interleave {
                RopeLayout::Interleaved
            } else {
                RopeLayout::HalfSplit
            },
            softmax_scale: self.softmax_scale,
            eps: self.cfg.rms_norm_eps,
            experts: None,
            balance_alpha: alpha,
        }
    }

    fn check_batch(&self, b: &TokenBatch<'_>) -> Result<()> {
        let n = b.batch * b.seq;
        if b.batch == 0 || b.seq == 0 {
            return Err(WorkerError::invalid(
                "batch",
                "batch and sequence length must be at least 1",
            ));
        }
        if b.inputs.len() != n || b.targets.len() != n {
            return Err(WorkerError::invalid(
                "batch",
                format!(
                    "{} inputs and {} targets for {}x{} tokens",
                    b.inputs.len(),
                    b.targets.len(),
                    b.batch,
                    b.seq
                ),
            ));
        }
        if b.seq > self.rope.max_positions() {
            return Err(WorkerError::invalid(
                "seq_len",
                format!(
                    "{} exceeds the model's {} positions",
                    b.seq,
                    self.rope.max_positions()
                ),
            ));
        }
        if !self.mtp.is_empty() && b.seq <= self.mtp.len() {
            return Err(WorkerError::invalid(
                "seq_len",
                format!(
                    "must exceed the MTP depth {}, got {}",
                    self.mtp.len(),
                    b.seq
                ),
            ));
        }
        Ok(())
    }

    /// Losses of a forward pass only (no gradients).
    pub fn evaluate(&self, b: &TokenBatch<'_>, obj: &Objective) -> Result<StepOutput> {
        let part = StagePart::whole(self.blocks.len());
        let (_, _, stats) = self.stage_forward(&part, b, None, obj, None)?;
        stage::step_output(&[stats], obj, self.mtp.len())
    }

    /// Forward and B passes of a micro-batch; returns the losses and the deferred W work.
    pub fn forward_backward_input(
        &self,
        b: &TokenBatch<'_>,
        obj: &Objective,
    ) -> Result<(StepOutput, Vec<WTask<T>>)> {
        self.forward_backward_input_with(b, obj, None)
    }

    fn forward_backward_input_with(
        &self,
        b: &TokenBatch<'_>,
        obj: &Objective,
        experts: Option<&dyn ExpertExchange>,
    ) -> Result<(StepOutput, Vec<WTask<T>>)> {
        let part = StagePart::whole(self.blocks.len());
        let (_, saved, stats) = {
            let _span = tracing::debug_span!("forward").entered();
            self.stage_forward(&part, b, None, obj, experts)?
        };
        let out = stage::step_output(&[stats], obj, self.mtp.len())?;
        let _span = tracing::debug_span!("backward").entered();
        let mut w = Vec::new();
        self.stage_backward(&part, b, saved, None, obj, experts, &mut w)?;
        Ok((out, w))
    }

    /// [`Model::forward_backward_micro`] with expert parallelism: this rank computes its routed
    /// experts for every member of its group through `experts`. The micro-batches run one after
    /// another on the calling thread (every member must meet the others' exchanges in the same
    /// order), with the same shares, sums and W order as the concurrent version.
    pub fn forward_backward_ep(
        &self,
        b: &TokenBatch<'_>,
        obj: &Objective,
        micro: usize,
        grads: &mut Grads<T>,
        experts: &dyn ExpertExchange,
    ) -> Result<StepOutput> {
        self.check_batch(b)?;
        let micro = micro.clamp(1, b.batch);
        let parts = split_micro(b, micro)?;
        let mut tasks = Vec::new();
        let mut out = StepOutput::zero(self.mtp.len());
        for (part, share) in &parts {
            let _span = tracing::debug_span!("micro_batch").entered();
            let o = Objective {
                loss_scale: obj.loss_scale * share,
                ..*obj
            };
            let (mo, w) = self.forward_backward_input_with(part, &o, Some(experts))?;
            if micro == 1 {
                out = mo;
            } else {
                out.accumulate(mo, *share);
            }
            tasks.extend(w);
        }
        let _span = tracing::debug_span!("wgrad").entered();
        wgrad::run_all(tasks, grads)?;
        Ok(out)
    }

    /// B pass of `norm -> output head` (the head stays FP32): returns the gradient of the
    /// pre-norm hidden state `h` and queues the W work.
    fn head_backward(
        &self,
        dlogits: Tensor<T>,
        hn: Tensor<T>,
        h: Tensor<T>,
        norm: ParamId,
        eps: f64,
        w: &mut Vec<WTask<T>>,
    ) -> Result<Tensor<T>> {
        let p = &self.params;
        let dhn = wgrad::linear_b(
            p,
            self.head,
            dlogits,
            linear::Saved::Full(std::sync::Arc::new(hn)),
            Precision::Fp32,
            w,
        )?;
        wgrad::rmsnorm_b(p.get(norm), norm, dhn, h, eps, w)
    }

    /// Forward, B and W passes: accumulates the gradients of the objective into `grads`.
    pub fn forward_backward(
        &self,
        b: &TokenBatch<'_>,
        obj: &Objective,
        grads: &mut Grads<T>,
    ) -> Result<StepOutput> {
        let (out, w) = self.forward_backward_input(b, obj)?;
        let _span = tracing::debug_span!("wgrad").entered();
        wgrad::run_all(w, grads)?;
        Ok(out)
    }

    /// [`Model::forward_backward`] over `micro` micro-batches of the batch's sequences (as even
    /// as possible, in order), computed concurrently. Each micro-batch's gradients carry its
    /// share of the batch (`sequences / batch`), so together they are the gradients of the whole
    /// batch's objective; its W work runs after all of them, micro-batch by micro-batch for each
    /// parameter. Losses are the sequence-weighted means and expert loads the sums, as for one
    /// pass over the whole batch.
    pub fn forward_backward_micro(
        &self,
        b: &TokenBatch<'_>,
        obj: &Objective,
        micro: usize,
        grads: &mut Grads<T>,
    ) -> Result<StepOutput> {
        use rayon::prelude::*;
        self.check_batch(b)?;
        let micro = micro.clamp(1, b.batch);
        if micro == 1 {
            return self.forward_backward(b, obj, grads);
        }
        let parts = split_micro(b, micro)?;
        // The micro-batches run on rayon's threads: carry the caller's tracing subscriber and
        // span over, so their phases are traced as children of the step.
        let dispatch = tracing::dispatcher::get_default(|d| d.clone());
        let parent = tracing::Span::current();
        let results = parts
            .par_iter()
            .with_max_len(1)
            .map(|(part, share)| {
                tracing::dispatcher::with_default(&dispatch, || {
                    let _span = tracing::debug_span!(parent: &parent, "micro_batch").entered();
                    let o = Objective {
                        loss_scale: obj.loss_scale * share,
                        ..*obj
                    };
                    self.forward_backward_input(part, &o)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut tasks = Vec::new();
        let mut out = StepOutput::zero(self.mtp.len());
        for ((o, w), (_, share)) in results.into_iter().zip(&parts) {
            out.accumulate(o, *share);
            tasks.extend(w);
        }
        let _span = tracing::debug_span!("wgrad").entered();
        wgrad::run_all(tasks, grads)?;
        Ok(out)
    }
}
