//! The linear layer `y = x · W^T` with `x: [.., in]` and `W: [out, in]` (the Hugging Face layout),
//! its input gradient B (`dx = dy · W`) and weight gradient W (`dW = dy^T · x`) as separate calls.
//!
//! Two APIs:
//! * generic `f32`/`f64` functions ([`linear_forward`], [`linear_backward_input`],
//!   [`linear_backward_weight`]) used in FP32 training and for gradient checks;
//! * mixed precision ([`linear_forward_mp`], [`linear_backward_input_mp`],
//!   [`linear_backward_weight_mp`]) for FP32 master weights computed in FP32, BF16 or FP8, where
//!   FP8 follows Figure 6 of the DeepSeek-V3 report: all three GEMMs (Fprop, Dgrad, Wgrad) take
//!   E4M3 operands with fine-grained scales, the input is cached in FP8 for Wgrad, and outputs are
//!   BF16 except the weight gradient, which stays FP32.

use half::bf16;

use crate::fp8_gemm::{Accumulation, fp8_gemm};
use crate::matmul::{MatMut, MatRef, gemm_into, gemm_new, matmul, round_bf16, rounded_bf16};
use crate::quant::{Fp8Matrix, QuantConfig};
use crate::tensor::fmt_shape;
use crate::{KernelError, Real, Result, Tensor};

fn check_weight<T: Copy>(w: &Tensor<T>) -> Result<(usize, usize)> {
    let d = w.expect_rank("linear.weight", 2)?;
    Ok((d[0], d[1]))
}

fn check_inner<T: Copy>(
    operand: &'static str,
    t: &Tensor<T>,
    inner: usize,
    what: &str,
) -> Result<(usize, usize)> {
    let (rows, cols) = t.as_matrix(operand)?;
    if cols != inner {
        return Err(KernelError::shape(
            operand,
            format!("last dimension {inner} ({what})"),
            fmt_shape(t.shape()),
        ));
    }
    Ok((rows, cols))
}

fn with_last(shape: &[usize], last: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    if let Some(l) = s.last_mut() {
        *l = last;
    }
    s
}

/// `y = x · W^T`.
pub fn linear_forward<T: Real>(x: &Tensor<T>, w: &Tensor<T>) -> Result<Tensor<T>> {
    let (out_f, in_f) = check_weight(w)?;
    let (rows, _) = check_inner("linear.x", x, in_f, "in_features of the weight")?;
    let y = gemm_new(
        MatRef::row_major(x.data(), rows, in_f)?,
        MatRef::row_major(w.data(), out_f, in_f)?.t(),
    )?;
    Tensor::new(with_last(x.shape(), out_f), y)
}

/// B: `dx = dy · W`, shaped like the layer's input.
pub fn linear_backward_input<T: Real>(dy: &Tensor<T>, w: &Tensor<T>) -> Result<Tensor<T>> {
    let (out_f, in_f) = check_weight(w)?;
    let (rows, _) = check_inner("linear.dy", dy, out_f, "out_features of the weight")?;
    let dx = gemm_new(
        MatRef::row_major(dy.data(), rows, out_f)?,
        MatRef::row_major(w.data(), out_f, in_f)?,
    )?;
    Tensor::new(with_last(dy.shape(), in_f), dx)
}

/// W: `dW = dy^T · x`, summed over every leading (token) dimension.
pub fn linear_backward_weight<T: Real>(dy: &Tensor<T>, x: &Tensor<T>) -> Result<Tensor<T>> {
    let (_, out_f) = dy.as_matrix("linear.dy")?;
    let mut dw = Tensor::zeros([out_f, x.last_dim()]);
    linear_backward_weight_into(&mut dw, dy, x)?;
    Ok(dw)
}

