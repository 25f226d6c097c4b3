//! The layers' forward and backward passes on a [`Backend`]: MLA, the SwiGLU MLP, DeepSeekMoE
//! and the transformer block, computing what `super::super::{mla, mlp, moe, block}` compute on
//! the CPU, with every activation in the backend's memory.
//!
//! The forward pass keeps the activations the backward pass reads (no recomputation: memory is
//! not what limits the step this path serves). Weight gradients are added into the gradient
//! buffers as soon as the backward pass reaches a layer.
//!
//! The MoE router's selection and its backward run on the host, on the `[tokens, experts]`
//! logits: the top-k choice is the CPU gate's, so a step on any backend routes exactly as the
//! CPU model does. Everything per token and per feature stays on the backend.

use std::sync::OnceLock;

use shoal_kernels::Tensor;
use shoal_kernels::backend::{AttnDims, Backend, ColCopy, Gemm};
use shoal_kernels::ops::linear::Precision;
use shoal_kernels::ops::moe_gate::{GateOutput, expert_load, gate_backward, gate_forward};

use super::super::block::{Block, Ffn};
use super::super::ctx::Ctx;
use super::super::mla::{LATENT_NORM_EPS, Mla, QProj};
use super::super::mlp::Mlp;
use super::super::moe::{Moe, MoeStats};
use super::super::params::ParamId;
use crate::{Result, WorkerError};

/// The backend and the parameters: what a forward pass reads.
pub(super) struct Fw<'a, B: Backend> {
    pub be: &'a B,
    pub p: &'a [B::Buf],
    pub shapes: &'a [Vec<usize>],
    /// Host copies of the parameters the host reads (the MoE biases).
    pub host: &'a super::super::params::ParamStore<f32>,
    /// The precision of the linear layers (the router and the head are always FP32).
    pub prec: Precision,
    /// The weights as the mixed-precision linears read them, made on first use.
    pub ops: &'a [OnceLock<B::Weight>],
}

/// A forward view plus the gradient buffers: what a backward pass writes.
pub(super) struct Bw<'a, B: Backend> {
    pub fw: Fw<'a, B>,
    pub g: &'a mut [B::Buf],
}

fn dims2(shape: &[usize]) -> (usize, usize) {
    (
        shape.first().copied().unwrap_or(0),
        shape.get(1).copied().unwrap_or(0),
    )
}

impl<B: Backend> Fw<'_, B> {
    /// `x[rows, in] . W^T` in the model's precision.
    pub fn lin(&self, x: &B::Buf, id: ParamId, rows: usize) -> Result<B::Buf> {
        match self.prec {
            Precision::Fp32 => self.lin32(x, id, rows),
            _ => Ok(self.be.linear_mp(x, self.operand(id)?, rows)?),
        }
    }

    /// `x[rows, in] . W^T` in FP32 (the router and the head).
    pub fn lin32(&self, x: &B::Buf, id: ParamId, rows: usize) -> Result<B::Buf> {
        let (o, i) = dims2(&self.shapes[id.index()]);
        Ok(self
            .be
            .gemm(x, &self.p[id.index()], Gemm::forward(rows, o, i))?)
    }

    /// Weight `id` as the mixed-precision linears read it (made once per step).
    fn operand(&self, id: ParamId) -> Result<&B::Weight> {
        let slot = &self.ops[id.index()];
        if let Some(w) = slot.get() {
            return Ok(w);
        }
        let (o, i) = dims2(&self.shapes[id.index()]);
        let w = self
            .be
            .weight_operand(&self.p[id.index()], o, i, self.prec)
            .map_err(|e| super::named(self.host.name(id), e))?;
        Ok(slot.get_or_init(|| w))
    }

    pub fn norm(&self, x: &B::Buf, id: ParamId, rows: usize, eps: f64) -> Result<B::Buf> {
        let d = self.shapes[id.index()][0];
        Ok(self.be.rmsnorm(x, &self.p[id.index()], rows, d, eps)?)
    }

    /// Copies `groups` column blocks of `width` of every row from `src` (at `from`) into `dst`
    /// (at `to`), adding when `accumulate`.
    #[allow(clippy::too_many_arguments)]
    pub fn copy(
        &self,
        src: &B::Buf,
        from: Cols,
        dst: &mut B::Buf,
        to: Cols,
        rows: usize,
        groups: usize,
        width: usize,
        accumulate: bool,
    ) -> Result<()> {
        Ok(self.be.copy_cols(
            src,
            dst,
            ColCopy {
                rows,
                groups,
                width,
                src_ld: from.ld,
                src_off: from.off,
                src_gs: from.gs,
                dst_ld: to.ld,
                dst_off: to.off,
                dst_gs: to.gs,
                accumulate,
            },
        )?)
    }

    /// The column blocks of `src` at `from` as a new dense `[rows, groups * width]` matrix.
    pub fn take(
        &self,
        src: &B::Buf,
        from: Cols,
        rows: usize,
        groups: usize,
        width: usize,
    ) -> Result<B::Buf> {
        let mut dst = self.be.zeros("columns", rows * groups * width)?;
        self.copy(
            src,
            from,
            &mut dst,
            Cols::dense(groups, width),
            rows,
            groups,
            width,
            false,
        )?;
        Ok(dst)
    }
}

