"""bench/gpu_check.sh, the one script a lent GPU machine runs, run here on CPU with a stand-in for
Python: every step's command line must be one its script accepts (argparse, pytest's selection)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# stands in for $PYTHON: the build succeeds (or fails, SHIM_FAIL=build) without compiling; `-c`
# code that needs a GPU prints a line; a bench script parses its arguments with its own argparse
# parser and stops there; pytest collects the step's selection (exit 5 when it selects nothing).
# The script puts its checkout first on PYTHONPATH (on the GPU machine it builds in place); here
# the checkout may have no build, so the real Python gets this test's import path instead.
SHIM = r"""#!/usr/bin/env bash
echo "$*" >> "$SHIM_CALLS"
export PYTHONPATH="$SHIM_PYTHONPATH"
case "$1" in
  setup.py) [[ "${SHIM_FAIL:-}" == build ]] && exit 7; echo "shim: build skipped"; exit 0 ;;
  -c) if [[ "$2" == *cuda* ]]; then echo "shim: $2" | head -c 200; exit 0; fi
      exec "$SHIM_REAL" "$@" ;;
  -m) [[ "$2" == pytest ]] || exit 3
      shift 2; exec "$SHIM_REAL" -P -m pytest --collect-only "$@" ;;  # -P: not the cwd (the checkout) first
  bench/*.py) exec "$SHIM_REAL" "$SHIM_ARGCHECK" "$@" ;;
esac
echo "shim: unexpected call: $*" >&2
exit 3
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

STEPS = ["env", "build", "import", "bench_attention", "bench_host_overhead", "bench_l2", "bench_decode",
         "bench_sampling", "test_triton_attention", "test_decode_attention", "test_sample", "kernel_resources"]


def _run_check(tmp_path, **extra):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("nvidia-smi", "nvcc"):
        (bin_dir / tool).write_text("#!/usr/bin/env bash\necho shim-" + tool + "\n")
    shim = bin_dir / "python-shim"
    shim.write_text(SHIM)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    (tmp_path / "argcheck.py").write_text(ARGCHECK)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRITON_", "DALLE_FAST_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHON=str(shim), OUT=str(tmp_path / "out"),
               SHIM_REAL=sys.executable, SHIM_ARGCHECK=str(tmp_path / "argcheck.py"),
               SHIM_CALLS=str(tmp_path / "calls.txt"), SHIM_PYTHONPATH=os.pathsep.join(sys.path), **extra)
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
    assert list(table) == STEPS and set(table.values()) == {"PASS"}, out[-4000:]
    for name in ("attention.py", "host_overhead.py", "l2_bandwidth.py", "decode.py", "sampling.py",
                 "kernel_resources.py"):  # each bench step reached its script's parser
        assert f"argcheck ok: bench/{name}" in (tmp_path / "out" / f"{_log(name)}.log").read_text()
    for test in ("triton_attention", "decode_attention", "sample"):  # and each test step selects tests
        log = (tmp_path / "out" / f"test_{test}.log").read_text()
        assert re.search(r"\b[1-9]\d* tests? collected", log), log[-2000:]
    bench = next(c for c in calls if c.startswith("bench/attention.py"))
    assert "--device cuda" in bench and "--dtype bfloat16" in bench and "--kinds row,col,conv,full" in bench


def _log(script):
    return {"attention.py": "bench_attention", "host_overhead.py": "bench_host_overhead",
            "l2_bandwidth.py": "bench_l2", "decode.py": "bench_decode", "sampling.py": "bench_sampling",
            "kernel_resources.py": "kernel_resources"}[script]


@NEEDS
def test_gpu_check_goes_on_after_a_failed_step(tmp_path):
    r, table, _ = _run_check(tmp_path, SHIM_FAIL="build", GPU_TESTS="tests/test_sample.py")
    assert r.returncode == 1 and "GPU check: FAILED" in r.stdout, (r.stdout + r.stderr)[-4000:]
    assert table["build"] == "FAIL(rc=7)"
    assert all(table[s] == "PASS" for s in table if s != "build") and "bench_attention" in table
    assert "test_sample" in table and "test_triton_attention" not in table
