//! Deferred weight gradients: the W half of a split backward pass.
//!
//! A layer's B pass (input gradient) returns the weight-gradient work it would otherwise do as
//! [`WTask`]s; running them later (or right away) accumulates into [`Grads`]. Pipeline schedules
//! such as DualPipe and ZB1P run the W tasks of a micro-batch at a different time from its B pass.

use shoal_kernels::Tensor;
use shoal_kernels::ops::embedding::embedding_backward;
use shoal_kernels::ops::linear::linear_backward_weight_rows_into;
use shoal_kernels::ops::rmsnorm::rmsnorm_backward_weight;

use super::linear::{ModelFloat, Saved, WOperands};
use super::params::{Grads, ParamId, ParamStore};
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
    p: &ParamStore<T>,
    param: ParamId,
    dy: Tensor<T>,
    x: Saved<T>,
    precision: shoal_kernels::ops::linear::Precision,
    w: &mut Vec<WTask<T>>,
) -> Result<Tensor<T>> {
    let (dx, dy) = T::linear_b(dy, p, param, precision)?;
    w.push(WTask::Linear { param, dy, x });
    Ok(dx)
}

/// Multiply-adds above which a linear layer's W work is cut into bands of output features that
/// run as separate pieces (the output head, the dense MLPs). A constant, not a function of the
/// thread count, so the bands, and with them the gradients, are the same on every machine.
const BAND_COST: usize = 1 << 27;

/// Output features per band are a multiple of this (the GEMM kernels' row tile).
const BAND_ALIGN: usize = 64;

/// One parameter's W work after preparation.
enum ParamTasks<T> {
    /// Plain GEMMs `grad += dy^T x`, in order: can be cut into bands of gradient rows.
    Gemms(Vec<(Tensor<T>, std::sync::Arc<Tensor<T>>)>),
    /// Tasks that run whole (norms, embeddings, FP8 linear layers).
    Whole(Vec<WTask<T>>),
}

/// A piece of W work: one parameter's tasks over a band of its gradient rows, or all of them.
enum Piece<'a, T> {
    Band {
        cost: usize,
        rows: std::ops::Range<usize>,
        grad: &'a mut [T],
        gemms: &'a [(Tensor<T>, std::sync::Arc<Tensor<T>>)],
    },
    Whole {
        cost: usize,
        grad: &'a mut Tensor<T>,
        tasks: Vec<WTask<T>>,
    },
}

impl<T: ModelFloat> Piece<'_, T> {
    fn cost(&self) -> usize {
        match self {
            Piece::Band { cost, .. } | Piece::Whole { cost, .. } => *cost,
        }
    }

    fn run(self) -> Result<()> {
        match self {
            Piece::Band {
                rows, grad, gemms, ..
            } => {
                for (dy, x) in gemms {
                    linear_backward_weight_rows_into(grad, rows.clone(), dy, x)?;
                }
                Ok(())
            }
            Piece::Whole { grad, tasks, .. } => {
                tasks.into_iter().try_for_each(|t| t.run_into(grad))
            }
        }
    }
}

/// Turns one parameter's tasks into plain GEMMs where its precision allows.
fn prepare<T: ModelFloat>(tasks: Vec<WTask<T>>) -> ParamTasks<T> {
    if !tasks.iter().all(|t| matches!(t, WTask::Linear { .. })) {
        return ParamTasks::Whole(tasks);
    }
    let Some(param) = tasks.first().map(WTask::param) else {
        return ParamTasks::Gemms(Vec::new());
    };
    let ops: Vec<WOperands<T>> = tasks
        .into_iter()
        .filter_map(|t| match t {
            WTask::Linear { dy, x, .. } => Some(T::w_operands(dy, &x)),
            _ => None,
        })
        .collect();
    if ops.iter().all(|o| matches!(o, WOperands::Gemm { .. })) {
        return ParamTasks::Gemms(
            ops.into_iter()
                .filter_map(|o| match o {
                    WOperands::Gemm { dy, x } => Some((dy, x)),
                    WOperands::Kernel { .. } => None,
                })
                .collect(),
        );
    }
    ParamTasks::Whole(
        ops.into_iter()
            .map(|o| match o {
                WOperands::Gemm { dy, x } => WTask::Linear {
                    param,
                    dy,
                    x: Saved::Full(x),
                },
                WOperands::Kernel { dy, x } => WTask::Linear { param, dy, x },
            })
            .collect(),
    )
}

/// Cuts a parameter's work into pieces.
fn pieces<'a, T: ModelFloat>(
    grad: &'a mut Tensor<T>,
    work: &'a ParamTasks<T>,
    whole: &mut Vec<WTask<T>>,
    out: &mut Vec<Piece<'a, T>>,
) {
    match work {
        ParamTasks::Whole(_) => {
            let tasks = std::mem::take(whole);
            let cost = tasks.iter().map(WTask::cost).sum();
            out.push(Piece::Whole { cost, grad, tasks });
        }
        ParamTasks::Gemms(gemms) => {
            let out_f = grad.shape().first().copied().unwrap_or(0);
            let in_f = grad.shape().get(1).copied().unwrap_or(0);
            let per_row: usize = gemms
                .iter()
                .map(|(dy, x)| dy.rows().saturating_mul(x.last_dim()))
                .sum();
            let cost = per_row.saturating_mul(out_f);
            let bands = cost.div_ceil(BAND_COST).max(1);
            let band_rows = out_f
                .div_ceil(bands)
                .next_multiple_of(BAND_ALIGN)
                .clamp(1, out_f.max(1));
            let mut start = 0;
            for chunk in grad.data_mut().chunks_mut(band_rows * in_f.max(1)) {
                let rows = chunk.len() / in_f.max(1);
                out.push(Piece::Band {
                    cost: per_row * rows,
                    rows: start..start + rows,
                    grad: chunk,
                    gemms,
                });
                start += rows;
            }
        }
    }
}

/// Runs every task. The tasks of one parameter run in their original order, and a parameter's
/// work is cut into the same pieces whatever the thread count, so the gradients do not depend
/// on it. Pieces run on every thread, largest first, each thread taking the next piece when it
/// is done with one (greedy list scheduling): the output head and dense MLPs are cut into bands
/// of output features, the many small layers (experts, projections, norms) run whole.
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
    // Operand conversions (BF16 inputs back to FP32 values) run in parallel too.
    let mut prepared: Vec<ParamTasks<T>> = by_param.into_par_iter().map(prepare).collect();
    let mut wholes: Vec<Vec<WTask<T>>> = prepared
        .iter_mut()
        .map(|w| match w {
            ParamTasks::Whole(t) => std::mem::take(t),
            ParamTasks::Gemms(_) => Vec::new(),
        })
        .collect();
    let mut queue: Vec<Piece<'_, T>> = Vec::new();
    for ((g, work), whole) in grads
        .tensors_mut()
        .iter_mut()
        .zip(&prepared)
        .zip(&mut wholes)
    {
        let empty = match work {
            ParamTasks::Gemms(v) => v.is_empty(),
            ParamTasks::Whole(_) => whole.is_empty(),
        };
        if !empty {
            pieces(g, work, whole, &mut queue);
        }
    }
    // Largest last: threads pop from the back.
    queue.sort_by_key(Piece::cost);
    let queue = std::sync::Mutex::new(queue);
    let next = || {
        queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
    };
    let threads = rayon::current_num_threads().max(1);
    (0..threads)
        .into_par_iter()
        .with_max_len(1)
        .try_for_each(|_| {
            while let Some(piece) = next() {
                piece.run()?;
            }
            Ok(())
        })
}
