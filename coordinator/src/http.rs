//! The coordinator's HTTP side (read-only, loopback by default): the dashboard (`/`,
//! `/jobs/{id}`, and the JSON its pages poll, `/api/cluster`, `/api/jobs/{id}`; see
//! [`crate::dashboard`]), and `/metrics` in the OpenMetrics text format Prometheus scrapes,
//! names prefixed `shoal_`. Anything else is a 404 page. Every scrape asks the control actor
//! for a [`Snapshot`] and renders it: jobs by state and the queue, nodes and devices by state,
//! each job's progress and latest step (loss, tokens/s, step time, MaxVio and expert loads per
//! MoE layer, pipeline bubble), and its failures (detection and recovery times, steps redone).
//!
//! Handlers stay thin: ask the actor, render, reply.

use std::sync::atomic::AtomicU64;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::actor::{Control, Snapshot};
use crate::dashboard;
use crate::jobs::JobState;
use crate::nodes::NodeState;

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// The content type of `/metrics`.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Recovery and detection histogram buckets, seconds.
const RECOVERY_BUCKETS: [f64; 12] = [
    0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];

/// A job state's name as the API spells it.
pub fn job_state_name(s: JobState) -> &'static str {
    match s {
        JobState::Pending => "pending",
        JobState::Scheduling => "scheduling",
        JobState::Running => "running",
        JobState::Recovering => "recovering",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

/// A node state's name as the API spells it.
pub fn node_state_name(s: NodeState) -> &'static str {
    match s {
        NodeState::Healthy => "healthy",
        NodeState::Cordoned => "cordoned",
        NodeState::Draining => "draining",
        NodeState::Failed => "failed",
        NodeState::Spare => "spare",
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

/// The snapshot as OpenMetrics text.
pub fn render_metrics(s: &Snapshot) -> String {
    let mut r = Registry::with_prefix("shoal");

    let jobs = Family::<Labels, Gauge>::default();
    r.register("jobs", "Jobs by state", jobs.clone());
    for state in [
        JobState::Pending,
        JobState::Scheduling,
        JobState::Running,
        JobState::Recovering,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ] {
        let n = s.jobs.iter().filter(|j| j.state == state).count();
        jobs.get_or_create(&labels(&[("state", job_state_name(state))]))
            .set(n as i64);
    }
    let queue = Gauge::<i64>::default();
    r.register(
        "queue_length",
        "Jobs waiting for devices (pending)",
        queue.clone(),
    );
    queue.set(
        s.jobs
            .iter()
            .filter(|j| j.state == JobState::Pending)
            .count() as i64,
    );

    let nodes = Family::<Labels, Gauge>::default();
    r.register("nodes", "Nodes by state", nodes.clone());
    let devices = Family::<Labels, Gauge>::default();
    r.register(
        "devices",
        "Devices by their node's state and whether a job holds them",
        devices.clone(),
    );
    for state in [
        NodeState::Healthy,
        NodeState::Cordoned,
        NodeState::Draining,
        NodeState::Failed,
        NodeState::Spare,
    ] {
        let of: Vec<_> = s.nodes.iter().filter(|n| n.record.state == state).collect();
        let name = node_state_name(state);
        nodes
            .get_or_create(&labels(&[("state", name)]))
            .set(of.len() as i64);
        let busy: usize = of.iter().map(|n| n.busy.len()).sum();
        let all: usize = of.iter().map(|n| n.record.devices).sum();
        devices
            .get_or_create(&labels(&[("node_state", name), ("use", "busy")]))
            .set(busy as i64);
        devices
            .get_or_create(&labels(&[("node_state", name), ("use", "free")]))
            .set(all.saturating_sub(busy) as i64);
    }
    let node_up = Family::<Labels, Gauge>::default();
    r.register(
        "node_up",
        "Per node: 1 while its agent is attached and heartbeating (healthy, cordoned, draining or spare), 0 once failed",
        node_up.clone(),
    );
    for n in &s.nodes {
        node_up
            .get_or_create(&labels(&[
                ("node", &n.record.name),
                ("state", node_state_name(n.record.state)),
            ]))
            .set(i64::from(n.record.state != NodeState::Failed));
    }

    let step = Family::<Labels, Gauge>::default();
    r.register("job_step", "Steps a job has completed", step.clone());
    let steps_total = Family::<Labels, Gauge>::default();
    r.register(
        "job_steps",
        "Steps a job's spec asks for",
        steps_total.clone(),
    );
    let attempt = Family::<Labels, Gauge>::default();
    r.register(
        "job_attempt",
        "A job's current attempt (0 until its first recovery)",
        attempt.clone(),
    );
    let checkpoint = Family::<Labels, Gauge>::default();
    r.register(
        "job_checkpoint_step",
        "Step of a job's newest committed checkpoint",
        checkpoint.clone(),
    );
    let ranks = Family::<Labels, Gauge>::default();
    r.register("job_ranks", "Devices a job is placed on", ranks.clone());
    let loss = Family::<Labels, FloatGauge>::default();
    r.register(
        "job_loss",
        "A job's latest training objective",
        loss.clone(),
    );
    let main_loss = Family::<Labels, FloatGauge>::default();
    r.register(
        "job_main_loss",
        "A job's latest main next-token cross-entropy",
        main_loss.clone(),
    );
    let tps = Family::<Labels, FloatGauge>::default();
    r.register(
        "job_tokens_per_second",
        "A job's training tokens per second over its latest step",
        tps.clone(),
    );
    let step_s = Family::<Labels, FloatGauge>::default();
    r.register(
        "job_step_seconds",
        "Wall time of a job's latest step",
        step_s.clone(),
    );
    let bubble = Family::<Labels, FloatGauge>::default();
    r.register(
        "job_pipeline_bubble_ratio",
        "Fraction of a job's latest step its pipeline ranks did not compute",
        bubble.clone(),
    );
    let max_vio = Family::<Labels, FloatGauge>::default();
    r.register(
        "job_max_vio",
        "MaxVio per MoE layer of a job's latest step",
        max_vio.clone(),
    );
    let expert_load = Family::<Labels, Gauge>::default();
    r.register(
        "job_expert_load_tokens",
        "Tokens routed to each expert per MoE layer in a job's latest reported step",
        expert_load.clone(),
    );
    let failures = Family::<Labels, Counter>::default();
    r.register(
        "job_failures",
        "Failures a job recovered from (or is recovering from)",
        failures.clone(),
    );
    let redone = Family::<Labels, Counter>::default();
    r.register(
        "job_steps_redone",
        "Steps a job ran again after its recoveries",
        redone.clone(),
    );
    let detection = Histogram::new(RECOVERY_BUCKETS);
    r.register(
        "failure_detection_seconds",
        "From a lost node's last word to the coordinator noticing",
        detection.clone(),
    );
    let recovery = Histogram::new(RECOVERY_BUCKETS);
    r.register(
        "recovery_seconds",
        "From a failure noticed to the job training again",
        recovery.clone(),
    );
    let last_recovery = Family::<Labels, FloatGauge>::default();
    r.register(
        "job_last_recovery_seconds",
        "How long a job's latest completed recovery took",
        last_recovery.clone(),
    );

    for j in &s.jobs {
        let id = labels(&[("job", &j.id), ("name", &j.spec.name)]);
        step.get_or_create(&id)
            .set(i64::try_from(j.step).unwrap_or(i64::MAX));
        steps_total
            .get_or_create(&id)
            .set(i64::try_from(j.spec.training.steps).unwrap_or(i64::MAX));
        attempt.get_or_create(&id).set(i64::from(j.attempt));
        checkpoint
            .get_or_create(&id)
            .set(i64::try_from(j.checkpoint_step).unwrap_or(i64::MAX));
        ranks.get_or_create(&id).set(j.placement.len() as i64);
        failures
            .get_or_create(&id)
            .inc_by(j.recoveries.len() as u64);
        redone
            .get_or_create(&id)
            .inc_by(j.recoveries.iter().map(|r| r.steps_redone()).sum());
        for rec in &j.recoveries {
            if rec.last_heard_unix_ms > 0 && rec.detected_unix_ms >= rec.last_heard_unix_ms {
                detection.observe((rec.detected_unix_ms - rec.last_heard_unix_ms) as f64 / 1000.0);
            }
            if let Some(ms) = rec.recovery_ms() {
                recovery.observe(ms as f64 / 1000.0);
            }
        }
        if let Some(ms) = j.recoveries.iter().rev().find_map(|r| r.recovery_ms()) {
            last_recovery.get_or_create(&id).set(ms as f64 / 1000.0);
        }
        let Some(m) = s.steps.get(&j.id) else {
            continue;
        };
        loss.get_or_create(&id).set(m.loss);
        main_loss.get_or_create(&id).set(m.main_loss);
        tps.get_or_create(&id).set(m.tokens_per_s);
        step_s.get_or_create(&id).set(m.seconds);
        if m.seconds > 0.0 {
            bubble
                .get_or_create(&id)
                .set((m.bubble_s / m.seconds).clamp(0.0, 1.0));
        }
        for (layer, v) in m.max_vio.iter().enumerate() {
            let layer = layer.to_string();
            max_vio
                .get_or_create(&labels(&[("job", &j.id), ("layer", &layer)]))
                .set(*v);
        }
        for (layer, loads) in m.expert_loads.iter().enumerate() {
            let layer = layer.to_string();
            for (expert, n) in loads.tokens.iter().enumerate() {
                let expert = expert.to_string();
                expert_load
                    .get_or_create(&labels(&[
                        ("job", &j.id),
                        ("layer", &layer),
                        ("expert", &expert),
                    ]))
                    .set(i64::try_from(*n).unwrap_or(i64::MAX));
            }
        }
    }
    let mut out = String::new();
    // Writing to a String does not fail.
    let _ = encode(&mut out, &r);
    out
}

async fn metrics(State(control): State<Control>) -> axum::response::Response {
    match control.snapshot().await {
        Ok(s) => (
            [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
            render_metrics(&s),
        )
            .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

/// A 404: an HTML page naming what was not found, or JSON under `/api/`.
fn missing(api: bool, what: &str) -> axum::response::Response {
    if api {
        (
            StatusCode::NOT_FOUND,
            axum::Json(serde_json::json!({ "error": what })),
        )
            .into_response()
    } else {
        (
            StatusCode::NOT_FOUND,
            axum::response::Html(dashboard::not_found_page(what)),
        )
            .into_response()
    }
}

fn unavailable(e: &crate::CoordinatorError) -> axum::response::Response {
    (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response()
}

async fn not_found(uri: axum::http::Uri) -> axum::response::Response {
    let path = uri.path();
    missing(path.starts_with("/api/"), &format!("nothing at {path}"))
}

/// No cache: every load shows the cluster as it is now.
const NO_STORE: (header::HeaderName, &str) = (header::CACHE_CONTROL, "no-store");

async fn cluster_page(State(control): State<Control>) -> axum::response::Response {
    match control.snapshot().await {
        Ok(s) => (
            [NO_STORE],
            axum::response::Html(dashboard::cluster::render_page(&s)),
        )
            .into_response(),
        Err(e) => unavailable(&e),
    }
}

async fn cluster_api(State(control): State<Control>) -> axum::response::Response {
    match control.snapshot().await {
        Ok(s) => (
            [NO_STORE],
            axum::Json(dashboard::cluster::api(&s, crate::jobs::now_ms())),
        )
            .into_response(),
        Err(e) => unavailable(&e),
    }
}

/// The job of `id` in a fresh snapshot, or the response to give instead.
async fn job_of(
    control: &Control,
    id: Result<Path<String>, PathRejection>,
    api: bool,
) -> Result<(Snapshot, usize), axum::response::Response> {
    let Ok(Path(id)) = id else {
        return Err(missing(api, "no such job"));
    };
    let s = control.snapshot().await.map_err(|e| unavailable(&e))?;
    match s.jobs.iter().position(|j| j.id == id) {
        Some(i) => Ok((s, i)),
        None => Err(missing(api, &format!("no job {id}"))),
    }
}

/// The job's step timeline, read on the blocking pool (it reads the trace file).
async fn timeline_of(job: &crate::jobs::JobRecord) -> String {
    let job = job.clone();
    tokio::task::spawn_blocking(move || dashboard::job::timeline_fragment(&job))
        .await
        .unwrap_or_else(|e| format!("<p class=\"note\">timeline unavailable: {e}</p>"))
}

async fn job_page(
    State(control): State<Control>,
    id: Result<Path<String>, PathRejection>,
) -> axum::response::Response {
    let (s, i) = match job_of(&control, id, false).await {
        Ok(found) => found,
        Err(r) => return r,
    };
    let j = &s.jobs[i];
    let timeline = timeline_of(j).await;
    let html = dashboard::job::render_page(&s, j, &timeline, crate::jobs::now_ms());
    ([NO_STORE], axum::response::Html(html)).into_response()
}

#[derive(serde::Deserialize)]
struct JobQuery {
    /// Also render the step timeline (the page asks while it has none).
    #[serde(default)]
    timeline: Option<String>,
}

async fn job_api(
    State(control): State<Control>,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<JobQuery>, QueryRejection>,
) -> axum::response::Response {
    let (s, i) = match job_of(&control, id, true).await {
        Ok(found) => found,
        Err(r) => return r,
    };
    let j = &s.jobs[i];
    let timeline = match q.ok().and_then(|Query(q)| q.timeline) {
        Some(_) => Some(timeline_of(j).await),
        None => None,
    };
    let body = dashboard::job::api(&s, j, timeline, crate::jobs::now_ms());
    ([NO_STORE], axum::Json(body)).into_response()
}

/// The HTTP routes: the dashboard's pages and JSON, `/metrics`, and a 404 page for anything
/// else.
pub fn router(control: Control) -> axum::Router {
    axum::Router::new()
        .route("/", axum::routing::get(cluster_page))
        .route("/jobs/{id}", axum::routing::get(job_page))
        .route("/api/cluster", axum::routing::get(cluster_api))
        .route("/api/jobs/{id}", axum::routing::get(job_api))
        .route("/metrics", axum::routing::get(metrics))
        .fallback(not_found)
        .with_state(control)
}

/// Serves [`router`] on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    control: Control,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(control))
        .with_graceful_shutdown(shutdown)
        .await
}
