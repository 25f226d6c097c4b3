//! The `sim` device kind: a node agent whose devices run training steps on a cost model
//! ([`shoal_spec::cost`]) instead of computing, so one machine can stand in for hundreds of
//! nodes while the real coordinator, placement, membership and recovery run over real gRPC.
//!
//! A simulated node attaches exactly as a real agent does (`AgentService.Attach`, devices of
//! kind `SIM`, heartbeats, statuses, revocations). Its jobs advance on a clock: a step takes the
//! modelled step time divided by the speed-up (virtual seconds per real second), a checkpoint
//! stalls the step loop for its snapshot and commits after its background write. What real
//! nodes share outside the coordinator, the checkpoint storage and the progress of a job's
//! collectives, is a [`SimWorld`]: every node of an attempt reads the same clock, a lost member
//! halts it (the survivors' collectives would block), and the next attempt restores the newest
//! checkpoint committed before the halt.
//!
//! Simulated devices compute no loss: their step metrics carry loss 0 and the modelled
//! throughput.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use shoal_proto::convert;
use shoal_proto::v1 as pb;
use shoal_proto::v1::agent_service_client::AgentServiceClient;
use shoal_spec::ModelConfig;
use shoal_spec::cost::{Hardware, StepCost, step_cost};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{Result, WorkerError};

/// A simulated node agent.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The coordinator's URL (`http://` only).
    pub coordinator: String,
    /// This node's name.
    pub node: String,
    /// Simulated GPUs on the node.
    pub gpus: u32,
    /// Offer the node as a spare.
    pub spare: bool,
    /// What the devices are.
    pub hardware: Hardware,
    /// Virtual seconds per real second.
    pub speedup: f64,
    /// Modelled seconds an attempt takes to start before its restore (processes, CUDA
    /// contexts, communicators).
    pub init_s: f64,
    /// Real time between two status reports of a running job (steps in between are
    /// coalesced into the newest).
    pub report_every: Duration,
    /// How many times longer than the model says this node's devices compute (1: healthy; a
    /// straggler above 1 slows every job it runs in).
    pub slowdown: f64,
}

/// One attempt's clock: when its steps begin (real time), where from, and how fast.
#[derive(Clone, Debug)]
struct Clock {
    attempt: u32,
    /// Real instant the first step starts: once every node of the attempt has joined (its
    /// collectives need them all), after the modelled init and restore. `None` until then.
    t0: Option<Instant>,
    /// Nodes the attempt runs on.
    nodes: usize,
    start: u64,
    steps: u64,
    /// Real seconds per step, per checkpoint stall and per checkpoint write.
    step: f64,
    stall: f64,
    write: f64,
    /// Steps between checkpoints (0: only the last).
    interval: u64,
    /// Real seconds after `t0` at which a member was lost; the clock stops there.
    halted: Option<f64>,
}

impl Clock {
    /// Real seconds since the first step started (negative before; minus infinity while
    /// nodes are still joining).
    fn elapsed(&self, now: Instant) -> f64 {
        self.t0.map_or(f64::NEG_INFINITY, |t0| secs_since(t0, now))
    }

    /// Checkpoint stalls taken before step `s` starts (checkpoints after steps in
    /// `(start, s)`).
    fn stalls_before(&self, s: u64) -> u64 {
        if self.interval == 0 || s <= self.start + 1 {
            return 0;
        }
        (s - 1) / self.interval - self.start / self.interval
    }

    /// Real seconds after `t0` at which step `s` completes.
    fn completes(&self, s: u64) -> f64 {
        (s - self.start) as f64 * self.step + self.stalls_before(s) as f64 * self.stall
    }

    /// The last completed step at `e` real seconds after `t0`.
    fn step_at(&self, e: f64) -> u64 {
        let e = self.halted.map_or(e, |h| e.min(h));
        if e <= 0.0 {
            return self.start;
        }
        let per = self.step + self.stall / self.interval.max(1) as f64;
        let guess = self.start + (e / per) as u64;
        let mut s = guess.clamp(self.start, self.steps);
        while s < self.steps && self.completes(s + 1) <= e {
            s += 1;
        }
        while s > self.start && self.completes(s) > e {
            s -= 1;
        }
        s
    }

    /// The newest checkpoint committed at `e` (its snapshot stall and background write done),
    /// if one of this attempt is.
    fn committed_at(&self, e: f64) -> Option<u64> {
        let e = self.halted.map_or(e, |h| e.min(h));
        let s = self.step_at(e);
        let done = |k: u64| self.completes(k) + self.stall + self.write <= e;
        if s == self.steps && s > self.start && done(s) {
            return Some(s);
        }
        if self.interval == 0 {
            return None;
        }
        let mut k = s - s % self.interval;
        while k > self.start {
            if done(k) {
                return Some(k);
            }
            k -= self.interval;
        }
        None
    }
}

