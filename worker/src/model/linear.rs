//! Linear layers in the model's element type and precision mode.
//!
//! [`ModelFloat`] dispatches a linear layer's three GEMMs to the kernels: plain `f32`/`f64`
//! GEMMs for [`Precision::Fp32`], and the mixed-precision kernels (BF16 or FP8 operands, FP32
//! master weights) otherwise. Weights reach the mixed-precision GEMMs through the parameter
//! store's operand cache ([`ParamStore::operand`]): rounded or quantized once per step, not once
//! per GEMM. `f64` exists for gradient checks and supports only `Fp32`.
//!
//! Under BF16 every operand a GEMM reads is a BF16 value kept in `f32`: the input is rounded when
//! it is saved for W, and the output gradient is rounded once in B and handed to W rounded, so W
//! is a plain FP32 GEMM of BF16 values (exact products, FP32 sums).

use shoal_kernels::matmul::{round_bf16, rounded_bf16};
use shoal_kernels::ops::linear::{
    Precision, SavedInput, linear_backward_input, linear_backward_input_bf16,
    linear_backward_input_fp8, linear_backward_weight_into, linear_backward_weight_mp,
    linear_forward, linear_forward_bf16, linear_forward_fp8,
};
use shoal_kernels::{Fp8Matrix, QuantConfig, Real, Tensor};
use std::borrow::Cow;
use std::sync::Arc;

use super::params::{ParamId, ParamStore, WeightOperand};
use crate::{Result, WorkerError};

/// A linear layer's input as kept for its weight gradient. Shared (reference-counted): layers
/// that read the same input (gate and up projections, a router and its shared experts) keep
/// one copy.
#[derive(Clone, Debug)]
pub enum Saved<T> {
    /// The input in the model's element type: FP32 values, or BF16 values under
    /// [`Precision::Bf16`].
    Full(Arc<Tensor<T>>),
    /// The input in a storage format of its own (FP8 with 1x128 scales).
    Mixed(Arc<SavedInput>),
}

/// What [`ModelFloat::w_operands`] makes of a linear layer's W work.
#[derive(Debug)]
pub enum WOperands<T> {
    /// `grad += dy^T x` as a plain GEMM.
    Gemm {
        /// The output gradient, in the GEMM's operand values.
        dy: Tensor<T>,
        /// The input, in the GEMM's operand values.
        x: Arc<Tensor<T>>,
    },
    /// W needs its own kernel: the operands as they were.
    Kernel {
        /// The output gradient.
        dy: Tensor<T>,
        /// The input as kept for W.
        x: Saved<T>,
    },
}

/// The element types a model runs in.
pub trait ModelFloat: Real {
    /// `y = x W^T` with the weight `id` of `p`.
    fn linear(
        x: &Tensor<Self>,
        p: &ParamStore<Self>,
        id: ParamId,
        prec: Precision,
    ) -> Result<Tensor<Self>>;
    /// Keeps `x` for a weight gradient in the precision's operand format.
    fn save(x: Tensor<Self>, prec: Precision) -> Result<Saved<Self>>;
    /// Keeps a shared `x` for a weight gradient: the same allocation in FP32, a converted copy
    /// in the mixed-precision modes.
    fn save_shared(x: &Arc<Tensor<Self>>, prec: Precision) -> Result<Saved<Self>>;
    /// B: `dx = dy W`. Also returns `dy` as W must read it (rounded to BF16 under BF16).
    fn linear_b(
        dy: Tensor<Self>,
        p: &ParamStore<Self>,
        id: ParamId,
        prec: Precision,
    ) -> Result<(Tensor<Self>, Tensor<Self>)>;
    /// W: `grad += dy^T x`, with `dy` as [`ModelFloat::linear_b`] returned it.
    fn linear_w(dy: &Tensor<Self>, x: &Saved<Self>, grad: &mut Tensor<Self>) -> Result<()>;
    /// The operands of W as a plain GEMM in `Self` (`dy` and `x` whose product is the exact
    /// weight gradient the precision asks for), so the GEMM can be split into bands of output
    /// features; [`WOperands::Kernel`] where W runs a kernel of its own (FP8).
    fn w_operands(dy: Tensor<Self>, x: &Saved<Self>) -> WOperands<Self>;
}

/// The weight rounded to BF16, from the store's cache.
fn bf16_weight(p: &ParamStore<f32>, id: ParamId) -> Result<Cow<'_, WeightOperand<f32>>> {
    p.operand(id, true, |w| Ok(WeightOperand::Bf16(rounded_bf16(w))))
}

/// The weight quantized in 128x128 blocks, as `W` and `W^T`, from the store's cache.
fn fp8_weight(p: &ParamStore<f32>, id: ParamId) -> Result<Cow<'_, WeightOperand<f32>>> {
    p.operand(id, false, |w| {
        let (out_f, in_f) = w.as_matrix("linear.weight")?;
        let q = Fp8Matrix::quantize_blocks(w.data(), out_f, in_f, QuantConfig::default())?;
        Ok(WeightOperand::Fp8 {
            wt: q.transpose()?,
            w: q,
        })
    })
}

fn wrong_kind(p: &ParamStore<f32>, id: ParamId) -> WorkerError {
    WorkerError::invalid(p.name(id), "weight operand of the wrong kind")
}

