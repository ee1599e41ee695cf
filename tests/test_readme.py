"""Every command of README.md runs as written, with shortened step counts, so the README cannot go
stale: a command this file does not know how to run fails the test until it is taught here."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dalle_fast.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent  # the environment's bin/ (.venv/bin after scripts/run.sh setup)

# what each `dalle-fast` command gets appended to run in seconds (argparse keeps the last value)
SHORT = {
    "train-vae": ["--steps", "2", "--warmup-steps", "1", "--shapes-length", "16", "--batch-size", "4"],
    "train-clip": ["--steps", "2", "--warmup-steps", "1", "--shapes-length", "16", "--batch-size", "4"],
    "train": ["--steps", "2", "--warmup-steps", "1", "--shapes-length", "16", "--batch-size", "4"],
    "generate": ["-n", "2"],
    "demo": ["--quick"],
}
BENCH_SHORT = ["--device", "cpu", "--kinds", "row", "--modes", "fwd", "--providers", "sdpa_mask", "--batch", "1",
               "--heads", "1", "--head-dim", "8", "--text-len", "4", "--image-size", "2", "--repeats", "1",
               "--warmup", "0"]


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def commands() -> list[list[str]]:
    """The commands of the README's bash blocks (continuation lines joined, comments dropped)."""
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                out.append(argv)
    return out


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DALLE_FAST_SKIP_SETUP",
                                                             "DALLE_FAST_VENV", "TORCH_SPEC")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _fake_venv(tmp_path: Path) -> Path:
    """A virtual environment whose python records its arguments instead of installing anything:
    what scripts/run.sh setup asks pip for, without a download."""
    venv = tmp_path / "fake-venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" '--' >> {venv / 'calls.txt'}\n")
    python.chmod(0o755)
    return venv


def _run_setup(argv: list[str], tmp_path: Path) -> list[list[str]]:
    """``[VAR=value ...] bash scripts/run.sh setup`` against a fake environment; returns its python calls."""
    assignments = dict(a.split("=", 1) for a in argv[:argv.index("bash")])
    venv = _fake_venv(tmp_path / f"setup-{len(list(tmp_path.glob('setup-*')))}")
    r = subprocess.run(argv[argv.index("bash"):], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**_env(), **assignments, "DALLE_FAST_VENV": str(venv)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"source {venv}/bin/activate" in r.stdout
    calls = [c.strip("\n").split("\n") for c in (venv / "calls.txt").read_text().split("--\n") if c.strip()]
    return calls


def test_every_readme_command_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ran = []
    for argv in commands():
        line = shlex.join(argv)
        if argv[0] == "dalle-fast":
            short = [*argv[1:], *SHORT.get(argv[1], []), "--no-progress"]
            if argv[1] not in ("generate", "demo"):
                short += ["--device", "cpu"]
            assert main(short) == 0, line
        elif argv[0] == "torchrun":
            r = subprocess.run([sys.executable, "-m", "torch.distributed.run", *argv[1:], *SHORT["train-vae"],
                                "--no-progress", "--device", "cpu"], capture_output=True, text=True, timeout=300,
                               env=_env())
            assert r.returncode == 0, line + "\n" + r.stdout[-2000:] + r.stderr[-2000:]
        elif argv[:2] == ["source", ".venv/bin/activate"]:
            # the environment's bin/ holds the dalle-fast entry point that activating puts on the PATH
            r = subprocess.run([str(BIN / "dalle-fast"), "--help"], capture_output=True, text=True, timeout=120,
                               env=_env())
            assert r.returncode == 0 and "train-vae" in r.stdout, r.stdout + r.stderr
        elif argv[-2:] == ["scripts/run.sh", "setup"]:
            calls = _run_setup(argv, tmp_path)
            spec = dict(a.split("=", 1) for a in argv[:argv.index("bash")]).get("TORCH_SPEC", "torch==2.14.1")
            torch_call = next(c for c in calls if c[:3] == ["-m", "pip", "install"] and c[4].startswith("torch=="))
            assert torch_call[4:] == shlex.split(spec), torch_call  # (the CPU wheel's --index-url: own arguments)
            assert any("-e" in c and str(ROOT) in c for c in calls), calls  # dalle_fast from this checkout
        elif argv[:3] == ["bash", "scripts/run.sh", "bench"]:
            r = subprocess.run([*argv, *BENCH_SHORT, "--out", str(tmp_path / "bench")], cwd=ROOT, capture_output=True,
                               text=True, timeout=300,
                               env=_env(DALLE_FAST_SKIP_SETUP="1", DALLE_FAST_VENV=str(BIN.parent)))
            assert r.returncode == 0 and "row" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
        elif argv[:3] == ["bash", "scripts/run.sh", "test"]:
            # the whole suite, this file among it, is what CI runs (here it would run itself)
            assert re.search(r"pytest\S* \S*tests", (ROOT / ".ci" / "run").read_text())
        else:
            pytest.fail(f"README command not run by any test: {line!r} (teach tests/test_readme.py to run it)")
        ran.append(argv[0] if argv[0] != "dalle-fast" else f"dalle-fast {argv[1]}")
    # the README's recipe really ran end to end: its outputs exist
    assert (tmp_path / "samples" / "grid-0.png").is_file() and (tmp_path / "samples" / "grid-0-1x.png").is_file()
    assert {"dalle-fast train-vae", "dalle-fast train-clip", "dalle-fast train", "dalle-fast generate"} <= set(ran)


def test_readme_python_examples_run():
    runnable = [b for b in blocks("python") if b.startswith("import ")]
    assert runnable, "the README's self-contained Python example is gone"
    torch.manual_seed(0)
    for block in runnable:
        exec(compile(block, "README.md", "exec"), {})
