//! Expert-parallel frames on the wire: dispatch carries tokens in FP8 (E4M3 codes with one FP32
//! scale per 1x128 tile, optionally powers of two) with each token's top-k expert indices and
//! gate weights; combine carries the experts' outputs back in BF16. The backward of dispatch is
//! a combine and the backward of combine a dispatch, so these two frames cover both directions.
//! Runs in other precision modes carry the rows in BF16 or FP32 instead (the encoding flag).
//!
//! Layout, little-endian: a 20-byte header (magic `SHW1`, kind, flags, two reserved bytes, then
//! `rows`, `cols` and `topk` as u32 for dispatch, `rows` and `cols` and 0 for combine), then the
//! payload. Dispatch: the rows (FP8: `rows x cols` codes then `rows x ceil(cols/128)` f32 scales;
//! BF16 or FP32: `rows x cols` values), `rows x topk` u32 expert indices, `rows x topk` f32
//! weights. Combine: `rows x cols` BF16 (or FP32) values. Flags: bit 0 power-of-two scales, bits
//! 1-2 the encoding (0 FP8 for dispatch and BF16 for combine, 1 BF16, 2 FP32). Decoding checks
//! every length against the header before reading, so a truncated or padded frame is an error
//! that says what was expected, never a panic.

use half::bf16;
use shoal_kernels::Tensor;
use shoal_kernels::fp8::Fp8Format;
use shoal_kernels::quant::{Fp8Matrix, Granularity, QuantConfig, blocks};

use crate::{Result, WorkerError};

const MAGIC: [u8; 4] = *b"SHW1";
const HEADER: usize = 20;
const KIND_DISPATCH: u8 = 1;
const KIND_COMBINE: u8 = 2;
const FLAG_POW2: u8 = 1;
const ENC_SHIFT: u8 = 1;
const ENC_MASK: u8 = 0b110;
const ENC_BF16: u8 = 1;
const ENC_F32: u8 = 2;

/// How rows of hidden states are encoded on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowCodec {
    /// E4M3 with one FP32 scale per 1x128 tile (dispatch only).
    Fp8 {
        /// Scales rounded up to powers of two.
        pow2_scales: bool,
    },
    /// BF16 values.
    Bf16,
    /// FP32 values.
    F32,
}

/// A dispatch frame's token rows, as encoded.
#[derive(Clone, Debug, PartialEq)]
pub enum TokenRows {
    /// E4M3 codes with 1x128 tile scales.
    Fp8(Fp8Matrix),
    /// BF16, `[rows, cols]`.
    Bf16(Tensor<bf16>),
    /// FP32, `[rows, cols]`.
    F32(Tensor<f32>),
}

impl TokenRows {
    /// Rows (tokens).
    pub fn rows(&self) -> usize {
        match self {
            Self::Fp8(m) => m.rows(),
            Self::Bf16(t) => t.rows(),
            Self::F32(t) => t.rows(),
        }
    }

    /// Columns (hidden size).
    pub fn cols(&self) -> usize {
        match self {
            Self::Fp8(m) => m.cols(),
            Self::Bf16(t) => t.last_dim(),
            Self::F32(t) => t.last_dim(),
        }
    }

    /// The rows' values in FP32.
    pub fn to_f32(&self) -> Tensor<f32> {
        match self {
            Self::Fp8(m) => m.dequantize(),
            Self::Bf16(t) => t.map(|v| v.to_f32()),
            Self::F32(t) => t.clone(),
        }
    }

    /// Bytes of the rows on the wire.
    pub fn wire_bytes(&self) -> usize {
        match self {
            Self::Fp8(m) => m.wire_bytes(),
            Self::Bf16(t) => 2 * t.numel(),
            Self::F32(t) => 4 * t.numel(),
        }
    }

    fn flags(&self) -> u8 {
        match self {
            Self::Fp8(_) => 0,
            Self::Bf16(_) => ENC_BF16 << ENC_SHIFT,
            Self::F32(_) => ENC_F32 << ENC_SHIFT,
        }
    }
}