impl ModelFloat for f32 {
    fn linear(
        x: &Tensor<f32>,
        p: &ParamStore<f32>,
        id: ParamId,
        prec: Precision,
    ) -> Result<Tensor<f32>> {
        Ok(match prec {
            Precision::Fp32 => linear_forward(x, p.get(id))?,
            Precision::Bf16 => match bf16_weight(p, id)?.as_ref() {
                WeightOperand::Bf16(w) => linear_forward_bf16(x, w)?.0,
                WeightOperand::Fp8 { .. } => return Err(wrong_kind(p, id)),
            },
            Precision::Fp8 => match fp8_weight(p, id)?.as_ref() {
                WeightOperand::Fp8 { w, .. } => linear_forward_fp8(x, w)?.0,
                WeightOperand::Bf16(_) => return Err(wrong_kind(p, id)),
            },
        })
    }

    fn save(x: Tensor<f32>, prec: Precision) -> Result<Saved<f32>> {
        Ok(match prec {
            Precision::Fp32 => Saved::Full(Arc::new(x)),
            Precision::Bf16 => {
                let mut x = x;
                round_bf16(x.data_mut());
                Saved::Full(Arc::new(x))
            }
            Precision::Fp8 => fp8_saved(&x)?,
        })
    }

    fn save_shared(x: &Arc<Tensor<f32>>, prec: Precision) -> Result<Saved<f32>> {
        Ok(match prec {
            Precision::Fp32 => Saved::Full(Arc::clone(x)),
            Precision::Bf16 => Saved::Full(Arc::new(rounded_bf16(x))),
            Precision::Fp8 => fp8_saved(x)?,
        })
    }

    fn linear_b(
        dy: Tensor<f32>,
        p: &ParamStore<f32>,
        id: ParamId,
        prec: Precision,
    ) -> Result<(Tensor<f32>, Tensor<f32>)> {
        Ok(match prec {
            Precision::Fp32 => (linear_backward_input(&dy, p.get(id))?, dy),
            Precision::Bf16 => match bf16_weight(p, id)?.as_ref() {
                WeightOperand::Bf16(w) => linear_backward_input_bf16(&dy, w)?,
                WeightOperand::Fp8 { .. } => return Err(wrong_kind(p, id)),
            },
            Precision::Fp8 => match fp8_weight(p, id)?.as_ref() {
                WeightOperand::Fp8 { wt, .. } => (linear_backward_input_fp8(&dy, wt)?, dy),
                WeightOperand::Bf16(_) => return Err(wrong_kind(p, id)),
            },
        })
    }

    fn linear_w(dy: &Tensor<f32>, x: &Saved<f32>, grad: &mut Tensor<f32>) -> Result<()> {
        match x {
            Saved::Full(x) => linear_backward_weight_into(grad, dy, x)?,
            Saved::Mixed(s) => {
                let g = linear_backward_weight_mp(dy, s.as_ref())?;
                grad.add_assign(&g, "linear.dweight")?;
            }
        }
        Ok(())
    }

    fn w_operands(dy: Tensor<f32>, x: &Saved<f32>) -> WOperands<f32> {
        match x {
            Saved::Full(x) => WOperands::Gemm {
                dy,
                x: Arc::clone(x),
            },
            Saved::Mixed(_) => WOperands::Kernel { dy, x: x.clone() },
        }
    }
}

/// `x` quantized to E4M3 in 1x128 tiles, as FP8 keeps it for W.
fn fp8_saved(x: &Tensor<f32>) -> Result<Saved<f32>> {
    Ok(Saved::Mixed(Arc::new(SavedInput::Fp8(
        Fp8Matrix::quantize_tensor_tiles(x, QuantConfig::default())?,
    ))))
}

fn fp32_only(p: Precision) -> Result<()> {
    if p != Precision::Fp32 {
        return Err(WorkerError::invalid(
            "precision",
            format!("{p:?} needs an f32 model; f64 runs fp32 only"),
        ));
    }
    Ok(())
}

impl ModelFloat for f64 {
    fn linear(
        x: &Tensor<f64>,
        p: &ParamStore<f64>,
        id: ParamId,
        prec: Precision,
    ) -> Result<Tensor<f64>> {
        fp32_only(prec)?;
        Ok(linear_forward(x, p.get(id))?)
    }

    fn save(x: Tensor<f64>, prec: Precision) -> Result<Saved<f64>> {
        fp32_only(prec)?;
        Ok(Saved::Full(Arc::new(x)))
    }

    fn save_shared(x: &Arc<Tensor<f64>>, prec: Precision) -> Result<Saved<f64>> {
        fp32_only(prec)?;
        Ok(Saved::Full(Arc::clone(x)))
    }

    fn linear_b(
        dy: Tensor<f64>,
        p: &ParamStore<f64>,
        id: ParamId,
        prec: Precision,
    ) -> Result<(Tensor<f64>, Tensor<f64>)> {
        fp32_only(prec)?;
        Ok((linear_backward_input(&dy, p.get(id))?, dy))
    }

    fn linear_w(dy: &Tensor<f64>, x: &Saved<f64>, grad: &mut Tensor<f64>) -> Result<()> {
        match x {
            Saved::Full(x) => Ok(linear_backward_weight_into(grad, dy, x)?),
            Saved::Mixed(_) => Err(WorkerError::invalid(
                "precision",
                "f64 models keep full-precision inputs",
            )),
        }
    }

    fn w_operands(dy: Tensor<f64>, x: &Saved<f64>) -> WOperands<f64> {
        match x {
            Saved::Full(x) => WOperands::Gemm {
                dy,
                x: Arc::clone(x),
            },
            // Refused by `linear_w` when the task runs.
            Saved::Mixed(_) => WOperands::Kernel { dy, x: x.clone() },
        }
    }
}
