//! Crash-safe writes: single files through a temporary sibling and a rename, whole checkpoint
//! directories through [`CheckpointWriter`].

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use shoal_kernels::Tensor;

use super::tensors::{StoreDtype, save_safetensors};
use crate::{Result, WorkerError};

/// Distinguishes temporary names made by this process.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The directory `path` lives in (`.` for a bare file name).
pub(crate) fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A fresh name in the directory of `path`: `<prefix><name>.<tag>-<pid>-<n>`. Living in the same
/// directory as `path` makes a rename onto `path` atomic.
pub(crate) fn unique_sibling(path: &Path, prefix: &str, tag: &str) -> Result<PathBuf> {
    let Some(name) = path.file_name() else {
        return Err(WorkerError::io(
            path,
            "not a file or directory name (it ends in `..` or is a root)",
        ));
    };
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut s = OsString::from(prefix);
    s.push(name);
    s.push(format!(".{tag}-{}-{n}", std::process::id()));
    Ok(parent_of(path).join(s))
}

/// Fails with an error naming `dir` unless it is an existing directory.
pub(crate) fn require_dir(dir: &Path) -> Result<()> {
    let meta = fs::metadata(dir).map_err(|e| WorkerError::io(dir, e))?;
    if !meta.is_dir() {
        return Err(WorkerError::io(dir, "not a directory"));
    }
    Ok(())
}