/// Tokens bound for an expert-parallel peer.
#[derive(Clone, Debug, PartialEq)]
pub struct DispatchFrame {
    /// The tokens' hidden states, `[rows, cols]` (E4M3 with 1x128 tile scales in FP8 runs).
    pub tokens: TokenRows,
    /// Experts each token is routed to.
    pub topk: usize,
    /// `rows x topk` expert indices.
    pub experts: Vec<u32>,
    /// `rows x topk` gate weights.
    pub weights: Vec<f32>,
    /// Whether the scales are powers of two.
    pub pow2_scales: bool,
}

/// Expert outputs going back to the tokens' home rank.
#[derive(Clone, Debug, PartialEq)]
pub struct CombineFrame {
    /// Rows (tokens).
    pub rows: usize,
    /// Hidden size.
    pub cols: usize,
    /// `rows x cols` values.
    pub values: CombineValues,
}

/// A combine frame's values, as encoded.
#[derive(Clone, Debug, PartialEq)]
pub enum CombineValues {
    /// BF16 (the paper's combine).
    Bf16(Vec<bf16>),
    /// FP32 (FP32 runs).
    F32(Vec<f32>),
}

fn bad(kind: &'static str, reason: impl Into<String>) -> WorkerError {
    WorkerError::Frame {
        kind,
        reason: reason.into(),
    }
}

impl DispatchFrame {
    /// Quantizes `x: [rows, cols]` (E4M3, 1x128 tiles) with each row's `topk` experts and
    /// weights.
    pub fn quantize(
        x: &Tensor<f32>,
        topk: usize,
        experts: Vec<u32>,
        weights: Vec<f32>,
        pow2_scales: bool,
    ) -> Result<Self> {
        Self::encode_rows(x, topk, experts, weights, RowCodec::Fp8 { pow2_scales })
    }

    /// Encodes `x: [rows, cols]` with `codec`, with each row's `topk` experts and weights.
    pub fn encode_rows(
        x: &Tensor<f32>,
        topk: usize,
        experts: Vec<u32>,
        weights: Vec<f32>,
        codec: RowCodec,
    ) -> Result<Self> {
        let [rows, _] = dims2(x, "dispatch")?;
        if u32::try_from(topk).is_err()
            || experts.len() != rows * topk
            || weights.len() != rows * topk
        {
            return Err(WorkerError::invalid(
                "dispatch",
                format!(
                    "{} expert indices and {} weights for {rows} tokens x top-{topk}",
                    experts.len(),
                    weights.len()
                ),
            ));
        }
        let (tokens, pow2_scales) = match codec {
            RowCodec::Fp8 { pow2_scales } => (
                TokenRows::Fp8(Fp8Matrix::quantize_tensor_tiles(
                    x,
                    QuantConfig {
                        format: Fp8Format::E4M3,
                        pow2_scales,
                    },
                )?),
                pow2_scales,
            ),
            RowCodec::Bf16 => (TokenRows::Bf16(x.map(bf16::from_f32)), false),
            RowCodec::F32 => (TokenRows::F32(x.clone()), false),
        };
        Ok(Self {
            tokens,
            topk,
            experts,
            weights,
            pow2_scales,
        })
    }

    /// Bytes of the hidden states on the wire (codes and scales), without the routing.
    pub fn activation_bytes(&self) -> usize {
        self.tokens.wire_bytes()
    }

    /// The frame's bytes.
    pub fn encode(&self) -> Vec<u8> {
        self.write(None)
    }

    /// The frame of the rows `rows` (in that order) alone, with their routes: byte for byte what
    /// encoding those rows on their own gives (every row is encoded on its own), written straight
    /// from this frame's encoded rows. A layer encodes its tokens once and cuts each member's
    /// frame out of them; a token bound for several members is quantized once.
    pub fn encode_selected(&self, rows: &[usize]) -> Result<Vec<u8>> {
        let n = self.tokens.rows();
        if let Some(r) = rows.iter().find(|&&r| r >= n) {
            return Err(bad("dispatch", format!("row {r} of a frame of {n}")));
        }
        Ok(self.write(Some(rows)))
    }

