//! Pipeline-parallel steps on threads against one pass over the same micro-batches: losses,
//! expert loads and gradients, for 1F1B, ZB1P and DualPipe; and failures that name the rank,
//! the operation and the peer instead of hanging.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use shoal_kernels::ops::linear::Precision;
use shoal_spec::ModelConfig;
use shoal_spec::plan::Schedule;
use shoal_spec::schedule::Op;
use shoal_spec::schedule::build;
use shoal_worker::WorkerError;
use shoal_worker::model::ep::{ExchangePhase, ExpertExchange};
use shoal_worker::model::{Model, Objective, StagePart, TokenBatch};
use shoal_worker::pipeline::{run_step, run_step_with};

/// The tiny preset cut to a size that runs in milliseconds, 4 layers (1 dense), MTP on.
fn config() -> ModelConfig {
    ModelConfig {
        vocab_size: 64,
        hidden_size: 32,
        intermediate_size: 48,
        moe_intermediate_size: 16,
        max_position_embeddings: 64,
        ..ModelConfig::tiny()
    }
}

fn objective() -> Objective {
    Objective {
        mtp_lambda: 0.3,
        balance_alpha: 0.01,
        loss_scale: 1.0,
    }
}

/// `batch` sequences of `seq` tokens, deterministic.
fn tokens(batch: usize, seq: usize) -> (Vec<u32>, Vec<u32>) {
    let all: Vec<u32> = (0..batch * (seq + 1))
        .map(|i| ((i * 37 + i / 7) % 64) as u32)
        .collect();
    let mut inputs = Vec::new();
    let mut targets = Vec::new();
    for s in 0..batch {
        let row = &all[s * (seq + 1)..(s + 1) * (seq + 1)];
        inputs.extend_from_slice(&row[..seq]);
        targets.extend_from_slice(&row[1..]);
    }
    (inputs, targets)
}

/// Largest relative difference over all gradients, and how many parameters differ at all.
/// `|a - b| / |a|` over all gradients together (L2).
fn global_difference(
    model: &Model<f32>,
    a: &shoal_worker::model::params::Grads<f32>,
    b: &shoal_worker::model::params::Grads<f32>,
) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (id, _, _) in model.params().iter() {
        for (u, v) in a.get(id).data().iter().zip(b.get(id).data()) {
            num += (f64::from(*u) - f64::from(*v)).powi(2);
            den += f64::from(*u).powi(2);
        }
    }
    (num / den.max(1e-300)).sqrt()
}

fn compare(
    model: &Model<f32>,
    a: &shoal_worker::model::params::Grads<f32>,
    b: &shoal_worker::model::params::Grads<f32>,
) -> (f64, Vec<String>) {
    let mut worst = 0.0f64;
    let mut differ = Vec::new();
    for (id, name, _) in model.params().iter() {
        let (x, y) = (a.get(id).data(), b.get(id).data());
        let scale = x
            .iter()
            .map(|v| f64::from(v.abs()))
            .fold(0.0, f64::max)
            .max(1e-30);
        let mut diff = 0.0f64;
        for (u, v) in x.iter().zip(y) {
            diff = diff.max((f64::from(*u) - f64::from(*v)).abs());
        }
        if diff > 0.0 {
            differ.push(name.to_string());
        }
        worst = worst.max(diff / scale);
    }
    (worst, differ)
}

