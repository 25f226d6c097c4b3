//! RMSNorm over the last dimension: `y = x / sqrt(mean(x^2) + eps) * w`.
//!
//! The backward pass is split into the input gradient (B, [`rmsnorm_backward_input`]) and the
//! weight gradient (W, [`rmsnorm_backward_weight`]). Neither takes a cached inverse RMS: both
//! recompute it from `x`, because the model recomputes norms in backward instead of keeping them.
//!
//! Row reductions (the sum of squares, the `<dy * w, x>` term and the weight gradient summed over
//! rows) accumulate in `f64` whatever the element type, and the weight gradient is reduced over
//! fixed blocks of rows in a fixed order, so results do not depend on the number of threads.

use rayon::prelude::*;

use crate::{KernelError, Real, Result, Tensor};

/// Rows handed to one rayon task at least, so that small tensors stay on one thread.
const MIN_ROWS_PER_TASK: usize = 8;

/// Rows whose weight-gradient contributions are summed together before the blocks are combined.
const WEIGHT_GRAD_BLOCK_ROWS: usize = 64;

fn check_eps(eps: f64) -> Result<()> {
    if eps.is_finite() && eps > 0.0 {
        Ok(())
    } else {
        Err(KernelError::invalid(
            "rmsnorm.eps",
            format!("must be finite and > 0, got {eps}"),
        ))
    }
}

/// The inverse RMS of one (non-empty) row, accumulated in `f64`.
#[inline]
fn inv_rms<T: Real>(row: &[T], eps: f64) -> f64 {
    let sum_sq = crate::real::sum_sq_f64(row);
    1.0 / (sum_sq / row.len() as f64 + eps).sqrt()
}

/// `out = x * r * w` for one row.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
fn scale_row<T: Real>(out: &mut [T], x: &[T], w: &[T], r: T) {
    for ((o, &xv), &wv) in out.iter_mut().zip(x).zip(w) {
        *o = xv * r * wv;
    }
}

/// `out = r * (dy * w - x * c)` for one row.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
fn backward_row<T: Real>(out: &mut [T], dy: &[T], w: &[T], x: &[T], r: T, c: T) {
    for (((o, &dv), &wv), &xv) in out.iter_mut().zip(dy).zip(w).zip(x) {
        *o = r * (dv * wv - xv * c);
    }
}

/// Validates `x` (at least one dimension) and `w` (`[d]`); returns `d`.
fn check_x_w<T: Real>(x: &Tensor<T>, w: &Tensor<T>) -> Result<usize> {
    let (_, d) = x.as_matrix("rmsnorm.x")?;
    w.expect_shape("rmsnorm.weight", &[d])?;
    Ok(d)
}

/// Forward RMSNorm over the last dimension of `x` (any rank >= 1) with weight `w` of shape `[d]`.
///
/// Fails if `w` is not `[d]` (operand `rmsnorm.weight`), `x` is a scalar (`rmsnorm.x`) or `eps` is
/// not finite and positive (`rmsnorm.eps`).
pub fn rmsnorm_forward<T: Real>(x: &Tensor<T>, w: &Tensor<T>, eps: f64) -> Result<Tensor<T>> {
    check_eps(eps)?;
    let d = check_x_w(x, w)?;
    let mut y = Tensor::zeros(x.shape().to_vec());
    if d == 0 {
        return Ok(y);
    }
    let wd = w.data();
    y.data_mut()
        .par_chunks_exact_mut(d)
        .zip(x.data().par_chunks_exact(d))
        .with_min_len(MIN_ROWS_PER_TASK)
        .for_each(|(yr, xr)| {
            let r = T::of(inv_rms(xr, eps));
            scale_row(yr, xr, wd, r);
        });
    Ok(y)
}

/// The input gradient (B pass) of [`rmsnorm_forward`]: with `g = dy * w` and `r` the inverse RMS of
/// the row, `dx = r * (g - x * r^2 * mean(g * x))`.
///
/// `dy` must have the shape of `x` (operand `rmsnorm.dy`); the other checks are those of the
/// forward pass.
pub fn rmsnorm_backward_input<T: Real>(
    dy: &Tensor<T>,
    x: &Tensor<T>,
    w: &Tensor<T>,
    eps: f64,
) -> Result<Tensor<T>> {
    check_eps(eps)?;
    let d = check_x_w(x, w)?;
    dy.expect_shape("rmsnorm.dy", x.shape())?;
    let mut dx = Tensor::zeros(x.shape().to_vec());
    if d == 0 {
        return Ok(dx);
    }
    let wd = w.data();
    dx.data_mut()
        .par_chunks_exact_mut(d)
        .zip(x.data().par_chunks_exact(d))
        .zip(dy.data().par_chunks_exact(d))
        .with_min_len(MIN_ROWS_PER_TASK)
        .for_each(|((dxr, xr), dyr)| {
            let r = inv_rms(xr, eps);
            let gx = crate::real::dot3_f64(dyr, wd, xr);
            let c = T::of(r * r * gx / d as f64);
            backward_row(dxr, dyr, wd, xr, T::of(r), c);
        });
    Ok(dx)
}