/// Where column blocks sit in a row-major matrix: its row stride, the first block's offset, and
/// the stride between blocks (heads). A stride of 0 repeats one block.
#[derive(Clone, Copy, Debug)]
pub(super) struct Cols {
    pub ld: usize,
    pub off: usize,
    pub gs: usize,
}

impl Cols {
    pub fn at(ld: usize, off: usize, gs: usize) -> Self {
        Self { ld, off, gs }
    }

    /// `groups` blocks of `width` side by side, nothing else on the row.
    pub fn dense(groups: usize, width: usize) -> Self {
        Self::at(groups * width, 0, width)
    }
}

impl<B: Backend> Bw<'_, B> {
    /// B and W of `y = x . W^T` in the model's precision: returns `dx`, adds `dy^T . x` into
    /// W's gradient.
    pub fn lin_b(&mut self, dy: &B::Buf, x: &B::Buf, id: ParamId, rows: usize) -> Result<B::Buf> {
        if self.fw.prec == Precision::Fp32 {
            return self.lin_b32(dy, x, id, rows);
        }
        let be = self.fw.be;
        let w = self.fw.operand(id)?;
        let dx = be.linear_mp_input_grad(dy, w, rows)?;
        be.linear_mp_weight_grad_acc(dy, x, w, rows, &mut self.g[id.index()])?;
        Ok(dx)
    }

    /// B and W of `y = x . W^T` in FP32 (the router and the head).
    pub fn lin_b32(&mut self, dy: &B::Buf, x: &B::Buf, id: ParamId, rows: usize) -> Result<B::Buf> {
        let (o, i) = dims2(&self.fw.shapes[id.index()]);
        let be = self.fw.be;
        let dx = be.gemm(dy, &self.fw.p[id.index()], Gemm::input_grad(rows, o, i))?;
        be.gemm_acc(
            dy,
            x,
            &mut self.g[id.index()],
            Gemm::weight_grad(rows, o, i),
        )?;
        Ok(dx)
    }

    /// RMSNorm's B and W: returns `dx`, adds the weight gradient.
    pub fn norm_b(
        &mut self,
        dy: &B::Buf,
        x: &B::Buf,
        id: ParamId,
        rows: usize,
        eps: f64,
    ) -> Result<B::Buf> {
        let d = self.fw.shapes[id.index()][0];
        Ok(self.fw.be.rmsnorm_backward(
            dy,
            x,
            &self.fw.p[id.index()],
            rows,
            d,
            eps,
            &mut self.g[id.index()],
        )?)
    }
}

/// What MLA's forward keeps.
pub(super) struct MlaSaved<B: Backend> {
    x: B::Buf,
    q_lora: Option<(B::Buf, B::Buf)>,
    c: B::Buf,
    cn: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    out: B::Buf,
    lse: B::Buf,
}

fn attn_dims(m: &Mla, ctx: &Ctx<'_>) -> AttnDims {
    AttnDims {
        batch: ctx.batch,
        seq: ctx.seq,
        heads: m.heads,
        dk: m.nope + m.rope,
        dv: m.v,
        scale: ctx.softmax_scale,
    }
}

