//! Safetensors files of named FP32 tensors: writing in F32 or BF16, reading F32, BF16, F16 and
//! block-scaled FP8 E4M3.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::{Dtype, SafeTensors, View};
use shoal_kernels::quant::{QUANT_BLOCK, blocks};
use shoal_kernels::{Fp8Format, Tensor};

use super::atomic::{parent_of, require_dir, sync_dir, sync_file, unique_sibling};
use crate::{Result, WorkerError};

/// The suffix that names the inverse scales of an FP8 tensor: `X.weight` is scaled by
/// `X.weight_scale_inv`.
pub const SCALE_INV_SUFFIX: &str = "_scale_inv";

/// The element type tensors are stored in. Loading always gives FP32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum StoreDtype {
    /// IEEE single precision: round trips exactly.
    #[default]
    F32,
    /// bfloat16, each value rounded to nearest even (NaN stays NaN): half the size.
    Bf16,
}

impl StoreDtype {
    /// The safetensors dtype.
    fn dtype(self) -> Dtype {
        match self {
            StoreDtype::F32 => Dtype::F32,
            StoreDtype::Bf16 => Dtype::BF16,
        }
    }

    /// Bytes per element.
    fn size(self) -> usize {
        match self {
            StoreDtype::F32 => 4,
            StoreDtype::Bf16 => 2,
        }
    }
}

/// One tensor as `safetensors` serializes it, converted to the store dtype when its bytes are
/// asked for (so only one tensor's bytes exist at a time).
struct StoreView<'a> {
    tensor: &'a Tensor<f32>,
    dtype: StoreDtype,
}

impl View for StoreView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype.dtype()
    }

    fn shape(&self) -> &[usize] {
        self.tensor.shape()
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let data = self.tensor.data();
        let mut out = Vec::with_capacity(self.data_len());
        match self.dtype {
            StoreDtype::F32 => {
                for &v in data {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            StoreDtype::Bf16 => {
                for &v in data {
                    out.extend_from_slice(&bf16::from_f32(v).to_le_bytes());
                }
            }
        }
        Cow::Owned(out)
    }

    fn data_len(&self) -> usize {
        self.tensor.numel() * self.dtype.size()
    }
}

/// Writes `tensors` to the safetensors file `path` in `dtype`, with the header metadata
/// `{"format": "pt"}` that Hugging Face `transformers` expects.
///
/// The file is written to a temporary sibling, fsync'd and renamed over `path`, so `path` holds
/// either its previous contents or the complete new file. The parent directory must exist. Tensor
/// names must be unique and not `__metadata__`; their meaning is the caller's business.
pub fn save_safetensors(
    path: &Path,
    tensors: &[(String, &Tensor<f32>)],
    dtype: StoreDtype,
) -> Result<()> {
    let mut seen = BTreeSet::new();
    for (name, _) in tensors {
        if name == "__metadata__" {
            return Err(WorkerError::checkpoint(
                path,
                "tensor __metadata__: the name is reserved by the safetensors format",
            ));
        }
        if !seen.insert(name.as_str()) {
            return Err(WorkerError::checkpoint(
                path,
                format!("tensor {name}: given twice"),
            ));
        }
    }
    let parent = parent_of(path);
    require_dir(parent)?;
    let tmp = unique_sibling(path, ".", "tmp")?;
    let result = write_tmp(path, &tmp, tensors, dtype);
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    sync_dir(parent)
}

/// Serializes into `tmp`, syncs it and renames it to `path`.
fn write_tmp(
    path: &Path,
    tmp: &Path,
    tensors: &[(String, &Tensor<f32>)],
    dtype: StoreDtype,
) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, tensor)| (name.as_str(), StoreView { tensor, dtype }));
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), tmp)
        .map_err(|e| WorkerError::checkpoint(path, format!("cannot write: {e}")))?;
    // `serialize_to_file` goes through a private (0600) temporary file; give the checkpoint the
    // ordinary permissions of a data file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(tmp, fs::Permissions::from_mode(0o644))
            .map_err(|e| WorkerError::io(tmp, e))?;
    }
    sync_file(tmp)?;
    fs::rename(tmp, path).map_err(|e| WorkerError::io(path, e))
}

