//! Helpers shared by the kernel test binaries (emulated and GPU).
#![allow(dead_code)]

use half::bf16;
use rand::RngExt;
use rand::rngs::StdRng;
use shoal_kernels::Fp8Matrix;
use shoal_kernels::two_hop::{Layout, Received, Routing, Rows};

/// Uniform values in `[-scale, scale)`, 2% of them 50 times larger (the outliers fine-grained
/// scaling is for).
pub fn randn(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let outlier = if rng.random::<f32>() < 0.02 {
                50.0
            } else {
                1.0
            };
            (rng.random::<f32>() * 2.0 - 1.0) * scale * outlier
        })
        .collect()
}

/// Asserts `|got - want| <= tol * (1 + |want|)` element-wise.
pub fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "{what}[{i}]: kernel {a} cpu {b}"
        );
    }
}

/// Max `|got - want| / (|A| . |B|)` over a GEMM's output `A . B^T`: the sums of a K block may be
/// ordered differently, so the error is measured against the size of the products.
pub fn gemm_error(got: &[f32], want: &[f32], a: &Fp8Matrix, b: &Fp8Matrix) -> f64 {
    let (ad, bd) = (a.dequantize(), b.dequantize());
    let k = a.cols();
    let mut worst = 0f64;
    for (idx, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (i, j) = (idx / b.rows(), idx % b.rows());
        let mag: f64 = (0..k)
            .map(|p| f64::from(ad.data()[i * k + p].abs()) * f64::from(bd.data()[j * k + p].abs()))
            .sum();
        if !g.is_finite() {
            // A NaN would vanish in `max`: a non-finite output is the worst error there is.
            return f64::INFINITY;
        }
        worst = worst.max(f64::from((g - w).abs()) / mag.max(1e-30));
    }
    worst
}

/// Random top-k routing: every row of every rank goes to each rank with probability `p`, at most
/// `maxd` of them (ascending, `-1`-padded).
pub fn random_routing(
    rng: &mut StdRng,
    ranks: usize,
    local: usize,
    rows: usize,
    maxd: usize,
    p: f32,
) -> Routing {
    let dest = (0..ranks)
        .map(|_| {
            (0..rows)
                .flat_map(|_| {
                    let mut d: Vec<i32> = (0..ranks as i32)
                        .filter(|_| rng.random::<f32>() < p)
                        .take(maxd)
                        .collect();
                    d.resize(maxd, -1);
                    d
                })
                .collect::<Vec<i32>>()
        })
        .collect();
    Routing {
        ranks,
        local,
        maxd,
        dest,
    }
}

/// The combine of a dispatch: every received row goes back to its source, into the staging row
/// `source row * maxd + entry` (the source then sums a row's entries in order).
pub fn combine_routing(dispatch: &Routing, received: &[Received]) -> (Routing, Layout) {
    let back = Routing {
        ranks: dispatch.ranks,
        local: dispatch.local,
        maxd: 1,
        dest: received
            .iter()
            .map(|r| r.meta.iter().map(|m| m[0]).collect())
            .collect(),
    };
    let maxd = dispatch.maxd as i32;
    let layout = Layout {
        pos: received
            .iter()
            .map(|r| r.meta.iter().map(|m| m[1] * maxd + m[2]).collect())
            .collect(),
        received: dispatch.dest.iter().map(Vec::len).collect(),
    };
    (back, layout)
}

/// Random BF16 rows (values in [-0.5, 0.5)), one per row each rank received: what the experts send
/// back in a combine.
pub fn random_bf16_rows(rng: &mut StdRng, received: &[Received], hidden: usize) -> Vec<Rows> {
    received
        .iter()
        .map(|r| Rows {
            part0: (0..r.meta.len() * hidden)
                .flat_map(|_| {
                    bf16::from_f32(rng.random::<f32>() - 0.5)
                        .to_bits()
                        .to_le_bytes()
                })
                .collect(),
            part1: vec![],
        })
        .collect()
}

/// BF16 bit patterns from little-endian bytes.
pub fn bf16_bits(bytes: &[u8]) -> Vec<u16> {
    bytes
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// `ranks` ranks' random input rows: `rows` rows of `len0` and `len1` bytes each.
pub fn random_rows(
    rng: &mut StdRng,
    ranks: usize,
    rows: usize,
    (len0, len1): (usize, usize),
) -> Vec<Rows> {
    (0..ranks)
        .map(|_| Rows {
            part0: (0..rows * len0).map(|_| rng.random()).collect(),
            part1: (0..rows * len1).map(|_| rng.random()).collect(),
        })
        .collect()
}
