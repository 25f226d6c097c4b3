//! The step-time cost model of the `sim` device: how long one training step of a model takes on
//! a cluster of GPUs under a plan, from stated hardware figures, so that a simulated cluster can
//! stand in for a real one.
//!
//! The model, per pipeline chunk (one micro-batch through one stage):
//! - GEMMs (every Linear's forward, input-gradient and weight-gradient products) run in FP8 at
//!   `gemm_efficiency` of the FP8 peak, except the output heads, kept in BF16 as the report does;
//!   routed-expert GEMMs are slowed by `expert_imbalance` (a layer waits for the most loaded
//!   device of its expert-parallel group).
//! - Attention's scores and values run in BF16 at `attention_fwd_efficiency` forward and
//!   `attention_bwd_efficiency` backward (2.5 times the forward FLOPs: the scores are
//!   recomputed); backward also recomputes the norms and MLA's up-projections.
//! - Element-wise work (norms, activations, quantization, residuals, routing) moves a stated
//!   number of bytes per token through HBM at `hbm_efficiency` of its bandwidth.
//! - Compute runs on the SMs left after `comm_sms` are given to the all-to-all.
//! - Expert-parallel all-to-all: a token's activations cross InfiniBand once per other node it
//!   reaches (node-limited routing), in FP8 with 1x128 scales for dispatch and BF16 for combine
//!   (backward: two BF16 exchanges), then NVLink inside the node.
//! - Overlap: an overlapped forward-and-backward pair (DualPipe's `F&B`) takes the longer of its
//!   two chunks' compute and their two all-to-alls; a chunk alone pays for both in full.
//! - The pipeline: the schedule run on [`crate::schedule::simulate`] with those chunk times
//!   (the costliest stage's), then ZeRO-1's gradient reduce-scatter and parameter all-gather over
//!   InfiniBand and the optimizer's pass over its shard, neither overlapped.
//!
//! Every figure is a field of [`Hardware`]; [`Hardware::h800`] gives the report's cluster.

use serde::Serialize;

use crate::SpecError;
use crate::model::ModelConfig;
use crate::plan::{Parallelism, Schedule, balanced_layers};
use crate::schedule::{Costs, build, simulate};

/// A GPU and its links, and how much of each peak the kernels reach.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Hardware {
    /// Dense FP8 tensor-core peak, TFLOP/s.
    pub fp8_tflops: f64,
    /// Dense BF16 tensor-core peak, TFLOP/s.
    pub bf16_tflops: f64,
    /// HBM bandwidth, GB/s.
    pub hbm_gbps: f64,
    /// NVLink bandwidth per GPU that all-to-all reaches, GB/s.
    pub nvlink_gbps: f64,
    /// InfiniBand bandwidth per GPU (one NIC each), GB/s.
    pub ib_gbps: f64,
    /// Streaming multiprocessors.
    pub sms: u32,
    /// SMs given to the all-to-all kernels for the whole step.
    pub comm_sms: u32,
    /// Fraction of the FP8 (or BF16, for the heads) peak that the GEMMs reach on the compute SMs.
    pub gemm_efficiency: f64,
    /// Fraction of the BF16 peak that attention's forward reaches.
    pub attention_fwd_efficiency: f64,
    /// Fraction of the BF16 peak that attention's backward reaches.
    pub attention_bwd_efficiency: f64,
    /// Fraction of the HBM bandwidth element-wise kernels reach.
    pub hbm_efficiency: f64,
    /// The most loaded device's routed-expert work over the average, per layer and micro-batch.
    pub expert_imbalance: f64,
    /// Device-to-host copy bandwidth per GPU (a checkpoint's snapshot), GB/s.
    pub host_copy_gbps: f64,
    /// Checkpoint storage bandwidth per node, read, GB/s.
    pub storage_read_gbps: f64,
    /// Checkpoint storage bandwidth per node, write, GB/s.
    pub storage_write_gbps: f64,
    /// Memory per GPU, bytes.
    pub memory_bytes: u64,
}

