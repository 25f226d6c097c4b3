//! `shoal bench control`: the control plane against Ray, both measured in the same run.
//!
//! 1. Synchronous RPC round trips per second: one client calling `JobService.GetJob` on a
//!    `shoal coordinator` process over loopback, against `ray.get(actor.method.remote())`.
//! 2. Submit to running: `SubmitJob` until `WatchJob` reports the job Running (an in-process
//!    coordinator, real `shoal worker` processes), against creating a Ray actor until its first
//!    method call returns.
//! 3. Node sessions at a 1 Hz heartbeat that one coordinator core serves: the coordinator pinned
//!    to one core, simulated node agents (`AgentService.Attach`: Register, then a heartbeat every
//!    second) ramped up level by level. No Ray peer.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use shoal_proto::v1 as pb;
use shoal_proto::v1::agent_service_client::AgentServiceClient;
use shoal_proto::v1::cluster_service_client::ClusterServiceClient;
use shoal_proto::v1::job_service_client::JobServiceClient;
use shoal_spec::job::JobSpec;
use tonic::transport::{Channel, Endpoint};

use crate::cmd::local::{LocalCluster, LocalOptions};
use crate::procs::{CoordinatorProcess, Proc, clock_ticks, cpu_ticks, pinned, rss_mb};

/// The Ray release the peer installs (it has CPython 3.11 manylinux wheels).
const RAY_VERSION: &str = "2.60.0";
const RAY_SCRIPT: &str = include_str!("ray_control.py");
/// The simulated agents' heartbeat period.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Options of `shoal bench control`.
#[derive(Debug, Clone, clap::Args)]
pub struct ControlBenchArgs {
    /// A short smoke run (few calls, launches and sessions; not for reporting).
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON line of results at the end (progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Skip the Ray peer (no Python needed).
    #[arg(long)]
    pub no_ray: bool,
    /// Virtual environment for the Ray peer, created with `pip install ray` on first use.
    #[arg(long, default_value = "target/ray-venv")]
    pub venv: PathBuf,
    /// Timed GetJob calls (default 20000; 200 with --quick), or as many as fit in 10 s (2 s with
    /// --quick).
    #[arg(long)]
    pub calls: Option<usize>,
    /// Timed Ray actor calls (default 5000; 200 with --quick), with the same time limit.
    #[arg(long)]
    pub ray_calls: Option<usize>,
    /// Jobs submitted, and Ray actors created, for the submit-to-running latency (default 15;
    /// 3 with --quick).
    #[arg(long)]
    pub launches: Option<usize>,
    /// Node agent processes (one CPU device each) for the submit-to-running latency.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Node-session counts to ramp through, comma-separated (default
    /// 1000,2000,5000,10000,20000,50000; 50,200 with --quick).
    #[arg(long, value_delimiter = ',')]
    pub sessions: Vec<usize>,
    /// Node sessions multiplexed on one HTTP/2 connection.
    #[arg(long, default_value_t = 100)]
    pub streams_per_connection: usize,
    /// Seconds each session level is measured (default 10; 1 with --quick).
    #[arg(long)]
    pub window: Option<f64>,
    /// The coordinator core's busy fraction above which the ramp stops.
    #[arg(long, default_value_t = 0.8)]
    pub max_busy: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    /// The Ray release of the peer (absent with `--no-ray`).
    ray: Option<String>,
    rpc: RpcReport,
    launch: LaunchReport,
    sessions: SessionReport,
}

#[derive(Debug, Serialize)]
struct RpcReport {
    shoal_call: &'static str,
    /// One entry per placement of the two sides: `spread` (the OS schedules them) and, where the
    /// affinity can be set, `one core` (both pinned to the same core).
    placements: Vec<RpcPlacement>,
}

#[derive(Debug, Serialize)]
struct RpcPlacement {
    placement: &'static str,
    shoal_calls: usize,
    shoal_calls_per_s: f64,
    /// Bare TCP ping-pong between two processes (64-byte messages, blocking sockets) in the
    /// same placement: what the machine allows any synchronous round trip.
    tcp_round_trips_per_s: f64,
    ray_calls: Option<usize>,
    ray_calls_per_s: Option<f64>,
    /// Shoal / Ray.
    ratio: Option<f64>,
}

#[derive(Debug, Serialize)]
struct LaunchReport {
    launches: usize,
    workers: usize,
    shoal_median_ms: f64,
    shoal_p90_ms: f64,
    shoal_max_ms: f64,
    shoal_ms: Vec<f64>,
    ray_median_ms: Option<f64>,
    ray_p90_ms: Option<f64>,
    ray_max_ms: Option<f64>,
    ray_ms: Vec<f64>,
    /// Ray median / Shoal median (how many times faster Shoal starts work).
    ratio: Option<f64>,
}

#[derive(Debug, Serialize)]
struct SessionReport {
    heartbeat_interval_ms: u64,
    streams_per_connection: usize,
    /// The core the coordinator was pinned to (absent when pinning was not possible).
    coordinator_core: Option<usize>,
    max_busy: f64,
    /// The coordinator's CPU use with no sessions (1.0 = one core), measured over one window.
    idle_busy: f64,
    levels: Vec<Level>,
    /// Largest session count that passed (all healthy, heartbeats current, core under
    /// `max_busy`).
    max_sessions: Option<usize>,
    /// Whether the ramp stopped at a failing level (false: every level passed, so the limit is
    /// higher than `max_sessions`).
    limit_reached: bool,
    /// Coordinator CPU per heartbeat at `max_sessions`.
    cpu_us_per_heartbeat: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Level {
    sessions: usize,
    connections: usize,
    /// Time to open and register this level's new sessions.
    register_s: f64,
    window_s: f64,
    /// Heartbeats the simulated agents sent in the window.
    heartbeats: u64,
    /// Coordinator CPU time / wall time over the window (1.0 = one core).
    coordinator_busy: f64,
    cpu_us_per_heartbeat: f64,
    coordinator_rss_mb: f64,
    /// Nodes ListNodes shows healthy after the window.
    healthy: usize,
    /// Age of the oldest last heartbeat among them, as the coordinator recorded it.
    max_heartbeat_age_ms: f64,
    /// How late the simulated agents' heartbeats left (the load generator keeping up).
    client_max_lateness_ms: f64,
    /// Sessions whose stream ended or failed to register.
    lost: usize,
    ok: bool,
    /// Why the level failed.
    problem: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RayReport {
    ray: String,
    calls: usize,
    calls_per_s: f64,
    actor_start_ms: Vec<f64>,
}

/// Sorted copy.
fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s
}

/// The `q` quantile (nearest rank) of `v`.
fn quantile(v: &[f64], q: f64) -> f64 {
    let s = sorted(v);
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

fn median(v: &[f64]) -> f64 {
    let s = sorted(v);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
    }
}

/// A job that runs long enough to be cancelled once it is Running.
fn launch_spec(i: usize, dir: &Path) -> Result<JobSpec> {
    let text = format!(
        "name = \"launch-{i}\"\nmodel = \"tiny\"\nprecision = \"fp32\"\n\
         [training]\nsteps = 1000000\nseq_len = 32\nbatch = 2\n\
         [parallelism]\nmicro_batches = 1\n[checkpointing]\ndir = {:?}\n",
        dir.join(format!("launch-{i}")).display().to_string()
    );
    Ok(JobSpec::from_toml(&text, "bench job")?)
}

fn status_err(what: &str, s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{what}: {}", s.message())
}

/// Part 1: sequential synchronous `GetJob` calls against a coordinator process, `calls` of them
/// or as many as fit in `cap`; returns the calls made and calls per second. With `core`, the
/// coordinator process is pinned there (the caller pins itself).
fn rpc_rate(
    exe: &Path,
    dir: &Path,
    calls: usize,
    cap: Duration,
    core: Option<usize>,
) -> Result<(usize, f64)> {
    let store = dir.join(format!(
        "rpc-store-{}",
        core.map_or("spread".into(), |c| c.to_string())
    ));
    let coordinator = CoordinatorProcess::start(exe, &store, core)?;
    let spec = shoal_proto::convert::job_spec_to_wire(&launch_spec(0, dir)?)?;
    let rt = crate::cmd::cluster::runtime()?;
    rt.block_on(async {
        let mut c = JobServiceClient::connect(coordinator.url.clone())
            .await
            .context("connecting to the coordinator")?;
        // With no nodes the job stays Pending: a real record to read.
        let job_id = c
            .submit_job(pb::SubmitJobRequest { spec: Some(spec) })
            .await
            .map_err(|s| status_err("submit", s))?
            .into_inner()
            .job_id;
        get_jobs(&mut c, &job_id, (calls / 10).clamp(10, 2000), cap / 5).await?;
        get_jobs(&mut c, &job_id, calls, cap).await
    })
}

/// `n` sequential GetJob calls, or as many as fit in `cap`; returns the calls made and calls per
/// second.
async fn get_jobs(
    c: &mut JobServiceClient<Channel>,
    job_id: &str,
    n: usize,
    cap: Duration,
) -> Result<(usize, f64)> {
    let t = Instant::now();
    let mut done = 0;
    while done < n && t.elapsed() < cap {
        c.get_job(pb::GetJobRequest {
            job_id: job_id.to_string(),
        })
        .await
        .map_err(|s| status_err("get job", s))?;
        done += 1;
    }
    Ok((done, done as f64 / t.elapsed().as_secs_f64()))
}

/// `shoal bench echo`: accepts one loopback connection (printing the port first) and echoes
/// 64-byte messages until it closes.
pub fn echo_server() -> Result<()> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    println!("{}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    let (mut s, _) = listener.accept().context("accepting")?;
    s.set_nodelay(true)?;
    let mut buf = [0u8; 64];
    loop {
        match s.read_exact(&mut buf) {
            Ok(()) => s.write_all(&buf)?,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Bare TCP round trips per second over loopback to a `shoal bench echo` process (64-byte
/// messages, blocking sockets, `TCP_NODELAY`), pinned to `core` if given, as many as fit in
/// `cap`: the floor the machine sets for a synchronous round trip between two processes.
fn tcp_ping_pong(exe: &Path, cap: Duration, core: Option<usize>) -> Result<f64> {
    use std::io::{Read, Write};
    let mut cmd = pinned(exe, core);
    let mut child = cmd
        .args(["bench", "echo"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the echo process")?;
    let stdout = child.stdout.take();
    let echo = Proc(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout.context("echo stdout")?)
        .read_line(&mut line)
        .context("reading the echo process's port")?;
    let port: u16 = line
        .trim()
        .parse()
        .with_context(|| format!("the echo process printed no port: {:?}", line.trim()))?;
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port))
        .context("connecting to the echo process")?;
    c.set_nodelay(true)?;
    let mut buf = [7u8; 64];
    let mut round = |c: &mut std::net::TcpStream| -> std::io::Result<()> {
        c.write_all(&buf)?;
        c.read_exact(&mut buf)
    };
    let warm = Instant::now();
    while warm.elapsed() < cap / 5 {
        round(&mut c)?;
    }
    let t = Instant::now();
    let mut done = 0u64;
    while t.elapsed() < cap {
        round(&mut c)?;
        done += 1;
    }
    let rate = done as f64 / t.elapsed().as_secs_f64();
    drop(c);
    drop(echo);
    Ok(rate)
}

/// Part 2: submit-to-running latency in ms, `launches` times, with an in-process coordinator and
/// `workers` node agent processes.
fn launch_latency(dir: &Path, launches: usize, workers: usize, gap: Duration) -> Result<Vec<f64>> {
    let opts = LocalOptions {
        store: dir.join("launch-store").display().to_string(),
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        nodes: workers,
        spares: 0,
        devices_per_node: 1,
        node_prefix: "bench".into(),
        quiet_agents: true,
        heartbeat_timeout: shoal_coordinator::actor::ControlConfig::default().heartbeat_timeout,
        restart_agents: false,
        http: None,
    };
    let rt = crate::cmd::cluster::runtime()?;
    let result = rt.block_on(async {
        // Set up as `shoal up` sets up its local cluster.
        let mut cluster = LocalCluster::start(&opts).await?;
        cluster.wait_registered(Duration::from_secs(30)).await?;
        let url = cluster.url.clone();
        let mut jobs = JobServiceClient::connect(url.clone())
            .await
            .context("connecting to the coordinator")?;
        let mut ms = Vec::new();
        for i in 0..launches {
            tokio::time::sleep(gap).await;
            let spec = shoal_proto::convert::job_spec_to_wire(&launch_spec(i, dir)?)?;
            let t = Instant::now();
            let job_id = jobs
                .submit_job(pb::SubmitJobRequest { spec: Some(spec) })
                .await
                .map_err(|s| status_err("submit", s))?
                .into_inner()
                .job_id;
            let mut events = jobs
                .watch_job(pb::WatchJobRequest {
                    job_id: job_id.clone(),
                })
                .await
                .map_err(|s| status_err("watch", s))?
                .into_inner();
            loop {
                let ev = events.message().await.map_err(|s| status_err("watch", s))?;
                let Some(ev) = ev else {
                    bail!("the watch of {job_id} ended before the job ran");
                };
                if let Some(pb::job_event::Event::State(s)) = ev.event {
                    if s.state == pb::JobState::Running as i32 {
                        break;
                    }
                    let done = [
                        pb::JobState::Succeeded,
                        pb::JobState::Failed,
                        pb::JobState::Cancelled,
                    ];
                    if done.iter().any(|d| *d as i32 == s.state) {
                        bail!("job {job_id} ended before it ran: {}", s.reason);
                    }
                }
            }
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            drop(events);
            jobs.cancel_job(pb::CancelJobRequest { job_id })
                .await
                .map_err(|s| status_err("cancel", s))?;
        }
        drop(jobs);
        cluster.shutdown().await?;
        Ok(ms)
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    result
}

/// A Python with Ray: the venv's, created with `pip install ray==RAY_VERSION` on first use.
fn ray_python(venv: &Path) -> Result<PathBuf> {
    let python = venv.join("bin").join("python");
    let has_ray = |p: &Path| {
        Command::new(p)
            .args(["-c", "import ray"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if has_ray(&python) {
        return Ok(python);
    }
    eprintln!(
        "bench: preparing ray {RAY_VERSION} in a virtual environment at {} (one time)",
        venv.display()
    );
    let status = Command::new("python3")
        .args(["-m", "venv"])
        .arg(venv)
        .status()
        .context("running python3 -m venv (is python3 installed?)")?;
    if !status.success() {
        bail!("python3 -m venv {} failed", venv.display());
    }
    let status = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet"])
        .arg(format!("ray=={RAY_VERSION}"))
        .status()
        .context("running pip install ray")?;
    if !status.success() || !has_ray(&python) {
        bail!(
            "pip install ray=={RAY_VERSION} into {} failed",
            venv.display()
        );
    }
    Ok(python)
}

/// Ray's side of parts 1 and 2; with `core`, Ray (driver, GCS, raylet and workers) runs pinned
/// to that core.
fn ray_peer(
    args: &ControlBenchArgs,
    calls: usize,
    cap: Duration,
    launches: usize,
    gap: Duration,
    core: Option<usize>,
) -> Result<RayReport> {
    let python = ray_python(&args.venv)?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut cmd = pinned(&python, core);
    let out = cmd
        .arg("-c")
        .arg(RAY_SCRIPT)
        .args([
            calls.to_string(),
            (calls / 10).clamp(10, 2000).to_string(),
            launches.to_string(),
            gap.as_secs_f64().to_string(),
            cpus.to_string(),
            cap.as_secs_f64().to_string(),
        ])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "the Ray benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or_default())
        .context("reading the Ray benchmark's output")
}

/// Counters the simulated node agents share.
#[derive(Default)]
struct Counters {
    registered: AtomicUsize,
    failed: AtomicUsize,
    ended: AtomicUsize,
    heartbeats: AtomicU64,
    max_late_us: AtomicU64,
}

/// One simulated node agent: Register (one `sim` device), then a heartbeat every second, first at
/// `phase` after registration, until the stream ends.
async fn session(
    channel: Channel,
    node: String,
    phase: Duration,
    counters: Arc<Counters>,
    gate: Arc<tokio::sync::Semaphore>,
) {
    let Ok(permit) = gate.acquire_owned().await else {
        return;
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::AgentMessage>(4);
    let register = pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Register(pb::Register {
            node: node.clone(),
            devices: vec![pb::Device {
                index: 0,
                kind: pb::DeviceKind::Sim as i32,
                name: "sim".into(),
                memory_bytes: 0,
                job_id: String::new(),
                ..Default::default()
            }],
            nvlink_domain: node,
            ib_rail: 0,
            spare: false,
            data_addr: String::new(),
            running: Vec::new(),
        })),
    };
    if tx.send(register).await.is_err() {
        counters.failed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut client = AgentServiceClient::new(channel);
    let attached = client
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let Ok(response) = attached else {
        counters.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut inbound = response.into_inner();
    let epoch = match inbound.message().await {
        Ok(Some(pb::CoordinatorMessage {
            msg: Some(pb::coordinator_message::Msg::Registered(r)),
        })) => r.epoch,
        _ => {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    drop(permit);
    counters.registered.fetch_add(1, Ordering::Relaxed);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + phase, HEARTBEAT);
    loop {
        tokio::select! {
            due = ticker.tick() => {
                let late = u64::try_from(due.elapsed().as_micros()).unwrap_or(u64::MAX);
                counters.max_late_us.fetch_max(late, Ordering::Relaxed);
                let beat = pb::AgentMessage {
                    msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
                        epoch,
                        job_steps: Default::default(),
                    })),
                };
                if tx.send(beat).await.is_err() {
                    break;
                }
                counters.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
            m = inbound.message() => match m {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            },
        }
    }
    counters.ended.fetch_add(1, Ordering::Relaxed);
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// This process's allowed CPUs, as `taskset` writes them.
fn cpus_allowed() -> Option<String> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|s| s.trim().to_string())
}

/// Whether `taskset` is there to pin processes and this process's affinity is readable.
fn can_pin() -> bool {
    cpus_allowed().is_some()
        && Command::new("taskset")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
}

/// Sets the CPU affinity of every thread of this process with `taskset`.
fn pin_self(cpus: &str) -> bool {
    Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &std::process::id().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

struct RampConfig {
    levels: Vec<usize>,
    streams_per_connection: usize,
    window: Duration,
    settle: Duration,
    max_busy: f64,
}

/// Part 3: the session ramp against a coordinator process pinned to core 0 (when there are at
/// least two cores and `taskset`), this process on the others.
fn session_ramp(exe: &Path, dir: &Path, cfg: &RampConfig) -> Result<SessionReport> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let original = cpus_allowed();
    let pin = cores >= 2 && can_pin();
    let coordinator = CoordinatorProcess::start(exe, &dir.join("session-store"), pin.then_some(0))?;
    let pinned_self = pin && pin_self(&format!("1-{}", cores - 1));
    let rt = crate::cmd::cluster::runtime()?;
    let result = rt.block_on(ramp(&coordinator, cfg));
    rt.shutdown_timeout(Duration::from_secs(2));
    drop(coordinator);
    if pinned_self && let Some(cpus) = &original {
        pin_self(cpus);
    }
    let (idle_busy, levels, problem) = result?;
    if let Some(p) = problem {
        eprintln!("bench: the session ramp stopped: {p}");
    }
    let passed = levels.iter().take_while(|l| l.ok).last();
    Ok(SessionReport {
        heartbeat_interval_ms: u64::try_from(HEARTBEAT.as_millis()).unwrap_or(u64::MAX),
        streams_per_connection: cfg.streams_per_connection,
        coordinator_core: pin.then_some(0),
        max_busy: cfg.max_busy,
        idle_busy,
        max_sessions: passed.map(|l| l.sessions),
        cpu_us_per_heartbeat: passed.map(|l| l.cpu_us_per_heartbeat),
        limit_reached: levels.iter().any(|l| !l.ok),
        levels,
    })
}

/// Ramps the simulated sessions through `cfg.levels`; stops after the first failing level.
/// Returns the coordinator's idle CPU use, the levels and, when the ramp could not go on for
/// another reason, why.
async fn ramp(
    coordinator: &CoordinatorProcess,
    cfg: &RampConfig,
) -> Result<(f64, Vec<Level>, Option<String>)> {
    let pid = coordinator.pid();
    let tck = clock_ticks();
    let endpoint = Endpoint::from_shared(coordinator.url.clone())
        .context("coordinator url")?
        .connect_timeout(Duration::from_secs(5));
    let mut cluster =
        ClusterServiceClient::new(endpoint.connect().await?).max_decoding_message_size(1 << 30);
    let cpu0 = cpu_ticks(pid)?;
    let w0 = Instant::now();
    tokio::time::sleep(cfg.window).await;
    let idle_busy = (cpu_ticks(pid)? - cpu0) as f64 / tck / w0.elapsed().as_secs_f64();
    eprintln!("bench: idle coordinator {:.1}% busy", 100.0 * idle_busy);
    let counters = Arc::new(Counters::default());
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let mut channels: Vec<Channel> = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut levels = Vec::new();
    let mut open = 0;
    let spc = cfg.streams_per_connection.max(1);
    for &n in &cfg.levels {
        if n <= open {
            continue;
        }
        eprintln!("bench: {n} node sessions: registering");
        let t = Instant::now();
        while channels.len() < n.div_ceil(spc) {
            let ch = match endpoint.connect().await {
                Ok(ch) => ch,
                Err(e) => {
                    let why = format!("connection {}: {e}", channels.len());
                    return Ok((idle_busy, levels, Some(why)));
                }
            };
            channels.push(ch);
        }
        for i in open..n {
            // Spread the heartbeats over the second (golden-ratio phases stay even as the
            // ramp adds sessions).
            let phase = HEARTBEAT.mul_f64((i as f64 * 0.618_033_988_749_895).fract());
            tasks.spawn(session(
                channels[i / spc].clone(),
                format!("sim-{i:07}"),
                phase,
                Arc::clone(&counters),
                Arc::clone(&gate),
            ));
        }
        open = n;
        let deadline = t + Duration::from_secs(60) + Duration::from_millis(10 * n as u64);
        loop {
            let done = counters.registered.load(Ordering::Relaxed)
                + counters.failed.load(Ordering::Relaxed);
            if done >= n || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let register_s = t.elapsed().as_secs_f64();
        tokio::time::sleep(cfg.settle).await;
        counters.max_late_us.store(0, Ordering::Relaxed);
        let hb0 = counters.heartbeats.load(Ordering::Relaxed);
        let cpu0 = cpu_ticks(pid)?;
        let w0 = Instant::now();
        tokio::time::sleep(cfg.window).await;
        let cpu1 = cpu_ticks(pid)?;
        let wall = w0.elapsed().as_secs_f64();
        let heartbeats = counters.heartbeats.load(Ordering::Relaxed) - hb0;
        let late_ms = counters.max_late_us.load(Ordering::Relaxed) as f64 / 1e3;
        let cpu_s = (cpu1 - cpu0) as f64 / tck;
        let rss = rss_mb(pid);
        let nodes = cluster
            .list_nodes(pb::ListNodesRequest {})
            .await
            .map_err(|s| status_err("list nodes", s))?
            .into_inner()
            .nodes;
        let now = now_unix_ms();
        let healthy: Vec<&pb::Node> = nodes
            .iter()
            .filter(|n| n.state == pb::NodeState::Healthy as i32)
            .collect();
        let max_age = healthy
            .iter()
            .map(|n| now.saturating_sub(n.last_heartbeat_unix_ms))
            .max()
            .unwrap_or(0) as f64;
        let lost = counters.failed.load(Ordering::Relaxed) + counters.ended.load(Ordering::Relaxed);
        let busy = cpu_s / wall;
        let beat_ms = HEARTBEAT.as_secs_f64() * 1e3;
        let problem = if lost > 0 || healthy.len() < n {
            Some(format!(
                "{} of {n} sessions healthy, {lost} lost",
                healthy.len()
            ))
        } else if late_ms > beat_ms {
            Some(format!(
                "the load generator fell behind: heartbeats left up to {late_ms:.0} ms late"
            ))
        } else if max_age > 3.0 * beat_ms {
            Some(format!(
                "heartbeats falling behind: the oldest is {max_age:.0} ms old"
            ))
        } else if busy > cfg.max_busy {
            Some(format!("the coordinator core is {:.0}% busy", 100.0 * busy))
        } else {
            None
        };
        let level = Level {
            sessions: n,
            connections: channels.len(),
            register_s,
            window_s: wall,
            heartbeats,
            coordinator_busy: busy,
            cpu_us_per_heartbeat: cpu_s * 1e6 / heartbeats.max(1) as f64,
            coordinator_rss_mb: rss,
            healthy: healthy.len(),
            max_heartbeat_age_ms: max_age,
            client_max_lateness_ms: late_ms,
            lost,
            ok: problem.is_none(),
            problem,
        };
        eprintln!(
            "bench: {n} node sessions: coordinator {:.1}% busy, {:.1} us/heartbeat, {} healthy{}",
            100.0 * level.coordinator_busy,
            level.cpu_us_per_heartbeat,
            level.healthy,
            level
                .problem
                .as_deref()
                .map_or(String::new(), |p| format!(" ({p})"))
        );
        let ok = level.ok;
        levels.push(level);
        if !ok {
            break;
        }
    }
    tasks.abort_all();
    Ok((idle_busy, levels, None))
}

/// Runs the benchmark and prints the report.
pub fn run(args: &ControlBenchArgs) -> Result<()> {
    let q = args.quick;
    let calls = args.calls.unwrap_or(if q { 200 } else { 20_000 });
    let ray_calls = args.ray_calls.unwrap_or(if q { 200 } else { 5000 });
    let launches = args.launches.unwrap_or(if q { 3 } else { 15 });
    let window = args.window.unwrap_or(if q { 1.0 } else { 10.0 });
    let levels = if args.sessions.is_empty() {
        if q {
            vec![50, 200]
        } else {
            vec![1000, 2000, 5000, 10_000, 20_000, 50_000]
        }
    } else {
        args.sessions.clone()
    };
    if calls == 0 || ray_calls == 0 || launches == 0 || args.workers == 0 {
        bail!("--calls, --ray-calls, --launches and --workers must be at least 1");
    }
    if levels.contains(&0) || args.streams_per_connection == 0 {
        bail!("--sessions and --streams-per-connection must be at least 1");
    }
    if !(window.is_finite() && window > 0.0) {
        bail!("--window must be a number of seconds > 0");
    }
    if !(args.max_busy > 0.0 && args.max_busy <= 1.0) {
        bail!("--max-busy must be in (0, 1]");
    }
    let gap = Duration::from_millis(if q { 100 } else { 500 });
    let exe = std::env::current_exe().context("locating the shoal binary")?;
    let dir = tempfile::tempdir().context("creating a temporary directory")?;

    let cap = Duration::from_secs(if q { 2 } else { 10 });
    let original = cpus_allowed();
    let mut placements = Vec::new();
    let mut ray_launches = None;
    for core in [None, Some(0)] {
        let placement = if core.is_some() { "one core" } else { "spread" };
        if core.is_some() && !(can_pin() && pin_self("0")) {
            eprintln!(
                "bench: cannot pin processes (no taskset?): the one-core placement is skipped"
            );
            continue;
        }
        eprintln!("bench: {placement}: bare TCP round trips, then {calls} GetJob round trips");
        let measured = tcp_ping_pong(&exe, cap, core).and_then(|tcp| {
            let (n, rate) = rpc_rate(&exe, dir.path(), calls, cap, core)?;
            Ok((tcp, n, rate))
        });
        if core.is_some()
            && let Some(cpus) = &original
        {
            pin_self(cpus);
        }
        let (tcp, n, rate) = measured?;
        // Ray's actor starts are timed in the spread run, after its calls, as Shoal's launches
        // are timed with the OS placing every process.
        let starts = if core.is_some() { 0 } else { launches };
        let ray = if args.no_ray {
            None
        } else {
            eprintln!(
                "bench: {placement}: the Ray peer ({ray_calls} actor calls, {starts} actor starts)"
            );
            Some(ray_peer(args, ray_calls, cap, starts, gap, core)?)
        };
        if core.is_none() {
            ray_launches = ray
                .as_ref()
                .map(|r| (r.ray.clone(), r.actor_start_ms.clone()));
        }
        placements.push(RpcPlacement {
            placement,
            shoal_calls: n,
            shoal_calls_per_s: rate,
            tcp_round_trips_per_s: tcp,
            ray_calls: ray.as_ref().map(|r| r.calls),
            ray_calls_per_s: ray.as_ref().map(|r| r.calls_per_s),
            ratio: ray.as_ref().map(|r| rate / r.calls_per_s),
        });
    }
    eprintln!(
        "bench: {launches} launches on {} node agent(s)",
        args.workers
    );
    let shoal_ms = launch_latency(dir.path(), launches, args.workers, gap)?;
    let sessions = session_ramp(
        &exe,
        dir.path(),
        &RampConfig {
            levels,
            streams_per_connection: args.streams_per_connection,
            window: Duration::from_secs_f64(window),
            settle: Duration::from_secs_f64(if q { 0.3 } else { 2.0 }),
            max_busy: args.max_busy,
        },
    )?;

    let shoal_median = median(&shoal_ms);
    let (ray_version, ray_ms) = ray_launches.unzip();
    let ray_ms = ray_ms.unwrap_or_default();
    let ray_median = (!ray_ms.is_empty()).then(|| median(&ray_ms));
    let report = Report {
        ray: ray_version,
        rpc: RpcReport {
            shoal_call: "JobService.GetJob",
            placements,
        },
        launch: LaunchReport {
            launches,
            workers: args.workers,
            shoal_median_ms: shoal_median,
            shoal_p90_ms: quantile(&shoal_ms, 0.9),
            shoal_max_ms: quantile(&shoal_ms, 1.0),
            shoal_ms,
            ray_median_ms: ray_median,
            ray_p90_ms: ray_median.map(|_| quantile(&ray_ms, 0.9)),
            ray_max_ms: ray_median.map(|_| quantile(&ray_ms, 1.0)),
            ratio: ray_median.map(|r| r / shoal_median),
            ray_ms,
        },
        sessions,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(r: &Report) {
    let peer = r
        .ray
        .as_deref()
        .map_or("skipped".into(), |v| format!("Ray {v}"));
    println!("control plane: Shoal against {peer}, measured in this run");
    let x = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}x"));
    println!(
        "  synchronous round trips per second, one client, loopback (shoal {}, ray \
         ray.get(actor.ping.remote()), bare TCP ping-pong between two processes):",
        r.rpc.shoal_call
    );
    for p in &r.rpc.placements {
        println!(
            "    {:<9} shoal {:>6.0}/s, ray {:>6}/s: {:>7}  (bare TCP {:.0}/s; shoal at {:.0}% of it)",
            p.placement,
            p.shoal_calls_per_s,
            p.ray_calls_per_s.map_or("-".into(), |v| format!("{v:.0}")),
            x(p.ratio),
            p.tcp_round_trips_per_s,
            100.0 * p.shoal_calls_per_s / p.tcp_round_trips_per_s
        );
    }
    let l = &r.launch;
    let ray_launch = match (l.ray_median_ms, l.ray_p90_ms, l.ray_max_ms) {
        (Some(m), Some(p), Some(x)) => format!("median {m:.1} ms (p90 {p:.1}, max {x:.1})"),
        _ => "-".into(),
    };
    println!(
        "  submit to running, {} jobs on {} node agent(s): shoal median {:.1} ms (p90 {:.1}, max {:.1}); \
         ray actor creation to first call: {}: {}",
        l.launches,
        l.workers,
        l.shoal_median_ms,
        l.shoal_p90_ms,
        l.shoal_max_ms,
        ray_launch,
        x(l.ratio)
    );
    let s = &r.sessions;
    let pinned = s
        .coordinator_core
        .map_or("not pinned".into(), |c| format!("pinned to core {c}"));
    println!(
        "  node sessions at one heartbeat per {} ms, coordinator process {pinned}, {} sessions per \
         HTTP/2 connection (idle coordinator {:.1}% busy):",
        s.heartbeat_interval_ms,
        s.streams_per_connection,
        100.0 * s.idle_busy
    );
    println!(
        "    {:>8} {:>6} {:>10} {:>6} {:>8} {:>8} {:>11} {:>11} {:>7}  problem",
        "sessions",
        "conns",
        "register s",
        "busy",
        "us/beat",
        "healthy",
        "max age ms",
        "late ms",
        "rss MB"
    );
    for v in &s.levels {
        println!(
            "    {:>8} {:>6} {:>10.1} {:>5.1}% {:>8.1} {:>8} {:>11.0} {:>11.1} {:>7.0}  {}",
            v.sessions,
            v.connections,
            v.register_s,
            100.0 * v.coordinator_busy,
            v.cpu_us_per_heartbeat,
            v.healthy,
            v.max_heartbeat_age_ms,
            v.client_max_lateness_ms,
            v.coordinator_rss_mb,
            v.problem.as_deref().unwrap_or("")
        );
    }
    match (s.max_sessions, s.cpu_us_per_heartbeat) {
        (Some(n), Some(us)) => println!(
            "  largest session count served with the coordinator core under {:.0}% busy: {n}{} \
             ({us:.1} us of coordinator CPU per heartbeat)",
            100.0 * s.max_busy,
            if s.limit_reached {
                ""
            } else {
                " (every level passed: the limit is higher)"
            }
        ),
        _ => println!("  no session level passed"),
    }
}
