//! DeepSeekMoE: shared experts on every token plus routed experts chosen by the gate.
//!
//! * The router (`mlp.gate.weight`) runs in FP32 whatever the precision mode, as the report keeps
//!   the gating in higher precision.
//! * Routing is the gate of `shoal-kernels` (sigmoid affinities, per-expert bias for selection
//!   only, group-limited top-k, normalised weights times the routed scaling factor).
//! * Routed experts compute on the tokens grouped by expert, with no token dropping.
//! * The sequence-wise balance loss `alpha * sum_i f_i P_i` (per sequence, averaged over the
//!   micro-batch) adds its gradient to the router logits.
//! * Expert loads are returned for the auxiliary-loss-free bias update.

use rayon::prelude::*;
use shoal_kernels::Tensor;
use shoal_kernels::ops::linear::Precision;
use shoal_kernels::ops::moe_gate::{
    GateConfig, GateOutput, expert_load, gate_backward, gate_forward,
};
use shoal_spec::ModelConfig;

use super::ctx::Ctx;
use super::linear::{ModelFloat, Saved};
use super::mlp::{Mlp, MlpSaved};
use super::params::{Init, Layout, ParamId, ParamStore, Trainable};
use super::tensor_ops::gather_rows;
use super::wgrad::WTask;
use crate::Result;

/// One MoE layer's parameters.
#[derive(Clone, Debug)]
pub struct Moe {
    pub(super) router: ParamId,
    pub(super) bias: ParamId,
    pub(super) experts: Vec<Mlp>,
    pub(super) shared: Option<Mlp>,
    pub(super) gate: GateConfig,
}

pub(super) struct ExpertSaved<T> {
    rows: Vec<usize>,
    slots: Vec<usize>,
    mlp: MlpSaved<T>,
    out: Tensor<T>,
}

/// What the forward pass keeps.
pub struct MoeSaved<T> {
    pub(super) gate: GateOutput<T>,
    pub(super) experts: Vec<Option<ExpertSaved<T>>>,
    pub(super) shared: Option<MlpSaved<T>>,
    /// With expert parallelism: what this rank sent and served.
    pub(super) ep: Option<Box<super::moe_ep::EpSaved<T>>>,
}

impl<T> std::fmt::Debug for MoeSaved<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MoeSaved")
            .field("experts", &self.experts.len())
            .finish()
    }
}

/// Routing statistics of one forward pass.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeStats {
    /// Tokens routed to each expert.
    pub load: Vec<usize>,
    /// The sequence-wise balance loss before `alpha` (mean over sequences of `sum_i f_i P_i`).
    pub balance: f64,
}

impl Moe {
    /// Declares `{prefix}.gate`, `.experts.j.*` and `.shared_experts.*`.
    pub fn declare(layout: &mut Layout, prefix: &str, cfg: &ModelConfig) -> Self {
        let (h, e, std) = (cfg.hidden_size, cfg.n_routed_experts, cfg.initializer_range);
        let router = layout.add(
            format!("{prefix}.gate.weight"),
            vec![e, h],
            Init::Normal(std),
            Trainable::Yes,
        );
        let bias = layout.add(
            format!("{prefix}.gate.e_score_correction_bias"),
            vec![e],
            Init::Zeros,
            Trainable::No,
        );
        let experts = (0..e)
            .map(|j| {
                Mlp::declare(
                    layout,
                    &format!("{prefix}.experts.{j}"),
                    h,
                    cfg.moe_intermediate_size,
                    std,
                )
            })
            .collect();
        let shared = (cfg.n_shared_experts > 0).then(|| {
            Mlp::declare(
                layout,
                &format!("{prefix}.shared_experts"),
                h,
                cfg.moe_intermediate_size * cfg.n_shared_experts,
                std,
            )
        });
        Self {
            router,
            bias,
            experts,
            shared,
            gate: GateConfig {
                n_routed_experts: e,
                top_k: cfg.num_experts_per_tok,
                n_group: cfg.n_group,
                topk_group: cfg.topk_group,
                routed_scaling_factor: cfg.routed_scaling_factor,
                norm_topk_prob: cfg.norm_topk_prob,
            },
        }
    }

    /// The per-expert bias parameter (updated by the balancing rule, not by gradients).
    pub fn bias(&self) -> ParamId {
        self.bias
    }

