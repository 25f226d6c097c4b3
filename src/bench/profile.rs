//! Where a training step's time goes: a `tracing` layer that sums the wall time spent inside each
//! span, keyed by the span's path (`backward/block.backward/ffn.backward/moe.experts`).
//!
//! The model opens `debug` spans around its phases; the kernels below them run on the rayon
//! pool, so a span's time is the wall time of its phase. Micro-batches run concurrently, so
//! the times under `micro_batch` add up over the threads (CPU time, not wall time).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::Subscriber;
use tracing::span::{Attributes, Id};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// Total time and number of entries per span path.
#[derive(Clone, Default)]
pub struct SpanTimes {
    totals: Arc<Mutex<BTreeMap<String, (Duration, u64)>>>,
}

struct Path(String);
struct Entered(Instant);

impl SpanTimes {
    /// Forgets everything recorded so far (for example the warm-up steps).
    pub fn reset(&self) {
        self.totals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// `(path, total time, entries)` in path order.
    pub fn snapshot(&self) -> Vec<(String, Duration, u64)> {
        self.totals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, &(d, n))| (k.clone(), d, n))
            .collect()
    }
}

impl<S> Layer<S> for SpanTimes
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let name = attrs.metadata().name();
        let path = match span
            .parent()
            .and_then(|p| p.extensions().get::<Path>().map(|p| p.0.clone()))
        {
            Some(parent) => format!("{parent}/{name}"),
            None => name.to_string(),
        };
        span.extensions_mut().insert(Path(path));
    }

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Entered(Instant::now()));
        }
    }

    fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let ext = span.extensions();
        let (Some(Path(path)), Some(Entered(t0))) = (ext.get::<Path>(), ext.get::<Entered>())
        else {
            return;
        };
        let mut totals = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        let e = totals.entry(path.clone()).or_default();
        e.0 += t0.elapsed();
        e.1 += 1;
    }
}

/// Prints the per-step time of every span path, indented by depth.
pub fn print(title: &str, times: &SpanTimes, steps: u64) {
    let rows = times.snapshot();
    let step_total: Duration = rows
        .iter()
        .filter(|(p, _, _)| p == "step")
        .map(|(_, d, _)| *d)
        .sum();
    println!("{title}: ms per step (share of the step)");
    for (path, total, _) in rows {
        let depth = path.matches('/').count();
        let name = path.rsplit('/').next().unwrap_or(&path);
        let ms = total.as_secs_f64() * 1e3 / steps.max(1) as f64;
        let share = if step_total.is_zero() {
            0.0
        } else {
            100.0 * total.as_secs_f64() / step_total.as_secs_f64()
        };
        println!(
            "  {:indent$}{name:<w$} {ms:8.1} ms {share:5.1}%",
            "",
            indent = 2 * depth,
            w = 28usize.saturating_sub(2 * depth)
        );
    }
}