/// The weight gradient (W pass) of [`rmsnorm_forward`]: `dw = sum over rows of dy * x * r`, with
/// `r` recomputed from `x`. Returns a tensor of shape `[d]`.
///
/// `dy` must have the shape of `x` (operand `rmsnorm.dy`); `eps` as in the forward pass.
pub fn rmsnorm_backward_weight<T: Real>(
    dy: &Tensor<T>,
    x: &Tensor<T>,
    eps: f64,
) -> Result<Tensor<T>> {
    check_eps(eps)?;
    let (_, d) = x.as_matrix("rmsnorm.x")?;
    dy.expect_shape("rmsnorm.dy", x.shape())?;
    if d == 0 {
        return Ok(Tensor::zeros([0]));
    }
    let block = d.saturating_mul(WEIGHT_GRAD_BLOCK_ROWS);
    // Fixed blocks reduced in a fixed order: the result does not depend on the thread count.
    let partials: Vec<Vec<f64>> = x
        .data()
        .par_chunks(block)
        .zip(dy.data().par_chunks(block))
        .map(|(xb, db)| {
            let mut acc = vec![0.0f64; d];
            for (xr, dr) in xb.chunks_exact(d).zip(db.chunks_exact(d)) {
                let r = inv_rms(xr, eps);
                for ((a, &xv), &dv) in acc.iter_mut().zip(xr).zip(dr) {
                    *a += xv.f64() * r * dv.f64();
                }
            }
            acc
        })
        .collect();
    let mut total = vec![0.0f64; d];
    for p in &partials {
        for (t, &v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    Ok(Tensor::from_parts(
        vec![d],
        total.into_iter().map(T::of).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fd::{assert_grad_close, dot, numeric_grad, rand_tensor};

    const EPS: f64 = 1e-6;

    fn naive_forward(x: &Tensor<f64>, w: &Tensor<f64>, eps: f64) -> Tensor<f64> {
        let d = x.last_dim();
        let mut y = x.clone();
        for row in y.data_mut().chunks_exact_mut(d) {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / d as f64;
            let r = 1.0 / (ms + eps).sqrt();
            for (v, wv) in row.iter_mut().zip(w.data()) {
                *v *= r * wv;
            }
        }
        y
    }

    #[test]
    fn forward_matches_direct_formula() {
        let x = rand_tensor(&[2, 3, 5], 1);
        let w = rand_tensor(&[5], 2);
        let y = rmsnorm_forward(&x, &w, EPS).unwrap();
        assert!(y.max_abs_diff(&naive_forward(&x, &w, EPS)).unwrap() < 1e-12);
        let y32 = rmsnorm_forward(&x.cast::<f32>(), &w.cast::<f32>(), EPS).unwrap();
        assert!(y32.cast::<f64>().max_abs_diff(&y).unwrap() < 1e-5);
    }

    #[test]
    fn unit_weight_gives_unit_rms() {
        let x = rand_tensor(&[4, 16], 3).map(|v| v * 7.0);
        let w = Tensor::full([16], 1.0);
        let y = rmsnorm_forward(&x, &w, 1e-12).unwrap();
        for row in y.data().chunks_exact(16) {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / 16.0;
            assert!((ms - 1.0).abs() < 1e-9, "{ms}");
        }
    }

    #[test]
    fn backward_input_matches_finite_differences() {
        let x = rand_tensor(&[2, 3, 5], 4);
        let w = rand_tensor(&[5], 5);
        let dy = rand_tensor(&[2, 3, 5], 6);
        let dx = rmsnorm_backward_input(&dy, &x, &w, EPS).unwrap();
        let num = numeric_grad(&x, |x| dot(&dy, &rmsnorm_forward(x, &w, EPS).unwrap()));
        assert_grad_close("rmsnorm dx", &dx, &num, 1e-6);
    }

    #[test]
    fn backward_weight_matches_finite_differences() {
        let x = rand_tensor(&[4, 6], 7);
        let w = rand_tensor(&[6], 8);
        let dy = rand_tensor(&[4, 6], 9);
        let dw = rmsnorm_backward_weight(&dy, &x, EPS).unwrap();
        let num = numeric_grad(&w, |w| dot(&dy, &rmsnorm_forward(&x, w, EPS).unwrap()));
        assert_grad_close("rmsnorm dw", &dw, &num, 1e-6);
    }

    #[test]
    fn input_and_weight_passes_give_the_full_gradient() {
        // Pack (x, w) into one vector and check [dx, dw] against the gradient of the loss in both.
        let (rows, d) = (3, 4);
        let x = rand_tensor(&[rows, d], 10);
        let w = rand_tensor(&[d], 11);
        let dy = rand_tensor(&[rows, d], 12);
        let mut packed = x.data().to_vec();
        packed.extend_from_slice(w.data());
        let z = Tensor::new([rows * d + d], packed).unwrap();
        let loss = |z: &Tensor<f64>| {
            let (xs, ws) = z.data().split_at(rows * d);
            let x = Tensor::new([rows, d], xs.to_vec()).unwrap();
            let w = Tensor::new([d], ws.to_vec()).unwrap();
            dot(&dy, &rmsnorm_forward(&x, &w, EPS).unwrap())
        };
        let num = numeric_grad(&z, loss);
        let dx = rmsnorm_backward_input(&dy, &x, &w, EPS).unwrap();
        let dw = rmsnorm_backward_weight(&dy, &x, EPS).unwrap();
        let mut analytic = dx.into_data();
        analytic.extend_from_slice(dw.data());
        let analytic = Tensor::new([rows * d + d], analytic).unwrap();
        assert_grad_close("rmsnorm [dx, dw]", &analytic, &num, 1e-6);
    }

    #[test]
    fn weight_gradient_over_many_blocks_matches_naive_sum() {
        let (rows, d) = (150, 3);
        let x = rand_tensor(&[rows, d], 13);
        let dy = rand_tensor(&[rows, d], 14);
        let dw = rmsnorm_backward_weight(&dy, &x, EPS).unwrap();
        let ones = Tensor::full([d], 1.0);
        let xhat = naive_forward(&x, &ones, EPS);
        let mut want = vec![0.0; d];
        for (xr, dr) in xhat.data().chunks_exact(d).zip(dy.data().chunks_exact(d)) {
            for ((acc, xv), dv) in want.iter_mut().zip(xr).zip(dr) {
                *acc += xv * dv;
            }
        }
        let want = Tensor::new([d], want).unwrap();
        assert!(dw.max_abs_diff(&want).unwrap() < 1e-12);
        let dw32 = rmsnorm_backward_weight(&dy.cast::<f32>(), &x.cast::<f32>(), EPS).unwrap();
        assert!(dw32.cast::<f64>().max_abs_diff(&want).unwrap() < 1e-4);
    }

    #[test]
    fn bad_inputs_name_the_operand() {
        let x = Tensor::<f32>::zeros([2, 4]);
        let w = Tensor::<f32>::zeros([4]);
        let err = rmsnorm_forward(&x, &Tensor::zeros([3]), EPS).unwrap_err();
        assert!(err.to_string().contains("rmsnorm.weight"), "{err}");
        let err = rmsnorm_forward(&x, &w, 0.0).unwrap_err();
        assert!(err.to_string().contains("rmsnorm.eps"), "{err}");
        let err = rmsnorm_forward(&x, &w, f64::NAN).unwrap_err();
        assert!(err.to_string().contains("rmsnorm.eps"), "{err}");
        let err = rmsnorm_forward(&Tensor::zeros(Vec::new()), &w, EPS).unwrap_err();
        assert!(err.to_string().contains("rmsnorm.x"), "{err}");
        let err = rmsnorm_backward_input(&Tensor::zeros([4, 2]), &x, &w, EPS).unwrap_err();
        assert!(err.to_string().contains("rmsnorm.dy"), "{err}");
        let err = rmsnorm_backward_weight(&Tensor::zeros([2, 5]), &x, EPS).unwrap_err();
        assert!(err.to_string().contains("rmsnorm.dy"), "{err}");
        let err = rmsnorm_backward_input(&x, &x, &Tensor::zeros([2, 4]), EPS).unwrap_err();
        assert!(err.to_string().contains("rmsnorm.weight"), "{err}");
    }

    #[test]
    fn empty_inputs_are_fine() {
        let x = Tensor::<f64>::zeros([0, 4]);
        let w = Tensor::<f64>::zeros([4]);
        assert_eq!(rmsnorm_forward(&x, &w, EPS).unwrap().shape(), &[0, 4]);
        let dw = rmsnorm_backward_weight(&x, &x, EPS).unwrap();
        assert_eq!(dw.data(), &[0.0; 4]);
        let x = Tensor::<f64>::zeros([3, 0]);
        let w = Tensor::<f64>::zeros([0]);
        assert_eq!(
            rmsnorm_backward_input(&x, &x, &w, EPS).unwrap().shape(),
            &[3, 0]
        );
        assert_eq!(rmsnorm_backward_weight(&x, &x, EPS).unwrap().shape(), &[0]);
    }
}
