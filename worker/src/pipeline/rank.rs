//! One pipeline rank: a stage actor that runs its schedule's operations in order.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use shoal_kernels::Tensor;
use shoal_spec::schedule::{Chunk, Op, Pass};

use shoal_kernels::ops::linear::Precision;

use super::{OpSpan, Payload, Step, Transfer};
use crate::comm::expert::SharedEndpoint;
use crate::comm::transport::{CommOp, Tag};
use crate::model::ep::ExpertExchange;
use crate::model::params::{Grads, ParamId};
use crate::model::stage::{StageSaved, StageStats};
use crate::model::wgrad::{self, WTask};
use crate::model::{ModelFloat, Objective};
use crate::{Result, WorkerError};

/// How a rank's error starts when it stopped because another rank failed.
pub(crate) const ABORTED: &str = "stopped: another rank failed";

/// How often a waiting rank checks whether the step was aborted.
const POLL: Duration = Duration::from_millis(20);

/// What a rank hands back at the end of the step.
pub(crate) struct RankResult<T> {
    pub(crate) grads: Grads<T>,
    /// Parameters whose gradient this rank accumulated.
    pub(crate) touched: Vec<ParamId>,
    /// `(global micro-batch, stage, statistics)` of every forward it ran.
    pub(crate) stats: Vec<(usize, usize, StageStats)>,
    pub(crate) spans: Vec<OpSpan>,
    pub(crate) bytes_sent: u64,
}

/// How a rank reaches its neighbours.
pub(crate) enum Links<'l, T> {
    /// Ranks on threads of this step: queues to the neighbours (a rank holds senders to its
    /// neighbours only, so a rank that stops disconnects).
    Threads {
        inbox: Receiver<Transfer<T>>,
        prev: Option<Sender<Transfer<T>>>,
        next: Option<Sender<Transfer<T>>>,
    },
    /// Ranks on devices of a mesh (possibly in other processes): frames over the endpoint this
    /// rank shares with its expert exchange. `devices[r]` is pipeline rank `r`'s mesh rank.
    Mesh {
        link: &'l dyn SharedEndpoint,
        devices: Vec<usize>,
        step: u64,
    },
}

/// The sending side of a rank's links, which both threads of an overlapped pair use.
enum Outbound<'o, T> {
    Threads {
        prev: Option<&'o Sender<Transfer<T>>>,
        next: Option<&'o Sender<Transfer<T>>>,
    },
    Mesh {
        link: &'o dyn SharedEndpoint,
        devices: &'o [usize],
        step: u64,
    },
}

/// What running one chunk needs and may touch: shared by the two threads of an overlapped
/// pair (each runs one chunk and returns what the rank's state should record).
struct ChunkCtx<'o, 's, 'a, T> {
    step: &'s Step<'a, T>,
    rank: usize,
    out: Outbound<'o, T>,
    /// The exchange of each direction's chunks (its lane of the rank's expert-parallel link).
    experts: [Option<&'s dyn ExpertExchange>; 2],
}

/// What a forward chunk leaves behind: what the backward needs, the statistics, bytes sent,
/// and its output when the next stage is this rank's own (DualPipeV's turn).
type Forwarded<T> = (
    StageSaved<T>,
    (usize, usize, StageStats),
    u64,
    Option<Handoff<T>>,
);

/// What a backward chunk leaves behind: its weight gradients' deferred work, bytes sent, and
/// its input gradient when the previous stage is this rank's own.
type Backwarded<T> = (Vec<WTask<T>>, u64, Option<Handoff<T>>);

/// A chunk's output for this rank's own chunk of the neighbouring stage: no transfer, filed
/// where that chunk looks for its input.
struct Handoff<T> {
    key: (Payload, u8, usize),
    tensor: Tensor<T>,
}