#[derive(Debug, Default)]
struct JobState {
    /// Newest committed checkpoint of earlier attempts.
    committed: u64,
    clock: Option<Clock>,
    /// When each node received each attempt's assignment.
    assigned: BTreeMap<u32, Vec<(String, Instant)>>,
}

impl JobState {
    fn committed_now(&self, now: Instant) -> u64 {
        self.clock
            .as_ref()
            .and_then(|c| c.committed_at(c.elapsed(now)))
            .unwrap_or(self.committed)
    }
}

/// Signed seconds from `t0` to `now`.
fn secs_since(t0: Instant, now: Instant) -> f64 {
    if now >= t0 {
        (now - t0).as_secs_f64()
    } else {
        -(t0 - now).as_secs_f64()
    }
}

/// What simulated nodes share besides the coordinator: checkpoint storage and the progress of
/// each job's collectives. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct SimWorld(Arc<Mutex<HashMap<String, JobState>>>);

/// A job's progress as the simulated world sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// The attempt running.
    pub attempt: u32,
    /// The step it restored from.
    pub start: u64,
    /// The last completed step.
    pub step: u64,
    /// The newest committed checkpoint.
    pub committed: u64,
    /// A member was lost: the attempt makes no more progress.
    pub halted: bool,
}

impl SimWorld {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, JobState>) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The progress of `job`'s current attempt, if one has started.
    pub fn progress(&self, job: &str) -> Option<Progress> {
        let now = Instant::now();
        self.with(|jobs| {
            let j = jobs.get(job)?;
            let c = j.clock.as_ref()?;
            let e = c.elapsed(now);
            Some(Progress {
                attempt: c.attempt,
                start: c.start,
                step: c.step_at(e),
                committed: j.committed_now(now),
                halted: c.halted.is_some(),
            })
        })
    }

    /// A member of `job`'s running attempt was lost: its collectives stop now.
    pub fn halt(&self, job: &str) {
        let now = Instant::now();
        self.with(|jobs| {
            if let Some(c) = jobs.get_mut(job).and_then(|j| j.clock.as_mut())
                && c.halted.is_none()
            {
                c.halted = Some(c.elapsed(now).max(0.0));
            }
        });
    }

    /// The real instant each node received attempt `attempt` of `job`.
    pub fn assigned(&self, job: &str, attempt: u32) -> Vec<(String, Instant)> {
        self.with(|jobs| {
            jobs.get(job)
                .and_then(|j| j.assigned.get(&attempt))
                .cloned()
                .unwrap_or_default()
        })
    }

    /// The real instant `attempt`'s steps begin, once a node has joined it.
    pub fn started_at(&self, job: &str, attempt: u32) -> Option<Instant> {
        self.with(|jobs| {
            jobs.get(job)
                .and_then(|j| j.clock.as_ref())
                .filter(|c| c.attempt == attempt)
                .and_then(|c| c.t0)
        })
    }

    /// Node `node` joins attempt `attempt` (which runs on `clock.nodes` nodes); once all have
    /// joined, its steps start after `delay`, from the newest committed checkpoint. Returns the
    /// step it starts from, or `None` when a newer attempt already runs.
    fn join(
        &self,
        job: &str,
        node: &str,
        attempt: u32,
        delay: Duration,
        clock: Clock,
    ) -> Option<u64> {
        let now = Instant::now();
        self.with(|jobs| {
            let j = jobs.entry(job.to_string()).or_default();
            match j.clock.as_ref().map(|c| c.attempt) {
                Some(a) if a > attempt => return None,
                Some(a) if a == attempt => {
                    // The attempt steps at its slowest node's pace.
                    if let Some(c) = j.clock.as_mut()
                        && c.t0.is_none()
                    {
                        c.step = c.step.max(clock.step);
                    }
                }
                _ => {
                    j.committed = j.committed_now(now);
                    let start = if attempt == 0 { 0 } else { j.committed };
                    j.clock = Some(Clock {
                        attempt,
                        t0: None,
                        start,
                        ..clock
                    });
                }
            }
            let joined = j.assigned.entry(attempt).or_default();
            if !joined.iter().any(|(n, _)| n == node) {
                joined.push((node.to_string(), now));
            }
            let all = joined.len();
            let c = j.clock.as_mut()?;
            if c.t0.is_none() && all >= c.nodes {
                c.t0 = Some(now + delay);
            }
            Some(c.start)
        })
    }
}

