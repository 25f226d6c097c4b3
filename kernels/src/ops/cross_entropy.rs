//! Softmax cross-entropy from logits `[n, vocab]` and integer targets, with an optional ignore
//! index.
//!
//! The loss is the mean over counted tokens (those whose target is not the ignore index) of
//! `logsumexp(logits[i]) - logits[i, target[i]]`. Each row's log-sum-exp subtracts the row maximum
//! before exponentiating and accumulates in `f64`; the per-row losses are summed in `f64` in row
//! order, so the loss does not depend on the thread count. Training runs this in FP32; `f64` is
//! used for the gradient checks.

use rayon::prelude::*;

use crate::{KernelError, Real, Result, Tensor};

/// Rows handed to one rayon task at least.
const MIN_ROWS_PER_TASK: usize = 4;

/// The loss and what the backward pass needs from the forward pass.
#[derive(Clone, Debug, PartialEq)]
pub struct CrossEntropy<T> {
    /// Mean loss over the counted tokens; `0` when none is counted.
    pub loss: f64,
    /// Number of counted tokens (targets that are not the ignore index).
    pub count: usize,
    /// Per-row log-sum-exp of the logits (the softmax normaliser); `0` for ignored rows.
    pub lse: Vec<T>,
    /// The ignore index the forward pass used.
    pub ignore_index: Option<u32>,
}

/// Validates logits and targets; returns `(n, vocab, count)`.
fn check_inputs<T: Real>(
    logits: &Tensor<T>,
    targets: &[u32],
    ignore_index: Option<u32>,
) -> Result<(usize, usize, usize)> {
    let dims = logits.expect_rank("cross_entropy.logits", 2)?;
    let (n, vocab) = (dims[0], dims[1]);
    if targets.len() != n {
        return Err(KernelError::shape(
            "cross_entropy.targets",
            format!("{n} targets (one per logits row)"),
            format!("{} targets", targets.len()),
        ));
    }
    let mut count = 0;
    for (position, &t) in targets.iter().enumerate() {
        if Some(t) == ignore_index {
            continue;
        }
        if t as usize >= vocab {
            return Err(KernelError::IndexOutOfRange {
                operand: "cross_entropy.targets",
                position,
                index: t as usize,
                bound: vocab,
            });
        }
        count += 1;
    }
    Ok((n, vocab, count))
}

/// The row maximum, and whether every element is finite (`x * 0` is `0` for finite `x` and NaN
/// otherwise, so one vectorised pass checks both).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
fn row_max_finite<T: Real>(row: &[T]) -> (T, bool) {
    let mut max = [T::neg_infinity(); 16];
    let mut probe = [T::zero(); 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for ((m, z), &x) in max.iter_mut().zip(probe.iter_mut()).zip(c) {
            *m = if x > *m { x } else { *m };
            *z += x * T::zero();
        }
    }
    for ((m, z), &x) in max.iter_mut().zip(probe.iter_mut()).zip(chunks.remainder()) {
        *m = if x > *m { x } else { *m };
        *z += x * T::zero();
    }
    let m = max.iter().fold(T::neg_infinity(), |a, &b| a.max(b));
    (m, probe.iter().all(|z| *z == T::zero()))
}

/// The error for a row that holds a non-finite value; `offset` is the row's first element.
fn non_finite<T: Real>(row: &[T], offset: usize) -> KernelError {
    match crate::error::check_finite("cross_entropy.logits", row) {
        Err(KernelError::NonFinite { index, value, .. }) => KernelError::NonFinite {
            operand: "cross_entropy.logits",
            index: offset + index,
            value,
        },
        Err(e) => e,
        Ok(()) => KernelError::invalid("cross_entropy.logits", "a row is not finite"),
    }
}

/// The log-sum-exp of a non-empty row, accumulated in `f64`; row `i` of the logits.
#[inline]
fn row_lse<T: Real>(row: &[T], i: usize) -> Result<f64> {
    let (m, finite) = row_max_finite(row);
    if !finite {
        return Err(non_finite(row, i * row.len()));
    }
    let s = crate::real::sum_exp_shifted(row, m);
    Ok(m.f64() + s.ln())
}

/// Overwrites a row of logits with `scale * softmax(row)` (given the row's log-sum-exp).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
fn scaled_softmax_in_place<T: Real>(row: &mut [T], lse: T, scale: T) {
    for v in row.iter_mut() {
        *v = scale * (*v - lse).exp_fast();
    }
}

