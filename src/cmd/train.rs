//! `shoal train`: train a DeepSeek-V3 model in this process.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;
use shoal_coordinator::jobs::resolve_model;
use shoal_kernels::ops::linear::Precision;
use shoal_proto::v1 as pb;
use shoal_proto::v1::job_service_client::JobServiceClient;
use shoal_spec::job::{self, JobSpec};
use shoal_worker::data::TokenDtype;
use shoal_worker::job::RunSummary;
use shoal_worker::model::Model;

use super::local::{LocalCluster, LocalOptions, REGISTER_TIMEOUT};
use shoal_proto::v1::cluster_service_client::ClusterServiceClient;

/// Precision modes on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionArg {
    /// FP32 reference.
    Fp32,
    /// BF16 GEMM inputs, FP32 accumulation.
    Bf16,
    /// The DeepSeek-V3 FP8 recipe.
    Fp8,
}

impl From<PrecisionArg> for job::Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::Fp32 => job::Precision::Fp32,
            PrecisionArg::Bf16 => job::Precision::Bf16,
            PrecisionArg::Fp8 => job::Precision::Fp8,
        }
    }
}

impl From<DtypeArg> for job::TokenDtype {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::U16 => job::TokenDtype::U16,
            DtypeArg::U32 => job::TokenDtype::U32,
        }
    }
}

/// Steps between the main job's checkpoints unless told otherwise.
pub const DEFAULT_CHECKPOINT_EVERY: u64 = 10;

/// Options of `shoal train`. Flags override the job file given with `--config`.
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// A TOML job file, as `shoal submit` takes (every field optional here); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model: a preset (`tiny`, `small`) or a directory with config.json and model.safetensors.
    #[arg(long)]
    pub model: Option<String>,
    /// Resume from a checkpoint written by `shoal train` (weights, optimizer, data position).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Optimizer steps.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Precision mode.
    #[arg(long, value_enum)]
    pub precision: Option<PrecisionArg>,
    /// Data: `synthetic`, a token file (`.bin`, little-endian ids) or a text file (bytes).
    #[arg(long)]
    pub data: Option<String>,
    /// Element type of `.bin` token files.
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// Tokens per sequence.
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Sequences per step.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Seed of the initialisation, the data order and the synthetic corpus.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f32>,
    /// Expert-bias update speed gamma.
    #[arg(long)]
    pub gamma: Option<f64>,
    /// Seconds any wait for another device's data (a frame, a collective, a connection) may
    /// take before the job fails naming the peer and the operation (default 120).
    #[arg(long, value_name = "SECONDS")]
    pub comm_timeout: Option<f64>,
    /// Micro-batches per step and data-parallel rank (default: 2 x pp with DualPipe, else 2).
    #[arg(long)]
    pub micro_batches: Option<usize>,
    /// Pipeline ranks: the model cut into this many stages, one device each (default 2).
    #[arg(long)]
    pub pp: Option<usize>,
    /// Pipeline schedule: 1f1b, zb1p, dualpipe or dualpipev (default: dualpipe for an even pp,
    /// else 1f1b).
    #[arg(long)]
    pub schedule: Option<String>,
    /// Data-parallel ranks (ZeRO-1): each a share of every batch and a shard of the optimizer
    /// state (default: as many as the devices hold, nodes x gpus-per-node / pp).
    #[arg(long)]
    pub dp: Option<usize>,
    /// Expert-parallel group size: each group of this many data-parallel ranks spreads the
    /// routed experts over its members and dispatches tokens to them (FP8 in fp8 runs); must
    /// divide --dp (default: 2 where dp is even, else 1).
    #[arg(long)]
    pub ep: Option<usize>,
    /// Node agents of the local cluster (processes; default 2). Ranks on different nodes reach
    /// each other over TCP, ranks of one node through in-memory queues.
    #[arg(long)]
    pub nodes: Option<u32>,
    /// Devices per node agent (default 2, or the job's ranks spread evenly over the nodes when
    /// --dp is given).
    #[arg(long)]
    pub gpus_per_node: Option<u32>,
    /// Write a checkpoint every this many steps (and always at the end); default 10, or the
    /// job file's `checkpointing.interval` when it sets one.
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Further node agents offered as spares: idle until the job needs to replace a failed
    /// node.
    #[arg(long, default_value_t = 0)]
    pub spares: usize,
    /// Leave a node agent that dies down (by default it is restarted and rejoins as a fresh
    /// node, and the job recovers onto it or a spare).
    #[arg(long)]
    pub no_restart: bool,
    /// Output directory: checkpoint/, metrics.jsonl, summary.json.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// End with one JSON summary line on stdout (and no progress bar).
    #[arg(long)]
    pub json: bool,
}