impl Hardware {
    /// The H800 cluster of the DeepSeek-V3 report: 989 TFLOP/s dense BF16 and 1,979 FP8 (the
    /// H100 SXM's tensor cores), 3.35 TB/s HBM3, ~160 GB/s NVLink and 50 GB/s InfiniBand per
    /// GPU as the report measures them, 20 of 132 SMs on communication. Efficiencies: GEMMs 70%
    /// of peak (DeepGEMM's published FP8 kernels reach 1,100-1,550 TFLOP/s on training shapes),
    /// attention 60% forward and 45% backward (FlashAttention-3's published H100 figures), 80%
    /// of HBM for element-wise kernels, the busiest expert device 30% above the mean. Storage:
    /// 25 GB/s read and 12.5 GB/s write per node (one 200 Gb/s storage NIC), 25 GB/s
    /// device-to-host copies (PCIe 5, pinned memory).
    pub fn h800() -> Self {
        Self {
            fp8_tflops: 1979.0,
            bf16_tflops: 989.5,
            hbm_gbps: 3350.0,
            nvlink_gbps: 160.0,
            ib_gbps: 50.0,
            sms: 132,
            comm_sms: 20,
            gemm_efficiency: 0.70,
            attention_fwd_efficiency: 0.60,
            attention_bwd_efficiency: 0.45,
            hbm_efficiency: 0.80,
            expert_imbalance: 1.30,
            host_copy_gbps: 25.0,
            storage_read_gbps: 25.0,
            storage_write_gbps: 12.5,
            memory_bytes: 80 << 30,
        }
    }

    fn compute_share(&self) -> f64 {
        f64::from(self.sms.saturating_sub(self.comm_sms).max(1)) / f64::from(self.sms.max(1))
    }

    fn check(&self) -> Result<(), SpecError> {
        let positive = [
            ("fp8_tflops", self.fp8_tflops),
            ("bf16_tflops", self.bf16_tflops),
            ("hbm_gbps", self.hbm_gbps),
            ("nvlink_gbps", self.nvlink_gbps),
            ("ib_gbps", self.ib_gbps),
            ("host_copy_gbps", self.host_copy_gbps),
            ("storage_read_gbps", self.storage_read_gbps),
            ("storage_write_gbps", self.storage_write_gbps),
        ];
        for (field, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(SpecError::invalid(
                    format!("hardware.{field}"),
                    format!("must be positive, got {v}"),
                ));
            }
        }
        let fractions = [
            ("gemm_efficiency", self.gemm_efficiency),
            ("attention_fwd_efficiency", self.attention_fwd_efficiency),
            ("attention_bwd_efficiency", self.attention_bwd_efficiency),
            ("hbm_efficiency", self.hbm_efficiency),
        ];
        for (field, v) in fractions {
            if !(v.is_finite() && v > 0.0 && v <= 1.0) {
                return Err(SpecError::invalid(
                    format!("hardware.{field}"),
                    format!("must be in (0, 1], got {v}"),
                ));
            }
        }
        if !(self.expert_imbalance.is_finite() && self.expert_imbalance >= 1.0) {
            return Err(SpecError::invalid(
                "hardware.expert_imbalance",
                format!("must be at least 1, got {}", self.expert_imbalance),
            ));
        }
        if self.comm_sms >= self.sms {
            return Err(SpecError::invalid(
                "hardware.comm_sms",
                format!("must be fewer than the {} SMs", self.sms),
            ));
        }
        Ok(())
    }
}

/// Times of one chunk (one micro-batch through one stage), seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct ChunkTimes {
    /// Forward compute.
    pub f_compute: f64,
    /// Backward-for-input compute (with the recomputation).
    pub b_compute: f64,
    /// Backward-for-weights compute.
    pub w_compute: f64,
    /// Forward all-to-all (dispatch and combine of every MoE layer).
    pub f_comm: f64,
    /// Backward all-to-all.
    pub b_comm: f64,
}

impl ChunkTimes {
    /// The schedule's operation times: a chunk alone pays compute and communication in full; an
    /// overlapped pair hides one chunk's all-to-all behind the other's compute.
    pub fn costs(&self) -> Costs {
        let f = self.f_compute + self.f_comm;
        let b = self.b_compute + self.b_comm;
        Costs {
            f,
            b,
            w: self.w_compute,
            fb: (self.f_compute + self.b_compute).max(self.f_comm + self.b_comm),
        }
    }
}

