//! The scheduler and membership in process, with fake node sessions (channels in place of agent
//! streams) and paused tokio time: gang scheduling, priority order, fencing by epoch, cordoning,
//! failures, heartbeat timeouts and liveness keys.

use std::time::Duration;

use shoal_coordinator::actor::{Control, ControlConfig, HEARTBEAT_MS, Registration, Session};
use shoal_coordinator::jobs::JobState;
use shoal_coordinator::nodes::NodeState;
use shoal_coordinator::store::{EmbeddedStore, Store};
use shoal_proto::v1 as pb;
use shoal_spec::job::JobSpec;
use tokio::sync::mpsc;
use tokio::time::Instant;

type Inbox = mpsc::Receiver<Result<pb::CoordinatorMessage, tonic::Status>>;

async fn control(dir: &tempfile::TempDir) -> Control {
    let store = EmbeddedStore::open(&dir.path().join("s.redb")).expect("store");
    Control::start(store).await.expect("start").0
}

async fn node(c: &Control, name: &str, devices: usize) -> (Inbox, u64) {
    node_running(c, name, devices, vec![]).await
}

/// A node that registers naming the job attempts it runs.
async fn node_running(
    c: &Control,
    name: &str,
    devices: usize,
    running: Vec<(String, u32)>,
) -> (Inbox, u64) {
    let (tx, mut rx): (Session, Inbox) = mpsc::channel(64);
    let epoch = c
        .register(
            Registration {
                node: name.into(),
                devices,
                models: Vec::new(),
                nvlink_domain: name.into(),
                ib_rail: 0,
                spare: false,
                data_addr: String::new(),
                running,
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
        ..Default::default()
    }
}

/// The next assignment a node received, whole.
async fn assignment(c: &Control, rx: &mut Inbox) -> Option<pb::Assignment> {
    c.nodes().await.expect("barrier");
    loop {
        match rx.try_recv() {
            Ok(Ok(pb::CoordinatorMessage {
                msg: Some(pb::coordinator_message::Msg::Assign(a)),
            })) => return Some(a),
            Ok(Ok(pb::CoordinatorMessage {
                msg:
                    Some(
                        pb::coordinator_message::Msg::Revoke(_)
                        | pb::coordinator_message::Msg::Registered(_),
                    ),
            })) => continue,
            Ok(other) => panic!("unexpected message {other:?}"),
            Err(_) => return None,
        }
    }
}

fn mesh_of(a: &pb::Assignment) -> pb::JobMesh {
    shoal_proto::decode_mesh(a).expect("mesh")
}

/// Longer than the actor's settle time before it places a recovering job again.
async fn settle() {
    tokio::time::sleep(ControlConfig::default().recovery_settle + Duration::from_millis(10)).await;
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

    // The node comes back (a restarted agent): a higher epoch, and the old session's job
    // recovers onto the new session as its next attempt.
    let (mut new, e2) = node(&c, "n1", 1).await;
    assert_eq!(e2, e1 + 1);
    let (s, reason) = state(&c, &job).await;
    assert_eq!(s, JobState::Recovering);
    assert!(reason.contains("re-registered"), "{reason}");
    // Late messages of the fenced session change nothing.
    c.status("n1", e1, status(&job, pb::JobState::Succeeded))
        .await;
    c.disconnected("n1", e1).await;
    assert_eq!(state(&c, &job).await.0, JobState::Recovering);
    settle().await;
    let a = assignment(&c, &mut new).await.expect("placed again");
    assert_eq!((a.job_id.as_str(), a.attempt), (job.as_str(), 1));
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
    assert_eq!(state(&c, &job).await.0, JobState::Recovering);
    settle().await;
    let (s, reason) = state(&c, &job).await;
    assert_eq!(s, JobState::Pending);
    assert!(
        reason.contains("recovering: not enough devices"),
        "{reason}"
    );
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
async fn a_lost_node_starts_a_recovery_and_a_failed_rank_fails_the_job() {
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
    assert_eq!((s, reason.as_str()), (JobState::Recovering, "node n1 lost"));
    // An error that would recur (not retryable) fails the job; its device frees, and the
    // recovering job takes it as its next attempt.
    settle().await;
    assert_eq!(state(&c, &a).await.0, JobState::Pending);
    c.status("n2", e2, status(&b, pb::JobState::Failed)).await;
    assert_eq!(state(&c, &b).await, (JobState::Failed, "boom".to_string()));
    let got = assignment(&c, &mut n2).await.expect("a placed again");
    assert_eq!((got.job_id.as_str(), got.attempt), (a.as_str(), 1));
    // Invalid registrations are refused by field.
    let (tx, _rx) = mpsc::channel(1);
    let e = c
        .register(
            Registration {
                node: "bad name!".into(),
                devices: 1,
                models: Vec::new(),
                nvlink_domain: String::new(),
                ib_rail: 0,
                spare: false,
                data_addr: String::new(),
                running: vec![],
            },
            tx,
        )
        .await
        .unwrap_err();
    assert!(e.to_string().starts_with("register.node"), "{e}");
}

#[tokio::test]
async fn gpu_nodes_register_their_device_models_and_a_count_mismatch_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = control(&dir).await;
    let h200 = shoal_coordinator::nodes::DeviceModel {
        kind: "cuda".into(),
        name: "NVIDIA H200".into(),
        memory_bytes: 150_000_000_000,
        compute_capability: "9.0".into(),
        nvlink_peers: vec![1],
    };
    let reg = |devices: usize, models: Vec<shoal_coordinator::nodes::DeviceModel>| Registration {
        node: "g1".into(),
        devices,
        models,
        nvlink_domain: "g1".into(),
        ib_rail: 0,
        spare: false,
        data_addr: String::new(),
        running: vec![],
    };
    let (tx, _rx) = mpsc::channel(8);
    let e = c
        .register(reg(2, vec![h200.clone()]), tx)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("register.devices")
            && e.to_string()
                .contains("1 device descriptions for 2 devices"),
        "{e}"
    );
    let (tx, _rx2) = mpsc::channel(8);
    c.register(reg(2, vec![h200.clone(), h200.clone()]), tx)
        .await
        .expect("register");
    let nodes = c.nodes().await.expect("nodes");
    assert_eq!(nodes[0].record.models, vec![h200.clone(), h200]);
    // The wire form keeps what the agent sent.
    let wire = nodes[0].record.models[0].to_wire(0, String::new());
    assert_eq!(
        (
            wire.kind,
            wire.name.as_str(),
            wire.compute_capability.as_str(),
            wire.nvlink_peers
        ),
        (pb::DeviceKind::Cuda as i32, "NVIDIA H200", "9.0", vec![1])
    );
}

