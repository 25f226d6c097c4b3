//! The SwiGLU activation of the feed-forward blocks: `y = silu(gate) * up`, with
//! `silu(g) = g * sigmoid(g)`.
//!
//! The sigmoid is evaluated in the form that never exponentiates a positive number, so it stays
//! finite and accurate for large `|g|` (`silu(g) -> g` for large positive `g`, `-> 0` for large
//! negative `g`, with no NaN from `inf / inf`).

use rayon::prelude::*;

use crate::{Real, Result, Tensor};

/// Elements handed to one rayon task.
const CHUNK: usize = 1 << 13;

/// The logistic sigmoid, stable for large `|g|`.
#[inline(always)]
fn sigmoid<T: Real>(g: T) -> T {
    // Branch-free so that loops vectorise: e = exp(-|g|) never overflows.
    let e = (-g.abs()).exp_fast();
    let s = T::one() / (T::one() + e);
    if g >= T::zero() { s } else { e * s }
}

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
fn forward_chunk<T: Real>(y: &mut [T], gate: &[T], up: &[T]) {
    for ((o, &g), &u) in y.iter_mut().zip(gate).zip(up) {
        *o = g * sigmoid(g) * u;
    }
}

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
fn backward_chunk<T: Real>(dgate: &mut [T], dup: &mut [T], gate: &[T], up: &[T], dy: &[T]) {
    for ((((dg, du), &g), &u), &d) in dgate
        .iter_mut()
        .zip(dup.iter_mut())
        .zip(gate)
        .zip(up)
        .zip(dy)
    {
        let s = sigmoid(g);
        *du = d * g * s;
        *dg = d * u * s * (T::one() + g * (T::one() - s));
    }
}

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
fn backward_chunk_in_place<T: Real>(gate: &mut [T], up: &mut [T], dy: &[T]) {
    for ((g, u), &d) in gate.iter_mut().zip(up.iter_mut()).zip(dy) {
        let (gv, uv) = (*g, *u);
        let s = sigmoid(gv);
        *u = d * gv * s;
        *g = d * uv * s * (T::one() + gv * (T::one() - s));
    }
}

/// `silu(gate) * up`, element-wise. `up` must have the shape of `gate` (operand `swiglu.up`).
pub fn swiglu_forward<T: Real>(gate: &Tensor<T>, up: &Tensor<T>) -> Result<Tensor<T>> {
    up.expect_shape("swiglu.up", gate.shape())?;
    let mut y = Tensor::zeros(gate.shape().to_vec());
    y.data_mut()
        .par_chunks_mut(CHUNK)
        .zip(gate.data().par_chunks(CHUNK))
        .zip(up.data().par_chunks(CHUNK))
        .for_each(|((yc, gc), uc)| forward_chunk(yc, gc, uc));
    Ok(y)
}

/// The gradients of [`swiglu_forward`]: returns `(dgate, dup)` with
/// `dgate = dy * up * s * (1 + g * (1 - s))` (where `s = sigmoid(g)`) and `dup = dy * silu(g)`.
///
/// `up` and `dy` must have the shape of `gate` (operands `swiglu.up`, `swiglu.dy`).
pub fn swiglu_backward<T: Real>(
    dy: &Tensor<T>,
    gate: &Tensor<T>,
    up: &Tensor<T>,
) -> Result<(Tensor<T>, Tensor<T>)> {
    up.expect_shape("swiglu.up", gate.shape())?;
    dy.expect_shape("swiglu.dy", gate.shape())?;
    let mut dgate = Tensor::zeros(gate.shape().to_vec());
    let mut dup = Tensor::zeros(gate.shape().to_vec());
    dgate
        .data_mut()
        .par_chunks_mut(CHUNK)
        .zip(dup.data_mut().par_chunks_mut(CHUNK))
        .zip(gate.data().par_chunks(CHUNK))
        .zip(up.data().par_chunks(CHUNK))
        .zip(dy.data().par_chunks(CHUNK))
        .for_each(|((((dgc, duc), gc), uc), dyc)| backward_chunk(dgc, duc, gc, uc, dyc));
    Ok((dgate, dup))
}

