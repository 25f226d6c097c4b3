//! W3C trace context (`traceparent`) across process boundaries: in gRPC metadata (a client's
//! call and the coordinator's handling of it) and as a string in messages and records (a job's
//! submission, carried to every node's attempt), so one job's spans join one trace.
//!
//! Every function is a no-op while no OpenTelemetry layer records spans (a span then has no
//! context, and its `traceparent` is empty).

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header (and metadata key) that carries the context.
pub const TRACEPARENT: &str = "traceparent";

/// `span`'s context as a W3C `traceparent` value; empty when the span is not recorded.
pub fn traceparent(span: &tracing::Span) -> String {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return String::new();
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT).unwrap_or_default()
}

/// Makes `span` a child of the remote span `traceparent` names (from another process); an
/// empty or malformed value leaves it as it is.
pub fn follow(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    let carrier = HashMap::from([(TRACEPARENT.to_string(), traceparent.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        // Fails only for a span that has already started recording children; a fresh span
        // has not.
        let _ = span.set_parent(cx);
    }
}

/// Adds the current span's context to a call's metadata.
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    let value = traceparent(&tracing::Span::current());
    if let Ok(v) = value.parse()
        && !value.is_empty()
    {
        metadata.insert(TRACEPARENT, v);
    }
}

/// The `traceparent` a call's metadata carries; empty without one (or with a value that is not
/// ASCII).
pub fn remote(metadata: &tonic::metadata::MetadataMap) -> String {
    metadata
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_recording_layer_everything_is_empty_and_nothing_breaks() {
        let span = tracing::info_span!("s");
        assert_eq!(traceparent(&span), "");
        follow(&span, "not a traceparent");
        follow(&span, "");
        let mut m = tonic::metadata::MetadataMap::new();
        inject(&mut m);
        assert_eq!(remote(&m), "");
    }

    #[test]
    fn a_span_that_follows_a_remote_one_joins_its_trace() {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let client = tracing::info_span!("client");
            let sent = {
                let _e = client.enter();
                let mut m = tonic::metadata::MetadataMap::new();
                inject(&mut m);
                remote(&m)
            };
            // 00-<32 hex trace id>-<16 hex span id>-<flags>
            let parts: Vec<&str> = sent.split('-').collect();
            assert_eq!(parts.len(), 4, "{sent}");
            assert_eq!((parts[0], parts[1].len(), parts[2].len()), ("00", 32, 16));
            let server = tracing::info_span!("server");
            follow(&server, &sent);
            let got = traceparent(&server);
            let theirs: Vec<&str> = got.split('-').collect();
            assert_eq!(theirs[1], parts[1], "the same trace");
            assert_ne!(theirs[2], parts[2], "a span of its own");
            let stranger = tracing::info_span!("stranger");
            assert_ne!(traceparent(&stranger).split('-').nth(1), Some(parts[1]));
        });
    }
}