pub(crate) struct RankActor<'s, 'a, T> {
    step: &'s Step<'a, T>,
    rank: usize,
    links: Links<'s, T>,
    /// The exchange of direction `d`'s chunks at `experts[d]` (two lanes of one link, so an
    /// overlapped pair's chunks can exchange at once).
    experts: [Option<&'s dyn ExpertExchange>; 2],
    /// Messages that arrived before the operation that needs them.
    early: HashMap<(Payload, u8, usize), Tensor<T>>,
    saved: HashMap<(u8, usize), StageSaved<T>>,
    deferred: HashMap<(u8, usize), Vec<WTask<T>>>,
    grads: Grads<T>,
    touched: HashSet<ParamId>,
    stats: Vec<(usize, usize, StageStats)>,
    spans: Vec<OpSpan>,
    bytes_sent: u64,
}

impl<'s, 'a, T: ModelFloat> RankActor<'s, 'a, T> {
    pub(crate) fn new(
        step: &'s Step<'a, T>,
        rank: usize,
        links: Links<'s, T>,
        experts: [Option<&'s dyn ExpertExchange>; 2],
    ) -> Self {
        Self {
            step,
            rank,
            links,
            experts,
            early: HashMap::new(),
            saved: HashMap::new(),
            deferred: HashMap::new(),
            grads: step.model.params().zero_grads(),
            touched: HashSet::new(),
            stats: Vec::new(),
            spans: Vec::new(),
            bytes_sent: 0,
        }
    }

    /// Runs the rank's operations; on failure (or a panic), tells the other ranks to stop.
    pub(crate) fn run(mut self) -> Result<RankResult<T>> {
        /// Sets the abort flag unless disarmed: a panic unwinding through `run` stops the
        /// other ranks too.
        struct AbortOnDrop<'f>(&'f std::sync::atomic::AtomicBool, bool);
        impl Drop for AbortOnDrop<'_> {
            fn drop(&mut self) {
                if self.1 {
                    self.0.store(true, Ordering::SeqCst);
                }
            }
        }
        let step = self.step;
        let mut guard = AbortOnDrop(&step.abort, true);
        for op in &step.schedule.ranks[self.rank] {
            self.run_op(*op)?;
        }
        if let Some(((p, dir, mb), _)) = self.early.iter().next() {
            return Err(self.fail(format!(
                "a {} for micro-batch {dir}.{mb} arrived that no operation used",
                name(*p)
            )));
        }
        // Every forward's backward and every backward's weight gradient ran.
        if let Some((dir, mb)) = self.saved.keys().next() {
            return Err(self.fail(format!("F{dir}.{mb} ran but its backward did not")));
        }
        if let Some((dir, mb)) = self.deferred.keys().next() {
            return Err(self.fail(format!("B{dir}.{mb} ran but its weight gradient did not")));
        }
        guard.1 = false;
        let mut touched: Vec<ParamId> = self.touched.into_iter().collect();
        touched.sort_by_key(|p| p.index());
        Ok(RankResult {
            grads: self.grads,
            touched,
            stats: self.stats,
            spans: self.spans,
            bytes_sent: self.bytes_sent,
        })
    }

    /// A failure because a peer stopped: marked as a consequence when the step was aborted
    /// (the peer failed first and its own error is the one to report).
    fn peer_gone(&self, reason: String) -> WorkerError {
        if self.step.abort.load(Ordering::SeqCst) {
            self.fail(format!("{ABORTED} ({reason})"))
        } else {
            self.fail(reason)
        }
    }

    fn fail(&self, reason: String) -> WorkerError {
        WorkerError::Pipeline {
            rank: self.rank,
            reason,
        }
    }

    fn run_op(&mut self, op: Op) -> Result<()> {
        // Inputs first, so the span covers compute only.
        let inputs: Vec<(Chunk, Option<Tensor<T>>)> = op
            .chunks()
            .map(|c| Ok((c, self.input(c, &op)?)))
            .collect::<Result<_>>()?;
        let start = self.step.start.elapsed().as_secs_f64();
        let _span = tracing::debug_span!("op", op = %op, rank = self.rank).entered();
        match (op, self.step.overlap) {
            (Op::Overlapped { f, b }, true) if f.pass == Pass::F && b.pass == Pass::B => {
                let mut it = inputs.into_iter().map(|(_, i)| i);
                let (fin, bin) = (it.next().flatten(), it.next().flatten());
                self.overlapped(f, fin, b, bin)?;
            }
            _ => {
                for (c, input) in inputs {
                    match c.pass {
                        Pass::F => self.forward(c, input)?,
                        Pass::B => self.backward(c, input)?,
                        Pass::W => self.weights(c)?,
                    }
                }
            }
        }
        let end = self.step.start.elapsed().as_secs_f64();
        self.spans.push(OpSpan { op, start, end });
        Ok(())
    }

