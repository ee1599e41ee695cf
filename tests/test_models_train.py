"""Trainer: schedule, atomic checkpoints, exact resume, 2-process DDP, CLI smoke run."""
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from dalle_fast import checkpoint as ck
from dalle_fast.cli import SUBCOMMANDS, build_parser, main
from dalle_fast.data.shapes import ShapesDataset
from dalle_fast.models.clip import CLIP, CLIPConfig
from dalle_fast.models.dvae import DVAE, DVAEConfig
from dalle_fast.train import TokenizingCollate, TrainConfig, Trainer, clip_loss, dvae_loss, image_collate, lr_at

torch.set_num_threads(1)
MICRO = DVAEConfig(image_size=16, vocab_size=64, n_hid=16, n_init=16, n_blk_per_group=1, group_count=2,
                   tau_anneal_steps=20, kl_warmup_steps=5)


def micro_trainer(out_dir, steps, **kw):
    torch.manual_seed(123)
    cfg = TrainConfig(steps=steps, batch_size=4, lr=3e-3, warmup_steps=2, checkpoint_every=kw.pop("every", 1000),
                      progress=False, seed=7, log_every=1, **kw)
    # 10 items / batch 4 -> 2 steps per epoch, so runs cross epoch boundaries
    return Trainer(DVAE(MICRO), dvae_loss, ShapesDataset(size=16, length=10, seed=1), cfg, out_dir,
                   collate_fn=image_collate, model_type="dvae", model_config=MICRO, device="cpu")


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "x.bin"
    ck.atomic_write(target, b"old")

    def boom(fd):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        ck.atomic_write(target, b"new contents")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]  # temp file cleaned up


def test_checkpoint_roundtrip(tmp_path):
    t = micro_trainer(tmp_path, steps=3)
    t.fit()
    path = ck.latest_checkpoint(tmp_path)
    assert path.name == "checkpoint-00000003.json"
    meta = json.loads(path.read_text())
    assert meta["step"] == 3 and meta["model_type"] == "dvae" and meta["model_config"]["vocab_size"] == 64
    loaded = ck.load_checkpoint(tmp_path)
    for k, v in t.model.state_dict().items():
        assert torch.equal(loaded.model_state[k], v.cpu())
    opt = t.optimizer.state_dict()
    for pid, state in opt["state"].items():
        for name, value in state.items():
            assert torch.equal(loaded.optimizer_state["state"][pid][name], value)
    model = ck.load_model(path)
    assert isinstance(model, DVAE) and model.config == MICRO and not model.training
    # no pickle anywhere: the weights file is plain safetensors, the rest JSON
    assert (tmp_path / "checkpoint-00000003.safetensors").read_bytes()[8:9] == b"{"
    # a damaged weights file is detected
    w = tmp_path / "checkpoint-00000003.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        ck.load_checkpoint(path)


def test_rng_state_roundtrip():
    import random
    state = ck.get_rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    json.loads(json.dumps(state))  # JSON-serialisable
    ck.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_keep_checkpoints(tmp_path):
    micro_trainer(tmp_path, steps=5, every=1, keep_checkpoints=2).fit()
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["checkpoint-00000004.json", "checkpoint-00000005.json"]
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_exact_resume(tmp_path):
    straight = micro_trainer(tmp_path / "a", steps=6)
    straight.fit()
    first = micro_trainer(tmp_path / "b", steps=3)
    first.fit()
    torch.manual_seed(999)  # a different process state: init, global RNG
    np.random.seed(5)
    resumed = micro_trainer(tmp_path / "b", steps=6)
    # (the first 3 steps' learning rates happen not to depend on steps: warmup, then cosine from 1.0)
    with pytest.warns(UserWarning, match="steps=6 \\(checkpoint: 3\\).*learning-rate schedule"):
        resumed.fit(resume="auto")
    assert resumed.step == 6
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    # and the run really depended on the restored state: resuming without RNG/optimizer differs
    fresh = micro_trainer(tmp_path / "c", steps=6)
    fresh.model.load_state_dict(ck.load_checkpoint(tmp_path / "b" / "checkpoint-00000003.json").model_state)
    fresh.step = 3
    fresh.fit()  # fit() without resume re-seeds and has a fresh optimizer
    assert not all(torch.equal(a, b) for a, b in zip(straight.model.state_dict().values(), fresh.model.state_dict().values()))


def test_loader_workers_and_bf16(tmp_path):
    a = micro_trainer(None, steps=4)
    a.fit()
    b = micro_trainer(None, steps=4, num_workers=2)  # worker processes load the same batches
    b.fit()
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    c = micro_trainer(None, steps=3, precision="bf16")  # forced bf16 autocast (off by default on CPU)
    assert c.use_bf16 and not a.use_bf16
    history = c.fit()
    assert all(np.isfinite(r["loss"]) for r in history)
    assert not all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), c.model.state_dict().values()))


