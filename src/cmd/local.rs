//! A local cluster: a coordinator served from this process and node agents as child processes
//! (`shoal worker`), as `shoal up` and `shoal train` run them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use shoal_proto::v1 as pb;
use shoal_proto::v1::cluster_service_client::ClusterServiceClient;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// How long a local cluster waits for its node agents to register.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(60);

/// What to start.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// `--store`: a directory for the embedded store, or `etcd://...`.
    pub store: String,
    /// Where the coordinator listens.
    pub listen: SocketAddr,
    /// Node agents to start.
    pub nodes: usize,
    /// Further node agents offered as spares (used only to replace failed nodes).
    pub spares: usize,
    /// Devices per node.
    pub devices_per_node: u32,
    /// Node names are `{prefix}-{i}` (spares `{prefix}-spare-{i}`).
    pub node_prefix: String,
    /// Start the agents with `--quiet` (no banner).
    pub quiet_agents: bool,
    /// The coordinator fails a node whose agent is silent this long.
    pub heartbeat_timeout: Duration,
    /// Restart an agent that exits, so it rejoins as a fresh node.
    pub restart_agents: bool,
    /// Serve the coordinator's `/metrics` on this address.
    pub http: Option<SocketAddr>,
}

/// How long a node stays failed before its (hung) agent is replaced.
pub const REPLACE_AFTER: Duration = Duration::from_millis(1500);

/// An agent that exited quickly this many times in a row is not restarted again.
const QUICK_EXITS: u32 = 5;
/// An agent that lived less than this exited quickly.
const QUICK: Duration = Duration::from_secs(2);

/// A node agent process that ended.
#[derive(Debug)]
struct Exit {
    name: String,
    status: String,
    /// Whether its supervisor starts it again.
    restarting: bool,
    /// Whether it was given up on (it cannot start, or kept exiting at once).
    gave_up: bool,
}

/// A running local cluster; [`LocalCluster::shutdown`] stops it (dropping it kills the agents).
pub struct LocalCluster {
    /// The coordinator's URL.
    pub url: String,
    /// Where the coordinator serves `/metrics`, when asked to.
    pub http_url: Option<String>,
    /// The HTTP server's task (it holds a handle on the actor: aborted at shutdown).
    http_task: Option<JoinHandle<std::io::Result<()>>>,
    /// A description of the store.
    pub store: String,
    names: Vec<String>,
    supervisors: Vec<JoinHandle<()>>,
    /// Per agent: asks its supervisor to kill and replace it.
    replace: Vec<mpsc::UnboundedSender<()>>,
    /// Per agent: the node epoch it was last replaced at (0: never).
    replaced_at: Vec<u64>,
    /// Per agent: since when (and at which epoch) the coordinator has shown its node failed.
    failed_since: Vec<Option<(u64, Instant)>>,
    exits: mpsc::UnboundedReceiver<Exit>,
    stop_agents: watch::Sender<bool>,
    /// Agent restarts so far.
    pub restarts: usize,
    restart: bool,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<shoal_coordinator::Result<()>>,
    actor: JoinHandle<()>,
}

