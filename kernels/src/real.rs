//! The floating-point element types that the generic operators run on.

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};

/// `f32` (the training type) or `f64` (used to check gradients against finite differences).
pub trait Real:
    num_traits::Float
    + num_traits::FloatConst
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Sum
    + Default
    + Debug
    + Send
    + Sync
    + 'static
{
    /// Converts from `f64`, rounding to nearest.
    fn of(x: f64) -> Self;
    /// Widens to `f64`.
    fn f64(self) -> f64;
    /// `e^self`, written so that loops over slices vectorise: for `f32` a branch-free range
    /// reduction and polynomial (relative error below 3e-7, i.e. a few ULP; results below the
    /// smallest normal `f32` (x < -87.33) flush to 0, and above 88.72 it gives +inf), for `f64` the standard library's `exp`.
    fn exp_fast(self) -> Self;
}

/// Writes `exp(x - shift)` for every `x` of `row` (in place) and returns their sum accumulated
/// in `f64` over 16 fixed lanes (deterministic, and vectorisable).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
pub fn exp_shifted_sum<T: Real>(row: &mut [T], shift: T) -> f64 {
    let mut lanes = [0f64; 16];
    let mut chunks = row.chunks_exact_mut(16);
    for c in &mut chunks {
        for (x, l) in c.iter_mut().zip(lanes.iter_mut()) {
            *x = (*x - shift).exp_fast();
            *l += x.f64();
        }
    }
    for (x, l) in chunks.into_remainder().iter_mut().zip(lanes.iter_mut()) {
        *x = (*x - shift).exp_fast();
        *l += x.f64();
    }
    lanes.iter().sum()
}

/// The sum of `exp(x - shift)` over `row`, accumulated as [`exp_shifted_sum`] does.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
pub fn sum_exp_shifted<T: Real>(row: &[T], shift: T) -> f64 {
    let mut lanes = [0f64; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for (x, l) in c.iter().zip(lanes.iter_mut()) {
            *l += (*x - shift).exp_fast().f64();
        }
    }
    for (x, l) in chunks.remainder().iter().zip(lanes.iter_mut()) {
        *l += (*x - shift).exp_fast().f64();
    }
    lanes.iter().sum()
}