/// MLA forward on the normalised input `x: [tokens, hidden]` (takes ownership of `x` to keep it).
pub(super) fn mla_forward<B: Backend>(
    f: &Fw<'_, B>,
    rope: &B::Rope,
    m: &Mla,
    x: B::Buf,
    ctx: &Ctx<'_>,
) -> Result<(B::Buf, MlaSaved<B>)> {
    let t = ctx.tokens();
    let (hd, qk) = (m.heads, m.nope + m.rope);
    let (q, q_lora) = match &m.q {
        QProj::Lora { a, norm, b } => {
            let qa = f.lin(&x, *a, t)?;
            let qn = f.norm(&qa, *norm, t, LATENT_NORM_EPS)?;
            (f.lin(&qn, *b, t)?, Some((qa, qn)))
        }
        QProj::Plain(w) => (f.lin(&x, *w, t)?, None),
    };
    let (ckv_w, kv_w) = (m.kv_lora + m.rope, m.nope + m.v);
    let (ckv_at, q_at, kv_at) = (
        |off| Cols::at(ckv_w, off, 0),
        |off| Cols::at(hd * qk, off, qk),
        |off| Cols::at(hd * kv_w, off, kv_w),
    );
    let ckv = f.lin(&x, m.kv_a, t)?;
    let c = f.take(&ckv, ckv_at(0), t, 1, m.kv_lora)?;
    let k_pe = f.take(&ckv, ckv_at(m.kv_lora), t, 1, m.rope)?;
    let cn = f.norm(&c, m.kv_norm, t, LATENT_NORM_EPS)?;
    let kv = f.lin(&cn, m.kv_b, t)?;
    // Queries: the rope part of every head rotated in place.
    let q_pe = f.take(&q, q_at(m.nope), t, hd, m.rope)?;
    let q_pe =
        f.be.rope(&q_pe, rope, [ctx.batch, ctx.seq, hd, m.rope], false)?;
    let mut q_full = q;
    let rope_cols = Cols::dense(hd, m.rope);
    f.copy(
        &q_pe,
        rope_cols,
        &mut q_full,
        q_at(m.nope),
        t,
        hd,
        m.rope,
        false,
    )?;
    // Keys: each head's nope part, then the one rotated k_pe repeated in every head.
    let k_pe =
        f.be.rope(&k_pe, rope, [ctx.batch, ctx.seq, 1, m.rope], false)?;
    let mut k_full = f.be.zeros("mla.k", t * hd * qk)?;
    f.copy(&kv, kv_at(0), &mut k_full, q_at(0), t, hd, m.nope, false)?;
    f.copy(
        &k_pe,
        Cols::at(m.rope, 0, 0),
        &mut k_full,
        q_at(m.nope),
        t,
        hd,
        m.rope,
        false,
    )?;
    let v = f.take(&kv, kv_at(m.nope), t, hd, m.v)?;
    let (out, lse) = f.be.attention(&q_full, &k_full, &v, attn_dims(m, ctx))?;
    let y = f.lin(&out, m.o, t)?;
    Ok((
        y,
        MlaSaved {
            x,
            q_lora,
            c,
            cn,
            q: q_full,
            k: k_full,
            v,
            out,
            lse,
        },
    ))
}

