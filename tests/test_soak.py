"""Soak: the training commands killed with SIGKILL at random moments (during steps, during checkpoint
writes) and resumed with --resume auto until they finish end with the same weights, optimizer state
and per-step losses as an uninterrupted run, and leave no temporary or damaged files behind.
`dalle-fast train` (the transformer) is killed 4 times, train-vae and train-clip twice each."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dalle_fast
from dalle_fast import checkpoint as ck
from dalle_fast.cli import main
from dalle_fast.data.shapes import ShapesDataset
from dalle_fast.tokenizer import Tokenizer

ROOT = Path(dalle_fast.__file__).resolve().parents[1]
COMMON = ["--batch-size", "4", "--shapes-length", "16", "--no-progress", "--device", "cpu", "--checkpoint-every", "2",
          "--keep-checkpoints", "2", "--log-every", "1"]
DEADLINE_S = 150  # the whole interrupted run of one command; a hang fails instead of stalling CI


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A trained-for-one-step dVAE and a tokenizer, shared by the runs."""
    root = tmp_path_factory.mktemp("soak")
    torch.set_num_threads(1)  # as the child processes (OMP_NUM_THREADS=1): the same float sums
    assert main(["train-vae", "--steps", "1", "--image-size", "16", "--out", str(root / "dvae")] + COMMON) == 0
    data = ShapesDataset(size=16, length=16, seed=0)
    Tokenizer.train([data[i]["caption"] for i in range(16)], vocab_size=300, text_len=16).save(root / "tok.json")
    return root


def commands(inputs):
    return {
        "train": ["train", "--dvae", str(inputs / "dvae"), "--tokenizer", str(inputs / "tok.json"), "--steps", "16"],
        "train-vae": ["train-vae", "--image-size", "16", "--steps", "10"],
        "train-clip": ["train-clip", "--tokenizer", str(inputs / "tok.json"), "--steps", "10"],
    }


def newest_step(out: Path) -> int:
    found = ck.latest_checkpoint(out)
    return ck.checkpoint_step(found) if found else 0


def writing(out: Path) -> bool:
    return any(p.name.startswith(".checkpoint-") and p.name.endswith(".tmp") for p in out.iterdir())


def interrupted_run(argv, out: Path, kills: int, seed: int) -> list[str]:
    """Run ``argv`` in child processes until it finishes, killing each of the first ``kills`` with
    SIGKILL once it has written a new checkpoint: right away, after a random pause, or as soon as a
    checkpoint write is seen in progress. Returns how each kill landed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    rng = random.Random(seed)
    start, landed = time.monotonic(), []
    out.mkdir(parents=True, exist_ok=True)
    for attempt in range(kills + 1):
        resume = ["--resume", "auto"] if attempt else []
        log = open(out.parent / f"{out.name}-{attempt}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "dalle_fast.cli", *argv, *COMMON, "--out", str(out), *resume],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            if attempt < kills:
                before = newest_step(out)
                while newest_step(out) <= before and proc.poll() is None:
                    assert time.monotonic() - start < DEADLINE_S, "interrupted run took too long"
                    time.sleep(0.005)
                how = ("during a checkpoint write", "after a pause", "right after a checkpoint")[attempt % 3]
                if how == "after a pause":
                    time.sleep(rng.uniform(0.0, 0.3))
                elif how == "during a checkpoint write":
                    until = time.monotonic() + 5
                    while not writing(out) and proc.poll() is None and time.monotonic() < until:
                        pass  # busy-poll: a tiny checkpoint takes milliseconds to write
                    how = how if writing(out) else "after the next step (no write caught)"
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
                    landed.append(how)
                proc.wait()
            else:
                assert proc.wait(timeout=max(1, DEADLINE_S - (time.monotonic() - start))) == 0, \
                    (out.parent / f"{out.name}-{attempt}.log").read_text()[-2000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    return landed


def losses(out: Path) -> dict[int, dict[str, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"metrics.jsonl lost or repeated steps: {steps}"
    return {r["step"]: {k: v for k, v in r.items() if k not in ("images_per_s",)} for r in records}


@pytest.mark.parametrize("command,kills", [("train", 4), ("train-vae", 2), ("train-clip", 2)])
def test_kill_and_resume_equals_an_uninterrupted_run(inputs, tmp_path, command, kills):
    argv = commands(inputs)[command]
    straight = tmp_path / "straight"
    assert main(argv + COMMON + ["--out", str(straight)]) == 0
    landed = interrupted_run(argv, tmp_path / "killed", kills, seed=len(command))
    assert len(landed) == kills, landed
    a, b = ck.load_checkpoint(straight), ck.load_checkpoint(tmp_path / "killed")
    assert a.step == b.step
    assert a.model_state.keys() == b.model_state.keys()
    for name in a.model_state:
        assert torch.equal(a.model_state[name], b.model_state[name]), f"{command}: {name} differs ({landed})"
    for pid, state in a.optimizer_state["state"].items():
        for name, value in state.items():
            other = b.optimizer_state["state"][pid][name]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), (command, pid, name)
    assert losses(straight) == losses(tmp_path / "killed")
    leftovers = [p.name for p in (tmp_path / "killed").iterdir() if p.name.endswith((".tmp", ".damaged"))]
    assert not leftovers, leftovers