/// W, accumulating: `dW += dy^T · x` (gradient accumulation across micro-batches).
pub fn linear_backward_weight_into<T: Real>(
    dw: &mut Tensor<T>,
    dy: &Tensor<T>,
    x: &Tensor<T>,
) -> Result<()> {
    let (out_f, in_f) = {
        let d = dw.expect_rank("linear.dweight", 2)?;
        (d[0], d[1])
    };
    let (rows, _) = check_inner("linear.dy", dy, out_f, "out_features of the weight")?;
    let (xrows, _) = check_inner("linear.x", x, in_f, "in_features of the weight")?;
    if xrows != rows {
        return Err(KernelError::shape(
            "linear.x",
            format!("{rows} rows (as many tokens as dy)"),
            fmt_shape(x.shape()),
        ));
    }
    gemm_into(
        MatMut::row_major(dw.data_mut(), out_f, in_f)?,
        MatRef::row_major(dy.data(), rows, out_f)?.t(),
        MatRef::row_major(x.data(), rows, in_f)?,
        true,
    )
}

/// W for a band of output features, accumulating: rows `out_rows` of `dW += dy^T · x`, where
/// `dw_rows` holds just those rows (row-major, `in` columns). Disjoint bands of one weight can
/// run on different threads.
pub fn linear_backward_weight_rows_into<T: Real>(
    dw_rows: &mut [T],
    out_rows: std::ops::Range<usize>,
    dy: &Tensor<T>,
    x: &Tensor<T>,
) -> Result<()> {
    let (rows, out_f) = dy.as_matrix("linear.dy")?;
    let (xrows, in_f) = x.as_matrix("linear.x")?;
    if xrows != rows {
        return Err(KernelError::shape(
            "linear.x",
            format!("{rows} rows (as many tokens as dy)"),
            fmt_shape(x.shape()),
        ));
    }
    if out_rows.start > out_rows.end || out_rows.end > out_f {
        return Err(KernelError::invalid(
            "linear.dweight rows",
            format!(
                "{}..{} is not a band of the {out_f} output features",
                out_rows.start, out_rows.end
            ),
        ));
    }
    let band = out_rows.end - out_rows.start;
    gemm_into(
        MatMut::row_major(dw_rows, band, in_f)?,
        MatRef::strided(dy.data(), out_rows.start, rows, band, out_f, 1)?.t(),
        MatRef::row_major(x.data(), rows, in_f)?,
        true,
    )
}

/// The arithmetic a mixed-precision linear layer runs in. Master weights are always FP32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// FP32 operands and outputs.
    #[default]
    Fp32,
    /// BF16 operands, FP32 accumulation, BF16 activations and input gradients, FP32 weight gradient.
    Bf16,
    /// E4M3 operands (1x128 activation tiles, 128x128 weight blocks), FP32 accumulation per
    /// 128-deep block, BF16 outputs, FP32 weight gradient; the input is cached in FP8.
    Fp8,
}

/// What the forward pass keeps for the weight gradient, in the precision's storage format.
#[derive(Clone, Debug)]
pub enum SavedInput {
    /// The input in FP32.
    Fp32(Tensor<f32>),
    /// The input rounded to BF16.
    Bf16(Tensor<bf16>),
    /// The input quantized to E4M3 in 1x128 tiles: `[tokens, in]`.
    Fp8(Fp8Matrix),
}

impl SavedInput {
    /// Bytes held by the cached activation.
    pub fn bytes(&self) -> usize {
        match self {
            SavedInput::Fp32(t) => 4 * t.numel(),
            SavedInput::Bf16(t) => 2 * t.numel(),
            SavedInput::Fp8(q) => q.wire_bytes(),
        }
    }

    /// The `[rows, cols]` shape of the cached input.
    pub fn rows_cols(&self) -> (usize, usize) {
        match self {
            SavedInput::Fp32(t) => (t.rows(), t.last_dim()),
            SavedInput::Bf16(t) => (t.rows(), t.last_dim()),
            SavedInput::Fp8(q) => (q.rows(), q.cols()),
        }
    }
}

fn fp8_cfg() -> QuantConfig {
    QuantConfig::default()
}

