//! Pipeline stages: the model cut into consecutive parts, each run forward and backward on its
//! own, passing the residual stream (forward) and its gradient (backward) to its neighbours.
//!
//! The first stage embeds the tokens; the last one holds the final norm, the output head and the
//! Multi-Token Prediction modules (which read the embedding table and the micro-batch's tokens).
//! The whole model is one stage with both ends: [`Model::evaluate`] and
//! [`Model::forward_backward_input`] run exactly this code, so a pipelined step computes the
//! same numbers.

use std::ops::Range;

use shoal_kernels::Tensor;
use shoal_kernels::ops::cross_entropy::{
    CrossEntropy, cross_entropy_backward_in_place, cross_entropy_forward,
};
use shoal_kernels::ops::embedding::embedding_forward;
use shoal_kernels::ops::linear::Precision;
use shoal_kernels::ops::rmsnorm::rmsnorm_forward;

use super::Ctx;
use super::block::BlockSaved;
use super::ep::ExpertExchange;
use super::linear::ModelFloat;
use super::tensor_ops::{join_groups, pad_prefix_rows, split_groups, take_prefix_rows};
use super::wgrad::{self, WTask};
use super::{Model, Objective, TokenBatch};
use crate::{Result, WorkerError};

/// Which part of the model a pipeline stage runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagePart {
    /// The main-model layers, in order.
    pub blocks: Range<usize>,
    /// Whether the stage embeds the tokens (the first stage).
    pub embed: bool,
    /// Whether the stage holds the final norm, the output head and the MTP modules (the last).
    pub head: bool,
}

impl StagePart {
    /// MoE layers the stage runs: its main-model MoE layers, then (on the last stage) the MTP
    /// modules' when the model has MoE layers.
    pub fn moe_layers(&self, cfg: &shoal_spec::model::ModelConfig) -> usize {
        let main = self.blocks.clone().filter(|&i| cfg.is_moe_layer(i)).count();
        let mtp = if self.head && cfg.has_moe_layers() {
            cfg.num_nextn_predict_layers
        } else {
            0
        };
        main + mtp
    }

    /// Whether the stage reads the parameter `name` (a Hugging Face name): its blocks' layers,
    /// the embedding on the first stage (and the last, whose MTP modules embed too), the final
    /// norm, the head and the MTP modules on the last. An unknown name counts as read.
    pub fn holds(&self, name: &str, cfg: &shoal_spec::model::ModelConfig) -> bool {
        let mtp = cfg.num_nextn_predict_layers > 0;
        match name {
            "model.embed_tokens.weight" => self.embed || (self.head && mtp),
            "model.norm.weight" | "lm_head.weight" => self.head,
            _ => match name
                .strip_prefix("model.layers.")
                .and_then(|r| r.split('.').next())
                .and_then(|i| i.parse::<usize>().ok())
            {
                Some(i) if i < cfg.num_hidden_layers => self.blocks.contains(&i),
                Some(_) => self.head,
                None => true,
            },
        }
    }

    /// The whole model as one stage.
    pub fn whole(layers: usize) -> Self {
        Self {
            blocks: 0..layers,
            embed: true,
            head: true,
        }
    }

    /// Consecutive stages of `layers_per_stage[i]` layers each (the sum must be the model's
    /// layer count).
    pub fn split(layers: usize, layers_per_stage: &[usize]) -> Result<Vec<Self>> {
        let total: usize = layers_per_stage.iter().sum();
        if layers_per_stage.contains(&0) {
            return Err(WorkerError::invalid(
                "stages",
                format!("{layers_per_stage:?}: every stage needs at least one layer"),
            ));
        }
        if layers_per_stage.is_empty() || total != layers {
            return Err(WorkerError::invalid(
                "stages",
                format!(
                    "{layers_per_stage:?} layers per stage do not add up to the model's {layers}"
                ),
            ));
        }
        let n = layers_per_stage.len();
        let mut at = 0;
        Ok(layers_per_stage
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                let part = Self {
                    blocks: at..at + l,
                    embed: i == 0,
                    head: i + 1 == n,
                };
                at += l;
                part
            })
            .collect())
    }
}

/// What a stage's forward measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StageStats {
    /// The balance loss of each of the stage's MoE layers (main layers, then MTP modules).
    pub balance: Vec<f64>,
    /// Tokens routed to each expert, per MoE layer of the stage, in the same order.
    pub loads: Vec<Vec<usize>>,
    /// The last stage's losses.
    pub head: Option<HeadLosses>,
}

