//! One data-parallel rank's part of an optimizer step (ZeRO-1).
//!
//! A [`Replica`] is what a data-parallel rank owns: its copy of the FP32 master weights, its
//! gradient buffers and the AdamW moments of its ZeRO-1 shard. Each step it
//!
//! 1. computes the gradients of its share of the global batch (whole model, or its pipeline);
//! 2. reduce-scatters them: it receives the sum over all ranks of its shard's gradients;
//! 3. all-reduces the squared gradient norm of the shards, for clipping;
//! 4. runs AdamW on its shard only;
//! 5. all-gathers the updated shards into its copy of the weights;
//! 6. all-reduces the expert loads and moves the expert biases (auxiliary-loss-free balancing)
//!    from the loads of the whole global batch.
//!
//! Every rank takes the same sums in the same order, so the replicas stay bit-identical.

use shoal_kernels::KernelError;
use shoal_kernels::ops::adamw::{
    AdamWConfig, AdamWState, adamw_step_scaled, clip_coefficient, sum_sq,
};
use shoal_spec::schedule::StepSchedule;

use super::zero::{Segment, ZeroLayout};
use crate::Result;
use crate::comm::collective::{Group, all_gather, all_reduce_f64, all_reduce_u64, reduce_scatter};
use crate::comm::expert::EpLink;
use crate::comm::transport::{CommOp, LocalTransport, Tag, Transport};
use crate::model::ep::ExpertExchange;
use crate::model::params::Grads;
use crate::model::{Model, Objective, StagePart, StepOutput, TokenBatch};
use crate::pipeline;

/// One sharded group of parameters as a rank holds it: the dense parameters (sharded over all
/// ranks), or the routed experts of this rank's expert-parallel position (sharded over the ranks
/// at that position in every expert-parallel group).
pub(crate) struct Part {
    /// Index of its layout in [`StepPlan::layouts`].
    pub(crate) layout: usize,
    /// The ranks sharing it, in shard order.
    pub(crate) group: Group,
    /// This rank's place in `group` (its shard).
    pub(crate) member: usize,
    /// AdamW state of this rank's shard, one per segment.
    pub(crate) moments: Vec<AdamWState>,
}

/// What one data-parallel rank owns.
pub(crate) struct Replica {
    pub(crate) model: Model<f32>,
    pub(crate) grads: Grads<f32>,
    pub(crate) parts: Vec<Part>,
    /// Across processes with pipeline parallelism: the one pipeline rank this device runs (its
    /// neighbours are other devices of the mesh); `None`: the whole pipeline on threads.
    pub(crate) pipe_rank: Option<usize>,
}

/// What every rank of the step reads.
pub(crate) struct StepPlan<'a> {
    pub(crate) step: u64,
    pub(crate) lr: f32,
    pub(crate) obj: Objective,
    pub(crate) micro_batches: usize,
    pub(crate) adamw: AdamWConfig,
    pub(crate) grad_clip: f32,
    pub(crate) gamma: f32,
    pub(crate) pipeline: Option<&'a (Vec<StagePart>, StepSchedule)>,
    pub(crate) layouts: &'a [ZeroLayout],
    /// Every device: the data-parallel ranks, or across processes with pipeline parallelism
    /// every pipeline rank of each.
    pub(crate) group: &'a Group,
    /// Data-parallel ranks.
    pub(crate) dp: usize,
    /// Expert-parallel group size (1: none).
    pub(crate) ep: usize,
    /// Dispatch directly to every member, even across nodes.
    pub(crate) direct_dispatch: bool,
    /// How long any wait for another rank's data may take.
    pub(crate) timeout: std::time::Duration,
    /// Run the chunks of DualPipe's overlapped pairs at once.
    pub(crate) overlap: bool,
}

/// What a rank's step produced.
pub(crate) struct RankOutcome {
    /// Losses and expert loads of the whole global batch (the same on every rank).
    pub(crate) out: StepOutput,
    pub(crate) grad_norm: f64,
    /// Bytes its pipeline ranks on threads handed each other.
    pub(crate) pipeline_bytes: u64,
    /// The most other nodes one of this rank's tokens was dispatched to.
    pub(crate) max_target_nodes: u64,
    /// Seconds of the step its pipeline ranks did not compute (the mean over them; 0 without
    /// pipeline parallelism).
    pub(crate) bubble_s: f64,
}

/// A segment's summed gradient: from the reduce-scattered shard (which starts at flat index
/// `base`), or from the gradient buffers where no reduction ran.
fn seg_grad<'g>(
    grads: &'g Grads<f32>,
    shard: Option<&'g [f32]>,
    base: usize,
    seg: &Segment,
) -> &'g [f32] {
    match shard {
        Some(v) => &v[seg.flat.start - base..seg.flat.end - base],
        None => &grads.get(seg.param).data()[seg.within.clone()],
    }
}

