//! The MoE layer under expert parallelism: routed experts live on the members of the
//! expert-parallel group; tokens travel to them and back.
//!
//! Forward: the router runs on this rank's tokens; each token goes once to every member that
//! holds at least one of its experts (a dispatch frame: the token's row, FP8 in FP8 runs, plus
//! its top-k experts and weights); each member runs its experts on the rows it received, sums
//! each row's weighted outputs over its experts and sends the sums back (a combine frame, BF16 in
//! FP8 runs); the token's rank adds the members' sums in member order. Every rank encodes and
//! decodes its own frame too, so a rank's numbers do not depend on where its experts live.
//!
//! Backward mirrors it: the output gradient of every dispatched token goes to the same members
//! (the backward of combine is a dispatch); each member scales it by the gate weights for its
//! experts' B passes, keeps their W work, and returns the summed input gradients plus the gate
//! weights' gradients (the backward of dispatch is a combine).

use std::sync::Arc;

use shoal_kernels::Tensor;
use shoal_kernels::ops::linear::Precision;
use shoal_kernels::ops::moe_gate::{expert_load, gate_forward};

use super::ctx::Ctx;
use super::ep::{ExchangePhase, ExpertExchange, combine_full, dispatch_codec};
use super::linear::ModelFloat;
use super::mlp::MlpSaved;
use super::moe::{Moe, MoeSaved, MoeStats};
use super::params::ParamStore;
use super::tensor_ops::gather_rows;
use super::wgrad::WTask;
use crate::comm::wire::{CombineFrame, CombineView, DispatchFrame};
use crate::{Result, WorkerError};

/// One of this rank's experts as it ran on the rows it was sent.
pub(super) struct ServedExpert<T> {
    /// `(source member, row in that member's frame, top-k slot)` per input row.
    entries: Vec<(usize, usize, usize)>,
    mlp: MlpSaved<T>,
    out: Tensor<T>,
}

/// The rows a member sent this rank (decoded), with their top-k experts and weights.
pub(super) struct Received<T> {
    rows: Arc<Tensor<T>>,
    routes: Vec<u32>,
    weights: Vec<f32>,
}

/// What the forward keeps for the backward under expert parallelism.
pub(super) struct EpSaved<T> {
    /// Per member, the tokens of this rank sent to it, in frame order.
    sent: Vec<Vec<usize>>,
    /// Per source member, what it sent.
    received: Vec<Received<T>>,
    /// Per expert of this rank, in expert order (`None`: no rows).
    served: Vec<Option<ServedExpert<T>>>,
}

fn to_f32<T: ModelFloat>(x: &Tensor<T>) -> Tensor<f32> {
    x.map(|v| v.f64() as f32)
}

fn from_f32<T: ModelFloat>(x: &Tensor<f32>) -> Tensor<T> {
    x.map(|v| T::of(f64::from(v)))
}

/// `lists` with this member's own list emptied: its rows stay here instead of crossing a link.
fn others_only(lists: &[Vec<usize>], me: usize) -> Vec<Vec<usize>> {
    lists
        .iter()
        .enumerate()
        .map(|(q, l)| if q == me { Vec::new() } else { l.clone() })
        .collect()
}

/// Adds row `i` of `src` (rows of `width`) into row `targets[i]` of `dst`, for every `i`.
fn add_rows<T>(
    dst: &mut [T],
    src: &Tensor<f32>,
    targets: &[usize],
    width: usize,
    add: impl Fn(&mut T, f32),
) {
    for (i, &t) in targets.iter().enumerate() {
        let row = &src.data()[i * width..(i + 1) * width];
        for (o, &v) in dst[t * width..(t + 1) * width].iter_mut().zip(row) {
            add(o, v);
        }
    }
}

/// Checks that a member's reply covers the rows this rank sent it.
fn rows_match(
    what: &str,
    member: usize,
    got: &CombineView<'_>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    if got.rows != rows || got.cols != cols {
        return Err(WorkerError::Frame {
            kind: "combine",
            reason: format!(
                "{what} from member {member}: {} x {}, expected {rows} x {cols}",
                got.rows, got.cols
            ),
        });
    }
    Ok(())
}

impl Moe {
    fn owned(&self, ex: &dyn ExpertExchange) -> Result<std::ops::Range<usize>> {
        let (e, ep) = (self.gate.n_routed_experts, ex.ep());
        if ep == 0 || e % ep != 0 || ex.position() >= ep {
            return Err(WorkerError::invalid(
                "ep",
                format!(
                    "{e} routed experts over {ep} members (position {})",
                    ex.position()
                ),
            ));
        }
        let per = e / ep;
        Ok(ex.position() * per..(ex.position() + 1) * per)
    }