/// Reads a safetensors file into FP32 tensors by name.
///
/// F32, BF16 and F16 tensors are converted exactly. An F8_E4M3 tensor `X` (DeepSeek's official
/// FP8 release stores `X.weight` so) must be a matrix with a sibling `X_scale_inv` (F32, BF16 or
/// F16) of shape `[ceil(rows / 128), ceil(cols / 128)]`; it is dequantized block-wise, each value
/// times the inverse scale of its 128x128 block, and returned under `X` without the scale entry.
/// A `*_scale_inv` tensor with no FP8 tensor to scale is returned as an ordinary tensor.
///
/// Errors name the file, and the tensor where there is one: a missing or unreadable file, a
/// corrupt or truncated one, an FP8 tensor without its scale or with a misshapen one, and any
/// other dtype.
pub fn load_safetensors(path: &Path) -> Result<BTreeMap<String, Tensor<f32>>> {
    let mut raw = BTreeMap::new();
    read_raw(path, &mut raw)?;
    resolve(raw)
}

/// A decoded tensor before FP8 weights are paired with their scales.
pub(crate) enum Raw {
    /// Converted to FP32.
    Dense(Tensor<f32>),
    /// FP8 E4M3 codes of a matrix, waiting for their scales.
    Fp8 {
        /// `[rows, cols]`.
        rows: usize,
        /// Columns.
        cols: usize,
        /// Row-major codes.
        codes: Vec<u8>,
    },
}

/// A decoded tensor and the file it came from.
pub(crate) struct RawEntry {
    /// The file (for errors).
    pub(crate) file: PathBuf,
    /// The contents.
    pub(crate) raw: Raw,
}

/// Decodes every tensor of the safetensors file `path` into `out`; a name already in `out` (from
/// another file) is an error naming both files.
pub(crate) fn read_raw(path: &Path, out: &mut BTreeMap<String, RawEntry>) -> Result<()> {
    let bytes = fs::read(path).map_err(|e| WorkerError::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| WorkerError::checkpoint(path, format!("not a valid safetensors file: {e}")))?;
    for (name, view) in st.iter() {
        let fail =
            |reason: String| WorkerError::checkpoint(path, format!("tensor {name}: {reason}"));
        let shape = view.shape().to_vec();
        let data = view.data();
        let raw = match view.dtype() {
            Dtype::F32 => Raw::Dense(dense::<4>(data, &shape, f32::from_le_bytes, &fail)?),
            Dtype::BF16 => Raw::Dense(dense::<2>(
                data,
                &shape,
                |b| bf16::from_le_bytes(b).to_f32(),
                &fail,
            )?),
            Dtype::F16 => Raw::Dense(dense::<2>(
                data,
                &shape,
                |b| f16::from_le_bytes(b).to_f32(),
                &fail,
            )?),
            Dtype::F8_E4M3 => {
                let [rows, cols] = shape[..] else {
                    return Err(fail(format!(
                        "F8_E4M3 tensors must be matrices with 128x128 block scales, got shape \
                         {shape:?}"
                    )));
                };
                if rows.checked_mul(cols) != Some(data.len()) {
                    return Err(fail(format!(
                        "shape {shape:?} / dtype F8_E4M3 needs {} bytes, the file holds {}",
                        rows.saturating_mul(cols),
                        data.len()
                    )));
                }
                Raw::Fp8 {
                    rows,
                    cols,
                    codes: data.to_vec(),
                }
            }
            other => {
                return Err(fail(format!(
                    "unsupported dtype {other} (supported: F32, BF16, F16, and F8_E4M3 with a \
                     {SCALE_INV_SUFFIX} tensor)"
                )));
            }
        };
        if let Some(prev) = out.get(name) {
            return Err(fail(format!("also present in {}", prev.file.display())));
        }
        out.insert(
            name.to_string(),
            RawEntry {
                file: path.to_path_buf(),
                raw,
            },
        );
    }
    Ok(())
}

