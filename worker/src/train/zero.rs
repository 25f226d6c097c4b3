//! ZeRO-1 sharding: the trained parameters laid end to end in one flat vector, cut into `dp`
//! consecutive shards of (almost) equal length. Data-parallel rank `r` keeps the optimizer state
//! (AdamW moments) of shard `r` only; gradients are reduce-scattered onto the shards and the
//! updated shards all-gathered back into every replica's FP32 master weights.
//!
//! A shard's boundaries fall anywhere, inside a parameter too: a shard is a list of
//! [`Segment`]s, each a contiguous part of one parameter. AdamW is element-wise, so updating a
//! parameter in pieces gives exactly the numbers of updating it whole.

use std::collections::HashMap;
use std::ops::Range;

use shoal_kernels::ops::adamw::{AdamWConfig, AdamWState, Moments};

use crate::comm::collective::even_bounds;
use crate::model::StagePart;
use crate::model::params::{Grads, ParamId, ParamStore};
use crate::{Result, WorkerError};
use shoal_spec::schedule::StepSchedule;

/// A contiguous part of one parameter inside a shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// The parameter.
    pub param: ParamId,
    /// Elements of the parameter (flat, row-major).
    pub within: Range<usize>,
    /// The same elements' place in the flat vector.
    pub flat: Range<usize>,
}

/// What puts parameters in one ZeRO-1 group: the expert-parallel position holding them (`None`
/// for dense ones) and the pipeline ranks that use them.
type GroupKey = (Option<usize>, Vec<usize>);

/// The trained parameters in ZeRO-1 groups: by the pipeline ranks that use them and, with
/// expert parallelism, by the position holding them (dense parameters first). Each group is
/// sharded over the devices that use it: device `k` runs pipeline rank `k / dp` of
/// data-parallel rank `k % dp`; without pipelines across devices, every parameter belongs to
/// pipeline rank 0.
pub(crate) struct Groups {
    /// Each group's layout, one shard per member.
    pub(crate) layouts: Vec<ZeroLayout>,
    /// Each group's devices, in shard order.
    pub(crate) members: Vec<Vec<usize>>,
    /// The group of every trained parameter, by name.
    pub(crate) group_of: HashMap<String, usize>,
}

impl Groups {
    /// The groups of `params` for `dp` data-parallel ranks in expert-parallel groups of `ep`,
    /// with `pipeline` the stages and schedule whose ranks are devices (`None`: one pipeline
    /// rank per device).
    pub(crate) fn new<T: shoal_kernels::Real>(
        params: &ParamStore<T>,
        cfg: &shoal_spec::ModelConfig,
        pipeline: Option<&(Vec<StagePart>, StepSchedule)>,
        dp: usize,
        ep: usize,
    ) -> Self {
        let per = cfg.n_routed_experts / ep.max(1);
        let pp = pipeline.map_or(1, |(_, s)| s.pp);
        let owners = |name: &str| -> Vec<usize> {
            match pipeline {
                Some((stages, schedule)) => (0..pp)
                    .filter(|&r| {
                        (0..schedule.directions())
                            .any(|dir| stages[schedule.position(r, dir)].holds(name, cfg))
                    })
                    .collect(),
                None => vec![0],
            }
        };
        let key_of = |name: &str| -> GroupKey {
            let pos = expert_of(name).filter(|_| ep > 1).map(|j| j / per.max(1));
            (pos, owners(name))
        };
        let trained: Vec<(String, GroupKey)> = params
            .iter()
            .filter(|(id, _, _)| params.trainable(*id))
            .map(|(_, name, _)| (name.to_string(), key_of(name)))
            .collect();
        let mut keys: Vec<&GroupKey> = trained.iter().map(|(_, k)| k).collect();
        keys.sort();
        keys.dedup();
        let group_of: HashMap<String, usize> = trained
            .iter()
            .map(|(name, k)| (name.clone(), keys.binary_search(&k).unwrap_or(0)))
            .collect();
        let members: Vec<Vec<usize>> = keys
            .iter()
            .map(|(pos, owners)| {
                (0..pp * dp)
                    .filter(|k| owners.contains(&(k / dp)) && pos.is_none_or(|p| k % dp % ep == p))
                    .collect()
            })
            .collect();
        let layouts = members
            .iter()
            .enumerate()
            .map(|(i, m)| ZeroLayout::with_filter(params, m.len(), |n| group_of.get(n) == Some(&i)))
            .collect();
        Self {
            layouts,
            members,
            group_of,
        }
    }
}

/// Where every trained parameter lies in the flat vector, and how it is cut into shards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZeroLayout {
    /// Trained parameters in order, with their flat ranges.
    pub params: Vec<(ParamId, Range<usize>)>,
    /// Shard `r`'s flat range.
    pub bounds: Vec<Range<usize>>,
    /// Shard `r`'s segments, in flat order.
    pub shards: Vec<Vec<Segment>>,
}

impl ZeroLayout {
    /// The layout of `params`' trained parameters over `dp` shards.
    pub fn new<T: shoal_kernels::Real>(params: &ParamStore<T>, dp: usize) -> Self {
        Self::with_filter(params, dp, |_| true)
    }

