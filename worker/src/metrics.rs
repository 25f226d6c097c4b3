//! A node agent's Prometheus metrics, served on `/metrics` (OpenMetrics text, names prefixed
//! `shoal_`): per job, the latest step's figures (loss, tokens/s, step time, MaxVio and expert
//! loads per MoE layer, pipeline bubble), bytes moved per transport and operation, checkpoint
//! stalls and writes; per node, the jobs it runs and its sessions with the coordinator.
//!
//! The metrics are atomics the job threads update as steps end; a scrape encodes them.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::train::StepMetrics;

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// Step-time histogram buckets, seconds.
const STEP_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0,
];

/// The agent's metrics (cheap to clone: every field is shared).
#[derive(Clone)]
pub struct AgentMetrics {
    registry: Arc<Registry>,
    node: String,
    step: Family<Labels, Gauge>,
    loss: Family<Labels, FloatGauge>,
    main_loss: Family<Labels, FloatGauge>,
    tokens_per_s: Family<Labels, FloatGauge>,
    step_seconds: Family<Labels, FloatGauge>,
    step_duration: Family<Labels, Histogram>,
    tokens: Family<Labels, Counter>,
    max_vio: Family<Labels, FloatGauge>,
    expert_load: Family<Labels, Gauge>,
    bubble_s: Family<Labels, FloatGauge>,
    bubble_ratio: Family<Labels, FloatGauge>,
    exposed_comm_s: Family<Labels, FloatGauge>,
    bytes: Family<Labels, Counter>,
    checkpoint_stall: Family<Labels, FloatGauge>,
    checkpoints: Family<Labels, Counter>,
    checkpoint_failures: Family<Labels, Counter>,
    jobs_running: Gauge,
    job_failures: Family<Labels, Counter>,
    sessions: Counter,
    devices: Gauge,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMetrics")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl AgentMetrics {
    /// The metrics of node `node` with `devices` devices.
    pub fn new(node: &str, devices: u32) -> Self {
        let mut r = Registry::with_prefix("shoal");
        let step = Family::<Labels, Gauge>::default();
        r.register(
            "step",
            "Latest step a job completed on this node",
            step.clone(),
        );
        let loss = Family::<Labels, FloatGauge>::default();
        r.register(
            "loss",
            "Training objective of the latest step",
            loss.clone(),
        );
        let main_loss = Family::<Labels, FloatGauge>::default();
        r.register(
            "main_loss",
            "Main next-token cross-entropy of the latest step",
            main_loss.clone(),
        );
        let tokens_per_s = Family::<Labels, FloatGauge>::default();
        r.register(
            "tokens_per_second",
            "Training tokens per second over the latest step",
            tokens_per_s.clone(),
        );
        let step_seconds = Family::<Labels, FloatGauge>::default();
        r.register(
            "step_seconds",
            "Wall time of the latest step",
            step_seconds.clone(),
        );
        let step_duration =
            Family::<Labels, Histogram>::new_with_constructor(|| Histogram::new(STEP_BUCKETS));
        r.register(
            "step_duration_seconds",
            "Wall time of every step",
            step_duration.clone(),
        );
        let tokens = Family::<Labels, Counter>::default();
        r.register("tokens", "Training tokens processed", tokens.clone());
        let max_vio = Family::<Labels, FloatGauge>::default();
        r.register(
            "max_vio",
            "MaxVio (max expert load / mean load - 1) per MoE layer, latest step",
            max_vio.clone(),
        );
        let expert_load = Family::<Labels, Gauge>::default();
        r.register(
            "expert_load_tokens",
            "Tokens routed to each expert per MoE layer, latest step",
            expert_load.clone(),
        );
        let bubble_s = Family::<Labels, FloatGauge>::default();
        r.register(
            "pipeline_bubble_seconds",
            "Seconds of the latest step a pipeline rank did not compute (mean over this node's ranks)",
            bubble_s.clone(),
        );
        let bubble_ratio = Family::<Labels, FloatGauge>::default();
        r.register(
            "pipeline_bubble_ratio",
            "Pipeline bubble as a fraction of the latest step",
            bubble_ratio.clone(),
        );
        let exposed_comm_s = Family::<Labels, FloatGauge>::default();
        r.register(
            "exposed_comm_seconds",
            "Seconds a device waited for other devices' frames in the latest step (mean over devices)",
            exposed_comm_s.clone(),
        );
        let bytes = Family::<Labels, Counter>::default();
        r.register(
            "comm_bytes",
            "Bytes devices sent each other, by transport (shm, tcp) and operation",
            bytes.clone(),
        );
        let checkpoint_stall = Family::<Labels, FloatGauge>::default();
        r.register(
            "checkpoint_stall_seconds",
            "Seconds the latest checkpoint held training up (the snapshot; the write runs behind)",
            checkpoint_stall.clone(),
        );
        let checkpoints = Family::<Labels, Counter>::default();
        r.register(
            "checkpoints",
            "Checkpoints written on this node",
            checkpoints.clone(),
        );
        let checkpoint_failures = Family::<Labels, Counter>::default();
        r.register(
            "checkpoint_failures",
            "Checkpoints that could not be written",
            checkpoint_failures.clone(),
        );
        let jobs_running = Gauge::default();
        r.register(
            "agent_jobs_running",
            "Job attempts running on this node",
            jobs_running.clone(),
        );
        let job_failures = Family::<Labels, Counter>::default();
        r.register(
            "agent_job_failures",
            "Job attempts that failed on this node, by whether a retry can succeed",
            job_failures.clone(),
        );
        let sessions = Counter::default();
        r.register(
            "agent_sessions",
            "Sessions opened with a coordinator (more than one: the agent attached again)",
            sessions.clone(),
        );
        let devices_g = Gauge::default();
        r.register(
            "agent_devices",
            "Devices this node offers",
            devices_g.clone(),
        );
        devices_g.set(i64::from(devices));
        Self {
            registry: Arc::new(r),
            node: node.to_string(),
            step,
            loss,
            main_loss,
            tokens_per_s,
            step_seconds,
            step_duration,
            tokens,
            max_vio,
            expert_load,
            bubble_s,
            bubble_ratio,
            exposed_comm_s,
            bytes,
            checkpoint_stall,
            checkpoints,
            checkpoint_failures,
            jobs_running,
            job_failures,
            sessions,
            devices: devices_g,
        }
    }

