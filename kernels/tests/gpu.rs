//! GPU conformance: every CUDA kernel against the CPU reference of this crate. Needs a CUDA GPU and
//! fails without one (it is run by `scripts/gpu-check.sh` on a GPU machine, not by the CPU-only
//! test command). Exactness is stated per test: bit-exact for FP8 casts, quantization, transposes,
//! AdamW and the transports; a tolerance for GEMMs and reductions.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

mod common;

use common::{
    bf16_bits, close, combine_routing, gemm_error, randn, random_bf16_rows, random_routing,
    random_rows,
};
use half::bf16;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use shoal_kernels::cuda::Gpu;
use shoal_kernels::cuda::dispatch::{Rows, TransferConfig, cpu_combine_reduce, cpu_transfer};
use shoal_kernels::cuda::launch::{GemmKernel, GpuFp8, GroupedWeights};
use shoal_kernels::ops::adamw::{AdamCoeffs, AdamWConfig, AdamWState, Moments, adamw_step};
use shoal_kernels::{
    Accumulation, Fp8Format, Fp8Matrix, KernelError, QuantConfig, Tensor, fp8_gemm,
};

fn gpu() -> Gpu {
    Gpu::open(0).unwrap_or_else(|e| panic!("these tests need a CUDA GPU: {e}"))
}

const SHAPES: [(usize, usize); 5] = [(1, 128), (3, 200), (130, 257), (256, 1024), (77, 7168)];

#[test]
fn tile_quantization_is_bit_exact_in_both_formats_and_with_pow2_scales() {
    let g = gpu();
    let mut rng = StdRng::seed_from_u64(1);
    for &(r, c) in &SHAPES {
        let x = randn(&mut rng, r * c, 3.0);
        let dx = g.upload("x", &x).unwrap();
        for format in [Fp8Format::E4M3, Fp8Format::E5M2] {
            for pow2_scales in [false, true] {
                let cfg = QuantConfig {
                    format,
                    pow2_scales,
                };
                let cpu = Fp8Matrix::quantize_tiles(&x, r, c, cfg).unwrap();
                let got = g
                    .quantize_tiles(&dx, r, c, cfg)
                    .unwrap()
                    .to_host(&g)
                    .unwrap();
                assert_eq!(got, cpu, "tiles {r}x{c} {cfg:?}");
                let cpu_t = Fp8Matrix::quantize_tiles_transposed(&x, r, c, cfg).unwrap();
                let got_t = g
                    .quantize_tiles_transposed(&dx, r, c, cfg)
                    .unwrap()
                    .to_host(&g)
                    .unwrap();
                assert_eq!(got_t, cpu_t, "transposed tiles {r}x{c} {cfg:?}");
                let cpu_b = Fp8Matrix::quantize_blocks(&x, r, c, cfg).unwrap();
                let got_b = g
                    .quantize_blocks(&dx, r, c, cfg)
                    .unwrap()
                    .to_host(&g)
                    .unwrap();
                assert_eq!(got_b, cpu_b, "blocks {r}x{c} {cfg:?}");
            }
        }
    }
}

#[test]
fn the_hardware_fp8_conversion_equals_the_software_encoder_on_every_float_class() {
    let hw = gpu();
    let sw = Gpu::open_with(0, &["SHOAL_SOFT_FP8"]).unwrap();
    // Subnormals, ties, values past the maximum (saturation), zeros of both signs.
    let mut x: Vec<f32> = (0..4096)
        .map(|i| f32::from_bits(0x3000_0000 + i * 0x0007_ffff))
        .collect();
    x.extend((0..4096).map(|i| -f32::from_bits(0x3800_0000 + i * 0x0003_ffff)));
    x.extend([
        0.0,
        -0.0,
        448.0,
        464.0,
        1e30,
        -1e30,
        2f32.powi(-10),
        2f32.powi(-9) * 1.5,
    ]);
    x.resize(x.len().next_multiple_of(128), 1.0);
    let n = x.len() / 128;
    let dx = hw.upload("x", &x).unwrap();
    let dx2 = sw.upload("x", &x).unwrap();
    for format in [Fp8Format::E4M3, Fp8Format::E5M2] {
        let cfg = QuantConfig {
            format,
            pow2_scales: false,
        };
        let a = hw
            .quantize_tiles(&dx, n, 128, cfg)
            .unwrap()
            .to_host(&hw)
            .unwrap();
        let b = sw
            .quantize_tiles(&dx2, n, 128, cfg)
            .unwrap()
            .to_host(&sw)
            .unwrap();
        assert_eq!(a, b, "{format:?}");
        assert_eq!(a, Fp8Matrix::quantize_tiles(&x, n, 128, cfg).unwrap());
    }
}

#[test]
fn dequantization_and_the_block_transpose_equal_the_cpu() {
    let g = gpu();
    let mut rng = StdRng::seed_from_u64(2);
    let (r, c) = (300, 520);
    let x = randn(&mut rng, r * c, 1.0);
    let cfg = QuantConfig::default();
    let w = Fp8Matrix::quantize_blocks(&x, r, c, cfg).unwrap();
    let dw = GpuFp8::from_host(&g, &w).unwrap();
    let deq = g.dequantize(&dw).unwrap();
    assert_eq!(
        g.download("deq", &deq, r * c).unwrap(),
        w.dequantize().data().to_vec()
    );
    let t = g.transpose_blocks(&dw).unwrap().to_host(&g).unwrap();
    assert_eq!(t, w.transpose().unwrap());
}

/// The GEMM's tolerance relative to |A| . |B|: FP8 tensor cores accumulate with about 13-14
/// mantissa bits inside each 128-deep block (what the promotion to FP32 bounds): Ada's mma.sync
/// and Hopper's WGMMA. On Hopper mma.sync is lowered to FP16 tensor-core math with FP32
/// accumulation, and without FP8 tensor cores the products are summed in FP32.
fn gemm_tolerance(g: &Gpu, kernel: GemmKernel) -> f64 {
    if kernel == GemmKernel::Wgmma || g.info().compute_capability == (8, 9) {
        2e-3
    } else {
        1e-6
    }
}

/// The kernels this GPU runs: mma.sync everywhere, WGMMA on Hopper.
fn gemm_kernels(g: &Gpu) -> Vec<GemmKernel> {
    let mut v = vec![GemmKernel::MmaSync];
    if GemmKernel::for_device(g.info().compute_capability) == GemmKernel::Wgmma {
        v.push(GemmKernel::Wgmma);
    }
    v
}

