//! Pipeline schedules as data: for every pipeline rank, the ordered operations of one training
//! step, and a simulator that runs them against each other to find the step's timeline and bubble.
//!
//! An operation is a forward chunk `F`, a backward-for-input chunk `B` or a backward-for-weights
//! chunk `W` of one micro-batch in one direction, written `F0.3` (forward, direction 0,
//! micro-batch 3), or two chunks overlapped, written `F0.3&B1.1`. Direction 0 enters the pipeline
//! at rank 0 (stage `r` on rank `r`); DualPipe's direction 1 enters at rank `pp - 1` (stage
//! `pp - 1 - r` on rank `r`). Micro-batches are numbered per direction. A backward whose weight
//! gradient is not deferred is written as its `B` followed at once by its `W`.
//!
//! The schedules:
//! - `1f1b`: `pp - 1 - r` warm-up forwards on rank `r`, then one forward and one backward in
//!   turn, then the remaining backwards.
//! - `zb1p`: 1F1B's order of forwards and backwards with every `W` deferred (ZB-H1 of Qi et al.,
//!   "Zero Bubble Pipeline Parallelism"): a rank runs its oldest pending `W` whenever its next
//!   forward or backward would wait, or when another forward would hold more than `pp`
//!   micro-batches of activations; the rest run at the end.
//! - `dualpipe`: the eight steps of DeepSeek's DualPipe (see `../shared/reference`), with `H = pp/2`,
//!   `h = min(r, pp - 1 - r)` and `C` micro-batches per direction: `F0 x 2(H-h-1)`;
//!   `(F0, F1) x (h+1)`; `(B1 deferring W, W, F1) x (H-h-1)`; `(F0&B1, F1&B0) x (C-pp+h+1)` (the
//!   middle ranks run their first `F0` and `B1` apart); `(B1, F1&B0) x (H-h-1)`; `(B1, B0) x
//!   (h+1)` with the second half deferring `W`; `(W, B0 deferring W) x (H-h-1)`; `W x (h+1)`.
//!   Directions in these steps are the rank's own: on the second half of the ranks, the rank's
//!   direction 0 is the pipeline's direction 1.
//! - `dualpipev`: DualPipe cut in half (DeepSeek's `DualPipeV`): `2 pp` stages in a V, rank `r`
//!   holding stage `r` (phase 0, on the way down) and stage `2 pp - 1 - r` (phase 1, on the way
//!   back up), so every micro-batch enters and leaves at rank 0 and turns on rank `pp - 1`
//!   without a transfer. A chunk's "direction" is its phase, and both phases run every one of
//!   the `C` micro-batches. With `p = pp - 1 - r`: `F0 x 2p`; `(F0, F1) x (r+1)`; `(B1 deferring
//!   W, W, F1) x p`; `(F0&B1, F1&B0) x (C-2pp+r+1)` (the last rank runs its first `F0` and `B1`
//!   apart); `(B1, F1&B0) x p`; `(B1, B0) x (r+1)` with the second half deferring `W`; `(W, B0
//!   deferring W) x p`; `W x (r+1)`.

use std::collections::{HashMap, VecDeque};
use std::fmt;

use serde::{Serialize, Serializer};

use crate::SpecError;
use crate::plan::Schedule;

/// Which pass a chunk is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pass {
    /// Forward.
    F,
    /// Backward for the input gradient.
    B,
    /// Backward for the weight gradient.
    W,
}

/// One pass of one micro-batch through the stage a rank holds for `dir`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Chunk {
    /// The pass.
    pub pass: Pass,
    /// The pipeline direction (0 enters at rank 0, 1 at rank `pp - 1`).
    pub dir: u8,
    /// The micro-batch, numbered within its direction.
    pub mb: usize,
}

impl fmt::Display for Chunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = match self.pass {
            Pass::F => 'F',
            Pass::B => 'B',
            Pass::W => 'W',
        };
        write!(f, "{p}{}.{}", self.dir, self.mb)
    }
}

/// One operation of a rank's step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// One chunk.
    One(Chunk),
    /// A forward and a backward chunk of the two directions computed together, each one's
    /// communication hidden behind the other's compute.
    Overlapped {
        /// The forward chunk.
        f: Chunk,
        /// The backward-for-input chunk.
        b: Chunk,
    },
}

