//! The model's training step on a compute [`Backend`]: parameters, gradients, AdamW moments and
//! activations live in the backend's memory (a GPU's, with `shoal_kernels::cuda::Gpu`), and one
//! step is a forward pass, a backward pass, the global-norm clipping, AdamW and the expert-bias
//! update, as [`crate::train::Trainer`] computes them on the CPU for one data-parallel rank.
//!
//! [`DeviceModel`] runs the whole model (embedding, MLA and dense/MoE blocks, the head and the
//! MTP modules) in the model's precision, as the CPU model does: under BF16 and FP8 the linear
//! layers of MLA, the MLPs, the experts and the MTP projections are the backend's
//! mixed-precision linears (each weight converted once per step), while the router and the
//! output head stay FP32 GEMMs, like the norms, attention and everything else. The router's
//! top-k selection runs on the host (see `layers.rs`). Pipeline and expert parallelism are the
//! CPU path's only.

mod layers;

use shoal_kernels::Tensor;
use shoal_kernels::backend::Backend;
use shoal_kernels::ops::adamw::{
    AdamCoeffs, AdamWConfig, Moments, clip_coefficient, moment_precision,
};
use std::sync::OnceLock;

use self::layers::{BlockSaved, Bw, Cols, Fw, block_backward, block_forward};
use super::params::ParamId;
use super::{Model, Objective, StepOutput, TokenBatch, split_micro};
use crate::{Result, WorkerError};
use shoal_kernels::ops::linear::Precision;

/// What one device step computed.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceStep {
    /// Losses and expert loads of the step's batch.
    pub out: StepOutput,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// The hyper-parameters of one optimizer step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepHyper {
    /// Learning rate of this step.
    pub lr: f32,
    /// AdamW (weight decay applies to matrices only; `bf16_moments` must be the precision the
    /// device model stores its moments in).
    pub adamw: AdamWConfig,
    /// Clip the global gradient norm to this.
    pub grad_clip: f32,
    /// Expert-bias update speed.
    pub gamma: f32,
    /// Micro-batches the batch is split into (by sequences), run one after another.
    pub micro_batches: usize,
    /// Loss weights.
    pub obj: Objective,
}

/// One MTP depth's forward state.
struct MtpSaved<B: Backend> {
    len: usize,
    prev_len: usize,
    ids: Vec<u32>,
    prefix: B::Ids,
    e: B::Buf,
    prev: B::Buf,
    cat: B::Buf,
    block: BlockSaved<B>,
    out: B::Buf,
    hn: B::Buf,
    targets: B::Ids,
    logits: B::Buf,
    ce: B::Ce,
}

/// A forward pass's state and measurements.
struct Forward<B: Backend> {
    blocks: Vec<BlockSaved<B>>,
    h: B::Buf,
    hn: B::Buf,
    logits: B::Buf,
    targets: B::Ids,
    ce: B::Ce,
    mtp: Vec<MtpSaved<B>>,
    out: StepOutput,
}

/// The model on a backend. See the module documentation.
pub struct DeviceModel<B: Backend> {
    be: B,
    /// The structure and configuration; its parameter store keeps only what the host reads (the
    /// MoE biases), the rest is released.
    model: Model<f32>,
    shapes: Vec<Vec<usize>>,
    p: Vec<B::Buf>,
    g: Vec<B::Buf>,
    /// Each parameter's AdamW moments (empty for frozen ones), in BF16 when `bf16_moments`.
    s: Vec<B::Moments>,
    bf16_moments: bool,
    rope: B::Rope,
    /// Each weight as this step's mixed-precision linears read it, made on first use; cleared
    /// whenever the parameters change.
    ops: Vec<OnceLock<B::Weight>>,
    adam_step: u64,
}

impl<B: Backend> std::fmt::Debug for DeviceModel<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceModel")
            .field("backend", &self.be.describe())
            .field("params", &self.shapes.len())
            .finish_non_exhaustive()
    }
}

impl<B: Backend> DeviceModel<B> {
    /// Why `be` cannot run `model`'s steps (a mixed-precision layer of a shape its linears do
    /// not take), naming the first such weight; `None` when it can.
    pub fn unsupported(be: &B, model: &Model<f32>) -> Option<String> {
        let precision = model.precision();
        if precision == Precision::Fp32 {
            return None;
        }
        model.mixed_precision_weights().into_iter().find_map(|id| {
            let shape = model.params().layout_shape(id);
            let (o, i) = (shape[0], shape[1]);
            be.check_linear(o, i, precision)
                .err()
                .map(|e| format!("{}: {e}", model.params().name(id)))
        })
    }

