"""Nothing lost: damaged checkpoints are passed over (and kept, renamed), a killed writer's temporary
files are cleaned, every load failure is a ValueError naming the file, and resuming says what it did."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch

from dalle_fast import checkpoint as ck
from dalle_fast.cli import main
from dalle_fast.data.shapes import ShapesDataset
from dalle_fast.models.dvae import DVAE, DVAEConfig
from dalle_fast.train import TrainConfig, Trainer, dvae_loss, image_collate

torch.set_num_threads(1)
MICRO = DVAEConfig(image_size=16, vocab_size=64, n_hid=16, n_init=16, n_blk_per_group=1, group_count=2,
                   tau_anneal_steps=20, kl_warmup_steps=5)


def micro_trainer(out_dir, steps, **kw):
    torch.manual_seed(123)
    cfg = TrainConfig(steps=steps, batch_size=4, lr=3e-3, warmup_steps=2, checkpoint_every=kw.pop("every", 2),
                      progress=False, seed=7, log_every=1, **kw)
    return Trainer(DVAE(MICRO), dvae_loss, ShapesDataset(size=16, length=10, seed=1), cfg, out_dir,
                   collate_fn=image_collate, model_type="dvae", model_config=MICRO, device="cpu")


class Stop(Exception):
    pass


def interrupted_run(out_dir, stop_at, steps=8):
    """A run of ``steps`` steps that stops (like a killed process) when step ``stop_at`` begins."""
    t = micro_trainer(out_dir, steps)

    def loss(model, batch, step):
        if step == stop_at:
            raise Stop
        return dvae_loss(model, batch, step)

    t.loss_fn = loss
    with pytest.raises(Stop):
        t.fit()


def weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Weights of an uninterrupted 8-step run."""
    t = micro_trainer(tmp_path_factory.mktemp("straight"), 8)
    t.fit()
    return weights(t)


def damage(path, how):
    if how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "delete":
        path.unlink()
    elif how == "garbage":
        path.write_bytes(b"\x00" * 100)


@pytest.mark.parametrize("what,how", [("safetensors", "truncate"), ("json", "truncate"), ("safetensors", "delete"),
                                      ("json", "garbage")])
def test_resume_auto_passes_over_a_damaged_newest_checkpoint(tmp_path, straight, what, how):
    """With the newest checkpoint damaged, --resume auto failed and resuming from the previous
    intact one was refused ("not the newest checkpoint"): no way to recover was given."""
    interrupted_run(tmp_path, 6)  # checkpoints 2, 4, 6
    damage(tmp_path / f"checkpoint-00000006.{what}", how)
    resumed = micro_trainer(tmp_path, 8)
    with pytest.warns(UserWarning, match=r"checkpoint-00000006\.json is damaged .*resuming from checkpoint-00000004"):
        resumed.fit(resume="auto")
    assert resumed.step == 8
    assert_same_weights(weights(resumed), straight)
    # the damaged files are kept, renamed out of the checkpoint listing (and of pruning)
    kept = sorted(p.name for p in tmp_path.glob("*.damaged"))
    assert "checkpoint-00000006.json.damaged" in kept
    if how != "delete":
        assert f"checkpoint-00000006.{what}.damaged" in kept
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == [f"checkpoint-0000000{i}.json" for i in (4, 6, 8)]


def test_resume_from_an_older_checkpoint_when_the_newer_ones_are_damaged(tmp_path, straight):
    interrupted_run(tmp_path, 6)
    older = tmp_path / "checkpoint-00000004.json"
    # all intact: going back would mix two runs; the message says how to recover
    with pytest.raises(ValueError, match=r"not the newest checkpoint .*move the newer checkpoints"):
        micro_trainer(tmp_path, 8).fit(resume=older)
    damage(tmp_path / "checkpoint-00000006.safetensors", "truncate")
    resumed = micro_trainer(tmp_path, 8)
    with pytest.warns(UserWarning, match=r"checkpoint-00000006\.json is damaged"):
        resumed.fit(resume=older)
    assert_same_weights(weights(resumed), straight)
    assert (tmp_path / "checkpoint-00000006.safetensors.damaged").is_file()


