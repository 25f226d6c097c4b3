//! The store conformance suite, a coordinator restart and node liveness leases against a real
//! etcd server (Debian's `etcd-server`, which `scripts/test.sh` installs), started on free
//! loopback ports.
#![cfg(feature = "etcd")]

use std::time::{Duration, Instant};

use shoal_coordinator::actor::Control;
use shoal_coordinator::store::{EtcdStore, Store};

/// A real etcd server on free loopback ports (the helper of the multi-process tests) and the
/// URL its client endpoint answers on.
struct Etcd {
    url: String,
    _server: shoal_tests::Etcd,
    _dir: tempfile::TempDir,
}

async fn start_etcd() -> Etcd {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_path_buf();
    // Starting waits for etcd's health endpoint: off the async workers.
    let server = tokio::task::spawn_blocking(move || shoal_tests::Etcd::start(&path))
        .await
        .expect("starting etcd");
    Etcd {
        url: format!("http://{}", server.endpoint),
        _server: server,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_passes_the_conformance_suite() {
    let etcd = start_etcd().await;
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.url), "shoal/")
        .await
        .expect("connect");
    shoal_coordinator::store::conformance::run(&store).await;
    // A new client (as after a coordinator restart) sees the same data.
    let again = EtcdStore::connect(std::slice::from_ref(&etcd.url), "shoal/")
        .await
        .expect("connect");
    shoal_coordinator::store::conformance::check_persisted(&again).await;
    // Another prefix is another cluster's namespace.
    let other = EtcdStore::connect(std::slice::from_ref(&etcd.url), "other/")
        .await
        .expect("connect");
    assert!(other.list("jobs/").await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_restarted_on_etcd_finds_its_jobs() {
    let etcd = start_etcd().await;
    let spec = shoal_spec::job::JobSpec::from_toml("name = \"on-etcd\"", "job").expect("spec");
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.url), "c/")
        .await
        .expect("connect");
    let (control, actor) = Control::start(store).await.expect("start");
    let id = control.submit(spec).await.expect("submit");
    drop(control);
    actor.await.expect("actor");
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.url), "c/")
        .await
        .expect("connect");
    let (control, _actor) = Control::start(store).await.expect("restart");
    let rec = control.get(&id).await.expect("found again");
    assert_eq!(rec.spec.name, "on-etcd");
    assert_eq!(rec.state, shoal_coordinator::jobs::JobState::Pending);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_coordinators_nodes_expire_from_etcd() {
    use shoal_coordinator::actor::{ControlConfig, Registration};
    let etcd = start_etcd().await;
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.url), "l/")
        .await
        .expect("connect");
    let config = ControlConfig {
        heartbeat_timeout: Duration::from_millis(1000),
        ..Default::default()
    };
    let (control, actor) = Control::start_with(store.clone(), config)
        .await
        .expect("start");
    let (tx, _rx) = tokio::sync::mpsc::channel(16);
    let reg = Registration {
        node: "n1".into(),
        devices: 1,
        models: Vec::new(),
        nvlink_domain: "n1".into(),
        ib_rail: 0,
        spare: false,
        data_addr: String::new(),
        running: vec![],
    };
    let epoch = control.register(reg, tx).await.expect("register");
    let live = store.get("live/n1").await.expect("get").expect("live key");
    assert_eq!(live.value, format!("{{\"epoch\":{epoch}}}").into_bytes());
    // The coordinator dies without cleaning up: etcd expires the node's key on its own, after
    // the lease's TTL (1.5 s, rounded up to etcd's whole seconds).
    actor.abort();
    let died = Instant::now();
    while store.get("live/n1").await.expect("get").is_some() {
        assert!(
            died.elapsed() < Duration::from_secs(10),
            "the dead coordinator's liveness key stayed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        died.elapsed() >= Duration::from_millis(1000),
        "expired after {:?}, before the heartbeat timeout",
        died.elapsed()
    );
    // The node record itself stays (a restarted coordinator finds it).
    assert!(store.get("nodes/n1").await.expect("get").is_some());
}