    /// Forward on `x: [tokens, hidden]`.
    pub fn forward<T: ModelFloat>(
        &self,
        p: &ParamStore<T>,
        x: &Tensor<T>,
        ctx: &Ctx<'_>,
    ) -> Result<(Tensor<T>, MoeSaved<T>, MoeStats)> {
        if let Some(ex) = ctx.experts {
            return self.forward_ep(p, x, ctx, ex);
        }
        let (tokens, hidden) = (x.rows(), x.last_dim());
        let router_span = tracing::debug_span!("moe.router").entered();
        let logits = T::linear(x, p, self.router, Precision::Fp32)?;
        let gate = gate_forward(&logits, p.get(self.bias).data(), &self.gate)?;
        drop(router_span);
        let k = self.gate.top_k;
        let e = self.gate.n_routed_experts;
        let mut by_expert: Vec<(Vec<usize>, Vec<usize>)> = vec![(Vec::new(), Vec::new()); e];
        for (pos, &ex) in gate.indices.iter().enumerate() {
            let (rows, slots) = &mut by_expert[ex as usize];
            rows.push(pos / k);
            slots.push(pos % k);
        }
        let shared_span = tracing::debug_span!("moe.shared").entered();
        let mut y = match &self.shared {
            Some(m) => {
                let (y, s) = m.forward(p, x, ctx)?;
                (y, Some(s))
            }
            None => (Tensor::zeros([tokens, hidden]), None),
        };
        drop(shared_span);
        let experts_span = tracing::debug_span!("moe.experts").entered();
        // Experts run in parallel (each on its own tokens); results are combined in expert order,
        // so the output does not depend on the thread count.
        let outputs = by_expert
            .par_iter()
            .enumerate()
            .map(|(j, (rows, _))| {
                if rows.is_empty() {
                    return Ok(None);
                }
                let xe = gather_rows(x, rows)?;
                self.experts[j].forward(p, &xe, ctx).map(Some)
            })
            .collect::<Result<Vec<_>>>()?;
        drop(experts_span);
        let _span = tracing::debug_span!("moe.combine").entered();
        let mut experts = Vec::with_capacity(e);
        for ((rows, slots), out) in by_expert.into_iter().zip(outputs) {
            let Some((out, mlp)) = out else {
                experts.push(None);
                continue;
            };
            let yd = y.0.data_mut();
            for (r, (&t, &slot)) in rows.iter().zip(&slots).enumerate() {
                let wgt = gate.weights.data()[t * k + slot];
                let src = &out.data()[r * hidden..(r + 1) * hidden];
                for (o, &v) in yd[t * hidden..(t + 1) * hidden].iter_mut().zip(src) {
                    *o += wgt * v;
                }
            }
            experts.push(Some(ExpertSaved {
                rows,
                slots,
                mlp,
                out,
            }));
        }
        let stats = MoeStats {
            load: expert_load(&gate.indices, e),
            balance: self.balance(&gate, ctx, None)?,
        };
        Ok((
            y.0,
            MoeSaved {
                gate,
                experts,
                shared: y.1,
                ep: None,
            },
            stats,
        ))
    }

    /// The sequence-wise balance loss (mean over sequences of `sum_i f_i P_i`), and, when `grad`
    /// is given, adds `scale * d loss / d logits` into it.
    pub(super) fn balance<T: ModelFloat>(
        &self,
        gate: &GateOutput<T>,
        ctx: &Ctx<'_>,
        grad: Option<(&mut Tensor<T>, f64)>,
    ) -> Result<f64> {
        let (e, k) = (self.gate.n_routed_experts, self.gate.top_k);
        let (seqs, len) = (ctx.batch, ctx.seq);
        let aff = gate.affinities.data();
        let mut total = 0.0;
        let mut grad = grad;
        for s in 0..seqs {
            let rows = s * len..(s + 1) * len;
            let mut count = vec![0f64; e];
            for t in rows.clone() {
                for &ex in &gate.indices[t * k..(t + 1) * k] {
                    count[ex as usize] += 1.0;
                }
            }
            let f: Vec<f64> = count
                .iter()
                .map(|c| c * e as f64 / (k as f64 * len as f64))
                .collect();
            let mut p_i = vec![0f64; e];
            for t in rows.clone() {
                let a = &aff[t * e..(t + 1) * e];
                let sum: f64 = a.iter().map(|v| v.f64()).sum();
                for (pi, v) in p_i.iter_mut().zip(a) {
                    *pi += v.f64() / sum / len as f64;
                }
            }
            total += f.iter().zip(&p_i).map(|(a, b)| a * b).sum::<f64>();
            if let Some((g, scale)) = grad.as_mut() {
                // d/d s'_{t,i} = scale * f_i / len; s' = a / sum(a); a = sigmoid(logit).
                let gd = g.data_mut();
                for t in rows {
                    let a = &aff[t * e..(t + 1) * e];
                    let sum: f64 = a.iter().map(|v| v.f64()).sum();
                    let gs: Vec<f64> = f
                        .iter()
                        .map(|fi| *scale / seqs as f64 * fi / len as f64)
                        .collect();
                    let dot: f64 = gs.iter().zip(a).map(|(g, v)| g * v.f64() / sum).sum();
                    for j in 0..e {
                        let aj = a[j].f64();
                        let da = (gs[j] - dot) / sum;
                        gd[t * e + j] += T::of(da * aj * (1.0 - aj));
                    }
                }
            }
        }
        Ok(total / seqs.max(1) as f64)
    }

