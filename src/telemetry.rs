//! The process's `tracing` subscriber: log lines on stderr (`RUST_LOG`, or the command's
//! default level), and with an OTLP endpoint (`--otlp-endpoint` or the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT`) every Shoal span exported over OTLP/gRPC.
//!
//! Telemetry never holds training up: spans queue in OpenTelemetry's batch processor (bounded;
//! a full queue drops them) and a dedicated thread exports them, on a small runtime of its own,
//! each batch bounded by a timeout. A collector that cannot be reached costs dropped spans and a
//! warning at most every [`WARN_EVERY`], nothing else.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, SpanData,
};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How long one batch may take to reach the collector before it is dropped.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// At most one warning about dropped spans per this long.
pub const WARN_EVERY: Duration = Duration::from_secs(30);
/// Spans the batch processor queues (unless `OTEL_BSP_MAX_QUEUE_SIZE` says otherwise): a step
/// of a large pipeline opens thousands.
const QUEUE: usize = 65_536;

/// The crates whose spans are exported (at `debug`: pipeline operations, layers, exchanges);
/// everything else (tonic, h2, the exporter itself) is not, so exporting never traces itself.
const EXPORTED: &str = "shoal=debug,shoal_worker=debug,shoal_coordinator=debug,shoal_proto=debug";

/// The endpoint this process exports to, for the processes it starts (a local cluster's agents).
static ENDPOINT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The OTLP endpoint this process exports to, if any.
pub fn endpoint() -> Option<&'static str> {
    ENDPOINT.get().map(String::as_str)
}

/// Keeps the exporter alive; dropping it flushes what is queued (within the export timeout).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            // Flushes the queue; a collector that is gone costs at most the timeout.
            let _ = p.shutdown_with_timeout(EXPORT_TIMEOUT);
        }
    }
}

/// Checks an OTLP endpoint: an `http://` or `https://` URL with a host (and at most a path
/// OTLP/gRPC ignores). The error names the flag and the reason.
pub fn check_endpoint(endpoint: &str) -> Result<tonic::transport::Uri> {
    let what = "--otlp-endpoint (or OTEL_EXPORTER_OTLP_ENDPOINT)";
    let uri: tonic::transport::Uri = endpoint
        .parse()
        .with_context(|| format!("{what}: {endpoint:?} is not a URL"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => bail!("{what}: scheme {other:?} is not http or https in {endpoint:?}"),
        None => bail!("{what}: {endpoint:?} has no scheme (write http://host:4317)"),
    }
    if uri.host().is_none_or(str::is_empty) {
        bail!("{what}: {endpoint:?} has no host");
    }
    Ok(uri)
}

/// Installs the subscriber for a command in `role` (`coordinator`, `worker`, `train`, ...):
/// stderr logs at `RUST_LOG` or `default_level`, and spans to `otlp` when given.
pub fn init(role: &str, default_level: &str, otlp: Option<&str>) -> Result<Telemetry> {
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        );
    let otlp = otlp.map(str::trim).filter(|e| !e.is_empty());
    let Some(endpoint) = otlp else {
        tracing_subscriber::registry().with(logs).try_init()?;
        return Ok(Telemetry { provider: None });
    };
    let provider = provider(role, endpoint)?;
    let _ = ENDPOINT.set(endpoint.to_string());
    tracing_subscriber::registry()
        .with(logs)
        .with(span_layer(&provider))
        .try_init()?;
    tracing::info!(endpoint, "exporting spans over OTLP");
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// The layer that hands Shoal's spans to `provider`.
pub fn span_layer<S>(provider: &SdkTracerProvider) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("shoal"))
        .with_threads(true)
        .with_location(false)
        .with_filter(EnvFilter::new(EXPORTED))
}

/// A tracer provider for a process in `role` that batches spans to the OTLP/gRPC collector at
/// `endpoint` (checked first).
pub fn provider(role: &str, endpoint: &str) -> Result<SdkTracerProvider> {
    check_endpoint(endpoint)?;
    let exporter = Exporter::new(endpoint)?;
    let mut batch = BatchConfigBuilder::default();
    if std::env::var_os("OTEL_BSP_MAX_QUEUE_SIZE").is_none() {
        batch = batch.with_max_queue_size(QUEUE);
    }
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(batch.build())
        .build();
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| format!("shoal-{role}"));
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .with_attribute(opentelemetry::KeyValue::new("shoal.role", role.to_string()))
                .with_attribute(opentelemetry::KeyValue::new(
                    "service.version",
                    env!("CARGO_PKG_VERSION"),
                ))
                .build(),
        )
        .build();
    Ok(provider)
}

/// The OTLP/gRPC exporter on a runtime of its own (the batch processor exports from a plain
/// thread, and tonic needs a reactor), with a timeout per batch and rate-limited warnings for
/// what it drops.
#[derive(Debug)]
struct Exporter {
    inner: opentelemetry_otlp::SpanExporter,
    runtime: tokio::runtime::Runtime,
    endpoint: String,
    started: Instant,
    dropped: AtomicU64,
    /// Milliseconds after `started` of the last warning, plus one (0: none yet).
    warned_ms: AtomicU64,
}

impl Exporter {
    fn new(endpoint: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-export")
            .enable_all()
            .build()
            .context("starting the OTLP exporter's runtime")?;
        let inner = {
            let _in = runtime.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_timeout(EXPORT_TIMEOUT)
                .build()
                .with_context(|| format!("--otlp-endpoint {endpoint}"))?
        };
        Ok(Self {
            inner,
            runtime,
            endpoint: endpoint.to_string(),
            started: Instant::now(),
            dropped: AtomicU64::new(0),
            warned_ms: AtomicU64::new(0),
        })
    }

    /// Counts `n` dropped spans and warns unless it warned within [`WARN_EVERY`].
    fn dropped(&self, n: usize, error: &dyn std::fmt::Display) {
        let total = self.dropped.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let last = self.warned_ms.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= WARN_EVERY.as_millis() as u64;
        if due
            && self
                .warned_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                endpoint = %self.endpoint,
                dropped = total,
                error = %error,
                "spans not exported (the collector is unreachable or slow); training goes on"
            );
        }
    }
}

impl opentelemetry_sdk::trace::SpanExporter for Exporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        // The batch processor polls this on its own thread, outside any runtime: blocking
        // here blocks only that thread.
        let r = self.runtime.block_on(async {
            match tokio::time::timeout(EXPORT_TIMEOUT, self.inner.export(batch)).await {
                Ok(r) => r,
                Err(_) => Err(OTelSdkError::Timeout(EXPORT_TIMEOUT)),
            }
        });
        if let Err(e) = &r {
            self.dropped(n, e);
        }
        r
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}