/// What one node keeps of a job it runs.
struct Running {
    attempt: u32,
    steps: u64,
    tokens: u64,
    step_s: f64,
    /// This node's compute seconds per step (virtual).
    busy_s: f64,
    /// Whether this node holds rank (0, 0), the one that reports checkpoints.
    first: bool,
    reported_step: u64,
    reported_checkpoint: u64,
}

/// The model a job spec names: a preset, or a `config.json` (or a directory holding one).
pub fn model_of(reference: &str) -> Result<ModelConfig> {
    let path = std::path::Path::new(reference);
    let file = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    if file.is_file() {
        let text = std::fs::read_to_string(&file)
            .map_err(|e| WorkerError::invalid("spec.model", format!("{}: {e}", file.display())))?;
        return ModelConfig::from_hf_json(&text, &file.display().to_string())
            .map_err(|e| WorkerError::invalid("spec.model", e.to_string()));
    }
    ModelConfig::preset(reference).map_err(|e| WorkerError::invalid("spec.model", e.to_string()))
}

/// The modelled step of an assignment's job on these devices.
pub fn job_cost(
    spec: &shoal_spec::job::JobSpec,
    gpus_per_node: usize,
    hw: &Hardware,
) -> Result<StepCost> {
    let model = model_of(&spec.model)?;
    let par = spec
        .parallelism()
        .map_err(|e| WorkerError::invalid("spec.parallelism", e.to_string()))?;
    step_cost(&model, &par, gpus_per_node, hw)
        .map_err(|e| WorkerError::invalid("spec", e.to_string()))
}

fn status(job: &str, attempt: u32, state: pb::JobState) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Status(pb::AssignmentStatus {
            job_id: job.to_string(),
            state: state as i32,
            attempt,
            ..Default::default()
        })),
    }
}

fn status_of(m: &mut pb::AgentMessage) -> Option<&mut pb::AssignmentStatus> {
    match &mut m.msg {
        Some(pb::agent_message::Msg::Status(s)) => Some(s),
        _ => None,
    }
}

/// Starts running assignment `a` on this node: joins the attempt's clock and reports the step
/// it starts from.
fn start(
    cfg: &SimConfig,
    world: &SimWorld,
    a: &pb::Assignment,
) -> std::result::Result<(Running, pb::AgentMessage), String> {
    let spec = a
        .spec
        .clone()
        .map(convert::job_spec)
        .ok_or("assignment without a spec")?
        .map_err(|e| e.to_string())?;
    let cost = job_cost(&spec, cfg.gpus as usize, &cfg.hardware).map_err(|e| e.to_string())?;
    let speed = cfg.speedup;
    let clock = Clock {
        attempt: a.attempt,
        t0: None,
        nodes: shoal_proto::decode_mesh(a)
            .map_or(0, |m| m.peers.len())
            .max(1),
        start: 0,
        steps: spec.training.steps,
        step: cost.step_s * cfg.slowdown.max(1.0) / speed,
        stall: cost.snapshot_s / speed,
        write: cost.checkpoint_write_s / speed,
        interval: spec.checkpointing.interval,
        halted: None,
    };
    let restore = if a.attempt > 0 { cost.restore_s } else { 0.0 };
    let delay = Duration::from_secs_f64(((cfg.init_s + restore) / speed).max(0.0));
    let start = world
        .join(&a.job_id, &cfg.node, a.attempt, delay, clock)
        .ok_or_else(|| format!("attempt {} is stale", a.attempt))?;
    let first = a.ranks.iter().any(|r| r.pp_rank == 0 && r.dp_rank == 0);
    let mut msg = status(&a.job_id, a.attempt, pb::JobState::Running);
    if let Some(s) = status_of(&mut msg) {
        s.started_step = Some(start);
    }
    Ok((
        Running {
            attempt: a.attempt,
            steps: spec.training.steps,
            tokens: cost.tokens,
            step_s: cost.step_s,
            busy_s: cost.step_s * cfg.slowdown.max(1.0),
            first,
            reported_step: start,
            reported_checkpoint: 0,
        },
        msg,
    ))
}

