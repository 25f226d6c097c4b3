//! A transformer block: `h1 = h + MLA(norm(h))`, `h2 = h1 + FFN(norm(h1))`, where the FFN is a
//! dense SwiGLU MLP or DeepSeekMoE. Only `h` and `h1` are kept; the norms are recomputed in
//! backward.

use shoal_kernels::Tensor;
use shoal_kernels::ops::rmsnorm::rmsnorm_forward;
use shoal_spec::ModelConfig;

use super::ctx::Ctx;
use super::linear::ModelFloat;
use super::mla::{Mla, MlaSaved};
use super::mlp::{Mlp, MlpSaved};
use super::moe::{Moe, MoeSaved, MoeStats};
use super::params::{Init, Layout, ParamId, ParamStore, Trainable};
use super::tensor_ops::add;
use super::wgrad::{WTask, rmsnorm_b};
use crate::Result;

/// The feed-forward half of a block.
#[derive(Clone, Debug)]
pub enum Ffn {
    /// A dense SwiGLU MLP (the first `first_k_dense_replace` layers).
    Dense(Mlp),
    /// DeepSeekMoE.
    Moe(Moe),
}

/// One transformer block.
#[derive(Clone, Debug)]
pub struct Block {
    pub(super) in_norm: ParamId,
    pub(super) attn: Mla,
    pub(super) post_norm: ParamId,
    pub(super) ffn: Ffn,
}

enum FfnSaved<T> {
    Dense(MlpSaved<T>),
    Moe(MoeSaved<T>),
}

/// What the forward pass keeps.
pub struct BlockSaved<T> {
    h: Tensor<T>,
    h1: Tensor<T>,
    attn: MlaSaved<T>,
    ffn: FfnSaved<T>,
}

impl Block {
    /// Declares layer `prefix` (e.g. `model.layers.3`); `moe` picks the FFN kind.
    pub fn declare(layout: &mut Layout, prefix: &str, cfg: &ModelConfig, moe: bool) -> Self {
        let h = cfg.hidden_size;
        let attn = Mla::declare(layout, &format!("{prefix}.self_attn"), cfg);
        let ffn = if moe {
            Ffn::Moe(Moe::declare(layout, &format!("{prefix}.mlp"), cfg))
        } else {
            Ffn::Dense(Mlp::declare(
                layout,
                &format!("{prefix}.mlp"),
                h,
                cfg.intermediate_size,
                cfg.initializer_range,
            ))
        };
        let in_norm = layout.add(
            format!("{prefix}.input_layernorm.weight"),
            vec![h],
            Init::Ones,
            Trainable::Yes,
        );
        let post_norm = layout.add(
            format!("{prefix}.post_attention_layernorm.weight"),
            vec![h],
            Init::Ones,
            Trainable::Yes,
        );
        Self {
            in_norm,
            attn,
            post_norm,
            ffn,
        }
    }

    /// The MoE layer, if this is an MoE block.
    pub fn moe(&self) -> Option<&Moe> {
        match &self.ffn {
            Ffn::Moe(m) => Some(m),
            Ffn::Dense(_) => None,
        }
    }

    /// Forward on the residual stream `h: [tokens, hidden]`.
    pub fn forward<T: ModelFloat>(
        &self,
        p: &ParamStore<T>,
        h: Tensor<T>,
        ctx: &Ctx<'_>,
    ) -> Result<(Tensor<T>, BlockSaved<T>, Option<MoeStats>)> {
        let attn_span = tracing::debug_span!("attn.forward").entered();
        let x = rmsnorm_forward(&h, p.get(self.in_norm), ctx.eps)?;
        let (a, attn) = self.attn.forward(p, &x, ctx)?;
        drop(attn_span);
        let _span = tracing::debug_span!("ffn.forward").entered();
        let h1 = add(&h, &a)?;
        let x2 = rmsnorm_forward(&h1, p.get(self.post_norm), ctx.eps)?;
        let (f, ffn, stats) = match &self.ffn {
            Ffn::Dense(m) => {
                let (f, s) = m.forward(p, &x2, ctx)?;
                (f, FfnSaved::Dense(s), None)
            }
            Ffn::Moe(m) => {
                let (f, s, st) = m.forward(p, &x2, ctx)?;
                (f, FfnSaved::Moe(s), Some(st))
            }
        };
        let h2 = add(&h1, &f)?;
        Ok((h2, BlockSaved { h, h1, attn, ffn }, stats))
    }

    /// B pass: the gradient of the block's input; pushes the W work.
    pub fn backward<T: ModelFloat>(
        &self,
        p: &ParamStore<T>,
        saved: BlockSaved<T>,
        dh2: Tensor<T>,
        ctx: &Ctx<'_>,
        w: &mut Vec<WTask<T>>,
    ) -> Result<Tensor<T>> {
        let ffn_span = tracing::debug_span!("ffn.backward").entered();
        let x2 = rmsnorm_forward(&saved.h1, p.get(self.post_norm), ctx.eps)?;
        let dx2 = match (&self.ffn, saved.ffn) {
            (Ffn::Dense(m), FfnSaved::Dense(s)) => {
                m.backward(p, T::save(x2, ctx.precision)?, s, dh2.clone(), ctx, w)?
            }
            (Ffn::Moe(m), FfnSaved::Moe(s)) => m.backward(p, x2, s, dh2.clone(), ctx, w)?,
            _ => {
                return Err(crate::WorkerError::invalid(
                    "block",
                    "saved state of another kind",
                ));
            }
        };
        let mut dh1 = rmsnorm_b(
            p.get(self.post_norm),
            self.post_norm,
            dx2,
            saved.h1,
            ctx.eps,
            w,
        )?;
        dh1.add_assign(&dh2, "block.dh1")?;
        drop(ffn_span);
        let _span = tracing::debug_span!("attn.backward").entered();
        let x = rmsnorm_forward(&saved.h, p.get(self.in_norm), ctx.eps)?;
        let dx = self.attn.backward(p, x, saved.attn, dh1.clone(), ctx, w)?;
        let mut dh = rmsnorm_b(p.get(self.in_norm), self.in_norm, dx, saved.h, ctx.eps, w)?;
        dh.add_assign(&dh1, "block.dh")?;
        Ok(dh)
    }
}
