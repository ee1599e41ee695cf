"""bench/gpu_check.sh, the one script a lent GPU machine runs, run here on CPU with a stand-in for
Python: every step's command line must be one its script accepts (argparse, pytest's selection);
the decode path comes first (the CUDA build, the decode tests and benchmarks), then the deciding
run in its order, which ends in the deciding table (decide.json), also printed last."""

import json

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# stands in for $PYTHON: the build succeeds (or fails, SHIM_FAIL=build) without compiling; `-c`
# code that needs a GPU prints a line (the probe for a built extension succeeds, or fails with
# SHIM_NO_EXT=1);
# a bench script parses its arguments with its own argparse parser and stops there, except the
# deciding table's, which runs (it reads the JSON files the steps left, none here); pytest
# collects the step's selection (exit 5 when it selects nothing).
# The script puts its checkout first on PYTHONPATH (on the GPU machine it builds in place); here
# the checkout may have no build, so the real Python gets this test's import path instead.
SHIM = r"""#!/usr/bin/env bash
echo "$*" >> "$SHIM_CALLS"
export PYTHONPATH="$SHIM_PYTHONPATH"
case "$1" in
  setup.py) echo "setup.py DALLE_FAST_SKIP_CUDA=${DALLE_FAST_SKIP_CUDA:-}" >> "$SHIM_CALLS"
            [[ "${SHIM_FAIL:-}" == build ]] && exit 7; echo "shim: build skipped"; exit 0 ;;
  -c) if [[ "$2" == *cuda* ]]; then echo "shim: $2" | head -c 200; exit 0; fi
      # the probe for a built extension answers as the test says, whatever this checkout holds
      [[ "$2" == "import dalle_fast._C" ]] && { [[ -n "${SHIM_NO_EXT:-}" ]] && exit 1; exit 0; }
      exec "$SHIM_REAL" "$@" ;;
  -m) [[ "$2" == pytest ]] || exit 3
      shift 2; exec "$SHIM_REAL" -P -m pytest --collect-only "$@" ;;  # -P: not the cwd (the checkout) first
  bench/gpu_decide.py) exec "$SHIM_REAL" "$@" ;;
  bench/*.py) exec "$SHIM_REAL" "$SHIM_ARGCHECK" "$@" ;;
esac
echo "shim: unexpected call: $*" >&2
exit 3
"""

# stands in for ncu: records its options and runs the profiled command (from $PYTHON on)
NCU_SHIM = r"""#!/usr/bin/env bash
echo "ncu $*" >> "$SHIM_CALLS"
while (($#)) && [[ "$1" != "$PYTHON" ]]; do shift; done
exec "$@"
"""

# runs a bench script as __main__ until its parser has parsed the arguments
ARGCHECK = r"""
import argparse, runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
parse = argparse.ArgumentParser.parse_args
def parse_and_stop(self, args=None, namespace=None):
    ns = parse(self, args, namespace)
    print("argcheck ok:", script, vars(ns))
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = parse_and_stop
runpy.run_path(script, run_name="__main__")
raise SystemExit(f"argcheck: {script} parsed no arguments")
"""

NEEDS = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None
                           or sys.version_info < (3, 11), reason="needs bash, timeout and python -P (3.11)")

DECODE = ["env", "build", "import", "test_decode_attention", "bench_decode", "bench_generate", "test_generation",
          "test_sample", "bench_sampling"]
DECIDING = ["decide_kernels", "decide_baselines", "decide_l2", "decide_ncu", "decide_summary"]
STEPS = DECODE + DECIDING + ["bench_attention", "bench_host_overhead", "test_triton_attention", "kernel_resources"]


def _run_check(tmp_path, **extra):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("nvidia-smi", "nvcc"):
        (bin_dir / tool).write_text("#!/usr/bin/env bash\necho shim-" + tool + "\n")
    shim = bin_dir / "python-shim"
    shim.write_text(SHIM)
    (bin_dir / "ncu-shim").write_text(NCU_SHIM)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    (tmp_path / "argcheck.py").write_text(ARGCHECK)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRITON_", "DALLE_FAST_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHON=str(shim), OUT=str(tmp_path / "out"),
               SHIM_REAL=sys.executable, SHIM_ARGCHECK=str(tmp_path / "argcheck.py"),
               SHIM_CALLS=str(tmp_path / "calls.txt"), SHIM_PYTHONPATH=os.pathsep.join(sys.path), NCU="")
    env.update({k: str(bin_dir / "ncu-shim") if v == "ncu-shim" else v for k, v in extra.items()})
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    table = {}
    for line in r.stdout.splitlines():
        m = re.match(r"^(\S+)\s+(PASS|FAIL\S*|TIMEOUT\S*|SKIP.*?)\s+(\d+)$", line)
        if m:
            table[m.group(1)] = m.group(2)
    return r, table, (tmp_path / "calls.txt").read_text().splitlines()


