//! Pipeline schedules as data: every chunk once, the reference step structure, runnable order,
//! activation memory, and bubbles against the report's Table 2.

use std::collections::HashMap;

use proptest::prelude::*;
use shoal_spec::SpecError;
use shoal_spec::plan::Schedule;
use shoal_spec::schedule::{Chunk, Costs, Op, Pass, StepSchedule, build, simulate};

const RUNNABLE: [Schedule; 4] = [
    Schedule::OneFOneB,
    Schedule::Zb1p,
    Schedule::DualPipe,
    Schedule::DualPipeV,
];

/// Micro-batch counts to try for `pp` ranks.
fn counts(schedule: Schedule, pp: usize) -> Vec<usize> {
    match schedule {
        Schedule::DualPipe => vec![2 * pp, 2 * pp + 2, 3 * pp + (3 * pp) % 2, 4 * pp, 6 * pp],
        Schedule::DualPipeV => vec![2 * pp, 2 * pp + 1, 3 * pp, 4 * pp, 6 * pp + 1],
        _ => vec![1, pp.saturating_sub(1).max(1), pp, 2 * pp, 4 * pp + 3],
    }
}

fn ops_text(ops: &[Op]) -> String {
    ops.iter().map(Op::to_string).collect::<Vec<_>>().join(" ")
}

fn field(e: SpecError) -> String {
    match e {
        SpecError::Invalid { field, .. } => field,
        other => panic!("expected an invalid field, got {other:?}"),
    }
}

#[test]
fn every_rank_runs_each_chunk_once_in_order() {
    for schedule in RUNNABLE {
        for pp in [2, 4, 8] {
            for m in counts(schedule, pp) {
                let s = build(schedule, pp, m).unwrap();
                assert_eq!(s.ranks.len(), pp);
                let per_dir = s.per_direction();
                for (r, ops) in s.ranks.iter().enumerate() {
                    let mut at: HashMap<Chunk, usize> = HashMap::new();
                    for (i, op) in ops.iter().enumerate() {
                        for c in op.chunks() {
                            assert!(
                                at.insert(c, i).is_none(),
                                "{schedule} pp {pp} m {m}: rank {r} runs {c} twice"
                            );
                        }
                    }
                    // DualPipeV's ranks run both phases of every micro-batch.
                    let phases = if schedule == Schedule::DualPipeV {
                        2
                    } else {
                        1
                    };
                    assert_eq!(
                        at.len(),
                        3 * m * phases,
                        "{schedule} pp {pp} m {m} rank {r}"
                    );
                    for dir in 0..s.directions() {
                        for mb in 0..per_dir {
                            let pos = |pass| at[&Chunk { pass, dir, mb }];
                            assert!(
                                pos(Pass::F) < pos(Pass::B) && pos(Pass::B) <= pos(Pass::W),
                                "{schedule} pp {pp} m {m}: rank {r} orders {dir}.{mb} wrongly: {}",
                                ops_text(ops)
                            );
                        }
                    }
                }
                // Runs to its end against the other ranks, for any positive costs.
                for costs in [
                    Costs::UNIT,
                    Costs {
                        f: 1.0,
                        b: 2.0,
                        w: 0.5,
                        fb: 2.6,
                    },
                ] {
                    let t = simulate(&s, &costs).unwrap();
                    assert!(t.bubble.iter().all(|b| *b >= -1e-9), "{t:?}");
                }
            }
        }
    }
}

