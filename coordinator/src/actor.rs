//! The control actor: it owns every job and node record, the node agents' sessions and the
//! scheduler. Handlers reach it through the cloneable [`Control`] handle (a bounded mailbox; each
//! request carries a oneshot reply). Every change is written to the store before anyone hears of
//! it.
//!
//! Scheduling is gang scheduling over a queue ordered by priority, then submission: the head job
//! starts only when all its ranks can be placed (by `shoal_spec::plan`) on free devices of healthy
//! nodes; until then it stays Pending with the reason, and the jobs behind it wait behind it.
//!
//! Node liveness: agents heartbeat every [`HEARTBEAT_MS`]. A session ends when its stream breaks,
//! or when its node sent no heartbeat for [`ControlConfig::heartbeat_timeout`] (a hung agent
//! whose stream is still open); the actor checks every heartbeat interval. Either way the node
//! is marked Failed, its session closed, and its jobs fail with the reason. While a session is
//! open its node's `live/<name>` key is in the store, attached to a lease (see
//! `ControlConfig::lease_ttl`): renewed by heartbeats, revoked when the session ends. The actor watches
//! `live/` too: a liveness key deleted under a live session (the lease expired, or an operator
//! deleted the key) ends that session.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use shoal_proto::v1 as pb;
use shoal_spec::job::JobSpec;
use shoal_spec::plan::{Cluster, NOT_ENOUGH_DEVICES};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tonic::Status;

use crate::jobs::{
    JobEvent, JobRecord, JobState, Placed, Transition, encode, now_ms, resolve_model, validate,
};
use crate::nodes::{NodeRecord, NodeState};
use crate::store::{Ephemeral, Expect, Store, Watch, WatchEvent};
use crate::{CoordinatorError, Result};

/// Mailbox size of the control actor.
const MAILBOX: usize = 1024;

/// Why a job waits when no node is registered.
pub const NO_NODES: &str = "waiting for devices: no worker nodes are registered";

/// Heartbeat interval agents are told to keep.
pub const HEARTBEAT_MS: u32 = 500;

/// How long a node may stay silent before it is failed, unless configured otherwise.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// Prefix of the nodes' liveness keys in the store.
pub const LIVE_PREFIX: &str = "live/";

/// How the control actor runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlConfig {
    /// A node whose session is open but which sent no heartbeat for this long is failed (checked
    /// every heartbeat interval, so it is noticed within the timeout plus one interval). Must be
    /// longer than the heartbeat interval.
    pub heartbeat_timeout: Duration,
    /// Recoveries in a row from the same checkpoint (no newer one committed in between) a job
    /// may go through before a failure fails it.
    pub max_recoveries: u32,
    /// How long a recovering job waits before it is placed again, so that the other signs of
    /// the same failure (the lost node's stream, its peers' reports) arrive first and the new
    /// placement avoids what failed.
    pub recovery_settle: Duration,
    /// How long a coordinator that finds jobs placed when it starts (it took over from a
    /// leader that died, or restarted) waits for their nodes to come back naming them before it
    /// recovers the jobs instead.
    pub adopt_grace: Duration,
}

/// How long placed jobs wait for their nodes after a coordinator starts, unless configured
/// otherwise: nodes reattach within a second or two of a new leader listening.
pub const DEFAULT_ADOPT_GRACE: Duration = Duration::from_secs(10);

/// Recoveries a job may go through, unless configured otherwise.
pub const DEFAULT_MAX_RECOVERIES: u32 = 16;

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            max_recoveries: DEFAULT_MAX_RECOVERIES,
            recovery_settle: Duration::from_millis(200),
            adopt_grace: DEFAULT_ADOPT_GRACE,
        }
    }
}

fn heartbeat_interval() -> Duration {
    Duration::from_millis(u64::from(HEARTBEAT_MS))
}

impl ControlConfig {
    fn check(&self) -> Result<()> {
        if self.heartbeat_timeout <= heartbeat_interval() {
            return Err(CoordinatorError::invalid(
                "heartbeat timeout",
                format!(
                    "must be longer than the {HEARTBEAT_MS} ms heartbeat interval, got {} ms",
                    self.heartbeat_timeout.as_millis()
                ),
            ));
        }
        Ok(())
    }

    /// TTL of a node's liveness lease. Heartbeats renew it at most every third of the TTL
    /// (so a big cluster does not make every heartbeat a store round trip); the TTL is long
    /// enough that, even renewed that rarely, the lease outlives the actor's own check
    /// (timeout plus one interval): `2/3 ttl > timeout + 2 intervals`. The lease is the backstop
    /// that makes a dead coordinator's nodes expire.
    fn lease_ttl(&self) -> Duration {
        2 * self.heartbeat_timeout + 3 * heartbeat_interval()
    }
}

/// The sending half of an agent's session stream.
pub type Session = mpsc::Sender<Result<pb::CoordinatorMessage, Status>>;

/// A registration, as the agent sent it.
#[derive(Debug)]
pub struct Registration {
    /// Node name.
    pub node: String,
    /// Devices.
    pub devices: usize,
    /// What each device is (empty: CPU shares, as older agents register).
    pub models: Vec<crate::nodes::DeviceModel>,
    /// NVLink domain.
    pub nvlink_domain: String,
    /// InfiniBand rail.
    pub ib_rail: u32,
    /// Offered as a spare.
    pub spare: bool,
    /// Data-plane address (`host:port`; empty when the node takes no cross-node work).
    pub data_addr: String,
    /// The job attempts the agent still runs (or finished without hearing that the outcome
    /// arrived): (job id, attempt).
    pub running: Vec<(String, u32)>,
}

#[derive(Debug)]
enum Msg {
    Submit(Box<JobSpec>, String, oneshot::Sender<Result<String>>),
    Get(String, oneshot::Sender<Result<JobRecord>>),
    List(oneshot::Sender<Vec<JobRecord>>),
    Cancel(String, oneshot::Sender<Result<JobRecord>>),
    Watch(
        String,
        oneshot::Sender<Result<(JobRecord, broadcast::Receiver<JobEvent>)>>,
    ),
    Register(Registration, Session, oneshot::Sender<Result<u64>>),
    Heartbeat(String, u64),
    Status(String, u64, pb::AssignmentStatus),
    Disconnected(String, u64),
    Nodes(oneshot::Sender<Vec<NodeView>>),
    Cordon(String, bool, oneshot::Sender<Result<NodeView>>),
    Close(oneshot::Sender<()>),
    Snapshot(oneshot::Sender<Snapshot>),
}

/// What the cluster looks like now, for `/metrics` and the dashboard.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Every job, in submission order.
    pub jobs: Vec<JobRecord>,
    /// Every node.
    pub nodes: Vec<NodeView>,
    /// Per job, its latest step's figures (expert loads from the latest step that had them).
    pub steps: BTreeMap<String, pb::StepMetrics>,
    /// Per job, its latest [`STEP_HISTORY`] steps, oldest first (a redone step replaces the
    /// first run of it), in memory only.
    pub curves: BTreeMap<String, Vec<StepPoint>>,
}

/// Steps of each job the actor keeps for the dashboard's curves.
pub const STEP_HISTORY: usize = 512;

/// One step of a job's curves.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepPoint {
    /// The step.
    pub step: u64,
    /// Training objective.
    pub loss: f64,
    /// Training tokens per second.
    pub tokens_per_s: f64,
    /// Wall time of the step.
    pub seconds: f64,
}

/// A node with its live state.
#[derive(Clone, Debug)]
pub struct NodeView {
    /// The stored record.
    pub record: NodeRecord,
    /// Device index -> job, for busy devices.
    pub busy: BTreeMap<usize, String>,
    /// Last heartbeat, ms since the Unix epoch (0 if none this session).
    pub last_heartbeat_ms: u64,
}

/// A cloneable handle to the control actor.
#[derive(Clone, Debug)]
pub struct Control {
    tx: mpsc::Sender<Msg>,
}

