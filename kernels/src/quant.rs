//! Fine-grained FP8 quantization as in the DeepSeek-V3 recipe and DeepGEMM.
//!
//! * Activations: one scale per 1x128 tile along the inner (last) dimension; scales have shape
//!   `[rows, ceil(cols / 128)]`.
//! * Weights: one scale per 128x128 block; scales have shape `[ceil(rows / 128), ceil(cols / 128)]`.
//! * `scale = max(amax, 1e-4) / fmt_max`, the value stored is `x * (fmt_max / max(amax, 1e-4))`
//!   in the FP8 format, so `x ≈ decode(code) * scale`. With power-of-two scales the scale is rounded
//!   up to the next power of two (so the tile still fits).
//! * Dimensions that are not multiples of 128 give partial tiles and blocks at the edges.

use half::bf16;
use rayon::prelude::*;

use crate::fp8::Fp8Format;
use crate::{KernelError, Result, Tensor};

/// Tile and block edge length.
pub const QUANT_BLOCK: usize = 128;
/// Inputs of at least this many elements are quantized on several threads.
const PARALLEL_ELEMENTS: usize = 1 << 20;

/// The smallest amax a scale is computed from (so scales are never zero).
pub const AMAX_FLOOR: f32 = 1e-4;

/// How an [`Fp8Matrix`] is scaled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    /// One scale per row and 128 columns (activations).
    Tile1x128,
    /// One scale per 128x128 block (weights).
    Block128x128,
}

/// Quantization options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantConfig {
    /// Target format (E4M3 for everything in the DeepSeek-V3 recipe).
    pub format: Fp8Format,
    /// Round each scale up to a power of two (exact rescaling; the paper uses it for some activations).
    pub pow2_scales: bool,
}

impl Default for QuantConfig {
    fn default() -> Self {
        Self {
            format: Fp8Format::E4M3,
            pow2_scales: false,
        }
    }
}

/// A matrix of FP8 codes with fine-grained FP32 scales. Codes are row-major `[rows, cols]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8Matrix {
    rows: usize,
    cols: usize,
    format: Fp8Format,
    granularity: Granularity,
    codes: Vec<u8>,
    scales: Vec<f32>,
}

/// `ceil(n / 128)`.
pub const fn blocks(n: usize) -> usize {
    n.div_ceil(QUANT_BLOCK)
}

/// The scale for a tile of maximum magnitude `amax`, and the multiplier that maps the tile into FP8.
#[inline(always)]
fn scale_for(amax: f32, cfg: QuantConfig) -> (f32, f32) {
    let amax = amax.max(AMAX_FLOOR);
    let max = cfg.format.max();
    if cfg.pow2_scales {
        let s = pow2_ceil(amax / max);
        (s, 1.0 / s)
    } else {
        (amax / max, max / amax)
    }
}

/// The smallest power of two not below `x` (for positive normal `x`).
#[inline(always)]
fn pow2_ceil(x: f32) -> f32 {
    f32::from_bits((x.to_bits() + 0x007F_FFFF) & 0xFF80_0000)
}

/// The largest magnitude in `x`, and whether every element is finite. For non-negative floats the
/// integer order of the bit patterns is the numeric order, and NaN and the infinities have the
/// largest patterns, so one integer max (which vectorises) gives both answers.
#[inline(always)]
fn amax_of(x: &[f32]) -> (f32, bool) {
    let mut m = 0u32;
    for &v in x {
        m = m.max(v.to_bits() & 0x7FFF_FFFF);
    }
    (f32::from_bits(m), m < 0x7F80_0000)
}

#[inline(always)]
fn encode_scaled(src: &[f32], dst: &mut [u8], mul: f32, format: Fp8Format) {
    match format {
        Fp8Format::E4M3 => {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = Fp8Format::E4M3.encode_finite(s * mul);
            }
        }
        Fp8Format::E5M2 => {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = Fp8Format::E5M2.encode_finite(s * mul);
            }
        }
    }
}