fn check(precision: Precision, schedule: Schedule, layers: &[usize], micro: usize, tol: f64) {
    let cfg = config();
    let model = Model::<f32>::new(&cfg, precision, 11).unwrap();
    let (inputs, targets) = tokens(2 * micro, 12);
    let b = TokenBatch {
        batch: 2 * micro,
        seq: 12,
        inputs: &inputs,
        targets: &targets,
    };
    let obj = objective();
    let mut want = model.params().zero_grads();
    let single = model
        .forward_backward_micro(&b, &obj, micro, &mut want)
        .unwrap();

    // `layers` per stage; DualPipeV cuts the model into two stages per rank.
    let v = schedule == Schedule::DualPipeV;
    let pp = if v { layers.len() / 2 } else { layers.len() };
    let stages = StagePart::split(cfg.num_hidden_layers, layers).unwrap();
    let s = build(schedule, pp, micro).unwrap();
    let mut got = model.params().zero_grads();
    let report = run_step(
        &model,
        &stages,
        &s,
        &b,
        &obj,
        &mut got,
        Duration::from_secs(60),
    )
    .unwrap();
    let what = format!("{schedule} pp {pp} micro {micro} {precision:?}");

    // Losses and loads: the same arithmetic on each micro-batch, summed in the same order;
    // except that BF16 and FP8 runs send activations and gradients between stages in BF16,
    // which rounds the residual stream at each boundary (losses within 1e-5 relative, a few
    // near-tied routing choices flip).
    let exact = precision == Precision::Fp32 || pp == 1;
    if exact {
        assert_eq!(report.out, single, "{what}");
    } else {
        let rel = (report.out.loss - single.loss).abs() / single.loss;
        eprintln!(
            "{what}: loss {} against {} (rel {rel:e})",
            report.out.loss, single.loss
        );
        assert!(
            rel < 1e-5,
            "{what}: loss {} against {}",
            report.out.loss,
            single.loss
        );
    }
    // Gradients: 1F1B and ZB1P bit for bit except the embedding, which two stages use when
    // pp > 1; DualPipe sums its two directions' weight gradients interleaved, so within `tol`.
    let (worst, differ) = compare(&model, &want, &got);
    eprintln!(
        "{what}: worst relative gradient difference {worst:e}, {} parameters differ",
        differ.len()
    );
    if exact {
        assert!(
            worst <= tol,
            "{what}: worst relative gradient difference {worst:e}"
        );
    } else {
        // A flipped routing choice moves one expert's gradient wholesale: compare the whole.
        let g = global_difference(&model, &want, &got);
        eprintln!("{what}: global relative gradient difference {g:e}");
        assert!(
            g <= tol,
            "{what}: global relative gradient difference {g:e}"
        );
    }
    if schedule != Schedule::DualPipe && exact {
        for name in &differ {
            assert!(
                name == "model.embed_tokens.weight",
                "{what}: {name} differs (worst {worst:e}), only the embedding may"
            );
        }
    }
    if pp == 1 {
        assert!(differ.is_empty(), "{what}: {differ:?}");
    }

    // Every rank ran every operation of its list, in order, and sent what its neighbours needed.
    for (r, spans) in report.timeline.iter().enumerate() {
        let ops: Vec<_> = spans.iter().map(|s| s.op).collect();
        assert_eq!(ops, s.ranks[r], "{what} rank {r}");
        assert!(
            spans.windows(2).all(|w| w[0].end <= w[1].start),
            "{what} rank {r}"
        );
    }
    // Each micro-batch's activation and gradient crosses each stage boundary once ([rows,
    // hidden] in f32, or BF16 in BF16 and FP8 runs), except DualPipeV's turn, which stays on
    // its rank.
    let rows = 2 * 12;
    let width = if precision == Precision::Fp32 { 4 } else { 2 };
    let per = (rows * cfg.hidden_size * width) as u64;
    let crossings = (layers.len() - 1 - usize::from(v)) as u64;
    let total: u64 = report.bytes_sent.iter().sum();
    assert_eq!(total, 2 * crossings * micro as u64 * per, "{what}");
    assert!(report.bubble().iter().all(|b| *b >= 0.0));
}

#[test]
fn one_stage_is_bit_identical_to_one_pass() {
    check(Precision::Fp32, Schedule::OneFOneB, &[4], 3, 0.0);
}

#[test]
fn one_f_one_b_and_zb1p_match_one_pass_in_fp32() {
    for schedule in [Schedule::OneFOneB, Schedule::Zb1p] {
        check(Precision::Fp32, schedule, &[2, 2], 4, 1e-5);
        check(Precision::Fp32, schedule, &[1, 1, 1, 1], 5, 1e-5);
    }
}

#[test]
fn dualpipe_matches_one_pass_in_fp32() {
    check(Precision::Fp32, Schedule::DualPipe, &[2, 2], 4, 1e-5);
    check(Precision::Fp32, Schedule::DualPipe, &[1, 1, 1, 1], 8, 1e-5);
    check(Precision::Fp32, Schedule::DualPipe, &[1, 1, 1, 1], 12, 1e-5);
}

