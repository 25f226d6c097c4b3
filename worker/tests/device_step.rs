//! The device step on the CPU reference backend ([`Host`]): the conformance suite of
//! `common/device.rs`, which `device_step_gpu.rs` runs on a GPU. On the host the operators are
//! the CPU model's own, so the forward pass routes identically and the losses agree to rounding,
//! in FP32 and in the BF16 and FP8 recipes alike.

#![allow(clippy::unwrap_used)]

mod common;

use common::device::{
    Tolerance, one_pass_matches_the_cpu_model, training_steps_match_the_cpu_trainer,
};
use shoal_kernels::backend::Host;
use shoal_kernels::ops::linear::Precision;

const HOST: Tolerance = Tolerance {
    loss: 1e-6,
    grad: 1e-4,
    same_routing: true,
    params_over_lr: Some(1e-3),
};

#[test]
fn one_pass_of_the_small_model_matches_the_cpu_model() {
    one_pass_matches_the_cpu_model(Host, &common::small_cfg(), Precision::Fp32, 4, HOST);
}

#[test]
fn one_pass_of_the_tiny_preset_matches_the_cpu_model() {
    let tiny = shoal_spec::ModelConfig::tiny();
    one_pass_matches_the_cpu_model(Host, &tiny, Precision::Fp32, 2, HOST);
}

#[test]
fn three_training_steps_match_the_cpu_trainer() {
    training_steps_match_the_cpu_trainer(Host, &common::small_cfg(), Precision::Fp32, 3, HOST);
}

#[test]
fn one_pass_in_bf16_matches_the_cpu_model() {
    let small = common::small_cfg();
    one_pass_matches_the_cpu_model(Host, &small, Precision::Bf16, 4, HOST);
}

#[test]
fn one_pass_in_fp8_matches_the_cpu_model() {
    let small = common::small_cfg();
    one_pass_matches_the_cpu_model(Host, &small, Precision::Fp8, 4, HOST);
    let tiny = shoal_spec::ModelConfig::tiny();
    one_pass_matches_the_cpu_model(Host, &tiny, Precision::Fp8, 2, HOST);
}

#[test]
fn three_training_steps_in_bf16_and_fp8_match_the_cpu_trainer() {
    for p in [Precision::Bf16, Precision::Fp8] {
        training_steps_match_the_cpu_trainer(Host, &common::small_cfg(), p, 3, HOST);
    }
}

fn host_trainer(
    precision: shoal_kernels::ops::linear::Precision,
    steps: u64,
) -> shoal_worker::train::Trainer {
    let o = common::opts(precision, steps, 1, 1, 2);
    common::trainer(precision, o, 9)
}

fn attach_host(t: &mut shoal_worker::train::Trainer) {
    let dev =
        shoal_worker::model::device::DeviceModel::new(Host, t.model(), t.options().bf16_moments)
            .unwrap();
    t.attach_device(Box::new(dev)).unwrap();
}

/// A trainer with a device attached steps on the device and keeps its host model, expert biases
/// and optimizer state as the CPU trainer does: the same losses, and the same weights after.
#[test]
fn a_trainer_with_a_device_attached_trains_as_the_cpu_trainer_does() {
    a_trainer_on_the_host_device_matches(Precision::Fp32);
}

/// The same in the report's FP8 recipe with BF16 moments (a job's defaults).
#[test]
fn a_trainer_with_a_device_attached_trains_in_fp8_as_the_cpu_trainer_does() {
    a_trainer_on_the_host_device_matches(Precision::Fp8);
}

fn a_trainer_on_the_host_device_matches(precision: Precision) {
    let mut cpu = host_trainer(precision, 4);
    let mut dev = host_trainer(precision, 4);
    attach_host(&mut dev);
    assert!(dev.device().unwrap().starts_with("cpu"));
    for _ in 0..4 {
        let (a, b) = (cpu.train_step().unwrap(), dev.train_step().unwrap());
        assert_eq!(a.step, b.step);
        assert!(
            common::rel(b.loss, a.loss) < 1e-6,
            "{precision:?}: loss {} vs {}",
            b.loss,
            a.loss
        );
        assert_eq!(a.expert_loads, b.expert_loads);
        assert_eq!(a.lr, b.lr);
    }
    // The host copy follows the device only when synced (checkpoints sync).
    dev.sync_device().unwrap();
    for ((_, name, a), (_, _, b)) in cpu.model().params().iter().zip(dev.model().params().iter()) {
        let worst = a
            .data()
            .iter()
            .zip(b.data())
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(worst < 1e-5, "{precision:?}: {name} differs by {worst:e}");
    }
}