const TIMEOUT: Duration = Duration::from_secs(5);

fn interval() -> Duration {
    Duration::from_millis(u64::from(HEARTBEAT_MS))
}

/// A control actor with a heartbeat timeout of [`TIMEOUT`], and a handle on its store.
async fn control_with_store(dir: &tempfile::TempDir) -> (Control, EmbeddedStore) {
    let store = EmbeddedStore::open(&dir.path().join("s.redb")).expect("store");
    let config = ControlConfig {
        heartbeat_timeout: TIMEOUT,
        ..Default::default()
    };
    let c = Control::start_with(store.clone(), config)
        .await
        .expect("start")
        .0;
    (c, store)
}

async fn node_state(c: &Control, name: &str) -> (NodeState, u64) {
    let nodes = c.nodes().await.expect("nodes");
    let n = nodes
        .iter()
        .find(|n| n.record.name == name)
        .unwrap_or_else(|| panic!("no node {name}"));
    (n.record.state, n.record.epoch)
}

/// Drains what a session received; `true` if its stream was closed.
fn drain(rx: &mut Inbox) -> (Vec<Result<pb::CoordinatorMessage, tonic::Status>>, bool) {
    let mut got = Vec::new();
    loop {
        match rx.try_recv() {
            Ok(m) => got.push(m),
            Err(mpsc::error::TryRecvError::Empty) => return (got, false),
            Err(mpsc::error::TryRecvError::Disconnected) => return (got, true),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_node_that_stops_heartbeating_is_failed_after_the_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, store) = control_with_store(&dir).await;
    let (mut n1, e1) = node(&c, "n1", 1).await;
    let (mut n2, e2) = node(&c, "n2", 1).await;
    let silent_since = Instant::now();
    let a = c.submit(spec("a", 1, 0)).await.expect("submit");
    let b = c.submit(spec("b", 1, 0)).await.expect("submit");
    assert_eq!(assigned(&c, &mut n1).await.as_deref(), Some(a.as_str()));
    assert_eq!(assigned(&c, &mut n2).await.as_deref(), Some(b.as_str()));
    c.status("n1", e1, status(&a, pb::JobState::Running)).await;
    c.status("n2", e2, status(&b, pb::JobState::Running)).await;
    // Both nodes are live in the store.
    for n in ["n1", "n2"] {
        assert!(
            store
                .get(&format!("live/{n}"))
                .await
                .expect("get")
                .is_some()
        );
    }

    // n1 heartbeats every interval for twice the timeout; n2 sent nothing since registering.
    let mut n2_failed_after = None;
    while silent_since.elapsed() < 2 * TIMEOUT {
        tokio::time::sleep(interval()).await;
        c.heartbeat("n1", e1).await;
        let silent = silent_since.elapsed();
        let (s2, _) = node_state(&c, "n2").await;
        if s2 == NodeState::Failed && n2_failed_after.is_none() {
            n2_failed_after = Some(silent);
        }
        if silent < TIMEOUT {
            assert_eq!(s2, NodeState::Healthy, "n2 failed after only {silent:?}");
        }
        assert_eq!(
            node_state(&c, "n1").await,
            (NodeState::Healthy, e1),
            "n1 heartbeats ({silent:?} in)"
        );
    }
    let after = n2_failed_after.expect("the silent node is failed");
    assert!(
        after >= TIMEOUT && after <= TIMEOUT + interval(),
        "failed after {after:?}"
    );

    // n2's job is recovering, with a reason naming the node and the timeout; n1's runs on.
    let (s, pending) = state(&c, &b).await;
    assert_eq!(s, JobState::Pending, "no device to recover onto yet");
    assert!(
        pending.starts_with("recovering: not enough devices"),
        "{pending}"
    );
    let rec = c.get(&b).await.expect("job");
    assert_eq!(rec.recoveries.len(), 1);
    let reason = rec.recoveries[0].cause.clone();
    assert_eq!(
        reason,
        "node n2 sent no heartbeat for 5000 ms (heartbeat timeout)"
    );
    assert_eq!(state(&c, &a).await.0, JobState::Running);
    // n2's session was closed, with the reason; its liveness key is gone, n1's is not.
    let (got, closed) = drain(&mut n2);
    assert!(closed, "the silent node's session is closed");
    assert!(
        got.iter().any(|m| m
            .as_ref()
            .is_err_and(|st| st.message().contains("heartbeat timeout"))),
        "{got:?}"
    );
    assert_eq!(store.get("live/n2").await.expect("get"), None);
    assert!(store.get("live/n1").await.expect("get").is_some());
    let (_, n1_closed) = drain(&mut n1);
    assert!(!n1_closed);

    // Late messages of the ended session change nothing.
    c.heartbeat("n2", e2).await;
    c.status("n2", e2, status(&b, pb::JobState::Succeeded))
        .await;
    assert_eq!(node_state(&c, "n2").await, (NodeState::Failed, e2));
    assert_eq!(state(&c, &b).await.0, JobState::Pending);

    // The node registers again: a new epoch, healthy, live, and it takes new work.
    let (mut n2b, e2b) = node(&c, "n2", 1).await;
    assert_eq!(e2b, e2 + 1);
    assert_eq!(node_state(&c, "n2").await, (NodeState::Healthy, e2b));
    assert!(store.get("live/n2").await.expect("get").is_some());
    // The recovering job takes it.
    let got = assignment(&c, &mut n2b).await.expect("b placed again");
    assert_eq!((got.job_id.as_str(), got.attempt), (b.as_str(), 1));
    let d = b;
    // And it stays healthy while it heartbeats.
    for _ in 0..(2 * TIMEOUT.as_millis() / interval().as_millis()) {
        tokio::time::sleep(interval()).await;
        c.heartbeat("n1", e1).await;
        c.heartbeat("n2", e2b).await;
    }
    assert_eq!(node_state(&c, "n2").await, (NodeState::Healthy, e2b));
    assert_eq!(state(&c, &d).await.0, JobState::Scheduling);
}

#[tokio::test(start_paused = true)]
async fn a_deleted_liveness_key_ends_the_session() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, store) = control_with_store(&dir).await;
    let (mut n1, e1) = node(&c, "n1", 1).await;
    let job = c.submit(spec("j", 1, 0)).await.expect("submit");
    assert_eq!(assigned(&c, &mut n1).await.as_deref(), Some(job.as_str()));
    // An operator (or an expired lease) removes the node's liveness key.
    assert!(store.delete("live/n1").await.expect("delete"));
    let mut waited = 0;
    while node_state(&c, "n1").await.0 != NodeState::Failed {
        waited += 1;
        assert!(waited < 100, "the deletion was not noticed");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Noticed through the watch, well before any heartbeat timeout.
    assert!(waited < 50, "{waited}");
    let (s, reason) = state(&c, &job).await;
    assert_eq!(s, JobState::Recovering);
    assert_eq!(
        reason,
        "node n1 liveness lease lost in the store (heartbeat timeout 5000 ms)"
    );
    assert!(drain(&mut n1).1, "the session is closed");
    // Registering again works, and the old key's deletion does not touch the new session.
    let (_n1b, e1b) = node(&c, "n1", 1).await;
    assert_eq!(e1b, e1 + 1);
    tokio::time::sleep(interval()).await;
    assert_eq!(node_state(&c, "n1").await, (NodeState::Healthy, e1b));
}

