//! Pipeline-parallel execution of one training step inside a process.
//!
//! Each pipeline rank is a stage actor on its own thread: it owns the state of its stages for
//! the step (the activations its forwards keep for their backwards, the deferred weight-gradient
//! work, its gradient buffers) and runs its operations in the order of a
//! [`shoal_spec::schedule::StepSchedule`]. Ranks exchange the residual stream (forward) and its
//! gradient (backward) as messages on their neighbours' inboxes; a rank that needs one waits
//! for it, with a timeout that names the operation, the micro-batch and the peer. When a rank
//! fails (or panics), the others stop at their next wait, and the step returns the failure that
//! caused it: the lowest rank's error that is not a stop because of another rank.
//!
//! Under DualPipe, rank `r` runs stage `r` for direction 0 and stage `pp - 1 - r` for
//! direction 1; with one set of parameters in the process, both directions train the same model.
//!
//! The result matches [`Model::forward_backward_micro`] over the same micro-batches: the same
//! forward and backward arithmetic per micro-batch, the same losses, and gradients summed per
//! parameter in micro-batch order on each rank (see [`run_step`] for where the order differs).

mod rank;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;
use shoal_kernels::Tensor;
use shoal_spec::schedule::{Op, StepSchedule};

use crate::model::ep::ExpertExchange;
use crate::model::params::Grads;
use crate::model::{
    Model, ModelFloat, Objective, StagePart, StepOutput, TokenBatch, split_micro, stage,
};
use crate::{Result, WorkerError};

use self::rank::{Links, RankActor, RankResult};
use crate::comm::expert::SharedEndpoint;

/// How long a rank waits for a peer's message before it fails the step.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// What a message between ranks carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Payload {
    /// A forward's output: the next stage's input.
    Activation,
    /// A backward's input gradient: the previous stage's output gradient.
    Gradient,
}

/// One transfer between neighbouring ranks.
pub(crate) struct Transfer<T> {
    payload: Payload,
    dir: u8,
    mb: usize,
    from: usize,
    tensor: Tensor<T>,
}

/// One operation as a rank ran it, in seconds from the start of the step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OpSpan {
    /// The operation.
    pub op: Op,
    /// When it started computing (after its inputs arrived).
    pub start: f64,
    /// When it ended.
    pub end: f64,
}

/// What a pipelined step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// Losses and expert loads of the whole step, as one pass over the batch reports them.
    pub out: StepOutput,
    /// Per rank, its operations as they ran.
    pub timeline: Vec<Vec<OpSpan>>,
    /// Bytes each rank sent to its neighbours (tensor payloads).
    pub bytes_sent: Vec<u64>,
    /// Wall time of the step.
    pub seconds: f64,
}

impl StepReport {
    /// Per rank, the step's time it did not compute: the last operation's end over all ranks,
    /// minus the rank's compute time.
    pub fn bubble(&self) -> Vec<f64> {
        let end = self
            .timeline
            .iter()
            .flatten()
            .map(|s| s.end)
            .fold(0.0, f64::max);
        self.timeline
            .iter()
            .map(|spans| end - spans.iter().map(|s| s.end - s.start).sum::<f64>())
            .collect()
    }
}

/// What every rank of a step reads.
pub(crate) struct Step<'a, T> {
    pub(crate) model: &'a Model<T>,
    /// The model's stages, in pipeline order.
    pub(crate) stages: &'a [StagePart],
    pub(crate) schedule: &'a StepSchedule,
    /// Micro-batches by the step's index (`StepSchedule::micro_index`) with their shares.
    pub(crate) micro: Vec<(TokenBatch<'a>, f64)>,
    pub(crate) obj: Objective,
    pub(crate) timeout: Duration,
    pub(crate) start: Instant,
    /// Set by the first rank that fails; the others stop at their next wait.
    pub(crate) abort: Arc<AtomicBool>,
    /// With expert parallelism: each rank's exchange with the same rank of the other pipelines
    /// in its expert-parallel group, one lane per direction (empty without).
    pub(crate) experts: &'a [[&'a dyn ExpertExchange; 2]],
    /// Run the two chunks of an overlapped pair at once (on two threads of the rank).
    pub(crate) overlap: bool,
}

impl<'a, T: ModelFloat> Step<'a, T> {
    /// The step of `batch` cut into the schedule's micro-batches, starting now.
    #[allow(clippy::too_many_arguments)]
    fn new(
        model: &'a Model<T>,
        stages: &'a [StagePart],
        schedule: &'a StepSchedule,
        batch: &TokenBatch<'a>,
        obj: &Objective,
        timeout: Duration,
        experts: &'a [[&'a dyn ExpertExchange; 2]],
        overlap: bool,
    ) -> Result<Self> {
        Ok(Self {
            model,
            stages,
            schedule,
            micro: split_micro(batch, schedule.micro_batches)?,
            obj: *obj,
            timeout,
            start: Instant::now(),
            abort: Arc::new(AtomicBool::new(false)),
            experts,
            overlap,
        })
    }
}

