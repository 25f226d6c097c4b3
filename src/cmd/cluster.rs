//! The control-plane commands: `shoal coordinator`, `shoal worker`, and the clients `submit`,
//! `jobs`, `status`, `watch`, `cancel`, `nodes`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use shoal_coordinator::actor::{Control, ControlConfig};
use shoal_coordinator::grpc::Tls;
use shoal_coordinator::store::EmbeddedStore;
use shoal_proto::v1 as pb;
use shoal_proto::v1::cluster_service_client::ClusterServiceClient;
use shoal_proto::v1::job_service_client::JobServiceClient;
use shoal_spec::job::JobSpec;
use shoal_worker::agent::ClientIdentity;
use tonic::transport::Channel;

/// The coordinator address clients use when neither `--coordinator` nor `SHOAL_COORDINATOR`
/// names one.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:50051";

/// Where to reach the coordinator.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// Coordinator URL (or `SHOAL_COORDINATOR`); with standbys, their URLs too, comma-separated
    /// (the leader is the one that answers).
    #[arg(long, env = "SHOAL_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    pub coordinator: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Bearer token for mutating calls (or `SHOAL_TOKEN`).
    #[arg(long, env = "SHOAL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

/// TLS options of the clients (`shoal worker`, `submit`, `jobs`, ...), for an `https://`
/// coordinator.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientTlsArgs {
    /// Trust this CA certificate (PEM) for an `https://` coordinator (or `SHOAL_TLS_CA`).
    #[arg(long, env = "SHOAL_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a coordinator that requires mutual TLS (or
    /// `SHOAL_TLS_CERT`); needs --tls-key.
    #[arg(long, env = "SHOAL_TLS_CERT", value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert (or `SHOAL_TLS_KEY`).
    #[arg(long, env = "SHOAL_TLS_KEY", value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// Reads the PEM file an option names; errors name the option and the path.
fn read_pem(flag: &str, path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag} {}: cannot read", path.display()))
}

impl ClientTlsArgs {
    /// The CA and client identity the options name, read from their files.
    fn load(&self) -> Result<(Option<Vec<u8>>, Option<ClientIdentity>)> {
        let ca = match &self.tls_ca {
            Some(p) => Some(read_pem("--tls-ca", p)?),
            None => None,
        };
        let identity = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(ClientIdentity {
                cert_pem: read_pem("--tls-cert", cert)?,
                key_pem: read_pem("--tls-key", key)?,
            }),
            (None, None) => None,
            (Some(_), None) => bail!("--tls-cert needs --tls-key"),
            (None, Some(_)) => bail!("--tls-key needs --tls-cert"),
        };
        Ok((ca, identity))
    }
}

impl Target {
    /// A channel to the coordinator: the first of the `--coordinator` URLs that answers (only
    /// a leader listens); TLS for an `https://` URL.
    async fn channel(&self) -> Result<Channel> {
        let (ca, identity) = self.tls.load()?;
        let urls = coordinator_urls(&self.coordinator)?;
        let mut errors = Vec::new();
        for url in &urls {
            let ep = shoal_worker::agent::endpoint(url, ca.as_deref(), identity.as_ref())?;
            match ep
                .connect_timeout(std::time::Duration::from_secs(5))
                .connect()
                .await
            {
                Ok(c) => return Ok(c),
                Err(e) => errors.push(shoal_proto::transport::error_chain(&e)),
            }
        }
        bail!(
            "cannot reach the coordinator at {}: {}",
            self.coordinator,
            errors.join("; ")
        )
    }

    /// `msg` as a request carrying the bearer token, if one is set.
    fn request<T>(&self, msg: T) -> Result<tonic::Request<T>> {
        let mut req = tonic::Request::new(msg);
        // The call joins the caller's trace (a no-op unless spans are exported).
        shoal_proto::trace_context::inject(req.metadata_mut());
        if let Some(t) = &self.token {
            let v =
                shoal_proto::transport::bearer(t).context("--token: not a valid header value")?;
            req.metadata_mut().insert("authorization", v);
        }
        Ok(req)
    }
}

