//! The node agent: one per node. It attaches to the coordinator with one long-lived bidirectional
//! stream (`AgentService.Attach`), registers the node's devices, heartbeats, runs the jobs it is
//! assigned (each on a dedicated thread, never on the async runtime) and reports their progress.
//! When the stream breaks the coordinator knows at once. The agent keeps its jobs running and
//! attaches again (to a standby that took over, or to the same coordinator), naming them: the
//! coordinator adopts the ones it expects and revokes the rest.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use shoal_proto::convert;
use shoal_proto::transport::{error_chain, pem_has};
use shoal_proto::v1 as pb;
use shoal_proto::v1::agent_service_client::AgentServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{Result, WorkerError};

/// What an agent offers and where it attaches.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The coordinators' URLs, for example `http://127.0.0.1:50051`: a leader and its standbys
    /// (only the leader answers), tried in turn.
    pub coordinators: Vec<String>,
    /// How long the agent keeps attaching again after its session broke, its jobs running
    /// meanwhile, before it stops them and gives up.
    pub reconnect: Duration,
    /// This node's name (unique in the cluster).
    pub node: String,
    /// The devices to offer (see [`crate::devices::DeviceRequest::resolve`]).
    pub devices: Vec<crate::devices::Device>,
    /// Offer the node as a spare.
    pub spare: bool,
    /// Bearer token for registration, if the coordinator asks for one.
    pub token: Option<String>,
    /// The CA certificate (PEM) that signed the coordinator's certificate: needed for, and only
    /// accepted with, an `https://` coordinator.
    pub tls_ca: Option<Vec<u8>>,
    /// A client certificate, for a coordinator that asks for mutual TLS (`https://` only).
    pub tls_identity: Option<ClientIdentity>,
    /// Where to accept data-plane connections from other nodes' ranks (`host:port`, port 0
    /// for any); `None`: this node takes no job that spans nodes.
    pub data_addr: Option<std::net::SocketAddr>,
    /// The node's Prometheus metrics, which its job threads update.
    pub metrics: crate::metrics::AgentMetrics,
}

/// A client certificate chain and its private key (PEM), for mutual TLS.
#[derive(Clone)]
pub struct ClientIdentity {
    /// The certificate chain, leaf first.
    pub cert_pem: Vec<u8>,
    /// Its private key.
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for ClientIdentity {
    // The private key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &format_args!("<redacted>"))
            .finish()
    }
}

fn transport(what: &str, e: impl std::fmt::Display) -> WorkerError {
    WorkerError::invalid("coordinator", format!("{what}: {e}"))
}

/// The error of the attach call, explained (a TLS mismatch shows up there).
fn attach_err(s: tonic::Status) -> WorkerError {
    transport("attach", shoal_proto::transport::explain(&s))
}

/// The endpoint of the coordinator at `url`. An `https://` URL needs `tls_ca`, the CA
/// certificate (PEM) that signed the coordinator's certificate, and may present `identity` for
/// mutual TLS; an `http://` URL refuses both, so a TLS setting is never silently dropped.
/// Errors name the CLI flags (`--tls-ca`, `--tls-cert`).
pub fn endpoint(
    url: &str,
    tls_ca: Option<&[u8]>,
    identity: Option<&ClientIdentity>,
) -> Result<tonic::transport::Endpoint> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let ep = Endpoint::from_shared(url.to_string()).map_err(|e| transport(url, e))?;
    let https = ep.uri().scheme_str() == Some("https");
    if !https {
        let flag = match (tls_ca, identity) {
            (Some(_), _) => Some("--tls-ca"),
            (None, Some(_)) => Some("--tls-cert"),
            (None, None) => None,
        };
        return match flag {
            Some(flag) => Err(WorkerError::invalid(
                flag,
                format!("the coordinator {url} is not https://; TLS needs an https:// URL"),
            )),
            None => Ok(ep),
        };
    }
    let Some(ca) = tls_ca else {
        return Err(WorkerError::invalid(
            "--tls-ca",
            format!(
                "the coordinator {url} is https://: name the CA certificate (PEM) that signed \
                 its certificate"
            ),
        ));
    };
    if !pem_has(ca, "CERTIFICATE") {
        return Err(WorkerError::invalid("--tls-ca", "no PEM CERTIFICATE block"));
    }
    let mut cfg = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .timeout(Duration::from_secs(10));
    if let Some(id) = identity {
        if !pem_has(&id.cert_pem, "CERTIFICATE") {
            return Err(WorkerError::invalid(
                "--tls-cert",
                "no PEM CERTIFICATE block",
            ));
        }
        cfg = cfg.identity(Identity::from_pem(&id.cert_pem, &id.key_pem));
    }
    let flags = if identity.is_some() {
        "--tls-ca/--tls-cert/--tls-key"
    } else {
        "--tls-ca"
    };
    ep.tls_config(cfg)
        .map_err(|e| WorkerError::invalid(flags, error_chain(&e)))
}

