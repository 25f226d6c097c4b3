//! Jobs whose ranks span node agents (separate processes): data- and expert-parallel ranks on
//! two nodes meet over TCP and train exactly what one process trains; a node agent killed with
//! SIGKILL mid-run fails the job, naming the node, instead of leaving its peers waiting.

use std::time::{Duration, Instant};

use shoal_tests::{Background, run_shoal, start_coordinator, wait_for_nodes};

fn last_json(o: &std::process::Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("")).unwrap_or_default()
}

fn losses(v: &serde_json::Value) -> Vec<f64> {
    v["losses"]
        .as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
        .unwrap_or_default()
}

#[test]
fn two_node_agents_train_what_one_process_trains() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name).display().to_string();
        let steps = if extra.contains(&"--resume") {
            "4"
        } else {
            "3"
        };
        let mut args = vec![
            "train",
            "--steps",
            steps,
            "--seq-len",
            "32",
            "--precision",
            "fp32",
            "--batch",
            "8",
            "--json",
            "--out",
            &out,
        ];
        args.extend_from_slice(extra);
        let o = run_shoal(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        last_json(&o)
    };
    let single = run("single", &["--micro-batches", "4"]);
    let two = run(
        "two",
        &[
            "--nodes",
            "2",
            "--dp",
            "4",
            "--ep",
            "2",
            "--micro-batches",
            "1",
        ],
    );
    let (a, b) = (losses(&single), losses(&two));
    assert_eq!(a.len(), 3);
    for (x, y) in a.iter().zip(&b) {
        assert!(((x - y) / x).abs() < 1e-5, "{a:?} against {b:?}");
    }
    // Node 0's ranks reached node 1's over TCP (the gradient reduce-scatter and the expert
    // loads at least), and their own node's through memory.
    assert!(two["bytes_moved"]["tcp"].as_u64().unwrap_or(0) > 0, "{two}");
    assert!(two["bytes_moved"]["shm"].as_u64().unwrap_or(0) > 0, "{two}");
    // One checkpoint, with every expert: one process resumes it for a fourth step, the same
    // step as from the single process's checkpoint.
    let from = |v: &serde_json::Value, name: &str| {
        let ckpt = v["checkpoint"].as_str().expect("checkpoint").to_string();
        let r = run(name, &["--resume", &ckpt, "--micro-batches", "4"]);
        losses(&r)
    };
    let (r2, r1) = (from(&two, "from-two"), from(&single, "from-one"));
    assert_eq!(r2.len(), 1);
    assert!(
        ((r2[0] - r1[0]) / r1[0]).abs() < 1e-5,
        "{r2:?} against {r1:?}"
    );
}

/// Polls job `id` until `done` holds (and returns it), failing after `within`.
fn wait_for_job(
    url: &str,
    id: &str,
    within: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let all = jobs(url);
        let j = all
            .iter()
            .find(|j| j["id"] == id)
            .cloned()
            .unwrap_or_default();
        if done(&j) {
            return j;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} after {within:?}: {all:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn jobs(url: &str) -> Vec<serde_json::Value> {
    let out = run_shoal(&["jobs", "--coordinator", url, "--json"]);
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

#[test]
fn a_killed_node_fails_a_job_that_spans_nodes_and_frees_the_survivor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_coordinator, url) = start_coordinator(dir.path());
    let _w1 = Background::start(&[
        "worker",
        "--coordinator",
        &url,
        "--node",
        "n1",
        "--devices",
        "cpu:2",
    ]);
    let mut w2 = Background::start(&[
        "worker",
        "--coordinator",
        &url,
        "--node",
        "n2",
        "--devices",
        "cpu:2",
    ]);
    wait_for_nodes(&url, 2);
    let job = |name: &str, steps: u64, dp: usize| {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "name = \"{name}\"\nprecision = \"fp32\"\n[training]\nsteps = {steps}\nseq_len = 32\nbatch = 4\n[parallelism]\ndp = {dp}\nep = {}\nmicro_batches = 1\n[checkpointing]\ndir = \"{}\"\n",
                dp.min(2),
                dir.path().join(name).display()
            ),
        )
        .expect("job file");
        let o = run_shoal(&[
            "submit",
            path.to_str().expect("utf-8"),
            "--coordinator",
            &url,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let long = job("wide", 100_000, 4);
    // Running, and past its first steps (the ranks have met over TCP).
    wait_for_job(&url, &long, Duration::from_secs(60), |j| {
        j["state"] == "running" && j["step"].as_u64().unwrap_or(0) >= 2
    });
    w2.kill();
    let j = wait_for_job(&url, &long, Duration::from_secs(20), |j| {
        j["state"] == "failed"
    });
    let reason = j["reason"].as_str().unwrap_or("");
    assert!(reason.contains("n2") || reason.contains("rank"), "{j}");
    // The surviving node is free again: a job of its two devices runs to the end.
    let small = job("after", 2, 2);
    let o = run_shoal(&["watch", &small, "--coordinator", &url]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
