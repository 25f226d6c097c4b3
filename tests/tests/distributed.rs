//! Jobs whose ranks span node agents (separate processes): pipeline, data- and expert-parallel
//! ranks on two nodes meet over TCP and train what one process trains; a job whose node agent is
//! killed with SIGKILL mid-run waits for devices and continues from its checkpoint when a node
//! joins.

use std::time::{Duration, Instant};

use shoal_tests::start_worker as worker;
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

/// One process, one rank.
const ONE_RANK: [&str; 8] = ["--nodes", "1", "--pp", "1", "--dp", "1", "--ep", "1"];

/// `shoal train` of 3 steps (4 when resuming) of 8 x 32 tokens into `dir/name` with `extra`
/// flags; its JSON summary.
fn train_json(dir: &std::path::Path, name: &str, extra: &[&str]) -> serde_json::Value {
    let out = dir.join(name).display().to_string();
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
}

#[test]
fn two_node_agents_train_what_one_process_trains() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |name: &str, extra: &[&str]| {
        let mut args = vec!["--precision", "fp32"];
        args.extend_from_slice(extra);
        train_json(dir.path(), name, &args)
    };
    let mut one = ONE_RANK.to_vec();
    one.extend(["--micro-batches", "4"]);
    let single = run("single", &one);
    let two = run(
        "two",
        &[
            "--nodes",
            "2",
            "--pp",
            "1",
            "--dp",
            "4",
            "--ep",
            "2",
            "--micro-batches",
            "1",
        ],
    );
    // The main job's shape, by default: 2 nodes x 2 devices, DualPipe over 2 stages (one per
    // node), 2 data-parallel ranks in one expert-parallel group per stage.
    let main = run("main", &[]);
    assert_eq!(main["cluster"]["nodes"], 2, "{main}");
    assert_eq!(main["cluster"]["gpus_per_node"], 2, "{main}");
    let par = &main["parallelism"];
    assert_eq!(
        (&par["pp"], &par["dp"], &par["ep"], &par["schedule"]),
        (&2.into(), &2.into(), &2.into(), &"dualpipe".into()),
        "{main}"
    );
    let a = losses(&single);
    assert_eq!(a.len(), 3);
    for v in [&two, &main] {
        let b = losses(v);
        for (x, y) in a.iter().zip(&b) {
            assert!(((x - y) / x).abs() < 1e-5, "{a:?} against {b:?}");
        }
        // Node 0's ranks reached node 1's over TCP (the gradient reduce-scatter and the
        // expert loads at least; pipeline transfers in the main shape), and their own node's
        // through memory.
        assert!(v["bytes_moved"]["tcp"].as_u64().unwrap_or(0) > 0, "{v}");
        assert!(v["bytes_moved"]["shm"].as_u64().unwrap_or(0) > 0, "{v}");
    }
    assert!(
        main["trace"]
            .as_str()
            .is_some_and(|p| std::path::Path::new(p).is_file()),
        "{main}"
    );
    // One checkpoint, with every stage's layers and every expert: one process resumes it for a
    // fourth step, the same step as from the single process's checkpoint.
    let from = |v: &serde_json::Value, name: &str| {
        let ckpt = v["checkpoint"].as_str().expect("checkpoint").to_string();
        let mut args = vec!["--resume", &ckpt, "--micro-batches", "4"];
        args.extend(ONE_RANK);
        losses(&run(name, &args))
    };
    let r1 = from(&single, "from-one");
    for (v, name) in [(&two, "from-two"), (&main, "from-main")] {
        let r = from(v, name);
        assert_eq!(r.len(), 1);
        assert!(
            ((r[0] - r1[0]) / r1[0]).abs() < 1e-5,
            "{name}: {r:?} against {r1:?}"
        );
    }
}

/// The main job as it runs by default, in fp8 (FP8 dispatch, BF16 combine and pipeline
/// transfers), against one process in fp8: the documented tolerance, 5e-4 relative.
#[test]
fn the_default_main_job_in_fp8_stays_within_tolerance_of_one_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |name: &str, extra: &[&str]| train_json(dir.path(), name, extra);
    let mut one = ONE_RANK.to_vec();
    one.extend(["--micro-batches", "4"]);
    let single = run("single", &one);
    let main = run("main", &[]);
    assert_eq!(main["precision"], "fp8", "{main}");
    let (a, b) = (losses(&single), losses(&main));
    assert_eq!((a.len(), b.len()), (3, 3));
    for (x, y) in a.iter().zip(&b) {
        assert!(((x - y) / x).abs() < 5e-4, "{a:?} against {b:?}");
    }
}