    /// The rows `rows` (in that order) with their routes, as [`DispatchFrame::decode`] would
    /// read the frame [`Self::encode_selected`] makes of them, without the bytes: what a member
    /// keeps of its own tokens (they need not cross any link).
    pub fn select(&self, rows: &[usize]) -> Result<Self> {
        let (n, cols, k) = (self.tokens.rows(), self.tokens.cols(), self.topk);
        if let Some(r) = rows.iter().find(|&&r| r >= n) {
            return Err(bad("dispatch", format!("row {r} of a frame of {n}")));
        }
        let shape = vec![rows.len(), cols];
        let tokens = match &self.tokens {
            TokenRows::Fp8(m) => TokenRows::Fp8(
                Fp8Matrix::from_parts(
                    rows.len(),
                    cols,
                    Fp8Format::E4M3,
                    Granularity::Tile1x128,
                    gather(m.codes(), rows, cols),
                    gather(m.scales(), rows, blocks(cols)),
                )
                .map_err(|e| bad("dispatch", e.to_string()))?,
            ),
            TokenRows::Bf16(t) => {
                TokenRows::Bf16(Tensor::new(shape, gather(t.data(), rows, cols))?)
            }
            TokenRows::F32(t) => TokenRows::F32(Tensor::new(shape, gather(t.data(), rows, cols))?),
        };
        Ok(Self {
            tokens,
            topk: k,
            experts: gather(&self.experts, rows, k),
            weights: gather(&self.weights, rows, k),
            pow2_scales: self.pow2_scales,
        })
    }

    /// The bytes of the rows `sel` (all rows when `None`; every index is in range).
    fn write(&self, sel: Option<&[usize]>) -> Vec<u8> {
        let (n, cols, k) = (self.tokens.rows(), self.tokens.cols(), self.topk);
        let count = sel.map_or(n, <[usize]>::len);
        let all: Vec<usize>;
        let sel = match sel {
            Some(s) => s,
            None => {
                all = (0..n).collect();
                &all
            }
        };
        let row_bytes = match &self.tokens {
            TokenRows::Fp8(_) => cols + 4 * blocks(cols),
            TokenRows::Bf16(_) => 2 * cols,
            TokenRows::F32(_) => 4 * cols,
        };
        let mut out = Vec::with_capacity(HEADER + count * (row_bytes + 8 * k));
        header(
            &mut out,
            KIND_DISPATCH,
            self.tokens.flags() | if self.pow2_scales { FLAG_POW2 } else { 0 },
            [count, cols, k],
        );
        match &self.tokens {
            TokenRows::Fp8(m) => {
                for &r in sel {
                    out.extend_from_slice(&m.codes()[r * cols..(r + 1) * cols]);
                }
                put_rows(&mut out, m.scales(), blocks(cols), sel, f32::to_le_bytes);
            }
            TokenRows::Bf16(t) => put_rows(&mut out, t.data(), cols, sel, bf16::to_le_bytes),
            TokenRows::F32(t) => put_rows(&mut out, t.data(), cols, sel, f32::to_le_bytes),
        }
        put_rows(&mut out, &self.experts, k, sel, u32::to_le_bytes);
        put_rows(&mut out, &self.weights, k, sel, f32::to_le_bytes);
        out
    }

