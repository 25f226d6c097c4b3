//! FP8 GEMM with fine-grained scales: `C[m, n] = A[m, k] · B[n, k]^T`, both operands stored with the
//! inner dimension `k` contiguous (the "NT" layout of DeepGEMM), each with its own scales.
//!
//! Two accumulation modes:
//! * [`Accumulation::Fp32`] — the exact reference: for every 128-deep K block the unscaled FP8
//!   products are summed in FP32, multiplied by `scale_a * scale_b`, and added into an FP32
//!   accumulator. This is what DeepGEMM computes on Hopper.
//! * [`Accumulation::TensorCore`] — an emulation of a tensor core whose accumulator keeps only a
//!   limited number of mantissa bits (see [`TensorCoreModel`]), optionally promoted into FP32 every
//!   `N_C` K-elements: the experiment of section 3.3.2 of the DeepSeek-V3 report.

use rayon::prelude::*;

use crate::matmul::{MatMut, MatRef, gemm_into};
use crate::quant::{Fp8Matrix, QUANT_BLOCK, blocks};
use crate::{KernelError, Result, Tensor};

/// A model of a limited-precision MMA accumulator.
///
/// The products of `group` consecutive K-elements are summed exactly (the tensor core's internal
/// dot-product width), the group sum is added to the accumulator, and the result is truncated
/// (rounded toward zero) to `mantissa_bits` explicit mantissa bits. When `promotion_interval` is
/// set, every that many K-elements the accumulator is added into an FP32 accumulator (on CUDA
/// cores, with the block scales applied) and cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorCoreModel {
    /// Explicit mantissa bits kept by the accumulator (the report measured about 14 on H800).
    pub mantissa_bits: u32,
    /// Products summed exactly before each accumulator update.
    pub group: usize,
    /// Promote to FP32 every this many K-elements (`N_C`, 128 in the report); `None` never promotes.
    pub promotion_interval: Option<usize>,
}

impl Default for TensorCoreModel {
    fn default() -> Self {
        Self {
            mantissa_bits: 14,
            group: 4,
            promotion_interval: Some(QUANT_BLOCK),
        }
    }
}

/// How an FP8 GEMM accumulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Accumulation {
    /// Exact reference: FP32 sums per 128-deep block, scaled and added in FP32.
    #[default]
    Fp32,
    /// Emulated limited-precision tensor-core accumulation.
    TensorCore(TensorCoreModel),
}

impl TensorCoreModel {
    fn validate(&self) -> Result<()> {
        if self.mantissa_bits == 0 || self.mantissa_bits > 52 {
            return Err(KernelError::invalid(
                "tensor_core.mantissa_bits",
                format!("must be in 1..=52, got {}", self.mantissa_bits),
            ));
        }
        if self.group == 0 {
            return Err(KernelError::invalid(
                "tensor_core.group",
                "must be at least 1",
            ));
        }
        if let Some(nc) = self.promotion_interval
            && (nc == 0 || nc % self.group != 0)
        {
            return Err(KernelError::invalid(
                "tensor_core.promotion_interval",
                format!(
                    "must be a positive multiple of group {}, got {nc}",
                    self.group
                ),
            ));
        }
        Ok(())
    }
}

/// Rounds `x` toward zero to `bits` explicit mantissa bits.
#[inline(always)]
fn truncate_mantissa(x: f64, bits: u32) -> f64 {
    let mask = !((1u64 << (52 - bits)) - 1);
    f64::from_bits(x.to_bits() & mask)
}

/// `A · B^T` with fine-grained scales; see the module documentation.
pub fn fp8_gemm(a: &Fp8Matrix, b: &Fp8Matrix, acc: Accumulation) -> Result<Tensor<f32>> {
    if a.cols() != b.cols() {
        return Err(KernelError::shape(
            "fp8_gemm.b",
            format!("[n, {}] (inner dimension of a)", a.cols()),
            format!("[{}, {}]", b.rows(), b.cols()),
        ));
    }
    crate::checked_numel("fp8_gemm.output", &[a.rows(), b.rows()], 4)?;
    match acc {
        Accumulation::Fp32 => exact(a, b),
        Accumulation::TensorCore(model) => {
            model.validate()?;
            Ok(emulated(a, b, model))
        }
    }
}