#[tokio::test(start_paused = true)]
async fn a_re_registration_does_not_lose_the_new_session_to_the_old_lease() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, store) = control_with_store(&dir).await;
    let (_old, e1) = node(&c, "n1", 1).await;
    let first = store.get("live/n1").await.expect("get").expect("live");
    // The agent restarts: the old lease is revoked (a deletion the watch reports) before the
    // new session's key is written; the new session must survive that event.
    let (_new, e2) = node(&c, "n1", 1).await;
    assert_eq!(e2, e1 + 1);
    let second = store.get("live/n1").await.expect("get").expect("live");
    assert!(second.revision > first.revision);
    assert_eq!(second.value, br#"{"epoch":2}"#);
    for _ in 0..4 {
        tokio::time::sleep(interval()).await;
        c.heartbeat("n1", e2).await;
    }
    assert_eq!(node_state(&c, "n1").await, (NodeState::Healthy, e2));
}

#[tokio::test(start_paused = true)]
async fn a_heartbeat_timeout_shorter_than_the_interval_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(&dir.path().join("s.redb")).expect("store");
    let config = ControlConfig {
        heartbeat_timeout: Duration::from_millis(u64::from(HEARTBEAT_MS)),
        ..Default::default()
    };
    let e = Control::start_with(store, config).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "heartbeat timeout: must be longer than the 500 ms heartbeat interval, got 500 ms"
    );
}

