//! The GPU as a [`Backend`]: buffers are device memory, GEMMs cuBLAS SGEMM (FP32, no TF32), the
//! rest the kernels of ops.cu and model.cu. Every operation is queued on the `Gpu`'s one stream;
//! downloads wait for it.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::device::{Gpu, cuda_err};
use super::launch::{check_len, dim, grid_stride, launch};
use super::mixed::GpuWeight;
use super::source::MODEL;
use crate::backend::{AttnDims, Backend, ColCopy, Gemm};
use crate::ops::adamw::{AdamCoeffs, Moments};
use crate::ops::linear::Precision;
use crate::ops::rope::{RopeLayout, RopeTable};
use crate::{KernelError, Result};

/// One parameter's AdamW moments on the GPU: FP32, or BF16 bit patterns (half the memory, as the
/// recipe keeps them); `len` values each.
pub enum GpuMoments {
    /// FP32 moments.
    F32 {
        /// First moment.
        m: CudaSlice<f32>,
        /// Second moment.
        v: CudaSlice<f32>,
        /// Values in each.
        len: usize,
    },
    /// BF16 moments.
    Bf16 {
        /// First moment.
        m: CudaSlice<u16>,
        /// Second moment.
        v: CudaSlice<u16>,
        /// Values in each.
        len: usize,
    },
}

impl GpuMoments {
    fn len(&self) -> usize {
        match self {
            Self::F32 { len, .. } | Self::Bf16 { len, .. } => *len,
        }
    }
}

/// A RoPE table on the GPU: cos and sin `[positions, dim / 2]` in FP32.
pub struct GpuRope {
    dim: usize,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    positions: usize,
    interleaved: bool,
}

/// Indices on the GPU, with the largest one (known when they were uploaded): every operation that
/// indexes rows with them checks, on the host, that the rows exist.
pub struct GpuIds {
    ids: CudaSlice<u32>,
    len: usize,
    /// One past the largest index (0 for none).
    bound: usize,
}

impl GpuIds {
    fn check(&self, what: &'static str, n: usize, rows: usize) -> Result<()> {
        if self.len < n {
            return Err(KernelError::shape(
                what,
                format!("at least {n} indices"),
                format!("{}", self.len),
            ));
        }
        if self.bound > rows {
            return Err(KernelError::IndexOutOfRange {
                operand: what,
                position: 0,
                index: self.bound - 1,
                bound: rows,
            });
        }
        Ok(())
    }
}

/// What cross-entropy's forward keeps on the GPU: the per-row log-sum-exp (FP64) and the count.
pub struct GpuCe {
    lse: CudaSlice<f64>,
    count: usize,
}