/// Converts little-endian `N`-byte elements to an FP32 tensor of `shape`.
fn dense<const N: usize>(
    data: &[u8],
    shape: &[usize],
    convert: impl Fn([u8; N]) -> f32,
    fail: &dyn Fn(String) -> WorkerError,
) -> Result<Tensor<f32>> {
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if numel.and_then(|n| n.checked_mul(N)) != Some(data.len()) {
        return Err(fail(format!(
            "shape {shape:?} / {N}-byte dtype does not match the {} bytes stored",
            data.len()
        )));
    }
    let values: Vec<f32> = data
        .chunks_exact(N)
        .map(|c| {
            let mut b = [0u8; N];
            b.copy_from_slice(c);
            convert(b)
        })
        .collect();
    Tensor::new(shape.to_vec(), values).map_err(|e| fail(e.to_string()))
}

/// Pairs every FP8 tensor with its `_scale_inv` tensor and dequantizes it; the scales consumed are
/// dropped.
pub(crate) fn resolve(
    mut raw: BTreeMap<String, RawEntry>,
) -> Result<BTreeMap<String, Tensor<f32>>> {
    let fp8_names: Vec<String> = raw
        .iter()
        .filter(|(_, e)| matches!(e.raw, Raw::Fp8 { .. }))
        .map(|(n, _)| n.clone())
        .collect();
    let mut out = BTreeMap::new();
    for name in fp8_names {
        let Some(RawEntry {
            file,
            raw: Raw::Fp8 { rows, cols, codes },
        }) = raw.remove(&name)
        else {
            continue;
        };
        let scale_name = format!("{name}{SCALE_INV_SUFFIX}");
        let scale = match raw.remove(&scale_name) {
            Some(RawEntry {
                raw: Raw::Dense(t), ..
            }) => t,
            Some(RawEntry {
                file: sfile,
                raw: Raw::Fp8 { .. },
            }) => {
                return Err(WorkerError::checkpoint(
                    sfile,
                    format!("tensor {scale_name}: the scales of {name} must be F32, not F8_E4M3"),
                ));
            }
            None => {
                return Err(WorkerError::checkpoint(
                    &file,
                    format!(
                        "tensor {name}: dtype F8_E4M3 needs its inverse scales {scale_name}, \
                         which are missing"
                    ),
                ));
            }
        };
        let expected = [blocks(rows), blocks(cols)];
        if scale.shape() != expected {
            return Err(WorkerError::checkpoint(
                &file,
                format!(
                    "tensor {scale_name}: shape {:?}, but the {rows}x{cols} FP8 tensor {name} \
                     needs {expected:?} (one scale per 128x128 block)",
                    scale.shape()
                ),
            ));
        }
        let values = dequantize_blocks(&codes, rows, cols, scale.data());
        let t = Tensor::new(vec![rows, cols], values)
            .map_err(|e| WorkerError::checkpoint(&file, format!("tensor {name}: {e}")))?;
        out.insert(name, t);
    }
    for (name, entry) in raw {
        match entry.raw {
            Raw::Dense(t) => {
                out.insert(name, t);
            }
            // Every FP8 entry was removed above.
            Raw::Fp8 { .. } => {
                return Err(WorkerError::checkpoint(
                    entry.file,
                    format!("tensor {name}: F8_E4M3 tensor left unpaired"),
                ));
            }
        }
    }
    Ok(out)
}

/// `decode(code) * scale_inv[r / 128][c / 128]` for a row-major `rows x cols` matrix; `scales`
/// has shape `[ceil(rows / 128), ceil(cols / 128)]`.
fn dequantize_blocks(codes: &[u8], rows: usize, cols: usize, scales: &[f32]) -> Vec<f32> {
    let table = Fp8Format::E4M3.table();
    let kb = blocks(cols);
    let mut out = vec![0f32; rows * cols];
    if cols == 0 {
        return out;
    }
    for (r, (dst, src)) in out.chunks_mut(cols).zip(codes.chunks(cols)).enumerate() {
        let srow = &scales[(r / QUANT_BLOCK) * kb..][..kb];
        for ((d, s), &scale) in dst
            .chunks_mut(QUANT_BLOCK)
            .zip(src.chunks(QUANT_BLOCK))
            .zip(srow)
        {
            for (o, &c) in d.iter_mut().zip(s) {
                *o = table[c as usize] * scale;
            }
        }
    }
    out
}