#[test]
fn the_fp8_gemm_matches_the_exact_cpu_accumulation_within_the_accumulators_precision() {
    let g = gpu();
    let mut rng = StdRng::seed_from_u64(3);
    for &(m, n, k) in &[
        (1, 8, 128),
        (130, 200, 256),
        (256, 384, 1024),
        (64, 128, 7168),
        (200, 96, 48),
        (300, 520, 784),
    ] {
        let a =
            Fp8Matrix::quantize_tiles(&randn(&mut rng, m * k, 2.0), m, k, QuantConfig::default())
                .unwrap();
        for block_b in [true, false] {
            let xb = randn(&mut rng, n * k, 0.5);
            let b = if block_b {
                Fp8Matrix::quantize_blocks(&xb, n, k, QuantConfig::default()).unwrap()
            } else {
                Fp8Matrix::quantize_tiles(&xb, n, k, QuantConfig::default()).unwrap()
            };
            let want = fp8_gemm(&a, &b, Accumulation::Fp32).unwrap();
            let (ga, gb) = (
                GpuFp8::from_host(&g, &a).unwrap(),
                GpuFp8::from_host(&g, &b).unwrap(),
            );
            for kernel in gemm_kernels(&g) {
                let c = g
                    .fp8_gemm_grouped_with(&ga, &[m], &GroupedWeights::single(&gb), kernel)
                    .unwrap();
                let got = g.download("c", &c, m * n).unwrap();
                let err = gemm_error(&got, want.data(), &a, &b);
                assert!(
                    err < gemm_tolerance(&g, kernel),
                    "{kernel:?} {m}x{n}x{k} block_b={block_b}: relative error {err:e}"
                );
            }
        }
    }
    if !gemm_kernels(&g).contains(&GemmKernel::Wgmma) {
        let a = Fp8Matrix::quantize_tiles(&vec![1.0; 128], 1, 128, QuantConfig::default()).unwrap();
        let ga = GpuFp8::from_host(&g, &a).unwrap();
        let e = g
            .fp8_gemm_grouped_with(&ga, &[1], &GroupedWeights::single(&ga), GemmKernel::Wgmma)
            .unwrap_err();
        assert!(e.to_string().contains("9.0"), "{e}");
    }
}

/// cuBLASLt's block-scaled FP8 GEMM (the peer `gpu_bench` measures Shoal's kernel against) reads
/// the same quantized operands through its own scale layouts: on Hopper it must agree with the
/// exact CPU accumulation within its BF16 output's rounding and its accumulator's precision (a
/// misplaced scale would be off by whole factors); elsewhere it is a typed error.
#[test]
fn cublaslt_block_scaled_fp8_agrees_with_the_cpu_on_hopper_and_is_refused_elsewhere() {
    let g = gpu();
    let mut rng = StdRng::seed_from_u64(31);
    for &(m, n, k) in &[
        (64, 128, 256),
        (130, 200, 640),
        (256, 384, 1024),
        (8, 136, 7168),
    ] {
        let a =
            Fp8Matrix::quantize_tiles(&randn(&mut rng, m * k, 2.0), m, k, QuantConfig::default())
                .unwrap();
        let b =
            Fp8Matrix::quantize_blocks(&randn(&mut rng, n * k, 0.5), n, k, QuantConfig::default())
                .unwrap();
        let r = g.fp8_gemm_cublaslt(
            &GpuFp8::from_host(&g, &a).unwrap(),
            &GpuFp8::from_host(&g, &b).unwrap(),
        );
        if g.info().compute_capability != (9, 0) {
            let e = r.unwrap_err();
            assert!(
                matches!(
                    e,
                    KernelError::InvalidArgument {
                        name: "fp8_gemm_cublaslt",
                        ..
                    }
                ),
                "{e}"
            );
            return;
        }
        let got: Vec<f32> = g
            .download("d", &r.unwrap(), m * n)
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect();
        let want = fp8_gemm(&a, &b, Accumulation::Fp32).unwrap();
        let err = gemm_error(&got, want.data(), &a, &b);
        assert!(err < 4e-3, "{m}x{n}x{k}: relative error {err:e}");
    }
    let a = Fp8Matrix::quantize_tiles(&vec![1.0; 4 * 200], 4, 200, QuantConfig::default()).unwrap();
    let b =
        Fp8Matrix::quantize_blocks(&vec![1.0; 8 * 200], 8, 200, QuantConfig::default()).unwrap();
    let e = g
        .fp8_gemm_cublaslt(
            &GpuFp8::from_host(&g, &a).unwrap(),
            &GpuFp8::from_host(&g, &b).unwrap(),
        )
        .unwrap_err();
    assert!(e.to_string().contains("multiple of 128"), "{e}");
}

#[test]
fn the_grouped_gemm_equals_one_gemm_per_expert_segment() {
    let g = gpu();
    let mut rng = StdRng::seed_from_u64(4);
    let (n, k) = (256, 512);
    let segments = [0usize, 37, 129, 1, 256];
    let m: usize = segments.iter().sum();
    let a = Fp8Matrix::quantize_tiles(&randn(&mut rng, m * k, 1.0), m, k, QuantConfig::default())
        .unwrap();
    let ws: Vec<Fp8Matrix> = segments
        .iter()
        .map(|_| {
            Fp8Matrix::quantize_blocks(&randn(&mut rng, n * k, 0.2), n, k, QuantConfig::default())
                .unwrap()
        })
        .collect();
    let codes: Vec<u8> = ws.iter().flat_map(|w| w.codes().to_vec()).collect();
    let scales: Vec<f32> = ws.iter().flat_map(|w| w.scales().to_vec()).collect();
    let (dc, ds) = (
        g.upload("w", &codes).unwrap(),
        g.upload("s", &scales).unwrap(),
    );
    let gw = GroupedWeights {
        groups: ws.len(),
        n,
        k,
        format: Fp8Format::E4M3,
        granularity: ws[0].granularity(),
        codes: &dc,
        scales: &ds,
    };
    let ga = GpuFp8::from_host(&g, &a).unwrap();
    for kernel in gemm_kernels(&g) {
        let c = g
            .fp8_gemm_grouped_with(&ga, &segments, &gw, kernel)
            .unwrap();
        let got = g.download("c", &c, m * n).unwrap();
        let mut row = 0;
        for (s, &len) in segments.iter().enumerate() {
            if len == 0 {
                continue;
            }
            let part = Fp8Matrix::from_parts(
                len,
                k,
                Fp8Format::E4M3,
                a.granularity(),
                a.codes()[row * k..(row + len) * k].to_vec(),
                a.scales()[row * (k / 128)..(row + len) * (k / 128)].to_vec(),
            )
            .unwrap();
            let want = fp8_gemm(&part, &ws[s], Accumulation::Fp32).unwrap();
            let err = gemm_error(&got[row * n..(row + len) * n], want.data(), &part, &ws[s]);
            assert!(
                err < gemm_tolerance(&g, kernel),
                "{kernel:?} segment {s}: relative error {err:e}"
            );
            row += len;
        }
    }
}