/// A coordinator allowing 2 recoveries in a row, a node `n1` of one device, and a job placed
/// on it (attempt 0): the store's directory, the handle, n1's inbox and epoch, the job id.
async fn one_node_job_with_two_recoveries() -> (tempfile::TempDir, Control, Inbox, u64, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(&dir.path().join("s.redb")).expect("store");
    let config = ControlConfig {
        max_recoveries: 2,
        ..Default::default()
    };
    let c = Control::start_with(store, config).await.expect("start").0;
    let (mut n1, e1) = node(&c, "n1", 1).await;
    let job = c.submit(spec("j", 1, 0)).await.expect("submit");
    let first = assignment(&c, &mut n1).await.expect("placed");
    assert_eq!((first.attempt, first.restore_step), (0, None));
    (dir, c, n1, e1, job)
}

#[tokio::test(start_paused = true)]
async fn a_recovery_is_recorded_and_a_job_gives_up_after_its_recoveries() {
    let (_dir, c, _n1, e1, job) = one_node_job_with_two_recoveries().await;
    let running = |attempt: u32, started: Option<u64>, step: u64, ckpt: u64| {
        let mut s = status(&job, pb::JobState::Running);
        s.attempt = attempt;
        s.started_step = started;
        s.checkpoint_step = ckpt;
        s.step = (step > 0).then(|| pb::StepMetrics {
            step,
            ..Default::default()
        });
        s
    };
    c.status("n1", e1, running(0, Some(0), 0, 0)).await;
    c.status("n1", e1, running(0, None, 4, 4)).await;
    c.status("n1", e1, running(0, None, 5, 0)).await;
    assert_eq!(state(&c, &job).await.0, JobState::Running);
    assert_eq!(c.get(&job).await.expect("job").checkpoint_step, 4);

    // A spare takes over the lost node: attempt 1, which restores step 4.
    let (tx, mut spare) = mpsc::channel(64);
    let es = c
        .register(
            Registration {
                node: "spare".into(),
                devices: 1,
                models: Vec::new(),
                nvlink_domain: "spare".into(),
                ib_rail: 0,
                spare: true,
                data_addr: String::new(),
                running: vec![],
            },
            tx,
        )
        .await
        .expect("register the spare");
    c.disconnected("n1", e1).await;
    assert_eq!(state(&c, &job).await.0, JobState::Recovering);
    settle().await;
    let a = assignment(&c, &mut spare)
        .await
        .expect("placed on the spare");
    assert_eq!(a.attempt, 1);
    assert_eq!(
        a.restore_step,
        Some(4),
        "every node of the attempt restores the checkpoint the coordinator knows of"
    );
    assert_eq!(state(&c, &job).await.0, JobState::Scheduling);
    // What the first attempt's ranks still say changes nothing.
    let mut late = status(&job, pb::JobState::Failed);
    late.retryable = true;
    c.status("spare", es, late).await;
    assert_eq!(state(&c, &job).await.0, JobState::Scheduling);
    c.status("spare", es, running(1, Some(4), 0, 0)).await;
    let rec = c.get(&job).await.expect("job");
    assert_eq!(rec.state, JobState::Running);
    assert!(rec.reason.contains("recovered in"), "{}", rec.reason);
    let r = &rec.recoveries[0];
    assert_eq!(
        (r.attempt, r.failed_step, r.restored_step, r.steps_redone()),
        (1, 5, 4, 1)
    );
    assert!(r.resumed_unix_ms >= r.detected_unix_ms && r.recovery_ms().is_some());
    assert_eq!(r.cause, "node n1 lost");
    // /metrics shows it: one failure, one step redone, one recovery timed, the spare busy.
    let text = shoal_coordinator::http::render_metrics(&c.snapshot().await.expect("snapshot"));
    for line in [
        format!("shoal_job_failures_total{{job=\"{job}\",name=\"j\"}} 1"),
        format!("shoal_job_steps_redone_total{{job=\"{job}\",name=\"j\"}} 1"),
        format!("shoal_job_attempt{{job=\"{job}\",name=\"j\"}} 1"),
        format!("shoal_job_checkpoint_step{{job=\"{job}\",name=\"j\"}} 4"),
        "shoal_recovery_seconds_count 1".to_string(),
        "shoal_jobs{state=\"running\"} 1".to_string(),
        "shoal_nodes{state=\"failed\"} 1".to_string(),
        "shoal_node_up{node=\"n1\",state=\"failed\"} 0".to_string(),
        "shoal_devices{node_state=\"spare\",use=\"busy\"} 1".to_string(),
    ] {
        assert!(text.contains(&line), "{line} not in\n{text}");
    }

    // A retryable failure of the current attempt recovers again (attempt 2); one more is too
    // many for max_recoveries = 2.
    let mut fail = status(&job, pb::JobState::Failed);
    fail.attempt = 1;
    fail.retryable = true;
    c.status("spare", es, fail.clone()).await;
    assert_eq!(state(&c, &job).await.0, JobState::Recovering);
    settle().await;
    assert_eq!(assignment(&c, &mut spare).await.expect("again").attempt, 2);
    fail.attempt = 2;
    c.status("spare", es, fail).await;
    let (s, reason) = state(&c, &job).await;
    assert_eq!(s, JobState::Failed);
    assert!(reason.contains("gave up after 2 recoveries"), "{reason}");
    // The stored record says the same after a restart of the coordinator.
    drop(c);
}