/// One warp per row, eight warps per block.
fn warps(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(8).max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Blocks of the attention kernels: 8 warps each, on 8 rows of one (batch, head) (`ATT_BR` and
/// `att_block` in model.cu).
fn attention_blocks(d: &AttnDims) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((d.batch * d.heads * d.seq.div_ceil(8)).max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Blocks of the sum-of-squares reduction: a fixed count, so the partial sums (added on the host
/// in order) make the result independent of timing.
const SUM_BLOCKS: usize = 256;

impl Gpu {
    /// `C += op(A) . op(B)` through cuBLAS SGEMM (`gemm` hands it a zeroed C).
    fn sgemm(
        &self,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        c: &mut CudaSlice<f32>,
        g: Gemm,
    ) -> Result<()> {
        use cudarc::cublas::{Gemm as _, GemmConfig, sys::cublasOperation_t as Op};
        let shapes = format!("{g:?}");
        check_len("gemm.a", a, g.m * g.k)?;
        check_len("gemm.b", b, g.k * g.n)?;
        check_len("gemm.c", c, g.m * g.n)?;
        if g.m == 0 || g.n == 0 || g.k == 0 {
            return Ok(());
        }
        // cuBLAS runs on the thread's current context, which nothing before may have set.
        self.context()
            .bind_to_thread()
            .map_err(cuda_err("cublas_sgemm", &shapes))?;
        let (m, n, k) = (
            dim("gemm.m", g.m)?,
            dim("gemm.n", g.n)?,
            dim("gemm.k", g.k)?,
        );
        let op = |t: bool| if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N };
        // Row-major C[m, n] is column-major C^T[n, m] = op(B)^T . op(A)^T.
        let cfg = GemmConfig {
            transa: op(g.b_t),
            transb: op(g.a_t),
            m: n,
            n: m,
            k,
            alpha: 1.0f32,
            lda: if g.b_t { k } else { n },
            ldb: if g.a_t { m } else { k },
            beta: 1.0f32,
            ldc: n,
        };
        // SAFETY: a, b and c hold at least the elements their shapes need (checked above) and the
        // leading dimensions describe those row-major shapes as column-major operands.
        unsafe { self.blas()?.gemm(cfg, b, a, c) }.map_err(|e| KernelError::Cuda {
            kernel: "cublas_sgemm",
            shapes,
            reason: format!("{e:?}"),
        })
    }
}

impl Gpu {
    /// Launches `gather_rows` or `scatter_add_rows` (the same arguments: source, indices,
    /// optional per-row scale, destination, rows, width).
    ///
    /// # Safety
    /// The caller checks that the kernel's reads and writes stay inside the buffers.
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows_kernel(
        &self,
        kernel: &'static str,
        src: &CudaSlice<f32>,
        idx: &GpuIds,
        n: usize,
        width: usize,
        scale: Option<&CudaSlice<f32>>,
        dst: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if n * width == 0 {
            return Ok(());
        }
        let (nn, w) = (n as i64, dim("rows.width", width)?);
        let f = self.function(&MODEL, kernel)?;
        let mut b = self.stream().launch_builder(&f);
        let null = 0u64;
        b.arg(src).arg(&idx.ids);
        match scale {
            Some(s) => b.arg(s),
            None => b.arg(&null),
        };
        b.arg(dst).arg(&nn).arg(&w);
        // SAFETY: the caller's checks (see above); a null scale is a null pointer of the
        // kernel's `const float*`.
        unsafe { b.launch(grid_stride(n * width, 256)) }
            .map_err(cuda_err(kernel, format!("[{n}, {width}]")))?;
        Ok(())
    }
}

impl Backend for Gpu {
    type Buf = CudaSlice<f32>;
    type Ids = GpuIds;
    type Ce = GpuCe;
    type Rope = GpuRope;
    type Weight = GpuWeight;
    type Moments = GpuMoments;

    fn describe(&self) -> String {
        format!("{} ({})", self.info().name, self.info().arch())
    }

    fn upload(&self, what: &'static str, x: &[f32]) -> Result<CudaSlice<f32>> {
        Gpu::upload(self, what, x)
    }

    fn upload_ids(&self, what: &'static str, x: &[u32]) -> Result<GpuIds> {
        Ok(GpuIds {
            ids: Gpu::upload(self, what, x)?,
            len: x.len(),
            bound: x.iter().max().map_or(0, |&m| m as usize + 1),
        })
    }

    fn zeros(&self, what: &'static str, n: usize) -> Result<CudaSlice<f32>> {
        Gpu::zeros(self, what, n)
    }

    fn download(&self, what: &'static str, x: &CudaSlice<f32>) -> Result<Vec<f32>> {
        Gpu::download(self, what, x, x.len())
    }

    fn numel(&self, x: &CudaSlice<f32>) -> usize {
        x.len()
    }

    fn rope_table(&self, table: &RopeTable, layout: RopeLayout) -> Result<GpuRope> {
        let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        Ok(GpuRope {
            dim: table.dim(),
            cos: Gpu::upload(self, "rope.cos", &f(table.cos()))?,
            sin: Gpu::upload(self, "rope.sin", &f(table.sin()))?,
            positions: table.max_positions(),
            interleaved: layout == RopeLayout::Interleaved,
        })
    }

    fn gemm(&self, a: &CudaSlice<f32>, b: &CudaSlice<f32>, g: Gemm) -> Result<CudaSlice<f32>> {
        let mut c = Gpu::zeros(self, "gemm.c", g.m * g.n)?;
        self.sgemm(a, b, &mut c, g)?;
        Ok(c)
    }

    fn gemm_acc(
        &self,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        c: &mut CudaSlice<f32>,
        g: Gemm,
    ) -> Result<()> {
        self.sgemm(a, b, c, g)
    }

    fn check_linear(&self, out_f: usize, in_f: usize, precision: Precision) -> Result<()> {
        self.mp_check(out_f, in_f, precision)
    }

    fn weight_operand(
        &self,
        w: &CudaSlice<f32>,
        out_f: usize,
        in_f: usize,
        precision: Precision,
    ) -> Result<GpuWeight> {
        self.mp_weight(w, out_f, in_f, precision)
    }

    fn linear_mp(&self, x: &CudaSlice<f32>, w: &GpuWeight, rows: usize) -> Result<CudaSlice<f32>> {
        self.mp_forward(x, w, rows)
    }

    fn linear_mp_input_grad(
        &self,
        dy: &CudaSlice<f32>,
        w: &GpuWeight,
        rows: usize,
    ) -> Result<CudaSlice<f32>> {
        self.mp_input_grad(dy, w, rows)
    }

    fn linear_mp_weight_grad_acc(
        &self,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &GpuWeight,
        rows: usize,
        dw: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.mp_weight_grad_acc(dy, x, w, rows, dw)
    }

    fn add_into(&self, y: &mut CudaSlice<f32>, x: &CudaSlice<f32>) -> Result<()> {
        let n = y.len();
        check_len("add.x", x, n)?;
        let nn = n as i64;
        launch!(self, MODEL, "add_into", format!("[{n}]"), grid_stride(n, 256); y, x, &nn);
        Ok(())
    }

    fn rmsnorm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rows: usize,
        d: usize,
        eps: f64,
    ) -> Result<CudaSlice<f32>> {
        self.rmsnorm_forward(x, w, rows, d, eps)
    }

    fn rmsnorm_backward(
        &self,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rows: usize,
        d: usize,
        eps: f64,
        dw: &mut CudaSlice<f32>,
    ) -> Result<CudaSlice<f32>> {
        let dx = self.rmsnorm_backward_input(x, w, dy, rows, d, eps)?;
        check_len("rmsnorm.dweight", dw, d)?;
        if rows * d > 0 {
            let shapes = format!("x [{rows}, {d}]");
            let (r, dd) = (dim("rmsnorm.rows", rows)?, dim("rmsnorm.d", d)?);
            let mut rstd = Gpu::zeros::<f32>(self, "rmsnorm.rstd", rows)?;
            launch!(self, MODEL, "row_rstd", &shapes, warps(rows); x, &mut rstd, &r, &dd, &eps);
            let cfg = LaunchConfig {
                grid_dim: (d.div_ceil(64) as u32, 1, 1),
                block_dim: (64, 1, 1),
                shared_mem_bytes: 0,
            };
            launch!(self, MODEL, "rmsnorm_backward_weight", &shapes, cfg; x, dy, &rstd, dw, &r, &dd);
        }
        Ok(dx)
    }

    fn swiglu(&self, g: &CudaSlice<f32>, u: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        self.swiglu_forward(g, u, g.len())
    }

    fn swiglu_backward(
        &self,
        g: &CudaSlice<f32>,
        u: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        Gpu::swiglu_backward(self, g, u, dy, g.len())
    }

    fn rope(
        &self,
        x: &CudaSlice<f32>,
        t: &GpuRope,
        shape: [usize; 4],
        inverse: bool,
    ) -> Result<CudaSlice<f32>> {
        if shape[3] != t.dim {
            return Err(KernelError::shape(
                "rope.x",
                format!("a last dimension of {} (the table's)", t.dim),
                format!("{shape:?}"),
            ));
        }
        let sign = if inverse { -1.0 } else { 1.0 };
        Gpu::rope(
            self,
            x,
            &t.cos,
            &t.sin,
            shape,
            t.positions,
            0,
            sign,
            t.interleaved,
        )
    }

    fn attention(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        d: AttnDims,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        let rows = d.batch * d.seq * d.heads;
        let shapes = format!("{d:?}");
        check_attention(&d, q, k, v)?;
        let mut out = Gpu::zeros(self, "attention.out", rows * d.dv)?;
        let mut lse = Gpu::zeros(self, "attention.lse", rows)?;
        if rows > 0 {
            let (b, s, h, dk, dv) = attn_args(&d)?;
            let scale = d.scale as f32;
            launch!(self, MODEL, "attention_forward", &shapes, attention_blocks(&d); q, k, v, &mut out, &mut lse, &b, &s, &h, &dk, &dv, &scale);
        }
        Ok((out, lse))
    }

    fn attention_backward(
        &self,
        dout: &CudaSlice<f32>,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        out: &CudaSlice<f32>,
        lse: &CudaSlice<f32>,
        d: AttnDims,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)> {
        let rows = d.batch * d.seq * d.heads;
        let shapes = format!("{d:?}");
        check_attention(&d, q, k, v)?;
        check_len("attention.dout", dout, rows * d.dv)?;
        check_len("attention.out", out, rows * d.dv)?;
        check_len("attention.lse", lse, rows)?;
        let mut dq = Gpu::zeros(self, "attention.dq", rows * d.dk)?;
        let mut dk_ = Gpu::zeros(self, "attention.dk", rows * d.dk)?;
        let mut dv_ = Gpu::zeros(self, "attention.dv", rows * d.dv)?;
        if rows > 0 {
            let (b, s, h, dk, dv) = attn_args(&d)?;
            let scale = d.scale as f32;
            let mut delta = Gpu::zeros::<f32>(self, "attention.delta", rows)?;
            launch!(self, MODEL, "attention_delta", &shapes, warps(rows); dout, out, &mut delta, &b, &s, &h, &dv);
            launch!(self, MODEL, "attention_backward_q", &shapes, attention_blocks(&d); dout, q, k, v, lse, &delta, &mut dq, &b, &s, &h, &dk, &dv, &scale);
            launch!(self, MODEL, "attention_backward_kv", &shapes, attention_blocks(&d); dout, q, k, v, lse, &delta, &mut dk_, &mut dv_, &b, &s, &h, &dk, &dv, &scale);
        }
        Ok((dq, dk_, dv_))
    }

    fn embedding(
        &self,
        table: &CudaSlice<f32>,
        ids: &GpuIds,
        n: usize,
        d: usize,
    ) -> Result<CudaSlice<f32>> {
        ids.check("embedding.ids", n, table.len().checked_div(d).unwrap_or(0))?;
        let mut out = Gpu::zeros(self, "embedding.out", n * d)?;
        if n * d > 0 {
            let dd = dim("embedding.d", d)?;
            let nn = n as i64;
            launch!(self, MODEL, "embedding_gather", format!("[{n}, {d}] of {}", table.len()), grid_stride(n * d, 256); table, &ids.ids, &mut out, &nn, &dd);
        }
        Ok(out)
    }

    fn embedding_backward(
        &self,
        dy: &CudaSlice<f32>,
        ids: &[u32],
        d: usize,
        dtable: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let vocab = dtable.len().checked_div(d).unwrap_or(0);
        check_len("embedding.dy", dy, ids.len() * d)?;
        if let Some((position, &id)) = ids.iter().enumerate().find(|(_, i)| **i as usize >= vocab) {
            return Err(KernelError::IndexOutOfRange {
                operand: "embedding.ids",
                position,
                index: id as usize,
                bound: vocab,
            });
        }
        if ids.is_empty() || d == 0 {
            return Ok(());
        }
        // Each id's rows, in order: the sums are deterministic without atomics.
        let mut order: Vec<u32> = (0..ids.len() as u32).collect();
        order.sort_by_key(|&i| (ids[i as usize], i));
        let (mut uniq, mut off) = (Vec::new(), Vec::new());
        for (pos, &i) in order.iter().enumerate() {
            let id = ids[i as usize];
            if uniq.last() != Some(&id) {
                uniq.push(id);
                off.push(pos as u32);
            }
        }
        off.push(order.len() as u32);
        let (u, o, r) = (
            Gpu::upload(self, "embedding.ids", &uniq)?,
            Gpu::upload(self, "embedding.ids", &off)?,
            Gpu::upload(self, "embedding.ids", &order)?,
        );
        let (nu, dd) = (dim("embedding.ids", uniq.len())?, dim("embedding.d", d)?);
        launch!(self, MODEL, "embedding_scatter", format!("[{}, {d}]", ids.len()), grid_stride(uniq.len() * d, 256); dy, &u, &o, &r, dtable, &nu, &dd);
        Ok(())
    }

    fn cross_entropy(
        &self,
        logits: &CudaSlice<f32>,
        targets: &GpuIds,
        rows: usize,
        vocab: usize,
    ) -> Result<(f64, usize, GpuCe)> {
        let (lse, loss) = self.cross_entropy_rows(logits, &targets.ids, rows, vocab, None)?;
        let total: f64 = loss.iter().sum();
        let mean = if rows == 0 { 0.0 } else { total / rows as f64 };
        Ok((mean, rows, GpuCe { lse, count: rows }))
    }

    fn cross_entropy_backward(
        &self,
        logits: &CudaSlice<f32>,
        targets: &GpuIds,
        ce: &GpuCe,
        rows: usize,
        vocab: usize,
        dloss: f64,
    ) -> Result<CudaSlice<f32>> {
        Gpu::cross_entropy_backward(
            self,
            logits,
            &targets.ids,
            &ce.lse,
            rows,
            vocab,
            None,
            dloss as f32,
            ce.count,
        )
    }

    fn copy_cols(&self, src: &CudaSlice<f32>, dst: &mut CudaSlice<f32>, c: ColCopy) -> Result<()> {
        c.check("copy_cols", src.len(), dst.len())?;
        let n = c.rows * c.groups * c.width;
        if n == 0 {
            return Ok(());
        }
        let a = [
            c.rows, c.groups, c.width, c.src_ld, c.src_off, c.src_gs, c.dst_ld, c.dst_off, c.dst_gs,
        ]
        .iter()
        .map(|&v| dim("copy_cols", v))
        .collect::<Result<Vec<i32>>>()?;
        let acc = i32::from(c.accumulate);
        launch!(self, MODEL, "copy_cols", format!("{c:?}"), grid_stride(n, 256); src, dst, &a[0], &a[1], &a[2], &a[3], &a[4], &a[5], &a[6], &a[7], &a[8], &acc);
        Ok(())
    }

    fn gather_rows(
        &self,
        src: &CudaSlice<f32>,
        idx: &GpuIds,
        n: usize,
        width: usize,
        scale: Option<&CudaSlice<f32>>,
    ) -> Result<CudaSlice<f32>> {
        idx.check(
            "gather_rows.idx",
            n,
            src.len().checked_div(width).unwrap_or(0),
        )?;
        if let Some(s) = scale {
            check_len("gather_rows.scale", s, n)?;
        }
        let mut out = Gpu::zeros(self, "gather_rows.out", n * width)?;
        // SAFETY: src holds every row idx names (checked against its bound above), idx and scale
        // hold n entries, out n x width.
        unsafe { self.rows_kernel("gather_rows", src, idx, n, width, scale, &mut out) }?;
        Ok(out)
    }

    fn scatter_add_rows(
        &self,
        src: &CudaSlice<f32>,
        idx: &GpuIds,
        n: usize,
        width: usize,
        scale: Option<&CudaSlice<f32>>,
        dst: &mut CudaSlice<f32>,
    ) -> Result<()> {
        idx.check(
            "scatter_add_rows.idx",
            n,
            dst.len().checked_div(width).unwrap_or(0),
        )?;
        check_len("scatter_add_rows.src", src, n * width)?;
        if let Some(s) = scale {
            check_len("scatter_add_rows.scale", s, n)?;
        }
        // SAFETY: src holds n x width values, dst every row idx names (checked above), and the
        // indices of one call are distinct (the trait's contract): no two threads write one value.
        unsafe { self.rows_kernel("scatter_add_rows", src, idx, n, width, scale, dst) }
    }

    fn row_dots(
        &self,
        a: &CudaSlice<f32>,
        idx: &GpuIds,
        b: &CudaSlice<f32>,
        n: usize,
        width: usize,
    ) -> Result<Vec<f32>> {
        idx.check("row_dots.idx", n, a.len().checked_div(width).unwrap_or(0))?;
        check_len("row_dots.b", b, n * width)?;
        let mut out = Gpu::zeros(self, "row_dots.out", n)?;
        if n > 0 {
            let (nn, w) = (dim("row_dots.n", n)?, dim("row_dots.width", width)?);
            launch!(self, MODEL, "row_dots", format!("[{n}, {width}]"), warps(n); a, &idx.ids, b, &mut out, &nn, &w);
        }
        Gpu::download(self, "row_dots.out", &out, n)
    }

    fn sum_sq(&self, xs: &[&CudaSlice<f32>]) -> Result<f64> {
        // Every buffer's partial sums side by side, downloaded once and added in order.
        let mut partial = Gpu::zeros::<f64>(self, "sum_sq.partial", SUM_BLOCKS * xs.len())?;
        let cfg = LaunchConfig {
            grid_dim: (SUM_BLOCKS as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        for (i, x) in xs.iter().enumerate() {
            let nn = x.len() as i64;
            let mut part = partial.slice_mut(i * SUM_BLOCKS..(i + 1) * SUM_BLOCKS);
            launch!(self, MODEL, "sum_sq_partial", format!("[{nn}]"), cfg; *x, &mut part, &nn);
        }
        Ok(
            Gpu::download(self, "sum_sq.partial", &partial, SUM_BLOCKS * xs.len())?
                .iter()
                .sum(),
        )
    }

    fn upload_moments(&self, s: &Moments) -> Result<GpuMoments> {
        Ok(match s {
            Moments::F32 { m, v } => GpuMoments::F32 {
                m: Gpu::upload(self, "adamw.m", m)?,
                v: Gpu::upload(self, "adamw.v", v)?,
                len: m.len(),
            },
            Moments::Bf16 { m, v } => {
                let bits = |x: &[half::bf16]| x.iter().map(|b| b.to_bits()).collect::<Vec<u16>>();
                GpuMoments::Bf16 {
                    m: Gpu::upload(self, "adamw.m", &bits(m))?,
                    v: Gpu::upload(self, "adamw.v", &bits(v))?,
                    len: m.len(),
                }
            }
        })
    }

    fn download_moments(&self, s: &GpuMoments) -> Result<Moments> {
        Ok(match s {
            GpuMoments::F32 { m, v, len } => Moments::F32 {
                m: Gpu::download(self, "adamw.m", m, *len)?,
                v: Gpu::download(self, "adamw.v", v, *len)?,
            },
            GpuMoments::Bf16 { m, v, len } => {
                let values = |x: Vec<u16>| x.into_iter().map(half::bf16::from_bits).collect();
                Moments::Bf16 {
                    m: values(Gpu::download(self, "adamw.m", m, *len)?),
                    v: values(Gpu::download(self, "adamw.v", v, *len)?),
                }
            }
        })
    }

    fn adamw(
        &self,
        p: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        s: &mut GpuMoments,
        k: &AdamCoeffs,
    ) -> Result<()> {
        let n = p.len();
        if s.len() != n {
            return Err(KernelError::shape(
                "adamw.state",
                format!("moments of {n} elements (one per parameter)"),
                format!("{} elements", s.len()),
            ));
        }
        match s {
            GpuMoments::F32 { m, v, .. } => self.adamw_f32(p, g, m, v, n, *k),
            GpuMoments::Bf16 { m, v, .. } => self.adamw_bf16(p, g, m, v, n, *k),
        }
    }

    fn synchronize(&self) -> Result<()> {
        Gpu::synchronize(self, "backend", "synchronize")
    }
}

fn check_attention(
    d: &AttnDims,
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
) -> Result<()> {
    let rows = d.batch * d.seq * d.heads;
    if d.dk > 256 || d.dv > 128 {
        return Err(KernelError::invalid(
            "attention",
            format!(
                "head dimensions dk {} and dv {} exceed the kernel's 256 and 128",
                d.dk, d.dv
            ),
        ));
    }
    check_len("attention.q", q, rows * d.dk)?;
    check_len("attention.k", k, rows * d.dk)?;
    check_len("attention.v", v, rows * d.dv)
}

fn attn_args(d: &AttnDims) -> Result<(i32, i32, i32, i32, i32)> {
    Ok((
        dim("attention.batch", d.batch)?,
        dim("attention.seq", d.seq)?,
        dim("attention.heads", d.heads)?,
        dim("attention.dk", d.dk)?,
        dim("attention.dv", d.dv)?,
    ))
}
