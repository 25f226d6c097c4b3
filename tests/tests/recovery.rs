//! The fault matrix: `shoal train` (the main job's shape: two node agents of two devices,
//! DualPipe pp 2 x dp 2, ep 2) with one of its node agents killed with a real SIGKILL during
//! forward, backward, the expert-parallel dispatch and combine, and a checkpoint write; stopped
//! with SIGSTOP; cut off the network; given a full checkpoint disk; made to restore a corrupt
//! newest checkpoint; and lost for good, with and without a spare. Every run must finish, with
//! the final weights bit for bit those of a run that saw no failure (or, when the job shrank,
//! the same losses within tolerance). Each prints its detection time, recovery time and steps
//! redone.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use shoal_tests::shoal_bin;

const STEPS: &str = "8";
const EVERY: &str = "2";

/// A finished `shoal train`: its JSON summary, stderr and output directory.
struct Run {
    json: serde_json::Value,
    stderr: String,
    out: PathBuf,
}

impl Run {
    fn weights(&self) -> Vec<u8> {
        std::fs::read(self.out.join("checkpoint").join("model.safetensors")).expect("weights")
    }

    fn recoveries(&self) -> Vec<serde_json::Value> {
        self.json["recoveries"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Main loss of every step, from the metrics file (every attempt's steps, each once).
    fn losses(&self) -> Vec<f64> {
        std::fs::read_to_string(self.out.join("metrics.jsonl"))
            .expect("metrics")
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).expect("a metrics line")["main_loss"]
                    .as_f64()
                    .expect("main_loss")
            })
            .collect()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Starts `shoal train` into `dir/name` with `env` and `extra` flags.
fn start(dir: &Path, name: &str, env: &[(&str, String)], extra: &[&str]) -> (Child, PathBuf) {
    let out = dir.join(name);
    let mut cmd = Command::new(shoal_bin());
    cmd.args([
        "train",
        "--steps",
        STEPS,
        "--checkpoint-every",
        EVERY,
        "--seq-len",
        "64",
        "--batch",
        "8",
        "--json",
        "--out",
    ])
    .arg(&out)
    .args(extra)
    .env_remove("SHOAL_FAULT")
    .env_remove("SHOAL_FAULT_ONCE")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    (cmd.spawn().expect("start shoal train"), out)
}

fn finish(child: Child, out: PathBuf) -> Run {
    let o = child.wait_with_output().expect("shoal train output");
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "shoal train failed: {stderr}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let json = serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("JSON summary");
    Run { json, stderr, out }
}

/// The uninterrupted run every faulted one is compared with (computed once).
fn reference() -> &'static Run {
    static REF: OnceLock<(tempfile::TempDir, Run)> = OnceLock::new();
    &REF.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let (child, out) = start(dir.path(), "reference", &[], &[]);
        let run = finish(child, out);
        assert!(run.recoveries().is_empty());
        (dir, run)
    })
    .1
}

