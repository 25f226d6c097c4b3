#!/usr/bin/env bash
# Prints the directory holding libnvrtc.so.12, installing the NVRTC wheel from PyPI into
# target/nvrtc-venv on first use (about 110 MB; no GPU and no CUDA toolkit needed). The CUDA path's
# kernel tests put this directory on LD_LIBRARY_PATH, where cudarc's dynamic loader finds it.
# Usage: LD_LIBRARY_PATH="$(bash scripts/nvrtc-env.sh)" cargo test -p shoal-kernels --features cuda
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/nvrtc-venv
lib="$PWD/$venv/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib"
# shellcheck disable=SC2086 # the glob is meant to expand
if ! ls $lib/libnvrtc.so.12 >/dev/null 2>&1; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'nvidia-cuda-nvrtc-cu12==12.9.86' >&2
fi
# shellcheck disable=SC2086
dirname "$(ls $lib/libnvrtc.so.12)"
