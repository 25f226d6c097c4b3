//! The DeepSeek-V3 mixture-of-experts gate (router), applied to router logits
//! `[tokens, n_routed_experts]` (the gate's linear projection is done elsewhere).
//!
//! Per token:
//! 1. affinities `s = sigmoid(logits)`;
//! 2. selection scores `s + bias`, where the per-expert `bias` is the auxiliary-loss-free load
//!    balancing term: it steers *which* experts are chosen but never enters the weights;
//! 3. the experts are split into `n_group` equal groups; a group's score is the sum of its two
//!    highest selection scores (its only one for single-expert groups), and the `topk_group`
//!    best groups are kept;
//! 4. the `top_k` experts with the highest selection scores among the kept groups are chosen
//!    (ties go to the lower index, so the routing is deterministic);
//! 5. their gate weights are the *unbiased* affinities, normalised to sum to 1 when
//!    `norm_topk_prob` is set, then multiplied by `routed_scaling_factor`.
//!
//! The backward pass sends the weights' gradient through the scaling, the normalisation and the
//! sigmoid of the chosen experts only; the selection itself is piecewise constant and the bias
//! receives no gradient.

use std::cmp::Ordering;

use rayon::prelude::*;

use crate::error::check_finite;
use crate::tensor::fmt_shape;
use crate::{KernelError, Real, Result, Tensor};

/// Added to the normaliser of the chosen affinities, as in the Hugging Face implementation.
const NORM_EPS: f64 = 1e-20;

/// Configuration of the DeepSeek-V3 gate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GateConfig {
    /// Number of routed experts `E` (256 in DeepSeek-V3).
    pub n_routed_experts: usize,
    /// Experts chosen per token (8 in DeepSeek-V3).
    pub top_k: usize,
    /// Number of expert groups; must divide `n_routed_experts` (8 in DeepSeek-V3).
    pub n_group: usize,
    /// Groups kept per token (4 in DeepSeek-V3).
    pub topk_group: usize,
    /// Factor applied to the gate weights (2.5 in DeepSeek-V3).
    pub routed_scaling_factor: f64,
    /// Whether the chosen affinities are normalised to sum to 1 before scaling.
    pub norm_topk_prob: bool,
}

impl GateConfig {
    /// The gate of DeepSeek-V3 (671B): 256 experts in 8 groups, 4 groups kept, top-8,
    /// normalised weights scaled by 2.5.
    pub fn deepseek_v3() -> Self {
        Self {
            n_routed_experts: 256,
            top_k: 8,
            n_group: 8,
            topk_group: 4,
            routed_scaling_factor: 2.5,
            norm_topk_prob: true,
        }
    }

    /// Experts per group (`n_routed_experts / n_group`; 0 when `n_group` is 0).
    pub fn experts_per_group(&self) -> usize {
        self.n_routed_experts.checked_div(self.n_group).unwrap_or(0)
    }

    /// Checks that the configuration describes a valid gate; the error names the offending field.
    pub fn validate(&self) -> Result<()> {
        let e = self.n_routed_experts;
        if e == 0 || e > u32::MAX as usize {
            return Err(KernelError::invalid(
                "gate.n_routed_experts",
                format!("must be in 1..={}, got {e}", u32::MAX),
            ));
        }
        if self.n_group == 0 || !e.is_multiple_of(self.n_group) {
            return Err(KernelError::invalid(
                "gate.n_group",
                format!(
                    "must be at least 1 and divide n_routed_experts = {e}, got {}",
                    self.n_group
                ),
            ));
        }
        if self.topk_group == 0 || self.topk_group > self.n_group {
            return Err(KernelError::invalid(
                "gate.topk_group",
                format!(
                    "must be in 1..=n_group = {}, got {}",
                    self.n_group, self.topk_group
                ),
            ));
        }
        let reachable = self.topk_group * self.experts_per_group();
        if self.top_k == 0 || self.top_k > reachable {
            return Err(KernelError::invalid(
                "gate.top_k",
                format!(
                    "must be in 1..=topk_group * experts_per_group = {reachable}, got {}",
                    self.top_k
                ),
            ));
        }
        let f = self.routed_scaling_factor;
        if !(f.is_finite() && f > 0.0) {
            return Err(KernelError::invalid(
                "gate.routed_scaling_factor",
                format!("must be finite and > 0, got {f}"),
            ));
        }
        Ok(())
    }
}

