//! `shoal simulate`: a cluster of simulated nodes (`sim` devices, `shoal_worker::sim`) run
//! against a real `shoal coordinator` process over loopback gRPC, with failures injected at
//! random (seeded) while a job trains on a cost model.
//!
//! Time is virtual while the job steps (the speed-up maps the hours asked for onto about
//! `--real-seconds` of real time) and real while the control plane works: a failure's
//! detection, the re-plan and the new attempt's start are what the coordinator really takes,
//! counted one for one, plus the modelled restart and checkpoint read of the new attempt.
//! Failed nodes come back after `--repair-hours`; spares stand in meanwhile.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use shoal_proto::v1 as pb;
use shoal_proto::v1::cluster_service_client::ClusterServiceClient;
use shoal_proto::v1::job_service_client::JobServiceClient;
use shoal_spec::cost::{Hardware, StepCost};
use shoal_spec::job::JobSpec;
use shoal_worker::sim::{SimConfig, SimWorld};
use tonic::transport::Channel;

use crate::procs::{CoordinatorProcess, clock_ticks, cpu_ticks, peak_rss_mb};

/// The report's figure: H800 GPU-hours per trillion tokens of DeepSeek-V3's pre-training.
pub const PAPER_GPU_HOURS_PER_TRILLION_TOKENS: f64 = 180_000.0;

/// Options of `shoal simulate`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Nodes that run the job (spares come on top).
    #[arg(long, default_value_t = 256)]
    pub nodes: usize,
    /// Simulated GPUs per node.
    #[arg(long, default_value_t = 8)]
    pub gpus_per_node: u32,
    /// Model: a preset or a `config.json`.
    #[arg(long, default_value = "deepseek-v3-671b")]
    pub model: String,
    /// Pipeline ranks.
    #[arg(long, default_value_t = 16)]
    pub pp: usize,
    /// Data-parallel ranks.
    #[arg(long, default_value_t = 128)]
    pub dp: usize,
    /// Expert-parallel group size.
    #[arg(long, default_value_t = 64)]
    pub ep: usize,
    /// Pipeline schedule: 1f1b, zb1p, dualpipe, dualpipev.
    #[arg(long, default_value = "dualpipe")]
    pub schedule: String,
    /// Sequences per step over all data-parallel ranks (the report's 15,360).
    #[arg(long, default_value_t = 15_360)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 4096)]
    pub seq_len: usize,
    /// Micro-batches per step and data-parallel rank (default: one sequence each).
    #[arg(long)]
    pub micro_batches: Option<usize>,
    /// Hours of training to simulate.
    #[arg(long, default_value_t = 24.0)]
    pub hours: f64,
    /// Mean time between failures of one node, hours (Meta's 1,024-GPU jobs: 7.9 h, about
    /// 1,000 h per 8-GPU node).
    #[arg(long, default_value_t = 1000.0)]
    pub mtbf_hours: f64,
    /// Idle spare nodes the coordinator may recover onto.
    #[arg(long, default_value_t = 0)]
    pub spares: usize,
    /// Hours until a failed node is back (repaired or replaced).
    #[arg(long, default_value_t = 4.0)]
    pub repair_hours: f64,
    /// Fraction of failures that hang a node (caught by the heartbeat timeout) instead of
    /// killing it (caught when its stream breaks).
    #[arg(long, default_value_t = 0.0)]
    pub hang_fraction: f64,
    /// The coordinator's heartbeat timeout.
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    pub heartbeat_timeout_ms: u64,
    /// Steps between checkpoints (default: Young's interval for the snapshot stall and the
    /// job's failure rate, and no shorter than one snapshot and write).
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Modelled seconds a new attempt takes to start before reading its checkpoint (processes,
    /// CUDA contexts, communicators; MegaScale sets up 2,048 GPUs in under 5 s).
    #[arg(long, default_value_t = 5.0)]
    pub restart_s: f64,
    /// Real seconds the failure-free part of the run should take (sets the speed-up).
    #[arg(long, default_value_t = 60.0)]
    pub real_seconds: f64,
    /// Nodes (of the job's, chosen by the seed) whose GPUs compute slower than the others,
    /// until they fail: every step waits for them, and the coordinator should flag them.
    #[arg(long, default_value_t = 0)]
    pub stragglers: usize,
    /// How many times slower a straggler computes.
    #[arg(long, default_value_t = 2.0)]
    pub straggler_factor: f64,
    /// Seed of the failure times, nodes and kinds.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON line of results at the end.
    #[arg(long)]
    pub json: bool,
}

