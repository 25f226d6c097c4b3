//! Parallel plans: which device runs which pipeline stage, data-parallel rank and expert shard,
//! and what that costs.
//!
//! [`plan`] is pure and deterministic: the same model, parallelism and cluster give the same plan.
//! The world is `pp x dp` devices. Devices are taken node by node, stage by stage, so a stage
//! whose `dp` ranks fill whole nodes gets whole nodes. The `ep` consecutive data-parallel ranks of
//! a stage form an expert-parallel (EP) group, which then spans as few nodes as possible; the
//! routed experts of every MoE layer are split evenly over the group, and the groups of
//! node-limited routing line up with the group's nodes when `n_group` is a multiple of the node
//! count (each node then holds whole routing groups, so a token reaches at most `topk_group`
//! nodes).
//!
//! The cost model is deliberately simple and stated in the fields' documentation: parameter,
//! gradient and optimizer bytes per device (BF16 working weights, FP32 gradients, and FP32 master
//! weights with BF16 AdamW moments sharded by ZeRO-1), activation bytes from the micro-batches a schedule keeps in flight, and the
//! pipeline bubble of the report's Table 2 with F, B and W from FLOP counts.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::{ModelConfig, SpecError};

/// A pipeline schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Schedule {
    /// One forward, one backward.
    #[serde(rename = "1f1b")]
    OneFOneB,
    /// Zero-bubble 1F1B with the weight-gradient work deferred into the bubbles.
    #[serde(rename = "zb1p")]
    Zb1p,
    /// DeepSeek's bidirectional DualPipe: rank `r` holds stages `r` and `pp - 1 - r`.
    #[serde(rename = "dualpipe")]
    DualPipe,
    /// DualPipe "cut in half": `2 pp` stages in a V over `pp` ranks, rank `r` holding stages `r`
    /// and `2 pp - 1 - r`.
    #[serde(rename = "dualpipev")]
    DualPipeV,
}

impl Schedule {
    /// Every schedule, by name.
    pub const ALL: [(&'static str, Schedule); 4] = [
        ("1f1b", Schedule::OneFOneB),
        ("zb1p", Schedule::Zb1p),
        ("dualpipe", Schedule::DualPipe),
        ("dualpipev", Schedule::DualPipeV),
    ];

    /// Model stages the pipeline is cut into for `pp` ranks.
    pub fn stages(self, pp: usize) -> usize {
        match self {
            Schedule::DualPipeV => 2 * pp,
            _ => pp,
        }
    }

    /// The stages each of `pp` ranks holds: its own, and under DualPipe(V) the mirrored one.
    pub fn rank_stages(self, pp: usize) -> Vec<Vec<usize>> {
        (0..pp)
            .map(|r| match self {
                Schedule::OneFOneB | Schedule::Zb1p => vec![r],
                Schedule::DualPipe => vec![r, pp - 1 - r],
                Schedule::DualPipeV => vec![r, 2 * pp - 1 - r],
            })
            .collect()
    }

    /// Stages (model chunks) each rank holds.
    pub fn stages_per_rank(self) -> usize {
        match self {
            Schedule::OneFOneB | Schedule::Zb1p => 1,
            Schedule::DualPipe | Schedule::DualPipeV => 2,
        }
    }
}

impl FromStr for Schedule {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        Schedule::ALL
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                SpecError::invalid(
                    "parallelism.schedule",
                    format!("unknown schedule {s:?}: expected 1f1b, zb1p, dualpipe or dualpipev"),
                )
            })
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = Schedule::ALL
            .iter()
            .find(|(_, v)| v == self)
            .map_or("?", |(n, _)| n);
        f.write_str(name)
    }
}

/// How a job is split.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Parallelism {
    /// Pipeline ranks.
    pub pp: usize,
    /// Data-parallel ranks per pipeline rank.
    pub dp: usize,
    /// Expert-parallel group size: consecutive data-parallel ranks that split the routed experts.
    pub ep: usize,
    /// Pipeline schedule.
    pub schedule: Schedule,
    /// Micro-batches per step and data-parallel rank.
    pub micro_batches: usize,
    /// Sequences per micro-batch.
    pub micro_batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
}