/// What [`gate_forward`] returns (and [`gate_backward`] consumes).
#[derive(Clone, Debug, PartialEq)]
pub struct GateOutput<T> {
    /// Chosen experts, `[tokens, top_k]` row-major, each row in descending selection-score order.
    pub indices: Vec<u32>,
    /// Gate weights of the chosen experts, `[tokens, top_k]`, aligned with `indices`.
    pub weights: Tensor<T>,
    /// Sigmoid affinities of every expert, `[tokens, n_routed_experts]` (saved for backward).
    pub affinities: Tensor<T>,
}

/// Numerically stable logistic function.
#[inline]
fn sigmoid<T: Real>(x: T) -> T {
    if x >= T::zero() {
        T::one() / (T::one() + (-x).exp())
    } else {
        let e = x.exp();
        e / (T::one() + e)
    }
}

/// Orders `(score, index)` pairs by descending score, ties toward the lower index.
#[inline]
fn by_score_desc<T: Real>(a: &(T, usize), b: &(T, usize)) -> Ordering {
    b.0.partial_cmp(&a.0)
        .unwrap_or(Ordering::Equal)
        .then(a.1.cmp(&b.1))
}

/// Per-thread scratch space for routing one token.
struct Scratch<T> {
    groups: Vec<(T, usize)>,
    candidates: Vec<(T, usize)>,
}

/// Routes one token: writes its `top_k` experts and weights.
fn route_token<T: Real>(
    aff: &[T],
    bias: &[T],
    cfg: &GateConfig,
    scratch: &mut Scratch<T>,
    indices: &mut [u32],
    weights: &mut [T],
) {
    let per_group = cfg.experts_per_group();
    let sel = |e: usize| aff[e] + bias[e];
    scratch.groups.clear();
    for g in 0..cfg.n_group {
        let mut best = T::neg_infinity();
        let mut second = T::neg_infinity();
        for e in g * per_group..(g + 1) * per_group {
            let s = sel(e);
            if s > best {
                second = best;
                best = s;
            } else if s > second {
                second = s;
            }
        }
        let score = if per_group >= 2 { best + second } else { best };
        scratch.groups.push((score, g));
    }
    scratch.groups.sort_by(by_score_desc);
    scratch.candidates.clear();
    for &(_, g) in &scratch.groups[..cfg.topk_group] {
        for e in g * per_group..(g + 1) * per_group {
            scratch.candidates.push((sel(e), e));
        }
    }
    let k = cfg.top_k;
    if k < scratch.candidates.len() {
        scratch
            .candidates
            .select_nth_unstable_by(k - 1, by_score_desc);
    }
    let chosen = &mut scratch.candidates[..k];
    chosen.sort_by(by_score_desc);
    for (slot, &(_, e)) in indices.iter_mut().zip(chosen.iter()) {
        // `validate` bounds the expert count by u32::MAX.
        *slot = e as u32;
    }
    for (w, &(_, e)) in weights.iter_mut().zip(chosen.iter()) {
        *w = aff[e];
    }
    let scale = T::of(cfg.routed_scaling_factor);
    if cfg.norm_topk_prob {
        let denom = weights.iter().copied().sum::<T>() + T::of(NORM_EPS);
        for w in weights.iter_mut() {
            *w = *w / denom * scale;
        }
    } else {
        for w in weights.iter_mut() {
            *w *= scale;
        }
    }
}