/// One injected failure.
#[derive(Debug, Serialize)]
struct Failure {
    /// Virtual seconds into the run.
    at_s: f64,
    node: String,
    kind: &'static str,
    /// Whether the node ran the job.
    in_job: bool,
    /// Kill (or hang) to the coordinator's detection, real ms.
    detect_ms: Option<f64>,
    /// Detection to training resumed: the coordinator's part (real) plus the modelled restart
    /// and checkpoint read, seconds; with a wait for a repaired node when no spare was free.
    recovery_s: Option<f64>,
    /// The coordinator's re-plan, ms.
    replan_ms: Option<f64>,
    /// Hours waited for a repaired node (no spare free).
    waited_h: f64,
    steps_redone: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    nodes: usize,
    spares: usize,
    gpus: usize,
    model: String,
    pp: usize,
    dp: usize,
    ep: usize,
    schedule: String,
    hours: f64,
    mtbf_hours: f64,
    seed: u64,
    speedup: f64,
    step_s: f64,
    tokens_per_step: u64,
    checkpoint_every: u64,
    steps: u64,
    placement_ms: f64,
    failures: usize,
    job_failures: usize,
    detect_p50_ms: f64,
    detect_p99_ms: f64,
    recovery_p50_s: f64,
    recovery_p99_s: f64,
    replan_p50_ms: f64,
    replan_p99_ms: f64,
    steps_redone: u64,
    ettr: f64,
    coordinator_cpu_s: f64,
    coordinator_peak_rss_mb: f64,
    real_s: f64,
    tflops_per_gpu: f64,
    gpu_hours_per_trillion_tokens: f64,
    gpu_hours_per_trillion_tokens_no_failures: f64,
    paper_gpu_hours_per_trillion_tokens: f64,
    /// The nodes made slow.
    stragglers: Vec<String>,
    /// The straggler events the coordinator sent.
    stragglers_flagged: Vec<Flagged>,
    cost: StepCost,
    failure_log: Vec<Failure>,
}

/// A straggler event.
#[derive(Debug, Serialize)]
struct Flagged {
    node: String,
    step: u64,
    busy_s: f64,
    peers_busy_s: f64,
}

fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let i = ((s.len() - 1) as f64 * q).round() as usize;
    s[i.min(s.len() - 1)]
}

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

fn check(args: &SimulateArgs) -> Result<()> {
    let positive = [
        ("--hours", args.hours),
        ("--mtbf-hours", args.mtbf_hours),
        ("--real-seconds", args.real_seconds),
    ];
    for (flag, v) in positive {
        if !(v.is_finite() && v > 0.0) {
            bail!("{flag}: must be a positive number, got {v}");
        }
    }
    for (flag, v) in [
        ("--repair-hours", args.repair_hours),
        ("--restart-s", args.restart_s),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            bail!("{flag}: must be zero or positive, got {v}");
        }
    }
    if !(args.straggler_factor.is_finite() && args.straggler_factor >= 1.0) {
        bail!(
            "--straggler-factor: must be at least 1, got {}",
            args.straggler_factor
        );
    }
    if args.stragglers > args.nodes {
        bail!(
            "--stragglers: at most --nodes ({}), got {}",
            args.nodes,
            args.stragglers
        );
    }
    if !(0.0..=1.0).contains(&args.hang_fraction) {
        bail!(
            "--hang-fraction: must be in [0, 1], got {}",
            args.hang_fraction
        );
    }
    if args.nodes == 0 || args.gpus_per_node == 0 {
        bail!("--nodes and --gpus-per-node: must be at least 1");
    }
    if args.nodes + args.spares > 100_000 {
        bail!("--nodes + --spares: at most 100000 simulated nodes");
    }
    let need = args.pp * args.dp;
    let have = args.nodes * args.gpus_per_node as usize;
    if need > have {
        bail!("--pp x --dp: the job needs {need} GPUs, --nodes x --gpus-per-node gives {have}");
    }
    if args.real_seconds > 86_400.0 {
        bail!("--real-seconds: at most a day");
    }
    if args.checkpoint_every == Some(0) {
        bail!("--checkpoint-every: must be at least 1");
    }
    Ok(())
}

