//! The control plane as separate processes: a coordinator and node agents, jobs submitted and
//! watched through the CLI over gRPC, and a node agent killed with SIGKILL.

use shoal_tests::{Background, run_shoal, start_coordinator, wait_for_nodes};

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

#[test]
fn jobs_run_to_completion_on_two_node_agents() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_coordinator, url) = start_coordinator(dir.path());
    let _w1 = Background::start(&["worker", "--coordinator", &url, "--node", "n1"]);
    let _w2 = Background::start(&["worker", "--coordinator", &url, "--node", "n2"]);
    wait_for_nodes(&url, 2);

    let a = submit(&url, &job_file(dir.path(), "a", 3));
    let b = submit(&url, &job_file(dir.path(), "b", 3));
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
    let mut nodes: Vec<String> = Vec::new();
    for j in &all {
        assert_eq!(j["state"], "succeeded", "{j}");
        assert_eq!(j["step"], 3, "{j}");
        nodes.push(
            j["placement"][0]["node"]
                .as_str()
                .expect("placed")
                .to_string(),
        );
    }
    // Both jobs ran at once, one per node (each node offers one device).
    nodes.sort();
    assert_eq!(nodes, ["n1", "n2"]);
    for name in ["a", "b"] {
        assert!(
            dir.path()
                .join(name)
                .join("checkpoint")
                .join("config.json")
                .is_file()
        );
    }

    // Bad input through the CLI: the field path and a non-zero exit.
    let bad = dir.path().join("bad.toml");
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
}

#[test]
fn a_killed_node_agent_fails_its_job_and_the_queue_moves_on() {
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
        if all[0]["state"] == "failed" {
            assert!(
                all[0]["reason"].as_str().unwrap_or("").contains("n1"),
                "{all:?}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "kill not noticed: {all:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A fresh agent for the node (a new session, a higher epoch) takes the queued job.
    let _w1b = Background::start(&["worker", "--coordinator", &url, "--node", "n1"]);
    let out = run_shoal(&["watch", &queued, "--coordinator", &url]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_shoal(&["nodes", "--coordinator", &url, "--json"]);
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(nodes[0]["epoch"], 2, "{nodes}");
    let _ = long;
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