/// The devices a plan may use: nodes in order, each with its device count.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Cluster {
    /// `(node name, devices)` in placement order.
    pub nodes: Vec<(String, usize)>,
}

impl Cluster {
    /// `nodes` nodes named `node-0`, `node-1`, ... with `devices` devices each.
    pub fn uniform(nodes: usize, devices: usize) -> Self {
        Self {
            nodes: (0..nodes).map(|i| (format!("node-{i}"), devices)).collect(),
        }
    }

    /// Parses `NODESxDEVICES` (for example `256x8`).
    pub fn parse(s: &str) -> Result<Self, SpecError> {
        let bad = || {
            SpecError::invalid(
                "cluster",
                format!("expected NODESxDEVICES such as 256x8, got {s:?}"),
            )
        };
        let (n, d) = s.split_once('x').ok_or_else(bad)?;
        let n: usize = n.trim().parse().map_err(|_| bad())?;
        let d: usize = d.trim().parse().map_err(|_| bad())?;
        if n == 0 || d == 0 {
            return Err(SpecError::invalid(
                "cluster",
                "needs at least one node and one device per node",
            ));
        }
        Ok(Self::uniform(n, d))
    }

    /// Devices in all nodes.
    pub fn devices(&self) -> usize {
        self.nodes.iter().map(|(_, d)| d).sum()
    }
}

/// One rank's device.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RankPlacement {
    /// Pipeline rank.
    pub pp_rank: usize,
    /// Data-parallel rank within the pipeline rank.
    pub dp_rank: usize,
    /// Index of the node in the cluster.
    pub node: usize,
    /// Device index within the node.
    pub device: usize,
}

/// An expert-parallel group and where it lives.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EpGroup {
    /// The pipeline rank whose data-parallel ranks form the group.
    pub stage: usize,
    /// The group's index among its stage's groups.
    pub index: usize,
    /// The data-parallel ranks in the group (consecutive).
    pub dp_ranks: Vec<usize>,
    /// The nodes (cluster indices) the group spans, ascending.
    pub nodes: Vec<usize>,
    /// Whether each routing group's experts sit on a single node of the group.
    pub routing_groups_aligned: bool,
}

/// Per-device costs of a plan (for the most loaded pipeline rank).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeviceCosts {
    /// Parameters held by a device of the pipeline rank: its stages' replicated parameters plus
    /// its `1/ep` share of their routed experts.
    pub parameters: u64,
    /// BF16 working weights and FP32 gradients of those parameters, plus the optimizer state that
    /// ZeRO-1 shards over the ranks holding copies (`dp` for replicated parameters, `dp / ep` for
    /// experts): FP32 master weights and BF16 AdamW moments. In bytes.
    pub parameter_bytes: u64,
    /// Activations kept for backward: BF16 values of `hidden_size * 14` per token and layer (the
    /// layer inputs, norms, the MLA latents and outputs, and the MoE inputs and outputs, with the
    /// up-projections recomputed), times the micro-batches in flight on the first rank
    /// (`pp` for 1F1B and ZB1P, `pp + 1` for DualPipe), in bytes.
    pub activation_bytes: u64,
}

/// The pipeline bubble of the report's Table 2, from FLOP counts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Bubble {
    /// Forward FLOPs of one chunk (one stage, one micro-batch): the linear layers' `2 x
    /// activated parameters x tokens` plus attention's causal score and value products.
    pub f_flops: f64,
    /// Backward-for-input FLOPs of one chunk: the linear layers' share again plus twice
    /// attention's (attention has no weights, so all of its backward is B).
    pub b_flops: f64,
    /// Backward-for-weights FLOPs of one chunk: the linear layers' share.
    pub w_flops: f64,
    /// The bubble in FLOPs of one rank: 1F1B `(PP-1)(F+B)`, ZB1P `(PP-1)(F+B-2W)`, DualPipe
    /// `(PP/2-1)(F&B+B-3W)`, where Table 2's `B` is the whole backward (`b_flops + w_flops`)
    /// and `F&B = F + b_flops` (overlap hides communication, not compute).
    pub bubble_flops: f64,
    /// The bubble as a share of the step: `bubble / (bubble + micro_batches x (F + B + W))`.
    pub bubble_fraction: f64,
}