    /// The context chunks run in (the rank's sending side and exchanges).
    fn ctx(&self) -> ChunkCtx<'_, 's, 'a, T> {
        ChunkCtx {
            step: self.step,
            rank: self.rank,
            out: match &self.links {
                Links::Threads { prev, next, .. } => Outbound::Threads {
                    prev: prev.as_ref(),
                    next: next.as_ref(),
                },
                Links::Mesh {
                    link,
                    devices,
                    step,
                } => Outbound::Mesh {
                    link: *link,
                    devices,
                    step: *step,
                },
            },
            experts: self.experts,
        }
    }

    /// An overlapped pair: the forward chunk `f` on a second thread of this rank (its own
    /// stream in the trace) while this thread runs the backward chunk `b`, as DualPipe overlaps
    /// the two directions. They share nothing mutable: each exchanges on its direction's lane
    /// and sends on its own, and the rank records their results after both finish. A failure
    /// in either stops the mesh, so the other does not wait for a peer that will not answer.
    fn overlapped(
        &mut self,
        f: Chunk,
        fin: Option<Tensor<T>>,
        b: Chunk,
        bin: Option<Tensor<T>>,
    ) -> Result<()> {
        let saved = self
            .saved
            .remove(&(b.dir, b.mb))
            .ok_or_else(|| self.fail(format!("B{}.{} runs before its forward", b.dir, b.mb)))?;
        let ctx = self.ctx();
        let dispatch = tracing::dispatcher::get_default(|d| d.clone());
        let parent = tracing::Span::current();
        let name = format!("{}-fwd", std::thread::current().name().unwrap_or("pp-rank"));
        let (rf, rb) = std::thread::scope(|s| {
            let ctx = &ctx;
            let h = std::thread::Builder::new().name(name).spawn_scoped(s, || {
                tracing::dispatcher::with_default(&dispatch, || {
                    let _parent = parent.enter();
                    let r = ctx.forward(f, fin);
                    if r.is_err() {
                        ctx.stop_all();
                    }
                    r
                })
            });
            let rb = ctx.backward(b, saved, bin);
            if rb.is_err() {
                ctx.stop_all();
            }
            let rf = match h {
                Ok(h) => h.join().unwrap_or_else(|_| {
                    ctx.stop_all();
                    Err(ctx.fail("the forward thread panicked".into()))
                }),
                Err(e) => {
                    ctx.stop_all();
                    Err(ctx.fail(format!("cannot start the forward thread: {e}")))
                }
            };
            (rf, rb)
        });
        let (rf, rb) = match (rf, rb) {
            (Ok(f), Ok(b)) => (f, b),
            // The root cause: the error that is not the consequence of the other's.
            (Err(e), Ok(_)) | (Ok(_), Err(e)) => return Err(e),
            (Err(ef), Err(eb)) => {
                let consequence = |e: &WorkerError| e.to_string().contains(ABORTED);
                return Err(if consequence(&ef) && !consequence(&eb) {
                    eb
                } else {
                    ef
                });
            }
        };
        let (saved, stats, bytes_f, handoff_f) = rf;
        let (w, bytes_b, handoff_b) = rb;
        self.saved.insert((f.dir, f.mb), saved);
        self.stats.push(stats);
        self.deferred.insert((b.dir, b.mb), w);
        self.bytes_sent += bytes_f + bytes_b;
        self.keep(handoff_f)?;
        self.keep(handoff_b)
    }

    /// The stage this rank runs for direction `dir`, and its position along that direction.
    fn stage(&self, dir: u8) -> usize {
        self.step.schedule.position(self.rank, dir)
    }

    /// The message chunk `c` needs before it can run, if any.
    fn input(&mut self, c: Chunk, op: &Op) -> Result<Option<Tensor<T>>> {
        let stages = self.step.schedule.stage_count();
        let pos = self.stage(c.dir);
        let (payload, from) = match c.pass {
            Pass::F if pos > 0 => (Payload::Activation, self.neighbour(c.dir, pos - 1)),
            Pass::B if pos + 1 < stages => (Payload::Gradient, self.neighbour(c.dir, pos + 1)),
            _ => return Ok(None),
        };
        // Handed over by this rank's own chunk of the neighbouring stage (DualPipeV's turn).
        if from == self.rank {
            return match self.early.remove(&(payload, c.dir, c.mb)) {
                Some(t) => Ok(Some(t)),
                None => Err(self.fail(format!(
                    "{op} needs the {} of micro-batch {}.{} from this rank's own other stage, \
                     which has not run",
                    name(payload),
                    c.dir,
                    c.mb
                ))),
            };
        }
        self.wait(payload, c, from, op).map(Some)
    }

    /// The rank at `pos` along direction `dir`.
    fn neighbour(&self, dir: u8, pos: usize) -> usize {
        self.step.schedule.rank_at(dir, pos)
    }

    fn wait(&mut self, payload: Payload, c: Chunk, from: usize, op: &Op) -> Result<Tensor<T>> {
        let _span = tracing::debug_span!(
            "recv",
            from,
            payload = name(payload),
            dir = c.dir,
            mb = c.mb
        )
        .entered();
        if let Links::Mesh {
            link,
            devices,
            step,
        } = &self.links
        {
            let tag = Tag::pipeline(*step, op_of(payload), c.dir, c.mb);
            let peer = devices[from];
            let bytes = link.recv_from(peer, tag)?;
            return decode(&bytes).map_err(|why| {
                self.fail(format!(
                    "{op} got a malformed {} of micro-batch {}.{} from rank {from}: {why}",
                    name(payload),
                    c.dir,
                    c.mb
                ))
            });
        }
        let Links::Threads { inbox, .. } = &self.links else {
            unreachable!("mesh links returned above")
        };
        let key = (payload, c.dir, c.mb);
        if let Some(t) = self.early.remove(&key) {
            return Ok(t);
        }
        let deadline = Instant::now() + self.step.timeout;
        loop {
            if self.step.abort.load(Ordering::SeqCst) {
                return Err(self.fail(format!("{ABORTED} while {op} waited for rank {from}")));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.fail(format!(
                    "{op} waited {:?} for the {} of micro-batch {}.{} from rank {from}",
                    self.step.timeout,
                    name(payload),
                    c.dir,
                    c.mb
                )));
            }
            match inbox.recv_timeout(left.min(POLL)) {
                Ok(t) => {
                    let got = (t.payload, t.dir, t.mb);
                    if !self.expects(&t) {
                        return Err(self.fail(format!(
                            "rank {} sent a {} for micro-batch {}.{} that this rank never takes from it",
                            t.from,
                            name(t.payload),
                            t.dir,
                            t.mb
                        )));
                    }
                    if got == key {
                        return Ok(t.tensor);
                    }
                    if self.early.insert(got, t.tensor).is_some() {
                        return Err(self.fail(format!(
                            "rank {} sent the {} of micro-batch {}.{} twice",
                            t.from,
                            name(t.payload),
                            t.dir,
                            t.mb
                        )));
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.peer_gone(format!(
                        "{op} waited for the {} of micro-batch {}.{} from rank {from}, which stopped",
                        name(payload),
                        c.dir,
                        c.mb
                    )));
                }
            }
        }
    }

    /// Whether a message is one this rank takes from its sender: activations from the previous
    /// position of their direction, gradients from the next, for a micro-batch of the step.
    fn expects(&self, t: &Transfer<T>) -> bool {
        let s = self.step.schedule;
        if t.dir >= s.directions() || t.mb >= s.per_direction() {
            return false;
        }
        let pos = self.stage(t.dir);
        match t.payload {
            Payload::Activation => pos > 0 && t.from == self.neighbour(t.dir, pos - 1),
            Payload::Gradient => {
                pos + 1 < s.stage_count() && t.from == self.neighbour(t.dir, pos + 1)
            }
        }
    }

    fn forward(&mut self, c: Chunk, input: Option<Tensor<T>>) -> Result<()> {
        let (saved, stats, bytes, handoff) = self.ctx().forward(c, input)?;
        self.saved.insert((c.dir, c.mb), saved);
        self.stats.push(stats);
        self.bytes_sent += bytes;
        self.keep(handoff)
    }

    fn backward(&mut self, c: Chunk, dout: Option<Tensor<T>>) -> Result<()> {
        let saved = self
            .saved
            .remove(&(c.dir, c.mb))
            .ok_or_else(|| self.fail(format!("B{}.{} runs before its forward", c.dir, c.mb)))?;
        let (w, bytes, handoff) = self.ctx().backward(c, saved, dout)?;
        self.deferred.insert((c.dir, c.mb), w);
        self.bytes_sent += bytes;
        self.keep(handoff)
    }

    /// Files a chunk's output for this rank's own chunk of the neighbouring stage.
    fn keep(&mut self, handoff: Option<Handoff<T>>) -> Result<()> {
        if let Some(h) = handoff
            && self.early.insert(h.key, h.tensor).is_some()
        {
            let (p, dir, mb) = h.key;
            return Err(self.fail(format!(
                "the {} of micro-batch {dir}.{mb} was handed over twice",
                name(p)
            )));
        }
        Ok(())
    }

    fn weights(&mut self, c: Chunk) -> Result<()> {
        let tasks = self
            .deferred
            .remove(&(c.dir, c.mb))
            .ok_or_else(|| self.fail(format!("W{}.{} runs before its backward", c.dir, c.mb)))?;
        let _span = tracing::debug_span!("wgrad", dir = c.dir, mb = c.mb).entered();
        self.touched.extend(tasks.iter().map(WTask::param));
        wgrad::run_all(tasks, &mut self.grads)
    }
}