    /// Reads a frame made by [`DispatchFrame::encode`]; `experts` bounds the expert indices.
    pub fn decode(bytes: &[u8], experts: usize) -> Result<Self> {
        const K: &str = "dispatch";
        let (flags, [rows, cols, topk]) = read_header(bytes, KIND_DISPATCH, K)?;
        let enc = (flags & ENC_MASK) >> ENC_SHIFT;
        let n = checked(rows, cols, K)?;
        let routes = checked(rows, topk, K)?;
        let n_scales = checked(rows, blocks(cols), K)?;
        let row_bytes = match enc {
            0 => n.checked_add(checked(n_scales, 4, K)?),
            ENC_BF16 => n.checked_mul(2),
            ENC_F32 => n.checked_mul(4),
            other => return Err(bad(K, format!("unknown encoding {other}"))),
        }
        .ok_or_else(|| bad(K, "the header's sizes overflow"))?;
        let route_bytes = checked(routes, 4, K)?;
        let want = [row_bytes, route_bytes, route_bytes]
            .iter()
            .try_fold(HEADER, |a, b| a.checked_add(*b))
            .ok_or_else(|| bad(K, "the header's sizes overflow"))?;
        if bytes.len() != want {
            return Err(bad(
                K,
                format!(
                    "{rows} tokens x {cols} (top-{topk}) need {want} bytes, got {}",
                    bytes.len()
                ),
            ));
        }
        let mut at = HEADER;
        let rows_bytes = &bytes[at..at + row_bytes];
        at += row_bytes;
        let idx: Vec<u32> = bytes[at..at + 4 * routes]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        at += 4 * routes;
        let weights = f32s(&bytes[at..at + 4 * routes]);
        if let Some((i, e)) = idx
            .iter()
            .enumerate()
            .find(|(_, e)| **e as usize >= experts)
        {
            return Err(bad(K, format!("route {i} names expert {e} of {experts}")));
        }
        if let Some((i, w)) = weights.iter().enumerate().find(|(_, w)| !w.is_finite()) {
            return Err(bad(K, format!("weight {i} is {w}")));
        }
        let tokens = match enc {
            0 => {
                let m = Fp8Matrix::from_parts(
                    rows,
                    cols,
                    Fp8Format::E4M3,
                    Granularity::Tile1x128,
                    rows_bytes[..n].to_vec(),
                    f32s(&rows_bytes[n..]),
                )
                .map_err(|e| bad(K, e.to_string()))?;
                // E4M3's NaN is S.1111.111: a branch-free scan first (it vectorises).
                if m.codes().iter().fold(false, |a, c| a | (c & 0x7F == 0x7F))
                    && m.codes().iter().any(|c| Fp8Format::E4M3.is_nan(*c))
                {
                    return Err(bad(K, "a token value is NaN"));
                }
                TokenRows::Fp8(m)
            }
            ENC_BF16 => {
                let v: Vec<bf16> = rows_bytes
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]))
                    .collect();
                if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                    return Err(bad(K, format!("token value {i} is {}", v[i])));
                }
                TokenRows::Bf16(
                    Tensor::new(vec![rows, cols], v).map_err(|e| bad(K, e.to_string()))?,
                )
            }
            _ => {
                let v = f32s(rows_bytes);
                if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                    return Err(bad(K, format!("token value {i} is {}", v[i])));
                }
                TokenRows::F32(Tensor::new(vec![rows, cols], v).map_err(|e| bad(K, e.to_string()))?)
            }
        };
        if !matches!(tokens, TokenRows::Fp8(_)) && flags & FLAG_POW2 != 0 {
            return Err(bad(K, "power-of-two scales on rows without scales"));
        }
        Ok(Self {
            tokens,
            topk,
            experts: idx,
            weights,
            pow2_scales: flags & FLAG_POW2 != 0,
        })
    }
}

impl CombineFrame {
    /// Rounds `x: [rows, cols]` to BF16.
    pub fn from_f32(x: &Tensor<f32>) -> Result<Self> {
        Self::encode_rows(x, false)
    }

    /// `x: [rows, cols]` in BF16, or kept in FP32 when `full` is set.
    pub fn encode_rows(x: &Tensor<f32>, full: bool) -> Result<Self> {
        let [rows, cols] = dims2(x, "combine")?;
        let values = if full {
            CombineValues::F32(x.data().to_vec())
        } else {
            CombineValues::Bf16(
                x.data()
                    .iter()
                    .map(|v| bf16::from_bits(bf16_bits(*v)))
                    .collect(),
            )
        };
        Ok(Self { rows, cols, values })
    }

    /// The bytes of the frame of `x: [rows, cols]` (BF16, or FP32 when `full` is set), written
    /// straight from `x`: what `encode_rows(x, full)?.encode()` gives, without the copies.
    pub fn encode_f32(x: &Tensor<f32>, full: bool) -> Result<Vec<u8>> {
        let [rows, cols] = dims2(x, "combine")?;
        Ok(Self::write_f32(x.data(), rows, cols, None, full))
    }

    /// The bytes of the frame of the rows `rows` (in that order) of `x: [n, cols]`.
    pub fn encode_f32_selected(x: &Tensor<f32>, rows: &[usize], full: bool) -> Result<Vec<u8>> {
        let [n, cols] = dims2(x, "combine")?;
        if let Some(r) = rows.iter().find(|&&r| r >= n) {
            return Err(bad("combine", format!("row {r} of {n}")));
        }
        Ok(Self::write_f32(
            x.data(),
            rows.len(),
            cols,
            Some(rows),
            full,
        ))
    }

