//! The control plane as separate processes: a coordinator and node agents, jobs submitted and
//! watched through the CLI over gRPC, a hung node agent (SIGSTOP) failed by the heartbeat
//! timeout, and a node agent killed with SIGKILL. The main flow runs on the embedded store and
//! (feature `etcd`, which scripts/test.sh turns on) on a real etcd server.

use std::time::{Duration, Instant};

use shoal_tests::{
    Background, run_shoal, start_coordinator, start_coordinator_with, wait_for_nodes,
};

fn job_file(dir: &std::path::Path, name: &str, steps: u64) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        "name = \"{name}\"\nprecision = \"fp32\"\n[training]\nsteps = {steps}\nseq_len = 32\nbatch = 2\n[parallelism]\nmicro_batches = 1\n[checkpointing]\ndir = \"{}\"\n",
        dir.join(name).display()
    );
    std::fs::write(&path, text).expect("write job file");
    path
}

fn submit(url: &str, file: &std::path::Path) -> String {
    let out = run_shoal(&[
        "submit",
        file.to_str().expect("utf-8"),
        "--coordinator",
        url,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn jobs(url: &str) -> Vec<serde_json::Value> {
    let out = run_shoal(&["jobs", "--coordinator", url, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .expect("json")
        .as_array()
        .expect("array")
        .clone()
}

/// Sends `signal` (`-STOP`, `-CONT`, ...) to `p`.
fn signal(p: &Background, signal: &str) {
    let sent = std::process::Command::new("kill")
        .args([signal, &p.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success(), "kill {signal}");
}

fn nodes(url: &str) -> serde_json::Value {
    let out = run_shoal(&["nodes", "--coordinator", url, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// Heartbeat timeout of the coordinators of [`two_node_agents_run_jobs`].
const HEARTBEAT_TIMEOUT_MS: u64 = 3000;

/// The control plane end to end on `store` (a `--store` value), one body for every store: two
/// node agents run two jobs to completion at once, bad input is named, and a hung agent (stopped
/// with SIGSTOP: its stream stays open, its heartbeats stop) is failed after the heartbeat
/// timeout with its job, while the other node stays healthy. `live`, where the store can be read
/// while the coordinator runs, says whether a node's liveness key is in the store.
fn two_node_agents_run_jobs(
    dir: &std::path::Path,
    store: &str,
    live: Option<&dyn Fn(&str) -> bool>,
) {
    let timeout = HEARTBEAT_TIMEOUT_MS.to_string();
    let (_coordinator, url) =
        start_coordinator_with(&["--store", store, "--heartbeat-timeout-ms", &timeout]);
    let mut w1 = Background::start(&["worker", "--coordinator", &url, "--node", "n1"]);
    let mut w2 = Background::start(&["worker", "--coordinator", &url, "--node", "n2"]);
    wait_for_nodes(&url, 2);
    if let Some(live) = live {
        assert!(live("n1") && live("n2"), "both nodes are live in the store");
    }

    let a = submit(&url, &job_file(dir, "a", 3));
    let b = submit(&url, &job_file(dir, "b", 3));
    for id in [&a, &b] {
        let out = run_shoal(&["watch", id, "--coordinator", &url, "--json"]);
        assert!(
            out.status.success(),
            "watch {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("\"succeeded\""), "{text}");
    }
    let all = jobs(&url);
    assert_eq!(all.len(), 2);
    let mut placed_on: Vec<String> = Vec::new();
    for j in &all {
        assert_eq!(j["state"], "succeeded", "{j}");
        assert_eq!(j["step"], 3, "{j}");
        placed_on.push(
            j["placement"][0]["node"]
                .as_str()
                .expect("placed")
                .to_string(),
        );
    }
    // Both jobs ran at once, one per node (each node offers one device).
    placed_on.sort();
    assert_eq!(placed_on, ["n1", "n2"]);
    for name in ["a", "b"] {
        assert!(
            dir.join(name)
                .join("checkpoint")
                .join("config.json")
                .is_file()
        );
    }

    // Bad input through the CLI: the field path and a non-zero exit.
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "name = \"bad\"\n[training]\nbatch = 3\n").expect("write");
    let out = run_shoal(&[
        "submit",
        bad.to_str().expect("utf-8"),
        "--coordinator",
        &url,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("spec.training.batch"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_shoal(&["status", "job-404", "--coordinator", &url]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));

    // A hung agent: its job fails after the heartbeat timeout, naming the node and the timeout.
    let long = submit(&url, &job_file(dir, "long", 100_000));
    let deadline = Instant::now() + Duration::from_secs(30);
    let node = loop {
        let all = jobs(&url);
        let j = all
            .iter()
            .find(|j| j["id"] == long.as_str())
            .expect("listed");
        if j["state"] == "running" {
            break j["placement"][0]["node"]
                .as_str()
                .expect("placed")
                .to_string();
        }
        assert!(Instant::now() < deadline, "long job never ran: {all:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let (hung, other) = if node == "n1" {
        (&mut w1, "n2")
    } else {
        (&mut w2, "n1")
    };
    signal(hung, "-STOP");
    let stopped = Instant::now();
    let deadline = stopped + Duration::from_secs(30);
    // The job recovers: its record says why, and it runs again on the other node.
    let reason = loop {
        let all = jobs(&url);
        let j = all
            .iter()
            .find(|j| j["id"] == long.as_str())
            .expect("listed");
        if let Some(r) = j["recoveries"].get(0) {
            break r["cause"].as_str().unwrap_or("").to_string();
        }
        assert_eq!(j["state"], "running", "{j}");
        assert!(Instant::now() < deadline, "hung agent not noticed: {j}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let noticed = stopped.elapsed();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all = jobs(&url);
        let j = all
            .iter()
            .find(|j| j["id"] == long.as_str())
            .expect("listed");
        if j["state"] == "running" && j["placement"][0]["node"] == other {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the job did not move to {other}: {j}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        reason,
        format!("node {node} sent no heartbeat for {HEARTBEAT_TIMEOUT_MS} ms (heartbeat timeout)")
    );
    // Its last heartbeat came about one interval (500 ms) before the stop, later under load.
    assert!(
        noticed >= Duration::from_millis(HEARTBEAT_TIMEOUT_MS - 1000),
        "failed {noticed:?} after the stop"
    );
    let all = nodes(&url);
    let state = |n: &str| {
        all.as_array()
            .expect("array")
            .iter()
            .find(|v| v["name"] == n)
            .map(|v| v["state"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(state(&node).as_deref(), Some("failed"), "{all}");
    assert_eq!(state(other).as_deref(), Some("healthy"), "{all}");
    if let Some(live) = live {
        assert!(!live(&node), "the hung node's liveness key is gone");
        assert!(live(other), "the other node is still live");
    }
    // Resumed, the agent finds its session closed (ABORTED), stops the job's old attempt and
    // attaches again as a fresh session of the node, which is healthy again.
    let epoch = |all: &serde_json::Value| {
        all.as_array()
            .expect("array")
            .iter()
            .find(|v| v["name"] == node.as_str())
            .and_then(|v| v["epoch"].as_u64())
            .expect("epoch")
    };
    let fenced = epoch(&all);
    signal(hung, "-CONT");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let all = nodes(&url);
        let back = all.as_array().expect("array").iter().any(|v| {
            v["name"] == node.as_str()
                && v["state"] == "healthy"
                && v["epoch"].as_u64() > Some(fenced)
        });
        if back {
            break;
        }
        assert!(
            hung.child.try_wait().expect("try_wait").is_none(),
            "the resumed agent exited"
        );
        assert!(
            Instant::now() < deadline,
            "the resumed agent did not attach again: {all}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let j = jobs(&url)
        .into_iter()
        .find(|j| j["id"] == long.as_str())
        .expect("listed");
    assert!(
        j["state"] == "running" && j["placement"][0]["node"] == other,
        "the job stays where it recovered: {j}"
    );
    assert_eq!(j["recoveries"].as_array().map(Vec::len), Some(1), "{j}");
}

#[test]
fn jobs_run_to_completion_on_two_node_agents() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    // The coordinator holds the embedded store's file: nothing else can read it meanwhile.
    two_node_agents_run_jobs(dir.path(), store.to_str().expect("utf-8"), None);
}

#[cfg(feature = "etcd")]
#[test]
fn jobs_run_to_completion_on_two_node_agents_with_etcd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = shoal_tests::Etcd::start(dir.path());
    let live = |node: &str| etcd.has_key(&format!("shoal/live/{node}"));
    two_node_agents_run_jobs(
        dir.path(),
        &format!("etcd://{}", etcd.endpoint),
        Some(&live),
    );
}

#[test]
fn a_killed_node_agents_job_waits_for_it_to_return_and_keeps_its_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_coordinator, url) = start_coordinator(dir.path());
    let mut w1 = Background::start(&["worker", "--coordinator", &url, "--node", "n1"]);
    wait_for_nodes(&url, 1);

    let long = submit(&url, &job_file(dir.path(), "long", 100_000));
    let queued = submit(&url, &job_file(dir.path(), "queued", 2));
    // Wait until the long job runs; the second waits behind it (one device).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let all = jobs(&url);
        if all[0]["state"] == "running" {
            assert_eq!(all[1]["state"], "pending");
            let reason = all[1]["reason"].as_str().unwrap_or("");
            assert!(
                reason.contains("queued behind") || reason.contains("not enough devices"),
                "{reason}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "long job never ran: {all:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    w1.kill();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let all = jobs(&url);
        let why = all[0]["reason"].as_str().unwrap_or("");
        if all[0]["state"] == "pending" {
            // Recovering, waiting for devices, still at the head of the queue.
            assert!(
                why.starts_with("recovering: waiting for devices"),
                "{all:?}"
            );
            assert_eq!(all[0]["recoveries"][0]["cause"], "node n1 lost", "{all:?}");
            assert_eq!(all[1]["reason"], "queued behind job-1", "{all:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "kill not noticed: {all:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A fresh agent for the node (a new session, a higher epoch): the recovering job runs
    // again there; once it is cancelled the queued job runs.
    let _w1b = Background::start(&["worker", "--coordinator", &url, "--node", "n1"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let all = jobs(&url);
        if all[0]["state"] == "running"
            && all[0]["recoveries"][0]["resumed_unix_ms"].as_u64() > Some(0)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not recovered: {all:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = run_shoal(&["cancel", &long, "--coordinator", &url]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_shoal(&["watch", &queued, "--coordinator", &url]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_shoal(&["nodes", "--coordinator", &url, "--json"]);
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(nodes[0]["epoch"], 2, "{nodes}");
}

#[test]
fn shoal_up_runs_a_local_cluster_and_stops_cleanly_on_ctrl_c() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let mut up = Background::start(&[
        "up",
        "--nodes",
        "2",
        "--gpus-per-node",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--store",
        store.to_str().expect("utf-8"),
    ]);
    let line = up.first_line();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    wait_for_nodes(&url, 2);
    let id = submit(&url, &job_file(dir.path(), "up", 2));
    let out = run_shoal(&["watch", &id, "--coordinator", &url]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A cordoned node takes no new jobs: the next one goes to the other node.
    let out = run_shoal(&["cordon", "local-0", "--coordinator", &url, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(n["state"], "cordoned", "{n}");
    let id = submit(&url, &job_file(dir.path(), "after-cordon", 2));
    let out = run_shoal(&["watch", &id, "--coordinator", &url]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_shoal(&["status", &id, "--coordinator", &url, "--json"]);
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(job["placement"][0]["node"], "local-1", "{job}");
    let out = run_shoal(&["drain", "nope", "--coordinator", &url]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nope"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Ctrl-C (SIGINT) stops the workers and the coordinator, and `shoal up` exits 0.
    let pid = up.child.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill -INT");
    assert!(sent.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let status = loop {
        if let Some(s) = up.child.try_wait().expect("try_wait") {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "shoal up did not stop"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let out = run_shoal(&["nodes", "--coordinator", &url]);
    assert!(
        !out.status.success(),
        "the coordinator still answers after Ctrl-C"
    );
}

/// Submits a dp 2 job `name` of `steps` steps (`training` and `checkpointing` options given
/// as TOML lines) to two node agents, and waits until it runs past step `past`; its id.
fn start_pair_job(
    url: &str,
    dir: &std::path::Path,
    name: &str,
    training: &str,
    checkpointing: &str,
    past: u64,
) -> String {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"{name}\"\nprecision = \"fp32\"\n[training]\n{training}\n\
             [parallelism]\ndp = 2\nmicro_batches = 1\n[checkpointing]\ndir = \"{}\"\n{checkpointing}\n",
            dir.join(name).display()
        ),
    )
    .expect("job file");
    let id = submit(url, &path);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let j = jobs(url).into_iter().find(|j| j["id"] == id.as_str());
        if j.as_ref()
            .is_some_and(|j| j["state"] == "running" && j["step"].as_u64() >= Some(past))
        {
            return id;
        }
        assert!(std::time::Instant::now() < deadline, "never ran: {j:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// An etcd restart (SIGKILL, down for a second, started again on the same data) while a job
/// spans two node agents: the coordinator keeps its sessions and the job, which finishes
/// without a recovery, and the store holds its outcome.
#[cfg(feature = "etcd")]
#[test]
fn a_job_survives_an_etcd_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut etcd = shoal_tests::Etcd::start(dir.path());
    let store = format!("etcd://{}", etcd.endpoint);
    let (_coordinator, url) = start_coordinator_with(&["--store", &store]);
    let _w1 = Background::start(&["worker", "--coordinator", &url, "--node", "n1"]);
    let _w2 = Background::start(&["worker", "--coordinator", &url, "--node", "n2"]);
    wait_for_nodes(&url, 2);
    let id = start_pair_job(
        &url,
        dir.path(),
        "wide",
        "steps = 30\nseq_len = 32\nbatch = 2",
        "interval = 5",
        3,
    );
    etcd.restart(std::time::Duration::from_secs(1));
    // Still mid-run once etcd is back: the outage fell inside the job.
    let j = jobs(&url)
        .into_iter()
        .find(|j| j["id"] == id.as_str())
        .expect("job");
    assert!(
        j["state"] == "running" && j["step"].as_u64() < Some(30),
        "{j}"
    );
    let o = run_shoal(&["watch", &id, "--coordinator", &url]);
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let j = jobs(&url)
        .into_iter()
        .find(|j| j["id"] == id.as_str())
        .expect("job");
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["recoveries"].as_array().map(Vec::len), Some(0), "{j}");
    assert!(
        etcd.has_key(&format!("shoal/jobs/{id}")),
        "the outcome is stored"
    );
    let steps: Vec<u64> = std::fs::read_to_string(dir.path().join("wide").join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["step"].as_u64())
        .collect();
    assert_eq!(steps, (1..=30).collect::<Vec<u64>>());
}

/// Coordinator high availability: two coordinators on one etcd elect a leader, and only it
/// listens. Two node agents that know both URLs run a dp 2 job; the leader is killed with
/// SIGKILL mid-run. The standby takes the lead once the dead leader's lease expires, the agents
/// attach to it naming their job, and it adopts the job: the same workers finish it without a
/// recovery, every step taken once.
#[cfg(feature = "etcd")]
#[test]
fn a_standby_coordinator_takes_over_from_a_killed_leader_and_the_job_runs_on() {
    use std::sync::mpsc;
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = shoal_tests::Etcd::start(dir.path());
    let store = format!("etcd://{}", etcd.endpoint);
    let (pa, pb) = (shoal_tests::free_port(), shoal_tests::free_port());
    let lease_ms = 3000u64;
    let coordinator = |name: &str, port: u16| {
        Background::start(&[
            "coordinator",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--store",
            &store,
            "--name",
            name,
            "--leader-lease-ms",
            &lease_ms.to_string(),
            "--heartbeat-timeout-ms",
            "3000",
        ])
    };
    let mut a = coordinator("a", pa);
    let line = a.first_line();
    assert!(line.contains("leading as a"), "{line}");
    // The standby prints its first line only once it leads.
    let mut b = coordinator("b", pb);
    let (led_tx, led) = mpsc::channel();
    let mut b_out = b.child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut reader = std::io::BufReader::new(&mut b_out);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = led_tx.send((line, Instant::now()));
        let mut sink = String::new();
        while reader.read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    });
    let urls = format!("http://127.0.0.1:{pa},http://127.0.0.1:{pb}");
    let w1 = Background::start(&["worker", "--coordinator", &urls, "--node", "n1"]);
    let w2 = Background::start(&["worker", "--coordinator", &urls, "--node", "n2"]);
    wait_for_nodes(&urls, 2);
    assert!(
        led.recv_timeout(Duration::from_millis(300)).is_err(),
        "the standby leads while the leader lives"
    );
    let steps = 150u64;
    let id = start_pair_job(
        &urls,
        dir.path(),
        "ha",
        &format!("steps = {steps}\nseq_len = 32\nbatch = 2"),
        "interval = 10",
        5,
    );
    let before = jobs(&urls)
        .into_iter()
        .find(|j| j["id"] == id.as_str())
        .expect("job")["step"]
        .as_u64()
        .unwrap_or(0);
    // A watcher through the leader follows the failover.
    let mut watcher = Background::start(&["watch", &id, "--coordinator", &urls, "--json"]);
    std::thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    a.kill();
    let (line, led_at) = led
        .recv_timeout(Duration::from_secs(20))
        .expect("the standby took the lead");
    assert!(line.contains("leading as b"), "{line}");
    let takeover = led_at - killed;
    assert!(
        takeover < Duration::from_millis(lease_ms + 4000),
        "took the lead {takeover:?} after the kill (lease {lease_ms} ms)"
    );
    // The new leader adopted the job, which reports progress to it.
    let resumed = loop {
        let j = jobs(&urls)
            .into_iter()
            .find(|j| j["id"] == id.as_str())
            .expect("job");
        let adopted = j["reason"].as_str().is_some_and(|r| r.contains("adopted"));
        if adopted && j["step"].as_u64() > Some(before) {
            assert_eq!(j["state"], "running", "{j}");
            break Instant::now() - killed;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "not adopted: {j}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!(
        "coordinator failover: lead taken {} ms after SIGKILL (lease {lease_ms} ms), job heard \
         from again after {} ms",
        takeover.as_millis(),
        resumed.as_millis()
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    let watched = loop {
        if let Some(s) = watcher.child.try_wait().expect("try_wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "the watcher never ended");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        watched.success(),
        "the watcher saw the job fail: {watched:?}"
    );
    let j = jobs(&urls)
        .into_iter()
        .find(|j| j["id"] == id.as_str())
        .expect("job");
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["recoveries"].as_array().map(Vec::len), Some(0), "{j}");
    // The same worker processes ran it throughout, each step once.
    let (mut w1, mut w2) = (w1, w2);
    for w in [&mut w1, &mut w2] {
        assert!(
            w.child.try_wait().expect("try_wait").is_none(),
            "a worker exited"
        );
    }
    let taken: Vec<u64> = std::fs::read_to_string(dir.path().join("ha").join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["step"].as_u64())
        .collect();
    assert_eq!(taken, (1..=steps).collect::<Vec<u64>>());
}

/// A straggler for real: one of the two node agents of a dp 2 job is stopped two thirds of the
/// time (SIGSTOP for 100 ms, SIGCONT for 50 ms); the other waits for it at every collective,
/// and the coordinator flags the slow one, and only it, in the job's events.
#[test]
fn a_node_agent_slowed_by_stops_is_flagged_as_a_straggler() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_coordinator, url) = start_coordinator(dir.path());
    let _w1 = Background::start(&["worker", "--coordinator", &url, "--node", "n1"]);
    let w2 = Background::start(&["worker", "--coordinator", &url, "--node", "n2"]);
    wait_for_nodes(&url, 2);
    let id = start_pair_job(
        &url,
        dir.path(),
        "pair",
        "steps = 30\nseq_len = 64\nbatch = 4",
        "",
        2,
    );
    let pid = w2.child.id().to_string();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slow = {
        let done = std::sync::Arc::clone(&done);
        std::thread::spawn(move || {
            let kill = |sig: &str| {
                let _ = std::process::Command::new("kill")
                    .args([sig, &pid])
                    .status();
            };
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                kill("-STOP");
                std::thread::sleep(std::time::Duration::from_millis(100));
                kill("-CONT");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            kill("-CONT");
        })
    };
    let o = run_shoal(&["watch", &id, "--coordinator", &url, "--json"]);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    slow.join().expect("the slowing thread");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let flagged: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("straggler").is_some())
        .collect();
    assert!(!flagged.is_empty(), "no straggler flagged: {text}");
    for f in &flagged {
        assert_eq!(f["straggler"], "n2", "{text}");
        let ratio = f["busy_s"].as_f64().unwrap_or(0.0) / f["peers_busy_s"].as_f64().unwrap_or(1.0);
        assert!(ratio > 1.5, "{f}");
    }
}

/// A network namespace holding one end of a veth pair whose other end is in this one: the
/// namespace's processes reach this one's at `host` and are reached at `inside`. Removed when
/// dropped.
struct Netns {
    name: String,
    inner_link: String,
    host: String,
    inside: String,
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {} (network namespaces need root, or CAP_NET_ADMIN)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl Netns {
    fn create() -> Self {
        let id = std::process::id();
        let name = format!("shoal-{id}");
        let (host_link, inner_link) = (
            format!("shv{}h", id % 100_000),
            format!("shv{}n", id % 100_000),
        );
        let net = format!("10.213.{}", id % 250);
        let (host, inside) = (format!("{net}.1"), format!("{net}.2"));
        ip(&["netns", "add", &name]);
        let ns = Self {
            name,
            inner_link,
            host,
            inside,
        };
        ip(&[
            "link",
            "add",
            &host_link,
            "type",
            "veth",
            "peer",
            "name",
            &ns.inner_link,
        ]);
        ip(&["link", "set", &ns.inner_link, "netns", &ns.name]);
        ip(&["addr", "add", &format!("{}/30", ns.host), "dev", &host_link]);
        ip(&["link", "set", &host_link, "up"]);
        ns.exec_ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.inside),
            "dev",
            &ns.inner_link,
        ]);
        ns.exec_ip(&["link", "set", &ns.inner_link, "up"]);
        ns.exec_ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn exec_ip(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.name, "ip"];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Takes the namespace's end of the link down (`false`) or up: down, every packet between
    /// the namespace and this one is dropped, both ways, and nothing is closed.
    fn link(&self, up: bool) {
        self.exec_ip(&[
            "link",
            "set",
            &self.inner_link,
            if up { "up" } else { "down" },
        ]);
    }

    /// `shoal ARGS` run inside the namespace.
    fn shoal(&self, args: &[&str]) -> Background {
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &self.name])
            .arg(shoal_tests::shoal_bin())
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start shoal in the namespace");
        Background { child }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and with it the pair.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The steps' losses a job wrote to its `metrics.jsonl`, in order.
fn losses(dir: &std::path::Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_u64()?, v["loss"].as_f64()?)))
        .collect()
}

/// A network cut between two nodes for real: node agent n2 runs in its own network namespace,
/// and its link is taken down mid-run, so that every packet between it and the rest is dropped
/// and nothing is closed (neither its session nor its data-plane links break; they go silent).
/// The coordinator fails n2 by its heartbeat timeout and the job recovers from its last
/// checkpoint (on n3, or on n2 again if it is back by then: its HTTP/2 keep-alives found its
/// session dead, and it attaches again once the link is up) and ends with the losses of the
/// same job run without the cut.
#[test]
fn a_network_cut_made_with_a_network_namespace_is_recovered_from() {
    let ns = Netns::create();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let mut c = Background::start(&[
        "coordinator",
        "--listen",
        &format!("{}:0", ns.host),
        "--store",
        store.to_str().expect("utf-8"),
        "--heartbeat-timeout-ms",
        "2000",
    ]);
    let url = shoal_tests::url_in(&c.first_line());
    let host_data = format!("{}:0", ns.host);
    let inside_data = format!("{}:0", ns.inside);
    let _n1 = Background::start(&[
        "worker",
        "--coordinator",
        &url,
        "--node",
        "n1",
        "--data-addr",
        &host_data,
    ]);
    let _n2 = ns.shoal(&[
        "worker",
        "--coordinator",
        &url,
        "--node",
        "n2",
        "--data-addr",
        &inside_data,
    ]);
    wait_for_nodes(&url, 2);
    let training = "steps = 40\nseq_len = 32\nbatch = 2";
    // The job without a cut, across the namespaces.
    let reference = start_pair_job(&url, dir.path(), "reference", training, "interval = 5", 0);
    let o = run_shoal(&["watch", &reference, "--coordinator", &url]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The same job again, cut mid-run, with n3 free to take n2's place.
    let id = start_pair_job(&url, dir.path(), "cut", training, "interval = 5", 7);
    let _n3 = Background::start(&[
        "worker",
        "--coordinator",
        &url,
        "--node",
        "n3",
        "--data-addr",
        &host_data,
    ]);
    wait_for_nodes(&url, 3);
    let cut = Instant::now();
    ns.link(false);
    // Once the job is recovering, the link comes back (within n2's 30 s of trying to attach
    // again, after which an agent stops its jobs and exits).
    loop {
        let j = jobs(&url)
            .into_iter()
            .find(|j| j["id"] == id.as_str())
            .expect("job");
        if j["recoveries"].as_array().is_some_and(|r| !r.is_empty()) {
            break;
        }
        assert!(
            cut.elapsed() < Duration::from_secs(20),
            "the cut was not noticed: {j}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    ns.link(true);
    let o = run_shoal(&["watch", &id, "--coordinator", &url]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j = jobs(&url)
        .into_iter()
        .find(|j| j["id"] == id.as_str())
        .expect("job");
    let r = &j["recoveries"][0];
    assert_eq!(j["recoveries"].as_array().map(Vec::len), Some(1), "{j}");
    let cause = r["cause"].as_str().unwrap_or_default();
    assert!(
        cause.contains("n2") && cause.contains("heartbeat"),
        "{cause}"
    );
    let detected = r["detected_unix_ms"].as_u64().expect("detected");
    let cut_ms = shoal_tests_now_ms() - cut.elapsed().as_millis() as u64;
    eprintln!(
        "fault matrix | network cut (namespace link down) | detection {} ms | recovery {} ms | steps redone {} | restored step {}",
        detected.saturating_sub(cut_ms),
        r["recovery_ms"],
        r["steps_redone"],
        r["restored_step"]
    );
    // Every step once, each with the uninterrupted run's loss.
    assert_eq!(
        losses(&dir.path().join("cut")),
        losses(&dir.path().join("reference"))
    );
    // With the link back, n2 attached again as a fresh session.
    wait_for_nodes(&url, 3);
}

fn shoal_tests_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// SIGTERM (what systemd and Kubernetes send) stops a coordinator promptly even with a node
/// agent attached and a job running: it ends the sessions instead of waiting on them, and
/// leaves the job as stored, so a coordinator started again on the same store adopts it where
/// it runs and the job ends without a recovery.
#[test]
fn a_coordinator_stops_on_sigterm_and_the_next_one_adopts_its_running_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let port = shoal_tests::free_port();
    let listen = format!("127.0.0.1:{port}");
    let start = || {
        let mut c = Background::start(&[
            "coordinator",
            "--listen",
            &listen,
            "--store",
            store.to_str().expect("utf-8"),
        ]);
        c.first_line();
        c
    };
    let mut c = start();
    let url = format!("http://{listen}");
    let _w = Background::start(&["worker", "--coordinator", &url, "--node", "n1"]);
    wait_for_nodes(&url, 1);
    let id = submit(&url, &job_file(dir.path(), "long", 60));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !jobs(&url)
        .iter()
        .any(|j| j["id"] == id && j["step"].as_u64().unwrap_or(0) >= 2)
    {
        assert!(Instant::now() < deadline, "the job never ran");
        std::thread::sleep(Duration::from_millis(100));
    }
    signal(&c, "-TERM");
    let began = Instant::now();
    let status = loop {
        if let Some(s) = c.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "still running 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let stopped = began.elapsed();

    let _c2 = start();
    let o = run_shoal(&["watch", &id, "--coordinator", &url]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j = jobs(&url)
        .into_iter()
        .find(|j| j["id"] == id)
        .expect("the job");
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(
        j["recoveries"].as_array().map(Vec::len),
        Some(0),
        "adopted, not recovered: {j}"
    );
    eprintln!("coordinator stopped {stopped:?} after SIGTERM");
}