/// Quantizes one row in 1x128 tiles; returns false if a non-finite value was seen.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn quantize_row(src: &[f32], codes: &mut [u8], scales: &mut [f32], cfg: QuantConfig) -> bool {
    // Short passes over a group of tiles (which stays in L1): every tile's amax, then every
    // scale, then the encoding. Keeping the divisions out of the per-tile chain lets the core
    // overlap tiles instead of waiting on each scale.
    const GROUP: usize = 16;
    let mut ok = true;
    let mut muls = [0f32; GROUP];
    for ((src, codes), scales) in src
        .chunks(GROUP * QUANT_BLOCK)
        .zip(codes.chunks_mut(GROUP * QUANT_BLOCK))
        .zip(scales.chunks_mut(GROUP))
    {
        for (tile, scale) in src.chunks(QUANT_BLOCK).zip(scales.iter_mut()) {
            let (amax, finite) = amax_of(tile);
            ok &= finite;
            *scale = amax;
        }
        for (scale, mul) in scales.iter_mut().zip(muls.iter_mut()) {
            (*scale, *mul) = scale_for(*scale, cfg);
        }
        for ((tile, out), &mul) in src
            .chunks(QUANT_BLOCK)
            .zip(codes.chunks_mut(QUANT_BLOCK))
            .zip(muls.iter())
        {
            encode_scaled(tile, out, mul, cfg.format);
        }
    }
    ok
}

/// Encodes whole rows of a block-quantized matrix, given each block's multiplier.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn encode_block_rows(
    x: &[f32],
    codes: &mut [u8],
    cols: usize,
    kb: usize,
    muls: &[f32],
    format: Fp8Format,
) {
    for (r, (src, dst)) in x.chunks(cols).zip(codes.chunks_mut(cols)).enumerate() {
        let bi = r / QUANT_BLOCK;
        for (j, (s, d)) in src
            .chunks(QUANT_BLOCK)
            .zip(dst.chunks_mut(QUANT_BLOCK))
            .enumerate()
        {
            encode_scaled(s, d, muls[bi * kb + j], format);
        }
    }
}

/// Quantizes whole rows in 1x128 tiles; large inputs are split into bands of rows across rayon's
/// threads (tiles are independent, so the result does not depend on the split).
fn quantize_rows(
    x: &[f32],
    codes: &mut [u8],
    scales: &mut [f32],
    cols: usize,
    cfg: QuantConfig,
) -> bool {
    let kb = blocks(cols);
    let band = |((src, dst), sc): ((&[f32], &mut [u8]), &mut [f32])| {
        src.chunks(cols)
            .zip(dst.chunks_mut(cols))
            .zip(sc.chunks_mut(kb))
            .fold(true, |ok, ((s, d), c)| quantize_row(s, d, c, cfg) & ok)
    };
    if x.len() < PARALLEL_ELEMENTS {
        return band(((x, codes), scales));
    }
    let rows = x.len() / cols;
    let rows_per_band = rows.div_ceil(4 * rayon::current_num_threads()).max(1);
    x.par_chunks(rows_per_band * cols)
        .zip(codes.par_chunks_mut(rows_per_band * cols))
        .zip(scales.par_chunks_mut(rows_per_band * kb))
        .map(band)
        .reduce(|| true, |a, b| a & b)
}

fn non_finite(operand: &'static str, x: &[f32]) -> KernelError {
    match crate::error::check_finite(operand, x) {
        Err(e) => e,
        Ok(()) => KernelError::invalid(operand, "non-finite value"),
    }
}

fn check_len(operand: &'static str, x: &[f32], rows: usize, cols: usize) -> Result<()> {
    let n = crate::checked_numel(operand, &[rows, cols], 4)?;
    if x.len() != n {
        return Err(KernelError::shape(
            operand,
            format!("{rows}x{cols} = {n} elements"),
            format!("{} elements", x.len()),
        ));
    }
    Ok(())
}

impl Fp8Matrix {
    /// Quantizes a row-major `[rows, cols]` matrix per 1x128 tile along `cols`.
    pub fn quantize_tiles(x: &[f32], rows: usize, cols: usize, cfg: QuantConfig) -> Result<Self> {
        let mut q = Self {
            rows: 0,
            cols: 0,
            format: cfg.format,
            granularity: Granularity::Tile1x128,
            codes: Vec::new(),
            scales: Vec::new(),
        };
        q.requantize_tiles(x, rows, cols, cfg)?;
        Ok(q)
    }

