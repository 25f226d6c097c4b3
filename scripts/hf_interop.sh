#!/usr/bin/env bash
# Checkpoint interoperability with Hugging Face transformers' DeepseekV3ForCausalLM, both ways:
#   1. a checkpoint written by `shoal train` loads in transformers, and both compute the same loss;
#   2. a random checkpoint saved by transformers (with MTP modules in DeepSeek's layout, a non-zero
#      expert bias and non-unit norms) loads in Shoal, and both compute the same loss.
# Losses are fp32 means of next-token cross-entropy over the same token windows; the check is a
# relative difference below 1e-4. Installs torch + transformers into target/hf-venv (about 2
# minutes, 4.3 GB) when missing.
#
#   scripts/hf_interop.sh [path/to/shoal]      (default: target/debug/shoal)
set -euo pipefail
cd "$(dirname "$0")/.."
shoal="${1:-target/debug/shoal}"
venv="${HF_VENV:-target/hf-venv}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

bash scripts/hf/setup_venv.sh "$venv"
py="$venv/bin/python"
tool="scripts/hf/hf_tool.py"

# 16 windows of 64+1 tokens, seeded.
"$py" -c "import numpy as np; np.random.default_rng(7).integers(0, 4096, size=16*65).astype('<u4').tofile('$work/tokens.bin')"

json_field() { "$py" -c "import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])['$1'])"; }

passed=0
failed=0
compare() { # name shoal_loss hf_loss
    if "$py" -c "import sys; a,b=float('$2'),float('$3'); sys.exit(0 if abs(a-b)/abs(b) < 1e-4 else 1)"; then
        echo "hf_interop: $1: shoal $2 vs transformers $3: ok"
        passed=$((passed + 1))
    else
        echo "hf_interop: $1: shoal $2 vs transformers $3: relative difference too large"
        failed=$((failed + 1))
    fi
}

# 1. Shoal -> transformers: a trained (not freshly initialised) checkpoint.
"$shoal" train --nodes 1 --pp 1 --dp 1 --ep 1 --steps 8 --lr 0.01 --precision fp32 --batch 2 --seq-len 64 --seed 3 --out "$work/run" --json >/dev/null
ckpt="$work/run/checkpoint"
shoal_loss=$("$shoal" eval --checkpoint "$ckpt" --data "$work/tokens.bin" --dtype u32 --seq-len 64 --json | json_field loss)
hf_loss=$("$py" "$tool" loss --model-dir "$ckpt" --tokens "$work/tokens.bin" --seq-len 64 | json_field loss)
compare "shoal checkpoint in transformers" "$shoal_loss" "$hf_loss"

# 2. transformers -> Shoal: random weights with a wide init so layout mistakes move the loss.
"$py" "$tool" random --config scripts/hf/tiny_config.json --out "$work/hf" --seed 1 --init-std 0.05 --bias-std 0.05 >/dev/null
shoal_loss=$("$shoal" eval --checkpoint "$work/hf" --data "$work/tokens.bin" --dtype u32 --seq-len 64 --json | json_field loss)
hf_loss=$("$py" "$tool" loss --model-dir "$work/hf" --tokens "$work/tokens.bin" --seq-len 64 | json_field loss)
compare "transformers checkpoint in shoal" "$shoal_loss" "$hf_loss"

echo "hf_interop: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
