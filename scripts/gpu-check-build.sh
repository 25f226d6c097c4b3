#!/usr/bin/env bash
# Builds the device check's binaries (release, feature `cuda`) into target/gpu-check/bin and prints
# that directory: the NVRTC and GPU test binaries, the device step's GPU conformance tests, the GPU
# benchmark and the tiny-model step benchmark. No CUDA toolkit needed.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=target/gpu-check/bin
mkdir -p "$dir"
msgs="$(cargo test --locked --release -p shoal-kernels --features cuda --test gpu --test nvrtc --no-run --message-format=json 2>/dev/null)"
for t in gpu nvrtc; do
  exe="$(printf '%s\n' "$msgs" | python3 -c "import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get('reason')=='compiler-artifact' and m['target']['name']=='$t' and m.get('executable'): print(m['executable'])" | tail -1)"
  cp "$exe" "$dir/$t"
  strip "$dir/$t"
done
msgs="$(cargo test --locked --release -p shoal-worker --features cuda --test device_step_gpu --no-run --message-format=json 2>/dev/null)"
exe="$(printf '%s\n' "$msgs" | python3 -c "import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get('reason')=='compiler-artifact' and m['target']['name']=='device_step_gpu' and m.get('executable'): print(m['executable'])" | tail -1)"
cp "$exe" "$dir/device_step_gpu"
strip "$dir/device_step_gpu"
cargo build --locked --release -p shoal-kernels --features cuda --example gpu_bench >&2
cargo build --locked --release -p shoal-worker --features cuda --example device_step >&2
for b in gpu_bench device_step; do
  cp "target/release/examples/$b" "$dir/$b"
  strip "$dir/$b"
done
echo "$PWD/$dir"