#[test]
fn dualpipev_matches_one_pass_in_fp32() {
    // One rank holding both halves of the V, two ranks (four stages), and more micro-batches.
    check(Precision::Fp32, Schedule::DualPipeV, &[2, 2], 2, 1e-5);
    check(Precision::Fp32, Schedule::DualPipeV, &[1, 1, 1, 1], 4, 1e-5);
    check(Precision::Fp32, Schedule::DualPipeV, &[1, 1, 1, 1], 7, 1e-5);
}

#[test]
fn fp8_pipelines_match_one_pass() {
    check(Precision::Fp8, Schedule::DualPipe, &[2, 2], 4, 0.05);
    check(Precision::Fp8, Schedule::Zb1p, &[1, 3], 3, 0.05);
}

fn setup(micro: usize) -> (Model<f32>, Vec<u32>, Vec<u32>) {
    let model = Model::<f32>::new(&config(), Precision::Fp32, 5).unwrap();
    let (i, t) = tokens(micro, 8);
    (model, i, t)
}

/// The batch `setup` made: its sequences of 8 tokens.
fn batch<'a>(inputs: &'a [u32], targets: &'a [u32]) -> TokenBatch<'a> {
    TokenBatch {
        batch: inputs.len() / 8,
        seq: 8,
        inputs,
        targets,
    }
}

#[test]
fn an_order_that_deadlocks_times_out_naming_the_operation_and_peer() {
    let (model, inputs, targets) = setup(2);
    let b = batch(&inputs, &targets);
    let stages = StagePart::split(4, &[2, 2]).unwrap();
    let mut s = build(Schedule::OneFOneB, 2, 2).unwrap();
    // Rank 0 starts with B0.0: it waits for rank 1's gradient, rank 1 for rank 0's activation.
    s.ranks[0].swap(0, 2);
    let mut g = model.params().zero_grads();
    let t = std::time::Instant::now();
    let e = run_step(
        &model,
        &stages,
        &s,
        &b,
        &objective(),
        &mut g,
        Duration::from_millis(300),
    )
    .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(10));
    let text = e.to_string();
    assert!(matches!(e, WorkerError::Pipeline { .. }), "{text}");
    assert!(
        text.contains("waited") && text.contains("from rank"),
        "{text}"
    );
    assert!(text.contains("B0.0") || text.contains("F0.0"), "{text}");
}

#[test]
fn a_failing_rank_stops_the_others_and_its_error_is_returned() {
    let (model, inputs, targets) = setup(2);
    let b = batch(&inputs, &targets);
    // Stage 1 claims the head but covers layers 2..3 of 4: rank 1 refuses it at its first
    // forward; rank 0 would otherwise wait for its gradients.
    let stages = vec![
        StagePart {
            blocks: 0..2,
            embed: true,
            head: false,
        },
        StagePart {
            blocks: 2..3,
            embed: false,
            head: true,
        },
    ];
    let s = build(Schedule::OneFOneB, 2, 2).unwrap();
    let mut g = model.params().zero_grads();
    let e = run_step(
        &model,
        &stages,
        &s,
        &b,
        &objective(),
        &mut g,
        Duration::from_secs(60),
    )
    .unwrap_err();
    let text = e.to_string();
    assert!(text.contains("stage") && text.contains("2..3"), "{text}");
    assert!(!text.contains("another rank failed"), "{text}");
}

