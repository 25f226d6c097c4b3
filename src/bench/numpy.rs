//! The numpy peer: finds (or prepares) a Python with numpy and times its matmul.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

const SCRIPT: &str = include_str!("numpy_matmul.py");

/// What the peer measured.
#[derive(Debug, Deserialize)]
pub struct NumpyReport {
    pub numpy: String,
    pub blas: String,
    pub rows: Vec<NumpyRow>,
}

/// One matrix size.
#[derive(Debug, Deserialize)]
pub struct NumpyRow {
    pub n: usize,
    pub gflops: f64,
}

fn has_numpy(python: &Path) -> bool {
    Command::new(python)
        .args(["-c", "import numpy"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A Python interpreter that imports numpy: `explicit` if given, else `python3` if it has numpy,
/// else a virtual environment under `venv_dir`, created and given numpy from PyPI on first use.
pub fn python_with_numpy(explicit: Option<&Path>, venv_dir: &Path) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if !has_numpy(p) {
            bail!(
                "--python {}: that interpreter cannot import numpy",
                p.display()
            );
        }
        return Ok(p.to_path_buf());
    }
    let system = PathBuf::from("python3");
    if has_numpy(&system) {
        return Ok(system);
    }
    let venv_python = venv_dir.join("bin").join("python");
    if !has_numpy(&venv_python) {
        eprintln!(
            "bench: preparing numpy in a virtual environment at {} (one time)",
            venv_dir.display()
        );
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(venv_dir)
            .status()
            .context("running python3 -m venv (is python3 installed?)")?;
        if !status.success() {
            bail!("python3 -m venv {} failed", venv_dir.display());
        }
        let status = Command::new(&venv_python)
            .args(["-m", "pip", "install", "--quiet", "numpy"])
            .status()
            .context("running pip install numpy")?;
        if !status.success() {
            bail!("pip install numpy into {} failed", venv_dir.display());
        }
    }
    Ok(venv_python)
}

/// Runs the timing script for `sizes`.
pub fn measure(python: &Path, sizes: &[usize]) -> Result<NumpyReport> {
    let out = Command::new(python)
        .arg("-c")
        .arg(SCRIPT)
        .args(sizes.iter().map(ToString::to_string))
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "the numpy timing script failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("reading the numpy timing script's output")
}