/// The pid of node agent `node` started by `train` (its child).
fn agent_pid(train: u32, node: &str) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // The parent pid is the 4th field, after the parenthesised command name.
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(train) {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if args
            .windows(2)
            .any(|w| w[0] == b"--node" && w[1] == node.as_bytes())
        {
            return Some(pid);
        }
    }
    None
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// Waits until `ready(out)` holds (polling), at most a minute.
fn wait_until(out: &Path, what: &str, ready: impl Fn(&Path) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready(out) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn steps_done(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// Checks the run recovered once and reports its figures; `failed_ms` is when the failure
/// happened (the kill), if known. Returns the recovery.
fn report(case: &str, run: &Run, failed_ms: Option<u64>) -> serde_json::Value {
    let rec = run.recoveries();
    assert_eq!(
        rec.len(),
        1,
        "{case}: one recovery expected: {}",
        run.stderr
    );
    let r = rec[0].clone();
    let detected = r["detected_unix_ms"].as_u64().expect("detected");
    let detect = failed_ms.map(|t| detected.saturating_sub(t));
    let redone = r["steps_redone"].as_u64().expect("steps_redone");
    assert!(
        redone <= 2,
        "{case}: at most a checkpoint interval redone: {r}"
    );
    assert!(r["resumed_unix_ms"].as_u64() > Some(0), "{case}: {r}");
    eprintln!(
        "fault matrix | {case:<34} | detection {:>6} ms | recovery {:>5} ms | steps redone {redone} | restored step {} | {}",
        detect.map_or("-".to_string(), |d| d.to_string()),
        r["recovery_ms"],
        r["restored_step"],
        r["cause"]
            .as_str()
            .unwrap_or_default()
            .chars()
            .take(60)
            .collect::<String>()
    );
    r
}

/// A node agent killing itself (SIGKILL) at `fault` (see `shoal_worker::fault`); the run must
/// end with the reference's weights. Returns the detection latency in ms.
fn killed_at(case: &str, fault: &str) -> u64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("fired");
    let env = [
        ("SHOAL_FAULT", fault.to_string()),
        ("SHOAL_FAULT_ONCE", marker.display().to_string()),
    ];
    let (child, out) = start(dir.path(), "run", &env, &[]);
    let run = finish(child, out);
    assert!(marker.is_file(), "{case}: the fault never fired");
    // The marker is written just before the process kills itself.
    let fired = std::fs::metadata(&marker)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64);
    let r = report(case, &run, fired);
    assert!(
        run.weights() == reference().weights(),
        "{case}: final weights differ from the uninterrupted run"
    );
    let detect = r["detected_unix_ms"].as_u64().unwrap_or(0) - fired.unwrap_or(0);
    assert!(detect < 1000, "{case}: detected after {detect} ms");
    detect
}

#[test]
fn the_newest_checkpoint_exports_to_the_final_weights() {
    let run = reference();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("hf");
    let root = run.out.join("checkpoints");
    let o = Command::new(shoal_bin())
        .args(["export", "--checkpoint"])
        .arg(&root)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("shoal export");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let exported = std::fs::read(out.join("model.safetensors")).expect("exported weights");
    assert!(
        exported == run.weights(),
        "the export differs from the final checkpoint"
    );
    // A path that is no checkpoint is refused by name.
    let o = Command::new(shoal_bin())
        .args(["export", "--checkpoint"])
        .arg(dir.path().join("nothing"))
        .arg("--out")
        .arg(dir.path().join("x"))
        .output()
        .expect("shoal export");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--checkpoint") && err.contains("no such directory"),
        "{err}"
    );
}

#[test]
fn sigkill_during_forward_and_backward_loses_nothing() {
    killed_at("SIGKILL in forward (node 1)", "train-1:forward@30");
    killed_at("SIGKILL in backward (node 0)", "train-0:backward@30");
}

#[test]
fn sigkill_during_dispatch_and_combine_loses_nothing() {
    killed_at("SIGKILL in dispatch (node 1)", "train-1:dispatch@150");
    killed_at("SIGKILL in combine (node 0)", "train-0:combine@150");
}

#[test]
fn sigkill_during_a_checkpoint_write_loses_nothing() {
    // Node 0 holds rank 0, which commits: killed after its first shard of step 4's checkpoint.
    killed_at("SIGKILL writing a checkpoint", "train-0:checkpoint@3");
}

#[test]
fn a_stopped_agent_is_failed_by_its_heartbeat_and_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (child, out) = start(dir.path(), "run", &[], &[]);
    wait_until(&out, "step 3", |o| steps_done(o) >= 3);
    let pid = agent_pid(child.id(), "train-1").expect("node agent train-1");
    let stopped = now_ms();
    signal(pid, "STOP");
    let run = finish(child, out);
    let r = report("SIGSTOP of node 1", &run, Some(stopped));
    assert!(run.weights() == reference().weights());
    // The default heartbeat timeout is 5 s; detection takes that plus about one check (500 ms),
    // less when the last heartbeat left early, more when a loaded machine delays the check.
    let detect = r["detected_unix_ms"].as_u64().unwrap_or(0) - stopped;
    assert!(
        (4000..10_000).contains(&detect),
        "detected after {detect} ms"
    );
    assert!(run.stderr.contains("replacing its agent"), "{}", run.stderr);
}

