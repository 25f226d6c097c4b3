//! Gathering a checkpoint from ranks in several processes: every ZeRO-1 part's moments are
//! all-gathered within its group, then for every part that rank 0 does not share (other
//! positions' experts, other stages' layers) its first member sends rank 0 the moments and
//! weights. Rank 0's process writes the checkpoint.

use half::bf16;
use shoal_kernels::Tensor;
use shoal_kernels::ops::adamw::{AdamWState, Moments};

use super::dp::Replica;
use super::zero::ZeroLayout;
use super::{Trainer, WorkerError};
use crate::Result;
use crate::comm::collective::{all_gather, decode, encode};
use crate::comm::transport::{CommOp, LocalTransport, Tag, Transport, comm_error};
use crate::model::params::ParamId;
use crate::trace::{Part, Trace, unix_us};

/// Every parameter by name, and the optimizer state of every trained one.
pub(crate) type CheckpointState = (Vec<(String, Tensor<f32>)>, Vec<(ParamId, AdamWState)>);

/// Sequence numbers of the checkpoint's frames (above any step's).
const SEQ: u64 = 1 << 32;

/// What rank 0 holds after the gather: per layout, the whole first and second moments, and the
/// values of the layout's parameters where rank 0 does not hold them.
pub(crate) struct Gathered {
    moments: Vec<Option<(Vec<f32>, Vec<f32>)>>,
    values: Vec<Option<Vec<f32>>>,
}

/// One rank's part of the gather; `Some` on rank 0. `members[l]` are the devices sharing
/// layout `l`, in shard order.
pub(crate) fn gather_rank(
    rep: &Replica,
    t: &mut LocalTransport,
    layouts: &[ZeroLayout],
    members: &[Vec<usize>],
    step: u64,
) -> Result<Option<Gathered>> {
    let tag = |seq: u64| Tag {
        step,
        op: CommOp::AllGather,
        seq: SEQ + seq,
    };
    let mut full: Vec<Option<(Vec<f32>, Vec<f32>)>> = vec![None; layouts.len()];
    for part in &rep.parts {
        let layout = &layouts[part.layout];
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for st in &part.moments {
            m.extend(st.moments.first_f32());
            v.extend(st.moments.second_f32());
        }
        let li = part.layout as u64;
        let m = all_gather(t, &part.group, tag(2 * li), &m, &layout.bounds)?;
        let v = all_gather(t, &part.group, tag(2 * li + 1), &v, &layout.bounds)?;
        full[part.layout] = Some((m, v));
    }
    let rank = t.rank();
    let flat_values = |li: usize| -> Vec<f32> {
        let mut out = Vec::with_capacity(layouts[li].len());
        for (id, _) in &layouts[li].params {
            out.extend_from_slice(rep.model.params().get(*id).data());
        }
        out
    };
    // Every layout that rank 0 does not share: its first member sends rank 0 the whole
    // moments and the weights (rank 0 does not hold them, or not up to date).
    let p2p = |li: usize, k: u64| tag((1 << 20) | (3 * li as u64 + k));
    for (li, group) in members.iter().enumerate() {
        if group.contains(&0) || group.first() != Some(&rank) {
            continue;
        }
        let (m, v) = full[li].take().ok_or_else(|| {
            WorkerError::invalid(
                "checkpoint",
                format!("rank {rank} lacks the moments of part {li}"),
            )
        })?;
        t.send(0, p2p(li, 0), encode(&m))?;
        t.send(0, p2p(li, 1), encode(&v))?;
        t.send(0, p2p(li, 2), encode(&flat_values(li)))?;
    }
    if rank != 0 {
        return Ok(None);
    }
    let mut values = vec![None; layouts.len()];
    for (li, group) in members.iter().enumerate() {
        let Some(&src) = group.first() else { continue };
        if group.contains(&0) {
            continue;
        }
        let n = layouts[li].len();
        let m = t.recv(src, p2p(li, 0))?;
        let m = decode(t, src, p2p(li, 0), &m, n)?;
        let v = t.recv(src, p2p(li, 1))?;
        let v = decode(t, src, p2p(li, 1), &v, n)?;
        let w = t.recv(src, p2p(li, 2))?;
        values[li] = Some(decode(t, src, p2p(li, 2), &w, n)?);
        full[li] = Some((m, v));
    }
    Ok(Some(Gathered {
        moments: full,
        values,
    }))
}