/// `a += b` element-wise (over the shorter length).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
pub fn add_into<T: Real>(a: &mut [T], b: &[T]) {
    for (x, &y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// `sum(a * b)` in `T`, over 16 fixed lanes (deterministic, and vectorisable).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
pub fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut lanes = [T::zero(); 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for ((l, &p), &q) in lanes.iter_mut().zip(x).zip(y) {
            *l += p * q;
        }
    }
    for ((l, &p), &q) in lanes.iter_mut().zip(ca.remainder()).zip(cb.remainder()) {
        *l += p * q;
    }
    lanes.iter().fold(T::zero(), |s, &v| s + v)
}

/// `sum(x^2)` over `row`, accumulated in `f64` over 16 fixed lanes.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
pub fn sum_sq_f64<T: Real>(row: &[T]) -> f64 {
    let mut lanes = [0f64; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for (x, l) in c.iter().zip(lanes.iter_mut()) {
            let v = x.f64();
            *l += v * v;
        }
    }
    for (x, l) in chunks.remainder().iter().zip(lanes.iter_mut()) {
        let v = x.f64();
        *l += v * v;
    }
    lanes.iter().sum()
}

/// `sum(a * b * c)` (element-wise products), accumulated in `f64` over 16 fixed lanes; the
/// product `a * b` is formed in `T`.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
pub fn dot3_f64<T: Real>(a: &[T], b: &[T], c: &[T]) -> f64 {
    let mut lanes = [0f64; 16];
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut i = 0;
    while i + 16 <= n {
        for (j, l) in lanes.iter_mut().enumerate() {
            *l += (a[i + j] * b[i + j]).f64() * c[i + j].f64();
        }
        i += 16;
    }
    for (j, l) in lanes.iter_mut().enumerate().take(n - i) {
        *l += (a[i + j] * b[i + j]).f64() * c[i + j].f64();
    }
    lanes.iter().sum()
}

/// The `f32` exponential behind [`Real::exp_fast`].
///
/// Written for the vectoriser: no float-to-int conversion (the integer part of `x log2(e)` is
/// read from the bits of the rounded sum), and the special cases are selects.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const LO: f32 = -126.0 * std::f32::consts::LN_2;
    const HI: f32 = 88.72;
    // Adding 1.5 * 2^23 rounds x * log2(e) to the nearest integer k and leaves k in the low
    // mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let xc = if x < LO { LO } else { x };
    let xc = if xc > HI { HI } else { xc };
    let kf = xc * LOG2E + MAGIC;
    let k = kf - MAGIC;
    let ki = (kf.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = (xc - k * LN2_HI) - k * LN2_LO;
    // e^r on |r| <= ln2/2: Taylor to degree 7 (truncation error below 2e-8 relative).
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let scaled = f32::from_bits((p.to_bits() as i32).wrapping_add(ki << 23) as u32);
    let scaled = if x < LO { 0.0 } else { scaled };
    let scaled = if x > HI { f32::INFINITY } else { scaled };
    // NaN fails every comparison above; pass it through.
    if x.is_nan() { x } else { scaled }
}

impl Real for f32 {
    #[inline]
    fn of(x: f64) -> Self {
        x as f32
    }
    #[inline]
    fn f64(self) -> f64 {
        f64::from(self)
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        exp_f32(self)
    }
}

impl Real for f64 {
    #[inline]
    fn of(x: f64) -> Self {
        x
    }
    #[inline]
    fn f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        self.exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_reductions_match_direct_sums() {
        // Lengths around the 16-lane width, including the empty row and a remainder.
        for n in [0usize, 1, 15, 16, 17, 33, 300] {
            let a: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let b: Vec<f32> = (0..n)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 5.0)
                .collect();
            let c: Vec<f32> = (0..n)
                .map(|i| ((i * 29 % 89) as f32 - 44.0) / 3.0)
                .collect();
            let sq: f64 = a.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
            let d3: f64 = (0..n)
                .map(|i| f64::from(a[i] * b[i]) * f64::from(c[i]))
                .sum();
            assert!(
                (sum_sq_f64(&a) - sq).abs() <= 1e-9 * sq.abs().max(1.0),
                "n {n}"
            );
            assert!(
                (dot3_f64(&a, &b, &c) - d3).abs() <= 1e-9 * d3.abs().max(1.0),
                "n {n}"
            );
            let es: f64 = a.iter().map(|&x| (f64::from(x) - 2.0).exp()).sum();
            assert!(
                (sum_exp_shifted(&a, 2.0f32) - es).abs() <= 1e-6 * es.max(1.0),
                "n {n}"
            );
            let mut row = a.clone();
            assert_eq!(
                exp_shifted_sum(&mut row, 2.0f32),
                sum_exp_shifted(&a, 2.0f32)
            );
            for (e, &x) in row.iter().zip(&a) {
                assert_eq!(*e, exp_f32(x - 2.0));
            }
            let d: f64 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| f64::from(x) * f64::from(y))
                .sum();
            assert!(
                (f64::from(dot(&a, &b)) - d).abs() <= 1e-4 * d.abs().max(1.0),
                "n {n}"
            );
            let mut acc = a.clone();
            add_into(&mut acc, &b);
            assert!(
                acc.iter()
                    .zip(a.iter().zip(&b))
                    .all(|(s, (x, y))| *s == x + y)
            );
        }
    }

    #[test]
    fn fast_exp_is_accurate_over_the_whole_range() {
        let mut worst = 0f64;
        let mut x = -87.3f32;
        while x < 88.7 {
            let got = f64::from(exp_f32(x));
            let want = f64::from(x).exp();
            if want > f64::from(f32::MIN_POSITIVE) {
                worst = worst.max((got - want).abs() / want);
            }
            x += 0.000_731;
        }
        assert!(worst < 3e-7, "max relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-200.0), 0.0);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-90.0), 0.0);
    }
}