/// A device run checkpoints its host state; resumed (on the device again) it continues to the
/// same losses and weights as the run that never stopped: in FP32, and in FP8 with BF16 moments
/// (which cross between the device and the checkpoint as BF16 values, unchanged).
#[test]
fn a_device_run_resumed_from_a_checkpoint_continues_unchanged() {
    use shoal_worker::train::Trainer;
    for precision in [Precision::Fp32, Precision::Fp8] {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("ckpt");
        let mut straight = host_trainer(precision, 6);
        attach_host(&mut straight);
        let losses: Vec<f64> = (0..6)
            .map(|_| straight.train_step().unwrap().loss)
            .collect();
        let mut first = host_trainer(precision, 6);
        attach_host(&mut first);
        for _ in 0..3 {
            first.train_step().unwrap();
        }
        first.save_checkpoint(&ckpt).unwrap();
        drop(first);
        let opts = Trainer::read_state(&ckpt).unwrap().options;
        assert_eq!(opts.bf16_moments, precision == Precision::Fp8);
        let mut resumed = Trainer::resume(&ckpt, common::batcher(9), opts).unwrap();
        attach_host(&mut resumed);
        let tail: Vec<f64> = (0..3).map(|_| resumed.train_step().unwrap().loss).collect();
        assert_eq!(tail, losses[3..], "{precision:?}");
        straight.sync_device().unwrap();
        resumed.sync_device().unwrap();
        common::assert_same_weights(
            straight.model(),
            resumed.model(),
            &format!("{precision:?}, resumed"),
        );
    }
}

/// A job's checkpoint of a device run (the sharded snapshot the background writer commits) holds
/// the device's state, not a stale host copy: restored, the run continues to the losses of the
/// run that never stopped.
#[test]
fn a_device_runs_sharded_checkpoint_holds_the_devices_state() {
    use shoal_worker::checkpoint::background::BackgroundWriter;
    use shoal_worker::checkpoint::sharded::latest_valid;
    use shoal_worker::train::Trainer;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("checkpoints");
    let mut straight = host_trainer(Precision::Fp8, 5);
    attach_host(&mut straight);
    let losses: Vec<f64> = (0..5)
        .map(|_| straight.train_step().unwrap().loss)
        .collect();
    let mut first = host_trainer(Precision::Fp8, 5);
    attach_host(&mut first);
    for _ in 0..2 {
        first.train_step().unwrap();
    }
    let snap = first
        .checkpoint_snapshot(
            &root,
            serde_json::Value::Null,
            std::time::Duration::from_secs(30),
            2,
        )
        .unwrap();
    let mut writer = BackgroundWriter::start().unwrap();
    writer.submit(snap);
    for (step, r) in writer.finish() {
        r.unwrap_or_else(|e| panic!("checkpoint of step {step}: {e}"));
    }
    let (ckpt, manifest) = latest_valid(&root).unwrap().unwrap();
    assert_eq!(manifest.step, 2);
    let opts = Trainer::read_state(&ckpt).unwrap().options;
    let mut resumed = Trainer::restore_sharded(&ckpt, common::batcher(9), opts, None).unwrap();
    attach_host(&mut resumed);
    let tail: Vec<f64> = (0..3).map(|_| resumed.train_step().unwrap().loss).collect();
    assert_eq!(tail, losses[2..]);
}

/// Runs the device step does not cover are refused by name, and the trainer stays on the CPU.
#[test]
fn runs_the_device_step_does_not_cover_are_refused_with_the_reason() {
    let mut pipelined = common::opts(Precision::Fp32, 2, 1, 1, 2);
    pipelined.pipeline = Some(shoal_worker::train::PipelineOptions {
        pp: 2,
        schedule: "1f1b".into(),
        overlap: true,
    });
    for (t, why) in [
        (
            common::trainer(Precision::Fp32, pipelined, 9),
            "pipeline parallelism",
        ),
        (
            common::trainer(
                Precision::Fp32,
                common::opts(Precision::Fp32, 2, 2, 1, 1),
                9,
            ),
            "2 data-parallel ranks",
        ),
    ] {
        let mut t = t;
        assert_eq!(
            t.device_eligibility().as_deref().map(|s| s.contains(why)),
            Some(true)
        );
        let model =
            shoal_worker::model::Model::<f32>::new(&common::small_cfg(), Precision::Fp32, 9)
                .unwrap();
        let dev = shoal_worker::model::device::DeviceModel::new(Host, &model, false).unwrap();
        let e = t.attach_device(Box::new(dev)).unwrap_err().to_string();
        assert!(e.contains("device") && e.contains(why), "{e}");
        assert!(t.device().is_none());
        t.train_step().unwrap();
    }
}

