//! AdamW on FP32 master weights, with the moments kept in FP32 or (as DeepSeek-V3 does) in BF16,
//! and global gradient-norm clipping.
//!
//! One step, with `t` the step number after increment and `g` the gradient:
//!
//! ```text
//! p <- p * (1 - lr * weight_decay)                 (decoupled weight decay)
//! m <- beta1 * m + (1 - beta1) * g
//! v <- beta2 * v + (1 - beta2) * g^2
//! p <- p - lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)
//! ```
//!
//! The moments are updated in FP32; with BF16 moments they are loaded from BF16, updated in FP32,
//! used for this step's update at FP32 and stored rounded to nearest even. Every element is
//! independent, so the result does not depend on the thread count.

use half::bf16;
use rayon::prelude::*;

use crate::{KernelError, Result};

/// Elements handed to one rayon task in the element-wise loops.
const CHUNK: usize = 1 << 14;

/// Added to the gradient norm before dividing in [`clip_grad_norm`].
const CLIP_EPS: f64 = 1e-6;

/// AdamW hyper-parameters. [`Default`] gives DeepSeek-V3's values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Peak learning rate (DeepSeek-V3: 2.2e-4). [`adamw_step`] takes the current, scheduled rate
    /// as an argument; this is the value a schedule scales.
    pub lr: f32,
    /// Decay of the first moment (0.9).
    pub beta1: f32,
    /// Decay of the second moment (0.95).
    pub beta2: f32,
    /// Added to the bias-corrected RMS of the gradient (1e-8).
    pub eps: f32,
    /// Decoupled weight decay (0.1).
    pub weight_decay: f32,
    /// Keep the moments in BF16 instead of FP32 (DeepSeek-V3 does).
    pub bf16_moments: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 2.2e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            bf16_moments: true,
        }
    }
}

fn check_lr(name: &'static str, lr: f32) -> Result<()> {
    if lr.is_finite() && lr >= 0.0 {
        Ok(())
    } else {
        Err(KernelError::invalid(
            name,
            format!("must be finite and >= 0, got {lr}"),
        ))
    }
}

fn check_beta(name: &'static str, beta: f32) -> Result<()> {
    if (0.0..1.0).contains(&beta) {
        Ok(())
    } else {
        Err(KernelError::invalid(
            name,
            format!("must be in [0, 1), got {beta}"),
        ))
    }
}

