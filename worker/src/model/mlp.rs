//! The SwiGLU MLP: `down(silu(gate · x) * (up · x))`. Dense layers, shared experts and each routed
//! expert are all one of these.

use shoal_kernels::Tensor;
use shoal_kernels::ops::swiglu::{swiglu_backward_in_place, swiglu_forward};

use super::ctx::Ctx;
use super::linear::{ModelFloat, Saved};
use super::params::{Init, Layout, ParamId, ParamStore, Trainable};
use super::wgrad::{WTask, linear_b};
use crate::Result;

/// One SwiGLU MLP's weights.
#[derive(Clone, Debug)]
pub struct Mlp {
    pub(super) gate: ParamId,
    pub(super) up: ParamId,
    pub(super) down: ParamId,
}

/// What the forward pass keeps: the two pre-activation projections.
#[derive(Debug)]
pub struct MlpSaved<T> {
    g: Tensor<T>,
    u: Tensor<T>,
}

impl Mlp {
    /// Declares `{prefix}.gate_proj`, `.up_proj`, `.down_proj`.
    pub fn declare(
        layout: &mut Layout,
        prefix: &str,
        hidden: usize,
        inner: usize,
        std: f64,
    ) -> Self {
        let mut lin = |name: &str, shape: Vec<usize>| {
            layout.add(
                format!("{prefix}.{name}.weight"),
                shape,
                Init::Normal(std),
                Trainable::Yes,
            )
        };
        Self {
            gate: lin("gate_proj", vec![inner, hidden]),
            up: lin("up_proj", vec![inner, hidden]),
            down: lin("down_proj", vec![hidden, inner]),
        }
    }

    /// Forward on `x: [rows, hidden]`.
    pub fn forward<T: ModelFloat>(
        &self,
        p: &ParamStore<T>,
        x: &Tensor<T>,
        ctx: &Ctx<'_>,
    ) -> Result<(Tensor<T>, MlpSaved<T>)> {
        let g = T::linear(x, p, self.gate, ctx.precision)?;
        let u = T::linear(x, p, self.up, ctx.precision)?;
        let act = swiglu_forward(&g, &u)?;
        let y = T::linear(&act, p, self.down, ctx.precision)?;
        Ok((y, MlpSaved { g, u }))
    }

    /// B pass given the forward input `x` as kept for the W work (gate and up share it);
    /// pushes the W work.
    pub fn backward<T: ModelFloat>(
        &self,
        p: &ParamStore<T>,
        xs: Saved<T>,
        saved: MlpSaved<T>,
        dy: Tensor<T>,
        ctx: &Ctx<'_>,
        w: &mut Vec<WTask<T>>,
    ) -> Result<Tensor<T>> {
        let prec = ctx.precision;
        let act = swiglu_forward(&saved.g, &saved.u)?;
        let dact = linear_b(p, self.down, dy, T::save(act, prec)?, prec, w)?;
        let (dg, du) = swiglu_backward_in_place(&dact, saved.g, saved.u)?;
        let mut dx = linear_b(p, self.gate, dg, xs.clone(), prec, w)?;
        dx.add_assign(&linear_b(p, self.up, du, xs, prec, w)?, "mlp.dx")?;
        Ok(dx)
    }
}
