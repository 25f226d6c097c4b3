//! Sharded checkpoints: every device writes its own shard, and a manifest written last commits
//! the whole.
//!
//! ```text
//! ROOT/step-00000040/shard-00000.safetensors   device 0's fragments
//! ROOT/step-00000040/shard-00001.safetensors   device 1's fragments ...
//! ROOT/step-00000040/part-00000.json           what one process wrote (its devices, files, sums)
//! ROOT/step-00000040/config.json, trainer_state.json   the caller's documents
//! ROOT/step-00000040/manifest.json             written last: every file with its size and CRC-32
//! ```
//!
//! A fragment is a contiguous run of one parameter's elements (flat, row-major) starting at
//! `start`: the master values (`NAME@START/w`, FP32) and, for a trained parameter, its optimizer
//! moments (`NAME@START/m`, `NAME@START/v`, FP32 or BF16 exactly as the optimizer keeps them).
//! A device writes the fragments it owns (its ZeRO-1 shard), so the checkpoint holds every
//! element once however the job was split, and [`read_fragments`] reassembles whole tensors for
//! any other split.
//!
//! Every process of a job writes its devices' shards and then its `part-*.json`. The process
//! that commits (the one holding rank 0) waits until the parts cover every device, and writes
//! `manifest.json` atomically. A directory without a manifest, or whose files do not match their
//! sizes and checksums, is not a checkpoint: [`latest_valid`] skips it and takes the one before.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use half::bf16;
use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};
use shoal_kernels::Tensor;

use super::atomic::{sync_dir, write_file_atomic};
use crate::{Result, WorkerError};

/// The commit record of a sharded checkpoint.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Step directories are `step-` and the step in eight digits or more.
pub const STEP_PREFIX: &str = "step-";
/// Format version of the manifest.
pub const FORMAT: u32 = 1;

/// A file of a checkpoint with its size and CRC-32 (IEEE).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSum {
    /// Its name inside the step directory.
    pub name: String,
    /// Its length in bytes.
    pub bytes: u64,
    /// CRC-32 of its contents.
    pub crc32: u32,
}

impl FileSum {
    /// The sum of `bytes` stored as `name`.
    pub fn of(name: &str, bytes: &[u8]) -> Self {
        Self {
            name: name.to_string(),
            bytes: bytes.len() as u64,
            crc32: crc32fast::hash(bytes),
        }
    }
}

/// What one process wrote: `part-<first device>.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartRecord {
    /// The devices whose shards it wrote.
    pub devices: Vec<usize>,
    /// Its files.
    pub files: Vec<FileSum>,
}

/// `manifest.json`: the checkpoint is complete and these are its files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version ([`FORMAT`]).
    pub format: u32,
    /// Optimizer steps taken when it was written.
    pub step: u64,
    /// Devices that wrote a shard.
    pub devices: usize,
    /// Every file with its size and checksum.
    pub files: Vec<FileSum>,
    /// Every parameter's shape, by name.
    pub shapes: BTreeMap<String, Vec<usize>>,
    /// How the job was split when it was written (the caller's description).
    pub plan: serde_json::Value,
    /// When it was committed, milliseconds since the Unix epoch.
    pub unix_ms: u64,
}

/// Optimizer moments of a fragment, in the precision the optimizer keeps them (the
/// optimizer's own type).
pub use shoal_kernels::ops::adamw::Moments as FragMoments;

/// Elements of a fragment's moments (the first moment's; the second's is checked against it).
fn moments_len(m: &FragMoments) -> (usize, usize) {
    match m {
        FragMoments::F32 { m, v } => (m.len(), v.len()),
        FragMoments::Bf16 { m, v } => (m.len(), v.len()),
    }
}

/// A contiguous run of one parameter's elements.
#[derive(Clone, Debug, PartialEq)]
pub struct Fragment {
    /// The parameter's name.
    pub name: String,
    /// Its first element (flat, row-major).
    pub start: usize,
    /// Master values.
    pub values: Vec<f32>,
    /// Optimizer moments, for a trained parameter.
    pub moments: Option<FragMoments>,
}

/// What one device owns of a checkpoint.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceShard {
    /// The device (`pp_rank * dp + dp_rank`).
    pub device: usize,
    /// Its fragments.
    pub fragments: Vec<Fragment>,
}

impl DeviceShard {
    /// The shard's file name.
    pub fn file_name(device: usize) -> String {
        format!("shard-{device:05}.safetensors")
    }

