//! Step timelines: a `tracing` layer that records every span exit while it is installed (the
//! span's name, fields, thread and the time from its entry) and writes them as a Chrome trace (the JSON "trace event"
//! format that Perfetto and `chrome://tracing` open).
//!
//! The model, the pipeline ranks and the trainer open `debug` spans around their phases: the
//! pipeline operation (`F0.3`, `B1.2`, `W1.2`, `F0.3&B1.1`), waits for a peer (`recv`) and sends
//! (`send`), attention and MLP passes (written `attn(F)`, `mlp(B)`, ... as in DeepSeek's
//! published profiles), the MoE router, experts and combine, the heads, the weight-gradient work
//! and the optimizer. Each thread is a track: a pipeline rank's thread is named `pp-rank-R`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tracing::Subscriber;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

use crate::{Result, WorkerError};

/// One span, from an entry to its exit (a span entered twice gives two events).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The display name (`F0.3`, `attn(F)`, `recv`, ...).
    pub name: String,
    /// The thread it ran on.
    pub thread: String,
    /// Start, in microseconds from when recording began.
    pub start_us: f64,
    /// Duration in microseconds.
    pub dur_us: f64,
    /// The span's fields (`stage`, `mb`, `layer`, `from`, ...).
    pub args: BTreeMap<String, String>,
}

/// Span events recorded while a [`Recorder`] was installed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// Span events, in the order the spans exited.
    pub events: Vec<Event>,
    /// When recording began, in microseconds since the Unix epoch by this process's clock.
    #[serde(default)]
    pub epoch_unix_us: f64,
}

/// One process's trace in a trace of several (one per node), with how far its times move to
/// line up with the first one's.
#[derive(Clone, Debug)]
pub struct Part {
    /// The process's name (`node 0`, ...).
    pub process: String,
    /// Its events.
    pub trace: Trace,
    /// Microseconds added to its event times: its recording start minus the first part's, on
    /// the first part's clock.
    pub shift_us: f64,
}

/// Now, in microseconds since the Unix epoch.
pub fn unix_us() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

/// The recording layer.
#[derive(Clone)]
pub struct Recorder {
    epoch: Instant,
    events: Arc<Mutex<Vec<Event>>>,
}

struct Fields(BTreeMap<String, String>);
struct Entered(Vec<Instant>);

struct Collect<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Collect<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let mut s = String::new();
        let _ = write!(s, "{value:?}");
        self.0.insert(field.name().to_string(), s);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

/// The name a span shows in the trace: DeepSeek's profile names for the passes, the operation
/// for a pipeline operation, the span's name otherwise.
fn display_name(name: &str, fields: &BTreeMap<String, String>) -> String {
    match name {
        "op" => fields.get("op").cloned().unwrap_or_else(|| name.into()),
        "attn.forward" => "attn(F)".into(),
        "attn.backward" => "attn(B)".into(),
        "ffn.forward" => "mlp(F)".into(),
        "ffn.backward" => "mlp(B)".into(),
        "head.forward" => "head(F)".into(),
        "head.backward" => "head(B)".into(),
        "mtp.forward" => "mtp(F)".into(),
        "mtp.backward" => "mtp(B)".into(),
        "wgrad" => "W".into(),
        other => other.into(),
    }
}

impl<S> Layer<S> for Recorder
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        attrs.record(&mut Collect(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Fields(fields));
        }
    }

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            let mut ext = span.extensions_mut();
            match ext.get_mut::<Entered>() {
                Some(e) => e.0.push(Instant::now()),
                None => ext.insert(Entered(vec![Instant::now()])),
            }
        }
    }

    fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
        let end = Instant::now();
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        let Some(start) = ext.get_mut::<Entered>().and_then(|e| e.0.pop()) else {
            return;
        };
        let args = ext
            .get_mut::<Fields>()
            .map(|f| f.0.clone())
            .unwrap_or_default();
        let thread = std::thread::current();
        let event = Event {
            name: display_name(span.name(), &args),
            thread: thread
                .name()
                .map_or_else(|| format!("{:?}", thread.id()), str::to_string),
            start_us: start.saturating_duration_since(self.epoch).as_secs_f64() * 1e6,
            dur_us: end.saturating_duration_since(start).as_secs_f64() * 1e6,
            args,
        };
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(event);
    }
}

/// Runs `f` with every `debug` span recorded (on this thread and on the threads that carry this
/// thread's dispatcher over, as the pipeline ranks and micro-batches do), and returns its result
/// with the trace.
pub fn record<R>(f: impl FnOnce() -> R) -> (R, Trace) {
    let epoch_unix_us = unix_us();
    let recorder = Recorder {
        epoch: Instant::now(),
        events: Arc::new(Mutex::new(Vec::new())),
    };
    let subscriber = tracing_subscriber::registry()
        .with(recorder.clone())
        .with(tracing_subscriber::filter::LevelFilter::DEBUG);
    let r = tracing::subscriber::with_default(subscriber, f);
    let events = std::mem::take(
        &mut *recorder
            .events
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    );
    (
        r,
        Trace {
            events,
            epoch_unix_us,
        },
    )
}

impl Trace {
    /// The trace in Chrome's trace event format: one process (`process`), one track per thread
    /// (named after it), complete (`X`) events with microsecond times.
    pub fn to_chrome(&self, process: &str) -> serde_json::Value {
        chrome(&[Part {
            process: process.into(),
            trace: self.clone(),
            shift_us: 0.0,
        }])
    }

    /// Writes [`Trace::to_chrome`] to `path`.
    pub fn write_chrome(&self, path: &Path, process: &str) -> Result<()> {
        let text =
            serde_json::to_vec(&self.to_chrome(process)).map_err(|e| WorkerError::io(path, e))?;
        std::fs::write(path, text).map_err(|e| WorkerError::io(path, e))
    }
}

/// Several processes' traces in Chrome's trace event format: one process per part (pid in part
/// order), one track per thread of each, times moved by each part's shift so that they share the
/// first part's clock.
pub fn chrome(parts: &[Part]) -> serde_json::Value {
    let mut events = Vec::new();
    for (pid, part) in parts.iter().enumerate() {
        let mut threads: Vec<&str> = part
            .trace
            .events
            .iter()
            .map(|e| e.thread.as_str())
            .collect();
        threads.sort_unstable();
        threads.dedup();
        let tid = |t: &str| threads.iter().position(|x| *x == t).unwrap_or(0);
        events.push(serde_json::json!({
            "name": "process_name", "ph": "M", "pid": pid, "tid": 0,
            "args": {"name": part.process},
        }));
        for (i, t) in threads.iter().enumerate() {
            events.push(serde_json::json!({
                "name": "thread_name", "ph": "M", "pid": pid, "tid": i,
                "args": {"name": t},
            }));
        }
        for e in &part.trace.events {
            events.push(serde_json::json!({
                "name": e.name, "ph": "X", "pid": pid, "tid": tid(&e.thread),
                "ts": e.start_us + part.shift_us, "dur": e.dur_us, "args": e.args,
            }));
        }
    }
    serde_json::json!({ "traceEvents": events, "displayTimeUnit": "ms" })
}

/// Writes [`chrome`] of `parts` to `path`.
pub fn write_chrome_parts(path: &Path, parts: &[Part]) -> Result<()> {
    let text = serde_json::to_vec(&chrome(parts)).map_err(|e| WorkerError::io(path, e))?;
    std::fs::write(path, text).map_err(|e| WorkerError::io(path, e))
}
