//! Multi-head Latent Attention (DeepSeek-V2/V3).
//!
//! Queries and keys/values go through low-rank compressions: `q = W_qb · norm(W_qa · x)` and
//! `[c_kv | k_pe] = W_kva · x`, `[k_nope | v] = W_kvb · norm(c_kv)` per head. RoPE is decoupled:
//! it applies only to the `qk_rope_head_dim` part of each query head and to `k_pe`, a single key
//! shared by all heads. Each head attends with `[q_nope | rope(q_pe)] · [k_nope | rope(k_pe)]`.
//!
//! Memory as in the report: the forward pass keeps only the compressed `W_qa · x` and
//! `[c_kv | k_pe]`, the attention output and its log-sum-exp; the backward pass recomputes the
//! norms and the up-projections.

use shoal_kernels::Tensor;
use shoal_kernels::ops::attention::{AttentionSaved, attention_backward, attention_forward};
use shoal_kernels::ops::rmsnorm::rmsnorm_forward;
use shoal_kernels::ops::rope::{rope_backward, rope_forward};
use shoal_spec::ModelConfig;

use super::ctx::Ctx;
use super::linear::ModelFloat;
use super::params::{Init, Layout, ParamId, ParamStore, Trainable};
use super::tensor_ops::{join_groups, repeat_groups, split_groups, sum_groups};
use super::wgrad::{WTask, linear_b, rmsnorm_b};
use crate::Result;

/// Hugging Face's `q_a_layernorm` and `kv_a_layernorm` use the RMSNorm default epsilon whatever
/// `rms_norm_eps` says; so do DeepSeek's reference implementation and Shoal.
pub(super) const LATENT_NORM_EPS: f64 = 1e-6;

/// Query projection: compressed (`q_lora_rank`) or plain.
#[derive(Clone, Debug)]
pub(super) enum QProj {
    Lora {
        a: ParamId,
        norm: ParamId,
        b: ParamId,
    },
    Plain(ParamId),
}

/// The two parts of a two-way [`split_groups`].
fn two<T>(parts: Vec<Tensor<T>>) -> Result<[Tensor<T>; 2]> {
    parts
        .try_into()
        .map_err(|_| crate::WorkerError::invalid("mla", "expected a two-way split"))
}

/// One MLA layer's parameters.
#[derive(Clone, Debug)]
pub struct Mla {
    pub(super) q: QProj,
    pub(super) kv_a: ParamId,
    pub(super) kv_norm: ParamId,
    pub(super) kv_b: ParamId,
    pub(super) o: ParamId,
    pub(super) heads: usize,
    pub(super) nope: usize,
    pub(super) rope: usize,
    pub(super) v: usize,
    pub(super) kv_lora: usize,
}

/// What the forward pass keeps for backward.
#[derive(Debug)]
pub struct MlaSaved<T> {
    q_a: Option<Tensor<T>>,
    ckv: Tensor<T>,
    out: Tensor<T>,
    lse: AttentionSaved<T>,
}

/// Queries before RoPE and, with compression, the compressed query before and after its norm.
struct Queries<T> {
    q: Tensor<T>,
    q_a: Option<Tensor<T>>,
    qn: Option<Tensor<T>>,
}

/// The key/value path: latent `c`, RoPE key `k_pe`, normalised latent `cn`, up-projection `kv`.
struct KeysValues<T> {
    c: Tensor<T>,
    k_pe: Tensor<T>,
    cn: Tensor<T>,
    kv: Tensor<T>,
}

struct Assembled<T> {
    q: Tensor<T>,
    k: Tensor<T>,
    v: Tensor<T>,
}

impl Mla {
    /// Declares the parameters under `prefix` (e.g. `model.layers.0.self_attn`).
    pub fn declare(layout: &mut Layout, prefix: &str, cfg: &ModelConfig) -> Self {
        let (h, heads) = (cfg.hidden_size, cfg.num_attention_heads);
        let std = cfg.initializer_range;
        let mut lin = |name: &str, out: usize, inp: usize| {
            layout.add(
                format!("{prefix}.{name}.weight"),
                vec![out, inp],
                Init::Normal(std),
                Trainable::Yes,
            )
        };
        let qk = cfg.qk_head_dim();
        let q = match cfg.q_lora_rank {
            Some(r) => {
                let a = lin("q_a_proj", r, h);
                let b = lin("q_b_proj", heads * qk, r);
                let norm = layout.add(
                    format!("{prefix}.q_a_layernorm.weight"),
                    vec![r],
                    Init::Ones,
                    Trainable::Yes,
                );
                QProj::Lora { a, norm, b }
            }
            None => QProj::Plain(lin("q_proj", heads * qk, h)),
        };
        let mut lin = |name: &str, out: usize, inp: usize| {
            layout.add(
                format!("{prefix}.{name}.weight"),
                vec![out, inp],
                Init::Normal(std),
                Trainable::Yes,
            )
        };
        let kv_a = lin(
            "kv_a_proj_with_mqa",
            cfg.kv_lora_rank + cfg.qk_rope_head_dim,
            h,
        );
        let kv_b = lin(
            "kv_b_proj",
            heads * (cfg.qk_nope_head_dim + cfg.v_head_dim),
            cfg.kv_lora_rank,
        );
        let o = lin("o_proj", h, heads * cfg.v_head_dim);
        let kv_norm = layout.add(
            format!("{prefix}.kv_a_layernorm.weight"),
            vec![cfg.kv_lora_rank],
            Init::Ones,
            Trainable::Yes,
        );
        Self {
            q,
            kv_a,
            kv_norm,
            kv_b,
            o,
            heads,
            nope: cfg.qk_nope_head_dim,
            rope: cfg.qk_rope_head_dim,
            v: cfg.v_head_dim,
            kv_lora: cfg.kv_lora_rank,
        }
    }