    /// Bytes of values and moments it holds.
    pub fn payload_bytes(&self) -> u64 {
        self.fragments
            .iter()
            .map(|f| {
                let m = match &f.moments {
                    Some(FragMoments::F32 { m, .. }) => 8 * m.len(),
                    Some(FragMoments::Bf16 { m, .. }) => 4 * m.len(),
                    None => 0,
                };
                (4 * f.values.len() + m) as u64
            })
            .sum()
    }

    /// The safetensors bytes of the shard.
    pub fn encode(&self) -> Result<Vec<u8>> {
        struct Bytes<'a> {
            dtype: Dtype,
            len: usize,
            data: Cow<'a, [u8]>,
        }
        impl View for Bytes<'_> {
            fn dtype(&self) -> Dtype {
                self.dtype
            }
            fn shape(&self) -> &[usize] {
                std::slice::from_ref(&self.len)
            }
            fn data(&self) -> Cow<'_, [u8]> {
                Cow::Borrowed(&self.data)
            }
            fn data_len(&self) -> usize {
                self.data.len()
            }
        }
        fn f32s(v: &[f32]) -> Vec<u8> {
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
        fn bf16s(v: &[bf16]) -> Vec<u8> {
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
        let mut views: Vec<(String, Bytes<'_>)> = Vec::new();
        for f in &self.fragments {
            if f.name.contains(['@', '/']) {
                return Err(WorkerError::invalid(
                    "checkpoint",
                    format!("parameter name {:?} contains '@' or '/'", f.name),
                ));
            }
            let key = |part: &str| format!("{}@{}/{part}", f.name, f.start);
            let len = f.values.len();
            views.push((
                key("w"),
                Bytes {
                    dtype: Dtype::F32,
                    len,
                    data: Cow::Owned(f32s(&f.values)),
                },
            ));
            if let Some(mo) = &f.moments {
                if moments_len(mo) != (len, len) {
                    return Err(WorkerError::invalid(
                        "checkpoint",
                        format!(
                            "{}: {} values but {:?} moments",
                            f.name,
                            len,
                            moments_len(mo)
                        ),
                    ));
                }
                let (dtype, m, v) = match mo {
                    FragMoments::F32 { m, v } => (Dtype::F32, f32s(m), f32s(v)),
                    FragMoments::Bf16 { m, v } => (Dtype::BF16, bf16s(m), bf16s(v)),
                };
                views.push((
                    key("m"),
                    Bytes {
                        dtype,
                        len,
                        data: Cow::Owned(m),
                    },
                ));
                views.push((
                    key("v"),
                    Bytes {
                        dtype,
                        len,
                        data: Cow::Owned(v),
                    },
                ));
            }
        }
        let meta = std::collections::HashMap::from([
            ("format".to_string(), "shoal-shard".to_string()),
            ("device".to_string(), self.device.to_string()),
        ]);
        safetensors::serialize(views, Some(meta))
            .map_err(|e| WorkerError::invalid("checkpoint", format!("cannot encode a shard: {e}")))
    }

    /// Reads a shard's bytes back (`path` names the file in errors).
    pub fn decode(device: usize, bytes: &[u8], path: &Path) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| {
            WorkerError::checkpoint(path, format!("not a valid safetensors file: {e}"))
        })?;
        let mut by_key: BTreeMap<(String, usize), [Option<Stored>; 3]> = BTreeMap::new();
        for (key, view) in st.iter() {
            let bad = |why: &str| WorkerError::checkpoint(path, format!("tensor {key}: {why}"));
            let (head, part) = key
                .rsplit_once('/')
                .ok_or_else(|| bad("not NAME@START/PART"))?;
            let (name, start) = head.rsplit_once('@').ok_or_else(|| bad("not NAME@START"))?;
            let start: usize = start.parse().map_err(|_| bad("START is not a number"))?;
            let slot = match part {
                "w" => 0,
                "m" => 1,
                "v" => 2,
                _ => return Err(bad("PART is not w, m or v")),
            };
            let entry = by_key.entry((name.to_string(), start)).or_default();
            entry[slot] = Some((view.dtype(), view.data().to_vec()));
        }
        let mut fragments = Vec::new();
        for ((name, start), [w, m, v]) in by_key {
            let bad = |why: String| {
                WorkerError::checkpoint(path, format!("fragment {name}@{start}: {why}"))
            };
            let values = match w {
                Some((Dtype::F32, b)) => from_f32(&b),
                Some((d, _)) => return Err(bad(format!("values stored as {d}, not F32"))),
                None => return Err(bad("moments without values".into())),
            };
            let moments = match (m, v) {
                (None, None) => None,
                (Some((Dtype::F32, m)), Some((Dtype::F32, v))) => Some(FragMoments::F32 {
                    m: from_f32(&m),
                    v: from_f32(&v),
                }),
                (Some((Dtype::BF16, m)), Some((Dtype::BF16, v))) => Some(FragMoments::Bf16 {
                    m: m.chunks_exact(2)
                        .map(|c| bf16::from_le_bytes([c[0], c[1]]))
                        .collect(),
                    v: v.chunks_exact(2)
                        .map(|c| bf16::from_le_bytes([c[0], c[1]]))
                        .collect(),
                }),
                _ => {
                    return Err(bad(
                        "first and second moments differ in presence or dtype".into()
                    ));
                }
            };
            if moments
                .as_ref()
                .is_some_and(|mo| moments_len(mo) != (values.len(), values.len()))
            {
                return Err(bad("moments and values differ in length".into()));
            }
            fragments.push(Fragment {
                name,
                start,
                values,
                moments,
            });
        }
        Ok(Self { device, fragments })
    }
}

