//! Expert-parallel frames on the wire: dispatch carries tokens in FP8 (E4M3 codes with one FP32
//! scale per 1x128 tile, optionally powers of two) with each token's top-k expert indices and
//! gate weights; combine carries the experts' outputs back in BF16. The backward of dispatch is
//! a combine and the backward of combine a dispatch, so these two frames cover both directions.
//!
//! Layout, little-endian: a 20-byte header (magic `SHW1`, kind, flags, two reserved bytes, then
//! `rows`, `cols` and `topk` as u32 for dispatch, `rows` and `cols` and 0 for combine), then the
//! payload. Dispatch: `rows x cols` codes, `rows x ceil(cols/128)` f32 scales, `rows x topk` u32
//! expert indices, `rows x topk` f32 weights. Combine: `rows x cols` BF16 values. Decoding checks
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

/// Tokens bound for an expert-parallel peer.
#[derive(Clone, Debug, PartialEq)]
pub struct DispatchFrame {
    /// The tokens' hidden states, `[rows, cols]`, E4M3 with 1x128 tile scales.
    pub tokens: Fp8Matrix,
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
    pub values: Vec<bf16>,
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
        let tokens = Fp8Matrix::quantize_tensor_tiles(
            x,
            QuantConfig {
                format: Fp8Format::E4M3,
                pow2_scales,
            },
        )?;
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
        let (rows, cols) = (self.tokens.rows(), self.tokens.cols());
        let mut out =
            Vec::with_capacity(HEADER + self.tokens.wire_bytes() + 8 * self.experts.len());
        header(
            &mut out,
            KIND_DISPATCH,
            if self.pow2_scales { FLAG_POW2 } else { 0 },
            [rows, cols, self.topk],
        );
        out.extend_from_slice(self.tokens.codes());
        for s in self.tokens.scales() {
            out.extend_from_slice(&s.to_le_bytes());
        }
        for e in &self.experts {
            out.extend_from_slice(&e.to_le_bytes());
        }
        for w in &self.weights {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Reads a frame made by [`DispatchFrame::encode`]; `experts` bounds the expert indices.
    pub fn decode(bytes: &[u8], experts: usize) -> Result<Self> {
        const K: &str = "dispatch";
        let (flags, [rows, cols, topk]) = read_header(bytes, KIND_DISPATCH, K)?;
        let n = checked(rows, cols, K)?;
        let routes = checked(rows, topk, K)?;
        let n_scales = checked(rows, blocks(cols), K)?;
        let (scale_bytes, route_bytes) = (checked(n_scales, 4, K)?, checked(routes, 4, K)?);
        let want = [n, scale_bytes, route_bytes, route_bytes]
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
        let codes = bytes[at..at + n].to_vec();
        at += n;
        let scales = f32s(&bytes[at..at + 4 * n_scales]);
        at += 4 * n_scales;
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
        let tokens = Fp8Matrix::from_parts(
            rows,
            cols,
            Fp8Format::E4M3,
            Granularity::Tile1x128,
            codes,
            scales,
        )
        .map_err(|e| bad(K, e.to_string()))?;
        if tokens.codes().iter().any(|c| Fp8Format::E4M3.is_nan(*c)) {
            return Err(bad(K, "a token value is NaN"));
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
        let [rows, cols] = dims2(x, "combine")?;
        Ok(Self {
            rows,
            cols,
            values: x.data().iter().map(|v| bf16::from_f32(*v)).collect(),
        })
    }

    /// The values as FP32.
    pub fn to_f32(&self) -> Result<Tensor<f32>> {
        Ok(Tensor::new(
            vec![self.rows, self.cols],
            self.values.iter().map(|v| v.to_f32()).collect(),
        )?)
    }

    /// The frame's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + 2 * self.values.len());
        header(&mut out, KIND_COMBINE, 0, [self.rows, self.cols, 0]);
        for v in &self.values {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Reads a frame made by [`CombineFrame::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        const K: &str = "combine";
        let (_, [rows, cols, _]) = read_header(bytes, KIND_COMBINE, K)?;
        let n = checked(rows, cols, K)?;
        let want = n
            .checked_mul(2)
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
        let values: Vec<bf16> = bytes[HEADER..]
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]))
            .collect();
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(bad(K, format!("value {i} is {}", values[i])));
        }
        Ok(Self { rows, cols, values })
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
    if bytes[5] & !FLAG_POW2 != 0 || bytes[6..8] != [0, 0] {
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

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
