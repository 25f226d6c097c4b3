//! Causal scaled-dot-product attention, multi-head, with separate query/key and value head
//! dimensions (DeepSeek-V3's multi-head latent attention uses `dk = 192` (128 "nope" + 64 rope)
//! and `dv = 128`).
//!
//! Layouts: `q` and `k` are `[batch, seq, heads, dk]`, `v` is `[batch, seq, heads, dv]` and the
//! output is `[batch, seq, heads, dv]`. Query `i` attends to keys `0..=i`; future keys get exactly
//! zero probability.
//!
//! The forward pass keeps only the per-row log-sum-exp of the scaled scores
//! ([`AttentionSaved`]); the backward pass recomputes the probabilities from it, flash-attention
//! style. Work is split over `(batch, head)` pairs with rayon; each pair runs over blocks of query
//! rows, and a block of rows `i0..i1` only touches keys `0..i1`, so the masked upper triangle is
//! (blockwise) never computed.

use rayon::prelude::*;

use crate::error::check_finite;
use crate::matmul::{MatMut, MatRef, gemm_into};
use crate::tensor::fmt_shape;
use crate::{KernelError, Real, Result, Tensor};

/// Query rows per block: the score block of one `(batch, head)` pair is at most
/// `BLOCK_ROWS x seq`.
const BLOCK_ROWS: usize = 128;

/// What [`attention_forward`] keeps for [`attention_backward`].
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionSaved<T> {
    /// Per-row log-sum-exp of the scaled, causally masked scores, `[batch, heads, seq]`:
    /// `lse[b, h, i] = ln sum_{j <= i} exp(scale * q_i . k_j)`.
    pub lse: Tensor<T>,
}

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    seq: usize,
    heads: usize,
    dk: usize,
    dv: usize,
}

/// The validated operands of one call, shared by the per-head workers.
struct Operands<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    dims: Dims,
    scale: T,
    block: usize,
}

impl<'a, T: Real> Operands<'a, T> {
    fn new(
        q: &'a Tensor<T>,
        k: &'a Tensor<T>,
        v: &'a Tensor<T>,
        dims: Dims,
        scale: f64,
        block: usize,
    ) -> Self {
        Self {
            q: q.data(),
            k: k.data(),
            v: v.data(),
            dims,
            scale: T::of(scale),
            block: block.max(1),
        }
    }
}

impl<T> Operands<'_, T> {
    /// Rows `r0..r1` of head `(b, h)` of a `[batch, seq, heads, dim]` buffer, as a strided matrix
    /// (row stride `heads * dim`).
    fn head_rows<'b>(
        &self,
        data: &'b [T],
        dim: usize,
        b: usize,
        h: usize,
        r0: usize,
        r1: usize,
    ) -> Result<MatRef<'b, T>> {
        let d = self.dims;
        let rs = d.heads * dim;
        MatRef::strided(data, (b * d.seq + r0) * rs + h * dim, r1 - r0, dim, rs, 1)
    }
}

fn check_scale(softmax_scale: f64) -> Result<()> {
    if softmax_scale.is_finite() && softmax_scale > 0.0 {
        Ok(())
    } else {
        Err(KernelError::invalid(
            "attention.softmax_scale",
            format!("must be finite and > 0, got {softmax_scale}"),
        ))
    }
}

/// Checks the shapes of `q`, `k`, `v` and returns the sizes.
fn check_qkv<T: Real>(q: &Tensor<T>, k: &Tensor<T>, v: &Tensor<T>) -> Result<Dims> {
    let qs = q.expect_rank("attention.q", 4)?;
    let (batch, seq, heads, dk) = (qs[0], qs[1], qs[2], qs[3]);
    k.expect_shape("attention.k", &[batch, seq, heads, dk])?;
    let vs = v.expect_rank("attention.v", 4)?;
    if vs[..3] != [batch, seq, heads] {
        return Err(KernelError::shape(
            "attention.v",
            format!("[{batch}, {seq}, {heads}, dv] (batch, seq and heads of q)"),
            fmt_shape(vs),
        ));
    }
    // The lse and per-head work lists hold batch * heads * seq entries: make sure that fits.
    crate::checked_numel("attention.q", &[batch, heads, seq], 8)?;
    Ok(Dims {
        batch,
        seq,
        heads,
        dk,
        dv: vs[3],
    })
}