/// The losses the last stage computes.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadLosses {
    /// Mean next-token cross-entropy of the main head.
    pub main: f64,
    /// Mean cross-entropy of each MTP depth.
    pub mtp: Vec<f64>,
    /// Predicted tokens of the main head.
    pub tokens: usize,
}

struct MtpSaved<T> {
    prev_len: usize,
    len: usize,
    ids: Vec<u32>,
    e: Tensor<T>,
    prev: Tensor<T>,
    cat: Tensor<T>,
    block: BlockSaved<T>,
    out: Tensor<T>,
    hn: Tensor<T>,
    targets: Vec<u32>,
    ce: CrossEntropy<T>,
    logits: Tensor<T>,
}

struct HeadSaved<T> {
    h: Tensor<T>,
    hn: Tensor<T>,
    logits: Tensor<T>,
    ce: CrossEntropy<T>,
    mtp: Vec<MtpSaved<T>>,
}

/// What a stage's forward keeps for its backward.
pub struct StageSaved<T> {
    blocks: Vec<BlockSaved<T>>,
    head: Option<HeadSaved<T>>,
}

impl<T: ModelFloat> Model<T> {
    /// Forward of `part` on micro-batch `b`: from the token ids on the first stage, otherwise
    /// from `input`, the previous stage's output. Returns the residual stream for the next stage
    /// (`None` on the last), what the backward needs, and the stage's statistics.
    pub fn stage_forward(
        &self,
        part: &StagePart,
        b: &TokenBatch<'_>,
        input: Option<Tensor<T>>,
        obj: &Objective,
        experts: Option<&dyn ExpertExchange>,
    ) -> Result<(Option<Tensor<T>>, StageSaved<T>, StageStats)> {
        crate::fault::point("forward");
        self.check_batch(b)?;
        self.check_part(part)?;
        let p = &self.params;
        let ctx = Ctx {
            experts,
            ..self.ctx(b.batch, b.seq, obj.balance_alpha)
        };
        let mut h = match (part.embed, input) {
            (true, None) => embedding_forward(p.get(self.embed), b.inputs)?,
            (false, Some(h)) => h,
            (true, Some(_)) => {
                return Err(WorkerError::invalid(
                    "stage",
                    "the first stage embeds its tokens and takes no input",
                ));
            }
            (false, None) => {
                return Err(WorkerError::invalid(
                    "stage",
                    "a stage after the first needs the previous stage's output",
                ));
            }
        };
        let mut stats = StageStats::default();
        let mut saved = Vec::with_capacity(part.blocks.len());
        for layer in part.blocks.clone() {
            let _span = tracing::debug_span!("block.forward", layer).entered();
            let (h2, s, st) = self.blocks[layer].forward(p, h, &ctx)?;
            if let Some(st) = st {
                stats.balance.push(st.balance);
                stats.loads.push(st.load);
            }
            saved.push(s);
            h = h2;
        }
        if !part.head {
            return Ok((
                Some(h),
                StageSaved {
                    blocks: saved,
                    head: None,
                },
                stats,
            ));
        }
        let head_span = tracing::debug_span!("head.forward").entered();
        let hn = rmsnorm_forward(&h, p.get(self.norm), ctx.eps)?;
        let logits = T::linear(&hn, p, self.head, Precision::Fp32)?;
        let ce = cross_entropy_forward(&logits, b.targets, None)?;
        drop(head_span);

        // Multi-Token Prediction: depth k sees sequences shortened by k.
        let mut mtp = Vec::with_capacity(self.mtp.len());
        let mut prev = h.clone();
        let mut prev_len = b.seq;
        let mut mtp_losses = Vec::new();
        for (k, m) in self.mtp.iter().enumerate() {
            let _span = tracing::debug_span!("mtp.forward", depth = k + 1).entered();
            let depth = k + 1;
            let len = b.seq - depth;
            let pick = |src: &[u32]| -> Vec<u32> {
                (0..b.batch)
                    .flat_map(|s| src[s * b.seq + depth..(s + 1) * b.seq].iter().copied())
                    .collect()
            };
            let ids = pick(b.inputs);
            let targets = pick(b.targets);
            let prev_k = take_prefix_rows(&prev, prev_len, len)?;
            let e = embedding_forward(p.get(self.embed), &ids)?;
            let en = rmsnorm_forward(&e, p.get(m.enorm), ctx.eps)?;
            let pn = rmsnorm_forward(&prev_k, p.get(m.hnorm), ctx.eps)?;
            let cat = join_groups(&[&en, &pn], 1)?;
            let hk = T::linear(&cat, p, m.eh_proj, self.precision)?;
            let mctx = ctx.with_seq(len);
            let (out, bs, st) = m.block.forward(p, hk, &mctx)?;
            if let Some(st) = st {
                stats.balance.push(st.balance);
                stats.loads.push(st.load);
            }
            let hn_k = rmsnorm_forward(&out, p.get(m.head_norm), ctx.eps)?;
            let logits_k = T::linear(&hn_k, p, self.head, Precision::Fp32)?;
            let ce_k = cross_entropy_forward(&logits_k, &targets, None)?;
            mtp_losses.push(ce_k.loss);
            prev = out.clone();
            mtp.push(MtpSaved {
                prev_len,
                len,
                ids,
                e,
                prev: prev_k,
                cat,
                block: bs,
                out,
                hn: hn_k,
                targets,
                ce: ce_k,
                logits: logits_k,
            });
            prev_len = len;
        }
        stats.head = Some(HeadLosses {
            main: ce.loss,
            mtp: mtp_losses,
            tokens: ce.count,
        });
        Ok((
            None,
            StageSaved {
                blocks: saved,
                head: Some(HeadSaved {
                    h,
                    hn,
                    logits,
                    ce,
                    mtp,
                }),
            },
            stats,
        ))
    }