/// One training step on the modelled cluster.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepCost {
    /// Tokens per step (all data-parallel ranks).
    pub tokens: u64,
    /// GPUs the job uses.
    pub gpus: usize,
    /// The costliest stage's chunk.
    pub chunk: ChunkTimes,
    /// The pipeline's part of the step: the schedule's makespan, seconds.
    pub pipeline_s: f64,
    /// Of it, the busiest rank's idle time (the bubble), seconds.
    pub bubble_s: f64,
    /// ZeRO-1 reduce-scatter of gradients and all-gather of parameters, seconds.
    pub dp_sync_s: f64,
    /// The optimizer's pass over the rank's shard, seconds.
    pub optimizer_s: f64,
    /// The whole step, seconds.
    pub step_s: f64,
    /// Model FLOPs per token (forward and backward, without recomputation).
    pub flops_per_token: f64,
    /// Model FLOP/s each GPU sustains over the step, TFLOP/s.
    pub tflops_per_gpu: f64,
    /// Bytes of checkpoint per GPU: its ZeRO-1 shard of FP32 master weights and BF16 moments
    /// (under DualPipe, whose ranks hold two copies of each stage, half of it).
    pub checkpoint_bytes_per_gpu: u64,
    /// The step loop's stall for a checkpoint: the shard's copy to host memory, seconds.
    pub snapshot_s: f64,
    /// Writing one checkpoint from host memory, seconds (in the background).
    pub checkpoint_write_s: f64,
    /// Reading one checkpoint on recovery, seconds.
    pub restore_s: f64,
    /// H800 GPU-hours per trillion training tokens, without failures.
    pub gpu_hours_per_trillion_tokens: f64,
}

/// Forward FLOPs, bytes and exchanged bytes of one token through a group of layers.
#[derive(Clone, Copy, Debug, Default)]
struct Work {
    /// FP8 GEMM FLOPs other than routed experts.
    gemm: f64,
    /// Routed-expert GEMM FLOPs.
    expert: f64,
    /// BF16 GEMM FLOPs (output heads).
    head: f64,
    /// Attention score and value FLOPs.
    attention: f64,
    /// FLOPs of the up-projections backward recomputes.
    recompute: f64,
    /// Element-wise HBM bytes.
    bytes: f64,
    /// MoE layers (one all-to-all round each way).
    moe_layers: f64,
}

impl Work {
    fn add(&mut self, o: Work) {
        self.gemm += o.gemm;
        self.expert += o.expert;
        self.head += o.head;
        self.attention += o.attention;
        self.recompute += o.recompute;
        self.bytes += o.bytes;
        self.moe_layers += o.moe_layers;
    }
}

/// One layer's forward work per token.
fn layer_work(model: &ModelConfig, moe: bool, seq_len: usize) -> Work {
    let h = model.hidden_size as f64;
    let heads = model.num_attention_heads as f64;
    let qk = model.qk_head_dim() as f64;
    let v = model.v_head_dim as f64;
    let q_lora = model.q_lora_rank.unwrap_or(0) as f64;
    let kv_lora = model.kv_lora_rank as f64;
    let attn_gemm = 2.0 * model.attention_params() as f64;
    let attention = 2.0 * heads * (qk + v) * seq_len as f64 / 2.0;
    let recompute =
        2.0 * (q_lora * heads * qk + kv_lora * heads * (model.qk_nope_head_dim as f64 + v));
    // Element-wise bytes: the attention block's norm, quantizations of GEMM inputs (read BF16,
    // write FP8), the latent norms and RoPE, the up-projections' outputs, the attention output
    // and the residual; the MLP block's norm, each expert's gate/up outputs, SwiGLU and the
    // quantization of its output, the weighted combine and the residual.
    let attn_bytes = 15.0 * h
        + 7.0 * (q_lora + kv_lora + model.qk_rope_head_dim as f64)
        + 4.0 * heads * qk
        + 4.0 * heads * (model.qk_nope_head_dim as f64 + v)
        + 5.0 * heads * v;
    let (mlp_gemm, expert, routes, inner) = if moe {
        let inner = model.moe_intermediate_size as f64;
        let shared = model.n_shared_experts as f64;
        let k = model.num_experts_per_tok as f64;
        let router = 2.0 * model.n_routed_experts as f64 * h;
        (
            2.0 * shared * model.mlp_params(model.moe_intermediate_size) as f64 + router,
            2.0 * k * model.mlp_params(model.moe_intermediate_size) as f64,
            shared + k,
            inner,
        )
    } else {
        (
            2.0 * model.mlp_params(model.intermediate_size) as f64,
            0.0,
            1.0,
            model.intermediate_size as f64,
        )
    };
    let mlp_bytes = 13.0 * h + routes * (13.0 * inner + 4.0 * h);
    Work {
        gemm: attn_gemm + mlp_gemm,
        expert,
        head: 0.0,
        attention,
        recompute,
        bytes: attn_bytes + mlp_bytes,
        moe_layers: if moe { 1.0 } else { 0.0 },
    }
}