/// Mixed-precision forward: returns `y = x · W^T` and the cached input.
pub fn linear_forward_mp(
    x: &Tensor<f32>,
    w: &Tensor<f32>,
    precision: Precision,
) -> Result<(Tensor<f32>, SavedInput)> {
    check_weight(w)?;
    match precision {
        Precision::Fp32 => Ok((linear_forward(x, w)?, SavedInput::Fp32(x.clone()))),
        Precision::Bf16 => {
            let (y, xr) = linear_forward_bf16(x, &rounded_bf16(w))?;
            // Exact: every element of `xr` is a BF16 value.
            let xb = xr.map(|v| bf16::from_bits((v.to_bits() >> 16) as u16));
            Ok((y, SavedInput::Bf16(xb)))
        }
        Precision::Fp8 => {
            let (out_f, in_f) = check_weight(w)?;
            let wq = Fp8Matrix::quantize_blocks(w.data(), out_f, in_f, fp8_cfg())?;
            linear_forward_fp8(x, &wq)
        }
    }
}

/// BF16 forward with a weight already rounded to BF16 ([`rounded_bf16`]; a training step
/// rounds each weight once and reuses it): returns `y = x · W^T` rounded to BF16 and `x`
/// rounded to BF16 (the GEMM's operand, which W needs again).
pub fn linear_forward_bf16(
    x: &Tensor<f32>,
    w_bf16: &Tensor<f32>,
) -> Result<(Tensor<f32>, Tensor<f32>)> {
    let (out_f, in_f) = check_weight(w_bf16)?;
    let (rows, _) = check_inner("linear.x", x, in_f, "in_features of the weight")?;
    let out_shape = with_last(x.shape(), out_f);
    let xr = rounded_bf16(x);
    let mut y = Tensor::new(
        [rows, out_f],
        gemm_new(
            MatRef::row_major(xr.data(), rows, in_f)?,
            MatRef::row_major(w_bf16.data(), out_f, in_f)?.t(),
        )?,
    )?;
    round_bf16(y.data_mut());
    Ok((y.reshape(out_shape)?, xr))
}

/// FP8 forward with the weight already quantized in 128x128 blocks (a training step quantizes
/// each weight once and reuses it): returns `y = x · W^T` (BF16 values) and the input
/// quantized in 1x128 tiles, as cached for W.
pub fn linear_forward_fp8(x: &Tensor<f32>, wq: &Fp8Matrix) -> Result<(Tensor<f32>, SavedInput)> {
    let (out_f, in_f) = (wq.rows(), wq.cols());
    let (rows, _) = check_inner("linear.x", x, in_f, "in_features of the weight")?;
    let out_shape = with_last(x.shape(), out_f);
    let xq = Fp8Matrix::quantize_tiles(x.data(), rows, in_f, fp8_cfg())?;
    let mut y = fp8_gemm(&xq, wq, Accumulation::Fp32)?;
    round_bf16(y.data_mut());
    Ok((y.reshape(out_shape)?, SavedInput::Fp8(xq)))
}

/// Mixed-precision B: `dx = dy · W`, shaped like the input.
pub fn linear_backward_input_mp(
    dy: &Tensor<f32>,
    w: &Tensor<f32>,
    precision: Precision,
) -> Result<Tensor<f32>> {
    let (out_f, in_f) = check_weight(w)?;
    match precision {
        Precision::Fp32 => linear_backward_input(dy, w),
        Precision::Bf16 => Ok(linear_backward_input_bf16(dy, &rounded_bf16(w))?.0),
        Precision::Fp8 => {
            // W^T is the same 128x128 blocks transposed.
            let wt = Fp8Matrix::quantize_blocks(w.data(), out_f, in_f, fp8_cfg())?.transpose()?;
            linear_backward_input_fp8(dy, &wt)
        }
    }
}

