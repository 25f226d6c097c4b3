//! The single-process trainer: loss falls, runs are deterministic, checkpoints resume exactly,
//! and the expert-bias rule moves biases against the load.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use common::{batcher_of, small_cfg};
use shoal_kernels::ops::linear::Precision;
use shoal_worker::data::Batcher;
use shoal_worker::model::Model;
use shoal_worker::train::{TrainOptions, Trainer};

fn trainer(precision: Precision, steps: u64, seed: u64) -> Trainer {
    let model = Model::<f32>::new(&small_cfg(), precision, seed).unwrap();
    // A higher peak rate than the default: this small model learns the corpus's short-range
    // structure within 40 steps.
    let mut opts = TrainOptions::defaults(steps, precision);
    opts.lr = 3e-3;
    Trainer::new(model, batcher(seed), opts).unwrap()
}

fn batcher(seed: u64) -> Batcher {
    batcher_of(seed, 200_000, 4)
}

#[test]
fn loss_falls_and_runs_repeat_exactly() {
    for precision in [Precision::Fp32, Precision::Fp8] {
        let mut a = trainer(precision, 40, 5);
        let losses: Vec<f64> = (0..40).map(|_| a.train_step().unwrap().main_loss).collect();
        let first: f64 = losses[..5].iter().sum::<f64>() / 5.0;
        let last: f64 = losses[35..].iter().sum::<f64>() / 5.0;
        assert!(last < first - 0.5, "{precision:?}: loss {first} -> {last}");
        let mut b = trainer(precision, 40, 5);
        let again: Vec<f64> = (0..40).map(|_| b.train_step().unwrap().main_loss).collect();
        assert_eq!(losses, again, "{precision:?}: same seed, different losses");
    }
}

#[test]
fn resuming_from_a_checkpoint_changes_nothing() {
    for precision in [Precision::Fp32, Precision::Fp8] {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("ckpt");
        let mut straight = trainer(precision, 6, 9);
        let losses: Vec<f64> = (0..6)
            .map(|_| straight.train_step().unwrap().loss)
            .collect();

        let mut first = trainer(precision, 6, 9);
        for _ in 0..3 {
            first.train_step().unwrap();
        }
        first.save_checkpoint(&ckpt).unwrap();
        drop(first);
        let opts = Trainer::read_state(&ckpt).unwrap().options;
        let mut resumed = Trainer::resume(&ckpt, batcher(9), opts).unwrap();
        assert_eq!(resumed.step(), 3);
        let tail: Vec<f64> = (0..3).map(|_| resumed.train_step().unwrap().loss).collect();
        assert_eq!(tail, losses[3..], "{precision:?}");
        common::assert_same_weights(
            straight.model(),
            resumed.model(),
            &format!("{precision:?}, resumed"),
        );
    }
}

#[test]
fn resume_refuses_other_data() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let mut t = trainer(Precision::Fp32, 2, 1);
    t.train_step().unwrap();
    t.save_checkpoint(&ckpt).unwrap();
    let opts = Trainer::read_state(&ckpt).unwrap().options;
    let err = Trainer::resume(&ckpt, batcher(2), opts)
        .err()
        .expect("other seed refused");
    assert!(err.to_string().contains("seed"), "{err}");
}

#[test]
fn expert_biases_move_against_the_load() {
    let mut t = trainer(Precision::Fp32, 3, 4);
    let biases = t.model().expert_biases();
    assert_eq!(biases.len(), 2, "one MoE layer plus the MTP block");
    let before: Vec<Vec<f32>> = biases
        .iter()
        .map(|b| t.model().params().get(*b).data().to_vec())
        .collect();
    let m = t.train_step().unwrap();
    assert!(m.max_vio.iter().all(|v| *v >= 0.0) && m.max_vio.len() == 2);
    let after: Vec<Vec<f32>> = biases
        .iter()
        .map(|b| t.model().params().get(*b).data().to_vec())
        .collect();
    let gamma = t.options().bias_update_speed as f32;
    let mut moved = 0;
    for (b, a) in before.iter().zip(&after) {
        for (x, y) in b.iter().zip(a) {
            let d = y - x;
            assert!(
                d == 0.0 || (d.abs() - gamma).abs() < 1e-6,
                "bias moved by {d}"
            );
            moved += usize::from(d != 0.0);
        }
    }
    assert!(moved > 0);
}