    /// Header and values of `count` rows of `cols` (the rows `sel` of `data`, or all of them).
    fn write_f32(
        data: &[f32],
        count: usize,
        cols: usize,
        sel: Option<&[usize]>,
        full: bool,
    ) -> Vec<u8> {
        let width = if full { 4 } else { 2 };
        let mut out = Vec::with_capacity(HEADER + width * count * cols);
        let flags = if full { ENC_F32 << ENC_SHIFT } else { 0 };
        header(&mut out, KIND_COMBINE, flags, [count, cols, 0]);
        let mut row = |r: &[f32]| {
            if full {
                put(&mut out, r, f32::to_le_bytes);
            } else {
                put_bf16(&mut out, r);
            }
        };
        match sel {
            Some(sel) => sel
                .iter()
                .for_each(|&r| row(&data[r * cols..(r + 1) * cols])),
            None => row(data),
        }
        out
    }

    /// `x` as its frame would deliver it: rounded to BF16 (kept when `full` is set) and read
    /// back as FP32, without the bytes: what a member keeps of its own rows.
    pub fn round_trip(x: &Tensor<f32>, full: bool) -> Tensor<f32> {
        if full {
            x.clone()
        } else {
            x.map(|v| f32::from_bits(u32::from(bf16_bits(v)) << 16))
        }
    }

    /// The values as FP32.
    pub fn to_f32(&self) -> Result<Tensor<f32>> {
        let v = match &self.values {
            CombineValues::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
            CombineValues::F32(v) => v.clone(),
        };
        Ok(Tensor::new(vec![self.rows, self.cols], v)?)
    }

    /// The frame's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + 4 * self.rows * self.cols);
        match &self.values {
            CombineValues::Bf16(v) => {
                header(&mut out, KIND_COMBINE, 0, [self.rows, self.cols, 0]);
                put(&mut out, v, |x| x.to_le_bytes());
            }
            CombineValues::F32(v) => {
                header(
                    &mut out,
                    KIND_COMBINE,
                    ENC_F32 << ENC_SHIFT,
                    [self.rows, self.cols, 0],
                );
                put(&mut out, v, |x| x.to_le_bytes());
            }
        }
        out
    }

    /// Reads a frame made by [`CombineFrame::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let v = Self::view(bytes)?;
        let values = if v.width == 2 {
            CombineValues::Bf16(
                v.data
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            )
        } else {
            CombineValues::F32(f32s(v.data))
        };
        Ok(Self {
            rows: v.rows,
            cols: v.cols,
            values,
        })
    }

    /// Checks a frame made by [`CombineFrame::encode`] and reads its values in place.
    pub fn view(bytes: &[u8]) -> Result<CombineView<'_>> {
        const K: &str = "combine";
        let (flags, [rows, cols, _]) = read_header(bytes, KIND_COMBINE, K)?;
        let width = match ((flags & ENC_MASK) >> ENC_SHIFT, flags & FLAG_POW2) {
            (0, 0) => 2,
            (ENC_F32, 0) => 4,
            _ => return Err(bad(K, format!("unknown flags {flags:#04x}"))),
        };
        let n = checked(rows, cols, K)?;
        let want = n
            .checked_mul(width)
            .and_then(|b| b.checked_add(HEADER))
            .ok_or_else(|| bad(K, "the header's sizes overflow"))?;
        if bytes.len() != want {
            return Err(bad(
                K,
                format!(
                    "{rows} x {cols} values need {want} bytes, got {}",
                    bytes.len()
                ),
            ));
        }
        let data = &bytes[HEADER..];
        // Exponent all ones: infinite or NaN. A branch-free scan first (it vectorises).
        let bad_at = if width == 2 {
            let any = data.chunks_exact(2).fold(false, |a, c| {
                a | (u16::from_le_bytes([c[0], c[1]]) & 0x7F80 == 0x7F80)
            });
            any.then(|| {
                data.chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .enumerate()
                    .find(|(_, x)| !x.is_finite())
            })
        } else {
            let any = data.chunks_exact(4).fold(false, |a, c| {
                a | (u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7F80_0000 == 0x7F80_0000)
            });
            any.then(|| {
                data.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .enumerate()
                    .find(|(_, x)| !x.is_finite())
            })
        };
        if let Some(Some((i, x))) = bad_at {
            return Err(bad(K, format!("value {i} is {x}")));
        }
        Ok(CombineView {
            rows,
            cols,
            width,
            data,
        })
    }
}