/// A placed job.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    /// The parallelism planned.
    pub parallelism: Parallelism,
    /// Devices used: `pp x dp`.
    pub world: usize,
    /// Model stages (`pp`, or `2 pp` for DualPipeV).
    pub stages: usize,
    /// Main-model layers per stage, in stage order (the last stage also holds the output head and
    /// the MTP modules, the first the embedding).
    pub layers_per_stage: Vec<usize>,
    /// Stages held by each pipeline rank.
    pub rank_stages: Vec<Vec<usize>>,
    /// Every rank's device, pipeline rank by pipeline rank.
    pub ranks: Vec<RankPlacement>,
    /// Every EP group.
    pub ep_groups: Vec<EpGroup>,
    /// Routed experts of each MoE layer held by one EP rank.
    pub experts_per_ep_rank: usize,
    /// Nodes a token's experts can span: `topk_group` when routing groups line up with nodes,
    /// otherwise the nodes of its EP group.
    pub max_nodes_per_token: usize,
    /// Costs of a device of the busiest pipeline rank.
    pub device: DeviceCosts,
    /// The pipeline bubble.
    pub bubble: Bubble,
}

/// A job that cannot be placed on the cluster as it is (the job waits; nothing is wrong with it).
pub const NOT_ENOUGH_DEVICES: &str = "not enough devices";

fn check(cond: bool, field: &str, reason: impl FnOnce() -> String) -> Result<(), SpecError> {
    if cond {
        Ok(())
    } else {
        Err(SpecError::invalid(field, reason()))
    }
}

/// Checks a parallelism against a model, naming the field at fault.
pub fn validate(model: &ModelConfig, par: &Parallelism) -> Result<(), SpecError> {
    for (field, v) in [
        ("parallelism.pp", par.pp),
        ("parallelism.dp", par.dp),
        ("parallelism.ep", par.ep),
        ("parallelism.micro_batches", par.micro_batches),
        ("training.micro_batch_size", par.micro_batch_size),
        ("training.seq_len", par.seq_len),
    ] {
        check(v >= 1, field, || format!("must be at least 1, got {v}"))?;
    }
    check(par.dp.is_multiple_of(par.ep), "parallelism.ep", || {
        format!("{} does not divide dp {}", par.ep, par.dp)
    })?;
    if model.has_moe_layers() {
        check(
            model.n_routed_experts.is_multiple_of(par.ep),
            "parallelism.ep",
            || {
                format!(
                    "{} does not divide the model's {} routed experts",
                    par.ep, model.n_routed_experts
                )
            },
        )?;
    }
    let stages = par.schedule.stages(par.pp);
    check(stages <= model.num_hidden_layers, "parallelism.pp", || {
        format!(
            "{stages} stages for {} with {} layers: more stages than layers",
            par.schedule, model.num_hidden_layers
        )
    })?;
    match par.schedule {
        Schedule::DualPipe | Schedule::DualPipeV => {
            if par.schedule == Schedule::DualPipe {
                check(par.pp.is_multiple_of(2), "parallelism.pp", || {
                    format!("dualpipe needs an even pp, got {}", par.pp)
                })?;
            }
            check(
                par.micro_batches.is_multiple_of(2) && par.micro_batches >= 2 * par.pp,
                "parallelism.micro_batches",
                || {
                    format!(
                        "{} needs an even count of at least 2 x pp = {}, got {}",
                        par.schedule,
                        2 * par.pp,
                        par.micro_batches
                    )
                },
            )?;
        }
        Schedule::OneFOneB | Schedule::Zb1p => {
            check(
                par.micro_batches >= par.pp,
                "parallelism.micro_batches",
                || {
                    format!(
                        "{} needs at least pp = {} micro-batches, got {}",
                        par.schedule, par.pp, par.micro_batches
                    )
                },
            )?;
        }
    }
    Ok(())
}