    /// B pass given the forward input `x`; pushes the W work.
    pub fn backward<T: ModelFloat>(
        &self,
        p: &ParamStore<T>,
        x: Tensor<T>,
        saved: MoeSaved<T>,
        dy: Tensor<T>,
        ctx: &Ctx<'_>,
        w: &mut Vec<WTask<T>>,
    ) -> Result<Tensor<T>> {
        if let (Some(ex), Some(_)) = (ctx.experts, saved.ep.as_ref()) {
            return self.backward_ep(p, x, saved, dy, ctx, ex, w);
        }
        let (tokens, hidden) = (x.rows(), x.last_dim());
        let k = self.gate.top_k;
        let shared_span = tracing::debug_span!("moe.shared").entered();
        // The router's W work keeps `x` in FP32; the shared experts share that copy in FP32
        // mode.
        let x = std::sync::Arc::new(x);
        let mut dx = match (&self.shared, saved.shared) {
            (Some(m), Some(s)) => {
                let xs = T::save_shared(&x, ctx.precision)?;
                m.backward(p, xs, s, dy.clone(), ctx, w)?
            }
            _ => Tensor::zeros([tokens, hidden]),
        };
        let mut dweights = Tensor::zeros([tokens, k]);
        let weights = saved.gate.weights.data();
        drop(shared_span);
        let experts_span = tracing::debug_span!("moe.experts").entered();
        // Experts run their backward in parallel; gradients are combined in expert order.
        let per_expert = saved
            .experts
            .into_par_iter()
            .enumerate()
            .map(|(j, es)| {
                let Some(es) = es else { return Ok(None) };
                let n = es.rows.len();
                let mut dye = Vec::with_capacity(n * hidden);
                let mut dw = Vec::with_capacity(n);
                for (r, (&t, &slot)) in es.rows.iter().zip(&es.slots).enumerate() {
                    let wgt = weights[t * k + slot];
                    let dyt = &dy.data()[t * hidden..(t + 1) * hidden];
                    let out = &es.out.data()[r * hidden..(r + 1) * hidden];
                    dw.push(shoal_kernels::real::dot(dyt, out));
                    dye.extend(dyt.iter().map(|&v| v * wgt));
                }
                let dye = Tensor::new([n, hidden], dye)?;
                let xe = T::save(gather_rows(&x, &es.rows)?, ctx.precision)?;
                let mut tasks = Vec::new();
                let dxe = self.experts[j].backward(p, xe, es.mlp, dye, ctx, &mut tasks)?;
                Ok(Some((es.rows, es.slots, dw, dxe, tasks)))
            })
            .collect::<Result<Vec<_>>>()?;
        for (rows, slots, dw, dxe, tasks) in per_expert.into_iter().flatten() {
            let dxd = dx.data_mut();
            for (r, (&t, &slot)) in rows.iter().zip(&slots).enumerate() {
                dweights.data_mut()[t * k + slot] = dw[r];
                for (o, &v) in dxd[t * hidden..(t + 1) * hidden]
                    .iter_mut()
                    .zip(&dxe.data()[r * hidden..(r + 1) * hidden])
                {
                    *o += v;
                }
            }
            w.extend(tasks);
        }
        drop(experts_span);
        self.router_backward(p, x, &saved.gate, &dweights, dx, ctx, w)
    }

    /// The router's B pass (gate weights and balance loss back to the logits, then through the
    /// FP32 router) added to `dx`; pushes the router's W work.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn router_backward<T: ModelFloat>(
        &self,
        p: &ParamStore<T>,
        x: std::sync::Arc<Tensor<T>>,
        gate: &GateOutput<T>,
        dweights: &Tensor<T>,
        mut dx: Tensor<T>,
        ctx: &Ctx<'_>,
        w: &mut Vec<WTask<T>>,
    ) -> Result<Tensor<T>> {
        let _span = tracing::debug_span!("moe.router").entered();
        let mut dlogits = gate_backward(dweights, gate, &self.gate)?;
        if ctx.balance_alpha != 0.0 {
            self.balance(gate, ctx, Some((&mut dlogits, ctx.balance_alpha)))?;
        }
        let (dxr, dlogits) = T::linear_b(dlogits, p, self.router, Precision::Fp32)?;
        dx.add_assign(&dxr, "moe.dx")?;
        w.push(WTask::Linear {
            param: self.router,
            dy: dlogits,
            x: Saved::Full(x),
        });
        Ok(dx)
    }
}