/// The weights whose linears run in the model's precision are the CPU model's: every matrix but
/// the embedding, the output head and the routers; the host backend takes all of them.
#[test]
fn the_mixed_precision_weights_are_every_matrix_but_embedding_head_and_routers() {
    use shoal_worker::model::Model;
    use shoal_worker::model::device::DeviceModel;
    let model = Model::<f32>::new(&common::small_cfg(), Precision::Fp8, 1).unwrap();
    let names: Vec<String> = model
        .mixed_precision_weights()
        .into_iter()
        .map(|id| model.params().name(id).to_string())
        .collect();
    for kept in ["embed_tokens", "lm_head", "mlp.gate.weight"] {
        assert!(
            !names.iter().any(|n| n.contains(kept)),
            "{kept} in {names:?}"
        );
    }
    for mixed in [
        "self_attn.kv_a_proj_with_mqa.weight",
        "self_attn.o_proj.weight",
        "mlp.experts.7.down_proj.weight",
        "mlp.shared_experts.up_proj.weight",
        "eh_proj.weight",
    ] {
        assert!(
            names.iter().any(|n| n.contains(mixed)),
            "{mixed} not in {names:?}"
        );
    }
    assert!(names.iter().all(|n| {
        let id = model.params().find(n).unwrap();
        model.params().layout_shape(id).len() == 2
    }));
    assert_eq!(DeviceModel::unsupported(&Host, &model), None);
}

/// A token id outside the vocabulary is refused by the backend's embedding, by name, and a
/// target outside it by its cross-entropy: no read outside the table.
#[test]
fn token_ids_outside_the_vocabulary_are_refused_by_name() {
    use shoal_worker::model::{Model, Objective, TokenBatch};
    let cfg = common::small_cfg();
    let model = Model::<f32>::new(&cfg, Precision::Fp32, 1).unwrap();
    let mut dev = shoal_worker::model::device::DeviceModel::new(Host, &model, false).unwrap();
    let good: Vec<u32> = (0..16).collect();
    let mut bad = good.clone();
    bad[5] = cfg.vocab_size as u32;
    for (inputs, targets, what) in [
        (&bad, &good, "embedding.ids"),
        (&good, &bad, "cross_entropy.targets"),
    ] {
        let b = TokenBatch {
            batch: 2,
            seq: 8,
            inputs,
            targets,
        };
        let e = dev
            .forward_backward(&b, &Objective::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains(what), "{e}");
    }
}

/// A device model keeps its moments in the precision it was made with (BF16: half the memory)
/// and refuses the other one by name, for a restored state and for a step's optimizer settings,
/// changing nothing; steps with the right settings keep them BF16.
#[test]
fn a_device_model_stores_its_moments_in_one_precision_and_refuses_the_other() {
    use shoal_kernels::ops::adamw::Moments;
    use shoal_worker::model::Model;
    use shoal_worker::model::device::DeviceModel;
    let model = Model::<f32>::new(&common::small_cfg(), Precision::Fp8, 1).unwrap();
    let mut dev = DeviceModel::new(Host, &model, true).unwrap();
    let (steps, start) = dev.moments().unwrap();
    assert_eq!(steps, 0);
    assert!(!start.is_empty() && start.iter().all(|(_, s)| s.is_bf16()));
    let (id, s) = &start[0];
    let (n, _) = s.lens();
    let fp32 = Moments::zeros(n, false);
    let e = dev.set_moments(5, &[(*id, &fp32)]).unwrap_err().to_string();
    assert!(
        e.contains("adamw.state") && e.contains("fp32 moments") && e.contains("stores bf16"),
        "{e}"
    );
    assert_eq!(
        dev.moments().unwrap().0,
        0,
        "a refused state changes nothing"
    );

    let mut o = common::opts(Precision::Fp8, 2, 1, 1, 1);
    let mut data = common::batcher(1);
    let b = data.next_batch();
    let tb = common::device::batch_of(&b);
    o.bf16_moments = false;
    let e = dev
        .train_step(&tb, &o.step_hyper(0))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("adamw.bf16_moments") && e.contains("bf16"),
        "{e}"
    );
    assert_eq!(
        dev.moments().unwrap(),
        (0, start.clone()),
        "nothing stepped"
    );
    o.bf16_moments = true;
    dev.train_step(&tb, &o.step_hyper(0)).unwrap();
    let (steps, after) = dev.moments().unwrap();
    assert_eq!(steps, 1);
    assert!(after.iter().all(|(_, s)| s.is_bf16()));
    assert!(after != start, "the step moved the moments");
}