/// Node agents of two CPU devices each, attached to `url` and registered.
fn start_workers(url: &str, names: &[&str]) -> Vec<Background> {
    let workers = names.iter().map(|n| worker(url, n)).collect();
    wait_for_nodes(url, names.len());
    workers
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
fn a_job_whose_node_is_killed_waits_for_devices_and_continues_when_a_node_joins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_coordinator, url) = start_coordinator(dir.path());
    let _w1 = worker(&url, "n1");
    let mut w2 = worker(&url, "n2");
    wait_for_nodes(&url, 2);
    let path = dir.path().join("wide.toml");
    std::fs::write(
        &path,
        format!(
            "name = \"wide\"\nprecision = \"fp32\"\n[training]\nsteps = 8\nseq_len = 32\nbatch = 4\n[parallelism]\ndp = 4\nep = 2\nmicro_batches = 1\n[checkpointing]\ndir = \"{}\"\ninterval = 2\n",
            dir.path().join("wide").display()
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
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    // Running, and past its first checkpoint.
    wait_for_job(&url, &id, Duration::from_secs(60), |j| {
        j["state"] == "running" && j["step"].as_u64().unwrap_or(0) >= 3
    });
    w2.kill();
    // Its four ranks no longer fit on the surviving node: it waits, recovering, for devices.
    let j = wait_for_job(&url, &id, Duration::from_secs(20), |j| {
        j["state"] == "pending"
    });
    let reason = j["reason"].as_str().unwrap_or("");
    assert!(reason.contains("recovering"), "{j}");
    // A fresh node joins: the job is placed again and continues from its checkpoint.
    let _w3 = worker(&url, "n3");
    let o = run_shoal(&["watch", &id, "--coordinator", &url]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics =
        std::fs::read_to_string(dir.path().join("wide").join("metrics.jsonl")).expect("metrics");
    let steps: Vec<u64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["step"].as_u64())
        .collect();
    assert_eq!(steps, (1..=8).collect::<Vec<u64>>(), "every step once");
}

/// A job placed by a coordinator on two node agents with pipeline stages on different nodes:
/// `shoal trace` writes one Chrome trace of its second step, one process per node, a track per
/// device, every node's spans on rank 0's clock.
#[test]
fn shoal_trace_gathers_every_nodes_timeline_into_one_chrome_trace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_coordinator, url) = start_coordinator(dir.path());
    let _workers = start_workers(&url, &["n1", "n2"]);
    let path = dir.path().join("job.toml");
    std::fs::write(
        &path,
        format!(
            "name = \"traced\"\n[training]\nsteps = 3\nseq_len = 32\nbatch = 8\n[parallelism]\npp = 2\ndp = 2\nep = 2\nschedule = \"dualpipe\"\nmicro_batches = 4\n[checkpointing]\ndir = \"{}\"\n",
            dir.path().join("traced").display()
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
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let o = run_shoal(&["watch", &id, "--coordinator", &url]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let out = dir.path().join("trace.json");
    let o = run_shoal(&[
        "trace",
        &id,
        "-o",
        out.to_str().expect("utf-8"),
        "--coordinator",
        &url,
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary = last_json(&o);
    assert_eq!(summary["processes"], 2, "{summary}");
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&out).expect("trace written")).expect("json");
    let events = v["traceEvents"].as_array().expect("events");
    for pid in 0..2 {
        let spans: Vec<&serde_json::Value> = events
            .iter()
            .filter(|e| e["ph"] == "X" && e["pid"] == pid)
            .collect();
        // Each node ran its stage's operations, its experts' dispatch and the collectives.
        for name in ["F0.0", "dispatch(F)", "combine(B)", "attn(F)", "collective"] {
            assert!(
                spans.iter().any(|e| e["name"] == name),
                "node {pid} has no {name} span"
            );
        }
        // Two devices per node, each a track, and each a second stream where DualPipe's
        // overlapped pairs ran their forward chunks.
        let tracks = |second: bool| {
            events
                .iter()
                .filter(|e| {
                    e["name"] == "thread_name"
                        && e["pid"] == pid
                        && e["args"]["name"].as_str().is_some_and(|n| {
                            n.starts_with("device-") && n.ends_with("-fwd") == second
                        })
                })
                .count()
        };
        assert_eq!(tracks(false), 2, "node {pid}");
        assert_eq!(tracks(true), 2, "node {pid}");
    }
    // The nodes' steps overlap on the shared clock: each starts within a second of the other.
    let start = |pid: u64| {
        events
            .iter()
            .filter(|e| e["ph"] == "X" && e["pid"] == pid)
            .filter_map(|e| e["ts"].as_f64())
            .fold(f64::INFINITY, f64::min)
    };
    assert!(
        (start(0) - start(1)).abs() < 1e6,
        "{} vs {}",
        start(0),
        start(1)
    );
    // An unknown job is named.
    let o = run_shoal(&["trace", "nope", "--coordinator", &url]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("nope"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Two jobs that both span nodes run at once on the same node agent: its one data-plane
/// listener hands each connection to the job's mesh it names. Three nodes of two devices, two
/// jobs of three data-parallel ranks: the middle node holds a rank of each.
#[test]
fn two_jobs_across_nodes_share_a_node_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_coordinator, url) = start_coordinator(dir.path());
    let _workers = start_workers(&url, &["n1", "n2", "n3"]);
    let ids: Vec<String> = ["first", "second"]
        .iter()
        .map(|name| {
            let path = dir.path().join(format!("{name}.toml"));
            std::fs::write(
                &path,
                format!(
                    "name = \"{name}\"\nprecision = \"fp32\"\n[training]\nsteps = 3\nseq_len = 32\nbatch = 6\n[parallelism]\ndp = 3\nmicro_batches = 1\n[checkpointing]\ndir = \"{}\"\n",
                    dir.path().join(name).display()
                ),
            )
            .expect("job file");
            let o = run_shoal(&["submit", path.to_str().expect("utf-8"), "--coordinator", &url]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            String::from_utf8_lossy(&o.stdout).trim().to_string()
        })
        .collect();
    // Both were placed at once, each on two nodes, sharing n2.
    let placed = |id: &str| {
        let j = wait_for_job(&url, id, Duration::from_secs(60), |j| {
            j["placement"].as_array().is_some_and(|p| !p.is_empty())
        });
        let mut nodes: Vec<String> = j["placement"]
            .as_array()
            .map(|p| {
                p.iter()
                    .filter_map(|r| r["node"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        nodes.sort();
        nodes.dedup();
        nodes
    };
    let (a, b) = (placed(&ids[0]), placed(&ids[1]));
    assert!(a.len() == 2 && b.len() == 2, "{a:?} {b:?}");
    assert!(a.iter().any(|n| b.contains(n)), "{a:?} {b:?}");
    for id in &ids {
        let o = run_shoal(&["watch", id, "--coordinator", &url]);
        assert!(
            o.status.success(),
            "{id}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// The report's elastic case as processes: a node agent killed, the job shrinks to the one
/// node left (dp 4 -> 2, `elasticity.min_dp = 2`, the global batch kept), a fresh node joins,
/// and at its next checkpoint the job grows back to dp 4; every step once, and the losses those
/// of a run that lost nothing.
#[test]
fn a_shrunk_job_grows_back_when_a_node_joins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_coordinator, url) = start_coordinator(dir.path());
    let _w1 = worker(&url, "n1");
    let mut w2 = worker(&url, "n2");
    wait_for_nodes(&url, 2);
    let job = |name: &str| {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "name = \"{name}\"\nprecision = \"fp32\"\n[training]\nsteps = 40\nseq_len = 32\nbatch = 4\n\
                 [parallelism]\ndp = 4\nep = 2\nmicro_batches = 1\n[checkpointing]\ndir = \"{}\"\ninterval = 2\n\
                 [elasticity]\nmin_dp = 2\n",
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
    let step_losses = |name: &str| -> Vec<(u64, f64)> {
        std::fs::read_to_string(dir.path().join(name).join("metrics.jsonl"))
            .expect("metrics")
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| {
                (
                    v["step"].as_u64().unwrap_or(0),
                    v["loss"].as_f64().unwrap_or(f64::NAN),
                )
            })
            .collect()
    };
    // The reference: the same job on both nodes, nothing lost.
    let whole = job("whole");
    let o = run_shoal(&["watch", &whole, "--coordinator", &url]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let id = job("elastic");
    wait_for_job(&url, &id, Duration::from_secs(60), |j| {
        j["state"] == "running" && j["step"].as_u64().unwrap_or(0) >= 3
    });
    w2.kill();
    // Shrunk onto n1 and running again.
    let j = wait_for_job(&url, &id, Duration::from_secs(30), |j| {
        j["recoveries"].as_array().is_some_and(|r| {
            r.first()
                .is_some_and(|r| r["dp_after"] == 2 && r["resumed_unix_ms"].as_u64() > Some(0))
        })
    });
    assert_eq!(j["recoveries"][0]["dp_before"], 4, "{j}");
    // A fresh node joins: back to dp 4 at the next checkpoint.
    let _w3 = worker(&url, "n3");
    let o = run_shoal(&["watch", &id, "--coordinator", &url]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j = wait_for_job(&url, &id, Duration::from_secs(10), |j| {
        j["state"] == "succeeded"
    });
    let recoveries = j["recoveries"].as_array().expect("recoveries");
    assert_eq!(recoveries.len(), 2, "{j}");
    let back = &recoveries[1];
    assert!(
        back["cause"]
            .as_str()
            .unwrap_or("")
            .contains("growing back"),
        "{j}"
    );
    assert_eq!(
        (back["dp_before"].clone(), back["dp_after"].clone()),
        (2.into(), 4.into()),
        "{j}"
    );
    // Growing back restores the checkpoint it was triggered at, on every node (the coordinator
    // names it), redoing only the steps run while that checkpoint was written in the
    // background: at most one interval (2), since the next snapshot waits for the write and
    // the commit is reported before the steps after it.
    let at: u64 = back["cause"]
        .as_str()
        .and_then(|c| c.rsplit("step ").next())
        .and_then(|n| n.trim().parse().ok())
        .expect("the checkpoint's step in the cause");
    assert_eq!(back["restored_step"], at, "{j}");
    assert!(back["steps_redone"].as_u64() <= Some(2), "{j}");
    let (a, b) = (step_losses("whole"), step_losses("elastic"));
    assert_eq!(
        b.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (1..=40).collect::<Vec<u64>>(),
        "every step once"
    );
    for ((s, x), (_, y)) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-3 * x.abs(), "step {s}: {x} against {y}");
    }
}
