//! The scheduler and membership in process, with fake node sessions (channels in place of agent
//! streams) and paused tokio time: gang scheduling, priority order, fencing by epoch, cordoning,
//! failures.

use shoal_coordinator::actor::{Control, Registration, Session};
use shoal_coordinator::jobs::JobState;
use shoal_coordinator::store::EmbeddedStore;
use shoal_proto::v1 as pb;
use shoal_spec::job::JobSpec;
use tokio::sync::mpsc;

type Inbox = mpsc::Receiver<Result<pb::CoordinatorMessage, tonic::Status>>;

async fn control(dir: &tempfile::TempDir) -> Control {
    let store = EmbeddedStore::open(&dir.path().join("s.redb")).expect("store");
    Control::start(store).await.expect("start").0
}

async fn node(c: &Control, name: &str, devices: usize) -> (Inbox, u64) {
    let (tx, mut rx): (Session, Inbox) = mpsc::channel(64);
    let epoch = c
        .register(
            Registration {
                node: name.into(),
                devices,
                nvlink_domain: name.into(),
                ib_rail: 0,
                spare: false,
            },
            tx,
        )
        .await
        .expect("register");
    // The first message of every session is Registered with the epoch.
    match rx.recv().await {
        Some(Ok(pb::CoordinatorMessage {
            msg: Some(pb::coordinator_message::Msg::Registered(r)),
        })) => assert_eq!(r.epoch, epoch),
        other => panic!("expected Registered, got {other:?}"),
    }
    (rx, epoch)
}

fn spec(name: &str, dp: usize, priority: i32) -> JobSpec {
    let mut s = JobSpec::from_toml(&format!("name = \"{name}\""), "test").expect("spec");
    s.parallelism.dp = dp;
    s.training.batch = 2 * dp;
    s.priority = priority;
    s
}

/// The next assignment a node received (its job id), or `None`. A round trip to the actor first
/// makes sure it has handled every earlier message (it handles them in order).
async fn assigned(c: &Control, rx: &mut Inbox) -> Option<String> {
    c.nodes().await.expect("barrier");
    match rx.try_recv() {
        Ok(Ok(pb::CoordinatorMessage {
            msg: Some(pb::coordinator_message::Msg::Assign(a)),
        })) => Some(a.job_id),
        Ok(other) => panic!("unexpected message {other:?}"),
        Err(_) => None,
    }
}

async fn state(c: &Control, id: &str) -> (JobState, String) {
    let r = c.get(id).await.expect("job");
    (r.state, r.reason)
}

fn status(id: &str, s: pb::JobState) -> pb::AssignmentStatus {
    pb::AssignmentStatus {
        job_id: id.into(),
        state: s as i32,
        reason: "boom".into(),
        step: None,
    }
}

#[tokio::test(start_paused = true)]
async fn gang_scheduling_waits_for_every_rank_and_follows_priority() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = control(&dir).await;
    let (mut n1, e1) = node(&c, "n1", 1).await;

    // A two-rank job cannot start on one device: it waits, and says why.
    let wide = c.submit(spec("wide", 2, 0)).await.expect("submit");
    let (s, reason) = state(&c, &wide).await;
    assert_eq!(s, JobState::Pending);
    assert!(
        reason.contains("not enough devices: needs 2, 1 free"),
        "{reason}"
    );
    // A later, smaller job of the same priority waits behind it (FIFO, no overtaking).
    let small = c.submit(spec("small", 1, 0)).await.expect("submit");
    let (s, reason) = state(&c, &small).await;
    assert_eq!(
        (s, reason.as_str()),
        (JobState::Pending, "queued behind job-1")
    );
    assert_eq!(assigned(&c, &mut n1).await, None);

    // A higher-priority job goes first.
    let urgent = c.submit(spec("urgent", 1, 5)).await.expect("submit");
    assert_eq!(state(&c, &urgent).await.0, JobState::Scheduling);
    assert_eq!(
        assigned(&c, &mut n1).await.as_deref(),
        Some(urgent.as_str())
    );

    // A second node: the urgent job holds n1, so the wide job still cannot be placed.
    let (mut n2, _) = node(&c, "n2", 1).await;
    assert_eq!(state(&c, &wide).await.0, JobState::Pending);
    assert_eq!(assigned(&c, &mut n2).await, None);

    // The urgent job runs and succeeds: both devices are free, the wide job takes both.
    c.status("n1", e1, status(&urgent, pb::JobState::Running))
        .await;
    c.status("n1", e1, status(&urgent, pb::JobState::Succeeded))
        .await;
    assert_eq!(state(&c, &urgent).await.0, JobState::Succeeded);
    assert_eq!(state(&c, &wide).await.0, JobState::Scheduling);
    assert_eq!(assigned(&c, &mut n1).await.as_deref(), Some(wide.as_str()));
    assert_eq!(assigned(&c, &mut n2).await.as_deref(), Some(wide.as_str()));
    let placed = c.get(&wide).await.expect("job").placement;
    let nodes: Vec<&str> = placed.iter().map(|p| p.node.as_str()).collect();
    assert_eq!(nodes, ["n1", "n2"]);
    assert_eq!(
        state(&c, &small).await.1,
        "not enough devices: needs 1, 0 free on healthy nodes"
    );
}

