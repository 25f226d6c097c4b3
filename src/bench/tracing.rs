//! `shoal bench tracing`: what exporting every span of a training step over OTLP costs.
//! Tokens/s of the main job's shape (DualPipe over 2 stages, 2 data-parallel ranks, EP 2,
//! micro-batches) with tracing off against the same trainer with every Shoal span (steps,
//! pipeline operations, layers, exchanges) exported over OTLP/gRPC to a collector on loopback,
//! alternating in the same run so both see the same machine.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use serde::Serialize;
use shoal_spec::job::JobSpec;
use tracing_subscriber::layer::SubscriberExt;

use super::median;

/// Options of `shoal bench tracing`.
#[derive(Debug, Clone, clap::Args)]
pub struct TracingBenchArgs {
    /// Steps timed per mode and round (after four warm-up steps of each).
    #[arg(long, default_value_t = 6)]
    pub steps: u64,
    /// Rounds of (off, on), alternating which goes first.
    #[arg(long, default_value_t = 4)]
    pub rounds: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Precision.
    #[arg(long, value_parser = ["fp32", "bf16", "fp8"], default_value = "bf16")]
    pub precision: String,
    /// Print one JSON line of results at the end.
    #[arg(long)]
    pub json: bool,
}

/// A collector that counts what arrives.
#[derive(Clone, Default)]
struct Counter(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Counter {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = req
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[derive(Debug, Serialize)]
struct Report {
    rounds: usize,
    steps_per_round: u64,
    tokens_per_step: usize,
    off_tokens_per_s: f64,
    on_tokens_per_s: f64,
    /// (off - on) / off, in percent (negative: on was faster, i.e. noise).
    overhead_percent: f64,
    /// Per round, the same figure: its spread is the noise.
    overhead_percent_per_round: Vec<f64>,
    spans_per_step: f64,
    spans_received: u64,
}

/// Runs the benchmark and prints its table (and a JSON line with `--json`).
pub fn run(args: &TracingBenchArgs) -> Result<()> {
    let text = format!(
        "name = \"bench-tracing\"\nprecision = \"{}\"\n[training]\nsteps = 1000000\n\
         seq_len = {}\nbatch = {}\n[parallelism]\npp = 2\ndp = 2\nep = 2\n\
         schedule = \"dualpipe\"\nmicro_batches = 4\n",
        args.precision, args.seq_len, args.batch
    );
    let spec = JobSpec::from_toml(&text, "bench tracing")?;
    let mut trainer = shoal_worker::job::trainer_for(&spec)?;

    // The collector, on loopback, on a runtime of its own.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let counter = Counter::default();
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(counter.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let provider = crate::telemetry::provider("bench", &format!("http://{addr}"))?;
    let on = tracing::Dispatch::new(
        tracing_subscriber::registry().with(crate::telemetry::span_layer(&provider)),
    );
    let off = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());

    let tokens = args.batch * args.seq_len;
    let mut step = |d: &tracing::Dispatch| -> Result<f64> {
        let m = tracing::dispatcher::with_default(d, || trainer.train_step())?;
        Ok(m.tokens as f64 / m.seconds)
    };
    // Warm-up: the allocator, the thread pools and the caches settle in the first steps.
    for _ in 0..4 {
        step(&off)?;
        step(&on)?;
    }
    let (mut all_off, mut all_on, mut per_round) = (Vec::new(), Vec::new(), Vec::new());
    let mut traced_steps = 0u64;
    for round in 0..args.rounds {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        let (mut r_off, mut r_on) = (Vec::new(), Vec::new());
        for traced in order {
            for _ in 0..args.steps {
                if traced {
                    r_on.push(step(&on)?);
                    traced_steps += 1;
                } else {
                    r_off.push(step(&off)?);
                }
            }
        }
        let (a, b) = (median(r_off.clone()), median(r_on.clone()));
        per_round.push((a - b) / a * 100.0);
        all_off.extend(r_off);
        all_on.extend(r_on);
    }
    provider
        .force_flush()
        .context("flushing the spans to the collector")?;
    let received = counter.0.load(Ordering::Relaxed);
    let (off_rate, on_rate) = (median(all_off), median(all_on));
    let report = Report {
        rounds: args.rounds,
        steps_per_round: args.steps,
        tokens_per_step: tokens,
        off_tokens_per_s: off_rate,
        on_tokens_per_s: on_rate,
        overhead_percent: (off_rate - on_rate) / off_rate * 100.0,
        overhead_percent_per_round: per_round,
        spans_per_step: received as f64 / traced_steps.max(1) as f64,
        spans_received: received,
    };
    println!(
        "tracing overhead: main job shape (pp 2 DualPipe, dp 2, ep 2, 4 micro-batches), {} x {} tokens, {}",
        args.batch, args.seq_len, args.precision
    );
    println!(
        "  tracing off            {:>10.0} tok/s (median of {} steps)",
        off_rate,
        args.steps * args.rounds as u64
    );
    println!(
        "  every span over OTLP   {:>10.0} tok/s ({:.0} spans per step, {} received by the collector)",
        on_rate, report.spans_per_step, received
    );
    println!(
        "  overhead               {:>9.2}%  (per round: {})",
        report.overhead_percent,
        report
            .overhead_percent_per_round
            .iter()
            .map(|p| format!("{p:.2}%"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    let _ = provider.shutdown();
    Ok(())
}