/// MLA backward: the gradient of the normalised input.
pub(super) fn mla_backward<B: Backend>(
    w: &mut Bw<'_, B>,
    rope: &B::Rope,
    m: &Mla,
    s: MlaSaved<B>,
    dy: &B::Buf,
    ctx: &Ctx<'_>,
) -> Result<B::Buf> {
    let t = ctx.tokens();
    let (hd, qk) = (m.heads, m.nope + m.rope);
    let (be, kv_w, ckv_w) = (w.fw.be, m.nope + m.v, m.kv_lora + m.rope);
    let d_out = w.lin_b(dy, &s.out, m.o, t)?;
    let (mut dq, dk, dv) =
        be.attention_backward(&d_out, &s.q, &s.k, &s.v, &s.out, &s.lse, attn_dims(m, ctx))?;
    let (q_at, kv_at) = (
        |off| Cols::at(hd * qk, off, qk),
        |off| Cols::at(hd * kv_w, off, kv_w),
    );
    // Undo the assembly: the rope parts rotated back, the shared key's gradient summed over heads.
    let f = &w.fw;
    let dq_pe = f.take(&dq, q_at(m.nope), t, hd, m.rope)?;
    let dq_pe = be.rope(&dq_pe, rope, [ctx.batch, ctx.seq, hd, m.rope], true)?;
    f.copy(
        &dq_pe,
        Cols::dense(hd, m.rope),
        &mut dq,
        q_at(m.nope),
        t,
        hd,
        m.rope,
        false,
    )?;
    let mut dk_pe = be.zeros("mla.dk_pe", t * m.rope)?;
    for h in 0..hd {
        // One head at a time: the heads add into the same values.
        let head = Cols::at(hd * qk, h * qk + m.nope, 0);
        f.copy(
            &dk,
            head,
            &mut dk_pe,
            Cols::dense(1, m.rope),
            t,
            1,
            m.rope,
            true,
        )?;
    }
    let dk_pe = be.rope(&dk_pe, rope, [ctx.batch, ctx.seq, 1, m.rope], true)?;
    let mut dkv = be.zeros("mla.dkv", t * hd * kv_w)?;
    f.copy(&dk, q_at(0), &mut dkv, kv_at(0), t, hd, m.nope, false)?;
    f.copy(
        &dv,
        Cols::dense(hd, m.v),
        &mut dkv,
        kv_at(m.nope),
        t,
        hd,
        m.v,
        false,
    )?;
    let dcn = w.lin_b(&dkv, &s.cn, m.kv_b, t)?;
    let dc = w.norm_b(&dcn, &s.c, m.kv_norm, t, LATENT_NORM_EPS)?;
    let mut dckv = be.zeros("mla.dckv", t * ckv_w)?;
    let ckv_at = |off| Cols::at(ckv_w, off, 0);
    let f = &w.fw;
    f.copy(
        &dc,
        Cols::dense(1, m.kv_lora),
        &mut dckv,
        ckv_at(0),
        t,
        1,
        m.kv_lora,
        false,
    )?;
    f.copy(
        &dk_pe,
        Cols::dense(1, m.rope),
        &mut dckv,
        ckv_at(m.kv_lora),
        t,
        1,
        m.rope,
        false,
    )?;
    let mut dx = w.lin_b(&dckv, &s.x, m.kv_a, t)?;
    let dx_q = match (&m.q, &s.q_lora) {
        (QProj::Lora { a, norm, b }, Some((qa, qn))) => {
            let dqn = w.lin_b(&dq, qn, *b, t)?;
            let dqa = w.norm_b(&dqn, qa, *norm, t, LATENT_NORM_EPS)?;
            w.lin_b(&dqa, &s.x, *a, t)?
        }
        (QProj::Plain(wq), None) => w.lin_b(&dq, &s.x, *wq, t)?,
        _ => {
            return Err(WorkerError::invalid(
                "mla",
                "saved state of another query projection",
            ));
        }
    };
    be.add_into(&mut dx, &dx_q)?;
    Ok(dx)
}

/// What a SwiGLU MLP's forward keeps.
pub(super) struct MlpSaved<B: Backend> {
    x: B::Buf,
    g: B::Buf,
    u: B::Buf,
    act: B::Buf,
}

pub(super) fn mlp_forward<B: Backend>(
    f: &Fw<'_, B>,
    m: &Mlp,
    x: B::Buf,
    rows: usize,
) -> Result<(B::Buf, MlpSaved<B>)> {
    let g = f.lin(&x, m.gate, rows)?;
    let u = f.lin(&x, m.up, rows)?;
    let act = f.be.swiglu(&g, &u)?;
    let y = f.lin(&act, m.down, rows)?;
    Ok((y, MlpSaved { x, g, u, act }))
}

pub(super) fn mlp_backward<B: Backend>(
    w: &mut Bw<'_, B>,
    m: &Mlp,
    s: MlpSaved<B>,
    dy: &B::Buf,
    rows: usize,
) -> Result<B::Buf> {
    let dact = w.lin_b(dy, &s.act, m.down, rows)?;
    let (dg, du) = w.fw.be.swiglu_backward(&s.g, &s.u, &dact)?;
    let mut dx = w.lin_b(&dg, &s.x, m.gate, rows)?;
    let dxu = w.lin_b(&du, &s.x, m.up, rows)?;
    w.fw.be.add_into(&mut dx, &dxu)?;
    Ok(dx)
}

struct ExpertSaved<B: Backend> {
    rows: Vec<usize>,
    slots: Vec<usize>,
    idx: B::Ids,
    weights: B::Buf,
    mlp: MlpSaved<B>,
    out: B::Buf,
}

/// What an MoE layer's forward keeps.
pub(super) struct MoeSaved<B: Backend> {
    x: B::Buf,
    gate: GateOutput<f32>,
    experts: Vec<Option<ExpertSaved<B>>>,
    shared: Option<MlpSaved<B>>,
}