    /// Forward under expert parallelism (see the module docs).
    pub(super) fn forward_ep<T: ModelFloat>(
        &self,
        p: &ParamStore<T>,
        x: &Tensor<T>,
        ctx: &Ctx<'_>,
        ex: &dyn ExpertExchange,
    ) -> Result<(Tensor<T>, MoeSaved<T>, MoeStats)> {
        let (tokens, hidden) = (x.rows(), x.last_dim());
        let (k, e, ep) = (self.gate.top_k, self.gate.n_routed_experts, ex.ep());
        let mine = self.owned(ex)?;
        let per = mine.len();
        let router_span = tracing::debug_span!("moe.router").entered();
        let logits = T::linear(x, p, self.router, Precision::Fp32)?;
        let gate = gate_forward(&logits, p.get(self.bias).data(), &self.gate)?;
        drop(router_span);

        // Dispatch: each token once to every member holding one of its experts.
        let dispatch_span = tracing::debug_span!("dispatch(F)").entered();
        let mut sent: Vec<Vec<usize>> = vec![Vec::new(); ep];
        for t in 0..tokens {
            let mut last = usize::MAX;
            let mut members: Vec<usize> = gate.indices[t * k..(t + 1) * k]
                .iter()
                .map(|&j| j as usize / per)
                .collect();
            members.sort_unstable();
            for m in members {
                if m != last {
                    sent[m].push(t);
                    last = m;
                }
            }
        }
        // Every token is encoded (quantized in FP8 runs) once; each member's frame is cut out of
        // the encoded rows.
        let wf: Vec<f32> = gate.weights.data().iter().map(|v| v.f64() as f32).collect();
        let all = DispatchFrame::encode_rows(
            &to_f32(x),
            k,
            gate.indices.clone(),
            wf,
            dispatch_codec(ctx.precision),
        )?;
        // This member's own tokens stay here (an empty frame stands in for them): the rows it
        // keeps are exactly what their frame would have delivered.
        let me = ex.position();
        let got = ex.dispatch(&others_only(&sent, me), &mut |rows| {
            all.encode_selected(rows)
        })?;
        if got.len() != ep {
            return Err(WorkerError::invalid(
                "expert exchange",
                format!("{} frames from a group of {ep}", got.len()),
            ));
        }
        let mut received = Vec::with_capacity(ep);
        for (s, bytes) in got.iter().enumerate() {
            let f = if s == me {
                all.select(&sent[me])?
            } else {
                DispatchFrame::decode(bytes, e)?
            };
            if f.topk != k || f.tokens.cols() != hidden {
                return Err(WorkerError::Frame {
                    kind: "dispatch",
                    reason: format!(
                        "top-{} rows of {}, expected top-{k} rows of {hidden}",
                        f.topk,
                        f.tokens.cols()
                    ),
                });
            }
            received.push(Received {
                rows: Arc::new(from_f32(&f.tokens.to_f32())),
                routes: f.experts,
                weights: f.weights,
            });
        }
        drop(all);
        drop(dispatch_span);

        // This rank's experts on the rows they were sent, in source order.
        let experts_span = tracing::debug_span!("mlp(F)").entered();
        let mut served = Vec::with_capacity(per);
        for j in mine.clone() {
            let mut entries = Vec::new();
            for (s, rec) in received.iter().enumerate() {
                for (pos, &r) in rec.routes.iter().enumerate() {
                    if r as usize == j {
                        entries.push((s, pos / k, pos % k));
                    }
                }
            }
            if entries.is_empty() {
                served.push(None);
                continue;
            }
            let mut xe = Vec::with_capacity(entries.len() * hidden);
            for &(s, r, _) in &entries {
                xe.extend_from_slice(&received[s].rows.data()[r * hidden..(r + 1) * hidden]);
            }
            let xe = Tensor::new([entries.len(), hidden], xe)?;
            let (out, mlp) = self.experts[j].forward(p, &xe, ctx)?;
            served.push(Some(ServedExpert { entries, mlp, out }));
        }
        drop(experts_span);

        // Combine: per source, each row's weighted sum over this rank's experts.
        let combine_span = tracing::debug_span!("combine(F)").entered();
        let mut sums: Vec<Tensor<T>> = received
            .iter()
            .map(|rec| Tensor::zeros([rec.rows.rows(), hidden]))
            .collect();
        for se in served.iter().flatten() {
            for (i, &(s, r, slot)) in se.entries.iter().enumerate() {
                let wgt = T::of(f64::from(received[s].weights[r * k + slot]));
                let src = &se.out.data()[i * hidden..(i + 1) * hidden];
                let dst = &mut sums[s].data_mut()[r * hidden..(r + 1) * hidden];
                for (o, &v) in dst.iter_mut().zip(src) {
                    *o += wgt * v;
                }
            }
        }
        let full = combine_full(ctx.precision);
        let frames = sums
            .iter()
            .enumerate()
            .map(|(s, y)| match s == me {
                true => CombineFrame::encode_f32(&Tensor::zeros([0, hidden]), full),
                false => CombineFrame::encode_f32(&to_f32(y), full),
            })
            .collect::<Result<Vec<_>>>()?;
        let back = ex.all_to_all(ExchangePhase::Combine, frames)?;
        drop(combine_span);

        let shared_span = tracing::debug_span!("moe.shared").entered();
        let (mut y, shared) = match &self.shared {
            Some(m) => {
                let (y, s) = m.forward(p, x, ctx)?;
                (y, Some(s))
            }
            None => (Tensor::zeros([tokens, hidden]), None),
        };
        drop(shared_span);
        let add = |o: &mut T, v: f32| *o += T::of(f64::from(v));
        for (q, bytes) in back.iter().enumerate() {
            let yd = y.data_mut();
            if q == me {
                let part = CombineFrame::round_trip(&to_f32(&sums[me]), full);
                add_rows(yd, &part, &sent[q], hidden, add);
                continue;
            }
            let part = CombineFrame::view(bytes)?;
            rows_match("expert outputs", q, &part, sent[q].len(), hidden)?;
            for (i, &t) in sent[q].iter().enumerate() {
                part.add_row(i, &mut yd[t * hidden..(t + 1) * hidden], add);
            }
        }
        let stats = MoeStats {
            load: expert_load(&gate.indices, e),
            balance: self.balance(&gate, ctx, None)?,
        };
        Ok((
            y,
            MoeSaved {
                gate,
                experts: Vec::new(),
                shared,
                ep: Some(Box::new(EpSaved {
                    sent,
                    received,
                    served,
                })),
            },
            stats,
        ))
    }