#[test]
fn dualpipe_follows_the_reference_steps() {
    // pp 4, 8 micro-batches, rank 0 (h = 0, H = 2, C = 4), step by step: F0 x 2; (F0, F1);
    // (B1 deferring W, W, F1); (F0&B1, F1&B0) x 1; (B1, F1&B0) x 1; (B1, B0 deferring W);
    // (W, B0 deferring W); W. Full backwards are their B and then their W.
    let s = build(Schedule::DualPipe, 4, 8).unwrap();
    assert_eq!(
        ops_text(&s.ranks[0]),
        "F0.0 F0.1 | F0.2 F1.0 | B1.0 W1.0 F1.1 | F0.3&B1.1 W1.1 F1.2&B0.0 W0.0 | \
         B1.2 W1.2 F1.3&B0.1 W0.1 | B1.3 W1.3 B0.2 | W0.2 B0.3 | W0.3"
            .replace(" |", "")
    );
    // The last rank mirrors it with the directions swapped.
    let swap = |c: Chunk| Chunk {
        dir: 1 - c.dir,
        ..c
    };
    let mirrored: Vec<Op> = s.ranks[0]
        .iter()
        .map(|o| match *o {
            Op::One(c) => Op::One(swap(c)),
            Op::Overlapped { f, b } => Op::Overlapped {
                f: swap(f),
                b: swap(b),
            },
        })
        .collect();
    assert_eq!(s.ranks[3], mirrored);

    for pp in [2, 4, 8, 16] {
        for m in [2 * pp, 4 * pp] {
            let s = build(Schedule::DualPipe, pp, m).unwrap();
            let (half, c) = (pp / 2, m / 2);
            for (r, ops) in s.ranks.iter().enumerate() {
                let h = r.min(pp - 1 - r);
                let middle = h == half - 1;
                // Steps 1 and 2 (and the middle ranks' first F0 of step 4) are forwards only.
                let leading = ops
                    .iter()
                    .take_while(|o| matches!(o, Op::One(Chunk { pass: Pass::F, .. })))
                    .count();
                assert_eq!(leading, pp + usize::from(middle), "pp {pp} rank {r}");
                // Steps 4 and 5 overlap.
                let overlapped = ops
                    .iter()
                    .filter(|o| matches!(o, Op::Overlapped { .. }))
                    .count();
                assert_eq!(
                    overlapped,
                    2 * (c + h + 1 - pp) - usize::from(middle) + (half - h - 1),
                    "pp {pp} m {m} rank {r}"
                );
                // The rank's first forward is of its own first direction: the pipeline's 0 on
                // the first half of the ranks, 1 on the second.
                let first = ops[0].chunks().next().unwrap();
                assert_eq!(first.dir, u8::from(r >= half), "pp {pp} rank {r}");
                // It ends with step 8's h + 1 deferred weight gradients.
                let trailing = ops
                    .iter()
                    .rev()
                    .take_while(|o| matches!(o, Op::One(Chunk { pass: Pass::W, .. })))
                    .count();
                assert!(trailing > h, "pp {pp} rank {r}: {}", ops_text(ops));
            }
        }
    }
}

#[test]
fn dualpipev_follows_the_reference_steps() {
    // pp 4, 8 micro-batches, rank 0 (p = 3), step by step: F0 x 6; (F0, F1); (B1 deferring W,
    // W, F1) x 3; (F0&B1, F1&B0) x 1; (B1, F1&B0) x 3; (B1, B0 deferring W); (W, B0 deferring
    // W) x 3; W.
    let s = build(Schedule::DualPipeV, 4, 8).unwrap();
    assert_eq!(
        ops_text(&s.ranks[0]),
        "F0.0 F0.1 F0.2 F0.3 F0.4 F0.5 | F0.6 F1.0 | B1.0 W1.0 F1.1 B1.1 W1.1 F1.2 B1.2 W1.2 \
         F1.3 | F0.7&B1.3 W1.3 F1.4&B0.0 W0.0 | B1.4 W1.4 F1.5&B0.1 W0.1 B1.5 W1.5 F1.6&B0.2 \
         W0.2 B1.6 W1.6 F1.7&B0.3 W0.3 | B1.7 W1.7 B0.4 | W0.4 B0.5 W0.5 B0.6 W0.6 B0.7 | W0.7"
            .replace(" |", "")
    );
    // The last rank turns every micro-batch: its first F0 and B1 of step 4 run apart.
    assert_eq!(
        ops_text(&s.ranks[3][..12]),
        "F0.0 F1.0 F0.1 F1.1 F0.2 F1.2 F0.3 F1.3 F0.4 B1.0 W1.0 F1.4&B0.0"
    );
    // Rank r holds stage r for phase 0 and stage 2pp - 1 - r for phase 1; micro-batches enter
    // and leave at rank 0 and turn on the last rank.
    assert_eq!(s.stage_count(), 8);
    assert_eq!((s.position(0, 0), s.position(0, 1)), (0, 7));
    assert_eq!((s.position(3, 0), s.position(3, 1)), (3, 4));
    assert_eq!(s.holder(0, 4), (3, 1));
    assert_eq!(s.holder(1, 3), (3, 0));
    assert_eq!(s.micro_index(1, 5), 5);

    for pp in [1, 2, 3, 4, 8, 16] {
        for m in [2 * pp, 2 * pp + 3, 4 * pp] {
            let s = build(Schedule::DualPipeV, pp, m).unwrap();
            for (r, ops) in s.ranks.iter().enumerate() {
                let p = pp - 1 - r;
                // Steps 1 and 2 (and the last rank's first F0 of step 4) are forwards only.
                let leading = ops
                    .iter()
                    .take_while(|o| matches!(o, Op::One(Chunk { pass: Pass::F, .. })))
                    .count();
                assert_eq!(
                    leading,
                    2 * p + 2 * (r + 1) + usize::from(p == 0),
                    "pp {pp} m {m} rank {r}"
                );
                // Steps 4 and 5 overlap.
                let overlapped = ops
                    .iter()
                    .filter(|o| matches!(o, Op::Overlapped { .. }))
                    .count();
                assert_eq!(
                    overlapped,
                    2 * (m + r + 1 - 2 * pp) - usize::from(p == 0) + p,
                    "pp {pp} m {m} rank {r}"
                );
                // It ends with step 8's r + 1 deferred weight gradients.
                let trailing = ops
                    .iter()
                    .rev()
                    .take_while(|o| matches!(o, Op::One(Chunk { pass: Pass::W, .. })))
                    .count();
                assert!(trailing > r, "pp {pp} rank {r}: {}", ops_text(ops));
            }
        }
    }
}

