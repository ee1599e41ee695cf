#!/usr/bin/env bash
# GPU check of dalle_fast on a fresh GPU machine (torch, triton, nvcc; no internet needed):
#   1. environment (GPU, driver, versions)       4. bench/decode.py / bench/sampling.py --quick (if present)
#   2. build dalle_fast._C in place (CUDA)       5. GPU tests, one pytest run per test file
#   3. bench/attention.py --device cuda (bf16),  6. bench/kernel_resources.py (static, this Triton)
#      bench/host_overhead.py --device cuda,      7. summary table (last)
#      bench/l2_bandwidth.py --device cuda
# The benchmarks run before the tests so that their numbers come in even when the tests use up the
# budget (the tests then reuse the kernels the benchmark compiled, from Triton's cache).
# Every step runs under `timeout`, a failed step does not stop the others, and the script exits
# non-zero if any step failed. The whole run is capped at DALLE_FAST_CHECK_BUDGET seconds (default
# 460, under 8 minutes on one H100). Logs and benchmark outputs go to ${OUT:-bench/out}.
#
#   bash bench/gpu_check.sh                 # PYTHON=/path/to/python to pick an interpreter
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
BUDGET="${DALLE_FAST_CHECK_BUDGET:-460}"
export MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET DALLE_FAST_BACKEND DALLE_FAST_SKIP_CUDA DALLE_FAST_TUNING_CACHE DALLE_FAST_TRITON_AUTOTUNE
# a fresh tuning cache, so that the benchmark times every candidate (its tuning table); the tests
# use private ones (tests/conftest.py)
export DALLE_FAST_CACHE_DIR="$OUT/tuning-cache"
rm -rf "$DALLE_FAST_CACHE_DIR"

T0=$(date +%s)
NAMES=()
RESULTS=()
SECONDS_USED=()
FAILED=0

# step NAME LIMIT_S CMD...: runs CMD under timeout (capped by what is left of the budget), logs to
# $OUT/NAME.log, shows the log's tail, records PASS / FAIL(rc) / TIMEOUT / SKIP.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - T0)))
  local log="$OUT/$name.log"
  NAMES+=("$name")
  if ((left < 10)); then
    RESULTS+=("SKIP(no time left)")
    SECONDS_USED+=(0)
    FAILED=1
    echo "=== $name: skipped, budget of ${BUDGET}s spent"
    return
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit}s): $*"
  local start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local took=$(($(date +%s) - start))
  SECONDS_USED+=("$took")
  if ((rc == 0)); then
    RESULTS+=("PASS")
  elif ((rc == 124 || rc == 137)); then
    RESULTS+=("TIMEOUT(${limit}s)")
    FAILED=1
  else
    RESULTS+=("FAIL(rc=$rc)")
    FAILED=1
  fi
  tail -n 25 "$log"
  echo "=== $name: ${RESULTS[-1]} in ${took}s (log: $log)"
}

skip() {  # skip NAME REASON
  NAMES+=("$1")
  RESULTS+=("SKIP($2)")
  SECONDS_USED+=(0)
  echo "=== $1: skipped ($2)"
}

# 1. environment --------------------------------------------------------------------------------
step env 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nvcc --version | tail -n 2; \
  $PY -c 'import sys, torch, triton; print(\"python\", sys.version.split()[0]); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda); print(\"triton\", triton.__version__); print(\"gpu\", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'"

# 2. build ----------------------------------------------------------------------------------------
step build 240 "$PY" setup.py build_ext --inplace
step import 60 "$PY" -c "import dalle_fast, torch; import dalle_fast._C; print('dalle_fast', dalle_fast.__version__, 'ok on', torch.cuda.get_device_name(0))"

# 3. attention benchmark --------------------------------------------------------------------------
if [[ -f bench/attention.py ]]; then
  # DALLE_FAST_TRITON_FLAT=1: the tuner also times the flat work-list forward (opt-in until measured)
  step bench_attention 230 env DALLE_FAST_TRITON_FLAT=1 "$PY" bench/attention.py --device cuda --dtype bfloat16 --batch 8 --heads 16 \
    --head-dim 64 --kinds row,col,conv,full --modes fwd,bwd,fwdbwd --quick-flex --out "$OUT/attention"