def test_no_checkpoint_verifies_is_a_clear_error_and_renames_nothing(tmp_path):
    micro_trainer(tmp_path, 4).fit()
    for step in (2, 4):
        damage(tmp_path / f"checkpoint-0000000{step}.safetensors", "truncate")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match=r"no checkpoint .* verifies: checkpoint-00000004\.json \(.*\); "
                                         r"checkpoint-00000002\.json"):
        micro_trainer(tmp_path, 6).fit(resume="auto")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_resume_auto_recovers_and_says_what_it_passed_over(tmp_path, capsys):
    argv = ["train-vae", "--image-size", "16", "--batch-size", "4", "--shapes-length", "8", "--out", str(tmp_path),
            "--checkpoint-every", "1", "--no-progress", "--device", "cpu", "--steps"]
    assert main(argv + ["2"]) == 0
    damage(tmp_path / "checkpoint-00000002.safetensors", "truncate")
    capsys.readouterr()
    assert main(argv + ["3", "--resume", "auto"]) == 0  # the CLI prints its warnings as one line each
    err = capsys.readouterr().err
    assert "warning: resume: checkpoint-00000002.json is damaged" in err and "resuming from checkpoint-00000001.json" in err
    assert ck.latest_checkpoint(tmp_path).name == "checkpoint-00000003.json"
    assert (tmp_path / "checkpoint-00000002.safetensors.damaged").is_file()


def test_stale_temporary_files_of_a_killed_writer_are_removed(tmp_path, straight):
    """kill -9 during a checkpoint write left its full-size hidden temporary file in --out forever."""
    interrupted_run(tmp_path, 4)
    stale = [tmp_path / ".checkpoint-00000006.safetensors.k2j3_x9a.tmp", tmp_path / ".checkpoint-00000006.json.abcdefgh.tmp",
             tmp_path / ".metrics.jsonl.zz8u1q0w.tmp"]
    for p in stale:
        p.write_bytes(b"x" * 1000)
    others = [tmp_path / ".keep.tmp", tmp_path / "notes.checkpoint-00000006.safetensors.abc.tmp", tmp_path / "x.txt"]
    for p in others:
        p.write_text("user file")
    resumed = micro_trainer(tmp_path, 8)
    with pytest.warns(UserWarning, match="removed 3 unfinished file"):
        resumed.fit(resume="auto")
    assert not any(p.exists() for p in stale) and all(p.read_text() == "user file" for p in others)
    assert_same_weights(weights(resumed), straight)
    # a new run in a fresh directory cleans too (and prune-only writes leave nothing behind)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".checkpoint-00000002.json.qwertyui.tmp").write_text("{")
    with pytest.warns(UserWarning, match="removed 1 unfinished file"):
        micro_trainer(fresh, 2).fit()
    assert sorted(p.name for p in fresh.iterdir() if p.name.startswith(".")) == []


def write_checkpoint(tmp_path, **meta_changes):
    path = ck.save_checkpoint(tmp_path, 3, torch.nn.Linear(2, 2), torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()))
    meta = json.loads(path.read_text())
    meta.update(meta_changes)
    path.write_text(json.dumps(meta))
    return path


def test_invalid_safetensors_header_with_a_valid_hash_is_a_value_error(tmp_path):
    """A weights file whose hash matches but whose header is not safetensors escaped as a raw
    SafetensorError traceback."""
    path = write_checkpoint(tmp_path)
    blob = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"
    (tmp_path / "checkpoint-00000003.safetensors").write_bytes(blob)
    write_checkpoint(tmp_path, weights_sha256=hashlib.sha256(blob).hexdigest())
    (tmp_path / "checkpoint-00000003.safetensors").write_bytes(blob)
    with pytest.raises(ValueError, match=r"checkpoint-00000003\.safetensors.*not a valid safetensors file"):
        ck.load_checkpoint(path)
    with pytest.raises(ValueError, match="checkpoint-00000003"):
        ck.load_model(path)