impl Trainer {
    /// Gathers the whole model and optimizer state onto the process holding rank 0; `None`
    /// in the other processes.
    pub(crate) fn gather_checkpoint(&mut self) -> Result<Option<CheckpointState>> {
        let step = self.step;
        let mut no_stages: Vec<Vec<LocalTransport>> =
            (0..self.replicas.len()).map(|_| Vec::new()).collect();
        let (layouts, members) = (&self.layouts, &self.members);
        let res = Self::on_ranks(
            &mut self.replicas,
            self.mesh.as_deref_mut(),
            &self.ranks,
            &mut no_stages,
            |rep, t, _| gather_rank(rep, t, layouts, members, step),
        )?;
        let Some(g) = res.into_iter().flatten().next() else {
            return Ok(None);
        };
        let bf16_moments = self.opts.bf16_moments;
        let mut states = Vec::new();
        let mut named = self.named_f32();
        let index: std::collections::HashMap<String, usize> = named
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        for (li, layout) in self.layouts.iter().enumerate() {
            let (m, v) = g.moments[li].as_ref().ok_or_else(|| {
                WorkerError::invalid("checkpoint", format!("no moments for part {li}"))
            })?;
            for (id, r) in &layout.params {
                let moments = if bf16_moments {
                    Moments::Bf16 {
                        m: m[r.clone()].iter().map(|x| bf16::from_f32(*x)).collect(),
                        v: v[r.clone()].iter().map(|x| bf16::from_f32(*x)).collect(),
                    }
                } else {
                    Moments::F32 {
                        m: m[r.clone()].to_vec(),
                        v: v[r.clone()].to_vec(),
                    }
                };
                states.push((*id, AdamWState { moments, step }));
                if let Some(values) = &g.values[li] {
                    let name = self.params().name(*id).to_string();
                    let shape = self.params().layout_shape(*id);
                    if let Some(&i) = index.get(&name) {
                        named[i].1 = Tensor::new(shape, values[r.clone()].to_vec())?;
                    }
                }
            }
        }
        states.sort_by_key(|(id, _)| id.index());
        Ok(Some((named, states)))
    }

    /// Whether this trainer's ranks live in several processes.
    pub(crate) fn is_distributed(&self) -> bool {
        self.mesh.is_some()
    }
}

/// Sequence numbers of the trace gather's frames (above the checkpoint's).
const TRACE_SEQ: u64 = 1 << 34;

/// Clock readings per node when aligning traces; the one with the shortest round trip counts.
const PINGS: u64 = 5;

impl Trainer {
    /// Gathers a step's trace from every node onto the process holding rank 0, each node's
    /// times moved onto rank 0's clock (the offset from the round trip of the fastest of a few
    /// clock readings, as NTP estimates it): one part per node, `Some` on rank 0's process. A
    /// collective: every process calls it after the same step.
    pub fn gather_trace(&mut self, trace: Trace) -> Result<Option<Vec<Part>>> {
        let step = self.step;
        let Some(t) = self.mesh.as_mut().and_then(|m| m.first_mut()) else {
            return Ok(Some(vec![Part {
                process: "node 0".into(),
                trace,
                shift_us: 0.0,
            }]));
        };
        // Each node's lowest rank speaks for the node's process.
        let mut leaders: Vec<(usize, usize)> = Vec::new();
        for r in 0..t.world() {
            let n = t.node(r);
            if !leaders.iter().any(|&(m, _)| m == n) {
                leaders.push((n, r));
            }
        }
        leaders.sort_unstable();
        let tag = |seq: u64| Tag {
            step,
            op: CommOp::AllGather,
            seq: TRACE_SEQ + seq,
        };
        let me = t.rank();
        if me == 0 {
            let base = trace.epoch_unix_us;
            let mut parts = vec![Part {
                process: format!("node {}", t.node(0)),
                trace,
                shift_us: 0.0,
            }];
            for &(node, r) in &leaders {
                if r == 0 {
                    continue;
                }
                let mut best = (f64::INFINITY, 0.0);
                for i in 0..PINGS {
                    let t0 = unix_us();
                    t.send(r, tag(2 * i), Vec::new())?;
                    let b = t.recv(r, tag(2 * i + 1))?;
                    let t1 = unix_us();
                    let theirs = <[u8; 8]>::try_from(b.as_slice())
                        .map(f64::from_le_bytes)
                        .map_err(|_| {
                            comm_error(0, r, tag(2 * i + 1), "a clock reading is 8 bytes")
                        })?;
                    if t1 - t0 < best.0 {
                        best = (t1 - t0, theirs - (t0 + t1) / 2.0);
                    }
                }
                let bytes = t.recv(r, tag(2 * PINGS))?;
                let part: Trace = serde_json::from_slice(&bytes)
                    .map_err(|e| comm_error(0, r, tag(2 * PINGS), format!("its trace: {e}")))?;
                parts.push(Part {
                    process: format!("node {node}"),
                    shift_us: part.epoch_unix_us - best.1 - base,
                    trace: part,
                });
            }
            return Ok(Some(parts));
        }
        if leaders.iter().any(|&(_, r)| r == me) {
            for i in 0..PINGS {
                t.recv(0, tag(2 * i))?;
                t.send(0, tag(2 * i + 1), unix_us().to_le_bytes().to_vec())?;
            }
            let bytes = serde_json::to_vec(&trace)
                .map_err(|e| WorkerError::invalid("trace", e.to_string()))?;
            t.send(0, tag(2 * PINGS), bytes)?;
        }
        Ok(None)
    }
}