impl Op {
    /// The chunks the operation runs.
    pub fn chunks(&self) -> impl Iterator<Item = Chunk> {
        let (a, b) = match *self {
            Op::One(c) => (c, None),
            Op::Overlapped { f, b } => (f, Some(b)),
        };
        std::iter::once(a).chain(b)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::One(c) => c.fmt(f),
            Op::Overlapped { f: a, b } => write!(f, "{a}&{b}"),
        }
    }
}

impl Serialize for Op {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The operations of one training step, rank by rank.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepSchedule {
    /// The schedule.
    pub name: Schedule,
    /// Pipeline ranks.
    pub pp: usize,
    /// Micro-batches per step (over both directions for DualPipe).
    pub micro_batches: usize,
    /// Per rank, its operations in order.
    pub ranks: Vec<Vec<Op>>,
}

impl StepSchedule {
    /// Checks that there is one operation list per rank (the fields are public).
    pub fn check(&self) -> Result<(), SpecError> {
        if self.pp == 0 || self.ranks.len() != self.pp {
            return Err(SpecError::invalid(
                "parallelism.schedule",
                format!(
                    "{} operation lists for {} pipeline ranks",
                    self.ranks.len(),
                    self.pp
                ),
            ));
        }
        Ok(())
    }

    /// Directions (DualPipe) or phases (DualPipeV) a rank's chunks belong to.
    pub fn directions(&self) -> u8 {
        match self.name {
            Schedule::DualPipe | Schedule::DualPipeV => 2,
            _ => 1,
        }
    }

    /// Micro-batches per direction (DualPipeV's two phases both run every micro-batch).
    pub fn per_direction(&self) -> usize {
        match self.name {
            Schedule::DualPipeV => self.micro_batches,
            _ => self.micro_batches / usize::from(self.directions()),
        }
    }

    /// The step's index of micro-batch `mb` of direction `dir` (`dir * per_direction + mb`;
    /// DualPipeV's phases share their micro-batches).
    pub fn micro_index(&self, dir: u8, mb: usize) -> usize {
        match self.name {
            Schedule::DualPipeV => mb,
            _ => usize::from(dir) * self.per_direction() + mb,
        }
    }

    /// Stages along a micro-batch's path: `pp`, or `2 pp` for DualPipeV.
    pub fn stage_count(&self) -> usize {
        self.name.stages(self.pp)
    }

    /// The position along direction `dir`'s path (the model stage) of the stage rank `rank`
    /// holds for it.
    pub fn position(&self, rank: usize, dir: u8) -> usize {
        match (self.name, dir) {
            (_, 0) => rank,
            (Schedule::DualPipeV, _) => 2 * self.pp - 1 - rank,
            _ => self.pp - 1 - rank,
        }
    }

    /// The rank at `pos` along direction `dir`'s path.
    pub fn rank_at(&self, dir: u8, pos: usize) -> usize {
        self.holder(dir, pos).0
    }