struct NodeEntry {
    record: NodeRecord,
    revision: u64,
    session: Option<Session>,
    busy: BTreeMap<usize, String>,
    last_heartbeat_ms: u64,
    /// When the session last showed life (registration or heartbeat), on tokio's clock.
    last_seen: Instant,
    /// The session's liveness key in the store.
    live: Option<Ephemeral>,
    /// When its lease was last renewed: heartbeats renew it at most three times per TTL, so a
    /// big cluster does not turn every heartbeat into a store round trip.
    renewed: Instant,
}

struct Actor<S> {
    store: S,
    config: ControlConfig,
    /// The store's `live/` keys; `None` until (re)established.
    live_watch: Option<Watch>,
    /// id -> (record, store revision).
    jobs: BTreeMap<String, (JobRecord, u64)>,
    seq: u64,
    watchers: BTreeMap<String, broadcast::Sender<JobEvent>>,
    nodes: BTreeMap<String, NodeEntry>,
    /// Per running job, the nodes that have reported it finished: the job succeeds when every
    /// node it is placed on has.
    finished_on: BTreeMap<String, std::collections::BTreeSet<String>>,
    /// Recovering jobs and when to place them again.
    replan_at: BTreeMap<String, Instant>,
    /// Per job, the straggler detector of its running attempt.
    stragglers: BTreeMap<String, (u32, crate::stragglers::Detector)>,
    /// Jobs found placed when the actor started, waiting for their nodes to come back.
    adopting: BTreeMap<String, Adoption>,
    /// [`Control::close`] was called: sessions and watches are over, and nothing changes any
    /// more (the next leader, or this coordinator's next start, takes the jobs over as stored).
    closing: bool,
    /// Per job, its latest step's figures.
    last_steps: BTreeMap<String, pb::StepMetrics>,
    /// Per job, its latest steps (at most [`STEP_HISTORY`]).
    curves: BTreeMap<String, VecDeque<StepPoint>>,
}

/// A placed job the actor found when it started, waiting for its nodes to reattach naming it.
struct Adoption {
    /// The nodes not back yet.
    waiting: std::collections::BTreeSet<String>,
    /// When the job is recovered instead.
    deadline: Instant,
    /// When the actor started.
    began: Instant,
}

impl Control {
    /// Loads jobs and nodes from `store` and starts the actor on the current runtime. Nodes start
    /// Failed until their agents attach again. Jobs that were placed (this coordinator took over
    /// from a leader that died, or restarted) keep running: they are adopted as their nodes
    /// reattach naming them, and recovered if one does not within
    /// [`ControlConfig::adopt_grace`]; recovering jobs are placed again. The actor ends
    /// (releasing the store) once every handle is dropped; the returned task resolves then.
    pub async fn start<S: Store>(store: S) -> Result<(Self, tokio::task::JoinHandle<()>)> {
        Self::start_with(store, ControlConfig::default()).await
    }

    /// [`Control::start`] with a configuration.
    pub async fn start_with<S: Store>(
        store: S,
        config: ControlConfig,
    ) -> Result<(Self, tokio::task::JoinHandle<()>)> {
        config.check()?;
        let mut jobs = BTreeMap::new();
        let mut seq = 0;
        for (key, v) in store.list("jobs/").await? {
            let rec: JobRecord = decode(&key, &v.value)?;
            seq = seq.max(rec.seq);
            jobs.insert(rec.id.clone(), (rec, v.revision));
        }
        let mut nodes = BTreeMap::new();
        for (key, v) in store.list("nodes/").await? {
            let mut record: NodeRecord = decode(&key, &v.value)?;
            record.state = NodeState::Failed;
            nodes.insert(
                record.name.clone(),
                NodeEntry {
                    record,
                    revision: v.revision,
                    session: None,
                    busy: BTreeMap::new(),
                    last_heartbeat_ms: 0,
                    last_seen: Instant::now(),
                    live: None,
                    renewed: Instant::now(),
                },
            );
        }
        tracing::info!(jobs = jobs.len(), nodes = nodes.len(), "loaded the store");
        let (tx, rx) = mpsc::channel(MAILBOX);
        let live_watch = Some(store.watch(LIVE_PREFIX).await?);
        let mut actor = Actor {
            store,
            config,
            live_watch,
            jobs,
            seq,
            watchers: BTreeMap::new(),
            nodes,
            finished_on: BTreeMap::new(),
            replan_at: BTreeMap::new(),
            stragglers: BTreeMap::new(),
            adopting: BTreeMap::new(),
            closing: false,
            last_steps: BTreeMap::new(),
            curves: BTreeMap::new(),
        };
        let began = Instant::now();
        for (rec, _) in actor.jobs.values() {
            match rec.state {
                JobState::Scheduling | JobState::Running => {
                    let waiting = rec.placement.iter().map(|p| p.node.clone()).collect();
                    actor.adopting.insert(
                        rec.id.clone(),
                        Adoption {
                            waiting,
                            deadline: began + actor.config.adopt_grace,
                            began,
                        },
                    );
                }
                JobState::Recovering => {
                    actor
                        .replan_at
                        .insert(rec.id.clone(), began + actor.config.recovery_settle);
                }
                _ => {}
            }
        }
        if !actor.adopting.is_empty() {
            tracing::info!(
                jobs = actor.adopting.len(),
                grace_ms = actor.config.adopt_grace.as_millis() as u64,
                "waiting for the nodes of placed jobs"
            );
        }
        let task = tokio::spawn(actor.run(rx));
        Ok((Self { tx }, task))
    }

    async fn ask<T>(&self, msg: impl FnOnce(oneshot::Sender<T>) -> Msg) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(msg(tx))
            .await
            .map_err(|_| CoordinatorError::Unavailable)?;
        rx.await.map_err(|_| CoordinatorError::Unavailable)
    }

    async fn tell(&self, msg: Msg) {
        if self.tx.send(msg).await.is_err() {
            tracing::debug!("control actor gone");
        }
    }

    /// Validates and queues a job; returns its id.
    pub async fn submit(&self, spec: JobSpec) -> Result<String> {
        self.submit_traced(spec, String::new()).await
    }

    /// [`Self::submit`], the job's spans joining the trace `traceparent` (W3C) names.
    pub async fn submit_traced(&self, spec: JobSpec, traceparent: String) -> Result<String> {
        validate(&spec)?;
        self.ask(|tx| Msg::Submit(Box::new(spec), traceparent, tx))
            .await?
    }

    /// One job.
    pub async fn get(&self, id: &str) -> Result<JobRecord> {
        self.ask(|tx| Msg::Get(id.to_string(), tx)).await?
    }

    /// Every job in submission order.
    pub async fn list(&self) -> Result<Vec<JobRecord>> {
        self.ask(Msg::List).await
    }

    /// Cancels a job (a finished job stays as it is).
    pub async fn cancel(&self, id: &str) -> Result<JobRecord> {
        self.ask(|tx| Msg::Cancel(id.to_string(), tx)).await?
    }

    /// The job now and a receiver of its later events.
    pub async fn watch(&self, id: &str) -> Result<(JobRecord, broadcast::Receiver<JobEvent>)> {
        self.ask(|tx| Msg::Watch(id.to_string(), tx)).await?
    }

    /// Opens a node's session; returns its epoch. The actor sends `Registered` on `session`
    /// before anything else.
    pub async fn register(&self, reg: Registration, session: Session) -> Result<u64> {
        self.ask(|tx| Msg::Register(reg, session, tx)).await?
    }

    /// A heartbeat of a session.
    pub async fn heartbeat(&self, node: &str, epoch: u64) {
        self.tell(Msg::Heartbeat(node.to_string(), epoch)).await;
    }

    /// An assignment's status from a session.
    pub async fn status(&self, node: &str, epoch: u64, s: pb::AssignmentStatus) {
        self.tell(Msg::Status(node.to_string(), epoch, s)).await;
    }

    /// A session ended.
    pub async fn disconnected(&self, node: &str, epoch: u64) {
        self.tell(Msg::Disconnected(node.to_string(), epoch)).await;
    }

    /// Every node, by name.
    pub async fn nodes(&self) -> Result<Vec<NodeView>> {
        self.ask(Msg::Nodes).await
    }

    /// The cluster now: jobs, nodes and each job's latest step.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        self.ask(Msg::Snapshot).await
    }

    /// For a coordinator that stops: ends every node session and job watch (their streams
    /// close, so the server's graceful shutdown does not wait on them, and agents attach to
    /// the next leader), and from then on answers reads only: what would change a job or a
    /// node is refused as unavailable, and a session ending is not a node lost. The store
    /// keeps every job as it was, for the next leader to adopt.
    pub async fn close(&self) {
        let _ = self.ask(Msg::Close).await;
    }

    /// Cordons a node (`drain`: and moves its jobs off it, back to the queue).
    pub async fn cordon(&self, node: &str, drain: bool) -> Result<NodeView> {
        self.ask(|tx| Msg::Cordon(node.to_string(), drain, tx))
            .await?
    }
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| CoordinatorError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