    /// B pass under expert parallelism (see the module docs); pushes the W work of the shared
    /// experts, the router and this rank's experts.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward_ep<T: ModelFloat>(
        &self,
        p: &ParamStore<T>,
        x: Tensor<T>,
        mut saved: MoeSaved<T>,
        dy: Tensor<T>,
        ctx: &Ctx<'_>,
        ex: &dyn ExpertExchange,
        w: &mut Vec<WTask<T>>,
    ) -> Result<Tensor<T>> {
        let (tokens, hidden) = (x.rows(), x.last_dim());
        let (k, ep) = (self.gate.top_k, ex.ep());
        let mine = self.owned(ex)?;
        let Some(eps) = saved.ep.take() else {
            return Err(WorkerError::invalid(
                "ep",
                "the forward ran without expert parallelism",
            ));
        };
        let full = combine_full(ctx.precision);

        // The backward of combine: each dispatched token's output gradient to the same members.
        let dispatch_span = tracing::debug_span!("dispatch(B)").entered();
        let dyf = to_f32(&dy);
        let me = ex.position();
        let got = ex.dispatch(&others_only(&eps.sent, me), &mut |rows| {
            CombineFrame::encode_f32_selected(&dyf, rows, full)
        })?;
        if got.len() != ep {
            return Err(WorkerError::invalid(
                "expert exchange",
                format!("{} frames from a group of {ep}", got.len()),
            ));
        }
        let mut dys = Vec::with_capacity(ep);
        for (s, bytes) in got.iter().enumerate() {
            if s == me {
                let own = gather_rows(&dyf, &eps.sent[me])?;
                dys.push(from_f32::<T>(&CombineFrame::round_trip(&own, full)));
                continue;
            }
            let g = CombineFrame::view(bytes)?;
            rows_match(
                "output gradients",
                s,
                &g,
                eps.received[s].rows.rows(),
                hidden,
            )?;
            dys.push(from_f32::<T>(&g.to_f32()?));
        }
        drop(dispatch_span);

        // This rank's experts: B passes on the gradients of the rows they served.
        let experts_span = tracing::debug_span!("mlp(B)").entered();
        let mut dxs: Vec<Tensor<T>> = eps
            .received
            .iter()
            .map(|rec| Tensor::zeros([rec.rows.rows(), hidden]))
            .collect();
        let mut dws: Vec<Tensor<T>> = eps
            .received
            .iter()
            .map(|rec| Tensor::zeros([rec.rows.rows(), k]))
            .collect();
        for (j, se) in mine.zip(eps.served) {
            let Some(se) = se else { continue };
            let n = se.entries.len();
            let mut dye = Vec::with_capacity(n * hidden);
            let mut xe = Vec::with_capacity(n * hidden);
            for (i, &(s, r, slot)) in se.entries.iter().enumerate() {
                let wgt = T::of(f64::from(eps.received[s].weights[r * k + slot]));
                let g = &dys[s].data()[r * hidden..(r + 1) * hidden];
                let out = &se.out.data()[i * hidden..(i + 1) * hidden];
                dws[s].data_mut()[r * k + slot] = shoal_kernels::real::dot(g, out);
                dye.extend(g.iter().map(|&v| v * wgt));
                xe.extend_from_slice(&eps.received[s].rows.data()[r * hidden..(r + 1) * hidden]);
            }
            let dye = Tensor::new([n, hidden], dye)?;
            let xe = T::save(Tensor::new([n, hidden], xe)?, ctx.precision)?;
            let dxe = self.experts[j].backward(p, xe, se.mlp, dye, ctx, w)?;
            for (i, &(s, r, _)) in se.entries.iter().enumerate() {
                let src = &dxe.data()[i * hidden..(i + 1) * hidden];
                let dst = &mut dxs[s].data_mut()[r * hidden..(r + 1) * hidden];
                for (o, &v) in dst.iter_mut().zip(src) {
                    *o += v;
                }
            }
        }
        drop(experts_span);

        // The backward of dispatch: input gradients (and the gate weights' gradients) back.
        let combine_span = tracing::debug_span!("combine(B)").entered();
        let frames = dxs
            .iter()
            .enumerate()
            .map(|(s, d)| match s == me {
                true => CombineFrame::encode_f32(&Tensor::zeros([0, hidden]), full),
                false => CombineFrame::encode_f32(&to_f32(d), full),
            })
            .collect::<Result<Vec<_>>>()?;
        let back = ex.all_to_all(ExchangePhase::Combine, frames)?;
        let frames = dws
            .iter()
            .enumerate()
            .map(|(s, d)| match s == me {
                true => CombineFrame::encode_f32(&Tensor::zeros([0, k]), true),
                false => CombineFrame::encode_f32(&to_f32(d), true),
            })
            .collect::<Result<Vec<_>>>()?;
        let back_w = ex.all_to_all(ExchangePhase::Combine, frames)?;
        drop(combine_span);

        let shared_span = tracing::debug_span!("moe.shared").entered();
        let x = Arc::new(x);
        let mut dx = match (&self.shared, saved.shared) {
            (Some(m), Some(s)) => {
                let xs = T::save_shared(&x, ctx.precision)?;
                m.backward(p, xs, s, dy, ctx, w)?
            }
            _ => Tensor::zeros([tokens, hidden]),
        };
        drop(shared_span);
        let mut dweights = Tensor::zeros([tokens, k]);
        let add = |o: &mut T, v: f32| *o += T::of(f64::from(v));
        for (q, (bytes, wbytes)) in back.iter().zip(&back_w).enumerate() {
            if q == me {
                let part = CombineFrame::round_trip(&to_f32(&dxs[me]), full);
                let dwq = CombineFrame::round_trip(&to_f32(&dws[me]), true);
                add_rows(dx.data_mut(), &part, &eps.sent[q], hidden, add);
                add_rows(dweights.data_mut(), &dwq, &eps.sent[q], k, add);
                continue;
            }
            let part = CombineFrame::view(bytes)?;
            let rows = eps.sent[q].len();
            rows_match("input gradients", q, &part, rows, hidden)?;
            let dwq = CombineFrame::view(wbytes)?;
            rows_match("gate-weight gradients", q, &dwq, rows, k)?;
            let dxd = dx.data_mut();
            for (i, &t) in eps.sent[q].iter().enumerate() {
                part.add_row(i, &mut dxd[t * hidden..(t + 1) * hidden], add);
                dwq.add_row(i, &mut dweights.data_mut()[t * k..(t + 1) * k], add);
            }
        }
        self.router_backward(p, x, &saved.gate, &dweights, dx, ctx, w)
    }
}