    /// The rank holding `pos` along direction `dir`'s path, and the direction of its chunk
    /// there: `dir` itself, except on DualPipeV, whose stages `pp..2pp` are phase 1.
    pub fn holder(&self, dir: u8, pos: usize) -> (usize, u8) {
        match self.name {
            Schedule::DualPipeV if pos >= self.pp => (2 * self.pp - 1 - pos, 1),
            Schedule::DualPipeV => (pos, 0),
            _ if dir == 0 => (pos, 0),
            _ => (self.pp - 1 - pos, dir),
        }
    }
}

/// The most pipeline ranks [`build`] takes.
pub const MAX_RANKS: usize = 1024;
/// The most micro-batches per step [`build`] takes.
pub const MAX_MICRO_BATCHES: usize = 16_384;

/// The most forward chunks (`pp x micro_batches`) in a step [`build`] takes.
pub const MAX_CHUNKS: usize = 1 << 20;

/// Builds the per-rank operations of `schedule` for `pp` ranks and `micro_batches` micro-batches.
pub fn build(
    schedule: Schedule,
    pp: usize,
    micro_batches: usize,
) -> Result<StepSchedule, SpecError> {
    if pp == 0 {
        return Err(SpecError::invalid("parallelism.pp", "must be at least 1"));
    }
    if pp > MAX_RANKS {
        return Err(SpecError::invalid(
            "parallelism.pp",
            format!("schedules are built for at most {MAX_RANKS} pipeline ranks, got {pp}"),
        ));
    }
    if micro_batches == 0 || micro_batches > MAX_MICRO_BATCHES {
        return Err(SpecError::invalid(
            "parallelism.micro_batches",
            format!("must be 1 to {MAX_MICRO_BATCHES}, got {micro_batches}"),
        ));
    }
    if pp * micro_batches > MAX_CHUNKS {
        return Err(SpecError::invalid(
            "parallelism.micro_batches",
            format!(
                "pp x micro_batches must be at most {MAX_CHUNKS} for a schedule to be built, got {pp} x {micro_batches}"
            ),
        ));
    }
    let ranks = match schedule {
        Schedule::OneFOneB => (0..pp).map(|r| one_f_one_b(pp, r, micro_batches)).collect(),
        Schedule::Zb1p => zero_bubble(pp, micro_batches),
        Schedule::DualPipe => {
            if !pp.is_multiple_of(2) {
                return Err(SpecError::invalid(
                    "parallelism.pp",
                    format!("dualpipe needs an even number of pipeline ranks, got {pp}"),
                ));
            }
            if !micro_batches.is_multiple_of(2) || micro_batches < 2 * pp {
                return Err(SpecError::invalid(
                    "parallelism.micro_batches",
                    format!(
                        "dualpipe needs an even number of micro-batches of at least 2 x pp = {}, got {micro_batches}",
                        2 * pp
                    ),
                ));
            }
            (0..pp)
                .map(|r| dual_pipe(pp, r, micro_batches / 2))
                .collect::<Result<_, _>>()?
        }
        Schedule::DualPipeV => {
            if micro_batches < 2 * pp {
                return Err(SpecError::invalid(
                    "parallelism.micro_batches",
                    format!(
                        "dualpipev needs at least 2 x pp = {} micro-batches, got {micro_batches}",
                        2 * pp
                    ),
                ));
            }
            (0..pp)
                .map(|r| dual_pipe_v(pp, r, micro_batches))
                .collect::<Result<_, _>>()?
        }
    };
    Ok(StepSchedule {
        name: schedule,
        pp,
        micro_batches,
        ranks,
    })
}

/// A rank's operations under construction: per-direction counters and the queue of deferred
/// weight gradients (first in, first out).
struct Builder {
    ops: Vec<Op>,
    next_f: [usize; 2],
    next_b: [usize; 2],
    deferred: VecDeque<Chunk>,
}

impl Builder {
    fn new() -> Self {
        Self {
            ops: Vec::new(),
            next_f: [0; 2],
            next_b: [0; 2],
            deferred: VecDeque::new(),
        }
    }

    fn next(&mut self, pass: Pass, dir: u8) -> Chunk {
        let counter = match pass {
            Pass::F => &mut self.next_f[usize::from(dir)],
            _ => &mut self.next_b[usize::from(dir)],
        };
        let mb = *counter;
        *counter += 1;
        Chunk { pass, dir, mb }
    }

    fn f(&mut self, dir: u8) {
        let c = self.next(Pass::F, dir);
        self.ops.push(Op::One(c));
    }

    /// A backward; its weight gradient is deferred (`zb`) or follows at once.
    fn b(&mut self, dir: u8, zb: bool) {
        let c = self.next(Pass::B, dir);
        self.ops.push(Op::One(c));
        self.weight(c, zb);
    }

    fn weight(&mut self, b: Chunk, zb: bool) {
        let w = Chunk { pass: Pass::W, ..b };
        if zb {
            self.deferred.push_back(w);
        } else {
            self.ops.push(Op::One(w));
        }
    }

    /// An overlapped forward of `fdir` and backward of `bdir` (its weight gradient at once).
    fn fb(&mut self, fdir: u8, bdir: u8) {
        let f = self.next(Pass::F, fdir);
        let b = self.next(Pass::B, bdir);
        self.ops.push(Op::Overlapped { f, b });
        self.weight(b, false);
    }

