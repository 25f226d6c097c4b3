#!/usr/bin/env bash
# Shoal's one test command: builds the workspace and runs every test.
# Works on a fresh machine with only the Rust toolchain: it installs whatever the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."

# The etcd store's tests run a real etcd server (Debian's etcd-server), and etcd-client's build
# script needs protoc (Debian's protobuf-compiler) with the well-known types it imports
# (libprotobuf-dev, only recommended by protobuf-compiler): install whichever is missing.
need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v protoc >/dev/null || need+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
# The network-cut test puts a node agent in a network namespace (`ip netns`, iproute2; it needs
# root or CAP_NET_ADMIN, as the installs here do).
command -v ip >/dev/null || need+=(iproute2)
# The dashboard's browser test (tests/tests/dashboard.rs) drives headless Chromium (Debian's
# chromium); it fails without one.
command -v chromium >/dev/null || command -v chromium-browser >/dev/null || need+=(chromium)
# The CUDA kernels' CPU-emulated tests (kernels/tests/emulated.rs) compile the kernel sources with
# g++ against kernels/cuda/emu/cuda_emu.h.
command -v g++ >/dev/null || need+=(g++)
if ((${#need[@]})); then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo=sudo; fi
  echo "test.sh: installing ${need[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${need[@]}"
fi

# The multi-process tests in tests/ drive the real `shoal` binary; built with its `etcd` feature,
# it runs `shoal coordinator --store etcd://...` for the control-plane tests against a real etcd
# server (feature `etcd` of shoal-tests). Every cargo command below turns on the same features,
# so the binary the tests find in target/debug always has etcd support.
features=shoal/etcd,shoal-tests/etcd
cargo build --locked -p shoal --features etcd
# deploy/: the Kubernetes manifests against the Kubernetes schemas (kubernetes-validate, strict),
# the systemd units, the Slurm script and the container build file (installs its tools into a
# venv from PyPI on first use).
bash scripts/validate-deploy.sh
cargo test --locked --workspace --all-targets --features "$features"
# Doc tests (not part of --all-targets).
cargo test --locked --workspace --doc --features "$features"
# The CUDA path (feature `cuda`) builds without a CUDA toolkit or GPU. Every kernel source is
# compiled by NVRTC for sm_80, sm_89 and sm_90 (kernels/tests/nvrtc.rs), with the NVRTC library
# from PyPI (scripts/nvrtc-env.sh installs it into target/nvrtc-venv on first use); a kernel that
# stops compiling fails here. The worker's device resolution is tested with the feature on too
# (a CUDA request on this GPU-less machine falls back to the CPU and says why). The GPU
# conformance tests (kernels/tests/gpu.rs) need a GPU: scripts/gpu-check.sh runs them.
nvrtc_lib="$(bash scripts/nvrtc-env.sh)"
LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  cargo test --locked -p shoal-kernels --features cuda --test nvrtc
cargo test --locked -p shoal-worker --features cuda --lib devices
# Checkpoint interoperability with Hugging Face transformers (installs torch + transformers into
# target/hf-venv on first use: about 2 minutes and 4.3 GB).
bash scripts/hf_interop.sh target/debug/shoal