/// Runs one training step of `batch` split into `schedule.micro_batches` micro-batches over
/// `schedule.pp` pipeline ranks, each a thread, with the model cut into `stages`; accumulates
/// the step's gradients into `grads`.
///
/// Each rank accumulates its weight gradients in the order its schedule runs them (micro-batch
/// order for `1f1b` and `zb1p`; DualPipe interleaves its two directions), and the ranks' sums
/// are added in rank order. A parameter used on two stages (the embedding, read by the first
/// stage and by the MTP modules on the last) is therefore summed in another order than in one
/// pass, which changes its last bits.
pub fn run_step<T: ModelFloat>(
    model: &Model<T>,
    stages: &[StagePart],
    schedule: &StepSchedule,
    batch: &TokenBatch<'_>,
    obj: &Objective,
    grads: &mut Grads<T>,
    timeout: Duration,
) -> Result<StepReport> {
    run_step_with(
        model,
        stages,
        schedule,
        batch,
        obj,
        grads,
        timeout,
        &[],
        true,
    )
}

/// [`run_step`] with expert parallelism: pipeline rank `r` reaches the experts of its stages on
/// the other members of its expert-parallel group through `experts[r]`, direction `d`'s chunks
/// on lane `d` (every member runs the same schedule, so each lane's exchanges meet in the same
/// order). With `overlap`, the forward and backward chunks of an overlapped pair run at once.
#[allow(clippy::too_many_arguments)]
pub fn run_step_with<T: ModelFloat>(
    model: &Model<T>,
    stages: &[StagePart],
    schedule: &StepSchedule,
    batch: &TokenBatch<'_>,
    obj: &Objective,
    grads: &mut Grads<T>,
    timeout: Duration,
    experts: &[[&dyn ExpertExchange; 2]],
    overlap: bool,
) -> Result<StepReport> {
    schedule.check()?;
    let pp = schedule.pp;
    let n_stages = schedule.stage_count();
    if stages.len() != n_stages {
        return Err(WorkerError::invalid(
            "stages",
            format!(
                "{} stages for {pp} pipeline ranks under {} (which cuts the model into {n_stages})",
                stages.len(),
                schedule.name
            ),
        ));
    }
    if !experts.is_empty() && experts.len() != pp {
        return Err(WorkerError::invalid(
            "ep",
            format!("{} expert exchanges for {pp} pipeline ranks", experts.len()),
        ));
    }
    let step = Step::new(
        model, stages, schedule, batch, obj, timeout, experts, overlap,
    )?;
    let (senders, inboxes): (Vec<_>, Vec<_>) = (0..pp).map(|_| mpsc::channel()).unzip();
    // The ranks record their spans wherever the caller's do.
    let dispatch = tracing::dispatcher::get_default(|d| d.clone());
    let results: Vec<Result<RankResult<T>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = inboxes
            .into_iter()
            .enumerate()
            .map(|(r, inbox)| {
                // A rank holds senders to its neighbours only, so a rank that stops disconnects.
                let prev = (r > 0).then(|| senders[r - 1].clone());
                let next = senders.get(r + 1).cloned();
                let step = &step;
                let parent = tracing::Span::current();
                let dispatch = dispatch.clone();
                std::thread::Builder::new()
                    .name(format!("pp-rank-{r}"))
                    .spawn_scoped(scope, move || {
                        tracing::dispatcher::with_default(&dispatch, || {
                            let _span = tracing::debug_span!(parent: &parent, "pp_rank", rank = r)
                                .entered();
                            let links = Links::Threads { inbox, prev, next };
                            let ex = step
                                .experts
                                .get(r)
                                .map_or([None, None], |[a, b]| [Some(*a), Some(*b)]);
                            RankActor::new(step, r, links, ex).run()
                        })
                    })
            })
            .collect();
        drop(senders);
        handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| match h {
                Ok(h) => h.join().unwrap_or_else(|_| {
                    Err(WorkerError::Pipeline {
                        rank: r,
                        reason: "the rank's thread panicked".into(),
                    })
                }),
                Err(e) => Err(WorkerError::Pipeline {
                    rank: r,
                    reason: format!("cannot start the rank's thread: {e}"),
                }),
            })
            .collect()
    });
    // The root cause: the first failure that is not another rank's abort.
    let mut ranks = Vec::with_capacity(pp);
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(v) => ranks.push(v),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        let aborted = |e: &WorkerError| matches!(e, WorkerError::Pipeline { reason, .. } if reason.starts_with(rank::ABORTED));
        let i = errors.iter().position(|e| !aborted(e)).unwrap_or(0);
        return Err(errors.swap_remove(i));
    }
    let seconds = step.start.elapsed().as_secs_f64();

    // Gradients: each parameter a rank touched, added in rank order.
    for rank in &ranks {
        for &id in &rank.touched {
            grads.add(id, rank.grads.get(id))?;
        }
    }
    // Losses: per micro-batch from its stages' statistics in stage order, then weighted by the
    // micro-batches' shares in index order, as one pass over the micro-batches reports them.
    let n = step.micro.len();
    let mut stats: Vec<Vec<Option<stage::StageStats>>> = vec![vec![None; n_stages]; n];
    for rank in ranks.iter() {
        for (g, s, st) in &rank.stats {
            stats[*g][*s] = Some(st.clone());
        }
    }
    let mtp = model.config().num_nextn_predict_layers;
    let mut out = StepOutput::zero(mtp);
    for (g, per_stage) in stats.into_iter().enumerate() {
        let per_stage: Vec<stage::StageStats> = per_stage
            .into_iter()
            .enumerate()
            .map(|(s, st)| {
                st.ok_or_else(|| WorkerError::Pipeline {
                    rank: 0,
                    reason: format!(
                        "no stage ran the forward of the step's micro-batch {g} on stage {s}"
                    ),
                })
            })
            .collect::<Result<_>>()?;
        out.accumulate(stage::step_output(&per_stage, obj, mtp)?, step.micro[g].1);
    }
    Ok(StepReport {
        out,
        timeline: ranks.iter().map(|r| r.spans.clone()).collect(),
        bytes_sent: ranks.iter().map(|r| r.bytes_sent).collect(),
        seconds,
    })
}