#[tokio::test(start_paused = true)]
async fn a_node_registering_again_fences_its_old_session() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = control(&dir).await;
    let (mut old, e1) = node(&c, "n1", 1).await;
    let job = c.submit(spec("j", 1, 0)).await.expect("submit");
    assert_eq!(assigned(&c, &mut old).await.as_deref(), Some(job.as_str()));
    c.status("n1", e1, status(&job, pb::JobState::Running))
        .await;

    // The node comes back (a restarted agent): a higher epoch, and the old session's job fails.
    let (_new, e2) = node(&c, "n1", 1).await;
    assert_eq!(e2, e1 + 1);
    let (s, reason) = state(&c, &job).await;
    assert_eq!(s, JobState::Failed);
    assert!(reason.contains("re-registered"), "{reason}");
    // Late messages of the fenced session change nothing.
    c.status("n1", e1, status(&job, pb::JobState::Succeeded))
        .await;
    c.disconnected("n1", e1).await;
    assert_eq!(state(&c, &job).await.0, JobState::Failed);
    let nodes = c.nodes().await.expect("nodes");
    assert_eq!(nodes[0].record.epoch, e2);
    assert_eq!(
        nodes[0].record.state,
        shoal_coordinator::nodes::NodeState::Healthy
    );
}

#[tokio::test(start_paused = true)]
async fn cordoned_nodes_take_no_work_and_drained_jobs_requeue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = control(&dir).await;
    let (mut n1, e1) = node(&c, "n1", 1).await;
    let job = c.submit(spec("j", 1, 0)).await.expect("submit");
    assert_eq!(assigned(&c, &mut n1).await.as_deref(), Some(job.as_str()));
    c.status("n1", e1, status(&job, pb::JobState::Running))
        .await;

    // Draining revokes the job and puts it back in the queue; nothing else can take it.
    c.cordon("n1", true).await.expect("drain");
    c.nodes().await.expect("barrier");
    match n1.try_recv() {
        Ok(Ok(pb::CoordinatorMessage {
            msg: Some(pb::coordinator_message::Msg::Revoke(r)),
        })) => assert_eq!(r.job_id, job),
        other => panic!("expected a revocation, got {other:?}"),
    }
    let (s, reason) = state(&c, &job).await;
    assert_eq!(s, JobState::Pending);
    assert!(reason.contains("not enough devices"), "{reason}");
    let history: Vec<JobState> = c
        .get(&job)
        .await
        .expect("job")
        .history
        .iter()
        .map(|t| t.state)
        .collect();
    assert_eq!(
        history,
        [
            JobState::Pending,
            JobState::Scheduling,
            JobState::Running,
            JobState::Recovering,
            JobState::Pending
        ]
    );
    // A healthy node arrives and takes it.
    let (mut n2, _) = node(&c, "n2", 1).await;
    assert_eq!(assigned(&c, &mut n2).await.as_deref(), Some(job.as_str()));
    assert!(c.cordon("nope", false).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn a_lost_node_fails_its_job_and_a_failed_rank_fails_the_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = control(&dir).await;
    let (mut n1, e1) = node(&c, "n1", 1).await;
    let (mut n2, e2) = node(&c, "n2", 1).await;
    let a = c.submit(spec("a", 1, 0)).await.expect("submit");
    let b = c.submit(spec("b", 1, 0)).await.expect("submit");
    assert_eq!(assigned(&c, &mut n1).await.as_deref(), Some(a.as_str()));
    assert_eq!(assigned(&c, &mut n2).await.as_deref(), Some(b.as_str()));
    c.disconnected("n1", e1).await;
    let (s, reason) = state(&c, &a).await;
    assert_eq!((s, reason.as_str()), (JobState::Failed, "node n1 lost"));
    c.status("n2", e2, status(&b, pb::JobState::Failed)).await;
    assert_eq!(state(&c, &b).await, (JobState::Failed, "boom".to_string()));
    // Invalid registrations are refused by field.
    let (tx, _rx) = mpsc::channel(1);
    let e = c
        .register(
            Registration {
                node: "bad name!".into(),
                devices: 1,
                nvlink_domain: String::new(),
                ib_rail: 0,
                spare: false,
            },
            tx,
        )
        .await
        .unwrap_err();
    assert!(e.to_string().starts_with("register.node"), "{e}");
}
