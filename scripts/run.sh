#!/usr/bin/env bash
# One command from a fresh clone: set up .venv (torch + an editable build of dalle_fast, rebuilt
# when the C++/CUDA sources change) and run the benchmark, the tests or the demo.
#
#   bash scripts/run.sh bench [bench/attention.py options]    CPU defaults when there is no GPU
#   bash scripts/run.sh test  [pytest options]
#   bash scripts/run.sh demo  [dalle-fast demo options]     e.g. --out demo (about 15 min on 2 cores)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${DALLE_FAST_VENV:-$root/.venv}"
stamp="$venv/.dalle_fast_build"
hash="$(cat setup.py pyproject.toml requirements.txt csrc/sources.txt $(find csrc -type f | sort) | sha1sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$hash" ]; then
  echo "setting up $venv (first run: installs torch and builds dalle_fast, a few minutes)"
  DALLE_FAST_EDITABLE=1 bash scripts/setup.sh "$venv"
  echo "$hash" > "$stamp"
fi
cmd="${1:-}"
shift || true
case "$cmd" in
  bench) exec "$venv/bin/python" bench/attention.py "$@" ;;
  test) exec "$venv/bin/python" -m pytest tests -q "$@" ;;
  demo) exec "$venv/bin/dalle-fast" demo "$@" ;;
  *) echo "usage: bash scripts/run.sh bench|test|demo [options]" >&2; exit 2 ;;
esac