/// Fills `s` (`r x c`, row-major, rows `i0..i0 + r` of the pair's score matrix, keys `0..c`) with
/// the raw scores `q_i . k_j`.
fn scores<T: Real>(
    ops: &Operands<'_, T>,
    s: &mut [T],
    b: usize,
    h: usize,
    i0: usize,
    i1: usize,
) -> Result<()> {
    let dk = ops.dims.dk;
    gemm_into(
        MatMut::row_major(s, i1 - i0, i1)?,
        ops.head_rows(ops.q, dk, b, h, i0, i1)?,
        ops.head_rows(ops.k, dk, b, h, 0, i1)?.t(),
        false,
    )
}

fn non_finite_scores(index: usize, value: f64) -> KernelError {
    KernelError::NonFinite {
        operand: "attention.scores",
        index,
        value,
    }
}

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
fn scale_and_max<T: Real>(row: &mut [T], scale: T) -> T {
    let mut lanes = [T::neg_infinity(); 16];
    let mut chunks = row.chunks_exact_mut(16);
    for c in &mut chunks {
        for (x, m) in c.iter_mut().zip(lanes.iter_mut()) {
            *x *= scale;
            *m = if *x > *m { *x } else { *m };
        }
    }
    for (x, m) in chunks.into_remainder().iter_mut().zip(lanes.iter_mut()) {
        *x *= scale;
        *m = if *x > *m { *x } else { *m };
    }
    lanes.iter().fold(T::neg_infinity(), |a, &b| a.max(b))
}

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
fn scale_in_place<T: Real>(row: &mut [T], factor: T) {
    for x in row.iter_mut() {
        *x *= factor;
    }
}

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
fn probabilities<T: Real>(row: &mut [T], scale: T, lse: T) {
    for x in row.iter_mut() {
        *x = (*x * scale - lse).exp_fast();
    }
}

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
fn score_grads<T: Real>(row: &mut [T], p: &[T], scale: T, delta: T) {
    for (x, &pv) in row.iter_mut().zip(p) {
        *x = scale * pv * (*x - delta);
    }
}

/// Output rows (`seq x dv`, contiguous) and log-sum-exp (`seq`) of one `(batch, head)` pair.
fn forward_head<T: Real>(ops: &Operands<'_, T>, b: usize, h: usize) -> Result<(Vec<T>, Vec<T>)> {
    let Dims { seq, dv, .. } = ops.dims;
    let mut o = vec![T::zero(); seq * dv];
    let mut lse = vec![T::zero(); seq];
    let mut s = vec![T::zero(); ops.block.min(seq) * seq];
    let mut i0 = 0;
    while i0 < seq {
        let i1 = (i0 + ops.block).min(seq);
        let (r, c) = (i1 - i0, i1);
        let sb = &mut s[..r * c];
        scores(ops, sb, b, h, i0, i1)?;
        for (ii, row) in sb.chunks_exact_mut(c).enumerate() {
            let i = i0 + ii;
            let (live, future) = row.split_at_mut(i + 1);
            future.fill(T::zero());
            let m = scale_and_max(live, ops.scale);
            let sum = crate::real::exp_shifted_sum(live, m);
            let l = m.f64() + sum.ln();
            if !l.is_finite() {
                return Err(non_finite_scores(
                    ((b * ops.dims.heads + h) * seq + i) * seq,
                    l,
                ));
            }
            scale_in_place(live, T::of(1.0 / sum));
            lse[i] = T::of(l);
        }
        gemm_into(
            MatMut::row_major(&mut o[i0 * dv..i1 * dv], r, dv)?,
            MatRef::row_major(sb, r, c)?,
            ops.head_rows(ops.v, dv, b, h, 0, c)?,
            false,
        )?;
        i0 = i1;
    }
    Ok((o, lse))
}