#[test]
fn an_agent_killed_from_outside_and_a_corrupt_newest_checkpoint() {
    // SIGKILL from outside after step 3.
    let dir = tempfile::tempdir().expect("tempdir");
    let (child, out) = start(dir.path(), "plain", &[], &[]);
    wait_until(&out, "step 3", |o| steps_done(o) >= 3);
    let pid = agent_pid(child.id(), "train-1").expect("node agent train-1");
    let killed = now_ms();
    signal(pid, "KILL");
    let run = finish(child, out);
    let r = report("SIGKILL from outside (node 1)", &run, Some(killed));
    assert!(run.weights() == reference().weights());
    assert!(r["detected_unix_ms"].as_u64().unwrap_or(0) - killed < 1000);

    // The newest checkpoint (step 4) corrupted before a node dies: it restores step 2.
    let (child, out) = start(dir.path(), "corrupt", &[], &[]);
    let step4 = out.join("checkpoints").join("step-00000004");
    wait_until(&out, "the step-4 checkpoint", |_| {
        step4.join("manifest.json").is_file()
    });
    let shard = step4.join("shard-00001.safetensors");
    let mut bytes = std::fs::read(&shard).expect("shard");
    let n = bytes.len() - 5;
    bytes[n] ^= 0x10;
    std::fs::write(&shard, &bytes).expect("corrupt the shard");
    let pid = agent_pid(child.id(), "train-1").expect("node agent train-1");
    let killed = now_ms();
    signal(pid, "KILL");
    let run = finish(child, out);
    let r = report("corrupt newest checkpoint + SIGKILL", &run, Some(killed));
    assert_eq!(
        r["restored_step"], 2,
        "the corrupt step-4 checkpoint is skipped: {r}"
    );
    assert!(run.weights() == reference().weights());
}

#[test]
fn a_network_cut_between_the_nodes_is_recovered_from() {
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("fired");
    let env = [
        ("SHOAL_FAULT", "train-1:send@300=cut".to_string()),
        ("SHOAL_FAULT_ONCE", marker.display().to_string()),
    ];
    let (child, out) = start(dir.path(), "run", &env, &[]);
    let run = finish(child, out);
    assert!(marker.is_file(), "the cut never happened");
    report("network cut between the nodes", &run, None);
    assert!(run.weights() == reference().weights());
    assert!(
        run.json["agent_restarts"] == 0,
        "no process died: {}",
        run.json
    );
}

#[test]
fn a_full_checkpoint_disk_is_reported_and_training_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("fired");
    let env = [
        ("SHOAL_FAULT", "train-0:write@1=enospc".to_string()),
        ("SHOAL_FAULT_ONCE", marker.display().to_string()),
    ];
    let (child, out) = start(dir.path(), "run", &env, &[]);
    let run = finish(child, out);
    assert!(marker.is_file(), "the write never failed");
    assert!(run.recoveries().is_empty(), "{}", run.json);
    assert!(
        run.stderr.contains("checkpoint of step 2") && run.stderr.contains("no storage space"),
        "{}",
        run.stderr
    );
    // No half-written checkpoint is left, and the later ones are there.
    let root = run.out.join("checkpoints");
    assert!(!root.join("step-00000002").exists());
    assert!(root.join("step-00000006").join("manifest.json").is_file());
    assert!(run.weights() == reference().weights());
}