    /// B pass of `part` on micro-batch `b`: from the gradient of the stage's output (`dout`, the
    /// next stage's input gradient; `None` on the last stage, which starts from its losses).
    /// Returns the gradient of the stage's input (`None` on the first stage) and pushes the W
    /// work onto `w`.
    #[allow(clippy::too_many_arguments)]
    pub fn stage_backward(
        &self,
        part: &StagePart,
        b: &TokenBatch<'_>,
        saved: StageSaved<T>,
        dout: Option<Tensor<T>>,
        obj: &Objective,
        experts: Option<&dyn ExpertExchange>,
        w: &mut Vec<WTask<T>>,
    ) -> Result<Option<Tensor<T>>> {
        crate::fault::point("backward");
        self.check_part(part)?;
        if saved.blocks.len() != part.blocks.len() || saved.head.is_some() != part.head {
            return Err(WorkerError::invalid(
                "stage",
                "the saved state is not this stage's",
            ));
        }
        let p = &self.params;
        // The backward pass differentiates `loss_scale * loss`: every upstream gradient carries
        // the scale (the balance loss through its weight in `ctx`).
        let ctx = Ctx {
            experts,
            ..self.ctx(b.batch, b.seq, obj.balance_alpha * obj.loss_scale)
        };
        let mut dh = match (saved.head, dout) {
            (Some(head), None) => self.head_backward_all(head, b, obj, &ctx, w)?,
            (None, Some(d)) => d,
            (Some(_), Some(_)) => {
                return Err(WorkerError::invalid(
                    "stage",
                    "the last stage starts its backward from its losses and takes no gradient",
                ));
            }
            (None, None) => {
                return Err(WorkerError::invalid(
                    "stage",
                    "a stage before the last needs the next stage's input gradient",
                ));
            }
        };
        for (layer, s) in part.blocks.clone().zip(saved.blocks).rev() {
            let _span = tracing::debug_span!("block.backward", layer).entered();
            dh = self.blocks[layer].backward(p, s, dh, &ctx, w)?;
        }
        if part.embed {
            w.push(WTask::Embedding {
                param: self.embed,
                dy: dh,
                ids: b.inputs.to_vec(),
            });
            Ok(None)
        } else {
            Ok(Some(dh))
        }
    }