/// Flushes a directory's entries (new names, renames) to stable storage. Filesystems that cannot
/// sync a directory (`EINVAL`) are accepted; other platforms than Unix skip it.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let f = File::open(dir).map_err(|e| WorkerError::io(dir, e))?;
        match f.sync_all() {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {}
            Err(e) => return Err(WorkerError::io(dir, e)),
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Flushes a file's contents to stable storage.
pub(crate) fn sync_file(path: &Path) -> Result<()> {
    let f = File::open(path).map_err(|e| WorkerError::io(path, e))?;
    f.sync_all().map_err(|e| WorkerError::io(path, e))
}

/// Writes `bytes` to `path` atomically: into a temporary file in the same directory, fsync'd,
/// renamed over `path`, then the directory is fsync'd. Readers see the old contents or the new,
/// never a partial file, whatever happens; the temporary file is removed on failure. The parent
/// directory must exist.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let parent = parent_of(path);
    require_dir(parent)?;
    let tmp = unique_sibling(path, ".", "tmp")?;
    let result = (|| {
        let mut f = File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| WorkerError::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| WorkerError::io(&tmp, e))?;
        f.sync_all().map_err(|e| WorkerError::io(&tmp, e))?;
        drop(f);
        fs::rename(&tmp, path).map_err(|e| WorkerError::io(path, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    sync_dir(parent)
}

/// `name` as a path inside a checkpoint directory: relative, made of plain components only (no
/// `..`, no root), so nothing is written outside the directory.
pub(crate) fn inside(dir: &Path, name: &str) -> Result<PathBuf> {
    let rel = Path::new(name);
    let plain = rel.components().all(|c| matches!(c, Component::Normal(_)));
    if name.is_empty() || !plain {
        return Err(WorkerError::invalid(
            "checkpoint file name",
            format!(
                "{name:?} is not a relative path of plain names inside {}",
                dir.display()
            ),
        ));
    }
    Ok(dir.join(rel))
}

/// Builds a checkpoint directory out of sight and publishes it in one rename.
///
/// [`CheckpointWriter::begin`] creates a temporary sibling of the final directory
/// (`<final>.tmp-<pid>-<n>`, in the same parent so the rename is atomic); files go into
/// [`CheckpointWriter::path`], by the helpers or directly; [`CheckpointWriter::commit`] fsyncs
/// everything and renames the temporary directory to the final name. A writer dropped without
/// committing removes its temporary directory, so a failed or interrupted save never leaves
/// anything under the final name.
///
/// Replacing an existing checkpoint moves it aside (`<final>.old-<pid>-<n>`), renames the new one
/// into place and only then deletes the old one: a crash at any point leaves at least one complete
/// checkpoint on disk (after a crash between the two renames, the previous checkpoint is the
/// `.old-` sibling).
#[derive(Debug)]
pub struct CheckpointWriter {
    final_dir: PathBuf,
    /// The temporary directory; `None` once committed.
    tmp: Option<PathBuf>,
}

impl CheckpointWriter {
    /// Starts a checkpoint that [`CheckpointWriter::commit`] will publish as `final_dir`. Creates
    /// the parent directory if needed; an error names the parent when it cannot be created or
    /// written to (for instance when it is a regular file).
    pub fn begin(final_dir: &Path) -> Result<Self> {
        let parent = parent_of(final_dir);
        match fs::metadata(parent) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(WorkerError::io(parent, "not a directory")),
            Err(_) => fs::create_dir_all(parent).map_err(|e| WorkerError::io(parent, e))?,
        }
        let tmp = unique_sibling(final_dir, "", "tmp")?;
        fs::create_dir(&tmp).map_err(|e| {
            WorkerError::io(parent, format!("cannot create {}: {e}", tmp.display()))
        })?;
        Ok(Self {
            final_dir: final_dir.to_path_buf(),
            tmp: Some(tmp),
        })
    }

    /// The temporary directory to write the checkpoint's files into.
    pub fn path(&self) -> &Path {
        // `tmp` is only `None` inside `commit`, which consumes the writer.
        self.tmp.as_deref().unwrap_or(&self.final_dir)
    }

    /// The directory the checkpoint will have once committed.
    pub fn final_dir(&self) -> &Path {
        &self.final_dir
    }

    /// Writes `value` as pretty-printed JSON to `name` (a relative path) inside the checkpoint,
    /// atomically. Returns the file's current (temporary) path.
    pub fn write_json(&self, name: &str, value: &serde_json::Value) -> Result<PathBuf> {
        let path = self.prepare(name)?;
        let mut bytes = serde_json::to_vec_pretty(value)
            .map_err(|e| WorkerError::checkpoint(&path, format!("cannot encode JSON: {e}")))?;
        bytes.push(b'\n');
        write_file_atomic(&path, &bytes)?;
        Ok(path)
    }

    /// Writes `tensors` with [`save_safetensors`] to `name` (a relative path) inside the
    /// checkpoint. Returns the file's current (temporary) path.
    pub fn write_safetensors(
        &self,
        name: &str,
        tensors: &[(String, &Tensor<f32>)],
        dtype: StoreDtype,
    ) -> Result<PathBuf> {
        let path = self.prepare(name)?;
        save_safetensors(&path, tensors, dtype)?;
        Ok(path)
    }

    /// The path of `name` inside the temporary directory, with its parent directories created.
    fn prepare(&self, name: &str) -> Result<PathBuf> {
        let path = inside(self.path(), name)?;
        let parent = parent_of(&path);
        fs::create_dir_all(parent).map_err(|e| WorkerError::io(parent, e))?;
        Ok(path)
    }

    /// Fsyncs every file and directory written, then renames the temporary directory to the final
    /// one (replacing an existing checkpoint as described on [`CheckpointWriter`]). On error the
    /// temporary directory is removed and an existing checkpoint is left in place. Fails if the
    /// final path exists and is not a directory.
    pub fn commit(mut self) -> Result<()> {
        let Some(tmp) = self.tmp.clone() else {
            return Ok(());
        };
        sync_tree(&tmp)?;
        let final_dir = self.final_dir.clone();
        let parent = parent_of(&final_dir);
        let aside = match fs::symlink_metadata(&final_dir) {
            Ok(meta) if meta.is_dir() => {
                let aside = unique_sibling(&final_dir, "", "old")?;
                fs::rename(&final_dir, &aside).map_err(|e| {
                    WorkerError::io(
                        &final_dir,
                        format!("cannot move the existing checkpoint aside: {e}"),
                    )
                })?;
                Some(aside)
            }
            Ok(_) => {
                return Err(WorkerError::checkpoint(
                    &final_dir,
                    "exists and is not a directory; refusing to replace it",
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(WorkerError::io(&final_dir, e)),
        };
        if let Err(e) = fs::rename(&tmp, &final_dir) {
            if let Some(aside) = &aside {
                let _ = fs::rename(aside, &final_dir);
            }
            return Err(WorkerError::io(
                &final_dir,
                format!("cannot rename {} into place: {e}", tmp.display()),
            ));
        }
        self.tmp = None;
        sync_dir(parent)?;
        if let Some(aside) = aside {
            // The new checkpoint is durable; failing to delete the old one only leaves litter.
            let _ = fs::remove_dir_all(&aside);
            let _ = sync_dir(parent);
        }
        Ok(())
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = fs::remove_dir_all(tmp);
        }
    }
}

/// Fsyncs every regular file under `dir`, then every directory bottom-up.
fn sync_tree(dir: &Path) -> Result<()> {
    let entries = fs::read_dir(dir).map_err(|e| WorkerError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| WorkerError::io(dir, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| WorkerError::io(&path, e))?;
        if kind.is_dir() {
            sync_tree(&path)?;
        } else if kind.is_file() {
            sync_file(&path)?;
        }
    }
    sync_dir(dir)
}