/// [`swiglu_backward`] that writes the gradients over its inputs: `gate` becomes `dgate` and
/// `up` becomes `dup` (the pre-activations are dead once their gradients exist), saving two
/// allocations.
pub fn swiglu_backward_in_place<T: Real>(
    dy: &Tensor<T>,
    mut gate: Tensor<T>,
    mut up: Tensor<T>,
) -> Result<(Tensor<T>, Tensor<T>)> {
    up.expect_shape("swiglu.up", gate.shape())?;
    dy.expect_shape("swiglu.dy", gate.shape())?;
    gate.data_mut()
        .par_chunks_mut(CHUNK)
        .zip(up.data_mut().par_chunks_mut(CHUNK))
        .zip(dy.data().par_chunks(CHUNK))
        .for_each(|((gc, uc), dyc)| backward_chunk_in_place(gc, uc, dyc));
    Ok((gate, up))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fd::{assert_grad_close, dot, numeric_grad, rand_tensor};

    #[test]
    fn in_place_backward_matches() {
        let g = rand_tensor(&[5, 9], 3).map(|v| v * 6.0);
        let u = rand_tensor(&[5, 9], 4);
        let dy = rand_tensor(&[5, 9], 5);
        let want = swiglu_backward(&dy, &g, &u).unwrap();
        let got = swiglu_backward_in_place(&dy, g.clone(), u.clone()).unwrap();
        assert_eq!(got, want);
        assert!(swiglu_backward_in_place(&g, g.clone(), Tensor::zeros([9, 5])).is_err());
    }

    #[test]
    fn forward_matches_direct_formula() {
        let g = rand_tensor(&[3, 7], 1).map(|v| v * 4.0);
        let u = rand_tensor(&[3, 7], 2);
        let y = swiglu_forward(&g, &u).unwrap();
        for ((&yv, &gv), &uv) in y.data().iter().zip(g.data()).zip(u.data()) {
            let want = gv / (1.0 + (-gv).exp()) * uv;
            assert!((yv - want).abs() < 1e-14, "{yv} vs {want}");
        }
        let y32 = swiglu_forward(&g.cast::<f32>(), &u.cast::<f32>()).unwrap();
        assert!(y32.cast::<f64>().max_abs_diff(&y).unwrap() < 1e-5);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let g = rand_tensor(&[3, 7], 3).map(|v| v * 3.0);
        let u = rand_tensor(&[3, 7], 4);
        let dy = rand_tensor(&[3, 7], 5);
        let (dg, du) = swiglu_backward(&dy, &g, &u).unwrap();
        let num_g = numeric_grad(&g, |g| dot(&dy, &swiglu_forward(g, &u).unwrap()));
        let num_u = numeric_grad(&u, |u| dot(&dy, &swiglu_forward(&g, u).unwrap()));
        assert_grad_close("swiglu dgate", &dg, &num_g, 1e-6);
        assert_grad_close("swiglu dup", &du, &num_u, 1e-6);
    }

    #[test]
    fn large_gate_values_stay_finite() {
        let g = Tensor::new([4], vec![1000.0f32, -1000.0, 90.0, -90.0]).unwrap();
        let u = Tensor::full([4], 2.0f32);
        let y = swiglu_forward(&g, &u).unwrap();
        assert_eq!(y.data()[0], 2000.0);
        assert!(y.data()[1].abs() < 1e-30 && y.data()[1].is_finite());
        assert_eq!(y.data()[2], 180.0);
        assert!(y.data()[3].abs() < 1e-30);
        let dy = Tensor::full([4], 1.0f32);
        let (dg, du) = swiglu_backward(&dy, &g, &u).unwrap();
        assert!(dg.data().iter().chain(du.data()).all(|v| v.is_finite()));
        assert_eq!(dg.data()[0], 2.0);
        assert!(dg.data()[1].abs() < 1e-30);
        assert_eq!(du.data()[0], 1000.0);
    }

    #[test]
    fn bad_shapes_name_the_operand() {
        let g = Tensor::<f32>::zeros([2, 3]);
        let err = swiglu_forward(&g, &Tensor::zeros([3, 2])).unwrap_err();
        assert!(err.to_string().contains("swiglu.up"), "{err}");
        let err = swiglu_backward(&Tensor::zeros([6]), &g, &g).unwrap_err();
        assert!(err.to_string().contains("swiglu.dy"), "{err}");
        let err = swiglu_backward(&g, &g, &Tensor::zeros([2, 4])).unwrap_err();
        assert!(err.to_string().contains("swiglu.up"), "{err}");
    }
}
