//! Data parallelism with ZeRO-1 on threads: the same losses, weights and expert biases as one
//! rank over the same global batch; replicas stay identical; each rank keeps only its shard of
//! the optimizer state; checkpoints consolidate the shards and resume under any `dp`.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use common::{batcher, opts, rel, small_cfg as cfg, trainer};
use shoal_kernels::ops::linear::Precision;
use shoal_worker::model::Model;
use shoal_worker::train::{PipelineOptions, TrainOptions, Trainer};

fn run(t: &mut Trainer, steps: u64) -> Vec<f64> {
    (0..steps).map(|_| t.train_step().unwrap().loss).collect()
}

fn assert_replicas_identical(t: &Trainer, dp: usize) {
    let first = t.replica(0).unwrap();
    for r in 1..dp {
        let other = t.replica(r).unwrap();
        for ((_, name, a), (_, _, b)) in first.params().iter().zip(other.params().iter()) {
            assert_eq!(a, b, "replica {r} differs from replica 0 in {name}");
        }
    }
    assert!(t.replica(dp).is_none());
}

/// Per-step losses within `tol` relative, expert biases identical (the loads of the whole
/// global batch move them), weights within `wtol` absolute.
fn check(precision: Precision, base: TrainOptions, other: TrainOptions, tol: f64, wtol: f32) {
    let steps = base.steps;
    let dp = other.dp;
    let mut a = trainer(precision, base, 3);
    let mut b = trainer(precision, other, 3);
    let la = run(&mut a, steps);
    let lb = run(&mut b, steps);
    for (s, (x, y)) in la.iter().zip(&lb).enumerate() {
        assert!(
            rel(*y, *x) <= tol,
            "{precision:?} dp {dp}: step {} loss {y} against {x} (rel {:e})",
            s + 1,
            rel(*y, *x)
        );
    }
    assert_replicas_identical(&b, dp);
    for bias in a.model().expert_biases() {
        assert_eq!(
            a.model().params().get(bias),
            b.model().params().get(bias),
            "{precision:?} dp {dp}: expert biases differ"
        );
    }
    let mut worst = 0f32;
    for ((_, _, x), (_, _, y)) in a.model().params().iter().zip(b.model().params().iter()) {
        for (p, q) in x.data().iter().zip(y.data()) {
            worst = worst.max((p - q).abs());
        }
    }
    assert!(
        worst <= wtol,
        "{precision:?} dp {dp}: weights differ by {worst}"
    );
}

#[test]
fn data_parallel_ranks_match_one_rank_in_fp32() {
    for dp in [2, 4] {
        // The same global batch: one rank splits it into 4 micro-batches, dp ranks into dp
        // shards of 4 / dp micro-batches each.
        check(
            Precision::Fp32,
            opts(Precision::Fp32, 4, 1, 1, 4),
            opts(Precision::Fp32, 4, dp, 1, 4 / dp),
            1e-5,
            1e-5,
        );
    }
}

#[test]
fn data_parallel_pipelines_match_one_rank() {
    let mut o = opts(Precision::Fp32, 3, 2, 1, 2);
    o.pipeline = Some(PipelineOptions {
        pp: 2,
        schedule: "1f1b".into(),
        overlap: true,
    });
    check(
        Precision::Fp32,
        opts(Precision::Fp32, 3, 1, 1, 4),
        o,
        1e-5,
        1e-5,
    );
}

#[test]
fn data_parallel_fp8_stays_within_the_fp8_tolerance() {
    check(
        Precision::Fp8,
        opts(Precision::Fp8, 3, 1, 1, 4),
        opts(Precision::Fp8, 3, 2, 1, 2),
        1e-4,
        1e-3,
    );
}

#[test]
fn each_rank_keeps_only_its_shard_of_the_optimizer_state() {
    let one = trainer(Precision::Fp32, opts(Precision::Fp32, 1, 1, 1, 1), 1).memory_per_rank();
    assert_eq!(one.len(), 1);
    for dp in [2, 4, 8] {
        let mem = trainer(Precision::Fp32, opts(Precision::Fp32, 1, dp, 1, 1), 1).memory_per_rank();
        assert_eq!(mem.len(), dp);
        let total: u64 = mem.iter().map(|m| m.optimizer).sum();
        assert_eq!(
            total, one[0].optimizer,
            "dp {dp}: shards cover the state once"
        );
        for m in &mem {
            // Shards differ by at most one element (8 bytes of FP32 moments).
            let ideal = one[0].optimizer / dp as u64;
            assert!(m.optimizer.abs_diff(ideal) <= 8, "dp {dp}: {m:?}");
            assert_eq!(m.params, one[0].params);
            assert!(m.total() < one[0].total());
        }
    }
    // BF16 moments halve it again.
    let fp8 = trainer(Precision::Fp8, opts(Precision::Fp8, 1, 2, 1, 1), 1).memory_per_rank();
    assert_eq!(
        fp8.iter().map(|m| m.optimizer).sum::<u64>() * 2,
        one[0].optimizer
    );
}

#[test]
fn a_sharded_checkpoint_resumes_exactly_under_any_dp() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let mut straight = trainer(Precision::Fp32, opts(Precision::Fp32, 4, 2, 1, 2), 7);
    let losses = run(&mut straight, 4);

    let mut first = trainer(Precision::Fp32, opts(Precision::Fp32, 4, 2, 1, 2), 7);
    run(&mut first, 2);
    first.save_checkpoint(&ckpt).unwrap();
    drop(first);
    let saved = Trainer::read_state(&ckpt).unwrap().options;
    assert_eq!(saved.dp, 2);
    let mut resumed = Trainer::resume(&ckpt, batcher(7), saved.clone()).unwrap();
    assert_eq!(run(&mut resumed, 2), losses[2..], "same dp: bit-identical");
    for ((_, name, a), (_, _, b)) in straight
        .model()
        .params()
        .iter()
        .zip(resumed.model().params().iter())
    {
        assert_eq!(a, b, "{name} differs after resume");
    }

    // The moments are consolidated: four ranks (or one) continue from the same state.
    for dp in [1, 4] {
        let o = TrainOptions {
            dp,
            micro_batches: 4 / dp,
            ..saved.clone()
        };
        let mut other = Trainer::resume(&ckpt, batcher(7), o).unwrap();
        for (s, (x, y)) in run(&mut other, 2).iter().zip(&losses[2..]).enumerate() {
            assert!(
                rel(*x, *y) <= 1e-5,
                "dp {dp}: step {} {x} against {y}",
                s + 3
            );
        }
    }
}

#[test]
fn bad_data_parallel_settings_are_refused_naming_the_field() {
    for (dp, want) in [(0, "dp"), (9, "dp")] {
        let model = Model::<f32>::new(&cfg(), Precision::Fp32, 1).unwrap();
        let err = Trainer::new(model, batcher(1), opts(Precision::Fp32, 1, dp, 1, 1))
            .err()
            .expect("refused");
        assert!(err.to_string().contains(want), "{err}");
    }
    let mut o = opts(Precision::Fp32, 1, 4, 1, 4);
    o.pipeline = Some(PipelineOptions {
        pp: 2,
        schedule: "1f1b".into(),
        overlap: true,
    });
    let model = Model::<f32>::new(&cfg(), Precision::Fp32, 1).unwrap();
    let err = Trainer::new(model, batcher(1), o).err().expect("refused");
    assert!(err.to_string().contains("micro_batches"), "{err}");
}