/// A checked combine frame, read in place (see [`CombineFrame::view`]).
#[derive(Clone, Copy, Debug)]
pub struct CombineView<'a> {
    /// Rows (tokens).
    pub rows: usize,
    /// Values per row.
    pub cols: usize,
    /// Bytes per value: 2 (BF16) or 4 (FP32).
    width: usize,
    data: &'a [u8],
}

impl CombineView<'_> {
    /// Calls `add(&mut dst[j], value j of row i)` for every column `j` (`dst` holds at least
    /// `cols` values; `i < rows`).
    pub fn add_row<V>(&self, i: usize, dst: &mut [V], add: impl Fn(&mut V, f32)) {
        let w = self.width * self.cols;
        let row = &self.data[i * w..(i + 1) * w];
        if self.width == 2 {
            for (o, c) in dst.iter_mut().zip(row.chunks_exact(2)) {
                add(
                    o,
                    f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16),
                );
            }
        } else {
            for (o, c) in dst.iter_mut().zip(row.chunks_exact(4)) {
                add(o, f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            }
        }
    }

    /// The values as an FP32 `[rows, cols]` tensor.
    pub fn to_f32(&self) -> Result<Tensor<f32>> {
        let v: Vec<f32> = if self.width == 2 {
            self.data
                .chunks_exact(2)
                .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
                .collect()
        } else {
            f32s(self.data)
        };
        Ok(Tensor::new(vec![self.rows, self.cols], v)?)
    }
}

/// The BF16 bits of `v` rounded to nearest even, NaN kept NaN (quieted): what
/// `half::bf16::from_f32` gives, in a branch-free form the compiler vectorises.
#[inline]
fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) as u16) | 0x40;
    if b & 0x7FFF_FFFF > 0x7F80_0000 {
        nan
    } else {
        rounded
    }
}

/// Appends `values` rounded to BF16, little-endian (converted through a small stack buffer, so
/// the output is written once).
fn put_bf16(out: &mut Vec<u8>, values: &[f32]) {
    const CHUNK: usize = 64;
    let mut buf = [0u8; 2 * CHUNK];
    for chunk in values.chunks(CHUNK) {
        for (c, v) in buf.chunks_exact_mut(2).zip(chunk) {
            c.copy_from_slice(&bf16_bits(*v).to_le_bytes());
        }
        out.extend_from_slice(&buf[..2 * chunk.len()]);
    }
}

/// The `[rows, cols]` of a 2-D tensor whose sizes fit the header's u32 fields.
fn dims2(x: &Tensor<f32>, what: &str) -> Result<[usize; 2]> {
    match x.shape() {
        &[rows, cols] if u32::try_from(rows).is_ok() && u32::try_from(cols).is_ok() => {
            Ok([rows, cols])
        }
        shape => Err(WorkerError::invalid(
            what,
            format!("expected [rows, cols] below 2^32 each, got {shape:?}"),
        )),
    }
}

fn header(out: &mut Vec<u8>, kind: u8, flags: u8, dims: [usize; 3]) {
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[kind, flags, 0, 0]);
    for d in dims {
        // `dims2` and `quantize` kept every size below 2^32.
        out.extend_from_slice(&u32::try_from(d).unwrap_or(u32::MAX).to_le_bytes());
    }
}

/// `rows` (in that order) of `data`, rows of `width` values.
fn gather<V: Copy>(data: &[V], rows: &[usize], width: usize) -> Vec<V> {
    let mut out = Vec::with_capacity(rows.len() * width);
    for &r in rows {
        out.extend_from_slice(&data[r * width..(r + 1) * width]);
    }
    out
}