fn exact(a: &Fp8Matrix, b: &Fp8Matrix) -> Result<Tensor<f32>> {
    let (m, n, k) = (a.rows(), b.rows(), a.cols());
    let ad = a.decode_unscaled();
    let bd = b.decode_unscaled();
    let mut out = vec![0f32; m * n];
    let mut partial = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return Ok(Tensor::from_parts(vec![m, n], out));
    }
    for kb in 0..blocks(k) {
        let k0 = kb * QUANT_BLOCK;
        let len = QUANT_BLOCK.min(k - k0);
        gemm_into(
            MatMut::row_major(&mut partial, m, n)?,
            MatRef::strided(&ad, k0, m, len, k, 1)?,
            MatRef::strided(&bd, k0, n, len, k, 1)?.t(),
            false,
        )?;
        let sb: Vec<f32> = (0..n).map(|j| b.scale(j, k0)).collect();
        out.par_chunks_mut(n)
            .zip(partial.par_chunks(n))
            .enumerate()
            .for_each(|(i, (o, p))| {
                let sa = a.scale(i, k0);
                for ((o, &p), &sb) in o.iter_mut().zip(p).zip(&sb) {
                    *o += p * (sa * sb);
                }
            });
    }
    Ok(Tensor::from_parts(vec![m, n], out))
}

fn emulated(a: &Fp8Matrix, b: &Fp8Matrix, model: TensorCoreModel) -> Tensor<f32> {
    let (m, n, k) = (a.rows(), b.rows(), a.cols());
    let ad = a.decode_unscaled();
    let bd = b.decode_unscaled();
    let mut out = vec![0f32; m * n];
    if n == 0 {
        return Tensor::from_parts(vec![m, n], out);
    }
    let bits = model.mantissa_bits;
    out.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        let arow = &ad[i * k..(i + 1) * k];
        let sa: Vec<f64> = (0..blocks(k))
            .map(|kb| f64::from(a.scale(i, kb * QUANT_BLOCK)))
            .collect();
        for (j, o) in row.iter_mut().enumerate() {
            let brow = &bd[j * k..(j + 1) * k];
            let mut fp32 = 0f32;
            let mut tc = 0f64;
            let mut since = 0usize;
            let mut k0 = 0;
            while k0 < k {
                let end = (k0 + model.group).min(k);
                // Exact sum of the group's scaled products (FP8 products are exact in f64, and so
                // are their products with two f32 scales up to f64 rounding far below the model's).
                let mut g = 0f64;
                for p in k0..end {
                    let s = sa[p / QUANT_BLOCK] * f64::from(b.scale(j, p));
                    g += f64::from(arow[p]) * f64::from(brow[p]) * s;
                }
                tc = truncate_mantissa(tc + g, bits);
                since += end - k0;
                if model.promotion_interval.is_some_and(|nc| since >= nc) {
                    fp32 += tc as f32;
                    tc = 0.0;
                    since = 0;
                }
                k0 = end;
            }
            *o = fp32 + tc as f32;
        }
    });
    Tensor::from_parts(vec![m, n], out)
}