fn devices(offered: &[crate::devices::Device]) -> Vec<pb::Device> {
    offered
        .iter()
        .enumerate()
        .map(|(i, d)| pb::Device {
            index: i as u32,
            kind: match d.kind {
                crate::devices::DeviceKind::Cpu => pb::DeviceKind::Cpu,
                crate::devices::DeviceKind::Cuda => pb::DeviceKind::Cuda,
            } as i32,
            name: d.name.clone(),
            memory_bytes: d.memory_bytes,
            job_id: String::new(),
            compute_capability: d
                .compute_capability
                .map(|(a, b)| format!("{a}.{b}"))
                .unwrap_or_default(),
            nvlink_peers: d.nvlink_peers.clone(),
        })
        .collect()
}

/// A status of attempt `attempt` of `job_id`; the caller fills in what else it reports.
fn status(job_id: &str, attempt: u32, state: pb::JobState) -> pb::AssignmentStatus {
    pb::AssignmentStatus {
        job_id: job_id.to_string(),
        state: state as i32,
        attempt,
        ..Default::default()
    }
}

fn message(s: pb::AssignmentStatus) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Status(s)),
    }
}

/// This node's endpoints of a job whose ranks span nodes: the nodes in the order the coordinator
/// listed them, each rank on the node that holds it. Without pipeline parallelism the mesh's
/// ranks are the data-parallel ranks; with it, the devices `pp_rank * dp + dp_rank`. Connecting,
/// and every wait for a frame after, gives up after `timeout` (the job's
/// `training.comm_timeout_s`).
fn cross_node_mesh(
    a: &pb::Assignment,
    m: &pb::JobMesh,
    spec: &shoal_spec::job::JobSpec,
    timeout: Duration,
    node: &str,
    acceptor: Option<&crate::comm::tcp::Acceptor>,
) -> Result<Vec<crate::comm::transport::LocalTransport>> {
    let bad = |why: String| WorkerError::invalid("assignment", why);
    let acceptor = acceptor.ok_or_else(|| {
        bad("the job spans nodes and this agent has no data-plane address (--data-addr)".into())
    })?;
    let names: Vec<&str> = m.peers.iter().map(|p| p.node.as_str()).collect();
    let addrs = m
        .peers
        .iter()
        .map(|p| {
            p.data_addr.parse::<std::net::SocketAddr>().map_err(|e| {
                bad(format!(
                    "node {} has data-plane address {:?}: {e}",
                    p.node, p.data_addr
                ))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let world = m.mesh_nodes.len();
    let par = &spec.parallelism;
    if world != par.pp * par.dp {
        return Err(bad(format!(
            "{world} ranks in the mesh, but the spec asks for pp {} x dp {}",
            par.pp, par.dp
        )));
    }
    let node_of = m
        .mesh_nodes
        .iter()
        .enumerate()
        .map(|(r, &n)| {
            let n = n as usize;
            if n < names.len() {
                Ok(n)
            } else {
                Err(bad(format!(
                    "rank {r} is on node {n} of {} with addresses",
                    names.len()
                )))
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let me = names
        .iter()
        .position(|n| *n == node)
        .ok_or_else(|| bad(format!("this node {node} is not among the job's nodes")))?;
    // The same id on every node of the job's attempt, and another for every other job and
    // attempt.
    let mesh_id = a
        .job_id
        .bytes()
        .chain(a.attempt.to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    crate::comm::tcp::connect_via(
        &crate::comm::tcp::MeshLayout {
            mesh_id,
            node_of,
            addrs,
        },
        me,
        acceptor,
        timeout,
    )
}

/// Runs one assignment on a dedicated thread, reporting through `out`; `stop` revokes it
/// (between steps, and at once for waits on other nodes' frames). The thread first waits for
/// `previous`, an earlier attempt of the same job on this node, to end.
#[allow(clippy::too_many_arguments)]
fn start_job(
    a: pb::Assignment,
    gpu: Option<usize>,
    node: String,
    metrics: crate::metrics::AgentMetrics,
    acceptor: Option<crate::comm::tcp::Acceptor>,
    out: mpsc::Sender<pb::AgentMessage>,
    stop: Arc<AtomicBool>,
    previous: Option<std::thread::JoinHandle<()>>,
) -> Option<std::thread::JoinHandle<()>> {
    let job_id = a.job_id.clone();
    let attempt = a.attempt;
    let spawned = std::thread::Builder::new()
        .name(format!("job-{job_id}"))
        .spawn(move || {
            if let Some(p) = previous {
                let _ = p.join();
            }
            // This node's part of the attempt, in the job's trace: its steps, pipeline
            // operations and exchanges are children.
            let span = tracing::info_span!("attempt", job = %job_id, attempt, node = %node);
            shoal_proto::trace_context::follow(&span, &a.traceparent);
            let _in = span.enter();
            metrics.job_running(1);
            // Ends the gauge's count however the thread ends.
            struct Running<'m>(&'m crate::metrics::AgentMetrics);
            impl Drop for Running<'_> {
                fn drop(&mut self) {
                    self.0.job_running(-1);
                }
            }
            let _running = Running(&metrics);
            // The node holding rank (0, 0) sends the expert loads (every node has the same).
            let first = a.ranks.iter().any(|r| r.pp_rank == 0 && r.dp_rank == 0);
            let report = |s: pb::AssignmentStatus| out.blocking_send(message(s)).is_ok();
            let failed = |reason: String, retryable: bool| {
                let mut s = status(&job_id, attempt, pb::JobState::Failed);
                s.reason = reason;
                s.retryable = retryable;
                report(s);
            };
            let spec = match a.spec.clone().map(convert::job_spec) {
                Some(Ok(s)) => s,
                Some(Err(e)) => return failed(e.to_string(), false),
                None => return failed("assignment without a spec".into(), false),
            };
            // Ranks on other nodes: this node's ranks join them over TCP.
            let layout = match shoal_proto::decode_mesh(&a) {
                Ok(m) => m,
                Err(e) => return failed(format!("the assignment's mesh: {e}"), false),
            };
            let mesh = if layout.mesh_nodes.len() > a.ranks.len() {
                let timeout = crate::job::options(&spec).comm_timeout();
                match cross_node_mesh(&a, &layout, &spec, timeout, &node, acceptor.as_ref()) {
                    Ok(m) => Some(m),
                    Err(e) => return failed(e.to_string(), true),
                }
            } else {
                None
            };
            // A revocation also ends the waits for other nodes' frames.
            let ended = Arc::new(AtomicBool::new(false));
            let watcher = mesh.as_ref().and_then(|m| m.first()).map(|t| {
                let (abort, stop, ended) =
                    (t.abort_handle(), Arc::clone(&stop), Arc::clone(&ended));
                std::thread::spawn(move || {
                    while !ended.load(Ordering::Relaxed) {
                        if stop.load(Ordering::Relaxed) {
                            abort.store(true, Ordering::Relaxed);
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                })
            });
            let options = crate::job::RunOptions {
                restore: (attempt > 0).then(|| a.restore_step.unwrap_or(u64::MAX)),
                gpu,
            };
            let result = crate::job::run_with(&spec, mesh, options, |ev| {
                let mut s = status(&job_id, attempt, pb::JobState::Running);
                match ev {
                    crate::job::RunEvent::Started { step, .. } => s.started_step = Some(step),
                    crate::job::RunEvent::Step(m) => {
                        metrics.step(&job_id, m);
                        s.step = Some(pb::StepMetrics {
                            step: m.step,
                            loss: m.loss,
                            main_loss: m.main_loss,
                            tokens_per_s: m.tokens as f64 / m.seconds.max(1e-9),
                            max_vio: m.max_vio.clone(),
                            seconds: m.seconds,
                            bubble_s: m.bubble_s,
                            expert_loads: if first {
                                m.expert_loads
                                    .iter()
                                    .map(|l| pb::ExpertLoads {
                                        tokens: l.iter().map(|&n| n as u64).collect(),
                                    })
                                    .collect()
                            } else {
                                Vec::new()
                            },
                        });
                        s.busy_s = m.busy_s;
                    }
                    crate::job::RunEvent::Checkpoint(w) if w.committed => {
                        metrics.checkpoint_written(&job_id);
                        s.checkpoint_step = w.step;
                    }
                    crate::job::RunEvent::Checkpoint(_) => {
                        metrics.checkpoint_written(&job_id);
                        return !stop.load(Ordering::Relaxed);
                    }
                    crate::job::RunEvent::CheckpointStall { stall_s, .. } => {
                        metrics.checkpoint_stall(&job_id, stall_s);
                        return !stop.load(Ordering::Relaxed);
                    }
                    crate::job::RunEvent::CheckpointFailed { step, error } => {
                        metrics.checkpoint_failed(&job_id);
                        s.checkpoint_error = format!("checkpoint of step {step}: {error}");
                    }
                }
                report(s) && !stop.load(Ordering::Relaxed)
            });
            ended.store(true, Ordering::Relaxed);
            if let Some(w) = watcher {
                let _ = w.join();
            }
            match result {
                Ok(crate::job::RunEnd::Stopped(_)) => {}
                Ok(crate::job::RunEnd::Finished(_)) => {
                    report(status(&job_id, attempt, pb::JobState::Succeeded));
                }
                // A revoked job's own failure (its waits were cut short) is not news.
                Err(_) if stop.load(Ordering::Relaxed) => {}
                Err(e) => {
                    metrics.job_failed(&job_id, e.is_retryable());
                    failed(e.to_string(), e.is_retryable());
                }
            }
        });
    match spawned {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::error!(error = %e, "cannot start a job thread");
            None
        }
    }
}

/// A job attempt on this node: its revocation flag and thread.
struct Running {
    attempt: u32,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Final statuses kept for re-sending after a reattach (the oldest go first beyond this).
const KEPT_FINALS: usize = 16;

/// An open session with a coordinator.
struct Session {
    url: String,
    out: mpsc::Sender<pb::AgentMessage>,
    inbound: tonic::Streaming<pb::CoordinatorMessage>,
    registered: pb::Registered,
}

/// How a session ended.
enum End {
    Shutdown,
    /// The stream broke (the coordinator died, or the network): the jobs run on.
    Lost(String),
    /// The coordinator ended the session (ABORTED): it recovers the jobs elsewhere.
    Fenced(String),
}

/// What the agent keeps across sessions: its jobs, and the outcomes it reported.
struct Agent {
    cfg: AgentConfig,
    acceptor: Option<crate::comm::tcp::Acceptor>,
    data_addr: String,
    /// Job threads report here; the current session forwards.
    status_tx: mpsc::Sender<pb::AgentMessage>,
    status_rx: mpsc::Receiver<pb::AgentMessage>,
    jobs: BTreeMap<String, Running>,
    /// The last final status (SUCCEEDED or FAILED) of each ended job, oldest first: sent again
    /// after a reattach, since the stream that carried it may have broken first.
    finals: Vec<pb::AssignmentStatus>,
    /// Statuses reported while no session was open, to send once one is.
    pending: std::collections::VecDeque<pb::AgentMessage>,
    /// The index in `cfg.coordinators` of the last one that answered.
    current: usize,
}

impl Agent {
    fn register(&self) -> pb::AgentMessage {
        let mut running: Vec<pb::JobAttempt> = self
            .jobs
            .iter()
            .filter(|(_, r)| r.thread.as_ref().is_some_and(|h| !h.is_finished()))
            .map(|(id, r)| pb::JobAttempt {
                job_id: id.clone(),
                attempt: r.attempt,
            })
            .collect();
        for f in &self.finals {
            if !running.iter().any(|r| r.job_id == f.job_id) {
                running.push(pb::JobAttempt {
                    job_id: f.job_id.clone(),
                    attempt: f.attempt,
                });
            }
        }
        pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Register(pb::Register {
                node: self.cfg.node.clone(),
                devices: devices(&self.cfg.devices),
                nvlink_domain: self.cfg.node.clone(),
                ib_rail: 0,
                spare: self.cfg.spare,
                data_addr: self.data_addr.clone(),
                running,
            })),
        }
    }

    /// Attaches to the first coordinator that answers, starting with the last one that did.
    async fn attach_any(&mut self) -> Result<Session> {
        // What the jobs reported since the last session broke: a job that finished meanwhile
        // is named in the registration with its outcome, as one that still runs is.
        while let Ok(m) = self.status_rx.try_recv() {
            if let Some(pb::agent_message::Msg::Status(s)) = &m.msg {
                self.keep_final(s);
            }
            self.pending.push_back(m);
        }
        let n = self.cfg.coordinators.len();
        let mut last = None;
        for i in 0..n {
            let k = (self.current + i) % n;
            match self.attach(k).await {
                Ok(s) => {
                    self.current = k;
                    return Ok(s);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last
            .unwrap_or_else(|| WorkerError::invalid("--coordinator", "no coordinator URL given")))
    }

    async fn attach(&self, k: usize) -> Result<Session> {
        let url = &self.cfg.coordinators[k];
        let channel = endpoint(
            url,
            self.cfg.tls_ca.as_deref(),
            self.cfg.tls_identity.as_ref(),
        )?
        .connect_timeout(Duration::from_secs(2))
        // A coordinator gone silent (its host lost, the network cut) shows as an error of the
        // session within about three seconds, as a dead one's closed connection does.
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(|e| transport(url, error_chain(&e)))?;
        let mut client = AgentServiceClient::new(channel);
        let (out, rx) = mpsc::channel::<pb::AgentMessage>(256);
        out.send(self.register())
            .await
            .map_err(|e| transport("register", e))?;
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(token) = &self.cfg.token {
            let v = shoal_proto::transport::bearer(token).map_err(|e| transport("token", e))?;
            req.metadata_mut().insert("authorization", v);
        }
        let mut inbound = client.attach(req).await.map_err(attach_err)?.into_inner();
        let first = inbound.message().await.map_err(attach_err)?;
        let Some(pb::CoordinatorMessage {
            msg: Some(pb::coordinator_message::Msg::Registered(registered)),
        }) = first
        else {
            return Err(transport(
                "attach",
                "the coordinator did not answer Register",
            ));
        };
        Ok(Session {
            url: url.clone(),
            out,
            inbound,
            registered,
        })
    }

    fn keep_final(&mut self, s: &pb::AssignmentStatus) {
        let fin =
            s.state == pb::JobState::Succeeded as i32 || s.state == pb::JobState::Failed as i32;
        if !fin {
            return;
        }
        self.finals.retain(|f| f.job_id != s.job_id);
        self.finals.push(s.clone());
        if self.finals.len() > KEPT_FINALS {
            self.finals.remove(0);
        }
    }

    /// Serves one session until it breaks or `shutdown` resolves.
    async fn serve(
        &mut self,
        mut session: Session,
        shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> End {
        let reg = session.registered;
        tracing::info!(node = %self.cfg.node, coordinator = %session.url, epoch = reg.epoch, "registered with the coordinator");
        self.cfg.metrics.session_opened();
        // Outcomes the last session may not have delivered, then what came in between.
        let backlog: Vec<pb::AgentMessage> = self
            .finals
            .iter()
            .cloned()
            .map(message)
            .chain(self.pending.drain(..))
            .collect();
        for m in backlog {
            if session.out.send(m).await.is_err() {
                return End::Lost("the stream closed".into());
            }
        }
        let beat = Duration::from_millis(u64::from(reg.heartbeat_interval_ms.max(50)));
        let mut ticker = tokio::time::interval(beat);
        loop {
            tokio::select! {
                () = shutdown.as_mut() => return End::Shutdown,
                _ = ticker.tick() => {
                    // Forget jobs whose threads have ended.
                    self.jobs.retain(|_, r| r.thread.as_ref().is_some_and(|h| !h.is_finished()));
                    let hb = pb::AgentMessage {
                        msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
                            epoch: reg.epoch,
                            job_steps: Default::default(),
                        })),
                    };
                    if session.out.send(hb).await.is_err() {
                        return End::Lost("the stream closed".into());
                    }
                }
                Some(m) = self.status_rx.recv() => {
                    if let Some(pb::agent_message::Msg::Status(s)) = &m.msg {
                        self.keep_final(s);
                    }
                    if session.out.send(m).await.is_err() {
                        return End::Lost("the stream closed".into());
                    }
                }
                msg = session.inbound.message() => match msg {
                    Ok(Some(pb::CoordinatorMessage { msg: Some(m) })) => self.order(m),
                    Ok(Some(pb::CoordinatorMessage { msg: None })) => {}
                    Ok(None) => return End::Lost("the coordinator closed the stream".into()),
                    Err(s) if s.code() == tonic::Code::Aborted => {
                        return End::Fenced(s.message().to_string());
                    }
                    Err(s) => return End::Lost(s.message().to_string()),
                },
            }
        }
    }

    /// An assignment or a revocation.
    fn order(&mut self, m: pb::coordinator_message::Msg) {
        match m {
            pb::coordinator_message::Msg::Assign(a) => {
                tracing::info!(job = %a.job_id, attempt = a.attempt, "assigned");
                self.finals.retain(|f| f.job_id != a.job_id);
                let stop = Arc::new(AtomicBool::new(false));
                // An earlier attempt still here is stopped, and the new one waits for it.
                let previous = self.jobs.remove(&a.job_id).and_then(|old| {
                    old.stop.store(true, Ordering::Relaxed);
                    old.thread
                });
                let (id, attempt) = (a.job_id.clone(), a.attempt);
                // The GPU of this node's (first) rank, if it is one.
                let gpu = a
                    .ranks
                    .first()
                    .and_then(|r| self.cfg.devices.get(r.device as usize))
                    .filter(|d| d.kind == crate::devices::DeviceKind::Cuda)
                    .and_then(|d| d.ordinal);
                let thread = start_job(
                    a,
                    gpu,
                    self.cfg.node.clone(),
                    self.cfg.metrics.clone(),
                    self.acceptor.clone(),
                    self.status_tx.clone(),
                    Arc::clone(&stop),
                    previous,
                );
                self.jobs.insert(
                    id,
                    Running {
                        attempt,
                        stop,
                        thread,
                    },
                );
            }
            pb::coordinator_message::Msg::Revoke(r) => {
                tracing::info!(job = %r.job_id, reason = %r.reason, "revoked");
                self.finals.retain(|f| f.job_id != r.job_id);
                if let Some(j) = self.jobs.get(&r.job_id) {
                    j.stop.store(true, Ordering::Relaxed);
                }
            }
            pb::coordinator_message::Msg::Registered(_) => {}
        }
    }

    fn stop_all(&self) {
        for j in self.jobs.values() {
            j.stop.store(true, Ordering::Relaxed);
        }
    }
}

/// Attaches to a coordinator and serves it until `shutdown` resolves. The first attach must
/// succeed (on any of `cfg.coordinators`). When the stream breaks later (the coordinator died,
/// a standby is taking over, or the coordinator closed the session) the node's jobs keep running
/// while the agent attaches again, to whichever coordinator answers, naming them; after
/// `cfg.reconnect` without one, it stops them and returns the error.
pub async fn run(cfg: AgentConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    crate::fault::arm(&cfg.node);
    if cfg.coordinators.is_empty() {
        return Err(WorkerError::invalid(
            "--coordinator",
            "name at least one coordinator URL",
        ));
    }
    // The data-plane listener, shared by the meshes of every job this node runs.
    let acceptor = match cfg.data_addr {
        Some(addr) => Some(crate::comm::tcp::Acceptor::start(
            std::net::TcpListener::bind(addr).map_err(|e| {
                WorkerError::invalid("data_addr", format!("cannot listen on {addr}: {e}"))
            })?,
        )?),
        None => None,
    };
    let data_addr = acceptor
        .as_ref()
        .map(|a| a.local_addr().to_string())
        .unwrap_or_default();
    let (status_tx, status_rx) = mpsc::channel(256);
    let mut agent = Agent {
        cfg,
        acceptor,
        data_addr,
        status_tx,
        status_rx,
        jobs: BTreeMap::new(),
        finals: Vec::new(),
        pending: std::collections::VecDeque::new(),
        current: 0,
    };
    tokio::pin!(shutdown);
    let mut session = agent.attach_any().await?;
    let result = 'sessions: loop {
        let why = match agent.serve(session, &mut shutdown).await {
            End::Shutdown => break Ok(()),
            End::Lost(why) => why,
            End::Fenced(why) => {
                tracing::warn!(node = %agent.cfg.node, reason = %why, "the coordinator ended the session; stopping its jobs");
                agent.stop_all();
                why
            }
        };
        tracing::warn!(node = %agent.cfg.node, reason = %why, jobs = agent.jobs.len(), "session lost; attaching again");
        let lost = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(100);
        session = loop {
            let attached = tokio::select! {
                () = shutdown.as_mut() => break 'sessions Ok(()),
                s = agent.attach_any() => s,
            };
            match attached {
                Ok(s) => break s,
                Err(e) if lost.elapsed() >= agent.cfg.reconnect => {
                    break 'sessions Err(WorkerError::invalid(
                        "coordinator",
                        format!(
                            "{why}; no coordinator answered for {} ms: {e}",
                            agent.cfg.reconnect.as_millis()
                        ),
                    ));
                }
                Err(e) => tracing::debug!(error = %e, "attaching again"),
            }
            tokio::select! {
                () = shutdown.as_mut() => break 'sessions Ok(()),
                () = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(Duration::from_millis(500));
        };
    };
    agent.stop_all();
    result
}