    /// The layout of the trained parameters whose names `keep` accepts, over `parts` shards.
    pub fn with_filter<T: shoal_kernels::Real>(
        params: &ParamStore<T>,
        parts: usize,
        keep: impl Fn(&str) -> bool,
    ) -> Self {
        let dp = parts;
        let mut at = 0;
        let list: Vec<(ParamId, Range<usize>)> = params
            .iter()
            .filter(|(id, name, _)| params.trainable(*id) && keep(name))
            .map(|(id, _, t)| {
                let r = at..at + t.numel();
                at = r.end;
                (id, r)
            })
            .collect();
        let bounds = even_bounds(at, dp);
        let shards = bounds
            .iter()
            .map(|b| {
                list.iter()
                    .filter_map(|(id, r)| {
                        let (s, e) = (r.start.max(b.start), r.end.min(b.end));
                        (s < e).then(|| Segment {
                            param: *id,
                            within: s - r.start..e - r.start,
                            flat: s..e,
                        })
                    })
                    .collect()
            })
            .collect();
        Self {
            params: list,
            bounds,
            shards,
        }
    }

    /// Elements of the flat vector.
    pub fn len(&self) -> usize {
        self.params.last().map_or(0, |(_, r)| r.end)
    }

    /// Whether no parameter is trained.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The gradients of the trained parameters, end to end.
    pub fn flatten(&self, grads: &Grads<f32>) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.len());
        for (id, _) in &self.params {
            out.extend_from_slice(grads.get(*id).data());
        }
        out
    }

    /// The current values of shard `r`.
    pub fn shard_values(&self, r: usize, params: &ParamStore<f32>) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.bounds[r].len());
        for s in &self.shards[r] {
            out.extend_from_slice(&params.get(s.param).data()[s.within.clone()]);
        }
        out
    }

    /// Writes shard `r`'s values (`flat`, the whole vector) into `params`.
    pub fn write_shard(&self, r: usize, flat: &[f32], params: &mut ParamStore<f32>) {
        for s in &self.shards[r] {
            params.get_mut(s.param).data_mut()[s.within.clone()]
                .copy_from_slice(&flat[s.flat.clone()]);
        }
    }

    /// Fresh optimizer state for shard `r`: one per segment.
    pub fn fresh_moments(&self, r: usize, cfg: &AdamWConfig) -> Vec<AdamWState> {
        self.shards[r]
            .iter()
            .map(|s| AdamWState::new(s.within.len(), cfg))
            .collect()
    }

    /// Joins the shards' segment states into one state per trained parameter (in
    /// [`Self::params`] order).
    pub fn assemble(&self, per_rank: &[Vec<AdamWState>]) -> Result<Vec<(ParamId, AdamWState)>> {
        let mut out: Vec<(ParamId, Option<AdamWState>)> =
            self.params.iter().map(|(id, _)| (*id, None)).collect();
        if out.is_empty() {
            return Ok(Vec::new());
        }
        let mut next = 0;
        for (segs, states) in self.shards.iter().zip(per_rank) {
            for (seg, st) in segs.iter().zip(states) {
                while out[next].0 != seg.param {
                    next += 1;
                }
                let slot = &mut out[next].1;
                match slot {
                    None => *slot = Some(st.clone()),
                    Some(acc) => {
                        acc.moments = match (
                            std::mem::replace(
                                &mut acc.moments,
                                Moments::F32 {
                                    m: Vec::new(),
                                    v: Vec::new(),
                                },
                            ),
                            &st.moments,
                        ) {
                            (Moments::F32 { mut m, mut v }, Moments::F32 { m: m2, v: v2 }) => {
                                m.extend_from_slice(m2);
                                v.extend_from_slice(v2);
                                Moments::F32 { m, v }
                            }
                            (Moments::Bf16 { mut m, mut v }, Moments::Bf16 { m: m2, v: v2 }) => {
                                m.extend_from_slice(m2);
                                v.extend_from_slice(v2);
                                Moments::Bf16 { m, v }
                            }
                            _ => {
                                return Err(WorkerError::invalid(
                                    "moments",
                                    "shards keep their moments in different precisions",
                                ));
                            }
                        };
                    }
                }
            }
        }
        out.into_iter()
            .map(|(id, st)| {
                st.map(|s| (id, s)).ok_or_else(|| {
                    WorkerError::invalid("moments", format!("no shard holds parameter {id:?}"))
                })
            })
            .collect()
    }

    /// Cuts one state per trained parameter (as [`Self::assemble`] returns) into the shards'
    /// segment states.
    pub fn split(&self, whole: &[(ParamId, AdamWState)]) -> Result<Vec<Vec<AdamWState>>> {
        self.shards
            .iter()
            .map(|segs| {
                segs.iter()
                    .map(|seg| {
                        let (_, st) =
                            whole
                                .iter()
                                .find(|(id, _)| *id == seg.param)
                                .ok_or_else(|| {
                                    WorkerError::invalid(
                                        "moments",
                                        format!("no state for parameter {:?}", seg.param),
                                    )
                                })?;
                        let w = seg.within.clone();
                        if w.end > st.len() {
                            return Err(WorkerError::invalid(
                                "moments",
                                format!("state of {} values, segment {w:?}", st.len()),
                            ));
                        }
                        let moments = match &st.moments {
                            Moments::F32 { m, v } => Moments::F32 {
                                m: m[w.clone()].to_vec(),
                                v: v[w].to_vec(),
                            },
                            Moments::Bf16 { m, v } => Moments::Bf16 {
                                m: m[w.clone()].to_vec(),
                                v: v[w].to_vec(),
                            },
                        };
                        Ok(AdamWState {
                            moments,
                            step: st.step,
                        })
                    })
                    .collect()
            })
            .collect()
    }
}

/// The routed expert a parameter belongs to (`...mlp.experts.J....`), if any.
pub fn expert_of(name: &str) -> Option<usize> {
    let rest = &name[name.find(".mlp.experts.")? + ".mlp.experts.".len()..];
    rest.split('.').next()?.parse().ok()
}
