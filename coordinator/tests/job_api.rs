//! The job API over real gRPC on loopback, against the embedded store.

use shoal_coordinator::actor::{Control, NO_NODES};
use shoal_coordinator::grpc;
use shoal_coordinator::store::EmbeddedStore;
use shoal_proto::v1 as pb;
use shoal_proto::v1::job_service_client::JobServiceClient;
use tokio::sync::oneshot;
use tonic::Code;

struct Server {
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
    actor: tokio::task::JoinHandle<()>,
}

async fn start(path: &std::path::Path) -> Server {
    let store = EmbeddedStore::open(path).expect("store");
    let (jobs, actor) = Control::start(store).await.expect("jobs");
    let listener = grpc::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        grpc::serve(listener, jobs, async {
            let _ = stopped.await;
        })
        .await
        .expect("serve");
    });
    Server {
        addr,
        stop: Some(stop),
        done,
        actor,
    }
}

impl Server {
    async fn client(&self) -> JobServiceClient<tonic::transport::Channel> {
        JobServiceClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect")
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.done.await.expect("server task");
        // The API held the last handle: the actor ends and releases the store.
        self.actor.await.expect("jobs actor");
    }
}

fn spec(name: &str) -> pb::JobSpec {
    pb::JobSpec {
        name: name.into(),
        model: "tiny".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_submitted_watched_cancelled_and_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("coordinator.redb");
    let server = start(&path).await;
    let mut c = server.client().await;

    // Invalid specs: INVALID_ARGUMENT with the field path.
    let mut bad = spec("bad");
    bad.parallelism = Some(pb::Parallelism {
        pp: 1,
        dp: 4,
        ep: 3,
        schedule: "1f1b".into(),
        micro_batches: 2,
    });
    bad.training = Some(pb::Training {
        steps: 10,
        seq_len: 256,
        batch: 8,
        lr: 1e-3,
        min_lr_ratio: 0.1,
        ..Default::default()
    });
    let e = c
        .submit_job(pb::SubmitJobRequest { spec: Some(bad) })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("spec.parallelism.ep:"),
        "{}",
        e.message()
    );
    let e = c
        .submit_job(pb::SubmitJobRequest {
            spec: Some(pb::JobSpec {
                model: "no-such-model".into(),
                ..spec("x")
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("spec.model:"), "{}", e.message());
    let e = c
        .submit_job(pb::SubmitJobRequest { spec: None })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // A valid job waits for devices.
    let id = c
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec("first")),
        })
        .await
        .expect("submit")
        .into_inner()
        .job_id;
    let job = c
        .get_job(pb::GetJobRequest { job_id: id.clone() })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(job.state, pb::JobState::Pending as i32);
    assert_eq!(job.reason, NO_NODES);
    assert_eq!(job.spec.expect("spec").name, "first");

    // Watch, then cancel: the watcher sees PENDING, then CANCELLED, then the stream ends.
    let mut events = c
        .watch_job(pb::WatchJobRequest { job_id: id.clone() })
        .await
        .expect("watch")
        .into_inner();
    let first = events.message().await.expect("event").expect("first event");
    let state = |ev: &pb::JobEvent| match &ev.event {
        Some(pb::job_event::Event::State(s)) => s.state,
        other => panic!("unexpected event {other:?}"),
    };
    assert_eq!(state(&first), pb::JobState::Pending as i32);
    let cancelled = c
        .cancel_job(pb::CancelJobRequest { job_id: id.clone() })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(cancelled.state, pb::JobState::Cancelled as i32);
    let next = events
        .message()
        .await
        .expect("event")
        .expect("second event");
    assert_eq!(state(&next), pb::JobState::Cancelled as i32);
    assert!(
        events.message().await.expect("end").is_none(),
        "stream ends"
    );
    // Cancelling again leaves it as it is.
    let again = c
        .cancel_job(pb::CancelJobRequest { job_id: id.clone() })
        .await
        .expect("cancel");
    assert_eq!(again.into_inner().state, pb::JobState::Cancelled as i32);

    let second = c
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec("second")),
        })
        .await
        .expect("submit")
        .into_inner()
        .job_id;
    let e = c
        .get_job(pb::GetJobRequest {
            job_id: "job-999".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    server.stop().await;

    // A coordinator restarted on the same store finds both jobs as they were.
    let server = start(&path).await;
    let mut c = server.client().await;
    let all = c
        .list_jobs(pb::ListJobsRequest { states: vec![] })
        .await
        .expect("list")
        .into_inner()
        .jobs;
    let seen: Vec<(String, i32)> = all.iter().map(|j| (j.id.clone(), j.state)).collect();
    assert_eq!(
        seen,
        vec![
            (id.clone(), pb::JobState::Cancelled as i32),
            (second.clone(), pb::JobState::Pending as i32)
        ]
    );
    let pending = c
        .list_jobs(pb::ListJobsRequest {
            states: vec![pb::JobState::Pending as i32],
        })
        .await
        .expect("list")
        .into_inner()
        .jobs;
    assert_eq!(pending.len(), 1);
    // New ids continue after the old ones.
    let third = c
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec("third")),
        })
        .await
        .expect("submit")
        .into_inner()
        .job_id;
    assert!(third != id && third != second, "{third}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(&dir.path().join("c.redb")).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "shoal.v1.JobService".into(),
        })
        .await
        .expect("health")
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut refl = ServerReflectionClient::new(channel);
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection")
        .into_inner();
    let msg = resp
        .message()
        .await
        .expect("message")
        .expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected reflection answer {msg:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "shoal.v1.JobService",
        "shoal.v1.ClusterService",
        "shoal.v1.AgentService",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_token_guards_mutating_calls_and_registration() {
    use shoal_proto::v1::agent_service_client::AgentServiceClient;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(&dir.path().join("t.redb")).expect("store");
    let (control, _actor) = Control::start(store).await.expect("control");
    let listener = grpc::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(grpc::serve_with(
        listener,
        control,
        Some("s3cret".into()),
        None,
        std::future::pending(),
    ));
    let mut c = JobServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let with = |token: &str| {
        let mut r = tonic::Request::new(pb::SubmitJobRequest {
            spec: Some(spec("guarded")),
        });
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
        r
    };
    let e = c
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec("guarded")),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(
        c.submit_job(with("wrong")).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let id = c
        .submit_job(with("s3cret"))
        .await
        .expect("submit")
        .into_inner()
        .job_id;
    // Reads need no token.
    c.get_job(pb::GetJobRequest { job_id: id })
        .await
        .expect("get");
    // Registration does.
    let mut agent = AgentServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let reg = pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Register(pb::Register {
            node: "n".into(),
            devices: vec![pb::Device::default()],
            ..Default::default()
        })),
    };
    let e = agent
        .attach(tokio_stream::iter(vec![reg]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_and_names_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(&dir.path().join("big.redb")).await;
    let mut c = server.client().await;

    // Over the decoding limit: refused by the transport before any handler runs.
    let huge = "a".repeat(2 * grpc::MAX_REQUEST_BYTES);
    let e = c
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec(&huge)),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(
        e.message().contains("message length too large"),
        "{}",
        e.message()
    );

    // Under the limit but far over the name's: INVALID_ARGUMENT naming the field, with a short
    // message (the name is not echoed back whole).
    let long = "a".repeat(grpc::MAX_REQUEST_BYTES / 2);
    let e = c
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec(&long)),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with("spec.name:"), "{}", e.message());
    assert!(e.message().len() < 300, "{} bytes", e.message().len());
    // Any other long value echoed in an error is cut to a header's worth.
    let e = c
        .submit_job(pb::SubmitJobRequest {
            spec: Some(pb::JobSpec {
                model: "m".repeat(grpc::MAX_REQUEST_BYTES / 2),
                ..spec("long-model")
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with("spec.model:"), "{}", e.message());
    assert!(
        e.message().len() <= shoal_coordinator::error::MAX_STATUS_MESSAGE,
        "{} bytes",
        e.message().len()
    );

    // The coordinator still answers on the same connection, and stored nothing.
    let jobs = c
        .list_jobs(pb::ListJobsRequest { states: vec![] })
        .await
        .expect("list")
        .into_inner()
        .jobs;
    assert!(jobs.is_empty(), "{jobs:?}");
    let id = c
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec("small")),
        })
        .await
        .expect("a normal job after the refusals")
        .into_inner()
        .job_id;
    assert_eq!(
        c.get_job(pb::GetJobRequest { job_id: id })
            .await
            .expect("get")
            .into_inner()
            .spec
            .map(|s| s.name)
            .as_deref(),
        Some("small")
    );
    drop(c);
    server.stop().await;
}