#[test]
fn bad_gemm_shapes_are_typed_errors_not_faults() {
    let g = gpu();
    let a = Fp8Matrix::quantize_tiles(&vec![1.0; 4 * 40], 4, 40, QuantConfig::default()).unwrap();
    let b = Fp8Matrix::quantize_blocks(&vec![1.0; 8 * 40], 8, 40, QuantConfig::default()).unwrap();
    let e = g
        .fp8_gemm(
            &GpuFp8::from_host(&g, &a).unwrap(),
            &GpuFp8::from_host(&g, &b).unwrap(),
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            KernelError::InvalidArgument {
                name: "fp8_gemm.a",
                ..
            }
        ),
        "{e}"
    );
    // Twice the device's memory: a typed out-of-memory error naming the operation.
    let twice = usize::try_from(g.info().memory_bytes / 2).unwrap();
    let e = g.zeros::<f32>("huge", twice).unwrap_err();
    assert!(
        matches!(&e, KernelError::Cuda { kernel: "huge", reason, .. } if reason.contains("OUT_OF_MEMORY")),
        "{e}"
    );
}

#[test]
fn adamw_with_bf16_and_fp32_moments_is_bit_exact() {
    let g = gpu();
    let mut rng = StdRng::seed_from_u64(5);
    let n = 100_003;
    for bf16_moments in [true, false] {
        let cfg = AdamWConfig {
            bf16_moments,
            ..AdamWConfig::default()
        };
        let mut p = randn(&mut rng, n, 1.0);
        let mut state = AdamWState::new(n, &cfg);
        let mut dp = g.upload("p", &p).unwrap();
        let (mut m16, mut v16) = (
            g.zeros::<u16>("m", n).unwrap(),
            g.zeros::<u16>("v", n).unwrap(),
        );
        let (mut m32, mut v32) = (
            g.zeros::<f32>("m", n).unwrap(),
            g.zeros::<f32>("v", n).unwrap(),
        );
        for t in 1..=3u64 {
            let grads = randn(&mut rng, n, 0.1);
            adamw_step(&mut p, &grads, &mut state, &cfg, 1e-3).unwrap();
            let dg = g.upload("g", &grads).unwrap();
            let k = AdamCoeffs::new(&cfg, 1e-3, t, 1.0);
            if bf16_moments {
                g.adamw_bf16(&mut dp, &dg, &mut m16, &mut v16, n, k)
                    .unwrap();
            } else {
                g.adamw_f32(&mut dp, &dg, &mut m32, &mut v32, n, k).unwrap();
            }
        }
        assert_eq!(
            g.download("p", &dp, n).unwrap(),
            p,
            "bf16_moments={bf16_moments}"
        );
        if let Moments::Bf16 { m, .. } = &state.moments {
            let got: Vec<bf16> = g
                .download("m", &m16, n)
                .unwrap()
                .into_iter()
                .map(bf16::from_bits)
                .collect();
            assert_eq!(&got, m);
        }
    }
}

#[test]
fn norms_activations_rope_and_cross_entropy_match_the_cpu() {
    use shoal_kernels::ops::{cross_entropy, rmsnorm, rope, swiglu};
    let g = gpu();
    let mut rng = StdRng::seed_from_u64(6);
    let (rows, d) = (37, 320);
    let x = randn(&mut rng, rows * d, 1.0);
    let w = randn(&mut rng, d, 1.0);
    let dy = randn(&mut rng, rows * d, 1.0);
    let tx = Tensor::new(vec![rows, d], x.clone()).unwrap();
    let tw = Tensor::new(vec![d], w.clone()).unwrap();
    let tdy = Tensor::new(vec![rows, d], dy.clone()).unwrap();
    let (gx, gw, gdy) = (
        g.upload("x", &x).unwrap(),
        g.upload("w", &w).unwrap(),
        g.upload("dy", &dy).unwrap(),
    );
    let y = g.rmsnorm_forward(&gx, &gw, rows, d, 1e-6).unwrap();
    close(
        &g.download("y", &y, rows * d).unwrap(),
        rmsnorm::rmsnorm_forward(&tx, &tw, 1e-6).unwrap().data(),
        1e-6,
        "rmsnorm",
    );
    let dx = g
        .rmsnorm_backward_input(&gx, &gw, &gdy, rows, d, 1e-6)
        .unwrap();
    close(
        &g.download("dx", &dx, rows * d).unwrap(),
        rmsnorm::rmsnorm_backward_input(&tdy, &tx, &tw, 1e-6)
            .unwrap()
            .data(),
        1e-5,
        "rmsnorm dx",
    );

    let s = g.swiglu_forward(&gx, &gdy, rows * d).unwrap();
    close(
        &g.download("s", &s, rows * d).unwrap(),
        swiglu::swiglu_forward(&tx, &tdy).unwrap().data(),
        1e-6,
        "swiglu",
    );

    let (b, seq, h, hd) = (2, 5, 3, 64);
    let table = rope::RopeTable::new(hd, 16, 10_000.0).unwrap();
    let q = randn(&mut rng, b * seq * h * hd, 1.0);
    let tq = Tensor::new(vec![b, seq, h, hd], q.clone()).unwrap();
    let cos: Vec<f32> = table.cos().iter().map(|&c| c as f32).collect();
    let sin: Vec<f32> = table.sin().iter().map(|&c| c as f32).collect();
    let (gq, gc, gs) = (
        g.upload("q", &q).unwrap(),
        g.upload("cos", &cos).unwrap(),
        g.upload("sin", &sin).unwrap(),
    );
    for layout in [rope::RopeLayout::Interleaved, rope::RopeLayout::HalfSplit] {
        let want = rope::rope_forward(&tq, &table, layout, 3).unwrap();
        let got = g
            .rope(
                &gq,
                &gc,
                &gs,
                [b, seq, h, hd],
                16,
                3,
                1.0,
                layout == rope::RopeLayout::Interleaved,
            )
            .unwrap();
        close(
            &g.download("rope", &got, q.len()).unwrap(),
            want.data(),
            1e-6,
            "rope",
        );
    }

    let (n, vocab) = (9, 1000);
    let logits = randn(&mut rng, n * vocab, 4.0);
    let targets: Vec<u32> = (0..n).map(|i| (i * 97 % vocab) as u32).collect();
    let want = cross_entropy::cross_entropy_forward(
        &Tensor::new(vec![n, vocab], logits.clone()).unwrap(),
        &targets,
        Some(97),
    )
    .unwrap();
    let (gl, gt) = (
        g.upload("logits", &logits).unwrap(),
        g.upload("targets", &targets).unwrap(),
    );
    let (_lse, loss) = g.cross_entropy_rows(&gl, &gt, n, vocab, Some(97)).unwrap();
    let mean = loss.iter().sum::<f64>() / want.count as f64;
    assert!(
        (mean - want.loss).abs() < 1e-9 * want.loss.abs().max(1.0),
        "gpu {mean} cpu {}",
        want.loss
    );
}

