//! Rotary position embedding (RoPE) on `x` of shape `[batch, seq, heads, dim]`.
//!
//! Token `(b, s)` sits at position `p = s + offset`; the pair of dims with frequency index `i`
//! (`0 <= i < dim / 2`) is rotated by the angle `p * theta_i`, with `theta_i = base^(-2i / dim)`
//! for [`RopeTable::new`] or any caller-supplied frequencies for [`RopeTable::from_inv_freq`] (how
//! YaRN scaling plugs in). The whole last dimension is rotated: a model that applies RoPE to only
//! part of each head (DeepSeek-V3's decoupled `qk_rope_head_dim`) passes that part alone.
//!
//! Two layouts pair the dims differently:
//!
//! * [`RopeLayout::Interleaved`] rotates the pairs `(2i, 2i + 1)`. This is what Hugging Face's
//!   DeepseekV3 does with `rope_interleave`: its code first de-interleaves each vector into
//!   `[x0, x2, x4, .., x1, x3, ..]` and then rotates in the half-split layout, so its output is
//!   ours under the fixed permutation `P` that sends dim `2i` to `i` and dim `2i + 1` to
//!   `dim / 2 + i`, i.e. `hf(x) = P(interleaved(x)) = half_split(P(x))`. Since the same `P` is
//!   applied to queries and keys and permutations preserve dot products, `q . k` (all that
//!   attention uses) is identical; only checkpoint weights that feed a later projection would need
//!   the permutation.
//! * [`RopeLayout::HalfSplit`] rotates the pairs `(i, i + dim / 2)`: the Llama / `rotate_half`
//!   layout.
//!
//! `cos` and `sin` are computed and stored in `f64` and cast to the element type as they are used.
//! The backward pass is the rotation by the negative angle (the transpose of the forward map).

use rayon::prelude::*;

use crate::tensor::fmt_shape;
use crate::{KernelError, Real, Result, Tensor};

/// Tokens handed to one rayon task at least.
const MIN_TOKENS_PER_TASK: usize = 16;

/// Which dims of a head form the rotated pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs `(2i, 2i + 1)`: DeepSeek-V3's `rope_interleave` layout (see the module docs for how
    /// it relates to the Hugging Face implementation).
    Interleaved,
    /// Pairs `(i, i + dim / 2)`: the Llama / `rotate_half` layout.
    HalfSplit,
}

/// Precomputed `cos` and `sin` of `position * inv_freq[i]`, row-major `[max_positions, dim / 2]`,
/// in `f64`.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeTable {
    dim: usize,
    max_positions: usize,
    cos: Vec<f64>,
    sin: Vec<f64>,
}

impl RopeTable {
    /// The standard table: `inv_freq[i] = base^(-2i / dim)` for positions `0..max_positions`.
    ///
    /// Fails unless `dim` is even and positive (argument `rope.dim`) and `base` is finite and
    /// positive (`rope.base`).
    pub fn new(dim: usize, max_positions: usize, base: f64) -> Result<Self> {
        if dim == 0 || !dim.is_multiple_of(2) {
            return Err(KernelError::invalid(
                "rope.dim",
                format!("must be even and positive, got {dim}"),
            ));
        }
        if !(base.is_finite() && base > 0.0) {
            return Err(KernelError::invalid(
                "rope.base",
                format!("must be finite and > 0, got {base}"),
            ));
        }
        let inv_freq: Vec<f64> = (0..dim / 2)
            .map(|i| base.powf(-((2 * i) as f64) / dim as f64))
            .collect();
        Self::from_inv_freq(&inv_freq, max_positions)
    }

    /// A table for caller-supplied angular frequencies (one per rotated pair, so `dim` is
    /// `2 * inv_freq.len()`), for example YaRN-scaled ones.
    ///
    /// Fails if `inv_freq` is empty or holds a non-finite value (argument `rope.inv_freq`), or if
    /// the table would not fit in memory (`rope.max_positions`).
    pub fn from_inv_freq(inv_freq: &[f64], max_positions: usize) -> Result<Self> {
        if inv_freq.is_empty() {
            return Err(KernelError::invalid("rope.inv_freq", "must not be empty"));
        }
        if let Some((i, f)) = inv_freq.iter().enumerate().find(|(_, f)| !f.is_finite()) {
            return Err(KernelError::invalid(
                "rope.inv_freq",
                format!("must be finite, got {f} at index {i}"),
            ));
        }
        let half = inv_freq.len();
        let len = crate::checked_numel("rope.max_positions", &[max_positions, half], 16)?;
        let mut cos = Vec::with_capacity(len);
        let mut sin = Vec::with_capacity(len);
        for pos in 0..max_positions {
            for &f in inv_freq {
                let (s, c) = (pos as f64 * f).sin_cos();
                cos.push(c);
                sin.push(s);
            }
        }
        Ok(Self {
            dim: 2 * half,
            max_positions,
            cos,
            sin,
        })
    }