/// The job the simulated cluster trains.
fn job_spec(
    args: &SimulateArgs,
    steps: u64,
    interval: u64,
    dir: &std::path::Path,
) -> Result<JobSpec> {
    let micro = args
        .micro_batches
        .unwrap_or_else(|| (args.batch / args.dp.max(1)).max(1));
    let text = format!(
        "name = \"simulated\"\nmodel = {model:?}\nprecision = \"fp8\"\n\
         [parallelism]\npp = {pp}\ndp = {dp}\nep = {ep}\nschedule = {schedule:?}\nmicro_batches = {micro}\n\
         [training]\nsteps = {steps}\nseq_len = {seq}\nbatch = {batch}\n\
         [checkpointing]\ndir = {dir:?}\ninterval = {interval}\n",
        model = args.model,
        pp = args.pp,
        dp = args.dp,
        ep = args.ep,
        schedule = args.schedule,
        seq = args.seq_len,
        batch = args.batch,
        dir = dir.display().to_string(),
    );
    let spec = JobSpec::from_toml(&text, "simulated job")?;
    let model = shoal_worker::sim::model_of(&args.model)?;
    spec.validate(&model).context("the simulated job")?;
    Ok(spec)
}

/// A simulated node the driver can kill, hang and bring back.
struct SimNode {
    spare: bool,
    hang: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
    alive: bool,
}

struct Cluster {
    base: SimConfig,
    world: SimWorld,
    nodes: BTreeMap<String, SimNode>,
}

impl Cluster {
    fn start(&mut self, name: &str, spare: bool, slowdown: f64) {
        let hang = Arc::new(AtomicBool::new(false));
        let cfg = SimConfig {
            node: name.to_string(),
            spare,
            slowdown,
            ..self.base.clone()
        };
        let world = self.world.clone();
        let h = Arc::clone(&hang);
        let task = tokio::spawn(async move {
            if let Err(e) = shoal_worker::sim::run(cfg, world, h, std::future::pending()).await {
                tracing::debug!(error = %e, "a simulated node ended");
            }
        });
        self.nodes.insert(
            name.to_string(),
            SimNode {
                spare,
                hang,
                task: Some(task),
                alive: true,
            },
        );
    }

    fn alive(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.alive)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Kills `name` (its stream breaks) or, with `hang`, silences it (it keeps its stream).
    fn fail(&mut self, name: &str, hang: bool) {
        if let Some(n) = self.nodes.get_mut(name) {
            n.alive = false;
            if hang {
                n.hang.store(true, Ordering::Relaxed);
            } else if let Some(t) = n.task.take() {
                t.abort();
            }
        }
    }

    /// Brings `name` back as a fresh, healthy agent (a hung one is killed first).
    fn repair(&mut self, name: &str) {
        let spare = match self.nodes.get_mut(name) {
            Some(n) => {
                if let Some(t) = n.task.take() {
                    t.abort();
                }
                n.spare
            }
            None => return,
        };
        self.start(name, spare, 1.0);
    }

    fn stop(&mut self) {
        for n in self.nodes.values_mut() {
            if let Some(t) = n.task.take() {
                t.abort();
            }
        }
    }
}