#[test]
fn bad_shapes_are_refused_naming_the_field() {
    let (model, inputs, targets) = setup(2);
    let b = batch(&inputs, &targets);
    let mut g = model.params().zero_grads();
    let stages = StagePart::split(4, &[2, 2]).unwrap();
    // More micro-batches than sequences.
    let s = build(Schedule::OneFOneB, 2, 3).unwrap();
    let mut fails = |stages: &[StagePart], s| {
        run_step(
            &model,
            stages,
            s,
            &b,
            &objective(),
            &mut g,
            Duration::from_secs(5),
        )
        .unwrap_err()
    };
    let e = fails(&stages, &s);
    assert!(e.to_string().contains("micro_batches"), "{e}");
    // Stages that do not match the ranks.
    let s = build(Schedule::OneFOneB, 2, 2).unwrap();
    let one = StagePart::split(4, &[4]).unwrap();
    let e = fails(&one, &s);
    assert!(e.to_string().contains("stages"), "{e}");
    // Layer counts that do not add up.
    assert!(
        StagePart::split(4, &[4, 0])
            .unwrap_err()
            .to_string()
            .contains("at least one layer")
    );
    assert!(
        StagePart::split(4, &[2, 1])
            .unwrap_err()
            .to_string()
            .contains("stages")
    );
}

#[test]
fn dualpipe_runs_each_overlapped_pair_on_two_threads_with_the_same_result() {
    let cfg = config();
    let model = Model::<f32>::new(&cfg, Precision::Fp32, 11).unwrap();
    let micro = 8;
    let (inputs, targets) = tokens(2 * micro, 12);
    let b = TokenBatch {
        batch: 2 * micro,
        seq: 12,
        inputs: &inputs,
        targets: &targets,
    };
    let stages = StagePart::split(cfg.num_hidden_layers, &[1, 1, 1, 1]).unwrap();
    let s = build(Schedule::DualPipe, 4, micro).unwrap();
    let pairs = s
        .ranks
        .iter()
        .flatten()
        .filter(|op| matches!(op, Op::Overlapped { .. }))
        .count();
    assert!(pairs > 0, "{s:?}");
    let run = |overlap: bool| {
        let mut g = model.params().zero_grads();
        let (report, trace) = shoal_worker::trace::record(|| {
            run_step_with(
                &model,
                &stages,
                &s,
                &b,
                &objective(),
                &mut g,
                Duration::from_secs(60),
                &[],
                overlap,
            )
            .unwrap()
        });
        (report, g, trace)
    };
    let (apart, g_apart, t_apart) = run(false);
    let (together, g_together, t_together) = run(true);
    // The same arithmetic on the same data: bit for bit.
    assert_eq!(together.out, apart.out);
    let (worst, differ) = compare(&model, &g_apart, &g_together);
    assert!(differ.is_empty(), "{differ:?} differ (worst {worst:e})");

    // Overlapped, each pair's forward ran on the rank's second thread; apart, none did.
    let on_second = |t: &shoal_worker::trace::Trace| -> Vec<(String, f64, f64)> {
        t.events
            .iter()
            .filter(|e| e.name == "forward" && e.thread.ends_with("-fwd"))
            .map(|e| (e.thread.clone(), e.start_us, e.start_us + e.dur_us))
            .collect()
    };
    assert!(on_second(&t_apart).is_empty());
    let forwards = on_second(&t_together);
    assert_eq!(forwards.len(), pairs);
    // And at least one ran while its rank's own thread was in a backward chunk.
    let overlapped = forwards.iter().any(|(thread, s0, e0)| {
        let rank = thread.trim_end_matches("-fwd");
        t_together.events.iter().any(|e| {
            e.name == "backward"
                && e.thread == rank
                && e.start_us < *e0
                && *s0 < e.start_us + e.dur_us
        })
    });
    assert!(overlapped, "no forward ran during a backward: {forwards:?}");
}

/// Rank 0's two lanes of a one-member expert exchange: frames come straight back, except that
/// lane `fail_lane` fails at its `fail_at`-th backward dispatch (counting from 0), and the
/// other lane, once that happened, waits like a transport whose peer never answers, until
/// someone aborts the step.
#[derive(Debug)]
struct Faulty {
    lane: u8,
    fail_lane: u8,
    fail_at: usize,
    state: Arc<FaultState>,
}

#[derive(Debug, Default)]
struct FaultState {
    backward_dispatches: AtomicUsize,
    failed: AtomicBool,
    aborted: AtomicBool,
}

impl ExpertExchange for Faulty {
    fn ep(&self) -> usize {
        1
    }

    fn position(&self) -> usize {
        0
    }