@pytest.mark.parametrize("field,value", [("step", "three"), ("step", -1), ("step", True), ("weights", "../elsewhere"),
                                         ("weights", 5), ("weights_sha256", None), ("model_type", 7),
                                         ("optimizer", {"state": {}}), ("optimizer", [1, 2]), ("rng", "x"),
                                         ("extra", []), ("model_config", "x")])
def test_malformed_checkpoint_fields_are_value_errors_naming_the_file(tmp_path, field, value):
    path = write_checkpoint(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=r"checkpoint-00000003\.json"):
        ck.load_checkpoint(path)


def test_malformed_optimizer_state_is_a_value_error_naming_the_file(tmp_path):
    path = write_checkpoint(tmp_path, optimizer={"param_groups": [{"params": [0, 1]}], "state": {"x": {"step": 1}}})
    with pytest.raises(ValueError, match=r"checkpoint-00000003\.json"):
        ck.load_checkpoint(path)


def test_malformed_rng_state_on_resume_is_a_value_error_naming_the_file(tmp_path):
    micro_trainer(tmp_path, 2).fit()
    path = tmp_path / "checkpoint-00000002.json"
    meta = json.loads(path.read_text())
    meta["rng"] = [{"torch": "bm90IGEgc3RhdGU=", "numpy": [1], "python": [3]}]
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"checkpoint-00000002\.json.*RNG"):
        micro_trainer(tmp_path, 4).fit(resume="auto")


def test_resume_without_optimizer_state_warns(tmp_path):
    """A checkpoint whose optimizer state is null resumed silently with fresh AdamW state."""
    micro_trainer(tmp_path, 2).fit()
    path = tmp_path / "checkpoint-00000002.json"
    meta = json.loads(path.read_text())
    meta["optimizer"] = None
    path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"checkpoint-00000002\.json' holds no optimizer state"):
        micro_trainer(tmp_path, 3).fit(resume="auto")


def test_resuming_a_finished_run_reports_its_step_not_nan(tmp_path, capsys):
    argv = ["train-vae", "--image-size", "16", "--batch-size", "4", "--shapes-length", "8", "--out", str(tmp_path),
            "--no-progress", "--device", "cpu", "--steps", "2"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv + ["--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out and "step 2" in out and "already" in out
    assert ck.latest_checkpoint(tmp_path).name == "checkpoint-00000002.json"
    assert os.path.getsize(tmp_path / "metrics.jsonl") > 0


def test_codes_cache_killed_while_written_is_encoded_again(tmp_path):
    """A run killed while writing the transformer's code cache left a truncated meta.json, which
    the next run read with json.loads (a traceback); a record from an older encoding could also
    match arrays half replaced by a newer one."""
    from dalle_fast.data.codes import encode_dataset
    from dalle_fast.tokenizer import Tokenizer
    data = ShapesDataset(size=16, length=6, seed=2)
    tok = Tokenizer.train([data[i]["caption"] for i in range(6)], vocab_size=300, text_len=16)
    dvae = DVAE(MICRO).eval()
    first = encode_dataset(dvae, tok, data, 15, tmp_path, {"v": 1}, progress=False)
    codes = np.array(first.codes)
    (tmp_path / "meta.json").write_text('{"describe": {"v"')  # killed mid-write
    again = encode_dataset(dvae, tok, data, 15, tmp_path, {"v": 1}, progress=False)
    assert np.array_equal(np.array(again.codes), codes)
    assert json.loads((tmp_path / "meta.json").read_text())["describe"] == {"v": 1}