pub(super) fn moe_forward<B: Backend>(
    f: &Fw<'_, B>,
    m: &Moe,
    x: B::Buf,
    ctx: &Ctx<'_>,
) -> Result<(B::Buf, MoeSaved<B>, MoeStats)> {
    let t = ctx.tokens();
    let (e, k) = (m.gate.n_routed_experts, m.gate.top_k);
    let hidden = f.shapes[m.router.index()][1];
    let logits = f.be.download("moe.logits", &f.lin32(&x, m.router, t)?)?;
    let gate = gate_forward(
        &Tensor::new([t, e], logits)?,
        f.host.get(m.bias).data(),
        &m.gate,
    )?;
    let mut by_expert: Vec<(Vec<usize>, Vec<usize>)> = vec![(Vec::new(), Vec::new()); e];
    for (pos, &ex) in gate.indices.iter().enumerate() {
        let (rows, slots) = &mut by_expert[ex as usize];
        rows.push(pos / k);
        slots.push(pos % k);
    }
    let (mut y, shared) = match &m.shared {
        Some(sm) => {
            // The shared experts keep their own copy of x; the router keeps the original.
            let (y, s) = mlp_forward(f, sm, clone_buf(f.be, &x)?, t)?;
            (y, Some(s))
        }
        None => (f.be.zeros("moe.y", t * hidden)?, None),
    };
    // Experts in order: each adds its weighted output into its tokens' rows (distinct within one
    // expert), so the sums are in expert order, as on the CPU.
    let mut experts = Vec::with_capacity(e);
    for (j, (rows, slots)) in by_expert.into_iter().enumerate() {
        if rows.is_empty() {
            experts.push(None);
            continue;
        }
        let n = rows.len();
        let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx = f.be.upload_ids("moe.rows", &ids)?;
        let wts: Vec<f32> = rows
            .iter()
            .zip(&slots)
            .map(|(&r, &s)| gate.weights.data()[r * k + s])
            .collect();
        let weights = f.be.upload("moe.weights", &wts)?;
        let xe = f.be.gather_rows(&x, &idx, n, hidden, None)?;
        let (out, mlp) = mlp_forward(f, &m.experts[j], xe, n)?;
        f.be.scatter_add_rows(&out, &idx, n, hidden, Some(&weights), &mut y)?;
        experts.push(Some(ExpertSaved {
            rows,
            slots,
            idx,
            weights,
            mlp,
            out,
        }));
    }
    let stats = MoeStats {
        load: expert_load(&gate.indices, e),
        balance: m.balance(&gate, ctx, None)?,
    };
    Ok((
        y,
        MoeSaved {
            x,
            gate,
            experts,
            shared,
        },
        stats,
    ))
}

/// A copy of a buffer, made on the backend.
fn clone_buf<B: Backend>(be: &B, x: &B::Buf) -> Result<B::Buf> {
    let n = be.numel(x);
    let mut y = be.zeros("copy", n)?;
    be.add_into(&mut y, x)?;
    Ok(y)
}

