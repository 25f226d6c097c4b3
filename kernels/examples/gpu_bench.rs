//! GPU benchmarks for the device check (`scripts/gpu-check.sh`): FP8 GEMM TFLOP/s at DeepSeek-V3
//! shapes next to cuBLAS BF16 and cuBLASLt's block-scaled FP8 in the same run, quantization GB/s
//! next to the device's device-to-device copy bandwidth, and the two-hop dispatch/combine GB/s.
//! Writes a JSON report to the path given as the first argument (stdout too).

use std::time::Instant;

use half::bf16;
use serde_json::json;
use shoal_kernels::cuda::Gpu;
use shoal_kernels::cuda::dispatch::{Routing, Rows, TransferConfig};
use shoal_kernels::cuda::launch::{GemmKernel, GpuFp8, GroupedWeights};
use shoal_kernels::{Fp8Matrix, QuantConfig};

/// Seconds per call of `f` (after one warm-up call), timed over `iters` calls.
fn time<F: FnMut() -> shoal_kernels::Result<()>>(
    gpu: &Gpu,
    iters: usize,
    mut f: F,
) -> shoal_kernels::Result<f64> {
    f()?;
    gpu.synchronize("bench", "warm-up")?;
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    gpu.synchronize("bench", "timed")?;
    Ok(t.elapsed().as_secs_f64() / iters as f64)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "gpu-bench.json".into());
    let gpu = Gpu::open(0)?;
    let info = gpu.info().clone();
    eprintln!(
        "{} ({}), {} SMs, {:.0} GiB",
        info.name,
        info.arch(),
        info.sms,
        info.memory_bytes as f64 / (1u64 << 30) as f64
    );

    // FP8 GEMM vs cuBLAS BF16, C[m, n] = A[m, k] . B[n, k]^T.
    let mut gemms = Vec::new();
    for &(m, n, k) in &[
        (4096usize, 7168usize, 2048usize),
        (4096, 2112, 7168),
        (4096, 24576, 1536),
        (4096, 7168, 16384),
    ] {
        let flops = 2.0 * (m * n * k) as f64;
        let a = Fp8Matrix::quantize_tiles(&vec![0.5f32; m * k], m, k, QuantConfig::default())?;
        let b = Fp8Matrix::quantize_blocks(&vec![0.25f32; n * k], n, k, QuantConfig::default())?;
        let (ga, gb) = (GpuFp8::from_host(&gpu, &a)?, GpuFp8::from_host(&gpu, &b)?);
        let fp8 = time(&gpu, 10, || gpu.fp8_gemm(&ga, &gb).map(drop))?;
        // The other kernel on Hopper: mma.sync, which Hopper lowers to FP16 tensor-core math.
        let mma_sync = if GemmKernel::for_device(info.compute_capability) == GemmKernel::Wgmma {
            let w = GroupedWeights::single(&gb);
            let s = time(&gpu, 10, || {
                gpu.fp8_gemm_grouped_with(&ga, &[m], &w, GemmKernel::MmaSync)
                    .map(drop)
            })?;
            json!(flops / s / 1e12)
        } else {
            json!(null)
        };
        let a16 = gpu.upload("a", &vec![bf16::from_f32(0.5); m * k])?;
        let b16 = gpu.upload("b", &vec![bf16::from_f32(0.25); n * k])?;
        let bf = time(&gpu, 10, || gpu.bf16_gemm(&a16, &b16, m, n, k).map(drop))?;
        let (t8, t16) = (flops / fp8 / 1e12, flops / bf / 1e12);
        // cuBLASLt's block-scaled FP8 on the same operands (Hopper and cuBLAS 12.9+ only).
        let lt = match time(&gpu, 10, || gpu.fp8_gemm_cublaslt(&ga, &gb).map(drop)) {
            Ok(s) => json!(flops / s / 1e12),
            Err(e) => json!(format!("unavailable: {e}")),
        };
        eprintln!(
            "gemm {m}x{n}x{k}: fp8 {t8:.1} TFLOP/s, cuBLAS bf16 {t16:.1} TFLOP/s, ratio {:.2}, cuBLASLt fp8 {lt}",
            t8 / t16
        );
        gemms.push(json!({"m": m, "n": n, "k": k, "kernel": format!("{:?}", GemmKernel::for_device(info.compute_capability)), "fp8_tflops": t8, "fp8_mma_sync_tflops_on_hopper": mma_sync, "cublas_bf16_tflops": t16, "fp8_over_bf16": t8 / t16, "cublaslt_fp8_tflops": lt}));
    }

    // Quantization vs the copy bandwidth.
    let (rows, cols) = (16384usize, 7168usize);
    let x = gpu.upload("x", &vec![0.3f32; rows * cols])?;
    let mut y = gpu.zeros::<f32>("y", rows * cols)?;
    let copy = time(&gpu, 20, || {
        gpu.stream()
            .memcpy_dtod(&x, &mut y)
            .map_err(|e| shoal_kernels::KernelError::Cuda {
                kernel: "memcpy_dtod",
                shapes: String::new(),
                reason: e.to_string(),
            })
    })?;
    let copy_gbs = (8 * rows * cols) as f64 / copy / 1e9;
    let q_bytes = (rows * cols * 5 + rows * cols / 128 * 4) as f64;
    let cfg = QuantConfig::default();
    let tiles = time(&gpu, 20, || {
        gpu.quantize_tiles(&x, rows, cols, cfg).map(drop)
    })?;
    let tiles_t = time(&gpu, 20, || {
        gpu.quantize_tiles_transposed(&x, rows, cols, cfg).map(drop)
    })?;
    let blocks = time(&gpu, 20, || {
        gpu.quantize_blocks(&x, rows, cols, cfg).map(drop)
    })?;
    let quant = json!({
        "shape": [rows, cols],
        "copy_gbs": copy_gbs,
        "tiles_gbs": q_bytes / tiles / 1e9,
        "tiles_transposed_gbs": q_bytes / tiles_t / 1e9,
        "blocks_gbs": q_bytes / blocks / 1e9,
    });
    eprintln!("quantization: {quant}");

    // Dispatch over the two-hop kernel: 8 ranks (2 nodes of 4) on this one GPU.
    let (ranks, local, tokens, maxd, hidden) = (8usize, 4usize, 4096usize, 8usize, 7168usize);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let dest: Vec<Vec<i32>> = (0..ranks)
        .map(|_| {
            (0..tokens)
                .flat_map(|_| {
                    let mut d: Vec<i32> = (0..ranks as i32).filter(|_| next() % 2 == 0).collect();
                    d.resize(maxd, -1);
                    d
                })
                .collect()
        })
        .collect();
    let routing = Routing {
        ranks,
        local,
        maxd,
        dest,
    };
    let layout = routing.layout()?;
    let (len0, len1) = (hidden, hidden / 128 * 4);
    let inputs: Vec<Rows> = (0..ranks)
        .map(|_| Rows {
            part0: vec![1u8; tokens * len0],
            part1: vec![0u8; tokens * len1],
        })
        .collect();
    let moved: usize = layout.received.iter().sum::<usize>() * (len0 + len1);
    let mut dispatch = Vec::new();
    for sms in [20usize, 12] {
        let cfg = TransferConfig {
            sms,
            ..Default::default()
        };
        // Twice: the first run compiles and loads the module.
        gpu.two_hop(&routing, &layout, &inputs, (len0, len1), false, cfg)?;
        let s = gpu
            .two_hop(&routing, &layout, &inputs, (len0, len1), false, cfg)?
            .kernel_seconds;
        eprintln!(
            "dispatch, {sms} SMs per rank: {:.1} GB/s (kernel time)",
            moved as f64 / s / 1e9
        );
        dispatch.push(json!({"sms_per_rank": sms, "ranks_on_one_gpu": ranks, "bytes_received": moved, "kernel_seconds": s, "gbs": moved as f64 / s / 1e9}));
    }

    let report = json!({
        "device": {"name": info.name, "arch": info.arch(), "sms": info.sms, "memory_bytes": info.memory_bytes, "nvlink_peers": info.nvlink_peers},
        "gemm": gemms,
        "quantization": quant,
        "dispatch": dispatch,
    });
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(&out, &text)?;
    println!("{text}");
    Ok(())
}