/// The DeepSeek-V3 gate: routes each token (row of `logits`, `[tokens, n_routed_experts]`) to
/// `cfg.top_k` experts and computes their gate weights (see the module documentation).
///
/// `bias` (length `n_routed_experts`) is the auxiliary-loss-free balancing bias; it is added to
/// the affinities for the choice of groups and experts only. Fails on an invalid `cfg`, on
/// mismatched shapes (`"gate.logits"`, `"gate.bias"`) and on non-finite logits or bias.
pub fn gate_forward<T: Real>(
    logits: &Tensor<T>,
    bias: &[T],
    cfg: &GateConfig,
) -> Result<GateOutput<T>> {
    cfg.validate()?;
    let e = cfg.n_routed_experts;
    let dims = logits.expect_rank("gate.logits", 2)?;
    if dims[1] != e {
        return Err(KernelError::shape(
            "gate.logits",
            format!("[tokens, {e}] (n_routed_experts columns)"),
            fmt_shape(dims),
        ));
    }
    let tokens = dims[0];
    if bias.len() != e {
        return Err(KernelError::shape(
            "gate.bias",
            format!("[{e}] (one per routed expert)"),
            format!("[{}]", bias.len()),
        ));
    }
    logits.check_finite("gate.logits")?;
    check_finite("gate.bias", bias)?;

    let affinities: Vec<T> = logits.data().par_iter().map(|&x| sigmoid(x)).collect();
    let k = cfg.top_k;
    let mut indices = vec![0u32; tokens * k];
    let mut weights = vec![T::zero(); tokens * k];
    indices
        .par_chunks_mut(k)
        .zip(weights.par_chunks_mut(k))
        .zip(affinities.par_chunks(e))
        .for_each_init(
            || Scratch {
                groups: Vec::with_capacity(cfg.n_group),
                candidates: Vec::with_capacity(e),
            },
            |scratch, ((idx, w), aff)| route_token(aff, bias, cfg, scratch, idx, w),
        );
    Ok(GateOutput {
        indices,
        weights: Tensor::from_parts(vec![tokens, k], weights),
        affinities: Tensor::from_parts(vec![tokens, e], affinities),
    })
}

/// Tokens routed to each expert: `load[e]` counts the entries of `indices` equal to `e`.
///
/// Used by the auxiliary-loss-free bias update. Entries `>= n_experts` (which [`gate_forward`]
/// never produces) are not counted.
pub fn expert_load(indices: &[u32], n_experts: usize) -> Vec<usize> {
    let mut load = vec![0usize; n_experts];
    for &i in indices {
        if let Some(c) = load.get_mut(i as usize) {
            *c += 1;
        }
    }
    load
}