/// The FP64 product of the dequantized operands, `dequant(A) · dequant(B)^T`: the reference the
/// accumulation modes are measured against.
pub fn fp8_gemm_f64_reference(a: &Fp8Matrix, b: &Fp8Matrix) -> Result<Tensor<f64>> {
    let ad = a.dequantize().cast::<f64>();
    let bd = b.dequantize().cast::<f64>();
    crate::matmul::matmul(&ad, false, &bd, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantConfig;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn operands(m: usize, n: usize, k: usize) -> (Fp8Matrix, Fp8Matrix) {
        let cfg = QuantConfig::default();
        let a = Fp8Matrix::quantize_tiles(&data(m * k, 1), m, k, cfg).unwrap();
        let b = Fp8Matrix::quantize_blocks(&data(n * k, 2), n, k, cfg).unwrap();
        (a, b)
    }

    fn max_rel(got: &Tensor<f32>, want: &Tensor<f64>) -> f64 {
        let scale = want.data().iter().fold(0f64, |m, v| m.max(v.abs()));
        got.data()
            .iter()
            .zip(want.data())
            .map(|(&g, &w)| (f64::from(g) - w).abs() / scale)
            .fold(0.0, f64::max)
    }

    #[test]
    fn exact_mode_matches_the_f64_product_with_partial_blocks() {
        let (a, b) = operands(37, 150, 300);
        let got = fp8_gemm(&a, &b, Accumulation::Fp32).unwrap();
        let want = fp8_gemm_f64_reference(&a, &b).unwrap();
        assert_eq!(got.shape(), &[37, 150]);
        assert!(max_rel(&got, &want) < 1e-5, "{}", max_rel(&got, &want));
    }

    #[test]
    fn tile_scaled_b_operand_is_supported() {
        let cfg = QuantConfig::default();
        let a = Fp8Matrix::quantize_tiles(&data(9 * 200, 3), 9, 200, cfg).unwrap();
        let b = Fp8Matrix::quantize_tiles(&data(11 * 200, 4), 11, 200, cfg).unwrap();
        let got = fp8_gemm(&a, &b, Accumulation::Fp32).unwrap();
        let want = fp8_gemm_f64_reference(&a, &b).unwrap();
        assert!(max_rel(&got, &want) < 1e-5);
    }

    #[test]
    fn wide_accumulator_agrees_with_the_f64_product() {
        let (a, b) = operands(8, 8, 1024);
        let model = TensorCoreModel {
            mantissa_bits: 52,
            group: 4,
            promotion_interval: None,
        };
        let got = fp8_gemm(&a, &b, Accumulation::TensorCore(model)).unwrap();
        let want = fp8_gemm_f64_reference(&a, &b).unwrap();
        assert!(max_rel(&got, &want) < 1e-6);
    }

    #[test]
    fn promotion_reduces_the_error_of_a_narrow_accumulator() {
        let (a, b) = operands(16, 16, 4096);
        let want = fp8_gemm_f64_reference(&a, &b).unwrap();
        let narrow = |promotion_interval| TensorCoreModel {
            mantissa_bits: 10,
            group: 4,
            promotion_interval,
        };
        let none = fp8_gemm(&a, &b, Accumulation::TensorCore(narrow(None))).unwrap();
        let promoted = fp8_gemm(&a, &b, Accumulation::TensorCore(narrow(Some(128)))).unwrap();
        let (e_none, e_prom) = (max_rel(&none, &want), max_rel(&promoted, &want));
        assert!(e_prom * 4.0 < e_none, "promoted {e_prom} vs none {e_none}");
    }

    #[test]
    fn default_model_reproduces_the_promotion_claim() {
        // The README's experiment in miniature: positive entries, K = 4096, default model.
        let (m, n, k) = (8, 8, 4096);
        let pos = |seed| {
            data(m * k, seed)
                .iter()
                .map(|v| v.abs())
                .collect::<Vec<_>>()
        };
        let cfg = QuantConfig::default();
        let a = Fp8Matrix::quantize_tiles(&pos(5), m, k, cfg).unwrap();
        let b = Fp8Matrix::quantize_blocks(&pos(6), n, k, cfg).unwrap();
        let want = fp8_gemm_f64_reference(&a, &b).unwrap();
        let rel = |got: &Tensor<f32>| {
            got.data()
                .iter()
                .zip(want.data())
                .map(|(&g, &w)| (f64::from(g) - w).abs() / w.abs())
                .fold(0.0, f64::max)
        };
        let tc = TensorCoreModel::default();
        let none = TensorCoreModel {
            promotion_interval: None,
            ..tc
        };
        let e_none = rel(&fp8_gemm(&a, &b, Accumulation::TensorCore(none)).unwrap());
        let e_prom = rel(&fp8_gemm(&a, &b, Accumulation::TensorCore(tc)).unwrap());
        assert!(e_none > 5e-3 && e_none < 3e-2, "no promotion: {e_none}");
        assert!(e_prom < 1e-3, "promoted: {e_prom}");
    }

    #[test]
    fn bad_arguments_are_refused() {
        let (a, _) = operands(4, 4, 256);
        let (_, b) = operands(4, 4, 128);
        assert!(matches!(
            fp8_gemm(&a, &b, Accumulation::Fp32),
            Err(KernelError::ShapeMismatch {
                operand: "fp8_gemm.b",
                ..
            })
        ));
        let (a, b) = operands(4, 4, 128);
        let bad = TensorCoreModel {
            promotion_interval: Some(130),
            ..TensorCoreModel::default()
        };
        let err = fp8_gemm(&a, &b, Accumulation::TensorCore(bad)).unwrap_err();
        assert!(err.to_string().contains("promotion_interval"), "{err}");
    }

    #[test]
    fn truncation_rounds_toward_zero() {
        assert_eq!(truncate_mantissa(1.0 + 2f64.powi(-20), 14), 1.0);
        assert_eq!(
            truncate_mantissa(-(1.0 + 2f64.powi(-14)), 14),
            -(1.0 + 2f64.powi(-14))
        );
        assert_eq!(truncate_mantissa(1.0 + 2f64.powi(-15), 14), 1.0);
    }
}