/// The statuses job `id` owes the coordinator now; `true` when it has finished.
fn report(world: &SimWorld, id: &str, r: &mut Running) -> (Vec<pb::AgentMessage>, bool) {
    let Some(p) = world.progress(id).filter(|p| p.attempt == r.attempt) else {
        return (Vec::new(), false);
    };
    let mut out = Vec::new();
    if p.step > r.reported_step || (r.first && p.committed > r.reported_checkpoint) {
        let mut msg = status(id, r.attempt, pb::JobState::Running);
        if let Some(s) = status_of(&mut msg) {
            if p.step > r.reported_step {
                s.step = Some(pb::StepMetrics {
                    step: p.step,
                    loss: 0.0,
                    main_loss: 0.0,
                    tokens_per_s: r.tokens as f64 / r.step_s.max(1e-9),
                    max_vio: Vec::new(),
                    seconds: r.step_s,
                    ..Default::default()
                });
                s.busy_s = r.busy_s;
            }
            if r.first && p.committed > r.reported_checkpoint {
                s.checkpoint_step = p.committed;
            }
        }
        r.reported_step = p.step;
        if r.first {
            r.reported_checkpoint = r.reported_checkpoint.max(p.committed);
        }
        out.push(msg);
    }
    let done = !p.halted && p.step >= r.steps;
    if done {
        out.push(status(id, r.attempt, pb::JobState::Succeeded));
    }
    (out, done)
}