/// Copies the contiguous `seq x dim` rows of pair `(b, h)` into a `[batch, seq, heads, dim]`
/// buffer.
fn scatter<T: Copy>(dst: &mut [T], src: &[T], d: Dims, dim: usize, b: usize, h: usize) {
    if dim == 0 {
        return;
    }
    for (i, row) in src.chunks_exact(dim).enumerate() {
        let base = ((b * d.seq + i) * d.heads + h) * dim;
        dst[base..base + dim].copy_from_slice(row);
    }
}

fn forward_impl<T: Real>(
    q: &Tensor<T>,
    k: &Tensor<T>,
    v: &Tensor<T>,
    softmax_scale: f64,
    block: usize,
) -> Result<(Tensor<T>, AttentionSaved<T>)> {
    let dims = check_qkv(q, k, v)?;
    check_scale(softmax_scale)?;
    q.check_finite("attention.q")?;
    k.check_finite("attention.k")?;
    v.check_finite("attention.v")?;
    let Dims {
        batch,
        seq,
        heads,
        dv,
        ..
    } = dims;
    let mut out = Tensor::zeros([batch, seq, heads, dv]);
    let mut lse = Tensor::zeros([batch, heads, seq]);
    let ops = Operands::new(q, k, v, dims, softmax_scale, block);
    if seq == 0 || batch == 0 || heads == 0 {
        return Ok((out, AttentionSaved { lse }));
    }
    let per_head = (0..batch * heads)
        .into_par_iter()
        .map(|p| forward_head(&ops, p / heads, p % heads))
        .collect::<Result<Vec<_>>>()?;
    for (p, (o, l)) in per_head.iter().enumerate() {
        scatter(out.data_mut(), o, dims, dv, p / heads, p % heads);
        lse.data_mut()[p * seq..(p + 1) * seq].copy_from_slice(l);
    }
    Ok((out, AttentionSaved { lse }))
}

/// Causal multi-head attention: `out[b, i, h] = sum_{j <= i} softmax_j(scale * q_i . k_j) v_j`.
///
/// `q`, `k`: `[batch, seq, heads, dk]`; `v`: `[batch, seq, heads, dv]`; returns the output
/// `[batch, seq, heads, dv]` and the per-row log-sum-exp needed by [`attention_backward`].
/// `softmax_scale` multiplies the scores before the softmax (usually `1 / sqrt(dk)`, possibly
/// times a YaRN factor) and must be finite and positive. Non-finite inputs, or scores that
/// overflow, are refused with [`KernelError::NonFinite`].
pub fn attention_forward<T: Real>(
    q: &Tensor<T>,
    k: &Tensor<T>,
    v: &Tensor<T>,
    softmax_scale: f64,
) -> Result<(Tensor<T>, AttentionSaved<T>)> {
    forward_impl(q, k, v, softmax_scale, BLOCK_ROWS)
}

/// Backward operands beyond those of the forward pass.
struct Grads<'a, T> {
    dout: &'a [T],
    out: &'a [T],
    lse: &'a [T],
}

