//! The mixed-precision linear layers of [`crate::backend::Backend`] on the GPU: BF16 GEMMs through
//! cuBLAS (BF16 operands, FP32 accumulation and output), and FP8 GEMMs through quant.cu's
//! quantizations and fp8_gemm.cu's GEMM (E4M3, 1x128 activation tiles, 128x128 weight blocks,
//! FP32 promotion every 128 K-elements). Outputs are rounded to BF16 values as the CPU reference
//! rounds them (`ops::linear`).
//!
//! Quantizations here do not wait to report a non-finite input ([`FiniteCheck::ByGradientNorm`]):
//! a step's gradient norm, checked once, catches what they would.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};
use half::bf16;

use super::device::{Gpu, cuda_err};
use super::launch::{
    FiniteCheck, GpuFp8, GroupedWeights, Quant, check_len, dim, grid_stride, launch,
};
use super::source::MODEL;
use crate::backend::{Backend, Gemm};
use crate::ops::linear::Precision;
use crate::quant::QuantConfig;
use crate::{KernelError, Result};

/// A weight as the GPU's mixed-precision linear layers read it.
pub enum GpuWeight {
    /// Rounded to BF16, `[out, in]`.
    Bf16 {
        /// The values.
        w: CudaSlice<bf16>,
        /// Output features (rows).
        out_f: usize,
        /// Input features (columns).
        in_f: usize,
    },
    /// Quantized in 128x128 blocks, and its transpose.
    Fp8 {
        /// `W`, `[out, in]`.
        w: GpuFp8,
        /// `W^T`, `[in, out]`.
        wt: GpuFp8,
    },
}

impl GpuWeight {
    /// `(out_features, in_features)`.
    fn dims(&self) -> (usize, usize) {
        match self {
            GpuWeight::Bf16 { out_f, in_f, .. } => (*out_f, *in_f),
            GpuWeight::Fp8 { w, .. } => (w.rows, w.cols),
        }
    }
}

/// The GPU FP8 GEMM's inner dimension is a multiple of this.
const FP8_K_MULTIPLE: usize = 16;

impl Gpu {
    /// `x[..n]` as BF16.
    fn to_bf16(&self, x: &CudaSlice<f32>, n: usize) -> Result<CudaSlice<bf16>> {
        check_len("to_bf16.x", x, n)?;
        let mut y = self.zeros::<bf16>("to_bf16.y", n)?;
        if n > 0 {
            let nn = n as i64;
            launch!(self, MODEL, "to_bf16", format!("[{n}]"), grid_stride(n, 256); x, &mut y, &nn);
        }
        Ok(y)
    }

    /// Rounds `x[..n]` to BF16 values in place.
    pub(crate) fn round_bf16(&self, x: &mut CudaSlice<f32>, n: usize) -> Result<()> {
        check_len("round_bf16.x", x, n)?;
        if n > 0 {
            let nn = n as i64;
            launch!(self, MODEL, "round_bf16", format!("[{n}]"), grid_stride(n, 256); x, &nn);
        }
        Ok(())
    }

