#!/usr/bin/env bash
# Create the Python virtualenv used by scripts/hf/hf_tool.py (Hugging Face DeepseekV3 reference).
#
#   scripts/hf/setup_venv.sh [VENV_DIR]      (default: target/hf-venv under the repository root)
#
# Installs pinned CPU-usable torch + transformers + safetensors + numpy from PyPI only.
# Idempotent: when VENV_DIR already holds the same pinned set (stamp file) and the smoke test
# passes, it does nothing.
#
# Environment:
#   HF_VENV_FULL=1   install torch with all of its dependencies (adds triton, cusolver, ...: 5.6 GB
#                    instead of 4.3 GB). Used automatically as a fallback if the lean install fails
#                    its smoke test.
#   PYTHON=...       interpreter used to create the venv (default: python3; the pins are for 3.11)
#   HF_VENV_MIN_FREE_GB=8  free space required next to VENV_DIR before installing
#
# Exit status: 0 ok (installed or already up to date); 75 not enough disk (nothing installed);
# anything else: the install failed.
#
# Measured on the 2-core dev machine (PyPI, no pip cache): lean install 89-112 s, 4.3 GB; a re-run that
# finds the venv up to date takes ~6 s (it imports torch + transformers once).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${1:-$root/target/hf-venv}"
python="${PYTHON:-python3}"
full="${HF_VENV_FULL:-0}"

req_torch="$here/requirements-torch.txt"
req_rest="$here/requirements.txt"
torch_version="$(sed -n 's/^torch==\([^ ]*\).*/\1/p' "$req_torch")"
stamp_want="$(cat "$req_torch" "$req_rest" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)-full$full"
stamp_file="$venv/.shoal-hf-stamp"

log() { echo "[setup_venv] $*" >&2; }

smoke_test() {
    # import everything hf_tool.py needs and run a tiny autograd step on CPU
    HF_HUB_OFFLINE=1 "$venv/bin/python" - <<'EOF'
import torch, transformers, safetensors, numpy
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: F401
x = torch.randn(8, 8, requires_grad=True)
(x @ x).sum().backward()
assert x.grad is not None
print(f"torch {torch.__version__} transformers {transformers.__version__} "
      f"safetensors {safetensors.__version__} numpy {numpy.__version__}")
EOF
}

if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp_want" ]] && versions="$(smoke_test 2>/dev/null)"; then
    log "up to date: $venv ($versions)"
    exit 0
fi

# Disk: the lean venv is ~4.3 GB and pip keeps the downloaded wheels (~2.4 GB) in TMPDIR meanwhile.
# Exit 75 (EX_TEMPFAIL) when there is not enough room, so that callers (CI) can skip rather than fail.
mkdir -p "$(dirname "$venv")"
need_kb=$(( ${HF_VENV_MIN_FREE_GB:-8} * 1024 * 1024 ))
free_kb=$(df -Pk "$(dirname "$venv")" | awk 'NR==2 {print $4}')
tmp_free_kb=$(df -Pk "${TMPDIR:-/tmp}" | awk 'NR==2 {print $4}')
if (( free_kb < need_kb )) || (( tmp_free_kb < 3 * 1024 * 1024 )); then
    log "not enough disk: $((free_kb / 1048576)) GB free for the venv (need ${HF_VENV_MIN_FREE_GB:-8}), $((tmp_free_kb / 1048576)) GB in ${TMPDIR:-/tmp} (need 3)"
    exit 75
fi

start=$(date +%s)
if [[ ! -x "$venv/bin/python" ]]; then
    log "creating venv $venv"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input --no-cache-dir)
rm -f "$stamp_file"

if [[ "$full" == "1" ]]; then
    log "installing torch==$torch_version with all its dependencies (HF_VENV_FULL=1)"
    "${pip[@]}" install -q "torch==$torch_version"
    "${pip[@]}" install -q --no-deps -r "$req_rest"
else
    # PyPI's Linux x86_64 torch wheels are CUDA builds whose dependency list pulls ~4 GB of CUDA
    # wheels plus triton. --no-deps with an explicit list skips the parts `import torch` never loads.
    log "installing lean torch==$torch_version (+ the CUDA runtime libs it links) and transformers"
    "${pip[@]}" install -q --no-deps -r "$req_torch" -r "$req_rest"
fi

if ! smoke_test; then
    if [[ "$full" != "1" ]]; then
        log "lean install failed its smoke test; retrying with torch's full dependency set"
        "${pip[@]}" install -q "torch==$torch_version"
        smoke_test
    else
        exit 1
    fi
fi
echo "$stamp_want" >"$stamp_file"
log "done in $(( $(date +%s) - start )) s; venv size $(du -sh "$venv" | cut -f1)"