/// The URLs of a `--coordinator` value (comma-separated).
pub(crate) fn coordinator_urls(value: &str) -> Result<Vec<String>> {
    let urls: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect();
    if urls.is_empty() {
        bail!("--coordinator {value:?}: name at least one URL");
    }
    Ok(urls)
}

/// Options of `shoal coordinator`.
#[derive(Debug, Clone, clap::Args)]
pub struct CoordinatorArgs {
    /// Address to listen on (loopback by default; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Serve /metrics (Prometheus) on this address, read-only (loopback by default; port 0:
    /// any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub http: SocketAddr,
    /// The store: a directory for the embedded store (one file, `coordinator.redb`), or
    /// `etcd://HOST:PORT[,HOST:PORT...]` (builds with the `etcd` feature).
    #[arg(long, default_value = "runs/coordinator")]
    pub store: String,
    /// Require this bearer token on mutating calls and node registration (or `SHOAL_TOKEN`).
    #[arg(long, env = "SHOAL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Fail a node whose agent sent no heartbeat for this long (agents heartbeat every 500 ms).
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    pub heartbeat_timeout_ms: u64,
    /// Serve TLS with this certificate chain (PEM, leaf first); needs --tls-key. Clients then
    /// use an `https://` URL.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: require client certificates signed by this CA (PEM); needs --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// With the etcd store, this coordinator's name in the leader election (default: its
    /// listen address). Several coordinators on one etcd elect a leader; only the leader
    /// listens, the others stand by and take over when it is gone.
    #[arg(long)]
    pub name: Option<String>,
    /// TTL of the leader's lease in etcd: a standby takes over within it after the leader dies.
    /// A leader that cannot renew it for 4/5 of it exits, so a store outage must be shorter.
    #[arg(long, default_value_t = shoal_coordinator::leader::DEFAULT_LEADER_LEASE_MS, value_name = "MS")]
    pub leader_lease_ms: u64,
}

impl CoordinatorArgs {
    /// The server TLS the options name, read from their files and checked.
    fn tls(&self) -> Result<Option<Tls>> {
        let (cert, key) = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => (cert, key),
            (None, None) if self.tls_client_ca.is_some() => {
                bail!("--tls-client-ca needs --tls-cert and --tls-key")
            }
            (None, None) => return Ok(None),
            (Some(_), None) => bail!("--tls-cert needs --tls-key"),
            (None, Some(_)) => bail!("--tls-key needs --tls-cert"),
        };
        let tls = Tls {
            cert_pem: read_pem("--tls-cert", cert)?,
            key_pem: read_pem("--tls-key", key)?,
            client_ca_pem: match &self.tls_client_ca {
                Some(p) => Some(read_pem("--tls-client-ca", p)?),
                None => None,
            },
        };
        tls.check().with_context(|| {
            format!(
                "--tls-cert {} / --tls-key {}",
                cert.display(),
                key.display()
            )
        })?;
        Ok(Some(tls))
    }
}

/// Options of `shoal worker`.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// Coordinator URL (or `SHOAL_COORDINATOR`); with standbys, every one's URL, comma-separated:
    /// the agent attaches to the one that answers (the leader) and, when its stream breaks,
    /// finds the next leader while its jobs run on.
    #[arg(long, env = "SHOAL_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    pub coordinator: String,
    /// After its session broke, keep attaching again for this long (jobs running meanwhile)
    /// before stopping the node's jobs and exiting.
    #[arg(long, default_value_t = 30_000, value_name = "MS")]
    pub reconnect_ms: u64,
    /// This node's name (unique in the cluster).
    #[arg(long)]
    pub node: String,
    /// Devices to offer: `cpu:N`, `cuda:all` or `cuda:0,1,...` (GPUs need a build with
    /// `--features cuda`; a CUDA request without a usable GPU falls back to `cpu:1` and says why).
    #[arg(long, default_value = "cpu:1")]
    pub devices: String,
    /// Offer the node as a spare.
    #[arg(long)]
    pub spare: bool,
    /// Where this node's ranks accept data-plane connections from other nodes (port 0: any
    /// free port; the coordinator tells the job's other nodes the address it got).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub data_addr: std::net::SocketAddr,
    /// Serve this node's /metrics (Prometheus) on this address (loopback by default; port 0:
    /// any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub http: std::net::SocketAddr,
    /// Bearer token for registration (or `SHOAL_TOKEN`).
    #[arg(long, env = "SHOAL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    /// No banner (local clusters started by `shoal train`).
    #[arg(long, hide = true)]
    pub quiet: bool,
}