impl<T: ModelFloat> ChunkCtx<'_, '_, '_, T> {
    fn fail(&self, reason: String) -> WorkerError {
        WorkerError::Pipeline {
            rank: self.rank,
            reason,
        }
    }

    /// A failure because a peer stopped (see [`RankActor::peer_gone`]).
    fn peer_gone(&self, reason: String) -> WorkerError {
        if self.step.abort.load(Ordering::SeqCst) {
            self.fail(format!("{ABORTED} ({reason})"))
        } else {
            self.fail(reason)
        }
    }

    /// Stops the step on every rank: this one failed.
    fn stop_all(&self) {
        self.step.abort.store(true, Ordering::SeqCst);
        if let Outbound::Mesh { link, .. } = &self.out {
            link.abort();
        }
        for e in self.experts.iter().flatten() {
            e.abort();
        }
    }

    fn stage(&self, dir: u8) -> usize {
        self.step.schedule.position(self.rank, dir)
    }

    /// The exchange of direction `dir`'s chunks, if any.
    fn experts(&self, dir: u8) -> Option<&dyn ExpertExchange> {
        self.experts[usize::from(dir.min(1))]
    }

    /// The global index of micro-batch `mb` of direction `dir`, and its objective.
    fn micro(&self, c: Chunk) -> (usize, Objective) {
        let g = self.step.schedule.micro_index(c.dir, c.mb);
        let share = self.step.micro[g].1;
        let obj = Objective {
            loss_scale: self.step.obj.loss_scale * share,
            ..self.step.obj
        };
        (g, obj)
    }

    /// Runs forward chunk `c` and sends its output on: what the rank keeps for the backward,
    /// the statistics, and the bytes sent.
    fn forward(&self, c: Chunk, input: Option<Tensor<T>>) -> Result<Forwarded<T>> {
        let stage = self.stage(c.dir);
        let (g, obj) = self.micro(c);
        let part = &self.step.stages[stage];
        let b = &self.step.micro[g].0;
        let _span = tracing::debug_span!("forward", stage, dir = c.dir, mb = c.mb).entered();
        let (out, saved, stats) =
            self.step
                .model
                .stage_forward(part, b, input, &obj, self.experts(c.dir))?;
        let (bytes, handoff) = match out {
            Some(out) => self.pass_on(Payload::Activation, c, stage + 1, out)?,
            None => (0, None),
        };
        Ok((saved, (g, stage, stats), bytes, handoff))
    }

    /// Runs backward chunk `c` (input gradients only) and sends the gradient on: the weight
    /// gradients' deferred work, and the bytes sent.
    fn backward(
        &self,
        c: Chunk,
        saved: StageSaved<T>,
        dout: Option<Tensor<T>>,
    ) -> Result<Backwarded<T>> {
        let stage = self.stage(c.dir);
        let (g, obj) = self.micro(c);
        let part = &self.step.stages[stage];
        let b = &self.step.micro[g].0;
        let _span = tracing::debug_span!("backward", stage, dir = c.dir, mb = c.mb).entered();
        let mut w = Vec::new();
        let din = self.step.model.stage_backward(
            part,
            b,
            saved,
            dout,
            &obj,
            self.experts(c.dir),
            &mut w,
        )?;
        let (bytes, handoff) = match din {
            Some(din) => self.pass_on(Payload::Gradient, c, stage - 1, din)?,
            None => (0, None),
        };
        Ok((w, bytes, handoff))
    }

    /// Hands chunk `c`'s output to the stage at `pos` along its path: sent to the rank holding
    /// it, or kept for this rank's own chunk there.
    fn pass_on(
        &self,
        payload: Payload,
        c: Chunk,
        pos: usize,
        tensor: Tensor<T>,
    ) -> Result<(u64, Option<Handoff<T>>)> {
        let (to, dir) = self.step.schedule.holder(c.dir, pos);
        if to == self.rank {
            let key = (payload, dir, c.mb);
            return Ok((0, Some(Handoff { key, tensor })));
        }
        Ok((self.send(payload, c, to, tensor)?, None))
    }

    /// Sends `tensor` to rank `to`; returns the bytes it counts as.
    fn send(&self, payload: Payload, c: Chunk, to: usize, tensor: Tensor<T>) -> Result<u64> {
        // Activations and gradients travel in the precision mode: BF16 in BF16 and FP8 runs (as
        // the report's pipeline sends them), full width in FP32 runs.
        let (tensor, bytes) = match self.step.model.precision() {
            Precision::Fp32 => {
                let b = (tensor.numel() * std::mem::size_of::<T>()) as u64;
                (tensor, b)
            }
            _ => {
                let b = (tensor.numel() * 2) as u64;
                (
                    tensor.map(|v| T::of(half::bf16::from_f64(v.f64()).to_f64())),
                    b,
                )
            }
        };
        let _span = tracing::debug_span!(
            "send",
            to,
            payload = name(payload),
            dir = c.dir,
            mb = c.mb,
            bytes
        )
        .entered();
        let (prev, next) = match &self.out {
            Outbound::Mesh {
                link,
                devices,
                step,
            } => {
                let tag = Tag::pipeline(*step, op_of(payload), c.dir, c.mb);
                let peer = *devices
                    .get(to)
                    .ok_or_else(|| self.fail(format!("no pipeline rank {to}")))?;
                let frame = encode(&tensor, self.step.model.precision());
                link.send_to(peer, tag, frame)?;
                return Ok(bytes);
            }
            Outbound::Threads { prev, next } => (prev, next),
        };
        let link = if to + 1 == self.rank {
            prev.as_ref()
        } else if to == self.rank + 1 {
            next.as_ref()
        } else {
            None
        };
        let Some(link) = link else {
            return Err(self.fail(format!("rank {to} is not a neighbour")));
        };
        let t = Transfer {
            payload,
            dir: c.dir,
            mb: c.mb,
            from: self.rank,
            tensor,
        };
        if link.send(t).is_err() {
            return Err(self.peer_gone(format!(
                "rank {to} stopped before the {} of micro-batch {}.{} reached it",
                name(payload),
                c.dir,
                c.mb
            )));
        }
        Ok(bytes)
    }
}

