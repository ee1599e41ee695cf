#!/usr/bin/env bash
# Creates (or reuses) a virtual environment and installs torch, the test tools and dalle_fast
# (built from this checkout, CUDA kernels included when torch has CUDA and nvcc is found).
#
#   bash scripts/setup.sh [VENV_DIR]          default .venv
#
# Environment: TORCH_SPEC (default torch==2.14.1: pip arguments, so on a machine without a GPU
# TORCH_SPEC="torch==2.14.1 --index-url https://download.pytorch.org/whl/cpu" takes the CPU wheel),
# DALLE_FAST_EDITABLE=1 for an editable install, MAX_JOBS (parallel compile jobs),
# DALLE_FAST_SKIP_CUDA=1 (CPU only).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(realpath -m "${1:-$root/.venv}")"  # absolute: used after cd below
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip setuptools wheel ninja
read -ra torch_spec <<< "${TORCH_SPEC:-torch==2.14.1}"  # (split: it may carry --index-url URL)
"${pip[@]}" install -q "${torch_spec[@]}"
"${pip[@]}" install -q -r "$root/requirements.txt"
# OpenAI's dVAE modules (converter test); --no-deps: its metadata pins torch/torchvision
"${pip[@]}" install -q --no-deps "dall-e==0.1" || echo "note: dall-e not installed; the converter tests will skip"
# DALLE-pytorch (adapter tests, bench --peer); --no-deps: it pins an old dependency tree
"${pip[@]}" install -q --no-deps -r "$root/requirements-dalle-pytorch.txt" \
  || echo "note: dalle-pytorch not installed; the adapter tests will skip"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [ "${DALLE_FAST_EDITABLE:-0}" = "1" ]; then
  "${pip[@]}" install -q --no-build-isolation --no-deps -e "$root"
else
  "${pip[@]}" install -q --no-build-isolation --no-deps "$root"
fi
# import check from outside the checkout (so the installed package is what gets imported)
(cd / && "$venv/bin/python" -c "import dalle_fast, torch; print('dalle_fast', dalle_fast.__version__, 'on torch', torch.__version__, 'from', dalle_fast.__file__)")
