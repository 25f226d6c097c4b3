//! Reproduces the accumulation-precision experiment of the DeepSeek-V3 report (section 3.3.2):
//! FP8 GEMMs whose tensor-core accumulator keeps about 14 mantissa bits lose accuracy as K grows,
//! and promoting partial sums to FP32 every N_C = 128 elements fixes it.
//!
//! For each K, two random matrices are quantized to E4M3 (A in 1x128 tiles, B in 128x128
//! blocks), multiplied with the emulated tensor core (see `TensorCoreModel`) without and with
//! promotion, and compared element by element with the FP64 product of the same quantized inputs.
//!
//! `cargo run --release -p shoal-kernels --example fp8_accumulation -- --json`
//! Options: `--json`, `--mantissa-bits N` (default 14), `--group G` (default 4).

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use shoal_kernels::fp8_gemm::fp8_gemm_f64_reference;
use shoal_kernels::{Accumulation, Fp8Matrix, QuantConfig, TensorCoreModel, fp8_gemm};

const KS: [usize; 7] = [256, 512, 1024, 2048, 4096, 8192, 16384];
const M: usize = 32;
const N: usize = 32;
const SEED: u64 = 20241227;

fn max_rel_err(got: &[f32], want: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (f64::from(g) - w).abs() / w.abs())
        .fold(0.0, f64::max)
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fp8_accumulation: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut json = false;
    let mut tc = TensorCoreModel::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> Result<usize, String> {
            let v = args.next().ok_or(format!("{name} needs a value"))?;
            v.parse().map_err(|e| format!("{name} {v}: {e}"))
        };
        match arg.as_str() {
            "--json" => json = true,
            "--mantissa-bits" => tc.mantissa_bits = value("--mantissa-bits")? as u32,
            "--group" => tc.group = value("--group")?,
            other => {
                return Err(format!(
                    "unknown argument {other}: options are --json, --mantissa-bits N, --group G"
                )
                .into());
            }
        }
    }
    let cfg = QuantConfig::default();
    let no_promotion = TensorCoreModel {
        promotion_interval: None,
        ..tc
    };
    let mut rng = StdRng::seed_from_u64(SEED);
    let mut rows = Vec::new();
    for k in KS {
        // Uniform [0, 1) entries: every partial sum grows with K, as activations times weights do
        // on average, and no output sits near zero where a relative error is meaningless.
        let a: Vec<f32> = (0..M * k).map(|_| rng.random::<f32>()).collect();
        let b: Vec<f32> = (0..N * k).map(|_| rng.random::<f32>()).collect();
        let aq = Fp8Matrix::quantize_tiles(&a, M, k, cfg)?;
        let bq = Fp8Matrix::quantize_blocks(&b, N, k, cfg)?;
        let reference = fp8_gemm_f64_reference(&aq, &bq)?;
        let none = fp8_gemm(&aq, &bq, Accumulation::TensorCore(no_promotion))?;
        let promoted = fp8_gemm(&aq, &bq, Accumulation::TensorCore(tc))?;
        let e1 = max_rel_err(none.data(), reference.data());
        let e2 = max_rel_err(promoted.data(), reference.data());
        if !json {
            println!(
                "k={k:>6}  no promotion: {:>8.4}%   promoted every {}: {:>8.5}%",
                100.0 * e1,
                tc.promotion_interval.unwrap_or(0),
                100.0 * e2
            );
        }
        rows.push(serde_json::json!({
            "k": k,
            "no_promotion_max_rel_err": e1,
            "promoted_max_rel_err": e2,
        }));
    }
    if json {
        println!("{}", serde_json::json!({ "rows": rows }));
    }
    Ok(())
}
