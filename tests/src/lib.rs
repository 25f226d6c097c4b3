//! Helpers for Shoal's multi-process integration tests (the tests live in `tests/tests/`).

use std::path::PathBuf;
use std::process::{Command, Output};

/// The `shoal` binary built for this workspace (`target/<profile>/shoal`).
///
/// The integration crate cannot use `CARGO_BIN_EXE_shoal` (the binary belongs to another
/// package), so the test command builds it first and the path is derived from this test's own
/// executable, which lives in `target/<profile>/deps/`.
pub fn shoal_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SHOAL_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    profile_dir.join(format!("shoal{}", std::env::consts::EXE_SUFFIX))
}

/// Runs `shoal` with `args` to completion and returns its output.
pub fn run_shoal(args: &[&str]) -> Output {
    let bin = shoal_bin();
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p shoal)",
        bin.display()
    );
    Command::new(&bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("could not run {}: {e}", bin.display()))
}