/// Per-token forward work of each stage (layers split by [`balanced_layers`]; the last stage
/// also runs the final norm, the output head and the MTP modules).
fn stage_work(model: &ModelConfig, stages: usize, seq_len: usize) -> Vec<Work> {
    let h = model.hidden_size as f64;
    let head = 2.0 * model.vocab_size as f64 * h;
    let split = balanced_layers(model, stages, seq_len);
    let mut first = 0;
    split
        .iter()
        .enumerate()
        .map(|(s, &n)| {
            let mut w = Work::default();
            for i in first..first + n {
                w.add(layer_work(model, model.is_moe_layer(i), seq_len));
            }
            first += n;
            if s + 1 == stages {
                w.head += head;
                for _ in 0..model.num_nextn_predict_layers {
                    w.add(layer_work(model, model.has_moe_layers(), seq_len));
                    w.gemm += 2.0 * 2.0 * h * h;
                    w.head += head;
                }
            }
            w
        })
        .collect()
}

/// Expected other nodes a token's routed experts reach (dispatch crosses InfiniBand once per
/// node), and other devices of its own node (NVLink).
fn reach(model: &ModelConfig, par: &Parallelism, gpus_per_node: usize) -> (f64, f64) {
    let ep = par.ep.max(1) as f64;
    let per_node = (gpus_per_node.max(1) as f64).min(ep);
    let nodes = (ep / per_node).max(1.0);
    let k = model.num_experts_per_tok as f64;
    // Node-limited routing: experts of at most `topk_group` groups, which line up with nodes
    // when there are as many groups as nodes in the group.
    let limit = if model.n_group > 0 && (model.n_group as f64 - nodes).abs() < 0.5 {
        model.topk_group as f64
    } else {
        k
    };
    let nodes_reached = limit.min(k).min(nodes);
    let remote = nodes_reached * (nodes - 1.0) / nodes;
    // Inside a node, the token's experts spread over its devices; at most one copy each.
    let local = (k / nodes_reached).min(per_node) * nodes_reached * (per_node - 1.0) / per_node;
    (remote, local)
}