/// The command line of node agent `name`.
fn agent_command(
    exe: &std::path::Path,
    url: &str,
    name: &str,
    opts: &LocalOptions,
    spare: bool,
) -> Command {
    let mut cmd = Command::new(exe);
    cmd.args([
        "worker",
        "--coordinator",
        url,
        "--node",
        name,
        "--devices",
        &format!("cpu:{}", opts.devices_per_node),
    ]);
    if spare {
        cmd.arg("--spare");
    }
    if opts.quiet_agents {
        cmd.arg("--quiet");
        // `shoal train`'s agents log what goes wrong only (its progress bar says the rest),
        // unless RUST_LOG says otherwise.
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
    }
    // The agents' spans go where this process's go.
    if let Some(e) = crate::telemetry::endpoint() {
        cmd.args(["--otlp-endpoint", e]);
    }
    // The agents reach this coordinator over plain loopback whatever the environment says
    // about TLS for other coordinators.
    for var in [
        "SHOAL_TLS_CA",
        "SHOAL_TLS_CERT",
        "SHOAL_TLS_KEY",
        "SHOAL_COORDINATOR",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
    cmd
}

/// Runs node agent `name` until `stop`; with `restart`, starts it again whenever it exits
/// (after a growing pause, giving up after [`QUICK_EXITS`] quick exits in a row). Every exit
/// is reported on `exits`.
async fn supervise(
    name: String,
    mut make: impl FnMut() -> Command,
    restart: bool,
    mut stop: watch::Receiver<bool>,
    mut replace: mpsc::UnboundedReceiver<()>,
    exits: mpsc::UnboundedSender<Exit>,
) {
    let mut quick = 0;
    let mut pause = Duration::from_millis(50);
    loop {
        let started = Instant::now();
        let mut child: Child = match make().spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = exits.send(Exit {
                    name,
                    status: format!("cannot start: {e}"),
                    restarting: false,
                    gave_up: true,
                });
                return;
            }
        };
        let status = tokio::select! {
            status = child.wait() => status,
            Some(()) = replace.recv() => {
                // The coordinator failed the node while its process lives on (hung): replace it.
                let _ = child.kill().await;
                child.wait().await
            }
            _ = stop.changed() => {
                let _ = child.kill().await;
                return;
            }
        };
        if started.elapsed() < QUICK {
            quick += 1;
        } else {
            quick = 0;
            pause = Duration::from_millis(50);
        }
        let restarting = restart && quick < QUICK_EXITS && !*stop.borrow();
        let status = match status {
            Ok(s) => s.to_string(),
            Err(e) => format!("unknown status: {e}"),
        };
        tracing::warn!(node = %name, %status, restarting, "node agent exited");
        let _ = exits.send(Exit {
            name: name.clone(),
            status,
            restarting,
            gave_up: restart && !restarting && !*stop.borrow(),
        });
        if !restarting {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stop.changed() => return,
        }
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// The coordinator's nodes.
async fn list_nodes(
    client: &mut ClusterServiceClient<tonic::transport::Channel>,
) -> Result<Vec<pb::Node>> {
    Ok(client
        .list_nodes(pb::ListNodesRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("listing nodes: {}", s.message()))?
        .into_inner()
        .nodes)
}

impl LocalCluster {
    /// Starts the coordinator and the agents, each under a supervisor (it does not wait for
    /// them to register).
    pub async fn start(opts: &LocalOptions) -> Result<Self> {
        let exe = std::env::current_exe().context("locating the shoal binary")?;
        let config = shoal_coordinator::actor::ControlConfig {
            heartbeat_timeout: opts.heartbeat_timeout,
            ..Default::default()
        };
        // A local cluster's coordinator is its only one: it does not campaign.
        let (control, actor, store, _) =
            super::cluster::start_control_with(&opts.store, config, None).await?;
        let listener = shoal_coordinator::grpc::bind(opts.listen).await?;
        let addr = listener.local_addr().context("listen address")?;
        let url = format!("http://{addr}");
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(shoal_coordinator::grpc::serve(
            listener,
            control.clone(),
            async {
                let _ = stop_rx.await;
            },
        ));
        let http = match opts.http {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("--http {addr}: cannot listen"))?;
                let at = l.local_addr().context("http address")?;
                let task = tokio::spawn(shoal_coordinator::http::serve(
                    l,
                    control.clone(),
                    std::future::pending(),
                ));
                Some((format!("http://{at}"), task))
            }
            None => None,
        };
        let (http_url, http_task) = http.unzip();
        let (stop_agents, stopped) = watch::channel(false);
        let (exit_tx, exits) = mpsc::unbounded_channel();
        let mut cluster = Self {
            url,
            http_url,
            http_task,
            store,
            names: Vec::new(),
            supervisors: Vec::new(),
            replace: Vec::new(),
            replaced_at: Vec::new(),
            failed_since: Vec::new(),
            exits,
            stop_agents,
            restarts: 0,
            restart: opts.restart_agents,
            stop: Some(stop_tx),
            server,
            actor,
        };
        let agents = (0..opts.nodes)
            .map(|i| (format!("{}-{i}", opts.node_prefix), false))
            .chain((0..opts.spares).map(|i| (format!("{}-spare-{i}", opts.node_prefix), true)));
        for (name, spare) in agents {
            let (exe, url, o) = (exe.clone(), cluster.url.clone(), opts.clone());
            let n = name.clone();
            let make = move || agent_command(&exe, &url, &n, &o, spare);
            let (replace, replace_rx) = mpsc::unbounded_channel();
            cluster.supervisors.push(tokio::spawn(supervise(
                name.clone(),
                make,
                opts.restart_agents,
                stopped.clone(),
                replace_rx,
                exit_tx.clone(),
            )));
            cluster.replace.push(replace);
            cluster.replaced_at.push(0);
            cluster.failed_since.push(None);
            cluster.names.push(name);
        }
        Ok(cluster)
    }

    /// Reports agent exits on stderr; fails, naming the agent and its exit status, when one
    /// was given up on (it cannot start, or kept exiting at once), or with `strict` (before
    /// every agent has registered) when one exited and is not restarted.
    pub fn check_agents(&mut self, strict: bool) -> Result<()> {
        while let Ok(e) = self.exits.try_recv() {
            if e.gave_up || (strict && !e.restarting) {
                bail!("node agent {} exited ({})", e.name, e.status);
            }
            if e.restarting {
                self.restarts += 1;
                eprintln!("node agent {} exited ({}); restarting it", e.name, e.status);
            } else {
                eprintln!("node agent {} exited ({}); not restarted", e.name, e.status);
            }
        }
        Ok(())
    }

    /// Whether agents that exit are restarted.
    pub fn restart_agents(&self) -> bool {
        self.restart
    }

    /// Replaces the agents of nodes the coordinator has shown failed for [`REPLACE_AFTER`]
    /// (a hung agent, stopped or stuck, whose process lives on; an agent that exited is
    /// restarted and registers again well within it), once per failed session.
    pub async fn replace_failed(
        &mut self,
        client: &mut ClusterServiceClient<tonic::transport::Channel>,
    ) -> Result<()> {
        for n in list_nodes(client).await? {
            let Some(i) = self.names.iter().position(|x| *x == n.name) else {
                continue;
            };
            if n.state != pb::NodeState::Failed as i32 {
                self.failed_since[i] = None;
                continue;
            }
            let since = match self.failed_since[i] {
                Some((epoch, t)) if epoch == n.epoch => t,
                _ => {
                    self.failed_since[i] = Some((n.epoch, Instant::now()));
                    continue;
                }
            };
            if since.elapsed() >= REPLACE_AFTER && n.epoch > self.replaced_at[i] {
                self.replaced_at[i] = n.epoch;
                eprintln!(
                    "node {} was failed by the coordinator; replacing its agent",
                    n.name
                );
                let _ = self.replace[i].send(());
            }
        }
        Ok(())
    }

    /// Waits until every agent has registered, failing early if one exits.
    pub async fn wait_registered(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut client = ClusterServiceClient::connect(self.url.clone())
            .await
            .with_context(|| format!("reaching the local coordinator at {}", self.url))?;
        loop {
            self.check_agents(true)?;
            let nodes = list_nodes(&mut client).await?;
            let up = self
                .names
                .iter()
                .filter(|n| {
                    nodes.iter().any(|node| {
                        &&node.name == n
                            && (node.state == pb::NodeState::Healthy as i32
                                || node.state == pb::NodeState::Spare as i32)
                    })
                })
                .count();
            if up == self.names.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{up} of {} node agents registered within {timeout:?}",
                    self.names.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the agents, then stops the server and the control actor.
    pub async fn shutdown(mut self) -> Result<()> {
        let _ = self.stop_agents.send(true);
        for s in &mut self.supervisors {
            let _ = s.await;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.server).await.context("server task")??;
        if let Some(t) = self.http_task.take() {
            t.abort();
            let _ = t.await;
        }
        (&mut self.actor).await.context("control actor")?;
        Ok(())
    }
}
