//! Results must not depend on how many threads rayon gives a kernel: the same inputs give
//! bit-identical outputs on 1 and on 3 threads.

use shoal_kernels::matmul::matmul;
use shoal_kernels::ops::attention::attention_forward;
use shoal_kernels::ops::cross_entropy::cross_entropy_forward;
use shoal_kernels::ops::moe_gate::{GateConfig, gate_forward};
use shoal_kernels::ops::rmsnorm::rmsnorm_backward_weight;
use shoal_kernels::{Accumulation, Fp8Matrix, QuantConfig, Tensor, fp8_gemm};

fn on_threads<R>(n: usize, f: impl FnOnce() -> R + Send) -> R
where
    R: Send,
{
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .expect("thread pool")
        .install(f)
}

fn data(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

fn tensor(shape: &[usize], seed: u32) -> Tensor<f32> {
    Tensor::new(shape.to_vec(), data(shape.iter().product(), seed)).expect("shape")
}

fn same_on_1_and_3_threads<R: PartialEq + std::fmt::Debug + Send>(f: impl Fn() -> R + Sync) {
    let one = on_threads(1, &f);
    let three = on_threads(3, &f);
    assert!(one == three, "results differ between 1 and 3 threads");
}

#[test]
fn quantization() {
    // Large enough for the threaded path.
    let x = data(1200 * 1024, 1);
    same_on_1_and_3_threads(|| Fp8Matrix::quantize_tiles(&x, 1200, 1024, QuantConfig::default()));
}

#[test]
fn gemms() {
    let a = tensor(&[300, 257], 2);
    let b = tensor(&[257, 190], 3);
    same_on_1_and_3_threads(|| matmul(&a, false, &b, false));
    let cfg = QuantConfig::default();
    let aq = Fp8Matrix::quantize_tiles(a.data(), 300, 257, cfg).expect("quantize");
    let bt = tensor(&[190, 257], 4);
    let bq = Fp8Matrix::quantize_blocks(bt.data(), 190, 257, cfg).expect("quantize");
    same_on_1_and_3_threads(|| fp8_gemm(&aq, &bq, Accumulation::Fp32));
}

#[test]
fn reductions_over_tokens() {
    let x = tensor(&[700, 96], 5);
    let dy = tensor(&[700, 96], 6);
    same_on_1_and_3_threads(|| rmsnorm_backward_weight(&dy, &x, 1e-6));
    let logits = tensor(&[300, 500], 7);
    let targets: Vec<u32> = (0..300).map(|i| (i * 37 % 500) as u32).collect();
    same_on_1_and_3_threads(|| {
        cross_entropy_forward(&logits, &targets, None).map(|ce| (ce.loss, ce.lse))
    });
}

#[test]
fn attention_and_gate() {
    let q = tensor(&[2, 150, 4, 24], 8);
    let k = tensor(&[2, 150, 4, 24], 9);
    let v = tensor(&[2, 150, 4, 16], 10);
    same_on_1_and_3_threads(|| attention_forward(&q, &k, &v, 0.2).map(|(o, s)| (o, s.lse)));
    let logits = tensor(&[333, 16], 11);
    let cfg = GateConfig {
        n_routed_experts: 16,
        top_k: 4,
        n_group: 4,
        topk_group: 2,
        routed_scaling_factor: 2.5,
        norm_topk_prob: true,
    };
    let bias = vec![0.0f32; 16];
    same_on_1_and_3_threads(|| gate_forward(&logits, &bias, &cfg).map(|g| (g.indices, g.weights)));
}
