//! The gRPC surface: thin handlers that convert at the edge, ask the owning actor, and map errors
//! in one place ([`CoordinatorError`]'s `From` for `tonic::Status`). Standard health checking and
//! server reflection are served beside the API, in plaintext or over TLS ([`Tls`]).

use std::net::SocketAddr;
use std::pin::Pin;

use shoal_proto::transport::{error_chain, pem_has};
use shoal_proto::v1 as pb;
use shoal_proto::v1::job_service_server::{JobService, JobServiceServer};
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::actor::{Control, NodeView, Registration};
use crate::jobs::{JobEvent, JobRecord, JobState};
use crate::nodes::NodeState;
use crate::{CoordinatorError, Result};
use shoal_proto::convert;
use shoal_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use shoal_proto::v1::cluster_service_server::{ClusterService, ClusterServiceServer};

/// Largest request the API accepts (a job spec is a few hundred bytes).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

fn state_to_wire(s: JobState) -> pb::JobState {
    match s {
        JobState::Pending => pb::JobState::Pending,
        JobState::Scheduling => pb::JobState::Scheduling,
        JobState::Running => pb::JobState::Running,
        JobState::Recovering => pb::JobState::Recovering,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

fn job_to_wire(r: &JobRecord) -> Result<pb::Job> {
    Ok(pb::Job {
        id: r.id.clone(),
        spec: Some(convert::job_spec_to_wire(&r.spec)?),
        state: state_to_wire(r.state) as i32,
        reason: r.reason.clone(),
        step: r.step,
        loss: f64::NAN,
        placement: r
            .placement
            .iter()
            .map(|p| pb::RankPlacement {
                pp_rank: p.pp_rank as u32,
                dp_rank: p.dp_rank as u32,
                node: p.node.clone(),
                device: p.device as u32,
            })
            .collect(),
        submitted_unix_ms: r.submitted_unix_ms(),
        updated_unix_ms: r.updated_unix_ms(),
        checkpoint_step: r.checkpoint_step,
        recoveries: r
            .recoveries
            .iter()
            .map(|x| pb::Recovery {
                attempt: x.attempt,
                cause: x.cause.clone(),
                detected_unix_ms: x.detected_unix_ms,
                last_heard_unix_ms: x.last_heard_unix_ms,
                resumed_unix_ms: x.resumed_unix_ms,
                failed_step: x.failed_step,
                restored_step: x.restored_step,
                steps_redone: x.steps_redone(),
                dp_before: x.dp_before,
                dp_after: x.dp_after,
                replan_us: x.replan_us,
            })
            .collect(),
    })
}

fn state_event(job_id: &str, state: JobState, reason: &str, unix_ms: u64) -> pb::JobEvent {
    pb::JobEvent {
        job_id: job_id.to_string(),
        unix_ms,
        event: Some(pb::job_event::Event::State(pb::StateChange {
            state: state_to_wire(state) as i32,
            reason: reason.to_string(),
        })),
    }
}

/// The job, cluster and agent services over the control actor.
#[derive(Clone, Debug)]
pub struct Api {
    jobs: Control,
    token: Option<std::sync::Arc<str>>,
}

impl Api {
    /// Serves `control`; with a `token`, mutating calls and node registration need
    /// `authorization: Bearer <token>`.
    pub fn new(control: Control, token: Option<String>) -> Self {
        Self {
            jobs: control,
            token: token.map(Into::into),
        }
    }

    /// Refuses a mutating call without the bearer token (when one is configured).
    fn authorize(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        let Some(want) = &self.token else {
            return Ok(());
        };
        let got = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Compare in time independent of where the strings differ.
        let same = got.len() == want.len()
            && got
                .bytes()
                .zip(want.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if same {
            Ok(())
        } else {
            Err(Status::unauthenticated(
                "this call needs authorization: Bearer <token> (the coordinator's --token)",
            ))
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for Api {
    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        self.authorize(req.metadata())?;
        // The job's trace: this call's span, a child of the client's when it sent one.
        let span = tracing::info_span!("submit_job", job = tracing::field::Empty);
        shoal_proto::trace_context::follow(
            &span,
            &shoal_proto::trace_context::remote(req.metadata()),
        );
        let traceparent = shoal_proto::trace_context::traceparent(&span);
        let spec = req
            .into_inner()
            .spec
            .ok_or_else(|| CoordinatorError::invalid("spec", "is required"))?;
        let spec = convert::job_spec(spec).map_err(CoordinatorError::from)?;
        let job_id = self
            .jobs
            .submit_traced(spec, traceparent)
            .instrument(span.clone())
            .await?;
        span.record("job", job_id.as_str());
        Ok(Response::new(pb::SubmitJobResponse { job_id }))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let rec = self.jobs.get(&req.into_inner().job_id).await?;
        Ok(Response::new(job_to_wire(&rec)?))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let states = req.into_inner().states;
        let jobs = self
            .jobs
            .list()
            .await?
            .iter()
            .filter(|r| states.is_empty() || states.contains(&(state_to_wire(r.state) as i32)))
            .map(job_to_wire)
            .collect::<Result<Vec<_>>>()?;
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.authorize(req.metadata())?;
        let rec = self.jobs.cancel(&req.into_inner().job_id).await?;
        Ok(Response::new(job_to_wire(&rec)?))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(
        &self,
        req: Request<pb::WatchJobRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let id = req.into_inner().job_id;
        let (rec, mut rx) = self.jobs.watch(&id).await?;
        let (tx, out) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let first = state_event(&rec.id, rec.state, &rec.reason, rec.updated_unix_ms());
            if tx.send(Ok(first)).await.is_err() || rec.state.is_final() {
                return;
            }
            loop {
                match rx.recv().await {
                    Ok(JobEvent::State(t)) => {
                        let ev = state_event(&rec.id, t.state, &t.reason, t.unix_ms);
                        if tx.send(Ok(ev)).await.is_err() || t.state.is_final() {
                            return;
                        }
                    }
                    Ok(ev @ (JobEvent::Step(_) | JobEvent::Error(_) | JobEvent::Straggler(_))) => {
                        let event = match ev {
                            JobEvent::Step(m) => pb::job_event::Event::Step(m),
                            JobEvent::Error(e) => pb::job_event::Event::Error(e),
                            JobEvent::Straggler(x) => {
                                pb::job_event::Event::Straggler(pb::Straggler {
                                    node: x.node,
                                    step: x.step,
                                    busy_s: x.busy_s,
                                    peers_busy_s: x.peers_busy_s,
                                    steps: x.steps,
                                })
                            }
                            JobEvent::State(_) => continue,
                        };
                        let ev = pb::JobEvent {
                            job_id: rec.id.clone(),
                            unix_ms: crate::jobs::now_ms(),
                            event: Some(event),
                        };
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let msg = format!("watcher fell {n} events behind; watch again");
                        let _ = tx.send(Err(Status::data_loss(msg))).await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }
}

fn node_state(s: NodeState) -> pb::NodeState {
    match s {
        NodeState::Healthy => pb::NodeState::Healthy,
        NodeState::Cordoned => pb::NodeState::Cordoned,
        NodeState::Draining => pb::NodeState::Draining,
        NodeState::Failed => pb::NodeState::Failed,
        NodeState::Spare => pb::NodeState::Spare,
    }
}

fn node_to_wire(v: &NodeView) -> pb::Node {
    pb::Node {
        name: v.record.name.clone(),
        state: node_state(v.record.state) as i32,
        devices: (0..v.record.devices)
            .map(|i| {
                let job = v.busy.get(&i).cloned().unwrap_or_default();
                match v.record.models.get(i) {
                    Some(m) => m.to_wire(i as u32, job),
                    None => pb::Device {
                        index: i as u32,
                        kind: pb::DeviceKind::Cpu as i32,
                        name: "cpu".into(),
                        job_id: job,
                        ..Default::default()
                    },
                }
            })
            .collect(),
        nvlink_domain: v.record.nvlink_domain.clone(),
        ib_rail: v.record.ib_rail,
        epoch: v.record.epoch,
        last_heartbeat_unix_ms: v.last_heartbeat_ms,
    }
}

#[tonic::async_trait]
impl ClusterService for Api {
    async fn list_nodes(
        &self,
        _req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self.jobs.nodes().await?.iter().map(node_to_wire).collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn cordon_node(
        &self,
        req: Request<pb::NodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let v = self.jobs.cordon(&req.into_inner().name, false).await?;
        Ok(Response::new(node_to_wire(&v)))
    }

    async fn drain_node(
        &self,
        req: Request<pb::NodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let v = self.jobs.cordon(&req.into_inner().name, true).await?;
        Ok(Response::new(node_to_wire(&v)))
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Api {
    type AttachStream = SessionStream;

    async fn attach(
        &self,
        req: Request<tonic::Streaming<pb::AgentMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        self.authorize(req.metadata())?;
        let mut inbound = req.into_inner();
        let first = inbound.message().await?;
        let Some(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Register(reg)),
        }) = first
        else {
            return Err(
                CoordinatorError::invalid("attach", "the first message must be Register").into(),
            );
        };
        let node = reg.node.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let epoch = self
            .jobs
            .register(
                Registration {
                    node: reg.node,
                    devices: reg.devices.len(),
                    models: reg
                        .devices
                        .iter()
                        .map(crate::nodes::DeviceModel::from_wire)
                        .collect(),
                    nvlink_domain: reg.nvlink_domain,
                    ib_rail: reg.ib_rail,
                    spare: reg.spare,
                    data_addr: reg.data_addr,
                    running: reg
                        .running
                        .into_iter()
                        .map(|r| (r.job_id, r.attempt))
                        .collect(),
                },
                tx,
            )
            .await?;
        let control = self.jobs.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(pb::AgentMessage { msg: Some(m) })) => match m {
                        pb::agent_message::Msg::Heartbeat(_) => {
                            control.heartbeat(&node, epoch).await
                        }
                        pb::agent_message::Msg::Status(s) => control.status(&node, epoch, s).await,
                        pb::agent_message::Msg::Register(_) => {
                            tracing::warn!(node = %node, "a second Register on one session is ignored");
                        }
                    },
                    Ok(Some(pb::AgentMessage { msg: None })) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            control.disconnected(&node, epoch).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// TLS of the gRPC server (all PEM): its certificate chain and private key, and for mutual TLS
/// the CA that clients' certificates must chain to.
#[derive(Clone)]
pub struct Tls {
    /// The server's certificate chain, leaf first.
    pub cert_pem: Vec<u8>,
    /// The server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: Vec<u8>,
    /// With a CA, every client must present a certificate it signed (mutual TLS).
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for Tls {
    // The private key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &format_args!("<redacted>"))
            .field("mutual", &self.client_ca_pem.is_some())
            .finish()
    }
}

impl Tls {
    fn config(&self) -> tonic::transport::ServerTlsConfig {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let cfg = ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .timeout(std::time::Duration::from_secs(10));
        match &self.client_ca_pem {
            Some(ca) => cfg.client_ca_root(Certificate::from_pem(ca)),
            None => cfg,
        }
    }

    /// Checks that the certificate, key and client CA parse and that the key belongs to the
    /// certificate, so a bad configuration is refused before the server listens.
    pub fn check(&self) -> Result<()> {
        if !pem_has(&self.cert_pem, "CERTIFICATE") {
            return Err(CoordinatorError::invalid(
                "tls certificate",
                "no PEM CERTIFICATE block",
            ));
        }
        if self
            .client_ca_pem
            .as_ref()
            .is_some_and(|ca| !pem_has(ca, "CERTIFICATE"))
        {
            return Err(CoordinatorError::invalid(
                "tls client ca",
                "no PEM CERTIFICATE block",
            ));
        }
        self.builder().map(|_| ())
    }

    fn builder(&self) -> Result<tonic::transport::Server> {
        tonic::transport::Server::builder()
            .tls_config(self.config())
            .map_err(|e| CoordinatorError::invalid("tls", error_chain(&e)))
    }
}

/// Serves the API on `listener` until `shutdown` resolves (plaintext, no bearer token).
pub async fn serve(
    listener: TcpListener,
    jobs: Control,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    serve_with(listener, jobs, None, None, shutdown).await
}

/// Serves the API on `listener` until `shutdown` resolves; with `token`, mutating calls and node
/// registration need it as a bearer token; with `tls`, every connection is TLS (and with its
/// client CA, mutual TLS).
pub async fn serve_with(
    listener: TcpListener,
    jobs: Control,
    token: Option<String>,
    tls: Option<Tls>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let mut server = match &tls {
        Some(tls) => {
            tls.check()?;
            tls.builder()?
        }
        None => tonic::transport::Server::builder(),
    };
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<JobServiceServer<Api>>().await;
    health_reporter
        .set_serving::<ClusterServiceServer<Api>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(shoal_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| CoordinatorError::Store(format!("reflection: {e}")))?;
    let api = Api::new(jobs, token);
    let job_api = JobServiceServer::new(api.clone()).max_decoding_message_size(MAX_REQUEST_BYTES);
    let cluster_api =
        ClusterServiceServer::new(api.clone()).max_decoding_message_size(MAX_REQUEST_BYTES);
    let agent_api = AgentServiceServer::new(api).max_decoding_message_size(MAX_REQUEST_BYTES);
    server
        .add_service(health)
        .add_service(reflection)
        .add_service(job_api)
        .add_service(cluster_api)
        .add_service(agent_api)
        // TCP_NODELAY: without it a small reply waits for the client's delayed ACK (Nagle),
        // which held synchronous round trips to tens per second.
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
        .map_err(|e| CoordinatorError::Store(format!("grpc server: {}", error_chain(&e))))
}

/// Binds `addr` (loopback by default in the CLI).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| CoordinatorError::invalid("listen address", format!("{addr}: {e}")))
}