/// Data-parallel rank `d`'s exchange with its expert-parallel group (the `ep` consecutive
/// data-parallel ranks around it, at mesh ranks `to_mesh(x)`), routed as the plan says.
fn group_link<'t>(
    t: &'t mut dyn Transport,
    d: usize,
    ep: usize,
    to_mesh: impl Fn(usize) -> usize,
    plan: &StepPlan<'_>,
) -> Result<EpLink<'t>> {
    let first = d / ep * ep;
    let link = EpLink::new(
        t,
        (first..first + ep).map(to_mesh).collect(),
        d - first,
        plan.step,
    )?;
    Ok(if plan.direct_dispatch {
        link.direct()
    } else {
        link
    })
}

fn tag(plan: &StepPlan<'_>, op: CommOp, seq: u64) -> Tag {
    Tag {
        step: plan.step,
        op,
        seq,
    }
}

/// Runs this rank's step on `batch` (its share `share` of the global batch).
///
/// With expert parallelism inside pipeline stages, `stage_ts[i]` is pipeline rank `i`'s endpoint
/// towards pipeline rank `i` of the other replicas.
pub(crate) fn rank_step(
    rep: &mut Replica,
    t: &mut dyn Transport,
    stage_ts: &mut [LocalTransport],
    plan: &StepPlan<'_>,
    batch: &TokenBatch<'_>,
    share: f64,
) -> Result<RankOutcome> {
    let obj = Objective {
        loss_scale: plan.obj.loss_scale * share,
        ..plan.obj
    };
    rep.grads.zero();
    let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (out, pipeline_bytes, max_target_nodes, bubble_s) = match (plan.pipeline, plan.ep) {
        (Some((stages, schedule)), ep) if rep.pipe_rank.is_some() => {
            // This device runs one pipeline rank; its neighbours and its expert-parallel
            // group are other devices of the mesh.
            let s = rep.pipe_rank.unwrap_or(0);
            let (k, dp) = (t.rank(), plan.dp);
            let d = k % dp;
            let link = group_link(t, d, ep, |x| s * dp + x, plan)?;
            let devices = (0..schedule.pp).map(|r| r * dp + d).collect();
            let lanes = [link.lane(0), link.lane(1)];
            let experts = if ep > 1 {
                [
                    Some(&lanes[0] as &dyn ExpertExchange),
                    Some(&lanes[1] as &dyn ExpertExchange),
                ]
            } else {
                [None, None]
            };
            let r = pipeline::run_rank_on(
                &rep.model,
                stages,
                schedule,
                batch,
                &obj,
                &mut rep.grads,
                plan.timeout,
                s,
                &link,
                devices,
                plan.step,
                experts,
                plan.overlap,
            )?;
            // Its transfers crossed the mesh: counted by the transport, not as in-process.
            let bubble = mean(r.bubble());
            (r.out, 0, link.max_target_nodes(), bubble)
        }
        (Some((stages, schedule)), ep) => {
            // With expert parallelism, each pipeline rank exchanges tokens with the same rank
            // of the other pipelines of its group (`stage_ts` is empty without).
            let r = t.rank();
            let links = stage_ts
                .iter_mut()
                .map(|st| group_link(st, r, ep, |x| x, plan))
                .collect::<Result<Vec<_>>>()?;
            let lanes: Vec<_> = links.iter().map(|l| [l.lane(0), l.lane(1)]).collect();
            let exchanges: Vec<[&dyn ExpertExchange; 2]> = lanes
                .iter()
                .map(|[a, b]| [a as &dyn ExpertExchange, b as &dyn ExpertExchange])
                .collect();
            let r = pipeline::run_step_with(
                &rep.model,
                stages,
                schedule,
                batch,
                &obj,
                &mut rep.grads,
                plan.timeout,
                &exchanges,
                plan.overlap,
            )?;
            // Pipelines on threads of one process: every member on this node.
            let bubble = mean(r.bubble());
            (r.out, r.bytes_sent.iter().sum(), 0, bubble)
        }
        (None, 1) => (
            rep.model
                .forward_backward_micro(batch, &obj, plan.micro_batches, &mut rep.grads)?,
            0,
            0,
            0.0,
        ),
        (None, ep) => {
            let r = t.rank();
            let link = group_link(t, r, ep, |x| x, plan)?;
            let out = rep.model.forward_backward_ep(
                batch,
                &obj,
                plan.micro_batches,
                &mut rep.grads,
                &link,
            )?;
            (out, 0, link.max_target_nodes(), 0.0)
        }
    };

    // Reduce-scatter every part's gradients onto its shards. A part that this rank alone holds
    // needs no reduction: its shard is the gradient buffers themselves (no copy).
    let collective = tracing::debug_span!("collective", op = "reduce-scatter").entered();
    let mut shards: Vec<Option<Vec<f32>>> = Vec::with_capacity(rep.parts.len());
    for part in &rep.parts {
        let layout = &plan.layouts[part.layout];
        shards.push(if part.group.ranks.len() < 2 {
            None
        } else {
            Some(reduce_scatter(
                t,
                &part.group,
                tag(plan, CommOp::ReduceScatter, part.layout as u64),
                &layout.flatten(&rep.grads),
                &layout.bounds,
            )?)
        });
    }
    drop(collective);

    let opt_span = tracing::debug_span!("optimizer").entered();
    // Every element of every part lies in exactly one rank's shard: the squared norm is the
    // sum over all ranks of their shards' sums.
    let mut local = 0.0;
    for (part, shard) in rep.parts.iter().zip(&shards) {
        let layout = &plan.layouts[part.layout];
        let base = layout.bounds[part.member].start;
        for seg in &layout.shards[part.member] {
            local += sum_sq(seg_grad(&rep.grads, shard.as_deref(), base, seg));
        }
    }
    let total = all_reduce_f64(t, plan.group, tag(plan, CommOp::AllReduce, 0), &[local])?;
    let grad_norm = total.first().copied().unwrap_or(0.0).sqrt();
    if !grad_norm.is_finite() {
        let grads = &rep.grads;
        let (index, value) = rep
            .parts
            .iter()
            .zip(&shards)
            .flat_map(|(part, shard)| {
                let layout = &plan.layouts[part.layout];
                let base = layout.bounds[part.member].start;
                layout.shards[part.member]
                    .iter()
                    .flat_map(move |seg| seg_grad(grads, shard.as_deref(), base, seg))
            })
            .enumerate()
            .find(|(_, v)| !v.is_finite())
            .map_or((0, grad_norm), |(i, v)| (i, f64::from(*v)));
        return Err(KernelError::NonFinite {
            operand: "clip_grad_norm.grads",
            index,
            value,
        }
        .into());
    }
    let clip = clip_coefficient(grad_norm, plan.grad_clip)?;
    let no_decay = AdamWConfig {
        weight_decay: 0.0,
        ..plan.adamw
    };
    for (part, shard) in rep.parts.iter_mut().zip(&shards) {
        let layout = &plan.layouts[part.layout];
        let base = layout.bounds[part.member].start;
        for (seg, st) in layout.shards[part.member]
            .iter()
            .zip(part.moments.iter_mut())
        {
            let c = if rep.model.params().decays(seg.param) {
                &plan.adamw
            } else {
                &no_decay
            };
            let g = seg_grad(&rep.grads, shard.as_deref(), base, seg);
            let p = &mut rep.model.params_mut().get_mut(seg.param).data_mut()[seg.within.clone()];
            adamw_step_scaled(p, g, clip, st, c, plan.lr)?;
        }
    }
    drop(opt_span);

    // All-gather every part's updated shards.
    let _span = tracing::debug_span!("collective", op = "all-gather").entered();
    for part in &rep.parts {
        if part.group.ranks.len() < 2 {
            continue;
        }
        let layout = &plan.layouts[part.layout];
        let own = layout.shard_values(part.member, rep.model.params());
        let whole = all_gather(
            t,
            &part.group,
            tag(plan, CommOp::AllGather, part.layout as u64),
            &own,
            &layout.bounds,
        )?;
        for r in 0..layout.bounds.len() {
            if r != part.member {
                layout.write_shard(r, &whole, rep.model.params_mut());
            }
        }
    }
    drop(_span);

    // Auxiliary-loss-free balancing from the loads of the whole global batch.
    let loads: Vec<u64> = out
        .expert_loads
        .iter()
        .flatten()
        .map(|&l| l as u64)
        .collect();
    let summed = all_reduce_u64(t, plan.group, tag(plan, CommOp::AllReduce, 1), &loads)?;
    let biases = rep.model.expert_biases();
    let mut at = 0;
    let mut global_loads = Vec::with_capacity(out.expert_loads.len());
    for (bias, layer) in biases.iter().zip(&out.expert_loads) {
        let load = &summed[at..at + layer.len()];
        at += layer.len();
        global_loads.push(load.iter().map(|&l| l as usize).collect());
        let total: u64 = load.iter().sum();
        let mean = total as f64 / load.len().max(1) as f64;
        let b = rep.model.params_mut().get_mut(*bias);
        for (v, &l) in b.data_mut().iter_mut().zip(load) {
            let l = l as f64;
            if l > mean {
                *v -= plan.gamma;
            } else if l < mean {
                *v += plan.gamma;
            }
        }
    }
    // The step's losses over the global batch: every rank's, weighted by its share, summed in
    // rank order (what one pass over the rank's micro-batches in order would report).
    let n = out.mtp_losses.len();
    let mut vals = vec![share * out.loss, share * out.main_loss];
    vals.extend(out.mtp_losses.iter().map(|m| share * m));
    vals.push(share * out.balance_loss);
    vals.push(out.tokens as f64);
    let g = all_reduce_f64(t, plan.group, tag(plan, CommOp::AllReduce, 2), &vals)?;
    let out = StepOutput {
        loss: g[0],
        main_loss: g[1],
        mtp_losses: g[2..2 + n].to_vec(),
        balance_loss: g[2 + n],
        tokens: g[3 + n] as usize,
        expert_loads: global_loads,
    };
    Ok(RankOutcome {
        out,
        grad_norm,
        pipeline_bytes,
        max_target_nodes,
        bubble_s,
    })
}