fn op_of(p: Payload) -> CommOp {
    match p {
        Payload::Activation => CommOp::Activation,
        Payload::Gradient => CommOp::Gradient,
    }
}

/// A tensor as a frame: its rank, its dimensions (u64 each), then its values in the precision
/// mode's pipeline format (BF16 in BF16 and FP8 runs, the model's float otherwise).
fn encode<T: ModelFloat>(t: &Tensor<T>, prec: Precision) -> Vec<u8> {
    let width = width::<T>(prec);
    let mut out = Vec::with_capacity(4 + 8 * t.shape().len() + width * t.numel());
    out.extend_from_slice(&(t.shape().len() as u32).to_le_bytes());
    for &d in t.shape() {
        out.extend_from_slice(&(d as u64).to_le_bytes());
    }
    out.push(width as u8);
    for v in t.data() {
        match width {
            2 => out.extend_from_slice(&half::bf16::from_f64(v.f64()).to_le_bytes()),
            4 => out.extend_from_slice(&(v.f64() as f32).to_le_bytes()),
            _ => out.extend_from_slice(&v.f64().to_le_bytes()),
        }
    }
    out
}

/// Bytes per value on the wire.
fn width<T>(prec: Precision) -> usize {
    match prec {
        Precision::Fp32 => std::mem::size_of::<T>().max(4),
        _ => 2,
    }
}