    fn job(&self, job: &str) -> Labels {
        vec![
            ("job".into(), job.to_string()),
            ("node".into(), self.node.clone()),
        ]
    }

    fn with(&self, job: &str, extra: &[(&str, String)]) -> Labels {
        let mut l = self.job(job);
        l.extend(extra.iter().map(|(k, v)| ((*k).to_string(), v.clone())));
        l
    }

    /// A step of `job` ended.
    pub fn step(&self, job: &str, m: &StepMetrics) {
        let l = self.job(job);
        self.step
            .get_or_create(&l)
            .set(i64::try_from(m.step).unwrap_or(i64::MAX));
        self.loss.get_or_create(&l).set(m.loss);
        self.main_loss.get_or_create(&l).set(m.main_loss);
        let seconds = m.seconds.max(1e-9);
        self.tokens_per_s
            .get_or_create(&l)
            .set(m.tokens as f64 / seconds);
        self.step_seconds.get_or_create(&l).set(m.seconds);
        self.step_duration.get_or_create(&l).observe(m.seconds);
        self.tokens.get_or_create(&l).inc_by(m.tokens as u64);
        for (layer, v) in m.max_vio.iter().enumerate() {
            self.max_vio
                .get_or_create(&self.with(job, &[("layer", layer.to_string())]))
                .set(*v);
        }
        for (layer, loads) in m.expert_loads.iter().enumerate() {
            for (expert, n) in loads.iter().enumerate() {
                let l = self.with(
                    job,
                    &[("layer", layer.to_string()), ("expert", expert.to_string())],
                );
                self.expert_load
                    .get_or_create(&l)
                    .set(i64::try_from(*n).unwrap_or(i64::MAX));
            }
        }
        self.bubble_s.get_or_create(&l).set(m.bubble_s);
        self.bubble_ratio
            .get_or_create(&l)
            .set((m.bubble_s / seconds).clamp(0.0, 1.0));
        self.exposed_comm_s.get_or_create(&l).set(m.exposed_comm_s);
        let c = &m.comm;
        for (transport, n) in [("shm", c.shm), ("tcp", c.tcp)] {
            self.bytes
                .get_or_create(&self.with(
                    job,
                    &[("transport", transport.into()), ("op", "all".into())],
                ))
                .inc_by(n);
        }
        for (op, n) in [
            ("dispatch", c.dispatch),
            ("combine", c.combine),
            ("collective", c.collective),
            ("pipeline", c.pipeline + m.bytes_sent),
        ] {
            self.bytes
                .get_or_create(&self.with(job, &[("transport", "all".into()), ("op", op.into())]))
                .inc_by(n);
        }
    }