#[tokio::test(start_paused = true)]
async fn a_shrunk_job_grows_back_at_its_next_checkpoint_once_devices_return() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = control(&dir).await;
    let (mut n1, e1) = node(&c, "n1", 2).await;
    let (_n2, e2) = node(&c, "n2", 2).await;
    let mut s = spec("elastic", 4, 0);
    s.parallelism.ep = 1;
    s.elasticity.min_dp = 2;
    let job = c.submit(s).await.expect("submit");
    let first = assignment(&c, &mut n1).await.expect("placed");
    assert_eq!(mesh_of(&first).mesh_nodes.len(), 4);
    // n2 is lost for good: the job continues on n1's two devices with dp 2.
    c.disconnected("n2", e2).await;
    settle().await;
    let a = assignment(&c, &mut n1).await.expect("placed again");
    let dp_of = |a: &pb::Assignment| {
        a.spec
            .as_ref()
            .and_then(|s| s.parallelism.as_ref())
            .map(|p| p.dp)
    };
    assert_eq!(
        (a.attempt, mesh_of(&a).mesh_nodes.len(), dp_of(&a)),
        (1, 2, Some(2))
    );
    let mut running = status(&job, pb::JobState::Running);
    running.attempt = 1;
    running.started_step = Some(2);
    c.status("n1", e1, running.clone()).await;
    assert_eq!(state(&c, &job).await.0, JobState::Running);
    // A checkpoint with no more devices changes nothing.
    running.started_step = None;
    running.checkpoint_step = 4;
    c.status("n1", e1, running.clone()).await;
    assert_eq!(state(&c, &job).await.0, JobState::Running);
    // A node joins; at the next checkpoint the job goes back to dp 4 on both nodes.
    let (mut n3, _) = node(&c, "n3", 2).await;
    assert_eq!(state(&c, &job).await.0, JobState::Running);
    running.checkpoint_step = 6;
    c.status("n1", e1, running).await;
    let (st, reason) = state(&c, &job).await;
    assert_eq!(st, JobState::Recovering);
    assert!(
        reason.contains("growing back from dp 2 to dp 4"),
        "{reason}"
    );
    settle().await;
    let a = assignment(&c, &mut n1).await.expect("grown on n1");
    assert_eq!(
        (a.attempt, mesh_of(&a).mesh_nodes.len(), dp_of(&a)),
        (2, 4, Some(4))
    );
    assert!(assignment(&c, &mut n3).await.is_some(), "and on n3");
}