    /// Queries before RoPE, `[tokens, heads * (nope + rope)]`, and the compressed query.
    fn queries<T: ModelFloat>(
        &self,
        p: &ParamStore<T>,
        x: &Tensor<T>,
        q_a: Option<&Tensor<T>>,
        ctx: &Ctx<'_>,
    ) -> Result<Queries<T>> {
        match &self.q {
            QProj::Lora { a, norm, b } => {
                let qa = match q_a {
                    Some(t) => t.clone(),
                    None => T::linear(x, p, *a, ctx.precision)?,
                };
                let qn = rmsnorm_forward(&qa, p.get(*norm), LATENT_NORM_EPS)?;
                let q = T::linear(&qn, p, *b, ctx.precision)?;
                Ok(Queries {
                    q,
                    q_a: Some(qa),
                    qn: Some(qn),
                })
            }
            QProj::Plain(w) => Ok(Queries {
                q: T::linear(x, p, *w, ctx.precision)?,
                q_a: None,
                qn: None,
            }),
        }
    }

    /// RoPE, or its inverse for backward, on `[tokens, heads * rope]` rows.
    fn rotate<T: ModelFloat>(
        &self,
        x: Tensor<T>,
        heads: usize,
        ctx: &Ctx<'_>,
        inverse: bool,
    ) -> Result<Tensor<T>> {
        let (b, s) = (ctx.batch, ctx.seq);
        let x = x.reshape([b, s, heads, self.rope])?;
        let y = if inverse {
            rope_backward(&x, ctx.rope, ctx.rope_layout, 0)?
        } else {
            rope_forward(&x, ctx.rope, ctx.rope_layout, 0)?
        };
        Ok(y.reshape([b * s, heads * self.rope])?)
    }

    fn assemble<T: ModelFloat>(
        &self,
        q: &Tensor<T>,
        k_pe: &Tensor<T>,
        kv: &Tensor<T>,
        ctx: &Ctx<'_>,
    ) -> Result<Assembled<T>> {
        let (b, s, hd) = (ctx.batch, ctx.seq, self.heads);
        let [q_nope, q_pe] = two(split_groups(q, hd, &[self.nope, self.rope])?)?;
        let q_pe = self.rotate(q_pe, hd, ctx, false)?;
        let q_full =
            join_groups(&[&q_nope, &q_pe], hd)?.reshape([b, s, hd, self.nope + self.rope])?;
        let k_pe = self.rotate(k_pe.clone(), 1, ctx, false)?;
        let [k_nope, v] = two(split_groups(kv, hd, &[self.nope, self.v])?)?;
        let k_full = join_groups(&[&k_nope, &repeat_groups(&k_pe, hd)?], hd)?.reshape([
            b,
            s,
            hd,
            self.nope + self.rope,
        ])?;
        let v = v.reshape([b, s, hd, self.v])?;
        Ok(Assembled {
            q: q_full,
            k: k_full,
            v,
        })
    }

    fn keys_values<T: ModelFloat>(
        &self,
        p: &ParamStore<T>,
        ckv: &Tensor<T>,
        ctx: &Ctx<'_>,
    ) -> Result<KeysValues<T>> {
        let [c, k_pe] = two(split_groups(ckv, 1, &[self.kv_lora, self.rope])?)?;
        let cn = rmsnorm_forward(&c, p.get(self.kv_norm), LATENT_NORM_EPS)?;
        let kv = T::linear(&cn, p, self.kv_b, ctx.precision)?;
        Ok(KeysValues { c, k_pe, cn, kv })
    }