/// The modelled step of `model` under `par` on nodes of `gpus_per_node` GPUs.
pub fn step_cost(
    model: &ModelConfig,
    par: &Parallelism,
    gpus_per_node: usize,
    hw: &Hardware,
) -> Result<StepCost, SpecError> {
    hw.check()?;
    crate::plan::validate(model, par)?;
    let stages = par.schedule.stages(par.pp);
    let work = stage_work(model, stages, par.seq_len);
    let tokens_chunk = (par.micro_batch_size * par.seq_len) as f64;
    let share = hw.compute_share();
    let fp8 = hw.fp8_tflops * 1e12 * hw.gemm_efficiency * share;
    let bf16 = hw.bf16_tflops * 1e12 * hw.gemm_efficiency * share;
    let attn_f = hw.bf16_tflops * 1e12 * hw.attention_fwd_efficiency * share;
    let attn_b = hw.bf16_tflops * 1e12 * hw.attention_bwd_efficiency * share;
    let hbm = hw.hbm_gbps * 1e9 * hw.hbm_efficiency;
    let (remote, local) = if par.ep > 1 {
        reach(model, par, gpus_per_node)
    } else {
        (0.0, 0.0)
    };
    let h = model.hidden_size as f64;
    let fp8_row = h * (1.0 + 4.0 / 128.0);
    let bf16_row = 2.0 * h;
    let exchange = |rows: f64, a: f64, b: f64| -> f64 {
        (rows * remote * (a + b) / (hw.ib_gbps * 1e9))
            .max(rows * local * (a + b) / (hw.nvlink_gbps * 1e9))
    };
    let expert_scale = if par.ep > 1 { hw.expert_imbalance } else { 1.0 };
    let chunk_of = |w: &Work| -> ChunkTimes {
        let t = tokens_chunk;
        let gemm = t * (w.gemm + w.expert * expert_scale);
        ChunkTimes {
            f_compute: gemm / fp8
                + t * w.head / bf16
                + t * w.attention / attn_f
                + t * w.bytes / hbm,
            b_compute: gemm / fp8
                + t * w.head / bf16
                + t * w.recompute / fp8
                + 2.5 * t * w.attention / attn_b
                + 2.0 * t * w.bytes / hbm,
            w_compute: gemm / fp8 + t * w.head / bf16,
            f_comm: w.moe_layers * exchange(t, fp8_row, bf16_row),
            b_comm: w.moe_layers * exchange(t, bf16_row, bf16_row),
        }
    };
    // The schedule runs every chunk at the costliest stage's times, part by part.
    let chunk = work
        .iter()
        .map(chunk_of)
        .fold(ChunkTimes::default(), |a, c| ChunkTimes {
            f_compute: a.f_compute.max(c.f_compute),
            b_compute: a.b_compute.max(c.b_compute),
            w_compute: a.w_compute.max(c.w_compute),
            f_comm: a.f_comm.max(c.f_comm),
            b_comm: a.b_comm.max(c.b_comm),
        });
    let costs = chunk.costs();
    let schedule = build(par.schedule, par.pp, par.micro_batches)?;
    let timeline = simulate(&schedule, &costs)?;
    let bubble_s = timeline.bubble.iter().copied().fold(0.0, f64::max);

    // ZeRO-1 over the data-parallel group (ring collectives across nodes): FP32 gradients
    // reduce-scattered, BF16 parameters all-gathered; routed experts over the ranks holding the
    // same experts.
    let dp = par.dp.max(1) as f64;
    let expert_dp = (par.dp / par.ep.max(1)).max(1) as f64;
    let ring = |params: f64, n: f64| (n - 1.0) / n * params * (4.0 + 2.0) / (hw.ib_gbps * 1e9);
    let ranks = rank_params(model, par);
    let most =
        |f: &dyn Fn(f64, f64) -> f64| ranks.iter().map(|&(r, x)| f(r, x)).fold(0.0, f64::max);
    let dp_sync_s = most(&|rep, routed| ring(rep, dp) + ring(routed, expert_dp));
    let shard = most(&|rep, routed| rep / dp + routed / expert_dp);
    // DualPipe keeps two copies of every stage; a checkpoint holds one.
    let copies = if par.schedule == Schedule::DualPipe {
        2.0
    } else {
        1.0
    };
    // AdamW over the shard: FP32 master and gradient, BF16 moments, BF16 weights out.
    let optimizer_s = shard * 22.0 / hbm;
    let step_s = timeline.makespan + dp_sync_s + optimizer_s;

    let tokens = (par.dp * par.micro_batches * par.micro_batch_size * par.seq_len) as u64;
    let gpus = par.pp * par.dp;
    let flops_per_token: f64 = work
        .iter()
        .map(|w| 3.0 * (w.gemm + w.expert + w.head) + 3.0 * w.attention)
        .sum();
    let tflops_per_gpu = flops_per_token * tokens as f64 / step_s / gpus as f64 / 1e12;
    let checkpoint_bytes_per_gpu = (shard * 8.0 / copies) as u64;
    let per_node = gpus_per_node.max(1).min(gpus) as f64;
    let node_bytes = checkpoint_bytes_per_gpu as f64 * per_node;
    Ok(StepCost {
        tokens,
        gpus,
        chunk,
        pipeline_s: timeline.makespan,
        bubble_s,
        dp_sync_s,
        optimizer_s,
        step_s,
        flops_per_token,
        tflops_per_gpu,
        checkpoint_bytes_per_gpu,
        snapshot_s: checkpoint_bytes_per_gpu as f64 / (hw.host_copy_gbps * 1e9),
        checkpoint_write_s: node_bytes / (hw.storage_write_gbps * 1e9),
        restore_s: node_bytes / (hw.storage_read_gbps * 1e9),
        gpu_hours_per_trillion_tokens: step_s * gpus as f64 / 3600.0 / tokens as f64 * 1e12,
    })
}

/// `(replicated, routed here)` parameters of each pipeline rank, for the ZeRO-1 shards.
fn rank_params(model: &ModelConfig, par: &Parallelism) -> Vec<(f64, f64)> {
    let split = balanced_layers(model, par.schedule.stages(par.pp), par.seq_len);
    let per_stage = crate::plan::stage_params(model, &split);
    let ep = par.ep.max(1) as u64;
    par.schedule
        .rank_stages(par.pp)
        .iter()
        .map(|held| {
            held.iter().fold((0.0, 0.0), |(a, b), &s| {
                let (rep, routed, _) = per_stage[s];
                (a + rep as f64, b + (routed / ep) as f64)
            })
        })
        .collect()
}