/// The mean softmax cross-entropy of `logits` (`[n, vocab]`) against `targets` (`n` ids), skipping
/// targets equal to `ignore_index`.
///
/// Fails if `logits` is not 2-D or holds a non-finite value (operand `cross_entropy.logits`), or
/// if `targets` has the wrong length or a counted target is not below `vocab` (operand
/// `cross_entropy.targets`). If every target is ignored the loss is `0` with `count == 0`.
pub fn cross_entropy_forward<T: Real>(
    logits: &Tensor<T>,
    targets: &[u32],
    ignore_index: Option<u32>,
) -> Result<CrossEntropy<T>> {
    let (n, vocab, count) = check_inputs(logits, targets, ignore_index)?;
    if count == 0 || vocab == 0 {
        logits.check_finite("cross_entropy.logits")?;
        return Ok(CrossEntropy {
            loss: 0.0,
            count,
            lse: vec![T::zero(); n],
            ignore_index,
        });
    }
    // (lse, loss of the row) per row; ignored rows give (0, 0).
    let rows: Vec<(f64, f64)> = logits
        .data()
        .par_chunks_exact(vocab)
        .zip(targets.par_iter())
        .enumerate()
        .with_min_len(MIN_ROWS_PER_TASK)
        .map(|(i, (row, &t))| {
            if Some(t) == ignore_index {
                if !crate::error::all_finite(row) {
                    return Err(non_finite(row, i * vocab));
                }
                return Ok((0.0, 0.0));
            }
            let lse = row_lse(row, i)?;
            let target = row.get(t as usize).map_or(0.0, |v| v.f64());
            Ok((lse, lse - target))
        })
        .collect::<Result<_>>()?;
    let total: f64 = rows.iter().map(|&(_, l)| l).sum();
    Ok(CrossEntropy {
        loss: total / count as f64,
        count,
        lse: rows.iter().map(|&(lse, _)| T::of(lse)).collect(),
        ignore_index,
    })
}

/// The gradient of `dloss * loss` with respect to the logits:
/// `dloss * (softmax(logits[i]) - onehot(targets[i])) / count` for counted rows, `0` for ignored
/// rows (and everywhere when nothing is counted).
///
/// `saved` is the forward pass's result for the same logits and targets; a mismatch in row count
/// or counted tokens is refused (operand `cross_entropy.saved`), as is a non-finite `dloss`
/// (`cross_entropy.dloss`). Logits and targets are checked as in the forward pass.
pub fn cross_entropy_backward<T: Real>(
    logits: &Tensor<T>,
    targets: &[u32],
    saved: &CrossEntropy<T>,
    dloss: f64,
) -> Result<Tensor<T>> {
    cross_entropy_backward_in_place(logits.clone(), targets, saved, dloss)
}