    /// The head dimension the table rotates (twice the number of frequencies).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The number of positions the table covers (positions `0..max_positions`).
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// `cos(position * inv_freq[i])`, row-major `[max_positions, dim / 2]`.
    pub fn cos(&self) -> &[f64] {
        &self.cos
    }

    /// `sin(position * inv_freq[i])`, row-major `[max_positions, dim / 2]`.
    pub fn sin(&self) -> &[f64] {
        &self.sin
    }
}

/// Rotates every pair by `sign * angle`; `sign` is `1` forward and `-1` backward.
fn rotate<T: Real>(
    operand: &'static str,
    x: &Tensor<T>,
    table: &RopeTable,
    layout: RopeLayout,
    offset: usize,
    sign: f64,
) -> Result<Tensor<T>> {
    let dims = x.expect_rank(operand, 4)?;
    let (seq, heads, dim) = (dims[1], dims[2], dims[3]);
    if dim != table.dim {
        return Err(KernelError::shape(
            operand,
            format!("[batch, seq, heads, {}]", table.dim),
            fmt_shape(dims),
        ));
    }
    if seq > 0 && offset.saturating_add(seq) > table.max_positions {
        // The first sequence index whose position falls outside the table.
        let position = table.max_positions.saturating_sub(offset);
        return Err(KernelError::IndexOutOfRange {
            operand: "rope.positions",
            position,
            index: offset.saturating_add(position),
            bound: table.max_positions,
        });
    }
    let mut y = Tensor::zeros(x.shape().to_vec());
    let token = heads * dim;
    if token == 0 || seq == 0 {
        return Ok(y);
    }
    let half = dim / 2;
    y.data_mut()
        .par_chunks_exact_mut(token)
        .zip(x.data().par_chunks_exact(token))
        .enumerate()
        .with_min_len(MIN_TOKENS_PER_TASK)
        .for_each(|(t, (yt, xt))| {
            // Validated above: offset + s < max_positions, and the table holds max_positions rows.
            let start = (offset + t % seq) * half;
            let cos = &table.cos[start..start + half];
            let sin = &table.sin[start..start + half];
            for (yh, xh) in yt.chunks_exact_mut(dim).zip(xt.chunks_exact(dim)) {
                match layout {
                    RopeLayout::Interleaved => {
                        for (((yp, xp), &c), &s) in yh
                            .chunks_exact_mut(2)
                            .zip(xh.chunks_exact(2))
                            .zip(cos)
                            .zip(sin)
                        {
                            let (c, s) = (T::of(c), T::of(sign * s));
                            let (a, b) = (xp[0], xp[1]);
                            yp[0] = a * c - b * s;
                            yp[1] = a * s + b * c;
                        }
                    }
                    RopeLayout::HalfSplit => {
                        let (y1, y2) = yh.split_at_mut(half);
                        let (x1, x2) = xh.split_at(half);
                        for ((((o1, o2), &a), &b), (&c, &s)) in y1
                            .iter_mut()
                            .zip(y2.iter_mut())
                            .zip(x1)
                            .zip(x2)
                            .zip(cos.iter().zip(sin))
                        {
                            let (c, s) = (T::of(c), T::of(sign * s));
                            *o1 = a * c - b * s;
                            *o2 = a * s + b * c;
                        }
                    }
                }
            }
        });
    Ok(y)
}

/// Applies RoPE to `x` of shape `[batch, seq, heads, dim]`, token `(b, s)` at position
/// `s + offset`.
///
/// Fails if `x` is not 4-D or its last dimension is not `table.dim()` (operand `rope.x`), or if a
/// position reaches `table.max_positions()` (operand `rope.positions`).
pub fn rope_forward<T: Real>(
    x: &Tensor<T>,
    table: &RopeTable,
    layout: RopeLayout,
    offset: usize,
) -> Result<Tensor<T>> {
    rotate("rope.x", x, table, layout, offset, 1.0)
}