    /// The operations, once every deferred weight gradient has been placed.
    fn finish(self, schedule: &str, r: usize, pp: usize) -> Result<Vec<Op>, SpecError> {
        if !self.deferred.is_empty() {
            return Err(SpecError::invalid(
                "parallelism.schedule",
                format!(
                    "{schedule} on rank {r} of {pp} left {} weight gradients unscheduled",
                    self.deferred.len()
                ),
            ));
        }
        Ok(self.ops)
    }

    /// The oldest deferred weight gradient.
    fn w(&mut self) -> bool {
        match self.deferred.pop_front() {
            Some(w) => {
                self.ops.push(Op::One(w));
                true
            }
            None => false,
        }
    }
}

/// 1F1B on rank `r`.
fn one_f_one_b(pp: usize, r: usize, m: usize) -> Vec<Op> {
    let mut s = Builder::new();
    let warm = (pp - 1 - r).min(m);
    for _ in 0..warm {
        s.f(0);
    }
    for _ in 0..m - warm {
        s.f(0);
        s.b(0, false);
    }
    for _ in 0..warm {
        s.b(0, false);
    }
    s.ops
}

/// ZB-H1: each rank keeps 1F1B's order of forwards and backwards, and runs a deferred weight
/// gradient whenever its next forward or backward would wait (found by running the ranks in
/// lock step with `F = B = W`), or when another forward would make it hold the activations of
/// more than `pp` micro-batches (1F1B's peak, on its first rank).
fn zero_bubble(pp: usize, m: usize) -> Vec<Vec<Op>> {
    let order: Vec<Vec<Op>> = (0..pp)
        .map(|r| {
            one_f_one_b(pp, r, m)
                .into_iter()
                .filter(|o| !matches!(o, Op::One(Chunk { pass: Pass::W, .. })))
                .collect()
        })
        .collect();
    let mut out: Vec<Builder> = (0..pp).map(|_| Builder::new()).collect();
    let mut next = vec![0usize; pp];
    // Activations each rank holds: forwards whose weight gradient has not run.
    let mut held = vec![0usize; pp];
    // Unit time at which each rank's forward and backward of a micro-batch ended.
    let mut f_end = vec![vec![usize::MAX; m]; pp];
    let mut b_end = vec![vec![usize::MAX; m]; pp];
    let mut t = 0usize;
    while (0..pp).any(|r| next[r] < order[r].len() || !out[r].deferred.is_empty()) {
        let mut ended: Vec<(usize, Chunk)> = Vec::new();
        for r in 0..pp {
            let ready = order[r].get(next[r]).and_then(|op| match op {
                Op::One(c) => {
                    let dep = match c.pass {
                        Pass::F if r == 0 => 0,
                        Pass::F => f_end[r - 1][c.mb],
                        Pass::B if r + 1 == pp => f_end[r][c.mb],
                        _ => b_end[r + 1][c.mb],
                    };
                    (dep <= t).then_some(*c)
                }
                Op::Overlapped { .. } => None,
            });
            match ready {
                Some(c) if c.pass != Pass::F || held[r] < pp => {
                    out[r].ops.push(Op::One(c));
                    if c.pass == Pass::B {
                        out[r].deferred.push_back(Chunk { pass: Pass::W, ..c });
                    } else {
                        held[r] += 1;
                    }
                    ended.push((r, c));
                    next[r] += 1;
                }
                _ => {
                    if out[r].w() {
                        held[r] -= 1;
                    }
                }
            }
        }
        t += 1;
        for (r, c) in ended {
            match c.pass {
                Pass::F => f_end[r][c.mb] = t,
                _ => b_end[r][c.mb] = t,
            }
        }
    }
    out.into_iter().map(|b| b.ops).collect()
}

/// DualPipe on rank `r` with `c` micro-batches per direction.
fn dual_pipe(pp: usize, r: usize, c: usize) -> Result<Vec<Op>, SpecError> {
    let half = pp / 2;
    let h = r.min(pp - 1 - r);
    // The rank's own direction `p` is the pipeline's `p ^ flip`.
    let flip = u8::from(r >= half);
    let d = |p: u8| p ^ flip;
    let middle = h == half - 1;
    let mut s = Builder::new();
    for _ in 0..2 * (half - h - 1) {
        s.f(d(0));
    }
    for _ in 0..=h {
        s.f(d(0));
        s.f(d(1));
    }
    for _ in 0..half - h - 1 {
        s.b(d(1), true);
        s.w();
        s.f(d(1));
    }
    for i in 0..c + h + 1 - pp {
        if i == 0 && middle {
            s.f(d(0));
            s.b(d(1), false);
        } else {
            s.fb(d(0), d(1));
        }
        s.fb(d(1), d(0));
    }
    for _ in 0..half - h - 1 {
        s.b(d(1), false);
        s.fb(d(1), d(0));
    }
    // Half-way through the h + 1 iterations, backwards start deferring their weight gradients.
    let mid = h.div_ceil(2);
    let mut zb = false;
    for i in 0..=h {
        if i == mid && h % 2 == 1 {
            zb = true;
        }
        s.b(d(1), zb);
        if i == mid && h.is_multiple_of(2) {
            zb = true;
        }
        s.b(d(0), zb);
    }
    for _ in 0..half - h - 1 {
        s.w();
        s.b(d(0), true);
    }
    for _ in 0..=h {
        s.w();
    }
    s.finish("dualpipe", r, pp)
}

/// DualPipeV on rank `r` with `c` micro-batches (both phases run each).
fn dual_pipe_v(pp: usize, r: usize, c: usize) -> Result<Vec<Op>, SpecError> {
    let p = pp - 1 - r;
    let last = p == 0;
    let mut s = Builder::new();
    for _ in 0..2 * p {
        s.f(0);
    }
    for _ in 0..=r {
        s.f(0);
        s.f(1);
    }
    for _ in 0..p {
        s.b(1, true);
        s.w();
        s.f(1);
    }
    for i in 0..c + r + 1 - 2 * pp {
        if i == 0 && last {
            s.f(0);
            s.b(1, false);
        } else {
            s.fb(0, 1);
        }
        s.fb(1, 0);
    }
    for _ in 0..p {
        s.b(1, false);
        s.fb(1, 0);
    }
    // Half-way through the r + 1 iterations, backwards start deferring their weight gradients.
    let mid = r.div_ceil(2);
    let mut zb = false;
    for i in 0..=r {
        if i == mid && r % 2 == 1 {
            zb = true;
        }
        s.b(1, zb);
        if i == mid && r.is_multiple_of(2) {
            zb = true;
        }
        s.b(0, zb);
    }
    for _ in 0..p {
        s.w();
        s.b(0, true);
    }
    for _ in 0..=r {
        s.w();
    }
    s.finish("dualpipev", r, pp)
}

/// How long each kind of operation takes, in any unit.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Costs {
    /// A forward chunk.
    pub f: f64,
    /// A backward-for-input chunk.
    pub b: f64,
    /// A backward-for-weights chunk.
    pub w: f64,
    /// An overlapped forward and backward-for-input pair.
    pub fb: f64,
}