    /// `C += op(A) . op(B)` with BF16 operands and an FP32 `C`, through cuBLAS (FP32 compute).
    fn gemm_bf16_f32(
        &self,
        a: &CudaSlice<bf16>,
        b: &CudaSlice<bf16>,
        c: &mut CudaSlice<f32>,
        g: Gemm,
    ) -> Result<()> {
        use cudarc::cublas::result::gemm_ex;
        use cudarc::cublas::sys::{
            cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t as Op, cudaDataType_t,
        };
        let shapes = format!("{g:?}");
        check_len("gemm_bf16.a", a, g.m * g.k)?;
        check_len("gemm_bf16.b", b, g.k * g.n)?;
        check_len("gemm_bf16.c", c, g.m * g.n)?;
        if g.m == 0 || g.n == 0 || g.k == 0 {
            return Ok(());
        }
        let (m, n, k) = (
            dim("gemm_bf16.m", g.m)?,
            dim("gemm_bf16.n", g.n)?,
            dim("gemm_bf16.k", g.k)?,
        );
        let blas = self.blas()?;
        self.context()
            .bind_to_thread()
            .map_err(cuda_err("cublas_gemm_bf16_f32", &shapes))?;
        let op = |t: bool| if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N };
        let (alpha, beta) = (1.0f32, 1.0f32);
        let stream = self.stream();
        let (pa, _ga) = a.device_ptr(stream);
        let (pb, _gb) = b.device_ptr(stream);
        let (pc, _gc) = c.device_ptr_mut(stream);
        // Row-major C[m, n] is column-major C^T[n, m] = op(B)^T . op(A)^T, as in the SGEMM.
        // SAFETY: a, b and c hold at least the elements their shapes need (checked above), the
        // leading dimensions describe those row-major shapes as column-major operands, the types
        // given are the buffers' (BF16, BF16, FP32), and alpha and beta are FP32 as the FP32
        // compute type requires. The guards keep the pointers' stream order recorded.
        unsafe {
            gemm_ex(
                *blas.handle(),
                op(g.b_t),
                op(g.a_t),
                n,
                m,
                k,
                (&alpha as *const f32).cast(),
                pb as *const _,
                cudaDataType_t::CUDA_R_16BF,
                if g.b_t { k } else { n },
                pa as *const _,
                cudaDataType_t::CUDA_R_16BF,
                if g.a_t { m } else { k },
                (&beta as *const f32).cast(),
                pc as *mut _,
                cudaDataType_t::CUDA_R_32F,
                n,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| KernelError::Cuda {
            kernel: "cublas_gemm_bf16_f32",
            shapes,
            reason: format!("{e:?}"),
        })
    }

    /// `x[rows, cols]` followed by zero rows up to `padded` rows.
    fn pad_rows(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        padded: usize,
    ) -> Result<CudaSlice<f32>> {
        check_len("pad_rows.x", x, rows * cols)?;
        let mut y = self.zeros::<f32>("pad_rows.y", padded.max(rows) * cols)?;
        if rows * cols > 0 {
            self.stream()
                .memcpy_dtod(&x.slice(..rows * cols), &mut y.slice_mut(..rows * cols))
                .map_err(cuda_err(
                    "pad_rows",
                    format!("[{rows}, {cols}] to {padded} rows"),
                ))?;
        }
        Ok(y)
    }