/// Token file element types on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DtypeArg {
    /// Little-endian u16 ids.
    U16,
    /// Little-endian u32 ids.
    U32,
}

impl From<DtypeArg> for TokenDtype {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::U16 => TokenDtype::U16,
            DtypeArg::U32 => TokenDtype::U32,
        }
    }
}

/// The parallelism fields (`pp`, `dp`, `ep`, `schedule`, `micro_batches`) a flag or the job file
/// set.
type Given = std::collections::BTreeSet<String>;

/// The job `shoal train` submits: the `--config` job file (the format `shoal submit` takes, every
/// field optional here), then the flags over it; with the parallelism fields either sets.
fn job_spec(args: &TrainArgs) -> Result<(JobSpec, Given)> {
    let mut given = Given::new();
    let mut spec = match &args.config {
        Some(path) => {
            let text = fs::read_to_string(path)
                .with_context(|| format!("reading job file {}", path.display()))?;
            // The name may be left out here (it is required for `shoal submit`).
            let mut table: toml::Table =
                toml::from_str(&text).with_context(|| format!("job file {}", path.display()))?;
            table
                .entry("name")
                .or_insert_with(|| toml::Value::String("train".into()));
            if let Some(toml::Value::Table(par)) = table.get("parallelism") {
                given.extend(par.keys().cloned());
            }
            let text =
                toml::to_string(&table).with_context(|| format!("job file {}", path.display()))?;
            JobSpec::from_toml(&text, &path.display().to_string())?
        }
        None => JobSpec::from_toml("name = \"train\"", "defaults")?,
    };
    if let Some(m) = &args.model {
        spec.model.clone_from(m);
    }
    if let Some(p) = args.precision {
        spec.precision = p.into();
    }
    if let Some(d) = &args.data {
        spec.data.source.clone_from(d);
    }
    if let Some(d) = args.dtype {
        spec.data.dtype = d.into();
    }
    let t = &mut spec.training;
    t.steps = args.steps.unwrap_or(t.steps);
    t.seq_len = args.seq_len.unwrap_or(t.seq_len);
    t.batch = args.batch.unwrap_or(t.batch);
    t.seed = args.seed.unwrap_or(t.seed);
    if let Some(lr) = args.lr {
        t.lr = f64::from(lr);
    }
    t.gamma = args.gamma.unwrap_or(t.gamma);
    t.comm_timeout_s = args.comm_timeout.unwrap_or(t.comm_timeout_s);
    let par = &mut spec.parallelism;
    for (name, set) in [
        (
            "micro_batches",
            args.micro_batches.map(|m| par.micro_batches = m),
        ),
        ("pp", args.pp.map(|pp| par.pp = pp)),
        (
            "schedule",
            args.schedule.as_ref().map(|s| par.schedule.clone_from(s)),
        ),
        ("dp", args.dp.map(|dp| par.dp = dp)),
        ("ep", args.ep.map(|ep| par.ep = ep)),
    ] {
        if set.is_some() {
            given.insert(name.into());
        }
    }
    if let Some(n) = args.checkpoint_every {
        if n == 0 {
            bail!("--checkpoint-every must be at least 1");
        }
        spec.checkpointing.interval = n;
    } else if spec.checkpointing.interval == 0 {
        // A recovery continues from the newest checkpoint: without periodic ones it would go
        // back to step 0.
        spec.checkpointing.interval = DEFAULT_CHECKPOINT_EVERY;
    }
    if let Some(dir) = &args.resume {
        let dir = fs::canonicalize(dir)
            .with_context(|| format!("--resume {}: no such checkpoint", dir.display()))?;
        spec.model = dir.display().to_string();
        spec.checkpointing.resume = spec.model.clone();
    }
    let out = match (&args.out, spec.checkpointing.dir.as_str()) {
        (Some(out), _) => out.clone(),
        (None, "") => PathBuf::from("runs/train"),
        (None, dir) => PathBuf::from(dir),
    };
    prepare_out(&out)?;
    let out = fs::canonicalize(&out).with_context(|| format!("--out {}", out.display()))?;
    spec.checkpointing.dir = out.display().to_string();
    Ok((spec, given))
}

