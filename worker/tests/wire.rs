//! Expert-parallel frames: round trips, the FP8 dispatch's size against BF16, and malformed
//! frames refused with a reason instead of a panic.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use proptest::prelude::*;
use shoal_kernels::Tensor;
use shoal_worker::WorkerError;
use shoal_worker::comm::wire::{CombineFrame, DispatchFrame};

/// `rows x cols` values of varied magnitude, deterministic.
fn hidden(rows: usize, cols: usize) -> Tensor<f32> {
    let data = (0..rows * cols)
        .map(|i| {
            let x = ((i * 2_654_435_761) % 10_007) as f32 / 10_007.0 - 0.5;
            x * (1.0 + (i % 7) as f32 * 3.0)
        })
        .collect();
    Tensor::new(vec![rows, cols], data).unwrap()
}

fn frame(rows: usize, cols: usize, pow2: bool) -> DispatchFrame {
    let topk = 4;
    let experts = (0..rows * topk).map(|i| (i * 5 % 16) as u32).collect();
    let weights = (0..rows * topk)
        .map(|i| 0.1 + (i % 3) as f32 * 0.2)
        .collect();
    DispatchFrame::quantize(&hidden(rows, cols), topk, experts, weights, pow2).unwrap()
}

#[test]
fn dispatch_round_trips_and_stays_within_e4m3_of_the_input() {
    for (rows, cols, pow2) in [
        (5, 256, false),
        (3, 200, true),
        (1, 7168, false),
        (0, 128, false),
    ] {
        let f = frame(rows, cols, pow2);
        let bytes = f.encode();
        let back = DispatchFrame::decode(&bytes, 16).unwrap();
        assert_eq!(back, f);
        // E4M3 has 3 mantissa bits: each value within half an ulp of its tile's scale, at most
        // 2^-4 of the tile's largest magnitude.
        let x = hidden(rows, cols);
        let y = back.tokens.to_f32();
        for r in 0..rows {
            for tile in (0..cols).step_by(128) {
                let end = (tile + 128).min(cols);
                let row = &x.data()[r * cols..(r + 1) * cols];
                let amax = row[tile..end].iter().fold(0f32, |m, v| m.max(v.abs()));
                let got = &y.data()[r * cols + tile..r * cols + end];
                for (c, (a, b)) in row[tile..end].iter().zip(got).enumerate() {
                    let err = (a - b).abs();
                    assert!(
                        err <= amax / 16.0 + 1e-6,
                        "({r}, {}): {err} against amax {amax}",
                        tile + c
                    );
                }
            }
        }
    }
}

#[test]
fn fp8_dispatch_carries_about_half_of_bf16() {
    // The hidden states only: one byte per value plus a 4-byte scale per 128 values, against
    // two bytes per value: (1 + 4/128) / 2.
    for cols in [128, 1024, 7168] {
        let f = frame(64, cols, false);
        let ratio = f.activation_bytes() as f64 / (64 * cols * 2) as f64;
        assert!(
            (ratio - (1.0 + 4.0 / 128.0) / 2.0).abs() < 1e-12,
            "{cols}: {ratio}"
        );
        let combine = CombineFrame::from_f32(&hidden(64, cols)).unwrap();
        assert_eq!(combine.encode().len(), 20 + 64 * cols * 2);
    }
}

#[test]
fn combine_round_trips_as_bf16() {
    let x = hidden(4, 300);
    let f = CombineFrame::from_f32(&x).unwrap();
    let back = CombineFrame::decode(&f.encode()).unwrap();
    assert_eq!(back, f);
    let y = back.to_f32().unwrap();
    for (a, b) in x.data().iter().zip(y.data()) {
        assert!((a - b).abs() <= a.abs() / 256.0, "{a} -> {b}");
    }
}

fn reason(e: WorkerError) -> String {
    match e {
        WorkerError::Frame { reason, .. } => reason,
        other => panic!("expected a frame error, got {other}"),
    }
}

#[test]
fn every_truncation_and_padding_is_refused() {
    let bytes = frame(3, 200, false).encode();
    for len in 0..bytes.len() {
        let e = DispatchFrame::decode(&bytes[..len], 16).unwrap_err();
        let r = reason(e);
        assert!(r.contains("bytes"), "{len}: {r}");
    }
    let mut padded = bytes.clone();
    padded.push(0);
    assert!(reason(DispatchFrame::decode(&padded, 16).unwrap_err()).contains("need"));
    let c = CombineFrame::from_f32(&hidden(2, 10)).unwrap().encode();
    for len in 0..c.len() {
        assert!(CombineFrame::decode(&c[..len]).is_err(), "{len}");
    }
}

#[test]
fn wrong_magic_kind_flags_experts_and_values_are_named() {
    let good = frame(2, 128, false).encode();
    let mut b = good.clone();
    b[0] = b'X';
    assert!(reason(DispatchFrame::decode(&b, 16).unwrap_err()).contains("magic"));
    // A combine frame where a dispatch frame was expected.
    let c = CombineFrame::from_f32(&hidden(2, 128)).unwrap().encode();
    assert!(reason(DispatchFrame::decode(&c, 16).unwrap_err()).contains("kind"));
    let mut b = good.clone();
    b[5] = 0x80;
    assert!(reason(DispatchFrame::decode(&b, 16).unwrap_err()).contains("flags"));
    // Expert indices are bounded by the model's experts.
    assert!(reason(DispatchFrame::decode(&good, 4).unwrap_err()).contains("expert"));
    // A NaN code (E4M3 0x7f) among the tokens.
    let mut b = good.clone();
    b[20] = 0x7f;
    assert!(reason(DispatchFrame::decode(&b, 16).unwrap_err()).contains("NaN"));
    // A zero scale.
    let mut b = good.clone();
    let scales_at = 20 + 2 * 128;
    b[scales_at..scales_at + 4].copy_from_slice(&0f32.to_le_bytes());
    assert!(reason(DispatchFrame::decode(&b, 16).unwrap_err()).contains("scale"));
    // Routes whose byte count overflows.
    let mut b = good.clone();
    b[8..12].copy_from_slice(&(1u32 << 31).to_le_bytes());
    b[12..16].copy_from_slice(&0u32.to_le_bytes());
    b[16..20].copy_from_slice(&(1u32 << 31).to_le_bytes());
    assert!(DispatchFrame::decode(&b, 16).is_err());
    // A tensor that is not 2-D.
    let flat = Tensor::new(vec![8], vec![0.0; 8]).unwrap();
    assert!(CombineFrame::from_f32(&flat).is_err());
    // Dimensions whose product overflows.
    let mut b = good;
    b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(DispatchFrame::decode(&b, 16).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any bytes: an error or a frame, never a panic; and a frame re-encodes to the same bytes.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(f) = DispatchFrame::decode(&bytes, 1 << 20) {
            prop_assert_eq!(f.encode(), bytes.clone());
        }
        if let Ok(f) = CombineFrame::decode(&bytes) {
            prop_assert_eq!(f.encode(), bytes);
        }
    }

    /// Flipping bytes of a valid frame: an error or a frame, never a panic.
    #[test]
    fn corrupted_frames_never_panic(at in 0usize..2000, v in any::<u8>()) {
        let mut b = frame(3, 200, true).encode();
        let i = at % b.len();
        b[i] = v;
        let _ = DispatchFrame::decode(&b, 16);
    }
}
