//! Compute backends for a device-resident training step.
//!
//! A [`Backend`] keeps its buffers where it computes and runs, on them, every operation the
//! model's training step needs: GEMMs, norms, activations, RoPE, attention, embeddings,
//! cross-entropy, the column and row copies of attention heads and MoE experts, and AdamW.
//! [`Host`] runs this crate's CPU reference; `cuda::Gpu` (feature `cuda`) runs the CUDA kernels
//! and cuBLAS. A model written once against the trait runs on either, and one test body holds
//! every backend to the CPU model.
//!
//! Every buffer is FP32 and row-major; shapes travel as arguments. Operations that return a
//! buffer allocate it; `*_into` and `*_acc` operations write into one they are given.
//!
//! The mixed-precision linear layers ([`Backend::weight_operand`] and the `linear_mp*`
//! operations) compute what `ops::linear` computes for [`Precision::Bf16`] and
//! [`Precision::Fp8`]: BF16 or E4M3 operands (1x128 activation tiles, 128x128 weight blocks),
//! FP32 accumulation, outputs rounded to BF16 values, FP32 weight gradients. Their buffers stay
//! FP32: the activations a layer keeps are converted again when its weight gradient needs them,
//! which gives the operands a cached copy would hold.

mod host;

pub use host::Host;

use crate::Result;
use crate::ops::adamw::{AdamCoeffs, Moments};
use crate::ops::linear::Precision;
use crate::ops::rope::{RopeLayout, RopeTable};

/// One GEMM on row-major operands: `C[m, n] = op(A) . op(B)`, where `A` is stored `[m, k]`
/// (`[k, m]` when `a_t`) and `B` is stored `[k, n]` (`[n, k]` when `b_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gemm {
    /// Rows of `C`.
    pub m: usize,
    /// Columns of `C`.
    pub n: usize,
    /// The inner dimension.
    pub k: usize,
    /// `A` is stored transposed.
    pub a_t: bool,
    /// `B` is stored transposed.
    pub b_t: bool,
}

impl Gemm {
    /// A linear layer's forward: `y[rows, out] = x[rows, in] . W[out, in]^T`.
    pub fn forward(rows: usize, out_f: usize, in_f: usize) -> Self {
        Self {
            m: rows,
            n: out_f,
            k: in_f,
            a_t: false,
            b_t: true,
        }
    }

    /// Its input gradient: `dx[rows, in] = dy[rows, out] . W[out, in]`.
    pub fn input_grad(rows: usize, out_f: usize, in_f: usize) -> Self {
        Self {
            m: rows,
            n: in_f,
            k: out_f,
            a_t: false,
            b_t: false,
        }
    }

    /// Its weight gradient: `dW[out, in] = dy[rows, out]^T . x[rows, in]`.
    pub fn weight_grad(rows: usize, out_f: usize, in_f: usize) -> Self {
        Self {
            m: out_f,
            n: in_f,
            k: rows,
            a_t: true,
            b_t: false,
        }
    }
}

/// Sizes of one causal attention call: `q`, `k` are `[batch, seq, heads, dk]`, `v` and the output
/// `[batch, seq, heads, dv]`, the log-sum-exp `[batch, heads, seq]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnDims {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Heads.
    pub heads: usize,
    /// Query/key head dimension.
    pub dk: usize,
    /// Value head dimension.
    pub dv: usize,
    /// Softmax scale.
    pub scale: f64,
}

/// A copy of column blocks between row-major matrices: for every row `r < rows`, group
/// `g < groups` and column `c < width`,
/// `dst[r * dst_ld + dst_off + g * dst_gs + c] (+)= src[r * src_ld + src_off + g * src_gs + c]`.
/// Splitting, joining and repeating attention heads are such copies; summing over heads is a
/// series of accumulating ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColCopy {
    /// Rows.
    pub rows: usize,
    /// Column groups (heads) per row.
    pub groups: usize,
    /// Columns per group.
    pub width: usize,
    /// Source row stride.
    pub src_ld: usize,
    /// Source column offset.
    pub src_off: usize,
    /// Source stride between groups.
    pub src_gs: usize,
    /// Destination row stride.
    pub dst_ld: usize,
    /// Destination column offset.
    pub dst_off: usize,
    /// Destination stride between groups.
    pub dst_gs: usize,
    /// Add into the destination instead of overwriting it.
    pub accumulate: bool,
}