/// Most activations a rank holds at once: forwards whose weight gradient has not run.
fn peak_held(ops: &[Op]) -> usize {
    let (mut held, mut peak) = (0usize, 0usize);
    for c in ops.iter().flat_map(Op::chunks) {
        match c.pass {
            Pass::F => held += 1,
            Pass::B => {}
            Pass::W => held -= 1,
        }
        peak = peak.max(held);
    }
    peak
}

#[test]
fn activation_memory_follows_table_2() {
    for pp in [2, 4, 8] {
        let m = 4 * pp;
        let one = build(Schedule::OneFOneB, pp, m).unwrap();
        let zb = build(Schedule::Zb1p, pp, m).unwrap();
        let dual = build(Schedule::DualPipe, pp, m).unwrap();
        for r in 0..pp {
            // 1F1B: pp - r micro-batches on rank r; ZB1P keeps 1F1B's peak (pp).
            assert_eq!(peak_held(&one.ranks[r]), pp - r, "1f1b pp {pp} rank {r}");
            assert!(peak_held(&zb.ranks[r]) <= pp, "zb1p pp {pp} rank {r}");
            // DualPipe: PP + 1 (chunks of the rank's two half-size stages).
            assert_eq!(
                peak_held(&dual.ranks[r]),
                pp + 1,
                "dualpipe pp {pp} rank {r}"
            );
        }
        // DualPipeV over pp / 2 ranks (the same pp stages): PP + 1 as well, on half the devices.
        let v = build(Schedule::DualPipeV, pp / 2, m).unwrap();
        for (r, ops) in v.ranks.iter().enumerate() {
            assert_eq!(peak_held(ops), pp + 1, "dualpipev pp {pp} rank {r}");
        }
    }
}