    /// `model`'s parameters copied to `be`, with zero gradients and moments (stored in BF16 when
    /// `bf16_moments`, in FP32 otherwise); the steps run in the model's precision. Fails, naming
    /// the weight, when the backend cannot run a layer ([`Self::unsupported`]).
    pub fn new(be: B, model: &Model<f32>, bf16_moments: bool) -> Result<Self> {
        if let Some(why) = Self::unsupported(&be, model) {
            return Err(WorkerError::invalid("device", why));
        }
        let n = model.params().layout().len();
        let (mut shapes, mut p, mut g, mut s) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for (id, name, t) in model.params().iter() {
            shapes.push(t.shape().to_vec());
            p.push(be.upload("params", t.data()).map_err(|e| named(name, e))?);
            g.push(be.zeros("grads", t.numel())?);
            let moments = if model.params().trainable(id) {
                t.numel()
            } else {
                0
            };
            s.push(be.upload_moments(&Moments::zeros(moments, bf16_moments))?);
        }
        let mut host = model.clone();
        let biases = host.expert_biases();
        let ids: Vec<_> = host.params().iter().map(|(id, _, _)| id).collect();
        for id in ids {
            if !biases.contains(&id) {
                host.params_mut().release(id);
            }
        }
        let layout = host.ctx(1, 1, 0.0).rope_layout;
        let rope = be.rope_table(&host.rope, layout)?;
        Ok(Self {
            be,
            model: host,
            shapes,
            p,
            g,
            s,
            bf16_moments,
            rope,
            ops: (0..n).map(|_| OnceLock::new()).collect(),
            adam_step: 0,
        })
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.be
    }

    /// The parameters copied back into a CPU model (the MoE biases from the host's copy).
    pub fn to_model(&self) -> Result<Model<f32>> {
        let mut out = self.model.clone();
        self.params_into(&mut out)?;
        Ok(out)
    }

    /// Copies every parameter into `model` (which must have this model's layout): the weights
    /// from the backend, the MoE biases from the host's copy.
    pub fn params_into(&self, model: &mut Model<f32>) -> Result<()> {
        let ids: Vec<_> = model.params().iter().map(|(id, _, _)| id).collect();
        if ids.len() != self.shapes.len() {
            return Err(WorkerError::invalid(
                "params",
                format!(
                    "{} parameters, the device holds {}",
                    ids.len(),
                    self.shapes.len()
                ),
            ));
        }
        let biases = self.model.expert_biases();
        for (id, shape) in ids.into_iter().zip(&self.shapes) {
            let t = if biases.contains(&id) {
                self.model.params().get(id).clone()
            } else {
                let data = self.be.download("params", &self.p[id.index()])?;
                Tensor::new(shape.clone(), truncate(data, shape))?
            };
            model.params_mut().set(id, t)?;
        }
        Ok(())
    }

    /// The AdamW steps taken, and the moments of every trainable parameter, in the precision
    /// they are stored in.
    pub fn moments(&self) -> Result<(u64, Vec<(ParamId, Moments)>)> {
        let mut out = Vec::new();
        for (id, _, _) in self.model.params().iter() {
            if self.model.params().trainable(id) {
                out.push((id, self.be.download_moments(&self.s[id.index()])?));
            }
        }
        Ok((self.adam_step, out))
    }

    /// Replaces the AdamW state (a resumed run's): the steps taken and each trainable
    /// parameter's moments, which must be stored in this model's precision. Changes nothing on
    /// bad input.
    pub fn set_moments(&mut self, step: u64, moments: &[(ParamId, &Moments)]) -> Result<()> {
        for (id, s) in moments {
            let n: usize = self.shapes[id.index()].iter().product();
            let (m, v) = s.lens();
            if m != n || v != n || !self.model.params().trainable(*id) {
                return Err(WorkerError::invalid(
                    "adamw.state",
                    format!(
                        "{}: moments of {m} and {v} for {n} trained values",
                        self.model.params().name(*id),
                    ),
                ));
            }
            if s.is_bf16() != self.bf16_moments {
                return Err(WorkerError::invalid(
                    "adamw.state",
                    format!(
                        "{}: {} moments for a device that stores {}",
                        self.model.params().name(*id),
                        moment_precision(s.is_bf16()),
                        moment_precision(self.bf16_moments)
                    ),
                ));
            }
        }
        for (id, s) in moments {
            self.s[id.index()] = self.be.upload_moments(s)?;
        }
        self.adam_step = step;
        Ok(())
    }