/// The main job's shape, for every parallelism field neither a flag nor the job file set: a
/// local cluster of 2 nodes x 2 devices, 2 pipeline stages under DualPipe, as many
/// data-parallel ranks as the devices hold, expert-parallel groups of 2 and 2 x pp
/// micro-batches. Returns the cluster: nodes and devices per node.
fn default_shape(
    spec: &mut JobSpec,
    given: &Given,
    args: &TrainArgs,
    model: &shoal_spec::ModelConfig,
) -> Result<(u32, u32)> {
    let has = |f: &str| given.contains(f);
    let nodes = args.nodes.unwrap_or(2);
    if nodes == 0 || args.gpus_per_node == Some(0) {
        bail!("--nodes and --gpus-per-node must be at least 1");
    }
    let par = &mut spec.parallelism;
    if !has("pp") {
        par.pp = 2.min(model.num_hidden_layers.max(1));
    }
    if !has("schedule") {
        par.schedule = if par.pp.is_multiple_of(2) {
            "dualpipe"
        } else {
            "1f1b"
        }
        .into();
    }
    let gpus = match args.gpus_per_node {
        Some(g) => g,
        None if has("dp") => u32::try_from(par.pp.saturating_mul(par.dp))
            .context("--pp x --dp: too many ranks")?
            .div_ceil(nodes),
        None => 2,
    };
    if !has("dp") {
        par.dp = (nodes as usize * gpus as usize / par.pp.max(1)).max(1);
    }
    if !has("ep") {
        let experts = model.n_routed_experts;
        par.ep = if par.dp.is_multiple_of(2) && experts.is_multiple_of(2) && model.has_moe_layers()
        {
            2
        } else {
            1
        };
    }
    if !has("micro_batches") && par.schedule.starts_with("dualpipe") {
        par.micro_batches = 2 * par.pp;
    }
    Ok((nodes, gpus))
}

/// The flag a job-spec field path comes from, for error messages.
fn flag_of(field: &str) -> Option<&'static str> {
    Some(match field.trim_start_matches("spec.") {
        "model" => "--model",
        "precision" => "--precision",
        "training.steps" => "--steps",
        "training.seq_len" => "--seq-len",
        "training.batch" => "--batch",
        "training.lr" => "--lr",
        "training.gamma" => "--gamma",
        "training.comm_timeout_s" => "--comm-timeout",
        "parallelism.micro_batches" => "--micro-batches",
        "parallelism.pp" => "--pp",
        "parallelism.schedule" => "--schedule",
        "parallelism.dp" => "--dp",
        "parallelism.ep" => "--ep",
        "data.source" => "--data",
        _ => return None,
    })
}

/// Loads a model named by a preset or a directory (as a node agent does for a job), saying
/// which MTP tensors a directory lacked.
pub fn load_model(name: &str, precision: Precision, seed: u64) -> Result<Model<f32>> {
    let (model, initialized) = shoal_worker::job::load_model(name, precision, seed)
        .with_context(|| format!("--model {name}"))?;
    if !initialized.is_empty() {
        eprintln!(
            "shoal: {name} has no MTP weights; initialised {} MTP tensors from seed {seed}",
            initialized.len()
        );
    }
    Ok(model)
}

fn prepare_out(out: &Path) -> Result<()> {
    fs::create_dir_all(out)
        .with_context(|| format!("cannot create output directory {}", out.display()))?;
    let probe = out.join(".shoal-write-test");
    fs::write(&probe, b"")
        .with_context(|| format!("output directory {} is not writable", out.display()))?;
    let _ = fs::remove_file(probe);
    Ok(())
}

pub(super) fn progress(steps: u64, quiet: bool) -> ProgressBar {
    let bar = ProgressBar::new(steps);
    if quiet {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    } else {
        let style = ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
    }
    bar
}