/// One pipeline rank of a step whose ranks are devices of a mesh, possibly in other processes:
/// runs rank `rank`'s operations on this thread, reaching pipeline rank `r` at mesh rank
/// `devices[r]` through `link` (the endpoint it shares with its expert exchange: direction
/// `d`'s chunks exchange on `experts[d]`, a lane of that link). With `overlap`, the forward and
/// backward chunks of an overlapped pair run at once.
/// Accumulates the rank's weight gradients into `grads`.
///
/// The report's output is this rank's part of the step's: the losses of the stages it ran
/// (the head's only on the rank running the last stage of a direction), the balance losses and
/// expert loads of its stages' MoE layers (zero for the other stages' layers), each micro-batch
/// weighted by its share. The sum over the pipeline's ranks is the step's output.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_rank_on<T: ModelFloat>(
    model: &Model<T>,
    stages: &[StagePart],
    schedule: &StepSchedule,
    batch: &TokenBatch<'_>,
    obj: &Objective,
    grads: &mut Grads<T>,
    timeout: Duration,
    rank: usize,
    link: &dyn SharedEndpoint,
    devices: Vec<usize>,
    step_no: u64,
    experts: [Option<&dyn ExpertExchange>; 2],
    overlap: bool,
) -> Result<StepReport> {
    schedule.check()?;
    let pp = schedule.pp;
    if stages.len() != schedule.stage_count() || devices.len() != pp || rank >= pp {
        return Err(WorkerError::invalid(
            "stages",
            format!(
                "rank {rank} of {pp} pipeline ranks with {} stages on {} devices",
                stages.len(),
                devices.len()
            ),
        ));
    }
    let step = Step::new(model, stages, schedule, batch, obj, timeout, &[], overlap)?;
    let links = Links::Mesh {
        link,
        devices,
        step: step_no,
    };
    let res = {
        let _span = tracing::debug_span!("pp_rank", rank).entered();
        RankActor::new(&step, rank, links, experts).run()?
    };
    let seconds = step.start.elapsed().as_secs_f64();
    for &id in &res.touched {
        grads.add(id, res.grads.get(id))?;
    }
    // The MoE layers before each stage's, and the expert count of each.
    let cfg = model.config();
    let mut offset = Vec::with_capacity(pp);
    let mut layers = 0;
    for part in stages {
        offset.push(layers);
        layers += part.moe_layers(cfg);
    }
    let experts_n = cfg.n_routed_experts;
    let mtp = cfg.num_nextn_predict_layers;
    let mut out = StepOutput::zero(mtp);
    out.expert_loads = vec![vec![0; experts_n]; layers];
    for (g, s, st) in &res.stats {
        let mut part = stage::partial_output(st, obj, mtp);
        let mut loads = vec![vec![0; experts_n]; layers];
        for (i, l) in std::mem::take(&mut part.expert_loads)
            .into_iter()
            .enumerate()
        {
            if let Some(slot) = loads.get_mut(offset[*s] + i) {
                *slot = l;
            }
        }
        part.expert_loads = loads;
        out.accumulate(part, step.micro[*g].1);
    }
    Ok(StepReport {
        out,
        timeline: vec![res.spans],
        bytes_sent: vec![res.bytes_sent],
        seconds,
    })
}