/// The async runtime of every control-plane command: one thread. The coordinator's work per
/// message is small (thin handlers, one control actor), so a second worker thread mostly adds
/// cross-thread wake-ups: with two workers each GetJob round trip cost the coordinator about four
/// futex calls. Blocking work still leaves this thread: store calls go to the blocking pool and
/// node agents run jobs on threads of their own.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM (what `kill`, systemd and Kubernetes send to stop a
/// process). The handlers are installed when this is called (inside the runtime), not when the
/// future is first polled, so a signal right after a caller prints its address is not missed.
#[cfg(unix)]
pub(super) fn ctrl_c() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let int = signal(SignalKind::interrupt());
    let term = signal(SignalKind::terminate());
    async move {
        match (int, term) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
    }
}

/// Resolves on Ctrl-C.
#[cfg(not(unix))]
pub(super) fn ctrl_c() -> impl std::future::Future<Output = ()> + Send + 'static {
    async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// How a coordinator campaigns for the lead of a shared store (only etcd is shared).
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
pub(super) struct Campaign {
    pub me: shoal_coordinator::leader::Candidate,
    pub lease: std::time::Duration,
}

/// The lead a coordinator holds, kept by a task of its own: `lost` resolves with why once it is
/// gone (the coordinator must stop at once); `resign` hands it over.
pub(super) struct Lead {
    pub lost: tokio::sync::oneshot::Receiver<String>,
    resign: tokio::sync::oneshot::Sender<()>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Lead {
    /// Resigns, so that a standby takes over at once.
    pub async fn resign(self) {
        let _ = self.resign.send(());
        let _ = self.keeper.await;
    }
}

/// What [`start_control_with`] started.
pub(super) type Started = (Control, tokio::task::JoinHandle<()>, String, Option<Lead>);

/// Opens the store a `--store` value names and starts the control actor on it with `config`;
/// returns the handle, the actor's task, a description of the store and, when `campaign` is
/// given and the store is shared (etcd), the lead this coordinator waited for.
pub(super) async fn start_control_with(
    store: &str,
    config: ControlConfig,
    campaign: Option<Campaign>,
) -> Result<Started> {
    if let Some(endpoints) = store.strip_prefix("etcd://") {
        return start_etcd(endpoints, config, campaign).await;
    }
    // The embedded store is one process's file (locked while open): no one to elect.
    let path = PathBuf::from(store).join("coordinator.redb");
    let s = EmbeddedStore::open(&path)?;
    let (control, actor) = Control::start_with(s, config).await?;
    Ok((control, actor, path.display().to_string(), None))
}

#[cfg(feature = "etcd")]
async fn start_etcd(
    endpoints: &str,
    config: ControlConfig,
    campaign: Option<Campaign>,
) -> Result<Started> {
    let urls: Vec<String> = endpoints
        .split(',')
        .filter(|e| !e.is_empty())
        .map(|e| format!("http://{e}"))
        .collect();
    if urls.is_empty() {
        bail!("--store etcd://: name at least one HOST:PORT");
    }
    let s = shoal_coordinator::store::EtcdStore::connect(&urls, "shoal/").await?;
    let lead = match campaign {
        Some(c) => Some(lead(s.clone(), c).await?),
        None => None,
    };
    let (control, actor) = Control::start_with(s, config).await?;
    Ok((control, actor, format!("etcd {}", urls.join(",")), lead))
}

/// Waits for the lead of `store`, then keeps it on a task of its own.
#[cfg(feature = "etcd")]
async fn lead<S: shoal_coordinator::store::Store>(store: S, c: Campaign) -> Result<Lead> {
    use shoal_coordinator::leader;
    let mut held = leader::campaign(store, &c.me, c.lease, |holder| {
        eprintln!(
            "coordinator {} standing by: {} leads at {}",
            c.me.name, holder.name, holder.url
        );
    })
    .await?;
    let (lost_tx, lost) = tokio::sync::oneshot::channel();
    let (resign, resign_rx) = tokio::sync::oneshot::channel::<()>();
    let keeper = tokio::spawn(async move {
        tokio::select! {
            why = held.lost() => { let _ = lost_tx.send(why); }
            _ = resign_rx => {
                if let Err(e) = held.resign().await {
                    tracing::warn!(error = %e, "resigning the lead");
                }
            }
        }
    });
    Ok(Lead {
        lost,
        resign,
        keeper,
    })
}

#[cfg(not(feature = "etcd"))]
async fn start_etcd(
    _endpoints: &str,
    _config: ControlConfig,
    _campaign: Option<Campaign>,
) -> Result<Started> {
    bail!(
        "--store etcd://...: this shoal was built without etcd support; build it with \
         `--features etcd` (which needs protoc)"
    )
}

/// Runs `shoal coordinator` until Ctrl-C.
pub fn coordinator(args: &CoordinatorArgs) -> Result<()> {
    let tls = args.tls()?;
    runtime()?.block_on(async {
        let config = ControlConfig {
            heartbeat_timeout: std::time::Duration::from_millis(args.heartbeat_timeout_ms),
            ..Default::default()
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let name = args
            .name
            .clone()
            .unwrap_or_else(|| format!("coordinator@{}", args.listen));
        let campaign = Campaign {
            me: shoal_coordinator::leader::Candidate {
                name: name.clone(),
                url: format!("{scheme}://{}", args.listen),
                since_unix_ms: 0,
            },
            lease: std::time::Duration::from_millis(args.leader_lease_ms),
        };
        // A standby waits here, not listening, until it leads.
        let (control, actor, path, lead) =
            start_control_with(&args.store, config, Some(campaign)).await?;
        let listener = shoal_coordinator::grpc::bind(args.listen).await?;
        let addr = listener.local_addr().context("listen address")?;
        let mutual = match &tls {
            Some(t) if t.client_ca_pem.is_some() => ", mutual TLS",
            _ => "",
        };
        let leads = if lead.is_some() {
            format!(", leading as {name}")
        } else {
            String::new()
        };
        let http = tokio::net::TcpListener::bind(args.http)
            .await
            .with_context(|| format!("--http {}: cannot listen", args.http))?;
        let http_addr = http.local_addr().context("http address")?;
        // Its handle on the actor goes when the task is aborted, after the gRPC server stops
        // (the actor ends once every handle is gone).
        let http_task = tokio::spawn(shoal_coordinator::http::serve(
            http,
            control.clone(),
            std::future::pending(),
        ));
        // Installed before the address is printed: a script may signal as soon as it reads it.
        let interrupted = ctrl_c();
        // The first line of stdout is the address (tests and scripts read it).
        println!("coordinator listening on {scheme}://{addr} (store {path}{mutual}{leads})");
        println!("dashboard at http://{http_addr}/ (metrics at http://{http_addr}/metrics)");
        // On Ctrl-C or SIGTERM: end the agents' sessions and the watches first, so the
        // graceful shutdown does not wait on streams that never end by themselves.
        let closing = control.clone();
        let serve = shoal_coordinator::grpc::serve_with(
            listener,
            control,
            args.token.clone(),
            tls,
            async move {
                interrupted.await;
                eprintln!("coordinator stopping: ending node sessions and watches");
                closing.close().await;
            },
        );
        let Some(mut lead) = lead else {
            serve.await?;
            http_task.abort();
            let _ = http_task.await;
            actor.await.context("control actor")?;
            eprintln!("coordinator stopped");
            return Ok(());
        };
        tokio::select! {
            r = serve => {
                r?;
                lead.resign().await;
            }
            why = &mut lead.lost => {
                let why = why.unwrap_or_else(|_| "the lead keeper ended".into());
                // Stop at once, before a standby can take over: no more writes from here.
                eprintln!("coordinator {name} lost the lead: {why}; exiting");
                std::process::exit(3);
            }
        }
        http_task.abort();
        let _ = http_task.await;
        actor.await.context("control actor")?;
        eprintln!("coordinator stopped");
        Ok(())
    })
}

/// Runs `shoal worker` until Ctrl-C or until the coordinator closes the session.
pub fn worker(args: &WorkerArgs) -> Result<()> {
    let request: shoal_worker::devices::DeviceRequest =
        args.devices.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let offered = request
        .resolve()
        .with_context(|| format!("--devices {}", args.devices))?;
    if let Some(why) = &offered.fallback {
        eprintln!("warning: --devices {}: {why}", args.devices);
        tracing::warn!(devices = %args.devices, reason = %why, "devices fell back to the cpu");
    }
    if offered
        .devices
        .iter()
        .any(|d| d.kind == shoal_worker::devices::DeviceKind::Cuda)
    {
        tracing::info!(
            "gpus registered: an fp32 job with one data-parallel rank on this node trains on its rank's gpu; other jobs train on the cpu (each says why)"
        );
    }
    let device_count = offered.devices.len() as u32;
    let (tls_ca, tls_identity) = args.tls.load()?;
    let cfg = shoal_worker::agent::AgentConfig {
        coordinators: coordinator_urls(&args.coordinator)?,
        reconnect: std::time::Duration::from_millis(args.reconnect_ms),
        node: args.node.clone(),
        devices: offered.devices,
        spare: args.spare,
        token: args.token.clone(),
        tls_ca,
        tls_identity,
        data_addr: Some(args.data_addr),
        metrics: shoal_worker::metrics::AgentMetrics::new(&args.node, device_count),
    };
    runtime()?.block_on(async {
        let http = tokio::net::TcpListener::bind(args.http)
            .await
            .with_context(|| format!("--http {}: cannot listen", args.http))?;
        let http_addr = http.local_addr().context("http address")?;
        tokio::spawn(shoal_worker::metrics::serve(
            http,
            cfg.metrics.clone(),
            std::future::pending(),
        ));
        if !args.quiet {
            eprintln!(
                "worker {} attaching to {} (metrics at http://{http_addr}/metrics)",
                args.node, args.coordinator
            );
        }
        shoal_worker::agent::run(cfg, ctrl_c()).await?;
        Ok(())
    })
}

async fn jobs_client(t: &Target) -> Result<JobServiceClient<Channel>> {
    Ok(JobServiceClient::new(t.channel().await?))
}

/// The error of a command's first call, explained (a TLS mismatch shows up there).
fn first_call_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", shoal_proto::transport::explain(&s))
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

/// A recovery as the `--json` outputs report it.
pub(crate) fn recovery_json(r: &pb::Recovery) -> serde_json::Value {
    serde_json::json!({
        "attempt": r.attempt,
        "cause": r.cause,
        "detected_unix_ms": r.detected_unix_ms,
        "last_heard_unix_ms": r.last_heard_unix_ms,
        "resumed_unix_ms": r.resumed_unix_ms,
        "recovery_ms": r.resumed_unix_ms.saturating_sub(r.detected_unix_ms),
        "failed_step": r.failed_step,
        "restored_step": r.restored_step,
        "steps_redone": r.steps_redone,
        "dp_before": r.dp_before,
        "dp_after": r.dp_after,
        "replan_ms": r.replan_us as f64 / 1e3,
    })
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
        "checkpoint_step": j.checkpoint_step,
        "recoveries": j.recoveries.iter().map(recovery_json).collect::<Vec<_>>(),
    })
}

