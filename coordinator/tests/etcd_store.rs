//! The store conformance suite, a coordinator restart and node liveness leases against a real
//! etcd server (Debian's `etcd-server`, which `scripts/test.sh` installs), started on free
//! loopback ports.
#![cfg(feature = "etcd")]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shoal_coordinator::actor::Control;
use shoal_coordinator::store::{EtcdStore, Store};

struct Etcd {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn start_etcd() -> Etcd {
    let dir = tempfile::tempdir().expect("tempdir");
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let bin = std::env::var("SHOAL_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
    let child = Command::new(&bin)
        .args([
            "--name",
            "shoal-test",
            "--data-dir",
            dir.path().join("data").to_str().expect("utf-8"),
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &format!("shoal-test={peer_url}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {bin} (install Debian's etcd-server; scripts/test.sh does): {e}")
        });
    let etcd = Etcd {
        child,
        url,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = EtcdStore::connect(std::slice::from_ref(&etcd.url), "probe/").await
            && s.get("x").await.is_ok()
        {
            return etcd;
        }
        assert!(
            Instant::now() < deadline,
            "etcd did not come up at {}",
            etcd.url
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
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
    };
    let (control, actor) = Control::start_with(store.clone(), config)
        .await
        .expect("start");
    let (tx, _rx) = tokio::sync::mpsc::channel(16);
    let reg = Registration {
        node: "n1".into(),
        devices: 1,
        nvlink_domain: "n1".into(),
        ib_rail: 0,
        spare: false,
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