impl AdamWConfig {
    /// Checks the ranges: `lr` finite and `>= 0`, betas in `[0, 1)`, `eps` finite and `> 0`,
    /// `weight_decay` finite and `>= 0`.
    pub fn validate(&self) -> Result<()> {
        check_lr("adamw.config.lr", self.lr)?;
        check_beta("adamw.beta1", self.beta1)?;
        check_beta("adamw.beta2", self.beta2)?;
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(KernelError::invalid(
                "adamw.eps",
                format!("must be finite and > 0, got {}", self.eps),
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(KernelError::invalid(
                "adamw.weight_decay",
                format!("must be finite and >= 0, got {}", self.weight_decay),
            ));
        }
        // A BF16 value has 8 significant bits: multiplying by beta changes it by less than half
        // an ULP (2^-9 to 2^-8 relative) when 1 - beta < 2^-8, so a stored moment could stop
        // decaying.
        if self.bf16_moments {
            for (name, beta) in [("adamw.beta1", self.beta1), ("adamw.beta2", self.beta2)] {
                if beta > 0.0 && 1.0 - beta < 2f32.powi(-8) {
                    return Err(KernelError::invalid(
                        name,
                        format!(
                            "{beta} is too close to 1 for bf16 moments (they could never decay); \
                             use fp32 moments or a beta below {}",
                            1.0 - 2f32.powi(-8)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The first (`m`) and second (`v`) moments, one of each per parameter.
#[derive(Clone, Debug, PartialEq)]
pub enum Moments {
    /// FP32 moments.
    F32 {
        /// First moment.
        m: Vec<f32>,
        /// Second moment.
        v: Vec<f32>,
    },
    /// BF16 moments: updated in FP32, stored rounded to nearest even.
    Bf16 {
        /// First moment.
        m: Vec<bf16>,
        /// Second moment.
        v: Vec<bf16>,
    },
}

impl Moments {
    /// Zero moments for `len` parameters, in BF16 when `bf16` is set.
    pub fn zeros(len: usize, bf16: bool) -> Self {
        if bf16 {
            Self::Bf16 {
                m: vec![bf16::ZERO; len],
                v: vec![bf16::ZERO; len],
            }
        } else {
            Self::F32 {
                m: vec![0.0; len],
                v: vec![0.0; len],
            }
        }
    }

    /// Moments from FP32 values, stored in BF16 (rounded to nearest even) when `bf16` is set.
    pub fn from_f32(m: Vec<f32>, v: Vec<f32>, bf16: bool) -> Self {
        if bf16 {
            Self::Bf16 {
                m: m.into_iter().map(bf16::from_f32).collect(),
                v: v.into_iter().map(bf16::from_f32).collect(),
            }
        } else {
            Self::F32 { m, v }
        }
    }

    /// These moments stored in BF16 when `bf16` is set, in FP32 otherwise (unchanged when they
    /// already are).
    pub fn into_precision(self, bf16: bool) -> Self {
        match self {
            Self::F32 { m, v } if bf16 => Self::from_f32(m, v, true),
            Self::Bf16 { m, v } if !bf16 => Self::F32 {
                m: m.into_iter().map(bf16::to_f32).collect(),
                v: v.into_iter().map(bf16::to_f32).collect(),
            },
            same => same,
        }
    }

    /// Whether the moments are stored in BF16.
    pub fn is_bf16(&self) -> bool {
        matches!(self, Self::Bf16 { .. })
    }

    /// The lengths of `m` and `v`.
    pub fn lens(&self) -> (usize, usize) {
        match self {
            Self::F32 { m, v } => (m.len(), v.len()),
            Self::Bf16 { m, v } => (m.len(), v.len()),
        }
    }

    /// The first moment widened to FP32.
    pub fn first_f32(&self) -> Vec<f32> {
        match self {
            Self::F32 { m, .. } => m.clone(),
            Self::Bf16 { m, .. } => m.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// The second moment widened to FP32.
    pub fn second_f32(&self) -> Vec<f32> {
        match self {
            Self::F32 { v, .. } => v.clone(),
            Self::Bf16 { v, .. } => v.iter().map(|x| x.to_f32()).collect(),
        }
    }
}

/// The optimizer state of one parameter tensor (or flat group of parameters).
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWState {
    /// The moments.
    pub moments: Moments,
    /// Steps taken so far (the bias correction uses `step + 1` on the next step).
    pub step: u64,
}

impl AdamWState {
    /// Zero moments for `len` parameters, in the precision `cfg.bf16_moments` asks for, at step 0.
    pub fn new(len: usize, cfg: &AdamWConfig) -> Self {
        Self {
            moments: Moments::zeros(len, cfg.bf16_moments),
            step: 0,
        }
    }

    /// The number of parameters the state covers.
    pub fn len(&self) -> usize {
        self.moments.lens().0
    }

    /// Whether the state covers no parameters.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl AdamCoeffs {
    /// Updates one parameter; returns the new `(m, v)` in FP32.
    #[inline(always)]
    fn apply(&self, p: &mut f32, g: f32, m: f32, v: f32) -> (f32, f32) {
        let m = self.beta1 * m + self.one_minus_beta1 * g;
        let v = self.beta2 * v + self.one_minus_beta2 * (g * g);
        let denom = v.sqrt() * self.inv_sqrt_bc2 + self.eps;
        *p = *p * self.decay - self.step_size * m / denom;
        (m, v)
    }
}

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
fn update_f32(k: &AdamCoeffs, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
        (*m, *v) = k.apply(p, g * k.grad_scale, *m, *v);
    }
}

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
fn update_bf16(k: &AdamCoeffs, p: &mut [f32], g: &[f32], m: &mut [bf16], v: &mut [bf16]) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
        let (mn, vn) = k.apply(p, g * k.grad_scale, m.to_f32(), v.to_f32());
        *m = bf16::from_f32(mn);
        *v = bf16::from_f32(vn);
    }
}

/// The AdamW coefficients of one step as the GPU kernels take them (`struct AdamCoeffs` in
/// kernels/cuda/ops.cu), computed exactly as [`adamw_step`] computes its own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AdamCoeffs {
    /// `1 - lr * weight_decay`.
    pub decay: f32,
    /// `beta1`.
    pub beta1: f32,
    /// `1 - beta1`.
    pub one_minus_beta1: f32,
    /// `beta2`.
    pub beta2: f32,
    /// `1 - beta2`.
    pub one_minus_beta2: f32,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// `1 / sqrt(1 - beta2^t)`.
    pub inv_sqrt_bc2: f32,
    /// `eps`.
    pub eps: f32,
    /// Multiplier of the gradients (clipping).
    pub grad_scale: f32,
}

impl AdamCoeffs {
    /// The coefficients of step `t` (1-based) at learning rate `lr`.
    pub fn new(cfg: &AdamWConfig, lr: f32, t: u64, grad_scale: f32) -> Self {
        let (beta1, beta2) = (f64::from(cfg.beta1), f64::from(cfg.beta2));
        let bc1 = 1.0 - beta1.powf(t as f64);
        let bc2 = 1.0 - beta2.powf(t as f64);
        Self {
            decay: 1.0 - lr * cfg.weight_decay,
            beta1: cfg.beta1,
            one_minus_beta1: 1.0 - cfg.beta1,
            beta2: cfg.beta2,
            one_minus_beta2: 1.0 - cfg.beta2,
            step_size: (f64::from(lr) / bc1) as f32,
            inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
            eps: cfg.eps,
            grad_scale,
        }
    }
}

/// One AdamW step on `params` (FP32 master weights) with gradients `grads`, at learning rate `lr`.
///
/// Fails, leaving `params` and `state` untouched, if `cfg` is out of range (see
/// [`AdamWConfig::validate`]), `lr` is not finite and `>= 0` (argument `adamw.lr`), `grads` or the
/// state's moments do not have one entry per parameter (operands `adamw.grads`, `adamw.state`),
/// the state's precision differs from `cfg.bf16_moments` (`adamw.state`), or a gradient is not
/// finite (operand `adamw.grads`).
pub fn adamw_step(
    params: &mut [f32],
    grads: &[f32],
    state: &mut AdamWState,
    cfg: &AdamWConfig,
    lr: f32,
) -> Result<()> {
    adamw_step_scaled(params, grads, 1.0, state, cfg, lr)
}

/// [`adamw_step`] on the gradients `grad_scale * grads` (for example the clipping coefficient of
/// [`clip_coefficient`]), without writing the scaled gradients anywhere: the same result as
/// scaling `grads` in place first, one pass over memory fewer. Fails as [`adamw_step`] does, and
/// if `grad_scale` is not finite and `>= 0` (argument `adamw.grad_scale`).
pub fn adamw_step_scaled(
    params: &mut [f32],
    grads: &[f32],
    grad_scale: f32,
    state: &mut AdamWState,
    cfg: &AdamWConfig,
    lr: f32,
) -> Result<()> {
    cfg.validate()?;
    check_lr("adamw.lr", lr)?;
    if !(grad_scale.is_finite() && grad_scale >= 0.0) {
        return Err(KernelError::invalid(
            "adamw.grad_scale",
            format!("must be finite and >= 0, got {grad_scale}"),
        ));
    }
    let n = params.len();
    if grads.len() != n {
        return Err(KernelError::shape(
            "adamw.grads",
            format!("{n} elements (one per parameter)"),
            format!("{} elements", grads.len()),
        ));
    }
    let (ml, vl) = state.moments.lens();
    if ml != n || vl != n {
        return Err(KernelError::shape(
            "adamw.state",
            format!("moments of {n} elements (one per parameter)"),
            format!("m of {ml} and v of {vl} elements"),
        ));
    }
    if state.moments.is_bf16() != cfg.bf16_moments {
        return Err(KernelError::invalid(
            "adamw.state",
            format!(
                "holds {} moments but the config asks for {}",
                moment_precision(!cfg.bf16_moments),
                moment_precision(cfg.bf16_moments)
            ),
        ));
    }
    crate::error::check_finite("adamw.grads", grads)?;
    let t = state
        .step
        .checked_add(1)
        .ok_or_else(|| KernelError::invalid("adamw.state", "step counter overflow"))?;

    let k = AdamCoeffs::new(cfg, lr, t, grad_scale);

    adamw_apply(&k, params, grads, &mut state.moments)?;
    state.step = t;
    Ok(())
}

/// The name of a moment precision in messages: `bf16` or `fp32`.
pub fn moment_precision(bf16: bool) -> &'static str {
    if bf16 { "bf16" } else { "fp32" }
}

/// The element-wise update of one AdamW step with precomputed coefficients, on moments stored
/// in FP32 or BF16 (BF16 ones are updated in FP32 and stored rounded to nearest even): what
/// [`adamw_step_scaled`] runs after its checks. Fails if the parameters, gradients and moments
/// differ in length (operand `adamw.state`).
pub fn adamw_apply(
    k: &AdamCoeffs,
    params: &mut [f32],
    grads: &[f32],
    moments: &mut Moments,
) -> Result<()> {
    match moments {
        Moments::F32 { m, v } => adamw_apply_f32(k, params, grads, m, v),
        Moments::Bf16 { m, v } => apply_chunks(k, params, grads, m, v, update_bf16),
    }
}

/// The element-wise update of one AdamW step with precomputed coefficients and FP32 moments
/// (what [`adamw_step_scaled`] runs after its checks; the CUDA kernel computes the same).
/// Fails if the four slices differ in length (operand `adamw.state`).
pub fn adamw_apply_f32(
    k: &AdamCoeffs,
    params: &mut [f32],
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) -> Result<()> {
    apply_chunks(k, params, grads, m, v, update_f32)
}

/// The element-wise update of one chunk, on moments stored as `M`.
type Update<M> = fn(&AdamCoeffs, &mut [f32], &[f32], &mut [M], &mut [M]);

/// `update` over matching chunks of the parameters, gradients and moments (stored as `M`), in
/// parallel; fails if their lengths differ (operand `adamw.state`).
fn apply_chunks<M: Send>(
    k: &AdamCoeffs,
    params: &mut [f32],
    grads: &[f32],
    m: &mut [M],
    v: &mut [M],
    update: Update<M>,
) -> Result<()> {
    let n = params.len();
    if grads.len() != n || m.len() != n || v.len() != n {
        return Err(KernelError::shape(
            "adamw.state",
            format!("parameters, gradients and moments of {n} elements each"),
            format!("{}, {} and {}", grads.len(), m.len(), v.len()),
        ));
    }
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((pc, gc), mc), vc)| update(k, pc, gc, mc, vc));
    Ok(())
}

/// Sum of squares of `x` in `f64`, over fixed chunks summed in order (deterministic): the
/// per-slice term of [`grad_norm`].
pub fn sum_sq(x: &[f32]) -> f64 {
    let parts: Vec<f64> = x.par_chunks(CHUNK).map(crate::real::sum_sq_f64).collect();
    parts.iter().sum()
}

/// Clips gradients by their global L2 norm: computes the norm over all slices (accumulated in
/// `f64`, in a fixed order) and, when it exceeds `max_norm`, scales every gradient by
/// `max_norm / (norm + 1e-6)`. Returns the norm before clipping.
///
/// Fails, leaving the gradients untouched, if `max_norm` is not `> 0` (argument
/// `clip_grad_norm.max_norm`) or a gradient is not finite (operand `clip_grad_norm.grads`, with
/// the flat index across all slices).
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f32) -> Result<f64> {
    let norm = {
        let shared: Vec<&[f32]> = grads.iter().map(|g| &**g).collect();
        grad_norm(&shared)?
    };
    let coef = clip_coefficient(norm, max_norm)?;
    if coef != 1.0 {
        for g in grads.iter_mut() {
            g.par_chunks_mut(CHUNK).for_each(|c| {
                for v in c {
                    *v *= coef;
                }
            });
        }
    }
    Ok(norm)
}

/// The global L2 norm of the gradients, accumulated in `f64` in a fixed order. A non-finite
/// gradient is an error naming its flat index across all slices (operand
/// `clip_grad_norm.grads`).
pub fn grad_norm(grads: &[&[f32]]) -> Result<f64> {
    let total: f64 = grads.iter().map(|g| sum_sq(g)).sum();
    let norm = total.sqrt();
    if !norm.is_finite() {
        let mut base = 0usize;
        for g in grads {
            if let Err(KernelError::NonFinite { index, value, .. }) =
                crate::error::check_finite("clip_grad_norm.grads", g)
            {
                return Err(KernelError::NonFinite {
                    operand: "clip_grad_norm.grads",
                    index: base + index,
                    value,
                });
            }
            base += g.len();
        }
        return Err(KernelError::NonFinite {
            operand: "clip_grad_norm.grads",
            index: 0,
            value: norm,
        });
    }
    Ok(norm)
}

/// The factor [`clip_grad_norm`] scales gradients of global norm `norm` by: `1` when
/// `norm <= max_norm`, otherwise `max_norm / (norm + 1e-6)`. `max_norm` must be `> 0`
/// (argument `clip_grad_norm.max_norm`).
pub fn clip_coefficient(norm: f64, max_norm: f32) -> Result<f32> {
    if max_norm.is_nan() || max_norm <= 0.0 {
        return Err(KernelError::invalid(
            "clip_grad_norm.max_norm",
            format!("must be > 0, got {max_norm}"),
        ));
    }
    Ok(if norm > f64::from(max_norm) {
        (f64::from(max_norm) / (norm + CLIP_EPS)) as f32
    } else {
        1.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_change_precision_rounding_to_bf16_and_widening_exactly() {
        let (m, v) = (vec![1.0f32 + 1e-3, -3.3e-5], vec![2.5e-7, 7.0]);
        let fp32 = Moments::F32 {
            m: m.clone(),
            v: v.clone(),
        };
        let b = fp32.clone().into_precision(true);
        assert!(b.is_bf16());
        let want: Vec<f32> = m.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
        assert_eq!(b.first_f32(), want);
        assert_ne!(b.first_f32(), m, "1.001 is not a bf16 value");
        let back = b.clone().into_precision(false);
        assert!(!back.is_bf16());
        assert_eq!(back.first_f32(), b.first_f32());
        assert_eq!(back.second_f32(), b.second_f32());
        assert_eq!(b.clone().into_precision(true), b);
        assert_eq!(fp32.clone().into_precision(false), fp32);
        assert_eq!(moment_precision(true), "bf16");
        assert_eq!(moment_precision(false), "fp32");
    }

    fn cfg(bf16_moments: bool) -> AdamWConfig {
        AdamWConfig {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            bf16_moments,
        }
    }

    /// The update in f64, as written in the module docs.
    fn reference(
        p: &mut [f64],
        g: &[f64],
        m: &mut [f64],
        v: &mut [f64],
        t: i32,
        c: &AdamWConfig,
        lr: f64,
    ) {
        let (b1, b2) = (f64::from(c.beta1), f64::from(c.beta2));
        let (eps, wd) = (f64::from(c.eps), f64::from(c.weight_decay));
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            *p *= 1.0 - lr * wd;
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            let mhat = *m / (1.0 - b1.powi(t));
            let vhat = *v / (1.0 - b2.powi(t));
            *p -= lr * mhat / (vhat.sqrt() + eps);
        }
    }

    #[test]
    fn scaled_step_equals_scaling_the_gradients_first() {
        for bf16 in [false, true] {
            let c = cfg(bf16);
            let n = 300;
            let p0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.91).cos() * 3.0).collect();
            let mut grads: Vec<&mut [f32]> = Vec::new();
            let mut g_clip = g.clone();
            grads.push(&mut g_clip);
            let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
            let coef = clip_coefficient(norm, 1.0).unwrap();
            assert!(coef < 1.0);
            assert_eq!(grad_norm(&[&g]).unwrap(), norm);
            let (mut a, mut b) = (p0.clone(), p0.clone());
            let (mut sa, mut sb) = (AdamWState::new(n, &c), AdamWState::new(n, &c));
            for _ in 0..3 {
                adamw_step(&mut a, &g_clip, &mut sa, &c, 1e-2).unwrap();
                adamw_step_scaled(&mut b, &g, coef, &mut sb, &c, 1e-2).unwrap();
            }
            assert_eq!(a, b, "bf16 moments {bf16}");
            let err = adamw_step_scaled(&mut b, &g, -1.0, &mut sb, &c, 1e-2).unwrap_err();
            assert!(err.to_string().contains("adamw.grad_scale"), "{err}");
            assert_eq!(clip_coefficient(0.5, 1.0).unwrap(), 1.0);
            assert!(clip_coefficient(0.5, 0.0).is_err());
        }
    }

    #[test]
    fn betas_too_close_to_one_are_refused_for_bf16_moments() {
        let cfg = AdamWConfig {
            beta2: 0.996,
            ..AdamWConfig::default()
        };
        assert!(cfg.validate().is_ok(), "0.996 still decays in bf16");
        let cfg = AdamWConfig {
            beta2: 0.999,
            ..AdamWConfig::default()
        };
        let e = cfg.validate().unwrap_err();
        assert!(e.to_string().contains("adamw.beta2"), "{e}");
        let fp32 = AdamWConfig {
            bf16_moments: false,
            ..cfg
        };
        assert!(fp32.validate().is_ok());
    }

    #[test]
    fn default_is_deepseek_v3() {
        let c = AdamWConfig::default();
        assert_eq!(
            (c.beta1, c.beta2, c.eps, c.weight_decay),
            (0.9, 0.95, 1e-8, 0.1)
        );
        assert!(c.bf16_moments);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn first_step_matches_hand_computation() {
        // p = 1, g = 0.5, lr = 0.1, wd = 0.1: decay to 0.99; m = 0.05, v = 0.0125, bias-corrected
        // to 0.5 and 0.25, so the Adam step is 0.1 * 0.5 / (0.5 + 1e-8) ~= 0.1.
        let c = cfg(false);
        let mut p = [1.0f32];
        let mut state = AdamWState::new(1, &c);
        adamw_step(&mut p, &[0.5], &mut state, &c, 0.1).unwrap();
        assert!((p[0] - 0.89).abs() < 1e-6, "{}", p[0]);
        assert_eq!(state.step, 1);
        assert!((state.moments.first_f32()[0] - 0.05).abs() < 1e-7);
        assert!((state.moments.second_f32()[0] - 0.0125).abs() < 1e-8);
    }

    #[test]
    fn several_steps_match_f64_reference() {
        let c = cfg(false);
        let n = 5;
        let mut p: Vec<f32> = (0..n).map(|i| 0.3 * i as f32 - 0.5).collect();
        let mut p64: Vec<f64> = p.iter().map(|&x| f64::from(x)).collect();
        let (mut m64, mut v64) = (vec![0.0; n], vec![0.0; n]);
        let mut state = AdamWState::new(n, &c);
        for t in 1..=3 {
            let g: Vec<f32> = (0..n).map(|i| ((i + t) as f32 * 0.7).sin()).collect();
            let g64: Vec<f64> = g.iter().map(|&x| f64::from(x)).collect();
            let lr = 0.01 * t as f32;
            adamw_step(&mut p, &g, &mut state, &c, lr).unwrap();
            reference(
                &mut p64,
                &g64,
                &mut m64,
                &mut v64,
                t as i32,
                &c,
                f64::from(lr),
            );
        }
        for (a, b) in p.iter().zip(&p64) {
            assert!((f64::from(*a) - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert_eq!(state.step, 3);
    }

    #[test]
    fn bf16_moments_are_stored_rounded() {
        let g = [0.3f32, -1.7, 1e-3, 123.456];
        let p0 = [0.1f32, 0.2, -0.3, 0.4];
        let (c32, c16) = (cfg(false), cfg(true));
        let (mut p32, mut p16) = (p0, p0);
        let mut s32 = AdamWState::new(4, &c32);
        let mut s16 = AdamWState::new(4, &c16);
        adamw_step(&mut p32, &g, &mut s32, &c32, 0.01).unwrap();
        adamw_step(&mut p16, &g, &mut s16, &c16, 0.01).unwrap();
        // This step's update uses the FP32 moments; only the stored copies are rounded.
        assert_eq!(p32, p16);
        let Moments::Bf16 { m, v } = &s16.moments else {
            panic!("expected bf16 moments");
        };
        let (m32, v32) = (s32.moments.first_f32(), s32.moments.second_f32());
        for (stored, &wide) in m.iter().zip(&m32).chain(v.iter().zip(&v32)) {
            assert_eq!(*stored, bf16::from_f32(wide));
        }
        assert_ne!(s16.moments.first_f32(), m32, "rounding should be visible");
    }

    #[test]
    fn weight_decay_is_decoupled() {
        let c = cfg(false);
        // Zero gradient: the parameter only decays, by exactly lr * wd.
        let mut p = [2.0f32, -4.0];
        let mut state = AdamWState::new(2, &c);
        adamw_step(&mut p, &[0.0, 0.0], &mut state, &c, 0.5).unwrap();
        assert!(
            (p[0] - 1.9).abs() < 1e-6 && (p[1] + 3.8).abs() < 1e-6,
            "{p:?}"
        );
        // Adam is invariant to the gradient's scale, and decoupled decay does not enter the
        // moments, so scaling the gradient 1000x gives the same step (an L2 term would not).
        let (mut a, mut b) = ([1.0f32, -1.0], [1.0f32, -1.0]);
        let (mut sa, mut sb) = (AdamWState::new(2, &c), AdamWState::new(2, &c));
        adamw_step(&mut a, &[1e-3, 2e-3], &mut sa, &c, 0.1).unwrap();
        adamw_step(&mut b, &[1.0, 2.0], &mut sb, &c, 0.1).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
        assert!((a[0] - (0.99 - 0.1)).abs() < 1e-5);
    }

    #[test]
    fn errors_leave_params_untouched() {
        let c = cfg(false);
        let p0 = [1.0f32, 2.0, 3.0];
        let mut p = p0;
        let mut state = AdamWState::new(3, &c);
        adamw_step(&mut p, &[0.1, 0.2, 0.3], &mut state, &c, 0.01).unwrap();
        let (p1, s1) = (p, state.clone());

        let err = adamw_step(&mut p, &[0.1, f32::NAN, 0.3], &mut state, &c, 0.01).unwrap_err();
        assert!(
            matches!(
                err,
                KernelError::NonFinite {
                    operand: "adamw.grads",
                    index: 1,
                    ..
                }
            ),
            "{err}"
        );
        let err = adamw_step(&mut p, &[0.1, 0.2], &mut state, &c, 0.01).unwrap_err();
        assert!(err.to_string().contains("adamw.grads"), "{err}");
        let err = adamw_step(&mut p, &[0.1; 3], &mut AdamWState::new(2, &c), &c, 0.01).unwrap_err();
        assert!(err.to_string().contains("adamw.state"), "{err}");
        let err = adamw_step(&mut p, &[0.1; 3], &mut state, &cfg(true), 0.01).unwrap_err();
        assert!(err.to_string().contains("adamw.state"), "{err}");
        let err = adamw_step(&mut p, &[0.1; 3], &mut state, &c, -1.0).unwrap_err();
        assert!(err.to_string().contains("adamw.lr"), "{err}");
        let err = adamw_step(&mut p, &[0.1; 3], &mut state, &c, f32::INFINITY).unwrap_err();
        assert!(err.to_string().contains("adamw.lr"), "{err}");
        for (bad, name) in [
            (AdamWConfig { beta1: 1.0, ..c }, "adamw.beta1"),
            (AdamWConfig { beta2: -0.1, ..c }, "adamw.beta2"),
            (AdamWConfig { eps: 0.0, ..c }, "adamw.eps"),
            (
                AdamWConfig {
                    weight_decay: f32::NAN,
                    ..c
                },
                "adamw.weight_decay",
            ),
            (AdamWConfig { lr: -1.0, ..c }, "adamw.config.lr"),
        ] {
            let err = adamw_step(&mut p, &[0.1; 3], &mut state, &bad, 0.01).unwrap_err();
            assert!(err.to_string().contains(name), "{err}");
        }
        assert_eq!(p, p1);
        assert_eq!(state, s1);
        assert_ne!(p, p0);
    }

    #[test]
    fn clip_grad_norm_computes_and_scales() {
        let mut a = [3.0f32, 4.0];
        let mut b = [12.0f32];
        let norm = clip_grad_norm(&mut [&mut a[..], &mut b[..]], 6.5).unwrap();
        assert_eq!(norm, 13.0);
        let coef = (6.5 / (13.0 + 1e-6)) as f32;
        assert_eq!(a, [3.0 * coef, 4.0 * coef]);
        assert_eq!(b, [12.0 * coef]);
        let after = (a
            .iter()
            .chain(&b)
            .map(|&x| f64::from(x).powi(2))
            .sum::<f64>())
        .sqrt();
        assert!((after - 6.5).abs() < 1e-5);

        // Below the threshold: untouched, norm still returned.
        let mut c = [0.3f32, 0.4];
        let norm = clip_grad_norm(&mut [&mut c[..]], 1.0).unwrap();
        assert!((norm - 0.5).abs() < 1e-7);
        assert_eq!(c, [0.3, 0.4]);

        // Many chunks: matches a sequential f64 sum.
        let mut big: Vec<f32> = (0..100_000).map(|i| ((i as f32) * 0.01).sin()).collect();
        let want = big
            .iter()
            .map(|&x| f64::from(x).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm = clip_grad_norm(&mut [&mut big[..]], f32::INFINITY).unwrap();
        assert!((norm - want).abs() < 1e-9 * want);
    }

    #[test]
    fn clip_grad_norm_errors_leave_grads_untouched() {
        let mut a = [3.0f32, 4.0];
        let mut b = [1.0f32, f32::INFINITY];
        let err = clip_grad_norm(&mut [&mut a[..], &mut b[..]], 1.0).unwrap_err();
        assert!(
            matches!(
                err,
                KernelError::NonFinite {
                    operand: "clip_grad_norm.grads",
                    index: 3,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(a, [3.0, 4.0]);
        for bad in [0.0, -1.0, f32::NAN] {
            let err = clip_grad_norm(&mut [&mut a[..]], bad).unwrap_err();
            assert!(err.to_string().contains("clip_grad_norm.max_norm"), "{err}");
        }
        assert_eq!(a, [3.0, 4.0]);
        assert_eq!(clip_grad_norm(&mut [], 1.0).unwrap(), 0.0);
    }
}