def test_data_order_is_a_function_of_seed_and_epoch(tmp_path):
    t = micro_trainer(tmp_path, steps=4)
    seen = [sorted(t.local_indices(s)) for s in range(4)]
    assert seen[0] != seen[2] or seen[1] != seen[3]  # epochs are reshuffled
    assert len(set(seen[0]) | set(seen[1])) == 8  # no repeats within an epoch
    assert seen == [sorted(micro_trainer(tmp_path, steps=4).local_indices(s)) for s in range(4)]


# -- DDP ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clip_setup():
    from dalle_fast.tokenizer import Tokenizer
    data = ShapesDataset(size=16, length=8, seed=3)
    tok = Tokenizer.train(data.captions() * 4, vocab_size=300 + 24, text_len=24)
    cfg = CLIPConfig.for_tokenizer(tok, "tiny", image_size=16)
    return data, tok, cfg


class _DoubleCollate(TokenizingCollate):
    """float64 images: Adam's first step divides the gradient by its magnitude, which amplifies float32
    summation-order noise in near-zero gradients; float64 makes the comparison well conditioned."""

    def __call__(self, items):
        batch = super().__call__(items)
        return {**batch, "image": batch["image"].double()}


def _one_step(out_dir, rank_tag):
    data, tok, cfg = _clip_setup()
    torch.manual_seed(0)
    model = CLIP(cfg).double()
    tc = TrainConfig(steps=1, batch_size=8, lr=1e-2, warmup_steps=0, progress=False, checkpoint_every=1000, seed=0)
    t = Trainer(model, clip_loss, data, tc, None, collate_fn=_DoubleCollate(tok), model_type="clip",
                model_config=cfg, device="cpu")
    t.fit()
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, os.path.join(out_dir, f"{rank_tag}.pt"))


def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _one_step(out_dir, f"rank{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_single_process(tmp_path):
    """CLIP's contrastive loss couples the samples, so this also checks the cross-rank all-gather."""
    _one_step(str(tmp_path), "single")
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = torch.load(tmp_path / "single.pt")
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    init = CLIP(_clip_setup()[2]).double().state_dict()
    changed = 0
    for k in single:
        torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=0)
        torch.testing.assert_close(r0[k], single[k], rtol=1e-9, atol=1e-11)
        changed += not torch.equal(single[k], init[k])
    assert changed > len(single) // 2  # the step did update the weights


# -- CLI ------------------------------------------------------------------------------------------
def test_cli_registry_and_help():
    assert {"train-vae", "train-clip"} <= set(SUBCOMMANDS)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["no-such-command"])


def test_cli_train_vae_smoke(tmp_path, capsys):
    argv = ["train-vae", "--preset", "tiny", "--image-size", "16", "--steps", "4", "--batch-size", "4",
            "--shapes-length", "16", "--out", str(tmp_path), "--checkpoint-every", "2", "--no-progress",
            "--device", "cpu"]
    assert main(argv) == 0
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["checkpoint-00000002.json", "checkpoint-00000004.json"]
    model = ck.load_model(tmp_path)
    assert isinstance(model, DVAE) and model.config.image_size == 16
    assert "done: step 4" in capsys.readouterr().out
    # resume continues from step 4
    assert main(argv[:6] + ["6"] + argv[7:] + ["--resume", "auto"]) == 0
    assert ck.latest_checkpoint(tmp_path).name == "checkpoint-00000006.json"
    assert main(["train-vae", "--image-size", "17", "--out", str(tmp_path)]) == 2  # bad input -> clear error


def test_cli_train_clip_smoke(tmp_path):
    argv = ["train-clip", "--steps", "2", "--batch-size", "4", "--shapes-length", "16", "--out", str(tmp_path),
            "--vocab-size", "400", "--text-len", "32", "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    assert (tmp_path / "tokenizer.json").is_file()
    assert isinstance(ck.load_model(tmp_path), CLIP)


# -- runs, checkpoints and bad input -------------------------------------------------------------------
def test_keep_checkpoints_must_be_positive(tmp_path):
    for keep in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="keep_checkpoints"):
            TrainConfig(keep_checkpoints=keep)
        with pytest.raises(ValueError, match="keep"):
            ck.save_checkpoint(tmp_path, 1, torch.nn.Linear(2, 2), keep=keep)
    assert not list(tmp_path.iterdir())  # refused before writing anything
    TrainConfig(keep_checkpoints=None)  # keep all