    /// Like [`Fp8Matrix::quantize_tiles`], but reuses this matrix's buffers (a training loop
    /// quantizes same-shaped activations every step). On error the matrix is left empty.
    pub fn requantize_tiles(
        &mut self,
        x: &[f32],
        rows: usize,
        cols: usize,
        cfg: QuantConfig,
    ) -> Result<()> {
        self.rows = 0;
        self.cols = 0;
        self.codes.clear();
        self.scales.clear();
        check_len("quantize.input", x, rows, cols)?;
        let kb = blocks(cols);
        self.codes.resize(rows * cols, 0);
        self.scales.resize(rows * kb, 0.0);
        let ok = cols == 0 || quantize_rows(x, &mut self.codes, &mut self.scales, cols, cfg);
        if !ok {
            self.codes.clear();
            self.scales.clear();
            return Err(non_finite("quantize.input", x));
        }
        self.rows = rows;
        self.cols = cols;
        self.format = cfg.format;
        self.granularity = Granularity::Tile1x128;
        Ok(())
    }

    /// Quantizes a tensor viewed as `[rows, last_dim]` per 1x128 tile.
    pub fn quantize_tensor_tiles(x: &Tensor<f32>, cfg: QuantConfig) -> Result<Self> {
        let (rows, cols) = x.as_matrix("quantize.input")?;
        Self::quantize_tiles(x.data(), rows, cols, cfg)
    }

    /// Quantizes the transpose of a row-major `[rows, cols]` matrix per 1x128 tile, i.e. the matrix
    /// in 128x1 tiles: the result is `[cols, rows]` with tiles along `rows`. Backward passes use it
    /// for GEMMs whose inner dimension is the token dimension.
    pub fn quantize_tiles_transposed(
        x: &[f32],
        rows: usize,
        cols: usize,
        cfg: QuantConfig,
    ) -> Result<Self> {
        check_len("quantize.input", x, rows, cols)?;
        let mut t = vec![0f32; rows * cols];
        transpose_into(x, rows, cols, &mut t);
        Self::quantize_tiles(&t, cols, rows, cfg)
    }

    /// Quantizes a row-major `[rows, cols]` matrix per 128x128 block.
    pub fn quantize_blocks(x: &[f32], rows: usize, cols: usize, cfg: QuantConfig) -> Result<Self> {
        check_len("quantize.input", x, rows, cols)?;
        let (rb, kb) = if x.is_empty() {
            (0, 0)
        } else {
            (blocks(rows), blocks(cols))
        };
        let mut scales = vec![0f32; rb * kb];
        let mut muls = vec![0f32; rb * kb];
        let mut ok = true;
        for bi in 0..rb {
            let mut amax = vec![0f32; kb];
            for r in bi * QUANT_BLOCK..((bi + 1) * QUANT_BLOCK).min(rows) {
                let row = &x[r * cols..(r + 1) * cols];
                for (a, tile) in amax.iter_mut().zip(row.chunks(QUANT_BLOCK)) {
                    let (m, finite) = amax_of(tile);
                    ok &= finite;
                    *a = a.max(m);
                }
            }
            for (j, &a) in amax.iter().enumerate() {
                let (s, mul) = scale_for(a, cfg);
                scales[bi * kb + j] = s;
                muls[bi * kb + j] = mul;
            }
        }
        if !ok {
            return Err(non_finite("quantize.input", x));
        }
        let mut codes = vec![0u8; rows * cols];
        if cols > 0 {
            encode_block_rows(x, &mut codes, cols, kb, &muls, cfg.format);
        }
        Ok(Self {
            rows,
            cols,
            format: cfg.format,
            granularity: Granularity::Block128x128,
            codes,
            scales,
        })
    }

    /// Quantizes a 2-D tensor per 128x128 block.
    pub fn quantize_tensor_blocks(w: &Tensor<f32>, cfg: QuantConfig) -> Result<Self> {
        let dims = w.expect_rank("quantize.weight", 2)?;
        Self::quantize_blocks(w.data(), dims[0], dims[1], cfg)
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (the inner dimension the scales run along).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The FP8 format of the codes.
    pub fn format(&self) -> Fp8Format {
        self.format
    }

    /// Tile or block scaling.
    pub fn granularity(&self) -> Granularity {
        self.granularity
    }

    /// The FP8 codes, row-major.
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }

    /// The scales, row-major: `[rows, ceil(cols/128)]` for tiles, `[ceil(rows/128), ceil(cols/128)]`
    /// for blocks.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// The shape of the scale matrix.
    pub fn scale_shape(&self) -> [usize; 2] {
        match self.granularity {
            Granularity::Tile1x128 => [self.rows, blocks(self.cols)],
            Granularity::Block128x128 => [blocks(self.rows), blocks(self.cols)],
        }
    }

