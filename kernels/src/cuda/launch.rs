//! Launching the kernels: shape checks, grid sizes, and conversion to and from the CPU types.
//! Every failure is a [`KernelError`] naming the kernel and the shapes.

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

use super::device::{Gpu, cuda_err};
use super::source::{FP8_GEMM, OPS, QUANT};
use crate::fp8::Fp8Format;
use crate::ops::adamw::AdamCoeffs;
use crate::quant::{Fp8Matrix, Granularity, QUANT_BLOCK, QuantConfig, blocks};
use crate::{KernelError, Result};

/// A device-side copy of [`AdamCoeffs`] (the orphan rule keeps the cudarc traits off the host type).
#[repr(transparent)]
#[derive(Clone, Copy)]
struct DevCoeffs(AdamCoeffs);

// SAFETY: `AdamCoeffs` is `repr(C)` plain old data matching `struct AdamCoeffs` in ops.cu.
unsafe impl DeviceRepr for DevCoeffs {}

/// An FP8 matrix on the GPU: codes `[rows, cols]` and scales laid out as in [`Fp8Matrix`].
pub struct GpuFp8 {
    /// Rows.
    pub rows: usize,
    /// Columns (the inner, contiguous dimension).
    pub cols: usize,
    /// The FP8 format of the codes.
    pub format: Fp8Format,
    /// Tile or block scales.
    pub granularity: Granularity,
    /// Codes, row-major.
    pub codes: CudaSlice<u8>,
    /// Scales, `[rows or ceil(rows / 128), ceil(cols / 128)]`.
    pub scales: CudaSlice<f32>,
}

impl GpuFp8 {
    fn scale_rows(&self) -> usize {
        match self.granularity {
            Granularity::Tile1x128 => self.rows,
            Granularity::Block128x128 => blocks(self.rows),
        }
    }

    /// Copies the matrix back to the host.
    pub fn to_host(&self, gpu: &Gpu) -> Result<Fp8Matrix> {
        let codes = gpu.download("fp8.codes", &self.codes, self.rows * self.cols)?;
        let scales = gpu.download(
            "fp8.scales",
            &self.scales,
            self.scale_rows() * blocks(self.cols),
        )?;
        Fp8Matrix::from_parts(
            self.rows,
            self.cols,
            self.format,
            self.granularity,
            codes,
            scales,
        )
    }

    /// Copies a host matrix to the GPU.
    pub fn from_host(gpu: &Gpu, m: &Fp8Matrix) -> Result<Self> {
        Ok(Self {
            rows: m.rows(),
            cols: m.cols(),
            format: m.format(),
            granularity: m.granularity(),
            codes: gpu.upload("fp8.codes", m.codes())?,
            scales: gpu.upload("fp8.scales", m.scales())?,
        })
    }
}

fn fmt_code(f: Fp8Format) -> i32 {
    match f {
        Fp8Format::E4M3 => 0,
        Fp8Format::E5M2 => 1,
    }
}

/// An `i32` kernel argument, or an error naming `what` when the value does not fit.
pub(crate) fn dim(what: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        KernelError::invalid(what, format!("{v} does not fit the kernel's 32-bit index"))
    })
}

pub(crate) fn check_len<T>(operand: &'static str, buf: &CudaSlice<T>, n: usize) -> Result<()> {
    if buf.len() < n {
        return Err(KernelError::shape(
            operand,
            format!("at least {n} elements"),
            format!("{} elements", buf.len()),
        ));
    }
    Ok(())
}