/// Attention's score and value FLOPs per token and layer for sequences of `seq_len` tokens
/// (causal: half the square).
fn attention_flops(model: &ModelConfig, seq_len: usize) -> f64 {
    2.0 * model.num_attention_heads as f64
        * (model.qk_head_dim() + model.v_head_dim) as f64
        * seq_len as f64
        / 2.0
}

/// Main-model layers per stage for `stages` stages of sequences of `seq_len` tokens: contiguous
/// runs, at least one layer each, that make the most expensive stage as cheap as possible. A
/// stage's cost is its forward FLOPs per token: twice each layer's activated parameters plus its
/// causal attention scores and values; the first stage's embedding is a lookup and costs
/// nothing, the last stage also pays for the output head and the MTP modules (each a projection,
/// a block and the head again). Among the splits with the cheapest most expensive stage it
/// takes the one whose stage costs are most even.
/// With fewer layers than stages every stage gets one where it can (the plan refuses that case).
pub fn balanced_layers(model: &ModelConfig, stages: usize, seq_len: usize) -> Vec<usize> {
    let n = model.num_hidden_layers;
    if stages == 0 {
        return Vec::new();
    }
    if n <= stages {
        return (0..stages).map(|s| usize::from(s < n)).collect();
    }
    // The search below takes stages x n^2 steps; past that size, the even split (extra layers
    // first) keeps planning fast for any configuration.
    if stages.saturating_mul(n).saturating_mul(n) > 1 << 26 {
        return (0..stages)
            .map(|s| n / stages + usize::from(s < n % stages))
            .collect();
    }
    let h = model.hidden_size as f64;
    let attn = attention_flops(model, seq_len);
    let layer = |moe: bool| 2.0 * model.layer_parts(moe).2 as f64 + attn;
    let head = 2.0 * model.vocab_size as f64 * h;
    let mtp = model.num_nextn_predict_layers as f64
        * (layer(model.has_moe_layers()) + 2.0 * (2.0 * h * h) + head);
    let tail = head + mtp;
    // prefix[i]: cost of layers 0..i.
    let mut prefix = vec![0.0f64; n + 1];
    for i in 0..n {
        prefix[i + 1] = prefix[i] + layer(model.is_moe_layer(i));
    }
    let cost = |a: usize, b: usize| prefix[b] - prefix[a] + if b == n { tail } else { 0.0 };
    // First the smallest possible cost of the most expensive stage; then, among the splits that
    // keep every stage within it, the one with the most even costs (least sum of squares).
    let inf = f64::INFINITY;
    let mut best = vec![vec![inf; n + 1]; stages + 1];
    best[0][0] = 0.0;
    for s in 1..=stages {
        for i in s..=n - (stages - s) {
            for j in s - 1..i {
                best[s][i] = best[s][i].min(best[s - 1][j].max(cost(j, i)));
            }
        }
    }
    let limit = best[stages][n] * (1.0 + 1e-12);
    let mut even = vec![vec![inf; n + 1]; stages + 1];
    let mut cut = vec![vec![0usize; n + 1]; stages + 1];
    even[0][0] = 0.0;
    for s in 1..=stages {
        for i in s..=n - (stages - s) {
            for j in s - 1..i {
                let c = cost(j, i);
                if c > limit {
                    continue;
                }
                let v = even[s - 1][j] + c * c;
                if v < even[s][i] {
                    even[s][i] = v;
                    cut[s][i] = j;
                }
            }
        }
    }
    let mut out = vec![0usize; stages];
    let mut i = n;
    for s in (1..=stages).rev() {
        let j = cut[s][i];
        out[s - 1] = i - j;
        i = j;
    }
    out
}

