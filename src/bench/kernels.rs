//! `shoal bench kernels`: kernel throughput next to peers measured in the same run.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use half::bf16;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use shoal_kernels::matmul::{matmul, matmul_bf16};
use shoal_kernels::{Accumulation, Fp8Matrix, QuantConfig, Tensor, TensorCoreModel, fp8_gemm};

use super::numpy;

/// Options of `shoal bench kernels`.
#[derive(Debug, Clone, clap::Args)]
pub struct KernelBenchArgs {
    /// Smaller sizes and fewer repetitions (a smoke run, not for reporting).
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Skip the numpy peer (no Python needed).
    #[arg(long)]
    pub no_numpy: bool,
    /// Python interpreter with numpy to use as the GEMM peer.
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Where to create a virtual environment with numpy when no Python with numpy is found.
    #[arg(long, default_value = "target/bench-venv")]
    pub venv: PathBuf,
}

#[derive(Debug, Serialize)]
struct QuantRow {
    rows: usize,
    cols: usize,
    input_bytes: usize,
    /// Quantization on all threads (how the library runs it).
    quantize_gb_s: f64,
    /// Quantization confined to one thread.
    quantize_one_thread_gb_s: f64,
    /// `memcpy` of the input (one thread, as `copy_from_slice` is).
    memcpy_gb_s: f64,
    ratio_vs_memcpy: f64,
    one_thread_ratio_vs_memcpy: f64,
}

#[derive(Debug, Serialize)]
struct GemmRow {
    n: usize,
    fp32_gflops: f64,
    numpy_fp32_gflops: Option<f64>,
    fp32_ratio_vs_numpy: Option<f64>,
    bf16_gflops: f64,
    fp8_exact_gflops: f64,
}

#[derive(Debug, Serialize)]
struct EmulationRow {
    n: usize,
    k: usize,
    mantissa_bits: u32,
    group: usize,
    gflops: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    threads: usize,
    quantize: QuantRow,
    gemm: Vec<GemmRow>,
    fp8_tensor_core_emulation: EmulationRow,
    numpy: Option<String>,
}

/// Best wall time of `f` over at least `min_reps` runs and `min_secs` seconds (after a warm-up).
fn best_time(mut f: impl FnMut(), min_reps: usize, min_secs: f64) -> f64 {
    f();
    let start = Instant::now();
    let mut best = f64::INFINITY;
    let mut reps = 0;
    while reps < min_reps || start.elapsed().as_secs_f64() < min_secs {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        reps += 1;
    }
    best
}

fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

fn bench_quantize(rng: &mut StdRng, quick: bool, secs: f64) -> Result<QuantRow> {
    // One DeepSeek-V3 activation batch: 4096 tokens of hidden size 7168.
    let (rows, cols) = if quick { (256, 7168) } else { (4096, 7168) };
    let x = random(rng, rows * cols);
    let mut dst = vec![0f32; x.len()];
    let memcpy = best_time(
        || {
            dst.copy_from_slice(black_box(&x));
            black_box(&dst);
        },
        5,
        secs,
    );
    let cfg = QuantConfig::default();
    // The output buffers are reused across repetitions, as a training loop reuses them (and as
    // the memcpy above reuses its destination).
    let mut q = Fp8Matrix::quantize_tiles(&x, rows, cols, cfg)?;
    let mut failure = None;
    let mut time_quantize = || {
        best_time(
            || {
                if let Err(e) = q.requantize_tiles(black_box(&x), rows, cols, cfg) {
                    failure = Some(e);
                }
                black_box(&q);
            },
            5,
            secs,
        )
    };
    let quant = time_quantize();
    let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let quant_1t = one_thread.install(&mut time_quantize);
    if let Some(e) = failure {
        return Err(e.into());
    }
    let bytes = (rows * cols * 4) as f64;
    Ok(QuantRow {
        rows,
        cols,
        input_bytes: rows * cols * 4,
        quantize_gb_s: bytes / quant / 1e9,
        quantize_one_thread_gb_s: bytes / quant_1t / 1e9,
        memcpy_gb_s: bytes / memcpy / 1e9,
        ratio_vs_memcpy: memcpy / quant,
        one_thread_ratio_vs_memcpy: memcpy / quant_1t,
    })
}

fn gflops(n: usize, k: usize, m: usize, secs: f64) -> f64 {
    2.0 * (n * k * m) as f64 / secs / 1e9
}

fn bench_gemm(rng: &mut StdRng, n: usize, secs: f64) -> Result<(f64, f64, f64)> {
    let a = Tensor::new([n, n], random(rng, n * n))?;
    let b = Tensor::new([n, n], random(rng, n * n))?;
    let t32 = best_time(|| drop(black_box(matmul(&a, false, &b, false))), 3, secs);
    let (ab, bb) = (a.map(bf16::from_f32), b.map(bf16::from_f32));
    let t16 = best_time(
        || drop(black_box(matmul_bf16(&ab, false, &bb, false))),
        3,
        secs,
    );
    let cfg = QuantConfig::default();
    let aq = Fp8Matrix::quantize_tiles(a.data(), n, n, cfg)?;
    let bq = Fp8Matrix::quantize_blocks(b.data(), n, n, cfg)?;
    let t8 = best_time(
        || drop(black_box(fp8_gemm(&aq, &bq, Accumulation::Fp32))),
        3,
        secs,
    );
    Ok((
        gflops(n, n, n, t32),
        gflops(n, n, n, t16),
        gflops(n, n, n, t8),
    ))
}

