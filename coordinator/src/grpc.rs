//! The gRPC surface: thin handlers that convert at the edge, ask the owning actor, and map errors
//! in one place ([`CoordinatorError`]'s `From` for `tonic::Status`). Standard health checking and
//! server reflection are served beside the API.

use std::net::SocketAddr;
use std::pin::Pin;

use shoal_proto::v1 as pb;
use shoal_proto::v1::job_service_server::{JobService, JobServiceServer};
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use crate::jobs::{JobEvent, JobRecord, JobState, Jobs};
use crate::{CoordinatorError, Result};
use shoal_proto::convert;

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
        placement: Vec::new(),
        submitted_unix_ms: r.submitted_unix_ms(),
        updated_unix_ms: r.updated_unix_ms(),
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

/// The job service over the jobs actor.
#[derive(Clone, Debug)]
pub struct JobApi {
    jobs: Jobs,
}

impl JobApi {
    /// Serves `jobs`.
    pub fn new(jobs: Jobs) -> Self {
        Self { jobs }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for JobApi {
    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let spec = req
            .into_inner()
            .spec
            .ok_or_else(|| CoordinatorError::invalid("spec", "is required"))?;
        let spec = convert::job_spec(spec).map_err(CoordinatorError::from)?;
        let job_id = self.jobs.submit(spec).await?;
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

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    jobs: Jobs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<JobServiceServer<JobApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(shoal_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| CoordinatorError::Store(format!("reflection: {e}")))?;
    let api = JobServiceServer::new(JobApi::new(jobs)).max_decoding_message_size(MAX_REQUEST_BYTES);
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(api)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| CoordinatorError::Store(format!("grpc server: {e}")))
}

/// Binds `addr` (loopback by default in the CLI).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| CoordinatorError::invalid("listen address", format!("{addr}: {e}")))
}