/// Runs `shoal train`: a local cluster (this process serves an embedded coordinator, one node
/// agent runs as a child process), the job submitted over gRPC and its progress streamed back.
pub fn run(args: &TrainArgs) -> Result<()> {
    let (mut spec, given) = job_spec(args)?;
    let model = resolve_model(&spec.model).map_err(|e| anyhow::anyhow!("--model: {e}"))?;
    let (nodes, gpus_per_node) = default_shape(&mut spec, &given, args, &model)?;
    spec.validate(&model).map_err(|e| match &e {
        shoal_spec::SpecError::Invalid { field, .. } => match flag_of(field) {
            Some(flag) => anyhow::anyhow!("{flag}: {e}"),
            None => anyhow::anyhow!("{e}"),
        },
        _ => anyhow::anyhow!("{e}"),
    })?;
    let out = PathBuf::from(&spec.checkpointing.dir);
    if !args.json {
        let (params, active) = model.parameter_count();
        let precision = match spec.precision {
            job::Precision::Fp32 => "fp32",
            job::Precision::Bf16 => "bf16",
            job::Precision::Fp8 => "fp8",
        };
        eprintln!(
            "shoal train{}: {} ({:.1}M parameters, {:.1}M active), {precision}, data {}, {} x {} tokens per step, {} steps{}",
            if spec.name == "train" {
                String::new()
            } else {
                format!(" {}", spec.name)
            },
            spec.model,
            params as f64 / 1e6,
            active as f64 / 1e6,
            spec.data.source,
            spec.training.batch,
            spec.training.seq_len,
            spec.training.steps,
            if spec.checkpointing.resume.is_empty() {
                String::new()
            } else {
                " (resuming)".into()
            },
        );
        let par = &spec.parallelism;
        eprintln!(
            "  on {nodes} node(s) x {gpus_per_node} device(s): pp {} ({}, {} micro-batches) x dp {}, ep {}",
            par.pp, par.schedule, par.micro_batches, par.dp, par.ep
        );
    }
    let wire = shoal_proto::convert::job_spec_to_wire(&spec)?;
    let store = tempfile::tempdir().context("a directory for the local coordinator's store")?;
    let opts = LocalOptions {
        store: store.path().display().to_string(),
        listen: "127.0.0.1:0".parse().context("loopback address")?,
        nodes: nodes as usize,
        spares: args.spares,
        // Each agent runs its ranks as threads; ranks on different nodes meet over TCP.
        devices_per_node: gpus_per_node,
        node_prefix: "train".into(),
        quiet_agents: true,
        heartbeat_timeout: shoal_coordinator::actor::ControlConfig::default().heartbeat_timeout,
        restart_agents: !args.no_restart,
        http: None,
    };
    let bar = progress(spec.training.steps, args.json);
    let job = super::cluster::runtime()?.block_on(async {
        let mut cluster = LocalCluster::start(&opts).await?;
        let result = tokio::select! {
            r = drive(&mut cluster, wire, &bar) => r,
            () = super::cluster::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        };
        bar.finish_and_clear();
        let restarts = cluster.restarts;
        cluster.shutdown().await?;
        result.map(|job| (job, restarts))
    })?;
    let (job, restarts) = job;
    if !args.json {
        for r in &job.recoveries {
            eprintln!(
                "recovered from \"{}\": {} ms to run again, back to step {} ({} steps redone, dp {} -> {})",
                r.cause,
                r.resumed_unix_ms.saturating_sub(r.detected_unix_ms),
                r.restored_step,
                r.steps_redone,
                r.dp_before,
                r.dp_after
            );
        }
    }
    let path = out.join("summary.json");
    let text = fs::read_to_string(&path)
        .with_context(|| format!("reading the job's summary {}", path.display()))?;
    let summary: RunSummary = serde_json::from_str(&text)
        .with_context(|| format!("parsing the job's summary {}", path.display()))?;
    if args.json {
        // The summary, with the cluster and the parallelism it ran with.
        let mut v = serde_json::to_value(&summary)?;
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "cluster".into(),
                serde_json::json!({"nodes": nodes, "gpus_per_node": gpus_per_node}),
            );
            o.insert(
                "parallelism".into(),
                serde_json::to_value(&spec.parallelism)?,
            );
            o.insert(
                "recoveries".into(),
                job.recoveries
                    .iter()
                    .map(super::cluster::recovery_json)
                    .collect(),
            );
            o.insert("agent_restarts".into(), restarts.into());
        }
        println!("{v}");
    } else if let (Some(first), Some(last)) = (summary.initial_loss, summary.final_loss) {
        println!(
            "trained {} steps in {:.1}s: loss {first:.4} -> {last:.4}, {:.0} tokens/s, MaxVio {:.3}; checkpoint {}",
            summary.losses.len(),
            summary.seconds,
            summary.tokens_per_s,
            summary
                .max_vio
                .as_deref()
                .unwrap_or_default()
                .iter()
                .copied()
                .fold(0.0, f64::max),
            summary.checkpoint
        );
    }
    Ok(())
}