/// `shoal submit JOB.toml`: prints the job id.
pub fn submit(file: &PathBuf, t: &Target) -> Result<()> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading job file {}", file.display()))?;
    let spec = JobSpec::from_toml(&text, &file.display().to_string())?;
    let wire = shoal_proto::convert::job_spec_to_wire(&spec)?;
    // The root of the job's trace.
    let span = tracing::info_span!("shoal submit", job = %spec.name);
    let _in = span.enter();
    runtime()?.block_on(async {
        let mut c = jobs_client(t).await?;
        let id = c
            .submit_job(t.request(pb::SubmitJobRequest { spec: Some(wire) })?)
            .await
            .map_err(first_call_err)?
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
            .map_err(first_call_err)?
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
            .map_err(first_call_err)?
            .into_inner();
        print_job(&j, t.json);
        Ok(())
    })
}

/// `shoal trace JOB -o FILE`: the Chrome trace the job's rank 0 gathered from every node (one
/// process per node, one track per device thread, times on rank 0's clock), from the job's
/// directory, checked and written to `out`.
pub fn trace(id: &str, out: &std::path::Path, t: &Target) -> Result<()> {
    let j = runtime()?.block_on(async {
        let mut c = jobs_client(t).await?;
        c.get_job(pb::GetJobRequest {
            job_id: id.to_string(),
        })
        .await
        .map_err(first_call_err)
        .map(tonic::Response::into_inner)
    })?;
    let spec = j
        .spec
        .clone()
        .map(shoal_proto::convert::job_spec)
        .transpose()?
        .with_context(|| format!("job {id} has no spec"))?;
    let path = shoal_worker::job::run_dir(&spec).join("trace.json");
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "job {id} ({}) has no trace at {} yet: its rank 0 writes it after the second step \
             (the job is at step {})",
            state_name(j.state),
            path.display(),
            j.step
        ),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let v: serde_json::Value = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a Chrome trace", path.display()))?;
    let events = v["traceEvents"]
        .as_array()
        .with_context(|| format!("{} has no traceEvents", path.display()))?;
    let named = |what: &str| {
        events
            .iter()
            .filter(|e| e["name"] == what && e["ph"] == "M")
            .count()
    };
    let spans: Vec<&serde_json::Value> = events.iter().filter(|e| e["ph"] == "X").collect();
    let (start, end) = spans
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), e| {
            let ts = e["ts"].as_f64().unwrap_or(0.0);
            (a.min(ts), b.max(ts + e["dur"].as_f64().unwrap_or(0.0)))
        });
    std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
    if t.json {
        println!(
            "{}",
            serde_json::json!({
                "job": id, "trace": out.display().to_string(), "processes": named("process_name"),
                "threads": named("thread_name"), "spans": spans.len(),
                "span_ms": if spans.is_empty() { 0.0 } else { (end - start) / 1e3 },
            })
        );
    } else {
        println!(
            "{}: {} processes (nodes), {} threads, {} spans over {:.1} ms; open it in https://ui.perfetto.dev",
            out.display(),
            named("process_name"),
            named("thread_name"),
            spans.len(),
            if spans.is_empty() {
                0.0
            } else {
                (end - start) / 1e3
            }
        );
    }
    Ok(())
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
            .map_err(first_call_err)?
            .into_inner();
        print_job(&j, t.json);
        Ok(())
    })
}

