//! The `sim` device's step-time model against what the DeepSeek-V3 report states.

use shoal_spec::ModelConfig;
use shoal_spec::cost::{Hardware, step_cost};
use shoal_spec::plan::{Parallelism, Schedule};

fn paper(schedule: Schedule) -> Parallelism {
    Parallelism {
        pp: 16,
        dp: 128,
        ep: 64,
        schedule,
        // 15,360 sequences of 4,096 tokens over 128 data-parallel ranks, one per micro-batch.
        micro_batches: 120,
        micro_batch_size: 1,
        seq_len: 4096,
    }
}

#[test]
fn the_reports_cluster_lands_near_its_published_cost() {
    let m = ModelConfig::deepseek_v3_671b();
    let c = step_cost(&m, &paper(Schedule::DualPipe), 8, &Hardware::h800()).unwrap();
    assert_eq!(c.gpus, 2048);
    assert_eq!(c.tokens, 15_360 * 4096);
    // The report: cross-node expert parallelism gives a computation-to-communication ratio of
    // about 1:1.
    let ratio = c.chunk.f_comm / c.chunk.f_compute;
    assert!((0.5..2.0).contains(&ratio), "forward comm/compute {ratio}");
    // 180K H800 GPU-hours per trillion tokens; the model, before any failure, within 30%.
    let gh = c.gpu_hours_per_trillion_tokens;
    assert!(
        (126_000.0..234_000.0).contains(&gh),
        "{gh} GPU-hours per trillion tokens"
    );
    // Activated parameters (37B) make ~6 x 37e9 FLOPs per token, plus attention.
    assert!(
        (2.2e11..3.0e11).contains(&c.flops_per_token),
        "{}",
        c.flops_per_token
    );
    // A checkpoint: 8 bytes per parameter (FP32 master, two BF16 moments) over the GPUs, the
    // fullest rank somewhat above the mean.
    let (total, _) = m.parameter_count();
    let mean = 8.0 * total as f64 / 2048.0;
    let per_gpu = c.checkpoint_bytes_per_gpu as f64;
    assert!(
        per_gpu >= 0.9 * mean && per_gpu < 2.0 * mean,
        "{per_gpu} vs {mean}"
    );
    assert!(c.snapshot_s < 1.0 && c.snapshot_s < c.checkpoint_write_s);
}

#[test]
fn dualpipe_beats_1f1b_by_overlap_and_a_smaller_bubble() {
    let m = ModelConfig::deepseek_v3_671b();
    let hw = Hardware::h800();
    let dual = step_cost(&m, &paper(Schedule::DualPipe), 8, &hw).unwrap();
    let one = step_cost(&m, &paper(Schedule::OneFOneB), 8, &hw).unwrap();
    assert!(
        dual.pipeline_s < one.pipeline_s * 0.8,
        "{} vs {}",
        dual.pipeline_s,
        one.pipeline_s
    );
    assert!(dual.bubble_s < one.bubble_s);
    // The same chunks either way.
    assert_eq!(dual.chunk, one.chunk);
}

#[test]
fn faster_parts_never_make_a_slower_step() {
    let m = ModelConfig::deepseek_v3_671b();
    let par = paper(Schedule::DualPipe);
    let base = step_cost(&m, &par, 8, &Hardware::h800()).unwrap().step_s;
    let faster = [
        Hardware {
            ib_gbps: 100.0,
            ..Hardware::h800()
        },
        Hardware {
            gemm_efficiency: 0.9,
            ..Hardware::h800()
        },
        Hardware {
            hbm_gbps: 6000.0,
            ..Hardware::h800()
        },
        Hardware {
            expert_imbalance: 1.0,
            ..Hardware::h800()
        },
        Hardware {
            attention_bwd_efficiency: 0.7,
            ..Hardware::h800()
        },
    ];
    for hw in faster {
        let s = step_cost(&m, &par, 8, &hw).unwrap().step_s;
        assert!(s < base, "{hw:?}: {s} >= {base}");
    }
    // Slower InfiniBand exposes the all-to-all even in overlapped pairs.
    let slow = Hardware {
        ib_gbps: 10.0,
        ..Hardware::h800()
    };
    let c = step_cost(&m, &par, 8, &slow).unwrap();
    assert!(c.chunk.f_comm + c.chunk.b_comm > c.chunk.f_compute + c.chunk.b_compute);
    assert!(c.step_s > 1.5 * base);
}

#[test]
fn more_data_parallel_ranks_keep_the_step_and_scale_the_tokens() {
    let m = ModelConfig::deepseek_v3_671b();
    let hw = Hardware::h800();
    let a = step_cost(&m, &paper(Schedule::DualPipe), 8, &hw).unwrap();
    let b = step_cost(
        &m,
        &Parallelism {
            dp: 512,
            ..paper(Schedule::DualPipe)
        },
        8,
        &hw,
    )
    .unwrap();
    assert_eq!(b.tokens, 4 * a.tokens);
    assert_eq!(b.gpus, 4 * a.gpus);
    // Only ZeRO-1's collectives grow (slightly) with the group.
    assert!(
        (b.step_s - a.step_s).abs() < 0.05 * a.step_s,
        "{} vs {}",
        a.step_s,
        b.step_s
    );
}

#[test]
fn bad_hardware_and_plans_name_the_field() {
    let m = ModelConfig::deepseek_v3_671b();
    let par = paper(Schedule::DualPipe);
    let cases = [
        (
            Hardware {
                ib_gbps: 0.0,
                ..Hardware::h800()
            },
            "hardware.ib_gbps",
        ),
        (
            Hardware {
                gemm_efficiency: 1.5,
                ..Hardware::h800()
            },
            "hardware.gemm_efficiency",
        ),
        (
            Hardware {
                expert_imbalance: 0.5,
                ..Hardware::h800()
            },
            "hardware.expert_imbalance",
        ),
        (
            Hardware {
                comm_sms: 132,
                ..Hardware::h800()
            },
            "hardware.comm_sms",
        ),
        (
            Hardware {
                hbm_gbps: f64::NAN,
                ..Hardware::h800()
            },
            "hardware.hbm_gbps",
        ),
    ];
    for (hw, field) in cases {
        let e = step_cost(&m, &par, 8, &hw).unwrap_err().to_string();
        assert!(e.contains(field), "{e}");
    }
    let odd = Parallelism { ep: 3, ..par };
    let e = step_cost(&m, &odd, 8, &Hardware::h800())
        .unwrap_err()
        .to_string();
    assert!(e.contains("parallelism.ep"), "{e}");
}