impl Costs {
    /// `F = B = W = 1`, `F&B = 2`.
    pub const UNIT: Costs = Costs {
        f: 1.0,
        b: 1.0,
        w: 1.0,
        fb: 2.0,
    };

    fn of(&self, op: &Op) -> f64 {
        match op {
            Op::One(c) => match c.pass {
                Pass::F => self.f,
                Pass::B => self.b,
                Pass::W => self.w,
            },
            Op::Overlapped { .. } => self.fb,
        }
    }

    /// The bubble per rank of the report's Table 2, where `B` is the whole backward (input and
    /// weights): 1F1B `(PP-1)(F+B)`, ZB1P `(PP-1)(F+B-2W)`, DualPipe `(PP/2-1)(F&B+B-3W)`, with
    /// `PP` the stages; `pp` is the ranks, so DualPipeV (`PP = 2 pp` stages) has `(pp-1)(...)`.
    pub fn table2_bubble(&self, schedule: Schedule, pp: usize) -> f64 {
        let full_b = self.b + self.w;
        let p = pp as f64;
        match schedule {
            Schedule::OneFOneB => (p - 1.0) * (self.f + full_b),
            Schedule::Zb1p => (p - 1.0) * (self.f + full_b - 2.0 * self.w),
            Schedule::DualPipe => (p / 2.0 - 1.0) * (self.fb + full_b - 3.0 * self.w),
            Schedule::DualPipeV => (p - 1.0) * (self.fb + full_b - 3.0 * self.w),
        }
    }
}