/// `shoal watch JOB`: prints events until the job ends; fails unless it succeeded.
pub fn watch(id: &str, t: &Target) -> Result<()> {
    runtime()?.block_on(async {
        let mut c = jobs_client(t).await?;
        let mut events = watch_stream(&mut c, id).await?;
        let total = c
            .get_job(pb::GetJobRequest {
                job_id: id.to_string(),
            })
            .await
            .map_err(status_err)?
            .into_inner()
            .spec
            .and_then(|s| s.training)
            .map_or(0, |t| t.steps);
        // A progress bar on a terminal (stderr); plain lines otherwise.
        let bar = super::train::progress(total, t.json);
        let say = |line: String| {
            if bar.is_hidden() {
                println!("{line}");
            } else {
                bar.println(line);
            }
        };
        let mut last = pb::JobState::Unspecified as i32;
        let mut reason = String::new();
        loop {
            let ev = match events.message().await {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(s) => {
                    events = watch_again(t, id, &s).await?;
                    continue;
                }
            };
            match ev.event {
                Some(pb::job_event::Event::State(s)) => {
                    last = s.state;
                    reason = s.reason.clone();
                    if t.json {
                        say(serde_json::json!({"state": state_name(s.state), "reason": s.reason}).to_string());
                    } else {
                        say(format!("{id}: {} {}", state_name(s.state), s.reason));
                    }
                }
                Some(pb::job_event::Event::Step(m)) => {
                    if t.json {
                        say(serde_json::json!({"step": m.step, "loss": m.main_loss, "tokens_per_s": m.tokens_per_s}).to_string());
                    } else if bar.is_hidden() {
                        say(format!(
                            "{id}: step {} loss {:.4} {:.0} tok/s",
                            m.step, m.main_loss, m.tokens_per_s
                        ));
                    } else {
                        bar.set_position(m.step);
                        bar.set_message(format!(
                            "loss {:.4} | {:.0} tok/s",
                            m.main_loss, m.tokens_per_s
                        ));
                    }
                }
                Some(pb::job_event::Event::Error(e)) => {
                    if t.json {
                        say(serde_json::json!({"error": e}).to_string());
                    } else {
                        say(format!("{id}: {e}"));
                    }
                }
                Some(pb::job_event::Event::Straggler(x)) => {
                    if t.json {
                        say(serde_json::json!({"straggler": x.node, "step": x.step, "busy_s": x.busy_s, "peers_busy_s": x.peers_busy_s, "steps": x.steps}).to_string());
                    } else {
                        say(format!("{id}: {}", straggler_line(&x)));
                    }
                }
                _ => {}
            }
        }
        bar.finish_and_clear();
        if last != pb::JobState::Succeeded as i32 {
            bail!("job {id} ended {}: {reason}", state_name(last));
        }
        Ok(())
    })
}