#[test]
fn dispatch_and_combine_over_the_two_hop_kernel_equal_the_cpu_transport() {
    let g = gpu();
    let mut rng = StdRng::seed_from_u64(7);
    // 8 ranks on this one GPU, as 2 nodes of 4: both hops, fan-out at the proxy, self-sends.
    let (ranks, local, rows, maxd, hidden) = (8, 4, 300, 4, 512);
    let r = random_routing(&mut rng, ranks, local, rows, maxd, 0.4);
    let layout = r.layout().unwrap();
    let (len0, len1) = (hidden, hidden / 128 * 4);
    let inputs = random_rows(&mut rng, ranks, rows, (len0, len1));
    let want = cpu_transfer(&r, &layout, &inputs, len0, len1).unwrap();
    for cfg in [
        TransferConfig {
            sms: 4,
            slots: 2,
            receivers: 1,
            ..Default::default()
        },
        TransferConfig {
            sms: 12,
            ..Default::default()
        },
    ] {
        let got = g
            .two_hop(&r, &layout, &inputs, (len0, len1), false, cfg)
            .unwrap()
            .received;
        assert_eq!(got, want, "dispatch with {cfg:?}");
    }

    // Combine: every received row goes back to its source, into the staging slot of its entry.
    let (back, back_layout) = combine_routing(&r, &want);
    let bf16_rows = random_bf16_rows(&mut rng, &want, hidden);
    let staged_want = cpu_transfer(&back, &back_layout, &bf16_rows, hidden * 2, 0).unwrap();
    let staged = g
        .two_hop(
            &back,
            &back_layout,
            &bf16_rows,
            (hidden * 2, 0),
            true,
            TransferConfig::default(),
        )
        .unwrap()
        .received;
    for s in 0..ranks {
        assert_eq!(
            staged[s].rows, staged_want[s].rows,
            "combine staging at rank {s}"
        );
        let vals: Vec<u16> = bf16_bits(&staged[s].rows.part0);
        let out = g
            .combine_reduce(&vals, &r.dest[s], rows, maxd, hidden)
            .unwrap();
        assert_eq!(
            out,
            cpu_combine_reduce(&vals, &r.dest[s], rows, maxd, hidden),
            "combine sum at rank {s}"
        );
    }
}

