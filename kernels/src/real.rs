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
#[inline]
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
#[inline]
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

/// The `f32` exponential behind [`Real::exp_fast`].
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Round x * log2(e) to the nearest integer with the 1.5 * 2^23 trick (vectorises, unlike
    // f32::round).
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(-126.0 * std::f32::consts::LN_2, 88.72);
    let k = (xc * LOG2E + MAGIC) - MAGIC;
    let r = (xc - k * LN2_HI) - k * LN2_LO;
    // e^r on |r| <= ln2/2: Taylor to degree 7 (truncation error below 2e-8 relative).
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let scaled = f32::from_bits(p.to_bits().wrapping_add(((k as i32) << 23) as u32));
    let scaled = if x < -126.0 * std::f32::consts::LN_2 {
        0.0
    } else {
        scaled
    };
    if x > 88.72 {
        f32::INFINITY
    } else if x.is_nan() {
        x
    } else {
        scaled
    }
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