/// The rows `rows` (in that order) of a dispatch or combine frame, as a frame of the same kind
/// and encoding: the bytes that encoding those rows alone gives (rows are encoded each on its
/// own). A relay splits a node's frame among the node's members with it.
pub fn select_rows(bytes: &[u8], rows: &[usize]) -> Result<Vec<u8>> {
    let out_of = |n: usize, k: &'static str| {
        rows.iter().find(|&&r| r >= n).map_or(Ok(()), |r| {
            Err(bad(k, format!("row {r} of a frame of {n}")))
        })
    };
    match bytes.get(4) {
        Some(&KIND_DISPATCH) => {
            let f = DispatchFrame::decode(bytes, usize::MAX)?;
            out_of(f.tokens.rows(), "dispatch")?;
            f.encode_selected(rows)
        }
        Some(&KIND_COMBINE) => {
            let f = CombineFrame::decode(bytes)?;
            out_of(f.rows, "combine")?;
            let values = match &f.values {
                CombineValues::Bf16(v) => CombineValues::Bf16(gather(v, rows, f.cols)),
                CombineValues::F32(v) => CombineValues::F32(gather(v, rows, f.cols)),
            };
            Ok(CombineFrame {
                rows: rows.len(),
                cols: f.cols,
                values,
            }
            .encode())
        }
        other => Err(bad(
            "frame",
            format!("kind {other:?}: neither a dispatch nor a combine frame"),
        )),
    }
}

fn read_header(bytes: &[u8], kind: u8, k: &'static str) -> Result<(u8, [usize; 3])> {
    if bytes.len() < HEADER {
        return Err(bad(
            k,
            format!(
                "{} bytes, shorter than the {HEADER}-byte header",
                bytes.len()
            ),
        ));
    }
    if bytes[..4] != MAGIC {
        return Err(bad(
            k,
            format!("magic {:?}, expected {:?}", &bytes[..4], MAGIC),
        ));
    }
    if bytes[4] != kind {
        return Err(bad(k, format!("kind {}, expected {kind}", bytes[4])));
    }
    if bytes[5] & !(FLAG_POW2 | ENC_MASK) != 0 || bytes[6..8] != [0, 0] {
        return Err(bad(
            k,
            format!("unknown flags {:#04x} or reserved bytes set", bytes[5]),
        ));
    }
    let dim = |i: usize| {
        let o = 8 + 4 * i;
        u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
    };
    Ok((bytes[5], [dim(0), dim(1), dim(2)]))
}

fn checked(a: usize, b: usize, k: &'static str) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| bad(k, format!("{a} x {b} overflows")))
}

/// Appends each value's little-endian bytes (one resize, then fixed-width stores the compiler
/// vectorises).
fn put<const W: usize, V: Copy>(out: &mut Vec<u8>, values: &[V], bytes: impl Fn(V) -> [u8; W]) {
    let start = out.len();
    out.resize(start + W * values.len(), 0);
    for (c, v) in out[start..].chunks_exact_mut(W).zip(values) {
        c.copy_from_slice(&bytes(*v));
    }
}

