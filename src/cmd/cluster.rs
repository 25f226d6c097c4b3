//! The control-plane commands: `shoal coordinator`, `shoal worker`, and the clients `submit`,
//! `jobs`, `status`, `watch`, `cancel`, `nodes`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use shoal_coordinator::actor::Control;
use shoal_coordinator::store::EmbeddedStore;
use shoal_proto::v1 as pb;
use shoal_proto::v1::cluster_service_client::ClusterServiceClient;
use shoal_proto::v1::job_service_client::JobServiceClient;
use shoal_spec::job::JobSpec;

/// The coordinator address clients use when neither `--coordinator` nor `SHOAL_COORDINATOR`
/// names one.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:50051";

/// Where to reach the coordinator.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// Coordinator URL (or `SHOAL_COORDINATOR`).
    #[arg(long, env = "SHOAL_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    pub coordinator: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Bearer token for mutating calls (or `SHOAL_TOKEN`).
    #[arg(long, env = "SHOAL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl Target {
    /// `msg` as a request carrying the bearer token, if one is set.
    fn request<T>(&self, msg: T) -> Result<tonic::Request<T>> {
        let mut req = tonic::Request::new(msg);
        if let Some(t) = &self.token {
            let v = format!("Bearer {t}")
                .parse()
                .context("--token: not a valid header value")?;
            req.metadata_mut().insert("authorization", v);
        }
        Ok(req)
    }
}