/// Places `par` for `model` on `cluster`. Fails with [`SpecError::Invalid`] naming the field for
/// an invalid parallelism, and with field `cluster` and reason starting [`NOT_ENOUGH_DEVICES`]
/// when the cluster is too small.
pub fn plan(model: &ModelConfig, par: &Parallelism, cluster: &Cluster) -> Result<Plan, SpecError> {
    validate(model, par)?;
    let world = par
        .pp
        .checked_mul(par.dp)
        .ok_or_else(|| SpecError::invalid("parallelism.dp", "pp x dp overflows"))?;
    let available = cluster.devices();
    if world > available {
        return Err(SpecError::invalid(
            "cluster",
            format!(
                "{NOT_ENOUGH_DEVICES}: the job needs pp x dp = {world}, the cluster has {available}"
            ),
        ));
    }
    // Devices node by node; rank (s, d) takes device s * dp + d.
    let devices: Vec<(usize, usize)> = cluster
        .nodes
        .iter()
        .enumerate()
        .flat_map(|(n, (_, count))| (0..*count).map(move |d| (n, d)))
        .take(world)
        .collect();
    let ranks: Vec<RankPlacement> = (0..world)
        .map(|i| RankPlacement {
            pp_rank: i / par.dp,
            dp_rank: i % par.dp,
            node: devices[i].0,
            device: devices[i].1,
        })
        .collect();

    let moe = model.has_moe_layers();
    let experts_per_ep_rank = if moe {
        model.n_routed_experts / par.ep
    } else {
        0
    };
    let mut ep_groups = Vec::with_capacity(par.pp * (par.dp / par.ep));
    let mut max_nodes_per_token = 0;
    for stage in 0..par.pp {
        for index in 0..par.dp / par.ep {
            let dp_ranks: Vec<usize> = (index * par.ep..(index + 1) * par.ep).collect();
            let rank_node: Vec<usize> = dp_ranks
                .iter()
                .map(|&d| ranks[stage * par.dp + d].node)
                .collect();
            let mut nodes = rank_node.clone();
            nodes.sort_unstable();
            nodes.dedup();
            // Routing group g holds experts [g * size, (g + 1) * size); expert e lives on EP
            // rank e / experts_per_ep_rank.
            let aligned = moe && {
                let size = model.n_routed_experts / model.n_group.max(1);
                (0..model.n_group).all(|g| {
                    let first = rank_node[g * size / experts_per_ep_rank];
                    (g * size..(g + 1) * size).all(|e| rank_node[e / experts_per_ep_rank] == first)
                })
            };
            let reach = if aligned {
                model.topk_group.min(nodes.len())
            } else {
                nodes.len()
            };
            max_nodes_per_token = max_nodes_per_token.max(reach);
            ep_groups.push(EpGroup {
                stage,
                index,
                dp_ranks,
                nodes,
                routing_groups_aligned: aligned,
            });
        }
    }

    let stages = par.schedule.stages(par.pp);
    let layers_per_stage = balanced_layers(model, stages, par.seq_len);
    let rank_stages = par.schedule.rank_stages(par.pp);

    let (device, bubble) = costs(model, par, &layers_per_stage, &rank_stages);
    Ok(Plan {
        parallelism: *par,
        world,
        stages,
        layers_per_stage,
        rank_stages,
        ranks,
        ep_groups,
        experts_per_ep_rank,
        max_nodes_per_token,
        device,
        bubble,
    })
}

/// `(replicated, routed, activated)` parameters of each stage, and attention FLOPs per token.
pub(crate) fn stage_params(
    model: &ModelConfig,
    layers_per_stage: &[usize],
) -> Vec<(u64, u64, u64)> {
    let h = model.hidden_size as u64;
    let embed = model.vocab_size as u64 * h;
    let last = layers_per_stage.len() - 1;
    let mut first_layer = 0;
    layers_per_stage
        .iter()
        .enumerate()
        .map(|(s, &n)| {
            let (mut rep, mut routed, mut active) = (0u64, 0u64, 0u64);
            for i in first_layer..first_layer + n {
                let (r, x, a) = model.layer_parts(model.is_moe_layer(i));
                rep += r;
                routed += x;
                active += a;
            }
            first_layer += n;
            if s == 0 {
                rep += embed;
            }
            if s == last {
                // Final norm and output head, then the MTP modules (embedding and head shared).
                rep += embed + h;
                active += embed;
                for _ in 0..model.num_nextn_predict_layers {
                    let (r, x, a) = model.layer_parts(model.has_moe_layers());
                    let extra = 3 * h + 2 * h * h;
                    rep += r + extra;
                    routed += x;
                    active += a + extra + embed;
                }
            }
            (rep, routed, active)
        })
        .collect()
}