#[tokio::test(start_paused = true)]
async fn a_job_that_commits_new_checkpoints_recovers_as_often_as_it_fails() {
    let (_dir, c, mut n1, e1, job) = one_node_job_with_two_recoveries().await;
    let mut st = status(&job, pb::JobState::Running);
    st.started_step = Some(0);
    c.status("n1", e1, st).await;
    // Five failures, each after a new checkpoint: more than max_recoveries, none given up.
    for attempt in 0..5u32 {
        let mut ck = status(&job, pb::JobState::Running);
        ck.attempt = attempt;
        ck.checkpoint_step = u64::from(10 * (attempt + 1));
        ck.step = Some(pb::StepMetrics {
            step: u64::from(10 * (attempt + 1) + 3),
            ..Default::default()
        });
        c.status("n1", e1, ck).await;
        let mut fail = status(&job, pb::JobState::Failed);
        fail.attempt = attempt;
        fail.retryable = true;
        c.status("n1", e1, fail).await;
        assert_eq!(
            state(&c, &job).await.0,
            JobState::Recovering,
            "failure {attempt}"
        );
        settle().await;
        let a = assignment(&c, &mut n1).await.expect("placed again");
        assert_eq!(a.attempt, attempt + 1);
        let mut started = status(&job, pb::JobState::Running);
        started.attempt = attempt + 1;
        started.started_step = Some(u64::from(10 * (attempt + 1)));
        c.status("n1", e1, started).await;
        assert_eq!(state(&c, &job).await.0, JobState::Running);
    }
    // Then two failures from the same checkpoint: given up.
    for attempt in 5..7u32 {
        let mut fail = status(&job, pb::JobState::Failed);
        fail.attempt = attempt;
        fail.retryable = true;
        c.status("n1", e1, fail).await;
        if attempt == 6 {
            break;
        }
        settle().await;
        assignment(&c, &mut n1).await.expect("placed again");
        let mut started = status(&job, pb::JobState::Running);
        started.attempt = attempt + 1;
        started.started_step = Some(50);
        c.status("n1", e1, started).await;
    }
    let (s, reason) = state(&c, &job).await;
    assert_eq!(s, JobState::Failed);
    assert!(
        reason.contains("gave up after 2 recoveries without a new checkpoint"),
        "{reason}"
    );
    assert_eq!(c.get(&job).await.expect("job").recoveries.len(), 6);
}

#[tokio::test(start_paused = true)]
async fn a_node_much_slower_than_its_peers_is_flagged_in_the_job_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(&dir.path().join("s.redb")).expect("store");
    let c = Control::start(store).await.expect("start").0;
    let mut nodes = Vec::new();
    for n in ["a", "b", "c"] {
        nodes.push((n, node(&c, n, 1).await));
    }
    let job = c.submit(spec("j", 3, 0)).await.expect("submit");
    for (_, (rx, _)) in &mut nodes {
        assert!(assignment(&c, rx).await.is_some());
    }
    let (_, mut events) = c.watch(&job).await.expect("watch");
    let report = |step: u64, busy_s: f64| {
        let mut s = status(&job, pb::JobState::Running);
        s.step = Some(pb::StepMetrics {
            step,
            ..Default::default()
        });
        s.busy_s = busy_s;
        s
    };
    for step in 1..=8u64 {
        for (n, (_, epoch)) in &nodes {
            // Node c computes twice as long as a and b from step 3 on.
            let busy = if *n == "c" && step >= 3 { 2.0 } else { 1.0 };
            c.status(n, *epoch, report(step, busy)).await;
        }
    }
    c.nodes().await.expect("barrier");
    let mut flagged = Vec::new();
    while let Ok(ev) = events.try_recv() {
        if let shoal_coordinator::jobs::JobEvent::Straggler(x) = ev {
            flagged.push(x);
        }
    }
    assert_eq!(flagged.len(), 1, "{flagged:?}");
    let x = &flagged[0];
    // Slow in steps 3..=7: flagged at the fifth slow report, once.
    assert_eq!((x.node.as_str(), x.step, x.steps), ("c", 7, 5));
    assert_eq!((x.busy_s, x.peers_busy_s), (2.0, 1.0));
}

/// A job of two nodes placed and running under one coordinator, which then stops; a second
/// coordinator starts on the same store with `config`: the store, the new handle, the job id.
async fn job_under_a_coordinator_that_stops(
    dir: &tempfile::TempDir,
    extra_nodes: &[&str],
    config: ControlConfig,
) -> (EmbeddedStore, Control, String) {
    let store = EmbeddedStore::open(&dir.path().join("s.redb")).expect("store");
    let (c1, task) = Control::start_with(store.clone(), ControlConfig::default())
        .await
        .expect("start");
    let (mut n1, e1) = node(&c1, "n1", 1).await;
    let (mut n2, e2) = node(&c1, "n2", 1).await;
    let mut extra = Vec::new();
    for n in extra_nodes {
        extra.push(node(&c1, n, 1).await);
    }
    let job = c1.submit(spec("j", 2, 0)).await.expect("submit");
    assert_eq!(assigned(&c1, &mut n1).await.as_deref(), Some(job.as_str()));
    assert_eq!(assigned(&c1, &mut n2).await.as_deref(), Some(job.as_str()));
    let mut step = status(&job, pb::JobState::Running);
    step.step = Some(pb::StepMetrics {
        step: 3,
        ..Default::default()
    });
    c1.status("n1", e1, step.clone()).await;
    c1.status("n2", e2, step).await;
    assert_eq!(state(&c1, &job).await.0, JobState::Running);
    // The coordinator goes (its sessions with it); another starts on the same store.
    drop(c1);
    task.await.expect("first actor");
    drop((n1, n2, extra));
    let c2 = Control::start_with(store.clone(), config)
        .await
        .expect("start again")
        .0;
    (store, c2, job)
}

