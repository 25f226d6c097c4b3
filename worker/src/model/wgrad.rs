//! Deferred weight gradients: the W half of a split backward pass.
//!
//! A layer's B pass (input gradient) returns the weight-gradient work it would otherwise do as
//! [`WTask`]s; running them later (or right away) accumulates into [`Grads`]. Pipeline schedules
//! such as DualPipe and ZB1P run the W tasks of a micro-batch at a different time from its B pass.

use shoal_kernels::Tensor;
use shoal_kernels::ops::embedding::embedding_backward;
use shoal_kernels::ops::rmsnorm::rmsnorm_backward_weight;

use super::linear::{ModelFloat, Saved};
use super::params::{Grads, ParamId};
use crate::Result;

/// One piece of weight-gradient work.
#[derive(Debug)]
pub enum WTask<T> {
    /// `grad[param] += dy^T x` for a linear layer.
    Linear {
        /// The weight.
        param: ParamId,
        /// Gradient of the layer's output.
        dy: Tensor<T>,
        /// The layer's input, as kept for W.
        x: Saved<T>,
    },
    /// An RMSNorm weight: `grad += sum_rows(dy * x / rms(x))`.
    RmsNorm {
        /// The norm weight.
        param: ParamId,
        /// Gradient of the norm's output.
        dy: Tensor<T>,
        /// The norm's input.
        x: Tensor<T>,
        /// The norm's epsilon.
        eps: f64,
    },
    /// An embedding table: scatter-add `dy` rows at `ids`.
    Embedding {
        /// The table.
        param: ParamId,
        /// Gradient of the gathered rows.
        dy: Tensor<T>,
        /// The token ids that were gathered.
        ids: Vec<u32>,
    },
}

impl<T: ModelFloat> WTask<T> {
    /// Runs the task, accumulating into `grads`.
    pub fn run(self, grads: &mut Grads<T>) -> Result<()> {
        match self {
            WTask::Linear { param, dy, x } => T::linear_w(&dy, &x, grads.get_mut(param)),
            WTask::RmsNorm { param, dy, x, eps } => {
                let g = rmsnorm_backward_weight(&dy, &x, eps)?;
                grads.add(param, &g)
            }
            WTask::Embedding { param, dy, ids } => {
                let vocab = grads.get(param).shape()[0];
                let g = embedding_backward(&dy, &ids, vocab)?;
                grads.add(param, &g)
            }
        }
    }
}

/// Runs every task in order.
pub fn run_all<T: ModelFloat>(tasks: Vec<WTask<T>>, grads: &mut Grads<T>) -> Result<()> {
    for t in tasks {
        t.run(grads)?;
    }
    Ok(())
}
