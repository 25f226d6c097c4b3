//! A pipelined step recorded as a trace. In its own test binary: `tracing` caches whether a
//! span is enabled when its call site is first reached, so spans the model opens on other
//! tests' threads while the recorder is being installed could be cached as disabled.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::time::Duration;

use shoal_kernels::ops::linear::Precision;
use shoal_spec::ModelConfig;
use shoal_spec::plan::Schedule;
use shoal_spec::schedule::build;
use shoal_worker::model::{Model, Objective, StagePart, TokenBatch};
use shoal_worker::pipeline::run_step;

/// A small tiny-shaped model: 4 layers (1 dense), MTP on.
fn model() -> Model<f32> {
    let cfg = ModelConfig {
        vocab_size: 64,
        hidden_size: 32,
        intermediate_size: 48,
        moe_intermediate_size: 16,
        max_position_embeddings: 64,
        ..ModelConfig::tiny()
    };
    Model::<f32>::new(&cfg, Precision::Fp32, 5).unwrap()
}

#[test]
fn a_traced_step_has_every_operation_on_its_ranks_track_and_opens_as_a_chrome_trace() {
    let model = model();
    let inputs: Vec<u32> = (0..32).map(|i| (i * 37 % 64) as u32).collect();
    let targets: Vec<u32> = (0..32).map(|i| ((i * 37 + 5) % 64) as u32).collect();
    let b = TokenBatch {
        batch: 4,
        seq: 8,
        inputs: &inputs,
        targets: &targets,
    };
    let stages = StagePart::split(4, &[2, 2]).unwrap();
    let s = build(Schedule::DualPipe, 2, 4).unwrap();
    let mut g = model.params().zero_grads();
    let (r, trace) = shoal_worker::trace::record(|| {
        run_step(
            &model,
            &stages,
            &s,
            &b,
            &Objective::default(),
            &mut g,
            Duration::from_secs(60),
        )
    });
    r.unwrap();
    for (rank, ops) in s.ranks.iter().enumerate() {
        let track = format!("pp-rank-{rank}");
        let on_track: Vec<&str> = trace
            .events
            .iter()
            .filter(|e| e.thread == track)
            .map(|e| e.name.as_str())
            .collect();
        for op in ops {
            assert!(
                on_track.contains(&op.to_string().as_str()),
                "{op} missing on {track}"
            );
        }
        for name in [
            "attn(F)", "mlp(F)", "attn(B)", "mlp(B)", "W", "send", "recv",
        ] {
            assert!(
                on_track.contains(&name),
                "{name} missing on {track}: {on_track:?}"
            );
        }
    }
    // Spans nest: every attention pass of an operation lies inside the operation.
    let ops: Vec<_> = trace
        .events
        .iter()
        .filter(|e| e.args.contains_key("op"))
        .collect();
    for e in trace.events.iter().filter(|e| e.name == "attn(F)") {
        assert!(
            ops.iter().any(|o| o.thread == e.thread
                && o.start_us <= e.start_us
                && e.start_us + e.dur_us <= o.start_us + o.dur_us + 1.0),
            "{e:?} outside every operation"
        );
    }
    let chrome = trace.to_chrome("test");
    let events = chrome["traceEvents"].as_array().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["ph"] == "M" && e["args"]["name"] == "pp-rank-1")
    );
    assert!(
        events
            .iter()
            .filter(|e| e["ph"] == "X")
            .all(|e| e["dur"].as_f64().unwrap() >= 0.0)
    );
}
