//! A local cluster: a coordinator served from this process and node agents as child processes
//! (`shoal worker`), as `shoal up` and `shoal train` run them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use shoal_proto::v1 as pb;
use shoal_proto::v1::cluster_service_client::ClusterServiceClient;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
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
    /// Devices per node.
    pub devices_per_node: u32,
    /// Node names are `{prefix}-{i}`.
    pub node_prefix: String,
    /// Start the agents with `--quiet` (no banner).
    pub quiet_agents: bool,
    /// The coordinator fails a node whose agent is silent this long.
    pub heartbeat_timeout: Duration,
}

/// A running local cluster; [`LocalCluster::shutdown`] stops it (dropping it kills the agents).
pub struct LocalCluster {
    /// The coordinator's URL.
    pub url: String,
    /// A description of the store.
    pub store: String,
    names: Vec<String>,
    agents: Vec<Child>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<shoal_coordinator::Result<()>>,
    actor: JoinHandle<()>,
}

impl LocalCluster {
    /// Starts the coordinator and the agents (it does not wait for them to register).
    pub async fn start(opts: &LocalOptions) -> Result<Self> {
        let exe = std::env::current_exe().context("locating the shoal binary")?;
        let config = shoal_coordinator::actor::ControlConfig {
            heartbeat_timeout: opts.heartbeat_timeout,
        };
        let (control, actor, store) =
            super::cluster::start_control_with(&opts.store, config).await?;
        let listener = shoal_coordinator::grpc::bind(opts.listen).await?;
        let addr = listener.local_addr().context("listen address")?;
        let url = format!("http://{addr}");
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(shoal_coordinator::grpc::serve(listener, control, async {
            let _ = stop_rx.await;
        }));
        let mut cluster = Self {
            url,
            store,
            names: Vec::new(),
            agents: Vec::new(),
            stop: Some(stop_tx),
            server,
            actor,
        };
        for i in 0..opts.nodes {
            let name = format!("{}-{i}", opts.node_prefix);
            let mut cmd = Command::new(&exe);
            cmd.args([
                "worker",
                "--coordinator",
                &cluster.url,
                "--node",
                &name,
                "--devices",
                &format!("cpu:{}", opts.devices_per_node),
            ]);
            if opts.quiet_agents {
                cmd.arg("--quiet");
            }
            // The agents reach this coordinator over plain loopback whatever the environment
            // says about TLS for other coordinators.
            for var in [
                "SHOAL_TLS_CA",
                "SHOAL_TLS_CERT",
                "SHOAL_TLS_KEY",
                "SHOAL_COORDINATOR",
            ] {
                cmd.env_remove(var);
            }
            let child = cmd
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting node agent {name}"))?;
            cluster.names.push(name);
            cluster.agents.push(child);
        }
        Ok(cluster)
    }

    /// Fails if an agent process has exited, naming it and its exit status.
    pub fn check_agents(&mut self) -> Result<()> {
        for (name, child) in self.names.iter().zip(&mut self.agents) {
            if let Some(status) = child.try_wait().context("checking a node agent")? {
                bail!("node agent {name} exited ({status})");
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
            self.check_agents()?;
            let nodes = client
                .list_nodes(pb::ListNodesRequest {})
                .await
                .map_err(|s| anyhow::anyhow!("listing nodes: {}", s.message()))?
                .into_inner()
                .nodes;
            let up = self
                .names
                .iter()
                .filter(|n| {
                    nodes
                        .iter()
                        .any(|node| &&node.name == n && node.state == pb::NodeState::Healthy as i32)
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
        for a in &mut self.agents {
            let _ = a.kill().await;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.server).await.context("server task")??;
        (&mut self.actor).await.context("control actor")?;
        Ok(())
    }
}