/// Waits for the local node, submits the job and follows it to the end; returns the job as the
/// coordinator recorded it (with its recoveries).
async fn drive(
    cluster: &mut LocalCluster,
    spec: pb::JobSpec,
    bar: &ProgressBar,
) -> Result<pb::Job> {
    cluster.wait_registered(REGISTER_TIMEOUT).await?;
    let mut jobs = JobServiceClient::connect(cluster.url.clone())
        .await
        .with_context(|| format!("reaching the local coordinator at {}", cluster.url))?;
    let id = jobs
        .submit_job(pb::SubmitJobRequest { spec: Some(spec) })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner()
        .job_id;
    let mut events = jobs
        .watch_job(pb::WatchJobRequest { job_id: id.clone() })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    let mut nodes = ClusterServiceClient::connect(cluster.url.clone())
        .await
        .with_context(|| format!("reaching the local coordinator at {}", cluster.url))?;
    let mut every = tokio::time::interval(std::time::Duration::from_millis(200));
    loop {
        let ev = tokio::select! {
            ev = events.message() => ev,
            _ = every.tick() => {
                // Agents that died are restarted (reported); one that cannot be is an error.
                // A hung one the coordinator failed is replaced.
                bar.suspend(|| cluster.check_agents(false))?;
                if cluster.restart_agents() {
                    cluster.replace_failed(&mut nodes).await?;
                }
                continue;
            }
        };
        let Some(ev) = ev.map_err(|s| anyhow::anyhow!("watching job {id}: {}", s.message()))?
        else {
            bail!("the coordinator closed job {id}'s event stream before it ended");
        };
        match ev.event {
            Some(pb::job_event::Event::Step(m)) => {
                let vio = m.max_vio.iter().copied().fold(0.0, f64::max);
                bar.set_message(format!(
                    "loss {:.4} | {:.0} tok/s | MaxVio {vio:.2}",
                    m.main_loss, m.tokens_per_s
                ));
                bar.set_position(m.step);
            }
            Some(pb::job_event::Event::State(s)) => match pb::JobState::try_from(s.state) {
                Ok(pb::JobState::Succeeded) => break,
                Ok(pb::JobState::Failed) => bail!("job {id} failed: {}", s.reason),
                Ok(pb::JobState::Cancelled) => bail!("job {id} was cancelled: {}", s.reason),
                Ok(pb::JobState::Recovering) => {
                    bar.suspend(|| eprintln!("job {id} is recovering: {}", s.reason));
                }
                Ok(pb::JobState::Running) if !s.reason.is_empty() => {
                    bar.suspend(|| eprintln!("job {id} {}", s.reason));
                }
                _ => {}
            },
            Some(pb::job_event::Event::Error(e)) => {
                bar.suspend(|| eprintln!("job {id}: {e}"));
            }
            Some(pb::job_event::Event::Straggler(x)) => {
                let line = crate::cmd::cluster::straggler_line(&x);
                bar.suspend(|| eprintln!("job {id}: {line}"));
            }
            _ => {}
        }
    }
    let job = jobs
        .get_job(pb::GetJobRequest { job_id: id.clone() })
        .await
        .map_err(|s| anyhow::anyhow!("reading job {id}: {}", s.message()))?
        .into_inner();
    Ok(job)
}