/// BF16 B with a weight already rounded to BF16: returns `dx = dy · W` rounded to BF16 and `dy`
/// rounded to BF16 (the operand W needs too).
pub fn linear_backward_input_bf16(
    dy: &Tensor<f32>,
    w_bf16: &Tensor<f32>,
) -> Result<(Tensor<f32>, Tensor<f32>)> {
    let (out_f, in_f) = check_weight(w_bf16)?;
    let (rows, _) = check_inner("linear.dy", dy, out_f, "out_features of the weight")?;
    let dx_shape = with_last(dy.shape(), in_f);
    let dyr = rounded_bf16(dy);
    let mut dx = Tensor::new(
        [rows, in_f],
        gemm_new(
            MatRef::row_major(dyr.data(), rows, out_f)?,
            MatRef::row_major(w_bf16.data(), out_f, in_f)?,
        )?,
    )?;
    round_bf16(dx.data_mut());
    Ok((dx.reshape(dx_shape)?, dyr))
}

/// FP8 B (Dgrad) with the transposed weight already quantized (`W^T`, `[in, out]`, in 128x128
/// blocks): `dx = dy · W` with `dy` quantized in 1x128 tiles, BF16 values out.
pub fn linear_backward_input_fp8(dy: &Tensor<f32>, wt: &Fp8Matrix) -> Result<Tensor<f32>> {
    let (out_f, in_f) = (wt.cols(), wt.rows());
    let (rows, _) = check_inner("linear.dy", dy, out_f, "out_features of the weight")?;
    let dx_shape = with_last(dy.shape(), in_f);
    let dyq = Fp8Matrix::quantize_tiles(dy.data(), rows, out_f, fp8_cfg())?;
    let mut dx = fp8_gemm(&dyq, wt, Accumulation::Fp32)?;
    round_bf16(dx.data_mut());
    dx.reshape(dx_shape)
}