/// Runs a simulated node agent until its stream ends or `shutdown` resolves. While `hang` is
/// set it goes silent (no heartbeats, no statuses) but keeps its stream, as a hung process does.
pub async fn run(
    cfg: SimConfig,
    world: SimWorld,
    hang: Arc<AtomicBool>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    if !(cfg.speedup.is_finite() && cfg.speedup > 0.0) {
        return Err(WorkerError::invalid(
            "speedup",
            format!("must be positive, got {}", cfg.speedup),
        ));
    }
    let bad = |what: &str, e: String| WorkerError::invalid("coordinator", format!("{what}: {e}"));
    let channel = crate::agent::endpoint(&cfg.coordinator, None, None)?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| bad(&cfg.coordinator, shoal_proto::transport::error_chain(&e)))?;
    let mut client = AgentServiceClient::new(channel);
    let (out, rx) = mpsc::channel::<pb::AgentMessage>(64);
    let device = |i: u32| pb::Device {
        index: i,
        kind: pb::DeviceKind::Sim as i32,
        name: "sim H800".into(),
        memory_bytes: cfg.hardware.memory_bytes,
        job_id: String::new(),
        ..Default::default()
    };
    out.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Register(pb::Register {
            node: cfg.node.clone(),
            devices: (0..cfg.gpus).map(device).collect(),
            nvlink_domain: cfg.node.clone(),
            ib_rail: 0,
            spare: cfg.spare,
            data_addr: String::new(),
            running: Vec::new(),
        })),
    })
    .await
    .map_err(|e| bad("register", e.to_string()))?;
    let mut inbound = client
        .attach(ReceiverStream::new(rx))
        .await
        .map_err(|s| bad("attach", s.message().to_string()))?
        .into_inner();
    let reg = match inbound.message().await {
        Ok(Some(pb::CoordinatorMessage {
            msg: Some(pb::coordinator_message::Msg::Registered(r)),
        })) => r,
        _ => {
            return Err(bad(
                "attach",
                "the coordinator did not answer Register".into(),
            ));
        }
    };
    let mut beat = tokio::time::interval(Duration::from_millis(u64::from(
        reg.heartbeat_interval_ms.max(50),
    )));
    let mut tick = tokio::time::interval(cfg.report_every.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut jobs: BTreeMap<String, Running> = BTreeMap::new();
    tokio::pin!(shutdown);
    loop {
        let silent = hang.load(Ordering::Relaxed);
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            _ = beat.tick() => {
                if silent {
                    continue;
                }
                let hb = pb::AgentMessage {
                    msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
                        epoch: reg.epoch,
                        job_steps: Default::default(),
                    })),
                };
                if out.send(hb).await.is_err() {
                    return Ok(());
                }
            }
            _ = tick.tick() => {
                if silent {
                    continue;
                }
                let mut finished = Vec::new();
                for (id, r) in &mut jobs {
                    let (msgs, done) = report(&world, id, r);
                    for m in msgs {
                        if out.send(m).await.is_err() {
                            return Ok(());
                        }
                    }
                    if done {
                        finished.push(id.clone());
                    }
                }
                for id in finished {
                    jobs.remove(&id);
                }
            }
            msg = inbound.message() => match msg {
                Ok(Some(pb::CoordinatorMessage { msg: Some(m) })) => match m {
                    pb::coordinator_message::Msg::Assign(a) => {
                        jobs.remove(&a.job_id);
                        match start(&cfg, &world, &a) {
                            Ok((r, started)) => {
                                jobs.insert(a.job_id.clone(), r);
                                if !silent && out.send(started).await.is_err() {
                                    return Ok(());
                                }
                            }
                            Err(reason) => {
                                let mut m = status(&a.job_id, a.attempt, pb::JobState::Failed);
                                if let Some(s) = status_of(&mut m) {
                                    s.reason = reason;
                                }
                                if out.send(m).await.is_err() {
                                    return Ok(());
                                }
                            }
                        }
                    }
                    pb::coordinator_message::Msg::Revoke(r) => {
                        jobs.remove(&r.job_id);
                    }
                    pb::coordinator_message::Msg::Registered(_) => {}
                },
                Ok(Some(_)) => {}
                Ok(None) => return Ok(()),
                Err(s) => return Err(bad("stream", s.message().to_string())),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock(interval: u64) -> Clock {
        Clock {
            attempt: 0,
            t0: Some(Instant::now()),
            nodes: 2,
            start: 0,
            steps: 100,
            step: 1.0,
            stall: 0.5,
            write: 2.0,
            interval,
            halted: None,
        }
    }

    #[test]
    fn steps_and_stalls_follow_the_clock() {
        let c = clock(10);
        assert_eq!(c.step_at(0.0), 0);
        assert_eq!(c.step_at(9.99), 9);
        assert_eq!(c.step_at(10.0), 10);
        // Step 11 waits for the checkpoint's stall after step 10.
        assert_eq!(c.completes(11), 11.5);
        assert_eq!(c.step_at(11.2), 10);
        assert_eq!(c.step_at(11.5), 11);
        assert_eq!(c.step_at(1e9), 100);
        // Every value of the guess lands on the same step as counting one by one.
        for i in 0..2000 {
            let e = f64::from(i) * 0.07;
            let mut s = 0;
            while s < 100 && c.completes(s + 1) <= e {
                s += 1;
            }
            assert_eq!(c.step_at(e), s, "at {e}");
        }
    }

    #[test]
    fn a_checkpoint_commits_after_its_write_and_a_halt_freezes_all() {
        let mut c = clock(10);
        // Step 10 completes at 10; stall 0.5, write 2: committed at 12.5.
        assert_eq!(c.committed_at(12.4), None);
        assert_eq!(c.committed_at(12.5), Some(10));
        // Step 20 completes at 20.5, committed at 23.
        assert_eq!(c.committed_at(22.9), Some(10));
        assert_eq!(c.committed_at(23.0), Some(20));
        c.halted = Some(22.0);
        assert_eq!(c.step_at(100.0), c.step_at(22.0));
        assert_eq!(c.committed_at(100.0), Some(10));
        // The last step is always a checkpoint.
        let mut last = clock(30);
        last.halted = None;
        assert_eq!(last.committed_at(1e9), Some(100));
        let c0 = clock(0);
        assert_eq!(c0.committed_at(50.0), None);
        assert_eq!(c0.committed_at(1e9), Some(100));
    }

    #[test]
    fn the_next_attempt_restores_what_was_committed_before_the_halt() {
        let w = SimWorld::default();
        let base = clock(10);
        assert_eq!(w.join("j", "a", 0, Duration::ZERO, base.clone()), Some(0));
        // Steps wait for the attempt's other node.
        assert_eq!(w.started_at("j", 0), None);
        assert_eq!(w.progress("j").map(|p| p.step), Some(0));
        assert_eq!(w.join("j", "b", 0, Duration::ZERO, base.clone()), Some(0));
        assert!(w.started_at("j", 0).is_some());
        assert_eq!(w.assigned("j", 0).len(), 2);
        // Pretend 25 s passed: move the clock back.
        w.with(|jobs| {
            if let Some(t0) = jobs
                .get_mut("j")
                .and_then(|j| j.clock.as_mut())
                .and_then(|c| c.t0.as_mut())
            {
                *t0 -= Duration::from_secs(25);
            }
        });
        w.halt("j");
        let p = w.progress("j").unwrap();
        assert!(p.halted);
        assert_eq!(p.committed, 20);
        assert!((23..=24).contains(&p.step), "{p:?}");
        assert_eq!(w.join("j", "c", 1, Duration::ZERO, base.clone()), Some(20));
        // An older attempt's late assignment does not restart the clock.
        assert_eq!(w.join("j", "d", 0, Duration::ZERO, base), None);
        let p = w.progress("j").unwrap();
        assert_eq!((p.attempt, p.start, p.step, p.halted), (1, 20, 20, false));
        assert_eq!(w.started_at("j", 1), None);
    }
}