/// Backward of [`gate_forward`]: the gradient of the loss with respect to the router logits,
/// `[tokens, n_routed_experts]`, given `dweights` (`[tokens, top_k]`, the gradient with respect
/// to `out.weights`).
///
/// The gradient flows through the chosen experts' affinities only (scaling, normalisation when
/// `cfg.norm_topk_prob`, then `sigmoid'`); every other logit gets exactly zero. The bias gets no
/// gradient.
pub fn gate_backward<T: Real>(
    dweights: &Tensor<T>,
    out: &GateOutput<T>,
    cfg: &GateConfig,
) -> Result<Tensor<T>> {
    cfg.validate()?;
    let (e, k) = (cfg.n_routed_experts, cfg.top_k);
    let dims = out.affinities.expect_rank("gate.affinities", 2)?;
    if dims[1] != e {
        return Err(KernelError::shape(
            "gate.affinities",
            format!("[tokens, {e}] (n_routed_experts columns)"),
            fmt_shape(dims),
        ));
    }
    let tokens = dims[0];
    dweights.expect_shape("gate.dweights", &[tokens, k])?;
    if out.indices.len() != tokens * k {
        return Err(KernelError::shape(
            "gate.indices",
            format!("{} entries ([{tokens}, {k}])", tokens * k),
            format!("{} entries", out.indices.len()),
        ));
    }
    if let Some((position, &index)) = out
        .indices
        .iter()
        .enumerate()
        .find(|&(_, &i)| i as usize >= e)
    {
        return Err(KernelError::IndexOutOfRange {
            operand: "gate.indices",
            position,
            index: index as usize,
            bound: e,
        });
    }
    dweights.check_finite("gate.dweights")?;
    out.affinities.check_finite("gate.affinities")?;

    let scale = cfg.routed_scaling_factor;
    let mut dlogits = vec![T::zero(); tokens * e];
    dlogits
        .par_chunks_mut(e)
        .zip(out.indices.par_chunks(k))
        .zip(dweights.data().par_chunks(k))
        .zip(out.affinities.data().par_chunks(e))
        .for_each(|(((dl, idx), dw), aff)| {
            let a = |j: usize| aff[idx[j] as usize].f64();
            // d loss / d affinity of the j-th chosen expert.
            let (denom, dot) = if cfg.norm_topk_prob {
                let sum: f64 = (0..k).map(a).sum::<f64>() + NORM_EPS;
                let dot: f64 = (0..k).map(|j| dw[j].f64() * a(j)).sum();
                (sum, dot)
            } else {
                (1.0, 0.0)
            };
            for j in 0..k {
                let aj = a(j);
                let da = if cfg.norm_topk_prob {
                    scale * (dw[j].f64() - dot / denom) / denom
                } else {
                    scale * dw[j].f64()
                };
                let slot = &mut dl[idx[j] as usize];
                *slot = T::of(slot.f64() + da * aj * (1.0 - aj));
            }
        });
    Ok(Tensor::from_parts(vec![tokens, e], dlogits))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fd::{assert_grad_close, dot, numeric_grad, rand_tensor};

    fn cfg(e: usize, top_k: usize, n_group: usize, topk_group: usize) -> GateConfig {
        GateConfig {
            n_routed_experts: e,
            top_k,
            n_group,
            topk_group,
            routed_scaling_factor: 2.5,
            norm_topk_prob: true,
        }
    }

    fn row(values: &[f64]) -> Tensor<f64> {
        Tensor::new([1, values.len()], values.to_vec()).unwrap()
    }

    fn sig(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    /// Group 0 holds the single best expert but loses on its top-2 sum.
    const GROUPED: [f64; 8] = [5.0, -5.0, 2.0, 1.9, 1.5, 1.4, -3.0, -3.1];

    #[test]
    fn selection_respects_group_limits() {
        let c = cfg(8, 3, 4, 2);
        let out = gate_forward(&row(&GROUPED), &[0.0; 8], &c).unwrap();
        // Groups 1 ({2, 3}) and 2 ({4, 5}) win; expert 0, the best single one, is excluded.
        assert_eq!(out.indices, vec![2, 3, 4]);
        assert!(!out.indices.contains(&0));
        // Without group limits expert 0 would be first.
        let flat = cfg(8, 3, 1, 1);
        let out = gate_forward(&row(&GROUPED), &[0.0; 8], &flat).unwrap();
        assert_eq!(out.indices, vec![0, 2, 3]);
        // Single-expert groups: the group score is the expert's own score.
        let single = cfg(8, 3, 8, 3);
        let out = gate_forward(&row(&GROUPED), &[0.0; 8], &single).unwrap();
        assert_eq!(out.indices, vec![0, 2, 3]);
    }

    #[test]
    fn bias_changes_selection_but_not_weights() {
        let c = cfg(8, 2, 4, 2);
        let logits = row(&GROUPED);
        let plain = gate_forward(&logits, &[0.0; 8], &c).unwrap();
        assert_eq!(plain.indices, vec![2, 3]);
        // Push expert 5 (group 2) above everything and expert 3 down.
        let mut bias = [0.0; 8];
        bias[5] = 0.5;
        bias[3] = -0.3;
        let biased = gate_forward(&logits, &bias, &c).unwrap();
        assert_eq!(biased.indices, vec![5, 2]);
        assert_eq!(biased.affinities, plain.affinities);
        let (a5, a2) = (sig(1.4), sig(2.0));
        let want = [2.5 * a5 / (a5 + a2), 2.5 * a2 / (a5 + a2)];
        for (w, x) in biased.weights.data().iter().zip(want) {
            assert!((w - x).abs() < 1e-14, "{w} vs {x}");
        }
        // A large bias can also pull a whole group in.
        let mut bias = [0.0; 8];
        bias[7] = 10.0;
        let biased = gate_forward(&logits, &bias, &c).unwrap();
        assert_eq!(biased.indices, vec![7, 2]);
        let (a7, a2) = (sig(-3.1), sig(2.0));
        assert!((biased.weights.data()[0] - 2.5 * a7 / (a7 + a2)).abs() < 1e-14);
    }

    #[test]
    fn normalised_weights_sum_to_scaling_factor() {
        let c = GateConfig {
            n_routed_experts: 32,
            top_k: 6,
            n_group: 8,
            topk_group: 3,
            routed_scaling_factor: 2.5,
            norm_topk_prob: true,
        };
        let logits = rand_tensor(&[50, 32], 1).map(|x| 4.0 * x);
        let bias: Vec<f64> = rand_tensor(&[32], 2)
            .data()
            .iter()
            .map(|x| 0.1 * x)
            .collect();
        let out = gate_forward(&logits, &bias, &c).unwrap();
        assert_eq!(out.weights.shape(), &[50, 6]);
        assert_eq!(out.indices.len(), 50 * 6);
        for (t, w) in out.weights.data().chunks(6).enumerate() {
            assert!((w.iter().sum::<f64>() - 2.5).abs() < 1e-12, "token {t}");
            let idx = &out.indices[t * 6..(t + 1) * 6];
            // Distinct experts from at most topk_group groups, in descending selection order.
            let mut groups: Vec<u32> = idx.iter().map(|i| i / 4).collect();
            groups.sort_unstable();
            groups.dedup();
            assert!(groups.len() <= 3);
            let sel: Vec<f64> = idx
                .iter()
                .map(|&i| out.affinities.data()[t * 32 + i as usize] + bias[i as usize])
                .collect();
            assert!(sel.windows(2).all(|p| p[0] > p[1]));
        }
        // Unnormalised: the scaled affinities themselves.
        let raw = GateConfig {
            norm_topk_prob: false,
            ..c
        };
        let out2 = gate_forward(&logits, &bias, &raw).unwrap();
        assert_eq!(out2.indices, out.indices);
        for (t, w) in out2.weights.data().chunks(6).enumerate() {
            for (j, &wj) in w.iter().enumerate() {
                let e = out2.indices[t * 6 + j] as usize;
                assert!((wj - 2.5 * sig(logits.data()[t * 32 + e])).abs() < 1e-14);
            }
        }
        // f32 agrees.
        let out32 = gate_forward(
            &logits.cast::<f32>(),
            &bias.iter().map(|&b| b as f32).collect::<Vec<_>>(),
            &c,
        )
        .unwrap();
        assert!(
            out32
                .weights
                .cast::<f64>()
                .max_abs_diff(&out.weights)
                .unwrap()
                < 1e-5
        );
    }

    #[test]
    fn ties_break_toward_lower_index() {
        let c = cfg(16, 5, 4, 2);
        let logits = Tensor::<f64>::zeros([3, 16]);
        let first = gate_forward(&logits, &[0.0; 16], &c).unwrap();
        // All groups tie: groups 0 and 1 are kept; experts 0..5 are chosen in order.
        for t in 0..3 {
            assert_eq!(&first.indices[t * 5..(t + 1) * 5], &[0, 1, 2, 3, 4]);
        }
        for w in first.weights.data() {
            assert!((w - 0.5).abs() < 1e-15);
        }
        for _ in 0..5 {
            assert_eq!(gate_forward(&logits, &[0.0; 16], &c).unwrap(), first);
        }
        // Partial ties: group 2 wins alone; among the tied rest, the lower group and expert win.
        let mut l = vec![0.0; 16];
        l[9] = 1.0;
        l[10] = 1.0;
        let out = gate_forward(&row(&l), &[0.0; 16], &c).unwrap();
        assert_eq!(out.indices, vec![9, 10, 0, 1, 2]);
    }

    /// Logits with clear gaps: group ranks spaced by 1, expert ranks within a group by 0.1, so
    /// no selection flips under a finite-difference step.
    fn gapped_logits(tokens: usize, e: usize, per_group: usize, seed: u64) -> Tensor<f64> {
        let perm = |n: usize, s: u64| {
            let r = rand_tensor(&[n], s);
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| r.data()[a].total_cmp(&r.data()[b]));
            let mut rank = vec![0; n];
            for (pos, &i) in order.iter().enumerate() {
                rank[i] = pos;
            }
            rank
        };
        let groups = e / per_group;
        let mut data = Vec::with_capacity(tokens * e);
        for t in 0..tokens {
            let seed = seed + 100 * t as u64;
            let gr = perm(groups, seed);
            let er = perm(e, seed + 1);
            for x in 0..e {
                data.push(
                    -2.0 + gr[x / per_group] as f64
                        + 0.1 * (er[x] % per_group) as f64
                        + 0.011 * (er[x] / per_group) as f64,
                );
            }
        }
        Tensor::new([tokens, e], data).unwrap()
    }

    #[test]
    fn backward_matches_finite_differences() {
        for norm in [true, false] {
            let c = GateConfig {
                n_routed_experts: 16,
                top_k: 3,
                n_group: 4,
                topk_group: 2,
                routed_scaling_factor: 2.5,
                norm_topk_prob: norm,
            };
            let logits = gapped_logits(5, 16, 4, 9);
            let bias = vec![0.0; 16];
            let out = gate_forward(&logits, &bias, &c).unwrap();
            let g = rand_tensor(&[5, 3], 77);
            let dlogits = gate_backward(&g, &out, &c).unwrap();
            let num = numeric_grad(&logits, |x| {
                let o = gate_forward(x, &bias, &c).unwrap();
                assert_eq!(
                    o.indices, out.indices,
                    "selection flipped under the fd step"
                );
                dot(&g, &o.weights)
            });
            assert_grad_close("gate dlogits", &dlogits, &num, 1e-7);
            // Zero outside the chosen experts.
            for t in 0..5 {
                let chosen = &out.indices[t * 3..(t + 1) * 3];
                for x in 0..16 {
                    if !chosen.contains(&(x as u32)) {
                        assert_eq!(dlogits.data()[t * 16 + x], 0.0);
                    }
                }
            }
        }
    }

    #[test]
    fn config_validation_names_the_field() {
        GateConfig::deepseek_v3().validate().unwrap();
        let base = cfg(16, 4, 4, 2);
        base.validate().unwrap();
        let cases = [
            (
                GateConfig {
                    n_routed_experts: 0,
                    ..base
                },
                "gate.n_routed_experts",
            ),
            (GateConfig { n_group: 3, ..base }, "gate.n_group"),
            (GateConfig { n_group: 0, ..base }, "gate.n_group"),
            (
                GateConfig {
                    topk_group: 0,
                    ..base
                },
                "gate.topk_group",
            ),
            (
                GateConfig {
                    topk_group: 5,
                    ..base
                },
                "gate.topk_group",
            ),
            (GateConfig { top_k: 0, ..base }, "gate.top_k"),
            (GateConfig { top_k: 9, ..base }, "gate.top_k"),
            (
                GateConfig {
                    routed_scaling_factor: 0.0,
                    ..base
                },
                "gate.routed_scaling_factor",
            ),
            (
                GateConfig {
                    routed_scaling_factor: f64::NAN,
                    ..base
                },
                "gate.routed_scaling_factor",
            ),
        ];
        for (c, field) in cases {
            match c.validate() {
                Err(KernelError::InvalidArgument { name, .. }) => assert_eq!(name, field, "{c:?}"),
                other => panic!("{c:?}: expected an error naming {field}, got {other:?}"),
            }
            let err = gate_forward(&Tensor::<f64>::zeros([1, 16]), &[0.0; 16], &c).unwrap_err();
            assert!(err.to_string().contains(field), "{err}");
        }
        // top_k may use every expert of the kept groups.
        GateConfig { top_k: 8, ..base }.validate().unwrap();
    }

    #[test]
    fn bad_operands_are_refused() {
        let c = cfg(8, 2, 4, 2);
        let err = gate_forward(&row(&GROUPED), &[0.0; 7], &c).unwrap_err();
        assert!(err.to_string().contains("gate.bias"), "{err}");
        let err = gate_forward(&Tensor::<f64>::zeros([2, 6]), &[0.0; 8], &c).unwrap_err();
        assert!(err.to_string().contains("gate.logits"), "{err}");
        let err = gate_forward(&Tensor::<f64>::zeros([16]), &[0.0; 8], &c).unwrap_err();
        assert!(err.to_string().contains("gate.logits"), "{err}");
        let mut l = GROUPED;
        l[4] = f64::NAN;
        assert!(matches!(
            gate_forward(&row(&l), &[0.0; 8], &c).unwrap_err(),
            KernelError::NonFinite {
                operand: "gate.logits",
                index: 4,
                ..
            }
        ));
        let mut b = [0.0; 8];
        b[1] = f64::INFINITY;
        assert!(matches!(
            gate_forward(&row(&GROUPED), &b, &c).unwrap_err(),
            KernelError::NonFinite {
                operand: "gate.bias",
                index: 1,
                ..
            }
        ));
        let out = gate_forward(&row(&GROUPED), &[0.0; 8], &c).unwrap();
        let err = gate_backward(&Tensor::<f64>::zeros([1, 3]), &out, &c).unwrap_err();
        assert!(err.to_string().contains("gate.dweights"), "{err}");
        let mut broken = out.clone();
        broken.indices[1] = 8;
        assert!(matches!(
            gate_backward(&Tensor::zeros([1, 2]), &broken, &c).unwrap_err(),
            KernelError::IndexOutOfRange {
                operand: "gate.indices",
                position: 1,
                index: 8,
                bound: 8
            }
        ));
        broken.indices.pop();
        let err = gate_backward(&Tensor::zeros([1, 2]), &broken, &c).unwrap_err();
        assert!(err.to_string().contains("gate.indices"), "{err}");
        // No tokens is fine.
        let empty = gate_forward(&Tensor::<f64>::zeros([0, 8]), &[0.0; 8], &c).unwrap();
        assert!(empty.indices.is_empty());
        assert_eq!(
            gate_backward(&Tensor::zeros([0, 2]), &empty, &c)
                .unwrap()
                .shape(),
            &[0, 8]
        );
    }

    #[test]
    fn extreme_logits_are_stable() {
        let c = cfg(8, 2, 4, 2);
        let l = [800.0, -800.0, 700.0, -700.0, 0.0, 0.0, -1e300, 1e300];
        let out = gate_forward(&row(&l), &[0.0; 8], &c).unwrap();
        assert!(
            out.affinities
                .data()
                .iter()
                .all(|a| a.is_finite() && (0.0..=1.0).contains(a))
        );
        assert!(out.weights.data().iter().all(|w| w.is_finite()));
        let d = gate_backward(&Tensor::full([1, 2], 1.0), &out, &c).unwrap();
        assert!(d.data().iter().all(|x| x.is_finite()));
    }

    #[test]
    fn expert_load_counts_tokens_per_expert() {
        assert_eq!(expert_load(&[0, 2, 2, 3, 0, 2], 5), vec![2, 0, 3, 1, 0]);
        assert_eq!(expert_load(&[], 3), vec![0, 0, 0]);
        // Out-of-range entries are ignored rather than panicking.
        assert_eq!(expert_load(&[1, 7], 2), vec![0, 1]);
        let c = cfg(16, 4, 4, 2);
        let out = gate_forward(&rand_tensor(&[20, 16], 5), &[0.0; 16], &c).unwrap();
        let load = expert_load(&out.indices, 16);
        assert_eq!(load.iter().sum::<usize>(), 20 * 4);
    }
}