    /// The scale that applies to element `(row, col)`, or `None` outside the matrix.
    pub fn scale_at(&self, row: usize, col: usize) -> Option<f32> {
        if row >= self.rows || col >= self.cols {
            return None;
        }
        Some(self.scale(row, col))
    }

    /// [`Fp8Matrix::scale_at`] for callers that iterate inside the matrix.
    #[inline(always)]
    pub(crate) fn scale(&self, row: usize, col: usize) -> f32 {
        let kb = blocks(self.cols);
        let r = match self.granularity {
            Granularity::Tile1x128 => row,
            Granularity::Block128x128 => row / QUANT_BLOCK,
        };
        self.scales[r * kb + col / QUANT_BLOCK]
    }

    /// A matrix from its parts (codes row-major, scales as [`Fp8Matrix::scale_shape`] says), as
    /// read back from the wire. Refuses parts whose lengths do not fit the shape, and scales that
    /// are not finite and positive.
    pub fn from_parts(
        rows: usize,
        cols: usize,
        format: Fp8Format,
        granularity: Granularity,
        codes: Vec<u8>,
        scales: Vec<f32>,
    ) -> Result<Self> {
        let n = rows
            .checked_mul(cols)
            .ok_or_else(|| KernelError::InvalidArgument {
                name: "fp8.shape",
                reason: format!("{rows} x {cols} elements overflow"),
            })?;
        if codes.len() != n {
            return Err(KernelError::ShapeMismatch {
                operand: "fp8.codes",
                expected: format!("{n} codes for {rows} x {cols}"),
                got: codes.len().to_string(),
            });
        }
        let want = match granularity {
            Granularity::Tile1x128 => rows * blocks(cols),
            Granularity::Block128x128 => blocks(rows) * blocks(cols),
        };
        if scales.len() != want {
            return Err(KernelError::ShapeMismatch {
                operand: "fp8.scales",
                expected: format!("{want} scales for {rows} x {cols} ({granularity:?})"),
                got: scales.len().to_string(),
            });
        }
        if let Some((index, value)) = scales
            .iter()
            .enumerate()
            .find(|(_, s)| !(s.is_finite() && **s > 0.0))
        {
            return Err(KernelError::InvalidArgument {
                name: "fp8.scales",
                reason: format!("scale {index} is {value}: scales must be finite and positive"),
            });
        }
        Ok(Self {
            rows,
            cols,
            format,
            granularity,
            codes,
            scales,
        })
    }

    /// Payload bytes: one byte per element plus four per scale.
    pub fn wire_bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len()
    }

    /// Dequantizes to FP32: `decode(code) * scale`.
    pub fn dequantize(&self) -> Tensor<f32> {
        let table = self.format.table();
        let mut out = vec![0f32; self.rows * self.cols];
        if self.cols > 0 {
            for (r, (dst, src)) in out
                .chunks_mut(self.cols)
                .zip(self.codes.chunks(self.cols))
                .enumerate()
            {
                for (j, (d, s)) in dst
                    .chunks_mut(QUANT_BLOCK)
                    .zip(src.chunks(QUANT_BLOCK))
                    .enumerate()
                {
                    let scale = self.scale(r, j * QUANT_BLOCK);
                    for (o, &c) in d.iter_mut().zip(s) {
                        *o = table[c as usize] * scale;
                    }
                }
            }
        }
        Tensor::from_parts(vec![self.rows, self.cols], out)
    }

    /// Dequantizes to BF16 (FP32 dequantization rounded to nearest even).
    pub fn dequantize_bf16(&self) -> Tensor<bf16> {
        self.dequantize().map(bf16::from_f32)
    }

    /// The codes decoded without scales (what a tensor core multiplies), row-major FP32.
    pub fn decode_unscaled(&self) -> Vec<f32> {
        let table = self.format.table();
        self.codes.iter().map(|&c| table[c as usize]).collect()
    }

    /// The exact transpose of a block-scaled matrix (blocks are square, so codes and scales simply
    /// transpose). Tile-scaled matrices cannot be transposed exactly: use
    /// [`Fp8Matrix::requantize_transposed`].
    pub fn transpose(&self) -> Result<Self> {
        if self.granularity != Granularity::Block128x128 {
            return Err(KernelError::invalid(
                "granularity",
                "only 128x128 block-scaled matrices transpose exactly; requantize 1x128 tiles",
            ));
        }
        let mut codes = vec![0u8; self.codes.len()];
        transpose_into(&self.codes, self.rows, self.cols, &mut codes);
        let [sr, sc] = self.scale_shape();
        let mut scales = vec![0f32; self.scales.len()];
        transpose_into(&self.scales, sr, sc, &mut scales);
        Ok(Self {
            rows: self.cols,
            cols: self.rows,
            codes,
            scales,
            ..self.clone()
        })
    }

    /// Dequantizes, transposes and quantizes again in 1x128 tiles along the old row dimension: the
    /// backward-pass conversion of cached 1x128 activations into 128x1 tiles that the paper describes.
    pub fn requantize_transposed(&self, cfg: QuantConfig) -> Result<Self> {
        let deq = self.dequantize();
        Self::quantize_tiles_transposed(deq.data(), self.rows, self.cols, cfg)
    }
}