fn revoked(got: &[Result<pb::CoordinatorMessage, tonic::Status>]) -> Vec<String> {
    got.iter()
        .filter_map(|m| match m {
            Ok(pb::CoordinatorMessage {
                msg: Some(pb::coordinator_message::Msg::Revoke(r)),
            }) => Some(r.job_id.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_new_coordinator_adopts_a_running_job_as_its_nodes_come_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_store, c, job) =
        job_under_a_coordinator_that_stops(&dir, &[], ControlConfig::default()).await;
    // Still running as far as the new coordinator knows: nothing failed, nothing restarted.
    assert_eq!(state(&c, &job).await.0, JobState::Running);
    let (mut n1, e1) = node_running(&c, "n1", 1, vec![(job.clone(), 0)]).await;
    let (mut n2, e2) = node_running(&c, "n2", 1, vec![(job.clone(), 0)]).await;
    let (s, reason) = state(&c, &job).await;
    assert_eq!(s, JobState::Running);
    assert!(
        reason.contains("adopted") && reason.contains("2 node(s)"),
        "{reason}"
    );
    // No new assignment and no revocation: the workers run on.
    for rx in [&mut n1, &mut n2] {
        assert_eq!(assignment(&c, rx).await.map(|a| a.job_id), None);
    }
    // The job holds its devices: a second job waits.
    let other = c.submit(spec("other", 1, 0)).await.expect("submit");
    assert_eq!(state(&c, &other).await.0, JobState::Pending);
    // Long past the grace, it is still the same attempt.
    let until = Instant::now() + ControlConfig::default().adopt_grace * 2;
    while Instant::now() < until {
        tokio::time::sleep(interval()).await;
        c.heartbeat("n1", e1).await;
        c.heartbeat("n2", e2).await;
    }
    for (n, e) in [("n1", e1), ("n2", e2)] {
        c.status(n, e, status(&job, pb::JobState::Succeeded)).await;
    }
    let r = c.get(&job).await.expect("job");
    assert_eq!(
        (r.state, r.attempt, r.recoveries.len()),
        (JobState::Succeeded, 0, 0)
    );
    // Its devices went to the waiting job.
    assert_eq!(assigned(&c, &mut n1).await.as_deref(), Some(other.as_str()));
}

#[tokio::test(start_paused = true)]
async fn a_placed_job_whose_node_does_not_come_back_recovers_after_the_grace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let grace = Duration::from_secs(3);
    let config = ControlConfig {
        adopt_grace: grace,
        heartbeat_timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let (_store, c, job) = job_under_a_coordinator_that_stops(&dir, &["n3"], config).await;
    let (mut n1, _) = node_running(&c, "n1", 1, vec![(job.clone(), 0)]).await;
    let (mut n3, _) = node(&c, "n3", 1).await;
    tokio::time::sleep(grace - Duration::from_millis(600)).await;
    assert_eq!(
        state(&c, &job).await.0,
        JobState::Running,
        "within the grace"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = c.get(&job).await.expect("job");
    let cause = &r.recoveries.last().expect("a recovery").cause;
    assert!(
        cause.contains("n2") && cause.contains("did not come back"),
        "{cause}"
    );
    // n1 is told to stop attempt 0, then (after the settle time, within the second slept)
    // attempt 1 goes to n1 and the free n3.
    let (got, _) = drain(&mut n1);
    assert_eq!(revoked(&got), vec![job.clone()]);
    let attempts = |got: &[Result<pb::CoordinatorMessage, tonic::Status>]| -> Vec<u32> {
        got.iter()
            .filter_map(|m| match m {
                Ok(pb::CoordinatorMessage {
                    msg: Some(pb::coordinator_message::Msg::Assign(a)),
                }) => Some(a.attempt),
                _ => None,
            })
            .collect()
    };
    assert_eq!(attempts(&got), vec![1]);
    assert_eq!(attempts(&drain(&mut n3).0), vec![1]);
}

#[tokio::test(start_paused = true)]
async fn a_node_back_without_the_job_recovers_it_and_stale_attempts_are_revoked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_store, c, job) =
        job_under_a_coordinator_that_stops(&dir, &[], ControlConfig::default()).await;
    // n1 was restarted meanwhile: it runs nothing; the job recovers at once.
    let (_n1, _) = node(&c, "n1", 1).await;
    let r = c.get(&job).await.expect("job");
    assert_eq!(r.state, JobState::Recovering);
    assert!(
        r.recoveries[0].cause.contains("came back without the job"),
        "{:?}",
        r.recoveries
    );
    // n2 names attempt 0 (and a job no one knows of): both are stopped.
    let (mut n2, _) = node_running(&c, "n2", 1, vec![(job.clone(), 0), ("job-77".into(), 0)]).await;
    c.nodes().await.expect("barrier");
    assert_eq!(
        revoked(&drain(&mut n2).0),
        vec![job.clone(), "job-77".to_string()]
    );
}

/// The embedded store, with its next write (put or compare-and-set) held back for
/// `stall_next_ms` (a slow disk, a busy etcd): the control actor waits on it, as it does on
/// every store write.
#[derive(Clone)]
struct Stalling {
    inner: EmbeddedStore,
    stall_next_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

mod stalling {
    use super::Stalling;
    use shoal_coordinator::Result;
    use shoal_coordinator::store::{Ephemeral, Expect, LeaseId, Store, Versioned, Watch};
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    impl Stalling {
        async fn stall(&self) {
            let ms = self.stall_next_ms.swap(0, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }

    impl Store for Stalling {
        async fn get(&self, key: &str) -> Result<Option<Versioned>> {
            self.inner.get(key).await
        }
        async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64> {
            self.stall().await;
            self.inner.put(key, value).await
        }
        async fn compare_and_set(
            &self,
            key: &str,
            expect: Expect,
            value: Vec<u8>,
        ) -> Result<Result<u64, Option<Versioned>>> {
            self.stall().await;
            self.inner.compare_and_set(key, expect, value).await
        }
        async fn delete(&self, key: &str) -> Result<bool> {
            self.inner.delete(key).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>> {
            self.inner.list(prefix).await
        }
        async fn put_ephemeral(
            &self,
            key: &str,
            value: Vec<u8>,
            ttl: Duration,
        ) -> Result<Ephemeral> {
            self.inner.put_ephemeral(key, value, ttl).await
        }
        async fn create_ephemeral(
            &self,
            key: &str,
            value: Vec<u8>,
            ttl: Duration,
        ) -> Result<Option<Ephemeral>> {
            self.inner.create_ephemeral(key, value, ttl).await
        }
        async fn keep_alive(&self, lease: LeaseId) -> Result<bool> {
            self.inner.keep_alive(lease).await
        }
        async fn revoke(&self, lease: LeaseId) -> Result<bool> {
            self.inner.revoke(lease).await
        }
        async fn watch(&self, prefix: &str) -> Result<Watch> {
            self.inner.watch(prefix).await
        }
    }
}

/// Heartbeats that queue while the control actor waits on a store write longer than the
/// heartbeat timeout still count: a node that kept heartbeating through it is not failed. (Were
/// the overdue liveness check to run before the queued heartbeats, about half of these stalls
/// would fail the node.)
#[tokio::test(start_paused = true)]
async fn heartbeats_queued_behind_a_slow_store_write_still_count() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let dir = tempfile::tempdir().expect("tempdir");
    let stall_next_ms = std::sync::Arc::new(AtomicU64::new(0));
    let store = Stalling {
        inner: EmbeddedStore::open(&dir.path().join("s.redb")).expect("store"),
        stall_next_ms: stall_next_ms.clone(),
    };
    let config = ControlConfig {
        heartbeat_timeout: TIMEOUT,
        ..Default::default()
    };
    let c = Control::start_with(store, config).await.expect("start").0;
    let (_n1, e1) = node(&c, "n1", 1).await;
    // n1 heartbeats every interval, as an agent does, whatever the actor is doing.
    let beat = {
        let c = c.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval()).await;
                c.heartbeat("n1", e1).await;
            }
        })
    };
    let stall = TIMEOUT + Duration::from_secs(1);
    for round in 0..10 {
        stall_next_ms.store(stall.as_millis() as u64, Ordering::SeqCst);
        let before = Instant::now();
        c.submit(spec(&format!("j{round}"), 1, 0))
            .await
            .expect("submit");
        assert!(
            before.elapsed() >= stall,
            "the submission waited on the store"
        );
        tokio::time::sleep(2 * interval()).await;
        assert_eq!(
            node_state(&c, "n1").await,
            (NodeState::Healthy, e1),
            "after stall {round}"
        );
    }
    beat.abort();
}