/// After the watch of job `id` broke with `broke` (the coordinator went away: a standby is
/// taking over, or it restarts): watches again through whichever of the URLs answers, for up to
/// 30 s.
async fn watch_again(
    t: &Target,
    id: &str,
    broke: &tonic::Status,
) -> Result<tonic::Streaming<pb::JobEvent>> {
    tracing::debug!(error = %broke.message(), "watch stream broken");
    let since = std::time::Instant::now();
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        let again = match jobs_client(t).await {
            Ok(mut c) => watch_stream(&mut c, id).await,
            Err(e) => Err(e),
        };
        match again {
            Ok(e) => return Ok(e),
            Err(e) if since.elapsed() > std::time::Duration::from_secs(30) => {
                return Err(e.context(format!(
                    "watching {id}: the coordinator went away ({})",
                    broke.message()
                )));
            }
            Err(_) => {}
        }
    }
}

/// The events of job `id`, from its current state on.
async fn watch_stream(
    c: &mut JobServiceClient<Channel>,
    id: &str,
) -> Result<tonic::Streaming<pb::JobEvent>> {
    Ok(c.watch_job(pb::WatchJobRequest {
        job_id: id.to_string(),
    })
    .await
    .map_err(first_call_err)?
    .into_inner())
}

/// How a straggler event reads.
pub(crate) fn straggler_line(x: &pb::Straggler) -> String {
    format!(
        "straggler: node {} computed {:.3} s in step {} against its peers' {:.3} s ({} steps in a row)",
        x.node, x.busy_s, x.step, x.peers_busy_s, x.steps
    )
}

