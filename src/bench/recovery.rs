//! `shoal bench recovery`: time from SIGKILL of one worker to training resumed, for Shoal and
//! for torchrun's elastic agent, side by side on this machine.
//!
//! Both run a data-parallel job of two processes that checkpoints every few steps; one worker
//! process is killed with SIGKILL a few steps in, and the time runs from the kill to the moment
//! every rank of the new incarnation has joined, restored the newest checkpoint and is about to
//! train. Shoal: `shoal train --nodes 2 --gpus-per-node 1 --pp 1 --dp 2 --ep 1` (two node
//! agents, the `tiny` model), node agent `train-1` killed; resumed is the coordinator's record of
//! the new attempt starting. torchrun: `torchrun --standalone --nproc-per-node 2
//! --max-restarts 3` of `scripts/bench/torch_elastic_ddp.py` (DDP over gloo, an MLP of 4 x 1024
//! x 1024), worker rank 1 killed; resumed is the last `ready` line of the restarted workers.
//! torchrun runs with its defaults. Its restarted workers sometimes hang in
//! `init_process_group` (seen here with torch 2.15); such a try counts as not recovered within
//! a minute and is reported apart, and the medians are over the tries that recovered.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::Args;

/// Options of `shoal bench recovery`.
#[derive(Debug, Clone, Args)]
pub struct RecoveryBenchArgs {
    /// Kills (and recoveries) per system.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Python environment with torch (made by scripts/hf/setup_venv.sh if absent).
    #[arg(long, default_value = "target/hf-venv")]
    pub venv: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The pid of a child of `parent` whose command line has `needle` as an argument.
fn child_with_arg(parent: u32, needle: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let ppid: u32 = stat
            .rsplit_once(") ")?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let has = cmd.split(|&b| b == 0).any(|a| a == needle.as_bytes());
        (ppid == parent && has).then_some(pid)
    })
}

fn sigkill(pid: u32) -> Result<f64> {
    let t = now_s();
    let ok = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .context("running kill")?
        .success();
    if !ok {
        bail!("kill -KILL {pid} failed");
    }
    Ok(t)
}

fn wait_until(what: &str, mut ready: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(180);
    while !ready()? {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn finish(child: Child, what: &str) -> Result<String> {
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// One Shoal recovery: seconds from the kill to the new attempt running.
fn shoal_once(dir: &Path) -> Result<f64> {
    let out = dir.join("shoal");
    let exe = std::env::current_exe().context("locating the shoal binary")?;
    let child = Command::new(exe)
        .args(["train", "--nodes", "2", "--gpus-per-node", "1", "--pp", "1"])
        .args([
            "--dp",
            "2",
            "--ep",
            "1",
            "--steps",
            "16",
            "--checkpoint-every",
            "4",
        ])
        .args(["--seq-len", "128", "--json", "--out"])
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting shoal train")?;
    let metrics = out.join("metrics.jsonl");
    wait_until("shoal's step 6", || Ok(lines(&metrics).len() >= 6))?;
    let pid = child_with_arg(child.id(), "train-1").context("node agent train-1")?;
    let killed = sigkill(pid)?;
    let stdout = finish(child, "shoal train")?;
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("")).context("shoal's summary")?;
    let resumed = summary["recoveries"][0]["resumed_unix_ms"]
        .as_u64()
        .context("shoal recorded no recovery")?;
    Ok(resumed as f64 / 1e3 - killed)
}

/// One torchrun recovery: seconds from the kill to every restarted worker ready (`None`: not
/// within a minute).
fn torch_once(dir: &Path, torchrun: &Path) -> Result<Option<f64>> {
    let events = dir.join("torch-events.jsonl");
    let mut cmd = Command::new(torchrun);
    // The agent and its workers in their own process group, to leave nothing behind.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = cmd
        .args([
            "--standalone",
            "--nnodes=1",
            "--nproc-per-node=2",
            "--max-restarts=3",
        ])
        .arg("scripts/bench/torch_elastic_ddp.py")
        .arg("--events")
        .arg(&events)
        .arg("--ckpt")
        .arg(dir.join("torch-ckpt.pt"))
        .args(["--steps", "200", "--every", "4"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("torchrun.log")).context("torchrun's log")?)
        .spawn()
        .context("starting torchrun")?;
    let steps = |evs: &[serde_json::Value]| evs.iter().filter(|e| e["event"] == "step").count();
    wait_until("torch's step 6", || Ok(steps(&lines(&events)) >= 6))?;
    let pid = lines(&events)
        .iter()
        .find(|e| e["event"] == "start" && e["rank"] == 1)
        .and_then(|e| e["pid"].as_u64())
        .context("worker rank 1's pid")?;
    let killed = sigkill(pid as u32)?;
    let ready = |evs: &[serde_json::Value]| -> Vec<f64> {
        evs.iter()
            .filter(|e| e["event"] == "ready" && e["restart"].as_u64() >= Some(1))
            .filter_map(|e| e["t"].as_f64())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut recovered = true;
    while ready(&lines(&events)).len() < 2 {
        if Instant::now() > deadline {
            recovered = false;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let resumed = ready(&lines(&events)).into_iter().fold(0.0, f64::max);
    // Measured: stop the agent (its process group) and every worker (each in a session of its
    // own), without waiting for the job to end.
    let mut pids: Vec<String> = lines(&events)
        .iter()
        .filter(|e| e["event"] == "start")
        .filter_map(|e| e["pid"].as_u64())
        .map(|p| p.to_string())
        .collect();
    pids.push(format!("-{}", child.id()));
    let _ = Command::new("kill")
        .arg("-KILL")
        .arg("--")
        .args(&pids)
        .stderr(Stdio::null())
        .status();
    let mut child = child;
    let _ = child.wait();
    Ok(recovered.then_some(resumed - killed))
}

/// Runs `shoal bench recovery`.
pub fn run(args: &RecoveryBenchArgs) -> Result<()> {
    let torchrun = args.venv.join("bin").join("torchrun");
    if !torchrun.exists() {
        let ok = Command::new("bash")
            .arg("scripts/hf/setup_venv.sh")
            .arg(&args.venv)
            .status()
            .context("running scripts/hf/setup_venv.sh")?
            .success();
        if !ok || !torchrun.exists() {
            bail!("no torchrun in {}", args.venv.display());
        }
    }
    let (mut shoal, mut torch, mut hung) = (Vec::new(), Vec::new(), 0);
    for i in 0..args.runs.max(1) {
        let dir = tempfile::tempdir().context("a scratch directory")?;
        let s = shoal_once(dir.path())?;
        let t = torch_once(dir.path(), &torchrun)?;
        if !args.json {
            let t = t.map_or("not recovered within 60 s".into(), |t| format!("{t:.2} s"));
            println!("run {}: shoal {s:.2} s, torchrun {t}", i + 1);
        }
        shoal.push(s);
        match t {
            Some(t) => torch.push(t),
            None => hung += 1,
        }
    }
    let (s, t) = (super::median(shoal.clone()), super::median(torch.clone()));
    if args.json {
        let v = serde_json::json!({
            "shoal_s": shoal, "torchrun_s": torch, "torchrun_hung": hung,
            "shoal_median_s": s, "torchrun_median_s": t, "ratio": s / t,
        });
        println!("{v}");
    } else {
        println!(
            "recovery from SIGKILL of one of two workers to training resumed: shoal {s:.2} s \
             (median of {}), torchrun {t:.2} s (median of {}; {hung} more did not recover), \
             ratio {:.2} (goal at most 0.33)",
            shoal.len(),
            torch.len(),
            s / t
        );
    }
    Ok(())
}