    fn exchange(
        &self,
        phase: ExchangePhase,
        frames: Vec<Vec<u8>>,
    ) -> shoal_worker::Result<Vec<Vec<u8>>> {
        // The backward of combine dispatches combine-kind frames (kind byte 2).
        let backward = phase == ExchangePhase::Dispatch && frames[0].get(4) == Some(&2);
        if self.lane == self.fail_lane && backward {
            let n = self
                .state
                .backward_dispatches
                .fetch_add(1, Ordering::SeqCst);
            if n == self.fail_at {
                self.state.failed.store(true, Ordering::SeqCst);
                return Err(WorkerError::invalid("test exchange", "injected failure"));
            }
        }
        if self.lane != self.fail_lane && self.state.failed.load(Ordering::SeqCst) {
            let t = std::time::Instant::now();
            while !self.state.aborted.load(Ordering::SeqCst) {
                if t.elapsed() > Duration::from_secs(20) {
                    return Err(WorkerError::invalid(
                        "test exchange",
                        "nobody stopped the step",
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            return Err(WorkerError::invalid(
                "test exchange",
                "stopped: another rank failed",
            ));
        }
        Ok(frames)
    }

    fn abort(&self) {
        self.state.aborted.store(true, Ordering::SeqCst);
    }
}

#[test]
fn a_chunk_failing_inside_an_overlapped_pair_stops_its_partner_and_the_step() {
    let (model, inputs, targets) = setup(4);
    let b = batch(&inputs, &targets);
    let stages = StagePart::split(4, &[2, 2]).unwrap();
    let s = build(Schedule::DualPipe, 2, 4).unwrap();
    // The first pair on rank 0: its backward chunk's direction, and how many backward chunks
    // of that direction rank 0 runs before it (and in all).
    let d = s.ranks[0]
        .iter()
        .find_map(|op| match op {
            Op::Overlapped { b, .. } => Some(b.dir),
            _ => None,
        })
        .expect("an overlapped pair on rank 0");
    let bs: Vec<bool> = s.ranks[0]
        .iter()
        .flat_map(|op| {
            let paired = matches!(op, Op::Overlapped { .. });
            op.chunks()
                .filter(|c| c.pass == shoal_spec::schedule::Pass::B && c.dir == d)
                .map(move |_| paired)
                .collect::<Vec<_>>()
        })
        .collect();
    let k = bs.iter().position(|&p| p).unwrap_or(0);
    let run = |fail_at: usize| {
        let state = Arc::new(FaultState::default());
        let lanes = [
            Faulty {
                lane: 0,
                fail_lane: d,
                fail_at,
                state: state.clone(),
            },
            Faulty {
                lane: 1,
                fail_lane: d,
                fail_at,
                state: state.clone(),
            },
        ];
        // Only rank 0 has the faulty exchange; rank 1 a plain one (nothing fails there).
        let plain = Arc::new(FaultState::default());
        let others = [
            Faulty {
                lane: 0,
                fail_lane: d,
                fail_at: usize::MAX,
                state: plain.clone(),
            },
            Faulty {
                lane: 1,
                fail_lane: d,
                fail_at: usize::MAX,
                state: plain,
            },
        ];
        let experts: Vec<[&dyn ExpertExchange; 2]> =
            vec![[&lanes[0], &lanes[1]], [&others[0], &others[1]]];
        let mut g = model.params().zero_grads();
        let t = std::time::Instant::now();
        let r = run_step_with(
            &model,
            &stages,
            &s,
            &b,
            &objective(),
            &mut g,
            Duration::from_secs(60),
            &experts,
            true,
        );
        (r, t.elapsed(), state)
    };
    // Backward dispatches per such chunk on rank 0: a clean run counts them.
    let (clean, _, counted) = run(usize::MAX);
    clean.unwrap();
    let per_chunk = counted.backward_dispatches.load(Ordering::SeqCst) / bs.len();
    assert!(per_chunk > 0);
    let (r, took, state) = run(k * per_chunk);
    let e = r.unwrap_err().to_string();
    assert!(e.contains("injected failure"), "{e}");
    assert!(
        state.aborted.load(Ordering::SeqCst),
        "the partner was never told to stop"
    );
    assert!(
        took < Duration::from_secs(15),
        "the step took {took:?} to fail"
    );
}