    /// The accumulated gradient of every parameter, on the host, in layout order.
    pub fn gradients(&self) -> Result<Vec<Vec<f32>>> {
        self.g
            .iter()
            .zip(&self.shapes)
            .map(|(g, s)| Ok(truncate(self.be.download("grads", g)?, s)))
            .collect()
    }

    /// Sets every gradient to zero.
    pub fn zero_grads(&mut self) -> Result<()> {
        for (g, s) in self.g.iter_mut().zip(&self.shapes) {
            *g = self.be.zeros("grads", s.iter().product())?;
        }
        Ok(())
    }

    /// Losses of a forward pass only.
    pub fn evaluate(&self, b: &TokenBatch<'_>, obj: &Objective) -> Result<StepOutput> {
        Ok(self.forward(b, obj)?.out)
    }

    /// Forward and backward of a micro-batch: adds the gradients of `obj.loss_scale * loss`
    /// into the gradient buffers and returns the losses.
    pub fn forward_backward(&mut self, b: &TokenBatch<'_>, obj: &Objective) -> Result<StepOutput> {
        let fwd = self.forward(b, obj)?;
        let out = fwd.out.clone();
        self.backward(fwd, b, obj)?;
        Ok(out)
    }

    fn forward(&self, b: &TokenBatch<'_>, obj: &Objective) -> Result<Forward<B>> {
        // Token ids are checked where they are used: the backend's embedding (against the
        // table) and cross-entropy (against the vocabulary).
        self.model.check_batch(b)?;
        let model = &self.model;
        let cfg = model.config();
        let (be, hidden, vocab) = (&self.be, cfg.hidden_size, cfg.vocab_size);
        let f = Fw {
            be,
            p: &self.p,
            shapes: &self.shapes,
            host: model.params(),
            prec: model.precision(),
            ops: &self.ops,
        };
        let ctx = model.ctx(b.batch, b.seq, obj.balance_alpha);
        let t = ctx.tokens();
        let (mut balance, mut loads) = (Vec::new(), Vec::new());
        let ids = be.upload_ids("batch.inputs", b.inputs)?;
        let mut h = be.embedding(&self.p[model.embed.index()], &ids, t, hidden)?;
        let mut blocks = Vec::with_capacity(model.blocks.len());
        for blk in &model.blocks {
            let (h2, s, st) = block_forward(&f, &self.rope, blk, h, &ctx)?;
            if let Some(st) = st {
                balance.push(st.balance);
                loads.push(st.load);
            }
            blocks.push(s);
            h = h2;
        }
        let hn = f.norm(&h, model.norm, t, ctx.eps)?;
        let logits = f.lin32(&hn, model.head, t)?;
        let targets = be.upload_ids("batch.targets", b.targets)?;
        let (main, count, ce) = be.cross_entropy(&logits, &targets, t, vocab)?;

        let mut mtp: Vec<MtpSaved<B>> = Vec::with_capacity(model.mtp.len());
        let mut mtp_losses = Vec::new();
        for (k, m) in model.mtp.iter().enumerate() {
            let depth = k + 1;
            let len = b.seq - depth;
            let prev_len = mtp.last().map_or(b.seq, |s| s.len);
            let pick = |src: &[u32]| -> Vec<u32> {
                (0..b.batch)
                    .flat_map(|s| src[s * b.seq + depth..(s + 1) * b.seq].iter().copied())
                    .collect()
            };
            let (ids_k, targets_k) = (pick(b.inputs), pick(b.targets));
            let tk = b.batch * len;
            let rows: Vec<u32> = (0..b.batch)
                .flat_map(|s| (0..len).map(move |i| (s * prev_len + i) as u32))
                .collect();
            let prefix = be.upload_ids("mtp.rows", &rows)?;
            let prev_src = mtp.last().map_or(&h, |s| &s.out);
            let prev = be.gather_rows(prev_src, &prefix, tk, hidden, None)?;
            let e = be.embedding(
                &self.p[model.embed.index()],
                &be.upload_ids("mtp.ids", &ids_k)?,
                tk,
                hidden,
            )?;
            let en = f.norm(&e, m.enorm, tk, ctx.eps)?;
            let pn = f.norm(&prev, m.hnorm, tk, ctx.eps)?;
            // [enorm(e); hnorm(prev)] side by side.
            let mut cat = be.zeros("mtp.cat", tk * 2 * hidden)?;
            let (row, half) = (Cols::dense(1, hidden), |off| Cols::at(2 * hidden, off, 0));
            f.copy(&en, row, &mut cat, half(0), tk, 1, hidden, false)?;
            f.copy(&pn, row, &mut cat, half(hidden), tk, 1, hidden, false)?;
            let hk = f.lin(&cat, m.eh_proj, tk)?;
            let mctx = ctx.with_seq(len);
            let (out, bs, st) = block_forward(&f, &self.rope, &m.block, hk, &mctx)?;
            if let Some(st) = st {
                balance.push(st.balance);
                loads.push(st.load);
            }
            let hn_k = f.norm(&out, m.head_norm, tk, ctx.eps)?;
            let logits_k = f.lin32(&hn_k, model.head, tk)?;
            let targets_up = be.upload_ids("mtp.targets", &targets_k)?;
            let (loss_k, _, ce_k) = be.cross_entropy(&logits_k, &targets_up, tk, vocab)?;
            mtp_losses.push(loss_k);
            mtp.push(MtpSaved {
                len,
                prev_len,
                ids: ids_k,
                prefix,
                e,
                prev,
                cat,
                block: bs,
                out,
                hn: hn_k,
                targets: targets_up,
                logits: logits_k,
                ce: ce_k,
            });
        }
        let d = model.mtp.len().max(1) as f64;
        let bsum: f64 = balance.iter().sum();
        let out = StepOutput {
            loss: main
                + obj.mtp_lambda / d * mtp_losses.iter().sum::<f64>()
                + obj.balance_alpha * bsum,
            main_loss: main,
            mtp_losses,
            balance_loss: bsum,
            expert_loads: loads,
            tokens: count,
        };
        Ok(Forward {
            blocks,
            h,
            hn,
            logits,
            targets,
            ce,
            mtp,
            out,
        })
    }