/// Options of `shoal coordinator`.
#[derive(Debug, Clone, clap::Args)]
pub struct CoordinatorArgs {
    /// Address to listen on (loopback by default; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// The store: a directory for the embedded store (one file, `coordinator.redb`), or
    /// `etcd://HOST:PORT[,HOST:PORT...]` (builds with the `etcd` feature).
    #[arg(long, default_value = "runs/coordinator")]
    pub store: String,
    /// Require this bearer token on mutating calls and node registration (or `SHOAL_TOKEN`).
    #[arg(long, env = "SHOAL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Options of `shoal worker`.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// Coordinator URL (or `SHOAL_COORDINATOR`).
    #[arg(long, env = "SHOAL_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    pub coordinator: String,
    /// This node's name (unique in the cluster).
    #[arg(long)]
    pub node: String,
    /// Devices to offer: `cpu:N`.
    #[arg(long, default_value = "cpu:1")]
    pub devices: String,
    /// Offer the node as a spare.
    #[arg(long)]
    pub spare: bool,
    /// Bearer token for registration (or `SHOAL_TOKEN`).
    #[arg(long, env = "SHOAL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn ctrl_c() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Opens the store a `--store` value names and starts the control actor on it; returns the
/// handle, the actor's task and a description of the store.
async fn start_control(store: &str) -> Result<(Control, tokio::task::JoinHandle<()>, String)> {
    if let Some(endpoints) = store.strip_prefix("etcd://") {
        return start_etcd(endpoints).await;
    }
    let path = PathBuf::from(store).join("coordinator.redb");
    let s = EmbeddedStore::open(&path)?;
    let (control, actor) = Control::start(s).await?;
    Ok((control, actor, path.display().to_string()))
}

#[cfg(feature = "etcd")]
async fn start_etcd(endpoints: &str) -> Result<(Control, tokio::task::JoinHandle<()>, String)> {
    let urls: Vec<String> = endpoints
        .split(',')
        .filter(|e| !e.is_empty())
        .map(|e| format!("http://{e}"))
        .collect();
    if urls.is_empty() {
        bail!("--store etcd://: name at least one HOST:PORT");
    }
    let s = shoal_coordinator::store::EtcdStore::connect(&urls, "shoal/").await?;
    let (control, actor) = Control::start(s).await?;
    Ok((control, actor, format!("etcd {}", urls.join(","))))
}

#[cfg(not(feature = "etcd"))]
async fn start_etcd(_endpoints: &str) -> Result<(Control, tokio::task::JoinHandle<()>, String)> {
    bail!(
        "--store etcd://...: this shoal was built without etcd support; build it with \
         `--features etcd` (which needs protoc)"
    )
}

/// Runs `shoal coordinator` until Ctrl-C.
pub fn coordinator(args: &CoordinatorArgs) -> Result<()> {
    runtime()?.block_on(async {
        let (control, actor, path) = start_control(&args.store).await?;
        let listener = shoal_coordinator::grpc::bind(args.listen).await?;
        let addr = listener.local_addr().context("listen address")?;
        // The first line of stdout is the address (tests and scripts read it).
        println!("coordinator listening on http://{addr} (store {path})");
        shoal_coordinator::grpc::serve_with(listener, control, args.token.clone(), ctrl_c())
            .await?;
        actor.await.context("control actor")?;
        eprintln!("coordinator stopped");
        Ok(())
    })
}

fn parse_devices(s: &str) -> Result<u32> {
    let Some(n) = s.strip_prefix("cpu:") else {
        bail!("--devices {s}: expected cpu:N (CUDA devices come with the CUDA path)");
    };
    let n: u32 = n
        .parse()
        .with_context(|| format!("--devices {s}: N must be a number"))?;
    if n == 0 {
        bail!("--devices {s}: at least one device");
    }
    Ok(n)
}

/// Runs `shoal worker` until Ctrl-C or until the coordinator closes the session.
pub fn worker(args: &WorkerArgs) -> Result<()> {
    let cpu_devices = parse_devices(&args.devices)?;
    let cfg = shoal_worker::agent::AgentConfig {
        coordinator: args.coordinator.clone(),
        node: args.node.clone(),
        cpu_devices,
        spare: args.spare,
        token: args.token.clone(),
    };
    runtime()?.block_on(async {
        eprintln!("worker {} attaching to {}", args.node, args.coordinator);
        shoal_worker::agent::run(cfg, ctrl_c()).await?;
        Ok(())
    })
}

async fn jobs_client(t: &Target) -> Result<JobServiceClient<tonic::transport::Channel>> {
    JobServiceClient::connect(t.coordinator.clone())
        .await
        .with_context(|| format!("cannot reach the coordinator at {}", t.coordinator))
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

fn state_name(v: i32) -> &'static str {
    match pb::JobState::try_from(v) {
        Ok(pb::JobState::Pending) => "pending",
        Ok(pb::JobState::Scheduling) => "scheduling",
        Ok(pb::JobState::Running) => "running",
        Ok(pb::JobState::Recovering) => "recovering",
        Ok(pb::JobState::Succeeded) => "succeeded",
        Ok(pb::JobState::Failed) => "failed",
        Ok(pb::JobState::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

fn job_json(j: &pb::Job) -> serde_json::Value {
    serde_json::json!({
        "id": j.id,
        "name": j.spec.as_ref().map(|s| s.name.clone()),
        "state": state_name(j.state),
        "reason": j.reason,
        "step": j.step,
        "placement": j.placement.iter().map(|p| serde_json::json!({
            "pp_rank": p.pp_rank, "dp_rank": p.dp_rank, "node": p.node, "device": p.device,
        })).collect::<Vec<_>>(),
    })
}

/// `shoal submit JOB.toml`: prints the job id.
pub fn submit(file: &PathBuf, t: &Target) -> Result<()> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading job file {}", file.display()))?;
    let spec = JobSpec::from_toml(&text, &file.display().to_string())?;
    let wire = shoal_proto::convert::job_spec_to_wire(&spec)?;
    runtime()?.block_on(async {
        let mut c = jobs_client(t).await?;
        let id = c
            .submit_job(t.request(pb::SubmitJobRequest { spec: Some(wire) })?)
            .await
            .map_err(status_err)?
            .into_inner()
            .job_id;
        if t.json {
            println!("{}", serde_json::json!({ "job_id": id }));
        } else {
            println!("{id}");
        }
        Ok(())
    })
}

/// `shoal jobs`.
pub fn jobs(t: &Target) -> Result<()> {
    runtime()?.block_on(async {
        let mut c = jobs_client(t).await?;
        let jobs = c
            .list_jobs(pb::ListJobsRequest { states: vec![] })
            .await
            .map_err(status_err)?
            .into_inner()
            .jobs;
        if t.json {
            println!(
                "{}",
                serde_json::Value::Array(jobs.iter().map(job_json).collect())
            );
        } else {
            for j in &jobs {
                let name = j.spec.as_ref().map_or("", |s| s.name.as_str());
                println!(
                    "{:<10} {:<20} {:<11} step {:<6} {}",
                    j.id,
                    name,
                    state_name(j.state),
                    j.step,
                    j.reason
                );
            }
        }
        Ok(())
    })
}

/// `shoal status JOB`.
pub fn status(id: &str, t: &Target) -> Result<()> {
    runtime()?.block_on(async {
        let mut c = jobs_client(t).await?;
        let j = c
            .get_job(pb::GetJobRequest {
                job_id: id.to_string(),
            })
            .await
            .map_err(status_err)?
            .into_inner();
        print_job(&j, t.json);
        Ok(())
    })
}

fn print_job(j: &pb::Job, json: bool) {
    if json {
        println!("{}", job_json(j));
    } else {
        println!(
            "{} {} step {} {}",
            j.id,
            state_name(j.state),
            j.step,
            j.reason
        );
    }
}

/// `shoal cancel JOB`.
pub fn cancel(id: &str, t: &Target) -> Result<()> {
    runtime()?.block_on(async {
        let mut c = jobs_client(t).await?;
        let j = c
            .cancel_job(t.request(pb::CancelJobRequest {
                job_id: id.to_string(),
            })?)
            .await
            .map_err(status_err)?
            .into_inner();
        print_job(&j, t.json);
        Ok(())
    })
}

/// `shoal watch JOB`: prints events until the job ends; fails unless it succeeded.
pub fn watch(id: &str, t: &Target) -> Result<()> {
    runtime()?.block_on(async {
        let mut c = jobs_client(t).await?;
        let mut events = c
            .watch_job(pb::WatchJobRequest {
                job_id: id.to_string(),
            })
            .await
            .map_err(status_err)?
            .into_inner();
        let mut last = pb::JobState::Unspecified as i32;
        let mut reason = String::new();
        while let Some(ev) = events.message().await.map_err(status_err)? {
            match ev.event {
                Some(pb::job_event::Event::State(s)) => {
                    last = s.state;
                    reason = s.reason.clone();
                    if t.json {
                        println!("{}", serde_json::json!({"state": state_name(s.state), "reason": s.reason}));
                    } else {
                        println!("{id}: {} {}", state_name(s.state), s.reason);
                    }
                }
                Some(pb::job_event::Event::Step(m)) => {
                    if t.json {
                        println!(
                            "{}",
                            serde_json::json!({"step": m.step, "loss": m.main_loss, "tokens_per_s": m.tokens_per_s})
                        );
                    } else {
                        println!(
                            "{id}: step {} loss {:.4} {:.0} tok/s",
                            m.step, m.main_loss, m.tokens_per_s
                        );
                    }
                }
                _ => {}
            }
        }
        if last != pb::JobState::Succeeded as i32 {
            bail!("job {id} ended {}: {reason}", state_name(last));
        }
        Ok(())
    })
}

/// `shoal nodes`.
pub fn nodes(t: &Target) -> Result<()> {
    runtime()?.block_on(async {
        let mut c = ClusterServiceClient::connect(t.coordinator.clone())
            .await
            .with_context(|| format!("cannot reach the coordinator at {}", t.coordinator))?;
        let nodes = c
            .list_nodes(pb::ListNodesRequest {})
            .await
            .map_err(status_err)?
            .into_inner()
            .nodes;
        let state = |v: i32| match pb::NodeState::try_from(v) {
            Ok(pb::NodeState::Healthy) => "healthy",
            Ok(pb::NodeState::Cordoned) => "cordoned",
            Ok(pb::NodeState::Draining) => "draining",
            Ok(pb::NodeState::Failed) => "failed",
            Ok(pb::NodeState::Spare) => "spare",
            _ => "unknown",
        };
        if t.json {
            let v: Vec<serde_json::Value> = nodes
                .iter()
                .map(|n| {
                    serde_json::json!({
                        "name": n.name, "state": state(n.state), "epoch": n.epoch,
                        "devices": n.devices.len(),
                        "busy": n.devices.iter().filter(|d| !d.job_id.is_empty()).count(),
                    })
                })
                .collect();
            println!("{}", serde_json::Value::Array(v));
        } else {
            for n in &nodes {
                let busy = n.devices.iter().filter(|d| !d.job_id.is_empty()).count();
                println!(
                    "{:<16} {:<9} epoch {:<4} devices {} ({} busy)",
                    n.name,
                    state(n.state),
                    n.epoch,
                    n.devices.len(),
                    busy
                );
            }
        }
        Ok(())
    })
}

/// Options of `shoal up`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Local node agents to start (one process each).
    #[arg(long, default_value_t = 2)]
    pub nodes: usize,
    /// Devices per node (CPU devices here).
    #[arg(long, default_value_t = 1)]
    pub gpus_per_node: u32,
    /// Address to listen on (loopback by default; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// The store: a directory for the embedded store, or `etcd://HOST:PORT[,...]`.
    #[arg(long, default_value = "runs/coordinator")]
    pub store: String,
}

/// Runs `shoal up`: a coordinator and `--nodes` local worker processes until Ctrl-C, then stops
/// them all.
pub fn up(args: &UpArgs) -> Result<()> {
    if args.nodes == 0 || args.gpus_per_node == 0 {
        bail!("--nodes and --gpus-per-node must be at least 1");
    }
    let exe = std::env::current_exe().context("locating the shoal binary")?;
    runtime()?.block_on(async {
        let (control, actor, path) = start_control(&args.store).await?;
        let listener = shoal_coordinator::grpc::bind(args.listen).await?;
        let addr = listener.local_addr().context("listen address")?;
        let url = format!("http://{addr}");
        println!(
            "coordinator listening on {url} with {} local node(s) of {} device(s) (store {path})",
            args.nodes, args.gpus_per_node
        );
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(shoal_coordinator::grpc::serve(listener, control, async {
            let _ = stop_rx.await;
        }));
        let mut workers = Vec::new();
        for i in 0..args.nodes {
            let child = tokio::process::Command::new(&exe)
                .args([
                    "worker",
                    "--coordinator",
                    &url,
                    "--node",
                    &format!("local-{i}"),
                    "--devices",
                    &format!("cpu:{}", args.gpus_per_node),
                ])
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting worker local-{i}"))?;
            workers.push(child);
        }
        ctrl_c().await;
        eprintln!("stopping {} worker(s) and the coordinator", workers.len());
        for w in &mut workers {
            let _ = w.kill().await;
        }
        let _ = stop_tx.send(());
        server.await.context("server task")??;
        actor.await.context("control actor")?;
        Ok(())
    })
}
