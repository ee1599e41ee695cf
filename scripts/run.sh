#!/usr/bin/env bash
# One command from a fresh clone: set up .venv (torch + an editable build of dalle_fast, rebuilt
# when the C++/CUDA sources change) and run the benchmark, the tests, the demo or any dalle-fast
# command.
#
#   bash scripts/run.sh setup                                  only the setup
#   bash scripts/run.sh bench [bench/attention.py options]     CPU defaults when there is no GPU
#   bash scripts/run.sh test  [pytest options]
#   bash scripts/run.sh demo  [dalle-fast demo options]        e.g. --out demo
#   bash scripts/run.sh dalle-fast COMMAND [options]           e.g. dalle-fast train-vae --out runs/vae
#
# Environment: TORCH_SPEC (see scripts/setup.sh), DALLE_FAST_VENV (default .venv),
# DALLE_FAST_SKIP_SETUP=1 runs with the environment as it is (no check, no rebuild).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${DALLE_FAST_VENV:-$root/.venv}"
stamp="$venv/.dalle_fast_build"
hash="$(cat setup.py pyproject.toml requirements.txt csrc/sources.txt $(find csrc -type f | sort) | sha1sum | cut -d' ' -f1)"
case "${1:-}" in
  setup|bench|test|demo|dalle-fast) ;;
  *) echo "usage: bash scripts/run.sh setup|bench|test|demo|dalle-fast [options]" >&2; exit 2 ;;
esac
if [ "${DALLE_FAST_SKIP_SETUP:-0}" != "1" ] && { [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$hash" ]; }; then
  echo "setting up $venv (first run: installs torch and builds dalle_fast, see the README for how long)"
  DALLE_FAST_EDITABLE=1 bash scripts/setup.sh "$venv"
  echo "$hash" > "$stamp"
fi
cmd="${1:-}"
shift || true
case "$cmd" in
  setup) echo "ready: source $venv/bin/activate puts dalle-fast on the PATH" ;;
  bench) exec "$venv/bin/python" bench/attention.py "$@" ;;
  test) exec "$venv/bin/python" -m pytest tests -q "$@" ;;
  demo) exec "$venv/bin/dalle-fast" demo "$@" ;;
  dalle-fast) exec "$venv/bin/dalle-fast" "$@" ;;
esac
