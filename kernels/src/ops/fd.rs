//! Finite-difference gradient checking in f64, shared by the operator tests.

use crate::Tensor;

/// A deterministic pseudo-random tensor with elements in `[-1, 1)`.
pub(crate) fn rand_tensor(shape: &[usize], seed: u64) -> Tensor<f64> {
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(0x2545_F491_4F6C_DD1D);
    let data = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect();
    Tensor::new(shape.to_vec(), data).expect("shape and data agree")
}

/// Sum of element-wise products (the scalar loss `<dy, y>` used to turn outputs into a loss).
pub(crate) fn dot(a: &Tensor<f64>, b: &Tensor<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    a.data().iter().zip(b.data()).map(|(x, y)| x * y).sum()
}

/// The gradient of `f` at `x` by central differences with step `1e-6`.
pub(crate) fn numeric_grad(x: &Tensor<f64>, f: impl Fn(&Tensor<f64>) -> f64) -> Tensor<f64> {
    let h = 1e-6;
    let mut probe = x.clone();
    let mut g = Tensor::zeros(x.shape().to_vec());
    for i in 0..x.numel() {
        let orig = probe.data()[i];
        probe.data_mut()[i] = orig + h;
        let up = f(&probe);
        probe.data_mut()[i] = orig - h;
        let down = f(&probe);
        probe.data_mut()[i] = orig;
        g.data_mut()[i] = (up - down) / (2.0 * h);
    }
    g
}

/// Asserts that the analytic gradient agrees with the numeric one to `tol`, relative to the
/// largest gradient magnitude (at least 1).
pub(crate) fn assert_grad_close(
    name: &str,
    analytic: &Tensor<f64>,
    numeric: &Tensor<f64>,
    tol: f64,
) {
    assert_eq!(analytic.shape(), numeric.shape(), "{name}: shapes differ");
    let scale = numeric.data().iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let err = analytic.max_abs_diff(numeric).expect("shapes agree");
    assert!(
        err <= tol * scale,
        "{name}: max |analytic - numeric| = {err:e} > {tol:e} * {scale}"
    );
}