    fn backward(&mut self, fwd: Forward<B>, b: &TokenBatch<'_>, obj: &Objective) -> Result<()> {
        let Self {
            be,
            model,
            shapes,
            p,
            g,
            rope,
            ops,
            ..
        } = self;
        let be: &B = be;
        let cfg = model.config();
        let (hidden, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let mut w = Bw {
            fw: Fw {
                be,
                p,
                shapes,
                host: model.params(),
                prec: model.precision(),
                ops,
            },
            g,
        };
        // The backward differentiates `loss_scale * loss`; the balance loss through its weight.
        let ctx = model.ctx(b.batch, b.seq, obj.balance_alpha * obj.loss_scale);
        let t = ctx.tokens();
        let d = model.mtp.len().max(1) as f64;
        let embed = model.embed.index();
        let mut dprev: Option<B::Buf> = None;
        for (m, s) in model.mtp.iter().zip(fwd.mtp).rev() {
            let tk = b.batch * s.len;
            let dlogits = be.cross_entropy_backward(
                &s.logits,
                &s.targets,
                &s.ce,
                tk,
                vocab,
                obj.loss_scale * obj.mtp_lambda / d,
            )?;
            let dhn = w.lin_b32(&dlogits, &s.hn, model.head, tk)?;
            let mut dout = w.norm_b(&dhn, &s.out, m.head_norm, tk, ctx.eps)?;
            if let Some(gp) = dprev.take() {
                be.add_into(&mut dout, &gp)?;
            }
            let mctx = ctx.with_seq(s.len);
            let dhk = block_backward(&mut w, rope, &m.block, s.block, &dout, &mctx)?;
            let dcat = w.lin_b(&dhk, &s.cat, m.eh_proj, tk)?;
            let half = |off| Cols::at(2 * hidden, off, 0);
            let den = w.fw.take(&dcat, half(0), tk, 1, hidden)?;
            let dpn = w.fw.take(&dcat, half(hidden), tk, 1, hidden)?;
            let de = w.norm_b(&den, &s.e, m.enorm, tk, ctx.eps)?;
            let dprev_k = w.norm_b(&dpn, &s.prev, m.hnorm, tk, ctx.eps)?;
            be.embedding_backward(&de, &s.ids, hidden, &mut w.g[embed])?;
            let mut full = be.zeros("mtp.dprev", b.batch * s.prev_len * hidden)?;
            be.scatter_add_rows(&dprev_k, &s.prefix, tk, hidden, None, &mut full)?;
            dprev = Some(full);
        }
        let dlogits = be.cross_entropy_backward(
            &fwd.logits,
            &fwd.targets,
            &fwd.ce,
            t,
            vocab,
            obj.loss_scale,
        )?;
        let dhn = w.lin_b32(&dlogits, &fwd.hn, model.head, t)?;
        let mut dh = w.norm_b(&dhn, &fwd.h, model.norm, t, ctx.eps)?;
        if let Some(gp) = dprev {
            be.add_into(&mut dh, &gp)?;
        }
        for (blk, s) in model.blocks.iter().zip(fwd.blocks).rev() {
            dh = block_backward(&mut w, rope, blk, s, &dh, &ctx)?;
        }
        be.embedding_backward(&dh, b.inputs, hidden, &mut w.g[embed])?;
        Ok(())
    }

    /// One optimizer step on batch `b`: the gradients of every micro-batch, the global-norm
    /// clipping, AdamW on every trainable parameter and the expert-bias update.
    pub fn train_step(&mut self, b: &TokenBatch<'_>, h: &StepHyper) -> Result<DeviceStep> {
        h.adamw.validate()?;
        if h.adamw.bf16_moments != self.bf16_moments {
            return Err(WorkerError::invalid(
                "adamw.bf16_moments",
                format!(
                    "is {} but the device stores its moments in {}",
                    h.adamw.bf16_moments,
                    moment_precision(self.bf16_moments)
                ),
            ));
        }
        self.zero_grads()?;
        let micro = h.micro_batches.clamp(1, b.batch.max(1));
        let parts = split_micro(b, micro)?;
        let mut out = StepOutput::zero(self.model.mtp.len());
        for (part, share) in &parts {
            let o = Objective {
                loss_scale: h.obj.loss_scale * share,
                ..h.obj
            };
            let mo = self.forward_backward(part, &o)?;
            if micro == 1 {
                out = mo;
            } else {
                out.accumulate(mo, *share);
            }
        }
        let trainable: Vec<(usize, bool)> = self
            .model
            .params()
            .iter()
            .filter(|(id, _, _)| self.model.params().trainable(*id))
            .map(|(id, _, _)| (id.index(), self.model.params().decays(id)))
            .collect();
        let grads: Vec<&B::Buf> = trainable.iter().map(|&(i, _)| &self.g[i]).collect();
        let grad_norm = self.be.sum_sq(&grads)?.sqrt();
        if !grad_norm.is_finite() {
            return Err(shoal_kernels::KernelError::NonFinite {
                operand: "clip_grad_norm.grads",
                index: 0,
                value: grad_norm,
            }
            .into());
        }
        let clip = clip_coefficient(grad_norm, h.grad_clip)?;
        // The weights change from here on: their converted copies go (an update that fails part
        // way must not leave old copies behind).
        for op in &mut self.ops {
            op.take();
        }
        self.adam_step += 1;
        let no_decay = AdamWConfig {
            weight_decay: 0.0,
            ..h.adamw
        };
        for &(i, decays) in &trainable {
            let c = if decays { &h.adamw } else { &no_decay };
            let k = AdamCoeffs::new(c, h.lr, self.adam_step, clip);
            let Self { be, p, g, s, .. } = self;
            be.adamw(&mut p[i], &g[i], &mut s[i], &k)?;
        }
        // Auxiliary-loss-free balancing: each bias moves by gamma against its expert's load.
        let biases = self.model.expert_biases();
        for (bias, load) in biases.iter().zip(&out.expert_loads) {
            let total: usize = load.iter().sum();
            let mean = total as f64 / load.len().max(1) as f64;
            let bv = self.model.params_mut().get_mut(*bias);
            for (v, &l) in bv.data_mut().iter_mut().zip(load) {
                let l = l as f64;
                if l > mean {
                    *v -= h.gamma;
                } else if l < mean {
                    *v += h.gamma;
                }
            }
        }
        Ok(DeviceStep { out, grad_norm })
    }
}

/// A downloaded buffer cut to its shape (a GPU allocates at least one element).
fn truncate(mut v: Vec<f32>, shape: &[usize]) -> Vec<f32> {
    v.truncate(shape.iter().product());
    v
}

pub(super) fn named(name: &str, e: shoal_kernels::KernelError) -> WorkerError {
    WorkerError::invalid(name, e.to_string())
}