/// Writes the transpose of row-major `[rows, cols]` `src` into `dst` (`[cols, rows]`).
pub(crate) fn transpose_into<T: Copy>(src: &[T], rows: usize, cols: usize, dst: &mut [T]) {
    const B: usize = 32;
    for i0 in (0..rows).step_by(B) {
        for j0 in (0..cols).step_by(B) {
            for i in i0..(i0 + B).min(rows) {
                for j in j0..(j0 + B).min(cols) {
                    dst[j * rows + i] = src[i * cols + j];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 + seed) * 0.731).sin() * (1.0 + (i % 7) as f32))
            .collect()
    }

    #[test]
    fn tile_scales_have_the_documented_shape_and_value() {
        let (rows, cols) = (3, 300); // 300 = 2 full tiles + a partial tile of 44
        let x = ramp(rows * cols, 0.0);
        let q = Fp8Matrix::quantize_tiles(&x, rows, cols, QuantConfig::default()).unwrap();
        assert_eq!(q.scale_shape(), [3, 3]);
        assert_eq!(q.scales().len(), 9);
        for r in 0..rows {
            for t in 0..3 {
                let tile = &x[r * cols + t * 128..r * cols + ((t + 1) * 128).min(cols)];
                let amax = tile.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert_eq!(q.scales()[r * 3 + t], amax / 448.0);
            }
        }
    }

    #[test]
    fn block_scales_cover_128x128_blocks() {
        let (rows, cols) = (200, 130);
        let mut x = ramp(rows * cols, 1.0);
        x[150 * cols + 129] = 100.0; // in block (1, 1)
        let q = Fp8Matrix::quantize_blocks(&x, rows, cols, QuantConfig::default()).unwrap();
        assert_eq!(q.scale_shape(), [2, 2]);
        assert_eq!(q.scales()[3], 100.0 / 448.0);
        assert_eq!(q.scale_at(150, 129), Some(100.0 / 448.0));
        assert_eq!(q.scale_at(200, 0), None);
        assert!(q.scales()[0] < 100.0 / 448.0);
    }

    #[test]
    fn all_zero_tiles_use_the_amax_floor() {
        let q = Fp8Matrix::quantize_tiles(&[0.0; 256], 1, 256, QuantConfig::default()).unwrap();
        assert!(q.scales().iter().all(|&s| s == AMAX_FLOOR / 448.0));
        assert!(q.dequantize().data().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn pow2_scales_are_powers_of_two_not_below_the_exact_scale() {
        let x = ramp(512, 3.0);
        let cfg = QuantConfig {
            pow2_scales: true,
            ..QuantConfig::default()
        };
        let q = Fp8Matrix::quantize_tiles(&x, 2, 256, cfg).unwrap();
        let exact = Fp8Matrix::quantize_tiles(&x, 2, 256, QuantConfig::default()).unwrap();
        for (&s, &e) in q.scales().iter().zip(exact.scales()) {
            assert_eq!(s.to_bits() & 0x007F_FFFF, 0, "{s} is not a power of two");
            assert!(s >= e && s < 2.0 * e);
        }
        assert_eq!(pow2_ceil(1.0), 1.0);
        assert_eq!(pow2_ceil(1.5), 2.0);
        assert_eq!(pow2_ceil(0.25), 0.25);
    }

    #[test]
    fn block_transpose_is_exact() {
        let (rows, cols) = (150, 260);
        let x = ramp(rows * cols, 2.0);
        let q = Fp8Matrix::quantize_blocks(&x, rows, cols, QuantConfig::default()).unwrap();
        let t = q.transpose().unwrap();
        let (d, dt) = (q.dequantize(), t.dequantize());
        for i in 0..rows {
            for j in 0..cols {
                assert_eq!(d.data()[i * cols + j], dt.data()[j * rows + i]);
            }
        }
        let qt = Fp8Matrix::quantize_tiles(&x, rows, cols, QuantConfig::default()).unwrap();
        assert!(qt.transpose().is_err());
        let rt = qt.requantize_transposed(QuantConfig::default()).unwrap();
        assert_eq!((rt.rows(), rt.cols()), (cols, rows));
        let direct = Fp8Matrix::quantize_tiles_transposed(
            qt.dequantize().data(),
            rows,
            cols,
            QuantConfig::default(),
        )
        .unwrap();
        assert_eq!(rt, direct);
        // The values survive the round trip to within the FP8 error of both quantizations.
        let back = rt.dequantize();
        let orig = qt.dequantize();
        for i in 0..rows {
            for j in 0..cols {
                let (a, b) = (orig.data()[i * cols + j], back.data()[j * rows + i]);
                assert!((a - b).abs() <= 0.0625 * a.abs() + 1e-3, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn degenerate_shapes_are_quick_and_overflow_is_an_error() {
        let q = Fp8Matrix::quantize_blocks(&[], 1 << 40, 0, QuantConfig::default()).unwrap();
        assert!(q.codes().is_empty() && q.scales().is_empty());
        let e = Fp8Matrix::quantize_tiles(&[], 1 << 40, 1 << 40, QuantConfig::default());
        assert!(e.is_err());
    }

    #[test]
    fn non_finite_input_is_refused_with_its_index() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = ramp(300, 0.0);
            x[257] = bad;
            let err = Fp8Matrix::quantize_tiles(&x, 1, 300, QuantConfig::default()).unwrap_err();
            assert!(
                matches!(
                    err,
                    KernelError::NonFinite {
                        index: 257,
                        operand: "quantize.input",
                        ..
                    }
                ),
                "{err}"
            );
            let err = Fp8Matrix::quantize_blocks(&x, 3, 100, QuantConfig::default()).unwrap_err();
            assert!(
                matches!(err, KernelError::NonFinite { index: 257, .. }),
                "{err}"
            );
        }
        let err = Fp8Matrix::quantize_tiles(&[1.0; 5], 2, 3, QuantConfig::default()).unwrap_err();
        assert!(err.to_string().contains("quantize.input"));
    }

    #[test]
    fn threaded_quantization_equals_row_by_row() {
        let (rows, cols) = (1100, 1000);
        assert!(rows * cols >= PARALLEL_ELEMENTS);
        let x = ramp(rows * cols, 4.0);
        let cfg = QuantConfig::default();
        let all = Fp8Matrix::quantize_tiles(&x, rows, cols, cfg).unwrap();
        for r in [0, 1, 517, rows - 1] {
            let one =
                Fp8Matrix::quantize_tiles(&x[r * cols..(r + 1) * cols], 1, cols, cfg).unwrap();
            assert_eq!(&all.codes()[r * cols..(r + 1) * cols], one.codes());
            assert_eq!(&all.scales()[r * 8..(r + 1) * 8], one.scales());
        }
        let mut bad = x.clone();
        bad[rows * cols - 3] = f32::NAN;
        let mut reused = all.clone();
        let err = reused.requantize_tiles(&bad, rows, cols, cfg).unwrap_err();
        assert!(matches!(err, KernelError::NonFinite { index, .. } if index == rows * cols - 3));
        assert_eq!(
            (reused.rows(), reused.codes().len()),
            (0, 0),
            "a failed requantize leaves it empty"
        );
        reused.requantize_tiles(&x, rows, cols, cfg).unwrap();
        assert_eq!(reused, all);
    }

    #[test]
    fn bf16_dequantization_rounds_the_f32_result() {
        let x = ramp(128, 5.0);
        let q = Fp8Matrix::quantize_tiles(&x, 1, 128, QuantConfig::default()).unwrap();
        let f = q.dequantize();
        let b = q.dequantize_bf16();
        for (a, b) in f.data().iter().zip(b.data()) {
            assert_eq!(bf16::from_f32(*a), *b);
        }
    }
}