#[test]
fn a_transfer_that_cannot_be_resident_at_once_is_refused_by_name() {
    let g = gpu();
    let mut rng = StdRng::seed_from_u64(8);
    let r = random_routing(&mut rng, 8, 4, 4, 2, 0.4);
    let layout = r.layout().unwrap();
    let inputs = vec![
        Rows {
            part0: vec![0; 4 * 16],
            part1: vec![]
        };
        8
    ];
    let cfg = TransferConfig {
        sms: 10_000,
        ..Default::default()
    };
    let e = g
        .two_hop(&r, &layout, &inputs, (16, 0), false, cfg)
        .unwrap_err();
    assert!(
        matches!(
            e,
            KernelError::InvalidArgument {
                name: "dispatch.sms",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn zero1_collectives_through_nccl_on_every_local_gpu() {
    use shoal_kernels::cuda::nccl::Collectives;
    let n = shoal_kernels::cuda::probe().unwrap().len();
    let gpus: Vec<Gpu> = (0..n).map(|i| Gpu::open(i).unwrap()).collect();
    let refs: Vec<&Gpu> = gpus.iter().collect();
    let c = Collectives::single_process(&refs).unwrap();
    let shard = 1000;
    let send: Vec<_> = gpus
        .iter()
        .enumerate()
        .map(|(i, g)| g.upload("grad", &vec![(i + 1) as f32; shard * n]).unwrap())
        .collect();
    let mut recv: Vec<_> = gpus
        .iter()
        .map(|g| g.zeros::<f32>("shard", shard).unwrap())
        .collect();
    c.reduce_scatter_sum(&send, &mut recv).unwrap();
    let total = (n * (n + 1) / 2) as f32;
    for (g, r) in gpus.iter().zip(&recv) {
        assert_eq!(g.download("shard", r, shard).unwrap(), vec![total; shard]);
    }
    let mut full: Vec<_> = gpus
        .iter()
        .map(|g| g.zeros::<f32>("params", shard * n).unwrap())
        .collect();
    c.all_gather(&recv, &mut full).unwrap();
    for (g, f) in gpus.iter().zip(&full) {
        assert_eq!(
            g.download("params", f, shard * n).unwrap(),
            vec![total; shard * n]
        );
    }
}

/// The GPU backend, operation by operation, against the CPU reference backend on the same inputs
/// (what the device step is built from: a wrong transposition, stride or offset shows here
/// before it shows in a loss).
#[test]
fn the_gpu_backend_matches_the_host_backend_op_by_op() {
    use shoal_kernels::backend::{AttnDims, Backend, ColCopy, Gemm, Host};
    use shoal_kernels::ops::rope::{RopeLayout, RopeTable};
    let g = gpu();
    let h = Host;
    let mut rng = StdRng::seed_from_u64(41);
    let up = |x: &[f32]| g.upload("x", x).unwrap();
    let down = |x: &cudarc::driver::CudaSlice<f32>| Backend::download(&g, "x", x).unwrap();
    let check = |got: &[f32], want: &[f32], tol: f32, what: &str| {
        close(&got[..want.len()], want, tol, what);
    };
    // GEMMs in the three forms a linear layer uses, and accumulation.
    let (m, n, k) = (37, 45, 70);
    for gm in [
        Gemm::forward(m, n, k),
        Gemm::input_grad(m, k, n),
        Gemm::weight_grad(k, m, n),
    ] {
        let a = randn(&mut rng, gm.m * gm.k, 1.0);
        let b = randn(&mut rng, gm.k * gm.n, 1.0);
        let c0 = randn(&mut rng, gm.m * gm.n, 1.0);
        let want = h.gemm(&a, &b, gm).unwrap();
        check(
            &down(&g.gemm(&up(&a), &up(&b), gm).unwrap()),
            &want,
            1e-4,
            &format!("{gm:?}"),
        );
        let mut wc = c0.clone();
        h.gemm_acc(&a, &b, &mut wc, gm).unwrap();
        let mut gc = up(&c0);
        g.gemm_acc(&up(&a), &up(&b), &mut gc, gm).unwrap();
        check(&down(&gc), &wc, 1e-4, "gemm_acc");
    }
    // Norms, activations, RoPE.
    let (rows, d) = (19, 96);
    let x = randn(&mut rng, rows * d, 1.0);
    let w = randn(&mut rng, d, 1.0);
    let dy = randn(&mut rng, rows * d, 1.0);
    check(
        &down(&g.rmsnorm(&up(&x), &up(&w), rows, d, 1e-6).unwrap()),
        &h.rmsnorm(&x, &w, rows, d, 1e-6).unwrap(),
        1e-5,
        "rmsnorm",
    );
    let mut hdw = vec![0.5f32; d];
    let hdx = h
        .rmsnorm_backward(&dy, &x, &w, rows, d, 1e-6, &mut hdw)
        .unwrap();
    let mut gdw = up(&vec![0.5f32; d]);
    let gdx = g
        .rmsnorm_backward(&up(&dy), &up(&x), &up(&w), rows, d, 1e-6, &mut gdw)
        .unwrap();
    check(&down(&gdx), &hdx, 1e-4, "rmsnorm dx");
    check(&down(&gdw), &hdw, 1e-4, "rmsnorm dw");
    check(
        &down(&g.swiglu(&up(&x), &up(&dy)).unwrap()),
        &h.swiglu(&x, &dy).unwrap(),
        1e-5,
        "swiglu",
    );
    let (hg, hu) = h.swiglu_backward(&x, &dy, &w.repeat(rows)).unwrap();
    let (gg, gu) = Backend::swiglu_backward(&g, &up(&x), &up(&dy), &up(&w.repeat(rows))).unwrap();
    check(&down(&gg), &hg, 1e-5, "swiglu dg");
    check(&down(&gu), &hu, 1e-5, "swiglu du");
    let table = RopeTable::new(16, 64, 10_000.0).unwrap();
    for layout in [RopeLayout::Interleaved, RopeLayout::HalfSplit] {
        let (ht, gt) = (
            h.rope_table(&table, layout).unwrap(),
            g.rope_table(&table, layout).unwrap(),
        );
        let xr = randn(&mut rng, 2 * 9 * 3 * 16, 1.0);
        for inverse in [false, true] {
            let want = h.rope(&xr, &ht, [2, 9, 3, 16], inverse).unwrap();
            check(
                &down(&Backend::rope(&g, &up(&xr), &gt, [2, 9, 3, 16], inverse).unwrap()),
                &want,
                1e-5,
                "rope",
            );
        }
    }
    // Attention.
    let ad = AttnDims {
        batch: 2,
        seq: 23,
        heads: 3,
        dk: 48,
        dv: 32,
        scale: 0.15,
    };
    let nq = ad.batch * ad.seq * ad.heads;
    let (q, kk, v, dout) = (
        randn(&mut rng, nq * ad.dk, 0.5),
        randn(&mut rng, nq * ad.dk, 0.5),
        randn(&mut rng, nq * ad.dv, 1.0),
        randn(&mut rng, nq * ad.dv, 1.0),
    );
    let (ho, hl) = h.attention(&q, &kk, &v, ad).unwrap();
    let (go, gl) = g.attention(&up(&q), &up(&kk), &up(&v), ad).unwrap();
    check(&down(&go), &ho, 1e-4, "attention out");
    check(&down(&gl), &hl, 1e-4, "attention lse");
    let (hq, hk, hv) = h
        .attention_backward(&dout, &q, &kk, &v, &ho, &hl, ad)
        .unwrap();
    let (gq, gk, gv) = g
        .attention_backward(&up(&dout), &up(&q), &up(&kk), &up(&v), &go, &gl, ad)
        .unwrap();
    check(&down(&gq), &hq, 1e-3, "attention dq");
    check(&down(&gk), &hk, 1e-3, "attention dk");
    check(&down(&gv), &hv, 1e-3, "attention dv");
    // Embeddings and cross-entropy.
    let (vocab, nt) = (50usize, 33usize);
    let tab = randn(&mut rng, vocab * d, 1.0);
    let ids: Vec<u32> = (0..nt).map(|_| rng.random_range(0..vocab as u32)).collect();
    let gids = g.upload_ids("ids", &ids).unwrap();
    check(
        &down(&g.embedding(&up(&tab), &gids, nt, d).unwrap()),
        &h.embedding(&tab, &ids, nt, d).unwrap(),
        0.0,
        "embedding",
    );
    let dye = randn(&mut rng, nt * d, 1.0);
    let mut hdt = vec![0f32; vocab * d];
    h.embedding_backward(&dye, &ids, d, &mut hdt).unwrap();
    let mut gdt = up(&vec![0f32; vocab * d]);
    g.embedding_backward(&up(&dye), &ids, d, &mut gdt).unwrap();
    check(&down(&gdt), &hdt, 1e-6, "embedding backward");
    let logits = randn(&mut rng, nt * vocab, 2.0);
    let (hl, hc, hce) = h.cross_entropy(&logits, &ids, nt, vocab).unwrap();
    let (gl2, gc, gce) = g.cross_entropy(&up(&logits), &gids, nt, vocab).unwrap();
    assert_eq!(hc, gc);
    assert!(
        (hl - gl2).abs() < 1e-5 * hl.abs().max(1.0),
        "cross-entropy {gl2} vs {hl}"
    );
    let hd = h
        .cross_entropy_backward(&logits, &ids, &hce, nt, vocab, 0.7)
        .unwrap();
    let gd =
        Backend::cross_entropy_backward(&g, &up(&logits), &gids, &gce, nt, vocab, 0.7).unwrap();
    check(&down(&gd), &hd, 1e-5, "cross-entropy backward");
    // Copies, gathers, scatters, dots, sums, AdamW.
    let cc = ColCopy {
        rows: 5,
        groups: 3,
        width: 4,
        src_ld: 30,
        src_off: 2,
        src_gs: 9,
        dst_ld: 20,
        dst_off: 1,
        dst_gs: 6,
        accumulate: true,
    };
    let (src, dst) = (randn(&mut rng, 150, 1.0), randn(&mut rng, 100, 1.0));
    let mut hdst = dst.clone();
    h.copy_cols(&src, &mut hdst, cc).unwrap();
    let mut gdst = up(&dst);
    g.copy_cols(&up(&src), &mut gdst, cc).unwrap();
    check(&down(&gdst), &hdst, 0.0, "copy_cols");
    let rowsrc = randn(&mut rng, 12 * d, 1.0);
    let idx: Vec<u32> = vec![3, 11, 0, 7];
    let sc = vec![0.5f32, -1.0, 2.0, 0.25];
    let (gidx, gsc) = (g.upload_ids("idx", &idx).unwrap(), up(&sc));
    let hgat = h.gather_rows(&rowsrc, &idx, 4, d, Some(&sc)).unwrap();
    let ggat = g
        .gather_rows(&up(&rowsrc), &gidx, 4, d, Some(&gsc))
        .unwrap();
    check(&down(&ggat), &hgat, 0.0, "gather_rows");
    let mut hs = rowsrc.clone();
    h.scatter_add_rows(&hgat, &idx, 4, d, None, &mut hs)
        .unwrap();
    let mut gs = up(&rowsrc);
    g.scatter_add_rows(&ggat, &gidx, 4, d, None, &mut gs)
        .unwrap();
    check(&down(&gs), &hs, 0.0, "scatter_add_rows");
    let hdots = h.row_dots(&rowsrc, &idx, &hgat, 4, d).unwrap();
    check(
        &g.row_dots(&up(&rowsrc), &gidx, &ggat, 4, d).unwrap(),
        &hdots,
        1e-5,
        "row_dots",
    );
    let (gx, gy) = (up(&rowsrc), up(&hgat));
    let ss = (
        h.sum_sq(&[&rowsrc, &hgat]).unwrap(),
        g.sum_sq(&[&gx, &gy]).unwrap(),
    );
    assert!((ss.0 - ss.1).abs() < 1e-9 * ss.0, "sum_sq {ss:?}");
    let coeffs = AdamCoeffs::new(
        &AdamWConfig {
            bf16_moments: false,
            ..AdamWConfig::default()
        },
        1e-3,
        3,
        0.5,
    );
    let (p0, gr, m0, v0) = (
        randn(&mut rng, 300, 1.0),
        randn(&mut rng, 300, 1.0),
        randn(&mut rng, 300, 0.1),
        randn(&mut rng, 300, 0.1)
            .iter()
            .map(|x| x.abs())
            .collect::<Vec<_>>(),
    );
    for bf16_moments in [false, true] {
        // BF16 moments start as BF16 values and stay in BF16 memory on the GPU.
        let start = Moments::from_f32(m0.clone(), v0.clone(), bf16_moments);
        let (mut hp, mut hs) = (p0.clone(), start.clone());
        h.adamw(&mut hp, &gr, &mut hs, &coeffs).unwrap();
        let (mut gp, mut gs) = (up(&p0), g.upload_moments(&start).unwrap());
        Backend::adamw(&g, &mut gp, &up(&gr), &mut gs, &coeffs).unwrap();
        check(&down(&gp), &hp, 0.0, "adamw params");
        let back = g.download_moments(&gs).unwrap();
        assert_eq!(
            back.is_bf16(),
            bf16_moments,
            "the moments keep their precision"
        );
        check(&back.first_f32(), &hs.first_f32(), 0.0, "adamw m");
        check(&back.second_f32(), &hs.second_f32(), 0.0, "adamw v");
    }
}

/// The mixed-precision linear layers (BF16 through cuBLAS, FP8 through the quantization kernels
/// and the FP8 GEMM) against the host backend, which runs the CPU recipe: forward, input
/// gradient and accumulated weight gradient, with a token count that is not a multiple of the
/// GEMM's 16 (the weight gradient pads it) over two 128-token tiles, and widths of several
/// 128-wide blocks with a partial one. Outputs must be BF16 values. BF16: the operands are the
/// same BF16 values, only the FP32 summation order differs, so each output is within one BF16
/// unit. FP8: the tensor cores accumulate each 128-deep block with fewer bits than the CPU's FP32
/// sums, so the error is measured against the largest output.
#[test]
fn the_gpu_mixed_precision_linears_match_the_host_backend() {
    use shoal_kernels::backend::{Backend, Host};
    use shoal_kernels::ops::linear::Precision;
    let g = gpu();
    let h = Host;
    let mut rng = StdRng::seed_from_u64(43);
    let up = |x: &[f32]| g.upload("x", x).unwrap();
    let down = |x: &cudarc::driver::CudaSlice<f32>| Backend::download(&g, "x", x).unwrap();
    let near = |got: &[f32], want: &[f32], tol: f32, what: &str| {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = got[..want.len()]
            .iter()
            .zip(want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst <= tol * scale,
            "{what}: worst error {worst:e} against a largest value of {scale:e}"
        );
    };
    let bf16_values = |got: &[f32], what: &str| {
        for (i, v) in got.iter().enumerate() {
            assert_eq!(
                v.to_bits() & 0xFFFF,
                0,
                "{what}[{i}] = {v:e} is not a bf16 value"
            );
        }
    };
    let within_a_bf16_unit = |got: &[f32], want: &[f32], what: &str| {
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            let unit = f32::from_bits(a.abs().max(b.abs()).to_bits() & 0x7F80_0000) / 128.0;
            assert!((a - b).abs() <= unit, "{what}[{i}]: gpu {a:e} cpu {b:e}");
        }
    };
    let (rows, out_f, in_f) = (200, 144, 272);
    let w = randn(&mut rng, out_f * in_f, 0.1);
    let x = randn(&mut rng, rows * in_f, 1.0);
    let dy = randn(&mut rng, rows * out_f, 1.0);
    let dw0 = randn(&mut rng, out_f * in_f, 1.0);
    for p in [Precision::Bf16, Precision::Fp8] {
        let hw = h.weight_operand(&w, out_f, in_f, p).unwrap();
        let gw = g.weight_operand(&up(&w), out_f, in_f, p).unwrap();
        let y = down(&g.linear_mp(&up(&x), &gw, rows).unwrap());
        let want_y = h.linear_mp(&x, &hw, rows).unwrap();
        let dx = down(&g.linear_mp_input_grad(&up(&dy), &gw, rows).unwrap());
        let want_dx = h.linear_mp_input_grad(&dy, &hw, rows).unwrap();
        bf16_values(&y[..want_y.len()], &format!("{p:?} forward"));
        bf16_values(&dx[..want_dx.len()], &format!("{p:?} input gradient"));
        let mut hdw = dw0.clone();
        h.linear_mp_weight_grad_acc(&dy, &x, &hw, rows, &mut hdw)
            .unwrap();
        let mut gdw = up(&dw0);
        g.linear_mp_weight_grad_acc(&up(&dy), &up(&x), &gw, rows, &mut gdw)
            .unwrap();
        let gdw = down(&gdw);
        if p == Precision::Bf16 {
            within_a_bf16_unit(&y, &want_y, "Bf16 forward");
            within_a_bf16_unit(&dx, &want_dx, "Bf16 input gradient");
            near(&gdw, &hdw, 1e-5, "Bf16 weight gradient");
        } else {
            near(&y, &want_y, 1e-2, "Fp8 forward");
            near(&dx, &want_dx, 1e-2, "Fp8 input gradient");
            near(&gdw, &hdw, 1e-2, "Fp8 weight gradient");
        }
    }
    // A layer shape the FP8 GEMM cannot take is refused by name, before any launch.
    let e = g
        .weight_operand(&up(&w[..40 * in_f]), 40, in_f, Precision::Fp8)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("linear.weight") && e.contains("multiple of 16"),
        "{e}"
    );
    assert!(g.check_linear(40, in_f, Precision::Bf16).is_ok());
    let e = g
        .weight_operand(&up(&w), out_f, in_f, Precision::Fp32)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("linear.precision"), "{e}");
}

/// Ranks placed on several GPUs of one process: two launches on this GPU (two handles, two
/// streams, running at once, the second with a rank base), and, with more than one GPU, ranks
/// on every GPU with their rings in their own GPU's memory and peer access between them. Each
/// equals the CPU transport; a placement that does not add up is refused by name.
#[test]
fn dispatch_with_ranks_on_several_launches_and_gpus_equals_the_cpu_transport() {
    use shoal_kernels::cuda::dispatch::two_hop_across;
    let (a, b) = (gpu(), gpu());
    let mut rng = StdRng::seed_from_u64(43);
    let (ranks, local, rows, maxd, hidden) = (8, 4, 200, 4, 256);
    let r = random_routing(&mut rng, ranks, local, rows, maxd, 0.4);
    let layout = r.layout().unwrap();
    let (len0, len1) = (hidden, hidden / 128 * 4);
    let inputs = random_rows(&mut rng, ranks, rows, (len0, len1));
    let want = cpu_transfer(&r, &layout, &inputs, len0, len1).unwrap();
    let cfg = TransferConfig {
        sms: 6,
        ..Default::default()
    };
    for combine in [false, true] {
        let got = two_hop_across(
            &[&a, &b],
            &[3, 5],
            &r,
            &layout,
            &inputs,
            (len0, len1),
            combine,
            cfg,
        )
        .unwrap()
        .received;
        assert_eq!(got, want, "two launches on one GPU, combine={combine}");
    }
    // The two-phase plan for nodes without shared memory: phase 1 as host copies, each node's
    // phase 2 through the kernel.
    let phased = shoal_kernels::inter_node::transfer_in_phases(
        &r,
        &layout,
        &inputs,
        (len0, len1),
        |phase, ins| {
            a.two_hop(&phase.routing, &phase.layout, ins, (len0, len1), false, cfg)
                .map(|t| t.received)
        },
    )
    .unwrap();
    assert_eq!(phased, want, "two phases");
    let e = two_hop_across(
        &[&a, &b],
        &[3, 4],
        &r,
        &layout,
        &inputs,
        (len0, len1),
        false,
        cfg,
    )
    .unwrap_err();
    assert!(e.to_string().contains("dispatch.placement"), "{e}");
    let n = shoal_kernels::cuda::probe().unwrap().len();
    if n > 1 {
        let gpus: Vec<Gpu> = (0..n.min(ranks)).map(|o| Gpu::open(o).unwrap()).collect();
        let refs: Vec<&Gpu> = gpus.iter().collect();
        let mut placement = vec![ranks / refs.len(); refs.len()];
        placement[0] += ranks % refs.len();
        let got = two_hop_across(
            &refs,
            &placement,
            &r,
            &layout,
            &inputs,
            (len0, len1),
            false,
            cfg,
        )
        .unwrap()
        .received;
        assert_eq!(got, want, "ranks on {n} GPUs, placement {placement:?}");
    }
}

/// Two processes, one rank each (two nodes of one rank), their rings shared over CUDA IPC: each
/// exports its rings, maps the other's, and launches only its own rank. Together they deliver
/// what the CPU transport does. The test starts its peer as a child process of this binary
/// (on the second GPU when there is one; else on the same GPU, where the driver time-slices the
/// two processes' kernels).
#[test]
fn a_transfer_between_processes_over_cuda_ipc_equals_the_cpu_transport() {
    use shoal_kernels::cuda::dispatch::Geometry;
    use shoal_kernels::cuda::ipc::IpcHandle;
    const PEER: &str = "SHOAL_IPC_PEER_DIR";
    let peer_dir = std::env::var(PEER).ok();
    let tmp = tempfile::tempdir().unwrap();
    let (me, dir) = match &peer_dir {
        Some(d) => (1usize, std::path::PathBuf::from(d)),
        None => (0, tmp.path().to_path_buf()),
    };
    let gpus = shoal_kernels::cuda::probe().unwrap().len();
    let g = Gpu::open(if me == 1 { 1.min(gpus - 1) } else { 0 }).unwrap();
    // The same routing in both processes (seeded).
    let mut rng = StdRng::seed_from_u64(47);
    let (ranks, local, rows, maxd, hidden) = (2, 1, 64, 2, 128);
    let r = random_routing(&mut rng, ranks, local, rows, maxd, 0.6);
    let layout = r.layout().unwrap();
    let (len0, len1) = (hidden, hidden / 128 * 4);
    let inputs = random_rows(&mut rng, ranks, rows, (len0, len1));
    let want = cpu_transfer(&r, &layout, &inputs, len0, len1).unwrap();
    let cfg = TransferConfig {
        sms: 2,
        ..Default::default()
    };
    let rings = g
        .shared_zeros(Geometry::new(ranks, (len0, len1), &cfg).rings_per_rank)
        .unwrap();
    std::fs::write(
        dir.join(format!("handle{me}.tmp")),
        g.export(&rings).unwrap().0,
    )
    .unwrap();
    std::fs::rename(
        dir.join(format!("handle{me}.tmp")),
        dir.join(format!("handle{me}")),
    )
    .unwrap();
    let child = (me == 0).then(|| {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "a_transfer_between_processes_over_cuda_ipc_equals_the_cpu_transport",
                "--test-threads=1",
            ])
            .env(PEER, &dir)
            .spawn()
            .unwrap()
    });
    let other = dir.join(format!("handle{}", 1 - me));
    let started = std::time::Instant::now();
    while !other.exists() {
        assert!(
            started.elapsed().as_secs() < 120,
            "the peer process never shared its rings"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let bytes: [u8; 64] = std::fs::read(&other).unwrap().try_into().unwrap();
    let theirs = g.import(&IpcHandle(bytes)).unwrap();
    let mut ptrs = [0u64; 2];
    ptrs[me] = rings.device_ptr();
    ptrs[1 - me] = theirs.device_ptr();
    let got = g
        .two_hop_ranks(
            me,
            &r,
            &layout,
            &inputs[me..me + 1],
            &ptrs,
            (len0, len1),
            false,
            cfg,
        )
        .unwrap()
        .received;
    assert_eq!(got[0], want[me], "rank {me} over IPC");
    if let Some(mut c) = child {
        // The peer writes into these rings until it is done: keep them until it exits.
        assert!(c.wait().unwrap().success(), "the peer process failed");
    }
    drop(theirs);
}

/// Phase 1 of a multi-node transfer through NCCL point-to-point: every local GPU is one node of
/// one rank (its own thread and `ncclCommInitRank` communicator), each sends its rows for the
/// other nodes to their proxies, and each proxy's phase-2 input equals what the in-process
/// protocol gives it; phase 2 on the GPU then delivers what the one-phase CPU transport does.
/// On a machine with one GPU there is one node, and the exchange runs with no message.
#[test]
fn phase_one_of_a_multi_node_transfer_through_nccl_equals_the_cpu_protocol() {
    use shoal_kernels::cuda::nccl::{Collectives, unique_id};
    use shoal_kernels::inter_node::{phase1_messages, phase1_receives, phase2_input, plan};
    let n = shoal_kernels::cuda::probe().unwrap().len();
    let mut rng = StdRng::seed_from_u64(61);
    let (rows, parts) = (29, (160, 8));
    let r = random_routing(&mut rng, n, 1, rows, 4, 0.4);
    let layout = r.layout().unwrap();
    let inputs = random_rows(&mut rng, n, rows, parts);
    let p = plan(&r, &layout).unwrap();
    // What each rank's phase-2 input must be, from the in-process protocol.
    let want: Vec<Rows> = (0..n)
        .map(|me| {
            let msgs: Vec<Vec<u8>> = phase1_receives(&p, me)
                .unwrap()
                .into_iter()
                .map(|(s, _)| {
                    phase1_messages(&p, s, &inputs[s], parts)
                        .unwrap()
                        .into_iter()
                        .find(|(proxy, _)| *proxy == me)
                        .unwrap()
                        .1
                })
                .collect();
            phase2_input(&p, me, &inputs[me], &msgs, parts).unwrap()
        })
        .collect();
    let id = unique_id().unwrap();
    let got: Vec<Rows> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|me| {
                let (p, inputs) = (&p, &inputs);
                scope.spawn(move || {
                    // A rank that fails would leave the others waiting inside NCCL for ever:
                    // fail the whole binary instead of hanging it.
                    let run = || -> shoal_kernels::Result<Rows> {
                        let g = Gpu::open(me)?;
                        let c = Collectives::from_rank(&g, me, n, id)?;
                        c.inter_node_phase1(&g, p, me, &inputs[me], parts)
                    };
                    run().unwrap_or_else(|e| {
                        eprintln!("rank {me}: {e}; aborting so the other ranks do not hang");
                        std::process::abort()
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(got, want);
    // Phase 2 (each node one rank here) on the GPU from those inputs: the one-phase transport.
    let g = gpu();
    let one_phase = cpu_transfer(&r, &layout, &inputs, parts.0, parts.1).unwrap();
    for (node, (phase, ins)) in p.nodes.iter().zip(got.chunks(1)).enumerate() {
        let mut received = g
            .two_hop(
                &phase.routing,
                &phase.layout,
                ins,
                parts,
                false,
                TransferConfig::default(),
            )
            .unwrap()
            .received;
        shoal_kernels::inter_node::restore_provenance(&p, node, &mut received).unwrap();
        assert_eq!(received[0], one_phase[node], "node {node}");
    }
    eprintln!("phase 1 through nccl over {n} node(s) of one gpu each");
}
