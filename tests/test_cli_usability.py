"""The command line as a user meets it: --help with every default, one-line warnings, Ctrl-C and
SIGTERM that finish the step, save and resume to the same weights, viewable grids, unknown words."""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from dalle_fast import checkpoint as ck
from dalle_fast.cli import HelpFormatter, build_parser, main
from dalle_fast.images import save_grid
from dalle_fast.train import TrainConfig, Trainer, TrainingInterrupted, _StopOnSignal, dvae_loss, image_collate

torch.set_num_threads(1)


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_help_shows_every_default_and_every_option_has_help():
    fmt = HelpFormatter("dalle-fast")
    for name, p in _subcommands().items():
        for action in p._actions:
            if action.dest == "help":
                continue
            what = f"dalle-fast {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{what}: no help text"
            shown = fmt._get_help_string(action) % {"default": action.default}
            if not action.option_strings or action.required or isinstance(action.default, bool):
                continue  # positionals, required options and flags have no default to show
            if action.default in (None, []):
                assert "default" in action.help, f"{what}: the help does not say what happens without it"
            else:
                assert f"(default: {action.default})" in shown, f"{what}: {shown!r}"
    text = _subcommands()["train"].format_help()
    for flag, default in (("--steps", "1200"), ("--batch-size", "64"), ("--checkpoint-every", "500")):
        assert flag in text and f"(default: {default})" in " ".join(text.split())
    assert "(default: samples)" in _subcommands()["generate"].format_help()