/// `shoal cordon NODE` and `shoal drain NODE`.
pub fn cordon(node: &str, drain: bool, t: &Target) -> Result<()> {
    runtime()?.block_on(async {
        let mut c = ClusterServiceClient::new(t.channel().await?);
        let req = t.request(pb::NodeRequest {
            name: node.to_string(),
        })?;
        let n = if drain {
            c.drain_node(req).await
        } else {
            c.cordon_node(req).await
        }
        .map_err(status_err)?
        .into_inner();
        let state = node_state_name(n.state);
        if t.json {
            println!("{}", serde_json::json!({"name": n.name, "state": state}));
        } else {
            println!("{} {state}", n.name);
        }
        Ok(())
    })
}

fn node_state_name(v: i32) -> &'static str {
    match pb::NodeState::try_from(v) {
        Ok(pb::NodeState::Healthy) => "healthy",
        Ok(pb::NodeState::Cordoned) => "cordoned",
        Ok(pb::NodeState::Draining) => "draining",
        Ok(pb::NodeState::Failed) => "failed",
        Ok(pb::NodeState::Spare) => "spare",
        _ => "unknown",
    }
}

/// `, 8 x NVIDIA H200 (sm 9.0, 141 GiB)` for GPU nodes; nothing for CPU shares.
fn device_summary(devices: &[pb::Device]) -> String {
    let gpus: Vec<&pb::Device> = devices
        .iter()
        .filter(|d| d.kind == pb::DeviceKind::Cuda as i32)
        .collect();
    let Some(first) = gpus.first() else {
        return String::new();
    };
    format!(
        ", {} x {} (sm {}, {:.0} GiB)",
        gpus.len(),
        first.name,
        first.compute_capability,
        first.memory_bytes as f64 / f64::from(1u32 << 30)
    )
}