@pytest.mark.parametrize("field, value", [("weight_decay", -5.0), ("min_lr_ratio", -1.0), ("min_lr_ratio", 1.5),
                                          ("betas", (0.9, 1.0)), ("lr", float("inf")), ("warmup_steps", 1.5)])
def test_train_config_ranges(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_one_run_per_out_dir(tmp_path):
    """A fresh run does not start over another run's checkpoints (it would overwrite or prune them,
    and --resume auto would pick the other run's), nor does a resume from an older checkpoint."""
    micro_trainer(tmp_path, steps=4, every=2).fit()
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match="already holds checkpoints.*resume='auto'"):
        micro_trainer(tmp_path, steps=2, every=2).fit()
    with pytest.raises(ValueError, match="not the newest checkpoint"):
        micro_trainer(tmp_path, steps=6, every=2).fit(resume=tmp_path / "checkpoint-00000002.json")
    other = tmp_path.parent / "other"
    micro_trainer(other, steps=1).fit()
    with pytest.raises(ValueError, match="not the newest checkpoint"):  # another run's checkpoint
        micro_trainer(tmp_path, steps=6, every=2).fit(resume=other)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before  # nothing touched
    t = micro_trainer(tmp_path, steps=6, every=2)
    t.fit(resume=tmp_path / "checkpoint-00000004.safetensors")  # the newest, named by its weights file
    assert t.step == 6
    fresh = micro_trainer(tmp_path / "new", steps=1)  # an empty or missing out_dir starts fresh
    fresh.fit(resume="auto")
    assert fresh.step == 1


def test_metrics_log_holds_one_record_per_step_after_resume(tmp_path):
    micro_trainer(tmp_path, steps=4, every=2).fit()  # logs steps 1-4, checkpoints 2 and 4
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss"')  # a record cut short by a crash
    for p in ck.list_checkpoints(tmp_path)[-1:]:  # as if the run died before checkpoint 4 was written
        p.unlink()
    micro_trainer(tmp_path, steps=4, every=2).fit(resume="auto")  # from 2: logs 3 and 4 again
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4], steps
    ck.remove_checkpoints(tmp_path)
    assert not list(tmp_path.glob("checkpoint-*"))
    micro_trainer(tmp_path, steps=1).fit()  # a fresh run starts the log anew
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]


def test_resume_refuses_another_model_config_or_type(tmp_path):
    micro_trainer(tmp_path, steps=1).fit()
    other = DVAEConfig(**{**MICRO.__dict__, "n_hid": 32})
    t = Trainer(DVAE(other), dvae_loss, ShapesDataset(size=16, length=10, seed=1),
                TrainConfig(steps=2, batch_size=4, progress=False), tmp_path, collate_fn=image_collate,
                model_type="dvae", model_config=other, device="cpu")
    with pytest.raises(ValueError, match="different model config: n_hid=16 \\(this run: 32\\)"):
        t.fit(resume="auto")
    t = Trainer(DVAE(MICRO), dvae_loss, ShapesDataset(size=16, length=10, seed=1),
                TrainConfig(steps=2, batch_size=4, progress=False), tmp_path, collate_fn=image_collate,
                model_type="clip", model_config=MICRO, device="cpu")
    with pytest.raises(ValueError, match="holds a 'dvae' model, this run trains 'clip'"):
        t.fit(resume="auto")


def test_bad_checkpoint_files_are_clear_errors(tmp_path):
    path = ck.save_checkpoint(tmp_path, 3, torch.nn.Linear(2, 2), model_type="dvae", model_config=MICRO)
    good = path.read_text()
    for text, match in ((good[:40], "not a readable checkpoint"), ("[1, 2]", "not a dalle_fast checkpoint"),
                        (json.dumps({**json.loads(good), "weights": "gone.safetensors"}), "cannot be read"),
                        (json.dumps({k: v for k, v in json.loads(good).items() if k != "weights"}), "lacks weights")):
        path.write_text(text)
        with pytest.raises(ValueError, match=match) as err:
            ck.load_checkpoint(path)
        assert str(path) in str(err.value)
    path.write_text(good)
    path.with_suffix(".safetensors").unlink()
    with pytest.raises(ValueError, match="cannot be read"):
        ck.load_checkpoint(tmp_path)
    # a checkpoint whose weights do not fit its config
    path = ck.save_checkpoint(tmp_path, 4, torch.nn.Linear(2, 2), model_type="dvae", model_config=MICRO)
    with pytest.raises(ValueError, match="weights do not fit"):
        ck.load_model(path)


def test_checkpoint_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = ck.save_checkpoint(tmp_path, 1, torch.nn.Linear(2, 2))
        assert (path.stat().st_mode & 0o777) == 0o644
        assert (path.with_suffix(".safetensors").stat().st_mode & 0o777) == 0o644
        os.umask(0o077)
        path = ck.save_checkpoint(tmp_path, 2, torch.nn.Linear(2, 2))
        assert (path.stat().st_mode & 0o777) == 0o600
    finally:
        os.umask(old)