fn not_found(kind: &'static str, id: &str) -> CoordinatorError {
    CoordinatorError::NotFound {
        kind,
        id: id.to_string(),
    }
}

fn view(e: &NodeEntry) -> NodeView {
    NodeView {
        record: e.record.clone(),
        busy: e.busy.clone(),
        last_heartbeat_ms: e.last_heartbeat_ms,
    }
}

/// Resolves when the earliest recovering job is due to be placed again; pending without one.
async fn next_replan(at: &BTreeMap<String, Instant>) {
    match at.values().min() {
        Some(t) => tokio::time::sleep_until(*t).await,
        None => std::future::pending().await,
    }
}

/// The next event of `w`; pending forever without one.
async fn next_live(w: &mut Option<Watch>) -> Option<crate::Result<WatchEvent>> {
    match w {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

impl<S: Store> Actor<S> {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut tick = tokio::time::interval(heartbeat_interval());
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let r = tokio::select! {
                msg = rx.recv() => match msg {
                    Some(msg) => self.handle(msg).await,
                    None => break,
                },
                _ = tick.tick() => {
                    // Heartbeats that queued while the actor waited (a slow store write) count
                    // before anyone is judged silent: handle what is queued now, then judge.
                    for _ in 0..rx.len() {
                        let Ok(msg) = rx.try_recv() else { break };
                        if let Err(e) = self.handle(msg).await {
                            tracing::error!(error = %e, "control actor");
                        }
                    }
                    self.check_liveness().await
                }
                () = next_replan(&self.replan_at) => self.replan_due().await,
                ev = next_live(&mut self.live_watch) => self.live_event(ev).await,
            };
            if let Err(e) = r {
                tracing::error!(error = %e, "control actor");
            }
        }
        // Every handle is gone: the sessions end with the actor.
        for (node, e) in &mut self.nodes {
            if let Some(live) = e.live.take()
                && let Err(err) = self.store.revoke(live.lease).await
            {
                tracing::warn!(node = %node, error = %err, "revoking a liveness lease");
            }
        }
    }

    /// Fails the sessions that sent no heartbeat for the timeout; re-establishes a lost watch.
    async fn check_liveness(&mut self) -> Result<()> {
        if self.closing {
            return Ok(());
        }
        let timeout = self.config.heartbeat_timeout;
        let now = Instant::now();
        let silent: Vec<(String, u64)> = self
            .nodes
            .iter()
            .filter(|(_, e)| e.session.is_some() && now.duration_since(e.last_seen) >= timeout)
            .map(|(n, e)| (n.clone(), e.record.epoch))
            .collect();
        for (node, epoch) in &silent {
            let reason = format!(
                "node {node} sent no heartbeat for {} ms (heartbeat timeout)",
                timeout.as_millis()
            );
            self.end_session(node, *epoch, &reason).await?;
        }
        let overdue: Vec<(String, Vec<String>)> = self
            .adopting
            .iter()
            .filter(|(_, a)| a.deadline <= now)
            .map(|(id, a)| (id.clone(), a.waiting.iter().cloned().collect()))
            .collect();
        for (id, missing) in &overdue {
            self.adopting.remove(id);
            let cause = format!(
                "node(s) {} did not come back within {} ms of the coordinator starting",
                missing.join(", "),
                self.config.adopt_grace.as_millis()
            );
            self.recover(id, &cause, 0).await?;
        }
        if !silent.is_empty() || !overdue.is_empty() {
            self.schedule().await?;
        }
        if self.live_watch.is_none() {
            match self.store.watch(LIVE_PREFIX).await {
                Ok(w) => {
                    tracing::info!("watching node liveness keys again");
                    self.live_watch = Some(w);
                }
                Err(e) => tracing::warn!(error = %e, "cannot watch node liveness keys"),
            }
        }
        Ok(())
    }

    /// A change of a liveness key: a deletion under a live session ends it.
    async fn live_event(&mut self, ev: Option<crate::Result<WatchEvent>>) -> Result<()> {
        let ev = match ev {
            Some(Ok(ev)) => ev,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "watch of node liveness keys failed; watching again");
                self.live_watch = None;
                return Ok(());
            }
            None => {
                tracing::warn!("watch of node liveness keys ended; watching again");
                self.live_watch = None;
                return Ok(());
            }
        };
        let WatchEvent::Delete { key, revision } = ev else {
            return Ok(());
        };
        let Some(node) = key.strip_prefix(LIVE_PREFIX) else {
            return Ok(());
        };
        // Only a deletion after this session's own write counts (not the old session's lease,
        // revoked when the node registered again).
        let epoch = match self.nodes.get(node) {
            Some(e) if e.session.is_some() && e.live.is_some_and(|l| l.revision < revision) => {
                e.record.epoch
            }
            _ => return Ok(()),
        };
        let reason = format!(
            "node {node} liveness lease lost in the store (heartbeat timeout {} ms)",
            self.config.heartbeat_timeout.as_millis()
        );
        self.end_session(node, epoch, &reason).await?;
        self.schedule().await
    }

    /// A heartbeat of a current session: it lives on, and so does its liveness key.
    async fn heartbeat(&mut self, node: &str, epoch: u64) -> Result<()> {
        let Some(e) = self
            .nodes
            .get_mut(node)
            .filter(|e| e.record.epoch == epoch && e.session.is_some())
        else {
            return Ok(());
        };
        e.last_heartbeat_ms = now_ms();
        e.last_seen = Instant::now();
        let Some(live) = e.live else {
            return Ok(());
        };
        if e.renewed.elapsed() < self.config.lease_ttl() / 3 {
            return Ok(());
        }
        e.renewed = e.last_seen;
        match self.store.keep_alive(live.lease).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                let reason = format!(
                    "node {node} liveness lease expired in the store (heartbeat timeout {} ms)",
                    self.config.heartbeat_timeout.as_millis()
                );
                self.end_session(node, epoch, &reason).await?;
                self.schedule().await
            }
            Err(err) => {
                // The store's trouble, not the node's: the heartbeat still counts.
                tracing::warn!(node, error = %err, "keeping a liveness lease alive");
                Ok(())
            }
        }
    }

    async fn handle(&mut self, msg: Msg) -> Result<()> {
        if self.closing {
            match msg {
                Msg::Get(..) | Msg::List(..) | Msg::Nodes(..) | Msg::Snapshot(..) => {}
                Msg::Close(reply) => {
                    let _ = reply.send(());
                    return Ok(());
                }
                // Dropping a request's reply sender answers it as unavailable.
                _ => return Ok(()),
            }
        }
        match msg {
            Msg::Snapshot(reply) => {
                let mut jobs: Vec<JobRecord> = self.jobs.values().map(|(r, _)| r.clone()).collect();
                jobs.sort_by_key(|r| r.seq);
                let _ = reply.send(Snapshot {
                    jobs,
                    nodes: self.nodes.values().map(view).collect(),
                    steps: self.last_steps.clone(),
                    curves: self
                        .curves
                        .iter()
                        .map(|(id, c)| (id.clone(), c.iter().copied().collect()))
                        .collect(),
                });
            }
            Msg::Close(reply) => {
                self.closing = true;
                for e in self.nodes.values_mut() {
                    e.session = None;
                }
                self.watchers.clear();
                tracing::info!("closing: node sessions and job watches ended; jobs stay as stored");
                let _ = reply.send(());
            }
            Msg::Submit(spec, trace, reply) => {
                let r = self.submit(*spec, trace).await;
                let ok = r.is_ok();
                let _ = reply.send(r);
                if ok {
                    self.schedule().await?;
                }
            }
            Msg::Get(id, reply) => {
                let _ = reply.send(self.record(&id).cloned());
            }
            Msg::List(reply) => {
                let mut all: Vec<JobRecord> = self.jobs.values().map(|(r, _)| r.clone()).collect();
                all.sort_by_key(|r| r.seq);
                let _ = reply.send(all);
            }
            Msg::Cancel(id, reply) => {
                let r = self.cancel(&id).await;
                let _ = reply.send(r);
                self.schedule().await?;
            }
            Msg::Watch(id, reply) => {
                let answer = self.record(&id).cloned().map(|rec| {
                    let rx = self
                        .watchers
                        .entry(id)
                        .or_insert_with(|| broadcast::channel(1024).0)
                        .subscribe();
                    (rec, rx)
                });
                let _ = reply.send(answer);
            }
            Msg::Register(reg, session, reply) => {
                let r = self.register(reg, session).await;
                let ok = r.is_ok();
                let _ = reply.send(r);
                if ok {
                    self.schedule().await?;
                }
            }
            Msg::Heartbeat(node, epoch) => self.heartbeat(&node, epoch).await?,
            Msg::Status(node, epoch, s) => {
                let current = self
                    .nodes
                    .get(&node)
                    .is_some_and(|e| e.record.epoch == epoch && e.session.is_some());
                if current {
                    self.job_status(&node, s).await?;
                }
            }
            Msg::Disconnected(node, epoch) => {
                self.end_session(&node, epoch, &format!("node {node} lost"))
                    .await?;
                self.schedule().await?;
            }
            Msg::Nodes(reply) => {
                let _ = reply.send(self.nodes.values().map(view).collect());
            }
            Msg::Cordon(node, drain, reply) => {
                let r = self.cordon(&node, drain).await;
                let _ = reply.send(r);
                self.schedule().await?;
            }
        }
        Ok(())
    }

    fn record(&self, id: &str) -> Result<&JobRecord> {
        self.jobs
            .get(id)
            .map(|(r, _)| r)
            .ok_or_else(|| not_found("job", id))
    }

    async fn submit(&mut self, spec: JobSpec, trace: String) -> Result<String> {
        let seq = self.seq + 1;
        let id = format!("job-{seq}");
        let reason = NO_NODES.to_string();
        let rec = JobRecord {
            id: id.clone(),
            seq,
            spec,
            state: JobState::Pending,
            reason: reason.clone(),
            step: 0,
            history: vec![Transition {
                state: JobState::Pending,
                reason,
                unix_ms: now_ms(),
            }],
            placement: Vec::new(),
            attempt: 0,
            checkpoint_step: 0,
            recoveries: Vec::new(),
            trace,
        };
        let rev = match self
            .store
            .compare_and_set(&format!("jobs/{id}"), Expect::Absent, encode(&rec)?)
            .await?
        {
            Ok(rev) => rev,
            Err(_) => {
                return Err(CoordinatorError::Store(format!(
                    "job id {id} already taken in the store (another coordinator?)"
                )));
            }
        };
        self.seq = seq;
        tracing::info!(job = %id, name = %rec.spec.name, "job submitted");
        self.jobs.insert(id.clone(), (rec, rev));
        Ok(id)
    }

    /// Writes a job record (compare-and-set on its revision).
    async fn save(&mut self, rec: JobRecord) -> Result<()> {
        let rev = self
            .jobs
            .get(&rec.id)
            .map(|(_, r)| *r)
            .ok_or_else(|| not_found("job", &rec.id))?;
        let new_rev = self
            .store
            .compare_and_set(
                &format!("jobs/{}", rec.id),
                Expect::Revision(rev),
                encode(&rec)?,
            )
            .await?
            .map_err(|_| {
                CoordinatorError::Store(format!(
                    "job {} was changed in the store by someone else",
                    rec.id
                ))
            })?;
        self.jobs.insert(rec.id.clone(), (rec, new_rev));
        Ok(())
    }

    fn notify(&mut self, id: &str, ev: JobEvent, last: bool) {
        if let Some(w) = self.watchers.get(id) {
            let _ = w.send(ev);
        }
        if last {
            self.watchers.remove(id);
        }
    }

    /// Moves a job to `to`: persisted first, then watchers hear of it. Leaving a placed state
    /// frees the job's devices.
    async fn transition(&mut self, id: &str, to: JobState, reason: &str) -> Result<JobRecord> {
        self.transition_with(id, to, reason, |_| {}).await
    }

    /// [`Actor::transition`] with more changes to the record, persisted in the same write.
    async fn transition_with(
        &mut self,
        id: &str,
        to: JobState,
        reason: &str,
        edit: impl FnOnce(&mut JobRecord) + Send,
    ) -> Result<JobRecord> {
        let mut rec = self.record(id)?.clone();
        edit(&mut rec);
        if !rec.state.allows(to) {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "job {id} cannot go from {:?} to {to:?}",
                rec.state
            )));
        }
        let t = Transition {
            state: to,
            reason: reason.to_string(),
            unix_ms: now_ms(),
        };
        rec.state = to;
        rec.reason = reason.to_string();
        rec.history.push(t.clone());
        let placed = matches!(to, JobState::Scheduling | JobState::Running);
        if !placed {
            self.stragglers.remove(id);
            self.adopting.remove(id);
            // Free the devices; a finished job keeps its placement on record, a requeued one
            // will get a new one.
            for p in &rec.placement {
                if let Some(n) = self.nodes.get_mut(&p.node)
                    && n.busy.get(&p.device) == Some(&rec.id)
                {
                    n.busy.remove(&p.device);
                }
            }
            if to == JobState::Pending {
                rec.placement.clear();
            }
        }
        self.save(rec.clone()).await?;
        tracing::info!(job = %id, state = ?to, reason, "job state changed");
        self.notify(id, JobEvent::State(t), to.is_final());
        Ok(rec)
    }

    /// Tells every node running `rec` to stop it.
    async fn revoke(&self, rec: &JobRecord, reason: &str) {
        let mut nodes: Vec<&str> = rec.placement.iter().map(|p| p.node.as_str()).collect();
        nodes.dedup();
        for n in nodes {
            self.revoke_on(n, &rec.id, reason).await;
        }
    }

    /// Tells `node`, if its session is open, to stop job `id`.
    async fn revoke_on(&self, node: &str, id: &str, reason: &str) {
        if let Some(s) = self.nodes.get(node).and_then(|e| e.session.as_ref()) {
            let msg = pb::CoordinatorMessage {
                msg: Some(pb::coordinator_message::Msg::Revoke(pb::Revoke {
                    job_id: id.to_string(),
                    reason: reason.to_string(),
                })),
            };
            let _ = s.send(Ok(msg)).await;
        }
    }

    async fn cancel(&mut self, id: &str) -> Result<JobRecord> {
        let rec = self.record(id)?.clone();
        if rec.state.is_final() {
            return Ok(rec);
        }
        self.revoke(&rec, "cancelled").await;
        self.transition(id, JobState::Cancelled, "cancelled by request")
            .await
    }

    async fn save_node(&mut self, name: &str) -> Result<()> {
        let Some(e) = self.nodes.get(name) else {
            return Err(not_found("node", name));
        };
        let bytes = serde_json::to_vec(&e.record)
            .map_err(|err| CoordinatorError::Store(format!("encode node: {err}")))?;
        let rev = self.store.put(&format!("nodes/{name}"), bytes).await?;
        if let Some(e) = self.nodes.get_mut(name) {
            e.revision = rev;
        }
        Ok(())
    }

    async fn register(&mut self, reg: Registration, session: Session) -> Result<u64> {
        crate::nodes::check_name(&reg.node)
            .map_err(|r| CoordinatorError::invalid("register.node", r))?;
        if !reg.data_addr.is_empty() && reg.data_addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(CoordinatorError::invalid(
                "register.data_addr",
                format!("{:?} is not an ip:port address", reg.data_addr),
            ));
        }
        if reg.devices == 0 {
            return Err(CoordinatorError::invalid(
                "register.devices",
                "a node needs at least one device",
            ));
        }
        if !reg.models.is_empty() && reg.models.len() != reg.devices {
            return Err(CoordinatorError::invalid(
                "register.devices",
                format!(
                    "{} device descriptions for {} devices",
                    reg.models.len(),
                    reg.devices
                ),
            ));
        }
        // A fresh epoch, written with compare-and-set so two coordinators cannot hand out the
        // same one.
        let key = format!("nodes/{}", reg.node);
        let (old_epoch, expect) = match self.store.get(&key).await? {
            Some(v) => {
                let rec: NodeRecord = decode(&key, &v.value)?;
                (rec.epoch, Expect::Revision(v.revision))
            }
            None => (0, Expect::Absent),
        };
        let epoch = old_epoch + 1;
        let record = NodeRecord {
            name: reg.node.clone(),
            devices: reg.devices,
            models: reg.models.clone(),
            nvlink_domain: reg.nvlink_domain,
            ib_rail: reg.ib_rail,
            data_addr: reg.data_addr,
            epoch,
            state: if reg.spare {
                NodeState::Spare
            } else {
                NodeState::Healthy
            },
        };
        let bytes = serde_json::to_vec(&record)
            .map_err(|e| CoordinatorError::Store(format!("encode node: {e}")))?;
        let revision = self
            .store
            .compare_and_set(&key, expect, bytes)
            .await?
            .map_err(|_| {
                CoordinatorError::Store(format!("node {} registered concurrently", reg.node))
            })?;
        // Fence the old session: its jobs recover, its stream closes, its liveness key goes.
        if let Some(old) = self.nodes.remove(&reg.node) {
            if old.session.is_some() {
                tracing::warn!(node = %reg.node, old = old.record.epoch, new = epoch, "node registered again; fencing the old session");
            }
            if let Some(live) = old.live
                && let Err(e) = self.store.revoke(live.lease).await
            {
                tracing::warn!(node = %reg.node, error = %e, "revoking the old session's liveness lease");
            }
            let jobs: Vec<String> = old.busy.values().cloned().collect();
            for id in jobs {
                if self.record(&id).is_ok_and(|r| !r.state.is_final()) {
                    let reason = format!("node {} re-registered", reg.node);
                    self.recover(&id, &reason, old.last_heartbeat_ms).await?;
                }
            }
        }
        let registered = pb::CoordinatorMessage {
            msg: Some(pb::coordinator_message::Msg::Registered(pb::Registered {
                epoch,
                heartbeat_interval_ms: HEARTBEAT_MS,
            })),
        };
        let live = serde_json::to_vec(&serde_json::json!({ "epoch": epoch }))
            .map_err(|e| CoordinatorError::Store(format!("encode liveness: {e}")))?;
        let live = self
            .store
            .put_ephemeral(
                &format!("{LIVE_PREFIX}{}", reg.node),
                live,
                self.config.lease_ttl(),
            )
            .await?;
        if session.send(Ok(registered)).await.is_err() {
            if let Err(e) = self.store.revoke(live.lease).await {
                tracing::warn!(node = %reg.node, error = %e, "revoking a liveness lease");
            }
            return Err(CoordinatorError::Unavailable);
        }
        tracing::info!(node = %reg.node, epoch, devices = reg.devices, lease = %live.lease, running = reg.running.len(), "node registered");
        let (node, running) = (reg.node.clone(), reg.running);
        self.nodes.insert(
            reg.node.clone(),
            NodeEntry {
                record,
                revision,
                session: Some(session),
                busy: BTreeMap::new(),
                last_heartbeat_ms: now_ms(),
                last_seen: Instant::now(),
                live: Some(live),
                renewed: Instant::now(),
            },
        );
        self.reattached(&node, running).await?;
        Ok(epoch)
    }

    /// A node registered naming the job attempts it runs: the ones this actor waits for (placed
    /// there when it started) are adopted, the others revoked; a waiting job the node does not
    /// name is lost there and recovers.
    async fn reattached(&mut self, node: &str, running: Vec<(String, u32)>) -> Result<()> {
        let mut stale = Vec::new();
        for (id, attempt) in running {
            let current = self.record(&id).ok().map(|r| r.attempt);
            let adoptable = current == Some(attempt)
                && self
                    .adopting
                    .get(&id)
                    .is_some_and(|a| a.waiting.contains(node));
            if !adoptable {
                stale.push(id);
                continue;
            }
            let rec = self.record(&id)?;
            let devices: Vec<usize> = rec
                .placement
                .iter()
                .filter(|p| p.node == node)
                .map(|p| p.device)
                .collect();
            if let Some(e) = self.nodes.get_mut(node) {
                for d in devices {
                    e.busy.insert(d, id.clone());
                }
            }
            let Some(a) = self.adopting.get_mut(&id) else {
                continue;
            };
            a.waiting.remove(node);
            if a.waiting.is_empty() {
                let took = a.began.elapsed();
                self.adopting.remove(&id);
                let nodes = self
                    .record(&id)?
                    .placement
                    .iter()
                    .map(|p| p.node.as_str())
                    .collect::<std::collections::BTreeSet<_>>()
                    .len();
                let reason = format!(
                    "adopted by this coordinator: its {nodes} node(s) came back in {} ms",
                    took.as_millis()
                );
                tracing::info!(job = %id, nodes, took_ms = took.as_millis() as u64, "job adopted");
                self.set_reason(&id, &reason).await?;
            }
        }
        for id in stale {
            tracing::info!(job = %id, node, "revoking a job attempt the node still runs");
            self.revoke_on(node, &id, "not a current attempt of a running job")
                .await;
        }
        let lost: Vec<String> = self
            .adopting
            .iter()
            .filter(|(_, a)| a.waiting.contains(node))
            .map(|(id, _)| id.clone())
            .collect();
        for id in lost {
            self.adopting.remove(&id);
            let cause =
                format!("node {node} came back without the job after the coordinator started");
            self.recover(&id, &cause, 0).await?;
        }
        Ok(())
    }

    /// Ends session `epoch` of `node` (its stream broke, it went silent, or its liveness key
    /// went): the node is Failed, the stream closed with `reason`, the liveness lease revoked,
    /// and its jobs fail with `reason`. An older or already ended session is left alone.
    async fn end_session(&mut self, node: &str, epoch: u64, reason: &str) -> Result<()> {
        let Some(e) = self.nodes.get_mut(node) else {
            return Ok(());
        };
        if e.record.epoch != epoch || e.session.is_none() {
            return Ok(()); // an older, fenced session, or one already ended
        }
        let session = e.session.take();
        let live = e.live.take();
        e.record.state = NodeState::Failed;
        let last_heard = e.last_heartbeat_ms;
        let jobs: Vec<String> = e.busy.values().cloned().collect();
        if jobs.is_empty() {
            tracing::info!(node, epoch, reason, "node session ended (it ran no job)");
        } else {
            tracing::warn!(node, epoch, reason, jobs = jobs.len(), "node session ended");
        }
        if let Some(s) = session {
            // The agent hears why, if it still listens; dropping the sender closes the stream.
            // Never wait on a full stream here: the agent may be the hung one.
            // ABORTED, not a transport error: the agent stops the session's jobs at once (they
            // recover elsewhere) instead of keeping them for a coordinator that took over.
            let _ = s.try_send(Err(Status::aborted(format!(
                "{reason}; the session is closed, register again"
            ))));
        }
        if let Some(live) = live
            && let Err(err) = self.store.revoke(live.lease).await
        {
            tracing::warn!(node, error = %err, "revoking a liveness lease");
        }
        self.save_node(node).await?;
        let mut seen = Vec::new();
        for id in jobs {
            if seen.contains(&id) {
                continue;
            }
            seen.push(id.clone());
            if self.record(&id).is_ok_and(|r| !r.state.is_final()) {
                self.recover(&id, reason, last_heard).await?;
            }
        }
        // A job already recovering from what its other nodes saw of this loss: the node is
        // part of the cause.
        let recovering: Vec<String> = self
            .jobs
            .values()
            .filter(|(r, _)| {
                r.state == JobState::Recovering && r.placement.iter().any(|p| p.node == node)
            })
            .map(|(r, _)| r.id.clone())
            .collect();
        for id in recovering {
            let mut rec = self.record(&id)?.clone();
            if let Some(open) = rec.recoveries.last_mut()
                && open.resumed_unix_ms == 0
                && open.last_heard_unix_ms == 0
            {
                open.cause = format!("{reason} ({})", open.cause);
                open.last_heard_unix_ms = last_heard;
                self.save(rec).await?;
            }
        }
        Ok(())
    }

    /// Starts recovering a placed job from a failure: the job is Recovering (persisted, with
    /// the open recovery's record), its surviving ranks are told to stop and its devices freed;
    /// after [`ControlConfig::recovery_settle`] it is placed again on healthy devices and
    /// continues from its newest committed checkpoint. A job out of recoveries fails.
    async fn recover(&mut self, id: &str, cause: &str, last_heard_unix_ms: u64) -> Result<()> {
        let settle = self.config.recovery_settle;
        self.recover_after(id, cause, last_heard_unix_ms, settle)
            .await
    }

    /// [`Actor::recover`], placing the job again after `delay`.
    async fn recover_after(
        &mut self,
        id: &str,
        cause: &str,
        last_heard_unix_ms: u64,
        delay: Duration,
    ) -> Result<()> {
        let rec = self.record(id)?.clone();
        // In the job's trace, from the failure to the attempt stopped (not entered: the actor
        // awaits inside it).
        let _span = job_span(
            &rec,
            tracing::info_span!("recovery", job = %id, cause, attempt = rec.attempt + 1),
        );
        self.finished_on.remove(id);
        self.adopting.remove(id);
        self.revoke(&rec, cause).await;
        match rec.state {
            JobState::Running | JobState::Scheduling => {}
            // Already recovering, or waiting for devices: nothing runs to stop.
            _ => return Ok(()),
        }
        // Recoveries since the newest checkpoint was committed: a job that keeps committing
        // new checkpoints is making progress and recovers as often as it fails (a long job on
        // a big cluster fails many times); one that keeps failing from the same checkpoint
        // (or before its recovery completes) gives up.
        let fruitless = rec
            .recoveries
            .iter()
            .rev()
            .take_while(|r| r.resumed_unix_ms == 0 || r.restored_step >= rec.checkpoint_step)
            .count() as u32;
        if fruitless >= self.config.max_recoveries {
            let reason = format!(
                "{cause}; gave up after {} recoveries without a new checkpoint",
                self.config.max_recoveries
            );
            self.transition(id, JobState::Failed, &reason).await?;
            return Ok(());
        }
        let mut r = rec.clone();
        r.attempt += 1;
        r.recoveries.push(crate::jobs::Recovery {
            attempt: r.attempt,
            cause: cause.to_string(),
            detected_unix_ms: now_ms(),
            last_heard_unix_ms,
            failed_step: r.step,
            dp_before: r.placement.iter().map(|p| p.dp_rank + 1).max().unwrap_or(0) as u32,
            nodes_before: crate::jobs::nodes_of(&r.placement),
            ..Default::default()
        });
        self.save(r).await?;
        self.transition(id, JobState::Recovering, cause).await?;
        self.replan_at
            .insert(id.to_string(), Instant::now() + delay);
        Ok(())
    }

    /// At a checkpoint of a job that runs with fewer data-parallel ranks than its spec asks
    /// for (it shrank after losing devices): if the devices for the spec's width are there
    /// again (free ones plus the job's own), the job goes back to them through a recovery from
    /// that checkpoint.
    async fn grow_back(&mut self, id: &str, step: u64) -> Result<()> {
        let rec = self.record(id)?.clone();
        let now = rec
            .placement
            .iter()
            .map(|p| p.dp_rank + 1)
            .max()
            .unwrap_or(0);
        let want = rec.spec.parallelism.dp;
        if rec.state != JobState::Running || now >= want || step >= rec.spec.training.steps {
            return Ok(());
        }
        let recovering = rec.attempt > 0;
        let cluster = Cluster {
            nodes: self
                .nodes
                .iter()
                .filter(|(_, e)| {
                    e.session.is_some()
                        && (e.record.state == NodeState::Healthy
                            || (recovering && e.record.state == NodeState::Spare))
                })
                .map(|(name, e)| {
                    let free = (0..e.record.devices)
                        .filter(|d| e.busy.get(d).is_none_or(|j| j == id))
                        .count();
                    (name.clone(), free)
                })
                .filter(|(_, free)| *free > 0)
                .collect(),
        };
        let Ok(model) = resolve_model(&rec.spec.model) else {
            return Ok(());
        };
        let par = rec.spec.parallelism()?;
        if shoal_spec::plan::plan(&model, &par, &cluster).is_err() {
            return Ok(());
        }
        let cause =
            format!("growing back from dp {now} to dp {want} at the checkpoint of step {step}");
        tracing::info!(job = %id, now, want, step, "growing back");
        self.recover(id, &cause, 0).await
    }

    /// Places the recovering jobs whose settle time has passed; one that does not fit waits
    /// in the queue (Pending) for devices.
    async fn replan_due(&mut self) -> Result<()> {
        if self.closing {
            self.replan_at.clear();
            return Ok(());
        }
        let now = Instant::now();
        let due: Vec<String> = self
            .replan_at
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            self.replan_at.remove(&id);
            if self.record(&id).ok().map(|r| r.state) != Some(JobState::Recovering) {
                continue;
            }
            let began = std::time::Instant::now();
            match self.try_place(&id).await? {
                Ok(()) => self.replanned(&id, began.elapsed()).await?,
                Err(reason) => {
                    let reason = format!("recovering: {reason}");
                    self.transition(&id, JobState::Pending, &reason).await?;
                }
            }
        }
        self.schedule().await
    }

    async fn cordon(&mut self, node: &str, drain: bool) -> Result<NodeView> {
        let e = self
            .nodes
            .get_mut(node)
            .ok_or_else(|| not_found("node", node))?;
        e.record.state = if drain {
            NodeState::Draining
        } else {
            NodeState::Cordoned
        };
        let jobs: Vec<String> = e.busy.values().cloned().collect();
        self.save_node(node).await?;
        if drain {
            let mut seen = Vec::new();
            for id in jobs {
                if seen.contains(&id) {
                    continue;
                }
                seen.push(id.clone());
                let rec = self.record(&id)?.clone();
                if rec.state.is_final() {
                    continue;
                }
                // Placed elsewhere, continuing from its newest checkpoint.
                let reason = format!("node {node} drained");
                self.recover(&id, &reason, 0).await?;
            }
        }
        let e = self
            .nodes
            .get(node)
            .ok_or_else(|| not_found("node", node))?;
        Ok(view(e))
    }

    async fn job_status(&mut self, node: &str, s: pb::AssignmentStatus) -> Result<()> {
        // Statuses come from every node of a job at every step: read the record, do not copy
        // it (a big job's placement has thousands of ranks).
        let Ok(rec) = self.record(&s.job_id) else {
            return Ok(());
        };
        let (id, state, attempt) = (rec.id.clone(), rec.state, rec.attempt);
        if state.is_final() {
            self.finished_on.remove(&id);
            return Ok(());
        }
        if s.state == pb::JobState::Failed as i32 {
            tracing::warn!(job = %id, node, attempt = s.attempt, retryable = s.retryable, reason = %s.reason, "a node reports the job failed");
        }
        if s.attempt != attempt {
            // What an earlier attempt's ranks say while they stop is not news.
            return Ok(());
        }
        match pb::JobState::try_from(s.state) {
            Ok(pb::JobState::Running) => {
                if let Some(start) = s.started_step {
                    self.started(&id, start).await?;
                }
                if s.checkpoint_step > 0 {
                    // Like steps, kept in memory and persisted with the next state change: the
                    // job's checkpoint directory, not this field, is what a recovery restores.
                    if let Some(entry) = self.jobs.get_mut(&id) {
                        entry.0.checkpoint_step = entry.0.checkpoint_step.max(s.checkpoint_step);
                    }
                    tracing::info!(job = %id, step = s.checkpoint_step, "checkpoint committed");
                    self.grow_back(&id, s.checkpoint_step).await?;
                }
                if !s.checkpoint_error.is_empty() {
                    tracing::warn!(job = %id, node, error = %s.checkpoint_error, "checkpoint failed");
                    self.notify(&id, JobEvent::Error(s.checkpoint_error.clone()), false);
                    let policy = &self.record(&id)?.spec.checkpointing;
                    if policy.pauses() {
                        let retry = Duration::from_secs_f64(policy.retry_s);
                        let cause = format!(
                            "paused: {} on node {node} (checkpointing.on_error = \"pause\"); \
                             running again from the last committed checkpoint in {} ms",
                            s.checkpoint_error,
                            retry.as_millis()
                        );
                        self.recover_after(&id, &cause, 0, retry).await?;
                        return self.schedule().await;
                    }
                }
                if let Some(m) = &s.step {
                    self.straggling(&id, attempt, node, m.step, s.busy_s);
                }
                if let Some(m) = s.step {
                    if self.record(&id)?.state == JobState::Scheduling {
                        self.transition(&id, JobState::Running, "").await?;
                    }
                    // Steps are not persisted one by one; the record catches up at the next
                    // state change.
                    if let Some(entry) = self.jobs.get_mut(&id) {
                        entry.0.step = m.step;
                    }
                    // Only the node holding rank 0 sends expert loads: keep the last ones.
                    let kept = self.last_steps.entry(id.clone()).or_default();
                    let loads = if m.expert_loads.is_empty() {
                        std::mem::take(&mut kept.expert_loads)
                    } else {
                        m.expert_loads.clone()
                    };
                    if m.step >= kept.step {
                        *kept = pb::StepMetrics {
                            expert_loads: loads,
                            ..m.clone()
                        };
                    } else {
                        kept.expert_loads = loads;
                    }
                    // Every node reports each step; a recovery runs steps again: the latest
                    // report of a step replaces what was kept from it on.
                    let curve = self.curves.entry(id.clone()).or_default();
                    while curve.back().is_some_and(|p| p.step >= m.step) {
                        curve.pop_back();
                    }
                    if curve.len() == STEP_HISTORY {
                        curve.pop_front();
                    }
                    curve.push_back(StepPoint {
                        step: m.step,
                        loss: m.loss,
                        tokens_per_s: m.tokens_per_s,
                        seconds: m.seconds,
                    });
                    self.notify(&id, JobEvent::Step(m), false);
                }
                if self.record(&id)?.state == JobState::Scheduling {
                    self.transition(&id, JobState::Running, "").await?;
                }
            }
            Ok(pb::JobState::Succeeded) => {
                if state == JobState::Scheduling {
                    self.transition(&id, JobState::Running, "").await?;
                }
                let done = self.finished_on.entry(id.clone()).or_default();
                done.insert(node.to_string());
                let done = done.clone();
                let all = self
                    .record(&id)?
                    .placement
                    .iter()
                    .all(|p| done.contains(&p.node));
                if all {
                    self.finished_on.remove(&id);
                    self.transition(&id, JobState::Succeeded, "").await?;
                    self.schedule().await?;
                }
            }
            Ok(pb::JobState::Failed) => {
                self.finished_on.remove(&id);
                if s.retryable {
                    let cause = format!("node {node}: {}", s.reason);
                    self.recover(&id, &cause, 0).await?;
                } else {
                    let rec = self.record(&id)?.clone();
                    self.revoke(&rec, "another rank failed").await;
                    self.transition(&id, JobState::Failed, &s.reason).await?;
                }
                self.schedule().await?;
            }
            _ => {}
        }
        Ok(())
    }

    /// An attempt's trainer is ready at step `start`: a placed job runs; a recovering one has
    /// recovered (its open record is closed with the step it went back to).
    async fn started(&mut self, id: &str, start: u64) -> Result<()> {
        // Every node of the attempt reports its start; the first one is news, the others (a
        // job of a thousand nodes sends a thousand) change nothing and are not persisted.
        let current = self.record(id)?;
        let closes = current
            .recoveries
            .last()
            .is_some_and(|open| open.attempt == current.attempt && open.resumed_unix_ms == 0);
        if !closes && current.state != JobState::Scheduling {
            return Ok(());
        }
        let mut rec = current.clone();
        let mut reason = String::new();
        if let Some(open) = rec.recoveries.last_mut()
            && open.attempt == rec.attempt
            && open.resumed_unix_ms == 0
        {
            open.resumed_unix_ms = now_ms();
            open.restored_step = start;
            open.dp_after = rec
                .placement
                .iter()
                .map(|p| p.dp_rank + 1)
                .max()
                .unwrap_or(0) as u32;
            open.nodes_after = crate::jobs::nodes_of(&rec.placement);
            reason = format!(
                "recovered in {} ms: continuing after step {start} ({} steps redone)",
                open.recovery_ms().unwrap_or(0),
                open.steps_redone()
            );
            tracing::info!(job = %id, attempt = open.attempt, restored = start, redone = open.steps_redone(), recovery_ms = open.recovery_ms().unwrap_or(0), "job recovered");
        }
        rec.step = start;
        self.save(rec.clone()).await?;
        if rec.state == JobState::Scheduling {
            self.transition(id, JobState::Running, &reason).await?;
        }
        Ok(())
    }

    /// Places queued jobs, head first, while they fit.
    fn schedule(
        &mut self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + '_>> {
        Box::pin(async move {
            let mut queue: Vec<(i32, u64, String)> = self
                .jobs
                .values()
                .filter(|(r, _)| r.state == JobState::Pending)
                .map(|(r, _)| (-r.spec.priority, r.seq, r.id.clone()))
                .collect();
            queue.sort();
            let mut blocked_by: Option<String> = None;
            for (_, _, id) in queue {
                if let Some(head) = &blocked_by {
                    let reason = format!("queued behind {head}");
                    self.set_reason(&id, &reason).await?;
                    continue;
                }
                let began = std::time::Instant::now();
                match self.try_place(&id).await? {
                    Ok(()) => self.replanned(&id, began.elapsed()).await?,
                    Err(reason) => {
                        let recovering = self
                            .record(&id)?
                            .recoveries
                            .last()
                            .is_some_and(|r| r.resumed_unix_ms == 0);
                        let reason = if recovering {
                            format!("recovering: {reason}")
                        } else {
                            reason
                        };
                        self.set_reason(&id, &reason).await?;
                        blocked_by = Some(id);
                    }
                }
            }
            Ok(())
        })
    }

    async fn set_reason(&mut self, id: &str, reason: &str) -> Result<()> {
        let mut rec = self.record(id)?.clone();
        if rec.reason == reason {
            return Ok(());
        }
        rec.reason = reason.to_string();
        self.save(rec).await
    }

    /// Feeds a node's compute seconds of a step to the job's straggler detector; a node much
    /// slower than its peers over several steps becomes a job event.
    fn straggling(&mut self, id: &str, attempt: u32, node: &str, step: u64, busy_s: f64) {
        if busy_s <= 0.0 {
            return;
        }
        let Some((rec, _)) = self.jobs.get(id) else {
            return;
        };
        let fresh = || {
            crate::stragglers::Detector::new(
                rec.placement.iter().map(|p| (p.node.as_str(), p.pp_rank)),
                crate::stragglers::DEFAULT_WINDOW,
                crate::stragglers::DEFAULT_FACTOR,
            )
        };
        let entry = self
            .stragglers
            .entry(id.to_string())
            .or_insert_with(|| (attempt, fresh()));
        if entry.0 != attempt {
            *entry = (attempt, fresh());
        }
        if let Some(x) = entry.1.observe(node, step, busy_s) {
            tracing::warn!(job = %id, node = %x.node, step = x.step, busy_s = x.busy_s, peers_busy_s = x.peers_busy_s, steps = x.steps, "straggler");
            self.notify(id, JobEvent::Straggler(x), false);
        }
    }

    /// Records on the open recovery how long placing the job again took.
    async fn replanned(&mut self, id: &str, took: Duration) -> Result<()> {
        let mut rec = self.record(id)?.clone();
        if let Some(open) = rec.recoveries.last_mut()
            && open.attempt == rec.attempt
            && open.replan_us == 0
        {
            open.replan_us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
            tracing::info!(job = %id, attempt = open.attempt, replan_us = open.replan_us, "placed again");
            self.save(rec).await?;
        }
        Ok(())
    }

    /// Places a pending job if its ranks fit; `Ok(Err(reason))` when it must wait.
    async fn try_place(&mut self, id: &str) -> Result<Result<(), String>> {
        let began = std::time::Instant::now();
        let rec = self.record(id)?.clone();
        let _span = job_span(
            &rec,
            tracing::info_span!("place", job = %id, attempt = rec.attempt),
        );
        // A job being recovered may also take spare nodes; its earlier nodes come first, then
        // the spares, then the other healthy nodes (each class by name).
        let recovering = rec.attempt > 0;
        let earlier: std::collections::BTreeSet<&str> =
            rec.placement.iter().map(|p| p.node.as_str()).collect();
        let mut usable: Vec<(u8, &String, Vec<usize>)> = self
            .nodes
            .iter()
            .filter(|(_, e)| e.session.is_some())
            .filter_map(|(name, e)| {
                let class = match e.record.state {
                    NodeState::Healthy if earlier.contains(&name.as_str()) => 0,
                    NodeState::Healthy => 2,
                    NodeState::Spare if recovering => 1,
                    _ => return None,
                };
                let free: Vec<usize> = (0..e.record.devices)
                    .filter(|d| !e.busy.contains_key(d))
                    .collect();
                Some((class, name, free))
            })
            .filter(|(_, _, free)| !free.is_empty())
            .collect();
        usable.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        let usable: Vec<(&String, Vec<usize>)> =
            usable.into_iter().map(|(_, n, f)| (n, f)).collect();
        if self.nodes.values().all(|e| e.session.is_none()) {
            return Ok(Err(NO_NODES.to_string()));
        }
        let model = match resolve_model(&rec.spec.model) {
            Ok(m) => m,
            Err(e) => {
                self.transition(id, JobState::Failed, &e.to_string())
                    .await?;
                return Ok(Ok(()));
            }
        };
        let cluster = Cluster {
            nodes: usable
                .iter()
                .map(|(n, free)| ((*n).clone(), free.len()))
                .collect(),
        };
        // The spec's data-parallel width; a recovering job may shrink to its `min_dp` (keeping
        // the global batch, so each rank takes more of it) when the devices are not there.
        let base = rec.spec.parallelism()?;
        let widths: Vec<usize> = if recovering {
            let (min_dp, _) = rec.spec.dp_bounds();
            let batch = rec.spec.training.batch;
            (min_dp.max(1)..=base.dp)
                .rev()
                .filter(|&d| {
                    d == base.dp
                        || (d % base.ep.max(1) == 0
                            && batch % d == 0
                            && base.micro_batches.max(1) <= batch / d)
                })
                .collect()
        } else {
            vec![base.dp]
        };
        let mut found = None;
        for &dp in &widths {
            let mut par = base;
            par.dp = dp;
            match shoal_spec::plan::plan(&model, &par, &cluster) {
                Ok(p) => {
                    found = Some((p, dp));
                    break;
                }
                Err(e) if e.to_string().contains(NOT_ENOUGH_DEVICES) => continue,
                Err(e) => {
                    self.transition(id, JobState::Failed, &e.to_string())
                        .await?;
                    return Ok(Ok(()));
                }
            }
        }
        let Some((plan, dp)) = found else {
            let free: usize = usable.iter().map(|(_, f)| f.len()).sum();
            let least = widths.last().copied().unwrap_or(base.dp);
            return Ok(Err(format!(
                "{NOT_ENOUGH_DEVICES}: needs {}, {free} free on healthy nodes",
                base.pp * least
            )));
        };
        let planned = began.elapsed();
        let placement: Vec<Placed> = plan
            .ranks
            .iter()
            .map(|r| {
                let (name, free) = &usable[r.node];
                Placed {
                    pp_rank: r.pp_rank,
                    dp_rank: r.dp_rank,
                    node: (*name).clone(),
                    device: free[r.device],
                }
            })
            .collect();
        for p in &placement {
            if let Some(n) = self.nodes.get_mut(&p.node) {
                n.busy.insert(p.device, id.to_string());
            }
        }
        let reason = format!("placed on {} device(s)", placement.len());
        // The placement and the state change: one write of a record that, for a job of
        // thousands of ranks, is hundreds of kilobytes.
        let rec = self
            .transition_with(id, JobState::Scheduling, &reason, |r| {
                r.placement = placement.clone();
            })
            .await?;
        let persisted = began.elapsed();
        let wire = |p: &Placed| pb::RankPlacement {
            pp_rank: p.pp_rank as u32,
            dp_rank: p.dp_rank as u32,
            node: p.node.clone(),
            device: p.device as u32,
        };
        let mut run_spec = rec.spec.clone();
        run_spec.parallelism.dp = dp;
        let spec = shoal_proto::convert::job_spec_to_wire(&run_spec)?;
        // The job's nodes in order of first appearance, and each rank's among them.
        let mut nodes: Vec<&str> = Vec::new();
        let mut index: BTreeMap<&str, u32> = BTreeMap::new();
        let mut mesh_nodes = vec![0u32; placement.len()];
        let mut ranks: Vec<Vec<pb::RankPlacement>> = Vec::new();
        for p in &placement {
            let i = *index.entry(p.node.as_str()).or_insert_with(|| {
                nodes.push(p.node.as_str());
                ranks.push(Vec::new());
                (nodes.len() - 1) as u32
            });
            if let Some(slot) = mesh_nodes.get_mut(p.pp_rank * dp + p.dp_rank) {
                *slot = i;
            }
            ranks[i as usize].push(wire(p));
        }
        let peers: Vec<pb::NodeAddress> = nodes
            .iter()
            .map(|n| pb::NodeAddress {
                node: (*n).to_string(),
                data_addr: self
                    .nodes
                    .get(*n)
                    .map(|e| e.record.data_addr.clone())
                    .unwrap_or_default(),
            })
            .collect();
        // Encoded once; each assignment shares the bytes.
        let mesh = shoal_proto::encode_mesh(&pb::JobMesh { peers, mesh_nodes });
        // Queued on every node's stream without yielding to the streams' tasks in between (as
        // tokio's cooperative budget would every 128 sends): they encode and write the
        // assignments once all are queued. A full stream still waits.
        tokio::task::unconstrained(self.send_assignments(
            id,
            (rec.attempt, rec.checkpoint_step, rec.trace.clone()),
            spec,
            nodes,
            ranks,
            mesh,
        ))
        .await;
        tracing::debug!(job = %id, ranks = placement.len(), plan_us = planned.as_micros() as u64, persist_us = (persisted - planned).as_micros() as u64, send_us = (began.elapsed() - persisted).as_micros() as u64, "placed");
        Ok(Ok(()))
    }

    /// Sends attempt `attempt` of job `id` to each of `nodes`, with its `ranks`; a recovery
    /// restores from the checkpoint of step `checkpoint` (or the newest valid one before it).
    async fn send_assignments(
        &self,
        id: &str,
        (attempt, checkpoint, traceparent): (u32, u64, String),
        spec: pb::JobSpec,
        nodes: Vec<&str>,
        ranks: Vec<Vec<pb::RankPlacement>>,
        mesh: shoal_proto::Bytes,
    ) {
        for (n, ranks) in nodes.into_iter().zip(ranks) {
            let msg = pb::CoordinatorMessage {
                msg: Some(pb::coordinator_message::Msg::Assign(pb::Assignment {
                    job_id: id.to_string(),
                    spec: Some(spec.clone()),
                    ranks,
                    attempt,
                    mesh: mesh.clone(),
                    restore_step: (attempt > 0).then_some(checkpoint),
                    traceparent: traceparent.clone(),
                })),
            };
            if let Some(s) = self.nodes.get(n).and_then(|e| e.session.as_ref()) {
                let _ = s.send(Ok(msg)).await;
            }
        }
    }
}

/// `span`, in the trace of `rec`'s submission.
fn job_span(rec: &JobRecord, span: tracing::Span) -> tracing::Span {
    shoal_proto::trace_context::follow(&span, &rec.trace);
    span
}
