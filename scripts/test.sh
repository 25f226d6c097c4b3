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
# Checkpoint interoperability with Hugging Face transformers (installs torch + transformers into
# target/hf-venv on first use: about 2 minutes and 4.3 GB).
bash scripts/hf_interop.sh target/debug/shoal