/// A step run on the simulator.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Timeline {
    /// Per rank, each operation's `(start, end)`, in the order of the schedule.
    pub spans: Vec<Vec<(f64, f64)>>,
    /// When the last operation of any rank ends.
    pub makespan: f64,
    /// Per rank, the time it computes.
    pub busy: Vec<f64>,
    /// Per rank, the step's time it does not compute: `makespan - busy` (the bubble as Table 2
    /// counts it).
    pub bubble: Vec<f64>,
}

/// Runs `s` with operation times `costs`: every operation starts when its rank is free and the
/// chunks it needs are done (the same micro-batch's forward on the previous stage, its backward
/// on the next stage or, on the last stage, its forward, and for `W` its `B`), with transfers
/// taking no time. Fails, naming the rank and operation, when the schedule cannot run to its end
/// (an operation waits for one that never runs, or for one ordered after it).
pub fn simulate(s: &StepSchedule, costs: &Costs) -> Result<Timeline, SpecError> {
    s.check()?;
    let pp = s.pp;
    let mut done: HashMap<(usize, Chunk), f64> = HashMap::new();
    let mut next = vec![0usize; pp];
    let mut free = vec![0f64; pp];
    let mut spans: Vec<Vec<(f64, f64)>> = s
        .ranks
        .iter()
        .map(|r| Vec::with_capacity(r.len()))
        .collect();
    let stages = s.stage_count();
    // The chunk `c` waits for: its micro-batch's forward on the previous stage (which may be
    // the same rank's other phase, on DualPipeV's turn), its backward on the next stage (or on
    // the last stage its own forward), and for `W` its `B`.
    let need = |rank: usize, c: Chunk| -> (usize, Chunk) {
        let pos = s.position(rank, c.dir);
        match c.pass {
            Pass::F => {
                if pos == 0 {
                    (usize::MAX, c)
                } else {
                    let (r, dir) = s.holder(c.dir, pos - 1);
                    (r, Chunk { dir, ..c })
                }
            }
            Pass::B => {
                if pos + 1 == stages {
                    (rank, Chunk { pass: Pass::F, ..c })
                } else {
                    let (r, dir) = s.holder(c.dir, pos + 1);
                    (r, Chunk { dir, ..c })
                }
            }
            Pass::W => (rank, Chunk { pass: Pass::B, ..c }),
        }
    };
    loop {
        let mut progressed = false;
        for r in 0..pp {
            while let Some(op) = s.ranks[r].get(next[r]) {
                let mut ready = free[r];
                let mut blocked = false;
                for c in op.chunks() {
                    let dep = need(r, c);
                    if dep.0 == usize::MAX {
                        continue;
                    }
                    // An overlapped pair never waits on itself.
                    if dep.0 == r && op.chunks().any(|o| o == dep.1) {
                        continue;
                    }
                    match done.get(&dep) {
                        Some(t) => ready = ready.max(*t),
                        None => blocked = true,
                    }
                }
                if blocked {
                    break;
                }
                let end = ready + costs.of(op);
                for c in op.chunks() {
                    if done.insert((r, c), end).is_some() {
                        return Err(SpecError::invalid(
                            "parallelism.schedule",
                            format!("{} runs {c} twice on rank {r}", s.name),
                        ));
                    }
                }
                spans[r].push((ready, end));
                free[r] = end;
                next[r] += 1;
                progressed = true;
            }
        }
        if (0..pp).all(|r| next[r] == s.ranks[r].len()) {
            break;
        }
        if !progressed {
            let Some((r, op)) = (0..pp).find_map(|r| s.ranks[r].get(next[r]).map(|op| (r, op)))
            else {
                break;
            };
            return Err(SpecError::invalid(
                "parallelism.schedule",
                format!(
                    "{} cannot run: rank {r} waits at {op} for a chunk that is never done before it",
                    s.name
                ),
            ));
        }
    }
    let makespan = free.iter().copied().fold(0.0, f64::max);
    let busy: Vec<f64> = s
        .ranks
        .iter()
        .map(|ops| ops.iter().map(|o| costs.of(o)).sum())
        .collect();
    let bubble = busy.iter().map(|b| makespan - b).collect();
    Ok(Timeline {
        spans,
        makespan,
        busy,
        bubble,
    })
}
