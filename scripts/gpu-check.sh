#!/usr/bin/env bash
# The CUDA path's device check, for a machine with an NVIDIA GPU (the `device` tool's H200, or any
# CUDA machine): the GPU conformance tests (kernels/tests/gpu.rs), the NVRTC compile tests, the
# device step against the CPU model (worker/tests/device_step_gpu.rs), and the GPU benchmarks
# (kernels/examples/gpu_bench.rs, worker/examples/device_step.rs: tiny-model tokens/s against the
# CPU), with logs and JSON reports written to OUT_DIR.
#
#   scripts/gpu-check.sh OUT_DIR            builds with cargo on the GPU machine, then runs
#   scripts/gpu-check.sh OUT_DIR BIN_DIR    runs binaries built elsewhere by
#                                           scripts/gpu-check-build.sh (for a machine without
#                                           Rust: carry BIN_DIR there)
#
# cudarc loads libcuda, libnvrtc, libcublas and libnccl at run time under their unversioned or
# CUDA-12 names; this script links whatever versions the machine has (CUDA toolkit, driver, or the
# nvidia-* Python wheels) into one directory under the names cudarc looks for.
set -uo pipefail
out="${1:?usage: gpu-check.sh OUT_DIR [BIN_DIR]}"
bins="${2:-}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
if [ -n "$bins" ]; then bins="$(cd "$bins" && pwd)"; fi
cd "$(dirname "$0")/.." || exit 1

libs="$(mktemp -d)"
search=(/usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu)
while IFS= read -r d; do search+=("$d"); done < <(python3 -c 'import site,glob; [print(p) for s in site.getsitepackages() for p in glob.glob(s+"/nvidia/*/lib")]' 2>/dev/null)
for name in libcuda libnvrtc libnvrtc-builtins libcublas libcublasLt libnccl; do
  for d in "${search[@]}"; do
    f="$(find "$d" -maxdepth 1 -name "$name.so*" 2>/dev/null | sort -V | tail -1)"
    if [ -n "$f" ]; then
      ln -sf "$f" "$libs/$name.so"
      # The versioned names the libraries themselves ask for (libnvrtc loads its builtins by them).
      for v in "$d/$name".so.*; do [ -e "$v" ] && ln -sf "$v" "$libs/$(basename "$v")"; done
      echo "$name -> $f" >>"$out/libraries.txt"
      break
    fi
  done
done
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >>"$out/nvidia-smi.txt"

if [ -z "$bins" ]; then
  bins="$(bash scripts/gpu-check-build.sh)" || { echo "build failed" | tee "$out/status.txt"; exit 1; }
fi

status=0
"$bins/nvrtc" --test-threads=1 2>&1 | tee "$out/nvrtc-tests.log" || status=1
"$bins/gpu" --test-threads=1 2>&1 | tee "$out/gpu-tests.log" || status=1
"$bins/device_step_gpu" --test-threads=1 2>&1 | tee "$out/device-step-tests.log" || status=1
"$bins/gpu_bench" "$out/gpu-bench.json" 2>&1 | tee "$out/gpu-bench.log" || status=1
for p in fp32 fp8; do
  "$bins/device_step" --backend cuda --precision "$p" --json "$out/device-step-$p.json" 2>&1 |
    tee "$out/device-step-$p.log" || status=1
done
echo "exit $status" | tee "$out/status.txt"
exit "$status"