/// Appends the rows `sel` (in that order) of `data`, rows of `width` values, with [`put`].
fn put_rows<const W: usize, V: Copy>(
    out: &mut Vec<u8>,
    data: &[V],
    width: usize,
    sel: &[usize],
    bytes: impl Fn(V) -> [u8; W],
) {
    for &r in sel {
        put(out, &data[r * width..(r + 1) * width], &bytes);
    }
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, cols: usize) -> Tensor<f32> {
        let v = (0..n * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.173)
            .collect();
        Tensor::new(vec![n, cols], v).unwrap()
    }

    #[test]
    fn bf16_rounding_is_half_s() {
        let mut specials = vec![
            0.0f32,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            1e-40,
            -1e-40,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7F80_0001),
            f32::from_bits(0xFFFF_FFFF),
            f32::from_bits(0x3F80_8000),
            f32::from_bits(0x3F81_8000),
            f32::from_bits(0x7F7F_FFFF),
        ];
        // A sweep over every exponent with mantissas around the rounding points.
        for e in 0u32..256 {
            for m in [0u32, 0x7FFF, 0x8000, 0x8001, 0x1_8000, 0x7F_FFFF] {
                specials.push(f32::from_bits((e << 23) | m));
                specials.push(f32::from_bits(0x8000_0000 | (e << 23) | m));
            }
        }
        for v in specials {
            assert_eq!(
                bf16_bits(v),
                bf16::from_f32(v).to_bits(),
                "{v:e} ({:#x})",
                v.to_bits()
            );
        }
    }

    #[test]
    fn combine_bytes_written_straight_match_the_frame() {
        let (n, cols) = (5, 130);
        let x = rows(n, cols);
        let pick = [4usize, 0, 2];
        let sub = Tensor::new(vec![pick.len(), cols], gather(x.data(), &pick, cols)).unwrap();
        for full in [false, true] {
            let frame = CombineFrame::encode_rows(&x, full).unwrap();
            let bytes = frame.encode();
            assert_eq!(CombineFrame::encode_f32(&x, full).unwrap(), bytes);
            assert_eq!(
                CombineFrame::encode_f32_selected(&x, &pick, full).unwrap(),
                CombineFrame::encode_rows(&sub, full).unwrap().encode()
            );
            // Read in place: the values decoding gives, and adding row by row.
            let view = CombineFrame::view(&bytes).unwrap();
            let want = frame.to_f32().unwrap();
            assert_eq!(view.to_f32().unwrap(), want);
            let mut acc = vec![1.0f32; cols];
            view.add_row(3, &mut acc, |o, v| *o += v);
            for (a, w) in acc.iter().zip(&want.data()[3 * cols..4 * cols]) {
                assert_eq!(*a, 1.0 + w);
            }
        }
        for full in [false, true] {
            let bytes = CombineFrame::encode_f32(&x, full).unwrap();
            assert_eq!(
                CombineFrame::round_trip(&x, full),
                CombineFrame::view(&bytes).unwrap().to_f32().unwrap()
            );
        }
        assert!(
            CombineFrame::encode_f32_selected(&x, &[n], false)
                .unwrap_err()
                .to_string()
                .contains("row 5 of 5")
        );
        // A non-finite value is refused, naming its index.
        let mut y = x.clone();
        y.data_mut()[7] = f32::INFINITY;
        let bytes = CombineFrame::encode_f32(&y, false).unwrap();
        let err = CombineFrame::view(&bytes).unwrap_err().to_string();
        assert!(err.contains("value 7 is inf"), "{err}");
    }

    #[test]
    fn selected_rows_are_the_frame_of_those_rows_alone() {
        let (n, cols, k) = (7, 300, 2);
        let x = rows(n, cols);
        let experts: Vec<u32> = (0..n * k).map(|i| (i % 8) as u32).collect();
        let weights: Vec<f32> = (0..n * k).map(|i| i as f32 * 0.1).collect();
        let pick = [1usize, 4, 6];
        let sub = gather(x.data(), &pick, cols);
        let sub = Tensor::new(vec![pick.len(), cols], sub).unwrap();
        for codec in [
            RowCodec::Fp8 { pow2_scales: false },
            RowCodec::Fp8 { pow2_scales: true },
            RowCodec::Bf16,
            RowCodec::F32,
        ] {
            let all = DispatchFrame::encode_rows(&x, k, experts.clone(), weights.clone(), codec)
                .unwrap()
                .encode();
            let want = DispatchFrame::encode_rows(
                &sub,
                k,
                gather(&experts, &pick, k),
                gather(&weights, &pick, k),
                codec,
            )
            .unwrap()
            .encode();
            assert_eq!(select_rows(&all, &pick).unwrap(), want, "{codec:?}");
            // Kept in memory: what decoding those bytes gives.
            let frame =
                DispatchFrame::encode_rows(&x, k, experts.clone(), weights.clone(), codec).unwrap();
            assert_eq!(
                frame.select(&pick).unwrap(),
                DispatchFrame::decode(&want, 8).unwrap(),
                "{codec:?}"
            );
            assert!(frame.select(&[n]).is_err());
            // No rows: an empty frame of the same kind.
            let none = select_rows(&all, &[]).unwrap();
            assert_eq!(DispatchFrame::decode(&none, 8).unwrap().tokens.rows(), 0);
        }
        for full in [false, true] {
            let all = CombineFrame::encode_rows(&x, full).unwrap().encode();
            let want = CombineFrame::encode_rows(&sub, full).unwrap().encode();
            assert_eq!(select_rows(&all, &pick).unwrap(), want);
        }
        // A row past the end, or bytes that are no frame: errors naming the kind.
        let all = CombineFrame::encode_rows(&x, false).unwrap().encode();
        assert!(
            select_rows(&all, &[n])
                .unwrap_err()
                .to_string()
                .contains("combine")
        );
        assert!(select_rows(&all[..10], &[0]).is_err());
        assert!(select_rows(b"garbage!", &[0]).is_err());
    }
}