/// A tensor as stored: its dtype and bytes.
type Stored = (Dtype, Vec<u8>);

fn from_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The directory of step `step` under `root`.
pub fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("{STEP_PREFIX}{step:08}"))
}

/// The step a directory name stands for.
fn step_of(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(STEP_PREFIX)?;
    (digits.len() >= 8 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// The step directories under `root`, newest first (none when `root` does not exist).
pub fn step_dirs(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(WorkerError::io(root, e)),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(|e| WorkerError::io(root, e))?;
        if let Some(step) = e.file_name().to_str().and_then(step_of)
            && e.path().is_dir()
        {
            out.push((step, e.path()));
        }
    }
    out.sort_by_key(|e| std::cmp::Reverse(e.0));
    Ok(out)
}

/// Writes `bytes` as `name` in `dir` atomically and returns its sum.
pub fn write_summed(dir: &Path, name: &str, bytes: &[u8]) -> Result<FileSum> {
    if let Some(e) = crate::fault::no_space("write") {
        return Err(WorkerError::io(dir.join(name), e));
    }
    write_file_atomic(&dir.join(name), bytes)?;
    Ok(FileSum::of(name, bytes))
}

/// Writes `shards` (this process's devices) and `extra` documents into `dir`, then the part
/// record naming them. Returns the files written.
pub fn write_part(
    dir: &Path,
    shards: &[DeviceShard],
    extra: &[(String, Vec<u8>)],
    cancel: &AtomicBool,
) -> Result<Vec<FileSum>> {
    fs::create_dir_all(dir).map_err(|e| WorkerError::io(dir, e))?;
    let mut files = Vec::new();
    for s in shards {
        if cancel.load(Ordering::Relaxed) {
            return Err(WorkerError::checkpoint(dir, "cancelled"));
        }
        let bytes = s.encode()?;
        files.push(write_summed(
            dir,
            &DeviceShard::file_name(s.device),
            &bytes,
        )?);
        crate::fault::point("checkpoint");
    }
    for (name, bytes) in extra {
        files.push(write_summed(dir, name, bytes)?);
    }
    let devices: Vec<usize> = shards.iter().map(|s| s.device).collect();
    let first = devices.first().copied().unwrap_or(0);
    let part = PartRecord {
        devices,
        files: files.clone(),
    };
    let json = serde_json::to_vec_pretty(&part).map_err(|e| WorkerError::checkpoint(dir, e))?;
    write_file_atomic(&dir.join(format!("part-{first:05}.json")), &json)?;
    Ok(files)
}

/// The part records in `dir`.
fn read_parts(dir: &Path) -> Result<Vec<PartRecord>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).map_err(|e| WorkerError::io(dir, e))? {
        let e = e.map_err(|e| WorkerError::io(dir, e))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("part-") && name.ends_with(".json") {
            let path = e.path();
            let text = fs::read(&path).map_err(|e| WorkerError::io(&path, e))?;
            out.push(serde_json::from_slice(&text).map_err(|e| WorkerError::checkpoint(&path, e))?);
        }
    }
    Ok(out)
}

