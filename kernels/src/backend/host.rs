//! [`Host`]: the [`Backend`] of this crate's CPU reference operators, on `Vec` buffers.

use super::{AttnDims, Backend, ColCopy, Gemm};
use crate::matmul::{MatMut, MatRef, gemm_into, gemm_new, rounded_bf16};
use crate::ops::adamw::{AdamCoeffs, Moments, adamw_apply, sum_sq};
use crate::ops::attention::{AttentionSaved, attention_backward, attention_forward};
use crate::ops::cross_entropy::{CrossEntropy, cross_entropy_backward, cross_entropy_forward};
use crate::ops::embedding::embedding_forward;
use crate::ops::linear::{
    Precision, SavedInput, linear_backward_input_bf16, linear_backward_input_fp8,
    linear_backward_weight_mp, linear_forward_bf16, linear_forward_fp8,
};
use crate::ops::rmsnorm::{rmsnorm_backward_input, rmsnorm_backward_weight, rmsnorm_forward};
use crate::ops::rope::{RopeLayout, RopeTable, rope_backward, rope_forward};
use crate::ops::swiglu::{swiglu_backward, swiglu_forward};
use crate::quant::{Fp8Matrix, QuantConfig};
use crate::real::add_into;
use crate::{KernelError, Result, Tensor};

/// The CPU: buffers are `Vec`s, operations the reference operators of `ops` (which split their
/// work over rayon's threads).
#[derive(Clone, Copy, Debug, Default)]
pub struct Host;

fn tensor(shape: impl Into<Vec<usize>>, x: &[f32]) -> Result<Tensor<f32>> {
    Tensor::new(shape, x.to_vec())
}

fn operand<'a>(x: &'a [f32], rows: usize, cols: usize, t: bool) -> Result<MatRef<'a, f32>> {
    Ok(if t {
        MatRef::row_major(x, cols, rows)?.t()
    } else {
        MatRef::row_major(x, rows, cols)?
    })
}

fn check_len(what: &'static str, x: &[f32], n: usize) -> Result<()> {
    if x.len() < n {
        return Err(KernelError::shape(
            what,
            format!("at least {n} elements"),
            format!("{} elements", x.len()),
        ));
    }
    Ok(())
}

fn check_idx(what: &'static str, idx: &[u32], n: usize, rows: usize) -> Result<()> {
    if idx.len() < n {
        return Err(KernelError::shape(
            what,
            format!("at least {n} indices"),
            format!("{}", idx.len()),
        ));
    }
    if let Some((position, &i)) = idx[..n]
        .iter()
        .enumerate()
        .find(|(_, i)| **i as usize >= rows)
    {
        return Err(KernelError::IndexOutOfRange {
            operand: what,
            position,
            index: i as usize,
            bound: rows,
        });
    }
    Ok(())
}

/// A weight as [`Host`]'s mixed-precision linear layers read it.
#[derive(Clone, Debug)]
pub enum HostWeight {
    /// Rounded to BF16 values, `[out, in]`.
    Bf16(Tensor<f32>),
    /// Quantized in 128x128 blocks, and its transpose.
    Fp8 {
        /// `W`, `[out, in]`.
        w: Fp8Matrix,
        /// `W^T`, `[in, out]`.
        wt: Fp8Matrix,
    },
}

impl HostWeight {
    /// `(out_features, in_features)`.
    fn dims(&self) -> (usize, usize) {
        match self {
            HostWeight::Bf16(w) => (w.rows(), w.last_dim()),
            HostWeight::Fp8 { w, .. } => (w.rows(), w.cols()),
        }
    }
}

/// The first `rows * cols` values of `x` as a `[rows, cols]` tensor.
fn matrix(what: &'static str, x: &[f32], rows: usize, cols: usize) -> Result<Tensor<f32>> {
    check_len(what, x, rows * cols)?;
    tensor([rows, cols], &x[..rows * cols])
}

impl Backend for Host {
    type Buf = Vec<f32>;
    type Ids = Vec<u32>;
    type Ce = CrossEntropy<f32>;
    type Rope = (RopeTable, RopeLayout);
    type Weight = HostWeight;
    type Moments = Moments;