    /// [`crate::backend::Backend::check_linear`]: an FP8 layer's widths are the inner
    /// dimensions of its GEMMs (forward and B), which the FP8 GEMM takes in multiples of 16.
    pub(crate) fn mp_check(&self, out_f: usize, in_f: usize, precision: Precision) -> Result<()> {
        if precision == Precision::Fp8 {
            for (what, v) in [("in_features", in_f), ("out_features", out_f)] {
                if v % FP8_K_MULTIPLE != 0 {
                    return Err(KernelError::invalid(
                        "linear.weight",
                        format!(
                            "{what} {v} of an fp8 layer must be a multiple of {FP8_K_MULTIPLE} \
                             on the gpu (the inner dimension of its gemms)"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// [`crate::backend::Backend::weight_operand`].
    pub(crate) fn mp_weight(
        &self,
        w: &CudaSlice<f32>,
        out_f: usize,
        in_f: usize,
        precision: Precision,
    ) -> Result<GpuWeight> {
        check_len("linear.weight", w, out_f * in_f)?;
        match precision {
            Precision::Fp32 => Err(KernelError::invalid(
                "linear.precision",
                "fp32 layers use the plain gemms",
            )),
            Precision::Bf16 => Ok(GpuWeight::Bf16 {
                w: self.to_bf16(w, out_f * in_f)?,
                out_f,
                in_f,
            }),
            Precision::Fp8 => {
                self.mp_check(out_f, in_f, precision)?;
                let q = self.quantize(
                    Quant::Blocks,
                    w,
                    out_f,
                    in_f,
                    QuantConfig::default(),
                    FiniteCheck::ByGradientNorm,
                )?;
                Ok(GpuWeight::Fp8 {
                    wt: self.transpose_blocks(&q)?,
                    w: q,
                })
            }
        }
    }

    /// `x[rows, k]` quantized in 1x128 tiles times `w` (`[n, k]`), rounded to BF16 values.
    fn fp8_product(&self, x: &CudaSlice<f32>, rows: usize, w: &GpuFp8) -> Result<CudaSlice<f32>> {
        let xq = self.quantize(
            Quant::Tiles,
            x,
            rows,
            w.cols,
            QuantConfig::default(),
            FiniteCheck::ByGradientNorm,
        )?;
        let mut y = self.fp8_gemm_grouped(&xq, &[rows], &GroupedWeights::single(w))?;
        self.round_bf16(&mut y, rows * w.rows)?;
        Ok(y)
    }

    /// `x` (`[g.m, g.k]`) rounded to BF16 times the BF16 weight as `g` says, the output rounded
    /// to BF16 values.
    fn bf16_product(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<bf16>,
        g: Gemm,
    ) -> Result<CudaSlice<f32>> {
        let xb = self.to_bf16(x, g.m * g.k)?;
        let mut y = self.zeros::<f32>("linear.out", g.m * g.n)?;
        self.gemm_bf16_f32(&xb, w, &mut y, g)?;
        self.round_bf16(&mut y, g.m * g.n)?;
        Ok(y)
    }

    /// [`crate::backend::Backend::linear_mp`].
    pub(crate) fn mp_forward(
        &self,
        x: &CudaSlice<f32>,
        w: &GpuWeight,
        rows: usize,
    ) -> Result<CudaSlice<f32>> {
        let (out_f, in_f) = w.dims();
        check_len("linear.x", x, rows * in_f)?;
        match w {
            GpuWeight::Bf16 { w, .. } => self.bf16_product(x, w, Gemm::forward(rows, out_f, in_f)),
            GpuWeight::Fp8 { w, .. } => self.fp8_product(x, rows, w),
        }
    }

    /// [`crate::backend::Backend::linear_mp_input_grad`].
    pub(crate) fn mp_input_grad(
        &self,
        dy: &CudaSlice<f32>,
        w: &GpuWeight,
        rows: usize,
    ) -> Result<CudaSlice<f32>> {
        let (out_f, in_f) = w.dims();
        check_len("linear.dy", dy, rows * out_f)?;
        match w {
            GpuWeight::Bf16 { w, .. } => {
                self.bf16_product(dy, w, Gemm::input_grad(rows, out_f, in_f))
            }
            GpuWeight::Fp8 { wt, .. } => self.fp8_product(dy, rows, wt),
        }
    }

    /// [`crate::backend::Backend::linear_mp_weight_grad_acc`].
    pub(crate) fn mp_weight_grad_acc(
        &self,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &GpuWeight,
        rows: usize,
        dw: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (out_f, in_f) = w.dims();
        check_len("linear.dy", dy, rows * out_f)?;
        check_len("linear.x", x, rows * in_f)?;
        check_len("linear.dweight", dw, out_f * in_f)?;
        if rows == 0 {
            return Ok(());
        }
        match w {
            GpuWeight::Bf16 { .. } => {
                let dyb = self.to_bf16(dy, rows * out_f)?;
                let xb = self.to_bf16(x, rows * in_f)?;
                self.gemm_bf16_f32(&dyb, &xb, dw, Gemm::weight_grad(rows, out_f, in_f))
            }
            GpuWeight::Fp8 { .. } => {
                // The inner dimension is the tokens: padded with zero rows to the GEMM's multiple
                // (zeros change no tile's scale and add nothing).
                let cfg = QuantConfig::default();
                let check = FiniteCheck::ByGradientNorm;
                let padded = rows.next_multiple_of(FP8_K_MULTIPLE);
                let dy_padded;
                let dy = if padded == rows {
                    dy
                } else {
                    dy_padded = self.pad_rows(dy, rows, out_f, padded)?;
                    &dy_padded
                };
                let dyt = self.quantize(Quant::TilesTransposed, dy, padded, out_f, cfg, check)?;
                // x as the forward pass quantized it, then in 128x1 tiles.
                let xq = self.quantize(Quant::Tiles, x, rows, in_f, cfg, check)?;
                let mut xd = self.dequantize(&xq)?;
                if padded != rows {
                    xd = self.pad_rows(&xd, rows, in_f, padded)?;
                }
                let xt = self.quantize(Quant::TilesTransposed, &xd, padded, in_f, cfg, check)?;
                let g = self.fp8_gemm_grouped(&dyt, &[out_f], &GroupedWeights::single(&xt))?;
                Backend::add_into(self, dw, &g)
            }
        }
    }
}