/// `dq`, `dk` (`seq x dk` each) and `dv` (`seq x dv`), contiguous, of one `(batch, head)` pair.
fn backward_head<T: Real>(
    ops: &Operands<'_, T>,
    g: &Grads<'_, T>,
    b: usize,
    h: usize,
) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
    let Dims {
        seq, heads, dk, dv, ..
    } = ops.dims;
    let mut dq = vec![T::zero(); seq * dk];
    let mut dkb = vec![T::zero(); seq * dk];
    let mut dvb = vec![T::zero(); seq * dv];
    let lse = &g.lse[(b * heads + h) * seq..(b * heads + h + 1) * seq];
    // delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij.
    let delta: Vec<T> = (0..seq)
        .map(|i| {
            let base = ((b * seq + i) * heads + h) * dv;
            let d: f64 = g.dout[base..base + dv]
                .iter()
                .zip(&g.out[base..base + dv])
                .map(|(&x, &y)| x.f64() * y.f64())
                .sum();
            T::of(d)
        })
        .collect();
    let cap = ops.block.min(seq) * seq;
    let mut p = vec![T::zero(); cap];
    let mut ds = vec![T::zero(); cap];
    let mut i0 = 0;
    while i0 < seq {
        let i1 = (i0 + ops.block).min(seq);
        let (r, c) = (i1 - i0, i1);
        let pb = &mut p[..r * c];
        let dsb = &mut ds[..r * c];
        // P, recomputed from the saved log-sum-exp.
        scores(ops, pb, b, h, i0, i1)?;
        for (ii, row) in pb.chunks_exact_mut(c).enumerate() {
            let i = i0 + ii;
            let (live, future) = row.split_at_mut(i + 1);
            future.fill(T::zero());
            probabilities(live, ops.scale, lse[i]);
        }
        let dout_rows = ops.head_rows(g.dout, dv, b, h, i0, i1)?;
        // dP = dO V^T.
        gemm_into(
            MatMut::row_major(dsb, r, c)?,
            dout_rows,
            ops.head_rows(ops.v, dv, b, h, 0, c)?.t(),
            false,
        )?;
        // dV[0..c] += P^T dO.
        gemm_into(
            MatMut::row_major(&mut dvb[..c * dv], c, dv)?,
            MatRef::row_major(pb, r, c)?.t(),
            dout_rows,
            true,
        )?;
        // dS = scale * P * (dP - delta); exactly zero on masked positions.
        for (ii, (drow, prow)) in dsb.chunks_exact_mut(c).zip(pb.chunks_exact(c)).enumerate() {
            let i = i0 + ii;
            let (live, future) = drow.split_at_mut(i + 1);
            future.fill(T::zero());
            score_grads(live, prow, ops.scale, delta[i]);
        }
        // dQ[i0..i1] = dS K[0..c].
        gemm_into(
            MatMut::row_major(&mut dq[i0 * dk..i1 * dk], r, dk)?,
            MatRef::row_major(dsb, r, c)?,
            ops.head_rows(ops.k, dk, b, h, 0, c)?,
            false,
        )?;
        // dK[0..c] += dS^T Q[i0..i1].
        gemm_into(
            MatMut::row_major(&mut dkb[..c * dk], c, dk)?,
            MatRef::row_major(dsb, r, c)?.t(),
            ops.head_rows(ops.q, dk, b, h, i0, i1)?,
            true,
        )?;
        i0 = i1;
    }
    Ok((dq, dkb, dvb))
}

type Triple<T> = (Tensor<T>, Tensor<T>, Tensor<T>);

#[allow(clippy::too_many_arguments)]
fn backward_impl<T: Real>(
    dout: &Tensor<T>,
    q: &Tensor<T>,
    k: &Tensor<T>,
    v: &Tensor<T>,
    out: &Tensor<T>,
    saved: &AttentionSaved<T>,
    softmax_scale: f64,
    block: usize,
) -> Result<Triple<T>> {
    let dims = check_qkv(q, k, v)?;
    let Dims {
        batch,
        seq,
        heads,
        dk,
        dv,
    } = dims;
    dout.expect_shape("attention.dout", &[batch, seq, heads, dv])?;
    out.expect_shape("attention.out", &[batch, seq, heads, dv])?;
    saved
        .lse
        .expect_shape("attention.lse", &[batch, heads, seq])?;
    check_scale(softmax_scale)?;
    dout.check_finite("attention.dout")?;
    q.check_finite("attention.q")?;
    k.check_finite("attention.k")?;
    v.check_finite("attention.v")?;
    out.check_finite("attention.out")?;
    check_finite("attention.lse", saved.lse.data())?;
    let ops = Operands::new(q, k, v, dims, softmax_scale, block);
    let grads = Grads {
        dout: dout.data(),
        out: out.data(),
        lse: saved.lse.data(),
    };
    let mut dq = Tensor::zeros([batch, seq, heads, dk]);
    let mut dkt = Tensor::zeros([batch, seq, heads, dk]);
    let mut dvt = Tensor::zeros([batch, seq, heads, dv]);
    if seq == 0 || batch == 0 || heads == 0 {
        return Ok((dq, dkt, dvt));
    }
    let per_head = (0..batch * heads)
        .into_par_iter()
        .map(|p| backward_head(&ops, &grads, p / heads, p % heads))
        .collect::<Result<Vec<_>>>()?;
    for (p, (gq, gk, gv)) in per_head.iter().enumerate() {
        let (b, h) = (p / heads, p % heads);
        scatter(dq.data_mut(), gq, dims, dk, b, h);
        scatter(dkt.data_mut(), gk, dims, dk, b, h);
        scatter(dvt.data_mut(), gv, dims, dv, b, h);
    }
    Ok((dq, dkt, dvt))
}