    fn describe(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn upload(&self, _what: &'static str, x: &[f32]) -> Result<Vec<f32>> {
        Ok(x.to_vec())
    }

    fn upload_ids(&self, _what: &'static str, x: &[u32]) -> Result<Vec<u32>> {
        Ok(x.to_vec())
    }

    fn zeros(&self, _what: &'static str, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }

    fn download(&self, _what: &'static str, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }

    fn numel(&self, x: &Vec<f32>) -> usize {
        x.len()
    }

    fn rope_table(&self, table: &RopeTable, layout: RopeLayout) -> Result<Self::Rope> {
        Ok((table.clone(), layout))
    }

    fn gemm(&self, a: &Vec<f32>, b: &Vec<f32>, g: Gemm) -> Result<Vec<f32>> {
        gemm_new(operand(a, g.m, g.k, g.a_t)?, operand(b, g.k, g.n, g.b_t)?)
    }

    fn gemm_acc(&self, a: &Vec<f32>, b: &Vec<f32>, c: &mut Vec<f32>, g: Gemm) -> Result<()> {
        gemm_into(
            MatMut::row_major(c, g.m, g.n)?,
            operand(a, g.m, g.k, g.a_t)?,
            operand(b, g.k, g.n, g.b_t)?,
            true,
        )
    }

    fn check_linear(&self, _out_f: usize, _in_f: usize, _precision: Precision) -> Result<()> {
        Ok(())
    }

    fn weight_operand(
        &self,
        w: &Vec<f32>,
        out_f: usize,
        in_f: usize,
        precision: Precision,
    ) -> Result<HostWeight> {
        let w = matrix("linear.weight", w, out_f, in_f)?;
        match precision {
            Precision::Fp32 => Err(KernelError::invalid(
                "linear.precision",
                "fp32 layers use the plain gemms",
            )),
            Precision::Bf16 => Ok(HostWeight::Bf16(rounded_bf16(&w))),
            Precision::Fp8 => {
                let q = Fp8Matrix::quantize_blocks(w.data(), out_f, in_f, QuantConfig::default())?;
                Ok(HostWeight::Fp8 {
                    wt: q.transpose()?,
                    w: q,
                })
            }
        }
    }

    fn linear_mp(&self, x: &Vec<f32>, w: &HostWeight, rows: usize) -> Result<Vec<f32>> {
        let x = matrix("linear.x", x, rows, w.dims().1)?;
        Ok(match w {
            HostWeight::Bf16(w) => linear_forward_bf16(&x, w)?.0,
            HostWeight::Fp8 { w, .. } => linear_forward_fp8(&x, w)?.0,
        }
        .into_data())
    }

    fn linear_mp_input_grad(&self, dy: &Vec<f32>, w: &HostWeight, rows: usize) -> Result<Vec<f32>> {
        let dy = matrix("linear.dy", dy, rows, w.dims().0)?;
        Ok(match w {
            HostWeight::Bf16(w) => linear_backward_input_bf16(&dy, w)?.0,
            HostWeight::Fp8 { wt, .. } => linear_backward_input_fp8(&dy, wt)?,
        }
        .into_data())
    }

    fn linear_mp_weight_grad_acc(
        &self,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        w: &HostWeight,
        rows: usize,
        dw: &mut Vec<f32>,
    ) -> Result<()> {
        let (out_f, in_f) = w.dims();
        let dy = matrix("linear.dy", dy, rows, out_f)?;
        let x = matrix("linear.x", x, rows, in_f)?;
        check_len("linear.dweight", dw, out_f * in_f)?;
        match w {
            // Both operands rounded, accumulated inside the GEMM as the CPU model's W is.
            HostWeight::Bf16(_) => self.gemm_acc(
                &rounded_bf16(&dy).into_data(),
                &rounded_bf16(&x).into_data(),
                dw,
                Gemm::weight_grad(rows, out_f, in_f),
            ),
            HostWeight::Fp8 { .. } => {
                let xq = Fp8Matrix::quantize_tiles(x.data(), rows, in_f, QuantConfig::default())?;
                let g = linear_backward_weight_mp(&dy, &SavedInput::Fp8(xq))?;
                add_into(&mut dw[..out_f * in_f], g.data());
                Ok(())
            }
        }
    }

    fn add_into(&self, y: &mut Vec<f32>, x: &Vec<f32>) -> Result<()> {
        if y.len() != x.len() {
            return Err(KernelError::shape(
                "add.x",
                format!("{} elements", y.len()),
                format!("{}", x.len()),
            ));
        }
        add_into(y, x);
        Ok(())
    }

    fn rmsnorm(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        rows: usize,
        d: usize,
        eps: f64,
    ) -> Result<Vec<f32>> {
        check_len("rmsnorm.x", x, rows * d)?;
        Ok(
            rmsnorm_forward(&tensor([rows, d], &x[..rows * d])?, &tensor([d], w)?, eps)?
                .into_data(),
        )
    }

    fn rmsnorm_backward(
        &self,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        rows: usize,
        d: usize,
        eps: f64,
        dw: &mut Vec<f32>,
    ) -> Result<Vec<f32>> {
        check_len("rmsnorm.x", x, rows * d)?;
        check_len("rmsnorm.dy", dy, rows * d)?;
        let (xt, dyt) = (
            tensor([rows, d], &x[..rows * d])?,
            tensor([rows, d], &dy[..rows * d])?,
        );
        let dx = rmsnorm_backward_input(&dyt, &xt, &tensor([d], w)?, eps)?;
        let g = rmsnorm_backward_weight(&dyt, &xt, eps)?;
        self.add_into(dw, &g.into_data())?;
        Ok(dx.into_data())
    }

    fn swiglu(&self, g: &Vec<f32>, u: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(swiglu_forward(&tensor([g.len()], g)?, &tensor([u.len()], u)?)?.into_data())
    }

    fn swiglu_backward(
        &self,
        g: &Vec<f32>,
        u: &Vec<f32>,
        dy: &Vec<f32>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (dg, du) = swiglu_backward(
            &tensor([dy.len()], dy)?,
            &tensor([g.len()], g)?,
            &tensor([u.len()], u)?,
        )?;
        Ok((dg.into_data(), du.into_data()))
    }

    fn rope(
        &self,
        x: &Vec<f32>,
        table: &Self::Rope,
        shape: [usize; 4],
        inverse: bool,
    ) -> Result<Vec<f32>> {
        let t = tensor(shape, x)?;
        Ok(if inverse {
            rope_backward(&t, &table.0, table.1, 0)?
        } else {
            rope_forward(&t, &table.0, table.1, 0)?
        }
        .into_data())
    }

    fn attention(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        d: AttnDims,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (qk, vs) = (
            [d.batch, d.seq, d.heads, d.dk],
            [d.batch, d.seq, d.heads, d.dv],
        );
        let (out, saved) =
            attention_forward(&tensor(qk, q)?, &tensor(qk, k)?, &tensor(vs, v)?, d.scale)?;
        Ok((out.into_data(), saved.lse.into_data()))
    }

    fn attention_backward(
        &self,
        dout: &Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        out: &Vec<f32>,
        lse: &Vec<f32>,
        d: AttnDims,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (qk, vs) = (
            [d.batch, d.seq, d.heads, d.dk],
            [d.batch, d.seq, d.heads, d.dv],
        );
        let saved = AttentionSaved {
            lse: tensor([d.batch, d.heads, d.seq], lse)?,
        };
        let (dq, dk, dv) = attention_backward(
            &tensor(vs, dout)?,
            &tensor(qk, q)?,
            &tensor(qk, k)?,
            &tensor(vs, v)?,
            &tensor(vs, out)?,
            &saved,
            d.scale,
        )?;
        Ok((dq.into_data(), dk.into_data(), dv.into_data()))
    }

    fn embedding(&self, table: &Vec<f32>, ids: &Vec<u32>, n: usize, d: usize) -> Result<Vec<f32>> {
        let vocab = table.len().checked_div(d).unwrap_or(0);
        Ok(embedding_forward(
            &tensor([vocab, d], &table[..vocab * d])?,
            &ids[..n.min(ids.len())],
        )?
        .into_data())
    }

    fn embedding_backward(
        &self,
        dy: &Vec<f32>,
        ids: &[u32],
        d: usize,
        dtable: &mut Vec<f32>,
    ) -> Result<()> {
        let vocab = dtable.len().checked_div(d).unwrap_or(0);
        check_idx("embedding.ids", ids, ids.len(), vocab)?;
        check_len("embedding.dy", dy, ids.len() * d)?;
        for (row, &id) in dy.chunks_exact(d.max(1)).zip(ids) {
            let at = id as usize * d;
            add_into(&mut dtable[at..at + d], row);
        }
        Ok(())
    }

    fn cross_entropy(
        &self,
        logits: &Vec<f32>,
        targets: &Vec<u32>,
        rows: usize,
        vocab: usize,
    ) -> Result<(f64, usize, Self::Ce)> {
        check_len("cross_entropy.logits", logits, rows * vocab)?;
        let ce = cross_entropy_forward(
            &tensor([rows, vocab], &logits[..rows * vocab])?,
            targets,
            None,
        )?;
        Ok((ce.loss, ce.count, ce))
    }

    fn cross_entropy_backward(
        &self,
        logits: &Vec<f32>,
        targets: &Vec<u32>,
        ce: &Self::Ce,
        rows: usize,
        vocab: usize,
        dloss: f64,
    ) -> Result<Vec<f32>> {
        check_len("cross_entropy.logits", logits, rows * vocab)?;
        Ok(cross_entropy_backward(
            &tensor([rows, vocab], &logits[..rows * vocab])?,
            targets,
            ce,
            dloss,
        )?
        .into_data())
    }

    fn copy_cols(&self, src: &Vec<f32>, dst: &mut Vec<f32>, c: ColCopy) -> Result<()> {
        c.check("copy_cols", src.len(), dst.len())?;
        for r in 0..c.rows {
            for g in 0..c.groups {
                let s = r * c.src_ld + c.src_off + g * c.src_gs;
                let d = r * c.dst_ld + c.dst_off + g * c.dst_gs;
                let (from, to) = (&src[s..s + c.width], &mut dst[d..d + c.width]);
                if c.accumulate {
                    add_into(to, from);
                } else {
                    to.copy_from_slice(from);
                }
            }
        }
        Ok(())
    }

    fn gather_rows(
        &self,
        src: &Vec<f32>,
        idx: &Vec<u32>,
        n: usize,
        width: usize,
        scale: Option<&Vec<f32>>,
    ) -> Result<Vec<f32>> {
        let rows = src.len().checked_div(width).unwrap_or(0);
        check_idx("gather_rows.idx", idx, n, rows)?;
        let mut out = Vec::with_capacity(n * width);
        for (i, &r) in idx[..n].iter().enumerate() {
            let row = &src[r as usize * width..(r as usize + 1) * width];
            match scale {
                Some(s) => out.extend(row.iter().map(|v| v * s[i])),
                None => out.extend_from_slice(row),
            }
        }
        Ok(out)
    }

    fn scatter_add_rows(
        &self,
        src: &Vec<f32>,
        idx: &Vec<u32>,
        n: usize,
        width: usize,
        scale: Option<&Vec<f32>>,
        dst: &mut Vec<f32>,
    ) -> Result<()> {
        let rows = dst.len().checked_div(width).unwrap_or(0);
        check_idx("scatter_add_rows.idx", idx, n, rows)?;
        check_len("scatter_add_rows.src", src, n * width)?;
        for (i, &r) in idx[..n].iter().enumerate() {
            let from = &src[i * width..(i + 1) * width];
            let to = &mut dst[r as usize * width..(r as usize + 1) * width];
            for (a, b) in to.iter_mut().zip(from) {
                *a += match scale {
                    Some(s) => s[i] * b,
                    None => *b,
                };
            }
        }
        Ok(())
    }

    fn row_dots(
        &self,
        a: &Vec<f32>,
        idx: &Vec<u32>,
        b: &Vec<f32>,
        n: usize,
        width: usize,
    ) -> Result<Vec<f32>> {
        let rows = a.len().checked_div(width).unwrap_or(0);
        check_idx("row_dots.idx", idx, n, rows)?;
        check_len("row_dots.b", b, n * width)?;
        Ok(idx[..n]
            .iter()
            .enumerate()
            .map(|(i, &r)| {
                crate::real::dot(
                    &a[r as usize * width..(r as usize + 1) * width],
                    &b[i * width..(i + 1) * width],
                )
            })
            .collect())
    }

    fn sum_sq(&self, xs: &[&Vec<f32>]) -> Result<f64> {
        Ok(xs.iter().map(|x| sum_sq(x)).sum())
    }

    fn upload_moments(&self, s: &Moments) -> Result<Moments> {
        Ok(s.clone())
    }

    fn download_moments(&self, s: &Moments) -> Result<Moments> {
        Ok(s.clone())
    }

    fn adamw(&self, p: &mut Vec<f32>, g: &Vec<f32>, s: &mut Moments, k: &AdamCoeffs) -> Result<()> {
        adamw_apply(k, p, g, s)
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}