fn bench_emulation(rng: &mut StdRng, secs: f64) -> Result<EmulationRow> {
    let (n, k) = (64, 1024);
    let cfg = QuantConfig::default();
    let aq = Fp8Matrix::quantize_tiles(&random(rng, n * k), n, k, cfg)?;
    let bq = Fp8Matrix::quantize_blocks(&random(rng, n * k), n, k, cfg)?;
    let model = TensorCoreModel::default();
    let t = best_time(
        || {
            drop(black_box(fp8_gemm(
                &aq,
                &bq,
                Accumulation::TensorCore(model),
            )))
        },
        3,
        secs,
    );
    Ok(EmulationRow {
        n,
        k,
        mantissa_bits: model.mantissa_bits,
        group: model.group,
        gflops: gflops(n, k, n, t),
    })
}

/// Runs the kernel benchmarks and prints the report.
pub fn run(args: &KernelBenchArgs) -> Result<()> {
    let sizes: &[usize] = if args.quick {
        &[256, 512]
    } else {
        &[256, 512, 1024, 2048]
    };
    let secs = if args.quick { 0.05 } else { 0.5 };
    let peer = if args.no_numpy {
        None
    } else {
        let python = numpy::python_with_numpy(args.python.as_deref(), &args.venv)?;
        Some(numpy::measure(&python, sizes)?)
    };
    let mut rng = StdRng::seed_from_u64(7);
    let quantize = bench_quantize(&mut rng, args.quick, secs)?;
    let mut gemm = Vec::new();
    for &n in sizes {
        let (fp32, bf16, fp8) = bench_gemm(&mut rng, n, secs)?;
        let numpy = peer
            .as_ref()
            .and_then(|p| p.rows.iter().find(|r| r.n == n))
            .map(|r| r.gflops);
        gemm.push(GemmRow {
            n,
            fp32_gflops: fp32,
            numpy_fp32_gflops: numpy,
            fp32_ratio_vs_numpy: numpy.map(|np| fp32 / np),
            bf16_gflops: bf16,
            fp8_exact_gflops: fp8,
        });
    }
    let report = Report {
        threads: rayon_threads(),
        quantize,
        gemm,
        fp8_tensor_core_emulation: bench_emulation(&mut rng, secs)?,
        numpy: peer.map(|p| format!("numpy {} ({})", p.numpy, p.blas)),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_tables(&report);
    }
    Ok(())
}

fn rayon_threads() -> usize {
    rayon::current_num_threads()
}

fn print_tables(r: &Report) {
    let q = &r.quantize;
    println!(
        "FP8 E4M3 1x128 quantization of {}x{} f32 ({} MB) against memcpy of the same bytes (goal >= 0.5)",
        q.rows,
        q.cols,
        q.input_bytes / 1_000_000
    );
    println!(
        "  memcpy (1 thread) {:>6.2} GB/s | quantize, {} threads {:>6.2} GB/s, ratio {:.2} | 1 thread {:>6.2} GB/s, ratio {:.2}",
        q.memcpy_gb_s,
        r.threads,
        q.quantize_gb_s,
        q.ratio_vs_memcpy,
        q.quantize_one_thread_gb_s,
        q.one_thread_ratio_vs_memcpy
    );
    println!();
    let peer = r.numpy.as_deref().unwrap_or("numpy skipped");
    println!(
        "GEMM GFLOP/s, square n x n x n, {} threads; peer: {peer}",
        r.threads
    );
    println!(
        "  {:>5}  {:>9}  {:>9}  {:>8}  {:>9}  {:>9}",
        "n", "fp32", "numpy", "ratio", "bf16", "fp8"
    );
    for g in &r.gemm {
        let np = g
            .numpy_fp32_gflops
            .map_or("-".into(), |v| format!("{v:.1}"));
        let ratio = g
            .fp32_ratio_vs_numpy
            .map_or("-".into(), |v| format!("{v:.2}"));
        println!(
            "  {:>5}  {:>9.1}  {:>9}  {:>8}  {:>9.1}  {:>9.1}",
            g.n, g.fp32_gflops, np, ratio, g.bf16_gflops, g.fp8_exact_gflops
        );
    }
    println!(
        "  (fp32 goal: ratio >= 0.8; bf16 = BF16 operands, FP32 accumulation; fp8 = E4M3 with 1x128/128x128 scales, exact FP32 block accumulation)"
    );
    let e = &r.fp8_tensor_core_emulation;
    println!();
    println!(
        "FP8 tensor-core emulation ({} mantissa bits, groups of {}), {}x{}x{}: {:.3} GFLOP/s (bit-level model, for accuracy studies)",
        e.mantissa_bits, e.group, e.n, e.k, e.n, e.gflops
    );
}