fn costs() -> impl Strategy<Value = Costs> {
    // Backward-for-input at least the forward, weights at most it, as in a transformer layer;
    // the overlapped pair costs both (overlap hides communication, not compute).
    (0.5f64..2.0, 1.0f64..2.0, 0.3f64..1.0).prop_map(|(f, b, w)| {
        let (b, w) = (f * b, f * w);
        Costs { f, b, w, fb: f + b }
    })
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

#[test]
fn unit_cost_bubbles_match_table_2() {
    for pp in [2, 4, 8, 16] {
        for schedule in [Schedule::Zb1p, Schedule::DualPipe, Schedule::DualPipeV] {
            let t = simulate(&build(schedule, pp, 4 * pp).unwrap(), &Costs::UNIT).unwrap();
            let want = Costs::UNIT.table2_bubble(schedule, pp);
            for b in &t.bubble {
                assert!(close(*b, want), "{schedule} pp {pp}: {b} against {want}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Shoal's 1F1B sends a micro-batch's input gradient before computing its weight gradient,
    /// so W drops out of Table 2's `(PP-1)(F+B)`: the bubble is `(PP-1)(F+B_input)`.
    #[test]
    fn one_f_one_b_bubble_is_pp_minus_1_times_f_plus_b(c in costs(), pp in 2usize..9, extra in 0usize..8) {
        let t = simulate(&build(Schedule::OneFOneB, pp, pp + extra).unwrap(), &c).unwrap();
        for b in &t.bubble {
            prop_assert!(close(*b, (pp as f64 - 1.0) * (c.f + c.b)), "{} {:?}", b, c);
        }
    }

    /// ZB1P reaches Table 2's `(PP-1)(F+B-2W)`, `B` being the whole backward; DualPipe does at
    /// least as well as `(PP/2-1)(F&B+B-3W)`, and both beat 1F1B.
    #[test]
    fn zb1p_and_dualpipe_bubbles_against_table_2(c in costs(), half in 1usize..5, extra in 0usize..4) {
        let pp = 2 * half;
        let m = 2 * pp + 2 * extra;
        let zb = simulate(&build(Schedule::Zb1p, pp, m).unwrap(), &c).unwrap();
        let dual = simulate(&build(Schedule::DualPipe, pp, m).unwrap(), &c).unwrap();
        let one = simulate(&build(Schedule::OneFOneB, pp, m).unwrap(), &c).unwrap();
        let want_zb = c.table2_bubble(Schedule::Zb1p, pp);
        let want_dual = c.table2_bubble(Schedule::DualPipe, pp);
        // DualPipeV over `half` ranks cuts the same 2 x half stages in a V.
        let v = simulate(&build(Schedule::DualPipeV, half, m).unwrap(), &c).unwrap();
        let want_v = c.table2_bubble(Schedule::DualPipeV, half);
        prop_assert!(close(want_v, want_dual), "{} against {}", want_v, want_dual);
        for b in &v.bubble {
            prop_assert!(*b <= want_v + 1e-9, "dualpipev {} against {} {:?}", b, want_v, c);
        }
        for r in 0..pp {
            prop_assert!(close(zb.bubble[r], want_zb), "zb1p {} against {} {:?}", zb.bubble[r], want_zb, c);
            prop_assert!(dual.bubble[r] <= want_dual + 1e-9, "dualpipe {} against {} {:?}", dual.bubble[r], want_dual, c);
            prop_assert!(zb.bubble[r] <= one.bubble[r] + 1e-9);
        }
    }
}

#[test]
fn bad_shapes_name_the_field() {
    let cases: [(Schedule, usize, usize, &str); 8] = [
        (Schedule::DualPipe, 3, 8, "parallelism.pp"),
        (Schedule::DualPipe, 4, 6, "parallelism.micro_batches"),
        (Schedule::DualPipe, 4, 9, "parallelism.micro_batches"),
        (Schedule::OneFOneB, 0, 4, "parallelism.pp"),
        (Schedule::Zb1p, 4, 0, "parallelism.micro_batches"),
        (Schedule::OneFOneB, 2048, 4, "parallelism.pp"),
        (
            Schedule::OneFOneB,
            1024,
            16_384,
            "parallelism.micro_batches",
        ),
        (Schedule::DualPipeV, 4, 7, "parallelism.micro_batches"),
    ];
    for (schedule, pp, m, want) in cases {
        let e = build(schedule, pp, m).unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
        assert_eq!(field(e), want);
    }
}

#[test]
fn an_order_that_cannot_run_is_refused_naming_rank_and_operation() {
    let mut s: StepSchedule = build(Schedule::OneFOneB, 2, 2).unwrap();
    // Rank 0 now starts with B0.0, which waits on rank 1's B0.0, which waits on rank 1's F0.0,
    // which waits on rank 0's F0.0, ordered after B0.0.
    s.ranks[0].swap(0, 2);
    let e = simulate(&s, &Costs::UNIT).unwrap_err().to_string();
    assert!(e.contains("cannot run") && e.contains("rank"), "{e}");
    // Fewer operation lists than ranks.
    s.ranks.pop();
    let e = simulate(&s, &Costs::UNIT).unwrap_err().to_string();
    assert!(e.contains("operation lists"), "{e}");
}

#[test]
fn operations_are_written_as_the_issue_spells_them() {
    let f = Chunk {
        pass: Pass::F,
        dir: 0,
        mb: 3,
    };
    let b = Chunk {
        pass: Pass::B,
        dir: 1,
        mb: 1,
    };
    assert_eq!(Op::One(f).to_string(), "F0.3");
    assert_eq!(Op::Overlapped { f, b }.to_string(), "F0.3&B1.1");
    assert_eq!(
        serde_json::to_string(&Op::Overlapped { f, b }).unwrap(),
        "\"F0.3&B1.1\""
    );
}