def test_warnings_are_one_line_and_resume_says_where_it_resumed(tmp_path, capsys):
    argv = ["train-vae", "--preset", "tiny", "--image-size", "16", "--steps", "2", "--batch-size", "4",
            "--shapes-length", "8", "--out", str(tmp_path), "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    capsys.readouterr()
    longer = [("3" if a == "2" and argv[i - 1] == "--steps" else a) for i, a in enumerate(argv)]
    assert main(longer + ["--resume", "auto"]) == 0  # another --steps: the schedule warning
    cap = capsys.readouterr()
    assert f"resuming from {tmp_path / 'checkpoint-00000002.json'} (step 2 of 3)" in cap.out
    lines = cap.err.splitlines()
    warned = [line for line in lines if "learning-rate schedule" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: resuming with steps=3"), cap.err
    assert "warnings.warn" not in cap.err and "UserWarning" not in cap.err and len(lines) == 1, cap.err


# -- interrupts ----------------------------------------------------------------------------------
STEPS = 40
TRAIN = ["train-vae", "--preset", "tiny", "--image-size", "8", "--shapes-length", "64", "--batch-size", "4",
         "--steps", str(STEPS), "--log-every", "1", "--checkpoint-every", "1000", "--device", "cpu", "--no-progress"]


def _start(out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "dalle_fast.cli", *TRAIN, "--out", str(out), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # (a background
    # job's shell ignores SIGINT, and training leaves an ignored signal ignored)


def _wait_for_step(proc, out, step, timeout=120):
    """Wait until the run in ``out`` has logged ``step`` (it is then inside its training loop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
        except (FileNotFoundError, IndexError, ValueError):  # not yet written, or a line being written
            last = 0
        if last >= step:
            return
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"the run did not reach step {step} in {timeout} s")


def _interrupt(proc, out, sig, after_step):
    _wait_for_step(proc, out, after_step)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (proc.returncode, stderr)
    saved = ck.latest_checkpoint(out)
    step = ck.load_checkpoint(saved).step
    assert after_step <= step < STEPS
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last == (f"dalle-fast train-vae: stopped by {signal.Signals(sig).name} after step {step}; checkpoint "
                    f"{saved}; resume with: dalle-fast {' '.join(TRAIN)} --out {out} --resume auto"), stderr
    return step, stdout


def test_sigterm_and_ctrl_c_save_the_step_and_resume_to_the_same_weights(tmp_path):
    out = tmp_path / "interrupted"
    # SIGTERM (a preempted job) -> 143, then the resumed run gets Ctrl-C (SIGINT) -> 130
    first, _ = _interrupt(_start(out), out, signal.SIGTERM, after_step=3)
    second, stdout = _interrupt(_start(out, "--resume", "auto"), out, signal.SIGINT, after_step=first + 3)
    assert f"resuming from {out / f'checkpoint-{first:08d}.json'} (step {first} of {STEPS})" in stdout
    assert first < second
    assert main([*TRAIN, "--out", str(out), "--resume", "auto"]) == 0
    assert main([*TRAIN, "--out", str(tmp_path / "straight")]) == 0
    resumed, straight = (ck.load_checkpoint(tmp_path / d) for d in ("interrupted", "straight"))
    assert resumed.step == straight.step == STEPS
    for name, value in straight.model_state.items():
        assert torch.equal(value, resumed.model_state[name]), name
    for name, value in straight.optimizer_state["state"][0].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed.optimizer_state["state"][0][name])), name


@pytest.fixture(autouse=True)
def _sigint_handled():
    """Python's own SIGINT handler, also where the test run inherited SIGINT ignored (a background job)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_second_signal_aborts_at_once():
    with _StopOnSignal(announce=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)  # the first: recorded, the step goes on
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # (the handler runs between bytecodes: it must not get here)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back


def test_interrupt_in_the_library_raises_after_saving(tmp_path, monkeypatch):
    from dalle_fast.data.shapes import ShapesDataset
    from dalle_fast.models.dvae import DVAE, DVAEConfig
    cfg = DVAEConfig(image_size=16, vocab_size=16, n_hid=8, n_init=8, n_blk_per_group=1, group_count=2)
    trainer = Trainer(DVAE(cfg), dvae_loss, ShapesDataset(size=16, length=8), TrainConfig(
        steps=10, batch_size=4, warmup_steps=1, progress=False), tmp_path, collate_fn=image_collate,
        model_type="dvae", model_config=cfg, device="cpu")
    loss = trainer.loss_fn

    def signalled_at_step_3(model, batch, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return loss(model, batch, step)

    trainer.loss_fn = signalled_at_step_3
    with pytest.raises(TrainingInterrupted) as err:
        trainer.fit()
    assert err.value.exit_code == 130 and err.value.step == 4 and trainer.step == 4  # step 3 was finished
    assert err.value.checkpoint == ck.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-00000004.json"


# -- outputs -------------------------------------------------------------------------------------
def test_grids_are_saved_viewable_and_at_the_original_size(tmp_path):
    images = torch.rand(5, 3, 32, 32)
    original = save_grid(images, tmp_path / "grid.png")
    assert original == tmp_path / "grid-1x.png"
    small, big = Image.open(original), Image.open(tmp_path / "grid.png")
    assert small.size == (2 + 3 * 34, 2 + 2 * 34)  # 3 columns, 2 rows, 2 px gaps
    assert big.size == (4 * small.width, 4 * small.height)  # 32 px -> 128 px
    assert big.resize(small.size, Image.Resampling.NEAREST).tobytes() == small.tobytes()  # nearest neighbour
    save_grid(torch.rand(1, 3, 256, 256), tmp_path / "big.png")  # large images are not scaled
    assert Image.open(tmp_path / "big.png").size == Image.open(tmp_path / "big-1x.png").size == (260, 260)


def test_unknown_caption_words_are_reported_once(recwarn):
    from dalle_fast.data.shapes import ShapesDataset
    from dalle_fast.generate import _warn_unknown_words
    from dalle_fast.tokenizer import Tokenizer, UnknownWordsWarning
    tok = Tokenizer.train(ShapesDataset(32, 500, 0, max_shapes=1).captions(), vocab_size=1000, text_len=16)
    assert tok.unknown_words("a small red circle in the top left") == []
    assert tok.unknown_words("Red Circle, on the left!") == []  # case, punctuation, first word
    assert tok.unknown_words("a purple star above a xylophone star") == ["star", "above", "xylophone"]
    _warn_unknown_words(tok, ["a red star", "a red star", "a blue circle on the left", "a big circle"])
    warned = [w for w in recwarn if w.category is UnknownWordsWarning]
    assert len(warned) == 1
    assert str(warned[0].message).startswith("caption 'a red star': 'star'; caption 'a big circle': 'big' -- ")