/// The tensor of a frame written by [`encode`]; every length checked.
fn decode<T: ModelFloat>(b: &[u8]) -> std::result::Result<Tensor<T>, String> {
    let take = |at: usize, n: usize| {
        b.get(at..at + n)
            .ok_or_else(|| format!("{} bytes, truncated at byte {at}", b.len()))
    };
    let rank = u32::from_le_bytes(take(0, 4)?.try_into().map_err(|_| "rank")?) as usize;
    if rank > 8 {
        return Err(format!("a tensor of rank {rank}"));
    }
    let mut shape = Vec::with_capacity(rank);
    for i in 0..rank {
        let d = u64::from_le_bytes(take(4 + 8 * i, 8)?.try_into().map_err(|_| "dim")?);
        shape.push(usize::try_from(d).map_err(|_| format!("dimension {d}"))?);
    }
    let at = 4 + 8 * rank;
    let width = usize::from(take(at, 1)?[0]);
    if !matches!(width, 2 | 4 | 8) {
        return Err(format!("{width} bytes per value"));
    }
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("the shape overflows")?;
    let body = &b[at + 1..];
    if Some(body.len()) != n.checked_mul(width) {
        return Err(format!(
            "{} value bytes for shape {shape:?} at {width} bytes each",
            body.len()
        ));
    }
    let data: Vec<T> = match width {
        2 => body
            .chunks_exact(2)
            .map(|c| T::of(half::bf16::from_le_bytes([c[0], c[1]]).to_f64()))
            .collect(),
        4 => body
            .chunks_exact(4)
            .map(|c| T::of(f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))))
            .collect(),
        _ => body
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                T::of(f64::from_le_bytes(a))
            })
            .collect(),
    };
    Tensor::new(shape, data).map_err(|e| e.to_string())
}