/// `shoal nodes`.
pub fn nodes(t: &Target) -> Result<()> {
    runtime()?.block_on(async {
        let mut c = ClusterServiceClient::new(t.channel().await?);
        let nodes = c
            .list_nodes(pb::ListNodesRequest {})
            .await
            .map_err(first_call_err)?
            .into_inner()
            .nodes;
        let state = node_state_name;
        if t.json {
            let v: Vec<serde_json::Value> = nodes
                .iter()
                .map(|n| {
                    serde_json::json!({
                        "name": n.name, "state": state(n.state), "epoch": n.epoch,
                        "devices": n.devices.len(),
                        "busy": n.devices.iter().filter(|d| !d.job_id.is_empty()).count(),
                        "models": n.devices.iter().map(|d| serde_json::json!({
                            "name": d.name,
                            "memory_bytes": d.memory_bytes,
                            "compute_capability": d.compute_capability,
                            "nvlink_peers": d.nvlink_peers,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            println!("{}", serde_json::Value::Array(v));
        } else {
            for n in &nodes {
                let busy = n.devices.iter().filter(|d| !d.job_id.is_empty()).count();
                println!(
                    "{:<16} {:<9} epoch {:<4} devices {} ({} busy){}",
                    n.name,
                    state(n.state),
                    n.epoch,
                    n.devices.len(),
                    busy,
                    device_summary(&n.devices)
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
    /// Fail a node whose agent sends no heartbeat for this long.
    #[arg(long, default_value_t = 5000)]
    pub heartbeat_timeout_ms: u64,
    /// Further node agents offered as spares: idle until a job needs to replace a failed node.
    #[arg(long, default_value_t = 0)]
    pub spares: usize,
    /// Serve the coordinator's /metrics (Prometheus) on this address (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub http: SocketAddr,
    /// Leave a node agent that exits down (by default it is restarted and rejoins as a fresh
    /// node).
    #[arg(long)]
    pub no_restart: bool,
}

/// Runs `shoal up`: a coordinator and `--nodes` local worker processes until Ctrl-C, then stops
/// them all.
pub fn up(args: &UpArgs) -> Result<()> {
    if args.nodes == 0 || args.gpus_per_node == 0 {
        bail!("--nodes and --gpus-per-node must be at least 1");
    }
    let opts = super::local::LocalOptions {
        store: args.store.clone(),
        listen: args.listen,
        nodes: args.nodes,
        spares: args.spares,
        devices_per_node: args.gpus_per_node,
        node_prefix: "local".into(),
        quiet_agents: false,
        heartbeat_timeout: std::time::Duration::from_millis(args.heartbeat_timeout_ms),
        restart_agents: !args.no_restart,
        http: Some(args.http),
    };
    runtime()?.block_on(async {
        let mut cluster = super::local::LocalCluster::start(&opts).await?;
        println!(
            "coordinator listening on {} with {} local node(s) and {} spare(s) of {} device(s) (store {})",
            cluster.url, args.nodes, args.spares, args.gpus_per_node, cluster.store
        );
        if let Some(h) = &cluster.http_url {
            println!("dashboard at {h}/ (metrics at {h}/metrics)");
        }
        // Report agent exits (and restarts) until Ctrl-C.
        let mut every = tokio::time::interval(std::time::Duration::from_millis(200));
        let mut nodes = shoal_proto::v1::cluster_service_client::ClusterServiceClient::connect(
            cluster.url.clone(),
        )
        .await
        .with_context(|| format!("reaching the local coordinator at {}", cluster.url))?;
        let interrupted = ctrl_c();
        tokio::pin!(interrupted);
        loop {
            tokio::select! {
                () = &mut interrupted => break,
                _ = every.tick() => {
                    if let Err(e) = cluster.check_agents(false) {
                        eprintln!("{e:#}");
                    }
                    if cluster.restart_agents()
                        && let Err(e) = cluster.replace_failed(&mut nodes).await
                    {
                        eprintln!("{e:#}");
                    }
                }
            }
        }
        eprintln!("stopping {} worker(s) and the coordinator", args.nodes);
        cluster.shutdown().await
    })
}