    /// A checkpoint of `job` stalled training `stall_s`.
    pub fn checkpoint_stall(&self, job: &str, stall_s: f64) {
        self.checkpoint_stall
            .get_or_create(&self.job(job))
            .set(stall_s);
    }

    /// A checkpoint of `job` was written.
    pub fn checkpoint_written(&self, job: &str) {
        self.checkpoints.get_or_create(&self.job(job)).inc();
    }

    /// A checkpoint of `job` could not be written.
    pub fn checkpoint_failed(&self, job: &str) {
        self.checkpoint_failures.get_or_create(&self.job(job)).inc();
    }

    /// A job attempt started (`+1`) or ended (`-1`) on this node.
    pub fn job_running(&self, delta: i64) {
        self.jobs_running.inc_by(delta);
    }

    /// A job attempt of `job` failed here.
    pub fn job_failed(&self, job: &str, retryable: bool) {
        self.job_failures
            .get_or_create(&self.with(job, &[("retryable", retryable.to_string())]))
            .inc();
    }

    /// A session with a coordinator opened.
    pub fn session_opened(&self) {
        self.sessions.inc();
    }

    /// The devices this node offers.
    pub fn devices(&self) -> i64 {
        self.devices.get()
    }

    /// Every metric, in the OpenMetrics text format Prometheus scrapes.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String does not fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// The content type of [`AgentMetrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `GET /metrics` on `listener` until `shutdown` resolves (other paths: 404).
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: AgentMetrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
                        m.encode(),
                    )
                }
            }),
        )
        .fallback(|| async {
            (
                axum::http::StatusCode::NOT_FOUND,
                "not found: try /metrics\n",
            )
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_shows_in_the_text_with_its_labels() {
        let m = AgentMetrics::new("n1", 2);
        let mut s = StepMetrics {
            step: 7,
            loss: 3.5,
            main_loss: 3.25,
            mtp_loss: 0.0,
            balance_loss: 0.0,
            grad_norm: 1.0,
            lr: 1e-3,
            max_vio: vec![0.5, 0.25],
            expert_loads: vec![vec![3, 1], vec![2, 2]],
            tokens: 256,
            seconds: 0.5,
            busy_s: 0.4,
            bubble_s: 0.1,
            bytes_sent: 0,
            comm: Default::default(),
            exposed_comm_s: 0.05,
            wire_s: 0.0,
            max_target_nodes: 0,
        };
        s.comm.tcp = 1000;
        s.comm.dispatch = 600;
        m.step("job-1", &s);
        m.step("job-1", &s);
        m.checkpoint_stall("job-1", 0.02);
        let text = m.encode();
        for line in [
            "shoal_step{job=\"job-1\",node=\"n1\"} 7",
            "shoal_loss{job=\"job-1\",node=\"n1\"} 3.5",
            "shoal_tokens_per_second{job=\"job-1\",node=\"n1\"} 512.0",
            "shoal_max_vio{job=\"job-1\",node=\"n1\",layer=\"1\"} 0.25",
            "shoal_expert_load_tokens{job=\"job-1\",node=\"n1\",layer=\"0\",expert=\"0\"} 3",
            "shoal_pipeline_bubble_ratio{job=\"job-1\",node=\"n1\"} 0.2",
            "shoal_comm_bytes_total{job=\"job-1\",node=\"n1\",transport=\"tcp\",op=\"all\"} 2000",
            "shoal_comm_bytes_total{job=\"job-1\",node=\"n1\",transport=\"all\",op=\"dispatch\"} 1200",
            "shoal_tokens_total{job=\"job-1\",node=\"n1\"} 512",
            "shoal_checkpoint_stall_seconds{job=\"job-1\",node=\"n1\"} 0.02",
            "shoal_step_duration_seconds_count{job=\"job-1\",node=\"n1\"} 2",
            "shoal_agent_devices 2",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