/// Mixed-precision W: `dW = dy^T · x` in FP32 from the cached input.
pub fn linear_backward_weight_mp(dy: &Tensor<f32>, saved: &SavedInput) -> Result<Tensor<f32>> {
    let (rows, in_f) = saved.rows_cols();
    let (dy_rows, out_f) = dy.as_matrix("linear.dy")?;
    if dy_rows != rows {
        return Err(KernelError::shape(
            "linear.dy",
            format!("{rows} rows (as many tokens as the cached input)"),
            fmt_shape(dy.shape()),
        ));
    }
    match saved {
        SavedInput::Fp32(x) => linear_backward_weight(dy, x),
        SavedInput::Bf16(xb) => {
            let xf = xb.map(bf16::to_f32).reshape([rows, in_f])?;
            let dyf = rounded_bf16(dy).reshape([rows, out_f])?;
            matmul(&dyf, true, &xf, false)
        }
        SavedInput::Fp8(xq) => {
            // Wgrad's inner dimension is the token dimension: both operands go to 128x1 tiles
            // (1x128 tiles of their transposes). The cached 1x128 activation is dequantized,
            // transposed and quantized again, as the report describes.
            let dyt = Fp8Matrix::quantize_tiles_transposed(dy.data(), rows, out_f, fp8_cfg())?;
            let xt = xq.requantize_transposed(fp8_cfg())?;
            fp8_gemm(&dyt, &xt, Accumulation::Fp32)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fd::{assert_grad_close, dot, numeric_grad, rand_tensor};

    #[test]
    fn b_and_w_match_finite_differences() {
        let x = rand_tensor(&[2, 3, 5], 1);
        let w = rand_tensor(&[4, 5], 2);
        let dy = rand_tensor(&[2, 3, 4], 3);
        let dx = linear_backward_input(&dy, &w).unwrap();
        let dw = linear_backward_weight(&dy, &x).unwrap();
        let nx = numeric_grad(&x, |x| dot(&dy, &linear_forward(x, &w).unwrap()));
        let nw = numeric_grad(&w, |w| dot(&dy, &linear_forward(&x, w).unwrap()));
        assert_grad_close("linear dx", &dx, &nx, 1e-7);
        assert_grad_close("linear dw", &dw, &nw, 1e-7);
    }

    #[test]
    fn weight_gradient_bands_tile_the_whole_gradient() {
        let x = rand_tensor(&[5, 6], 11);
        let dy = rand_tensor(&[5, 7], 12);
        let mut want = rand_tensor(&[7, 6], 13);
        let mut got = want.clone();
        linear_backward_weight_into(&mut want, &dy, &x).unwrap();
        let (a, b) = got.data_mut().split_at_mut(3 * 6);
        let err = linear_backward_weight_rows_into(b, 3..8, &dy, &x).unwrap_err();
        assert!(err.to_string().contains("linear.dweight rows"), "{err}");
        linear_backward_weight_rows_into(a, 0..3, &dy, &x).unwrap();
        linear_backward_weight_rows_into(b, 3..7, &dy, &x).unwrap();
        assert!(got.max_abs_diff(&want).unwrap() < 1e-12);
    }

    #[test]
    fn weight_gradient_accumulates() {
        let x = rand_tensor(&[6, 5], 4);
        let dy = rand_tensor(&[6, 3], 5);
        let once = linear_backward_weight(&dy, &x).unwrap();
        let mut acc = once.clone();
        linear_backward_weight_into(&mut acc, &dy, &x).unwrap();
        let twice = once.map(|v| 2.0 * v);
        assert!(acc.max_abs_diff(&twice).unwrap() < 1e-12);
    }

    #[test]
    fn shape_errors_name_the_operand() {
        let x = Tensor::<f32>::zeros([3, 5]);
        let w = Tensor::<f32>::zeros([4, 6]);
        let e = linear_forward(&x, &w).unwrap_err();
        assert!(e.to_string().contains("linear.x"), "{e}");
        let e = linear_forward(&x, &Tensor::<f32>::zeros([4])).unwrap_err();
        assert!(e.to_string().contains("linear.weight"), "{e}");
        let dy = Tensor::<f32>::zeros([2, 4]);
        let e = linear_backward_weight_mp(&dy, &SavedInput::Fp32(x)).unwrap_err();
        assert!(e.to_string().contains("linear.dy"), "{e}");
    }

    fn rel_err(got: &Tensor<f32>, want: &Tensor<f64>) -> f64 {
        let scale = want.data().iter().fold(0f64, |m, v| m.max(v.abs()));
        got.cast::<f64>().max_abs_diff(want).unwrap() / scale
    }

    fn case() -> (Tensor<f64>, Tensor<f64>, Tensor<f64>) {
        // Not multiples of 128, so partial tiles and blocks are exercised in every GEMM.
        (
            rand_tensor(&[2, 70, 200], 7),
            rand_tensor(&[150, 200], 8),
            rand_tensor(&[2, 70, 150], 9),
        )
    }

    #[test]
    fn mixed_precisions_track_the_f64_reference() {
        let (x, w, dy) = case();
        let y_ref = linear_forward(&x, &w).unwrap();
        let dx_ref = linear_backward_input(&dy, &w).unwrap();
        let dw_ref = linear_backward_weight(&dy, &x).unwrap();
        let (xf, wf, dyf) = (x.cast::<f32>(), w.cast::<f32>(), dy.cast::<f32>());
        for (p, tol) in [
            (Precision::Fp32, 1e-5),
            (Precision::Bf16, 1e-2),
            (Precision::Fp8, 6e-2),
        ] {
            let (y, saved) = linear_forward_mp(&xf, &wf, p).unwrap();
            let dx = linear_backward_input_mp(&dyf, &wf, p).unwrap();
            let dw = linear_backward_weight_mp(&dyf, &saved).unwrap();
            assert_eq!(y.shape(), &[2, 70, 150]);
            assert_eq!(dx.shape(), &[2, 70, 200]);
            assert_eq!(dw.shape(), &[150, 200]);
            for (name, got, want) in [
                ("y", &y, &y_ref),
                ("dx", &dx, &dx_ref),
                ("dw", &dw, &dw_ref),
            ] {
                let e = rel_err(got, want);
                assert!(e < tol, "{p:?} {name}: relative error {e} >= {tol}");
            }
            if p != Precision::Fp32 {
                for v in y.data().iter().chain(dx.data()) {
                    assert_eq!(bf16::from_f32(*v).to_f32(), *v, "{p:?} output is not BF16");
                }
            }
        }
    }

    /// Relative (to the largest reference magnitude) error.
    fn rel64(got: &Tensor<f32>, want: &Tensor<f64>) -> f64 {
        rel_err(got, want)
    }

    #[test]
    fn fp8_runs_all_three_gemms_on_the_quantized_operands() {
        let (x, w, dy) = case();
        let (xf, wf, dyf) = (x.cast::<f32>(), w.cast::<f32>(), dy.cast::<f32>());
        let cfg = QuantConfig::default();
        let (rows, inf, outf) = (140, 200, 150);
        let xq = Fp8Matrix::quantize_tiles(xf.data(), rows, inf, cfg).unwrap();
        let wq = Fp8Matrix::quantize_blocks(wf.data(), outf, inf, cfg).unwrap();
        let dyq = Fp8Matrix::quantize_tiles(dyf.data(), rows, outf, cfg).unwrap();
        let dyt = Fp8Matrix::quantize_tiles_transposed(dyf.data(), rows, outf, cfg).unwrap();
        let xt = xq.requantize_transposed(cfg).unwrap();
        let reference = crate::fp8_gemm::fp8_gemm_f64_reference;
        let y_ref = reference(&xq, &wq).unwrap().reshape([2, 70, 150]).unwrap();
        let dx_ref = reference(&dyq, &wq.transpose().unwrap())
            .unwrap()
            .reshape([2, 70, 200])
            .unwrap();
        let dw_ref = reference(&dyt, &xt).unwrap();

        let (y, saved) = linear_forward_mp(&xf, &wf, Precision::Fp8).unwrap();
        let dx = linear_backward_input_mp(&dyf, &wf, Precision::Fp8).unwrap();
        let dw = linear_backward_weight_mp(&dyf, &saved).unwrap();
        // BF16 outputs: within one BF16 rounding of the exact product of the FP8 operands.
        for (name, got, want) in [("y", &y, &y_ref), ("dx", &dx, &dx_ref)] {
            for (&g, &r) in got.data().iter().zip(want.data()) {
                let err = (f64::from(g) - r).abs();
                assert!(err <= r.abs() * 2f64.powi(-8) + 1e-6, "{name}: {g} vs {r}");
            }
        }
        assert!(rel64(&dw, &dw_ref) < 1e-5, "dw: {}", rel64(&dw, &dw_ref));

        // And the FP8 path really is coarser than BF16 against the exact f64 result.
        let exact = linear_forward(&x, &w).unwrap();
        let (yb, _) = linear_forward_mp(&xf, &wf, Precision::Bf16).unwrap();
        assert!(rel64(&y, &exact) > 2.0 * rel64(&yb, &exact));
    }

    #[test]
    fn fp8_caches_a_quarter_of_the_fp32_bytes() {
        let (x, w, _) = case();
        let (xf, wf) = (x.cast::<f32>(), w.cast::<f32>());
        let (_, s32) = linear_forward_mp(&xf, &wf, Precision::Fp32).unwrap();
        let (_, s8) = linear_forward_mp(&xf, &wf, Precision::Fp8).unwrap();
        // Per row of 200 inputs: 200 code bytes and two 4-byte tile scales, against 800 bytes.
        assert_eq!(s32.bytes(), 140 * 200 * 4);
        assert_eq!(s8.bytes(), 140 * (200 + 2 * 4));
    }

    #[test]
    fn fp8_refuses_non_finite_activations() {
        let (x, w, _) = case();
        let mut xf = x.cast::<f32>();
        xf.data_mut()[10] = f32::NAN;
        let e = linear_forward_mp(&xf, &w.cast::<f32>(), Precision::Fp8).unwrap_err();
        assert!(matches!(e, KernelError::NonFinite { index: 10, .. }), "{e}");
    }
}