pub(super) fn moe_backward<B: Backend>(
    w: &mut Bw<'_, B>,
    m: &Moe,
    s: MoeSaved<B>,
    dy: &B::Buf,
    ctx: &Ctx<'_>,
) -> Result<B::Buf> {
    let t = ctx.tokens();
    let k = m.gate.top_k;
    let hidden = w.fw.shapes[m.router.index()][1];
    let be = w.fw.be;
    let mut dx = match (&m.shared, s.shared) {
        (Some(sm), Some(ss)) => mlp_backward(w, sm, ss, dy, t)?,
        _ => be.zeros("moe.dx", t * hidden)?,
    };
    // The gate weights' gradients, `<dy[token], out[expert, token]>`: every expert's outputs side
    // by side, one dot-product call for the layer (a device waits once, not once per expert).
    let routed: usize = s.experts.iter().flatten().map(|es| es.rows.len()).sum();
    let mut outs = be.zeros("moe.outs", routed * hidden)?;
    let mut places: Vec<(usize, usize)> = Vec::with_capacity(routed);
    for (j, es) in s.experts.into_iter().enumerate() {
        let Some(es) = es else { continue };
        let n = es.rows.len();
        w.fw.copy(
            &es.out,
            Cols::dense(1, hidden),
            &mut outs,
            Cols::at(hidden, places.len() * hidden, 0),
            n,
            1,
            hidden,
            false,
        )?;
        places.extend(es.rows.iter().zip(&es.slots).map(|(&r, &slot)| (r, slot)));
        let dye = be.gather_rows(dy, &es.idx, n, hidden, Some(&es.weights))?;
        let dxe = mlp_backward(w, &m.experts[j], es.mlp, &dye, n)?;
        be.scatter_add_rows(&dxe, &es.idx, n, hidden, None, &mut dx)?;
    }
    let mut dweights = vec![0f32; t * k];
    let tokens: Vec<u32> = places.iter().map(|&(r, _)| r as u32).collect();
    let idx = be.upload_ids("moe.rows", &tokens)?;
    let dots = be.row_dots(dy, &idx, &outs, routed, hidden)?;
    for (&(r, slot), d) in places.iter().zip(dots) {
        dweights[r * k + slot] = d;
    }
    // The router: gate weights and the balance loss back to the logits on the host, then the
    // FP32 router's B and W on the backend.
    let e = m.gate.n_routed_experts;
    let mut dlogits = gate_backward(&Tensor::new([t, k], dweights)?, &s.gate, &m.gate)?;
    if ctx.balance_alpha != 0.0 {
        m.balance(&s.gate, ctx, Some((&mut dlogits, ctx.balance_alpha)))?;
    }
    if dlogits.shape() != [t, e] {
        return Err(WorkerError::invalid(
            "moe.router",
            "gradient of another shape",
        ));
    }
    let dl = be.upload("moe.dlogits", dlogits.data())?;
    let dxr = w.lin_b32(&dl, &s.x, m.router, t)?;
    be.add_into(&mut dx, &dxr)?;
    Ok(dx)
}

enum FfnSaved<B: Backend> {
    Dense(MlpSaved<B>),
    Moe(MoeSaved<B>),
}

/// What a block's forward keeps.
pub(super) struct BlockSaved<B: Backend> {
    h: B::Buf,
    h1: B::Buf,
    attn: MlaSaved<B>,
    ffn: FfnSaved<B>,
}

/// A block on the residual stream `h: [tokens, hidden]`.
pub(super) fn block_forward<B: Backend>(
    f: &Fw<'_, B>,
    rope: &B::Rope,
    blk: &Block,
    h: B::Buf,
    ctx: &Ctx<'_>,
) -> Result<(B::Buf, BlockSaved<B>, Option<MoeStats>)> {
    let t = ctx.tokens();
    let x = f.norm(&h, blk.in_norm, t, ctx.eps)?;
    let (mut h1, attn) = mla_forward(f, rope, &blk.attn, x, ctx)?;
    f.be.add_into(&mut h1, &h)?;
    let x2 = f.norm(&h1, blk.post_norm, t, ctx.eps)?;
    let (mut h2, ffn, stats) = match &blk.ffn {
        Ffn::Dense(m) => {
            let (y, s) = mlp_forward(f, m, x2, t)?;
            (y, FfnSaved::Dense(s), None)
        }
        Ffn::Moe(m) => {
            let (y, s, st) = moe_forward(f, m, x2, ctx)?;
            (y, FfnSaved::Moe(s), Some(st))
        }
    };
    f.be.add_into(&mut h2, &h1)?;
    Ok((h2, BlockSaved { h, h1, attn, ffn }, stats))
}

/// A block's backward: the gradient of its input.
pub(super) fn block_backward<B: Backend>(
    w: &mut Bw<'_, B>,
    rope: &B::Rope,
    blk: &Block,
    s: BlockSaved<B>,
    dh2: &B::Buf,
    ctx: &Ctx<'_>,
) -> Result<B::Buf> {
    let t = ctx.tokens();
    let be = w.fw.be;
    let dx2 = match (&blk.ffn, s.ffn) {
        (Ffn::Dense(m), FfnSaved::Dense(ms)) => mlp_backward(w, m, ms, dh2, t)?,
        (Ffn::Moe(m), FfnSaved::Moe(ms)) => moe_backward(w, m, ms, dh2, ctx)?,
        _ => return Err(WorkerError::invalid("block", "saved state of another kind")),
    };
    let mut dh1 = w.norm_b(&dx2, &s.h1, blk.post_norm, t, ctx.eps)?;
    be.add_into(&mut dh1, dh2)?;
    let dx = mla_backward(w, rope, &blk.attn, s.attn, &dh1, ctx)?;
    let mut dh = w.norm_b(&dx, &s.h, blk.in_norm, t, ctx.eps)?;
    be.add_into(&mut dh, &dh1)?;
    Ok(dh)
}