@NEEDS
def test_gpu_check_steps_pass_their_scripts_argument_checks(tmp_path):
    r, table, calls = _run_check(tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "GPU check: all steps passed" in r.stdout, out[-4000:]
    assert list(table) == STEPS, out[-4000:]
    skipped = {"decide_ncu": "SKIP(ncu not found)"}
    assert table == {s: skipped.get(s, "PASS") for s in STEPS}, out[-4000:]
    for log, script in LOGS.items():  # each bench step reached its script's parser
        assert f"argcheck ok: bench/{script}" in (tmp_path / "out" / f"{log}.log").read_text(), log
    for test in ("triton_attention", "decode_attention", "generation", "sample"):  # and each test step selects tests
        log = (tmp_path / "out" / f"test_{test}.log").read_text()
        assert re.search(r"\b[1-9]\d* tests? collected", log), log[-2000:]
    # the CUDA build and the decode path first, then the deciding run in priority order, then the rest
    attention = [c for c in calls if c.startswith("bench/attention.py")]
    kernels, baselines, fwdbwd = attention
    for c in attention:
        assert "--device cuda" in c and "--dtype bfloat16" in c and "--kinds row,col,conv,full" in c
        assert "--batch 8 --heads 16 --head-dim 64" in c
    assert "--modes fwd,bwd" in kernels and "--providers dalle_fast,sdpa_causal" in kernels
    assert "--triton-path portable,hopper" in kernels and "--kernel-split" in kernels
    assert "--modes fwd,bwd" in baselines and "flex128,flex64" in baselines and "dalle_fast" not in baselines
    assert "--modes fwdbwd" in fwdbwd and "--triton-path portable,hopper" in fwdbwd
    first = [c.split()[0] for c in calls if c.startswith(("bench/", "setup.py")) and "DALLE_FAST_SKIP" not in c]
    assert first[:8] == ["setup.py", "bench/decode.py", "bench/generate.py", "bench/sampling.py", "bench/attention.py",
                         "bench/attention.py", "bench/l2_bandwidth.py", "bench/gpu_decide.py"], first
    generate = next(c for c in calls if c.startswith("bench/generate.py"))
    assert "--no-graph" in generate and "--preset small" in generate and "--device cuda" in generate
    assert [c for c in calls if c.startswith("setup.py DALLE_FAST")] == ["setup.py DALLE_FAST_SKIP_CUDA="]  # the CUDA build
    _check_deciding_table(tmp_path, r.stdout)


LOGS = {"decide_kernels": "attention.py", "decide_baselines": "attention.py", "decide_l2": "l2_bandwidth.py",
        "bench_attention": "attention.py", "bench_generate": "generate.py", "bench_host_overhead": "host_overhead.py", "bench_decode": "decode.py",
        "bench_sampling": "sampling.py", "kernel_resources": "kernel_resources.py"}


def _check_deciding_table(tmp_path, stdout):
    """decide.json written into $OUT (nothing measured here), and the deciding table printed after the
    step table, last but for the verdict."""
    decide = json.loads((tmp_path / "out" / "decide.json").read_text())
    assert decide["kernel_only"] == [] and decide["inputs"] == [] and decide["ncu"] == []
    assert "# deciding run:" in (tmp_path / "out" / "decide_summary.log").read_text()
    lines = stdout.splitlines()
    steps_at = lines.index(next(ln for ln in lines if ln.startswith("step ") and "result" in ln))
    table_at = lines.index(next(ln for ln in lines if ln.startswith("--- deciding table")))
    assert steps_at < table_at and lines[table_at + 1].startswith("# deciding run:"), stdout[-3000:]
    assert any(ln.startswith("kind  mode") for ln in lines[table_at:])
    assert lines[-2] == f"# wrote {tmp_path / 'out' / 'decide.json'}" and lines[-1].startswith("GPU check:")


@NEEDS
def test_gpu_check_goes_on_after_a_failed_step(tmp_path):
    """A failed CUDA build with no extension to import is followed by the CPU build alone
    (DALLE_FAST_SKIP_CUDA=1); a failed build (both fail here) stops no other step; with ncu present
    the forward is profiled."""
    r, table, calls = _run_check(tmp_path, SHIM_FAIL="build", SHIM_NO_EXT="1", NCU="ncu-shim",
                                 GPU_TESTS="tests/test_sample.py")
    assert r.returncode == 1 and "GPU check: FAILED" in r.stdout, (r.stdout + r.stderr)[-4000:]
    assert table["build_cpu"] == table["build"] == "FAIL(rc=7)"
    assert all(table[s] == "PASS" for s in table if s not in ("build_cpu", "build")) and "bench_attention" in table
    assert "test_sample" in table and "test_triton_attention" not in table
    assert [c for c in calls if c.startswith("setup.py DALLE_FAST")] == ["setup.py DALLE_FAST_SKIP_CUDA=",
                                                              "setup.py DALLE_FAST_SKIP_CUDA=1"]
    ncu = next(c for c in calls if c.startswith("ncu "))
    for option in ("--profile-from-start off", "--section SpeedOfLight", "--csv", "--page details",
                   "regex:^(_fwd_hopper|_attn_fwd)"):
        assert option in ncu, ncu
    assert "argcheck ok: bench/ncu_forward.py" in (tmp_path / "out" / "decide_ncu.log").read_text()
    steps = list(table)
    assert steps[:3] == ["env", "build", "build_cpu"] and steps.index("bench_decode") < steps.index("decide_ncu")