/// Waits until the part records in `dir` cover devices `0..devices` (polling, until `wait`
/// passes or `cancel` is set), then writes the manifest listing every file. The manifest's
/// `files` and `step` are filled in here.
pub fn commit(
    dir: &Path,
    mut manifest: Manifest,
    wait: Duration,
    cancel: &AtomicBool,
) -> Result<Manifest> {
    let deadline = Instant::now() + wait;
    let parts = loop {
        let parts = read_parts(dir)?;
        let mut seen = vec![false; manifest.devices];
        for p in &parts {
            for &d in &p.devices {
                if let Some(s) = seen.get_mut(d) {
                    *s = true;
                }
            }
        }
        if seen.iter().all(|&s| s) {
            break parts;
        }
        if cancel.load(Ordering::Relaxed) {
            return Err(WorkerError::checkpoint(
                dir,
                "cancelled before every shard was written",
            ));
        }
        if Instant::now() >= deadline {
            let missing: Vec<usize> = (0..manifest.devices).filter(|&d| !seen[d]).collect();
            return Err(WorkerError::checkpoint(
                dir,
                format!(
                    "the shards of devices {missing:?} were not written within {} s",
                    wait.as_secs_f64()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut files: Vec<FileSum> = parts.into_iter().flat_map(|p| p.files).collect();
    files.sort_by(|a, b| a.name.cmp(&b.name));
    files.dedup_by(|a, b| a.name == b.name);
    manifest.files = files;
    manifest.format = FORMAT;
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| WorkerError::checkpoint(dir, e))?;
    write_file_atomic(&dir.join(MANIFEST_FILE), &json)?;
    sync_dir(dir)?;
    Ok(manifest)
}

/// Reads `dir`'s manifest and checks every file it lists: present, of its size, with its
/// checksum, and a shard for every device. An error says what is wrong.
pub fn verify(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    let text = fs::read(&path).map_err(|e| WorkerError::io(&path, e))?;
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|e| WorkerError::checkpoint(&path, e))?;
    if manifest.format != FORMAT {
        return Err(WorkerError::checkpoint(
            &path,
            format!("format {} (this build reads {FORMAT})", manifest.format),
        ));
    }
    for d in 0..manifest.devices {
        let name = DeviceShard::file_name(d);
        if !manifest.files.iter().any(|f| f.name == name) {
            return Err(WorkerError::checkpoint(&path, format!("no {name} listed")));
        }
    }
    for f in &manifest.files {
        let file = super::atomic::inside(dir, &f.name)?;
        let bytes = fs::read(&file).map_err(|e| WorkerError::io(&file, e))?;
        if bytes.len() as u64 != f.bytes {
            return Err(WorkerError::checkpoint(
                &file,
                format!(
                    "{} bytes, the manifest says {} (torn)",
                    bytes.len(),
                    f.bytes
                ),
            ));
        }
        let crc = crc32fast::hash(&bytes);
        if crc != f.crc32 {
            return Err(WorkerError::checkpoint(
                &file,
                format!(
                    "CRC-32 {crc:08x}, the manifest says {:08x} (corrupt)",
                    f.crc32
                ),
            ));
        }
    }
    Ok(manifest)
}

/// The newest step directory under `root` that verifies, skipping (and logging) those that do
/// not; `None` when there is none.
pub fn latest_valid(root: &Path) -> Result<Option<(PathBuf, Manifest)>> {
    latest_valid_at_most(root, u64::MAX)
}

/// [`latest_valid`] among the step directories of step `at_most` or earlier.
pub fn latest_valid_at_most(root: &Path, at_most: u64) -> Result<Option<(PathBuf, Manifest)>> {
    for (step, dir) in step_dirs(root)?.into_iter().filter(|(s, _)| *s <= at_most) {
        match verify(&dir) {
            Ok(m) if m.step == step => return Ok(Some((dir, m))),
            Ok(m) => tracing::warn!(
                dir = %dir.display(),
                manifest_step = m.step,
                "checkpoint directory and manifest disagree on the step; skipped"
            ),
            Err(e) => tracing::warn!(
                dir = %dir.display(),
                error = %e,
                "not a valid checkpoint; falling back to an earlier one"
            ),
        }
    }
    Ok(None)
}

/// Keeps the newest `keep` committed checkpoints under `root` and removes older ones, and any
/// directory older than the newest committed one that never committed (a failed write).
pub fn prune(root: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let mut committed = 0;
    for (_, dir) in step_dirs(root)? {
        let done = dir.join(MANIFEST_FILE).is_file();
        let stale = if done {
            committed += 1;
            committed > keep.max(1)
        } else {
            committed > 0
        };
        if stale {
            fs::remove_dir_all(&dir).map_err(|e| WorkerError::io(&dir, e))?;
            removed.push(dir);
        }
    }
    Ok(removed)
}

/// Removes the step directories under `root` newer than `step` (what a failed attempt left
/// behind once the job goes back to `step`).
pub fn remove_after(root: &Path, step: u64) -> Result<()> {
    for (s, dir) in step_dirs(root)? {
        if s > step {
            fs::remove_dir_all(&dir).map_err(|e| WorkerError::io(&dir, e))?;
        }
    }
    Ok(())
}

/// Whole tensors and moments reassembled from a checkpoint's fragments.
#[derive(Debug, Default)]
pub struct Assembled {
    /// Every parameter's master values.
    pub tensors: BTreeMap<String, Tensor<f32>>,
    /// The optimizer moments of every trained parameter (whole).
    pub moments: BTreeMap<String, FragMoments>,
}

/// Reads every shard a verified manifest lists and joins the fragments into whole tensors,
/// checking each parameter is covered exactly (repeats must be bit-identical).
pub fn read_fragments(dir: &Path, manifest: &Manifest) -> Result<Assembled> {
    let mut frags: BTreeMap<String, Vec<Fragment>> = BTreeMap::new();
    for d in 0..manifest.devices {
        let path = dir.join(DeviceShard::file_name(d));
        let bytes = fs::read(&path).map_err(|e| WorkerError::io(&path, e))?;
        for f in DeviceShard::decode(d, &bytes, &path)?.fragments {
            frags.entry(f.name.clone()).or_default().push(f);
        }
    }
    let mut out = Assembled::default();
    for (name, shape) in &manifest.shapes {
        let bad = |why: String| WorkerError::checkpoint(dir, format!("parameter {name}: {why}"));
        let numel: usize = shape.iter().product();
        let mut list = frags.remove(name).unwrap_or_default();
        list.sort_by_key(|f| f.start);
        let mut values = Vec::with_capacity(numel);
        let with_moments = list.first().is_some_and(|f| f.moments.is_some());
        let mut moments: Option<FragMoments> = None;
        let mut prev: Option<&Fragment> = None;
        for f in &list {
            if f.moments.is_some() != with_moments {
                return Err(bad("some fragments have moments and some do not".into()));
            }
            if let Some(p) = prev
                && p.start == f.start
            {
                if p.values.len() != f.values.len()
                    || p.values
                        .iter()
                        .zip(&f.values)
                        .any(|(a, b)| a.to_bits() != b.to_bits())
                {
                    return Err(bad(format!(
                        "two devices wrote different values at {}",
                        f.start
                    )));
                }
                continue;
            }
            if f.start != values.len() {
                return Err(bad(format!(
                    "elements {}..{} missing or written twice",
                    values.len().min(f.start),
                    values.len().max(f.start)
                )));
            }
            values.extend_from_slice(&f.values);
            match (&mut moments, &f.moments) {
                (None, Some(m)) => moments = Some(m.clone()),
                (Some(FragMoments::F32 { m, v }), Some(FragMoments::F32 { m: m2, v: v2 })) => {
                    m.extend_from_slice(m2);
                    v.extend_from_slice(v2);
                }
                (Some(FragMoments::Bf16 { m, v }), Some(FragMoments::Bf16 { m: m2, v: v2 })) => {
                    m.extend_from_slice(m2);
                    v.extend_from_slice(v2);
                }
                (_, None) => {}
                _ => return Err(bad("moments stored in two precisions".into())),
            }
            prev = Some(f);
        }
        if values.len() != numel {
            return Err(bad(format!(
                "{} of its {numel} elements are in the checkpoint",
                values.len()
            )));
        }
        let t = Tensor::new(shape.clone(), values).map_err(|e| bad(e.to_string()))?;
        out.tensors.insert(name.clone(), t);
        if let Some(m) = moments {
            out.moments.insert(name.clone(), m);
        }
    }
    if let Some(name) = frags.keys().next() {
        return Err(WorkerError::checkpoint(
            dir,
            format!("parameter {name} is in a shard but not in the manifest's shapes"),
        ));
    }
    Ok(out)
}
