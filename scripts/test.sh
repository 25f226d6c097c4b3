#!/usr/bin/env bash
# Shoal's one test command: builds the workspace and runs every test.
# Works on a fresh machine with only the Rust toolchain: it installs whatever the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."

# The multi-process tests in tests/ drive the real `shoal` binary.
cargo build --locked -p shoal
cargo test --locked --workspace --all-targets
# Doc tests (not part of --all-targets).
cargo test --locked --workspace --doc