/// The same full disk with `checkpointing.on_error = "pause"`: the job stops instead of training
/// on past what is saved, says why, and runs again from its last committed checkpoint (here none:
/// step 0) once the retry time has passed; the result is the uninterrupted run's.
#[test]
fn a_full_checkpoint_disk_pauses_the_job_when_configured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = dir.path().join("pause.toml");
    std::fs::write(
        &job,
        "name = \"pause\"\n[checkpointing]\non_error = \"pause\"\nretry_s = 0.5\n",
    )
    .expect("job file");
    let marker = dir.path().join("fired");
    let env = [
        ("SHOAL_FAULT", "train-0:write@1=enospc".to_string()),
        ("SHOAL_FAULT_ONCE", marker.display().to_string()),
    ];
    let job = job.display().to_string();
    let (child, out) = start(dir.path(), "run", &env, &["--config", &job]);
    let run = finish(child, out);
    assert!(marker.is_file(), "the write never failed");
    let rec = run.recoveries();
    assert_eq!(rec.len(), 1, "{}", run.json);
    let r = &rec[0];
    let cause = r["cause"].as_str().unwrap_or_default();
    // Whichever node reported first: the full disk itself, or the other node finding the
    // half-written checkpoint already removed.
    assert!(
        cause.contains("paused") && cause.contains("checkpoint of step 2"),
        "{cause}"
    );
    assert_eq!(r["restored_step"], 0, "{r}");
    // Paused within the checkpoint's write, well before the next one.
    let failed = r["failed_step"].as_u64().expect("failed_step");
    assert!(
        failed < 4,
        "trained on to step {failed} past the unsaved checkpoint"
    );
    // Paused for the retry time, not restarted at once.
    assert!(r["recovery_ms"].as_u64() >= Some(500), "{r}");
    eprintln!(
        "fault matrix | {:<34} | paused at step {failed} | recovery {:>5} ms | steps redone {} | restored step 0",
        "full checkpoint disk, on_error=pause", r["recovery_ms"], r["steps_redone"]
    );
    // Every checkpoint left is a committed one, up to the last step.
    let root = run.out.join("checkpoints");
    for e in std::fs::read_dir(&root).expect("checkpoints").flatten() {
        assert!(
            e.path().join("manifest.json").is_file(),
            "{} is not committed",
            e.path().display()
        );
    }
    assert!(root.join("step-00000008").join("manifest.json").is_file());
    assert!(run.weights() == reference().weights());
}

#[test]
fn a_spare_replaces_a_node_lost_for_good() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (child, out) = start(dir.path(), "run", &[], &["--spares", "1", "--no-restart"]);
    wait_until(&out, "step 3", |o| steps_done(o) >= 3);
    let pid = agent_pid(child.id(), "train-1").expect("node agent train-1");
    let killed = now_ms();
    signal(pid, "KILL");
    let run = finish(child, out);
    let r = report("SIGKILL, replaced by a spare", &run, Some(killed));
    assert_eq!(
        (r["dp_before"].clone(), r["dp_after"].clone()),
        (2.into(), 2.into())
    );
    assert_eq!(run.json["agent_restarts"], 0);
    assert!(run.weights() == reference().weights());
}

#[test]
fn the_job_shrinks_to_fewer_data_parallel_ranks_when_a_node_is_lost_for_good() {
    // ep 1 so that one data-parallel rank is a valid shape; the global batch stays 8.
    let dir = tempfile::tempdir().expect("tempdir");
    let job = dir.path().join("elastic.toml");
    std::fs::write(
        &job,
        "name = \"elastic\"\n[parallelism]\npp = 2\ndp = 2\nep = 1\n[elasticity]\nmin_dp = 1\n",
    )
    .expect("job file");
    let job = job.display().to_string();
    let (child, out) = start(dir.path(), "whole", &[], &["--config", &job]);
    let whole = finish(child, out);
    let (child, out) = start(
        dir.path(),
        "shrunk",
        &[],
        &["--config", &job, "--no-restart"],
    );
    wait_until(&out, "step 3", |o| steps_done(o) >= 3);
    let pid = agent_pid(child.id(), "train-1").expect("node agent train-1");
    let killed = now_ms();
    signal(pid, "KILL");
    let run = finish(child, out);
    let r = report("node lost for good: dp 2 -> 1", &run, Some(killed));
    assert_eq!(
        (r["dp_before"].clone(), r["dp_after"].clone()),
        (2.into(), 1.into())
    );
    let (a, b) = (whole.losses(), run.losses());
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-3 * x.abs(),
            "step {}: {x} vs {y}",
            i + 1
        );
    }
}