    /// Forward on the normalised input `x: [tokens, hidden]`.
    pub fn forward<T: ModelFloat>(
        &self,
        p: &ParamStore<T>,
        x: &Tensor<T>,
        ctx: &Ctx<'_>,
    ) -> Result<(Tensor<T>, MlaSaved<T>)> {
        let Queries { q, q_a, .. } = self.queries(p, x, None, ctx)?;
        let ckv = T::linear(x, p, self.kv_a, ctx.precision)?;
        let KeysValues { k_pe, kv, .. } = self.keys_values(p, &ckv, ctx)?;
        let a = self.assemble(&q, &k_pe, &kv, ctx)?;
        let (out, lse) = {
            let _span = tracing::debug_span!("attention.core").entered();
            attention_forward(&a.q, &a.k, &a.v, ctx.softmax_scale)?
        };
        let out = out.reshape([ctx.tokens(), self.heads * self.v])?;
        let y = T::linear(&out, p, self.o, ctx.precision)?;
        Ok((y, MlaSaved { q_a, ckv, out, lse }))
    }

    /// B pass: the gradient of the normalised input; pushes the W work onto `w`.
    pub fn backward<T: ModelFloat>(
        &self,
        p: &ParamStore<T>,
        x: Tensor<T>,
        saved: MlaSaved<T>,
        dy: Tensor<T>,
        ctx: &Ctx<'_>,
        w: &mut Vec<WTask<T>>,
    ) -> Result<Tensor<T>> {
        let prec = ctx.precision;
        let (b, s, hd) = (ctx.batch, ctx.seq, self.heads);
        // Recompute the norms and up-projections.
        let span = tracing::debug_span!("mla.recompute").entered();
        let Queries { q, q_a, qn } = self.queries(p, &x, saved.q_a.as_ref(), ctx)?;
        let KeysValues { c, k_pe, cn, kv } = self.keys_values(p, &saved.ckv, ctx)?;
        let a = self.assemble(&q, &k_pe, &kv, ctx)?;
        drop(span);
        let span = tracing::debug_span!("mla.o_proj").entered();

        // o_proj.
        let out4 = saved.out.clone().reshape([b, s, hd, self.v])?;
        let d_out = linear_b(p, self.o, dy, T::save(saved.out, prec)?, prec, w)?;
        drop(span);
        // Attention core.
        let core_span = tracing::debug_span!("attention.core").entered();
        let (dq, dk, dv) = attention_backward(
            &d_out.reshape([b, s, hd, self.v])?,
            &a.q,
            &a.k,
            &a.v,
            &out4,
            &saved.lse,
            ctx.softmax_scale,
        )?;
        drop(core_span);
        let (dq, dk, dv) = (
            dq.reshape([b * s, hd * (self.nope + self.rope)])?,
            dk.reshape([b * s, hd * (self.nope + self.rope)])?,
            dv.reshape([b * s, hd * self.v])?,
        );
        let span = tracing::debug_span!("mla.unassemble").entered();
        // Undo the assembly: RoPE backward on the rope parts, the shared key's gradient summed
        // over heads.
        let [dq_nope, dq_pe] = two(split_groups(&dq, hd, &[self.nope, self.rope])?)?;
        let dq = join_groups(&[&dq_nope, &self.rotate(dq_pe, hd, ctx, true)?], hd)?;
        let [dk_nope, dk_pe] = two(split_groups(&dk, hd, &[self.nope, self.rope])?)?;
        let dk_pe = self.rotate(sum_groups(&dk_pe, hd)?, 1, ctx, true)?;
        let dkv = join_groups(&[&dk_nope, &dv], hd)?;

        drop(span);
        let span = tracing::debug_span!("mla.kv").entered();
        // kv_b_proj and kv_a_layernorm.
        let dcn = linear_b(p, self.kv_b, dkv, T::save(cn, prec)?, prec, w)?;
        let dc = rmsnorm_b(
            p.get(self.kv_norm),
            self.kv_norm,
            dcn,
            c,
            LATENT_NORM_EPS,
            w,
        )?;
        let dckv = join_groups(&[&dc, &dk_pe], 1)?;
        let x_saved = T::save(x, prec)?;
        let mut dx = linear_b(p, self.kv_a, dckv, x_saved.clone(), prec, w)?;

        drop(span);
        let _span = tracing::debug_span!("mla.q").entered();
        // Query path.
        let dx_q = match (&self.q, q_a, qn) {
            (QProj::Lora { a, norm, b }, Some(qa), Some(qn)) => {
                let dqn = linear_b(p, *b, dq, T::save(qn, prec)?, prec, w)?;
                let dqa = rmsnorm_b(p.get(*norm), *norm, dqn, qa, LATENT_NORM_EPS, w)?;
                linear_b(p, *a, dqa, x_saved, prec, w)?
            }
            (QProj::Plain(wq), _, _) => linear_b(p, *wq, dq, x_saved, prec, w)?,
            _ => {
                return Err(crate::WorkerError::invalid(
                    "mla",
                    "compressed query was not kept",
                ));
            }
        };
        dx.add_assign(&dx_q, "mla.dx")?;
        Ok(dx)
    }
}
