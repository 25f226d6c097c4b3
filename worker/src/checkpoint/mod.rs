//! Checkpoint files: named FP32 tensors in safetensors files, JSON documents, and directories
//! that appear on disk only once complete.
//!
//! This layer knows nothing about the model. It stores and loads `name -> Tensor<f32>` maps and
//! JSON values; which names a model uses (Hugging Face names such as
//! `model.layers.0.self_attn.q_a_proj.weight`) and what the JSON documents mean is the caller's
//! business.
//!
//! # Layout
//!
//! A model directory follows the Hugging Face convention, so `transformers` and the DeepSeek
//! release tools read what Shoal writes and Shoal reads their directories:
//!
//! * `config.json`: the model configuration ([`shoal_spec::ModelConfig::to_hf_json`]).
//! * `model.safetensors`: every tensor in one file, with the header metadata `{"format": "pt"}`;
//! * or, sharded, `model.safetensors.index.json` (`{"weight_map": {tensor name: shard file}}`)
//!   and the shard files it lists (`model-00001-of-00163.safetensors`, ...), all in the same
//!   directory. When both layouts are present the single file wins, as in `transformers`.
//!
//! Other files (optimizer state, trainer state) may sit alongside; their names are the caller's.
//!
//! # Dtypes
//!
//! Tensors are written as F32 or BF16 ([`StoreDtype`]). Reading accepts F32, BF16, F16 and the
//! block-scaled FP8 of DeepSeek's official release: an F8_E4M3 tensor `X.weight` with the F32
//! inverse scales `X.weight_scale_inv` (one per 128x128 block) is dequantized and returned as
//! `X.weight`. Everything loads as FP32.
//!
//! # Crash safety
//!
//! Every file is written to a temporary sibling, fsync'd and renamed ([`write_file_atomic`],
//! [`save_safetensors`]); a whole checkpoint directory is assembled in a temporary sibling
//! directory and renamed into place by [`CheckpointWriter::commit`]. A reader never finds a
//! partial file or a partial checkpoint under the final name.

mod atomic;
pub mod background;
pub mod sharded;
mod tensors;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Component, Path};

use serde_json::Value;
use shoal_kernels::Tensor;
use shoal_spec::ModelConfig;

pub use atomic::{CheckpointWriter, write_file_atomic};
pub use tensors::{SCALE_INV_SUFFIX, StoreDtype, load_safetensors, save_safetensors};

use crate::{Result, WorkerError};

/// The model configuration file of a model directory.
pub const CONFIG_FILE: &str = "config.json";
/// The single-file weights of a model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of sharded weights: `{"weight_map": {tensor name: shard file name}}`.
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

/// Loads a Hugging Face style model directory: `config.json` and the weights of
/// `model.safetensors`, or of every shard listed in `model.safetensors.index.json`.
///
/// Tensors are converted as by [`load_safetensors`]; an FP8 weight and its scales may sit in
/// different shards. Errors name the file at fault: a missing or invalid `config.json`, no weights
/// file, a malformed index, a missing shard, a tensor the index places in a shard that lacks it,
/// or a tensor present in two shards.
pub fn load_model_dir(dir: &Path) -> Result<(ModelConfig, BTreeMap<String, Tensor<f32>>)> {
    let config_path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&config_path).map_err(|e| WorkerError::io(&config_path, e))?;
    let config = ModelConfig::from_hf_json(&text, &config_path.display().to_string())?;

    let single = dir.join(WEIGHTS_FILE);
    let index_path = dir.join(WEIGHTS_INDEX_FILE);
    let mut raw = BTreeMap::new();
    if single.is_file() {
        tensors::read_raw(&single, &mut raw)?;
    } else if index_path.is_file() {
        let weight_map = read_index(&index_path)?;
        let mut shards: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, file) in &weight_map {
            shards.entry(file).or_default().push(name);
        }
        for (file, names) in shards {
            let shard = dir.join(file);
            if !shard.exists() {
                return Err(WorkerError::checkpoint(
                    &shard,
                    format!("shard listed in {} is missing", index_path.display()),
                ));
            }
            tensors::read_raw(&shard, &mut raw)?;
            for name in names {
                if raw.get(name).is_none_or(|e| e.file != shard) {
                    return Err(WorkerError::checkpoint(
                        &shard,
                        format!(
                            "tensor {name}: listed in {} for this shard, but not in it",
                            index_path.display()
                        ),
                    ));
                }
            }
        }
    } else {
        return Err(WorkerError::checkpoint(
            &single,
            format!(
                "missing (and no sharded index {} either)",
                index_path.display()
            ),
        ));
    }
    Ok((config, tensors::resolve(raw)?))
}

/// Reads the `weight_map` of a sharded index, checking every shard name is a plain file name in
/// the same directory.
fn read_index(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = fs::read_to_string(path).map_err(|e| WorkerError::io(path, e))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| WorkerError::checkpoint(path, format!("invalid JSON: {e}")))?;
    let Some(map) = value.get("weight_map").and_then(Value::as_object) else {
        return Err(WorkerError::checkpoint(
            path,
            "no \"weight_map\" object mapping tensor names to shard files",
        ));
    };
    let mut out = BTreeMap::new();
    for (name, file) in map {
        let Some(file) = file.as_str() else {
            return Err(WorkerError::checkpoint(
                path,
                format!("tensor {name}: the shard must be a file name string, got {file}"),
            ));
        };
        let mut parts = Path::new(file).components();
        if !matches!(
            (parts.next(), parts.next()),
            (Some(Component::Normal(_)), None)
        ) {
            return Err(WorkerError::checkpoint(
                path,
                format!("tensor {name}: shard {file:?} is not a file name in this directory"),
            ));
        }
        out.insert(name.clone(), file.to_string());
    }
    Ok(out)
}

/// Writes a model directory that [`load_model_dir`] and Hugging Face `transformers` read:
/// `config.json` and a single `model.safetensors` in `dtype`, published atomically through a
/// [`CheckpointWriter`] (replacing an existing directory at `dir`).
pub fn save_model_dir(
    dir: &Path,
    config: &ModelConfig,
    tensors: &[(String, &Tensor<f32>)],
    dtype: StoreDtype,
) -> Result<()> {
    let writer = CheckpointWriter::begin(dir)?;
    writer.write_json(CONFIG_FILE, &config.to_hf_json())?;
    writer.write_safetensors(WEIGHTS_FILE, tensors, dtype)?;
    writer.commit()
}