fn costs(
    model: &ModelConfig,
    par: &Parallelism,
    layers_per_stage: &[usize],
    rank_stages: &[Vec<usize>],
) -> (DeviceCosts, Bubble) {
    let per_stage = stage_params(model, layers_per_stage);
    let tokens = (par.micro_batch_size * par.seq_len) as f64;
    let attn_per_token = attention_flops(model, par.seq_len);
    let expert_dp = (par.dp / par.ep).max(1) as u64;
    let in_flight = match par.schedule {
        Schedule::OneFOneB | Schedule::Zb1p => par.pp,
        Schedule::DualPipe | Schedule::DualPipeV => par.pp + 1,
    } as u64;
    let act_per_token_layer = 2 * 14 * model.hidden_size as u64;

    let mut device = DeviceCosts {
        parameters: 0,
        parameter_bytes: 0,
        activation_bytes: 0,
    };
    // (linear, attention) forward FLOPs of the busiest rank's chunk.
    let mut chunk = (0.0f64, 0.0f64);
    for stages in rank_stages {
        let (mut params, mut bytes, mut layers) = (0u64, 0u64, 0u64);
        for &s in stages {
            let (rep, routed, active) = per_stage[s];
            let routed_here = routed / par.ep as u64;
            params += rep + routed_here;
            bytes +=
                6 * (rep + routed_here) + 8 * rep / par.dp as u64 + 8 * routed_here / expert_dp;
            layers += layers_per_stage[s] as u64;
            let lin = 2.0 * active as f64 * tokens;
            let attn = attn_per_token * tokens * layers_per_stage[s] as f64;
            if lin + attn > chunk.0 + chunk.1 {
                chunk = (lin, attn);
            }
        }
        let activations = act_per_token_layer
            * (par.micro_batch_size * par.seq_len) as u64
            * layers.div_ceil(stages.len() as u64)
            * in_flight;
        if bytes + activations > device.parameter_bytes + device.activation_bytes {
            device = DeviceCosts {
                parameters: params,
                parameter_bytes: bytes,
                activation_bytes: activations,
            };
        }
    }
    let (f, b, w) = (chunk.0 + chunk.1, chunk.0 + 2.0 * chunk.1, chunk.0);
    let bubble_flops = crate::schedule::Costs { f, b, w, fb: f + b }
        .table2_bubble(par.schedule, par.pp)
        .max(0.0);
    let work = par.micro_batches as f64 * (f + b + w);
    let bubble = Bubble {
        f_flops: f,
        b_flops: b,
        w_flops: w,
        bubble_flops,
        bubble_fraction: if work + bubble_flops > 0.0 {
            bubble_flops / (work + bubble_flops)
        } else {
            0.0
        },
    };
    (device, bubble)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paper() -> (ModelConfig, Parallelism, Cluster) {
        (
            ModelConfig::deepseek_v3_671b(),
            Parallelism {
                pp: 16,
                dp: 128,
                ep: 64,
                schedule: Schedule::DualPipe,
                micro_batches: 32,
                micro_batch_size: 1,
                seq_len: 4096,
            },
            Cluster::uniform(256, 8),
        )
    }

    #[test]
    fn the_papers_setup_puts_every_ep_group_on_eight_nodes() {
        let (model, par, cluster) = paper();
        let p = plan(&model, &par, &cluster).unwrap();
        assert_eq!(p.world, 2048);
        assert_eq!(p.ep_groups.len(), 16 * 2);
        for g in &p.ep_groups {
            assert_eq!(g.nodes.len(), 8, "group {g:?}");
            assert!(g.routing_groups_aligned);
            // A stage's groups are disjoint and sit on the stage's 16 nodes.
            assert!(g.nodes.iter().all(|n| n / 16 == g.stage));
        }
        assert_eq!(p.experts_per_ep_rank, 4);
        // Each token reaches at most 4 nodes, as in the report.
        assert_eq!(p.max_nodes_per_token, 4);
        // 61 layers over 16 stages; rank r holds stages r and 15 - r.
        assert_eq!(p.layers_per_stage.iter().sum::<usize>(), 61);
        assert_eq!(p.rank_stages[3], vec![3, 12]);
        // Every device used exactly once.
        let mut used: Vec<(usize, usize)> = p.ranks.iter().map(|r| (r.node, r.device)).collect();
        used.sort_unstable();
        used.dedup();
        assert_eq!(used.len(), 2048);
    }

    #[test]
    fn stages_are_balanced_by_cost() {
        let v3 = ModelConfig::deepseek_v3_671b();
        let tiny = ModelConfig::tiny();
        // The last stage's head and MTP module weigh about three layers.
        assert_eq!(
            balanced_layers(&v3, 16, 4096),
            [vec![4; 15], vec![1]].concat()
        );
        assert_eq!(balanced_layers(&tiny, 2, 256), [3, 1]);
        assert_eq!(balanced_layers(&tiny, 4, 256), [1, 1, 1, 1]);
        // Never worse than the even split (extra layers first) at its most expensive stage.
        let even = |n: usize, s: usize| -> Vec<usize> {
            (0..s).map(|i| n / s + usize::from(i < n % s)).collect()
        };
        for model in [&v3, &tiny, &ModelConfig::small()] {
            let n = model.num_hidden_layers;
            for stages in 1..=n.min(20) {
                let split = balanced_layers(model, stages, 1024);
                assert_eq!(split.iter().sum::<usize>(), n);
                assert!(split.iter().all(|l| *l >= 1), "{split:?}");
                let worst = |split: &[usize]| {
                    let p = plan_costs_per_stage(model, split, 1024);
                    p.into_iter().fold(0.0, f64::max)
                };
                assert!(
                    worst(&split) <= worst(&even(n, stages)) * (1.0 + 1e-12),
                    "{stages}: {split:?}"
                );
            }
        }
    }

    /// Forward FLOPs per token of each stage, as `balanced_layers` counts them.
    fn plan_costs_per_stage(model: &ModelConfig, split: &[usize], seq: usize) -> Vec<f64> {
        // The cost model of `balanced_layers`, written out again as the test's oracle.
        let h = model.hidden_size as f64;
        let attn = attention_flops(model, seq);
        let layer = |i: usize| 2.0 * model.layer_parts(model.is_moe_layer(i)).2 as f64 + attn;
        let head = 2.0 * model.vocab_size as f64 * h;
        let mtp = model.num_nextn_predict_layers as f64
            * (2.0 * model.layer_parts(model.has_moe_layers()).2 as f64
                + attn
                + 4.0 * h * h
                + head);
        let mut at = 0;
        split
            .iter()
            .enumerate()
            .map(|(s, &l)| {
                let c: f64 = (at..at + l).map(layer).sum();
                at += l;
                c + if s + 1 == split.len() {
                    head + mtp
                } else {
                    0.0
                }
            })
            .collect()
    }

    #[test]
    fn bubbles_follow_table_2() {
        let (model, mut par, cluster) = paper();
        let dual = plan(&model, &par, &cluster).unwrap().bubble;
        par.schedule = Schedule::OneFOneB;
        let one = plan(&model, &par, &cluster).unwrap().bubble;
        par.schedule = Schedule::Zb1p;
        let zb = plan(&model, &par, &cluster).unwrap().bubble;
        let (f, b, w) = (one.f_flops, one.b_flops, one.w_flops);
        assert!(w < f && f < b);
        let close = |a: f64, want: f64| (a - want).abs() <= 1e-9 * want.abs().max(1.0);
        // Table 2's B is the whole backward.
        let full = b + w;
        assert!(close(one.bubble_flops, 15.0 * (f + full)));
        assert!(close(zb.bubble_flops, 15.0 * (f + full - 2.0 * w)));
        assert!(close(dual.bubble_flops, 7.0 * ((f + b) + full - 3.0 * w)));
        // The report's ordering: DualPipe < ZB1P < 1F1B.
        assert!(dual.bubble_flops < zb.bubble_flops && zb.bubble_flops < one.bubble_flops);
        // 1F1B idles (PP-1) of its PP-1+m chunk times: 15 / (15 + 32).
        assert!(close(one.bubble_fraction, 15.0 / 47.0));
    }

    #[test]
    fn dualpipe_holds_two_stages_of_parameters() {
        let (model, mut par, cluster) = paper();
        let dual = plan(&model, &par, &cluster).unwrap().device;
        par.schedule = Schedule::OneFOneB;
        let one = plan(&model, &par, &cluster).unwrap().device;
        // Table 2's 2x is for equal stages. Balanced by cost, the last stage (head and MTP) has
        // one layer, so DualPipe's rank 0 (stages 0 and 15) is light; its rank 1 holds stages
        // 1 and 14, eight MoE layers against 1F1B's four.
        assert!(dual.parameters > one.parameters);
        assert!(dual.parameter_bytes > one.parameter_bytes);
        assert!(dual.activation_bytes > one.activation_bytes);
    }

    #[test]
    fn ep_groups_that_do_not_fill_nodes_span_the_fewest_nodes() {
        let model = ModelConfig::tiny();
        let par = Parallelism {
            pp: 2,
            dp: 4,
            ep: 2,
            schedule: Schedule::OneFOneB,
            micro_batches: 4,
            micro_batch_size: 1,
            seq_len: 256,
        };
        let p = plan(&model, &par, &Cluster::uniform(4, 2)).unwrap();
        for g in &p.ep_groups {
            assert_eq!(g.nodes.len(), 1);
        }
        // tiny: 16 experts in 4 routing groups over a 1-node group.
        assert_eq!(p.max_nodes_per_token, 1);
        let e = plan(&model, &par, &Cluster::uniform(3, 2))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(NOT_ENOUGH_DEVICES) && e.contains("cluster"),
            "{e}"
        );
    }

    #[test]
    fn invalid_parallelisms_name_the_field() {
        let (model, base, cluster) = paper();
        let cases: Vec<(Parallelism, &str)> = vec![
            (Parallelism { pp: 15, ..base }, "parallelism.pp"),
            (
                Parallelism {
                    micro_batches: 16,
                    ..base
                },
                "parallelism.micro_batches",
            ),
            (
                Parallelism {
                    micro_batches: 33,
                    ..base
                },
                "parallelism.micro_batches",
            ),
            (Parallelism { ep: 48, ..base }, "parallelism.ep"),
            (Parallelism { ep: 0, ..base }, "parallelism.ep"),
            (Parallelism { dp: 0, ..base }, "parallelism.dp"),
            (
                Parallelism {
                    pp: 62,
                    micro_batches: 124,
                    ..base
                },
                "parallelism.pp",
            ),
            (
                Parallelism {
                    schedule: Schedule::DualPipeV,
                    pp: 32,
                    micro_batches: 64,
                    ..base
                },
                "parallelism.pp",
            ),
            (Parallelism { seq_len: 0, ..base }, "training.seq_len"),
        ];
        for (par, field) in cases {
            let e = plan(&model, &par, &cluster).unwrap_err().to_string();
            assert!(e.starts_with(field), "{e} should name {field}");
        }
        // ep must divide the routed experts too: 256 experts, ep 128 divides dp 128 and 256; ep
        // 256 does not divide dp.
        let e = plan(
            &model,
            &Parallelism {
                dp: 384,
                ep: 384,
                ..base
            },
            &Cluster::uniform(1024, 8),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("routed experts"), "{e}");
        assert!("dualpipe".parse::<Schedule>().is_ok());
        let e = "gpipe".parse::<Schedule>().unwrap_err().to_string();
        assert!(e.contains("parallelism.schedule"), "{e}");
        for bad in ["256", "0x8", "ax8", "8x"] {
            assert!(
                Cluster::parse(bad)
                    .unwrap_err()
                    .to_string()
                    .starts_with("cluster")
            );
        }
        assert_eq!(Cluster::parse("256x8").unwrap().devices(), 2048);
    }
}