else
  NAMES+=("bench_attention"); RESULTS+=("FAIL(bench/attention.py missing)"); SECONDS_USED+=(0); FAILED=1
fi

# host time per call with real launches, tiny problem (dalle_fast vs SDPA causal)
step bench_host_overhead 60 "$PY" bench/host_overhead.py --device cuda --calls 200 --rounds 5 \
  --out "$OUT/host_overhead.json"

# read bandwidth from L2 and HBM, to set the tuning table's modelled L2 traffic (l2_tbs) against
step bench_l2 45 "$PY" bench/l2_bandwidth.py --device cuda --out "$OUT/l2_bandwidth.json"

# 4. decode / sampling benchmarks (when present) ----------------------------------------------------
for b in decode sampling; do
  if [[ -f "bench/$b.py" ]]; then
    step "bench_$b" 90 "$PY" "bench/$b.py" --device cuda --quick --out "$OUT/$b"
  else
    skip "bench_$b" "bench/$b.py not present"
  fi
done

# 5. GPU tests, one run per file (slow tests excluded): the files with GPU tests; the rest of the
# suite is CPU-only and runs in CI ---------------------------------------------------------------
GPU_TESTS="${GPU_TESTS:-tests/test_triton_attention.py tests/test_decode_attention.py tests/test_sample.py}"
# On the lent H200 image (torch 2.11, g++ 13.3) any C++ extension op that raises a c10::Error
# (even a five-line TORCH_CHECK op built with load_inline) kills the process with SIGSEGV. Probe
# for that and, where it happens, deselect the tests of C++ error paths (they pass on CPU in CI).
DESELECT="not slow"
if ! "$PY" -c "
import torch, dalle_fast
q = torch.zeros(1, 1, 4, 8)
try:
    torch.ops.dalle_fast.sparse_attention_fwd(q, q, q, 99, 1, 1, 1, 1, 1.0)
except RuntimeError:
    pass" >/dev/null 2>&1; then
  echo "NOTE: C++ exceptions crash this python environment; deselecting C++ error-path tests"
  DESELECT_K="not bad_inputs_raise and not test_errors"
fi
for f in $GPU_TESTS; do
  [[ -e "$f" ]] || continue
  name="test_$(basename "$f" .py | sed 's/^test_//')"
  step "$name" 240 "$PY" -m pytest "$f" -q -x -m "$DESELECT" ${DESELECT_K:+-k "$DESELECT_K"} -p no:cacheprovider
done

# static sm_90a resources with this machine's Triton (registers, spills, pipeline buffer depth of
# the default configurations; CI checks them with its own Triton release, which may allocate
# differently): last, so it only uses what the budget leaves
step kernel_resources 60 "$PY" bench/kernel_resources.py --kinds row,col,conv --defaults-only

# 6. summary --------------------------------------------------------------------------------------
for f in "$OUT"/attention/attention_cuda.csv; do
  [[ -f "$f" ]] && { echo "--- $f"; column -s, -t <"$f" 2>/dev/null || cat "$f"; }
done
[[ -f "$OUT/bench_attention.log" ]] && { echo "--- Triton tuner (kernel time of every candidate: $OUT/attention/attention_cuda_tuning.csv)"; grep -E "^#   (fwd|dkdv|dq) " "$OUT/bench_attention.log"; }
[[ -f "$OUT/bench_attention.log" ]] && sed -n '/speed targets/,/^# wrote/p' "$OUT/bench_attention.log" | grep -v '^# wrote'
[[ -f "$OUT/bench_host_overhead.log" ]] && { echo "--- host overhead"; tail -n 11 "$OUT/bench_host_overhead.log"; }
[[ -f "$OUT/bench_l2.log" ]] && { echo "--- read bandwidth (GB/s)"; grep -v '^# wrote' "$OUT/bench_l2.log" | tail -n 12; }
echo
echo "dalle_fast GPU check: $(date -u +%Y-%m-%dT%H:%MZ), total $(($(date +%s) - T0))s, outputs in $OUT"
printf '%-28s %-34s %8s\n' "step" "result" "seconds"
for i in "${!NAMES[@]}"; do
  printf '%-28s %-34s %8s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${SECONDS_USED[$i]}"
done
if ((FAILED)); then
  echo "GPU check: FAILED"
  exit 1
fi
echo "GPU check: all steps passed"
