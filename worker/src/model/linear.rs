//! Linear layers in the model's element type and precision mode.
//!
//! [`ModelFloat`] dispatches a linear layer's three GEMMs to the kernels: plain `f32`/`f64`
//! GEMMs for [`Precision::Fp32`], and the mixed-precision kernels (BF16 or FP8 operands, FP32
//! master weights) otherwise. `f64` exists for gradient checks and supports only `Fp32`.

use shoal_kernels::ops::linear::{
    Precision, SavedInput, linear_backward_input, linear_backward_input_mp,
    linear_backward_weight_into, linear_backward_weight_mp, linear_forward, linear_forward_mp,
};
use std::sync::Arc;

use shoal_kernels::{Real, Tensor};

use crate::{Result, WorkerError};

/// A linear layer's input as kept for its weight gradient. Shared (reference-counted): layers
/// that read the same input (gate and up projections, a router and its shared experts) keep
/// one copy.
#[derive(Clone, Debug)]
pub enum Saved<T> {
    /// The input in the model's element type.
    Full(Arc<Tensor<T>>),
    /// The input in a mixed-precision storage format (BF16, or FP8 with 1x128 scales).
    Mixed(Arc<SavedInput>),
}

/// The element types a model runs in.
pub trait ModelFloat: Real {
    /// `y = x W^T`.
    fn linear(x: &Tensor<Self>, w: &Tensor<Self>, p: Precision) -> Result<Tensor<Self>>;
    /// `y = x W^T`, keeping `x` for the weight gradient in the precision's storage format.
    fn linear_saving(
        x: Tensor<Self>,
        w: &Tensor<Self>,
        p: Precision,
    ) -> Result<(Tensor<Self>, Saved<Self>)>;
    /// Keeps `x` for a weight gradient without running the forward GEMM.
    fn save(x: Tensor<Self>, p: Precision) -> Result<Saved<Self>>;
    /// Keeps a shared `x` for a weight gradient: the same allocation in FP32, a converted copy
    /// in the mixed-precision modes.
    fn save_shared(x: &Arc<Tensor<Self>>, p: Precision) -> Result<Saved<Self>>;
    /// B: `dx = dy W`.
    fn linear_b(dy: &Tensor<Self>, w: &Tensor<Self>, p: Precision) -> Result<Tensor<Self>>;
    /// W: `grad += dy^T x`.
    fn linear_w(dy: &Tensor<Self>, x: &Saved<Self>, grad: &mut Tensor<Self>) -> Result<()>;
}

impl ModelFloat for f32 {
    fn linear(x: &Tensor<f32>, w: &Tensor<f32>, p: Precision) -> Result<Tensor<f32>> {
        Ok(match p {
            Precision::Fp32 => linear_forward(x, w)?,
            _ => linear_forward_mp(x, w, p)?.0,
        })
    }

    fn linear_saving(
        x: Tensor<f32>,
        w: &Tensor<f32>,
        p: Precision,
    ) -> Result<(Tensor<f32>, Saved<f32>)> {
        match p {
            Precision::Fp32 => Ok((linear_forward(&x, w)?, Saved::Full(Arc::new(x)))),
            _ => {
                let (y, s) = linear_forward_mp(&x, w, p)?;
                Ok((y, Saved::Mixed(Arc::new(s))))
            }
        }
    }

    fn save(x: Tensor<f32>, p: Precision) -> Result<Saved<f32>> {
        match p {
            Precision::Fp32 => Ok(Saved::Full(Arc::new(x))),
            _ => mixed(&x, p),
        }
    }

    fn save_shared(x: &Arc<Tensor<f32>>, p: Precision) -> Result<Saved<f32>> {
        match p {
            Precision::Fp32 => Ok(Saved::Full(Arc::clone(x))),
            _ => mixed(x, p),
        }
    }

    fn linear_b(dy: &Tensor<f32>, w: &Tensor<f32>, p: Precision) -> Result<Tensor<f32>> {
        Ok(match p {
            Precision::Fp32 => linear_backward_input(dy, w)?,
            _ => linear_backward_input_mp(dy, w, p)?,
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
}

/// `x` in the storage format of a mixed precision mode.
fn mixed(x: &Tensor<f32>, p: Precision) -> Result<Saved<f32>> {
    use shoal_kernels::{Fp8Matrix, QuantConfig};
    Ok(Saved::Mixed(Arc::new(match p {
        Precision::Fp32 => return Ok(Saved::Full(Arc::new(x.clone()))),
        Precision::Bf16 => SavedInput::Bf16(x.map(half::bf16::from_f32)),
        Precision::Fp8 => {
            SavedInput::Fp8(Fp8Matrix::quantize_tensor_tiles(x, QuantConfig::default())?)
        }
    })))
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
    fn linear(x: &Tensor<f64>, w: &Tensor<f64>, p: Precision) -> Result<Tensor<f64>> {
        fp32_only(p)?;
        Ok(linear_forward(x, w)?)
    }

    fn linear_saving(
        x: Tensor<f64>,
        w: &Tensor<f64>,
        p: Precision,
    ) -> Result<(Tensor<f64>, Saved<f64>)> {
        fp32_only(p)?;
        Ok((linear_forward(&x, w)?, Saved::Full(Arc::new(x))))
    }

    fn save(x: Tensor<f64>, p: Precision) -> Result<Saved<f64>> {
        fp32_only(p)?;
        Ok(Saved::Full(Arc::new(x)))
    }

    fn save_shared(x: &Arc<Tensor<f64>>, p: Precision) -> Result<Saved<f64>> {
        fp32_only(p)?;
        Ok(Saved::Full(Arc::clone(x)))
    }

    fn linear_b(dy: &Tensor<f64>, w: &Tensor<f64>, p: Precision) -> Result<Tensor<f64>> {
        fp32_only(p)?;
        Ok(linear_backward_input(dy, w)?)
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
}