pub(crate) fn grid_stride(n: usize, threads: u32) -> LaunchConfig {
    let blocks = n.div_ceil(threads as usize).clamp(1, 65_535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The quantizations of quant.cu.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Quant {
    /// 1x128 tiles of `x[rows, cols]`.
    Tiles,
    /// 1x128 tiles of the `[cols, rows]` transpose, fused with the transpose.
    TilesTransposed,
    /// 128x128 blocks.
    Blocks,
}

/// Whether a quantization waits to report a non-finite input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FiniteCheck {
    /// Wait for the kernel and return an error naming the input.
    Now,
    /// Do not wait: a non-finite input gives non-finite codes, which reach the training step's
    /// gradient norm (checked once per step) instead of costing a round trip per GEMM.
    ByGradientNorm,
}

impl Gpu {
    /// Quantizes `x[rows, cols]` as `kind` says.
    pub(crate) fn quantize(
        &self,
        kind: Quant,
        x: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        cfg: QuantConfig,
        check: FiniteCheck,
    ) -> Result<GpuFp8> {
        let shapes = format!("x [{rows}, {cols}]");
        check_len("quantize.input", x, rows * cols)?;
        let (kernel, out_rows, out_cols, granularity, launch) = match kind {
            Quant::Tiles => (
                "quantize_tiles",
                rows,
                cols,
                Granularity::Tile1x128,
                grid_stride(rows * blocks(cols) * 32, 256),
            ),
            Quant::TilesTransposed => (
                "quantize_tiles_transposed",
                cols,
                rows,
                Granularity::Tile1x128,
                LaunchConfig {
                    grid_dim: (
                        cols.div_ceil(32).max(1) as u32,
                        blocks(rows).max(1) as u32,
                        1,
                    ),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                },
            ),
            Quant::Blocks => (
                "quantize_blocks",
                rows,
                cols,
                Granularity::Block128x128,
                LaunchConfig {
                    grid_dim: (blocks(cols).max(1) as u32, blocks(rows).max(1) as u32, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                },
            ),
        };
        let (r, c) = (dim("quantize.rows", rows)?, dim("quantize.cols", cols)?);
        let scale_rows = match granularity {
            Granularity::Tile1x128 => out_rows,
            Granularity::Block128x128 => blocks(out_rows),
        };
        let mut codes = self.zeros::<u8>("quantize.codes", out_rows * out_cols)?;
        let mut scales = self.zeros::<f32>("quantize.scales", scale_rows * blocks(out_cols))?;
        let mut bad = self.zeros::<i32>("quantize.flag", 1)?;
        if rows > 0 && cols > 0 {
            let f = self.function(&QUANT, kernel)?;
            let (fmt, pow2) = (fmt_code(cfg.format), i32::from(cfg.pow2_scales));
            let mut b = self.stream().launch_builder(&f);
            b.arg(x)
                .arg(&mut codes)
                .arg(&mut scales)
                .arg(&r)
                .arg(&c)
                .arg(&fmt)
                .arg(&pow2)
                .arg(&mut bad);
            // SAFETY: the buffers hold at least the elements the kernel indexes (checked above and
            // allocated here for the output shape); the argument list matches the kernel's
            // signature in quant.cu.
            unsafe { b.launch(launch) }.map_err(cuda_err(kernel, &shapes))?;
        }
        if check == FiniteCheck::Now {
            let flag = self.download("quantize.flag", &bad, 1)?;
            if flag.first().copied().unwrap_or(0) != 0 {
                return Err(KernelError::invalid("quantize.input", "non-finite value"));
            }
        }
        Ok(GpuFp8 {
            rows: out_rows,
            cols: out_cols,
            format: cfg.format,
            granularity,
            codes,
            scales,
        })
    }

    /// [`Fp8Matrix::quantize_tiles`] on the GPU: row-major `x[rows, cols]` in 1x128 tiles.
    pub fn quantize_tiles(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        cfg: QuantConfig,
    ) -> Result<GpuFp8> {
        self.quantize(Quant::Tiles, x, rows, cols, cfg, FiniteCheck::Now)
    }

    /// [`Fp8Matrix::quantize_tiles_transposed`] on the GPU: the `[cols, rows]` transpose in 1x128
    /// tiles, fused with the transpose.
    pub fn quantize_tiles_transposed(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        cfg: QuantConfig,
    ) -> Result<GpuFp8> {
        self.quantize(Quant::TilesTransposed, x, rows, cols, cfg, FiniteCheck::Now)
    }

    /// [`Fp8Matrix::quantize_blocks`] on the GPU: `w[rows, cols]` in 128x128 blocks.
    pub fn quantize_blocks(
        &self,
        w: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        cfg: QuantConfig,
    ) -> Result<GpuFp8> {
        self.quantize(Quant::Blocks, w, rows, cols, cfg, FiniteCheck::Now)
    }

    /// Dequantizes to FP32 on the GPU.
    pub fn dequantize(&self, m: &GpuFp8) -> Result<CudaSlice<f32>> {
        let mut out = self.zeros::<f32>("dequantize.out", m.rows * m.cols)?;
        if m.rows * m.cols > 0 {
            let f = self.function(&QUANT, "dequantize")?;
            let (r, c) = (
                dim("dequantize.rows", m.rows)?,
                dim("dequantize.cols", m.cols)?,
            );
            let fmt = fmt_code(m.format);
            let per = match m.granularity {
                Granularity::Tile1x128 => 1i32,
                Granularity::Block128x128 => QUANT_BLOCK as i32,
            };
            let mut b = self.stream().launch_builder(&f);
            b.arg(&m.codes)
                .arg(&m.scales)
                .arg(&mut out)
                .arg(&r)
                .arg(&c)
                .arg(&fmt)
                .arg(&per);
            // SAFETY: codes, scales and out have the lengths of the matrix's shape; the arguments
            // match `dequantize` in quant.cu.
            unsafe { b.launch(grid_stride(m.rows * m.cols, 256)) }
                .map_err(cuda_err("dequantize", format!("[{}, {}]", m.rows, m.cols)))?;
        }
        Ok(out)
    }

    /// The exact transpose of a block-quantized matrix (codes and the scale grid): what the
    /// backward pass multiplies by.
    pub fn transpose_blocks(&self, m: &GpuFp8) -> Result<GpuFp8> {
        if m.granularity != Granularity::Block128x128 {
            return Err(KernelError::invalid(
                "transpose_blocks.input",
                "needs 128x128 block scales",
            ));
        }
        let shapes = format!("[{}, {}]", m.rows, m.cols);
        let mut codes = self.zeros::<u8>("transpose.codes", m.rows * m.cols)?;
        let (sr, sc) = (blocks(m.rows), blocks(m.cols));
        let mut scales = self.zeros::<f32>("transpose.scales", sr * sc)?;
        if m.rows * m.cols > 0 {
            let (r, c) = (
                dim("transpose.rows", m.rows)?,
                dim("transpose.cols", m.cols)?,
            );
            let f = self.function(&QUANT, "transpose_u8")?;
            let mut b = self.stream().launch_builder(&f);
            b.arg(&m.codes).arg(&mut codes).arg(&r).arg(&c);
            let launch = LaunchConfig {
                grid_dim: (m.cols.div_ceil(32) as u32, m.rows.div_ceil(32) as u32, 1),
                block_dim: (32, 8, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: both buffers hold rows * cols bytes; arguments match `transpose_u8`.
            unsafe { b.launch(launch) }.map_err(cuda_err("transpose_u8", &shapes))?;
            let (sr32, sc32) = (sr as i32, sc as i32);
            let f = self.function(&QUANT, "transpose_f32")?;
            let mut b = self.stream().launch_builder(&f);
            b.arg(&m.scales).arg(&mut scales).arg(&sr32).arg(&sc32);
            // SAFETY: both buffers hold the sr x sc scale grid; arguments match `transpose_f32`.
            unsafe { b.launch(grid_stride(sr * sc, 256)) }
                .map_err(cuda_err("transpose_f32", &shapes))?;
        }
        Ok(GpuFp8 {
            rows: m.cols,
            cols: m.rows,
            format: m.format,
            granularity: m.granularity,
            codes,
            scales,
        })
    }

    /// `C[m, n] = A[m, k] . B[n, k]^T` with fine-grained scales and FP32 promotion every 128
    /// K-elements (see fp8_gemm.cu). A has tile scales; B tile or block scales; both E4M3;
    /// `k % 16 == 0`.
    pub fn fp8_gemm(&self, a: &GpuFp8, b: &GpuFp8) -> Result<CudaSlice<f32>> {
        self.fp8_gemm_grouped(a, &[a.rows], &GroupedWeights::single(b))
    }

    /// The grouped FP8 GEMM of MoE experts: the rows of `a` form contiguous segments of
    /// `segments[g]` rows, and segment `g` is multiplied by weight `g` of `w`. Runs the kernel
    /// [`GemmKernel::for_device`] picks.
    pub fn fp8_gemm_grouped(
        &self,
        a: &GpuFp8,
        segments: &[usize],
        w: &GroupedWeights<'_>,
    ) -> Result<CudaSlice<f32>> {
        let kernel = GemmKernel::for_device(self.info().compute_capability);
        self.fp8_gemm_grouped_with(a, segments, w, kernel)
    }

    /// [`Gpu::fp8_gemm_grouped`] on a chosen kernel (the benchmark and the tests run both on
    /// Hopper). WGMMA needs a Hopper GPU; asking for it elsewhere is a typed error.
    pub fn fp8_gemm_grouped_with(
        &self,
        a: &GpuFp8,
        segments: &[usize],
        w: &GroupedWeights<'_>,
        kernel: GemmKernel,
    ) -> Result<CudaSlice<f32>> {
        if kernel == GemmKernel::Wgmma && self.info().compute_capability != (9, 0) {
            let (major, minor) = self.info().compute_capability;
            return Err(KernelError::invalid(
                "fp8_gemm.kernel",
                format!(
                    "WGMMA runs on compute capability 9.0 (sm_90a) only; this GPU is {major}.{minor}"
                ),
            ));
        }
        let (m, k, n) = (a.rows, a.cols, w.n);
        let shapes = format!(
            "a [{m}, {k}] in {} segments, b [{}, {n}, {}]",
            segments.len(),
            w.groups,
            w.k
        );
        if w.k != k {
            return Err(KernelError::shape(
                "fp8_gemm.b",
                format!("[g, n, {k}] (inner dimension of a)"),
                format!("[{}, {n}, {}]", w.groups, w.k),
            ));
        }
        if segments.len() != w.groups {
            return Err(KernelError::shape(
                "fp8_gemm.segments",
                format!("{} segments (one per weight)", w.groups),
                format!("{} segments", segments.len()),
            ));
        }
        if segments.iter().sum::<usize>() != m {
            return Err(KernelError::shape(
                "fp8_gemm.segments",
                format!("segments summing to {m} rows"),
                format!("{segments:?}"),
            ));
        }
        if k % 16 != 0 {
            return Err(KernelError::invalid(
                "fp8_gemm.a",
                format!("inner dimension {k} must be a multiple of 16 on the GPU"),
            ));
        }
        if a.format != Fp8Format::E4M3 || w.format != Fp8Format::E4M3 {
            return Err(KernelError::invalid(
                "fp8_gemm",
                "the GPU GEMM multiplies E4M3 operands",
            ));
        }
        if a.granularity != Granularity::Tile1x128 {
            return Err(KernelError::invalid(
                "fp8_gemm.a",
                "needs 1x128 tile scales",
            ));
        }
        let mut c = self.zeros::<f32>("fp8_gemm.out", m * n)?;
        if m == 0 || n == 0 {
            return Ok(c);
        }
        // Segment ends and the M tiles (each within one segment).
        let mut seg_end = Vec::with_capacity(segments.len());
        let (mut tile_group, mut tile_row0) = (Vec::new(), Vec::new());
        let mut start = 0usize;
        for (g, &len) in segments.iter().enumerate() {
            seg_end.push(dim("fp8_gemm.segments", start + len)?);
            let mut r = start;
            while r < start + len {
                tile_group.push(g as i32);
                tile_row0.push(r as i32);
                r += 128;
            }
            start += len;
        }
        let tiles = tile_group.len();
        if tiles > 65_535 || n.div_ceil(128) > i32::MAX as usize {
            return Err(KernelError::invalid(
                "fp8_gemm.a",
                format!(
                    "{tiles} row tiles of 128 exceed the 65,535 a launch can have; split the GEMM"
                ),
            ));
        }
        check_len("fp8_gemm.a", &a.codes, m * k)?;
        check_len("fp8_gemm.a", &a.scales, m * k.div_ceil(128))?;
        check_len("fp8_gemm.b", w.codes, w.groups * n * k)?;
        let b_scale_rows_n = match w.granularity {
            Granularity::Tile1x128 => n,
            Granularity::Block128x128 => blocks(n),
        };
        check_len(
            "fp8_gemm.b",
            w.scales,
            w.groups * b_scale_rows_n * k.div_ceil(128),
        )?;
        let seg_end = self.upload("fp8_gemm.segments", &seg_end)?;
        let tile_group = self.upload("fp8_gemm.segments", &tile_group)?;
        let tile_row0 = self.upload("fp8_gemm.segments", &tile_row0)?;
        let (n32, k32) = (dim("fp8_gemm.n", n)?, dim("fp8_gemm.k", k)?);
        let b_rows = match w.granularity {
            Granularity::Tile1x128 => 1i32,
            Granularity::Block128x128 => QUANT_BLOCK as i32,
        };
        let (name, smem) = match kernel {
            GemmKernel::MmaSync => ("fp8_gemm_grouped", 0u32),
            GemmKernel::Wgmma => ("fp8_gemm_wgmma", WGMMA_SMEM_BYTES),
        };
        let f = self.function(&FP8_GEMM, name)?;
        if smem > 48 * 1024 {
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(cuda_err(name, &shapes))?;
        }
        let mut b = self.stream().launch_builder(&f);
        b.arg(&a.codes)
            .arg(&a.scales)
            .arg(w.codes)
            .arg(w.scales)
            .arg(&mut c)
            .arg(&seg_end)
            .arg(&tile_group)
            .arg(&tile_row0)
            .arg(&n32)
            .arg(&k32)
            .arg(&b_rows);
        let launch = LaunchConfig {
            grid_dim: (n.div_ceil(128) as u32, tiles as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: smem,
        };
        // SAFETY: a holds m x k codes and m x ceil(k/128) scales, w holds groups x n x k codes and
        // its scale grid, c holds m x n; every tile lies inside one segment; both kernels take the
        // arguments of `fp8_gemm_grouped` in fp8_gemm.cu, and the WGMMA kernel gets the dynamic
        // shared memory its pipeline indexes (WG_SMEM_BYTES), allowed by the attribute above.
        unsafe { b.launch(launch) }.map_err(cuda_err(name, &shapes))?;
        Ok(c)
    }
}

/// Which FP8 GEMM kernel runs (both compute the same product: see fp8_gemm.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmKernel {
    /// `mma.sync m16n8k32` (native FP8 on Ada; on Hopper lowered to FP16 tensor-core math;
    /// CUDA cores on older GPUs).
    MmaSync,
    /// `wgmma.mma_async m64n128k32` with a cp.async pipeline: Hopper's FP8 tensor cores.
    Wgmma,
}

impl GemmKernel {
    /// The kernel for a GPU of this compute capability: WGMMA on Hopper, mma.sync elsewhere.
    pub fn for_device(compute_capability: (i32, i32)) -> Self {
        if compute_capability == (9, 0) {
            Self::Wgmma
        } else {
            Self::MmaSync
        }
    }
}

/// Dynamic shared memory of the WGMMA kernel: 4 pipeline stages of a 128x128-byte A tile and a
/// 128x128-byte B tile (`WG_SMEM_BYTES` in fp8_gemm.cu).
const WGMMA_SMEM_BYTES: u32 = 4 * 2 * 128 * 128;

/// The weights of a grouped GEMM: `groups` matrices `[n, k]` stored back to back, with their
/// scales (`[groups, ceil(n / 128) or n, ceil(k / 128)]`).
pub struct GroupedWeights<'a> {
    /// Number of matrices.
    pub groups: usize,
    /// Rows of each.
    pub n: usize,
    /// Columns of each.
    pub k: usize,
    /// Their format.
    pub format: Fp8Format,
    /// Their scales' granularity.
    pub granularity: Granularity,
    /// Codes, `[groups, n, k]`.
    pub codes: &'a CudaSlice<u8>,
    /// Scales.
    pub scales: &'a CudaSlice<f32>,
}

impl<'a> GroupedWeights<'a> {
    /// One matrix as a group of one.
    pub fn single(b: &'a GpuFp8) -> Self {
        Self {
            groups: 1,
            n: b.rows,
            k: b.cols,
            format: b.format,
            granularity: b.granularity,
            codes: &b.codes,
            scales: &b.scales,
        }
    }
}

impl Gpu {
    /// `C[m, n] = A[m, k] . B[n, k]^T` in BF16 through cuBLAS (FP32 accumulation): the dense BF16
    /// GEMMs of the recipe, and the peer the FP8 GEMM is measured against.
    pub fn bf16_gemm(
        &self,
        a: &CudaSlice<half::bf16>,
        b: &CudaSlice<half::bf16>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<CudaSlice<half::bf16>> {
        use cudarc::cublas::{Gemm, GemmConfig, sys::cublasOperation_t};
        check_len("bf16_gemm.a", a, m * k)?;
        check_len("bf16_gemm.b", b, n * k)?;
        let mut c = self.zeros::<half::bf16>("bf16_gemm.out", m * n)?;
        if m * n * k == 0 {
            return Ok(c);
        }
        let (m32, n32, k32) = (
            dim("bf16_gemm.m", m)?,
            dim("bf16_gemm.n", n)?,
            dim("bf16_gemm.k", k)?,
        );
        // Row-major C[m, n] is column-major C^T[n, m] = B[n, k] . A[m, k]^T.
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n32,
            n: m32,
            k: k32,
            alpha: half::bf16::ONE,
            lda: k32,
            ldb: k32,
            beta: half::bf16::ZERO,
            ldc: n32,
        };
        // SAFETY: a holds m x k, b holds n x k and c holds m x n elements (checked and allocated
        // above), matching the leading dimensions given.
        unsafe { self.blas()?.gemm(cfg, b, a, &mut c) }.map_err(|e| KernelError::Cuda {
            kernel: "cublas_gemm_bf16",
            shapes: format!("[{m}, {k}] x [{n}, {k}]^T"),
            reason: format!("{e:?}"),
        })?;
        Ok(c)
    }
}

/// Queues kernel `$kernel` of `$src` with the arguments in order; a launch failure returns a
/// [`KernelError::Cuda`] naming the kernel and `$shapes`.
macro_rules! launch {
    ($gpu:expr, $src:expr, $kernel:expr, $shapes:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
        let f = $gpu.function(&$src, $kernel)?;
        let mut b = $gpu.stream().launch_builder(&f);
        $( b.arg($arg); )*
        // SAFETY: every caller checks its buffers' lengths against the shapes it passes and gives
        // the arguments in the order of the kernel's signature in its .cu source.
        unsafe { b.launch($cfg) }.map_err(cuda_err($kernel, $shapes))?;
    }};
}
pub(crate) use launch;

fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Element-wise and row-wise training operators (see ops.cu).
impl Gpu {
    /// RMSNorm forward over rows of `d`: `y = x * rsqrt(mean(x^2) + eps) * w`.
    pub fn rmsnorm_forward(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rows: usize,
        d: usize,
        eps: f64,
    ) -> Result<CudaSlice<f32>> {
        check_len("rmsnorm.x", x, rows * d)?;
        check_len("rmsnorm.weight", w, d)?;
        let mut y = self.zeros::<f32>("rmsnorm.y", rows * d)?;
        if rows * d > 0 {
            let (r, dd) = (dim("rmsnorm.rows", rows)?, dim("rmsnorm.d", d)?);
            launch!(self, OPS, "rmsnorm_forward", format!("x [{rows}, {d}]"), per_row(rows); x, w, &mut y, &r, &dd, &eps);
        }
        Ok(y)
    }

    /// RMSNorm input gradient (B): `dx = r * (dy * w - x * r^2 * <dy * w, x> / d)`.
    pub fn rmsnorm_backward_input(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        rows: usize,
        d: usize,
        eps: f64,
    ) -> Result<CudaSlice<f32>> {
        check_len("rmsnorm.x", x, rows * d)?;
        check_len("rmsnorm.weight", w, d)?;
        check_len("rmsnorm.dy", dy, rows * d)?;
        let mut dx = self.zeros::<f32>("rmsnorm.dx", rows * d)?;
        if rows * d > 0 {
            let (r, dd) = (dim("rmsnorm.rows", rows)?, dim("rmsnorm.d", d)?);
            launch!(self, OPS, "rmsnorm_backward_input", format!("x [{rows}, {d}]"), per_row(rows); x, w, dy, &mut dx, &r, &dd, &eps);
        }
        Ok(dx)
    }

    /// SwiGLU forward: `silu(gate) * up` over `n` elements.
    pub fn swiglu_forward(
        &self,
        gate: &CudaSlice<f32>,
        up: &CudaSlice<f32>,
        n: usize,
    ) -> Result<CudaSlice<f32>> {
        check_len("swiglu.gate", gate, n)?;
        check_len("swiglu.up", up, n)?;
        let mut y = self.zeros::<f32>("swiglu.y", n)?;
        if n > 0 {
            let nn = n as i64;
            launch!(self, OPS, "swiglu_forward", format!("[{n}]"), grid_stride(n, 256); gate, up, &mut y, &nn);
        }
        Ok(y)
    }

    /// SwiGLU backward: the gradients of `gate` and `up`.
    pub fn swiglu_backward(
        &self,
        gate: &CudaSlice<f32>,
        up: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        n: usize,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        check_len("swiglu.gate", gate, n)?;
        check_len("swiglu.up", up, n)?;
        check_len("swiglu.dy", dy, n)?;
        let mut dg = self.zeros::<f32>("swiglu.dgate", n)?;
        let mut du = self.zeros::<f32>("swiglu.dup", n)?;
        if n > 0 {
            let nn = n as i64;
            launch!(self, OPS, "swiglu_backward", format!("[{n}]"), grid_stride(n, 256); gate, up, dy, &mut dg, &mut du, &nn);
        }
        Ok((dg, du))
    }

    /// RoPE on `x[batch * seq, heads, dim]` with the table's FP32 `cos`/`sin` (`[positions,
    /// dim / 2]`); `sign` 1 forward, -1 backward.
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: &CudaSlice<f32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        shape: [usize; 4],
        positions: usize,
        offset: usize,
        sign: f32,
        interleaved: bool,
    ) -> Result<CudaSlice<f32>> {
        let [batch, seq, heads, d] = shape;
        let n = batch * seq * heads * d;
        if d % 2 != 0 {
            return Err(KernelError::invalid(
                "rope.x",
                format!("head dimension {d} must be even"),
            ));
        }
        if seq > 0 && offset + seq > positions {
            return Err(KernelError::IndexOutOfRange {
                operand: "rope.positions",
                position: positions.saturating_sub(offset),
                index: positions,
                bound: positions,
            });
        }
        check_len("rope.x", x, n)?;
        check_len("rope.cos", cos, positions * d / 2)?;
        check_len("rope.sin", sin, positions * d / 2)?;
        let mut y = self.zeros::<f32>("rope.y", n)?;
        if n > 0 {
            let tokens = (batch * seq) as i64;
            let (s, h, dd, off) = (
                dim("rope.seq", seq)?,
                dim("rope.heads", heads)?,
                dim("rope.dim", d)?,
                dim("rope.offset", offset)?,
            );
            let il = i32::from(interleaved);
            launch!(self, OPS, "rope", format!("x {shape:?}"), grid_stride(n / 2, 256); x, &mut y, cos, sin, &tokens, &s, &h, &dd, &off, &sign, &il);
        }
        Ok(y)
    }

    /// Per-row log-sum-exp and loss of softmax cross-entropy (`ignore_index` rows give 0).
    pub fn cross_entropy_rows(
        &self,
        logits: &CudaSlice<f32>,
        targets: &CudaSlice<u32>,
        rows: usize,
        vocab: usize,
        ignore_index: Option<u32>,
    ) -> Result<(CudaSlice<f64>, Vec<f64>)> {
        check_len("cross_entropy.logits", logits, rows * vocab)?;
        check_len("cross_entropy.targets", targets, rows)?;
        let mut lse = self.zeros::<f64>("cross_entropy.lse", rows)?;
        let mut loss = self.zeros::<f64>("cross_entropy.loss", rows)?;
        let mut bad = self.zeros::<i32>("cross_entropy.flag", 1)?;
        if rows > 0 && vocab > 0 {
            let (r, v) = (
                dim("cross_entropy.rows", rows)?,
                dim("cross_entropy.vocab", vocab)?,
            );
            let ignore = ignore_index.map_or(-1i64, i64::from);
            launch!(self, OPS, "cross_entropy_forward", format!("logits [{rows}, {vocab}]"), per_row(rows); logits, targets, &mut lse, &mut loss, &r, &v, &ignore, &mut bad);
        }
        if self
            .download("cross_entropy.flag", &bad, 1)?
            .first()
            .copied()
            .unwrap_or(0)
            != 0
        {
            return Err(KernelError::invalid(
                "cross_entropy.targets",
                format!("a counted target is not below the vocabulary size {vocab}"),
            ));
        }
        let loss = self.download("cross_entropy.loss", &loss, rows)?;
        Ok((lse, loss))
    }

    /// The gradient of the mean cross-entropy (times `dloss`) with respect to the logits, given
    /// the forward pass's per-row log-sum-exp and the count of counted rows.
    #[allow(clippy::too_many_arguments)]
    pub fn cross_entropy_backward(
        &self,
        logits: &CudaSlice<f32>,
        targets: &CudaSlice<u32>,
        lse: &CudaSlice<f64>,
        rows: usize,
        vocab: usize,
        ignore_index: Option<u32>,
        dloss: f32,
        count: usize,
    ) -> Result<CudaSlice<f32>> {
        check_len("cross_entropy.logits", logits, rows * vocab)?;
        check_len("cross_entropy.targets", targets, rows)?;
        check_len("cross_entropy.saved", lse, rows)?;
        let mut d = self.zeros::<f32>("cross_entropy.dlogits", rows * vocab)?;
        if rows > 0 && vocab > 0 && count > 0 {
            let (r, v) = (
                dim("cross_entropy.rows", rows)?,
                dim("cross_entropy.vocab", vocab)?,
            );
            let ignore = ignore_index.map_or(-1i64, i64::from);
            let scale = dloss / count as f32;
            launch!(self, OPS, "cross_entropy_backward", format!("logits [{rows}, {vocab}]"), per_row(rows); logits, targets, lse, &mut d, &r, &v, &ignore, &scale);
        }
        Ok(d)
    }

    /// One AdamW step with FP32 moments on FP32 master weights.
    pub fn adamw_f32(
        &self,
        p: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        n: usize,
        k: AdamCoeffs,
    ) -> Result<()> {
        self.adamw("adamw_f32", p, g, (m, v), n, k)
    }

    /// One AdamW step with BF16 moments (`m`, `v` hold BF16 bit patterns) on FP32 master weights.
    pub fn adamw_bf16(
        &self,
        p: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        m: &mut CudaSlice<u16>,
        v: &mut CudaSlice<u16>,
        n: usize,
        k: AdamCoeffs,
    ) -> Result<()> {
        self.adamw("adamw_bf16", p, g, (m, v), n, k)
    }

    fn adamw<M: DeviceRepr>(
        &self,
        kernel: &'static str,
        p: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        (m, v): (&mut CudaSlice<M>, &mut CudaSlice<M>),
        n: usize,
        k: AdamCoeffs,
    ) -> Result<()> {
        check_len("adamw.params", p, n)?;
        check_len("adamw.grads", g, n)?;
        check_len("adamw.state", m, n)?;
        check_len("adamw.state", v, n)?;
        if n > 0 {
            let (nn, k) = (n as i64, DevCoeffs(k));
            launch!(self, OPS, kernel, format!("[{n}]"), grid_stride(n, 256); p, g, m, v, &nn, &k);
        }
        Ok(())
    }
}