impl ColCopy {
    /// Checks that the copy stays inside both buffers; returns an error naming `what` otherwise.
    pub fn check(&self, what: &'static str, src_len: usize, dst_len: usize) -> Result<()> {
        let last = |ld: usize, off: usize, gs: usize| {
            if self.rows == 0 || self.groups == 0 || self.width == 0 {
                0
            } else {
                (self.rows - 1) * ld + off + (self.groups - 1) * gs + self.width
            }
        };
        let (s, d) = (
            last(self.src_ld, self.src_off, self.src_gs),
            last(self.dst_ld, self.dst_off, self.dst_gs),
        );
        if s > src_len || d > dst_len {
            return Err(crate::KernelError::shape(
                what,
                format!("buffers of at least {s} (source) and {d} (destination) elements"),
                format!("{src_len} and {dst_len}"),
            ));
        }
        Ok(())
    }
}

/// Where a training step computes. See the module documentation.
pub trait Backend: Send + Sync {
    /// An FP32 buffer.
    type Buf: Send + Sync;
    /// A buffer of `u32` indices (token ids, row indices).
    type Ids: Send + Sync;
    /// What cross-entropy's forward keeps for its backward.
    type Ce: Send + Sync;
    /// A RoPE table in the backend's memory.
    type Rope: Send + Sync;
    /// A linear layer's weight as the mixed-precision GEMMs read it.
    type Weight: Send + Sync;
    /// One parameter's AdamW moments `(m, v)`, stored in FP32 or in BF16 (half the memory).
    type Moments: Send + Sync;