async fn get_job(client: &mut JobServiceClient<Channel>, id: &str) -> Result<pb::Job> {
    Ok(client
        .get_job(pb::GetJobRequest {
            job_id: id.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("GetJob: {}", s.message()))?
        .into_inner())
}

/// Waits (real time) for `cond` on the job, polling every 5 ms, for at most `limit`.
async fn wait_job(
    client: &mut JobServiceClient<Channel>,
    id: &str,
    limit: Duration,
    what: &str,
    mut cond: impl FnMut(&pb::Job) -> bool,
) -> Result<pb::Job> {
    let until = Instant::now() + limit;
    loop {
        let job = get_job(client, id).await?;
        if cond(&job) {
            return Ok(job);
        }
        if Instant::now() > until {
            bail!(
                "the simulated job did not {what} within {} s (state {}, reason {:?})",
                limit.as_secs(),
                job.state,
                job.reason
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn job_nodes(job: &pb::Job) -> Vec<String> {
    let mut v: Vec<String> = job.placement.iter().map(|p| p.node.clone()).collect();
    v.sort();
    v.dedup();
    v
}

fn exp_sample(rng: &mut StdRng, mean: f64) -> f64 {
    let u: f64 = rng.random::<f64>();
    -mean * (1.0 - u).max(f64::MIN_POSITIVE).ln()
}

/// `shoal simulate`.
pub fn run(args: &SimulateArgs) -> Result<()> {
    check(args)?;
    let hw = Hardware::h800();
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    // The cost first, with a provisional interval, to size the run.
    let probe = job_spec(args, 1, 0, scratch.path())?;
    let cost = shoal_worker::sim::job_cost(&probe, args.gpus_per_node as usize, &hw)?;
    let job_nodes_n = (args.pp * args.dp).div_ceil(args.gpus_per_node as usize);
    let horizon = args.hours * 3600.0;
    let interval = args.checkpoint_every.unwrap_or_else(|| {
        // Young: sqrt(2 x stall x MTBF of the job's nodes), in steps.
        let mtbf = args.mtbf_hours * 3600.0 / job_nodes_n as f64;
        let young = (2.0 * cost.snapshot_s * mtbf).sqrt();
        let floor = cost.snapshot_s + cost.checkpoint_write_s;
        (young.max(floor) / cost.step_s).ceil().max(1.0) as u64
    });
    let steps = (horizon / cost.step_s).ceil() as u64 + 1;
    let spec = job_spec(args, steps, interval, scratch.path())?;
    let speedup = horizon / args.real_seconds;
    let exe = std::env::current_exe().context("finding the shoal binary")?;
    let coordinator = CoordinatorProcess::start_with(
        &exe,
        &scratch.path().join("store"),
        None,
        &[
            "--heartbeat-timeout-ms".to_string(),
            args.heartbeat_timeout_ms.to_string(),
        ],
    )?;
    if !args.json {
        eprintln!(
            "simulating {} hours of {} on {} nodes x {} GPUs (+{} spares): pp {} x dp {} x ep {}, {}; \
             a step is {:.2} s of {} tokens, a checkpoint every {} steps; speed-up {:.0}x",
            args.hours,
            args.model,
            args.nodes,
            args.gpus_per_node,
            args.spares,
            args.pp,
            args.dp,
            args.ep,
            args.schedule,
            cost.step_s,
            cost.tokens,
            interval,
            speedup
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = rt.block_on(drive(
        args,
        &coordinator,
        spec,
        cost,
        interval,
        steps,
        speedup,
        hw,
    ))?;
    drop(coordinator);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    args: &SimulateArgs,
    coordinator: &CoordinatorProcess,
    spec: JobSpec,
    cost: StepCost,
    interval: u64,
    steps: u64,
    speedup: f64,
    hw: Hardware,
) -> Result<Report> {
    let real_start = Instant::now();
    let channel = Channel::from_shared(coordinator.url.clone())?
        .connect()
        .await
        .context("connecting to the coordinator")?;
    let mut jobs = JobServiceClient::new(channel.clone());
    let mut cluster_api = ClusterServiceClient::new(channel);
    let world = SimWorld::default();
    let mut cluster = Cluster {
        base: SimConfig {
            coordinator: coordinator.url.clone(),
            node: String::new(),
            gpus: args.gpus_per_node,
            spare: false,
            hardware: hw,
            speedup,
            init_s: args.restart_s,
            report_every: Duration::from_millis(250),
            slowdown: 1.0,
        },
        world: world.clone(),
        nodes: BTreeMap::new(),
    };
    let total = args.nodes + args.spares;
    let width = total.to_string().len().max(4);
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut slow: Vec<usize> = (0..args.nodes).collect();
    for i in 0..args.stragglers {
        let j = rng.random_range(i..slow.len());
        slow.swap(i, j);
    }
    slow.truncate(args.stragglers);
    let name = |i: usize| format!("sim-{i:0width$}");
    let injected: Vec<String> = slow.iter().map(|&i| name(i)).collect();
    for i in 0..total {
        let factor = if slow.contains(&i) {
            args.straggler_factor
        } else {
            1.0
        };
        cluster.start(&name(i), i >= args.nodes, factor);
        if i % 64 == 63 {
            // Let the sessions attach in waves rather than all at once.
            tokio::task::yield_now().await;
        }
    }
    // Every node registered.
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let nodes = cluster_api
            .list_nodes(pb::ListNodesRequest {})
            .await
            .map_err(|s| anyhow::anyhow!("ListNodes: {}", s.message()))?
            .into_inner()
            .nodes;
        if nodes.len() >= total {
            break;
        }
        if Instant::now() > until {
            bail!(
                "only {} of {total} simulated nodes registered in 120 s",
                nodes.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Placement: submit to the last node's assignment.
    let submitted = Instant::now();
    let wire = shoal_proto::convert::job_spec_to_wire(&spec)?;
    let id = jobs
        .submit_job(pb::SubmitJobRequest { spec: Some(wire) })
        .await
        .map_err(|s| anyhow::anyhow!("SubmitJob: {}", s.message()))?
        .into_inner()
        .job_id;
    // Straggler events, as `shoal watch` sees them.
    let (flag_tx, mut flag_rx) = tokio::sync::mpsc::unbounded_channel::<pb::Straggler>();
    let mut watcher = JobServiceClient::new(
        Channel::from_shared(coordinator.url.clone())?
            .connect()
            .await
            .context("connecting to the coordinator")?,
    );
    let mut events = watcher
        .watch_job(pb::WatchJobRequest { job_id: id.clone() })
        .await
        .map_err(|s| anyhow::anyhow!("WatchJob: {}", s.message()))?
        .into_inner();
    let watch = tokio::spawn(async move {
        while let Ok(Some(ev)) = events.message().await {
            if let Some(pb::job_event::Event::Straggler(x)) = ev.event
                && flag_tx.send(x).is_err()
            {
                break;
            }
        }
    });
    let job = wait_job(&mut jobs, &id, Duration::from_secs(60), "get placed", |j| {
        !j.placement.is_empty()
    })
    .await?;
    let mut members = job_nodes(&job);
    let until = Instant::now() + Duration::from_secs(60);
    let placement_ms = loop {
        let got = world.assigned(&id, 0);
        if got.len() >= members.len() {
            let last = got.iter().map(|(_, t)| *t).max().unwrap_or(submitted);
            break (last - submitted).as_secs_f64() * 1e3;
        }
        if Instant::now() > until {
            bail!(
                "{} of {} nodes got the assignment",
                got.len(),
                members.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };

    let horizon = args.hours * 3600.0;
    let node_mtbf = args.mtbf_hours * 3600.0;
    // Virtual time: `v_base` at the real instant `t_base`, advancing `speedup` times faster.
    let mut v_base = placement_ms / 1e3 + args.restart_s;
    let mut t_base = world.started_at(&id, 0).unwrap_or_else(Instant::now);
    let v_now = |v_base: f64, t_base: Instant| -> f64 {
        let now = Instant::now();
        let e = if now >= t_base {
            (now - t_base).as_secs_f64()
        } else {
            -(t_base - now).as_secs_f64()
        };
        v_base + e.max(0.0) * speedup
    };
    let mut repairs: Vec<(f64, String)> = Vec::new();
    let mut failures: Vec<Failure> = Vec::new();
    let mut attempt = 0u32;
    // Counted from the job's start at virtual 0 (not from its real placement time).
    let mut next_fail = exp_sample(&mut rng, node_mtbf / cluster.alive().len().max(1) as f64);
    loop {
        let next_repair = repairs.iter().map(|r| r.0).fold(f64::INFINITY, f64::min);
        let next = next_fail.min(next_repair).min(horizon);
        // Until the event is due (a timer may wake a fraction of a millisecond early, which is
        // seconds of virtual time).
        let now = loop {
            let now = v_now(v_base, t_base);
            if next <= now {
                break now;
            }
            tokio::time::sleep(Duration::from_secs_f64((next - now) / speedup)).await;
        };
        if let Some(p) = world.progress(&id)
            && p.step >= steps
        {
            break;
        }
        if next >= horizon {
            break;
        }
        if next == next_repair {
            let i = repairs.iter().position(|r| r.0 == next_repair).unwrap_or(0);
            let (_, name) = repairs.remove(i);
            cluster.repair(&name);
            continue;
        }
        // A failure, due at `next`: the schedule follows from the seed alone (each failure and
        // repair is timed from the one before on the virtual clock, never from when the real
        // run got to it), so one seed fails the same nodes at the same simulated times. One due
        // while the control plane was busy with the one before is handled as soon as it is done.
        let alive = cluster.alive();
        let Some(victim) =
            (!alive.is_empty()).then(|| alive[rng.random_range(0..alive.len())].clone())
        else {
            next_fail = next + exp_sample(&mut rng, node_mtbf);
            continue;
        };
        let hang = rng.random::<f64>() < args.hang_fraction;
        let in_job = members.contains(&victim);
        let before = world.progress(&id);
        if in_job {
            world.halt(&id);
        }
        let killed_ms = unix_ms();
        let killed_at = Instant::now();
        cluster.fail(&victim, hang);
        repairs.push((next + args.repair_hours * 3600.0, victim.clone()));
        let mut f = Failure {
            at_s: next,
            node: victim.clone(),
            kind: if hang { "hang" } else { "kill" },
            in_job,
            detect_ms: None,
            recovery_s: None,
            replan_ms: None,
            waited_h: 0.0,
            steps_redone: 0,
        };
        if in_job {
            let known = attempt;
            let job = wait_job(
                &mut jobs,
                &id,
                Duration::from_millis(args.heartbeat_timeout_ms) + Duration::from_secs(60),
                "notice the failure",
                |j| {
                    j.recoveries
                        .iter()
                        .any(|r| r.attempt > known && r.cause.contains(victim.as_str()))
                },
            )
            .await?;
            let rec = job
                .recoveries
                .iter()
                .find(|r| r.attempt > known && r.cause.contains(victim.as_str()))
                .cloned()
                .unwrap_or_default();
            attempt = job.recoveries.last().map_or(rec.attempt, |r| r.attempt);
            f.detect_ms = Some(rec.detected_unix_ms as f64 - killed_ms);
            let detected_v = now + f.detect_ms.unwrap_or(0.0).max(0.0) / 1e3;
            // Placed again, or waiting for devices.
            let job = wait_job(&mut jobs, &id, Duration::from_secs(60), "recover", |j| {
                j.recoveries
                    .last()
                    .is_some_and(|r| r.attempt == attempt && r.resumed_unix_ms > 0)
                    || j.state == pb::JobState::Pending as i32
            })
            .await?;
            // From when (real, and virtual) the control plane's work is counted: the kill, or the
            // return of a repaired node the job waited for.
            let (mut from_real, mut from_v) = (killed_at, now);
            let mut job = job;
            while job.state == pb::JobState::Pending as i32
                && !job
                    .recoveries
                    .last()
                    .is_some_and(|r| r.attempt == attempt && r.resumed_unix_ms > 0)
            {
                // No devices: wait for the next repair, in virtual time.
                let Some(i) =
                    (0..repairs.len()).min_by(|&a, &b| repairs[a].0.total_cmp(&repairs[b].0))
                else {
                    bail!("the job waits for devices and no node is being repaired");
                };
                let (at, name) = repairs.remove(i);
                f.waited_h += (at - from_v.max(detected_v)).max(0.0) / 3600.0;
                from_v = from_v.max(at);
                from_real = Instant::now();
                cluster.repair(&name);
                let t = from_real;
                job = wait_job(
                    &mut jobs,
                    &id,
                    Duration::from_secs(60),
                    "recover after a repair",
                    |j| {
                        j.recoveries
                            .last()
                            .is_some_and(|r| r.attempt == attempt && r.resumed_unix_ms > 0)
                            || (j.state == pb::JobState::Pending as i32
                                && t.elapsed() > Duration::from_secs(2))
                    },
                )
                .await?;
            }
            // Training resumes once every node of the new attempt has its assignment (the
            // sim's clock waits for all of them), then the modelled restart and restore.
            let until = Instant::now() + Duration::from_secs(30);
            t_base = loop {
                if let Some(t) = world.started_at(&id, attempt) {
                    break t;
                }
                if Instant::now() > until {
                    bail!("attempt {attempt} never started");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            let last_join = world
                .assigned(&id, attempt)
                .iter()
                .map(|(_, t)| *t)
                .max()
                .unwrap_or(from_real);
            let control_s = last_join.saturating_duration_since(from_real).as_secs_f64();
            let resumed_v = from_v + control_s + args.restart_s + cost.restore_s;
            let rec = job.recoveries.last().cloned().unwrap_or_default();
            f.recovery_s = Some(resumed_v - detected_v);
            f.replan_ms = (rec.replan_us > 0).then(|| rec.replan_us as f64 / 1e3);
            f.steps_redone = before.map_or(0, |p| p.step.saturating_sub(rec.restored_step));
            members = job_nodes(&job);
            v_base = resumed_v;
        }
        failures.push(f);
        next_fail = next + exp_sample(&mut rng, node_mtbf / cluster.alive().len().max(1) as f64);
    }
    let end_v = v_now(v_base, t_base).min(horizon.max(v_base));
    let done = world.progress(&id).map_or(0, |p| p.step);
    let _ = jobs
        .cancel_job(pb::CancelJobRequest { job_id: id.clone() })
        .await;
    watch.abort();
    let mut flagged = Vec::new();
    while let Ok(x) = flag_rx.try_recv() {
        flagged.push(Flagged {
            node: x.node,
            step: x.step,
            busy_s: x.busy_s,
            peers_busy_s: x.peers_busy_s,
        });
    }
    let cpu_s = cpu_ticks(coordinator.pid())? as f64 / clock_ticks();
    let rss = peak_rss_mb(coordinator.pid());
    cluster.stop();

    let detect: Vec<f64> = failures.iter().filter_map(|f| f.detect_ms).collect();
    let recovery: Vec<f64> = failures.iter().filter_map(|f| f.recovery_s).collect();
    let replan: Vec<f64> = failures.iter().filter_map(|f| f.replan_ms).collect();
    let productive = done as f64 * cost.step_s;
    let ettr = productive / end_v.max(1e-9);
    let tokens = done as f64 * cost.tokens as f64;
    let gpus = args.pp * args.dp;
    let gh = end_v / 3600.0 * gpus as f64 / (tokens / 1e12).max(1e-30);
    Ok(Report {
        nodes: args.nodes,
        spares: args.spares,
        gpus,
        model: args.model.clone(),
        pp: args.pp,
        dp: args.dp,
        ep: args.ep,
        schedule: args.schedule.clone(),
        hours: args.hours,
        mtbf_hours: args.mtbf_hours,
        seed: args.seed,
        speedup,
        step_s: cost.step_s,
        tokens_per_step: cost.tokens,
        checkpoint_every: interval,
        steps: done,
        placement_ms,
        job_failures: failures.iter().filter(|f| f.in_job).count(),
        failures: failures.len(),
        detect_p50_ms: quantile(&detect, 0.5),
        detect_p99_ms: quantile(&detect, 0.99),
        recovery_p50_s: quantile(&recovery, 0.5),
        recovery_p99_s: quantile(&recovery, 0.99),
        replan_p50_ms: quantile(&replan, 0.5),
        replan_p99_ms: quantile(&replan, 0.99),
        steps_redone: failures.iter().map(|f| f.steps_redone).sum(),
        ettr,
        coordinator_cpu_s: cpu_s,
        coordinator_peak_rss_mb: rss,
        real_s: real_start.elapsed().as_secs_f64(),
        tflops_per_gpu: cost.tflops_per_gpu,
        gpu_hours_per_trillion_tokens: gh,
        gpu_hours_per_trillion_tokens_no_failures: cost.gpu_hours_per_trillion_tokens,
        paper_gpu_hours_per_trillion_tokens: PAPER_GPU_HOURS_PER_TRILLION_TOKENS,
        stragglers: injected,
        stragglers_flagged: flagged,
        cost,
        failure_log: failures,
    })
}

fn print_report(r: &Report) {
    println!(
        "placed {} ranks on {} nodes in {:.1} ms",
        r.gpus, r.nodes, r.placement_ms
    );
    println!(
        "{} failures ({} hit the job): detection p50 {:.1} ms, p99 {:.1} ms; recovery p50 {:.2} s, p99 {:.2} s; re-plan p50 {:.2} ms, p99 {:.2} ms; {} steps redone",
        r.failures,
        r.job_failures,
        r.detect_p50_ms,
        r.detect_p99_ms,
        r.recovery_p50_s,
        r.recovery_p99_s,
        r.replan_p50_ms,
        r.replan_p99_ms,
        r.steps_redone
    );
    for f in &r.failure_log {
        println!(
            "  {:>9.0} s  {} {}{}{}",
            f.at_s,
            f.kind,
            f.node,
            if f.in_job { "" } else { " (not in the job)" },
            match (f.detect_ms, f.recovery_s) {
                (Some(d), Some(rec)) => format!(
                    ": detected in {d:.1} ms, training again after {rec:.2} s{}, {} steps redone",
                    if f.waited_h > 0.0 {
                        format!(" ({:.2} h waiting for a repaired node)", f.waited_h)
                    } else {
                        String::new()
                    },
                    f.steps_redone
                ),
                _ => String::new(),
            }
        );
    }
    println!(
        "ETTR {:.2}% over {} h: {} steps of {:.2} s ({} tokens each), a checkpoint every {} steps",
        100.0 * r.ettr,
        r.hours,
        r.steps,
        r.step_s,
        r.tokens_per_step,
        r.checkpoint_every
    );
    if !r.stragglers.is_empty() || !r.stragglers_flagged.is_empty() {
        println!("stragglers made: {}", r.stragglers.join(", "));
        for f in &r.stragglers_flagged {
            println!(
                "  flagged {} at step {}: {:.1} s of compute against its peers' {:.1} s",
                f.node, f.step, f.busy_s, f.peers_busy_s
            );
        }
    }
    println!(
        "coordinator: {:.2} s CPU, peak RSS {:.1} MB over {:.1} s real",
        r.coordinator_cpu_s, r.coordinator_peak_rss_mb, r.real_s
    );
    println!(
        "H800 GPU-hours per trillion tokens: {:.0} ({:.0} without failures; the report: {:.0}, ratio {:.2}); {:.0} TFLOP/s per GPU",
        r.gpu_hours_per_trillion_tokens,
        r.gpu_hours_per_trillion_tokens_no_failures,
        r.paper_gpu_hours_per_trillion_tokens,
        r.gpu_hours_per_trillion_tokens / r.paper_gpu_hours_per_trillion_tokens,
        r.tflops_per_gpu
    );
}
