//! Property tests of fine-grained FP8 quantization.

use proptest::prelude::*;
use shoal_kernels::quant::{AMAX_FLOOR, QUANT_BLOCK};
use shoal_kernels::{Fp8Format, Fp8Matrix, Granularity, KernelError, QuantConfig};

fn config() -> impl Strategy<Value = QuantConfig> {
    (
        prop_oneof![Just(Fp8Format::E4M3), Just(Fp8Format::E5M2)],
        any::<bool>(),
    )
        .prop_map(|(format, pow2_scales)| QuantConfig {
            format,
            pow2_scales,
        })
}

/// A matrix whose rows mix magnitudes from 1e-12 to 1e12, with zeros and tiny tiles.
fn matrix() -> impl Strategy<Value = (usize, usize, Vec<f32>)> {
    (1usize..5, 1usize..400).prop_flat_map(|(rows, cols)| {
        let elem = prop_oneof![
            4 => (-1.0f32..1.0, -12i32..12).prop_map(|(m, e)| m * 10f32.powi(e)),
            1 => Just(0.0f32),
            1 => -1e-6f32..1e-6,
        ];
        (
            Just(rows),
            Just(cols),
            prop::collection::vec(elem, rows * cols),
        )
    })
}

/// The largest error dequantization may show for `x`: half an FP8 ULP at the scaled magnitude,
/// plus the f32 roundings of the scaling multiply and the dequantization multiply.
fn bound(x: f32, scale: f32, cfg: QuantConfig) -> f64 {
    let fmt = cfg.format;
    let y = (f64::from(x) / f64::from(scale))
        .abs()
        .min(f64::from(fmt.max()));
    let half_ulp = 0.5 * f64::from(fmt.ulp(y as f32)) * f64::from(scale);
    half_ulp * (1.0 + 1e-6) + f64::from(x.abs()) * 2f64.powi(-21) + 1e-45
}

fn check_round_trip(q: &Fp8Matrix, x: &[f32], cfg: QuantConfig) -> Result<(), TestCaseError> {
    let deq = q.dequantize();
    let cols = q.cols();
    for (i, (&orig, &back)) in x.iter().zip(deq.data()).enumerate() {
        let s = q.scale_at(i / cols, i % cols).expect("inside the matrix");
        let err = (f64::from(orig) - f64::from(back)).abs();
        prop_assert!(
            err <= bound(orig, s, cfg),
            "element {i}: x={orig:e} deq={back:e} scale={s:e} err={err:e} bound={:e}",
            bound(orig, s, cfg)
        );
    }
    Ok(())
}

fn check_scales(q: &Fp8Matrix, cfg: QuantConfig) -> Result<(), TestCaseError> {
    for &s in q.scales() {
        prop_assert!(s.is_finite() && s > 0.0, "scale {s}");
        prop_assert!(s >= AMAX_FLOOR / cfg.format.max() * (1.0 - 1e-6));
        if cfg.pow2_scales {
            prop_assert_eq!(
                s.to_bits() & 0x007F_FFFF,
                0,
                "scale {} is not a power of two",
                s
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn tiles_round_trip_within_half_an_ulp((rows, cols, x) in matrix(), cfg in config()) {
        let q = Fp8Matrix::quantize_tiles(&x, rows, cols, cfg).unwrap();
        prop_assert_eq!(q.granularity(), Granularity::Tile1x128);
        prop_assert_eq!(q.scale_shape(), [rows, cols.div_ceil(QUANT_BLOCK)]);
        check_scales(&q, cfg)?;
        check_round_trip(&q, &x, cfg)?;
    }

    #[test]
    fn a_matrix_rebuilt_from_its_parts_is_the_same((rows, cols, x) in matrix(), cfg in config()) {
        for q in [
            Fp8Matrix::quantize_tiles(&x, rows, cols, cfg).unwrap(),
            Fp8Matrix::quantize_blocks(&x, rows, cols, cfg).unwrap(),
        ] {
            let back = Fp8Matrix::from_parts(
                rows, cols, q.format(), q.granularity(), q.codes().to_vec(), q.scales().to_vec(),
            ).unwrap();
            prop_assert_eq!(&back, &q);
            // One code or scale too few is refused.
            let mut codes = q.codes().to_vec();
            codes.pop();
            prop_assert!(Fp8Matrix::from_parts(
                rows, cols, q.format(), q.granularity(), codes, q.scales().to_vec(),
            ).is_err());
            let mut scales = q.scales().to_vec();
            scales.pop();
            prop_assert!(Fp8Matrix::from_parts(
                rows, cols, q.format(), q.granularity(), q.codes().to_vec(), scales,
            ).is_err());
        }
    }

    #[test]
    fn blocks_round_trip_within_half_an_ulp((rows, cols, x) in matrix(), cfg in config()) {
        // Stretch the rows so that some matrices span more than one 128-row block.
        let reps = 1 + 200 / rows;
        let x: Vec<f32> = std::iter::repeat_n(&x, reps).flatten().copied().collect();
        let rows = rows * reps;
        let q = Fp8Matrix::quantize_blocks(&x, rows, cols, cfg).unwrap();
        prop_assert_eq!(q.scale_shape(), [rows.div_ceil(QUANT_BLOCK), cols.div_ceil(QUANT_BLOCK)]);
        check_scales(&q, cfg)?;
        check_round_trip(&q, &x, cfg)?;
    }

    #[test]
    fn transposed_tiles_quantize_the_transpose((rows, cols, x) in matrix(), cfg in config()) {
        let q = Fp8Matrix::quantize_tiles_transposed(&x, rows, cols, cfg).unwrap();
        let mut t = vec![0f32; x.len()];
        for i in 0..rows {
            for j in 0..cols {
                t[j * rows + i] = x[i * cols + j];
            }
        }
        let direct = Fp8Matrix::quantize_tiles(&t, cols, rows, cfg).unwrap();
        prop_assert_eq!(q, direct);
    }

    #[test]
    fn non_finite_inputs_are_refused(
        (rows, cols, mut x) in matrix(),
        pick in any::<prop::sample::Index>(),
        bad in prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY)],
        cfg in config(),
    ) {
        let at = pick.index(x.len());
        x[at] = bad;
        for result in [
            Fp8Matrix::quantize_tiles(&x, rows, cols, cfg),
            Fp8Matrix::quantize_blocks(&x, rows, cols, cfg),
        ] {
            match result {
                Err(KernelError::NonFinite { operand, index, .. }) => {
                    prop_assert_eq!(operand, "quantize.input");
                    prop_assert_eq!(index, at);
                }
                other => prop_assert!(false, "expected a non-finite error, got {other:?}"),
            }
        }
    }

    #[test]
    fn extreme_magnitudes_keep_scales_finite(e in -45i32..38, cfg in config()) {
        let v = 10f32.powi(e);
        let x = vec![v, -v, v * 0.5, 0.0];
        let q = Fp8Matrix::quantize_tiles(&x, 1, 4, cfg).unwrap();
        check_scales(&q, cfg)?;
        check_round_trip(&q, &x, cfg)?;
    }
}