    /// What computes, for logs and reports (`cpu`, `NVIDIA H200 (sm_90a)`).
    fn describe(&self) -> String;
    /// A copy of `x` in the backend's memory.
    fn upload(&self, what: &'static str, x: &[f32]) -> Result<Self::Buf>;
    /// A copy of the indices `x` in the backend's memory.
    fn upload_ids(&self, what: &'static str, x: &[u32]) -> Result<Self::Ids>;
    /// `n` zeros.
    fn zeros(&self, what: &'static str, n: usize) -> Result<Self::Buf>;
    /// The buffer's values on the host.
    fn download(&self, what: &'static str, x: &Self::Buf) -> Result<Vec<f32>>;
    /// The buffer's length.
    fn numel(&self, x: &Self::Buf) -> usize;
    /// A RoPE table for [`Backend::rope`].
    fn rope_table(&self, table: &RopeTable, layout: RopeLayout) -> Result<Self::Rope>;

    /// `op(A) . op(B)` into a new buffer.
    fn gemm(&self, a: &Self::Buf, b: &Self::Buf, g: Gemm) -> Result<Self::Buf>;
    /// `C += op(A) . op(B)`.
    fn gemm_acc(&self, a: &Self::Buf, b: &Self::Buf, c: &mut Self::Buf, g: Gemm) -> Result<()>;
    /// Whether this backend's mixed-precision linears take a weight of `[out_f, in_f]` in
    /// `precision`; an error naming `linear.weight` and the reason otherwise.
    fn check_linear(&self, out_f: usize, in_f: usize, precision: Precision) -> Result<()>;
    /// The weight `w[out_f, in_f]` prepared for `precision`: rounded to BF16, or quantized to
    /// E4M3 in 128x128 blocks together with its transpose (which B multiplies by). A step
    /// prepares each weight once. FP32 layers use the plain GEMMs: asking for
    /// [`Precision::Fp32`] is an error.
    fn weight_operand(
        &self,
        w: &Self::Buf,
        out_f: usize,
        in_f: usize,
        precision: Precision,
    ) -> Result<Self::Weight>;
    /// A mixed-precision linear layer's forward: `y[rows, out] = x[rows, in] . W^T`, the input
    /// rounded to BF16 or quantized in 1x128 tiles, the output rounded to BF16.
    fn linear_mp(&self, x: &Self::Buf, w: &Self::Weight, rows: usize) -> Result<Self::Buf>;
    /// Its input gradient (B): `dx[rows, in] = dy[rows, out] . W`, `dy` rounded to BF16 or
    /// quantized in 1x128 tiles, the output rounded to BF16.
    fn linear_mp_input_grad(
        &self,
        dy: &Self::Buf,
        w: &Self::Weight,
        rows: usize,
    ) -> Result<Self::Buf>;
    /// Its weight gradient (W), added into `dw[out, in]` in FP32: `dy^T . x` with both operands
    /// rounded to BF16, or, under FP8, `dy` quantized in 128x1 tiles (along the tokens) and `x`
    /// quantized as the forward pass did (1x128 tiles), dequantized, and quantized again in 128x1
    /// tiles.
    fn linear_mp_weight_grad_acc(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Weight,
        rows: usize,
        dw: &mut Self::Buf,
    ) -> Result<()>;
    /// `y += x`.
    fn add_into(&self, y: &mut Self::Buf, x: &Self::Buf) -> Result<()>;
    /// RMSNorm of `rows` rows of `d`.
    fn rmsnorm(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        d: usize,
        eps: f64,
    ) -> Result<Self::Buf>;
    /// RMSNorm's input gradient, adding its weight gradient into `dw`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        d: usize,
        eps: f64,
        dw: &mut Self::Buf,
    ) -> Result<Self::Buf>;
    /// `silu(g) * u`.
    fn swiglu(&self, g: &Self::Buf, u: &Self::Buf) -> Result<Self::Buf>;
    /// `(dg, du)` of [`Backend::swiglu`].
    fn swiglu_backward(
        &self,
        g: &Self::Buf,
        u: &Self::Buf,
        dy: &Self::Buf,
    ) -> Result<(Self::Buf, Self::Buf)>;
    /// RoPE on `x: [batch, seq, heads, dim]` (token `s` at position `s`), or its inverse.
    fn rope(
        &self,
        x: &Self::Buf,
        table: &Self::Rope,
        shape: [usize; 4],
        inverse: bool,
    ) -> Result<Self::Buf>;
    /// Causal attention: the output and the per-row log-sum-exp.
    fn attention(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        d: AttnDims,
    ) -> Result<(Self::Buf, Self::Buf)>;
    /// `(dq, dk, dv)` of [`Backend::attention`].
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dout: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        d: AttnDims,
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)>;
    /// Rows `table[ids[i]]` of width `d`, `n` of them. Every id must be below the table's rows:
    /// the caller checks them on the host (a device cannot without a round trip).
    fn embedding(
        &self,
        table: &Self::Buf,
        ids: &Self::Ids,
        n: usize,
        d: usize,
    ) -> Result<Self::Buf>;
    /// `dtable[ids[i]] += dy[i]`, each id's rows summed in order (deterministic).
    fn embedding_backward(
        &self,
        dy: &Self::Buf,
        ids: &[u32],
        d: usize,
        dtable: &mut Self::Buf,
    ) -> Result<()>;
    /// Mean softmax cross-entropy of `rows` logits rows against `targets`: the mean, the number
    /// of rows, and what the backward needs.
    fn cross_entropy(
        &self,
        logits: &Self::Buf,
        targets: &Self::Ids,
        rows: usize,
        vocab: usize,
    ) -> Result<(f64, usize, Self::Ce)>;
    /// The gradient of `dloss * mean loss` with respect to the logits.
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy_backward(
        &self,
        logits: &Self::Buf,
        targets: &Self::Ids,
        ce: &Self::Ce,
        rows: usize,
        vocab: usize,
        dloss: f64,
    ) -> Result<Self::Buf>;
    /// A column-block copy (see [`ColCopy`]).
    fn copy_cols(&self, src: &Self::Buf, dst: &mut Self::Buf, c: ColCopy) -> Result<()>;
    /// `out[i] = src[idx[i]] * scale[i]` (scale 1 without `scale`), `n` rows of `width`.
    fn gather_rows(
        &self,
        src: &Self::Buf,
        idx: &Self::Ids,
        n: usize,
        width: usize,
        scale: Option<&Self::Buf>,
    ) -> Result<Self::Buf>;
    /// `dst[idx[i]] += src[i] * scale[i]` for `n` rows of `width`; the indices must be distinct.
    fn scatter_add_rows(
        &self,
        src: &Self::Buf,
        idx: &Self::Ids,
        n: usize,
        width: usize,
        scale: Option<&Self::Buf>,
        dst: &mut Self::Buf,
    ) -> Result<()>;
    /// `out[i] = <a[idx[i]], b[i]>` for `n` rows of `width`, on the host.
    fn row_dots(
        &self,
        a: &Self::Buf,
        idx: &Self::Ids,
        b: &Self::Buf,
        n: usize,
        width: usize,
    ) -> Result<Vec<f32>>;
    /// The sum of squares of every value of `xs`, in FP64, buffer by buffer in order (one
    /// result for many buffers: a device waits once, not once per buffer).
    fn sum_sq(&self, xs: &[&Self::Buf]) -> Result<f64>;
    /// A copy of the moments `s` in the backend's memory, stored in the precision they have.
    fn upload_moments(&self, s: &Moments) -> Result<Self::Moments>;
    /// The moments on the host, in the precision they are stored in.
    fn download_moments(&self, s: &Self::Moments) -> Result<Moments>;
    /// One AdamW step with FP32 master weights on moments stored in FP32 or BF16 (the update of
    /// [`crate::ops::adamw::adamw_apply`]: BF16 moments are updated in FP32 and stored rounded
    /// to nearest even).
    fn adamw(
        &self,
        p: &mut Self::Buf,
        g: &Self::Buf,
        s: &mut Self::Moments,
        k: &AdamCoeffs,
    ) -> Result<()>;
    /// Waits for queued work (a no-op where nothing is queued); timing needs it.
    fn synchronize(&self) -> Result<()>;
}