fn name(p: Payload) -> &'static str {
    match p {
        Payload::Activation => "activation",
        Payload::Gradient => "gradient",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipeline_frames_round_trip_in_the_modes_width_and_refuse_malformed_bytes() {
        let t = Tensor::new(vec![2, 3], vec![1.0f32, -2.5, 3.25, 0.0, 1e-3, -7.0]).unwrap();
        let full = encode(&t, Precision::Fp32);
        assert_eq!(full.len(), 4 + 2 * 8 + 1 + 6 * 4);
        assert_eq!(decode::<f32>(&full).unwrap(), t);
        // BF16 in the mixed modes: half the value bytes, values rounded to BF16.
        let half = encode(&t, Precision::Fp8);
        assert_eq!(half.len(), 4 + 2 * 8 + 1 + 6 * 2);
        let back = decode::<f32>(&half).unwrap();
        assert_eq!(back.shape(), t.shape());
        for (a, b) in back.data().iter().zip(t.data()) {
            assert_eq!(*a, half::bf16::from_f32(*b).to_f32());
        }
        // Truncated anywhere, padded, a bad width, an absurd rank: errors, never panics.
        for n in 0..full.len() {
            assert!(decode::<f32>(&full[..n]).is_err(), "{n} bytes");
        }
        let mut padded = full.clone();
        padded.push(0);
        assert!(decode::<f32>(&padded).unwrap_err().contains("value bytes"));
        let mut width = full.clone();
        width[4 + 16] = 3;
        assert!(
            decode::<f32>(&width)
                .unwrap_err()
                .contains("bytes per value")
        );
        let mut rank = full;
        rank[0] = 200;
        assert!(decode::<f32>(&rank).unwrap_err().contains("rank"));
        let mut huge = vec![2, 0, 0, 0];
        huge.extend(u64::MAX.to_le_bytes());
        huge.extend(u64::MAX.to_le_bytes());
        huge.push(4);
        assert!(decode::<f32>(&huge).is_err());
    }
}