/// [`cross_entropy_backward`] that turns the logits it is given into their gradient, saving
/// the allocation of a second `[n, vocab]` tensor (the logits are dead after the backward pass).
///
/// On error the logits may be partly overwritten.
pub fn cross_entropy_backward_in_place<T: Real>(
    mut logits: Tensor<T>,
    targets: &[u32],
    saved: &CrossEntropy<T>,
    dloss: f64,
) -> Result<Tensor<T>> {
    if !dloss.is_finite() {
        return Err(KernelError::invalid(
            "cross_entropy.dloss",
            format!("must be finite, got {dloss}"),
        ));
    }
    let ignore_index = saved.ignore_index;
    let (n, vocab, count) = check_inputs(&logits, targets, ignore_index)?;
    if saved.lse.len() != n {
        return Err(KernelError::shape(
            "cross_entropy.saved",
            format!("{n} log-sum-exp values (one per logits row)"),
            format!("{} values", saved.lse.len()),
        ));
    }
    if saved.count != count {
        return Err(KernelError::invalid(
            "cross_entropy.saved",
            format!(
                "counts {} tokens but the targets count {count}",
                saved.count
            ),
        ));
    }
    if count == 0 || vocab == 0 {
        logits.check_finite("cross_entropy.logits")?;
        logits.data_mut().fill(T::zero());
        return Ok(logits);
    }
    let scale = T::of(dloss / count as f64);
    logits
        .data_mut()
        .par_chunks_exact_mut(vocab)
        .zip(targets.par_iter())
        .zip(saved.lse.par_iter())
        .enumerate()
        .with_min_len(MIN_ROWS_PER_TASK)
        .try_for_each(|(i, ((row, &t), &lse))| {
            if !crate::error::all_finite(row) {
                return Err(non_finite(row, i * vocab));
            }
            if Some(t) == ignore_index {
                row.fill(T::zero());
                return Ok(());
            }
            scaled_softmax_in_place(row, lse, scale);
            if let Some(gt) = row.get_mut(t as usize) {
                *gt -= scale;
            }
            Ok(())
        })?;
    Ok(logits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fd::{assert_grad_close, numeric_grad, rand_tensor};

    fn direct_loss(logits: &Tensor<f64>, targets: &[u32], ignore: Option<u32>) -> f64 {
        let vocab = logits.last_dim();
        let mut sum = 0.0;
        let mut count = 0;
        for (row, &t) in logits.data().chunks_exact(vocab).zip(targets) {
            if Some(t) == ignore {
                continue;
            }
            let z: f64 = row.iter().map(|v| v.exp()).sum();
            sum -= (row[t as usize].exp() / z).ln();
            count += 1;
        }
        sum / count as f64
    }

    #[test]
    fn forward_matches_direct_formula() {
        let logits = rand_tensor(&[5, 7], 1).map(|v| v * 3.0);
        let targets = [0u32, 6, 3, 3, 1];
        let ce = cross_entropy_forward(&logits, &targets, None).unwrap();
        assert_eq!(ce.count, 5);
        assert!((ce.loss - direct_loss(&logits, &targets, None)).abs() < 1e-13);
        for (row, &lse) in logits.data().chunks_exact(7).zip(&ce.lse) {
            let want = row.iter().map(|v| v.exp()).sum::<f64>().ln();
            assert!((lse - want).abs() < 1e-13);
        }
        let ce32 = cross_entropy_forward(&logits.cast::<f32>(), &targets, None).unwrap();
        assert!((ce32.loss - ce.loss).abs() < 1e-5);
    }

    #[test]
    fn in_place_backward_matches_and_refuses_non_finite_logits() {
        let logits = rand_tensor(&[37, 50], 9).map(|v| (v * 5.0) as f32);
        let targets: Vec<u32> = (0..37).map(|i| (i * 7 % 50) as u32).collect();
        let ce = cross_entropy_forward(&logits, &targets, Some(3)).unwrap();
        let a = cross_entropy_backward(&logits, &targets, &ce, 0.5).unwrap();
        let b = cross_entropy_backward_in_place(logits.clone(), &targets, &ce, 0.5).unwrap();
        assert_eq!(a, b);
        for bad in [f32::NEG_INFINITY, f32::INFINITY, f32::NAN] {
            let mut l = logits.clone();
            l.data_mut()[50 * 20 + 13] = bad;
            let err = cross_entropy_forward(&l, &targets, Some(3)).unwrap_err();
            assert!(
                matches!(err, KernelError::NonFinite { index: 1013, .. }),
                "{bad}: {err}"
            );
            let err = cross_entropy_backward_in_place(l, &targets, &ce, 0.5).unwrap_err();
            assert!(
                matches!(err, KernelError::NonFinite { index: 1013, .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn large_logits_are_stable() {
        let logits = Tensor::new([2, 3], vec![1000.0f32, 999.0, -1000.0, 1e4, -1e4, 1e4]).unwrap();
        let ce = cross_entropy_forward(&logits, &[0, 1], None).unwrap();
        let row0 = (1.0 + (-1.0f64).exp()).ln();
        let row1 = 2e4 + 2.0f64.ln();
        assert!((ce.loss - (row0 + row1) / 2.0).abs() < 1e-3, "{}", ce.loss);
        let g = cross_entropy_backward(&logits, &[0, 1], &ce, 1.0).unwrap();
        assert!(g.data().iter().all(|v| v.is_finite()));
    }

    #[test]
    fn backward_matches_finite_differences() {
        let logits = rand_tensor(&[6, 5], 2).map(|v| v * 2.0);
        let targets = [4u32, 9, 0, 2, 9, 1];
        let ignore = Some(9);
        let dloss = 0.7;
        let ce = cross_entropy_forward(&logits, &targets, ignore).unwrap();
        let g = cross_entropy_backward(&logits, &targets, &ce, dloss).unwrap();
        let num = numeric_grad(&logits, |l| {
            dloss * cross_entropy_forward(l, &targets, ignore).unwrap().loss
        });
        assert_grad_close("cross_entropy dlogits", &g, &num, 1e-7);
        // softmax - onehot: every counted row sums to zero.
        for row in g.data().chunks_exact(5) {
            assert!(row.iter().sum::<f64>().abs() < 1e-14);
        }
    }

    #[test]
    fn ignored_targets_are_not_counted() {
        let logits = rand_tensor(&[4, 6], 3);
        let targets = [2u32, u32::MAX, 5, u32::MAX];
        let ce = cross_entropy_forward(&logits, &targets, Some(u32::MAX)).unwrap();
        assert_eq!(ce.count, 2);
        let kept = Tensor::new(
            [2, 6],
            [&logits.data()[0..6], &logits.data()[12..18]].concat(),
        )
        .unwrap();
        let want = cross_entropy_forward(&kept, &[2, 5], None).unwrap();
        assert!((ce.loss - want.loss).abs() < 1e-15);
        assert!((ce.loss - direct_loss(&logits, &targets, Some(u32::MAX))).abs() < 1e-13);
        let g = cross_entropy_backward(&logits, &targets, &ce, 1.0).unwrap();
        let gk = cross_entropy_backward(&kept, &[2, 5], &want, 1.0).unwrap();
        assert!(
            g.data()[6..12]
                .iter()
                .chain(&g.data()[18..])
                .all(|&v| v == 0.0)
        );
        assert_eq!(&g.data()[0..6], &gk.data()[0..6]);
        assert_eq!(&g.data()[12..18], &gk.data()[6..12]);
    }

    #[test]
    fn all_ignored_gives_zero_loss_and_gradient() {
        let logits = rand_tensor(&[3, 4], 4);
        let targets = [7u32; 3];
        let ce = cross_entropy_forward(&logits, &targets, Some(7)).unwrap();
        assert_eq!((ce.loss, ce.count), (0.0, 0));
        let g = cross_entropy_backward(&logits, &targets, &ce, 1.0).unwrap();
        assert_eq!(g.shape(), &[3, 4]);
        assert!(g.data().iter().all(|&v| v == 0.0));
        let empty = Tensor::<f32>::zeros([0, 4]);
        let ce = cross_entropy_forward(&empty, &[], None).unwrap();
        assert_eq!((ce.loss, ce.count), (0.0, 0));
    }

    #[test]
    fn bad_inputs_are_refused() {
        let logits = Tensor::<f32>::zeros([2, 3]);
        let err = cross_entropy_forward(&logits, &[0, 3], None).unwrap_err();
        assert_eq!(
            err,
            KernelError::IndexOutOfRange {
                operand: "cross_entropy.targets",
                position: 1,
                index: 3,
                bound: 3
            }
        );
        let err = cross_entropy_forward(&logits, &[0], None).unwrap_err();
        assert!(err.to_string().contains("cross_entropy.targets"), "{err}");
        let err = cross_entropy_forward(&Tensor::<f32>::zeros([6]), &[0], None).unwrap_err();
        assert!(err.to_string().contains("cross_entropy.logits"), "{err}");
        let mut bad = logits.clone();
        bad.data_mut()[4] = f32::NAN;
        let err = cross_entropy_forward(&bad, &[0, 1], None).unwrap_err();
        assert!(
            matches!(
                err,
                KernelError::NonFinite {
                    operand: "cross_entropy.logits",
                    index: 4,
                    ..
                }
            ),
            "{err}"
        );
        let ce = cross_entropy_forward(&logits, &[0, 1], None).unwrap();
        let err = cross_entropy_backward(&logits, &[0, 1], &ce, f64::NAN).unwrap_err();
        assert!(err.to_string().contains("cross_entropy.dloss"), "{err}");
        let err = cross_entropy_backward(&logits, &[0, 5], &ce, 1.0).unwrap_err();
        assert!(err.to_string().contains("cross_entropy.targets"), "{err}");
        let other = cross_entropy_forward(&logits, &[0, 1], Some(1)).unwrap();
        let mut mismatched = other.clone();
        mismatched.ignore_index = None;
        let err = cross_entropy_backward(&logits, &[0, 1], &mismatched, 1.0).unwrap_err();
        assert!(err.to_string().contains("cross_entropy.saved"), "{err}");
        let short = Tensor::<f32>::zeros([1, 3]);
        let err = cross_entropy_backward(&short, &[0], &ce, 1.0).unwrap_err();
        assert!(err.to_string().contains("cross_entropy.saved"), "{err}");
    }
}