    /// B pass of the MTP modules (deepest first) and the main head: the gradient of the last
    /// block's output.
    fn head_backward_all(
        &self,
        f: HeadSaved<T>,
        b: &TokenBatch<'_>,
        obj: &Objective,
        ctx: &super::Ctx<'_>,
        w: &mut Vec<WTask<T>>,
    ) -> Result<Tensor<T>> {
        let p = &self.params;
        let d = self.mtp.len().max(1) as f64;
        // Each MTP depth passes a gradient to the previous depth's states.
        let mut dprev: Option<Tensor<T>> = None;
        for (m, s) in self.mtp.iter().zip(f.mtp).rev() {
            let _span = tracing::debug_span!("mtp.backward").entered();
            let dlogits = cross_entropy_backward_in_place(
                s.logits,
                &s.targets,
                &s.ce,
                obj.loss_scale * obj.mtp_lambda / d,
            )?;
            let mut dout = self.head_backward(dlogits, s.hn, s.out, m.head_norm, ctx.eps, w)?;
            if let Some(g) = dprev.take() {
                dout.add_assign(&g, "mtp.dout")?;
            }
            let mctx = ctx.with_seq(s.len);
            let dhk = m.block.backward(p, s.block, dout, &mctx, w)?;
            let cat = T::save(s.cat, self.precision)?;
            let dcat = wgrad::linear_b(p, m.eh_proj, dhk, cat, self.precision, w)?;
            let h = self.cfg.hidden_size;
            let [den, dpn]: [Tensor<T>; 2] = split_groups(&dcat, 1, &[h, h])?
                .try_into()
                .map_err(|_| WorkerError::invalid("mtp", "split"))?;
            let de = wgrad::rmsnorm_b(p.get(m.enorm), m.enorm, den, s.e, ctx.eps, w)?;
            let dprev_k = wgrad::rmsnorm_b(p.get(m.hnorm), m.hnorm, dpn, s.prev, ctx.eps, w)?;
            w.push(WTask::Embedding {
                param: self.embed,
                dy: de,
                ids: s.ids,
            });
            dprev = Some(pad_prefix_rows(&dprev_k, s.prev_len, s.len)?);
        }
        let _span = tracing::debug_span!("head.backward").entered();
        let dlogits = cross_entropy_backward_in_place(f.logits, b.targets, &f.ce, obj.loss_scale)?;
        let mut dh = self.head_backward(dlogits, f.hn, f.h, self.norm, ctx.eps, w)?;
        if let Some(g) = dprev {
            dh.add_assign(&g, "model.dh")?;
        }
        Ok(dh)
    }

    fn check_part(&self, part: &StagePart) -> Result<()> {
        let n = self.blocks.len();
        if part.blocks.start > part.blocks.end || part.blocks.end > n {
            return Err(WorkerError::invalid(
                "stage",
                format!("layers {:?} are outside the model's {n}", part.blocks),
            ));
        }
        if part.embed != (part.blocks.start == 0) || part.head != (part.blocks.end == n) {
            return Err(WorkerError::invalid(
                "stage",
                format!(
                    "layers {:?} of {n}: the first stage must embed and the last hold the head",
                    part.blocks
                ),
            ));
        }
        Ok(())
    }
}

/// The whole step's losses from the stages' statistics of one micro-batch, in stage order:
/// balance losses summed layer by layer in model order, as one pass over the whole model does.
/// One stage's part of a micro-batch's [`super::StepOutput`]: its balance losses and expert
/// loads, and the head's losses if it is the last stage (zero otherwise). The parts of all
/// stages add up to [`step_output`]'s result (up to the order of the sums).
pub fn partial_output(st: &StageStats, obj: &Objective, mtp_depth: usize) -> super::StepOutput {
    let balance: f64 = st.balance.iter().sum();
    let d = mtp_depth.max(1) as f64;
    let (main, mtp, tokens) = match &st.head {
        Some(h) => (h.main, h.mtp.clone(), h.tokens),
        None => (0.0, vec![0.0; mtp_depth], 0),
    };
    super::StepOutput {
        loss: main + obj.mtp_lambda / d * mtp.iter().sum::<f64>() + obj.balance_alpha * balance,
        main_loss: main,
        mtp_losses: mtp,
        balance_loss: balance,
        expert_loads: st.loads.clone(),
        tokens,
    }
}

pub fn step_output(
    stats: &[StageStats],
    obj: &Objective,
    mtp_depth: usize,
) -> Result<super::StepOutput> {
    let head = stats
        .last()
        .and_then(|s| s.head.as_ref())
        .ok_or_else(|| WorkerError::invalid("stage", "the last stage reported no losses"))?;
    let mut balance = 0.0;
    for b in stats.iter().flat_map(|s| &s.balance) {
        balance += b;
    }
    let loads = stats.iter().flat_map(|s| s.loads.iter().cloned()).collect();
    let d = mtp_depth.max(1) as f64;
    Ok(super::StepOutput {
        loss: head.main
            + obj.mtp_lambda / d * head.mtp.iter().sum::<f64>()
            + obj.balance_alpha * balance,
        main_loss: head.main,
        mtp_losses: head.mtp.clone(),
        balance_loss: balance,
        expert_loads: loads,
        tokens: head.tokens,
    })
}