/// Backward of [`attention_forward`] (attention has no weights, so this is the whole backward):
/// returns `(dq, dk, dv)` with the shapes of `q`, `k` and `v`.
///
/// `out` and `saved` are what the forward pass returned for the same `q`, `k`, `v` and
/// `softmax_scale`; the probabilities are recomputed from the saved log-sum-exp:
/// `dP = dO V^T`, `dS = P * (dP - rowsum(dO * O))`, `dQ = scale * dS K`, `dK = scale * dS^T Q`,
/// `dV = P^T dO`.
pub fn attention_backward<T: Real>(
    dout: &Tensor<T>,
    q: &Tensor<T>,
    k: &Tensor<T>,
    v: &Tensor<T>,
    out: &Tensor<T>,
    saved: &AttentionSaved<T>,
    softmax_scale: f64,
) -> Result<Triple<T>> {
    backward_impl(dout, q, k, v, out, saved, softmax_scale, BLOCK_ROWS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fd::{assert_grad_close, dot, numeric_grad, rand_tensor};

    fn idx(shape: &[usize], i: [usize; 4]) -> usize {
        ((i[0] * shape[1] + i[1]) * shape[2] + i[2]) * shape[3] + i[3]
    }

    /// Direct O(seq^2) evaluation, returning the output and the log-sum-exp.
    fn naive(
        q: &Tensor<f64>,
        k: &Tensor<f64>,
        v: &Tensor<f64>,
        scale: f64,
    ) -> (Tensor<f64>, Tensor<f64>) {
        let (qs, vs) = (q.shape(), v.shape());
        let (batch, seq, heads, dk, dv) = (qs[0], qs[1], qs[2], qs[3], vs[3]);
        let mut out = Tensor::zeros([batch, seq, heads, dv]);
        let mut lse = Tensor::zeros([batch, heads, seq]);
        for b in 0..batch {
            for h in 0..heads {
                for i in 0..seq {
                    let z: Vec<f64> = (0..=i)
                        .map(|j| {
                            scale
                                * (0..dk)
                                    .map(|d| {
                                        q.data()[idx(qs, [b, i, h, d])]
                                            * k.data()[idx(qs, [b, j, h, d])]
                                    })
                                    .sum::<f64>()
                        })
                        .collect();
                    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = z.iter().map(|x| (x - m).exp()).sum();
                    lse.data_mut()[(b * heads + h) * seq + i] = m + sum.ln();
                    for e in 0..dv {
                        out.data_mut()[idx(vs, [b, i, h, e])] = (0..=i)
                            .map(|j| (z[j] - m).exp() / sum * v.data()[idx(vs, [b, j, h, e])])
                            .sum();
                    }
                }
            }
        }
        (out, lse)
    }

    fn qkv(
        batch: usize,
        seq: usize,
        heads: usize,
        dk: usize,
        dv: usize,
        seed: u64,
    ) -> (Tensor<f64>, Tensor<f64>, Tensor<f64>) {
        (
            rand_tensor(&[batch, seq, heads, dk], seed),
            rand_tensor(&[batch, seq, heads, dk], seed + 1),
            rand_tensor(&[batch, seq, heads, dv], seed + 2),
        )
    }

    #[test]
    fn forward_matches_naive_for_all_block_sizes() {
        let (q, k, v) = qkv(2, 9, 3, 5, 4, 1);
        let q = q.map(|x| 2.0 * x);
        let scale = 0.7;
        let (want, want_lse) = naive(&q, &k, &v, scale);
        for block in [1, 2, 4, 9, 128] {
            let (out, saved) = forward_impl(&q, &k, &v, scale, block).unwrap();
            assert_eq!(out.shape(), &[2, 9, 3, 4]);
            assert!(out.max_abs_diff(&want).unwrap() < 1e-12, "block {block}");
            assert!(
                saved.lse.max_abs_diff(&want_lse).unwrap() < 1e-12,
                "block {block}"
            );
        }
        let (out, _) = attention_forward(&q, &k, &v, scale).unwrap();
        assert!(out.max_abs_diff(&want).unwrap() < 1e-12);
    }

    #[test]
    fn mla_head_dims_match_naive() {
        // DeepSeek-V3 MLA: dk = 128 + 64, dv = 128.
        let (q, k, v) = qkv(1, 6, 2, 192, 128, 7);
        let scale = 1.0 / 192f64.sqrt();
        let (out, saved) = attention_forward(&q, &k, &v, scale).unwrap();
        let (want, want_lse) = naive(&q, &k, &v, scale);
        assert!(out.max_abs_diff(&want).unwrap() < 1e-12);
        assert!(saved.lse.max_abs_diff(&want_lse).unwrap() < 1e-12);
    }

    fn check_backward_fd(block: usize, seed: u64) {
        let (batch, seq, heads, dk, dv) = (2, 5, 3, 4, 3);
        let (q, k, v) = qkv(batch, seq, heads, dk, dv, seed);
        let q = q.map(|x| 1.5 * x);
        let scale = 0.8;
        let g = rand_tensor(&[batch, seq, heads, dv], seed + 10);
        let (out, saved) = forward_impl(&q, &k, &v, scale, block).unwrap();
        let (dq, dk_, dv_) = backward_impl(&g, &q, &k, &v, &out, &saved, scale, block).unwrap();
        assert_eq!(dq.shape(), q.shape());
        assert_eq!(dk_.shape(), k.shape());
        assert_eq!(dv_.shape(), v.shape());
        let loss = |q: &Tensor<f64>, k: &Tensor<f64>, v: &Tensor<f64>| {
            dot(&g, &forward_impl(q, k, v, scale, block).unwrap().0)
        };
        let nq = numeric_grad(&q, |x| loss(x, &k, &v));
        let nk = numeric_grad(&k, |x| loss(&q, x, &v));
        let nv = numeric_grad(&v, |x| loss(&q, &k, x));
        assert_grad_close("attention dq", &dq, &nq, 1e-7);
        assert_grad_close("attention dk", &dk_, &nk, 1e-7);
        assert_grad_close("attention dv", &dv_, &nv, 1e-7);
    }

    #[test]
    fn backward_matches_finite_differences() {
        check_backward_fd(BLOCK_ROWS, 3);
    }

    #[test]
    fn backward_matches_finite_differences_across_blocks() {
        check_backward_fd(2, 5);
        check_backward_fd(1, 6);
    }

    #[test]
    fn backward_is_independent_of_block_size() {
        let (q, k, v) = qkv(1, 11, 2, 6, 5, 21);
        let g = rand_tensor(&[1, 11, 2, 5], 24);
        let (out, saved) = attention_forward(&q, &k, &v, 0.5).unwrap();
        let want = attention_backward(&g, &q, &k, &v, &out, &saved, 0.5).unwrap();
        for block in [1, 3, 4, 10] {
            let got = backward_impl(&g, &q, &k, &v, &out, &saved, 0.5, block).unwrap();
            assert!(got.0.max_abs_diff(&want.0).unwrap() < 1e-12);
            assert!(got.1.max_abs_diff(&want.1).unwrap() < 1e-12);
            assert!(got.2.max_abs_diff(&want.2).unwrap() < 1e-12);
        }
    }

    #[test]
    fn future_tokens_do_not_affect_earlier_outputs() {
        let (batch, seq, heads, dk, dv) = (2, 10, 2, 4, 3);
        let (q, k, v) = qkv(batch, seq, heads, dk, dv, 11);
        let t = 6;
        let (q2, mut k2, mut v2) = (q.clone(), k.clone(), v.clone());
        let mut q2 = q2;
        for b in 0..batch {
            for h in 0..heads {
                for d in 0..dk {
                    q2.data_mut()[idx(q.shape(), [b, t, h, d])] += 3.0;
                    k2.data_mut()[idx(k.shape(), [b, t, h, d])] -= 5.0;
                }
                for e in 0..dv {
                    v2.data_mut()[idx(v.shape(), [b, t, h, e])] = 100.0;
                }
            }
        }
        for block in [3, 128] {
            let (o1, _) = forward_impl(&q, &k, &v, 0.5, block).unwrap();
            let (o2, _) = forward_impl(&q2, &k2, &v2, 0.5, block).unwrap();
            let mut changed = false;
            for b in 0..batch {
                for i in 0..seq {
                    for h in 0..heads {
                        for e in 0..dv {
                            let at = idx(o1.shape(), [b, i, h, e]);
                            if i < t {
                                assert_eq!(o1.data()[at], o2.data()[at], "position {i}");
                            } else {
                                changed |= o1.data()[at] != o2.data()[at];
                            }
                        }
                    }
                }
            }
            assert!(changed, "position {t} and later must see the change");
        }
        // Gradients flow only backwards in time: keys/values after the last query with a
        // nonzero output gradient get none.
        let (out, saved) = attention_forward(&q, &k, &v, 0.5).unwrap();
        let mut g = Tensor::zeros([batch, seq, heads, dv]);
        for b in 0..batch {
            for h in 0..heads {
                for e in 0..dv {
                    g.data_mut()[idx(v.shape(), [b, 3, h, e])] = 1.0;
                }
            }
        }
        let (_, dk_, dv_) = attention_backward(&g, &q, &k, &v, &out, &saved, 0.5).unwrap();
        for b in 0..batch {
            for j in 4..seq {
                for h in 0..heads {
                    assert!((0..dk).all(|d| dk_.data()[idx(dk_.shape(), [b, j, h, d])] == 0.0));
                    assert!((0..dv).all(|e| dv_.data()[idx(dv_.shape(), [b, j, h, e])] == 0.0));
                }
            }
        }
    }

    #[test]
    fn f32_agrees_with_f64_on_a_larger_case() {
        let (batch, seq, heads, dk, dv) = (2, 300, 4, 48, 32);
        let (q, k, v) = qkv(batch, seq, heads, dk, dv, 31);
        let g = rand_tensor(&[batch, seq, heads, dv], 35);
        let scale = 1.0 / (dk as f64).sqrt() * 2.0;
        let (out, saved) = attention_forward(&q, &k, &v, scale).unwrap();
        let grads = attention_backward(&g, &q, &k, &v, &out, &saved, scale).unwrap();
        let (q32, k32, v32, g32) = (q.cast::<f32>(), k.cast(), v.cast(), g.cast());
        let (out32, saved32) = attention_forward(&q32, &k32, &v32, scale).unwrap();
        let grads32 = attention_backward(&g32, &q32, &k32, &v32, &out32, &saved32, scale).unwrap();
        let close = |name: &str, a: &Tensor<f32>, b: &Tensor<f64>, tol: f64| {
            let scale = b.data().iter().fold(1.0f64, |m, x| m.max(x.abs()));
            let err = a.cast::<f64>().max_abs_diff(b).unwrap();
            assert!(err <= tol * scale, "{name}: {err:e} > {tol:e} * {scale}");
        };
        close("out", &out32, &out, 1e-5);
        close("lse", &saved32.lse, &saved.lse, 1e-5);
        close("dq", &grads32.0, &grads.0, 1e-4);
        close("dk", &grads32.1, &grads.1, 1e-4);
        close("dv", &grads32.2, &grads.2, 1e-4);
    }

    #[test]
    fn empty_and_degenerate_shapes_do_not_panic() {
        for (b, s, h, dk, dv) in [
            (0, 4, 2, 3, 3),
            (1, 0, 2, 3, 3),
            (1, 3, 0, 3, 3),
            (1, 3, 2, 0, 2),
            (1, 3, 2, 2, 0),
        ] {
            let (q, k, v) = qkv(b, s, h, dk, dv, 41);
            let (out, saved) = attention_forward(&q, &k, &v, 1.0).unwrap();
            assert_eq!(out.shape(), &[b, s, h, dv]);
            assert!(out.data().iter().all(|x| x.is_finite()));
            let g = rand_tensor(&[b, s, h, dv], 42);
            let (dq, dk_, dv_) = attention_backward(&g, &q, &k, &v, &out, &saved, 1.0).unwrap();
            assert_eq!(dq.shape(), q.shape());
            assert_eq!(dk_.shape(), k.shape());
            assert_eq!(dv_.shape(), v.shape());
        }
    }

    #[test]
    fn bad_inputs_are_refused_with_named_operands() {
        let (q, k, v) = qkv(1, 4, 2, 3, 2, 51);
        let msg = |e: KernelError| e.to_string();
        let bad_q = Tensor::<f64>::zeros([1, 4, 2]);
        assert!(msg(attention_forward(&bad_q, &k, &v, 1.0).unwrap_err()).contains("attention.q"));
        let bad_k = Tensor::<f64>::zeros([1, 4, 2, 4]);
        assert!(msg(attention_forward(&q, &bad_k, &v, 1.0).unwrap_err()).contains("attention.k"));
        let bad_v = Tensor::<f64>::zeros([1, 3, 2, 2]);
        assert!(msg(attention_forward(&q, &k, &bad_v, 1.0).unwrap_err()).contains("attention.v"));
        for scale in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = attention_forward(&q, &k, &v, scale).unwrap_err();
            assert!(matches!(
                err,
                KernelError::InvalidArgument {
                    name: "attention.softmax_scale",
                    ..
                }
            ));
        }
        let mut nan_k = k.clone();
        nan_k.data_mut()[5] = f64::NAN;
        assert!(matches!(
            attention_forward(&q, &nan_k, &v, 1.0).unwrap_err(),
            KernelError::NonFinite {
                operand: "attention.k",
                index: 5,
                ..
            }
        ));
        let (out, saved) = attention_forward(&q, &k, &v, 1.0).unwrap();
        let bad_dout = Tensor::<f64>::zeros([1, 4, 2, 3]);
        let err = attention_backward(&bad_dout, &q, &k, &v, &out, &saved, 1.0).unwrap_err();
        assert!(msg(err).contains("attention.dout"));
        let err = attention_backward(&out, &q, &k, &v, &bad_dout, &saved, 1.0).unwrap_err();
        assert!(msg(err).contains("attention.out"));
        let bad_saved = AttentionSaved {
            lse: Tensor::zeros([1, 4, 2]),
        };
        let err = attention_backward(&out, &q, &k, &v, &out, &bad_saved, 1.0).unwrap_err();
        assert!(msg(err).contains("attention.lse"));
        let mut inf_dout = out.clone();
        inf_dout.data_mut()[0] = f64::INFINITY;
        assert!(matches!(
            attention_backward(&inf_dout, &q, &k, &v, &out, &saved, 1.0).unwrap_err(),
            KernelError::NonFinite {
                operand: "attention.dout",
                ..
            }
        ));
        // Finite inputs whose scores overflow are refused rather than producing NaN.
        let huge = q.map(|x| x * 1e200);
        assert!(matches!(
            attention_forward(&huge, &huge, &v, 1.0).unwrap_err(),
            KernelError::NonFinite {
                operand: "attention.scores",
                ..
            }
        ));
    }
}
