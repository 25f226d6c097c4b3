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
    /// Multiply-adds (or element operations) the task performs, to schedule it.
    fn cost(&self) -> usize {
        match self {
            WTask::Linear { dy, x, .. } => {
                let cols = match x {
                    Saved::Full(x) => x.last_dim(),
                    Saved::Mixed(s) => s.rows_cols().1,
                };
                dy.numel().saturating_mul(cols)
            }
            WTask::RmsNorm { dy, .. } | WTask::Embedding { dy, .. } => dy.numel(),
        }
    }

    /// Runs the task, accumulating into `grads`.
    pub fn run(self, grads: &mut Grads<T>) -> Result<()> {
        let param = self.param();
        self.run_into(grads.get_mut(param))
    }

    /// Runs the task, accumulating into its parameter's gradient `grad`.
    fn run_into(self, grad: &mut Tensor<T>) -> Result<()> {
        match self {
            WTask::Linear { dy, x, .. } => T::linear_w(&dy, &x, grad),
            WTask::RmsNorm { dy, x, eps, .. } => {
                let g = rmsnorm_backward_weight(&dy, &x, eps)?;
                Ok(grad.add_assign(&g, "rmsnorm.dweight")?)
            }
            WTask::Embedding { dy, ids, .. } => {
                let vocab = grad.shape().first().copied().unwrap_or(0);
                let g = embedding_backward(&dy, &ids, vocab)?;
                Ok(grad.add_assign(&g, "embedding.dweight")?)
            }
        }
    }
}

impl<T> WTask<T> {
    /// The parameter whose gradient the task accumulates.
    pub fn param(&self) -> ParamId {
        match self {
            WTask::Linear { param, .. }
            | WTask::RmsNorm { param, .. }
            | WTask::Embedding { param, .. } => *param,
        }
    }
}

/// B pass of an RMSNorm: returns the input gradient and queues the weight gradient.
pub fn rmsnorm_b<T: ModelFloat>(
    weight: &Tensor<T>,
    param: ParamId,
    dy: Tensor<T>,
    x: Tensor<T>,
    eps: f64,
    w: &mut Vec<WTask<T>>,
) -> Result<Tensor<T>> {
    let dx = shoal_kernels::ops::rmsnorm::rmsnorm_backward_input(&dy, &x, weight, eps)?;
    w.push(WTask::RmsNorm { param, dy, x, eps });
    Ok(dx)
}

/// B pass of a Linear: returns the input gradient and queues the weight gradient.
pub fn linear_b<T: ModelFloat>(
    weight: &Tensor<T>,
    param: ParamId,
    dy: Tensor<T>,
    x: Saved<T>,
    precision: shoal_kernels::ops::linear::Precision,
    w: &mut Vec<WTask<T>>,
) -> Result<Tensor<T>> {
    let dx = T::linear_b(&dy, weight, precision)?;
    w.push(WTask::Linear { param, dy, x });
    Ok(dx)
}

/// A parameter's W work: its cost, its gradient and its tasks in order.
type ParamWork<'a, T> = (usize, &'a mut Tensor<T>, Vec<WTask<T>>);

/// Multiply-adds above which a parameter's W work runs alone with its GEMMs spread over every
/// thread, instead of beside other parameters' work on one thread each.
const ALONE_THRESHOLD: usize = 1 << 28;

/// Runs every task. The tasks of one parameter run in their original order, so the gradients do
/// not depend on the thread count. Parameters with a lot of work (the output head, the dense
/// MLPs) run one after another with their GEMMs split across the threads; the many small ones
/// (experts, projections, norms) run side by side, largest first.
pub fn run_all<T: ModelFloat>(tasks: Vec<WTask<T>>, grads: &mut Grads<T>) -> Result<()> {
    use rayon::prelude::*;
    let n = grads.tensors().len();
    let mut by_param: Vec<Vec<WTask<T>>> = (0..n).map(|_| Vec::new()).collect();
    for t in tasks {
        let i = t.param().index();
        match by_param.get_mut(i) {
            Some(v) => v.push(t),
            None => {
                return Err(crate::WorkerError::invalid(
                    "wgrad",
                    format!("parameter {i} out of range"),
                ));
            }
        }
    }
    let mut work: Vec<ParamWork<'_, T>> = grads
        .tensors_mut()
        .iter_mut()
        .zip(by_param)
        .filter(|(_, tasks)| !tasks.is_empty())
        .map(|(g, tasks)| (tasks.iter().map(WTask::cost).sum(), g, tasks))
        .collect();
    work.sort_by_key(|(cost, _, _)| std::cmp::Reverse(*cost));
    let split = work.partition_point(|(cost, _, _)| *cost >= ALONE_THRESHOLD);
    let small = work.split_off(split);
    for (_, g, tasks) in work {
        tasks.into_iter().try_for_each(|t| t.run_into(g))?;
    }
    small
        .into_par_iter()
        .with_max_len(1)
        .try_for_each(|(_, g, tasks)| tasks.into_iter().try_for_each(|t| t.run_into(g)))
}