def test_bad_device_is_a_clear_error():
    from dalle_fast.train import resolve_device
    with pytest.raises(ValueError, match="--device: 'gpu' is not a device"):
        resolve_device("gpu", "--device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_diverging_run_names_the_newest_checkpoint(tmp_path, capsys):
    argv = ["train-vae", "--preset", "tiny", "--image-size", "16", "--steps", "6", "--batch-size", "4",
            "--shapes-length", "16", "--out", str(tmp_path), "--checkpoint-every", "1", "--no-progress",
            "--device", "cpu", "--lr", "1e12", "--grad-clip", "0"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "training diverged: loss is nan at step" in err and "newest checkpoint" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_bad_paths_and_sizes(tmp_path, capsys):
    common = ["--steps", "1", "--batch-size", "4", "--shapes-length", "8", "--no-progress", "--device", "cpu"]
    missing = tmp_path / "typo" / "tokenizr.json"
    assert main(["train-clip", "--tokenizer", str(missing), "--out", str(tmp_path / "clip")] + common) == 2
    assert "--tokenizer" in capsys.readouterr().err and not missing.exists()
    assert main(["train-vae", "--image-size", "0", "--out", str(tmp_path / "vae")] + common) == 2
    assert "image_size" in capsys.readouterr().err
    assert main(["train-vae", "--keep-checkpoints", "-1", "--out", str(tmp_path / "vae")] + common) == 2
    assert "keep_checkpoints" in capsys.readouterr().err
    assert main(["train-vae", "--out", str(tmp_path / "vae")] + common[:-2] + ["--device", "gpu"]) == 2
    assert "--device" in capsys.readouterr().err
    # an existing tokenizer: size flags that would be ignored say so
    assert main(["train-clip", "--out", str(tmp_path / "clip"), "--vocab-size", "400", "--text-len", "16"]
                + common) == 0
    capsys.readouterr()
    assert main(["train-clip", "--out", str(tmp_path / "clip2"), "--text-len", "32", "--tokenizer",
                 str(tmp_path / "clip" / "tokenizer.json")] + common) == 0
    assert "--text-len 32 only apply" in capsys.readouterr().err  # (the CLI prints warnings as lines)


def test_truncated_captions_warn_with_truncation_warning():
    from dalle_fast.tokenizer import Tokenizer, TruncationWarning
    tok = Tokenizer.train(["a red circle"] * 10, vocab_size=300, text_len=4)
    collate = TokenizingCollate(tok)
    with pytest.warns(TruncationWarning):
        collate([{"caption": "a red circle a red circle", "image": torch.zeros(3, 2, 2)}])


def test_prepare_tokenizer_trains_keeps_a_copy_and_refuses_a_foreign_one(tmp_path):
    """The training runs' tokenizer step as a library call: trained into out_dir when missing, an
    existing one reused (a warning when vocab_size asks otherwise), a missing path or a tokenizer that
    differs from the run already in out_dir refused, naming the argument."""
    import warnings

    from dalle_fast.data.shapes import ShapesDataset
    from dalle_fast.train import prepare_tokenizer

    data = ShapesDataset(size=16, length=40, seed=3)
    out = tmp_path / "run"
    tok = prepare_tokenizer(data, out, vocab_size=800)
    assert (out / "tokenizer.json").is_file() and tok.vocab_size <= 800
    longest = max(len(ids) for ids in tok.tokenize(data.captions()))
    assert tok.text_len == min(256, longest)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = prepare_tokenizer(data, out, vocab_size=tok.vocab_size + 7)
    assert again.fingerprint() == tok.fingerprint()
    assert any("vocab_size" in str(w.message) and "existing tokenizer" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="path: .*missing.json.* is not a file"):
        prepare_tokenizer(data, out, tmp_path / "missing.json")
    # a run with checkpoints in out_dir keeps its tokenizer
    other = prepare_tokenizer(ShapesDataset(size=16, length=40, seed=4), tmp_path / "other", vocab_size=700,
                              text_len=12)
    assert other.fingerprint() != tok.fingerprint()
    prepare_tokenizer(data, tmp_path / "fresh", tmp_path / "other" / "tokenizer.json")  # no run there: taken
    (out / "checkpoint-00000001.json").write_text("{}")
    assert ck.list_checkpoints(out)
    with pytest.raises(ValueError, match="differs from .*the tokenizer of the run in out_dir"):
        prepare_tokenizer(data, out, tmp_path / "other" / "tokenizer.json")