/// The gradient of [`rope_forward`]: `dy` rotated by the negative angles. Same checks as the
/// forward pass, with the operand named `rope.dy`.
pub fn rope_backward<T: Real>(
    dy: &Tensor<T>,
    table: &RopeTable,
    layout: RopeLayout,
    offset: usize,
) -> Result<Tensor<T>> {
    rotate("rope.dy", dy, table, layout, offset, -1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fd::{assert_grad_close, dot, numeric_grad, rand_tensor};

    const LAYOUTS: [RopeLayout; 2] = [RopeLayout::Interleaved, RopeLayout::HalfSplit];

    /// The de-interleaving permutation of the last dim: `2i -> i`, `2i + 1 -> dim / 2 + i`.
    fn deinterleave(x: &Tensor<f64>) -> Tensor<f64> {
        let dim = x.last_dim();
        let half = dim / 2;
        let mut out = x.clone();
        for (o, v) in out
            .data_mut()
            .chunks_exact_mut(dim)
            .zip(x.data().chunks_exact(dim))
        {
            for (i, pair) in v.chunks_exact(2).enumerate() {
                o[i] = pair[0];
                o[half + i] = pair[1];
            }
        }
        out
    }

    #[test]
    fn backward_matches_finite_differences() {
        let table = RopeTable::new(6, 16, 10000.0).unwrap();
        let x = rand_tensor(&[2, 3, 2, 6], 1);
        let dy = rand_tensor(&[2, 3, 2, 6], 2);
        for layout in LAYOUTS {
            let dx = rope_backward(&dy, &table, layout, 2).unwrap();
            let num = numeric_grad(&x, |x| {
                dot(&dy, &rope_forward(x, &table, layout, 2).unwrap())
            });
            assert_grad_close("rope dx", &dx, &num, 1e-7);
        }
    }

    #[test]
    fn backward_inverts_forward_and_position_zero_is_identity() {
        let table = RopeTable::new(8, 32, 500.0).unwrap();
        let x = rand_tensor(&[2, 5, 3, 8], 3);
        for layout in LAYOUTS {
            let y = rope_forward(&x, &table, layout, 7).unwrap();
            let back = rope_backward(&y, &table, layout, 7).unwrap();
            assert!(back.max_abs_diff(&x).unwrap() < 1e-12);
            let x0 = rand_tensor(&[1, 1, 2, 8], 4);
            let y0 = rope_forward(&x0, &table, layout, 0).unwrap();
            assert!(y0.max_abs_diff(&x0).unwrap() < 1e-15);
        }
    }

    #[test]
    fn interleaved_and_half_split_agree_up_to_permutation() {
        let table = RopeTable::new(8, 16, 10000.0).unwrap();
        let x = rand_tensor(&[2, 4, 3, 8], 5);
        let inter = rope_forward(&x, &table, RopeLayout::Interleaved, 3).unwrap();
        let split = rope_forward(&deinterleave(&x), &table, RopeLayout::HalfSplit, 3).unwrap();
        // Hugging Face's rope_interleave output: de-interleave, then rotate_half.
        assert!(deinterleave(&inter).max_abs_diff(&split).unwrap() < 1e-14);
    }

    #[test]
    fn qk_depends_only_on_position_difference() {
        let (seq, dim) = (10, 8);
        let table = RopeTable::new(dim, 64, 100.0).unwrap();
        let q = rand_tensor(&[dim], 6);
        let k = rand_tensor(&[dim], 7);
        let repeat = |v: &Tensor<f64>| {
            let data = (0..seq).flat_map(|_| v.data().to_vec()).collect();
            Tensor::new([1, seq, 1, dim], data).unwrap()
        };
        for layout in LAYOUTS {
            let rq = rope_forward(&repeat(&q), &table, layout, 5).unwrap();
            let rk = rope_forward(&repeat(&k), &table, layout, 5).unwrap();
            let score = |m: usize, n: usize| -> f64 {
                let a = &rq.data()[m * dim..(m + 1) * dim];
                let b = &rk.data()[n * dim..(n + 1) * dim];
                a.iter().zip(b).map(|(x, y)| x * y).sum()
            };
            for delta in 0..4 {
                let want = score(delta, 0);
                for n in 1..seq - delta {
                    assert!(
                        (score(n + delta, n) - want).abs() < 1e-12,
                        "{layout:?} {delta}"
                    );
                }
            }
            // And it really does depend on the difference.
            assert!((score(3, 0) - score(0, 0)).abs() > 1e-6);
        }
    }

    #[test]
    fn offset_matches_slice_of_a_longer_sequence() {
        let table = RopeTable::new(4, 16, 10000.0).unwrap();
        let long = rand_tensor(&[1, 6, 2, 4], 8);
        let tail = Tensor::new([1, 2, 2, 4], long.data()[4 * 8..].to_vec()).unwrap();
        for layout in LAYOUTS {
            let full = rope_forward(&long, &table, layout, 0).unwrap();
            let part = rope_forward(&tail, &table, layout, 4).unwrap();
            let want = Tensor::new([1, 2, 2, 4], full.data()[4 * 8..].to_vec()).unwrap();
            assert!(part.max_abs_diff(&want).unwrap() < 1e-15);
        }
    }

    #[test]
    fn table_from_inv_freq_matches_new_and_f32_matches_f64() {
        let (dim, base) = (6, 10000.0f64);
        let inv: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f64 / dim as f64))
            .collect();
        let a = RopeTable::new(dim, 9, base).unwrap();
        let b = RopeTable::from_inv_freq(&inv, 9).unwrap();
        assert_eq!(a.dim(), 6);
        assert_eq!(a.max_positions(), 9);
        assert_eq!(a.cos().len(), 27);
        for (x, y) in a
            .cos()
            .iter()
            .zip(b.cos())
            .chain(a.sin().iter().zip(b.sin()))
        {
            assert!((x - y).abs() < 1e-14);
        }
        assert!((a.cos()[3 * 3 + 1] - (3.0 * inv[1]).cos()).abs() < 1e-15);
        let x = rand_tensor(&[2, 4, 2, 6], 9);
        for layout in LAYOUTS {
            let y = rope_forward(&x, &a, layout, 5).unwrap();
            let y32 = rope_forward(&x.cast::<f32>(), &a, layout, 5).unwrap();
            assert!(y32.cast::<f64>().max_abs_diff(&y).unwrap() < 1e-6);
        }
    }

    #[test]
    fn bad_inputs_are_refused() {
        let err = RopeTable::new(7, 4, 10000.0).unwrap_err();
        assert!(err.to_string().contains("rope.dim"), "{err}");
        let err = RopeTable::new(0, 4, 10000.0).unwrap_err();
        assert!(err.to_string().contains("rope.dim"), "{err}");
        let err = RopeTable::new(4, 4, -1.0).unwrap_err();
        assert!(err.to_string().contains("rope.base"), "{err}");
        let err = RopeTable::from_inv_freq(&[], 4).unwrap_err();
        assert!(err.to_string().contains("rope.inv_freq"), "{err}");
        let err = RopeTable::from_inv_freq(&[1.0, f64::NAN], 4).unwrap_err();
        assert!(err.to_string().contains("rope.inv_freq"), "{err}");

        let table = RopeTable::new(4, 8, 10000.0).unwrap();
        let x = Tensor::<f32>::zeros([1, 3, 2, 4]);
        let err = rope_forward(
            &Tensor::<f32>::zeros([1, 3, 2, 6]),
            &table,
            RopeLayout::HalfSplit,
            0,
        )
        .unwrap_err();
        assert!(err.to_string().contains("rope.x"), "{err}");
        let err = rope_forward(
            &Tensor::<f32>::zeros([1, 3, 2, 5]),
            &table,
            RopeLayout::Interleaved,
            0,
        )
        .unwrap_err();
        assert!(err.to_string().contains("rope.x"), "{err}");
        let err = rope_forward(
            &Tensor::<f32>::zeros([3, 8]),
            &table,
            RopeLayout::Interleaved,
            0,
        )
        .unwrap_err();
        assert!(err.to_string().contains("rope.x"), "{err}");
        let err = rope_backward(
            &Tensor::<f32>::zeros([1, 3, 4]),
            &table,
            RopeLayout::Interleaved,
            0,
        )
        .unwrap_err();
        assert!(err.to_string().contains("rope.dy"), "{err}");
        // Positions 6, 7, 8: position 8 is outside an 8-position table.
        let err = rope_forward(&x, &table, RopeLayout::Interleaved, 6).unwrap_err();
        assert_eq!(
            err,
            KernelError::IndexOutOfRange {
                operand: "rope.positions",
                position: 2,
                index: 8,
                bound: 8
            }
        );
        let err = rope_backward(&x, &table, RopeLayout::HalfSplit, usize::MAX).unwrap_err();
        assert!(err.to_string().contains("rope.positions"), "{err}");
        assert!(rope_forward(&x, &table, RopeLayout::Interleaved, 5).is_ok());
    }
}
